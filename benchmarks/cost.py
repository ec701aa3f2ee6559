"""Cost of ZeroQ distillation on this CPU: seconds per iteration and achieved GFLOP/s.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_WAIT_POLICY=PASSIVE \
      .venv/bin/python benchmarks/cost.py --md benchmarks/COST_RESULTS.md

FLOPs of one distillation step (forward + backward w.r.t. the input, on the BN-folded model zsq
distils with) are counted with torch.utils.flop_counter; the peak is the best of several fp32
2048x2048 matrix multiplies with the same thread count.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import zsq
from zsq.config import DistillConfig
from zsq.models import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = {
    "cifar_resnet20": SHARED / "models/resnet-cifar10-akamaster/resnet20-12fca82f.th",
    "efficientnet_lite0": None,
}


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_flops(model, x) -> int:
    folded, _ = zsq.fold_batchnorm(model)
    for p in folded.parameters():
        p.requires_grad_(False)
    x = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        folded(x).sum().backward()
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--md", default=None)
    ap.add_argument("--layouts", default="channels_last,contiguous",
                    help="memory layouts to time side by side (DistillConfig.channels_last on / off)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    lines = [f"fp32 matmul peak ({args.threads} threads, 2048x2048): **{peak:.1f} GFLOP/s**", "",
             "| model | layout | batch | s / iteration | GFLOP / iteration | GFLOP/s | % of matmul peak |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    layouts = args.layouts.split(",")
    for name in args.models.split(","):
        w = MODELS.get(name)
        if w is not None and not w.exists():
            print(f"skip {name}: {w} not found")
            continue
        model, spec = load_model(name, weights=w)
        h, wd = spec.preprocessing.input_size
        for bs in [int(b) for b in args.batches.split(",")]:
            flops = step_flops(model, torch.randn(bs, 3, h, wd))
            for layout in layouts:
                cl = layout == "channels_last"
                zsq.distill(model, spec.preprocessing, DistillConfig(batch_size=bs, iterations=1, channels_last=cl),
                            progress=False)
                r = zsq.distill(model, spec.preprocessing,
                                DistillConfig(batch_size=bs, iterations=args.iters, channels_last=cl), progress=False)
                s_it = r.seconds / args.iters
                gfs = flops / s_it / 1e9
                lines.append(f"| {name} | {layout} | {bs} | {s_it:.3f} | {flops / 1e9:.1f} | {gfs:.1f} | "
                             f"{100 * gfs / peak:.0f} % |")
                print(lines[-1], flush=True)
    md = "\n".join(lines)
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")


if __name__ == "__main__":
    main()
