"""Non-uniform per-layer sparsity at an exact total: OWL (outlier-weighted layerwise) allocation.

Yin et al. (2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity") observe that layers with many *outlier* Wanda scores
(``|w_ij| * ||x_j||`` above ``m`` times the layer's mean score) lose the most when pruned.  OWL
gives every group of layers (a transformer block by default) a sparsity that falls linearly with
its outlier ratio ``D_g``:

    ``keep_g = 2 * lam * (D_g - min D) / (max D - min D) + c``,

so the sparsities span ``[s - lam, s + lam]`` around the target ``s``, with ``c`` chosen so that
the *weight-count-weighted* mean sparsity is exactly ``s``.  Groups are weighted by their number
of weights (OWL's own code averages per block, which is the same for equal-sized blocks).

The result is a ``{module name: sparsity}`` dict for :func:`~sparsekit.prune.prune` (or the
``allocation="owl"`` shortcut of ``prune``).  Per-module fractions are ``count / numel`` with
integer counts that add up to ``round(s * total)``, so the pruned model's total sparsity is exact
to one weight, whichever criterion then chooses the masks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .._layers import Filter
from ._core import check_fraction, select_modules
from .criteria import collect_input_norms, element_scores, resolve_criterion

__all__ = ["OWL", "owl_sparsities", "allocate_exact"]


@dataclass(frozen=True)
class OWL:
    """OWL allocation settings.

    Attributes
    ----------
    lam : float
        Half-width of the sparsity range around the target (OWL's ``lambda``; 0.08 in the paper).
    m : float
        Outlier threshold as a multiple of the group's mean Wanda score (OWL's ``M``; 5).
    group : "block", "module" or callable
        How modules are grouped: ``"block"``, by the qualified name up to its first numeric
        component (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``; modules without
        one form their own group); ``"module"``, every module alone; or ``fn(name) -> key``.
    """

    lam: float = 0.08
    m: float = 5.0
    group: str | Callable[[str], object] = "block"

    def __post_init__(self) -> None:
        for arg, v in (("lam", self.lam), ("m", self.m)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v >= 0):
                raise ValueError(f"OWL.{arg}: expected a finite number >= 0, got {v!r}")
        if not (callable(self.group) or self.group in ("block", "module")):
            raise ValueError(f"OWL.group: expected 'block', 'module' or a callable "
                             f"fn(name) -> key, got {self.group!r}")


def _group_key(group: str | Callable[[str], object], name: str) -> object:
    if callable(group):
        return group(name)
    if group == "module":
        return name
    m = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
    return m.group(1) if m else name


def allocate_exact(sparsities: dict[str, float], numels: dict[str, int], total_target: float
                   ) -> dict[str, float]:
    """Round per-module sparsities to integer counts that sum to ``round(total * numel)``.

    Returns fractions ``count / numel`` (so ``prune`` reaches each count exactly).  Largest
    remainders decide which modules round up; no module goes below 0 or to 100 %.
    """
    names = list(sparsities)
    total = sum(numels[n] for n in names)
    want = int(math.floor(total_target * total + 0.5))
    raw = {n: sparsities[n] * numels[n] for n in names}
    cnt = {n: min(max(int(math.floor(raw[n])), 0), numels[n] - 1) for n in names}
    diff = want - sum(cnt.values())
    # Hand out the rounding difference one weight at a time: up by largest remainder, down by
    # smallest (stable order for ties), skipping modules at their bounds.
    order = sorted(names, key=lambda n: (-(raw[n] - math.floor(raw[n])), names.index(n)))
    step = 1 if diff > 0 else -1
    if step < 0:
        order.reverse()
    while diff != 0:
        moved = False
        for n in order:
            if diff == 0:
                break
            if 0 <= cnt[n] + step <= numels[n] - 1:
                cnt[n] += step
                diff -= step
                moved = True
        if not moved:
            raise ValueError(f"sparsity: cannot place {want} pruned weights in modules of "
                             f"{total} weights while keeping one weight per module")
    return {n: cnt[n] / numels[n] for n in names}


def _spread(ratios: dict[object, float], sizes: dict[object, int], target: float, lam: float,
            max_sparsity: float) -> dict[object, float]:
    """OWL's linear map from outlier ratio to sparsity with an exact weighted mean ``target``.

    Values outside ``[0, max_sparsity]`` are clipped and the rest re-centred (a few rounds of
    water-filling), so the weighted mean stays exactly ``target``.
    """
    keys = list(ratios)
    lo, hi = min(ratios.values()), max(ratios.values())
    if hi - lo <= 0 or lam == 0:
        return {k: target for k in keys}
    offset = {k: -2.0 * lam * (ratios[k] - lo) / (hi - lo) for k in keys}  # more outliers: less
    free = set(keys)
    fixed: dict[object, float] = {}
    for _ in range(len(keys) + 1):
        n_free = sum(sizes[k] for k in free)
        need = target * sum(sizes.values()) - sum(fixed[k] * sizes[k] for k in fixed)
        c = (need - sum(offset[k] * sizes[k] for k in free)) / n_free
        vals = {k: offset[k] + c for k in free}
        out = [k for k, v in vals.items() if v < 0.0 or v > max_sparsity]
        if not out:
            return {**fixed, **vals}
        for k in out:
            fixed[k] = min(max(vals[k], 0.0), max_sparsity)
            free.discard(k)
        if not free:
            break
    raise ValueError(f"sparsity: OWL cannot reach the target {target} within [0, {max_sparsity}] "
                     f"per layer; lower lam")


def owl_sparsities(model: nn.Module, sparsity: float, calibration: Iterable[object], *,
                   owl: OWL | None = None, include: Filter = None, exclude: Filter = None,
                   types: object = "auto",
                   filter_fn: Callable[[str, nn.Module], bool] | None = None,
                   skip_padding: bool = True, max_sparsity: float = 0.99) -> dict[str, float]:
    """Per-module sparsities by OWL whose weight-weighted total is exactly ``sparsity``.

    Parameters
    ----------
    model : nn.Module
        Not modified (one no-grad pass over ``calibration`` collects the input norms).
    sparsity : float
        Total target over all selected modules, in [0, 1).
    calibration : iterable of batches
        As for ``criterion="wanda"``.
    owl : OWL, optional
        Settings (default ``OWL()``: ``lam=0.08``, ``m=5``, per block).
    include, exclude, types, filter_fn
        Module selection, exactly as :func:`~sparsekit.prune.prune` reads them.
    skip_padding : bool
        Leave padding tokens out of the input norms (dict batches with an ``attention_mask``).
    max_sparsity : float
        Upper clip of any module's sparsity.

    Returns
    -------
    dict of str to float
        ``{module name: sparsity}``; ``sum(s * numel)`` equals ``round(sparsity * total)`` exactly.
    """
    s = check_fraction(sparsity, "sparsity")
    if owl is None:
        owl = OWL()
    if not isinstance(owl, OWL):
        raise ValueError(f"owl: expected an OWL(...) instance, got {type(owl).__name__}")
    check_fraction(max_sparsity, "max_sparsity")
    modules = select_modules(model, include, exclude, types, filter_fn)
    norms = collect_input_norms(model, modules, calibration, skip_padding=skip_padding)
    crit = resolve_criterion("wanda")
    numels: dict[str, int] = {}
    group_of: dict[str, object] = {}
    scores: dict[object, list[torch.Tensor]] = {}
    for n, mod in modules.items():
        e = element_scores(crit, n, mod, norms[n])
        numels[n] = int(e.numel())
        g = _group_key(owl.group, n)
        group_of[n] = g
        scores.setdefault(g, []).append(e.reshape(-1))
    ratios, sizes = {}, {}
    for g, parts in scores.items():
        allv = torch.cat(parts)
        ratios[g] = float((allv > owl.m * allv.mean()).to(torch.float64).mean())
        sizes[g] = int(allv.numel())
    per_group = _spread(ratios, sizes, s, float(owl.lam), float(max_sparsity))
    return allocate_exact({n: per_group[group_of[n]] for n in modules}, numels, s)
