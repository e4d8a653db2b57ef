"""Importance criteria: magnitude (l1 / l2 / mean) and Wanda, plus user callables.

Element scores are computed on the 2-D weight view ``(out, K)`` in float64 (so rankings do not
depend on the weight dtype), then reduced per group by :func:`sparsekit.prune._masks.group_scores`:

=========  ========================  ====================================================
criterion  element score             group score (block / row granularity)
=========  ========================  ====================================================
``l1``     ``|w|``                   sum of ``|w|`` over the group (the group's L1 norm)
``l2``     ``w**2``                  ``sqrt(sum w**2)`` (the group's L2 norm)
``mean``   ``|w|``                   mean ``|w|`` over the group's real elements
``wanda``  ``|w_ij| * ||x_j||_2``    sum over the group
callable   ``fn(weight, module)``    sum over the group
=========  ========================  ====================================================

``sparsegpt`` is not a static score: masks are chosen while the layer is reconstructed from
calibration data, see :mod:`sparsekit.prune.sparsegpt`.

For unstructured pruning ``l1``, ``l2`` and ``mean`` rank identically.  Wanda (Sun et al., 2023,
"A Simple and Effective Pruning Approach for Large Language Models") scales each weight by the
L2 norm of its input feature over calibration data, collected with forward pre-hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import from_param_shape, is_hf_conv1d, prunable_weight, weight_2d

__all__ = ["CRITERIA", "Criterion", "resolve_criterion", "element_scores", "collect_input_norms",
           "real_token_mask", "drop_padding_rows"]

CRITERIA = ("l1", "l2", "mean", "wanda", "sparsegpt")

_REDUCE = {"l1": "sum", "l2": "sqrt_sum", "mean": "mean", "wanda": "sum", "sparsegpt": "sum"}


@dataclass(frozen=True)
class Criterion:
    """A resolved criterion: a name, its group reduction and an optional user callable."""

    name: str
    reduce: str
    fn: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.name in ("wanda", "sparsegpt")


def resolve_criterion(criterion: object) -> Criterion:
    """Validate ``criterion`` (a name from :data:`CRITERIA` or a callable).

    A callable is called as ``fn(weight, module)`` with the detached weight (original shape) and
    must return a tensor of the same shape with finite importance scores (higher = kept).
    """
    if callable(criterion) and not isinstance(criterion, str):
        name = getattr(criterion, "__name__", type(criterion).__name__)
        return Criterion(f"callable:{name}", "sum", criterion)
    if isinstance(criterion, str) and criterion.lower() in CRITERIA:
        c = criterion.lower()
        return Criterion(c, _REDUCE[c])
    raise ValueError(f"criterion: expected one of {', '.join(map(repr, CRITERIA))} or a callable "
                     f"fn(weight, module) -> scores, got {criterion!r}")


def element_scores(crit: Criterion, name: str, module: nn.Module,
                   input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 element scores of ``module``'s 2-D weight view for criterion ``crit``."""
    w = weight_2d(module)
    if not torch.isfinite(w).all():
        raise ValueError(f"model: weight of module {name!r} contains NaN or inf; cannot rank it")
    if crit.fn is not None:
        p = prunable_weight(module)
        s = crit.fn(p.detach(), module)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(p.shape):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"criterion: callable must return a tensor of the weight's shape "
                             f"{tuple(p.shape)} for module {name!r}, got {got}")
        s = from_param_shape(module, s.detach().to(device=w.device, dtype=torch.float64))
        if not torch.isfinite(s).all():
            raise ValueError(f"criterion: callable returned NaN/inf scores for module {name!r}")
        return s
    w64 = w.to(torch.float64)
    if crit.name == "l2":
        return w64 * w64
    if crit.name == "wanda":
        if input_norm is None:  # pragma: no cover - the engine always passes it
            raise ValueError("calibration: wanda needs calibration data")
        norm = input_norm.to(device=w.device, dtype=torch.float64)
        if norm.dim() == 2:  # attention: one input norm per q / k / v row block
            norm = norm.repeat_interleave(w.shape[0] // norm.shape[0], dim=0)
            return w64.abs() * norm
        return w64.abs() * norm[None, :]
    return w64.abs()


def _check_wanda_module(name: str, module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)) or is_hf_conv1d(module):
        return
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise NotImplementedError(
                f"criterion: wanda supports Conv2d only with groups=1, numeric padding and "
                f"padding_mode='zeros'; module {name!r} is {module}")
        return
    raise NotImplementedError(f"criterion: wanda supports nn.Linear and nn.Conv2d, module {name!r} "
                              f"is {type(module).__name__}")


def real_token_mask(batch: object) -> torch.Tensor | None:
    """Boolean ``(B, T)`` mask of the real tokens of a dict batch with a 2-D ``attention_mask``.

    None for other batches.  Padding positions carry hidden states that no output uses (mean
    pooling, attention and losses all mask them), so statistics of layer inputs leave them out.
    """
    if isinstance(batch, Mapping):
        am = batch.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            return am != 0
    return None


def drop_padding_rows(x: torch.Tensor, cols: torch.Tensor,
                      token_mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``cols`` (``x`` flattened to ``(B*T, K)``) that belong to real tokens.

    Only applies when ``x`` is a ``(B, T, K)`` token tensor matching ``token_mask``'s ``(B, T)``
    and ``cols`` has one row per token; otherwise ``cols`` is returned unchanged.
    """
    if (token_mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(token_mask.shape)
            or cols.shape[0] != x.shape[0] * x.shape[1]):
        return cols
    return cols[token_mask.to(cols.device).reshape(-1)]


def _run_batch(model: nn.Module, batch: object, device: torch.device | None) -> None:
    def mv(t: object) -> object:
        return t.to(device) if isinstance(t, torch.Tensor) and device is not None else t

    if isinstance(batch, torch.Tensor):
        model(mv(batch))
    elif isinstance(batch, (tuple, list)) and batch:
        model(mv(batch[0]))  # (inputs, targets, ...) as yielded by a DataLoader
    elif isinstance(batch, Mapping):
        model(**{k: mv(v) for k, v in batch.items()})
    else:
        raise TypeError(f"calibration: each batch must be a tensor, an (inputs, ...) tuple or a "
                        f"dict of keyword inputs, got {type(batch).__name__}")


def _shape_of(batch: object) -> str:
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return str(tuple(batch[0].shape))
    return type(batch).__name__


def collect_input_norms(model: nn.Module, modules: Mapping[str, nn.Module],
                        calibration: Iterable[object] | None, *, skip_padding: bool = True
                        ) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of ``modules`` over the ``calibration`` batches.

    With ``skip_padding`` (default), token positions that a dict batch's ``attention_mask``
    marks as padding are left out (see :func:`real_token_mask`).

    The model runs in eval mode under ``torch.no_grad()``; per-module training flags are restored
    and all hooks are removed afterwards, also on error.

    Returns
    -------
    dict of str to Tensor (K,) float64
        ``K`` is ``in_features`` (Linear) or ``in_channels * kh * kw`` (Conv2d, im2col order).
    """
    if calibration is None:
        raise ValueError("calibration: criterion 'wanda' needs calibration data (an iterable of "
                         "input batches), got None")
    for name, mod in modules.items():
        _check_wanda_module(name, mod)
    sumsq: dict[str, torch.Tensor] = {}
    handles = []
    token_mask: list[torch.Tensor | None] = [None]

    def make_hook(name: str, mod: nn.Module) -> Callable[..., None]:
        def sumsq_rows(x: torch.Tensor, k: int) -> torch.Tensor:
            if x.shape[-1] != k:
                raise ValueError(f"calibration: module {name!r} expects inputs with last "
                                 f"dimension {k}, got shape {tuple(x.shape)}")
            cols = drop_padding_rows(x, x.detach().reshape(-1, k), token_mask[0])
            cols = cols.to(torch.float64)
            return (cols * cols).sum(dim=0)

        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("query"))
            if isinstance(m, nn.MultiheadAttention):
                # query, key and value feed the q / k / v row blocks of in_proj_weight
                names = ("query", "key", "value")
                qkv = [args[i] if len(args) > i else kwargs[names[i]] for i in range(3)]
                acc = torch.stack([sumsq_rows(t, m.embed_dim) for t in qkv])
            elif isinstance(m, nn.Linear):
                acc = sumsq_rows(x, m.in_features)
            elif is_hf_conv1d(m):
                acc = sumsq_rows(x, m.weight.shape[0])
            else:
                if x.dim() not in (3, 4) or x.shape[-3] != m.in_channels:
                    raise ValueError(f"calibration: module {name!r} expects (N, {m.in_channels}, "
                                     f"H, W) inputs, got shape {tuple(x.shape)}")
                x4 = x.detach() if x.dim() == 4 else x.detach()[None]
                cols = F.unfold(x4.to(torch.float64), m.kernel_size, dilation=m.dilation,
                                padding=m.padding, stride=m.stride)
                acc = (cols * cols).sum(dim=(0, 2))
            sumsq[name] = sumsq[name] + acc if name in sumsq else acc

        return hook

    flags = {m: m.training for m in model.modules()}
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        for name, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(make_hook(name, mod), with_kwargs=True))
        model.eval()
        n_batches = 0
        with torch.no_grad():
            for i, batch in enumerate(calibration):
                token_mask[0] = real_token_mask(batch) if skip_padding else None
                try:
                    _run_batch(model, batch, device)
                except (ValueError, TypeError, RuntimeError) as e:
                    if str(e).startswith("calibration:"):
                        raise
                    raise ValueError(f"calibration: batch {i} (inputs {_shape_of(batch)}) could "
                                     f"not be run through the model: {e}") from e
                n_batches += 1
        if n_batches == 0:
            raise ValueError("calibration: the iterable yielded no batches (a one-shot iterator "
                             "that was already consumed?)")
    finally:
        for h in handles:
            h.remove()
        for m, f in flags.items():
            m.training = f
    missing = [n for n in modules if n not in sumsq]
    if missing:
        raise ValueError(f"calibration: modules {missing} were never called while running the "
                         f"calibration batches through the model")
    return {n: s.sqrt() for n, s in sumsq.items()}
