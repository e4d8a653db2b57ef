"""MNIST download path of sparsekit.datasets, against a local HTTP server (no outside hosts)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading

import numpy as np
import pytest

from sparsekit import datasets
from sparsekit.datasets import download_mnist, load_mnist

_NAMES = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
          "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}


def _idx_gz(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(
        struct.pack(">I", d) for d in arr.shape)
    return gzip.compress(header + arr.tobytes())


@pytest.fixture
def served(tmp_path):
    """Fake MNIST archives served on 127.0.0.1: (base_url, arrays, checksums, request log)."""
    rng = np.random.default_rng(7)
    arrays = {"x_train": rng.integers(0, 256, (9, 28, 28), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 9).astype(np.uint8),
              "x_test": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
              "y_test": rng.integers(0, 10, 4).astype(np.uint8)}
    root = tmp_path / "www"
    (root / "mnist").mkdir(parents=True)
    checksums = {}
    for key, name in _NAMES.items():
        blob = _idx_gz(arrays[key])
        (root / "mnist" / name).write_bytes(blob)
        checksums[name] = hashlib.sha256(blob).hexdigest()
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            log.append(self.path)

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/mnist", arrays, checksums, log
    finally:
        srv.shutdown()
        srv.server_close()


def test_download_verifies_and_caches(served, tmp_path):
    url, arrays, checksums, log = served
    dest = download_mnist(tmp_path / "cache", base_url=url, checksums=checksums)
    assert sorted(p.name for p in dest.iterdir()) == sorted(_NAMES.values())
    d = load_mnist(dest)
    np.testing.assert_allclose(d.x_train, arrays["x_train"].reshape(9, 784) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, arrays["y_test"])
    n = len(log)
    assert n == 4
    download_mnist(tmp_path / "cache", base_url=url, checksums=checksums)
    assert len(log) == n  # second call: verified from the cache, nothing fetched


def test_bad_checksum_is_rejected(served, tmp_path):
    url, _arrays, checksums, _log = served
    bad = dict(checksums)
    bad["t10k-labels-idx1-ubyte.gz"] = "0" * 64
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: expected SHA-256 0{64}, "
                                         r"got [0-9a-f]{64}; the file was discarded"):
        download_mnist(tmp_path / "c", base_url=url, checksums=bad)
    assert not (tmp_path / "c" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]


def test_load_mnist_download_uses_cache_dir_and_url_env(served, tmp_path, monkeypatch):
    url, arrays, checksums, _log = served
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(datasets.URL_ENV_VAR, url)
    monkeypatch.setattr(datasets, "MNIST_SHA256", checksums)
    d = load_mnist(download=True)
    assert str(tmp_path / "xdg" / "sparsekit" / "mnist") in d.source
    np.testing.assert_array_equal(d.y_train, arrays["y_train"])
    # The real checksums do not match the fake archives: rejected, not silently used.
    monkeypatch.undo()
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setenv(datasets.URL_ENV_VAR, url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg2"))
    with pytest.raises(ValueError, match="expected SHA-256 440fcabf"):
        load_mnist(download=True)


def test_offline_falls_back_to_digits(tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(datasets.URL_ENV_VAR, "http://127.0.0.1:9/")  # discard port: refused
    d = load_mnist(download=True)
    assert d.x_train.shape[1] == 64
    assert "offline fallback: MNIST download failed" in d.source
