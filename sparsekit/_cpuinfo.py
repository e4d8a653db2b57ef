"""The CPU this process runs on, read once: the one reader of ``/proc/cpuinfo`` in the package.

Plan keys (:mod:`sparsekit.kernels.planner`), ``sparsify``'s tuning cache and the benchmark
records all name the CPU with :func:`cpu_key`, so a result, a plan and a cached choice made on
one machine are recognised as foreign on another.
"""

from __future__ import annotations

import functools
import platform

__all__ = ["cpu_fields", "cpu_key", "cpu_model_name"]


@functools.lru_cache(maxsize=1)
def cpu_fields() -> dict[str, str]:
    """The first processor block of ``/proc/cpuinfo`` as ``{key: value}`` (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor describes the package well enough
                key, _, val = line.partition(":")
                info.setdefault(key.strip(), val.strip())
    except OSError:
        pass
    return info


def cpu_model_name(fields: dict[str, str] | None = None) -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` reports."""
    fields = cpu_fields() if fields is None else fields
    return fields.get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_key() -> str:
    """Model name plus family and model numbers: virtual machines often report a generic name
    ("Intel Xeon Processor"), and the numbers tell the microarchitecture apart."""
    f = cpu_fields()
    return f"{cpu_model_name(f)} (family {f.get('cpu family', '?')} model {f.get('model', '?')})"
