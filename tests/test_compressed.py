"""int8 values (per-row scales) and delta8 column gaps: round trips, every kernel path against
the float64 reference on the dequantized weights, validation, fuzzed constructors and files."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from reference import assert_close_to_reference
from torch import nn

import sparsekit
from sparsekit import BSRMatrix, CSRMatrix
from sparsekit.io import SparsekitFileError
from sparsekit.nn import SparseLinear

VDTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]
ENCODINGS = ["plain", "delta8"]


def _weight(M: int, K: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, K, generator=g) * (torch.rand(M, K, generator=g) < density)
    if M > 2:
        w[1] = 0  # an empty row
    return w


def _gap_weight(K: int = 1400) -> torch.Tensor:
    """Rows whose column gaps are exactly 254..257, 510..512 and longer (escape entries)."""
    w = torch.zeros(6, K)
    for r, g in enumerate([254, 255, 256, 257, 511, 1000]):
        cols = torch.arange(0, K, g)
        w[r, cols] = torch.arange(1, cols.numel() + 1, dtype=torch.float32)
    w[5, K - 1] = -3.0
    return w


SHAPES = [(1, 1, 1.0), (7, 33, 0.3), (33, 97, 0.1), (97, 1025, 0.05), (5, 70000, 0.001)]


def _check_dequant(w: torch.Tensor, d: torch.Tensor, vd: torch.dtype) -> None:
    if vd != torch.int8:
        assert torch.equal(d, w.to(vd))
        return
    scale = w.abs().amax(dim=1) / 127
    assert d.dtype == torch.float32
    assert bool(((d - w).abs() <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    assert bool((d[w == 0] == 0).all())


@pytest.mark.parametrize("M,K,density", SHAPES)
@pytest.mark.parametrize("vd", VDTYPES)
@pytest.mark.parametrize("enc", ENCODINGS)
def test_round_trip(M, K, density, vd, enc):
    w = _weight(M, K, density)
    m = CSRMatrix.from_dense(w, value_dtype=vd, index_encoding=enc)
    assert m.index_encoding == enc
    _check_dequant(w, m.to_dense(), vd)
    assert m.nnz == int((w != 0).sum())
    again = CSRMatrix(m.indptr, m.indices, m.values, (M, K), scales=m.scales,
                      index_encoding=m.index_encoding)
    assert torch.equal(again.to_dense(), m.to_dense())
    for bs in [(4, 3)]:
        b = BSRMatrix.from_dense(w, bs, value_dtype=vd, index_encoding=enc)
        _check_dequant(w, b.to_dense(), vd)
        b2 = BSRMatrix(b.indptr, b.indices, b.values, (M, K), bs, scales=b.scales,
                       index_encoding=b.index_encoding)
        assert torch.equal(b2.to_dense(), b.to_dense())


def test_gaps_and_escapes():
    w = _gap_weight()
    m = CSRMatrix.from_dense(w, index_encoding="delta8")
    assert torch.equal(m.to_dense(), w)
    assert m.nnz == int((w != 0).sum())
    ix = m.indices
    # rows with gaps <= 255 need no escape entries; 256 needs one per gap
    assert int(m.indptr[1]) == int((w[0] != 0).sum())
    assert int(m.indptr[2] - m.indptr[1]) == int((w[1] != 0).sum())
    assert int(m.indptr[3] - m.indptr[2]) == 2 * int((w[2] != 0).sum()) - 1
    assert ix.dtype == torch.uint8
    b = BSRMatrix.from_dense(torch.kron(w, torch.ones(2, 2)), (2, 2), index_encoding="delta8")
    assert torch.equal(b.to_dense(), torch.kron(w, torch.ones(2, 2)))


def test_auto_encoding_and_bytes():
    dense90 = _weight(64, 4096, 0.1)
    assert CSRMatrix.from_dense(dense90, value_dtype=torch.int8).index_encoding == "plain"
    assert CSRMatrix.from_dense(dense90, value_dtype=torch.int8,
                                index_encoding="auto").index_encoding == "delta8"
    very_sparse = _weight(64, 60000, 0.0005)
    assert CSRMatrix.from_dense(very_sparse, index_encoding="auto").index_encoding == "plain"
    m8 = CSRMatrix.from_dense(dense90, value_dtype=torch.int8, index_encoding="auto")
    mf = CSRMatrix.from_dense(dense90)
    assert m8.nbytes < 0.4 * mf.nbytes  # ~2 bytes per nonzero against 6


def test_int8_zero_rows_and_report():
    w = _weight(9, 50, 0.5)
    w[3] = 0
    m = CSRMatrix.from_dense(w, value_dtype=torch.int8)
    assert float(m.scales[3]) == 0.0
    q = m.quantization
    assert set(q) >= {"max_abs_error", "mean_abs_error", "rel_error"}
    d = m.to_dense()
    assert q["max_abs_error"] == pytest.approx(float((d - w).abs().max()), rel=1e-5, abs=1e-9)
    assert 0 < q["rel_error"] < 0.02
    with pytest.raises(ValueError, match="finite"):
        CSRMatrix.from_dense(torch.tensor([[1.0, float("nan")]]), value_dtype=torch.int8)


def _cpp_isas():
    C = pytest.importorskip("sparsekit._C")
    order = ["generic", "avx2", "avx512"]
    hw = C.build_info()["isa_hardware"]
    return C, order[: order.index(hw) + 1]


@pytest.mark.parametrize("M,K,density", [*SHAPES, (6, 1400, None), (9, 3000, 0.2)])
@pytest.mark.parametrize("vd", VDTYPES)
@pytest.mark.parametrize("enc", ENCODINGS)
def test_cpp_kernel_every_isa(M, K, density, vd, enc):
    C, isas = _cpp_isas()
    w = _gap_weight(K) if density is None else _weight(M, K, density, seed=M + K)
    M = w.shape[0]
    m = CSRMatrix.from_dense(w, value_dtype=vd, index_encoding=enc)
    code = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16",
            torch.int8: "i8"}[vd]
    vals = m.values.view(torch.uint16) if vd == torch.bfloat16 else m.values
    bias = torch.randn(M)
    for N in (1, 2, 3):
        x = torch.randn(N, K)
        for isa in isas:
            out = torch.full((N, M), float("nan"))
            C.csrq_linear(m.indptr.numpy(), m.indices.numpy(), vals.numpy(), code,
                          None if m.scales is None else m.scales.numpy(), x.numpy(), "f32",
                          bias.numpy(), out.numpy(), "f32", M, K, 2, isa=isa)
            assert_close_to_reference(out, x, m.to_dense(), bias, msg=f"{isa} N={N}")


@pytest.mark.parametrize("backend", ["cpp", "numba", "torch"])
@pytest.mark.parametrize("vd", VDTYPES)
@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_backends(backend, vd, enc, fmt):
    if backend not in sparsekit.backends():
        pytest.skip(f"{backend} unavailable")
    w = _weight(33, 1025, 0.1, seed=3)
    m = (CSRMatrix.from_dense(w, value_dtype=vd, index_encoding=enc) if fmt == "csr"
         else BSRMatrix.from_dense(w, (4, 4), value_dtype=vd, index_encoding=enc))
    bias = torch.randn(33)
    for N in (1, 2, 7, 40):
        x = torch.randn(N, 1025)
        y = sparsekit.linear(x, m, bias, backend=backend)
        assert_close_to_reference(y, x, m.to_dense(), bias, msg=f"{backend} N={N}")
        if vd in (torch.bfloat16, torch.float16) and backend != "torch":
            xh = x.to(vd)
            yh = sparsekit.linear(xh, m, bias, backend=backend)
            assert yh.dtype == vd
            assert_close_to_reference(yh, xh, m.to_dense(), bias, msg=f"{backend} half N={N}")


def test_binding_validation():
    C, _ = _cpp_isas()
    m = CSRMatrix.from_dense(_weight(4, 8, 0.5), value_dtype=torch.int8)
    x = np.zeros((1, 8), np.float32)
    out = np.zeros((1, 4), np.float32)
    args = (m.indptr.numpy(), m.indices.numpy(), m.values.numpy(), "i8")
    with pytest.raises(ValueError, match="scales: expected a float32 array of length 4"):
        C.csrq_linear(*args, None, x, "f32", None, out, "f32", 4, 8, 1)
    with pytest.raises(ValueError, match="scales: expected contiguous float32"):
        C.csrq_linear(*args, np.ones(3, np.float32), x, "f32", None, out, "f32", 4, 8, 1)
    with pytest.raises(ValueError, match="only taken by csrq_linear"):
        C.csr_linear(*args, x, "f32", None, out, "f32", 4, 8, 1)


def test_constructor_errors():
    ip, gaps, vals = np.array([0, 2, 3]), np.array([1, 0, 5], np.uint8), torch.ones(3)
    with pytest.raises(ValueError, match="gaps >= 1 .* position 1 \\(row 0\\)"):
        CSRMatrix(ip, gaps, vals, (2, 10), index_encoding="delta8")
    with pytest.raises(ValueError, match="decoded columns in \\[0, 5\\), got 6"):
        CSRMatrix(ip, np.array([1, 5, 0], np.uint8), vals, (2, 5), index_encoding="delta8")
    with pytest.raises(TypeError, match="uint8 gaps"):
        CSRMatrix(ip, np.array([1, 2, 0], np.int32), vals, (2, 5), index_encoding="delta8")
    with pytest.raises(ValueError, match="index_encoding: expected one of"):
        CSRMatrix(ip, np.array([1, 2, 0]), vals, (2, 5), index_encoding="zip")
    q = torch.ones(3, dtype=torch.int8)
    ok = np.array([1, 2, 0])
    with pytest.raises(TypeError, match="scales: expected dtype float32"):
        CSRMatrix(ip, ok, q, (2, 5), scales=torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="scales: expected shape \\(2,\\)"):
        CSRMatrix(ip, ok, q, (2, 5), scales=torch.ones(3))
    with pytest.raises(ValueError, match="finite values >= 0, got nan at position 1"):
        CSRMatrix(ip, ok, q, (2, 5), scales=torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="int8 values when scales are given"):
        CSRMatrix(ip, ok, torch.ones(3), (2, 5), scales=torch.ones(2))
    with pytest.raises(TypeError, match="values: expected dtype float32"):
        CSRMatrix(ip, ok, q, (2, 5))


def test_fuzz_delta8_constructor():
    """Random gap streams: either a clear ValueError or a matrix that decodes in range and
    round-trips through the kernels."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        M, K = int(rng.integers(1, 6)), int(rng.integers(1, 700))
        nnz = int(rng.integers(0, 12))
        ip = np.sort(rng.integers(0, nnz + 1, M + 1))
        ip[0], ip[-1] = 0, nnz
        if rng.random() < 0.1:
            ip[rng.integers(0, M + 1)] = nnz + 1
        gaps = rng.integers(0, 256, nnz).astype(np.uint8)
        try:
            m = CSRMatrix(ip, gaps, torch.randn(nnz), (M, K), index_encoding="delta8")
        except ValueError as e:
            assert str(e).split(":")[0] in ("indptr", "indices")
            continue
        d = m.to_dense()
        x = torch.randn(1, K)
        assert_close_to_reference(sparsekit.linear(x, m), x, d, msg="fuzz")


def test_cuda_path_error():
    m = CSRMatrix.from_dense(_weight(4, 8, 0.5), value_dtype=torch.int8)
    with pytest.raises(NotImplementedError, match="no CUDA kernel reads them"):
        m.to("cuda")
    assert m.to(torch.float32).dtype == torch.float32  # decoded float copy


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
    return model


def test_sparse_linear_and_sparsify_int8(tmp_path):
    model = _model()
    x = torch.randn(5, 300)
    sl = SparseLinear.from_dense(model[0], value_dtype=torch.int8)
    assert sl.weight_values.dtype == torch.int8 and sl.quantization["rel_error"] < 0.02
    assert_close_to_reference(sl(x), x, sl.weight, model[0].bias)
    q = copy.deepcopy(model)
    rep = sparsekit.sparsify(q, value_dtype=torch.int8, tune=False, min_sparsity=0.5,
                             index_encoding="delta8")
    assert q[0].weight_indices.dtype == torch.uint8
    assert all(layer.quantization is not None for layer in rep.layers)
    y = q(x)
    assert torch.allclose(y, model(x), atol=0.02)
    path = os.path.join(tmp_path, "q.safetensors")
    sparsekit.save(q, path)
    fresh = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    loaded = sparsekit.load(path, fresh)
    assert torch.equal(loaded(x), y)
    assert loaded[0].weight_indices.dtype == q[0].weight_indices.dtype
    q2 = copy.deepcopy(q)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), y)
    q2.half()
    assert q2[0].weight_scales.dtype == torch.float32 and q2[0].weight_values.dtype == torch.int8


def test_corrupt_file(tmp_path):
    q = copy.deepcopy(_model())
    sparsekit.sparsify(q, value_dtype=torch.int8, tune=False, min_sparsity=0.5,
                       index_encoding="delta8")
    path = os.path.join(tmp_path, "q.safetensors")
    sparsekit.save(q, path)
    raw = bytearray(open(path, "rb").read())
    tensors, meta = sparsekit.io.read_safetensors(path)
    # corrupt the gap stream: every gap 255 makes decoded columns exceed K
    hdr = int.from_bytes(raw[:8], "little")
    import json

    h = json.loads(raw[8:8 + hdr])
    b0, b1 = h["0.weight_indices"]["data_offsets"]
    raw[8 + hdr + b0:8 + hdr + b1] = b"\xff" * (b1 - b0)
    bad = os.path.join(tmp_path, "bad.safetensors")
    open(bad, "wb").write(bytes(raw))
    with pytest.raises(SparsekitFileError, match="invalid sparse weight: indices"):
        sparsekit.load(bad)
    # scales missing for int8 values
    st = q.state_dict()
    del st["0.weight_scales"]
    with pytest.raises(ValueError, match="weight_scales"):
        from sparsekit.nn.linear import matrix_from_state

        matrix_from_state(st["0.weight_indptr"], st["0.weight_indices"],
                          st["0.weight_values"], st["0.weight_meta"], prefix="0.")


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("vd, enc", [(torch.int8, "plain"), (torch.int8, "delta8"),
                                     (torch.float32, "delta8")])
def test_functional_linear_gradients_and_compile(fmt, vd, enc):
    """sparsekit.linear on a compressed weight: gradients to x and bias through the float
    decoding, and a whole graph under torch.compile (no eager fallback)."""
    w = _weight(40, 72, 0.2, seed=5)
    W = (CSRMatrix.from_dense(w, value_dtype=vd, index_encoding=enc) if fmt == "csr" else
         BSRMatrix.from_dense(w, (4, 8), value_dtype=vd, index_encoding=enc))
    dense = W.to_dense().double()
    x = torch.randn(6, 72, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    y = sparsekit.linear(x, W, b)
    g = torch.randn(6, 40)
    y.backward(g)
    torch.testing.assert_close(y.double(), x.double() @ dense.T + b.double(),
                               rtol=1e-5, atol=1e-5, check_dtype=False)
    torch.testing.assert_close(x.grad.double(), g.double() @ dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, g.sum(0), rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    f = torch.compile(lambda x, W: sparsekit.linear(x, W), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        x2 = torch.randn(3, 72)
        torch.testing.assert_close(f(x2, W), sparsekit.linear(x2, W), rtol=0, atol=0)
