"""Numba CPU backend: CSR and BSR ``linear`` kernels (the fallback when ``sparsekit._C`` is
missing, so it accepts everything the C++ backend accepts).

Design
------
* ``nopython``, ``nogil``, ``parallel`` (``prange`` over nnz-balanced row chunks, one chunk per
  thread), ``cache=True`` (compiled machine code is reused across processes), fp32 accumulation.
  Kernels are compiled lazily on first use, never at import.
* Half-precision values: Numba's CPU target has no float16/bfloat16 type, so the value buffer is
  passed as raw 16-bit words and decoded to fp32 in registers inside the inner loop:
  bfloat16 as ``uint16`` (``bits << 16`` reinterpreted as fp32: exact, one shift) and float16 as
  ``int16`` (branch-light bit conversion handling subnormals, Inf, NaN: exact). The array
  element type selects the decoder at compile time. We decode in-kernel rather than keep a
  cached fp32 copy because a copy doubles the weight's memory (and the memory traffic the
  packed format exists to save); the decode costs a couple of integer ops per nonzero.
* Activations: the kernels take fp32 ``x``; bf16/fp16 activations are converted to fp32 once
  per call (O(N*K)), and a bf16/fp16 output is rounded from an fp32 buffer by torch (RNE).
* N == 1 uses a gather-dot kernel per row. N > 1 uses ``xT`` (K, N) contiguous, so the inner
  loop over the batch is contiguous and vectorises; each nonzero is loaded once per call.
* Threading layer: see :func:`configure_threading`. Thread count: ``sparsekit.threads``.

Complexity: O(nnz * N) flops (BSR: O(nnz_blocks * r * c * N)), plus O(N * (K + M)) for the
activation/output layout conversion when N > 1.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np
import torch

from ..formats import BSRMatrix, CSRMatrix
from ..threads import get_num_threads

try:
    import numba
    from llvmlite import ir as _llir
    from numba import njit, prange
    from numba.core import types as _nbtypes
    from numba.extending import intrinsic, overload

    _IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - exercised only where numba is broken/missing
    numba = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"numba is not importable: {type(e).__name__}: {e}"

_ROW_COST = 2  # relative cost of visiting a (possibly empty) row, in nonzeros, for balancing
_FASTMATH = {"reassoc", "contract"}  # allow vectorised reductions + FMA; keep NaN/Inf semantics

# --------------------------------------------------------------------------- threading layer
_layer_lock = threading.Lock()
_layer_configured = False
_layer_name = ""
_launch_lock: threading.Lock | None = None  # only used with the (non thread-safe) workqueue
_forked_after_omp = False  # this process was forked after GNU OpenMP was initialised
_fork_warned = False
_serial_kernels: dict = {}


def _after_fork_in_child() -> None:
    # GNU OpenMP cannot be used in a child forked after the parent started its thread pool
    # (numba aborts the child on the next parallel launch), so such children run serial
    # versions of the kernels instead; see configure_threading.
    global _forked_after_omp
    if _layer_configured and _layer_name == "omp":
        _forked_after_omp = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pick_layer() -> str:
    for name, mod in (("omp", "numba.np.ufunc.omppool"), ("tbb", "numba.np.ufunc.tbbpool")):
        try:
            __import__(mod)
            return name
        except Exception:
            continue
    return "workqueue"


def configure_threading() -> str:
    """Select a Numba threading layer safe under concurrent calls; returns the layer name.

    Numba's ``workqueue`` layer aborts the process when two Python threads launch parallel
    kernels at once, so before our first parallel launch we set ``numba.config.THREADING_LAYER``
    to ``omp`` (this numba wheel ships the OpenMP pool; with GNU OpenMP it is not fork-safe
    *after* first use: fork workers before the first call, or use spawn) or else ``tbb``.
    A user-set ``NUMBA_THREADING_LAYER`` is respected. If only workqueue is available, or the
    layer was already fixed to workqueue by earlier Numba use in the process, our launches are
    serialised with a lock instead (correct, but calls from several threads do not overlap).

    Fork: a child forked *after* the parent ran an OpenMP-parallel kernel cannot use the
    OpenMP pool (numba would abort it), so there the backend switches to serial builds of the
    same kernels (compiled on first use in the child, uncached) and warns once. Forking
    before the first call (the usual pre-fork server pattern) keeps full parallelism.
    """
    global _layer_configured, _launch_lock, _layer_name
    if _layer_configured:
        return _layer_name
    with _layer_lock:
        if _layer_configured:
            return _layer_name
        from numba.np.ufunc import parallel as _par

        if not getattr(_par, "_is_initialized", False) and not os.environ.get(
            "NUMBA_THREADING_LAYER"
        ):
            numba.config.THREADING_LAYER = _pick_layer()
        # Starting numba's OpenMP pool calls omp_set_num_threads, which also resets torch's
        # intra-op thread count (the same OpenMP ICV): put the user's torch setting back.
        import torch

        torch_threads = torch.get_num_threads()
        _par._launch_threads()
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        layer = numba.threading_layer()
        if layer == "workqueue":
            _launch_lock = threading.Lock()
        _layer_name = str(layer)
        _layer_configured = True
        return layer


# --------------------------------------------------------------------------- kernels
if numba is not None:

    @intrinsic
    def _u32_as_f32(typingctx, u):
        """Reinterpret the low 32 bits of an integer as float32 (LLVM trunc + bitcast, free)."""
        if not isinstance(u, _nbtypes.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            i32 = _llir.IntType(32)
            if u.bitwidth > 32:
                v = builder.trunc(v, i32)
            elif u.bitwidth < 32:
                v = builder.zext(v, i32)
            return builder.bitcast(v, _llir.FloatType())

        return _nbtypes.float32(u), codegen

    @intrinsic
    def _f32_as_u32(typingctx, f):
        """Reinterpret the bits of a float32 as uint32 (LLVM bitcast, free)."""
        if f != _nbtypes.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _llir.IntType(32))

        return _nbtypes.uint32(f), codegen

    @njit(cache=True)
    def _fp16_bits_to_f32(h):
        # IEEE binary16 -> binary32, exact for every input (normal, subnormal, zero, Inf, NaN).
        # Written with selects only (no data-dependent branches): BSR blocks hold many zeros,
        # and a branch on "exponent == 0" would mispredict constantly.
        h = np.uint32(h) & np.uint32(0xFFFF)
        sign = (h & np.uint32(0x8000)) << np.uint32(16)
        em = h & np.uint32(0x7FFF)
        o = (em << np.uint32(13)) + np.uint32(112 << 23)  # rebias exponent 15 -> 127
        o = o + np.uint32(112 << 23) if em >= np.uint32(0x7C00) else o  # Inf/NaN -> exp 255
        sub = np.float32(em) * np.float32(5.9604644775390625e-08)  # zero/subnormal: em * 2**-24
        f = sub if em < np.uint32(0x400) else _u32_as_f32(o)
        return _u32_as_f32(_f32_as_u32(f) | sign)

    def _ld(a, i):  # pragma: no cover - replaced by the overload inside jitted code
        raise NotImplementedError

    @overload(_ld, inline="always")
    def _ld_impl(a, i):
        """Load element i of a value buffer as fp32 (dtype picks the decoder at compile time)."""
        dt = a.dtype
        if dt == _nbtypes.float32:
            return lambda a, i: a[np.uint64(i)]
        if dt == _nbtypes.uint16:  # bfloat16 bits
            return lambda a, i: _u32_as_f32(np.uint32(a[np.uint64(i)]) << np.uint32(16))
        if dt == _nbtypes.int16:  # float16 bits
            return lambda a, i: _fp16_bits_to_f32(np.uint16(a[np.uint64(i)]))
        if dt == _nbtypes.int8:  # quantized (the row scale is applied once per row)
            return lambda a, i: np.float32(a[np.uint64(i)])
        return None

    @njit(parallel=True, nogil=True, cache=True, fastmath=_FASTMATH)
    def _csrq_gemv(indptr, indices, delta, values, scales, x, bias, has_bias, out, bounds):
        # Compressed CSR (sparsekit._compress): indices uint8 gaps (delta=True, the column is
        # the running sum within the row) or uint16/int32 column ids; values f32/u16/i16/i8;
        # scales f32[M] multiplies each row's sum (ones for float values).
        for ch in prange(bounds.shape[0] - 1):
            for i in range(bounds[ch], bounds[ch + 1]):
                acc = np.float32(0.0)
                col = np.uint64(0)
                for j in range(indptr[i], indptr[i + 1]):
                    u = np.uint64(j)
                    if delta:
                        col += np.uint64(indices[u])
                    else:
                        col = np.uint64(indices[u])
                    acc += _ld(values, u) * x[col]
                acc *= scales[i]
                if has_bias:
                    acc += bias[i]
                out[i] = acc

    @njit(parallel=True, nogil=True, cache=True, fastmath=_FASTMATH)
    def _csrq_gemm(indptr, indices, delta, values, scales, xT, bias, has_bias, out, bounds):
        # As _csrq_gemv for xT f32[K, N], out f32[N, M].
        N = xT.shape[1]
        for ch in prange(bounds.shape[0] - 1):
            acc = np.empty(N, np.float32)
            for i in range(bounds[ch], bounds[ch + 1]):
                for n in range(N):
                    acc[n] = np.float32(0.0)
                col = np.uint64(0)
                for j in range(indptr[i], indptr[i + 1]):
                    u = np.uint64(j)
                    if delta:
                        col += np.uint64(indices[u])
                    else:
                        col = np.uint64(indices[u])
                    v = _ld(values, u)
                    for n in range(N):
                        acc[n] += v * xT[col, n]
                b0 = bias[i] if has_bias else np.float32(0.0)
                for n in range(N):
                    out[n, i] = acc[n] * scales[i] + b0

    @njit(parallel=True, nogil=True, cache=True, fastmath=_FASTMATH)
    def _csr_gemv(indptr, indices, values, x, bias, has_bias, out, bounds):
        # indptr int64[M+1], indices uint16|int32[nnz], values f32|u16|i16[nnz], x f32[K],
        # bias f32[M or 1], out f32[M], bounds int64[nchunks+1] (row ranges per chunk).
        # 'reassoc' lets LLVM vectorise the gather-dot with several partial sums; the order
        # depends only on the row length, so results do not depend on the thread count.
        # Indexing with unsigned ints (here and below) drops Numba's negative-index wraparound
        # code from the inner loops, which otherwise blocks vectorisation (measured ~4x).
        for ch in prange(bounds.shape[0] - 1):
            for i in range(bounds[ch], bounds[ch + 1]):
                acc = np.float32(0.0)
                for j in range(indptr[i], indptr[i + 1]):
                    u = np.uint64(j)
                    acc += _ld(values, u) * x[np.uint64(indices[u])]
                if has_bias:
                    acc += bias[i]
                out[i] = acc

    @njit(parallel=True, nogil=True, cache=True, fastmath=_FASTMATH)
    def _csr_gemm(indptr, indices, values, xT, bias, has_bias, out, bounds):
        # xT f32[K, N] C-contiguous, out f32[N, M] C-contiguous. Nonzeros are consumed four at
        # a time so the accumulator row is loaded/stored once per four rows of xT.
        N = xT.shape[1]
        for ch in prange(bounds.shape[0] - 1):
            acc = np.empty(N, np.float32)
            for i in range(bounds[ch], bounds[ch + 1]):
                b0 = bias[i] if has_bias else np.float32(0.0)
                for n in range(N):
                    acc[n] = b0
                j = indptr[i]
                end = indptr[i + 1]
                while j + 4 <= end:
                    v0 = _ld(values, j)
                    v1 = _ld(values, j + 1)
                    v2 = _ld(values, j + 2)
                    v3 = _ld(values, j + 3)
                    c0 = np.uint64(indices[np.uint64(j)])
                    c1 = np.uint64(indices[np.uint64(j + 1)])
                    c2 = np.uint64(indices[np.uint64(j + 2)])
                    c3 = np.uint64(indices[np.uint64(j + 3)])
                    for n in range(N):
                        acc[n] += (v0 * xT[c0, n] + v1 * xT[c1, n]) + (
                            v2 * xT[c2, n] + v3 * xT[c3, n])
                    j += 4
                while j < end:
                    v = _ld(values, j)
                    col = np.uint64(indices[np.uint64(j)])
                    for n in range(N):
                        acc[n] += v * xT[col, n]
                    j += 1
                for n in range(N):
                    out[n, i] = acc[n]

    @njit(parallel=True, nogil=True, cache=True, fastmath=_FASTMATH)
    def _bsr_gemv(indptr, indices, values, x, bias, has_bias, out, bounds, M, K, r, c):
        # values flattened (nnzb*r*c); rows >= M and columns >= K (ragged edges) never touched
        for ch in prange(bounds.shape[0] - 1):
            acc = np.empty(r, np.float32)
            for bi in range(bounds[ch], bounds[ch + 1]):
                row0 = bi * r
                rh = min(r, M - row0)
                for rr in range(rh):
                    acc[rr] = bias[row0 + rr] if has_bias else np.float32(0.0)
                for j in range(indptr[bi], indptr[bi + 1]):
                    col0 = np.int64(indices[np.uint64(j)]) * c
                    cw = min(c, K - col0)
                    base = j * r * c
                    for rr in range(rh):
                        s = np.float32(0.0)
                        o = base + rr * c
                        for cc in range(cw):
                            s += _ld(values, o + cc) * x[np.uint64(col0 + cc)]
                        acc[rr] += s
                for rr in range(rh):
                    out[row0 + rr] = acc[rr]

    @njit(parallel=True, nogil=True, cache=True, fastmath=_FASTMATH)
    def _bsr_gemm(indptr, indices, values, xT, bias, has_bias, out, bounds, M, K, r, c):
        N = xT.shape[1]
        for ch in prange(bounds.shape[0] - 1):
            acc = np.empty((r, N), np.float32)
            for bi in range(bounds[ch], bounds[ch + 1]):
                row0 = bi * r
                rh = min(r, M - row0)
                for rr in range(rh):
                    b0 = bias[row0 + rr] if has_bias else np.float32(0.0)
                    for n in range(N):
                        acc[rr, n] = b0
                for j in range(indptr[bi], indptr[bi + 1]):
                    col0 = np.int64(indices[np.uint64(j)]) * c
                    cw = min(c, K - col0)
                    base = j * r * c
                    for rr in range(rh):
                        o = base + rr * c
                        for cc in range(cw):
                            v = _ld(values, o + cc)
                            xc = np.uint64(col0 + cc)
                            for n in range(N):
                                acc[rr, n] += v * xT[xc, n]
                for rr in range(rh):
                    for n in range(N):
                        out[n, row0 + rr] = acc[rr, n]


# --------------------------------------------------------------------------- host side
def _np_values(t: torch.Tensor) -> np.ndarray:
    """Value buffer as a flat numpy array numba can type (bf16 -> uint16, fp16 -> int16)."""
    t = t.reshape(-1)
    if t.dtype in (torch.float32, torch.int8):
        return t.numpy()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.view(torch.int16).numpy()  # float16


def _np_index(t: torch.Tensor) -> np.ndarray:
    return t.numpy()  # uint16 or int32 (uint8 gaps for delta8)


def _partition(indptr64: np.ndarray, nchunks: int) -> np.ndarray:
    """Row boundaries splitting rows into ``nchunks`` contiguous ranges of ~equal cost
    (nonzeros + a per-row overhead). O(M) once per (matrix, thread count); cached."""
    n_rows = indptr64.shape[0] - 1
    nchunks = max(1, min(nchunks, n_rows))
    cost = indptr64 + _ROW_COST * np.arange(n_rows + 1, dtype=np.int64)
    targets = np.linspace(0, cost[-1], nchunks + 1)
    b = np.searchsorted(cost, targets, side="left").astype(np.int64)
    b[0], b[-1] = 0, n_rows
    return np.maximum.accumulate(b)


def _prepared(mat) -> dict:
    """numpy views of the matrix buffers + int64 indptr, cached on the matrix."""

    def build():
        sc = mat.scales
        return {
            "indptr": mat.indptr.numpy().astype(np.int64),
            "indices": _np_index(mat.indices),
            "values": _np_values(mat.values),
            "scales": (sc.numpy() if sc is not None
                       else np.ones(mat.shape[0], dtype=np.float32)),
        }

    return mat.cached(("numba", "prep"), build)


def _serial(kern):
    """Non-parallel build of a kernel (``prange`` runs as ``range``), for forked children."""
    global _fork_warned
    k = _serial_kernels.get(kern)
    if k is None:
        if not _fork_warned:
            _fork_warned = True
            warnings.warn(
                "sparsekit: this process was forked after Numba's OpenMP thread pool started; "
                "the numba backend runs single-threaded here (fork before the first call, or "
                "use the 'spawn' start method, to keep it parallel)",
                RuntimeWarning,
                stacklevel=4,
            )
        # cache=False: the on-disk cache does not distinguish parallel from serial builds
        k = _serial_kernels[kern] = njit(nogil=True, cache=False, fastmath=_FASTMATH)(
            kern.py_func
        )
    return k


class NumbaCPUBackend:
    """Numba CPU backend object (see module docstring)."""

    name = "numba"

    def available(self) -> bool:
        """True when numba imports."""
        return numba is not None

    def describe(self) -> str:
        """Numba version, or why it is unavailable (the threading layer is only known after the
        first launch; see :func:`configure_threading`)."""
        if numba is None:
            return str(_IMPORT_ERROR)
        return f"numba {numba.__version__}"

    def supports(self, mat: Any, x: torch.Tensor) -> bool:
        """CPU tensors, fp32/bf16/fp16/int8 values, x fp32 or the weight's value dtype."""
        return (
            x.device.type == "cpu"
            and mat.values.device.type == "cpu"
            and (x.dtype == torch.float32 or x.dtype == mat.values.dtype)
        )

    def linear(self, mat: Any, x2d: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor) -> None:
        """out = x2d @ W.T + bias.

        Parameters
        ----------
        mat : CSRMatrix or BSRMatrix, CPU
        x2d : torch.Tensor (N, K) C-contiguous, fp32 or the weight's value dtype
        bias : torch.Tensor (M,) fp32 contiguous, or None
        out : torch.Tensor (N, M) C-contiguous, same dtype as x2d (written, not read)
        """
        if numba is None:
            raise RuntimeError(f"numba backend unavailable: {_IMPORT_ERROR}")
        configure_threading()
        N = x2d.shape[0]
        M, K = mat.shape
        if N == 0:
            return
        compressed = mat.is_compressed
        if compressed and isinstance(mat, BSRMatrix):
            # no BSR kernel reads int8 / delta8 blocks: the decoded float matrix is cached
            mat = mat.decoded()
            compressed = False
        if _forked_after_omp:
            nthreads = 1
        else:
            nthreads = min(get_num_threads(), numba.config.NUMBA_NUM_THREADS)
            numba.set_num_threads(nthreads)  # thread-local in numba: set on every call
        p = _prepared(mat)
        bounds = mat.cached(("numba", "bounds", nthreads),
                             lambda: _partition(p["indptr"], nthreads))
        has_bias = bias is not None
        b = bias.numpy() if has_bias else np.zeros(1, np.float32)
        direct = out.dtype == torch.float32
        o = out if direct else torch.empty(out.shape, dtype=torch.float32)
        is_bsr = isinstance(mat, BSRMatrix)
        if not is_bsr and not isinstance(mat, CSRMatrix):
            raise TypeError(f"weight: expected CSRMatrix or BSRMatrix, got {type(mat).__name__}")
        if compressed:
            delta = mat.index_encoding == "delta8"
            head = (p["indptr"], p["indices"], delta, p["values"], p["scales"])
            if N == 1:
                xv = x2d.reshape(K)
                xv = (xv if xv.dtype == torch.float32 else xv.float()).numpy()
                args = (*head, xv, b, has_bias, o.reshape(M).numpy(), bounds)
                kern = _csrq_gemv
            else:
                xT = x2d.t().contiguous()
                xT = (xT if xT.dtype == torch.float32 else xT.float()).numpy()
                args = (*head, xT, b, has_bias, o.numpy(), bounds)
                kern = _csrq_gemm
        elif N == 1:
            xv = x2d.reshape(K)
            xv = (xv if xv.dtype == torch.float32 else xv.float()).numpy()
            ov = o.reshape(M).numpy()
            args = (p["indptr"], p["indices"], p["values"], xv, b, has_bias, ov, bounds)
            kern = _bsr_gemv if is_bsr else _csr_gemv
        else:
            xT = x2d.t().contiguous()
            xT = (xT if xT.dtype == torch.float32 else xT.float()).numpy()
            args = (p["indptr"], p["indices"], p["values"], xT, b, has_bias, o.numpy(), bounds)
            kern = _bsr_gemm if is_bsr else _csr_gemm
        if is_bsr:
            r, c = mat.blocksize
            args = (*args, M, K, r, c)
        if _forked_after_omp:
            _serial(kern)(*args)
        elif _launch_lock is not None:
            with _launch_lock:
                kern(*args)
        else:
            kern(*args)
        if not direct:
            out.copy_(o)


backend = NumbaCPUBackend()
