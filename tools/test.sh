#!/usr/bin/env bash
# Run the whole test suite against the development install (tools/setup.sh).
#
# SPARSEKIT_REQUIRE_BACKENDS makes a missing compiled backend a test failure instead of a
# silent fallback to Numba.
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARSEKIT_REQUIRE_BACKENDS="${SPARSEKIT_REQUIRE_BACKENDS:-cpp,numba}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
.venv/bin/python -m pytest -q -ra "$@"
echo "pytest: $(( $(date +%s) - start )) s"
# The C++ kernels under AddressSanitizer + UBSan (a separate build; fails on any report).
if [ "${SPARSEKIT_SKIP_SANITIZE:-0}" != "1" ]; then
    start=$(date +%s)
    PYTHON=.venv/bin/python bash tools/sanitize.sh
    echo "sanitize: $(( $(date +%s) - start )) s"
fi
