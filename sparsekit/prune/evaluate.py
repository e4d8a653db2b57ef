"""Evaluation: accuracy / loss of a classifier, and label-free comparisons of a pruned model with
its dense original (embedding cosine, nearest-neighbour agreement, logit KL, perplexity)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Evaluation", "evaluate", "embedding_cosine", "neighbour_agreement", "logit_kl",
           "mean_pooled_embeddings", "perplexity"]


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


# ----------------------------------------------------------------------------- without labels
def _check_pair(a: object, b: object, arg_a: str, arg_b: str, ndim: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_tensor(a, arg_a), _as_tensor(b, arg_b)
    if a.shape != b.shape:
        raise ValueError(f"{arg_a}: shape {tuple(a.shape)} differs from {arg_b}'s "
                         f"{tuple(b.shape)}")
    if ndim is not None and a.dim() != ndim:
        raise ValueError(f"{arg_a}: expected a {ndim}-D tensor, got shape {tuple(a.shape)}")
    if a.numel() == 0:
        raise ValueError(f"{arg_a}: empty tensor (shape {tuple(a.shape)})")
    return a.detach().to(torch.float64), b.detach().to(torch.float64)


def embedding_cosine(embeddings: object, reference: object) -> float:
    """Mean cosine similarity between matching rows of two ``(N, D)`` embedding matrices.

    Rows with zero norm count as cosine 0 (``torch.nn.functional.cosine_similarity`` with
    ``eps``).  Computed in float64.
    """
    a, b = _check_pair(embeddings, reference, "embeddings", "reference", 2)
    return float(F.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def _neighbours(e: torch.Tensor, k: int) -> torch.Tensor:
    z = F.normalize(e, dim=1, eps=1e-12)
    sim = z @ z.t()
    sim.fill_diagonal_(-math.inf)  # a sentence is not its own neighbour
    # Stable descending order: ties go to the lower index, deterministically.
    return torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]


def neighbour_agreement(embeddings: object, reference: object, k: int = 1) -> float:
    """Mean overlap of the top-``k`` cosine nearest neighbours of each row (self excluded).

    For every row ``i`` the ``k`` rows most similar to it are found among the others, once with
    ``embeddings`` and once with ``reference``; the result is the mean of
    ``|top_k(i) & top_k_ref(i)| / k``.  ``k=1``: the fraction of rows whose nearest neighbour is
    unchanged.  Needs ``N > k`` rows.
    """
    a, b = _check_pair(embeddings, reference, "embeddings", "reference", 2)
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k < a.shape[0]):
        raise ValueError(f"k: expected an int in [1, {a.shape[0] - 1}] for {a.shape[0]} rows, "
                         f"got {k!r}")
    na, nb = _neighbours(a, k), _neighbours(b, k)
    hits = (na[:, :, None] == nb[:, None, :]).any(dim=2).sum(dim=1)
    return float(hits.to(torch.float64).mean() / k)


def logit_kl(logits: object, reference: object, *, temperature: float = 1.0,
             mask: object | None = None) -> float:
    """Mean ``KL(softmax(reference / T) || softmax(logits / T))`` over positions.

    Parameters
    ----------
    logits, reference : Tensor (..., C)
        Student and teacher logits of the same shape.
    temperature : float
        Softmax temperature ``T > 0``.
    mask : Tensor (...), optional
        Boolean / 0-1 weights of the positions that count (e.g. an attention mask).

    Returns
    -------
    float
        Mean KL in nats (0 when the distributions agree).
    """
    a, b = _check_pair(logits, reference, "logits", "reference")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    la = F.log_softmax(a / temperature, dim=-1)
    lb = F.log_softmax(b / temperature, dim=-1)
    kl = (lb.exp() * (lb - la)).sum(dim=-1)
    if mask is None:
        return float(kl.mean())
    m = _as_tensor(mask, "mask").to(torch.float64)
    if tuple(m.shape) != tuple(kl.shape):
        raise ValueError(f"mask: expected shape {tuple(kl.shape)} (the logits without the class "
                         f"dimension), got {tuple(m.shape)}")
    if float(m.sum()) <= 0:
        raise ValueError("mask: selects no position")
    return float((kl * m).sum() / m.sum())


def _output_tensor(out: object, key: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    val = getattr(out, key, None)
    if val is None and isinstance(out, Mapping):
        val = out.get(key)
    if val is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        val = out[0]
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"model: expected a tensor output or an output with {key!r}, got "
                         f"{type(out).__name__}")
    return val


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
                           ) -> torch.Tensor:
    """Sentence embeddings: the token outputs (``last_hidden_state``) averaged over the tokens
    that ``attention_mask`` keeps, as sentence-transformers' mean pooling does.

    ``batches`` are dicts of keyword inputs (tokenizer output) with an ``attention_mask``.  The
    model runs in eval mode; training flags are restored.  Returns ``(N, D)`` float32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    flags = {m: m.training for m in model.modules()}
    model.eval()
    out = []
    try:
        for i, b in enumerate(batches):
            if not isinstance(b, Mapping) or "attention_mask" not in b:
                raise ValueError(f"batches: batch {i} must be a dict of keyword inputs with an "
                                 f"'attention_mask', got {type(b).__name__}")
            h = _output_tensor(model(**b), "last_hidden_state")
            m = b["attention_mask"].to(h.dtype)[..., None]
            out.append((h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9))
    finally:
        for mod, f in flags.items():
            mod.training = f
    if not out:
        raise ValueError("batches: no batch given")
    return torch.cat(out).float()


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: object, attention_mask: object | None = None, *,
               batch_size: int = 8) -> float:
    """Perplexity of a causal language model on given token ids.

    ``exp`` of the mean next-token negative log-likelihood over all predicted positions (token
    ``t+1`` from the logits at ``t``), counting only positions whose target token is kept by
    ``attention_mask``.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(input_ids=..., attention_mask=...)`` (Hugging Face style) returning
        logits ``(B, T, V)`` or an output with ``.logits``.
    input_ids : Tensor (N, T) int
        Token ids (``T >= 2``), e.g. from a tokenizer on the text to score.
    attention_mask : Tensor (N, T), optional
        1 for real tokens, 0 for padding.
    batch_size : int
        Rows per forward call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    ids = _as_tensor(input_ids, "input_ids")
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids: expected an integer (N, T) tensor with T >= 2, got shape "
                         f"{tuple(ids.shape)} dtype {ids.dtype}")
    am = None
    if attention_mask is not None:
        am = _as_tensor(attention_mask, "attention_mask")
        if tuple(am.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask: expected shape {tuple(ids.shape)}, got "
                             f"{tuple(am.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    flags = {m: m.training for m in model.modules()}
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, ids.shape[0], batch_size):
            x = ids[i:i + batch_size].long()
            kw = {"input_ids": x}
            if am is not None:
                kw["attention_mask"] = am[i:i + batch_size]
            logits = _output_tensor(model(**kw), "logits")
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(x.shape):
                raise ValueError(f"model: expected logits of shape ({x.shape[0]}, {x.shape[1]}, "
                                 f"V), got {tuple(logits.shape)}")
            lp = F.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
            tgt = x[:, 1:]
            tok = -lp.gather(-1, tgt[..., None])[..., 0]
            w = (am[i:i + batch_size, 1:].to(torch.float64) if am is not None
                 else torch.ones_like(tok))
            nll += float((tok * w).sum())
            count += int(w.sum())
    finally:
        for mod, f in flags.items():
            mod.training = f
    if count == 0:
        raise ValueError("input_ids: no position to predict (all targets masked)")
    return math.exp(nll / count)
