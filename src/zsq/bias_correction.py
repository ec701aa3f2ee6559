"""Bias correction: remove the mean error that quantization adds to every layer's output.

Stage of the data flow: after :func:`zsq.calibrate` (and recovery, if any), before evaluation and export. Quantized
weights ``W^`` shift each output channel's mean by ``E[(W - W^) x]``; clipped and rounded activations add
shifts of their own. Both are cheap to measure on the calibration inputs and to cancel through the bias
each conv/linear layer already has (BatchNorm folding gave one to every conv it folded). Two ways to
measure the shift of layer ``L`` (per output channel, averaged over the batch and spatial positions):

``weight`` (Nagel et al., 2019, "Data-free quantization through weight equalization and bias
    correction", empirical form)
    ``E[L_W(x^)] - E[L_W^(x^)]``: the layer's own weight error on its input ``x^`` in the quantized model.
``output``
    ``E[L(x)] - E[L^(x^)]``: the whole difference between the FP32 model's output of the layer (FP32
    inputs ``x``) and the quantized model's, upstream activation error included.

Layers are corrected in the order the data flows (one forward pass; each layer sees the corrections of
the layers before it). ``auto`` (the default) chooses between ``off``, ``weight`` and ``output`` on the
calibration inputs themselves: each candidate is fitted on one half and scored by the KL divergence of
the quantized model's outputs to the FP32 model's on the other half (and the halves swapped); the lowest
wins. A candidate whose held-apart predictions collapse to a single class (where the FP32 model's do not)
is excluded first: a nearly constant output can have a low KL to FP32 at 4 bits (it hedges) and still be
useless (EfficientNet-Lite1 W4A4, ``output``: KL 1.20 against 1.24 for ``weight``, 0 % top-1 on real
images). No evaluation image is involved.

Why both modes exist (numbers in ``BENCHMARKS.md``): ``weight`` removes most of the 8-bit weight error of
EfficientNet-Lite, where ``output`` makes it worse (it shrinks how much the outputs vary from input to
input, more with every block); on the CIFAR ResNets ``output`` is the better one at 4-6 bits.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from .config import BIAS_MODES, _JsonMixin
from .errors import ConfigError, NotCalibratedError
from .quant.modules import QUANT_LAYER_TYPES
from .recover.blocks import layer_forward  # FP32 weight in place of the fake-quantized one
from .metrics import kl_divergence
from .state import eval_mode

log = logging.getLogger(__name__)

__all__ = ["BIAS_MODES", "BiasCorrectionConfig", "BiasCorrectionReport", "collapsed", "correct_bias", "decide"]

_CANDIDATES = ("off", "weight", "output")  # what ``auto`` chooses from
#: ``auto`` needs at least this many inputs per half to compare candidates; below it, it uses ``weight``.
MIN_INPUTS_PER_FOLD = 2


@dataclass(frozen=True)
class BiasCorrectionConfig(_JsonMixin):
    """How :func:`correct_bias` corrects.

    ``mode``: ``auto`` | ``weight`` | ``output`` | ``off`` (see the module docstring). ``max_inputs``: at
    most this many calibration inputs are used; they run through the model as one batch, so that every
    layer is corrected before the next one is measured.
    """

    mode: str = "auto"
    max_inputs: int = 64

    def __post_init__(self) -> None:
        if self.mode not in BIAS_MODES:
            raise ConfigError(f"bias correction mode={self.mode!r} is not one of {', '.join(BIAS_MODES)}")
        if self.max_inputs < 1:
            raise ConfigError(f"bias correction max_inputs must be >= 1, got {self.max_inputs}")


@dataclass
class BiasCorrectionReport(_JsonMixin):
    """What :func:`correct_bias` did: the mode it applied, ``auto``'s held-apart KL per candidate, the
    layers it corrected, the largest shift it removed, and its time."""

    mode: str
    requested: str
    layers: int = 0
    skipped_no_bias: list[str] = field(default_factory=list)
    max_shift: float = 0.0
    inputs: int = 0
    heldout_kl: dict[str, float] = field(default_factory=dict)
    gain_z: dict[str, float] = field(default_factory=dict)  # auto: KL lowered vs off, in standard errors
    #: corrections whose predictions collapsed to one class: excluded by ``auto`` (held-apart halves), or the
    #: explicitly requested mode itself (on the calibration inputs; the model is left corrected, with a warning)
    collapsed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        s = f"bias correction: {self.mode}"
        if self.requested == "auto" and self.heldout_kl:
            s += " (auto; held-apart KL " + ", ".join(
                f"{k} {v:.4g}" + (f" [{self.gain_z[k]:+.1f} SE]" if k in self.gain_z else "")
                for k, v in self.heldout_kl.items()) + ")"
        if self.requested == "auto" and self.collapsed:
            s += (f" [predictions collapsed to one class: {', '.join(self.collapsed)}"
                  + ("; none excluded, all collapsed]" if len(self.collapsed) == len(_CANDIDATES) else ": excluded]"))
        elif self.collapsed:
            s += (" [WARNING: corrected, the model predicts one class for every calibration input; "
                  "try bias correction 'weight' or 'off']")
        if self.mode != "off":
            s += f", {self.layers} layers, largest shift {self.max_shift:.3g}"
        if self.skipped_no_bias:
            s += f", {len(self.skipped_no_bias)} layers without a bias left as they are"
        return s + f", {self.inputs} inputs, {self.seconds:.1f} s"


def _channel_dim(mod: nn.Module) -> int:
    """Where a layer's output channels are: dim 1 for convolutions (N, C, ...), the last dim for linear layers
    (N, C) or (N, T, C)."""
    return -1 if isinstance(mod, nn.Linear) else 1


def _channel_mean(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over every dimension but the channel one (``dim``)."""
    return y.movedim(dim, 0).reshape(y.shape[dim], -1).mean(1)


def _layers(qmodel: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    quantized = {n: m for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
    return ({n: m for n, m in quantized.items() if m.bias is not None},
            [n for n, m in quantized.items() if m.bias is None])


@contextlib.contextmanager
def _hooks(mods: dict[str, nn.Module], make) -> Iterator[None]:
    handles = []
    try:
        for n, m in mods.items():
            handles.append(m.register_forward_hook(make(n)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _float_means(float_model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel output means of the FP32 model's layers ``names`` on ``x``."""
    mods = dict(float_model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ConfigError(f"bias correction mode 'output' needs the FP32 model the quantized model was made from "
                          f"(BatchNorm folded, same layer names); it has no layer {missing[0]!r}")
    means: dict[str, torch.Tensor] = {}
    with _hooks({n: mods[n] for n in names},
                lambda n: lambda m, i, o: means.__setitem__(n, _channel_mean(o, _channel_dim(m)))):
        float_model(x)
    return means


@torch.no_grad()
def _apply(qmodel: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor, mode: str,
           float_model: nn.Module | None) -> float:
    """Correct every layer in one pass of ``x`` (in data-flow order); returns the largest shift removed."""
    targets = _float_means(float_model, list(layers), x) if mode == "output" else None
    largest = 0.0

    def make(name: str):
        def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            nonlocal largest
            dim = _channel_dim(mod) % out.dim()
            target = (targets[name] if targets is not None
                      else _channel_mean(layer_forward(mod, inputs[0], mod.weight), dim))
            shift = target - _channel_mean(out, dim)
            mod.bias.add_(shift.to(mod.bias.dtype))
            largest = max(largest, float(shift.abs().max()))
            return out + shift.reshape([-1 if d == dim else 1 for d in range(out.dim())])
        return hook

    with _hooks(layers, make):
        qmodel(x)
    return largest


def collapsed(reference: torch.Tensor, output: torch.Tensor) -> bool:
    """True when ``output`` predicts the same class (argmax over dim 1) for every input while ``reference``
    (the FP32 model's outputs on the same inputs) predicts more than one."""
    if output.dim() < 2 or output.shape[0] < 2:
        return False
    return bool(output.argmax(1).unique().numel() == 1 and reference.argmax(1).unique().numel() > 1)


def decide(per_input_kl: dict[str, torch.Tensor], *, excluded: tuple[str, ...] | list[str] = ()
           ) -> tuple[str, dict[str, float]]:
    """``auto``'s rule: the candidate with the lowest mean held-apart KL (``off`` included), among those not
    ``excluded`` (candidates whose predictions collapsed to one class). When every candidate is excluded,
    the exclusion says nothing and the lowest KL of all wins.

    ``per_input_kl`` maps ``off`` and each correction to its per-input KL on the held-apart inputs. Also
    returns, for the record, each correction's gain over ``off`` in standard errors of the paired per-input
    difference: how clearly the halves separate it from ``off`` (a requirement of 2 standard errors was
    measured and not adopted; see ``docs/bias_correction.md``).
    """
    off = per_input_kl["off"].double()
    gains: dict[str, float] = {}
    for cand, kl in per_input_kl.items():
        if cand == "off":
            continue
        d = off - kl.double()
        se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0
        mean = float(d.mean())
        gains[cand] = mean / se if se > 0 else (float("inf") if mean > 0 else 0.0)
    allowed = [c for c in per_input_kl if c not in excluded] or list(per_input_kl)
    return min(allowed, key=lambda c: float(per_input_kl[c].mean())), gains


def correct_bias(
    qmodel: nn.Module,
    float_model: nn.Module | None,
    data: torch.Tensor,
    *,
    config: BiasCorrectionConfig | None = None,
    device: str | torch.device | None = None,
) -> BiasCorrectionReport:
    """Cancel the per-channel mean error of every quantized conv/linear layer through its bias.

    ``qmodel`` must be calibrated (:func:`zsq.calibrate`); ``float_model`` is the FP32 model it was made
    from (BatchNorm folded or not; ``auto`` and ``output`` need it, ``weight`` does not); ``data`` the
    calibration inputs (the first ``config.max_inputs`` are used). Biases change in place; on an exception
    they are restored. Returns a :class:`BiasCorrectionReport`.
    """
    from .calibrate import is_calibrated

    cfg = config or BiasCorrectionConfig()
    t0 = time.perf_counter()
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
        raise ConfigError("bias correction needs the calibration inputs as one non-empty tensor (N, ...), got "
                          f"{type(data).__name__}{'' if not isinstance(data, torch.Tensor) else tuple(data.shape)}")
    if not is_calibrated(qmodel):
        raise NotCalibratedError("bias correction runs on a calibrated model: call zsq.calibrate(qmodel, data) first")
    if cfg.mode in ("auto", "output") and float_model is None:
        raise ConfigError(f"bias correction mode {cfg.mode!r} compares with the FP32 model: pass float_model "
                          "(or use mode='weight')")
    if device is None:
        p = next(qmodel.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    x = data[: cfg.max_inputs].to(device)
    layers, skipped = _layers(qmodel)
    report = BiasCorrectionReport(mode=cfg.mode, requested=cfg.mode, skipped_no_bias=skipped, inputs=int(x.shape[0]))
    if cfg.mode == "off" or not layers:
        report.mode = "off"
        report.seconds = time.perf_counter() - t0
        return report
    saved = {n: m.bias.detach().clone() for n, m in layers.items()}

    def restore() -> None:
        with torch.no_grad():
            for n, m in layers.items():
                m.bias.copy_(saved[n])

    float_eval = eval_mode(float_model) if float_model is not None else contextlib.nullcontext()
    with eval_mode(qmodel), float_eval:
        try:
            mode = cfg.mode
            if mode == "auto":
                mode = _choose(qmodel, float_model, layers, x, report, restore)
            report.mode = mode
            if mode != "off":
                report.max_shift = _apply(qmodel, layers, x, mode, float_model)
                report.layers = len(layers)
                if cfg.mode != "auto" and float_model is not None:
                    with torch.no_grad():
                        if collapsed(float_model(x), qmodel(x)):
                            report.collapsed = [mode]
                            log.warning("bias correction %r: the corrected model predicts one class for every "
                                        "calibration input (the FP32 model does not); try mode 'weight' or 'off'",
                                        mode)
        except BaseException:
            restore()
            raise
    report.seconds = time.perf_counter() - t0
    log.debug("%s", report)  # the report is returned; zsq quantize prints it in its summary
    return report


def _choose(qmodel: nn.Module, float_model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor,
            report: BiasCorrectionReport, restore) -> str:
    """``auto``: fit each candidate on one half of ``x``, score the KL to FP32 on the other (both ways), and
    :func:`decide`."""
    half = x.shape[0] // 2
    if half < MIN_INPUTS_PER_FOLD:
        log.info("bias correction auto: %d inputs are too few to compare modes on held-apart halves; using 'weight'",
                 x.shape[0])
        return "weight"
    folds = [(x[:half], x[half:]), (x[half:], x[:half])]
    with torch.no_grad():
        refs = [float_model(test) for _, test in folds]
    per_input: dict[str, torch.Tensor] = {}
    for cand in _CANDIDATES:
        kls = []
        for (fit, test), ref in zip(folds, refs):
            if cand != "off":
                _apply(qmodel, layers, fit, cand, float_model)
            with torch.no_grad():
                out = qmodel(test)
            kls.append(kl_divergence(ref, out))
            if collapsed(ref, out) and cand not in report.collapsed:
                report.collapsed.append(cand)
            restore()
        per_input[cand] = torch.cat(kls)
        report.heldout_kl[cand] = float(per_input[cand].mean())
    mode, report.gain_z = decide(per_input, excluded=report.collapsed)
    if report.collapsed and len(report.collapsed) < len(_CANDIDATES):
        log.warning("bias correction auto: %s excluded (predictions on held-apart inputs collapsed to one class)",
                    ", ".join(report.collapsed))
    elif report.collapsed:
        log.warning("bias correction auto: every candidate's predictions collapsed to one class on held-apart inputs "
                    "(the quantized model is unusable at this setting); chose by the KL alone")
    return mode
