"""The CUDA kernels compile wherever nvcc exists.

* Fast: if ``nvcc`` is on PATH and the installed ``sparsekit._C`` was built with
  SPARSEKIT_CUDA=AUTO or ON, it must contain the CUDA kernels (``_C.cuda_built()``), so a CI
  build on a machine with nvcc fails when the CUDA sources were silently left out. The module
  must import and answer ``cuda_device_count()`` without a GPU or driver (static cudart, lazy).
* Slow (``-m slow``): a full isolated ``cmake -DSPARSEKIT_CUDA=ON`` build in a temporary
  directory, checking the module links no shared CUDA runtime and no libtorch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _C_or_skip():
    try:
        from sparsekit import _C
    except Exception as e:
        pytest.skip(f"sparsekit._C not importable ({type(e).__name__}: {e})")
    if not hasattr(_C, "cuda_info"):
        pytest.fail("sparsekit._C has no cuda_info(): stale build or CUDA bindings missing")
    return _C


def test_cuda_stub_api_always_present():
    _C = _C_or_skip()
    info = dict(_C.cuda_info())
    assert isinstance(info["built"], bool) and info["built"] == _C.cuda_built()
    n = _C.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    assert _C.cuda_available() == (info["built"] and n > 0)
    if not info["built"]:
        assert not hasattr(_C, "cuda_csr_linear")


def test_cuda_built_where_nvcc_exists():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the CUDA kernels are not expected in this build")
    _C = _C_or_skip()
    info = dict(_C.cuda_info())
    if info.get("requested") == "OFF":
        pytest.skip("sparsekit._C was built with SPARSEKIT_CUDA=OFF (e.g. tools/build_inplace.sh "
                    "default); CI builds with AUTO")
    assert _C.cuda_built(), (
        f"nvcc is on PATH and the build asked for SPARSEKIT_CUDA={info.get('requested')}, but "
        "sparsekit._C has no CUDA kernels: cmake/cuda.cmake did not find or use the compiler")
    assert info["runtime_version"] >= 11000
    assert "80" in info["archs"] and "90" in info["archs"], info["archs"]
    assert hasattr(_C, "cuda_csr_linear") and hasattr(_C, "cuda_bsr_linear")


@pytest.mark.slow
def test_isolated_cuda_build(tmp_path):
    """cmake -DSPARSEKIT_CUDA=ON from scratch (about 2-4 min of nvcc on 2 cores)."""
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("no nvcc")
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    import pybind11

    build = tmp_path / "build-cuda"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = ["cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
           f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
           "-DSPARSEKIT_CUDA=ON"]
    t0 = time.perf_counter()
    r = subprocess.run(cfg, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "CUDA kernels enabled" in r.stdout
    r = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                       capture_output=True, text=True, timeout=1500)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    libs = list(build.glob("_C*.so"))
    assert libs, "no module produced"
    print(f"isolated CUDA build: {elapsed:.0f} s")
    ldd = subprocess.run(["ldd", str(libs[0])], capture_output=True, text=True).stdout
    assert "libcudart.so" not in ldd, "CUDA runtime must be linked statically:\n" + ldd
    assert "libtorch" not in ldd and "libc10" not in ldd, ldd
    # Import the fresh module by itself: works without a GPU/driver, reports built = True.
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('_C', {str(libs[0])!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.cuda_built(), m.cuda_device_count() >= 0, m.cuda_info()['archs'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["True", "True"], r.stdout


# --------------------------------------------------------------------------- Python glue
# Parameter names of the bindings (csrc/bindings.cpp); checked against the real docstrings
# when the module has the CUDA kernels.
_CSR_ARGS = ["indptr", "indices", "values", "x", "out", "bias", "row_order", "n_rows", "n_cols",
             "batch", "nnz", "value_dtype", "x_dtype", "out_dtype", "indptr_dtype",
             "index_dtype", "ldx", "ldy", "stream"]
_BSR_ARGS = ["indptr", "indices", "values", "x", "out", "bias", "n_rows", "n_cols", "batch",
             "nnz_blocks", "block_r", "block_c", "value_dtype", "x_dtype", "out_dtype",
             "indptr_dtype", "index_dtype", "ldx", "ldy", "stream"]


def _host_array(ptr: int, n: int, code: str):
    """numpy view of n elements at a host address (the fake reads CPU tensors by pointer)."""
    import ctypes

    import numpy as np

    dt = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "int32": np.int32,
          "int64": np.int64, "uint16": np.uint16}[code]
    if n == 0:
        return np.zeros(0, dt)
    buf = (ctypes.c_char * (n * np.dtype(dt).itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype=dt, count=n)


def _to64(a, code):
    import numpy as np

    if code == "bf16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


class _FakeC:
    """Stands in for sparsekit._C: reads the buffers behind the pointers (CPU tensors here) and
    computes y in float64, so the argument order/values sent by kernels/cuda.py are checked."""

    calls: list

    def __init__(self):
        self.calls = []

    @staticmethod
    def cuda_built():
        return True

    def cuda_csr_linear(self, *args):
        import numpy as np

        a = dict(zip(_CSR_ARGS, args))
        self.calls.append(("csr", a))
        M, K, N, nnz = a["n_rows"], a["n_cols"], a["batch"], a["nnz"]
        ip = _host_array(a["indptr"], M + 1, a["indptr_dtype"]).astype(np.int64)
        ix = _host_array(a["indices"], nnz, a["index_dtype"]).astype(np.int64)
        v = _to64(_host_array(a["values"], nnz, a["value_dtype"]), a["value_dtype"])
        x = _to64(_host_array(a["x"], N * a["ldx"], a["x_dtype"]), a["x_dtype"])
        x = x.reshape(N, a["ldx"])[:, :K]
        w = np.zeros((M, K))
        rows = np.repeat(np.arange(M), np.diff(ip))
        w[rows, ix] = v
        y = x @ w.T
        if a["bias"]:
            y += _host_array(a["bias"], M, "f32")
        if a["row_order"]:
            ro = _host_array(a["row_order"], M, "int32")
            assert sorted(ro.tolist()) == list(range(M))
        self._write(a, y)

    def cuda_bsr_linear(self, *args):
        import numpy as np

        a = dict(zip(_BSR_ARGS, args))
        self.calls.append(("bsr", a))
        M, K, N, nb = a["n_rows"], a["n_cols"], a["batch"], a["nnz_blocks"]
        r, c = a["block_r"], a["block_c"]
        Mb = -(-M // r)
        ip = _host_array(a["indptr"], Mb + 1, a["indptr_dtype"]).astype(np.int64)
        ix = _host_array(a["indices"], nb, a["index_dtype"]).astype(np.int64)
        v = _to64(_host_array(a["values"], nb * r * c, a["value_dtype"]), a["value_dtype"])
        v = v.reshape(nb, r, c)
        Kb = -(-K // c)
        w = np.zeros((Mb * r, Kb * c))
        for i in range(Mb):
            for b in range(ip[i], ip[i + 1]):
                w[i * r:(i + 1) * r, ix[b] * c:(ix[b] + 1) * c] = v[b]
        x = _to64(_host_array(a["x"], N * a["ldx"], a["x_dtype"]), a["x_dtype"])
        y = x.reshape(N, a["ldx"])[:, :K] @ w[:M, :K].T
        if a["bias"]:
            y += _host_array(a["bias"], M, "f32")
        self._write(a, y)

    @staticmethod
    def _write(a, y):
        import numpy as np
        import torch

        N, M = y.shape
        out = _host_array(a["out"], N * a["ldy"], a["out_dtype"]).reshape(N, a["ldy"])
        t = torch.from_numpy(y).to({"f32": torch.float32, "f16": torch.float16,
                                    "bf16": torch.bfloat16}[a["out_dtype"]])
        if a["out_dtype"] == "bf16":
            t = t.view(torch.int16)
        np.copyto(out[:, :M], t.numpy().view(out.dtype))
        assert a["out_dtype"] == a["x_dtype"] and isinstance(a["stream"], int)


def test_backend_glue_passes_matching_arguments(monkeypatch):
    """kernels/cuda.py -> _C.cuda_*_linear argument contract, checked with a fake _C on CPU."""
    import contextlib
    import types

    import torch
    from reference import assert_close_to_reference, random_block_pruned, random_pruned, random_x

    from sparsekit import BSRMatrix, CSRMatrix
    from sparsekit.kernels import cuda as kc

    try:  # the real binding, when built with CUDA, must have exactly these parameters
        from sparsekit import _C

        if getattr(_C, "cuda_built", lambda: False)():
            for fn, names in ((_C.cuda_csr_linear, _CSR_ARGS), (_C.cuda_bsr_linear, _BSR_ARGS)):
                sig = fn.__doc__.split("(", 1)[1].split(")", 1)[0]
                assert [p.split(":")[0].strip() for p in sig.split(",")] == names
    except ImportError:
        pass
    fake = _FakeC()
    monkeypatch.setattr(kc, "_C", fake)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda d=None: types.SimpleNamespace(cuda_stream=1234))
    be = kc.backend
    cases = [
        (CSRMatrix.from_dense(random_pruned(37, 70, 0.6, seed=1, dtype=torch.bfloat16)),
         torch.bfloat16, True),
        (CSRMatrix.from_dense(random_pruned(20, 70_000, 0.9995, seed=2, dtype=torch.float16)),
         torch.float32, False),
        (BSRMatrix.from_dense(random_block_pruned(50, 40, (16, 16), 0.5, seed=3,
                                                  dtype=torch.float16), blocksize=(16, 16)),
         torch.float16, True),
    ]
    # a skewed CSR so the row-swizzle permutation is built and sent
    w = random_pruned(40, 64, 0.95, seed=4)
    w[3] = random_x((64,), seed=5)
    cases.append((CSRMatrix.from_dense(w), torch.float32, False))
    for mat, xdt, with_bias in cases:
        M, K = mat.shape
        x = random_x((3, K), seed=6, dtype=xdt)
        bias = random_x((M,), seed=7) if with_bias else None
        out = torch.full((3, M), float("nan"), dtype=xdt)
        be.linear(mat, x, bias, out)
        assert fake.calls[-1][1]["stream"] == 1234
        assert_close_to_reference(out, x, mat.to_dense(), bias, msg=f"glue {type(mat).__name__}")
    assert fake.calls[-1][1]["row_order"] != 0  # skewed case sent a permutation
    assert fake.calls[0][1]["row_order"] == 0  # uniform rows: no swizzle
