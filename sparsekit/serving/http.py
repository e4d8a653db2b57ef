"""HTTP request parsing shared by sparsekit's serving front ends.

Used by the FastAPI example server (``examples/server``) and by the Ray Serve deployment
(:mod:`sparsekit.serving.ray`), so both accept exactly the same requests and give the same
errors, and count requests the same way (:class:`RequestStats`). Only numpy and the standard
library are imported here.

Request body: ``{"inputs": [[f, ...], ...]}`` (N rows of ``n_features`` finite numbers).
Errors are :class:`RequestError` with an HTTP status: 400 malformed JSON, 413 too many rows,
422 wrong structure / shape / type or a non-finite value.
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from typing import Any

import numpy as np

__all__ = ["RequestError", "RequestStats", "parse_inputs", "require_json"]


class RequestError(Exception):
    """A client error: HTTP ``status`` with a message for the ``detail`` field."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def require_json(content_type: str | None) -> None:
    """Raise a 415 :class:`RequestError` unless ``content_type`` is JSON (absent means JSON)."""
    ctype = content_type or "application/json"
    if not ctype.split(";")[0].strip().lower().endswith("json"):
        raise RequestError(415, f"content-type: expected application/json, got {ctype}")


def _reject_constant(name: str) -> float:
    raise RequestError(422, f"inputs: non-finite value {name} is not allowed")


_BOOL_RE = re.compile(rb"\b(true|false|null)\b")


def parse_inputs(body: bytes, n_features: int, max_batch: int) -> np.ndarray:
    """Validate a /predict body and return a float32 ``(N, n_features)`` array.

    Raises
    ------
    RequestError
        With the HTTP status and a message naming what was wrong.
    """
    if not body:
        raise RequestError(400, "body: empty; expected JSON {\"inputs\": [[...], ...]}")
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body: invalid JSON ({e})") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError(422, "body: expected a JSON object with key 'inputs', got "
                                + (f"keys {sorted(doc)[:5]}" if isinstance(doc, dict)
                                   else type(doc).__name__))
    extra = sorted(set(doc) - {"inputs"})
    if extra:
        raise RequestError(422, f"body: unexpected keys {extra[:5]}; only 'inputs' is accepted")
    rows = doc["inputs"]
    if not isinstance(rows, list):
        raise RequestError(422, f"inputs: expected a list of rows, got {type(rows).__name__}")
    if len(rows) == 0:
        raise RequestError(422, "inputs: empty batch; send at least one row")
    if not isinstance(rows[0], list):
        raise RequestError(422, "inputs: expected a 2-D list (a list of rows), got a list of "
                                f"{type(rows[0]).__name__}")
    if len(rows) > max_batch:
        raise RequestError(413, f"inputs: batch of {len(rows)} rows exceeds the limit of "
                                f"{max_batch}")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise RequestError(422, f"inputs: row {i}: expected a list of {n_features} numbers, "
                                    f"got {type(row).__name__}")
        if len(row) != n_features:
            raise RequestError(422, f"inputs: row {i}: expected {n_features} numbers, "
                                    f"got {len(row)}")
    # JSON true/false/null would be coerced (or turn the array into dtype=object): find them.
    if _BOOL_RE.search(body):
        _find_bad_element(rows)
    try:
        arr = np.array(rows)
    except (ValueError, TypeError) as e:  # pragma: no cover - shapes were checked above
        raise RequestError(422, f"inputs: not a rectangular array of numbers ({e})") from None
    if arr.dtype.kind not in "fiu":
        _find_bad_element(rows)
        raise RequestError(422, f"inputs: expected numbers, got array of {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        x = arr.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise RequestError(422, f"inputs: row {i} column {j}: value {rows[i][j]!r} is not a "
                                "finite float32")
    return np.ascontiguousarray(x)


def _find_bad_element(rows: list[list[Any]]) -> None:
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(422, f"inputs: row {i} column {j}: expected a number, got "
                                        f"{'null' if v is None else type(v).__name__}")


class RequestStats:
    """Thread-safe request/error counters and a sliding window of request latencies."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.by_status: dict[int, int] = {}
        self._lat: deque[float] = deque(maxlen=window)

    def record_request(self, status: int, seconds: float) -> None:
        with self._lock:
            self.requests += 1
            if status >= 400:
                self.errors += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            self._lat.append(seconds)

    def _counters(self) -> dict[str, Any]:
        """Counters for :meth:`snapshot`, read under the lock (subclasses add theirs)."""
        return {"requests": self.requests, "errors": self.errors,
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())}}

    def snapshot(self) -> dict[str, Any]:
        """Counters plus p50/p90/p99 latency (ms) over the window."""
        with self._lock:
            lat = np.array(self._lat, dtype=np.float64)
            out = self._counters()
            out["latency_window"] = int(lat.size)
        if lat.size:
            p50, p90, p99 = np.percentile(lat, [50, 90, 99]) * 1e3
            out["latency_ms"] = {"p50": round(float(p50), 3), "p90": round(float(p90), 3),
                                 "p99": round(float(p99), 3)}
        else:
            out["latency_ms"] = {"p50": None, "p90": None, "p99": None}
        return out
