"""CSRMatrix / BSRMatrix: exact round trips, conversions, metadata, index-width selection."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sps
import torch
from reference import random_block_pruned, random_pruned

from sparsekit import BSRMatrix, CSRMatrix

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
DT_IDS = ["f32", "bf16", "f16"]


def _w(m, k, sp=0.7, seed=0, dtype=F32):
    return random_pruned(m, k, sp, seed=seed, empty_rows=min(2, m // 3)).to(dtype)


# --------------------------------------------------------------------------- dense round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (33, 97), (5, 65536), (3, 65537)])
def test_csr_dense_roundtrip_exact(dtype, shape):
    w = _w(*shape, sp=0.9, dtype=dtype)
    m = CSRMatrix.from_dense(w)
    assert m.dtype == dtype and m.shape == shape
    assert m.nnz == int((w != 0).sum())
    assert m.index_dtype == (torch.uint16 if shape[1] <= 65536 else torch.int32)
    assert m.indptr.dtype == torch.int32
    d = m.to_dense()
    assert d.dtype == dtype and torch.equal(d, w)
    # numpy input (fp32/fp16 only: numpy has no bf16)
    if dtype != BF16:
        assert torch.equal(CSRMatrix.from_dense(w.numpy()).to_dense(), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape,bs", [((33, 97), (4, 4)), ((33, 97), (1, 8)), ((97, 33), (8, 1)),
                                      ((40, 48), (16, 16)), ((7, 7), (16, 16)), ((9, 13), (2, 3))])
def test_bsr_dense_roundtrip_exact(dtype, shape, bs):
    w = random_block_pruned(*shape, bs, 0.6, seed=3, inner_sparsity=0.3).to(dtype)
    m = BSRMatrix.from_dense(w, bs)
    assert m.blocksize == bs and m.shape == shape and m.dtype == dtype
    Mb, Kb = -(-shape[0] // bs[0]), -(-shape[1] // bs[1])
    assert m.grid == (Mb, Kb)
    assert m.values.shape == (m.nnz_blocks, *bs)
    # every kept block has a nonzero, every dropped block is all zero
    blocks = torch.zeros(Mb * bs[0], Kb * bs[1], dtype=dtype)
    blocks[: shape[0], : shape[1]] = w
    bm = (blocks.reshape(Mb, bs[0], Kb, bs[1]) != 0).any(3).any(1)
    assert m.nnz_blocks == int(bm.sum())
    assert m.nnz == int((w != 0).sum())
    assert torch.equal(m.to_dense(), w)
    assert torch.equal(BSRMatrix.from_dense(w, blocksize=bs).to_dense(), w)


def test_fp64_and_int_input_converted():
    w64 = _w(7, 9).double()
    m = CSRMatrix.from_dense(w64)
    assert m.dtype == F32 and torch.equal(m.to_dense(), w64.float())
    m = CSRMatrix.from_dense(w64.numpy(), value_dtype=BF16)
    assert m.dtype == BF16 and torch.equal(m.to_dense(), w64.to(BF16))
    wi = (w64 * 10).round().to(torch.int64)
    assert torch.equal(BSRMatrix.from_dense(wi, (2, 2)).to_dense(), wi.float())


def test_nnz_zero_and_dense():
    z = CSRMatrix.from_dense(torch.zeros(5, 7))
    assert z.nnz == 0 and z.density == 0.0 and torch.equal(z.to_dense(), torch.zeros(5, 7))
    assert z.indptr.tolist() == [0] * 6
    zb = BSRMatrix.from_dense(torch.zeros(5, 7), (2, 2))
    assert zb.nnz_blocks == 0 and zb.nnz == 0 and torch.equal(zb.to_dense(), torch.zeros(5, 7))
    d = torch.randn(6, 8).abs() + 0.1
    md = CSRMatrix.from_dense(d)
    assert md.nnz == 48 and md.density == 1.0
    assert torch.equal(BSRMatrix.from_dense(d, (4, 4)).to_dense(), d)


def test_from_dense_large_fast_enough_shape():
    """11008x4096 at 90 % converts (vectorised path; the speed itself is a benchmark)."""
    w = random_pruned(1100, 4096, 0.9, seed=9)
    m = CSRMatrix.from_dense(w)
    assert m.nnz == int((w != 0).sum())
    assert torch.equal(m.to_dense(), w)


# --------------------------------------------------------------------------- metadata
def test_nbytes_density_repr():
    w = _w(33, 97, sp=0.5)
    m = CSRMatrix.from_dense(w)
    assert m.nbytes == 34 * 4 + m.nnz * 2 + m.nnz * 4
    assert m.density == pytest.approx(m.nnz / (33 * 97))
    mb = CSRMatrix.from_dense(w, value_dtype=BF16)
    assert mb.nbytes == 34 * 4 + mb.nnz * 2 + mb.nnz * 2
    b = BSRMatrix.from_dense(w, (4, 4))
    assert b.nbytes == (9 + 1) * 4 + b.nnz_blocks * 2 + b.nnz_blocks * 16 * 4
    r = repr(b)
    assert "BSRMatrix" in r and "(33, 97)" in r and "blocksize=(4, 4)" in r
    assert "CSRMatrix(shape=(33, 97)" in repr(m)
    assert m.device == torch.device("cpu")


@pytest.mark.parametrize("k,expected", [(65535, torch.uint16), (65536, torch.uint16),
                                        (65537, torch.int32)])
def test_index_width_at_limit(k, expected):
    w = torch.zeros(2, k)
    w[0, k - 1] = 1.0
    w[1, 0] = 2.0
    m = CSRMatrix.from_dense(w)
    assert m.index_dtype == expected
    assert int(m.indices[0].to(torch.int64)) == k - 1
    assert torch.equal(m.to_dense(), w)
    # BSR: the block-column count decides
    b = BSRMatrix.from_dense(w, (1, 1))
    assert b.index_dtype == expected and torch.equal(b.to_dense(), w)
    b2 = BSRMatrix.from_dense(w, (1, 2))
    assert b2.index_dtype == torch.uint16  # ceil(k/2) <= 65536
    # raw constructor repacks to the same width
    r = CSRMatrix(m.indptr.to(torch.int64), m.indices.to(torch.int64), m.values, m.shape)
    assert r.index_dtype == expected and r.indptr.dtype == torch.int32


# --------------------------------------------------------------------------- scipy / torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_scipy_roundtrip(dtype):
    w = _w(33, 97, dtype=dtype)
    m = CSRMatrix.from_dense(w)
    s = m.to_scipy()
    assert isinstance(s, sps.csr_array)
    assert s.dtype == np.float32  # scipy: no bf16, fp16 unsupported by its kernels
    np.testing.assert_array_equal(s.toarray(), w.float().numpy())
    back = CSRMatrix.from_scipy(s, value_dtype=dtype)
    assert back.dtype == dtype and torch.equal(back.to_dense(), w)
    # scipy float64 / COO / unsorted / duplicates
    coo = sps.coo_array((np.array([1.0, 2.0, 3.0]), (np.array([1, 0, 1]), np.array([2, 1, 2]))),
                        shape=(2, 3))
    c = CSRMatrix.from_scipy(coo)
    assert c.dtype == F32 and c.to_dense().tolist() == [[0, 2, 0], [0, 0, 4]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_scipy_bsr_roundtrip(dtype):
    w = random_block_pruned(32, 48, (4, 8), 0.5, seed=4).to(dtype)
    b = BSRMatrix.from_dense(w, (4, 8))
    s = b.to_scipy()
    assert isinstance(s, sps.bsr_array) and s.blocksize == (4, 8)
    np.testing.assert_array_equal(s.toarray(), w.float().numpy())
    back = BSRMatrix.from_scipy(s, value_dtype=dtype)
    assert back.blocksize == (4, 8) and torch.equal(back.to_dense(), w)
    # ragged: from any scipy format with a blocksize; to_scipy refuses clearly
    w2 = _w(33, 97)
    r = BSRMatrix.from_scipy(sps.csr_array(w2.numpy()), (4, 4))
    assert torch.equal(r.to_dense(), w2)
    with pytest.raises(ValueError, match=r"to_scipy: shape \(33, 97\) is not a multiple"):
        r.to_scipy()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_torch_sparse_roundtrip(dtype):
    w = _w(33, 97, dtype=dtype)
    m = CSRMatrix.from_dense(w)
    t = m.to_torch()
    assert t.layout == torch.sparse_csr and t.dtype == dtype
    assert torch.equal(t.to_dense(), w)
    assert torch.equal(CSRMatrix.from_torch(t).to_dense(), w)
    assert torch.equal(CSRMatrix.from_torch(w.to_sparse()).to_dense(), w)  # COO
    wb = random_block_pruned(32, 48, (4, 8), 0.5, seed=4).to(dtype)
    b = BSRMatrix.from_dense(wb, (4, 8))
    tb = b.to_torch()
    assert tb.layout == torch.sparse_bsr and torch.equal(tb.to_dense(), wb)
    back = BSRMatrix.from_torch(tb)
    assert back.blocksize == (4, 8) and torch.equal(back.to_dense(), wb)
    assert torch.equal(BSRMatrix.from_torch(m.to_torch(), (4, 4)).to_dense(), w)


# --------------------------------------------------------------------------- .to / transpose
def test_to_dtype_and_device():
    w = _w(33, 97)
    m = CSRMatrix.from_dense(w)
    for dt in (BF16, F16, F32):
        m2 = m.to(dtype=dt)
        assert m2 is not m and m2.dtype == dt
        assert torch.equal(m2.to_dense(), w.to(dt))
        assert m2.indices.data_ptr() != m.indices.data_ptr() or m2.indices is m.indices
    assert m.dtype == F32  # original untouched
    assert m.to(BF16).dtype == BF16  # positional dtype
    m3 = m.to("cpu")
    assert m3.device.type == "cpu" and torch.equal(m3.to_dense(), w)
    b = BSRMatrix.from_dense(w, (4, 4)).to(dtype="bf16")
    assert b.dtype == BF16 and b.blocksize == (4, 4)
    with pytest.raises(TypeError, match="dtype: expected one of"):
        m.to(dtype=torch.float64)
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        g = m.to("cuda")
        assert all(t.device.type == "cuda" for t in (g.indptr, g.indices, g.values))
        assert torch.equal(g.to_dense().cpu(), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_transpose(dtype):
    w = _w(33, 97, dtype=dtype)
    m = CSRMatrix.from_dense(w)
    t = m.T
    assert isinstance(t, CSRMatrix) and t.shape == (97, 33)
    assert torch.equal(t.to_dense(), w.T)
    assert torch.equal(t.T.to_dense(), w)
    # transposed structure is itself valid (re-validate through the raw constructor)
    CSRMatrix(t.indptr, t.indices, t.values, t.shape)
    b = BSRMatrix.from_dense(w, (4, 8))
    bt = b.transpose()
    assert isinstance(bt, BSRMatrix) and bt.blocksize == (8, 4) and bt.shape == (97, 33)
    assert torch.equal(bt.to_dense(), w.T)
    BSRMatrix(bt.indptr, bt.indices, bt.values, bt.shape, bt.blocksize)
    # transpose of a wide matrix switches index width
    wide = torch.zeros(70000, 3)
    wide[69999, 1] = 1.0
    mw = CSRMatrix.from_dense(wide)
    assert mw.index_dtype == torch.uint16 and mw.T.index_dtype == torch.int32
    assert torch.equal(mw.T.to_dense(), wide.T)


@pytest.mark.parametrize("shape", [(33, 97), (1, 5), (6, 1), (200, 70000)])
def test_transpose_structure_paths_agree(shape):
    """The CPU scipy path and the device-generic sort path build the same transpose."""
    import sparsekit.formats as f

    w = random_pruned(*shape, 0.99 if shape[1] > 1000 else 0.6, seed=17, empty_rows=1)
    m = CSRMatrix.from_dense(w)
    a = f._transpose_structure(m.indptr, m.indices, *shape)
    b = f._transpose_structure(m.indptr, m.indices, *shape, method="sort")
    for u, v in zip(a, b):
        assert torch.equal(u.to(torch.int64), v.to(torch.int64))


def test_raw_constructor_accepts_numpy_and_aliases_values():
    indptr = np.array([0, 2, 2, 3])
    indices = np.array([1, 3, 0], dtype=np.int64)
    values = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    m = CSRMatrix(indptr, indices, values, (3, 4))
    assert m.to_dense().tolist() == [[0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]]
    assert m.indptr.dtype == torch.int32 and m.indices.dtype == torch.uint16
    bv = np.arange(8, dtype=np.float16).reshape(2, 2, 2)
    b = BSRMatrix(np.array([0, 1, 2]), np.array([1, 0]), bv, (4, 3), (2, 2))
    assert b.dtype == F16
    expect = torch.zeros(4, 4, dtype=F16)
    expect[0:2, 2:4] = torch.from_numpy(bv[0])
    expect[2:4, 0:2] = torch.from_numpy(bv[1])
    assert torch.equal(b.to_dense(), expect[:, :3])
    assert b.nnz == int((expect[:, :3] != 0).sum())  # padding column excluded from nnz
