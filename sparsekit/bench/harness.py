"""The benchmark harness: one namespace for benchmark scripts, implemented by concern.

Every sparsekit benchmark (the ``sparsekit bench`` CLI, the scripts under ``benchmarks/``)
produces its numbers by one method:

* timing, cache size and weight rotation: :mod:`sparsekit.timing` (shared with
  ``sparsify(tune=True)``);
* memory bandwidth probe: :mod:`sparsekit.bench.probes`;
* dense baselines and result checks: :mod:`sparsekit.bench.baselines`;
* one thread count for torch, OpenBLAS and sparsekit: :mod:`sparsekit.bench.thread_control`;
* machine and environment provenance: :mod:`sparsekit.bench.machine`.
"""

from sparsekit.bench.baselines import (
    DenseContenders,
    best_dense,
    check_close,
    dense_contenders,
    tolerance_for,
)
from sparsekit.bench.machine import (
    OPENBLAS_OVERRIDE_VARS,
    argv_without,
    machine_info,
    others_loaded,
    reexec_without_openblas_overrides,
)
from sparsekit.bench.probes import copy_bandwidth_gbs
from sparsekit.bench.thread_control import default_threads, threads_for_all
from sparsekit.timing import Stats, llc_bytes, measure, rotation_count

__all__ = [
    "Stats",
    "DenseContenders",
    "llc_bytes",
    "copy_bandwidth_gbs",
    "rotation_count",
    "measure",
    "dense_contenders",
    "best_dense",
    "threads_for_all",
    "default_threads",
    "machine_info",
    "others_loaded",
    "reexec_without_openblas_overrides",
    "argv_without",
    "OPENBLAS_OVERRIDE_VARS",
    "check_close",
    "tolerance_for",
]
