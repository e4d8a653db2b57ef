"""End-to-end test of examples/server: a real uvicorn subprocess on a loopback port.

The server is started with a model path that does not exist yet, so it also exercises the
first-run model creation (digits fallback: fast). Then 500 /predict requests over 8 concurrent
connections are checked against the same model loaded in-process, malformed requests must get
a 4xx with a message while /healthz stays OK, and /metrics must account for all of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
N_REQUESTS = 500
N_CONNECTIONS = 8
MAX_BATCH = 16
MAX_BODY = 64 * 1024
STARTUP_TIMEOUT_S = 180.0  # model creation + imports on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    model_path = tmp / "model.safetensors"
    port = _free_port()
    env = dict(os.environ)
    env.pop("SPARSEKIT_MNIST", None)  # digits fallback: the model is created in ~a second
    for k in list(env):
        if k.startswith("SPARSEKIT_SERVER_"):
            del env[k]
    env["SPARSEKIT_SERVER_MAX_BATCH"] = str(MAX_BATCH)  # via env, the rest via the CLI
    cmd = [sys.executable, "-m", "examples.server", "--model", str(model_path),
           "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--workers", "1",
           "--max-body-bytes", str(MAX_BODY), "--max-concurrency", "2"]
    log = open(tmp / "server.log", "w+b")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")
            try:
                r = httpx.get(base + "/healthz", timeout=2.0)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"/healthz not ready after {STARTUP_TIMEOUT_S}s:\n"
                            f"{log.read().decode()[-3000:]}")
            time.sleep(0.2)
        yield {"base": base, "model_path": model_path, "proc": proc, "health": r.json()}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def local_model(server):
    from examples.server.model import load_model

    model, info = load_model(server["model_path"])
    return model, info


def test_health(server):
    h = server["health"]
    assert h["status"] == "ok"
    assert h["in_features"] == 64  # digits fallback
    assert h["max_batch"] == MAX_BATCH and h["threads"] == 1


def test_concurrent_predictions_match_in_process_model(server, local_model):
    model, _ = local_model
    n_features = server["health"]["in_features"]
    rng = np.random.default_rng(1234)
    payloads = []
    for _ in range(N_REQUESTS):
        x = rng.random((int(rng.integers(1, 9)), n_features)).astype(np.float32)
        payloads.append(x)
    results: list = [None] * N_REQUESTS
    errors: list = []
    next_i = iter(range(N_REQUESTS))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=server["base"], timeout=30.0) as client:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                try:
                    r = client.post("/predict", json={"inputs": payloads[i].tolist()})
                    results[i] = (r.status_code, r.json())
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append((i, repr(e)))
                    return

    threads = [threading.Thread(target=worker) for _ in range(N_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    with torch.inference_mode():
        for i, x in enumerate(payloads):
            status, body = results[i]
            assert status == 200, (i, body)
            want = model(torch.from_numpy(x)).double().numpy()
            got = np.asarray(body["logits"], dtype=np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert body["classes"] == got.argmax(1).tolist()
            # Independent check of the served model: dense float64 forward of its weights.
            if i < 20:
                h = torch.from_numpy(x).double()
                for mod in model:
                    if hasattr(mod, "in_features"):
                        w = mod.matrix.to_dense().double()
                        h = h @ w.T + mod.bias.double()
                    else:
                        h = torch.relu(h)
                np.testing.assert_allclose(got, h.numpy(), rtol=1e-4, atol=1e-4)


def _row(n: int, v: float = 0.5) -> list[float]:
    return [v] * n


def _bad_requests(n: int) -> list[tuple[str, dict, int]]:
    """(name, httpx request kwargs, expected status)."""
    ok_row = _row(n)
    big = json.dumps({"inputs": [ok_row] * 2000})  # > MAX_BODY bytes
    assert len(big) > MAX_BODY

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096].encode()

    j = {"content-type": "application/json"}
    return [
        ("wrong row length", {"json": {"inputs": [_row(n - 1)]}}, 422),
        ("ragged rows", {"json": {"inputs": [ok_row, _row(n + 1)]}}, 422),
        ("1-D inputs", {"json": {"inputs": ok_row}}, 422),
        ("string element", {"json": {"inputs": [["x"] + ok_row[1:]]}}, 422),
        ("numeric string", {"json": {"inputs": [["0.5"] + ok_row[1:]]}}, 422),
        ("bool element", {"json": {"inputs": [[True] + ok_row[1:]]}}, 422),
        ("null element", {"json": {"inputs": [[None] + ok_row[1:]]}}, 422),
        ("inputs not a list", {"json": {"inputs": "abc"}}, 422),
        ("body not an object", {"json": [ok_row]}, 422),
        ("missing inputs", {"json": {"x": [ok_row]}}, 422),
        ("extra key", {"json": {"inputs": [ok_row], "y": 1}}, 422),
        ("NaN", {"content": '{"inputs": [[NaN' + ", 0.5" * (n - 1) + "]]}", "headers": j},
         422),
        ("Infinity", {"content": '{"inputs": [[Infinity' + ", 0.5" * (n - 1) + "]]}",
                      "headers": j}, 422),
        ("overflow to inf", {"content": '{"inputs": [[1e400' + ", 0.5" * (n - 1) + "]]}",
                             "headers": j}, 422),
        ("beyond float32", {"json": {"inputs": [[1e39] + ok_row[1:]]}}, 422),
        ("empty batch", {"json": {"inputs": []}}, 422),
        ("batch too large", {"json": {"inputs": [ok_row] * (MAX_BATCH + 1)}}, 413),
        ("oversized body", {"content": big, "headers": j}, 413),
        ("oversized chunked body", {"content": chunks(), "headers": j}, 413),
        ("invalid JSON", {"content": b'{"inputs": [[0.5,', "headers": j}, 400),
        ("not UTF-8", {"content": b"\xff\xfe\x00", "headers": j}, 400),
        ("empty body", {"content": b"", "headers": j}, 400),
        ("wrong content type", {"content": b"inputs=1", "headers": {
            "content-type": "application/x-www-form-urlencoded"}}, 415),
    ]


def test_malformed_requests_get_4xx_with_message(server):
    n = server["health"]["in_features"]
    cases = _bad_requests(n)
    with httpx.Client(base_url=server["base"], timeout=30.0) as client:
        before = client.get("/metrics").json()
        for name, kwargs, status in cases:
            r = client.post("/predict", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            detail = r.json().get("detail")
            assert isinstance(detail, str) and len(detail) > 10, (name, r.text[:300])
            assert client.get("/healthz").status_code == 200, name
        # A wrong method / unknown route is the framework's 405/404, and still harmless.
        assert client.get("/predict").status_code == 405
        # The server still answers correctly after all that.
        r = client.post("/predict", json={"inputs": [_row(n)]})
        assert r.status_code == 200 and len(r.json()["classes"]) == 1
        after = client.get("/metrics").json()
    assert after["errors"] - before["errors"] == len(cases)
    assert after["requests"] - before["requests"] == len(cases) + 1
    lat = after["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]


def test_metrics_count_all_predictions(server):
    with httpx.Client(base_url=server["base"], timeout=30.0) as client:
        m = client.get("/metrics").json()
    # Module-scoped server: at least the 500 good requests of the concurrent test went through.
    assert m["by_status"].get("200", 0) >= N_REQUESTS
    assert m["requests"] == sum(m["by_status"].values())
