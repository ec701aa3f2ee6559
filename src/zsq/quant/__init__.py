"""Uniform fake quantization: pure primitives, observers, range estimators, modules, the quantize verb."""

from .apply import QuantReport, act_quantizers, quantize, weight_layers
from .modules import ActQuantizer, QuantConv1d, QuantConv2d, QuantLinear, WeightQuantizer

__all__ = ["quantize", "QuantReport", "act_quantizers", "weight_layers", "ActQuantizer", "WeightQuantizer",
           "QuantConv1d", "QuantConv2d", "QuantLinear"]
