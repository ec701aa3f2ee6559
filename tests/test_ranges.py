"""zsq.quant.observers + zsq.quant.ranges: statistics collection and range estimators."""

from __future__ import annotations

import pytest
import torch

from zsq.errors import NotCalibratedError, ZsqError
from zsq.quant import primitives as P
from zsq.quant.observers import HIST_BINS, ActivationObserver
from zsq.quant.ranges import (
    estimate_range,
    minmax_range,
    mse_range,
    needs_histogram,
    percentile_range,
)


def _observe_two_passes(batches: list[torch.Tensor]) -> ActivationObserver:
    """What calibration does: a min/max pass, then a histogram pass over the same data."""
    obs = ActivationObserver()
    for b in batches:
        obs.observe(b)
    obs.start_histogram()
    for b in batches:
        obs.observe(b)
    return obs


def _empirical_mse(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    s, z = P.scale_zero_point(torch.tensor(lo), torch.tensor(hi), bits=bits, symmetric=symmetric)
    qmin, qmax = P.qrange(bits, symmetric)
    return float((P.fake_quantize(x, s, z, qmin, qmax) - x).pow(2).mean())


# --------------------------------------------------------------------------------------------
# Observer
# --------------------------------------------------------------------------------------------


def test_observer_minmax_over_batches():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=gen) * (i + 1) + i for i in range(3)]
    obs = ActivationObserver()
    for b in batches:
        obs.observe(b)
    allx = torch.cat([b.flatten() for b in batches])
    assert float(obs.min_val) == float(allx.min())
    assert float(obs.max_val) == float(allx.max())
    assert obs.count == allx.numel()


def test_observer_histogram_counts_every_value():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(100, generator=gen) for _ in range(4)]
    obs = _observe_two_passes(batches)
    assert obs.phase == "histogram"
    assert obs.hist.shape == (HIST_BINS,)
    assert float(obs.hist.sum()) == 400.0
    edges = obs.bin_edges
    assert len(edges) == HIST_BINS + 1
    assert float(edges[0]) == pytest.approx(float(obs.min_val)) and float(edges[-1]) == pytest.approx(float(obs.max_val))


def test_observer_does_not_keep_graph():
    x = torch.randn(10, requires_grad=True)
    obs = ActivationObserver()
    obs.observe(x * 2)
    assert not obs.min_val.requires_grad and not obs.max_val.requires_grad


def test_start_histogram_without_data_keeps_observer_empty():
    obs = ActivationObserver()
    obs.start_histogram()
    assert obs.hist is None and obs.min_val is None


# --------------------------------------------------------------------------------------------
# minmax
# --------------------------------------------------------------------------------------------


def test_minmax_range_is_exact_min_max():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1000, generator=gen) * 3.3 + 0.1
    obs = _observe_two_passes([x])
    lo, hi = minmax_range(obs)
    assert lo == float(x.min()) and hi == float(x.max())
    assert estimate_range(obs, "minmax", bits=8, symmetric=False, percentile=99.9) == (lo, hi)


# --------------------------------------------------------------------------------------------
# percentile
# --------------------------------------------------------------------------------------------


def test_percentile_on_known_histogram_clips_outlier_exactly():
    """Bins of width 1 on [0, 2048]: 100 counts in each of bins 0..99 and one outlier in the last bin."""
    obs = ActivationObserver()
    obs.min_val, obs.max_val = torch.tensor(0.0), torch.tensor(float(HIST_BINS))
    obs.phase = "histogram"
    obs.hist = torch.zeros(HIST_BINS, dtype=torch.float64)
    obs.hist[:100] = 100.0
    obs.hist[-1] = 1.0
    lo, hi = percentile_range(obs, 99.9)
    assert hi == 100.0  # upper edge of the last bin holding the bulk; the outlier at 2048 is clipped
    assert lo == 0.0
    # 100th percentile keeps everything.
    assert percentile_range(obs, 100.0) == (0.0, float(HIST_BINS))


def test_percentile_clips_outliers_on_both_sides():
    gen = torch.Generator().manual_seed(3)
    bulk = torch.rand(20000, generator=gen) * 2 - 1  # uniform [-1, 1]
    x = torch.cat([bulk, torch.tensor([80.0, 95.0, 100.0, -60.0, -100.0])])
    x = x[torch.randperm(len(x), generator=gen)]
    obs = _observe_two_passes(list(x.split(4096)))
    lo, hi = percentile_range(obs, 99.9)
    mm_lo, mm_hi = minmax_range(obs)
    assert (mm_lo, mm_hi) == (-100.0, 100.0)
    bin_w = 200.0 / HIST_BINS
    assert 1.0 - 2 * bin_w <= hi <= 1.0 + 2 * bin_w
    assert -1.0 - 2 * bin_w <= lo <= -1.0 + 2 * bin_w
    # Clipping the outliers gives a much finer grid for the bulk.
    assert _empirical_mse(bulk, lo, hi, 8, False) < 0.05 * _empirical_mse(bulk, mm_lo, mm_hi, 8, False)


def test_percentile_never_widens_beyond_observed():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5000, generator=gen).abs() + 0.5  # strictly positive
    obs = _observe_two_passes([x])
    for p in (99.0, 99.99, 100.0):
        lo, hi = percentile_range(obs, p)
        assert float(x.min()) <= lo <= hi <= float(x.max())


def test_percentile_constant_data():
    obs = _observe_two_passes([torch.full((10, 10), 2.5)])
    lo, hi = percentile_range(obs, 99.9)
    assert lo == hi == 2.5


def test_percentile_without_histogram_falls_back_to_minmax():
    obs = ActivationObserver()
    obs.observe(torch.tensor([-1.0, 3.0]))
    assert percentile_range(obs, 99.0) == (-1.0, 3.0)


# --------------------------------------------------------------------------------------------
# mse
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_beats_minmax_on_heavy_tails(bits, symmetric):
    gen = torch.Generator().manual_seed(5)
    # Student-t like: normal divided by sqrt of a small chi-square -> heavy tails.
    n = torch.randn(40000, generator=gen)
    chi = torch.randn(40000, 2, generator=gen).pow(2).mean(dim=1)
    x = n / chi.sqrt().clamp_min(0.05)
    obs = _observe_two_passes(list(x.split(10000)))
    lo, hi = mse_range(obs, bits=bits, symmetric=symmetric)
    mm_lo, mm_hi = minmax_range(obs)
    assert mm_lo <= lo <= 0.0 <= hi <= mm_hi
    assert (lo, hi) != (mm_lo, mm_hi)
    err, err_mm = _empirical_mse(x, lo, hi, bits, symmetric), _empirical_mse(x, mm_lo, mm_hi, bits, symmetric)
    assert err < err_mm
    if bits == 4:
        assert err < 0.5 * err_mm
    # Close to the best shrink factor found by brute force on the raw samples.
    best = min(_empirical_mse(x, mm_lo * r, mm_hi * r, bits, symmetric) for r in torch.linspace(0.05, 1, 40).tolist())
    assert err <= 1.05 * best
    assert estimate_range(obs, "mse", bits=bits, symmetric=symmetric, percentile=99.9) == (lo, hi)


def test_mse_range_keeps_zero_inside():
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(5000, generator=gen) + 1.0  # [1, 2]
    obs = _observe_two_passes([x])
    lo, hi = mse_range(obs, bits=8, symmetric=False)
    assert lo <= 0.0 <= hi


def test_mse_range_on_uniform_data_keeps_most_of_range():
    """No outliers: shrinking a lot only adds clipping error."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(20000, generator=gen) * 2 - 1
    obs = _observe_two_passes([x])
    lo, hi = mse_range(obs, bits=8, symmetric=False)
    assert hi > 0.9 and lo < -0.9


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["minmax", "percentile", "mse"])
def test_observer_that_saw_nothing_raises_not_calibrated(estimator):
    obs = ActivationObserver()
    obs.start_histogram()
    with pytest.raises(NotCalibratedError, match="layer_x") as info:
        estimate_range(obs, estimator, bits=8, symmetric=False, percentile=99.9, name="layer_x")
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ZsqError)


def test_unknown_estimator():
    obs = _observe_two_passes([torch.randn(10)])
    with pytest.raises(ValueError, match="bogus"):
        estimate_range(obs, "bogus", bits=8, symmetric=False, percentile=99.9)


def test_needs_histogram():
    assert not needs_histogram("minmax")
    assert needs_histogram("percentile") and needs_histogram("mse")
