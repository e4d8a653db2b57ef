"""C++ CPU backend: ``sparsekit._C.csr_linear`` / ``bsr_linear`` (OpenMP + runtime-dispatched
SIMD: AVX-512 / AVX2+FMA+F16C / portable), fp32 accumulation.

Torch CPU tensors are handed to the extension zero-copy as numpy views (bfloat16 as a
``uint16`` view with dtype code ``"bf16"``). The numpy views of the weight buffers are built
once per matrix and cached on it, so the per-call Python work is a handful of attribute
lookups (this dominates at N=1 for small layers: see ``benchmarks/bench_cpu.py``). All argument
checks that the kernels rely on are re-done in C++ (``csrc/bindings.cpp``), so a bad call raises
instead of crashing.

Complexity: O(nnz * N) multiply-adds (BSR: O(nnz_blocks * r * c * N)), weights streamed once
per call for N <= 64, plus O(N * K) to pack activations when N > 1.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..formats import BSRMatrix, CSRMatrix

try:  # the core engineer's thread-count module
    from ..threads import get_num_threads
except ImportError:  # pragma: no cover - only while sparsekit.threads is missing
    import os

    def get_num_threads() -> int:
        return max(1, len(os.sched_getaffinity(0)))


_C: Any = None
_IMPORT_ERROR: str | None = None
try:
    _C = importlib.import_module("sparsekit._C")
    if not hasattr(_C, "csr_linear"):
        raise ImportError("sparsekit._C has no csr_linear (stale or foreign build)")
except Exception as e:  # missing or broken build: the registry falls back to numba
    _C = None
    _IMPORT_ERROR = f"sparsekit._C is not importable: {type(e).__name__}: {e}"

_CODE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_QCODE = {**_CODE, torch.int8: "i8"}
#: Largest batch the compressed CSR kernel runs directly (it passes over a row once per vector);
#: larger batches use the tiled float kernels on the matrix decoded once (cached), which are
#: faster there, so a compressed matrix is never slower than its float/plain equivalent.
COMPRESSED_MAX_BATCH = 2


def _np(t: torch.Tensor):
    """Zero-copy numpy view of a CPU tensor; bfloat16 becomes its uint16 bit pattern."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


def _prepared(mat: Any) -> tuple:
    """(indptr, indices, values, value_code) numpy views, cached on the matrix."""

    def build() -> tuple:
        return (mat.indptr.numpy(), mat.indices.numpy(), _np(mat.values),
                _QCODE[mat.values.dtype])

    return mat._cached(("cpp", "np"), build)


class CppBackend:
    """Backend object for the registry (see docs/design.md)."""

    name = "cpp"

    def available(self) -> bool:
        """True when the compiled extension imports."""
        return _C is not None

    def describe(self) -> str:
        """The ISA the kernels dispatch to (e.g. ``"avx512"``), or why unavailable."""
        if _C is None:
            return str(_IMPORT_ERROR)
        return str(_C.cpu_isa())

    def supports(self, mat: Any, x: torch.Tensor) -> bool:
        """CPU CSR/BSR with f32/bf16/f16/int8 values (plain or delta8 indices); x on the CPU,
        fp32 or the weight's dtype."""
        v = mat.values
        return (
            _C is not None
            and isinstance(mat, (CSRMatrix, BSRMatrix))
            and x.device.type == "cpu"
            and v.device.type == "cpu"
            and v.dtype in _QCODE
            and (x.dtype == torch.float32 or x.dtype == v.dtype)
        )

    def linear(self, mat: Any, x2d: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor) -> None:
        """out = x2d @ W.T + bias, written in place.

        Parameters
        ----------
        mat : CSRMatrix or BSRMatrix on the CPU
        x2d : torch.Tensor
            (N, K) C-contiguous, fp32 or the weight's value dtype.
        bias : torch.Tensor or None
            (M,) fp32 contiguous.
        out : torch.Tensor
            (N, M) C-contiguous, x2d's dtype; fully overwritten.
        """
        if _C is None:
            raise RuntimeError(f"cpp backend unavailable: {_IMPORT_ERROR}")
        if mat.is_compressed:
            if type(mat) is CSRMatrix and x2d.shape[0] <= COMPRESSED_MAX_BATCH:
                indptr, indices, values, vcode = _prepared(mat)
                M, K = mat.shape
                xcode = _CODE[x2d.dtype]
                sc = None if mat.scales is None else mat.scales.numpy()
                b = None if bias is None else bias.numpy()
                _C.csrq_linear(indptr, indices, values, vcode, sc, _np(x2d), xcode, b, _np(out),
                               xcode, M, K, get_num_threads())
                return
            # BSR, or a batch the tiled float kernels serve faster: decode once (cached)
            # (x is fp32 or the stored float dtype, which decoding keeps: see supports)
            mat = mat.decoded()
        indptr, indices, values, vcode = _prepared(mat)
        xcode = _CODE[x2d.dtype]
        M, K = mat.shape
        b = None if bias is None else bias.numpy()
        if type(mat) is CSRMatrix:
            _C.csr_linear(indptr, indices, values, vcode, _np(x2d), xcode, b, _np(out), xcode,
                          M, K, get_num_threads())
        elif isinstance(mat, BSRMatrix):
            r, c = mat.blocksize
            _C.bsr_linear(indptr, indices, values, vcode, _np(x2d), xcode, b, _np(out), xcode,
                          M, K, r, c, get_num_threads())
        else:
            _C.csr_linear(indptr, indices, values, vcode, _np(x2d), xcode, b, _np(out), xcode,
                          M, K, get_num_threads())


backend = CppBackend()
