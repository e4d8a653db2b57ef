"""CUDA backend: ``sparsekit._C.cuda_csr_linear`` / ``cuda_bsr_linear`` (csrc/cuda/*.cu).

The extension never links libtorch: torch CUDA tensors are handed over as raw device pointers
(``data_ptr()``) with their sizes, dtype codes and ``torch.cuda.current_stream().cuda_stream``,
so the kernels run asynchronously on the caller's stream and compose with CUDA graphs and other
torch work. All size/dtype/pointer checks are re-done in C++ (csrc/bindings.cpp); CUDA errors
raise ``RuntimeError`` naming the kernel.

Kernels (see csrc/cuda/spmm_cuda.h):

* CSR: warp per row with 128-bit streaming loads of values/indices and x gathered through the
  read-only cache; N <= 8 in one pass (1/2/4/8 accumulators per lane), larger N tiled by 8.
  Rows are visited longest-first (row swizzle, after Sputnik) when their lengths are skewed;
  the permutation is computed on the device once per matrix and cached on it.
* BSR: tensor cores (wmma m16n16k16, fp32 accumulation) for fp16/bf16 weights with x of the
  same dtype, blocks that are multiples of 16 and N >= 16; a CUDA-core kernel otherwise.

Complexity: O(nnz * N) multiply-adds (BSR: O(nnz_blocks * r * c * N)).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..formats import BSRMatrix, CSRMatrix

_C: Any = None
_IMPORT_ERROR: str | None = None
try:
    _C = importlib.import_module("sparsekit._C")
    if not hasattr(_C, "cuda_built"):
        raise ImportError("sparsekit._C has no cuda_built (stale build)")
except Exception as e:  # missing or broken build
    _C = None
    _IMPORT_ERROR = f"sparsekit._C is not importable: {type(e).__name__}: {e}"

_CODE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_IDX = {torch.int32: "int32", torch.int64: "int64", torch.uint16: "uint16"}


def built() -> bool:
    """True when ``sparsekit._C`` was compiled with the CUDA kernels."""
    return _C is not None and bool(_C.cuda_built())


#: row swizzle only pays when row lengths are skewed (longest row > this x the mean): on
#: uniform rows it only adds a dependent load in front of every row
SWIZZLE_SKEW = 2.0


def row_order(mat: CSRMatrix) -> torch.Tensor | None:
    """Row-swizzle permutation of a CUDA CSR matrix (int32 (M,)), or None when not worth it.

    Rows by decreasing length: long rows start first and neighbouring warps get rows of
    similar length, which evens out the tail of the launch on skewed matrices (Sputnik's row
    swizzle). Computed on the matrix's device once (one host sync) and cached on the matrix;
    None when the longest row is at most ``SWIZZLE_SKEW`` times the mean length.
    """

    def build() -> torch.Tensor | None:
        lengths = mat.indptr[1:] - mat.indptr[:-1]
        M = lengths.numel()
        if M < 2:
            return None
        mx = int(lengths.max())
        if mx * M <= SWIZZLE_SKEW * int(mat.indptr[-1]):
            return None
        order = torch.argsort(lengths, descending=True, stable=True)
        return order.to(torch.int32).contiguous()

    return mat.cached(("cuda", "row_order"), build)


class CudaBackend:
    """Backend object for the registry (see docs/design.md)."""

    name = "cuda"

    def available(self) -> bool:
        """Built with CUDA, torch sees a CUDA device, and the CUDA runtime this module was
        built against accepts the driver (``cuda_device_count() > 0``; a driver older than the
        build's CUDA major version reports 0). Creates no CUDA context."""
        return built() and torch.cuda.is_available() and int(_C.cuda_device_count()) > 0

    def describe(self) -> str:
        """CUDA runtime and archs of the build, or why unavailable."""
        if _C is None:
            return str(_IMPORT_ERROR)
        info = dict(_C.cuda_info())
        if not info.get("built"):
            return ("sparsekit._C was built without CUDA "
                    "(SPARSEKIT_CUDA=OFF or no nvcc at build time)")
        rt = int(info["runtime_version"])
        desc = f"CUDA {rt // 1000}.{rt % 1000 // 10}, sm {info['archs']}"
        if not torch.cuda.is_available():
            return f"{desc}; no CUDA device visible to torch"
        if int(info.get("device_count", 0)) == 0:
            return f"{desc}; the CUDA runtime sees no device ({info.get('device_error')})"
        return desc

    def supports(self, mat: Any, x: torch.Tensor) -> bool:
        """CSR/BSR on x's CUDA device; fp32/bf16/fp16 values, x fp32 or the value dtype."""
        if not isinstance(mat, (CSRMatrix, BSRMatrix)) or x.device.type != "cuda":
            return False
        v = mat.values
        if getattr(mat, "is_compressed", False):
            return False  # int8 values / delta8 indices: no CUDA kernel (CPU only)
        return (
            v.device == x.device
            and mat.indptr.device == x.device
            and mat.indices.device == x.device
            and v.dtype in _CODE
            and (x.dtype == torch.float32 or x.dtype == v.dtype)
        )

    def linear(self, mat: Any, x2d: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor) -> None:
        """out = x2d @ W.T + bias, enqueued on torch's current stream of x2d's device.

        Parameters
        ----------
        mat : CSRMatrix or BSRMatrix on x2d's CUDA device
        x2d : torch.Tensor
            (N, K) C-contiguous, fp32 or the weight's value dtype.
        bias : torch.Tensor or None
            (M,) fp32 (converted/moved if needed).
        out : torch.Tensor
            (N, M) C-contiguous, x2d's dtype, on the same device; fully overwritten.
        """
        if not built():
            raise RuntimeError(f"cuda backend unavailable: {self.describe()}")
        M, K = mat.shape
        N = x2d.shape[0]
        dev = x2d.device
        if bias is not None and (bias.dtype != torch.float32 or bias.device != dev
                                 or not bias.is_contiguous()):
            bias = bias.to(device=dev, dtype=torch.float32).contiguous()
        code = _CODE[x2d.dtype]
        vcode = _CODE[mat.values.dtype]
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev).cuda_stream
            bptr = 0 if bias is None else bias.data_ptr()
            # x2d / out are C-contiguous (contract), so the row strides are K and M.
            if isinstance(mat, BSRMatrix):
                r, c = mat.blocksize
                _C.cuda_bsr_linear(
                    mat.indptr.data_ptr(), mat.indices.data_ptr(), mat.values.data_ptr(),
                    x2d.data_ptr(), out.data_ptr(), bptr, M, K, N, int(mat.indices.numel()),
                    r, c, vcode, code, code, _IDX[mat.indptr.dtype], _IDX[mat.indices.dtype],
                    K, M, stream)
            else:
                ro = row_order(mat)
                _C.cuda_csr_linear(
                    mat.indptr.data_ptr(), mat.indices.data_ptr(), mat.values.data_ptr(),
                    x2d.data_ptr(), out.data_ptr(), bptr, 0 if ro is None else ro.data_ptr(),
                    M, K, N, int(mat.indices.numel()), vcode, code, code,
                    _IDX[mat.indptr.dtype], _IDX[mat.indices.dtype],
                    K, M, stream)


backend = CudaBackend()
