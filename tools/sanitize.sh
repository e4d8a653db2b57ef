#!/usr/bin/env bash
# Build sparsekit._C with AddressSanitizer + UndefinedBehaviorSanitizer and run the kernel
# tests against it. Fails (exit 1) on any sanitizer report or test failure.
#
#   bash tools/sanitize.sh              # build into build-sanitize/, run the fast test subset
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
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
BUILD_DIR="${SANITIZE_BUILD_DIR:-$ROOT/build-sanitize}"
SELF_TEST=0
for a in "$@"; do
  case "$a" in
    --self-test) SELF_TEST=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "sanitize.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
T0=$(date +%s)

# ------------------------------------------------------------------ build (separate build dir)
CXX_BIN="${CXX:-c++}"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DPython_EXECUTABLE="$PYTHON" \
    -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
    -DSPARSEKIT_CUDA=OFF -DSPARSEKIT_SANITIZE=ON >/dev/null
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
REPORT_DIR="$OVERLAY/reports"
mkdir -p "$REPORT_DIR"
cleanup() { rm -rf "$OVERLAY"; }
trap cleanup EXIT
# Mirror the package (sources only), then drop the sanitized extension in.
(cd "$ROOT" && find sparsekit -type d -name __pycache__ -prune -o -type f -print \
  | grep -v -E '/_C[^/]*\.(so|pyd)$' | grep -v -E '/\.[^/]*\.tmp$' \
  | while read -r f; do mkdir -p "$OVERLAY/$(dirname "$f")"; cp "$f" "$OVERLAY/$f"; done)
cp "$SO" "$OVERLAY/sparsekit/"

# ------------------------------------------------------------------ runtime environment
LIBASAN="$("$CXX_BIN" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX_BIN" -print-file-name=libubsan.so)"
for l in "$LIBASAN" "$LIBUBSAN"; do
  [ -f "$l" ] || { echo "sanitize.sh: runtime $l not found" >&2; exit 1; }
done
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
# log_path: reports go to files we scan afterwards, so a report is a failure even if some
# library swallowed the abort. halt_on_error: the first report stops the process.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:\
allocator_may_return_null=1:log_path=$REPORT_DIR/asan:log_exe_name=0:handle_segv=1:verify_asan_link_order=0"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:\
log_path=$REPORT_DIR/ubsan"
export PYTHONPATH="$OVERLAY"
export PYTHONDONTWRITEBYTECODE=1
export SPARSEKIT_REQUIRE_BACKENDS=cpp
export SPARSEKIT_NUM_THREADS="${SPARSEKIT_NUM_THREADS:-2}"
# The numba JIT is irrelevant here (the C++ kernels are under test) and slow to start.
export NUMBA_CACHE_DIR="$OVERLAY/numba-cache"

fail=0
check_reports() {
  shopt -s nullglob
  local reports=("$REPORT_DIR"/asan* "$REPORT_DIR"/ubsan*)
  if [ ${#reports[@]} -gt 0 ]; then
    echo "sanitize.sh: *** sanitizer reports after: $1 ***" >&2
    for r in "${reports[@]}"; do echo "--- $r" >&2; head -60 "$r" >&2; done
    rm -f "${reports[@]}"
    fail=1
  fi
}

# Sanity: the extension really is the sanitized one and the ASan runtime is live.
"$PYTHON" - <<'EOF'
import sparsekit, sparsekit._C as C
maps = open("/proc/self/maps").read()
assert "sparsekit-sanitize" in C.__file__, C.__file__
assert "libasan" in maps and "libubsan" in maps, "sanitizer runtimes not mapped"
print("sanitize.sh: using", C.__file__, "| isa", C.cpu_isa())
EOF
check_reports "import"

if [ "$SELF_TEST" = 1 ]; then
  # A planted heap overflow must be reported and must fail the process: proves that the
  # preload/options combination above would catch a real bug in the extension.
  st_dir="$OVERLAY/selftest"; mkdir -p "$st_dir"
  cat > "$st_dir/oob.cpp" <<'EOF'
#include <cstdlib>
extern "C" int sparsekit_selftest_oob(int n) { int *p = (int *)std::malloc(n * sizeof(int));
  volatile int v = p[n]; std::free(p); return v; }
extern "C" int sparsekit_selftest_ub(int x) { return x + 2147483647; }
EOF
  "$CXX_BIN" -shared -fPIC -g -fsanitize=address,undefined -o "$st_dir/liboob.so" "$st_dir/oob.cpp"
  for fn in oob ub; do
    if "$PYTHON" -c "import ctypes; ctypes.CDLL('$st_dir/liboob.so').sparsekit_selftest_$fn(4)" \
        >/dev/null 2>&1; then
      echo "sanitize.sh: self-test FAILED: planted $fn bug was not fatal" >&2; exit 1
    fi
    shopt -s nullglob
    r=("$REPORT_DIR"/*)
    [ ${#r[@]} -gt 0 ] || { echo "sanitize.sh: self-test: no report for $fn" >&2; exit 1; }
    rm -f "${r[@]}"
    echo "sanitize.sh: self-test: planted $fn bug reported and fatal (ok)"
  done
fi

# ------------------------------------------------------------------ tests
T1=$(date +%s)
TESTS=()
for t in tests/test_cpp_bindings.py tests/test_kernels.py tests/test_formats.py \
         tests/test_fuzz.py; do
  [ -f "$t" ] && TESTS+=("$t")
done
[ ${#TESTS[@]} -gt 0 ] || { echo "sanitize.sh: no kernel tests found" >&2; exit 1; }
# -p no:cacheprovider: the overlay is throw-away. The fuzz-harness wrapper is excluded here
# (it runs below with its own case count); -x: stop at the first failure.
set +e
nice "$PYTHON" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}" \
  -k "not harness and not slow" ${SANITIZE_PYTEST_ARGS:-}
rc=$?
set -e
check_reports "pytest"
[ $rc -eq 0 ] || { echo "sanitize.sh: pytest failed (status $rc)" >&2; fail=1; }

FUZZ_CASES="${SANITIZE_FUZZ_CASES:-600}"
if [ "$fail" = 0 ] && [ "$FUZZ_CASES" -gt 0 ]; then
  set +e
  nice "$PYTHON" tools/fuzz_harness.py --cases "$FUZZ_CASES" --batch 300 --start 500000 -q
  rc=$?
  set -e
  check_reports "fuzz harness"
  [ $rc -eq 0 ] || { echo "sanitize.sh: fuzz harness failed (status $rc)" >&2; fail=1; }
fi
T_END=$(date +%s)
echo "sanitize.sh: build ${T_BUILD}s, tests $(( T_END - T1 ))s, total $(( T_END - T0 ))s"
if [ "$fail" != 0 ]; then
  echo "sanitize.sh: FAILED" >&2
  exit 1
fi
echo "sanitize.sh: OK (no ASan/UBSan reports)"
