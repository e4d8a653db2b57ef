"""Tests of sparsekit.prune: exact sparsity, patterns, selection vs independent references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsekit.prune import GradualPruner, evaluate, prune, sparsity_schedule


def _mlp(seed: int, sizes=(37, 29, 23, 5)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


# ----------------------------------------------------------------------------- exact sparsity
@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("criterion", ["l1", "l2", "mean"])
def test_unstructured_exact_and_smallest(sparsity, criterion):
    model = _mlp(1)
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules()
           if isinstance(m, nn.Linear)}
    report = prune(model, sparsity, criterion=criterion)
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w0, w = ref[n].double().numpy(), m.weight.detach().double().numpy()
        k = _zeros(m.weight)
        assert abs(k - sparsity * w.size) <= 0.5 + 1e-9
        assert report[n].nonzero_after == w.size - k
        pruned, kept = np.abs(w0[w == 0]), np.abs(w0[w != 0])
        if pruned.size and kept.size:
            assert pruned.max() <= kept.min()
        np.testing.assert_array_equal(w[w != 0], w0[w != 0])  # kept weights untouched


def _block_ref_scores(w: np.ndarray, r: int, c: int, criterion: str) -> np.ndarray:
    """Independent loop reference of block scores (ragged edges use real elements only)."""
    rb, kb = math.ceil(w.shape[0] / r), math.ceil(w.shape[1] / c)
    out = np.zeros((rb, kb))
    for i in range(rb):
        for j in range(kb):
            blk = w[i * r:(i + 1) * r, j * c:(j + 1) * c]
            out[i, j] = {"l1": np.abs(blk).sum(), "l2": np.sqrt((blk ** 2).sum()),
                         "mean": np.abs(blk).mean()}[criterion]
    return out


@pytest.mark.parametrize("block", [(4, 4), (3, 5), (1, 8), (29, 1)])
@pytest.mark.parametrize("criterion", ["l1", "l2", "mean"])
def test_block_exact_structure_and_ranking(block, criterion):
    r, c = block
    lin = nn.Linear(37, 29)  # ragged for every block above
    torch.manual_seed(3)
    nn.init.normal_(lin.weight)
    w0 = lin.weight.detach().double().numpy().copy()
    model = nn.Sequential(lin)
    prune(model, 0.6, criterion=criterion, granularity=block)
    w = lin.weight.detach().double().numpy()
    rb, kb = math.ceil(29 / r), math.ceil(37 / c)
    scores = _block_ref_scores(w0, r, c, criterion)
    zero_blocks = np.zeros((rb, kb), bool)
    for i in range(rb):
        for j in range(kb):
            blk = w[i * r:(i + 1) * r, j * c:(j + 1) * c]
            assert (blk == 0).all() or (blk != 0).all(), "blocks must be all-zero or all-kept"
            zero_blocks[i, j] = (blk == 0).all()
    assert abs(_zeros(lin.weight) - 0.6 * w.size) <= r * c / 2 + 1e-9
    assert scores[zero_blocks].max() <= scores[~zero_blocks].min() + 1e-12


@pytest.mark.parametrize("nm", ["2:4", "1:4", "3:8", "1:1"])
@pytest.mark.parametrize("k", [32, 37])  # 37: ragged tail group
def test_nm_property_and_choice(nm, k):
    n, m = (int(v) for v in nm.split(":"))
    torch.manual_seed(5)
    lin = nn.Linear(k, 11)
    w0 = lin.weight.detach().double().numpy().copy()
    report = prune(nn.Sequential(lin), granularity=nm)
    w = lin.weight.detach().double().numpy()
    for row in range(w.shape[0]):
        for g0 in range(0, k, m):
            grp, grp0 = w[row, g0:g0 + m], w0[row, g0:g0 + m]
            keep = min(n, grp.size)
            assert int((grp != 0).sum()) == keep
            expect = np.sort(np.argsort(-np.abs(grp0), kind="stable")[:keep])
            np.testing.assert_array_equal(np.flatnonzero(grp), expect)
    assert report.layers[0].granularity == nm


def test_row_granularity_and_ties():
    lin = nn.Linear(10, 20)
    with torch.no_grad():
        lin.weight.fill_(0.5)  # all tied: thresholds would prune everything or nothing
    prune(nn.Sequential(lin), 0.35, granularity="row")
    rows_zero = (lin.weight == 0).all(dim=1)
    assert int(rows_zero.sum()) == 7
    assert ((lin.weight == 0).any(dim=1) == rows_zero).all()
    lin2 = nn.Linear(10, 10)
    with torch.no_grad():
        lin2.weight.fill_(-1.0)
    prune(nn.Sequential(lin2), 0.5)
    assert _zeros(lin2.weight) == 50


def test_global_scope_prunes_by_magnitude_across_layers():
    a, b = nn.Linear(40, 30), nn.Linear(30, 20)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a.weight.copy_(1 + torch.rand(30, 40, generator=g))       # |w| in [1, 2]
        vals = torch.cat([0.5 * torch.rand(300, generator=g),     # small half of b
                          3 + torch.rand(300, generator=g)])      # large half of b
        b.weight.copy_(vals[torch.randperm(600, generator=g)].reshape(20, 30))
    model = nn.Sequential(a, nn.ReLU(), b)
    report = prune(model, 300 / 1800, scope="global")
    assert _zeros(a.weight) == 0
    assert _zeros(b.weight) == 300
    assert bool((b.weight.abs() >= 3).sum() == 300)
    assert report.target == pytest.approx(1 / 6)
    # the same target per layer prunes both evenly
    model2 = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    model2.load_state_dict({k: v for k, v in zip(model2.state_dict(), [
        1 + torch.rand(30, 40), torch.zeros(30), torch.rand(20, 30), torch.zeros(20)])})
    prune(model2, 1 / 6)
    assert _zeros(model2[0].weight) == 200 and _zeros(model2[2].weight) == 100


@pytest.mark.filterwarnings("ignore:prune. global ranking pruned every weight")
@pytest.mark.parametrize("granularity", ["unstructured", (2, 3), "row"])
def test_global_exact_total(granularity):
    model = _mlp(7)
    report = prune(model, 0.8, scope="global", granularity=granularity)
    total = sum(la.params for la in report.layers)
    zeros = sum(la.params - la.nonzero_after for la in report.layers)
    group = {"unstructured": 1, "row": 37}.get(granularity, 6) if isinstance(granularity, str) \
        else 6
    assert abs(zeros - 0.8 * total) <= group / 2 + 1e-9


def test_dict_sparsity_include_exclude():
    model = _mlp(2)
    report = prune(model, {"0": 0.9, "[24]": 0.5})
    d = json.loads(json.dumps(report.to_dict()))
    assert [la["name"] for la in d["layers"]] == ["0", "2", "4"] and d["target"]["0"] == 0.9
    assert d["layers"][0]["nonzero_after"] == report.layers[0].nonzero_after
    table = str(report).splitlines()
    assert table[1].split()[:3] == ["layer", "type", "shape"] and table[3].startswith("0 ")
    assert [la.name for la in report.layers] == ["0", "2", "4"]
    assert [la.target for la in report.layers] == [0.9, 0.5, 0.5]
    assert abs(_zeros(model[0].weight) - 0.9 * 37 * 29) <= 0.5 + 1e-9
    assert abs(_zeros(model[2].weight) - 0.5 * 29 * 23) <= 0.5 + 1e-9
    model = _mlp(2)
    report = prune(model, 0.5, exclude="4")
    assert [la.name for la in report.layers] == ["0", "2"] and _zeros(model[4].weight) == 0
    model = _mlp(2)
    report = prune(model, 0.5, include=["2", "4"])
    assert _zeros(model[0].weight) == 0 and [la.name for la in report.layers] == ["2", "4"]


def test_callable_criterion():
    torch.manual_seed(11)
    lin = nn.Linear(6, 2)
    w0 = lin.weight.detach().clone()
    seen = []

    def prefer_small(w, mod):  # keeps the *smallest* weights: the opposite of l1
        seen.append(mod)
        return -w.abs()

    prune(nn.Sequential(lin), 0.5, criterion=prefer_small)
    assert seen == [lin]
    assert _zeros(lin.weight) == 6
    assert w0[lin.weight == 0].abs().min() >= w0[lin.weight != 0].abs().max()


# ----------------------------------------------------------------------------- conv
def test_conv2d_unstructured_and_channel():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 8, 3)
    w0 = conv.weight.detach().clone()
    prune(nn.Sequential(conv), 0.75)
    assert _zeros(conv.weight) == round(0.75 * w0.numel())
    assert w0[conv.weight == 0].abs().max() <= w0[conv.weight != 0].abs().min()

    conv = nn.Conv2d(3, 8, 3)
    w0 = conv.weight.detach().clone()
    prune(nn.Sequential(conv), 0.5, granularity="channel", criterion="l2")
    zero_ch = (conv.weight == 0).flatten(1).all(1)
    assert int(zero_ch.sum()) == 4
    assert ((conv.weight != 0).flatten(1).all(1) == ~zero_ch).all()
    norms = w0.flatten(1).norm(dim=1)
    assert norms[zero_ch].max() <= norms[~zero_ch].min()


def test_conv2d_block_on_flattened_view():
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3)  # 2-D view 6 x 36
    prune(nn.Sequential(conv), 0.6, granularity=(2, 4))
    w2 = conv.weight.detach().flatten(1)
    blocks = w2.reshape(3, 2, 9, 4).permute(0, 2, 1, 3).reshape(27, 8)
    assert ((blocks == 0).all(1) | (blocks != 0).all(1)).all()
    assert int((blocks == 0).all(1).sum()) == 16  # 0.6 * 27 = 16.2 blocks


# ----------------------------------------------------------------------------- wanda
def test_wanda_matches_hand_computation():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5], [-0.1, 4.0, 0.2, -1.0]]))
    x1 = torch.tensor([[[10.0, 0.1, 0.1, 1.0]], [[0.0, 0.2, 0.1, 2.0]]])  # (2, 1, 4): 3-D input
    x2 = torch.tensor([[[0.0, 0.0, 0.2, 2.0]]])
    calib = [x1, (x2, torch.zeros(1))]
    # Independent expectation: feature norms over all 4 rows, scores |W| * norm, 50% per layer.
    rows = np.array([[10, 0.1, 0.1, 1], [0, 0.2, 0.1, 2], [0, 0, 0.2, 2]], dtype=np.float64)
    norm = np.sqrt((rows ** 2).sum(0))
    wn = np.array([[1.0, -2.0, 3.0, 0.5], [-0.1, 4.0, 0.2, -1.0]])
    score = np.abs(wn) * norm
    order = np.argsort(score.ravel(), kind="stable")
    expected_keep = np.ones(8, bool)
    expected_keep[order[:4]] = False
    model = nn.Sequential(lin).train()
    prune(model, 0.5, criterion="wanda", calibration=calib)
    np.testing.assert_array_equal((lin.weight != 0).numpy().ravel(), expected_keep)
    # magnitude alone would keep a different set: the test discriminates
    assert not np.array_equal(expected_keep, np.abs(wn).ravel() >= np.sort(np.abs(wn).ravel())[4])
    assert model.training and not lin._forward_pre_hooks


def test_wanda_conv_1x1_uses_channel_norms():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 1)
    w0 = conv.weight.detach().clone().flatten(1)
    xs = [torch.randn(2, 5, 3, 3) * torch.tensor([1, 10, 0.1, 5, 1.0])[None, :, None, None]
          for _ in range(2)]
    chan = torch.sqrt(sum((x.double() ** 2).sum((0, 2, 3)) for x in xs))
    score = w0.double().abs() * chan[None, :]
    prune(nn.Sequential(conv), 0.5, criterion="wanda", calibration=xs)
    kept = conv.weight.detach().flatten(1) != 0
    assert int(kept.sum()) == 10
    assert score[~kept].max() <= score[kept].min()


# ----------------------------------------------------------------------------- gradual
@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_schedule_matches_formula(schedule):
    si, sf, t0, te, dt = 0.1, 0.9, 10, 50, 10
    for t in [0, 9, 10, 15, 20, 30, 40, 49, 50, 100]:
        if t < t0:
            expect = 0.0
        elif t >= te:
            expect = sf
        else:
            tq = t0 + (t - t0) // dt * dt
            frac = (tq - t0) / (te - t0)
            expect = (sf + (si - sf) * (1 - frac) ** 3 if schedule == "cubic"
                      else si + (sf - si) * frac)
        got = sparsity_schedule(t, initial_sparsity=si, final_sparsity=sf, start_step=t0,
                                end_step=te, frequency=dt, schedule=schedule)
        assert got == pytest.approx(expect, abs=1e-12)
    assert sparsity_schedule(30, initial_sparsity=0, final_sparsity=0.8, start_step=10,
                             end_step=50, frequency=1) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)


def test_gradual_reaches_scheduled_sparsity():
    model = _mlp(3)
    pruner = GradualPruner(model, 0.9, initial_sparsity=0.2, start_step=2, end_step=12,
                           frequency=3)
    n = sum(m.weight.numel() for m in pruner.modules.values())
    for t in range(15):
        target = pruner.step()
        expect = sparsity_schedule(t, initial_sparsity=0.2, final_sparsity=0.9, start_step=2,
                                   end_step=12, frequency=3)
        assert target == pytest.approx(expect)
        for name, mod in pruner.modules.items():
            z = _zeros(mod.weight)
            assert abs(z - expect * mod.weight.numel()) <= 0.5 + 1e-9, (t, name)
    assert pruner.sparsity() == pytest.approx(0.9, abs=3 / n)
    assert set(pruner.sparsity(per_layer=True)) == {"0", "2", "4"}


def _train_steps(model, opt, pruner, n, check):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 37, generator=g)
        out = model(x)
        loss = out.pow(2).mean() - out.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if check is not None:
            check()  # right after optimizer.step(), before pruner.step()
        pruner.step()


@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum", "adamw_amsgrad"])
def test_masks_survive_optimizer_steps(opt_name):
    model = _mlp(4)
    params = model.parameters()
    opt = {"adam": lambda: torch.optim.Adam(params, lr=1e-2),
           "sgd_momentum": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                                   weight_decay=1e-3),
           "adamw_amsgrad": lambda: torch.optim.AdamW(params, lr=1e-2, amsgrad=True)}[opt_name]()
    # Dense steps first build momentum / Adam moments for every weight; pruning at step 5.
    pruner = GradualPruner(model, 0.8, start_step=5, end_step=5, frequency=1, optimizer=opt)

    def check():
        for n, m in pruner.modules.items():
            mask = pruner.masks[n]
            if not bool(mask.all()):
                assert bool((m.weight[~mask] == 0).all()), n
                for v in opt.state[m.weight].values():
                    if v.shape == m.weight.shape:
                        assert bool((v[~mask] == 0).all())

    _train_steps(model, opt, pruner, 5, None)
    _train_steps(model, opt, pruner, 1, None)  # the pruning step
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)
    before = {n: m.weight.detach().clone() for n, m in pruner.modules.items()}
    _train_steps(model, opt, pruner, 10, check)
    for n, m in pruner.modules.items():
        mask = pruner.masks[n]
        assert bool((m.weight[~mask] == 0).all())
        assert not torch.equal(m.weight[mask], before[n][mask])  # training did happen


def test_masks_without_optimizer_hold_after_step():
    model = _mlp(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, 0.7, start_step=2, end_step=2, frequency=1)
    _train_steps(model, opt, pruner, 3, None)
    for _ in range(10):
        _train_steps(model, opt, pruner, 1, None)
        for n, m in pruner.modules.items():
            assert bool((m.weight[~pruner.masks[n]] == 0).all())


def test_finalize_leaves_no_hooks_and_plain_weights():
    model = _mlp(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = GradualPruner(model, 0.5, start_step=0, end_step=0, optimizer=opt)
    _train_steps(model, opt, pruner, 3, None)
    report = pruner.finalize()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for p in m.parameters(recurse=False):
            assert not p._backward_hooks
            assert type(p) is nn.Parameter
    assert not opt._optimizer_step_post_hooks
    assert not any("parametrizations" in k for k in model.state_dict())
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(RuntimeError, match="finalize"):
        pruner.step()
    # after finalize, training moves the zeros again (no hidden masking left)
    model(torch.randn(4, 37)).sum().backward()
    assert bool((model[0].weight.grad[model[0].weight == 0] != 0).any())


def test_gradual_block_and_global_and_dict():
    model = _mlp(6)
    pruner = GradualPruner(model, 0.75, start_step=0, end_step=4, frequency=2,
                           granularity=(1, 4), scope="global")
    for _ in range(6):
        pruner.step()
    assert pruner.sparsity() == pytest.approx(0.75, abs=0.01)
    model = _mlp(6)
    pruner = GradualPruner(model, {"0": 0.9, "2": 0.5}, start_step=0, end_step=2, frequency=1)
    for _ in range(3):
        pruner.step()
    sp = pruner.sparsity(per_layer=True)
    assert sp["0"] == pytest.approx(0.9, abs=1e-3) and sp["2"] == pytest.approx(0.5, abs=1e-3)
    state = pruner.state_dict()
    assert state["step"] == 3 and set(state["masks"]) == {"0", "2"}


def test_evaluate_against_manual():
    torch.manual_seed(0)
    model = _mlp(8)
    x, y = torch.randn(100, 37), torch.randint(0, 5, (100,))
    res = evaluate(model, (x.numpy(), y.numpy()), batch_size=7)
    with torch.no_grad():
        logits = model(x).double()
    acc = float((logits.argmax(1) == y).double().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    assert res.accuracy == pytest.approx(acc) and res.n == 100
    assert res.loss == pytest.approx(loss, rel=1e-5)
    res2 = evaluate(model, [(x[:50], y[:50]), (x[50:], y[50:])])
    assert res2.accuracy == pytest.approx(acc)
    with pytest.raises(ValueError, match="targets must be in"):
        evaluate(model, (x, y + 5))


def test_random_shapes_exact_for_every_granularity():
    """Seeded sweep: random shapes / targets; exact counts and pattern structure hold."""
    rng = np.random.default_rng(123)
    for _ in range(40):
        rows, cols = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        s = float(rng.uniform(0, 0.99))
        r, c = int(rng.integers(1, rows + 1)), int(rng.integers(1, cols + 1))
        for gran, group in (("unstructured", 1), ((r, c), r * c), ("row", cols)):
            lin = nn.Linear(cols, rows)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(rng.standard_normal((rows, cols))))
            crit = str(rng.choice(["l1", "l2", "mean"]))
            prune(nn.Sequential(lin), s, granularity=gran, criterion=crit)
            err = abs(_zeros(lin.weight) - s * rows * cols)
            assert err <= group / 2 + 1e-9, (rows, cols, s, gran, crit)


def test_gradual_wanda_with_calibration_list():
    model = _mlp(9)
    calib = [torch.randn(8, 37) for _ in range(2)]
    pruner = GradualPruner(model, 0.6, start_step=0, end_step=2, frequency=1, criterion="wanda",
                           calibration=calib)
    for _ in range(3):
        pruner.step()
    assert pruner.sparsity() == pytest.approx(0.6, abs=2e-3)
    assert all(not m._forward_pre_hooks for m in model.modules())
