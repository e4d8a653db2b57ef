"""Example HTTP inference server for a sparsekit model (FastAPI + uvicorn).

Run from the repository root::

    python -m examples.server --model models/mnist_sparse.safetensors --threads 2 --workers 1
    python examples/server/app.py --host 127.0.0.1 --port 8000

Every option can also be set with an environment variable ``SPARSEKIT_SERVER_<OPTION>``
(e.g. ``SPARSEKIT_SERVER_PORT=9000``); command-line options win. When the model file does not
exist it is created first (train an MLP on MNIST -- ``--data`` or ``$SPARSEKIT_MNIST`` -- or on
scikit-learn's digits, prune 90 %, sparsify, ``sparsekit.save``).

Endpoints
---------
``POST /predict``  ``{"inputs": [[f, ...], ...]}`` -> ``{"classes": [...], "logits": [[...]]}``
``GET /healthz``   200 ``{"status": "ok", ...}`` once the model is loaded and warmed up
``GET /metrics``   request/error counts and latency percentiles (p50/p90/p99) of /predict

Bad requests get a 4xx JSON ``{"detail": "<what was wrong>"}``: 400 malformed JSON, 413 body or
batch too large (the body limit is enforced while receiving, before any parsing), 415 wrong
content type, 422 wrong structure/shape/type or non-finite values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI resolves endpoint annotations here
from fastapi.responses import JSONResponse

ENV_PREFIX = "SPARSEKIT_SERVER_"


# ------------------------------------------------------------------------------ configuration
@dataclass
class ServerConfig:
    """Server settings; each field ``f`` can come from ``$SPARSEKIT_SERVER_<F>``."""

    model: str = "models/mnist_sparse.safetensors"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int = 0  # kernel threads per worker; 0 = usable cores // workers
    max_concurrency: int = 1  # model calls in flight per worker (each uses `threads` cores)
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch: int = 256
    data: str = ""  # MNIST .npz for creating the model; "" = $SPARSEKIT_MNIST or digits
    log_level: str = "warning"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServerConfig:
        env = os.environ if environ is None else environ
        cfg = cls()
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            try:
                setattr(cfg, f.name, int(raw) if f.type in ("int", int) else raw)
            except ValueError:
                raise ValueError(
                    f"{ENV_PREFIX}{f.name.upper()}: expected an integer, got {raw!r}"
                ) from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("port", "workers", "max_concurrency", "max_body_bytes", "max_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "port" else 1):
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads: expected an integer >= 0, got {self.threads!r}")

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + k.upper(): str(v) for k, v in asdict(self).items()}

    def resolved_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        from sparsekit.threads import default_num_threads

        return max(1, default_num_threads() // max(1, self.workers))


# ------------------------------------------------------------------------------ validation
# Request parsing and counters are shared with the Ray Serve deployment (sparsekit.serving.ray).
from sparsekit.serving.http import RequestError, RequestStats, parse_inputs, require_json  # noqa: E402


class BodyTooLarge(Exception):
    pass


# ------------------------------------------------------------------------------ ASGI pieces
class BodyLimitMiddleware:
    """Rejects request bodies over ``max_bytes`` with 413 before the app parses anything.

    A declared ``Content-Length`` over the limit is refused without reading the body; a body
    without one (chunked) is counted while it streams in and refused as soon as it exceeds.
    """

    def __init__(self, app: Any, max_bytes: int, metrics: RequestStats | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics  # refusals here never reach the endpoint: count them here

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    await _send_json(send, 400, {"detail": "content-length: not an integer"})
                    return
                if n > self.max_bytes:
                    t0 = time.perf_counter()
                    await _send_json(send, 413, {
                        "detail": f"body: {n} bytes exceeds the limit of {self.max_bytes}"})
                    if self.metrics is not None and scope.get("path") == "/predict":
                        self.metrics.record_request(413, time.perf_counter() - t0)
                    return
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, {
                    "detail": f"body: exceeds the limit of {self.max_bytes} bytes"})


async def _send_json(send: Any, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------ the app
def create_app(config: ServerConfig | None = None) -> Any:
    """Build the FastAPI app (uvicorn factory: ``examples.server.app:create_app``).

    Loads (creating it first if missing) and warms up the model, and configures the kernel
    thread count, before the app accepts requests.
    """
    import anyio
    import torch

    import sparsekit
    from examples.server.model import create_model, example_input, in_features, load_model

    cfg = config or ServerConfig.from_env()
    cfg.validate()
    threads = cfg.resolved_threads()
    # One budget for every pool in this worker: sparsekit's kernels, torch's intra-op pool.
    sparsekit.set_num_threads(threads)
    torch.set_num_threads(threads)

    path = Path(cfg.model)
    if not path.is_file():
        create_model(path, data=cfg.data or None)
    model, info = load_model(path)
    n_features = in_features(model)
    max_batch = cfg.max_batch
    warm = sparsekit.warmup(model, example_input(model, 1),
                            batch_sizes=sorted({1, min(8, max_batch), max_batch}))
    metrics = RequestStats()
    limiter = anyio.CapacityLimiter(cfg.max_concurrency)

    app = FastAPI(title="sparsekit example server", docs_url=None, redoc_url=None)
    app.state.model = model
    app.state.metrics = metrics

    configured = threading.local()

    def _run(x: np.ndarray) -> tuple[list[int], list[list[float]]]:
        # torch.set_num_threads only sets the OpenMP team of the OS thread that calls it; this
        # runs on anyio's worker threads, which otherwise use every core for dense layers.
        if not getattr(configured, "done", False):
            torch.set_num_threads(threads)
            configured.done = True
        with torch.inference_mode():
            logits = model(torch.from_numpy(x))
        return logits.argmax(1).tolist(), logits.tolist()

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        status = 200
        try:
            require_json(request.headers.get("content-type"))
            body = await request.body()  # BodyLimitMiddleware caps what this can read
            x = parse_inputs(body, n_features, max_batch)
            classes, logits = await anyio.to_thread.run_sync(_run, x, limiter=limiter)
            return JSONResponse({"classes": classes, "logits": logits})
        except RequestError as e:
            status = e.status
            return JSONResponse({"detail": e.detail}, status_code=e.status)
        except BodyTooLarge:
            status = 413
            return JSONResponse({"detail": f"body: exceeds the limit of {cfg.max_body_bytes} "
                                           "bytes"}, status_code=413)
        except Exception as e:  # noqa: BLE001 - report, count, keep serving
            status = 500
            return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"},
                                status_code=500)
        finally:
            metrics.record_request(status, time.perf_counter() - t0)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": str(path), "in_features": n_features,
                "threads": threads, "max_batch": max_batch, "pid": os.getpid(),
                "backends": sparsekit.backends(), "warmup_s": round(warm.total_s, 3)}

    @app.get("/metrics")
    async def get_metrics() -> dict[str, Any]:
        snap = metrics.snapshot()
        snap["model"] = {"path": str(path), **{k: info.get(k) for k in ("source", "accuracy")}}
        return snap

    # Outermost, so an oversized declared body is refused before FastAPI sees the request.
    return BodyLimitMiddleware(app, cfg.max_body_bytes, metrics)


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> ServerConfig:
    try:
        env_cfg = ServerConfig.from_env()
    except ValueError as e:
        raise SystemExit(f"examples.server: error: {e}") from None
    ap = argparse.ArgumentParser(
        prog="python -m examples.server",
        description="Serve a sparsekit model over HTTP (see examples/server/README.md). "
                    f"Every option also reads ${ENV_PREFIX}<OPTION>.")
    ap.add_argument("--model", default=env_cfg.model, help="sparsekit.save file (created if "
                    "missing) [%(default)s]")
    ap.add_argument("--host", default=env_cfg.host, help="bind address [%(default)s]")
    ap.add_argument("--port", type=int, default=env_cfg.port, help="[%(default)s]")
    ap.add_argument("--workers", type=int, default=env_cfg.workers,
                    help="worker processes [%(default)s]")
    ap.add_argument("--threads", type=int, default=env_cfg.threads,
                    help="kernel threads per worker; 0 = usable cores // workers [%(default)s]")
    ap.add_argument("--max-concurrency", type=int, default=env_cfg.max_concurrency,
                    help="model calls in flight per worker [%(default)s]")
    ap.add_argument("--max-body-bytes", type=int, default=env_cfg.max_body_bytes,
                    help="request body limit [%(default)s]")
    ap.add_argument("--max-batch", type=int, default=env_cfg.max_batch,
                    help="rows per request limit [%(default)s]")
    ap.add_argument("--data", default=env_cfg.data,
                    help="MNIST .npz used if the model must be created [$SPARSEKIT_MNIST or "
                         "sklearn digits]")
    ap.add_argument("--log-level", default=env_cfg.log_level, help="uvicorn log level")
    a = ap.parse_args(argv)
    cfg = ServerConfig(model=a.model, host=a.host, port=a.port, workers=a.workers,
                       threads=a.threads, max_concurrency=a.max_concurrency,
                       max_body_bytes=a.max_body_bytes, max_batch=a.max_batch, data=a.data,
                       log_level=a.log_level)
    try:
        cfg.validate()
    except ValueError as e:
        ap.error(str(e))
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    import uvicorn

    path = Path(cfg.model)
    if not path.is_file():
        # Created once here, before workers start, so they do not race to train it.
        from examples.server.model import create_model

        print(f"examples.server: creating {path} (train, prune 90%, sparsify) ...", flush=True)
        info = create_model(path, data=cfg.data or None)
        print(f"examples.server: {info['source']}: accuracy {info['accuracy']}", flush=True)
    # Worker processes (spawned) rebuild the config from the environment.
    os.environ.update(cfg.to_env())
    uvicorn.run("examples.server.app:create_app", factory=True, host=cfg.host, port=cfg.port,
                workers=cfg.workers, log_level=cfg.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

