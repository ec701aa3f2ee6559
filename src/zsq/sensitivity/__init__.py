"""Per-layer quantization sensitivity: how much the network suffers when one layer's weights are
quantized to ``k`` bits while everything else stays in float.

Two methods behind one registry keyed by :class:`SensitivityMethod`:

* ``kl`` (ZeroQ): ``Omega_i(k)`` = mean KL(FP32 || model with only layer ``i`` at ``k`` bits) over the
  calibration (distilled) data — :mod:`zsq.sensitivity.kl`;
* ``hessian`` (HAWQ / HAWQ-V2): ``Omega_i(k)`` = (``trace(H_ii) / n_i`` or ``lambda_max(H_ii)``) *
  ``||Q_k(W_i) - W_i||^2`` with Hessian statistics from Hessian-vector products —
  :mod:`zsq.sensitivity.hessian`.

Both run on the BN-folded, fake-quantized model that :func:`zsq.quantize` returns (calibration is not
needed: activation quantizers are switched off). ``k``-bit weight quantizers copy the settings of the
layer's own quantizer (granularity, symmetry, range estimator), so the table measures exactly the
quantizer that the mixed-precision model will use. Every flag that is flipped is restored in a
``finally`` block (:func:`isolated_weights`).

The result is a :class:`SensitivityTable` that also carries what the bit allocator needs (parameter
counts, MACs, activation bits, the model's non-weight bytes) and round-trips to JSON.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..config import QuantConfig, check_bits
from ..errors import ConfigError
from ..quant.modules import QUANT_LAYER_TYPES, ActQuantizer, WeightQuantizer

log = logging.getLogger(__name__)

DEFAULT_BITS = (2, 4, 8)
TABLE_FORMAT = "zsq-sensitivity"
TABLE_VERSION = 1

__all__ = [
    "DEFAULT_BITS", "SensitivityMethod", "LayerInfo", "SensitivityTable", "compute_sensitivity", "sensitivity",
    "prepare_model", "parse_bits", "check_bit_candidates", "target_layers", "isolated_weights",
    "make_weight_quantizer", "weight_cost_bits", "register_method",
]


class SensitivityMethod(str, enum.Enum):
    """How a layer's sensitivity is measured."""

    KL = "kl"
    HESSIAN = "hessian"

    @classmethod
    def parse(cls, value: "str | SensitivityMethod") -> "SensitivityMethod":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ConfigError(f"sensitivity method {value!r} is not one of "
                              f"{', '.join(m.value for m in cls)}") from None


# method -> "module:function"; the function has the signature of :func:`compute_sensitivity`
# minus ``method``. Lazy so that importing zsq.sensitivity stays cheap.
_METHODS: dict[SensitivityMethod, str] = {
    SensitivityMethod.KL: "zsq.sensitivity.kl:kl_sensitivity",
    SensitivityMethod.HESSIAN: "zsq.sensitivity.hessian:hessian_sensitivity",
}


def register_method(method: SensitivityMethod, target: str) -> None:
    """Point ``method`` at another implementation (``"package.module:function"``)."""
    _METHODS[SensitivityMethod.parse(method)] = target


def _method_impl(method: SensitivityMethod) -> Callable[..., "SensitivityTable"]:
    mod_name, _, fn_name = _METHODS[method].partition(":")
    return getattr(importlib.import_module(mod_name), fn_name)


# ------------------------------------------------------------------------------------------------
# Bit candidates and costs
# ------------------------------------------------------------------------------------------------


def check_bit_candidates(bits: Sequence[int] | int) -> tuple[int, ...]:
    """Sorted, de-duplicated candidate bit widths (each in 2..8); raises :class:`ConfigError`."""
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = (bits,)
    try:
        values = list(bits)
    except TypeError:
        raise ConfigError(f"bit candidates must be a sequence of integers, got {bits!r}") from None
    if not values:
        raise ConfigError("give at least one candidate bit width (e.g. 2,4,8)")
    return tuple(sorted({check_bits(b, "candidate bit width") for b in values}))


def parse_bits(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"2,4,8"`` (or a sequence) -> ``(2, 4, 8)``."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"bit candidates {text!r}: expected comma-separated integers such as 2,4,8") from None
        return check_bit_candidates(values)
    return check_bit_candidates(text)


def weight_cost_bits(params: int, bits: int) -> int:
    """Storage of ``params`` weights at ``bits`` bits, rounded up to whole bytes (as zsq.size counts it)."""
    return 8 * ((params * bits + 7) // 8)


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """What the allocator needs to know about one quantized layer."""

    name: str
    kind: str
    params: int  # weight elements
    macs: int  # multiply-accumulates per input sample
    abits: int | None  # bits of the activation feeding it (for BOPs)
    wbits: int  # bits in the configuration the table was computed from
    fixed_bits: int | None = None  # pinned by an explicit per-layer override; the allocator keeps it

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": self.params, "macs": self.macs,
                "abits": self.abits, "wbits": self.wbits, "fixed_bits": self.fixed_bits}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerInfo":
        return cls(name=str(d["name"]), kind=str(d.get("kind", "?")), params=int(d["params"]),
                   macs=int(d.get("macs", 0)), abits=None if d.get("abits") is None else int(d["abits"]),
                   wbits=int(d.get("wbits", 8)),
                   fixed_bits=None if d.get("fixed_bits") is None else int(d["fixed_bits"]))


@dataclass
class SensitivityTable:
    """``values[layer][k]`` = sensitivity of ``layer`` quantized alone to ``k`` bits (lower is better).

    ``layers`` are in data-flow order. ``extras[layer]`` holds method-specific numbers (Hessian
    trace/eigenvalue, weight error, ...). ``size_overhead_bytes`` is what the quantized model stores
    besides the weights of ``layers`` (scales, biases, float parameters), so a size in MB can be
    turned into a weight-bit budget.
    """

    method: str
    bits: tuple[int, ...]
    layers: list[LayerInfo]
    values: dict[str, dict[int, float]]
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    size_overhead_bytes: int = 0
    fp32_size_bytes: int = 0
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bits = check_bit_candidates(self.bits)
        names = [l.name for l in self.layers]
        if len(set(names)) != len(names):
            raise ConfigError("sensitivity table lists a layer twice")
        for n in names:
            row = self.values.get(n)
            if row is None or any(k not in row for k in self.bits):
                raise ConfigError(f"sensitivity table has no value for layer {n!r} at every bit width {self.bits}")
            for k, v in row.items():
                if not math.isfinite(float(v)):
                    raise ConfigError(f"sensitivity of layer {n!r} at {k} bits is {v}; expected a finite number")

    # -- access ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    def layer(self, name: str) -> LayerInfo:
        for l in self.layers:
            if l.name == name:
                return l
        raise ConfigError(f"layer {name!r} is not in the sensitivity table; layers: {', '.join(self.names[:6])}...")

    def omega(self, name: str, bits: int) -> float:
        return float(self.values[name][bits])

    def as_matrix(self) -> torch.Tensor:
        """(layers, bits) float64 tensor of sensitivities."""
        return torch.tensor([[self.values[n][k] for k in self.bits] for n in self.names], dtype=torch.float64)

    def total_params(self) -> int:
        return sum(l.params for l in self.layers)

    def uniform_weight_bits(self, bits: int) -> int:
        """Weight storage (bits) of all layers at ``bits`` (pinned layers at their fixed width)."""
        return sum(weight_cost_bits(l.params, l.fixed_bits or bits) for l in self.layers)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "method": self.method,
            "model": self.model,
            "bits": list(self.bits),
            "size_overhead_bytes": int(self.size_overhead_bytes),
            "fp32_size_bytes": int(self.fp32_size_bytes),
            "settings": self.settings,
            "timings_s": {k: round(float(v), 3) for k, v in self.timings_s.items()},
            "layers": [
                {**l.to_dict(),
                 "sensitivity": {str(k): float(self.values[l.name][k]) for k in self.bits},
                 **({"extras": self.extras[l.name]} if self.extras.get(l.name) else {})}
                for l in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SensitivityTable":
        if d.get("format") != TABLE_FORMAT:
            raise ConfigError(f"not a zsq sensitivity table (format {d.get('format')!r}, expected {TABLE_FORMAT!r}); "
                              "write one with `zsq sensitivity MODEL --out table.json`")
        if int(d.get("version", 0)) > TABLE_VERSION:
            raise ConfigError(f"sensitivity table version {d.get('version')} is newer than this zsq supports "
                              f"({TABLE_VERSION}); upgrade zsq")
        try:
            bits = tuple(int(b) for b in d["bits"])
            layers = [LayerInfo.from_dict(l) for l in d["layers"]]
            values = {l["name"]: {int(k): float(v) for k, v in l["sensitivity"].items()} for l in d["layers"]}
            extras = {l["name"]: dict(l["extras"]) for l in d["layers"] if l.get("extras")}
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed sensitivity table: {type(exc).__name__}: {exc}") from exc
        return cls(method=str(d.get("method", "?")), bits=bits, layers=layers, values=values, extras=extras,
                   size_overhead_bytes=int(d.get("size_overhead_bytes", 0)),
                   fp32_size_bytes=int(d.get("fp32_size_bytes", 0)), model=d.get("model"),
                   settings=dict(d.get("settings", {})), timings_s=dict(d.get("timings_s", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sensitivity table {str(path)!r} does not exist; create it with "
                              "`zsq sensitivity MODEL --out table.json`")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"could not read sensitivity table {str(path)!r}: {exc}") from exc
        return cls.from_dict(data)


# ------------------------------------------------------------------------------------------------
# Model plumbing shared by the methods
# ------------------------------------------------------------------------------------------------


def prepare_model(model: nn.Module, quant_config: QuantConfig | None = None) -> fx.GraphModule:
    """BN-fold (when BatchNorm is left) and fake-quantize a copy of ``model`` for sensitivity analysis.

    ``model`` is not modified. Activation ranges are not calibrated: the methods switch activation
    quantizers off.
    """
    from ..fold import fold_batchnorm, has_batchnorm
    from ..quant import quantize

    if has_batchnorm(model):
        model, _ = fold_batchnorm(model)
        return quantize(model, quant_config or QuantConfig(), inplace=True)
    return quantize(model, quant_config or QuantConfig())


def target_layers(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """Weight-quantized layers of ``qmodel`` in data-flow order (``(name, module)``)."""
    from ..quant.apply import quantizable_nodes

    if isinstance(qmodel, fx.GraphModule):
        out = [(str(n.target), m) for n, m in quantizable_nodes(qmodel)]
    else:
        out = list(qmodel.named_modules())
    out = [(n, m) for n, m in out if isinstance(m, QUANT_LAYER_TYPES) and m.weight_quantizer is not None]
    if not out:
        raise ConfigError("the model has no weight-quantized conv/linear layer; pass the model returned by "
                          "zsq.quantize(folded_model, QuantConfig(...)) (or use prepare_model)")
    return out


def make_weight_quantizer(layer: nn.Module, bits: int, *, config: Any = None) -> WeightQuantizer:
    """A ``bits``-bit weight quantizer with the settings of ``layer``'s own, fitted to its weight. With the
    model's ``QuantConfig`` (``qmodel.zsq_config``), symmetry follows its rule for ``bits`` (which, with
    ``weight_symmetric=None``, depends on the bit width) instead of the layer's current quantizer."""
    wq = layer.weight_quantizer
    symmetric = config.weight_symmetric_for(bits) if config is not None else wq.symmetric
    # output_mse needs the layer's inputs (zsq.calibrate); a sensitivity probe uses its data-free start, mse
    estimator = "mse" if wq.estimator == "output_mse" else wq.estimator
    new = WeightQuantizer(bits=bits, symmetric=symmetric, per_channel=wq.per_channel,
                          channels=layer.weight.shape[0], estimator=estimator)
    new.to(layer.weight.device)
    new.calibrate_from(layer.weight.detach())
    return new


_MISSING = object()


class WeightIsolation:
    """Handle given by :func:`isolated_weights`: every weight and activation quantizer is off; use
    :meth:`only` to switch one layer's weights on with a given quantizer."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.layers = dict(layers)

    @contextlib.contextmanager
    def only(self, name: str, quantizer: WeightQuantizer) -> Iterator[None]:
        layer = self.layers[name]
        old = layer.weight_quantizer
        try:
            layer.weight_quantizer = quantizer
            layer.quant_enabled = True
            yield
        finally:
            layer.quant_enabled = False
            layer.weight_quantizer = old


@contextlib.contextmanager
def isolated_weights(qmodel: nn.Module) -> Iterator[WeightIsolation]:
    """Switch off every weight quantizer (``quant_enabled = False``) and every activation quantizer
    (``enabled = False``) of ``qmodel``; put the model in eval mode. All restored in ``finally``."""
    qlayers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
    acts = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    saved_q = {n: (m.__dict__.get("quant_enabled", _MISSING), m.weight_quantizer) for n, m in qlayers.items()}
    saved_a = [(m, m.enabled) for m in acts]
    modes = [(m, m.training) for m in qmodel.modules()]
    try:
        qmodel.eval()
        for m in qlayers.values():
            m.quant_enabled = False
        for m in acts:
            m.enabled = False
        yield WeightIsolation(qlayers)
    finally:
        for n, (flag, wq) in saved_q.items():
            m = qlayers[n]
            m.weight_quantizer = wq
            if flag is _MISSING:
                m.__dict__.pop("quant_enabled", None)
            else:
                m.quant_enabled = flag
        for m, flag in saved_a:
            m.enabled = flag
        for m, t in modes:
            m.training = t


def as_logits(out: Any) -> torch.Tensor:
    """The (batch, classes) tensor of a model output (a tensor, the first of a tuple, or ``["logits"]``)."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    elif isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError("sensitivity analysis needs a classifier that returns (batch, classes) logits; got "
                          f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
    return out


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        raise ConfigError("sensitivity needs a non-empty batch of calibration inputs (N, C, H, W), got "
                          f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    return inputs


@torch.no_grad()
def layer_infos(qmodel: nn.Module, sample: torch.Tensor) -> list[LayerInfo]:
    """Parameter counts, MACs per sample (measured by one forward of ``sample[:1]``) and bits."""
    targets = target_layers(qmodel)
    plans = {}
    report = getattr(qmodel, "zsq_report", None)
    if report is not None:
        plans = {p.name: p for p in report.layers}
    config = getattr(qmodel, "zsq_config", None)
    fixed = _pinned_bits(config, [p.name for p in report.layers]) if (config is not None and report is not None) else {}
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            per_out = out[0].numel() // max(1, mod.weight.shape[0])
            macs[name] = int(per_out * mod.weight.numel())
        return fn

    with isolated_weights(qmodel):
        try:
            for n, m in targets:
                handles.append(m.register_forward_hook(hook(n)))
            qmodel(sample[:1].to(model_device(qmodel)))
        finally:
            for h in handles:
                h.remove()
    out = []
    for n, m in targets:
        plan = plans.get(n)
        out.append(LayerInfo(name=n, kind=type(m).__name__.replace("Quant", ""), params=int(m.weight.numel()),
                             macs=macs.get(n, 0), abits=plan.abits if plan is not None else None,
                             wbits=int(m.weight_quantizer.bits), fixed_bits=fixed.get(n)))
    return out


def _pinned_bits(config: QuantConfig, ordered_names: Sequence[str]) -> dict[str, int]:
    """Layers whose weight bits an explicit override sets (``@first=w8``...): the allocator keeps them."""
    from ..scope import matches

    pinned: dict[str, int] = {}
    for name in ordered_names:
        for pattern, ov in config.overrides.items():
            if ov is not None and ov.wbits is not None and matches(pattern, name, ordered_names):
                pinned[name] = ov.wbits
    return pinned


def size_overhead_bytes(qmodel: nn.Module, infos: Sequence[LayerInfo]) -> int:
    """Bytes that ``zsq.size.quantized_size_bytes`` counts besides the weights of ``infos``."""
    from ..size import quantized_size_bytes

    total = quantized_size_bytes(qmodel)
    return int(total - sum(weight_cost_bits(l.params, l.wbits) // 8 for l in infos))


def new_table(method: SensitivityMethod, qmodel: nn.Module, inputs: torch.Tensor, bits: Sequence[int],
              values: dict[str, dict[int, float]], extras: dict[str, dict[str, Any]], *,
              settings: dict[str, Any], timings: dict[str, float], infos: list[LayerInfo] | None = None,
              model_name: str | None = None) -> SensitivityTable:
    from ..size import fp32_size_bytes

    infos = infos if infos is not None else layer_infos(qmodel, inputs)
    cfg = getattr(qmodel, "zsq_config", None)
    settings = dict(settings)
    if cfg is not None:
        settings.setdefault("quant_config", cfg.to_dict())
    settings.setdefault("num_inputs", int(inputs.shape[0]))
    return SensitivityTable(method=method.value, bits=tuple(bits), layers=infos, values=values, extras=extras,
                            size_overhead_bytes=size_overhead_bytes(qmodel, infos),
                            fp32_size_bytes=fp32_size_bytes(qmodel), model=model_name, settings=settings,
                            timings_s=timings)


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def compute_sensitivity(
    qmodel: fx.GraphModule,
    inputs: torch.Tensor,
    *,
    method: str | SensitivityMethod = SensitivityMethod.KL,
    bits: Sequence[int] = DEFAULT_BITS,
    config: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> SensitivityTable:
    """Sensitivity table of the quantized model ``qmodel`` (from :func:`zsq.quantize`) on ``inputs``.

    ``config`` is the method's settings (:class:`~zsq.sensitivity.kl.KLConfig` or
    :class:`~zsq.sensitivity.hessian.HessianConfig`; ``None`` for defaults). ``qmodel`` is left as it was.
    """
    m = SensitivityMethod.parse(method)
    return _method_impl(m)(qmodel, inputs, bits=check_bit_candidates(bits), config=config, device=device,
                           progress=progress, model_name=model_name)


def sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    quant_config: QuantConfig | None = None,
    *,
    method: str | SensitivityMethod = SensitivityMethod.KL,
    bits: Sequence[int] = DEFAULT_BITS,
    config: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> SensitivityTable:
    """Convenience verb: fold + quantize a copy of the float ``model`` with ``quant_config``, then
    :func:`compute_sensitivity`."""
    qmodel = prepare_model(model, quant_config)
    if device is not None:
        qmodel.to(device)
    return compute_sensitivity(qmodel, inputs, method=method, bits=bits, config=config, device=device,
                               progress=progress, model_name=model_name)
