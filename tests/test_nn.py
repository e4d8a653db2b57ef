"""SparseLinear, sparsify/densify: against masked dense float64 references."""

from __future__ import annotations

import copy
import importlib
import json
import re

import pytest
import torch
from _nn_models import Block, linear_reference, magnitude_prune, mlp
from torch import nn

import sparsekit
from sparsekit.formats import BSRMatrix, CSRMatrix
from sparsekit.nn import SparseLinear, densify, sparsify

# the module (sparsekit.nn.sparsify the attribute is the function)
sparsify_mod = importlib.import_module("sparsekit.nn.sparsify")

# |err| <= TOL * (max|ref| + 1): fp32 accumulation order; bf16 end-to-end rounding of the
# activations through a whole block (LayerNorm, softmax, GELU all run in bf16).
TOL = {torch.float32: 2e-5, torch.bfloat16: 6e-2}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    got, ref = got.double(), ref.double()
    err = (got - ref).abs().max().item()
    bound = TOL[dtype] * (ref.abs().max().item() + 1.0)
    assert err <= bound, f"max abs err {err:.3g} > {bound:.3g} ({dtype})"


def _pruned_linear(m, k, sparsity, seed, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias)
    magnitude_prune(lin, sparsity)
    return lin.to(dtype)


# ------------------------------------------------------------------------------ SparseLinear


@pytest.mark.parametrize(
    "fmt,bs", [("csr", None), ("bsr", (4, 4)), ("bsr", (3, 5)), ("bsr", (1, 8))]
)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense_float64(fmt, bs, bias):
    lin = _pruned_linear(37, 70, 0.7, seed=1, bias=bias)  # ragged vs every block shape
    sl = SparseLinear.from_dense(lin, format=fmt, blocksize=bs)
    assert sl.format == fmt and sl.blocksize == bs
    assert (sl.in_features, sl.out_features) == (70, 37)
    assert torch.equal(sl.weight, lin.weight.detach())
    gen = torch.Generator().manual_seed(2)
    for shape in [(70,), (1, 70), (5, 70), (2, 3, 70), (0, 70)]:
        x = torch.randn(shape, generator=gen)
        y = sl(x)
        ref = torch.nn.functional.linear(
            x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double()
        )
        assert y.shape == ref.shape and y.dtype == torch.float32
        if ref.numel():
            _close(y, ref, torch.float32)


def test_output_dtype_follows_input():
    lin = _pruned_linear(16, 32, 0.6, seed=3)
    x = torch.randn(4, 32)
    ref = lin(x).double()
    for vdt in (torch.float32, torch.bfloat16):
        sl = SparseLinear.from_dense(lin, format="csr", value_dtype=vdt)
        assert sl.weight_values.dtype == vdt
        for xdt in (torch.float32, torch.bfloat16, torch.float16):
            y = sl(x.to(xdt))
            assert y.dtype == xdt
            tol = torch.float32 if (vdt, xdt) == (torch.float32, torch.float32) else torch.bfloat16
            _close(y, ref, tol)


@pytest.mark.parametrize("grad", [False, True])
def test_dtype_rules_identical_on_every_entry_point(grad):
    """sparsekit.linear, SparseLinear (fast path and op path) and the custom op accept and
    reject the same inputs with the same message."""
    lin = _pruned_linear(8, 12, 0.5, seed=5)
    sl = SparseLinear.from_dense(lin, format="csr")
    mat = sl.matrix
    calls = {
        "linear": lambda x: sparsekit.linear(x, mat, sl.bias),
        "SparseLinear": sl,
        "op": lambda x: torch.ops.sparsekit.csr_linear(
            x, sl.weight_indptr, sl.weight_indices, sl.weight_values, sl.bias, 8, 12),
    }
    for name, f in calls.items():
        for bad, exc, msg in (
            (torch.randn(3, 12, dtype=torch.float64), TypeError,
             "x: expected dtype float32, bfloat16 or float16, got torch.float64"),
            (torch.ones(3, 12, dtype=torch.int64), TypeError,
             "x: expected dtype float32, bfloat16 or float16, got torch.int64"),
            (torch.randn(3, 11), ValueError,
             re.escape("x: expected last dimension == weight in_features = 12, got shape (3, 11)")),
        ):
            with torch.set_grad_enabled(grad), pytest.raises(exc, match=msg):
                f(bad.requires_grad_(grad and bad.is_floating_point()))
        x = torch.randn(3, 12, dtype=torch.float16, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            y = f(x)
        assert y.dtype == torch.float16, name
        _close(y, lin(x.detach().float()).double(), torch.bfloat16)


def test_constructor_from_matrix_and_bad_inputs():
    w = torch.randn(8, 12)
    w[w.abs() < 0.7] = 0
    b = torch.randn(8)
    sl = SparseLinear(CSRMatrix.from_dense(w), b)
    _close(sl(torch.ones(12)), w.double().sum(1) + b.double(), torch.float32)
    slb = SparseLinear(BSRMatrix.from_dense(w, blocksize=(2, 4)), None)
    assert slb.bias is None and slb.blocksize == (2, 4)
    with pytest.raises(TypeError, match="weight: expected a sparsekit CSRMatrix"):
        SparseLinear(w)
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        SparseLinear(CSRMatrix.from_dense(w), torch.zeros(9))
    with pytest.raises(ValueError, match="format: expected one of"):
        SparseLinear.from_dense(nn.Linear(4, 4), format="coo")
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        SparseLinear(CSRMatrix.from_dense(w), backend="mkl")
    sl_ref = SparseLinear(CSRMatrix.from_dense(w), b, backend="torch")
    _close(sl_ref(torch.ones(12)), w.double().sum(1) + b.double(), torch.float32)
    with pytest.raises(TypeError, match="value_dtype"):
        SparseLinear.from_dense(nn.Linear(4, 4), value_dtype=torch.float64)
    with pytest.raises(ValueError, match="x: expected last dimension == weight in_features = 12"):
        sl(torch.randn(3, 11))
    with pytest.raises(TypeError, match="x: expected dtype float32, bfloat16 or float16"):
        sl(torch.ones(3, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="bias: expected dtype float32, bfloat16 or float16"):
        SparseLinear(CSRMatrix.from_dense(w), b.double())


def test_weights_are_frozen_buffers_and_repr():
    sl = SparseLinear.from_dense(_pruned_linear(16, 64, 0.75, seed=4), format="bsr",
                                 blocksize=(4, 4), value_dtype=torch.bfloat16)
    assert [n for n, _ in sl.named_parameters()] == ["bias"]
    names = {n for n, _ in sl.named_buffers()}
    assert names == {"weight_indptr", "weight_indices", "weight_values", "weight_meta"}
    assert sl.weight_indices.dtype == torch.uint16
    r = repr(sl)
    for s in ("format=bsr", "blocksize=(4, 4)", "density=", "value_dtype=bfloat16", "bytes="):
        assert s in r
    assert sl.nbytes == sum(t.numel() * t.element_size() for t in
                            (sl.weight_indptr, sl.weight_indices, sl.weight_values))


@pytest.mark.parametrize("fmt,bs", [("csr", None), ("bsr", (4, 2))])
def test_backward_to_input_and_bias(fmt, bs, monkeypatch):
    lin = _pruned_linear(24, 40, 0.7, seed=5)
    sl = SparseLinear.from_dense(lin, format=fmt, blocksize=bs)
    # count transposes: the sparse transpose must be computed once and cached
    calls = {"n": 0}
    cls = CSRMatrix if fmt == "csr" else BSRMatrix
    orig = cls.transpose

    def counting(self):
        calls["n"] += 1
        return orig(self)

    monkeypatch.setattr(cls, "transpose", counting)
    gen = torch.Generator().manual_seed(6)
    w64 = lin.weight.detach().double().requires_grad_(False)
    for _ in range(3):
        x = torch.randn(2, 3, 40, generator=gen, requires_grad=True)
        g = torch.randn(2, 3, 24, generator=gen)
        y = sl(x)
        y.backward(g)
        x64 = x.detach().double().requires_grad_(True)
        b64 = lin.bias.detach().double().requires_grad_(True)
        torch.nn.functional.linear(x64, w64, b64).backward(g.double())
        _close(x.grad, x64.grad, torch.float32)
        _close(sl.bias.grad, b64.grad, torch.float32)
        sl.bias.grad = None
    assert calls["n"] == 1
    assert sl.weight_values.grad is None and not sl.weight_values.requires_grad
    # gradcheck-style: finite differences through the sparse op in fp32
    x = torch.randn(3, 40, generator=gen, requires_grad=True)
    (gx,) = torch.autograd.grad(sl(x).pow(2).sum(), x)
    ref = torch.autograd.grad(
        torch.nn.functional.linear(x.double(), w64, lin.bias.double()).pow(2).sum(), x
    )[0]
    _close(gx, ref, torch.float32)


def test_apply_moves_and_casts_values_only():
    sl = SparseLinear.from_dense(_pruned_linear(16, 32, 0.5, seed=7))
    ip, ix = sl.weight_indptr.clone(), sl.weight_indices.clone()
    for conv, dt in ((lambda m: m.half(), torch.float16), (lambda m: m.bfloat16(), torch.bfloat16),
                     (lambda m: m.to(torch.float32), torch.float32),
                     (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16)):
        conv(sl)
        assert sl.weight_values.dtype == dt and sl.bias.dtype == dt
        assert sl.weight_indices.dtype == torch.uint16 and torch.equal(sl.weight_indices, ix)
        assert sl.weight_indptr.dtype == torch.int32 and torch.equal(sl.weight_indptr, ip)
        assert sl.weight_meta.dtype == torch.int64
        assert sl(torch.randn(2, 32, dtype=dt)).dtype == dt
    # a custom fn that would cast everything: index buffers keep their dtype
    sl._apply(lambda t: t.float())
    assert sl.weight_indices.dtype == torch.uint16 and sl.weight_values.dtype == torch.float32
    with pytest.raises(TypeError, match="values can be float32, bfloat16 or float16"):
        sl.double()
    assert sl.weight_values.dtype == torch.float32  # unchanged after the refused conversion


@pytest.mark.parametrize("src_fmt,dst_fmt", [("csr", "csr"), ("bsr", "csr"), ("csr", "bsr")])
def test_state_dict_round_trip_into_fresh_module(src_fmt, dst_fmt):
    lin = _pruned_linear(20, 48, 0.8, seed=8)
    sl = SparseLinear.from_dense(
        lin, format=src_fmt, blocksize=(4, 4) if src_fmt == "bsr" else None
    )
    sd = sl.state_dict()
    assert set(sd) == {"weight_indptr", "weight_indices", "weight_values", "weight_meta", "bias"}
    fresh = SparseLinear.empty(
        48, 20, format=dst_fmt, blocksize=(2, 2) if dst_fmt == "bsr" else None
    )
    fresh.load_state_dict(sd)
    assert fresh.format == src_fmt
    for k, v in fresh.state_dict().items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    x = torch.randn(3, 48)
    assert torch.equal(fresh(x), sl(x))
    with pytest.raises(RuntimeError, match="does not match the module"):
        SparseLinear.empty(47, 20).load_state_dict(sd)
    bad = dict(sd)
    bad["weight_indices"] = sd["weight_indices"].clone()
    bad["weight_indices"][0] = 60000
    with pytest.raises(RuntimeError, match="indices"):
        SparseLinear.empty(48, 20).load_state_dict(bad)


def test_densify_mixed_value_dtype_is_exact():
    lin = _pruned_linear(12, 20, 0.5, seed=14)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.bfloat16().float())  # representable in bf16
    model = nn.Sequential(SparseLinear.from_dense(lin, value_dtype=torch.bfloat16))
    densify(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, lin.weight) and torch.equal(model[0].bias, lin.bias)
    x = torch.randn(3, 20)
    assert torch.equal(model(x), lin(x))


def test_inplace_buffer_change_invalidates_backend_cache():
    lin = _pruned_linear(8, 16, 0.5, seed=9)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(2, 16)
    _close(sl(x), torch.nn.functional.linear(x.double(), lin.weight.double(),
                                             lin.bias.double()), torch.float32)
    with torch.no_grad():
        sl.weight_values.mul_(2.0)  # backends may cache views/partitions of the buffers
        sl.bias.zero_()
    _close(sl(x), x.double() @ (2 * lin.weight.double()).T, torch.float32)


# ------------------------------------------------------------------------------ sparsify


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["block", "mlp"])
def test_sparsify_model_matches_masked_dense(dtype, kind):
    torch.manual_seed(10)
    if kind == "block":
        model = Block(d=64)
        magnitude_prune(model, 0.8, block=(4, 4))  # blocky: the heuristic picks BSR
        x = torch.randn(2, 5, 64)
    else:
        model = mlp((64, 128, 96, 10))
        magnitude_prune(model, 0.8)  # unstructured: CSR
        x = torch.randn(7, 64)
    model = model.to(dtype).eval()
    dense = copy.deepcopy(model)
    ref = linear_reference(dense, x.to(dtype))
    rep = sparsify(model, tune=False)
    supported = [lr for lr in rep.layers if lr.status != "unsupported"]
    assert len(rep.replaced) == len(supported) > 0
    assert all(lr.module_type == "LayerNorm" for lr in rep.by_status("unsupported"))
    formats = {m.format for m in model.modules() if isinstance(m, SparseLinear)}
    assert formats == ({"bsr"} if kind == "block" else {"csr"})
    with torch.no_grad():
        y = model(x.to(dtype))
        yd = dense(x.to(dtype))
    assert y.dtype == dtype
    _close(y, ref, dtype)
    _close(y, yd, dtype)
    densify(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), dense.state_dict().items()):
        assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2), n1


def test_sparsify_eligibility_and_report():
    torch.manual_seed(11)
    model = mlp((32, 64, 64, 8))
    magnitude_prune(model, 0.9)
    with torch.no_grad():
        model[2].weight.fill_(1.0)  # 0% sparse: never eligible
    rep = sparsify(model, tune=False, filter_fn=lambda name, m: name != "4")
    assert rep.replaced == ["0"]
    assert isinstance(model[0], SparseLinear) and type(model[2]) is nn.Linear
    assert type(model[4]) is nn.Linear
    d = rep.to_dict()
    json.dumps(d)
    assert [lr["choice"] for lr in d["layers"]] == ["csr", "dense", "dense"]
    assert "min_sparsity" in d["layers"][1]["reason"] and d["layers"][2]["reason"] == "filtered out"
    s = str(rep)
    assert "1/3 supported layers replaced" in s and "filtered out" in s
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(model, min_sparsity=1.5)
    with pytest.raises(ValueError, match="formats"):
        sparsify(model, formats=("coo",))
    with pytest.raises(ValueError, match="batch_sizes"):
        sparsify(model, batch_sizes=(0,))


def test_tuned_choice_follows_its_measurements():
    # 10% sparse, batch 128. Which side wins depends on the machine (an MKL GEMM that takes a
    # generic path on some CPUs loses to a full-block BSR kernel), so the test checks the
    # decision rule against the times the report records, and what the model became.
    # One thread for torch and sparsekit: on a shared, oversubscribed machine multi-threaded
    # calls wait for scheduling rounds (tens of ms) that swamp the kernels being compared.
    from sparsekit.threads import threads

    sparsify_mod.clear_tune_cache()
    model = nn.Sequential(_pruned_linear(512, 512, 0.1, seed=12))
    before = model[0].weight.detach().clone()
    x = torch.randn(3, 512)
    ref = (x.double() @ before.double().T + model[0].bias.detach().double()).float()
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    margin = 0.05
    try:
        with threads(1):
            rep = sparsify(model, min_sparsity=0.0, batch_sizes=(128,), tune=True, cache=False,
                           margin=margin)
    finally:
        torch.set_num_threads(nt)
    (lr,) = rep.layers
    assert set(lr.dense_times) >= {"F.linear"} and lr.sparse_times and not lr.from_cache
    assert all(t > 0 for t in (*lr.dense_times.values(), *lr.sparse_times.values()))
    # the decision is against what the module runs if it stays dense: F.linear for nn.Linear
    assert lr.dense_formulation == "F.linear" and lr.dense_time == lr.dense_times["F.linear"]
    assert lr.best_dense_time == min(lr.dense_times.values())
    best_sparse_name = min(lr.sparse_times, key=lr.sparse_times.__getitem__)
    if lr.sparse_times[best_sparse_name] < (1 - margin) * lr.dense_times["F.linear"]:
        assert lr.choice != "dense" and lr.speedup is not None and lr.speedup > 1, str(rep)
        assert isinstance(model[0], SparseLinear)
    else:
        assert lr.choice == "dense", str(rep)
        assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_tune_cache_avoids_remeasuring(tmp_path):
    sparsify_mod.clear_tune_cache()
    path = tmp_path / "tune.json"

    def make():
        torch.manual_seed(13)
        m = mlp((32, 48, 48, 48))
        return magnitude_prune(m, 0.85)

    n0 = sparsify_mod.measurement_count()
    m1 = make()
    rep1 = sparsify(m1, cache=path, batch_sizes=(1, 4))
    n1 = sparsify_mod.measurement_count()
    assert n1 - n0 in (1, 2, 3) and path.exists()  # one measurement per distinct layer
    assert not rep1.layers[0].from_cache
    rep2 = sparsify(make(), cache=path, batch_sizes=(1, 4))
    assert sparsify_mod.measurement_count() == n1  # in-process cache
    assert all(lr.from_cache for lr in rep2.layers)
    assert [lr.choice for lr in rep2.layers] == [lr.choice for lr in rep1.layers]
    sparsify_mod.clear_tune_cache()
    rep3 = sparsify(make(), cache=path, batch_sizes=(1, 4))
    assert sparsify_mod.measurement_count() == n1  # persisted file
    assert [lr.choice for lr in rep3.layers] == [lr.choice for lr in rep1.layers]
    # a different batch-size set is a different question: measured again
    sparsify(make(), cache=path, batch_sizes=(2,))
    assert sparsify_mod.measurement_count() > n1
    # SPARSEKIT_TUNE_CACHE is honoured with cache=True; a corrupt file only warns
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    sparsify_mod.clear_tune_cache()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEKIT_TUNE_CACHE", str(bad))
        with pytest.warns(UserWarning, match="ignoring unreadable tune cache"):
            sparsify(make(), batch_sizes=(1,))
    assert json.loads(bad.read_text())["version"] == 1


def test_rotation_copies_arithmetic():
    from sparsekit.timing import rotation_count

    def rc(cold, per_round):
        return rotation_count(per_round, factor=1.0, llc=cold,
                              max_copies=sparsify_mod._MAX_ROTATION_COPIES)

    assert rc(10_000, 1000) == 11  # the working set must strictly exceed the target
    assert rc(10_001, 1000) == 11
    assert rc(999, 1000) == 1
    assert rc(10**12, 1) == sparsify_mod._MAX_ROTATION_COPIES


def _spy_cold_bytes(monkeypatch):
    seen: list[int] = []
    real = sparsify_mod._measure_layer

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("cold_bytes", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(sparsify_mod, "_measure_layer", spy)
    return seen


@pytest.mark.parametrize("llc, cold, expect_cold", [
    (1 << 12, None, True),     # model weights (~36 KiB) exceed a 4 KiB "LLC": cold
    (1 << 30, None, False),    # fits in a 1 GiB LLC: warm, as the model runs
    (1 << 30, True, True),     # forced
    (1 << 12, False, False),   # forced
])
def test_tuning_cache_temperature(monkeypatch, llc, cold, expect_cold):
    import sparsekit.timing as timing

    monkeypatch.setattr(timing, "llc_bytes", lambda *a, **k: llc)
    seen = _spy_cold_bytes(monkeypatch)
    sparsify_mod.clear_tune_cache()
    torch.manual_seed(14)
    model = magnitude_prune(mlp((64, 96, 96, 10)), 0.85)
    ref = copy.deepcopy(model)
    x = torch.randn(5, 64)
    rep = sparsify(model, batch_sizes=(1,), cache=False, cold=cold)
    assert seen and all((b == 2 * llc) if expect_cold else (b == 0) for b in seen), seen
    assert len(rep.layers) == 3
    with torch.no_grad():
        _close(model(x), ref(x).double(), torch.float32)


def test_cold_argument_type_checked():
    with pytest.raises(TypeError, match="cold: expected a bool or None, got str"):
        sparsify(mlp(), cold="yes")
