"""Generate docs/performance.md (and README's headline table) from committed results JSON.

Every number in the performance docs comes from a file under ``benchmarks/results/`` or
``examples/results/``; this script renders them, so the docs never drift from the data.

Usage::

    .venv/bin/python benchmarks/make_performance_doc.py          # rewrite both files
    .venv/bin/python benchmarks/make_performance_doc.py --check  # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- performance-headline:begin -->", "<!-- performance-headline:end -->"
#: README headline rows: target ids of the bench_cpu run.
HEADLINE = ("N1-90-4096", "N1-70-4096", "N1-90-bf16-4096", "N1-90-11008", "N32-90", "N128-80",
            "BSR-N128-90")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _latest(pattern: str, pred=lambda d: True) -> tuple[Path, dict[str, Any]] | None:
    for p in sorted(RESULTS.glob(pattern), reverse=True):  # names end in a sortable date
        d = _load(p)
        if pred(d):
            return p, d
    return None


def _stamp(p: Path) -> str:
    """The YYYYMMDD-HHMM a result file's name ends in ('' when none)."""
    m = re.search(r"(\d{8}-\d{4})$", p.stem)
    return m.group(1) if m else ""


def _native_isa(d: dict[str, Any]) -> bool:
    """True when a bench_cpu run used the best ISA path its machine has (not a forced one)."""
    flags = d["machine"].get("isa_flags") or []
    best = "avx512" if "avx512f" in flags else ("avx2" if "avx2" in flags else "generic")
    isa = d.get("isa_path") or d["machine"].get("sparsekit", {}).get("cpp_isa")
    return isa == best


def _hugepages(m: dict[str, Any]) -> bool:
    """True when a run (its ``machine`` record) had its tensors of 2 MiB or more on huge pages
    (PyTorch's ``THP_MEM_ALLOC_ENABLE=1``, or the kernel's ``always`` mode): not the default
    set-up."""
    return (m.get("env", {}).get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")
            or m.get("transparent_hugepage") == "always")


def _latest_headline_run() -> tuple[Path, dict[str, Any]] | None:
    """The newest full wall-clock bench_cpu run at 2 threads on its machine's native ISA path,
    in the default memory set-up (no huge pages)."""
    for p in sorted(RESULTS.glob("cpu-*.json"), key=_stamp, reverse=True):
        d = _load(p)
        if (d.get("benchmark", "bench_cpu") == "bench_cpu" and d.get("clock") == "wall"
                and d.get("threads") == 2 and "--quick" not in d.get("argv", [])
                and _native_isa(d) and not _hugepages(d["machine"])):
            return p, d
    return None


def _no_dirs(text: str) -> str:
    """Drop directory names from paths: the docs must not carry one machine's layout."""
    return re.sub(r"(?:\.{0,2}/)?(?:[^\s/;()]+/)+(?=[^\s/;()]+)", "", text)


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def machine_line(m: dict[str, Any], threads: int, clock: str) -> str:
    isa = m.get("sparsekit", {}).get("cpp_isa", "?")
    llc = m.get("llc_bytes", 0) / 2**20
    versions = m.get("versions", {})
    return (f"{m.get('cpu_model', '?')} ({m.get('cpu_family_model', '?')}), "
            f"{m.get('cores_logical', '?')} logical CPUs, LLC {llc:.0f} MiB, sparsekit ISA path "
            f"{isa}; {threads} thread(s), {clock} clock; torch {versions.get('torch', '?')}; "
            f"copy bandwidth {m.get('copy_bandwidth_gbs', '?')} GB/s; "
            + ("tensors on huge pages; " if _hugepages(m) else "")
            + "load average "
            f"{[round(v, 1) for v in m.get('load_avg', [])]}")


def targets_table(d: dict[str, Any], ids: tuple[str, ...] | None = None) -> list[str]:
    """Rows of the run's targets. Runs measured in several processes (``--processes``) show the
    median process's figures and the range over all processes; runs with the read probe show,
    for the bandwidth fractions and the bf16 ratio, what a plain read of the same bytes reached
    in the same rounds (the floor for a call of that size) and, where the gather probe ran, the
    figure at the slower of that read and the kernel's x fetches alone (hardware gathers, or
    "assembled" where the probe assembled x from scalar loads as ``csr_spmv_assemble`` does)."""
    rows = [t for t in d["targets"] if ids is None or t["id"] in ids]
    spread = any("per_process" in t for t in rows)
    probe = any("read_fraction" in t or "read_ratio" in t for t in rows)
    gather = any("floor_fraction" in t or "floor_ratio" in t for t in rows)
    out = ["| case | sparse | fastest dense | speedup | vs F.linear |"
           + (" plain read of the same bytes |" if probe else "")
           + (" slower of read and x fetches alone |" if gather else "")
           + (" range over processes |" if spread else ""),
           "|---|---|---|---|---|" + ("---|" if probe else "") + ("---|" if gather else "")
           + ("---|" if spread else "")]
    for t in rows:
        dense = (f"{t['best_dense_ms']:.3f} ms ({t['best_dense']})" if t.get("best_dense_ms")
                 else "")
        vs_f = f"{t['vs_F.linear']:.2f}x" if t.get("vs_F.linear") else ""
        line = (f"| {t['target']} | {t['sparse_ms']:.3f} ms | {dense} | "
                f"**{t['value']:.2f}x** | {vs_f} |")
        if probe:
            bound = t.get("read_fraction", t.get("read_ratio"))
            line += f" {bound:.2f}x |" if bound is not None else " |"
        if gather:
            floor = t.get("floor_fraction", t.get("floor_ratio"))
            how = " (assembled)" if t.get("x_fetch") == "assemble" else ""
            line += f" {floor:.2f}x{how} |" if floor is not None else " |"
        if spread:
            pp = t.get("per_process") or [t["value"]]
            line += f" {min(pp):.2f}-{max(pp):.2f}x |"
        out.append(line)
    return out


def sweep_table(d: dict[str, Any]) -> list[str]:
    rows = [r for r in d["rows"] if r["M"] == 4096 and r["K"] == 4096]
    ns = sorted({r["N"] for r in rows})
    sps = sorted({r["sparsity"] for r in rows})
    val = {(r["sparsity"], r["N"]): r["speedup_vs_best"] for r in rows}
    out = ["| sparsity | " + " | ".join(f"N={n}" for n in ns) + " |",
           "|---|" + "---|" * len(ns)]
    for s in sps:
        out.append(f"| {100 * s:.0f}% | " + " | ".join(
            f"{val[(s, n)]:.2f}x" if (s, n) in val else "" for n in ns) + " |")
    return out


def bsr_table(d: dict[str, Any], key: str) -> list[str]:
    """BSR (90%, 4096x4096) per block shape, from the record's ``key`` (``bsr_n1``: N = 1;
    ``bsr_small_batch``: N = 8); no rows for runs that did not time it."""
    rows = d.get(key) or []
    if not rows:
        return []
    spread = any("per_process_speedup_vs_best" in r for r in rows)
    out = ["| block | vs best dense | vs CSR (fp32 values) | GB/s compressed | variant |"
           + (" processes |" if spread else ""),
           "|---|---|---|---|---|" + ("---|" if spread else "")]
    for r in rows:
        pp = r.get("per_process_speedup_vs_best")
        out.append(f"| {r['block']} | {r['speedup_vs_best']:.2f}x | {r['vs_csr']:.2f}x | "
                   f"{r['achieved_GBps']:.1f} | "
                   # "auto": no planned variant (BSR at N = 1 has one kernel, by block shape)
                   f"{'built-in' if r['variant'] == 'auto' else r['variant']} |"
                   + (f" {min(pp):.2f}-{max(pp):.2f}x |" if pp else (" |" if spread else "")))
    return out


def model_table(runs: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    out = ["| tokens per call | threads | layers sparse | best dense | dense ms | sparse ms "
           "| vs best dense | vs nn.Linear | file |", "|---|---|---|---|---|---|---|---|---|"]
    for p, d in runs:
        c, res = d["config"], d["results"]
        dense = res.get(f"dense:{d['best_dense']}", res.get("dense:nn.Linear"))["median_s"]
        sparse = res["sparse"]["median_s"]
        out.append(f"| {c['batch'] * c['seq']} | {c['threads']} | {d['layers_sparse']}/"
                   f"{d['layers_total']} | {d['best_dense']} | {1e3 * dense:.1f} | "
                   f"{1e3 * sparse:.1f} | **{d['speedup_vs_best_dense']:.2f}x** | "
                   f"{d['speedup_vs_nn_linear']:.2f}x | `{p.name}` |")
    return out


def mnist_table(r: dict[str, Any]) -> list[str]:
    out = ["| sparsity (fc1+fc2) | accuracy | vs dense twin | threads | batch | CSR speedup "
           "| tuned sparsify speedup |", "|---|---|---|---|---|---|---|"]
    for p in r["pruned"]:
        for t, by_batch in p["speedup_median"].items():
            for b, v in by_batch.items():
                tuned = p.get("tuned_speedup_median", {}).get(t, {}).get(b)
                out.append(f"| {p['pruned_layers_sparsity']:.2f} | {100 * p['accuracy']:.2f} % "
                           f"| {p['delta_vs_twin_points']:+.2f} pts | {t.removeprefix('threads')} "
                           f"| {b.removeprefix('batch')} | {v:.2f}x | "
                           + (f"{tuned:.2f}x" if tuned is not None else "") + " |")
    return out


#: Columns of the per-machine table: (target id, header).
MACHINE_COLS = (("N1-90-4096", "N=1 90%"), ("N1-70-4096", "N=1 70%"), ("N1-50-4096", "N=1 50%"),
                ("N1-90-bf16-vs-f32-4096", "bf16 vs fp32 values"),
                ("BW-N1-90-4096", "bytes/s vs dense read"), ("N32-90", "N=32 90%"),
                ("N128-80", "N=128 80%"), ("BSR-N128-90", "BSR N=128 90%"))


def machines_table(hugepages: bool = True) -> list[str]:
    """One row per (CPU, ISA path, huge pages or not): the newest wall-clock bench_cpu run of
    each; ``hugepages=False`` leaves out the runs made with tensors on huge pages."""
    newest: dict[tuple[str, str, bool], tuple[Path, dict[str, Any]]] = {}
    for p in sorted(RESULTS.glob("cpu-*.json")):
        d = _load(p)
        if d.get("benchmark", "bench_cpu") != "bench_cpu" or d.get("clock") != "wall":
            continue
        m = d["machine"]
        huge = _hugepages(m)
        if huge and not hugepages:
            continue
        isa = d.get("isa_path") or m.get("sparsekit", {}).get("cpp_isa", "?")
        cpu = f"{m.get('cpu_model', '?')} ({m.get('cpu_family_model', '?')})"
        newest[(cpu, isa, huge)] = (p, d)
    out = ["| CPU | ISA path | threads | " + " | ".join(h for _, h in MACHINE_COLS)
           + " | N=1 variant | file |", "|---|---|---|" + "---|" * len(MACHINE_COLS) + "---|---|"]
    for (cpu, isa, huge), (p, d) in sorted(newest.items()):
        by_id = {t["id"]: t for t in d["targets"]}
        cells = []
        for tid, _ in MACHINE_COLS:
            t = by_id.get(tid)
            cells.append("" if t is None else f"{t['value']:.2f}x" + ("" if t.get("pass", True)
                                                                      else " (miss)"))
        variant = by_id.get("N1-90-4096", {}).get("variant", "built-in")
        notes = []
        if "--quick" in d.get("argv", []):
            notes.append("quick")
        if d.get("machine_shared"):
            notes.append("shared machine")
        if huge:
            notes.append("tensors on huge pages")
        note = f" ({', '.join(notes)})" if notes else ""
        out.append(f"| {cpu} | {isa} | {d['threads']} | " + " | ".join(cells)
                   + f" | {variant} | `{p.name}`{note} |")
    return out


def render() -> tuple[str, str]:
    wall = _latest_headline_run()
    cpu = _latest("cpu-cputime-*.json")
    models = [x for x in (_latest("model-*-fp32.json", lambda d, s=s: d["config"]["seq"] == s)
                          for s in (1, 32, 128)) if x]
    mnist_path = ROOT / "examples" / "results" / "mnist_prune.json"
    doc = [
        "# Performance",
        "",
        "Generated by `benchmarks/make_performance_doc.py` from the committed results; rerun it "
        "after adding a result file. Every ratio compares against the **fastest dense "
        "formulation measured in the same run** (best of `F.linear`, `torch.matmul` on a "
        "pre-transposed weight, oneDNN-packed, MKL-packed and numpy/OpenBLAS); weights rotate "
        "over more than twice the last-level cache, so each call streams its weight from memory "
        "as in a model with many layers (`sparsekit.timing`). Medians; `bench_cpu` runs whose "
        "record says `interleaved` timed each target's dense and sparse candidates round-robin, "
        "one call each per round (numpy, whose OpenBLAS threads spin after each call, is timed "
        "alone in blocks alternating with the fastest of the others, also alone, where the "
        "record says `bracketed`, and carried into the rounds by that ratio; before, once "
        "after the rounds); runs with `--processes N` report each figure from the process "
        "with the median value (range over the processes in the last column), and the *plain "
        "read* column is what the read probe (the same bytes streamed as the kernel streams them, "
        "nothing computed) reached in the same rounds; where the gather probe ran (x fetched at "
        "every column id as the planned kernel fetches it, no values read: hardware gathers, or "
        "scalar-load assembly where the cell says *assembled*), the next column is the figure at "
        "the slower of that read and those x fetches alone, what a kernel overlapping the two "
        "perfectly would reach. What bounds each number "
        "is explained in [design.md](design.md#what-bounds-the-kernels).",
        "",
    ]
    headline = []
    if wall:
        p, d = wall
        doc += [f"## Layer kernels, `{_rel(p)}`", "",
                f"`python benchmarks/bench_cpu.py {' '.join(d.get('argv', []))}` on "
                + machine_line(d["machine"], d["threads"], d["clock"]) + ".", ""]
        doc += targets_table(d) + [""]
        doc += ["Speedup against the fastest dense path, 4096x4096 fp32 CSR, by sparsity and "
                "batch N (same run):", ""] + sweep_table(d) + [""]
        for key, timed in (("bsr_n1", "in the same rounds as the N = 1 targets"),
                           ("bsr_small_batch",
                            "in rounds of their own with the dense contenders and CSR")):
            bsr_rows = bsr_table(d, key)
            if bsr_rows:
                doc += [f"Block-sparse (BSR) at N = {d[key][0].get('N', 1)}, 4096x4096 at 90%, "
                        f"fp32 values, timed {timed} (recorded, not a target):", ""]
                doc += bsr_rows + [""]
        headline = [f"4096x4096 layer, C++ kernels, {d['threads']} threads, "
                    f"{d['machine'].get('cpu_model')} ({d['machine'].get('cores_logical')} "
                    f"logical CPUs, {d['machine'].get('sparsekit', {}).get('cpp_isa')}), from "
                    f"`{_rel(p)}`:", ""] + targets_table(d, HEADLINE)
    machines = machines_table()
    if len(machines) > 2:
        doc += ["## Machines measured", "",
                "The newest wall-clock `bench_cpu.py` run of each CPU and ISA path (force a path "
                "with `SPARSEKIT_ISA=avx2`); speedups against the fastest dense path of the same "
                "run, and the kernel variant the planner chose at N=1 (`built-in` for runs made "
                "before the planner existed; `<variant>@avx2`: the AVX2 build of that variant, "
                "which the planner also times on AVX-512 machines). Runs marked shared were "
                "taken while other jobs loaded the machine; runs marked huge pages were made "
                "with `THP_MEM_ALLOC_ENABLE=1` (PyTorch puts every tensor of 2 MiB or more, "
                "dense and sparse weights alike, on transparent huge pages).", ""]
        doc += machines + [""]
        headline += ["", "Every machine measured, with the kernel variant the planner chose "
                     "([docs/performance.md](docs/performance.md#machines-measured)):", ""]
        headline += machines_table(hugepages=False)
    if cpu:
        p, d = cpu
        doc += [f"## Same cases, 1 thread, CPU time, `{_rel(p)}`", "",
                f"`python benchmarks/bench_cpu.py {' '.join(d.get('argv', []))}` (per-thread CPU "
                "time: robust on a shared machine) on "
                + machine_line(d["machine"], d["threads"], d["clock"]) + ".", ""]
        doc += targets_table(d) + [""]
    if models:
        m = models[-1][1]["machine"]
        doc += ["## Whole model: a pruned BERT-base-sized stack", "",
                "`python benchmarks/bench_model.py` (12 layers, d=768, FFN 3072, 80 % "
                "unstructured sparsity, `sparsekit.sparsify` tuned at the call's token count) "
                "on " + machine_line(m, models[-1][1]["threads"], "wall") + ".", ""]
        doc += model_table(models) + [""]
    if mnist_path.exists():
        r = _load(mnist_path)
        doc += ["## The demo: LeNet-300-100 on MNIST", "",
                f"`python examples/mnist_prune.py {_no_dirs(' '.join(r.get('argv', [])))}`"
                f" ({_no_dirs(r['data_source'])}, {r['date_utc']}); dense accuracy "
                f"{100 * r['dense']['accuracy']:.2f} %, dense twin "
                f"{100 * r['dense_twin']['accuracy']:.2f} %. Speedups are whole-model latency "
                "against the dense model, same process"
                + ("; **the machine was oversubscribed during this run**"
                   if r.get("oversubscribed") else "") + ". `sparsify` is tuned at the "
                "batch size it is timed at. At batch 1 the two pruned layers (784x300, 300x100) "
                "take microseconds, so the per-call cost of a layer weighs as much as its "
                "bytes and the tuned model keeps a layer dense where the sparse call does not "
                "pay; with more rows per call the sparse product wins.", ""]
        doc += mnist_table(r) + [""]
    return "\n".join(doc).rstrip() + "\n", "\n".join(headline)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the files are out of date")
    args = ap.parse_args(argv)
    doc, headline = render()
    readme = README.read_text()
    if BEGIN in readme and END in readme:
        a, b = readme.index(BEGIN) + len(BEGIN), readme.index(END)
        readme = readme[:a] + "\n" + headline + "\n" + readme[b:]
    stale = DOC.read_text() != doc if DOC.exists() else True
    stale |= README.read_text() != readme
    if args.check:
        if stale:
            print("docs/performance.md or README.md is out of date: run "
                  "benchmarks/make_performance_doc.py", file=sys.stderr)
        return int(stale)
    DOC.write_text(doc)
    README.write_text(readme)
    print(f"wrote {_rel(DOC)} and the headline table of README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
