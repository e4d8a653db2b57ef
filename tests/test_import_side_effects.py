"""``import sparsekit`` must be free of side effects a server cares about.

Checked in a fresh interpreter (the test process itself has long imported everything):
no new threads (Python-level or OS-level), no CUDA context, no Numba compilation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import gc, json, os, sys, threading

def snapshot():
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return {
        "py_threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "nvidia_fds": sorted(f for f in fds if f.startswith("/dev/nvidia")),
    }

import numpy, torch  # the baseline every server has anyway
before = snapshot()
import sparsekit
import sparsekit.nn, sparsekit.serving  # noqa: F401  (public submodules, also lazy-free)
after = snapshot()

compiled = []
if "numba" in sys.modules:
    from numba.core.dispatcher import Dispatcher
    for obj in gc.get_objects():
        try:
            if isinstance(obj, Dispatcher) and obj.overloads:
                compiled.append(getattr(obj, "__qualname__", repr(obj)))
        except ReferenceError:
            pass

print(json.dumps({
    "before": before,
    "after": after,
    "cuda_initialized": bool(torch.cuda.is_initialized()),
    "numba_imported": "numba" in sys.modules,
    "numba_compiled": compiled,
    "threads": [t.name for t in threading.enumerate()],
}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    env = dict(os.environ)
    # Make sure nothing in the environment pre-empts what we test.
    for var in ("NUMBA_DISABLE_JIT",):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"probe failed:\nstdout={proc.stdout}\nstderr={proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_starts_no_python_threads(probe: dict) -> None:
    assert probe["after"]["py_threads"] == probe["before"]["py_threads"], probe["threads"]


def test_import_starts_no_os_threads(probe: dict) -> None:
    # /proc/self/task also sees threads started by C/C++ code (OpenMP pools, TBB, numba).
    assert probe["after"]["os_threads"] == probe["before"]["os_threads"]


def test_import_initialises_no_cuda(probe: dict) -> None:
    assert probe["cuda_initialized"] is False
    assert probe["after"]["nvidia_fds"] == probe["before"]["nvidia_fds"]


def test_import_compiles_no_numba_function(probe: dict) -> None:
    assert probe["numba_compiled"] == []
