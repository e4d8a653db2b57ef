# Convenience targets. Each one runs the same command documented in README.md,
# so `make X` and the documented command never drift apart.
#
#   make test       the whole test suite (README: ./tools/test.sh; falls back to pytest)
#   make bench      default benchmark sweep (sparsekit bench) -> benchmarks/results/
#   make sanitize   C++ kernels rebuilt with ASan+UBSan (build/sanitize/), kernel tests under it
#   make fuzz       10,000 validation fuzz cases in crash-isolating subprocesses
#   make memcheck   RSS flat over 100,000 SparseLinear calls
#   make serve      the example HTTP server (examples/server)
#   make build      in-place build of sparsekit._C (tools/build_inplace.sh)

PYTHON ?= .venv/bin/python
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
FUZZ_CASES ?= 10000

.PHONY: test bench sanitize fuzz fuzz-evidence memcheck serve build help

help:
	@sed -n '1,12p' Makefile

build:
	bash tools/build_inplace.sh

test:
	@if [ -x tools/test.sh ]; then ./tools/test.sh; else $(PYTHON) -m pytest -q; fi

bench:
	$(PYTHON) -m sparsekit bench

sanitize:
	bash tools/sanitize.sh --self-test

fuzz:
	$(PYTHON) tools/fuzz_harness.py --cases $(FUZZ_CASES)

# Regenerates the committed evidence of the full run.
fuzz-evidence:
	$(PYTHON) tools/fuzz_harness.py --cases 10000 \
	  --json benchmarks/results/fuzz_harness_10000.json | tee benchmarks/results/fuzz_harness_10000.txt

memcheck:
	$(PYTHON) -m pytest -q -s -m "slow or not slow" tests/test_memory.py

serve:
	$(PYTHON) -m examples.server
