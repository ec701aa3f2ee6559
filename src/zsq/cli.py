"""Command-line interface: thin parsing on top of the library; one clear line per user mistake."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from .cli_types import MODEL_HELP, nonneg_int as _nonneg_int, pos_float as _pos_float, pos_int as _pos_int
from .errors import ConfigError, ZsqError

log = logging.getLogger("zsq")


def _bits(s: str) -> int:
    from .config import check_bits

    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer bit width 2-8, got {s!r}") from None
    try:
        return check_bits(v, "bits")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


OVERRIDE_RE = re.compile(r"^(?:(float)|(?:w(\d))?(?:a(\d))?(?:,?(pc|pt))?(?:,?(nu|uni))?(?:,?(output_mse|mse|minmax))?)$")


def parse_override(text: str) -> tuple[str, dict[str, Any] | None]:
    """``PATTERN=SPEC`` with SPEC ``w8a8``, ``w8``, ``a6``, ``w4,pt``, ``w4,nu`` (non-uniform weights), ``w4,mse``
    or ``w4,output_mse`` (the layers' weight range estimator), or ``float``."""
    if "=" not in text:
        raise ConfigError(f"--override {text!r}: expected PATTERN=SPEC, e.g. '@first=w8a8', 're:.*fc=w8', 'conv1=float'")
    pattern, spec = text.rsplit("=", 1)
    m = OVERRIDE_RE.match(spec.strip())
    if not pattern or not m or not any(m.groups()):
        raise ConfigError(f"--override {text!r}: SPEC must look like w8a8, w4, a6, w4a8,pt, w4,nu, w4,mse, w4,output_mse or float")
    if m.group(1):
        return pattern, None
    ov: dict[str, Any] = {}
    if m.group(2):
        ov["wbits"] = int(m.group(2))
    if m.group(3):
        ov["abits"] = int(m.group(3))
    if m.group(4):
        ov["weight_granularity"] = "per_channel" if m.group(4) == "pc" else "per_tensor"
    if m.group(5):
        ov["weight_quantizer"] = "nonuniform" if m.group(5) == "nu" else "uniform"
    if m.group(6):
        ov["weight_estimator"] = m.group(6)
    return pattern, ov


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--weights", metavar="PATH", help="weights file (state_dict .pt/.pth/.th or .safetensors)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=_pos_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_distill_args(p: argparse.ArgumentParser) -> None:
    from .config import (DEFAULT_COARSE_ITERS_LARGE, DEFAULT_DISTILL_ITERS, DEFAULT_DISTILL_ITERS_LARGE,
                         DEFAULT_FIRST_BN_WEIGHT_LARGE, DEFAULT_JITTER_FRACTION, RECOVER_DISTILL_INPUTS,
                         RECOVER_DISTILL_INPUTS_LARGE, DistillConfig)

    d = DistillConfig()
    g = p.add_argument_group("distilled data (ZeroQ)")
    g.add_argument("--distill-batches", type=_pos_int, default=None,
                   help=f"batches (default {d.num_batches}; with --recover, which learns from them: "
                        f"{RECOVER_DISTILL_INPUTS} inputs for inputs up to 128x128 pixels, "
                        f"{RECOVER_DISTILL_INPUTS_LARGE} for larger)")
    g.add_argument("--distill-batch-size", type=_pos_int, default=None,
                   help="images per batch (default 32 for inputs up to 128x128 pixels, 16 for larger)")
    g.add_argument("--distill-iters", type=_pos_int, default=d.iterations, metavar="N",
                   help=f"Adam steps per batch at full size (default {DEFAULT_DISTILL_ITERS} for inputs up to 128x128 "
                        f"pixels, {DEFAULT_DISTILL_ITERS_LARGE} for larger)")
    g.add_argument("--distill-lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--distill-schedule", choices=("constant", "cosine", "plateau"), default=d.schedule,
                   help=f"learning-rate schedule (default {d.schedule})")
    g.add_argument("--distill-input-weight", type=float, default=d.input_weight,
                   help=f"weight of the input-statistics term (default {d.input_weight})")
    g.add_argument("--distill-flip", action=argparse.BooleanOptionalAction, default=d.flip,
                   help="show the model a randomly mirrored view of the inputs at each step (DeepInversion; default "
                        "on; --no-distill-flip for models whose classes are not mirror-symmetric, e.g. digits or text)")
    g.add_argument("--distill-jitter", type=_nonneg_int, default=d.jitter, metavar="PIXELS",
                   help="show the model a view shifted by up to this many pixels at each step (default: "
                        f"{DEFAULT_JITTER_FRACTION:.3f} of the shorter input side, 30 at 224x224, 4 at 32x32; 0: off)")
    g.add_argument("--distill-coarse-iters", type=_nonneg_int, default=d.coarse_iterations, metavar="N",
                   help="first optimise N steps on inputs --distill-coarse-factor times smaller per side, then "
                        "upsample them (DeepInversion's multi-resolution start; default "
                        f"{DEFAULT_COARSE_ITERS_LARGE} for inputs larger than 128x128 pixels, else 0: off)")
    g.add_argument("--distill-coarse-factor", type=_pos_int, default=d.coarse_factor, metavar="K",
                   help=f"how many times smaller the coarse inputs are per side (default {d.coarse_factor})")
    g.add_argument("--distill-coarse-levels", type=_pos_int, default=d.coarse_levels, metavar="L",
                   help="a pyramid of L coarse phases, --distill-coarse-iters steps each, at 1/K^L ... 1/K of the size "
                        f"per side, smallest first (default {d.coarse_levels})")
    g.add_argument("--distill-first-bn-weight", type=float, default=d.first_bn_weight, metavar="W",
                   help="weight of the first BatchNorm layer's term in the statistics loss (DeepInversion's first-BN "
                        f"multiplier; 1: every layer weighs the same; default {DEFAULT_FIRST_BN_WEIGHT_LARGE:g} for "
                        "inputs larger than 128x128 pixels, else 1)")


def _distill_config(args: argparse.Namespace):
    from .config import DistillConfig

    batches = args.distill_batches if args.distill_batches is not None else DistillConfig().num_batches
    return DistillConfig(num_batches=batches, batch_size=args.distill_batch_size, iterations=args.distill_iters,
                         lr=args.distill_lr, schedule=args.distill_schedule, input_weight=args.distill_input_weight,
                         seed=args.seed, flip=args.distill_flip,
                         jitter=args.distill_jitter, coarse_iterations=args.distill_coarse_iters,
                         coarse_factor=args.distill_coarse_factor, coarse_levels=args.distill_coarse_levels,
                         first_bn_weight=args.distill_first_bn_weight)


def _recover_defaults(key: str) -> str:
    """Each recovery method's default for RecoverConfig field ``key``, read from zsq.recover (not repeated here),
    for a --recover-* flag's help: "adaround 32 (16 for inputs larger than 128x128 pixels), brecq ..."."""
    from .recover import METHODS, method_defaults

    def fmt(v: object) -> str:
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    parts = []
    for m in METHODS:
        small, large = method_defaults(m)[key], method_defaults(m, (224, 224))[key]  # CIFAR- / ImageNet-sized
        parts.append(f"{m} {fmt(small)}"
                     + (f" ({fmt(large)} for inputs larger than 128x128 pixels)" if large != small else ""))
    return ", ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    from .config import ACT_ESTIMATORS, BIAS_MODES, SYMMETRIC_WEIGHT_MIN_BITS, QuantConfig, WEIGHT_ESTIMATORS
    from .recover import SAMPLINGS

    qd = QuantConfig()
    parser = argparse.ArgumentParser(
        prog="zsq", description="Zero-shot (data-free) quantization of PyTorch models.",
        epilog="Example: zsq quantize efficientnet_lite0 --wbits 8 --abits 8 --eval IMAGES_DIR --out runs/lite0",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("layers", help="list the quantizable layers of a model in data-flow order (names for --override/--skip)")
    _add_model_args(p)

    p = sub.add_parser("quantize", help="zero-shot quantize a model (distil, fold BN, quantize, calibrate, evaluate)",
                       description="Quantize MODEL without real data and (optionally) measure what it kept.")
    _add_model_args(p)
    p.add_argument("--wbits", type=_bits, default=qd.wbits, help=f"weight bits 2-8 (default {qd.wbits})")
    p.add_argument("--abits", type=_bits, default=qd.abits, help=f"activation bits 2-8 (default {qd.abits})")
    p.add_argument("--weight-granularity", choices=("per_channel", "per_tensor", "hybrid"),
                   default=qd.weight_granularity,
                   help="weight scales per output channel (default), per tensor, or hybrid: per tensor where the "
                        "extra KL sensitivity on the calibration data is below --hybrid-threshold")
    p.add_argument("--hybrid-threshold", type=float, default=None, metavar="T",
                   help="KL (nats) below which a layer goes per-tensor (default: chosen on the calibration data)")
    p.add_argument("--hybrid-tolerance", type=float, default=None, metavar="F",
                   help="automatic threshold: allowed relative KL increase over all per-channel (default 0.05)")
    p.add_argument("--weight-quantizer", choices=("uniform", "nonuniform"), default="uniform",
                   help="uniform integer grid (default) or non-uniform codebook levels (not exportable to ONNX QDQ)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--weight-asymmetric", action="store_true",
                     help="asymmetric (uint, zero-point per channel) weights at every bit width")
    sym.add_argument("--weight-symmetric", action="store_true",
                     help="symmetric (signed int) weights at every bit width (the default without --recover; with "
                          f"--recover, weights below {SYMMETRIC_WEIGHT_MIN_BITS} bits are asymmetric unless this is "
                          "given)")
    p.add_argument("--weight-estimator", choices=WEIGHT_ESTIMATORS, default=qd.weight_estimator,
                   help=f"weight range (default {qd.weight_estimator}); output_mse fits depthwise convs to the "
                        "calibration inputs and uses mse for the other layers")
    p.add_argument("--depthwise-weight-estimator", choices=WEIGHT_ESTIMATORS, default=None,
                   help="weight range of the depthwise convs only (default: output_mse with --recover, chosen on "
                        "held-apart real images in session 22; else --weight-estimator's)")
    p.add_argument("--act-estimator", choices=ACT_ESTIMATORS, default=None,
                   help=f"activation range estimator (default {qd.act_estimator}; with --recover and no "
                        "--act-estimator, recovery starts from percentile ranges, the start its recipes were "
                        "chosen from)")
    p.add_argument("--act-percentile", type=float, default=qd.act_percentile, help=f"for --act-estimator percentile (default {qd.act_percentile})")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=SPEC",
                   help="per-layer setting, e.g. '@first=w8a8', '@last=w8', 're:.*depthwise.*=w8', 'conv1=float'; "
                        "also ',pt'/',pc' granularity, ',nu' codebook weights, ',mse'/',output_mse'/',minmax' weight range (repeatable)")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="keep matching layers in float (repeatable; must match)")
    p.add_argument("--calib", default="distilled", metavar="SOURCE",
                   help="calibration data: distilled (default), retro (Retro-Synthesis: class-conditional, works "
                        "without BN; uses the --distill-* settings), gaussian, a PATH to real images / saved tensors, "
                        "proxy:A,B,... (ZeroP: the candidate closest to the BN statistics; see `zsq proxy rank`) or "
                        "proxy+distilled:A,B,... (half proxy, half distilled)")
    p.add_argument("--calib-size", type=_pos_int, default=None, help="images for gaussian/real calibration")
    p.add_argument("--eval", metavar="PATH", help="labelled eval set: .npz, folder with labels.csv, or ImageFolder")
    p.add_argument("--eval-split", default=None, help="for .npz: image array to use (e.g. exact_images_prefix)")
    p.add_argument("--eval-limit", type=_pos_int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default runs/<model>-w<W>a<A>)")
    p.add_argument("--export", choices=("onnx",), default=None,
                   help="also export: onnx writes model.int8.onnx (QDQ) and model.fp32.onnx into --out")
    p.add_argument("--export-weight-type", choices=("auto", "int8", "uint8"), default="auto",
                   help="ONNX weight integer type (default auto: exact on every CPU; see `zsq export --help`)")
    p.add_argument("--bias-correction", choices=BIAS_MODES, default="auto",
                   help="after calibration, cancel each layer's mean output error through its bias: weight (the "
                        "layer's own weight error), output (match the FP32 layer's output mean), off, or auto "
                        "(default: the one with the lowest KL to FP32 on held-apart halves of the calibration data)")
    g = p.add_argument_group("low-bit recovery on the calibration data")
    g.add_argument("--recover", choices=("adaround", "brecq", "finetune"), default=None,
                   help="after calibration: AdaRound learned rounding, BRECQ block reconstruction, or fine-tuning "
                        "(KL to the FP32 model, blocks unfrozen in HAWQ order)")
    g.add_argument("--recover-iters", type=_pos_int, default=None,
                   help="steps per layer (adaround) / per block (brecq) / in total (finetune); default "
                        + _recover_defaults("iters"))
    g.add_argument("--recover-batch-size", type=_pos_int, default=None,
                   help="inputs per step; default " + _recover_defaults("batch_size"))
    g.add_argument("--recover-lr", type=_pos_float, default=None, metavar="LR",
                   help="Adam learning rate of the rounding variables (adaround, brecq) or of the weights "
                        "(finetune); default " + _recover_defaults("lr"))
    g.add_argument("--recover-drop-prob", type=float, default=None, metavar="P",
                   help="QDrop: probability of leaving an activation unquantized while reconstructing, in [0, 1) "
                        "(default 0.5 for brecq, 0 for adaround/finetune)")
    g.add_argument("--recover-input-drop", type=float, default=None, metavar="P",
                   help="brecq: QDrop's input mixing, the probability that an element of a block's input comes from "
                        "the float model instead of the quantized model while reconstructing, in [0, 1) "
                        "(default: see docs/recovery.md)")
    g.add_argument("--recover-fisher", type=float, default=None, metavar="MIX",
                   help="brecq: weigh each block's output error by the float model's Fisher information, mixed "
                        "with the plain squared error as (1 - MIX) + MIX * Fisher, MIX in [0, 1] (default 0: plain)")
    g.add_argument("--recover-mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="also learn from the mirror image of every calibration input (default: on for brecq on "
                        "inputs larger than 128x128 pixels, else off; off with --no-distill-flip)")
    g.add_argument("--recover-shifts", type=_nonneg_int, default=None, metavar="N",
                   help="also learn from N circularly shifted copies of the calibration inputs (and of their mirror "
                        "images), each image rolled by its own random offset of up to --distill-jitter pixels "
                        "(default 0: measured, not better on held-apart real images; docs/recovery.md)")
    g.add_argument("--recover-crops", type=_nonneg_int, default=None, metavar="N",
                   help="also learn from N zoomed copies of the calibration inputs (and of their mirror images and "
                        "shifted copies): random crops of at least a quarter of each image, resized back "
                        "(default: see docs/recovery.md)")
    g.add_argument("--recover-anchor", type=float, default=None, metavar="A",
                   help="adaround/brecq: pull every learned rounding towards the float weight, nearest rounding "
                        "costing A times the unit's loss with nearest rounding, A >= 0 (default "
                        + _recover_defaults("anchor") + "; docs/recovery.md)")
    g.add_argument("--recover-harden", type=float, default=None, metavar="F",
                   help="adaround/brecq: over the last F of each unit's steps, fix its roundings one share at a time, "
                        "the most decided first, so the rounding kept is the one the last steps optimised, "
                        "0 <= F < 1 (default " + _recover_defaults("harden") + "; docs/recovery.md)")
    g.add_argument("--recover-harden-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="adaround/brecq with hardening: keep, per unit, the rounding of the soft variables as they "
                        "stood when hardening began if the hardened one has the higher error on the learning inputs "
                        "(default: see docs/recovery.md)")
    g.add_argument("--recover-harden-average", type=float, default=None, metavar="D",
                   help="adaround/brecq with hardening: rank and fix roundings by a moving average of their variables "
                        "(decay D, 0 <= D < 1) instead of their value after the last mini-batch (default "
                        + _recover_defaults("harden_average") + "; docs/recovery.md)")
    g.add_argument("--recover-sampling", choices=SAMPLINGS, default=None,
                   help="mini-batches of the learning inputs: 'random' (drawn anew each step) or 'epochs' (shuffled "
                        "passes, every input seen equally often) (default " + _recover_defaults("sampling") + ")")
    g.add_argument("--recover-refine", action=argparse.BooleanOptionalAction, default=None,
                   help="brecq: after each block's reconstruction, improve its last layer's rounding by greedy "
                        "flips on the block's exact output error (default: on for inputs larger than 128x128 pixels, "
                        "off for smaller; docs/recovery.md)")
    g.add_argument("--recover-channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="reconstruct on image batches laid out channels-last (NHWC): the same values up to float "
                        "rounding and about 10 %% faster on CPU, but not the layout the recipe was chosen in "
                        "(default off; docs/recovery.md, session 31)")
    g.add_argument("--recover-polish", type=_nonneg_int, default=None, metavar="N",
                   help="after recovery, N steps tuning only the quantized layers' biases on the network's output "
                        "KL to the float model over the learning inputs (default 0: off; docs/recovery.md)")
    g.add_argument("--recover-revert-worse", action=argparse.BooleanOptionalAction, default=None,
                   help="brecq: put a block back as it was when reconstruction raised its error on the learning "
                        "inputs (default: see docs/recovery.md)")
    _add_distill_args(p)
    from .sensitivity.commands import add_mixed_precision_args

    add_mixed_precision_args(p)
    _add_common(p)

    p = sub.add_parser("distill", help="generate ZeroQ distilled data and save tensors + a PNG grid")
    _add_model_args(p)
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    _add_distill_args(p)
    _add_common(p)

    p = sub.add_parser("eval", help="top-1/top-5 of a model, or of a quantized checkpoint against its FP32 model")
    p.add_argument("target", metavar="MODEL_OR_CHECKPOINT", help=MODEL_HELP + ", or a directory written by `zsq quantize`")
    p.add_argument("data", metavar="DATA", help="labelled eval set: .npz, folder with labels.csv, or ImageFolder")
    p.add_argument("--weights", metavar="PATH", help="weights of MODEL (or of the FP32 reference of a checkpoint)")
    p.add_argument("--split", default=None, help="for .npz: image array to use (e.g. exact_images_prefix)")
    p.add_argument("--limit", type=_pos_int, default=None, help="only the first N images")
    p.add_argument("--batch-size", type=_pos_int, default=100)
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    p.add_argument("--integer", action="store_true",
                   help="evaluate a checkpoint with the integer arithmetic of its exported int8 ONNX graph "
                        "(ONNX Runtime's results, code for code; about 2x slower than the default float "
                        "fake quantization, which can differ on near-tied images)")
    _add_common(p)

    # Commands of later stages (export, sensitivity, ...) live next to their stage: each such module
    # defines add_commands(sub, common) -> {name: handler(args) -> int}.
    for mod_name in dict.fromkeys(PLUGIN_MODULES):  # de-duplicated, order kept
        mod = importlib.import_module(mod_name)
        COMMANDS.update(mod.add_commands(sub, _add_common))
    return parser


def _setup(args: argparse.Namespace) -> None:
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (``None``: unchanged) for the command, restored afterwards, so
    that :func:`main` called from Python (or from the tests) leaves the process as it found it."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    specs = list_models()
    if args.json:
        print(json.dumps([{"name": s.name, "num_classes": s.num_classes, "dataset": s.dataset,
                           "input_size": list(s.preprocessing.input_size), "description": s.description}
                          for s in specs], indent=2))
        return 0
    width = max(len(s.name) for s in specs)
    for s in specs:
        h, w = s.preprocessing.input_size
        print(f"{s.name:<{width}}  {s.dataset:<9} {s.num_classes:>5} classes  {h}x{w}  {s.description}")
    print("\nAlso: torchvision:NAME (needs torchvision) and package.module:factory --weights FILE")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from .fold import fold_batchnorm
    from .models import load_model
    from .quant.apply import quantizable_nodes

    model, _ = load_model(args.model, weights=args.weights, pretrained=args.weights is not None)
    folded, report = fold_batchnorm(model)
    for i, (node, mod) in enumerate(quantizable_nodes(folded)):
        tag = " (@first)" if i == 0 else ""
        print(f"{node.target}\t{type(mod).__name__}\t{tuple(mod.weight.shape)}{tag}")
    print(f"# {report}", file=sys.stderr)
    return 0


def _weight_symmetric(args: argparse.Namespace) -> bool | None:
    """QuantConfig.weight_symmetric from the flags: forced either way, else by bit width when recovering (the
    recovery recipe's scheme, chosen on held-apart real images) and symmetric otherwise."""
    if args.weight_asymmetric:
        return False
    if args.weight_symmetric:
        return True
    return None if args.recover is not None else True


def _depthwise_weight_estimator(args: argparse.Namespace) -> str | None:
    """QuantConfig.depthwise_weight_estimator from the flags: as given, else the recovery recipe's choice when
    recovering, else None (the layers follow --weight-estimator)."""
    if args.depthwise_weight_estimator is not None:
        return args.depthwise_weight_estimator
    if args.recover is None:
        return None
    from .recover import RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR  # output-aware ranges (docs/recovery.md)

    return RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR


def cmd_quantize(args: argparse.Namespace) -> int:
    from .bias_correction import BiasCorrectionReport
    from .config import QuantConfig
    from .pipeline import RunConfig, run

    overrides = dict(parse_override(o) for o in args.override)
    hybrid = args.weight_granularity == "hybrid"
    if not hybrid and (args.hybrid_threshold is not None or args.hybrid_tolerance is not None):
        raise ConfigError("--hybrid-threshold / --hybrid-tolerance need --weight-granularity hybrid")
    qcfg = QuantConfig(
        wbits=args.wbits, abits=args.abits, weight_quantizer=args.weight_quantizer,
        weight_granularity="per_channel" if hybrid else args.weight_granularity,
        weight_symmetric=_weight_symmetric(args), weight_estimator=args.weight_estimator,
        depthwise_weight_estimator=_depthwise_weight_estimator(args),
        act_estimator=args.act_estimator or QuantConfig().act_estimator, act_percentile=args.act_percentile, overrides=overrides,
        skip=tuple(args.skip),
    )
    from .pipeline import check_calib_source

    calib = args.calib
    check_calib_source(calib)  # before the model loads
    if args.export and args.weight_quantizer == "nonuniform":
        raise ConfigError("--export onnx cannot express non-uniform (codebook) weights in QDQ; use "
                          "--weight-quantizer uniform to export")
    from .sensitivity.commands import mixed_precision_from_args

    mp_cfg, bit_plan = mixed_precision_from_args(args)
    rcfg = None
    if args.recover is not None:
        from .recover import RecoverConfig

        rcfg = RecoverConfig(method=args.recover, iters=args.recover_iters,
                             **({"batch_size": args.recover_batch_size} if args.recover_batch_size else {}),
                             lr=args.recover_lr, drop_prob=args.recover_drop_prob, seed=args.seed,
                             fisher=args.recover_fisher, input_drop=args.recover_input_drop,
                             # a model whose classes are not mirror-symmetric (--no-distill-flip) learns no mirror
                             mirror=False if args.recover_mirror is None and not args.distill_flip
                             else args.recover_mirror,
                             # the shifts are the views distillation's jitter showed the model
                             shifts=args.recover_shifts, shift_pixels=args.distill_jitter or None,
                             crops=args.recover_crops, revert_worse=args.recover_revert_worse,
                             anchor=args.recover_anchor, harden=args.recover_harden,
                             harden_fallback=args.recover_harden_fallback,
                             harden_average=args.recover_harden_average, sampling=args.recover_sampling,
                             refine=args.recover_refine,
                             polish=args.recover_polish,
                             **({"channels_last": args.recover_channels_last}
                                if args.recover_channels_last is not None else {}),
                             # an explicit --act-estimator is kept through recovery
                             **({"act_estimator": None} if args.act_estimator is not None else {}))
    elif given := [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                   if k.startswith("recover_") and v is not None]:  # every --recover-* option defaults to None
        raise ConfigError(f"{' / '.join(given)} {'needs' if len(given) == 1 else 'need'} "
                          "--recover adaround|brecq|finetune")
    cfg = RunConfig(model=args.model, weights=args.weights, quant=qcfg, distill=_distill_config(args), calib=calib,
                    calib_size=args.calib_size, eval=args.eval, eval_split=args.eval_split,
                    eval_limit=args.eval_limit, device=args.device, seed=args.seed, mixed_precision=mp_cfg,
                    bit_plan=bit_plan, export=args.export, export_weight_type=args.export_weight_type,
                    hybrid=hybrid, hybrid_threshold=args.hybrid_threshold, hybrid_tolerance=args.hybrid_tolerance,
                    recover=rcfg, bias_correction=args.bias_correction,
                    recover_distill_default=rcfg is not None and args.distill_batches is None)
    safe = re.sub(r"[^0-9A-Za-z_.-]", "_", args.model)
    wtag = "mp" + str(mp_cfg.target_size or mp_cfg.bops).replace(" ", "") if mp_cfg else f"w{args.wbits}"
    out = Path(args.out or f"runs/{safe}-{wtag}a{args.abits}")
    res = run(cfg, out_dir=out, progress=not args.quiet)
    r = res.report
    t = r["timings_s"]
    print(f"{r['quantizers']['num_weight_quantizers']} weight / {r['quantizers']['num_act_quantizers']} activation "
          f"quantizers; folded {len(r['fold']['folded'])} BN; size {r['size_bytes']['fp32'] / 1e6:.2f} MB -> "
          f"{r['size_bytes']['quantized'] / 1e6:.2f} MB")
    label = f"W{args.wbits}A{args.abits}"
    if r.get("bit_plan"):  # per-layer weight bits from a plan file: --wbits is not what ran
        layers = [lay for lay in r["quantizers"].get("layers", []) if lay.get("wbits") and lay.get("params")]
        params = sum(lay["params"] for lay in layers)
        avg = sum(lay["wbits"] * lay["params"] for lay in layers) / params if params else 0.0
        label = f"plan W{avg:.2f}/A{args.abits}" if params else f"plan/A{args.abits}"
    if "mixed_precision" in r:
        plan = r["mixed_precision"]["plan"]
        label = f"MP{plan.get('average_bits', 0):.2f}/A{args.abits}"
        print(f"mixed precision ({r['mixed_precision']['settings']['method']}): {plan.get('average_bits', 0):.3f} "
              f"bits/weight, layers per width {plan.get('metadata', {}).get('counts')}; "
              f"sensitivity {r['timings_s'].get('mixed_precision', 0):.1f}s")
    if "quantized" in r:
        print(f"top-1 FP32 {r['fp32']['top1']:.2f}  {label} {r['quantized']['top1']:.2f}  "
              f"(drop {r['fp32']['top1'] - r['quantized']['top1']:+.2f})  agreement {r['agreement']:.2f}%  "
              f"KL {r['kl']:.4f}  on {r['eval']['num_images']} images")
    bc = BiasCorrectionReport.from_dict(r["bias_correction"])
    if bc.mode != "off" or bc.requested == "auto":
        print(bc)
    if "recover" in t:
        from .recover import rounding_summary

        rec = r["recover"]
        print(f"recovery ({args.recover}): {t['recover']:.1f}s, "
              f"{rounding_summary(rec['changed_codes'], rec['undecided'])}")
    print(f"time: distill {t['distill']:.1f}s  calibrate {t['calibrate']:.1f}s  evaluate {t['evaluate']:.1f}s  "
          f"total {t['total']:.1f}s")
    files = "quantized.safetensors, zsq_config.json, bit_plan.json, report.json, images"
    if "mixed_precision" in r:
        files += ", sensitivity.json, sensitivity.png, pareto.png"
    if "export" in r:
        ex = r["export"]["int8"]
        files += ", model.int8.onnx, model.fp32.onnx"
        ort = ex.get("ort") or {}
        if ort:
            print(f"ONNX export: {ort['int8_convs']} int8 / {ort['float_convs']} float convs after ONNX Runtime's "
                  f"optimisations; {ex['file_bytes'] / 1e6:.2f} MB (true low-bit {ex['lowbit_file_bytes'] / 1e6:.2f} MB)")
        if r["export"].get("advice"):
            print(f"speed on this CPU: {r['export']['advice']}")
    print(f"wrote {out}/ ({files})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .distill import distill, save_image_grid
    from .models import load_model

    model, spec = load_model(args.model, weights=args.weights)
    from .pipeline import check_device

    check_device(args.device)
    res = distill(model, spec.preprocessing, _distill_config(args), device=args.device, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"images": res.inputs.contiguous()}, str(out / "distilled.safetensors"))
    save_image_grid(res.inputs, spec.preprocessing, out / "distilled_images.png")
    (out / "distill.json").write_text(json.dumps({"model": args.model, **res.to_dict(),
                                                  "config": _distill_config(args).to_dict()}, indent=2))
    print(f"distilled {res.inputs.shape[0]} inputs {tuple(res.inputs.shape[1:])} in {res.seconds:.1f}s, "
          f"BN loss {res.initial_losses[0]:.3f} -> {res.losses[0]:.4f}; wrote {out}/distilled.safetensors "
          "(use with --calib) and distilled_images.png")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_quantized
    from .data import check_labels, load_dataset
    from .evaluate import compare, evaluate
    from .models import load_model

    target = Path(args.target)
    if not target.is_dir() and ":" not in args.target and ("/" in args.target or os.sep in args.target
                                                           or target.exists()):
        # a path, not a model name: say what is wrong with it rather than "unknown model"
        what = "is a file" if target.exists() else "does not exist"
        raise ConfigError(f"{args.target} {what}; expected a checkpoint directory written by `zsq quantize --out DIR` "
                          "or a model name (see `zsq models`)")
    if target.is_dir():
        qmodel, spec, meta = load_quantized(target)
        ds = load_dataset(args.data, spec.preprocessing, limit=args.limit, split=args.split)
        check_labels(ds, spec.num_classes)
        weights = args.weights or meta.get("weights")
        fp32, _ = load_model(meta["model"], weights=weights)
        if args.integer:
            from .export import IntegerModel

            if args.device is not None and not str(args.device).startswith("cpu"):
                raise ConfigError(f"--integer runs on the CPU (exact integer arithmetic); drop --device {args.device}")
            qmodel = IntegerModel(qmodel)
        res = compare(fp32, qmodel, ds, batch_size=args.batch_size, device=args.device, progress=not args.quiet)
        res["arithmetic"] = "integer" if args.integer else "float"
        how = " (integer arithmetic of the int8 ONNX graph)" if args.integer else ""
        print(f"{meta['model']} on {res['n']} images: FP32 top-1 {res['fp32']['top1']:.2f}, quantized{how} top-1 "
              f"{res['quantized']['top1']:.2f}, agreement {res['agreement']:.2f}%, KL {res['kl']:.4f}")
    else:
        if args.integer:
            raise ConfigError(f"--integer evaluates a quantized checkpoint; {args.target!r} is a model, not a "
                              "directory written by `zsq quantize`")
        model, spec = load_model(args.target, weights=args.weights)
        ds = load_dataset(args.data, spec.preprocessing, limit=args.limit, split=args.split)
        check_labels(ds, spec.num_classes)
        r = evaluate(model, ds, batch_size=args.batch_size, device=args.device, progress=not args.quiet)
        res = r.to_dict()
        res.pop("predictions", None)
        top5 = f", top-5 {r.top5:.2f}" if r.top5 is not None else ""
        print(f"{args.target} on {r.n} images: top-1 {r.top1:.2f}{top5}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


PLUGIN_MODULES: list[str] = ["zsq.export.commands", "zsq.sensitivity.commands", "zsq.proxy.commands"]

COMMANDS = {"models": cmd_models, "layers": cmd_layers, "quantize": cmd_quantize, "distill": cmd_distill,
            "eval": cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup(args)
    try:
        with _torch_threads(getattr(args, "threads", None)):
            return COMMANDS[args.command](args)
    except ZsqError as exc:
        print(f"zsq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zsq: interrupted", file=sys.stderr)
        return 130


# Process environment that makes PyTorch much faster on small shared CPUs (measured on the 2-core
# development machine, see BENCHMARKS.md "Runtime environment"):
# * glibc returns every large allocation to the OS and page-faults it back on the next one; with
#   the activation tensors of a CNN that made inference 2-4x slower (EfficientNet-Lite0 at batch 100:
#   12 -> 51 images/s). The thresholds keep freed memory in the process.
# * OpenMP's default spin-waiting burns the cores other processes need; with other processes busy it
#   made ResNet-20 inference 2.5-6x slower than OMP_WAIT_POLICY=PASSIVE.
# They must be set before the process starts, hence the re-exec. Values the user set are kept.
RUNTIME_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
               "OMP_WAIT_POLICY": "PASSIVE"}


def entry() -> None:  # pragma: no cover - console-script wrapper
    """Console entry point: set the allocator environment (re-exec once), then run :func:`main`."""
    if sys.platform.startswith("linux") and os.environ.get("ZSQ_NO_REEXEC") != "1" and any(
        k not in os.environ for k in RUNTIME_ENV
    ):
        env = {**os.environ, **{k: v for k, v in RUNTIME_ENV.items() if k not in os.environ}, "ZSQ_NO_REEXEC": "1"}
        try:
            os.execve(sys.executable, [sys.executable, "-m", "zsq.cli", *sys.argv[1:]], env)
        except OSError:
            pass
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
