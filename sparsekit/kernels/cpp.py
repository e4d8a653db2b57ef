"""C++ CPU backend: ``sparsekit._C.csr_linear`` / ``bsr_linear`` (OpenMP + runtime-dispatched
SIMD: AVX-512 / AVX2+FMA+F16C / portable), fp32 accumulation.

Each matrix is bound once to a ``sparsekit._C.BoundMatrix`` (validated weight buffers, kept
alive by it, sizes, dtype codes, ISA and the planned kernel variant per batch class), cached on
the matrix. A call then passes only the addresses of ``x`` / ``out`` / ``bias``, the batch size
and the thread count: no numpy views or array conversions per call, so a small layer's call
costs about a microsecond over the kernel. The first call of a batch class plans the kernel
variant (:mod:`sparsekit.kernels.planner`) before computing. The arrays this module hands over
are checked by the caller (:func:`sparsekit.functional.launch_linear` allocates ``out`` and
makes ``x`` contiguous); the structure was validated when the matrix was built.

Complexity: O(nnz * N) multiply-adds (BSR: O(nnz_blocks * r * c * N)), weights streamed once
per call for N <= 64, plus O(N * K) to pack activations when N > 1.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..formats import BSRMatrix, CSRMatrix
from ..threads import get_num_threads
from . import planner as _planner

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


_XCODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BOUND_KEY = ("cpp", "bound")
#: Cache key of the matrix's launcher (:func:`bound_launcher`).
LAUNCHER_KEY = ("cpp", "launcher")


def _prepared(mat: Any) -> tuple:
    """(indptr, indices, values, value_code) numpy views of a compressed matrix, cached on it."""

    def build() -> tuple:
        return (mat.indptr.numpy(), mat.indices.numpy(), _np(mat.values),
                _QCODE[mat.values.dtype])

    return mat.cached(("cpp", "np"), build)


_QBOUND_KEY = ("cpp", "bound_q")


def compressed_bound(mat: Any) -> Any:
    """The ``sparsekit._C.BoundMatrix`` (format ``"csrq"``) of a compressed CPU CSR matrix
    (int8 values and/or delta8 indices), built once and cached on it. Its variants
    (``csrq_rows2``, ``csrq_row1``, ``csrq_bitmap``) serve batches up to
    :data:`COMPRESSED_MAX_BATCH`, planned like the float kernels'."""
    if _C is None:
        raise RuntimeError(f"cpp backend unavailable: {_IMPORT_ERROR}")

    def build() -> Any:
        m, k = mat.shape
        indptr, indices, values, vcode = _prepared(mat)
        sc = None if mat.scales is None else mat.scales.numpy()
        return _C.BoundMatrix("csrq", indptr, indices, values, vcode, m, k, 1, 1, "auto", sc)

    return mat.cached(_QBOUND_KEY, build)


def planned_binding(mat: Any, n: int) -> tuple[Any, Any]:
    """``(matrix, bound)`` that a CPU call of ``mat`` with batch ``n`` runs on: the compressed
    binding for a compressed CSR matrix at ``n <= COMPRESSED_MAX_BATCH``, else the float binding
    of ``mat`` (decoded once when compressed)."""
    if mat.is_compressed:
        if type(mat) is CSRMatrix and n <= COMPRESSED_MAX_BATCH:
            return mat, compressed_bound(mat)
        mat = mat.decoded()
    return mat, bound_matrix(mat)


def bound_matrix(mat: Any) -> Any:
    """The ``sparsekit._C.BoundMatrix`` of a CPU CSR/BSR matrix (plain indices, float values),
    built once and cached on it (rebuilt after the matrix's cache is invalidated)."""
    bm = mat.cache_get(_BOUND_KEY)
    if bm is not None:
        return bm
    if _C is None:
        raise RuntimeError(f"cpp backend unavailable: {_IMPORT_ERROR}")

    def build() -> Any:
        m, k = mat.shape
        if isinstance(mat, BSRMatrix):
            r, c = mat.blocksize
            return _C.BoundMatrix("bsr", mat.indptr.numpy(), mat.indices.numpy(), _np(mat.values),
                                  _CODE[mat.values.dtype], m, k, r, c)
        return _C.BoundMatrix("csr", mat.indptr.numpy(), mat.indices.numpy(), _np(mat.values),
                              _CODE[mat.values.dtype], m, k)

    return mat.cached(_BOUND_KEY, build)


def run_bound(bm: Any, mat: Any, x2d: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor, act: int = 0) -> None:
    """``out = act(x2d @ W.T + bias)`` through the bound matrix ``bm`` of ``mat`` (same contract
    as :meth:`CppBackend.linear`; ``act`` the kernels' activation code, 0 = none); plans the
    batch class on its first call."""
    n = x2d.shape[0]
    threads = get_num_threads()
    xp, op, xc = x2d.data_ptr(), out.data_ptr(), _XCODE[x2d.dtype]
    bp = 0 if bias is None else bias.data_ptr()
    if not bm.run(xp, op, n, xc, bp, threads, -1, -1, act):
        # first call of this batch class: nothing ran; plan, then run the
        # planned variant (so every call of the class gives bit-identical results)
        _planner.plan_bound(mat, bm, n, threads)
        bm.run(xp, op, n, xc, bp, threads, -1, -1, act)


def bound_launcher(mat: Any, bm: Any):
    """A function ``launch(x, bias, act=0) -> Tensor | None`` computing ``act(x @ W.T + bias)``
    (``act`` the kernels' activation code, 0 = none) through the
    bound matrix ``bm`` of ``mat`` for the common call only, with everything per-matrix resolved
    once: ``x`` a C-contiguous CPU (..., K) tensor with N >= 1 rows, of dtype float32 or the
    weight's value dtype; ``bias`` None or a contiguous (M,) float32 CPU tensor. For anything
    else it returns None without computing, and the caller takes the general path (which checks
    and raises).

    The caller decides that no autograd graph is needed. The result and the variant that runs are
    those of :func:`run_bound` (same kernel call, same planned variant, same thread count), so
    both paths give bit-identical results. The launcher holds no mutable state.
    """
    M, K = mat.shape
    run = bm.runner()  # METH_FASTCALL builtin: no pybind11 dispatch per call
    f32 = torch.float32
    codes = {f32: 0, mat.values.dtype: _XCODE[mat.values.dtype]}
    # N=1 outputs come from empty_like of a template: cheaper than parsing a shape per call
    with torch.inference_mode(False):
        templates = {dt: torch.empty((1, M), dtype=dt, device="cpu") for dt in codes}
    bias_shape = (M,)
    empty_like = torch.empty_like
    num_threads = get_num_threads
    plan = _planner.plan_bound
    Tensor = torch.Tensor

    def launch(x: torch.Tensor, bias: torch.Tensor | None, act: int = 0) -> torch.Tensor | None:
        xdt = x.dtype
        code = codes.get(xdt)
        shape = x.shape
        if code is None or not shape or shape[-1] != K or not x.is_cpu \
                or not x.is_contiguous():
            return None
        if bias is None:
            bp = 0
        elif isinstance(bias, Tensor) and bias.dtype is f32 and bias.shape == bias_shape \
                and bias.is_cpu and bias.is_contiguous():
            bp = bias.data_ptr()
        else:
            return None
        if len(shape) == 2:
            n = shape[0]
            if n == 1:
                out = empty_like(templates[xdt])
            elif n:
                out = x.new_empty(n, M)
            else:
                return None
        else:  # (..., K) contiguous is (n, K) in memory: no reshape needed
            n = x.numel() // K if K else 0
            if not n:
                return None
            out = x.new_empty((*shape[:-1], M))
        threads = num_threads()
        xp = x.data_ptr()
        op = out.data_ptr()
        if not run(xp, op, n, code, bp, threads, act):
            plan(mat, bm, n, threads)  # first call of this batch class (see run_bound)
            run(xp, op, n, code, bp, threads, act)
        return out

    return launch


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
                run_bound(compressed_bound(mat), mat, x2d, bias, out)
                return
            # BSR, or a batch the tiled float kernels serve faster: decode once (cached)
            # (x is fp32 or the stored float dtype, which decoding keeps: see supports)
            mat = mat.decoded()
        bm = mat.cache_get(_BOUND_KEY)
        if bm is None:
            bm = bound_matrix(mat)
        run_bound(bm, mat, x2d, bias, out)

    def variant(self, mat: Any, n: int) -> str:
        """Name of the kernel variant planned for ``mat`` at batch size ``n`` (``"auto"``
        when none yet)."""
        _, bm = planned_binding(mat, n)
        cls = bm.n_class(n)
        vid = bm.get_variant(cls)
        if vid < 0:
            return "auto"
        name = _planner.variants()[vid]["name"]
        isa = bm.get_isa(cls)
        return name if isa == bm.isa else f"{name}@{isa}"


backend = CppBackend()
