"""Model zoo of the benchmarks (``sparsekit bench model --model mnist-mlp|bert-base``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeNet300100", "BertLayer", "BertStack"]


class LeNet300100(nn.Module):
    """LeNet-300-100: 784 -> 300 -> 100 -> 10 with ReLU (the MNIST MLP of LeCun et al. 1998)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BertLayer(nn.Module):
    """One post-LayerNorm BERT encoder layer; all projections are ``nn.Linear``."""

    def __init__(self, d: int = 768, heads: int = 12, ffn: int = 3072) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.intermediate = nn.Linear(d, ffn)
        self.output = nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, hd).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                           split(self.value(x)))
        x = self.ln1(x + self.attn_out(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.output(F.gelu(self.intermediate(x))))


class BertStack(nn.Module):
    """``layers`` BERT-base encoder layers (no embeddings: the input is hidden states)."""

    def __init__(self, layers: int = 4, d: int = 768, heads: int = 12, ffn: int = 3072) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(d, heads, ffn) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
