"""Bias polish after BRECQ on EfficientNet-Lite0 (issue 8, session 28): BRECQ once, then polish variants on copies.

The default BRECQ recipe (``--recover brecq``'s, with output-aware depthwise ranges and first/last layer W8A8)
reconstructs the model once from a cached set of distilled inputs; every ``--variants`` entry then runs
:func:`zsq.recover.polish.polish_biases` on a copy of that model, on the same learning inputs and their mirror
images, with a fresh generator seeded like the recovery. Each row gets the KL to FP32 on the last 64 sample images
(``real_holdout_kl``; never evaluated, the selection signal for recipes), on the cache's held-apart distilled
inputs, and top-1 on the other sample images (record only). Rows are written to ``--out`` as they come.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src .venv/bin/python benchmarks/recovery_polish.py --seed 0 \\
        --cache runs/l0_s0_b5.pt --variants "iters=200,lr=1e-4" "iters=200,lr=1e-3" --out runs/polish_s0.json

``--cache`` is a ``benchmarks/recovery_recipe.py --cache`` file (``{"x": inputs, "h": held-apart inputs}``); make
one with ``recovery_recipe.py --model efficientnet_lite0 --calib-batches 5 --seed S --cache F --candidates ptq``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import zsq  # noqa: E402
from zsq.data import load_dataset  # noqa: E402
from zsq.evaluate import compare  # noqa: E402
from zsq.models import load_model  # noqa: E402
from zsq.recover import RecoverConfig, RecoverContext, find_units, recover  # noqa: E402
from zsq.recover.polish import polish_biases  # noqa: E402
from zsq.state import frozen_eval  # noqa: E402

from recovery import FIRST_LAST_8, MODELS, WEIGHT_SCHEMES, calibrated_bases, clone  # noqa: E402
from recovery_recipe import holdout_kl  # noqa: E402

MODEL = "efficientnet_lite0"
REAL_HOLDOUT = 64


def parse_variant(text: str) -> dict[str, float | int]:
    """``"iters=200,lr=1e-4"`` -> ``{"iters": 200, "lr": 1e-4}``."""
    out: dict[str, float | int] = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        if key not in ("iters", "lr") or not val:
            raise SystemExit(f"--variants: {part!r} is not iters=N or lr=X")
        out[key] = int(val) if key == "iters" else float(val)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", required=True, help="recovery_recipe.py --cache file with the distilled inputs")
    ap.add_argument("--variants", nargs="+", default=["iters=200,lr=1e-4"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--brecq-iters", type=int, default=None,
                    help="BRECQ steps per unit (default: the recipe's; a small number only to try the script out)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    variants = [(v, parse_variant(v)) for v in args.variants]
    torch.set_num_threads(args.threads)
    weights, data_path = MODELS[MODEL]
    model, spec = load_model(MODEL, weights=weights)
    model.eval()
    d = torch.load(args.cache, weights_only=True)
    x, hold = d["x"], d["h"]
    n_eval = len(load_dataset(data_path, spec.preprocessing)) - REAL_HOLDOUT
    real_hold = torch.stack([img for img, _ in load_dataset(data_path, spec.preprocessing,
                                                             subset=slice(n_eval, None))])
    eval_ds = load_dataset(data_path, spec.preprocessing, subset=slice(0, n_eval))
    folded, _ = zsq.fold_batchnorm(model)
    base_for = calibrated_bases(folded, x, wbits=4, abits=8, overrides=dict(FIRST_LAST_8),
                                weight_estimator="minmax", depthwise_weight_estimator="output_mse")
    q = clone(base_for(WEIGHT_SCHEMES["recipe"][False]))
    cfg = RecoverConfig(method="brecq", seed=args.seed, iters=args.brecq_iters)
    t = time.perf_counter()
    recover(q, model, x, cfg, progress=False, holdout_inputs=hold)
    rows: list[dict] = []

    def measure(name: str, qm: torch.nn.Module, seconds: float, extra: dict | None = None) -> None:
        row = {"candidate": name, "seconds": seconds, "real_holdout_kl": holdout_kl(model, qm, real_hold),
               "holdout_kl": holdout_kl(model, qm, hold),
               "top1_record_only": compare(model, qm, eval_ds, progress=False)["quantized"]["top1"], **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))

    measure("brecq", q, time.perf_counter() - t)
    rcfg = cfg.resolved(tuple(x.shape[-2:]))
    learn = torch.cat([x, x.flip(-1)])  # the recipe's learning inputs: mirror images on for ImageNet-sized inputs
    for text, kw in variants:
        q2 = clone(q)
        ctx = RecoverContext(qmodel=q2, fp32_model=model, inputs=learn, holdout=None, config=rcfg,
                             device=torch.device("cpu"), progress=False, float_weights={},
                             generator=torch.Generator().manual_seed(args.seed), units=find_units(q2))
        t = time.perf_counter()
        with frozen_eval(q2), frozen_eval(model):
            info = polish_biases(ctx, iters=int(kw.get("iters", 200)), lr=float(kw.get("lr", 1e-4)))
        measure("polish:" + text, q2, time.perf_counter() - t, info)


if __name__ == "__main__":
    main()
