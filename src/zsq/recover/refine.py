"""Discrete refinement of a unit's last linear layer after its reconstruction (``RecoverConfig.refine``).

BRECQ learns a unit's roundings through soft, annealed variables on a noisy objective (QDrop, mini-batches), so the
hard rounding it bakes is not a minimum of the unit's actual error. For the unit's *last* layer, when nothing but
additions (a residual shortcut) and activation quantizers follow it, that error is an exact quadratic in the layer's
weight: with ``x`` the layer's input in the quantized model and ``t`` the output the layer would need for the unit's
output to equal the float model's,

    E(W) = sum_n || W x_n + b - t_n ||^2  =  sum_o  w_o^T H w_o - 2 w_o^T g_o + const,
    H = sum_n x_n x_n^T,   g_o = sum_n x_n (t_n,o - b_o).

Each output channel's row is then improved on its own by greedy one-flip coordinate descent: a weight may move
between the two codes its float value lies between (``floor`` and ``floor + 1``, so the rounding stays within one
step of nearest rounding and inside the code range); at every pass each row takes the flip that lowers ``E`` most,
until no flip lowers it. The gradient ``W H - g`` is updated in place, so a pass costs one (out x in) sweep.

The 8-bit output quantizer of the unit is left out of the quadratic (its rounding noise is uncorrelated with ``x``).
Only 1x1 convolutions (stride 1, no padding, one group) and linear layers qualify.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import ADD_TARGETS
from ..quant.modules import QUANT_LAYER_TYPES, ActQuantizer
from .adaround import write_codes
from .blocks import UnitRunner


def _layer_node(runner: UnitRunner, name: str) -> fx.Node | None:
    nodes = [n for n in runner.nodes if n.op == "call_module" and str(n.target) == name]
    return nodes[0] if len(nodes) == 1 else None


def _only_adds_and_quantizers_after(runner: UnitRunner, node: fx.Node) -> bool:
    """Whether every node on the way from ``node`` to the unit's output is an addition or an activation
    quantizer (so the unit's output is affine in the layer's output, up to the quantizer's rounding)."""
    inside = set(runner.nodes)
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is runner.output:
            continue
        users = [u for u in n.users if u in inside]
        if not users:
            return False  # the layer's output leaves the unit other than through its output
        for u in users:
            is_add = u.op in ("call_function", "call_method") and u.target in ADD_TARGETS
            if not (is_add or u.op == "call_module"
                    and isinstance(runner.gm.get_submodule(str(u.target)), ActQuantizer)):
                return False
            todo.append(u)
    return True


def _qualify(runner: UnitRunner, name: str) -> tuple[fx.Node | None, str | None]:
    """(the layer's node, ``None``) if layer ``name`` of the unit run by ``runner`` can be refined, else
    (``None``, why not)."""
    node = _layer_node(runner, name)
    if node is None:
        return None, "the layer is not called exactly once in the unit"
    mod = runner.gm.get_submodule(name)
    if not isinstance(mod, QUANT_LAYER_TYPES) or not getattr(mod, "quant_enabled", True):
        return None, "the layer is not quantized"
    if isinstance(mod, nn.Conv2d):
        if (mod.kernel_size != (1, 1) or mod.stride != (1, 1) or mod.groups != 1
                or mod.padding not in ((0, 0), "valid")):
            return None, "only 1x1 convolutions (stride 1, no padding, one group) and linear layers qualify"
    elif not isinstance(mod, nn.Linear):
        return None, "only 1x1 convolutions and linear layers qualify"
    if not _only_adds_and_quantizers_after(runner, node):
        return None, "something other than an addition or an activation quantizer follows the layer in the unit"
    return node, None


def refinable(runner: UnitRunner, name: str) -> str | None:
    """``None`` if layer ``name`` of the unit run by ``runner`` can be refined, else why not."""
    return _qualify(runner, name)[1]


def _rows(t: torch.Tensor, channels: int, *, conv: bool) -> torch.Tensor:
    """A conv layer's (N, C, H, W) or a linear layer's (..., C) activations as (samples, C) float64 rows."""
    if conv:
        t = t.movedim(1, -1)
    return t.reshape(-1, channels).double()


@torch.no_grad()
def refine_last_layer(runner: UnitRunner, name: str, x: torch.Tensor, target: torch.Tensor, *,
                      float_weight: torch.Tensor, batch_size: int, max_passes: int | None = None) -> dict[str, Any]:
    """Refine the codes of layer ``name`` (the unit's last layer) on the unit inputs ``x`` so that the unit's
    output approaches ``target`` (the float model's output of the unit), by greedy one-flip coordinate descent
    on the exact quadratic error (module docstring). ``float_weight`` is the layer's weight before
    quantization: the codes stay between ``floor`` and ``floor + 1`` of it. Writes the new codes into the
    layer's weight; returns what it did (``skipped`` with the reason when the layer does not qualify)."""
    node, why = _qualify(runner, name)
    if node is None:
        return {"skipped": why}
    mod = runner.gm.get_submodule(name)
    conv = isinstance(mod, nn.Conv2d)
    wq = mod.weight_quantizer
    cin, cout = mod.weight.shape[1], mod.weight.shape[0]
    h = torch.zeros(cin, cin, dtype=torch.float64, device=x.device)
    g = torch.zeros(cin, cout, dtype=torch.float64, device=x.device)
    bias = mod.bias
    for i in range(0, x.shape[0], batch_size):
        xin, out, y = runner(x[i:i + batch_size], capture=[node.args[0], node, runner.output])
        t = out + (target[i:i + batch_size] - y)  # what the layer's output should have been
        a, b = _rows(xin, cin, conv=conv), _rows(t, cout, conv=conv)
        if bias is not None:
            b = b - bias.detach().double()
        h += a.T @ a
        g += a.T @ b
    s, z = wq._params()
    s = s.double().reshape(-1, 1).expand(cout, 1)
    z = z.double().reshape(-1, 1).expand(cout, 1)
    qmin, qmax = wq.qrange
    wf = float_weight.detach().reshape(cout, cin)
    # floor(W / s) in the weight's own precision, as LearnedRounding takes it (in float64 a W / s that is an
    # integer in float32 can fall just below it, and its floor one step lower)
    fl = torch.floor(wf / s.to(wf.dtype)).double() + z
    lo, hi = torch.clamp(fl, qmin, qmax), torch.clamp(fl + 1, qmin, qmax)  # AdaRound's two choices, clipped
    codes = wq.integer(mod.weight.detach()).double().reshape(cout, cin)
    codes = torch.where(codes <= lo, lo, hi)  # (codes are either already; a code outside snaps to the nearer)
    w = (codes - z) * s
    grad = w @ h - g.T  # half the gradient of E with respect to w
    diag = torch.diagonal(h).reshape(1, -1)

    def energy(wt: torch.Tensor) -> float:
        return float(((wt @ h) * wt).sum() - 2 * (wt * g.T).sum())

    e0 = energy(w)
    flips = passes = 0
    limit = max_passes if max_passes is not None else 4 * cin
    tol = 1e-12 * max(abs(e0), 1e-30)
    rows = torch.arange(cout, device=x.device)
    while passes < limit:
        other = torch.where(codes == lo, hi, lo)
        delta = (other - codes) * s
        gain = 2 * delta * grad + delta * delta * diag
        gain = torch.where(delta != 0, gain, torch.zeros_like(gain))
        best, j = gain.min(dim=1)
        improve = best < -tol
        if not bool(improve.any()):
            break
        r, jj = rows[improve], j[improve]
        d = delta[r, jj]
        codes[r, jj] = other[r, jj]
        grad[r] += d.reshape(-1, 1) * h[jj]
        flips += int(r.numel())
        passes += 1
    w = (codes - z) * s
    e1 = energy(w)
    shape = mod.weight.shape
    write_codes(mod, codes.reshape(shape).to(torch.int32), s.reshape(-1, *[1] * (len(shape) - 1)),
                z.reshape(-1, *[1] * (len(shape) - 1)), what=f"refining {name}")
    return {"flips": flips, "share": flips / max(codes.numel(), 1), "passes": passes,
            "quadratic": [e0, e1]}


__all__ = ["refinable", "refine_last_layer"]
