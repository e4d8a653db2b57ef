"""CPU performance targets of the C++ backend, with bandwidth evidence and a plot.

Usage::

    python benchmarks/bench_cpu.py                 # all targets + sweep, 2 threads
    python benchmarks/bench_cpu.py --quick         # fewer sweep points
    python benchmarks/bench_cpu.py --threads 1
    python benchmarks/bench_cpu.py --processes 3   # median of 3 fresh processes

For every target it prints the measured figure, PASS/MISS, and the achieved bandwidth on the
compressed bytes (values + indices + indptr) next to the measured copy bandwidth. Every ratio is
against the FASTEST dense formulation (best of F.linear, torch.matmul, oneDNN, MKL-packed,
numpy) measured in the same run, and is also reported against plain F.linear. Weights rotate
over > 2x the last-level cache. The machine-independent targets: at N=1 and 70-95% sparsity the
kernel moves its compressed bytes at >= 85% of the rate at which the fastest dense GEMV reads
its weights, and bf16 values run >= 1.4x faster than fp32 at 90%. Each record names the CPU
model, the ISA path (``SPARSEKIT_ISA=avx2`` forces AVX2) and the kernel variant the planner
chose (``sparsekit.kernels.planner``). The candidates of each target group (the dense
contenders and the sparse matrices compared with them) are timed round-robin, one call each per
round, so a ratio compares calls made under the same machine state: on a shared host the memory
bandwidth drifts by tens of percent between seconds (``--no-interleave`` times them one after the
other). numpy's OpenBLAS is timed apart (its spinning workers would slow the next call): alone,
in alternating blocks against the fastest dense path of the rounds, also alone, and the median
ratio of the two carries it into the rounds. In the same rounds a read probe streams each N = 1
CSR matrix's bytes the way the kernels do and computes nothing (``BoundMatrix.read_probe``): next
to each bandwidth fraction and the bf16 ratio the record keeps what that plain read reached, the
floor for a call of that size. At 90-95% a gather probe fetches x at every column id as the
planned kernel does (hardware gathers, or the scalar-load assembly of ``csr_spmv_assemble``) and
reads no values (``BoundMatrix.gather_probe``): the records keep its time, its fetch
and the figure a kernel overlapping its memory stream and its x fetches perfectly would reach,
running at the slower of the two floors (``floor_fraction``; ``floor_ratio``: the fp32 kernel's
time over that floor of the bf16 matrix; ``x_fetch``: how the probe fetched x). BSR matrices
(4x4, 8x8 and 1x16 blocks, 90%) share the 4096-row N = 1 rounds: the record's ``bsr_n1`` keeps
their ratios to the fastest dense GEMV and to CSR (not targets); ``bsr_small_batch`` keeps the
same at N = 8 (1x16, 2x2, 4x4 and 8x8 blocks, rounds of their own with the dense contenders and
CSR).
``--processes N`` repeats the measurement in N fresh processes (a process's memory placement
moves its ratios by up to ~10%) and reports each figure from the process with the median value,
with every process's value. Writes
benchmarks/results/cpu-<date>.json and cpu-<date>.png (speedup vs sparsity for N = 1, 2, 4, 8,
32, 128; dense = 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_linear as BL
from sparsekit.bench import harness as H
from sparsekit.formats import BSRMatrix, CSRMatrix
from sparsekit.kernels import get_backend, require_compiled
from sparsekit.threads import get_num_threads
from sparsekit.timing import Stats, measure_interleaved

BSR_BLOCKS = [(1, 8), (4, 1), (8, 8), (16, 16)]
# Block shapes timed at N = 1 (90%, layer BSR_N1_SHAPE) in that shape's N = 1 rounds:
# SparseLinear's default (4x4), a square one and a single-row one. Recorded next to the targets,
# not a target.
BSR_N1_BLOCKS = [(4, 4), (8, 8), (1, 16)]
BSR_N1_SHAPE = (4096, 4096)
# Block shapes timed at a small batch (90%, layer BSR_N1_SHAPE, N = BSR_SMALL_N), in rounds of
# their own with the dense contenders and CSR: the serving case of block pruning. Not a target.
BSR_SMALL_BLOCKS = [(1, 16), (2, 2), (4, 4), (8, 8)]
BSR_SMALL_N = 8
# Contenders timed apart from the rounds (numpy's OpenBLAS): alternating blocks against the
# fastest dense path of the rounds, each block after this many idle seconds (OpenBLAS's workers
# spin for about 2^28 cycles, ~0.1 s, after a call before they sleep).
BRACKET_BLOCKS, BRACKET_SETTLE_S = 5, 0.3


def scaled_stats(st: Stats, ratio: float) -> Stats:
    """``st`` with every time multiplied by ``ratio`` (the reps stay those of ``st``)."""
    return Stats(median_s=st.median_s * ratio, p10_s=st.p10_s * ratio, p90_s=st.p90_s * ratio,
                 reps=st.reps, min_s=st.min_s * ratio, mean_s=st.mean_s * ratio)


class Cache:
    """Measurements shared by targets and sweep (each measured once per run)."""

    def __init__(self, min_time: float, log=print, interleave: bool = True):
        self.min_time, self.log, self.interleave = min_time, log, interleave
        self.dense: dict = {}
        self.sparse: dict = {}
        self.tcsr: dict = {}
        self.x: dict = {}

    def xin(self, K: int, N: int) -> torch.Tensor:
        if (K, N) not in self.x:
            self.x[K, N] = torch.randn(N, K, generator=torch.Generator().manual_seed(N))
        return self.x[K, N]

    @staticmethod
    def matrix(M: int, K: int, sp: float, block=None, vdtype=torch.float32):
        w = BL.random_weight(M, K, sp, seed=3, block=block)
        return (CSRMatrix.from_dense(w, value_dtype=vdtype) if block is None
                else BSRMatrix.from_dense(w, block, value_dtype=vdtype))

    def _record_dense(self, M: int, K: int, N: int, st: dict, rounds: int | None = None) -> None:
        """Stores and logs the dense contenders' stats; ``rounds``: timed round-robin."""
        name, best = H.best_dense(st)
        self.dense[M, K, N] = {"best": name, "best_s": best.median_s,
                               "F.linear_s": st["F.linear"].median_s,
                               "all_s": {k: v.median_s for k, v in st.items()},
                               "interleaved": rounds is not None}
        self.log(f"  dense {M}x{K} N={N}: best {name} {best.median_s * 1e3:.3f} ms, "
                 f"F.linear {st['F.linear'].median_s * 1e3:.3f} ms"
                 + ("" if rounds is None else f" ({rounds} interleaved rounds)"))

    def _record_sparse(self, key: tuple, st, mat, interleaved: bool) -> None:
        M, K, sp, N, block, vdtype = key
        variant = get_backend("cpp").variant(mat, N)
        self.sparse[key] = {"s": st.median_s, "p10_s": st.p10_s, "p90_s": st.p90_s,
                            "bytes": mat.nbytes, "nnz": mat.nnz, "variant": variant,
                            "interleaved": interleaved}
        self.log(f"  cpp {M}x{K} sp={sp} N={N} block={block} {vdtype}: "
                 f"{st.median_s * 1e3:.3f} ms ({mat.nbytes / st.median_s / 1e9:.1f} GB/s) "
                 f"variant {variant}")

    def dense_best(self, M: int, K: int, N: int) -> dict:
        if (M, K, N) not in self.dense:
            st = BL.dense_stats(BL.random_weight(M, K, 0.0, seed=1), self.xin(K, N), self.min_time)
            self._record_dense(M, K, N, st)
        return self.dense[M, K, N]

    def sparse_s(self, M, K, sp, N, block=None, vdtype=torch.float32) -> dict:
        key = (M, K, sp, N, block, vdtype)
        if key not in self.sparse:
            mat = self.matrix(M, K, sp, block, vdtype)
            st = BL.sparsekit_stats(mat, self.xin(K, N), "cpp", self.min_time)
            self._record_sparse(key, st, mat, interleaved=False)
        return self.sparse[key]

    def interleaved(self, M: int, K: int, N: int, specs) -> None:
        """Measure the dense contenders of (M, K, N) and the sparse matrices ``specs`` (tuples
        ``(sparsity, block, value_dtype)``) round-robin in one loop, so the ratios between them
        see the same machine state (on a shared host the memory bandwidth drifts between
        seconds). Fills the same entries as :meth:`dense_best` and :meth:`sparse_s`."""
        x = self.xin(K, N)
        dense_fns = BL.dense_rotating_fns(BL.random_weight(M, K, 0.0, seed=1), x)
        # OpenBLAS (numpy) keeps its worker threads spinning for a while after each call, which
        # would slow whatever runs next, and inside the rounds its threads contend with the
        # OpenMP pool: numpy is timed apart (bracket_alone) and carried into the rounds.
        alone = {k: f for k, f in dense_fns.items() if k == "numpy"}
        fns = {f"dense:{k}": f for k, f in dense_fns.items() if k not in alone}
        mats = {}
        for sp, block, vdtype in specs:
            key = (M, K, sp, N, block, vdtype)
            mats[key] = self.matrix(M, K, sp, block, vdtype)
            # N = 1 CSR: the C++ read probe of the same bytes, in the same rounds, as the floor
            # a call of that size can reach on this machine (bandwidth-fraction targets)
            probe = N == 1 and block is None
            # and at 90-95% (fp32 values; bf16 ones share the column ids) the gather probe: the
            # x fetches of the kernel alone, the other floor of the bandwidth fraction and bf16
            gprobe = probe and sp >= 0.9 and vdtype == torch.float32
            fns[key], read, gather = BL.sparsekit_rotating_fns(
                mats[key], x, "cpp", read_probe=probe, gather_probe=gprobe)
            if probe:
                fns[("read",) + key] = read
            if gprobe:
                fns[("gather",) + key] = gather
        st = measure_interleaved(fns, min_time_s=self.min_time * len(fns), max_reps=5000)
        dense = {k.split(":", 1)[1]: v for k, v in st.items() if isinstance(k, str)}
        bracket = self.bracket_alone(alone, dense, dense_fns) if alone else {}
        for k, b in bracket.items():
            dense[k] = scaled_stats(dense[b["reference"]], b["ratio"])
        self._record_dense(M, K, N, dense, rounds=st[next(iter(st))].reps)
        if bracket:
            self.dense[M, K, N]["bracketed"] = bracket
        for key, mat in mats.items():
            self._record_sparse(key, st[key], mat, interleaved=True)
            if ("read",) + key in st:
                r = st[("read",) + key]
                self.sparse[key]["read_s"] = r.median_s
                self.log(f"    read probe of the same bytes: {r.median_s * 1e3:.3f} ms "
                         f"({mat.nbytes / r.median_s / 1e9:.1f} GB/s)")
            if ("gather",) + key in st:
                g = st[("gather",) + key]
                self.sparse[key]["gather_s"] = g.median_s
                fetch = BL.x_fetch(self.sparse[key]["variant"])  # as the probe fetched it
                self.sparse[key]["gather_fetch"] = fetch
                self.log(f"    gather probe ({fetch}) of the same column ids: "
                         f"{g.median_s * 1e3:.3f} ms "
                         f"({g.median_s / mat.nnz * 1e9 * get_num_threads():.3f} ns per "
                         "nonzero per thread)")

    def bracket_alone(self, alone: dict, dense: dict, dense_fns: dict) -> dict:
        """Time each contender of ``alone`` against the fastest dense path of the rounds, both
        alone, in alternating blocks with idle gaps (so neither inherits the other's spinning
        threads), and carry the median block-to-block ratio into the rounds: the contender's
        in-round time is that ratio times the reference's in-round stats (:func:`scaled_stats`).
        Timing it once after the rounds would take its baseline from another moment of a
        drifting machine. ``{name: {"reference", "ratio", "block_ratios", "alone_s"}}``."""
        ref = min(dense, key=lambda k: dense[k].median_s)
        out = {}
        for k, f in alone.items():
            b = BL.bracket_alone(f, dense_fns[ref], blocks=BRACKET_BLOCKS,
                                 settle_s=BRACKET_SETTLE_S, min_time_s=self.min_time / 2)
            out[k] = {"reference": ref, **b}
            self.log(f"    {k} timed alone against {ref} alone: {b['ratio']:.3f}x its time "
                     f"(blocks {' '.join(f'{r:.3f}' for r in b['block_ratios'])})")
        return out

    def torch_csr_s(self, M, K, sp, N) -> float:
        key = (M, K, sp, N)
        if key not in self.tcsr:
            w = BL.random_weight(M, K, sp, seed=3)
            self.tcsr[key] = BL.torch_csr_stats(w, self.xin(K, N), self.min_time).median_s
        return self.tcsr[key]


def targets(c: Cache, shapes_n1) -> list[dict]:
    out: list[dict] = []

    def add(tid, desc, value, need, sparse, dense, extra=None):
        d = {"id": tid, "target": desc, "value": value, "need": need, "pass": value >= need,
             "sparse_ms": sparse["s"] * 1e3 if sparse else None,
             "best_dense": dense["best"] if dense else None,
             "best_dense_ms": dense["best_s"] * 1e3 if dense else None,
             "vs_F.linear": dense["F.linear_s"] / sparse["s"] if sparse and dense else None}
        if sparse:
            d["achieved_GBps"] = sparse["bytes"] / sparse["s"] / 1e9
            d["variant"] = sparse.get("variant")
        d.update(extra or {})
        out.append(d)
        bound = d.get("read_fraction", d.get("read_ratio"))
        floor = d.get("floor_fraction", d.get("floor_ratio"))
        c.log(f"[{'PASS' if d['pass'] else 'MISS'}] {tid}: {desc}: {value:.2f}x (need {need}x)"
              + (f" (plain read of the same bytes: {bound:.2f}x" if bound else "")
              + (f", slower of read and x fetches ({d.get('x_fetch', 'gather')}) alone: "
                 f"{floor:.2f}x" if floor else "")
              + (")" if bound else "")
              + (f", variant {d['variant']}" if d.get("variant") else "")
              + (f", vs F.linear {d['vs_F.linear']:.2f}x" if d["vs_F.linear"] else "")
              + (f", {d['achieved_GBps']:.1f} GB/s compressed" if sparse else ""))

    f32, bf16 = torch.float32, torch.bfloat16
    for M, K in shapes_n1:
        if c.interleave:
            c.interleaved(M, K, 1, [(sp, None, f32) for sp in (0.5, 0.7, 0.8, 0.9, 0.95)]
                          + [(0.9, None, bf16)]
                          + [(0.9, blk, f32)
                             for blk in (BSR_N1_BLOCKS if (M, K) == BSR_N1_SHAPE else [])])
        d = c.dense_best(M, K, 1)
        s90 = c.sparse_s(M, K, 0.9, 1)
        add(f"N1-90-{M}", f"{M}x{K} 90% N=1 fp32 vs best dense", d["best_s"] / s90["s"], 4.5,
            s90, d)
        tc = c.torch_csr_s(M, K, 0.9, 1)
        add(f"N1-90-tcsr-{M}", f"{M}x{K} 90% N=1 vs torch CSR (int32)", tc / s90["s"], 1.5, s90,
            None, {"torch_csr_ms": tc * 1e3})
        s70 = c.sparse_s(M, K, 0.7, 1)
        add(f"N1-70-{M}", f"{M}x{K} 70% N=1 fp32 vs best dense", d["best_s"] / s70["s"], 1.8,
            s70, d)
        s50 = c.sparse_s(M, K, 0.5, 1)
        add(f"N1-50-{M}", f"{M}x{K} break-even at <= 50% N=1", d["best_s"] / s50["s"], 1.0,
            s50, d)
        b90 = c.sparse_s(M, K, 0.9, 1, vdtype=torch.bfloat16)
        add(f"N1-90-bf16-{M}", f"{M}x{K} 90% N=1 bf16 weights vs best fp32 dense",
            d["best_s"] / b90["s"], 7.0, b90, d)
        extra = None
        if "read_s" in b90:
            extra = {"read_ratio": s90["read_s"] / b90["read_s"]}
            if "gather_s" in s90:
                # the ratio if the bf16 kernel ran at the slower of its two floors (its plain
                # read and the x fetches of the same column ids), stream and gathers overlapped
                # perfectly: the most a better bf16 kernel could reach against this fp32 one
                extra["floor_ratio"] = s90["s"] / max(b90["read_s"], s90["gather_s"])
                extra["x_fetch"] = s90.get("gather_fetch", "gather")
        add(f"N1-90-bf16-vs-f32-{M}", f"{M}x{K} 90% N=1 bf16 vs our fp32 sparse",
            s90["s"] / b90["s"], 1.4, b90, None, extra)
        # Machine-independent: the sparse SpMV moves its compressed bytes (values + indices +
        # indptr) at >= 85% of the rate at which the fastest dense GEMV reads its weights.
        dense_gbps = M * K * 4 / d["best_s"] / 1e9
        for sp in (0.7, 0.8, 0.9, 0.95):
            s_ = c.sparse_s(M, K, sp, 1)
            frac = s_["bytes"] / s_["s"] / 1e9 / dense_gbps
            extra = {"dense_weight_GBps": dense_gbps, "kind": "fraction"}
            if "read_s" in s_:
                # what a plain read of the same bytes reaches in the same rounds
                extra["read_GBps"] = s_["bytes"] / s_["read_s"] / 1e9
                extra["read_fraction"] = extra["read_GBps"] / dense_gbps
                if "gather_s" in s_:
                    # and at the slower of the read and the x fetches alone (perfect overlap)
                    extra["gather_ms"] = s_["gather_s"] * 1e3
                    extra["floor_fraction"] = (s_["bytes"] / max(s_["read_s"], s_["gather_s"])
                                               / 1e9 / dense_gbps)
                    extra["x_fetch"] = s_.get("gather_fetch", "gather")
            add(f"BW-N1-{round(sp * 100)}-{M}",
                f"{M}x{K} {round(sp * 100)}% N=1 bytes/s vs dense GEMV weight read", frac, 0.85,
                s_, d, extra)
    M, K = 4096, 4096
    if c.interleave:
        c.interleaved(M, K, 32, [(0.9, None, f32)])
        c.interleaved(M, K, 128, [(0.8, None, f32)]
                      + [(0.9, blk, f32) for blk in BSR_BLOCKS])
    d32 = c.dense_best(M, K, 32)
    s = c.sparse_s(M, K, 0.9, 32)
    add("N32-90", f"{M}x{K} 90% N=32 fp32 vs best dense", d32["best_s"] / s["s"], 3.0, s, d32)
    d128 = c.dense_best(M, K, 128)
    s = c.sparse_s(M, K, 0.8, 128)
    add("N128-80", f"{M}x{K} 80% N=128 fp32 vs best dense", d128["best_s"] / s["s"], 1.5, s, d128)
    per_block = {f"{r}x{cc}": c.sparse_s(M, K, 0.9, 128, block=(r, cc)) for r, cc in BSR_BLOCKS}
    bname = min(per_block, key=lambda k: per_block[k]["s"])
    add("BSR-N128-90", f"{M}x{K} BSR 90% N=128 (best block {bname}) vs best dense",
        d128["best_s"] / per_block[bname]["s"], 5.0, per_block[bname], d128,
        {"per_block_ms": {k: v["s"] * 1e3 for k, v in per_block.items()}})
    return out


def bsr_rows(c: Cache, N: int, blocks) -> list[dict]:
    """BSR at batch N, 90%, layer :data:`BSR_N1_SHAPE`, per block shape of ``blocks``: against
    the fastest dense path and against CSR (fp32 values) of the same sparsity. At N = 1 the
    matrices share the N = 1 target rounds (:func:`targets`); at other N they get rounds of their
    own here."""
    M, K = BSR_N1_SHAPE
    if N != 1 and c.interleave:
        c.interleaved(M, K, N, [(0.9, None, torch.float32)]
                      + [(0.9, blk, torch.float32) for blk in blocks])
    d, csr = c.dense_best(M, K, N), c.sparse_s(M, K, 0.9, N)
    rows = []
    for r, cc in blocks:
        s = c.sparse_s(M, K, 0.9, N, block=(r, cc))
        rows.append({"block": f"{r}x{cc}", "N": N, "sparse_ms": s["s"] * 1e3,
                     "best_dense": d["best"], "best_dense_ms": d["best_s"] * 1e3,
                     "speedup_vs_best": d["best_s"] / s["s"], "vs_csr": csr["s"] / s["s"],
                     "achieved_GBps": s["bytes"] / s["s"] / 1e9, "variant": s["variant"]})
        c.log(f"  BSR {r}x{cc} 90% N={N}: {rows[-1]['speedup_vs_best']:.2f}x vs best dense, "
              f"{rows[-1]['vs_csr']:.2f}x vs CSR, {rows[-1]['achieved_GBps']:.1f} GB/s "
              f"compressed, variant {s['variant']}")
    return rows


def sweep(c: Cache, sparsities, batches) -> list[dict]:
    rows = []
    M, K = 4096, 4096
    for N in batches:
        d = c.dense_best(M, K, N)
        for sp in sparsities:
            s = c.sparse_s(M, K, sp, N)
            rows.append({"M": M, "K": K, "N": N, "sparsity": sp, "sparse_ms": s["s"] * 1e3,
                         "best_dense": d["best"], "best_dense_ms": d["best_s"] * 1e3,
                         "F.linear_ms": d["F.linear_s"] * 1e3,
                         "speedup_vs_best": d["best_s"] / s["s"],
                         "speedup_vs_F.linear": d["F.linear_s"] / s["s"],
                         "achieved_GBps": s["bytes"] / s["s"] / 1e9})
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for N in sorted({r["N"] for r in rows}):
        rr = sorted((r for r in rows if r["N"] == N), key=lambda r: r["sparsity"])
        ax.plot([r["sparsity"] * 100 for r in rr], [r["speedup_vs_best"] for r in rr], "o-",
                label=f"N={N}")
    ax.axhline(1.0, color="k", lw=1, ls="--", label="fastest dense = 1")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("speedup vs fastest dense (same run)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def measure(a: argparse.Namespace, min_time: float) -> dict[str, Any]:
    """One process's measurements: ``{"targets", "sweep", "plans"}``."""
    from sparsekit.kernels import planner

    c = Cache(min_time, interleave=a.interleave)
    with H.threads_for_all(a.threads):
        shapes = [(4096, 4096)] if a.quick else [(4096, 4096), (11008, 4096)]
        tg = targets(c, shapes)
        bn1 = bsr_rows(c, 1, BSR_N1_BLOCKS)
        bsmall = bsr_rows(c, BSR_SMALL_N, BSR_SMALL_BLOCKS)
        sps = [0.5, 0.8, 0.9, 0.95] if a.quick else [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
        sw = sweep(c, sps, [1, 2, 4, 8, 32, 128])
    return {"targets": tg, "sweep": sw, "bsr_n1": bn1, "bsr_small_batch": bsmall,
            "plans": planner.plans(),
            "dense": {f"{k[0]}x{k[1]} N={k[2]}": v for k, v in c.dense.items()}}


def _median_record(records: list[dict], key: str) -> dict:
    """The record whose ``key`` is the median of ``records``' (the lower middle one for an even
    count), so its other fields (times, variant) belong to the same measurement."""
    ranked = sorted(records, key=lambda r: r[key])
    return ranked[(len(ranked) - 1) // 2]


def merge_processes(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the measurements of independent worker processes: each target and sweep point
    takes the process with the median value, and keeps every process's value."""
    merged: dict[str, Any] = {"plans": [r["plans"] for r in runs],
                              "dense": [r["dense"] for r in runs]}
    tg = []
    for i, t0 in enumerate(runs[0]["targets"]):
        recs = [r["targets"][i] for r in runs]
        if any(rec["id"] != t0["id"] for rec in recs):
            raise RuntimeError(f"worker processes disagree on target {i}: "
                               f"{[rec['id'] for rec in recs]}")
        t = dict(_median_record(recs, "value"))
        t["per_process"] = [rec["value"] for rec in recs]
        t["pass"] = t["value"] >= t["need"]
        tg.append(t)
    merged["targets"] = tg
    # rows by position: the median speedup's record
    for key in ("sweep", "bsr_n1", "bsr_small_batch"):
        merged[key] = []
        for i in range(len(runs[0].get(key, []))):
            recs = [r[key][i] for r in runs]
            row = dict(_median_record(recs, "speedup_vs_best"))
            row["per_process_speedup_vs_best"] = [rec["speedup_vs_best"] for rec in recs]
            merged[key].append(row)
    return merged


def run_workers(argv: list[str], processes: int) -> dict[str, Any]:
    """Runs this benchmark in ``processes`` fresh processes, one after the other, and merges
    them (:func:`merge_processes`). Separate processes because a process's state (where its
    memory landed, which cores it started on) moves its ratios: blocks timed within one process
    agree to a few percent while processes differ by up to 12% (docs/kernels.md)."""
    import json
    import subprocess
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            out = Path(tmp) / f"worker-{i}.json"
            print(f"--- worker process {i + 1} of {processes}", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv,
                            "--worker-json", str(out)], check=True)
            with open(out) as f:
                runs.append(json.load(f))
    return merge_processes(runs)


def main(argv=None) -> int:
    H.reexec_without_openblas_overrides()
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--min-time", type=float, default=None)
    ap.add_argument("--out", type=Path, default=BL.RESULTS)
    ap.add_argument("--name", default="cpu")
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="time each target's dense and sparse candidates one after the other "
                         "instead of round-robin")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: single-threaded, per-thread CPU time (robust on a loaded machine)")
    ap.add_argument("--processes", type=int, default=1,
                    help="measure in this many fresh processes, one after the other; each "
                         "target and sweep point reports the process with the median value "
                         "and lists every process's value")
    ap.add_argument("--worker-json", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.processes < 1:
        ap.error(f"--processes: expected an integer >= 1, got {a.processes}")
    require_compiled("bench_cpu")
    if a.clock == "cpu":
        a.threads = 1
        BL.MEASURE = BL.measure_cpu_time
        a.interleave = False  # the per-thread CPU clock is already robust to load
    min_time = a.min_time or (0.15 if a.quick else 0.4)
    if a.worker_json is not None:
        import json

        with open(a.worker_json, "w") as f:
            json.dump(measure(a, min_time), f, default=str)
        return 0
    load0 = os.getloadavg()
    print(f"threads={a.threads} load={load0}")
    info = H.machine_info(a.threads)
    copy_bw = info.get("copy_bandwidth_gbs") or H.copy_bandwidth_gbs(num_threads=a.threads)
    if a.processes > 1:
        res = run_workers(H.argv_without(argv, "--processes"), a.processes)
    else:
        res = measure(a, min_time)
    tg, sw = res["targets"], res["sweep"]
    load1 = os.getloadavg()
    import sparsekit._C as _C

    print(f"\nmeasured copy bandwidth ({a.threads} threads, read+write): {copy_bw:.1f} GB/s")
    print(f"ISA path {_C.cpu_isa()}, {info.get('cpu_model')}"
          + (f"; median of {a.processes} processes" if a.processes > 1 else ""))
    print(f"{'target':<58} {'value':>7} {'need':>5} {'':>4} {'vs F.lin':>8} {'GB/s':>6} variant")
    for t in tg:
        vf = f"{t['vs_F.linear']:.2f}x" if t["vs_F.linear"] else "-"
        gb = f"{t['achieved_GBps']:.1f}" if t.get("achieved_GBps") else "-"
        verdict = "PASS" if t["pass"] else "MISS"
        spread = (" [" + " ".join(f"{v:.2f}" for v in t["per_process"]) + "]"
                  if "per_process" in t else "")
        print(f"{t['target']:<58} {t['value']:6.2f}x {t['need']:4.2f}x {verdict} {vf:>8} {gb:>6} "
              f"{t.get('variant') or ''}{spread}")
    for r in res["bsr_n1"] + res["bsr_small_batch"]:
        label = (f"{BSR_N1_SHAPE[0]}x{BSR_N1_SHAPE[1]} BSR {r['block']} 90% N={r['N']} "
                 "vs best dense")
        print(f"{label + ' (not a target)':<58} "
              f"{r['speedup_vs_best']:6.2f}x {r['vs_csr']:5.2f}x vs CSR {r['achieved_GBps']:6.1f} "
              f"{r['variant']}")
    meta: dict[str, Any] = {
        "benchmark": "bench_cpu", "argv": argv, "threads": a.threads, "machine": info,
        "copy_bandwidth_gbs": copy_bw, "load_avg_start": load0, "load_avg_end": load1,
        "clock": a.clock,
        "isa_path": _C.cpu_isa(), "cpu_model": info.get("cpu_model"),
        "machine_shared": H.others_loaded(load0, load1, a.threads),
        "plans": res["plans"], "processes": a.processes,
        "targets": tg, "bsr_n1": res["bsr_n1"], "bsr_small_batch": res["bsr_small_batch"],
        "dense": res["dense"],
        "method": "median wall time; weights rotating over > 2x LLC; baselines from this run"
                  + ("; each target's dense and sparse candidates timed round-robin"
                     if a.interleave else "")
                  + (f"; {a.processes} processes, each figure from the process with the median"
                     if a.processes > 1 else ""),
        "interleaved": a.interleave,
    }
    suffix = "-cputime" if a.clock == "cpu" else (f"-t{a.threads}" if a.threads != 2 else "")
    suffix += f"-{_C.cpu_isa()}"
    base = BL.write_results(a.name + suffix, sw, meta, a.out)
    plot(sw, base.with_suffix(".png"),
         f"sparsekit cpp (CSR fp32) vs fastest dense, 4096x4096, {a.threads} thread(s), "
         f"{a.clock} clock" + (f", median of {a.processes} processes" if a.processes > 1 else "")
         + f"\n{info.get('cpu_model', '')} load {load0[0]:.1f}")
    print(f"wrote {base}.json / .csv / .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
