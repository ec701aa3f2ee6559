"""BatchNorm statistics: the running (training-set) statistics stored in a model, and the batch
statistics of each BN layer's input, captured by hooks that live only inside a context manager."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import ConfigError, NoBatchNormError


@dataclass
class BNTarget:
    """Running statistics of one BatchNorm layer: per-channel mean and std (sqrt(var + eps))."""

    name: str
    module: nn.modules.batchnorm._BatchNorm
    mean: torch.Tensor
    std: torch.Tensor
    gamma: torch.Tensor  # affine weight (ones when affine=False)
    beta: torch.Tensor


def batchnorm_targets(model: nn.Module) -> list[BNTarget]:
    """Every BatchNorm layer with running statistics, in module order (order is irrelevant for losses)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            c = m.running_mean.numel()
            gamma = m.weight.detach().clone() if m.affine else torch.ones(c)
            beta = m.bias.detach().clone() if m.affine else torch.zeros(c)
            out.append(BNTarget(name, m, m.running_mean.detach().clone(),
                                torch.sqrt(m.running_var.detach() + m.eps), gamma, beta))
    return out


def require_batchnorm(model: nn.Module, *, what: str) -> list[BNTarget]:
    targets = batchnorm_targets(model)
    if not targets:
        raise NoBatchNormError(
            f"{what} needs BatchNorm running statistics, but {type(model).__name__} has no BatchNorm layer "
            "(or its BN was already folded); use --calib retro (class-conditional synthesis without BN), --calib gaussian or --calib PATH (real data) instead"
        )
    return targets


class _ChannelStats(torch.autograd.Function):
    """Per-channel mean and biased std with a one-expression backward.

    Forward: PyTorch's own batch-norm statistics kernel (``torch.batch_norm_update_stats`` without running
    statistics: per-channel mean and biased variance), which reads the activation in a fused, vectorised
    pass for every memory layout and writes nothing of its size. The two-pass formula it replaces (the mean,
    then the mean of squared deviations) moved about 8x the activation's bytes and was the largest
    non-convolution cost of an EfficientNet-Lite0 distillation step (``benchmarks/COST_BREAKDOWN.md``). In
    float32 the two agree to ~1e-5 relative; float64 inputs (``gradcheck``) agree exactly. Dtypes other than
    float32/float64 use the two-pass formula.
    Backward: ``dx = (g_mean + g_std * (x - mean) / std) / n``, instead of autograd's chain through
    subtract, square, mean and sqrt (several full-size passes, a negation among them).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype in (torch.float32, torch.float64) and x.numel() > 0:
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            std = torch.sqrt(var + eps)
        else:
            dims = [0] + list(range(2, x.dim()))
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean = x.mean(dim=dims)
            std = torch.sqrt((x - mean.view(shape)).pow(2).mean(dim=dims) + eps)
        ctx.save_for_backward(x, mean, std)
        return mean, std

    @staticmethod
    def backward(ctx: Any, g_mean: torch.Tensor | None, g_std: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        x, mean, std = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        n = x.numel() // x.shape[1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        gm = torch.zeros_like(mean) if g_mean is None else g_mean
        gs = torch.zeros_like(std) if g_std is None else g_std
        a = (gs / (std * n)).view(shape)
        b = (gm / n - gs * mean / (std * n)).view(shape)
        return torch.addcmul(b, x, a), None  # a * x + b  ==  (g_mean + g_std * (x - mean) / std) / n


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) std of an (N, C, ...) tensor (differentiable; see _ChannelStats)."""
    if x.dim() < 2:
        raise ConfigError(f"channel_stats expects an (N, C, ...) tensor, got shape {tuple(x.shape)}")
    return _ChannelStats.apply(x, 1e-12)


@contextlib.contextmanager
def capture_bn_inputs(targets: list[BNTarget]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, every forward fills ``stats[name] = (batch mean, batch std)`` of each BN's input.

    The hooks are removed when the block exits, also on an exception.
    """
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def make_hook(name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            stats[name] = channel_stats(args[0])

        return hook

    try:
        for t in targets:
            handles.append(t.module.register_forward_pre_hook(make_hook(t.name)))
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_bn_inputs_folded(
    folded: nn.Module, folded_pairs: list[tuple[str, str]], targets: list[BNTarget]
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Like :func:`capture_bn_inputs`, on a BN-folded copy of the model (much cheaper to run).

    For a folded pair (conv, bn) the conv now outputs ``y = gamma * (x - mu) / sigma + beta`` where
    ``x`` was the BN input, so the BN-input batch statistics follow exactly from those of ``y``:
    ``mean(x) = (mean(y) - beta) * sigma / gamma + mu`` and ``std(x) = std(y) * sigma / |gamma|``.
    Channels with ``gamma == 0`` carry no information about ``x`` and get the target values.
    BNs that were not folded are hooked directly.
    """
    by_name = {t.name: t for t in targets}
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    modules = dict(folded.named_modules())

    def make_conv_hook(t: BNTarget):
        live = t.gamma.abs() > 0
        safe_gamma = torch.where(live, t.gamma, torch.ones_like(t.gamma))

        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            m_y, s_y = channel_stats(out)
            k = t.std.to(out) / safe_gamma.to(out)
            mean_x = (m_y - t.beta.to(out)) * k + t.mean.to(out)
            std_x = s_y * k.abs()
            lv = live.to(out.device)
            stats[t.name] = (torch.where(lv, mean_x, t.mean.to(out)), torch.where(lv, std_x, t.std.to(out)))

        return hook

    def make_bn_hook(name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            stats[name] = channel_stats(args[0])

        return hook

    folded_bns = set()
    try:
        for conv_name, bn_name in folded_pairs:
            if bn_name in by_name:
                handles.append(modules[conv_name].register_forward_hook(make_conv_hook(by_name[bn_name])))
                folded_bns.add(bn_name)
        for t in targets:
            if t.name not in folded_bns and t.name in modules:
                handles.append(modules[t.name].register_forward_pre_hook(make_bn_hook(t.name)))
        yield stats
    finally:
        for h in handles:
            h.remove()


def bn_loss(targets: list[BNTarget], stats: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
            first_weight: float = 1.0) -> torch.Tensor:
    """ZeroQ's BN-statistics loss, averaged over layers:
    ``1/L * sum_l w_l (||mu_l - mu~_l||^2 + ||sigma_l - sigma~_l||^2) / C_l``.

    ``w_l`` is ``first_weight`` for the BN layer the forward pass reached first (the first key of ``stats``, which
    the capture hooks fill in execution order; DeepInversion's first-BN multiplier) and 1 for the others."""
    total = None
    first = next(iter(stats), None)
    for t in targets:
        if t.name not in stats:
            continue
        mean, std = stats[t.name]
        term = (mean - t.mean.to(mean)).pow(2).mean() + (std - t.std.to(std)).pow(2).mean()
        if t.name == first:
            term = first_weight * term
        total = term if total is None else total + term
    if total is None:
        raise NoBatchNormError("no BatchNorm layer was reached by the forward pass")
    return total / len(targets)
