"""Fake-quantization modules: weight quantizers inside conv/linear layers, activation quantizers
inserted into the traced graph where an integer runtime quantizes tensors."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NotCalibratedError
from . import primitives as P
from .observers import ActivationObserver


class WeightQuantizer(nn.Module):
    """Quantizes a weight tensor (per output channel along dim 0, or per tensor).

    Scales are computed from the weight itself by :meth:`calibrate_from` (no data needed).
    """

    def __init__(self, *, bits: int, symmetric: bool, per_channel: bool, channels: int, estimator: str = "minmax"):
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.per_channel = per_channel
        self.estimator = estimator
        n = channels if per_channel else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        if estimator == "output_mse":  # whether the range was fitted to calibration inputs (saved with the model)
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def axis(self) -> int | None:
        return 0 if self.per_channel else None

    @property
    def qrange(self) -> tuple[int, int]:
        return P.qrange(self.bits, self.symmetric)

    @property
    def needs_inputs(self) -> bool:
        """Whether the range still waits for calibration inputs (estimator ``output_mse``, not yet fitted)."""
        return self.estimator == "output_mse" and not bool(self.fitted)

    @torch.no_grad()
    def calibrate_from(self, w: torch.Tensor) -> None:
        """Set the range from the weight alone. ``output_mse`` starts from the ``mse`` range here;
        :func:`zsq.calibrate.calibrate` then fits it to the layer's inputs (:meth:`fit_output_error`)."""
        axis = self.axis
        if self.estimator in ("mse", "output_mse"):
            lo, hi = P.mse_weight_range(w, bits=self.bits, symmetric=self.symmetric, axis=axis)
        else:
            lo, hi = P.minmax(w, axis)
        s, z = P.scale_zero_point(lo, hi, bits=self.bits, symmetric=self.symmetric)
        self.scale.copy_(s.reshape(self.scale.shape).to(self.scale.device))
        self.zero_point.copy_(z.reshape(self.zero_point.shape).to(self.zero_point.device))

    @torch.no_grad()
    def fit_output_error(self, w: torch.Tensor, moments: torch.Tensor) -> None:
        """Set the per-channel range that minimises the expected output error of the weights ``w`` given the
        second moments of their inputs (:func:`zsq.quant.primitives.output_error_grid`; ``moments`` is
        ``(out_channels, K, K)`` with ``K`` the weights per output channel), and mark the range fitted."""
        if not self.per_channel:
            raise ValueError("fit_output_error needs a per-channel weight quantizer")
        s, z = P.output_error_grid(w.reshape(w.shape[0], -1), moments, bits=self.bits, symmetric=self.symmetric)
        self.scale.copy_(s.to(self.scale.device))
        self.zero_point.copy_(z.to(self.zero_point.device))
        if hasattr(self, "fitted"):
            self.fitted.fill_(True)

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel:
            return self.scale, self.zero_point
        return self.scale[0], self.zero_point[0]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s, z = self._params()
        qmin, qmax = self.qrange
        return P.fake_quantize(w, s, z, qmin, qmax, axis=self.axis)

    def integer(self, w: torch.Tensor) -> torch.Tensor:
        s, z = self._params()
        qmin, qmax = self.qrange
        return P.quantize(w, s, z, qmin, qmax, axis=self.axis)

    def extra_repr(self) -> str:
        g = "per_channel" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {g}, estimator={self.estimator}"


class ActQuantizer(nn.Module):
    """Fake-quantizes an activation tensor with a static, calibrated range.

    States: *observing* (pass-through, statistics go to ``observer``), *calibrated* (fake-quantize),
    *disabled* (pass-through; used for one-layer sensitivity). Running it uncalibrated raises
    :class:`~zsq.errors.NotCalibratedError`.
    """

    def __init__(self, *, bits: int, symmetric: bool, name: str = ""):
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.qname = name
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.observer: ActivationObserver | None = None
        self.enabled = True

    @property
    def qrange(self) -> tuple[int, int]:
        return P.qrange(self.bits, self.symmetric)

    def set_range(self, lo: float, hi: float) -> None:
        s, z = P.scale_zero_point(torch.tensor(lo), torch.tensor(hi), bits=self.bits, symmetric=self.symmetric)
        self.scale.copy_(s)
        self.zero_point.copy_(z)
        self.calibrated.fill_(True)

    def range(self) -> tuple[float, float]:
        qmin, qmax = self.qrange
        s, z = float(self.scale), int(self.zero_point)
        return (qmin - z) * s, (qmax - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if not self.enabled:
            return x
        if not bool(self.calibrated):
            raise NotCalibratedError(
                f"activation quantizer {self.qname!r} has no calibrated range: run zsq.calibrate(model, data) "
                "(or `zsq quantize`) before running the quantized model"
            )
        qmin, qmax = self.qrange
        return P.fake_quantize(x, self.scale, self.zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, calibrated={bool(self.calibrated)}"


class _QuantWeightMixin:
    """Shared behaviour of quantized conv/linear: the weight is fake-quantized on every forward."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer | None

    def _init_quant(self, wq: WeightQuantizer | None) -> None:
        if wq is not None:
            wq.to(self.weight.device)  # the quantizer's buffers live with the weights (a model on a GPU too)
        self.weight_quantizer = wq

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq is None or not getattr(self, "quant_enabled", True):
            return self.weight
        return wq(self.weight)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, wq: WeightQuantizer | None) -> "QuantConv2d":
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict())
        new._init_quant(wq)
        if wq is not None:
            wq.calibrate_from(new.weight.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv1d(_QuantWeightMixin, nn.Conv1d):
    @classmethod
    def from_float(cls, conv: nn.Conv1d, wq: WeightQuantizer | None) -> "QuantConv1d":
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict())
        new._init_quant(wq)
        if wq is not None:
            wq.calibrate_from(new.weight.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    @classmethod
    def from_float(cls, lin: nn.Linear, wq: WeightQuantizer | None) -> "QuantLinear":
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        new.load_state_dict(lin.state_dict())
        new._init_quant(wq)
        if wq is not None:
            wq.calibrate_from(new.weight.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


QUANT_MODULE_FOR: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Conv1d: QuantConv1d, nn.Linear: QuantLinear}
QUANT_LAYER_TYPES = (QuantConv2d, QuantConv1d, QuantLinear)
