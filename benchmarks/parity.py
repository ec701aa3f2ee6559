"""Parity of the exported int8 ONNX models with zsq's PyTorch model, in float and in integer arithmetic.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=src \\
        .venv/bin/python benchmarks/parity.py --threads 2

For ResNet-20 (all 5000 CIFAR-10 test images) and EfficientNet-Lite0 (all 500 ImageNet sample
images): zsq's W8A8 pipeline with distilled calibration data (the deployment benchmark's settings),
and W7A8 calibrated on the same inputs; each exported with the default weight containers and run in
ONNX Runtime. Its logits are compared with

* zsq's fake-quantized model in float32 (``zsq.evaluate.logits_of``), and
* zsq's integer emulation of the graph (``zsq.export.IntegerModel``, ``zsq eval --integer``),

by top-1, top-1 agreement, the largest logit difference and, layer by layer on 32 images, the share
of integer codes that differ. Writes benchmarks/parity.json and the section
"## Parity with ONNX Runtime: float vs integer evaluation" of benchmarks/PARITY_RESULTS.md.
Nothing here is tuned: there is nothing to choose.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ensure_runtime_env, onnx_logits  # noqa: E402
from deploy import MODELS, agreement, quantize_like, top1  # noqa: E402

import zsq  # noqa: E402,F401
from zsq.config import QuantConfig  # noqa: E402
from zsq.data import iter_batches, load_dataset  # noqa: E402
from zsq.evaluate import logits_of  # noqa: E402
from zsq.export import export_onnx, integer_logits, layer_parity, snap_biases  # noqa: E402
from zsq.pipeline import RunConfig, run  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = ("MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=src "
           ".venv/bin/python benchmarks/parity.py --threads {threads}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one_model(name: str, spec: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    cfg = RunConfig(model=name, weights=spec["weights"], quant=QuantConfig(wbits=8, abits=8), distill=spec["distill"],
                    seed=0)
    log(f"{name}: zsq pipeline W8A8")
    res = run(cfg, out_dir=None, progress=False)
    q8 = res.quantized_model.eval()
    snap_biases(q8)
    models = {"W8A8": q8, "W7A8": quantize_like(res, QuantConfig(wbits=7, abits=8))}
    ds = load_dataset(spec["eval"], res.spec.preprocessing, limit=args.limit)
    xs, ys = zip(*iter_batches(ds, 100))
    x, y = torch.cat(xs), torch.cat(ys).numpy()
    h, w = res.spec.preprocessing.input_size
    rows = []
    for label, qm in models.items():
        path = work / f"{name}.{label}.onnx"
        export_onnx(qm, path, example_input=torch.zeros(1, 3, h, w))
        log(f"{name} {label}: ONNX Runtime, float32 fake quantization, integer emulation on {len(y)} images")
        t = time.perf_counter()
        lo = onnx_logits(path, x, threads=args.threads)
        t_onnx = time.perf_counter() - t
        t = time.perf_counter()
        lf = logits_of(qm, x).numpy()
        t_float = time.perf_counter() - t
        t = time.perf_counter()
        li = integer_logits(qm, x).numpy()
        t_int = time.perf_counter() - t
        lp_f = layer_parity(qm, path, x[:32], threads=args.threads)
        lp_i = layer_parity(qm, path, x[:32], threads=args.threads, emulate=True)
        row = {
            "model": name, "setting": label, "n": int(len(y)),
            "top1_onnx": top1(lo, y), "top1_float": top1(lf, y), "top1_integer": top1(li, y),
            "agreement_float": agreement(lo, lf), "agreement_integer": agreement(lo, li),
            "max_abs_diff_float": float(np.abs(lo - lf).max()), "max_abs_diff_integer": float(np.abs(lo - li).max()),
            "layer_mismatch_float": lp_f["mismatch_fraction"], "layer_max_steps_float": lp_f["max_steps"],
            "layer_mismatch_integer": lp_i["mismatch_fraction"], "layer_max_steps_integer": lp_i["max_steps"],
            "seconds_onnx": round(t_onnx, 1), "seconds_float": round(t_float, 1), "seconds_integer": round(t_int, 1),
        }
        log(f"  top-1 ONNX {row['top1_onnx']:.2f} float {row['top1_float']:.2f} integer {row['top1_integer']:.2f}; "
            f"agreement float {row['agreement_float']:.2f} integer {row['agreement_integer']:.2f}; max |diff| float "
            f"{row['max_abs_diff_float']:.3g} integer {row['max_abs_diff_integer']:.3g}")
        rows.append(row)
    return {"model": name, "eval": spec["eval_desc"], "rows": rows}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, minutes: float) -> str:
    lines = [
        "## Parity with ONNX Runtime: float vs integer evaluation",
        "",
        f"Regenerate with (this run: {minutes:.0f} minutes, {args.threads} threads, load average "
        f"{args.load[0]:.1f} at the start and {args.load[1]:.1f} at the end):",
        "",
        "```bash",
        COMMAND.format(threads=args.threads),
        "```",
        "",
        "The exported int8 ONNX model (default weight containers) in ONNX Runtime against zsq's PyTorch model "
        "of the same quantization, evaluated two ways: float32 fake quantization (the default everywhere) and "
        "integer emulation of the graph (`zsq eval CHECKPOINT DATA --integer`, `zsq.export.IntegerModel`). "
        "W8A8 from zsq's pipeline with distilled calibration data (the deployment benchmark's settings, seed 0); "
        "W7A8 calibrated on the same inputs. Layer codes: each quantized tensor computed from ONNX Runtime's own "
        "previous tensors, 32 images.",
        "",
        "| model | setting | images | top-1 ONNX | top-1 float / integer | agreement with ONNX, float / integer % "
        "| max logit difference, float / integer | layer codes differing, float / integer | eval s ONNX / float / integer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for row in r["rows"]:
            lines.append(
                f"| {row['model']} | {row['setting']} | {row['n']} | {row['top1_onnx']:.2f} | "
                f"{row['top1_float']:.2f} / {row['top1_integer']:.2f} | "
                f"{row['agreement_float']:.2f} / **{row['agreement_integer']:.2f}** | "
                f"{row['max_abs_diff_float']:.3g} / {row['max_abs_diff_integer']:.3g} | "
                f"{100 * row['layer_mismatch_float']:.5f} % / {100 * row['layer_mismatch_integer']:.5f} % | "
                f"{row['seconds_onnx']:.0f} / {row['seconds_float']:.0f} / {row['seconds_integer']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ensure_runtime_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="only the first N evaluation images (smoke runs)")
    ap.add_argument("--json", default=str(HERE / "parity.json"))
    ap.add_argument("--markdown", default=str(HERE / "PARITY_RESULTS.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = [one_model(m, MODELS[m], Path(tmp), args) for m in args.models]
    minutes = (time.perf_counter() - t0) / 60
    args.load = (load0, os.getloadavg()[0])
    Path(args.json).write_text(json.dumps({"results": results, "threads": args.threads, "torch": torch.__version__},
                                          indent=2))
    Path(args.markdown).write_text(markdown(results, args, minutes))
    log(f"wrote {args.json} and {args.markdown} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
