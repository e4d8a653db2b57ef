"""The one call path from Python to the kernels: argument planning + torch.library ops.

Every entry point -- :func:`sparsekit.linear`, :class:`sparsekit.nn.SparseLinear` and the custom
ops -- goes through :func:`plan_linear` (check ``x`` and ``bias`` once, choose the dtype the
kernel computes in) and :func:`launch_linear` (allocate the output, pick the backend, launch),
so they accept and reject exactly the same inputs. This module sits below :mod:`sparsekit.nn`
and :mod:`sparsekit.functional` and imports only :mod:`sparsekit.formats` and
:mod:`sparsekit.kernels`.

Registering the sparse products as custom ops (instead of calling the kernels from Python
inside ``forward``) is what lets ``torch.compile(..., fullgraph=True)`` trace a model that
contains SparseLinear without graph breaks, and ``torch.export`` produce a program in which
the compressed buffers (int32 indptr, uint16/int32 indices, float values) are ordinary graph
inputs.

Ops (all functional, ``mutates_args=()``)::

    sparsekit::csr_linear(x, indptr, indices, values, bias?, out_features, in_features,
                          backend="auto") -> Tensor
    sparsekit::bsr_linear(x, indptr, indices, values, bias?, out_features, in_features,
                          block_r, block_c, backend="auto") -> Tensor
    sparsekit::csr_transpose(indptr, indices, values, n_rows, n_cols) -> (Tensor, Tensor, Tensor)
    sparsekit::bsr_transpose(indptr, indices, values, n_rows, n_cols, block_r, block_c)
        -> (Tensor, Tensor, Tensor)

``*_linear`` compute ``x @ W.T + bias`` for ``x`` of shape ``(..., in_features)``; the output
has shape ``(..., out_features)`` and ``x``'s dtype. The sparse weight is frozen: autograd
returns gradients for ``x`` (the transposed sparse product, using ``*_transpose``) and for
``bias``, never for the compressed arrays. ``*_transpose`` have static output shapes (the
transpose has the same number of stored entries), so they trace under fake tensors; their eager
implementation caches the result per weight (keyed on the identity and version counters of the
input tensors), so repeated backward passes transpose once.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from sparsekit.formats import BSRMatrix, CSRMatrix, _index_dtype_for, _indptr_dtype_for
from sparsekit.kernels import select_backend
from sparsekit.kernels.cpp import _BOUND_KEY as _CPP_BOUND
from sparsekit.kernels.cpp import LAUNCHER_KEY
from sparsekit.kernels.cpp import bound_launcher as _cpp_bound_launcher
from sparsekit.kernels.cpp import run_bound as _cpp_run_bound

__all__ = [
    "FLOAT_DTYPES",
    "plan_linear",
    "launch_linear",
    "linear_matrix",
    "fast_launcher",
    "LAUNCHER_KEY",
    "register_matrix",
    "matrix_from_parts",
    "csr_linear",
    "bsr_linear",
    "csr_linear_compressed",
    "bsr_linear_compressed",
    "linear_compressed_op",
    "ACTIVATIONS",
    "activation_code",
    "csr_transpose",
    "bsr_transpose",
]

#: Value dtypes the kernels store, and the activation dtypes they take.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)

#: Activation functions a layer can fuse into its product (``act(x @ W.T + bias)``): the C++
#: kernels apply them to each output in fp32 before its conversion to x's dtype (one pass and
#: one module call less); the other backends apply them to the result.
ACTIVATIONS = ("relu",)
_ACTIVATION_CODE = {None: 0, "relu": 1}  # the C++ codes (SpmmParams::activation)


def activation_code(activation: str | None) -> int:
    """The kernels' code of ``activation`` (None or a name in :data:`ACTIVATIONS`); raises
    ``ValueError`` for anything else."""
    code = _ACTIVATION_CODE.get(activation) if activation is None or isinstance(
        activation, str) else None
    if code is None:
        raise ValueError(
            "activation: expected None or one of "
            f"{', '.join(map(repr, ACTIVATIONS))}, got {activation!r}"
        )
    return code


# --------------------------------------------------------------------------------------------
# check -> plan -> allocate -> launch
# --------------------------------------------------------------------------------------------


def _x_error(x: Tensor, in_features: int) -> Exception:
    if x.dim() == 0 or x.shape[-1] != in_features:
        return ValueError(
            f"x: expected last dimension == weight in_features = {in_features}, "
            f"got shape {tuple(x.shape)}"
        )
    return TypeError(
        f"x: expected dtype float32, bfloat16 or float16, got {x.dtype} "
        "(sparsekit computes in fp32; convert with x.float())"
    )


def plan_linear(
    x: Tensor, in_features: int, out_features: int, values: Tensor, bias: Tensor | None
) -> tuple[torch.dtype, Tensor | None]:
    """Check ``x`` and ``bias`` for ``x @ W.T + bias``; return the kernel's activation dtype
    and the bias as the kernels take it (fp32, contiguous) or None.

    ``values`` is the weight's value tensor (its dtype and device are what matter; fake
    tensors are fine, so the ops' fake implementations run the same checks). Rules, identical
    for every entry point: ``x`` of shape ``(..., in_features)`` and dtype float32, bfloat16
    or float16 on the weight's device; fp32 ``x`` and half ``x`` matching the weight's dtype go
    to the kernel as they are, other half ``x`` is computed in fp32 and rounded back; ``bias``
    of shape ``(out_features,)``, dtype float32/bfloat16/float16, on ``x``'s device.
    """
    xdt = x.dtype
    shape = x.shape
    if not shape or shape[-1] != in_features or xdt not in FLOAT_DTYPES:
        raise _x_error(x, in_features)
    if x.device != values.device:
        raise ValueError(
            f"x: expected a tensor on the weight's device {values.device}, got {x.device}"
        )
    cdt = xdt if (xdt is torch.float32 or xdt is values.dtype) else torch.float32
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (out_features,):
            raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected a tensor on {x.device}, got {bias.device}")
        if bias.dtype is not torch.float32:
            if bias.dtype not in _HALF:
                raise TypeError(
                    f"bias: expected dtype float32, bfloat16 or float16, got {bias.dtype}"
                )
            bias = bias.float()
        if not bias.is_contiguous():
            bias = bias.contiguous()
    return cdt, bias


def launch_linear(x: Tensor, mat: CSRMatrix | BSRMatrix, bias: Tensor | None, backend: str,
                  cdt: torch.dtype, act: int = 0) -> Tensor:
    """Allocate and launch ``act(x @ mat.T + bias)`` for arguments :func:`plan_linear` accepted.

    ``x`` (..., K) on the weight's device, ``bias`` fp32 contiguous (M,) or None, ``cdt`` the
    activation dtype the kernel takes, ``act`` an :func:`activation_code`. The result has x's
    dtype. A 0-row ``x`` launches nothing but still validates the backend name.
    """
    M, K = mat._shape
    shape = x.shape
    # reshape only when needed: a no-op reshape still costs microseconds at N=1
    x2d = x if len(shape) == 2 else x.reshape(-1, K)
    if cdt != x2d.dtype:
        x2d = x2d.to(cdt)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    N = x2d.shape[0]
    # new_empty inherits dtype/device and parses fewer arguments (~1 us cheaper at N=1)
    out = x2d.new_empty((N, M))
    # cpp fast path: a matrix already bound to the C++ kernels (by an earlier "auto" call)
    # skips backend selection; the bound call passes only addresses
    bound = mat.cache_get(_CPP_BOUND) if backend == "auto" and N else None
    if bound is not None and x2d.is_cpu:
        _cpp_run_bound(bound, mat, x2d, bias, out, act)
        if mat.cache_get(LAUNCHER_KEY) is None:
            # from now on the entry points' fast paths (fast_launcher) skip this function
            mat.cache_put(LAUNCHER_KEY, _cpp_bound_launcher(mat, bound))
    else:
        be = select_backend(mat, x2d, backend) if N or backend != "auto" else None
        if N:
            be.linear(mat, x2d, bias, out)
            if act:  # the backends' protocol has no epilogue: applied to the fresh result
                torch.relu_(out)
    if cdt != x.dtype:
        out = out.to(x.dtype)
    return out if len(shape) == 2 else out.reshape(*shape[:-1], M)


def fast_launcher(mat: CSRMatrix | BSRMatrix):
    """The launcher of ``mat`` once its C++ binding exists (after its second "auto" call on the
    CPU), else None: ``launch(x, bias, act=0)`` returns ``act(x @ mat.T + bias)`` (``act`` an
    :func:`activation_code`) for a plain contiguous 2-D
    CPU ``x`` of a dtype the kernel takes as is and a float32 contiguous ``bias`` (or None),
    and None for anything else. Callers use it only where no autograd graph is needed and
    ``backend == "auto"``, and fall back to :func:`plan_linear` + :func:`launch_linear` on None,
    so every argument check and error message stays theirs; the result is the one
    :func:`launch_linear` gives (same kernel variant, bit for bit)."""
    return mat.cache_get(LAUNCHER_KEY)


def linear_matrix(x: Tensor, mat: CSRMatrix | BSRMatrix, bias: Tensor | None,
                  backend: str = "auto", act: int = 0) -> Tensor:
    """Eager ``act(x @ mat.T + bias)`` without autograd: plan, then launch (the thin path);
    ``act`` an :func:`activation_code`."""
    M, K = mat._shape
    cdt, bias = plan_linear(x, K, M, mat.values, bias)
    if x.requires_grad:
        x = x.detach()
    return launch_linear(x, mat, bias, backend, cdt, act)


# --------------------------------------------------------------------------------------------
# matrices behind the ops' raw tensors
# --------------------------------------------------------------------------------------------

# Registered matrices: (id(indptr), id(indices), id(values)) -> weakref(matrix). Only weak
# references: a matrix is owned by its module (SparseLinear), and the backends' derived data in
# its cache may reference the buffers, so a strong global reference would keep every weight
# alive forever.
_MATS: dict[tuple[int, int, int], weakref.ref] = {}
_MATS_LOCK = threading.Lock()


def register_matrix(mat: CSRMatrix | BSRMatrix) -> None:
    """Let the ops reuse ``mat`` (and the backends' per-matrix cached data) whenever they are
    called with exactly its three tensors. The caller must keep ``mat`` alive."""
    key = (id(mat.indptr), id(mat.indices), id(mat.values))

    def _drop(ref, key=key):
        with _MATS_LOCK:
            if _MATS.get(key) is ref:
                del _MATS[key]

    mat.cache_sync()
    with _MATS_LOCK:
        _MATS[key] = weakref.ref(mat, _drop)


def matrix_from_parts(
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    shape: tuple[int, int],
    blocksize: tuple[int, int] | None,
) -> CSRMatrix | BSRMatrix:
    """The CSRMatrix/BSRMatrix for already-validated arrays, without re-validating.

    The arrays were validated when the SparseLinear (or file) was built; re-validating on every
    forward would cost O(nnz) per call, comparable to the product itself at batch 1. If the
    arrays belong to a registered matrix, that object is returned so the backends' cached data
    survives across calls (dropped if a buffer was modified in place).
    """
    ref = _MATS.get((id(indptr), id(indices), id(values)))
    mat = ref() if ref is not None else None
    if (
        mat is not None
        and mat.indptr is indptr
        and mat.indices is indices
        and mat.values is values
        and mat._shape == tuple(shape)
        and getattr(mat, "_blocksize", None) == blocksize
    ):
        mat.cache_sync()
        return mat
    if blocksize is None:
        return CSRMatrix._from_parts(indptr, indices, values, shape)
    return BSRMatrix._from_parts(indptr, indices, values, shape, blocksize)


def _versions(tensors: tuple[Tensor, ...]) -> tuple[int | None, ...]:
    # inference tensors have no version counter (reading it raises: ~10 us per tensor per call)
    return tuple(None if t.is_inference() else t._version for t in tensors)


def _run_linear(x, indptr, indices, values, bias, out_features, in_features, blocksize,
                backend) -> Tensor:
    """The eager implementation of both linear ops."""
    mat = matrix_from_parts(indptr, indices, values, (out_features, in_features), blocksize)
    cdt, bias = plan_linear(x, in_features, out_features, values, bias)
    return launch_linear(x, mat, bias, backend, cdt)


def _fake_linear(x, values, bias, out_features, in_features) -> Tensor:
    plan_linear(x, in_features, out_features, values, bias)
    return x.new_empty((*x.shape[:-1], out_features))


# --------------------------------------------------------------------------------------------
# transposes (for backward); cached per weight in eager mode
# --------------------------------------------------------------------------------------------

_T_CACHE: dict[tuple, tuple] = {}
_T_LOCK = threading.Lock()


def _cache_get(key: tuple, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
    with _T_LOCK:
        ent = _T_CACHE.get(key)
    if ent is None:
        return None
    refs, versions, ptrs, result = ent
    for r, t, v, p in zip(refs, tensors, versions, ptrs):
        # Identity (not just id(): ids are reused after garbage collection), in-place
        # modification (version counter) and storage swap (data_ptr) all invalidate.
        if r() is not t or _versions((t,))[0] != v or t.data_ptr() != p:
            return None
    return result


def _cache_put(key: tuple, tensors: tuple[Tensor, ...], result: tuple[Tensor, ...]) -> None:
    def _drop(_ref, key=key):
        with _T_LOCK:
            _T_CACHE.pop(key, None)

    refs = tuple(weakref.ref(t, _drop) for t in tensors)
    with _T_LOCK:
        _T_CACHE[key] = (
            refs,
            _versions(tensors),
            tuple(t.data_ptr() for t in tensors),
            result,
        )


def _transpose_cached(
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    shape: tuple[int, int],
    blocksize: tuple[int, int] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    tensors = (indptr, indices, values)
    key = ("T", *(id(t) for t in tensors), shape, blocksize)
    res = _cache_get(key, tensors)
    if res is None:
        t = matrix_from_parts(indptr, indices, values, shape, blocksize).transpose()
        res = (t.indptr, t.indices, t.values)
        _cache_put(key, tensors, res)
    # Custom-op outputs must not alias each other or live state: hand out copies (a memcpy,
    # far cheaper than the sort the cache saves).
    return tuple(t.clone() for t in res)


@torch.library.custom_op("sparsekit::csr_transpose", mutates_args=())
def csr_transpose(
    indptr: Tensor, indices: Tensor, values: Tensor, n_rows: int, n_cols: int
) -> tuple[Tensor, Tensor, Tensor]:
    """CSR arrays of ``W.T`` (shape ``(n_cols, n_rows)``) for ``W`` of shape ``(n_rows, n_cols)``.

    O(nnz log nnz) sort-based transpose; never materialises a dense matrix.
    """
    return _transpose_cached(indptr, indices, values, (n_rows, n_cols), None)


@csr_transpose.register_fake
def _csr_transpose_fake(indptr, indices, values, n_rows, n_cols):
    return (
        indptr.new_empty((n_cols + 1,), dtype=_indptr_dtype_for(indices.shape[0])),
        indices.new_empty((indices.shape[0],), dtype=_index_dtype_for(n_rows)),
        values.new_empty(values.shape),
    )


@torch.library.custom_op("sparsekit::bsr_transpose", mutates_args=())
def bsr_transpose(
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    n_rows: int,
    n_cols: int,
    block_r: int,
    block_c: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """BSR arrays of ``W.T`` (blocksize ``(block_c, block_r)``) for BSR ``W`` of shape
    ``(n_rows, n_cols)`` with blocksize ``(block_r, block_c)``. O(nnzb log nnzb + nnz)."""
    return _transpose_cached(indptr, indices, values, (n_rows, n_cols), (block_r, block_c))


@bsr_transpose.register_fake
def _bsr_transpose_fake(indptr, indices, values, n_rows, n_cols, block_r, block_c):
    mb = -(-n_rows // block_r)
    kb = -(-n_cols // block_c)
    return (
        indptr.new_empty((kb + 1,), dtype=_indptr_dtype_for(indices.shape[0])),
        indices.new_empty((indices.shape[0],), dtype=_index_dtype_for(mb)),
        values.new_empty((values.shape[0], block_c, block_r)),
    )


# --------------------------------------------------------------------------------------------
# linear ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("sparsekit::csr_linear", mutates_args=())
def csr_linear(
    x: Tensor,
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    backend: str = "auto",
) -> Tensor:
    """``x @ W.T + bias`` for CSR ``W`` of shape ``(out_features, in_features)``.

    ``x``: ``(..., in_features)`` floating point; returns ``(..., out_features)`` in ``x.dtype``.
    Cost O(N * nnz) multiply-adds for N rows of ``x``, fp32 accumulation.
    """
    return _run_linear(x, indptr, indices, values, bias, out_features, in_features, None,
                       backend)


@csr_linear.register_fake
def _csr_linear_fake(x, indptr, indices, values, bias, out_features, in_features, backend="auto"):
    return _fake_linear(x, values, bias, out_features, in_features)


@torch.library.custom_op("sparsekit::bsr_linear", mutates_args=())
def bsr_linear(
    x: Tensor,
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    block_r: int,
    block_c: int,
    backend: str = "auto",
) -> Tensor:
    """``x @ W.T + bias`` for BSR ``W`` (blocksize ``(block_r, block_c)``); as csr_linear."""
    return _run_linear(x, indptr, indices, values, bias, out_features, in_features,
                       (block_r, block_c), backend)


@bsr_linear.register_fake
def _bsr_linear_fake(
    x, indptr, indices, values, bias, out_features, in_features, block_r, block_c, backend="auto"
):
    return _fake_linear(x, values, bias, out_features, in_features)


def _run_linear_compressed(x, indptr, indices, values, scales, bias, out_features, in_features,
                           blocksize, backend) -> Tensor:
    mat = matrix_from_parts(indptr, indices, values, (out_features, in_features), blocksize)
    if mat.scales is not scales:
        # a matrix over these three buffers but other scales (or none): derived data is stale
        mat.cache_invalidate()
        mat._set_compression(scales)
    if not mat.is_compressed:
        raise ValueError("values/indices: expected int8 values or uint8 (delta8) indices for "
                         f"the compressed op, got {values.dtype} values and {indices.dtype} "
                         "indices (use csr_linear / bsr_linear)")
    cdt, bias = plan_linear(x, in_features, out_features, values, bias)
    return launch_linear(x.detach(), mat, bias, backend, cdt)


@torch.library.custom_op("sparsekit::csr_linear_compressed", mutates_args=())
def csr_linear_compressed(
    x: Tensor,
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    scales: Tensor | None,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    backend: str = "auto",
) -> Tensor:
    """``x @ W.T + bias`` for a compressed CSR ``W``: int8 ``values`` with per-row fp32
    ``scales`` (``W[i, j] = values * scales[i]``), and/or uint8 delta8 ``indices`` (column gaps
    with escape entries, see :mod:`sparsekit.formats`). As :func:`csr_linear`, but the weight
    is inference-only: no gradient flows to ``x`` (the int8 weight is a deployment format).
    """
    return _run_linear_compressed(x, indptr, indices, values, scales, bias, out_features,
                                  in_features, None, backend)


@csr_linear_compressed.register_fake
def _csr_linear_compressed_fake(x, indptr, indices, values, scales, bias, out_features,
                                in_features, backend="auto"):
    return _fake_linear(x, values, bias, out_features, in_features)


@torch.library.custom_op("sparsekit::bsr_linear_compressed", mutates_args=())
def bsr_linear_compressed(
    x: Tensor,
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    scales: Tensor | None,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    block_r: int,
    block_c: int,
    backend: str = "auto",
) -> Tensor:
    """``x @ W.T + bias`` for a compressed BSR ``W``; as :func:`csr_linear_compressed`."""
    return _run_linear_compressed(x, indptr, indices, values, scales, bias, out_features,
                                  in_features, (block_r, block_c), backend)


@bsr_linear_compressed.register_fake
def _bsr_linear_compressed_fake(x, indptr, indices, values, scales, bias, out_features,
                                in_features, block_r, block_c, backend="auto"):
    return _fake_linear(x, values, bias, out_features, in_features)


def linear_compressed_op(x: Tensor, indptr: Tensor, indices: Tensor, values: Tensor,
                         scales: Tensor | None, bias: Tensor | None, out_features: int,
                         in_features: int, blocksize: tuple[int, int] | None,
                         backend: str = "auto") -> Tensor:
    """The compressed op for a CSR (``blocksize`` None) or BSR weight's arrays: the one call
    that :class:`sparsekit.nn.SparseLinear` and :func:`sparsekit.linear` trace."""
    args = (x, indptr, indices, values, scales, bias, out_features, in_features)
    if blocksize is None:
        return csr_linear_compressed(*args, backend)
    return bsr_linear_compressed(*args, *blocksize, backend)


# --------------------------------------------------------------------------------------------
# autograd: d/dx (x @ W.T) = grad @ W = linear(grad, W.T); W frozen
# --------------------------------------------------------------------------------------------


def _setup_ctx_common(ctx, inputs, n_fixed: int):
    x, indptr, indices, values, bias = inputs[:5]
    ctx.save_for_backward(indptr, indices, values)
    ctx.scalars = inputs[5:]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.x_dtype = x.dtype


def _bias_grad(ctx, grad: Tensor, out_features: int):
    if ctx.bias_dtype is None or not ctx.needs_input_grad[4]:
        return None
    return grad.reshape(-1, out_features).sum(0, dtype=torch.float32).to(ctx.bias_dtype)


def _csr_setup_context(ctx, inputs, output):
    _setup_ctx_common(ctx, inputs, 3)


def _csr_backward(ctx, grad):
    indptr, indices, values = ctx.saved_tensors
    out_features, in_features, backend = ctx.scalars
    grad_x = None
    if ctx.needs_input_grad[0]:
        ip_t, ix_t, v_t = csr_transpose(indptr, indices, values, out_features, in_features)
        grad_x = csr_linear(grad, ip_t, ix_t, v_t, None, in_features, out_features, backend)
        grad_x = grad_x.to(ctx.x_dtype)
    return grad_x, None, None, None, _bias_grad(ctx, grad, out_features), None, None, None


csr_linear.register_autograd(_csr_backward, setup_context=_csr_setup_context)


def _bsr_setup_context(ctx, inputs, output):
    _setup_ctx_common(ctx, inputs, 5)


def _bsr_backward(ctx, grad):
    indptr, indices, values = ctx.saved_tensors
    out_features, in_features, block_r, block_c, backend = ctx.scalars
    grad_x = None
    if ctx.needs_input_grad[0]:
        ip_t, ix_t, v_t = bsr_transpose(
            indptr, indices, values, out_features, in_features, block_r, block_c
        )
        grad_x = bsr_linear(
            grad, ip_t, ix_t, v_t, None, in_features, out_features, block_c, block_r, backend
        )
        grad_x = grad_x.to(ctx.x_dtype)
    grad_b = _bias_grad(ctx, grad, out_features)
    return grad_x, None, None, None, grad_b, None, None, None, None, None


bsr_linear.register_autograd(_bsr_backward, setup_context=_bsr_setup_context)
