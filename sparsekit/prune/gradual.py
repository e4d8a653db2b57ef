"""Gradual magnitude pruning during training (Zhu & Gupta, 2017, "To prune, or not to prune")."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .._layers import prunable_weight
from ._core import Engine, Filter, PruneReport, apply_masks, check_fraction

__all__ = ["GradualPruner", "sparsity_schedule", "SCHEDULES"]

SCHEDULES = ("cubic", "linear")


def _check_step(value: object, arg: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg}: expected an int >= {minimum}, got {value!r}")
    return value


def sparsity_schedule(step: int, *, initial_sparsity: float, final_sparsity: float,
                      start_step: int, end_step: int, frequency: int = 1,
                      schedule: str = "cubic") -> float:
    """Target sparsity at training step ``step``.

    ``cubic`` (Zhu & Gupta): ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))**3``;
    ``linear``: ``s_t = s_i + (s_f - s_i) * (t - t0) / (t_end - t0)``.  ``t`` is quantised down
    to the pruning steps ``t0, t0 + frequency, ...``; ``s_t = 0`` before ``t0`` and ``s_f`` from
    ``t_end`` on (so the final sparsity is reached at ``end_step`` even when ``end_step - t0`` is
    not a multiple of ``frequency``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if step < start_step:
        return 0.0
    if step >= end_step:
        return final_sparsity
    t = start_step + ((step - start_step) // frequency) * frequency
    frac = (t - start_step) / (end_step - start_step)
    if schedule == "cubic":
        return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3
    return initial_sparsity + (final_sparsity - initial_sparsity) * frac


class GradualPruner:
    """Prune gradually while training; pruned weights stay exactly zero.

    Call :meth:`step` once per training step, after ``optimizer.step()``.  At the pruning steps of
    the schedule (see :func:`sparsity_schedule`) new masks are computed from the current weights
    (already-pruned weights stay pruned); in between, the masks are kept by

    * a gradient hook on every pruned weight (``grad *= mask``), so plain SGD and weight decay
      cannot move a zero;
    * zeroing the optimizer's per-parameter state (momentum buffers, Adam's ``exp_avg`` /
      ``exp_avg_sq`` / ``max_exp_avg_sq`` ...: every state tensor shaped like the weight) at each
      mask update, when ``optimizer`` is given: a momentum buffer built up before a weight was
      pruned would otherwise keep pushing it away from zero;
    * re-applying the masks right after every ``optimizer.step()`` (an optimizer step post-hook,
      when ``optimizer`` is given) and in every :meth:`step`.

    Without ``optimizer`` the weights are exactly zero after each :meth:`step` call, but not
    between ``optimizer.step()`` and :meth:`step`.  :meth:`finalize` removes all hooks and leaves
    plain weights with exact zeros.

    Parameters
    ----------
    model : nn.Module
    final_sparsity : float or dict of str to float
        Target reached at ``end_step``: one value, or per-module targets (names or glob patterns,
        ``scope='layer'`` only).  None only for N:M granularity (fixed sparsity, applied in full
        at ``start_step`` and then maintained).
    initial_sparsity : float
        ``s_i``, the target at ``start_step`` (must not exceed any final target).
    start_step, end_step : int
        First and last pruning step (``end_step >= start_step``).
    frequency : int
        Steps between mask updates (``Δt``).
    schedule : {"cubic", "linear"}
    optimizer : torch.optim.Optimizer, optional
        Enables state zeroing and the post-step mask re-application (recommended).
    criterion, granularity, scope, include, exclude, filter_fn, types, calibration
        As for :func:`sparsekit.prune.prune`.  Wanda re-runs ``calibration`` at each mask update,
        so it must be re-iterable (a list or a DataLoader, not a generator).
    """

    def __init__(self, model: nn.Module, final_sparsity: float | Mapping[str, float] | None,
                 *, initial_sparsity: float = 0.0, start_step: int = 0, end_step: int,
                 frequency: int = 100, schedule: str = "cubic",
                 criterion: str | Callable[[torch.Tensor, nn.Module], torch.Tensor] = "l1",
                 granularity: str | tuple[int, int] = "unstructured", scope: str = "layer",
                 include: Filter = None, exclude: Filter = None,
                 filter_fn: Callable[[str, nn.Module], bool] | None = None,
                 types: str | type | tuple[type, ...] = "auto",
                 calibration: Iterable[object] | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
        self.start_step = _check_step(start_step, "start_step", 0)
        self.end_step = _check_step(end_step, "end_step", self.start_step)
        self.frequency = _check_step(frequency, "frequency", 1)
        self.initial_sparsity = check_fraction(initial_sparsity, "initial_sparsity")
        if calibration is not None and isinstance(calibration, Iterator):
            raise ValueError("calibration: GradualPruner re-runs the calibration data at every "
                             "mask update; pass a re-iterable (list, DataLoader), not a one-shot "
                             f"iterator ({type(calibration).__name__})")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer: expected a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}")
        self._engine = Engine(model, final_sparsity, criterion=criterion, granularity=granularity,
                              scope=scope, include=include, exclude=exclude, types=types,
                              calibration=calibration, sparsity_arg="final_sparsity",
                              filter_fn=filter_fn)
        if self._engine.crit.name == "sparsegpt":
            raise ValueError("criterion: 'sparsegpt' is one-shot (masks are chosen while layers "
                             "are reconstructed); for a gradual schedule use a static criterion "
                             "with sparsekit.prune.distill, or prune(..., criterion='sparsegpt') "
                             "followed by distill")
        self.schedule = schedule
        self.scope = scope
        self.optimizer = optimizer
        fixed = self._engine.gran.fixed_sparsity
        self._final: float | dict[str, float]
        if isinstance(final_sparsity, Mapping):
            self._final = self._engine.targets_for(final_sparsity)
        else:
            self._final = fixed if fixed is not None else float(final_sparsity)
        finals = list(self._final.values()) if isinstance(self._final, dict) else [self._final]
        if fixed is None and any(self.initial_sparsity > f for f in finals):
            raise ValueError(f"initial_sparsity: {self.initial_sparsity} exceeds the final "
                             f"sparsity {min(finals)}; masks only grow")
        self._modules = self._engine.modules
        self._masks = {n: torch.ones_like(prunable_weight(m), dtype=torch.bool)
                       for n, m in self._modules.items()}
        self._nonzero_start = {n: int(torch.count_nonzero(prunable_weight(m).detach()))
                               for n, m in self._modules.items()}
        self._handles = [prunable_weight(m).register_hook(self._grad_hook(n))
                         for n, m in self._modules.items()]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(
                lambda opt, args, kwargs: apply_masks(self._modules, self._masks)))
        self._step = 0
        self._applied: float | dict[str, float] | None = None
        self._finalized = False

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        # Looks the mask up at call time so mask updates need no re-registration.
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(~self._masks[name], 0.0)

        return hook

    # ------------------------------------------------------------------ schedule
    def sparsity_at(self, step: int) -> float | dict[str, float]:
        """Scheduled target at ``step``: a float (global scope or one uniform target) or a dict."""
        kw = dict(initial_sparsity=self.initial_sparsity, start_step=self.start_step,
                  end_step=self.end_step, frequency=self.frequency, schedule=self.schedule)
        fixed = self._engine.gran.fixed_sparsity
        if fixed is not None:  # N:M: all at once from start_step on
            return fixed if step >= self.start_step else 0.0
        if isinstance(self._final, dict):
            return {n: sparsity_schedule(step, final_sparsity=f, **kw)
                    for n, f in self._final.items()}
        return sparsity_schedule(step, final_sparsity=self._final, **kw)

    # ------------------------------------------------------------------ training loop API
    def step(self, step: int | None = None) -> float | dict[str, float]:
        """Advance one training step (or jump to ``step``); update masks when the target grows.

        Returns the target sparsity now in force.
        """
        if self._finalized:
            raise RuntimeError("GradualPruner.step: finalize() was already called")
        t = self._step if step is None else _check_step(step, "step", 0)
        self._step = t + 1
        target = self.sparsity_at(t)
        if target != self._applied and _positive(target):
            self._update_masks(target)
            self._applied = target
        apply_masks(self._modules, self._masks)
        return target

    def _update_masks(self, target: float | dict[str, float]) -> None:
        if isinstance(target, dict):
            targets: float | dict[str, float] = target
        elif self.scope == "global":
            targets = target
        else:
            targets = {n: target for n in self._modules}
        new = self._engine.compute_masks(targets, already=self._masks)
        for n, m in new.items():
            self._masks[n].copy_(m)
        apply_masks(self._modules, self._masks)
        self._zero_optimizer_state()

    def _zero_optimizer_state(self) -> None:
        if self.optimizer is None:
            return
        with torch.no_grad():
            for n, mod in self._modules.items():
                state = self.optimizer.state.get(prunable_weight(mod), {})
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.shape == prunable_weight(mod).shape:
                        v.masked_fill_(~self._masks[n], 0)

    # ------------------------------------------------------------------ introspection
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Copies of the current boolean keep-masks (``True`` = kept), by module name."""
        return {n: m.clone() for n, m in self._masks.items()}

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The modules being pruned, by qualified name."""
        return dict(self._modules)

    @property
    def current_step(self) -> int:
        """Index of the next :meth:`step` call."""
        return self._step

    def sparsity(self, per_layer: bool = False) -> float | dict[str, float]:
        """Fraction of masked weights overall, or per module with ``per_layer=True``."""
        if per_layer:
            return {n: 1.0 - float(m.sum()) / m.numel() for n, m in self._masks.items()}
        total = sum(m.numel() for m in self._masks.values())
        return 1.0 - sum(float(m.sum()) for m in self._masks.values()) / total

    def report(self) -> PruneReport:
        """Per-layer report at the current step (targets are the values now in force)."""
        tgt = self._applied if self._applied is not None else 0.0
        targets = None if self.scope == "global" else (
            tgt if isinstance(tgt, dict) else {n: tgt for n in self._modules})
        rep = self._engine.report(self._masks, self._nonzero_start, targets, tgt)
        rep.extra = {"step": self._step, "schedule": self.schedule,
                     "start_step": self.start_step, "end_step": self.end_step,
                     "frequency": self.frequency}
        return rep

    def state_dict(self) -> dict:
        """Step counter and masks, for resuming with :meth:`load_state_dict`."""
        return {"step": self._step, "applied": self._applied, "masks": self.masks}

    def load_state_dict(self, state: Mapping) -> None:
        masks = state["masks"]
        if set(masks) != set(self._masks):
            raise ValueError(f"state: masks for {sorted(masks)} do not match the pruned modules "
                             f"{sorted(self._masks)}")
        for n, m in masks.items():
            if m.shape != self._masks[n].shape:
                raise ValueError(f"state: mask {n!r} has shape {tuple(m.shape)}, expected "
                                 f"{tuple(self._masks[n].shape)}")
            self._masks[n].copy_(m)
        self._step = int(state["step"])
        self._applied = state["applied"]
        apply_masks(self._modules, self._masks)
        self._zero_optimizer_state()

    def finalize(self) -> PruneReport:
        """Apply the masks a last time, remove every hook, and return the final report."""
        if not self._finalized:
            apply_masks(self._modules, self._masks)
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._finalized = True
        return self.report()

    def __repr__(self) -> str:
        return (f"GradualPruner(modules={list(self._modules)}, step={self._step}, "
                f"schedule={self.schedule!r}, sparsity={self.sparsity():.4f})")


def _positive(target: float | dict[str, float]) -> bool:
    if isinstance(target, dict):
        return any(v > 0 for v in target.values())
    return target > 0
