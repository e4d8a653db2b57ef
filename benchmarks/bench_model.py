"""End-to-end batch-1 latency: a pruned BERT-base-sized transformer stack, sparsified with one
``sparsekit.sparsify`` call, against its dense twin (plain ``nn.Linear`` and every other dense
formulation of the shared harness: torch.matmul on a pre-transposed weight, oneDNN- and
MKL-packed weights, numpy/OpenBLAS), all measured in the same run.

Model: ``--layers`` pre-LN transformer blocks (default 12, d=768, 12 heads, FFN 3072: the
BERT-base shapes), every projection an ``nn.Linear`` (q, k, v, o, fc1, fc2), pruned per layer by
unstructured magnitude to ``--sparsity`` (default 0.8). Input: ``--batch`` x ``--seq`` tokens
(default 1 x 1, the latency-bound decode case).

Method (sparsekit.bench.harness): each variant is timed with ``measure`` (warm-up, median and
p10/p90 of repeated forward passes under ``torch.inference_mode``), cycling through enough model
copies that the weights touched exceed 2x the last-level cache (``rotation_count``), so weights
come from DRAM as they would in a real model. Outputs are compared with a float64 run of the
masked dense model. Writes ``benchmarks/results/model-<UTC date>.json``.

Usage::

    .venv/bin/python benchmarks/bench_model.py [--layers 12] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.bench import harness
from sparsekit.kernels import require_compiled
from sparsekit.nn import sparsify

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Block(nn.Module):
    """Pre-LN transformer block; all projections are nn.Linear."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y):
            return y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def build_model(layers: int, d: int, heads: int, ff: int, sparsity: float, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(*(Block(d, heads, ff) for _ in range(layers)))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight
                k = int(sparsity * w.numel())
                thr = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= thr] = 0
    return model.eval()


class ContenderLinear(nn.Module):
    """Runs one dense harness contender ``fn(x2d, 0)`` in place of an nn.Linear."""

    def __init__(self, fn, out_features: int) -> None:
        super().__init__()
        self.fn, self.out_features = fn, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x.reshape(-1, x.shape[-1]), 0)
        return y.reshape(*x.shape[:-1], self.out_features)


def contender_models(models: list[nn.Module], name: str, batch: int) -> list[nn.Module] | None:
    """Copies of ``models`` with every nn.Linear running dense contender ``name``."""
    out = []
    for m in models:
        m2 = copy.deepcopy(m)
        for mod in list(m2.modules()):
            for cname, child in list(mod.named_children()):
                if type(child) is nn.Linear:
                    cont = harness.dense_contenders(
                        [child.weight.detach()], None if child.bias is None else
                        child.bias.detach(), batch_size=batch,
                    )
                    if name not in cont:
                        return None
                    setattr(mod, cname, ContenderLinear(cont[name], child.out_features))
        out.append(m2)
    return out


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> dict:
    harness.reexec_without_openblas_overrides()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ff", type=int, default=3072)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    require_compiled("bench_model")
    dtype = DTYPES[args.dtype]

    with harness.threads_for_all(args.threads) as nthreads:
        base = build_model(args.layers, args.d, args.heads, args.ff, args.sparsity, args.seed)
        base = base.to(dtype)
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(args.batch, args.seq, args.d, generator=gen).to(dtype)
        with torch.no_grad():
            ref = copy.deepcopy(base).double()(x.double())

        dense_bytes = weight_bytes(base)
        n_copies = harness.rotation_count(dense_bytes)
        print(f"model: {args.layers} blocks d={args.d} ff={args.ff}, {dense_bytes / 2**20:.0f} "
              f"MiB dense {args.dtype}; {n_copies} rotating copies; {nthreads} threads",
              flush=True)

        # -- sparsify (one call, tuned at this batch shape)
        sparse = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = sparsify(sparse, batch_sizes=(args.batch * args.seq,))
        tune_s = time.perf_counter() - t0
        print(report, flush=True)
        sparse_bytes = weight_bytes(sparse)

        def timed(models: list[nn.Module]) -> tuple[harness.Stats, torch.Tensor]:
            n = len(models)
            with torch.inference_mode():
                y = models[0](x)
                st = harness.measure(lambda i: models[i % n](x), min_time_s=args.min_time)
            return st, y

        results: dict[str, dict] = {}
        errors: dict[str, float] = {}
        # -- dense: the plain model (nn.Linear -> F.linear) and every harness contender
        dense_models = [base] + [copy.deepcopy(base) for _ in range(n_copies - 1)]
        st, y = timed(dense_models)
        results["dense:nn.Linear"], errors["dense:nn.Linear"] = st.to_dict(), rel_err(y, ref)
        print(f"dense nn.Linear     {st.median_s * 1e3:8.3f} ms", flush=True)
        for name in ("torch.matmul", "onednn", "mkl_packed", "numpy"):
            models = contender_models(dense_models, name, args.batch * args.seq)
            if models is None:
                results[f"dense:{name}"] = None
                continue
            st, y = timed(models)
            results[f"dense:{name}"], errors[f"dense:{name}"] = st.to_dict(), rel_err(y, ref)
            print(f"dense {name:13s} {st.median_s * 1e3:8.3f} ms", flush=True)
            del models
        del dense_models[1:]

        # -- sparse
        n_sp = harness.rotation_count(sparse_bytes)
        sparse_models = [sparse] + [copy.deepcopy(sparse) for _ in range(n_sp - 1)]
        st, y = timed(sparse_models)
        results["sparse"], errors["sparse"] = st.to_dict(), rel_err(y, ref)
        print(f"sparse (sparsekit)  {st.median_s * 1e3:8.3f} ms", flush=True)

    dense_stats = {k[6:]: harness.Stats(**v) for k, v in results.items()
                   if k.startswith("dense:") and v is not None}
    best_name, best = harness.best_dense(dense_stats)
    sp = results["sparse"]["median_s"]
    # bound: fp32-accumulated error of a deep stack; dense and sparse face the same bar
    tol = 50 * harness.tolerance_for(dtype, args.ff) * math.sqrt(args.layers)
    out = {
        "benchmark": "model",
        "description": "pruned BERT-base-sized transformer stack (nn.Linear projections), "
        "batch-1 end-to-end latency, sparsekit.sparsify vs dense twin",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "threads": nthreads,
        "n_copies_dense": n_copies,
        "n_copies_sparse": n_sp,
        "weight_bytes": {"dense": dense_bytes, "sparse": sparse_bytes},
        "sparsify_seconds": tune_s,
        "sparsify_report": report.to_dict(),
        "layers_sparse": len(report.replaced),
        "layers_total": sum(lr.status != "unsupported" for lr in report.layers),
        "results": results,
        "best_dense": best_name,
        "speedup_vs_nn_linear": results["dense:nn.Linear"]["median_s"] / sp,
        "speedup_vs_best_dense": best.median_s / sp,
        "max_rel_err_vs_float64": errors,
        "tolerance": tol,
        "outputs_ok": all(e <= tol for e in errors.values()),
        "machine": harness.machine_info(nthreads),
        "loadavg_end": list(os.getloadavg()),
    }
    print(f"best dense: {best_name} {best.median_s * 1e3:.3f} ms; sparse {sp * 1e3:.3f} ms; "
          f"speedup vs nn.Linear {out['speedup_vs_nn_linear']:.2f}x, vs best dense "
          f"{out['speedup_vs_best_dense']:.2f}x; outputs ok: {out['outputs_ok']} "
          f"(errors {errors})", flush=True)
    path = args.out or (
        ROOT / "benchmarks" / "results"
        / f"model-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M}-{args.dtype}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
