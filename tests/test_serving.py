"""sparsekit.warmup: what it touches, what it reports, what it leaves unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsekit
from sparsekit.nn import SparseLinear

ROOT = Path(__file__).resolve().parents[1]


def _sl(k: int, m: int, seed: int, fmt: str = "csr", backend: str = "auto") -> SparseLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.mul_((torch.rand(m, k, generator=g) < 0.3).float())
    kw = {"blocksize": (4, 4)} if fmt == "bsr" else {}
    return SparseLinear.from_dense(lin, format=fmt, backend=backend, **kw)


class TwoHeads(torch.nn.Module):
    """Only head ``a`` is reached by forward(); ``b`` must still be warmed up."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _sl(16, 32, 0)
        self.a = _sl(32, 4, 1, fmt="bsr")
        self.b = _sl(32, 3, 2)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.drop(torch.relu(self.body(x))))


def test_warmup_touches_every_sparse_module_and_restores_state():
    model = TwoHeads()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"b": 0}
    model.b.register_forward_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    x = torch.randn(5, 16)
    report = sparsekit.warmup(model, x, batch_sizes=[1, 7, 32])

    assert report.sparse_modules == 3
    assert report.touched_by_forward == 2
    assert report.touched_directly == ["b"]
    assert calls["b"] == 3 * 2  # each batch size x repeats
    assert report.passes == 3 * 2 and report.batch_sizes == [1, 7, 32]
    assert report.total_s >= report.first_pass_s > 0
    assert json.loads(json.dumps(report.as_dict()))["touched_directly"] == ["b"]
    # Training flags restored, tensors untouched, warm-up hooks removed.
    assert model.training and model.drop.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert len(model.a._forward_hooks) == 0 and len(model.b._forward_hooks) == 1
    # The warmed-up model still computes the right thing (dense float64 reference).
    model.eval()
    with torch.inference_mode():
        h = torch.relu(x.double() @ model.body.matrix.to_dense().double().T
                       + model.body.bias.double())
        ref = h @ model.a.matrix.to_dense().double().T + model.a.bias.double()
        torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_warmup_tuple_inputs_and_bare_module():
    sl = _sl(8, 6, 3)
    rep = sparsekit.warmup(sl, (torch.randn(2, 8),), batch_sizes=[3], repeats=1)
    assert rep.passes == 1 and rep.sparse_modules == 1 and rep.touched_by_forward == 1


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"model": "nope"}, TypeError, "model"),
        ({"example_inputs": "x"}, TypeError, "example_inputs"),
        ({"batch_sizes": []}, ValueError, "batch_sizes"),
        ({"batch_sizes": [4, 0]}, ValueError, "batch_sizes"),
        ({"batch_sizes": 4}, TypeError, "batch_sizes"),
        ({"repeats": 0}, ValueError, "repeats"),
    ],
)
def test_warmup_argument_errors(kwargs, exc, name):
    args = {"model": _sl(8, 4, 0), "example_inputs": torch.randn(2, 8)}
    args.update(kwargs)
    model = args.pop("model")
    ex = args.pop("example_inputs")
    with pytest.raises(exc, match=name):
        sparsekit.warmup(model, ex, **args)


_NUMBA_PROBE = r"""
import gc, json, time, torch, sparsekit
from sparsekit.nn import SparseLinear
from numba.core.dispatcher import Dispatcher
lin = torch.nn.Linear(64, 32)
with torch.no_grad():
    lin.weight.mul_((torch.rand(32, 64) < 0.3).float())
model = torch.nn.Sequential(SparseLinear.from_dense(lin, format="csr", backend="numba"))
def compiled():
    return sum(len(d.overloads) for d in gc.get_objects() if isinstance(d, Dispatcher))
before = compiled()
rep = sparsekit.warmup(model, torch.randn(4, 64))
after = compiled()
t0 = time.perf_counter(); model(torch.randn(4, 64)); first_request = time.perf_counter() - t0
print(json.dumps({"before": before, "after": after, "first_pass": rep.first_pass_s,
                  "first_request": first_request}))
"""


def test_warmup_compiles_numba_kernels(tmp_path):
    if "numba" not in sparsekit.backends():
        pytest.skip("numba backend not available")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["NUMBA_CACHE_DIR"] = str(tmp_path)  # empty cache: really compile
    proc = subprocess.run([sys.executable, "-c", _NUMBA_PROBE], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["before"] == 0  # import compiled nothing
    assert r["after"] > 0  # warm-up compiled the kernels the model uses


def test_importing_sparsekit_serving_does_not_import_ray():
    code = ("import sys, sparsekit, sparsekit.serving, sparsekit.serving.http; "
            "sparsekit.warmup; print('ray' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False"


def test_serving_package_keeps_public_names():
    from sparsekit import serving
    from sparsekit.serving import WarmupReport, warmup
    from sparsekit.serving.http import RequestError, parse_inputs

    assert sparsekit.warmup is warmup and serving.WarmupReport is WarmupReport
    x = parse_inputs(b'{"inputs": [[1, 2.5]]}', 2, 4)
    assert x.dtype.name == "float32" and x.tolist() == [[1.0, 2.5]]
    with pytest.raises(RequestError, match="row 0: expected 3 numbers, got 2"):
        parse_inputs(b'{"inputs": [[1, 2.5]]}', 3, 4)


@pytest.mark.parametrize("ctype", [None, "application/json", "application/json; charset=utf-8",
                                   "Application/JSON", "application/vnd.api+json"])
def test_require_json_accepts_json_content_types(ctype):
    from sparsekit.serving.http import require_json

    require_json(ctype)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "json/xml"])
def test_require_json_rejects_others_with_415(ctype):
    from sparsekit.serving.http import RequestError, require_json

    want = f"content-type: expected application/json, got {ctype}"
    with pytest.raises(RequestError, match=want) as e:
        require_json(ctype)
    assert e.value.status == 415
