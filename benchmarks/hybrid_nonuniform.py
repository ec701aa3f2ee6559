"""Hybrid per-tensor/per-channel and non-uniform weight quantization benchmark (issue 7, parts 3 and 4).

    python benchmarks/hybrid_nonuniform.py                 # full: ResNet-20/32 + Lite0, 3 seeds -> HYBRID_NONUNIFORM_RESULTS.md
    python benchmarks/hybrid_nonuniform.py --quick         # ResNet-20, 1 seed, 1000 CIFAR images, short latency run

Part 3 (hybrid): at W8A8 and W6A6, all-per-channel vs all-per-tensor vs hybrid (zsq.hybrid.hybrid_plan, the
threshold chosen on held-apart distilled data), top-1 on the evaluation images and the ONNX Runtime latency of
the three exported models measured side by side in one interleaved run (zsq.export.bench).
Part 4 (non-uniform): at W4A8 and W3A8, uniform vs non-uniform (codebook) weights, both per-channel, with the
true stored size.

Everything is chosen on distilled data (ZeroQ, default DistillConfig, one batch per seed): calibration, the
hybrid sensitivities and its threshold. Evaluation images are used only for the reported numbers. All rows of
one model and seed share the same distilled images and the default QuantConfig (symmetric min/max weights,
asymmetric 8-bit percentile activations) except for the setting compared.
"""

from __future__ import annotations

import os
import sys

from _bench import CIFAR, IMAGENET, RESNET_WEIGHTS, ROOT, ensure_runtime_env  # noqa: E402

if __name__ == "__main__":
    ensure_runtime_env()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import zsq  # noqa: E402
from zsq.config import DistillConfig, QuantConfig  # noqa: E402
from zsq.data import load_dataset  # noqa: E402
from zsq.evaluate import compare  # noqa: E402
from zsq.hybrid import hybrid_plan  # noqa: E402
from zsq.models import load_model  # noqa: E402
from zsq.quant import weight_layers  # noqa: E402
from zsq.size import fp32_size_bytes, quantized_size_bytes  # noqa: E402

MODELS = ("cifar_resnet20", "cifar_resnet32", "efficientnet_lite0")
HYBRID_SETTINGS = ((8, 8), (6, 6))
NONUNIFORM_SETTINGS = ((4, 8), (3, 8))
GRANULARITY_ROWS = ("per_channel", "per_tensor", "hybrid")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(name: str, args: argparse.Namespace):
    cifar = name.startswith("cifar_")
    model, spec = load_model(name, weights=str(RESNET_WEIGHTS[name]) if cifar else None)
    model.eval()
    if cifar:
        if args.quick:
            evals = {f"JPEG {args.eval_limit}": load_dataset(CIFAR, spec.preprocessing, limit=args.eval_limit)}
        else:
            evals = {"exact 846": load_dataset(CIFAR, spec.preprocessing, split="exact_images_prefix"),
                     "JPEG 5000": load_dataset(CIFAR, spec.preprocessing)}
    else:
        evals = {"sample 500": load_dataset(IMAGENET, spec.preprocessing)}
    return model, spec, evals


def evaluate(model, qmodel, evals) -> dict:
    out = {}
    for label, ds in evals.items():
        r = compare(model, qmodel, ds, progress=False)
        out[label] = {"fp32": r["fp32"]["top1"], "top1": r["quantized"]["top1"], "agreement": r["agreement"],
                      "kl": r["kl"]}
    return out


def build(folded, calib, cfg: QuantConfig):
    q = zsq.quantize(folded, cfg)
    zsq.calibrate(q, calib, progress=False)
    return q


def hybrid_part(name, model, spec, folded, calib, evals, args, seed, art: Path) -> dict:
    from zsq.export import export_onnx, snap_biases
    from zsq.export.bench import bench

    rows: dict = {}
    h, w = spec.preprocessing.input_size
    for wb, ab in HYBRID_SETTINGS:
        tag = f"W{wb}A{ab}"
        base = QuantConfig(wbits=wb, abits=ab)
        t = time.perf_counter()
        hcfg, plan, info = hybrid_plan(folded, calib, base, progress=False, model_name=name)
        plan_s = time.perf_counter() - t
        (art / f"hybrid_plan_{tag}_seed{seed}.json").write_text(json.dumps(plan.to_dict(), indent=2))
        cfgs = {"per_channel": base, "per_tensor": QuantConfig(wbits=wb, abits=ab, weight_granularity="per_tensor"),
                "hybrid": hcfg}
        paths = {}
        for label, cfg in cfgs.items():
            q = build(folded, calib, cfg)
            snap_biases(q)  # the PyTorch model then adds the same int32 biases as the exported one
            row = evaluate(model, q, evals)
            row["size_bytes"] = quantized_size_bytes(q)
            row["per_tensor_layers"] = sum(1 for m in weight_layers(q).values() if not m.weight_quantizer.per_channel)
            row["layers"] = len(weight_layers(q))
            if label == "hybrid":
                row.update({"threshold": info["threshold"], "plan_s": plan_s, "search": info["search"],
                            "per_tensor_names": [n for n, g in plan.weight_granularity.items() if g == "per_tensor"]})
            if not args.no_latency:
                p = art / f"{tag}_{label}_seed{seed}.onnx"
                export_onnx(q, p, example_input=torch.zeros(1, 3, h, w))
                paths[label] = str(p)
            rows[f"{tag} {label}"] = row
            log(f"{name} seed {seed} {tag} {label}: " + ", ".join(f"{k} {v['top1']:.2f}" for k, v in row.items()
                                                                   if isinstance(v, dict) and "top1" in v)
                + f" ({row['per_tensor_layers']}/{row['layers']} per-tensor)")
        if paths:
            res = bench(paths, batches=tuple(args.batches), reps=args.reps, threads=args.ort_threads, seed=seed)
            for label in paths:
                for b in args.batches:
                    t_ = res.timings[(label, b)]
                    rows[f"{tag} {label}"][f"latency_b{b}"] = {"min_ms": t_.min_ms, "median_ms": t_.median_ms,
                                                              "speedup_vs_pc_median": res.speedup(label, b, "median"),
                                                              "speedup_vs_pc_min": res.speedup(label, b, "min")}
            rows[f"{tag} latency_table"] = res.table()
            rows[f"{tag} latency_env"] = res.environment
    return rows


def nonuniform_part(name, model, folded, calib, evals, seed) -> dict:
    rows: dict = {}
    for wb, ab in NONUNIFORM_SETTINGS:
        for kind in ("uniform", "nonuniform"):
            q = build(folded, calib, QuantConfig(wbits=wb, abits=ab, weight_quantizer=kind))
            row = evaluate(model, q, evals)
            row["size_bytes"] = quantized_size_bytes(q)
            with torch.no_grad():
                row["weight_sq_err"] = sum(float((m.quantized_weight() - m.weight).pow(2).sum())
                                           for m in weight_layers(q).values())
            rows[f"W{wb}A{ab} {kind}"] = row
            log(f"{name} seed {seed} W{wb}A{ab} {kind}: " + ", ".join(
                f"{k} {v['top1']:.2f}" for k, v in row.items() if isinstance(v, dict) and "top1" in v))
    return rows


def run_model(name: str, args: argparse.Namespace, art_root: Path) -> dict:
    model, spec, evals = setup(name, args)
    folded, _ = zsq.fold_batchnorm(model)
    res: dict = {"model": name, "fp32_size_bytes": fp32_size_bytes(model), "seeds": {}}
    for seed in range(args.seeds):
        art = art_root / name
        art.mkdir(parents=True, exist_ok=True)
        dcfg = DistillConfig(seed=seed)
        log(f"{name} seed {seed}: distilling ({dcfg.num_batches}x{dcfg.resolved_batch_size(spec.preprocessing.input_size)}"
            f" images, {dcfg.iterations} iterations)")
        t = time.perf_counter()
        calib = zsq.distill(model, spec.preprocessing, dcfg, progress=False).inputs
        rows = {"distill_s": time.perf_counter() - t}
        if "hybrid" in args.parts:
            rows.update(hybrid_part(name, model, spec, folded, calib, evals, args, seed, art))
        if "nonuniform" in args.parts:
            rows.update(nonuniform_part(name, model, folded, calib, evals, seed))
        res["seeds"][seed] = rows
    return res


def _mean_sd(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(results: list[dict], args: argparse.Namespace, command: str, wall: float) -> str:
    out = ["# Hybrid and non-uniform weight quantization (issue 7, parts 3 and 4)", "",
           f"Regenerate: `{command}` ({wall / 60:.1f} min on this machine; {args.seeds} seed(s) of distilled data, "
           "mean ± sd over seeds). Calibration, hybrid sensitivities and the hybrid threshold use only the "
           "distilled images; evaluation images only give the numbers below.", ""]
    for r in results:
        name = r["model"]
        seeds = list(r["seeds"].values())
        evals = [k for k, v in seeds[0].items() if isinstance(v, dict) and any(isinstance(x, dict) and "top1" in x
                                                                                 for x in v.values())]
        labels = sorted({e for k in evals for e, v in seeds[0][k].items() if isinstance(v, dict) and "top1" in v})
        out += [f"## {name}", ""]
        if "hybrid" in args.parts:
            out += ["### Hybrid per-tensor / per-channel", "",
                    "| setting | weights | " + " | ".join(f"top-1 {l}" for l in labels) +
                    " | per-tensor layers | ORT median ms (b=" + "/".join(map(str, args.batches)) +
                    ") | speed-up vs per-channel |",
                    "| --- | --- | " + " | ".join("---:" for _ in labels) + " | ---: | ---: | ---: |"]
            fp = " / ".join(f"{seeds[0][f'W{HYBRID_SETTINGS[0][0]}A{HYBRID_SETTINGS[0][1]} per_channel'][l]['fp32']:.2f}"
                            for l in labels)
            for wb, ab in HYBRID_SETTINGS:
                for g in GRANULARITY_ROWS:
                    key = f"W{wb}A{ab} {g}"
                    accs = [_mean_sd([s[key][l]["top1"] for s in seeds]) for l in labels]
                    npt = _mean_sd([float(s[key]["per_tensor_layers"]) for s in seeds], 0 if len(seeds) == 1 else 1)
                    lat = spd = "n/a"
                    if f"latency_b{args.batches[0]}" in seeds[0][key]:
                        lat = " / ".join(_mean_sd([s[key][f"latency_b{b}"]["median_ms"] for s in seeds])
                                         for b in args.batches)
                        spd = " / ".join(_mean_sd([s[key][f"latency_b{b}"]["speedup_vs_pc_median"] for s in seeds])
                                         + "x" for b in args.batches)
                    out.append(f"| W{wb}A{ab} | {g} | " + " | ".join(accs) +
                               f" | {npt} of {seeds[0][key]['layers']} | {lat} | {spd} |")
            out += ["", f"FP32 top-1: {fp}. Hybrid thresholds (KL nats, per seed): " + "; ".join(
                f"W{wb}A{ab}: " + ", ".join(f"{s[f'W{wb}A{ab} hybrid']['threshold']:.3g}" for s in seeds)
                for wb, ab in HYBRID_SETTINGS) + ".", ""]
            for wb, ab in HYBRID_SETTINGS:
                key = f"W{wb}A{ab} latency_table"
                if key in seeds[0]:
                    out += [f"ONNX Runtime, W{wb}A{ab}, seed 0 (interleaved, {args.reps} repetitions, "
                            f"{args.ort_threads} threads):", "", seeds[0][key], ""]
            out += ["Per-tensor layers chosen by hybrid (seed 0): " + "; ".join(
                f"W{wb}A{ab}: {', '.join(seeds[0][f'W{wb}A{ab} hybrid']['per_tensor_names']) or 'none'}"
                for wb, ab in HYBRID_SETTINGS), ""]
        if "nonuniform" in args.parts:
            out += ["### Non-uniform (codebook) vs uniform weights, per-channel", "",
                    "| setting | weights | " + " | ".join(f"top-1 {l}" for l in labels) +
                    " | KL (first set) | weight sq. error | size KB |",
                    "| --- | --- | " + " | ".join("---:" for _ in labels) + " | ---: | ---: | ---: |"]
            for wb, ab in NONUNIFORM_SETTINGS:
                for kind in ("uniform", "nonuniform"):
                    key = f"W{wb}A{ab} {kind}"
                    accs = [_mean_sd([s[key][l]["top1"] for s in seeds]) for l in labels]
                    kl = statistics.mean(s[key][labels[0]]["kl"] for s in seeds)
                    err = statistics.mean(s[key]["weight_sq_err"] for s in seeds)
                    out.append(f"| W{wb}A{ab} | {kind} | " + " | ".join(accs) +
                               f" | {kl:.4f} | {err:.4g} | {seeds[0][key]['size_bytes'] / 1024:.1f} |")
            out += ["", f"FP32 size {r['fp32_size_bytes'] / 1024:.1f} KB. Non-uniform size = indices packed at "
                    "wbits bits + one float16 codebook of 2^wbits levels per output channel.", ""]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help=f"comma-separated (default {','.join(MODELS)}; --quick: cifar_resnet20)")
    ap.add_argument("--seeds", type=int, default=None, help="distilled-data seeds (default 3; --quick: 1)")
    ap.add_argument("--parts", default="hybrid,nonuniform")
    ap.add_argument("--quick", action="store_true", help="ResNet-20, 1 seed, first --eval-limit JPEG CIFAR images, "
                                                         "short latency run")
    ap.add_argument("--eval-limit", type=int, default=1000, help="CIFAR images in --quick mode")
    ap.add_argument("--no-latency", action="store_true", help="skip ONNX export and latency")
    ap.add_argument("--reps", type=int, default=None, help="latency repetitions (default 30; --quick: 10)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ort-threads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/HYBRID_NONUNIFORM_RESULTS.md; "
                                                "--quick: runs/hybrid-nonuniform-quick/RESULTS.md)")
    ap.add_argument("--artifacts", default=None)
    args = ap.parse_args()
    args.models = args.models or ("cifar_resnet20" if args.quick else ",".join(MODELS))
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.reps = args.reps or (10 if args.quick else 30)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.parts = [p.strip() for p in args.parts.split(",")]
    art = Path(args.artifacts or ("runs/hybrid-nonuniform-quick" if args.quick else "runs/hybrid-nonuniform"))
    out = Path(args.out or (art / "RESULTS.md" if args.quick else ROOT / "benchmarks" / "HYBRID_NONUNIFORM_RESULTS.md"))
    torch.set_num_threads(args.threads)
    missing = [p for p in (CIFAR, IMAGENET, *RESNET_WEIGHTS.values()) if not p.exists()]
    if missing:
        sys.exit(f"missing assets: {', '.join(map(str, missing))}")
    t0 = time.perf_counter()
    results = [run_model(n.strip(), args, art) for n in args.models.split(",")]
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    text = markdown(results, args, command, time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    art.mkdir(parents=True, exist_ok=True)
    (art / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
