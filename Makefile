# Convenience targets. Each one runs the same command documented in README.md /
# CONTRIBUTING.md, so `make X` and the documented command never drift apart.
#
#   make setup      the development install (tools/setup.sh -> .venv)
#   make build      rebuild sparsekit/_C*.so after a C++ change (tools/build_inplace.sh)
#   make test       the whole test suite (tools/test.sh)
#   make bench      default benchmark sweep (sparsekit bench) -> benchmarks/results/
#   make sanitize   C++ kernels rebuilt with ASan+UBSan (build/sanitize/), kernel tests under it
#   make fuzz       10,000 validation fuzz cases in crash-isolating subprocesses
#   make memcheck   RSS flat over 100,000 SparseLinear calls
#   make serve      the example HTTP server (examples/server)

PYTHON ?= .venv/bin/python
FUZZ_CASES ?= 10000

.PHONY: setup test bench sanitize fuzz fuzz-evidence memcheck serve build help

help:
	@sed -n '1,13p' Makefile

setup:
	./tools/setup.sh

build:
	bash tools/build_inplace.sh

test:
	./tools/test.sh

bench:
	$(PYTHON) -m sparsekit bench

sanitize:
	PYTHON=$(PYTHON) bash tools/sanitize.sh --self-test

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
