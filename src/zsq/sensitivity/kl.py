"""ZeroQ's KL sensitivity (Cai et al., 2020, eq. 4):

    Omega_i(k) = 1/N * sum_j KL( M(theta; x_j) || M(theta~_i(k); x_j) )

the mean KL divergence between the output distribution of the float model and that of the model in
which only layer ``i`` has its weights quantized to ``k`` bits, over the ``N`` distilled inputs.

Cost. The float outputs are computed once per batch. Quantizing layer ``i`` changes nothing upstream
of it, so on a traced model (:class:`torch.fx.GraphModule`, which :func:`zsq.quantize` returns) the
float forward is walked node by node and, when it reaches layer ``i``, the rest of the graph is run
once per candidate bit width from the live float tensors at that point ("suffix" runs). That skips
on average half the network per evaluation and keeps only the live tensors of one cut in memory. Nodes
that modify a tensor in place get a private copy of that tensor in the suffix run, so the float walk
is never disturbed. ``KLConfig(suffix_cache=False)`` runs full forwards instead (same numbers).
"""

from __future__ import annotations

import logging
import operator
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..metrics import kl_divergence
from . import (DEFAULT_BITS, SensitivityMethod, SensitivityTable, as_logits, check_bit_candidates, check_inputs,
               isolated_weights, layer_infos, make_weight_quantizer, model_device, new_table, target_layers)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KLConfig:
    """Settings of the KL sensitivity.

    ``batch_size``: inputs per forward; ``suffix_cache``: reuse the float prefix of the network on a
    traced model (see the module docstring); ``max_inputs``: use at most this many inputs (``None``: all).
    """

    batch_size: int = 64
    suffix_cache: bool = True
    max_inputs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"KLConfig.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_inputs is not None and (not isinstance(self.max_inputs, int) or self.max_inputs < 1):
            raise ConfigError(f"KLConfig.max_inputs must be a positive integer or None, got {self.max_inputs!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KLConfig":
        unknown = set(d) - {"batch_size", "suffix_cache", "max_inputs"}
        if unknown:
            raise ConfigError(f"unknown KLConfig field(s) {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# Running a traced graph from an arbitrary node
# ------------------------------------------------------------------------------------------------

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}


def _is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


class GraphRunner:
    """Executes the nodes of a GraphModule in order, from any start index, freeing dead values."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        last_use: dict[fx.Node, int] = {}
        for n in self.nodes:
            for u in n.users:
                last_use[n] = max(last_use.get(n, -1), index[u])
        self.dead_after: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n, i in last_use.items():
            self.dead_after[i].append(n)
        self.index = index
        # Values that some in-place node mutates: a suffix run works on its own copy of them.
        self.mutated: set[fx.Node] = set()
        for n in self.nodes:
            if _is_inplace(gm, n) and n.args and isinstance(n.args[0], fx.Node):
                self.mutated.add(n.args[0])

    def _fetch_attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def step(self, i: int, env: dict[fx.Node, Any], inputs: Sequence[Any]) -> Any:
        node = self.nodes[i]
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":
            k = sum(1 for m in self.nodes[:i] if m.op == "placeholder")
            if k < len(inputs):
                val = inputs[k]
            elif node.args:
                val = node.args[0]
            else:
                raise ConfigError(f"the model's forward needs input {node.target!r}; sensitivity passes one tensor")
        elif node.op == "get_attr":
            val = self._fetch_attr(str(node.target))
        elif node.op == "call_module":
            val = self.gm.get_submodule(str(node.target))(*args, **kwargs)
        elif node.op == "call_function":
            val = node.target(*args, **kwargs)
        elif node.op == "call_method":
            self_obj, *rest = args
            val = getattr(self_obj, str(node.target))(*rest, **kwargs)
        elif node.op == "output":
            return args[0]
        else:  # pragma: no cover - fx has no other ops
            raise ConfigError(f"unsupported fx node op {node.op!r}")
        env[node] = val
        for dead in self.dead_after[i]:
            env.pop(dead, None)
        return None

    def run_from(self, start: int, env: dict[fx.Node, Any], inputs: Sequence[Any] = ()) -> Any:
        """Run nodes ``start..`` on ``env`` (mutated) and return the graph's output."""
        for i in range(start, len(self.nodes)):
            out = self.step(i, env, inputs)
            if self.nodes[i].op == "output":
                return out
        raise ConfigError("the traced graph has no output node")

    def branch_env(self, env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        """A copy of ``env`` safe to run a suffix on (mutated tensors cloned)."""
        return {n: (v.clone() if n in self.mutated and isinstance(v, torch.Tensor) else v) for n, v in env.items()}


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def kl_sensitivity(
    qmodel: nn.Module,
    inputs: torch.Tensor,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    config: KLConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> SensitivityTable:
    """ZeroQ KL sensitivity of every weight-quantized layer of ``qmodel`` at each of ``bits``."""
    cfg = config or KLConfig()
    if not isinstance(cfg, KLConfig):
        raise ConfigError(f"config for the kl method must be a KLConfig, got {type(cfg).__name__}")
    bits = check_bit_candidates(bits)
    inputs = check_inputs(inputs)
    if cfg.max_inputs is not None:
        inputs = inputs[: cfg.max_inputs]
    dev = torch.device(device) if device is not None else model_device(qmodel)
    qmodel.to(dev)
    t0 = time.perf_counter()
    targets = target_layers(qmodel)
    names = [n for n, _ in targets]
    infos = layer_infos(qmodel, inputs)
    qcfg = getattr(qmodel, "zsq_config", None)
    quantizers = {(n, k): make_weight_quantizer(m, k, config=qcfg) for n, m in targets for k in bits}
    sums = torch.zeros(len(names), len(bits), dtype=torch.float64)
    use_suffix = cfg.suffix_cache and isinstance(qmodel, fx.GraphModule)
    runner = GraphRunner(qmodel) if use_suffix else None
    node_of = {}
    if runner is not None:
        for n in runner.nodes:
            if n.op == "call_module" and str(n.target) in names:
                node_of[n] = names.index(str(n.target))
        if len(node_of) != len(names):  # a layer not called from the graph itself: fall back
            runner = None
    n_batches = (inputs.shape[0] + cfg.batch_size - 1) // cfg.batch_size
    total = 0
    with isolated_weights(qmodel) as iso, tqdm(total=n_batches * len(names), desc="KL sensitivity",
                                               disable=not progress, leave=False, unit="layer") as bar:
        for start in range(0, inputs.shape[0], cfg.batch_size):
            x = inputs[start: start + cfg.batch_size].to(dev)
            branch_logits: dict[tuple[int, int], torch.Tensor] = {}
            if runner is not None:
                env: dict[fx.Node, Any] = {}
                ref = None
                for i, node in enumerate(runner.nodes):
                    li = node_of.get(node)
                    if li is not None:
                        for kj, k in enumerate(bits):
                            with iso.only(names[li], quantizers[(names[li], k)]):
                                branch_logits[(li, kj)] = as_logits(runner.run_from(i, runner.branch_env(env), (x,)))
                        bar.update(1)
                    out = runner.step(i, env, (x,))
                    if node.op == "output":
                        ref = as_logits(out)
                        break
                assert ref is not None
            else:
                ref = as_logits(qmodel(x))
                for li, name in enumerate(names):
                    for kj, k in enumerate(bits):
                        with iso.only(name, quantizers[(name, k)]):
                            branch_logits[(li, kj)] = as_logits(qmodel(x))
                    bar.update(1)
            for (li, kj), logits in branch_logits.items():
                sums[li, kj] += float(kl_divergence(ref, logits).sum())
            total += x.shape[0]
    seconds = time.perf_counter() - t0
    mean = sums / total
    values = {n: {k: float(mean[i, j]) for j, k in enumerate(bits)} for i, n in enumerate(names)}
    log.info("KL sensitivity of %d layers x %d bit widths on %d inputs in %.1fs", len(names), len(bits), total, seconds)
    return new_table(SensitivityMethod.KL, qmodel, inputs, bits, values, {},
                     settings={"kl": cfg.to_dict(), "suffix_runs": runner is not None},
                     timings={"sensitivity": seconds}, infos=infos, model_name=model_name)
