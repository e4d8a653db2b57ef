"""The example server's model: a pruned, sparsified MNIST MLP stored with ``sparsekit.save``.

The file holds only tensors (safetensors, no pickle). The MLP's layer widths are recorded in the
file's user metadata (``examples.server.layers``), so :func:`load_model` can rebuild the dense
architecture and let :func:`sparsekit.load` install the sparse layers into it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import sparsekit

LAYERS_KEY = "examples.server.layers"
INFO_KEY = "examples.server.info"


def build_mlp(layers: list[int]) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with the given widths (input first, classes last)."""
    if len(layers) < 2 or any(not isinstance(n, int) or n <= 0 for n in layers):
        raise ValueError(f"layers: expected >= 2 positive ints, got {layers!r}")
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(layers[:-1], layers[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(layers) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def _masked_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: Any,
                  masks: dict[str, torch.Tensor] | None, gen: torch.Generator,
                  batch: int = 128) -> None:
    model.train()
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch):
        idx = perm[i:i + batch]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if masks:  # keep pruned weights at exactly zero while fine-tuning
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in masks:
                        p.mul_(masks[name])


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def create_model(
    path: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    hidden: tuple[int, ...] = (256, 128),
    sparsity: float = 0.9,
    epochs: int | None = None,
    finetune_epochs: int | None = None,
    max_train: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train an MLP, prune it to ``sparsity``, fine-tune, sparsify and save it to ``path``.

    Parameters
    ----------
    path : path-like
        Output ``.safetensors`` file (written atomically by ``sparsekit.save``).
    data : path-like, optional
        MNIST ``.npz`` (or IDX directory) for :func:`sparsekit.datasets.load_mnist`; without it
        (and without ``$SPARSEKIT_MNIST``) scikit-learn's 8x8 digits are used (64 features).
    hidden : tuple of int
        Hidden layer widths.
    sparsity : float
        Fraction of weights pruned in every Linear layer (magnitude, one-shot).
    epochs, finetune_epochs : int, optional
        Dense training epochs, then masked fine-tuning epochs after pruning. Default: 2 and 1
        for MNIST, 20 and 10 for the (30x smaller) digits fallback.
    max_train : int, optional
        Use only the first ``max_train`` training samples (quick runs).
    seed : int
        Seed for initialisation and shuffling.

    Returns
    -------
    dict
        Data source, layer widths, accuracies (dense / pruned / fine-tuned / sparse) and time.
    """
    from sparsekit.datasets import load_mnist
    from sparsekit.prune import prune

    t0 = time.perf_counter()
    ds = load_mnist(data)
    x_tr, y_tr = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    x_te, y_te = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    if max_train is not None:
        x_tr, y_tr = x_tr[:max_train], y_tr[:max_train]
    small = len(x_tr) < 10_000
    epochs = (20 if small else 2) if epochs is None else epochs
    finetune_epochs = (10 if small else 1) if finetune_epochs is None else finetune_epochs
    layers = [int(x_tr.shape[1]), *hidden, int(y_tr.max()) + 1]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_mlp(layers)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        _masked_epoch(model, x_tr, y_tr, opt, None, gen)
    acc_dense = _accuracy(model, x_te, y_te)

    prune(model, sparsity)
    acc_pruned = _accuracy(model, x_te, y_te)
    masks = {n: (p != 0).float() for n, p in model.named_parameters() if n.endswith("weight")}
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    for _ in range(finetune_epochs):
        _masked_epoch(model, x_tr, y_tr, opt, masks, gen)
    model.eval()
    acc_ft = _accuracy(model, x_te, y_te)

    # tune=False: the stored format must not depend on timings of the machine that trained it.
    sparsekit.sparsify(model, tune=False, cache=False, min_sparsity=0.5)
    acc_sparse = _accuracy(model, x_te, y_te)
    info = {
        "source": ds.source,
        "layers": layers,
        "sparsity": sparsity,
        "accuracy": {"dense": acc_dense, "pruned": acc_pruned, "finetuned": acc_ft,
                     "sparse": acc_sparse},
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sparsekit.save(model, path, metadata={LAYERS_KEY: json.dumps(layers),
                                          INFO_KEY: json.dumps(info)})
    return info


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by :func:`create_model` (eval mode) and its info dict.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is not a sparsekit file with the example's metadata (or is damaged).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file {p}")
    meta = sparsekit.load(p).metadata
    try:
        layers = json.loads(meta[LAYERS_KEY])
    except (KeyError, ValueError) as e:
        raise ValueError(f"model: {p} has no valid {LAYERS_KEY!r} metadata") from e
    info = json.loads(meta.get(INFO_KEY, "{}"))
    model = sparsekit.load(p, build_mlp([int(n) for n in layers]))
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, info


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A zero input batch of the model's input width."""
    first = next(m for m in model.modules() if hasattr(m, "in_features"))
    return torch.zeros(batch, int(first.in_features), dtype=torch.float32)


def in_features(model: nn.Module) -> int:
    return int(example_input(model).shape[1])


def predict(model: nn.Module, x: np.ndarray) -> tuple[list[int], list[list[float]]]:
    """Classes and logits for a float32 ``(N, in_features)`` array."""
    with torch.inference_mode():
        logits = model(torch.from_numpy(x))
    return logits.argmax(1).tolist(), logits.tolist()
