"""Hybrid per-tensor / per-channel weight quantization (GVSL & Kumar, 2020, "hybrid quantization").

Per-channel weight scales cost accuracy nothing but make integer kernels slower (a scale vector per
output channel instead of one number); per-tensor scales are cheaper but hurt layers whose channels
have very different ranges. The hybrid scheme measures, for every quantizable layer ``i``,

    Delta_i = Omega_i(per_tensor) - Omega_i(per_channel)

where ``Omega_i(g)`` is ZeroQ's KL sensitivity (mean KL(FP32 || model with only layer ``i``'s weights
quantized at its own bit width with granularity ``g``) over the calibration inputs; see
:mod:`zsq.sensitivity.kl`), and quantizes layer ``i`` per tensor when ``Delta_i < threshold``.

The default threshold is chosen on the calibration (synthetic) data, never on evaluation images:
the inputs are split into two halves (even / odd positions). Sort the layers by ``Delta``; the plan
that makes the ``k`` least sensitive layers per-tensor is quantized (weights *and* activations),
its activations calibrated on the first half, and scored by the mean KL(FP32 || quantized) on the
held-apart second half. The largest ``k`` whose score stays within ``(1 + tolerance)`` times the
all-per-channel score (default ``tolerance`` 5 %) is found by bisection over ``k`` (the score grows
with ``k`` up to noise; bisection needs ``log2(layers) + 2`` scored plans), and the threshold is the
midpoint between the ``k``-th and ``(k+1)``-th smallest ``Delta`` (any value in between gives the same
plan).

Layers whose granularity an explicit override sets (``overrides={"conv1": {"weight_granularity": ...}}``)
keep it; layers kept in float are not part of the plan. The plan is a :class:`~zsq.mixed_precision.BitPlan`
with per-layer ``weight_granularity`` (and the resolved ``weight_bits``), so ``zsq quantize --bit-plan``
reproduces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from .config import LayerOverride, QuantConfig
from .errors import ConfigError

log = logging.getLogger(__name__)

HYBRID = "hybrid"  # the value of --weight-granularity that asks for this scheme
GRANULARITIES = ("per_channel", "per_tensor")
DEFAULT_TOLERANCE = 0.05

__all__ = ["HYBRID", "DEFAULT_TOLERANCE", "HybridConfig", "hybrid_plan", "granularity_sensitivity",
           "select_granularity", "threshold_for", "with_granularity", "plan_kl"]


@dataclass(frozen=True)
class HybridConfig:
    """Settings of :func:`hybrid_plan`.

    ``tolerance``: relative increase of the held-apart whole-model KL over all-per-channel that the
    automatic threshold may cost (0.05 = 5 %); ``batch_size``: inputs per forward in the sensitivity
    pass; ``max_inputs``: use at most this many calibration inputs for the sensitivities (``None``: all).
    """

    tolerance: float = DEFAULT_TOLERANCE
    batch_size: int = 64
    max_inputs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or \
                not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ConfigError(f"hybrid tolerance must be a number >= 0 (e.g. 0.05 for 5 %), got {self.tolerance!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"hybrid batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_inputs is not None and (isinstance(self.max_inputs, bool) or not isinstance(self.max_inputs, int)
                                            or self.max_inputs < 1):
            raise ConfigError(f"hybrid max_inputs must be a positive integer or None, got {self.max_inputs!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Sensitivity of per-tensor vs per-channel weights, one layer at a time
# ------------------------------------------------------------------------------------------------


def _quantizer_like(layer: nn.Module, per_channel: bool) -> nn.Module:
    """A weight quantizer with ``layer``'s own settings (bits, kind, symmetry, estimator) but the
    given granularity, fitted to the layer's weight."""
    from .quant.modules import WeightQuantizer
    from .quant.nonuniform import NonUniformWeightQuantizer, is_nonuniform

    wq = layer.weight_quantizer
    channels = layer.weight.shape[0]
    new: nn.Module
    if is_nonuniform(wq):
        new = NonUniformWeightQuantizer(bits=wq.bits, per_channel=per_channel, channels=channels,
                                        symmetric=wq.symmetric, estimator=wq.estimator,
                                        edges_sigma=wq.edges_sigma, refine_iters=wq.refine_iters)
    else:
        new = WeightQuantizer(bits=wq.bits, symmetric=wq.symmetric, per_channel=per_channel, channels=channels,
                              estimator=wq.estimator)
    new.to(layer.weight.device)
    new.calibrate_from(layer.weight.detach())
    return new


@torch.no_grad()
def granularity_sensitivity(
    qmodel: nn.Module,
    inputs: torch.Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """``{layer: {"per_channel": KL, "per_tensor": KL}}`` for every weight-quantized layer of ``qmodel``
    (from :func:`zsq.quantize`): mean KL(FP32 || only that layer's weights quantized with that
    granularity) over ``inputs``; activations are not quantized. ``qmodel`` is left as it was.

    On a traced model the float prefix is shared (suffix runs, as :func:`zsq.sensitivity.kl.kl_sensitivity`).
    """
    from .sensitivity import as_logits, check_inputs, isolated_weights, model_device, target_layers
    from .metrics import kl_divergence
    from .sensitivity.kl import GraphRunner

    inputs = check_inputs(inputs)
    dev = torch.device(device) if device is not None else model_device(qmodel)
    qmodel.to(dev)
    targets = target_layers(qmodel)
    names = [n for n, _ in targets]
    quantizers = {(n, g): _quantizer_like(m, g == "per_channel") for n, m in targets for g in GRANULARITIES}
    sums = torch.zeros(len(names), len(GRANULARITIES), dtype=torch.float64)
    runner = GraphRunner(qmodel) if isinstance(qmodel, fx.GraphModule) else None
    node_of: dict[Any, int] = {}
    if runner is not None:
        for node in runner.nodes:
            if node.op == "call_module" and str(node.target) in names:
                node_of[node] = names.index(str(node.target))
        if len(node_of) != len(names):
            runner = None
    total = 0
    n_batches = (inputs.shape[0] + batch_size - 1) // batch_size
    with isolated_weights(qmodel) as iso, tqdm(total=n_batches * len(names), desc="hybrid sensitivity",
                                               disable=not progress, leave=False, unit="layer") as bar:
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start: start + batch_size].to(dev)
            branch: dict[tuple[int, int], torch.Tensor] = {}
            if runner is not None:
                env: dict[Any, Any] = {}
                ref = None
                for i, node in enumerate(runner.nodes):
                    li = node_of.get(node)
                    if li is not None:
                        for gj, g in enumerate(GRANULARITIES):
                            with iso.only(names[li], quantizers[(names[li], g)]):
                                branch[(li, gj)] = as_logits(runner.run_from(i, runner.branch_env(env), (x,)))
                        bar.update(1)
                    out = runner.step(i, env, (x,))
                    if node.op == "output":
                        ref = as_logits(out)
                        break
                if ref is None:
                    raise ConfigError("the traced graph produced no output")
            else:
                ref = as_logits(qmodel(x))
                for li, name in enumerate(names):
                    for gj, g in enumerate(GRANULARITIES):
                        with iso.only(name, quantizers[(name, g)]):
                            branch[(li, gj)] = as_logits(qmodel(x))
                    bar.update(1)
            for (li, gj), logits in branch.items():
                sums[li, gj] += float(kl_divergence(ref, logits).sum())
            total += x.shape[0]
    mean = sums / total
    return {n: {g: float(mean[i, j]) for j, g in enumerate(GRANULARITIES)} for i, n in enumerate(names)}


def select_granularity(delta: Mapping[str, float], threshold: float) -> dict[str, str]:
    """``per_tensor`` where ``delta < threshold``, else ``per_channel`` (``delta`` = KL_pt - KL_pc)."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(float(threshold)):
        raise ConfigError(f"hybrid threshold must be a number (KL in nats), got {threshold!r}")
    return {n: ("per_tensor" if d < threshold else "per_channel") for n, d in delta.items()}


def threshold_for(delta: Mapping[str, float], k: int) -> float:
    """A threshold that makes exactly the ``k`` layers of smallest ``delta`` per-tensor (ties aside):
    the midpoint between the ``k``-th and ``(k+1)``-th smallest values."""
    d = sorted(float(v) for v in delta.values())
    if not d:
        raise ConfigError("no layer to plan")
    if not 0 <= k <= len(d):
        raise ConfigError(f"k={k} is outside 0..{len(d)}")
    if k == 0:
        return d[0] - max(abs(d[0]), 1e-12)
    if k == len(d):
        return d[-1] + max(abs(d[-1]), 1e-12)
    return 0.5 * (d[k - 1] + d[k])


def with_granularity(config: QuantConfig, granularity: Mapping[str, str]) -> QuantConfig:
    """``config`` plus exact-name overrides setting each layer's weight granularity (other fields of an
    existing exact-name override are kept)."""
    overrides: dict[str, Any] = dict(config.overrides)
    for name, g in granularity.items():
        if g not in GRANULARITIES:
            raise ConfigError(f"weight granularity of {name!r} must be per_channel or per_tensor, got {g!r}")
        old = overrides.pop(name, None)
        if name in config.overrides and old is None:
            raise ConfigError(f"layer {name!r} is kept in float (override None); it has no weight granularity")
        overrides[name] = dataclasses.replace(old, weight_granularity=g) if isinstance(old, LayerOverride) else \
            LayerOverride(weight_granularity=g)
    return dataclasses.replace(config, overrides=overrides)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch: int, device: torch.device | None) -> torch.Tensor:
    from .sensitivity import as_logits, model_device
    from .state import eval_mode

    dev = device or model_device(model)
    outs = []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch):
            outs.append(as_logits(model(x[i: i + batch].to(dev))).double().cpu())
    return torch.cat(outs)


@contextlib.contextmanager
def swapped_weight_quantizers(qmodel: nn.Module, quantizers: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Give the named layers of ``qmodel`` other weight quantizers for the duration (restored in ``finally``)."""
    layers = dict(qmodel.named_modules())
    saved = {n: layers[n].weight_quantizer for n in quantizers}
    try:
        for n, q in quantizers.items():
            layers[n].weight_quantizer = q
        yield qmodel
    finally:
        for n, q in saved.items():
            layers[n].weight_quantizer = q


@torch.no_grad()
def plan_kl(qmodel: nn.Module, held: torch.Tensor, granularity: Mapping[str, str],
            candidates: Mapping[tuple[str, str], nn.Module], *, reference: torch.Tensor,
            device: str | torch.device | None = None, batch_size: int = 64) -> float:
    """Mean KL(FP32 || quantized) on ``held`` of the calibrated quantized model ``qmodel`` (weights and
    activations quantized; activation ranges as they are) with each layer of ``granularity`` given the
    weight quantizer ``candidates[(layer, granularity)]``."""
    from .metrics import kl_divergence

    dev = torch.device(device) if device is not None else None
    swap = {n: candidates[(n, g)] for n, g in granularity.items()}
    with swapped_weight_quantizers(qmodel, swap):
        out = _logits(qmodel, held, batch_size, dev)
    return float(kl_divergence(reference, out).mean())


def _pinned(config: QuantConfig, names: Sequence[str]) -> dict[str, str]:
    """Layers whose granularity an explicit override sets."""
    from .scope import matches

    pinned: dict[str, str] = {}
    for name in names:
        for pattern, ov in config.overrides.items():
            if ov is not None and ov.weight_granularity is not None and matches(pattern, name, names):
                pinned[name] = ov.weight_granularity
    return pinned


def _choose_k(score, n: int, tolerance: float, progress: bool) -> tuple[int, list[dict[str, Any]]]:
    """Largest ``k`` in ``0..n`` with ``score(k) <= (1 + tolerance) * score(0)``, by bisection."""
    trace: list[dict[str, Any]] = []
    cache: dict[int, float] = {}

    def s(k: int) -> float:
        if k not in cache:
            cache[k] = score(k)
            trace.append({"per_tensor_layers": k, "kl": cache[k]})
        return cache[k]

    with tqdm(total=max(1, math.ceil(math.log2(n + 1)) + 2), desc="hybrid threshold", disable=not progress,
              leave=False) as bar:
        base = s(0)
        bar.update(1)
        limit = base * (1.0 + tolerance)
        if n == 0:
            return 0, trace
        if s(n) <= limit:
            bar.update(1)
            return n, trace
        bar.update(1)
        lo, hi = 0, n  # s(lo) ok, s(hi) not ok
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if s(mid) <= limit:
                lo = mid
            else:
                hi = mid
            bar.update(1)
    return lo, trace


def hybrid_plan(
    model: nn.Module,
    calib_inputs: torch.Tensor,
    quant_config: QuantConfig,
    *,
    threshold: float | None = None,
    config: HybridConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> tuple[QuantConfig, Any, dict[str, Any]]:
    """Choose per-tensor or per-channel weights for every quantized layer of ``model`` (float, BN folded
    or not) on ``calib_inputs`` (distilled data). Returns ``(quant_config with per-layer
    weight_granularity overrides, BitPlan with weight_granularity and weight_bits, info)``.

    ``threshold`` (KL in nats): per-tensor where ``KL_pt - KL_pc < threshold``; ``None`` chooses it on
    the calibration data (module docstring). ``info`` holds the per-layer KLs, the threshold and how
    it was chosen, and timings (JSON-serialisable).
    """
    from .mixed_precision import BitPlan
    from .sensitivity import check_inputs, prepare_model

    cfg = config or HybridConfig()
    if not isinstance(cfg, HybridConfig):
        raise ConfigError(f"config must be a zsq.hybrid.HybridConfig, got {type(cfg).__name__}")
    if not isinstance(quant_config, QuantConfig):
        raise ConfigError(f"quant_config must be a zsq.config.QuantConfig, got {type(quant_config).__name__}")
    calib_inputs = check_inputs(calib_inputs)
    if threshold is not None:
        select_granularity({}, threshold)  # validates the number
    elif calib_inputs.shape[0] < 2:
        raise ConfigError("choosing the hybrid threshold needs at least 2 calibration inputs (half calibrates, "
                          "half is held apart); give more inputs or an explicit threshold")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    qmodel = prepare_model(model, quant_config)
    plans = [p for p in qmodel.zsq_report.layers if p.wbits is not None]  # type: ignore[attr-defined]
    names = [p.name for p in qmodel.zsq_report.layers]  # type: ignore[attr-defined]
    pinned = {n: g for n, g in _pinned(quant_config, names).items() if n in {p.name for p in plans}}
    sens_inputs = calib_inputs if cfg.max_inputs is None else calib_inputs[: cfg.max_inputs]
    kl = granularity_sensitivity(qmodel, sens_inputs, batch_size=cfg.batch_size, device=device, progress=progress)
    timings["sensitivity"] = time.perf_counter() - t0
    delta_all = {n: v["per_tensor"] - v["per_channel"] for n, v in kl.items()}
    free = {n: d for n, d in delta_all.items() if n not in pinned}
    search: list[dict[str, Any]] = []
    if threshold is None and free:
        from .calibrate import calibrate

        t = time.perf_counter()
        calib, held = calib_inputs[0::2], calib_inputs[1::2]
        reference = _logits(model, held, cfg.batch_size, None)
        order = sorted(free, key=lambda n: (free[n], n))
        # One calibrated model; the plans differ only in their weight quantizers, so the activation ranges
        # (calibrated on the first half, all-per-channel weights) are common to all and add no noise.
        layers = dict(qmodel.named_modules())
        candidates = {(n, g): _quantizer_like(layers[n], g == "per_channel") for n in order for g in GRANULARITIES}
        with swapped_weight_quantizers(qmodel, {n: candidates[(n, "per_channel")] for n in order}):
            calibrate(qmodel, calib, device=device, progress=False)

        def score(k: int) -> float:
            gran = {n: ("per_tensor" if i < k else "per_channel") for i, n in enumerate(order)}
            return plan_kl(qmodel, held, gran, candidates, reference=reference, device=device,
                           batch_size=cfg.batch_size)

        k, search = _choose_k(score, len(order), cfg.tolerance, progress)
        threshold_value = threshold_for(free, k)
        source = "chosen"
        timings["threshold"] = time.perf_counter() - t
    elif threshold is None:
        threshold_value, source = 0.0, "chosen"
    else:
        threshold_value, source = float(threshold), "given"
    gran = select_granularity(free, threshold_value)
    gran.update(pinned)
    ordered = [p.name for p in plans]
    gran = {n: gran[n] for n in ordered if n in gran}
    new_cfg = with_granularity(quant_config, {n: g for n, g in gran.items() if n not in pinned})
    resolved = {p.name: p for p in plans}
    n_pt = sum(1 for g in gran.values() if g == "per_tensor")
    timings["total"] = time.perf_counter() - t0
    meta = {"threshold": threshold_value, "threshold_source": source, "tolerance": cfg.tolerance,
            "per_tensor_layers": n_pt, "num_layers": len(gran)}
    plan = BitPlan(weight_bits={n: int(resolved[n].wbits) for n in gran}, model=model_name, method=HYBRID,
                   metadata=meta, weight_granularity=gran)
    info: dict[str, Any] = {
        **meta,
        "settings": cfg.to_dict(),
        "num_inputs": int(sens_inputs.shape[0]),
        "layers": {n: {"kl_per_channel": kl[n]["per_channel"], "kl_per_tensor": kl[n]["per_tensor"],
                              "delta": delta_all[n], "granularity": gran[n], "pinned": n in pinned,
                              "wbits": int(resolved[n].wbits)} for n in gran},
        "search": search,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    log.info("hybrid granularity: %d of %d layers per-tensor (threshold %.3g, %s)", n_pt, len(gran),
             threshold_value, source)
    return new_cfg, plan, info
