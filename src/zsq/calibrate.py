"""Calibration: run calibration inputs through the model once (twice for histogram-based
estimators), collect activation statistics with observers, then set every activation
quantizer's static range with the chosen range estimator.

Weight quantizers with the ``output_mse`` estimator also need data: before the activation statistics, one
pass collects the second moments of their layers' inputs (:class:`InputMoments`) and fits their ranges.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import ACT_ESTIMATORS
from .errors import ConfigError
from .quant.modules import QUANT_LAYER_TYPES, ActQuantizer, WeightQuantizer
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


class InputMoments:
    """Accumulates, for one conv/linear layer, the second moment ``E[p p^T]`` of the inputs each output channel
    multiplies (``p``: a flattened input patch of ``K = in/groups * kernel`` values), over every position."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.sum: torch.Tensor | None = None  # (groups, K, K), float64
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        mod = self.layer
        x = x.detach().float()
        if isinstance(mod, nn.Linear):
            flat = x.reshape(-1, x.shape[-1])
            part = (flat.T @ flat).unsqueeze(0)
            n = flat.shape[0]
        else:  # Conv2d (zsq.quant.apply.output_mse_applies)
            groups = mod.groups
            part, n = 0, 0
            for i in range(x.shape[0]):  # one image at a time: the unfolded patches of a batch can be large
                p = F.unfold(x[i:i + 1], mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                             stride=mod.stride)
                p = p.reshape(groups, -1, p.shape[-1])
                part = part + p @ p.transpose(1, 2)
                n += p.shape[-1]
        part = part.double()
        self.sum = part if self.sum is None else self.sum + part
        self.count += n

    def moments(self) -> torch.Tensor:
        """``(out_channels, K, K)``: each output channel's input second moment."""
        if self.sum is None or self.count == 0:
            raise ConfigError("no calibration input reached this layer; cannot fit its output_mse weight range")
        per_group = (self.sum / self.count).float()
        out = self.layer.weight.shape[0]
        return per_group.repeat_interleave(out // per_group.shape[0], dim=0)


def _waiting_for_inputs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)
            and isinstance(m.weight_quantizer, WeightQuantizer) and m.weight_quantizer.needs_inputs}


@torch.no_grad()
def fit_weight_ranges(
    model: nn.Module,
    data: torch.Tensor | list,
    *,
    batch_size: int = DEFAULT_BATCH,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[str]:
    """Fit the range of every ``output_mse`` weight quantizer that has not been fitted yet to the inputs its
    layer sees on ``data`` (activation quantizers pass through meanwhile). A fitted range stays: learned
    rounding (``zsq.recover``) builds on it. Returns the names of the layers fitted."""
    layers = _waiting_for_inputs(model)
    if not layers:
        return []
    stats = {n: InputMoments(m) for n, m in layers.items()}
    handles = []
    with observing(model):
        try:
            for n, m in layers.items():
                handles.append(m.register_forward_pre_hook(lambda mod, args, st=stats[n]: st.add(args[0])))
            for x in tqdm(list(_batches(data, batch_size)), desc="fit weight ranges", disable=not progress,
                          leave=False):
                model(x.to(device))
        finally:
            for h in handles:
                h.remove()
    for n, m in layers.items():
        m.weight_quantizer.fit_output_error(m.weight.detach(), stats[n].moments())
    log.info("fitted the output_mse weight ranges of %d layers", len(layers))
    return list(layers)


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
    fit_weight_ranges(model, data, batch_size=batch_size, device=device, progress=progress)
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
