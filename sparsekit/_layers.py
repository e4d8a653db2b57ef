"""Which modules hold a prunable / sparsifiable weight matrix, and how to select them.

Shared by :func:`sparsekit.prune.prune` and :func:`sparsekit.sparsify` so both see the same
layers and read ``include`` / ``exclude`` / ``filter_fn`` the same way. Pure torch: no other
sparsekit module is imported, and ``transformers`` is never imported (its ``Conv1D`` is
recognised by class name and module).

Layer kinds and the 2-D ``(out, K)`` weight view every criterion, mask and kernel works on:

==================  ==========================  ===============================================
kind                parameter                   ``(out, K)`` view
==================  ==========================  ===============================================
``linear``          ``nn.Linear.weight``        the weight itself
``conv1d_hf``       ``transformers`` ``Conv1D``  ``weight.T`` (the stored weight is ``(in, out)``)
``mha``             ``in_proj_weight``          the packed ``(3E, E)`` q/k/v projection
``conv``            ``nn.Conv1d/2d/3d.weight``  ``(out_channels, in_channels/groups * prod(k))``
==================  ==========================  ===============================================
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["layer_kind", "is_hf_conv1d", "prunable_weight", "weight_2d", "to_param_shape",
           "from_param_shape", "conv2d_extra_padding", "Selector", "FilterItem", "Filter",
           "unsupported_reason"]

FilterItem = str | type | Callable[[str, nn.Module], bool]
Filter = FilterItem | Iterable[FilterItem] | None


def is_hf_conv1d(mod: object) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (a linear layer storing ``(in, out)``)."""
    cls = mod if isinstance(mod, type) else type(mod)
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in cls.__mro__)


def _plain_linear_forward(mod: nn.Module) -> bool:
    # A subclass that keeps nn.Linear.forward computes x W^T + b; one with its own forward
    # may not, so it is left alone.
    return type(mod).forward is nn.Linear.forward


def layer_kind(mod: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d_hf"``, ``"mha"``, ``"conv"`` or None (no weight matrix here).

    ``"mha"`` only for a :class:`torch.nn.MultiheadAttention` with a packed
    ``in_proj_weight`` (``kdim == vdim == embed_dim``); its ``out_proj`` is a separate
    ``"linear"``.
    """
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(mod, nn.MultiheadAttention):
        return "mha" if isinstance(mod.in_proj_weight, nn.Parameter) else None
    if is_hf_conv1d(mod) and isinstance(getattr(mod, "weight", None), nn.Parameter):
        return "conv1d_hf"
    return None


def conv2d_extra_padding(mod: nn.Module) -> tuple[int, int, int, int] | None:
    """Zero padding ``(top, bottom, left, right)`` a Conv2d applies before its convolution.

    ``(0, 0, 0, 0)`` for a plain ``nn.Conv2d`` (its own ``padding`` is separate). Subclasses that
    pad with a fixed ``static_padding`` module (``nn.ZeroPad2d`` or an ``Identity``; TensorFlow
    "SAME" padding as in EfficientNet ports) return that padding. None for any other subclass
    that overrides ``forward``: its computation is unknown, so it is not converted.
    """
    if not isinstance(mod, nn.Conv2d):
        return None
    if type(mod).forward is nn.Conv2d.forward:
        return (0, 0, 0, 0)
    pad = getattr(mod, "static_padding", None)
    if isinstance(pad, nn.Identity) or (
            isinstance(pad, nn.Module) and type(pad).__name__ == "Identity"
            and not any(True for _ in pad.parameters())):
        return (0, 0, 0, 0)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        return (top, bottom, left, right)
    return None


def unsupported_reason(mod: nn.Module) -> str:
    """Why ``mod`` (a module with parameters of its own) is left as it is by ``sparsify``."""
    if isinstance(mod, nn.MultiheadAttention) and not isinstance(mod.in_proj_weight,
                                                                 nn.Parameter):
        return "separate q/k/v weights (kdim/vdim != embed_dim) are not supported"
    if isinstance(mod, nn.Linear) and not _plain_linear_forward(mod):
        return f"{type(mod).__name__} overrides nn.Linear.forward"
    if isinstance(mod, (nn.Conv1d, nn.Conv3d)):
        return f"{type(mod).__name__} has no sparse path (Conv2d only)"
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            kind = "depthwise" if mod.groups == mod.in_channels else "grouped"
            return f"groups={mod.groups} ({kind} convolution) stays dense"
        if mod.padding_mode != "zeros":
            return f"padding_mode={mod.padding_mode!r} is not supported (only 'zeros')"
        if conv2d_extra_padding(mod) is None:
            return (f"{type(mod).__name__} overrides nn.Conv2d.forward (only plain Conv2d and "
                    f"a fixed static_padding are understood)")
        return f"{type(mod).__name__} subclass is not supported"
    if isinstance(mod, nn.Embedding):
        return "embedding lookup: no matrix product to make sparse"
    return f"no sparse kernel for {type(mod).__name__}"


def prunable_weight(mod: nn.Module) -> nn.Parameter:
    """The parameter pruning zeroes: ``weight``, or ``in_proj_weight`` for attention."""
    if isinstance(mod, nn.MultiheadAttention):
        return mod.in_proj_weight
    return mod.weight


def from_param_shape(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like :func:`prunable_weight` viewed as ``(out, K)`` (no copy)."""
    if is_hf_conv1d(mod):
        return t.t()
    return t.reshape(t.shape[0], -1)


def to_param_shape(mod: nn.Module, t2d: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`from_param_shape`."""
    p = prunable_weight(mod)
    if is_hf_conv1d(mod):
        return t2d.t()
    return t2d.reshape(p.shape)


def weight_2d(mod: nn.Module) -> torch.Tensor:
    """The detached ``(out, K)`` view of the prunable weight."""
    return from_param_shape(mod, prunable_weight(mod).detach())


def _check_items(f: Filter, arg: str) -> list[FilterItem]:
    if f is None:
        return []
    items = [f] if isinstance(f, (str, type)) or callable(f) else list(f)
    for it in items:
        if not isinstance(it, (str, type)) and not callable(it):
            raise TypeError(f"{arg}: expected module name glob patterns (str), module types or "
                            f"callables (name, module) -> bool, got {it!r} "
                            f"(type {type(it).__name__})")
    return items


def _matches(item: FilterItem, name: str, mod: nn.Module, arg: str) -> bool:
    if isinstance(item, str):
        return fnmatch.fnmatchcase(name, item)
    if isinstance(item, type):
        return isinstance(mod, item)
    out = item(name, mod)
    if not isinstance(out, bool):
        raise TypeError(f"{arg}: callable {getattr(item, '__name__', item)!r} must return a bool "
                        f"for module {name!r}, got {type(out).__name__}")
    return out


class Selector:
    """``include`` / ``exclude`` / ``filter_fn`` as ``prune`` and ``sparsify`` both read them.

    Each of ``include`` and ``exclude`` is one item or an iterable of items; an item is an
    ``fnmatch`` glob pattern on the qualified module name (``"encoder.*"``, ``"lm_head"``), a
    module type (``isinstance``) or a callable ``(name, module) -> bool``. A module passes when
    it matches some ``include`` item (every module when ``include`` is None), no ``exclude``
    item, and ``filter_fn(name, module)`` (when given) returns True. Every pattern or type must
    match at least one module of the model, so typos fail loudly.
    """

    def __init__(self, include: Filter = None, exclude: Filter = None,
                 filter_fn: Callable[[str, nn.Module], bool] | None = None) -> None:
        self.include_arg, self.exclude_arg = include, exclude
        self.include = _check_items(include, "include")
        self.exclude = _check_items(exclude, "exclude")
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"filter_fn: expected a callable (name, module) -> bool, got "
                            f"{type(filter_fn).__name__}")
        self.filter_fn = filter_fn

    def check_against(self, model: nn.Module) -> None:
        """Raise ValueError for a pattern or type that matches no module of ``model``."""
        named = [(n, m) for n, m in model.named_modules() if n]
        names = [n for n, _ in named]
        for arg, items in (("include", self.include), ("exclude", self.exclude)):
            for it in items:
                if isinstance(it, (str, type)) and not any(_matches(it, n, m, arg)
                                                           for n, m in named):
                    shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
                    raise ValueError(f"{arg}: filter {it!r} matches no module of the model; "
                                     f"module names: {shown or '(none)'}")

    def why_not(self, name: str, mod: nn.Module) -> str | None:
        """None when the module is selected, else the reason (for reports)."""
        if self.include and not any(_matches(it, name, mod, "include") for it in self.include):
            return "not matched by include"
        if any(_matches(it, name, mod, "exclude") for it in self.exclude):
            return "excluded"
        if self.filter_fn is not None:
            keep = self.filter_fn(name, mod)
            if not isinstance(keep, (bool, int)):
                raise TypeError(f"filter_fn: must return a bool for module {name!r}, got "
                                f"{type(keep).__name__}")
            if not keep:
                return "filtered out"
        return None

    def __call__(self, name: str, mod: nn.Module) -> bool:
        return self.why_not(name, mod) is None
