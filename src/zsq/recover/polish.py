"""Network-output polish after recovery: the biases of the quantized layers tuned on the output KL.

Reconstruction (adaround, brecq) fits one unit at a time to the float model's output of that unit; nothing in it
looks at the network's output, and what a late unit learns to make up for is the error the units before it make
on the learning inputs. The polish (``RecoverConfig.polish``, ``--recover-polish N``) runs ``N`` Adam steps of
the distillation loss ``T^2 * KL(softmax(z_fp / T) || softmax(z_q / T))`` of the whole quantized network (the
same loss as :mod:`zsq.recover.finetune`) on the learning inputs, with everything fixed except the float biases
of the quantized conv/linear layers: every integer weight code stays as recovery baked it, every activation
range as it was. Biases are one parameter per output channel (about 22 thousand in EfficientNet-Lite0
against 160 learning inputs times 1000 logits), stay float in the exported model (int32 in ONNX QDQ), and
cost nothing at inference. The learning rate decays on a cosine from ``RecoverConfig.polish_lr`` to 0.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from ..quant.modules import QUANT_LAYER_TYPES
from .blocks import UnitRunner, unit_progress
from .finetune import distillation_step, learning_batches

if TYPE_CHECKING:
    from . import RecoverContext

log = logging.getLogger(__name__)


def polish_biases(ctx: "RecoverContext", *, iters: int, lr: float) -> dict[str, Any]:
    """Tune the biases of ``ctx.qmodel``'s quantized layers for ``iters`` steps on the network-output KL over
    ``ctx.inputs`` (mini-batches of ``ctx.config.batch_size`` drawn with ``ctx.generator``), in place.

    Returns what it did: steps, seconds, the number of biases and of their elements, the mean KL of the first
    and last ten steps, and the largest change of any bias element. Parameters' ``requires_grad`` flags are
    restored, also after an exception (the caller restores the weights themselves then)."""
    gm = ctx.qmodel
    biases = {name: m.bias for name, m in gm.named_modules()
              if isinstance(m, QUANT_LAYER_TYPES) and m.bias is not None}
    if not biases or iters <= 0:
        return {"iterations": 0, "biases": len(biases), "skipped": "no quantized layer has a bias" if not biases
                else "0 steps"}
    t0 = time.perf_counter()
    teacher = ctx.teacher_logits(ctx.inputs)
    start = {name: b.detach().clone() for name, b in biases.items()}
    whole = UnitRunner.whole_model(gm)
    flags = {name: b.requires_grad for name, b in biases.items()}
    opt = torch.optim.Adam(list(biases.values()), lr=lr)
    losses: list[float] = []
    try:
        for b in biases.values():
            b.requires_grad_(True)
        with torch.enable_grad():
            bar = unit_progress(range(iters), desc="polish biases", progress=ctx.progress)
            batches = learning_batches(ctx)
            for step in bar:
                losses.append(distillation_step(ctx, whole, teacher, opt, [lr], step=step, total=iters,
                                                batches=batches))
                if step % 25 == 0:
                    bar.set_postfix(kl=f"{losses[-1]:.4g}")
    finally:
        for name, b in biases.items():
            b.requires_grad_(flags[name])
    m = min(10, len(losses))
    info = {"iterations": iters, "seconds": time.perf_counter() - t0, "biases": len(biases),
            "elements": sum(b.numel() for b in biases.values()),
            "kl_first": sum(losses[:m]) / m, "kl_last": sum(losses[-m:]) / m,
            "max_change": max(float((b.detach() - start[name]).abs().max()) for name, b in biases.items())}
    log.info("polish: %d bias(es), %d steps, KL %.4g -> %.4g in %.1fs", info["biases"], iters, info["kl_first"],
             info["kl_last"], info["seconds"])
    return info


__all__ = ["polish_biases"]
