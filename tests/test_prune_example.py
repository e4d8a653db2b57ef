"""Smoke run of examples/mnist_prune.py (digits, --quick --offline) in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mnist_example_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKIT_MNIST"}
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mnist_prune.py"), "--quick", "--offline",
         "--sparsities", "0.9", "--threads", "1", "--out", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "digits" in res["data_source"] and res["quick"] is True
    (row,) = res["pruned"]
    assert row["sparse_predictions_equal"] is True and row["max_abs_logit_diff"] < 1e-3
    assert abs(row["pruned_layers_sparsity"] - 0.9) < 1e-3
    assert row["bytes_compressed"] < row["bytes_dense"]
    assert res["dense"]["accuracy"] > 0.8  # the digits model did learn
    assert set(row["tuned_choices"]) == {"batch1", "batch256"}
    assert set(row["tuned_choices"]["batch1"]) >= {"fc1", "fc2"}
    assert row["tuned_speedup_median"]["threads1"]["batch1"] > 0
    assert "scikit-learn's 8x8 digits instead" in proc.stdout
    assert (tmp_path / "r.md").read_text().startswith("# LeNet-300-100 pruning")
