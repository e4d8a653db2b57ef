"""Fewer bytes per nonzero: 8-bit column gaps and int8 values with per-row scales.

Column gaps ("delta8")
----------------------
Within each row the sorted column ids ``c_0 < c_1 < ...`` are stored as uint8 gaps:
``g_0 = c_0`` and ``g_i = c_i - c_{i-1}``, so the column of entry ``j`` is the running sum of
the gaps of its row up to and including ``j``. A gap larger than 255 is split by *escape
entries*: entries with gap 255 and value 0, inserted before the real entry, as many as
``(g - 1) // 255``. Escapes are ordinary stored zeros, so every kernel handles them without a
branch; ``indptr`` counts them. Gap 0 is only valid for the first entry of a row (column 0).
The same coding applies to BSR block columns (escape blocks are all-zero blocks).

At 90% sparsity a gap above 255 has probability 0.9**255 (about 2e-12), so the index stream
costs 1 byte per nonzero against 2 for uint16. For very sparse rows the escapes cost more than
they save; :func:`choose_encoding` keeps the plain indices whenever they take fewer bytes.

int8 values
-----------
Symmetric, per output row, round to nearest (ties to even, ``torch.round``):
``scale[m] = max_k |W[m, k]| / 127`` and ``q = clamp(round(W / scale[m]), -127, 127)``; an
all-zero row gets ``scale = 0`` and ``q = 0``. The dequantized weight is ``q * scale[m]``
(fp32). Non-finite weights cannot be quantized and raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "GAP_MAX",
    "ENCODINGS",
    "delta8_encode",
    "delta8_decode",
    "delta8_validate",
    "delta8_entries",
    "quantize_int8_rows",
    "quantization_report",
    "validate_scales",
]

#: Largest gap stored in one uint8 entry (larger gaps use escape entries).
GAP_MAX = 255
#: Column index encodings: plain column ids (uint16/int32) or uint8 gaps.
ENCODINGS = ("plain", "delta8")


def _row_starts(rows: torch.Tensor) -> torch.Tensor:
    """Mask of the first entry of each row in a row-sorted list of row ids."""
    start = torch.ones_like(rows, dtype=torch.bool)
    if rows.numel() > 1:
        start[1:] = rows[1:] != rows[:-1]
    return start


def _gaps(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gap, escapes) per entry for row-major sorted (rows, cols), both int64."""
    prev = torch.zeros_like(cols)
    if cols.numel() > 1:
        prev[1:] = cols[:-1]
    prev[_row_starts(rows)] = 0
    gap = cols - prev
    esc = torch.clamp(torch.div(gap - 1, GAP_MAX, rounding_mode="floor"), min=0)
    return gap, esc


def delta8_entries(rows: torch.Tensor, cols: torch.Tensor) -> int:
    """Stored entries (real + escapes) the delta8 coding of ``(rows, cols)`` takes."""
    if cols.numel() == 0:
        return 0
    _, esc = _gaps(rows.to(torch.int64), cols.to(torch.int64))
    return int(cols.numel() + esc.sum())


def choose_encoding(rows: torch.Tensor, cols: torch.Tensor, n_cols: int, entry_bytes: int) -> str:
    """``"delta8"`` when it takes fewer index + value bytes than plain indices, else ``"plain"``.

    ``entry_bytes`` is the size of one stored value (BSR: one block)."""
    nnz = int(cols.numel())
    if nnz == 0:
        return "plain"
    plain = nnz * ((2 if n_cols <= 65536 else 4) + entry_bytes)
    delta = delta8_entries(rows, cols) * (1 + entry_bytes)
    return "delta8" if delta < plain else "plain"


def delta8_encode(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, values: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code row-major sorted ``(rows, cols)`` (int64) as uint8 gaps.

    Returns ``(indptr int64 (n_rows + 1,), gaps uint8 (E,), values (E, ...))`` where
    ``E = nnz + escapes`` and escape entries hold zero values. O(nnz)."""
    rows = rows.to(torch.int64)
    cols = cols.to(torch.int64)
    dev = cols.device
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
    if cols.numel() == 0:
        return indptr, torch.zeros(0, dtype=torch.uint8, device=dev), values[:0].clone()
    gap, esc = _gaps(rows, cols)
    cnt = esc + 1
    pos = torch.cumsum(cnt, 0) - 1
    total = int(pos[-1]) + 1
    out_gap = torch.full((total,), GAP_MAX, dtype=torch.uint8, device=dev)
    out_gap[pos] = (gap - GAP_MAX * esc).to(torch.uint8)
    out_val = torch.zeros((total, *values.shape[1:]), dtype=values.dtype, device=dev)
    out_val[pos] = values
    torch.cumsum(torch.bincount(rows, weights=cnt.to(torch.float64), minlength=n_rows)
                 .to(torch.int64), 0, out=indptr[1:])
    return indptr, out_gap, out_val


def delta8_decode(indptr: torch.Tensor, gaps: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Column id (int64) of every stored entry (escapes included). O(E)."""
    ip = indptr.to(torch.int64)
    cs = torch.cumsum(gaps.to(torch.int64), 0)
    if cs.numel() == 0:
        return cs
    counts = ip[1:] - ip[:-1]
    before = torch.zeros(n_rows, dtype=torch.int64, device=cs.device)
    has_prev = ip[:-1] > 0
    before[has_prev] = cs[ip[:-1][has_prev] - 1]
    return cs - torch.repeat_interleave(before, counts)


def delta8_validate(indptr: np.ndarray, gaps: np.ndarray, n_rows: int, n_cols: int) -> None:
    """Raise ValueError naming the first violation of the delta8 invariants.

    Checks: indptr (length, start, monotone, end == len(gaps)); gaps uint8; gap 0 only at the
    start of a row; every decoded column in ``[0, n_cols)``."""
    if gaps.dtype != np.uint8:
        raise TypeError(f"indices: expected uint8 gaps for index_encoding='delta8', got dtype "
                        f"{gaps.dtype}")
    check_indptr(indptr, n_rows, gaps.shape[0])
    if gaps.shape[0] == 0:
        return
    ip_t = torch.from_numpy(np.ascontiguousarray(indptr.astype(np.int64)))
    g = torch.from_numpy(np.ascontiguousarray(gaps))
    cols = delta8_decode(ip_t, g, n_rows)
    starts = torch.zeros(gaps.shape[0], dtype=torch.bool)
    first = ip_t[:-1][ip_t[:-1] < ip_t[1:]]
    starts[first] = True
    bad = torch.nonzero((g == 0) & ~starts).flatten()
    if bad.numel():
        p = int(bad[0])
        row = int(torch.searchsorted(ip_t, p, right=True)) - 1
        raise ValueError(
            f"indices: expected gaps >= 1 after the first entry of a row (sorted unique "
            f"columns), got 0 at position {p} (row {row})"
        )
    bad = torch.nonzero(cols >= n_cols).flatten()
    if bad.numel():
        p = int(bad[0])
        raise ValueError(
            f"indices: expected decoded columns in [0, {n_cols}), got {int(cols[p])} at "
            f"position {p}"
        )


def check_indptr(indptr: np.ndarray, n_rows: int, nnz: int) -> None:
    """The indptr invariants of every CSR/BSR structure: length ``n_rows + 1``, starts at 0,
    non-decreasing, ends at ``nnz``. Raises ``ValueError`` naming the first violation."""
    if indptr.shape[0] != n_rows + 1:
        raise ValueError(
            f"indptr: expected a 1-D array of length n_rows + 1 = {n_rows + 1}, "
            f"got length {indptr.shape[0]}"
        )
    if int(indptr[0]) != 0:
        raise ValueError(f"indptr: expected indptr[0] == 0, got {int(indptr[0])}")
    ip = indptr.astype(np.int64, copy=False)
    bad = np.flatnonzero(np.diff(ip) < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"indptr: expected non-decreasing values, got indptr[{i + 1}] = {int(ip[i + 1])} "
            f"< indptr[{i}] = {int(ip[i])}"
        )
    if int(ip[-1]) != nnz:
        raise ValueError(f"indptr: expected indptr[-1] == len(indices) = {nnz}, got {int(ip[-1])}")


# ------------------------------------------------------------------------------ int8
def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of a dense ``(M, K)`` (or ``(M, ...)``) tensor.

    Returns ``(q int8 same shape, scale float32 (M,))``. Raises ValueError on non-finite
    weights (they have no int8 representation)."""
    wf = w.detach().to(torch.float32)
    flat = wf.reshape(wf.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        r = int(torch.nonzero(~finite).flatten()[0])
        raise ValueError(
            f"w: expected finite weights for value_dtype=torch.int8, got a NaN/Inf in row {r}"
        )
    amax = flat.abs().amax(dim=1) if flat.shape[1] else torch.zeros(flat.shape[0])
    scale = (amax / 127.0).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(flat / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def quantization_report(ref: torch.Tensor, deq: torch.Tensor) -> dict[str, float]:
    """Error of the dequantized stored values ``deq`` against the originals ``ref``.

    Keys: ``max_abs_error``, ``mean_abs_error`` (over stored values), ``rel_error``
    (``||deq - ref||_2 / ||ref||_2``, 0 for an all-zero weight), ``max_abs_weight``."""
    r = ref.detach().to(torch.float64).reshape(-1)
    d = deq.detach().to(torch.float64).reshape(-1)
    err = (d - r).abs()
    n = float(torch.linalg.vector_norm(r)) if r.numel() else 0.0
    return {
        "max_abs_error": float(err.max()) if err.numel() else 0.0,
        "mean_abs_error": float(err.mean()) if err.numel() else 0.0,
        "rel_error": float(torch.linalg.vector_norm(d - r)) / n if n > 0 else 0.0,
        "max_abs_weight": float(r.abs().max()) if r.numel() else 0.0,
    }


def validate_scales(scales: Any, n_rows: int, name: str = "scales") -> torch.Tensor:
    """fp32 contiguous ``(n_rows,)`` tensor of finite, non-negative scales, or a clear error."""
    if isinstance(scales, np.ndarray):
        scales = torch.from_numpy(np.ascontiguousarray(scales))
    if not isinstance(scales, torch.Tensor):
        raise TypeError(
            f"{name}: expected a float32 torch.Tensor of shape ({n_rows},) for int8 values, "
            f"got {type(scales).__name__}"
        )
    if scales.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype float32, got {scales.dtype}")
    if tuple(scales.shape) != (n_rows,):
        raise ValueError(f"{name}: expected shape ({n_rows},) (one per output row), got "
                         f"{tuple(scales.shape)}")
    bad = torch.nonzero(~torch.isfinite(scales) | (scales < 0)).flatten()
    if bad.numel():
        p = int(bad[0])
        raise ValueError(f"{name}: expected finite values >= 0, got {float(scales[p])} at "
                         f"position {p}")
    return scales.detach().contiguous()
