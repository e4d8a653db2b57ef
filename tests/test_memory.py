"""Resident memory stays flat over 100,000 calls of a small SparseLinear (no per-call leak).

RSS is read from /proc/self/statm after a warm-up (allocator pools, thread pools and caches
populated) and again after the calls; it must grow by less than 5 % (the issue's bound) and by
less than 8 MiB in absolute terms, i.e. less than ~80 bytes per call -- a leaked tensor or
Python object per call would exceed that. A companion check with a deliberately leaking wrapper
proves the measurement sees such a leak.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

import sparsekit
from sparsekit.nn import SparseLinear

N_CALLS = 100_000
PAGE = os.sysconf("SC_PAGE_SIZE")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc needed")


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _layer(backend: str) -> SparseLinear:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_((torch.rand(32, 64, generator=g) < 0.2).float())
    return SparseLinear.from_dense(lin, format="csr", backend=backend)


def _calls(fn, x: torch.Tensor, n: int) -> torch.Tensor:
    acc = torch.zeros(())
    with torch.inference_mode():
        for _ in range(n):
            y = fn(x)
        acc += y.sum()
    return acc


@pytest.mark.parametrize("backend", ["auto", pytest.param("numba", marks=pytest.mark.slow)])
def test_rss_flat_over_100k_calls(backend):
    if backend != "auto" and backend not in sparsekit.backends():
        pytest.skip(f"backend {backend} not available")
    sl = _layer(backend)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = x.double() @ sl.matrix.to_dense().double().T + sl.bias.double()
        torch.testing.assert_close(sl(x).double(), ref, rtol=1e-5, atol=1e-5)
    _calls(sl, x, 5_000)  # warm-up
    before = _rss()
    _calls(sl, x, N_CALLS)
    after = _rss()
    growth = (after - before) / before
    print(f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({growth:+.2%})")
    assert growth < 0.05 and after - before < 8 * 2**20, (
        f"RSS grew {growth:.1%} over {N_CALLS} calls: {before / 2**20:.1f} MiB -> "
        f"{after / 2**20:.1f} MiB"
    )


def test_rss_probe_sees_a_real_leak():
    """Control: the same measurement flags a 1 KiB-per-call leak over 20,000 calls."""
    sl = _layer("auto")
    x = torch.randn(4, 64)
    leak: list[torch.Tensor] = []

    def leaky(inp: torch.Tensor) -> torch.Tensor:
        y = sl(inp)
        leak.append(torch.empty(256))  # 1 KiB kept per call
        return y

    _calls(leaky, x, 1_000)
    before = _rss()
    _calls(leaky, x, 20_000)
    after = _rss()
    assert after - before > 15 * 2**20, (before, after)
    leak.clear()
