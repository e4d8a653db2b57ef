"""Binding-level tests of ``sparsekit._C`` (the C++ CPU kernels).

Every ISA path (generic / avx2 / avx512, forced per call with ``isa=`` and once through the
``SPARSEKIT_ISA`` environment variable) is compared with a float64 numpy reference on awkward
shapes and all dtype combinations; every validation error is checked for the argument name,
the expectation and what was received.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

C = pytest.importorskip("sparsekit._C")
torch = pytest.importorskip("torch")

from reference import ISA_ORDER, isas_up_to  # noqa: E402

HW = C.build_info()["isa_hardware"]
ISAS = isas_up_to(HW)
# The probes run a bound matrix's own ISA build or a lower one; a matrix is bound to this
# process's ISA (SPARSEKIT_ISA caps it below the hardware's).
PROBE_ISAS = isas_up_to(str(C.cpu_isa()))
# (value dtype, x dtype) combinations the kernels accept
DTYPE_COMBOS = [("f32", "f32"), ("bf16", "f32"), ("bf16", "bf16"), ("f16", "f32"), ("f16", "f16")]
TORCH_DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
ROUND_EPS = {"f32": 0.0, "bf16": 2.0**-8, "f16": 2.0**-11}  # output rounding (relative)


# --------------------------------------------------------------------------- helpers
def as_code(a: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """(array passed to the binding, exact float64 values it represents)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(TORCH_DT[code])
    exact = t.double().numpy()
    if code == "bf16":
        return t.view(torch.uint16).numpy().copy(), exact
    return t.numpy().copy(), exact


def from_code(a: np.ndarray, code: str) -> np.ndarray:
    if code == "bf16":
        return torch.from_numpy(a.copy()).view(torch.bfloat16).double().numpy()
    return a.astype(np.float64)


def random_csr(rng, M, K, density, *, empty_rows=(), idx_dtype=None, ptr_dtype=np.int32):
    mask = rng.random((M, K)) < density
    for r in empty_rows:
        mask[r] = False
    w = np.where(mask, rng.standard_normal((M, K)), 0.0).astype(np.float32)
    indptr = np.zeros(M + 1, dtype=ptr_dtype)
    indptr[1:] = np.cumsum(mask.sum(1))
    rows, cols = np.nonzero(mask)
    if idx_dtype is None:
        idx_dtype = np.uint16 if K <= 65536 else np.int32
    return indptr, cols.astype(idx_dtype), w[rows, cols], w


def random_bsr(rng, M, K, r, c, density, ptr_dtype=np.int32):
    Mb, Kb = -(-M // r), -(-K // c)
    mask = rng.random((Mb, Kb)) < density
    full = np.zeros((Mb * r, Kb * c), np.float32)
    blocks = []
    for br, bc in zip(*np.nonzero(mask)):
        blk = rng.standard_normal((r, c)).astype(np.float32)
        full[br * r:(br + 1) * r, bc * c:(bc + 1) * c] = blk
        blocks.append(blk)
    # zero the padding so the dense matrix equals the stored one (kernels must ignore it anyway)
    w = full[:M, :K].copy()
    indptr = np.zeros(Mb + 1, dtype=ptr_dtype)
    indptr[1:] = np.cumsum(mask.sum(1))
    indices = np.nonzero(mask)[1].astype(np.uint16 if Kb <= 65536 else np.int32)
    values = np.stack(blocks) if blocks else np.zeros((0, r, c), np.float32)
    # poison the padding: wrong reads of padded entries must show up as errors
    for b, (br, bc) in enumerate(zip(*np.nonzero(mask))):
        rows_valid = M - br * r
        cols_valid = K - bc * c
        if rows_valid < r:
            values[b, rows_valid:, :] = 0.0  # padding rows never reach y
        if cols_valid < c:
            values[b, :, cols_valid:] = 0.0
    return indptr, indices, values, w


def check(out, out_code, ref, absbound, what):
    got = from_code(out, out_code)
    tol = 2e-6 * absbound + ROUND_EPS[out_code] * np.abs(ref) + 1e-30
    bad = np.abs(got - ref) > tol
    assert not bad.any(), (
        f"{what}: max err {np.abs(got - ref).max():.3g} at {np.argwhere(bad)[0]}, "
        f"tol {tol[bad].min():.3g}"
    )


def run_csr(rng, M, K, N, density, vcode, xcode, isa, threads=2, bias=True, **kw):
    indptr, indices, values, w = random_csr(rng, M, K, density, **kw)
    v, vexact = as_code(values, vcode)
    wexact = np.zeros((M, K))
    rows = np.repeat(np.arange(M), np.diff(indptr.astype(np.int64)))
    wexact[rows, indices.astype(np.int64)] = vexact
    x, xexact = as_code(rng.standard_normal((N, K)), xcode)
    b = rng.standard_normal(M).astype(np.float32) if bias else None
    out = np.full((N, M), 7, dtype=x.dtype)  # garbage: must be fully overwritten
    C.csr_linear(indptr, indices, v, vcode, x, xcode, b, out, xcode, M, K, threads, isa)
    ref = xexact @ wexact.T + (b.astype(np.float64) if bias else 0.0)
    absb = np.abs(xexact) @ np.abs(wexact).T + (np.abs(b) if bias else 0.0)
    check(out, xcode, ref, absb, f"csr {isa} {vcode}/{xcode} M={M} K={K} N={N} d={density}")


# --------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vcode,xcode", DTYPE_COMBOS)
def test_csr_all_isas_dtypes(isa, vcode, xcode):
    rng = np.random.default_rng(hash((isa, vcode, xcode)) % 2**32)
    for M, K, N, d in [(1, 1, 1, 1.0), (7, 33, 1, 0.3), (33, 97, 7, 0.5), (97, 1025, 33, 0.1),
                       (1025, 7, 2, 0.6), (5, 64, 97, 0.9), (64, 300, 1, 1.0), (40, 50, 17, 0.05),
                       (70, 1000, 2, 0.4)]:
        run_csr(rng, M, K, N, d, vcode, xcode, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_csr_special_structures(isa):
    rng = np.random.default_rng(1)
    # no nonzeros at all: y = bias
    run_csr(rng, 9, 20, 1, 0.0, "f32", "f32", isa)
    run_csr(rng, 9, 20, 5, 0.0, "f32", "f32", isa)
    # empty rows in the middle / ends, without bias
    run_csr(rng, 30, 64, 1, 0.4, "f32", "f32", isa, empty_rows=(0, 5, 6, 29), bias=False)
    run_csr(rng, 30, 64, 40, 0.4, "bf16", "f32", isa, empty_rows=(0, 5, 6, 29))
    run_csr(rng, 30, 300, 2, 0.4, "f32", "f32", isa, empty_rows=(0, 5, 6, 29), bias=False)
    # fully dense rows of awkward length (masked / scalar tails)
    for K in (15, 16, 17, 31, 33):
        run_csr(rng, 3, K, 1, 1.0, "f32", "f32", isa)
    # K > 65536: int32 indices; int64 indptr
    run_csr(rng, 3, 70001, 1, 0.01, "f32", "f32", isa)
    run_csr(rng, 3, 70001, 5, 0.01, "bf16", "bf16", isa)
    run_csr(rng, 20, 40, 3, 0.3, "f16", "f32", isa, ptr_dtype=np.int64)
    # K-blocked walk of wide batch tiles: several K blocks, 3 batch tiles (the last partial),
    # rows empty throughout or in some blocks only; int32 indices across many blocks
    run_csr(rng, 70, 3000, 130, 0.3, "f32", "f32", isa, empty_rows=(0, 33, 69))
    # x tiles packed per thread (>= 16 nonzeros per thread and column of x), 2 and 3 threads
    run_csr(rng, 200, 300, 24, 0.3, "f32", "f32", isa, empty_rows=(0, 199))
    run_csr(rng, 200, 300, 7, 0.3, "bf16", "bf16", isa, threads=3)
    # several row chunks per thread (kb_chunk_rows: 106 rows at density 0.3), the last partial
    run_csr(rng, 700, 500, 70, 0.3, "f32", "f32", isa, empty_rows=(0, 105, 106, 699))
    run_csr(rng, 40, 5000, 64, 0.002, "bf16", "f32", isa)
    run_csr(rng, 5, 70001, 40, 0.01, "f16", "f16", isa)
    run_csr(rng, 20, 40, 1, 0.3, "f32", "f32", isa, ptr_dtype=np.int64, idx_dtype=np.int32)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_csr_threads_agree(threads):
    rng = np.random.default_rng(2)
    # skewed rows so the nnz-balanced partition differs from an even split; N = 1: SpMV, 24: x
    # tiles packed per thread at density 0.6 (>= 16 nonzeros per thread and column of x, up to
    # 8 threads), 64: the K-blocked walk on AVX-512
    for density, batches in ((0.05, (1, 64)), (0.6, (24,))):
        indptr, indices, values, w = random_csr(rng, 300, 512, density)
        for N in batches:
            x = rng.standard_normal((N, 512)).astype(np.float32)
            ref = np.empty((N, 300), np.float32)
            C.csr_linear(indptr, indices, values, "f32", x, "f32", None, ref, "f32", 300, 512, 1)
            out = np.empty_like(ref)
            C.csr_linear(indptr, indices, values, "f32", x, "f32", None, out, "f32", 300, 512,
                         threads)
            np.testing.assert_array_equal(out, ref)  # same per-row summation order


def run_bsr(rng, M, K, r, c, N, density, vcode, xcode, isa, threads=2):
    indptr, indices, values, w = random_bsr(rng, M, K, r, c, density)
    v, vexact = as_code(values.reshape(-1, r * c), vcode)
    v = v.reshape(-1, r, c)
    vexact = vexact.reshape(-1, r, c)
    Mb, Kb = -(-M // r), -(-K // c)
    full = np.zeros((Mb * r, Kb * c))
    rows = np.repeat(np.arange(Mb), np.diff(indptr))
    for b, (br, bc) in enumerate(zip(rows, indices.astype(np.int64))):
        full[br * r:(br + 1) * r, bc * c:(bc + 1) * c] = vexact[b]
    wexact = full[:M, :K]
    x, xexact = as_code(rng.standard_normal((N, K)), xcode)
    b = rng.standard_normal(M).astype(np.float32)
    out = np.full((N, M), 7, dtype=x.dtype)
    C.bsr_linear(indptr, indices, v, vcode, x, xcode, b, out, xcode, M, K, r, c, threads, isa)
    ref = xexact @ wexact.T + b
    absb = np.abs(xexact) @ np.abs(wexact).T + np.abs(b)
    check(out, xcode, ref, absb, f"bsr {isa} {vcode}/{xcode} M={M} K={K} {r}x{c} N={N}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vcode,xcode", DTYPE_COMBOS)
def test_bsr_all_isas_dtypes(isa, vcode, xcode):
    rng = np.random.default_rng(hash((isa, vcode, xcode, "bsr")) % 2**32)
    for M, K, r, c, N, d in [
        (33, 97, 4, 4, 1, 0.5),  # ragged bottom + right edges
        (33, 97, 4, 4, 33, 0.5),
        (64, 64, 8, 8, 7, 0.3),
        (70, 45, 16, 16, 2, 0.6),
        (7, 100, 1, 8, 1, 0.4),
        (7, 100, 1, 8, 97, 0.4),
        (29, 31, 4, 1, 1, 0.5),
        (29, 31, 4, 1, 40, 0.5),
        (21, 22, 3, 5, 9, 0.7),  # non power-of-two blocks
        (45, 3001, 3, 4, 65, 0.5),  # many L1 block groups per block row, partial batch tile
        (10, 10, 2, 3, 1, 1.0),
        # one-vector tiles (N <= W) with tens of blocks per block row: the kernel's several
        # accumulator sets for small register blocks (1, 2 and 4 rows), their remainders, and
        # ragged bottom block rows taking a smaller register block
        (19, 517, 1, 16, 5, 0.6),
        (23, 301, 2, 2, 6, 0.5),
        (37, 403, 4, 4, 12, 0.6),
        (13, 203, 5, 4, 3, 0.7),
    ]:
        run_bsr(rng, M, K, r, c, N, d, vcode, xcode, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_bsr_x_tiles_packed_per_thread(isa):
    """N > 1 with enough stored values per thread and column of x (>= 16) that each thread packs
    x into tiles of its own (kernels_impl.h own_x_tiles): 2 and 3 threads, ragged edges, one- and
    two-vector tiles, against the float64 reference."""
    rng = np.random.default_rng(17)
    run_bsr(rng, 203, 301, 4, 4, 24, 0.6, "f32", "f32", isa)
    run_bsr(rng, 201, 302, 1, 16, 7, 0.7, "bf16", "bf16", isa, threads=3)
    run_bsr(rng, 97, 515, 2, 2, 5, 0.5, "f16", "f32", isa, threads=2)


@pytest.mark.parametrize("isa", ISAS)
def test_bsr_empty_and_padding_never_read(isa):
    rng = np.random.default_rng(3)
    run_bsr(rng, 16, 16, 4, 4, 1, 0.0, "f32", "f32", isa)  # nnzb = 0
    run_bsr(rng, 16, 16, 4, 4, 8, 0.0, "f32", "f32", isa)
    # Rows of ragged-edge blocks beyond M hold NaN: they must never be computed or written.
    # (Padding columns beyond K are zero by the format contract and meet zero-padded x.)
    M, K, r, c = 10, 13, 4, 4
    indptr, indices, values, w = random_bsr(rng, M, K, r, c, 1.0)
    values[-4:, 2:, :] = np.nan  # rows 10, 11 of the last block row (4 blocks) are padding
    for N in (1, 5):
        x = rng.standard_normal((N, K)).astype(np.float32)
        out = np.empty((N, M), np.float32)
        C.bsr_linear(indptr, indices, values, "f32", x, "f32", None, out, "f32", M, K, r, c, 2, isa)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-5)


def test_env_isa_forces_path():
    code = "import sparsekit._C as C; print(C.cpu_isa())"
    env = dict(os.environ, SPARSEKIT_ISA="generic")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True)
    assert r.stdout.strip() == "generic"
    env["SPARSEKIT_ISA"] = "bogus"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "SPARSEKIT_ISA: expected one of" in r.stderr


def test_info():
    info = C.build_info()
    assert info["openmp"] is True
    assert "generic" in info["isa_compiled"]
    assert C.cpu_isa() in info["isa_compiled"]


def test_nonfinite_propagate():
    indptr = np.array([0, 2, 3], np.int32)
    indices = np.array([0, 1, 1], np.uint16)
    values = np.array([1.0, np.inf, 2.0], np.float32)
    x = np.array([[1.0, 1.0], [np.nan, 0.0]], np.float32)
    out = np.empty((2, 2), np.float32)
    C.csr_linear(indptr, indices, values, "f32", x, "f32", None, out, "f32", 2, 2, 1)
    assert out[0, 0] == np.inf and out[0, 1] == 2.0 and np.isnan(out[1, 0]) and out[1, 1] == 0.0


# --------------------------------------------------------------------------- validation
def _csr_args(M=4, K=6, N=2):
    indptr = np.array([0, 1, 3, 3, 4], np.int32)[: M + 1]
    indices = np.array([0, 2, 5, 1], np.uint16)
    values = np.ones(4, np.float32)
    x = np.ones((N, K), np.float32)
    out = np.empty((N, M), np.float32)
    return dict(indptr=indptr, indices=indices, values=values, value_dtype="f32", x=x,
                x_dtype="f32", bias=None, out=out, out_dtype="f32", n_rows=M, n_cols=K,
                num_threads=1)


@pytest.mark.parametrize(
    "change,exc,msg",
    [
        (dict(indptr=np.array([0, 1, 3, 4], np.int32)), ValueError,
         "indptr: expected contiguous int32 or int64 array of length 5, got int32 array of length 4"),
        (dict(indptr=np.array([0, 1, 3, 3, 4], np.int16)), ValueError,
         "indptr: expected contiguous int32 or int64 array of length 5, got int16 array"),
        (dict(indptr=np.array([1, 1, 3, 3, 4], np.int32)), ValueError,
         "indptr: expected indptr[0] == 0, got 1"),
        (dict(indices=np.array([0, 2, 5, 1], np.int64)), ValueError,
         "indices: expected contiguous uint16, int32 or uint8 (gaps) array of length 4 "
         "(= indptr[-1]), "
         "got int64 array of length 4"),
        (dict(indices=np.array([0, 2, 5], np.uint16)), ValueError,
         "indices: expected contiguous uint16, int32 or uint8 (gaps) array of length 4 "
         "(= indptr[-1]), "
         "got uint16 array of length 3"),
        (dict(indices=np.array([0, 0, 2, 2, 5, 5, 1, 1], np.uint16)[::2]), ValueError,
         "indices: expected contiguous uint16, int32 or uint8 (gaps) array of length 4 "
         "(= indptr[-1]), "
         "got non-contiguous uint16 array of length 4"),
        (dict(values=np.ones(4, np.float64)), TypeError,
         "values: expected float32 array for value_dtype 'f32', got float64 array of length 4"),
        (dict(values=np.ones(3, np.float32)), ValueError,
         "values: expected array of length 4 (= indptr[-1]), got float32 array of length 3"),
        (dict(value_dtype="f64"), ValueError,
         "value_dtype: expected one of 'f32', 'bf16', 'f16', 'i8', got 'f64'"),
        (dict(x=np.ones((2, 5), np.float32)), ValueError,
         "x: expected array of shape (2, 6) (N, n_cols), got float32 2-d array of shape (2, 5)"),
        (dict(x=np.ones(6, np.float32)), ValueError, "x: expected a 2-d array (N, 6), got float32"),
        (dict(x=np.ones((2, 6), np.float64)), TypeError,
         "x: expected float32 array (dtype code 'f32'), got float64 2-d array of shape (2, 6)"),
        (dict(x=np.ones((6, 2), np.float32).T), ValueError,
         "x: expected a C-contiguous array, got strides (4, 8)"),
        (dict(x=torch.ones(2, 6)), TypeError, "x: expected a numpy.ndarray, got Tensor"),
        (dict(x_dtype="bf16"), ValueError, "x_dtype: expected 'f32' or the value dtype 'f32', got 'bf16'"),
        (dict(out=np.empty((2, 5), np.float32)), ValueError,
         "out: expected array of shape (2, 4) (N, n_rows), got float32 2-d array of shape (2, 5)"),
        (dict(out=np.empty((2, 4), np.float16)), TypeError,
         "out: expected float32 array (dtype code 'f32'), got float16 2-d array of shape (2, 4)"),
        (dict(out_dtype="f16"), ValueError, "out_dtype: expected the x dtype 'f32', got 'f16'"),
        (dict(bias=np.ones(3, np.float32)), ValueError,
         "bias: expected contiguous float32 array of length 4 or None, got float32 array of length 3"),
        (dict(bias=np.ones(4, np.float64)), ValueError,
         "bias: expected contiguous float32 array of length 4 or None, got float64 array of length 4"),
        (dict(num_threads=0), ValueError, "num_threads: expected an integer >= 1, got 0"),
        (dict(n_cols=-1), ValueError, "n_cols: expected a non-negative integer, got -1"),
    ],
)
def test_csr_linear_validation(change, exc, msg):
    args = _csr_args()
    args.update(change)
    with pytest.raises(exc) as ei:
        C.csr_linear(**args)
    assert msg in str(ei.value), str(ei.value)


def test_validation_misc():
    args = _csr_args()
    args["out"].flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writeable array"):
        C.csr_linear(**args)
    args = _csr_args(M=4, K=6, N=1)
    buf = np.ones((1, 6), np.float32)
    args.update(x=buf, out=buf[:, :4])  # out aliases x
    with pytest.raises(ValueError, match="out: expected memory not overlapping x"):
        C.csr_linear(**args)
    args = _csr_args()
    with pytest.raises(ValueError, match="isa: expected one of 'generic', 'avx2', 'avx512', got 'sse'"):
        C.csr_linear(**args, isa="sse")
    bargs = _csr_args()
    bargs["values"] = np.ones((4, 2, 2), np.float32)
    bargs["indptr"] = np.array([0, 1, 4], np.int32)
    with pytest.raises(ValueError, match=r"values: expected array of shape \(4, 2, 3\)"):
        C.bsr_linear(**bargs, block_r=2, block_c=3)
    with pytest.raises(ValueError, match="block_c: expected an integer in"):
        C.bsr_linear(**bargs, block_r=2, block_c=0)


@pytest.mark.parametrize(
    "indptr,indices,msg",
    [
        ([0, 1, 3], [0, 2, 1], "indptr: expected a 1-D array of length n_rows + 1 = 4, got length 3"),
        ([1, 1, 3, 3], [0, 2, 1], "indptr: expected indptr[0] == 0, got 1"),
        ([0, 2, 1, 3], [0, 2, 1],
         "indptr: expected non-decreasing values, got indptr[2] = 1 < indptr[1] = 2"),
        ([0, 1, 3, 4], [0, 2, 1], "indptr: expected indptr[-1] == len(indices) = 3, got 4"),
        ([0, 1, 3, 3], [0, 2, 5000],
         "indices: expected values in [0, 4096), got 5000 at position 2"),
        ([0, 1, 3, 3], [0, 2, 2], "indices: expected sorted unique values within each row, got 2 "
                                  "after 2 at position 2 (row 1)"),
        ([0, 1, 3, 3], [0, 3, 2], "indices: expected sorted unique values within each row, got 2 "
                                  "after 3 at position 2 (row 1)"),
    ],
)
@pytest.mark.parametrize("ptr_dt,idx_dt", [(np.int32, np.uint16), (np.int64, np.int32),
                                           (np.int32, np.int64)])
def test_validate_csr_messages(indptr, indices, msg, ptr_dt, idx_dt):
    with pytest.raises(ValueError) as ei:
        C.validate_csr(np.array(indptr, ptr_dt), np.array(indices, idx_dt), 3, 4096)
    assert str(ei.value) == msg


def test_validate_ok_and_types():
    C.validate_csr(np.array([0, 1, 1, 3], np.int32), np.array([5, 0, 4095], np.uint16), 3, 4096)
    C.validate_csr(np.array([0], np.int64), np.array([], np.int32), 0, 0)
    # a new row may restart at a smaller column
    C.validate_csr(np.array([0, 2, 4], np.int32), np.array([3, 7, 0, 1], np.int32), 2, 8)
    with pytest.raises(TypeError,
                       match="indptr: expected a contiguous int32 or int64 array, got float64"):
        C.validate_csr(np.zeros(4), np.zeros(0, np.int32), 3, 4)
    with pytest.raises(TypeError, match="indices: expected a contiguous uint16, int32 or int64"):
        C.validate_csr(np.zeros(4, np.int32), np.zeros(0, np.uint8), 3, 4)
    C.validate_bsr(np.array([0, 1, 2], np.int32), np.array([0, 1], np.uint16), 7, 8, 4, 4)
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 2\), got 2"):
        C.validate_bsr(np.array([0, 1, 2], np.int32), np.array([0, 2], np.uint16), 7, 8, 4, 4)


# --------------------------------------------------------------------------- read probe
def _probe_reference(mat) -> np.ndarray:
    """Per row: XOR of its value bytes (bits 0-7) | XOR of its index bytes << 8, in numpy."""
    ip = mat.indptr.numpy().astype(np.int64)
    vb = mat.values.contiguous().view(torch.uint8).numpy()
    ib = mat.indices.contiguous().view(torch.uint8).numpy()
    sv, si = mat.values.element_size(), mat.indices.element_size()
    out = np.zeros(len(ip) - 1, np.float64)
    for m in range(len(ip) - 1):
        a = np.bitwise_xor.reduce(vb[ip[m] * sv:ip[m + 1] * sv]) if ip[m + 1] > ip[m] else 0
        b = np.bitwise_xor.reduce(ib[ip[m] * si:ip[m + 1] * si]) if ip[m + 1] > ip[m] else 0
        out[m] = int(a) | (int(b) << 8)
    return out


@pytest.mark.parametrize("isa", PROBE_ISAS)
@pytest.mark.parametrize("vdtype", ["f32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_read_probe_reads_every_byte_of_every_row(isa, vdtype, threads):
    """The benchmarks' read probe: per row, the XOR of exactly the row's value and index bytes
    (row lengths around the 32-entry step and the 8-byte words, empty rows, both index widths)."""
    from sparsekit.formats import CSRMatrix
    from sparsekit.kernels.cpp import bound_matrix

    rng = np.random.default_rng(41 + threads)
    lengths = [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 97, 0, 250, 125, 3]
    for k in (300, 70000):  # uint16 and int32 column ids
        w = torch.zeros(len(lengths) * 9, k)
        for r in range(w.shape[0]):
            n = lengths[r] if r < len(lengths) else int(rng.integers(0, 120))
            cols = rng.choice(k, size=n, replace=False)
            w[r, torch.from_numpy(cols)] = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        mat = CSRMatrix.from_dense(w, value_dtype=TORCH_DT[vdtype])
        assert mat.indices.element_size() == (2 if k <= 65536 else 4)
        out = torch.full((w.shape[0],), -1.0)
        bound_matrix(mat).read_probe(out.data_ptr(), threads, ISA_ORDER.index(isa))
        np.testing.assert_array_equal(out.double().numpy(), _probe_reference(mat))


@pytest.mark.parametrize("isa", PROBE_ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fetch", ["gather", "assemble"])
def test_gather_probe_sums_x_at_every_column_id(isa, threads, fetch):
    """The benchmarks' gather probe: per row, the sum of x at the row's column ids, fetched as
    csr_spmv_gather (hardware gathers) or csr_spmv_assemble (scalar-load assembly) fetches them
    (row lengths around the W / 2W steps, empty rows, both index widths, x exactly n_cols long),
    against a float64 sum."""
    from sparsekit.formats import CSRMatrix
    from sparsekit.kernels.cpp import bound_matrix

    rng = np.random.default_rng(43 + threads)
    lengths = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 0, 250, 3]
    for k in (300, 70000):  # uint16 and int32 column ids
        rows = len(lengths) * 5
        w = torch.zeros(rows, k)
        for r in range(rows):
            n = lengths[r] if r < len(lengths) else int(rng.integers(0, 120))
            w[r, torch.from_numpy(rng.choice(k, size=n, replace=False))] = 1.0
        w[-1, k - 1] = 1.0  # the last column of x
        mat = CSRMatrix.from_dense(w)
        x = torch.from_numpy(rng.standard_normal(k).astype(np.float32))
        out = torch.full((rows,), np.nan)
        bound_matrix(mat).gather_probe(x.data_ptr(), out.data_ptr(), threads,
                                       ISA_ORDER.index(isa), fetch)
        ref = w.double().numpy() @ x.double().numpy()
        mag = np.abs(w.double().numpy()) @ np.abs(x.double().numpy())
        np.testing.assert_array_less(np.abs(out.double().numpy() - ref), 1e-6 * mag + 1e-30)


def test_read_probe_errors():
    from sparsekit.formats import BSRMatrix, CSRMatrix
    from sparsekit.kernels.cpp import bound_matrix

    w = torch.randn(8, 16)
    bm = bound_matrix(CSRMatrix.from_dense(w))
    out = torch.empty(8)
    with pytest.raises(ValueError, match=r"num_threads: expected an integer >= 1, got 0"):
        bm.read_probe(out.data_ptr(), 0)
    with pytest.raises(ValueError, match=r"isa: expected -1 or an ISA code in \[0, \d\].*got 7"):
        bm.read_probe(out.data_ptr(), 1, 7)
    with pytest.raises(ValueError, match=r"out: expected a non-null address.*got 0"):
        bm.read_probe(0, 1)
    with pytest.raises(ValueError, match=r"read_probe: expected a CSR matrix .* got a BSR matrix"):
        bound_matrix(BSRMatrix.from_dense(w, (2, 2))).read_probe(out.data_ptr(), 1)
    x = torch.randn(16)
    with pytest.raises(ValueError, match=r"x: expected a non-null address of n_cols fp32.*got 0"):
        bm.gather_probe(0, out.data_ptr(), 1)
    with pytest.raises(ValueError, match=r"out: expected a non-null address.*got 0"):
        bm.gather_probe(x.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match=r"num_threads: expected an integer >= 1, got 0"):
        bm.gather_probe(x.data_ptr(), out.data_ptr(), 0)
    with pytest.raises(ValueError, match=r"fetch: expected 'gather' or 'assemble', got 'scalar'"):
        bm.gather_probe(x.data_ptr(), out.data_ptr(), 1, -1, "scalar")
    with pytest.raises(ValueError, match=r"gather_probe: expected a CSR matrix .* got a BSR"):
        bound_matrix(BSRMatrix.from_dense(w, (2, 2))).gather_probe(x.data_ptr(), out.data_ptr(), 1)
