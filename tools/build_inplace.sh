#!/usr/bin/env bash
# Rebuild sparsekit/_C*.so after a C++ change (incremental, ninja, Release).
#
# It rebuilds the in-source CMake tree that the development install (tools/setup.sh) configured,
# so the one compiled module the checkout imports is the one just built. Without that tree (no
# setup run yet) it configures one for $PYTHON, with SPARSEKIT_CUDA (default OFF here, for
# speed) and SPARSEKIT_SANITIZE (default OFF); setting either variable reconfigures an existing
# tree with it (e.g. SPARSEKIT_CUDA=ON tools/build_inplace.sh).
#   PYTHON=.venv/bin/python   JOBS=<ninja -j>
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
export PATH="$PATH:$(dirname "$PYTHON")"  # a pip-installed ninja/cmake next to the interpreter
command -v ninja >/dev/null || { echo "build_inplace: ninja is required (pip install ninja)" >&2; exit 1; }
if [ ! -f CMakeCache.txt ]; then
  cmake -S . -B . -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$PYTHON" \
    -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
    -DSPARSEKIT_CUDA="${SPARSEKIT_CUDA:-OFF}" -DSPARSEKIT_SANITIZE="${SPARSEKIT_SANITIZE:-OFF}"
else
  opts=()
  [ -n "${SPARSEKIT_CUDA:-}" ] && opts+=(-DSPARSEKIT_CUDA="$SPARSEKIT_CUDA")
  [ -n "${SPARSEKIT_SANITIZE:-}" ] && opts+=(-DSPARSEKIT_SANITIZE="$SPARSEKIT_SANITIZE")
  [ ${#opts[@]} -eq 0 ] || cmake -S . -B . "${opts[@]}"
fi
cmake --build . ${JOBS:+-j "$JOBS"}
ls sparsekit/_C*.so
