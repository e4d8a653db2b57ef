"""Provenance of a benchmark run: CPU, ISA, caches, bandwidth, load, versions, git commit.

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

import datetime as _dt
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsekit._cpuinfo import cpu_fields, cpu_model_name
from sparsekit.bench.probes import copy_bandwidth_gbs
from sparsekit.timing import llc_bytes

__all__ = ["machine_info", "cpu_model", "reexec_without_openblas_overrides", "others_loaded",
           "argv_without", "OPENBLAS_OVERRIDE_VARS"]

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
    "THP_MEM_ALLOC_ENABLE",  # PyTorch's allocator: tensors >= 2 MiB on transparent huge pages
)

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
    return dict(cpu_fields())


def cpu_model(cpu: dict[str, str] | None = None) -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` reports."""
    return cpu_model_name(cpu)


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

        # the library's file name, not its path: results must not carry one machine's layout
        return [
            {**{k: d.get(k) for k in ("internal_api", "architecture", "version", "num_threads",
                                      "threading_layer")},
             "library": os.path.basename(d.get("filepath") or "")}
            for d in threadpool_info()
        ]
    except Exception:
        return []


def transparent_hugepage_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``; Linux),
    else None. With ``madvise`` only memory a program asks for gets huge pages, e.g. PyTorch's
    tensors of 2 MiB or more when ``THP_MEM_ALLOC_ENABLE=1`` (recorded in ``env``)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return bracketed_choice(text)


def bracketed_choice(text: str) -> str | None:
    """The selected word of a Linux sysfs choice list (``"always [madvise] never"`` ->
    ``"madvise"``), else None."""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


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
        affinity, num_threads, llc_bytes, copy_bandwidth_gbs, load_avg, os, kernel,
        transparent_hugepage, python, versions, sparsekit, blas, env, gpu, date_utc, git``.
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
        "cpu_model": cpu_model(cpu),
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
        "transparent_hugepage": transparent_hugepage_mode(),
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


def others_loaded(load_start: Sequence[float], load_end: Sequence[float], own_threads: int,
                  threshold: float = 0.5) -> bool:
    """Whether other work ran on the machine during a run, from the 1-minute load averages
    before and after it (the end value counts the run's own ``own_threads`` threads)."""
    return max(load_start[0], load_end[0] - own_threads) > threshold


def argv_without(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` and ``option=VALUE`` (e.g. a local output path kept out
    of a recorded command line, or a flag a child process must not see)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _torch_cpu_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return None
