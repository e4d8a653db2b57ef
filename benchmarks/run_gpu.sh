#!/usr/bin/env bash
# The ONE prepared script for a lent GPU machine (H100/H200, see the README's GPU section):
#   1. build + install sparsekit with the CUDA kernels (SPARSEKIT_CUDA=ON, no network needed)
#   2. pytest tests/test_cuda.py tests/test_kernels.py (CUDA + every other available backend)
#   3. benchmarks/bench_gpu.py with the time that is left
# Everything (logs, JSON) goes to $OUT (the device tool's output folder) or ./gpu-out.
#
# From a session with a device machine:
#   run(command="bash benchmarks/run_gpu.sh", timeout_s=600)
# Environment: RUN_GPU_LIMIT_S (default 540: total seconds this script may use),
#              PYTHON (default python3), DRY_RUN=1 (no build, no GPU: check the plumbing).
set -uo pipefail
START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LIMIT="${RUN_GPU_LIMIT_S:-540}"
DRY="${DRY_RUN:-0}"
export PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[run_gpu $(elapsed)s] $*" | tee -a "$OUT/run_gpu.log"; }

log "host $(hostname) python $($PY -V 2>&1) dry_run=$DRY limit=${LIMIT}s"
{
  nvidia-smi || echo "nvidia-smi unavailable"
  command -v nvcc && nvcc --version
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
} >> "$OUT/run_gpu.log" 2>&1

# ---- 1. build + install ------------------------------------------------------------------
if [ "$DRY" = "1" ]; then
  log "DRY: would run: SPARSEKIT_CUDA=ON $PY -m pip install --no-build-isolation --no-deps ."
else
  log "pip install (SPARSEKIT_CUDA=ON)"
  if ! SPARSEKIT_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$PY" -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
    log "pip install FAILED (tail of build.log follows)"
    tail -40 "$OUT/build.log"
    exit 1
  fi
  grep -E "sparsekit:|nvcc|Building CUDA" "$OUT/build.log" | head -20 | tee -a "$OUT/run_gpu.log"
  # Tests and the benchmark run from the source tree (pytest puts the repo root first on
  # sys.path), so put the freshly built module next to the sources too.
  SO=$(cd /tmp && "$PY" -c "import importlib.util as u; print(u.find_spec('sparsekit._C').origin)")
  if [ -z "$SO" ] || [ ! -f "$SO" ]; then log "installed sparsekit._C not found"; exit 1; fi
  cp -f "$SO" sparsekit/
  log "installed $SO ($(elapsed)s)"
fi
"$PY" -c "import sparsekit._C as C; print('cuda_info', dict(C.cuda_info()))" \
  2>&1 | tee -a "$OUT/run_gpu.log"

# ---- 2. tests ----------------------------------------------------------------------------
PYTEST_ARGS=(tests/test_cuda.py tests/test_kernels.py -x -q -rs -p no:cacheprovider)
if [ "$DRY" = "1" ]; then
  PYTEST_ARGS+=(--collect-only)
fi
log "pytest ${PYTEST_ARGS[*]}"
timeout 240 "$PY" -m pytest "${PYTEST_ARGS[@]}" > "$OUT/pytest.log" 2>&1
PYTEST_RC=$?
tail -15 "$OUT/pytest.log"
log "pytest rc=$PYTEST_RC"

# ---- 3. benchmark with the remaining time --------------------------------------------------
LEFT=$(( LIMIT - $(elapsed) - 45 ))
[ "$LEFT" -lt 60 ] && LEFT=60
if [ "$DRY" = "1" ]; then
  "$PY" benchmarks/bench_gpu.py --plan > "$OUT/bench.log" 2>&1
  BENCH_RC=$?
  tail -2 "$OUT/bench.log"
else
  log "bench_gpu.py --budget-s $LEFT"
  timeout $(( LEFT + 120 )) "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget-s "$LEFT" \
    > "$OUT/bench.log" 2>&1
  BENCH_RC=$?
  grep -v "^ *$" "$OUT/bench.log" | tail -40
fi
log "bench rc=$BENCH_RC; pytest rc=$PYTEST_RC; total $(elapsed)s"
ls -la "$OUT"
[ "$PYTEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
