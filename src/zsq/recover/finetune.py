"""Quantization-aware fine-tuning on distilled data, blocks unfrozen in HAWQ order.

Loss: the distillation loss ``T^2 * KL(softmax(z_fp / T) || softmax(z_q / T))`` between the float model's
logits ``z_fp`` and the quantized model's ``z_q`` on the calibration (distilled) inputs; no label is used.
The forward pass is the quantized model's own: weights fake-quantized with their fixed scales and
straight-through rounding (the gradient reaches the float weights unchanged inside the quantization
range), activations fake-quantized, optionally with LSQ-learned step sizes
(:class:`~zsq.recover.brecq.LearnedStepSize`). Conv/linear weights and biases are trained with Adam and a
cosine learning-rate decay.

Order (HAWQ, Dong et al. 2019, "Hessian-aware multi-stage fine-tuning"): HAWQ quantizes and fine-tunes one
block per stage, blocks in *descending* order of ``Omega_i = lambda_i * ||Q(W_i) - W_i||^2`` (Hessian
sensitivity times the quantization perturbation), so that the blocks whose quantization hurts most are
fine-tuned first and the later, flatter blocks can compensate. zsq's model is already fully quantized, so
the order becomes progressive unfreezing: the units of :func:`zsq.recover.blocks.find_units` are sorted
by ``Omega`` from :func:`zsq.sensitivity.hessian.hessian_sensitivity` (per layer ``Omega`` at the layer's own
bit width, HAWQ-V2's average-trace statistic by default, summed over the unit's layers), and stage ``k``
trains the ``k`` most sensitive units; ``iters`` are split evenly over the stages. With ``unfreeze="all"``
everything is trained from the start (one stage). At the end each weight is replaced by its quantized
value (so the model's nearest rounding reproduces the fine-tuned codes) and learned step sizes are written
into the quantizers.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adaround import is_learnable, step_act
from .blocks import (LAYER_TYPES, ActFn, Unit, UnitRunner, batch_indices, module_act, quantized_weight,
                     unit_progress)
from .brecq import learnable_steps

if TYPE_CHECKING:
    from . import RecoverContext, UnitReport

log = logging.getLogger(__name__)


def distillation_kl(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(logits/T))``, averaged over the batch."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                    log_target=True) * (t * t)


def cosine_lr(base: float, step: int, total: int) -> float:
    """The learning rate at ``step`` of ``total`` on a cosine decay from ``base`` to 0."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / total))


def distillation_step(ctx: "RecoverContext", whole: UnitRunner, teacher: torch.Tensor, opt: torch.optim.Optimizer,
                      base_lrs: list[float], *, step: int, total: int, batches: Iterator[torch.Tensor],
                      act_fn: ActFn = module_act) -> float:
    """One Adam step of :func:`distillation_kl` on the whole quantized network (``whole``), shared by fine-tuning
    and the bias polish: each parameter group's learning rate on the cosine at ``step`` of ``total`` from its
    ``base_lrs`` entry, the learning inputs at the next indices of ``batches`` (:func:`learning_batches`),
    weights fake-quantized with straight-through rounding. Returns the step's loss."""
    for g, lr in zip(opt.param_groups, base_lrs):
        g["lr"] = cosine_lr(lr, step, total)
    idx = next(batches).to(ctx.inputs.device)
    loss = distillation_kl(whole(ctx.inputs[idx], weight_fn=quantized_weight, act_fn=act_fn), teacher[idx],
                           ctx.config.temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def learning_batches(ctx: "RecoverContext") -> Iterator[torch.Tensor]:
    """Mini-batch indices into ``ctx.inputs`` for :func:`distillation_step`: ``ctx.config.batch_size`` rows per
    step, drawn with ``ctx.generator`` as ``ctx.config.sampling`` says (:func:`zsq.recover.blocks.batch_indices`)."""
    n = ctx.inputs.shape[0]
    return batch_indices(n, min(int(ctx.config.batch_size), n), str(ctx.config.sampling or "random"), ctx.generator)


def unit_sensitivity(ctx: "RecoverContext", units: list[Unit]) -> dict[str, float]:
    """HAWQ ``Omega`` of each unit: the sum of its quantized layers' Hessian sensitivities at their bits."""
    from ..sensitivity.hessian import HessianConfig, hessian_sensitivity

    cfg = ctx.config
    gm = ctx.qmodel
    bits = sorted({gm.get_submodule(l).weight_quantizer.bits for u in units for l in u.layers
                   if is_learnable(gm.get_submodule(l))})
    if not bits:
        return {u.name: 0.0 for u in units}
    hcfg = HessianConfig(statistic="trace", trace_mode="gauss_newton", batch_size=min(cfg.batch_size,
                         ctx.inputs.shape[0]), max_batches=1, max_iterations=cfg.hessian_iterations,
                         min_iterations=min(3, cfg.hessian_iterations), seed=cfg.seed)
    table = hessian_sensitivity(gm, ctx.inputs, bits=bits, config=hcfg, device=ctx.device, progress=ctx.progress)
    omega = {}
    for u in units:
        total = 0.0
        for l in u.layers:
            mod = gm.get_submodule(l)
            if is_learnable(mod) and l in table.values:
                total += float(table.values[l][mod.weight_quantizer.bits])
        omega[u.name] = total
    return omega


def _trainable(gm: nn.Module, unit: Unit) -> list[torch.Tensor]:
    out = []
    for l in unit.layers:
        mod = gm.get_submodule(l)
        if isinstance(mod, LAYER_TYPES):
            out.append(mod.weight)
            if mod.bias is not None:
                out.append(mod.bias)
    return out


def run(ctx: "RecoverContext") -> list["UnitReport"]:
    from . import UnitReport

    cfg = ctx.config
    gm = ctx.qmodel
    units = [u for u in ctx.units if _trainable(gm, u)]
    teacher = ctx.teacher_logits(ctx.inputs)
    whole = UnitRunner.whole_model(gm)

    t0 = time.perf_counter()
    if cfg.unfreeze == "hawq":
        omega = unit_sensitivity(ctx, units)
        order = sorted(units, key=lambda u: (-omega[u.name], ctx.units.index(u)))
        stages = [order[: k + 1] for k in range(len(order))]
        log.info("HAWQ fine-tuning order (most sensitive first): %s", ", ".join(u.name for u in order))
    else:
        omega = {}
        stages = [units]
    ctx.extra["order"] = [{"unit": u.name, "omega": omega.get(u.name)} for u in (stages[-1] if stages else [])]
    ctx.extra["hessian_seconds"] = time.perf_counter() - t0

    params = {u.name: _trainable(gm, u) for u in units}
    steps = {u.name: (learnable_steps(gm, u.act_quantizers) if cfg.learn_act_scale else {}) for u in units}
    all_steps = {k: v for s in steps.values() for k, v in s.items()}
    groups = [{"params": [p for ps in params.values() for p in ps], "lr": cfg.lr}]
    step_params = [p for s in all_steps.values() for p in s.parameters()]
    if step_params:
        groups.append({"params": step_params, "lr": cfg.act_lr})
    opt = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in opt.param_groups]

    act_fn = step_act(all_steps)
    total = max(1, int(cfg.iters))
    per_stage = [total // len(stages) + (1 if k < total % len(stages) else 0) for k in range(len(stages))]
    step = 0
    reports = []
    batches = learning_batches(ctx)
    for k, (active, its) in enumerate(zip(stages, per_stage)):
        ts = time.perf_counter()
        active_names = {u.name for u in active}
        for u in units:
            on = u.name in active_names
            for p in params[u.name]:
                p.requires_grad_(on)
            for s in steps[u.name].values():
                s.u.requires_grad_(on)
        newest = active[-1]
        losses: list[float] = []
        bar = unit_progress(range(its), desc=f"finetune {k + 1}/{len(stages)} {newest.name if len(stages) > 1 else ''}",
                            progress=ctx.progress)
        for _ in bar:
            losses.append(distillation_step(ctx, whole, teacher, opt, base_lrs, step=step, total=total,
                                            batches=batches, act_fn=act_fn))
            step += 1
            if step % 25 == 0:
                bar.set_postfix(kl=f"{losses[-1]:.4g}")
        m = max(1, min(10, len(losses)))
        first = sum(losses[:m]) / m if losses else float("nan")
        last = sum(losses[-m:]) / m if losses else float("nan")
        reports.append(UnitReport(name=newest.name if len(stages) > 1 else "all", kind=newest.kind,
                                  layers=[l for u in active for l in u.layers] if len(stages) == 1 else newest.layers,
                                  iterations=its, seconds=time.perf_counter() - ts, metric="kl",
                                  loss_before=first, loss_after=last,
                                  info={"stage": k + 1, "trainable_units": [u.name for u in active]}))
        log.info("finetune stage %d/%d (+%s): KL %.4g -> %.4g", k + 1, len(stages), newest.name, first, last)

    with torch.no_grad():
        for u in units:
            for l in u.layers:
                mod = gm.get_submodule(l)
                if is_learnable(mod):
                    mod.weight.copy_(mod.quantized_weight())
        for s in all_steps.values():
            s.write()
    return reports


__all__ = ["cosine_lr", "distillation_kl", "distillation_step", "learning_batches", "unit_sensitivity", "run"]
