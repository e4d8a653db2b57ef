"""Small models + magnitude pruning shared by test_nn / test_io / test_compile_export."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-LN transformer block made only of nn.Linear projections (q, k, v, o, MLP)."""

    def __init__(self, d: int = 64, heads: int = 4, hidden: int = 256) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y):
            return y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def mlp(sizes=(64, 128, 128, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, block: tuple[int, int] | None = None):
    """Zero the smallest-|w| fraction of every nn.Linear weight (per layer), elementwise or
    by (r, c) blocks (block L2 norm). Returns the model."""
    for mod in model.modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight
        if block is None:
            k = int(sparsity * w.numel())
            if k:
                thr = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= thr] = 0
        else:
            r, c = block
            m, n = w.shape
            assert m % r == 0 and n % c == 0
            norms = w.reshape(m // r, r, n // c, c).pow(2).sum((1, 3))
            k = int(sparsity * norms.numel())
            if k:
                thr = norms.flatten().kthvalue(k).values
                keep = (norms > thr).repeat_interleave(r, 0).repeat_interleave(c, 1)
                w.mul_(keep)
    return model


def linear_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a (dense, masked) model in float64 on a float64 copy of x."""
    import copy

    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        return ref(x.double())
