"""Small datasets for examples, tests and benchmarks: MNIST, or scikit-learn digits offline.

:func:`load_mnist` reads a local copy (``path`` or ``$SPARSEKIT_MNIST``); with
``download=True`` it otherwise fetches the four canonical IDX archives once into the user cache
(``$XDG_CACHE_HOME/sparsekit/mnist``, default ``~/.cache/sparsekit/mnist``), each checked
against its published SHA-256; when the download host cannot be reached it falls back to the
8x8 digits bundled with scikit-learn and says so in ``source``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "Digits", "load_mnist", "load_digits", "download_mnist", "cache_dir", "ENV_VAR", "URL_ENV_VAR",
    "MNIST_URL", "MNIST_SHA256",
]

ENV_VAR = "SPARSEKIT_MNIST"
#: Overrides :data:`MNIST_URL` (a mirror, or a local server in tests).
URL_ENV_VAR = "SPARSEKIT_MNIST_URL"
#: The mirror of LeCun's original files that torchvision downloads from.
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
#: Published SHA-256 of the four archives (identical on every mirror of the original files).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

_IDX_FILES = {  # key -> accepted base names (the official ones and the common '.'-variant)
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


class Digits(NamedTuple):
    """A classification split: float32 inputs in [0, 1] (N, F) and int64 labels in [0, 10).

    Unpacks as ``x_train, y_train, x_test, y_test, source``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return 10


def _check_images(x: np.ndarray, key: str, where: str) -> np.ndarray:
    if x.ndim == 3 and x.shape[1:] == (28, 28):
        x = x.reshape(x.shape[0], 784)
    elif not (x.ndim == 2 and x.shape[1] == 784):
        raise ValueError(f"{where}: {key}: expected shape (N, 28, 28) or (N, 784), "
                         f"got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: {key}: no samples")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"{where}: {key}: float pixels must be in [0, 1], got range "
                             f"[{lo}, {hi}]")
        return x
    raise ValueError(f"{where}: {key}: expected uint8 (0..255) or float ([0, 1]) pixels, got "
                     f"dtype {x.dtype}")


def _check_labels(y: np.ndarray, key: str, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{where}: {key}: expected shape ({n},) to match the images, "
                         f"got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: {key}: expected integer labels, got dtype {y.dtype}")
    if y.min() < 0 or y.max() > 9:
        raise ValueError(f"{where}: {key}: labels must be in [0, 9], got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y.astype(np.int64)


def _validated(arrays: dict[str, np.ndarray], where: str, source: str) -> Digits:
    xtr = _check_images(arrays["x_train"], "x_train", where)
    xte = _check_images(arrays["x_test"], "x_test", where)
    ytr = _check_labels(arrays["y_train"], "y_train", xtr.shape[0], where)
    yte = _check_labels(arrays["y_test"], "y_test", xte.shape[0], where)
    return Digits(xtr, ytr, xte, yte, source)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte IDX data (type 0x08), got "
                         f"0x{data[2]:02x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header announces dims {dims} ({expected} bytes) but the "
                         f"file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, key: str) -> Path:
    for base in _IDX_FILES[key]:
        for name in (base, base + ".gz"):
            p = directory / name
            if p.is_file():
                return p
    raise FileNotFoundError(f"path: directory {directory} has no {key} IDX file (looked for "
                            f"{' / '.join(_IDX_FILES[key])}, optionally .gz)")


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """scikit-learn's bundled 8x8 digits (1797 samples, 64 features in [0, 1]), split
    deterministically (a ``numpy.random.default_rng(seed)`` permutation)."""
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return Digits(x[tr], y[tr], x[te], y[te],
                  f"sklearn-digits (8x8, {len(tr)} train / {len(te)} test, split seed {seed})")


def cache_dir() -> Path:
    """sparsekit's user cache: ``$XDG_CACHE_HOME/sparsekit``, default ``~/.cache/sparsekit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsekit"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_mnist(dest: str | os.PathLike | None = None, *, base_url: str | None = None,
                   checksums: dict[str, str] | None = None, timeout: float = 30.0) -> Path:
    """Download the four MNIST IDX archives into ``dest`` once; return ``dest``.

    Parameters
    ----------
    dest : str or PathLike, optional
        Target directory; default ``cache_dir() / "mnist"``. Archives already there with the
        right checksum are not downloaded again.
    base_url : str, optional
        Where the archives live; default ``$SPARSEKIT_MNIST_URL``, else :data:`MNIST_URL`.
    checksums : dict, optional
        File name -> expected SHA-256; default :data:`MNIST_SHA256`.
    timeout : float
        Seconds per connection attempt.

    Raises
    ------
    OSError
        The host cannot be reached or a file is missing there (``urllib.error.URLError``).
    ValueError
        A downloaded archive does not have the expected SHA-256; it is discarded.
    """
    dest = Path(dest) if dest is not None else cache_dir() / "mnist"
    base_url = base_url or os.environ.get(URL_ENV_VAR) or MNIST_URL
    if not base_url.endswith("/"):
        base_url += "/"
    checksums = MNIST_SHA256 if checksums is None else checksums
    dest.mkdir(parents=True, exist_ok=True)
    for name, expected in checksums.items():
        target = dest / name
        if target.is_file() and _sha256(target) == expected:
            continue
        url = base_url + name
        # Write to a temporary file in dest, verify, then rename: a partial or corrupt
        # download never sits under the final name.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    out.write(chunk)
            got = _sha256(Path(tmp))
            if got != expected:
                raise ValueError(
                    f"download_mnist: {url}: expected SHA-256 {expected}, got {got}; the file "
                    "was discarded (a corrupt download or a mirror serving other data)"
                )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def load_mnist(path: str | os.PathLike | None = None, *, download: bool = False) -> Digits:
    """Load MNIST as flattened float32 arrays in [0, 1], or fall back to scikit-learn digits.

    Parameters
    ----------
    path : str or PathLike, optional
        An ``.npz`` file with ``x_train, y_train, x_test, y_test`` (uint8 0..255 or float [0, 1]
        images of shape (N, 28, 28) or (N, 784); integer labels 0..9), or a directory holding the
        four IDX files (``train-images-idx3-ubyte`` ..., gzipped or not).  Without ``path`` the
        environment variable ``SPARSEKIT_MNIST`` is used if set.
    download : bool
        Without a local copy: if True, use the cached download (:func:`download_mnist`,
        fetched on first use); if the host cannot be reached, or if False, return
        scikit-learn's bundled 8x8 digits (64 features), saying so in ``source``.

    Returns
    -------
    Digits
        ``(x_train, y_train, x_test, y_test, source)``; ``source`` names the file used or the
        digits fallback.

    Raises
    ------
    FileNotFoundError
        ``path`` (or ``SPARSEKIT_MNIST``) does not exist or lacks a file.
    ValueError
        The contents have wrong keys, shapes, dtypes or label ranges (the message says which),
        or a downloaded archive fails its checksum.
    """
    if path is None:
        env = os.environ.get(ENV_VAR)
        if not env:
            if not download:
                return load_digits()
            try:
                d = download_mnist()
            except OSError as e:  # includes urllib.error.URLError: host unreachable
                digits = load_digits()
                reason = getattr(e, "reason", e)
                return digits._replace(
                    source=f"{digits.source}; offline fallback: MNIST download failed ({reason})"
                )
            arrays = {k: _read_idx(_find_idx(d, k)) for k in _IDX_FILES}
            return _validated(arrays, f"download_mnist() -> {d}", f"MNIST IDX files in {d}")
        path, arg = env, f"{ENV_VAR}={env}"
    else:
        arg = f"path={os.fspath(path)}"
    p = Path(path).expanduser()
    if p.is_dir():
        arrays = {k: _read_idx(_find_idx(p, k)) for k in _IDX_FILES}
        return _validated(arrays, arg, f"MNIST IDX files in {p.resolve()}")
    if not p.is_file():
        raise FileNotFoundError(f"{arg}: no such file or directory")
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # not a zip archive, pickled data, truncated file ...
        raise ValueError(f"{arg}: cannot read as an .npz archive: {e}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{arg}: expected an .npz archive, got a single .npy array")
    with z:
        missing = [k for k in _IDX_FILES if k not in z.files]
        if missing:
            raise ValueError(f"{arg}: npz lacks arrays {missing} (has {sorted(z.files)})")
        arrays = {k: z[k] for k in _IDX_FILES}
    return _validated(arrays, arg, f"MNIST npz {p.resolve()}")
