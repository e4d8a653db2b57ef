"""Concurrency guarantees for serving: thread safety, determinism, GIL release.

* 16 Python threads x 200 calls on one shared SparseLinear (CSR/BSR, fp32/bf16) and on one
  shared sparsified model: every output is bit-identical to the serial result computed with the
  same thread-count setting (and the serial result matches a float64 dense reference).
* ``set_num_threads`` called concurrently with inference: results do not depend on the thread
  count, and every concurrent output equals the serial one.
* The kernels release the GIL: a pure-Python thread completes a fixed amount of work while a
  single long kernel call is still running (see ``test_kernel_releases_gil`` for why this is
  not a timing race).
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

import sparsekit
from sparsekit.nn import SparseLinear

N_THREADS = 16
N_CALLS = 200


@pytest.fixture(autouse=True)
def _restore_threads():
    before = sparsekit.get_num_threads()
    yield
    sparsekit.set_num_threads(before)


def _cpu_backends() -> list[str]:
    return [b for b in ("cpp", "numba") if b in sparsekit.backends()]


def _pruned_linear(m: int, k: int, density: float, seed: int, blocks: bool = False):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, m)
    with torch.no_grad():
        w = torch.randn(m, k, generator=g)
        if blocks:  # zero whole 4x4 blocks so BSR is a natural fit
            keep = torch.rand(-(-m // 4), -(-k // 4), generator=g) < density
            mask = keep.repeat_interleave(4, 0).repeat_interleave(4, 1)[:m, :k]
        else:
            mask = torch.rand(m, k, generator=g) < density
        lin.weight.copy_(w * mask)
        lin.bias.copy_(torch.randn(m, generator=g))
    return lin


def _inputs(k: int, dtype: torch.dtype, seed: int) -> list[list[torch.Tensor]]:
    """Per-thread lists of random inputs with varying batch sizes (1..9)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_THREADS):
        sizes = torch.randint(1, 10, (N_CALLS,), generator=g).tolist()
        out.append([torch.randn(n, k, generator=g).to(dtype) for n in sizes])
    return out


def _run_concurrently(fn, inputs: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Call ``fn`` on every input, thread t handling inputs[t]; all threads start together."""
    results: list[list[torch.Tensor | None]] = [[None] * len(xs) for xs in inputs]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(inputs))

    def worker(t: int) -> None:
        try:
            barrier.wait(timeout=60)
            for i, x in enumerate(inputs[t]):
                results[t][i] = fn(x)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "worker threads did not finish"
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def _dense_reference(lin: torch.nn.Linear, x: torch.Tensor, value_dtype: torch.dtype):
    w = lin.weight.detach().to(value_dtype).to(torch.float64)
    return x.to(torch.float64) @ w.T + lin.bias.detach().to(torch.float64)


def _assert_bit_identical(got, want) -> None:
    bad = [
        (t, i)
        for t in range(len(want))
        for i in range(len(want[t]))
        if got[t][i].dtype != want[t][i].dtype or not torch.equal(got[t][i], want[t][i])
    ]
    total = sum(len(w) for w in want)
    assert not bad, f"{len(bad)} of {total} outputs differ from the reference, e.g. {bad[:5]}"


_slow = pytest.mark.slow
_CONFIGS = [
    # (backend, format, value dtype, sparsekit threads, marks). "auto" is cpp when built.
    # The default run covers CSR+BSR, fp32+bf16, cpp+numba and 1+2 kernel threads; the other
    # combinations are marked slow (each costs 2 x 3200 calls).
    ("auto", "csr", torch.float32, 2, ()),  # 16 Python threads x 2 OpenMP threads each
    ("auto", "bsr", torch.bfloat16, 1, ()),
    ("numba", "csr", torch.float32, 1, ()),
    ("auto", "csr", torch.float32, 1, _slow),
    ("auto", "bsr", torch.float32, 1, _slow),
    ("auto", "csr", torch.bfloat16, 1, _slow),
    ("numba", "bsr", torch.bfloat16, 1, _slow),
]


@pytest.mark.parametrize(
    "backend,fmt,dtype,nthreads",
    [
        pytest.param(*c[:4], id=f"{c[0]}-{c[1]}-{str(c[2])[6:]}-t{c[3]}", marks=c[4])
        for c in _CONFIGS
    ],
)
def test_sparse_linear_concurrent_bit_identical(backend, fmt, dtype, nthreads):
    if backend != "auto" and backend not in sparsekit.backends():
        pytest.skip(f"backend {backend} not available")
    sparsekit.set_num_threads(nthreads)
    m, k = 96, 160
    lin = _pruned_linear(m, k, 0.25, seed=11, blocks=(fmt == "bsr"))
    kw = {"blocksize": (4, 4)} if fmt == "bsr" else {}
    sl = SparseLinear.from_dense(lin, format=fmt, value_dtype=dtype, backend=backend, **kw)
    assert sl.format == fmt
    inputs = _inputs(k, dtype, seed=12)

    with torch.inference_mode():
        serial = [[sl(x) for x in xs] for xs in inputs]
        concurrent = _run_concurrently(sl, inputs)
    _assert_bit_identical(concurrent, serial)

    # The serial results themselves are right (independent float64 dense reference).
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for xs, ys in zip(inputs[:4], serial[:4]):
        for x, y in zip(xs, ys):
            ref = _dense_reference(lin, x, dtype)
            assert y.dtype == dtype and y.shape == (x.shape[0], m)
            torch.testing.assert_close(y.to(torch.float64), ref, rtol=tol, atol=tol)


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_((torch.rand_like(mod.weight) < 0.1).float())
    return model.eval()


def test_sparsified_model_concurrent_bit_identical():
    sparsekit.set_num_threads(1)
    model = _mlp(0)
    dense = _mlp(0)
    # tune=False: the layer choice must not depend on timings measured on a loaded machine.
    report = sparsekit.sparsify(model, tune=False, cache=False)
    n_sparse = sum(isinstance(mm, SparseLinear) for mm in model.modules())
    assert n_sparse == 3, report
    inputs = _inputs(128, torch.float32, seed=5)
    with torch.inference_mode():
        serial = [[model(x) for x in xs] for xs in inputs]
        concurrent = _run_concurrently(model, inputs)
        _assert_bit_identical(concurrent, serial)
        for xs, ys in zip(inputs[:2], serial[:2]):
            for x, y in zip(xs[:20], ys[:20]):
                ref = dense.double()(x.double())
                torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["auto", pytest.param("numba", marks=_slow)])
def test_set_num_threads_during_inference(backend):
    if backend != "auto" and backend not in sparsekit.backends():
        pytest.skip(f"backend {backend} not available")
    m, k = 200, 300
    lin = _pruned_linear(m, k, 0.3, seed=21)
    sl = SparseLinear.from_dense(lin, format="csr", backend=backend)
    inputs = [xs[:60] for xs in _inputs(k, torch.float32, seed=22)[:8]]  # 8 threads x 60
    counts = (1, 2, 3)
    with torch.inference_mode():
        refs = {}
        for n in counts:
            sparsekit.set_num_threads(n)
            refs[n] = [[sl(x) for x in xs] for xs in inputs]
        stop = threading.Event()
        flips = [0]

        def mutator() -> None:
            i = 0
            while not stop.is_set() and i < 1_000_000:
                sparsekit.set_num_threads(counts[i % len(counts)])
                assert sparsekit.get_num_threads() in counts
                i += 1
                flips[0] = i
                time.sleep(0.0005)

        mt = threading.Thread(target=mutator)
        mt.start()
        try:
            got = _run_concurrently(sl, inputs)
        finally:
            stop.set()
            mt.join(timeout=30)
    assert flips[0] > 1, "the mutator thread never ran"
    # Documented guarantee (README, "Serving"): results do not depend on the thread count, so
    # every concurrent output must equal the serial one whatever count it started with.
    for n in counts[1:]:
        _assert_bit_identical(refs[n], refs[counts[0]])
    _assert_bit_identical(got, refs[counts[0]])
    for xs, ys in zip(inputs[:1], refs[1][:1]):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(
                y.double(), _dense_reference(lin, x, torch.float32), rtol=1e-4, atol=1e-4
            )


def _python_work(n: int) -> int:
    acc = 0
    for i in range(n):
        acc += i & 7
    return acc


def _python_thread_progresses_during(call, work: int) -> bool:
    """True if a helper thread finishes ``work`` loop iterations while ``call()`` runs.

    The helper starts right before ``call`` is entered; the switch interval is lowered to
    0.1 ms so that, if ``call`` holds the GIL, the helper cannot borrow a long time slice in the
    few microseconds of Python code around the C call.
    """
    state = {"in_call": False, "finished_during_call": None}
    go = threading.Event()

    def helper() -> None:
        go.wait(timeout=60)
        _python_work(work)
        state["finished_during_call"] = state["in_call"]

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    th = threading.Thread(target=helper)
    th.start()
    try:
        state["in_call"] = True
        go.set()
        call()
        state["in_call"] = False
    finally:
        state["in_call"] = False
        sys.setswitchinterval(old_interval)
        th.join(timeout=120)
    return state["finished_during_call"] is True


def _calibrated_work() -> tuple[int, float]:
    # ~30-60 ms of pure Python: much longer than any scheduling hiccup of a loaded machine, so
    # a GIL-holding call cannot let the helper finish by being descheduled at the wrong time.
    work = 1_000_000
    _python_work(work)
    t0 = time.perf_counter()
    _python_work(work)
    return work, time.perf_counter() - t0


def test_gil_probe_detects_a_gil_holding_call():
    """Control: the probe must say "no progress" for C code that keeps the GIL.

    ``sum(range(n))`` loops in C without releasing the GIL; sized like the kernel call below.
    """
    work, w_time = _calibrated_work()
    n = 1_000_000
    while True:
        t0 = time.perf_counter()
        sum(range(n))
        d = time.perf_counter() - t0
        if d >= 20 * w_time or n >= 2_000_000_000:
            break
        n = min(2_000_000_000, int(n * max(2.0, 1.2 * 20 * w_time / max(d, 1e-6))))
    assert not _python_thread_progresses_during(lambda: sum(range(n)), work)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_kernel_releases_gil(backend):
    """A pure-Python thread finishes a fixed job while ONE long kernel call is in flight.

    The helper starts its job (W of pure-Python CPU) right before the main thread enters the
    call and then checks that the call has not returned yet. The call lasts D >= 20 W (sized
    below). If the kernel held the GIL, the helper could only run during the microseconds of
    Python around the kernel, so it could not finish before the call returns (the control test
    above checks exactly that); with the GIL released it finishes after ~W (~2 W if it has to
    share a loaded core). W and D are both CPU work, so machine load stretches them alike: the
    assertion is not a timing race.
    """
    sparsekit.set_num_threads(1)
    m = k = 2048
    lin = _pruned_linear(m, k, 0.1, seed=31)
    sl = SparseLinear.from_dense(lin, format="csr", backend=backend)
    work, w_time = _calibrated_work()

    with torch.inference_mode():
        n = 16
        sl(torch.randn(n, k))  # warm-up (Numba compilation, page faults)
        while True:  # grow the batch until one call takes >= 20 W (capped)
            x = torch.randn(n, k)
            t0 = time.perf_counter()
            y = sl(x)
            d = time.perf_counter() - t0
            if d >= 20 * w_time or n >= 16384:
                break
            n = min(16384, n * max(2, int(20 * w_time / max(d, 1e-6)) + 1))
        assert d >= 10 * w_time, f"could not make the call long enough ({d:.3f}s vs {w_time:.3f}s)"
        out = {}
        released = _python_thread_progresses_during(lambda: out.setdefault("y", sl(x)), work)
    assert released, (
        f"a Python thread could not run during a {d:.2f}s kernel call "
        f"(its work alone takes {w_time * 1e3:.0f} ms): the kernel holds the GIL"
    )
    ref = _dense_reference(lin, x[:4], torch.float32)
    torch.testing.assert_close(out["y"][:4].double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["y"], y)
