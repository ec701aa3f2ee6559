"""Context managers that change a model's mode or flags and always restore them (in ``finally``)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter; both restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for m, t in modes.items():
            m.training = t


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; each submodule's own train/eval flag restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, t in modes.items():
            m.training = t


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Float32 convolutions and matrix products in full precision for the duration: on GPUs that default to
    TF32 (10-bit mantissa) for them, an exactness check would otherwise see errors of ~1e-3 that are not the
    model's. The previous flags are restored afterwards; on a CPU this changes nothing."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul
