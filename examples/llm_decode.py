"""Prune a causal language model with Wanda, sparsify it, and decode greedily.

Loads a ``transformers`` causal LM from a local directory (``--model``; these steps need no
network once the weights are on disk) or builds a small Llama-style model from a config with
random weights (default), prunes every projection (``lm_head`` too unless ``--keep-lm-head``)
with Wanda on Python documentation text (``pydoc_data.topics``), converts the layers where
sparse pays on this machine with one ``sparsekit.sparsify`` call, saves and reloads the sparse
model, and compares greedy ``generate()`` with the masked dense model: same tokens, and the
decode speed of both.

Usage::

    PYTHONPATH=. python examples/llm_decode.py                          # random tiny Llama
    PYTHONPATH=. python examples/llm_decode.py --model ./my-llama --sparsity 0.5 --bf16
    PYTHONPATH=. python examples/llm_decode.py --granularity 2:4

For a timed comparison (prefill and decode apart, dense baselines in the same run) use
``sparsekit bench model --hf-config llama ...`` or ``--task generate --model hf:DIR``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import sparsekit
from sparsekit.bench import decode
from sparsekit.prune import prune


def load(args: argparse.Namespace):
    """(model, tokenizer or None): the local model, or a 4-layer Llama (hidden 512) from a
    config with random weights (the same weights on every call)."""
    if args.model:
        cfg = decode.DecodeBench(model=args.model)
    else:
        cfg = decode.DecodeBench(hf_config="llama", hidden=512, ffn=1376, layers=4, heads=8,
                                 vocab=512)
    model, tok, _ = decode.build_causal_lm(cfg)
    return model, tok


def greedy(model, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    """(generated ids, decode tokens/s) after one untimed warm-up call."""
    decode.run_generate(model, prompt, 2)
    ids, _prefill, per_token = decode.run_generate(model, prompt, n)
    return ids, 1.0 / per_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="local transformers causal-LM directory")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--granularity", default="unstructured", help='e.g. "2:4"')
    ap.add_argument("--bf16", action="store_true", help="store sparse values in bfloat16")
    ap.add_argument("--keep-lm-head", action="store_true", help="do not prune lm_head")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    model, tok = load(args)
    vocab = model.config.vocab_size
    ids = decode.encode(decode.calibration_text()[:200_000], tok, vocab)
    calibration = decode.calibration_batches(ids, 8, 256, batch=1)
    nm = ":" in args.granularity
    report = prune(model, None if nm else args.sparsity, criterion="wanda",
                   granularity=args.granularity, calibration=calibration,
                   exclude="lm_head" if args.keep_lm_head else None)
    print(f"pruned {len(report.layers)} layers to {report.sparsity:.3f} sparsity (Wanda)")

    masked = copy.deepcopy(model)
    vdt = torch.bfloat16 if args.bf16 else None
    summary = sparsekit.sparsify(model, batch_sizes=(1,), value_dtype=vdt)
    if vdt is not None:  # the masked dense twin computes with the same rounded values
        decode.round_weights_(masked, vdt, summary.replaced)
    print(summary.summary())
    print(f"sparse layers: {len(summary.replaced)}; lm_head: {summary['lm_head'].choice} "
          f"({summary['lm_head'].reason})")

    with tempfile.TemporaryDirectory() as d:  # the sparse file is what you would ship
        path = Path(d) / "model.safetensors"
        sparsekit.save(model, path)
        print(f"saved {path.stat().st_size / 1e6:.1f} MB")
        fresh, _ = load(args)
        sparsekit.load(path, fresh)

    prompt = decode.encode("def fibonacci(n):", tok, vocab)
    ref, tps_dense = greedy(masked, prompt, args.new_tokens)
    out, tps_sparse = greedy(fresh, prompt, args.new_tokens)
    print(f"masked dense: decode {tps_dense:.1f} tokens/s; sparse (reloaded): {tps_sparse:.1f} "
          f"tokens/s ({tps_sparse / tps_dense:.2f}x)")
    print("same tokens as the masked dense model:", out == ref)
    if tok is not None:
        print(repr(tok.decode(out)))


if __name__ == "__main__":
    main()
