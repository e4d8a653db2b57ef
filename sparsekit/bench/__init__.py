"""Benchmarking: the ``sparsekit bench`` command (:mod:`sparsekit.cli`; runners in
:mod:`sparsekit.bench.layer` and :mod:`sparsekit.bench.model`, output in
:mod:`sparsekit.bench.report`, run diffs in :mod:`sparsekit.bench.compare`) and the shared
harness (:mod:`sparsekit.bench.harness`; timing itself is :mod:`sparsekit.timing`).

Nothing heavy is imported here so ``import sparsekit`` stays cheap.
"""
