"""ZeroQ distilled data (Cai et al., 2020): optimise random inputs so that the batch statistics at
every BatchNorm layer's input match that layer's running statistics.

Loss per step (``L`` BN layers, ``C_l`` channels):
    ``1/L * sum_l (||mu_l(x) - mu_l||^2 + ||sigma_l(x) - sigma_l||^2) / C_l``
    ``+ input_weight * (||mu_0(x) - m||^2 + ||sigma_0(x) - s||^2) / 3``
where ``mu_0, sigma_0`` are the per-channel mean/std of the input itself and ``(m, s)`` are the
statistics of natural RGB images mapped through the model's own preprocessing. After every step
the inputs are clipped to the range real preprocessed pixels can take.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bn_stats import bn_loss, capture_bn_inputs, capture_bn_inputs_folded, channel_stats, require_batchnorm
from ..config import DistillConfig
from ..models.preprocessing import Preprocessing
from ..state import frozen_eval

log = logging.getLogger(__name__)

# Per-channel mean/std of natural RGB photographs in [0, 1] (the ImageNet training-set values that
# torchvision documents). Used as the input-statistics target, mapped through each model's own
# normalisation.
NATURAL_RGB_MEAN = (0.485, 0.456, 0.406)
NATURAL_RGB_STD = (0.229, 0.224, 0.225)


def natural_input_stats(preprocessing: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected per-channel mean and std of natural images after the model's preprocessing."""
    m = torch.tensor(NATURAL_RGB_MEAN)
    s = torch.tensor(NATURAL_RGB_STD)
    pm = torch.tensor(preprocessing.mean)
    ps = torch.tensor(preprocessing.std)
    return (m - pm) / ps, s / ps


@dataclass
class DistillResult:
    inputs: torch.Tensor
    losses: list[float] = field(default_factory=list)  # final loss of each batch
    initial_losses: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)  # iterations actually run per batch
    seconds: float = 0.0
    flip: bool = False  # the views used (DistillConfig.flip, and its jitter resolved for the input size)
    jitter: int = 0
    # The multi-resolution start used (DistillConfig.coarse_iterations / coarse_levels): the size of every coarse
    # level, smallest first ([]: none), and the steps run at each.
    coarse_sizes: list[tuple[int, int]] = field(default_factory=list)
    coarse_iterations: int = 0
    first_bn_weight: float = 1.0  # DistillConfig.first_bn_weight, resolved for the input size

    @property
    def coarse_size(self) -> tuple[int, int] | None:
        """The size of the last (largest) coarse level, or None without a coarse start."""
        return self.coarse_sizes[-1] if self.coarse_sizes else None

    def to_dict(self) -> dict:
        return {
            "num_inputs": int(self.inputs.shape[0]),
            # of the returned inputs (with views: not of the last random view); the objective as optimised, so with
            # first_bn_weight != 1 it is not distill_loss (which weighs every layer alike)
            "final_loss": self.losses,
            "initial_loss": self.initial_losses,  # of the first step's view
            "iterations": self.iterations,
            "seconds": round(self.seconds, 3),
            "views": {"flip": self.flip, "jitter": self.jitter},
            "first_bn_weight": self.first_bn_weight,
            "coarse": (None if self.coarse_size is None
                       else {"iterations": self.coarse_iterations, "size": list(self.coarse_size),
                             "levels": [list(s) for s in self.coarse_sizes]}),
        }


def _lr_at(cfg: DistillConfig, step: int, iterations: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / iterations))
    return cfg.lr


def distill(
    model: nn.Module,
    preprocessing: Preprocessing,
    config: DistillConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    channels: int = 3,
) -> DistillResult:
    """Generate ``num_batches * batch_size`` distilled inputs for ``model`` (must contain BatchNorm).

    The model is left exactly as it was (hooks removed, modes and ``requires_grad`` restored), also
    when an exception interrupts the optimisation.
    """
    cfg = config or DistillConfig()
    targets = require_batchnorm(model, what="ZeroQ distillation")
    device = torch.device(device)
    lo, hi = (t.to(device).view(1, -1, 1, 1) for t in preprocessing.input_range())
    in_mean, in_std = (t.to(device) for t in natural_input_stats(preprocessing))
    h, w = preprocessing.input_size
    jitter = cfg.resolved_jitter((h, w))
    batch_size = cfg.resolved_batch_size((h, w))
    iterations = cfg.resolved_iterations((h, w))
    coarse_iterations = cfg.resolved_coarse_iterations((h, w))
    first_bn_weight = cfg.resolved_first_bn_weight((h, w))
    coarse_sizes = cfg.resolved_coarse_sizes((h, w))
    gen = torch.Generator().manual_seed(cfg.seed)
    out, result = [], DistillResult(inputs=torch.empty(0), flip=cfg.flip, jitter=jitter,
                                    coarse_sizes=list(coarse_sizes), coarse_iterations=coarse_iterations,
                                    first_bn_weight=first_bn_weight)
    t0 = time.perf_counter()
    # Run on a BN-folded copy: same BN-input statistics (recovered exactly from the folded conv
    # outputs), without the cost of BatchNorm forward/backward. The user's model is not touched.
    from ..fold import fold_batchnorm

    model, fold_report = fold_batchnorm(model)
    orig_device = next(model.parameters()).device
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    with frozen_eval(model), capture_bn_inputs_folded(model, fold_report.folded, targets) as stats:
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=fmt)  # the folded copy: the user's model is not touched

        def objective(view: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            """BN-statistics loss of the model on ``view`` plus the input-statistics term of ``inputs``."""
            stats.clear()
            model(view)
            loss = bn_loss(targets, stats, first_weight=first_bn_weight)
            if cfg.input_weight > 0:
                loss = loss + cfg.input_weight * input_stats_loss(inputs, in_mean, in_std)
            return loss

        def _initial(size: tuple[int, int]) -> torch.Tensor:
            if cfg.init == "gaussian":
                return torch.randn(batch_size, channels, *size, generator=gen)
            return torch.rand(batch_size, channels, *size, generator=gen) * 2 - 1

        def _optimise(x0: torch.Tensor, iterations: int, view_jitter: int, desc: str,
                      early_stop: bool) -> tuple[torch.Tensor, float, float, int]:
            """``iterations`` Adam steps on ``x0`` (clipped to the pixel range); returns the inputs, the first and
            last step's loss and the number of steps run."""
            x = torch.max(torch.min(x0.to(device), hi), lo).contiguous(memory_format=fmt).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr)
            plateau = (
                torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=20)
                if cfg.schedule == "plateau" else None
            )
            bar = tqdm(range(iterations), desc=desc, disable=not progress, leave=False)
            loss_val, first, steps = float("nan"), None, 0
            for it in bar:
                if plateau is None:
                    for group in opt.param_groups:
                        group["lr"] = _lr_at(cfg, it, iterations)
                opt.zero_grad(set_to_none=True)
                loss = objective(_augmented(x, cfg.flip, view_jitter, gen), x)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, hi), lo))
                loss_val = float(loss.detach())
                if first is None:
                    first = loss_val
                if plateau is not None:
                    plateau.step(loss_val)
                steps = it + 1
                if it % 10 == 0:
                    bar.set_postfix(loss=f"{loss_val:.4f}")
                if early_stop and cfg.early_stop_loss > 0 and loss_val < cfg.early_stop_loss:
                    break
            return x.detach(), (first if first is not None else float("nan")), loss_val, steps

        try:
            for b in range(cfg.num_batches):
                x = _initial(coarse_sizes[0] if coarse_sizes else (h, w))
                for k, cs in enumerate(coarse_sizes):  # DeepInversion's multi-resolution start: smaller first
                    if tuple(x.shape[-2:]) != cs:
                        x = F.interpolate(x, size=cs, mode="bilinear", align_corners=False)
                    shrink = cfg.coarse_factor ** (len(coarse_sizes) - k)
                    x = _optimise(x, coarse_iterations, int(round(jitter / shrink)),
                                  f"distill batch {b + 1}/{cfg.num_batches} (coarse {cs[0]}x{cs[1]})",
                                  early_stop=False)[0]
                if coarse_sizes:
                    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
                x, first, loss_val, steps = _optimise(x, iterations, jitter,
                                                      f"distill batch {b + 1}/{cfg.num_batches}", early_stop=True)
                if cfg.flip or jitter:  # report the loss of the inputs themselves, not of the last random view
                    with torch.no_grad():
                        loss_val = float(objective(x, x))
                out.append(x.detach().cpu().contiguous())
                result.losses.append(loss_val)
                result.initial_losses.append(first)
                result.iterations.append(steps)
                log.info("distilled batch %d/%d: BN loss %.4f -> %.4f in %d iterations",
                         b + 1, cfg.num_batches, result.initial_losses[-1], loss_val, steps)
        finally:
            model.to(orig_device)
    result.inputs = torch.cat(out)
    result.seconds = time.perf_counter() - t0
    return result


def input_stats_loss(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The input term: squared distance of ``x``'s per-channel mean / std to the natural-image ``mean`` / ``std``
    (:func:`natural_input_stats`), averaged over the channels."""
    m, s = channel_stats(x)
    return (m - mean).pow(2).mean() + (s - std).pow(2).mean()


def _augmented(x: torch.Tensor, flip: bool, jitter: int, gen: torch.Generator) -> torch.Tensor:
    """The view of ``x`` the model sees in one step: randomly mirrored (``flip``) and circularly shifted by up to
    ``jitter`` pixels each way."""
    if not flip and jitter == 0:
        return x
    draws = torch.randint(0, 2 ** 16, (3,), generator=gen).tolist()
    if flip and draws[0] % 2:
        x = x.flip(-1)
    if jitter > 0:
        span = 2 * jitter + 1
        x = torch.roll(x, shifts=(draws[1] % span - jitter, draws[2] % span - jitter), dims=(-2, -1))
    return x


@torch.no_grad()
def distill_loss(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> float:
    """BN-statistics loss of ``inputs`` (lower = closer to the training statistics), for diagnostics."""
    targets = require_batchnorm(model, what="the BN-statistics loss")
    vals = []
    with frozen_eval(model), capture_bn_inputs(targets) as stats:
        for i in range(0, inputs.shape[0], batch_size):
            stats.clear()
            model(inputs[i : i + batch_size])
            vals.append(float(bn_loss(targets, stats)))
    return sum(vals) / len(vals)
