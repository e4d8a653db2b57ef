"""Every CPU micro-kernel called directly, without the drivers, against a float64 reference.

``tests/cpp/ukernel_test.cpp`` is compiled once per ISA this CPU runs (with the flags the
extension uses for that ISA, via ``benchmarks/micro/build.sh``) and sweeps each micro-kernel's
edges: row lengths around the vector width and the unrolled steps, N around the tile widths,
empty rows / nnz = 0, ragged BSR blocks, uint16 index 65535 and int32 indices beyond it,
bf16 / fp16 values, int8 values with scales, uint8 column gaps with escapes. It reports the
number of mismatches per kernel; any mismatch fails here.

``SPARSEKIT_UKERNEL_CXXFLAGS`` adds compiler flags (``tools/sanitize.sh`` builds it with ASan +
UBSan this way).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ISA_ORDER = ["generic", "avx2", "avx512"]


def _hardware_isa() -> str:
    """The best kernel ISA this CPU runs, as the extension's own runtime dispatch detects it."""
    try:
        from sparsekit import _C
    except Exception as e:
        pytest.skip(f"sparsekit._C not importable ({type(e).__name__}: {e})")
    return str(_C.build_info()["isa_hardware"])


def _env() -> dict[str, str]:
    # A preloaded sanitizer runtime (tools/sanitize.sh) must not leak into the compiler; a
    # sanitized tester links its own.
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


@pytest.fixture(scope="module", params=ISA_ORDER)
def tester(request, tmp_path_factory) -> tuple[str, Path]:
    isa = request.param
    hw = _hardware_isa()
    if isa not in ISA_ORDER[: ISA_ORDER.index(hw) + 1]:
        pytest.skip(f"this CPU does not run {isa} (best: {hw})")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp(f"ukernel-{isa}")
    env = dict(_env(), ISA=isa, OUT=str(out), SRC=str(ROOT / "tests/cpp/ukernel_test.cpp"))
    extra = shlex.split(os.environ.get("SPARSEKIT_UKERNEL_CXXFLAGS", ""))
    r = subprocess.run(["bash", str(ROOT / "benchmarks/micro/build.sh"), "-O1", *extra],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"ukernel_test build failed ({isa}):\n{r.stderr[-4000:]}"
    assert "warning" not in r.stderr, f"ukernel_test build warnings ({isa}):\n{r.stderr[-4000:]}"
    return isa, out / "ukernel_test"


def test_every_micro_kernel_matches_reference(tester):
    isa, exe = tester
    r = subprocess.run([str(exe)], env=_env(), capture_output=True, text=True, timeout=300)
    report = r.stdout + r.stderr[-4000:]
    m = re.search(rf"ukernel_test {isa} \(W=\d+\): (\d+) checks, (\d+) mismatches", r.stdout)
    assert m, report
    assert r.returncode == 0 and int(m.group(2)) == 0, report
    kernels = dict(re.findall(r"^(\w+)\s+(\d+) checks", r.stdout, re.M))
    expected = {"csr_spmv", "csr_row_tile", "bsr_spmv_blockrow", "bsr_tile_rows", "q_row_dot",
                "q_row_bitmap_dot", "spmv_bitmap", "packing", "row_chunks", "row_read_probe",
                "row_gather_probe", "l2_trickle"}
    if isa != "generic":  # whole blocks in vector registers: SIMD builds only
        expected.add("bsr_spmv_blockrow_vec")
    assert set(kernels) == expected, report
    # row_chunks checks whole partitions (two checks per schedule) and l2_trickle one prefetch
    # range per case, the others single results
    few = {"row_chunks", "l2_trickle"}
    assert all(int(n) > (100 if k in few else 1000) for k, n in kernels.items()), report


def test_tester_rejects_bad_usage(tester):
    _, exe = tester
    r = subprocess.run([str(exe), "--nonsense"], env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr


def test_intrinsics_only_in_simd_header():
    """Raw SIMD intrinsics live in csrc/cpu/simd.h; kernels use its wrappers."""
    offenders = []
    for path in sorted((ROOT / "csrc/cpu").glob("*.[ch]*")):
        if path.name == "simd.h":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if re.search(r"\b_mm\w*\(|\b__m(128|256|512)\w*\b|immintrin\.h", code):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "intrinsics outside simd.h:\n" + "\n".join(offenders)


def test_no_stl_containers_in_isa_translation_units():
    """Code compiled once per ISA (csrc/cpu/*_{generic,avx2,avx512}.cpp and every csrc header
    they include) allocates through threading.h's Scratch, not STL containers: an out-of-line
    copy of a container's inline member compiled with AVX-512 flags could be the one the
    linker keeps for every translation unit (threading.h)."""
    tus = sorted(p for p in (ROOT / "csrc/cpu").glob("*.cpp")
                 if re.search(r"_(generic|avx2|avx512)\.cpp$", p.name))
    assert len(tus) >= 9
    seen, todo, offenders = set(), list(tus), []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for i, line in enumerate(path.read_text().splitlines(), 1):
            inc = re.match(r'\s*#include "([^"]+)"', line)
            if inc and (ROOT / "csrc" / inc.group(1)).exists():
                todo.append(ROOT / "csrc" / inc.group(1))
            code = line.split("//", 1)[0]
            if re.search(r"std::(vector|deque|list|map|set|unordered_\w+|function|shared_ptr|"
                         r"unique_ptr|basic_string)\b|#include <(vector|map|functional|memory)>",
                         code):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "STL containers in per-ISA code:\n" + "\n".join(offenders)
