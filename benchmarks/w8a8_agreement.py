"""Where does the W8A8 top-1 agreement with FP32 go? Switch quantizers off one kind at a time (issue 6).

    PYTHONPATH=src .venv/bin/python benchmarks/w8a8_agreement.py [--limit N] [--adaround]

ResNet-20 (akamaster weights), one seed of distilled data (zsq defaults: 32 inputs, 100 iterations),
evaluated on the CIFAR-10 JPEG test images of ../shared. Prints one line per variant: top-1, agreement
with FP32 and KL. Nothing is chosen from these numbers; they explain the gap to the 99 % target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import CIFAR, RESNET_WEIGHTS  # noqa: E402

import zsq  # noqa: E402
from zsq.config import DistillConfig, QuantConfig  # noqa: E402
from zsq.data import load_dataset  # noqa: E402
from zsq.evaluate import compare  # noqa: E402
from zsq.models import load_model  # noqa: E402
from zsq.quant.modules import QUANT_LAYER_TYPES, ActQuantizer  # noqa: E402


def acts_off(q: torch.nn.Module) -> None:
    for m in q.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = False


def weights_off(q: torch.nn.Module) -> None:
    for m in q.modules():
        if isinstance(m, QUANT_LAYER_TYPES):
            m.quant_enabled = False


def input_off(q: torch.nn.Module) -> None:
    next(m for m in q.modules() if isinstance(m, ActQuantizer)).enabled = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adaround", action="store_true", help="also W8A8 + AdaRound on the distilled inputs")
    args = ap.parse_args()
    if not RESNET_WEIGHTS["cifar_resnet20"].exists() or not CIFAR.exists():
        sys.exit("assets not found in ../shared (see ../shared/ASSETS.md)")
    torch.set_num_threads(args.threads)
    model, spec = load_model("cifar_resnet20", weights=RESNET_WEIGHTS["cifar_resnet20"])
    model.eval()
    ds = load_dataset(CIFAR, spec.preprocessing, limit=args.limit)
    x = zsq.distill(model, spec.preprocessing, DistillConfig(seed=0), progress=False).inputs
    folded, _ = zsq.fold_batchnorm(model)
    variants = [
        ("W8A8, zsq defaults", QuantConfig(), None),
        ("8-bit weights only (minmax)", QuantConfig(), acts_off),
        ("8-bit weights only (mse)", QuantConfig(weight_estimator="mse"), acts_off),
        ("8-bit activations only", QuantConfig(), weights_off),
        ("W8A8 without the input quantizer", QuantConfig(), input_off),
        ("W8A8, activations minmax", QuantConfig(act_estimator="minmax"), None),
        ("W8A8, activations mse", QuantConfig(act_estimator="mse"), None),
        ("W8A8, activations percentile 99.999", QuantConfig(act_percentile=99.999), None),
        ("W8A8, weights mse", QuantConfig(weight_estimator="mse"), None),
    ]
    for tag, cfg, tweak in variants:
        q = zsq.quantize(folded, cfg)
        zsq.calibrate(q, x, progress=False)
        if tweak is not None:
            tweak(q)
        r = compare(model, q, ds, progress=False)
        print(f"{tag:40s} top-1 {r['quantized']['top1']:.2f}  agreement {r['agreement']:.2f}  KL {r['kl']:.5f}",
              flush=True)
    if args.adaround:
        from zsq.recover import RecoverConfig, recover

        hold = zsq.distill(model, spec.preprocessing, DistillConfig(seed=1000), progress=False).inputs
        q = zsq.quantize(folded, QuantConfig())
        zsq.calibrate(q, x, progress=False)
        t = time.perf_counter()
        rep = recover(q, model, x, RecoverConfig(method="adaround"), progress=False, holdout_inputs=hold)
        r = compare(model, q, ds, progress=False)
        print(f"{'W8A8 + AdaRound':40s} top-1 {r['quantized']['top1']:.2f}  agreement {r['agreement']:.2f}  "
              f"held-apart KL {rep.holdout_kl_before:.4f} -> {rep.holdout_kl_after:.4f}  "
              f"({time.perf_counter() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
