"""Backend registry.

Each backend lives in its own module and exposes a module-level ``backend`` object with
``name``, ``available() -> bool``, ``describe() -> str``, ``supports(mat, x) -> bool`` and
``linear(mat, x2d, bias, out) -> None`` (x2d (N, K) C-contiguous, out (N, M) C-contiguous
allocated by the caller, bias fp32 (M,) or None, fp32 accumulation).

Modules are imported lazily, on the first call to :func:`backends`, :func:`get_backend` or a
dispatch, never at ``import sparsekit``. A module that is missing, fails to import or reports
``available() == False`` is recorded as unavailable with the reason (see :func:`backend_status`).

``SPARSEKIT_REQUIRE_BACKENDS=cpp,numba`` makes :func:`backends` and the first dispatch raise
``RuntimeError`` when a listed backend is unavailable, so a broken build cannot hide behind the
fallback (CI sets it).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Any, Protocol

# Only names from torch, never the module: importing the backend module sparsekit.kernels.torch
# binds the attribute ``torch`` of this package to it.
from torch import Tensor

__all__ = [
    "Backend", "backends", "backend_status", "get_backend", "select_backend", "BACKEND_NAMES",
    "require_compiled", "BUILD_HINT",
]

#: How to get the compiled kernels, quoted by every message about them missing.
BUILD_HINT = ("build them with ./tools/setup.sh in a checkout (tools/build_inplace.sh after a "
              "C++ change), or pip install sparsekit")

#: registry name -> module implementing it (named after what it registers)
_MODULES = {
    "cpp": "sparsekit.kernels.cpp",
    "cuda": "sparsekit.kernels.cuda",
    "numba": "sparsekit.kernels.numba",
    "numba_cuda": "sparsekit.kernels.numba_cuda",
    "torch": "sparsekit.kernels.torch",
}
BACKEND_NAMES = tuple(_MODULES)
_AUTO_ORDER = {
    "cpu": ("cpp", "numba", "torch"),
    "cuda": ("cuda", "numba_cuda", "torch"),
}
_REQUIRE_ENV = "SPARSEKIT_REQUIRE_BACKENDS"


class Backend(Protocol):
    """Interface of a backend object (see module docstring)."""

    name: str

    def available(self) -> bool: ...

    def describe(self) -> str: ...

    def supports(self, mat: Any, x: Tensor) -> bool: ...

    def linear(self, mat: Any, x2d: Tensor, bias: Tensor | None,
               out: Tensor) -> None: ...


_lock = threading.RLock()
_loaded: dict[str, tuple[Any | None, bool, str]] | None = None  # name -> (obj, ok, description)
_auto_cache: dict[tuple, Any] = {}
_warned_fallback = False
_require_checked = False


def _load_one(name: str) -> tuple[Any | None, bool, str]:
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # missing or broken module: unavailable, never an ImportError here
        return None, False, f"module {_MODULES[name]} failed to import: {type(e).__name__}: {e}"
    obj = getattr(mod, "backend", None)
    if obj is None:
        return None, False, f"module {_MODULES[name]} defines no 'backend' object"
    try:
        ok = bool(obj.available())
    except Exception as e:
        return obj, False, f"available() raised {type(e).__name__}: {e}"
    try:
        desc = str(obj.describe()) if hasattr(obj, "describe") else ("available" if ok else "")
    except Exception as e:
        desc = f"describe() raised {type(e).__name__}: {e}"
    if not ok and not desc:
        desc = "unavailable"
    return obj, ok, desc


def _registry() -> dict[str, tuple[Any | None, bool, str]]:
    global _loaded
    reg = _loaded
    if reg is None:
        with _lock:
            if _loaded is None:
                _loaded = {name: _load_one(name) for name in _MODULES}
            reg = _loaded
    return reg


def _reload() -> None:
    """Forget loaded backends and cached choices (tests, or after building ``_C``)."""
    global _loaded, _warned_fallback, _require_checked
    with _lock:
        _loaded = None
        _auto_cache.clear()
        _warned_fallback = False
        _require_checked = False


def backend_status() -> dict[str, tuple[bool, str]]:
    """Every registered backend: ``name -> (usable, description or reason unavailable)``."""
    return {name: (ok, desc) for name, (_obj, ok, desc) in _registry().items()}


def _required() -> list[str]:
    env = os.environ.get(_REQUIRE_ENV, "")
    return [s.strip() for s in env.split(",") if s.strip()]


def check_required() -> None:
    """Raise RuntimeError if a backend named in ``SPARSEKIT_REQUIRE_BACKENDS`` is unusable."""
    req = _required()
    if not req:
        return
    status = backend_status()
    problems = []
    for name in req:
        if name not in status:
            problems.append(f"{name!r} (unknown backend; known: {', '.join(BACKEND_NAMES)})")
        elif not status[name][0]:
            problems.append(f"{name!r} ({status[name][1]})")
    if problems:
        raise RuntimeError(
            f"{_REQUIRE_ENV}={os.environ.get(_REQUIRE_ENV)!r}: required backend(s) unavailable: "
            + "; ".join(problems)
        )


def backends() -> dict[str, str]:
    """Usable backends: ``name -> description`` (e.g. ``{"cpp": "avx512", "numba": "numba
    0.68.1", "torch": "reference"}``).

    Raises
    ------
    RuntimeError
        If ``SPARSEKIT_REQUIRE_BACKENDS`` lists a backend that is not usable.
    """
    check_required()
    return {name: desc for name, (_o, ok, desc) in _registry().items() if ok}


def get_backend(name: str) -> Backend:
    """The backend object registered as ``name``.

    Raises
    ------
    ValueError
        Unknown or unavailable backend; the message lists the available ones and, for an
        unavailable one, why.
    """
    reg = _registry()
    if name not in reg:
        raise ValueError(
            f"backend: expected one of {', '.join(repr(n) for n in BACKEND_NAMES)} or 'auto', "
            f"got {name!r} (available: {', '.join(n for n, v in reg.items() if v[1])})"
        )
    obj, ok, desc = reg[name]
    if not ok:
        raise ValueError(
            f"backend: {name!r} is not available ({desc}); available: "
            f"{', '.join(n for n, v in reg.items() if v[1])}"
        )
    return obj


def require_compiled(program: str) -> None:
    """Stop ``program`` (a demo or benchmark) unless the compiled C++ kernels are usable.

    Library calls fall back to slower kernels with a warning; a program whose point is to
    show or measure the compiled kernels must not, so it exits with a message saying how to
    build them.
    """
    ok, desc = backend_status()["cpp"]
    if not ok:
        raise SystemExit(
            f"{program}: the compiled C++ kernels (sparsekit._C) are not available ({desc}); "
            f"{BUILD_HINT}."
        )


def _warn_cpu_fallback(reason: str) -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    with _lock:
        if _warned_fallback:
            return
        _warned_fallback = True
    warnings.warn(
        "sparsekit: the compiled C++ kernels (sparsekit._C) are not available, falling back to "
        f"slower kernels. Reason: {reason}. To fix: {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=4,
    )


def select_backend(mat: Any, x: Tensor, name: str = "auto") -> Backend:
    """Choose the backend for ``linear(x, mat)``.

    ``name="auto"``: for CUDA tensors cuda, numba_cuda, torch; on CPU cpp, numba, torch -- the
    first that is usable and ``supports(mat, x)``. Falling back from cpp on CPU warns once
    (``RuntimeWarning`` with the reason). An explicit name must be usable and support the
    inputs, else ``ValueError``.
    """
    global _require_checked
    if not _require_checked:
        check_required()
        _require_checked = True
    if name != "auto":
        be = get_backend(name)
        if not be.supports(mat, x):
            raise ValueError(
                f"backend: {name!r} does not support this input (weight {type(mat).__name__} "
                f"{mat.dtype} on {mat.device}, x {x.dtype} on {x.device})"
            )
        return be
    dev = x.device.type
    key = (dev, type(mat), mat.values.dtype, x.dtype)
    be = _auto_cache.get(key)
    if be is not None:
        return be
    reg = _registry()
    order = _AUTO_ORDER.get(dev, ("torch",))
    for cand in order:
        obj, ok, desc = reg[cand]
        if ok and obj.supports(mat, x):
            if dev == "cpu" and cand != "cpp":
                _warn_cpu_fallback(reg["cpp"][2] if not reg["cpp"][1] else
                                   f"cpp does not support {mat.dtype} weights with {x.dtype} x")
            _auto_cache[key] = obj
            return obj
    raise ValueError(
        f"backend: no available backend supports weight {type(mat).__name__} {mat.dtype} on "
        f"{mat.device} with x {x.dtype} on {x.device} (tried {', '.join(order)}: "
        + "; ".join(f"{c}: {reg[c][2]}" for c in order) + ")"
    )
