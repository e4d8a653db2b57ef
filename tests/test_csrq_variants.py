"""The compressed-format CSR kernels (family ``csrq``: int8 values and/or uint8 column gaps) as
bound matrices: every variant on every ISA this machine runs against the float64 reference
(awkward shapes, nnz = 0, empty rows, full rows, int32 indices), the occupancy bitmap of
``csrq_bitmap`` (built on demand, validated, dropped when not chosen), the planner's candidates
and forcing, and the errors for bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest

C = pytest.importorskip("sparsekit._C")
torch = pytest.importorskip("torch")

from reference import (  # noqa: E402
    assert_close_to_reference,
    isas_up_to,
    random_pruned,
    random_x,
)

import sparsekit  # noqa: E402
from sparsekit.kernels import cpp, planner  # noqa: E402

HW = C.build_info()["isa_hardware"]
ISAS = isas_up_to(HW)
IDS = {v["name"]: v["id"] for v in C.cpu_variants()}
CSRQ = [v for v in C.cpu_variants() if v["family"] == "csrq"]


def _bound(mat: sparsekit.CSRMatrix, isa: str = "auto") -> object:
    m, k = mat.shape
    vals = mat.values
    code = {torch.int8: "i8", torch.float32: "f32"}[vals.dtype]
    sc = None if mat.scales is None else mat.scales.numpy()
    return C.BoundMatrix("csrq", mat.indptr.numpy(), mat.indices.numpy(), vals.numpy(), code, m,
                         k, 1, 1, isa, sc)


def _run(bm, x: torch.Tensor, m: int, variant: str, bias: torch.Tensor | None = None,
         threads: int = 2) -> torch.Tensor:
    out = torch.full((x.shape[0], m), float("nan"))
    bp = 0 if bias is None else bias.data_ptr()
    assert bm.run(x.data_ptr(), out.data_ptr(), x.shape[0], 0, bp, threads, IDS[variant])
    return out


CASES = [  # (M, K, sparsity, empty rows)
    (1, 1, 0.0, 0), (7, 33, 0.5, 2), (33, 97, 0.7, 5), (5, 1025, 0.9, 1), (3, 64, 0.0, 0),
    (4, 65, 0.3, 1), (17, 128, 1.0, 0), (9, 191, 0.7, 0), (2, 70001, 0.99, 0),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", [v["name"] for v in CSRQ])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-s{c[2]}-e{c[3]}")
def test_int8_variants_match_reference(isa, variant, case):
    v = next(v for v in CSRQ if v["name"] == variant)
    if isa not in v["isas"] or not v["available"]:
        pytest.skip(f"{variant} is not built for {isa} or needs {v['cpu_features']}")
    m, k, sparsity, empty = case
    seed = m * 7919 + k
    w = random_pruned(m, k, sparsity, seed=seed, empty_rows=empty)
    mat = sparsekit.CSRMatrix.from_dense(w, value_dtype=torch.int8)
    assert mat.indices.dtype == (torch.uint16 if k <= 65536 else torch.int32)
    bm = _bound(mat, isa)
    bias = random_x((m,), seed=seed + 1)
    deq = mat.to_dense()
    for n in (1, 2):
        x = random_x((n, k), seed=seed + 2 + n)
        assert_close_to_reference(_run(bm, x, m, variant, bias), x, deq, bias,
                                  msg=f"{variant} {isa} {m}x{k} N={n}")


@pytest.mark.parametrize("isa", ISAS)
def test_gap_coded_and_float_values_run_the_gather_variants(isa):
    w = random_pruned(21, 900, 0.6, seed=3, empty_rows=2)
    for vdt in (torch.int8, torch.float32):
        mat = sparsekit.CSRMatrix.from_dense(w, value_dtype=vdt, index_encoding="delta8")
        assert mat.indices.dtype == torch.uint8
        bm = _bound(mat, isa)
        x = random_x((2, 900), seed=4)
        for variant in (("csrq_rows2", "csrq_row1", "csrq_assemble") if isa != "generic"
                        else ("csrq_rows2",)):
            assert_close_to_reference(_run(bm, x, 21, variant), x, mat.to_dense(),
                                      msg=f"{variant} {isa} {vdt}")
        with pytest.raises(ValueError,
                           match="csrq bitmap variants expected int8 values with plain"):
            _run(bm, x, 21, "csrq_bitmap")


def test_bitmap_is_built_on_demand_and_dropped_when_not_planned():
    m, k = 40, 300
    mat = sparsekit.CSRMatrix.from_dense(random_pruned(m, k, 0.5, seed=5), value_dtype=torch.int8)
    bm = _bound(mat)
    assert bm.family == "csrq" and bm.bitmap_nbytes == 0
    x = random_x((1, k), seed=6)
    _run(bm, x, m, "csrq_bitmap")
    assert bm.bitmap_nbytes == m * ((k + 63) // 64) * 8 + m * 8  # words, then int64 row sums
    bm.set_variant(0, "csrq_bitmap", 1)
    assert bm.bitmap_nbytes > 0
    bm.set_variant(1, "csrq_rows2", 1)  # class 0 still plans the bitmap: kept
    assert bm.bitmap_nbytes > 0
    bm.set_variant(0, "csrq_row1" if HW != "generic" else "csrq_rows2", 1)
    assert bm.bitmap_nbytes == 0
    # the planned run rebuilds it when needed
    bm.set_variant(0, "csrq_bitmap", 1)
    out = torch.empty(1, m)
    assert bm.run(x.data_ptr(), out.data_ptr(), 1, 0, 0, 1)
    assert_close_to_reference(out, x, mat.to_dense())
    bm.evict()  # bitmap included; results unchanged afterwards
    assert torch.equal(_run(bm, x, m, "csrq_bitmap"), out)


def test_bitmap_build_validates_the_indices():
    indptr = np.array([0, 2, 3], dtype=np.int32)
    values = np.array([1, 2, 3], dtype=np.int8)
    scales = np.ones(2, dtype=np.float32)
    x = torch.ones(1, 10)
    for bad, what in ((np.array([5, 5, 1], dtype=np.uint16), "got 5 at position 1 (row 0)"),
                      (np.array([5, 2, 1], dtype=np.uint16), "got 2 at position 1 (row 0)"),
                      (np.array([1, 2, 10], dtype=np.uint16), "got 10 at position 2 (row 1)")):
        bm = C.BoundMatrix("csrq", indptr, bad, values, "i8", 2, 10, 1, 1, "auto", scales)
        expected = (r"indices: expected strictly increasing values in \[0, 10\) within each "
                    r"row, " + re.escape(what))
        with pytest.raises(ValueError, match=expected):
            _run(bm, x, 2, "csrq_bitmap")


def test_bound_csrq_rejects_bad_arguments():
    indptr = np.array([0, 1], dtype=np.int32)
    idx = np.array([0], dtype=np.uint16)
    q = np.array([3], dtype=np.int8)
    with pytest.raises(ValueError, match="scales: expected a float32 array of length 1 for int8"):
        C.BoundMatrix("csrq", indptr, idx, q, "i8", 1, 4)
    with pytest.raises(ValueError, match="scales: expected contiguous float32 array of length 1"):
        C.BoundMatrix("csrq", indptr, idx, q, "i8", 1, 4, 1, 1, "auto", np.ones(2, np.float32))
    with pytest.raises(ValueError, match="scales: expected None"):
        C.BoundMatrix("csrq", indptr, idx, np.ones(1, np.float32), "f32", 1, 4, 1, 1, "auto",
                      np.ones(1, np.float32))
    with pytest.raises(ValueError, match="value_dtype 'i8' is only taken by csrq_linear"):
        C.BoundMatrix("csr", indptr, idx, q, "i8", 1, 4)
    with pytest.raises(ValueError, match="block_r, block_c: expected 1 for format 'csrq'"):
        C.BoundMatrix("csrq", indptr, idx, q, "i8", 1, 4, 2, 1, "auto", np.ones(1, np.float32))
    bm = C.BoundMatrix("csrq", indptr, idx, q, "i8", 1, 4, 1, 1, "auto", np.ones(1, np.float32))
    with pytest.raises(ValueError, match="variant: expected one of .*csrq_bitmap.* for csrq"):
        bm.set_variant(0, "csr_spmv_gather", 1)


@pytest.fixture
def fresh_planner(monkeypatch):
    for var in ("SPARSEKIT_KERNEL", "SPARSEKIT_PLAN", "SPARSEKIT_WISDOM", "SPARSEKIT_PLAN_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SPARSEKIT_PLAN_BUDGET_MS", "2")
    planner.clear()
    yield
    planner.clear()


def test_planner_times_the_csrq_candidates_that_read_the_matrix(fresh_planner):
    w = random_pruned(64, 512, 0.7, seed=8)
    plain = sparsekit.CSRMatrix.from_dense(w, value_dtype=torch.int8)
    gaps = sparsekit.CSRMatrix.from_dense(w, value_dtype=torch.int8, index_encoding="delta8")
    isa = cpp.compressed_bound(plain).isa
    expect = {v["name"] for v in CSRQ if isa in v["isas"] and v["available"]}
    if isa == "avx512":  # the AVX2 builds are timed too
        expect |= {v["name"] + "@avx2" for v in CSRQ if "avx2" in v["isas"] and v["available"]}
    p = planner.plan(plain, 1)
    assert "|csrq|int8|uint16|" in p.key and p.source == "measured"
    assert set(p.times_us) == expect and p.variant in expect
    assert cpp.backend.variant(plain, 1) == p.variant
    p = planner.plan(gaps, 2)
    assert "|csrq|int8|uint8|" in p.key and "csrq_bitmap" not in p.times_us
    # beyond batch 2 the decoded matrix's float kernels are planned
    assert "|csr|float32|" in planner.plan(plain, 8).key


def test_forced_bitmap_runs_through_every_entry_path(fresh_planner, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_KERNEL", "csrq_bitmap")
    from sparsekit.nn import SparseLinear

    dense = torch.nn.Linear(200, 48)
    with torch.no_grad():
        dense.weight.copy_(random_pruned(48, 200, 0.5, seed=9, empty_rows=3))
    lin = SparseLinear.from_dense(dense, format="csr", value_dtype=torch.int8)
    mat = lin.matrix
    assert mat.values.dtype == torch.int8
    for n in (1, 2):
        x = random_x((n, 200), seed=11 + n)
        with torch.no_grad():
            y = lin(x)
        assert_close_to_reference(y, x, mat.to_dense(), lin.bias, msg=f"N={n}")
        y2 = sparsekit.linear(x, mat, lin.bias)
        assert_close_to_reference(y2, x, mat.to_dense(), lin.bias, msg=f"linear N={n}")
    assert cpp.backend.variant(mat, 1) == "csrq_bitmap"
    assert planner.plan(mat, 1).source == "forced"


VNNI = any(v["name"] == "csrq_bitmap_vnni" and v["available"] and HW == "avx512" for v in CSRQ)


@pytest.mark.skipif(not VNNI, reason="csrq_bitmap_vnni needs AVX-512 VNNI + VBMI2 on this CPU")
def test_vnni_fixed_point_matches_the_reference_on_awkward_x():
    """x as 32-bit fixed point: a wide dynamic range (12 decades within a vector), all zeros,
    tiny and huge magnitudes, and inf / NaN (which fall back to the fp32 kernel and propagate as
    fp32 does)."""
    m, k = 37, 1000
    w = random_pruned(m, k, 0.6, seed=21, empty_rows=3)
    mat = sparsekit.CSRMatrix.from_dense(w, value_dtype=torch.int8)
    bm = _bound(mat, "avx512")
    deq = mat.to_dense()
    g = torch.Generator().manual_seed(22)
    decades = torch.randint(-6, 7, (2, k), generator=g)
    wide = torch.randn(2, k, generator=g) * torch.pow(10.0, decades)
    for x in (wide, torch.zeros(2, k), wide * 1e-30, wide * 1e25):
        assert_close_to_reference(_run(bm, x, m, "csrq_bitmap_vnni"), x, deq, msg="fixed point")
    # non-finite x: same outputs as the fp32 bitmap kernel (NaN / inf where a weight meets them)
    x = random_x((2, k), seed=24)
    cols = mat.to_dense()[5].nonzero().flatten()
    x[0, cols[0]] = float("inf")
    x[1, 7] = float("nan")
    got, fp32 = _run(bm, x, m, "csrq_bitmap_vnni"), _run(bm, x, m, "csrq_bitmap")
    assert torch.equal(got.isnan(), fp32.isnan()) and torch.equal(got.isinf(), fp32.isinf())
    assert got[0].isinf().any() or got[0].isnan().any()
    fin = got.isfinite()
    assert torch.allclose(got[fin], fp32[fin], rtol=1e-5, atol=1e-5)


def test_variants_missing_cpu_features_are_not_offered():
    for v in C.cpu_variants():
        assert v["cpu_features"] in ("", "avx512vnni,avx512vbmi2")
        assert v["available"] or v["cpu_features"]  # only a feature this CPU lacks hides one
    names = planner.candidates("csrq", 1, HW)
    assert ("csrq_bitmap_vnni" in names) == VNNI
    if not VNNI:
        w = random_pruned(4, 64, 0.5, seed=1)
        mat = sparsekit.CSRMatrix.from_dense(w, value_dtype=torch.int8)
        with pytest.raises(ValueError, match="csrq_bitmap_vnni.*needs the CPU features"):
            _bound(mat).set_variant(0, "csrq_bitmap_vnni", 1)
