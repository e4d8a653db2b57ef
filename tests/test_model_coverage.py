"""prune -> sparsify -> save/load -> inference over every covered layer type and model family,
compared with the masked dense model (and a float64 reference for the single modules)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit.nn import SparseConv2d, SparseLinear, SparseMultiheadAttention, densify, sparsify
from sparsekit.prune import prune


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    a, b = a.double(), b.double()
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"max abs error {err} (scale {scale})"


def _random_prune(mod: nn.Module, sparsity: float, gen: torch.Generator) -> None:
    for p in (getattr(mod, "weight", None), getattr(mod, "in_proj_weight", None)):
        if isinstance(p, nn.Parameter):
            with torch.no_grad():
                p.mul_(torch.rand(p.shape, generator=gen) >= sparsity)


# ------------------------------------------------------------------------ single modules
@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,hw", [
    (1, 1, 1, 1, 0, 1, (1, 1)),
    (7, 33, 1, 1, 0, 1, (5, 9)),
    (3, 7, 3, 2, 1, 1, (11, 13)),
    (6, 9, (3, 5), (2, 1), (2, 0), (1, 2), (12, 17)),
    (5, 8, 1, 2, 0, 1, (7, 7)),
    (4, 8, 3, 1, "same", 2, (9, 10)),
    (4, 8, (2, 4), 1, "same", 1, (6, 8)),
    (4, 97, 3, 1, "valid", 1, (3, 5)),
])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fmt", [("csr", None), ("bsr", (4, 4))])
def test_sparse_conv2d_matches_dense(cin, cout, k, stride, padding, dilation, hw, channels_last,
                                     fmt):
    gen = torch.Generator().manual_seed(hash((cin, cout, str(k))) % 1000)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation)
    _random_prune(conv, 0.7, gen)
    sc = SparseConv2d.from_module(conv, *fmt)
    x = torch.randn(2, cin, *hw, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride,
                       conv.padding, conv.dilation)
        y = sc(x)
        _close(y, ref)
        _close(sc(x[1]), ref[1])  # unbatched
    back = sc.to_conv()
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)


def test_sparse_conv2d_nnz0_and_errors():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    sc = SparseConv2d.from_module(conv)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        _close(sc(x), conv(x))
    with pytest.raises(ValueError, match="input: expected 3 channels"):
        sc(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="groups=1, got groups=3"):
        SparseConv2d.from_module(nn.Conv2d(3, 6, 3, groups=3))
    with pytest.raises(ValueError, match="smaller than the"):
        SparseConv2d.from_module(nn.Conv2d(3, 6, 5))(torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias,add_bias_kv,add_zero_attn", [(True, False, False),
                                                            (False, True, True)])
def test_sparse_mha_matches_dense(batch_first, bias, add_bias_kv, add_zero_attn):
    gen = torch.Generator().manual_seed(3)
    mha = nn.MultiheadAttention(24, 3, bias=bias, add_bias_kv=add_bias_kv,
                                add_zero_attn=add_zero_attn, batch_first=batch_first).eval()
    _random_prune(mha, 0.6, gen)
    _random_prune(mha.out_proj, 0.6, gen)
    sm = SparseMultiheadAttention.from_module(mha, ("csr", None), ("bsr", (4, 4)))
    x = torch.randn(2, 7, 24, generator=gen)
    mem = torch.randn(2, 5, 24, generator=gen)
    if not batch_first:
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    src = 7 + add_bias_kv + add_zero_attn
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, :3] = True
    fmask = torch.randn(2 * 3, 7, 7, generator=gen)
    cases = [dict(), dict(need_weights=False), dict(attn_mask=causal),
             dict(attn_mask=causal, is_causal=True, need_weights=False),
             dict(key_padding_mask=kpm), dict(key_padding_mask=kpm, need_weights=False),
             dict(attn_mask=fmask, average_attn_weights=False)]
    with torch.no_grad():
        for kw in cases:
            a, aw = mha(x, x, x, **kw)
            b, bw = sm(x, x, x, **kw)
            _close(b, a)
            assert (aw is None) == (bw is None), kw
            if aw is not None:
                _close(bw, aw)
                assert bw.shape[-1] == src
        a, aw = mha(x, mem, mem)
        b, bw = sm(x, mem, mem)
        _close(b, a)
        _close(bw, aw)
        xu = x[0] if batch_first else x[:, 0]
        _close(sm(xu, xu, xu)[0], mha(xu, xu, xu)[0])
    back = sm.to_module()
    assert torch.equal(back.in_proj_weight, mha.in_proj_weight)
    assert torch.equal(back.out_proj.weight, mha.out_proj.weight)


def test_hf_conv1d_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    model = nn.Sequential(Conv1D(33, 97), nn.GELU(), Conv1D(7, 33))
    calib = [torch.randn(3, 5, 97)]
    rep = prune(model, granularity="2:4", criterion="wanda", calibration=calib)
    assert [la.module_type for la in rep.layers] == ["Conv1D", "Conv1D"]
    w = model[0].weight.detach()  # (in=97, out=33): groups of 4 run along the input dim
    groups = (w.t()[:, :96] != 0).reshape(33, 24, 4).sum(-1)
    assert int(groups.max()) <= 2 and abs(rep.sparsity - 0.5) < 0.02
    prune(model, 0.75, criterion="wanda", calibration=calib)  # sparse enough for the heuristic
    ref = copy.deepcopy(model)
    out = sparsify(model, tune=False, min_sparsity=0.3)
    assert [lr.status for lr in out.layers] == ["converted", "converted"]
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2))
    x = torch.randn(4, 97)
    with torch.no_grad():
        _close(model(x), ref(x))


def test_tuned_layers_are_judged_against_their_own_dense_formulation():
    """A kept-dense layer runs what it ran before, so each layer's decision is made against
    that formulation: F.linear for nn.Linear, the addmm on the stored (in, out) weight for a
    transformers Conv1D; the report names it and its speedup is against it."""
    from transformers.pytorch_utils import Conv1D

    pick = importlib.import_module("sparsekit.nn.sparsify")._pick  # the module, not the function
    cands = [("csr", None)]
    dense_t = {"F.linear": 10.0, "matmul(W.T)": 6.0}
    assert pick(cands, dense_t, {"csr": 8.0}, 0.05, "F.linear")[0] == "csr"
    assert pick(cands, dense_t, {"csr": 8.0}, 0.05, "matmul(W.T)")[0] == "dense"
    assert pick(cands, dense_t, {"csr": 8.0}, 0.05)[0] == "dense"  # unnamed: the fastest
    assert pick(cands, dense_t, {"csr": 9.6}, 0.05, "F.linear")[0] == "dense"  # within margin

    torch.manual_seed(6)
    model = nn.Sequential(Conv1D(64, 96), nn.GELU(), nn.Linear(64, 32))
    with torch.no_grad():
        for m in model:
            if hasattr(m, "weight"):
                m.weight.mul_((torch.rand_like(m.weight) > 0.9).float())
    ref = copy.deepcopy(model)
    rep = sparsify(model, batch_sizes=(1,), cache=False)
    conv, lin = rep.layers
    assert conv.dense_formulation == "matmul(W.T)" and lin.dense_formulation == "F.linear"
    for lr in (conv, lin):
        assert set(lr.dense_times) == {"F.linear", "matmul(W.T)"}
        assert lr.dense_time == lr.dense_times[lr.dense_formulation]
        assert lr.to_dict()["dense_time"] == lr.dense_time
        if lr.choice == "dense":
            assert lr.speedup == 1.0
        else:
            assert lr.speedup == lr.dense_time / lr.chosen_time > 1.0
    x = torch.randn(4, 96)
    with torch.no_grad():
        _close(model(x), ref(x))


# ------------------------------------------------------------------------ selection
def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


@pytest.mark.parametrize("kw", [
    dict(exclude="4"),
    dict(exclude=lambda name, m: m.out_features == 4),
    dict(include=["0", "2"]),
    dict(include=nn.Linear, filter_fn=lambda name, m: name != "4"),
])
def test_include_exclude_same_in_prune_and_sparsify(kw):
    torch.manual_seed(5)
    model = _mlp()
    rep = prune(model, 0.8, **kw)
    assert [la.name for la in rep.layers] == ["0", "2"]
    with torch.no_grad():  # make the last layer sparse too: only selection keeps it dense
        model[4].weight.mul_(torch.rand_like(model[4].weight) > 0.8)
    out = sparsify(model, tune=False, **kw)
    assert out.replaced == ["0", "2"]
    assert out.layers[-1].reason in ("excluded", "filtered out", "not matched by include")


def test_selection_errors():
    with pytest.raises(ValueError, match="exclude: filter 'nope' matches no module"):
        prune(_mlp(), 0.5, exclude="nope")
    with pytest.raises(ValueError, match="exclude: filter 'nope' matches no module"):
        sparsify(_mlp(), exclude="nope")
    with pytest.raises(TypeError, match="include: expected module name glob patterns"):
        sparsify(_mlp(), include=[3])
    with pytest.raises(TypeError, match="must return a bool"):
        sparsify(_mlp(), exclude=lambda n, m: "yes")


# ------------------------------------------------------------------------ model families
def _run_roundtrip(tmp_path, make, inputs, forward, prune_kw, expect, sparsity=0.75):
    torch.manual_seed(0)
    model = make().eval()
    prune(model, sparsity, **prune_kw)
    masked = copy.deepcopy(model)
    rep = sparsify(model, tune=False, min_sparsity=0.3)
    got = {t: c for t, c in rep.summary().items()}
    for mtype, counts in expect.items():
        assert got.get(mtype) == counts, str(rep)
    for lr in rep.by_status("unsupported"):
        assert lr.reason
    with torch.no_grad():
        ref = forward(masked, inputs)
        _close(forward(model, inputs), ref)
        path = tmp_path / "m.safetensors"
        sparsekit.save(model, path)
        torch.manual_seed(1)
        fresh = make().eval()
        sparsekit.load(path, fresh)
        _close(forward(fresh, inputs), ref)
        assert {type(m) for m in fresh.modules()} >= {type(m) for m in model.modules()
                                                      if "Sparse" in type(m).__name__}
        densify(fresh)
        _close(forward(fresh, inputs), ref)
    return rep


def _logits(m, ids):
    return m(ids).logits


def test_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 97, (2, 9))
    rep = _run_roundtrip(tmp_path, lambda: GPT2LMHeadModel(cfg), ids, _logits,
                         dict(exclude="lm_head"),
                         {"Conv1D": {"converted": 8}, "Linear": {"dense": 1},
                          "LayerNorm": {"unsupported": 5}, "Embedding": {"unsupported": 2}})
    assert rep["lm_head"].reason == "sparsity 0.000 < min_sparsity 0.3"


def test_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    ids = torch.randint(0, 101, (2, 7))
    calib = [torch.randint(0, 101, (2, 16))]
    _run_roundtrip(tmp_path, lambda: LlamaForCausalLM(cfg), ids, _logits,
                   dict(criterion="wanda", calibration=calib),
                   {"Linear": {"converted": 15}, "LlamaRMSNorm": {"unsupported": 5},
                    "Embedding": {"unsupported": 1}})


def test_bert_minilm_config(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=97, vocab_size=113, max_position_embeddings=32)
    ids = torch.randint(0, 113, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0

    def fwd(m, ids):
        return m(input_ids=ids, attention_mask=mask).last_hidden_state

    _run_roundtrip(tmp_path, lambda: BertModel(cfg), ids, fwd, dict(),
                   {"Linear": {"converted": 13}, "LayerNorm": {"unsupported": 5},
                    "Embedding": {"unsupported": 3}})


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.head = nn.Conv2d(24, 32, (3, 1), padding=(1, 0), dilation=(1, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.pw(F.relu(self.dw(x))))
        x = F.relu(self.head(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_small_cnn(tmp_path, channels_last):
    x = torch.randn(2, 3, 15, 17)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rep = _run_roundtrip(tmp_path, _SmallCNN, x, lambda m, x: m(x),
                         dict(filter_fn=lambda n, m: getattr(m, "groups", 1) == 1),
                         {"Conv2d": {"converted": 3, "unsupported": 1},
                          "Linear": {"converted": 1}, "BatchNorm2d": {"unsupported": 1}})
    assert "depthwise" in rep["dw"].reason


def test_transformer_encoder_mha(tmp_path):
    def make():
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    x = torch.randn(3, 6, 32)
    rep = _run_roundtrip(tmp_path, make, x, lambda m, x: m(x), dict(),
                         {"MultiheadAttention": {"converted": 2},
                          "NonDynamicallyQuantizableLinear": {"converted": 2},
                          "Linear": {"converted": 4}, "LayerNorm": {"unsupported": 4}})
    assert rep["layers.0.self_attn"].shape == (96, 32)


def test_efficientnet_style_static_same_padding(tmp_path):
    """Conv2d subclasses that pad with a fixed ``static_padding`` (TensorFlow "SAME" ports such
    as EfficientNet-Lite) convert with that padding; depthwise ones stay dense."""

    class Identity(nn.Module):
        def forward(self, x):
            return x

    class StaticSame(nn.Conv2d):
        def __init__(self, *a, pad=None, **k):
            super().__init__(*a, **k)
            self.static_padding = nn.ZeroPad2d(pad) if pad else Identity()

        def forward(self, x):
            return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride,
                            self.padding, self.dilation, self.groups)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = StaticSame(3, 8, 3, stride=2, bias=False, pad=(0, 1, 0, 1))
            self.dw = StaticSame(8, 8, 3, groups=8, pad=(1, 1, 1, 1))
            self.pw = StaticSame(8, 16, 1)

        def forward(self, x):
            return self.pw(F.relu(self.dw(F.relu(self.stem(x)))))

    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    rep = _run_roundtrip(tmp_path, Net, x, lambda m, x: m(x),
                         dict(filter_fn=lambda n, m: m.groups == 1),
                         {"StaticSame": {"converted": 2, "unsupported": 1}})
    assert "depthwise" in rep["dw"].reason
