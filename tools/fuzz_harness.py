#!/usr/bin/env python
"""Crash-isolating fuzz harness for sparsekit's input validation.

Every case is generated deterministically from an integer seed. A case builds raw CSR/BSR
arrays (valid, or with one mutation: negative / out-of-range indices, non-monotone indptr,
wrong lengths, unsorted or duplicate columns, wrong dtypes or ndim, bad shapes/blocksizes,
NaN/Inf values, bad activations/bias), or a saved file that is then truncated/tampered with,
and checks the outcome against an independent oracle:

* input known to be invalid  -> must raise ValueError/TypeError (OSError for unreadable
  files) whose message names one of the offending arguments;
* input known to be valid    -> must construct, densify exactly, and ``sparsekit.linear`` must
  match a float64 dense reference (NaN/Inf positions included);
* input that may be either (e.g. int64 indices that could be converted) -> either outcome, with
  the same checks.

Cases run in batches inside subprocesses. A batch whose process dies (signal, abort, sanitizer
report) is re-run one case per process to isolate the crashing seeds.

Usage::

    python tools/fuzz_harness.py --cases 10000            # full run (``make fuzz``)
    python tools/fuzz_harness.py --case 1234 -v           # reproduce one case in-process
    python tools/fuzz_harness.py --cases 2000 --json out.json

Exit status is 1 when any case crashed or failed its oracle, else 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

OK_STATUSES = ("ok_valid", "ok_rejected")
FAIL_STATUSES = (
    "crash",  # the process died (signal / abort / sanitizer)
    "unexpected_exception",  # exception type other than ValueError/TypeError (OSError for files)
    "bad_message",  # right type, but the message names none of the offending arguments
    "accepted_invalid",  # invalid input did not raise
    "rejected_valid",  # valid input raised
    "wrong_result",  # constructed/ran but disagrees with the dense reference
)


# ------------------------------------------------------------------------------ random sources
class NumpySource:
    """Decision source backed by a seeded numpy Generator (used by the harness)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def integers(self, lo: int, hi: int) -> int:
        """Uniform int in [lo, hi)."""
        return int(self.rng.integers(lo, hi))

    def random(self) -> float:
        return float(self.rng.random())

    def choice(self, seq: list[Any]) -> Any:
        return seq[int(self.rng.integers(0, len(seq)))]

    def subseed(self) -> int:
        return int(self.rng.integers(0, 2**32))


class HypothesisSource:
    """Decision source drawing from a hypothesis ``data`` object (shrinkable choices)."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self._st = st
        self.data = data

    def integers(self, lo: int, hi: int) -> int:
        return self.data.draw(self._st.integers(lo, hi - 1))

    def random(self) -> float:
        return self.data.draw(self._st.floats(0.0, 1.0, exclude_max=True))

    def choice(self, seq: list[Any]) -> Any:
        return self.data.draw(self._st.sampled_from(seq))

    def subseed(self) -> int:
        return self.data.draw(self._st.integers(0, 2**32 - 1))


# ------------------------------------------------------------------------------ case model
@dataclass
class Case:
    """One fuzz case: how to build the object, what the oracle expects, and the reference."""

    kind: str  # "csr" | "bsr" | "from_dense" | "file"
    mutation: str
    expect: str  # "valid" | "invalid" | "either"
    names: tuple[str, ...]  # acceptable argument names in the error message
    kwargs: dict[str, Any] = field(default_factory=dict)
    dense: np.ndarray | None = None  # float64 reference for valid outcomes
    x: Any = None
    bias: Any = None
    linear_expect: str = "valid"  # the linear() call: "valid" | "invalid" | "either"
    linear_names: tuple[str, ...] = ()
    file_bytes: bytes | None = None
    describe: str = ""


_VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _random_pattern(src: Any, rng: np.random.Generator, m: int, k: int) -> list[np.ndarray]:
    """Sorted unique column ids per row."""
    density = src.choice([0.0, 0.05, 0.2, 0.5, 1.0]) if k <= 256 else 0.001
    rows = []
    for _ in range(m):
        cnt = int(rng.binomial(k, density)) if density < 1.0 else k
        cnt = min(cnt, k, 64)
        rows.append(np.sort(rng.choice(k, size=cnt, replace=False)).astype(np.int64))
    return rows


def _values(rng: np.random.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    v = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    v = v + torch.sign(v) * 0.1  # no exact zeros: keeps the pattern unambiguous
    return v.to(dtype)


def _index_dtype(k: int) -> torch.dtype:
    return torch.uint16 if k <= 65536 else torch.int32


def _dims(src: Any) -> tuple[int, int]:
    m = src.choice([0, 1, 2, 3, 5, 8, 17, 33]) if src.random() < 0.9 else src.integers(1, 70)
    r = src.random()
    if r < 0.02:
        k = 65536  # largest K with uint16 indices
    elif r < 0.04:
        k = src.choice([65537, 70000])  # int32 indices
        m = min(m, 3)
    else:
        small = [0, 1, 2, 7, 16, 31, 64, 100]
        k = src.choice(small) if src.random() < 0.8 else src.integers(1, 200)
    return m, k


def _activation(src: Any, rng: np.random.Generator, k: int, vdt: torch.dtype) -> torch.Tensor:
    n = src.choice([0, 1, 2, 5, 8])
    x = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    x = x + torch.sign(x) * 0.1  # nonzero, finite: makes NaN/Inf propagation well defined
    xdt = src.choice([torch.float32, vdt]) if vdt != torch.float32 else torch.float32
    return x.to(xdt)


def _x_bias_mutation(case: Case, src: Any, rng: np.random.Generator, m: int, k: int) -> None:
    """With small probability, spoil the activation/bias of an otherwise valid case."""
    r = src.random()
    if r < 0.06:
        mut = src.choice(["x_width", "x_1d", "x_int", "x_f64", "bias_len", "bias_int", "x_list"])
        x = case.x
        if mut == "x_width":
            case.x = torch.zeros((x.shape[0], k + 1), dtype=x.dtype)
            case.linear_expect, case.linear_names = "invalid", ("x", "input", "in_features")
        elif mut == "x_1d":
            # (K,) is a valid single row for torch.nn.Linear-like ops; either is acceptable.
            case.x = x[0] if x.shape[0] > 0 else torch.zeros(k, dtype=x.dtype)
            case.linear_expect, case.linear_names = "either", ("x", "input")
        elif mut == "x_int":
            case.x = torch.ones((x.shape[0], k), dtype=torch.int32)
            case.linear_expect, case.linear_names = "invalid", ("x", "input", "dtype")
        elif mut == "x_f64":
            case.x = x.to(torch.float64)
            case.linear_expect, case.linear_names = "either", ("x", "input", "dtype")
        elif mut == "x_list":
            case.x = x.tolist()
            case.linear_expect, case.linear_names = "either", ("x", "input")
        elif mut == "bias_len":
            case.bias = torch.zeros(m + 1)
            case.linear_expect, case.linear_names = "invalid", ("bias",)
        elif mut == "bias_int":
            case.bias = torch.ones(m, dtype=torch.int64)
            case.linear_expect, case.linear_names = "either", ("bias",)
        case.describe += f" +{mut}"


def _csr_case(src: Any) -> Case:
    rng = np.random.default_rng(src.subseed())
    m, k = _dims(src)
    vname = src.choice(["float32", "float32", "bfloat16", "float16"])
    vdt = _VALUE_DTYPES[vname]
    rows = _random_pattern(src, rng, m, k) if k > 0 else [np.zeros(0, np.int64)] * m
    counts = np.array([len(r) for r in rows], dtype=np.int64)
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    vals = _values(rng, nnz, vdt)
    row_of = np.repeat(np.arange(m), counts)

    expect, names, mutation = "valid", (), "none"
    idx_t = torch.from_numpy(idx.astype(np.int64)).to(_index_dtype(k))
    ptr_t = torch.from_numpy(indptr.astype(np.int32))
    shape: Any = (m, k)
    dense_rows, dense_cols, dense_vals = row_of, idx, vals.to(torch.float64).numpy()

    muts = ["none", "nan_inf", "neg_index", "oob_index", "unsorted", "duplicate",
            "indptr_decrease", "indptr_first", "indptr_last", "indptr_len", "values_len",
            "indices_len", "indptr_float", "indices_float", "indptr_int64", "indices_wide",
            "values_f64", "values_int", "values_complex", "values_2d", "indptr_2d",
            "shape_neg", "shape_float", "shape_len", "shape_str", "shape_numpy", "shape_k_small",
            "shape_m_mismatch", "noncontig", "numpy_inputs", "values_none", "indices_bool"]
    mutation = src.choice(muts)
    has2 = [i for i, r in enumerate(rows) if len(r) >= 2]

    if mutation == "nan_inf" and nnz > 0:
        v = vals.to(torch.float32)
        for _ in range(src.integers(1, 4)):
            v[src.integers(0, nnz)] = src.choice([float("nan"), float("inf"), float("-inf")])
        vals = v.to(vdt)
        dense_vals = vals.to(torch.float64).numpy()
    elif mutation == "neg_index" and nnz > 0:
        t = torch.from_numpy(idx.astype(np.int64)).to(src.choice([torch.int32, torch.int64]))
        t[src.integers(0, nnz)] = -src.integers(1, 1000)
        idx_t, expect, names = t, "invalid", ("indices",)
    elif mutation == "oob_index" and nnz > 0:
        bad = k + src.choice([0, 1, 7, 60000])
        t = torch.from_numpy(idx.astype(np.int64))
        t[src.integers(0, nnz)] = bad
        dt = _index_dtype(k) if bad <= 65535 else torch.int32
        idx_t, expect, names = t.to(dt), "invalid", ("indices",)
    elif mutation == "unsorted" and has2:
        i = src.choice(has2)
        j = int(indptr[i]) + src.integers(0, len(rows[i]) - 1)
        t = idx.copy()
        t[j], t[j + 1] = t[j + 1], t[j]
        idx_t = torch.from_numpy(t).to(_index_dtype(k))
        dense_cols = t
        expect, names = "either", ("indices",)
        v = vals.to(torch.float64).numpy().copy()
        dense_vals = v
    elif mutation == "duplicate" and has2:
        i = src.choice(has2)
        j = int(indptr[i]) + src.integers(0, len(rows[i]) - 1)
        t = idx.copy()
        t[j + 1] = t[j]
        idx_t = torch.from_numpy(t).to(_index_dtype(k))
        dense_cols = t
        expect, names = "either", ("indices",)
    elif mutation == "indptr_decrease" and m >= 2:
        i = src.integers(1, m)
        t = indptr.copy()
        t[i] = t[i + 1] + src.integers(1, 4)
        ptr_t, expect, names = torch.from_numpy(t.astype(np.int32)), "invalid", ("indptr",)
    elif mutation == "indptr_first" and m >= 1:
        t = indptr.copy()
        t[0] = src.choice([1, -1, 5])
        ptr_t, expect, names = torch.from_numpy(t.astype(np.int32)), "invalid", ("indptr",)
    elif mutation == "indptr_last" and m >= 1:
        t = indptr.copy()
        t[-1] = t[-1] + src.choice([1, 2, 100])
        ptr_t, expect = torch.from_numpy(t.astype(np.int32)), "invalid"
        names = ("indptr", "indices", "values")
    elif mutation == "indptr_len":
        t = indptr[:-1] if (src.random() < 0.5 and m >= 1) else np.append(indptr, indptr[-1])
        ptr_t, expect = torch.from_numpy(t.astype(np.int32)), "invalid"
        names = ("indptr", "shape")
    elif mutation == "values_len":
        vv = vals.to(torch.float32)
        vv = vv[:-1] if (nnz > 0 and src.random() < 0.5) else torch.cat([vv, torch.ones(1)])
        vals, expect, names = vv.to(vdt), "invalid", ("values", "indices", "indptr")
    elif mutation == "indices_len":
        t = idx[:-1] if (nnz > 0 and src.random() < 0.5) else np.append(idx, 0)
        idx_t, expect = torch.from_numpy(t.astype(np.int64)).to(torch.int32), "invalid"
        names = ("indices", "values", "indptr")
    elif mutation == "indptr_float":
        ptr_t, expect, names = ptr_t.to(torch.float32), "invalid", ("indptr",)
    elif mutation == "indices_float":
        idx_t, expect, names = idx_t.to(torch.int32).to(torch.float32), "invalid", ("indices",)
    elif mutation == "indices_bool":
        idx_t, expect, names = (idx_t.to(torch.int32) > 0), "invalid", ("indices",)
    elif mutation == "indptr_int64":
        ptr_t, expect, names = ptr_t.to(torch.int64), "either", ("indptr",)
    elif mutation == "indices_wide":
        idx_t = idx_t.to(torch.int32).to(src.choice([torch.int32, torch.int64]))
        expect, names = "either", ("indices",)
    elif mutation == "values_f64":
        vals, expect, names = vals.to(torch.float64), "either", ("values",)
        dense_vals = vals.numpy()
    elif mutation == "values_int" and nnz > 0:
        vals = torch.from_numpy(rng.integers(1, 5, nnz).astype(np.int32))
        expect, names = "either", ("values",)
        dense_vals = vals.numpy().astype(np.float64)
    elif mutation == "values_complex":
        vals, expect, names = vals.to(torch.float32).to(torch.complex64), "invalid", ("values",)
    elif mutation == "values_2d":
        vals, expect, names = vals.reshape(-1, 1), "invalid", ("values",)
    elif mutation == "indptr_2d":
        ptr_t, expect, names = ptr_t.reshape(1, -1), "invalid", ("indptr",)
    elif mutation == "shape_neg":
        shape, expect, names = (-1 - m, k), "invalid", ("shape", "indptr")
    elif mutation == "shape_float":
        shape, expect, names = (m, k + 0.5), "invalid", ("shape",)
    elif mutation == "shape_len":
        shape = (m,) if src.random() < 0.5 else (m, k, 1)
        expect, names = "invalid", ("shape",)
    elif mutation == "shape_str":
        shape, expect, names = "m,k", "invalid", ("shape",)
    elif mutation == "shape_numpy":
        shape, expect, names = (np.int64(m), np.int32(k)), "either", ("shape",)
    elif mutation == "shape_k_small" and nnz > 0:
        kk = int(idx.max())  # the largest index is now == K
        shape, expect, names = (m, kk), "invalid", ("indices", "shape")
    elif mutation == "shape_m_mismatch":
        shape, expect, names = (m + 1, k), "invalid", ("indptr", "shape")
    elif mutation == "noncontig" and nnz > 0:
        big = torch.zeros(2 * nnz, dtype=vdt)
        big[::2] = vals
        vals, expect, names = big[::2], "either", ("values",)
    elif mutation == "numpy_inputs":
        kw = {"indptr": ptr_t.numpy(), "indices": idx_t.to(torch.int32).numpy()}
        ptr_t, idx_t = kw["indptr"], kw["indices"]
        if vdt == torch.float32:
            vals = vals.numpy()
        expect, names = "either", ("indptr", "indices", "values")
    elif mutation == "values_none":
        vals, expect, names = None, "invalid", ("values",)
    else:
        mutation = "none"

    if m == 0 or k == 0:
        # Empty dimensions may be supported or rejected (naming shape); both are fine.
        expect = "either" if expect == "valid" else expect
        names = (*names, "shape")
    dense = None
    if expect != "invalid":
        dense = np.zeros((m, k), dtype=np.float64)
        np.add.at(dense, (dense_rows, dense_cols), dense_vals)
    case = Case(
        kind="csr", mutation=mutation, expect=expect, names=names,
        kwargs={"indptr": ptr_t, "indices": idx_t, "values": vals, "shape": shape},
        dense=dense, describe=f"csr m={m} k={k} nnz={nnz} values={vname} mutation={mutation}",
    )
    case.x = _activation(src, rng, k, vdt)
    if src.random() < 0.5:
        case.bias = torch.from_numpy(rng.standard_normal(m).astype(np.float32))
    _x_bias_mutation(case, src, rng, m, k)
    return case


def _bsr_case(src: Any) -> Case:
    rng = np.random.default_rng(src.subseed())
    m = src.choice([0, 1, 3, 8, 13, 32])
    k = src.choice([1, 4, 7, 16, 33, 64])
    r = src.choice([1, 2, 3, 4, 8, 16])
    c = src.choice([1, 2, 4, 5, 8, 16])
    vname = src.choice(["float32", "float32", "bfloat16", "float16"])
    vdt = _VALUE_DTYPES[vname]
    mb, kb = -(-m // r), -(-k // c)
    rows = _random_pattern(src, rng, mb, kb)
    counts = np.array([len(x) for x in rows], dtype=np.int64)
    indptr = np.zeros(mb + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnzb = int(indptr[-1])
    bidx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    blocks = _values(rng, nnzb * r * c, torch.float32).reshape(nnzb, r, c)
    # Zero the ragged-edge padding (rows >= M, cols >= K), as the format requires.
    brow = np.repeat(np.arange(mb), counts)
    for b in range(nnzb):
        r0, c0 = brow[b] * r, bidx[b] * c
        if r0 + r > m:
            blocks[b, m - r0:, :] = 0
        if c0 + c > k:
            blocks[b, :, k - c0:] = 0
    vals = blocks.to(vdt)

    mutation = src.choice(["none", "nan_inf", "oob_index", "neg_index", "indptr_decrease",
                           "values_shape", "values_1d", "blocksize_zero", "blocksize_float",
                           "blocksize_len", "padding_nonzero", "unsorted", "indptr_len",
                           "values_nblocks"])
    expect, names = "valid", ()
    idx_t = torch.from_numpy(bidx).to(_index_dtype(kb))
    ptr_t = torch.from_numpy(indptr.astype(np.int32))
    blocksize: Any = (r, c)
    ref_vals = vals.to(torch.float64)
    ref_idx = bidx

    if mutation == "nan_inf" and nnzb > 0:
        v = vals.to(torch.float32)
        b = src.integers(0, nnzb)
        rr, cc = src.integers(0, r), src.integers(0, c)
        inside = brow[b] * r + rr < m and bidx[b] * c + cc < k
        if inside:
            v[b, rr, cc] = src.choice([float("nan"), float("inf"), float("-inf")])
        vals = v.to(vdt)
        ref_vals = vals.to(torch.float64)
    elif mutation == "oob_index" and nnzb > 0:
        t = torch.from_numpy(bidx.copy())
        t[src.integers(0, nnzb)] = kb + src.choice([0, 3])
        idx_t, expect, names = t.to(_index_dtype(kb)), "invalid", ("indices",)
    elif mutation == "neg_index" and nnzb > 0:
        t = torch.from_numpy(bidx.copy()).to(torch.int32)
        t[src.integers(0, nnzb)] = -1
        idx_t, expect, names = t, "invalid", ("indices",)
    elif mutation == "indptr_decrease" and mb >= 2:
        i = src.integers(1, mb)
        t = indptr.copy()
        t[i] = t[i + 1] + 1
        ptr_t, expect, names = torch.from_numpy(t.astype(np.int32)), "invalid", ("indptr",)
    elif mutation == "values_shape" and r != c:
        vals, expect = vals.reshape(nnzb, c, r), "invalid"
        names = ("values", "blocksize")
    elif mutation == "values_1d":
        vals, expect, names = vals.reshape(-1), "invalid", ("values",)
    elif mutation == "values_nblocks":
        vals = torch.cat([vals, torch.zeros(1, r, c, dtype=vdt)])
        expect, names = "invalid", ("values", "indices", "indptr")
    elif mutation == "blocksize_zero":
        blocksize, expect, names = src.choice([(0, c), (r, 0), (-r, c)]), "invalid", ("blocksize",)
    elif mutation == "blocksize_float":
        blocksize, expect, names = (r + 0.5, c), "invalid", ("blocksize",)
    elif mutation == "blocksize_len":
        blocksize, expect, names = (r,), "invalid", ("blocksize",)
    elif mutation == "padding_nonzero" and nnzb > 0 and (m % r or k % c):
        # Non-zero garbage in the ragged-edge padding: reject, or ignore it (never read x/y
        # out of bounds and never let it leak into the result).
        v = vals.to(torch.float32)
        edge = [b for b in range(nnzb) if brow[b] * r + r > m or bidx[b] * c + c > k]
        if edge:
            v[edge[0]] = torch.where(v[edge[0]] == 0, torch.full_like(v[edge[0]], 7.0),
                                     v[edge[0]])
            vals = v.to(vdt)
            expect, names = "either", ("values",)
        else:
            mutation = "none"
    elif mutation == "unsorted" and any(len(x) >= 2 for x in rows):
        i = next(i for i, x in enumerate(rows) if len(x) >= 2)
        t = bidx.copy()
        j = int(indptr[i])
        t[j], t[j + 1] = t[j + 1], t[j]
        idx_t, ref_idx = torch.from_numpy(t).to(_index_dtype(kb)), t
        expect, names = "either", ("indices",)
    elif mutation == "indptr_len":
        ptr_t, expect = torch.from_numpy(indptr[:-1].astype(np.int32)), "invalid"
        names = ("indptr", "shape", "blocksize")
    else:
        mutation = "none"

    if m == 0:
        expect = "either" if expect == "valid" else expect
        names = (*names, "shape")
    dense = None
    if expect != "invalid":
        full = np.zeros((mb * r, kb * c), dtype=np.float64)
        rv = ref_vals.numpy() if ref_vals is not None else None
        for b in range(nnzb):
            r0, c0 = brow[b] * r, int(ref_idx[b]) * c
            full[r0:r0 + r, c0:c0 + c] += rv[b]
        dense = full[:m, :k].copy()
    case = Case(
        kind="bsr", mutation=mutation, expect=expect, names=names,
        kwargs={"indptr": ptr_t, "indices": idx_t, "values": vals, "shape": (m, k),
                "blocksize": blocksize},
        dense=dense,
        describe=f"bsr m={m} k={k} r={r} c={c} nnzb={nnzb} values={vname} mutation={mutation}",
    )
    case.x = _activation(src, rng, k, vdt)
    if src.random() < 0.5:
        case.bias = torch.from_numpy(rng.standard_normal(m).astype(np.float32))
    _x_bias_mutation(case, src, rng, m, k)
    return case


def _from_dense_case(src: Any) -> Case:
    rng = np.random.default_rng(src.subseed())
    m, k = src.integers(0, 20), src.integers(0, 40)
    w = rng.standard_normal((m, k))
    w[rng.random((m, k)) < src.choice([0.0, 0.5, 0.9, 1.0])] = 0.0
    mutation = src.choice(["none", "nan_inf", "1d", "3d", "int", "f64", "numpy", "bsr"])
    expect, names, fmt = "valid", (), "csr"
    wt: Any = torch.from_numpy(w.astype(np.float32))
    if mutation == "nan_inf" and m * k > 0:
        wt[src.integers(0, m), src.integers(0, k)] = src.choice([float("nan"), float("inf")])
    elif mutation == "1d":
        wt, expect, names = wt.reshape(-1), "invalid", ("w", "dense", "weight")
    elif mutation == "3d":
        wt, expect, names = wt.reshape(1, m, k), "invalid", ("w", "dense", "weight")
    elif mutation == "int":
        wt, expect, names = (wt * 4).to(torch.int32), "either", ("w", "dense", "weight")
    elif mutation == "f64":
        wt, expect, names = wt.to(torch.float64), "either", ("w", "dense", "weight")
    elif mutation == "numpy":
        wt, expect, names = wt.numpy(), "either", ("w", "dense", "weight")
    elif mutation == "bsr":
        fmt = "bsr"
    if m == 0 or k == 0:
        expect = "either" if expect == "valid" else expect
        names = (*names, "shape", "w")
    dense = None
    if expect != "invalid":
        dense = torch.as_tensor(wt).to(torch.float32).to(torch.float64).numpy()
    case = Case(kind="from_dense", mutation=mutation, expect=expect, names=names,
                kwargs={"w": wt, "format": fmt,
                        "blocksize": (src.integers(1, 5), src.integers(1, 5))},
                dense=dense, describe=f"from_dense {fmt} m={m} k={k} mutation={mutation}")
    case.x = _activation(src, rng, k, torch.float32)
    return case


def _file_case(src: Any) -> Case:
    """A model saved with sparsekit.save, then (usually) damaged."""
    rng = np.random.default_rng(src.subseed())
    m, k = src.choice([1, 4, 9]), src.choice([3, 8, 20])
    w = rng.standard_normal((m, k)).astype(np.float32)
    w[rng.random((m, k)) < 0.6] = 0
    lin = torch.nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    fmt = src.choice(["csr", "bsr"])
    mutation = src.choice(["none", "truncate", "flip", "flip", "garbage", "empty",
                           "header_len", "header_json", "header_dtype", "header_shape",
                           "header_offsets", "meta"])
    case = Case(kind="file", mutation=mutation,
                expect="valid" if mutation == "none" else "either",
                names=("path", "file", "header", "metadata", "safetensors", "sparsekit",
                       "indptr", "indices", "values", "shape", "weight", "dtype", "bias",
                       "offset", "tensor", "invalid", "corrupt"),
                describe=f"file {fmt} m={m} k={k} mutation={mutation}")
    case.kwargs = {"linear": lin, "format": fmt, "subseed": src.subseed()}
    case.x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    # Damage is applied after save(), in run_case, from this deterministic sub-seed.
    return case


KINDS = ("csr", "bsr", "from_dense", "file")


def make_case(src: Any, kind: str | None = None) -> Case:
    """Build one case from a decision source (NumpySource or HypothesisSource)."""
    if kind is None:
        kind = src.choice(["csr", "csr", "csr", "bsr", "bsr", "from_dense", "file"])
    return {"csr": _csr_case, "bsr": _bsr_case, "from_dense": _from_dense_case,
            "file": _file_case}[kind](src)


# ------------------------------------------------------------------------------ oracle
def _close(y: np.ndarray, ref: np.ndarray, scale: np.ndarray, rtol: float) -> str | None:
    """Compare with NaN/Inf positions; returns a message on mismatch."""
    if y.shape != ref.shape:
        return f"shape {y.shape} != {ref.shape}"
    nan_y, nan_r = np.isnan(y), np.isnan(ref)
    if not np.array_equal(nan_y, nan_r):
        return f"NaN pattern differs at {np.argwhere(nan_y != nan_r)[:3].tolist()}"
    inf_r = np.isinf(ref)
    if not np.array_equal(np.isinf(y), inf_r) or not np.array_equal(y[inf_r], ref[inf_r]):
        return "Inf pattern/sign differs"
    fin = np.isfinite(ref)
    err = np.abs(y[fin] - ref[fin])
    tol = rtol * scale[fin] + 1e-6
    if np.any(err > tol):
        i = int(np.argmax(err - tol))
        return f"max error {err[i]:.3g} > tol {tol[i]:.3g}"
    return None


def _check_error(e: BaseException, names: tuple[str, ...], allow_os: bool = False) -> str:
    allowed: tuple[type, ...] = (ValueError, TypeError) + ((OSError,) if allow_os else ())
    if not isinstance(e, allowed):
        return "unexpected_exception"
    msg = str(e)
    if names and not any(n in msg for n in names):
        return "bad_message"
    return "ok_rejected"


def _check_linear(mat: Any, case: Case, dense: np.ndarray) -> tuple[str, str]:
    import sparsekit

    x, bias = case.x, case.bias
    try:
        y = sparsekit.linear(x, mat, bias)
    except Exception as e:  # noqa: BLE001 - classifying is the point
        if case.linear_expect == "valid":
            return "rejected_valid", f"linear raised {type(e).__name__}: {e}"
        return _check_error(e, case.linear_names), f"linear: {type(e).__name__}: {e}"
    if case.linear_expect == "invalid":
        return "accepted_invalid", "linear accepted an invalid x/bias"
    xt = torch.as_tensor(x)
    x64 = xt.to(torch.float64).numpy().reshape(-1, dense.shape[1])
    ref = x64 @ dense.T
    scale = np.abs(x64) @ np.abs(np.nan_to_num(dense, nan=0.0, posinf=0.0, neginf=0.0)).T
    if bias is not None:
        b64 = torch.as_tensor(bias).to(torch.float64).numpy()
        ref = ref + b64
        scale = scale + np.abs(b64)
    ydt = getattr(y, "dtype", None)
    if isinstance(xt, torch.Tensor) and xt.is_floating_point() and xt.dtype != torch.float64:
        if ydt != xt.dtype:
            return "wrong_result", f"output dtype {ydt}, expected {xt.dtype}"
    rtol = 1e-5 if ydt in (torch.float32, torch.float64) else 1.6e-2
    y64 = y.to(torch.float64).numpy().reshape(ref.shape)
    msg = _close(y64, ref, scale, rtol)
    return ("wrong_result", f"linear: {msg}") if msg else ("ok_valid", "")


def _construct(case: Case) -> Any:
    from sparsekit import BSRMatrix, CSRMatrix

    if case.kind == "csr":
        return CSRMatrix(**case.kwargs)
    if case.kind == "bsr":
        kw = dict(case.kwargs)
        return BSRMatrix(kw.pop("indptr"), kw.pop("indices"), kw.pop("values"), kw.pop("shape"),
                         blocksize=kw.pop("blocksize"))
    if case.kind == "from_dense":
        w = case.kwargs["w"]
        if case.kwargs["format"] == "bsr":
            return BSRMatrix.from_dense(w, blocksize=case.kwargs["blocksize"])
        return CSRMatrix.from_dense(w)
    raise AssertionError(case.kind)


def _damage(data: bytes, case: Case) -> bytes:
    rng = np.random.default_rng(case.kwargs["subseed"])
    mut = case.mutation
    hlen = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if mut == "truncate":
        return data[: int(rng.integers(0, len(data)))]
    if mut == "flip":
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if mut == "garbage":
        return rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
    if mut == "empty":
        return b""
    if mut == "header_len":
        return (hlen + int(rng.choice([1, -1, 10**9]))).to_bytes(8, "little", signed=True) \
            + data[8:]
    header = data[8:8 + hlen].decode("utf-8", errors="replace")
    try:
        meta = json.loads(header)
    except ValueError:
        return data[:-1]
    if mut == "header_json":
        new = header[: int(rng.integers(0, len(header)))]
    else:
        keys = [kk for kk in meta if kk != "__metadata__"]
        key = keys[int(rng.integers(0, len(keys)))] if keys else None
        if mut == "header_dtype" and key:
            meta[key]["dtype"] = str(rng.choice(["F64", "I8", "BOOL", "U64", "XX"]))
        elif mut == "header_shape" and key:
            meta[key]["shape"] = [int(s) + int(rng.integers(1, 3)) for s in meta[key]["shape"]] \
                or [2]
        elif mut == "header_offsets" and key:
            a, b = meta[key]["data_offsets"]
            meta[key]["data_offsets"] = [a, b + int(rng.integers(1, 64))]
        elif mut == "meta":
            md = meta.get("__metadata__", {}) or {}
            if md:
                mk = sorted(md)[int(rng.integers(0, len(md)))]
                md[mk] = str(rng.choice(["", "{", "[]", "null", "-1", "csr", "999999999",
                                         '{"format": "nope"}']))
            else:
                md["format"] = "nope"
            meta["__metadata__"] = md
        new = json.dumps(meta)
    raw = new.encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + hlen:]


def _self_consistent(mod: Any) -> str | None:
    """A loaded SparseLinear must agree with its own densified weight (no OOB reads)."""
    xx = torch.randn(2, mod.in_features)
    dense = mod.matrix.to_dense().to(torch.float64)
    want = xx.double() @ dense.T
    if mod.bias is not None:
        want = want + mod.bias.detach().double()
    got = mod(xx).double()
    ok = ((got - want).abs() <= 1e-4 * (1 + want.abs())) | (torch.isnan(got) & torch.isnan(want))
    ok |= torch.isinf(want) & (got == want)
    return None if bool(ok.all()) else "loaded module disagrees with its own dense weight"


def _run_file_case(case: Case) -> tuple[str, str]:
    import sparsekit
    from sparsekit.nn import SparseLinear

    lin = case.kwargs["linear"]
    model = torch.nn.Sequential(SparseLinear.from_dense(lin, format=case.kwargs["format"]))
    with_model = case.kwargs["subseed"] % 2 == 0
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        sparsekit.save(model, path)
        data = Path(path).read_bytes()
        if case.mutation != "none":
            Path(path).write_bytes(_damage(data, case))
        target = torch.nn.Sequential(torch.nn.Linear(lin.in_features, lin.out_features))
        try:
            loaded = sparsekit.load(path, target) if with_model else sparsekit.load(path)
        except Exception as e:  # noqa: BLE001
            if case.expect == "valid":
                return "rejected_valid", f"load raised {type(e).__name__}: {e}"
            return _check_error(e, case.names, allow_os=True), f"{type(e).__name__}: {e}"
    # Loaded (possibly with tampered values): it must at least be self-consistent.
    try:
        mods = (list(loaded.modules()) if isinstance(loaded, torch.nn.Module)
                else list(loaded.modules.values()))
        sparse = [mm for mm in mods if isinstance(mm, SparseLinear)]
        if case.mutation == "none":
            if not sparse:
                return "wrong_result", "round trip lost the SparseLinear"
            with torch.inference_mode():
                y = sparse[0](case.x)
                ref = model(case.x)
            if not torch.equal(y, ref):
                return "wrong_result", "round trip changed the output"
        for mm in sparse:
            msg = _self_consistent(mm)
            if msg:
                return "wrong_result", msg
    except Exception as e:  # noqa: BLE001
        return "unexpected_exception", f"use after load: {type(e).__name__}: {e}"
    return "ok_valid", ""


def run_case(case: Case) -> tuple[str, str]:
    """Run one case; returns ``(status, detail)`` with status in OK_STATUSES/FAIL_STATUSES."""
    if case.kind == "file":
        return _run_file_case(case)
    try:
        mat = _construct(case)
    except Exception as e:  # noqa: BLE001
        if case.expect == "valid":
            return "rejected_valid", f"{type(e).__name__}: {e}"
        return _check_error(e, case.names), f"{type(e).__name__}: {e}"
    if case.expect == "invalid":
        return "accepted_invalid", "constructor accepted invalid input"
    try:
        got = mat.to_dense()
        if tuple(got.shape) != case.dense.shape:
            return "wrong_result", f"to_dense shape {tuple(got.shape)} != {case.dense.shape}"
        g64 = got.to(torch.float64).numpy()
        msg = _close(g64, case.dense, np.abs(np.nan_to_num(case.dense)), 1e-6)
        if msg:
            # Duplicates summed in a lower precision may round differently.
            if case.mutation != "duplicate" or _close(g64, case.dense,
                                                      np.abs(np.nan_to_num(case.dense)), 1e-2):
                return "wrong_result", f"to_dense: {msg}"
        if tuple(int(s) for s in mat.shape) != case.dense.shape:
            return "wrong_result", f"shape {mat.shape} != {case.dense.shape}"
    except Exception as e:  # noqa: BLE001
        return "unexpected_exception", f"to_dense: {type(e).__name__}: {e}"
    return _check_linear(mat, case, case.dense)


def case_from_seed(seed: int) -> Case:
    return make_case(NumpySource(seed))


# ------------------------------------------------------------------------------ worker/driver
def _worker(seeds: list[int], inject_crash: int | None = None) -> int:
    """Run cases in-process, one JSON line per case on stdout."""
    # The cases are tiny: torch's intra-op pool only adds contention on a shared machine.
    torch.set_num_threads(1)
    out = sys.stdout
    for s in seeds:
        if s == inject_crash:  # self-test of the crash isolation (see tests/test_fuzz.py)
            os.abort()
        try:
            case = case_from_seed(s)
            status, detail = run_case(case)
            mut = f"{case.kind}:{case.mutation}"
        except Exception as e:  # noqa: BLE001 - harness bug or unexpected escape
            status, detail, mut = "unexpected_exception", "".join(
                traceback.format_exception_only(type(e), e)).strip(), "?"
        out.write(json.dumps({"seed": s, "status": status, "mutation": mut,
                              "detail": detail[:300]}) + "\n")
        out.flush()
    return 0


def _run_batch(seeds: list[int], timeout: float,
               inject_crash: int | None = None) -> tuple[list[dict], str | None]:
    """Run seeds in one subprocess; returns (results, crash description or None)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           ",".join(str(s) for s in seeds)]
    if inject_crash is not None:
        cmd += ["--inject-crash", str(inject_crash)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=str(ROOT), env=os.environ.copy())
    except subprocess.TimeoutExpired as e:
        done = [json.loads(ln) for ln in (e.stdout or b"").decode().splitlines() if ln.strip()]
        return done, "timeout (hang)"
    results = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    crash = None
    if proc.returncode != 0:
        rc = proc.returncode
        why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        crash = f"{why}; stderr tail: {proc.stderr[-800:]}"
    elif len(results) != len(seeds):
        crash = f"only {len(results)}/{len(seeds)} results; stderr tail: {proc.stderr[-800:]}"
    return results, crash


def drive(n_cases: int, start: int, batch: int, timeout: float, quiet: bool,
          inject_crash: int | None = None) -> dict:
    t0 = time.time()
    counts: collections.Counter[str] = collections.Counter()
    by_mutation: collections.Counter[str] = collections.Counter()
    failures: list[dict] = []
    seeds = list(range(start, start + n_cases))
    for b0 in range(0, n_cases, batch):
        chunk = seeds[b0:b0 + batch]
        results, crash = _run_batch(chunk, timeout, inject_crash)
        if crash:
            # Isolate: every case of the crashed batch in its own process.
            if not quiet:
                print(f"batch {chunk[0]}..{chunk[-1]} crashed ({crash[:200]}); isolating",
                      flush=True)
            results = []
            for s in chunk:
                res, c = _run_batch([s], min(timeout, 120), inject_crash)
                if c:
                    results.append({"seed": s, "status": "crash", "mutation": "?",
                                    "detail": c[:600]})
                else:
                    results.extend(res)
        for r in results:
            counts[r["status"]] += 1
            by_mutation[r["mutation"]] += 1
            if r["status"] in FAIL_STATUSES:
                failures.append(r)
        if not quiet:
            done = min(b0 + batch, n_cases)
            print(f"  {done:>6}/{n_cases} cases  {dict(counts)}  ({time.time() - t0:.0f} s)",
                  flush=True)
    import sparsekit

    return {
        "cases": n_cases,
        "first_seed": start,
        "counts": dict(counts),
        "crashes": counts["crash"],
        "failures": len(failures),
        "failure_examples": failures[:50],
        "mutations_covered": len(by_mutation),
        "by_mutation": dict(sorted(by_mutation.items())),
        "seconds": round(time.time() - t0, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "sparsekit": sparsekit.__version__,
        "backends": sparsekit.backends(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="number of cases (default 10000)")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--batch", type=int, default=1000, help="cases per subprocess")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per batch")
    ap.add_argument("--json", type=Path, help="also write the summary as JSON here")
    ap.add_argument("--case", type=int, help="run one seed in-process and print it")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--inject-crash", type=int, help=argparse.SUPPRESS)
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.worker is not None:
        return _worker([int(s) for s in args.worker.split(",") if s], args.inject_crash)
    if args.case is not None:
        case = case_from_seed(args.case)
        print(case.describe, f"expect={case.expect} names={case.names}")
        if args.verbose:
            for k, v in case.kwargs.items():
                print(f"  {k} = {v!r}")
            print(f"  x = {case.x!r}\n  bias = {case.bias!r}")
        print(run_case(case))
        return 0
    summary = drive(args.cases, args.start, args.batch, args.timeout, args.quiet,
                    args.inject_crash)
    print(json.dumps({k: v for k, v in summary.items() if k != "failure_examples"}, indent=1))
    for f in summary["failure_examples"][:20]:
        print(f"FAIL seed={f['seed']} {f['status']} {f['mutation']}: {f['detail']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    bad = summary["crashes"] + summary["failures"]
    print(f"fuzz: {summary['cases']} cases, {summary['crashes']} crashes, "
          f"{summary['failures']} oracle failures, {summary['seconds']} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
