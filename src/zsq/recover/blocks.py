"""Reconstruction units of a quantized model, found from its traced data-flow graph, and the machinery to
run one unit on cached inputs.

A *unit* is a contiguous run of graph nodes (in topological order) with exactly one tensor flowing in and
one flowing out, so that units can be reconstructed one after the other, each fed by the output of the
already-reconstructed units before it.

How units are found (:func:`find_units`):

1. **Cuts.** Position ``i`` of the topological order is a cut when exactly one tensor computed at or before
   ``i`` is still needed after ``i``. The nodes between two consecutive cuts form a *segment*: either a
   single node, or a multi-path region (a residual block: it holds the ``add`` that joins its paths).
2. **Residual blocks** (kind ``"residual"``): every multi-path segment that holds a conv/linear layer and an
   addition (a multi-path segment without addition, e.g. a squeeze-excitation gate, is kind ``"branch"``).
3. **MBConv blocks without shortcut** (kind ``"mbconv"``): on single-path stretches, a depthwise conv
   followed by a *linear* conv (no activation after it, the inverted-residual bottleneck), with the
   preceding 1x1 expansion conv when there is one.
4. **Single layers** (kind ``"layer"``): every other conv/linear layer (stem, head, classifier, plain chains).
5. Nodes between units (activations, activation quantizers, pooling, padding, flatten) go to the unit
   before them while they are element-wise (so a block's output includes its ReLU and output quantizer),
   the rest to the unit after them (so pooling belongs to the classifier, not to the last block).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UnsupportedLayerError, ZsqError
from ..graph import is_add, is_depthwise_conv, is_pointwise_conv, trace
from ..quant.modules import QUANT_LAYER_TYPES, ActQuantizer

log = logging.getLogger(__name__)

UNIT_KINDS = ("residual", "mbconv", "branch", "layer")

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)  # the quantized types subclass these
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU,
                      nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Mish)
ACTIVATION_FUNCTIONS = (F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.leaky_relu,
                        F.elu, torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, F.sigmoid, F.tanh)
ACTIVATION_METHODS = ("relu", "relu_", "clamp", "clamp_", "clip", "sigmoid", "tanh", "hardtanh")
PASS_MODULES = (ActQuantizer, nn.Identity, nn.Dropout)


# ------------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One reconstruction unit: ``nodes`` (fx node names, topological order) turn ``input`` into ``output``.

    ``layers`` are the conv/linear modules called in the unit (quantized or float), ``act_quantizers`` the
    activation quantizers (module names) it calls.
    """

    name: str
    kind: str
    nodes: list[str]
    input: str
    output: str
    layers: list[str] = field(default_factory=list)
    act_quantizers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layers": list(self.layers),
                "act_quantizers": list(self.act_quantizers), "input": self.input, "output": self.output,
                "num_nodes": len(self.nodes)}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), LAYER_TYPES)


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = _module(gm, node)
    if mod is not None:
        return isinstance(mod, ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    return False


def _is_pass(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), PASS_MODULES)


def _is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is_pass(gm, node) or is_activation(gm, node)


def activation_after(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The activation nodes applied directly to ``node``'s output (through activation quantizers,
    identities and dropouts with one user each); empty when the output is used without activation."""
    out: list[fx.Node] = []
    cur = node
    while len(cur.users) == 1:
        (user,) = cur.users
        if is_activation(gm, user):
            out.append(user)
            return out
        if not _is_pass(gm, user):
            return out
        cur = user
    return out


def layer_tail(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """``node`` and the activation functions that directly follow it (single-user chain, no quantizers):
    the output AdaRound reconstructs for one layer (its "asymmetric" reconstruction target)."""
    out = [node]
    cur = node
    while len(cur.users) == 1:
        (user,) = cur.users
        if not is_activation(gm, user):
            break
        out.append(user)
        cur = user
    return out


def _graph_nodes(gm: fx.GraphModule) -> tuple[fx.Node, list[fx.Node], fx.Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedLayerError(
            f"recovery needs a model with exactly one input tensor; this graph has {len(placeholders)} inputs "
            f"({', '.join(p.name for p in placeholders)})")
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    return placeholders[0], body, outputs[0]


def _graph_to_logits(gm: fx.GraphModule) -> tuple[fx.Node, list[fx.Node], fx.Node]:
    """(input placeholder, body nodes, the logits node) of a graph that returns one tensor."""
    placeholder, body, output = _graph_nodes(gm)
    out = output.args[0]
    if not isinstance(out, fx.Node):
        raise UnsupportedLayerError("recovery needs a model that returns one tensor (logits)")
    return placeholder, body, out


def _cuts(placeholder: fx.Node, body: list[fx.Node], output: fx.Node) -> dict[int, fx.Node]:
    """``{position: the one tensor crossing}`` for every cut (position -1 is before the first node)."""
    pos = {n: i for i, n in enumerate(body)}
    pos[placeholder] = -1
    end = len(body)
    last_use: dict[fx.Node, int] = {}
    for n in [placeholder, *body]:
        uses = [pos[u] if u in pos else (end if u is output else -2) for u in n.users]
        uses = [u for u in uses if u >= 0]
        if uses:
            last_use[n] = max(uses)
    cuts: dict[int, fx.Node] = {}
    live: set[fx.Node] = set()
    for i in range(-1, end):
        n = placeholder if i == -1 else body[i]
        if n in last_use:
            live.add(n)
        live = {d for d in live if last_use[d] > i}
        if len(live) == 1:
            cuts[i] = next(iter(live))
    return cuts


def _common_prefix(names: Sequence[str]) -> str:
    """Longest common dotted prefix (``layer1.0.conv1``, ``layer1.0.conv2`` -> ``layer1.0``)."""
    out: list[str] = []
    for group in zip(*[n.split(".") for n in names]):
        if any(g != group[0] for g in group):
            break
        out.append(group[0])
    return ".".join(out)


def find_units(model: nn.Module) -> list[Unit]:
    """The reconstruction units of ``model`` (a quantized model from :func:`zsq.quantize`), in data-flow order.

    Raises :class:`~zsq.errors.UnsupportedLayerError` for models with several inputs or outputs.
    """
    gm = trace(model)
    placeholder, body, output = _graph_nodes(gm)
    cuts = _cuts(placeholder, body, output)
    end = len(body) - 1
    if end < 0:
        raise UnsupportedLayerError("the model graph is empty")
    if end not in cuts:
        raise UnsupportedLayerError("recovery needs a model with one output tensor (logits); this graph returns "
                                    "several tensors")
    positions = sorted(cuts)
    segments: list[list[int]] = []  # node positions
    for a, b in zip(positions, positions[1:]):
        segments.append(list(range(a + 1, b + 1)))

    # Atoms: ("unit", kind, [positions]) for layer-carrying pieces, ("fill", None, [positions]) otherwise.
    atoms: list[tuple[str, str | None, list[int]]] = []
    for seg in segments:
        nodes = [body[i] for i in seg]
        has_layer = any(is_layer(gm, n) for n in nodes)
        if len(seg) > 1 and has_layer:
            atoms.append(("unit", "residual" if any(is_add(n) for n in nodes) else "branch", seg))
        elif len(seg) == 1 and has_layer:
            atoms.append(("layer", None, seg))
        else:
            atoms.append(("fill", None, seg))

    # Group single-path layers: MBConv (optional 1x1 expand, depthwise, linear project) or single layers.
    groups: list[tuple[str, int, int]] = []  # (kind, first atom index, last atom index)
    chain: list[int] = []  # atom indices of pending single-path layers

    def flush() -> None:
        i = 0
        while i < len(chain):
            a = chain[i]
            mod = _module(gm, body[atoms[a][2][0]])
            if is_depthwise_conv(mod) and i + 1 < len(chain):
                b = chain[i + 1]
                proj = body[atoms[b][2][0]]
                if not activation_after(gm, proj) and isinstance(_module(gm, proj), (nn.Conv1d, nn.Conv2d)):
                    start = a
                    if groups and groups[-1][0] == "layer" and i > 0 and groups[-1][1] == chain[i - 1]:
                        prev = body[atoms[chain[i - 1]][2][0]]
                        if is_pointwise_conv(_module(gm, prev)) and activation_after(gm, prev):
                            start = groups.pop()[1]
                    groups.append(("mbconv", start, b))
                    i += 2
                    continue
            groups.append(("layer", a, a))
            i += 1
        chain.clear()

    for k, (what, kind, _) in enumerate(atoms):
        if what == "unit":
            flush()
            groups.append((kind or "branch", k, k))
        elif what == "layer":
            chain.append(k)
    flush()
    if not groups:
        raise UnsupportedLayerError("the model has no conv/linear layer to reconstruct")

    # Distribute the filler atoms between groups: element-wise ones to the group before, the rest after.
    bounds = [[g[1], g[2]] for g in groups]
    bounds[0][0] = 0
    bounds[-1][1] = len(atoms) - 1
    for gi in range(len(groups) - 1):
        lo, hi = bounds[gi][1] + 1, bounds[gi + 1][0] - 1
        split = lo
        while split <= hi and all(_is_elementwise(gm, body[p]) for p in atoms[split][2]):
            split += 1
        bounds[gi][1] = split - 1
        bounds[gi + 1][0] = split

    units: list[Unit] = []
    used_names: set[str] = set()
    for (kind, _, _), (a, b) in zip(groups, bounds):
        pos = [p for k in range(a, b + 1) for p in atoms[k][2]]
        nodes = [body[p] for p in pos]
        layers = [str(n.target) for n in nodes if is_layer(gm, n)]
        acts = [str(n.target) for n in nodes if isinstance(_module(gm, n), ActQuantizer)]
        name = (_common_prefix(layers) if len(layers) > 1 else layers[0]) or f"unit{len(units)}"
        if name in used_names:
            name = f"{name}#{len(units)}"
        used_names.add(name)
        units.append(Unit(name=name, kind=kind, nodes=[n.name for n in nodes], input=cuts[pos[0] - 1].name,
                          output=cuts[pos[-1]].name, layers=layers, act_quantizers=acts))
    log.debug("reconstruction units: %s", ", ".join(f"{u.name}({u.kind})" for u in units))
    return units


# ------------------------------------------------------------------------------------------------
# Running a unit
# ------------------------------------------------------------------------------------------------

WeightFn = Callable[[str, nn.Module], torch.Tensor]
ActFn = Callable[[str, ActQuantizer, torch.Tensor], torch.Tensor]


def layer_forward(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mod``'s forward with ``weight`` in place of its own (conv or linear)."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return mod._conv_forward(x, weight, mod.bias)
    return F.linear(x, weight, mod.bias)


def quantized_weight(name: str, mod: nn.Module) -> torch.Tensor:
    """The weight the quantized model uses (fake-quantized, or float for float layers)."""
    return mod.quantized_weight() if isinstance(mod, QUANT_LAYER_TYPES) else mod.weight


def module_act(name: str, mod: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    return mod(x)


def no_act(name: str, mod: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    return x


class UnitRunner:
    """Executes the nodes of one :class:`Unit` (or any node list with one input) of ``gm``.

    ``weight_fn(name, layer)`` gives the weight every conv/linear uses and ``act_fn(name, quantizer, x)``
    replaces every activation quantizer, so the same nodes run as the float model (float weights,
    quantizers off), as the quantized model, or with learnable roundings and step sizes. Modules are
    called, never modified.
    """

    def __init__(self, gm: fx.GraphModule, nodes: Sequence[str], input: str, output: str) -> None:
        by_name = {n.name: n for n in gm.graph.nodes}
        self.gm = gm
        self.nodes = [by_name[n] for n in nodes]
        self.input = by_name[input]
        self.output = by_name[output]

    @classmethod
    def for_unit(cls, gm: fx.GraphModule, unit: Unit) -> "UnitRunner":
        return cls(gm, unit.nodes, unit.input, unit.output)

    @classmethod
    def whole_model(cls, gm: fx.GraphModule) -> "UnitRunner":
        placeholder, body, out = _graph_to_logits(gm)
        return cls(gm, [n.name for n in body], placeholder.name, out.name)

    @classmethod
    def after_unit(cls, gm: fx.GraphModule, unit: Unit) -> "UnitRunner":
        """Everything after ``unit`` up to the logits (its input is the unit's output).

        Units end at cuts of the graph, where exactly one tensor is still needed later, so the rest of the
        model depends on the unit's output alone. For the last unit the runner is the identity.
        """
        _, body, out = _graph_to_logits(gm)
        names = [n.name for n in body]
        rest = names[names.index(unit.output) + 1:] if unit.output != out.name else []
        return cls(gm, rest, unit.output, out.name)

    def _fetch(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def __call__(self, x: torch.Tensor, *, weight_fn: WeightFn = quantized_weight, act_fn: ActFn = module_act,
                 capture: Sequence[fx.Node] = ()) -> Any:
        env: dict[fx.Node, Any] = {self.input: x}

        def value(a: fx.Node) -> Any:
            if a in env:
                return env[a]
            if a.op == "get_attr":
                return self._fetch(str(a.target))
            raise UnsupportedLayerError(f"node {a.name!r} is used inside a reconstruction unit but computed "
                                        "outside it; the unit does not have a single input")

        for n in self.nodes:
            args = fx.node.map_arg(n.args, value)
            kwargs = fx.node.map_arg(n.kwargs, value)
            if n.op == "call_module":
                mod = self.gm.get_submodule(str(n.target))
                if isinstance(mod, LAYER_TYPES):
                    out = layer_forward(mod, args[0], weight_fn(str(n.target), mod))
                elif isinstance(mod, ActQuantizer):
                    out = act_fn(str(n.target), mod, args[0])
                else:
                    out = mod(*args, **kwargs)
            elif n.op == "call_function":
                out = n.target(*args, **kwargs)
            elif n.op == "call_method":
                self_obj, *rest = args
                out = getattr(self_obj, str(n.target))(*rest, **kwargs)
            else:  # pragma: no cover - filtered out by find_units
                raise UnsupportedLayerError(f"cannot run node {n.name!r} of kind {n.op!r}")
            env[n] = out
        if capture:
            return tuple(env[c] for c in capture)
        return env[self.output]

    @torch.no_grad()
    def batched(self, x: torch.Tensor, *, batch_size: int, weight_fn: WeightFn = quantized_weight,
                act_fn: ActFn = module_act, capture: Sequence[fx.Node] = ()) -> Any:
        """Run on ``x`` (N, ...) in batches without gradients; outputs concatenated along dim 0."""
        outs: list[Any] = []
        for i in range(0, x.shape[0], batch_size):
            outs.append(self(x[i:i + batch_size], weight_fn=weight_fn, act_fn=act_fn, capture=capture))
        if capture:
            return tuple(torch.cat([o[k] for o in outs]) for k in range(len(capture)))
        return torch.cat(outs)


def float_weights(snapshot: dict[str, torch.Tensor]) -> WeightFn:
    """Weight function of the float model: each layer's weight from ``snapshot`` (taken before recovery)."""

    def fn(name: str, mod: nn.Module) -> torch.Tensor:
        return snapshot.get(name, mod.weight)

    return fn


def mse(a: torch.Tensor, b: torch.Tensor, *, batch_size: int = 256) -> float:
    """Mean squared error per element (float64 accumulation, batched to bound memory)."""
    total = 0.0
    for i in range(0, a.shape[0], batch_size):
        total += float((a[i:i + batch_size].double() - b[i:i + batch_size].double()).pow(2).sum())
    return total / max(a.numel(), 1)


def reconstruction_loss(y: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the batch and positions (BRECQ's scale).

    ``weight`` (same shape as ``y``, e.g. from :func:`fisher_weights`) weighs each element's squared error.
    """
    d = (y - target).pow(2)
    if weight is not None:
        d = d * weight
    return d.sum(dim=1).mean() if d.dim() > 1 else d.mean()


def fisher_weights(
    suffix: UnitRunner,
    y: torch.Tensor,
    *,
    weight_fn: WeightFn,
    batch_size: int,
    generator: torch.Generator,
    mix: float,
    samples: int = 1,
) -> torch.Tensor:
    """Per-element weights of a unit's output error from the diagonal Fisher information (BRECQ, Li et al. 2021).

    ``y`` is the float model's output of the unit; ``suffix`` (:meth:`UnitRunner.after_unit`) runs the float
    model from there to the logits.
    For each input, labels are drawn from the float model's own softmax (no real label is needed), and the
    squared gradient of ``-log p(label)`` with respect to ``y``, averaged over ``samples`` draws, estimates
    the Fisher diagonal: an error where it is large changes the output distribution most. The estimate is
    normalised to mean 1 over all elements and mixed with the plain squared error:
    ``w = (1 - mix) + mix * F / mean(F)`` (``mix = 0``: plain MSE; ``1``: Fisher only).
    """
    out = torch.empty_like(y)
    for i in range(0, y.shape[0], batch_size):
        yb = y[i:i + batch_size].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = suffix(yb, weight_fn=weight_fn, act_fn=no_act)
            logp = torch.log_softmax(logits.float(), dim=-1)
            probs = logp.detach().exp()
            acc = torch.zeros_like(yb)
            for k in range(samples):
                labels = torch.multinomial(probs.cpu(), 1, generator=generator).to(logp.device)
                (g,) = torch.autograd.grad(-logp.gather(1, labels).sum(), yb, retain_graph=k < samples - 1)
                acc += g.detach().pow(2)
        out[i:i + batch_size] = acc / samples
    mean = out.mean(dtype=torch.float64).clamp_min(1e-30).float()
    return (1.0 - mix) + mix * (out / mean)


@dataclass
class UnitData:
    """Cached tensors of one unit: the quantized model's input to it (``xq``), the float model's input
    (``xf``) and the float model's output (``yf``); ``h*`` are the same for held-apart inputs (or None);
    ``w`` weighs the elements of the output error (None: plain squared error)."""

    xq: torch.Tensor
    xf: torch.Tensor
    yf: torch.Tensor
    hq: torch.Tensor | None = None
    hf: torch.Tensor | None = None
    hyf: torch.Tensor | None = None
    w: torch.Tensor | None = None  # per-element weights of the output error (``fisher_weights``), or None


@dataclass
class SequentialResult:
    unit: Unit
    mse_before: float
    mse_after: float
    holdout_before: float | None
    holdout_after: float | None
    seconds: float
    info: dict[str, Any]


def reconstruct_sequentially(
    gm: fx.GraphModule,
    units: Sequence[Unit],
    inputs: torch.Tensor,
    holdout: torch.Tensor | None,
    *,
    snapshot: dict[str, torch.Tensor],
    train_unit: Callable[[Unit, UnitRunner, UnitData], dict[str, Any]],
    eval_batch: int,
    output_weights: Callable[[Unit, torch.Tensor, WeightFn], torch.Tensor] | None = None,
    revert_worse: bool = False,
) -> Iterator[SequentialResult]:
    """Reconstruct ``units`` one after the other (a generator: one result per unit).

    Each unit is fed the quantized model's own input to it, i.e. the output of the already-reconstructed
    units before it; its target is the float model's output of the unit. ``train_unit`` learns (and
    writes into the model) whatever it reconstructs; the errors before and after are measured with the
    model's ordinary quantized forward, so they also check that the learned values were written correctly.
    ``output_weights(unit, yf, float_weight_fn)``, if given, returns per-element weights of the unit's output
    error (``UnitData.w``); the reported errors stay plain MSE. With ``revert_worse``, a unit whose error on the
    learning inputs is higher after ``train_unit`` than before is put back as it was (its layers' and activation
    quantizers' state), and its result says so (``info["reverted"]``).
    """
    import time

    fw = float_weights(snapshot)
    xq = xf = inputs
    hq = hf = holdout
    for unit in units:
        runner = UnitRunner.for_unit(gm, unit)
        t0 = time.perf_counter()
        yf = runner.batched(xf, batch_size=eval_batch, weight_fn=fw, act_fn=no_act)
        yq = runner.batched(xq, batch_size=eval_batch)
        before = mse(yq, yf)
        hyf = h_before = None
        if hq is not None and hf is not None:
            hyf = runner.batched(hf, batch_size=eval_batch, weight_fn=fw, act_fn=no_act)
            h_before = mse(runner.batched(hq, batch_size=eval_batch), hyf)
        w = output_weights(unit, yf, fw) if output_weights is not None else None
        start = _unit_state(gm, unit) if revert_worse else None
        if start is None:
            del yq  # only a revert reuses it; it need not stay in memory through training
        info = train_unit(unit, runner, UnitData(xq, xf, yf, hq, hf, hyf, w))
        xq_next = runner.batched(xq, batch_size=eval_batch)
        after = mse(xq_next, yf)
        if start is not None:
            info["reverted"] = after > before
            if after > before:  # as it was: the unit's output is again the one measured before training
                for name, state in start.items():
                    gm.get_submodule(name).load_state_dict(state)
                xq_next, after = yq, before
            del yq
        xq = xq_next
        h_after = None
        if hq is not None and hyf is not None:
            hq = runner.batched(hq, batch_size=eval_batch)
            h_after = mse(hq, hyf)
            hf = hyf
        xf = yf
        yield SequentialResult(unit, before, after, h_before, h_after, time.perf_counter() - t0, info)


def _unit_state(gm: nn.Module, unit: Unit) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of the state (weights, biases, quantizer buffers) of ``unit``'s layers and activation quantizers."""
    return {name: {k: v.detach().clone() for k, v in gm.get_submodule(name).state_dict().items()}
            for name in [*unit.layers, *unit.act_quantizers]}


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (NHWC in memory), the layout :func:`zsq.recover.recover` gives image
    inputs under ``RecoverConfig.channels_last``."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as ``like``) in ``like``'s memory layout, so that an elementwise op of the two keeps a
    channels-last ``like`` channels-last (``torch.where`` with a freshly drawn contiguous mask would not). The values
    are unchanged."""
    return t.contiguous(memory_format=torch.channels_last) if is_channels_last(like) else t


# Bernoulli masks (QDrop) for probabilities that are a multiple of 1/_MASK_LEVELS are drawn from random bytes
# (see bernoulli_mask); others from one uniform float per element.
_MASK_LEVELS = 256  # the values of one random byte


def bernoulli_mask(shape: Sequence[int], p: float, *, generator: torch.Generator,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """A tensor of ``shape`` whose elements are independently True (1) with probability ``p`` and False (0)
    otherwise (QDrop's keep-float mask), drawn with ``generator`` (a CPU generator; the mask is then moved to
    ``device``). ``dtype`` other than bool gives 0/1 values of that dtype: multiplying or interpolating with
    a float mask runs several times faster on CPU than with a boolean one or with ``torch.where``.

    The same distribution as ``torch.rand(shape) < p``, drawn with fewer random numbers where ``p`` has a short
    binary expansion: for ``p = 1/2`` each random byte gives eight elements (one bit each), for ``p = k / 2**m``
    with ``m <= 8`` each element takes one random byte compared with ``p * 256``. CPU random draws are sequential,
    and for the large activations of ImageNet-sized units one float per element was a tenth of a BRECQ step."""
    if not 0.0 <= p <= 1.0:
        raise ZsqError(f"a mask probability must be in [0, 1], got {p!r}")
    n = math.prod(shape)
    if p in (0.0, 1.0):
        return torch.full(tuple(shape), p == 1.0, dtype=torch.bool, device=device).to(dtype)
    if p == 0.5:
        raw = torch.randint(0, _MASK_LEVELS, ((n + 7) // 8,), dtype=torch.uint8, generator=generator)
        shifts = torch.arange(8, dtype=torch.uint8)
        mask = ((raw.unsqueeze(1) >> shifts) & 1).view(-1)[:n]  # 0/1 bytes
    elif (p * _MASK_LEVELS).is_integer():
        mask = torch.randint(0, _MASK_LEVELS, (n,), dtype=torch.uint8, generator=generator) < int(p * _MASK_LEVELS)
    else:
        mask = torch.rand(n, generator=generator) < p
    return mask.view(*shape).to(device=device, dtype=dtype)


# How each step's mini-batch rows are drawn (RecoverConfig.sampling; see batch_indices).
SAMPLINGS = ("random", "epochs")


def batch_indices(n: int, bsz: int, sampling: str, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of each step's mini-batch (``RecoverConfig.sampling``): ``"random"`` draws ``bsz`` distinct rows
    of ``n`` anew at every step; ``"epochs"`` takes consecutive slices of shuffled passes over all ``n`` rows (a
    slice that crosses the end of a pass continues into the next one), so every row is seen equally often."""
    if sampling == "random":
        while True:
            yield torch.randperm(n, generator=generator)[:bsz]
    elif sampling == "epochs":
        queue = torch.empty(0, dtype=torch.long)
        while True:
            while queue.numel() < bsz:
                queue = torch.cat([queue, torch.randperm(n, generator=generator)])
            yield queue[:bsz]
            queue = queue[bsz:]
    else:
        raise ZsqError(f"unknown sampling {sampling!r}; expected one of {', '.join(SAMPLINGS)}")


def unit_progress(iterable: Any, *, desc: str, progress: bool, total: int | None = None) -> Any:
    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False)

