"""The ``sparsekit`` command line (also ``python -m sparsekit``).

``sparsekit bench [layer]``    sweep one linear layer over shapes/batches/sparsities/formats/dtypes
``sparsekit bench model``      a whole model, dense vs pruned + sparsified (``--task generate``:
                               a causal LM, Wanda-pruned, greedy decoding tokens/s)
``sparsekit bench compare``    diff two ``--out`` JSON files; exit status 1 on regression
``sparsekit bench show``       print the tables of a saved ``--out`` JSON (``--markdown`` for docs)
``sparsekit info``             machine, versions and built backends as JSON

Exit status: 0 success, 1 regression found by ``compare`` or a run-time failure, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

PROG = "sparsekit"


# --------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------
def _list_of(conv: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, "
                                             f"got {text!r}")
        out = []
        for t in items:
            try:
                out.append(conv(t))
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(f"expected {what}, got {t!r} ({exc})") from None
        return out

    return parse


def _pos_int(t: str) -> int:
    v = int(t)
    if v < 1:
        raise ValueError("must be >= 1")
    return v


def _fraction(t: str) -> float:
    v = float(t)
    if not (0.0 <= v < 1.0):
        raise ValueError("must be in [0, 1)")
    return v


def _nonneg_float(t: str) -> float:
    v = float(t)
    if not v >= 0:
        raise ValueError("must be >= 0")
    return v


def _shape(t: str) -> tuple[int, int]:
    from sparsekit.bench.layer import parse_shape

    return parse_shape(t)


def _fmt(t: str):
    from sparsekit.bench.layer import FormatSpec

    if t.strip().lower() == "auto":
        return FormatSpec("auto")
    return FormatSpec.parse(t)


def _dtype(t: str) -> str:
    from sparsekit.bench.common import DTYPE_NAMES, parse_dtype

    return DTYPE_NAMES[parse_dtype(t)]


def _sparsity_setting(t: str) -> float | str:
    """A fraction in [0, 1), or an ``N:M`` pattern (kept as text; only ``--task generate``
    takes patterns)."""
    if ":" in t:
        from sparsekit.bench.decode import parse_setting

        return parse_setting(t)[0]
    return _fraction(t)


HF_CONFIG_CHOICES = ("llama", "gpt2")  # sparsekit.bench.decode.HF_CONFIGS (checked in tests)


def _device(t: str) -> str:
    if t not in ("cpu", "cuda"):
        raise ValueError("expected cpu or cuda")
    return t


def _default_devices() -> list[str]:
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, *, batches: str, sparsities: str, formats: str,
                dtypes: str, sparsity_type: Callable[[str], Any] = _fraction,
                sparsity_what: str = "fractions in [0, 1)") -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--batches", type=_list_of(_pos_int, "positive ints"), default=batches,
                   help=f"batch sizes N (rows of x) (default {batches})")
    g.add_argument("--sparsities", type=_list_of(sparsity_type, sparsity_what),
                   default=sparsities, help=f"fraction of zero weights (default {sparsities})")
    g.add_argument("--formats", type=_list_of(_fmt, "csr or bsr<r>x<c>"), default=formats,
                   help=f"sparse formats: csr, bsr<r>x<c> (default {formats})")
    g.add_argument("--dtypes", type=_list_of(_dtype, "fp32, bf16 or fp16"), default=dtypes,
                   help=f"compute dtypes (default {dtypes})")
    g.add_argument("--devices", type=_list_of(_device, "cpu or cuda"), default=None,
                   help="devices (default: cpu, plus cuda when available)")
    g.add_argument("--backends", type=_list_of(str, "backend names"), default=None,
                   help="sparsekit backends to time (default: every built one except the "
                        "float64 'torch' reference)")
    t = p.add_argument_group("method")
    t.add_argument("--threads", type=_pos_int, default=None,
                   help="threads for every contender (default: CPUs in the affinity mask)")
    t.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    t.add_argument("--min-reps", type=_pos_int, default=5, help="timed calls, at least "
                   "(default 5)")
    t.add_argument("--min-time", type=_nonneg_float, default=0.1,
                   help="seconds of timed calls per contender, at least (default 0.1)")
    t.add_argument("--rotate-factor", type=_nonneg_float, default=2.0,
                   help="rotate weight copies totalling more than this x LLC (default 2; 0 "
                        "disables rotation -- smoke tests only, numbers are then optimistic)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--clean-blas-env", action="store_true",
                   help="re-run without OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE (they can slow the "
                        "numpy baseline); both are recorded in the output either way")
    t.add_argument("--no-bandwidth", action="store_true",
                   help="skip measuring copy bandwidth for the machine info (saves ~2 s and "
                        "4 x LLC of memory)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="JSON", help="write all records + machine info as JSON")
    o.add_argument("--csv", metavar="CSV", help="write one CSV row per record")
    o.add_argument("--plot", metavar="PNG",
                   help="speedup vs sparsity plot, a line per batch size (needs matplotlib)")
    o.add_argument("--table", choices=("pivot", "long", "summary"), default="pivot",
                   help="console table: one row per case with every contender (pivot), one row "
                        "per contender (long), or best sparsekit speedup by sparsity (summary)")
    o.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no table (files are still written)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``sparsekit`` command."""
    from sparsekit.bench import layer as L

    parser = argparse.ArgumentParser(prog=PROG, description="sparsekit command line")
    sub = parser.add_subparsers(dest="command", metavar="{bench,info}")
    sub.required = True
    bench = sub.add_parser(
        "bench", help="benchmarks (layer sweep, model, compare)",
        description="Benchmarks with one method for every contender: identical inputs, a "
                    "float64 correctness check before timing, weight rotation beyond 2x LLC, "
                    "medians with p10/p90, the same thread count everywhere. 'sparsekit bench' "
                    "alone runs 'bench layer' with its defaults.")
    modes = bench.add_subparsers(dest="mode", metavar="{layer,model,compare,show}")
    modes.required = True

    lp = modes.add_parser(
        "layer", help="sweep one linear layer",
        description="y = x @ W.T for W (M x K) pruned at random to each sparsity, against dense "
                    "torch (F.linear and the fastest dense formulation), sparsekit backends, "
                    "torch.sparse and scipy.sparse.")
    lp.add_argument("--shapes", type=_list_of(_shape, "MxK shapes"),
                    default=",".join(f"{m}x{k}" for m, k in L.DEFAULT_SHAPES),
                    help="weight shapes MxK = out_features x in_features (default "
                         + ",".join(f"{m}x{k}" for m, k in L.DEFAULT_SHAPES) + ")")
    lp.add_argument("--contenders", type=_list_of(str, "contender families"),
                    default="dense,sparsekit,torch.sparse,scipy",
                    help="families to run (default dense,sparsekit,torch.sparse,scipy)")
    lp.add_argument("--bias", action="store_true", help="add a bias (default: none)")
    _add_common(lp, batches=",".join(map(str, L.DEFAULT_BATCHES)),
                sparsities=",".join(f"{s:g}" for s in L.DEFAULT_SPARSITIES),
                formats=",".join(L.DEFAULT_FORMATS), dtypes=",".join(L.DEFAULT_DTYPES))

    mp = modes.add_parser(
        "model", help="a whole model, dense vs pruned + sparsified",
        description="Built-ins mnist-mlp and bert-base, hf:<name> (needs transformers), or "
                    "pkg.mod:factory; --weights loads a sparsekit.save file into it. With "
                    "--task generate: a transformers causal LM (hf:<local dir> or --hf-config "
                    "with random weights) pruned with Wanda on Python documentation text at "
                    "each --sparsities setting (fractions or N:M such as 2:4), sparsified for "
                    "batch 1 (--dtypes: fp32 and/or bf16 sparse values), greedy generate(): "
                    "prefill and decode timed apart, dense fp32, the best dense formulation "
                    "of every Linear (--dense) and dense bf16 in the same run, tokens checked "
                    "against the masked dense model.")
    mp.add_argument("--model", default=None,
                    help="mnist-mlp | bert-base | hf:<name or path> | pkg.mod:factory "
                         "(default mnist-mlp; with --task generate: hf:<local directory>)")
    mp.add_argument("--task", choices=("forward", "generate"), default=None,
                    help="forward: time model(x) (default); generate: causal-LM greedy "
                         "decoding (implied by --hf-config)")
    mp.add_argument("--weights", help="safetensors file written by sparsekit.save, loaded into "
                                      "the model first")
    mp.add_argument("--data", help="MNIST .npz (mnist-mlp inputs from real test images)")
    mp.add_argument("--input-shape", type=_list_of(_pos_int, "positive ints"), default=None,
                    help="per-sample input shape, e.g. 784 or 128,768 (default: from the model)")
    mp.add_argument("--layers", type=_pos_int, default=None,
                    help="bert-base layers (default 4); --hf-config layers (default 2)")
    mp.add_argument("--seq-len", type=_pos_int, default=None,
                    help="sequence length for bert-base / hf models (default 128)")
    mp.add_argument("--dense", type=_list_of(str, "dense formulations"),
                    default="F.linear,torch.matmul,onednn,mkl_packed,numpy",
                    help="dense formulations of every nn.Linear to time")
    gp = mp.add_argument_group("causal LM (--task generate)")
    gp.add_argument("--hf-config", choices=HF_CONFIG_CHOICES, default=None,
                    help="build a transformers causal LM of this family from a config, random "
                         "weights (implies --task generate)")
    gp.add_argument("--hidden", type=_pos_int, default=None,
                    help="--hf-config hidden size (default 4096)")
    gp.add_argument("--ffn", type=_pos_int, default=None,
                    help="--hf-config FFN size (default: llama 8/3 x hidden rounded up to 256, "
                         "gpt2 4 x hidden)")
    gp.add_argument("--heads", type=_pos_int, default=None,
                    help="--hf-config attention heads (default hidden / 128)")
    gp.add_argument("--kv-heads", type=_pos_int, default=None,
                    help="--hf-config llama key/value heads (default: --heads)")
    gp.add_argument("--vocab", type=_pos_int, default=None,
                    help="--hf-config vocabulary size (default 2048)")
    gp.add_argument("--prompt-tokens", type=_pos_int, default=32,
                    help="prompt length in tokens (default 32)")
    gp.add_argument("--new-tokens", type=_pos_int, default=24,
                    help="greedy new tokens per generate(), >= 2 (default 24)")
    gp.add_argument("--reps", type=_pos_int, default=3,
                    help="timed generate() calls per model, median reported (default 3)")
    gp.add_argument("--calib-seqs", type=_pos_int, default=8,
                    help="Wanda calibration sequences (default 8)")
    gp.add_argument("--calib-len", type=_pos_int, default=128,
                    help="tokens per calibration sequence (default 128)")
    gp.add_argument("--convert", choices=("tuned", "all"), default="tuned",
                    help="tuned: sparsify keeps a layer dense where dense measures faster "
                         "(default); all: every pruned layer sparse (its fastest variant)")
    gp.add_argument("--no-bf16-dense", action="store_true",
                    help="skip the dense bf16 model baseline")
    gp.add_argument("--lock", metavar="FILE", default=None,
                    help="hold an exclusive flock on FILE while timing and tuning (each "
                         "section separately; building, pruning and copying models run "
                         "outside it), so timed runs on a shared machine never overlap")
    gp.add_argument("--prune-in-place", action="store_true",
                    help="one --sparsities setting only: prune the dense model itself and time "
                         "it (masked; dense costs the same) as the dense baselines: one model "
                         "copy less for models near the machine's memory")
    gp.add_argument("--realtime", action="store_true",
                    help="time (and tune) with SCHED_FIFO priority 1 on every thread, only "
                         "inside those sections: on a shared machine other sessions' jobs "
                         "otherwise delay each operator's thread hand-offs by scheduler ticks "
                         "(Linux; needs root / CAP_SYS_NICE)")
    _add_common(mp, batches="1,8", sparsities="0.7,0.9", formats="csr,bsr4x4",
                dtypes="fp32,bf16", sparsity_type=_sparsity_setting,
                sparsity_what="fractions in [0, 1) (or N:M patterns with --task generate)")
    # None = not given: the defaults depend on --task (resolved in _cmd_model)
    mp.set_defaults(batches=None, sparsities=None, formats=None, dtypes=None, warmup=None,
                    min_reps=None, min_time=None, rotate_factor=None)

    cp = modes.add_parser(
        "compare", help="diff two runs; exit 1 on regression",
        description="Match the measurements of two --out JSON files and flag those that got "
                    "slower by more than --threshold (or went from ok to failing).")
    cp.add_argument("old", help="baseline JSON")
    cp.add_argument("new", help="new JSON")
    cp.add_argument("--threshold", type=_nonneg_float, default=0.10,
                    help="relative slowdown treated as noise (default 0.10 = 10%%)")
    cp.add_argument("--metric", choices=("median_s", "speedup_vs_best_dense",
                                         "speedup_vs_flinear"), default="median_s",
                    help="what to compare; speedups (ratios within one run) suit runs from "
                         "different machines (default median_s)")
    cp.add_argument("--all", action="store_true", help="also list unchanged measurements")

    sp = modes.add_parser("show", help="print the tables of a saved run",
                          description="Re-render the console (or markdown) report of an --out "
                                      "JSON file, optionally re-plotting it.")
    sp.add_argument("path", help="JSON written by --out")
    sp.add_argument("--table", choices=("pivot", "long", "summary"), default="pivot")
    sp.add_argument("--markdown", action="store_true", help="GitHub markdown tables")
    sp.add_argument("--plot", metavar="PNG", help="also write the speedup plot")

    sub.add_parser("info", help="machine, versions and backends as JSON",
                   description="Print sparsekit's view of this machine as JSON.")
    return parser


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _machine(args: argparse.Namespace, threads: int | None) -> dict[str, Any]:
    from sparsekit.bench import harness as h

    return h.machine_info(threads if threads is not None else h.default_threads(),
                          bandwidth=not args.no_bandwidth)


def _emit(mode: str, args: argparse.Namespace, records: list[dict[str, Any]],
          config: dict[str, Any], machine: dict[str, Any], elapsed: float,
          argv: Sequence[str], header: str = "") -> None:
    from sparsekit.bench import report

    if args.out:
        report.write_json(report.make_document(mode, records, config=config, machine=machine,
                                               argv=argv, elapsed_s=round(elapsed, 2)),
                          args.out)
    if args.csv:
        report.write_csv(records, args.csv, machine)
    if args.plot:
        report.plot_speedup(records, args.plot)
    if not args.quiet:
        text = report.console_report(records, table=args.table, machine=machine)
        sys.stdout.write((header + "\n" if header else "") + text)
        written = [p for p in (args.out, args.csv, args.plot) if p]
        sys.stdout.write(f"({len(records)} measurements in {elapsed:.0f} s"
                         + (f"; wrote {', '.join(written)}" if written else "") + ")\n")


def _check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for opt in ("out", "csv", "plot"):
        path = getattr(args, opt, None)
        if path:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                parser.error(f"--{opt}: directory {d!r} does not exist")
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot: needs matplotlib, which is not installed "
                         "(pip install matplotlib)")


def _cmd_layer(parser, args, argv) -> int:
    from sparsekit.bench.layer import LayerSweep, run_layer_sweep

    cfg = LayerSweep(
        shapes=args.shapes, batches=args.batches, sparsities=args.sparsities,
        formats=args.formats, dtypes=args.dtypes,
        devices=args.devices or _default_devices(), backends=args.backends,
        contenders=args.contenders, bias=args.bias, threads=args.threads, warmup=args.warmup,
        min_reps=args.min_reps, min_time_s=args.min_time, rotate_factor=args.rotate_factor,
        seed=args.seed,
    )
    if any(f.name == "auto" for f in cfg.formats):
        parser.error("--formats: 'auto' is only meaningful for 'bench model'")
    try:
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
    t0 = time.perf_counter()
    machine = _machine(args, cfg.threads)
    records = run_layer_sweep(cfg, progress=not args.quiet)
    _emit("layer", args, records, cfg.to_dict(), machine, time.perf_counter() - t0, argv)
    return 0


# forward-task values of the options whose meaning depends on --task (parser default: None)
_FORWARD_DEFAULTS = {"batches": [1, 8], "sparsities": [0.7, 0.9], "formats": "csr,bsr4x4",
                     "dtypes": ["fp32", "bf16"], "warmup": 2, "min_reps": 5, "min_time": 0.1,
                     "rotate_factor": 2.0, "layers": 4, "seq_len": 128, "model": "mnist-mlp"}
# options of --task generate only (parser default: None, or the value given here)
_GENERATE_ONLY = {"hf_config": None, "hidden": None, "ffn": None, "heads": None,
                  "kv_heads": None, "vocab": None, "prompt_tokens": 32, "new_tokens": 24,
                  "reps": 3, "calib_seqs": 8, "calib_len": 128, "convert": "tuned",
                  "no_bf16_dense": False, "lock": None,
                  "realtime": False, "prune_in_place": False}
# DecodeBench field -> the option that sets it (error messages name the option)
_DECODE_OPTION = {"settings": "--sparsities", "prune_in_place": "--prune-in-place",
                  "value_dtypes": "--dtypes", "model": "--model",
                  "hf_config": "--hf-config", "kv_heads": "--kv-heads",
                  "new_tokens": "--new-tokens", "prompt_tokens": "--prompt-tokens",
                  "calib_seqs": "--calib-seqs", "calib_len": "--calib-len", "dense": "--dense"}


def _opt(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _cmd_model(parser, args, argv) -> int:
    task = args.task or ("generate" if args.hf_config else "forward")
    if task == "generate":
        return _cmd_generate(parser, args, argv)
    for dest, default in _GENERATE_ONLY.items():
        if getattr(args, dest) != default:
            parser.error(f"{_opt(dest)}: only applies to --task generate (causal-LM decoding), "
                         f"got {_opt(dest)} with --task forward")
    for dest, default in _FORWARD_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, _fmt_list(default) if dest == "formats" else default)
    nm = [s for s in args.sparsities if isinstance(s, str)]
    if nm:
        parser.error(f"--sparsities: N:M patterns ({', '.join(nm)}) only apply to --task "
                     f"generate; --task forward takes fractions in [0, 1)")
    return _cmd_forward(parser, args, argv)


def _fmt_list(text: str) -> list[Any]:
    return [_fmt(t) for t in text.split(",")]


def _cmd_generate(parser, args, argv) -> int:
    """``bench model --task generate``: causal-LM decoding (sparsekit.bench.decode)."""
    from sparsekit.bench import decode as D

    not_here = {"weights": "--weights", "data": "--data", "input_shape": "--input-shape",
                "seq_len": "--seq-len (use --prompt-tokens)",
                "formats": "--formats (sparsify picks each layer's format)",
                "warmup": "--warmup (every model is warmed up once)",
                "min_reps": "--min-reps (use --reps)", "min_time": "--min-time (use --reps)",
                "rotate_factor": "--rotate-factor (decoding streams the whole model)"}
    for dest, what in not_here.items():
        if getattr(args, dest) is not None:
            parser.error(f"{what.split()[0]}: not used by --task generate; remove {what}")
    for opt in ("csv", "plot"):
        if getattr(args, opt):
            parser.error(f"--{opt}: --task generate writes its results with --out only")
    if args.batches is not None and list(args.batches) != [1]:
        parser.error(f"--batches: --task generate decodes at batch 1, got {args.batches}")
    if args.devices is not None and list(args.devices) != ["cpu"]:
        parser.error(f"--devices: --task generate runs on cpu only, got {args.devices}")
    if args.backends is not None and len(args.backends) != 1:
        parser.error(f"--backends: --task generate takes one sparsekit backend for sparsify, "
                     f"got {args.backends}")
    model = None
    if args.model is not None:
        if args.hf_config:
            parser.error(f"--model: give either --model hf:<local directory> or --hf-config, "
                         f"got both (--model {args.model}, --hf-config {args.hf_config})")
        if not args.model.startswith("hf:"):
            parser.error(f"--model: --task generate takes hf:<local transformers directory> "
                         f"or --hf-config, got {args.model!r}")
        model = args.model[3:]
    elif not args.hf_config:
        parser.error("--model: --task generate needs hf:<local transformers directory> or "
                     "--hf-config llama|gpt2, got neither")
    if model is not None:
        given = [d for d in ("hidden", "ffn", "heads", "kv_heads", "vocab", "layers")
                 if getattr(args, d) is not None]
        if given:
            parser.error(f"{_opt(given[0])}: only applies with --hf-config (the model at "
                         f"--model {args.model} has its own config)")
    if args.kv_heads is not None and args.hf_config == "gpt2":
        parser.error("--kv-heads: gpt2 has no grouped-query attention; only with --hf-config "
                     "llama")
    cfg = D.DecodeBench(
        model=model, hf_config=args.hf_config,
        hidden=args.hidden or 4096, ffn=args.ffn, layers=args.layers or 2, heads=args.heads,
        kv_heads=args.kv_heads, vocab=args.vocab or 2048,
        settings=[str(s) for s in (args.sparsities or ["0.7"])],
        value_dtypes=list(args.dtypes or ["fp32", "bf16"]),
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, reps=args.reps,
        calib_seqs=args.calib_seqs, calib_len=args.calib_len, threads=args.threads,
        seed=args.seed, dense_bf16=not args.no_bf16_dense, dense=list(args.dense),
        convert=args.convert, backend=(args.backends or ["auto"])[0], lock=args.lock,
        realtime=args.realtime, prune_in_place=args.prune_in_place)
    try:
        cfg.validate()
    except ValueError as exc:
        field_name, _, rest = str(exc).partition(":")
        parser.error(f"{_DECODE_OPTION.get(field_name, _opt(field_name))}:{rest}")
    if args.lock is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.lock))):
        parser.error(f"--lock: directory of {args.lock!r} does not exist")
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))

    def save(res: dict[str, Any], complete: bool = False) -> None:
        if args.out:
            D.write_results(res, args.out, complete=complete, argv=argv)

    t0 = time.perf_counter()
    try:
        res = D.run_decode_bench(cfg, log=log, on_update=save)
    except ValueError as exc:  # e.g. a prompt / calibration the tokenizer makes too short
        parser.error(str(exc))
    res["elapsed_s"] = round(time.perf_counter() - t0, 2)
    save(res, complete=True)
    if not args.quiet:
        sys.stdout.write(D.summary_table(res) + "\n")
        bad = [f"{r['setting']} {r['value_dtype']}" for r in res["runs"]
               if not r["tokens_equal_masked_dense"]]
        if bad:
            sys.stdout.write(f"warning: tokens differ from the masked dense model's for "
                             f"{', '.join(bad)} (near-tied logits or a wrong result)\n")
        sys.stdout.write(f"({len(res['runs'])} sparse models in {res['elapsed_s']:.0f} s"
                         + (f"; wrote {args.out}" if args.out else "") + ")\n")
    return 0


def _cmd_forward(parser, args, argv) -> int:
    from sparsekit.bench.model import ModelBench, run_model_bench

    cfg = ModelBench(
        model=args.model, weights=args.weights, data=args.data, input_shape=args.input_shape,
        bert_layers=args.layers, seq_len=args.seq_len, batches=args.batches,
        sparsities=args.sparsities, formats=args.formats, dtypes=args.dtypes,
        devices=args.devices or _default_devices(), backends=args.backends, dense=args.dense,
        threads=args.threads, warmup=args.warmup, min_reps=args.min_reps,
        min_time_s=args.min_time, rotate_factor=args.rotate_factor, seed=args.seed,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
    t0 = time.perf_counter()
    machine = _machine(args, cfg.threads)
    try:
        records, desc = run_model_bench(cfg, progress=not args.quiet)
    except ValueError as exc:  # bad --model / --weights / --input-shape
        parser.error(str(exc))
    config = cfg.to_dict()
    config["model_description"] = desc
    _emit("model", args, records, config, machine, time.perf_counter() - t0, argv,
          header=f"model: {desc}")
    return 0


def _cmd_compare(parser, args) -> int:
    from sparsekit.bench.compare import compare_runs, format_comparison
    from sparsekit.bench.report import load_json

    try:
        old = load_json(args.old, "old")
        new = load_json(args.new, "new")
    except ValueError as exc:
        parser.error(str(exc))
    changes, only_old, only_new = compare_runs(old, new, threshold=args.threshold,
                                               metric=args.metric)
    ma, mb = old.get("machine") or {}, new.get("machine") or {}
    for key in ("cpu_model", "num_threads"):
        if ma.get(key) != mb.get(key):
            sys.stdout.write(f"warning: runs differ in {key}: {ma.get(key)!r} vs "
                             f"{mb.get(key)!r}; consider --metric speedup_vs_best_dense\n")
    sys.stdout.write(format_comparison(changes, only_old, only_new, metric=args.metric,
                                       threshold=args.threshold, show_all=args.all))
    if not changes:
        sys.stdout.write("warning: no measurement appears in both files\n")
    return 1 if any(c.kind in ("regression", "status") for c in changes) else 0


def _cmd_show(parser, args) -> int:
    from sparsekit.bench import report

    try:
        doc = report.load_json(args.path, "path")
    except ValueError as exc:
        parser.error(str(exc))
    _check_outputs(parser, args)
    recs = doc["results"]
    sys.stdout.write(report.console_report(recs, table=args.table, machine=doc.get("machine"),
                                           markdown=args.markdown))
    if args.plot:
        report.plot_speedup(recs, args.plot)
    return 0


def _cmd_info() -> int:
    from sparsekit.bench import harness as h

    info = h.machine_info(bandwidth=False)
    info["cpu_kernels"] = _kernel_info()
    json.dump(info, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _kernel_info() -> dict:
    """ISA path, kernel variants, forced variants, wisdom file and plans of the C++ backend."""
    from sparsekit.kernels import planner

    try:
        forced: list[str] | str = planner.forced_variants()
    except ValueError as e:
        forced = f"error: {e}"
    try:
        import sparsekit._C as C

        isa = C.cpu_isa()
    except Exception as e:  # noqa: BLE001 - report why, info must not fail
        isa = f"unavailable: {type(e).__name__}: {e}"
    return {"isa_path": isa, "variants": [v["name"] for v in planner.variants()],
            "forced": forced, "wisdom": planner.wisdom_path(), "plans": planner.plans()}


def _normalise_argv(argv: list[str]) -> list[str]:
    """``sparsekit bench [options]`` without a mode means ``sparsekit bench layer [options]``."""
    if argv and argv[0] == "bench":
        rest = argv[1:]
        if not rest or (rest[0].startswith("-") and rest[0] not in ("-h", "--help")):
            return ["bench", "layer", *rest]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsekit`` console script; returns the exit status."""
    args_list = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "info":
        return _cmd_info()
    mode_parser = _subparser(parser, "bench", args.mode)
    if args.mode == "compare":
        return _cmd_compare(mode_parser, args)
    if args.mode == "show":
        return _cmd_show(mode_parser, args)
    if args.clean_blas_env:
        from sparsekit.bench.harness import reexec_without_openblas_overrides

        # re-run as ``python -m sparsekit ...``: works for the console script and for -m alike
        reexec_without_openblas_overrides(
            ["-m", "sparsekit", *[a for a in args_list if a != "--clean-blas-env"]])
    _check_outputs(mode_parser, args)
    try:
        if args.mode == "layer":
            return _cmd_layer(mode_parser, args, args_list)
        return _cmd_model(mode_parser, args, args_list)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except RuntimeError as exc:
        sys.stderr.write(f"{PROG} bench {args.mode}: error: {exc}\n")
        return 1


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    p = parser
    for name in path:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = action.choices[name]
    return p


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
