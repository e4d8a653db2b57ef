"""``sparsekit bench layer``: one linear layer, swept over shapes, batches, sparsities, formats,
backends, dtypes and devices.

Method (identical for every contender):

1. Per shape, one seeded random weight ``W`` (M x K, ``N(0, 1/K)``) and input ``x``; per sparsity
   and format a random sparsity pattern (element-wise for CSR; whole ``r x c`` blocks for BSR) at
   exactly the requested sparsity.  All contenders of a cell get the same ``x`` and the same
   pruned weight rounded to the cell's dtype.
2. Every contender is checked once against the float64 reference ``x @ W.T (+ b)``; one that
   fails is reported as WRONG and never timed; one that cannot run the dtype/format/device is
   reported as "not supported".
3. Timing rotates through ``rotation_count`` copies of the contender's weight representation so
   the rotating set exceeds ``2 x`` the last-level cache: every call streams its weight from
   memory, as in a model with many layers.
4. Dense baselines do not depend on sparsity; they are timed once per (shape, dtype, batch) and
   every sparse row is compared with ``F.linear`` and with the fastest dense formulation of the
   same run.
"""

from __future__ import annotations

import gc
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from sparsekit.bench import harness as h
from sparsekit.bench.common import (
    DTYPE_NAMES,
    ERROR,
    OK,
    UNAVAILABLE,
    UNSUPPORTED,
    Outcome,
    Progress,
    Unsupported,
    check_and_time,
    finite_or_none,
    sparsekit_backends,
    unsupported_reason,
)

DENSE_FAMILY = "dense"
DEFAULT_SHAPES = ((4096, 4096), (768, 3072))
DEFAULT_BATCHES = (1, 8, 32, 128)
DEFAULT_SPARSITIES = (0.5, 0.7, 0.9, 0.95)
DEFAULT_FORMATS = ("csr", "bsr4x4")
DEFAULT_DTYPES = ("fp32", "bf16")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FormatSpec:
    """A sparse storage format: ``csr`` or ``bsr`` with a block shape."""

    name: str  # "csr" | "bsr"
    blocksize: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        """``"csr"`` or ``"bsr4x4"``."""
        if self.name == "bsr":
            return f"bsr{self.blocksize[0]}x{self.blocksize[1]}"
        return self.name

    @classmethod
    def parse(cls, text: str) -> FormatSpec:
        """Parse ``"csr"``, ``"bsr4x4"``, ``"bsr-16x1"`` or ``"bsr:8x8"``."""
        t = text.strip().lower()
        if t == "csr":
            return cls("csr")
        m = re.fullmatch(r"bsr[-:_]?(\d+)x(\d+)", t)
        if m:
            r, c = int(m.group(1)), int(m.group(2))
            if r >= 1 and c >= 1:
                return cls("bsr", (r, c))
        raise ValueError(
            f"formats: expected 'csr' or 'bsr<r>x<c>' (e.g. bsr4x4) with r, c >= 1, got {text!r}"
        )


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x4096"`` -> (M, K) = (out_features, in_features)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(
            f"shapes: expected MxK (out_features x in_features, positive ints, e.g. 4096x4096), "
            f"got {text!r}"
        )
    return int(m.group(1)), int(m.group(2))


@dataclass
class LayerSweep:
    """What ``sparsekit bench layer`` measures (see module docstring for the method)."""

    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES
    batches: Sequence[int] = DEFAULT_BATCHES
    sparsities: Sequence[float] = DEFAULT_SPARSITIES
    formats: Sequence[FormatSpec] = field(
        default_factory=lambda: [FormatSpec.parse(f) for f in DEFAULT_FORMATS]
    )
    dtypes: Sequence[str] = DEFAULT_DTYPES
    devices: Sequence[str] = ("cpu",)
    backends: Sequence[str] | None = None  # sparsekit backends; None: all built, except "torch"
    contenders: Sequence[str] = ("dense", "sparsekit", "torch.sparse", "scipy")
    bias: bool = False
    threads: int | None = None
    warmup: int = 2
    min_reps: int = 5
    min_time_s: float = 0.1
    rotate_factor: float = 2.0  # rotating set > rotate_factor x LLC; 0 disables (tests only)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.shapes:
            raise ValueError("shapes: expected at least one MxK shape, got none")
        for s in self.shapes:
            if len(s) != 2 or min(s) < 1:
                raise ValueError(f"shapes: expected (M, K) with M, K >= 1, got {s!r}")
        if not self.batches or any((not isinstance(b, int)) or b < 1 for b in self.batches):
            raise ValueError(f"batches: expected positive ints, got {list(self.batches)}")
        if not self.sparsities or any(
            not (isinstance(s, float | int) and 0.0 <= s < 1.0) for s in self.sparsities
        ):
            raise ValueError(f"sparsities: expected numbers in [0, 1), got {list(self.sparsities)}")
        if not self.formats:
            raise ValueError("formats: expected at least one format, got none")
        for d in self.dtypes:
            if d not in DTYPE_NAMES.values():
                raise ValueError(f"dtypes: expected fp32, bf16 or fp16, got {d!r}")
        for dev in self.devices:
            if dev not in ("cpu", "cuda"):
                raise ValueError(f"devices: expected 'cpu' or 'cuda', got {dev!r}")
            if dev == "cuda" and not torch.cuda.is_available():
                raise ValueError("devices: 'cuda' requested but torch.cuda.is_available() is False")
        known = {"dense", "sparsekit", "torch.sparse", "scipy"}
        bad = [c for c in self.contenders if c not in known]
        if bad or not self.contenders:
            raise ValueError(f"contenders: expected a subset of {sorted(known)}, got {bad or []}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected an int >= 1, got {self.threads}")
        if self.min_reps < 1 or self.warmup < 0 or self.min_time_s < 0:
            raise ValueError("timing: expected warmup >= 0, min_reps >= 1, min_time_s >= 0")
        if not (self.rotate_factor >= 0 and math.isfinite(self.rotate_factor)):
            raise ValueError(f"rotate_factor: expected a number >= 0 (0 = no rotation), got "
                             f"{self.rotate_factor}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly configuration."""
        d = asdict(self)
        d["shapes"] = [f"{m}x{k}" for m, k in self.shapes]
        d["formats"] = [f.label for f in self.formats]
        d["batches"] = list(self.batches)
        d["sparsities"] = [float(s) for s in self.sparsities]
        return d


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def random_sparse_weight(w: torch.Tensor, sparsity: float, fmt: FormatSpec,
                         gen: torch.Generator) -> torch.Tensor:
    """Zero a uniformly random subset of ``w`` (elements, or whole blocks for BSR).

    Exactly ``round(sparsity * n)`` of the ``n`` elements (or blocks; ragged edge blocks count
    as blocks) are zeroed.  A random pattern is the standard kernel benchmark input (magnitude
    pruning of i.i.d. weights produces one too).
    """
    m, k = w.shape
    if fmt.name == "csr":
        n = m * k
        drop = torch.randperm(n, generator=gen)[: int(round(sparsity * n))]
        out = w.clone().reshape(-1)
        out[drop] = 0
        return out.reshape(m, k)
    r, c = fmt.blocksize
    mb, kb = -(-m // r), -(-k // c)
    nb = mb * kb
    keep = torch.ones(nb, dtype=torch.bool)
    keep[torch.randperm(nb, generator=gen)[: int(round(sparsity * nb))]] = False
    mask = keep.reshape(mb, 1, kb, 1).expand(mb, r, kb, c).reshape(mb * r, kb * c)[:m, :k]
    return w * mask


def _mib(nbytes: int) -> float:
    return nbytes / 2**20


# --------------------------------------------------------------------------------------------
# Contender factories: each returns make() -> fn(i); fn(i) computes y for the cell's x
# --------------------------------------------------------------------------------------------
def _once(cache: dict[str, Any], key: str, build: Callable[[], Any]) -> Any:
    """``cache[key]``, built on first use: a cell's rotating copies serve every batch size."""
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _sparsekit_factory(be_name: str, mat: Any, x: torch.Tensor, bias: torch.Tensor | None,
                       n_copies: Callable[[int], int], info: dict[str, Any],
                       cache: dict[str, Any]):
    def make():
        import sparsekit
        from sparsekit.kernels import get_backend

        be = get_backend(be_name)
        if not be.supports(mat, x):
            raise Unsupported(f"backend {be_name!r} does not support {DTYPE_NAMES.get(mat.dtype)}"
                              f" {type(mat).__name__} on {x.device}")
        mats = _once(cache, "sparsekit", lambda: [mat] + [
            _clone_matrix(mat) for _ in range(n_copies(mat.nbytes) - 1)])
        n = len(mats)
        info["n_copies"] = n
        info["weight_bytes"] = mat.nbytes

        def fn(i: int) -> torch.Tensor:
            return sparsekit.linear(x, mats[i % n], bias, backend=be_name)

        return fn

    return make


def _clone_matrix(mat: Any) -> Any:
    from sparsekit.formats import BSRMatrix, CSRMatrix

    if isinstance(mat, BSRMatrix):
        return BSRMatrix(mat.indptr.clone(), mat.indices.clone(), mat.values.clone(), mat.shape,
                         blocksize=mat.blocksize)
    if isinstance(mat, CSRMatrix):
        return CSRMatrix(mat.indptr.clone(), mat.indices.clone(), mat.values.clone(), mat.shape)
    raise TypeError(f"mat: expected CSRMatrix or BSRMatrix, got {type(mat).__name__}")


def _torch_sparse_factory(wd: torch.Tensor, fmt: FormatSpec, x: torch.Tensor,
                          bias: torch.Tensor | None, n_copies: Callable[[int], int],
                          info: dict[str, Any], cache: dict[str, Any]):
    def make():
        with warnings.catch_warnings():  # "sparse CSR support is in beta" on every conversion
            warnings.simplefilter("ignore", UserWarning)
            return _make()

    def _make():
        if fmt.name == "csr":
            t = wd.to_sparse_csr()
            parts = (t.crow_indices(), t.col_indices(), t.values())
            nbytes = sum(p.numel() * p.element_size() for p in parts)

            def clone():
                return torch.sparse_csr_tensor(*(p.clone() for p in parts), size=t.shape)
        else:
            m, k = wd.shape
            r, c = fmt.blocksize
            if m % r or k % c:
                raise Unsupported(f"torch BSR needs shape divisible by the block ({m}x{k} vs "
                                  f"{r}x{c})")
            t = wd.to_sparse_bsr((r, c))
            parts = (t.crow_indices(), t.col_indices(), t.values())
            nbytes = sum(p.numel() * p.element_size() for p in parts)

            def clone():
                return torch.sparse_bsr_tensor(*(p.clone() for p in parts), size=t.shape)
        # y^T = W @ x^T is the orientation torch's CPU (MKL) and CUDA (cuSPARSE) kernels
        # implement; x @ W_csr.T is ~10x slower on CPU.  Check support on one copy first.
        bcol = None if bias is None else bias.unsqueeze(1)
        xt = x.t()

        def run(w):
            if bcol is None:
                return torch.mm(w, xt).t()
            return torch.addmm(bcol, w, xt).t()

        run(t)
        ws = _once(cache, "torch.sparse",
                   lambda: [t] + [clone() for _ in range(n_copies(nbytes) - 1)])
        n = len(ws)
        info["n_copies"] = n
        info["weight_bytes"] = nbytes
        return lambda i: run(ws[i % n])

    return make


def _scipy_factory(wd: torch.Tensor, fmt: FormatSpec, x: torch.Tensor, bias: torch.Tensor | None,
                   n_copies: Callable[[int], int], info: dict[str, Any],
                   cache: dict[str, Any]):
    def make():
        if x.device.type != "cpu":
            raise Unsupported("scipy.sparse is CPU only")
        if wd.dtype != torch.float32:
            raise Unsupported(f"scipy.sparse has no {DTYPE_NAMES[wd.dtype]} matrices")
        import scipy.sparse as sps

        m, k = wd.shape
        if fmt.name == "bsr" and (m % fmt.blocksize[0] or k % fmt.blocksize[1]):
            raise Unsupported(f"scipy BSR needs shape divisible by the block ({m}x{k} vs "
                              f"{fmt.blocksize[0]}x{fmt.blocksize[1]})")

        def build():
            w_np = wd.numpy()
            sp = (sps.csr_array(w_np) if fmt.name == "csr"
                  else sps.bsr_array(w_np, blocksize=fmt.blocksize))
            nb = sp.data.nbytes + sp.indices.nbytes + sp.indptr.nbytes
            return [sp] + [sp.copy() for _ in range(n_copies(nb) - 1)], nb

        sps_list, nbytes = _once(cache, "scipy", build)
        n = len(sps_list)
        info["n_copies"] = n
        info["weight_bytes"] = nbytes
        info["threads"] = 1  # scipy.sparse matmul is single-threaded
        xt = x.numpy().T
        b_np = None if bias is None else bias.numpy()[:, None]

        def fn(i: int) -> torch.Tensor:
            yt = sps_list[i % n] @ xt
            if b_np is not None:
                yt += b_np
            return torch.from_numpy(yt.T)

        return fn

    return make


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def _count_steps(cfg: LayerSweep, n_sparsekit: int) -> int:
    per_dense = 5 if "dense" in cfg.contenders else 0
    per_sparse = (n_sparsekit if "sparsekit" in cfg.contenders else 0) + sum(
        c in cfg.contenders for c in ("torch.sparse", "scipy")
    )
    cells = len(cfg.shapes) * len(cfg.dtypes) * len(cfg.devices) * len(cfg.batches)
    return cells * (per_dense + len(cfg.sparsities) * len(cfg.formats) * per_sparse)


def run_layer_sweep(cfg: LayerSweep, *, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run the sweep and return one record (dict) per (cell, contender).

    Every record has the keys of :data:`RECORD_KEYS`; dense records have ``sparsity``/``format``
    None.  Speedups are filled in by :func:`add_speedups`.
    """
    cfg.validate()
    records: list[dict[str, Any]] = []
    threads = cfg.threads if cfg.threads is not None else h.default_threads()
    timing = dict(warmup=cfg.warmup, min_reps=cfg.min_reps, min_time_s=cfg.min_time_s)
    with h.threads_for_all(threads):
        sk_by_dev = {}
        for dev in cfg.devices:
            sk_by_dev[dev] = sparsekit_backends(torch.device(dev), cfg.backends) \
                if "sparsekit" in cfg.contenders else ({}, {})
        n_sk = max((len(u) + len(s) for u, s in sk_by_dev.values()), default=0)
        bar = Progress(_count_steps(cfg, n_sk), enabled=progress)
        try:
            for dev in cfg.devices:
                device = torch.device(dev)
                for m, k in cfg.shapes:
                    for dname in cfg.dtypes:
                        _run_shape_dtype(cfg, device, m, k, dname, threads, timing,
                                         sk_by_dev[dev], records, bar)
        finally:
            bar.close()
    add_speedups(records)
    return records


def _base_record(device: torch.device, m: int, k: int, dname: str, batch: int, threads: int
                 ) -> dict[str, Any]:
    return {
        "mode": "layer", "device": device.type, "dtype": dname, "m": m, "k": k,
        "shape": f"{m}x{k}", "batch": batch, "sparsity": None, "format": None,
        "blocksize": None, "threads": threads,
    }


def _fill(rec: dict[str, Any], family: str, contender: str, out: Outcome,
          info: dict[str, Any]) -> dict[str, Any]:
    st = out.stats
    rec.update(
        family=family, contender=contender, status=out.status, message=out.message,
        median_s=st.median_s if st else None, p10_s=st.p10_s if st else None,
        p90_s=st.p90_s if st else None, min_s=st.min_s if st else None,
        reps=st.reps if st else None, max_rel_err=finite_or_none(out.max_rel_err),
        tol=out.tol, n_copies=info.get("n_copies"), weight_bytes=info.get("weight_bytes"),
    )
    if "threads" in info:
        rec["threads"] = info["threads"]
    return rec


def _run_shape_dtype(cfg, device, m, k, dname, threads, timing, sk, records, bar) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dname]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + m * 7919 + k)
    w32 = torch.randn(m, k, generator=gen) / math.sqrt(k)
    b32 = torch.randn(m, generator=gen) * 0.1 if cfg.bias else None
    xs32 = {n: torch.randn(n, k, generator=gen) for n in cfg.batches}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    llc = _gpu_l2(device) if device.type == "cuda" else None

    def n_copies(nbytes: int) -> int:
        if cfg.rotate_factor == 0:  # smoke tests only: weights stay cache-resident
            return 1
        return h.rotation_count(max(int(nbytes), 1), cfg.rotate_factor, llc=llc)

    bias = None if b32 is None else b32.to(device=device, dtype=dtype)
    xs = {n: v.to(device=device, dtype=dtype) for n, v in xs32.items()}
    sync_fn = sync
    label0 = f"{m}x{k} {dname} {device.type}"

    # ---- dense baselines (independent of sparsity) -------------------------------------
    if "dense" in cfg.contenders:
        wd = w32.to(device=device, dtype=dtype)
        nd = n_copies(wd.numel() * wd.element_size())
        copies = [wd] + [wd.clone() for _ in range(nd - 1)]
        wd64 = wd.double()
        static = h.dense_contenders(copies, bias, verify=False,
                                    names=("F.linear", "torch.matmul", "numpy"))
        for batch in cfg.batches:
            x = xs[batch]
            ref = _reference(x, wd64, bias)
            # batch-independent layouts once; the packed ones re-packed for each batch size
            conts = h.DenseContenders()
            conts.update(static)
            conts.skipped.update(static.skipped)
            packed = h.dense_contenders(copies, bias, batch_size=batch, verify=False,
                                        names=("onednn", "mkl_packed"))
            conts.update(packed)
            conts.skipped.update(packed.skipped)
            names = ["F.linear", "torch.matmul", "onednn", "mkl_packed", "numpy"]
            for name in names:
                rec = _base_record(device, m, k, dname, batch, threads)
                info = {"n_copies": nd, "weight_bytes": wd.numel() * wd.element_size()}
                if name in conts:
                    fn = conts[name]
                    out = check_and_time(lambda fn=fn, x=x: (lambda i: fn(x, i)), ref, dtype, k,
                                         timing=timing, sync=sync_fn, threads=threads)
                else:
                    reason = conts.skipped.get(name, "not offered")
                    status = UNAVAILABLE if "built without" in reason else UNSUPPORTED
                    out = Outcome(status, message=reason)
                if name == "numpy":
                    info["threads"] = threads
                records.append(_fill(rec, DENSE_FAMILY, f"dense:{name}", out, info))
                bar.advance(f"{label0} N={batch} dense:{name}")
            del conts, packed
        del copies, wd, wd64, static
        if cfg.rotate_factor:
            gc.collect()  # hand the rotating set (> 2 x LLC) back before the sparse cells

    # ---- sparse contenders -------------------------------------------------------------
    usable, skipped = sk
    for sparsity in cfg.sparsities:
        for fmt in cfg.formats:
            w_sp32 = random_sparse_weight(w32, float(sparsity), fmt, gen)
            wd = w_sp32.to(device=device, dtype=dtype)
            mat, mat_err = _make_matrix(wd, fmt)
            nnz = int(torch.count_nonzero(wd))
            cache: dict[str, Any] = {}  # rotating copies per contender, shared by all batches
            wd64 = wd.double()
            for batch in cfg.batches:
                x = xs[batch]
                ref = _reference(x, wd64, bias)
                label = f"{label0} N={batch} {fmt.label} s={sparsity:g}"
                cands: list[tuple[str, str, Any]] = []
                if "sparsekit" in cfg.contenders:
                    for be_name in usable:
                        cands.append(("sparsekit", f"sparsekit:{be_name}", be_name))
                    for be_name, why in skipped.items():
                        cands.append(("sparsekit", f"sparsekit:{be_name}", Outcome(
                            UNAVAILABLE, message=why)))
                if "torch.sparse" in cfg.contenders:
                    cands.append(("torch.sparse", "torch.sparse", None))
                if "scipy" in cfg.contenders:
                    cands.append(("scipy", "scipy", None))
                for family, cname, arg in cands:
                    rec = _base_record(device, m, k, dname, batch, threads)
                    rec.update(sparsity=float(sparsity), format=fmt.label,
                               blocksize=list(fmt.blocksize) if fmt.blocksize else None,
                               nnz=nnz)
                    info: dict[str, Any] = {}
                    if isinstance(arg, Outcome):
                        out = arg
                    elif family == "sparsekit":
                        if mat is None:
                            out = mat_err
                        else:
                            out = check_and_time(
                                _sparsekit_factory(arg, mat, x, bias, n_copies, info, cache),
                                ref, dtype, k, timing=timing, sync=sync_fn, threads=threads)
                    elif family == "torch.sparse":
                        out = check_and_time(
                            _torch_sparse_factory(wd, fmt, x, bias, n_copies, info, cache),
                            ref, dtype, k, timing=timing, sync=sync_fn, threads=threads)
                    else:
                        out = check_and_time(
                            _scipy_factory(wd, fmt, x, bias, n_copies, info, cache),
                            ref, dtype, k, timing=timing, sync=sync_fn, threads=threads)
                    records.append(_fill(rec, family, cname, out, info))
                    bar.advance(f"{label} {cname}")
            del mat, wd, wd64, cache


def _make_matrix(wd: torch.Tensor, fmt: FormatSpec) -> tuple[Any, Outcome | None]:
    """The sparsekit matrix of ``wd``, or ``(None, outcome)`` saying why there is none."""
    try:
        from sparsekit.formats import BSRMatrix, CSRMatrix
    except Exception as exc:
        return None, Outcome(UNAVAILABLE, message=f"sparsekit.formats not importable: "
                                                  f"{type(exc).__name__}: {exc}")
    try:
        if fmt.name == "csr":
            return CSRMatrix.from_dense(wd), None
        return BSRMatrix.from_dense(wd, blocksize=fmt.blocksize), None
    except Exception as exc:
        reason = unsupported_reason(exc)
        status = UNSUPPORTED if reason else ERROR
        return None, Outcome(status, message=reason or f"from_dense: {type(exc).__name__}: {exc}")


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def _gpu_l2(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


# --------------------------------------------------------------------------------------------
# Derived columns
# --------------------------------------------------------------------------------------------
def _cell_key(r: dict[str, Any]) -> tuple:
    return (r["mode"], r["device"], r["dtype"], r.get("shape"), r.get("model"), r["batch"])


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_flinear``, ``speedup_vs_best_dense``, ``best_dense`` and the dense
    reference times on every record, in place, from the dense records of the same run."""
    dense: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["family"] == DENSE_FAMILY and r["status"] == OK:
            dense.setdefault(_cell_key(r), {})[r["contender"]] = r["median_s"]
    for r in records:
        d = dense.get(_cell_key(r), {})
        fl = d.get("dense:F.linear")
        best_name, best = (min(d.items(), key=lambda kv: kv[1]) if d else (None, None))
        t = r.get("median_s")
        r["flinear_median_s"] = fl
        r["best_dense"] = best_name
        r["best_dense_median_s"] = best
        r["speedup_vs_flinear"] = (fl / t) if (fl and t) else None
        r["speedup_vs_best_dense"] = (best / t) if (best and t) else None
        wb = r.get("weight_bytes")
        r["weight_gbs"] = (wb / t / 1e9) if (wb and t) else None
        p10, p90 = r.get("p10_s"), r.get("p90_s")
        r["spread"] = ((p90 - p10) / t) if (t and p10 is not None and p90 is not None) else None


#: Keys every record carries (JSON ``results`` entries and CSV columns).
RECORD_KEYS = (
    "mode", "device", "dtype", "shape", "m", "k", "model", "batch", "sparsity", "format",
    "blocksize", "family", "contender", "status", "median_s", "p10_s", "p90_s", "min_s", "reps",
    "speedup_vs_flinear", "speedup_vs_best_dense", "best_dense", "flinear_median_s",
    "best_dense_median_s", "spread", "max_rel_err", "tol", "n_copies", "weight_bytes", "weight_gbs",
    "nnz", "threads", "message",
)


def normalise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with exactly :data:`RECORD_KEYS` (missing -> None), JSON-safe numbers."""
    out = []
    for r in records:
        d = {key: r.get(key) for key in RECORD_KEYS}
        for key, v in d.items():
            if isinstance(v, float):
                d[key] = finite_or_none(v)
            elif isinstance(v, np.generic):
                d[key] = v.item()
        out.append(d)
    return out
