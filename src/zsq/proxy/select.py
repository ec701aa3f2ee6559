"""ZeroP proxy-data selection: the BatchNorm-statistics distance of a candidate data set, the
ranking of candidates, and calibration inputs drawn from the best one.

BN distance (``normalization="layer"``, the default). For every BatchNorm layer ``l`` with ``C_l``
channels, let ``mu_b, var_b`` be the per-channel mean and (biased) variance of the layer's *input*
over all ``N x H x W`` positions of the candidate sample, and ``mu_r, var_r`` its running statistics.
With ``sigma = sqrt(var + eps_l)`` (``eps_l`` the layer's own epsilon, i.e. the std BN divides by)::

    d_l = (||mu_b - mu_r||_2 + ||sigma_b - sigma_r||_2) / ||sigma_r||_2
    D   = mean over the BN layers reached by the forward pass of d_l

Dividing by ``||sigma_r||_2`` (the layer's root-mean-square running std times ``sqrt(C_l)``) makes
``d_l`` independent of the layer's width and of the scale of its activations, so every layer counts
alike; ``D = 0`` exactly when the sample reproduces the running statistics. Alternatives:
``"channel"`` normalises each channel by its own ``sigma_r`` (``d_l = (||(mu_b - mu_r) / sigma_r|| +
||(sigma_b - sigma_r) / sigma_r||) / sqrt(C_l)``; near-dead channels, whose ``sigma_r`` is about
``sqrt(eps)``, can dominate it) and ``"none"`` is the plain per-channel RMS error (``/ sqrt(C_l)``),
dominated by the layers with the largest activations.

The sample statistics are pooled exactly over the forward batches (Chan's parallel mean/variance
update in float64), so ``D`` does not depend on ``batch_size``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..bn_stats import BNTarget, capture_bn_inputs, require_batchnorm
from ..errors import ConfigError, NoBatchNormError
from ..models.preprocessing import Preprocessing
from ..state import frozen_eval
from .candidates import Candidate, load_candidate, parse_candidates

log = logging.getLogger(__name__)

__all__ = [
    "NORMALIZATIONS",
    "ProxyScore",
    "bn_distance",
    "bn_input_stats",
    "mix_with_distilled",
    "proxy_inputs",
    "rank_candidates",
]

NORMALIZATIONS = ("layer", "channel", "none")
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class ProxyScore:
    """BN distance of one candidate (lower = closer to the training statistics)."""

    candidate: str
    distance: float
    num_images: int
    layer_distances: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written by ``zsq proxy rank --json``: ``{"candidate", "distance"}`` (``distance``
        None where it is not finite)."""
        return {"candidate": self.candidate, "distance": self.distance if math.isfinite(self.distance) else None}


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization={normalization!r} is not one of {', '.join(NORMALIZATIONS)}")


def bn_distance(
    targets: Sequence[BNTarget],
    stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    normalization: str = "layer",
) -> tuple[float, dict[str, float]]:
    """``(D, {layer: d_l})`` for batch statistics ``stats[name] = (mean, std)`` of each BN input
    (``std`` without epsilon, as :func:`zsq.bn_stats.capture_bn_inputs` records it); see the module
    docstring for the formula. Layers missing from ``stats`` are left out of the mean."""
    _check_normalization(normalization)
    per_layer: dict[str, float] = {}
    for t in targets:
        if t.name not in stats:
            continue
        mean_b, std_b = (v.detach().to("cpu", torch.float64) for v in stats[t.name])
        eps = float(getattr(t.module, "eps", 0.0))
        mu_r, sigma_r = t.mean.to(torch.float64), t.std.to(torch.float64)
        sigma_b = torch.sqrt(std_b.square() + eps)
        dmu, dsigma = mean_b - mu_r, sigma_b - sigma_r
        if normalization == "layer":
            d = (dmu.norm() + dsigma.norm()) / sigma_r.norm().clamp_min(1e-12)
        elif normalization == "channel":
            s = sigma_r.clamp_min(1e-12)
            d = ((dmu / s).norm() + (dsigma / s).norm()) / math.sqrt(dmu.numel())
        else:
            d = (dmu.norm() + dsigma.norm()) / math.sqrt(dmu.numel())
        per_layer[t.name] = float(d)
    if not per_layer:
        raise NoBatchNormError("no BatchNorm layer was reached by the forward pass; the BN distance needs the "
                               "model's BatchNorm layers to run (is the model's BN folded or bypassed?)")
    return sum(per_layer.values()) / len(per_layer), per_layer


@contextlib.contextmanager
def _on_device(model: nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """Run ``model`` on ``device`` (default: where it is); move it back afterwards."""
    p = next(model.parameters(), None)
    orig = p.device if p is not None else torch.device("cpu")
    dev = torch.device(device) if device is not None else orig
    try:
        model.to(dev)
        yield dev
    finally:
        model.to(orig)


@torch.no_grad()
def bn_input_stats(
    model: nn.Module,
    targets: Sequence[BNTarget],
    inputs: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH,
    device: torch.device | str = "cpu",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel ``(mean, std)`` (float64, CPU) of every BN layer's input over all of ``inputs``,
    pooled exactly across the forward batches. ``model`` must already be on ``device``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        raise ConfigError("inputs must be a non-empty batch tensor (N, C, H, W)")
    # per layer: (count, mean, M2) -- counts in images; every batch has the same H x W per layer
    acc: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
    with frozen_eval(model), capture_bn_inputs(list(targets)) as stats:
        for start in range(0, inputs.shape[0], batch_size):
            xb = inputs[start:start + batch_size].to(device)
            stats.clear()
            model(xb)
            nb = float(xb.shape[0])
            for name, (m, s) in stats.items():
                m = m.detach().to("cpu", torch.float64)
                m2 = s.detach().to("cpu", torch.float64).square() * nb
                if name not in acc:
                    acc[name] = (nb, m, m2)
                    continue
                na, ma, m2a = acc[name]
                n = na + nb
                delta = m - ma
                acc[name] = (n, ma + delta * (nb / n), m2a + m2 + delta.square() * (na * nb / n))
    return {name: (mean, torch.sqrt((m2 / n).clamp_min(0.0))) for name, (n, mean, m2) in acc.items()}


def _score(model: nn.Module, targets: list[BNTarget], c: Candidate, x: torch.Tensor, *, batch_size: int,
           device: torch.device, normalization: str) -> ProxyScore:
    stats = bn_input_stats(model, targets, x, batch_size=batch_size, device=device)
    d, per_layer = bn_distance(targets, stats, normalization=normalization)
    if not math.isfinite(d):
        log.warning("proxy candidate %s: the BN distance is not finite (%s); it ranks last", c.text, d)
        d = math.inf
    return ProxyScore(candidate=c.text, distance=d, num_images=int(x.shape[0]), layer_distances=per_layer)


def _check_args(preprocessing: Preprocessing, num_images: int, normalization: str) -> None:
    if not isinstance(preprocessing, Preprocessing):
        raise ConfigError(f"preprocessing must be a zsq Preprocessing, got {type(preprocessing).__name__}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ConfigError(f"num_images must be a positive integer, got {num_images!r}")
    _check_normalization(normalization)


def _rank(model: nn.Module, preprocessing: Preprocessing, cands: list[Candidate], *, num_images: int, seed: int,
          device: str | torch.device | None, progress: bool, normalization: str, batch_size: int,
          keep_best: bool) -> tuple[list[ProxyScore], torch.Tensor | None]:
    targets = require_batchnorm(model, what="ZeroP proxy selection (BN-statistics distance)")
    scores: list[ProxyScore] = []
    best: tuple[float, torch.Tensor] | None = None
    with _on_device(model, device) as dev:
        for c in tqdm(cands, desc="proxy candidates", disable=not progress, leave=False):
            x = load_candidate(c, preprocessing, num_images=num_images, seed=seed)
            s = _score(model, targets, c, x, batch_size=batch_size, device=dev, normalization=normalization)
            log.info("proxy candidate %s: BN distance %.4f on %d images", c.text, s.distance, s.num_images)
            scores.append(s)
            if keep_best and (best is None or s.distance < best[0]):
                best = (s.distance, x)
    ranked = sorted(scores, key=lambda s: s.distance)  # stable: ties keep the given order
    return ranked, (best[1] if best is not None else None)


def rank_candidates(
    model: nn.Module,
    preprocessing: Preprocessing,
    candidates: Sequence[str],
    *,
    num_images: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    normalization: str = "layer",
    batch_size: int = DEFAULT_BATCH,
) -> list[ProxyScore]:
    """Rank proxy ``candidates`` by BN distance, best (smallest) first.

    Each candidate (see :mod:`zsq.proxy.candidates` for the accepted forms) contributes a seeded
    sample of ``num_images`` inputs, preprocessed like the model's own data. All candidates are
    validated before any work. ``model`` (with BatchNorm; :class:`NoBatchNormError` otherwise) is run
    in eval mode under ``no_grad`` on ``device`` (default: where it is) and left as it was.
    """
    _check_args(preprocessing, num_images, normalization)
    cands = parse_candidates(candidates if not isinstance(candidates, str) else [candidates])
    ranked, _ = _rank(model, preprocessing, cands, num_images=num_images, seed=seed, device=device,
                      progress=progress, normalization=normalization, batch_size=batch_size, keep_best=False)
    return ranked


def proxy_inputs(
    model: nn.Module,
    preprocessing: Preprocessing,
    spec_text: str,
    *,
    num_images: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    normalization: str = "layer",
    batch_size: int = DEFAULT_BATCH,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration inputs for ``--calib proxy:SPEC``: ``spec_text`` is SPEC, comma-separated candidates.

    Ranks the candidates (as :func:`rank_candidates`) and returns the ``num_images`` inputs of the
    best one (the very sample it was scored on, in random order) and an info dict for the report:
    ``{"source": "proxy", "spec", "selected", "distance", "normalization", "num_inputs", "ranking"}``.
    A single candidate on a model without BatchNorm is loaded without scoring (``distance`` None).
    """
    _check_args(preprocessing, num_images, normalization)
    if not isinstance(spec_text, str):
        raise ConfigError(f"spec_text must be a comma-separated string of candidates, got {type(spec_text).__name__}")
    cands = parse_candidates(spec_text)
    info: dict[str, Any] = {"source": "proxy", "spec": spec_text, "normalization": normalization}
    if len(cands) == 1 and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        x = load_candidate(cands[0], preprocessing, num_images=num_images, seed=seed)
        info.update(selected=cands[0].text, distance=None, num_inputs=int(x.shape[0]), ranking=[])
        return x, info
    ranked, x = _rank(model, preprocessing, cands, num_images=num_images, seed=seed, device=device,
                      progress=progress, normalization=normalization, batch_size=batch_size, keep_best=True)
    if x is None:  # every distance was infinite: fall back to the first-ranked candidate
        x = load_candidate(ranked[0].candidate, preprocessing, num_images=num_images, seed=seed)
    best = ranked[0]
    log.info("proxy data: selected %s (BN distance %.4f) among %d candidate(s)", best.candidate, best.distance,
             len(ranked))
    info.update(selected=best.candidate, distance=best.distance, num_inputs=int(x.shape[0]),
                ranking=[s.to_dict() for s in ranked])
    return x, info


def mix_with_distilled(proxy: torch.Tensor, distilled: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Calibration inputs for ``--calib proxy+distilled:SPEC``: as many inputs as ``distilled`` has,
    half of them (``N // 2``, at most all proxy inputs) the first proxy inputs, the rest the first
    distilled ones (whole distilled batches stay together), shuffled with ``seed`` so every
    calibration batch holds both kinds."""
    for name, t in (("proxy", proxy), ("distilled", distilled)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] == 0:
            raise ConfigError(f"{name} inputs must be a non-empty (N, C, H, W) tensor, got "
                              f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if proxy.shape[1:] != distilled.shape[1:]:
        raise ConfigError(f"proxy inputs {tuple(proxy.shape[1:])} and distilled inputs {tuple(distilled.shape[1:])} "
                          "differ in shape; both must be preprocessed for the same model")
    n = distilled.shape[0]
    n_proxy = min(proxy.shape[0], n // 2)
    mixed = torch.cat([proxy[:n_proxy].to(distilled), distilled[: n - n_proxy]])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return mixed[perm]
