"""Resident memory stays flat over 100,000 calls of a small SparseLinear (no per-call leak).

Each measurement runs in a fresh interpreter: in the test process, heap freed by earlier tests
would silently absorb a leak (or be returned to the OS and look like shrinkage). RSS is read
from /proc/self/statm after a warm-up (allocator pools, thread pools and caches populated) and
again after the calls; it must grow by less than 5 % (the issue's bound) and by less than
8 MiB in absolute terms, i.e. under ~80 bytes per call -- a tensor or Python object leaked per
call would exceed that. A control run with a deliberately leaking wrapper proves the probe
sees such a leak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparsekit

ROOT = Path(__file__).resolve().parents[1]
N_CALLS = 100_000

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc needed")

_PROBE = r"""
import gc, json, os, sys, torch
from sparsekit.nn import SparseLinear
backend, n_calls, leak_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

g = torch.Generator().manual_seed(0)
lin = torch.nn.Linear(64, 32)
with torch.no_grad():
    lin.weight.mul_((torch.rand(32, 64, generator=g) < 0.2).float())
sl = SparseLinear.from_dense(lin, format="csr", backend=backend)
x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
leak = []

def call(inp):
    y = sl(inp)
    if leak_bytes:
        leak.append(torch.empty(leak_bytes // 4))
    return y

with torch.inference_mode():
    ref = x.double() @ sl.matrix.to_dense().double().T + sl.bias.double()
    err = float((sl(x).double() - ref).abs().max())
    for _ in range(5_000):  # warm-up
        y = call(x)
    before = rss()
    for _ in range(n_calls):
        y = call(x)
    after = rss()
print(json.dumps({"before": before, "after": after, "err": err}))
"""


def _measure(backend: str, n_calls: int, leak_bytes: int = 0) -> dict:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, backend, str(n_calls), str(leak_bytes)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["auto", pytest.param("numba", marks=pytest.mark.slow)])
def test_rss_flat_over_100k_calls(backend):
    if backend != "auto" and backend not in sparsekit.backends():
        pytest.skip(f"backend {backend} not available")
    r = _measure(backend, N_CALLS)
    assert r["err"] < 1e-4  # the calls compute the right thing (float64 dense reference)
    before, after = r["before"], r["after"]
    growth = (after - before) / before
    print(f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({growth:+.2%})")
    assert growth < 0.05 and after - before < 8 * 2**20, (
        f"RSS grew {growth:.1%} over {N_CALLS} calls: {before / 2**20:.1f} MiB -> "
        f"{after / 2**20:.1f} MiB"
    )


def test_rss_probe_sees_a_real_leak():
    """Control: the same probe flags a 1 KiB-per-call leak over 20,000 calls (~20 MiB)."""
    r = _measure("auto", 20_000, leak_bytes=1024)
    assert r["after"] - r["before"] > 15 * 2**20, r
