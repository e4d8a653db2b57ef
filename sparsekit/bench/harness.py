"""Shared benchmark harness: timing, cache-aware weight rotation, dense baselines, machine info.

Every sparsekit benchmark (the ``sparsekit bench`` CLI, the scripts under ``benchmarks/``) uses
this module so that all numbers are produced by one method:

* **Timing** -- :func:`measure` calls ``fn(i)`` after a warm-up until both ``min_reps``
  repetitions and ``min_time_s`` seconds are reached, timing each call with
  :func:`time.perf_counter_ns`, and reports the median with the 10th/90th percentiles.
* **Cold weights** -- a weight that stays resident in the last-level cache (LLC; 260 MiB on the
  development machine) makes memory-bound kernels look several times faster than they are in a
  model with many layers.  :func:`rotation_count` gives the number of weight copies whose total
  exceeds ``2 x`` the LLC (read at run time by :func:`llc_bytes`); callers cycle through them with
  ``i % n_copies``.
* **Dense baselines** -- :func:`dense_contenders` prepares ``F.linear``, ``torch.matmul`` with a
  pre-transposed weight, oneDNN with a pre-packed weight, MKL with a pre-packed weight and
  numpy/OpenBLAS, all verified against ``F.linear`` before they are returned.
  :func:`best_dense` picks the fastest one so speedups can be quoted against the best dense
  formulation, not just the default one.
* **Threads** -- :func:`threads_for_all` sets one thread count for torch (OpenMP/MKL/oneDNN),
  OpenBLAS (via threadpoolctl) and sparsekit.
* **Provenance** -- :func:`machine_info` records CPU, ISA, caches, measured copy bandwidth,
  load, versions, sparsekit backends, date and git commit.

OpenBLAS environment overrides
------------------------------
``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` may be set in the environment of some machines
(the development VM is one); they force numpy's OpenBLAS onto a slower kernel or block size and
make the numpy baseline look artificially slow.  OpenBLAS reads them once, when the library is
loaded, so unsetting them from inside a running process has no effect.  A benchmark *script* may
drop them for its own process by calling :func:`reexec_without_openblas_overrides` as the first
statement of ``main()`` (it re-executes the interpreter with the two variables removed), or be
started as ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python script.py``.  Check which
kernel numpy actually runs with ``machine_info()["blas"]`` (threadpoolctl's ``architecture``).
Both variables are always recorded in ``machine_info()["env"]``.  Tests and CI must never change
them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Stats",
    "DenseContenders",
    "llc_bytes",
    "copy_bandwidth_gbs",
    "rotation_count",
    "measure",
    "dense_contenders",
    "best_dense",
    "threads_for_all",
    "default_threads",
    "machine_info",
    "reexec_without_openblas_overrides",
    "OPENBLAS_OVERRIDE_VARS",
    "check_close",
    "tolerance_for",
]

#: Environment variables that change numpy's OpenBLAS kernel selection (read at library load).
OPENBLAS_OVERRIDE_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# Variables recorded in machine_info()["env"] because they change what is being measured.
_RECORDED_ENV = (
    *OPENBLAS_OVERRIDE_VARS,
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "SPARSEKIT_NUM_THREADS",
    "SPARSEKIT_REQUIRE_BACKENDS",
    "KMP_AFFINITY",
    "OMP_PROC_BIND",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
)

_FALLBACK_LLC = 32 * 1024 * 1024
_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


# --------------------------------------------------------------------------------------------
# Cache size, bandwidth, rotation
# --------------------------------------------------------------------------------------------
def _parse_cache_size(text: str) -> int:
    """Parse a sysfs cache size such as ``"266240K"``, ``"2M"`` or ``"32768"`` into bytes."""
    text = text.strip().upper()
    mult = 1
    if text and text[-1] in "KMG":
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]]
        text = text[:-1]
    return int(text) * mult


def llc_bytes(cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Size in bytes of the largest data/unified CPU cache.

    Read from ``/sys/devices/system/cpu/cpu0/cache/index*/size``; falls back to 32 MiB when sysfs
    is unavailable (non-Linux, containers hiding it).

    Parameters
    ----------
    cache_dir : path, optional
        Directory holding the ``index*`` entries (for tests); defaults to cpu0's sysfs directory.

    Returns
    -------
    int
        The last-level cache size in bytes.
    """
    root = Path(cache_dir) if cache_dir is not None else _CACHE_DIR
    best = 0
    try:
        entries = sorted(root.glob("index*"))
    except OSError:
        entries = []
    for entry in entries:
        try:
            ctype = (entry / "type").read_text().strip()
            if ctype == "Instruction":
                continue
            best = max(best, _parse_cache_size((entry / "size").read_text()))
        except (OSError, ValueError):
            continue
    return best if best > 0 else _FALLBACK_LLC


@functools.lru_cache(maxsize=8)
def _copy_bandwidth_cached(nbytes: int, num_threads: int) -> float:
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    prev = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        dst.copy_(src)  # fault the pages in before timing
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter_ns()
            dst.copy_(src)
            best = min(best, (time.perf_counter_ns() - t0) * 1e-9)
    finally:
        torch.set_num_threads(prev)
    return 2.0 * n * 4 / best / 1e9


def copy_bandwidth_gbs(nbytes: int | None = None, num_threads: int | None = None) -> float:
    """Measured memory copy bandwidth in GB/s (bytes read + bytes written, best of 3).

    Parameters
    ----------
    nbytes : int, optional
        Size of the source buffer.  Defaults to ``2 * llc_bytes()`` plus 1 MiB so the copy cannot
        be served from cache.  Two buffers of this size are allocated.
    num_threads : int, optional
        Threads used by ``torch`` for the copy; defaults to ``torch.get_num_threads()``.

    Returns
    -------
    float
        GB/s (1e9 bytes per second), counting read and write traffic.  Cached per arguments.
    """
    if nbytes is None:
        nbytes = 2 * llc_bytes() + (1 << 20)
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes: expected a positive int, got {nbytes!r}")
    if num_threads is None:
        num_threads = torch.get_num_threads()
    if not isinstance(num_threads, int) or num_threads <= 0:
        raise ValueError(f"num_threads: expected a positive int, got {num_threads!r}")
    return _copy_bandwidth_cached(nbytes, num_threads)


def rotation_count(bytes_per_copy: int, factor: float = 2.0, *, llc: int | None = None) -> int:
    """Number of weight copies whose total size exceeds ``factor * LLC``.

    Cycling through that many copies (``i % n``) guarantees every timed call reads its weight from
    DRAM rather than from the last-level cache.

    Parameters
    ----------
    bytes_per_copy : int
        Bytes touched by one copy of the operand being rotated (> 0).
    factor : float
        Multiple of the LLC the rotating set must exceed (> 0), default 2.
    llc : int, optional
        Cache size to use instead of :func:`llc_bytes` (for tests and what-if sizing).

    Returns
    -------
    int
        ``floor(factor * llc / bytes_per_copy) + 1`` -- the smallest count whose total strictly
        exceeds ``factor * llc``; at least 1.
    """
    if not isinstance(bytes_per_copy, (int, np.integer)) or bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy: expected a positive int, got {bytes_per_copy!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: expected a positive finite number, got {factor!r}")
    if llc is None:
        llc = llc_bytes()
    if llc <= 0:
        raise ValueError(f"llc: expected a positive int, got {llc!r}")
    target = factor * llc
    return max(1, int(target // int(bytes_per_copy)) + 1)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """Timing summary of one contender (seconds per call).

    Attributes
    ----------
    median_s, p10_s, p90_s : float
        Median and 10th/90th percentile of the per-call wall time.
    reps : int
        Number of timed calls (after warm-up).
    min_s, mean_s : float
        Fastest and mean call.
    """

    median_s: float
    p10_s: float
    p90_s: float
    reps: int
    min_s: float = math.nan
    mean_s: float = math.nan

    @classmethod
    def from_samples(cls, samples_s: Sequence[float]) -> Stats:
        """Summarise a non-empty sequence of per-call times in seconds."""
        arr = np.asarray(samples_s, dtype=np.float64)
        if arr.size == 0:
            raise ValueError("samples_s: expected at least one sample, got 0")
        p10, med, p90 = np.percentile(arr, [10.0, 50.0, 90.0])
        return cls(
            median_s=float(med),
            p10_s=float(p10),
            p90_s=float(p90),
            reps=int(arr.size),
            min_s=float(arr.min()),
            mean_s=float(arr.mean()),
        )

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


def measure(
    fn: Callable[[int], Any],
    *,
    warmup: int = 3,
    min_reps: int = 10,
    min_time_s: float = 0.2,
    max_reps: int = 10000,
    max_time_s: float | None = None,
    sync: Callable[[], Any] | None = None,
) -> Stats:
    """Time ``fn(i)`` and return robust statistics.

    ``fn`` is called with a running repetition index ``i`` (warm-up calls included, so a rotating
    caller keeps cycling through its copies).  After ``warmup`` untimed calls, timed calls
    continue until at least ``min_reps`` calls *and* ``min_time_s`` seconds of timed work have
    been done, or ``max_reps`` calls / ``max_time_s`` seconds are reached.

    Parameters
    ----------
    fn : callable
        ``fn(i)``; its return value is ignored (but kept alive until after ``sync``).
    warmup : int
        Untimed calls first (>= 0).
    min_reps, max_reps : int
        Bounds on the number of timed calls (1 <= min_reps <= max_reps).
    min_time_s : float
        Minimum total timed seconds (>= 0).
    max_time_s : float, optional
        Stop once this many timed seconds have accumulated (after ``min_reps``).
    sync : callable, optional
        Called after every call, inside the timed region -- e.g. ``torch.cuda.synchronize`` for
        GPU work, whose launches are otherwise asynchronous.

    Returns
    -------
    Stats
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable fn(i), got {type(fn).__name__}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    if not isinstance(min_reps, int) or min_reps < 1:
        raise ValueError(f"min_reps: expected an int >= 1, got {min_reps!r}")
    if not isinstance(max_reps, int) or max_reps < min_reps:
        raise ValueError(f"max_reps: expected an int >= min_reps ({min_reps}), got {max_reps!r}")
    if not (isinstance(min_time_s, (int, float)) and min_time_s >= 0):
        raise ValueError(f"min_time_s: expected a number >= 0, got {min_time_s!r}")
    if max_time_s is not None and not (isinstance(max_time_s, (int, float)) and max_time_s > 0):
        raise ValueError(f"max_time_s: expected a number > 0 or None, got {max_time_s!r}")
    if sync is not None and not callable(sync):
        raise TypeError(f"sync: expected a callable or None, got {type(sync).__name__}")

    i = 0
    for _ in range(warmup):
        fn(i)
        i += 1
    if sync is not None:
        sync()

    min_ns = int(min_time_s * 1e9)
    max_ns = None if max_time_s is None else int(max_time_s * 1e9)
    samples: list[int] = []
    total = 0
    clock = time.perf_counter_ns
    while True:
        t0 = clock()
        out = fn(i)
        if sync is not None:
            sync()
        dt = clock() - t0
        del out
        samples.append(dt)
        total += dt
        i += 1
        n = len(samples)
        if n >= max_reps:
            break
        if n >= min_reps and (total >= min_ns or (max_ns is not None and total >= max_ns)):
            break
    return Stats.from_samples([s * 1e-9 for s in samples])


# --------------------------------------------------------------------------------------------
# Correctness helpers
# --------------------------------------------------------------------------------------------
def tolerance_for(dtype: torch.dtype, k: int) -> float:
    """Relative tolerance (to ``max|ref|``) for a length-``k`` fp32-accumulated dot product.

    Covers rounding of the inputs/outputs to ``dtype`` plus summation-order differences; used for
    every correctness check in the benchmarks so that all contenders face the same bar.
    """
    u = {  # unit roundoff of the output dtype
        torch.float64: 2.0**-53,
        torch.float32: 2.0**-24,
        torch.bfloat16: 2.0**-8,
        torch.float16: 2.0**-11,
    }.get(dtype, 2.0**-8)
    # output rounding (a few units in the last place relative to max|y|) + fp32 accumulation
    # error, which grows like sqrt(k) for random data.  A kernel accumulating in bf16/fp16 fails
    # this; in fp32 so does one that drops a single term.
    return 4.0 * u + 4.0 * math.sqrt(max(k, 1)) * 2.0**-24 + 1e-6


def check_close(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, k: int, *, tol: float | None = None
) -> tuple[bool, float]:
    """Compare ``got`` to a float64 reference; returns ``(ok, max_rel_err)``.

    The error is ``max|got - ref| / max(max|ref|, tiny)``, accepted up to ``tol`` (default
    ``tolerance_for(dtype, k)``); ``ok`` is False for shape mismatch or non-finite
    values.
    """
    if tuple(got.shape) != tuple(ref.shape):
        return False, math.inf
    g = got.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(g).all()):
        return False, math.inf
    scale = max(float(r.abs().max()) if r.numel() else 0.0, 1e-30)
    err = float((g - r).abs().max()) / scale if r.numel() else 0.0
    return err <= (tolerance_for(dtype, k) if tol is None else tol), err


# --------------------------------------------------------------------------------------------
# Dense contenders
# --------------------------------------------------------------------------------------------
class DenseContenders(dict):
    """``dict`` name -> ``fn(x, i)`` with a ``skipped`` mapping name -> reason for the ones left out
    (unsupported dtype on this CPU/build, or failed verification against ``F.linear``)."""

    skipped: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self.skipped = {}


def _prep_onednn(weights: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    # The packed layout (what inductor's freezing pass feeds to mkldnn._linear_pointwise) is the
    # fastest oneDNN path in torch 2.x; it is correct for any batch size, the hint only picks the
    # blocking.  Raises on dtypes the CPU cannot run (e.g. fp16 without AVX512-FP16).
    return [torch.ops.mkldnn._reorder_linear_weight(w, batch_size) for w in weights]


def dense_contenders(
    weights: list[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
    verify: bool = True,
    names: Sequence[str] | None = None,
) -> DenseContenders:
    """Prepare dense ``x @ W.T (+ bias)`` formulations over rotating weight copies.

    Every returned ``fn(x, i)`` computes ``x @ weights[i % n].T + bias`` with ``x`` of the
    weights' dtype.  Weights are prepared once per contender (transposed copies, packed layouts),
    so preparation cost is never timed.  Contenders:

    ``"F.linear"``      ``torch.nn.functional.linear`` (what ``nn.Linear`` runs)
    ``"torch.matmul"``  ``torch.matmul(x, w_t)`` / ``torch.addmm`` with a pre-transposed contiguous
                        weight
    ``"onednn"``        ``torch.ops.mkldnn._linear_pointwise`` on a oneDNN-packed weight
                        (fp32, bf16; fp16 only where the CPU supports it)
    ``"mkl_packed"``    ``torch.ops.mkl._mkl_linear`` on an MKL-packed weight (fp32, MKL builds)
    ``"numpy"``         ``x_np @ w_t_np`` through numpy's BLAS (OpenBLAS) on the pre-transposed
                        weight (fp32; numpy has no BLAS kernel for fp16/bf16)

    Parameters
    ----------
    weights : list of torch.Tensor
        Rotating copies, each (M, K), same shape/dtype, on one device.  CUDA weights get only
        ``F.linear`` and ``torch.matmul``.
    bias : torch.Tensor, optional
        (M,) bias of the weights' dtype (or fp32 -- it is cast).
    batch_size : int, optional
        Batch size hint for the packed layouts (oneDNN/MKL block for it); any batch size stays
        correct.  Default 32.
    verify : bool
        Check every contender once against ``F.linear`` on a random input (batch 3) and drop the
        ones that fail (reason in ``.skipped``).
    names : sequence of str, optional
        Prepare only these contenders (default: all).  Lets a caller re-pack only the
        batch-size-dependent layouts (``onednn``, ``mkl_packed``) per batch size.

    Returns
    -------
    DenseContenders
        dict name -> fn(x, i); ``.skipped`` maps omitted names to reasons.
    """
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError(f"weights: expected a non-empty list of 2-D tensors, got {weights!r:.80}")
    w0 = weights[0]
    for j, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"weights[{j}]: expected a 2-D torch.Tensor, got {type(w).__name__}")
        if w.shape != w0.shape or w.dtype != w0.dtype or w.device != w0.device:
            raise ValueError(
                f"weights[{j}]: expected shape {tuple(w0.shape)}, dtype {w0.dtype}, device "
                f"{w0.device} like weights[0], got {tuple(w.shape)}, {w.dtype}, {w.device}"
            )
    m, k = w0.shape
    dtype, device = w0.dtype, w0.device
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (m,):
            raise ValueError(f"bias: expected a tensor of shape ({m},), got {bias!r:.80}")
        bias = bias.detach().to(device=device, dtype=dtype).contiguous()
    if batch_size is None:
        batch_size = 32
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    known = ("F.linear", "torch.matmul", "onednn", "mkl_packed", "numpy")
    if names is not None:
        bad = [nm for nm in names if nm not in known]
        if bad:
            raise ValueError(f"names: expected a subset of {known}, got {bad}")
    want = set(known if names is None else names)
    ws = [w.detach().contiguous() for w in weights]
    n = len(ws)
    out = DenseContenders()

    def f_linear(x: torch.Tensor, i: int) -> torch.Tensor:
        return F.linear(x, ws[i % n], bias)

    out["F.linear"] = f_linear

    wts = [w.t().contiguous() for w in ws] if want & {"torch.matmul", "numpy"} else []
    if bias is None:

        def f_matmul(x: torch.Tensor, i: int) -> torch.Tensor:
            return torch.matmul(x, wts[i % n])
    else:

        def f_matmul(x: torch.Tensor, i: int) -> torch.Tensor:
            return torch.addmm(bias, x, wts[i % n])

    out["torch.matmul"] = f_matmul

    if device.type == "cpu":
        # oneDNN
        if "onednn" not in want:
            pass
        elif not torch.backends.mkldnn.is_available():
            out.skipped["onednn"] = "torch built without oneDNN"
        else:
            try:
                packed = _prep_onednn(ws, batch_size)

                def f_onednn(x: torch.Tensor, i: int) -> torch.Tensor:
                    return torch.ops.mkldnn._linear_pointwise(
                        x, packed[i % n], bias, "none", [], ""
                    )

                out["onednn"] = f_onednn
            except Exception as exc:  # unsupported dtype on this CPU / op missing
                out.skipped["onednn"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        # MKL packed sgemm
        if "mkl_packed" not in want:
            pass
        elif dtype != torch.float32:
            out.skipped["mkl_packed"] = f"MKL packed GEMM is fp32 only (got {dtype})"
        elif not torch.backends.mkl.is_available():
            out.skipped["mkl_packed"] = "torch built without MKL"
        else:
            try:
                mkl_packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, batch_size) for w in ws]
                bias32 = bias

                def f_mkl(x: torch.Tensor, i: int) -> torch.Tensor:
                    j = i % n
                    return torch.ops.mkl._mkl_linear(x, mkl_packed[j], ws[j], bias32, batch_size)

                out["mkl_packed"] = f_mkl
            except Exception as exc:
                out.skipped["mkl_packed"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        # numpy / OpenBLAS
        if "numpy" not in want:
            pass
        elif dtype != torch.float32:
            out.skipped["numpy"] = f"numpy has no BLAS kernel for {dtype}"
        else:
            # numpy reads the same pre-transposed (K, M) buffers as the torch.matmul contender
            # (read-only, timed separately): no extra copy of a rotating set that is > 2x LLC.
            np_wts = [wt.numpy() for wt in wts]
            np_bias = None if bias is None else bias.numpy().copy()

            def f_numpy(x: torch.Tensor, i: int) -> torch.Tensor:
                y = np.matmul(x.numpy(), np_wts[i % n])
                if np_bias is not None:
                    y += np_bias
                return torch.from_numpy(y)

            out["numpy"] = f_numpy
    else:
        for name in ("onednn", "mkl_packed", "numpy"):
            if name in want:
                out.skipped[name] = f"CPU only (weights on {device})"
    for name in [nm for nm in out if nm not in want]:
        del out[name]

    if verify:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        x = torch.randn(3, k, generator=gen).to(device=device, dtype=dtype)
        ref = F.linear(x.double(), ws[0].double(), None if bias is None else bias.double())
        tol = tolerance_for(dtype, k)
        for name in list(out):
            if name == "F.linear":
                continue
            try:
                ok, err = check_close(out[name](x, 0), ref, dtype, k)
            except Exception as exc:
                ok, err = False, math.nan
                reason = f"{type(exc).__name__}: {str(exc)[:160]}"
            else:
                reason = f"wrong result: max rel err {err:.3g} > tol {tol:.3g}"
            if not ok:
                del out[name]
                out.skipped[name] = reason
                warnings.warn(f"dense contender {name!r} dropped: {reason}", stacklevel=2)
    return out


def best_dense(stats_by_name: dict[str, Stats]) -> tuple[str, Stats]:
    """Return ``(name, stats)`` of the contender with the smallest median time.

    Entries that are not :class:`Stats` (e.g. ``None`` for skipped contenders) are ignored.
    """
    cands = {k: v for k, v in stats_by_name.items() if isinstance(v, Stats)}
    if not cands:
        raise ValueError("stats_by_name: expected at least one Stats entry, got none")
    name = min(cands, key=lambda k: cands[k].median_s)
    return name, cands[name]


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------
def default_threads() -> int:
    """CPUs this process may run on (size of the affinity mask): the default thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def threads_for_all(n: int | None = None) -> Iterator[int]:
    """Use ``n`` threads in torch, numpy's BLAS (threadpoolctl) and sparsekit inside the block.

    Parameters
    ----------
    n : int, optional
        Thread count (>= 1); default: the number of CPUs in this process's affinity mask.

    Yields
    ------
    int
        The thread count in effect.  Previous settings are restored on exit.

    Notes
    -----
    A library that starts its own OpenMP pool *inside* the block can reset the process-wide
    OpenMP count behind torch's back (numba's "omp" threading layer does on its first parallel
    call).  Benchmarks should call a contender once before timing (the correctness check does)
    and re-assert ``torch.set_num_threads(n)`` afterwards, as the ``sparsekit bench`` runner
    does.
    """
    if n is None:
        n = default_threads()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected an int >= 1 or None, got {n!r}")
    prev_torch = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
        except ImportError:  # pragma: no cover - threadpoolctl is a dev dependency
            warnings.warn("threadpoolctl missing: numpy BLAS threads not controlled", stacklevel=3)
        try:
            # scoped (thread-local) override: leaves the process-wide setting untouched
            from sparsekit.threads import threads as _sk_threads

            stack.enter_context(_sk_threads(n))
        except ImportError:  # sparsekit partially built: torch/BLAS threads still apply
            pass
        torch.set_num_threads(n)
        stack.callback(torch.set_num_threads, prev_torch)
        yield n


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def reexec_without_openblas_overrides(argv: Sequence[str] | None = None) -> None:
    """Re-execute this process without ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` if set.

    For benchmark *scripts* only (call it first thing in ``main()``); never from tests or
    library code.  Returns normally when neither variable is set; otherwise does not return.
    """
    if not any(v in os.environ for v in OPENBLAS_OVERRIDE_VARS):
        return
    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_OVERRIDE_VARS}
    args = list(sys.argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # first processor block is enough
                key, _, val = line.partition(":")
                info.setdefault(key.strip(), val.strip())
    except OSError:
        pass
    return info


_ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _git_commit() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return {"commit": sha, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return None


def _version(modname: str) -> str | None:
    try:
        mod = __import__(modname)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:
        return None


def _sparsekit_info() -> dict[str, Any]:
    out: dict[str, Any] = {"version": None, "backends": None, "cpp_isa": None, "cpp_build": None}
    try:
        import sparsekit as _sk

        out["version"] = getattr(_sk, "__version__", None)
    except Exception as exc:
        out["error"] = f"import sparsekit: {type(exc).__name__}: {exc}"
        return out
    try:
        from sparsekit.kernels import backends

        out["backends"] = dict(backends())
    except Exception as exc:
        out["backends_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from sparsekit import _C  # type: ignore[attr-defined]

        out["cpp_isa"] = _C.cpu_isa()
        if hasattr(_C, "build_info"):
            out["cpp_build"] = {k: str(v) for k, v in dict(_C.build_info()).items()}
    except Exception:
        pass
    return out


def _blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info

        return [
            {k: d.get(k) for k in ("internal_api", "architecture", "version", "num_threads",
                                   "threading_layer", "filepath")}
            for d in threadpool_info()
        ]
    except Exception:
        return []


def machine_info(num_threads: int | None = None, *, bandwidth: bool = True) -> dict[str, Any]:
    """Describe the machine and software a benchmark ran on (JSON-serialisable).

    Parameters
    ----------
    num_threads : int, optional
        Thread count the benchmark used (recorded; also used for the bandwidth measurement).
        Default ``torch.get_num_threads()``.
    bandwidth : bool
        Measure copy bandwidth (allocates ``2 x (2 x LLC)`` bytes for ~1 s).  ``False`` records
        ``None``.

    Returns
    -------
    dict
        Keys: ``cpu_model, cpu_family_model, isa_flags, cores_logical, cores_physical,
        affinity, num_threads, llc_bytes, copy_bandwidth_gbs, load_avg, os, kernel, python,
        versions, sparsekit, blas, env, gpu, date_utc, git``.
    """
    if num_threads is None:
        num_threads = torch.get_num_threads()
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:
        physical = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    gpu = None
    if torch.cuda.is_available():
        try:
            gpu = {
                "name": torch.cuda.get_device_name(0),
                "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda,
            }
        except Exception as exc:
            gpu = {"error": str(exc)}
    return {
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_family_model": (
            f"family {cpu.get('cpu family', '?')} model {cpu.get('model', '?')} "
            f"stepping {cpu.get('stepping', '?')}"
        ),
        "isa_flags": [f for f in _ISA_FLAGS if f in flags],
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "affinity": affinity,
        "num_threads": num_threads,
        "llc_bytes": llc_bytes(),
        "copy_bandwidth_gbs": (
            round(copy_bandwidth_gbs(num_threads=num_threads), 2) if bandwidth else None
        ),
        "load_avg": load,
        "os": platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": _version("scipy"),
            "numba": _version("numba"),
        },
        "sparsekit": _sparsekit_info(),
        "blas": _blas_info(),
        "torch_cpu_capability": _torch_cpu_capability(),
        "env": {k: os.environ[k] for k in _RECORDED_ENV if k in os.environ},
        "gpu": gpu,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": _git_commit(),
    }


def _torch_cpu_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return None
