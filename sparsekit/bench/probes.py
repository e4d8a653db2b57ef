"""Memory-system probes for benchmark provenance: measured copy bandwidth.

The cache size itself (and the weight rotation it implies) is :mod:`sparsekit.timing`'s.
"""

from __future__ import annotations

import functools
import math
import time

import torch

from sparsekit.timing import llc_bytes

__all__ = ["copy_bandwidth_gbs"]

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
