"""Score `zsq quantize` checkpoints on held-apart real images (issue 8's recipe rule, applied end to end).

`benchmarks/recovery_recipe.py` chooses recovery settings by the KL to FP32 on the last ``--real-holdout`` images
of the evaluation sample, which its top-1 never counts. This script applies the same measure to checkpoints that
`zsq quantize ... --out DIR` wrote (bias correction and everything else the CLI does included), so a candidate
can be judged on the very models the CLI produces. Per checkpoint it prints and writes:

* ``holdout_kl``: mean KL(softmax(FP32) || softmax(quantized)) over the last ``--holdout`` images (the selection
  signal);
* ``top1_rest`` and ``top1_fp32_rest``: top-1 of the quantized and the FP32 model on the images before them
  (record only); ``top1_all`` and ``kl_all`` over the whole sample, as ``zsq quantize --eval`` reports them.

Both parts go through :func:`zsq.evaluate.compare`, the evaluation the CLI runs.

    PYTHONPATH=src .venv/bin/python benchmarks/cli_holdout.py runs/a runs/b --holdout 64 --out runs/holdout.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from zsq.checkpoint import load_quantized, read_config
from zsq.data import load_dataset
from zsq.evaluate import compare
from zsq.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import MODELS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="DIR", help="output folders of zsq quantize --out")
    ap.add_argument("--holdout", type=int, default=64, help="the last N images are the held-apart set (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", metavar="JSON", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    loaded: dict[str, tuple[torch.nn.Module, Any, Any]] = {}  # model -> (FP32, images before, held-apart images)
    for d in args.checkpoints:
        name = read_config(d)["model"]
        if name not in MODELS:
            raise SystemExit(f"{d}: model {name!r} has no evaluation sample here (known: {', '.join(MODELS)})")
        if name not in loaded:
            weights, data_path = MODELS[name]
            if not data_path.exists():
                raise SystemExit(f"{data_path} not found: the evaluation sample is needed (../shared/ASSETS.md)")
            fp32, spec = load_model(name, weights=weights)
            n_rest = len(load_dataset(data_path, spec.preprocessing)) - args.holdout
            if n_rest <= 0:
                raise SystemExit(f"--holdout {args.holdout}: the sample has only {n_rest + args.holdout} images")
            loaded[name] = (fp32, load_dataset(data_path, spec.preprocessing, subset=slice(0, n_rest)),
                            load_dataset(data_path, spec.preprocessing, subset=slice(n_rest, None)))
        fp32, rest_ds, hold_ds = loaded[name]
        q, _, _ = load_quantized(d)
        rest, hold = (compare(fp32, q, ds, progress=False) for ds in (rest_ds, hold_ds))
        n = rest["n"] + hold["n"]
        row = {"checkpoint": str(d), "model": name, "holdout": hold["n"], "holdout_kl": hold["kl"],
               "top1_rest": rest["quantized"]["top1"], "top1_fp32_rest": rest["fp32"]["top1"],
               "top1_all": (rest["quantized"]["top1"] * rest["n"] + hold["quantized"]["top1"] * hold["n"]) / n,
               "kl_all": (rest["kl"] * rest["n"] + hold["kl"] * hold["n"]) / n}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
