"""Distillation recovery and label-free evaluation helpers (float64 references)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsekit.prune import (
    GradualPruner,
    distill,
    embedding_cosine,
    logit_kl,
    mean_pooled_embeddings,
    neighbour_agreement,
    perplexity,
    prune,
)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 6))


def _data(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 12, generator=g) for _ in range(n)]


def _zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() == 0 for n, p in model.named_parameters() if n.endswith("weight")}


def _mse_to(student: nn.Module, teacher: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(((student(x) - teacher(x)) ** 2).sum() for x in data))


@pytest.mark.parametrize("opt", ["default", "sgd_wd", "adamw_wd"])
def test_distill_keeps_masks_exact_and_recovers(opt):
    teacher = _mlp()
    student = copy.deepcopy(teacher)
    data = _data()
    prune(student, 0.8)
    zeros = _zeros(student)
    before_w = {n: p.detach().clone() for n, p in student.named_parameters()}
    err0 = _mse_to(student, teacher, data)
    optimizer = None
    if opt == "sgd_wd":
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9,
                                    weight_decay=0.1)
    elif opt == "adamw_wd":
        optimizer = torch.optim.AdamW(student.parameters(), lr=0.01, weight_decay=0.5)
    rep = distill(student, teacher, data, steps=60, lr=1e-2, optimizer=optimizer)
    assert rep.steps == 60 and rep.loss == "hidden"
    for n, z in _zeros(student).items():
        assert torch.equal(z, zeros[n]), n  # zeros exactly where they were, nothing more
        assert not torch.equal(before_w[n], dict(student.named_parameters())[n])
    assert _mse_to(student, teacher, data) < 0.5 * err0
    assert rep.final_loss < rep.first_loss
    # The teacher is untouched and left in its mode.
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_deterministic_with_dropout():
    teacher = nn.Sequential(nn.Linear(12, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 4))
    data = _data()
    outs = []
    for _ in range(2):
        s = copy.deepcopy(teacher)
        prune(s, 0.5)
        distill(s, teacher, data, steps=10, train_mode=True, seed=3)
        outs.append([p.detach().clone() for p in s.parameters()])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_distill_with_gradual_pruner():
    teacher = _mlp(2)
    student = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-3)
    pruner = GradualPruner(student, 0.9, end_step=20, frequency=5, optimizer=opt)
    distill(student, teacher, _data(), steps=30, optimizer=opt, pruner=pruner)
    rep = pruner.finalize()
    assert abs(rep.sparsity - 0.9) < 1e-2
    masks = pruner.masks
    for n, m in pruner.modules.items():
        assert torch.equal(m.weight.detach() != 0, masks[n]) or bool(
            (m.weight.detach()[~masks[n]] == 0).all())
        assert bool((m.weight.detach()[~masks[n]] == 0).all())


class _TinyLM(nn.Module):
    """Dict-input model returning logits and hidden states, as Hugging Face models do."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.l1 = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        h0 = self.emb(input_ids)
        h1 = torch.tanh(self.l1(h0))
        out = {"logits": self.head(h1), "last_hidden_state": h1}
        if output_hidden_states:
            out["hidden_states"] = (h0, h1)
        return out


@pytest.mark.parametrize("loss", ["auto", "logits", "hidden_all", "pooled", "hidden_all+pooled"])
def test_distill_dict_batches_and_losses(loss):
    torch.manual_seed(0)
    teacher = _TinyLM()
    student = copy.deepcopy(teacher)
    prune(student, 0.6, include=["l1", "head"])
    zeros = _zeros(student)
    data = [{"input_ids": torch.randint(0, 11, (4, 7)),
             "attention_mask": torch.ones(4, 7, dtype=torch.int64)} for _ in range(3)]
    rep = distill(student, teacher, data, steps=15, lr=5e-3, loss=loss, include=["l1", "head"],
                  cache_teacher=True)
    assert rep.loss == ("logits" if loss == "auto" else loss)
    for n, z in _zeros(student).items():
        if not n.startswith("emb"):
            assert torch.equal(z, zeros[n])


def test_pooled_loss_matches_numpy():
    from sparsekit.prune.distill import _loss

    g = np.random.default_rng(5)
    hs, ht = g.standard_normal((3, 6, 4)), g.standard_normal((3, 6, 4))
    am = np.ones((3, 6), dtype=np.int64)
    am[0, 4:] = 0
    am[2, 1:] = 0
    batch = {"input_ids": torch.zeros(3, 6, dtype=torch.int64),
             "attention_mask": torch.from_numpy(am)}
    got = _loss("pooled", {"last_hidden_state": torch.from_numpy(hs)},
                {"last_hidden_state": torch.from_numpy(ht)}, batch, 2.0)
    ref = []
    for b in range(3):
        k = am[b].astype(bool)
        ps, pt = hs[b, k].mean(0), ht[b, k].mean(0)
        ref.append(1 - ps @ pt / np.linalg.norm(ps) / np.linalg.norm(pt))
    assert float(got) == pytest.approx(float(np.mean(ref)), rel=1e-5)


def test_distill_errors():
    m = _mlp()
    with pytest.raises(ValueError, match="teacher: must be a separate"):
        distill(m, m, _data(), steps=1)
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        distill(m, _mlp(), _data(), steps=0)
    with pytest.raises(ValueError, match="data: the iterable yielded no batches"):
        distill(m, _mlp(), [], steps=1)
    with pytest.raises(ValueError, match="loss: expected one of"):
        distill(m, _mlp(), _data(), steps=1, loss="mse")
    with pytest.raises(ValueError, match="data: expected an iterable of batches"):
        distill(m, _mlp(), torch.randn(3, 12), steps=1)
    with pytest.raises(ValueError, match="data: each batch must be a tensor"):
        distill(m, _mlp(), [3], steps=1)


# ----------------------------------------------------------------------------- evaluation
def test_embedding_cosine_matches_numpy():
    g = np.random.default_rng(0)
    a, b = g.standard_normal((33, 7)), g.standard_normal((33, 7))
    ref = np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert embedding_cosine(torch.from_numpy(a), b) == pytest.approx(ref, rel=1e-12)
    assert embedding_cosine(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="embeddings: shape"):
        embedding_cosine(a, b[:5])


def _knn_ref(e: np.ndarray, k: int) -> list[set[int]]:
    z = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    return [set(np.argsort(-s[i], kind="stable")[:k].tolist()) for i in range(len(e))]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_neighbour_agreement_matches_bruteforce(k):
    g = np.random.default_rng(k)
    a = g.standard_normal((7, 5))
    b = a + 0.7 * g.standard_normal((7, 5))
    na, nb = _knn_ref(a, k), _knn_ref(b, k)
    ref = np.mean([len(x & y) / k for x, y in zip(na, nb, strict=True)])
    assert neighbour_agreement(b, a, k) == pytest.approx(ref)
    assert neighbour_agreement(a, a, k) == 1.0
    with pytest.raises(ValueError, match="k: expected an int in"):
        neighbour_agreement(a, a, 7)


def test_logit_kl_matches_numpy():
    g = np.random.default_rng(1)
    s, t = g.standard_normal((3, 5, 9)), g.standard_normal((3, 5, 9))
    m = (g.random((3, 5)) > 0.3).astype(np.float64)
    T = 2.0

    def logsm(x):
        x = x / T
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
            -1, keepdims=True)

    kl = (np.exp(logsm(t)) * (logsm(t) - logsm(s))).sum(-1)
    assert logit_kl(s, t, temperature=T) == pytest.approx(kl.mean(), rel=1e-10)
    assert logit_kl(s, t, temperature=T, mask=m) == pytest.approx((kl * m).sum() / m.sum(),
                                                                  rel=1e-10)
    assert logit_kl(t, t) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        logit_kl(s, t, temperature=0)
    with pytest.raises(ValueError, match="mask: expected shape"):
        logit_kl(s, t, mask=m[:, :2])


def test_perplexity_matches_manual_and_uniform():
    torch.manual_seed(0)
    lm = _TinyLM()
    ids = torch.randint(0, 11, (3, 6))
    am = torch.ones(3, 6, dtype=torch.int64)
    am[1, 4:] = 0
    with torch.no_grad():
        logits = lm(ids)["logits"].to(torch.float64)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    w = am[:, 1:].to(torch.float64)
    ref = math.exp(float(-(lp * w).sum() / w.sum()))
    assert perplexity(lm, ids, am, batch_size=2) == pytest.approx(ref, rel=1e-9)

    class Uniform(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, 13) + self.p

    assert perplexity(Uniform(), ids) == pytest.approx(13.0)
    with pytest.raises(ValueError, match="input_ids: expected an integer"):
        perplexity(lm, ids[:, :1])


def test_mean_pooled_embeddings_matches_manual():
    torch.manual_seed(0)
    lm = _TinyLM()
    ids = torch.randint(0, 11, (4, 5))
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    emb = mean_pooled_embeddings(lm, [{"input_ids": ids, "attention_mask": am}])
    with torch.no_grad():
        h = lm(ids)["last_hidden_state"]
    for i in range(4):
        torch.testing.assert_close(emb[i], h[i, am[i].bool()].mean(0))
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pooled_embeddings(lm, [{"input_ids": ids}])
