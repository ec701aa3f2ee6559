"""Where does a quantized model's remaining error sit? Put float weights back, one group of layers at a time.

For a saved quantized model (the ``--out`` directory of ``zsq quantize``), measure the KL to the float model
on held-apart real images (by default the last 64 of the model's evaluation set, the ones
``benchmarks/recovery_recipe.py --real-holdout 64`` keeps out of the evaluation), then again with the float
(BN-folded) weights and biases restored and weight quantization off for: all depthwise convs, all other
layers, all layers, and each reconstruction unit (:func:`zsq.recover.find_units`) on its own. Activation
quantizers stay as they are. Nothing is chosen on these numbers; they locate the error.

    PYTHONPATH=src .venv/bin/python benchmarks/unit_ablation.py runs/lite0-w4a8 --out runs/ablation.json

After BRECQ, later units compensate the errors of the units before them on the learning inputs, so
restoring one early unit can *raise* the KL: the per-unit rows measure that dependence, not an additive
share (docs/recovery.md, session 25).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import zsq
from zsq.checkpoint import load_quantized
from zsq.data import load_dataset
from zsq.graph import is_depthwise_conv
from zsq.metrics import kl_divergence
from zsq.models import load_model
from zsq.quant.modules import QUANT_LAYER_TYPES
from zsq.recover import find_units

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import MODELS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a `zsq quantize --out` directory")
    ap.add_argument("--real-holdout", type=int, default=64, help="the last N images of the evaluation set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q, _, meta = load_quantized(args.checkpoint)
    name = meta["model"]
    if name not in MODELS:
        raise SystemExit(f"{name}: not one of the benchmark models {', '.join(MODELS)}")
    weights, data_path = MODELS[name]
    model, spec = load_model(name, weights=weights)
    model.eval()
    folded = dict(zsq.fold_batchnorm(model)[0].named_modules())
    n = len(load_dataset(data_path, spec.preprocessing))
    real = torch.stack([img for img, _ in load_dataset(data_path, spec.preprocessing,
                                                        subset=slice(n - args.real_holdout, None))])
    with torch.no_grad():
        ref = model(real)

    def kl() -> float:
        with torch.no_grad():
            return float(kl_divergence(ref, q(real)).mean())

    base = kl()
    rows: list[dict[str, Any]] = [{"restored": "nothing", "kl": base}]
    print(f"{'all layers quantized':44s} KL {base:.4f}", flush=True)

    def restored(names: list[str], label: str) -> None:
        saved = {}
        try:
            for layer in names:
                m = q.get_submodule(layer)
                saved[layer] = (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone(),
                                getattr(m, "quant_enabled", True))
                f = folded[layer]
                with torch.no_grad():
                    m.weight.copy_(f.weight)
                    if m.bias is not None and f.bias is not None:
                        m.bias.copy_(f.bias)
                m.quant_enabled = False
            v = kl()
        finally:
            for layer, (w, b, on) in saved.items():
                m = q.get_submodule(layer)
                with torch.no_grad():
                    m.weight.copy_(w)
                    if b is not None:
                        m.bias.copy_(b)
                m.quant_enabled = on
        rows.append({"restored": label, "layers": len(names), "kl": v})
        print(f"{label:44s} KL {v:.4f} ({v / base:.2f}x)", flush=True)

    layers = [n for n, m in q.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]
    dw = [n for n in layers if is_depthwise_conv(q.get_submodule(n))]
    restored(dw, "float weights: depthwise convs")
    restored([n for n in layers if n not in dw], "float weights: all other layers")
    restored(layers, "float weights: all layers")
    for u in find_units(q):
        restored(list(u.layers), f"float weights: unit {u.name}")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "real_holdout": args.real_holdout,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
