"""Causal-LM decoding end to end: Wanda-pruned, sparsified ``transformers`` model vs dense.

A preset front end to ``sparsekit bench model --task generate`` (the logic lives in
:mod:`sparsekit.bench.decode`; see its docstring for the method). Presets build a Llama from a
config with random weights (these machines cannot download weights):

* ``llama7b-block``: Llama-7B shapes (hidden 4096, FFN 11008, 32 heads), ``--layers`` blocks
  (default 2), vocabulary ``--vocab`` (default 2048);
* ``tiny``: hidden 64, FFN 172, 4 heads (smoke test).

``--model PATH`` uses a local ``transformers`` directory instead. Every other option is passed
through to ``sparsekit bench model``, e.g. ``--sparsities 0.7,2:4,0.5 --dtypes fp32,bf16
--threads 2 --reps 3 --out FILE``.

Usage::

    PYTHONPATH=. python benchmarks/bench_llm.py --preset llama7b-block --layers 2 \\
        --threads 2 --sparsities 0.7 --dtypes fp32,bf16 --lock /tmp/bench.lock --realtime \\
        --out benchmarks/results/llm-decode.json
"""

from __future__ import annotations

import argparse
import sys

from sparsekit import cli

PRESETS = {
    "llama7b-block": ["--hidden", "4096", "--ffn", "11008", "--heads", "32"],
    "tiny": ["--hidden", "64", "--ffn", "172", "--heads", "4"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True,
                                 epilog="other options: see `sparsekit bench model --help`")
    ap.add_argument("--model", default=None, help="local transformers model directory")
    ap.add_argument("--preset", default="llama7b-block", choices=sorted(PRESETS))
    ap.add_argument("--layers", default="2")
    ap.add_argument("--vocab", default="2048")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.model:
        model = ["--task", "generate", "--model", f"hf:{args.model}"]
    else:
        model = ["--hf-config", "llama", *PRESETS[args.preset], "--layers", args.layers,
                 "--vocab", args.vocab]
    return cli.main(["bench", "model", *model, *rest])


if __name__ == "__main__":
    raise SystemExit(main())
