"""Every validation error names the argument and shows the bad value.

Raw-array constructors are checked on both structural-validation paths: ``_C.validate_csr``
(compiled extension) and the vectorised numpy fallback, which must produce the same messages.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import sparsekit
import sparsekit.formats as fmt
import sparsekit.kernels as reg
from sparsekit import BSRMatrix, CSRMatrix

_REAL_C = fmt._get_C()


class _SpyC:
    """Delegates to the real extension and counts validate_csr calls."""

    def __init__(self, real):
        self.real = real
        self.calls = 0

    def validate_csr(self, *args):
        self.calls += 1
        return self.real.validate_csr(*args)


@pytest.fixture(params=["numpy", "C"])
def path(request, monkeypatch):
    """Run the test with the numpy validator, then with _C.validate_csr (spied)."""
    if request.param == "numpy":
        monkeypatch.setattr(fmt, "_get_C", lambda: None)
        yield None
    else:
        if _REAL_C is None or not hasattr(_REAL_C, "validate_csr"):
            pytest.skip("sparsekit._C not built")
        spy = _SpyC(_REAL_C)
        monkeypatch.setattr(fmt, "_get_C", lambda: spy)
        yield spy


def _raises(exc, pattern, fn, *a, spy=None, **kw):
    before = spy.calls if spy is not None else 0
    with pytest.raises(exc, match=pattern):
        fn(*a, **kw)
    return before


def _assert_used_C(spy, before):
    if spy is not None:
        assert spy.calls > before, "validation did not go through _C.validate_csr"


# (indptr, indices, n_rows, n_cols, exact message) -- structural errors, both paths
STRUCT_CASES = [
    ([0, 1], [0], 2, 4, "indptr: expected a 1-D array of length n_rows + 1 = 3, got length 2"),
    ([1, 1, 2], [0, 1], 2, 4, "indptr: expected indptr[0] == 0, got 1"),
    ([0, 2, 1], [0, 1], 2, 4,
     "indptr: expected non-decreasing values, got indptr[2] = 1 < indptr[1] = 2"),
    ([0, 1, 1], [0, 1], 2, 4, "indptr: expected indptr[-1] == len(indices) = 2, got 1"),
    ([0, 1, 3], [0, -1, 2], 2, 4, "indices: expected values in [0, 4), got -1 at position 1"),
    ([0, 2, 3], [1, 1, 0], 2, 4,
     "indices: expected sorted unique values within each row, got 1 after 1 at position 1 "
     "(row 0)"),
    ([0, 1, 3], [3, 2, 1], 2, 4,
     "indices: expected sorted unique values within each row, got 1 after 2 at position 2 "
     "(row 1)"),
]


@pytest.mark.parametrize("case", STRUCT_CASES, ids=[c[4].split(":")[0] + str(i)
                                                    for i, c in enumerate(STRUCT_CASES)])
def test_csr_structure_errors(path, case):
    indptr, indices, M, K, msg = case
    for ip_dt, ix_dt in [(np.int32, np.int32), (np.int64, np.int64)]:
        ip = np.array(indptr, dtype=ip_dt)
        ix = np.array(indices, dtype=ix_dt)
        vals = torch.ones(len(indices))
        before = _raises(ValueError, "^" + re.escape(msg) + "$", CSRMatrix, ip, ix, vals, (M, K),
                         spy=path)
        _assert_used_C(path, before)
        # torch inputs go through the same checks
        with pytest.raises(ValueError, match=re.escape(msg)):
            CSRMatrix(torch.from_numpy(ip), torch.from_numpy(ix), vals, (M, K))


def test_index_out_of_range_message_example(path):
    """The design doc's example message, verbatim."""
    nnz = 20
    indices = np.arange(nnz, dtype=np.int32)
    indices[17] = 5000
    indices[18:] = [5001, 5002]
    indptr = np.array([0, nnz], dtype=np.int32)
    msg = "indices: expected values in [0, 4096), got 5000 at position 17"
    before = _raises(ValueError, re.escape(msg), CSRMatrix, indptr, indices,
                     np.ones(nnz, np.float32), (1, 4096), spy=path)
    _assert_used_C(path, before)
    # uint16 indices beyond n_cols, and the BSR block-column bound
    ix16 = np.array([0, 9], dtype=np.uint16)
    _raises(ValueError, re.escape("indices: expected values in [0, 8), got 9 at position 1"),
            CSRMatrix, np.array([0, 2]), ix16, torch.ones(2), (1, 8))
    _raises(ValueError, re.escape("indices: expected values in [0, 3), got 3 at position 0"),
            BSRMatrix, np.array([0, 1]), np.array([3]), torch.ones(1, 2, 2), (2, 5), (2, 2))


def test_bsr_structure_errors(path):
    vals = torch.ones(2, 2, 2)
    msg = "indptr: expected indptr[-1] == len(indices) = 2, got 1"
    before = _raises(ValueError, re.escape(msg), BSRMatrix, [0, 1, 1], [0, 1], vals, (4, 4),
                     (2, 2), spy=path)
    _assert_used_C(path, before)
    _raises(ValueError, re.escape("got 0 after 1 at position 1 (row 0)"),
            BSRMatrix, [0, 2, 2], [1, 0], vals, (4, 4), (2, 2))
    _raises(ValueError, re.escape("indptr: expected a 1-D array of length n_rows + 1 = 3, "
                                  "got length 4"),
            BSRMatrix, [0, 1, 2, 2], [0, 1], vals, (3, 4), (2, 2))


def test_value_errors():
    ip, ix = np.array([0, 1, 3]), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=re.escape(
            "values: expected length nnz = len(indices) = 3, got 2")):
        CSRMatrix(ip, ix, torch.ones(2), (2, 4))
    with pytest.raises(ValueError, match=r"values: expected a 1-D array of length nnz, got shape"
                                         r" \(3, 1\)"):
        CSRMatrix(ip, ix, torch.ones(3, 1), (2, 4))
    with pytest.raises(TypeError, match="values: expected dtype float32, bfloat16 or float16, "
                                        "got float64"):
        CSRMatrix(ip, ix, np.ones(3), (2, 4))
    with pytest.raises(TypeError, match="values: .* got torch.int64"):
        CSRMatrix(ip, ix, torch.ones(3, dtype=torch.int64), (2, 4))
    with pytest.raises(TypeError, match="values: expected a torch.Tensor or numpy.ndarray, "
                                        "got list"):
        CSRMatrix(ip, ix, [1.0, 2.0, 3.0], (2, 4))
    with pytest.raises(TypeError, match="indices: expected an integer array, got dtype float32"):
        CSRMatrix(ip, np.array([0, 1, 2], np.float32), torch.ones(3), (2, 4))
    with pytest.raises(TypeError, match="indptr: expected an integer array, "
                                        "got dtype torch.float32"):
        CSRMatrix(torch.tensor([0.0, 1, 3]), ix, torch.ones(3), (2, 4))
    with pytest.raises(ValueError, match=r"indices: expected a 1-D array, got shape \(3, 1\)"):
        CSRMatrix(ip, ix.reshape(3, 1), torch.ones(3), (2, 4))
    with pytest.raises(ValueError, match=re.escape(
            "values: expected shape (nnzb, r, c) = (2, 2, 2), got (2, 4)")):
        BSRMatrix([0, 1, 2], [0, 1], torch.ones(2, 4), (4, 4), (2, 2))


@pytest.mark.parametrize("shape", [(0, 4), (2,), (2, 3, 4), (2.5, 3), (-1, 3), "ab", None,
                                   (True, 3)])
def test_shape_errors(shape):
    with pytest.raises(ValueError, match=r"shape: expected a tuple of two positive ints "
                                         r"\(out_features, in_features\), got " + re.escape(
                                             repr(shape))):
        CSRMatrix([0], [], torch.ones(0), shape)


@pytest.mark.parametrize("bs", [(0, 4), (2,), None, (1.5, 2)])
def test_blocksize_errors(bs):
    with pytest.raises(ValueError, match=r"blocksize: expected a tuple of two positive ints "
                                         r"\(r, c\), got " + re.escape(repr(bs))):
        BSRMatrix([0, 0], [], torch.ones(0, 2, 2), (2, 2), bs)
    with pytest.raises(ValueError, match="blocksize: expected"):
        BSRMatrix.from_dense(torch.ones(4, 4), bs)


def test_from_dense_errors():
    with pytest.raises(ValueError, match=r"w: expected a 2-D weight \(out_features, "
                                         r"in_features\), got shape \(4,\)"):
        CSRMatrix.from_dense(torch.ones(4))
    with pytest.raises(ValueError, match=r"w: expected a 2-D weight .* got shape \(2, 2, 2\)"):
        BSRMatrix.from_dense(np.ones((2, 2, 2)), (1, 1))
    with pytest.raises(ValueError, match=r"w: expected non-empty dimensions, got shape \(0, 3\)"):
        CSRMatrix.from_dense(torch.ones(0, 3))
    with pytest.raises(TypeError, match="w: expected a torch.Tensor or numpy.ndarray, got list"):
        CSRMatrix.from_dense([[1.0]])
    with pytest.raises(TypeError, match="value_dtype: expected one of .* got torch.float64"):
        CSRMatrix.from_dense(torch.ones(2, 2), value_dtype=torch.float64)
    with pytest.raises(TypeError, match="value_dtype: expected one of .* got 'int4'"):
        CSRMatrix.from_dense(torch.ones(2, 2), value_dtype="int4")
    with pytest.raises(ValueError, match="blocksize: expected .* got None"):
        BSRMatrix.from_torch(torch.ones(2, 2).to_sparse_csr())


def test_nan_inf_values_are_allowed():
    v = torch.tensor([float("nan"), float("inf"), -float("inf")])
    m = CSRMatrix([0, 1, 3], [2, 0, 3], v, (2, 4))
    d = m.to_dense()
    assert torch.isnan(d[0, 2]) and torch.isposinf(d[1, 0]) and torch.isneginf(d[1, 3])


# --------------------------------------------------------------------------- linear() errors
@pytest.fixture(scope="module")
def W():
    w = torch.zeros(33, 97)
    w[::3, ::5] = 1.0
    return CSRMatrix.from_dense(w)


def test_linear_argument_errors(W):
    x = torch.randn(3, 97)
    with pytest.raises(TypeError, match="weight: expected a sparsekit CSRMatrix or BSRMatrix, "
                                        "got Tensor .*from_dense"):
        sparsekit.linear(x, torch.randn(33, 97))
    with pytest.raises(ValueError, match=re.escape(
            "x: expected last dimension == weight in_features = 97, got shape (3, 96)")):
        sparsekit.linear(torch.randn(3, 96), W)
    with pytest.raises(ValueError, match=re.escape("x: expected last dimension == weight "
                                                   "in_features = 97, got shape ()")):
        sparsekit.linear(torch.tensor(1.0), W)
    with pytest.raises(TypeError, match="x: expected dtype float32, bfloat16 or float16, "
                                        "got torch.float64"):
        sparsekit.linear(x.double(), W)
    with pytest.raises(TypeError, match="x: expected dtype .* got torch.int64"):
        sparsekit.linear(x.long(), W)
    with pytest.raises(TypeError, match="x: expected dtype float32 or float16, got float64"):
        sparsekit.linear(np.ones((3, 97)), W)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor or numpy.ndarray, got list"):
        sparsekit.linear([[1.0] * 97], W)
    with pytest.raises(ValueError, match=re.escape("bias: expected shape (33,), got (32,)")):
        sparsekit.linear(x, W, torch.ones(32))
    with pytest.raises(ValueError, match=re.escape("bias: expected shape (33,), got (1, 33)")):
        sparsekit.linear(x, W, torch.ones(1, 33))
    with pytest.raises(TypeError, match="bias: expected dtype float32, bfloat16 or float16, "
                                        "got torch.float64"):
        sparsekit.linear(x, W, torch.ones(33, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias: expected a torch.Tensor or None, got list"):
        sparsekit.linear(x, W, [0.0] * 33)
    with pytest.raises(ValueError, match="x: expected a tensor on the weight's device cpu, "
                                        "got meta"):
        sparsekit.linear(torch.empty(3, 97, device="meta"), W)
    with pytest.raises(ValueError, match="backend: expected one of .* got 'nope'"):
        sparsekit.linear(x, W, backend="nope")
    with pytest.raises(TypeError, match="a: expected a sparsekit CSRMatrix or BSRMatrix, got "
                                        "ndarray"):
        sparsekit.spmm(np.ones((3, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match=re.escape("b: expected a 2-D array of shape (97, N), "
                                                   "got shape (96, 4)")):
        sparsekit.spmm(W, torch.ones(96, 4))


def test_unavailable_backend_error_lists_available(W, monkeypatch):
    reg._registry()
    fake = dict(reg._loaded)
    fake["cuda"] = (None, False, "built without CUDA (test)")
    monkeypatch.setattr(reg, "_loaded", fake)
    with pytest.raises(ValueError, match=r"backend: 'cuda' is not available \(built without "
                                        r"CUDA \(test\)\); available: .*torch"):
        sparsekit.linear(torch.ones(1, 97), W, backend="cuda")


# --------------------------------------------------------------------------- registry policy
def test_required_backends_env(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_REQUIRE_BACKENDS", "torch,nonexistent")
    reg._reload()
    try:
        with pytest.raises(RuntimeError, match="required backend.*'nonexistent' \\(unknown"):
            sparsekit.backends()
        with pytest.raises(RuntimeError, match="nonexistent"):
            sparsekit.linear(torch.ones(1, 4), CSRMatrix.from_dense(torch.eye(4)))
        monkeypatch.setenv("SPARSEKIT_REQUIRE_BACKENDS", "torch")
        assert "torch" in sparsekit.backends()
    finally:
        monkeypatch.delenv("SPARSEKIT_REQUIRE_BACKENDS")
        reg._reload()


def test_loud_fallback_warns_once_when_cpp_missing(monkeypatch):
    # CI requires cpp (SPARSEKIT_REQUIRE_BACKENDS), which would turn the simulated absence
    # into an error instead of the fallback under test.
    monkeypatch.delenv("SPARSEKIT_REQUIRE_BACKENDS", raising=False)
    reg._reload()
    reg._registry()
    fake = dict(reg._loaded)
    fake["cpp"] = (None, False, "sparsekit._C is not importable: test reason")
    monkeypatch.setattr(reg, "_loaded", fake)
    W = CSRMatrix.from_dense(torch.eye(4))
    try:
        with pytest.warns(RuntimeWarning, match="compiled C\\+\\+ kernels .* not available.*"
                                                "test reason"):
            y = sparsekit.linear(torch.ones(2, 4), W)
        assert torch.equal(y, torch.ones(2, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sparsekit.linear(torch.ones(2, 4), W.to(dtype=torch.bfloat16))  # no second warning
    finally:
        reg._reload()


def test_broken_backend_module_is_unavailable_not_importerror(monkeypatch):
    monkeypatch.setitem(reg._MODULES, "cuda", "sparsekit.kernels._does_not_exist")
    reg._reload()
    try:
        ok, why = reg.backend_status()["cuda"]
        assert not ok and "failed to import" in why and "_does_not_exist" in why
        assert "cuda" not in sparsekit.backends()
    finally:
        monkeypatch.undo()
        reg._reload()


def test_numpy_and_C_paths_report_the_same_first_violation():
    """Randomly corrupted structures (often with several violations at once): both validators
    accept the same inputs and report the identical first message."""
    if _REAL_C is None or not hasattr(_REAL_C, "validate_csr"):
        pytest.skip("sparsekit._C not built")
    rng = np.random.default_rng(2024)
    n_err = 0
    for trial in range(300):
        M, K = int(rng.integers(1, 12)), int(rng.integers(1, 20))
        dense = rng.random((M, K)) < rng.random()
        indptr = np.concatenate([[0], np.cumsum(dense.sum(1))]).astype(np.int64)
        indices = np.nonzero(dense)[1].astype(np.int64)
        for _ in range(int(rng.integers(0, 3))):  # 0-2 corruptions
            kind = int(rng.integers(0, 5))
            if kind == 0 and len(indices):
                indices[rng.integers(len(indices))] = rng.integers(-3, K + 3)
            elif kind == 1 and len(indices) > 1:
                p = rng.integers(1, len(indices))
                indices[p] = indices[p - 1]
            elif kind == 2:
                indptr[rng.integers(0, M + 1)] += int(rng.integers(-2, 3))
            elif kind == 3:
                indices = indices[:-1] if len(indices) else np.array([0], np.int64)
            else:
                rng.shuffle(indices)
        msgs = []
        for use_C in (False, True):
            try:
                fmt.validate_structure(indptr, indices, M, K, use_C=use_C)
                msgs.append(None)
            except ValueError as e:
                msgs.append(str(e))
        assert msgs[0] == msgs[1], (trial, indptr, indices, M, K, msgs)
        n_err += msgs[0] is not None
    assert 100 < n_err < 300  # the generator produced both valid and invalid inputs
