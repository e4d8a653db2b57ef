"""Layer-wise reconstruction (criterion='sparsegpt', reconstruct=True) vs float64 references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.prune import GradualPruner, prune
from sparsekit.prune._masks import nm_mask
from sparsekit.prune.sparsegpt import layer_error, reconstruct_model, sparsegpt_layer


def _layer_data(seed: int, rows: int, cols: int, n: int, rank: int | None = None):
    g = np.random.default_rng(seed)
    mix = g.standard_normal((rank or cols, cols))
    x = g.standard_normal((n, rank or cols)) @ mix + 0.3 * g.standard_normal(cols)
    w = g.standard_normal((rows, cols))
    return w, x


def _obs_reference(w: np.ndarray, h: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Unblocked sequential OBS with explicit inverses of the trailing Hessian blocks."""
    w = w.copy()
    k = w.shape[1]
    for c in range(k):
        hi = np.linalg.inv(h[c:, c:])
        for r in range(w.shape[0]):
            if not keep[r, c]:
                w[r, c:] -= w[r, c] / hi[0, 0] * hi[0, :]
    w[~keep] = 0.0
    return w


@pytest.mark.parametrize("rows,cols,block", [(1, 7, 3), (7, 33, 5), (5, 17, 128)])
def test_fixed_mask_matches_unblocked_obs_reference(rows, cols, block):
    w, x = _layer_data(1, rows, cols, 97)
    h = x.T @ x / x.shape[0]
    keep = np.random.default_rng(2).random((rows, cols)) > 0.6
    got, mask = sparsegpt_layer(torch.from_numpy(w), torch.from_numpy(h),
                                mask=torch.from_numpy(keep), damp=0.0, block_size=block)
    ref = _obs_reference(w, h, keep)
    assert torch.equal(mask, torch.from_numpy(keep))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-9)


def test_prefix_masks_equal_least_squares_solution():
    # When every row prunes a prefix of columns, sequential OBS is the exact least-squares
    # reconstruction of the row's output from its kept inputs.
    rows, cols = 6, 21
    w, x = _layer_data(3, rows, cols, 200)
    h = x.T @ x / x.shape[0]
    prefix = np.random.default_rng(4).integers(0, cols, rows)
    keep = np.arange(cols)[None, :] >= prefix[:, None]
    got, _ = sparsegpt_layer(torch.from_numpy(w), torch.from_numpy(h),
                             mask=torch.from_numpy(keep), damp=0.0, block_size=4)
    for r in range(rows):
        kept = keep[r]
        sol = np.zeros(cols)
        if kept.any():
            sol[kept] = np.linalg.lstsq(x[:, kept], x @ w[r], rcond=None)[0]
        np.testing.assert_allclose(got[r].numpy(), sol, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("gran", ["unstructured", "2:4", "1:3", (2, 4), (3, 3), "row"])
@pytest.mark.parametrize("shape", [(7, 33), (1, 7), (33, 97)])
def test_sparsegpt_layer_pattern_and_exact_counts(gran, shape):
    rows, cols = shape
    w, x = _layer_data(5, rows, cols, 64)
    h = torch.from_numpy(x.T @ x / 64)
    from sparsekit.prune import parse_granularity

    g = parse_granularity(gran)
    if g.kind == "block" and (g.block[0] > rows or g.block[1] > cols):
        pytest.skip("block larger than the weight")
    if g.kind == "nm" and g.m > cols:
        pytest.skip("group larger than the weight")
    s = 0.6
    new, keep = sparsegpt_layer(torch.from_numpy(w), h, sparsity=s, granularity=gran,
                                damp=0.01, block_size=8)
    assert bool((new[~keep] == 0).all())
    n = rows * cols
    if g.kind == "unstructured":
        assert int((~keep).sum()) == math.floor(s * n + 0.5)
    elif g.kind == "nm":
        # Exactly min(N, L) kept in every group of M (L = the group's length).
        full = nm_mask(torch.ones(rows, cols, dtype=torch.float64), g.n, g.m)
        assert int(keep.sum()) == int(full.sum())
        k = F.pad(keep.to(torch.int64), (0, (-cols) % g.m)).reshape(rows, -1, g.m).sum(-1)
        kf = F.pad(full.to(torch.int64), (0, (-cols) % g.m)).reshape(rows, -1, g.m).sum(-1)
        assert torch.equal(k, kf)
    elif g.kind == "block":
        r, c = g.block
        kp = F.pad(keep.to(torch.int64), (0, (-cols) % c, 0, (-rows) % r))
        blk = kp.reshape(kp.shape[0] // r, r, kp.shape[1] // c, c).permute(0, 2, 1, 3)
        real = F.pad(torch.ones(rows, cols, dtype=torch.int64), (0, (-cols) % c, 0, (-rows) % r))
        rb = real.reshape(kp.shape[0] // r, r, kp.shape[1] // c, c).permute(0, 2, 1, 3)
        kept_sum, real_sum = blk.sum((-1, -2)), rb.sum((-1, -2))
        assert bool(((kept_sum == 0) | (kept_sum == real_sum)).all())  # whole blocks only
        assert abs(int((~keep).sum()) - s * n) <= r * c * math.ceil(cols / 8)
    else:
        per_row = keep.sum(1)
        assert bool(((per_row == 0) | (per_row == cols)).all())
        assert abs(int((per_row == 0).sum()) - s * rows) <= 0.5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gran", ["unstructured", "2:4", (2, 4)])
def test_reconstruction_never_increases_layer_error(seed, gran):
    # Rank-deficient calibration (fewer rows than features) included: the dampened solve is not
    # the undamped optimum there, and the fallback must keep the masked weights in that case.
    torch.manual_seed(seed)
    n = 8 if seed % 2 else 200
    model = nn.Sequential(nn.Linear(40, 12)).double()
    lin = model[0]
    x = torch.randn(n, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    dense_w = lin.weight.detach().clone()
    plain_model = copy.deepcopy(model)
    plain = plain_model[0]
    prune(plain_model, 0.5 if gran != "2:4" else None, granularity=gran)
    rep = prune(model, 0.5 if gran != "2:4" else None, granularity=gran, reconstruct=True,
                calibration=[x])
    # Same mask as plain magnitude pruning, kept exactly.
    assert torch.equal(lin.weight == 0, plain.weight == 0)
    la = rep.extra["reconstruction"]["layers"][0]
    assert la["error_reconstructed"] <= la["error_masked"]
    err_rec = float(((x @ (dense_w - lin.weight.detach()).T) ** 2).sum())
    err_plain = float(((x @ (dense_w - plain.weight.detach()).T) ** 2).sum())
    assert err_rec <= err_plain * (1 + 1e-9) + 1e-12
    assert abs(rep.sparsity - 0.5) < 1e-2


def test_reconstruct_keeps_the_criterion_mask_exactly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 5))
    cal = [torch.randn(16, 24) for _ in range(3)]
    plain = copy.deepcopy(m)
    prune(plain, 0.7, criterion="wanda", calibration=cal)
    rep = prune(m, 0.7, criterion="wanda", calibration=cal, reconstruct=True)
    for a, b in zip(plain, m, strict=True):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight == 0, b.weight == 0)
    assert not torch.equal(plain[0].weight, m[0].weight)  # kept weights were updated
    for la in rep.extra["reconstruction"]["layers"]:
        assert la["error_reconstructed"] <= la["error_masked"]
        assert 0 <= la["fallback_rows"] <= 32


def test_sparsegpt_beats_magnitude_on_correlated_inputs():
    w, x = _layer_data(7, 16, 48, 300, rank=12)
    h = torch.from_numpy(x.T @ x / 300)
    wt = torch.from_numpy(w)
    new, keep = sparsegpt_layer(wt, h, sparsity=0.7, damp=0.01)
    order = torch.sort(wt.abs().reshape(-1), stable=True).indices
    mk = torch.ones(wt.numel(), dtype=torch.bool)
    mk[order[:int((~keep).sum())]] = False
    mk = mk.reshape(wt.shape)
    assert layer_error(wt, new, h) < 0.8 * layer_error(wt, wt * mk, h)


def test_sequential_layers_see_pruned_inputs():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 6)).double()
    dense = copy.deepcopy(m)
    cal = [torch.randn(32, 10, dtype=torch.float64) for _ in range(2)]
    rep = prune(m, 0.5, criterion="sparsegpt", calibration=cal, damp=0.0)
    layers = {la["name"]: la for la in rep.extra["reconstruction"]["layers"]}
    assert layers["0"]["group"] < layers["2"]["group"]
    # The second layer's error uses inputs from the *pruned* first layer.
    with torch.no_grad():
        xin = torch.cat([torch.tanh(m[0](b)) for b in cal])
    h = xin.T @ xin / xin.shape[0]
    err = layer_error(dense[2].weight.detach(), m[2].weight.detach(), h)
    assert err == pytest.approx(layers["2"]["error_reconstructed"], rel=1e-9)
    assert layers["2"]["calibration_rows"] == 64
    assert layers["2"]["hessian_bytes"] == 20 * 20 * 8


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) * scale, -1)
        return self.o(a @ self.v(x))


def test_siblings_share_a_pass_and_dict_batches():
    torch.manual_seed(2)
    m = _Attn()
    cal = [{"x": torch.randn(2, 5, 8), "scale": 0.5} for _ in range(2)]
    rep = prune(m, 0.5, criterion="sparsegpt", calibration=cal)
    groups = {la["name"]: la["group"] for la in rep.extra["reconstruction"]["layers"]}
    assert groups["q"] == groups["k"] == groups["v"] != groups["o"]
    assert all(abs(la.sparsity - 0.5) < 1e-9 for la in rep.layers)


def test_conv2d_error_matches_direct_convolution():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2)).double()
    conv = model[0]
    dense = copy.deepcopy(conv)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    rep = prune(model, 0.6, criterion="sparsegpt", calibration=[(x, None)])
    la = rep.extra["reconstruction"]["layers"][0]
    with torch.no_grad():
        d = F.conv2d(x, dense.weight - conv.weight, None, conv.stride, conv.padding)
    direct = float((d ** 2).sum()) / la["calibration_rows"]
    assert direct == pytest.approx(la["error_reconstructed"], rel=1e-9)
    assert la["error_reconstructed"] <= la["error_masked"]
    assert rep.layers[0].nonzero_after == 162 - math.floor(0.6 * 162 + 0.5)


def test_conv1d_and_hf_conv1d():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv1d(4, 5, 3, padding=1), nn.ReLU())
    rep = prune(m, 0.5, criterion="sparsegpt", types=nn.Conv1d,
                calibration=[torch.randn(3, 4, 11)])
    la = rep.extra["reconstruction"]["layers"][0]
    assert la["hessian_shape"] == [12, 12] and la["error_reconstructed"] <= la["error_masked"]
    pu = pytest.importorskip("transformers.pytorch_utils")
    conv = pu.Conv1D(6, 10).double()  # weight (in=10, out=6)
    with torch.no_grad():
        conv.weight.normal_()
    dense = conv.weight.detach().clone()
    x = torch.randn(50, 10, dtype=torch.float64)
    masks, reps = reconstruct_model(conv, {"c": conv}, [x], targets={"c": 0.5})
    assert masks["c"].shape == conv.weight.shape
    assert torch.equal(conv.weight == 0, ~masks["c"])
    err = float(((x @ (dense - conv.weight.detach())) ** 2).sum()) / 50
    assert err == pytest.approx(reps[0].error_reconstructed, rel=1e-9)


def test_deterministic():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    cal = [torch.randn(8, 16) for _ in range(3)]
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    prune(a, granularity="2:4", criterion="sparsegpt", calibration=cal)
    prune(b, granularity="2:4", criterion="sparsegpt", calibration=iter(list(cal)))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_float32_hessian_close_to_float64():
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(16, 12))
    cal = [torch.randn(64, 16)]
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    prune(a, 0.5, criterion="sparsegpt", calibration=cal)
    rep = prune(b, 0.5, criterion="sparsegpt", calibration=cal, hessian_dtype=torch.float32)
    assert rep.extra["reconstruction"]["max_hessian_bytes"] == 16 * 16 * 4
    torch.testing.assert_close(a[0].weight, b[0].weight, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- errors
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("cal,match", [
    (None, r"calibration: criterion 'sparsegpt' needs calibration data"),
    ([], r"calibration: the iterable yielded no batches"),
    ([1, 2], r"calibration: batch 0 must be a tensor"),
    ([torch.randn(2, 6), "text"], r"calibration: batch 1 must be a tensor"),
    (torch.randn(2, 6), r"got a single Tensor; wrap it in a list"),
    ([torch.randn(2, 7)], r"calibration: batch 0 could not be run through the model"),
    ([{"y": torch.randn(2, 6)}], r"calibration: batch 0 could not be run through the model"),
    ([torch.full((2, 6), float("nan"))], r"calibration: inputs of module '0' contain NaN"),
])
def test_bad_calibration_errors(cal, match):
    with pytest.raises(ValueError, match=match):
        prune(_mlp(), 0.5, criterion="sparsegpt", calibration=cal)


def test_other_errors():
    with pytest.raises(ValueError, match="scope: criterion 'sparsegpt'"):
        prune(_mlp(), 0.5, criterion="sparsegpt", scope="global", calibration=[torch.ones(2, 6)])
    with pytest.raises(ValueError, match="damp: expected a non-negative number"):
        prune(_mlp(), 0.5, criterion="sparsegpt", damp=-1, calibration=[torch.ones(2, 6)])
    with pytest.raises(ValueError, match="block_size: expected an int >= 1"):
        prune(_mlp(), 0.5, criterion="sparsegpt", block_size=0, calibration=[torch.ones(2, 6)])
    with pytest.raises(ValueError, match="reconstruct: expected a bool"):
        prune(_mlp(), 0.5, reconstruct="yes")
    with pytest.raises(ValueError, match="calibration: reconstruct=True needs calibration"):
        prune(_mlp(), 0.5, reconstruct=True)
    with pytest.raises(ValueError, match="criterion: 'sparsegpt' is one-shot"):
        GradualPruner(_mlp(), 0.5, end_step=10, criterion="sparsegpt",
                      calibration=[torch.ones(2, 6)])
    with pytest.raises(NotImplementedError, match="supports nn.Linear, nn.Conv1d, nn.Conv2d"):
        prune(nn.Sequential(nn.Conv3d(2, 2, 1)), 0.5, criterion="sparsegpt", types=nn.Conv3d,
              calibration=[torch.ones(1, 2, 2, 2, 2)])
    with pytest.raises(NotImplementedError, match="groups=1"):
        prune(nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)), 0.5, criterion="sparsegpt",
              calibration=[torch.ones(1, 2, 2, 2)])


def test_dense_targets_single_layer_equals_default_and_least_squares():
    torch.manual_seed(8)
    m = nn.Sequential(nn.Linear(9, 4)).double()
    cal = [torch.randn(40, 9, dtype=torch.float64)]
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    prune(a, 0.5, criterion="sparsegpt", calibration=cal, damp=0.0)
    prune(b, 0.5, criterion="sparsegpt", calibration=cal, damp=0.0, dense_targets=True)
    torch.testing.assert_close(a[0].weight, b[0].weight, rtol=1e-9, atol=1e-10)


def test_dense_targets_fit_the_dense_output_of_a_deep_model():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)]).double()
    cal = [torch.randn(64, 16, dtype=torch.float64) for _ in range(2)]
    x = torch.cat(cal)
    errs = {}
    for dt in (False, True):
        p = copy.deepcopy(m)
        rep = prune(p, 0.6, criterion="sparsegpt", calibration=cal, dense_targets=dt)
        assert abs(rep.sparsity - 0.6) < 1e-2
        with torch.no_grad():
            errs[dt] = float(((p(x) - m(x)) ** 2).sum())
    # Fitting each layer to the dense output undoes the drift of the earlier pruned layers.
    assert errs[True] < 0.5 * errs[False]
