"""sparsify(model) / densify(model): swap pruned nn.Linear layers for SparseLinear in place.

Tuning (``tune=True``) measures, per layer and on this machine, the dense layer (``F.linear``
and ``x @ W.T`` with a pre-transposed contiguous weight) against every candidate sparse
variant (CSR; BSR for block shapes whose fill ratio is at most ``max_fill``) at the requested
batch sizes (warm-up, then the median of a short run), and keeps the fastest. The layer stays
dense unless the best sparse variant beats the *best dense formulation* by ``margin``.

Cache temperature matters: a layer timed alone keeps its weights in the last-level cache, but
inside a model whose ``nn.Linear`` weights together exceed that cache every layer streams its
weights from memory, which favours the sparse layer (fewer bytes) more than a warm measurement
shows. So when the model's Linear weights exceed the CPU's last-level cache (``cold=None``,
the default) or with ``cold=True``, each candidate is timed over rotating copies of its
weights whose round-robin working set exceeds twice the last-level cache (see
:func:`_rotation_copies`); small models are timed warm, as they run.

Decisions are cached in-process and, optionally, in a JSON file (``cache=path`` or the
``SPARSEKIT_TUNE_CACHE`` environment variable), keyed on the layer shape, rounded sparsity
pattern statistics (density, row-count spread, block fill ratios), dtypes, device, CPU/GPU
model, thread count, backend, batch sizes, candidate set and library versions, so a second
call (or a second layer with the same key) does not re-measure.

``tune=False`` uses :func:`heuristic_choice` (documented there) and measures nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekit.nn import _ops
from sparsekit.nn.linear import SparseLinear, block_fill

__all__ = [
    "sparsify",
    "densify",
    "SparsifyReport",
    "LayerReport",
    "heuristic_choice",
    "clear_tune_cache",
    "DEFAULT_BLOCKSIZES",
]

#: BSR block shapes tried by default.
DEFAULT_BLOCKSIZES: tuple[tuple[int, int], ...] = ((4, 4), (8, 8), (16, 16), (1, 8), (1, 16))
_CACHE_VERSION = 1
_ENV_CACHE = "SPARSEKIT_TUNE_CACHE"

# in-process decision cache: key -> decision dict
_MEM_CACHE: dict[str, dict[str, Any]] = {}
_CACHE_LOCK = threading.Lock()
# number of per-layer measurement runs performed (tests use it to verify caching)
_MEASUREMENTS = 0


def clear_tune_cache() -> None:
    """Forget all in-process tuning decisions (persisted files are untouched)."""
    with _CACHE_LOCK:
        _MEM_CACHE.clear()


def measurement_count() -> int:
    """How many layers have been measured (timed) in this process so far."""
    return _MEASUREMENTS


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerReport:
    """Decision for one nn.Linear.

    Times are medians in seconds, summed over the requested batch sizes (None: not measured).
    ``speedup`` = best dense time / chosen time (1.0 when dense is kept).
    """

    name: str
    shape: tuple[int, int]
    density: float
    choice: str  # "dense" | "csr" | "bsr"
    blocksize: tuple[int, int] | None
    reason: str
    dense_times: dict[str, float] = dataclasses.field(default_factory=dict)
    sparse_times: dict[str, float] = dataclasses.field(default_factory=dict)
    from_cache: bool = False
    #: int8 quantization error of the stored weights (``CSRMatrix.quantization``), or None.
    quantization: dict[str, float] | None = None

    @property
    def best_dense_time(self) -> float | None:
        return min(self.dense_times.values()) if self.dense_times else None

    @property
    def chosen_time(self) -> float | None:
        if self.choice == "dense":
            return self.best_dense_time
        return self.sparse_times.get(_variant_name(self.choice, self.blocksize))

    @property
    def speedup(self) -> float | None:
        d, c = self.best_dense_time, self.chosen_time
        if d is None or c is None or c <= 0:
            return None
        return d / c

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["blocksize"] = None if self.blocksize is None else list(self.blocksize)
        d["best_dense_time"] = self.best_dense_time
        d["chosen_time"] = self.chosen_time
        d["speedup"] = self.speedup
        return d


@dataclasses.dataclass
class SparsifyReport:
    """What :func:`sparsify` did; ``str(report)`` is a readable table."""

    layers: list[LayerReport]
    batch_sizes: tuple[int, ...]
    tuned: bool

    @property
    def replaced(self) -> list[str]:
        return [lr.name for lr in self.layers if lr.choice != "dense"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "tuned": self.tuned,
            "layers": [lr.to_dict() for lr in self.layers],
        }

    def __str__(self) -> str:
        head = (
            f"sparsify: {len(self.replaced)}/{len(self.layers)} Linear layers replaced "
            f"({'tuned' if self.tuned else 'heuristic'}, batch sizes {list(self.batch_sizes)})"
        )
        rows = [("layer", "shape", "density", "choice", "dense", "sparse", "speedup", "note")]
        for lr in self.layers:
            choice = _variant_name(lr.choice, lr.blocksize)
            d = lr.best_dense_time
            best_sparse = min(lr.sparse_times.values()) if lr.sparse_times else None
            sp = lr.speedup
            rows.append((
                lr.name or "<root>",
                f"{lr.shape[0]}x{lr.shape[1]}",
                f"{lr.density:.3f}",
                choice,
                "-" if d is None else f"{d * 1e6:.1f}us",
                "-" if best_sparse is None else f"{best_sparse * 1e6:.1f}us",
                "-" if sp is None else f"{sp:.2f}x",
                lr.reason + (" (cached)" if lr.from_cache else ""),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


def _variant_name(fmt: str, blocksize: tuple[int, int] | None) -> str:
    return fmt if blocksize is None else f"bsr{blocksize[0]}x{blocksize[1]}"


# --------------------------------------------------------------------------------------------
# hardware / cache keys
# --------------------------------------------------------------------------------------------


def _hw_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _num_threads() -> int:
    try:
        from sparsekit.threads import get_num_threads

        return int(get_num_threads())
    except Exception:  # threads module optional at import time
        return torch.get_num_threads()


def _versions() -> dict[str, str]:
    try:
        from sparsekit import __version__ as skv
    except Exception:
        skv = "unknown"
    return {"torch": torch.__version__, "sparsekit": str(skv)}


def _pattern_stats(mask: Tensor, blocksizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Rounded statistics of the sparsity pattern that drive kernel speed."""
    m, k = mask.shape
    rows = mask.sum(1).to(torch.float64)
    nnz = int(rows.sum())
    mean = float(rows.mean())
    cv = float(rows.std(unbiased=False)) / mean if mean > 0 else 0.0
    fills = {}
    for bs in blocksizes:
        nnzb, _ = block_fill(mask, bs)
        fills[f"{bs[0]}x{bs[1]}"] = round(nnzb * bs[0] * bs[1] / nnz, 2) if nnz else 0.0
    return {"density": round(nnz / (m * k), 3), "row_cv": round(cv, 2), "fill": fills}


def _cache_key(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def _resolve_cache_path(cache: Any) -> Path | None:
    if cache is False or cache is None:
        return None
    if cache is True or cache == "env":
        env = os.environ.get(_ENV_CACHE)
        return Path(env) if env else None
    if isinstance(cache, (str, os.PathLike)):
        return Path(cache)
    raise TypeError(
        f"cache: expected True (in-process + ${_ENV_CACHE} if set), False (no caching), "
        f"or a path to a JSON file, got {type(cache).__name__}"
    )


def _load_cache_file(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError("unexpected version/layout")
        return {str(k): v for k, v in data["entries"].items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError) as e:
        warnings.warn(f"sparsify: ignoring unreadable tune cache {path}: {e}", stacklevel=3)
        return {}


def _save_cache_file(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = _load_cache_file(path)
    merged.update(entries)
    fd, tmp = tempfile.mkstemp(prefix=".sparsekit-tune-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _CACHE_VERSION, "entries": merged}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent readers see old or new, never partial
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_times(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int = 3, min_reps: int = 9,
    budget_s: float = 0.05, max_reps: int = 200,
) -> dict[str, float]:
    """Median seconds per call of each ``fns`` entry after ``warmup`` calls each.

    The candidates are timed round-robin (one call of each per round) so that interference
    from other processes or frequency changes hits all of them alike; rounds continue until
    ``min_reps`` rounds are done and about ``budget_s`` has passed (at most ``max_reps``).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() < t_end):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append(time.perf_counter() - t0)
        rounds += 1
    return {k: statistics.median(v) for k, v in samples.items()}


def _candidates(
    mask: Tensor, formats: Sequence[str], blocksizes: Sequence[tuple[int, int]], max_fill: float
) -> list[tuple[str, tuple[int, int] | None]]:
    out: list[tuple[str, tuple[int, int] | None]] = []
    if "csr" in formats:
        out.append(("csr", None))
    if "bsr" in formats:
        for bs in blocksizes:
            nnzb, nnz = block_fill(mask, bs)
            if nnz and nnzb * bs[0] * bs[1] <= max_fill * nnz:
                out.append(("bsr", tuple(bs)))
    return out


#: cap on the rotating copies per candidate (bounds set-up time for tiny layers)
_MAX_ROTATION_COPIES = 256


def _rotation_copies(cold_bytes: int, bytes_per_round: int) -> int:
    """Copies of every candidate so that cold timing really streams from memory.

    Candidates are timed round-robin, one call each per round, each call on its next copy, so
    between two uses of the same copy ``copies * bytes_per_round`` bytes are touched; that must
    exceed ``cold_bytes`` (twice the last-level cache) for the copy to have been evicted.
    ``cold_bytes <= 0`` means warm timing (one copy).
    """
    if cold_bytes <= 0 or bytes_per_round <= 0:
        return 1
    return max(1, min(_MAX_ROTATION_COPIES, math.ceil(cold_bytes / bytes_per_round)))


def _cycle(items: list[Any]) -> Callable[[], Any]:
    it = itertools.cycle(items)
    return lambda: next(it)


def _module_bytes(mod: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in mod.buffers())


def _measure_layer(
    lin: nn.Linear,
    cands: list[tuple[str, tuple[int, int] | None]],
    batch_sizes: Sequence[int],
    value_dtype: torch.dtype,
    backend: str,
    cold_bytes: int = 0,
) -> tuple[dict[str, float], dict[str, float]]:
    global _MEASUREMENTS
    _MEASUREMENTS += 1
    dev = lin.weight.device
    w = lin.weight.detach()
    b = None if lin.bias is None else lin.bias.detach()
    wt = w.t().contiguous()
    gen = torch.Generator(device="cpu").manual_seed(0)
    dense: dict[str, float] = {"F.linear": 0.0, "matmul(W.T)": 0.0}
    sparse: dict[str, float] = {}
    mods = {}
    for fmt, bs in cands:
        mods[_variant_name(fmt, bs)] = SparseLinear.from_dense(
            lin, format=fmt, blocksize=bs, value_dtype=value_dtype, backend=backend
        )
        sparse[_variant_name(fmt, bs)] = 0.0
    dense_bytes = w.numel() * w.element_size()
    n_copies = _rotation_copies(
        cold_bytes, 2 * dense_bytes + sum(_module_bytes(m) for m in mods.values())
    )
    # Copy 0 is the original; the others are independent buffers (deep copies), so rotating
    # through them makes every call fetch its weights from memory when cold_bytes > 0.
    next_w = _cycle([w] + [w.clone() for _ in range(n_copies - 1)])
    next_wt = _cycle([wt] + [wt.clone() for _ in range(n_copies - 1)])
    next_mod = {
        name: _cycle([mod] + [copy.deepcopy(mod) for _ in range(n_copies - 1)])
        for name, mod in mods.items()
    }
    with torch.inference_mode():
        for n in batch_sizes:
            x = torch.randn((n, lin.in_features), generator=gen).to(device=dev, dtype=w.dtype)
            fns: dict[str, Callable[[], Any]] = {
                "F.linear": lambda x=x: F.linear(x, next_w(), b)
            }
            if b is None:
                fns["matmul(W.T)"] = lambda x=x: torch.matmul(x, next_wt())
            else:
                fns["matmul(W.T)"] = lambda x=x: torch.addmm(b, x, next_wt())
            for name in mods:
                fns["sparse:" + name] = lambda nm=next_mod[name], x=x: nm()(x)
            for k, t in _median_times(fns, dev).items():
                if k.startswith("sparse:"):
                    sparse[k[7:]] += t
                else:
                    dense[k] += t
    return dense, sparse


def heuristic_choice(
    density: float,
    mask: Tensor,
    formats: Sequence[str],
    blocksizes: Sequence[tuple[int, int]],
    max_fill: float,
) -> tuple[str, tuple[int, int] | None, str]:
    """The ``tune=False`` rule (no measurement).

    * BSR with the largest-area candidate block whose fill ratio is <= ``max_fill``, if the
      *block* density (stored entries / M*K) is <= 0.5;
    * else CSR if density <= 0.3 (below ~30% nonzeros a CSR kernel reading 6 bytes per nonzero
      (bf16/fp32 value + uint16 index) moves clearly less memory than the dense weight, which
      dominates batch-1 latency);
    * else dense.
    """
    m, k = mask.shape
    if "bsr" in formats:
        best = None
        for _fmt, bs in _candidates(mask, ["bsr"], blocksizes, max_fill):
            nnzb, _ = block_fill(mask, bs)
            area = bs[0] * bs[1]
            if area > 1 and nnzb * area <= 0.5 * m * k and (best is None or area > best[0]):
                best = (area, bs)
        if best is not None:
            return "bsr", best[1], "heuristic: blocky pattern"
    if "csr" in formats and density <= 0.3:
        return "csr", None, "heuristic: density <= 0.3"
    return "dense", None, "heuristic: too dense"


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _iter_linears(model: nn.Module) -> Iterable[tuple[str, nn.Module, str, nn.Linear]]:
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear:  # subclasses (e.g. NonDynamicallyQuantizable) skipped
                full = f"{name}.{cname}" if name else cname
                yield full, mod, cname, child


def _cold_bytes(model: nn.Module, cold: bool | None) -> int:
    """Bytes a cold measurement must stream between reuses (2x LLC), or 0 for warm timing."""
    from sparsekit.bench.harness import llc_bytes  # sysfs read, no heavy imports

    llc = llc_bytes()
    if cold is None:
        total = sum(
            lin.weight.numel() * lin.weight.element_size()
            for _n, _p, _c, lin in _iter_linears(model)
            if lin.weight.device.type == "cpu"
        )
        cold = total > llc
    return 2 * llc if cold else 0


def sparsify(
    model: nn.Module,
    *,
    min_sparsity: float = 0.3,
    formats: Sequence[str] = ("csr", "bsr"),
    blocksizes: Sequence[tuple[int, int]] = DEFAULT_BLOCKSIZES,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    batch_sizes: Sequence[int] = (1,),
    tune: bool = True,
    value_dtype: torch.dtype | None = None,
    cache: bool | str | os.PathLike[str] = True,
    backend: str = "auto",
    max_fill: float = 1.5,
    margin: float = 0.05,
    cold: bool | None = None,
    index_encoding: str | None = None,
) -> SparsifyReport:
    """Replace eligible :class:`torch.nn.Linear` layers of ``model`` by SparseLinear, in place.

    Parameters
    ----------
    model : nn.Module
        Modified in place (exact ``nn.Linear`` instances only; subclasses are left alone).
    min_sparsity : float in [0, 1]
        Layers whose weight has a smaller fraction of exact zeros stay dense.
    formats : sequence of {"csr", "bsr"}
        Candidate sparse formats.
    blocksizes : sequence of (r, c)
        BSR block shapes to consider (those with fill ratio > ``max_fill`` are skipped).
    filter_fn : callable(name, module) -> bool, optional
        Extra eligibility predicate (e.g. skip the classifier head).
    batch_sizes : sequence of int
        Batch sizes to tune for; the decision minimises the sum of the medians.
    tune : bool
        Measure on this machine (True) or use :func:`heuristic_choice` (False).
    value_dtype : torch.dtype, optional
        Stored value dtype; default the layer weight's dtype (fp32/bf16/fp16). torch.int8:
        weight-only int8 with per-row scales (each layer's report has ``quantization``).
    cache : bool or path
        True: in-process cache, persisted to ``$SPARSEKIT_TUNE_CACHE`` if set; a path: also
        persisted to that JSON file; False: always measure.
    backend : str
        Kernel backend for the created layers.
    index_encoding : {"plain", "delta8", "auto"}, optional
        Column index coding of the created layers (see ``CSRMatrix.from_dense``).
    max_fill : float
        Largest BSR fill ratio (stored entries / nonzeros) considered.
    margin : float
        Sparse must beat the best dense formulation by this fraction to be chosen.
    cold : bool, optional
        Time each layer with its weights coming from memory (rotating copies beyond twice the
        last-level cache), as inside a model that does not fit in the cache. None (default):
        True on the CPU when the model's ``nn.Linear`` weights together exceed the last-level
        cache, else False. Cold tuning needs about twice the cache size in transient memory.

    Returns
    -------
    SparsifyReport
        One :class:`LayerReport` per nn.Linear seen (including those kept dense).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise ValueError(
            "model: a bare nn.Linear cannot be replaced in place; wrap it in a container or "
            "use SparseLinear.from_dense(linear)"
        )
    if not (isinstance(min_sparsity, (int, float)) and 0.0 <= min_sparsity <= 1.0):
        raise ValueError(f"min_sparsity: expected a float in [0, 1], got {min_sparsity!r}")
    formats = tuple(formats)
    bad = [f for f in formats if f not in ("csr", "bsr")]
    if not formats or bad:
        raise ValueError(f"formats: expected a non-empty subset of ('csr', 'bsr'), got {formats}")
    blocksizes = tuple(tuple(int(v) for v in bs) for bs in blocksizes)
    for bs in blocksizes:
        if len(bs) != 2 or min(bs) <= 0:
            raise ValueError(f"blocksizes: expected pairs of positive ints, got {bs}")
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or any(not isinstance(n, int) or n <= 0 for n in batch_sizes):
        raise ValueError(f"batch_sizes: expected positive ints, got {batch_sizes}")
    if value_dtype is not None and value_dtype not in (*_ops.FLOAT_DTYPES, torch.int8):
        raise TypeError(
            f"value_dtype: expected float32, bfloat16, float16 or int8, got {value_dtype}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable, got {type(filter_fn).__name__}")
    if cold is not None and not isinstance(cold, bool):
        raise TypeError(f"cold: expected a bool or None, got {type(cold).__name__}")
    cold_bytes = _cold_bytes(model, cold) if tune else 0
    use_cache = cache is not False
    cache_path = _resolve_cache_path(cache)
    file_entries = _load_cache_file(cache_path) if cache_path is not None else {}
    new_entries: dict[str, dict[str, Any]] = {}

    layers: list[LayerReport] = []
    for name, parent, cname, lin in _iter_linears(model):
        w = lin.weight.detach()
        m, k = w.shape
        mask = w != 0
        nnz = int(mask.sum())
        density = nnz / (m * k)
        vdt = value_dtype or (w.dtype if w.dtype in _ops.FLOAT_DTYPES else torch.float32)
        if filter_fn is not None and not filter_fn(name, lin):
            layers.append(LayerReport(name, (m, k), density, "dense", None, "filtered out"))
            continue
        if 1.0 - density < min_sparsity:
            layers.append(LayerReport(
                name, (m, k), density, "dense", None,
                f"sparsity {1 - density:.3f} < min_sparsity {min_sparsity}",
            ))
            continue
        if not w.is_floating_point():
            layers.append(LayerReport(name, (m, k), density, "dense", None, "non-float weight"))
            continue

        if not tune:
            fmt, bs, why = heuristic_choice(density, mask, formats, blocksizes, max_fill)
            rep = LayerReport(name, (m, k), density, fmt, bs, why)
        else:
            key_obj = {
                "v": _CACHE_VERSION,
                "shape": [m, k],
                "pattern": _pattern_stats(mask, blocksizes),
                "weight_dtype": str(w.dtype),
                "value_dtype": str(vdt),
                "bias": lin.bias is not None,
                "device": w.device.type,
                "hw": _hw_name(w.device),
                "threads": _num_threads(),
                "backend": backend,
                "batch_sizes": list(batch_sizes),
                "formats": list(formats),
                "blocksizes": [list(b) for b in blocksizes],
                "max_fill": max_fill,
                "margin": margin,
                "cold": cold_bytes > 0,
                **_versions(),
            }
            key = _cache_key(key_obj)
            with _CACHE_LOCK:
                dec = _MEM_CACHE.get(key) if use_cache else None
            if dec is None and use_cache:
                dec = file_entries.get(key)
            from_cache = dec is not None
            if dec is None:
                cands = _candidates(mask, formats, blocksizes, max_fill)
                dense_t, sparse_t = _measure_layer(
                    lin, cands, batch_sizes, vdt, backend,
                    cold_bytes if w.device.type == "cpu" else 0,
                )
                best_dense = min(dense_t.values())
                fmt, bs, why = "dense", None, "dense wins"
                if sparse_t:
                    vname = min(sparse_t, key=sparse_t.__getitem__)
                    if sparse_t[vname] < (1.0 - margin) * best_dense:
                        fmt, bs = next((f, b) for f, b in cands if _variant_name(f, b) == vname)
                        why = "fastest"
                else:
                    why = "no sparse candidate"
                dec = {
                    "choice": fmt,
                    "blocksize": None if bs is None else list(bs),
                    "reason": why,
                    "dense_times": dense_t,
                    "sparse_times": sparse_t,
                }
                if use_cache:
                    with _CACHE_LOCK:
                        _MEM_CACHE[key] = dec
                    new_entries[key] = dec
            elif use_cache:
                with _CACHE_LOCK:
                    _MEM_CACHE[key] = dec
            bs = None if dec["blocksize"] is None else tuple(dec["blocksize"])
            rep = LayerReport(
                name, (m, k), density, dec["choice"], bs, dec["reason"],
                dict(dec["dense_times"]), dict(dec["sparse_times"]), from_cache,
            )
        layers.append(rep)
        if rep.choice != "dense":
            new = SparseLinear.from_dense(
                lin, format=rep.choice, blocksize=rep.blocksize, value_dtype=vdt, backend=backend,
                index_encoding=index_encoding,
            )
            new.train(lin.training)
            rep.quantization = new.quantization
            setattr(parent, cname, new)
    if cache_path is not None and new_entries:
        _save_cache_file(cache_path, new_entries)
    return SparsifyReport(layers, batch_sizes, bool(tune))


def densify(model: nn.Module) -> nn.Module:
    """Replace every SparseLinear in ``model`` (in place) by an nn.Linear with the exact dense
    weight and the same bias (see :meth:`SparseLinear.to_linear` for the dtype); returns
    ``model``.

    If ``model`` itself is a SparseLinear, the replacement nn.Linear is returned instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, SparseLinear):
        return model.to_linear()
    for _name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, SparseLinear):
                lin = child.to_linear()
                lin.train(child.training)
                setattr(mod, cname, lin)
    return model


def _fmt_seconds(s: float | None) -> str:  # pragma: no cover - debugging helper
    return "-" if s is None or math.isnan(s) else f"{s * 1e6:.1f}us"
