"""sparsekit.save / sparsekit.load: exact round trips, safetensors compatibility, tampering."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import safetensors.torch
import torch
from _nn_models import Block, magnitude_prune, mlp

from sparsekit.io import LoadedFile, SparsekitFileError, load, save
from sparsekit.nn import SparseLinear, densify, sparsify


def _sparse_block(dtype=torch.float32):
    torch.manual_seed(30)
    dense = magnitude_prune(Block(d=64), 0.8).to(dtype).eval()
    model = copy.deepcopy(dense)
    sparsify(model, tune=False)
    model.q = SparseLinear.from_dense(dense.q, format="bsr", blocksize=(4, 4))
    return dense, model


def _parse(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8 : 8 + n])


def _write(path, raw, n, header):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_exact(tmp_path, dtype):
    dense, model = _sparse_block(dtype)
    p = tmp_path / "m.safetensors"
    save(model, p, metadata={"note": "test"})
    # into the dense architecture
    fresh = Block(d=64).to(dtype)
    out = load(p, fresh)
    assert out is fresh
    for name in ("q", "k", "v", "o", "fc1", "fc2"):
        a, b = getattr(fresh, name), getattr(model, name)
        assert isinstance(a, SparseLinear) and a.format == b.format and a.blocksize == b.blocksize
    sd_a, sd_b = fresh.state_dict(), model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype and torch.equal(sd_a[k], sd_b[k]), k
    x = torch.randn(2, 3, 64, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # into an already-sparsified model with different formats, and a densified one
    other = copy.deepcopy(model)
    other.q = SparseLinear.from_dense(dense.q, format="csr")
    load(p, other)
    assert other.q.format == "bsr"
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    # without a model: the validated modules + the remaining tensors
    lf = load(p)
    assert isinstance(lf, LoadedFile) and set(lf.modules) == {"q", "k", "v", "o", "fc1", "fc2"}
    assert set(lf.state_dict) == {"ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"}
    assert lf.metadata["note"] == "test"
    assert torch.equal(lf.modules["fc1"].weight, model.fc1.weight)


def test_readable_by_safetensors_package(tmp_path):
    _, model = _sparse_block()
    p = tmp_path / "m.safetensors"
    save(model, p)
    loaded = safetensors.torch.load_file(str(p))
    sd = model.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert loaded["fc1.weight_indices"].dtype == torch.uint16
    # and files written by the safetensors package load into a (dense) model
    dense = mlp((8, 4))
    q = tmp_path / "dense.safetensors"
    safetensors.torch.save_file(dense.state_dict(), str(q))
    other = mlp((8, 4))
    load(q, other)
    assert torch.equal(other[0].weight, dense[0].weight)


def test_densified_target_and_mismatch_errors(tmp_path):
    dense, model = _sparse_block()
    p = tmp_path / "d.safetensors"
    save(densify(copy.deepcopy(model)), p)  # a dense file
    target = copy.deepcopy(model)  # sparse model <- dense file
    load(p, target)
    assert type(target.q) is torch.nn.Linear
    assert torch.equal(target.q.weight, dense.q.weight)
    save(model, p)
    with pytest.raises(SparsekitFileError, match=r"module 'fc1': shape"):
        load(p, Block(d=64, hidden=128))
    with pytest.raises(SparsekitFileError, match="module 'q': not found in model"):
        load(p, mlp((64, 64)))


def test_file_size_is_compressed(tmp_path):
    torch.manual_seed(31)
    model = magnitude_prune(mlp((512, 512, 512)), 0.9)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    sparsify(model, tune=False)
    p = tmp_path / "s.safetensors"
    save(model, p)
    comp = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = p.stat().st_size
    assert comp <= size <= comp + 4096  # data + JSON header only
    assert size < 0.2 * dense_bytes  # 10% density, 6 bytes per nonzero vs 4 per weight


# ------------------------------------------------------------------------------ tampering


@pytest.fixture
def saved(tmp_path):
    _, model = _sparse_block()
    p = tmp_path / "t.safetensors"
    save(model, p)
    return p


def _offsets(header, name):
    return header[name]["data_offsets"]


def test_truncated_files(saved):
    raw = saved.read_bytes()
    for cut in (0, 5, 8, 100, len(raw) - 1, len(raw) - 4096):
        saved.write_bytes(raw[:cut])
        with pytest.raises(SparsekitFileError):
            load(saved, Block(d=64))
    saved.write_bytes(raw[:-3])
    with pytest.raises(SparsekitFileError, match="data section|exceeds|data_offsets"):
        load(saved)


def test_header_tampering(saved):
    raw, n, header = _parse(saved)
    # header length larger than the file
    saved.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(SparsekitFileError, match="header length"):
        load(saved)
    # bytes flipped inside the JSON
    bad = bytearray(raw)
    bad[8 + 1] ^= 0xFF
    saved.write_bytes(bytes(bad))
    with pytest.raises(SparsekitFileError, match="header: not valid UTF-8 JSON"):
        load(saved)
    cases = []
    h = copy.deepcopy(header)
    h["fc1.weight_values"]["dtype"] = "F64"
    cases.append((h, r"tensor 'fc1.weight_values': data_offsets: span .* does not match"))
    h = copy.deepcopy(header)
    h["fc1.weight_values"]["dtype"] = "C64"
    cases.append((h, r"'fc1.weight_values': dtype: expected one of"))
    h = copy.deepcopy(header)
    h["k.weight_indices"]["dtype"] = "I16"
    cases.append((h, r"tensor 'k.weight_indices': dtype: expected uint16 \(per metadata\)"))
    h = copy.deepcopy(header)
    b, e = _offsets(h, "fc2.weight_values")
    h["fc2.weight_values"]["data_offsets"] = [b + 4, e + 4]
    cases.append((h, r"'fc2.weight_values': data_offsets .*(overlap|gap)|data_offsets: expected"))
    h = copy.deepcopy(header)
    b, e = _offsets(h, "fc2.weight_values")
    h["fc2.weight_values"]["data_offsets"] = [b, e + 10**12]
    cases.append((h, r"'fc2.weight_values': data_offsets: expected 0 <= begin <= end"))
    h = copy.deepcopy(header)
    h["fc2.weight_values"]["shape"] = [-1]
    cases.append((h, r"'fc2.weight_values': shape: expected a list of non-negative ints"))
    h = copy.deepcopy(header)
    h["__metadata__"]["sparsekit.file_version"] = "99"
    cases.append((h, r"sparsekit.file_version: expected 1, got '99'"))
    h = copy.deepcopy(header)
    mods = json.loads(h["__metadata__"]["sparsekit.modules"])
    mods[0]["shape"] = [mods[0]["shape"][0] + 1, mods[0]["shape"][1]]
    h["__metadata__"]["sparsekit.modules"] = json.dumps(mods)
    cases.append((h, r"weight_meta: expected \[.*\] \(per metadata\)"))
    h = copy.deepcopy(header)
    h["__metadata__"]["sparsekit.modules"] = "[{]"
    cases.append((h, r"sparsekit.modules: invalid JSON"))
    h = copy.deepcopy(header)
    del h["o.weight_indptr"]
    cases.append((h, r"leave a gap|module 'o': tensor 'o.weight_indptr' missing"))
    for h, pat in cases:
        _write(saved, raw, n, h)
        with pytest.raises(SparsekitFileError, match=pat):
            load(saved, Block(d=64))
    # duplicate keys in the JSON
    hjson = raw[8 : 8 + n].decode().rstrip()
    dup = hjson[:-1] + ',"ln1.bias":' + json.dumps(header["ln1.bias"]) + "}"
    d = dup.encode() + b" " * (-len(dup) % 8)
    saved.write_bytes(struct.pack("<Q", len(d)) + d + raw[8 + n :])
    with pytest.raises(SparsekitFileError, match="duplicate key 'ln1.bias'"):
        load(saved)


def test_data_tampering_caught_by_format_validation(saved):
    raw, n, header = _parse(saved)
    base = 8 + n

    def patch(name, idx, value, fmt):
        b, _ = _offsets(header, name)
        bad = bytearray(raw)
        struct.pack_into(fmt, bad, base + b + idx * struct.calcsize(fmt), value)
        saved.write_bytes(bytes(bad))

    patch("fc1.weight_indices", 3, 65000, "<H")  # column >= in_features
    with pytest.raises(SparsekitFileError, match=r"module 'fc1'.*indices: expected values in"):
        load(saved, Block(d=64))
    patch("fc2.weight_indptr", 5, 0, "<i")  # non-monotone row pointers
    with pytest.raises(SparsekitFileError, match=r"module 'fc2'.*indptr"):
        load(saved, Block(d=64))
    patch("q.weight_indices", 0, 60000, "<H")  # BSR block column out of range
    with pytest.raises(SparsekitFileError, match=r"module 'q'.*indices"):
        load(saved)
    patch("k.weight_meta", 1, 65, "<q")  # in_features changed behind the metadata's back
    with pytest.raises(SparsekitFileError, match=r"k.weight_meta: expected"):
        load(saved)
    saved.write_bytes(raw)
    assert isinstance(load(saved, Block(d=64)), Block)  # the untouched file still loads


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        save({"a": torch.zeros(1)}, tmp_path / "x")
    with pytest.raises(SparsekitFileError, match="cannot open"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="metadata: key 'sparsekit.x' is reserved"):
        save(mlp((2, 2)), tmp_path / "y", metadata={"sparsekit.x": "1"})
