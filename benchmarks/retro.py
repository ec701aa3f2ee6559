"""Retro-Synthesis calibration data vs ZeroQ distilled data vs Gaussian noise (issue 7, part 2).

Regenerate benchmarks/RETRO_RESULTS.md (full run: ResNet-20/32 + EfficientNet-Lite0, 3 seeds; long):

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_WAIT_POLICY=PASSIVE \
      .venv/bin/python benchmarks/retro.py --out benchmarks/retro.json --md benchmarks/RETRO_RESULTS.md

Smoke run (ResNet-20 only, 1 seed, 30 iterations, 500 evaluation images; a minute or two):

    .venv/bin/python benchmarks/retro.py --quick

How the defaults of RetroConfig were chosen (synthetic data only: scored by the KL between FP32 and
quantized outputs on a held-apart set of distilled inputs; no real image is read):

    .venv/bin/python benchmarks/retro.py --choose-defaults --threads 1 --out benchmarks/retro_defaults.json

Rows per model: FP32, then each setting calibrated on Gaussian noise, distilled data and retro data
(same number of inputs and Adam iterations for distilled and retro; mean over seeds and the spread).
BN-free rows (default: ResNet-20 with every BatchNorm folded into its conv, i.e. the same function
without BN layers): Gaussian vs retro; distilled data is not defined there (ZeroQ raises
NoBatchNormError). Evaluation: the CIFAR-10 JPEG test sample / the ImageNet sample in ../shared,
used only to evaluate, never to choose anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import zsq
from zsq.config import DistillConfig, QuantConfig
from zsq.data import load_dataset
from zsq.distill.retro import RetroConfig, retro_synthesize
from zsq.errors import NoBatchNormError
from zsq.evaluate import compare, evaluate
from zsq.fold import count_batchnorm
from zsq.models import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR = SHARED / "data/cifar10-test/cifar10_test.npz"
MODELS = {
    "cifar_resnet20": (SHARED / "models/resnet-cifar10-akamaster/resnet20-12fca82f.th", CIFAR),
    "cifar_resnet32": (SHARED / "models/resnet-cifar10-akamaster/resnet32-d509ac18.th", CIFAR),
    "efficientnet_lite0": (None, SHARED / "data/imagenet-sample-500"),
}
FIRST_LAST_8 = {"@first": {"wbits": 8}, "@last": {"wbits": 8}}
SETTINGS = {
    "W8A8": (8, 8, {}),
    "W6A6": (6, 6, {}),
    "W4A8": (4, 8, {}),
    "W4A8 (first/last 8)": (4, 8, FIRST_LAST_8),
}
DEFAULT_SETTINGS = "W8A8,W6A6,W4A8"
REGENERATE = ("MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_WAIT_POLICY=PASSIVE \\\n"
              "  .venv/bin/python benchmarks/retro.py --out benchmarks/retro.json --md benchmarks/RETRO_RESULTS.md")


def make_sources(model, spec, args, *, with_distilled: bool) -> tuple[dict[str, list[dict]], list[str]]:
    """Calibration sets per source: a list (one per seed) of {"x", "seconds", extra info}."""
    n = DistillConfig(batch_size=args.batch_size).resolved_batch_size(spec.preprocessing.input_size)
    notes: list[str] = []
    sources: dict[str, list[dict]] = {"gaussian": [], "distilled": [], "retro": []}
    for seed in range(args.seeds):
        sources["gaussian"].append({"x": zsq.gaussian_inputs(n, spec.preprocessing, seed=seed), "seconds": 0.0})
        if with_distilled:
            r = zsq.distill(model, spec.preprocessing, DistillConfig(batch_size=n, iterations=args.iters, seed=seed),
                            progress=False)
            sources["distilled"].append({"x": r.inputs, "seconds": r.seconds})
            print(f"  distilled seed {seed}: {n} inputs, BN loss {r.initial_losses[0]:.3f} -> {r.losses[0]:.4f} "
                  f"in {r.seconds:.1f}s", flush=True)
        rr = retro_synthesize(model, spec.preprocessing, RetroConfig(num_images=n, batch_size=n,
                                                                     iterations=args.iters, seed=seed),
                              progress=False)
        sources["retro"].append({"x": rr.inputs, "seconds": rr.seconds, "target_accuracy": rr.target_accuracy})
        bn = (f", BN loss {rr.initial_bn_losses[0]:.3f} -> {rr.bn_losses[0]:.4f}" if rr.bn_losses else ", no BN")
        print(f"  retro seed {seed}: {n} inputs, cross-entropy {rr.class_losses[0]:.4f}{bn}, "
              f"{rr.target_accuracy:.0f}% classified as their target, {rr.seconds:.1f}s", flush=True)
    if not with_distilled:
        try:
            zsq.distill(model, spec.preprocessing, DistillConfig(batch_size=n, iterations=1), progress=False)
            notes.append("distillation unexpectedly ran on the BN-free model")
        except NoBatchNormError as exc:
            notes.append(f"distilled: not available ({type(exc).__name__}: {exc})")
        del sources["distilled"]
    return sources, notes


def run_rows(name: str, label: str, model, quant_base, spec, eval_ds, sources, args, fp_top1: float) -> list[dict]:
    rows = []
    for setting in args.settings.split(","):
        w, a, ov = SETTINGS[setting]
        cfg = QuantConfig(wbits=w, abits=a, overrides=ov)
        for src, items in sources.items():
            per_seed = []
            for item in items:
                t = time.perf_counter()
                q = zsq.quantize(quant_base, cfg)
                zsq.calibrate(q, item["x"], progress=False)
                calib_s = time.perf_counter() - t
                res = compare(model, q, eval_ds, progress=False)
                per_seed.append({"top1": res["quantized"]["top1"], "agreement": res["agreement"], "kl": res["kl"],
                                 "synth_s": item["seconds"], "calibrate_s": calib_s})
            top1s = [p["top1"] for p in per_seed]
            row = {"model": label, "setting": setting, "source": src, "top1": statistics.mean(top1s),
                   "top1_seeds": top1s, "spread": max(top1s) - min(top1s) if len(top1s) > 1 else None,
                   "drop": fp_top1 - statistics.mean(top1s),
                   "agreement": statistics.mean(p["agreement"] for p in per_seed),
                   "kl": statistics.mean(p["kl"] for p in per_seed),
                   "synth_s": statistics.mean(p["synth_s"] for p in per_seed),
                   "calibrate_s": statistics.mean(p["calibrate_s"] for p in per_seed), "n": res["n"]}
            if src == "retro":
                row["target_accuracy"] = statistics.mean(i["target_accuracy"] for i in items)
            rows.append(row)
            print(f"  {label:<24} {setting:<20} {src:<10} top-1 {row['top1']:.2f} (drop {row['drop']:+.2f}"
                  + (f", spread {row['spread']:.2f}" if row["spread"] is not None else "")
                  + f") agreement {row['agreement']:.2f} KL {row['kl']:.4f}", flush=True)
    return rows


def run_model(name: str, args) -> tuple[list[dict], list[str]]:
    weights, data_path = MODELS[name]
    if (weights is not None and not weights.exists()) or not data_path.exists():
        print(f"skip {name}: assets not found in {SHARED}", file=sys.stderr)
        return [], []
    model, spec = load_model(name, weights=weights)
    eval_ds = load_dataset(data_path, spec.preprocessing, limit=args.limit)
    fp = evaluate(model, eval_ds, progress=False)
    print(f"{name}: FP32 top-1 {fp.top1:.2f} on {fp.n} images", flush=True)
    rows = [{"model": name, "setting": "FP32", "source": "-", "top1": fp.top1, "drop": 0.0, "agreement": 100.0,
             "n": fp.n}]
    folded, _ = zsq.fold_batchnorm(model)
    sources, notes = make_sources(model, spec, args, with_distilled=True)
    rows += run_rows(name, name, model, folded, spec, eval_ds, sources, args, fp.top1)
    if name in args.nobn_models.split(","):
        label = f"{name} (BN folded away)"
        print(f"{label}: {count_batchnorm(folded)} BatchNorm layers left", flush=True)
        sources, nb_notes = make_sources(folded, spec, args, with_distilled=False)
        notes += [f"{label}: {m}" for m in nb_notes]
        rows.append({**rows[0], "model": label})
        rows += run_rows(name, label, folded, folded, spec, eval_ds, sources, args, fp.top1)
    return rows, notes


def to_markdown(rows: list[dict], notes: list[str], args) -> str:
    lines = ["# Retro-Synthesis vs distilled vs Gaussian calibration data", "",
             "Regenerate:", "", "```bash", REGENERATE, "```", "",
             f"Settings: {args.seeds} seed(s); {args.iters} Adam iterations for distilled and retro data "
             f"(same number of inputs: zsq's default batch); evaluation images: "
             f"{'first ' + str(args.limit) if args.limit else 'all'} of each set. top-1: mean over seeds ± half "
             "the spread. Retro `target %`: share of the synthesised inputs the FP32 model classifies as their "
             "target class.", "",
             "| model | setting | calibration | top-1 | drop | agreement % | KL | synth s | target % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        top1 = f"{r['top1']:.2f}" + (f" ± {r['spread'] / 2:.2f}" if r.get("spread") is not None else "")
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        synth = f"{r['synth_s']:.1f}" if "synth_s" in r else "-"
        tgt = f"{r['target_accuracy']:.0f}" if "target_accuracy" in r else "-"
        lines.append(f"| {r['model']} | {r['setting']} | {r['source']} | {top1} | {r['drop']:+.2f} | "
                     f"{r['agreement']:.2f} | {kl} | {synth} | {tgt} |")
    if notes:
        lines += [""] + [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Choosing RetroConfig's defaults on synthetic data only
# ------------------------------------------------------------------------------------------------

# Candidates: changes to BASE (absolute settings, so the table does not move when a default moves).
BASE = dict(class_weight=1.0, bn_weight=1.0, input_weight=1.0, tv_weight=0.05, l2_weight=0.0, iterations=100, lr=0.2)
CANDIDATES = {
    "paper (CE+BN only)": {"input_weight": 0.0, "tv_weight": 0.0},
    "CE+BN+input": {"tv_weight": 0.0},
    "CE+BN+input+tv0.05": {},
    "CE+BN+input+tv0.5": {"tv_weight": 0.5},
    "CE+BN+input+tv0.05+l2 0.05": {"l2_weight": 0.05},
    "class 0.1": {"class_weight": 0.1},
    "class 0.01": {"class_weight": 0.01},
    "no BN term (class+priors)": {"bn_weight": 0.0},
    "lr 0.05": {"lr": 0.05},
    "50 iterations": {"iterations": 50},
    "200 iterations": {"iterations": 200},
    "class 0.1 tv 0": {"class_weight": 0.1, "tv_weight": 0.0},
    "class 0.1 no input term tv 0": {"class_weight": 0.1, "input_weight": 0.0, "tv_weight": 0.0},
    "class 0.1 no BN term": {"class_weight": 0.1, "bn_weight": 0.0},
    "class 0.1 no BN term tv 0.5": {"class_weight": 0.1, "bn_weight": 0.0, "tv_weight": 0.5},
}


@torch.no_grad()
def kl_fp32_vs_quant(fp32, qmodel, x, batch: int = 32) -> float:
    tot = 0.0
    for i in range(0, x.shape[0], batch):
        p = torch.log_softmax(fp32(x[i:i + batch]), -1)
        q = torch.log_softmax(qmodel(x[i:i + batch]), -1)
        tot += float((p.exp() * (p - q)).sum())
    return tot / x.shape[0]


def choose_defaults(args) -> None:
    """KL(FP32 || quantized) on two held-apart synthetic validation sets (seed 1000): distilled data
    (200 iterations) and plain CE+BN retro data (200 iterations). Each favours data like itself, so
    a candidate is judged on both. Reference rows: Gaussian noise and distilled data (same size)."""
    name = args.models.split(",")[0]
    weights, _ = MODELS[name]
    model, spec = load_model(name, weights=weights)
    pre = spec.preprocessing
    n = DistillConfig(batch_size=args.batch_size).resolved_batch_size(pre.input_size)
    vals = {
        "distilled-val": zsq.distill(model, pre, DistillConfig(batch_size=n, iterations=200, seed=1000),
                                     progress=False).inputs,
        "retro-val": retro_synthesize(model, pre, RetroConfig(num_images=n, iterations=200, input_weight=0.0,
                                                              tv_weight=0.0, seed=1000), progress=False).inputs,
    }
    folded, _ = zsq.fold_batchnorm(model)
    settings = args.settings.split(",")
    sets: dict[str, tuple[torch.Tensor, dict]] = {"gaussian": (zsq.gaussian_inputs(n, pre, seed=0), {})}
    if not args.candidates or "distilled (100 it)" in args.candidates.split(","):
        r = zsq.distill(model, pre, DistillConfig(batch_size=n, iterations=100, seed=0), progress=False)
        sets["distilled (100 it)"] = (r.inputs, {"seconds": r.seconds})
    rows = []
    wanted = args.candidates.split(",") if args.candidates else None
    for cand, changes in [("gaussian", None), ("distilled (100 it)", None), *CANDIDATES.items()]:
        if wanted is not None and cand not in wanted:
            continue
        if changes is None:
            x, info = sets[cand]
        else:
            rr = retro_synthesize(model, pre, RetroConfig(**{**BASE, "num_images": n, "batch_size": n, **changes}),
                                  progress=False)
            x, info = rr.inputs, {"seconds": rr.seconds, "class_loss": rr.class_losses[0],
                                  "bn_loss": rr.bn_losses[0] if rr.bn_losses else None,
                                  "target_accuracy": rr.target_accuracy}
        row = {"candidate": cand, **info}
        for setting in settings:
            w, a, ov = SETTINGS[setting]
            q = zsq.quantize(folded, QuantConfig(wbits=w, abits=a, overrides=ov))
            zsq.calibrate(q, x, progress=False)
            for vname, v in vals.items():
                row[f"{setting} {vname}"] = kl_fp32_vs_quant(model, q, v)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = [f"{s} {v}" for s in settings for v in vals]
    head = " | ".join(f"{s} KL {v}" for s in settings for v in vals)
    lines = [f"| calibration | {head} | CE | BN loss | target % | s |",
             "| --- |" + " --- |" * (len(cols) + 4)]
    for r in rows:
        kls = " | ".join(f"{r[c]:.4f}" for c in cols)
        ce = f"{r['class_loss']:.4f}" if "class_loss" in r else "-"
        bn = f"{r['bn_loss']:.3f}" if r.get("bn_loss") is not None else "-"
        tgt = f"{r['target_accuracy']:.0f}" if "target_accuracy" in r else "-"
        lines.append(f"| {r['candidate']} | {kls} | {ce} | {bn} | {tgt} | {r.get('seconds', 0):.1f} |")
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps({"model": name, "base": BASE, "validation": f"{n} inputs each, seed 1000",
                                          "rows": rows, "markdown": lines}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--nobn-models", default="cifar_resnet20",
                    help="models also benchmarked with their BN folded away (retro vs Gaussian)")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=RetroConfig().iterations,
                    help="Adam iterations for both distilled and retro data")
    ap.add_argument("--batch-size", type=int, default=None, help="inputs per source (default: zsq's distill batch)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: cifar_resnet20 only, 1 seed, 30 iterations, 500 images, W8A8,W4A8")
    ap.add_argument("--choose-defaults", action="store_true",
                    help="score RetroConfig candidates by KL on held-apart synthetic sets (no real data)")
    ap.add_argument("--candidates", default=None,
                    help="with --choose-defaults: comma list of candidate names to run (default: all)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/retro.json; quick: none)")
    ap.add_argument("--md", default=None, help="markdown output (default benchmarks/RETRO_RESULTS.md; quick: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if args.choose_defaults:
        if args.models == ",".join(MODELS):
            args.models = "cifar_resnet20"
        args.out = args.out or "benchmarks/retro_defaults.json"
        choose_defaults(args)
        return
    if args.quick:
        args.models, args.seeds, args.iters = "cifar_resnet20", 1, 30
        args.limit = args.limit or 500
        if args.settings == DEFAULT_SETTINGS:
            args.settings = "W8A8,W4A8"
    else:
        args.out = args.out or "benchmarks/retro.json"
        args.md = args.md or "benchmarks/RETRO_RESULTS.md"
    rows, notes = [], []
    for name in args.models.split(","):
        r, n = run_model(name, args)
        rows += r
        notes += n
    md = to_markdown(rows, notes, args)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "notes": notes}, indent=2))
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
