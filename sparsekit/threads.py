"""Thread-count control for sparsekit's CPU kernels.

The thread count used by the C++ (OpenMP) and Numba backends is resolved per call as:

1. a thread-local override installed by the :func:`threads` context manager, else
2. the process-wide value from :func:`set_num_threads`, else
3. the ``SPARSEKIT_NUM_THREADS`` environment variable (read when first needed), else
4. the ``OMP_NUM_THREADS`` environment variable, the budget that process managers hand to
   their workers (Ray sets it to each actor's / Serve replica's ``num_cpus``, 1 by default;
   torchrun, Slurm and MPI launchers set it too), else
5. the number of CPUs this process may actually use: the size of the affinity mask
   (``os.sched_getaffinity``), further capped by the cgroup CPU quota (cgroup v2 ``cpu.max``
   or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded up). In a container limited to 2
   CPUs on a 64-core host this gives 2, so several worker processes don't oversubscribe.

Invalid values: ``SPARSEKIT_NUM_THREADS`` is sparsekit's own setting, so a value that is not a
positive integer raises ``ValueError`` on the first kernel call (a typo should not silently
run with another count). ``OMP_NUM_THREADS`` is shared with every OpenMP program and is often
set by other tools; a value sparsekit cannot use (not a positive integer) gives a
``RuntimeWarning`` naming the value and is ignored (the affinity / cgroup count is used). An
OpenMP nesting list such as ``"4,2"`` uses its first (outermost) entry, as OpenMP does. Both
values are used as given, even above the number of usable CPUs (an explicit request wins).

Semantics
---------
``set_num_threads`` is a **process-wide** setting, safe to call from any thread at any time: the
value is a plain int swapped under a lock, and every kernel launch reads it once at its start,
so a call already running keeps the count it started with and the next call sees the new one.
``threads(n)`` overrides the count for the *calling thread only* (useful in a server where each
request thread wants its own budget) and restores the previous override on exit.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Iterator, Mapping

__all__ = [
    "set_num_threads", "get_num_threads", "threads", "default_num_threads",
    "thread_budget_source",
]

_ENV = "SPARSEKIT_NUM_THREADS"
_OMP_ENV = "OMP_NUM_THREADS"
_lock = threading.Lock()
_global: int | None = None  # set_num_threads value (process-wide)
_default: int | None = None  # cached env/affinity/cgroup default


class _Local(threading.local):
    # The current thread's threads() value. A class default makes the read a plain attribute
    # lookup (getattr with a default on a missing attribute costs ~0.3 us per kernel call).
    n: int | None = None


_local = _Local()


def _check_n(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}: expected a positive int number of threads, got {n!r}")
    return n


# --------------------------------------------------------------------------- cgroup parsing
def parse_cgroup_v2_cpu_max(text: str) -> float | None:
    """Parse a cgroup v2 ``cpu.max`` file ("<quota> <period>" or "max <period>").

    Returns
    -------
    float or None
        The CPU limit quota/period (e.g. 2.5), or None when unlimited or unparsable.
    """
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cgroup_v1_quota(quota_text: str, period_text: str) -> float | None:
    """Parse cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` contents.

    Returns None when the quota is -1 (unlimited) or the files are unparsable.
    """
    try:
        quota = int(quota_text.strip())
        period = int(period_text.strip())
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cgroup_cpu_limit(
    root: str = "/sys/fs/cgroup", proc_self_cgroup: str = "/proc/self/cgroup"
) -> float | None:
    """CPU limit imposed by the cgroup CPU quota of this process, or None if unlimited.

    Looks at the process's own cgroup (from ``/proc/self/cgroup``) and every ancestor up to
    the root, for both cgroup v2 (``cpu.max``) and v1 (``cpu/cpu.cfs_quota_us``); the smallest
    limit found wins (a parent's quota also bounds its children). ``root`` and
    ``proc_self_cgroup`` are parameters so the parser can be tested on fake trees.
    """
    v2_rel: str | None = None
    v1_rel: str | None = None
    text = _read(proc_self_cgroup) or ""
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _hid, controllers, rel = fields
        if controllers == "":
            v2_rel = rel
        elif "cpu" in controllers.split(","):
            v1_rel = rel
    limits: list[float] = []

    def _walk(base: str, rel: str | None) -> Iterator[str]:
        rel = (rel or "/").strip()
        parts = [p for p in rel.split("/") if p]
        for i in range(len(parts), -1, -1):
            yield os.path.join(base, *parts[:i])

    # cgroup v2 (unified hierarchy mounted at root, or at root/unified in hybrid mode)
    for base in (root, os.path.join(root, "unified")):
        for d in _walk(base, v2_rel):
            t = _read(os.path.join(d, "cpu.max"))
            if t is not None:
                lim = parse_cgroup_v2_cpu_max(t)
                if lim is not None:
                    limits.append(lim)
    # cgroup v1 (cpu controller mounted at root/cpu or root/cpu,cpuacct)
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = os.path.join(root, sub)
        for d in _walk(base, v1_rel):
            q = _read(os.path.join(d, "cpu.cfs_quota_us"))
            p = _read(os.path.join(d, "cpu.cfs_period_us"))
            if q is not None and p is not None:
                lim = parse_cgroup_v1_quota(q, p)
                if lim is not None:
                    limits.append(lim)
    return min(limits) if limits else None


def affinity_cpu_count() -> int:
    """Number of CPUs in this process's affinity mask (``os.cpu_count()`` where unsupported)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_omp_num_threads(text: str) -> int | None:
    """Parse an ``OMP_NUM_THREADS`` value: a positive int or an OpenMP nesting list "4,2,1".

    Returns
    -------
    int or None
        The outermost thread count, or None when ``text`` is empty or not usable (not a
        positive integer list).
    """
    first = text.strip().split(",", 1)[0].strip()
    if not first:
        return None
    try:
        n = int(first)
    except ValueError:
        return None
    return n if n >= 1 else None


def thread_budget_source(environ: Mapping[str, str] | None = None) -> str:
    """Which rule decides :func:`default_num_threads`: "SPARSEKIT_NUM_THREADS",
    "OMP_NUM_THREADS", "cgroup" or "affinity" (for logs and health endpoints)."""
    env = os.environ if environ is None else environ
    if env.get(_ENV, "").strip():
        return _ENV
    if parse_omp_num_threads(env.get(_OMP_ENV, "")) is not None:
        return _OMP_ENV
    lim = cgroup_cpu_limit()
    if lim is not None and math.ceil(lim) < affinity_cpu_count():
        return "cgroup"
    return "affinity"


def default_num_threads(environ: Mapping[str, str] | None = None) -> int:
    """The default thread count, from the first rule that applies.

    1. ``SPARSEKIT_NUM_THREADS`` (a positive integer),
    2. ``OMP_NUM_THREADS`` (a positive integer, or an OpenMP list whose first entry is used),
    3. min(affinity mask size, cgroup CPU quota rounded up).

    Parameters
    ----------
    environ : mapping, optional
        Environment to read (default ``os.environ``).

    Raises
    ------
    ValueError
        If ``SPARSEKIT_NUM_THREADS`` is set but is not a positive integer.

    Warns
    -----
    RuntimeWarning
        If ``OMP_NUM_THREADS`` is set but unusable; it is then ignored.
    """
    env = os.environ if environ is None else environ
    raw = env.get(_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{_ENV}: expected a positive integer, got {raw!r}")
        return n
    omp_raw = env.get(_OMP_ENV, "")
    if omp_raw.strip():
        omp = parse_omp_num_threads(omp_raw)
        if omp is not None:
            return omp
        warnings.warn(
            f"{_OMP_ENV}: expected a positive integer (or an OpenMP list like '4,2'), got "
            f"{omp_raw!r}; ignoring it and using the affinity mask / cgroup CPU quota",
            RuntimeWarning,
            stacklevel=2,
        )
    n = affinity_cpu_count()
    lim = cgroup_cpu_limit()
    if lim is not None:
        n = min(n, max(1, math.ceil(lim)))
    return n


# --------------------------------------------------------------------------- public API
def set_num_threads(n: int) -> None:
    """Set the process-wide number of threads used by sparsekit's CPU kernels.

    Parameters
    ----------
    n : int
        Positive thread count. Takes effect for kernel calls started after this returns;
        calls already running finish with the count they started with.
    """
    global _global
    n = _check_n(n)
    with _lock:
        _global = n


def get_num_threads() -> int:
    """Number of threads the next CPU kernel call from this thread will use."""
    local = _local.n
    if local is not None:
        return local
    g = _global
    if g is not None:
        return g
    global _default
    d = _default
    if d is None:
        with _lock:
            if _default is None:
                _default = default_num_threads()
            d = _default
    return d


def _reset_default() -> None:
    """Forget the cached default and the process-wide value (tests / after fork)."""
    global _default, _global
    with _lock:
        _default = None
        _global = None


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """Use ``n`` threads for kernel calls made from the *current thread* inside the block.

    Other threads are unaffected; nesting works and the previous value is restored on exit.

    Examples
    --------
    >>> import sparsekit
    >>> with sparsekit.threads.threads(1):
    ...     sparsekit.get_num_threads()
    1
    """
    n = _check_n(n)
    prev = _local.n
    _local.n = n
    try:
        yield n
    finally:
        _local.n = prev
