"""Property-based fuzzing of input validation: format constructors, linear() and load().

Cases come from the generator/oracle in ``tools/fuzz_harness.py`` (one source of truth), driven
here by hypothesis (shrinkable choices) and, in ``test_fuzz_harness_subprocess``, by the
crash-isolating subprocess harness. Oracle: invalid input raises ValueError/TypeError naming the
offending argument; valid input (NaN/Inf values included) matches a float64 dense reference;
ambiguous input (e.g. convertible dtypes) may do either.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekit

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fuzz_harness", ROOT / "tools" / "fuzz_harness.py")
fh = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_harness"] = fh
_spec.loader.exec_module(fh)

HARNESS_CASES = int(os.environ.get("SPARSEKIT_FUZZ_CASES", "2000"))

_settings = settings(
    max_examples=int(os.environ.get("SPARSEKIT_FUZZ_EXAMPLES", "120")),
    deadline=None,
    derandomize=True,  # reproducible in CI; the subprocess harness covers fresh seeds
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def _check(case) -> None:
    status, detail = fh.run_case(case)
    assert status in fh.OK_STATUSES, (
        f"{case.describe}: expected {case.expect} (error naming one of {case.names}), "
        f"got {status}: {detail}"
    )


@pytest.mark.parametrize("kind", fh.KINDS)
@_settings
@given(data=st.data())
def test_fuzz_validation(kind, data):
    _check(fh.make_case(fh.HypothesisSource(data), kind=kind))


# ------------------------------------------------------------------ targeted regressions
def _csr_parts(m=4, k=6):
    w = torch.tensor(np.random.default_rng(0).standard_normal((m, k)), dtype=torch.float32)
    w[w.abs() < 0.7] = 0
    mat = sparsekit.CSRMatrix.from_dense(w)
    return mat.indptr.clone(), mat.indices.clone(), mat.values.clone(), w


def test_out_of_range_index_message_names_argument_and_position():
    indptr, indices, values, _ = _csr_parts()
    indices = indices.to(torch.int32)
    indices[2] = 6
    with pytest.raises(ValueError, match="indices") as ei:
        sparsekit.CSRMatrix(indptr, indices, values, (4, 6))
    assert "6" in str(ei.value)


def test_nan_inf_values_compute_like_dense():
    indptr, indices, values, w = _csr_parts()
    values[0], values[1] = float("nan"), float("inf")
    mat = sparsekit.CSRMatrix(indptr, indices, values, (4, 6))
    dense = mat.to_dense().double()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).abs() + 0.1
    y = sparsekit.linear(x, mat).double()
    ref = x.double() @ dense.T
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(y[fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_truncated_file_raises_value_error(tmp_path):
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.2] = 0
    model = torch.nn.Sequential(sparsekit.nn.SparseLinear.from_dense(lin, format="csr"))
    p = tmp_path / "m.safetensors"
    sparsekit.save(model, p)
    data = p.read_bytes()
    for cut in (0, 7, 8, 20, len(data) // 2, len(data) - 1):
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            sparsekit.load(p, torch.nn.Sequential(torch.nn.Linear(8, 4)))


def test_harness_oracle_rejects_wrong_behaviour():
    """The oracle itself must fail for accepted-invalid input and for wrong messages."""
    case = fh.case_from_seed(0)
    case.expect, case.names = "invalid", ("indices",)
    case.kind = "csr"
    case.kwargs = {"indptr": torch.tensor([0, 1], dtype=torch.int32),
                   "indices": torch.tensor([0], dtype=torch.uint16),
                   "values": torch.tensor([1.0]), "shape": (1, 1)}
    assert fh.run_case(case)[0] == "accepted_invalid"
    assert fh._check_error(ValueError("something else"), ("indices",)) == "bad_message"
    assert fh._check_error(IndexError("indices"), ("indices",)) == "unexpected_exception"
    assert fh._close(np.array([1.0, np.nan]), np.array([1.0, 2.0]), np.ones(2), 1e-6)


def test_fuzz_harness_subprocess():
    """The crash-isolating harness (``make fuzz`` runs 10,000 cases) on a CI-sized count.

    The driver runs in-process; the cases run in worker subprocesses, as in ``make fuzz``.
    """
    summary = fh.drive(HARNESS_CASES, start=1_000_000, batch=max(1, HARNESS_CASES // 2),
                       timeout=900.0, quiet=True)
    assert summary["cases"] == HARNESS_CASES
    bad = summary["failure_examples"][:5]
    assert summary["crashes"] == 0 and summary["failures"] == 0, bad
    assert summary["counts"].get("ok_valid", 0) > HARNESS_CASES // 5  # not all rejections
    assert summary["counts"].get("ok_rejected", 0) > HARNESS_CASES // 5
    assert summary["mutations_covered"] >= 50


def test_fuzz_harness_isolates_a_crashing_case(tmp_path):
    """A worker dying by signal fails the run, and the batch re-run pins the exact seed."""
    out = tmp_path / "crash.json"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz_harness.py"), "--cases", "2", "--batch",
         "2", "--start", "103", "--inject-crash", "104", "--json", str(out), "-q"],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT),
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["crashes"] == 1
    crash = [f for f in summary["failure_examples"] if f["status"] == "crash"]
    assert [c["seed"] for c in crash] == [104] and "SIGABRT" in crash[0]["detail"]
    assert summary["counts"].get("ok_valid", 0) + summary["counts"].get("ok_rejected", 0) == 1
