"""Mixed precision, end to end: sensitivity table -> bit allocation -> per-layer ``QuantConfig``
overrides, and the bit plan as a JSON file that ``zsq quantize --bit-plan`` reads back.

The one call a pipeline needs::

    folded, _ = zsq.fold_batchnorm(model)
    mp = mixed_precision_plan(folded, calib_inputs, QuantConfig(abits=8, weight_estimator="mse"),
                              config=MixedPrecisionConfig(method="kl", target_size="4bit"))
    qmodel = zsq.quantize(folded, mp.quant_config)    # per-layer wbits from the plan
    mp.save(out_dir)   # bit_plan.json, sensitivity.json, sensitivity.png, pareto.png

A bit plan is ``{"format": "zsq-bit-plan", "version": 1, "weight_bits": {layer: bits, ...}, ...}``;
:func:`apply_bit_plan` turns it into exact-name overrides ``{layer: {"wbits": bits}}`` appended to a
config's own overrides, and :func:`plan_from_config` reads the per-layer bits of a config back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .allocate import (DEFAULT_MAX_BINS, Allocation, Budget, FrontierPoint, allocate, bops_budget, size_budget,
                       uniform_points)
from .config import WEIGHT_GRANULARITIES, LayerOverride, QuantConfig, check_bits
from .errors import ConfigError
from .sensitivity import DEFAULT_BITS, SensitivityMethod, SensitivityTable, check_bit_candidates
from .sensitivity.hessian import HessianConfig
from .sensitivity.kl import KLConfig

log = logging.getLogger(__name__)

PLAN_FORMAT = "zsq-bit-plan"
PLAN_VERSION = 1

__all__ = ["MixedPrecisionConfig", "BitPlan", "MixedPrecisionResult", "mixed_precision_plan", "load_bit_plan",
           "save_bit_plan", "bit_plan_overrides", "apply_bit_plan", "plan_from_config", "plan_from_allocation",
           "validate_plan"]


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """How to choose per-layer weight bits.

    ``method``: ``kl`` or ``hessian``; ``bits``: candidate widths; ``target_size``: ``"4bit"`` (the
    size of the uniform 4-bit model), ``"3.5bit"``, or a size in MB (``"0.2"``/``"0.2MB"``/float);
    ``bops``: a BOPs budget instead (``"w4a8"`` or ``"1.5G"``); ``groups``: lists of layer names that
    must share one width; ``kl``/``hessian``: the method's settings.

    ``select_min_bits``: the lowest candidate width is a hyper-parameter chosen on the calibration
    (distilled) data, never on evaluation data: for each ``m`` in ``bits`` the allocation restricted to
    widths ``>= m`` is quantized, calibrated and scored by the mean KL(FP32 || quantized model) on the
    calibration inputs; the best plan wins. (Very low widths such as 2 bits break the additivity that
    the allocation assumes; the validation catches plans that rely on it.) ``False``: use all ``bits``.
    """

    method: str = "kl"
    bits: tuple[int, ...] = DEFAULT_BITS
    target_size: str | float | None = "4bit"
    bops: str | None = None
    groups: tuple[tuple[str, ...], ...] = ()
    max_bins: int = DEFAULT_MAX_BINS
    kl: KLConfig = field(default_factory=KLConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    select_min_bits: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", SensitivityMethod.parse(self.method).value)
        object.__setattr__(self, "bits", check_bit_candidates(self.bits))
        if self.target_size is None and self.bops is None:
            raise ConfigError("mixed precision needs a budget: target_size (e.g. '4bit' or '0.2MB') or bops "
                              "(e.g. 'w4a8')")
        if self.target_size is not None and not isinstance(self.target_size, (str, int, float)):
            raise ConfigError(f"target_size must be a string like '4bit'/'0.2MB' or a number of MB, "
                              f"got {self.target_size!r}")
        groups = tuple(tuple(str(n) for n in g) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        if isinstance(self.max_bins, bool) or not isinstance(self.max_bins, int) or self.max_bins < 1:
            raise ConfigError(f"max_bins must be a positive integer, got {self.max_bins!r}")
        if isinstance(self.kl, Mapping):
            object.__setattr__(self, "kl", KLConfig.from_dict(dict(self.kl)))
        if isinstance(self.hessian, Mapping):
            object.__setattr__(self, "hessian", HessianConfig.from_dict(dict(self.hessian)))
        if not isinstance(self.select_min_bits, bool):
            raise ConfigError(f"select_min_bits must be True or False, got {self.select_min_bits!r}")
        if not isinstance(self.kl, KLConfig) or not isinstance(self.hessian, HessianConfig):
            raise ConfigError("kl / hessian settings must be KLConfig / HessianConfig (or dicts of their fields)")

    @property
    def method_config(self) -> KLConfig | HessianConfig:
        return self.kl if self.method == SensitivityMethod.KL.value else self.hessian

    def budget_for(self, table: SensitivityTable) -> Budget:
        if self.bops is not None:
            return bops_budget(table, self.bops)
        assert self.target_size is not None
        return size_budget(table, self.target_size)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "bits": list(self.bits), "target_size": self.target_size, "bops": self.bops,
                "groups": [list(g) for g in self.groups], "max_bins": self.max_bins, "kl": self.kl.to_dict(),
                "hessian": self.hessian.to_dict(), "select_min_bits": self.select_min_bits}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MixedPrecisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown MixedPrecisionConfig field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        d = dict(d)
        if "bits" in d:
            d["bits"] = tuple(d["bits"])
        if "groups" in d:
            d["groups"] = tuple(tuple(g) for g in d["groups"])
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# The bit plan
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BitPlan:
    """Per-layer weight bit widths (exact module names, data-flow order) plus where they came from."""

    weight_bits: Mapping[str, int]
    model: str | None = None
    method: str | None = None
    budget: Mapping[str, Any] | None = None
    sensitivity: float | None = None
    size_bytes: int | None = None
    average_bits: float | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # Optional per-layer weight granularity ("per_channel"/"per_tensor"), e.g. from zsq.hybrid.hybrid_plan.
    # Written to the JSON only when non-empty, so plans without it are unchanged.
    weight_granularity: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.weight_bits, Mapping) or not self.weight_bits:
            raise ConfigError("a bit plan needs at least one layer: {layer name: bits}")
        wb: dict[str, int] = {}
        for name, bits in self.weight_bits.items():
            if not isinstance(name, str) or not name or name.startswith(("re:", "@")):
                raise ConfigError(f"bit plan layer names must be exact module names, got {name!r}")
            wb[name] = check_bits(bits, f"bit plan entry {name!r}")
        object.__setattr__(self, "weight_bits", wb)
        object.__setattr__(self, "metadata", dict(self.metadata))
        if not isinstance(self.weight_granularity, Mapping):
            raise ConfigError("a bit plan's weight_granularity must map layer names to 'per_channel'/'per_tensor'")
        gr: dict[str, str] = {}
        for name, g in self.weight_granularity.items():
            if not isinstance(name, str) or not name or name.startswith(("re:", "@")):
                raise ConfigError(f"bit plan layer names must be exact module names, got {name!r}")
            if g not in WEIGHT_GRANULARITIES:
                raise ConfigError(f"bit plan weight_granularity of {name!r} is {g!r}; expected one of "
                                  f"{', '.join(WEIGHT_GRANULARITIES)}")
            gr[name] = g
        object.__setattr__(self, "weight_granularity", gr)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": self.model, "method": self.method,
                "budget": dict(self.budget) if self.budget is not None else None, "sensitivity": self.sensitivity,
                "size_bytes": self.size_bytes, "average_bits": self.average_bits, "weight_bits": dict(self.weight_bits),
                "metadata": dict(self.metadata),
                **({"weight_granularity": dict(self.weight_granularity)} if self.weight_granularity else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BitPlan":
        if "weight_bits" not in d:
            # A bare {layer: bits} mapping is accepted too.
            if d and all(isinstance(v, int) and not isinstance(v, bool) for v in d.values()):
                return cls(weight_bits=dict(d))
            raise ConfigError("not a zsq bit plan: expected {'format': 'zsq-bit-plan', 'weight_bits': {layer: bits}} "
                              "or a plain {layer: bits} mapping")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise ConfigError(f"not a zsq bit plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        if int(d.get("version", PLAN_VERSION)) > PLAN_VERSION:
            raise ConfigError(f"bit plan version {d.get('version')} is newer than this zsq supports ({PLAN_VERSION})")
        return cls(weight_bits=dict(d["weight_bits"]), model=d.get("model"), method=d.get("method"),
                   budget=d.get("budget"), sensitivity=d.get("sensitivity"), size_bytes=d.get("size_bytes"),
                   average_bits=d.get("average_bits"), metadata=d.get("metadata") or {},
                   weight_granularity=d.get("weight_granularity") or {})


def save_bit_plan(plan: BitPlan, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.to_dict(), indent=2))
    return path


def load_bit_plan(path: str | Path) -> BitPlan:
    """Read a bit plan JSON (written by ``zsq allocate``/``zsq quantize --mixed-precision``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bit plan {str(path)!r} does not exist; write one with `zsq allocate TABLE --out PLAN` "
                          "or `zsq quantize MODEL --mixed-precision --out DIR` (DIR/bit_plan.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"could not read bit plan {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"bit plan {str(path)!r} must hold a JSON object")
    return BitPlan.from_dict(data)


def bit_plan_overrides(plan: BitPlan | str | Path) -> dict[str, dict[str, int]]:
    """``{layer: {"wbits": bits}}`` — QuantConfig overrides for ``plan`` (a BitPlan or a JSON path)."""
    if not isinstance(plan, BitPlan):
        plan = load_bit_plan(plan)
    return {name: {"wbits": bits} for name, bits in plan.weight_bits.items()}


def apply_bit_plan(config: QuantConfig, plan: BitPlan | str | Path) -> QuantConfig:
    """``config`` with the plan's per-layer weight bits (and weight granularities, when the plan has them) as
    exact-name overrides (applied last, so they win over pattern overrides for ``wbits`` /
    ``weight_granularity``; an existing exact-name override keeps its other fields).
    Layer names are checked against the model when the config is used (``zsq.quantize`` raises
    :class:`~zsq.errors.ScopeError` for a name that is not a layer)."""
    if not isinstance(plan, BitPlan):
        plan = load_bit_plan(plan)
    overrides: dict[str, Any] = dict(config.overrides)
    for name, bits in plan.weight_bits.items():
        old = overrides.pop(name, None)
        if name in config.overrides and old is None:
            raise ConfigError(f"the bit plan gives layer {name!r} {bits} bits but the configuration keeps it in "
                              "float (override None); remove one of the two")
        overrides[name] = dataclasses.replace(old, wbits=bits) if isinstance(old, LayerOverride) else \
            LayerOverride(wbits=bits)
    for name, gran in plan.weight_granularity.items():  # hybrid per-tensor/per-channel plans
        old = overrides.pop(name, None)
        if name in config.overrides and old is None:
            raise ConfigError(f"the bit plan sets the weight granularity of layer {name!r} but the configuration "
                              "keeps it in float (override None); remove one of the two")
        overrides[name] = dataclasses.replace(old, weight_granularity=gran) if isinstance(old, LayerOverride) else \
            LayerOverride(weight_granularity=gran)
    for name in plan.weight_bits:
        for s in config.skip:
            if s == name:
                raise ConfigError(f"the bit plan gives layer {name!r} bits but --skip keeps it in float")
    return dataclasses.replace(config, overrides=overrides)


def plan_from_config(config: QuantConfig, network: nn.Module | None = None, **meta: Any) -> BitPlan:
    """The per-layer weight bits that ``config`` gives: resolved on ``network`` (the float, BN-folded
    model: every quantized layer) when it is given, else only the exact-name overrides that set
    ``wbits``. ``meta``: further :class:`BitPlan` fields (``model=`` name, ``method=`` ...)."""
    if network is not None:
        from .graph import trace
        from .quant.apply import resolve_layer_plans

        plans = resolve_layer_plans(trace(network), config)
        bits = {p.name: p.wbits for p in plans if p.wbits is not None}
    else:
        bits = {k: v.wbits for k, v in config.overrides.items()
                if v is not None and v.wbits is not None and not k.startswith(("re:", "@"))}
    return BitPlan(weight_bits=bits, **meta)


def plan_from_allocation(alloc: Allocation, table: SensitivityTable, *, model: str | None = None) -> BitPlan:
    return BitPlan(weight_bits=dict(alloc.bits), model=model or table.model, method=alloc.method,
                   budget=alloc.budget.to_dict(), sensitivity=alloc.sensitivity, size_bytes=alloc.size_bytes,
                   average_bits=round(alloc.average_bits, 4),
                   metadata={"candidate_bits": list(table.bits), "bops": alloc.bops, "exact_dp": alloc.exact,
                             "counts": {str(k): sum(1 for b in alloc.bits.values() if b == k)
                                        for k in sorted(set(alloc.bits.values()))}})


# ------------------------------------------------------------------------------------------------
# The pipeline step
# ------------------------------------------------------------------------------------------------


@dataclass
class MixedPrecisionResult:
    """What :func:`mixed_precision_plan` returns. ``quant_config`` is the input config plus the plan."""

    quant_config: QuantConfig
    plan: BitPlan
    table: SensitivityTable
    allocation: Allocation
    uniform: dict[int, FrontierPoint]
    config: MixedPrecisionConfig
    timings_s: dict[str, float] = field(default_factory=dict)
    selection: list[dict[str, Any]] = field(default_factory=list)  # candidate plans scored on calibration data

    def __iter__(self):  # (quant_config, plan, self) unpacking
        return iter((self.quant_config, self.plan, self))

    def to_dict(self) -> dict[str, Any]:
        """Summary for report.json (the plan, the budget, timings; not the whole frontier)."""
        return {"settings": self.config.to_dict(), "plan": self.plan.to_dict(),
                "allocation": self.allocation.to_dict(frontier=False),
                "frontier_points": len(self.allocation.frontier),
                "uniform": {str(k): {"size_bits": p.size_bits, "sensitivity": p.sensitivity}
                            for k, p in self.uniform.items()},
                "selection": self.selection,
                "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()}}

    def save(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write ``bit_plan.json``, ``sensitivity.json`` and (``plots``) ``sensitivity.png``, ``pareto.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"bit_plan": save_bit_plan(self.plan, out / "bit_plan.json"),
                 "sensitivity": self.table.save(out / "sensitivity.json")}
        if plots:
            from .plots import plot_pareto, plot_sensitivity

            paths["sensitivity_plot"] = plot_sensitivity(self.table, out / "sensitivity.png")
            paths["pareto_plot"] = plot_pareto(self.allocation, out / "pareto.png", uniform=self.uniform,
                                               title=f"{self.table.model or 'model'}: {self.table.method} sensitivity")
        return paths


def mixed_precision_plan(
    model: nn.Module,
    calib_inputs: torch.Tensor,
    quant_config: QuantConfig | None = None,
    *,
    config: MixedPrecisionConfig | None = None,
    method: str | None = None,
    bits: Sequence[int] | None = None,
    target_size: str | float | None = None,
    bops: str | None = None,
    model_name: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    table: SensitivityTable | None = None,
) -> MixedPrecisionResult:
    """Measure every layer's sensitivity on ``calib_inputs``, allocate weight bits under the budget,
    and return ``quant_config`` with the chosen bits as per-layer overrides.

    ``model`` is the float model, BN-folded (``zsq.fold_batchnorm``) or not (it is then folded); it is not
    modified. Layers that ``quant_config`` keeps in float stay in float; layers whose ``wbits`` an
    override sets explicitly (``@first=w8``) keep that width and count against the budget. The keyword
    arguments ``method``/``bits``/``target_size``/``bops`` replace the fields of ``config``. ``table``: a
    sensitivity table computed before for this model and ``quant_config`` (e.g. by ``zsq sensitivity``),
    used instead of measuring again; its widths must include ``bits``.
    """
    from .sensitivity import compute_sensitivity, prepare_model

    cfg = config or MixedPrecisionConfig()
    changes: dict[str, Any] = {}
    if method is not None:
        changes["method"] = method
    if bits is not None:
        changes["bits"] = tuple(bits)
    if target_size is not None:
        changes["target_size"] = target_size
    if bops is not None:
        changes["bops"] = bops
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    qcfg = quant_config or QuantConfig()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if table is None:
        qmodel = prepare_model(model, qcfg)
        if device is not None:
            qmodel.to(device)
        table = compute_sensitivity(qmodel, calib_inputs, method=cfg.method, bits=cfg.bits,
                                    config=cfg.method_config, device=device, progress=progress, model_name=model_name)
        timings["sensitivity"] = time.perf_counter() - t
    else:
        if not set(cfg.bits) <= set(table.bits):
            raise ConfigError(f"the sensitivity table has widths {list(table.bits)}; it cannot allocate "
                              f"{list(cfg.bits)}: compute it with --bits {','.join(map(str, cfg.bits))}")
        timings["sensitivity"] = float(table.timings_s.get("sensitivity", 0.0))
    t = time.perf_counter()
    budget = cfg.budget_for(table)
    subsets = [cfg.bits]
    if cfg.select_min_bits:
        subsets = [tuple(b for b in cfg.bits if b >= m) for m in cfg.bits]
    allocations: list[tuple[tuple[int, ...], Allocation]] = []
    for sub in subsets:
        try:
            allocations.append((sub, allocate(table, budget, groups=cfg.groups, max_bins=cfg.max_bins, bits=sub)))
        except ConfigError as exc:  # a high minimum width that cannot meet the budget
            if sub == subsets[0]:
                raise
            log.debug("candidate widths %s skipped: %s", sub, exc)
    timings["allocate"] = time.perf_counter() - t
    selection: list[dict[str, Any]] = []
    chosen_sub, alloc = allocations[0]
    if len(allocations) > 1:
        t = time.perf_counter()
        reference = _reference_logits(model, calib_inputs)
        best = None
        seen: dict[tuple, float] = {}
        for sub, a in allocations:
            key = tuple(a.bits.values())
            if key not in seen:
                seen[key] = validate_plan(model, calib_inputs, apply_bit_plan(qcfg, BitPlan(dict(a.bits))),
                                          reference=reference, device=device)
            score = seen[key]
            selection.append({"bits": list(sub), "min_bits": min(sub), "calibration_kl": score,
                              "sensitivity": a.sensitivity, "average_bits": round(a.average_bits, 4)})
            if best is None or score < best[0] - 1e-12:
                best = (score, sub, a)
        assert best is not None
        _, chosen_sub, alloc = best
        timings["validate"] = time.perf_counter() - t
        log.info("mixed precision: lowest width %d chosen on calibration data (KL %s)", min(chosen_sub),
                 ", ".join(f"{s['min_bits']}:{s['calibration_kl']:.4f}" for s in selection))
    plan = plan_from_allocation(alloc, table, model=model_name)
    plan.metadata["allocated_bits"] = list(chosen_sub)
    if selection:
        plan.metadata["selection"] = selection
    new_cfg = apply_bit_plan(qcfg, plan)
    log.info("mixed precision (%s, %s): %s; %.3f bits/weight, total sensitivity %.4g", cfg.method, budget.label,
             plan.metadata.get("counts"), alloc.average_bits, alloc.sensitivity)
    return MixedPrecisionResult(quant_config=new_cfg, plan=plan, table=table, allocation=alloc,
                                uniform=uniform_points(table), config=cfg, timings_s=timings, selection=selection)


VALIDATION_BATCH = 64


@torch.no_grad()
def _reference_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    from .sensitivity import as_logits, model_device
    from .state import eval_mode

    dev = model_device(model)  # the float model stays where it is; ``device`` is for the quantized copies
    outs = []
    with eval_mode(model):
        for i in range(0, inputs.shape[0], VALIDATION_BATCH):
            outs.append(as_logits(model(inputs[i: i + VALIDATION_BATCH].to(dev))).double().cpu())
    return torch.cat(outs)


@torch.no_grad()
def validate_plan(model: nn.Module, calib_inputs: torch.Tensor, quant_config: QuantConfig, *,
                  reference: torch.Tensor | None = None, device: str | torch.device | None = None) -> float:
    """Mean KL(FP32 || quantized) on ``calib_inputs`` of ``model`` quantized with ``quant_config`` and
    calibrated on the same inputs (weights *and* activations quantized: the deployable model)."""
    from .calibrate import calibrate
    from .sensitivity import as_logits, prepare_model
    from .metrics import kl_divergence

    if reference is None:
        reference = _reference_logits(model, calib_inputs)
    q = prepare_model(model, quant_config)
    if device is not None:
        q.to(device)
    calibrate(q, calib_inputs, device=device, progress=False)
    q.eval()
    total = 0.0
    dev = torch.device(device) if device is not None else None
    for i in range(0, calib_inputs.shape[0], VALIDATION_BATCH):
        x = calib_inputs[i: i + VALIDATION_BATCH]
        out = as_logits(q(x.to(dev) if dev is not None else x)).double().cpu()
        total += float(kl_divergence(reference[i: i + x.shape[0]], out).sum())
    return total / calib_inputs.shape[0]
