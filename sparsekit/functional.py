"""``linear`` and ``spmm`` on CSRMatrix / BSRMatrix weights, torch tensors or numpy arrays.

The checks, planning and launch are :mod:`sparsekit.ops`'s, shared with SparseLinear.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import ops
from .formats import BSRMatrix, CSRMatrix

__all__ = ["linear", "spmm"]

_SPARSE = (CSRMatrix, BSRMatrix)
_LAUNCHER_KEY = ops.LAUNCHER_KEY


def linear(x: Any, weight: CSRMatrix | BSRMatrix, bias: Any = None, *,
           backend: str = "auto", activation: str | None = None) -> Any:
    """Sparse ``y = x @ weight.T + bias``, like :func:`torch.nn.functional.linear`.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray, shape (..., K)
        Any number of leading dims (including a 0-size batch); need not be contiguous (made
        contiguous once). dtype float32, bfloat16 or float16.
    weight : CSRMatrix or BSRMatrix, shape (M, K)
        On the same device as ``x``.
    bias : torch.Tensor or numpy.ndarray, shape (M,), optional
        dtype float32, bfloat16 or float16 (added in fp32); on x's device.
    backend : str
        ``"auto"`` (cuda for CUDA tensors; on CPU cpp, then numba, then torch) or a name from
        :func:`sparsekit.backends`.
    activation : {None, "relu"}
        Applied to the result: ``relu(x @ weight.T + bias)``. The C++ kernels fuse it into the
        product (each output in fp32 before its conversion to x's dtype); other backends apply
        it afterwards. Same result as ``torch.relu`` of the plain product, NaN included.

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape (..., M)
        Same dtype as ``x`` (numpy in -> numpy out).

    Notes
    -----
    Accumulation is always fp32. Supported (x, weight) dtypes: fp32 x with any weight
    (fp32 out); bf16 x with bf16 weights (bf16 out); fp16 x with fp16 weights (fp16 out).
    Other half combinations (e.g. bf16 x with fp32 or fp16 weights) are computed with x
    converted to fp32 and the result rounded back to x's dtype. float64 / integer x raise
    ``TypeError`` (convert explicitly); :class:`sparsekit.nn.SparseLinear` and the custom ops
    apply the same rules (:func:`sparsekit.ops.plan_linear`). Differentiable in ``x`` and
    ``bias`` (the sparse weight is frozen): when grad mode is on and either requires grad, the
    call goes through the ``sparsekit::csr_linear`` / ``bsr_linear`` custom ops, whose
    backward uses the transposed weight. Per-call cost: O(nnz * N) kernel work + a few
    microseconds of checks.

    Examples
    --------
    >>> import torch, sparsekit
    >>> w = torch.tensor([[0., 2.], [3., 0.]])
    >>> sparsekit.linear(torch.tensor([[1., 1.]]), sparsekit.CSRMatrix.from_dense(w))
    tensor([[2., 3.]])
    """
    if not isinstance(weight, _SPARSE):
        raise TypeError(
            f"weight: expected a sparsekit CSRMatrix or BSRMatrix, got {type(weight).__name__}"
            + (" (convert with CSRMatrix.from_dense(w))" if isinstance(weight, torch.Tensor)
               else "")
        )
    act = 0 if activation is None else ops.activation_code(activation)
    if type(x) is Tensor and backend == "auto" and not torch.compiler.is_compiling():
        # Fast path (see ops.fast_launcher): a weight already bound to the kernels, a plain
        # tensor, no autograd graph needed. Anything the launcher does not take as is (it
        # returns None) goes through the general checks below.
        launch = weight.cache_get(_LAUNCHER_KEY)
        if launch is not None and (bias is None or isinstance(bias, Tensor)) and (
                not torch.is_grad_enabled()
                or not (x.requires_grad or (bias is not None and bias.requires_grad))):
            y = launch(x, bias, act)
            if y is not None:
                return y
    is_np = isinstance(x, np.ndarray)
    if is_np:
        if x.dtype not in (np.float32, np.float16):
            raise TypeError(
                f"x: expected dtype float32 or float16, got {x.dtype} "
                "(convert with x.astype(np.float32))"
            )
        x = torch.from_numpy(x)
        if isinstance(bias, np.ndarray):
            bias = torch.from_numpy(bias)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    M, K = weight._shape
    cdt, bias32 = ops.plan_linear(x, K, M, weight.values, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        # Differentiable: through the custom ops, whose backward uses the transposed weight.
        # int8 values / delta8 indices: through their float decoding (cached on the matrix).
        weight = weight.decoded()
        if isinstance(weight, CSRMatrix):
            y = ops.csr_linear(x, weight.indptr, weight.indices, weight.values, bias, M, K,
                               backend)
        else:
            r, c = weight.blocksize
            y = ops.bsr_linear(x, weight.indptr, weight.indices, weight.values, bias, M, K, r, c,
                               backend)
        return torch.relu(y) if act else y
    if weight.is_compressed and torch.compiler.is_compiling():
        # the compressed ops keep the graph whole (the eager launch below would break it)
        y = ops.linear_compressed_op(
            x, weight.indptr, weight.indices, weight.values, weight.scales, bias, M, K,
            None if isinstance(weight, CSRMatrix) else weight.blocksize, backend)
        return torch.relu(y) if act else y
    if x.requires_grad:
        x = x.detach()
    y = ops.launch_linear(x, weight, bias32, backend, cdt, act)
    return y.numpy() if is_np else y


def spmm(a: CSRMatrix | BSRMatrix, b: Any, *, backend: str = "auto") -> Any:
    """Sparse @ dense: ``a (M, K) @ b (K, N) -> (M, N)`` (C-contiguous).

    Runs the linear kernel on ``b.T`` (so ``b`` is transposed once and the result once).
    Accepts torch tensors or numpy arrays like :func:`linear`.
    """
    if not isinstance(a, _SPARSE):
        raise TypeError(f"a: expected a sparsekit CSRMatrix or BSRMatrix, got {type(a).__name__}")
    is_np = isinstance(b, np.ndarray)
    bt = torch.from_numpy(b) if is_np else b
    if not isinstance(bt, torch.Tensor):
        raise TypeError(f"b: expected a torch.Tensor or numpy.ndarray, got {type(b).__name__}")
    if bt.dim() != 2 or bt.shape[0] != a.shape[1]:
        raise ValueError(
            f"b: expected a 2-D array of shape ({a.shape[1]}, N), got shape {tuple(bt.shape)}"
        )
    y = linear(bt.t(), a, backend=backend).t().contiguous()
    return y.numpy() if is_np else y
