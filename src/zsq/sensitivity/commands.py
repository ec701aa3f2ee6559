"""``zsq sensitivity`` and ``zsq allocate`` (plugged into zsq.cli through ``PLUGIN_MODULES``), plus the
``--mixed-precision``/``--bit-plan`` options of ``zsq quantize`` (:func:`add_mixed_precision_args`,
:func:`mixed_precision_from_args`).

    zsq sensitivity cifar_resnet20 --weights W.th --method kl --bits 2,4,8 --out table.json --plot sens.png
    zsq allocate table.json --target-size 4bit --out plan.json --pareto-plot pareto.png
    zsq quantize cifar_resnet20 --weights W.th --bit-plan plan.json --abits 8 ...
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from ..cli_types import MODEL_HELP, HandlerMap, pos_int as _pos_int, pos_float as _pos_float
from ..errors import ConfigError


def _bits_list(text: str) -> tuple[int, ...]:
    from . import parse_bits

    try:
        return parse_bits(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_method_args(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """Settings of the sensitivity methods (``prefix`` namespaces them inside `zsq quantize`)."""
    from .hessian import HessianConfig
    from .kl import KLConfig

    h, k = HessianConfig(), KLConfig()
    g = p.add_argument_group("sensitivity method settings")
    g.add_argument(f"--{prefix}sens-batch-size", type=_pos_int, default=None,
                   help=f"inputs per forward (default kl {k.batch_size}, hessian {h.batch_size})")
    g.add_argument(f"--{prefix}hessian-statistic", choices=("trace", "eigenvalue"), default=h.statistic,
                   help="HAWQ-V2 average trace (default) or HAWQ top eigenvalue")
    g.add_argument(f"--{prefix}hessian-iters", type=_pos_int, default=h.max_iterations,
                   help=f"cap on Hutchinson samples / power iterations (default {h.max_iterations})")
    g.add_argument(f"--{prefix}hessian-tol", type=_pos_float, default=h.tol,
                   help=f"relative tolerance that stops the Hutchinson estimate (default {h.tol})")
    g.add_argument(f"--{prefix}hessian-loss", choices=("ce", "kl"), default=h.loss,
                   help="loss against the model's own float predictions (default ce)")
    g.add_argument(f"--{prefix}hessian-trace-mode", choices=("gauss_newton", "per_layer", "joint"),
                   default=h.trace_mode,
                   help="Hutchinson estimator: gauss_newton (default; one backward per sample, equals the Hessian "
                        "block trace for ReLU-type CNNs), per_layer or joint (Hessian-vector products)")


def _method_configs(args: argparse.Namespace, *, prefix: str = "") -> tuple[Any, Any]:
    from .hessian import HessianConfig
    from .kl import KLConfig

    a = lambda name: getattr(args, prefix.replace("-", "_") + name)  # noqa: E731
    bs = a("sens_batch_size")
    kl = KLConfig(**({"batch_size": bs} if bs else {}))
    stat = a("hessian_statistic")
    hz = HessianConfig(statistic=stat, max_iterations=a("hessian_iters"), eigen_max_iterations=a("hessian_iters"),
                       tol=a("hessian_tol"), loss=a("hessian_loss"), trace_mode=a("hessian_trace_mode"),
                       seed=getattr(args, "seed", 0),
                       **({"batch_size": bs} if bs else {}))
    return kl, hz


def _quant_config(args: argparse.Namespace):
    from ..config import QuantConfig

    overrides: dict[str, Any] = {}
    if getattr(args, "override", None):
        from ..cli import parse_override

        overrides = dict(parse_override(o) for o in args.override)
    return QuantConfig(wbits=args.wbits, abits=args.abits, weight_granularity=args.weight_granularity,
                       weight_symmetric=not args.weight_asymmetric, weight_estimator=args.weight_estimator,
                       overrides=overrides, skip=tuple(args.skip))


# ------------------------------------------------------------------------------------------------
# zsq sensitivity
# ------------------------------------------------------------------------------------------------


def cmd_sensitivity(args: argparse.Namespace) -> int:
    import torch

    from ..config import DistillConfig
    from ..fold import fold_batchnorm
    from ..models import load_model
    from ..pipeline import RunConfig, calibration_inputs, check_calib_source, check_device
    from ..quant import quantize
    from . import compute_sensitivity

    device = check_device(args.device)
    torch.manual_seed(args.seed)
    qcfg = _quant_config(args)
    model, spec = load_model(args.model, weights=args.weights)
    model.eval()
    dcfg = DistillConfig(num_batches=args.distill_batches, batch_size=args.distill_batch_size,
                         iterations=args.distill_iters, lr=args.distill_lr, seed=args.seed)
    calib = args.calib
    check_calib_source(calib, sources=("distilled", "gaussian"), proxy=False)
    run_cfg = RunConfig(model=args.model, weights=args.weights, quant=qcfg, distill=dcfg, calib=calib,
                        calib_size=args.calib_size, device=args.device, seed=args.seed)
    x, info = calibration_inputs(model, spec, run_cfg, progress=not args.quiet)
    folded, _ = fold_batchnorm(model)
    qmodel = quantize(folded, qcfg, inplace=True).to(device)
    kl, hz = _method_configs(args)
    table = compute_sensitivity(qmodel, x, method=args.method, bits=args.bits,
                                config=kl if args.method == "kl" else hz, device=device, progress=not args.quiet,
                                model_name=args.model)
    table.settings["calibration"] = {k: v for k, v in info.items() if k in ("source", "num_inputs", "path", "seconds")}
    table.settings["weights"] = args.weights
    out = table.save(args.out)
    print(f"{args.method} sensitivity of {len(table.layers)} layers at {','.join(map(str, table.bits))} bits on "
          f"{x.shape[0]} {info.get('source', '')} inputs in {table.timings_s.get('sensitivity', 0):.1f}s; wrote {out}")
    if args.plot:
        from ..plots import plot_sensitivity

        print(f"wrote {plot_sensitivity(table, args.plot)}")
    return 0


# ------------------------------------------------------------------------------------------------
# zsq allocate
# ------------------------------------------------------------------------------------------------


def _parse_fix(items: list[str]) -> dict[str, int]:
    from ..config import check_bits

    out = {}
    for text in items:
        m = re.match(r"^(.+)=(\d+)$", text)
        if not m:
            raise ConfigError(f"--fix {text!r}: expected LAYER=BITS, e.g. conv1=8")
        out[m.group(1)] = check_bits(int(m.group(2)), f"--fix {m.group(1)}")
    return out


def cmd_allocate(args: argparse.Namespace) -> int:
    from ..allocate import allocate, bops_budget, random_allocation, size_budget, uniform_points
    from ..mixed_precision import plan_from_allocation, save_bit_plan
    from . import SensitivityTable

    table = SensitivityTable.load(args.table)
    if args.bops is not None:
        budget = bops_budget(table, args.bops)
    else:
        budget = size_budget(table, args.target_size)
    groups = [tuple(n.strip() for n in g.split(",") if n.strip()) for g in args.group]
    fixed = _parse_fix(args.fix)
    bits = args.bits
    if args.random is not None:
        alloc = random_allocation(table, budget, seed=args.random, groups=groups, fixed=fixed, bits=bits)
    else:
        alloc = allocate(table, budget, groups=groups, fixed=fixed, max_bins=args.max_bins, bits=bits)
    plan = plan_from_allocation(alloc, table)
    out = save_bit_plan(plan, args.out)
    counts = ", ".join(f"{n} x {k}-bit" for k, n in sorted(plan.metadata["counts"].items(), key=lambda kv: int(kv[0])))
    print(f"{len(alloc.bits)} layers: {counts}; {alloc.average_bits:.3f} bits/weight, ~{alloc.size_bytes / 1e6:.4f} MB, "
          f"total sensitivity {alloc.sensitivity:.4g} (budget {budget.label or budget.value}); wrote {out}")
    if args.frontier_json:
        Path(args.frontier_json).write_text(json.dumps(alloc.to_dict(frontier=True), indent=2))
    if args.pareto_plot:
        from ..plots import plot_pareto

        if not alloc.frontier:  # random allocation: draw the optimal frontier for reference
            ref = allocate(table, budget, groups=groups, fixed=fixed, max_bins=args.max_bins, bits=bits)
            path = plot_pareto(ref, args.pareto_plot, uniform=uniform_points(table), others={"random": alloc})
        else:
            path = plot_pareto(alloc, args.pareto_plot, uniform=uniform_points(table))
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    from ..config import WEIGHT_ESTIMATORS, QuantConfig

    qd = QuantConfig()
    g = p.add_argument_group("quantizer (use the settings of the later `zsq quantize` run)")
    g.add_argument("--wbits", type=int, default=qd.wbits, help=argparse.SUPPRESS)
    g.add_argument("--abits", type=int, default=qd.abits, help=f"activation bits, for BOPs (default {qd.abits})")
    g.add_argument("--weight-granularity", choices=("per_channel", "per_tensor"), default=qd.weight_granularity)
    g.add_argument("--weight-asymmetric", action="store_true", help="asymmetric (uint) weights")
    g.add_argument("--weight-estimator", choices=WEIGHT_ESTIMATORS, default=qd.weight_estimator,
                   help=f"weight range (default {qd.weight_estimator})")
    g.add_argument("--override", action="append", default=[], metavar="PATTERN=SPEC",
                   help="per-layer setting; an explicit wbits pins that layer (e.g. '@first=w8')")
    g.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="keep matching layers in float")


def add_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> HandlerMap:
    """Add ``sensitivity`` and ``allocate`` to the ``zsq`` sub-command parser ``sub``."""
    from ..config import DistillConfig
    from . import DEFAULT_BITS

    d = DistillConfig()
    p = sub.add_parser(
        "sensitivity", help="per-layer quantization sensitivity table (ZeroQ KL or HAWQ Hessian), as JSON",
        description="Measure how much each layer suffers when only its weights are quantized to each candidate "
                    "bit width, on distilled data (no real data needed).",
        epilog="Example: zsq sensitivity cifar_resnet20 --weights resnet20.th --method kl --bits 2,4,8 "
               "--out table.json --plot sens.png")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--weights", metavar="PATH", help="weights file (state_dict .pt/.pth/.th or .safetensors)")
    p.add_argument("--method", choices=("kl", "hessian"), default="kl", help="kl (ZeroQ, default) or hessian (HAWQ)")
    p.add_argument("--bits", type=_bits_list, default=DEFAULT_BITS,
                   help=f"candidate weight bit widths (default {','.join(map(str, DEFAULT_BITS))})")
    p.add_argument("--out", metavar="FILE", required=True, help="sensitivity table (JSON)")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw the per-layer sensitivity figure")
    _add_quant_args(p)
    _add_method_args(p)
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", default="distilled", metavar="SOURCE",
                   help="distilled (default), gaussian, or a PATH to real images / saved tensors")
    g.add_argument("--calib-size", type=_pos_int, default=None, help="images for gaussian/real calibration")
    g.add_argument("--distill-batches", type=_pos_int, default=d.num_batches)
    g.add_argument("--distill-batch-size", type=_pos_int, default=d.batch_size)
    g.add_argument("--distill-iters", type=_pos_int, default=d.iterations)
    g.add_argument("--distill-lr", type=_pos_float, default=d.lr)
    add_common(p)

    p = sub.add_parser(
        "allocate", help="choose per-layer weight bits from a sensitivity table under a size or BOPs budget",
        description="Dynamic programming over the sensitivity table: the least total sensitivity under the "
                    "budget, and the whole size/sensitivity Pareto frontier.",
        epilog="Example: zsq allocate table.json --target-size 4bit --out plan.json --pareto-plot pareto.png; "
               "then zsq quantize MODEL --bit-plan plan.json")
    p.add_argument("table", metavar="TABLE", help="sensitivity table written by `zsq sensitivity`")
    p.add_argument("--target-size", default="4bit", metavar="SIZE",
                   help="average bits per weight (4bit = the size of the uniform 4-bit model, 3.5bit, ...) or a "
                        "model size in MB (0.15 or 0.15MB); default 4bit")
    p.add_argument("--bops", default=None, metavar="BOPS",
                   help="constrain bit-operations instead: w4a8 (as uniform W4A8) or a number such as 1.2G")
    p.add_argument("--group", action="append", default=[], metavar="L1,L2,...",
                   help="layers that must share one bit width (repeatable)")
    p.add_argument("--fix", action="append", default=[], metavar="LAYER=BITS", help="pin a layer (repeatable)")
    p.add_argument("--bits", type=_bits_list, default=None,
                   help="allocate only these widths (a subset of the table's, e.g. 3,4,5,6,8)")
    p.add_argument("--max-bins", type=_pos_int, default=None, help="DP resolution (default 20000 cost bins)")
    p.add_argument("--random", type=int, default=None, metavar="SEED",
                   help="a random allocation under the same budget instead (baseline)")
    p.add_argument("--out", metavar="FILE", required=True, help="bit plan (JSON) for `zsq quantize --bit-plan`")
    p.add_argument("--pareto-plot", metavar="PNG", default=None, help="draw the Pareto frontier")
    p.add_argument("--frontier-json", metavar="FILE", default=None, help="also write the whole frontier as JSON")
    add_common(p)
    return {"sensitivity": cmd_sensitivity, "allocate": _with_default_bins(cmd_allocate)}


def _with_default_bins(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    from ..allocate import DEFAULT_MAX_BINS

    def run(args: argparse.Namespace) -> int:
        if args.max_bins is None:
            args.max_bins = DEFAULT_MAX_BINS
        return fn(args)

    return run


# ------------------------------------------------------------------------------------------------
# `zsq quantize --mixed-precision` / `--bit-plan` (for cli.py)
# ------------------------------------------------------------------------------------------------


def add_mixed_precision_args(p: argparse.ArgumentParser) -> None:
    """Options of ``zsq quantize`` for mixed precision (call on the quantize sub-parser)."""
    from . import DEFAULT_BITS

    g = p.add_argument_group("mixed precision (per-layer weight bits)")
    g.add_argument("--mixed-precision", action="store_true",
                   help="choose per-layer weight bits by sensitivity under --target-size (or --bops)")
    g.add_argument("--target-size", default="4bit", metavar="SIZE",
                   help="average bits per weight (4bit: the size of uniform W4) or a size in MB; default 4bit")
    g.add_argument("--bops", default=None, metavar="BOPS", help="bit-operations budget instead (w4a8 or 1.2G)")
    g.add_argument("--method", choices=("kl", "hessian"), default="kl", help="sensitivity method (default kl)")
    g.add_argument("--mp-bits", type=_bits_list, default=DEFAULT_BITS,
                   help=f"candidate weight bit widths (default {','.join(map(str, DEFAULT_BITS))})")
    g.add_argument("--mp-group", action="append", default=[], metavar="L1,L2,...",
                   help="layers that must share one bit width (repeatable)")
    g.add_argument("--mp-no-select", action="store_true",
                   help="allocate over all --mp-bits; by default the lowest width is chosen on the calibration data")
    g.add_argument("--bit-plan", metavar="JSON", default=None,
                   help="per-layer weight bits from a bit plan (from `zsq allocate` or a previous run's bit_plan.json)")
    _add_method_args(p, prefix="mp-")


def mixed_precision_from_args(args: argparse.Namespace):
    """``(MixedPrecisionConfig | None, bit_plan_path | None)`` from the options of :func:`add_mixed_precision_args`."""
    from ..mixed_precision import MixedPrecisionConfig

    if args.bit_plan and args.mixed_precision:
        raise ConfigError("--bit-plan and --mixed-precision exclude each other: a bit plan already fixes the bits")
    if args.bit_plan:
        if not Path(args.bit_plan).is_file():
            raise ConfigError(f"--bit-plan {args.bit_plan!r} does not exist")
        return None, args.bit_plan
    if not args.mixed_precision:
        return None, None
    kl, hz = _method_configs(args, prefix="mp-")
    groups = tuple(tuple(n.strip() for n in g.split(",") if n.strip()) for g in args.mp_group)
    cfg = MixedPrecisionConfig(method=args.method, bits=args.mp_bits, target_size=args.target_size, bops=args.bops,
                               groups=groups, kl=kl, hessian=hz, select_min_bits=not args.mp_no_select)
    return cfg, None


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the zsq command: zsq sensitivity ... / zsq allocate ...")
