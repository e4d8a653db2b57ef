#!/usr/bin/env bash
# In-place incremental build of sparsekit._C into build/ (ninja, Release), then copies the
# module into sparsekit/ so `PYTHONPATH=. python -c "import sparsekit._C"` works.
#   SPARSEKIT_CUDA=AUTO|ON|OFF (default OFF here, for speed)   SPARSEKIT_SANITIZE=ON|OFF
#   BUILD_DIR=build   PYTHON=.venv/bin/python   JOBS=<ninja -j>
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
BUILD_DIR="${BUILD_DIR:-build}"
CUDA="${SPARSEKIT_CUDA:-OFF}"
SANITIZE="${SPARSEKIT_SANITIZE:-OFF}"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

# Reconfigure only when the cache is missing or an option changed.
STAMP="$BUILD_DIR/.sparsekit-config"
WANT="cuda=$CUDA sanitize=$SANITIZE python=$PYTHON"
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$PYTHON" \
    -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
    -DSPARSEKIT_CUDA="$CUDA" -DSPARSEKIT_SANITIZE="$SANITIZE"
  echo "$WANT" > "$STAMP"
fi
cmake --build "$BUILD_DIR" ${JOBS:+-j "$JOBS"}
shopt -s nullglob
libs=("$BUILD_DIR"/_C*.so)
[ ${#libs[@]} -gt 0 ] || { echo "build_inplace: no _C*.so produced in $BUILD_DIR" >&2; exit 1; }
for lib in "${libs[@]}"; do
  # cp to a temp name + mv: a running interpreter that mapped the old file is not corrupted.
  cp -f "$lib" "sparsekit/.$(basename "$lib").tmp"
  mv -f "sparsekit/.$(basename "$lib").tmp" "sparsekit/$(basename "$lib")"
  echo "build_inplace: installed sparsekit/$(basename "$lib")"
done
