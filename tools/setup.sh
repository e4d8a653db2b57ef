#!/usr/bin/env bash
# The development install: create .venv (if needed) and install this checkout into it, editable,
# with its compiled kernels built in place (sparsekit/_C*.so) and the dev extras.
#
# Afterwards `.venv/bin/python` imports sparsekit - Python sources and the compiled module -
# from this checkout, from any working directory and entry point (script, -c, -m, pytest,
# subprocesses). After a C++ change, rebuild with tools/build_inplace.sh.
#
# torch is installed first and pinned here (not in pyproject, which asks for a range): on the
# project's machines torch==2.13.0 resolves to a local CPU wheel, while an unpinned torch would
# pull a multi-GB CUDA build. Set SPARSEKIT_TORCH to install another torch requirement.
# SPARSEKIT_CUDA=AUTO|ON|OFF (default AUTO: CUDA kernels where nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_REQ="${SPARSEKIT_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_REQ"
# Build requirements go into .venv itself (no build isolation): the in-source CMake tree keeps
# pointing at them, so tools/build_inplace.sh can rebuild incrementally later.
.venv/bin/python -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" ninja
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[dev]"
# From another directory on purpose: the import must not depend on the working directory.
(cd / && "$OLDPWD/.venv/bin/python" -c "import sparsekit; print('sparsekit', sparsekit.__version__, 'backends:', sparsekit.backends(), 'from', sparsekit.__path__[0])")
