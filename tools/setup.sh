#!/usr/bin/env bash
# Create .venv (if needed) and install sparsekit with its compiled kernels and dev extras.
#
# torch is installed first and pinned here (not in pyproject, which asks for a range): on the
# project's machines torch==2.13.0 resolves to a local CPU wheel, while an unpinned torch would
# pull a multi-GB CUDA build. Set SPARSEKIT_TORCH to install another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_REQ="${SPARSEKIT_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_REQ"
# The build compiles the C++ kernels (and the CUDA ones where nvcc is found: SPARSEKIT_CUDA=AUTO).
.venv/bin/python -m pip install --quiet ".[dev]"
# Run from inside .venv so the source tree's sparsekit/ (no compiled _C) does not shadow the install.
(cd .venv && bin/python -c "import sparsekit; print('sparsekit', sparsekit.__version__, 'backends:', sparsekit.backends())")
