"""Tests of sparsekit.datasets.load_mnist: npz, IDX (plain and gzipped), fallback, validation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from sparsekit.datasets import ENV_VAR, load_mnist


def _fake(n_train=7, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 10, n_test).astype(np.uint8)}


def _write_idx(path, arr, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(
        struct.pack(">I", d) for d in arr.shape)
    data = header + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def _check_same(d, ref):
    assert d.x_train.dtype == np.float32 and d.x_train.shape == (7, 784)
    np.testing.assert_array_equal(d.x_train, ref["x_train"].reshape(7, 784) / np.float32(255))
    np.testing.assert_array_equal(d.x_test, ref["x_test"].reshape(5, 784) / np.float32(255))
    np.testing.assert_array_equal(d.y_train, ref["y_train"].astype(np.int64))
    np.testing.assert_array_equal(d.y_test, ref["y_test"].astype(np.int64))
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1


def test_npz(tmp_path):
    ref = _fake()
    np.savez(tmp_path / "m.npz", **ref)
    d = load_mnist(tmp_path / "m.npz")
    _check_same(d, ref)
    assert "m.npz" in d.source and d.n_features == 784


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory(tmp_path, gz):
    ref = _fake()
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    for k, n in names.items():
        _write_idx(tmp_path / (n + (".gz" if gz else "")), ref[k], gz)
    d = load_mnist(str(tmp_path))
    _check_same(d, ref)
    assert "IDX" in d.source


def test_env_var_and_fallback(tmp_path, monkeypatch):
    ref = _fake()
    np.savez(tmp_path / "e.npz", **ref)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "e.npz"))
    _check_same(load_mnist(), ref)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.npz"))
    with pytest.raises(FileNotFoundError, match=f"{ENV_VAR}=.*missing.npz"):
        load_mnist()
    monkeypatch.delenv(ENV_VAR)
    a, b = load_mnist(), load_mnist()
    assert "digits" in a.source
    assert a.x_train.shape[1] == 64 and a.x_train.shape[0] + a.x_test.shape[0] == 1797
    np.testing.assert_array_equal(a.y_test, b.y_test)  # deterministic split
    assert a.x_train.dtype == np.float32 and a.x_train.max() <= 1 and a.x_train.min() >= 0
    assert set(np.unique(a.y_train)) == set(range(10))


@pytest.mark.parametrize("change, pattern", [
    (lambda r: r.pop("y_test"), r"npz lacks arrays \['y_test'\]"),
    (lambda r: r.update(x_train=r["x_train"][:, :27]),
     r"x_train: expected shape .* got \(7, 27, 28\)"),
    (lambda r: r.update(y_train=r["y_train"][:6]), r"y_train: expected shape \(7,\)"),
    (lambda r: r.update(y_test=r["y_test"] + 10), r"y_test: labels must be in \[0, 9\]"),
    (lambda r: r.update(y_test=r["y_test"].astype(np.float32)), r"y_test: expected integer"),
    (lambda r: r.update(x_test=r["x_test"].astype(np.float32)), r"x_test: float pixels must be"),
    (lambda r: r.update(x_test=r["x_test"].astype(np.int16)), r"x_test: expected uint8"),
])
def test_npz_validation(tmp_path, change, pattern):
    ref = _fake()
    change(ref)
    np.savez(tmp_path / "bad.npz", **ref)
    with pytest.raises(ValueError, match=pattern):
        load_mnist(tmp_path / "bad.npz")


def test_bad_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read as an .npz archive"):
        load_mnist(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="no train-images IDX|no x_train IDX"):
        load_mnist(tmp_path)
    ref = _fake()
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    for k, n in names.items():
        _write_idx(tmp_path / n, ref[k], False)
    with open(tmp_path / names["y_test"], "ab") as f:
        f.write(b"\x00")  # one byte more than the header announces
    with pytest.raises(ValueError, match="IDX header announces dims"):
        load_mnist(tmp_path)
