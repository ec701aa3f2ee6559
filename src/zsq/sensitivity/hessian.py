"""Hessian sensitivity (HAWQ, Dong et al. 2019; HAWQ-V2, Dong et al. 2020).

For each weight-quantized layer ``i`` with weights ``W_i`` (``n_i`` elements) and Hessian block
``H_ii`` of the loss with respect to ``W_i``:

    Omega_i(k) = s_i * ||Q_k(W_i) - W_i||^2,     s_i = trace(H_ii) / n_i   (HAWQ-V2, "trace")
                                                 s_i = lambda_max(H_ii)    (HAWQ,    "eigenvalue")

The loss is the cross-entropy between the model and its own float predictions (``loss="ce"``) or the
KL divergence to its own float output distribution (``loss="kl"``) on the distilled data, so no label
is needed. The Hessian is that of the mean loss over the calibration batches; it is never formed:
only Hessian-vector products ``H v`` (double back-propagation, ``torch.autograd.grad`` with
``create_graph=True``) are used.

* Trace, Hutchinson's estimator: ``trace(H_ii) = E[z_i^T H_ii z_i]`` for Rademacher ``z``. With
  ``trace_mode="joint"`` one product ``H z`` with ``z`` over *all* layers gives every layer's estimate
  ``z_i . (H z)_i`` at once (the off-diagonal blocks average out, since ``E[z_i z_j^T] = 0``), which
  is what makes it affordable on large models; ``"per_layer"`` uses block products ``H_ii z_i``
  (lower variance, one product per layer).
* Top eigenvalue: power iteration with block products ``H_ii v_i`` and the Rayleigh quotient.

Both stop when the estimate changes by less than ``tol`` (relative) between rounds, or after the
iteration cap; one round is one pass over the calibration batches. Everything is seeded by ``seed``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from . import (DEFAULT_BITS, SensitivityMethod, SensitivityTable, as_logits, check_bit_candidates, check_inputs,
               isolated_weights, layer_infos, make_weight_quantizer, model_device, new_table, target_layers)

log = logging.getLogger(__name__)

STATISTICS = ("trace", "eigenvalue")
LOSSES = ("ce", "kl")
TRACE_MODES = ("joint", "per_layer", "gauss_newton")


def _pos_int(v: Any, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"HessianConfig.{what} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class HessianConfig:
    """Settings of the Hessian sensitivity (see the module docstring).

    ``statistic``: which Hessian statistic scales the weight error; ``trace_mode``: Hutchinson estimator
    (``gauss_newton`` default, ``per_layer``/``joint`` with Hessian-vector products); ``eigenvalues``/``traces``: also
    compute the other statistic (reported in the table's extras); ``max_iterations``: cap on Hutchinson
    samples / power-iteration rounds; ``min_iterations``: rounds before the tolerance may stop them;
    ``samples_per_batch``: Hutchinson vectors per batch and round; ``max_batches``: use at most this
    many calibration batches (``None``: all).
    """

    statistic: str = "trace"
    loss: str = "ce"
    trace_mode: str = "gauss_newton"
    batch_size: int = 32
    max_batches: int | None = None
    max_iterations: int = 100
    min_iterations: int = 5
    tol: float = 1e-2
    samples_per_batch: int = 4
    eigen_max_iterations: int = 50
    eigen_tol: float = 1e-3
    eigenvalues: bool = False
    traces: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ConfigError(f"HessianConfig.statistic={self.statistic!r} is not one of {', '.join(STATISTICS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"HessianConfig.loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.trace_mode not in TRACE_MODES:
            raise ConfigError(f"HessianConfig.trace_mode={self.trace_mode!r} is not one of {', '.join(TRACE_MODES)}")
        for name in ("batch_size", "max_iterations", "min_iterations", "samples_per_batch", "eigen_max_iterations"):
            _pos_int(getattr(self, name), name)
        if self.max_batches is not None:
            _pos_int(self.max_batches, "max_batches")
        for name in ("tol", "eigen_tol"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"HessianConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def want_trace(self) -> bool:
        return self.statistic == "trace" or self.traces

    @property
    def want_eigenvalue(self) -> bool:
        return self.statistic == "eigenvalue" or self.eigenvalues

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HessianConfig":
        names = set(cls.__dataclass_fields__)
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown HessianConfig field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**dict(d))


@dataclass
class HessianStats:
    """Per-layer Hessian statistics (``None`` where not computed) and how they converged."""

    traces: dict[str, float] = field(default_factory=dict)
    eigenvalues: dict[str, float] = field(default_factory=dict)
    trace_samples: int = 0
    trace_converged: bool = False
    eigen_iterations: dict[str, int] = field(default_factory=dict)
    eigen_converged: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0


@contextlib.contextmanager
def _grad_only_for(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """``requires_grad`` only on ``params`` (restored in ``finally``)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def self_distillation_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss of ``logits`` against the float model's own ``ref_logits`` (no labels)."""
    if kind == "ce":
        return lambda logits, ref: F.cross_entropy(logits, ref.argmax(dim=1))
    if kind == "kl":
        return lambda logits, ref: F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(ref, dim=1),
                                            reduction="batchmean", log_target=True)
    raise ConfigError(f"loss {kind!r} is not one of {', '.join(LOSSES)}")


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    z = torch.randint(0, 2, like.shape, generator=gen, dtype=torch.int8).to(like.device)
    return z.to(like.dtype) * 2 - 1


def _gauss_newton_probe(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``S u`` per row, with ``S S^T = diag(p) - p p^T`` (``p = softmax(logits)``) and Rademacher ``u``:
    ``S u = sqrt(p) * u - p * (sqrt(p) . u)``."""
    with torch.no_grad():
        p = torch.softmax(logits.detach().double(), dim=1)
        u = _rademacher(p, gen)
        sp = p.sqrt()
        w = sp * u - p * (sp * u).sum(dim=1, keepdim=True)
    return w.to(logits.dtype)


def _relative_change(new: float, old: float | None) -> float:
    if old is None:
        return float("inf")
    return abs(new - old) / max(abs(new), 1e-30)


def layer_hessian_stats(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params: Mapping[str, torch.Tensor],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: HessianConfig | None = None,
    progress: bool = True,
) -> HessianStats:
    """Per-block Hessian trace (Hutchinson) and top eigenvalue (power iteration) of the mean loss.

    ``batches`` are ``(inputs, reference_logits)`` pairs; the loss of a batch is
    ``loss_fn(logits(model(inputs)), reference_logits)`` and the Hessian is that of the mean over batches.
    ``params`` are the tensors (leaves of ``model``) whose diagonal Hessian blocks are wanted.
    Generic: works on any differentiable ``model``; ``trace_mode="gauss_newton"`` assumes a softmax
    cross-entropy/KL loss averaged over the batch (as :func:`self_distillation_loss` gives).
    """
    cfg = config or HessianConfig()
    names = list(params)
    plist = [params[n] for n in names]
    if not names:
        raise ConfigError("no parameters given for the Hessian")
    if not batches:
        raise ConfigError("no calibration batches given for the Hessian")
    gen = torch.Generator().manual_seed(cfg.seed)
    nb = len(batches)
    stats = HessianStats()
    t0 = time.perf_counter()

    # Hutchinson state: running sums of per-layer estimates.
    trace_sum = torch.zeros(len(names), dtype=torch.float64)
    trace_n = 0
    prev_trace: torch.Tensor | None = None
    trace_done = not cfg.want_trace
    # Power-iteration state: one unit vector per layer.
    eig_done = {n: not cfg.want_eigenvalue for n in names}
    vecs: dict[str, torch.Tensor] = {}
    eig: dict[str, float] = {}
    if cfg.want_eigenvalue:
        for n, p in zip(names, plist):
            v = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
            vecs[n] = v / v.norm()
            stats.eigen_iterations[n] = 0
    rounds = max(cfg.max_iterations if cfg.want_trace else 0, cfg.eigen_max_iterations if cfg.want_eigenvalue else 0)
    bar = tqdm(total=rounds, desc="Hessian", disable=not progress, leave=False, unit="round")
    with _grad_only_for(model, plist):
        for r in range(rounds):
            do_trace = not trace_done and trace_n < cfg.max_iterations
            active = [n for n in names if not eig_done[n] and stats.eigen_iterations[n] < cfg.eigen_max_iterations]
            if not do_trace and not active:
                break
            hv_acc = {n: torch.zeros_like(vecs[n]) for n in active}
            round_est = torch.zeros(len(names), dtype=torch.float64)
            round_n = 0
            for x, ref in batches:
                logits = as_logits(model(x))
                need_hvp = bool(active) or (do_trace and cfg.trace_mode != "gauss_newton")
                loss = loss_fn(logits, ref)
                grads = torch.autograd.grad(loss, plist, create_graph=True, retain_graph=True) if need_hvp else None
                for n in active:
                    i = names.index(n)
                    (hv,) = torch.autograd.grad(grads[i], plist[i], grad_outputs=vecs[n], retain_graph=True)
                    hv_acc[n] += hv.detach() / nb
                if do_trace and cfg.trace_mode == "gauss_newton":
                    for _ in range(cfg.samples_per_batch):
                        hz = _gauss_newton_probe(logits, gen)
                        rs = torch.autograd.grad(logits, plist, grad_outputs=hz, retain_graph=True)
                        for i, r_ in enumerate(rs):
                            round_est[i] += float(r_.detach().double().pow(2).sum()) / logits.shape[0]
                        round_n += 1
                elif do_trace:
                    for _ in range(cfg.samples_per_batch):
                        zs = [_rademacher(p, gen) for p in plist]
                        if cfg.trace_mode == "joint":
                            hzs = torch.autograd.grad(grads, plist, grad_outputs=zs, retain_graph=True)
                        else:
                            hzs = [torch.autograd.grad(g, p, grad_outputs=z, retain_graph=True)[0]
                                   for g, p, z in zip(grads, plist, zs)]
                        for i, (z, hz) in enumerate(zip(zs, hzs)):
                            round_est[i] += float((z * hz.detach()).sum())
                        round_n += 1
                del grads, loss, logits
            # Power iteration update (Rayleigh quotient of the unit vector used this round).
            for n in active:
                lam = float((vecs[n] * hv_acc[n]).sum())
                stats.eigen_iterations[n] += 1
                change = _relative_change(lam, eig.get(n))
                eig[n] = lam
                norm = hv_acc[n].norm()
                if float(norm) == 0.0:
                    eig_done[n] = True  # zero block: eigenvalue 0
                else:
                    vecs[n] = hv_acc[n] / norm
                if change < cfg.eigen_tol:
                    eig_done[n] = True
                    stats.eigen_converged[n] = True
            if do_trace:
                trace_sum += round_est
                trace_n += round_n
                mean = trace_sum / trace_n
                if prev_trace is not None and r + 1 >= cfg.min_iterations:
                    rel = ((mean - prev_trace).abs() / mean.abs().clamp_min(1e-30)).max()
                    if float(rel) < cfg.tol:
                        trace_done = True
                        stats.trace_converged = True
                prev_trace = mean
            bar.update(1)
            bar.set_postfix(trace_samples=trace_n, eig_active=len(active))
    bar.close()
    if cfg.want_trace:
        mean = trace_sum / max(trace_n, 1)
        stats.traces = {n: float(mean[i]) for i, n in enumerate(names)}
        stats.trace_samples = trace_n
    if cfg.want_eigenvalue:
        stats.eigenvalues = dict(eig)
        for n in names:
            stats.eigen_converged.setdefault(n, False)
    stats.seconds = time.perf_counter() - t0
    return stats


def hessian_sensitivity(
    qmodel: nn.Module,
    inputs: torch.Tensor,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    config: HessianConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> SensitivityTable:
    """HAWQ(-V2) sensitivity of every weight-quantized layer of ``qmodel`` at each of ``bits``."""
    cfg = config or HessianConfig()
    if not isinstance(cfg, HessianConfig):
        raise ConfigError(f"config for the hessian method must be a HessianConfig, got {type(cfg).__name__}")
    bits = check_bit_candidates(bits)
    inputs = check_inputs(inputs)
    dev = torch.device(device) if device is not None else model_device(qmodel)
    qmodel.to(dev)
    t0 = time.perf_counter()
    targets = target_layers(qmodel)
    infos = layer_infos(qmodel, inputs)
    loss_fn = self_distillation_loss(cfg.loss)
    with isolated_weights(qmodel):
        batches = []
        with torch.no_grad():
            for start in range(0, inputs.shape[0], cfg.batch_size):
                if cfg.max_batches is not None and len(batches) >= cfg.max_batches:
                    break
                x = inputs[start: start + cfg.batch_size].to(dev)
                batches.append((x, as_logits(qmodel(x)).detach()))
        params = {n: m.weight for n, m in targets}
        stats = layer_hessian_stats(qmodel, batches, params, loss_fn=loss_fn, config=cfg, progress=progress)
    values: dict[str, dict[int, float]] = {}
    extras: dict[str, dict[str, Any]] = {}
    negative = []
    qcfg = getattr(qmodel, "zsq_config", None)
    with torch.no_grad():
        for n, m in targets:
            w = m.weight.detach()
            errs = {k: float((make_weight_quantizer(m, k, config=qcfg)(w) - w).double().pow(2).sum()) for k in bits}
            ex: dict[str, Any] = {"weight_error": {str(k): e for k, e in errs.items()}}
            if n in stats.traces:
                ex["trace"] = stats.traces[n]
            if n in stats.eigenvalues:
                ex["eigenvalue"] = stats.eigenvalues[n]
                ex["eigen_iterations"] = stats.eigen_iterations.get(n)
            if cfg.statistic == "trace":
                s = stats.traces[n] / w.numel()
            else:
                s = stats.eigenvalues[n]
            if s < 0:  # the diagonal blocks of these losses are PSD; a negative estimate is noise
                negative.append(n)
                s = 0.0
            values[n] = {k: s * e for k, e in errs.items()}
            extras[n] = ex
    if negative:
        log.warning("Hessian %s estimate negative (noise) for %d layer(s), clamped to 0: %s", cfg.statistic,
                    len(negative), ", ".join(negative[:5]))
    seconds = time.perf_counter() - t0
    log.info("Hessian sensitivity (%s) of %d layers in %.1fs (%d Hutchinson samples)", cfg.statistic,
             len(targets), seconds, stats.trace_samples)
    settings = {"hessian": cfg.to_dict(), "trace_samples": stats.trace_samples,
                "trace_converged": stats.trace_converged, "num_batches": len(batches)}
    return new_table(SensitivityMethod.HESSIAN, qmodel, inputs, bits, values, extras, settings=settings,
                     timings={"sensitivity": seconds}, infos=infos, model_name=model_name)
