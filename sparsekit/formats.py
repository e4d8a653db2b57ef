"""Sparse weight formats: :class:`CSRMatrix` and :class:`BSRMatrix`.

Both store a 2-D weight ``W`` of shape ``(M, K) = (out_features, in_features)`` in packed torch
tensors (so ``.to(device)`` moves them and torch ops / export see them):

* ``indptr``  -- int32 when nnz < 2**31, else int64; length ``M + 1`` (BSR: ``Mb + 1``).
* ``indices`` -- column ids (BSR: block-column ids), ``torch.uint16`` when the column count
  (BSR: block-column count) is <= 65536, else ``torch.int32``. Sorted and unique per row.
* ``values``  -- float32 | bfloat16 | float16; CSR: ``(nnz,)``, BSR: ``(nnzb, r, c)``.

Matrices are immutable by convention: backends cache derived data (e.g. thread partitions) on
the object (:meth:`cached`), so mutate the buffers in place only if you also call
:meth:`cache_invalidate`.

Validation messages
-------------------
Constructors from raw arrays validate every invariant and raise ``ValueError`` / ``TypeError``
whose message names the argument, the expectation and the offending value. The structural
checks (``_C.validate_csr`` when the compiled extension is importable, a vectorised numpy path
otherwise) produce, for the first violation found, exactly::

    indptr: expected a 1-D array of length n_rows + 1 = {M+1}, got length {n}
    indptr: expected indptr[0] == 0, got {v}
    indptr: expected non-decreasing values, got indptr[{i+1}] = {b} < indptr[{i}] = {a}
    indptr: expected indptr[-1] == len(indices) = {nnz}, got {v}
    indices: expected values in [0, {K}), got {v} at position {p}
    indices: expected sorted unique values within each row, got {v} after {u} at position {p} (row {r})

NaN and Inf values are allowed: they are data and propagate through the kernels like in dense
matmul (an Inf in ``x`` at a pruned position contributes nothing, unlike ``0 * inf`` in dense).
"""  # noqa: E501  (the message listing above is quoted verbatim, one message per line)

from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Any

import numpy as np
import torch

from . import _compress

__all__ = ["CSRMatrix", "BSRMatrix", "VALUE_DTYPES"]

#: Supported value dtypes.
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_U16_LIMIT = 65536  # indices fit uint16 when the column count is <= this
_INT32_MAX = 2**31 - 1

_C_mod: Any = None
_C_tried = False


def _get_C() -> Any:
    """The compiled extension ``sparsekit._C`` or None (import attempted once, lazily)."""
    global _C_mod, _C_tried
    if not _C_tried:
        try:
            _C_mod = importlib.import_module("sparsekit._C")
        except Exception:  # missing or broken build: numpy fallback
            _C_mod = None
        _C_tried = True
    return _C_mod


# --------------------------------------------------------------------------- helpers
def _index_dtype_for(n_cols: int) -> torch.dtype:
    return torch.uint16 if n_cols <= _U16_LIMIT else torch.int32


def _indptr_dtype_for(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < 2**31 else torch.int64


def _check_shape(shape: Any, name: str = "shape") -> tuple[int, int]:
    ok = (
        isinstance(shape, (tuple, list, torch.Size))
        and len(shape) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape)
        and all(int(s) > 0 for s in shape)
    )
    if not ok:
        what = "(r, c)" if name == "blocksize" else "(out_features, in_features)"
        raise ValueError(f"{name}: expected a tuple of two positive ints {what}, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _resolve_value_dtype(value_dtype: Any, src: torch.dtype, name: str = "value_dtype"):
    if value_dtype is None:
        return src if src in VALUE_DTYPES else torch.float32
    if isinstance(value_dtype, np.dtype) or (
        isinstance(value_dtype, type) and issubclass(value_dtype, np.generic)
    ):
        np_map = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}
        value_dtype = np_map.get(np.dtype(value_dtype), value_dtype)
    if isinstance(value_dtype, str):
        value_dtype = {
            "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
        }.get(value_dtype, value_dtype)
    if value_dtype not in VALUE_DTYPES:
        raise TypeError(
            f"{name}: expected one of torch.float32, torch.bfloat16, torch.float16"
            f"{' (or torch.int8 in from_dense)' if name == 'value_dtype' else ''}, "
            f"got {value_dtype!r}"
        )
    return value_dtype


def _as_tensor_dense(w: Any, name: str = "w") -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        t = w.detach()
    elif isinstance(w, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(w))
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(w).__name__}")
    if t.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D weight (out_features, in_features), got shape {tuple(t.shape)}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected non-empty dimensions, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"{name}: expected a real dtype, got {t.dtype}")
    return t


def _to_numpy_int(a: Any, name: str) -> np.ndarray:
    """1-D integer numpy view/copy of an index array (torch or numpy), for validation."""
    if isinstance(a, torch.Tensor):
        if a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
        a = a.detach().cpu()
        if a.dtype not in (torch.uint16, torch.uint32, torch.uint64):
            a = a.contiguous()
        arr = a.numpy()
    elif isinstance(a, np.ndarray):
        arr = a
    elif isinstance(a, (list, tuple)):
        arr = np.asarray(a)
        if arr.size == 0:
            arr = arr.astype(np.int64)
    else:
        raise TypeError(
            f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(a).__name__}"
        )
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _is_int8(value_dtype: Any) -> bool:
    return value_dtype is torch.int8 or value_dtype in ("int8", np.int8) or (
        isinstance(value_dtype, np.dtype) and value_dtype == np.int8)


def _check_encoding(enc: Any, *, allow_auto: bool) -> None:
    allowed = ("plain", "delta8", "auto") if allow_auto else ("plain", "delta8")
    if enc not in allowed:
        raise ValueError(f"index_encoding: expected one of {allowed}, got {enc!r}")


def _pack_delta8(indptr_np: np.ndarray, gaps_np: np.ndarray, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    nnz = gaps_np.shape[0]
    ip_dt = np.int32 if nnz < 2**31 else np.int64
    ip = torch.from_numpy(np.ascontiguousarray(indptr_np.astype(ip_dt, copy=False)))
    return ip.to(device), torch.from_numpy(np.ascontiguousarray(gaps_np)).to(device)


def _values_tensor(values: Any, name: str = "values", *, int8: bool = False) -> torch.Tensor:
    if int8:
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(np.ascontiguousarray(values))
        if not isinstance(values, torch.Tensor) or values.dtype != torch.int8:
            got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise TypeError(f"{name}: expected int8 values when scales are given, got {got}")
        return values.detach().contiguous()
    if isinstance(values, torch.Tensor):
        t = values.detach()
    elif isinstance(values, np.ndarray):
        if values.dtype not in (np.float32, np.float16):
            raise TypeError(
                f"{name}: expected dtype float32, bfloat16 or float16, got {values.dtype} "
                "(convert with .astype(np.float32), or use from_scipy/from_dense)"
            )
        t = torch.from_numpy(np.ascontiguousarray(values))
    else:
        raise TypeError(
            f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(values).__name__}"
        )
    if t.dtype not in VALUE_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype} "
            "(convert with .float(), or use from_dense(..., value_dtype=...))"
        )
    return t.contiguous()


def validate_structure(indptr: np.ndarray, indices: np.ndarray, n_rows: int, n_cols: int,
                       *, use_C: bool | None = None) -> None:
    """Validate a CSR (or BSR block) structure; raises ValueError naming the first violation.

    Parameters
    ----------
    indptr, indices : numpy.ndarray
        1-D integer arrays.
    n_rows, n_cols : int
        Row count (``len(indptr) - 1`` expected) and column bound for ``indices``.
    use_C : bool or None
        None: use ``_C.validate_csr`` when importable and the dtypes are ones it takes.
        False: force the numpy path. True: require the ``_C`` path.

    Complexity O(nnz + n_rows); the numpy path allocates O(nnz) temporaries.
    """
    C = _get_C() if use_C is not False else None
    if use_C and C is None:
        raise RuntimeError("validate_structure(use_C=True): sparsekit._C is not importable")
    if C is not None and hasattr(C, "validate_csr"):
        ip = indptr if indptr.dtype in (np.int32, np.int64) else None
        ix = indices if indices.dtype in (np.uint16, np.int32, np.int64) else None
        if ip is not None and ix is not None:
            try:
                C.validate_csr(ip, ix, int(n_rows), int(n_cols))
                return
            except TypeError:
                if use_C:
                    raise
                # binding does not take this dtype combination: fall through to numpy
    _validate_structure_numpy(indptr, indices, n_rows, n_cols)


def _validate_structure_numpy(indptr: np.ndarray, indices: np.ndarray, n_rows: int,
                              n_cols: int) -> None:
    nnz = indices.shape[0]
    _compress.check_indptr(indptr, n_rows, nnz)
    ip = indptr.astype(np.int64, copy=False)
    if nnz == 0:
        return
    ix = indices
    if ix.dtype.kind == "u" and ix.dtype.itemsize >= 8:
        # uint64 values above int64 range must not wrap during the checks below
        bad = np.flatnonzero(ix >= np.uint64(n_cols))
        if bad.size:
            p = int(bad[0])
            raise ValueError(
                f"indices: expected values in [0, {n_cols}), got {int(ix[p])} at position {p}"
            )
    ix = ix.astype(np.int64, copy=False)
    bad = np.flatnonzero((ix < 0) | (ix >= n_cols))
    if bad.size:
        p = int(bad[0])
        raise ValueError(
            f"indices: expected values in [0, {n_cols}), got {int(ix[p])} at position {p}"
        )
    if nnz > 1:
        dd = np.diff(ix) <= 0
        # a decrease is fine exactly where a new row starts (position p == indptr[r] for some r)
        starts = ip[1:-1]
        starts = starts[(starts > 0) & (starts < nnz)]
        dd[starts - 1] = False
        bad = np.flatnonzero(dd)
        if bad.size:
            p = int(bad[0]) + 1
            row = int(np.searchsorted(ip, p, side="right")) - 1
            raise ValueError(
                f"indices: expected sorted unique values within each row, got {int(ix[p])} "
                f"after {int(ix[p - 1])} at position {p} (row {row})"
            )


def _pack_structure(indptr_np: np.ndarray, indices_np: np.ndarray, n_cols: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert validated numpy index arrays to the packed torch dtypes on ``device``."""
    nnz = indices_np.shape[0]
    ip_dt = np.int32 if nnz < 2**31 else np.int64
    ix_dt = np.uint16 if n_cols <= _U16_LIMIT else np.int32
    ip = torch.from_numpy(np.ascontiguousarray(indptr_np.astype(ip_dt, copy=False)))
    ix = torch.from_numpy(np.ascontiguousarray(indices_np.astype(ix_dt, copy=False)))
    return ip.to(device), ix.to(device)


def _validate_and_pack(indptr_np: np.ndarray, indices_np: np.ndarray, n_rows: int, n_cols: int,
                       index_encoding: str, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate user index arrays (plain column ids, or uint8 gaps for ``"delta8"``) for an
    ``n_rows x n_cols`` structure (block rows / columns for BSR) and pack them on ``device``."""
    if index_encoding == "delta8":
        _compress.delta8_validate(indptr_np, indices_np, n_rows, n_cols)
        return _pack_delta8(indptr_np, indices_np, device)
    validate_structure(indptr_np, indices_np, n_rows, n_cols)
    return _pack_structure(indptr_np, indices_np, n_cols, device)


@contextlib.contextmanager
def _quiet_sparse_beta():
    # torch warns on every sparse CSR/BSR construction that the layout is "beta"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*support is in beta state.*")
        yield


def _row_ids(indptr: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = (indptr[1:] - indptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(n_rows, device=indptr.device), counts)


def _transpose_structure(indptr: torch.Tensor, indices: torch.Tensor, n_rows: int,
                         n_cols: int, method: str = "auto"
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structure of the transpose: (new indptr int64 (n_cols+1), new indices int64 (the old
    row ids, sorted within each new row), perm int64 with new_values = values[perm]).

    CPU: scipy's O(nnz + n_rows + n_cols) counting transpose (csr -> csc) applied to the
    permutation ``arange(nnz)``; other devices: a stable sort by column (O(nnz log nnz)).
    ``method="sort"`` forces the device-generic path (tests compare both).
    """
    nnz = int(indices.shape[0])
    if (method == "auto" and indices.device.type == "cpu" and nnz < 2**31
            and max(n_rows, n_cols) < 2**31):
        import scipy.sparse as sps

        data = np.arange(nnz, dtype=np.int64)
        csr = sps.csr_array(
            (data, indices.numpy().astype(np.int32), indptr.numpy().astype(np.int32)),
            shape=(n_rows, n_cols),
        )
        csc = csr.tocsc()
        return (torch.from_numpy(csc.indptr.astype(np.int64)),
                torch.from_numpy(csc.indices.astype(np.int64)), torch.from_numpy(csc.data))
    cols = indices.to(torch.int64)
    rows = _row_ids(indptr, n_rows)
    # rows are already ascending, so a stable sort by column keeps them sorted within each
    # new row
    perm = torch.sort(cols, stable=True).indices
    new_indptr = torch.zeros(n_cols + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(cols, minlength=n_cols), 0, out=new_indptr[1:])
    return new_indptr, rows[perm], perm


def _tensor_device(*ts: Any) -> torch.device:
    devs = {t.device for t in ts if isinstance(t, torch.Tensor)}
    if len(devs) > 1:
        raise ValueError(
            f"indptr/indices/values: expected all on one device, got {sorted(map(str, devs))}"
        )
    return devs.pop() if devs else torch.device("cpu")


# --------------------------------------------------------------------------- base class
class _SparseBase:
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    _shape: tuple[int, int]
    #: fp32 ``(M,)`` per-output-row scales when ``values`` are int8, else None.
    scales: torch.Tensor | None = None
    _quant_report: dict[str, float] | None = None

    # Cache API: derived data of this matrix (backend-private packings, partitions, the
    # transpose, ...) keyed by the caller, e.g. ``("cpp", "np")``. The matrix owns the cache;
    # other modules go through these methods, never through the attributes.
    def _init_cache(self) -> None:
        self._cache: dict[Any, Any] = {}
        self._cache_versions: tuple[int | None, ...] | None = None

    def cache_get(self, key: Any, default: Any = None) -> Any:
        """The cached value for ``key``, or ``default``."""
        return self._cache.get(key, default)

    def cache_put(self, key: Any, value: Any) -> Any:
        """Store ``value`` under ``key``; returns ``value``."""
        self._cache[key] = value
        return value

    def cached(self, key: Any, build) -> Any:
        """The cached value for ``key``, computed by ``build()`` on the first call."""
        try:
            return self._cache[key]
        except KeyError:
            return self.cache_put(key, build())

    def cache_invalidate(self) -> None:
        """Drop all cached data (call after mutating the buffers in place)."""
        self._cache.clear()

    def cache_sync(self) -> None:
        """Drop the cached data if a buffer was modified in place since the last sync.

        Compares the buffers' autograd version counters (a few hundred nanoseconds): cheap
        enough for every call of a layer whose buffers a user may edit in place.
        """
        try:
            v = (self.indptr._version, self.indices._version, self.values._version)
        except RuntimeError:  # inference tensors have no version counter
            v = None
        if v != self._cache_versions:
            if self._cache_versions is not None:
                self._cache.clear()
            self._cache_versions = v

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, K) = (out_features, in_features)``."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Value dtype (float32, bfloat16 or float16)."""
        return self.values.dtype

    @property
    def index_dtype(self) -> torch.dtype:
        """dtype of ``indices`` (torch.uint16 or torch.int32; torch.uint8 for delta8 gaps)."""
        return self.indices.dtype

    @property
    def index_encoding(self) -> str:
        """``"plain"`` (column ids) or ``"delta8"`` (uint8 gaps with escape entries; see
        :mod:`sparsekit._compress`)."""
        return "delta8" if self.indices.dtype == torch.uint8 else "plain"

    @property
    def is_compressed(self) -> bool:
        """True for int8 values or delta8 indices (formats the float kernels cannot read)."""
        return self.scales is not None or self.indices.dtype == torch.uint8

    @property
    def quantization(self) -> dict[str, float] | None:
        """Error of int8 quantization measured when built by ``from_dense`` (keys
        ``max_abs_error``, ``mean_abs_error``, ``rel_error``, ``max_abs_weight``), else None."""
        return self._quant_report

    def decoded(self):
        """The same weight with plain indices and float values (int8 values dequantized to
        float32); ``self`` when already plain. Cached on the matrix."""
        if not self.is_compressed:
            return self
        return self.cached("decoded", self._decode)

    def _set_compression(self, scales: torch.Tensor | None,
                         report: dict[str, float] | None = None) -> None:
        self.scales = scales
        self._quant_report = report

    @property
    def device(self) -> torch.device:
        """Device holding all buffers."""
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed buffers (indptr + indices + values)."""
        ts = [self.indptr, self.indices, self.values]
        if self.scales is not None:
            ts.append(self.scales)
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def density(self) -> float:
        """``nnz / (M * K)``."""
        return self.nnz / (self._shape[0] * self._shape[1])

    def __repr__(self) -> str:
        extra = f", blocksize={self.blocksize}" if isinstance(self, BSRMatrix) else ""
        return (
            f"{type(self).__name__}(shape={self._shape}{extra}, nnz={self.nnz}, "
            f"density={self.density:.4g}, dtype={self.dtype}, index_dtype={self.index_dtype}, "
            f"{'index_encoding=delta8, ' if self.index_encoding == 'delta8' else ''}"
            f"device={self.device})"
        )

    @property
    def T(self):
        """Transposed matrix in the same format (see :meth:`transpose`)."""
        return self.transpose()

    def _to_args(self, device, dtype):
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        dev = torch.device(device) if device is not None else self.device
        vdt = _resolve_value_dtype(dtype, self.dtype, "dtype") if dtype is not None else self.dtype
        return dev, vdt

    def _to_compressed(self, device, dtype):
        """``.to()`` of an int8 / delta8 matrix: float dtypes decode first; CPU only."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        if dtype is not None and dtype != self.dtype:
            return self.decoded().to(device=device, dtype=dtype)
        dev = torch.device(device) if device is not None else self.device
        if dev.type != "cpu":
            raise NotImplementedError(
                f"{type(self).__name__}.to({str(dev)!r}): int8 values / delta8 indices have CPU "
                "kernels only (C++ and Numba); no CUDA kernel reads them yet. Use "
                ".decoded().to(device) for a float matrix with plain indices."
            )
        return self


# --------------------------------------------------------------------------- CSR
class CSRMatrix(_SparseBase):
    """Compressed sparse row weight of shape ``(M, K)``.

    Parameters
    ----------
    indptr : array_like of int, shape (M + 1,)
        Row pointers; torch tensor or numpy array of any integer dtype.
    indices : array_like of int, shape (nnz,)
        Column ids in ``[0, K)``, sorted and unique within each row.
    values : torch.Tensor or numpy.ndarray, shape (nnz,)
        float32, bfloat16 (torch only) or float16. Not converted: use ``from_dense`` /
        ``.to(dtype=...)`` for conversions.
    shape : tuple of int
        ``(M, K)``, both positive.
    scales : torch.Tensor, optional
        float32 ``(M,)`` finite, non-negative per-row scales; required exactly when ``values``
        are int8 (the weight is ``values * scales[row]``).
    index_encoding : {"plain", "delta8"}
        ``"delta8"``: ``indices`` are uint8 column gaps with escape entries (see
        :mod:`sparsekit._compress`); validated by decoding.

    Notes
    -----
    Everything is validated (O(nnz)); see the module docstring for the messages. Index arrays
    are repacked to the canonical widths (indptr int32/int64, indices uint16/int32); values
    already in a supported dtype are used without copy.

    Examples
    --------
    >>> import torch, sparsekit
    >>> w = torch.tensor([[0., 2.], [3., 0.]])
    >>> m = sparsekit.CSRMatrix.from_dense(w)
    >>> m.nnz, m.index_dtype
    (2, torch.uint16)
    >>> torch.equal(m.to_dense(), w)
    True
    """

    def __init__(self, indptr: Any, indices: Any, values: Any, shape: Any, *,
                 scales: Any = None, index_encoding: str = "plain") -> None:
        M, K = _check_shape(shape)
        _check_encoding(index_encoding, allow_auto=False)
        vals = _values_tensor(values, int8=scales is not None)
        if vals.dim() != 1:
            raise ValueError(
                f"values: expected a 1-D array of length nnz, got shape {tuple(vals.shape)}"
            )
        device = _tensor_device(indptr, indices, vals)
        ip = _to_numpy_int(indptr, "indptr")
        ix = _to_numpy_int(indices, "indices")
        if vals.shape[0] != ix.shape[0]:
            raise ValueError(
                f"values: expected length nnz = len(indices) = {ix.shape[0]}, got {vals.shape[0]}"
            )
        sc = None if scales is None else _compress.validate_scales(scales, M)
        ipt, ixt = _validate_and_pack(ip, ix, M, K, index_encoding, device)
        self._set(ipt, ixt, vals.to(device), (M, K))
        if sc is not None:
            self._set_compression(sc.to(device))

    def _set(self, indptr, indices, values, shape) -> None:
        self.indptr, self.indices, self.values, self._shape = indptr, indices, values, shape
        self._init_cache()

    @classmethod
    def _from_parts(cls, indptr, indices, values, shape) -> CSRMatrix:
        """Trusted constructor (no validation) for already-packed, already-valid buffers."""
        self = cls.__new__(cls)
        self._set(indptr, indices, values, tuple(shape))
        return self

    # -- properties
    @property
    def nnz(self) -> int:
        """Number of stored entries (explicit zeros included; delta8 escape entries
        excluded)."""
        if self.indices.dtype == torch.uint8:
            return self.decoded().nnz
        return int(self.indices.shape[0])

    def _decode(self) -> CSRMatrix:
        M, K = self._shape
        indptr, cols, vals = self.indptr, self.indices, self.values
        rows = _row_ids(indptr, M)
        if vals.dtype == torch.int8:
            vals = vals.to(torch.float32) * self.scales[rows]
        if cols.dtype == torch.uint8:
            keep = ~((cols == _compress.GAP_MAX) & (self.values == 0))
            cols = _compress.delta8_decode(indptr, cols, M)[keep]
            rows, vals = rows[keep], vals[keep]
            ip = torch.zeros(M + 1, dtype=torch.int64, device=cols.device)
            torch.cumsum(torch.bincount(rows, minlength=M), 0, out=ip[1:])
            indptr = ip.to(_indptr_dtype_for(int(cols.shape[0])))
            cols = cols.to(_index_dtype_for(K))
        return CSRMatrix._from_parts(indptr, cols, vals.contiguous(), self._shape)

    # -- conversions
    @classmethod
    def from_dense(cls, w: Any, *, value_dtype: Any = None,
                   index_encoding: str | None = None) -> CSRMatrix:
        """Build from a dense 2-D torch tensor or numpy array; exact zeros are pruned entries.

        Parameters
        ----------
        w : torch.Tensor or numpy.ndarray, shape (M, K)
            Dense weight on any device (the result lives on the same device).
        value_dtype : torch.dtype, optional
            float32 / bfloat16 / float16, or torch.int8 (symmetric per-row quantization with
            fp32 ``scales``; see :mod:`sparsekit._compress`). Default: ``w``'s dtype if one of
            the float ones, else float32 (float64 input is converted). Which entries are
            stored is decided on ``w`` itself, before conversion.
        index_encoding : {"plain", "delta8", "auto"}, optional
            Column index coding. ``"auto"`` picks uint8 gaps when they take fewer bytes.
            Default ``"plain"``: on the CPUs measured (docs/compression.md) the gap decoding
            costs more compute than the byte it saves, so gaps pay only where the SpMV is
            bandwidth-bound at under 2 bytes per nonzero.

        Complexity O(M*K), vectorised.
        """
        t = _as_tensor_dense(w)
        if _is_int8(value_dtype):
            return cls._from_dense_compressed(t, torch.int8, index_encoding or "plain")
        vdt = _resolve_value_dtype(value_dtype, t.dtype)
        if index_encoding not in (None, "plain"):
            return cls._from_dense_compressed(t, vdt, index_encoding)
        M, K = t.shape
        t = t.contiguous()
        # nonzero() + bincount + flat gather: ~2x faster than mask.sum(1) + t[mask]
        nz = (t != 0).nonzero()
        rows, cols = nz[:, 0], nz[:, 1]
        nnz = int(rows.shape[0])
        indptr64 = torch.zeros(M + 1, dtype=torch.int64, device=t.device)
        torch.cumsum(torch.bincount(rows, minlength=M), 0, out=indptr64[1:])
        values = t.reshape(-1)[rows * K + cols].to(vdt)
        return cls._from_parts(
            indptr64.to(_indptr_dtype_for(nnz)), cols.to(_index_dtype_for(K)), values, (M, K)
        )

    @classmethod
    def _from_dense_compressed(cls, t: torch.Tensor, vdt: torch.dtype,
                               index_encoding: str) -> CSRMatrix:
        _check_encoding(index_encoding, allow_auto=True)
        M, K = t.shape
        t = t.contiguous()
        nz = (t != 0).nonzero()
        rows, cols = nz[:, 0], nz[:, 1]
        flat = rows * K + cols
        scales = report = None
        if vdt == torch.int8:
            q, scales = _compress.quantize_int8_rows(t)
            vals = q.reshape(-1)[flat]
            report = _compress.quantization_report(
                t.reshape(-1)[flat], vals.to(torch.float32) * scales[rows])
        else:
            vals = t.reshape(-1)[flat].to(vdt)
        if index_encoding == "auto":
            index_encoding = _compress.choose_encoding(rows, cols, K, vals.element_size())
        if index_encoding == "delta8":
            indptr64, ix, vals = _compress.delta8_encode(rows, cols, M, vals)
        else:
            indptr64 = torch.zeros(M + 1, dtype=torch.int64, device=t.device)
            torch.cumsum(torch.bincount(rows, minlength=M), 0, out=indptr64[1:])
            ix = cols.to(_index_dtype_for(K))
        m = cls._from_parts(indptr64.to(_indptr_dtype_for(int(ix.shape[0]))), ix,
                            vals.contiguous(), (M, K))
        m._set_compression(scales, report)
        return m

    def to_dense(self) -> torch.Tensor:
        """Dense ``(M, K)`` tensor of the value dtype on the matrix's device (exact). int8
        matrices return the dequantized float32 weight."""
        if self.is_compressed:
            return self.decoded().to_dense()
        M, K = self._shape
        out = torch.zeros(M, K, dtype=self.dtype, device=self.device)
        if self.nnz:
            rows = _row_ids(self.indptr, M)
            out[rows, self.indices.to(torch.int64)] = self.values
        return out

    @classmethod
    def from_scipy(cls, sp: Any, *, value_dtype: Any = None) -> CSRMatrix:
        """Build from any scipy.sparse array/matrix (converted to CSR, duplicates summed,
        indices sorted; explicitly stored zeros are kept). float64 data becomes float32."""
        import scipy.sparse as sps

        if not sps.issparse(sp):
            raise TypeError(f"sp: expected a scipy.sparse array or matrix, got {type(sp).__name__}")
        c = sps.csr_array(sp, copy=True)
        c.sum_duplicates()
        c.sort_indices()
        vdt = _resolve_value_dtype(value_dtype, _np_to_torch_dtype(c.data.dtype))
        vals = _np_values_to_torch(c.data, vdt)
        return cls(c.indptr, c.indices, vals, c.shape)

    def to_scipy(self):
        """``scipy.sparse.csr_array`` copy on CPU with float32 data.

        scipy has no bfloat16 and its sparse kernels reject float16, so half-precision values
        are converted to float32 (exact; ``from_scipy(s, value_dtype=...)`` converts back)."""
        import scipy.sparse as sps

        if self.is_compressed:
            return self.decoded().to_scipy()
        vals = self.values.detach().cpu().float()
        idx_dt = np.int32 if self.nnz < 2**31 else np.int64
        return sps.csr_array(
            (
                vals.numpy().copy(),
                self.indices.cpu().numpy().astype(idx_dt),
                self.indptr.cpu().numpy().astype(idx_dt),
            ),
            shape=self._shape,
        )

    @classmethod
    def from_torch(cls, t: torch.Tensor, *, value_dtype: Any = None) -> CSRMatrix:
        """Build from a torch sparse CSR (or COO / BSR / dense strided) 2-D tensor."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout == torch.strided:
            return cls.from_dense(t, value_dtype=value_dtype)
        if t.dim() != 2:
            raise ValueError(f"t: expected a 2-D sparse tensor, got shape {tuple(t.shape)}")
        if t.layout == torch.sparse_coo:
            t = t.coalesce().to_sparse_csr()
        elif t.layout != torch.sparse_csr:
            t = t.to_sparse_csr() if t.layout != torch.sparse_bsr else t.to_dense().to_sparse_csr()
        vdt = _resolve_value_dtype(value_dtype, t.dtype)
        vals = t.values().detach().to(vdt)
        return cls(t.crow_indices(), t.col_indices(), vals, tuple(t.shape))

    def to_torch(self) -> torch.Tensor:
        """``torch.sparse_csr_tensor`` (int32 or int64 index tensors, values in the same dtype,
        same device). bfloat16 is supported as storage."""
        if self.is_compressed:
            return self.decoded().to_torch()
        it = torch.int32 if self.nnz < 2**31 else torch.int64
        with _quiet_sparse_beta():
            return torch.sparse_csr_tensor(
                self.indptr.to(it), self.indices.to(it), self.values, size=self._shape,
                check_invariants=False,  # invariants already hold (validated at construction)
            )

    def to(self, device: Any = None, dtype: Any = None) -> CSRMatrix:
        """New matrix with all buffers on ``device`` and values converted to ``dtype``."""
        if self.is_compressed:
            return self._to_compressed(device, dtype)
        dev, vdt = self._to_args(device, dtype)
        return CSRMatrix._from_parts(
            self.indptr.to(dev), self.indices.to(dev), self.values.to(device=dev, dtype=vdt),
            self._shape,
        )

    def transpose(self) -> CSRMatrix:
        """CSR of ``W.T`` with shape ``(K, M)`` (O(nnz log nnz), vectorised). Compressed
        matrices are decoded first (the transpose has float values and plain indices)."""
        if self.is_compressed:
            return self.decoded().transpose()
        M, K = self._shape
        nnz = self.nnz
        indptr, rows, perm = _transpose_structure(self.indptr, self.indices, M, K)
        return CSRMatrix._from_parts(
            indptr.to(_indptr_dtype_for(nnz)), rows.to(_index_dtype_for(M)),
            self.values[perm].contiguous(), (K, M),
        )


# --------------------------------------------------------------------------- BSR
class BSRMatrix(_SparseBase):
    """Block sparse row weight of shape ``(M, K)`` with ``blocksize=(r, c)``.

    Parameters
    ----------
    indptr : array_like of int, shape (Mb + 1,)
        Block-row pointers, ``Mb = ceil(M / r)``.
    indices : array_like of int, shape (nnzb,)
        Block-column ids in ``[0, Kb)``, ``Kb = ceil(K / c)``, sorted and unique per block row.
    values : torch.Tensor or numpy.ndarray, shape (nnzb, r, c)
        Row-major blocks (int8 when ``scales`` is given). Blocks on a ragged edge (when ``r``
        does not divide M or ``c`` does not divide K) carry padding that is never read by the
        kernels; it is zero when built by sparsekit.
    shape : tuple of int
        ``(M, K)``.
    blocksize : tuple of int
        ``(r, c)``, both positive.

    Notes
    -----
    ``nnz`` counts the nonzero values stored in the blocks (padding excluded);
    ``nnz_blocks`` counts blocks. ``density`` is ``nnz / (M * K)``.
    """

    def __init__(self, indptr: Any, indices: Any, values: Any, shape: Any,
                 blocksize: Any, *, scales: Any = None, index_encoding: str = "plain") -> None:
        M, K = _check_shape(shape)
        r, c = _check_shape(blocksize, "blocksize")
        _check_encoding(index_encoding, allow_auto=False)
        vals = _values_tensor(values, int8=scales is not None)
        device = _tensor_device(indptr, indices, vals)
        ip = _to_numpy_int(indptr, "indptr")
        ix = _to_numpy_int(indices, "indices")
        if vals.dim() != 3 or tuple(vals.shape) != (ix.shape[0], r, c):
            raise ValueError(
                f"values: expected shape (nnzb, r, c) = ({ix.shape[0]}, {r}, {c}), "
                f"got {tuple(vals.shape)}"
            )
        Mb, Kb = -(-M // r), -(-K // c)
        sc = None if scales is None else _compress.validate_scales(scales, M)
        ipt, ixt = _validate_and_pack(ip, ix, Mb, Kb, index_encoding, device)
        self._set(ipt, ixt, vals.to(device), (M, K), (r, c))
        if sc is not None:
            self._set_compression(sc.to(device))

    def _set(self, indptr, indices, values, shape, blocksize) -> None:
        self.indptr, self.indices, self.values = indptr, indices, values
        self._shape, self._blocksize = tuple(shape), tuple(blocksize)
        self._init_cache()

    @classmethod
    def _from_parts(cls, indptr, indices, values, shape, blocksize) -> BSRMatrix:
        """Trusted constructor (no validation) for already-packed, already-valid buffers."""
        self = cls.__new__(cls)
        self._set(indptr, indices, values, shape, blocksize)
        return self

    @property
    def blocksize(self) -> tuple[int, int]:
        """``(r, c)``."""
        return self._blocksize

    @property
    def nnz_blocks(self) -> int:
        """Number of stored blocks."""
        return int(self.indices.shape[0])

    @property
    def nnz(self) -> int:
        """Nonzero values stored inside blocks (padding and explicit zeros excluded)."""
        if self.is_compressed:
            return self.decoded().nnz
        return self.cached("nnz", lambda: int(torch.count_nonzero(self._padded_mask_values())))

    def _padded_mask_values(self) -> torch.Tensor:
        # values with the ragged-edge padding masked out, so nnz ignores whatever it holds
        M, K = self._shape
        r, c = self._blocksize
        if M % r == 0 and K % c == 0:
            return self.values
        dev = self.device
        brows = _row_ids(self.indptr, self.grid[0])
        vr = (M - brows * r).clamp(max=r)
        vc = (K - self.indices.to(torch.int64) * c).clamp(max=c)
        keep = (torch.arange(r, device=dev)[None, :, None] < vr[:, None, None]) & (
            torch.arange(c, device=dev)[None, None, :] < vc[:, None, None]
        )
        return self.values * keep

    @property
    def grid(self) -> tuple[int, int]:
        """``(Mb, Kb)``: block rows and block columns."""
        return -(-self._shape[0] // self._blocksize[0]), -(-self._shape[1] // self._blocksize[1])

    @classmethod
    def from_dense(cls, w: Any, blocksize: Any, *, value_dtype: Any = None,
                   index_encoding: str | None = None) -> BSRMatrix:
        """Build from a dense 2-D tensor/array, keeping every block with any nonzero.

        Parameters
        ----------
        w : torch.Tensor or numpy.ndarray, shape (M, K)
        blocksize : tuple of int
            ``(r, c)``; M and K need not be multiples (edges are zero-padded internally).
        value_dtype : torch.dtype, optional
            As in :meth:`CSRMatrix.from_dense` (torch.int8: per-output-row scales).
        index_encoding : {"plain", "delta8", "auto"}, optional
            Block-column index coding, as in :meth:`CSRMatrix.from_dense`.
        """
        t = _as_tensor_dense(w)
        r, c = _check_shape(blocksize, "blocksize")
        int8 = _is_int8(value_dtype)
        vdt = torch.int8 if int8 else _resolve_value_dtype(value_dtype, t.dtype)
        if index_encoding is None:
            index_encoding = "plain"
        _check_encoding(index_encoding, allow_auto=True)
        M, K = t.shape
        Mb, Kb = -(-M // r), -(-K // c)
        scales = None
        src = t
        if int8:
            q, scales = _compress.quantize_int8_rows(t)
            src = t
            t = q
        if Mb * r != M or Kb * c != K:
            p = torch.zeros(Mb * r, Kb * c, dtype=t.dtype, device=t.device)
            p[:M, :K] = t
            t = p
            if int8:
                ps = torch.zeros(Mb * r, Kb * c, dtype=src.dtype, device=src.device)
                ps[:M, :K] = src
                src = ps
        blocks = t.reshape(Mb, r, Kb, c).permute(0, 2, 1, 3)
        sblocks = src.reshape(Mb, r, Kb, c).permute(0, 2, 1, 3) if int8 else blocks
        bmask = (sblocks != 0).any(dim=3).any(dim=2)
        counts = bmask.sum(dim=1)
        indptr64 = torch.zeros(Mb + 1, dtype=torch.int64, device=t.device)
        torch.cumsum(counts, 0, out=indptr64[1:])
        nz = bmask.nonzero()
        values = blocks[nz[:, 0], nz[:, 1]].to(vdt).contiguous()
        report = None
        if int8:
            ref = sblocks[nz[:, 0], nz[:, 1]]
            sc_pad = torch.zeros(Mb * r, dtype=torch.float32, device=t.device)
            sc_pad[:M] = scales
            row_sc = sc_pad.reshape(Mb, r)[nz[:, 0]][:, :, None]
            stored = ref != 0
            report = _compress.quantization_report(
                ref[stored], (values.to(torch.float32) * row_sc)[stored])
        ix = nz[:, 1]
        if index_encoding == "auto":
            index_encoding = _compress.choose_encoding(
                nz[:, 0], ix, Kb, r * c * values.element_size())
        if index_encoding == "delta8":
            indptr64, ix, values = _compress.delta8_encode(nz[:, 0], ix, Mb, values)
        else:
            ix = ix.to(_index_dtype_for(Kb))
        nnzb = ix.shape[0]
        m = cls._from_parts(
            indptr64.to(_indptr_dtype_for(nnzb)), ix, values.contiguous(), (M, K), (r, c),
        )
        if int8 or index_encoding == "delta8":
            m._set_compression(scales, report)
        return m

    def _decode(self) -> BSRMatrix:
        M, K = self._shape
        r, c = self._blocksize
        Mb, Kb = self.grid
        indptr, ix, vals = self.indptr, self.indices, self.values
        brows = _row_ids(indptr, Mb)
        if vals.dtype == torch.int8:
            sc_pad = torch.zeros(Mb * r, dtype=torch.float32, device=vals.device)
            sc_pad[:M] = self.scales
            vals = vals.to(torch.float32) * sc_pad.reshape(Mb, r)[brows][:, :, None]
        if ix.dtype == torch.uint8:
            zero_blk = (self.values == 0).flatten(1).all(dim=1)
            keep = ~((ix == _compress.GAP_MAX) & zero_blk)
            ix = _compress.delta8_decode(indptr, ix, Mb)[keep]
            brows, vals = brows[keep], vals[keep]
            ip = torch.zeros(Mb + 1, dtype=torch.int64, device=vals.device)
            torch.cumsum(torch.bincount(brows, minlength=Mb), 0, out=ip[1:])
            indptr = ip.to(_indptr_dtype_for(int(ix.shape[0])))
            ix = ix.to(_index_dtype_for(Kb))
        return BSRMatrix._from_parts(indptr, ix, vals.contiguous(), self._shape, self._blocksize)

    def _to_padded_dense(self) -> torch.Tensor:
        Mb, Kb = self.grid
        r, c = self._blocksize
        out = torch.zeros(Mb, Kb, r, c, dtype=self.dtype, device=self.device)
        if self.nnz_blocks:
            rows = _row_ids(self.indptr, Mb)
            out[rows, self.indices.to(torch.int64)] = self.values
        return out.permute(0, 2, 1, 3).reshape(Mb * r, Kb * c)

    def to_dense(self) -> torch.Tensor:
        """Dense ``(M, K)`` tensor of the value dtype (padding dropped; exact). int8 matrices
        return the dequantized float32 weight."""
        if self.is_compressed:
            return self.decoded().to_dense()
        M, K = self._shape
        d = self._to_padded_dense()
        return d if d.shape == (M, K) else d[:M, :K].contiguous()

    def _check_scipy_torch_shape(self, what: str) -> None:
        M, K = self._shape
        r, c = self._blocksize
        if M % r or K % c:
            raise ValueError(
                f"{what}: shape {self._shape} is not a multiple of blocksize {self._blocksize}; "
                "scipy/torch BSR cannot represent ragged edge blocks (use to_dense() or "
                "CSRMatrix.from_dense(m.to_dense()))"
            )

    @classmethod
    def from_scipy(cls, sp: Any, blocksize: Any = None, *, value_dtype: Any = None) -> BSRMatrix:
        """Build from a scipy.sparse array/matrix. A scipy BSR keeps its blocksize unless
        ``blocksize`` is given; other formats need ``blocksize``. Shapes that are not multiples
        of the blocksize are padded internally."""
        import scipy.sparse as sps

        if not sps.issparse(sp):
            raise TypeError(f"sp: expected a scipy.sparse array or matrix, got {type(sp).__name__}")
        if blocksize is None:
            if sp.format != "bsr":
                raise ValueError(
                    "blocksize: expected (r, c) when sp is not in BSR format, got None"
                )
            blocksize = sp.blocksize
        r, c = _check_shape(blocksize, "blocksize")
        M, K = sp.shape
        Mb, Kb = -(-M // r), -(-K // c)
        if sp.format == "bsr" and tuple(sp.blocksize) == (r, c):
            b = sps.bsr_array(sp, copy=True)
        else:
            csr = sps.csr_array(sp, copy=True)
            if (Mb * r, Kb * c) != (M, K):
                csr.resize((Mb * r, Kb * c))
            b = sps.bsr_array(csr, blocksize=(r, c))
        b.sum_duplicates()
        b.sort_indices()
        vdt = _resolve_value_dtype(value_dtype, _np_to_torch_dtype(b.data.dtype))
        vals = _np_values_to_torch(b.data, vdt)
        return cls(b.indptr, b.indices, vals, (M, K), (r, c))

    def to_scipy(self):
        """``scipy.sparse.bsr_array`` copy on CPU with float32 data (bf16/fp16 are converted,
        exactly: scipy has no bfloat16 and rejects float16). Raises ValueError for ragged
        shapes (scipy requires the shape to be a multiple of the blocksize)."""
        import scipy.sparse as sps

        if self.is_compressed:
            return self.decoded().to_scipy()
        self._check_scipy_torch_shape("to_scipy")
        vals = self.values.detach().cpu().float()
        idx_dt = np.int32 if self.nnz_blocks < 2**31 else np.int64
        return sps.bsr_array(
            (
                vals.numpy().copy(),
                self.indices.cpu().numpy().astype(idx_dt),
                self.indptr.cpu().numpy().astype(idx_dt),
            ),
            shape=self._shape, blocksize=self._blocksize,
        )

    @classmethod
    def from_torch(cls, t: torch.Tensor, blocksize: Any = None, *,
                   value_dtype: Any = None) -> BSRMatrix:
        """Build from a torch sparse BSR tensor (its blocksize), or from CSR / COO / dense with
        an explicit ``blocksize``."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout == torch.sparse_bsr and (blocksize is None or
                                             tuple(blocksize) == tuple(t.values().shape[1:])):
            vdt = _resolve_value_dtype(value_dtype, t.dtype)
            r, c = t.values().shape[1:]
            return cls(t.crow_indices(), t.col_indices(), t.values().detach().to(vdt).contiguous(),
                       tuple(t.shape), (int(r), int(c)))
        if blocksize is None:
            raise ValueError(
                f"blocksize: expected (r, c) when t is not a sparse BSR tensor, got None "
                f"(layout {t.layout})"
            )
        dense = t if t.layout == torch.strided else t.to_dense()
        return cls.from_dense(dense, blocksize, value_dtype=value_dtype)

    def to_torch(self) -> torch.Tensor:
        """``torch.sparse_bsr_tensor`` (same device, same value dtype). Ragged shapes raise."""
        if self.is_compressed:
            return self.decoded().to_torch()
        self._check_scipy_torch_shape("to_torch")
        it = torch.int32 if self.nnz_blocks < 2**31 else torch.int64
        with _quiet_sparse_beta():
            return torch.sparse_bsr_tensor(
                self.indptr.to(it), self.indices.to(it), self.values, size=self._shape,
                check_invariants=False,
            )

    def to(self, device: Any = None, dtype: Any = None) -> BSRMatrix:
        """New matrix with all buffers on ``device`` and values converted to ``dtype``."""
        if self.is_compressed:
            return self._to_compressed(device, dtype)
        dev, vdt = self._to_args(device, dtype)
        return BSRMatrix._from_parts(
            self.indptr.to(dev), self.indices.to(dev), self.values.to(device=dev, dtype=vdt),
            self._shape, self._blocksize,
        )

    def transpose(self) -> BSRMatrix:
        """BSR of ``W.T``: shape ``(K, M)``, blocksize ``(c, r)``, blocks transposed."""
        if self.is_compressed:
            return self.decoded().transpose()
        Mb, Kb = self.grid
        nnzb = self.nnz_blocks
        indptr, brows, perm = _transpose_structure(self.indptr, self.indices, Mb, Kb)
        vals = self.values[perm].transpose(1, 2).contiguous()
        r, c = self._blocksize
        return BSRMatrix._from_parts(
            indptr.to(_indptr_dtype_for(nnzb)), brows.to(_index_dtype_for(Mb)), vals,
            (self._shape[1], self._shape[0]), (c, r),
        )


# --------------------------------------------------------------------------- numpy bits
def _np_to_torch_dtype(dt: np.dtype) -> torch.dtype:
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}.get(
        np.dtype(dt), torch.float64
    )


def _np_values_to_torch(data: np.ndarray, vdt: torch.dtype) -> torch.Tensor:
    if data.dtype.kind not in "fiub":
        raise TypeError(f"sp: expected real-valued data, got dtype {data.dtype}")
    return torch.from_numpy(np.ascontiguousarray(data)).to(vdt)

