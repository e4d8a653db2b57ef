"""Gradual magnitude pruning of LeNet-300-100 on MNIST, then sparse inference with sparsekit.

Steps:

1. Train LeNet-300-100 (784-300-100-10, ReLU) densely with a fixed seed.
2. Fine-tune a "dense twin" for the same number of extra epochs with the same learning-rate
   schedule, without pruning (the fair baseline for the pruned models).
3. For each target sparsity, start from the trained dense model and prune gradually while
   fine-tuning (``sparsekit.prune.GradualPruner``, cubic schedule). The final classifier (fc3,
   1 010 parameters) is kept dense; sparsity is that of fc1 + fc2.
4. Convert each pruned model's pruned Linear layers to CSR ``SparseLinear`` layers, assert that
   they predict exactly the same classes as the masked dense model, and time both at batch 1
   and a larger batch on the compiled kernels (median of interleaved runs, same process).
5. Let ``sparsekit.sparsify(tune=True)`` choose per layer between dense, CSR and BSR by
   measuring them at each batch size, and time the result the same way: it keeps a layer
   dense where dense is faster, so the tuned model is not slower than the dense one (within
   timing noise; at batch 1 this small model is call-overhead bound).

Data: ``--data`` (an .npz or IDX directory), else ``$SPARSEKIT_MNIST``, else the canonical
archives downloaded once (SHA-256 checked) into ``$XDG_CACHE_HOME/sparsekit/mnist``; with no
network it falls back to scikit-learn's 8x8 digits and says so.

Usage::

    python examples/mnist_prune.py                   # real MNIST, one to two minutes on 2 cores
    python examples/mnist_prune.py --out examples/results/mnist_prune.json
    python examples/mnist_prune.py --quick --offline # digits, < 1 minute (the smoke test)
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.datasets import load_mnist
from sparsekit.formats import CSRMatrix
from sparsekit.kernels import require_compiled
from sparsekit.nn import SparseLinear, sparsify
from sparsekit.prune import GradualPruner, evaluate
from sparsekit.threads import set_num_threads

PRUNED_LAYERS = ("fc1", "fc2")  # fc3, the classifier, stays dense


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al., 1998): two hidden ReLU layers of 300 and 100 units."""

    def __init__(self, n_in: int = 784, n_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


# ----------------------------------------------------------------------------- sparse layers
def to_sparse(model: nn.Module, names: tuple[str, ...] = PRUNED_LAYERS) -> nn.Module:
    """A copy of ``model`` with the named Linear layers replaced by CSR layers."""
    sparse = copy.deepcopy(model)
    for n in names:
        setattr(sparse, n, SparseLinear.from_dense(getattr(model, n), format="csr"))
    return sparse.eval()


def model_bytes(model: nn.Module, names: tuple[str, ...] = PRUNED_LAYERS) -> tuple[int, int]:
    """(dense bytes, bytes with the named layers stored as CSR); weights + biases."""
    dense = compressed = 0
    for n, m in model.named_children():
        wb = sum(p.numel() * p.element_size() for p in m.parameters())
        dense += wb
        if n in names:
            mat = CSRMatrix.from_dense(m.weight.detach())
            compressed += mat.nbytes + (0 if m.bias is None else m.bias.numel() * 4)
        else:
            compressed += wb
    return dense, compressed


# ----------------------------------------------------------------------------- training
def lr_at(step: int, total: int, base: float) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps."""
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / total))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
          batch_size: int, seed: int, pruner_kwargs: dict | None = None
          ) -> GradualPruner | None:
    """SGD (momentum 0.9, nesterov, weight decay 1e-4) with a cosine schedule; optional pruning."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    pruner = None
    if pruner_kwargs is not None:
        pruner = GradualPruner(model, optimizer=opt, **pruner_kwargs)
    model.train()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.step()
            step += 1
    model.eval()
    return pruner


# ----------------------------------------------------------------------------- timing
def use_threads(n: int) -> None:
    """Set torch's and sparsekit's intra-op thread counts."""
    torch.set_num_threads(n)
    set_num_threads(n)


@torch.inference_mode()
def latency(models: dict[str, nn.Module], x: torch.Tensor, reps: int
            ) -> dict[str, dict[str, float]]:
    """Seconds per forward of each model: median, p10 and p90 of ``reps`` runs.

    The models run interleaved (dense, sparse, dense, ...) so both see the same machine load.
    """
    for m in models.values():
        for _ in range(max(3, reps // 10)):
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(reps):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in times.items():
        q = np.quantile(np.asarray(v), [0.1, 0.5, 0.9])
        out[k] = {"median": float(q[1]), "p10": float(q[0]), "p90": float(q[2])}
    return out


def _no_dirs(text: str) -> str:
    return re.sub(r"(?:\.{0,2}/)?(?:[^\s/;()]+/)+(?=[^\s/;()]+)", "", text)


def _loadavg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__,
            # Timings are only as good as the machine was quiet: record how busy it was.
            "loadavg_at_end": _loadavg()}
    import sparsekit._C as C  # noqa: N812  (main() checked that it loads)

    info["sparsekit_isa"] = C.cpu_isa()
    return info


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None,
                    help="MNIST .npz or IDX directory (default: $SPARSEKIT_MNIST, else the "
                         "cached download, else scikit-learn digits)")
    ap.add_argument("--offline", action="store_true",
                    help="never download: without a local MNIST copy use scikit-learn digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None,
                    help="dense training epochs (default 8; 10 with --quick)")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help="fine-tuning epochs while pruning (default 6; 5 with --quick)")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--large-batch", type=int, default=256, help="second latency batch size")
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated thread counts for the latency measurements")
    ap.add_argument("--train-threads", type=int, default=1,
                    help="threads for training (1: bit-reproducible across machines, and robust "
                         "on a shared, oversubscribed machine)")
    ap.add_argument("--quick", action="store_true", help="smoke test: few epochs, few timings")
    ap.add_argument("--out", default=None, help="write results JSON here (and a .md table)")
    args = ap.parse_args(argv)

    require_compiled("mnist_prune")  # a demo of the kernels must not time a fallback
    epochs = args.epochs if args.epochs is not None else (10 if args.quick else 8)
    ft_epochs = (args.finetune_epochs if args.finetune_epochs is not None
                 else (5 if args.quick else 6))
    sparsities = [float(s) for s in args.sparsities.split(",")]
    reps = 20 if args.quick else 200
    lat_threads = [int(t) for t in str(args.threads).split(",")]
    use_threads(args.train_threads)
    t_start = time.perf_counter()
    load_start = _loadavg()

    data = load_mnist(args.data, download=not args.offline)
    xtr, ytr = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    xte, yte = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    if args.quick:  # small, fixed subset keeps the smoke test well under a minute
        xtr, ytr = xtr[:5000], ytr[:5000]
    if "digits" in data.source and args.data is None:
        print("data: no MNIST copy" + (" and no network" if not args.offline else "")
              + ": using scikit-learn's 8x8 digits instead (pass --data or set SPARSEKIT_MNIST)")
    print(f"data: {data.source}; train {tuple(xtr.shape)}, test {tuple(xte.shape)}")

    torch.manual_seed(args.seed)
    dense = LeNet300100(n_in=xtr.shape[1])
    train(dense, xtr, ytr, epochs=epochs, lr=0.05, batch_size=args.batch_size, seed=args.seed)
    dense_eval = evaluate(dense, (xte, yte))
    print(f"dense ({epochs} epochs): test accuracy {dense_eval.accuracy:.4f} "
          f"[{time.perf_counter() - t_start:.0f} s]")

    ft_lr = 0.01
    twin = copy.deepcopy(dense)
    train(twin, xtr, ytr, epochs=ft_epochs, lr=ft_lr, batch_size=args.batch_size,
          seed=args.seed + 1)
    twin_eval = evaluate(twin, (xte, yte))
    print(f"dense twin (+{ft_epochs} epochs, no pruning): test accuracy "
          f"{twin_eval.accuracy:.4f} [{time.perf_counter() - t_start:.0f} s]")

    steps = ft_epochs * math.ceil(xtr.shape[0] / args.batch_size)
    end_step = max(1, int(0.6 * steps))  # prune over 60 % of fine-tuning, then recover
    frequency = max(1, end_step // 30)
    dense_bytes, _ = model_bytes(dense)
    xb1, xbl = xte[:1].contiguous(), xte[:args.large_batch].contiguous()
    rows = []
    for s in sparsities:
        use_threads(args.train_threads)
        model = copy.deepcopy(dense)
        pruner = train(model, xtr, ytr, epochs=ft_epochs, lr=ft_lr, batch_size=args.batch_size,
                       seed=args.seed + 1,
                       pruner_kwargs=dict(final_sparsity=s, start_step=0, end_step=end_step,
                                          frequency=frequency, schedule="cubic",
                                          criterion="l1", scope="layer",
                                          include=list(PRUNED_LAYERS)))
        report = pruner.finalize()
        ev = evaluate(model, (xte, yte))

        sparse = to_sparse(model)
        with torch.inference_mode():
            logits_d, logits_s = model(xte), sparse(xte)
        pred_d, pred_s = logits_d.argmax(1), logits_s.argmax(1)
        n_diff = int((pred_d != pred_s).sum())
        max_logit_diff = float((logits_d - logits_s).abs().max())
        assert n_diff == 0, (f"sparse model disagrees with the masked dense model on {n_diff} "
                             f"test samples (max |logit diff| {max_logit_diff:.3g})")

        # sparsify(tune=True) measures dense / CSR / BSR per layer at the batch size it is
        # tuned for (with the threads of the first latency setting) and keeps the fastest, so
        # each batch size gets the model tuned for it: what a deployment would do.
        use_threads(lat_threads[0])
        inputs = {"batch1": xb1, f"batch{xbl.shape[0]}": xbl}
        tuned, tuned_choices = {}, {}
        for b, xb in inputs.items():
            tuned[b] = copy.deepcopy(model).eval()
            tune_report = sparsify(tuned[b], min_sparsity=0.5, batch_sizes=(xb.shape[0],),
                                   tune=True, cache=False)
            tuned_choices[b] = {lr.name: lr.choice for lr in tune_report.layers}
        timings = {}
        for nt in lat_threads:
            use_threads(nt)
            timings[f"threads{nt}"] = {
                b: latency({"dense": dense, "sparse": sparse, "tuned": tuned[b]}, xb,
                           reps if b == "batch1" else max(5, reps // 10))
                for b, xb in inputs.items()}
        _, comp_bytes = model_bytes(model)
        nnz_all = sum(int(torch.count_nonzero(p)) for n, p in model.named_parameters()
                      if n.endswith("weight"))
        n_all = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
        row = {
            "target_sparsity": s,
            "pruned_layers_sparsity": report.sparsity,
            "layer_sparsity": {la.name: la.sparsity for la in report.layers},
            "all_weights_sparsity": 1.0 - nnz_all / n_all,
            "accuracy": ev.accuracy, "loss": ev.loss,
            "delta_vs_twin_points": 100.0 * (ev.accuracy - twin_eval.accuracy),
            "delta_vs_dense_points": 100.0 * (ev.accuracy - dense_eval.accuracy),
            "nonzero_weights": nnz_all, "weights": n_all,
            "bytes_dense": dense_bytes, "bytes_compressed": comp_bytes,
            "sparse_predictions_equal": n_diff == 0, "max_abs_logit_diff": max_logit_diff,
            "latency_s": timings,
            "speedup_median": {t: {b: v["dense"]["median"] / v["sparse"]["median"]
                                   for b, v in d.items()} for t, d in timings.items()},
            "tuned_speedup_median": {t: {b: v["dense"]["median"] / v["tuned"]["median"]
                                         for b, v in d.items()} for t, d in timings.items()},
            "tuned_choices": tuned_choices,
            "sparse_layer_type": type(sparse.fc1).__name__,
        }
        rows.append(row)
        t0 = f"threads{lat_threads[0]}"
        speed = ", ".join(f"{b} {row['speedup_median'][t0][b]:.2f}x" for b in timings[t0])
        tuned_speed = ", ".join(f"{b} {row['tuned_speedup_median'][t0][b]:.2f}x"
                                for b in timings[t0])
        print(f"sparsity {s:.2f}: accuracy {100 * ev.accuracy:.2f} % "
              f"({row['delta_vs_twin_points']:+.2f} pts vs dense twin); CSR speedup vs dense "
              f"({lat_threads[0]} thread(s)): {speed}; tuned sparsify "
              f"{row['tuned_choices']}: {tuned_speed} [{time.perf_counter() - t_start:.0f} s]")

    result = {
        "example": "examples/mnist_prune.py",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # file names only: a results file must not carry this machine's directories
        "argv": [_no_dirs(a) for a in (sys.argv[1:] if argv is None else argv)],
        "data_source": _no_dirs(data.source),
        "quick": args.quick, "seed": args.seed,
        "dense_epochs": epochs, "finetune_epochs": ft_epochs, "batch_size": args.batch_size,
        "train_threads": args.train_threads, "latency_threads": lat_threads,
        "latency_reps": {"batch1": reps, f"batch{xbl.shape[0]}": max(5, reps // 10)},
        "model": "LeNet-300-100 (784-300-100-10, ReLU)" if xtr.shape[1] == 784
        else f"LeNet-300-100 variant ({xtr.shape[1]}-300-100-10, ReLU)",
        "pruning": {"method": "GradualPruner, cubic schedule (Zhu & Gupta), l1, unstructured, "
                              "per-layer targets", "pruned_layers": list(PRUNED_LAYERS),
                    "dense_layers": ["fc3 (final classifier, kept dense)"],
                    "start_step": 0, "end_step": end_step, "frequency": frequency,
                    "finetune_steps": steps},
        "optimizer": "SGD momentum 0.9 nesterov, weight decay 1e-4, cosine LR "
                     "(dense lr 0.05, fine-tune lr 0.01)",
        "dense": {"accuracy": dense_eval.accuracy, "loss": dense_eval.loss},
        "dense_twin": {"accuracy": twin_eval.accuracy, "loss": twin_eval.loss,
                       "note": f"dense model fine-tuned {ft_epochs} more epochs, no pruning"},
        "pruned": rows,
        "machine": {**machine_info(), "loadavg_at_start": load_start},
        "runtime_s": time.perf_counter() - t_start,
    }
    loads = [v[0] for v in (load_start, result["machine"]["loadavg_at_end"]) if v]
    result["oversubscribed"] = bool(loads) and max(loads) > (os.cpu_count() or 1)
    md = markdown_table(result)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


def _lat(d: dict, kind: str = "sparse") -> str:
    de, sp = d["dense"], d[kind]
    return (f"{1e6 * de['median']:.1f} [{1e6 * de['p10']:.0f}-{1e6 * de['p90']:.0f}] / "
            f"{1e6 * sp['median']:.1f} [{1e6 * sp['p10']:.0f}-{1e6 * sp['p90']:.0f}] "
            f"(**{de['median'] / sp['median']:.2f}x**)")


def markdown_table(r: dict) -> str:
    m = r["machine"]
    reps = r["latency_reps"]
    lines = [
        f"# LeNet-300-100 pruning on {r['data_source']}",
        "",
        f"seed {r['seed']}, {r['dense_epochs']} dense epochs + {r['finetune_epochs']} "
        f"fine-tuning epochs ({r['train_threads']} training thread), batch {r['batch_size']}; "
        f"torch {m['torch']}, {m['cpu']} ({m['logical_cpus']} logical CPUs, sparsekit ISA "
        f"{m['sparsekit_isa']}), {r['date_utc']}, runtime {r['runtime_s']:.0f} s. Gradual l1 "
        f"pruning of fc1+fc2 (cubic schedule over 60 % of fine-tuning); fc3, the classifier, "
        f"kept dense. Dense accuracy {100 * r['dense']['accuracy']:.2f} %, dense twin (same "
        f"extra epochs, no pruning) {100 * r['dense_twin']['accuracy']:.2f} %.",
        "",
        "| target sparsity (fc1+fc2) | reached | all-weights sparsity | accuracy % "
        "| vs twin (pts) | nonzero weights | bytes dense | bytes CSR | same predictions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in r["pruned"]:
        lines.append(
            f"| {p['target_sparsity']:.2f} | {p['pruned_layers_sparsity']:.4f} "
            f"| {p['all_weights_sparsity']:.4f} | {100 * p['accuracy']:.2f} "
            f"| {p['delta_vs_twin_points']:+.2f} | {p['nonzero_weights']} / {p['weights']} "
            f"| {p['bytes_dense']} | {p['bytes_compressed']} | {p['sparse_predictions_equal']} |")
    batches = list(reps)
    lines += [
        "",
        f"Latency per forward of the whole model, dense (`nn.Linear`) vs sparse (fc1, fc2 as "
        f"`{r['pruned'][0]['sparse_layer_type'] if r['pruned'] else ''}` CSR), median "
        f"[p10-p90] in microseconds of {' / '.join(str(reps[b]) for b in batches)} interleaved "
        f"runs; load average at start {m.get('loadavg_at_start')}, at end "
        f"{m.get('loadavg_at_end')}.",
    ]
    if r.get("oversubscribed"):
        lines += ["", "**Warning:** the machine was oversubscribed during this run (load average "
                  "above its logical CPU count), so these timings, the multi-thread ones above "
                  "all (OpenMP barriers wait for descheduled threads), are not representative; "
                  "rerun the example on a quiet machine before quoting them."]
    lines += [
        "",
        "| target sparsity | threads | " + " | ".join(f"{b} dense / CSR (speedup)"
                                                     for b in batches)
        + " | " + " | ".join(f"{b} dense / tuned sparsify (speedup)" for b in batches) + " |",
        "|---|---|" + "---|" * (2 * len(batches)),
    ]
    for p in r["pruned"]:
        for t, d in p["latency_s"].items():
            lines.append(f"| {p['target_sparsity']:.2f} | {t.removeprefix('threads')} | "
                         + " | ".join(_lat(d[b]) for b in batches) + " | "
                         + " | ".join(_lat(d[b], "tuned") for b in batches) + " |")
    lines += ["", "Tuned sparsify choices: " + "; ".join(
        f"{p['target_sparsity']:.2f} {b}: {c}" for p in r["pruned"]
        for b, c in p["tuned_choices"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
