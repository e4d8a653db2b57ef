"""Thread-count control: env var, set/get, context manager, affinity/cgroup parsing, and
bit-identical results across thread counts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import cpu_backends
from reference import random_block_pruned, random_pruned, random_x

import sparsekit
from sparsekit import BSRMatrix, CSRMatrix
from sparsekit import threads as th

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    th._reset_default()
    yield
    th._reset_default()


# --------------------------------------------------------------------------- parsers
@pytest.mark.parametrize("text,expected", [
    ("max 100000\n", None),
    ("200000 100000\n", 2.0),
    ("150000 100000", 1.5),
    ("50000 100000", 0.5),
    ("", None),
    ("garbage", None),
    ("-1 100000", None),
])
def test_parse_cgroup_v2(text, expected):
    assert th.parse_cgroup_v2_cpu_max(text) == expected


@pytest.mark.parametrize("quota,period,expected", [
    ("-1\n", "100000\n", None),
    ("300000\n", "100000\n", 3.0),
    ("25000", "100000", 0.25),
    ("x", "100000", None),
    ("100000", "0", None),
])
def test_parse_cgroup_v1(quota, period, expected):
    assert th.parse_cgroup_v1_quota(quota, period) == expected


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_cgroup_v2_tree(tmp_path):
    """Limit found in the process's own cgroup and in a parent; the smaller wins."""
    root = tmp_path / "cg"
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "cpu.max", "400000 100000\n")
    _write(root / "kubepods" / "pod1" / "cpu.max", "250000 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    assert th.cgroup_cpu_limit(str(root), str(proc)) == 2.5
    _write(root / "kubepods" / "cpu.max", "100000 100000\n")  # parent tighter
    assert th.cgroup_cpu_limit(str(root), str(proc)) == 1.0


def test_cgroup_v1_tree(tmp_path):
    root = tmp_path / "cg"
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert th.cgroup_cpu_limit(str(root), str(proc)) == 3.0


def test_cgroup_unlimited_or_missing(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    assert th.cgroup_cpu_limit(str(tmp_path / "nothing"), str(proc)) is None
    assert th.cgroup_cpu_limit(str(tmp_path / "nothing"), str(tmp_path / "nofile")) is None


def test_default_respects_affinity_and_quota(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "affinity_cpu_count", lambda: 8)
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: 2.5)
    assert th.default_num_threads() == 3  # ceil(2.5), below the 8 allowed CPUs
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: None)
    assert th.default_num_threads() == 8
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: 0.3)
    assert th.default_num_threads() == 1
    monkeypatch.setattr(th, "affinity_cpu_count", lambda: 2)
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: 16.0)
    assert th.default_num_threads() == 2


@pytest.mark.parametrize("text,expected", [
    ("1", 1), ("3", 3), (" 4 ", 4), ("4,2", 4), ("8, 1", 8), ("", None), ("0", None),
    ("-2", None), ("two", None), ("2.5", None), (",4", None),
])
def test_parse_omp_num_threads(text, expected):
    assert th.parse_omp_num_threads(text) == expected


def test_default_precedence(monkeypatch):
    # SPARSEKIT_NUM_THREADS > OMP_NUM_THREADS > min(affinity, cgroup quota)
    monkeypatch.setattr(th, "affinity_cpu_count", lambda: 8)
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: 6.0)
    assert th.default_num_threads({}) == 6
    assert th.thread_budget_source({}) == "cgroup"
    assert th.default_num_threads({"OMP_NUM_THREADS": "1"}) == 1
    assert th.thread_budget_source({"OMP_NUM_THREADS": "1"}) == "OMP_NUM_THREADS"
    assert th.default_num_threads({"OMP_NUM_THREADS": "3,1"}) == 3
    both = {"OMP_NUM_THREADS": "1", "SPARSEKIT_NUM_THREADS": "5"}
    assert th.default_num_threads(both) == 5
    assert th.thread_budget_source(both) == "SPARSEKIT_NUM_THREADS"
    # an explicit request above the usable CPUs is honoured as given
    assert th.default_num_threads({"OMP_NUM_THREADS": "16"}) == 16
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: None)
    assert th.thread_budget_source({}) == "affinity"
    assert th.default_num_threads({"OMP_NUM_THREADS": ""}) == 8


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "2.5"])
def test_invalid_omp_num_threads_warns_and_is_ignored(monkeypatch, bad):
    monkeypatch.setattr(th, "affinity_cpu_count", lambda: 4)
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: None)
    with pytest.warns(RuntimeWarning, match=f"OMP_NUM_THREADS: expected a positive integer.*"
                                            f"got '{bad}'; ignoring it"):
        assert th.default_num_threads({"OMP_NUM_THREADS": bad}) == 4
    # SPARSEKIT_NUM_THREADS decides first: no warning about OMP_NUM_THREADS then
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert th.default_num_threads({"OMP_NUM_THREADS": bad,
                                       "SPARSEKIT_NUM_THREADS": "2"}) == 2


def test_invalid_sparsekit_env_raises_even_with_omp(monkeypatch):
    with pytest.raises(ValueError, match="SPARSEKIT_NUM_THREADS: expected a positive integer, "
                                         "got '-3'"):
        th.default_num_threads({"SPARSEKIT_NUM_THREADS": "-3", "OMP_NUM_THREADS": "2"})


def test_omp_env_in_fresh_process():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SPARSEKIT_NUM_THREADS", None)
    code = ("import sparsekit, sparsekit.threads as t; "
            "print(sparsekit.get_num_threads(), t.thread_budget_source())")
    out = subprocess.run([sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["1", "OMP_NUM_THREADS"]
    env["SPARSEKIT_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["3", "SPARSEKIT_NUM_THREADS"]


def test_affinity_count_matches_os():
    assert th.affinity_cpu_count() == len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- API
def test_env_var(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_NUM_THREADS", "3")
    th._reset_default()
    assert sparsekit.get_num_threads() == 3
    monkeypatch.setenv("SPARSEKIT_NUM_THREADS", "zero")
    th._reset_default()
    with pytest.raises(ValueError, match="SPARSEKIT_NUM_THREADS: expected a positive integer, "
                                         "got 'zero'"):
        sparsekit.get_num_threads()
    monkeypatch.setenv("SPARSEKIT_NUM_THREADS", "0")
    th._reset_default()
    with pytest.raises(ValueError, match="got '0'"):
        sparsekit.get_num_threads()


def test_env_var_in_fresh_process():
    env = dict(os.environ, SPARSEKIT_NUM_THREADS="5", PYTHONPATH=str(ROOT))
    code = "import sparsekit; print(sparsekit.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "5"


def test_numba_pool_start_keeps_torch_thread_count():
    # Numba's OpenMP pool start used to reset torch's intra-op thread count (shared OpenMP
    # setting); it must run in a fresh process, before numba's pool exists.
    code = (
        "import torch, sparsekit\n"
        "torch.set_num_threads(1)\n"
        "w = torch.randn(64, 64) * (torch.rand(64, 64) > 0.5)\n"
        "sparsekit.linear(torch.randn(4, 64), sparsekit.CSRMatrix.from_dense(w), "
        "backend='numba')\n"
        "print(torch.get_num_threads())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_set_get_and_errors(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_NUM_THREADS", raising=False)
    th._reset_default()
    assert sparsekit.get_num_threads() == th.default_num_threads()
    sparsekit.set_num_threads(1)
    assert sparsekit.get_num_threads() == 1
    sparsekit.set_num_threads(7)
    assert sparsekit.get_num_threads() == 7
    for bad in (0, -2, 1.5, "2", None, True):
        with pytest.raises(ValueError, match=f"n: expected a positive int number of threads, "
                                             f"got {bad!r}"):
            sparsekit.set_num_threads(bad)
    assert sparsekit.get_num_threads() == 7


def test_context_manager_is_thread_local_and_nests():
    sparsekit.set_num_threads(4)
    seen = {}

    def other():
        seen["other"] = sparsekit.get_num_threads()

    with th.threads(2):
        assert sparsekit.get_num_threads() == 2
        with th.threads(1):
            assert sparsekit.get_num_threads() == 1
        assert sparsekit.get_num_threads() == 2
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["other"] == 4  # other threads see the process-wide value
    assert sparsekit.get_num_threads() == 4
    with pytest.raises(ValueError, match="n: expected a positive int"):
        with th.threads(0):
            pass


def test_setting_while_other_threads_compute():
    """Changing the count from one thread while others run kernels neither crashes nor
    changes results."""
    w = random_pruned(257, 1025, 0.9, seed=3)
    mat = CSRMatrix.from_dense(w)
    x = random_x((4, 1025), seed=4)
    expected = {be: sparsekit.linear(x, mat, backend=be) for be in cpu_backends()}
    stop = threading.Event()
    errors: list[BaseException] = []

    def compute(be):
        try:
            for _ in range(15):
                torch.testing.assert_close(sparsekit.linear(x, mat, backend=be), expected[be],
                                           rtol=0, atol=1e-5)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def flip():
        n = 0
        while not stop.is_set():
            sparsekit.set_num_threads(1 + n % 2)
            n += 1

    f = threading.Thread(target=flip)
    f.start()
    ws = [threading.Thread(target=compute, args=(be,)) for be in cpu_backends() for _ in (0, 1)]
    for t in ws:
        t.start()
    for t in ws:
        t.join()
    stop.set()
    f.join()
    assert not errors, errors[0]


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("N", [1, 5])
def test_results_identical_across_thread_counts(backend, fmt, N):
    """Each output row is computed by one thread in a fixed order, so results are bitwise
    identical whatever the thread count."""
    M, K = 301, 777
    w = random_block_pruned(M, K, (4, 4), 0.7, seed=7, inner_sparsity=0.3)
    mat = CSRMatrix.from_dense(w) if fmt == "csr" else BSRMatrix.from_dense(w, (4, 4))
    x = random_x((N, K), seed=8)
    b = random_x((M,), seed=9)
    outs = []
    for n in (1, 2, 3, 4):
        with th.threads(n):
            outs.append(sparsekit.linear(x, mat, b, backend=backend))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
def test_fork_after_use(backend):
    """A child forked after the parent ran parallel kernels still computes the right answer
    (GNU OpenMP cannot be reused after fork: the numba backend falls back to serial kernels)
    and neither hangs nor aborts."""
    import time
    import warnings

    w = random_pruned(129, 257, 0.8, seed=13)
    mat = CSRMatrix.from_dense(w)
    x = random_x((3, 257), seed=14)
    with th.threads(2):
        expected = sparsekit.linear(x, mat, backend=backend)
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compute, report max abs diff through the pipe, exit hard
        code = 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with th.threads(2):
                    y = sparsekit.linear(x, mat, backend=backend)
            os.write(wfd, repr(float((y - expected).abs().max())).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"forked child using backend {backend!r} hung")
        time.sleep(0.05)
    msg = os.read(r, 100).decode()
    os.close(r)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, msg)
    assert float(msg) <= 1e-5
