"""Accuracy / loss evaluation of a classifier."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Evaluation", "evaluate"]


class Evaluation(NamedTuple):
    """``accuracy`` in [0, 1], mean cross-entropy ``loss`` and the number of samples ``n``."""

    accuracy: float
    loss: float
    n: int


def _as_tensor(a: object, arg: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    raise TypeError(f"{arg}: expected a torch.Tensor or numpy.ndarray, got {type(a).__name__}")


def _batches(data: object, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(
            isinstance(a, (torch.Tensor, np.ndarray)) for a in data):
        x, y = _as_tensor(data[0], "data[0]"), _as_tensor(data[1], "data[1]")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: inputs have {x.shape[0]} rows but targets {y.shape[0]}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    for i, b in enumerate(data):
        if not (isinstance(b, (tuple, list)) and len(b) >= 2):
            raise ValueError(f"data: batch {i} must be an (inputs, targets) pair, got "
                             f"{type(b).__name__}")
        yield (_as_tensor(b[0], f"data batch {i} inputs"),
               _as_tensor(b[1], f"data batch {i} targets"))


@torch.no_grad()
def evaluate(model: nn.Module, data: object, *, batch_size: int = 1024) -> Evaluation:
    """Classification accuracy and mean cross-entropy of ``model`` (logits output).

    Parameters
    ----------
    model : nn.Module
        Returns logits ``(N, C)``.  Run in eval mode; its training flags are restored afterwards.
    data : (inputs, targets) arrays or iterable of (inputs, targets) batches
        A tuple of two tensors / numpy arrays (batched here by ``batch_size``), or a DataLoader.
        Targets are integer class ids in ``[0, C)``.
    batch_size : int
        Batch size used for array inputs.

    Returns
    -------
    Evaluation
        ``(accuracy, loss, n)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    flags = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    correct, loss_sum, n = 0, 0.0, 0
    model.eval()
    try:
        for x, y in _batches(data, batch_size):
            x = x.to(device=device, dtype=param.dtype if param is not None else torch.float32)
            y = y.to(device=device, dtype=torch.int64)
            logits = model(x)
            if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
                raise ValueError(f"model: expected logits of shape ({y.shape[0]}, C), got "
                                 f"{tuple(logits.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
                raise ValueError(f"data: targets must be in [0, {logits.shape[1]}), got range "
                                 f"[{int(y.min())}, {int(y.max())}]")
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            n += y.shape[0]
    finally:
        for m, f in flags.items():
            m.training = f
    if n == 0:
        raise ValueError("data: no samples to evaluate")
    return Evaluation(correct / n, loss_sum / n, n)
