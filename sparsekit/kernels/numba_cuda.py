"""Numba CUDA backend: a CSR ``linear`` kernel written in Python (``numba.cuda.jit``).

The fallback GPU path when ``sparsekit._C`` was built without CUDA: slower than the CUDA C++
kernels (``sparsekit.kernels.cuda``), but needs only Numba and a driver.

Design
------
* One warp per sparse row, one batch row per ``blockIdx.y``; the 32 lanes stride over the
  row's nonzeros (coalesced value/index loads) and their partial sums are reduced in shared
  memory. Shared memory + ``syncthreads`` rather than warp shuffles so the same kernel runs
  under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which has no ``shfl_*_sync``;
  every thread reaches the barrier (no early return).
* fp32 accumulation. 16-bit values (bf16/fp16) stay 16-bit in device memory: the kernel reads
  the raw bits and decodes them through a 65536-entry fp32 table (256 KiB, exact for every
  bit pattern incl. subnormals/Inf/NaN, cached by L1/L2), since Numba CUDA has no portable
  bf16 type and no bit-cast intrinsic available in the simulator.
* x is read as fp32: bf16/fp16 activations are converted once per call (O(N*K)) and a 16-bit
  output is rounded from an fp32 buffer by torch (round-to-nearest-even).
* Launched on torch's current stream (``cuda.external_stream``). Kernels are compiled on
  first use; importing this module initialises no CUDA context.

Complexity: O(nnz * N) multiply-adds; reads every nonzero N times (from L2 after the first).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

try:
    import numba

    _IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - only where numba is missing/broken
    numba = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"numba is not importable: {type(e).__name__}: {e}"

#: threads per block: 4 warps, one sparse row each
WARPS_PER_BLOCK = 4
_THREADS = 32 * WARPS_PER_BLOCK

_lock = threading.Lock()
_kernels: dict[str, Any] = {}
# ``numba.cuda``, bound on first use. It must be a module *global* used by the kernels: the
# CUDA simulator swaps globals that refer to numba.cuda for its fake module at launch.
cuda: Any = None


def _cuda():
    """``numba.cuda``, imported on first use (no CUDA context is created by the import)."""
    global cuda
    if cuda is None:
        from numba import cuda as _numba_cuda

        cuda = _numba_cuda
    return cuda


def _build_kernels() -> dict[str, Any]:
    """Compile-on-first-call dispatchers (creating them initialises no CUDA context)."""
    with _lock:
        if _kernels:
            return _kernels
        _cuda()
        from numba import float32

        def make(decode16: bool):
            @cuda.jit(cache=False)
            def csr_linear_kernel(indptr, indices, values, lut, x, bias, y, M, has_bias):
                """y[n, row] = sum_j values[j] * x[n, indices[j]] (+ bias[row]).

                indptr (M+1,) int32/int64, indices (nnz,) uint16/int32, values (nnz,) fp32
                or raw 16-bit words (decoded by ``lut`` (65536,) fp32), x (N, K) fp32,
                bias (M,) fp32 (ignored unless has_bias), y (N, M) fp32. Grid: (ceil(M /
                WARPS_PER_BLOCK), N) blocks of 32 * WARPS_PER_BLOCK threads.
                """
                partial = cuda.shared.array(shape=_THREADS, dtype=float32)
                tid = cuda.threadIdx.x
                lane = tid % 32
                row = cuda.blockIdx.x * WARPS_PER_BLOCK + tid // 32
                n = cuda.blockIdx.y
                acc = float32(0.0)
                if row < M:
                    s = indptr[row]
                    e = indptr[row + 1]
                    j = s + lane
                    while j < e:
                        if decode16:
                            v = lut[np.int32(values[j]) & 0xFFFF]
                        else:
                            v = values[j]
                        col = np.int32(indices[j])
                        if col < 0:  # uint16 column ids travel as int16
                            col += 65536
                        acc += float32(v) * x[n, col]
                        j += 32
                partial[tid] = acc
                cuda.syncthreads()
                # tree reduction inside each warp's 32 slots; all threads hit every barrier
                w0 = tid - lane
                off = 16
                while off > 0:
                    if lane < off:
                        partial[tid] += partial[tid + off]
                    cuda.syncthreads()
                    off //= 2
                if lane == 0 and row < M:
                    r = partial[w0]
                    if has_bias:
                        r += bias[row]
                    y[n, row] = r

            return csr_linear_kernel

        _kernels["f32"] = make(False)
        _kernels["bits16"] = make(True)
        return _kernels


def decode_table(dtype: torch.dtype) -> np.ndarray:
    """fp32 value of every 16-bit pattern of ``dtype`` (bfloat16 or float16), shape (65536,)."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)  # wraps to the bit patterns
    return bits.view(dtype).to(torch.float32).numpy()


def launch_csr(indptr, indices, values, lut, x, bias, y, *, stream=0) -> None:
    """Launch the CSR kernel on device (or simulator) arrays; asynchronous on ``stream``.

    Parameters
    ----------
    indptr : (M + 1,) int32/int64 device array
    indices : (nnz,) int32 device array, or uint16 column ids viewed as int16 (negative
        entries are read as ``value + 65536``)
    values : (nnz,) float32, or raw 16-bit words (int16/uint16) decoded through ``lut``
    lut : (65536,) float32 device array from :func:`decode_table`, or None for fp32 values
    x : (N, K) float32 device array
    bias : (M,) float32 device array or None
    y : (N, M) float32 device array, fully written (not read)
    stream : numba stream or 0
    """
    M = indptr.shape[0] - 1
    N = x.shape[0]
    if M <= 0 or N == 0:
        return
    kern = _build_kernels()["f32" if lut is None else "bits16"]
    has_bias = bias is not None
    if lut is None or bias is None:
        # typed placeholder for the unused argument, allocated where x lives
        if isinstance(x, np.ndarray):
            dummy = np.zeros(1, np.float32)
        else:
            dummy = _cuda().device_array(1, dtype=np.float32, stream=stream)
        lut = dummy if lut is None else lut
        bias = dummy if bias is None else bias
    grid_x = (M + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    for n0 in range(0, N, 65535):  # gridDim.y <= 65535
        n1 = min(N, n0 + 65535)
        kern[(grid_x, n1 - n0), _THREADS, stream](
            indptr, indices, values, lut, x[n0:n1], bias, y[n0:n1], M, has_bias)


class NumbaCudaBackend:
    """Backend object for the registry (see docs/design.md)."""

    name = "numba_cuda"

    def available(self) -> bool:
        """True when numba imports and torch sees a CUDA device (no context is created)."""
        if numba is None or not torch.cuda.is_available():
            return False
        try:
            return bool(_cuda().is_available())
        except Exception:
            return False

    def describe(self) -> str:
        """Numba version, or why unavailable."""
        if numba is None:
            return str(_IMPORT_ERROR)
        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        return f"numba {numba.__version__} (CSR only)"

    def supports(self, mat: Any, x: torch.Tensor) -> bool:
        """CSR on the same CUDA device as x; fp32/bf16/fp16 values, x fp32 or the value dtype."""
        from ..formats import CSRMatrix

        v = mat.values
        if getattr(mat, "is_compressed", False):
            return False  # int8 values / delta8 indices: no CUDA kernel (CPU only)
        return (
            type(mat) is CSRMatrix
            and x.device.type == "cuda"
            and v.device == x.device
            and v.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (x.dtype == torch.float32 or x.dtype == v.dtype)
        )

    def linear(self, mat: Any, x2d: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor) -> None:
        """out = x2d @ W.T + bias, written in place on torch's current stream.

        Parameters
        ----------
        mat : CSRMatrix on x2d's CUDA device
        x2d : torch.Tensor (N, K) C-contiguous, fp32 or the weight's value dtype
        bias : torch.Tensor (M,) fp32 or None
        out : torch.Tensor (N, M) C-contiguous, x2d's dtype (written, not read)
        """
        if numba is None:
            raise RuntimeError(f"numba_cuda backend unavailable: {_IMPORT_ERROR}")
        _cuda()
        dev = x2d.device
        N = x2d.shape[0]
        M, _K = mat.shape
        if N == 0 or M == 0:
            return
        with torch.cuda.device(dev):
            stream = cuda.external_stream(torch.cuda.current_stream(dev).cuda_stream)
            v = mat.values
            if v.dtype == torch.float32:
                vals, lut = v, None
            else:
                vals = v.view(torch.int16)
                lut = mat.cached(
                    ("numba_cuda", "lut", str(dev)),
                    lambda: torch.from_numpy(decode_table(v.dtype)).to(dev),
                )
            x32 = x2d if x2d.dtype == torch.float32 else x2d.to(torch.float32)
            y32 = out if out.dtype == torch.float32 else torch.empty(
                (N, M), dtype=torch.float32, device=dev)
            b = None if bias is None else bias.to(device=dev, dtype=torch.float32).contiguous()
            idx = mat.indices
            if idx.dtype == torch.uint16:
                idx = idx.view(torch.int16)
            ca = cuda.as_cuda_array
            launch_csr(ca(mat.indptr), ca(idx), ca(vals), None if lut is None else ca(lut),
                       ca(x32), None if b is None else ca(b), ca(y32), stream=stream)
            if y32 is not out:
                out.copy_(y32)


backend = NumbaCudaBackend()
