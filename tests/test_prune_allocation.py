"""OWL per-layer sparsity allocation, padding-free calibration and bias re-fitting, checked
against independent references (exact counts, direct least squares, direct input norms)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sparsekit.prune import OWL, owl_sparsities, prune
from sparsekit.prune.allocation import allocate_exact
from sparsekit.prune.criteria import collect_input_norms


class _Blocks(nn.Module):
    """Three residual blocks of unequal widths; block 1 gets heavy-tailed input features."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(16, h), "down": nn.Linear(h, 16)})
            for h in (24, 40, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.layer):
            h = torch.relu(blk["up"](x))
            if i == 1:
                h = h * torch.linspace(0.1, 30.0, h.shape[-1])  # a few outlier features
            x = x + blk["down"](h)
        return x


def _numels(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("group", ["block", "module"])
def test_owl_total_is_exact_and_masks_honour_targets(target, group):
    torch.manual_seed(0)
    model = _Blocks()
    cal = [torch.randn(8, 5, 16) for _ in range(3)]
    alloc = owl_sparsities(model, target, cal, owl=OWL(lam=0.1, m=3.0, group=group))
    numels = _numels(model)
    total = sum(numels.values())
    # Independent check of the total: integer counts that add up to round(target * total).
    counts = {n: alloc[n] * numels[n] for n in alloc}
    assert all(abs(c - round(c)) < 1e-6 for c in counts.values())
    assert sum(round(c) for c in counts.values()) == math.floor(target * total + 0.5)
    # Non-uniform, spanning 2 * lam (+ rounding), the same value within a block.
    span = max(alloc.values()) - min(alloc.values())
    assert 0.05 < span <= 2 * 0.1 + 1e-2
    if group == "block":
        for i in range(3):
            assert abs(alloc[f"layer.{i}.up"] - alloc[f"layer.{i}.down"]) < 0.01
    # prune(..., allocation=...) reaches every per-module count exactly.
    for crit in ("wanda", "sparsegpt"):
        m = copy.deepcopy(model)
        rep = prune(m, target, criterion=crit, calibration=cal,
                    allocation=OWL(lam=0.1, m=3.0, group=group))
        zeros = {n: int((mod.weight == 0).sum()) for n, mod in m.named_modules()
                 if isinstance(mod, nn.Linear)}
        for n, c in counts.items():
            assert zeros[n] == round(c), (crit, n)
        assert sum(zeros.values()) == math.floor(target * total + 0.5)
        assert rep.extra["allocation"]["targets"] == alloc


def test_owl_prunes_the_outlier_block_least():
    torch.manual_seed(1)
    model = _Blocks()
    cal = [torch.randn(8, 5, 16) for _ in range(3)]
    alloc = owl_sparsities(model, 0.6, cal, owl=OWL(lam=0.08, m=3.0))
    assert alloc["layer.1.down"] == min(alloc.values())
    # lam=0 is uniform
    flat = owl_sparsities(model, 0.6, cal, owl=OWL(lam=0.0))
    numels = _numels(model)
    assert all(abs(flat[n] - 0.6) * numels[n] <= 1.0 for n in flat)  # within one weight


def test_allocate_exact_reference():
    numels = {"a": 10, "b": 7, "c": 3}
    got = allocate_exact({"a": 0.55, "b": 0.55, "c": 0.55}, numels, 0.55)
    cnt = {n: round(got[n] * numels[n]) for n in got}
    assert sum(cnt.values()) == 11  # round(0.55 * 20)
    assert all(0 <= cnt[n] < numels[n] for n in cnt)


def test_owl_errors():
    model = _Blocks()
    cal = [torch.randn(4, 16)]
    with pytest.raises(ValueError, match="allocation: expected"):
        prune(model, 0.5, allocation="outliers", calibration=cal)
    with pytest.raises(ValueError, match="allocation: OWL spreads one float"):
        prune(model, None, granularity="2:4", allocation="owl", calibration=cal)
    with pytest.raises(ValueError, match="calibration: allocation='owl' needs"):
        prune(model, 0.5, allocation="owl")
    with pytest.raises(ValueError, match="OWL.lam"):
        OWL(lam=-1)
    with pytest.raises(ValueError, match="OWL.group"):
        OWL(group="layer")
    with pytest.raises(ValueError, match="sparsity"):
        owl_sparsities(model, 1.5, cal)


# ----------------------------------------------------------------------------- padding
class _TokenModel(nn.Module):
    """Takes HF-style dict batches: input_ids (B, T) and attention_mask (B, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.fc = nn.Linear(12, 6)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(input_ids))


def _token_batches(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        ids = torch.randint(1, 50, (4, 9), generator=g)
        lens = torch.randint(2, 10, (4,), generator=g)
        am = (torch.arange(9)[None, :] < lens[:, None]).long()
        out.append({"input_ids": ids.masked_fill(am == 0, 0), "attention_mask": am})
    return out


def test_padding_rows_are_left_out_of_wanda_norms():
    torch.manual_seed(0)
    model = _TokenModel()
    cal = _token_batches(0)
    got = collect_input_norms(model, {"fc": model.fc}, cal)["fc"]
    with torch.no_grad():
        real = torch.cat([model.emb(b["input_ids"])[b["attention_mask"].bool()] for b in cal])
    torch.testing.assert_close(got, real.double().pow(2).sum(0).sqrt())
    allrows = collect_input_norms(model, {"fc": model.fc}, cal, skip_padding=False)["fc"]
    assert not torch.allclose(got, allrows)


def test_reconstruction_uses_real_tokens_only():
    # A prefix mask makes sequential OBS the exact least-squares fit (no dampening), so the result
    # must equal lstsq on the real-token rows alone.
    torch.manual_seed(2)
    model = _TokenModel().double()
    cal = _token_batches(1)
    keep = torch.ones(6, 12, dtype=torch.bool)
    keep[:, :4] = False
    w0 = model.fc.weight.detach().clone()
    prune(model, {"fc": 4 / 12}, criterion=lambda w, m: keep.double(), reconstruct=True,
          calibration=cal, damp=0.0, types=nn.Linear)
    with torch.no_grad():
        x = torch.cat([model.emb(b["input_ids"])[b["attention_mask"].bool()] for b in cal])
    y = x @ w0.T
    ref = torch.linalg.lstsq(x[:, 4:], y).solution.T
    torch.testing.assert_close(model.fc.weight[:, 4:].detach(), ref, rtol=1e-7, atol=1e-8)
    assert bool((model.fc.weight[:, :4] == 0).all())


# ----------------------------------------------------------------------------- bias
def test_update_bias_equals_least_squares_with_intercept():
    torch.manual_seed(3)
    lin = nn.Linear(10, 5).double()
    model = nn.Sequential(lin)
    x = torch.randn(300, 10, dtype=torch.float64) * 0.5 + torch.linspace(-2, 3, 10)
    y = model(x).detach()
    keep = torch.ones(5, 10, dtype=torch.bool)
    keep[:, :3] = False
    prune(model, {"0": 0.3}, criterion=lambda w, m: keep.double(), reconstruct=True,
          calibration=[x], damp=0.0, update_bias=True)
    xa = torch.cat([x[:, 3:], torch.ones(300, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, y).solution.T  # (5, 8): weights and intercept
    torch.testing.assert_close(lin.weight[:, 3:].detach(), sol[:, :7], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(lin.bias.detach(), sol[:, 7], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gran", ["unstructured", "2:4"])
def test_update_bias_reported_error_is_the_real_output_error(seed, gran):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 8)).double()
    cal = [torch.randn(64, 24, dtype=torch.float64) + 1.5 for _ in range(2)]
    x = torch.cat(cal)
    sp = None if gran == "2:4" else 0.6
    for ub in (False, True):
        p = copy.deepcopy(m)
        rep = prune(p, sp, granularity=gran, criterion="sparsegpt", calibration=cal,
                    update_bias=ub)
        first = rep.extra["reconstruction"]["layers"][0]
        assert first["error_reconstructed"] <= first["error_masked"] * (1 + 1e-12)
        with torch.no_grad():  # first layer: its inputs are the calibration data itself
            direct = float(((p[0](x) - m[0](x)) ** 2).sum()) / x.shape[0]
        assert direct == pytest.approx(first["error_reconstructed"], rel=1e-9, abs=1e-12)
        assert torch.equal(p[0].bias, m[0].bias) != ub
        assert abs(rep.sparsity - (0.5 if gran == "2:4" else 0.6)) < 1e-2


def test_update_bias_errors():
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="update_bias: not supported together"):
        prune(m, 0.5, criterion="sparsegpt", calibration=[torch.randn(8, 4)], update_bias=True,
              dense_targets=True)
    with pytest.raises(ValueError, match="update_bias: only used by reconstruction"):
        prune(m, 0.5, update_bias=True)
    with pytest.raises(ValueError, match="skip_padding: expected a bool"):
        prune(m, 0.5, criterion="sparsegpt", calibration=[torch.randn(8, 4)], skip_padding=1)
