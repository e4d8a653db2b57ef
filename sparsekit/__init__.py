"""sparsekit: sparse inference for PyTorch -- CSR/BSR weights, fast sparse ``linear``.

Importing sparsekit starts no threads, initialises no CUDA and compiles no Numba kernel:
backends load on first use and heavy submodules (``nn``, ``prune``, ``io``, ``serving``,
``bench``) are imported lazily on attribute access.

Examples
--------
>>> import torch, sparsekit
>>> w = torch.randn(64, 128) * (torch.rand(64, 128) > 0.9)
>>> W = sparsekit.CSRMatrix.from_dense(w)
>>> y = sparsekit.linear(torch.randn(4, 128), W)
>>> y.shape
torch.Size([4, 64])
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .formats import BSRMatrix, CSRMatrix
from .functional import linear, spmm
from .kernels import backends, get_backend
from .threads import get_num_threads, set_num_threads

__all__ = [
    "CSRMatrix", "BSRMatrix", "linear", "spmm", "backends", "get_backend", "set_num_threads",
    "get_num_threads", "nn", "prune", "sparsify", "densify", "save", "load", "warmup", "bench",
    "__version__",
]

# attribute -> (module, attribute in it or None for the module itself)
_LAZY = {
    "nn": ("sparsekit.nn", None),
    "prune": ("sparsekit.prune", None),
    "bench": ("sparsekit.bench", None),
    "io": ("sparsekit.io", None),
    "serving": ("sparsekit.serving", None),
    "sparsify": ("sparsekit.nn", "sparsify"),
    "densify": ("sparsekit.nn", "densify"),
    "save": ("sparsekit.io", "save"),
    "load": ("sparsekit.io", "load"),
    "warmup": ("sparsekit.serving", "warmup"),
}


def __getattr__(name: str) -> Any:
    try:
        modname, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'sparsekit' has no attribute {name!r}") from None
    mod = importlib.import_module(modname)
    val = mod if attr is None else getattr(mod, attr)
    globals()[name] = val
    return val


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
