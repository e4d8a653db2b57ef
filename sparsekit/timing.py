"""How sparsekit times things: one method for ``sparsify`` tuning and ``sparsekit bench``.

* **Calls** -- :func:`measure` times ``fn(i)`` after a warm-up until both ``min_reps`` calls
  and ``min_time_s`` seconds are reached (:func:`time.perf_counter_ns` per call) and reports
  the median with the 10th/90th percentiles (:class:`Stats`). :func:`measure_interleaved`
  times several candidates round-robin, one call of each per round, so interference from other
  processes or frequency changes hits all of them alike; it is what decisions between
  candidates (``sparsify(tune=True)``) use.
* **Cold weights** -- a weight that stays resident in the last-level cache (LLC) makes
  memory-bound kernels look several times faster than they are in a model with many layers.
  :func:`rotation_count` gives the number of weight copies whose total exceeds ``factor x``
  the LLC (read at run time by :func:`llc_bytes`); callers cycle through them with
  ``i % n_copies``.
* **Asynchronous devices** -- :func:`sync_for` returns the synchronisation to call inside the
  timed region (``torch.cuda.synchronize`` for CUDA, nothing on CPU).

Imports only numpy and torch (no benchmark machinery), so library code may use it.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "Stats", "measure", "measure_interleaved", "measure_alternating", "llc_bytes",
    "rotation_count", "sync_for",
]

_FALLBACK_LLC = 32 * 1024 * 1024
_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


# --------------------------------------------------------------------------------------------
# Cache size and weight rotation
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


def rotation_count(bytes_per_copy: int, factor: float = 2.0, *, llc: int | None = None,
                   max_copies: int | None = None) -> int:
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
    max_copies : int, optional
        Upper bound on the result (bounds the set-up time and memory for tiny operands).

    Returns
    -------
    int
        ``floor(factor * llc / bytes_per_copy) + 1`` -- the smallest count whose total strictly
        exceeds ``factor * llc``; at least 1, at most ``max_copies``.
    """
    if not isinstance(bytes_per_copy, (int, np.integer)) or bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy: expected a positive int, got {bytes_per_copy!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: expected a positive finite number, got {factor!r}")
    if llc is None:
        llc = llc_bytes()
    if llc <= 0:
        raise ValueError(f"llc: expected a positive int, got {llc!r}")
    n = max(1, int(factor * llc // int(bytes_per_copy)) + 1)
    return n if max_copies is None else max(1, min(n, max_copies))


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


def measure_interleaved(
    fns: dict[str, Callable[[int], Any]],
    *,
    warmup: int = 3,
    min_reps: int = 9,
    min_time_s: float = 0.05,
    max_reps: int = 200,
    sync: Callable[[], Any] | None = None,
) -> dict[str, Stats]:
    """Time several candidates round-robin; ``{name: Stats}``.

    Each round calls every ``fns[name](i)`` once (in order), timing each call; rounds continue
    until ``min_reps`` rounds are done and ``min_time_s`` seconds have passed, at most
    ``max_reps`` rounds. ``i`` counts calls of that candidate, warm-up included, as in
    :func:`measure` (so rotating callers keep cycling through their copies).
    """
    if not fns:
        raise ValueError("fns: expected at least one candidate, got none")
    for fn in fns.values():
        for i in range(warmup):
            fn(i)
    if sync is not None:
        sync()
    samples: dict[str, list[int]] = {k: [] for k in fns}
    clock = time.perf_counter_ns
    t_end = clock() + int(min_time_s * 1e9)
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or clock() < t_end):
        i = warmup + rounds
        for k, fn in fns.items():
            t0 = clock()
            out = fn(i)
            if sync is not None:
                sync()
            samples[k].append(clock() - t0)
            del out
        rounds += 1
    return {k: Stats.from_samples([s * 1e-9 for s in v]) for k, v in samples.items()}


def measure_alternating(
    fns: dict[str, Callable[[int], Any]],
    *,
    blocks: int = 4,
    settle_s: float = 0.0,
    sleep: Callable[[float], Any] = time.sleep,
    **measure_kwargs: Any,
) -> dict[str, list[Stats]]:
    """Time several candidates alone, in alternating blocks; ``{name: [Stats per block]}``.

    For candidates that must not share rounds with the others (e.g. a BLAS whose worker threads
    keep spinning after each call and slow whatever runs next): each of ``blocks`` passes times
    every candidate in turn with :func:`measure` (``measure_kwargs``), after ``settle_s``
    seconds of idleness. Comparing the blocks' medians pairs candidates timed seconds apart
    rather than one before the other. ``i`` keeps counting across a candidate's blocks.
    """
    if not fns:
        raise ValueError("fns: expected at least one candidate, got none")
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks: expected an int >= 1, got {blocks!r}")
    if not (isinstance(settle_s, (int, float)) and settle_s >= 0):
        raise ValueError(f"settle_s: expected a number >= 0, got {settle_s!r}")
    out: dict[str, list[Stats]] = {k: [] for k in fns}
    def counting(fn: Callable[[int], Any]) -> Callable[[int], Any]:
        # measure() numbers each block's calls from 0; one running count per candidate instead
        count = itertools.count()
        return lambda _i: fn(next(count))

    counted = {k: counting(fn) for k, fn in fns.items()}
    for _ in range(blocks):
        for k, fn in counted.items():
            if settle_s:
                sleep(settle_s)
            out[k].append(measure(fn, **measure_kwargs))
    return out


def sync_for(device: torch.device | str) -> Callable[[], None] | None:
    """What to call after each timed call on ``device``: CUDA launches are asynchronous."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None
