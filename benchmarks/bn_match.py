"""Where distilled inputs miss the BatchNorm statistics, layer by layer, next to batches of real images.

For each BN layer (in the order the forward pass reaches them) and each input set, the BN-statistics error in
units of the layer's running standard deviation, averaged over channels and over batches of ``--batch-size``:

    mean_c ((mu_c - mu~_c) / sigma~_c)^2 + ((sigma_c - sigma~_c) / sigma~_c)^2

(``mu``, ``sigma``: the batch's per-channel statistics; ``mu~``, ``sigma~``: the running ones). Real batches
show how far natural images sit from the running statistics; a distilled set far below them in a layer is
over-fitted there, far above them under-fitted (BENCHMARKS.md, "First-BN weight"). Reads only; chooses nothing.

    PYTHONPATH=src .venv/bin/python benchmarks/bn_match.py --model efficientnet_lite0 \
        --inputs base=runs/l0_s0_c200i300.pt fbn10=runs/l0_s0_fbn10.pt --real 436:500 0:64

``--inputs NAME=FILE``: ``.pt`` caches of ``benchmarks/recovery_recipe.py --cache`` (their ``"x"``, read with
``weights_only=True``); ``--real A:B``: images A..B-1 of the model's evaluation set in ``../shared``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from zsq.bn_stats import batchnorm_targets, capture_bn_inputs
from zsq.data import load_dataset
from zsq.models import load_model
from zsq.state import frozen_eval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import MODELS  # noqa: E402


def per_layer_error(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Standardised BN-statistics error per BN layer (execution order), averaged over full batches of ``x``."""
    targets = {t.name: t for t in batchnorm_targets(model)}
    n_batches = x.shape[0] // batch_size
    if n_batches == 0:
        raise SystemExit(f"{x.shape[0]} inputs: fewer than one batch of {batch_size}")
    total: dict[str, float] = {}
    with torch.no_grad(), frozen_eval(model), capture_bn_inputs(list(targets.values())) as stats:
        for i in range(n_batches):
            stats.clear()
            model(x[i * batch_size:(i + 1) * batch_size])
            for name, (m, s) in stats.items():  # filled in execution order
                t = targets[name]
                sd = t.std.clamp_min(1e-3)
                err = (((m - t.mean) / sd).pow(2).mean() + ((s - t.std) / sd).pow(2).mean()).item()
                total[name] = total.get(name, 0.0) + err / n_batches
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=sorted(MODELS))
    ap.add_argument("--inputs", nargs="*", default=[], metavar="NAME=FILE")
    ap.add_argument("--real", nargs="*", default=[], metavar="A:B")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights, data_path = MODELS[args.model]
    model, spec = load_model(args.model, weights=weights)
    model.eval()
    sets: dict[str, torch.Tensor] = {}
    for item in args.inputs:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--inputs {item!r}: expected NAME=FILE")
        sets[name] = torch.load(path, weights_only=True)["x"]
    for span in args.real:
        a, sep, b = span.partition(":")
        if not sep:
            raise SystemExit(f"--real {span!r}: expected A:B (image indices)")
        ds = load_dataset(data_path, spec.preprocessing, subset=slice(int(a), int(b)))
        sets[f"real {span}"] = torch.stack([img for img, _ in ds])
    if not sets:
        raise SystemExit("nothing to measure: give --inputs and/or --real")
    cols = {name: per_layer_error(model, x, args.batch_size) for name, x in sets.items()}
    layers = list(next(iter(cols.values())))
    print("| BN layer | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for layer in layers:
        print(f"| `{layer}` | " + " | ".join(f"{c.get(layer, float('nan')):.4f}" for c in cols.values()) + " |")
    print(f"| mean of {len(layers)} | " + " | ".join(f"{sum(c.values()) / len(c):.4f}" for c in cols.values()) + " |")


if __name__ == "__main__":
    main()
