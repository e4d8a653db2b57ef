"""``sparsekit bench compare a.json b.json``: diff two benchmark runs and flag regressions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsekit.bench.common import OK
from sparsekit.bench.report import render_table

#: Record fields identifying the same measurement in two runs.
MATCH_KEYS = ("mode", "device", "dtype", "shape", "model", "batch", "sparsity", "format",
              "contender")
METRICS = ("median_s", "speedup_vs_best_dense", "speedup_vs_flinear")


@dataclass
class Change:
    """One matched measurement in both runs."""

    key: tuple
    old: dict[str, Any]
    new: dict[str, Any]
    ratio: float | None  # new/old slowdown factor (> 1 = slower); None if not comparable
    kind: str  # "regression" | "improvement" | "same" | "status"


def _key(r: dict[str, Any]) -> tuple:
    return tuple(r.get(k) for k in MATCH_KEYS)


def compare_runs(old: dict[str, Any], new: dict[str, Any], *, threshold: float = 0.10,
                 metric: str = "median_s") -> tuple[list[Change], list[tuple], list[tuple]]:
    """Match records of two runs and classify each pair.

    Parameters
    ----------
    old, new : dict
        Benchmark documents (``--out`` JSON).
    threshold : float
        Relative change treated as noise: ``new`` is a regression when it is more than
        ``threshold`` slower (``median_s``) or has a speedup smaller by more than ``threshold``.
    metric : {"median_s", "speedup_vs_best_dense", "speedup_vs_flinear"}
        What to compare.  Speedups are ratios within one run, so they are the fairer choice
        when the two runs come from different machines or loads.

    Returns
    -------
    (changes, only_old, only_new)
        A status change from "ok" to anything else is a regression too.
    """
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"threshold: expected a number >= 0, got {threshold!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    a = {_key(r): r for r in old["results"]}
    b = {_key(r): r for r in new["results"]}
    changes: list[Change] = []
    for key in a.keys() & b.keys():
        ra, rb = a[key], b[key]
        sa, sb = ra.get("status"), rb.get("status")
        if sa == OK and sb != OK:
            changes.append(Change(key, ra, rb, None, "status"))
            continue
        va, vb = ra.get(metric), rb.get(metric)
        if sa != OK or sb != OK or not va or not vb:
            kind = "improvement" if (sa != OK and sb == OK) else "same"
            changes.append(Change(key, ra, rb, None, kind))
            continue
        # express as a slowdown factor: > 1 means new is worse
        ratio = (vb / va) if metric == "median_s" else (va / vb)
        if ratio > 1.0 + threshold:
            kind = "regression"
        elif ratio < 1.0 / (1.0 + threshold):
            kind = "improvement"
        else:
            kind = "same"
        changes.append(Change(key, ra, rb, ratio, kind))
    changes.sort(key=lambda c: tuple(str(v) for v in c.key))
    only_old = sorted((k for k in a.keys() - b.keys()), key=lambda k: tuple(map(str, k)))
    only_new = sorted((k for k in b.keys() - a.keys()), key=lambda k: tuple(map(str, k)))
    return changes, only_old, only_new


def _label(key: tuple) -> str:
    d = dict(zip(MATCH_KEYS, key))
    case = d.get("model") or d.get("shape")
    sp = "" if d.get("sparsity") is None else f" s={d['sparsity']:.2f}"
    fmt = "" if not d.get("format") else f" {d['format']}"
    dev = "" if d.get("device") == "cpu" else f" [{d.get('device')}]"
    return f"{case}{dev} {d.get('dtype')} N={d.get('batch')}{fmt}{sp} {d.get('contender')}"


def format_comparison(changes: list[Change], only_old: list[tuple], only_new: list[tuple], *,
                      metric: str, threshold: float, show_all: bool = False) -> str:
    """Human-readable comparison; regressions first."""
    order = {"regression": 0, "status": 0, "improvement": 1, "same": 2}
    shown = [c for c in changes if show_all or c.kind != "same"]
    shown.sort(key=lambda c: (order[c.kind], -(c.ratio or 0)))
    rows = []
    for c in shown:
        def val(r: dict[str, Any]) -> str:
            if r.get("status") != OK:
                return str(r.get("status"))
            v = r.get(metric)
            if v is None:
                return "-"
            return f"{v * 1e3:.3f} ms" if metric == "median_s" else f"{v:.2f}x"

        rows.append([c.kind.upper() if c.kind in ("regression", "status") else c.kind,
                     _label(c.key), val(c.old), val(c.new),
                     "-" if c.ratio is None else f"{c.ratio:.2f}"])
    n_reg = sum(c.kind in ("regression", "status") for c in changes)
    n_imp = sum(c.kind == "improvement" for c in changes)
    head = (f"compared {len(changes)} measurements on {metric} (threshold {threshold:.0%}): "
            f"{n_reg} regression(s), {n_imp} improvement(s), "
            f"{len(changes) - n_reg - n_imp} within threshold; "
            f"{len(only_old)} only in old, {len(only_new)} only in new")
    out = [head]
    if rows:
        out.append(render_table(rows, ["change", "measurement", "old", "new", "slowdown"],
                                align_right=(2, 3, 4)))
    return "\n".join(out) + "\n"
