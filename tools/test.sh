#!/usr/bin/env bash
# Run the whole test suite against the installed package (tools/setup.sh installs it).
#
# pytest is started through .venv/bin/pytest, not `python -m pytest`, so the source tree's
# sparsekit/ (which has no compiled _C) is not put on sys.path ahead of the installed package.
# SPARSEKIT_REQUIRE_BACKENDS makes a missing compiled backend a test failure instead of a
# silent fallback to Numba.
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARSEKIT_REQUIRE_BACKENDS="${SPARSEKIT_REQUIRE_BACKENDS:-cpp,numba}"
export PYTHONUNBUFFERED=1
# Tests that start `python -c ...` / `python -m ...` subprocesses from the repo root get the
# source tree first on sys.path; give it the compiled module that pip built from this same
# source, so both import paths run identical code (the in-place copy is git-ignored).
so=$(cd .venv && bin/python -c "import glob, os, sparsekit; d = os.path.dirname(sparsekit.__file__); print(next(iter(glob.glob(os.path.join(d, '_C*.so'))), ''))")
if [ -n "$so" ] && [ "$(dirname "$so")" != "$PWD/sparsekit" ]; then
    cp -f "$so" sparsekit/
fi
start=$(date +%s)
.venv/bin/pytest -q -ra "$@"
echo "pytest: $(( $(date +%s) - start )) s"
# The C++ kernels under AddressSanitizer + UBSan (a separate build; fails on any report).
if [ "${SPARSEKIT_SKIP_SANITIZE:-0}" != "1" ]; then
    start=$(date +%s)
    PYTHON=.venv/bin/python bash tools/sanitize.sh
    echo "sanitize: $(( $(date +%s) - start )) s"
fi
