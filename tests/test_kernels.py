"""Correctness of ``sparsekit.linear`` / ``spmm`` on every available backend and both formats,
against the float64 dense reference (tests/reference.py).

Axes (shapes 1..4096, N 1..128, sparsity 0..100 %, empty rows, value/x dtypes, bias, BSR block
sizes with ragged edges) are covered pairwise by hand-picked case lists rather than the full
Cartesian product, so the file runs in well under a minute including Numba compilation.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch
from conftest import available_backends
from reference import (
    assert_close_to_reference,
    dense_reference,
    random_block_pruned,
    random_pruned,
    random_x,
)

import sparsekit
from sparsekit import BSRMatrix, CSRMatrix

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
_CUDA_BACKENDS = {"cuda", "numba_cuda"}


def _targets() -> list[tuple[str, str]]:
    out = []
    for be in available_backends():
        if be in _CUDA_BACKENDS:
            out.append((be, "cuda"))
        else:
            out.append((be, "cpu"))
            if be == "torch" and torch.cuda.is_available():
                out.append((be, "cuda"))
    return out


TARGETS = _targets()
TARGET_IDS = [f"{b}-{d}" for b, d in TARGETS]


@pytest.fixture(params=TARGETS, ids=TARGET_IDS)
def target(request) -> tuple[str, str]:
    """(backend name, device) for every usable backend."""
    return request.param


def _run(target, mat, x, bias=None):
    be, dev = target
    mat = mat.to(dev)
    x = x.to(dev)
    b = None if bias is None else bias.to(dev)
    return sparsekit.linear(x, mat, b, backend=be)


# (M, K, N, sparsity, value dtype, x dtype, bias, forced empty rows)
CSR_CASES = [
    (1, 1, 1, 0.0, F32, F32, True, 0),
    (7, 33, 3, 0.5, BF16, BF16, False, 2),
    (33, 7, 8, 0.9, F16, F16, True, 3),
    (97, 97, 33, 0.99, F32, F32, False, 0),
    (1025, 97, 128, 0.9, F32, F32, True, 10),
    (97, 1025, 1, 1.0, BF16, F32, True, 0),
    (4096, 33, 8, 0.5, F16, F32, False, 0),
    (33, 4096, 128, 0.99, BF16, BF16, True, 5),
    (7, 1, 33, 0.0, F32, F32, True, 0),
    (1, 4096, 3, 0.9, F16, F16, False, 0),
    (4096, 1025, 1, 0.99, F32, F32, True, 100),
    (1025, 4096, 3, 0.9, BF16, F32, False, 0),
    (33, 1025, 1, 0.5, F32, F32, False, 7),
    (97, 7, 128, 0.0, BF16, BF16, True, 0),
    (7, 97, 8, 1.0, F16, F16, False, 0),
    (1, 33, 128, 0.5, F32, F32, False, 0),
    (4096, 7, 33, 0.99, F32, F32, False, 300),
    (1025, 1, 8, 0.5, F16, F16, True, 0),
    (33, 97, 1, 0.0, F16, F32, False, 0),
    (97, 33, 3, 0.9, BF16, F32, True, 20),
    (97, 1025, 2, 0.5, F16, F16, True, 5),
    (33, 4096, 2, 0.99, F32, F32, False, 3),
]


def _case_id(c) -> str:
    return "x".join(map(str, c[:3])) + f"-s{c[3]}-{str(c[4])[6:]}-x{str(c[5])[6:]}" + (
        "-b" if c[6] else ""
    ) + (f"-e{c[7]}" if c[7] else "")


@functools.cache
def _csr_case_data(case):
    """Inputs shared by every backend (generated once per case)."""
    M, K, N, sp, vdt, xdt, has_bias, empty = case
    seed = (M * 7919 + K * 104729 + N) % 10_000
    w = random_pruned(M, K, sp, seed=seed, empty_rows=empty)
    mat = CSRMatrix.from_dense(w, value_dtype=vdt)
    x = random_x((N, K), seed=seed + 1, dtype=xdt)
    bias = random_x((M,), seed=seed + 2) if has_bias else None
    return mat, x, bias, mat.to_dense()


@pytest.mark.parametrize("case", CSR_CASES, ids=[_case_id(c) for c in CSR_CASES])
def test_csr_linear(target, case):
    mat, x, bias, wd = _csr_case_data(case)
    y = _run(target, mat, x, bias)
    assert y.dtype == case[5]
    assert_close_to_reference(y, x, wd, bias, msg=f"{target} {case}")


# (M, K, blocksize, N, block sparsity, value dtype, x dtype, bias, inner sparsity)
BSR_CASES = [
    (33, 97, (4, 4), 3, 0.5, F32, F32, True, 0.0),
    (33, 97, (1, 8), 8, 0.9, BF16, BF16, False, 0.0),
    (97, 33, (8, 1), 1, 0.5, F16, F16, True, 0.0),
    (1025, 4096, (16, 16), 3, 0.9, F32, F32, True, 0.0),
    (7, 7, (16, 16), 33, 0.0, BF16, F32, False, 0.0),
    (4096, 97, (2, 3), 128, 0.99, F32, F32, True, 0.0),
    (1, 1, (1, 1), 1, 0.0, F32, F32, True, 0.0),
    (97, 1025, (4, 4), 8, 1.0, F16, F32, True, 0.0),
    (33, 1025, (8, 8), 1, 0.9, BF16, BF16, True, 0.5),
    (128, 128, (16, 16), 128, 0.5, F16, F16, False, 0.3),
    (1025, 33, (4, 8), 33, 0.5, F32, F32, False, 0.0),
    (97, 97, (3, 5), 1, 0.7, F16, F32, True, 0.2),
    # N = 1 with whole blocks in registers (full block rows; the ragged last one falls back)
    (97, 1025, (4, 4), 1, 0.8, F32, F32, True, 0.0),
    (33, 97, (1, 16), 1, 0.5, F16, F32, False, 0.0),
    (66, 130, (2, 8), 1, 0.6, BF16, BF16, True, 0.2),
]


@pytest.mark.parametrize(
    "case", BSR_CASES,
    ids=[f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}-n{c[3]}-s{c[4]}-{str(c[5])[6:]}-x{str(c[6])[6:]}"
         for c in BSR_CASES],
)
def test_bsr_linear(target, case):
    mat, x, bias, wd = _bsr_case_data(case)
    y = _run(target, mat, x, bias)
    assert y.dtype == case[6]
    assert_close_to_reference(y, x, wd, bias, msg=f"{target} {case}")


@functools.cache
def _bsr_case_data(case):
    M, K, bs, N, bsp, vdt, xdt, has_bias, inner = case
    seed = (M * 7919 + K * 104729 + N * 31 + bs[0] * 3 + bs[1]) % 10_000
    w = random_block_pruned(M, K, bs, bsp, seed=seed, inner_sparsity=inner)
    mat = BSRMatrix.from_dense(w, bs, value_dtype=vdt)
    assert mat.nnz == int((w.to(vdt) != 0).sum())
    x = random_x((N, K), seed=seed + 1, dtype=xdt)
    bias = random_x((M,), seed=seed + 2) if has_bias else None
    return mat, x, bias, mat.to_dense()


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("vdt", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_int32_index_path(target, fmt, vdt):
    """in_features (BSR: block columns) above 65,536 -> int32 indices."""
    mat, wd = _wide_case(fmt, vdt)
    assert mat.index_dtype == torch.int32
    for N in (1, 4):
        x = random_x((N, mat.shape[1]), seed=12 + N)
        bias = random_x((mat.shape[0],), seed=3)
        assert_close_to_reference(_run(target, mat, x, bias), x, wd, bias,
                                  msg=f"{target} {fmt} N={N}")


@functools.cache
def _wide_case(fmt, vdt):
    M, K = 9, 70_001
    w = random_pruned(M, K, 0.995, seed=11)
    w[:, -1] = 1.5  # touch the last column (index 70000 needs > 16 bits)
    if fmt == "csr":
        mat = CSRMatrix.from_dense(w, value_dtype=vdt)
    else:
        mat = BSRMatrix.from_dense(w, (2, 1), value_dtype=vdt)
    return mat, mat.to_dense()


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_noncontiguous_and_3d_x(target, fmt):
    M, K = 33, 97
    w = random_pruned(M, K, 0.8, seed=5)
    mat = CSRMatrix.from_dense(w) if fmt == "csr" else BSRMatrix.from_dense(w, (4, 4))
    base = random_x((5, 2 * K, 3), seed=6)
    x = base[:, ::2, :].transpose(1, 2)  # (5, 3, K), non-contiguous in every dim
    assert not x.is_contiguous()
    bias = random_x((M,), seed=7)
    y = _run(target, mat, x, bias)
    assert y.shape == (5, 3, M)
    assert_close_to_reference(y, x, mat.to_dense(), bias, msg=f"{target} noncontig")
    x4 = random_x((2, 1, 3, K), seed=8)
    assert_close_to_reference(_run(target, mat, x4), x4, mat.to_dense(), None, msg="4-D")
    x1 = random_x((K,), seed=9)  # 1-D x, like F.linear
    assert_close_to_reference(_run(target, mat, x1, bias), x1, mat.to_dense(), bias, msg="1-D")


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_zero_size_batch(target, fmt):
    M, K = 7, 33
    w = random_pruned(M, K, 0.5, seed=1)
    mat = CSRMatrix.from_dense(w) if fmt == "csr" else BSRMatrix.from_dense(w, (4, 4))
    for shape in [(0, K), (2, 0, K)]:
        y = _run(target, mat, torch.zeros(shape), torch.ones(M))
        assert y.shape == (*shape[:-1], M) and y.dtype == torch.float32


@pytest.mark.parametrize("vdt", [F32, BF16, F16], ids=["wf32", "wbf16", "wf16"])
@pytest.mark.parametrize("xdt", [F32, BF16, F16], ids=["xf32", "xbf16", "xf16"])
def test_every_dtype_combo(target, vdt, xdt):
    """Output dtype follows x for every (x, weight) dtype pair, values within tolerance."""
    M, K, N = 33, 97, 3
    w = random_pruned(M, K, 0.7, seed=21)
    mat = CSRMatrix.from_dense(w, value_dtype=vdt)
    x = random_x((N, K), seed=22, dtype=xdt)
    for bias_dt in (F32, xdt):
        bias = random_x((M,), seed=23, dtype=bias_dt)
        y = _run(target, mat, x, bias)
        assert y.dtype == xdt
        assert_close_to_reference(y, x, mat.to_dense(), bias, msg=f"{target} w{vdt} x{xdt}")


def test_results_match_across_backends():
    """Every backend agrees with every other within the reference tolerance (sanity check that
    the parametrised tests compare like with like)."""
    w = random_pruned(97, 1025, 0.9, seed=31)
    mat = CSRMatrix.from_dense(w)
    x = random_x((8, 1025), seed=32)
    ys = {t: _run(t, mat, x).cpu() for t in TARGETS}
    for t, y in ys.items():
        assert_close_to_reference(y, x, mat.to_dense(), None, msg=str(t))


def test_numpy_in_numpy_out():
    w = random_pruned(33, 97, 0.5, seed=41)
    mat = CSRMatrix.from_dense(w)
    x = np.random.default_rng(0).standard_normal((4, 97)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal(33).astype(np.float32)
    y = sparsekit.linear(x, mat, b)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (4, 33)
    assert_close_to_reference(torch.from_numpy(y), torch.from_numpy(x), mat.to_dense(),
                              torch.from_numpy(b))


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_spmm(target, fmt):
    M, K, N = 33, 97, 7
    w = random_pruned(M, K, 0.8, seed=51)
    a = CSRMatrix.from_dense(w) if fmt == "csr" else BSRMatrix.from_dense(w, (4, 4))
    b = random_x((K, N), seed=52)
    be, dev = target
    y = sparsekit.spmm(a.to(dev), b.to(dev), backend=be)
    assert y.shape == (M, N) and y.is_contiguous()
    ref = dense_reference(b.T, a.to_dense()).T
    assert_close_to_reference(y.T, b.T, a.to_dense(), None, msg="spmm")
    assert torch.allclose(y.cpu().double(), ref, atol=1e-4)
    yn = sparsekit.spmm(a, b.numpy())
    assert isinstance(yn, np.ndarray) and yn.shape == (M, N)


def test_nan_inf_values_propagate(target):
    """NaN/Inf weights are data: rows holding them produce NaN/Inf like dense matmul."""
    w = random_pruned(7, 33, 0.5, seed=61)
    w[2, 3] = float("nan")
    w[4, 5] = float("inf")
    mat = CSRMatrix.from_dense(w)
    x = random_x((3, 33), seed=62).abs() + 0.1  # positive x: inf * x stays +inf
    y = _run(target, mat, x).cpu()
    assert torch.isnan(y[:, 2]).all() and torch.isposinf(y[:, 4]).all()
    finite = [i for i in range(7) if i not in (2, 4)]
    assert torch.isfinite(y[:, finite]).all()


def test_transpose_gives_backward_product(target):
    """linear(g, W.T) == g @ W (what SparseLinear's backward computes)."""
    w = random_pruned(33, 97, 0.7, seed=71)
    for mat in (CSRMatrix.from_dense(w), BSRMatrix.from_dense(w, (4, 8))):
        g = random_x((5, 33), seed=72)
        y = _run(target, mat.T, g)
        assert_close_to_reference(y, g, mat.to_dense().T, None, msg="transpose")


def test_concurrent_calls_from_threads(target):
    """Many Python threads calling linear at once get correct answers (thread-safe layer)."""
    w = random_pruned(257, 513, 0.9, seed=81)
    mats = [CSRMatrix.from_dense(w), BSRMatrix.from_dense(w, (4, 4))]
    xs = [random_x((n, 513), seed=82 + n) for n in (1, 3, 8, 1, 3, 8)]
    errors: list[BaseException] = []

    def work(i):
        try:
            for rep in range(5):
                m = mats[(i + rep) % 2]
                x = xs[i]
                assert_close_to_reference(_run(target, m, x), x, m.to_dense(), None,
                                          msg=f"thread {i}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_autograd_through_linear(fmt):
    """Gradients w.r.t. x and bias match the dense float64 reference (weight frozen)."""
    w = random_pruned(33, 97, 0.8, seed=91)
    mat = CSRMatrix.from_dense(w) if fmt == "csr" else BSRMatrix.from_dense(w, (4, 8))
    x = random_x((2, 3, 97), seed=92).requires_grad_()
    b = random_x((33,), seed=93).requires_grad_()
    g = random_x((2, 3, 33), seed=94)
    y = sparsekit.linear(x, mat, b)
    assert y.requires_grad
    y.backward(g)
    wd = mat.to_dense().double()
    torch.testing.assert_close(x.grad.double(), g.double() @ wd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), g.double().sum((0, 1)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not sparsekit.linear(x, mat, b).requires_grad
