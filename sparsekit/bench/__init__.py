"""Benchmarking: the shared timing harness (:mod:`sparsekit.bench.harness`) and the
``sparsekit bench`` command (:mod:`sparsekit.bench.runner`, :mod:`sparsekit.cli`).

Nothing heavy is imported here so ``import sparsekit`` stays cheap.
"""
