"""Choose zsq's defaults (distillation length, activation range estimator) on distilled data only.

For each model: a *validation* set of distilled inputs is made with a different seed than the
calibration sets. Each candidate (calibration source x range estimator) is scored by the mean KL
divergence between the FP32 model's and the quantized model's output distributions on that
held-apart distilled set (lower is better). No real image is used.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        .venv/bin/python benchmarks/choose_defaults.py --model cifar_resnet20 --out benchmarks/defaults_r20.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import zsq
from zsq.config import DistillConfig, QuantConfig
from zsq.models import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = {
    "cifar_resnet20": SHARED / "models/resnet-cifar10-akamaster/resnet20-12fca82f.th",
    "cifar_resnet32": SHARED / "models/resnet-cifar10-akamaster/resnet32-d509ac18.th",
}


@torch.no_grad()
def kl_fp32_vs_quant(fp32, qmodel, x, batch=32) -> float:
    tot = 0.0
    for i in range(0, x.shape[0], batch):
        p = torch.log_softmax(fp32(x[i:i + batch]), -1)
        q = torch.log_softmax(qmodel(x[i:i + batch]), -1)
        tot += float((p.exp() * (p - q)).sum())
    return tot / x.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", default="50,100,200")
    ap.add_argument("--val-iters", type=int, default=200)
    ap.add_argument("--settings", default="8/8,4/8,6/6")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, spec = load_model(args.model, weights=WEIGHTS.get(args.model))
    t = time.time()
    val = zsq.distill(model, spec.preprocessing, DistillConfig(batch_size=args.batch_size, iterations=args.val_iters,
                                                               seed=1000), progress=False)
    print(f"validation set: {val.inputs.shape[0]} inputs, BN loss {val.losses[0]:.4f}, {time.time() - t:.0f}s", flush=True)
    sources = {"gaussian": zsq.gaussian_inputs(args.batch_size, spec.preprocessing, seed=0)}
    for it in [int(v) for v in args.iters.split(",")]:
        t = time.time()
        r = zsq.distill(model, spec.preprocessing, DistillConfig(batch_size=args.batch_size, iterations=it, seed=0),
                        progress=False)
        sources[f"distilled_{it}"] = r.inputs
        print(f"distilled {it} iters: BN loss {r.losses[0]:.4f} in {time.time() - t:.0f}s", flush=True)
    folded, _ = zsq.fold_batchnorm(model)
    rows = []
    estimators = [("minmax", 99.99), ("percentile", 99.9), ("percentile", 99.99), ("mse", 99.99)]
    for setting in args.settings.split(","):
        w, a = (int(v) for v in setting.split("/"))
        for src, x in sources.items():
            for est, pct in estimators:
                cfg = QuantConfig(wbits=w, abits=a, act_estimator=est, act_percentile=pct,
                                  weight_estimator="mse" if w < 8 else "minmax")
                q = zsq.quantize(folded, cfg)
                zsq.calibrate(q, x, progress=False)
                kl = kl_fp32_vs_quant(model, q, val.inputs)
                rows.append({"wbits": w, "abits": a, "source": src, "estimator": est, "percentile": pct, "val_kl": kl})
                print(f"W{w}A{a} {src:>14} {est:>10} {pct:6} KL {kl:.5f}", flush=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
