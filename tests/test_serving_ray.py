"""sparsekit.serving.ray on a real local Ray cluster (127.0.0.1, no dashboard).

One module-scoped cluster and Serve instance (HTTP on a free loopback port) serve a pruned,
sparsified MLP with two replicas of ``num_cpus=1``. The tests check bit-exact outputs against
the same model loaded in this process, the replicas' thread budget, bounded concurrent load,
malformed requests, and a replica killed mid-load. Everything is torn down at the end.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

import sparsekit  # noqa: E402
from examples.ray_serve.model import make_model_file, mlp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [96, 384, 96]
APP = "sk"
PREFIX = "/sk"
# Every wait is bounded; the whole module stays well under a minute on an idle 2-core box.
READY_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _replica_actor_names(app: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster + Serve app; yields (base_url, local model, model path)."""
    from sparsekit.serving.ray import build_app

    path = tmp_path_factory.mktemp("ray_model") / "mlp_sparse.safetensors"
    make_model_file(str(path), LAYERS, sparsity=0.9, seed=1)
    local = sparsekit.load(path, mlp(LAYERS)).eval()
    # Kernel variants of one family differ in summation order (sparsekit.kernels.planner), so
    # bit-identical outputs across processes need the same plans: plan here at the replicas'
    # thread count (1) into a wisdom file, and hand the replicas that file, as a deployment
    # that wants reproducible outputs does.
    wisdom = tmp_path_factory.mktemp("wisdom") / "wisdom.json"
    saved_wisdom = os.environ.get("SPARSEKIT_WISDOM")
    os.environ["SPARSEKIT_WISDOM"] = str(wisdom)
    rng = np.random.default_rng(123)
    for rows in (1, 2, 8, 32, 64):
        _local(local, rng.standard_normal((rows, LAYERS[0])).astype(np.float32))
    assert wisdom.is_file(), "planning wrote no wisdom file"
    port = _free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SPARSEKIT_WISDOM": str(wisdom)}
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=80 * 1024 * 1024, log_to_driver=False,
             runtime_env={"env_vars": env}, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(str(path), "examples.ray_serve.model:mlp",
                        factory_kwargs={"layers": LAYERS}, num_replicas=2, num_cpus=1,
                        max_batch_size=4, batch_wait_timeout_s=0.002, max_rows=64)
        serve.run(app, name=APP, route_prefix=PREFIX)
        yield f"http://127.0.0.1:{port}{PREFIX}", local, path
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if saved_wisdom is None:
                os.environ.pop("SPARSEKIT_WISDOM", None)
            else:
                os.environ["SPARSEKIT_WISDOM"] = saved_wisdom


def _post(client: httpx.Client, url: str, body: object, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = kw.pop("headers", {"content-type": "application/json"})
    return client.post(url + "/predict", content=data, headers=headers, **kw)


def _local(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The local model's output with one kernel thread, as each num_cpus=1 replica runs."""
    from sparsekit.threads import threads

    with torch.inference_mode(), threads(1):
        return model(torch.from_numpy(x)).numpy()


def _serve_diagnostics() -> str:
    """What Serve reports about the app and its replicas' recent state changes (for failures)."""
    lines = [repr(serve.status().applications.get(APP))]
    try:
        logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
        for f in sorted(logs.glob("controller_*.log")):
            hits = [ln.rstrip() for ln in f.read_text(errors="replace").splitlines()
                    if "eplica" in ln and any(w in ln for w in (
                        "unhealthy", "died", "Stopping", "Adding", "Removing", "failed",
                        "health check", "STOPPING", "RUNNING"))]
            lines += hits[-40:]
    except Exception as e:  # noqa: BLE001 - diagnostics must not mask the real failure
        lines.append(f"(controller log unavailable: {e})")
    return "\n".join(lines)


def _metrics_by_replica(client: httpx.Client, url: str, want: int,
                        timeout_s: float = READY_TIMEOUT_S) -> dict:
    """Poll /metrics until ``want`` distinct replicas answered, or the deadline passes.

    Serve routes each request to one replica (power of two choices on queue length), so
    polling reaches every routable replica within a few calls; a replica being replaced
    (health check, restart) becomes routable again only after its constructor ran, which
    on a loaded machine takes seconds -- hence a deadline rather than a count of tries.
    """
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = client.get(url + "/metrics").json()
        seen[m["replica"]] = m
        if len(seen) >= want:
            break
        time.sleep(0.02)
    return seen


def _wait_routable(url: str, want: int = 2) -> dict:
    """Block (bounded) until ``want`` replicas are RUNNING and answer; fail with diagnostics.
    Returns each replica's /metrics answer, as :func:`_metrics_by_replica`."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        st = serve.status().applications[APP]
        running = sum(d.replica_states.get("RUNNING", 0) for d in st.deployments.values())
        if running >= want:
            break
        assert time.monotonic() < deadline, _serve_diagnostics()
        time.sleep(0.5)
    with httpx.Client(timeout=30) as c:
        seen = _metrics_by_replica(c, url, want)
    assert len(seen) >= want, f"{len(seen)} of {want} replicas answered:\n{_serve_diagnostics()}"
    return seen


def test_outputs_bit_identical_to_local_model(cluster):
    url, local, _ = cluster
    rng = np.random.default_rng(0)
    with httpx.Client(timeout=30) as c:
        for rows in (1, 2, 3, 7, 33, 64):
            x = rng.standard_normal((rows, LAYERS[0])).astype(np.float32)
            r = _post(c, url, {"inputs": x.tolist()})
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["outputs"], dtype=np.float64).astype(np.float32)
            want = _local(local, x)
            assert got.shape == (rows, LAYERS[-1])
            # float32 -> JSON (shortest float64 repr) -> float32 is exact: compare bits.
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), rows
            # The local model must itself be non-trivial (a zero model would pass anything).
            assert np.abs(want).max() > 0


def test_replica_with_one_cpu_runs_single_threaded_kernels(cluster):
    url, _, _ = cluster
    x = np.ones((2, LAYERS[0]), dtype=np.float32)
    with httpx.Client(timeout=30) as c:
        for _ in range(20):  # both replicas compute at least once (the router spreads load)
            assert _post(c, url, {"inputs": x.tolist()}).status_code == 200
        health = c.get(url + "/healthz").json()
        assert health["threads"] == 1 and health["threads_source"] == "ray num_cpus"
        assert health["torch_threads"] == 1 and health["omp_num_threads"] == "1"
        assert health["sparse_layers"] == 2
        seen = _metrics_by_replica(c, url, want=2)
    assert len(seen) == 2
    for m in seen.values():
        if m["batches"]:
            # the count the kernels were launched with, read on the thread that calls them
            assert m["kernel_threads"] == 1, m


def test_thread_budget_follows_num_cpus(cluster):
    """A replica reserved 2 CPUs runs 2 kernel threads (so the 1 above is not a constant)."""
    _, _, path = cluster
    from sparsekit.serving.ray import build_app

    app = build_app(str(path), "examples.ray_serve.model:mlp", factory_kwargs={"layers": LAYERS},
                    num_replicas=1, num_cpus=2, name="Wide")
    handle = serve.run(app, name="wide", route_prefix="/wide")
    try:
        out = handle.predict.remote(np.ones((3, LAYERS[0]), dtype=np.float32)).result(
            timeout_s=60)
        assert out.shape == (3, LAYERS[-1])
        m = handle.metrics.remote().result(timeout_s=60)
        h = handle.health.remote().result(timeout_s=60)
        assert h["threads"] == 2 and h["threads_source"] == "ray num_cpus"
        assert m["kernel_threads"] == 2
        with pytest.raises(Exception, match=r"inputs: expected shape \(N >= 1, 96\), got "
                                            r"\(3, 5\)"):
            handle.predict.remote(np.ones((3, 5), dtype=np.float32)).result(timeout_s=60)
    finally:
        serve.delete("wide")


def test_two_replicas_answer_every_request_under_load(cluster):
    url, local, _ = cluster
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((int(rng.integers(1, 9)), LAYERS[0])).astype(np.float32)
          for _ in range(160)]
    before = {k: v["requests"] for k, v in _wait_routable(url).items()}

    def one(x: np.ndarray) -> np.ndarray:
        with httpx.Client(timeout=60) as cl:
            r = _post(cl, url, {"inputs": x.tolist()})
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["outputs"], dtype=np.float32)

    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, xs, timeout=240))
    for x, got in zip(xs, outs):
        # batched with other requests: equal up to float32 summation order
        np.testing.assert_allclose(got, _local(local, x), rtol=1e-5, atol=1e-5)
    with httpx.Client(timeout=30) as c:
        after = _metrics_by_replica(c, url, 2)
    served = {k: v["requests"] - before.get(k, 0) for k, v in after.items()}
    assert len(served) == 2 and all(n > 0 for n in served.values()), \
        f"{served}\n{_serve_diagnostics()}"
    assert any(v["mean_batch_requests"] and v["max_batch_requests"] > 1
               for v in after.values()), "no request was ever batched with another"


BAD = [
    (b"", 400, "body: empty"),
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 422, "expected a JSON object with key 'inputs'"),
    (json.dumps({"inputs": []}), 422, "empty batch"),
    (json.dumps({"inputs": [[1.0] * 5]}), 422, "row 0: expected 96 numbers, got 5"),
    (json.dumps({"inputs": [[1.0] * 96, [1.0] * 95]}), 422, "row 1: expected 96 numbers"),
    (json.dumps({"inputs": [["a"] * 96]}), 422, "row 0 column 0: expected a number, got str"),
    (json.dumps({"inputs": [[None] + [0.0] * 95]}), 422, "expected a number, got null"),
    (b'{"inputs": [[NaN' + b", 0" * 95 + b"]]}", 422, "non-finite value NaN"),
    (json.dumps({"inputs": [[1e300] + [0.0] * 95]}), 422, "is not a finite float32"),
    (json.dumps({"inputs": [[0.0] * 96] * 65}), 413, "65 rows exceeds the limit of 64"),
    (json.dumps({"inputs": [[0.0] * 96], "extra": 1}), 422, "unexpected keys ['extra']"),
]


def test_malformed_requests_get_4xx_and_replicas_keep_serving(cluster):
    url, local, _ = cluster
    x = np.full((1, LAYERS[0]), 0.5, dtype=np.float32)
    _wait_routable(url)
    with httpx.Client(timeout=30) as c:
        for body, status, detail in BAD:
            r = _post(c, url, body)
            assert r.status_code == status, (body[:60], r.text)
            assert detail in r.json()["detail"], (detail, r.json())
        r = _post(c, url, json.dumps({"inputs": x.tolist()}),
                  headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "content-type" in r.json()["detail"]
        r = c.get(url + "/nothing")
        assert r.status_code == 404 and "POST /predict" in r.json()["detail"]
        # both replicas still answer, with the right numbers
        for _ in range(10):
            r = _post(c, url, {"inputs": x.tolist()})
            assert r.status_code == 200
            assert np.array_equal(np.asarray(r.json()["outputs"], dtype=np.float32),
                                  _local(local, x))
        seen = _metrics_by_replica(c, url, 2)
    assert len(seen) == 2, _serve_diagnostics()
    assert sum(m["errors"] for m in seen.values()) >= len(BAD) + 1
    assert sum(m["by_status"].get("422", 0) for m in seen.values()) >= 9


def test_killed_replica_loses_no_retried_request_and_comes_back(cluster):
    url, local, _ = cluster
    names = _replica_actor_names(APP)
    assert len(names) == 2, names
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, LAYERS[0])).astype(np.float32) for _ in range(120)]
    retries = []

    def one(i_x: tuple[int, np.ndarray]) -> np.ndarray:
        i, x = i_x
        if i == 30:  # mid-load: kill one replica actor (Serve must replace it)
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 90
        with httpx.Client(timeout=30) as cl:
            while True:
                try:
                    r = _post(cl, url, {"inputs": x.tolist()})
                    if r.status_code == 200:
                        return np.asarray(r.json()["outputs"], dtype=np.float32)
                    assert r.status_code >= 500, r.text  # never a 4xx for a valid request
                except httpx.TransportError:
                    pass
                retries.append(i)
                assert time.monotonic() < deadline, f"request {i} kept failing"
                time.sleep(0.1)

    with cf.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(one, enumerate(xs), timeout=240))
    assert len(outs) == len(xs)
    for x, got in zip(xs, outs):
        np.testing.assert_allclose(got, _local(local, x), rtol=1e-5, atol=1e-5)

    # The controller replaces the dead replica: two running replicas, one with a new name.
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        now = _replica_actor_names(APP)
        st = serve.status().applications[APP]
        running = sum(d.replica_states.get("RUNNING", 0) for d in st.deployments.values())
        if names[0] not in now and len(now) == 2 and running == 2:
            break
        assert time.monotonic() < deadline, (now, st)
        time.sleep(0.5)
    with httpx.Client(timeout=30) as c:
        seen = _metrics_by_replica(c, url, 2)
        assert len(seen) == 2
        r = _post(c, url, {"inputs": xs[0].tolist()})
        assert r.status_code == 200



# ------------------------------------------------------------------------------ no cluster
def test_resolve_factory_and_errors():
    from sparsekit.serving.ray import resolve_factory

    assert resolve_factory("examples.ray_serve.model:mlp") is mlp
    assert resolve_factory(mlp) is mlp
    with pytest.raises(ValueError, match="factory: expected an import path 'package.module:"
                                         "function' or a callable, got 'examples.mlp'"):
        resolve_factory("examples.mlp")
    with pytest.raises(ImportError, match="factory: cannot import module 'no_such_mod_xyz'"):
        resolve_factory("no_such_mod_xyz:f")
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        resolve_factory("examples.ray_serve.model:nope")
    with pytest.raises(TypeError, match="is a tuple, not callable"):
        resolve_factory("examples.ray_serve.model:DEFAULT_LAYERS")


def test_fetch_model_paths(tmp_path):
    from sparsekit.serving.ray import fetch_model

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    assert fetch_model(str(f)) == f
    assert fetch_model(f"file://{f}") == f
    with pytest.raises(FileNotFoundError, match="model_uri: no such file"):
        fetch_model(str(tmp_path / "missing.safetensors"))


def test_replica_thread_budget_outside_ray(monkeypatch):
    from sparsekit.serving.ray import replica_thread_budget

    assert replica_thread_budget(3) == (3, "threads")
    with pytest.raises(ValueError, match="threads: expected a positive int or None, got 0"):
        replica_thread_budget(0)
    monkeypatch.setenv("SPARSEKIT_NUM_THREADS", "2")
    assert replica_thread_budget() == (2, "SPARSEKIT_NUM_THREADS")
    monkeypatch.delenv("SPARSEKIT_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if not ray.is_initialized():
        assert replica_thread_budget() == (1, "OMP_NUM_THREADS")


def test_build_app_argument_errors():
    from sparsekit.serving.ray import app_builder, build_app

    with pytest.raises(ValueError, match="num_cpus: expected a positive number, got 0"):
        build_app("m.safetensors", "a.b:c", num_cpus=0)
    with pytest.raises(ValueError, match="factory: expected 'package.module:function'"):
        build_app("m.safetensors", "a.b.c")
    with pytest.raises(ValueError, match=r"args: missing required keys \['factory'\]"):
        app_builder({"model_uri": "m.safetensors"})
    app = app_builder({"model_uri": "m.safetensors", "factory": "a.b:c", "num_replicas": "3",
                       "num_cpus": "2", "max_batch_size": "16"})
    assert type(app).__name__ == "Application"
