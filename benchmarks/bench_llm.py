"""Causal-LM decoding end to end: Wanda-pruned, sparsified ``transformers`` model vs dense.

For each sparsity setting (``--settings``, default ``0.5,2:4,0.7``) the dense model is pruned
with Wanda (calibration: ``--calib-seqs`` x ``--calib-len`` tokens of the Python documentation in
``pydoc_data.topics``), copied (the *masked dense* model), sparsified with
``sparsekit.sparsify`` tuned for batch 1 (``lm_head`` included when it pays; with
``--value-dtype bf16`` the sparse values are stored in bfloat16), and run through greedy
``generate()`` from the same prompt. Reported per model: prefill time (prompt -> first new
token), decode tokens/s (the remaining tokens), and whether the generated tokens equal those of
the masked dense model (for bf16 values: of the masked dense model with bf16-rounded weights,
computed in fp32, which is what the sparse kernels compute). The dense fp32 model and a dense
bf16 model (``model.to(torch.bfloat16)``) are the baselines, timed in the same run.

Model: ``--model PATH`` (a local ``transformers`` directory; its tokenizer encodes the prompt)
or ``--preset`` (built from a config with random weights; these machines cannot download):

* ``llama7b-block``: Llama-7B shapes (hidden 4096, FFN 11008, 32 heads), ``--layers`` blocks
  (default 2), vocabulary ``--vocab`` (default 2048);
* ``tiny``: a 2-layer Llama with hidden 64 (smoke test).

Without a tokenizer, text is encoded as bytes modulo the vocabulary size.

Usage::

    flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_llm.py --preset llama7b-block \\
        --threads 2 --value-dtype fp32,bf16 --out benchmarks/results/llm-decode.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
import sparsekit  # noqa: E402
from sparsekit.bench import harness  # noqa: E402
from sparsekit.nn import SparseLinear, sparsify  # noqa: E402
from sparsekit.prune import prune  # noqa: E402

PRESETS = {
    "llama7b-block": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                          num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4,
                 num_key_value_heads=4),
}


def build_model(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """(model in eval mode, tokenizer or None, description)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        try:
            tok = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError):
            tok = None
        return model.eval(), tok, f"{type(model).__name__} from {Path(args.model).name}"
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(num_hidden_layers=args.layers, vocab_size=args.vocab,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, **PRESETS[args.preset])
    model = LlamaForCausalLM(cfg).eval()
    desc = (f"LlamaForCausalLM preset {args.preset}: {args.layers} layers, hidden "
            f"{cfg.hidden_size}, FFN {cfg.intermediate_size}, {cfg.num_attention_heads} heads, "
            f"vocab {args.vocab}, random weights (std {cfg.initializer_range})")
    return model, None, desc


def encode(text: str, tok: Any, vocab: int) -> torch.Tensor:
    if tok is not None:
        return torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab


def calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


class _Clock:
    """A ``generate`` streamer that timestamps every emitted chunk (first: the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int
                 ) -> tuple[list[int], float, float]:
    """(generated ids, prefill seconds, decode seconds per token)."""
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt[None], max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             streamer=clock, pad_token_id=0)
    ts = clock.times[1:]  # [0] is the prompt
    prefill = ts[0] - t0
    decode = (ts[-1] - ts[0]) / max(1, len(ts) - 1)
    return out[0, prompt.numel():].tolist(), prefill, decode


def timed(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, reps: int
          ) -> dict[str, dict[str, Any]]:
    """Greedy-generate with every model ``reps`` times, round-robin (one run of each per
    round), so load from other processes hits all of them alike; medians per model."""
    for m in models.values():
        run_generate(m, prompt, 4)  # warm-up (allocations, backend caches)
    runs: dict[str, list[tuple[list[int], float, float]]] = {k: [] for k in models}
    for _ in range(reps):
        for k, m in models.items():
            runs[k].append(run_generate(m, prompt, new_tokens))
    out = {}
    for k, rs in runs.items():
        prefill = statistics.median(r[1] for r in rs)
        decode = statistics.median(r[2] for r in rs)
        out[k] = {"tokens": rs[0][0], "prefill_s": prefill, "decode_s_per_token": decode,
                  "decode_tokens_per_s": 1.0 / decode,
                  "all_decode_s_per_token": [r[2] for r in rs],
                  "all_prefill_s": [r[1] for r in rs]}
    return out


def weight_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            total += m.nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="local transformers model directory")
    ap.add_argument("--preset", default="llama7b-block", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--settings", default="0.5,2:4,0.7",
                    help="comma list of sparsities (fractions) or N:M patterns")
    ap.add_argument("--value-dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bf16-dense", action="store_true", help="skip the dense bf16 baseline")
    ap.add_argument("--convert", choices=("tuned", "all"), default="tuned",
                    help="tuned: sparsify keeps a layer dense where dense measures faster; all: "
                         "every pruned layer becomes sparse (its fastest sparse variant), for "
                         "machines too loaded for per-layer tuning; the end-to-end decode "
                         "comparison decides")
    ap.add_argument("--out", default=None, help="results JSON path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        sparsekit.set_num_threads(args.threads)
    vdts = {"fp32": torch.float32, "bf16": torch.bfloat16}
    value_dtypes = [v.strip() for v in args.value_dtype.split(",") if v.strip()]
    for v in value_dtypes:
        if v not in vdts:
            ap.error(f"--value-dtype: expected fp32 or bf16, got {v!r}")

    model, tok, desc = build_model(args)
    vocab = model.config.vocab_size
    text = calibration_text()
    ids = encode(text, tok, vocab)
    calib_ids = ids[: args.calib_seqs * args.calib_len].reshape(args.calib_seqs, args.calib_len)
    calibration = [calib_ids[i:i + 2] for i in range(0, args.calib_seqs, 2)]
    prompt = encode("Greedy decoding with a sparse model: the print() function writes",
                    tok, vocab)
    prompt = torch.cat([prompt, ids[-args.prompt_tokens:]])[-args.prompt_tokens:]
    print(desc, flush=True)

    results: dict[str, Any] = {"model": desc, "command": " ".join(sys.argv),
                               "prompt_tokens": int(prompt.numel()),
                               "new_tokens": args.new_tokens, "reps": args.reps,
                               "method": "each sparse model is timed round-robin with the dense "
                                         "fp32 model (same run, same load); the dense bf16 "
                                         "baseline is timed round-robin with dense fp32 once",
                               "baselines": {}, "runs": []}
    dense_model = model
    if not args.no_bf16_dense:
        mb = copy.deepcopy(dense_model).to(torch.bfloat16)
        t = timed({"dense_fp32": dense_model, "dense_bf16": mb}, prompt, args.new_tokens,
                  args.reps)
        del mb
        gc.collect()
        for k in t:
            t[k]["weight_bytes"] = (weight_bytes(dense_model) // (2 if k == "dense_bf16" else 1))
        t["dense_bf16"]["tokens_equal_dense_fp32"] = (t["dense_bf16"]["tokens"]
                                                      == t["dense_fp32"]["tokens"])
        t["dense_bf16"]["decode_speedup_vs_dense_fp32"] = (
            t["dense_fp32"]["decode_s_per_token"] / t["dense_bf16"]["decode_s_per_token"])
        results["baselines"] = t
        for k, r in t.items():
            print(f"{k}: prefill {r['prefill_s'] * 1e3:.1f} ms, decode "
                  f"{r['decode_tokens_per_s']:.2f} tok/s", flush=True)
    bf16_ratio = (results["baselines"]["dense_bf16"]["decode_speedup_vs_dense_fp32"]
                  if results["baselines"] else None)

    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        model = copy.deepcopy(dense_model)
        if ":" in setting:
            kw: dict[str, Any] = dict(granularity=setting)
        else:
            kw = dict(sparsity=float(setting))
        t0 = time.perf_counter()
        rep = prune(model, criterion="wanda", calibration=calibration, **kw)
        prune_s = time.perf_counter() - t0
        # fp32 first: the bf16 check then rounds the masked weights in place
        for vname in sorted(value_dtypes, key=lambda v: v != "fp32"):
            vdt = vdts[vname]
            sp = copy.deepcopy(model)
            t0 = time.perf_counter()
            srep = sparsify(sp, batch_sizes=(1,), value_dtype=vdt, min_sparsity=0.3,
                            cache=False, margin=-1e9 if args.convert == "all" else 0.05)
            sparsify_s = time.perf_counter() - t0
            if vdt != torch.float32:  # what the sparse kernels compute: rounded values, fp32 math
                with torch.no_grad():
                    for m in model.modules():
                        if isinstance(m, nn.Linear):
                            m.weight.copy_(m.weight.to(vdt).float())
            ref = run_generate(model, prompt, args.new_tokens)[0]
            t = timed({"dense_fp32": dense_model, "sparse": sp}, prompt, args.new_tokens,
                      args.reps)
            r, d = t["sparse"], t["dense_fp32"]
            run = {
                "setting": setting, "value_dtype": vname,
                "pruned_sparsity": rep.sparsity, "prune_s": prune_s, "sparsify_s": sparsify_s,
                "converted": srep.replaced, "summary": srep.summary(),
                "lm_head": srep["lm_head"].to_dict(),
                "weight_bytes": weight_bytes(sp),
                "tokens_equal_masked_dense": r["tokens"] == ref,
                "matching_prefix": next((i for i, (a, b) in enumerate(zip(r["tokens"], ref))
                                         if a != b), len(ref)),
                "sparse": {k: v for k, v in r.items() if k != "tokens"},
                "dense_fp32_same_run": {k: v for k, v in d.items() if k != "tokens"},
                "decode_speedup_vs_dense_fp32": d["decode_s_per_token"]
                / r["decode_s_per_token"],
                "prefill_speedup_vs_dense_fp32": d["prefill_s"] / r["prefill_s"],
            }
            if bf16_ratio:
                run["decode_speedup_vs_dense_bf16"] = (run["decode_speedup_vs_dense_fp32"]
                                                       / bf16_ratio)
            results["runs"].append(run)
            print(f"{setting:>4} {vname}: sparsity {rep.sparsity:.3f}, "
                  f"{len(srep.replaced)} layers sparse (lm_head {srep['lm_head'].choice}), "
                  f"prefill {r['prefill_s'] * 1e3:.1f} ms (dense {d['prefill_s'] * 1e3:.1f}), "
                  f"decode {r['decode_tokens_per_s']:.2f} tok/s (dense "
                  f"{d['decode_tokens_per_s']:.2f}) = "
                  f"{run['decode_speedup_vs_dense_fp32']:.2f}x dense fp32, tokens equal masked "
                  f"dense: {run['tokens_equal_masked_dense']}", flush=True)
            del sp
            gc.collect()
            write(results, args.out, partial=True)
        del model
        gc.collect()
    results["convert"] = args.convert
    write(results, args.out, partial=False)
    return 0


def write(results: dict[str, Any], out: str | None, *, partial: bool) -> None:
    """Write the results JSON (after every run, so an interrupted run keeps what it measured)."""
    if not out:
        return
    results = copy.deepcopy(results)
    results["complete"] = not partial
    results["machine"] = harness.machine_info(torch.get_num_threads(), bandwidth=False)
    results["machine"]["shared_machine"] = "yes: other processes may run (ratios are same-run)"
    results["machine"]["loadavg_1_5_15"] = list(os.getloadavg())
    results["date_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results["versions"] = {"torch": torch.__version__, "sparsekit": sparsekit.__version__}
    try:
        import transformers

        results["versions"]["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    for b in results["baselines"].values():
        b.pop("tokens", None)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
