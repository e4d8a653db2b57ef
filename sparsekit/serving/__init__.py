"""Helpers for embedding sparsekit models in inference servers.

The main entry point is :func:`warmup`, which should be called once per worker process after
the model is loaded and before the worker accepts traffic, so that the first real request does
not pay for one-off costs:

* Numba JIT compilation of the kernels actually used (only when the Numba backend is chosen,
  e.g. when the C++ extension is not built),
* lazy per-shape decisions taken on the first forward call (backend choice, tuning caches),
* first-touch page faults of the weight buffers and of the thread pools (OpenMP, torch).

Submodules
----------
:mod:`sparsekit.serving.http`
    Request parsing/validation shared by the HTTP front ends (numpy only).
:mod:`sparsekit.serving.ray`
    A Ray Serve deployment and ``build_app`` (needs the optional extra ``sparsekit[ray]``;
    imported only when asked for, so ``import sparsekit.serving`` never imports Ray).

See ``docs/serving.md`` for the concurrency guarantees, how to size threads in a multi-worker
server and how to scale out with Ray Serve.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["WarmupReport", "warmup"]


@dataclass
class WarmupReport:
    """Summary of a :func:`warmup` run.

    Attributes
    ----------
    batch_sizes : list of int
        Batch sizes the model was run with (in order).
    passes : int
        Number of full forward passes run.
    sparse_modules : int
        Number of ``SparseLinear`` modules found in the model.
    touched_by_forward : int
        How many of them ran during the forward passes.
    touched_directly : list of str
        Qualified names of ``SparseLinear`` modules that the forward passes did not reach (e.g.
        an unused branch) and that were therefore called directly with a zero input.
    backends : dict of str to str
        ``module name -> backend`` for every ``SparseLinear`` that exposes its backend choice.
    first_pass_s, last_pass_s : float
        Wall time of the first and of the last forward pass (the difference is what the
        warm-up saved the first request).
    total_s : float
        Wall time of the whole warm-up.
    """

    batch_sizes: list[int] = field(default_factory=list)
    passes: int = 0
    sparse_modules: int = 0
    touched_by_forward: int = 0
    touched_directly: list[str] = field(default_factory=list)
    backends: dict[str, str] = field(default_factory=dict)
    first_pass_s: float = 0.0
    last_pass_s: float = 0.0
    total_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-serialisable dict."""
        return {
            "batch_sizes": list(self.batch_sizes),
            "passes": self.passes,
            "sparse_modules": self.sparse_modules,
            "touched_by_forward": self.touched_by_forward,
            "touched_directly": list(self.touched_directly),
            "backends": dict(self.backends),
            "first_pass_s": self.first_pass_s,
            "last_pass_s": self.last_pass_s,
            "total_s": self.total_s,
        }


def _sparse_linear_type() -> type | None:
    try:
        from sparsekit.nn import SparseLinear
    except ImportError:  # pragma: no cover - nn is part of the package
        return None
    return SparseLinear


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs: expected a torch.Tensor or a tuple/list of positional arguments, "
        f"got {type(example_inputs).__name__}"
    )


def _resize_batch(args: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """Return ``args`` with every tensor argument's dim 0 resized to ``n`` (tiling rows)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] > 0:
            reps = -(-n // a.shape[0])
            if reps > 1:
                a = a.repeat(reps, *([1] * (a.dim() - 1)))
            a = a[:n].contiguous()
        out.append(a)
    return tuple(out)


def _check_batch_sizes(batch_sizes: Iterable[int] | None, default: int) -> list[int]:
    if batch_sizes is None:
        return [default]
    if isinstance(batch_sizes, (int, bool)) or not isinstance(batch_sizes, Iterable):
        raise TypeError(
            f"batch_sizes: expected an iterable of positive ints or None, got "
            f"{type(batch_sizes).__name__}"
        )
    sizes = list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes: expected at least one batch size, got an empty sequence")
    for i, b in enumerate(sizes):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch_sizes: expected positive ints, got {b!r} at position {i}")
    return sizes


def warmup(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    *,
    batch_sizes: Iterable[int] | None = None,
    repeats: int = 2,
) -> WarmupReport:
    """Run a model once per expected batch size so the first real request is fast.

    Runs ``repeats`` forward passes under :func:`torch.inference_mode` for each batch size,
    which compiles any Numba kernels the model uses, settles the per-shape decisions the
    sparse modules take lazily on their first call, and faults in weight pages and thread
    pools. ``SparseLinear`` modules that the forward passes did not reach are called directly
    with a zero input of the right width and dtype. The model's ``training`` flags are
    restored afterwards; no parameters or buffers are modified.

    Parameters
    ----------
    model : torch.nn.Module
        The (sparsified) model, e.g. as returned by ``sparsekit.sparsify`` or
        ``sparsekit.load``. A bare ``SparseLinear`` works too.
    example_inputs : torch.Tensor or sequence
        One input tensor, or the tuple of positional arguments of ``model.forward``. Tensor
        arguments are assumed to be batched along dim 0.
    batch_sizes : iterable of int, optional
        Batch sizes to warm up (the rows of every tensor argument are tiled/truncated to each
        size). Default: only the batch size of ``example_inputs``. Pass the sizes the server
        will see (e.g. ``[1, max_batch]``) when the kernels may pick different code paths for
        different batch sizes.
    repeats : int, default 2
        Forward passes per batch size (the second pass sees the settled state).

    Returns
    -------
    WarmupReport
        Counts of modules reached and wall times; ``report.as_dict()`` is JSON-serialisable.

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.nn.Module`` or ``example_inputs`` has the wrong type.
    ValueError
        If ``batch_sizes`` or ``repeats`` are not positive.

    Notes
    -----
    Thread-safe with respect to other models, but do not call it on a model that is serving
    requests at the same time (it temporarily switches the model to eval mode).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
    args = _as_tuple(example_inputs)
    first_tensor = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1), None)
    default_bs = int(first_tensor.shape[0]) if first_tensor is not None else 1
    sizes = _check_batch_sizes(batch_sizes, default_bs)
    if first_tensor is None and batch_sizes is not None:
        raise ValueError("batch_sizes: example_inputs contain no batched tensor to resize")

    t_start = time.perf_counter()
    report = WarmupReport(batch_sizes=sizes)
    sl_type = _sparse_linear_type()
    sparse = (
        [(name, m) for name, m in model.named_modules() if isinstance(m, sl_type)]
        if sl_type is not None
        else []
    )
    report.sparse_modules = len(sparse)
    seen: set[int] = set()

    def _hook(mod: torch.nn.Module, _inp: Any, _out: Any) -> None:
        seen.add(id(mod))

    handles = [m.register_forward_hook(_hook) for _, m in sparse]
    modes = {id(m): m.training for m in model.modules()}
    pass_times: list[float] = []
    try:
        model.eval()
        with torch.inference_mode():
            for n in sizes:
                call_args = _resize_batch(args, n)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(*call_args)
                    pass_times.append(time.perf_counter() - t0)
            # Modules on paths the example did not take: run them on a zero input so their
            # kernels are compiled/faulted in as well.
            for name, m in sparse:
                if id(m) in seen:
                    continue
                in_features = int(getattr(m, "in_features", 0))
                if in_features <= 0:
                    continue
                dtype = _module_input_dtype(m)
                device = _module_device(m)
                for n in sizes:
                    x = torch.zeros(n, in_features, dtype=dtype, device=device)
                    for _ in range(repeats):
                        m(x)
                report.touched_directly.append(name or "<root>")
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = modes.get(id(m), m.training)

    report.touched_by_forward = report.sparse_modules - len(report.touched_directly)
    for name, m in sparse:
        report.backends[name or "<root>"] = _resolved_backend(m)
    report.passes = len(pass_times)
    report.first_pass_s = pass_times[0] if pass_times else 0.0
    report.last_pass_s = pass_times[-1] if pass_times else 0.0
    report.total_s = time.perf_counter() - t_start
    return report


def _module_input_dtype(m: torch.nn.Module) -> torch.dtype:
    """Activation dtype a SparseLinear expects: its value dtype (fp32, bf16 or fp16)."""
    # weight_values is the compressed storage; never touch ``m.weight`` (it densifies).
    values = getattr(m, "weight_values", None)
    vdt = getattr(values, "dtype", None)
    if isinstance(vdt, torch.dtype) and vdt in (torch.float32, torch.bfloat16, torch.float16):
        return vdt
    return torch.float32


def _module_device(m: torch.nn.Module) -> torch.device:
    for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False)):
        return t.device
    return torch.device("cpu")


def _resolved_backend(m: torch.nn.Module) -> str:
    """The kernel backend a SparseLinear's forward runs on ("auto" resolved when possible)."""
    name = str(getattr(m, "backend", "auto"))
    if name != "auto":
        return name
    try:
        from sparsekit.kernels import select_backend

        x = torch.zeros(1, int(m.in_features), dtype=_module_input_dtype(m),
                        device=_module_device(m))
        return str(select_backend(m.matrix, x).name)
    except Exception:  # noqa: BLE001 - informational only
        return name
