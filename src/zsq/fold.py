"""Folding BatchNorm layers into the convolution / linear layer that feeds them.

A BatchNorm in inference mode is a per-channel affine map of its input,
``y = (x - mean) * gamma / sqrt(var + eps) + beta``, so when ``x`` is the output of a
convolution or linear layer it can be merged into that layer's weight and bias:

    w' = w * gamma / sqrt(var + eps)              (scaled per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

Pairs are found only from the traced data flow (:func:`zsq.graph.trace`), never from the order in
which modules are defined or from their names. A BatchNorm is folded when

* its module is called exactly once in the graph and it keeps running statistics
  (``track_running_stats=True``);
* its input is the output of a ``call_module`` ``Conv1d``/``Conv2d``/``Conv3d``/``Linear``
  (grouped and depthwise convolutions included, with or without bias) of matching dimensionality
  and channel count, called exactly once, whose output is used by nothing but this BatchNorm;
* neither module has forward hooks or parametrizations, the layer's parameters are not shared with
  another module, and no graph node reads their attributes directly.

Everything else is left in place and listed, with the reason, in :attr:`FoldReport.skipped`.

Folding uses the running statistics, i.e. the BatchNorm's eval-mode semantics, whatever the
model's ``training`` flag (which is preserved). A ``Linear`` followed by ``BatchNorm1d`` is folded
on the assumption that the linear output is 2-D ``(N, C)``; the channel counts are checked.

Subclasses of the torch conv/linear classes that override ``forward`` (e.g. weight-standardised
convolutions) are not folded into, unless the class sets ``zsq_foldable = True`` to declare that
its output is still ``conv(x, weight) + bias`` with the weight scaled per output channel (e.g. a
convolution with dynamic "same" padding).
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .errors import UnsupportedLayerError
from .graph import is_add, module_of, trace

__all__ = ["FoldReport", "fold_batchnorm", "count_batchnorm", "has_batchnorm", "PRECEDES_REASON"]

PRECEDES_REASON = "BN precedes its conv; folding into the next layer is not supported"

# (torch base class, BatchNorm class whose channel layout matches its output)
_FOLD_TARGETS: tuple[tuple[type[nn.Module], type[_BatchNorm]], ...] = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did.

    ``folded``: ``(conv/linear module name, BatchNorm module name)`` per folded pair, in graph
    order. ``skipped``: ``(BatchNorm module name, reason)`` per BatchNorm left in the model.
    Names are the qualified submodule names of the original model (kept by the GraphModule).
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_folded(self) -> int:
        return len(self.folded)

    @property
    def num_bn_remaining(self) -> int:
        """Number of BatchNorm modules (called by the graph) left unfolded."""
        return len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [{"conv": c, "bn": b} for c, b in self.folded],
            "skipped": [{"bn": b, "reason": r} for b, r in self.skipped],
            "num_folded": self.num_folded,
            "num_bn_remaining": self.num_bn_remaining,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FoldReport":
        return cls(
            folded=[(str(d["conv"]), str(d["bn"])) for d in data.get("folded", [])],
            skipped=[(str(d["bn"]), str(d["reason"])) for d in data.get("skipped", [])],
        )

    def __str__(self) -> str:
        n = self.num_folded
        text = (
            f"folded {n} BatchNorm layer{'' if n == 1 else 's'} into conv/linear; "
            f"{self.num_bn_remaining} left unfolded"
        )
        for bn, reason in self.skipped:
            text += f"\n  {bn}: {reason}"
        return text


def count_batchnorm(model: nn.Module) -> int:
    """Number of distinct BatchNorm modules (1d/2d/3d/Sync/Lazy) in ``model``."""
    return sum(1 for m in model.modules() if isinstance(m, _BatchNorm))


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains at least one BatchNorm module."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[fx.GraphModule, FoldReport]:
    """Fold every foldable BatchNorm into the conv/linear layer that feeds it.

    Returns ``(graph_module, report)``. The GraphModule keeps the submodule names of ``model``,
    its ``training`` flag, device and dtypes; folded BatchNorm submodules are deleted from it.
    With ``inplace=False`` (default) ``model`` is deep-copied first and left untouched; with
    ``inplace=True`` the layers of ``model`` are modified (and shared with the result), so
    ``model`` itself must not be used afterwards.

    Raises :class:`zsq.errors.TraceError` when the model cannot be traced, and
    :class:`zsq.errors.UnsupportedLayerError` when ``inplace=False`` and the model cannot be
    deep-copied (e.g. the legacy ``torch.nn.utils.weight_norm`` hooks).
    """
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as exc:
            raise UnsupportedLayerError(
                f"could not copy {type(model).__name__} before folding ({type(exc).__name__}: {exc}); "
                "remove what prevents copy.deepcopy (e.g. legacy weight_norm hooks) or pass inplace=True"
            ) from exc
    gm = trace(model)
    report = FoldReport()
    graph = gm.graph

    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    attr_reads = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    owners: dict[int, set[str]] = defaultdict(set)  # parameter id -> modules that hold it
    for name, mod in gm.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                owners[id(p)].add(name)

    def attrs_read(name: str) -> bool:
        return any(t == name or t.startswith(name + ".") for t in attr_reads)

    seen_bn: set[str] = set()
    for node in list(graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, _BatchNorm):
            continue
        bn_name = str(node.target)
        if bn_name in seen_bn:  # second call of a shared BN: already reported
            continue
        seen_bn.add(bn_name)
        reason = _bn_reason(bn, bn_name, calls, attrs_read)
        conv_node = None
        if reason is None:
            conv_node, reason = _producer(gm, node, bn, calls, attrs_read, owners)
        if reason is not None:
            report.skipped.append((bn_name, reason))
            continue
        assert conv_node is not None
        conv = gm.get_submodule(str(conv_node.target))
        _fold_into(conv, bn)
        node.replace_all_uses_with(conv_node)
        graph.erase_node(node)
        gm.delete_submodule(bn_name)
        report.folded.append((str(conv_node.target), bn_name))

    graph.lint()
    gm.recompile()
    return gm, report


# ----------------------------------------------------------------------------------------------
# checks


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _is_parametrized(m: nn.Module) -> bool:
    return bool(getattr(m, "parametrizations", None))


def _is_uninitialized(t: torch.Tensor | None) -> bool:
    return isinstance(t, nn.parameter.UninitializedTensorMixin)


def _bn_reason(bn: _BatchNorm, name: str, calls: Counter, attrs_read) -> str | None:
    """Why the BatchNorm itself cannot be folded, or None."""
    if calls[name] > 1:
        return f"BN module is called {calls[name]} times in the graph (shared); folding needs exactly one call"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "BN has no running statistics (track_running_stats=False), so it always uses batch statistics"
    if _is_uninitialized(bn.running_mean) or (bn.affine and _is_uninitialized(bn.weight)):
        return "BN is a lazy module that was never initialised"
    if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return f"{type(bn).__name__} is not a BatchNorm1d/2d/3d"
    if _has_hooks(bn):
        return "BN has forward hooks, which would be lost"
    if _is_parametrized(bn):
        return "BN has parametrizations"
    if attrs_read(name):
        return "attributes of the BN are read directly elsewhere in the graph"
    return None


def _fold_base(m: nn.Module) -> tuple[type[nn.Module], type[_BatchNorm]] | None:
    for base, bn_cls in _FOLD_TARGETS:
        if isinstance(m, base):
            return base, bn_cls
    return None


def _custom_forward(m: nn.Module, base: type[nn.Module]) -> bool:
    cls = type(m)
    if getattr(cls, "zsq_foldable", False):
        return False
    if cls.forward is not base.forward:
        return True
    return isinstance(m, _ConvNd) and cls._conv_forward is not base._conv_forward  # type: ignore[attr-defined]


def _describe(gm: fx.GraphModule, node: Any) -> str:
    if not isinstance(node, fx.Node):
        return f"a non-tensor value ({node!r})"
    if node.op == "placeholder":
        return f"the graph input '{node.target}'"
    if node.op == "call_module":
        return f"{type(module_of(gm, node)).__name__} '{node.target}'"
    if is_add(node):
        return f"an add ('{node.name}')"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)} ('{node.name}')"
    if node.op == "call_method":
        return f"the tensor method .{node.target}() ('{node.name}')"
    return f"{node.op} '{node.target}'"


def _producer(gm, bn_node, bn, calls, attrs_read, owners) -> tuple[fx.Node | None, str | None]:
    """The conv/linear node to fold ``bn_node`` into, or ``(None, reason)``."""
    src = bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")
    src_mod = module_of(gm, src) if isinstance(src, fx.Node) else None

    if isinstance(src_mod, _ConvTransposeNd):
        return None, (
            f"BN is fed by {type(src_mod).__name__} '{src.target}'; folding into transposed "
            "convolutions is not supported"
        )
    target = _fold_base(src_mod) if src_mod is not None else None
    if target is None:
        for user in bn_node.users:
            if module_of(gm, user) is not None and _fold_base(module_of(gm, user)) is not None:
                return None, PRECEDES_REASON
        return None, f"BN is fed by {_describe(gm, src)}, not by a conv/linear layer"

    base, bn_cls = target
    name = str(src.target)
    kind = type(src_mod).__name__
    if type(bn) is not bn_cls:
        return None, f"{type(bn).__name__} does not match the output layout of {kind} '{name}'"
    out_ch = src_mod.out_features if isinstance(src_mod, nn.Linear) else src_mod.out_channels
    if out_ch != bn.num_features:
        return None, f"{kind} '{name}' has {out_ch} output channels but the BN has {bn.num_features}"
    if calls[name] > 1:
        return None, f"{kind} '{name}' is called {calls[name]} times in the graph (shared)"
    others = [u.name for u in src.users if u is not bn_node]
    if others:
        return None, (
            f"output of {kind} '{name}' also feeds {', '.join(others)}; folding would change those uses"
        )
    if _custom_forward(src_mod, base):
        return None, (
            f"{kind} '{name}' overrides forward; set zsq_foldable = True on the class if its output "
            "is still conv(x, weight) + bias"
        )
    if _is_uninitialized(src_mod.weight):
        return None, f"{kind} '{name}' is a lazy module that was never initialised"
    if _has_hooks(src_mod):
        return None, f"{kind} '{name}' has forward hooks (e.g. weight_norm) that folding could break"
    if _is_parametrized(src_mod):
        return None, f"{kind} '{name}' has parametrizations (its weight is computed)"
    for p in (src_mod.weight, src_mod.bias):
        if p is not None and owners.get(id(p), set()) - {name}:
            return None, f"parameters of {kind} '{name}' are shared with {sorted(owners[id(p)] - {name})}"
    if attrs_read(name):
        return None, f"attributes of {kind} '{name}' are read directly elsewhere in the graph"
    return src, None


# ----------------------------------------------------------------------------------------------
# the arithmetic


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    w = layer.weight
    dev = w.device
    acc = torch.float32 if dev.type == "mps" else torch.float64  # no float64 on MPS
    mean = bn.running_mean.to(dev, acc)
    var = bn.running_var.to(dev, acc)
    if bn.affine and bn.weight is not None:
        gamma = bn.weight.to(dev, acc)
        beta = bn.bias.to(dev, acc)
    else:
        gamma = torch.ones_like(mean)
        beta = torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = layer.bias.to(dev, acc) if layer.bias is not None else torch.zeros_like(mean)

    new_w = w.to(acc) * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * scale + beta
    w.copy_(new_w.to(w.dtype))
    if layer.bias is not None:
        layer.bias.copy_(new_b.to(layer.bias.dtype))
    else:
        layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
