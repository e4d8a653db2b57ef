"""``benchmarks/micro/kernel_micro.cpp`` (the stand-alone kernel timing tool behind the README's
bound analysis) compiles against the current kernels and its reference checks agree.

It includes ``csrc/cpu/kernels_impl.h`` directly, so kernel refactors that break it show here.
Sizes are tiny: this checks the tool, not speed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _isa() -> str:
    """The best kernel ISA this CPU runs, as the extension's own runtime dispatch detects it."""
    try:
        from sparsekit import _C
    except Exception as e:
        pytest.skip(f"sparsekit._C not importable ({type(e).__name__}: {e})")
    return str(_C.build_info()["isa_hardware"])


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("micro")
    env = dict(os.environ, ISA=_isa(), OUT=str(out))
    r = subprocess.run(["bash", str(ROOT / "benchmarks/micro/build.sh"), "-O1"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"kernel_micro build failed:\n{r.stderr[-4000:]}"
    return out / "kernel_micro"


@pytest.mark.parametrize("args", [
    ["csr", "37", "700", "70", "0.3", "2"],  # K-blocked walk, 2 batch tiles, 2 threads
    ["csr", "37", "700", "70", "0.3", "2", "v=11"],  # csr_tile_v8: 8-vector tiles, K-blocked
    ["csr", "33", "97", "5", "0.5"],
    ["bsr", "45", "3001", "65", "0.5", "3", "4", "2"],  # ragged blocks, many L1 groups
    ["spmv", "97", "1025", "0.2", "2", "warm"],
    ["spmv", "40", "2000", "0.3", "1", "warm", "bf16"],
])
def test_kernel_micro_reference_check(micro, args):
    _run_checked(micro, args)


@pytest.mark.parametrize("variant", ["v=1", "v=2"])  # csr_spmv_gather, csr_spmv_assemble
def test_kernel_micro_spmv_bounds_checks_both_value_widths(micro, variant):
    if _isa() == "generic":
        pytest.skip("spmv-bounds is built for the SIMD ISAs only")
    _run_checked(micro, ["spmv-bounds", "40", "2000", "0.3", "2", variant])


def _run_checked(micro: Path, args: list[str]) -> None:
    r = subprocess.run([str(micro), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"max err ([0-9.e+-]+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) < 1e-4, r.stdout


def test_kernel_micro_rejects_bad_usage(micro):
    r = subprocess.run([str(micro), "nonsense"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.fixture(scope="module")
def q_micro(tmp_path_factory) -> Path:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("q_micro")
    env = dict(os.environ, ISA=_isa(), OUT=str(out), SRC=str(ROOT / "benchmarks/micro/q_micro.cpp"))
    r = subprocess.run(["bash", str(ROOT / "benchmarks/micro/build.sh"), "-O1"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"q_micro build failed:\n{r.stderr[-4000:]}"
    return out / "q_micro"


@pytest.mark.parametrize("coding", ["u16", "d8"])
def test_q_micro_alternates_the_variants_it_is_given(q_micro, coding):
    """Several ``v=`` ids are timed in one process and each is checked against float64."""
    r = subprocess.run([str(q_micro), "40", "2000", "0.3", "2", "warm", coding, "i8",
                        "v=12,13,17"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [re.search(r" v=(\d+) ", ln).group(1) for ln in lines] == ["12", "13", "17"], r.stdout
    for ln in lines:
        assert float(re.search(r"max rel err ([0-9.e+-]+)", ln).group(1)) < 1e-4, ln


def test_q_micro_rejects_a_bad_variant_list(q_micro):
    r = subprocess.run([str(q_micro), "40", "2000", "0.3", "1", "warm", "v=12,x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert re.search(r"v: expected variant ids in \[0, \d+\) separated by commas, got '12,x'",
                     r.stderr), r.stderr
