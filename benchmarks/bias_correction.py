"""How the bias-correction default was chosen: held-apart KL on distilled data, per mode (issue 6).

    PYTHONPATH=src .venv/bin/python benchmarks/bias_correction.py --models cifar_resnet20,efficientnet_lite0 \
        [--cache-dir runs/bc_cache] [--md benchmarks/BIAS_CORRECTION_RESULTS.md]

No real image is used. For each model: one batch distilled with seed 0 calibrates and fits the correction
(zsq's default batch: 32 CIFAR / 16 ImageNet inputs), one batch distilled with seed 1000 scores it by the mean
KL(FP32 || quantized). Rows: W8A8, W6A6, W4A8 (per-channel weights, zsq's defaults otherwise) with no
correction, ``weight``, ``output``, and ``auto`` (which picks among the three on halves of the seed-0 batch
only, as ``zsq quantize`` does; its gain over ``off`` on those halves, in standard errors, is listed). ``--cache-dir`` keeps the distilled batches (safetensors) between runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import RESNET_WEIGHTS, distilled_batch  # noqa: E402

import zsq  # noqa: E402
from zsq.bias_correction import BiasCorrectionConfig, correct_bias  # noqa: E402
from zsq.config import QuantConfig  # noqa: E402
from zsq.models import load_model  # noqa: E402
from zsq.metrics import kl_divergence  # noqa: E402

SETTINGS = [("W8A8", 8, 8), ("W6A6", 6, 6), ("W4A8", 4, 8)]
MODES = ["off", "weight", "output", "auto"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cifar_resnet20,cifar_resnet32,efficientnet_lite0,efficientnet_lite1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None, help="JSON rows")
    ap.add_argument("--md", default=None, help="markdown table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        weights = RESNET_WEIGHTS.get(name)
        model, spec = load_model(name, **({"weights": weights} if weights else {}))
        model.eval()
        fit, fit_s = distilled_batch(model, spec, name=name, seed=0, cache_dir=args.cache_dir)
        held, held_s = distilled_batch(model, spec, name=name, seed=1000, cache_dir=args.cache_dir)
        ds = fit_s + held_s
        folded, _ = zsq.fold_batchnorm(model)
        with torch.no_grad():
            ref = model(held)
        for label, w, a in SETTINGS:
            row = {"model": name, "setting": label, "inputs": int(fit.shape[0]), "distill_s": round(ds, 1)}
            for mode in MODES:
                q = zsq.quantize(folded, QuantConfig(wbits=w, abits=a))
                zsq.calibrate(q, fit, progress=False)
                rep = correct_bias(q, folded, fit, config=BiasCorrectionConfig(mode=mode))
                with torch.no_grad():
                    row[mode] = float(kl_divergence(ref, q(held)).mean())
                if mode == "auto":
                    row["auto_chose"] = rep.mode
                    row["auto_gain_z"] = {k: round(v, 2) for k, v in rep.gain_z.items()}
                    row["auto_s"] = round(rep.seconds, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| model | setting | off | weight | output | auto (its choice) | auto's gain over off, weight / output (SE) "
             "| auto s |",
             "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        best = min(("off", "weight", "output"), key=lambda m: r[m])
        cells = [f"**{r[m]:.4f}**" if m == best else f"{r[m]:.4f}" for m in ("off", "weight", "output")]
        z = r["auto_gain_z"]
        gains = f"{z.get('weight', float('nan')):+.1f} / {z.get('output', float('nan')):+.1f}"
        lines.append(f"| {r['model']} | {r['setting']} | {' | '.join(cells)} | {r['auto']:.4f} ({r['auto_chose']}) "
                     f"| {gains} | {r['auto_s']} |")
    md = "\n".join(lines)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    if args.md:
        Path(args.md).write_text(md + "\n")


if __name__ == "__main__":
    main()
