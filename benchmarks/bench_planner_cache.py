"""Does the planner rank kernel variants as a model would run them? Cache-resident vs streamed.

For 4096x4096 CSR at N = 1 (fp32 and bf16 values, 70-95% sparsity) every SpMV variant is timed
three ways, round-robin in one loop so all see the same machine state:

* ``warm``: the same matrix called over and over (it stays in the last-level cache);
* ``cold``: the same matrix flushed out of the caches before each call (``BoundMatrix.evict``,
  what the planner does by default, ``SPARSEKIT_PLAN_CACHE=cold``);
* ``streamed``: rotating copies over > 2x the last-level cache, as a model's layers are read.

It reports which variant each mode would pick and what the warm and cold picks cost when
streamed. Usage::

    python benchmarks/bench_planner_cache.py [--threads 2] [--reps 40]
    SPARSEKIT_ISA=avx2 python benchmarks/bench_planner_cache.py

Writes benchmarks/results/planner-cold-vs-warm-<isa>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_linear as BL  # noqa: E402
from sparsekit.bench import harness as H  # noqa: E402
from sparsekit.formats import CSRMatrix  # noqa: E402
from sparsekit.kernels import planner, require_compiled  # noqa: E402
from sparsekit.kernels.cpp import bound_matrix  # noqa: E402

MODES = ("warm", "cold", "streamed")


def measure_case(M: int, K: int, sp: float, vdtype: torch.dtype, threads: int, reps: int,
                 isa: str) -> dict:
    mat = CSRMatrix.from_dense(BL.random_weight(M, K, sp, seed=3), value_dtype=vdtype)
    mats = BL.sparse_copies(mat, H.rotation_count(mat.nbytes))
    bms = [bound_matrix(m) for m in mats]
    ids = {v["name"]: v["id"] for v in planner.variants()}
    names = planner.candidates("csr", 1, isa)
    x = torch.randn(1, K)
    out = torch.empty(1, M)
    xp, op = x.data_ptr(), out.data_ptr()
    for b in bms:  # page in every copy
        b.run(xp, op, 1, 0, 0, threads, ids[names[0]])
    t: dict[tuple[str, str], list[float]] = {(n, m): [] for n in names for m in MODES}
    rot = 0
    for _ in range(reps):
        for n in names:
            for mode in MODES:
                if mode == "streamed":
                    rot = rot % (len(bms) - 1) + 1  # copies 1.. (copy 0 is the resident one)
                    b = bms[rot]
                else:
                    b = bms[0]
                    if mode == "warm":
                        b.run(xp, op, 1, 0, 0, threads, ids[n])
                    else:
                        b.evict()
                s = time.perf_counter()
                b.run(xp, op, 1, 0, 0, threads, ids[n])
                t[n, mode].append(time.perf_counter() - s)
    med = {m: {n: statistics.median(t[n, m]) * 1e3 for n in names} for m in MODES}
    pick = {m: min(names, key=lambda n, m=m: med[m][n]) for m in MODES}
    best_streamed = med["streamed"][pick["streamed"]]
    row = {"M": M, "K": K, "sparsity": sp, "value_dtype": str(vdtype).replace("torch.", ""),
           "nnz": mat.nnz, "bytes": mat.nbytes, "copies": len(mats), "median_ms": med,
           "pick": pick,
           "streamed_cost_of_pick": {m: med["streamed"][pick[m]] / best_streamed for m in MODES}}
    del bms, mats
    return row


def main(argv=None) -> int:
    H.reexec_without_openblas_overrides()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=BL.RESULTS)
    a = ap.parse_args(argv)
    require_compiled("bench_planner_cache")
    import sparsekit._C as _C

    isa = _C.cpu_isa()
    load0 = os.getloadavg()
    info = H.machine_info(a.threads)
    rows = []
    with H.threads_for_all(a.threads):
        for vdtype in (torch.float32, torch.bfloat16):
            for sp in (0.7, 0.8, 0.9, 0.95):
                r = measure_case(a.size, a.size, sp, vdtype, a.threads, a.reps, isa)
                rows.append(r)
                print(f"{r['value_dtype']:8s} {sp:.2f}  " + "  ".join(
                    f"{m}: {r['pick'][m]} ({r['streamed_cost_of_pick'][m]:.2f}x streamed)"
                    for m in MODES))
    load1 = os.getloadavg()
    meta = {"benchmark": "bench_planner_cache", "argv": sys.argv[1:], "threads": a.threads,
            "machine": info, "isa_path": isa, "cpu_model": info.get("cpu_model"),
            "load_avg_start": load0, "load_avg_end": load1,
            "method": "median of --reps round-robin calls per (variant, mode); warm = same "
                      "matrix repeated, cold = flushed before each call, streamed = rotating "
                      "copies over > 2x LLC; streamed_cost_of_pick = streamed time of the "
                      "mode's pick / best streamed time"}
    base = BL.write_results(f"planner-cold-vs-warm-{isa}", rows, meta, a.out)
    print(f"wrote {base}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
