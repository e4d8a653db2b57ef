"""Shared by the layer and model benchmarks: dtype names, contender outcomes, progress bar."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from sparsekit.bench import harness as h

#: Benchmark JSON schema identifier (bump when record keys change incompatibly).
SCHEMA = "sparsekit.bench/1"

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Outcome of one contender in one cell.
OK = "ok"
WRONG = "WRONG"  # ran, result differs from the float64 reference: never timed
UNSUPPORTED = "not supported"  # the contender cannot run this dtype/format/device
UNAVAILABLE = "unavailable"  # not installed / not built on this machine
ERROR = "error"  # raised something other than "not supported"
STATUSES = (OK, WRONG, UNSUPPORTED, UNAVAILABLE, ERROR)


class Unsupported(Exception):
    """Raised by contender factories when a contender cannot run a configuration."""


def parse_dtype(name: str) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (also ``float32``/``bfloat16``/``float16``) -> torch dtype."""
    alias = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    key = alias.get(name.strip().lower(), name.strip().lower())
    if key not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[key]


def unsupported_reason(exc: BaseException) -> str | None:
    """If ``exc`` says "this dtype/layout is not implemented", return a short reason, else None.

    Distinguishes a contender that cannot run a configuration (shown as "not supported") from a
    contender that crashes (shown as "error").
    """
    if isinstance(exc, Unsupported):
        return str(exc)
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    low = msg.lower()
    if isinstance(exc, NotImplementedError) or "not implemented" in low or "not supported" in low \
            or "does not support" in low or "unsupported" in low:
        return f"{type(exc).__name__}: {msg[:150]}"
    return None


@dataclass
class Outcome:
    """Result of checking (and, if correct, timing) one contender."""

    status: str
    stats: h.Stats | None = None
    max_rel_err: float | None = None
    tol: float | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def check_and_time(
    make: Callable[[], Callable[[int], torch.Tensor]],
    ref: torch.Tensor,
    dtype: torch.dtype,
    k: int,
    *,
    timing: dict[str, Any],
    sync: Callable[[], Any] | None = None,
    slow_call_s: float = 0.25,
    tol: float | None = None,
    threads: int | None = None,
) -> Outcome:
    """Build a contender, verify it against ``ref`` (float64) and time it only if correct.

    Parameters
    ----------
    make : callable
        Returns ``fn(i)`` computing the output with rotation index ``i``.  It may raise
        :class:`Unsupported` (or a "not implemented" error) for configurations it cannot run.
    ref : torch.Tensor
        float64 reference output for ``fn(0)``'s input.
    dtype : torch.dtype
        The computation's dtype (sets the tolerance).
    k : int
        Reduction length (sets the tolerance).
    timing : dict
        Keyword arguments for :func:`harness.measure`.
    sync : callable, optional
        Device synchronisation for asynchronous (CUDA) contenders.
    tol : float, optional
        Tolerance on ``max|y - ref| / max|ref|``; default :func:`harness.tolerance_for`.
    threads : int, optional
        torch thread count to re-assert after the first call: starting a library's OpenMP pool
        (numba's "omp" threading layer) can reset the process-wide OpenMP thread count.
    slow_call_s : float
        If the verification call took longer than this, time 3 reps without further warm-up,
        so a slow contender (e.g. single-threaded scipy on a large BSR) cannot blow the budget.
    """
    if tol is None:
        tol = h.tolerance_for(dtype, k)
    try:
        fn = make()
        t0 = time.perf_counter()
        y = fn(0)
        if sync is not None:
            sync()
        first_s = time.perf_counter() - t0
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    except Exception as exc:  # classify: cannot run vs crashed
        reason = unsupported_reason(exc)
        if reason is not None:
            return Outcome(UNSUPPORTED, message=reason)
        return Outcome(ERROR, message=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                       if str(exc) else type(exc).__name__)
    ok, err = h.check_close(y, ref, dtype, k, tol=tol)
    del y
    if not ok:
        return Outcome(WRONG, max_rel_err=err, tol=tol,
                       message=f"max rel err {err:.3g} > tol {tol:.3g}; not timed")
    kw = dict(timing)
    if first_s > slow_call_s:
        # the verification call already warmed it up
        kw.update(warmup=0, min_reps=3, min_time_s=0.0)
        kw.pop("max_time_s", None)
    try:
        stats = h.measure(fn, sync=sync, **kw)
    except Exception as exc:
        return Outcome(ERROR, max_rel_err=err, tol=tol,
                       message=f"while timing: {type(exc).__name__}: {str(exc)[:200]}")
    return Outcome(OK, stats=stats, max_rel_err=err, tol=tol)


def finite_or_none(v: float | None) -> float | None:
    """JSON-friendly float: NaN/inf become None."""
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


class Progress:
    """A dependency-free progress bar on stderr; silent when not a TTY or when disabled."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None,
                 width: int = 28) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = bool(enabled and isatty())
        self.total = max(int(total), 1)
        self.done = 0
        self.width = width
        self.t0 = time.perf_counter()
        self._last_len = 0

    def advance(self, label: str = "", n: int = 1) -> None:
        """Count ``n`` finished steps and redraw with ``label``."""
        self.done = min(self.done + n, self.total)
        self.show(label)

    def show(self, label: str = "") -> None:
        """Redraw the bar with ``label`` without advancing."""
        if not self.enabled:
            return
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else math.nan
        eta_s = f"{eta:4.0f}s" if math.isfinite(eta) else "   ?"
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:4.0f}s eta {eta_s}  {label}")[:150]
        pad = " " * max(self._last_len - len(line), 0)
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._last_len = len(line)

    def close(self) -> None:
        """Erase the bar."""
        if self.enabled:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()


def sparsekit_backends(device: torch.device, requested: list[str] | None
                       ) -> tuple[dict[str, Any], dict[str, str]]:
    """Usable sparsekit backends for ``device`` and the reasons others are left out.

    Returns ``({name: Backend}, {name: reason})``.  The dense float64 ``torch`` reference backend
    is left out unless requested explicitly (it is a correctness oracle, not a kernel).
    """
    usable: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    try:
        from sparsekit.kernels import backends, get_backend
    except Exception as exc:
        name = "sparsekit"
        skipped[name] = f"sparsekit kernels not importable: {type(exc).__name__}: {exc}"
        return usable, skipped
    try:
        listed = dict(backends())
    except Exception as exc:
        skipped["sparsekit"] = f"backends() failed: {type(exc).__name__}: {exc}"
        return usable, skipped
    names = list(requested) if requested else [n for n in listed if n != "torch"]
    for name in names:
        if requested and name not in listed:
            skipped[name] = f"not built/usable here (available: {', '.join(listed) or 'none'})"
            continue
        try:
            be = get_backend(name)
        except Exception as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        try:
            available = bool(be.available())
        except Exception as exc:
            skipped[name] = f"available() failed: {exc}"
            continue
        if not available:
            skipped[name] = "not available"
            continue
        is_cuda_backend = "cuda" in name
        if is_cuda_backend != (device.type == "cuda"):
            continue  # silently: a CPU backend is simply not a contender on a GPU and vice versa
        usable[name] = be
    return usable, skipped
