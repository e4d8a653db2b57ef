"""Per-call overhead of the sparse layers, and a small pruned model end to end (one thread).

Usage::

    python benchmarks/bench_overhead.py            # writes benchmarks/results/overhead-<date>.json

Two measurements, every ratio from the same run:

1. **Per-call overhead** on a 64x64 layer (90% pruned) at batch 1: ``SparseLinear`` against
   ``nn.Linear`` and ``sparsekit.linear`` against ``F.linear``. At this size every call is
   almost all overhead (the product is ~400 multiply-adds), so the difference of the per-call
   times is the extra cost of the sparse call path. Targets: ``SparseLinear`` at most 1 us
   above ``nn.Linear``; ``sparsekit.linear`` at most 1.5 us above ``F.linear``.
2. **LeNet-300-100** (784-300-100-10, ReLU), every layer magnitude-pruned to 90%, converted by
   ``sparsekit.sparsify`` (default options, so a ReLU after a converted layer is fused into
   it; its tuning cache off so the decision is made in this run), against the dense model at
   batch 1 and 256. Targets: >= 1.25x and >= 1.8x.

Times are the minimum over interleaved rounds of the mean of many calls (robust to other load
on a shared machine: a round hit by another process only loses). Each record names the CPU
model, the ISA path and the kernel variants the planner chose.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import sparsekit  # noqa: E402
from benchmarks import bench_linear as BL  # noqa: E402
from sparsekit.bench import harness as H  # noqa: E402


def timed(fns: dict[str, Callable[[], Any]], calls: int, rounds: int) -> dict[str, float]:
    """Seconds per call of each function: min over interleaved rounds of a mean of `calls`."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        for _ in range(max(10, calls // 10)):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            s = time.perf_counter()
            for _ in range(calls):
                f()
            best[k] = min(best[k], (time.perf_counter() - s) / calls)
    return best


def prune_(model: nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude ``sparsity`` fraction of every Linear weight, in place."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                k = int(sparsity * w.numel())
                if k:
                    thr = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= thr] = 0.0


def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def variants_of(model: nn.Module, n: int) -> dict[str, str]:
    from sparsekit.kernels import get_backend

    be = get_backend("cpp")
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, sparsekit.nn.SparseLinear):
            out[name] = be.variant(m.matrix, n)
    return out


def call_path_steps(sl: Any, lin: nn.Linear, x: torch.Tensor, calls: int,
                    rounds: int) -> dict[str, float]:
    """Per-call microseconds of the pieces of a 64x64 N=1 call (for the docs' breakdown):
    the general path's plan/launch, the pybind11 ``BoundMatrix.run`` against the
    ``runner()`` builtin (kernel included in both), the output allocation, the thread-count
    read, and a 3000-nonzero (100x300, 90%) kernel call against ``F.linear`` on that layer."""
    from sparsekit import ops
    from sparsekit.kernels.cpp import bound_matrix, run_bound

    mat = sl.matrix
    M, K = mat.shape
    b = lin.bias
    bm = bound_matrix(mat)
    runner = bm.runner()
    out = torch.empty(1, M)
    tmpl = torch.empty(1, M)
    xp, op, bp = x.data_ptr(), out.data_ptr(), b.data_ptr()
    with torch.inference_mode(False):  # built as a user builds it (see main)
        big = nn.Linear(300, 100)
        prune_(big, 0.9)
        sbig = sparsekit.nn.SparseLinear.from_dense(big)
    xb = torch.randn(1, 300)
    for _ in range(3):
        sbig(xb)
    run_big = bound_matrix(sbig.matrix).runner()
    ob = torch.empty(1, 100)
    xbp, obp = xb.data_ptr(), ob.data_ptr()
    wb, bb = big.weight, big.bias
    t = timed({
        "SparseLinear.forward": lambda: sl.forward(x),
        "general path (ops.linear_matrix)": lambda: ops.linear_matrix(x, mat, b),
        "plan_linear": lambda: ops.plan_linear(x, K, M, mat.values, b),
        "launch_linear": lambda: ops.launch_linear(x, mat, b, "auto", torch.float32),
        "run_bound (pybind11 BoundMatrix.run)": lambda: run_bound(bm, mat, x, b, out),
        "BoundMatrix.run, ints only": lambda: bm.run(xp, op, 1, 0, bp, 1),
        "runner, ints only": lambda: runner(xp, op, 1, 0, bp, 1),
        "torch.empty_like(template)": lambda: torch.empty_like(tmpl),
        "x.new_empty((1, M))": lambda: x.new_empty((1, M)),
        "sparsekit.get_num_threads": sparsekit.get_num_threads,
        "100x300 runner, ints only": lambda: run_big(xbp, obp, 1, 0, 0, 1),
        "100x300 F.linear": lambda: F.linear(xb, wb, bb),
        "100x300 SparseLinear.forward": lambda: sbig.forward(xb),
    }, calls, rounds)
    return {k: v * 1e6 for k, v in t.items()}


def main(argv=None) -> int:
    H.reexec_without_openblas_overrides()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per round (batch 1)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=BL.RESULTS)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sparsekit.set_num_threads(1)
    load0 = os.getloadavg()
    info = H.machine_info(1, bandwidth=False)
    import sparsekit._C as _C

    records: dict[str, Any] = {}
    # models are built as a user builds them (outside inference mode), then run under it
    lin = nn.Linear(64, 64)
    prune_(lin, 0.9)
    sl = sparsekit.nn.SparseLinear.from_dense(lin)
    dense = lenet_300_100().eval()
    prune_(dense, 0.9)
    sparse = copy.deepcopy(dense)
    rep = sparsekit.sparsify(sparse, cache=False)
    with torch.inference_mode():
        # ---- 1. per-call overhead, 64x64, N=1
        mat = sl.matrix
        w, b = lin.weight, lin.bias
        x = torch.randn(1, 64)
        torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
        t = timed({"nn.Linear": lambda: lin(x), "SparseLinear": lambda: sl(x),
                   "F.linear": lambda: F.linear(x, w, b),
                   "sparsekit.linear": lambda: sparsekit.linear(x, mat, b)},
                  a.calls, a.rounds)
        us = {k: v * 1e6 for k, v in t.items()}
        over = {"SparseLinear_minus_nn.Linear_us": us["SparseLinear"] - us["nn.Linear"],
                "sparsekit.linear_minus_F.linear_us": us["sparsekit.linear"] - us["F.linear"]}
        records["overhead_64x64_n1"] = {"per_call_us": us, **over,
                                        "variant": variants_of(nn.Sequential(sl), 1)}
        print("64x64 N=1 per call (us): " + ", ".join(f"{k} {v:.2f}" for k, v in us.items()))
        print(f"  SparseLinear - nn.Linear = {over['SparseLinear_minus_nn.Linear_us']:.2f} us "
              f"(need <= 1.0); sparsekit.linear - F.linear = "
              f"{over['sparsekit.linear_minus_F.linear_us']:.2f} us (need <= 1.5)")

        # ---- 1b. where the time goes: each step of the call path on its own
        records["call_path_steps_us"] = call_path_steps(sl, lin, x, a.calls, a.rounds)
        print("call path steps (us): " + ", ".join(
            f"{k} {v:.2f}" for k, v in records["call_path_steps_us"].items()))

        # ---- 2. LeNet-300-100, 90% pruned, sparsify() vs dense
        n_sparse = sum(isinstance(m, sparsekit.nn.SparseLinear) for m in sparse.modules())
        print(f"LeNet-300-100 90%: sparsify made {n_sparse}/3 layers sparse")
        lenet: dict[str, Any] = {"sparse_layers": n_sparse,
                                 "sparsify_report": str(rep)[:2000]}
        for n, calls in ((1, a.calls), (256, max(20, a.calls // 100))):
            xb = torch.randn(n, 784)
            torch.testing.assert_close(sparse(xb), dense(xb), rtol=1e-4, atol=1e-4)
            tt = timed({"dense": lambda xb=xb: dense(xb), "sparse": lambda xb=xb: sparse(xb)},
                       calls, a.rounds)
            speed = tt["dense"] / tt["sparse"]
            need = 1.25 if n == 1 else 1.8
            lenet[f"batch{n}"] = {"dense_us": tt["dense"] * 1e6, "sparse_us": tt["sparse"] * 1e6,
                                  "speedup": speed, "need": need, "pass": speed >= need,
                                  "variants": variants_of(sparse, n)}
            print(f"  batch {n}: dense {tt['dense'] * 1e6:.1f} us, sparse "
                  f"{tt['sparse'] * 1e6:.1f} us: {speed:.2f}x (need {need}x) "
                  f"{'PASS' if speed >= need else 'MISS'}")
        records["lenet_300_100_90"] = lenet

    from sparsekit.kernels import planner

    load1 = os.getloadavg()
    o = records["overhead_64x64_n1"]
    targets = [
        {"id": "overhead-SparseLinear", "value_us": o["SparseLinear_minus_nn.Linear_us"],
         "need_us": 1.0, "pass": o["SparseLinear_minus_nn.Linear_us"] <= 1.0},
        {"id": "overhead-linear", "value_us": o["sparsekit.linear_minus_F.linear_us"],
         "need_us": 1.5, "pass": o["sparsekit.linear_minus_F.linear_us"] <= 1.5},
        {"id": "lenet-b1", "value": lenet["batch1"]["speedup"], "need": 1.25,
         "pass": lenet["batch1"]["pass"]},
        {"id": "lenet-b256", "value": lenet["batch256"]["speedup"], "need": 1.8,
         "pass": lenet["batch256"]["pass"]},
    ]
    meta = {"benchmark": "bench_overhead", "argv": sys.argv[1:], "threads": 1, "machine": info,
            "isa_path": _C.cpu_isa(), "cpu_model": info.get("cpu_model"),
            "load_avg_start": load0, "load_avg_end": load1,
            "machine_shared": max(load0[0], load1[0]) > 0.5, "targets": targets,
            "plans": planner.plans(), **records,
            "method": "min over interleaved rounds of the mean per-call wall time, 1 thread"}
    base = BL.write_results(f"overhead-{_C.cpu_isa()}", [], meta, a.out)
    print(f"wrote {base}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
