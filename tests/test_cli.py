"""Tests of the ``sparsekit`` command line (``sparsekit bench layer|model|compare``)."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsekit import cli
from sparsekit.bench import common, report
from sparsekit.bench.layer import RECORD_KEYS

# Tiny, fast, single-threaded (no OpenMP hand-offs), no rotation (copies would be pointless at
# these sizes), no bandwidth measurement (it allocates 4 x LLC).
FAST = ["--threads", "1", "--warmup", "0", "--min-reps", "2", "--min-time", "0",
        "--rotate-factor", "0", "--no-bandwidth", "--backends", "cpp"]


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    """One small layer sweep shared by several tests (JSON, CSV, PNG, stdout)."""
    d = tmp_path_factory.mktemp("layer")
    paths = {k: d / f"r.{k}" for k in ("json", "csv", "png")}
    argv = ["bench", "layer", "--shapes", "24x40,33x17", "--batches", "1,3",
            "--sparsities", "0.5,0.9", "--formats", "csr,bsr4x4", "--dtypes", "fp32,bf16",
            "--bias", *FAST, "--out", str(paths["json"]), "--csv", str(paths["csv"]),
            "--plot", str(paths["png"])]
    buf_out, buf_err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = buf_out, buf_err
    try:
        code = cli.main(argv)
    finally:
        sys.stdout, sys.stderr = old
    return code, buf_out.getvalue(), buf_err.getvalue(), paths


def test_layer_table_columns(layer_run):
    code, out, err, _ = layer_run
    assert code == 0, err
    lines = out.splitlines()
    header = next(l for l in lines if l.startswith("case") and "sparsity" in l)
    for col in (*report.PIVOT_COLUMNS, "sparsekit:cpp", "torch.sparse", "scipy"):
        assert col in header, col
    dense_header = next(l for l in lines if l.startswith("case") and "fastest" in l)
    for col in ("F.linear ms", "torch.matmul ms", "onednn ms", "numpy ms"):
        assert col in dense_header
    # bf16 rows show scipy / torch.sparse as "n/s" (not supported) instead of hiding them
    bf16_rows = [l for l in lines if l.startswith("24x40") and " bf16 " in l and "csr" in l]
    assert bf16_rows and all("n/s" in l for l in bf16_rows)
    assert "not timed:" in out and "scipy.sparse has no bf16" in out
    assert err == ""  # no progress bar when stderr is not a TTY


def test_layer_json_records(layer_run):
    code, _, _, paths = layer_run
    doc = json.loads(paths["json"].read_text())
    assert doc["schema"] == common.SCHEMA and doc["mode"] == "layer"
    for key in ("created_utc", "argv", "config", "machine", "results", "elapsed_s"):
        assert key in doc
    assert doc["machine"]["num_threads"] == 1
    assert doc["config"]["shapes"] == ["24x40", "33x17"]
    res = doc["results"]
    # 2 shapes x 2 dtypes x 2 batches x (5 dense + 2 sparsities x 2 formats x 3 sparse)
    assert len(res) == 2 * 2 * 2 * (5 + 2 * 2 * 3)
    for r in res:
        assert set(r) == set(RECORD_KEYS)
        assert r["status"] in common.STATUSES
    ok = [r for r in res if r["status"] == common.OK]
    assert ok
    for r in ok:
        assert 0 < r["p10_s"] <= r["median_s"] <= r["p90_s"]
        assert r["reps"] >= 2
        assert r["max_rel_err"] <= r["tol"]
        assert math.isclose(r["speedup_vs_flinear"], r["flinear_median_s"] / r["median_s"])
        assert math.isclose(r["speedup_vs_best_dense"], r["best_dense_median_s"] / r["median_s"])
        assert r["best_dense_median_s"] <= r["flinear_median_s"]
    by = {(r["shape"], r["dtype"], r["batch"], r["format"], r["sparsity"], r["contender"]): r
          for r in res}
    assert by[("24x40", "fp32", 1, None, None, "dense:F.linear")]["status"] == common.OK
    assert by[("24x40", "bf16", 3, "csr", 0.9, "scipy")]["status"] == common.UNSUPPORTED
    assert by[("24x40", "fp32", 3, "bsr4x4", 0.5, "scipy")]["status"] == common.OK
    # 33x17 is not a multiple of the 4x4 block: torch/scipy BSR cannot store it
    assert by[("33x17", "fp32", 1, "bsr4x4", 0.5, "torch.sparse")]["status"] == \
        common.UNSUPPORTED
    # the sparsekit matrix had the requested sparsity
    r = by[("24x40", "fp32", 1, "csr", 0.9, "scipy")]
    assert r["nnz"] == round(0.1 * 24 * 40)


def test_layer_csv_and_png(layer_run):
    _, _, _, paths = layer_run
    with open(paths["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    doc = json.loads(paths["json"].read_text())
    assert len(rows) == len(doc["results"])
    assert list(rows[0])[: len(RECORD_KEYS)] == list(RECORD_KEYS)
    assert {"date_utc", "git_commit", "cpu_model"} <= set(rows[0])
    assert {r["status"] for r in rows} <= set(common.STATUSES)
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_long_table_and_quiet(tmp_path, capsys):
    argv = ["bench", "layer", "--shapes", "16x32", "--batches", "2", "--sparsities", "0.8",
            "--formats", "csr", "--dtypes", "fp32", "--contenders", "dense,scipy",
            "--table", "long", *FAST]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    header = next(l for l in out.splitlines() if l.startswith("case") and "contender" in l)
    for col in report.LONG_COLUMNS:
        assert col in header
    assert "scipy" in out and "dense:F.linear" in out
    code, out, err = _run([*argv, "--quiet", "--out", str(tmp_path / "q.json")], capsys)
    assert code == 0 and out == "" and err == ""
    assert json.loads((tmp_path / "q.json").read_text())["results"]


def test_wrong_contender_is_reported_and_never_timed(monkeypatch, capsys, tmp_path):
    import torch

    import sparsekit

    calls = []

    def bad_linear(x, w, bias=None, *, backend="auto"):
        calls.append(backend)
        return torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)

    monkeypatch.setattr(sparsekit, "linear", bad_linear)
    out_json = tmp_path / "w.json"
    argv = ["bench", "layer", "--shapes", "16x32", "--batches", "2", "--sparsities", "0.5",
            "--formats", "csr", "--dtypes", "fp32", "--contenders", "sparsekit",
            *FAST, "--out", str(out_json)]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    res = json.loads(out_json.read_text())["results"]
    sk = [r for r in res if r["contender"].startswith("sparsekit:")]
    assert sk and all(r["status"] in (common.WRONG, common.UNAVAILABLE) for r in sk)
    wrong = [r for r in sk if r["status"] == common.WRONG]
    if not wrong:
        pytest.skip("cpp backend not built here")
    assert all(r["median_s"] is None and r["max_rel_err"] > r["tol"] for r in wrong)
    assert len(calls) == len(wrong)  # called once for the check, never timed
    assert "WRONG" in out


def _doc(results):
    return {"schema": common.SCHEMA, "mode": "layer", "machine": {"cpu_model": "x"},
            "results": results}


def _rec(contender, median, status="ok", batch=1):
    return {"mode": "layer", "device": "cpu", "dtype": "fp32", "shape": "8x8", "model": None,
            "batch": batch, "sparsity": 0.9, "format": "csr", "contender": contender,
            "status": status, "median_s": median, "speedup_vs_best_dense": 1e-3 / median
            if median else None}


def test_compare_flags_planted_regression(tmp_path, capsys, layer_run):
    _, _, _, paths = layer_run
    # identical files: no regression
    code, out, _ = _run(["bench", "compare", str(paths["json"]), str(paths["json"])], capsys)
    assert code == 0 and "0 regression(s)" in out
    # plant a 3x slowdown in one timed record
    doc = json.loads(paths["json"].read_text())
    victim = next(r for r in doc["results"] if r["status"] == "ok"
                  and r["contender"] == "scipy")
    victim["median_s"] *= 3
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(doc))
    code, out, _ = _run(["bench", "compare", str(paths["json"]), str(slow)], capsys)
    assert code == 1
    assert "1 regression(s)" in out and "REGRESSION" in out and "scipy" in out
    # a generous threshold accepts it; the reverse direction is an improvement
    code, _, _ = _run(["bench", "compare", str(paths["json"]), str(slow), "--threshold",
                       "5"], capsys)
    assert code == 0
    code, out, _ = _run(["bench", "compare", str(slow), str(paths["json"])], capsys)
    assert code == 0 and "1 improvement(s)" in out


def test_compare_status_change_and_metric(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_doc([_rec("sparsekit:cpp", 1e-3), _rec("scipy", 2e-3)])))
    b.write_text(json.dumps(_doc([_rec("sparsekit:cpp", None, status="WRONG"),
                                  _rec("scipy", 2.05e-3), _rec("new", 1e-3)])))
    code, out, _ = _run(["bench", "compare", str(a), str(b)], capsys)
    assert code == 1 and "STATUS" in out and "1 only in new" in out
    b.write_text(json.dumps(_doc([_rec("sparsekit:cpp", 1e-3), _rec("scipy", 4e-3)])))
    code, out, _ = _run(["bench", "compare", str(a), str(b), "--metric",
                         "speedup_vs_best_dense"], capsys)
    assert code == 1 and "scipy" in out


@pytest.mark.parametrize("argv, needle", [
    (["bench", "layer", "--batches", "0"], "--batches"),
    (["bench", "layer", "--batches", "two"], "--batches"),
    (["bench", "layer", "--sparsities", "1.5"], "--sparsities"),
    (["bench", "layer", "--formats", "bsr0x4"], "--formats"),
    (["bench", "layer", "--formats", "coo"], "--formats"),
    (["bench", "layer", "--shapes", "12"], "--shapes"),
    (["bench", "layer", "--dtypes", "fp64"], "--dtypes"),
    (["bench", "layer", "--devices", "tpu"], "--devices"),
    (["bench", "layer", "--contenders", "cusparse"], "contenders"),
    (["bench", "layer", "--table", "wide"], "--table"),
    (["bench", "layer", "--out", "/nonexistent/dir/r.json"], "--out"),
    (["bench", "layer", "--formats", "auto"], "auto"),
    (["bench", "model", "--model", "resnet9000"], "--model"),
    (["bench", "model", "--model", "weights.safetensors"], "--weights"),
    (["bench", "model", "--model", "not a path:"], "--model"),
    (["bench", "model", "--model", "no_such_module_xyz:make"], "cannot import"),
    (["bench", "model", "--weights", "/nonexistent.safetensors"], "--weights"),
    (["bench", "compare", "/nonexistent/a.json", "/nonexistent/b.json"], "old"),
    (["bench", "frobnicate"], "frobnicate"),
])
def test_bad_arguments_give_clear_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main([*argv, "--no-bandwidth"] if argv[1] in ("layer", "model") else argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_compare_rejects_non_benchmark_json(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text('{"hello": 1}')
    with pytest.raises(SystemExit) as ei:
        cli.main(["bench", "compare", str(p), str(p)])
    assert ei.value.code == 2
    assert "not a sparsekit benchmark file" in capsys.readouterr().err
    p.write_text("{nope")
    with pytest.raises(SystemExit):
        cli.main(["bench", "compare", str(p), str(p)])
    assert "not valid JSON" in capsys.readouterr().err


def test_hf_model_without_transformers(capsys):
    pytest.importorskip("torch")
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("transformers installed: the hf: path would download a model")
    code, _, err = _run(["bench", "model", "--model", "hf:bert-base-uncased", *FAST], capsys)
    assert code == 1 and "transformers" in err and "pip install" in err


def test_model_builtin_and_factory(tmp_path, capsys, monkeypatch):
    out_json = tmp_path / "m.json"
    argv = ["bench", "model", "--model", "mnist-mlp", "--batches", "2", "--sparsities", "0.9",
            "--formats", "csr", "--dtypes", "fp32", "--dense", "F.linear,torch.matmul", *FAST,
            "--out", str(out_json)]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    assert "LeNet-300-100" in out
    doc = json.loads(out_json.read_text())
    assert doc["mode"] == "model" and doc["config"]["model"] == "mnist-mlp"
    res = doc["results"]
    dense = {r["contender"]: r for r in res if r["family"] == "dense"}
    assert set(dense) == {"dense:F.linear", "dense:torch.matmul"}
    assert all(r["status"] == common.OK for r in dense.values())
    sk = [r for r in res if r["contender"] == "sparsekit:cpp"]
    assert len(sk) == 1 and sk[0]["sparsity"] == 0.9 and sk[0]["format"] == "csr"
    assert sk[0]["status"] in (common.OK, common.UNAVAILABLE)

    # a user model from an import path, returning (module, example_input)
    pkg = tmp_path / "userpkg_bench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent("""
        import torch
        def make():
            m = torch.nn.Sequential(torch.nn.Linear(20, 12), torch.nn.ReLU(),
                                    torch.nn.Linear(12, 5))
            return m, torch.zeros(1, 20)
        def not_a_model():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = _run(["bench", "model", "--model", "userpkg_bench.models:make", "--batches",
                         "3", "--sparsities", "0.5", "--formats", "bsr2x2", "--dtypes", "fp32",
                         "--dense", "F.linear", *FAST, "--table", "long"], capsys)
    assert code == 0 and "userpkg_bench.models:make" in out and "bsr2x2" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "model", "--model", "userpkg_bench.models:not_a_model", *FAST])
    assert "returned int" in capsys.readouterr().err


def test_bench_without_mode_means_layer():
    assert cli._normalise_argv(["bench"]) == ["bench", "layer"]
    assert cli._normalise_argv(["bench", "--batches", "1"]) == ["bench", "layer", "--batches",
                                                                "1"]
    assert cli._normalise_argv(["bench", "--help"]) == ["bench", "--help"]
    assert cli._normalise_argv(["bench", "model"]) == ["bench", "model"]


def test_progress_bar_only_on_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    bar = common.Progress(4, stream=s)
    bar.advance("a")
    bar.advance("b", n=3)
    bar.close()
    text = s.getvalue()
    assert "\r[" in text and "4/4" in text and text.endswith("\r")
    quiet = Tty()
    bar = common.Progress(4, stream=quiet, enabled=False)
    bar.advance("a")
    bar.close()
    assert quiet.getvalue() == ""
    plain = io.StringIO()  # not a TTY
    bar = common.Progress(4, stream=plain)
    bar.advance("a")
    bar.close()
    assert plain.getvalue() == ""


def test_python_dash_m_entry_point(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "sparsekit", "info"], capture_output=True,
                          text=True, cwd=root, timeout=60)
    assert proc.returncode == 0
    info = json.loads(proc.stdout)
    assert "cpu_model" in info and "sparsekit" in info


def test_show_renders_saved_run_as_markdown(layer_run, capsys, tmp_path):
    _, _, _, paths = layer_run
    png = tmp_path / "again.png"
    code, out, _ = _run(["bench", "show", str(paths["json"]), "--markdown", "--plot", str(png)],
                        capsys)
    assert code == 0
    md_headers = [l for l in out.splitlines() if l.startswith("| case |")]
    assert len(md_headers) == 2  # dense baselines + sparse contenders
    assert "| sparsekit:cpp |" in md_headers[1] or "sparsekit:cpp" in md_headers[1]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_rotation_copies_recorded(tmp_path, capsys):
    from sparsekit.bench import harness as h

    out_json = tmp_path / "rot.json"
    fast = [a for a in FAST]
    fast[fast.index("--rotate-factor") + 1] = "0.0005"  # ~136 KiB rotating set: a few copies
    code, _, _ = _run(["bench", "layer", "--shapes", "32x64", "--batches", "2", "--sparsities",
                       "0.75", "--formats", "csr", "--dtypes", "fp32", "--contenders",
                       "dense,scipy,sparsekit", *fast, "--out", str(out_json)], capsys)
    assert code == 0
    res = json.loads(out_json.read_text())["results"]
    fl = next(r for r in res if r["contender"] == "dense:F.linear")
    assert fl["n_copies"] == h.rotation_count(32 * 64 * 4, 0.0005) > 1
    sp = next(r for r in res if r["contender"] == "scipy")
    assert sp["status"] == common.OK and sp["threads"] == 1
    assert sp["n_copies"] == h.rotation_count(sp["weight_bytes"], 0.0005) > fl["n_copies"]


def test_model_from_sparsekit_save_file(tmp_path, capsys):
    import torch

    import sparsekit
    from benchmarks.models import LeNet300100
    from sparsekit.nn import SparseLinear

    torch.manual_seed(3)
    m = LeNet300100()
    with torch.no_grad():
        for lin in (m.fc1, m.fc2):
            lin.weight[torch.rand(lin.weight.shape) < 0.8] = 0
    m.fc1 = SparseLinear.from_dense(m.fc1, format="csr")
    m.fc2 = SparseLinear.from_dense(m.fc2, format="bsr", blocksize=(2, 2))
    path = tmp_path / "lenet.safetensors"
    sparsekit.save(m, path)
    out_json = tmp_path / "saved.json"
    code, out, _ = _run(["bench", "model", "--model", "mnist-mlp", "--weights", str(path),
                         "--batches", "2", "--dtypes", "fp32", "--dense", "F.linear", *FAST,
                         "--out", str(out_json)], capsys)
    assert code == 0 and "weights from" in out
    res = json.loads(out_json.read_text())["results"]
    sk = [r for r in res if r["contender"] == "sparsekit:cpp"]
    assert len(sk) == 1 and sk[0]["format"] == "as saved"
    # overall sparsity of the saved model: fc1/fc2 ~80 % zeros, fc3 dense
    total = 784 * 300 + 300 * 100 + 100 * 10
    assert abs(sk[0]["sparsity"] - 0.8 * (total - 1000) / total) < 0.01
    assert sk[0]["status"] in (common.OK, common.UNAVAILABLE)


def test_show_summary_table(layer_run, capsys):
    _, _, _, paths = layer_run
    code, out, _ = _run(["bench", "show", str(paths["json"]), "--table", "summary"], capsys)
    assert code == 0
    header = next(l for l in out.splitlines() if l.startswith("case") and "50%" in l)
    for col in ("dtype", "format", "N", "best dense ms", "50%", "90%"):
        assert col in header
    rows = [l for l in out.splitlines() if l.startswith(("24x40", "33x17"))
            and ("csr" in l or "bsr4x4" in l) and "x (" in l]
    assert rows  # "<speedup>x (<backend>)" cells


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" fail
    with pytest.raises(SystemExit) as ei:
        cli.main(["bench", "layer", *FAST, "--plot", str(tmp_path / "p.png")])
    assert ei.value.code == 2
    assert "matplotlib" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        report.plot_speedup([], tmp_path / "p.png")
