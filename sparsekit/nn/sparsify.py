"""sparsify(model) / densify(model): swap pruned layers for sparse modules in place.

Covered: ``nn.Linear``, ``transformers``' ``Conv1D``, ``nn.MultiheadAttention`` and groups=1
``nn.Conv2d`` (see :func:`sparsify`).

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
weights whose round-robin working set exceeds twice the last-level cache
(:func:`sparsekit.timing.rotation_count`); small models are timed warm, as they run. Timing is
:func:`sparsekit.timing.measure_interleaved`, the method ``sparsekit bench`` uses too.

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
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekit import ops, timing
from sparsekit._cpuinfo import cpu_key
from sparsekit._layers import (
    Filter,
    Selector,
    conv2d_extra_padding,
    layer_kind,
    prunable_weight,
    unsupported_reason,
    weight_2d,
)
from sparsekit.nn.attention import SparseMultiheadAttention
from sparsekit.nn.conv import SparseConv2d
from sparsekit.nn.linear import (
    DEFAULT_BLOCKSIZES,
    DEFAULT_MAX_FILL,
    FusedActivation,
    SparseLinear,
    block_fill,
    fused_placeholder_after,
    heuristic_choice,
    linear_from_weight,
)

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
    """Decision for one parametrised module (or one projection of an attention module).

    ``status`` is ``"converted"`` (now sparse), ``"dense"`` (supported, kept dense: measured
    slower, below ``min_sparsity``, excluded / filtered out) or ``"unsupported"`` (no sparse
    path for this module; ``reason`` says why). ``shape`` is the ``(out, K)`` matrix shape
    (empty for unsupported modules). Times are medians in seconds, summed over the requested
    batch sizes (None: not measured). ``dense_formulation`` names the dense time the decision
    was made against: the formulation the module itself runs (``"F.linear"`` for ``nn.Linear``
    and attention projections, ``"matmul(W.T)"`` for ``transformers``' ``Conv1D``, whose
    weight is stored transposed); ``speedup`` = that time / chosen time, what converting
    gained. ``best_dense_time`` is the fastest dense formulation measured.
    """

    name: str
    shape: tuple[int, ...]
    density: float
    choice: str  # "dense" | "csr" | "bsr"
    blocksize: tuple[int, int] | None
    reason: str
    dense_times: dict[str, float] = dataclasses.field(default_factory=dict)
    sparse_times: dict[str, float] = dataclasses.field(default_factory=dict)
    from_cache: bool = False
    module_type: str = "Linear"
    status: str = ""
    #: int8 quantization error of the stored weights (``CSRMatrix.quantization``), or None.
    quantization: dict[str, float] | None = None
    dense_formulation: str = ""

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "dense" if self.choice == "dense" else "converted"

    @property
    def best_dense_time(self) -> float | None:
        return min(self.dense_times.values()) if self.dense_times else None

    @property
    def dense_time(self) -> float | None:
        """The time of the module's own dense formulation (``dense_formulation``; the fastest
        one measured where it is not named)."""
        t = self.dense_times.get(self.dense_formulation)
        return self.best_dense_time if t is None else t

    @property
    def chosen_time(self) -> float | None:
        if self.choice == "dense":
            return self.dense_time
        return self.sparse_times.get(_variant_name(self.choice, self.blocksize))

    @property
    def speedup(self) -> float | None:
        d, c = self.dense_time, self.chosen_time
        if d is None or c is None or c <= 0:
            return None
        return d / c

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["status"] = self.status
        d["blocksize"] = None if self.blocksize is None else list(self.blocksize)
        d["best_dense_time"] = self.best_dense_time
        d["dense_time"] = self.dense_time
        d["chosen_time"] = self.chosen_time
        d["speedup"] = self.speedup
        return d


@dataclasses.dataclass
class SparsifyReport:
    """What :func:`sparsify` did; ``str(report)`` is a readable table."""

    layers: list[LayerReport]
    batch_sizes: tuple[int, ...]
    tuned: bool
    #: (layer, activation module) names of the activations fused into sparse layers
    fused: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def replaced(self) -> list[str]:
        return [lr.name for lr in self.layers if lr.choice != "dense"]

    def __getitem__(self, name: str) -> LayerReport:
        for lr in self.layers:
            if lr.name == name:
                return lr
        raise KeyError(name)

    def by_status(self, status: str) -> list[LayerReport]:
        """Rows with ``status`` ``"converted"``, ``"dense"`` or ``"unsupported"``."""
        return [lr for lr in self.layers if lr.status == status]

    def summary(self) -> dict[str, dict[str, int]]:
        """``{module_type: {status: count}}`` over all rows."""
        out: dict[str, dict[str, int]] = {}
        for lr in self.layers:
            d = out.setdefault(lr.module_type, {})
            d[lr.status] = d.get(lr.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "tuned": self.tuned,
            "summary": self.summary(),
            "layers": [lr.to_dict() for lr in self.layers],
            "fused": [list(f) for f in self.fused],
        }

    def __str__(self) -> str:
        supported = [lr for lr in self.layers if lr.status != "unsupported"]
        head = (
            f"sparsify: {len(self.replaced)}/{len(supported)} supported layers replaced, "
            f"{len(self.layers) - len(supported)} unsupported "
            f"({'tuned' if self.tuned else 'heuristic'}, batch sizes {list(self.batch_sizes)})"
        )
        per_type = "; ".join(
            f"{t}: " + ", ".join(f"{n} {st}" for st, n in sorted(c.items()))
            for t, c in self.summary().items())
        head += "\n" + per_type
        if self.fused:
            head += "\nfused activations: " + ", ".join(f"{a} into {lyr}"
                                                      for lyr, a in self.fused)
        rows = [("layer", "type", "shape", "density", "status", "choice", "dense", "sparse",
                 "speedup", "note")]
        for lr in self.layers:
            choice = _variant_name(lr.choice, lr.blocksize)
            d = lr.dense_time
            best_sparse = min(lr.sparse_times.values()) if lr.sparse_times else None
            sp = lr.speedup
            rows.append((
                lr.name or "<root>",
                lr.module_type,
                "x".join(map(str, lr.shape)) or "-",
                "-" if lr.status == "unsupported" else f"{lr.density:.3f}",
                lr.status,
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
    return cpu_key()


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
    relu: nn.ReLU | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median times (summed over ``batch_sizes``) of the dense formulations and of each sparse
    candidate of ``lin``. ``relu``: the ``nn.ReLU`` that follows the layer where it would be
    fused (:func:`_fuse_activations`): each formulation is then timed as the model would run
    it, the dense ones followed by that ReLU, the sparse ones with the ReLU in their epilogue."""
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
            lin, format=fmt, blocksize=bs, value_dtype=value_dtype, backend=backend,
            activation=None if relu is None else "relu",
        )
        sparse[_variant_name(fmt, bs)] = 0.0
    dense_bytes = w.numel() * w.element_size()
    # Candidates run round-robin, one call each per round on its next copy: between two uses
    # of a copy, copies * bytes_per_round bytes are touched, which must exceed cold_bytes.
    bytes_per_round = 2 * dense_bytes + sum(_module_bytes(m) for m in mods.values())
    n_copies = 1 if cold_bytes <= 0 else timing.rotation_count(
        bytes_per_round, factor=1.0, llc=cold_bytes, max_copies=_MAX_ROTATION_COPIES)
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
            fns: dict[str, Callable[[int], Any]] = {
                "F.linear": lambda _i, x=x: F.linear(x, next_w(), b)
            }
            if b is None:
                fns["matmul(W.T)"] = lambda _i, x=x: torch.matmul(x, next_wt())
            else:
                fns["matmul(W.T)"] = lambda _i, x=x: torch.addmm(b, x, next_wt())
            if relu is not None:  # then the ReLU's own call (F.relu with its inplace flag)
                fns = {k: lambda i, f=f: relu.forward(f(i)) for k, f in fns.items()}
            # forward(), not __call__: the dense side is F.linear, not nn.Linear.__call__, and
            # the module-call overhead (hooks dispatch, ~1-2 us) is the same whichever layer
            # the model ends up holding, so it must not count against the sparse one
            for name in mods:
                fns["sparse:" + name] = lambda _i, nm=next_mod[name], x=x: nm().forward(x)
            for k, st in timing.measure_interleaved(fns, sync=timing.sync_for(dev)).items():
                if k.startswith("sparse:"):
                    sparse[k[7:]] += st.median_s
                else:
                    dense[k] += st.median_s
    return dense, sparse


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _own_params(mod: nn.Module) -> bool:
    return any(p is not None for p in mod._parameters.values())


def _iter_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Every module with parameters of its own (plus attention modules), outermost first;
    the children of attention modules and of sparsekit modules are covered by their parent."""
    covered: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        if isinstance(mod, (nn.MultiheadAttention, SparseMultiheadAttention, SparseConv2d,
                            SparseLinear)):
            covered.append(name)
            if isinstance(mod, nn.MultiheadAttention) or name:
                yield name, mod
            continue
        if _own_params(mod):
            yield name, mod


def _iter_linears(model: nn.Module) -> Iterable[tuple[str, nn.Module, str, nn.Linear]]:
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear:  # subclasses (e.g. NonDynamicallyQuantizable) skipped
                full = f"{name}.{cname}" if name else cname
                yield full, mod, cname, child


def _matrix_bytes(model: nn.Module) -> int:
    total = 0
    for _n, mod in _iter_layers(model):
        if layer_kind(mod) is not None:
            w = prunable_weight(mod)
            if w is not None and w.device.type == "cpu":
                total += w.numel() * w.element_size()
    return total


def _cold_bytes(model: nn.Module, cold: bool | None) -> int:
    """Bytes a cold measurement must stream between reuses (2x LLC), or 0 for warm timing."""
    llc = timing.llc_bytes()
    if cold is None:
        cold = _matrix_bytes(model) > llc
    return 2 * llc if cold else 0


def _record_conv_inputs(model: nn.Module, example_inputs: Any) -> dict[int, tuple[Any, ...]]:
    """``id(conv) -> (C, H, W, channels_last)`` of every Conv2d's input in one forward pass."""
    seen: dict[int, tuple[Any, ...]] = {}

    def hook(m: nn.Module, args: tuple) -> None:
        x = args[0]
        if isinstance(x, Tensor) and x.dim() == 4 and id(m) not in seen:
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            seen[id(m)] = (x.shape[1], x.shape[2], x.shape[3], cl)

    hs = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in hs:
            h.remove()
    return seen


def _measure_conv(conv: nn.Conv2d, cands: list[tuple[str, tuple[int, int] | None]],
                  batch_sizes: Sequence[int], shape: tuple[Any, ...], value_dtype: torch.dtype,
                  backend: str) -> tuple[dict[str, float], dict[str, float]]:
    global _MEASUREMENTS
    _MEASUREMENTS += 1
    c, h, w, cl = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    dense: dict[str, float] = {"conv2d": 0.0}
    sparse: dict[str, float] = {}
    mods = {_variant_name(f, b): SparseConv2d.from_module(conv, f, b, value_dtype, backend)
            for f, b in cands}
    with torch.inference_mode():
        for n in batch_sizes:
            x = torch.randn((n, c, h, w), generator=gen).to(conv.weight.device,
                                                             conv.weight.dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            fns: dict[str, Callable[[int], Any]] = {"conv2d": lambda _i, x=x: conv(x)}
            for nm, mod in mods.items():
                fns["sparse:" + nm] = lambda _i, mod=mod, x=x: mod(x)
            sync = timing.sync_for(conv.weight.device)
            for k, st in timing.measure_interleaved(fns, sync=sync).items():
                if k.startswith("sparse:"):
                    sparse[k[7:]] = sparse.get(k[7:], 0.0) + st.median_s
                else:
                    dense[k] += st.median_s
    return dense, sparse


def sparsify(
    model: nn.Module,
    *,
    min_sparsity: float = 0.3,
    formats: Sequence[str] = ("csr", "bsr"),
    blocksizes: Sequence[tuple[int, int]] = DEFAULT_BLOCKSIZES,
    include: Filter = None,
    exclude: Filter = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    batch_sizes: Sequence[int] = (1,),
    tune: bool = True,
    value_dtype: torch.dtype | None = None,
    cache: bool | str | os.PathLike[str] = True,
    backend: str = "auto",
    max_fill: float = DEFAULT_MAX_FILL,
    margin: float = 0.05,
    cold: bool | None = None,
    example_inputs: Any = None,
    index_encoding: str | None = None,
    fuse_activations: bool = True,
) -> SparsifyReport:
    """Replace the pruned layers of ``model`` by sparse modules, in place.

    Covered layers (their weight matrix is what pruning zeroed, see :mod:`sparsekit._layers`):

    * ``nn.Linear`` (and subclasses that keep ``nn.Linear.forward``) -> :class:`SparseLinear`;
    * ``transformers``' ``Conv1D`` (GPT-2 style, weight ``(in, out)``) -> :class:`SparseLinear`
      over the transposed weight (``transformers`` is never imported by sparsekit);
    * ``nn.MultiheadAttention`` with a packed ``in_proj_weight`` ->
      :class:`~sparsekit.nn.SparseMultiheadAttention` (q/k/v and output projections decided
      separately: the in-projection as one ``(3E, E)`` matrix, ``out_proj`` as a Linear);
    * ``nn.Conv2d`` with ``groups=1`` and zero padding -> :class:`~sparsekit.nn.SparseConv2d`.

    Every other module that owns parameters (depthwise / grouped convolutions, norms,
    embeddings, ...) is left as it is and listed as ``"unsupported"`` with the reason.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    min_sparsity : float in [0, 1]
        Layers whose weight has a smaller fraction of exact zeros stay dense.
    formats : sequence of {"csr", "bsr"}
        Candidate sparse formats.
    blocksizes : sequence of (r, c)
        BSR block shapes to consider (those with fill ratio > ``max_fill`` are skipped).
    include, exclude : str, type, callable or iterable of them, optional
        Which layers may be converted: glob patterns on qualified module names, module types or
        callables ``(name, module) -> bool``, read exactly as :func:`sparsekit.prune.prune`
        reads them (each pattern or type must match some module).
    filter_fn : callable(name, module) -> bool, optional
        Extra eligibility predicate (e.g. skip the classifier head).
    batch_sizes : sequence of int
        Batch sizes to tune for (rows of a Linear; images of a Conv2d); the decision minimises
        the sum of the medians.
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
        Sparse must beat the layer's own dense formulation by this fraction to be chosen: what
        the module runs if it stays (``F.linear`` for ``nn.Linear`` and attention projections,
        an ``addmm`` on the stored transposed weight for ``Conv1D``; the fastest dense
        convolution for ``Conv2d``). Every dense formulation measured is in the report.
    cold : bool, optional
        Time each layer with its weights coming from memory (rotating copies beyond twice the
        last-level cache), as inside a model that does not fit in the cache. None (default):
        True on the CPU when the model's weight matrices together exceed the last-level
        cache, else False. Cold tuning needs about twice the cache size in transient memory.
    example_inputs : Tensor, tuple or dict, optional
        One input of the model (``model(x)``, ``model(*t)`` or ``model(**d)``), run once to
        record every ``Conv2d``'s input size, at which convolutions are then measured against
        the dense convolution (with ``batch_sizes`` images). Without it, convolutions are
        decided by :func:`heuristic_choice`.
    fuse_activations : bool
        Where an ``nn.ReLU`` directly follows a :class:`SparseLinear` in an ``nn.Sequential``,
        fuse it into the layer (``activation="relu"``: the kernels apply it as they store each
        output) and put a :class:`~sparsekit.nn.FusedActivation` in its place, which passes
        its input through; the model computes the same, with one activation call less per
        layer. :func:`densify` puts the ReLU back. Subclasses of ``nn.Sequential`` (which may
        override ``forward``) and layers used more than once are left alone; a model that also
        calls a fused layer outside its ``nn.Sequential`` needs ``False``. With ``tune``, such
        a layer is timed as the model would run it: dense followed by the ReLU's call, against
        sparse with the ReLU fused (at batch 1 the saved call can decide the layer).

    Returns
    -------
    SparsifyReport
        One :class:`LayerReport` per parametrised module (two for an attention module: its
        in-projection and ``out_proj``), converted, kept dense or unsupported, with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if layer_kind(model) is not None and not isinstance(model, nn.MultiheadAttention):
        raise ValueError(
            f"model: a bare {type(model).__name__} cannot be replaced in place; wrap it in a "
            f"container or use SparseLinear.from_dense(linear)"
        )
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("model: a bare nn.MultiheadAttention cannot be replaced in place; wrap "
                         "it in a container or use SparseMultiheadAttention.from_module")
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
    if value_dtype is not None and value_dtype not in (*ops.FLOAT_DTYPES, torch.int8):
        raise TypeError(
            f"value_dtype: expected float32, bfloat16, float16 or int8, got {value_dtype}")
    if cold is not None and not isinstance(cold, bool):
        raise TypeError(f"cold: expected a bool or None, got {type(cold).__name__}")
    if not isinstance(fuse_activations, bool):
        raise TypeError(
            f"fuse_activations: expected a bool, got {type(fuse_activations).__name__}")
    selector = Selector(include, exclude, filter_fn)
    selector.check_against(model)
    conv_inputs = (_record_conv_inputs(model, example_inputs)
                   if example_inputs is not None else {})
    cold_bytes = _cold_bytes(model, cold) if tune else 0
    use_cache = cache is not False
    cache_path = _resolve_cache_path(cache)
    file_entries = _load_cache_file(cache_path) if cache_path is not None else {}
    new_entries: dict[str, dict[str, Any]] = {}

    def vdt_of(w: Tensor) -> torch.dtype:
        return value_dtype or (w.dtype if w.dtype in ops.FLOAT_DTYPES else torch.float32)

    def decide(name: str, w: Tensor, has_bias: bool, mtype: str,
               lin_factory: Callable[[], nn.Linear] | None,
               conv: nn.Conv2d | None = None, relu: nn.ReLU | None = None,
               dense_formulation: str = "F.linear") -> LayerReport:
        m, k = w.shape
        mask = w != 0
        nnz = int(mask.sum())
        density = nnz / (m * k)
        vdt = vdt_of(w)

        def row(choice: str, bs: Any, why: str, *rest: Any, **kw: Any) -> LayerReport:
            return LayerReport(name, (m, k), density, choice, bs, why, *rest,
                               module_type=mtype, **kw)

        if 1.0 - density < min_sparsity:
            return row("dense", None, f"sparsity {1 - density:.3f} < min_sparsity {min_sparsity}")
        if not w.is_floating_point():
            return row("dense", None, "non-float weight")
        if conv is not None and (not tune or id(conv) not in conv_inputs):
            fmt, bs, why = heuristic_choice(mask, formats, blocksizes, max_fill)
            if tune:
                why += " (no example_inputs to measure the convolution at)"
            return row(fmt, bs, why)
        if not tune:
            fmt, bs, why = heuristic_choice(mask, formats, blocksizes, max_fill)
            return row(fmt, bs, why)
        if conv is not None:
            cands = _candidates(mask, formats, blocksizes, max_fill)
            dense_t, sparse_t = _measure_conv(conv, cands, batch_sizes, conv_inputs[id(conv)],
                                              vdt, backend)
            fmt, bs, why = _pick(cands, dense_t, sparse_t, margin)
            return row(fmt, bs, why, dense_t, sparse_t)
        key_obj = {
            "v": _CACHE_VERSION,
            "shape": [m, k],
            "pattern": _pattern_stats(mask, blocksizes),
            "weight_dtype": str(w.dtype),
            "value_dtype": str(vdt),
            "bias": has_bias,
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
            "relu": relu is not None,
            "dense_formulation": dense_formulation,
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
                lin_factory(), cands, batch_sizes, vdt, backend,
                cold_bytes if w.device.type == "cpu" else 0, relu,
            )
            fmt, bs, why = _pick(cands, dense_t, sparse_t, margin, dense_formulation)
            if relu is not None:
                why += " (timed with the next ReLU: fused when sparse)"
            dec = {"choice": fmt, "blocksize": None if bs is None else list(bs), "reason": why,
                   "dense_times": dense_t, "sparse_times": sparse_t}
            if use_cache:
                new_entries[key] = dec
        if use_cache:
            with _CACHE_LOCK:
                _MEM_CACHE[key] = dec
        bs = None if dec["blocksize"] is None else tuple(dec["blocksize"])
        return row(dec["choice"], bs, dec["reason"], dict(dec["dense_times"]),
                   dict(dec["sparse_times"]), from_cache, dense_formulation=dense_formulation)

    # The ReLU that _fuse_activations will fuse into each layer, if converted: tuning times
    # the layer as the model will run it (dense + ReLU call, or sparse with the ReLU fused).
    relu_after = ({id(layer): act for *_, layer, _aname, act in _relu_pairs(model)}
                  if fuse_activations else {})
    layers: list[LayerReport] = []
    for name, mod in list(_iter_layers(model)):
        mtype = type(mod).__name__
        if isinstance(mod, (SparseLinear, SparseMultiheadAttention, SparseConv2d)):
            layers.append(LayerReport(name, (), 0.0, "dense", None, "already sparse",
                                      module_type=mtype, status="converted"))
            continue
        kind = layer_kind(mod)
        if kind == "linear" and type(mod).forward is not nn.Linear.forward:
            kind = None
        if kind == "conv" and not (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                   and mod.padding_mode == "zeros"
                                   and conv2d_extra_padding(mod) is not None):
            kind = None
        if kind is None or not name:
            why = unsupported_reason(mod) if name else "the model's root module holds parameters"
            layers.append(LayerReport(name, (), 0.0, "dense", None, why, module_type=mtype,
                                      status="unsupported"))
            continue
        parent_name, _, cname = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        why_not = selector.why_not(name, mod)
        if kind == "mha":
            e = mod.embed_dim
            w_in = mod.in_proj_weight.detach()
            b_in = None if mod.in_proj_bias is None else mod.in_proj_bias.detach()
            op = mod.out_proj
            out_name = f"{name}.out_proj"
            why_out = why_not or selector.why_not(out_name, op)
            if why_not:
                r_in = LayerReport(name, (3 * e, e), 0.0, "dense", None, why_not,
                                   module_type=mtype)
            else:
                r_in = decide(name, w_in, b_in is not None, mtype,
                              lambda w=w_in, b=b_in: linear_from_weight(w, b))
            if why_out:
                r_out = LayerReport(out_name, tuple(op.weight.shape), 0.0, "dense", None,
                                    why_out, module_type=type(op).__name__)
            else:
                r_out = decide(out_name, op.weight.detach(), op.bias is not None,
                               type(op).__name__, lambda op=op: op)
            layers += [r_in, r_out]
            if r_in.choice != "dense" or r_out.choice != "dense":
                new = SparseMultiheadAttention.from_module(
                    mod, None if r_in.choice == "dense" else (r_in.choice, r_in.blocksize),
                    None if r_out.choice == "dense" else (r_out.choice, r_out.blocksize),
                    value_dtype=vdt_of(w_in), backend=backend)
                setattr(parent, cname, new)
            continue
        w2 = weight_2d(mod)
        if why_not:
            layers.append(LayerReport(name, tuple(w2.shape), 0.0, "dense", None, why_not,
                                      module_type=mtype))
            continue
        bias = getattr(mod, "bias", None)
        bias = None if bias is None else bias.detach()
        if kind == "linear":
            rep = decide(name, w2, bias is not None, mtype, lambda mod=mod: mod,
                         relu=relu_after.get(id(mod)))
        elif kind == "conv1d_hf":
            rep = decide(name, w2, bias is not None, mtype,
                         lambda w=w2, b=bias: linear_from_weight(w, b),
                         relu=relu_after.get(id(mod)), dense_formulation="matmul(W.T)")
        else:
            rep = decide(name, w2, bias is not None, mtype, None, conv=mod)
        layers.append(rep)
        if rep.choice == "dense":
            continue
        if kind == "conv":
            new = SparseConv2d.from_module(mod, rep.choice, rep.blocksize, vdt_of(w2), backend)
        else:
            src = mod if kind == "linear" else linear_from_weight(w2, bias)
            new = SparseLinear.from_dense(src, format=rep.choice, blocksize=rep.blocksize,
                                          value_dtype=vdt_of(w2), backend=backend,
                                          index_encoding=index_encoding)
            rep.quantization = new.quantization
        new.train(mod.training)
        setattr(parent, cname, new)
    if cache_path is not None and new_entries:
        _save_cache_file(cache_path, new_entries)
    fused = _fuse_activations(model) if fuse_activations else []
    return SparsifyReport(layers, batch_sizes, bool(tune), fused)


def _relu_pairs(
    model: nn.Module,
) -> list[tuple[nn.Sequential, str, str, nn.Module, str, nn.ReLU]]:
    """``(sequential, its name, layer name, layer, ReLU name, ReLU)`` for every child of a plain
    ``nn.Sequential`` (whose forward calls its children in order, so the ReLU's input is exactly
    the layer's output) that is directly followed by an ``nn.ReLU`` and appears only once in
    the model (a shared instance's other uses may not be followed by the ReLU)."""
    uses: dict[int, int] = {}
    for _n, mod in model.named_modules(remove_duplicate=False):
        uses[id(mod)] = uses.get(id(mod), 0) + 1
    pairs = []
    for name, seq in list(model.named_modules()):
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.named_children())
        for (lname, layer), (aname, act) in zip(children, children[1:]):
            if type(act) is nn.ReLU and uses[id(layer)] == 1:
                pairs.append((seq, name, lname, layer, aname, act))
    return pairs


def _fuse_activations(model: nn.Module) -> list[tuple[str, str]]:
    """Fuses each ``nn.ReLU`` that directly follows a :class:`SparseLinear` without an
    activation (:func:`_relu_pairs`); returns the (layer, ReLU) names."""
    fused = []
    for seq, name, lname, layer, aname, act in _relu_pairs(model):
        if isinstance(layer, SparseLinear) and layer.activation is None:
            layer.activation = "relu"
            setattr(seq, aname, FusedActivation(act))
            prefix = f"{name}." if name else ""
            fused.append((prefix + lname, prefix + aname))
    return fused


def _pick(cands: list[tuple[str, tuple[int, int] | None]], dense_t: dict[str, float],
          sparse_t: dict[str, float], margin: float, dense_formulation: str | None = None,
          ) -> tuple[str, tuple[int, int] | None, str]:
    """The fastest sparse candidate where it beats the dense time by ``margin``, else dense.
    The dense time is ``dense_formulation``'s (what the module runs if it stays), or the
    fastest dense time where none is named (convolutions)."""
    dense = dense_t.get(dense_formulation) if dense_formulation else None
    if dense is None:
        dense = min(dense_t.values())
    if not sparse_t:
        return "dense", None, "no sparse candidate"
    vname = min(sparse_t, key=sparse_t.__getitem__)
    if sparse_t[vname] < (1.0 - margin) * dense:
        fmt, bs = next((f, b) for f, b in cands if _variant_name(f, b) == vname)
        return fmt, bs, "fastest"
    return "dense", None, "dense wins"


def densify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify` in place: every SparseLinear becomes an nn.Linear with the exact
    dense weight and the same bias (see :meth:`SparseLinear.to_linear` for the dtype), every
    SparseConv2d an nn.Conv2d and every SparseMultiheadAttention an nn.MultiheadAttention;
    returns ``model``. (A ``transformers`` ``Conv1D`` converted by sparsify comes back as the
    equivalent nn.Linear.)

    Fused activations come back as the modules they were (each
    :class:`~sparsekit.nn.FusedActivation` is replaced by its ``original``); a SparseLinear
    whose ``activation`` was set without one (by hand) becomes ``nn.Sequential(linear, ReLU)``,
    so the model still computes the same.

    If ``model`` itself is one of these modules, its dense replacement is returned instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")

    def dense(mod: nn.Module, parent: nn.Module | None = None, name: str = "") -> nn.Module | None:
        if isinstance(mod, FusedActivation):
            return mod.original
        if isinstance(mod, SparseLinear):
            out: nn.Module = mod.to_linear()
            # children are replaced in order, so a placeholder after it is still in place
            if mod.activation is not None and (
                    parent is None or fused_placeholder_after(parent, name) is None):
                out = nn.Sequential(out, nn.ReLU())
        elif isinstance(mod, SparseConv2d):
            out = mod.to_conv()
        elif isinstance(mod, SparseMultiheadAttention):
            out = mod.to_module()
        else:
            return None
        return out.train(mod.training)

    top = dense(model)
    if top is not None:
        return top
    for name, _mod in list(model.named_modules()):
        try:
            mod = model.get_submodule(name)
        except AttributeError:  # inside a module already replaced
            continue
        for cname, child in list(mod.named_children()):
            new = dense(child, mod, cname)
            if new is not None:
                setattr(mod, cname, new)
    return model


def _fmt_seconds(s: float | None) -> str:  # pragma: no cover - debugging helper
    return "-" if s is None or math.isnan(s) else f"{s * 1e6:.1f}us"
