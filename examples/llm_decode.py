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

For a timed comparison at 7B layer shapes see ``benchmarks/bench_llm.py``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import sparsekit
from sparsekit.prune import prune


def load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), None


def encode(text: str, tok, vocab: int) -> torch.Tensor:
    if tok is not None:
        return torch.tensor(tok(text)["input_ids"])
    return torch.tensor(list(text.encode("utf-8"))) % vocab  # bytes as token ids


def greedy(model, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    with torch.inference_mode():
        model.generate(prompt[None], max_new_tokens=2, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        out = model.generate(prompt[None], max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
    return out[0, prompt.numel():].tolist(), n / dt


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
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = encode(text[:200_000], tok, vocab)
    calibration = [ids[i * 256:(i + 1) * 256][None] for i in range(8)]
    nm = ":" in args.granularity
    report = prune(model, None if nm else args.sparsity, criterion="wanda",
                   granularity=args.granularity, calibration=calibration,
                   exclude="lm_head" if args.keep_lm_head else None)
    print(f"pruned {len(report.layers)} layers to {report.sparsity:.3f} sparsity (Wanda)")

    masked = copy.deepcopy(model)
    vdt = torch.bfloat16 if args.bf16 else None
    if vdt is not None:  # the masked dense twin computes with the same rounded values
        with torch.no_grad():
            for m in masked.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(m.weight.to(vdt).float())
    summary = sparsekit.sparsify(model, batch_sizes=(1,), value_dtype=vdt)
    print(summary.summary())
    print(f"sparse layers: {len(summary.replaced)}; lm_head: {summary['lm_head'].choice} "
          f"({summary['lm_head'].reason})")

    with tempfile.TemporaryDirectory() as d:  # the sparse file is what you would ship
        path = Path(d) / "model.safetensors"
        sparsekit.save(model, path)
        print(f"saved {path.stat().st_size / 1e6:.1f} MB")
        fresh, _ = load(args)
        sparsekit.load(path, fresh)

    prompt = encode("def fibonacci(n):", tok, vocab)
    ref, tps_dense = greedy(masked, prompt, args.new_tokens)
    out, tps_sparse = greedy(fresh, prompt, args.new_tokens)
    print(f"masked dense: {tps_dense:.1f} tokens/s; sparse (reloaded): {tps_sparse:.1f} "
          f"tokens/s ({tps_sparse / tps_dense:.2f}x)")
    print("same tokens as the masked dense model:", out == ref)
    if tok is not None:
        print(repr(tok.decode(out)))


if __name__ == "__main__":
    main()
