"""Range estimators: turn observer statistics into a clipping range ``(lo, hi)``.

* ``minmax`` — the observed min and max (ZeroQ's choice);
* ``percentile`` — the ``p``-th percentile of the upper tail and the ``(100-p)``-th of the lower tail;
* ``mse`` — the range that minimises the expected quantization error (clipping + rounding) of the
  observed histogram, searched over shrunk versions of the min/max range.
The grid built from a range (:func:`~zsq.quant.primitives.scale_zero_point`) always widens it to contain 0.
"""

from __future__ import annotations

import torch

from ..errors import NotCalibratedError
from .observers import ActivationObserver
from .primitives import qrange, scale_zero_point

# Candidate shrink factors for the MSE search (fraction of the min/max range kept).
MSE_GRID = 100
MSE_MIN_RATIO = 0.05


def needs_histogram(estimator: str) -> bool:
    return estimator in ("percentile", "mse")


def _require(obs: ActivationObserver, name: str) -> None:
    if obs.min_val is None or obs.max_val is None:
        raise NotCalibratedError(
            f"activation quantizer {name!r} saw no data during calibration; the calibration data never "
            "reached this layer (check that the model's forward uses it)"
        )


def minmax_range(obs: ActivationObserver, name: str = "?") -> tuple[float, float]:
    _require(obs, name)
    return float(obs.min_val), float(obs.max_val)  # type: ignore[arg-type]


def percentile_range(obs: ActivationObserver, percentile: float, name: str = "?") -> tuple[float, float]:
    _require(obs, name)
    if obs.hist is None or obs.hist.sum() == 0:
        return minmax_range(obs, name)
    cdf = torch.cumsum(obs.hist, 0) / obs.hist.sum()
    edges = obs.bin_edges
    hi_idx = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=cdf.dtype)))
    lo_idx = int(torch.searchsorted(cdf, torch.tensor(1.0 - percentile / 100.0, dtype=cdf.dtype)))
    hi = float(edges[min(hi_idx + 1, len(edges) - 1)])
    lo = float(edges[lo_idx])
    lo_obs, hi_obs = float(obs.min_val), float(obs.max_val)  # type: ignore[arg-type]
    # Never widen beyond what was seen; a tail made of a single bin keeps its edge.
    return max(lo, lo_obs), min(hi, hi_obs)


def expected_mse(
    centers: torch.Tensor, counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, bits: int, symmetric: bool
) -> torch.Tensor:
    """Expected squared error of quantizing a histogram with each candidate range (vectorised over ranges)."""
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = scale_zero_point(lo, hi, bits=bits, symmetric=symmetric)
    scale = scale.double()[:, None]
    zp = zp.double()[:, None]
    q = torch.clamp(torch.round(centers[None, :] / scale) + zp, qmin, qmax)
    err = ((q - zp) * scale - centers[None, :]) ** 2
    inside = (q > qmin) & (q < qmax)
    # Within the grid, values spread over a bin round with error ~ uniform: add scale^2/12.
    err = torch.where(inside, scale**2 / 12.0, err)
    return (err * counts[None, :]).sum(dim=1)


def mse_range(obs: ActivationObserver, *, bits: int, symmetric: bool, name: str = "?") -> tuple[float, float]:
    _require(obs, name)
    if obs.hist is None or obs.hist.sum() == 0:
        return minmax_range(obs, name)
    edges = obs.bin_edges
    centers = (edges[:-1] + edges[1:]) / 2
    lo0, hi0 = float(obs.min_val), float(obs.max_val)  # type: ignore[arg-type]
    ratios = torch.linspace(MSE_MIN_RATIO, 1.0, MSE_GRID, dtype=torch.float64)
    lo_c = torch.minimum(torch.tensor(lo0, dtype=torch.float64) * ratios, torch.zeros(1, dtype=torch.float64))
    hi_c = torch.maximum(torch.tensor(hi0, dtype=torch.float64) * ratios, torch.zeros(1, dtype=torch.float64))
    errs = expected_mse(centers, obs.hist, lo_c, hi_c, bits=bits, symmetric=symmetric)
    best = int(torch.argmin(errs))
    return float(lo_c[best]), float(hi_c[best])


def estimate_range(
    obs: ActivationObserver, estimator: str, *, bits: int, symmetric: bool, percentile: float, name: str = "?"
) -> tuple[float, float]:
    if estimator == "minmax":
        return minmax_range(obs, name)
    if estimator == "percentile":
        return percentile_range(obs, percentile, name)
    if estimator == "mse":
        return mse_range(obs, bits=bits, symmetric=symmetric, name=name)
    raise ValueError(f"unknown range estimator {estimator!r}")
