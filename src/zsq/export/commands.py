"""``zsq export`` and ``zsq bench-deploy``: the deployment stage's commands.

Plugged into :mod:`zsq.cli` through ``PLUGIN_MODULES``: :func:`add_commands` adds the sub-parsers
and returns ``{command name: handler}``; each handler takes the parsed arguments and returns an
exit code, raising :class:`~zsq.errors.ZsqError` subclasses for user mistakes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..cli_types import pos_int as _pos_int
from ..errors import ConfigError, ExportError
from .onnx_qdq import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, WEIGHT_TYPES


def _opset(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ONNX opset, got {s!r}") from None
    if not MIN_OPSET <= v <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"opset {v} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    return v


def _batches(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes such as 1,32, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {s!r}")
    return vals


def add_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``export`` and ``bench-deploy`` to the ``zsq`` sub-command parser ``sub``."""
    p = sub.add_parser(
        "export", help="export a quantized checkpoint to ONNX (QDQ int8 graph for ONNX Runtime)",
        description="Write the quantized model of CHECKPOINT_DIR (from `zsq quantize --out DIR`) as a QDQ ONNX "
                    "graph with zsq's own scales and zero-points, check which operators ONNX Runtime runs "
                    "after its optimisations, and optionally write the FP32 model beside it.",
        epilog="Example: zsq export runs/r20 --format onnx --out r20.int8.onnx --fp32-out r20.fp32.onnx")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="directory written by `zsq quantize --out DIR`")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default onnx)")
    p.add_argument("--out", metavar="PATH", required=True, help="the .onnx file to write")
    p.add_argument("--fp32-out", metavar="PATH", default=None, help="also write the FP32 model as ONNX here")
    p.add_argument("--weights", metavar="PATH", default=None,
                   help="FP32 weights for --fp32-out (default: the weights recorded in the checkpoint)")
    p.add_argument("--opset", type=_opset, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--weight-type", choices=WEIGHT_TYPES, default="auto",
                   help="container of signed weights: auto (default; int8 where ONNX Runtime's u8s8 kernels are "
                        "exact on every CPU, i.e. depthwise convs and weights of at most 7 bits, uint8 elsewhere), "
                        "int8 (fastest; exact on VNNI CPUs, saturates on AVX2-only ones), uint8. On CPUs without "
                        "VNNI, 7-bit weights (`zsq quantize --wbits 7`) are the exact and fast choice")
    p.add_argument("--no-check", action="store_true", help="skip loading the file with ONNX Runtime")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the export report as JSON")
    add_common(p)

    p = sub.add_parser(
        "bench-deploy", help="ONNX Runtime latency (batch 1) and throughput (batch 32): int8 vs FP32, interleaved",
        description="Time ONNX models side by side with ONNX Runtime on the CPU: every repetition runs each "
                    "model once, so load that comes and goes affects them alike. Reports min and median.",
        epilog="Example: zsq bench-deploy runs/r20/model.int8.onnx --fp32 runs/r20/model.fp32.onnx --reps 20")
    p.add_argument("model", metavar="MODEL.onnx", help="the (int8) ONNX model")
    p.add_argument("--fp32", metavar="PATH", default=None, help="the FP32 ONNX model to compare with (the baseline)")
    p.add_argument("--compare", metavar="LABEL=PATH", action="append", default=[],
                   help="more ONNX models of the same network to time alongside (repeatable)")
    p.add_argument("--reps", type=_pos_int, default=20, help="timed repetitions per model and batch (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--threads", dest="ort_threads", type=_pos_int, default=2,
                   help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--batch", type=_batches, default=[1, 32], help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return {"export": cmd_export, "bench-deploy": cmd_bench_deploy}


def cmd_export(args: argparse.Namespace) -> int:
    from .onnx_qdq import export_checkpoint

    if args.format != "onnx":  # argparse restricts it; kept for library callers
        raise ConfigError(f"--format {args.format!r} is not supported; use onnx")
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: give the path of the .onnx file to write (ending in .onnx)")
    if args.fp32_out is not None and Path(args.fp32_out).resolve() == out.resolve():
        raise ExportError("--fp32-out must differ from --out")
    rq, rf = export_checkpoint(args.checkpoint, out, opset=args.opset, fp32_out=args.fp32_out,
                               weights=args.weights, weight_type=args.weight_type, verify=not args.no_check)
    print(f"wrote {rq.summary()}")
    for note in rq.notes:
        print(f"  note: {note}")
    if rf is not None:
        print(f"wrote {rf.summary()}")
    if rq.float_convs:
        print(f"warning: ONNX Runtime runs {rq.float_convs} convolution(s) in float; see the notes above")
    if rq.advice:
        print(f"speed on this CPU: {rq.advice}")
    if args.json:
        Path(args.json).write_text(json.dumps({"int8": rq.to_dict(), "fp32": rf.to_dict() if rf else None}, indent=2))
    return 0


def _parse_compare(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--compare {item!r}: expected LABEL=PATH, e.g. ort-static=model.ort.onnx")
        label, path = item.split("=", 1)
        if not label or not path:
            raise ConfigError(f"--compare {item!r}: expected LABEL=PATH")
        out[label] = path
    return out


def cmd_bench_deploy(args: argparse.Namespace) -> int:
    from .bench import advice_for, bench

    models: dict[str, str] = {}
    if args.fp32:
        models["fp32"] = args.fp32
    models["int8"] = args.model
    for label, path in _parse_compare(args.compare).items():
        if label in models:
            raise ConfigError(f"--compare label {label!r} is used twice; give each model its own label")
        models[label] = path
    for label, path in models.items():
        if not Path(path).is_file():
            raise ExportError(f"{label} model {path} does not exist")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    res = bench(models, batches=args.batch, reps=args.reps, warmup=args.warmup, threads=args.ort_threads,
                progress=not args.quiet)
    env = res.environment
    print(f"ONNX Runtime {env.get('onnxruntime')} on {env.get('cpu') or '?'} "
          f"(AVX2 {env.get('avx2')}, AVX-512 VNNI {env.get('avx512_vnni')}, AVX-VNNI {env.get('avx_vnni')}), "
          f"{args.ort_threads} threads, {args.reps} interleaved repetitions, load average {env.get('load_avg_1_5_15')}")
    print(res.table())
    for line in advice_for(models, env):
        print(f"speed on this CPU: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(res.to_dict(), indent=2))
    return 0
