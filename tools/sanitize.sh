#!/usr/bin/env bash
# Build sparsekit._C with AddressSanitizer + UndefinedBehaviorSanitizer and run the kernel
# tests against it, plus the per-micro-kernel tester (tests/cpp/ukernel_test.cpp) built with
# the same sanitizers. Fails (exit 1) on any sanitizer report or test failure.
#
#   bash tools/sanitize.sh              # build into build/sanitize/, run the fast test subset
#   bash tools/sanitize.sh --self-test  # also prove the setup catches a planted heap overflow
#   SANITIZE_PYTEST_ARGS="-k csr" bash tools/sanitize.sh   # extra pytest args
#   SANITIZE_FUZZ_CASES=600            # cases for the fuzz-harness step (0 to skip)
#
# The sanitized module never replaces the in-place sparsekit/_C*.so: the package sources are
# mirrored into a temporary overlay directory next to the sanitized .so, and PYTHONPATH points
# there. Python itself is not instrumented, so the ASan runtime must be LD_PRELOADed (it has to
# be the first DSO to load); leak checking is off because CPython and torch deliberately keep
# allocations alive until exit (reports there would not be ours).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
# The steps below run from other directories: make a relative interpreter path absolute.
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
BUILD_DIR="${SANITIZE_BUILD_DIR:-$ROOT/build/sanitize}"  # under build/: git-ignored
SELF_TEST=0
for a in "$@"; do
  case "$a" in
    --self-test) SELF_TEST=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "sanitize.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
T0=$(date +%s)

# ------------------------------------------------------------------ build (separate build dir)
CXX_BIN="${CXX:-c++}"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
# The kernels are compiled at -O1 instead of the project's -O3 (a compiler launcher rewrites
# the flag): the usual ASan setting, ~2x faster to build, clearer stack traces, and the same
# code paths (the ISA-specific kernels are selected at run time, not by the optimiser).
SAN_OPT="${SANITIZE_OPT:--O1}"
mkdir -p "$BUILD_DIR"
LAUNCHER="$BUILD_DIR/opt-launcher.sh"
cat > "$LAUNCHER.tmp" <<LEOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do case "\$a" in -O2|-O3) a="$SAN_OPT" ;; esac; args+=("\$a"); done
exec "\${args[@]}"
LEOF
chmod +x "$LAUNCHER.tmp"
cmp -s "$LAUNCHER.tmp" "$LAUNCHER" || mv -f "$LAUNCHER.tmp" "$LAUNCHER"
rm -f "$LAUNCHER.tmp"
STAMP="$BUILD_DIR/.sanitize-config"
WANT="opt=$SAN_OPT python=$PYTHON"
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER_LAUNCHER="$LAUNCHER" \
    -DPython_EXECUTABLE="$PYTHON" \
    -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
    -DSPARSEKIT_CUDA=OFF -DSPARSEKIT_SANITIZE=ON >/dev/null
  echo "$WANT" > "$STAMP"
fi
nice cmake --build "$BUILD_DIR" ${JOBS:+-j "$JOBS"}
shopt -s nullglob
libs=("$BUILD_DIR"/_C*.so)
[ ${#libs[@]} -eq 1 ] || { echo "sanitize.sh: expected one _C*.so in $BUILD_DIR" >&2; exit 1; }
SO="${libs[0]}"
if ! readelf -d "$SO" | grep -q 'libasan'; then
  echo "sanitize.sh: $SO is not linked against libasan (SPARSEKIT_SANITIZE ignored?)" >&2
  exit 1
fi
T_BUILD=$(( $(date +%s) - T0 ))

# ------------------------------------------------------------------ overlay package
OVERLAY="$(mktemp -d "${TMPDIR:-/tmp}/sparsekit-sanitize.XXXXXX")"
REPORT_DIR="$OVERLAY/logs"
mkdir -p "$REPORT_DIR"
cleanup() { rm -rf "$OVERLAY"; }
trap cleanup EXIT
# Mirror the package (sources only), then drop the sanitized extension in.
(cd "$ROOT" && find sparsekit -type d -name __pycache__ -prune -o -type f -print \
  | grep -v -E '/_C[^/]*\.(so|pyd)$' | grep -v -E '/\.[^/]*\.tmp$' \
  | while read -r f; do mkdir -p "$OVERLAY/$(dirname "$f")"; cp "$f" "$OVERLAY/$f"; done)
cp "$SO" "$OVERLAY/sparsekit/"
# The development install (an inplace editable) registers an import hook that resolves
# `sparsekit` to the checkout ahead of PYTHONPATH; drop it so the overlay wins.
cat > "$OVERLAY/sitecustomize.py" <<'PYEOF'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildInplaceFinder"]
PYEOF

# ------------------------------------------------------------------ runtime environment
LIBASAN="$("$CXX_BIN" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX_BIN" -print-file-name=libubsan.so)"
for l in "$LIBASAN" "$LIBUBSAN"; do
  [ -f "$l" ] || { echo "sanitize.sh: runtime $l not found" >&2; exit 1; }
done
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
# halt_on_error/abort_on_error: the first report kills the process (a test failure, or a
# "crash" for the fuzz harness). Each step's output is also scanned for reports, because UBSan
# ignores log_path when combined with ASan and prints to stderr.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:\
allocator_may_return_null=1:handle_segv=1:verify_asan_link_order=0"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
export PYTHONPATH="$OVERLAY"
export PYTHONDONTWRITEBYTECODE=1
export SPARSEKIT_REQUIRE_BACKENDS=cpp
export SPARSEKIT_NUM_THREADS="${SPARSEKIT_NUM_THREADS:-2}"
export NUMBA_CACHE_DIR="$OVERLAY/numba-cache"

fail=0
REPORT_RE='runtime error:|ERROR: AddressSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer'
# run_step NAME CMD...: run with output tee'd to a log; fail on a non-zero status or a report.
run_step() {
  local name="$1"; shift
  local log="$REPORT_DIR/$name.log" rc
  set +e
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if grep -E -q "$REPORT_RE" "$log"; then
    echo "sanitize.sh: *** sanitizer report in step '$name' ***" >&2
    grep -E -A30 "$REPORT_RE" "$log" | head -80 >&2
    fail=1
  fi
  if [ "$rc" -ne 0 ]; then
    echo "sanitize.sh: step '$name' failed (status $rc)" >&2
    fail=1
  fi
}

# Everything below runs from the overlay directory: `python -m` and `python -` put the current
# directory first on sys.path, and it must not be the checkout (with its unsanitized _C).
cd "$OVERLAY"
cat > "$OVERLAY/check_import.py" <<'PYEOF'
import sparsekit, sparsekit._C as C
maps = open("/proc/self/maps").read()
assert "sparsekit-sanitize" in C.__file__, C.__file__
assert "libasan" in maps and "libubsan" in maps, "sanitizer runtimes not mapped"
print("sanitize.sh: using", C.__file__, "| isa", C.cpu_isa())
PYEOF
run_step import "$PYTHON" "$OVERLAY/check_import.py"
[ "$fail" = 0 ] || { echo "sanitize.sh: FAILED (setup)" >&2; exit 1; }

if [ "$SELF_TEST" = 1 ]; then
  # Planted bugs must be reported AND fatal: proves the preload/options combination above
  # would catch the same bugs in the extension.
  st_dir="$OVERLAY/selftest"; mkdir -p "$st_dir"
  cat > "$st_dir/bugs.cpp" <<'CEOF'
#include <cstdlib>
extern "C" int sparsekit_selftest_oob(int n) { int *p = (int *)std::malloc(n * sizeof(int));
  volatile int v = p[n]; std::free(p); return v; }
extern "C" int sparsekit_selftest_ub(int x) { return x + 2147483647; }
CEOF
  "$CXX_BIN" -shared -fPIC -g -fsanitize=address,undefined -o "$st_dir/libbugs.so" \
    "$st_dir/bugs.cpp"
  for fn in oob ub; do
    set +e
    out="$("$PYTHON" -c "import ctypes; ctypes.CDLL('$st_dir/libbugs.so').sparsekit_selftest_$fn(4)" 2>&1)"
    rc=$?
    set -e
    if [ $rc -eq 0 ] || ! grep -E -q "$REPORT_RE" <<<"$out"; then
      echo "sanitize.sh: self-test FAILED: planted $fn bug not reported+fatal (status $rc)" >&2
      exit 1
    fi
    echo "sanitize.sh: self-test: planted $fn bug reported and fatal (status $rc): ok"
  done
fi

# ------------------------------------------------------------------ tests
T1=$(date +%s)
TESTS=()
for t in tests/test_cpp_bindings.py tests/test_variants.py tests/test_kernels.py tests/test_formats.py \
         tests/test_fuzz.py; do
  [ -f "$ROOT/$t" ] && TESTS+=("$ROOT/$t")
done
[ ${#TESTS[@]} -gt 0 ] || { echo "sanitize.sh: no kernel tests found" >&2; exit 1; }
# The fuzz-harness wrapper test is excluded (the harness runs below with its own case count).
run_step pytest nice "$PYTHON" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}" \
  -k "not harness and not slow" ${SANITIZE_PYTEST_ARGS:-}

# The stand-alone micro-kernel tester (tests/cpp/ukernel_test.cpp), built per ISA with the
# sanitizers linked in (the compiler itself runs without the preload; see test_ukernels.py).
if [ "$fail" = 0 ]; then
  run_step ukernels env SPARSEKIT_UKERNEL_CXXFLAGS="-fsanitize=address,undefined \
-fno-sanitize-recover=undefined -fno-omit-frame-pointer -g" \
    nice "$PYTHON" -m pytest -q -x -p no:cacheprovider "$ROOT/tests/test_ukernels.py"
fi

FUZZ_CASES="${SANITIZE_FUZZ_CASES:-600}"
if [ "$fail" = 0 ] && [ "$FUZZ_CASES" -gt 0 ]; then
  # Harness subprocesses inherit LD_PRELOAD and the options; a report aborts one (a "crash").
  run_step fuzz nice "$PYTHON" "$ROOT/tools/fuzz_harness.py" --cases "$FUZZ_CASES" \
    --batch 300 --start 500000 -q
fi
T_END=$(date +%s)
echo "sanitize.sh: build ${T_BUILD}s, tests $(( T_END - T1 ))s, total $(( T_END - T0 ))s"
if [ "$fail" != 0 ]; then
  echo "sanitize.sh: FAILED" >&2
  exit 1
fi
echo "sanitize.sh: OK (no ASan/UBSan reports)"
