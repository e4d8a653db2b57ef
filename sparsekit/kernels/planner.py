"""Kernel planner for the C++ CPU backend: measure the candidate kernel variants, keep the winner.

The compiled extension has several real variants per kernel family and batch class (hardware
gather vs scalar-load assembly of ``x`` for SpMV, packed-tile widths for 16 vs 32 vector
registers, ...; :func:`variants` lists them, ``csrc/cpu/variants.h`` defines them). Which is
fastest depends on the core: hardware gathers are fast on recent Intel cores and microcoded on
AMD Zen 2/3. As FFTW's wisdom and LIBXSMM's dispatch do, the first call for a *plan key*

    (CPU model, ISA, format + block shape, value dtype, index dtype, shape class, batch class,
     threads, cache mode)

times each candidate a few times on the actual matrix and remembers the fastest: in process,
and, opt-in, in a wisdom JSON file. On an AVX-512 machine the candidates include the AVX2 build
of each variant, named ``<variant>@avx2``: the ISA level a core supports does not say which build
is faster (on the Xeon of docs/kernels.md the AVX2 build of ``csr_spmv_gather`` ran fp32
SpMV 8-25% faster than the AVX-512 one). Matrices with the same key (e.g. the 72 equally shaped
layers of a transformer) share one measurement.

Environment
-----------
``SPARSEKIT_KERNEL``
    Comma-separated variant names to force (e.g. ``csr_spmv_assemble``, or
    ``csr_spmv_gather@avx2`` for the build of a lower ISA than the machine's). A forced variant is
    used for every call it applies to, without planning; calls it does not apply to use the
    built-in choice. An unknown name raises ``ValueError`` listing the valid ones.
``SPARSEKIT_PLAN``
    ``0`` / ``off``: no planning, always the built-in choice (``auto``).
``SPARSEKIT_PLAN_BUDGET_MS``
    Time budget for measuring one key (default 20 ms). Every candidate runs at least twice;
    those within 10% of the fastest then run at least six times, more while the budget lasts,
    so a key whose single call is slower than the budget costs about ``2 x candidates + 4 x
    contenders`` calls.
``SPARSEKIT_PLAN_CACHE``
    ``cold`` (default): before each timed call the matrix is flushed out of the caches, so the
    candidates are compared on weights read from memory, as a model's layers are on every
    forward pass (a matrix timed over and over otherwise stays in a large last-level cache, and
    which variant wins can differ between the two). ``warm``: time it cache-resident (for
    models whose weights all fit in the last-level cache).
``SPARSEKIT_WISDOM``
    Path of the wisdom file, or ``1`` / ``user`` for ``<user cache dir>/sparsekit/wisdom.json``
    (``$XDG_CACHE_HOME`` or ``~/.cache``). Unset (default): plans live only in the process.
    A file that is not valid wisdom, or was written on another CPU model, is ignored with a
    warning (and not overwritten).

Cost: planning one key runs ``sum over candidates`` of a few kernel calls, bounded by the
budget above; :func:`plan` reports it (``cost_s``). ``sparsekit.warmup`` (which calls each
module at each batch size) and :func:`plan` let a server pay it before its first request.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sparsekit._cpuinfo import cpu_key

__all__ = [
    "Plan", "plan", "variants", "variant_table", "plans", "forced_variants", "wisdom_path",
    "clear", "n_class_name", "N_CLASSES", "plan_cache_mode", "bound_candidates", "split_name",
]

_C: Any = None
try:
    _C = importlib.import_module("sparsekit._C")
    if not hasattr(_C, "cpu_variants"):
        _C = None
except Exception:  # the cpp backend reports why; without it there is nothing to plan
    _C = None

#: Batch classes of :meth:`BoundMatrix.n_class` (index = class id).
N_CLASSES = ("1", "2", "3-8", "9-32", "33+")
_CLASS_N = (1, 2, 8, 32, 128)  # batch size timed for each class
# Variants equal to the built-in choice (variant "auto") of their class, and the margin by
# which another candidate must beat them to be chosen.
_INCUMBENTS = ("csr_spmv_gather", "csr_tile_v4", "csrq_rows2")
_ISA_CODE = {"generic": 0, "avx2": 1, "avx512": 2}  # cpu_features.h, Isa
# ISA builds below a matrix's ISA whose variants are candidates too (the generic build's are
# scalar fallbacks, never faster where a SIMD build runs).
_LOWER_BUILDS = {"avx512": ("avx2",)}
_MARGIN = 0.03
#: Extra alternating calls of the two fastest candidates when the budget allowed fewer than
#: this many + 2 rounds (long calls: two samples each; docs/kernels.md, "Planner").
_CONFIRM_ROUNDS = 3
#: After two rounds only candidates within this fraction of the fastest, and the built-in
#: choice, are timed further, to at least _CONTENDER_ROUNDS calls each (more while the budget
#: lasts).
_RACE_KEEP = 0.10
_CONTENDER_ROUNDS = 6
_WISDOM_FORMAT = "sparsekit-wisdom"
_WISDOM_VERSION = 1


def split_name(name: str) -> tuple[str, str | None]:
    """``"csr_spmv_gather@avx2"`` -> ``("csr_spmv_gather", "avx2")``; no ``@``: ISA None (the
    matrix's own)."""
    base, _, isa = name.partition("@")
    return base, (isa or None)


_lock = threading.RLock()
_plans: dict[str, Plan] = {}
_wisdom_loaded_from: str | None = None
_wisdom_foreign = False


def n_class_name(n: int) -> str:
    """Name of the batch class of ``n`` (``"1"``, ``"2"``, ``"3-8"``, ``"9-32"``, ``"33+"``)."""
    return N_CLASSES[_n_class(n)]


def _n_class(n: int) -> int:
    return 0 if n <= 1 else 1 if n == 2 else 2 if n <= 8 else 3 if n <= 32 else 4


@dataclass
class Plan:
    """The outcome of planning one key.

    Attributes
    ----------
    key : str
        The plan key (see the module docstring).
    variant : str
        The chosen variant's name (``"auto"`` when nothing was measured).
    source : str
        ``"measured"``, ``"cached"`` (measured earlier in this process for the same key),
        ``"wisdom"`` (read from the wisdom file), ``"forced"``
        (``SPARSEKIT_KERNEL``), ``"off"`` (``SPARSEKIT_PLAN=0``) or ``"single"`` (one candidate).
    times_us : dict
        Best time per candidate in microseconds (measured plans only).
    cost_s : float
        Wall time spent measuring (0 unless measured now).
    """

    key: str
    variant: str
    source: str
    times_us: dict[str, float] = field(default_factory=dict)
    cost_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def variants() -> list[dict[str, Any]]:
    """The table of CPU kernel variants compiled into the extension.

    Returns
    -------
    list of dict
        One dict per variant: ``id, name, family ("csr" / "bsr" / "csrq" / "" for auto),
        n_min, n_max (batch sizes it applies to; None = unbounded), isas (built for), dtypes,
        summary, cpu_features (needed beyond the ISA level, "" when none), available (this CPU
        has them)``. Empty when the extension is not built.
    """
    return list(_C.cpu_variants()) if _C is not None else []


def variant_table() -> str:
    """:func:`variants` as a fixed-width text table (for ``sparsekit info`` and docs)."""
    rows = [("name", "family", "N", "ISAs", "dtypes", "what differs")]
    for v in variants():
        n = f"{v['n_min']}+" if v["n_max"] is None else f"{v['n_min']}-{v['n_max']}"
        isas = ",".join(v["isas"]) + ("" if v["available"] else f" (no {v['cpu_features']} here)")
        rows.append((v["name"], v["family"] or "any", n, isas, v["dtypes"], v["summary"]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows
    )


def _by_name() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in variants()}


def forced_variants() -> list[str]:
    """Variant names forced by ``SPARSEKIT_KERNEL`` (empty when unset).

    Raises
    ------
    ValueError
        If a name is not a variant of this build (the message lists the valid names).
    """
    raw = os.environ.get("SPARSEKIT_KERNEL", "").strip()
    if not raw:
        return []
    names = [s.strip() for s in raw.split(",") if s.strip()]
    known = _by_name()
    for n in names:
        base, isa = split_name(n)
        if base not in known or (isa is not None and isa not in _ISA_CODE):
            raise ValueError(
                f"SPARSEKIT_KERNEL: expected comma-separated variant names from "
                f"{sorted(known)}, each optionally followed by @<isa> ({', '.join(_ISA_CODE)}), "
                f"got {n!r}"
            )
    return names


def _planning_enabled() -> bool:
    return os.environ.get("SPARSEKIT_PLAN", "1").strip().lower() not in ("0", "off", "false", "no")


def plan_cache_mode() -> str:
    """``"cold"`` or ``"warm"``: how the planner times candidates (``SPARSEKIT_PLAN_CACHE``)."""
    raw = os.environ.get("SPARSEKIT_PLAN_CACHE", "cold").strip().lower() or "cold"
    if raw not in ("cold", "warm"):
        raise ValueError(f"SPARSEKIT_PLAN_CACHE: expected 'cold' or 'warm', got {raw!r}")
    return raw


def _budget_s() -> float:
    raw = os.environ.get("SPARSEKIT_PLAN_BUDGET_MS", "20")
    try:
        ms = float(raw)
    except ValueError:
        raise ValueError(
            f"SPARSEKIT_PLAN_BUDGET_MS: expected a number of ms, got {raw!r}") from None
    if not (ms >= 0 and math.isfinite(ms)):
        raise ValueError(f"SPARSEKIT_PLAN_BUDGET_MS: expected a finite number >= 0, got {raw!r}")
    return ms / 1e3


def wisdom_path() -> str | None:
    """The wisdom file in use (``SPARSEKIT_WISDOM``), or None when wisdom is off."""
    raw = os.environ.get("SPARSEKIT_WISDOM", "").strip()
    if not raw or raw.lower() in ("0", "off", "false", "no"):
        return None
    if raw.lower() in ("1", "on", "true", "yes", "user"):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "sparsekit", "wisdom.json")
    return raw


def cpu_model() -> str:
    """CPU model string used in plan keys (model name + family/model numbers)."""
    return cpu_key()


def _shape_class(mat: Any, nnz: int) -> str:
    m, k = mat.shape
    dens = nnz * (mat.blocksize[0] * mat.blocksize[1] if hasattr(mat, "blocksize") else 1)
    dens = dens / max(1, m * k)
    # log2 size buckets and 10% density steps: matrices in one class behave alike
    return (f"M2^{max(0, math.ceil(math.log2(max(1, m))))}"
            f".K2^{max(0, math.ceil(math.log2(max(1, k))))}.d{min(10, round(dens * 10))}")


def _key(mat: Any, bound: Any, n: int, threads: int) -> str:
    fmt = f"bsr{mat.blocksize[0]}x{mat.blocksize[1]}" if bound.is_bsr else bound.family
    return "|".join([
        cpu_model(), bound.isa, fmt, str(mat.values.dtype).replace("torch.", ""),
        str(mat.indices.dtype).replace("torch.", ""), _shape_class(mat, bound.nnz),
        "N" + N_CLASSES[_n_class(n)], f"t{threads}", plan_cache_mode(),
    ])


def candidates(family: str, n: int, isa: str) -> list[str]:
    """Variant names that apply to a ``family`` (``"csr"`` / ``"bsr"`` / ``"csrq"``) call with
    batch ``n`` on ``isa`` and that this CPU can run (``"auto"`` excluded)."""
    out = []
    for v in variants():
        if v["family"] != family or isa not in v["isas"] or not v["available"]:
            continue
        if n >= v["n_min"] and (v["n_max"] is None or n <= v["n_max"]):
            out.append(v["name"])
    return out


_DTYPE_CODE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16",
               torch.int8: "i8"}


def bound_candidates(family: str, n: int, isa: str) -> list[str]:
    """:func:`candidates` on ``isa``, then those of the lower ISA builds timed with it
    (``<variant>@<isa>``)."""
    out = candidates(family, n, isa)
    for low in _LOWER_BUILDS.get(isa, ()):
        out += [f"{c}@{low}" for c in candidates(family, n, low)]
    return out


def _takes(name: str, mat: Any) -> bool:
    """Whether variant ``name`` reads ``mat``'s value dtype (and, for the ``csrq_bitmap``
    variants, which locate values by an occupancy bitmap, plain rather than gap-coded indices)."""
    name = split_name(name)[0]
    v = _by_name()[name]
    if _DTYPE_CODE.get(mat.values.dtype) not in v["dtypes"].split(","):
        return False
    return not name.startswith("csrq_bitmap") or mat.indices.dtype != torch.uint8


# ---- wisdom file --------------------------------------------------------------------------
def _load_wisdom() -> None:
    """Merge the wisdom file into the in-process plans (once per path)."""
    global _wisdom_loaded_from, _wisdom_foreign
    path = wisdom_path()
    if path is None or path == _wisdom_loaded_from:
        return
    _wisdom_loaded_from = path
    _wisdom_foreign = False
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not (isinstance(data, dict) and data.get("format") == _WISDOM_FORMAT
                and data.get("version") == _WISDOM_VERSION and isinstance(data.get("plans"), dict)):
            raise ValueError("not a sparsekit wisdom file (format/version/plans)")
    except (OSError, ValueError) as e:
        _wisdom_foreign = True
        warnings.warn(f"SPARSEKIT_WISDOM: ignoring {path}: {e}", RuntimeWarning, stacklevel=3)
        return
    if data.get("cpu") != cpu_model():
        _wisdom_foreign = True
        warnings.warn(
            f"SPARSEKIT_WISDOM: ignoring {path}: written on {data.get('cpu')!r}, this CPU is "
            f"{cpu_model()!r}", RuntimeWarning, stacklevel=3)
        return
    known = _by_name()
    for key, rec in data["plans"].items():
        if (isinstance(rec, dict) and isinstance(rec.get("variant"), str)
                and split_name(rec["variant"])[0] in known and key not in _plans):
            _plans[key] = Plan(key, rec["variant"], "wisdom",
                               {str(k): float(v) for k, v in rec.get("times_us", {}).items()})


def _save_wisdom() -> None:
    path = wisdom_path()
    if path is None or _wisdom_foreign:
        return
    data = {
        "format": _WISDOM_FORMAT, "version": _WISDOM_VERSION, "cpu": cpu_model(),
        "plans": {k: {"variant": p.variant, "times_us": p.times_us}
                  for k, p in sorted(_plans.items()) if p.source in ("measured", "wisdom")},
    }
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)  # atomic: concurrent readers see the old or the new file
    except OSError as e:
        warnings.warn(f"SPARSEKIT_WISDOM: could not write {path}: {e}", RuntimeWarning,
                      stacklevel=3)


# ---- measuring ----------------------------------------------------------------------------
def _measure(bound: Any, k: int, m: int, n: int, threads: int, names: list[str],
             ids: dict[str, tuple[int, int]]) -> tuple[str, dict[str, float], float]:
    """Best-of time per candidate on this matrix with a random fp32 x; returns the winner."""
    t0 = time.perf_counter()
    budget = _budget_s()
    cold = plan_cache_mode() == "cold"
    x = torch.randn(n, k, dtype=torch.float32)
    out = torch.empty(n, m, dtype=torch.float32)
    xp, op = x.data_ptr(), out.data_ptr()
    best = {name: math.inf for name in names}

    def timed(name: str) -> None:
        if cold:
            bound.evict()  # untimed: the call below reads the weights from memory
        s = time.perf_counter()
        bound.run(xp, op, n, 0, 0, threads, *ids[name])
        best[name] = min(best[name], time.perf_counter() - s)

    # Round-robin so a load spike hits every candidate alike; at least 2 timed calls each. Then
    # only the contenders (within _RACE_KEEP of the fastest so far) go on, to at least
    # _CONTENDER_ROUNDS calls each: one flushed-cache call varies by 10-15% on a shared host, so
    # the minimum of two samples out of ten candidates picks whichever got lucky. The built-in
    # choice always stays in: a burst of memory traffic from another job during the first two
    # rounds slows the memory-bound variants more than the compute-bound ones, and one of those
    # must not win for good against a default that was not timed again.
    incumbent = next((nm for nm in names if nm in _INCUMBENTS), None)
    rounds = 0
    active = list(names)
    while True:
        for name in active:
            if rounds == 0:
                bound.run(xp, op, n, 0, 0, threads, *ids[name])  # page-in / first-touch, untimed
            timed(name)
        rounds += 1
        if rounds < 2:
            continue
        lead = min(best[nm] for nm in active)
        active = [nm for nm in active
                  if best[nm] <= lead * (1 + _RACE_KEEP) or nm == incumbent]
        spent = time.perf_counter() - t0 > budget
        if rounds >= 50 or len(active) == 1 or (spent and rounds >= _CONTENDER_ROUNDS):
            break
    # The decision that matters is between the two fastest: a few more alternating calls of
    # just those two, so that two unlucky samples of the better one (long calls leave room for
    # only the 2 rounds above) do not decide it.
    if len(names) > 1 and rounds < _CONFIRM_ROUNDS + 2:
        top2 = sorted(names, key=lambda nm: best[nm])[:2]
        for _ in range(_CONFIRM_ROUNDS):
            for name in top2:
                timed(name)
    winner = min(names, key=lambda nm: best[nm])
    # The built-in choice keeps its place unless beaten by more than the timing noise of a
    # brief measurement on a possibly shared machine.
    if incumbent is not None and best[incumbent] <= best[winner] * (1 + _MARGIN):
        winner = incumbent
    return winner, {nm: round(t * 1e6, 3) for nm, t in best.items()}, time.perf_counter() - t0


def plan_bound(mat: Any, bound: Any, n: int, threads: int) -> Plan:
    """Plans batch class of ``n`` for the bound matrix ``bound`` of ``mat`` and stores the
    choice in it (used by the cpp backend on the first call of a class)."""
    family = bound.family
    n = max(1, int(n))
    cls = _n_class(n)
    forced = forced_variants()
    cands = [c for c in bound_candidates(family, n, bound.isa) if _takes(c, mat)]
    by_name = _by_name()
    # candidate -> BoundMatrix.run's (variant id, ISA code; -1 = the matrix's own)
    ids = {}
    for c in cands:
        base, isa = split_name(c)
        ids[c] = (by_name[base]["id"], -1 if isa is None else _ISA_CODE[isa])
    with _lock:
        key = _key(mat, bound, n, threads)
        hit = [f for f in forced if f in cands]
        if hit:
            p = Plan(key, hit[0], "forced")
        elif forced or not _planning_enabled() or not cands:
            p = Plan(key, "auto", "off" if not _planning_enabled() else "forced")
        elif len(cands) == 1:
            p = Plan(key, cands[0], "single")
        else:
            _load_wisdom()
            p = _plans.get(key)
            if p is not None and p.variant in cands:
                p = Plan(key, p.variant, "cached" if p.source == "measured" else p.source,
                         dict(p.times_us))
            else:
                m, k = mat.shape
                nt = _CLASS_N[cls] if cls >= 2 else n
                winner, times, cost = _measure(bound, k, m, nt, threads, cands, ids)
                p = Plan(key, winner, "measured", times, cost)
                _plans[key] = p
                _save_wisdom()
        base, isa = split_name(p.variant)
        bound.set_variant(cls, by_name[base]["id"], threads, isa)
    return p


def plan(matrix: Any, n: int = 1, threads: int | None = None) -> Plan:
    """Choose (measuring if needed) the CPU kernel variant for ``matrix`` at batch size ``n``.

    Call it ahead of serving (``sparsekit.warmup`` does so implicitly by calling every
    module) so that no request pays the measurement.

    Parameters
    ----------
    matrix : CSRMatrix or BSRMatrix
        A CPU matrix: fp32/bf16/f16 values, or a compressed CSR (int8 values and/or delta8
        indices), whose calls up to batch 2 run the compressed kernels (family ``csrq``) and
        larger ones the float kernels on the decoded matrix.
    n : int, default 1
        The batch size (rows of ``x``) the calls will have; plans are per batch class
        (:data:`N_CLASSES`).
    threads : int, optional
        Threads the calls will use; default :func:`sparsekit.get_num_threads`.

    Returns
    -------
    Plan
        The variant chosen, where it came from and what measuring cost.

    Raises
    ------
    RuntimeError
        If the compiled extension is unavailable.
    ValueError
        If ``n`` or ``threads`` is not a positive int, or ``SPARSEKIT_KERNEL`` names an
        unknown variant.
    """
    from ..threads import get_num_threads
    from .cpp import planned_binding  # the backend owns the per-matrix binding

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if threads is None:
        threads = get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int, got {threads!r}")
    mat, bound = planned_binding(matrix, n)
    return plan_bound(mat, bound, n, threads)


def plans() -> dict[str, dict[str, Any]]:
    """The plans made in this process and those in the wisdom file (if enabled), by key."""
    with _lock:
        _load_wisdom()
        return {k: p.as_dict() for k, p in _plans.items()}


def clear() -> None:
    """Forget in-process plans (the wisdom file is re-read on next use; tests)."""
    global _wisdom_loaded_from, _wisdom_foreign
    with _lock:
        _plans.clear()
        _wisdom_loaded_from = None
        _wisdom_foreign = False
