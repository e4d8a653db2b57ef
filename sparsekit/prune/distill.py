"""Recovery by distillation: fine-tune a pruned model against its dense teacher on unlabeled inputs.

The student (the pruned model) is trained to reproduce the teacher's outputs on any inputs, so no
labels are needed: ``loss="logits"`` matches softened output distributions (KL divergence at a
temperature, Hinton et al., 2015), ``loss="hidden"`` the final hidden states / tensor output
(mean squared error normalised by the teacher's mean square), ``loss="hidden_all"`` every hidden
state a Hugging Face model returns with ``output_hidden_states=True`` (layer-wise matching as in
the gradual-pruning-with-distillation recipes of Sanh et al., 2020 and Kurtic et al., 2022),
``loss="pooled"`` the mean-pooled final hidden state (the sentence embedding of
sentence-transformers models) by ``1 - cosine``, and ``loss="hidden_all+pooled"`` the sum of the
two.  For dict batches with an ``attention_mask`` only real tokens count.

Sparsity is kept *exactly*: the zero pattern of every pruned module is frozen when ``distill``
starts (or taken from a :class:`~sparsekit.prune.GradualPruner`, whose schedule then keeps
growing it); gradients of pruned weights are masked and the masks are re-applied after every
optimizer step, so after ``distill`` the zeros are exactly where they were (or where the pruner
put them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._core import SUPPORTED_TYPES, Filter, apply_masks, select_modules
from .gradual import GradualPruner
from .sparsegpt import run_batch

__all__ = ["distill", "DistillReport", "LOSSES"]

LOSSES = ("auto", "logits", "hidden", "hidden_all", "pooled", "hidden_all+pooled")


@dataclass
class DistillReport:
    """What :func:`distill` did: steps, losses (first / last 10 mean), time and the loss used."""

    steps: int
    loss: str
    seconds: float
    first_loss: float
    final_loss: float
    losses: list[float] = field(repr=False, default_factory=list)
    masked_modules: list[str] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "loss": self.loss, "seconds": self.seconds,
                "first_loss": self.first_loss, "final_loss": self.final_loss,
                "masked_modules": list(self.masked_modules)}


def _get(out: object, key: str) -> object:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


def _resolve_loss(loss: object, out: object) -> str:
    if callable(loss) and not isinstance(loss, str):
        return "callable"
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES} or a callable fn(student_out, "
                         f"teacher_out, batch) -> scalar tensor, got {loss!r}")
    if loss != "auto":
        return str(loss)
    if isinstance(out, torch.Tensor):
        return "hidden"
    if isinstance(_get(out, "logits"), torch.Tensor):
        return "logits"
    if _get(out, "hidden_states") is not None:
        return "hidden_all"
    if isinstance(_get(out, "last_hidden_state"), torch.Tensor):
        return "hidden"
    raise ValueError(f"loss: cannot infer what to match in a model output of type "
                     f"{type(out).__name__}; pass loss='logits'/'hidden' or a callable")


def _token_weights(batch: object, like: torch.Tensor) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        am = batch["attention_mask"]
        if like.dim() >= 2 and tuple(like.shape[:2]) == tuple(am.shape):
            return am.to(like.dtype)
    return None


def _mse(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over (weighted) positions, normalised by the teacher's mean square."""
    d = (s - t).pow(2)
    tt = t.pow(2)
    if w is not None:
        shape = w.shape + (1,) * (d.dim() - w.dim())
        ww = w.reshape(shape)
        return (d * ww).sum() / (tt * ww).sum().clamp_min(1e-12)
    return d.sum() / tt.sum().clamp_min(1e-12)


def _tensor_out(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("last_hidden_state", "logits"):
        v = _get(out, key)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"loss: model output of type {type(out).__name__} has no tensor to match")


def _pooled(out: object, batch: object) -> torch.Tensor:
    """Mean over real tokens of the final hidden state (``(B, T, D)`` -> ``(B, D)``)."""
    h = _tensor_out(out)
    if h.dim() != 3:
        raise ValueError(f"loss: 'pooled' needs a (batch, tokens, features) output, got shape "
                         f"{tuple(h.shape)}")
    w = _token_weights(batch, h)
    if w is None:
        return h.mean(dim=1)
    return (h * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1)


def _loss(kind: str, s_out: object, t_out: object, batch: object, temperature: float
          ) -> torch.Tensor:
    if kind == "hidden_all+pooled":
        return (_loss("hidden_all", s_out, t_out, batch, temperature)
                + _loss("pooled", s_out, t_out, batch, temperature))
    if kind == "pooled":
        ps, pt = _pooled(s_out, batch), _pooled(t_out, batch)
        return (1.0 - F.cosine_similarity(ps.float(), pt.float(), dim=-1)).mean()
    if kind == "logits":
        s, t = _get(s_out, "logits"), _get(t_out, "logits")
        if s is None and isinstance(s_out, torch.Tensor):
            s, t = s_out, t_out
        if not isinstance(s, torch.Tensor):
            raise ValueError("loss: 'logits' needs a tensor output or an output with .logits")
        ls = F.log_softmax(s.float() / temperature, dim=-1)
        lt = F.log_softmax(t.float() / temperature, dim=-1)
        kl = (lt.exp() * (lt - ls)).sum(dim=-1) * temperature ** 2
        w = _token_weights(batch, s)
        return (kl * w).sum() / w.sum().clamp_min(1) if w is not None else kl.mean()
    if kind == "hidden_all":
        hs, ht = _get(s_out, "hidden_states"), _get(t_out, "hidden_states")
        if hs is None or ht is None:
            raise ValueError("loss: 'hidden_all' needs a model returning hidden_states with "
                             "output_hidden_states=True (a Hugging Face model fed dict batches)")
        # The embedding output (index 0) is included: pruning never touches it, so its term is 0
        # unless embeddings are trained.
        terms = [_mse(a, b, _token_weights(batch, a)) for a, b in zip(hs, ht, strict=True)]
        return torch.stack(terms).mean()
    s, t = _tensor_out(s_out), _tensor_out(t_out)
    return _mse(s, t, _token_weights(batch, s))


def _forward(model: nn.Module, batch: object, device: torch.device | None, all_hidden: bool
             ) -> object:
    if all_hidden:
        if not isinstance(batch, Mapping):
            raise ValueError("loss: 'hidden_all' needs dict batches (keyword inputs)")
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) and device is not None
                        else v for k, v in batch.items()}, output_hidden_states=True)
    return run_batch(model, batch, device)


def _detach(out: object) -> object:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(o) for o in out)
    if isinstance(out, Mapping):
        return {k: _detach(v) for k, v in out.items()}
    return out


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def distill(student: nn.Module, teacher: nn.Module, data: Iterable[object], *, steps: int,
            lr: float = 1e-4, loss: str | Callable[[object, object, object], torch.Tensor] = "auto",
            temperature: float = 2.0, optimizer: torch.optim.Optimizer | None = None,
            pruner: GradualPruner | None = None, include: Filter = None, exclude: Filter = None,
            types: type | tuple[type, ...] = SUPPORTED_TYPES, warmup: float = 0.1,
            max_grad_norm: float | None = 1.0, train_mode: bool = False,
            cache_teacher: bool | dict = False, seed: int = 0,
            callback: Callable[[int, float], None] | None = None) -> DistillReport:
    """Fine-tune the pruned ``student`` to match its dense ``teacher`` on unlabeled ``data``.

    Parameters
    ----------
    student : nn.Module
        The pruned model; trained in place.  Its zero weights in the selected modules (``include``
        / ``exclude`` / ``types``, as for :func:`~sparsekit.prune.prune`) stay exactly zero.
    teacher : nn.Module
        The dense model (e.g. a ``copy.deepcopy`` taken before pruning); run in eval mode under
        ``no_grad``, never modified.
    data : iterable of batches
        Tensors, ``(inputs, ...)`` tuples (the first element is fed) or dicts of keyword inputs.
        Cycled (re-iterated) until ``steps`` optimizer steps are done.
    steps : int
        Number of optimizer steps.  CPU budget: one step costs about one teacher forward (unless
        cached) plus one student forward and backward.
    lr : float
        Peak learning rate of the default AdamW optimizer (linear warm-up over ``warmup`` of the
        steps, then cosine decay to 0; also applied to a given ``optimizer``'s groups).
    loss : {"auto", "logits", "hidden", "hidden_all", "pooled", "hidden_all+pooled"} or callable
        What to match (see the module docs).  ``"auto"``: logits if the output has them, else the
        tensor / ``last_hidden_state`` output.  A callable gets ``(student_out, teacher_out,
        batch)`` and returns a scalar tensor.
    temperature : float
        Softmax temperature for ``"logits"`` (the KL is scaled by ``T**2``).
    optimizer : torch.optim.Optimizer, optional
        Default: ``AdamW(student.parameters(), lr, weight_decay=0)``.
    pruner : GradualPruner, optional
        A pruner bound to ``student`` (and preferably to ``optimizer``): ``pruner.step()`` is
        called after every optimizer step, so its schedule prunes while distilling; its masks are
        used instead of the frozen zero pattern.  Call ``pruner.finalize()`` afterwards.
    warmup : float
        Fraction of ``steps`` used for linear learning-rate warm-up.
    max_grad_norm : float, optional
        Gradient-norm clipping (None: off).
    train_mode : bool
        Run the student in train mode (dropout on).  Off by default: short CPU recoveries converge
        faster and are deterministic without dropout.
    cache_teacher : bool or dict
        Keep the teacher's outputs for each batch of a ``Sequence`` ``data`` (saves a forward per
        step when the data is cycled; costs their memory).  A dict is used as the cache and
        filled, so several ``distill`` calls with the same teacher, data and loss can share it.
    seed : int
        Seeds torch's RNG for the run (the global RNG state is restored afterwards).
    callback : callable, optional
        ``callback(step, loss)`` after every step.

    Returns
    -------
    DistillReport
    """
    for arg, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{arg}: expected a torch.nn.Module, got {type(m).__name__}")
    if student is teacher:
        raise ValueError("teacher: must be a separate (dense) model, got the student itself; "
                         "take copy.deepcopy(model) before pruning")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0):
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if not isinstance(warmup, (int, float)) or not (0 <= warmup < 1):
        raise ValueError(f"warmup: expected a fraction in [0, 1), got {warmup!r}")
    if isinstance(data, (torch.Tensor, Mapping)):
        raise ValueError(f"data: expected an iterable of batches, got a single "
                         f"{type(data).__name__}; wrap it in a list")
    if pruner is not None:
        if not isinstance(pruner, GradualPruner):
            raise ValueError(f"pruner: expected a GradualPruner, got {type(pruner).__name__}")
        if any(m is not d for m, d in zip(pruner.modules.values(),
                                          [dict(student.named_modules()).get(n)
                                           for n in pruner.modules], strict=True)):
            raise ValueError("pruner: it prunes modules that are not the student's")
        modules, masks = pruner.modules, None
    else:
        modules = select_modules(student, include, exclude, types)
        masks = {n: m.weight.detach() != 0 for n, m in modules.items()}
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad],
                                      lr=lr, weight_decay=0.0)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: expected a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}")
    param = next(student.parameters(), None)
    device = param.device if param is not None else None
    handles = []
    if masks is not None:
        for n, m in modules.items():
            handles.append(m.weight.register_hook(
                lambda g, k=masks[n]: g.masked_fill(~k, 0.0)))
    flags_s = {m: m.training for m in student.modules()}
    flags_t = {m: m.training for m in teacher.modules()}
    cache: dict = cache_teacher if isinstance(cache_teacher, dict) else {}
    cacheable = bool(cache_teacher is not False) and isinstance(data, Sequence)
    n_warm = int(round(warmup * steps))
    base_lrs = [lr for _ in optimizer.param_groups]
    losses: list[float] = []
    kind = None
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            teacher.eval()
            student.train(train_mode)
            step = 0
            while step < steps:
                got = False
                for bi, batch in enumerate(data):
                    got = True
                    if kind is None:
                        with torch.no_grad():
                            probe = run_batch(teacher, batch, device)
                        kind = _resolve_loss(loss, probe)
                    all_hidden = kind in ("hidden_all", "hidden_all+pooled")
                    key = (bi, kind)
                    if cacheable and key in cache:
                        t_out = cache[key]
                    else:
                        with torch.no_grad():
                            t_out = _detach(_forward(teacher, batch, device, all_hidden))
                        if cacheable:
                            cache[key] = t_out
                    for g, b in zip(optimizer.param_groups, base_lrs, strict=True):
                        g["lr"] = b * _lr_factor(step, steps, n_warm)
                    s_out = _forward(student, batch, device, all_hidden)
                    if kind == "callable":
                        value = loss(s_out, t_out, batch)
                    else:
                        value = _loss(kind, s_out, t_out, batch, float(temperature))
                    if not isinstance(value, torch.Tensor) or value.dim() != 0:
                        raise ValueError("loss: the callable must return a scalar tensor")
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
                    optimizer.step()
                    if masks is not None:
                        apply_masks(modules, masks)
                    if pruner is not None:
                        pruner.step()
                    lv = float(value.detach())
                    if not math.isfinite(lv):
                        raise FloatingPointError(f"distill: loss became {lv} at step {step}; "
                                                 f"lower lr (got {lr})")
                    losses.append(lv)
                    if callback is not None:
                        callback(step, lv)
                    step += 1
                    if step >= steps:
                        break
                if not got:
                    raise ValueError("data: the iterable yielded no batches (a one-shot iterator "
                                     "that was already consumed? pass a list or a DataLoader)")
        finally:
            for h in handles:
                h.remove()
            for m, f in flags_s.items():
                m.training = f
            for m, f in flags_t.items():
                m.training = f
            optimizer.zero_grad(set_to_none=True)
    tail = losses[-10:]
    return DistillReport(steps=len(losses), loss=str(kind), seconds=time.perf_counter() - t0,
                         first_loss=losses[0], final_loss=sum(tail) / len(tail), losses=losses,
                         masked_modules=list(modules))
