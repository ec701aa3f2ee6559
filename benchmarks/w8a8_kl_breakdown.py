"""Where does the W8A8 error of a model come from? Held-apart distilled KL per factor (issue 6).

    PYTHONPATH=src .venv/bin/python benchmarks/w8a8_kl_breakdown.py --model efficientnet_lite1 [--threads 1]

No real image is used: the model is calibrated on one batch of distilled inputs (seed 0) and scored by the
mean KL(FP32 || W8A8) on one batch distilled with another seed (1000). Prints one JSON line per variant:
the default W8A8 model, weights only, activations only, the single activation / weight quantizers whose
removal lowers the KL most, and other range estimators. Nothing is chosen from these numbers; they explain
a W8A8 drop (BENCHMARKS.md, the EfficientNet-Lite1 accuracy section).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import RESNET_WEIGHTS  # noqa: E402

import zsq  # noqa: E402
from zsq.config import DistillConfig, QuantConfig  # noqa: E402
from zsq.models import load_model  # noqa: E402
from zsq.quant.modules import QUANT_LAYER_TYPES, ActQuantizer  # noqa: E402
from zsq.metrics import kl_divergence  # noqa: E402

TOP = 8


@contextlib.contextmanager
def switched_off(mods: list[torch.nn.Module], flag: str):
    """Set ``flag`` (``enabled`` of activation quantizers, ``quant_enabled`` of layers) to False on ``mods``;
    True again afterwards."""
    try:
        for m in mods:
            setattr(m, flag, False)
        yield
    finally:
        for m in mods:
            setattr(m, flag, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="save/load the distilled inputs here (.pt, weights_only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = RESNET_WEIGHTS.get(args.model)
    model, spec = load_model(args.model, **({"weights": weights} if weights else {}))
    model.eval()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        d = torch.load(cache, weights_only=True)
    else:
        t = time.perf_counter()
        d = {"x": zsq.distill(model, spec.preprocessing, DistillConfig(num_batches=1, seed=0), progress=False).inputs,
             "h": zsq.distill(model, spec.preprocessing, DistillConfig(num_batches=1, seed=1000),
                              progress=False).inputs}
        print(json.dumps({"distill_s": time.perf_counter() - t}), flush=True)
        if cache is not None:
            torch.save(d, cache)
    x, h = d["x"], d["h"]
    folded, _ = zsq.fold_batchnorm(model)
    with torch.no_grad():
        ref = model(h)

    def kl(q: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(kl_divergence(ref, q(h)).mean())

    def build(**kw) -> torch.nn.Module:
        q = zsq.quantize(folded, QuantConfig(wbits=8, abits=8, **kw))
        zsq.calibrate(q, x, progress=False)
        return q

    def emit(**row) -> None:
        print(json.dumps(row), flush=True)

    q = build()
    base = kl(q)
    emit(variant="W8A8 default", kl=base)
    groups = {"activation": ({n: m for n, m in q.named_modules() if isinstance(m, ActQuantizer)}, "enabled"),
              "weight": ({n: m for n, m in q.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}, "quant_enabled")}
    for kind, (mods, flag) in groups.items():
        with switched_off(list(mods.values()), flag):
            emit(variant="weights only" if kind == "activation" else "activations only", kl=kl(q))
    for kind, (mods, flag) in groups.items():
        gains = []
        for n, m in mods.items():
            with switched_off([m], flag):
                gains.append((base - kl(q), n))
        emit(variant=f"top {TOP} {kind} quantizers (KL removed when off)", rows=sorted(gains, reverse=True)[:TOP])
    for kw in ({"act_estimator": "minmax"}, {"act_estimator": "mse"}, {"act_percentile": 99.999},
               {"act_percentile": 99.9}, {"weight_estimator": "mse"}):
        emit(variant=f"W8A8 {kw}", kl=kl(build(**kw)))


if __name__ == "__main__":
    main()
