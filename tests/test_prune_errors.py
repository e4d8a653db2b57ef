"""Bad arguments to sparsekit.prune raise clear errors that name the argument and the value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit.prune import GradualPruner, prune


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(sparsity=1.0), ValueError, r"sparsity: expected a number in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), ValueError, r"sparsity: .*got -0.1"),
    (dict(sparsity=float("nan")), ValueError, r"sparsity: .*nan"),
    (dict(sparsity="0.5"), ValueError, r"sparsity: .*'0.5'"),
    (dict(sparsity=True), ValueError, r"sparsity: .*True"),
    (dict(sparsity=None), ValueError, r"sparsity: required"),
    (dict(sparsity={"0": 1.5}), ValueError, r"sparsity\['0'\]: .*1.5"),
    (dict(sparsity={"fc9": 0.5}), ValueError, r"sparsity: keys \['fc9'\] match no"),
    (dict(sparsity={"0": 0.5}, scope="global"), ValueError, r"sparsity: .*scope='layer'"),
    (dict(sparsity=0.5, criterion="l3"), ValueError, r"criterion: .*'l3'"),
    (dict(sparsity=0.5, granularity="diagonal"), ValueError, r"granularity: .*'diagonal'"),
    (dict(sparsity=0.5, granularity="4:2"), ValueError, r"granularity: N must be <= M.*N=4 > M=2"),
    (dict(sparsity=0.5, granularity="2:x"), ValueError, r"granularity: bad N:M string '2:x'"),
    (dict(sparsity=0.5, granularity="0:4"), ValueError, r"granularity: .*'0:4'"),
    (dict(sparsity=0.5, granularity=(0, 4)), ValueError, r"granularity: .*\(0, 4\)"),
    (dict(sparsity=0.5, granularity=(7, 2)), ValueError,
     r"granularity: block \(7, 2\) is larger than the weight of module '0' \(2-D view 6x8\)"),
    (dict(sparsity=None, granularity="2:16"), ValueError, r"granularity: M=16 .* module '0'"),
    (dict(sparsity=0.9, granularity="2:4"), ValueError, r"sparsity: 0.9 contradicts .*'2:4'"),
    (dict(sparsity=0.5, granularity="2:4", scope="global"), ValueError, r"granularity: N:M"),
    (dict(sparsity=0.5, scope="model"), ValueError, r"scope: .*'model'"),
    (dict(sparsity=0.5, include="fc*"), ValueError,
     r"include: filter 'fc\*' matches no module.*module names: 0, 1, 2"),
    (dict(sparsity=0.5, exclude="head"), ValueError, r"exclude: filter 'head' matches no module"),
    (dict(sparsity=0.5, include=[3]), ValueError, r"include: expected module name glob patterns"),
    (dict(sparsity=0.5, types=nn.ReLU), ValueError, r"types: unsupported module type"),
    (dict(sparsity=0.5, types=nn.Conv2d), ValueError, r"no module to prune"),
    (dict(sparsity=0.5, criterion="wanda"), ValueError, r"calibration: .*wanda.*got None"),
    (dict(sparsity=0.5, criterion="wanda", calibration=[torch.randn(4, 5)]), ValueError,
     r"calibration: module '0' expects inputs with last dimension 8, got shape \(4, 5\)"),
    (dict(sparsity=0.5, criterion="wanda", calibration=[]), ValueError,
     r"calibration: the iterable yielded no batches"),
    (dict(sparsity=0.5, criterion="wanda", calibration=["text"]), TypeError,
     r"calibration: each batch must be"),
    (dict(sparsity=0.5, criterion=lambda w, m: w[:1]), ValueError,
     r"criterion: callable must return a tensor of the weight's shape \(6, 8\)"),
])
def test_prune_bad_arguments(kwargs, exc, pattern):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(exc, match=pattern):
        prune(model, **kwargs)
    # nothing was modified and no hook is left behind
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_prune_bad_model_and_nan_weights():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got list"):
        prune([nn.Linear(2, 2)], 0.5)
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model: weight of module '0' contains NaN"):
        prune(model, 0.5)


def test_wanda_unsupported_module():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError, match="criterion: wanda supports Conv2d only with "
                                                  "groups=1"):
        prune(model, 0.5, criterion="wanda", calibration=[torch.randn(1, 4, 5, 5)])


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(final_sparsity=0.5, end_step=10, schedule="exp"), r"schedule: .*'exp'"),
    (dict(final_sparsity=0.5, start_step=5, end_step=2), r"end_step: expected an int >= 5, got 2"),
    (dict(final_sparsity=0.5, start_step=-1, end_step=2), r"start_step: .*got -1"),
    (dict(final_sparsity=0.5, end_step=10, frequency=0), r"frequency: .*>= 1, got 0"),
    (dict(final_sparsity=1.2, end_step=10), r"final_sparsity: .*1.2"),
    (dict(final_sparsity=0.5, initial_sparsity=0.7, end_step=10),
     r"initial_sparsity: 0.7 exceeds the final sparsity 0.5"),
    (dict(final_sparsity=0.5, end_step=10, optimizer="adam"), r"optimizer: expected"),
    (dict(final_sparsity=0.5, end_step=10, criterion="wanda",
          calibration=iter([torch.randn(2, 8)])), r"calibration: .*re-iterable"),
])
def test_gradual_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GradualPruner(_model(), **kwargs)


def test_gradual_step_argument():
    pruner = GradualPruner(_model(), 0.5, end_step=4)
    with pytest.raises(ValueError, match="step: expected an int >= 0, got -3"):
        pruner.step(-3)
