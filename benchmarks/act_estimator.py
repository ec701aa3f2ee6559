"""Re-check the activation range estimator default with today's pipeline, on distilled data only.

The default (percentile 99.99) was chosen in session 2 (`benchmarks/choose_defaults.py`), before quantizers
were placed at residual-add inputs and before bias correction existed. This script scores each estimator as
`zsq quantize` runs today: quantize, calibrate on one distilled batch (zsq's default batch and iterations,
seeds 0..N-1), bias correction ``auto``, then the mean KL(FP32 || quantized) on a batch distilled with seed
1000. No real image is used. Per model and setting it prints the mean over seeds and each seed.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src .venv/bin/python benchmarks/act_estimator.py \\
        --models cifar_resnet20,cifar_resnet32,efficientnet_lite0,efficientnet_lite1 --seeds 3 \\
        --cache-dir runs/distilled_cache --out benchmarks/act_estimator.json --md benchmarks/ACT_ESTIMATOR.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import RESNET_WEIGHTS, distilled_batch  # noqa: E402

import zsq  # noqa: E402
from zsq.bias_correction import BIAS_MODES, BiasCorrectionConfig, correct_bias  # noqa: E402
from zsq.config import QuantConfig  # noqa: E402
from zsq.models import load_model  # noqa: E402
from zsq.metrics import kl_divergence  # noqa: E402

ESTIMATORS = ["percentile", "minmax", "mse"]
SETTINGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cifar_resnet20,cifar_resnet32,efficientnet_lite0,efficientnet_lite1")
    ap.add_argument("--settings", default="W8A8,W6A6,W4A8", help=f"comma-separated, of {list(SETTINGS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bias-correction", default="auto", choices=BIAS_MODES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="keep the distilled batches here (safetensors)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir) if args.cache_dir else None
    rows: list[dict] = []
    for name in args.models.split(","):
        weights = RESNET_WEIGHTS.get(name)
        if weights is not None and not weights.exists():
            print(f"skip {name}: weights not found", file=sys.stderr)
            continue
        model, spec = load_model(name, **({"weights": weights} if weights else {}))
        model.eval()
        held, _ = distilled_batch(model, spec, name=name, seed=1000, cache_dir=cache)
        fits = [distilled_batch(model, spec, name=name, seed=s, cache_dir=cache)[0] for s in range(args.seeds)]
        folded, _ = zsq.fold_batchnorm(model)
        with torch.no_grad():
            ref = model(held)
        for label in args.settings.split(","):
            w, a = SETTINGS[label]
            row: dict = {"model": name, "setting": label, "seeds": args.seeds}
            for est in ESTIMATORS:
                kls, modes, secs = [], [], []
                for x in fits:
                    t = time.perf_counter()
                    q = zsq.quantize(folded, QuantConfig(wbits=w, abits=a, act_estimator=est))
                    zsq.calibrate(q, x, progress=False)
                    rep = correct_bias(q, folded, x, config=BiasCorrectionConfig(mode=args.bias_correction))
                    secs.append(time.perf_counter() - t)
                    with torch.no_grad():
                        kls.append(float(kl_divergence(ref, q(held)).mean()))
                    modes.append(rep.mode)
                row[est] = {"mean": statistics.mean(kls), "seeds": kls, "bias_modes": modes,
                            "seconds": statistics.mean(secs)}
            rows.append(row)
            print(f"{name} {label}: " + ", ".join(
                f"{e} {row[e]['mean']:.4f} [{' '.join(f'{k:.4f}' for k in row[e]['seeds'])}]" for e in ESTIMATORS),
                flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = ["| model | setting | " + " | ".join(ESTIMATORS) + " | best | per seed (" + " / ".join(ESTIMATORS) + ") |",
             "| --- | --- | " + " | ".join("---:" for _ in ESTIMATORS) + " | --- | --- |"]
    for r in rows:
        best = min(ESTIMATORS, key=lambda e: r[e]["mean"])
        cells = [f"**{r[e]['mean']:.4f}**" if e == best else f"{r[e]['mean']:.4f}" for e in ESTIMATORS]
        per = "; ".join(" / ".join(f"{r[e]['seeds'][i]:.4f}" for e in ESTIMATORS) for i in range(r["seeds"]))
        lines.append(f"| {r['model']} | {r['setting']} | {' | '.join(cells)} | {best} | {per} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
