"""ZeroP proxy-data selection: does the BatchNorm-statistics distance rank candidate calibration sets
the way their quantized top-1 does, and does the selected proxy beat ZeroQ's distilled data?

Regenerate benchmarks/PROXY_RESULTS.md (full run; takes long on 2 CPU cores, Lite0 dominates):

    OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
      .venv/bin/python benchmarks/proxy.py --out benchmarks/proxy.json --md benchmarks/PROXY_RESULTS.md

Smoke run on few images (minutes): add ``--quick`` (and write elsewhere, e.g. ``--md /tmp/proxy.md``).

Per model (cifar_resnet20 with the akamaster weights, efficientnet_lite0):

* candidates (never the model's own data set): the other domain's sample from ../shared, resized by
  the model's preprocessing (CIFAR models: imagenet-sample-500; ImageNet models: cifar10_test.npz),
  procedural:textures, procedural:blobs, procedural:deadleaves, gaussian, uniform, and skimage when
  scikit-image is installed;
* each candidate gives a seeded sample of ``--num-images`` inputs; its BN distance (zsq.proxy, all three
  normalisations; ``layer`` is zsq's default, fixed before these measurements) is measured on that
  sample, and the same sample calibrates the quantized model (W4A8 and W6A6, zsq's default quantizer);
* rows outside the ranking: ZeroQ distilled data (same number of inputs), proxy+distilled (the
  selected proxy mixed half/half with the distilled data, as ``--calib proxy+distilled:``), and the
  model's own data set as an upper bound: the LAST ``--num-images`` images of the evaluation set,
  held apart (every top-1 is measured on the remaining images);
* Spearman's rho between the ranking by BN distance (ascending) and by quantized top-1 (descending),
  so +1 means the distance orders the candidates exactly like their accuracy; exact two-sided
  permutation p-value. Also rho against the KL divergence to the FP32 outputs (less noisy than top-1).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import zsq
from zsq.bn_stats import batchnorm_targets
from zsq.config import DistillConfig, QuantConfig
from zsq.data import load_dataset
from zsq.evaluate import logits_of
from zsq.models import load_model
from zsq.proxy import NORMALIZATIONS, bn_distance, bn_input_stats, load_candidate, mix_with_distilled

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR = SHARED / "data/cifar10-test/cifar10_test.npz"
IMAGENET = SHARED / "data/imagenet-sample-500"
MODELS = {  # name: (weights, own data set (eval + upper bound), cross-domain proxy candidate)
    "cifar_resnet20": (SHARED / "models/resnet-cifar10-akamaster/resnet20-12fca82f.th", CIFAR, IMAGENET),
    "efficientnet_lite0": (None, IMAGENET, CIFAR),
}
SETTINGS = [("W4A8", 4, 8), ("W6A6", 6, 6)]
OFFLINE = ["procedural:textures", "procedural:blobs", "procedural:deadleaves", "gaussian", "uniform"]
REGENERATE = ("OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 "
              ".venv/bin/python benchmarks/proxy.py --out benchmarks/proxy.json --md benchmarks/PROXY_RESULTS.md")


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


def ranks(values: list[float]) -> list[float]:
    """Average ranks (1 = smallest), ties share their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa = sum((x - ma) ** 2 for x in a)
    sbb = sum((y - mb) ** 2 for y in b)
    return sab / math.sqrt(saa * sbb) if saa > 0 and sbb > 0 else float("nan")


def spearman(a: list[float], b: list[float]) -> tuple[float, float]:
    """Spearman's rho of a and b and its exact two-sided permutation p-value (n <= 8; else nan)."""
    ra, rb = ranks(a), ranks(b)
    rho = pearson(ra, rb)
    if len(a) > 8 or math.isnan(rho):
        return rho, float("nan")
    hits = total = 0
    for perm in itertools.permutations(rb):
        total += 1
        hits += abs(pearson(ra, list(perm))) >= abs(rho) - 1e-12
    return rho, hits / total


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def distances(model, inputs: torch.Tensor) -> dict[str, float]:
    targets = batchnorm_targets(model)
    stats = bn_input_stats(model, targets, inputs)
    return {norm: bn_distance(targets, stats, normalization=norm)[0] for norm in NORMALIZATIONS}


def score(q, x_eval: torch.Tensor, y_eval: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, float]:
    logits = logits_of(q, x_eval)
    pred = logits.argmax(1)
    log_p = F.log_softmax(ref_logits.double(), 1)
    log_q = F.log_softmax(logits.double(), 1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(1).mean())
    return {"top1": 100.0 * float((pred == y_eval).float().mean()),
            "agreement": 100.0 * float((pred == ref_logits.argmax(1)).float().mean()), "kl": kl}


def quantized_scores(model, folded, x_calib: torch.Tensor, eval_set, ref_logits) -> dict[str, dict[str, float]]:
    out = {}
    for label, w, a in SETTINGS:
        q = zsq.quantize(folded, QuantConfig(wbits=w, abits=a))
        zsq.calibrate(q, x_calib, progress=False)
        out[label] = score(q, *eval_set, ref_logits)
    return out


def run_model(name: str, args) -> dict | None:
    weights, own, cross = MODELS[name]
    if (weights is not None and not weights.exists()) or not own.exists() or not cross.exists():
        print(f"skip {name}: assets not found in {SHARED}", file=sys.stderr)
        return None
    t0 = time.perf_counter()
    model, spec = load_model(name, weights=weights)
    pre = spec.preprocessing
    n = args.num_images
    n_total = len(load_dataset(own, pre))
    n_eval = n_total - n
    limit = args.eval_limit
    if args.quick and limit is None:
        limit = 200 if max(pre.input_size) <= 64 else 48
    eval_ds = load_dataset(own, pre, subset=slice(0, n_eval), limit=limit)
    x_eval, y_eval = eval_ds.get_batch(slice(0, len(eval_ds)))
    own_x = load_dataset(own, pre, subset=slice(n_eval, n_total)).images()
    ref_logits = logits_of(model, x_eval)
    fp32_top1 = 100.0 * float((ref_logits.argmax(1) == y_eval).float().mean())
    folded, _ = zsq.fold_batchnorm(model)
    print(f"{name}: FP32 top-1 {fp32_top1:.2f} on {len(y_eval)} images (own data: {own.name}, last {n} held apart)",
          flush=True)

    candidates = [str(cross), *OFFLINE]
    if importlib.util.find_spec("skimage") is not None:
        candidates.append("skimage")
    else:
        print("  skimage candidate left out: scikit-image is not installed (pip install scikit-image)", flush=True)

    rows: list[dict] = []

    def add(label: str, kind: str, per_seed: list[tuple[dict, dict]]) -> dict:
        row = {"candidate": label, "kind": kind,
               "distance": {k: statistics.fmean(d[k] for d, _ in per_seed) for k in NORMALIZATIONS},
               "settings": {s: {m: statistics.fmean(r[s][m] for _, r in per_seed) for m in ("top1", "agreement", "kl")}
                            for s, _, _ in SETTINGS},
               "top1_seeds": {s: [r[s]["top1"] for _, r in per_seed] for s, _, _ in SETTINGS}}
        rows.append(row)
        print(f"  {label[-40:]:<40} BN distance {row['distance']['layer']:.4f}  " + "  ".join(
            f"{s} top-1 {row['settings'][s]['top1']:.2f}" for s, _, _ in SETTINGS), flush=True)
        return row

    samples: dict[str, list[torch.Tensor]] = {}
    for c in candidates:
        per_seed = []
        for seed in range(args.seeds):
            x = load_candidate(c, pre, num_images=n, seed=seed)
            samples.setdefault(c, []).append(x)
            per_seed.append((distances(model, x), quantized_scores(model, folded, x, (x_eval, y_eval), ref_logits)))
        add(c, "candidate", per_seed)
    ranked = [r for r in rows if r["kind"] == "candidate"]
    selected = min(ranked, key=lambda r: r["distance"]["layer"])

    distilled, mixed = [], []
    bs = DistillConfig().resolved_batch_size(pre.input_size)
    for seed in range(args.seeds):
        cfg = DistillConfig(num_batches=math.ceil(n / bs), batch_size=bs, iterations=args.distill_iters, seed=seed)
        t = time.perf_counter()
        xd = zsq.distill(model, pre, cfg, progress=False).inputs[:n]
        print(f"  distilled seed {seed}: {xd.shape[0]} inputs in {time.perf_counter() - t:.1f}s", flush=True)
        distilled.append((distances(model, xd), quantized_scores(model, folded, xd, (x_eval, y_eval), ref_logits)))
        xm = mix_with_distilled(samples[selected["candidate"]][seed], xd, seed=seed)
        mixed.append((distances(model, xm), quantized_scores(model, folded, xm, (x_eval, y_eval), ref_logits)))
    add("distilled (ZeroQ)", "distilled", distilled)
    add(f"proxy+distilled ({short(selected['candidate'])})", "mixed", mixed)
    add("own data, held apart (upper bound)", "upper",
        [(distances(model, own_x), quantized_scores(model, folded, own_x, (x_eval, y_eval), ref_logits))])

    corr = {}
    for s, _, _ in SETTINGS:
        top1 = [r["settings"][s]["top1"] for r in ranked]
        kl = [r["settings"][s]["kl"] for r in ranked]
        corr[s] = {}
        for norm in NORMALIZATIONS:
            d = [r["distance"][norm] for r in ranked]
            rho_t, p_t = spearman(d, [-v for v in top1])
            rho_k, p_k = spearman(d, kl)
            corr[s][norm] = {"rho_top1": rho_t, "p_top1": p_t, "rho_kl": rho_k, "p_kl": p_k}
    return {"model": name, "fp32_top1": fp32_top1, "n_eval": int(len(y_eval)), "num_images": n,
            "selected": selected["candidate"], "rows": rows, "spearman": corr,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def short(c: str) -> str:
    return {str(CIFAR): "CIFAR-10 sample (resized)", str(IMAGENET): "ImageNet sample (resized)"}.get(c, c)


def fnum(v: float, spec: str) -> str:
    return "n/a" if math.isnan(v) else format(v, spec)


def fmt_top1(row: dict, s: str) -> str:
    vals = row["top1_seeds"][s]
    text = f"{statistics.fmean(vals):.2f}"
    return text + (f" ± {(max(vals) - min(vals)) / 2:.2f}" if len(vals) > 1 else "")


def to_markdown(results: list[dict], args) -> str:
    settings = [s for s, _, _ in SETTINGS]
    lines = ["# ZeroP proxy-data selection: BN distance vs quantized accuracy", "",
             f"Regenerate: `{REGENERATE}`" + (" (this file: a `--quick` smoke run)" if args.quick else ""), "",
             f"{args.num_images} images per candidate (the same sample is scored and calibrates), {args.seeds} "
             f"sampling seed(s), distillation {args.distill_iters} iterations; torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s). BN distance = mean over BN layers of "
             "(||mu_b - mu_r|| + ||sigma_b - sigma_r||) / ||sigma_r|| (zsq's default `layer` normalisation, fixed "
             "before measuring; `channel` and `none` shown for comparison, see docs/proxy.md). The model's own "
             "data set is never a candidate; it appears only as the upper-bound row.", ""]
    for res in results:
        lines += [f"## {res['model']}", "",
                  f"FP32 top-1 {res['fp32_top1']:.2f} on {res['n_eval']} evaluation images; selected proxy: "
                  f"**{short(res['selected'])}**.", "",
                  "| calibration data | BN distance (layer) | (channel) | (none) | "
                  + " | ".join(f"{s} top-1 | {s} agreement %" for s in settings) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in settings) + " |"]
        cands = sorted((r for r in res["rows"] if r["kind"] == "candidate"), key=lambda r: r["distance"]["layer"])
        others = [r for r in res["rows"] if r["kind"] != "candidate"]
        for r in cands + others:
            label = short(r["candidate"])
            if r["candidate"] == res["selected"]:
                label = f"**{label}** (selected)"
            elif r["kind"] != "candidate":
                label = f"*{label}*"
            d = r["distance"]
            lines.append(f"| {label} | {d['layer']:.4f} | {d['channel']:.4f} | {d['none']:.4f} | " + " | ".join(
                f"{fmt_top1(r, s)} | {r['settings'][s]['agreement']:.2f}" for s in settings) + " |")
        lines += ["", f"Spearman's rho over the {len(cands)} candidates (+1: the BN distance orders them exactly like "
                  "their quantized top-1; KL column: like the KL divergence to the FP32 outputs); exact p-value:", "",
                  "| setting | normalisation | rho vs top-1 | p | rho vs KL | p |", "| --- | --- | --- | --- | --- | --- |"]
        for s in settings:
            for norm in NORMALIZATIONS:
                c = res["spearman"][s][norm]
                lines.append(f"| {s} | {norm}{' (default)' if norm == 'layer' else ''} | {fnum(c['rho_top1'], '+.3f')} | "
                             f"{fnum(c['p_top1'], '.3f')} | {fnum(c['rho_kl'], '+.3f')} | {fnum(c['p_kl'], '.3f')} |")
        if any(math.isnan(res["spearman"][s]["layer"]["rho_top1"]) for s in settings):
            lines += ["", "n/a: undefined, every candidate gave the same top-1 (the quantized model collapsed or the "
                      "calibration data made no difference at this setting)."]
        lines.append("")
    lines += ["## Selected proxy vs distilled data", "",
              "| model | setting | selected proxy | its top-1 | distilled top-1 | proxy+distilled top-1 | best candidate "
              "(oracle) | upper bound (own data) | selected beats distilled? |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    wins = ties = total = 0
    for res in results:
        by_kind = {r["kind"]: r for r in res["rows"] if r["kind"] != "candidate"}
        cands = [r for r in res["rows"] if r["kind"] == "candidate"]
        sel = next(r for r in cands if r["candidate"] == res["selected"])
        for s in settings:
            oracle = max(cands, key=lambda r: r["settings"][s]["top1"])
            diff = sel["settings"][s]["top1"] - by_kind["distilled"]["settings"][s]["top1"]
            verdict = "yes" if diff > 0 else ("tie" if diff == 0 else "no")
            wins += diff > 0
            ties += diff == 0
            total += 1
            lines.append(
                f"| {res['model']} | {s} | {short(sel['candidate'])} | {fmt_top1(sel, s)} | "
                f"{fmt_top1(by_kind['distilled'], s)} | {fmt_top1(by_kind['mixed'], s)} | "
                f"{short(oracle['candidate'])} {oracle['settings'][s]['top1']:.2f} | {fmt_top1(by_kind['upper'], s)} | "
                f"{verdict} ({diff:+.2f}) |")
    lines += ["", f"The selected proxy beats distilled data in {wins} of {total} model/setting pairs "
              f"({ties} tie(s)); differences below about 1-2 points are within the noise of the evaluation sets."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--num-images", type=int, default=64, help="images per candidate, for scoring and calibration")
    ap.add_argument("--seeds", type=int, default=1, help="sampling/distillation seeds (mean reported)")
    ap.add_argument("--distill-iters", type=int, default=DistillConfig().iterations)
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N images only")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 images per candidate, 10 distillation iterations, 200 eval images "
                         "(48 for ImageNet models) unless --eval-limit is given")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/proxy.json")
    ap.add_argument("--md", default=None, help="write the markdown report here (e.g. benchmarks/PROXY_RESULTS.md)")
    args = ap.parse_args()
    if args.quick:
        args.num_images, args.distill_iters, args.seeds = 16, 10, 1
    torch.set_num_threads(args.threads)
    results = [r for r in (run_model(m, args) for m in args.models.split(",")) if r is not None]
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    md = to_markdown(results, args)
    print(md)
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
