"""Output of ``sparsekit bench``: console tables, JSON, CSV and the speedup plot."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsekit.bench.common import OK, SCHEMA, UNAVAILABLE, UNSUPPORTED, WRONG
from sparsekit.bench.layer import DENSE_FAMILY, RECORD_KEYS, normalise

# Short words for non-OK statuses in table cells.
_STATUS_CELL = {WRONG: "WRONG", UNSUPPORTED: "n/s", UNAVAILABLE: "n/a", "error": "ERROR"}

#: Columns of the pivot (default) console table, before the per-contender columns.
PIVOT_COLUMNS = ("case", "dtype", "N", "format", "sparsity", "F.linear ms", "best dense")
#: Columns of ``--table long``.
LONG_COLUMNS = ("case", "dtype", "N", "format", "sparsity", "contender", "status", "median ms",
                "p10-p90 ms", "vs F.linear", "vs best dense")


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    ms = v * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


#: (p90 - p10) / median above which a time is flagged "~" (noisy: shared or throttled machine).
NOISY_SPREAD = 0.5


def _ms_flag(r: dict[str, Any]) -> str:
    sp = r.get("spread")
    return _ms(r.get("median_s")) + ("~" if sp is not None and sp > NOISY_SPREAD else "")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _case(r: dict[str, Any]) -> str:
    return str(r.get("model") or r.get("shape"))


def _sp(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_table(rows: list[list[str]], header: Sequence[str], *,
                 align_right: Sequence[int] = (), markdown: bool = False) -> str:
    """Plain-text (or GitHub markdown) table with a header rule; columns sized to fit."""
    if markdown:
        def md(row: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

        rule = ["---:" if j in align_right else "---" for j in range(len(header))]
        return "\n".join([md(header), "|" + "|".join(rule) + "|", *(md(r) for r in rows)])
    widths = [len(hd) for hd in header]
    for row in rows:
        for j, cell in enumerate(row):
            widths[j] = max(widths[j], len(cell))

    def fmt(row: Sequence[str]) -> str:
        parts = []
        for j, cell in enumerate(row):
            parts.append(cell.rjust(widths[j]) if j in align_right else cell.ljust(widths[j]))
        return "  ".join(parts).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _sort_key(r: dict[str, Any]) -> tuple:
    return (r["device"], _case(r), r["dtype"], r.get("format") or "", r.get("sparsity") or 0.0,
            r["batch"])


def dense_table(records: list[dict[str, Any]], *, markdown: bool = False) -> str:
    """One row per (case, dtype, N): every dense formulation's median time."""
    dense = [r for r in records if r["family"] == DENSE_FAMILY]
    if not dense:
        return ""
    names = list(dict.fromkeys(r["contender"] for r in dense))
    cells: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in dense:
        cells.setdefault((r["device"], _case(r), r["dtype"], r["batch"]), {})[r["contender"]] = r
    rows = []
    for (dev, case, dt, n), by in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                       kv[0][2], kv[0][3])):
        row = [case, dt, str(n)]
        best = None
        for name in names:
            r = by.get(name)
            if r is None:
                row.append("-")
            elif r["status"] == OK:
                row.append(_ms_flag(r))
                if best is None or r["median_s"] < best[1]:
                    best = (name, r["median_s"])
            else:
                row.append(_STATUS_CELL.get(r["status"], r["status"]))
        row.append(best[0].removeprefix("dense:") if best else "-")
        if dev != "cpu":
            row[0] = f"{case} [{dev}]"
        rows.append(row)
    header = ["case", "dtype", "N", *[n.removeprefix("dense:") + " ms" for n in names], "fastest"]
    return render_table(rows, header, align_right=range(2, 3 + len(names)), markdown=markdown)


def pivot_table(records: list[dict[str, Any]], *, markdown: bool = False) -> str:
    """One row per sparse cell; per contender ``time ms  vs-F.linear / vs-best-dense``."""
    sparse = [r for r in records if r["family"] != DENSE_FAMILY]
    if not sparse:
        return ""
    names = list(dict.fromkeys(r["contender"] for r in sparse))
    cells: dict[tuple, dict[str, dict[str, Any]]] = {}
    firsts: dict[tuple, dict[str, Any]] = {}
    for r in sorted(sparse, key=_sort_key):
        key = _sort_key(r)
        cells.setdefault(key, {})[r["contender"]] = r
        firsts.setdefault(key, r)
    rows = []
    for key, by in cells.items():
        r0 = firsts[key]
        case = _case(r0) + (f" [{r0['device']}]" if r0["device"] != "cpu" else "")
        best = r0.get("best_dense")
        row = [case, r0["dtype"], str(r0["batch"]), str(r0.get("format") or "-"),
               _sp(r0.get("sparsity")), _ms(r0.get("flinear_median_s")),
               f"{best.removeprefix('dense:')} {_ms(r0.get('best_dense_median_s'))}"
               if best else "-"]
        for name in names:
            r = by.get(name)
            if r is None:
                row.append("-")
            elif r["status"] == OK:
                row.append(f"{_ms_flag(r)} {_x(r.get('speedup_vs_flinear'))}/"
                           f"{_x(r.get('speedup_vs_best_dense'))}")
            else:
                row.append(_STATUS_CELL.get(r["status"], r["status"]))
        rows.append(row)
    header = [*PIVOT_COLUMNS, *names]
    return render_table(rows, header, align_right=(2, 4, 5), markdown=markdown)


def summary_table(records: list[dict[str, Any]], *, markdown: bool = False,
                  family: str = "sparsekit") -> str:
    """Rows (case, dtype, format, N), one column per sparsity: the fastest ``family`` contender's
    speedup vs the best dense formulation, with the backend that achieved it."""
    sparse = [r for r in records if r["family"] == family and r.get("sparsity") is not None]
    if not sparse:
        return ""
    sps = sorted({r["sparsity"] for r in sparse})
    cells: dict[tuple, dict[float, dict[str, Any] | None]] = {}
    dense: dict[tuple, tuple[str | None, float | None]] = {}
    for r in sparse:
        key = (r["device"], _case(r), r["dtype"], r.get("format") or "-", r["batch"])
        dense[key] = (r.get("best_dense"), r.get("best_dense_median_s"))
        row = cells.setdefault(key, {})
        cur = row.get(r["sparsity"])
        if r["status"] == OK and (cur is None or r["median_s"] < cur["median_s"]):
            row[r["sparsity"]] = r
        else:
            row.setdefault(r["sparsity"], None)
    rows = []
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        dev, case, dt, fmt, n = key
        name, t = dense[key]
        row = [case + (f" [{dev}]" if dev != "cpu" else ""), dt, fmt, str(n),
               f"{name.removeprefix('dense:')} {_ms(t)}" if name else "-"]
        for sp in sps:
            r = cells[key].get(sp)
            row.append("-" if r is None else
                       f"{_x(r.get('speedup_vs_best_dense'))} "
                       f"({r['contender'].split(':', 1)[-1]})")
        rows.append(row)
    header = ["case", "dtype", "format", "N", "best dense ms", *[f"{sp:.0%}" for sp in sps]]
    return render_table(rows, header, align_right=range(3, 5 + len(sps)), markdown=markdown)


def long_table(records: list[dict[str, Any]], *, markdown: bool = False) -> str:
    """One row per record with median, p10-p90 and both speedups."""
    rows = []
    for r in sorted(records, key=lambda r: (*_sort_key(r), r["family"] != DENSE_FAMILY,
                                            r["contender"])):
        ok = r["status"] == OK
        rows.append([
            _case(r), r["dtype"], str(r["batch"]), str(r.get("format") or "dense"),
            _sp(r.get("sparsity")), r["contender"], r["status"],
            _ms_flag(r) if ok else "-",
            f"{_ms(r.get('p10_s'))}-{_ms(r.get('p90_s'))}" if ok else "-",
            _x(r.get("speedup_vs_flinear")) if ok else "-",
            _x(r.get("speedup_vs_best_dense")) if ok else "-",
        ])
    return render_table(rows, LONG_COLUMNS, align_right=(2, 4, 7, 8, 9, 10), markdown=markdown)


def notes(records: list[dict[str, Any]]) -> str:
    """Footnotes: every distinct reason a contender was not timed."""
    seen: dict[tuple[str, str, str], None] = {}
    for r in records:
        if r["status"] != OK and r.get("message"):
            seen.setdefault((r["contender"], r["status"], r["message"]), None)
    if not seen:
        return ""
    lines = ["not timed:"]
    for c, s, m in seen:
        lines.append(f"  {c}: {s}: {m}")
    return "\n".join(lines)


def console_report(records: list[dict[str, Any]], *, table: str = "pivot",
                   machine: dict[str, Any] | None = None, markdown: bool = False) -> str:
    """Everything printed to stdout after a run (``markdown``: GitHub tables for docs)."""
    parts = []
    if machine:
        parts.append(machine_summary(machine))
    d = dense_table(records, markdown=markdown)
    sep = "\n\n" if markdown else "\n"
    if d:
        parts.append("Dense baselines (median ms; fastest formulation last)" + sep + d)
    if table == "long":
        parts.append(long_table(records, markdown=markdown))
    elif table == "summary":
        t = summary_table(records, markdown=markdown)
        if t:
            parts.append("Fastest sparsekit backend: speedup vs the fastest dense formulation, "
                         "by sparsity (>1 = faster)" + sep + t)
    else:
        p = pivot_table(records, markdown=markdown)
        if p:
            title = ("Sparse contenders: median ms, speedup vs F.linear / vs best dense "
                     "(>1 = faster; n/s = not supported, n/a = not built, WRONG = failed check; "
                     f"~ = noisy, p90-p10 > {NOISY_SPREAD:.0%} of the median)")
            parts.append(title + sep + p)
    n = notes(records)
    if n:
        parts.append(n if not markdown else "```\n" + n + "\n```")
    return "\n\n".join(parts) + "\n"


def machine_summary(m: dict[str, Any]) -> str:
    """Two-line description of the machine a run used."""
    sk = m.get("sparsekit") or {}
    bk = sk.get("backends") or {}
    v = m.get("versions") or {}
    llc = m.get("llc_bytes")
    bw = m.get("copy_bandwidth_gbs")
    return (
        f"{m.get('cpu_model')} ({m.get('cores_logical')} cpus, {m.get('num_threads')} threads, "
        f"LLC {llc / 2**20:.0f} MiB, copy {bw} GB/s, "
        f"load {', '.join(f'{x:.2f}' for x in (m.get('load_avg') or []))})"
        + (f", GPU {m['gpu'].get('name')}" if m.get("gpu") else "")
        + f"\ntorch {v.get('torch')}, numpy {v.get('numpy')}, scipy {v.get('scipy')}, "
        f"numba {v.get('numba')}; sparsekit {sk.get('version')} "
        f"backends {', '.join(f'{k}={val}' for k, val in bk.items()) or 'none'}; "
        f"{m.get('date_utc')}"
    ) if llc else str(m)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def make_document(mode: str, records: list[dict[str, Any]], *, config: dict[str, Any],
                  machine: dict[str, Any], argv: Sequence[str] | None = None,
                  elapsed_s: float | None = None) -> dict[str, Any]:
    """The JSON document written by ``--out``."""
    return {
        "schema": SCHEMA,
        "mode": mode,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "elapsed_s": elapsed_s,
        "config": config,
        "machine": machine,
        "results": normalise(records),
    }


def _check_writable(path: str | os.PathLike[str], arg: str) -> Path:
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{arg}: directory {str(parent)!r} does not exist (got {str(p)!r})")
    return p


def write_json(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the JSON document (indented, NaN-free)."""
    p = _check_writable(path, "--out")
    p.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


def write_csv(records: list[dict[str, Any]], path: str | os.PathLike[str],
              machine: dict[str, Any] | None = None) -> None:
    """One row per record, columns :data:`RECORD_KEYS` plus date/commit/cpu for provenance."""
    p = _check_writable(path, "--csv")
    extra = ("date_utc", "git_commit", "cpu_model")
    prov = {
        "date_utc": (machine or {}).get("date_utc"),
        "git_commit": ((machine or {}).get("git") or {}).get("commit"),
        "cpu_model": (machine or {}).get("cpu_model"),
    }
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*RECORD_KEYS, *extra])
        w.writeheader()
        for r in normalise(records):
            row = {k: ("" if v is None else v) for k, v in r.items()}
            if isinstance(r.get("blocksize"), list):
                row["blocksize"] = "x".join(str(v) for v in r["blocksize"])
            row.update({k: ("" if v is None else v) for k, v in prov.items()})
            w.writerow(row)


def load_json(path: str | os.PathLike[str], arg: str = "path") -> dict[str, Any]:
    """Read a benchmark JSON written by ``--out``, with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{arg}: expected an existing benchmark JSON file, got {str(p)!r}")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{arg}: {str(p)!r} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ValueError(f"{arg}: {str(p)!r} is not a sparsekit benchmark file (expected an "
                         f"object with a 'results' list, schema {SCHEMA!r})")
    return doc


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from None
    return plt


def plot_speedup(records: list[dict[str, Any]], path: str | os.PathLike[str], *,
                 title: str | None = None) -> None:
    """Speedup of the fastest sparsekit contender vs the best dense one, against sparsity.

    One panel per (device, case, dtype, format), one line per batch size, and the dense
    break-even (1.0) as a line.  Falls back to the fastest sparse contender of any library when
    no sparsekit backend ran.
    """
    p = _check_writable(path, "--plot")
    plt = _import_pyplot()
    from matplotlib import ticker

    sparse = [r for r in records if r["family"] != DENSE_FAMILY and r["status"] == OK
              and r.get("speedup_vs_best_dense") and r.get("sparsity") is not None]
    use = [r for r in sparse if r["family"] == "sparsekit"] or sparse
    which = "sparsekit (best backend)" if any(r["family"] == "sparsekit" for r in use) \
        else "best sparse contender"
    panels: dict[tuple, dict[int, dict[float, float]]] = {}
    for r in use:
        key = (r["device"], _case(r), r["dtype"], r.get("format"))
        best = panels.setdefault(key, {}).setdefault(r["batch"], {})
        s = r["sparsity"]
        best[s] = max(best.get(s, 0.0), r["speedup_vs_best_dense"])
    n = max(len(panels), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    if not panels:
        ax = axes.flat[0]
        ax.text(0.5, 0.5, "no successful sparse measurements", ha="center", va="center")
        ax.set_axis_off()
    for ax, (key, by_batch) in zip(axes.flat, sorted(panels.items())):
        dev, case, dt, fmt = key
        for batch in sorted(by_batch):
            pts = sorted(by_batch[batch].items())
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=f"N={batch}")
        ax.axhline(1.0, color="black", linewidth=1.2, linestyle="--", label="dense (best)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup vs best dense")
        ax.set_title(f"{case} {dt} {fmt}" + (f" [{dev}]" if dev != "cpu" else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"sparsekit: {which} vs fastest dense formulation", fontsize=10,
                 y=0.995)
    # fixed margins: tight_layout costs seconds per figure and the panels are uniform
    fig.subplots_adjust(left=0.08 if cols > 1 else 0.16, right=0.98, bottom=0.14 / rows + 0.02,
                        top=1 - 0.22 / rows, wspace=0.35, hspace=0.45)
    fig.savefig(p, dpi=110)
    plt.close(fig)
