"""Demos and benchmarks stop with a build hint when the compiled kernels are missing."""

from __future__ import annotations

import pytest

import sparsekit.kernels as kernels


def test_require_compiled_exits_with_build_hint(monkeypatch):
    monkeypatch.setattr(kernels, "backend_status",
                        lambda: {"cpp": (False, "module sparsekit.kernels.cpp failed to import")})
    expected = (r"mnist_prune: the compiled C\+\+ kernels \(sparsekit._C\) are not available "
                r"\(module sparsekit.kernels.cpp failed to import\); build them with "
                r"./tools/setup.sh")
    with pytest.raises(SystemExit, match=expected):
        kernels.require_compiled("mnist_prune")


def test_require_compiled_passes_when_built(monkeypatch):
    monkeypatch.setattr(kernels, "backend_status", lambda: {"cpp": (True, "avx512")})
    kernels.require_compiled("mnist_prune")  # returns, no exit
