"""Does BRECQ do better when it starts from bias-corrected weights? (issue 8, a one-off check)

    PYTHONPATH=src .venv/bin/python benchmarks/bias_then_brecq.py --cache runs/lite0_w4a8_data.pt

EfficientNet-Lite0 W4A8 with first/last layer W8A8: calibrate on 64 distilled inputs (seed 0), apply
``weight`` bias correction, then BRECQ with its default recipe. ``zsq.recover`` refuses a model whose
float weights or biases no longer match the FP32 model, so this script switches that check off (that is
the point of the experiment; ``zsq quantize`` never does). Prints the held-apart KL (32 inputs distilled
with seed 1000) after each step, and top-1 on the 500-image sample for the record. ``--cache`` stores the
distilled inputs ({"x", "h"}, as ``recovery_recipe.py --cache``). Result in BENCHMARKS.md ("Low-bit recovery").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import zsq
import zsq.recover as recover_mod
from zsq.bias_correction import BiasCorrectionConfig, correct_bias
from zsq.config import DistillConfig, QuantConfig
from zsq.data import load_dataset
from zsq.evaluate import compare
from zsq.models import load_model
from zsq.recover import RecoverConfig, recover
from zsq.metrics import kl_divergence

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIRST_LAST_8 = {"@first": {"wbits": 8, "abits": 8}, "@last": {"wbits": 8, "abits": 8}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, spec = load_model("efficientnet_lite0")
    model.eval()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        d = torch.load(cache, weights_only=True)
    else:
        d = {"x": zsq.distill(model, spec.preprocessing, DistillConfig(num_batches=4, seed=0), progress=False).inputs,
             "h": zsq.distill(model, spec.preprocessing, DistillConfig(num_batches=2, seed=1000),
                              progress=False).inputs}
        if cache is not None:
            torch.save(d, cache)
    x, h = d["x"], d["h"]
    folded, _ = zsq.fold_batchnorm(model)
    q = zsq.quantize(folded, QuantConfig(wbits=4, abits=8, overrides=FIRST_LAST_8))
    zsq.calibrate(q, x, progress=False)
    with torch.no_grad():
        ref = model(h)
    ds = load_dataset(SHARED / "data/imagenet-sample-500", spec.preprocessing)

    def report(step: str, **extra) -> None:
        with torch.no_grad():
            kl = float(kl_divergence(ref, q(h)).mean())
        top1 = compare(model, q, ds, progress=False)["quantized"]["top1"]
        print(json.dumps({"step": step, "heldout_kl": kl, "top1_record_only": top1, **extra}), flush=True)

    correct_bias(q, folded, x, config=BiasCorrectionConfig(mode="weight"))
    report("PTQ + bias correction (weight)")
    saved = recover_mod._check_float_reference
    recover_mod._check_float_reference = lambda ctx: None  # the experiment: start from the corrected biases
    try:
        t = time.perf_counter()
        recover(q, model, x, RecoverConfig(method="brecq", seed=0), progress=False)
        report("then BRECQ", seconds=time.perf_counter() - t)
    finally:
        recover_mod._check_float_reference = saved
    second = correct_bias(q, folded, x)
    report("then bias correction again (auto)", mode=second.mode)


if __name__ == "__main__":
    main()
