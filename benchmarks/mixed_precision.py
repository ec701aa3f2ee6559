"""Mixed-precision benchmark (issue 4): uniform W4A8 vs MP4/A8 (kl) vs MP4/A8 (hessian) vs a random
allocation at the same size, on CIFAR ResNet-20/32 and EfficientNet-Lite0/1, with sensitivity and
allocation times.

    python benchmarks/mixed_precision.py                       # all four models -> benchmarks/MP_RESULTS.md
    python benchmarks/mixed_precision.py --models cifar_resnet20 --out /tmp/r20.md

Everything is chosen on distilled data: the calibration/sensitivity data are ZeroQ distilled images,
the lowest candidate width of each mixed-precision plan is picked by the KL of the quantized model to
the float model *on the distilled images* (``MixedPrecisionConfig.select_min_bits``); the evaluation
images are only used for the reported top-1. All rows of one model share one QuantConfig
(per-channel symmetric weights with the MSE range estimator, 8-bit activations, percentile ranges) and
the same distilled images; "MP4" means a weight budget equal to the uniform 4-bit model's.
"""

from __future__ import annotations

import os
import sys

from _bench import CIFAR, IMAGENET, RESNET_WEIGHTS, ROOT, ensure_runtime_env  # noqa: E402

if __name__ == "__main__":
    ensure_runtime_env()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import zsq  # noqa: E402
from zsq.allocate import random_allocation, size_budget  # noqa: E402
from zsq.config import DistillConfig, QuantConfig  # noqa: E402
from zsq.data import load_dataset  # noqa: E402
from zsq.evaluate import compare  # noqa: E402
from zsq.mixed_precision import MixedPrecisionConfig, apply_bit_plan, mixed_precision_plan, plan_from_allocation  # noqa: E402
from zsq.models import load_model  # noqa: E402
from zsq.plots import plot_pareto  # noqa: E402
from zsq.sensitivity import compute_sensitivity, prepare_model  # noqa: E402
from zsq.sensitivity.hessian import HessianConfig  # noqa: E402
from zsq.sensitivity.kl import KLConfig  # noqa: E402
from zsq.size import fp32_size_bytes, quantized_size_bytes  # noqa: E402

MODELS = ("cifar_resnet20", "cifar_resnet32", "efficientnet_lite0", "efficientnet_lite1")
BITS = (2, 3, 4, 5, 6, 8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(name: str, args: argparse.Namespace):
    cifar = name.startswith("cifar_")
    model, spec = load_model(name, weights=str(RESNET_WEIGHTS[name]) if cifar else None)
    model.eval()
    if cifar:
        evals = {"exact 846": load_dataset(CIFAR, spec.preprocessing, split="exact_images_prefix"),
                 "JPEG 5000": load_dataset(CIFAR, spec.preprocessing)}
        dcfg = DistillConfig(num_batches=2, batch_size=32, iterations=args.resnet_iters, seed=args.seed)
    else:
        evals = {"sample 500": load_dataset(IMAGENET, spec.preprocessing)}
        dcfg = DistillConfig(num_batches=2, batch_size=16, iterations=args.lite_iters, seed=args.seed)
    return model, spec, evals, dcfg


def evaluate_config(model, folded, calib, evals, cfg: QuantConfig) -> dict:
    q = zsq.quantize(folded, cfg)
    zsq.calibrate(q, calib, progress=False)
    out = {"size_bytes": quantized_size_bytes(q)}
    for label, ds in evals.items():
        r = compare(model, q, ds, progress=False)
        out[label] = {"fp32": r["fp32"]["top1"], "top1": r["quantized"]["top1"], "agreement": r["agreement"],
                      "kl": r["kl"]}
    return out


def hist(bits: dict) -> str:
    c = Counter(bits.values())
    return " ".join(f"{k}b:{c[k]}" for k in sorted(c))


def run_model(name: str, args: argparse.Namespace) -> dict:
    t_model = time.perf_counter()
    model, spec, evals, dcfg = setup(name, args)
    art = Path(args.artifacts) / name
    log(f"{name}: distilling {dcfg.num_batches}x{dcfg.batch_size} images, {dcfg.iterations} iterations")
    t = time.perf_counter()
    calib = zsq.distill(model, spec.preprocessing, dcfg, progress=False).inputs
    distill_s = time.perf_counter() - t
    folded, _ = zsq.fold_batchnorm(model)
    base = QuantConfig(wbits=4, abits=8, weight_estimator="mse")
    res: dict = {"model": name, "num_layers": None, "distill_s": distill_s, "fp32_mb": fp32_size_bytes(model) / 1e6,
                 "distill": dcfg.to_dict(), "quant_config": base.to_dict(), "rows": {}}

    log(f"{name}: uniform W4A8")
    res["rows"]["uniform W4A8"] = evaluate_config(model, folded, calib, evals, base)
    res["rows"]["uniform W4A8"]["bits"] = "4b:all"

    hz = HessianConfig(batch_size=dcfg.batch_size, seed=args.seed)
    mps = {}
    for method in ("kl", "hessian"):
        log(f"{name}: MP4/A8 {method} (candidates {BITS})")
        mp_cfg = MixedPrecisionConfig(method=method, bits=BITS, target_size="4bit", hessian=hz,
                                      kl=KLConfig(batch_size=32))
        mp = mixed_precision_plan(folded, calib, base, config=mp_cfg, model_name=name, progress=False)
        mps[method] = mp
        mp.save(art / method)
        row = evaluate_config(model, folded, calib, evals, mp.quant_config)
        row.update({"bits": hist(mp.plan.weight_bits), "average_bits": mp.allocation.average_bits,
                    "lowest_width": min(mp.plan.metadata["allocated_bits"]),
                    "selection": mp.selection, "timings_s": mp.timings_s,
                    "predicted_size_bytes": mp.allocation.size_bytes})
        res["rows"][f"MP4/A8 {method}"] = row
        res["num_layers"] = len(mp.table.layers)
        log(f"{name}: {method}: {row['bits']}; times {mp.timings_s}")

    kl_mp = mps["kl"]
    widths = kl_mp.plan.metadata["allocated_bits"]
    budget = size_budget(kl_mp.table, "4bit")
    rnd = []
    for seed in range(args.random_seeds):
        a = random_allocation(kl_mp.table, budget, seed=seed, bits=widths)
        row = evaluate_config(model, folded, calib, evals, apply_bit_plan(base, plan_from_allocation(a, kl_mp.table)))
        row.update({"bits": hist(a.bits), "seed": seed, "sensitivity_kl": a.sensitivity})
        rnd.append(row)
        log(f"{name}: random seed {seed}: {row['bits']}")
    res["random"] = rnd
    plot_pareto(kl_mp.allocation, art / "pareto_with_random.png", uniform=kl_mp.uniform,
                others={f"random {r['seed']}": random_allocation(kl_mp.table, budget, seed=r["seed"], bits=widths)
                        for r in rnd}, title=f"{name}: KL sensitivity")

    # The issue's timing target: KL sensitivity with 3 candidate widths.
    q = prepare_model(folded, base)
    t = time.perf_counter()
    compute_sensitivity(q, calib, method="kl", bits=(2, 4, 8), config=KLConfig(batch_size=32), progress=False)
    res["kl_3bits_s"] = time.perf_counter() - t

    if name == "cifar_resnet20" and not args.skip_hvp_check:
        # Cross-check the default Gauss-Newton trace against Hutchinson with Hessian-vector products.
        log(f"{name}: per-layer Hutchinson with Hessian-vector products (check)")
        t = time.perf_counter()
        hv = compute_sensitivity(q, calib, method="hessian", bits=BITS,
                                 config=HessianConfig(trace_mode="per_layer", batch_size=dcfg.batch_size,
                                                      seed=args.seed), progress=False)
        hvp_s = time.perf_counter() - t
        gn = mps["hessian"].table
        rel = [abs(gn.extras[n]["trace"] - hv.extras[n]["trace"]) / max(abs(hv.extras[n]["trace"]), 1e-12)
               for n in gn.names]
        res["hvp_check"] = {"seconds": hvp_s, "gn_seconds": gn.timings_s.get("sensitivity"),
                            "median_rel_diff": statistics.median(rel), "max_rel_diff": max(rel),
                            "rank_corr": _spearman([gn.extras[n]["trace"] for n in gn.names],
                                                   [hv.extras[n]["trace"] for n in gn.names])}
        mp_cfg = MixedPrecisionConfig(method="hessian", bits=BITS, target_size="4bit",
                                      hessian=HessianConfig(trace_mode="per_layer", batch_size=dcfg.batch_size,
                                                            seed=args.seed))
        mp = mixed_precision_plan(folded, calib, base, config=mp_cfg, model_name=name, progress=False, table=hv)
        row = evaluate_config(model, folded, calib, evals, mp.quant_config)
        row.update({"bits": hist(mp.plan.weight_bits), "lowest_width": min(mp.plan.metadata["allocated_bits"]),
                    "timings_s": mp.timings_s, "average_bits": mp.allocation.average_bits})
        res["rows"]["MP4/A8 hessian (HVP per-layer)"] = row
    res["total_s"] = time.perf_counter() - t_model
    (art / "result.json").write_text(json.dumps(res, indent=2, default=str))
    return res


def _spearman(a, b) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def markdown(results: list[dict], args: argparse.Namespace, command: str, wall: float) -> str:
    lines = ["# Mixed precision: results (issue 4)", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, shared with other jobs (timings are wall-clock on a loaded "
             f"2-core CPU). Wall time, summed over the models: {wall / 60:.1f} min.", "",
             "Setting, the same for every row of a model: weights symmetric per-channel with the MSE range "
             "estimator, activations 8-bit asymmetric with static percentile (99.99) ranges at the ONNX-QDQ "
             "places (network input, every conv/linear input, residual adds), BN folded; calibration and "
             "sensitivity on ZeroQ distilled images only (ResNets: 2x32 images, "
             f"{args.resnet_iters} iterations; Lite: 2x16 images, {args.lite_iters} iterations). "
             "MP4/A8: weight storage <= that of the uniform 4-bit model (size counted as zsq.size does). "
             f"Candidate widths {','.join(map(str, BITS))}; the lowest allowed width (2, 3 or 4) is chosen per plan "
             "by the KL between the float and the quantized model on the distilled images (no real data). "
             "hessian = HAWQ-V2 average Hessian trace x ||Q(W)-W||^2, trace by Hutchinson with Rademacher probes "
             "through the Gauss-Newton factor (equal to the Hessian's diagonal blocks for these ReLU/ReLU6 "
             "networks; see the HVP check below). Random: a random allocation with the KL plan's widths at the "
             f"same budget, mean of {args.random_seeds} seeds (min-max in brackets).", ""]
    lines += ["## Top-1 (%)", "",
              "| model | eval images | FP32 | uniform W4A8 | MP4/A8 kl | MP4/A8 hessian | random MP4/A8 |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for label in [k for k in r["rows"]["uniform W4A8"] if isinstance(r["rows"]["uniform W4A8"][k], dict)]:
            u = r["rows"]["uniform W4A8"][label]
            k = r["rows"]["MP4/A8 kl"][label]
            h = r["rows"]["MP4/A8 hessian"][label]
            rs = [x[label]["top1"] for x in r["random"]]
            fp = u["fp32"]
            rnd = f"{statistics.mean(rs):.2f} [{min(rs):.1f}-{max(rs):.1f}]" if rs else "-"
            lines.append(f"| {r['model']} | {label} | {fp:.2f} | {u['top1']:.2f} ({u['top1'] - fp:+.2f}) | "
                         f"**{k['top1']:.2f}** ({k['top1'] - fp:+.2f}) | **{h['top1']:.2f}** ({h['top1'] - fp:+.2f}) | "
                         f"{rnd} |")
    lines += ["", "## Sizes, plans and times", "",
              "| model | layers | FP32 MB | W4A8 MB | MP kl MB | MP hessian MB | kl plan (width:layers) | "
              "hessian plan | distill s | kl sens. s | kl alloc. s | kl select s | hessian sens. s | "
              "hessian alloc. s | hessian select s | KL, 3 widths, s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        u, k, h = r["rows"]["uniform W4A8"], r["rows"]["MP4/A8 kl"], r["rows"]["MP4/A8 hessian"]
        kt, ht = k["timings_s"], h["timings_s"]
        lines.append(
            f"| {r['model']} | {r['num_layers']} | {r['fp32_mb']:.3f} | {u['size_bytes'] / 1e6:.4f} | "
            f"{k['size_bytes'] / 1e6:.4f} | {h['size_bytes'] / 1e6:.4f} | {k['bits']} | {h['bits']} | "
            f"{r['distill_s']:.0f} | {kt['sensitivity']:.1f} | {kt['allocate']:.2f} | {kt.get('validate', 0):.1f} | "
            f"{ht['sensitivity']:.1f} | {ht['allocate']:.2f} | {ht.get('validate', 0):.1f} | {r['kl_3bits_s']:.1f} |")
    lines += ["", "Lowest width chosen on distilled data (calibration KL per candidate lowest width):", ""]
    for r in results:
        for m in ("kl", "hessian"):
            sel = r["rows"][f"MP4/A8 {m}"]["selection"]
            txt = ", ".join(f"{s['min_bits']}-bit: {s['calibration_kl']:.4f}" for s in sel)
            lines.append(f"* {r['model']} {m}: {txt} -> {r['rows'][f'MP4/A8 {m}']['lowest_width']}-bit")
    for r in results:
        if "hvp_check" in r:
            c = r["hvp_check"]
            row = r["rows"]["MP4/A8 hessian (HVP per-layer)"]
            accs = ", ".join(f"{lab} {v['top1']:.2f}" for lab, v in row.items() if isinstance(v, dict) and "top1" in v)
            lines += ["", f"HVP check ({r['model']}): per-layer Hutchinson with Hessian-vector products took "
                          f"{c['seconds']:.0f} s vs {c['gn_seconds']:.0f} s for the Gauss-Newton probes; per-layer "
                          f"traces differ by {100 * c['median_rel_diff']:.1f}% (median), "
                          f"{100 * c['max_rel_diff']:.1f}% (max), Spearman rank correlation {c['rank_corr']:.3f}. "
                          f"MP4/A8 with the HVP traces: {accs} ({row['bits']})."]
    lines += ["", "## Targets (issue 4)", ""]
    lines += targets(results)
    lines += ["", "Artifacts (sensitivity tables, bit plans, per-layer sensitivity and Pareto plots) were written to "
              f"`{args.artifacts}/<model>/`.", ""]
    return "\n".join(lines)


def targets(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        main = next(k for k, v in r["rows"]["uniform W4A8"].items() if isinstance(v, dict))
        u = r["rows"]["uniform W4A8"][main]["top1"]
        for m in ("kl", "hessian"):
            v = r["rows"][f"MP4/A8 {m}"][main]
            out.append(f"* {r['model']} MP4/A8 {m} beats uniform W4A8 at the same size ({main}): "
                       f"{v['top1']:.2f} vs {u:.2f} -> {'holds' if v['top1'] > u else 'does NOT hold'}")
        fp = r["rows"]["uniform W4A8"][main]["fp32"]
        limit = {"cifar_resnet20": 1.0, "efficientnet_lite0": 3.0}.get(r["model"])
        if limit is not None:
            for m in ("kl", "hessian"):
                drop = fp - r["rows"][f"MP4/A8 {m}"][main]["top1"]
                out.append(f"* {r['model']} MP4/A8 {m} loses <= {limit} points ({main}): loses {drop:.2f} -> "
                           f"{'holds' if drop <= limit else 'does NOT hold'}")
        if r["model"] == "cifar_resnet20":
            out.append(f"* KL sensitivity of ResNet-20 with 3 candidate widths < 60 s: {r['kl_3bits_s']:.1f} s -> "
                       f"{'holds' if r['kl_3bits_s'] < 60 else 'does NOT hold'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "MP_RESULTS.md"))
    ap.add_argument("--artifacts", default="runs/mp-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resnet-iters", type=int, default=100)
    ap.add_argument("--lite-iters", type=int, default=40)
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--skip-hvp-check", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="models whose ARTIFACTS/<model>/result.json exists are not run again (resume a run "
                         "that was split over several invocations)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    missing = [p for p in (CIFAR, IMAGENET, *RESNET_WEIGHTS.values()) if not p.exists()]
    if missing:
        sys.exit(f"missing assets: {', '.join(map(str, missing))}")
    results = []
    for name in args.models.split(","):
        saved = Path(args.artifacts) / name.strip() / "result.json"
        if args.reuse and saved.is_file():
            log(f"{name}: reusing {saved}")
            results.append(json.loads(saved.read_text()))
            continue
        results.append(run_model(name.strip(), args))
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    text = markdown(results, args, command, sum(float(r.get("total_s", 0.0)) for r in results))
    Path(args.out).write_text(text)
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    (Path(args.artifacts) / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
