"""Granularity parsing and mask selection (exact counts, deterministic tie-breaking).

Every weight is handled through its 2-D view ``(out, K)``: ``nn.Linear`` weights as they are,
convolution weights flattened to ``(out_channels, in_channels/groups * prod(kernel))`` -- the
im2col/GEMM view that CSR/BSR kernels see.  Masks are boolean, ``True`` = kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Granularity", "parse_granularity", "group_scores", "expand_group_mask",
           "select_pruned_groups", "nm_mask", "check_granularity_fits"]

_ROW_ALIASES = ("row", "rows", "channel", "channels", "output_channel")


@dataclass(frozen=True)
class Granularity:
    """A parsed pruning granularity.

    Attributes
    ----------
    kind : {"unstructured", "block", "nm", "row"}
    block : tuple of int, optional
        ``(r, c)`` for ``kind == "block"``.
    n, m : int
        ``N`` kept out of every ``M`` consecutive weights for ``kind == "nm"``.
    """

    kind: str
    block: tuple[int, int] | None = None
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block{self.block[0]}x{self.block[1]}"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return self.kind

    @property
    def fixed_sparsity(self) -> float | None:
        """Sparsity implied by the pattern (N:M only), else ``None``."""
        return (self.m - self.n) / self.m if self.kind == "nm" else None


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def parse_granularity(granularity: object) -> Granularity:
    """Parse ``"unstructured"``, ``"row"``/``"channel"``, ``"N:M"``, ``(r, c)`` or ``"RxC"``.

    Raises
    ------
    ValueError
        Naming ``granularity`` and the value, for anything else (including ``N > M``).
    """
    if isinstance(granularity, Granularity):
        return granularity
    expected = ("expected 'unstructured', 'row' (alias 'channel'), an 'N:M' string such as '2:4', "
                "or a block (r, c) / 'RxC'")
    if isinstance(granularity, str):
        s = granularity.strip().lower()
        if s == "unstructured":
            return Granularity("unstructured")
        if s in _ROW_ALIASES:
            return Granularity("row")
        if ":" in s:
            parts = s.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"granularity: bad N:M string {granularity!r}; expected two "
                                 "positive integers such as '2:4'")
            n, m = (int(p) for p in parts)
            if n < 1 or m < 1:
                raise ValueError(f"granularity: N and M must be >= 1 in 'N:M', got {granularity!r}")
            if n > m:
                raise ValueError(f"granularity: N must be <= M in 'N:M', got N={n} > M={m} "
                                 f"({granularity!r})")
            return Granularity("nm", n=n, m=m)
        if "x" in s:
            parts = s.split("x")
            if len(parts) == 2 and all(p.strip().isdigit() and int(p) >= 1 for p in parts):
                return Granularity("block", block=(int(parts[0]), int(parts[1])))
        raise ValueError(f"granularity: unknown granularity {granularity!r}; {expected}")
    if isinstance(granularity, (tuple, list)):
        if len(granularity) == 2 and all(_positive_int(v) for v in granularity):
            return Granularity("block", block=(int(granularity[0]), int(granularity[1])))
        raise ValueError(f"granularity: a block must be two positive ints (r, c), "
                         f"got {granularity!r}")
    raise ValueError(f"granularity: {expected}; got {granularity!r} "
                     f"(type {type(granularity).__name__})")


def check_granularity_fits(g: Granularity, shape2d: tuple[int, int], name: str) -> None:
    """Raise ValueError when a block / N:M group is larger than module ``name``'s 2-D weight."""
    rows, cols = shape2d
    if g.kind == "block" and (g.block[0] > rows or g.block[1] > cols):
        raise ValueError(f"granularity: block {g.block} is larger than the weight of module "
                         f"{name!r} (2-D view {rows}x{cols})")
    if g.kind == "nm" and g.m > cols:
        raise ValueError(f"granularity: M={g.m} of {str(g)!r} is larger than the input dimension "
                         f"{cols} of module {name!r}")


def group_scores(elem: torch.Tensor, g: Granularity, reduce: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce element scores of a 2-D weight view to one score per group.

    Parameters
    ----------
    elem : Tensor, shape (R, K), float64
        Element scores (``|w|``, ``w**2``, ...).
    g : Granularity
        ``unstructured``, ``block`` or ``row`` (N:M is handled by :func:`nm_mask`).
    reduce : {"sum", "sqrt_sum", "mean"}
        ``sum`` over the group, ``sqrt`` of the sum (L2 norm when ``elem = w**2``), or the mean
        over the group's real elements (ragged edge blocks are not padded for the mean).

    Returns
    -------
    scores, sizes : Tensor (G,) float64, Tensor (G,) int64
        Group scores (row-major group order) and the number of real elements in each group.
    """
    rows, cols = elem.shape
    if g.kind == "unstructured":
        s = elem.reshape(-1)
        sizes = torch.ones(s.numel(), dtype=torch.int64, device=elem.device)
    elif g.kind == "row":
        s = elem.sum(dim=1)
        sizes = torch.full((rows,), cols, dtype=torch.int64, device=elem.device)
    elif g.kind == "block":
        r, c = g.block
        rb, kb = math.ceil(rows / r), math.ceil(cols / c)
        padded = elem.new_zeros((rb * r, kb * c))
        padded[:rows, :cols] = elem
        s = padded.reshape(rb, r, kb, c).sum(dim=(1, 3)).reshape(-1)
        # Real elements per block: full blocks r*c, ragged edge blocks fewer.
        hr = torch.full((rb,), r, dtype=torch.int64, device=elem.device)
        hr[-1] = rows - (rb - 1) * r
        wc = torch.full((kb,), c, dtype=torch.int64, device=elem.device)
        wc[-1] = cols - (kb - 1) * c
        sizes = (hr[:, None] * wc[None, :]).reshape(-1)
    else:  # pragma: no cover - callers route N:M elsewhere
        raise ValueError(f"granularity: {g} has no group scores")
    if reduce == "sqrt_sum":
        s = s.clamp_min(0).sqrt()
    elif reduce == "mean" and g.kind != "unstructured":
        s = s / sizes.to(s.dtype)
    return s, sizes


def expand_group_mask(keep_groups: torch.Tensor, g: Granularity, shape2d: tuple[int, int]
                      ) -> torch.Tensor:
    """Expand a flat per-group keep vector (from :func:`group_scores` order) to a (R, K) mask."""
    rows, cols = shape2d
    if g.kind == "unstructured":
        return keep_groups.reshape(rows, cols)
    if g.kind == "row":
        return keep_groups[:, None].expand(rows, cols).clone()
    r, c = g.block
    rb, kb = math.ceil(rows / r), math.ceil(cols / c)
    full = keep_groups.reshape(rb, kb).repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    return full[:rows, :cols].contiguous()


def select_pruned_groups(scores: torch.Tensor, sizes: torch.Tensor, target: float,
                         already: torch.Tensor | None = None) -> torch.Tensor:
    """Choose the lowest-scoring groups whose total size is closest to ``target`` elements.

    Groups are ranked by ``(score, index)`` with a stable sort, so ties are broken by position
    (earlier groups pruned first) and the result is deterministic; no threshold is used, so ties
    never over-prune.  The pruned element count is within half a group of ``target`` (within one
    element for unstructured pruning), unless ``already`` forces more.

    Parameters
    ----------
    scores : Tensor (G,)
        Group scores, higher = more important.
    sizes : Tensor (G,) int64
        Elements per group.
    target : float
        Number of elements to prune.
    already : Tensor (G,) bool, optional
        Groups pruned earlier; they stay pruned (masks only grow during gradual pruning).

    Returns
    -------
    Tensor (G,) bool
        ``True`` for the groups to prune.
    """
    scores = scores.to(torch.float64).clone()
    n_already = 0
    if already is not None:
        scores[already] = -math.inf
        n_already = int(already.sum())
    order = torch.sort(scores, stable=True).indices
    cs = torch.cumsum(sizes[order], 0).to(torch.float64)
    k = int(torch.searchsorted(cs, torch.tensor([target], dtype=torch.float64,
                                                device=cs.device), right=True))
    if k < cs.numel():
        below = float(cs[k - 1]) if k > 0 else 0.0
        if float(cs[k]) - target < target - below:
            k += 1
    k = max(k, n_already)
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    pruned[order[:k]] = True
    return pruned


def nm_mask(elem: torch.Tensor, n: int, m: int, already: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive elements along dim 1.

    When ``K`` is not a multiple of ``m`` the last group of each row holds ``L = K % m`` elements
    and keeps ``min(n, L)`` of them, so "at most ``n`` nonzeros in any group of ``m``" still holds.
    Ties keep the earlier element (stable sort).

    Parameters
    ----------
    elem : Tensor (R, K)
        Element scores.
    already : Tensor (R, K) bool, optional
        Elements pruned earlier; they are never revived.

    Returns
    -------
    Tensor (R, K) bool
        Keep mask.
    """
    rows, cols = elem.shape
    groups = math.ceil(cols / m)
    padded = elem.new_full((rows, groups * m), -math.inf, dtype=torch.float64)
    s = elem.to(torch.float64)
    if already is not None:
        s = s.masked_fill(already, -math.inf)
    padded[:, :cols] = s
    padded = padded.reshape(rows, groups, m)
    order = torch.sort(padded, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(padded, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    keep = keep.reshape(rows, groups * m)[:, :cols].contiguous()
    if already is not None:
        keep &= ~already
    return keep
