"""Architecture factory and model-file maker for the Ray Serve example.

``mlp`` is the factory the deployment calls in every replica (``factory:
"examples.ray_serve.model:mlp"``, ``factory_kwargs: {layers: [...]}``): it returns the dense
architecture, and ``sparsekit.load(path, mlp(layers))`` installs the stored (sparse) weights.

Make a model file (a BERT-base feed-forward block, 768 -> 3072 -> 768, pruned 90 %)::

    python -m examples.ray_serve.model models/ffn_sparse.safetensors --sparsity 0.9
    python -m examples.ray_serve.model models/ffn_dense.safetensors --sparsity 0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

DEFAULT_LAYERS = (768, 3072, 768)


def mlp(layers: Sequence[int] = DEFAULT_LAYERS) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with widths ``layers`` (input first)."""
    widths = [int(n) for n in layers]
    if len(widths) < 2 or any(n <= 0 for n in widths):
        raise ValueError(f"layers: expected >= 2 positive ints, got {list(layers)!r}")
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def make_model_file(path: str, layers: Sequence[int] = DEFAULT_LAYERS, sparsity: float = 0.9,
                    seed: int = 0) -> nn.Module:
    """Build ``mlp(layers)`` (seeded random weights), prune + sparsify unless ``sparsity`` is
    0, and write it with ``sparsekit.save``. Returns the model as saved."""
    import sparsekit
    from sparsekit.prune import prune

    torch.manual_seed(seed)
    model = mlp(layers).eval()
    if sparsity > 0:
        prune(model, sparsity)
        sparsekit.sparsify(model, tune=False, cache=False, min_sparsity=0.5)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sparsekit.save(model, path, metadata={"examples.ray_serve.layers": ",".join(
        str(n) for n in layers)})
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.ray_serve.model",
                                 description="Write an MLP model file for the Ray Serve example.")
    ap.add_argument("path", help="output .safetensors file")
    ap.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)),
                    help="comma-separated widths [%(default)s]")
    ap.add_argument("--sparsity", type=float, default=0.9, help="fraction pruned; 0 = dense "
                    "[%(default)s]")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    layers = [int(n) for n in a.layers.split(",")]
    make_model_file(a.path, layers, a.sparsity, a.seed)
    print(f"wrote {a.path}: layers {layers}, sparsity {a.sparsity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
