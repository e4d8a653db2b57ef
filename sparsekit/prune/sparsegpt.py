"""Layer-wise reconstruction pruning (SparseGPT-style OBS updates) on calibration data.

For a layer with 2-D weight ``W`` (``R x K``) and calibration inputs ``X`` (``K x n`` columns),
pruning seeks a masked ``W'`` minimising the layer's output error on the calibration data,

    ``E(W') = ||(W - W') X||_F^2 / n = tr((W - W') H (W - W')^T),   H = X X^T / n``.

Following Frantar & Alistarh (2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"), columns are processed left to right.  When weight ``w_rc`` is pruned, the
optimal-brain-surgeon update ``W[r, c:] -= w_rc / [H_c^-1]_cc * [H_c^-1]_{c, c:}`` (``H_c`` = the
Hessian restricted to columns ``c..K-1``) compensates it with the not-yet-processed weights of the
same row.  All rows ``H_c^-1`` needs are rows of the upper Cholesky factor of ``H^-1``, so one
factorisation serves every row and column.  Updates are applied lazily: inside a block of
``block_size`` columns they are exact; the rest of the matrix is updated once per block with a
GEMM.  Masks are chosen adaptively, one block of columns at a time, by the OBS saliency
``w^2 / [H_c^-1]_cc^2`` of the weights *as updated so far*: unstructured (exact count per block, so
the layer's total is exact), N:M (per group of M columns) and ``(r, c)`` blocks (scored by summed
saliency; the lazy block is aligned to ``c``).  ``row`` granularity removes whole output rows by
the Hessian-weighted norm ``sum_j w_ij^2 H_jj`` (nothing is left in a pruned row to compensate).

The same solver with a *given* mask is the "reconstruction" step usable after any criterion
(``prune(..., reconstruct=True)``): the mask is kept exactly and only the kept weights change.

Dampening: ``H += damp * mean(diag H) * I`` (as in SparseGPT, 1 % by default) keeps the
factorisation stable for rank-deficient calibration data; features that are never active
(``H_jj = 0``) get ``H_jj = 1`` (their weights are ranked, not zeroed, so counts stay exact).
Because dampening makes the solved problem differ slightly from ``E``, every layer's
reconstructed weights are checked against the plain masked weights on the undamped ``E``, row
by row (``E`` is a sum over rows): a row whose error reconstruction did not reduce keeps its plain
masked weights (``fallback_rows`` in the report).  So reconstruction never increases a layer's
calibration error over the same mask without it.

Layers are processed **sequentially** in the order the model calls them: the calibration batches
are run through the model once per group of layers (each forward stops once it has passed the
group), so each layer's Hessian is collected from the
outputs of the *already pruned* earlier layers and reconstruction also corrects the error those
layers introduced.  Layers that receive the very same input tensor (query/key/value projections)
form one group and share one pass.  Costs (recorded per layer in the report): one pass over the
calibration data per group; ``K^2`` Hessian entries in ``hessian_dtype`` (float64 by default);
``O(K^3 + R K^2)`` flops for the factorisation and the updates.

Runs under ``torch.no_grad()`` in eval mode; the result is deterministic for fixed inputs (no
randomness is used; CPU float64 arithmetic is reproducible run to run).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import is_hf_conv1d, to_param_shape, weight_2d
from ._masks import Granularity, group_scores, parse_granularity, select_pruned_groups
from .criteria import drop_padding_rows, real_token_mask

__all__ = ["LayerReconstruction", "sparsegpt_layer", "layer_error", "reconstruct_model",
           "calibration_batches", "run_batch", "hessian_from_inputs",
           "prune_with_reconstruction"]


# ----------------------------------------------------------------------------- inputs
def calibration_batches(calibration: Iterable[object] | None, what: str) -> list[object]:
    """Materialise ``calibration`` into a list (several passes are made) and check batch types."""
    if calibration is None:
        raise ValueError(f"calibration: {what} needs calibration data (an iterable of input "
                         f"batches: tensors, (inputs, ...) tuples or dicts of keyword inputs), "
                         f"got None")
    if isinstance(calibration, (torch.Tensor, Mapping, str, bytes)):
        raise ValueError(f"calibration: expected an iterable of batches (e.g. a list of tensors "
                         f"or of dicts), got a single {type(calibration).__name__}; wrap it in a "
                         f"list")
    try:
        batches = list(calibration)
    except TypeError as e:
        raise ValueError(f"calibration: expected an iterable of batches, got "
                         f"{type(calibration).__name__}") from e
    if not batches:
        raise ValueError("calibration: the iterable yielded no batches (a one-shot iterator "
                         "that was already consumed?)")
    for i, b in enumerate(batches):
        ok = (isinstance(b, torch.Tensor)
              or (isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor))
              or (isinstance(b, Mapping) and b and all(isinstance(k, str) for k in b)))
        if not ok:
            raise ValueError(f"calibration: batch {i} must be a tensor, an (inputs, ...) tuple "
                             f"whose first element is a tensor, or a non-empty dict of keyword "
                             f"inputs (as Hugging Face models take them), got "
                             f"{type(b).__name__}")
    return batches


def run_batch(model: nn.Module, batch: object, device: torch.device | None) -> object:
    """Call ``model`` on one calibration batch (tensor, ``(inputs, ...)`` tuple or kwargs dict)."""
    def mv(t: object) -> object:
        return t.to(device) if isinstance(t, torch.Tensor) and device is not None else t

    if isinstance(batch, torch.Tensor):
        return model(mv(batch))
    if isinstance(batch, (tuple, list)) and batch:
        return model(mv(batch[0]))  # (inputs, targets, ...) as a DataLoader yields
    if isinstance(batch, Mapping):
        return model(**{k: mv(v) for k, v in batch.items()})
    raise ValueError(f"data: each batch must be a tensor, an (inputs, ...) tuple or a dict of "
                     f"keyword inputs, got {type(batch).__name__}")


# ----------------------------------------------------------------------------- layer views
def _check_supported(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Linear) or is_hf_conv1d(m):
        return
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise NotImplementedError(
                f"criterion: layer-wise reconstruction supports convolutions only with groups=1, "
                f"numeric padding and padding_mode='zeros'; module {name!r} is {m}")
        return
    raise NotImplementedError(f"criterion: layer-wise reconstruction supports nn.Linear, "
                              f"nn.Conv1d, nn.Conv2d and Hugging Face Conv1D; module {name!r} "
                              f"is {type(m).__name__}")


def set_w2d(m: nn.Module, w2d: torch.Tensor) -> None:
    with torch.no_grad():
        m.weight.copy_(to_param_shape(m, w2d).to(m.weight.dtype))


def input_columns(m: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """Layer input ``x`` as rows of the ``(n, K)`` matrix the 2-D weight multiplies."""
    if isinstance(m, nn.Linear) or is_hf_conv1d(m):
        k = m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"calibration: module {name!r} expects inputs with last dimension "
                             f"{k}, got shape {tuple(x.shape)}")
        return x.reshape(-1, k)
    if isinstance(m, nn.Conv1d):
        if x.dim() not in (2, 3) or x.shape[-2] != m.in_channels:
            raise ValueError(f"calibration: module {name!r} expects (N, {m.in_channels}, L) "
                             f"inputs, got shape {tuple(x.shape)}")
        x4 = (x if x.dim() == 3 else x[None])[:, :, None, :]
        cols = F.unfold(x4, (1, m.kernel_size[0]), dilation=(1, m.dilation[0]),
                        padding=(0, m.padding[0]), stride=(1, m.stride[0]))
    else:
        if x.dim() not in (3, 4) or x.shape[-3] != m.in_channels:
            raise ValueError(f"calibration: module {name!r} expects (N, {m.in_channels}, H, W) "
                             f"inputs, got shape {tuple(x.shape)}")
        x4 = x if x.dim() == 4 else x[None]
        cols = F.unfold(x4, m.kernel_size, dilation=m.dilation, padding=m.padding,
                        stride=m.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def hessian_from_inputs(cols: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X^T X`` (unnormalised) of input rows ``cols`` (``n x K``) in ``dtype``."""
    c = cols.to(dtype)
    return c.t() @ c


# ----------------------------------------------------------------------------- the solver
def layer_error(w_ref: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((w_ref - w) H (w_ref - w)^T)``: the calibration output error for ``H = X^T X / n``."""
    d = (w_ref.to(hessian.dtype) - w.to(hessian.dtype))
    return float(((d @ hessian) * d).sum())


def _row_errors(w_ref: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    d = w_ref.to(hessian.dtype) - w.to(hessian.dtype)
    return ((d @ hessian) * d).sum(dim=1)


def _best_dense_fit(w: torch.Tensor, cross: torch.Tensor, hessian: torch.Tensor, damp: float
                    ) -> torch.Tensor:
    """``W* = W C H_d^-1``: the dense weights whose output on the model's inputs best matches
    the dense model's output (``C = X^T X' / n``, ``H_d`` the dampened ``X'^T X' / n``)."""
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * float(torch.diagonal(h).mean())
    rhs = (w.to(h.dtype) @ cross).t()  # (K, R)
    return torch.linalg.solve(h, rhs).t()


def _damped_inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + damp*mean(diag H)*I)^-1`` and the dead-feature mask."""
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * mean_diag
    for attempt in range(6):  # escalate dampening if the damped matrix is still not PD
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h[idx, idx] += damp * mean_diag * (10.0 ** attempt)
    else:  # pragma: no cover - only for NaN/inf Hessians, rejected earlier
        raise ValueError("calibration: the layer input Hessian is not positive definite even "
                         "after dampening; are the calibration inputs finite?")
    hinv = torch.cholesky_inverse(lower)
    upper = torch.linalg.cholesky(hinv, upper=True)
    return upper, dead


def _exact_counts(total: int, sparsity: float, sizes: list[int]) -> list[int]:
    """Split ``round(sparsity * total)`` over blocks of ``sizes`` elements (cumulative rounding)."""
    out, acc, prev = [], 0, 0
    for s in sizes:
        acc += s
        cur = int(math.floor(sparsity * acc + 0.5))
        out.append(cur - prev)
        prev = cur
    return out


def sparsegpt_layer(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float | None = None,
                    granularity: Granularity | str = "unstructured",
                    mask: torch.Tensor | None = None, damp: float = 0.01,
                    block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune (or reconstruct under a fixed mask) one 2-D weight with OBS updates.

    Parameters
    ----------
    weight : Tensor (R, K)
        Dense (or already masked) weight; not modified.
    hessian : Tensor (K, K)
        ``X^T X`` of the calibration inputs (any positive scale), float32 or float64; the solver
        works in its dtype.
    sparsity : float, optional
        Fraction to prune when ``mask`` is None (ignored for N:M, whose sparsity is fixed).
    granularity : Granularity
        Mask pattern when ``mask`` is None.
    mask : Tensor (R, K) bool, optional
        Fixed keep-mask: only reconstruct (the pruned set is exactly ``~mask``).
    damp : float
        Dampening, as a fraction of the mean Hessian diagonal.
    block_size : int
        Columns per lazy-update block (rounded up to the block granularity's column size).

    Returns
    -------
    (new_weight, keep_mask) : Tensor (R, K) in the Hessian's dtype, Tensor (R, K) bool
    """
    rows, cols = weight.shape
    dt = hessian.dtype
    granularity = parse_granularity(granularity)
    w = weight.to(dt).clone()
    g = granularity
    if mask is None and g.kind == "row":
        score = (w * w * torch.diagonal(hessian)[None, :]).sum(dim=1)
        pruned = select_pruned_groups(score, torch.full((rows,), cols, dtype=torch.int64),
                                      float(sparsity) * rows * cols)
        keep = (~pruned)[:, None].expand(rows, cols).clone()
        mask = keep  # rows removed entirely; the solver below then only zeroes them
    # Weights of never-active features (H_jj = 0) cannot change the calibration error; they are
    # ranked like the others (H_jj is set to 1) rather than zeroed, so masks stay exact.
    upper, _ = _damped_inverse_factor(hessian, damp)
    bs = int(block_size)
    if mask is None and g.kind == "block":
        bs = max(g.block[1], (bs // g.block[1]) * g.block[1])
    if mask is None and g.kind == "nm":
        bs = max(g.m, (bs // g.m) * g.m)
    keep = torch.ones((rows, cols), dtype=torch.bool, device=w.device) if mask is None else (
        mask.to(device=w.device, dtype=torch.bool).clone())
    starts = list(range(0, cols, bs))
    counts = (_exact_counts(rows * cols, float(sparsity),
                            [rows * (min(s + bs, cols) - s) for s in starts])
              if mask is None and g.kind in ("unstructured", "block") else None)
    for bi, i1 in enumerate(starts):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        if mask is None and g.kind == "unstructured":
            sal = (w1 * w1) / (d1 * d1)[None, :]
            pr = select_pruned_groups(sal.reshape(-1), torch.ones(sal.numel(), dtype=torch.int64),
                                      float(counts[bi]))
            keep[:, i1:i2] = ~pr.reshape(sal.shape)
        elif mask is None and g.kind == "block":
            sal = (w1 * w1) / (d1 * d1)[None, :]
            bg = Granularity("block", block=g.block)
            s, sizes = group_scores(sal, bg, "sum")
            # Ragged edge blocks: rank by mean saliency per element so their size is no bias.
            pr = select_pruned_groups(s / sizes.to(s.dtype), sizes, float(counts[bi]))
            r, c = g.block
            rb, kb = math.ceil(rows / r), math.ceil((i2 - i1) / c)
            full = (~pr).reshape(rb, kb).repeat_interleave(r, 0).repeat_interleave(c, 1)
            keep[:, i1:i2] = full[:rows, :i2 - i1]
        for j in range(i2 - i1):
            c = i1 + j
            if mask is None and g.kind == "nm" and j % g.m == 0:
                e = min(j + g.m, i2 - i1)
                sal = (w1[:, j:e] ** 2) / (d1[j:e] ** 2)[None, :]
                n_keep = min(g.n, e - j)
                order = torch.sort(sal, dim=1, descending=True, stable=True).indices
                kb_ = torch.zeros_like(sal, dtype=torch.bool)
                kb_.scatter_(1, order[:, :n_keep], True)
                keep[:, c:c + e - j] = kb_
            col = w1[:, j]
            q = torch.where(keep[:, c], col, torch.zeros_like(col))
            err = (col - q) / d1[j]
            w1[:, j:] -= err[:, None] * u1[j, j:][None, :]
            w1[:, j] = q
            err1[:, j] = err
        w[:, i1:i2] = w1
        if i2 < cols:
            w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    w.masked_fill_(~keep, 0.0)
    return w, keep


# ----------------------------------------------------------------------------- model driver
@dataclass
class LayerReconstruction:
    """Cost and effect of reconstructing one layer (errors are ``E`` per calibration row)."""

    name: str
    group: int
    hessian_shape: tuple[int, int]
    hessian_bytes: int
    calibration_rows: int
    seconds_collect: float
    seconds_solve: float
    error_masked: float
    error_reconstructed: float
    fallback_rows: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hessian_shape"] = list(self.hessian_shape)
        return d


def _call_order(model: nn.Module, modules: Mapping[str, nn.Module], batch: object,
                device: torch.device | None) -> list[str]:
    order: list[str] = []
    handles = []
    for n, m in modules.items():
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, n=n: order.append(n) if n not in order else None))
    try:
        run_batch(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    return order


def reconstruct_model(model: nn.Module, modules: Mapping[str, nn.Module],
                      calibration: Iterable[object] | None, *,
                      masks: Mapping[str, torch.Tensor] | None = None,
                      targets: Mapping[str, float] | None = None,
                      granularity: Granularity | str = "unstructured",
                      damp: float = 0.01, block_size: int = 128,
                      hessian_dtype: torch.dtype = torch.float64,
                      what: str = "criterion 'sparsegpt'",
                      dense_targets: bool = False, update_bias: bool = False,
                      skip_padding: bool = True,
                      progress: Callable[[str], None] | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[LayerReconstruction]]:
    """Prune (``targets``) or reconstruct under fixed ``masks`` every module, sequentially.

    With ``dense_targets=True`` each layer is fitted to the *dense* model's output on the dense
    model's inputs, ``min ||W' X' - W X||`` (``X'``: inputs in the model pruned so far, ``X``: in
    a dense copy), instead of ``min ||(W' - W) X'||``: this also undoes the drift the earlier
    layers introduced.  Writing ``W* = W X X'^T (X' X'^T)^-1`` (the best dense fit), the objective
    is ``||(W' - W*) X'||^2`` plus a constant, so the same solver runs on ``W*``.  Costs a dense
    copy of the model and a second forward per batch; reported errors are then measured from
    ``W*``.

    With ``update_bias=True`` the bias of every layer that has one is re-fitted together with the
    kept weights.  For a fixed weight change ``D = W - W'`` the best bias change is ``D mu``
    (``mu``: the mean calibration input) and the error left is ``tr(D C D^T)`` with the *centred*
    second moment ``C = H - mu mu^T``; so the solver runs on ``C`` and the bias absorbs the mean
    output shift (``b' = b + D mu``).

    With ``skip_padding`` (default) the rows of padding tokens (``attention_mask == 0`` in dict
    batches) are left out of the Hessians: their hidden states feed no output.

    Returns the keep-masks (weight shape) and one :class:`LayerReconstruction` per module.  The
    model's weights are updated in place; training flags are restored and hooks removed, also on
    error.
    """
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not (0 <= damp < 1e3):
        raise ValueError(f"damp: expected a non-negative number (fraction of the mean Hessian "
                         f"diagonal), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
    for arg, v in (("dense_targets", dense_targets), ("update_bias", update_bias),
                   ("skip_padding", skip_padding)):
        if not isinstance(v, bool):
            raise ValueError(f"{arg}: expected a bool, got {v!r}")
    if dense_targets and update_bias:
        raise ValueError("update_bias: not supported together with dense_targets=True (the "
                         "dense fit is solved without a bias term); pass one of them")
    if hessian_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"hessian_dtype: expected torch.float32 or torch.float64, got "
                         f"{hessian_dtype}")
    for n, m in modules.items():
        _check_supported(n, m)
        if not torch.isfinite(m.weight.detach()).all():
            raise ValueError(f"model: weight of module {n!r} contains NaN or inf")
    batches = calibration_batches(calibration, what)
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    flags = {m: m.training for m in model.modules()}
    out_masks: dict[str, torch.Tensor] = {}
    reports: list[LayerReconstruction] = []
    ref_model, ref_modules = None, None
    if dense_targets:
        ref_model = copy.deepcopy(model).eval()
        named = dict(ref_model.named_modules())
        ref_modules = {n: named[n] for n in modules}
    model.eval()
    try:
        with torch.no_grad():
            try:
                order = _call_order(model, modules, batches[0], device)
            except (ValueError, TypeError, RuntimeError) as e:
                if str(e).startswith("calibration:"):
                    raise
                raise ValueError(f"calibration: batch 0 could not be run through the model: "
                                 f"{e}") from e
            never = [n for n in modules if n not in order]
            # Modules not called by the first batch go last (they may be called by others).
            pending = order + never
            group_id = 0
            while pending:
                reports_g, done = _process_group(model, modules, pending, batches, device,
                                                 masks, targets, granularity, damp, block_size,
                                                 hessian_dtype, group_id, out_masks,
                                                 ref_model, ref_modules, update_bias,
                                                 skip_padding)
                reports += reports_g
                if progress is not None:
                    progress(f"group {group_id}: {', '.join(done)}")
                pending = [n for n in pending if n not in done]
                group_id += 1
    finally:
        for m, f in flags.items():
            m.training = f
    return out_masks, reports


class _StopPass(Exception):
    """Raised by a hook to end a calibration forward early (caught by the pass loop)."""


def _process_group(model: nn.Module, modules: Mapping[str, nn.Module], pending: list[str],
                   batches: list[object], device: torch.device | None,
                   masks: Mapping[str, torch.Tensor] | None,
                   targets: Mapping[str, float] | None, granularity: Granularity, damp: float,
                   block_size: int, hessian_dtype: torch.dtype, group_id: int,
                   out_masks: dict[str, torch.Tensor], ref_model: nn.Module | None = None,
                   ref_modules: Mapping[str, nn.Module] | None = None,
                   update_bias: bool = False, skip_padding: bool = True
                   ) -> tuple[list[LayerReconstruction], list[str]]:
    """One calibration pass: Hessians of the first pending module and of modules that receive
    the very same input tensors; then solve them."""
    first = pending[0]
    # Candidates: every pending module; the group is those whose inputs are the same tensor
    # objects as the first module's in every call.
    hess: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}  # input sums, for the bias update
    nrows: dict[str, int] = {}
    token_mask: list[torch.Tensor | None] = [None]
    inputs_seen: dict[str, list[int]] = {n: [] for n in pending}
    keep_alive: list[torch.Tensor] = []  # keeps ids unique within the pass
    handles = []
    # After the first batch, a forward is cut short once another pending module receives a
    # different input: unless the first module is called several times per forward (then its
    # later calls would be lost and every forward runs to the end).
    first_calls, may_stop = [0], [False]
    # Dense-target mode: inputs of the same modules in the dense copy, per call of this batch.
    cross: dict[str, torch.Tensor] = {}
    ref_inputs: dict[str, list[torch.Tensor]] = {n: [] for n in pending}
    ref_last_first: list[int] = [0]
    ref_first_calls = [0]
    used: dict[str, int] = {}

    def make_ref_hook(n: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0]
            if n == first:
                ref_first_calls[0] += 1
                ref_last_first[0] = id(x)
            elif ref_first_calls[0] == 0 or id(x) != ref_last_first[0]:
                if may_stop[0] and ref_first_calls[0] > 0:
                    raise _StopPass
                return
            ref_inputs[n].append(x.detach())

        return hook

    def make_hook(n: str) -> Callable[..., None]:
        mod = modules[n]

        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0]
            if n == first:
                first_calls[0] += 1
            elif (may_stop[0] and first_calls[0] > 0 and id(x) != inputs_seen[first][-1]):
                raise _StopPass  # the rest of this forward cannot add to the group
            inputs_seen[n].append(id(x))
            keep_alive.append(x)
            if n != first and not (len(inputs_seen[n]) == len(inputs_seen[first])
                                   and inputs_seen[first][-1] == id(x)):
                return  # not fed the first module's input tensor: not in this group
            cols = drop_padding_rows(x, input_columns(mod, x.detach(), n), token_mask[0])
            if not torch.isfinite(cols).all():
                raise ValueError(f"calibration: inputs of module {n!r} contain NaN or inf")
            h = hessian_from_inputs(cols, hessian_dtype)
            hess[n] = hess[n] + h if n in hess else h
            sm = cols.to(hessian_dtype).sum(dim=0)
            sums[n] = sums[n] + sm if n in sums else sm
            nrows[n] = nrows.get(n, 0) + cols.shape[0]
            if ref_model is not None:
                j = used.get(n, 0)
                used[n] = j + 1
                if j >= len(ref_inputs[n]):
                    raise ValueError(f"model: module {n!r} is called more often than in the "
                                     f"dense copy; dense_targets needs a deterministic call "
                                     f"structure")
                rc = drop_padding_rows(ref_inputs[n][j],
                                       input_columns(modules[n], ref_inputs[n][j], n),
                                       token_mask[0]).to(hessian_dtype)
                if rc.shape != cols.shape:
                    raise ValueError(f"model: inputs of module {n!r} differ in shape between "
                                     f"the dense copy {tuple(rc.shape)} and the model "
                                     f"{tuple(cols.shape)}")
                c = rc.t() @ cols.to(hessian_dtype)
                cross[n] = cross[n] + c if n in cross else c

        return hook

    t0 = time.perf_counter()
    for n in pending:
        handles.append(modules[n].register_forward_pre_hook(make_hook(n)))
        if ref_modules is not None:
            handles.append(ref_modules[n].register_forward_pre_hook(make_ref_hook(n)))
    try:
        for i, batch in enumerate(batches):
            first_calls[0] = 0
            token_mask[0] = real_token_mask(batch) if skip_padding else None
            if ref_model is not None:
                ref_first_calls[0] = 0
                used.clear()
                for v in ref_inputs.values():
                    v.clear()
                try:
                    run_batch(ref_model, batch, device)
                except _StopPass:
                    pass
            try:
                run_batch(model, batch, device)
            except _StopPass:
                pass
            except (ValueError, TypeError, RuntimeError) as e:
                if str(e).startswith("calibration:"):
                    raise
                raise ValueError(f"calibration: batch {i} could not be run through the model: "
                                 f"{e}") from e
            if i == 0:
                may_stop[0] = first_calls[0] == 1
            keep_alive.clear()
    finally:
        for h in handles:
            h.remove()
    t_collect = time.perf_counter() - t0
    if first not in hess:
        raise ValueError(f"calibration: module {first!r} was never called while running the "
                         f"calibration batches through the model")
    group = [n for n in pending if n in hess and inputs_seen[n] == inputs_seen[first]]
    out = []
    for n in group:
        mod = modules[n]
        h = hess[n] / max(nrows[n], 1)
        w0 = weight_2d(mod).to(hessian_dtype)
        bias = getattr(mod, "bias", None)
        fit_bias = update_bias and isinstance(bias, torch.Tensor)
        # With a re-fitted bias the error left for a weight change D is tr(D C D^T), C centred.
        mu = sums[n] / max(nrows[n], 1)
        h_fit = h - torch.outer(mu, mu) if fit_bias else h
        t1 = time.perf_counter()
        w_target = w0
        if ref_model is not None:
            w_target = _best_dense_fit(w0, cross[n] / max(nrows[n], 1), h, damp)
        if masks is not None:
            keep_in = masks[n].reshape(w0.shape).to(torch.bool)
            w_new, keep = sparsegpt_layer(w_target, h_fit, mask=keep_in, damp=damp,
                                          block_size=block_size)
        else:
            w_new, keep = sparsegpt_layer(w_target, h_fit, sparsity=targets[n],
                                          granularity=granularity, damp=damp,
                                          block_size=block_size)
        w_masked = w0.masked_fill(~keep, 0.0)
        # The error is a sum over rows, so each row keeps the better of its reconstructed and
        # plain masked weights (sequential OBS with dampening is not optimal for every row).
        # With a bias update both candidates get their best bias (error under h_fit <= under h).
        rows_plain = _row_errors(w_target, w_masked, h)
        rows_masked = _row_errors(w_target, w_masked, h_fit)
        rows_rec = _row_errors(w_target, w_new, h_fit)
        worse = ~(rows_rec <= rows_masked)  # also catches NaN
        w_out = torch.where(worse[:, None], w_masked, w_new)
        e_masked = float(rows_plain.sum())
        e_rec = float(torch.where(worse, rows_masked, rows_rec).sum())
        # Before set_w2d: w0 / w_target may alias the weight (same dtype, no copy).
        shift = (w_target - w_out) @ mu if fit_bias else None  # b' = b + D mu
        set_w2d(mod, w_out)
        if shift is not None:
            with torch.no_grad():
                bias.add_(shift.to(bias.dtype))
        t_solve = time.perf_counter() - t1
        out_masks[n] = to_param_shape(mod, keep)
        out.append(LayerReconstruction(
            name=n, group=group_id, hessian_shape=tuple(h.shape),
            hessian_bytes=h.numel() * h.element_size(), calibration_rows=nrows[n],
            seconds_collect=t_collect / len(group), seconds_solve=t_solve,
            error_masked=e_masked, error_reconstructed=e_rec,
            fallback_rows=int(worse.sum())))
    return out, group


def prune_with_reconstruction(engine: object, targets: dict[str, float], target: object,
                              before: Mapping[str, int], *, damp: float, block_size: int,
                              hessian_dtype: torch.dtype, dense_targets: bool = False,
                              update_bias: bool = False, skip_padding: bool = True) -> object:
    """``prune``'s path for ``criterion='sparsegpt'`` and ``reconstruct=True``."""
    t0 = time.perf_counter()
    static_masks = None
    if engine.crit.name == "sparsegpt":
        if engine.scope != "layer":
            raise ValueError("scope: criterion 'sparsegpt' prunes every layer to its own target; "
                             "use scope='layer'")
    else:
        # Masks from the dense weights; each layer is then reconstructed towards its dense
        # output (the plain masked weights are the baseline it must not be worse than).
        static_masks = engine.compute_masks(float(target) if engine.scope == "global"
                                            else targets)
    what = ("criterion 'sparsegpt'" if static_masks is None else "reconstruct=True")
    masks, layers = reconstruct_model(
        engine.model, engine.modules, engine.calibration, masks=static_masks, targets=targets,
        granularity=engine.gran, damp=damp, block_size=block_size, hessian_dtype=hessian_dtype,
        what=what, dense_targets=dense_targets, update_bias=update_bias,
        skip_padding=skip_padding)
    report = engine.report(masks, before, None if engine.scope == "global" else targets, target)
    report.extra = {
        "reconstruction": {
            "method": "sparsegpt" if static_masks is None else f"{engine.crit.name}+reconstruct",
            "damp": damp, "block_size": block_size, "hessian_dtype": str(hessian_dtype),
            "order": "sequential (call order; later layers see pruned earlier outputs)",
            "targets": "dense model outputs" if dense_targets else "dense weights on pruned inputs",
            "update_bias": update_bias, "skip_padding": skip_padding,
            "seconds": time.perf_counter() - t0,
            "max_hessian_bytes": max(la.hessian_bytes for la in layers),
            "fallback_rows": sum(la.fallback_rows for la in layers),
            "layers": [la.to_dict() for la in layers]}}
    return report
