"""Which activation ranges should recovery start from? BRECQ from each estimator's ranges, on distilled data.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src .venv/bin/python benchmarks/recovery_start.py --setting W4A8 \\
        --starts percentile,mse --cache-dir runs/distilled_cache [--eval]

ResNet-20 (akamaster weights), first and last layer at W8A8. Calibration and learning data: 8 batches of zsq's
default distilled data (seeds 0-7, 32 inputs each = 256); held apart: the batch of seed 1000. For each start,
the model is calibrated with that estimator and BRECQ (default recipe) runs with ``act_estimator=None``
(keep those ranges). Prints the held-apart KL before -> after; ``--eval`` adds top-1 on the CIFAR images,
for the record only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import CIFAR, RESNET_WEIGHTS, distilled_batch  # noqa: E402

import zsq  # noqa: E402
from zsq.config import ACT_ESTIMATORS, LayerOverride, QuantConfig  # noqa: E402
from zsq.data import load_dataset  # noqa: E402
from zsq.evaluate import compare  # noqa: E402
from zsq.models import load_model  # noqa: E402
from zsq.recover import RecoverConfig, recover  # noqa: E402

SETTINGS = {"W4A4": (4, 4), "W4A8": (4, 8)}
FIRST_LAST_8 = {"@first": LayerOverride(wbits=8, abits=8), "@last": LayerOverride(wbits=8, abits=8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), default="W4A8")
    ap.add_argument("--starts", default="percentile,mse", help=f"comma-separated, of {ACT_ESTIMATORS}")
    ap.add_argument("--batches", type=int, default=8, help="distilled batches of 32 to learn from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--eval", action="store_true")
    args = ap.parse_args()
    name = "cifar_resnet20"
    if not RESNET_WEIGHTS[name].exists():
        sys.exit("assets not found in ../shared (see ../shared/ASSETS.md)")
    torch.set_num_threads(args.threads)
    model, spec = load_model(name, weights=RESNET_WEIGHTS[name])
    model.eval()
    x = torch.cat([distilled_batch(model, spec, name=name, seed=s, cache_dir=args.cache_dir)[0]
                   for s in range(args.batches)])
    hold, _ = distilled_batch(model, spec, name=name, seed=1000, cache_dir=args.cache_dir)
    folded, _ = zsq.fold_batchnorm(model)
    w, a = SETTINGS[args.setting]
    for start in args.starts.split(","):
        q = zsq.quantize(folded, QuantConfig(wbits=w, abits=a, act_estimator=start, overrides=FIRST_LAST_8))
        zsq.calibrate(q, x, progress=False)
        t = time.perf_counter()
        rep = recover(q, model, x, RecoverConfig(method="brecq", act_estimator=None), progress=False,
                      holdout_inputs=hold)
        line = (f"{args.setting} start {start:<10} held-apart KL {rep.holdout_kl_before:.4f} -> "
                f"{rep.holdout_kl_after:.4f}  ({time.perf_counter() - t:.0f}s)")
        if args.eval:
            r = compare(model, q, load_dataset(CIFAR, spec.preprocessing), progress=False)
            line += f"  top-1 {r['quantized']['top1']:.2f} (record only)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
