"""Sparse vs dense ``linear`` on the CPU: every built sparsekit backend against dense
``F.linear``, the fastest dense formulation, torch sparse CSR and scipy.

Usage::

    python benchmarks/bench_linear.py --quick          # ~1-2 minutes, used by the README
    python benchmarks/bench_linear.py                  # full sweep
    python benchmarks/bench_linear.py --threads 2 --shapes 4096x4096 --batch 1 32

Method (sparsekit/bench/harness.py): median of repeated calls; every contender cycles through
enough weight copies to exceed 2x the last-level cache (read at run time), so weights come from
memory as in a model with many layers; all ratios come from the same run. The fastest dense
contender is the best of F.linear, torch.matmul, oneDNN (packed), MKL (packed) and
numpy/OpenBLAS. Writes benchmarks/results/<name>-<date>.json and .csv with machine info.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsekit.bench import harness as H
from sparsekit.formats import BSRMatrix, CSRMatrix
from sparsekit.kernels import require_compiled
from sparsekit.timing import measure_alternating

RESULTS = Path(__file__).resolve().parent / "results"
FULL_SHAPES = [(768, 3072), (4096, 4096), (11008, 4096)]
FULL_BATCH = [1, 8, 32, 128]
FULL_SPARSITY = [0.5, 0.7, 0.8, 0.9, 0.95]


def measure_cpu_time(fn, *, warmup: int = 3, min_reps: int = 10, min_time_s: float = 0.2,
                     max_reps: int = 10000) -> H.Stats:
    """Like ``harness.measure`` but on the calling thread's CPU time (``time.thread_time_ns``).

    Only meaningful single-threaded (every contender then runs on the calling thread). It
    excludes time the thread spends descheduled, so it stays usable on a loaded shared machine
    where wall-clock medians of multi-threaded runs are dominated by scheduler noise.
    """
    import time

    i = 0
    for _ in range(warmup):
        fn(i)
        i += 1
    samples: list[float] = []
    total = 0.0
    while (len(samples) < min_reps or total < min_time_s) and len(samples) < max_reps:
        t0 = time.thread_time_ns()
        fn(i)
        dt_s = (time.thread_time_ns() - t0) * 1e-9
        samples.append(dt_s)
        total += dt_s
        i += 1
    return H.Stats.from_samples(samples)


#: Timing function used by every contender (bench_cpu.py --clock cpu swaps in measure_cpu_time).
MEASURE = H.measure


# --------------------------------------------------------------------------- weights
def random_weight(M: int, K: int, sparsity: float, seed: int = 0,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
    """(M, K) fp32 weight with the given fraction of zeros (uniform random positions, or whole
    random blocks when ``block`` is given)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, K, generator=g)
    if block is None:
        mask = torch.rand(M, K, generator=g) >= sparsity
    else:
        r, c = block
        mb = torch.rand(-(-M // r), -(-K // c), generator=g) >= sparsity
        mask = mb.repeat_interleave(r, 0).repeat_interleave(c, 1)[:M, :K]
    return w * mask


def sparse_copies(mat: Any, n: int) -> list:
    """n independent copies (distinct memory) of a CSR/BSR matrix."""
    out = [mat]
    for _ in range(n - 1):
        if isinstance(mat, BSRMatrix):
            out.append(BSRMatrix._from_parts(mat.indptr.clone(), mat.indices.clone(),
                                             mat.values.clone(), mat.shape, mat.blocksize))
        else:
            out.append(CSRMatrix._from_parts(mat.indptr.clone(), mat.indices.clone(),
                                             mat.values.clone(), mat.shape))
    return out


def nbytes_of(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        if t.layout == torch.sparse_csr:
            return sum(a.numel() * a.element_size()
                       for a in (t.crow_indices(), t.col_indices(), t.values()))
        return t.numel() * t.element_size()
    return int(t.nbytes)


# --------------------------------------------------------------------------- contenders
def dense_rotating_fns(w: torch.Tensor, x: torch.Tensor) -> dict[str, Any]:
    """``{contender: fn(i)}``: every dense contender on rotating copies of w (over > 2x the
    LLC), call ``i`` using copy ``i % n``; x already has w's dtype."""
    n = H.rotation_count(nbytes_of(w))
    fns = H.dense_contenders([w] + [w.clone() for _ in range(n - 1)], batch_size=x.shape[0])
    return {name: (lambda i, f=f: f(x, i)) for name, f in fns.items()}


def sparsekit_rotating_fn(mat: Any, x: torch.Tensor, backend: str) -> Any:
    """``fn(i)``: ``backend``'s product with rotating copies of mat (over > 2x the LLC), after
    one warm call per copy (binds derived data, JIT-compiles, plans the kernel variants)."""
    return sparsekit_rotating_fns(mat, x, backend)[0]


def sparsekit_rotating_fns(mat: Any, x: torch.Tensor, backend: str, read_probe: bool = False,
                           gather_probe: bool = False) -> tuple[Any, Any, Any]:
    """``(fn, read, gather)``: ``fn`` as :func:`sparsekit_rotating_fn`; with ``read_probe``
    (cpp backend, float CSR) ``read(i)`` runs the C++ read probe (``BoundMatrix.read_probe``:
    the matrix's value and index bytes streamed as the N = 1 kernels stream them, nothing
    computed) over the same copies half a rotation away from ``fn``'s, so neither finds the
    other's bytes in cache; with ``gather_probe`` (fp32 x, N = 1) ``gather(i)`` runs the gather
    probe (``BoundMatrix.gather_probe``: x fetched at every column id as the planned N = 1
    kernel fetches it, with its ISA build: hardware gathers, or scalar-load assembly for
    ``csr_spmv_assemble``; the index stream read, no values) over the copies a third of a
    rotation away. Each is None when not asked for."""
    from sparsekit.kernels import get_backend

    be = get_backend(backend)
    mats = sparse_copies(mat, H.rotation_count(mat.nbytes))
    out = torch.empty(x.shape[0], mat.shape[0], dtype=x.dtype)
    for m in mats:
        be.linear(m, x, None, out)
    n = len(mats)
    read = gather = None
    if read_probe or gather_probe:
        from sparsekit.kernels.cpp import bound_matrix
        from sparsekit.threads import get_num_threads

        bms = [bound_matrix(m) for m in mats]
        probe_out = torch.empty(mat.shape[0])
        x32 = x.float().contiguous()
        half, third = n // 2, n // 3
        # the copies share one plan (the planner keys by matrix class), so one lookup serves all
        fetch, isa_code = probe_fetch(mats[0]) if gather_probe else ("gather", -1)

        # probe_out and x are bound as defaults so they live as long as the functions using them
        def read(i: int, probe_out: torch.Tensor = probe_out) -> None:
            bms[(i + half) % n].read_probe(probe_out.data_ptr(), get_num_threads())

        def gather(i: int, probe_out: torch.Tensor = probe_out, x32: torch.Tensor = x32) -> None:
            bms[(i + third) % n].gather_probe(x32.data_ptr(), probe_out.data_ptr(),
                                              get_num_threads(), isa_code, fetch)

        read = read if read_probe else None
        gather = gather if gather_probe else None
    return (lambda i: be.linear(mats[i % n], x, None, out)), read, gather


def x_fetch(variant: str) -> str:
    """How the N = 1 kernel ``variant`` (a planned name as ``CppBackend.variant`` gives it,
    optionally ``@<isa>``) fetches x: ``"assemble"`` for ``csr_spmv_assemble``, else
    ``"gather"``."""
    return "assemble" if variant.partition("@")[0] == "csr_spmv_assemble" else "gather"


def probe_fetch(mat: Any) -> tuple[str, int]:
    """``(fetch, isa_code)`` for ``BoundMatrix.gather_probe``: how the N = 1 plan of ``mat``
    fetches x (:func:`x_fetch`) and the ISA build it runs (-1: the matrix's own)."""
    from sparsekit.kernels import get_backend
    from sparsekit.kernels.planner import _ISA_CODE

    variant = get_backend("cpp").variant(mat, 1)
    isa = variant.partition("@")[2]
    return x_fetch(variant), _ISA_CODE[isa] if isa else -1


def bracket_alone(fn: Any, ref_fn: Any, *, blocks: int, settle_s: float,
                  **measure_kwargs: Any) -> dict[str, Any]:
    """``fn`` against ``ref_fn`` (each ``f(i)``), both timed alone in ``blocks`` alternating
    blocks, each after ``settle_s`` idle seconds (:func:`sparsekit.timing.measure_alternating`
    with ``measure_kwargs``): neither inherits the other's spinning threads, and each pair of
    blocks is timed seconds apart on a drifting machine. ``{"ratio": the median block-to-block
    time ratio fn / ref_fn, "block_ratios", "alone_s": the median of fn's block medians}``."""
    st = measure_alternating({"alone": fn, "ref": ref_fn}, blocks=blocks, settle_s=settle_s,
                             **measure_kwargs)
    ratios = [a.median_s / r.median_s for a, r in zip(st["alone"], st["ref"])]
    return {"ratio": float(statistics.median(ratios)), "block_ratios": ratios,
            "alone_s": statistics.median(b.median_s for b in st["alone"])}


def dense_stats(w: torch.Tensor, x: torch.Tensor, min_time: float) -> dict[str, H.Stats]:
    """All dense contenders on rotating copies of w; x already has w's dtype."""
    return {name: MEASURE(fn, min_time_s=min_time)
            for name, fn in dense_rotating_fns(w, x).items()}


def sparsekit_stats(mat: Any, x: torch.Tensor, backend: str, min_time: float) -> H.Stats:
    return MEASURE(sparsekit_rotating_fn(mat, x, backend), min_time_s=min_time)


def torch_csr_stats(w: torch.Tensor, x: torch.Tensor, min_time: float) -> H.Stats:
    """torch sparse CSR (int32 indices), y = (W @ x.T).T as the docs recommend for CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = w.to_sparse_csr()
        t = torch.sparse_csr_tensor(t.crow_indices().to(torch.int32),
                                    t.col_indices().to(torch.int32), t.values(), t.shape)
    n = H.rotation_count(nbytes_of(t))
    ts = [t] + [torch.sparse_csr_tensor(t.crow_indices().clone(), t.col_indices().clone(),
                                        t.values().clone(), t.shape) for _ in range(n - 1)]
    xt = x.t()
    return MEASURE(lambda i: torch.mm(ts[i % n], xt).t(), min_time_s=min_time)


def scipy_stats(w: torch.Tensor, x: torch.Tensor, min_time: float) -> H.Stats:
    import scipy.sparse as sp

    a = sp.csr_matrix(w.numpy())
    n = H.rotation_count(nbytes_of(a.data) + nbytes_of(a.indices) + nbytes_of(a.indptr))
    mats = [a] + [a.copy() for _ in range(n - 1)]
    xt = np.ascontiguousarray(x.numpy().T)
    return MEASURE(lambda i: mats[i % n] @ xt, min_time_s=min_time)


# --------------------------------------------------------------------------- driver
def run(shapes, batches, sparsities, backends, threads, min_time, with_scipy=True,
        with_torch_csr=True, log=print) -> list[dict]:
    rows: list[dict] = []
    with H.threads_for_all(threads):
        for M, K in shapes:
            w_dense = random_weight(M, K, 0.0, seed=1)
            for N in batches:
                x = torch.randn(N, K, generator=torch.Generator().manual_seed(2))
                ds = dense_stats(w_dense, x, min_time)
                best_name, best = H.best_dense(ds)
                fl = ds["F.linear"]
                for s in sparsities:
                    w = random_weight(M, K, s, seed=3)
                    mat = CSRMatrix.from_dense(w)
                    row: dict[str, Any] = dict(
                        M=M, K=K, N=N, sparsity=s, nnz=mat.nnz, sparse_bytes=mat.nbytes,
                        dense_bytes=M * K * 4, threads=threads, dense_F_linear_ms=fl.median_s * 1e3,
                        dense_best=best_name, dense_best_ms=best.median_s * 1e3,
                        dense_all_ms={k: v.median_s * 1e3 for k, v in ds.items()},
                    )
                    for b in backends:
                        st = sparsekit_stats(mat, x, b, min_time)
                        row[f"{b}_ms"] = st.median_s * 1e3
                        row[f"{b}_p10_ms"] = st.p10_s * 1e3
                        row[f"{b}_p90_ms"] = st.p90_s * 1e3
                    if with_torch_csr:
                        row["torch_csr_ms"] = torch_csr_stats(w, x, min_time).median_s * 1e3
                    if with_scipy:
                        row["scipy_ms"] = scipy_stats(w, x, min_time).median_s * 1e3
                    for key in [f"{b}_ms" for b in backends] + ["torch_csr_ms", "scipy_ms"]:
                        if key in row:
                            name = key[:-3]
                            row[f"speedup_{name}_vs_best"] = row["dense_best_ms"] / row[key]
                            row[f"speedup_{name}_vs_F.linear"] = row["dense_F_linear_ms"] / row[key]
                    rows.append(row)
                    log(format_row(row, backends))
                del ds
    return rows


def format_header(backends) -> str:
    cols = (["shape", "N", "sp", "F.linear", "best dense"] + [f"{b}" for b in backends]
            + ["torch CSR", "scipy"] + [f"x{b}/best" for b in backends]
            + [f"x{b}/F.lin" for b in backends])
    return " | ".join(f"{c:>11}" for c in cols)


def format_row(r: dict, backends) -> str:
    def ms(k):
        return f"{r[k]:9.3f}ms" if k in r else f"{'-':>11}"

    vals = [f"{r['M']}x{r['K']}", str(r["N"]), f"{r['sparsity']:.2f}", ms("dense_F_linear_ms"),
            f"{r['dense_best_ms']:7.3f}ms {r['dense_best'][:6]}"[:11]]
    vals += [ms(f"{b}_ms") for b in backends] + [ms("torch_csr_ms"), ms("scipy_ms")]
    vals += [f"{r[f'speedup_{b}_vs_best']:.2f}x" for b in backends]
    vals += [f"{r[f'speedup_{b}_vs_F.linear']:.2f}x" for b in backends]
    return " | ".join(f"{v:>11}" for v in vals)


def write_results(name: str, rows: list[dict], meta: dict, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    base = out_dir / f"{name}-{stamp}"
    with open(base.with_suffix(".json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1, default=str)
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows]
    if flat:
        keys = sorted({k for r in flat for k in r}, key=lambda k: list(flat[0]).index(k)
                      if k in flat[0] else 999)
        with open(base.with_suffix(".csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(flat)
    return base


def main(argv=None) -> int:
    H.reexec_without_openblas_overrides()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subset (~1-2 min)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every contender")
    ap.add_argument("--shapes", nargs="*", default=None, help="MxK, e.g. 4096x4096")
    ap.add_argument("--batch", nargs="*", type=int, default=None)
    ap.add_argument("--sparsity", nargs="*", type=float, default=None)
    ap.add_argument("--backends", nargs="*", default=None,
                    help="sparsekit backends (default: all CPU ones)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--no-scipy", action="store_true")
    ap.add_argument("--name", default="linear")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: single-threaded, per-thread CPU time (robust on a loaded machine)")
    a = ap.parse_args(argv)
    require_compiled("bench_linear")
    global MEASURE
    if a.clock == "cpu":
        a.threads = 1
        MEASURE = measure_cpu_time
    from sparsekit.kernels import backends as available

    avail = available()
    be = a.backends or [b for b in ("cpp", "numba") if b in avail]
    if a.quick:
        shapes, batches, sps, min_time = [(4096, 4096)], [1, 32], [0.5, 0.9], 0.15
    else:
        shapes, batches, sps, min_time = FULL_SHAPES, FULL_BATCH, FULL_SPARSITY, 0.3
    if a.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
    batches = a.batch or batches
    sps = a.sparsity or sps
    min_time = a.min_time or min_time
    threads = a.threads or len(os.sched_getaffinity(0))
    meta = {"benchmark": "bench_linear", "argv": sys.argv[1:], "quick": a.quick, "clock": a.clock,
            "machine": H.machine_info(threads), "backends": {b: avail.get(b) for b in be},
            "method": "median wall time, weights rotating over > 2x LLC, same-run baselines"}
    print(f"threads={threads} backends={be} load={os.getloadavg()}")
    print(format_header(be))
    rows = run(shapes, batches, sps, be, threads, min_time, with_scipy=not a.no_scipy)
    meta["load_avg_end"] = os.getloadavg()
    name = a.name + ("-quick" if a.quick else "") + ("-cputime" if a.clock == "cpu" else "")
    base = write_results(name, rows, meta, a.out)
    print(f"wrote {base}.json / .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
