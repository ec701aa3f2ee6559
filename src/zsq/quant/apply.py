"""The quantize verb: turn a (BN-folded) float model into a fake-quantized, deployable-shaped model.

Where quantizers go (what an int8 runtime such as ONNX Runtime's QDQ format needs):
* every Conv/Linear weight (per output channel or per tensor);
* the activation tensors that feed a quantized Conv/Linear (this includes the network input);
* both inputs and the output of every residual addition; when the sum's only consumer is a ReLU/ReLU6
  (ResNet's ``relu(x + shortcut)``), the output quantizer goes after that ReLU instead: one quantizer
  rather than two in a row, a range that starts at 0 (finer steps), and the ``Add -> ReLU -> Q`` shape
  that an int8 runtime runs as one fused kernel (ONNX Runtime: QLinearAdd).
A tensor with several consumers gets one quantizer shared by all of them (one Q/DQ pair).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..config import OUTPUT_MSE_MAX_FAN_IN, LayerOverride, QuantConfig
from ..errors import ConfigError
from ..graph import is_add, is_avg_pool, is_depthwise_conv, is_relu, module_of, trace
from ..scope import matches, validate_patterns
from .modules import QUANT_LAYER_TYPES, QUANT_MODULE_FOR, ActQuantizer, WeightQuantizer
from .nonuniform import NonUniformWeightQuantizer

log = logging.getLogger(__name__)

ACT_PREFIX = "zsq_act"


@dataclass
class LayerPlan:
    """Resolved settings of one quantizable layer."""

    name: str
    kind: str
    wbits: int | None  # None: kept in float
    abits: int | None
    weight_granularity: str
    params: int
    out_channels: int
    weight_quantizer: str = "uniform"  # "uniform" or "nonuniform" (codebook, zsq.quant.nonuniform)
    weight_symmetric: bool | None = None  # None: kept in float (QuantConfig.weight_symmetric_for of its bits)
    weight_estimator: str = "minmax"  # how the weight range is found (QuantConfig.weight_estimator or an override)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class QuantReport:
    layers: list[LayerPlan] = field(default_factory=list)
    act_quantizers: list[str] = field(default_factory=list)
    bn_remaining: int = 0

    @property
    def num_weight_quantizers(self) -> int:
        return sum(1 for l in self.layers if l.wbits is not None)

    @property
    def num_act_quantizers(self) -> int:
        return len(self.act_quantizers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_weight_quantizers": self.num_weight_quantizers,
            "num_act_quantizers": self.num_act_quantizers,
            "float_layers": [l.name for l in self.layers if l.wbits is None],
            "layers": [l.to_dict() for l in self.layers],
            "act_quantizers": list(self.act_quantizers),
        }

    def __str__(self) -> str:
        fl = [l.name for l in self.layers if l.wbits is None]
        return (
            f"placed {self.num_weight_quantizers} weight quantizers and {self.num_act_quantizers} activation quantizers"
            + (f"; {len(fl)} layer(s) kept in float: {', '.join(fl)}" if fl else "")
        )


def quantizable_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Module]]:
    """Conv/Linear call sites in data-flow (topological) order."""
    out = []
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if mod is not None and (type(mod) in QUANT_MODULE_FOR or isinstance(mod, QUANT_LAYER_TYPES)):
            out.append((node, mod))
    return out


def resolve_layer_plans(gm: fx.GraphModule, config: QuantConfig) -> list[LayerPlan]:
    """Apply global settings, overrides and skips to every quantizable layer (validating patterns)."""
    nodes = quantizable_nodes(gm)
    names = [str(n.target) for n, _ in nodes]
    seen = set()
    for n in names:
        if n in seen:
            raise ConfigError(
                f"layer {n!r} is called more than once in forward; zsq cannot give a shared layer two "
                "activation ranges: add it to the skip list or define one module per call"
            )
        seen.add(n)
    validate_patterns(config.skip, names, what="skip")
    validate_patterns(config.overrides.keys(), names, what="override")
    plans = []
    for (node, mod), name in zip(nodes, names):
        w, a, g = config.wbits, config.abits, config.weight_granularity
        wkind, west = config.weight_quantizer, config.weight_estimator
        if config.depthwise_weight_estimator is not None and is_depthwise_conv(mod):
            west = config.depthwise_weight_estimator
        floated = any(matches(p, name, names) for p in config.skip)
        for pattern, ov in config.overrides.items():
            if not matches(pattern, name, names):
                continue
            if ov is None:
                floated = True
                continue
            assert isinstance(ov, LayerOverride)
            w = ov.wbits if ov.wbits is not None else w
            a = ov.abits if ov.abits is not None else a
            g = ov.weight_granularity if ov.weight_granularity is not None else g
            wkind = ov.weight_quantizer if ov.weight_quantizer is not None else wkind
            west = ov.weight_estimator if ov.weight_estimator is not None else west
        kind = type(mod).__name__.replace("Quant", "")
        out_ch = mod.weight.shape[0]
        if west == "output_mse" and not output_mse_applies(mod, granularity=g, quantizer=wkind):
            west = "mse"  # documented fallback (QuantConfig.weight_estimator); the plan shows what was used
        plans.append(LayerPlan(name, kind, None if floated else w, None if floated else a, g,
                               mod.weight.numel(), out_ch, wkind,
                               None if floated else config.weight_symmetric_for(w), west))
    return plans


def output_mse_applies(mod: nn.Module, *, granularity: str, quantizer: str) -> bool:
    """Whether the ``output_mse`` weight range can be fitted to ``mod``: a per-channel uniform quantizer on a
    Conv2d (zero padding) or Linear with at most ``OUTPUT_MSE_MAX_FAN_IN`` weights per output channel."""
    if granularity != "per_channel" or quantizer != "uniform":
        return False
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return False
    elif not isinstance(mod, nn.Linear):
        return False
    return mod.weight[0].numel() <= OUTPUT_MSE_MAX_FAN_IN


def _output_before_avg_pool(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The layer's output (after any ReLU/ReLU6 that follows it alone) when it feeds an average pooling.

    Quantizing it there lets an integer runtime keep the layer and the pooling in int8 (ONNX Runtime:
    QLinearConv + QLinearGlobalAveragePool, e.g. EfficientNet's head conv); otherwise the layer has no
    quantized output and runs dequantise-then-float.
    """
    cur = node
    while len(cur.users) == 1:
        (user,) = cur.users
        if is_relu(gm, user):
            cur = user
            continue
        return cur if is_avg_pool(gm, user) else None
    return None


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def quantize(model: nn.Module, config: QuantConfig | None = None, *, inplace: bool = False) -> fx.GraphModule:
    """Return a fake-quantized copy of ``model`` (weights quantized now, activations uncalibrated).

    ``model`` should already be BN-folded (:func:`zsq.fold.fold_batchnorm`); remaining BatchNorm
    layers stay in float and are reported. The result carries ``zsq_report`` (:class:`QuantReport`)
    and ``zsq_config``. Call :func:`zsq.calibrate.calibrate` before running it.
    """
    import copy

    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a zsq.config.QuantConfig, got {type(config).__name__}")
    src = model if inplace else copy.deepcopy(model)
    gm = trace(src)
    plans = resolve_layer_plans(gm, config)
    plan_by_name = {p.name: p for p in plans}

    # 1. Weights: swap Conv/Linear for quantized versions.
    for node, mod in quantizable_nodes(gm):
        plan = plan_by_name[str(node.target)]
        if plan.wbits is None:
            continue
        wq: WeightQuantizer | NonUniformWeightQuantizer
        if plan.weight_quantizer == "nonuniform":
            wq = NonUniformWeightQuantizer(
                bits=plan.wbits, symmetric=bool(plan.weight_symmetric),
                per_channel=plan.weight_granularity == "per_channel", channels=plan.out_channels,
                estimator=plan.weight_estimator,
            )
        else:
            wq = WeightQuantizer(
                bits=plan.wbits, symmetric=bool(plan.weight_symmetric),
                per_channel=plan.weight_granularity == "per_channel", channels=plan.out_channels,
                estimator=plan.weight_estimator,
            )
        float_mod = mod
        if isinstance(mod, QUANT_LAYER_TYPES):
            raise ConfigError(f"layer {plan.name!r} is already quantized; quantize the float model instead")
        new = QUANT_MODULE_FOR[type(float_mod)].from_float(float_mod, wq)
        new.train(float_mod.training)
        _set_submodule(gm, plan.name, new)

    # 2. Activation quantization points: tensor node -> bits (max over consumers).
    points: dict[fx.Node, int] = {}

    def want(n: Any, bits: int | None) -> None:
        if isinstance(n, fx.Node) and bits is not None:
            points[n] = max(points.get(n, 0), bits)

    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if mod is not None and isinstance(mod, QUANT_LAYER_TYPES):
            plan = plan_by_name[str(node.target)]
            want(node.args[0] if node.args else None, plan.abits)
            want(_output_before_avg_pool(gm, node), plan.abits)
        elif is_add(node):
            want(node.args[0], config.abits)
            want(node.args[1], config.abits)
            users = list(node.users)
            if len(users) == 1 and is_relu(gm, users[0]):
                want(users[0], config.abits)
            else:
                want(node, config.abits)

    # 3. Insert one ActQuantizer after each point, in graph order; rewire all consumers.
    report = QuantReport(layers=plans)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = next(gm.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    for n in sorted(points, key=order.__getitem__):
        qname = f"{ACT_PREFIX}_{_sanitize(n.name)}"
        aq = ActQuantizer(bits=points[n], symmetric=config.act_symmetric, name=qname).to(device)
        gm.add_submodule(qname, aq)
        with gm.graph.inserting_after(n):
            qnode = gm.graph.call_module(qname, args=(n,))
        n.replace_all_uses_with(qnode, delete_user_cb=lambda u: u is not qnode)
        report.act_quantizers.append(qname)
    gm.graph.lint()
    gm.recompile()
    report.bn_remaining = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    if report.bn_remaining:
        log.warning("%d BatchNorm layer(s) remain in float (not foldable); the model is not fully integer",
                    report.bn_remaining)
    gm.zsq_report = report  # type: ignore[attr-defined]
    gm.zsq_config = config  # type: ignore[attr-defined]
    return gm


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
