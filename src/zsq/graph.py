"""Tracing a model into its data-flow graph (torch.fx), shared by folding and quantization.

Modules can opt out of being traced through by setting the class attribute ``zsq_leaf = True``
(e.g. the dynamic TF-"SAME" padding of EfficientNet): they then appear as one ``call_module`` node.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import TraceError


class ZsqTracer(fx.Tracer):
    """fx tracer that keeps torch.nn modules and modules marked ``zsq_leaf`` as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if getattr(type(m), "zsq_leaf", False):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (already a GraphModule: returned as is).

    Raises :class:`TraceError` with the underlying reason when the model has data-dependent
    control flow that fx cannot follow.
    """
    if isinstance(model, fx.GraphModule):
        return model
    tracer = ZsqTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; surface one clear error
        raise TraceError(
            f"could not trace {type(model).__name__} into a data-flow graph ({type(exc).__name__}: {exc}). "
            "zsq needs a model whose forward has no data-dependent Python control flow; mark helper "
            "modules that cannot be traced with the class attribute `zsq_leaf = True`."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(model.training)
    return gm


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else ``None``."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


ADD_TARGETS: tuple[Any, ...] = (operator.add, operator.iadd, torch.add, torch.Tensor.add, "add", "add_")


_RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS: tuple[Any, ...] = (torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_,
                                    torch.nn.functional.relu6)


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a ReLU or ReLU6 (module, function or ``x.relu()``): a clamp whose lower bound is 0."""
    mod = module_of(gm, node)
    if mod is not None:
        return isinstance(mod, _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                     nn.AdaptiveAvgPool3d)
_AVG_POOL_FUNCTIONS = (torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d,
                       torch.nn.functional.avg_pool3d, torch.nn.functional.adaptive_avg_pool1d,
                       torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_avg_pool3d)


def is_avg_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an average pooling (module or functional, adaptive or not)."""
    mod = module_of(gm, node)
    if mod is not None:
        return isinstance(mod, _AVG_POOL_MODULES)
    return node.op == "call_function" and node.target in _AVG_POOL_FUNCTIONS


def is_depthwise_conv(mod: nn.Module | None) -> bool:
    """A depthwise convolution: one filter group per input channel (``groups == in_channels > 1``)."""
    return isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups > 1 and mod.groups == mod.in_channels


def is_pointwise_conv(mod: nn.Module | None) -> bool:
    """A pointwise convolution: a dense (``groups == 1``) convolution whose kernel is 1 in every dimension."""
    return isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == 1 and all(k == 1 for k in mod.kernel_size)


def is_add(node: fx.Node) -> bool:
    """Whether ``node`` is an elementwise tensor addition (``a + b``, ``torch.add``, ``x.add(y)``)."""
    if node.op in ("call_function", "call_method") and node.target in ADD_TARGETS:
        tensor_args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        return len(tensor_args) == 2
    return False
