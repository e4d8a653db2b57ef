"""One thread count for every library in a benchmark: torch, OpenBLAS and sparsekit."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

from sparsekit.threads import threads as sk_threads

__all__ = ["default_threads", "threads_for_all"]

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
        # scoped (thread-local) override: leaves the process-wide setting untouched
        stack.enter_context(sk_threads(n))
        torch.set_num_threads(n)
        stack.callback(torch.set_num_threads, prev_torch)
        yield n
