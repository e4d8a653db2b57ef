"""Shared pytest setup: seeds, the list of available backends, required-backend enforcement."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Kernels compiled by Numba are cached on disk; keep the cache out of the source tree so
# parallel checkouts/CI don't fight over __pycache__ (an explicit user setting wins).
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".numba_cache")
)

_REQUIRE_ENV = "SPARSEKIT_REQUIRE_BACKENDS"


def available_backends() -> list[str]:
    """Names of the usable backends (cpp / cuda / numba_cuda appear automatically when built).

    Reads the registry without the SPARSEKIT_REQUIRE_BACKENDS check so collection itself never
    fails; the autouse fixture below reports a missing required backend loudly instead.
    """
    from sparsekit.kernels import backend_status

    return [name for name, (ok, _desc) in backend_status().items() if ok]


def cpu_backends() -> list[str]:
    """Usable backends that run on CPU tensors."""
    return [b for b in available_backends() if b in ("cpp", "numba", "torch")]


@pytest.fixture(autouse=True)
def _seed_everything():
    """Fixed seeds for every test (tests also pass explicit seeds to the generators)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _required_backends_present():
    """With SPARSEKIT_REQUIRE_BACKENDS=cpp,numba (CI), fail every test if one is missing."""
    req = [s.strip() for s in os.environ.get(_REQUIRE_ENV, "").split(",") if s.strip()]
    if req:
        from sparsekit.kernels import backend_status

        status = backend_status()
        missing = {n: status.get(n, (False, "unknown backend name"))[1] for n in req
                   if not status.get(n, (False, ""))[0]}
        if missing:
            pytest.fail(
                f"{_REQUIRE_ENV}={os.environ[_REQUIRE_ENV]!r} but unavailable: {missing}",
                pytrace=False,
            )
    yield


@pytest.fixture(scope="session")
def backend_names() -> list[str]:
    """Usable backend names."""
    return available_backends()
