"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

For a layer with weights ``W``, per-channel scale ``s`` and zero-point ``z`` (the layer's own
:class:`~zsq.quant.modules.WeightQuantizer`), the soft-quantized weight is

    W~ = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),    zeta = 1.1, gamma = -0.1

with one continuous variable ``V`` per weight, initialised so that ``h(V) = W/s - floor(W/s)`` (W~ = W
inside the range). ``V`` minimises

    ||f(W~ x_q) - f(W x)||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

where ``x_q`` is the layer's input in the quantized model (the earlier layers already rounded), ``x`` the
float model's input, ``f`` the activation right after the layer (if any), and the regulariser, switched
on after a warm-up, drives every ``h`` to 0 or 1 while ``beta`` is annealed from ``beta_start`` (only
values near 0.5 are pushed) to ``beta_end``. The learned rounding is ``h = 1`` iff ``V >= 0``; every code
is ``floor(W/s)`` or ``floor(W/s) + 1``, i.e. within one step of nearest rounding.

:class:`LearnedRounding` and :func:`optimize_unit` are shared with BRECQ (:mod:`zsq.recover.brecq`),
which applies the same rounding to all layers of a block at once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import torch
import torch.nn as nn

from ..errors import ZsqError
from ..quant.modules import QUANT_LAYER_TYPES, ActQuantizer
from .blocks import (ActFn, UnitData, UnitRunner, batch_indices, bernoulli_mask, float_weights, layer_tail, mse,
                     no_act, quantized_weight, reconstruct_sequentially, reconstruction_loss, same_layout,
                     unit_progress)

if TYPE_CHECKING:
    from . import RecoverContext, RecoverConfig, UnitReport

log = logging.getLogger(__name__)

ZETA = 1.1
GAMMA = -0.1
# A rounding variable counts as undecided at the end while its soft value h is still inside
# (UNDECIDED_LOW, 1 - UNDECIDED_LOW): the hard rounding then differs from what was optimised.
UNDECIDED_LOW = 0.01


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``h`` in [0, 1] (finite everywhere)."""
    p = (h.clamp(0.0, 1.0) - GAMMA) / (ZETA - GAMMA)
    return torch.log(p) - torch.log1p(-p)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h - 1|^beta)``: 0 when every ``h`` is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, iters: int, *, warmup: float, start: float, end: float) -> float | None:
    """Annealed exponent of the regulariser at ``step`` (``None`` during the warm-up: no regulariser)."""
    first = int(warmup * iters)
    if step < first:
        return None
    rel = (step - first) / max(1, iters - first)
    return end + (start - end) * max(0.0, 1.0 - rel)


def is_learnable(mod: nn.Module) -> bool:
    """A layer whose weight rounding can be learned: quantized, with its weight quantizer on."""
    return (isinstance(mod, QUANT_LAYER_TYPES) and mod.weight_quantizer is not None
            and getattr(mod, "quant_enabled", True))


class LearnedRounding:
    """The learnable rounding of one layer's weights (see the module docstring).

    With ``learn_scale`` the weight quantizer's scale is learned too, as ``s = s0 * exp(u)`` with one ``u``
    per output channel (one for a per-tensor quantizer), starting at 0: the integer part ``floor(W / s0)``
    stays fixed and only the step that multiplies the codes moves (the decoupling of Genie, Jeon et al.
    2023). :meth:`bake` then writes the learned scale into the quantizer as well.
    """

    def __init__(self, layer: nn.Module, *, learn_scale: bool = False) -> None:
        if not is_learnable(layer):
            raise ZsqError(f"layer {type(layer).__name__} has no active weight quantizer; nothing to round")
        wq = layer.weight_quantizer
        w = layer.weight.detach()
        shape = [-1] + [1] * (w.dim() - 1)
        if wq.per_channel:
            s = wq.scale.detach().to(w.dtype).reshape(shape)
            z = wq.zero_point.detach().to(w.dtype).reshape(shape)
        else:
            s = wq.scale.detach().to(w.dtype)[0]
            z = wq.zero_point.detach().to(w.dtype)[0]
        self.layer = layer
        self.scale, self.zero = s, z
        self.qmin, self.qmax = wq.qrange
        scaled = w / s
        self.floor = torch.floor(scaled)
        self.v = inverse_rectified_sigmoid(scaled - self.floor).detach().clone().requires_grad_(True)
        self.log_scale: torch.Tensor | None = None
        if learn_scale:
            self.log_scale = torch.zeros_like(s).requires_grad_(True)
        # Variables fixed to their hard rounding (RecoverConfig.harden): ``fixed`` marks them, ``fixed_up`` holds
        # their decision (1: rounded up); no gradient reaches them any more.
        self.fixed: torch.Tensor | None = None
        self.fixed_up: torch.Tensor | None = None

    def h(self, v: torch.Tensor | None = None) -> torch.Tensor:
        """The soft roundings ``h(V)`` (of ``v`` instead of ``V`` when given), fixed variables at their decision."""
        h = rectified_sigmoid(self.v if v is None else v)
        if self.fixed is not None:
            h = torch.where(self.fixed, self.fixed_up, h)
        return h

    @torch.no_grad()
    def fix(self, mask: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Fix the variables in ``mask`` (shaped like the weight) to their current hard rounding (``V >= 0``, or
        ``v >= 0`` for given values ``v``, e.g. a moving average of ``V``); variables fixed before keep their
        decision."""
        up = ((self.v if v is None else v) >= 0).to(self.floor.dtype)
        if self.fixed is None:
            self.fixed, self.fixed_up = torch.zeros_like(mask), torch.zeros_like(up)
        new = mask & ~self.fixed
        self.fixed_up = torch.where(new, up, self.fixed_up)
        self.fixed = self.fixed | new

    @property
    def num_fixed(self) -> int:
        return 0 if self.fixed is None else int(self.fixed.sum())

    def current_scale(self) -> torch.Tensor:
        """The step that multiplies the codes: ``s0``, or ``s0 * exp(u)`` when the scale is learned."""
        return self.scale if self.log_scale is None else self.scale * torch.exp(self.log_scale)

    def scale_parameters(self) -> list[torch.Tensor]:
        return [] if self.log_scale is None else [self.log_scale]

    def soft_weight(self) -> torch.Tensor:
        q = torch.clamp(self.floor + self.h() + self.zero, self.qmin, self.qmax)
        return (q - self.zero) * self.current_scale()

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The weight the learned codes stand for, ``(codes - z) * s``: what :meth:`bake` will write."""
        return (self.codes().to(self.floor.dtype) - self.zero) * self.current_scale()

    def regularizer(self, beta: float) -> torch.Tensor:
        return rounding_regularizer(self.h(), beta)

    def fraction(self) -> torch.Tensor:
        """``W/s0 - floor(W/s0)``: the soft rounding that reproduces the float weight (``h`` at the start)."""
        return (self.layer.weight.detach() / self.scale) - self.floor

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The learned integer codes (int32): ``floor(W/s) + [V >= 0] + z``, clamped to the grid."""
        up = (self.v >= 0).to(self.floor.dtype)
        if self.fixed is not None:
            up = torch.where(self.fixed, self.fixed_up, up)
        return torch.clamp(self.floor + up + self.zero, self.qmin, self.qmax).to(torch.int32)

    @torch.no_grad()
    def bake(self) -> torch.Tensor:
        """Write the learned codes into the layer's float weight as ``s * (codes - z)``, the value the
        layer's own nearest-rounding quantizer maps back to exactly these codes (with a learned scale, that
        scale is first written into the quantizer). Returns the codes."""
        codes = self.codes()
        scale = self.current_scale().detach()
        if self.log_scale is not None:
            wq = self.layer.weight_quantizer
            wq.scale.copy_(scale.reshape(wq.scale.shape))
            scale = wq._params()[0].to(scale.dtype).reshape(scale.shape)  # the stored value, as the quantizer sees it
        write_codes(self.layer, codes, scale, self.zero, what="baking the learned rounding")
        return codes

    @property
    def numel(self) -> int:
        return self.v.numel()


@torch.no_grad()
def write_codes(layer: nn.Module, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, what: str) -> None:
    """Write integer ``codes`` (shaped like the weight) into ``layer``'s float weight as ``scale * (codes - zero)``,
    the value the layer's own nearest-rounding quantizer maps back to exactly these codes, and check that it
    does (``what`` names the caller in the error)."""
    w = (codes.to(scale.dtype) - zero) * scale
    layer.weight.copy_(w.to(layer.weight.dtype))
    got = layer.weight_quantizer.integer(layer.weight)
    if not torch.equal(got, codes.to(got.dtype)):  # would mean the quantizer's parameters changed under us
        raise ZsqError(f"{what} failed: the weight quantizer does not reproduce the codes "
                       f"({int((got != codes.to(got.dtype)).sum())} differ)")


class StepLike(Protocol):
    def __call__(self, x: torch.Tensor, *, keep: torch.Tensor | None = None) -> torch.Tensor: ...

    def parameters(self) -> list[torch.Tensor]: ...


def step_act(steps: Mapping[str, StepLike]) -> ActFn:
    """An ``act_fn`` for :class:`~zsq.recover.blocks.UnitRunner`: the learned step size in ``steps`` where an
    activation quantizer has one, the quantizer itself otherwise."""
    def act_fn(name: str, mod: ActQuantizer, t: torch.Tensor) -> torch.Tensor:
        s = steps.get(name)
        return s(t) if s is not None else mod(t)

    return act_fn


def _cosine(lr: float, step: int, total: int) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


def optimize_unit(
    runner: UnitRunner,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    roundings: Mapping[str, LearnedRounding],
    steps: Mapping[str, StepLike],
    config: "RecoverConfig",
    generator: torch.Generator,
    desc: str,
    progress: bool,
    biases: Sequence[torch.Tensor] = (),
    weight: torch.Tensor | None = None,
    x_float: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Minimise reconstruction error + rounding regulariser over ``roundings`` (and LSQ ``steps``).

    Mini-batches of ``config.batch_size`` rows of ``x``/``target`` are drawn with ``generator``. Rounding
    variables use Adam at ``config.lr`` (constant), step sizes Adam at ``config.act_lr`` and learned weight
    scales (``config.learn_weight_scale``) Adam at ``config.weight_scale_lr`` and ``biases`` (the layers'
    own bias parameters, trained in place: the caller makes them trainable) Adam at ``config.bias_lr``
    (all three with a cosine decay). ``weight`` (shaped like ``target``) weighs each element's squared error.
    With ``config.drop_prob > 0`` each activation quantizer of the unit passes each element through
    unquantized with that probability (QDrop, Wei et al. 2022). With ``x_float`` (the float model's input to
    the unit, shaped like ``x``) and ``config.input_drop > 0``, each element of a mini-batch's input is taken
    from ``x_float`` instead of ``x`` with that probability (QDrop's mixing of the block input: the unit then
    learns to work on inputs between the quantized and the float model's, rather than to undo the exact
    errors of the units before it on the calibration inputs). Nothing is written into the model.
    """
    iters = int(config.iters)
    groups = []
    if roundings:
        groups.append({"params": [r.v for r in roundings.values()], "lr": config.lr})
    scale_params = [p for r in roundings.values() for p in r.scale_parameters()]
    if scale_params:
        groups.append({"params": scale_params, "lr": config.weight_scale_lr, "cosine": config.weight_scale_lr})
    step_params = [p for s in steps.values() for p in s.parameters()]
    if step_params:
        groups.append({"params": step_params, "lr": config.act_lr, "cosine": config.act_lr})
    if biases:
        groups.append({"params": list(biases), "lr": config.bias_lr, "cosine": config.bias_lr})
    if not groups or iters == 0:
        return {"iterations": 0}
    opt = torch.optim.Adam(groups)
    n = x.shape[0]
    bsz = min(config.batch_size, n)
    drop = float(config.drop_prob)
    input_drop = float(config.input_drop or 0.0)
    if input_drop > 0 and (x_float is None or x_float.shape != x.shape):
        raise ZsqError("input_drop needs the float model's input to the unit, shaped like the quantized model's "
                       f"({tuple(x.shape)}); got {None if x_float is None else tuple(x_float.shape)}")

    def weight_fn(name: str, mod: nn.Module) -> torch.Tensor:
        r = roundings.get(name)
        return r.soft_weight() if r is not None else quantized_weight(name, mod)

    learned_act = step_act(steps)

    def act_fn(name: str, mod: ActQuantizer, t: torch.Tensor) -> torch.Tensor:
        if drop > 0 and mod.enabled:
            keep_float = same_layout(bernoulli_mask(t.shape, drop, generator=generator, device=t.device,
                                                    dtype=t.dtype), t)
            step = steps.get(name)
            if step is not None:  # one fused function for the learned step size and the pass-through
                return step(t, keep=keep_float)
            return torch.lerp(mod(t), t, keep_float)  # t where keep_float is 1, exactly
        return learned_act(name, mod, t)

    anchor = _Anchor.build(runner, x, target, weight, roundings, float(config.anchor or 0.0), bsz,
                            weighting=str(config.anchor_weighting))
    harden = float(config.harden or 0.0)
    harden_from = iters - max(1, round(harden * iters)) if harden > 0 and roundings else None
    fallback = bool(config.harden_fallback) and harden_from is not None
    average = float(config.harden_average or 0.0) if harden_from is not None else 0.0
    v_avg = [r.v.detach().clone() for r in roundings.values()] if average > 0 else None
    batches = batch_indices(n, bsz, str(config.sampling or "random"), generator)
    before_hardening: _UnitState | None = None
    first = last = rec_v = reg_v = float("nan")
    bar = unit_progress(range(iters), desc=desc, progress=progress)
    for it in bar:
        if harden_from is not None and it >= harden_from:
            if fallback and before_hardening is None:
                before_hardening = _UnitState.capture(roundings, steps, biases)
            fix_most_decided(list(roundings.values()), (it - harden_from + 1) / (iters - harden_from), v_avg)
        idx = next(batches).to(x.device)
        xb = x[idx]
        if input_drop > 0:
            use_float = same_layout(bernoulli_mask(xb.shape, input_drop, generator=generator, device=xb.device), xb)
            xb = torch.where(use_float, x_float[idx], xb)
        y = runner(xb, weight_fn=weight_fn, act_fn=act_fn)
        rec = reconstruction_loss(y, target[idx], weight[idx] if weight is not None else None)
        beta = beta_at(it, iters, warmup=config.warmup, start=config.beta_start, end=config.beta_end)
        loss = rec
        reg = None
        if beta is not None and roundings:
            reg = config.reg_weight * sum(r.regularizer(beta) for r in roundings.values())
            loss = rec + reg
        if anchor is not None:
            loss = loss + anchor.penalty(roundings)
        for group in opt.param_groups:
            if "cosine" in group:
                group["lr"] = _cosine(group["cosine"], it, iters)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if v_avg is not None:
            with torch.no_grad():
                for a, r in zip(v_avg, roundings.values()):
                    a.mul_(average).add_(r.v, alpha=1.0 - average)
        rec_v = float(rec.detach())
        reg_v = float(reg.detach()) if reg is not None else 0.0
        if it == 0:
            first = rec_v
        last = rec_v
        if it % 25 == 0 or it == iters - 1:
            bar.set_postfix(rec=f"{rec_v:.4g}", reg=f"{reg_v:.4g}")
    info: dict[str, Any] = {"iterations": iters, "rec_first": first, "rec_last": last, "reg_last": reg_v}
    if before_hardening is not None:
        info["harden_fallback"] = _keep_better_rounding(runner, x, target, roundings, steps, biases,
                                                        before_hardening, batch_size=int(config.eval_batch_size))
    if roundings:
        with torch.no_grad():
            h = torch.cat([r.h().flatten() for r in roundings.values()])
            info["undecided"] = float(((h > UNDECIDED_LOW) & (h < 1.0 - UNDECIDED_LOW)).float().mean())
            info["rounding_variables"] = int(h.numel())
    return info


@dataclass
class _UnitState:
    """What :func:`optimize_unit` learns for one unit, copied: rounding variables (and which are fixed),
    learned weight scales, activation step sizes and biases."""

    v: list[torch.Tensor]
    fixed: list[tuple[torch.Tensor, torch.Tensor] | None]
    params: list[torch.Tensor]

    @staticmethod
    def _params(roundings: Mapping[str, LearnedRounding], steps: Mapping[str, StepLike],
                biases: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return ([p for r in roundings.values() for p in r.scale_parameters()]
                + [p for s in steps.values() for p in s.parameters()] + list(biases))

    @classmethod
    @torch.no_grad()
    def capture(cls, roundings: Mapping[str, LearnedRounding], steps: Mapping[str, StepLike],
                biases: Sequence[torch.Tensor]) -> "_UnitState":
        return cls(v=[r.v.detach().clone() for r in roundings.values()],
                   fixed=[None if r.fixed is None else (r.fixed.clone(), r.fixed_up.clone())  # type: ignore[union-attr]
                          for r in roundings.values()],
                   params=[p.detach().clone() for p in cls._params(roundings, steps, biases)])

    @torch.no_grad()
    def restore(self, roundings: Mapping[str, LearnedRounding], steps: Mapping[str, StepLike],
                biases: Sequence[torch.Tensor]) -> None:
        for r, v, fixed in zip(roundings.values(), self.v, self.fixed):
            r.v.copy_(v)
            r.fixed, r.fixed_up = (None, None) if fixed is None else (fixed[0].clone(), fixed[1].clone())
        for p, saved in zip(self._params(roundings, steps, biases), self.params):
            p.copy_(saved)


@torch.no_grad()
def _hard_error(runner: UnitRunner, x: torch.Tensor, target: torch.Tensor, roundings: Mapping[str, LearnedRounding],
                steps: Mapping[str, StepLike], *, batch_size: int) -> float:
    """The unit's error (per-element MSE) on ``x`` with the hard roundings of ``roundings`` and the step sizes of
    ``steps``, every quantizer on and no QDrop: what the unit's error will be once they are baked."""
    def weight_fn(name: str, mod: nn.Module) -> torch.Tensor:
        r = roundings.get(name)
        return r.hard_weight().to(mod.weight.dtype) if r is not None else quantized_weight(name, mod)

    return mse(runner.batched(x, batch_size=batch_size, weight_fn=weight_fn, act_fn=step_act(steps)), target)


def _keep_better_rounding(runner: UnitRunner, x: torch.Tensor, target: torch.Tensor,
                          roundings: Mapping[str, LearnedRounding], steps: Mapping[str, StepLike],
                          biases: Sequence[torch.Tensor], before: _UnitState, *, batch_size: int) -> dict[str, Any]:
    """``RecoverConfig.harden_fallback``: keep whichever is lower on the unit's learning inputs, the progressively
    hardened rounding (the current state) or the plain rounding of the soft variables as they stood when hardening
    began (``before``, with that moment's step sizes, scales and biases). Returns both errors, the choice and the
    seconds the two passes took."""
    t0 = time.perf_counter()
    hardened = _hard_error(runner, x, target, roundings, steps, batch_size=batch_size)
    after = _UnitState.capture(roundings, steps, biases)
    before.restore(roundings, steps, biases)
    rounded = _hard_error(runner, x, target, roundings, steps, batch_size=batch_size)
    kept = "rounded" if rounded < hardened else "hardened"
    if kept == "hardened":
        after.restore(roundings, steps, biases)
    return {"hardened": hardened, "rounded": rounded, "kept": kept, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def fix_most_decided(roundings: Sequence[LearnedRounding], share: float,
                     values: Sequence[torch.Tensor] | None = None) -> int:
    """Fix the most decided ``share`` (0..1) of all the rounding variables of ``roundings`` to their hard rounding
    (:meth:`LearnedRounding.fix`), counting those already fixed: the variables whose soft value ``h`` is farthest
    from 1/2 first. ``RecoverConfig.harden`` calls it at every step of the last part of a unit's optimisation with a
    share rising to 1, so the rounding that is baked is the one the last steps optimised (the variables still free
    learn to make up for those just fixed). With ``values`` (one tensor per rounding, shaped like its ``V``; e.g. a
    moving average of ``V``, ``RecoverConfig.harden_average``) the ranking and the side each variable is fixed to
    come from those instead of ``V``. Returns how many are fixed."""
    total = sum(r.numel for r in roundings)
    want = min(total, int(math.ceil(share * total)))
    if total == 0 or want <= sum(r.num_fixed for r in roundings):
        return sum(r.num_fixed for r in roundings)
    # fixed variables have h exactly 0 or 1, so they count as the most decided and stay fixed
    vals: Sequence[torch.Tensor | None] = [None] * len(roundings) if values is None else values
    if len(vals) != len(roundings):
        raise ZsqError(f"fix_most_decided got {len(vals)} value tensors for {len(roundings)} roundings")
    conf = [((r.h() if v is None else r.h(v)) - 0.5).abs() for r, v in zip(roundings, vals)]
    flat = torch.cat([c.flatten() for c in conf])
    threshold = torch.kthvalue(flat, total - want + 1).values
    for r, c, v in zip(roundings, conf, vals):
        r.fix(c >= threshold, v)
    return sum(r.num_fixed for r in roundings)


class _Anchor:
    """Pull of the soft roundings towards the float weights (``RecoverConfig.anchor``):

        anchor * L_near * sum(d * (h - f)^2) / sum(d * min(f, 1 - f)^2)

    over all the unit's rounding variables, with ``f`` the fractional part of ``W / s`` (``h = f`` reproduces
    the float weight), ``L_near`` the unit's reconstruction loss with nearest rounding on the learning inputs
    (so nearest rounding costs ``anchor * L_near``: the term is in the loss's own units) and ``d`` a weight per
    rounding variable: 1 (``anchor_weighting="uniform"``) or ``s^2 * E[x_c^2]`` (``"inputs"``: the layer's
    output error from that weight if its inputs were uncorrelated, with ``s`` the weight's step and ``E[x_c^2]``
    the mean square of the input channel it multiplies, on the learning inputs).

    It is GPTQ's dampening (a multiple of the diagonal added to the inputs' second moment) in rounding units:
    the reconstruction loss learns the inputs' correlations from a few calibration inputs only (and distilled
    inputs match the float model's per-channel statistics, not the correlations between channels), and the
    term charges every move away from the float weight as if the inputs were uncorrelated.
    """

    def __init__(self, frac: list[torch.Tensor], importance: list[torch.Tensor], factor: float) -> None:
        self.frac = frac
        self.importance = importance
        self.factor = factor

    @classmethod
    def build(cls, runner: UnitRunner, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
              roundings: Mapping[str, LearnedRounding], anchor: float, batch_size: int,
              weighting: str = "uniform") -> "_Anchor | None":
        if anchor <= 0 or not roundings:
            return None
        by_input = weighting == "inputs"
        with torch.no_grad():
            # one pass over the learning inputs: the unit's output with nearest rounding and, for "inputs",
            # each layer's input (reduced to its channels' mean squares batch by batch)
            by_target = {str(n.target): n for n in runner.nodes if n.op == "call_module"}
            srcs = [by_target[name].args[0] for name in roundings] if by_input else []
            outs: list[torch.Tensor] = []
            sq: list[torch.Tensor | float] = [0.0] * len(srcs)
            for i in range(0, x.shape[0], batch_size):
                *caps, y = runner(x[i:i + batch_size], capture=[*srcs, runner.output])
                outs.append(y)
                for k, c in enumerate(caps):
                    sq[k] = sq[k] + c.double().pow(2).mean(dim=[0, *range(2, c.dim())]) * c.shape[0]
            near = float(reconstruction_loss(torch.cat(outs), target, weight))
            frac = [r.fraction() for r in roundings.values()]
            if by_input:
                importance = [_input_importance(r, total / x.shape[0]) for r, total in zip(roundings.values(), sq)]
            else:
                importance = [torch.ones((), dtype=f.dtype, device=f.device) for f in frac]
            d_near = sum(float((d * torch.minimum(f, 1.0 - f).pow(2)).sum()) for d, f in zip(importance, frac))
        if not near > 0 or not d_near > 0:
            return None
        return cls(frac, importance, anchor * near / d_near)

    def penalty(self, roundings: Mapping[str, LearnedRounding]) -> torch.Tensor:
        return self.factor * sum((d * (r.h() - f).pow(2)).sum()
                                 for r, f, d in zip(roundings.values(), self.frac, self.importance))


def _input_importance(r: LearnedRounding, mean_square: torch.Tensor) -> torch.Tensor:
    """Per rounding variable of ``r``'s layer: ``s^2 * E[x_c^2]``, its step squared times ``mean_square`` (C_in,)
    of the input channel the weight multiplies (over the learning inputs and positions)."""
    ms = mean_square.to(r.v.dtype)
    w = r.layer.weight
    groups = int(getattr(r.layer, "groups", 1))
    o, cin_g = w.shape[0], w.shape[1]
    # input channel of weight [o, j]: group(o) * cin_g + j
    chan = (torch.arange(o, device=w.device) // (o // groups)).unsqueeze(1) * cin_g + torch.arange(cin_g, device=w.device)
    d = ms[chan].reshape(o, cin_g, *([1] * (w.dim() - 2))).expand_as(w)
    return d * r.scale.detach().pow(2)


def changed_codes(roundings: Sequence[LearnedRounding], nearest: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(codes that differ from nearest rounding, total codes)."""
    diff = sum(int((r.codes() != q).sum()) for r, q in zip(roundings, nearest))
    return diff, sum(r.numel for r in roundings)


def run(ctx: "RecoverContext") -> list["UnitReport"]:
    """AdaRound, layer by layer, in data-flow order; layers are visited block by block so that each layer's
    input is the quantized model's own (all earlier layers already rounded)."""
    from . import UnitReport

    cfg = ctx.config
    gm = ctx.qmodel
    fw = float_weights(ctx.float_weights)
    by_name = {n.name: n for n in gm.graph.nodes}
    total = len(ctx.units)

    def train_block(unit: Any, runner: UnitRunner, data: UnitData) -> dict[str, Any]:
        layers_info: dict[str, Any] = {}
        index = ctx.units.index(unit)
        for node_name in unit.nodes:
            node = by_name[node_name]
            mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if mod is None or not is_learnable(mod):
                continue
            name = str(node.target)
            src = node.args[0]
            (xl_q,) = runner.batched(data.xq, batch_size=cfg.eval_batch_size, capture=[src])
            (xl_f,) = runner.batched(data.xf, batch_size=cfg.eval_batch_size, weight_fn=fw, act_fn=no_act,
                                     capture=[src])
            tail = layer_tail(gm, node)
            lrun = UnitRunner(gm, [t.name for t in tail], src.name, tail[-1].name)
            target = lrun.batched(xl_f, batch_size=cfg.eval_batch_size, weight_fn=fw, act_fn=no_act)
            del xl_f
            rounding = LearnedRounding(mod, learn_scale=bool(cfg.learn_weight_scale))
            nearest = mod.weight_quantizer.integer(mod.weight.detach())
            info = optimize_unit(lrun, xl_q, target, roundings={name: rounding}, steps={}, config=cfg,
                                 generator=ctx.generator, desc=f"adaround {index + 1}/{total} {name}",
                                 progress=ctx.progress)
            diff, numel = changed_codes([rounding], [nearest])
            rounding.bake()
            info["changed_codes"] = diff / max(numel, 1)
            layers_info[name] = info
            del xl_q, target
        return {"layers": layers_info}

    reports = []
    for res in reconstruct_sequentially(gm, ctx.units, ctx.inputs, ctx.holdout, snapshot=ctx.float_weights,
                                        train_unit=train_block, eval_batch=cfg.eval_batch_size):
        iters = sum(v.get("iterations", 0) for v in res.info["layers"].values())
        reports.append(UnitReport.from_sequential(res, iterations=iters))
        log.info("adaround %s: MSE %.4g -> %.4g (%d layers, %.1fs)", res.unit.name, res.mse_before, res.mse_after,
                 len(res.info["layers"]), res.seconds)
    return reports


__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "inverse_rectified_sigmoid", "rounding_regularizer", "beta_at",
           "LearnedRounding", "optimize_unit", "is_learnable", "changed_codes", "step_act", "run"]
