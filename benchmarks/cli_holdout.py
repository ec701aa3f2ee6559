"""Score `zsq quantize` checkpoints on held-apart real images (issue 8's recipe rule, applied end to end).

`benchmarks/recovery_recipe.py` chooses recovery settings by the KL to FP32 on the last ``--real-holdout`` images
of the evaluation sample, which its top-1 never counts. This script applies the same measure to checkpoints that
`zsq quantize ... --out DIR` wrote (bias correction and everything else the CLI does included), so a candidate
can be judged on the very models the CLI produces. Per checkpoint it prints and writes:

* ``holdout_kl``: mean KL(softmax(FP32) || softmax(quantized)) over the last ``--holdout`` images (the selection
  signal);
* ``top1_rest`` and ``top1_fp32_rest``: top-1 of the quantized and the FP32 model on the images before them
  (record only).

    PYTHONPATH=src .venv/bin/python benchmarks/cli_holdout.py runs/a runs/b --holdout 64 --out runs/holdout.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from zsq.checkpoint import load_quantized, read_config
from zsq.data import load_dataset
from zsq.metrics import kl_divergence
from zsq.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import MODELS  # noqa: E402


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="DIR", help="output folders of zsq quantize --out")
    ap.add_argument("--holdout", type=int, default=64, help="the last N images are the held-apart set (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", metavar="JSON", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    fp_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for d in args.checkpoints:
        name = read_config(d)["model"]
        if name not in MODELS:
            raise SystemExit(f"{d}: model {name!r} has no evaluation sample here (known: {', '.join(MODELS)})")
        if name not in fp_cache:
            weights, data_path = MODELS[name]
            if not data_path.exists():
                raise SystemExit(f"{data_path} not found: the evaluation sample is needed (../shared/ASSETS.md)")
            fp32, spec = load_model(name, weights=weights)
            fp32.eval()
            ds = load_dataset(data_path, spec.preprocessing)
            n_rest = len(ds) - args.holdout
            if n_rest <= 0:
                raise SystemExit(f"--holdout {args.holdout}: the sample has only {len(ds)} images")
            x = torch.stack([img for img, _ in ds])
            y = torch.tensor([int(lbl) for _, lbl in ds])
            fp_cache[name] = (x, y, _logits(fp32, x))
        x, y, fp = fp_cache[name]
        q, _, _ = load_quantized(d)
        q.eval()
        ql = _logits(q, x)
        n_rest = x.shape[0] - args.holdout
        row = {"checkpoint": str(d), "model": name, "holdout": args.holdout,
               "holdout_kl": float(kl_divergence(fp[n_rest:], ql[n_rest:]).mean()),
               "top1_rest": 100.0 * float((ql[:n_rest].argmax(1) == y[:n_rest]).float().mean()),
               "top1_fp32_rest": 100.0 * float((fp[:n_rest].argmax(1) == y[:n_rest]).float().mean()),
               "top1_all": 100.0 * float((ql.argmax(1) == y).float().mean()),
               "kl_all": float(kl_divergence(fp, ql).mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
