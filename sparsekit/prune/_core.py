"""Shared machinery of one-shot and gradual pruning: module selection, targets, mask computation,
and the report."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._layers import Filter, Selector, is_hf_conv1d, layer_kind, prunable_weight, to_param_shape
from ._masks import (
    Granularity,
    check_granularity_fits,
    expand_group_mask,
    group_scores,
    nm_mask,
    parse_granularity,
    select_pruned_groups,
)
from .criteria import Criterion, collect_input_norms, element_scores, resolve_criterion, weight_2d

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
#: ``types`` default of prune / GradualPruner: every layer holding a weight matrix of a
#: matrix product (``nn.Linear``, ``transformers``' ``Conv1D``, the packed input projection of
#: ``nn.MultiheadAttention``, ``nn.Conv2d``).
DEFAULT_TYPES = "auto"
SCOPES = ("layer", "global")


# ----------------------------------------------------------------------------- validation
def check_fraction(value: object, arg: str) -> float:
    """Return ``value`` as a float in [0, 1) or raise a ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg}: expected a number in [0, 1), got {value!r} "
                         f"(type {type(value).__name__})")
    v = float(value)
    if not (0.0 <= v < 1.0):  # also rejects NaN
        raise ValueError(f"{arg}: expected a number in [0, 1), got {value!r}")
    return v


def _type_matcher(types: object) -> tuple[str, Callable[[nn.Module], bool]]:
    if types is None or types == "auto":
        def auto(m: nn.Module) -> bool:
            kind = layer_kind(m)
            return kind in ("linear", "conv1d_hf", "mha") or isinstance(m, nn.Conv2d)
        return "Linear, Conv1D (transformers), MultiheadAttention, Conv2d", auto
    tlist = [types] if isinstance(types, type) else list(types) if types is not None else []
    if not tlist:
        raise ValueError(f"types: expected 'auto', a module type or a tuple of them, got "
                         f"{types!r}")
    for t in tlist:
        if not (isinstance(t, type) and (issubclass(t, SUPPORTED_TYPES) or is_hf_conv1d(t))):
            raise ValueError(f"types: unsupported module type {t!r}; supported: "
                             f"{', '.join(t.__name__ for t in SUPPORTED_TYPES)}, transformers' "
                             f"Conv1D (and subclasses)")
    return ", ".join(t.__name__ for t in tlist), lambda m: isinstance(m, tuple(tlist))


def select_modules(model: nn.Module, include: Filter, exclude: Filter, types: object,
                   filter_fn: Callable[[str, nn.Module], bool] | None = None
                   ) -> dict[str, nn.Module]:
    """Modules of ``model`` to prune, in ``named_modules()`` order.

    A module is selected when it is of one of ``types`` (``"auto"``: every kind in
    :mod:`sparsekit._layers`) and passes the :class:`~sparsekit._layers.Selector` built from
    ``include`` / ``exclude`` / ``filter_fn`` (glob patterns on qualified names, module types or
    callables ``(name, module) -> bool``; every pattern must match some module, so typos fail
    loudly).  A ``nn.MultiheadAttention`` without a packed ``in_proj_weight`` is skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    type_names, type_ok = _type_matcher(types)
    try:
        sel = Selector(include, exclude, filter_fn)
    except TypeError as e:
        raise ValueError(str(e)) from e
    sel.check_against(model)
    named = [(n, m) for n, m in model.named_modules() if n]
    out: dict[str, nn.Module] = {}
    seen: dict[int, str] = {}
    for n, m in named:
        if not type_ok(m) or layer_kind(m) is None:
            continue
        if not sel(n, m):
            continue
        w = prunable_weight(m)
        if not isinstance(w, nn.Parameter):
            continue
        if id(w) in seen:
            raise ValueError(f"model: modules {seen[id(w)]!r} and {n!r} share one weight "
                             f"tensor; exclude one of them")
        seen[id(w)] = n
        out[n] = m
    if not out:
        raise ValueError(f"no module to prune: types=({type_names}), include={include!r}, "
                         f"exclude={exclude!r}, filter_fn={filter_fn!r} select nothing in the "
                         f"model")
    return out


# ----------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """Result of pruning one module (weights only; biases are never pruned)."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    granularity: str
    criterion: str
    target: float | None
    sparsity: float
    params: int
    nonzero_before: int
    nonzero_after: int


@dataclass
class PruneReport:
    """Per-layer pruning results with a readable table (``str(report)``) and ``to_dict()``."""

    layers: list[LayerReport]
    scope: str
    criterion: str
    granularity: str
    target: float | dict[str, float] | None
    extra: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def nonzero(self) -> int:
        return sum(layer.nonzero_after for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned weights together."""
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"scope": self.scope, "criterion": self.criterion,
                "granularity": self.granularity, "target": self.target,
                "params": self.params, "nonzero": self.nonzero, "sparsity": self.sparsity,
                **self.extra,
                "layers": [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers]}

    def __str__(self) -> str:
        head = ("layer", "type", "shape", "granularity", "target", "sparsity", "params",
                "nnz before", "nnz after")
        rows = [(la.name, la.module_type, "x".join(map(str, la.shape)), la.granularity,
                 "-" if la.target is None else f"{la.target:.4f}", f"{la.sparsity:.4f}",
                 str(la.params), str(la.nonzero_before), str(la.nonzero_after))
                for la in self.layers]
        tgt = (self.target if not isinstance(self.target, float) else f"{self.target:.4f}")
        rows.append(("total", "", "", "", "-" if tgt is None else
                     (str(tgt) if not isinstance(self.target, dict) else "per-layer"),
                     f"{self.sparsity:.4f}", str(self.params),
                     str(sum(la.nonzero_before for la in self.layers)), str(self.nonzero)))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [f"PruneReport(scope={self.scope}, criterion={self.criterion}, "
                 f"granularity={self.granularity})", fmt.format(*head),
                 "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- engine
class Engine:
    """Validated pruning configuration bound to a model; computes masks for given targets."""

    def __init__(self, model: nn.Module, sparsity: object, *, criterion: object,
                 granularity: object, scope: str, include: Filter, exclude: Filter,
                 types: object, calibration: Iterable[object] | None,
                 sparsity_arg: str = "sparsity",
                 filter_fn: Callable[[str, nn.Module], bool] | None = None,
                 skip_padding: bool = True) -> None:
        if not isinstance(skip_padding, bool):
            raise ValueError(f"skip_padding: expected a bool, got {skip_padding!r}")
        self.skip_padding = skip_padding
        self.crit: Criterion = resolve_criterion(criterion)
        self.gran: Granularity = parse_granularity(granularity)
        if scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.model = model
        if isinstance(sparsity, Mapping):
            if scope == "global":
                raise ValueError(f"{sparsity_arg}: a per-module dict needs scope='layer', "
                                 f"got scope='global'")
            targets = {}
            for k, v in sparsity.items():
                if not isinstance(k, str):
                    raise ValueError(f"{sparsity_arg}: dict keys must be module names or glob "
                                     f"patterns, got {k!r}")
                targets[k] = check_fraction(v, f"{sparsity_arg}[{k!r}]")
        self.modules = select_modules(model, include, exclude, types, filter_fn)
        if isinstance(sparsity, Mapping):
            self.modules = self._restrict_to_dict(targets, sparsity_arg)
        if self.gran.kind == "nm":
            self._check_nm(sparsity, sparsity_arg)
        elif sparsity is None:
            raise ValueError(f"{sparsity_arg}: required (a number in [0, 1) or a dict of "
                             f"per-module targets) for granularity {str(self.gran)!r}")
        elif not isinstance(sparsity, Mapping):
            check_fraction(sparsity, sparsity_arg)
        for name, mod in self.modules.items():
            check_granularity_fits(self.gran, tuple(weight_2d(mod).shape), name)
        if self.crit.needs_calibration:
            if calibration is None:
                raise ValueError(f"calibration: criterion {self.crit.name!r} needs calibration "
                                 f"data (an iterable of input batches), got None")
        self.calibration = calibration

    def _restrict_to_dict(self, targets: dict[str, float], arg: str) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        self.layer_target: dict[str, float] = {}
        used = set()
        for name, mod in self.modules.items():
            if name in targets:  # an exact name wins over glob patterns
                key = name
            else:
                hits = [k for k in targets if fnmatch.fnmatchcase(name, k)]
                if len(hits) > 1:
                    raise ValueError(f"{arg}: module {name!r} matches several keys {hits}")
                if not hits:
                    continue
                key = hits[0]
            used.add(key)
            out[name] = mod
            self.layer_target[name] = targets[key]
        unused = [k for k in targets if k not in used]
        if unused:
            raise ValueError(f"{arg}: keys {unused} match no prunable module; prunable modules: "
                             f"{', '.join(self.modules)}")
        return out

    def _check_nm(self, sparsity: object, arg: str) -> None:
        if self.scope == "global" or isinstance(sparsity, Mapping):
            raise ValueError(f"granularity: N:M pruning ({self.gran}) has a fixed per-group "
                             f"sparsity; use scope='layer' and a single {arg} (or None)")
        if sparsity is not None:
            s = check_fraction(sparsity, arg)
            if abs(s - self.gran.fixed_sparsity) > 1e-9:
                raise ValueError(f"{arg}: {s} contradicts granularity {str(self.gran)!r}, which "
                                 f"implies sparsity {self.gran.fixed_sparsity}; pass None")

    def targets_for(self, sparsity: float | Mapping[str, float] | None) -> dict[str, float]:
        """Per-module target for a uniform value or the dict form (values already validated)."""
        if self.gran.kind == "nm":
            return {n: self.gran.fixed_sparsity for n in self.modules}
        if isinstance(sparsity, Mapping):
            return dict(self.layer_target)  # resolved per module name in __init__
        return {n: float(sparsity) for n in self.modules}

    def compute_masks(self, targets: dict[str, float] | float,
                      already: Mapping[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        """Boolean keep-masks (weight shape) for every selected module.

        ``targets`` is one fraction for ``scope='global'`` (over all selected weights together),
        else a dict of per-module fractions.  ``already`` maps names to masks of earlier pruning
        steps; those weights stay pruned.
        """
        if self.crit.name == "sparsegpt":
            raise ValueError("criterion: 'sparsegpt' chooses masks while reconstructing layers "
                             "one-shot; use prune(..., criterion='sparsegpt') (then "
                             "sparsekit.prune.distill to recover), or a static criterion here")
        norms = (collect_input_norms(self.model, self.modules, self.calibration,
                                     skip_padding=self.skip_padding)
                 if self.crit.needs_calibration else {})
        elems = {n: element_scores(self.crit, n, m, norms.get(n)) for n, m in self.modules.items()}
        prev = {n: (~already[n].reshape(e.shape)) if already is not None else None
                for n, e in elems.items()}
        masks: dict[str, torch.Tensor] = {}
        if self.gran.kind == "nm":
            for n, e in elems.items():
                masks[n] = nm_mask(e, self.gran.n, self.gran.m, prev[n])
        else:
            per = {}
            for n, e in elems.items():
                s, sizes = group_scores(e, self.gran, self.crit.reduce)
                pg = None
                if prev[n] is not None:
                    # A group counts as pruned once all of its elements are.
                    z, _ = group_scores(prev[n].to(torch.float64), self.gran, "sum")
                    pg = z >= sizes.to(torch.float64) - 0.5
                per[n] = (s, sizes, pg)
            if self.scope == "global":
                total = sum(int(e.numel()) for e in elems.values())
                s = torch.cat([p[0].to(torch.float64).cpu() for p in per.values()])
                sz = torch.cat([p[1].cpu() for p in per.values()])
                pg = (torch.cat([p[2].cpu() for p in per.values()])
                      if already is not None else None)
                pruned = select_pruned_groups(s, sz, float(targets) * total, pg)
                off = 0
                for n, (sn, _, _) in per.items():
                    g = pruned[off:off + sn.numel()].to(sn.device)
                    off += sn.numel()
                    masks[n] = expand_group_mask(~g, self.gran, tuple(elems[n].shape))
                dead = [n for n, m in masks.items() if not bool(m.any())]
                if dead and float(targets) > 0:
                    warnings.warn(f"prune: global ranking pruned every weight of {dead}; the "
                                  f"network output no longer depends on its input through them. "
                                  f"Consider criterion='mean', scope='layer' or excluding them.",
                                  RuntimeWarning, stacklevel=3)
            else:
                for n, (sn, sizes, pg) in per.items():
                    t = targets[n] * elems[n].numel()
                    pruned = select_pruned_groups(sn, sizes, t, pg)
                    masks[n] = expand_group_mask(~pruned, self.gran, tuple(elems[n].shape))
        return {n: to_param_shape(self.modules[n], masks[n]) for n in masks}

    def report(self, masks: Mapping[str, torch.Tensor], nonzero_before: Mapping[str, int],
               targets: Mapping[str, float] | None, target: object) -> PruneReport:
        layers = []
        for n, m in self.modules.items():
            w = prunable_weight(m).detach()
            nz = int(torch.count_nonzero(w))
            layers.append(LayerReport(
                name=n, module_type=type(m).__name__, shape=tuple(w.shape),
                granularity=str(self.gran), criterion=self.crit.name,
                target=None if targets is None else targets[n],
                sparsity=1.0 - nz / w.numel(), params=w.numel(),
                nonzero_before=int(nonzero_before[n]), nonzero_after=nz))
        return PruneReport(layers, self.scope, self.crit.name, str(self.gran), target)


def apply_masks(modules: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (``masked_fill`` writes +0.0 exactly)."""
    with torch.no_grad():
        for n, m in modules.items():
            prunable_weight(m).masked_fill_(~masks[n], 0.0)


def count_nonzero(modules: Mapping[str, nn.Module]) -> dict[str, int]:
    return {n: int(torch.count_nonzero(prunable_weight(m).detach())) for n, m in modules.items()}
