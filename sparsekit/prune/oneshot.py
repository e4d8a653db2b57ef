"""One-shot pruning: score, select exactly, zero in place."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ._core import Engine, Filter, PruneReport, apply_masks, count_nonzero
from ._masks import parse_granularity
from .allocation import OWL, owl_sparsities
from .sparsegpt import calibration_batches, prune_with_reconstruction

__all__ = ["prune"]


def prune(model: nn.Module, sparsity: float | Mapping[str, float] | None = None, *,
          criterion: str | Callable[[torch.Tensor, nn.Module], torch.Tensor] = "l1",
          granularity: str | tuple[int, int] = "unstructured", scope: str = "layer",
          include: Filter = None, exclude: Filter = None,
          filter_fn: Callable[[str, nn.Module], bool] | None = None,
          types: str | type | tuple[type, ...] = "auto",
          calibration: Iterable[object] | None = None, reconstruct: bool = False,
          damp: float = 0.01, block_size: int = 128,
          hessian_dtype: torch.dtype = torch.float64,
          dense_targets: bool = False, update_bias: bool = False, skip_padding: bool = True,
          allocation: str | OWL = "uniform") -> PruneReport:
    """Prune ``model``'s weights in place, once, to an exact sparsity.

    Pruned weights are set to exactly ``+0.0``; no hook or parametrization is left behind, so the
    result is a plain model ready for :func:`sparsekit.sparsify` / ``CSRMatrix.from_dense``.
    Biases are never pruned.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    sparsity : float or dict of str to float, optional
        Fraction of weights to zero, in [0, 1).  A float applies to every selected module
        (``scope='layer'``) or to all of them together (``scope='global'``).  A dict maps module
        names or glob patterns to per-module targets (only those modules are pruned; an exact name
        wins over patterns).  May be None only for N:M granularity, whose sparsity is fixed.
    criterion : {"l1", "l2", "mean", "wanda", "sparsegpt"} or callable
        Importance score, see :mod:`sparsekit.prune.criteria`.  ``"sparsegpt"`` prunes layer by
        layer on ``calibration`` data, choosing each mask while the remaining weights are updated
        to reconstruct the layer's output (:mod:`sparsekit.prune.sparsegpt`; ``scope='layer'``).
        For groups, ``l1`` is the sum of ``|w|``, ``l2`` the L2 norm and ``mean`` the mean
        ``|w|``.  A callable ``fn(weight, module) -> scores`` (weight's shape, higher = kept) is
        summed per group.
    granularity : str or (int, int)
        ``"unstructured"``; a block ``(r, c)`` (whole r x c blocks of the 2-D weight view are
        zeroed so it maps onto BSR with that block size; edge blocks may be ragged); ``"N:M"``
        (at most N nonzeros in every M consecutive weights along the input dimension; when K is
        not a multiple of M the last, shorter group keeps at most N); ``"row"`` (alias
        ``"channel"``: whole output rows / output channels).  Convolution weights are viewed as
        ``(out_channels, in_channels/groups * prod(kernel_size))``.
    scope : {"layer", "global"}
        ``"layer"``: every module reaches its own target.  ``"global"``: one ranking across all
        selected modules, so layers are pruned unevenly (compare scores across layers with care:
        group sums favour layers with larger groups; ``mean`` does not).
    include, exclude : str, type, callable or iterable of them, optional
        Glob patterns on qualified module names (``"encoder.*"``), module types or callables
        ``(name, module) -> bool``.  Each pattern or type must match some module of ``model``.
        Use ``exclude`` to keep e.g. the final classifier dense.  Read exactly as
        :func:`sparsekit.sparsify` reads them (:class:`sparsekit._layers.Selector`).
    filter_fn : callable (name, module) -> bool, optional
        Extra predicate; only modules for which it returns True are pruned.
    types : "auto", type or tuple of types
        Module types to consider.  ``"auto"`` (default): ``nn.Linear`` (and subclasses),
        ``transformers``' ``Conv1D`` (weight stored ``(in, out)``; ranked and N:M-grouped along its
        input dimension like a Linear), the packed ``in_proj_weight`` of
        ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear) and ``nn.Conv2d``.  Explicit
        types: any of ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.MultiheadAttention``,
        transformers' ``Conv1D`` (and subclasses).
    calibration : iterable, optional
        Input batches for ``criterion='wanda'``, ``'sparsegpt'`` and ``reconstruct=True``:
        tensors, ``(inputs, targets, ...)`` tuples (as a ``DataLoader`` yields; only the first
        element is fed) or dicts of keyword inputs (``model(**batch)``, as Hugging Face models
        take them).  Run in eval mode under ``no_grad``; for reconstruction the batches are
        materialised in a list and run once per group of layers.
    reconstruct : bool
        After choosing the masks with ``criterion``, update the kept weights of every pruned
        layer, sequentially in call order, to reconstruct its output on ``calibration`` (OBS
        updates, the masks are kept exactly).  Implied by ``criterion='sparsegpt'``.
    damp : float
        Reconstruction: dampening added to the Hessian diagonal, as a fraction of its mean.
    block_size : int
        Reconstruction: columns per lazy-update block.
    hessian_dtype : torch.float64 or torch.float32
        Reconstruction: precision of the per-layer Hessian (``K x K``) and of the solver.
    dense_targets : bool
        Reconstruction: fit every layer to the dense model's output on its dense inputs, which
        also undoes the drift of the layers pruned before it (a dense copy of the model runs
        alongside; twice the forward cost).  Default: the layer's own dense weights applied to
        the inputs of the model pruned so far, as in SparseGPT.
    update_bias : bool
        Reconstruction: also re-fit each layer's bias (it absorbs the mean output shift; the
        solver then works on the centred input covariance).  Not with ``dense_targets``.
    skip_padding : bool
        Calibration statistics (Wanda norms, Hessians, OWL outlier ratios) leave out token
        positions that a dict batch's ``attention_mask`` marks as padding.
    allocation : {"uniform", "owl"} or OWL
        How a float ``sparsity`` (``scope='layer'``) is spread over the modules.  ``"uniform"``:
        every module gets it.  ``"owl"`` / ``OWL(lam, m, group)``: outlier-weighted layerwise
        sparsity (:mod:`sparsekit.prune.allocation`; needs ``calibration``): blocks with more
        outlier Wanda scores are pruned less, others more, and the total stays exactly
        ``sparsity`` (to one weight).  ``report.extra["allocation"]`` holds the per-module targets.

    Returns
    -------
    PruneReport
        Per-layer target, reached sparsity, parameters and nonzeros before/after.

    Raises
    ------
    ValueError
        For bad arguments (the message names the argument and the value).

    Notes
    -----
    Selection ranks groups by ``(score, position)`` with a stable sort and prunes the lowest ones
    until the pruned element count is closest to ``sparsity * numel``: exact to within one element
    (unstructured) or one group, and deterministic under ties.  Cost: one sort of the scores,
    ``O(n log n)`` for ``n`` groups.

    Examples
    --------
    >>> report = prune(model, 0.9, exclude="fc3")                      # doctest: +SKIP
    >>> report = prune(model, granularity="2:4")                       # doctest: +SKIP
    >>> report = prune(model, {"fc1": 0.95, "fc2": 0.8}, granularity=(1, 4))  # doctest: +SKIP
    """
    if not isinstance(reconstruct, bool):
        raise ValueError(f"reconstruct: expected a bool, got {reconstruct!r}")
    if not isinstance(dense_targets, bool):
        raise ValueError(f"dense_targets: expected a bool, got {dense_targets!r}")
    owl = None
    if isinstance(allocation, OWL) or allocation == "owl":
        owl = allocation if isinstance(allocation, OWL) else OWL()
    elif allocation != "uniform":
        raise ValueError(f"allocation: expected 'uniform', 'owl' or an OWL(...) instance, got "
                         f"{allocation!r}")
    if owl is not None:
        if isinstance(sparsity, Mapping) or sparsity is None or scope != "layer" or (
                parse_granularity(granularity).kind == "nm"):
            raise ValueError(f"allocation: OWL spreads one float sparsity over the layers "
                             f"(scope='layer', not N:M); got sparsity={sparsity!r}, "
                             f"scope={scope!r}, granularity={granularity!r}")
        if calibration is None:
            raise ValueError("calibration: allocation='owl' needs calibration data (an iterable "
                             "of input batches), got None")
        calibration = calibration_batches(calibration, "allocation='owl'")
        sparsity = owl_sparsities(model, sparsity, calibration, owl=owl, include=include,
                                  exclude=exclude, types=types, filter_fn=filter_fn,
                                  skip_padding=skip_padding)
        include = exclude = filter_fn = None
    engine = Engine(model, sparsity, criterion=criterion, granularity=granularity, scope=scope,
                    include=include, exclude=exclude, types=types, calibration=calibration,
                    filter_fn=filter_fn, skip_padding=skip_padding)
    before = count_nonzero(engine.modules)
    targets = engine.targets_for(sparsity)
    target = engine.gran.fixed_sparsity if sparsity is None else (
        dict(sparsity) if isinstance(sparsity, Mapping) else float(sparsity))
    if engine.crit.name == "sparsegpt" or reconstruct:
        report = prune_with_reconstruction(engine, targets, target, before, damp=damp,
                                           block_size=block_size, hessian_dtype=hessian_dtype,
                                           dense_targets=dense_targets, update_bias=update_bias,
                                           skip_padding=skip_padding)
    else:
        if update_bias:
            raise ValueError("update_bias: only used by reconstruction (criterion='sparsegpt' "
                             "or reconstruct=True)")
        masks = engine.compute_masks(float(sparsity) if scope == "global" else targets)
        apply_masks(engine.modules, masks)
        report = engine.report(masks, before, None if scope == "global" else targets, target)
    if owl is not None:
        report.extra["allocation"] = {"method": "owl", "lam": owl.lam, "m": owl.m,
                                      "targets": dict(sparsity)}
    return report
