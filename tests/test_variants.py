"""Every CPU kernel variant (``sparsekit._C.cpu_variants()``) against the float64 reference, on
every ISA this machine runs, with edge sweeps: rows around the register block / vector width,
batch sizes around the tile widths, empty rows, nnz = 0, ragged BSR blocks, uint16 / int32 index
limits. Plus the bound-matrix call path and the planner (forcing, wisdom file, errors)."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

C = pytest.importorskip("sparsekit._C")
torch = pytest.importorskip("torch")

from reference import (  # noqa: E402
    assert_close_to_reference,
    isas_up_to,
    random_block_pruned,
    random_pruned,
    random_x,
)
from reference import kernel_array as _np  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.kernels import planner  # noqa: E402

HW = C.build_info()["isa_hardware"]
ISAS = isas_up_to(HW)
VARIANTS = C.cpu_variants()
TD = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _cases(family: str, isa: str):
    for v in VARIANTS:
        if v["family"] in (family, "") and isa in v["isas"]:
            yield v


def _batches(v) -> list[int]:
    lo, hi = v["n_min"], v["n_max"]
    ns = [1, 2, 3, 8, 9, 17, 33, 65]  # around W = 8 / 16 and the 16-64 column tiles
    return [n for n in ns if n >= lo and (hi is None or n <= hi)]


def _run_csr(mat, x, bias, isa, variant, threads=2):
    m, _ = mat.shape
    out = torch.full((x.shape[0], m), 7.0, dtype=x.dtype)  # garbage: must be overwritten
    code = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
    C.csr_linear(mat.indptr.numpy(), mat.indices.numpy(), _np(mat.values),
                 code[mat.values.dtype], _np(x), code[x.dtype],
                 None if bias is None else bias.numpy(), _np(out), code[x.dtype], m,
                 mat.shape[1], threads, isa, variant)
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vdt", ["f32", "bf16", "f16"])
def test_csr_variants_edges(isa, vdt):
    seed = 0
    for v in _cases("csr", isa):
        # rows around the register block / 2W-nonzero step: K (= nonzeros of a dense row)
        # in {W-1, W, W+1, 2W-1, 2W, 2W+1, 4W+1} for W = 8 and 16
        for m, k, sp, empty in [(1, 1, 0.0, 0), (7, 15, 0.0, 0), (9, 16, 0.0, 0),
                                (33, 17, 0.0, 3), (5, 31, 0.0, 0), (6, 32, 0.0, 0),
                                (4, 33, 0.0, 0), (3, 65, 0.0, 0), (97, 1025, 0.95, 10),
                                (40, 300, 1.0, 0)]:
            w = random_pruned(m, k, sp, seed=seed, dtype=TD[vdt], empty_rows=empty)
            mat = sparsekit.CSRMatrix.from_dense(w)
            bias = random_x((m,), seed=seed + 1)
            for i, n in enumerate(_batches(v)):
                for xdt in {torch.float32, TD[vdt] if i % 2 else torch.float32}:
                    x = random_x((n, k), seed=seed + 2, dtype=xdt)
                    y = _run_csr(mat, x, bias if n % 2 else None, isa, v["name"], 1 + n % 2)
                    assert_close_to_reference(
                        y, x, mat.to_dense(), bias if n % 2 else None,
                        msg=f"{v['name']} {isa} {vdt} x={xdt} M={m} K={k} N={n}")
            seed += 3


@pytest.mark.parametrize("isa", ISAS)
def test_csr_variants_index_limits(isa):
    # uint16 indices at their limit (K = 65536: column 65535 used) and int32 beyond it
    for k, idx_dtype in [(65536, torch.uint16), (70001, torch.int32)]:
        w = torch.zeros(3, k)
        w[0, k - 1] = 2.0
        w[1, 0] = -1.0
        w[1, k - 1] = 3.0
        w[2, ::997] = 0.5
        mat = sparsekit.CSRMatrix.from_dense(w)
        assert mat.indices.dtype == idx_dtype
        for v in _cases("csr", isa):
            for n in _batches(v)[:3]:
                x = random_x((n, k), seed=n)
                y = _run_csr(mat, x, None, isa, v["name"])
                assert_close_to_reference(y, x, mat.to_dense(), msg=f"{v['name']} K={k} N={n}")


@pytest.mark.parametrize("isa", ISAS)
def test_bsr_variants_ragged(isa):
    code = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
    seed = 100
    for v in _cases("bsr", isa):
        for (m, k), (r, c) in [((7, 33), (4, 4)), ((33, 97), (8, 8)), ((17, 40), (1, 8)),
                               ((20, 20), (16, 16)), ((9, 50), (2, 3))]:
            for vdt in ("f32", "bf16"):
                w = random_block_pruned(m, k, (r, c), 0.5, seed=seed, dtype=TD[vdt])
                mat = sparsekit.BSRMatrix.from_dense(w, blocksize=(r, c))
                for n in [1, 2, 3, 9, 17, 33, 65][: 7 if v["name"] != "auto" else 3]:
                    if n < v["n_min"]:
                        continue
                    x = random_x((n, k), seed=seed + n)
                    out = torch.full((n, m), 7.0)
                    C.bsr_linear(mat.indptr.numpy(), mat.indices.numpy(), _np(mat.values),
                                 code[mat.values.dtype], x.numpy(), "f32", None, out.numpy(),
                                 "f32", m, k, r, c, 2, isa, v["name"])
                    assert_close_to_reference(out, x, mat.to_dense(),
                                              msg=f"{v['name']} {isa} {r}x{c} M={m} N={n}")
                seed += 1


def test_variant_nnz_zero_and_errors():
    mat = sparsekit.CSRMatrix.from_dense(torch.zeros(5, 40))
    bias = random_x((5,), seed=3)
    for v in _cases("csr", HW):
        for n in _batches(v)[:2]:
            x = random_x((n, 40), seed=n)
            y = _run_csr(mat, x, bias, HW, v["name"])
            assert torch.equal(y, bias.expand(n, 5))
    w = random_pruned(4, 8, 0.5, seed=1)
    m = sparsekit.CSRMatrix.from_dense(w)
    x = random_x((1, 8), seed=1)
    with pytest.raises(ValueError, match=r"variant: expected one of 'auto', 'csr_spmv_gather'.*"
                                         r"got 'nope'"):
        _run_csr(m, x, None, HW, "nope")
    with pytest.raises(ValueError, match="variant: expected one of .* for csr .*got 'bsr_tile_v2'"):
        _run_csr(m, x, None, HW, "bsr_tile_v2")
    with pytest.raises(ValueError, match="variant: .*got '99'"):
        _run_csr(m, x, None, HW, 99)
    if "avx2" in ISAS:  # SIMD-only variants are not compiled into the generic path
        with pytest.raises(ValueError, match="on ISA 'generic', got 'csr_spmv_assemble'"):
            _run_csr(m, x, None, "generic", "csr_spmv_assemble")


# ---------------------------------------------------------------------------- bound matrix
def test_bound_matrix_matches_reference_and_keeps_buffers_alive():
    w = random_pruned(33, 70, 0.7, seed=5)
    mat = sparsekit.CSRMatrix.from_dense(w)
    dense = mat.to_dense().clone()
    bm = C.BoundMatrix("csr", mat.indptr.numpy(), mat.indices.numpy(), mat.values.numpy(), "f32",
                       33, 70)
    del mat  # the bound object keeps the buffers alive
    bias = random_x((33,), seed=6)
    for n in (1, 2, 5, 40):
        x = random_x((n, 70), seed=n)
        out = torch.empty(n, 33)
        assert bm.run(x.data_ptr(), out.data_ptr(), n, 0, bias.data_ptr(), 1) is False
        assert bm.get_variant(bm.n_class(n)) == -1  # unplanned: nothing computed
        bm.run(x.data_ptr(), out.data_ptr(), n, 0, bias.data_ptr(), 1, 0)  # explicit: auto
        assert_close_to_reference(out, x, dense, bias, msg=f"bound N={n}")
    bm.set_variant(0, "csr_spmv_scalar", 1)
    assert bm.get_variant(0) == [v["name"] for v in VARIANTS].index("csr_spmv_scalar")
    x = random_x((1, 70), seed=9)
    out = torch.empty(1, 33)
    assert bm.run(x.data_ptr(), out.data_ptr(), 1, 0, 0, 1) is True
    assert bm.run(x.data_ptr(), out.data_ptr(), 1, 0, 0, 2) is True  # one plan per class
    assert_close_to_reference(out, x, dense, msg="bound planned")
    with pytest.raises(ValueError, match="x_dtype: expected code 0"):
        bm.run(x.data_ptr(), out.data_ptr(), 1, 5, 0, 1)
    with pytest.raises(ValueError, match="x_dtype: expected 'f32' or the value dtype 'f32'"):
        bm.run(x.data_ptr(), out.data_ptr(), 1, 1, 0, 1)
    with pytest.raises(ValueError, match="x / out: expected non-null"):
        bm.run(0, out.data_ptr(), 1, 0, 0, 1)
    with pytest.raises(ValueError, match="num_threads"):
        bm.run(x.data_ptr(), out.data_ptr(), 1, 0, 0, 0)
    with pytest.raises(ValueError, match="n_class: expected an integer in"):
        bm.set_variant(7, "auto", 1)
    with pytest.raises(ValueError, match="format: expected 'csr', 'bsr' or 'csrq', got 'coo'"):
        C.BoundMatrix("coo", np.zeros(2, np.int32), np.zeros(0, np.uint16),
                      np.zeros(0, np.float32), "f32", 1, 1)
    with pytest.raises(ValueError, match="indptr: expected contiguous int32 or int64 array of "
                                         "length 3"):
        C.BoundMatrix("csr", np.zeros(2, np.int32), np.zeros(0, np.uint16),
                      np.zeros(0, np.float32), "f32", 2, 1)


# ---------------------------------------------------------------------------- planner
@pytest.fixture
def fresh_planner(monkeypatch, tmp_path):
    for var in ("SPARSEKIT_KERNEL", "SPARSEKIT_PLAN", "SPARSEKIT_WISDOM", "SPARSEKIT_PLAN_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SPARSEKIT_PLAN_BUDGET_MS", "2")
    planner.clear()
    yield tmp_path
    planner.clear()


def test_planner_measures_once_and_calls_stay_correct(fresh_planner):
    w = random_pruned(64, 256, 0.9, seed=7)
    mat = sparsekit.CSRMatrix.from_dense(w)
    p = planner.plan(mat, 1, threads=1)
    assert p.source in ("measured", "single") and p.variant in p.times_us
    assert p.cost_s >= 0 and len(p.times_us) == len(planner.bound_candidates("csr", 1, C.cpu_isa()))
    again = planner.plan(sparsekit.CSRMatrix.from_dense(w.clone()), 1, threads=1)
    assert again.key == p.key and again.cost_s == 0.0  # same key: no second measurement
    for n in (1, 2, 6, 20, 70):  # the first call of each class plans; all stay correct
        x = random_x((n, 256), seed=n)
        for _ in range(2):
            assert_close_to_reference(sparsekit.linear(x, mat), x, mat.to_dense(), msg=f"N={n}")
    assert len(planner.plans()) >= 5


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_evict_keeps_results_and_plan_cache_modes(fresh_planner, monkeypatch, fmt):
    w = random_pruned(48, 96, 0.7, seed=11)
    mat = (sparsekit.CSRMatrix.from_dense(w) if fmt == "csr"
           else sparsekit.BSRMatrix.from_dense(w, (4, 4)))
    x = random_x((3, 96), seed=12)
    before = sparsekit.linear(x, mat)
    from sparsekit.kernels.cpp import bound_matrix
    bound_matrix(mat).evict()  # flushing must change nothing but where the bytes live
    after = sparsekit.linear(x, mat)
    assert torch.equal(before, after)
    assert_close_to_reference(after, x, w, msg=fmt)
    cold = planner.plan(mat, 1, threads=1)
    assert cold.key.endswith("|cold")
    monkeypatch.setenv("SPARSEKIT_PLAN_CACHE", "warm")
    warm = planner.plan(mat, 1, threads=1)
    assert warm.key.endswith("|warm") and warm.key != cold.key
    monkeypatch.setenv("SPARSEKIT_PLAN_CACHE", "lukewarm")
    with pytest.raises(ValueError, match=r"SPARSEKIT_PLAN_CACHE: expected 'cold' or 'warm', "
                                         r"got 'lukewarm'"):
        planner.plan(mat, 1, threads=1)


def test_evict_empty_matrix():
    m = C.BoundMatrix("csr", np.zeros(3, np.int32), np.zeros(0, np.uint16),
                      np.zeros(0, np.float32), "f32", 2, 5)
    m.evict()  # zero-length buffers: nothing to flush, no fault


def test_planner_forced_and_unknown(fresh_planner, monkeypatch):
    mat = sparsekit.CSRMatrix.from_dense(random_pruned(16, 64, 0.5, seed=8))
    monkeypatch.setenv("SPARSEKIT_KERNEL", "csr_spmv_scalar,csr_tile_v1")
    assert planner.plan(mat, 1, threads=1).variant == "csr_spmv_scalar"
    assert planner.plan(mat, 40, threads=1).variant == "csr_tile_v1"
    monkeypatch.setenv("SPARSEKIT_KERNEL", "csr_spmv_gahter")
    with pytest.raises(ValueError, match=r"SPARSEKIT_KERNEL: expected .*'csr_spmv_assemble'.*"
                                         r"got 'csr_spmv_gahter'"):
        planner.plan(mat, 1, threads=1)
    monkeypatch.delenv("SPARSEKIT_KERNEL")
    monkeypatch.setenv("SPARSEKIT_PLAN", "0")
    assert planner.plan(mat, 1, threads=1).variant == "auto"


def test_planner_times_lower_isa_builds(fresh_planner, monkeypatch):
    """On AVX-512 the AVX2 builds are candidates (``<variant>@avx2``); forcing one runs that
    build (correct results, reported with its ISA); lower builds never go above the matrix's."""
    names = planner.bound_candidates("csr", 1, "avx512")
    assert set(planner.candidates("csr", 1, "avx512")) <= set(names)
    assert {f"{c}@avx2" for c in planner.candidates("csr", 1, "avx2")} <= set(names)
    assert planner.bound_candidates("csr", 1, "avx2") == planner.candidates("csr", 1, "avx2")
    assert planner.split_name("csr_spmv_gather@avx2") == ("csr_spmv_gather", "avx2")
    assert planner.split_name("csr_spmv_gather") == ("csr_spmv_gather", None)
    if C.cpu_isa() != "avx512":
        pytest.skip("needs an AVX-512 machine (the AVX2 build is then a lower one)")
    w = random_pruned(97, 300, 0.9, seed=11)
    mat = sparsekit.CSRMatrix.from_dense(w)
    monkeypatch.setenv("SPARSEKIT_KERNEL", "csr_spmv_gather@avx2")
    p = planner.plan(mat, 1, threads=2)
    assert (p.variant, p.source) == ("csr_spmv_gather@avx2", "forced")
    from sparsekit.kernels import get_backend
    assert get_backend("cpp").variant(mat, 1) == "csr_spmv_gather@avx2"
    for n in (1, 2):
        x = random_x((n, 300), seed=n)
        assert_close_to_reference(sparsekit.linear(x, mat), x, mat.to_dense(), msg=f"N={n}")
    monkeypatch.setenv("SPARSEKIT_KERNEL", "csr_spmv_gather@sse4")
    with pytest.raises(ValueError, match=r"SPARSEKIT_KERNEL: .*@<isa> \(generic, avx2, avx512\), "
                                         r"got 'csr_spmv_gather@sse4'"):
        planner.plan(mat, 1, threads=1)


def test_bound_matrix_isa_build_arguments():
    ip, ix = np.array([0, 1, 2], np.int32), np.array([0, 1], np.uint16)
    m = C.BoundMatrix("csr", ip, ix, np.ones(2, np.float32), "f32", 2, 2, isa="avx2")
    with pytest.raises(ValueError, match="isa: expected this matrix's ISA 'avx2' or a lower one, "
                                         "got 'avx512'"):
        m.set_variant(0, "csr_spmv_gather", 1, "avx512")
    with pytest.raises(TypeError, match="isa: expected an ISA name"):
        m.set_variant(0, "csr_spmv_gather", 1, 2)
    with pytest.raises(ValueError, match="isa: expected -1 or an ISA code in \\[0, 1\\]"):
        m.run(0, 0, 1, 0, 0, 1, 1, 2)
    x, out = np.array([[1.0, 2.0]], np.float32), np.zeros((1, 2), np.float32)
    m.set_variant(0, "csr_spmv_scalar", 1, "generic")
    assert m.get_variant(0) == planner._by_name()["csr_spmv_scalar"]["id"]
    assert m.get_isa(0) == "generic" and m.get_isa(1) == "avx2"
    assert m.run(x.ctypes.data, out.ctypes.data, 1, 0, 0, 1)
    np.testing.assert_array_equal(out, x)  # the identity pattern


def test_wisdom_roundtrip_corrupt_and_foreign(fresh_planner, monkeypatch):
    path = fresh_planner / "wisdom.json"
    monkeypatch.setenv("SPARSEKIT_WISDOM", str(path))
    mat = sparsekit.CSRMatrix.from_dense(random_pruned(32, 128, 0.8, seed=9))
    p = planner.plan(mat, 1, threads=1)
    data = json.loads(path.read_text())
    assert data["format"] == "sparsekit-wisdom" and data["plans"][p.key]["variant"] == p.variant
    planner.clear()
    q = planner.plan(mat, 1, threads=1)
    assert q.source == "wisdom" and q.variant == p.variant
    # corrupt file: warning, ignored, left alone
    path.write_text("{not json")
    planner.clear()
    with pytest.warns(RuntimeWarning, match="SPARSEKIT_WISDOM: ignoring"):
        r = planner.plan(mat, 1, threads=1)
    assert r.source == "measured" and path.read_text() == "{not json"
    # foreign machine: warning, ignored, not overwritten
    data["cpu"] = "Some Other CPU (family 1 model 1)"
    path.write_text(json.dumps(data))
    planner.clear()
    with pytest.warns(RuntimeWarning, match="written on 'Some Other CPU"):
        planner.plan(mat, 1, threads=1)
    assert json.loads(path.read_text())["cpu"].startswith("Some Other CPU")
    # user cache dir form
    monkeypatch.setenv("SPARSEKIT_WISDOM", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(fresh_planner / "cache"))
    assert planner.wisdom_path() == os.path.join(str(fresh_planner / "cache"), "sparsekit",
                                                 "wisdom.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        planner.clear()
        planner.plan(mat, 2, threads=1)
    assert os.path.exists(planner.wisdom_path())


def test_plan_argument_errors(fresh_planner):
    mat = sparsekit.CSRMatrix.from_dense(random_pruned(4, 8, 0.5, seed=1))
    with pytest.raises(ValueError, match="n: expected a positive int, got 0"):
        planner.plan(mat, 0)
    with pytest.raises(ValueError, match="threads: expected a positive int, got -1"):
        planner.plan(mat, 1, threads=-1)


def test_docs_quote_the_variants_table():
    """docs/kernels.md quotes csrc/cpu/variants.h (the one table of variants) row for row."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/kernels.md").read_text()
    section = text.split("## Variants", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in rows]
    expected = []
    for v in VARIANTS:
        n = f"{v['n_min']}+" if v["n_max"] is None else f"{v['n_min']}-{v['n_max']}"
        expected.append([v["name"], v["family"] or "any", n, ", ".join(v["isas"]),
                         v["dtypes"].replace(",", ", "), v["summary"]])
    table = "\n".join("| `" + r[0] + "` | " + " | ".join(r[1:]) + " |" for r in expected)
    assert documented == expected, f"docs/kernels.md variants table is stale, expected:\n{table}"


class _ScriptedBound:
    """A stand-in bound matrix whose calls take scripted times on a fake clock."""

    def __init__(self, durations: dict[int, list[float]], clock: list[float]):
        self.durations, self.clock, self.calls = durations, clock, {v: 0 for v in durations}

    def run(self, xp, op, n, xd, bias, threads, vid, isa=-1):
        seq = self.durations[vid]
        self.clock[0] += seq[min(self.calls[vid], len(seq) - 1)]
        self.calls[vid] += 1
        return True

    def evict(self):
        pass


def test_planner_times_the_contenders_further(monkeypatch):
    """After two rounds only candidates within 10% of the fastest are timed again, to at least
    _CONTENDER_ROUNDS calls each even with the budget spent; a contender's later, faster
    samples can then decide (here b, whose first samples were unlucky)."""
    clock = [0.0]
    monkeypatch.setattr(planner.time, "perf_counter", lambda: clock[0])
    monkeypatch.setenv("SPARSEKIT_PLAN_BUDGET_MS", "1")
    monkeypatch.setenv("SPARSEKIT_PLAN_CACHE", "cold")
    # untimed first call, then: a steady 10 ms; b 10.8 ms twice then 9 ms; c 11.5 ms; d 30 ms
    durations = {0: [0.010], 1: [0.0108, 0.0108, 0.0108, 0.009], 2: [0.0115], 3: [0.030]}
    bound = _ScriptedBound(durations, clock)
    names = {"a": (0, -1), "b": (1, -1), "c": (2, -1), "d": (3, -1)}
    winner, times, _ = planner._measure(bound, 8, 4, 1, 1, list(names), names)
    assert winner == "b" and times["b"] == pytest.approx(9000.0), times
    rounds = planner._CONTENDER_ROUNDS
    assert bound.calls[0] == bound.calls[1] == 1 + rounds  # contenders: untimed + rounds
    assert bound.calls[2] == 1 + 2  # 15% slower than a: dropped after two rounds
    assert bound.calls[3] == 1 + 2


def test_planner_keeps_timing_the_built_in_choice(monkeypatch):
    """The built-in choice stays among the contenders even when its first two samples were more
    than 10% off the fastest (a burst of memory traffic slowing the memory-bound default): its
    later samples decide. Dropped, it would lose for good once two other contenders keep the
    race going past the head-to-head confirmation's reach."""
    clock = [0.0]
    monkeypatch.setattr(planner.time, "perf_counter", lambda: clock[0])
    monkeypatch.setenv("SPARSEKIT_PLAN_BUDGET_MS", "1")
    monkeypatch.setenv("SPARSEKIT_PLAN_CACHE", "cold")
    default = planner._INCUMBENTS[0]
    # untimed first call, then: the default 5.6 ms twice, then its real 3.9 ms; two steady
    # contenders at 5.0 and 5.05 ms; "slow" 5.8 ms (16% off the lead: dropped)
    durations = {0: [0.0056, 0.0056, 0.0056, 0.0039], 1: [0.005], 2: [0.00505], 3: [0.0058]}
    names = {default: (0, -1), "bitmap": (1, -1), "other": (2, -1), "slow": (3, -1)}
    bound = _ScriptedBound(durations, clock)
    winner, times, _ = planner._measure(bound, 8, 4, 1, 1, list(names), names)
    assert winner == default and times[default] == pytest.approx(3900.0), times
    assert bound.calls[0] > 1 + 2 and bound.calls[3] == 1 + 2
    # without that rule the default is dropped after two rounds and never timed again
    monkeypatch.setattr(planner, "_INCUMBENTS", ())
    bound = _ScriptedBound(durations, clock)
    winner, _, _ = planner._measure(bound, 8, 4, 1, 1, list(names), names)
    assert winner == "bitmap" and bound.calls[0] == 1 + 2


@pytest.mark.parametrize("confirm", [True, False])
def test_planner_confirms_the_two_fastest_head_to_head(monkeypatch, confirm):
    """Long calls leave the budget two samples per candidate; two slow samples of the better
    variant must not decide: the two fastest get more alternating calls."""
    clock = [0.0]
    monkeypatch.setattr(planner.time, "perf_counter", lambda: clock[0])
    monkeypatch.setenv("SPARSEKIT_PLAN_CACHE", "cold")
    if not confirm:
        monkeypatch.setattr(planner, "_CONFIRM_ROUNDS", 0)
    # b: first call untimed, next two slow (21.5 ms), then its real 13 ms; a steady 19.3 ms
    durations = {0: [0.0193], 1: [0.0215, 0.0215, 0.0215, 0.013], 2: [0.030]}
    bound = _ScriptedBound(durations, clock)
    winner, times, _ = planner._measure(bound, 8, 4, 1, 1, ["a", "b", "c"],
                                        {"a": (0, -1), "b": (1, -1), "c": (2, -1)})
    assert winner == ("b" if confirm else "a"), times
    assert bound.calls[2] == 3  # the slowest is not re-timed
    if confirm:
        assert times["b"] == pytest.approx(13000.0)
        assert bound.calls[0] == 3 + planner._CONFIRM_ROUNDS
