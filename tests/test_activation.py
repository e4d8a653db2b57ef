"""The fused activation (``activation="relu"``): every CPU kernel variant and ISA build against
the float64 reference of ``relu(x @ W.T + b)``, NaN propagation, the argument errors of every
entry point, ``sparsekit.linear`` / ``SparseLinear`` on every backend and path (fast, general,
autograd), and ``sparsify`` fusing an ``nn.ReLU`` into the layer before it (``densify`` and
``load`` restoring it)."""

from __future__ import annotations

import copy
import functools
import io

import pytest

C = pytest.importorskip("sparsekit._C")
torch = pytest.importorskip("torch")

from reference import (  # noqa: E402
    assert_close_to_reference,
    isas_up_to,
    random_block_pruned,
    random_pruned,
    random_x,
)
from reference import kernel_array as _np  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.nn import FusedActivation, SparseLinear  # noqa: E402

ISAS = isas_up_to(C.build_info()["isa_hardware"])
CODE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
nn = torch.nn


def _variants(family: str, isa: str) -> list[dict]:
    return [v for v in C.cpu_variants()
            if v["family"] in (family, "") and isa in v["isas"] and v["available"]]


def _with_nan(x: torch.Tensor, col: int) -> torch.Tensor:
    x = x.clone()
    x[0, col] = float("nan")
    return x


def _check(y, x, w, bias, msg, plain=None):
    """y against the float64 relu(x @ w.T + b) on the rows of x without NaN; with ``plain``
    (the same call without the activation), y must be exactly relu(plain) everywhere: NaN where
    plain has NaN (which outputs a NaN in x reaches depends on the variant: sparse loops skip
    the zeros, the bitmap ones multiply them), never negative."""
    rows = ~torch.isnan(x).any(dim=1)
    assert_close_to_reference(y[rows], x[rows], w, bias, activation="relu", msg=msg)
    if plain is not None:
        nan = torch.isnan(plain)
        assert torch.equal(torch.isnan(y), nan), f"{msg}: NaN not kept by the activation"
        assert torch.equal(y[~nan], torch.relu(plain[~nan])), f"{msg}: y != relu(plain)"
    assert bool((y[~torch.isnan(y)] >= 0).all()), f"{msg}: negative output after relu"


def _plain_and_relu(shape, dtype, call) -> dict[str, torch.Tensor]:
    """``call(out=..., activation=...)`` with activation "none" and "relu", each into a fresh
    output filled with garbage (the kernel must overwrite every entry)."""
    outs = {}
    for act in ("none", "relu"):
        outs[act] = torch.full(shape, -7.0, dtype=dtype)
        call(out=_np(outs[act]), activation=act)
    return outs


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vdt", [torch.float32, torch.bfloat16])
def test_csr_variants_fuse_relu(isa, vdt):
    seed = 10
    for v in _variants("csr", isa):
        for m, k, sp in [(1, 1, 0.0), (9, 16, 0.0), (33, 17, 0.3), (97, 300, 0.9), (70, 65, 1.0)]:
            w = random_pruned(m, k, sp, seed=seed, dtype=vdt, empty_rows=2 if m > 8 else 0)
            mat = sparsekit.CSRMatrix.from_dense(w)
            bias = random_x((m,), seed=seed + 1)
            for n in [1, 2, 3, 17, 65]:
                if n < v["n_min"] or (v["n_max"] is not None and n > v["n_max"]):
                    continue
                for xdt in {torch.float32, vdt}:
                    x = random_x((n, k), seed=seed + n, dtype=xdt)
                    if k > 3:
                        x = _with_nan(x, k // 2)
                    b = bias if n % 2 else None
                    outs = _plain_and_relu((n, m), xdt, functools.partial(
                        C.csr_linear, indptr=mat.indptr.numpy(), indices=mat.indices.numpy(),
                        values=_np(mat.values), value_dtype=CODE[vdt], x=_np(x),
                        x_dtype=CODE[xdt], bias=None if b is None else b.numpy(),
                        out_dtype=CODE[xdt], n_rows=m, n_cols=k, num_threads=1 + n % 2,
                        isa=isa, variant=v["name"]))
                    _check(outs["relu"], x, mat.to_dense(), b,
                           f"{v['name']} {isa} {vdt} x={xdt} M={m} K={k} N={n}", outs["none"])
            seed += 3


@pytest.mark.parametrize("isa", ISAS)
def test_bsr_variants_fuse_relu(isa):
    seed = 200
    for v in _variants("bsr", isa):
        for (m, k), (r, c) in [((7, 33), (4, 4)), ((33, 97), (8, 8)), ((20, 20), (16, 16))]:
            for vdt in (torch.float32, torch.bfloat16):
                w = random_block_pruned(m, k, (r, c), 0.5, seed=seed, dtype=vdt)
                mat = sparsekit.BSRMatrix.from_dense(w, blocksize=(r, c))
                bias = random_x((m,), seed=seed)
                for n in [1, 2, 17, 65]:
                    if n < v["n_min"]:
                        continue
                    for xdt in {torch.float32, vdt}:
                        x = _with_nan(random_x((n, k), seed=seed + n, dtype=xdt), 5)
                        outs = _plain_and_relu((n, m), xdt, functools.partial(
                            C.bsr_linear, indptr=mat.indptr.numpy(),
                            indices=mat.indices.numpy(), values=_np(mat.values),
                            value_dtype=CODE[vdt], x=_np(x), x_dtype=CODE[xdt],
                            bias=bias.numpy(), out_dtype=CODE[xdt], n_rows=m, n_cols=k,
                            block_r=r, block_c=c, num_threads=2, isa=isa, variant=v["name"]))
                        _check(outs["relu"], x, mat.to_dense(), bias,
                               f"{v['name']} {isa} {r}x{c} {vdt} x={xdt} N={n}", outs["none"])
                seed += 1


@pytest.mark.parametrize("isa", ISAS)
def test_compressed_kernels_fuse_relu(isa):
    w = random_pruned(45, 200, 0.8, seed=5, empty_rows=3)
    for vdt, enc in [(torch.int8, "plain"), (torch.float32, "delta8"), (torch.int8, "delta8")]:
        mat = sparsekit.CSRMatrix.from_dense(w, value_dtype=vdt, index_encoding=enc)
        ref_w = mat.decoded().to_dense()
        bias = random_x((45,), seed=6)
        bm = C.BoundMatrix("csrq", mat.indptr.numpy(), mat.indices.numpy(), mat.values.numpy(),
                           {torch.int8: "i8", torch.float32: "f32"}[vdt], 45, 200, isa=isa,
                           scales=None if mat.scales is None else mat.scales.numpy())
        for v in _variants("csrq", isa):
            if "bitmap" in v["name"] and (vdt != torch.int8 or enc != "plain"):
                continue
            for n in (1, 2, 3):
                x = _with_nan(random_x((n, 200), seed=n), 7)
                outs = []
                for act in (0, 1):
                    out = torch.full((n, 45), -7.0)
                    bm.run(x.data_ptr(), out.data_ptr(), n, 0, bias.data_ptr(), 2, v["id"], -1,
                           act)
                    outs.append(out)
                _check(outs[1], x, ref_w, bias, f"csrq {v['name']} {isa} {vdt} {enc} N={n}",
                       outs[0])


def test_bound_matrix_runner_and_argument_errors():
    w = random_pruned(30, 50, 0.7, seed=1)
    mat = sparsekit.CSRMatrix.from_dense(w)
    bm = C.BoundMatrix("csr", mat.indptr.numpy(), mat.indices.numpy(), mat.values.numpy(),
                       "f32", 30, 50)
    x = random_x((2, 50), seed=2)
    out = torch.empty(2, 30)
    assert bm.run(x.data_ptr(), out.data_ptr(), 2, 0, 0, 1, 0, -1, 1)
    _check(out, x, mat.to_dense(), None, "run")
    bm.set_variant(C.BoundMatrix.n_class(2), "auto", 1, None)
    run = bm.runner()
    out2 = torch.empty(2, 30)
    assert run(x.data_ptr(), out2.data_ptr(), 2, 0, 0, 1, 1)  # 7th argument: relu
    assert torch.equal(out, out2)
    assert run(x.data_ptr(), out2.data_ptr(), 2, 0, 0, 1)  # 6 arguments: no activation
    assert_close_to_reference(out2, x, mat.to_dense(), msg="runner without activation")
    with pytest.raises(ValueError, match=r"activation: expected code 0 \(none\) or 1 \(relu\), "
                                         r"got 2"):
        bm.run(x.data_ptr(), out.data_ptr(), 2, 0, 0, 1, -1, -1, 2)
    with pytest.raises(ValueError, match="activation: expected code .* got -1"):
        run(x.data_ptr(), out.data_ptr(), 2, 0, 0, 1, -1)
    with pytest.raises(ValueError, match="activation: expected code .* got 4294967297"):
        run(x.data_ptr(), out.data_ptr(), 2, 0, 0, 1, 2**32 + 1)  # not truncated to 1
    with pytest.raises(TypeError, match="expected 6 or 7 positional arguments"):
        run(x.data_ptr(), out.data_ptr(), 2, 0, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="activation: expected 'none' or 'relu', got 'gelu'"):
        C.csr_linear(mat.indptr.numpy(), mat.indices.numpy(), mat.values.numpy(), "f32",
                     x.numpy(), "f32", None, out.numpy(), "f32", 30, 50, 1, activation="gelu")


@pytest.mark.parametrize("backend", sparsekit.backends())
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_linear_activation_every_backend(backend, fmt):
    if backend in ("cuda", "numba_cuda"):
        pytest.skip("CPU inputs")
    w = random_pruned(40, 64, 0.6, seed=3)
    mat = (sparsekit.CSRMatrix.from_dense(w) if fmt == "csr"
           else sparsekit.BSRMatrix.from_dense(w, blocksize=(4, 4)))
    bias = random_x((40,), seed=4)
    for n in (1, 2, 5):
        x = _with_nan(random_x((n, 64), seed=n), 3)
        for _ in range(3):  # the third call takes the bound launcher on "auto"
            y = sparsekit.linear(x, mat, bias, backend=backend, activation="relu")
            _check(y, x, mat.to_dense(), bias, f"{backend} {fmt} N={n}")
    y = sparsekit.linear(x.numpy(), mat, bias.numpy(), backend=backend, activation="relu")
    _check(torch.from_numpy(y), x, mat.to_dense(), bias, f"{backend} numpy")
    with pytest.raises(ValueError, match="activation: expected None or one of 'relu', got 'tanh'"):
        sparsekit.linear(x, mat, bias, backend=backend, activation="tanh")


def test_linear_activation_autograd_and_half():
    w = random_pruned(24, 32, 0.5, seed=8)
    mat = sparsekit.CSRMatrix.from_dense(w)
    bias = random_x((24,), seed=9).requires_grad_(True)
    x = random_x((3, 32), seed=10).requires_grad_(True)
    y = sparsekit.linear(x, mat, bias, activation="relu")
    y.square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    torch.relu(torch.nn.functional.linear(x2, mat.to_dense(), b2)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-5, atol=1e-5)
    xb = random_x((2, 32), seed=11, dtype=torch.bfloat16)  # fp32 weight: computed in fp32
    yb = sparsekit.linear(xb, mat, bias.detach(), activation="relu")
    assert yb.dtype == torch.bfloat16
    _check(yb, xb, mat.to_dense(), bias.detach(), "bf16 x")


def test_sparse_linear_activation_paths():
    lin = nn.Linear(48, 36)
    with torch.no_grad():
        lin.weight.mul_((torch.rand_like(lin.weight) > 0.7).float())
    sl = SparseLinear.from_dense(lin, activation="relu")
    assert sl.activation == "relu" and "activation=relu" in repr(sl)
    dense = nn.Sequential(copy.deepcopy(lin), nn.ReLU())
    x = random_x((4, 48), seed=12)
    with torch.inference_mode():
        for _ in range(4):  # general path, then the fast path
            torch.testing.assert_close(sl(x), dense(x), rtol=1e-5, atol=1e-5)
        sl.activation = None  # takes effect on the fast path at once
        torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
        sl.activation = "relu"
        torch.testing.assert_close(sl(x), dense(x), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    sl(xg).sum().backward()
    xd = x.clone().requires_grad_(True)
    dense(xd).sum().backward()
    torch.testing.assert_close(xg.grad, xd.grad, rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.save(sl, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(sl), torch.load(buf, weights_only=False)):
        assert clone.activation == "relu"
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), dense(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation: expected None or one of 'relu', got 'gelu'"):
        SparseLinear.from_dense(lin, activation="gelu")
    with pytest.raises(ValueError, match="activation: expected None or one of 'relu', got 1"):
        sl.activation = 1


def _pruned_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(inplace=True),
                      nn.Sequential(nn.Linear(32, 16), nn.ReLU()), nn.Linear(16, 10), nn.Tanh())
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.mul_((torch.rand_like(mod.weight) > 0.8).float())
    return m.eval()


def test_sparsify_fuses_relu_and_densify_restores_it():
    dense = _pruned_mlp()
    model = copy.deepcopy(dense)
    rep = sparsekit.sparsify(model, tune=False)
    assert rep.fused == [("0", "1"), ("2", "3"), ("4.0", "4.1")]
    assert "fused activations: 1 into 0, 3 into 2, 4.1 into 4.0" in str(rep)
    assert rep.to_dict()["fused"] == [["0", "1"], ["2", "3"], ["4.0", "4.1"]]
    assert isinstance(model[1], FusedActivation) and type(model[1].original) is nn.ReLU
    assert model[0].activation == "relu" and model[5].activation is None
    assert type(model[6]) is nn.Tanh  # only ReLU is fused
    for n in (1, 2, 7, 40):
        x = random_x((n, 64), seed=n)
        with torch.inference_mode():
            for _ in range(3):
                torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    back = sparsekit.densify(model)
    assert back is model and type(model[1]) is nn.ReLU and model[3].inplace
    assert type(model[4][1]) is nn.ReLU and isinstance(model[0], nn.Linear)
    x = random_x((3, 64), seed=99)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def test_sparsify_fusion_off_and_sequential_subclasses():
    dense = _pruned_mlp(1)
    model = copy.deepcopy(dense)
    rep = sparsekit.sparsify(model, tune=False, fuse_activations=False)
    assert rep.fused == [] and type(model[1]) is nn.ReLU and model[0].activation is None

    class MySeq(nn.Sequential):
        pass

    sub = MySeq(*[copy.deepcopy(m) for m in dense])
    # the subclass's own children stay as they are; the plain nn.Sequential inside it fuses
    assert sparsekit.sparsify(sub, tune=False).fused == [("4.0", "4.1")]
    assert type(sub[1]) is nn.ReLU and isinstance(sub[4][1], FusedActivation)
    with pytest.raises(TypeError, match="fuse_activations: expected a bool, got str"):
        sparsekit.sparsify(copy.deepcopy(dense), fuse_activations="yes")
    # a layer instance used twice (here without a ReLU after its second use) is not fused
    shared = SparseLinear.from_dense(nn.Linear(16, 16))
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    assert sparsekit.sparsify(twice, tune=False).fused == [] and shared.activation is None
    # a layer given an activation by hand comes back as linear + ReLU
    lone = nn.Sequential(SparseLinear.from_dense(dense[0], activation="relu"))
    sparsekit.densify(lone)
    assert isinstance(lone[0], nn.Sequential) and type(lone[0][1]) is nn.ReLU
    x = random_x((2, 64), seed=5)
    torch.testing.assert_close(lone(x), torch.relu(dense[0](x)), rtol=1e-5, atol=1e-5)


def test_sparsify_tunes_a_fusable_layer_with_its_relu(monkeypatch):
    """With tuning, a layer followed by a ReLU it would be fused with is timed with that ReLU
    (dense: the ReLU's call after the layer; sparse: fused), every other layer without; the
    decisions are cached apart, and the tuned model computes what the dense one does."""
    import importlib

    sparsify_mod = importlib.import_module("sparsekit.nn.sparsify")  # the module, not the function
    seen: dict[int, object] = {}
    real = sparsify_mod._measure_layer

    def spy(lin, *args, **kwargs):
        relu = args[5] if len(args) > 5 else kwargs.get("relu")
        seen[id(lin)] = relu
        dense_t, sparse_t = real(lin, *args, **kwargs)
        if relu is not None:  # the sparse candidates ran with the ReLU in their epilogue
            assert sparse_t and all(t > 0 for t in sparse_t.values())
        return dense_t, sparse_t

    monkeypatch.setattr(sparsify_mod, "_measure_layer", spy)
    dense = _pruned_mlp(3)
    model = copy.deepcopy(dense)
    ids = {n: id(model.get_submodule(n)) for n in ("0", "2", "4.0", "5")}
    sparsify_mod.clear_tune_cache()
    rep = sparsekit.sparsify(model, batch_sizes=(1, 4))
    acts = {n: seen[i] for n, i in ids.items()}
    assert type(acts["0"]) is nn.ReLU and not acts["0"].inplace
    assert type(acts["2"]) is nn.ReLU and acts["2"].inplace
    assert type(acts["4.0"]) is nn.ReLU and acts["5"] is None
    reasons = {r.name: r.reason for r in rep.layers}
    assert "next ReLU" in reasons["0"] and "next ReLU" not in reasons["5"]
    x = random_x((3, 64), seed=4)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    assert len(seen) == 4
    # without fusion nothing is timed with a ReLU: the three layers measured with one are
    # measured again (their cache entries are apart), the last one comes from the cache
    seen.clear()
    plain = copy.deepcopy(dense)
    rep = sparsekit.sparsify(plain, batch_sizes=(1, 4), fuse_activations=False)
    assert len(seen) == 3 and all(v is None for v in seen.values())
    assert [r.from_cache for r in rep.layers] == [False, False, False, True]
    sparsify_mod.clear_tune_cache()


def test_save_load_keeps_the_models_fusion(tmp_path):
    dense = _pruned_mlp(2)
    fused = copy.deepcopy(dense)
    sparsekit.sparsify(fused, tune=False)
    path = tmp_path / "m.safetensors"
    sparsekit.save(fused, path)
    x = random_x((3, 64), seed=3)
    # into a fused model: the installed layers keep the model's activations
    target = copy.deepcopy(fused)
    sparsekit.load(path, target)
    assert target[0].activation == "relu" and isinstance(target[1], FusedActivation)
    torch.testing.assert_close(target(x), dense(x), rtol=1e-5, atol=1e-5)
    # into the dense model: its own ReLU modules stay, the layers get none
    plain = copy.deepcopy(dense)
    sparsekit.load(path, plain)
    assert plain[0].activation is None and type(plain[1]) is nn.ReLU
    torch.testing.assert_close(plain(x), dense(x), rtol=1e-5, atol=1e-5)
    # a dense file into the fused model: the fused ReLU comes back with the dense layer
    dpath = tmp_path / "d.safetensors"
    sparsekit.save(dense, dpath)
    back = copy.deepcopy(fused)
    sparsekit.load(dpath, back)
    assert isinstance(back[0], nn.Linear) and type(back[1]) is nn.ReLU
    torch.testing.assert_close(back(x), dense(x), rtol=1e-5, atol=1e-5)
