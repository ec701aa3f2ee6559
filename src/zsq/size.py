"""Model size accounting: FP32 bytes vs quantized bytes (weights at their true bit width)."""

from __future__ import annotations

import torch.nn as nn

from .quant.modules import QUANT_LAYER_TYPES, ActQuantizer
from .quant.nonuniform import is_nonuniform

FP32_BYTES = 4
SCALE_BYTES = 4  # one float32 scale per channel (or tensor)


def fp32_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters stored as float32."""
    return sum(p.numel() for p in model.parameters()) * FP32_BYTES


def quantized_size_bytes(qmodel: nn.Module) -> int:
    """Bytes of a quantized model: quantized weights at ``wbits`` bits (rounded up to whole bytes per
    layer), plus float32 biases and per-channel scales (and 1-byte zero-points when asymmetric), plus
    every remaining float parameter at 4 bytes. Non-uniform (codebook) layers count their indices packed at
    ``wbits`` bits plus the codebook (2 bytes a level when it is float16-exact, else 4)."""
    total = 0
    counted: set[int] = set()
    for m in qmodel.modules():
        if isinstance(m, QUANT_LAYER_TYPES) and is_nonuniform(m.weight_quantizer):
            # packed wbits-bit codebook indices + the codebook (float16 when lossless, else float32)
            total += m.weight_quantizer.storage_bytes(m.weight.numel())
            counted.add(id(m.weight))
        elif isinstance(m, QUANT_LAYER_TYPES) and m.weight_quantizer is not None:
            wq = m.weight_quantizer
            total += (m.weight.numel() * wq.bits + 7) // 8
            total += wq.scale.numel() * (SCALE_BYTES + (0 if wq.symmetric else 1))
            counted.add(id(m.weight))
        if isinstance(m, ActQuantizer):
            total += SCALE_BYTES + 1
    for p in qmodel.parameters():
        if id(p) not in counted:
            total += p.numel() * FP32_BYTES
    return total
