"""int8 values + delta8 (uint8 gap) indices against dense fp32, dense int8 and our float sparse.

One run measures, for each shape / sparsity / batch, with weights rotated through enough copies
to exceed twice the last-level cache (so every call streams its weights from DRAM):

* ``dense_fp32``: the fastest of every fp32 dense contender of
  :func:`sparsekit.bench.baselines.dense_contenders` (``F.linear``, ``torch.matmul`` on a
  pre-transposed weight, oneDNN and MKL packed weights where torch has them, numpy's BLAS);
  numpy is timed alone against the fastest of the others in alternating blocks, as
  ``bench_cpu.py`` does (its BLAS threads keep spinning after each call), and its ratio carried
  into the rounds;
* ``dense_int8``: ``torch.ao.quantization.quantize_dynamic`` int8 ``nn.Linear`` (FBGEMM/oneDNN);
* ``sparse_f32_u16``, ``sparse_bf16_u16``, ``sparse_bf16_d8``, ``sparse_i8_d8``: sparsekit CSR.

Ratios are from the same run, every variant timed round-robin (one pass over its rotated copies
per round). Usage::

    flock <lockfile> python benchmarks/bench_int8.py --threads 2 --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform

import torch
from torch import nn

from benchmarks import bench_linear as BL
from sparsekit.bench.baselines import dense_contenders
from sparsekit.bench.machine import machine_info
from sparsekit.timing import measure_interleaved

# numpy's BLAS timed alone against the fastest in-round dense path: blocks, idle seconds before each
BRACKET_BLOCKS, BRACKET_SETTLE_S = 5, 0.3


def _llc_bytes() -> int:
    from sparsekit.bench.harness import llc_bytes

    return int(llc_bytes())


def _time_round_robin(variants: dict[str, list], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds per call of each variant. A sample is one pass over a variant's rotated
    copies; each round takes one sample of every variant in turn
    (:func:`sparsekit.timing.measure_interleaved`), so the ratios compare passes made under the
    same machine state (a shared host's memory bandwidth drifts)."""
    def one_pass(fns: list) -> None:
        for f in fns:
            f(x)

    passes = {k: (lambda i, fns=fns: one_pass(fns)) for k, fns in variants.items()}
    st = measure_interleaved(passes, warmup=1, min_reps=reps, max_reps=reps, min_time_s=0)
    return {k: st[k].median_s / len(variants[k]) for k in variants}


def _copies(nbytes: int, llc: int, cap: int = 4096) -> int:
    """Copies whose total exceeds twice the LLC (a fixed cap of a few copies would leave small
    compressed weights resident in a large LLC: 300 MiB holds 90 copies of a 3.4 MB matrix)."""
    if llc == 0:
        return 1
    n = max(2, math.ceil(2 * llc / max(nbytes, 1)))
    if n > cap:
        raise ValueError(f"{nbytes} bytes per copy needs {n} copies to exceed 2 x LLC "
                         f"({llc} bytes), above the cap {cap}")
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--quick", action="store_true", help="N=1 only")
    ap.add_argument("--resident", action="store_true",
                    help="no rotation: weights stay in cache (measures the compute rate)")
    args = ap.parse_args()
    os.environ["SPARSEKIT_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    import sparsekit
    from sparsekit import CSRMatrix
    from sparsekit.kernels.cpp import backend as cpp_backend

    assert "cpp" in sparsekit.backends(), "build sparsekit._C first"
    llc = 0 if args.resident else _llc_bytes()
    load_start = list(os.getloadavg())
    rows = []
    for shp in args.shapes.split(","):
        M, K = (int(s) for s in shp.split("x"))
        for sparsity in (0.9, 0.7):
            g = torch.Generator().manual_seed(0)
            w = torch.randn(M, K, generator=g) * 0.02
            w = w * (torch.rand(M, K, generator=g) >= sparsity)
            batches = (1,) if args.quick or sparsity != 0.9 else (1, 32, 128)
            variants: dict[str, list] = {}
            dense_bytes = M * K * 4
            nd = _copies(dense_bytes, llc)
            dense_w = [w.clone() for _ in range(nd)]
            lin = nn.Linear(K, M, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            qlins = [torch.ao.quantization.quantize_dynamic(
                nn.Sequential(copy_lin(lin)), {nn.Linear}, dtype=torch.qint8)
                for _ in range(_copies(M * K, llc))]
            variants["dense_int8_qdynamic"] = [lambda x, q=q: q(x) for q in qlins]
            specs = {
                "sparse_f32_u16": dict(value_dtype=torch.float32, index_encoding="plain"),
                "sparse_bf16_u16": dict(value_dtype=torch.bfloat16, index_encoding="plain"),
                "sparse_bf16_d8": dict(value_dtype=torch.bfloat16, index_encoding="delta8"),
                "sparse_i8_u16": dict(value_dtype=torch.int8, index_encoding="plain"),
                "sparse_i8_d8": dict(value_dtype=torch.int8, index_encoding="delta8"),
            }
            nbytes = {}
            mats_of: dict[str, list] = {}
            rotated_bytes = {"dense_fp32": nd * dense_bytes,
                             "dense_int8_qdynamic": len(qlins) * M * K}
            for name, kw in specs.items():
                m0 = CSRMatrix.from_dense(w, **kw)
                nbytes[name] = m0.nbytes
                mats = [m0] + [_clone(m0) for _ in range(_copies(m0.nbytes, llc) - 1)]
                rotated_bytes[name] = len(mats) * m0.nbytes
                variants[name] = [lambda x, m=m: sparsekit.linear(x, m) for m in mats]
                mats_of[name] = mats
            for N in batches:
                x = torch.randn(N, K)
                # the fp32 dense contenders, packed for this batch size
                dense = dense_contenders(dense_w, batch_size=N)
                in_round = {f"dense_fp32_{k}": [lambda x, f=f, i=i: f(x, i) for i in range(nd)]
                            for k, f in dense.items() if k != "numpy"}
                t = _time_round_robin({**in_round, **variants}, x,
                                      args.reps if N == 1 else max(3, args.reps // 2))
                bracketed = {}
                if "numpy" in dense:
                    ref = min(in_round, key=t.__getitem__)
                    ref_fn = dense[ref.removeprefix("dense_fp32_")]
                    b = BL.bracket_alone(lambda i, f=dense["numpy"], x=x: f(x, i),
                                         lambda i, f=ref_fn, x=x: f(x, i),
                                         blocks=BRACKET_BLOCKS, settle_s=BRACKET_SETTLE_S,
                                         min_reps=max(3, nd), min_time_s=0.2)
                    t["dense_fp32_numpy"] = b["ratio"] * t[ref]
                    bracketed["dense_fp32_numpy"] = {"reference": ref, **b}
                fp32_dense = [k for k in t if k.startswith("dense_fp32_")]
                best_name = min(fp32_dense, key=t.__getitem__)
                best_dense = t[best_name]
                row = {
                    "shape": [M, K], "sparsity": sparsity, "N": N,
                    "time_s": t, "bytes": nbytes, "rotated_bytes": rotated_bytes,
                    "best_fp32_dense": best_name, "bracketed": bracketed,
                    "skipped_dense": dict(dense.skipped),
                    "i8_d8_vs_best_fp32_dense": best_dense / t["sparse_i8_d8"],
                    "i8_d8_vs_int8_dense": t["dense_int8_qdynamic"] / t["sparse_i8_d8"],
                    "bf16_d8_vs_bf16_u16": t["sparse_bf16_u16"] / t["sparse_bf16_d8"],
                    "i8_d8_vs_f32_sparse": t["sparse_f32_u16"] / t["sparse_i8_d8"],
                    # the faster int8 format against the int8 dense (the 70% target names
                    # "int8 sparse", whichever index coding)
                    "i8_best_vs_int8_dense": t["dense_int8_qdynamic"]
                    / min(t["sparse_i8_u16"], t["sparse_i8_d8"]),
                    "i8_d8_GBps": nbytes["sparse_i8_d8"] / t["sparse_i8_d8"] / 1e9,
                    "dense_fp32_GBps": dense_bytes / best_dense / 1e9,
                    "ns_per_nonzero": {k: t[k] / N / max(1, int((w != 0).sum())) * 1e9
                                       for k in specs},
                    # the kernel variant each sparse format ran (planned on its first call)
                    "kernel_variants": {k: cpp_backend.variant(mats_of[k][0], N) for k in specs},
                }
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                  for k, v in row.items()
                                  if k not in ("time_s", "bytes", "rotated_bytes", "bracketed")}),
                      flush=True)
                del dense, in_round
            del variants, qlins, mats_of, dense_w
    load_end = list(os.getloadavg())
    info = machine_info(args.threads, bandwidth=False)
    info.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "isa": sparsekit.backends().get("cpp"), "threads": args.threads,
        "llc_bytes_rotation": llc, "python": platform.python_version(),
        "load_avg_start": load_start, "load_avg_end": load_end,
        # other processes competed for the cores: load before the run, or above our own threads
        "shared_machine": load_start[0] >= 1.0 or load_end[0] > args.threads + 1.0,
        "weights_rotated": not args.resident,
        "quantized_engine": torch.backends.quantized.engine,
        "timing": "round-robin: one pass over each variant's rotated copies per round, median; "
                  "numpy's BLAS bracketed alone against the fastest in-round fp32 dense path",
    })
    res = {"machine": info, "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


def _clone(m):
    c = type(m)._from_parts(m.indptr.clone(), m.indices.clone(), m.values.clone(), m.shape)
    c._set_compression(None if m.scales is None else m.scales.clone(), m.quantization)
    return c


def copy_lin(lin: nn.Linear) -> nn.Linear:
    new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    new.load_state_dict(lin.state_dict())
    return new


if __name__ == "__main__":
    main()
