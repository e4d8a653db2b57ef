"""Regression-tracking micro-benchmarks of the main sparse kernels (pytest-benchmark).

Run (not part of the test suite, whose testpaths are ``tests/``)::

    pytest benchmarks/bench_regression.py --benchmark-only                      # run
    pytest benchmarks/bench_regression.py --benchmark-only --benchmark-autosave  # keep
    pytest benchmarks/bench_regression.py --benchmark-only --benchmark-compare \\
        --benchmark-compare-fail=median:10%                                      # gate

Each case checks the kernel against a float64 reference before it is timed and rotates
through enough weight copies to exceed 2 x the last-level cache (read at run time), so the
numbers are the cold-weight numbers a multi-layer model sees.  The dense ``F.linear`` cases are
the baseline: compare ratios within one run, absolute times only on the same machine.
For the full sweep and the fastest dense formulation use ``sparsekit bench``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import sparsekit
from sparsekit.bench import harness as h
from sparsekit.bench.layer import FormatSpec, random_sparse_weight

# (out_features, in_features, sparsity): a large square layer and BERT's FFN down-projection
SHAPES = [(4096, 4096, 0.9), (768, 3072, 0.9)]
BATCHES = [1, 32]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"csr": None, "bsr4x4": (4, 4)}
THREADS = h.default_threads()


def _cpu_backends() -> list[str]:
    return [b for b in sparsekit.backends() if b not in ("torch",) and "cuda" not in b]


def _weight(m: int, k: int, sparsity: float, blocksize, dtype) -> torch.Tensor:
    """Seeded N(0, 1/k) weight with a random pattern at exactly ``sparsity`` (elements, or
    whole blocks for BSR), from the same generator as ``sparsekit bench``."""
    gen = torch.Generator().manual_seed(m * 31 + k)
    w = torch.randn(m, k, generator=gen) / math.sqrt(k)
    fmt = FormatSpec("csr") if blocksize is None else FormatSpec("bsr", tuple(blocksize))
    return random_sparse_weight(w, sparsity, fmt, gen).to(dtype)


def _rotating(fn, n: int):
    counter = itertools.count()
    return lambda: fn(next(counter) % n)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    with h.threads_for_all(THREADS):
        yield


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> None:
    ref = x.double() @ w.double().T
    ok, err = h.check_close(y, ref, dtype, w.shape[1])
    assert ok, f"wrong result before timing: max rel err {err:.3g}"


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("m,k,sparsity", SHAPES, ids=lambda v: str(v))
def test_dense_flinear(benchmark, m, k, sparsity, batch, dname):
    dtype = DTYPES[dname]
    w = _weight(m, k, 0.0, None, dtype)
    x = torch.randn(batch, k).to(dtype)
    n = h.rotation_count(w.numel() * w.element_size())
    ws = [w] + [w.clone() for _ in range(n - 1)]
    _check(F.linear(x, w), x, w, dtype)
    benchmark.group = f"{m}x{k} N={batch} {dname}"
    benchmark.extra_info.update(n_copies=n, threads=THREADS)
    benchmark(_rotating(lambda i: F.linear(x, ws[i]), n))


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("m,k,sparsity", SHAPES, ids=lambda v: str(v))
def test_sparsekit_linear(benchmark, m, k, sparsity, batch, dname, fmt, backend):
    dtype = DTYPES[dname]
    bs = FORMATS[fmt]
    w = _weight(m, k, sparsity, bs, dtype)
    mat = (sparsekit.CSRMatrix.from_dense(w) if bs is None
           else sparsekit.BSRMatrix.from_dense(w, blocksize=bs))
    x = torch.randn(batch, k).to(dtype)
    be = sparsekit.get_backend(backend)
    if not be.supports(mat, x):
        pytest.skip(f"{backend} does not support {dname} {fmt}")
    _check(sparsekit.linear(x, mat, backend=backend), x, w, dtype)
    torch.set_num_threads(THREADS)  # a backend's first call may start another OpenMP pool
    n = h.rotation_count(mat.nbytes)
    cls = type(mat)
    extra = {"blocksize": bs} if bs is not None else {}
    mats = [mat] + [cls(mat.indptr.clone(), mat.indices.clone(), mat.values.clone(), mat.shape,
                        **extra) for _ in range(n - 1)]
    benchmark.group = f"{m}x{k} N={batch} {dname}"
    benchmark.extra_info.update(n_copies=n, threads=THREADS, sparsity=sparsity, format=fmt,
                                backend=backend, backend_info=sparsekit.backends()[backend])
    benchmark(_rotating(lambda i: sparsekit.linear(x, mats[i], backend=backend), n))
