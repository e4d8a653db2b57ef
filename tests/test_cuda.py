"""CUDA kernels (``sparsekit._C.cuda_*`` through ``backend="cuda"``) against the float64 dense
reference: every value/x/index dtype combination, batch sizes 1..200, shapes 1..4096, nnz = 0,
empty rows, BSR on both the tensor-core and the CUDA-core path with ragged edges, row strides,
unaligned buffers, int64 indptr, stream semantics (side stream, CUDA graph capture) and the
argument errors of the binding.

Skips (with the reason) unless ``sparsekit._C`` was built with CUDA and torch sees a GPU; run on a
GPU machine with ``pytest tests/test_cuda.py`` (benchmarks/run_gpu.sh does).
"""

from __future__ import annotations

import pytest
import torch
from reference import assert_close_to_reference, random_block_pruned, random_pruned, random_x

import sparsekit
from sparsekit import BSRMatrix, CSRMatrix
from sparsekit.kernels import get_backend

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _skip_reason() -> str | None:
    try:
        from sparsekit import _C
    except Exception as e:
        return f"sparsekit._C not importable ({type(e).__name__}: {e})"
    if not getattr(_C, "cuda_built", lambda: False)():
        return "sparsekit._C was built without CUDA (SPARSEKIT_CUDA=OFF or no nvcc)"
    if not torch.cuda.is_available():
        info = dict(_C.cuda_info())
        return f"no CUDA device visible to torch (driver: {info.get('device_error') or 'n/a'})"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

DEV = "cuda"
#: (value dtype, x dtype): x is fp32 or the value dtype; y has x's dtype
VX = [(F32, F32), (F16, F32), (F16, F16), (BF16, F32), (BF16, BF16)]
VX_IDS = [f"w{str(v)[6:]}-x{str(x)[6:]}" for v, x in VX]
BATCHES = [1, 3, 8, 16, 33, 128]
SHAPES = [(1, 1), (7, 33), (33, 97), (97, 1025), (1025, 7), (4096, 4096)]


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _check(mat, w_dense, x, bias=None, msg=""):
    """Run backend='cuda', compare with the reference, and make sure the output has no NaN
    (the reference never has one: a NaN means an element was not written)."""
    y = sparsekit.linear(x.to(DEV), mat.to(DEV), None if bias is None else bias.to(DEV),
                         backend="cuda")
    torch.cuda.synchronize()
    assert y.device.type == "cuda" and y.dtype == x.dtype, msg
    assert not bool(torch.isnan(y).any()), f"{msg}: NaN in output (unwritten element?)"
    assert_close_to_reference(y.cpu(), x, w_dense, bias, msg=msg)
    return y


# --------------------------------------------------------------------------- CSR
@pytest.mark.parametrize("vx", VX, ids=VX_IDS)
@pytest.mark.parametrize("N", BATCHES)
def test_csr_shapes_dtypes(vx, N):
    vdt, xdt = vx
    for i, (M, K) in enumerate(SHAPES):
        if M * K > 2**22 and N in (3, 33):
            continue  # the 4096^2 case at N = 1, 8, 16, 128 is enough (float64 reference cost)
        sparsity = [0.0, 0.5, 0.7, 0.9, 0.6, 0.9][i]
        w = random_pruned(M, K, sparsity, seed=100 * N + i, dtype=vdt, empty_rows=M // 5)
        mat = CSRMatrix.from_dense(w)
        assert mat.index_dtype == torch.uint16
        x = random_x((N, K), seed=7 * N + i, dtype=xdt)
        bias = random_x((M,), seed=i, dtype=F32) if i % 2 else None
        _check(mat, mat.to_dense(), x, bias, msg=f"csr {vdt} x{xdt} M={M} K={K} N={N}")


@pytest.mark.parametrize("vx", VX, ids=VX_IDS)
@pytest.mark.parametrize("N", [1, 5, 33])
def test_csr_int32_indices(vx, N):
    vdt, xdt = vx
    M, K = 33, 70_001  # K > 65536 -> int32 column indices
    w = random_pruned(M, K, 0.995, seed=N, dtype=vdt, empty_rows=3)
    mat = CSRMatrix.from_dense(w)
    assert mat.index_dtype == torch.int32
    x = random_x((N, K), seed=N + 1, dtype=xdt)
    _check(mat, mat.to_dense(), x, random_x((M,), seed=3), msg=f"csr int32 idx {vdt} N={N}")


@pytest.mark.parametrize("N", [1, 4, 40])
def test_csr_nnz_zero_and_all_empty(N):
    for vdt in (F32, F16):
        w = torch.zeros(97, 33, dtype=vdt)
        mat = CSRMatrix.from_dense(w)
        assert mat.nnz == 0
        x = random_x((N, 33), seed=N, dtype=vdt)
        bias = random_x((97,), seed=1)
        y = _check(mat, mat.to_dense(), x, bias, msg=f"nnz=0 {vdt}")
        torch.testing.assert_close(y.float().cpu(), bias.to(vdt).float().expand(N, 97),
                                   rtol=0, atol=float(torch.finfo(vdt).eps) * 8)


def test_csr_skewed_rows_swizzle():
    """Very uneven row lengths (row swizzle permutes the launch order)."""
    M, K = 300, 2048
    w = random_pruned(M, K, 0.99, seed=5)
    w[::37] = random_x((len(range(0, M, 37)), K), seed=6)  # a few fully dense rows
    mat = CSRMatrix.from_dense(w.to(F16))
    for N in (1, 2, 9):
        _check(mat, mat.to_dense(), random_x((N, K), seed=N, dtype=F16), msg=f"skewed N={N}")


def test_csr_large_batch_grid_y():
    """N well above the 8-row slice (many grid.y slices), fp32."""
    M, K, N = 65, 129, 1000
    mat = CSRMatrix.from_dense(random_pruned(M, K, 0.8, seed=9))
    _check(mat, mat.to_dense(), random_x((N, K), seed=10), msg="N=1000")


# --------------------------------------------------------------------------- BSR
def _bsr_case(M, K, bs, vdt, xdt, N, seed, bias=True, block_sparsity=0.6):
    w = random_block_pruned(M, K, bs, block_sparsity, seed=seed, dtype=vdt, inner_sparsity=0.2)
    mat = BSRMatrix.from_dense(w, blocksize=bs)
    x = random_x((N, K), seed=seed + 1, dtype=xdt)
    b = random_x((M,), seed=seed + 2) if bias else None
    return mat, x, b


@pytest.mark.parametrize("bs", [(16, 16), (32, 32), (16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("vdt", [F16, BF16])
@pytest.mark.parametrize("N", [16, 33, 128, 200])
def test_bsr_tensor_core(bs, vdt, N):
    from sparsekit import _C

    for M, K in [(97, 1025), (256, 512), (33, 47)]:
        mat, x, b = _bsr_case(M, K, bs, vdt, vdt, N, seed=M + N)
        path = _C.cuda_bsr_path(bs[0], bs[1], N, str(vdt)[6:], str(vdt)[6:],
                                mat.to(DEV).values.data_ptr())
        assert path == "tensor_core"
        _check(mat, mat.to_dense(), x, b, msg=f"bsr-tc {bs} {vdt} M={M} K={K} N={N}")


@pytest.mark.parametrize("bs", [(1, 1), (4, 4), (1, 8), (3, 5), (16, 16), (32, 32)])
@pytest.mark.parametrize("vx", VX, ids=VX_IDS)
@pytest.mark.parametrize("N", [1, 3, 8, 33])
def test_bsr_cuda_core(bs, vx, N):
    vdt, xdt = vx
    for M, K in [(7, 33), (97, 130)]:
        mat, x, b = _bsr_case(M, K, bs, vdt, xdt, N, seed=M * 3 + N, bias=(N % 2 == 1))
        _check(mat, mat.to_dense(), x, b, msg=f"bsr-cc {bs} {vdt} x{xdt} M={M} K={K} N={N}")


@pytest.mark.parametrize("vdt", [F16, BF16, F32])
def test_bsr_no_blocks(vdt):
    mat = BSRMatrix.from_dense(torch.zeros(48, 64, dtype=vdt), blocksize=(16, 16))
    assert mat.nnz_blocks == 0
    for N in (1, 32):
        _check(mat, mat.to_dense(), random_x((N, 64), seed=N, dtype=vdt),
               random_x((48,), seed=2), msg=f"bsr nnzb=0 {vdt} N={N}")


def test_bsr_big_square():
    mat, x, b = _bsr_case(4096, 4096, (32, 32), F16, F16, 256, seed=11, block_sparsity=0.9)
    _check(mat, mat.to_dense(), x, b, msg="bsr 4096^2 N=256")


# --------------------------------------------------------------------------- raw binding
def _raw_csr(mat, x, out, *, bias=None, indptr=None, values=None, ldx=-1, ldy=-1, stream=0,
             batch=None):
    from sparsekit import _C

    M, K = mat.shape
    ip = mat.indptr if indptr is None else indptr
    vals = mat.values if values is None else values
    code = {F32: "f32", F16: "f16", BF16: "bf16"}
    _C.cuda_csr_linear(
        ip.data_ptr(), mat.indices.data_ptr(), vals.data_ptr(), x.data_ptr(), out.data_ptr(),
        0 if bias is None else bias.data_ptr(), 0, M, K,
        x.shape[0] if batch is None else batch, mat.nnz, code[vals.dtype], code[x.dtype],
        code[out.dtype], str(ip.dtype)[6:], str(mat.indices.dtype)[6:], ldx, ldy, stream)


def test_raw_int64_indptr_strides_unaligned():
    """int64 indptr, row strides ldx/ldy > K/M, and values not 16-byte aligned (scalar path)."""
    M, K, N = 97, 300, 5
    w = random_pruned(M, K, 0.6, seed=21, dtype=F16)
    mat = CSRMatrix.from_dense(w).to(DEV)
    ref_w = mat.to_dense().cpu()
    x_wide = random_x((N, K + 13), seed=22, dtype=F16).to(DEV)
    x = x_wide[:, :K]
    out_wide = _poisoned((N, M + 7), F16)
    ip64 = mat.indptr.to(torch.int64)
    # values shifted by one element inside a bigger buffer: base no longer 16-byte aligned
    buf = torch.empty(mat.nnz + 1, dtype=F16, device=DEV)
    buf[1:] = mat.values
    _raw_csr(mat, x_wide, out_wide, indptr=ip64, values=buf[1:], ldx=K + 13, ldy=M + 7,
             batch=N)
    torch.cuda.synchronize()
    assert_close_to_reference(out_wide[:, :M].cpu(), x.cpu(), ref_w, msg="raw int64/strided")
    assert bool(torch.isnan(out_wide[:, M:]).all()), "wrote outside the first M columns"


def test_raw_errors():
    from sparsekit import _C

    mat = CSRMatrix.from_dense(random_pruned(8, 16, 0.5, seed=1)).to(DEV)
    x = random_x((2, 16), seed=2).to(DEV)
    out = _poisoned((2, 8), F32)
    args = dict(indptr=mat.indptr.data_ptr(), indices=mat.indices.data_ptr(),
                values=mat.values.data_ptr(), x=x.data_ptr(), out=out.data_ptr(), bias=0,
                row_order=0, n_rows=8, n_cols=16, batch=2, nnz=mat.nnz, value_dtype="f32",
                x_dtype="f32", out_dtype="f32", indptr_dtype="int32", index_dtype="uint16")
    _C.cuda_csr_linear(**args)  # valid
    cases = [
        (dict(indptr=0), "indptr: expected a non-null device pointer"),
        (dict(x=0), "x: expected a non-null"),
        (dict(out=0), "out: expected a non-null"),
        (dict(values=args["values"] + 2), "values: expected a device pointer aligned to 4"),
        (dict(n_rows=-1), "n_rows"),
        (dict(batch=-3), "batch"),
        (dict(value_dtype="f64"), "value_dtype"),
        (dict(x_dtype="f16"), "x_dtype"),
        (dict(out_dtype="f16"), "out_dtype"),
        (dict(indptr_dtype="uint16"), "indptr_dtype"),
        (dict(index_dtype="int64"), "index_dtype"),
        (dict(ldx=3), "ldx: expected >= n_cols"),
    ]
    for bad, text in cases:
        with pytest.raises(ValueError, match=text.split(":")[0]) as ei:
            _C.cuda_csr_linear(**{**args, **bad})
        assert text in str(ei.value), str(ei.value)
    with pytest.raises(ValueError, match="block_r"):
        _C.cuda_bsr_linear(mat.indptr.data_ptr(), mat.indices.data_ptr(),
                           mat.values.data_ptr(), x.data_ptr(), out.data_ptr(), 0, 8, 16, 2, 1,
                           0, 16, "f32", "f32", "f32", "int32", "uint16")
    torch.cuda.synchronize()  # nothing above left a sticky error


def test_backend_rejects_cpu_and_mixed_devices():
    be = get_backend("cuda")
    mat = CSRMatrix.from_dense(random_pruned(8, 16, 0.5, seed=1))
    assert not be.supports(mat, torch.zeros(2, 16))
    assert not be.supports(mat, torch.zeros(2, 16, device=DEV))
    assert be.supports(mat.to(DEV), torch.zeros(2, 16, device=DEV))
    assert not be.supports(mat.to(DEV), torch.zeros(2, 16, device=DEV, dtype=F16))


# --------------------------------------------------------------------------- streams
def test_runs_on_current_stream():
    """The kernel must be ordered after earlier work on the caller's (non-default) stream: a
    long sleep precedes the write of x on that stream, so a launch on any other stream would
    read the stale x."""
    M, K, N = 512, 1024, 4
    mat = CSRMatrix.from_dense(random_pruned(M, K, 0.9, seed=31, dtype=F16)).to(DEV)
    x_old = torch.zeros(N, K, dtype=F16, device=DEV)
    x_new = random_x((N, K), seed=32, dtype=F16).to(DEV)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on s
        x_old.copy_(x_new)
        y = sparsekit.linear(x_old, mat, backend="cuda")
        mat_b = BSRMatrix.from_dense(mat.to_dense(), blocksize=(16, 16))
        yb = sparsekit.linear(x_old.repeat(4, 1), mat_b, backend="cuda")  # N=16: tensor cores
    s.synchronize()
    assert_close_to_reference(y.cpu(), x_new.cpu(), mat.to_dense().cpu(), msg="side stream")
    assert_close_to_reference(yb.cpu(), x_new.repeat(4, 1).cpu(), mat.to_dense().cpu(),
                              msg="side stream bsr")


def test_cuda_graph_capture():
    """Capturable (no sync, no allocation inside, launches on the capturing stream)."""
    M, K, N = 256, 512, 2
    mat = CSRMatrix.from_dense(random_pruned(M, K, 0.8, seed=41)).to(DEV)
    bias = random_x((M,), seed=42).to(DEV)
    x = torch.zeros(N, K, device=DEV)
    out = torch.empty(N, M, device=DEV)
    be = get_backend("cuda")
    be.linear(mat, x, bias, out)  # warm-up: builds the cached row order outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        be.linear(mat, x, bias, out)
    x_new = random_x((N, K), seed=43)
    x.copy_(x_new.to(DEV))
    g.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(out.cpu(), x_new, mat.to_dense().cpu(), bias.cpu(), msg="graph")
