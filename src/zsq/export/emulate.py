"""Integer emulation: zsq's quantized model run with the arithmetic of its deployed int8 graph.

zsq's fake-quantized model computes each layer in float (``conv(dequantized x, dequantized w) + b``)
and then rounds to the next quantizer's grid. The ONNX graph that :func:`zsq.export.export_onnx`
writes computes the same values with integers in ONNX Runtime: an exact int32 accumulation, then a
float32 requantization with the runtime's own multiplier. Both are the same quantized model; they
differ only where a value lies within float rounding of a half step, where one rounds up and the
other down. On a deep network such one-code differences spread, and on an image whose top two
logits are nearly tied they can change the prediction (EfficientNet-Lite0: 3 of 500 images).

:class:`IntegerModel` evaluates the quantized model with the runtime's arithmetic, so that what zsq
reports is what the deployed model computes, image for image. It follows ONNX Runtime's x86 CPU
kernels (MLAS) for the operators the exporter's QDQ graph becomes:

* ``QuantizeLinear`` (the model input and any tensor computed in float): ``x / scale`` in float32,
  rounded half to even, plus the zero-point, saturated to the container;
* ``QLinearConv`` / ``QGemm`` requantization: int32 accumulation of ``(x - zx) * (w - zw)`` plus the
  int32 bias, converted to float32 and multiplied by the float32 ``x_scale * w_scale / y_scale``,
  rounded half to even;
* ``QLinearAdd`` (residual sums, and ``+ 0`` requantization onto another grid): the AVX2 kernel's
  fused multiply-adds ``a * (sa / sc) + (b * (sb / sc) + (zc - (sa / sc) * za - (sb / sc) * zb))``
  on the raw codes, rounded half to even (see ``_Emulator._qlinear_add`` for the exact order);
* ``QLinearGlobalAveragePool``: the int32 sum of the codes minus ``zx * N``, times the float32
  ``sx / (sy * N)``, rounded half to even;
* integer data movement (padding with the zero-point, max pooling, slicing, reshapes, ReLU at the
  zero-point) on the codes;
* a quantized layer whose output stays float (the classifier): ``float32(acc) * x_scale * w_scale``.

Anything else runs in float32 on dequantized values, as ONNX Runtime runs ``DQ -> op -> Q``. The
emulation assumes the integer products do not saturate: true for the exporter's default weight
containers (``weight_type="auto"``), not for 8-bit int8 weights on CPUs without VNNI.

:func:`zsq.export.layer_parity` with ``emulate=True`` checks the claim code by code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..graph import is_add, is_avg_pool, module_of, trace
from ..quant import primitives as P
from ..quant.modules import QUANT_LAYER_TYPES, ActQuantizer
from ..state import eval_mode

__all__ = ["IntegerModel", "integer_logits"]

F32 = torch.float32
F64 = torch.float64
UINT8_RANGE = (0, 255)
INT8_RANGE = (-128, 127)
FLOAT32_EXACT = 2.0**24  # integers up to this magnitude are exact in float32

# Nodes that move values without changing them: on a quantized tensor they move its codes.
_MOVE_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten,
                                              nn.MaxPool1d, nn.MaxPool2d)
_MOVE_FUNCTIONS: tuple[Any, ...] = (torch.flatten, torch.reshape, F.max_pool1d, F.max_pool2d, F.dropout,
                                    F.relu, torch.relu)
_MOVE_METHODS = ("flatten", "view", "reshape", "contiguous", "relu")
_SHAPE_ONLY_METHODS = ("flatten", "view", "reshape", "contiguous")


def _container(q: ActQuantizer) -> tuple[int, int]:
    """The ONNX container's range of ``q``'s codes (what the runtime saturates to)."""
    return INT8_RANGE if q.symmetric else UINT8_RANGE


def _f32(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F32)


def _per_channel(v: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """``v`` (one value per channel) shaped to broadcast against ``like`` along ``axis``, on its device."""
    shape = [1] * like.dim()
    shape[axis] = -1
    return v.reshape(shape).to(like.device)


def _round_f32(x64: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 with one rounding (a fused multiply-add's result, computed exactly in float64)."""
    return x64.to(F32)


class _Emulator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        # Values are kept to the end: a quantizer looks back past the node that last used them.
        super().__init__(gm, garbage_collect_values=False)
        self.gm_ = gm
        self.acc: dict[fx.Node, tuple[torch.Tensor, torch.Tensor, int]] = {}  # layer -> (int acc, x*w scale, axis)

    # -- graph helpers ---------------------------------------------------------------------------

    def _actq(self, n: Any) -> ActQuantizer | None:
        mod = module_of(self.gm_, n) if isinstance(n, fx.Node) else None
        return mod if isinstance(mod, ActQuantizer) and mod.enabled else None

    def _moves(self, n: fx.Node) -> bool:
        from ..models.cifar_resnet import ShortcutA

        if self._is_zero_pad(n):
            return True
        mod = module_of(self.gm_, n)
        if mod is not None:
            return isinstance(mod, (*_MOVE_MODULES, nn.ReLU, ShortcutA))
        if n.op == "call_function":
            return n.target in _MOVE_FUNCTIONS or n.target.__name__ == "getitem"
        return n.op == "call_method" and n.target in _MOVE_METHODS

    def grid_of(self, n: Any) -> ActQuantizer | None:
        """The activation quantizer on whose grid the value of ``n`` lies (through moves), or None."""
        for _ in range(64):
            if not isinstance(n, fx.Node):
                return None
            q = self._actq(n)
            if q is not None:
                return q
            if not self._moves(n) or not n.args:
                return None
            n = n.args[0]
        return None

    def codes_of(self, n: fx.Node, q: ActQuantizer) -> torch.Tensor:
        """Integer codes (as float32, exact) of the value of ``n`` on ``q``'s grid.

        The value is ``float32((c - z) * s)``; dividing by ``s`` lands within a few float32 ulps of the
        integer ``c - z`` (``|c - z| <= 255``), so rounding recovers it exactly."""
        return torch.round(self.env[n].to(F32) / _f32(float(q.scale))) + int(q.zero_point)

    def _is_zero_pad(self, n: fx.Node) -> bool:
        from ..models.efficientnet_lite import SamePad2d

        if isinstance(module_of(self.gm_, n), (SamePad2d, nn.ZeroPad2d)):
            return True
        if n.op == "call_function" and n.target is F.pad:
            mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
            value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else None)
            return mode == "constant" and not value
        return False

    def _producer(self, n: fx.Node, q: ActQuantizer) -> tuple[Any, list[fx.Node]]:
        """What computes the value quantized by ``q`` at ``n``, and the zero paddings on the way.

        Skips clamps that ``q``'s saturation makes redundant (the exporter drops them and the runtime
        clamps by saturating), reshapes, and zero paddings (the exporter merges them into the next
        convolution, which pads with the zero-point)."""
        from .onnx_qdq import _clip_bounds, _quantizer_saturates_within

        src = n.args[0]
        pads: list[fx.Node] = []
        for _ in range(16):
            if not isinstance(src, fx.Node):
                break
            bounds = _clip_bounds(self.gm_, src)
            if bounds is not None and _quantizer_saturates_within(q, *bounds):
                src = src.args[0]
            elif self._is_zero_pad(src):
                pads.append(src)
                src = src.args[0]
            elif src.op == "call_method" and src.target in _SHAPE_ONLY_METHODS or (
                    src.op == "call_function" and src.target in (torch.flatten, torch.reshape)) or isinstance(
                    module_of(self.gm_, src), (nn.Flatten, nn.Dropout, nn.Identity)):
                src = src.args[0]
            else:
                break
        return src, pads

    def _pad_codes(self, c: torch.Tensor, pads: list[fx.Node], q: ActQuantizer) -> torch.Tensor:
        """Apply the skipped zero paddings (innermost first) to codes: they pad with the zero-point."""
        z = int(q.zero_point)
        t = c - z
        for p in reversed(pads):
            mod = module_of(self.gm_, p)
            t = mod(t) if mod is not None else F.pad(t, *p.args[1:], **p.kwargs)
        return t + z

    # -- integer operators -------------------------------------------------------------------------

    def _requant_layer(self, src: fx.Node, q: ActQuantizer) -> torch.Tensor:
        acc, xw, axis = self.acc.pop(src)
        m = (xw / _f32(float(q.scale))).to(F32)  # runtime: x_scale * w_scale / y_scale in float32
        return torch.round(acc.to(F32) * _per_channel(m, acc, axis)) + int(q.zero_point)

    def _qlinear_add(self, a: torch.Tensor, qa: ActQuantizer, b: torch.Tensor | None, qb: ActQuantizer,
                     q: ActQuantizer) -> torch.Tensor:
        """MLAS's AVX2 QLinearAdd on raw codes; ``b=None``: B is the scalar zero-point code of ``qb``.

        The kernel computes ``fma(a, ra, fma(b, rb, fixed))`` in float32 with ``ra = sa / sc``,
        ``rb = sb / sc`` and ``fixed = zc - fma(ra, za, rb * zb)`` (its compiler contracts the
        constant's ``ra * za + rb * zb`` into one fused multiply-add; the unfused forms disagree with
        ONNX Runtime on about 2e-5 of the codes). A fused multiply-add rounds once: here its exact
        result is formed in float64 (the products of float32 scales and 8-bit codes are exact there)
        and rounded to float32. A scalar B is added to ``fixed`` the same way, which is the same as a
        tensor of zero-point codes."""
        sc = _f32(float(q.scale))
        ra = (_f32(float(qa.scale)) / sc).to(F32)
        rb = (_f32(float(qb.scale)) / sc).to(F32)
        za, zb, zc = int(qa.zero_point), int(qb.zero_point), int(q.zero_point)
        ra64, rb64 = float(ra), float(rb)
        rbzb = float((rb * zb).to(F32))
        fixed = float((_f32(float(zc)) - _round_f32(torch.tensor(ra64 * za + rbzb, dtype=F64))).to(F32))
        if b is None:
            b = torch.full_like(a, float(zb))
        inner = _round_f32(b.to(F64) * rb64 + fixed).to(F64)
        out = _round_f32(a.to(F64) * ra64 + inner)
        return torch.round(out)

    def _global_avg(self, x_codes: torch.Tensor, qx: ActQuantizer, q: ActQuantizer) -> torch.Tensor:
        n = x_codes.shape[-1] * x_codes.shape[-2]
        total = x_codes.to(F64).sum(dim=(-2, -1), keepdim=True) - int(qx.zero_point) * n
        scale = (_f32(float(qx.scale)) / (_f32(float(q.scale)) * _f32(float(n))).to(F32)).to(F32)
        return torch.round(total.to(F32) * scale) + int(q.zero_point)

    def act_codes(self, n: fx.Node, q: ActQuantizer) -> torch.Tensor:
        """The integer codes (as float32) the runtime gives activation quantizer ``q`` at node ``n``:
        saturated to its container, then clipped to ``q``'s range (the exporter's integer Clip)."""
        return self._quantize_codes(n, q).clamp(*_container(q)).clamp(*q.qrange)

    def _quantize_codes(self, n: fx.Node, q: ActQuantizer) -> torch.Tensor:
        src, pads = self._producer(n, q)
        c = self._integer_codes(n, src, q)
        if c is None:
            # QuantizeLinear of a float32 tensor: x / scale, rounded half to even.
            x = self.env[n.args[0]].to(F32)
            return torch.round(x / _f32(float(q.scale))) + int(q.zero_point)
        return self._pad_codes(c, pads, q) if pads else c

    def _integer_codes(self, n: fx.Node, src: Any, q: ActQuantizer) -> torch.Tensor | None:
        """The codes of ``q`` computed by the integer operator that produces ``src``, or None."""
        if isinstance(src, fx.Node):
            if src in self.acc:
                return self._requant_layer(src, q)
            g = self.grid_of(src)
            if g is not None:
                c = self.codes_of(src, g)
                if float(_f32(float(g.scale))) == float(_f32(float(q.scale))) and int(g.zero_point) == int(q.zero_point):
                    return c  # the same grid: the exporter quantizes nothing again
                return self._qlinear_add(c, g, None, g, q)  # requantized by ``+ 0`` (QLinearAdd)
            if is_add(src):
                ga, gb = self.grid_of(src.args[0]), self.grid_of(src.args[1])
                if ga is not None and gb is not None:
                    return self._qlinear_add(self.codes_of(src.args[0], ga), ga, self.codes_of(src.args[1], gb), gb, q)
            if is_avg_pool(self.gm_, src) or (src.op in ("call_function", "call_method") and src.target in (
                    torch.mean, "mean")):
                gx = self.grid_of(src.args[0])
                x = self.env[src.args[0]] if isinstance(src.args[0], fx.Node) else None
                out = self.env[src]
                if gx is not None and x is not None and x.dim() == 4 and out.numel() == x.shape[0] * x.shape[1]:
                    c = self._global_avg(self.codes_of(src.args[0], gx), gx, q)
                    return c.reshape(self.env[n.args[0]].shape)
        return None

    def _layer(self, n: fx.Node, mod: nn.Module, x: torch.Tensor, qx: ActQuantizer) -> torch.Tensor:
        """Integer accumulation of a quantized Conv/Linear on a quantized input; returns its float value."""
        from .onnx_qdq import bias_safe_weight_scale, int32_bias

        wq = mod.weight_quantizer
        xs = _f32(float(qx.scale))
        ws = wq.scale.detach().float().cpu()
        if wq.per_channel and mod.bias is not None:
            ws = bias_safe_weight_scale(mod.bias, xs, ws)
        qmin, qmax = wq.qrange
        s_, z_ = (ws, wq.zero_point.cpu()) if wq.per_channel else (ws[0], wq.zero_point.cpu()[0])
        w = P.quantize(mod.weight.detach().float().cpu(), s_, z_, qmin, qmax, axis=wq.axis).to(F32)
        zw = wq.zero_point.detach().cpu().to(F32)
        w = w - (zw.reshape(-1, *([1] * (w.dim() - 1))) if wq.per_channel else zw[0])
        xi = (self.codes_of(n.args[0], qx) - int(qx.zero_point)).to(x.device)
        # Every partial sum is an integer no larger than sum|w| * max|x - zx|: below 2^24 float32 holds
        # them all exactly (in any summation order), and its convolutions are much faster than float64's.
        bound = float(w.abs().flatten(1).sum(1).max()) * float(xi.abs().max()) if w.numel() else 0.0
        dt = F32 if bound < FLOAT32_EXACT else F64
        xi, w = xi.to(dt), w.to(dtype=dt, device=x.device)
        if isinstance(mod, nn.Linear):
            acc, axis = F.linear(xi, w), -1
        else:
            conv = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
            acc, axis = conv(xi, w, None, mod.stride, mod.padding, mod.dilation, mod.groups), 1
        acc = acc.to(F64)
        channels = mod.weight.shape[0]
        ws_full = ws.expand(channels) if ws.numel() == 1 else ws
        if mod.bias is not None:
            bq, _ = int32_bias(mod.bias, xs, ws_full)
            acc = acc + _per_channel(torch.from_numpy(bq).to(F64), acc, axis)
        xw = (xs * ws_full).to(F32)
        self.acc[n] = (acc, xw, axis % acc.dim())
        return acc.to(F32) * _per_channel(xw, acc, axis)

    # -- interpreter ---------------------------------------------------------------------------------

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        n = self.current
        mod = self.fetch_attr(target)
        if isinstance(mod, ActQuantizer) and mod.enabled:
            c = self.act_codes(n, mod)
            return P.dequantize(c.to(torch.int32), mod.scale.detach().float(), mod.zero_point.detach().float()).to(
                args[0].device)
        if isinstance(mod, QUANT_LAYER_TYPES) and getattr(mod, "quant_enabled", True) and hasattr(
                mod.weight_quantizer, "scale") and isinstance(n.args[0], fx.Node):
            qx = self.grid_of(n.args[0])
            if qx is not None:
                return self._layer(n, mod, args[0], qx)
        return super().call_module(target, args, kwargs)


class IntegerModel(nn.Module):
    """``qmodel`` evaluated with the integer arithmetic of its exported int8 graph (see the module doc).

    A drop-in model for evaluation: ``IntegerModel(q)(x)`` returns float32 logits, the same (to float32
    rounding of the final layer) as ONNX Runtime's for the graph ``export_onnx(q, ...)`` writes; every
    quantized tensor in between has the same integer codes. Inference only; shares ``qmodel``'s
    parameters (later changes to ``qmodel`` are seen). Call :func:`zsq.export.snap_biases` first
    when comparing with zsq's float model, as the exporter's parity checks do.
    """

    def __init__(self, qmodel: nn.Module, *, chunk: int = 32) -> None:
        super().__init__()
        if chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {chunk}")
        from .onnx_qdq import _reject_nonuniform, _require_calibrated

        _reject_nonuniform(qmodel)
        _require_calibrated(qmodel, before="emulating its integer arithmetic")
        self.gm = trace(qmodel)
        self.chunk = chunk  # images per pass: the emulation keeps every intermediate tensor of a pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            # GPU convolutions (TF32, Winograd/FFT algorithms) are not exact on integer data.
            raise ConfigError(f"integer emulation runs on the CPU; got inputs on {x.device} (evaluate with "
                              "--device cpu, or move the model and inputs to the CPU)")
        outs = []
        with eval_mode(self.gm), torch.no_grad():
            for i in range(0, x.shape[0], self.chunk):
                outs.append(_Emulator(self.gm).run(x[i:i + self.chunk].float()))
        return torch.cat(outs)


def integer_logits(qmodel: nn.Module, inputs: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """Logits of ``qmodel`` under integer emulation (:class:`IntegerModel`), in batches."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ConfigError(f"inputs must be a batched tensor (N, ...), got {type(inputs).__name__}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return IntegerModel(qmodel, chunk=batch_size)(inputs)
