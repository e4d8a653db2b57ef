"""``sparsekit bench model``: a whole model, dense vs pruned + sparsified, end to end.

Models: the built-ins ``mnist-mlp`` (LeNet-300-100: 784-300-100-10) and ``bert-base`` (a stack of
BERT-base encoder layers, d=768, 12 heads, FFN 3072, every projection an ``nn.Linear``); a Hugging
Face model (``hf:<name or local path>``, needs ``transformers``); or a user model given as an
import path ``pkg.mod:factory`` (``factory()`` returns an ``nn.Module`` or ``(module,
example_input)``).  ``--weights file.safetensors`` loads weights written by
:func:`sparsekit.save` into the architecture first; a model that already contains SparseLinear
layers is benchmarked as saved against its densified copy.

Method: the same as the layer benchmark -- one input per batch size shared by every contender;
every contender checked against the float64 model output before it is timed (WRONG otherwise);
rotation over enough deep copies of the model that the copies exceed 2 x LLC.  Dense
contenders: the eager model (``F.linear`` in every ``nn.Linear``) and the same model with every
``nn.Linear`` computed by each dense formulation of :func:`harness.dense_contenders`; sparse:
the model pruned (:func:`sparsekit.prune.prune`, per-layer magnitude, unstructured for CSR,
``r x c`` blocks for BSR) and converted with :class:`sparsekit.nn.SparseLinear` for each
sparsekit backend, or with ``sparsekit.sparsify(tune=True)`` for the ``auto`` format.
"""

from __future__ import annotations

import copy
import gc
import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit.bench import harness as h
from sparsekit.bench.common import (
    DTYPES,
    ERROR,
    OK,
    UNAVAILABLE,
    UNSUPPORTED,
    Outcome,
    Progress,
    Unsupported,
    check_and_time,
    sparsekit_backends,
    unsupported_reason,
)
from sparsekit.bench.layer import DENSE_FAMILY, FormatSpec, add_speedups

BUILTIN_MODELS = ("mnist-mlp", "bert-base")
DENSE_FORMULATIONS = ("F.linear", "torch.matmul", "onednn", "mkl_packed", "numpy")


def _zoo():
    """The built-in models' module, ``benchmarks/models.py`` of the source tree (the model zoo
    is benchmark material, not part of the library)."""
    try:
        import benchmarks.models as zoo
    except ImportError as e:
        raise ValueError(
            f"--model: the built-in models ({', '.join(BUILTIN_MODELS)}) live in the repository's "
            "benchmarks/models.py, which is importable from a development install "
            f"(./tools/setup.sh); elsewhere pass pkg.mod:factory or hf:<name> ({e})"
        ) from e
    return zoo


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A model ready to benchmark: ``make_input(batch, gen)`` gives an fp32 CPU input."""

    name: str
    model: nn.Module
    make_input: Callable[[int, torch.Generator], Any]
    description: str
    float_input: bool = True  # False for token ids (never cast to the compute dtype)


def _first_linear_in(model: nn.Module) -> int:
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            return mod.in_features
        if hasattr(mod, "in_features") and hasattr(mod, "weight_values"):  # SparseLinear
            return int(mod.in_features)
    raise ValueError("model: contains no nn.Linear/SparseLinear; pass --input-shape")


def _shape_input(shape: Sequence[int] | None, default_feat: Callable[[], int]
                 ) -> Callable[[int, torch.Generator], torch.Tensor]:
    def make(batch: int, gen: torch.Generator) -> torch.Tensor:
        if shape:
            return torch.randn(batch, *shape, generator=gen)
        return torch.randn(batch, default_feat(), generator=gen)

    return make


def load_model(name: str, *, bert_layers: int = 4, seq_len: int = 128,
               input_shape: Sequence[int] | None = None, weights: str | None = None,
               data: str | None = None, seed: int = 0) -> ModelSpec:
    """Resolve ``--model`` into a :class:`ModelSpec` (fp32, CPU, eval mode).

    Raises
    ------
    ValueError
        Unknown built-in, malformed import path, missing file, or a factory returning no module.
    RuntimeError
        ``hf:`` models without ``transformers`` installed (message says how to install).
    """
    torch.manual_seed(seed)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--model: expected a built-in ({', '.join(BUILTIN_MODELS)}), "
                         f"hf:<name>, or pkg.mod:factory, got {name!r}")
    name = name.strip()
    if name.endswith(".safetensors") or (Path(name).suffix and Path(name).exists()):
        raise ValueError(
            f"--model: {name!r} is a weights file; a sparsekit.save file holds tensors, not the "
            f"architecture. Pass the architecture as --model (built-in or pkg.mod:factory) and "
            f"the file as --weights {name}"
        )
    if name == "mnist-mlp":
        model: nn.Module = _zoo().LeNet300100()
        make = _mnist_input(data) if data else _shape_input(input_shape or (784,), lambda: 784)
        spec = ModelSpec(name, model, make, "LeNet-300-100 (784-300-100-10, ReLU)")
    elif name == "bert-base":
        if not (isinstance(bert_layers, int) and bert_layers >= 1):
            raise ValueError(f"--layers: expected an int >= 1, got {bert_layers!r}")
        if not (isinstance(seq_len, int) and seq_len >= 1):
            raise ValueError(f"--seq-len: expected an int >= 1, got {seq_len!r}")
        model = _zoo().BertStack(bert_layers)
        spec = ModelSpec(
            name, model,
            _shape_input(input_shape or (seq_len, 768), lambda: 768),
            f"BERT-base encoder stack: {bert_layers} layers, d=768, 12 heads, FFN 3072, "
            f"seq {seq_len}",
        )
    elif name.startswith("hf:"):
        spec = _load_hf(name[3:], seq_len)
    elif ":" in name:
        spec = _load_factory(name, input_shape)
    else:
        raise ValueError(f"--model: unknown model {name!r}; expected one of "
                         f"{', '.join(BUILTIN_MODELS)}, hf:<name or path>, or pkg.mod:factory")
    if weights is not None:
        _apply_weights(spec.model, weights)
        spec.description += f"; weights from {weights}"
    spec.model.eval()
    return spec


def _mnist_input(path: str) -> Callable[[int, torch.Generator], torch.Tensor]:
    from sparsekit.datasets import load_mnist

    d = load_mnist(path)
    x = torch.as_tensor(d.x_test).reshape(len(d.x_test), -1).float()
    if x.shape[1] != 784:
        raise ValueError(f"--data: expected 28x28 MNIST images (784 features), got "
                         f"{x.shape[1]} features from {d.source}")

    def make(batch: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        return x[idx].clone()

    return make


def _load_factory(path: str, input_shape: Sequence[int] | None) -> ModelSpec:
    m = re.fullmatch(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)", path)
    if not m:
        raise ValueError(f"--model: expected an import path 'package.module:factory', got {path!r}")
    try:
        mod = importlib.import_module(m.group(1))
    except ImportError as exc:
        raise ValueError(f"--model: cannot import module {m.group(1)!r}: {exc}") from None
    factory = getattr(mod, m.group(2), None)
    if not callable(factory):
        raise ValueError(f"--model: {m.group(1)!r} has no callable {m.group(2)!r}")
    made = factory()
    example = None
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
    if not isinstance(made, nn.Module):
        raise ValueError(f"--model: {path}() returned {type(made).__name__}, expected an "
                         f"nn.Module or (nn.Module, example_input)")
    if example is not None and input_shape is None:
        if not isinstance(example, torch.Tensor) or example.dim() < 1:
            raise ValueError(f"--model: {path}() example input must be a tensor with a batch "
                             f"dimension, got {type(example).__name__}")
        input_shape = tuple(example.shape[1:])
    return ModelSpec(path, made, _shape_input(input_shape, lambda: _first_linear_in(made)),
                     f"user model {path}")


def _load_hf(ident: str, seq_len: int) -> ModelSpec:
    try:
        import transformers
    except ImportError:
        raise RuntimeError(
            "hf: models need the 'transformers' package, which is not installed "
            "(pip install transformers); built-ins need nothing: --model bert-base"
        ) from None
    model = transformers.AutoModel.from_pretrained(ident, torch_dtype=torch.float32)
    vocab = int(getattr(model.config, "vocab_size", 30522))

    def make(batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, seq_len), generator=gen)

    return ModelSpec(f"hf:{ident}", model, make,
                     f"Hugging Face {type(model).__name__} {ident}, seq {seq_len}",
                     float_input=False)


def _apply_weights(model: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise ValueError(f"--weights: expected a file written by sparsekit.save, got {path!r} "
                         "(not found)")
    import sparsekit

    sparsekit.load(path, model)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _output_tensor(y: Any) -> torch.Tensor:
    """The main tensor of a model output (tensor, tuple, HF ModelOutput or dict)."""
    if isinstance(y, torch.Tensor):
        return y
    for attr in ("last_hidden_state", "logits"):
        v = getattr(y, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
        return y[0]
    raise TypeError(f"model output: expected a tensor (or tuple/ModelOutput of them), got "
                    f"{type(y).__name__}")


def _model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    out = []
    for mod in model.modules():
        for cname, child in mod.named_children():
            if type(child) is nn.Linear:
                out.append((mod, cname, child))
    return out


def _has_sparse(model: nn.Module) -> bool:
    from sparsekit.nn import SparseLinear

    return any(isinstance(m, SparseLinear) for m in model.modules())


class _Formulated(nn.Module):
    """``nn.Linear`` replacement computing ``x @ W.T + b`` with one harness dense formulation."""

    def __init__(self, fn: Callable[[torch.Tensor, int], torch.Tensor], in_f: int,
                 out_f: int, keep: Any) -> None:
        super().__init__()
        self.fn, self.in_f, self.out_f = fn, in_f, out_f
        self._keep = keep  # the prepared weights live as long as the module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x.reshape(-1, self.in_f).contiguous(), 0)
        return y.reshape(*x.shape[:-1], self.out_f)


def _formulate(model: nn.Module, name: str, batch_hint: int) -> nn.Module:
    """Copy of ``model`` whose every nn.Linear runs dense formulation ``name``."""
    m2 = copy.deepcopy(model)
    for parent, cname, lin in _linears(m2):
        conts = h.dense_contenders([lin.weight.detach()],
                                   None if lin.bias is None else lin.bias.detach(),
                                   batch_size=batch_hint, verify=False, names=[name])
        if name not in conts:
            raise Unsupported(conts.skipped.get(name, f"{name} not offered"))
        setattr(parent, cname, _Formulated(conts[name], lin.in_features, lin.out_features,
                                           conts))
    return m2


def _to_sparse(model: nn.Module, fmt: FormatSpec, backend: str, batches: Sequence[int]
               ) -> nn.Module:
    """Copy of a pruned ``model`` with every nn.Linear converted to SparseLinear."""
    from sparsekit.nn import SparseLinear

    m2 = copy.deepcopy(model)
    if fmt.name == "auto":
        import sparsekit

        sparsekit.sparsify(m2, tune=True, batch_sizes=tuple(batches), backend=backend,
                           cache=False)
        return m2
    for parent, cname, lin in _linears(m2):
        setattr(parent, cname, SparseLinear.from_dense(
            lin, format=fmt.name, blocksize=fmt.blocksize, backend=backend))
    return m2


def _set_backend(model: nn.Module, backend: str) -> nn.Module:
    from sparsekit.nn import SparseLinear

    m2 = copy.deepcopy(model)
    for mod in m2.modules():
        if isinstance(mod, SparseLinear):
            mod.backend = backend
    return m2


def _overall_sparsity(model: nn.Module) -> float:
    from sparsekit.nn import SparseLinear

    nz = tot = 0
    for mod in model.modules():
        if type(mod) is nn.Linear:
            nz += int(torch.count_nonzero(mod.weight))
            tot += mod.weight.numel()
        elif isinstance(mod, SparseLinear):
            nz += int(mod.nnz)
            tot += mod.in_features * mod.out_features
    return 1.0 - nz / tot if tot else 0.0


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
@dataclass
class ModelBench:
    """What ``sparsekit bench model`` measures."""

    model: str = "mnist-mlp"
    weights: str | None = None
    data: str | None = None
    input_shape: Sequence[int] | None = None
    bert_layers: int = 4
    seq_len: int = 128
    batches: Sequence[int] = (1, 8)
    sparsities: Sequence[float] = (0.7, 0.9)
    formats: Sequence[FormatSpec] = field(
        default_factory=lambda: [FormatSpec("csr"), FormatSpec("bsr", (4, 4))])
    dtypes: Sequence[str] = ("fp32", "bf16")
    devices: Sequence[str] = ("cpu",)
    backends: Sequence[str] | None = None
    dense: Sequence[str] = DENSE_FORMULATIONS
    threads: int | None = None
    warmup: int = 2
    min_reps: int = 5
    min_time_s: float = 0.1
    rotate_factor: float = 2.0
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.batches or any(not isinstance(b, int) or b < 1 for b in self.batches):
            raise ValueError(f"batches: expected positive ints, got {list(self.batches)}")
        if any(not (0.0 <= s < 1.0) for s in self.sparsities):
            raise ValueError(f"sparsities: expected numbers in [0, 1), got {list(self.sparsities)}")
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"dtypes: expected fp32, bf16 or fp16, got {d!r}")
        for dev in self.devices:
            if dev not in ("cpu", "cuda"):
                raise ValueError(f"devices: expected 'cpu' or 'cuda', got {dev!r}")
            if dev == "cuda" and not torch.cuda.is_available():
                raise ValueError("devices: 'cuda' requested but torch.cuda.is_available() is False")
        bad = [d for d in self.dense if d not in DENSE_FORMULATIONS]
        if bad:
            raise ValueError(f"dense: expected names from {DENSE_FORMULATIONS}, got {bad}")
        if not (self.rotate_factor >= 0 and math.isfinite(self.rotate_factor)):
            raise ValueError(f"rotate_factor: expected a number >= 0, got {self.rotate_factor}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly configuration."""
        return {
            "model": self.model, "weights": self.weights, "data": self.data,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "bert_layers": self.bert_layers, "seq_len": self.seq_len,
            "batches": list(self.batches), "sparsities": [float(s) for s in self.sparsities],
            "formats": [f.label for f in self.formats], "dtypes": list(self.dtypes),
            "devices": list(self.devices), "backends": self.backends, "dense": list(self.dense),
            "threads": self.threads, "warmup": self.warmup, "min_reps": self.min_reps,
            "min_time_s": self.min_time_s, "rotate_factor": self.rotate_factor,
            "seed": self.seed,
        }


def _model_tol(dtype: torch.dtype, model: nn.Module) -> tuple[float, int]:
    """Tolerance for a whole model: per-layer output rounding compounds with depth."""
    lins = [m for m in model.modules() if hasattr(m, "in_features")]
    kmax = max((int(m.in_features) for m in lins), default=1)
    depth = max(len(lins), 1)
    return 2.0 * h.tolerance_for(dtype, kmax) * math.sqrt(depth), kmax


def run_model_bench(cfg: ModelBench, *, progress: bool = True) -> tuple[list[dict[str, Any]],
                                                                          str]:
    """Run the model benchmark; returns ``(records, model description)``."""
    cfg.validate()
    spec = load_model(cfg.model, bert_layers=cfg.bert_layers, seq_len=cfg.seq_len,
                      input_shape=cfg.input_shape, weights=cfg.weights, data=cfg.data,
                      seed=cfg.seed)
    records: list[dict[str, Any]] = []
    threads = cfg.threads if cfg.threads is not None else h.default_threads()
    timing = dict(warmup=cfg.warmup, min_reps=cfg.min_reps, min_time_s=cfg.min_time_s)
    presparse = _has_sparse(spec.model)
    with h.threads_for_all(threads), torch.inference_mode():
        sk = {dev: sparsekit_backends(torch.device(dev), cfg.backends) for dev in cfg.devices}
        n_sk = max((len(u) + len(s) for u, s in sk.values()), default=0)
        n_sparse_cells = 1 if presparse else len(cfg.sparsities) * len(cfg.formats)
        total = len(cfg.devices) * len(cfg.dtypes) * len(cfg.batches) * (
            len(cfg.dense) + n_sparse_cells * n_sk)
        bar = Progress(total, enabled=progress)
        try:
            for dev in cfg.devices:
                for dname in cfg.dtypes:
                    _run_dtype(cfg, spec, torch.device(dev), dname, threads, timing, sk[dev],
                               presparse, records, bar)
        finally:
            bar.close()
    add_speedups(records)
    return records, spec.description


def _run_dtype(cfg, spec, device, dname, threads, timing, sk, presparse, records, bar) -> None:
    dtype = DTYPES[dname]
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    llc = None
    if device.type == "cuda":
        llc = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
                  or 50 * 2**20)

    def n_copies(model: nn.Module) -> int:
        if cfg.rotate_factor == 0:
            return 1
        return h.rotation_count(max(_model_bytes(model), 1), cfg.rotate_factor, llc=llc)

    def cast_in(x: Any) -> Any:
        x = x.to(device)
        return x.to(dtype) if spec.float_input else x

    inputs = {b: cast_in(spec.make_input(b, gen)) for b in cfg.batches}
    # rows each nn.Linear sees (batch x sequence for transformers): what sparsify tunes for
    tune_rows = sorted({_tokens(x, b) for b, x in inputs.items()})

    def reference(model: nn.Module, x: Any) -> torch.Tensor:
        m64 = copy.deepcopy(model).double() if not presparse else None
        if m64 is None:  # SparseLinear keeps its values dtype; densify for the reference
            import sparsekit

            m64 = sparsekit.densify(copy.deepcopy(model)).double()
        x64 = x.double() if spec.float_input else x
        return _output_tensor(m64(x64)).double()

    def rec_base(batch: int) -> dict[str, Any]:
        return {"mode": "model", "model": spec.name, "device": device.type, "dtype": dname,
                "batch": batch, "sparsity": None, "format": None, "threads": threads}

    def timed(models: list[nn.Module], x: Any, ref: torch.Tensor, tol: float, k: int
              ) -> Outcome:
        n = len(models)

        def make():
            return lambda i: _output_tensor(models[i % n](x))

        return check_and_time(make, ref, dtype, k, timing=timing, sync=sync, tol=tol,
                              threads=threads)

    # ---- dense ------------------------------------------------------------------------
    base = copy.deepcopy(spec.model)
    if presparse:
        import sparsekit

        base = sparsekit.densify(base)
    base = base.to(device=device, dtype=dtype).eval()
    tol, kmax = _model_tol(dtype, base)
    nd = n_copies(base)
    # Rotating copies are built once per dtype and reused for every batch size; only the
    # layouts packed for a batch size (oneDNN, MKL) are rebuilt per batch.
    dense_cache: dict[tuple[str, int | None], list[nn.Module]] = {}

    def dense_models(name: str, hint: int) -> list[nn.Module]:
        key = (name, hint if name in ("onednn", "mkl_packed") else None)
        if key not in dense_cache:
            for k in [k for k in dense_cache if k[0] == name]:
                del dense_cache[k]  # previous batch's packing
            if name == "F.linear":
                dense_cache[key] = [base] + [copy.deepcopy(base) for _ in range(nd - 1)]
            else:
                # one formulation per copy: deepcopy would share the prepared weights, which
                # live in closures
                dense_cache[key] = [_formulate(base, name, hint) for _ in range(nd)]
        return dense_cache[key]

    for batch in cfg.batches:
        x = inputs[batch]
        ref = reference(base, x)
        for name in cfg.dense:
            rec = rec_base(batch)
            try:
                out = timed(dense_models(name, _tokens(x, batch)), x, ref, tol, kmax)
            except Exception as exc:
                out = _excepted(exc)
            rec.update(_rec_fields(DENSE_FAMILY, f"dense:{name}", out, nd, _model_bytes(base)))
            records.append(rec)
            bar.advance(f"{spec.name} {dname} N={batch} dense:{name}")

    dense_cache.clear()

    # ---- sparse -----------------------------------------------------------------------
    usable, skipped = sk
    cells: list[tuple[float | None, FormatSpec | None, nn.Module | None]] = []
    if presparse:
        cells.append((_overall_sparsity(spec.model), None, spec.model))
    else:
        cells = [(s, f, None) for s in cfg.sparsities for f in cfg.formats]
    for sparsity, fmt, given in cells:
        if given is not None:
            pruned = given.to(device=device, dtype=dtype)
            fmt_label = "as saved"
            prune_err = None
        else:
            pruned, prune_err = _pruned(base, float(sparsity), fmt)
            fmt_label = fmt.label
        sparse_cache: dict[str, list[nn.Module]] = {}  # backend -> rotating copies, all batches
        for batch in cfg.batches:
            x = inputs[batch]
            ref = reference(pruned, x) if prune_err is None else None
            for be_name in [*usable, *skipped]:
                rec = rec_base(batch)
                rec.update(sparsity=float(sparsity), format=fmt_label)
                if be_name in skipped:
                    out = Outcome(UNAVAILABLE, message=skipped[be_name])
                    nbytes, nc = None, None
                elif prune_err is not None:
                    out, nbytes, nc = prune_err, None, None
                else:
                    try:
                        if be_name not in sparse_cache:
                            if given is not None:
                                sm = _set_backend(pruned, be_name)
                            else:
                                sm = _to_sparse(pruned, fmt, be_name, tune_rows)
                            sparse_cache[be_name] = [sm] + [
                                copy.deepcopy(sm) for _ in range(n_copies(sm) - 1)]
                        models = sparse_cache[be_name]
                        nc = len(models)
                        nbytes = _model_bytes(models[0])
                        out = timed(models, x, ref, tol, kmax)
                    except Exception as exc:
                        out, nbytes, nc = _excepted(exc), None, None
                rec.update(_rec_fields("sparsekit", f"sparsekit:{be_name}", out, nc, nbytes))
                records.append(rec)
                bar.advance(f"{spec.name} {dname} N={batch} {fmt_label} "
                            f"s={sparsity:.2f} {be_name}")
        sparse_cache.clear()
        if cfg.rotate_factor:
            gc.collect()  # model copies may hold reference cycles; free before the next cell


def _tokens(x: Any, batch: int) -> int:
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        return int(x.numel() // x.shape[-1])
    return batch


def _pruned(base: nn.Module, sparsity: float, fmt: FormatSpec) -> tuple[nn.Module, Any]:
    """Copy of ``base`` pruned to ``sparsity`` in ``fmt``'s pattern, or (base, error outcome)."""
    try:
        from sparsekit.prune import prune
    except Exception as exc:
        return base, Outcome(UNAVAILABLE, message=f"sparsekit.prune: {type(exc).__name__}: {exc}")
    m2 = copy.deepcopy(base)
    gran: Any = "unstructured" if fmt.name in ("csr", "auto") else fmt.blocksize
    try:
        # prune in fp32 so scores/ties do not depend on the compute dtype
        dt = next(m2.parameters()).dtype
        m2 = m2.float()
        prune(m2, sparsity, granularity=gran, types=(nn.Linear,))
        m2 = m2.to(dt)
    except Exception as exc:
        return base, _excepted(exc)
    return m2, None


def _excepted(exc: BaseException) -> Outcome:
    reason = unsupported_reason(exc)
    if reason is not None:
        return Outcome(UNSUPPORTED, message=reason)
    return Outcome(ERROR, message=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                   if str(exc) else type(exc).__name__)


def _rec_fields(family: str, contender: str, out: Outcome, n_copies: int | None,
                nbytes: int | None) -> dict[str, Any]:
    st = out.stats
    return {
        "family": family, "contender": contender, "status": out.status, "message": out.message,
        "median_s": st.median_s if st else None, "p10_s": st.p10_s if st else None,
        "p90_s": st.p90_s if st else None, "min_s": st.min_s if st else None,
        "reps": st.reps if st else None, "max_rel_err": out.max_rel_err, "tol": out.tol,
        "n_copies": n_copies if out.status == OK else None, "weight_bytes": nbytes,
    }
