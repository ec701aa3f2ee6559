"""Calibration: run calibration inputs through the model once (twice for histogram-based
estimators), collect activation statistics with observers, then set every activation
quantizer's static range with the chosen range estimator."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import ACT_ESTIMATORS
from .errors import ConfigError
from .quant.modules import ActQuantizer
from .quant.observers import ActivationObserver
from .quant.ranges import estimate_range, needs_histogram
from .state import eval_mode

log = logging.getLogger(__name__)

DEFAULT_BATCH = 32


def _batches(data: torch.Tensor | Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ConfigError(f"calibration data must be a non-empty batch of inputs (N, ...), got shape {tuple(data.shape)}")
        for i in range(0, data.shape[0], batch_size):
            yield data[i : i + batch_size]
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


@contextlib.contextmanager
def observing(model: nn.Module) -> Iterator[dict[str, ActivationObserver]]:
    """Attach a fresh observer to every activation quantizer; detach them (and restore mode) after."""
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    observers = {}
    with eval_mode(model):
        try:
            for n, q in quantizers.items():
                q.observer = ActivationObserver()
                observers[n] = q.observer
            yield observers
        finally:
            for q in quantizers.values():
                q.observer = None


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: torch.Tensor | Iterable,
    *,
    estimator: str | None = None,
    percentile: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """Set the static range of every activation quantizer of ``model`` from ``data``.

    ``estimator``/``percentile`` default to the model's :class:`~zsq.config.QuantConfig`. Returns
    ``{quantizer name: (lo, hi)}``.
    """
    cfg = getattr(model, "zsq_config", None)
    estimator = estimator or (cfg.act_estimator if cfg else "minmax")
    percentile = percentile if percentile is not None else (cfg.act_percentile if cfg else 99.99)
    if estimator not in ACT_ESTIMATORS:
        raise ConfigError(f"estimator={estimator!r} is not one of {', '.join(ACT_ESTIMATORS)}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    passes = 2 if needs_histogram(estimator) else 1
    if not isinstance(data, torch.Tensor):
        data = list(_batches(data, batch_size))  # iterate twice
    ranges: dict[str, tuple[float, float]] = {}
    with observing(model) as observers:
        if not observers:
            raise ConfigError("the model has no activation quantizers; call zsq.quantize(model, config) first")
        for p in range(passes):
            if p == 1:
                for o in observers.values():
                    o.start_histogram()
            batches = list(_batches(data, batch_size))
            desc = "calibrate" if passes == 1 else f"calibrate pass {p + 1}/{passes}"
            for x in tqdm(batches, desc=desc, disable=not progress, leave=False):
                model(x.to(device))
        quantizers = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
        for n, obs in observers.items():
            q = quantizers[n]
            lo, hi = estimate_range(obs, estimator, bits=q.bits, symmetric=q.symmetric, percentile=percentile, name=n)
            ranges[n] = (lo, hi)
    for n, (lo, hi) in ranges.items():
        quantizers[n].set_range(lo, hi)
    log.info("calibrated %d activation quantizers with %s", len(ranges), estimator)
    return ranges


def is_calibrated(model: nn.Module) -> bool:
    qs = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    return bool(qs) and all(bool(q.calibrated) for q in qs)
