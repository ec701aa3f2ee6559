"""BRECQ-style block reconstruction (Li et al., 2021) on distilled data.

Block after block (residual blocks, MBConv blocks, or single layers; :func:`zsq.recover.blocks.find_units`),
the roundings of all the block's layers (AdaRound variables, :class:`~zsq.recover.adaround.LearnedRounding`)
and, optionally, the step sizes of the block's activation quantizers (LSQ, Esser et al., 2020) are
learned jointly to minimise

    ||B~(x_q) - B(x)||^2 + lambda * sum_layers sum(1 - |2 h(V) - 1|^beta)

where ``B`` is the float block, ``B~`` the quantized block with soft rounding and learnable step sizes,
``x`` the float model's input to the block and ``x_q`` the *quantized* model's input to it, i.e. the output
of the already-reconstructed blocks before it (so errors of earlier blocks are compensated). The output
includes the block's trailing activation and output quantizer.

LSQ step sizes are parametrised as ``s = s0 * exp(u)`` (``s0``: the calibrated scale, ``u`` learned from
0), so one learning rate suits every quantizer whatever its range; the gradient of the fake-quantized
value with respect to ``s`` is LSQ's (``round(x/s) - x/s`` inside the range, the clip level outside),
and with respect to ``x`` the straight-through estimator (1 inside the range, 0 outside). The zero-point
stays as calibrated. After each block the hard roundings are written into the float weights and the step
sizes into the quantizers' ``scale`` buffers. With ``learn_bias`` the layers' biases are trained too (in
place; they stay float32 in zsq's model and become int32 at export), which corrects the mean shift that
coarse weights cause (bias correction, Nagel et al. 2019, learned here instead of measured).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ZsqError
from ..quant import primitives as P
from ..quant.modules import ActQuantizer
from .adaround import LearnedRounding, changed_codes, is_learnable, optimize_unit
from .refine import refine_last_layer
from .blocks import UnitData, UnitRunner, WeightFn, fisher_weights, reconstruct_sequentially

if TYPE_CHECKING:
    from . import RecoverContext, UnitReport

log = logging.getLogger(__name__)


class _LsqFakeQuantize(torch.autograd.Function):
    """Per-tensor fake quantization with LSQ gradients for both the input and the step size, and optionally
    QDrop's pass-through: where ``keep`` is True (1) the output is the input itself, unquantized.

    Forward: :func:`zsq.quant.primitives.fake_quantize_inside` (the values and the in-range mask). Backward, with
    ``v = round(x / s) + z``: ``dy/dx = 1`` where ``keep`` or ``qmin <= v <= qmax``, else 0; ``dy/ds = 0`` where
    ``keep``, else ``(y - x) / s`` inside the range and ``y / s`` (the clip level ``qmin - z`` or ``qmax - z``)
    outside it. One function instead of a quantizer, a ``torch.where`` and autograd's chain through both: about
    half the full-size passes over the activation, which for ImageNet-sized units is most of a BRECQ step.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                qmax: int, keep: torch.Tensor | None) -> torch.Tensor:
        y, passes = P.fake_quantize_inside(x, scale, zero_point, qmin, qmax)
        if keep is not None:
            # x where keep, y elsewhere: exact for 0/1 weights, and on CPU several times faster with a float mask
            # than torch.where with a random condition
            y = torch.lerp(y, x.detach(), keep.to(x.dtype))
            passes = passes | keep.bool()  # a mixed-dtype logical_or is an order of magnitude slower
        ctx.save_for_backward(x, y, passes, scale)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, out, passes, s = ctx.saved_tensors
        gx = grad * passes
        gs = None
        if ctx.needs_input_grad[1]:
            # sum(grad * (out - x)) over the elements the gradient passes (kept or in range) + sum(grad * out)
            # over the clipped ones == <grad, out> - <gx, x>: two dot products instead of full-size temporaries
            gs = torch.dot(grad.reshape(-1), out.reshape(-1)) - torch.dot(gx.reshape(-1), x.reshape(-1))
            gs = gs / s.to(x.dtype)
            gs = gs.reshape(s.shape).to(s.dtype)
        return (gx if ctx.needs_input_grad[0] else None), gs, None, None, None, None


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                      qmax: int, *, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` with a learnable (0-dim) ``scale``; gradients as in LSQ (Esser et al., 2020). Where
    ``keep`` (shaped like ``x``; boolean, or 0/1 in ``x``'s dtype: faster) is True, ``x`` passes through
    unquantized (QDrop)."""
    if keep is not None and keep.shape != x.shape:
        raise ZsqError(f"the keep mask must be shaped like the input {tuple(x.shape)}, got {tuple(keep.shape)}")
    return _LsqFakeQuantize.apply(x, scale, zero_point, qmin, qmax, keep)


class LearnedStepSize:
    """Learnable step size of one :class:`~zsq.quant.modules.ActQuantizer`: ``s = s0 * exp(u)``."""

    def __init__(self, quantizer: ActQuantizer) -> None:
        self.quantizer = quantizer
        self.s0 = quantizer.scale.detach().clone().float()
        self.u = torch.zeros((), device=self.s0.device, requires_grad=True)

    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.u)

    def parameters(self) -> list[torch.Tensor]:
        return [self.u]

    def __call__(self, x: torch.Tensor, *, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized ``x``; unquantized where ``keep`` (boolean, or 0/1 in ``x``'s dtype) is True (QDrop)."""
        q = self.quantizer
        if not q.enabled:
            return x
        qmin, qmax = q.qrange
        return lsq_fake_quantize(x, self.scale(), q.zero_point, qmin, qmax, keep=keep)

    @torch.no_grad()
    def write(self) -> float:
        """Store the learned step size in the quantizer's ``scale`` buffer; returns it."""
        s = self.scale().to(self.quantizer.scale.dtype)
        self.quantizer.scale.copy_(s.reshape(self.quantizer.scale.shape))
        return float(s)


def learnable_steps(gm: torch.nn.Module, names: list[str]) -> dict[str, LearnedStepSize]:
    """LSQ step sizes for the enabled, calibrated activation quantizers among ``names``."""
    out = {}
    for name in names:
        q = gm.get_submodule(name)
        if isinstance(q, ActQuantizer) and q.enabled and bool(q.calibrated) and q.observer is None:
            out[name] = LearnedStepSize(q)
    return out


def run(ctx: "RecoverContext") -> list["UnitReport"]:
    from . import UnitReport

    cfg = ctx.config
    gm = ctx.qmodel
    total = len(ctx.units)

    def train_block(unit: Any, runner: UnitRunner, data: UnitData) -> dict[str, Any]:
        index = ctx.units.index(unit)
        layers = {name: gm.get_submodule(name) for name in unit.layers}
        roundings = {name: LearnedRounding(m, learn_scale=bool(cfg.learn_weight_scale))
                     for name, m in layers.items() if is_learnable(m)}
        nearest = [r.layer.weight_quantizer.integer(r.layer.weight.detach()) for r in roundings.values()]
        steps = learnable_steps(gm, unit.act_quantizers) if cfg.learn_act_scale else {}
        biases = {name: m.bias for name, m in layers.items()
                  if cfg.learn_bias and is_learnable(m) and m.bias is not None}
        start = {name: b.detach().clone() for name, b in biases.items()}
        try:
            for b in biases.values():
                b.requires_grad_(True)
            info = optimize_unit(runner, data.xq, data.yf, roundings=roundings, steps=steps, config=cfg,
                                 generator=ctx.generator, desc=f"brecq {index + 1}/{total} {unit.name}",
                                 progress=ctx.progress, biases=list(biases.values()), weight=data.w,
                                 x_float=data.xf if cfg.input_drop else None)
        finally:
            for b in biases.values():
                b.requires_grad_(False)
        if biases:
            info["bias_change"] = {name: float((b.detach() - start[name]).abs().max()) for name, b in biases.items()}
        diff, numel = changed_codes(list(roundings.values()), nearest)
        for r in roundings.values():
            r.bake()
        scales = {}
        for name, s in steps.items():
            old = float(s.s0)
            scales[name] = {"from": old, "to": s.write()}
        info["changed_codes"] = diff / max(numel, 1)
        info["act_scales"] = scales
        if cfg.refine and unit.layers:
            last = unit.layers[-1]
            info["refine"] = refine_last_layer(runner, last, data.xq, data.yf, float_weight=ctx.float_weights[last],
                                               batch_size=cfg.eval_batch_size)
        return info

    def fisher(unit: Any, yf: torch.Tensor, fw: WeightFn) -> torch.Tensor:
        return fisher_weights(UnitRunner.after_unit(gm, unit), yf, weight_fn=fw, batch_size=cfg.eval_batch_size,
                              generator=ctx.generator, mix=float(cfg.fisher), samples=cfg.fisher_samples)

    reports = []
    for res in reconstruct_sequentially(gm, ctx.units, ctx.inputs, ctx.holdout, snapshot=ctx.float_weights,
                                        train_unit=train_block, eval_batch=cfg.eval_batch_size,
                                        output_weights=fisher if cfg.fisher else None,
                                        revert_worse=bool(cfg.revert_worse)):
        reports.append(UnitReport.from_sequential(res, iterations=int(res.info.get("iterations", 0))))
        log.info("brecq %s (%s): MSE %.4g -> %.4g in %.1fs", res.unit.name, res.unit.kind, res.mse_before,
                 res.mse_after, res.seconds)
        fb = res.info.get("harden_fallback")
        if fb and fb["kept"] == "rounded":
            log.info("brecq %s: the hardened rounding's error %.4g is above %.4g, the rounding from before hardening; "
                     "kept that one (harden_fallback)", res.unit.name, fb["hardened"], fb["rounded"])
    return reports


__all__ = ["LearnedStepSize", "learnable_steps", "lsq_fake_quantize", "run"]
