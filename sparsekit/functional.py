"""``linear`` and ``spmm``: the thin layer of check -> choose backend -> allocate -> launch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .formats import BSRMatrix, CSRMatrix
from .kernels import select_backend
from .kernels.cpp import _BOUND_KEY as _CPP_BOUND
from .kernels.cpp import run_bound as _cpp_run_bound

__all__ = ["linear", "spmm"]

_SPARSE = (CSRMatrix, BSRMatrix)
_HALF = (torch.bfloat16, torch.float16)


def _compute_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """dtype the kernel sees for x (and writes): fp32, or the weight's half dtype."""
    if x_dtype == torch.float32:
        return torch.float32
    if x_dtype in _HALF:
        return x_dtype if x_dtype == w_dtype else torch.float32
    raise TypeError(
        f"x: expected dtype float32, bfloat16 or float16, got {x_dtype} "
        "(sparsekit computes in fp32; convert with x.float())"
    )


def linear(x: Any, weight: CSRMatrix | BSRMatrix, bias: Any = None, *,
           backend: str = "auto") -> Any:
    """Sparse ``y = x @ weight.T + bias``, like :func:`torch.nn.functional.linear`.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray, shape (..., K)
        Any number of leading dims (including a 0-size batch); need not be contiguous (made
        contiguous once). dtype float32, bfloat16 or float16.
    weight : CSRMatrix or BSRMatrix, shape (M, K)
        On the same device as ``x``.
    bias : torch.Tensor or numpy.ndarray, shape (M,), optional
        dtype float32, x's dtype or the weight's dtype; on x's device.
    backend : str
        ``"auto"`` (cuda for CUDA tensors; on CPU cpp, then numba, then torch) or a name from
        :func:`sparsekit.backends`.

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
    ``TypeError`` (convert explicitly). Differentiable in ``x`` and ``bias`` (the sparse weight
    is frozen): when grad mode is on and either requires grad, the call goes through the
    ``sparsekit::csr_linear`` / ``bsr_linear`` custom ops of :mod:`sparsekit.nn`, whose
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
    shape = x.shape
    if x.dim() == 0 or shape[-1] != K:
        raise ValueError(
            f"x: expected last dimension == weight in_features = {K}, got shape {tuple(shape)}"
        )
    if x.device != weight.values.device:
        raise ValueError(
            f"x: expected a tensor on the weight's device {weight.values.device}, got {x.device}"
        )
    cdt = _compute_dtype(x.dtype, weight.values.dtype)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (M,):
            raise ValueError(f"bias: expected shape ({M},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected a tensor on {x.device}, got {bias.device}")
        if bias.dtype != torch.float32:
            if bias.dtype not in (x.dtype, weight.values.dtype) or bias.dtype not in _HALF:
                raise TypeError(
                    f"bias: expected dtype float32, x's dtype or the weight's dtype, "
                    f"got {bias.dtype}"
                )
            bias = bias.float()
        elif not bias.is_contiguous():
            bias = bias.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _linear_autograd(x, weight, bias, backend)  # all argument checks done above
    if x.requires_grad:
        x = x.detach()
    if backend != "auto" and x.numel() == 0:
        select_backend(weight, x.reshape(-1, K), backend)  # no launch: still validate the name
    y = launch_linear(x, weight, bias, backend, cdt)
    return y.numpy() if is_np else y


def launch_linear(x: torch.Tensor, weight: CSRMatrix | BSRMatrix, bias: torch.Tensor | None,
                  backend: str, cdt: torch.dtype) -> torch.Tensor:
    """Allocate and launch ``x @ weight.T + bias`` for already-checked arguments.

    The shared tail of :func:`linear` and the ``torch.library`` ops of :mod:`sparsekit.nn`:
    ``x`` (..., K) on the weight's device, ``bias`` fp32 contiguous (M,) or None, ``cdt`` the
    activation dtype the kernel takes (fp32 or the weight's dtype). The result has x's dtype.
    """
    M, K = weight.shape
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
    if N:
        # cpp fast path: a matrix already bound to the C++ kernels (by an earlier auto call)
        # skips backend selection; the bound call passes only addresses
        bound = weight._cache.get(_CPP_BOUND) if backend == "auto" else None
        if bound is not None and x2d.is_cpu:
            _cpp_run_bound(bound, weight, x2d, bias, out)
        else:
            select_backend(weight, x2d, backend).linear(weight, x2d, bias, out)
    if cdt != x.dtype:
        out = out.to(x.dtype)
    return out if len(shape) == 2 else out.reshape(*shape[:-1], M)


def _linear_autograd(x: torch.Tensor, weight: CSRMatrix | BSRMatrix,
                     bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    from .nn import _ops  # lazy: torch.library registration only when autograd is needed

    M, K = weight.shape
    if isinstance(weight, CSRMatrix):
        return _ops.csr_linear(x, weight.indptr, weight.indices, weight.values, bias, M, K,
                               backend)
    r, c = weight.blocksize
    return _ops.bsr_linear(x, weight.indptr, weight.indices, weight.values, bias, M, K, r, c,
                           backend)


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
