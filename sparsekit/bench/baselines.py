"""Dense baselines and result checks: every speedup is quoted against the fastest dense path.

:func:`dense_contenders` prepares ``F.linear``, ``torch.matmul`` with a pre-transposed weight,
oneDNN with a pre-packed weight, MKL with a pre-packed weight and numpy/OpenBLAS, all verified
against ``F.linear`` before they are returned; :func:`best_dense` picks the fastest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sparsekit.timing import Stats

__all__ = ["DenseContenders", "dense_contenders", "best_dense", "check_close", "tolerance_for"]

def tolerance_for(dtype: torch.dtype, k: int) -> float:
    """Relative tolerance (to ``max|ref|``) for a length-``k`` fp32-accumulated dot product.

    Covers rounding of the inputs/outputs to ``dtype`` plus summation-order differences; used for
    every correctness check in the benchmarks so that all contenders face the same bar.
    """
    u = {  # unit roundoff of the output dtype
        torch.float64: 2.0**-53,
        torch.float32: 2.0**-24,
        torch.bfloat16: 2.0**-8,
        torch.float16: 2.0**-11,
    }.get(dtype, 2.0**-8)
    # output rounding (a few units in the last place relative to max|y|) + fp32 accumulation
    # error, which grows like sqrt(k) for random data.  A kernel accumulating in bf16/fp16 fails
    # this; in fp32 so does one that drops a single term.
    return 4.0 * u + 4.0 * math.sqrt(max(k, 1)) * 2.0**-24 + 1e-6


def check_close(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, k: int, *, tol: float | None = None
) -> tuple[bool, float]:
    """Compare ``got`` to a float64 reference; returns ``(ok, max_rel_err)``.

    The error is ``max|got - ref| / max(max|ref|, tiny)``, accepted up to ``tol`` (default
    ``tolerance_for(dtype, k)``); ``ok`` is False for shape mismatch or non-finite
    values.
    """
    if tuple(got.shape) != tuple(ref.shape):
        return False, math.inf
    g = got.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(g).all()):
        return False, math.inf
    scale = max(float(r.abs().max()) if r.numel() else 0.0, 1e-30)
    err = float((g - r).abs().max()) / scale if r.numel() else 0.0
    return err <= (tolerance_for(dtype, k) if tol is None else tol), err


class DenseContenders(dict):
    """``dict`` name -> ``fn(x, i)`` with a ``skipped`` mapping name -> reason for the ones left out
    (unsupported dtype on this CPU/build, or failed verification against ``F.linear``)."""

    skipped: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self.skipped = {}


def _prep_onednn(weights: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    # The packed layout (what inductor's freezing pass feeds to mkldnn._linear_pointwise) is the
    # fastest oneDNN path in torch 2.x; it is correct for any batch size, the hint only picks the
    # blocking.  Raises on dtypes the CPU cannot run (e.g. fp16 without AVX512-FP16).
    return [torch.ops.mkldnn._reorder_linear_weight(w, batch_size) for w in weights]


def dense_contenders(
    weights: list[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
    verify: bool = True,
    names: Sequence[str] | None = None,
) -> DenseContenders:
    """Prepare dense ``x @ W.T (+ bias)`` formulations over rotating weight copies.

    Every returned ``fn(x, i)`` computes ``x @ weights[i % n].T + bias`` with ``x`` of the
    weights' dtype.  Weights are prepared once per contender (transposed copies, packed layouts),
    so preparation cost is never timed.  Contenders:

    ``"F.linear"``      ``torch.nn.functional.linear`` (what ``nn.Linear`` runs)
    ``"torch.matmul"``  ``torch.matmul(x, w_t)`` / ``torch.addmm`` with a pre-transposed contiguous
                        weight
    ``"onednn"``        ``torch.ops.mkldnn._linear_pointwise`` on a oneDNN-packed weight
                        (fp32, bf16; fp16 only where the CPU supports it)
    ``"mkl_packed"``    ``torch.ops.mkl._mkl_linear`` on an MKL-packed weight (fp32, MKL builds)
    ``"numpy"``         ``x_np @ w_t_np`` through numpy's BLAS (OpenBLAS) on the pre-transposed
                        weight (fp32; numpy has no BLAS kernel for fp16/bf16)

    Parameters
    ----------
    weights : list of torch.Tensor
        Rotating copies, each (M, K), same shape/dtype, on one device.  CUDA weights get only
        ``F.linear`` and ``torch.matmul``.
    bias : torch.Tensor, optional
        (M,) bias of the weights' dtype (or fp32 -- it is cast).
    batch_size : int, optional
        Batch size hint for the packed layouts (oneDNN/MKL block for it); any batch size stays
        correct.  Default 32.
    verify : bool
        Check every contender once against ``F.linear`` on a random input (batch 3) and drop the
        ones that fail (reason in ``.skipped``).
    names : sequence of str, optional
        Prepare only these contenders (default: all).  Lets a caller re-pack only the
        batch-size-dependent layouts (``onednn``, ``mkl_packed``) per batch size.

    Returns
    -------
    DenseContenders
        dict name -> fn(x, i); ``.skipped`` maps omitted names to reasons.
    """
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError(f"weights: expected a non-empty list of 2-D tensors, got {weights!r:.80}")
    w0 = weights[0]
    for j, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"weights[{j}]: expected a 2-D torch.Tensor, got {type(w).__name__}")
        if w.shape != w0.shape or w.dtype != w0.dtype or w.device != w0.device:
            raise ValueError(
                f"weights[{j}]: expected shape {tuple(w0.shape)}, dtype {w0.dtype}, device "
                f"{w0.device} like weights[0], got {tuple(w.shape)}, {w.dtype}, {w.device}"
            )
    m, k = w0.shape
    dtype, device = w0.dtype, w0.device
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (m,):
            raise ValueError(f"bias: expected a tensor of shape ({m},), got {bias!r:.80}")
        bias = bias.detach().to(device=device, dtype=dtype).contiguous()
    if batch_size is None:
        batch_size = 32
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    known = ("F.linear", "torch.matmul", "onednn", "mkl_packed", "numpy")
    if names is not None:
        bad = [nm for nm in names if nm not in known]
        if bad:
            raise ValueError(f"names: expected a subset of {known}, got {bad}")
    want = set(known if names is None else names)
    ws = [w.detach().contiguous() for w in weights]
    n = len(ws)
    out = DenseContenders()

    def f_linear(x: torch.Tensor, i: int) -> torch.Tensor:
        return F.linear(x, ws[i % n], bias)

    out["F.linear"] = f_linear

    wts = [w.t().contiguous() for w in ws] if want & {"torch.matmul", "numpy"} else []
    if bias is None:

        def f_matmul(x: torch.Tensor, i: int) -> torch.Tensor:
            return torch.matmul(x, wts[i % n])
    else:

        def f_matmul(x: torch.Tensor, i: int) -> torch.Tensor:
            return torch.addmm(bias, x, wts[i % n])

    out["torch.matmul"] = f_matmul

    if device.type == "cpu":
        # oneDNN
        if "onednn" not in want:
            pass
        elif not torch.backends.mkldnn.is_available():
            out.skipped["onednn"] = "torch built without oneDNN"
        else:
            try:
                packed = _prep_onednn(ws, batch_size)

                def f_onednn(x: torch.Tensor, i: int) -> torch.Tensor:
                    return torch.ops.mkldnn._linear_pointwise(
                        x, packed[i % n], bias, "none", [], ""
                    )

                out["onednn"] = f_onednn
            except Exception as exc:  # unsupported dtype on this CPU / op missing
                out.skipped["onednn"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        # MKL packed sgemm
        if "mkl_packed" not in want:
            pass
        elif dtype != torch.float32:
            out.skipped["mkl_packed"] = f"MKL packed GEMM is fp32 only (got {dtype})"
        elif not torch.backends.mkl.is_available():
            out.skipped["mkl_packed"] = "torch built without MKL"
        else:
            try:
                mkl_packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, batch_size) for w in ws]
                bias32 = bias

                def f_mkl(x: torch.Tensor, i: int) -> torch.Tensor:
                    j = i % n
                    return torch.ops.mkl._mkl_linear(x, mkl_packed[j], ws[j], bias32, batch_size)

                out["mkl_packed"] = f_mkl
            except Exception as exc:
                out.skipped["mkl_packed"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        # numpy / OpenBLAS
        if "numpy" not in want:
            pass
        elif dtype != torch.float32:
            out.skipped["numpy"] = f"numpy has no BLAS kernel for {dtype}"
        else:
            # numpy reads the same pre-transposed (K, M) buffers as the torch.matmul contender
            # (read-only, timed separately): no extra copy of a rotating set that is > 2x LLC.
            np_wts = [wt.numpy() for wt in wts]
            np_bias = None if bias is None else bias.numpy().copy()

            def f_numpy(x: torch.Tensor, i: int) -> torch.Tensor:
                y = np.matmul(x.numpy(), np_wts[i % n])
                if np_bias is not None:
                    y += np_bias
                return torch.from_numpy(y)

            out["numpy"] = f_numpy
    else:
        for name in ("onednn", "mkl_packed", "numpy"):
            if name in want:
                out.skipped[name] = f"CPU only (weights on {device})"
    for name in [nm for nm in out if nm not in want]:
        del out[name]

    if verify:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        x = torch.randn(3, k, generator=gen).to(device=device, dtype=dtype)
        ref = F.linear(x.double(), ws[0].double(), None if bias is None else bias.double())
        tol = tolerance_for(dtype, k)
        for name in list(out):
            if name == "F.linear":
                continue
            try:
                ok, err = check_close(out[name](x, 0), ref, dtype, k)
            except Exception as exc:
                ok, err = False, math.nan
                reason = f"{type(exc).__name__}: {str(exc)[:160]}"
            else:
                reason = f"wrong result: max rel err {err:.3g} > tol {tol:.3g}"
            if not ok:
                del out[name]
                out.skipped[name] = reason
                warnings.warn(f"dense contender {name!r} dropped: {reason}", stacklevel=2)
    return out


def best_dense(stats_by_name: dict[str, Stats]) -> tuple[str, Stats]:
    """Return ``(name, stats)`` of the contender with the smallest median time.

    Entries that are not :class:`Stats` (e.g. ``None`` for skipped contenders) are ignored.
    """
    cands = {k: v for k, v in stats_by_name.items() if isinstance(v, Stats)}
    if not cands:
        raise ValueError("stats_by_name: expected at least one Stats entry, got none")
    name = min(cands, key=lambda k: cands[k].median_s)
    return name, cands[name]
