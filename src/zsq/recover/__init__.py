"""Low-bit recovery on distilled data: learn what plain post-training quantization leaves on the table.

One verb, :func:`recover`, with three methods behind a registry (see ``docs/recovery.md``):

* ``adaround`` — learned rounding (AdaRound), layer by layer (:mod:`zsq.recover.adaround`);
* ``brecq`` — block reconstruction: the roundings of a whole block, plus LSQ activation step sizes,
  learned jointly on the block's output (:mod:`zsq.recover.brecq`);
* ``finetune`` — quantization-aware fine-tuning with a KL loss to the float model, blocks unfrozen in
  HAWQ order (:mod:`zsq.recover.finetune`).

Usage (after :func:`zsq.calibrate`, before evaluation, saving or export)::

    qmodel = zsq.quantize(folded, QuantConfig(wbits=4, abits=4, overrides={"@first": ..., "@last": ...}))
    zsq.calibrate(qmodel, data)
    report = recover(qmodel, fp32_model, data, RecoverConfig(method="brecq"))

The result is an ordinary zsq quantized model: learned roundings are written into the float weights so
that each layer's own nearest-rounding weight quantizer reproduces the learned integer codes exactly,
and learned step sizes into the activation quantizers' ``scale`` buffers; checkpoints
(:func:`zsq.checkpoint.save_quantized`) and ONNX export work unchanged. The model's train/eval modes and
``requires_grad`` flags are restored afterwards, and on an exception its weights and scales too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from ..config import ACT_ESTIMATORS, _JsonMixin, default_jitter, is_large_input
from ..errors import ConfigError, NotCalibratedError
from ..graph import is_depthwise_conv
from ..quant import primitives as P
from ..quant.apply import output_mse_applies, weight_layers
from ..quant.modules import QUANT_LAYER_TYPES, ActQuantizer, WeightQuantizer
from ..metrics import kl_divergence
from ..state import frozen_eval, full_fp32
from .blocks import SAMPLINGS, SequentialResult, Unit, UnitRunner, find_units, float_weights, no_act

log = logging.getLogger(__name__)

__all__ = ["METHODS", "RecoverConfig", "RecoverReport", "UnitReport", "recover", "register_method", "find_units",
           "method_defaults", "shifted_views", "zoomed_views", "RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR"]

# The weight range estimator of depthwise convs that the recovery recipe starts from
# (QuantConfig.depthwise_weight_estimator; ``zsq quantize --recover`` uses it unless told otherwise): on
# EfficientNet-Lite0 W4A8 + BRECQ it lowered the KL to FP32 on held-apart real images on 3 of 3 seeds
# (docs/recovery.md, "Output-aware depthwise ranges"). Models without depthwise convs are unaffected.
RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR = "output_mse"

# method -> "module:function"; the function takes a RecoverContext and returns a list of UnitReport.
_METHODS: dict[str, str] = {
    "adaround": "zsq.recover.adaround:run",
    "brecq": "zsq.recover.brecq:run",
    "finetune": "zsq.recover.finetune:run",
}
METHODS = tuple(_METHODS)

# Defaults filled in for fields left at None (see RecoverConfig). iters: per layer (adaround), per unit
# (brecq), in total (finetune). Chosen on held-apart distilled data (docs/recovery.md).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "adaround": {"iters": 200, "batch_size": 32, "lr": 3e-2, "act_lr": 1e-2, "learn_act_scale": False,
                 "drop_prob": 0.0, "learn_weight_scale": False, "learn_bias": False, "mirror": False, "shifts": 0,
                 "input_drop": 0.0, "crops": 0, "revert_worse": False, "anchor": 0.0,
                 "harden": 0.0, "harden_fallback": False, "harden_average": 0.0, "sampling": "random",
                 "refine": False, "polish": 0},
    "brecq": {"iters": 300, "batch_size": 32, "lr": 1e-2, "act_lr": 1e-2, "learn_act_scale": True,
              "drop_prob": 0.5, "learn_weight_scale": False, "learn_bias": False, "fisher": 0.0, "mirror": False,
              "shifts": 0, "input_drop": 0.0, "crops": 0, "revert_worse": False, "anchor": 0.0,
              "harden": 0.0, "harden_fallback": False, "harden_average": 0.0, "sampling": "random",
              "refine": False, "polish": 0},
    "finetune": {"iters": 600, "batch_size": 32, "lr": 1e-4, "act_lr": 1e-2, "learn_act_scale": True,
                 "drop_prob": 0.0, "learn_weight_scale": False, "learn_bias": False, "mirror": False, "shifts": 0,
                 "input_drop": 0.0, "crops": 0, "revert_worse": False, "anchor": 0.0,
                 "harden": 0.0, "harden_fallback": False, "harden_average": 0.0, "sampling": "random",
                 "refine": False, "polish": 0},
}
# For ImageNet-sized inputs (above LARGE_INPUT_PIXELS) one step costs ~50x a CIFAR step: smaller batches (and,
# for adaround / finetune, fewer steps) keep EfficientNet-Lite0 within ~30 minutes on 2 CPU cores. BRECQ got
# 300 steps per block in session 12 (was 150): real held-apart KL 0.403 -> 0.342 on Lite0 W4A8, 3 of 3 seeds
# (BENCHMARKS.md, "BRECQ steps on ImageNet-sized inputs"). Its 64 inputs' mirror images joined them in session
# 14: real held-apart KL 0.255 -> 0.235, 3 of 3 seeds; ResNet-20 W4A4 went the other way (0.284 -> 0.295 over
# 5 seeds), so CIFAR-sized inputs keep mirror off (BENCHMARKS.md, "Asymmetric low-bit weights and mirror images").
# BRECQ's rounding variables learn at 1e-1 since session 15: at 1e-2 Adam moves each V by at most ~2.4 in the
# 240 regularised steps, so 40-65 % of Lite0's roundings were still undecided at the end; real held-apart KL
# 0.235 -> 0.161, 3 of 3 seeds (BENCHMARKS.md, "Rounding learning rate"). Since session 24 it takes fewer, larger
# steps, 200 at batch 24 (was 300 at 16; the same number of samples): with output_mse depthwise ranges, real
# held-apart KL 0.171 -> 0.143 on the mean, 3 of 3 seeds (BENCHMARKS.md, "Fewer, larger BRECQ steps"). Since
# session 26 it fixes its roundings progressively over the last 30 % of each block's steps (harden): 200 steps left
# up to 55 % of an early block's roundings undecided, and rounding them at the end lost most of the fit; real
# held-apart KL 0.143 -> 0.128 on the mean, 3 of 3 seeds (BENCHMARKS.md, "Progressive hardening"). Since session
# 33 it refines each block's last layer after reconstruction (refine): the CLI models of 3 seeds, paired on the same
# distilled inputs, had real held-apart KL 0.168 -> 0.111 on the mean, 3 of 3 seeds (BENCHMARKS.md, "Refinement end
# to end on 3 seeds").
_DEFAULTS_LARGE: dict[str, dict[str, Any]] = {
    "adaround": {"iters": 100, "batch_size": 16},
    "brecq": {"iters": 200, "batch_size": 24, "mirror": True, "lr": 1e-1, "harden": 0.3, "refine": True},
    "finetune": {"iters": 200, "batch_size": 16},
}
UNFREEZE = ("hawq", "all")
ANCHOR_WEIGHTINGS = ("uniform", "inputs")


def register_method(name: str, target: str) -> None:
    """Add (or replace) a recovery method: ``target`` is ``"package.module:function"`` taking a
    :class:`RecoverContext` and returning a list of :class:`UnitReport`."""
    global METHODS
    if not isinstance(name, str) or not name:
        raise ConfigError(f"method name must be a non-empty string, got {name!r}")
    if ":" not in target:
        raise ConfigError(f"method target must look like 'package.module:function', got {target!r}")
    _METHODS[name] = target
    _DEFAULTS.setdefault(name, dict(_DEFAULTS["brecq"]))
    # brecq's settings, less the ones only brecq implements (a new method would refuse them)
    _DEFAULTS_LARGE.setdefault(name, {**_DEFAULTS_LARGE["brecq"], "refine": False})
    METHODS = tuple(_METHODS)


def _layout(x: torch.Tensor, cfg: "RecoverConfig") -> torch.Tensor:
    """Image batches channels-last under ``cfg.channels_last`` (every cached unit input and output then follows)."""
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.dim() == 4 else x


def method_defaults(method: str, input_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The values :class:`RecoverConfig` uses for ``method`` where a field is left at ``None`` (for inputs of
    ``input_size`` (H, W): ImageNet-sized inputs get smaller batches and fewer steps)."""
    if method not in _METHODS:
        raise ConfigError(f"recovery method {method!r} is not one of {', '.join(_METHODS)}")
    out = dict(_DEFAULTS[method])
    if input_size is not None and is_large_input(input_size):
        out.update(_DEFAULTS_LARGE[method])
    return out


def _pos_int(v: Any, what: str, *, allow_zero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise ConfigError(f"RecoverConfig.{what} must be a {'non-negative' if allow_zero else 'positive'} integer, "
                          f"got {v!r}")


def _pos_float(v: Any, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v) > 0:
        raise ConfigError(f"RecoverConfig.{what} must be a number > 0, got {v!r}")


def _in_range(v: Any, what: str, lo: float, hi: float, *, bounds: str, words: str = "") -> None:
    """``v`` a number between ``lo`` and ``hi``; ``bounds`` is ``"[)"``, ``"[]"`` or ``"(]"``."""
    ok = (not isinstance(v, bool) and isinstance(v, (int, float))
          and (lo <= float(v) if bounds[0] == "[" else lo < float(v))
          and (float(v) <= hi if bounds[1] == "]" else float(v) < hi))
    if not ok:
        raise ConfigError(f"RecoverConfig.{what} must be {words}in {bounds[0]}{lo:g}, {hi:g}{bounds[1]}, got {v!r}")


def _opt_bool(v: Any, what: str, *, note: str = "") -> None:
    if v is not None and not isinstance(v, bool):
        raise ConfigError(f"RecoverConfig.{what} must be True, False or None{note}, got {v!r}")


@dataclass(frozen=True)
class RecoverConfig(_JsonMixin):
    """Settings of :func:`recover`. Fields left at ``None`` take the method's default (:func:`method_defaults`).

    ``iters``: optimisation steps per layer (adaround), per block (brecq) or in total (finetune);
    ``batch_size``: inputs per step; ``lr``: Adam learning rate of the rounding variables (adaround,
    brecq) or of the weights (finetune); ``act_lr``: Adam learning rate of the log step sizes (relative
    change per step); ``learn_act_scale``: learn activation step sizes (LSQ; brecq, finetune);
    ``drop_prob``: QDrop probability of leaving an activation element unquantized while reconstructing a
    block (0 = off; brecq's default is 0.5); ``learn_weight_scale``: also learn each layer's weight scale
    (per channel, ``s0 * exp(u)``, Adam at ``weight_scale_lr`` with a cosine decay) while the codes stay
    ``floor(W / s0) + h`` (adaround, brecq); ``learn_bias``: also train the biases of each block's layers
    (brecq; Adam at ``bias_lr``, cosine decay); ``reg_weight``, ``beta_start``, ``beta_end``, ``warmup``: AdaRound regulariser weight,
    annealed exponent, and the fraction of steps before it starts; ``temperature``: of the finetune KL;
    ``unfreeze``: ``"hawq"`` (units unfrozen one per stage, most Hessian-sensitive first) or ``"all"``;
    ``hessian_iterations``: Hutchinson rounds for the HAWQ order; ``eval_batch_size``: batch of the
    no-gradient passes that cache block inputs and targets; ``seed``: mini-batch sampling (and QDrop);
    ``act_estimator``: the activation ranges reconstruction starts from. :func:`recover` recalibrates every
    activation quantizer on its inputs with this estimator first (``None``: keep the model's ranges). The
    default recipes were chosen from percentile ranges, and from zsq's default ``mse`` ranges BRECQ ended
    worse on held-apart distilled data (ResNet-20, first/last 8-bit: W4A8 KL 0.093 against 0.053, W4A4
    0.497 against 0.365), so the default is ``"percentile"`` (at the model's ``act_percentile``).
    ``fisher`` (brecq): weigh each element of a block's output error by the diagonal Fisher information of
    the float model's output distribution with respect to it (BRECQ's output-sensitivity weighting; labels
    drawn from the float model's softmax, ``fisher_samples`` draws per input), mixed with the plain squared
    error as ``(1 - fisher) + fisher * F / mean(F)``; 0 (the default) is plain squared error.
    ``mirror``: also learn from the horizontal mirror image of every calibration input (twice the inputs at
    no synthesis cost; for image batches (N, C, H, W) of models whose classes are mirror-symmetric, like the
    distillation views of ``DistillConfig.flip``). It applies to the activation recalibration and to every
    step; the default is on for brecq on ImageNet-sized inputs (chosen on held-apart real images: better
    on EfficientNet-Lite0, not on ResNet-20, docs/recovery.md), off otherwise, and off for inputs that are
    not image batches unless set explicitly (which then raises).
    ``shifts``: also learn from this many circularly shifted copies of the calibration inputs (after their
    mirror images), every image rolled by its own random offset of at most ``shift_pixels`` each way
    (``None``: distillation's default jitter for the input size, 30 at 224x224), the views distillation's
    jitter showed the model; for image batches only. Default 0: on EfficientNet-Lite0 W4A8 one copy lowered
    the held-apart *distilled* KL on 3 of 3 seeds but the real one on 2 of 3, with lower top-1
    (docs/recovery.md, "Shifted copies and a stronger rounding regulariser").
    ``crops``: also learn from this many zoomed copies of the calibration inputs (after their mirror images and
    shifted copies): every image a random crop of at least ``crop_min_area`` of its area, resized back to full
    size (:func:`zoomed_views`); for image batches only.
    ``revert_worse`` (brecq): put a block back as it was before its reconstruction when its error on the
    learning inputs ended higher than it started.
    ``input_drop`` (brecq): QDrop's mixing of a block's input (Wei et al., 2022): at every step each element of
    the block's input comes from the float model's input to the block with this probability, and from the
    quantized model's own input otherwise, so that a block learns roundings that work between the two instead
    of undoing the exact errors that the blocks before it make on the calibration inputs (0: always the
    quantized model's input, zsq's recipe before session 20).
    ``anchor`` (adaround, brecq): weight of a term that pulls every soft rounding towards the float weight,
    scaled so that nearest rounding costs ``anchor`` times the unit's loss with nearest rounding
    (GPTQ-style dampening of the few calibration inputs' correlations; 0, the default, is off: on
    EfficientNet-Lite0 W4A8 it raised the KL on held-apart real images, docs/recovery.md, session 25);
    ``anchor_weighting``: ``"uniform"`` (every rounding variable alike) or ``"inputs"`` (each weighted by its
    step squared times the mean square of the input channel it multiplies).
    ``harden`` (adaround, brecq): over the last ``harden`` share of a unit's steps, fix its rounding variables to
    their hard rounding a share at a time, the most decided (soft value farthest from 1/2) first, all of them by
    the last step (:func:`zsq.recover.adaround.fix_most_decided`). The variables still free then learn to make
    up for those just fixed, and the rounding that is baked is the one the last steps optimised. Without it, the
    regulariser's annealing can leave many variables undecided after few steps, and rounding them at the end
    throws much of the learned fit away (EfficientNet-Lite0 W4A8, ``_blocks.0``: error 1.5 with the soft
    roundings, 58 with the baked ones, 70 with nearest rounding; docs/recovery.md, session 26). 0: off.
    ``harden_fallback`` (adaround, brecq; needs ``harden``): after each unit (layer, for adaround), bake the
    progressively hardened rounding only if its error on the learning inputs (every quantizer on, no QDrop) is
    not above that of rounding the soft variables as they stood when hardening began (with that moment's step
    sizes); otherwise bake the latter. Costs two passes over the learning inputs per unit.
    ``harden_average`` (adaround, brecq; needs ``harden``): decay of an exponential moving average of every rounding
    variable over the steps (updated after each step); progressive hardening then ranks the variables and fixes
    each to its side by that average instead of the variable's value after the last mini-batch, so which side a
    rounding lands on depends less on the few mini-batches before it is fixed (0: off, the value itself).
    ``sampling``: how the rows of each step's mini-batch are drawn: ``"random"`` (each step draws ``batch_size``
    distinct rows anew, so some rows are seen more often than others) or ``"epochs"`` (consecutive slices of
    shuffled passes over all rows, so every row is seen equally often).
    ``refine`` (brecq): after each unit's reconstruction, improve the codes of its last layer (a 1x1 conv or
    linear layer followed by nothing but a shortcut addition and quantizers) by greedy one-flip coordinate
    descent on the exact quadratic error of the unit's output on the learning inputs, without QDrop
    (:func:`zsq.recover.refine.refine_last_layer`); codes stay between floor and floor + 1.
    ``channels_last``: lay image batches out channels-last (NHWC in memory) for reconstruction, so every cached unit
    input and output follows; the same values up to float rounding, and 10.5 % faster convolutions on CPU
    (EfficientNet-Lite0's BRECQ, session 30). Off by default since session 31: over seven paired Lite0 W4A8 runs its
    models' real held-apart KL was higher on the mean (not significantly), and the recipe was chosen contiguous.
    ``polish``: after the method, this many Adam steps on the whole network's output KL to the float model over
    the learning inputs, training only the biases of the quantized layers (codes and ranges stay fixed;
    :func:`zsq.recover.polish.polish_biases`), at ``polish_lr`` with a cosine decay; 0 (the default) is off.
    """

    method: str = "brecq"
    iters: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    act_lr: float | None = None
    learn_act_scale: bool | None = None
    drop_prob: float | None = None
    learn_weight_scale: bool | None = None
    weight_scale_lr: float = 1e-3
    learn_bias: bool | None = None
    bias_lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    temperature: float = 1.0
    unfreeze: str = "hawq"
    hessian_iterations: int = 8
    eval_batch_size: int = 64
    seed: int = 0
    act_estimator: str | None = "percentile"
    fisher: float | None = None
    fisher_samples: int = 1
    mirror: bool | None = None
    shifts: int | None = None
    shift_pixels: int | None = None
    input_drop: float | None = None
    crops: int | None = None
    crop_min_area: float = 0.25
    revert_worse: bool | None = None
    anchor: float | None = None
    anchor_weighting: str = "uniform"
    harden: float | None = None
    harden_fallback: bool | None = None
    harden_average: float | None = None
    sampling: str | None = None
    refine: bool | None = None
    polish: int | None = None
    polish_lr: float = 1e-4
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.act_estimator is not None and self.act_estimator not in ACT_ESTIMATORS:
            raise ConfigError(f"RecoverConfig.act_estimator={self.act_estimator!r} is not one of "
                              f"{', '.join(ACT_ESTIMATORS)} (or None: keep the calibrated ranges)")
        if self.method not in _METHODS:
            raise ConfigError(f"recovery method {self.method!r} is not one of {', '.join(_METHODS)}")
        if self.iters is not None:
            _pos_int(self.iters, "iters", allow_zero=True)
        if self.batch_size is not None:
            _pos_int(self.batch_size, "batch_size")
        _pos_int(self.eval_batch_size, "eval_batch_size")
        _pos_int(self.hessian_iterations, "hessian_iterations")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"RecoverConfig.seed must be an integer, got {self.seed!r}")
        for name in ("lr", "act_lr"):
            if getattr(self, name) is not None:
                _pos_float(getattr(self, name), name)
        for name in ("beta_start", "beta_end", "temperature", "weight_scale_lr", "bias_lr"):
            _pos_float(getattr(self, name), name)
        if isinstance(self.reg_weight, bool) or not isinstance(self.reg_weight, (int, float)) or self.reg_weight < 0:
            raise ConfigError(f"RecoverConfig.reg_weight must be >= 0, got {self.reg_weight!r}")
        if not 0.0 <= float(self.warmup) < 1.0:
            raise ConfigError(f"RecoverConfig.warmup must be a fraction in [0, 1), got {self.warmup!r}")
        for name in ("drop_prob", "input_drop"):
            if getattr(self, name) is not None:
                _in_range(getattr(self, name), name, 0, 1, bounds="[)")
        self._brecq_only(self.input_drop, "input_drop (QDrop's mixing of float and quantized block inputs)")
        if self.learn_weight_scale and self.method == "finetune":
            raise ConfigError("finetune trains the weights themselves (their scales stay fixed); "
                              "learn_weight_scale is for method='adaround' or 'brecq'")
        for name in ("learn_weight_scale", "learn_bias", "revert_worse"):
            _opt_bool(getattr(self, name), name)
        _opt_bool(self.mirror, "mirror", note=" (the method's default)")
        if self.learn_bias and self.method != "brecq":
            raise ConfigError(f"learn_bias is implemented for method='brecq' (finetune always trains biases; "
                              f"adaround learns roundings only), got method={self.method!r}")
        if self.fisher is not None:
            _in_range(self.fisher, "fisher", 0, 1, bounds="[]", words="a mixing weight ")
        self._brecq_only(self.fisher, "fisher weighting")
        _pos_int(self.fisher_samples, "fisher_samples")
        if self.shifts is not None:
            _pos_int(self.shifts, "shifts", allow_zero=True)
        if self.shift_pixels is not None:
            _pos_int(self.shift_pixels, "shift_pixels")
        self._brecq_only(self.revert_worse, "revert_worse")
        _opt_bool(self.refine, "refine")
        self._brecq_only(self.refine, "refine (greedy refinement of each block's last layer)")
        if self.polish is not None:
            _pos_int(self.polish, "polish", allow_zero=True)
        _pos_float(self.polish_lr, "polish_lr")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"RecoverConfig.channels_last must be True or False, got {self.channels_last!r}")
        if self.crops is not None:
            _pos_int(self.crops, "crops", allow_zero=True)
        _in_range(self.crop_min_area, "crop_min_area", 0, 1, bounds="(]", words="a fraction ")
        if self.anchor is not None:
            _in_range(self.anchor, "anchor", 0, math.inf, bounds="[)", words="a number (0: off) ")
        if self.harden is not None:
            _in_range(self.harden, "harden", 0, 1, bounds="[)",
                      words="the share of each unit's steps over which its roundings are fixed (0: off), ")
        if self.anchor_weighting not in ANCHOR_WEIGHTINGS:
            raise ConfigError(f"RecoverConfig.anchor_weighting={self.anchor_weighting!r} is not one of "
                              f"{', '.join(ANCHOR_WEIGHTINGS)}")
        _opt_bool(self.harden_fallback, "harden_fallback")
        if self.harden_average is not None:
            _in_range(self.harden_average, "harden_average", 0, 1, bounds="[)",
                      words="the decay of the moving average hardening decides by (0: off), ")
        if self.sampling is not None and self.sampling not in SAMPLINGS:
            raise ConfigError(f"RecoverConfig.sampling={self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        for name, what in (("anchor", "pulls learned roundings towards the float weights"),
                           ("harden", "fixes learned roundings step by step"),
                           ("harden_fallback", "falls back from progressively hardened roundings"),
                           ("harden_average", "decides hardened roundings by their moving average")):
            if getattr(self, name) and self.method == "finetune":
                raise ConfigError(f"{name} {what}; it is for method='adaround' or 'brecq', not 'finetune'")
        if self.unfreeze not in UNFREEZE:
            raise ConfigError(f"RecoverConfig.unfreeze={self.unfreeze!r} is not one of {', '.join(UNFREEZE)}")
        if self.learn_act_scale and self.method == "adaround":
            raise ConfigError("adaround learns weight roundings only; use method='brecq' to also learn "
                              "activation step sizes")

    def _brecq_only(self, value: Any, what: str) -> None:
        if value and self.method != "brecq":
            raise ConfigError(f"{what} is implemented for method='brecq', got method={self.method!r}")

    def resolved(self, input_size: tuple[int, int] | None = None) -> "RecoverConfig":
        """This config with every ``None`` field replaced by the method's default (for ``input_size``)."""
        d = method_defaults(self.method, input_size)
        return dataclasses.replace(self, **{k: v for k, v in d.items() if getattr(self, k) is None})


@dataclass
class UnitReport:
    """What recovery did to one unit (adaround/brecq) or in one fine-tuning stage (finetune).

    ``metric`` names the loss: ``"mse"`` (mean squared error per element of the unit's output, measured with
    the model's ordinary quantized forward before and after) or ``"kl"`` (fine-tuning loss, mean of the
    first and last steps of the stage). ``holdout_*`` are the same on the held-apart inputs, when given.
    """

    name: str
    kind: str
    layers: list[str]
    iterations: int
    seconds: float
    metric: str
    loss_before: float
    loss_after: float
    holdout_before: float | None = None
    holdout_after: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sequential(cls, res: SequentialResult, *, iterations: int) -> "UnitReport":
        return cls(name=res.unit.name, kind=res.unit.kind, layers=list(res.unit.layers), iterations=iterations,
                   seconds=res.seconds, metric="mse", loss_before=res.mse_before, loss_after=res.mse_after,
                   holdout_before=res.holdout_before, holdout_after=res.holdout_after, info=res.info)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RecoverReport:
    """Result of :func:`recover`: per-unit reports, timings, and how far the codes moved.

    ``changed_codes``: fraction of quantized weights whose integer code differs from nearest rounding of
    the original float weights; ``max_code_change``: the largest such difference (1 for adaround/brecq).
    ``holdout_kl_before/after``: mean KL(FP32 || quantized) on the held-apart inputs, when given.
    ``undecided``: for adaround/brecq, the fraction of rounding variables whose soft value was still
    between 0 and 1 when the optimisation ended (they are then rounded at 0.5; a large fraction means the
    learned rounding had not converged); ``None`` for methods without learned rounding.
    """

    method: str
    config: dict[str, Any]
    units: list[UnitReport]
    seconds: float
    num_inputs: int
    changed_codes: float = 0.0
    max_code_change: int = 0
    holdout_kl_before: float | None = None
    holdout_kl_after: float | None = None
    undecided: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "config": self.config, "seconds": round(self.seconds, 3),
            "num_inputs": self.num_inputs, "changed_codes": self.changed_codes,
            "max_code_change": self.max_code_change, "holdout_kl_before": self.holdout_kl_before,
            "holdout_kl_after": self.holdout_kl_after, "undecided": self.undecided, "extra": self.extra,
            "units": [u.to_dict() for u in self.units],
        }

    def __str__(self) -> str:
        s = (f"{self.method}: {len(self.units)} unit(s)/stage(s) in {self.seconds:.1f}s, "
             f"{rounding_summary(self.changed_codes, self.undecided)}")
        if self.holdout_kl_before is not None and self.holdout_kl_after is not None:
            s += f"; held-apart KL {self.holdout_kl_before:.4g} -> {self.holdout_kl_after:.4g}"
        pol = self.extra.get("polish") or {}
        if pol.get("iterations"):
            s += f"; bias polish {pol['iterations']} steps, KL {pol['kl_first']:.4g} -> {pol['kl_last']:.4g}"
        return s


@dataclass
class RecoverContext:
    """What a method implementation gets (see :func:`register_method`)."""

    qmodel: fx.GraphModule
    fp32_model: nn.Module | None
    inputs: torch.Tensor
    holdout: torch.Tensor | None
    config: RecoverConfig
    device: torch.device
    progress: bool
    float_weights: dict[str, torch.Tensor]
    generator: torch.Generator
    units: list[Unit]
    extra: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The float model's logits for ``x`` (the given FP32 model, else the quantized graph run with its
        original float weights and quantizers off)."""
        bs = self.config.eval_batch_size
        outs = []
        if self.fp32_model is not None:
            for i in range(0, x.shape[0], bs):
                outs.append(_logits(self.fp32_model(x[i:i + bs])))
            return torch.cat(outs)
        runner = UnitRunner.whole_model(self.qmodel)
        return runner.batched(x, batch_size=bs, weight_fn=float_weights(self.float_weights), act_fn=no_act)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    elif isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the FP32 model must return a logits tensor, got {type(out).__name__}")
    return out


def _method_impl(method: str) -> Callable[[RecoverContext], list[UnitReport]]:
    mod_name, _, fn_name = _METHODS[method].partition(":")
    return getattr(importlib.import_module(mod_name), fn_name)


def _check_inputs(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"{what} must be a non-empty float batch of inputs (N, C, H, W), got {shape}; pass "
                          "the distilled inputs (zsq.distill(...).inputs) or other calibration images")
    return x


def _check_model(qmodel: Any) -> fx.GraphModule:
    if not isinstance(qmodel, fx.GraphModule) or not any(isinstance(m, QUANT_LAYER_TYPES) for m in qmodel.modules()):
        raise ConfigError("recover needs the quantized model made by zsq.quantize(folded_model, QuantConfig(...)) "
                          f"(a torch.fx.GraphModule with quantized layers), got {type(qmodel).__name__}")
    acts = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer)}
    missing = [n for n, m in acts.items() if m.enabled and not bool(m.calibrated)]
    if missing:
        raise NotCalibratedError(f"recover needs a calibrated model: {len(missing)} activation quantizer(s) have no "
                                 f"range (e.g. {missing[0]!r}); run zsq.calibrate(qmodel, data) first")
    observing = [n for n, m in acts.items() if m.observer is not None]
    if observing:
        raise ConfigError(f"activation quantizer {observing[0]!r} is still observing (inside zsq.calibrate?); "
                          "call recover after calibration has finished")
    return qmodel


def _mean_kl(ref: torch.Tensor, cand: torch.Tensor) -> float:
    return float(kl_divergence(ref, cand).mean())


@torch.no_grad()
def _quantized_logits(qmodel: nn.Module, x: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([_logits(qmodel(x[i:i + bs])) for i in range(0, x.shape[0], bs)])


# Largest relative RMS difference tolerated between the FP32 model and the quantized graph run with its
# weights as they are and quantizers off (BN folding alone gives ~1e-6).
FLOAT_MATCH_TOL = 1e-3


def _hint_depthwise_ranges(gm: nn.Module) -> None:
    """Log a hint when low-bit depthwise convs start from other ranges than the recipe's (the CLI sets them),
    counting only the layers the recipe's estimator would apply to."""
    other = [name for name, m in weight_layers(gm).items()
             if is_depthwise_conv(m) and isinstance(wq := m.weight_quantizer, WeightQuantizer) and wq.bits < 8
             and wq.estimator != RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR
             and output_mse_applies(m, granularity="per_channel" if wq.per_channel else "per_tensor",
                                    quantizer="uniform")]
    if other:
        log.info("%d low-bit depthwise conv(s) use other weight ranges than %r, which the recovery recipe starts "
                 "from: QuantConfig(depthwise_weight_estimator=%r) before zsq.recover (docs/recovery.md)",
                 len(other), RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR, RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR)


def recover(
    qmodel: fx.GraphModule,
    fp32_model: nn.Module | None,
    calib_inputs: torch.Tensor,
    config: RecoverConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    holdout_inputs: torch.Tensor | None = None,
) -> RecoverReport:
    """Recover the accuracy of the calibrated quantized model ``qmodel`` in place, on ``calib_inputs``.

    ``fp32_model`` is the float model ``qmodel`` was made from (BN folding allowed); it gives the fine-tuning
    targets and is used to check that ``qmodel`` still holds the float weights (not yet rounded: call
    ``recover`` once, on the model straight from :func:`zsq.quantize` + :func:`zsq.calibrate`). ``None``
    skips the check and uses ``qmodel`` with its quantizers off as the float model. ``holdout_inputs``
    (optional, e.g. distilled with another seed) are only measured, never trained on: per-unit errors and
    the KL to the float model before/after go into the report, for choosing settings without real images.
    """
    t_start = time.perf_counter()
    cfg = (config or RecoverConfig())
    if not isinstance(cfg, RecoverConfig):
        raise ConfigError(f"config must be a zsq.recover.RecoverConfig, got {type(cfg).__name__}")
    gm = _check_model(qmodel)
    x = _check_inputs(calib_inputs, "calib_inputs")
    cfg = cfg.resolved(tuple(x.shape[-2:]) if x.dim() == 4 else None)  # (no input size: mirror's default is off)
    for name in ("harden_fallback", "harden_average"):
        if getattr(cfg, name) and not cfg.harden:
            raise ConfigError(f"{name} acts on progressively hardened roundings, but harden is 0 for these inputs; "
                              f"set harden (e.g. 0.3, --recover-harden 0.3) or drop {name}")
    x = _with_views(x, cfg)
    h = _layout(_check_inputs(holdout_inputs, "holdout_inputs"), cfg) if holdout_inputs is not None else None
    if device is None:
        p = next(gm.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    dev = torch.device(device)
    gm.to(dev)
    if fp32_model is not None:
        fp32_model.to(dev)
    x = x.to(dev)
    h = h.to(dev) if h is not None else None
    units = find_units(gm)
    log.info("recover (%s): %d units, %d inputs, %d iterations", cfg.method, len(units), x.shape[0], cfg.iters)
    _hint_depthwise_ranges(gm)

    fp_guard = frozen_eval(fp32_model) if fp32_model is not None else contextlib.nullcontext()
    with frozen_eval(gm), fp_guard:
        saved = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        try:
            snapshot = {n: m.weight.detach().clone() for n, m in gm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
            # (the ranges are recalibrated on the inputs as given; reconstruction learns from them in cfg's layout)
            ctx = RecoverContext(qmodel=gm, fp32_model=fp32_model, inputs=_layout(x, cfg), holdout=h, config=cfg,
                                 device=dev, progress=progress, float_weights=snapshot,
                                 generator=torch.Generator().manual_seed(cfg.seed), units=units)
            _check_float_reference(ctx)
            if cfg.act_estimator is not None:  # the start the recipes were chosen from
                from ..calibrate import calibrate

                calibrate(gm, x, estimator=cfg.act_estimator, device=dev, progress=False)
            kl_before = kl_after = None
            if h is not None:
                ref_h = ctx.teacher_logits(h)
                kl_before = _mean_kl(ref_h, _quantized_logits(gm, h, cfg.eval_batch_size))
            unit_reports = _method_impl(cfg.method)(ctx)
            if cfg.polish:
                from .polish import polish_biases

                ctx.extra["polish"] = polish_biases(ctx, iters=int(cfg.polish), lr=float(cfg.polish_lr))
            if h is not None:
                kl_after = _mean_kl(ref_h, _quantized_logits(gm, h, cfg.eval_batch_size))
            changed, total, max_change = 0, 0, 0
            with torch.no_grad():
                for name, w0 in snapshot.items():
                    mod = gm.get_submodule(name)
                    if mod.weight_quantizer is None:
                        continue
                    wq = mod.weight_quantizer
                    s0 = saved.get(f"{name}.weight_quantizer.scale")
                    if s0 is not None and not torch.equal(s0, wq.scale):  # learned weight scale: compare
                        z = wq.zero_point                                # with nearest codes at the old one
                        s0, z = (s0, z) if wq.per_channel else (s0[0], z[0])
                        old_codes = P.quantize(w0, s0, z, *wq.qrange, axis=wq.axis)
                    else:
                        old_codes = wq.integer(w0)
                    d = (wq.integer(mod.weight) - old_codes).abs()
                    changed += int((d > 0).sum())
                    total += d.numel()
                    max_change = max(max_change, int(d.max()) if d.numel() else 0)
        except BaseException:
            gm.load_state_dict(saved)
            raise
    report = RecoverReport(method=cfg.method, config=cfg.to_dict(), units=unit_reports,
                           seconds=time.perf_counter() - t_start, num_inputs=int(x.shape[0]),
                           changed_codes=changed / max(total, 1), max_code_change=max_change,
                           holdout_kl_before=kl_before, holdout_kl_after=kl_after,
                           undecided=_undecided(unit_reports), extra=ctx.extra)
    log.info("%s", report)
    return report


def _with_views(x: torch.Tensor, cfg: RecoverConfig) -> torch.Tensor:
    """The inputs recovery learns from: ``x``, then its mirror images (``cfg.mirror``), then ``cfg.shifts``
    shifted copies of all of those, then ``cfg.crops`` zoomed crops of all of those. The views need image
    batches (N, C, H, W)."""
    for name, verb, off in (("mirror", "mirror", "False"), ("shifts", "shift", "0"), ("crops", "crop", "0")):
        if getattr(cfg, name) and x.dim() != 4:
            raise ConfigError(f"RecoverConfig.{name} needs image batches (N, C, H, W) to {verb}, got inputs of "
                              f"shape {tuple(x.shape)}; set {name}={off}")
    if cfg.mirror:
        x = torch.cat([x, x.flip(-1)])
    if cfg.shifts:
        pixels = cfg.shift_pixels if cfg.shift_pixels is not None else default_jitter(tuple(x.shape[-2:]))
        x = shifted_views(x, cfg.shifts, pixels=pixels, seed=cfg.seed)
    if cfg.crops:
        x = zoomed_views(x, cfg.crops, min_area=cfg.crop_min_area, seed=cfg.seed)
    return x


def zoomed_views(x: torch.Tensor, copies: int, *, min_area: float = 0.25, seed: int = 0) -> torch.Tensor:
    """``x`` followed by ``copies`` zoomed copies of it: every image of every copy is a random crop of its own,
    covering a fraction of the image's area drawn uniformly from ``[min_area, 1]`` with an aspect ratio drawn
    log-uniformly from [3/4, 4/3] (the random-resized-crop views ImageNet classifiers are trained on, whose
    BatchNorm statistics therefore describe them), resized back to the full size (bilinear); drawn from
    ``seed``. Unlike shifts, a zoom changes what the later, coarser layers see, not only where."""
    if copies == 0:
        return x
    import math

    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    n, _, hgt, wid = x.shape
    views = [x]
    for _ in range(copies):
        area = min_area + (1.0 - min_area) * torch.rand(n, generator=gen)
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=gen)
        pos = torch.rand(n, 2, generator=gen)
        out = []
        for i in range(n):
            r = math.exp(float(log_r[i]))
            ch = max(1, min(hgt, round(math.sqrt(float(area[i]) / r) * hgt)))
            cw = max(1, min(wid, round(math.sqrt(float(area[i]) * r) * wid)))
            top = int(float(pos[i, 0]) * (hgt - ch + 1))
            left = int(float(pos[i, 1]) * (wid - cw + 1))
            crop = x[i:i + 1, :, top:top + ch, left:left + cw]
            out.append(F.interpolate(crop, size=(hgt, wid), mode="bilinear", align_corners=False))
        views.append(torch.cat(out))
    return torch.cat(views)


def shifted_views(x: torch.Tensor, copies: int, *, pixels: int, seed: int = 0) -> torch.Tensor:
    """``x`` followed by ``copies`` circularly shifted copies of it: every image of every copy rolled by its own
    random offset of at most ``pixels`` each way (drawn from ``seed``; the views distillation's jitter showed
    the model, so distilled images stay in the distribution the BN statistics describe)."""
    if copies == 0:
        return x
    gen = torch.Generator().manual_seed(seed)
    span = 2 * pixels + 1
    views = [x]
    for _ in range(copies):
        offsets = torch.randint(0, span, (x.shape[0], 2), generator=gen) - pixels
        views.append(torch.stack([torch.roll(img, shifts=(int(dy), int(dx)), dims=(-2, -1))
                                  for img, (dy, dx) in zip(x, offsets.tolist())]))
    return torch.cat(views)


def rounding_summary(changed_codes: float, undecided: float | None) -> str:
    """How far recovery moved the codes and, with learned rounding, how much of it had not converged (one
    phrase for :class:`RecoverReport` and ``zsq quantize``)."""
    s = f"{100 * changed_codes:.1f}% of weight codes differ from nearest rounding"
    if undecided is not None:
        s += f", {100 * undecided:.1f}% of the learned roundings undecided at the end"
    return s


def _undecided(units: list[UnitReport]) -> float | None:
    """Fraction of all learned rounding variables left undecided (weighted by their number); ``None`` when no
    unit learned roundings. AdaRound reports per layer (``info["layers"]``), BRECQ per unit."""
    infos = []
    for u in units:
        infos.extend(u.info["layers"].values() if isinstance(u.info.get("layers"), dict) else [u.info])
    pairs = [(float(i["undecided"]), int(i["rounding_variables"])) for i in infos
             if "undecided" in i and "rounding_variables" in i]
    total = sum(n for _, n in pairs)
    return sum(f * n for f, n in pairs) / total if total else None


def _check_float_reference(ctx: RecoverContext) -> None:
    """The float weights in ``qmodel`` must still be the FP32 model's (not rounded by an earlier run)."""
    if ctx.fp32_model is None:
        return
    x = ctx.inputs[: min(8, ctx.inputs.shape[0])]
    with torch.no_grad(), full_fp32():  # (TF32 on a GPU would differ by ~1e-3 by itself)
        ref = _logits(ctx.fp32_model(x)).double()
        runner = UnitRunner.whole_model(ctx.qmodel)
        got = runner(x, weight_fn=float_weights(ctx.float_weights), act_fn=no_act).double()
    if ref.shape != got.shape:
        raise ConfigError(f"fp32_model returns {tuple(ref.shape)} but the quantized model {tuple(got.shape)}: pass the "
                          "float model the quantized model was made from")
    rel = float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))
    if rel > FLOAT_MATCH_TOL:
        raise ConfigError(
            f"the quantized model with its quantizers off differs from fp32_model (relative RMS {rel:.2e} > "
            f"{FLOAT_MATCH_TOL:g}): recover needs the model straight from zsq.quantize + zsq.calibrate, whose float "
            "weights are still the FP32 model's (was it recovered already, or made from another model?)")
