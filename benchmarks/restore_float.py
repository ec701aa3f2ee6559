"""Where does a recovered 4-bit EfficientNet-Lite0 lose accuracy? (session 18 probe; diagnostic only)

Quantizes Lite0 at W4A8 (first/last layer W8A8, asymmetric 4-bit weights), runs BRECQ on a small distilled set,
then scores the recovered model with one group of layers put back to float at a time: all activation quantizers
off, the float weights of every depthwise / expand / projection conv, or of one MBConv block. Each row gives
top-1 on the first 436 sample images (record only) and the KL to FP32 on the last 64 (never evaluated).

    PYTHONPATH=src .venv/bin/python benchmarks/restore_float.py --device cuda --out runs/restore_float.jsonl

Reading it: BRECQ's roundings compensate each other within a block, and each later block is fitted to the
quantized output of the earlier ones, so putting float weights back can make the model *worse*; only the
activation row is a clean attribution (BENCHMARKS.md, "GPU check (session 18)").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import zsq
from zsq.config import DistillConfig, QuantConfig
from zsq.data import load_dataset
from zsq.metrics import kl_divergence
from zsq.models import load_model
from zsq.pipeline import check_device
from zsq.quant import ActQuantizer
from zsq.recover import RecoverConfig, recover
from zsq.state import full_fp32

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import FIRST_LAST_8, MODELS  # noqa: E402

N_EVAL, N_HOLD = 436, 64  # the split of the issue-8 rows: evaluate on the first 436, held apart the last 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-iters", type=int, default=150)
    ap.add_argument("--distill-coarse-iters", type=int, default=100)
    ap.add_argument("--recover-iters", type=int, default=40)
    ap.add_argument("--out", default=None, help="write the rows here (JSON lines)")
    args = ap.parse_args()
    with full_fp32():  # on a GPU too, FP32 convolutions and matrix products as on the CPU
        probe(args)


def probe(args: argparse.Namespace) -> None:
    dev = check_device(args.device)
    _, data_path = MODELS["efficientnet_lite0"]
    if not data_path.exists():
        raise SystemExit(f"{data_path} not found: this probe needs the ImageNet sample of ../shared")
    t0 = time.perf_counter()
    model, spec = load_model("efficientnet_lite0")
    model.eval()
    x = zsq.distill(model, spec.preprocessing, DistillConfig(num_batches=1, iterations=args.distill_iters,
                    coarse_iterations=args.distill_coarse_iters, seed=args.seed), progress=False, device=dev).inputs
    folded, _ = zsq.fold_batchnorm(model)
    folded.to(dev)
    model.to(dev)
    q = zsq.quantize(folded, QuantConfig(wbits=4, abits=8, weight_symmetric=None, overrides=dict(FIRST_LAST_8)))
    zsq.calibrate(q, x, progress=False)
    recover(q, model, x, RecoverConfig(method="brecq", iters=args.recover_iters, seed=args.seed), progress=False,
            device=dev)
    ds = load_dataset(data_path, spec.preprocessing)
    if len(ds) < N_EVAL + N_HOLD:
        raise SystemExit(f"{data_path} has {len(ds)} images, the probe needs {N_EVAL + N_HOLD}")
    imgs = torch.stack([ds[i][0] for i in range(N_EVAL + N_HOLD)]).to(dev)
    labels = torch.tensor([ds[i][1] for i in range(N_EVAL + N_HOLD)], device=dev)
    ev, ho = slice(0, N_EVAL), slice(N_EVAL, N_EVAL + N_HOLD)

    @torch.no_grad()
    def logits(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([m(imgs[i:i + 100]) for i in range(0, imgs.shape[0], 100)])

    fp = logits(model)
    rows = [{"row": "fp32", "top1": float((fp[ev].argmax(1) == labels[ev]).float().mean() * 100)}]

    def score(row: str) -> None:
        lg = logits(q)
        rows.append({"row": row, "top1": float((lg[ev].argmax(1) == labels[ev]).float().mean() * 100),
                     "real_holdout_kl": float(kl_divergence(fp[ho], lg[ho]).mean())})
        print(json.dumps(rows[-1]), flush=True)

    float_mods = dict(folded.named_modules())
    layers = {n: m for n, m in q.named_modules() if getattr(m, "weight_quantizer", None) is not None}

    def with_float_weights(names: list[str], row: str) -> None:
        saved = {n: layers[n].weight.detach().clone() for n in names}
        try:
            for n in names:
                layers[n].weight.data.copy_(float_mods[n].weight.data)
                layers[n].quant_enabled = False
            score(row)
        finally:
            for n in names:
                layers[n].weight.data.copy_(saved[n])
                layers[n].quant_enabled = True

    score("w4a8_brecq")
    acts = [m for m in q.modules() if isinstance(m, ActQuantizer)]
    try:
        for a in acts:
            a.enabled = False
        score("float_activations")
    finally:
        for a in acts:
            a.enabled = True
    depthwise = [n for n in layers if getattr(float_mods[n], "groups", 1) > 1]
    with_float_weights(depthwise, "float_depthwise")
    with_float_weights([n for n in layers if n.endswith("_expand_conv")], "float_expand")
    with_float_weights([n for n in layers if n.endswith("_project_conv")], "float_project")
    blocks = sorted({int(n.split(".")[1]) for n in layers if n.startswith("_blocks.")})
    for b in blocks:
        with_float_weights([n for n in layers if n.startswith(f"_blocks.{b}.")], f"float_block{b}")
    for b in blocks:
        with_float_weights([n for n in depthwise if n.startswith(f"_blocks.{b}.")], f"float_block{b}_depthwise")
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
