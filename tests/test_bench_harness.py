"""Tests of the shared benchmark harness (sparsekit.bench.harness)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsekit.bench import harness as h


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_contenders_match_float64_reference_and_rotate(dtype, with_bias):
    gen = torch.Generator().manual_seed(7 + int(with_bias))
    m, k, n_copies = 67, 130, 3  # odd sizes: no contender may rely on nice multiples
    ws = [torch.randn(m, k, generator=gen).to(dtype) for _ in range(n_copies)]
    b = torch.randn(m, generator=gen).to(dtype) if with_bias else None
    cont = h.dense_contenders(ws, b, batch_size=5)
    assert "F.linear" in cont and "torch.matmul" in cont
    if dtype == torch.float32:
        # fp32 runs everywhere these builds run; all formulations must be offered
        assert {"onednn", "numpy"} <= set(cont), cont.skipped
    else:
        assert "numpy" in cont.skipped
    # every name is either offered or explained
    assert set(cont) | set(cont.skipped) >= {"F.linear", "torch.matmul", "onednn", "numpy"}
    for batch in (1, 5, 9):
        x = torch.randn(batch, k, generator=gen).to(dtype)
        for i in range(n_copies + 1):  # i == n_copies wraps to copy 0
            ref = _ref(x, ws[i % n_copies], b)
            for name, fn in cont.items():
                y = fn(x, i)
                assert y.shape == (batch, m), name
                ok, err = h.check_close(y, ref, dtype, k)
                assert ok, f"{name} copy {i}: rel err {err}"


def test_dense_contenders_rejects_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        h.dense_contenders([])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        h.dense_contenders([torch.randn(4, 5), torch.randn(4, 6)])
    with pytest.raises(ValueError, match="bias"):
        h.dense_contenders([torch.randn(4, 5)], torch.randn(3))
    with pytest.raises(ValueError, match="batch_size"):
        h.dense_contenders([torch.randn(4, 5)], batch_size=0)


def test_check_close_flags_wrong_results():
    ref = torch.randn(4, 8, dtype=torch.float64)
    assert h.check_close(ref.float(), ref, torch.float32, 8)[0]
    bad = ref.clone()
    bad[2, 3] += 1e-2 * ref.abs().max()
    assert not h.check_close(bad, ref, torch.float32, 8)[0]
    nan = ref.clone()
    nan[0, 0] = math.nan
    assert not h.check_close(nan, ref, torch.float32, 8)[0]
    assert not h.check_close(ref[:, :7], ref, torch.float32, 8)[0]


def test_others_loaded_discounts_own_threads():
    # the run's own 2 threads raise the end load by up to 2: not other work
    assert not h.others_loaded((0.2, 0.3, 0.4), (2.3, 1.0, 0.5), own_threads=2)
    assert h.others_loaded((0.2, 0.3, 0.4), (2.6, 1.0, 0.5), own_threads=2)
    assert h.others_loaded((0.8, 0.3, 0.4), (0.1, 1.0, 0.5), own_threads=2)  # busy before
    assert not h.others_loaded((0.5, 0, 0), (0.5, 0, 0), own_threads=0)  # threshold exclusive
    assert h.others_loaded((0.5, 0, 0), (0.5, 0, 0), own_threads=0, threshold=0.4)


def test_rotation_count_arithmetic():
    llc = 260 * 2**20
    # 64 MiB weights: 2 * 260 / 64 = 8.125 -> 9 copies (576 MiB > 520 MiB, 8 copies would not)
    assert h.rotation_count(64 * 2**20, llc=llc) == 9
    # exactly 2 x LLC must be *exceeded*, so equality needs one more copy
    assert h.rotation_count(llc, llc=llc) == 3
    assert h.rotation_count(2 * llc, llc=llc) == 2
    assert h.rotation_count(2 * llc + 1, llc=llc) == 1
    assert h.rotation_count(10 * llc, llc=llc) == 1
    assert h.rotation_count(1000, factor=1.0, llc=10_000) == 11
    for nbytes in (1, 4096, 3 * 2**20, 123_457_000):
        c = h.rotation_count(nbytes, llc=llc)
        assert c * nbytes > 2 * llc and (c - 1) * nbytes <= 2 * llc
    # default LLC comes from sysfs
    assert h.rotation_count(1 << 20) == h.rotation_count(1 << 20, llc=h.llc_bytes())
    for bad in (0, -5, 1.5, None):
        with pytest.raises(ValueError, match="bytes_per_copy"):
            h.rotation_count(bad, llc=llc)
    with pytest.raises(ValueError, match="factor"):
        h.rotation_count(10, factor=0, llc=llc)


def test_llc_bytes_parses_sysfs(tmp_path):
    for idx, (level, size, kind) in enumerate(
        [(1, "48K", "Data"), (1, "32K", "Instruction"), (2, "2048K", "Unified"),
         (3, "266240K", "Unified")]
    ):
        d = tmp_path / f"index{idx}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
        (d / "type").write_text(f"{kind}\n")
    assert h.llc_bytes(tmp_path) == 266240 * 1024
    # an instruction cache larger than everything else is ignored
    big = tmp_path / "index9"
    big.mkdir()
    (big / "size").write_text("1G\n")
    (big / "type").write_text("Instruction\n")
    assert h.llc_bytes(tmp_path) == 266240 * 1024
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert h.llc_bytes(empty) == 32 * 2**20
    assert h.llc_bytes() > 0


def test_measure_counts_and_ordered_stats():
    calls: list[int] = []
    st = h.measure(lambda i: calls.append(i), warmup=4, min_reps=25, min_time_s=0.0)
    assert st.reps == 25
    assert calls == list(range(4 + 25))  # warm-up indices first, then a running index
    assert 0 < st.min_s <= st.p10_s <= st.median_s <= st.p90_s
    assert st.min_s <= st.mean_s

    # min_time_s keeps going past min_reps until the timed total reaches it
    import time

    st = h.measure(lambda i: time.sleep(0.003), warmup=0, min_reps=2, min_time_s=0.03)
    assert st.reps >= 2 and st.mean_s * st.reps >= 0.03
    assert st.reps <= 11  # and stops once it is reached (each call sleeps >= 3 ms)
    assert st.min_s >= 0.003  # the clock measures at least the sleep
    # max_reps caps the loop even when min_time_s is not reached
    st = h.measure(lambda i: None, warmup=0, min_reps=3, max_reps=7, min_time_s=100.0)
    assert st.reps == 7
    # max_time_s stops after min_reps
    st = h.measure(lambda i: time.sleep(0.002), warmup=0, min_reps=3, min_time_s=100.0,
                   max_time_s=0.01)
    assert 3 <= st.reps <= 10
    synced: list[int] = []
    h.measure(lambda i: None, warmup=1, min_reps=5, min_time_s=0, sync=lambda: synced.append(1))
    assert len(synced) == 1 + 5  # once after warm-up, once per timed call
    d = st.to_dict()
    assert set(d) >= {"median_s", "p10_s", "p90_s", "reps"}


def test_measure_rejects_bad_arguments():
    with pytest.raises(TypeError, match="fn"):
        h.measure(42)
    with pytest.raises(ValueError, match="min_reps"):
        h.measure(lambda i: None, min_reps=0)
    with pytest.raises(ValueError, match="max_reps"):
        h.measure(lambda i: None, min_reps=5, max_reps=2)
    with pytest.raises(ValueError, match="warmup"):
        h.measure(lambda i: None, warmup=-1)
    with pytest.raises(ValueError, match="min_time_s"):
        h.measure(lambda i: None, min_time_s=-1)


def test_stats_percentiles_and_best_dense():
    st = h.Stats.from_samples([float(v) for v in range(1, 102)])  # 1..101
    assert st.median_s == 51 and st.p10_s == 11 and st.p90_s == 91 and st.reps == 101
    a = h.Stats(2.0, 1.0, 3.0, 10)
    b = h.Stats(1.5, 1.0, 3.0, 10)
    assert h.best_dense({"x": a, "y": b, "z": None}) == ("y", b)
    with pytest.raises(ValueError, match="stats_by_name"):
        h.best_dense({"z": None})
    with pytest.raises(ValueError, match="samples_s"):
        h.Stats.from_samples([])


def test_threads_for_all_sets_and_restores():
    before = torch.get_num_threads()
    with h.threads_for_all(1) as n:
        assert n == 1
        assert torch.get_num_threads() == 1
        from threadpoolctl import threadpool_info

        blas = [d for d in threadpool_info() if d["user_api"] == "blas"]
        assert all(d["num_threads"] == 1 for d in blas)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n:"):
        with h.threads_for_all(0):
            pass


def test_machine_info_keys_and_json():
    info = h.machine_info(num_threads=1, bandwidth=False)
    for key in ("cpu_model", "isa_flags", "cores_logical", "affinity", "num_threads",
                "llc_bytes", "copy_bandwidth_gbs", "load_avg", "os", "python", "versions",
                "sparsekit", "blas", "env", "gpu", "date_utc", "git"):
        assert key in info, key
    assert info["num_threads"] == 1
    assert info["llc_bytes"] == h.llc_bytes()
    assert set(info["versions"]) >= {"torch", "numpy", "scipy", "numba"}
    assert set(info["sparsekit"]) >= {"version", "backends", "cpp_isa"}
    assert info["date_utc"].endswith("Z")
    assert info["transparent_hugepage"] in (None, "always", "madvise", "never")
    json.dumps(info)  # must be serialisable as-is
    # bandwidth on a small buffer (cached per arguments) is a positive finite number
    bw = h.copy_bandwidth_gbs(nbytes=8 * 2**20, num_threads=1)
    assert math.isfinite(bw) and bw > 0
    with pytest.raises(ValueError, match="nbytes"):
        h.copy_bandwidth_gbs(nbytes=0)


def test_machine_info_records_hugepage_settings(monkeypatch):
    """The huge page settings change what a streaming kernel measures: the kernel's mode is
    read from its bracketed choice, and PyTorch's allocator switch is kept with the env."""
    from sparsekit.bench import machine

    assert machine.bracketed_choice("always [madvise] never\n") == "madvise"
    assert machine.bracketed_choice("[always] madvise never") == "always"
    assert machine.bracketed_choice("no brackets") is None
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert h.machine_info(num_threads=1, bandwidth=False)["env"]["THP_MEM_ALLOC_ENABLE"] == "1"


def test_dense_contenders_names_subset():
    ws = [torch.randn(8, 16)]
    cont = h.dense_contenders(ws, names=("onednn", "numpy"))
    assert set(cont) <= {"onednn", "numpy"} and "numpy" in cont
    assert "F.linear" not in cont and "torch.matmul" not in cont
    with pytest.raises(ValueError, match="names"):
        h.dense_contenders(ws, names=("cublas",))


def test_bench_cpu_merges_processes_by_median_record():
    """``bench_cpu --processes``: each target and sweep point takes the whole record of the
    process with the median value (its time and variant stay consistent with that value), keeps
    every process's value, and judges pass/miss on the median."""
    import random

    from benchmarks import bench_cpu

    rng = random.Random(11)
    values = [[rng.uniform(0.5, 1.5) for _ in range(3)] for _ in range(5)]  # 5 processes
    runs = []
    for p, vals in enumerate(values):
        tg = [{"id": f"t{i}", "value": v, "need": 1.0, "pass": v >= 1.0, "variant": f"v{p}",
               "sparse_ms": 10.0 * p + i} for i, v in enumerate(vals)]
        sw = [{"N": 1, "sparsity": 0.9, "speedup_vs_best": vals[0] * 2, "sparse_ms": float(p)}]
        bn1 = [{"block": "4x4", "speedup_vs_best": vals[1] * 3, "variant": f"b{p}"}]
        bsm = [{"block": "2x2", "N": 8, "speedup_vs_best": vals[2] * 4, "variant": f"s{p}"}]
        runs.append({"targets": tg, "sweep": sw, "bsr_n1": bn1, "bsr_small_batch": bsm,
                     "plans": {"p": p}, "dense": {}})
    merged = bench_cpu.merge_processes(runs)
    for i, t in enumerate(merged["targets"]):
        col = [values[p][i] for p in range(5)]
        want = sorted(col)[2]
        p_med = col.index(want)
        assert t["value"] == want and t["per_process"] == col
        assert t["variant"] == f"v{p_med}" and t["sparse_ms"] == 10.0 * p_med + i
        assert t["pass"] == (want >= 1.0)
    row = merged["sweep"][0]
    want0 = sorted(values[p][0] for p in range(5))[2]
    assert row["speedup_vs_best"] == want0 * 2
    col1 = [values[p][1] for p in range(5)]
    b = merged["bsr_n1"][0]
    assert b["speedup_vs_best"] == sorted(col1)[2] * 3
    assert b["variant"] == f"b{col1.index(sorted(col1)[2])}"
    assert b["per_process_speedup_vs_best"] == [v * 3 for v in col1]
    col2 = [values[p][2] for p in range(5)]
    b = merged["bsr_small_batch"][0]
    assert b["speedup_vs_best"] == sorted(col2)[2] * 4 and b["N"] == 8
    assert b["variant"] == f"s{col2.index(sorted(col2)[2])}"
    assert len(merged["plans"]) == 5
    runs[3]["targets"][1]["id"] = "other"
    with pytest.raises(RuntimeError, match="disagree on target 1"):
        bench_cpu.merge_processes(runs)


def test_argv_without_drops_option_and_its_value():
    argv = ["--quick", "--processes", "3", "--threads", "2", "--processes=4", "--processesx"]
    assert h.argv_without(argv, "--processes") == ["--quick", "--threads", "2", "--processesx"]
    assert h.argv_without([], "--out") == []


def _busy(seconds: float) -> None:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_bench_cpu_carries_a_contender_timed_apart_into_the_rounds(monkeypatch):
    """``bench_cpu``: numpy is timed alone against the fastest dense path of the rounds (also
    alone) and its in-round time is that ratio times the reference's in-round stats."""
    from benchmarks import bench_cpu

    monkeypatch.setattr(bench_cpu, "BRACKET_SETTLE_S", 0.0)
    cache = bench_cpu.Cache(0.02, log=lambda *a: None)
    slow, fast = 0.004, 0.002  # numpy alone takes 2x the reference alone
    fns = {"numpy": lambda i: _busy(slow), "torch.matmul": lambda i: _busy(fast),
           "F.linear": lambda i: _busy(3 * fast)}
    rounds = {"torch.matmul": h.Stats(median_s=5.0, p10_s=4.0, p90_s=6.0, reps=7, min_s=3.0,
                                      mean_s=5.5),
              "F.linear": h.Stats(median_s=9.0, p10_s=9.0, p90_s=9.0, reps=7)}
    out = cache.bracket_alone({"numpy": fns["numpy"]}, rounds, fns)
    b = out["numpy"]
    assert b["reference"] == "torch.matmul"
    assert len(b["block_ratios"]) == bench_cpu.BRACKET_BLOCKS
    assert b["ratio"] == pytest.approx(slow / fast, rel=0.15)
    assert b["alone_s"] == pytest.approx(slow, rel=0.15)
    st = bench_cpu.scaled_stats(rounds[b["reference"]], b["ratio"])
    assert st.median_s == pytest.approx(5.0 * b["ratio"]) and st.reps == 7
    assert st.p10_s == pytest.approx(4.0 * b["ratio"]) and st.min_s == pytest.approx(3 * b["ratio"])


def test_bench_int8_races_every_fp32_dense_contender(monkeypatch, tmp_path):
    """``bench_int8``: the fp32 baseline is the fastest of all dense contenders, numpy's BLAS
    carried into the rounds by its ratio to the fastest in-round path (timed alone), and every
    ratio of a row is computed from that row's times."""
    import sys

    from benchmarks import bench_int8

    monkeypatch.setattr(bench_int8, "BRACKET_SETTLE_S", 0.0)
    monkeypatch.setenv("SPARSEKIT_NUM_THREADS", "1")  # main() sets it; restored afterwards
    out = tmp_path / "int8.json"
    monkeypatch.setattr(sys, "argv", ["bench_int8", "--quick", "--resident", "--shapes", "48x80",
                                      "--reps", "2", "--threads", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        bench_int8.main()
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["results"]
    assert [r["sparsity"] for r in rows] == [0.9, 0.7]
    for r in rows:
        t = r["time_s"]
        dense = {k: v for k, v in t.items() if k.startswith("dense_fp32_")}
        assert {"dense_fp32_F.linear", "dense_fp32_torch.matmul"} <= set(dense), dense
        assert r["best_fp32_dense"] == min(dense, key=dense.__getitem__)
        if "dense_fp32_numpy" in dense:
            b = r["bracketed"]["dense_fp32_numpy"]
            assert b["reference"] in dense and len(b["block_ratios"]) == bench_int8.BRACKET_BLOCKS
            assert dense["dense_fp32_numpy"] == pytest.approx(b["ratio"] * t[b["reference"]])
        assert r["i8_d8_vs_best_fp32_dense"] == pytest.approx(
            dense[r["best_fp32_dense"]] / t["sparse_i8_d8"])
        assert set(r["kernel_variants"]) == {k for k in t if k.startswith("sparse_")}
