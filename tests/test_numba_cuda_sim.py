"""The Numba CUDA CSR kernel (sparsekit/kernels/numba_cuda.py) under Numba's CUDA simulator.

NUMBA_ENABLE_CUDASIM must be set before ``numba.cuda`` is first imported, and other tests import
numba in this pytest process, so the check runs in a subprocess with the variable set. It
compares against a float64 numpy reference on awkward shapes (1, 7, 33, 97 rows/cols, nnz = 0,
empty rows, uint16 ids >= 32768, int32 ids, int64 indptr, bias/no bias, fp32/fp16/bf16 values
decoded through the 16-bit table). Kept small: the simulator runs each GPU thread as a Python
thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    """
    import numpy as np, torch
    import numba
    assert numba.config.ENABLE_CUDASIM, "simulator not enabled"
    from sparsekit.kernels import numba_cuda as nc

    rng = np.random.default_rng(1234)

    def run(M, K, N, density, vdt, idx, ptr, bias, empty_every=0):
        w = rng.standard_normal((M, K)).astype(np.float32) * (rng.random((M, K)) < density)
        if empty_every:
            w[::empty_every] = 0
        wt = torch.from_numpy(w).to(vdt)
        wq = wt.to(torch.float64).numpy()          # the values the kernel sees, exactly
        rows, cols = np.nonzero(wq)
        counts = np.bincount(rows, minlength=M)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(ptr)
        vals = wt[torch.from_numpy(rows), torch.from_numpy(cols)]
        if vdt == torch.float32:
            v, lut = vals.numpy(), None
        else:
            v, lut = vals.view(torch.int16).numpy(), nc.decode_table(vdt)
        ids = cols.astype(np.uint16).view(np.int16) if idx == "u16" else cols.astype(np.int32)
        x = rng.standard_normal((N, K)).astype(np.float32)
        b = rng.standard_normal(M).astype(np.float32) if bias else None
        y = np.full((N, M), np.nan, np.float32)     # poisoned: every element must be written
        nc.launch_csr(indptr, ids, v, lut, x, b, y)
        ref = x.astype(np.float64) @ wq.T + (0.0 if b is None else b.astype(np.float64))
        mag = np.abs(x.astype(np.float64)) @ np.abs(wq).T + 1.0
        err = np.abs(y - ref)
        tol = 1e-5 * mag
        assert np.isfinite(y).all(), ("unwritten/NaN output", M, K, N)
        assert (err <= tol).all(), (M, K, N, str(vdt), idx, float(err.max()))
        return len(rows)

    cases = [
        (1, 1, 1, 1.0, torch.float32, "i32", np.int32, True, 0),
        (7, 33, 3, 0.5, torch.float16, "u16", np.int32, False, 3),
        (33, 97, 2, 0.3, torch.bfloat16, "u16", np.int64, True, 4),
        (97, 7, 1, 0.9, torch.float32, "u16", np.int32, False, 0),
        (6, 5, 2, 0.0, torch.float16, "i32", np.int32, True, 0),      # nnz = 0
        (5, 40000, 1, 0.001, torch.float32, "u16", np.int32, True, 0),  # ids >= 32768
        (9, 70000, 1, 0.0005, torch.bfloat16, "i32", np.int64, False, 2),  # int32 ids
    ]
    nnz = [run(*c) for c in cases]
    assert nnz[4] == 0 and nnz[0] == 1
    print("SIM-OK", nnz)
    """
)


def test_numba_cuda_kernel_under_simulator():
    pytest.importorskip("numba")
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "SIM-OK" in proc.stdout, (
        f"simulator run failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")


def test_import_creates_no_cuda_context():
    """Importing the GPU backends must not initialise CUDA (safe on GPU-less servers)."""
    code = ("import torch, sparsekit.kernels.numba_cuda, sparsekit.kernels.cuda; "
            "print(torch.cuda.is_initialized())")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("False"), proc.stdout
