"""Accuracy and cost of zero-shot quantization on the real models in ../shared, side by side.

Regenerate the table in BENCHMARKS.md (section "Accuracy"):

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
      .venv/bin/python benchmarks/accuracy.py --out benchmarks/accuracy.json --md benchmarks/ACCURACY_RESULTS.md

Every zsq row runs zsq's bias correction after calibration (``--bias-correction``, default ``auto`` as in
``zsq quantize``); the mode each seed chose is in the table.

Rows: FP32, then each setting (W8A8, W6A6, W4A8, W4A4, W4A8 and W4A4 with first/last layer at 8 bits)
calibrated on Gaussian noise, zsq distilled data (3 seeds: mean and spread), and real images that
are NOT in the evaluated set (upper bound). Peer rows: ONNX Runtime's quantize_static (QDQ,
per-channel int8 weights, uint8 activations, MinMax; also with reduce_range = 7-bit weights, which
cannot saturate ORT's u8s8 kernels on CPUs without VNNI) at W8A8 on the same Gaussian / real inputs,
when onnxruntime is installed (--no-peers skips them).

Held-apart split: the real calibration images are the LAST `--real-calib` images of each set
(CIFAR: images[-32:] of the 5,000 JPEG test images; ImageNet sample: the last 32 of 500 in
labels.csv order); every figure is measured on the remaining images.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import zsq
from zsq.bias_correction import BIAS_MODES, BiasCorrectionConfig, correct_bias
from zsq.config import DistillConfig, QuantConfig
from zsq.data import load_dataset
from zsq.evaluate import logits_of
from zsq.metrics import kl_divergence
from zsq.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import onnx_logits, ort_quantize_static  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = {
    "cifar_resnet20": (SHARED / "models/resnet-cifar10-akamaster/resnet20-12fca82f.th",
                       SHARED / "data/cifar10-test/cifar10_test.npz", 5000),
    "cifar_resnet32": (SHARED / "models/resnet-cifar10-akamaster/resnet32-d509ac18.th",
                       SHARED / "data/cifar10-test/cifar10_test.npz", 5000),
    "efficientnet_lite0": (None, SHARED / "data/imagenet-sample-500", 500),
    "efficientnet_lite1": (None, SHARED / "data/imagenet-sample-500", 500),
}
FIRST_LAST_8 = {"@first": {"wbits": 8, "abits": 8}, "@last": {"wbits": 8, "abits": 8}}
SETTINGS = [
    ("W8A8", 8, 8, {}),
    ("W6A6", 6, 6, {}),
    ("W4A8", 4, 8, {}),
    ("W4A4", 4, 4, {}),
    ("W4A8 (first/last 8)", 4, 8, FIRST_LAST_8),
    ("W4A4 (first/last 8)", 4, 4, FIRST_LAST_8),
]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_model(name: str, args) -> list[dict]:
    weights, data_path, n_total = MODELS[name]
    if weights is not None and not weights.exists() or not data_path.exists():
        print(f"skip {name}: assets not found in {SHARED}", file=sys.stderr)
        return []
    model, spec = load_model(name, weights=weights)
    n_eval = n_total - args.real_calib
    eval_ds = load_dataset(data_path, spec.preprocessing, subset=slice(0, n_eval), limit=args.limit)
    real_x = torch.stack([eval_ds_item for eval_ds_item, _ in
                          load_dataset(data_path, spec.preprocessing, subset=slice(n_eval, n_total))])
    rows: list[dict] = []
    # Decode the evaluation images and run the FP32 model once; every row then runs only its own model.
    xs = torch.stack([img for img, _ in eval_ds])
    labels = torch.tensor([int(lab) for _, lab in eval_ds])
    t = time.perf_counter()
    fp_logits = logits_of(model, xs)
    fp_pred = fp_logits.argmax(1)
    fp_top1 = float(100.0 * (fp_pred == labels).double().mean())
    rows.append({"model": name, "setting": "FP32", "source": "-", "top1": fp_top1, "drop": 0.0,
                 "agreement": 100.0, "eval_s": time.perf_counter() - t, "n": int(xs.shape[0])})
    print(f"{name}: FP32 top-1 {fp_top1:.2f} on {xs.shape[0]} images", flush=True)

    def score(q: torch.nn.Module) -> dict[str, float]:
        """top-1 (%), agreement with FP32's top-1 (%) and mean KL(FP32 || q) on the evaluation images."""
        lg = logits_of(q, xs)
        pred = lg.argmax(1)
        return {"top1": float(100.0 * (pred == labels).double().mean()),
                "agreement": float(100.0 * (pred == fp_pred).double().mean()),
                "kl": float(kl_divergence(fp_logits, lg).mean())}

    sources: dict[str, list[tuple[torch.Tensor, float]]] = {}
    n_calib = DistillConfig(batch_size=args.batch_size).resolved_batch_size(spec.preprocessing.input_size)
    sources["gaussian"] = [(zsq.gaussian_inputs(n_calib, spec.preprocessing, seed=0), 0.0)]
    sources["real (held apart)"] = [(real_x[:n_calib], 0.0)]
    dcfg = DistillConfig(batch_size=args.batch_size, iterations=args.iters)
    distilled = []
    for seed in range(args.seeds):
        t = time.perf_counter()
        r = zsq.distill(model, spec.preprocessing, DistillConfig(**{**dcfg.to_dict(), "seed": seed}), progress=False)
        distilled.append((r.inputs, time.perf_counter() - t))
        print(f"  distilled seed {seed}: {r.inputs.shape[0]} inputs, BN loss {r.initial_losses[0]:.3f} -> "
              f"{r.losses[0]:.4f} in {distilled[-1][1]:.1f}s", flush=True)
    sources["distilled"] = distilled

    folded, _ = zsq.fold_batchnorm(model)
    for label, w, a, ov in SETTINGS:
        if args.settings and label not in args.settings:
            continue
        cfg = QuantConfig(wbits=w, abits=a, overrides=ov, weight_estimator=args.weight_estimator)
        for src, items in sources.items():
            per_seed = []
            for x, distill_s in items:
                t = time.perf_counter()
                q = zsq.quantize(folded, cfg)
                zsq.calibrate(q, x, progress=False)
                bias = correct_bias(q, folded, x, config=BiasCorrectionConfig(mode=args.bias_correction))
                calib_s = time.perf_counter() - t
                t = time.perf_counter()
                res = score(q)
                per_seed.append({"top1": res["top1"], "agreement": res["agreement"], "kl": res["kl"],
                                 "distill_s": distill_s, "calibrate_s": calib_s,
                                 "bias_mode": bias.mode, "bias_s": bias.seconds, "eval_s": time.perf_counter() - t})
            top1s = [p["top1"] for p in per_seed]
            row = {"model": name, "setting": label, "source": src, "top1": statistics.mean(top1s),
                   "top1_seeds": top1s, "spread": (max(top1s) - min(top1s)) if len(top1s) > 1 else None,
                   "drop": fp_top1 - statistics.mean(top1s),
                   "agreement": statistics.mean(p["agreement"] for p in per_seed),
                   "bias_modes": [p["bias_mode"] for p in per_seed],
                   "distill_s": statistics.mean(p["distill_s"] for p in per_seed),
                   "calibrate_s": statistics.mean(p["calibrate_s"] for p in per_seed),
                   "eval_s": statistics.mean(p["eval_s"] for p in per_seed), "peak_mb": peak_mb(), "n": int(xs.shape[0])}
            rows.append(row)
            print(f"  {label:<22} {src:<18} top-1 {row['top1']:.2f} (drop {row['drop']:+.2f}"
                  + (f", spread {row['spread']:.2f}" if row["spread"] is not None else "")
                  + f") agreement {row['agreement']:.2f}, bias correction {'/'.join(row['bias_modes'])}", flush=True)
    if args.peers:
        rows += peer_rows(name, model, xs, labels.numpy(), fp_pred.numpy(), sources, fp_top1, args)
    return rows


def peer_rows(name: str, model: torch.nn.Module, xs: torch.Tensor, labels: np.ndarray, fp_pred: np.ndarray,
              sources: dict, fp_top1: float, args) -> list[dict]:
    """ONNX Runtime's own quantize_static (QDQ, per-channel int8 weights, uint8 activations, MinMax) at W8A8,
    calibrated on the same Gaussian and held-apart real inputs as zsq's rows, evaluated on the same images."""
    try:
        import onnxruntime  # noqa: F401
        from zsq.export import export_fp32_onnx
    except ImportError as exc:
        print(f"skip ONNX Runtime peer rows for {name}: {exc}", file=sys.stderr)
        return []
    rows = []
    with tempfile.TemporaryDirectory() as td:
        fp_path = Path(td) / "fp32.onnx"
        export_fp32_onnx(model, fp_path, example_input=xs[:1])
        for src in ("gaussian", "real (held apart)"):
            x = sources[src][0][0]
            for reduce_range in (False, True):
                label = "ORT quantize_static" + (", reduce_range" if reduce_range else "") + f", {src}"
                t = time.perf_counter()
                path = ort_quantize_static(fp_path, Path(td) / f"ort_{len(rows)}.onnx", x, reduce_range=reduce_range)
                calib_s = time.perf_counter() - t
                t = time.perf_counter()
                pred = onnx_logits(path, xs, threads=args.threads).argmax(1)
                top1 = float(100.0 * np.mean(pred == labels))
                row = {"model": name, "setting": "W8A8", "source": label, "top1": top1, "top1_seeds": [top1],
                       "spread": None, "drop": fp_top1 - top1, "agreement": float(100.0 * np.mean(pred == fp_pred)),
                       "distill_s": 0.0, "calibrate_s": calib_s, "eval_s": time.perf_counter() - t,
                       "peak_mb": peak_mb(), "n": int(xs.shape[0])}
                rows.append(row)
                print(f"  W8A8 {label:<48} top-1 {top1:.2f} (drop {row['drop']:+.2f}) agreement "
                      f"{row['agreement']:.2f}", flush=True)
    return rows


def _modes(modes: list[str] | None) -> str:
    """``weight`` when every seed chose it, else ``weight/output/weight`` (seed order); ``-`` for rows without."""
    if not modes:
        return "-"
    return modes[0] if len(set(modes)) == 1 else "/".join(modes)


def to_markdown(rows: list[dict], args) -> str:
    lines = ["| model | setting | calibration | top-1 | drop | agreement % | bias correction | distill s | calibrate s "
             "| eval s | peak MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        top1 = f"{r['top1']:.2f}"
        if r.get("spread") is not None:
            top1 += f" ± {r['spread'] / 2:.2f}"
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['source']} | {top1} | {r['drop']:+.2f} | {r['agreement']:.2f} | "
            f"{_modes(r.get('bias_modes'))} | "
            f"{r.get('distill_s', 0):.1f} | {r.get('calibrate_s', 0):.1f} | {r['eval_s']:.1f} | {r.get('peak_mb', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=DistillConfig().iterations)
    ap.add_argument("--batch-size", type=int, default=None, help="distillation batch (default: zsq's)")
    ap.add_argument("--weight-estimator", default=QuantConfig().weight_estimator)
    ap.add_argument("--real-calib", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="skip the ONNX Runtime quantize_static peer rows")
    ap.add_argument("--bias-correction", default="auto", choices=BIAS_MODES,
                    help="zsq's bias correction after calibration (default auto, as `zsq quantize`)")
    ap.add_argument("--settings", default=None, type=lambda s: s.split(","),
                    help=f"only these settings (comma-separated labels of: {', '.join(x[0] for x in SETTINGS)})")
    ap.add_argument("--out", default="benchmarks/accuracy.json")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    unknown = sorted(set(args.settings or ()) - {x[0] for x in SETTINGS})
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {[x[0] for x in SETTINGS]}")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    md = to_markdown(rows, args)
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")


if __name__ == "__main__":
    main()
