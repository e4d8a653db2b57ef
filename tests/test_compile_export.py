"""SparseLinear under torch.compile (fullgraph, no graph breaks) and torch.export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from _nn_models import Block, magnitude_prune, mlp

from sparsekit.nn import SparseLinear, sparsify


def _model():
    torch.manual_seed(20)
    m = Block(d=64)
    magnitude_prune(m, 0.8)
    m.eval()
    sparsify(m, tune=False, min_sparsity=0.0)
    # mix both formats: q, fc1 BSR, the rest CSR
    for name in ("q", "fc1"):
        lin = getattr(m, name).to_linear()
        setattr(m, name, SparseLinear.from_dense(lin, format="bsr", blocksize=(4, 4)))
    assert {mod.format for mod in m.modules() if isinstance(mod, SparseLinear)} == {"csr", "bsr"}
    return m


def _ref(model, x):
    dense = copy.deepcopy(model)
    from sparsekit.nn import densify

    densify(dense)
    with torch.no_grad():
        return dense.double()(x.double())


def _close(a, b, tol=2e-5):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * (b.abs().max().item() + 1), err


def test_no_graph_breaks():
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(2, 5, 64)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = _model()
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 5, 64, generator=gen)
    # aot_eager traces forward + backward through the ops' fake/autograd registrations
    # without inductor's C++ compile time; the inductor run below covers codegen.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        _close(compiled(x), _ref(model, x))
    xg = x.clone().requires_grad_(True)
    compiled(xg).square().sum().backward()
    g_compiled = xg.grad.clone()
    xg.grad = None
    model(xg).square().sum().backward()
    _close(g_compiled, xg.grad)
    x64 = x.double().requires_grad_(True)
    dense = copy.deepcopy(model)
    from sparsekit.nn import densify

    densify(dense).double()(x64).square().sum().backward()
    _close(g_compiled, x64.grad, 1e-4)


def test_compile_inductor_mlp():
    torch._dynamo.reset()
    torch.manual_seed(22)
    model = magnitude_prune(mlp((64, 96, 32)), 0.8).eval()
    sparsify(model, tune=False)
    x = torch.randn(3, 64)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        _close(compiled(x), _ref(model, x))


def test_export_round_trip_keeps_uint16_and_matches_eager(tmp_path):
    model = _model()
    x = torch.randn(2, 5, 64)
    ep = torch.export.export(model, (x,))
    sd = ep.state_dict
    assert sd["fc2.weight_indices"].dtype == torch.uint16
    assert sd["q.weight_indices"].dtype == torch.uint16
    assert sd["fc2.weight_indptr"].dtype == torch.int32
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "sparsekit.csr_linear.default" in targets and "sparsekit.bsr_linear.default" in targets
    with torch.no_grad():
        want = model(x)
        _close(ep.module()(x), want, 0.0)
        x2 = torch.randn(2, 5, 64)
        _close(ep.module()(x2), model(x2), 0.0)
    # serialised program (torch.export.save / load) keeps the buffers and runs
    p = tmp_path / "prog.pt2"
    torch.export.save(ep, p)
    ep2 = torch.export.load(p)
    assert ep2.state_dict["fc2.weight_indices"].dtype == torch.uint16
    with torch.no_grad():
        _close(ep2.module()(x), want, 0.0)


def test_export_dynamic_batch():
    torch.manual_seed(23)
    model = magnitude_prune(mlp((32, 48, 16)), 0.75).eval()
    sparsify(model, tune=False)
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.randn(4, 32),), dynamic_shapes={"input": {0: batch}})
    for n in (1, 7):
        x = torch.randn(n, 32)
        with torch.no_grad():
            _close(ep.module()(x), model(x), 0.0)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_fake_registration_checks_shapes(fmt):
    from torch._subclasses.fake_tensor import FakeTensorMode

    lin = torch.nn.Linear(16, 8)
    sl = SparseLinear.from_dense(lin, format=fmt, blocksize=(2, 2) if fmt == "bsr" else None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = sl(torch.empty(3, 4, 16, dtype=torch.bfloat16))
        assert y.shape == (3, 4, 8) and y.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="x: expected last dimension == weight in_features"):
            sl(torch.empty(3, 15))


COMPRESSED = [
    pytest.param(dict(value_dtype=torch.int8), "csr_linear_compressed", id="int8-csr"),
    pytest.param(dict(index_encoding="delta8"), "csr_linear_compressed", id="delta8-fp32-csr"),
    pytest.param(dict(value_dtype=torch.int8, index_encoding="delta8"), "csr_linear_compressed",
                 id="int8-delta8-csr"),
    pytest.param(dict(value_dtype=torch.int8, format="bsr", blocksize=(4, 4)),
                 "bsr_linear_compressed", id="int8-bsr"),
]


def _compressed_mlp(kw, seed):
    torch.manual_seed(seed)
    model = magnitude_prune(mlp((96, 160, 33)), 0.85).eval()
    for i, mod in enumerate(model):
        if isinstance(mod, torch.nn.Linear):
            model[i] = SparseLinear.from_dense(mod, **kw)
    return model


@pytest.mark.parametrize("kw, op", COMPRESSED)
def test_compressed_weights_compile_fullgraph_and_export(kw, op, tmp_path):
    """int8 values / delta8 indices go through their own custom ops: no graph break, and every
    layer of a compiled or exported model uses its own weight (checked against float64)."""
    torch._dynamo.reset()
    model = _compressed_mlp(kw, seed=31)
    x = torch.randn(5, 96)
    with torch.no_grad():
        eager = model(x)
        ref = x.double()
        for mod in model:  # float64 reference from each layer's decoded dense weight
            ref = (ref @ mod.weight.double().T + mod.bias.double() if isinstance(mod, SparseLinear)
                   else mod(ref))
        _close(eager, ref, 1e-5)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        _close(compiled(x), eager, 0.0)
        ep = torch.export.export(model, (x,))
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert f"sparsekit.{op}.default" in targets, targets
        x2 = torch.randn(5, 96)  # exported shapes are static
        _close(ep.module()(x2), model(x2), 0.0)
        p = tmp_path / "prog.pt2"
        torch.export.save(ep, p)
        _close(torch.export.load(p).module()(x2), model(x2), 0.0)


def test_compressed_op_rejects_plain_weights():
    sl = SparseLinear.from_dense(torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match="expected int8 values or uint8 \\(delta8\\) indices"):
        torch.ops.sparsekit.csr_linear_compressed(
            torch.randn(2, 16), sl.weight_indptr, sl.weight_indices, sl.weight_values, None,
            None, 8, 16)


def test_export_of_a_fused_activation(tmp_path):
    """sparsify fuses the ReLU after each sparse layer: the exported program applies it after
    the op (the FusedActivation placeholder traces to nothing) and matches the dense model."""
    torch.manual_seed(23)
    model = magnitude_prune(mlp((64, 96, 48, 10)), 0.8).eval()
    dense = copy.deepcopy(model)
    assert len(sparsify(model, tune=False).fused) == 2
    x = torch.randn(4, 64)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("aten.relu.default") == 2, targets
    path = tmp_path / "fused.pt2"
    torch.export.save(ep, path)
    with torch.no_grad():
        _close(torch.export.load(path).module()(x), dense.double()(x.double()))
