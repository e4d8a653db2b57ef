"""torch.library custom ops behind :class:`sparsekit.nn.SparseLinear`.

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

from sparsekit.functional import launch_linear

__all__ = [
    "csr_linear",
    "bsr_linear",
    "csr_transpose",
    "bsr_transpose",
    "FLOAT_DTYPES",
]

#: Value dtypes the kernels store (see docs/design.md).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _index_dtype_for(n: int) -> torch.dtype:
    """Index dtype the formats use for indices in ``[0, n)`` (uint16 if n <= 65536)."""
    from sparsekit.formats import _index_dtype_for as f

    return f(n)


def _indptr_dtype_for(nnz: int) -> torch.dtype:
    from sparsekit.formats import _indptr_dtype_for as f

    return f(nnz)


def _as_int64(t: Tensor) -> Tensor:
    # uint16 supports conversion but few arithmetic ops; do index arithmetic in int64.
    return t.to(torch.int64)


def _check_x(x: Tensor, in_features: int, op: str) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{op}: x: expected shape (..., {in_features}) (last dim = in_features), "
            f"got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{op}: x: expected a floating-point tensor, got dtype {x.dtype}")


# Matrices registered by SparseLinear: (id(indptr), id(indices), id(values)) -> weakref(matrix).
# Only weak references: a matrix is owned by its module (see SparseLinear._registered_matrix);
# the backends' derived data in ``mat._cache`` may reference the buffers, so a strong global
# reference would keep every weight alive forever.
_MATS: dict[tuple[int, int, int], weakref.ref] = {}
_MATS_LOCK = threading.Lock()


def _versions(tensors: tuple[Tensor, ...]) -> tuple[int | None, ...]:
    # inference tensors have no version counter (reading it raises: ~10 us per tensor per call)
    return tuple(None if t.is_inference() else t._version for t in tensors)


def register_matrix(mat) -> None:
    """Let the ops reuse ``mat`` (and the backends' per-matrix cached data) whenever they are
    called with exactly its three tensors. The caller must keep ``mat`` alive."""
    tensors = (mat.indptr, mat.indices, mat.values)
    key = tuple(id(t) for t in tensors)

    def _drop(ref, key=key):
        with _MATS_LOCK:
            if _MATS.get(key) is ref:
                del _MATS[key]

    mat._nn_versions = _versions(tensors)
    with _MATS_LOCK:
        _MATS[key] = weakref.ref(mat, _drop)


def refresh_if_modified(mat) -> None:
    """Drop the backends' cached data of a registered matrix whose buffers were modified in
    place since it was registered (version counters changed)."""
    v = _versions((mat.indptr, mat.indices, mat.values))
    if v != mat._nn_versions:
        mat._invalidate()
        mat._nn_versions = v


def _make_matrix(
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    shape: tuple[int, int],
    blocksize: tuple[int, int] | None,
):
    """The CSRMatrix/BSRMatrix for already-validated arrays, without re-validating.

    The arrays were validated when the SparseLinear (or file) was built; re-validating on every
    forward would cost O(nnz) per call, comparable to the product itself at batch 1. If the
    arrays belong to a registered matrix, that object is returned so the backends' cached data
    (numpy views, partitions, ...) survives across calls; in-place modification of a buffer
    (version counter change) invalidates that data.
    """
    from sparsekit.formats import BSRMatrix, CSRMatrix

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
        refresh_if_modified(mat)
        return mat
    if blocksize is None:
        return CSRMatrix._from_parts(indptr, indices, values, shape)
    return BSRMatrix._from_parts(indptr, indices, values, shape, blocksize)


def _run_linear(
    x: Tensor,
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: tuple[int, int] | None,
    backend: str,
    op: str,
) -> Tensor:
    """The eager implementation of both linear ops."""
    mat = _make_matrix(indptr, indices, values, (out_features, in_features), blocksize)
    return linear_matrix(x, mat, bias, backend, op)


def linear_matrix(x: Tensor, mat, bias: Tensor | None, backend: str, op: str) -> Tensor:
    """check -> choose backend -> allocate -> launch, for ``x`` of shape ``(..., K)``.

    Kept lean: at batch 1 the product of a pruned layer takes microseconds, so every
    avoidable tensor op here shows up in end-to-end latency.
    """
    k = mat.shape[1]
    values = mat.values
    shape = x.shape
    if len(shape) < 1 or shape[-1] != k:
        _check_x(x, k, op)
    if not x.is_floating_point():
        _check_x(x, k, op)
    if x.device != values.device:
        raise ValueError(
            f"{op}: x: expected a tensor on the weight's device {values.device}, got {x.device}"
        )
    xdt = x.dtype
    # Kernels take fp32 activations or activations of the weight's dtype; anything else
    # (float64, or fp16 activations with bf16 weights) is computed in fp32 and cast back, so
    # the output dtype always follows the input.
    cdt = xdt if (xdt is torch.float32 or xdt is values.dtype) else torch.float32
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.to(dtype=torch.float32).contiguous()
    return launch_linear(x, mat, bias, backend, cdt)


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
        t = _make_matrix(indptr, indices, values, shape, blocksize).transpose()
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
    return _run_linear(
        x, indptr, indices, values, bias, out_features, in_features, None, backend,
        "sparsekit::csr_linear",
    )


@csr_linear.register_fake
def _csr_linear_fake(x, indptr, indices, values, bias, out_features, in_features, backend="auto"):
    _check_x(x, in_features, "sparsekit::csr_linear")
    return x.new_empty((*x.shape[:-1], out_features))


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
    return _run_linear(
        x, indptr, indices, values, bias, out_features, in_features, (block_r, block_c),
        backend, "sparsekit::bsr_linear",
    )


@bsr_linear.register_fake
def _bsr_linear_fake(
    x, indptr, indices, values, bias, out_features, in_features, block_r, block_c, backend="auto"
):
    _check_x(x, in_features, "sparsekit::bsr_linear")
    return x.new_empty((*x.shape[:-1], out_features))


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
