"""Observers only accumulate statistics of activations; :mod:`zsq.quant.ranges` turns them into ranges.

Calibration makes (at most) two passes over the calibration data:
1. ``"minmax"``: running min and max of every observed tensor;
2. ``"histogram"`` (only when the range estimator needs it): a fixed-range histogram of the values
   between the min and max found in pass 1, so percentiles and the quantization MSE can be computed
   exactly from ``HIST_BINS`` bins without keeping the tensors.
"""

from __future__ import annotations

import torch

HIST_BINS = 2048


class ActivationObserver:
    """Accumulates min/max, then (optionally) a histogram, of every tensor passed to :meth:`observe`."""

    def __init__(self) -> None:
        self.phase = "minmax"
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None
        self.count = 0

    def start_histogram(self) -> None:
        if self.min_val is None:
            return
        self.phase = "histogram"
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.phase == "minmax":
            lo, hi = x.min().float().cpu(), x.max().float().cpu()
            self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
            self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
            self.count += x.numel()
        else:
            assert self.hist is not None and self.min_val is not None and self.max_val is not None
            lo, hi = float(self.min_val), float(self.max_val)
            if hi <= lo:
                self.hist[0] += x.numel()
                return
            h = torch.histc(x.float(), bins=HIST_BINS, min=lo, max=hi)
            self.hist += h.double().cpu()

    @property
    def bin_edges(self) -> torch.Tensor:
        assert self.min_val is not None and self.max_val is not None
        return torch.linspace(float(self.min_val), float(self.max_val), HIST_BINS + 1, dtype=torch.float64)
