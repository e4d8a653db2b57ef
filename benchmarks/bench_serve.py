"""Closed-loop HTTP load on loopback: FastAPI example vs Ray Serve, dense vs sparse model.

For every (server, model, replicas) combination this script starts the server on a free
127.0.0.1 port, checks one answer against the model computed in this process, runs ``C``
client connections that each send the next request as soon as the previous answer arrived
(closed loop) for a warm-up period and then for ``--duration`` seconds, and records
requests/s, latency percentiles and errors. Servers:

* ``fastapi``: ``python -m examples.server`` with ``--workers W --threads T`` (uvicorn),
* ``ray``: :func:`sparsekit.serving.ray.build_app` with ``num_replicas=W, num_cpus=T`` on a
  local Ray cluster (127.0.0.1, no dashboard), HTTP through the Serve proxy.

Models (same architecture and seed): ``dense`` (plain ``nn.Linear`` layers: torch's dense
path) and ``sparse`` (magnitude-pruned to ``--sparsity`` and converted with
``sparsekit.sparsify``). The load generator is a raw asyncio HTTP/1.1 keep-alive client
with pre-encoded bodies, so the client costs little CPU next to the servers it measures.

Usage (timed runs on a shared machine: hold the benchmark lock)::

    flock /tmp/bench.lock python benchmarks/bench_serve.py --out benchmarks/results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
import sparsekit  # noqa: E402
from examples.ray_serve.model import mlp  # noqa: E402


# ------------------------------------------------------------------------------ models
def make_models(tmp: Path, layers: list[int], sparsity: float, seed: int) -> dict[str, Path]:
    """Write the dense and the sparse model files (readable by both servers)."""
    from sparsekit.prune import prune

    meta = {"examples.server.layers": json.dumps(layers),
            "examples.ray_serve.layers": ",".join(map(str, layers))}
    out = {}
    torch.manual_seed(seed)
    dense = mlp(layers).eval()
    out["dense"] = tmp / "dense.safetensors"
    sparsekit.save(dense, out["dense"], metadata=meta)
    prune(dense, sparsity)
    sparsekit.sparsify(dense, tune=False, cache=False, min_sparsity=0.5)
    out["sparse"] = tmp / "sparse.safetensors"
    sparsekit.save(dense, out["sparse"], metadata=meta)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ load client
async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    if headers.get("connection", "").lower() == "close":
        raise ConnectionResetError("server closed the connection")
    return status, body


async def _client(port: int, path: str, request: bytes, t_end: float, lat: list[float],
                  errors: list[str]) -> None:
    conn = None
    while time.perf_counter() < t_end:
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            t0 = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, _body = await _read_response(reader)
            if status == 200:
                lat.append(time.perf_counter() - t0)
            else:
                errors.append(f"HTTP {status}")
        except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
            errors.append(type(e).__name__)
            if conn is not None:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.01)
    if conn is not None:
        conn[1].close()


def closed_loop(port: int, path: str, body: bytes, concurrency: int, seconds: float
                ) -> dict[str, Any]:
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    lat: list[float] = []
    errors: list[str] = []

    async def run() -> None:
        t_end = time.perf_counter() + seconds
        await asyncio.gather(*(_client(port, path, request, t_end, lat, errors)
                               for _ in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1e3
    res: dict[str, Any] = {"requests": len(lat), "errors": len(errors), "seconds": round(wall, 3),
                           "rps": round(len(lat) / wall, 2)}
    if a.size:
        res.update(p50_ms=round(float(np.percentile(a, 50)), 3),
                   p90_ms=round(float(np.percentile(a, 90)), 3),
                   p99_ms=round(float(np.percentile(a, 99)), 3),
                   mean_ms=round(float(a.mean()), 3))
    if errors:
        res["error_kinds"] = sorted(set(errors))
    return res


def check_answer(port: int, path: str, x: np.ndarray, model: torch.nn.Module, key: str) -> None:
    import httpx

    r = httpx.post(f"http://127.0.0.1:{port}{path}", json={"inputs": x.tolist()}, timeout=60)
    r.raise_for_status()
    got = np.asarray(r.json()[key], dtype=np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen | None = None
              ) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"no answer on port {port}{path} within {timeout} s")


# ------------------------------------------------------------------------------ servers
def run_fastapi(model_path: Path, workers: int, threads: int, args: argparse.Namespace,
                local: torch.nn.Module, x: np.ndarray, body: bytes) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]))
    env.pop("SPARSEKIT_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "examples.server", "--model", str(model_path), "--host",
           "127.0.0.1", "--port", str(port), "--workers", str(workers), "--threads",
           str(threads), "--max-batch", "256", "--log-level", "error"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_http(port, "/healthz", 120, proc)
        check_answer(port, "/predict", x, local, "logits")
        closed_loop(port, "/predict", body, args.concurrency, args.warmup)
        return closed_loop(port, "/predict", body, args.concurrency, args.duration)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_ray(model_path: Path, replicas: int, threads: int, args: argparse.Namespace,
            local: torch.nn.Module, x: np.ndarray, body: bytes, port: int) -> dict[str, Any]:
    from ray import serve

    from sparsekit.serving.ray import build_app

    app = build_app(str(model_path), "examples.ray_serve.model:mlp",
                    factory_kwargs={"layers": args.layers}, num_replicas=replicas,
                    num_cpus=threads, max_batch_size=args.max_batch_size,
                    batch_wait_timeout_s=args.batch_wait_timeout_s, max_rows=256)
    serve.run(app, name="bench", route_prefix="/")
    try:
        wait_http(port, "/healthz", 120)
        check_answer(port, "/predict", x, local, "outputs")
        closed_loop(port, "/predict", body, args.concurrency, args.warmup)
        return closed_loop(port, "/predict", body, args.concurrency, args.duration)
    finally:
        serve.delete("bench")


# ------------------------------------------------------------------------------ main
def machine(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        from sparsekit.bench.harness import machine_info

        info = machine_info(num_threads=args.threads, bandwidth=False)
    except Exception as e:  # noqa: BLE001 - fall back to the essentials
        info = {"machine_info_error": repr(e), "cores_logical": os.cpu_count()}
    versions = {}
    for mod in ("torch", "numpy", "ray", "fastapi", "uvicorn", "starlette"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    info["serving_versions"] = versions
    try:
        from sparsekit import _C

        info["isa_path"] = _C.cpu_isa()
    except Exception:  # noqa: BLE001
        info["isa_path"] = None
    info["backends"] = sparsekit.backends()

    def scrub(v: Any) -> Any:  # library paths name the machine's directories: keep file names
        if isinstance(v, dict):
            return {k: (os.path.basename(x) if k == "filepath" and isinstance(x, str)
                        else scrub(x)) for k, x in v.items()}
        if isinstance(v, list):
            return [scrub(x) for x in v]
        return v

    info = scrub(info)
    info["sparsekit_isa_env"] = os.environ.get("SPARSEKIT_ISA")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve.json"))
    ap.add_argument("--layers", default="256,4096,4096,16",
                    help="MLP widths, input first [%(default)s]")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rows", type=int, default=4, help="rows per request [%(default)s]")
    ap.add_argument("--concurrency", type=int, default=8, help="client connections")
    ap.add_argument("--duration", type=float, default=8.0, help="timed seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="untimed load seconds first")
    ap.add_argument("--threads", type=int, default=1, help="kernel threads per worker/replica")
    ap.add_argument("--replicas", default="1,2", help="worker/replica counts [%(default)s]")
    ap.add_argument("--servers", default="fastapi,ray")
    ap.add_argument("--models", default="dense,sparse")
    ap.add_argument("--max-batch-size", type=int, default=8, help="Ray @serve.batch size")
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.002)
    ap.add_argument("--shared-machine", action="store_true",
                    help="record that other jobs shared the machine during the run")
    args = ap.parse_args(argv)
    args.layers = [int(v) for v in args.layers.split(",")]
    replicas = [int(v) for v in args.replicas.split(",")]
    servers = args.servers.split(",")
    models = args.models.split(",")

    sparsekit.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.layers[0])).astype(np.float32)
    body = json.dumps({"inputs": x.tolist()}).encode()
    results: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as td:
        paths = make_models(Path(td), args.layers, args.sparsity, seed=0)
        locals_ = {k: sparsekit.load(p, mlp(args.layers)).eval() for k, p in paths.items()}
        if "fastapi" in servers:
            for w in replicas:
                for m in models:
                    r = run_fastapi(paths[m], w, args.threads, args, locals_[m], x, body)
                    results.append({"server": "fastapi", "model": m, "workers": w, **r})
                    print(json.dumps(results[-1]), flush=True)
        if "ray" in servers:
            import ray
            from ray import serve

            port = free_port()
            env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            ray.init(num_cpus=max(replicas) * args.threads + 1, include_dashboard=False,
                     _node_ip_address="127.0.0.1", object_store_memory=100 * 1024 * 1024,
                     log_to_driver=False, runtime_env={"env_vars": env},
                     configure_logging=False)
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                for w in replicas:
                    for m in models:
                        r = run_ray(paths[m], w, args.threads, args, locals_[m], x, body, port)
                        results.append({"server": "ray", "model": m, "replicas": w, **r})
                        print(json.dumps(results[-1]), flush=True)
            finally:
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()

    def key(r: dict[str, Any]) -> tuple:
        return r["server"], r.get("workers", r.get("replicas"))

    summary = []
    for k in sorted({key(r) for r in results}):
        d = next((r for r in results if key(r) == k and r["model"] == "dense"), None)
        s = next((r for r in results if key(r) == k and r["model"] == "sparse"), None)
        if d and s and d["rps"] and s.get("p99_ms") is not None:
            summary.append({"server": k[0], "replicas": k[1],
                            "sparse_over_dense_rps": round(s["rps"] / d["rps"], 3),
                            "p99_ms_dense": d.get("p99_ms"), "p99_ms_sparse": s["p99_ms"]})
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        model_ms = {}
        for k, mdl in locals_.items():
            for _ in range(3):
                mdl(xt)
            t0 = time.perf_counter()
            for _ in range(20):
                mdl(xt)
            model_ms[k] = round((time.perf_counter() - t0) / 20 * 1e3, 4)
    doc = {
        "benchmark": "bench_serve",
        "argv": sys.argv[1:] if argv is None else argv,
        "config": {"layers": args.layers, "sparsity": args.sparsity, "rows": args.rows,
                   "concurrency": args.concurrency, "duration_s": args.duration,
                   "warmup_s": args.warmup, "threads_per_replica": args.threads,
                   "ray_max_batch_size": args.max_batch_size,
                   "ray_batch_wait_timeout_s": args.batch_wait_timeout_s,
                   "request_body_bytes": len(body)},
        "model_call_ms_in_process": {"threads": sparsekit.get_num_threads(), **model_ms},
        "machine": machine(args),
        "shared_machine": bool(args.shared_machine),
        "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()),
        "results": results,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
