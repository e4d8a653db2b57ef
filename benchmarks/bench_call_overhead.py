"""Per-call overhead of the Python call path at batch 1: SparseLinear and sparsekit.linear
against nn.Linear on a small layer (64x64, 80 % sparse), where the product itself is tiny.

Interleaved ``timeit`` repeats (best of 5 x 20,000 calls, 1 thread, inference mode); prints
one JSON document with machine information. Run it against two checkouts (``PYTHONPATH``)
to compare call paths: ratios from the same machine, one after the other.

Usage::

    .venv/bin/python benchmarks/bench_call_overhead.py > result.json
"""

from __future__ import annotations

import datetime as dt
import json
import timeit

import torch

import sparsekit
from sparsekit.bench.harness import machine_info
from sparsekit.nn import SparseLinear


def main() -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sparsekit.set_num_threads(1)
    lin = torch.nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(64, 64) > 0.8)
    sl = SparseLinear.from_dense(lin, format="csr")
    mat, bias = sl.matrix, sl.bias
    x = torch.randn(1, 64)
    fns = {"nn.Linear": lambda: lin(x), "SparseLinear": lambda: sl(x),
           "sparsekit.linear": lambda: sparsekit.linear(x, mat, bias)}
    best = {k: float("inf") for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(5):
            for k, f in fns.items():
                best[k] = min(best[k], timeit.timeit(f, number=20000) / 20000)
    return {
        "benchmark": "call_overhead", "shape": [64, 64], "sparsity": 0.8, "batch": 1,
        "threads": 1, "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "us_per_call": {k: 1e6 * v for k, v in best.items()},
        "ratio_vs_nn_linear": {k: v / best["nn.Linear"] for k, v in best.items()},
        "backends": sparsekit.backends(),
        "machine": machine_info(1, bandwidth=False),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1, default=str))
