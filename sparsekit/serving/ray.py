"""Serve a sparsekit model with Ray Serve: replicas as Ray actors, dynamic batching, scale-out.

Needs the optional extra ``sparsekit[ray]`` (``ray[serve]``). This module imports Ray; nothing
else in sparsekit does, so ``import sparsekit`` and ``import sparsekit.serving`` stay Ray-free.

Quick start::

    import sparsekit
    sparsekit.save(sparse_model, "/shared/models/mlp.safetensors")

    from ray import serve
    from sparsekit.serving.ray import build_app

    app = build_app("/shared/models/mlp.safetensors", "mypkg.models:make_mlp",
                    num_replicas=4, num_cpus=2, max_batch_size=16)
    serve.run(app, route_prefix="/")

or, from a config file, ``serve run config.yaml`` with ``import_path:
sparsekit.serving.ray:app_builder`` (see ``examples/ray_serve``).

Each replica

* fetches the model file (a local/shared path, ``file://`` URI, or any URI ``fsspec`` can read
  such as ``s3://`` or ``gs://`` when ``fsspec`` and its protocol package are installed), builds
  the architecture with the factory (an import path ``"pkg.mod:fn"``, so every process can
  import it) and installs the stored weights with ``sparsekit.load(path, factory())``;
* sets sparsekit's and torch's thread count from its CPU budget (see
  :func:`replica_thread_budget`), so N replicas on a node do not start N full-width OpenMP
  teams;
* warms up (``sparsekit.warmup`` at batch sizes 1 and ``max_batch_size * max_rows`` capped at
  ``warmup_max_rows``) in its constructor: Serve routes traffic to a replica only after its
  constructor returns;
* batches concurrent requests with ``@serve.batch`` (``max_batch_size`` requests, waiting at
  most ``batch_wait_timeout_s``), runs one model call per batch on a dedicated thread (the
  kernels release the GIL, so the replica's event loop keeps accepting requests) and splits the
  output rows back per request;
* validates every request before it joins a batch (the same parser as the FastAPI example,
  :func:`sparsekit.serving.http.parse_inputs`), so a malformed request gets a 4xx JSON error
  and never fails a batch or the replica.

HTTP routes (relative to the application's ``route_prefix``): ``POST /predict`` with
``{"inputs": [[f, ...], ...]}`` -> ``{"outputs": [[...], ...]}``; ``GET /healthz``;
``GET /metrics`` (counters of the replica that answers). Python callers can use the
deployment handle: ``handle.predict.remote(array)``, ``handle.metrics.remote()``.

Numerics: a request's outputs are bit-identical to ``model(x)`` run locally on the same rows
when the request is computed alone (a batch of one request, e.g. ``max_batch_size=1`` or no
concurrent requests). When several requests share a batch the kernels see a taller input and
may sum in another order, so results can differ from a single-request run in the last bits
(float32 rounding), exactly as they would when batching locally.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

import sparsekit
from sparsekit.serving import warmup
from sparsekit.serving.http import (
    RequestError,
    RequestStats,
    parse_inputs,
    require_json,
)

__all__ = [
    "SparsekitDeployment", "SparsekitReplica", "build_app", "app_builder", "resolve_factory",
    "fetch_model", "replica_thread_budget", "ReplicaStats",
]


# ------------------------------------------------------------------------------ helpers
def resolve_factory(factory: str | Callable[..., torch.nn.Module]) -> Callable[..., Any]:
    """Turn ``"pkg.module:function"`` (or a callable) into the architecture factory.

    Raises
    ------
    ValueError
        If the string is not of the form ``"module:attribute"``.
    ImportError, AttributeError
        If the module or attribute does not exist (the message names them).
    TypeError
        If the result is not callable.
    """
    if callable(factory):
        return factory
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise ValueError(f"factory: expected an import path 'package.module:function' or a "
                         f"callable, got {factory!r}")
    mod_name, attr = factory.split(":")
    if not mod_name or not attr:
        raise ValueError(f"factory: expected 'package.module:function', got {factory!r}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"factory: cannot import module {mod_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"factory: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"factory: {factory!r} is a {type(obj).__name__}, not callable")
    return obj


def fetch_model(uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
                ) -> Path:
    """Return a local path to the model file at ``uri``, downloading it when it is remote.

    Local paths and ``file://`` URIs are used in place. Other schemes (``s3://``, ``gs://``,
    ``http(s)://``, ...) are copied with ``fsspec`` into ``cache_dir`` (default: a new
    temporary directory).

    Raises
    ------
    FileNotFoundError
        If a local file does not exist.
    ImportError
        If ``uri`` is remote and ``fsspec`` is not installed.
    """
    text = os.fspath(uri)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # 1 letter: Windows drive
        local = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else text)
        if not local.is_file():
            raise FileNotFoundError(f"model_uri: no such file {local} (it must be readable "
                                    "from every node that runs a replica)")
        return local
    try:
        import fsspec
    except ImportError as e:
        raise ImportError(f"model_uri: reading {parsed.scheme}:// URIs needs fsspec "
                          f"(pip install fsspec and its {parsed.scheme} package)") from e
    dest_dir = Path(cache_dir) if cache_dir is not None else Path(
        tempfile.mkdtemp(prefix="sparsekit-model-"))
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (Path(parsed.path).name or "model.safetensors")
    tmp = dest.with_suffix(dest.suffix + ".part")
    with fsspec.open(text, "rb") as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 20)
    os.replace(tmp, dest)
    return dest


def replica_thread_budget(threads: int | None = None) -> tuple[int, str]:
    """Kernel threads for this replica and where the number came from.

    In order: the explicit ``threads`` argument; ``SPARSEKIT_NUM_THREADS``; the CPUs Ray
    assigned to this actor (``ray_actor_options={"num_cpus": n}``, floored, at least 1 --
    the same rule Ray uses for ``OMP_NUM_THREADS``); otherwise sparsekit's default
    (``OMP_NUM_THREADS``, then the affinity mask / cgroup quota).

    Returns
    -------
    (int, str)
        The thread count and its source ("threads", "SPARSEKIT_NUM_THREADS", "ray num_cpus",
        or the source named by :func:`sparsekit.threads.thread_budget_source`).
    """
    from sparsekit.threads import default_num_threads, thread_budget_source

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
        return threads, "threads"
    if os.environ.get("SPARSEKIT_NUM_THREADS", "").strip():
        return default_num_threads(), "SPARSEKIT_NUM_THREADS"
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus is not None:
                return max(1, math.floor(cpus)), "ray num_cpus"
    except Exception:  # noqa: BLE001 - not inside a Ray worker: fall through
        pass
    return default_num_threads(), thread_budget_source()


def _first_in_features(model: torch.nn.Module) -> int:
    for m in model.modules():
        n = getattr(m, "in_features", None)
        if isinstance(n, int) and n > 0:
            return n
    raise ValueError("in_features: the model has no module with an 'in_features' attribute; "
                     "pass in_features=... explicitly")


def _check_pos_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


class ReplicaStats(RequestStats):
    """:class:`~sparsekit.serving.http.RequestStats` plus the replica's batch counters."""

    def __init__(self, window: int = 10_000) -> None:
        super().__init__(window)
        self.batches = 0
        self.batched_requests = 0
        self.rows = 0
        self.max_batch_seen = 0

    def record_batch(self, n_requests: int, n_rows: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_requests += n_requests
            self.rows += n_rows
            self.max_batch_seen = max(self.max_batch_seen, n_requests)

    def _counters(self) -> dict[str, Any]:
        return {
            **super()._counters(),
            "batches": self.batches,
            "rows": self.rows,
            "mean_batch_requests": (round(self.batched_requests / self.batches, 3)
                                    if self.batches else None),
            "max_batch_requests": self.max_batch_seen,
        }


# ------------------------------------------------------------------------------ deployment
class SparsekitReplica:
    """One Serve replica holding a sparsekit model (see the module docstring).

    Deployed as :data:`SparsekitDeployment` (this class wrapped by ``serve.deployment``); the
    class itself stays importable by name so Ray pickles it by reference.

    Parameters
    ----------
    model_uri : str
        Path or URI of a file written by ``sparsekit.save`` (see :func:`fetch_model`).
    factory : str or callable
        ``"pkg.mod:fn"`` returning the architecture (dense or sparsified) to load into.
    factory_kwargs : mapping, optional
        Keyword arguments for the factory.
    threads : int, optional
        Kernel threads per replica; default from :func:`replica_thread_budget`.
    max_batch_size : int, default 8
        Requests combined into one model call by ``@serve.batch``.
    batch_wait_timeout_s : float, default 0.002
        How long the first request of a batch waits for others.
    max_rows : int, default 256
        Rows allowed in one request (413 above).
    max_body_bytes : int, default 4 MiB
        Request body limit (413 above).
    in_features : int, optional
        Input width; default: the first module with ``in_features``.
    warmup_max_rows : int, default 256
        Upper bound of the batch sizes warmed up.
    """

    def __init__(self, model_uri: str, factory: str | Callable[..., torch.nn.Module], *,
                 factory_kwargs: Mapping[str, Any] | None = None, threads: int | None = None,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.002,
                 max_rows: int = 256, max_body_bytes: int = 4 * 1024 * 1024,
                 in_features: int | None = None, warmup_max_rows: int = 256) -> None:
        t0 = time.perf_counter()
        self.max_batch_size = _check_pos_int("max_batch_size", max_batch_size)
        self.max_rows = _check_pos_int("max_rows", max_rows)
        self.max_body_bytes = _check_pos_int("max_body_bytes", max_body_bytes)
        if not isinstance(batch_wait_timeout_s, (int, float)) or batch_wait_timeout_s < 0:
            raise ValueError("batch_wait_timeout_s: expected a number >= 0, got "
                             f"{batch_wait_timeout_s!r}")
        self.threads, self.threads_source = replica_thread_budget(threads)
        # One budget for every pool in this replica: sparsekit's kernels and torch's.
        sparsekit.set_num_threads(self.threads)
        torch.set_num_threads(self.threads)

        self.model_uri = str(model_uri)
        local = fetch_model(model_uri)
        build = resolve_factory(factory)
        model = sparsekit.load(local, build(**dict(factory_kwargs or {})))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.in_features = (_check_pos_int("in_features", in_features)
                            if in_features is not None else _first_in_features(model))
        self.sparse_layers = sum(type(m).__name__ == "SparseLinear" for m in model.modules())

        # One model call at a time per replica: the kernels already use `threads` cores.
        # torch.set_num_threads sets the OpenMP team size of the calling OS thread only; a new
        # thread starts from OMP_NUM_THREADS / all cores (dense layers measured 4.6x slower on
        # a busy 2-core machine), so the model thread sets the budget for itself too.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsekit-model",
                                        initializer=torch.set_num_threads,
                                        initargs=(self.threads,))
        self._kernel_threads_seen: int | None = None
        self.predict_batch.set_max_batch_size(self.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.stats = ReplicaStats()

        top = max(1, min(int(warmup_max_rows), self.max_batch_size * self.max_rows))
        example = torch.zeros(1, self.in_features, dtype=torch.float32)
        report = self._pool.submit(
            warmup, model, example, batch_sizes=sorted({1, min(8, top), top})).result()
        self.warmup_s = report.total_s
        self.startup_s = time.perf_counter() - t0
        self.pid = os.getpid()
        try:
            self.replica_id = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # noqa: BLE001 - constructed outside Serve (tests)
            self.replica_id = f"pid-{self.pid}"

    # -------------------------------------------------------------------- compute
    def _forward(self, x: np.ndarray) -> np.ndarray:
        # Read on the thread that calls the kernels: the count the C++/Numba kernels are
        # launched with (sparsekit.threads.get_num_threads is what they read per call).
        self._kernel_threads_seen = sparsekit.get_num_threads()
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x))
        return out.detach().to(torch.float32).numpy()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def predict_batch(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one model call over the concatenated rows of ``xs``; one output per request."""
        sizes = [int(x.shape[0]) for x in xs]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._pool, self._forward, x)
        self.stats.record_batch(len(xs), int(x.shape[0]))
        return list(np.split(out, np.cumsum(sizes)[:-1], axis=0))

    def _check_array(self, inputs: Any) -> np.ndarray:
        try:
            x = np.asarray(inputs)
        except Exception as e:  # noqa: BLE001
            raise RequestError(422, f"inputs: not an array ({e})") from None
        if x.dtype.kind not in "fiu":
            raise RequestError(422, f"inputs: expected numbers, got array of {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.in_features or x.shape[0] < 1:
            raise RequestError(422, f"inputs: expected shape (N >= 1, {self.in_features}), "
                                    f"got {tuple(x.shape)}")
        if x.shape[0] > self.max_rows:
            raise RequestError(413, f"inputs: batch of {x.shape[0]} rows exceeds the limit of "
                                    f"{self.max_rows}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            i, j = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
            raise RequestError(422, f"inputs: row {i} column {j}: value is not a finite float32")
        return x

    async def predict(self, inputs: Any) -> np.ndarray:
        """Handle API: outputs for an ``(N, in_features)`` array (raises ``ValueError``)."""
        t0 = time.perf_counter()
        status = 200
        try:
            return await self.predict_batch(self._check_array(inputs))
        except RequestError as e:
            status = e.status
            raise ValueError(e.detail) from None
        except Exception:
            status = 500
            raise
        finally:
            self.stats.record_request(status, time.perf_counter() - t0)

    # -------------------------------------------------------------------- HTTP
    async def __call__(self, request: Request) -> JSONResponse:
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if route == "healthz" and request.method == "GET":
            return JSONResponse(self.health())
        if route == "metrics" and request.method == "GET":
            return JSONResponse(self.metrics())
        if route == "predict" and request.method == "POST":
            return await self._http_predict(request)
        return JSONResponse({"detail": f"no route {request.method} {request.url.path}; use "
                                       "POST /predict, GET /healthz, GET /metrics"},
                            status_code=404)

    async def _http_predict(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        status = 200
        try:
            require_json(request.headers.get("content-type"))
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise RequestError(413, f"body: {declared} bytes exceeds the limit of "
                                        f"{self.max_body_bytes}")
            body = await request.body()
            if len(body) > self.max_body_bytes:
                raise RequestError(413, f"body: {len(body)} bytes exceeds the limit of "
                                        f"{self.max_body_bytes}")
            x = parse_inputs(body, self.in_features, self.max_rows)
            out = await self.predict_batch(x)
            return JSONResponse({"outputs": out.tolist()})
        except RequestError as e:
            status = e.status
            return JSONResponse({"detail": e.detail}, status_code=e.status)
        except Exception as e:  # noqa: BLE001 - report, count, keep serving
            status = 500
            return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"},
                                status_code=500)
        finally:
            self.stats.record_request(status, time.perf_counter() - t0)

    # -------------------------------------------------------------------- health / metrics
    def check_health(self) -> None:
        """Called by Serve periodically; raising marks the replica unhealthy (it is replaced)."""
        if self._pool._shutdown:  # noqa: SLF001 - executor has no public "alive" flag
            raise RuntimeError("model executor is shut down")

    def health(self) -> dict[str, Any]:
        """Readiness facts: model, input width, thread budget, warm-up time."""
        return {
            "status": "ok", "model": self.model_uri, "in_features": self.in_features,
            "sparse_layers": self.sparse_layers, "threads": self.threads,
            "threads_source": self.threads_source,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(),
            "max_batch_size": self.max_batch_size, "max_rows": self.max_rows,
            "backends": sparsekit.backends(), "warmup_s": round(self.warmup_s, 4),
            "startup_s": round(self.startup_s, 3), "pid": self.pid,
            "replica": self.replica_id,
        }

    def metrics(self) -> dict[str, Any]:
        """This replica's counters: requests, errors (by status), batches, rows, latency."""
        snap = self.stats.snapshot()
        snap.update(replica=self.replica_id, pid=self.pid, threads=self.threads,
                    kernel_threads=self._kernel_threads_seen)
        return snap


#: The Serve deployment (``SparsekitDeployment.options(...).bind(model_uri, factory, ...)``).
SparsekitDeployment = serve.deployment(
    SparsekitReplica, name="SparsekitModel", ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64, health_check_period_s=5, health_check_timeout_s=30)


# ------------------------------------------------------------------------------ application
def build_app(model_uri: str, factory: str | Callable[..., torch.nn.Module], *,
              num_replicas: int | str = 1, num_cpus: float = 1.0,
              max_ongoing_requests: int = 64, autoscaling_config: Mapping[str, Any] | None = None,
              name: str = "SparsekitModel", **options: Any) -> Any:
    """Return the Serve application for a sparsekit model (pass it to ``serve.run``).

    Parameters
    ----------
    model_uri, factory
        See :class:`SparsekitReplica`; ``factory`` should be an import path string so the
        replicas (other processes, other nodes) can import it.
    num_replicas : int or "auto", default 1
        Replica count (ignored when ``autoscaling_config`` is given).
    num_cpus : float, default 1
        CPUs reserved per replica; also its kernel thread budget (floored, at least 1) unless
        ``threads`` or ``SPARSEKIT_NUM_THREADS`` is given.
    max_ongoing_requests : int, default 64
        Requests Serve routes to one replica at a time (must be >= ``max_batch_size`` for full
        batches).
    autoscaling_config : mapping, optional
        Serve autoscaling settings (``min_replicas``, ``max_replicas``,
        ``target_ongoing_requests``, ...).
    name : str
        Deployment name.
    **options
        Remaining :class:`SparsekitReplica` arguments (``factory_kwargs``, ``threads``,
        ``max_batch_size``, ``batch_wait_timeout_s``, ``max_rows``, ...).

    Returns
    -------
    ray.serve.Application
    """
    if not isinstance(num_cpus, (int, float)) or isinstance(num_cpus, bool) or num_cpus <= 0:
        raise ValueError(f"num_cpus: expected a positive number, got {num_cpus!r}")
    if isinstance(factory, str):
        if factory.count(":") != 1:
            raise ValueError(f"factory: expected 'package.module:function', got {factory!r}")
    kw: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": num_cpus},
        "max_ongoing_requests": _check_pos_int("max_ongoing_requests", max_ongoing_requests),
    }
    if autoscaling_config is not None:
        kw["autoscaling_config"] = dict(autoscaling_config)
    else:
        kw["num_replicas"] = num_replicas
    return SparsekitDeployment.options(**kw).bind(model_uri, factory, **options)


def app_builder(args: Mapping[str, Any]) -> Any:
    """Application builder for ``serve run`` / Serve config files.

    ``import_path: sparsekit.serving.ray:app_builder`` with ``args`` holding
    :func:`build_app`'s arguments (``model_uri`` and ``factory`` required).
    """
    a = dict(args)
    missing = [k for k in ("model_uri", "factory") if k not in a]
    if missing:
        raise ValueError(f"args: missing required keys {missing}; got {sorted(a)}")
    for k in ("num_replicas", "max_ongoing_requests", "threads", "max_batch_size", "max_rows",
              "max_body_bytes", "in_features", "warmup_max_rows"):
        if isinstance(a.get(k), str) and a[k].isdigit():  # `serve run ... key=value` passes str
            a[k] = int(a[k])
    for k in ("num_cpus", "batch_wait_timeout_s"):
        if isinstance(a.get(k), str):
            a[k] = float(a[k])
    return build_app(a.pop("model_uri"), a.pop("factory"), **a)
