"""Baseline calibration inputs."""

from __future__ import annotations

import torch

from ..models.preprocessing import Preprocessing


def gaussian_inputs(n: int, preprocessing: Preprocessing, *, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """``n`` standard-normal inputs in the model's normalised input space, clipped to the range real
    preprocessed pixels can take (ZeroQ's Gaussian baseline)."""
    g = torch.Generator().manual_seed(seed)
    h, w = preprocessing.input_size
    x = torch.randn(n, channels, h, w, generator=g)
    lo, hi = preprocessing.input_range()
    return torch.max(torch.min(x, hi.view(1, -1, 1, 1)), lo.view(1, -1, 1, 1))
