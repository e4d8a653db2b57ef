"""sparsekit.timing: the one measurement method of sparsify tuning and the benchmarks."""

from __future__ import annotations

import pytest

from sparsekit import timing


def test_measure_interleaved_round_robin_and_indices():
    calls: list[tuple[str, int]] = []
    fns = {k: (lambda i, k=k: calls.append((k, i))) for k in ("a", "b", "c")}
    st = timing.measure_interleaved(fns, warmup=2, min_reps=5, min_time_s=0.0, max_reps=5)
    assert set(st) == {"a", "b", "c"} and all(s.reps == 5 for s in st.values())
    timed = calls[6:]  # 3 candidates x 2 warm-up calls first
    assert [k for k, _ in timed] == ["a", "b", "c"] * 5  # one call of each per round
    assert [i for k, i in timed if k == "b"] == [2, 3, 4, 5, 6]  # indices continue after warm-up
    assert all(s.p10_s <= s.median_s <= s.p90_s for s in st.values())
    with pytest.raises(ValueError, match="fns: expected at least one candidate"):
        timing.measure_interleaved({})


def test_rotation_count_bounds():
    assert timing.rotation_count(1000, factor=2.0, llc=10_000) == 21
    assert timing.rotation_count(1000, factor=2.0, llc=10_000, max_copies=8) == 8
    assert timing.rotation_count(10**9, llc=10_000) == 1
    with pytest.raises(ValueError, match="bytes_per_copy: expected a positive int, got 0"):
        timing.rotation_count(0)


def test_sync_for():
    assert timing.sync_for("cpu") is None
    assert callable(timing.sync_for("cuda"))


def test_measure_alternating_blocks_settle_and_indices():
    calls: list[tuple[str, int]] = []
    slept: list[float] = []
    fns = {k: (lambda i, k=k: calls.append((k, i))) for k in ("a", "b")}
    out = timing.measure_alternating(fns, blocks=3, settle_s=0.25, sleep=slept.append,
                                     warmup=1, min_reps=2, max_reps=2, min_time_s=0.0)
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3}
    assert all(s.reps == 2 for v in out.values() for s in v)
    # blocks alternate a, b, a, b, ... (warm-up + timed calls each), one idle gap before each
    assert [k for k, _ in calls] == (["a"] * 3 + ["b"] * 3) * 3
    assert slept == [0.25] * 6
    # a candidate's index keeps counting across its blocks (rotating copies keep cycling)
    assert [i for k, i in calls if k == "b"] == list(range(9))
    with pytest.raises(ValueError, match="fns: expected at least one candidate"):
        timing.measure_alternating({})
    with pytest.raises(ValueError, match="blocks: expected an int >= 1, got 0"):
        timing.measure_alternating(fns, blocks=0)
    with pytest.raises(ValueError, match="settle_s: expected a number >= 0, got -1"):
        timing.measure_alternating(fns, settle_s=-1)
