"""Retro-Synthesis data (GVSL & Kumar, "Hybrid and Non-Uniform quantization methods using retro
synthesis data for efficient inference", 2020): class-conditional synthetic calibration inputs.

Each synthesised input gets a target class (the targets are spread evenly over the classes) and
is optimised, starting from seeded random noise, to minimise

    ``class_weight * CE(f(x), target)``                          class objective
    ``+ bn_weight * L_BN(x)``                                    only where the model has BatchNorm
    ``+ input_weight * (||mu_0(x) - m||^2 + ||sigma_0(x) - s||^2) / 3``
    ``+ tv_weight * TV(x) + l2_weight * mean(x^2)``              image priors

``L_BN`` is ZeroQ's BN-statistics loss (see :func:`zsq.bn_stats.bn_loss`), the input term is the
one of :func:`zsq.distill.distill` (natural-image channel statistics mapped through the model's
preprocessing), ``TV(x)`` is the mean squared difference between vertically and horizontally
adjacent pixels, and ``mean(x^2)`` is taken in the model's normalised input space (it pulls
pixels towards the dataset mean). After every step the inputs are clipped to the range real
preprocessed pixels can take, exactly as for distilled data.

Models without BatchNorm (e.g. a network whose BN was folded away) get the class objective, the
input term and the priors; no layer-statistics term replaces the BN term (see docs/retro.md).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bn_stats import batchnorm_targets, bn_loss, capture_bn_inputs_folded
from ..config import (DISTILL_INITS, DistillConfig, LR_SCHEDULES, _check_choice, _JsonMixin, _ViewsMixin,
                      check_views, default_distill_batch)
from ..errors import ConfigError
from ..evaluate import _logits  # (batch, classes) logits of a model output, else ConfigError
from ..models.preprocessing import Preprocessing
from ..state import frozen_eval
from .zeroq import _augmented, _lr_at, input_stats_loss, natural_input_stats  # same lr schedule as distilled data

log = logging.getLogger(__name__)

_WEIGHTS = ("class_weight", "bn_weight", "input_weight", "tv_weight", "l2_weight")


@dataclass(frozen=True)
class RetroConfig(_ViewsMixin, _JsonMixin):
    """Retro-Synthesis settings (see :func:`retro_synthesize`).

    ``num_images``/``batch_size`` ``None``: zsq's default distillation batch for the input size
    (32 for CIFAR-sized inputs, 16 for ImageNet-sized ones); inputs are optimised ``batch_size``
    at a time. The loss weights must be >= 0, and ``class_weight`` or ``bn_weight`` must be > 0
    (a loss of priors alone does not depend on the model).
    """

    num_images: int | None = None
    batch_size: int | None = None
    iterations: int = 100
    lr: float = 0.2
    schedule: str = "cosine"
    init: str = "gaussian"
    # Defaults chosen on synthetic data only (docs/retro.md, "How the defaults were chosen"): a
    # class weight of 0.1 keeps every input classified as its target (ResNet-20: 100 %) while the
    # BN term gets 10x lower than with weight 1; TV / l2 priors did not help there, so they are off.
    class_weight: float = 0.1
    bn_weight: float = 1.0
    input_weight: float = 1.0
    tv_weight: float = 0.0
    l2_weight: float = 0.0
    seed: int = 0
    # DeepInversion's random views (Yin et al., 2020), as DistillConfig.flip / jitter (same defaults): each step
    # the model sees the inputs randomly flipped horizontally and circularly shifted by up to ``jitter`` pixels
    # (``None``: zsq.config.default_jitter of the input size; 0: off).
    flip: bool = True
    jitter: int | None = None

    def __post_init__(self) -> None:
        check_views(self.flip, self.jitter, "RetroConfig")
        for name in ("num_images", "batch_size", "iterations"):
            v = getattr(self, name)
            if v is None and name != "iterations":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"RetroConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"RetroConfig.seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"RetroConfig.lr must be a finite number > 0, got {self.lr!r}")
        for name in _WEIGHTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"RetroConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.class_weight == 0 and self.bn_weight == 0:
            raise ConfigError("RetroConfig needs class_weight > 0 or bn_weight > 0: with both at 0 the loss does "
                              "not depend on the model; set class_weight=1.0 (the class objective)")
        _check_choice(self.schedule, LR_SCHEDULES, "RetroConfig.schedule")
        _check_choice(self.init, DISTILL_INITS, "RetroConfig.init")

    @classmethod
    def from_distill(cls, distill: DistillConfig, *, num_images: int | None, **changes: Any) -> "RetroConfig":
        """Retro settings that reuse ``distill``'s optimisation settings (batch size, iterations, lr,
        schedule, init, input-statistics weight, seed, flip/jitter views), e.g. for ``zsq quantize --calib retro`` driven
        by the ``--distill-*`` flags. The class/BN/prior weights keep RetroConfig's defaults unless
        given in ``changes``. Refuses a coarse start (``DistillConfig.coarse_iterations`` / ``coarse_levels``) and
        a first-BN weight (``first_bn_weight``) set explicitly: Retro has neither."""
        if distill.coarse_iterations or distill.coarse_levels != 1:
            raise ConfigError("Retro-Synthesis has no coarse (multi-resolution) start: --distill-coarse-iters / "
                              "--distill-coarse-levels (DistillConfig.coarse_iterations / coarse_levels) apply to "
                              "distilled data only; leave them out with --calib retro")
        if distill.first_bn_weight is not None:
            raise ConfigError("Retro-Synthesis weighs every BatchNorm layer alike: --distill-first-bn-weight "
                              "(DistillConfig.first_bn_weight) applies to distilled data only; leave it out with "
                              "--calib retro")
        base = {"num_images": num_images, "batch_size": distill.batch_size, "lr": distill.lr,
                "schedule": distill.schedule, "init": distill.init,
                "input_weight": distill.input_weight, "seed": distill.seed, "flip": distill.flip,
                "jitter": distill.jitter}
        if distill.iterations is not None:  # None (distillation's size-dependent default): Retro keeps its own
            base["iterations"] = distill.iterations
        return cls(**{**base, **changes})

    def resolved_sizes(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """``(num_images, batch_size)`` after applying the size-dependent defaults."""
        n = self.num_images if self.num_images is not None else default_distill_batch(input_size)
        b = self.batch_size if self.batch_size is not None else default_distill_batch(input_size)
        return n, min(b, n)


@dataclass
class RetroResult:
    """Synthesised inputs, their target classes and per-batch diagnostics."""

    inputs: torch.Tensor
    labels: torch.Tensor  # target class of each input (int64)
    num_classes: int = 0
    has_batchnorm: bool = False
    losses: list[float] = field(default_factory=list)  # final total loss of each batch
    initial_losses: list[float] = field(default_factory=list)
    class_losses: list[float] = field(default_factory=list)  # final cross-entropy of each batch
    initial_class_losses: list[float] = field(default_factory=list)
    bn_losses: list[float] = field(default_factory=list)  # final BN loss of each batch (empty without BN)
    initial_bn_losses: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    target_accuracy: float = 0.0  # % of inputs the model classifies as their target class
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_inputs": int(self.inputs.shape[0]),
            "num_classes": self.num_classes,
            "has_batchnorm": self.has_batchnorm,
            "final_loss": self.losses,
            "initial_loss": self.initial_losses,
            "class_loss": self.class_losses,
            "initial_class_loss": self.initial_class_losses,
            "bn_loss": self.bn_losses,
            "initial_bn_loss": self.initial_bn_losses,
            "iterations": self.iterations,
            "target_accuracy": round(self.target_accuracy, 2),
            "seconds": round(self.seconds, 3),
        }


def spread_targets(num_images: int, num_classes: int, *, generator: torch.Generator) -> torch.Tensor:
    """Target classes for ``num_images`` inputs, spread evenly: every class is used
    ``floor(n / C)`` or ``ceil(n / C)`` times. The classes are visited in a seeded random order, so
    consecutive inputs (one optimisation batch) get distinct classes while ``n >= C`` covers them all."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    order = torch.randperm(num_classes, generator=generator)
    return order[torch.arange(num_images) % num_classes].to(torch.long)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertically and horizontally adjacent pixels of (N, C, H, W)."""
    terms = []
    if x.shape[-2] > 1:
        terms.append((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean())
    if x.shape[-1] > 1:
        terms.append((x[..., :, 1:] - x[..., :, :-1]).pow(2).mean())
    return sum(terms) if terms else x.new_zeros(())  # type: ignore[return-value]


def _model_device(model: nn.Module) -> torch.device:
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def retro_synthesize(
    model: nn.Module,
    preprocessing: Preprocessing,
    config: RetroConfig | None = None,
    *,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    channels: int = 3,
) -> RetroResult:
    """Synthesise class-conditional calibration inputs for the classifier ``model``.

    ``num_classes`` defaults to the model's output size; targets are spread evenly over
    ``range(num_classes)``. ``device`` defaults to the device of the model's parameters. Works with
    and without BatchNorm; with BN the optimisation runs on a BN-folded copy (same outputs, same
    BN-input statistics, cheaper), without BN on ``model`` itself. Either way the model is left
    exactly as it was (modes, ``requires_grad``, device, no hooks), also after an exception.
    """
    cfg = config or RetroConfig()
    if not isinstance(cfg, RetroConfig):
        raise ConfigError(f"config must be a RetroConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    dev = torch.device(device) if device is not None else _model_device(model)
    lo, hi = (t.to(dev).view(1, -1, 1, 1) for t in preprocessing.input_range())
    in_mean, in_std = (t.to(dev) for t in natural_input_stats(preprocessing))
    h, w = preprocessing.input_size
    n_total, batch_size = cfg.resolved_sizes((h, w))
    jitter = cfg.resolved_jitter((h, w))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()

    targets = batchnorm_targets(model) if cfg.bn_weight > 0 else []
    if targets:
        from ..fold import fold_batchnorm

        net, fold_report = fold_batchnorm(model)  # a copy: the user's model is not touched
        folded_pairs = fold_report.folded
    else:
        net, folded_pairs = model, []
        if cfg.bn_weight > 0:
            log.info("%s has no BatchNorm layer: Retro-Synthesis uses the class objective and image priors only",
                     type(model).__name__)
    result = RetroResult(inputs=torch.empty(0), labels=torch.empty(0, dtype=torch.long),
                         has_batchnorm=bool(targets))
    orig_device = _model_device(net)
    out, hits = [], 0
    with frozen_eval(net), capture_bn_inputs_folded(net, folded_pairs, targets) as stats:
        net.to(dev)
        try:
            with torch.no_grad():
                width = _logits(net(torch.zeros(1, channels, h, w, device=dev))).shape[1]
            if num_classes is None:
                num_classes = width
            elif num_classes > width:
                raise ConfigError(f"num_classes={num_classes} but the model outputs only {width} logits; "
                                  f"pass num_classes <= {width} (or None for all of them)")
            result.num_classes = num_classes

            def objective(view: torch.Tensor, inputs: torch.Tensor, y: torch.Tensor):
                """(total loss, cross-entropy, BN loss or None, logits) of the model on ``view``; the input term
                and the priors are taken on ``inputs``."""
                stats.clear()
                logits = _logits(net(view))
                ce = F.cross_entropy(logits, y)
                loss = cfg.class_weight * ce
                bn = None
                if targets:
                    bn = bn_loss(targets, stats)
                    loss = loss + cfg.bn_weight * bn
                if cfg.input_weight > 0:
                    loss = loss + cfg.input_weight * input_stats_loss(inputs, in_mean, in_std)
                if cfg.tv_weight > 0:
                    loss = loss + cfg.tv_weight * total_variation(inputs)
                if cfg.l2_weight > 0:
                    loss = loss + cfg.l2_weight * inputs.pow(2).mean()
                return loss, ce, bn, logits

            labels = spread_targets(n_total, num_classes, generator=gen)
            n_batches = math.ceil(n_total / batch_size)
            for b in range(n_batches):
                y = labels[b * batch_size: (b + 1) * batch_size].to(dev)
                shape = (y.shape[0], channels, h, w)
                if cfg.init == "gaussian":
                    x0 = torch.randn(shape, generator=gen)
                else:
                    x0 = torch.rand(shape, generator=gen) * 2 - 1
                x = torch.max(torch.min(x0.to(dev), hi), lo).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=cfg.lr)
                plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=20)
                           if cfg.schedule == "plateau" else None)
                bar = tqdm(range(cfg.iterations), desc=f"retro batch {b + 1}/{n_batches}", disable=not progress,
                           leave=False)
                loss_val = ce_val = bn_val = float("nan")
                first = first_ce = first_bn = None
                steps = 0
                for it in bar:
                    if plateau is None:
                        for group in opt.param_groups:
                            group["lr"] = _lr_at(cfg, it, cfg.iterations)
                    opt.zero_grad(set_to_none=True)
                    loss, ce, bn, _ = objective(_augmented(x, cfg.flip, jitter, gen), x, y)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        x.copy_(torch.max(torch.min(x, hi), lo))
                    loss_val, ce_val = float(loss.detach()), float(ce.detach())
                    bn_val = float(bn.detach()) if bn is not None else float("nan")
                    if first is None:
                        first, first_ce, first_bn = loss_val, ce_val, bn_val
                    if plateau is not None:
                        plateau.step(loss_val)
                    steps = it + 1
                    if it % 10 == 0:
                        bar.set_postfix(loss=f"{loss_val:.4f}", ce=f"{ce_val:.3f}")
                with torch.no_grad():  # the losses reported are those of the inputs themselves, not of a view
                    loss, ce, bn, logits = objective(x, x, y)
                    hits += int((logits.argmax(1) == y).sum())
                    loss_val, ce_val = float(loss), float(ce)
                    bn_val = float(bn) if bn is not None else float("nan")
                out.append(x.detach().cpu())
                result.losses.append(loss_val)
                result.initial_losses.append(first if first is not None else float("nan"))
                result.class_losses.append(ce_val)
                result.initial_class_losses.append(first_ce if first_ce is not None else float("nan"))
                if targets:
                    result.bn_losses.append(bn_val)
                    result.initial_bn_losses.append(first_bn if first_bn is not None else float("nan"))
                result.iterations.append(steps)
                log.info("retro batch %d/%d: loss %.4f -> %.4f (cross-entropy %.4f%s) in %d iterations",
                         b + 1, n_batches, result.initial_losses[-1], loss_val, ce_val,
                         f", BN {bn_val:.4f}" if targets else "", steps)
        finally:
            net.to(orig_device)
    result.inputs = torch.cat(out)
    result.labels = labels.clone()
    result.target_accuracy = 100.0 * hits / n_total
    result.seconds = time.perf_counter() - t0
    return result
