"""Bit allocation: choose one weight bit width per layer to minimise the total sensitivity
``sum_i Omega_i(k_i)`` subject to a budget ``sum_i cost_i(k_i) <= B``, where the cost is the layer's
weight storage (``params_i * k_i`` bits, rounded up to whole bytes as zsq.size counts it) or its
bit-operations (BOPs: ``MACs_i * k_i * abits_i``).

The solver is a dynamic programme over cost bins (a multiple-choice knapsack). It computes, for
every reachable total cost, the least total sensitivity, so one run gives the whole Pareto frontier
(size vs sensitivity), not only the point at the budget. Costs are exact integers divided by their
greatest common divisor when that leaves at most ``max_bins`` bins; otherwise each cost is rounded
*up* to a bin of width ``total / max_bins``, so every returned allocation still satisfies the budget
with its true cost (it may then miss the exact optimum by at most one bin per layer).

Layers can be *grouped* (all members get the same bit width, e.g. layers tied by a residual add) and
*pinned* (a fixed width, e.g. ``@first=w8`` in the quantization config).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import reduce
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .sensitivity import SensitivityTable, weight_cost_bits

BUDGET_KINDS = ("size", "bops")
DEFAULT_MAX_BINS = 20000
MB = 1_000_000  # zsq reports sizes in decimal megabytes


# ------------------------------------------------------------------------------------------------
# The generic solver
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPPoint:
    """One Pareto point of the generic solver: the option index chosen per item."""

    cost: float  # true (un-binned) total cost
    value: float  # total value (sensitivity)
    choice: tuple[int, ...]


@dataclass
class DPResult:
    frontier: list[DPPoint]  # by increasing cost, strictly decreasing value
    best: DPPoint | None  # least value with cost <= budget (None without a budget)
    bin_width: float
    exact: bool  # True when costs were not rounded (the optimum is exact)


def _as_int_costs(costs: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    out = []
    for c in costs:
        r = np.rint(c)
        if not np.allclose(r, c, rtol=0, atol=1e-9):
            return None
        out.append(r.astype(np.int64))
    return out


def solve_dp(
    costs: Sequence[Sequence[float]],
    values: Sequence[Sequence[float]],
    *,
    budget: float | None = None,
    max_bins: int = DEFAULT_MAX_BINS,
) -> DPResult:
    """Minimise ``sum_j values[j][o_j]`` s.t. ``sum_j costs[j][o_j] <= budget`` (one option per item).

    Returns the whole Pareto frontier over total cost and the best point under ``budget``.
    Raises :class:`ConfigError` when even the cheapest choice exceeds the budget.
    """
    if not costs or len(costs) != len(values):
        raise ConfigError("the allocation needs at least one item, with one value per cost")
    if isinstance(max_bins, bool) or not isinstance(max_bins, int) or max_bins < 1:
        raise ConfigError(f"max_bins must be a positive integer, got {max_bins!r}")
    c = [np.asarray(x, dtype=np.float64) for x in costs]
    v = [np.asarray(x, dtype=np.float64) for x in values]
    for j, (cj, vj) in enumerate(zip(c, v)):
        if cj.ndim != 1 or cj.shape != vj.shape or cj.size == 0:
            raise ConfigError(f"item {j}: costs and values must be non-empty 1-D sequences of the same length")
        if (cj < 0).any() or not np.isfinite(cj).all() or not np.isfinite(vj).all():
            raise ConfigError(f"item {j}: costs must be finite and >= 0, values finite")
    min_total = float(sum(cj.min() for cj in c))
    if budget is not None and min_total > budget * (1 + 1e-12):
        raise ConfigError(f"the budget {budget:.6g} is below the smallest possible total cost {min_total:.6g} "
                          "(every layer at its lowest candidate bit width); raise the target or add lower bit widths")
    # Shift by the per-item minimum: bins then only span the part of the cost that choices change.
    base = [cj.min() for cj in c]
    extra = [cj - bj for cj, bj in zip(c, base)]
    ints = _as_int_costs(extra)
    exact = False
    span = float(sum(e.max() for e in extra))
    if ints is not None:
        g = reduce(math.gcd, [int(x) for e in ints for x in e if x > 0], 0)
        if g == 0:
            g = 1
        if span / g <= max_bins:
            width = float(g)
            binned = [e // g for e in ints]
            exact = True
    if not exact:
        width = max(span / max_bins, 1e-300)
        # ceil, with a little slack against float noise: never under-count a cost.
        binned = [np.ceil(e / width - 1e-9).astype(np.int64) for e in extra]
    total_bins = int(sum(int(b.max()) for b in binned))
    inf = np.inf
    f = np.full(total_bins + 1, inf)
    f[0] = 0.0
    reach = 0
    choices = np.full((len(binned), total_bins + 1), -1, dtype=np.int16)
    for j, (bj, vj) in enumerate(zip(binned, v)):
        new_reach = reach + int(bj.max())
        g = np.full(total_bins + 1, inf)
        ch = choices[j]
        for o in range(bj.size):
            s = int(bj[o])
            cand = f[: reach + 1] + vj[o]
            seg = g[s: s + reach + 1]
            better = cand < seg
            seg[better] = cand[better]
            ch[s: s + reach + 1][better] = o
        f, reach = g, new_reach

    def backtrack(b: int) -> tuple[int, ...]:
        picks = []
        for j in range(len(binned) - 1, -1, -1):
            o = int(choices[j, b])
            picks.append(o)
            b -= int(binned[j][o])
        return tuple(reversed(picks))

    # Pareto points in bin space (each strictly better than every cheaper bin), then re-checked
    # with their true costs.
    pts = []
    best_val = inf
    for b in np.flatnonzero(np.isfinite(f)):
        improves = not np.isfinite(best_val) or f[b] < best_val - 1e-12 * abs(best_val)
        if improves:
            best_val = f[b]
            ch = backtrack(int(b))
            cost = float(sum(cj[o] for cj, o in zip(c, ch)))
            val = float(sum(vj[o] for vj, o in zip(v, ch)))
            pts.append(DPPoint(cost, val, ch))
    pts.sort(key=lambda p: (p.cost, p.value))
    frontier: list[DPPoint] = []
    for p in pts:
        if not frontier or p.value < frontier[-1].value:
            frontier.append(p)
    best = None
    if budget is not None:
        feasible = [p for p in frontier if p.cost <= budget * (1 + 1e-12)]
        if not feasible:  # pragma: no cover - the cheapest point always fits (checked above)
            raise ConfigError("no allocation fits the budget")
        best = min(feasible, key=lambda p: (p.value, p.cost))
    return DPResult(frontier=frontier, best=best, bin_width=width, exact=exact)


# ------------------------------------------------------------------------------------------------
# Budgets
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A constraint on the allocation: total weight bits (``size``) or bit-operations (``bops``)."""

    kind: str
    value: float
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(f"budget kind {self.kind!r} is not one of {', '.join(BUDGET_KINDS)}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ConfigError(f"budget value must be a positive number, got {self.value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "label": self.label}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Budget":
        return cls(kind=str(d["kind"]), value=float(d["value"]), label=str(d.get("label", "")))


_AVG_BITS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:bit|bits|b)\s*$", re.I)
_MB_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:mb)?\s*$", re.I)
_BOPS_REL_RE = re.compile(r"^\s*w(\d+(?:\.\d+)?)(?:a(\d+))?\s*$", re.I)
_BOPS_ABS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgt]?)\s*(?:bops)?\s*$", re.I)
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def layer_cost(table: SensitivityTable, name: str, bits: int, kind: str) -> float:
    info = table.layer(name)
    if kind == "size":
        return float(weight_cost_bits(info.params, bits))
    abits = info.abits if info.abits is not None else 32
    return float(info.macs) * bits * abits


def size_budget(table: SensitivityTable, target: str | float) -> Budget:
    """``"4bit"`` (average bits per weight: the size of the uniform model) or a size in MB
    (``"1.2"``, ``"1.2MB"``, or a float) -> a weight-bit :class:`Budget`."""
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        text = f"{target}MB"
    else:
        text = str(target)
    m = _AVG_BITS_RE.match(text)
    if m:
        avg = float(m.group(1))
        if not 1.0 <= avg <= 32.0:
            raise ConfigError(f"--target-size {text!r}: an average bit width must be between 1 and 32")
        if avg.is_integer():
            bits = sum(weight_cost_bits(l.params, l.fixed_bits or int(avg)) for l in table.layers)
        else:
            fixed = sum(weight_cost_bits(l.params, l.fixed_bits) for l in table.layers if l.fixed_bits)
            bits = fixed + math.floor(sum(l.params for l in table.layers if not l.fixed_bits) * avg)
        return Budget("size", float(bits), label=f"{avg:g}bit")
    m = _MB_RE.match(text)
    if m:
        mb = float(m.group(1))
        bits = (mb * MB - table.size_overhead_bytes) * 8
        if bits <= 0:
            raise ConfigError(f"--target-size {text!r}: the model needs {table.size_overhead_bytes / MB:.3f} MB "
                              "besides its quantized weights (scales, biases, float layers); give a larger size")
        return Budget("size", float(math.floor(bits)), label=f"{mb:g}MB")
    raise ConfigError(f"--target-size {text!r}: expected an average bit width such as 4bit or 3.5bit, or a size "
                      "in MB such as 0.15 or 0.15MB")


def bops_budget(table: SensitivityTable, target: str | float) -> Budget:
    """``"w4a8"`` (the BOPs of uniform 4-bit weights, 8-bit activations; ``"w4"`` keeps each layer's own
    activation bits) or an absolute count (``"12.5G"``, ``"3e9"``) -> a BOPs :class:`Budget`."""
    text = str(target)
    if any(l.macs <= 0 for l in table.layers):
        raise ConfigError("this sensitivity table has no MAC counts; recompute it with this zsq version")
    m = _BOPS_REL_RE.match(text)
    if m:
        w = float(m.group(1))
        a = int(m.group(2)) if m.group(2) else None
        total = 0.0
        for l in table.layers:
            ab = a if a is not None else (l.abits if l.abits is not None else 32)
            total += l.macs * (l.fixed_bits or w) * ab
        return Budget("bops", total, label=text.lower())
    m = _BOPS_ABS_RE.match(text)
    if m:
        val = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
        return Budget("bops", val, label=text)
    raise ConfigError(f"--bops {text!r}: expected w<BITS>[a<BITS>] such as w4a8, or a number of bit-operations "
                      "such as 12.5G")


# ------------------------------------------------------------------------------------------------
# Allocation over a sensitivity table
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontierPoint:
    size_bits: int  # total weight storage of the allocated layers (bits)
    bops: float
    sensitivity: float
    bits: tuple[int, ...]  # per layer, in table order

    def to_dict(self) -> dict[str, Any]:
        return {"size_bits": self.size_bits, "bops": self.bops, "sensitivity": self.sensitivity,
                "bits": list(self.bits)}


@dataclass
class Allocation:
    """The chosen bit width per layer, the budget it meets, and the frontier it was picked from."""

    bits: dict[str, int]
    budget: Budget
    sensitivity: float
    size_bits: int
    bops: float
    frontier: list[FrontierPoint]
    exact: bool
    method: str = ""
    size_overhead_bytes: int = 0
    total_params: int = 0

    @property
    def size_bytes(self) -> int:
        """Estimated bytes of the whole quantized model (weights + overhead)."""
        return int(self.size_overhead_bytes + self.size_bits // 8)

    @property
    def average_bits(self) -> float:
        """Weight bits per weight element (the ``4`` of "4bit")."""
        return float(self.size_bits) / max(1, self.total_params)

    def to_dict(self, *, frontier: bool = True) -> dict[str, Any]:
        d = {"method": self.method, "budget": self.budget.to_dict(), "sensitivity": self.sensitivity,
             "size_bits": self.size_bits, "size_bytes": self.size_bytes, "average_bits": self.average_bits,
             "bops": self.bops, "exact": self.exact, "bits": dict(self.bits)}
        if frontier:
            d["frontier"] = [{"size_bits": p.size_bits, "bops": p.bops, "sensitivity": p.sensitivity}
                             for p in self.frontier]
        return d


def _items(table: SensitivityTable, groups: Sequence[Sequence[str]], fixed: Mapping[str, int],
           bits: Sequence[int] | None = None):
    """Group layers into DP items; each item's options are the bit widths all members allow
    (``bits``, default the table's, or the pinned width)."""
    widths = set(table.bits) if bits is None else set(bits)
    if bits is not None and not widths <= set(table.bits):
        raise ConfigError(f"candidate bits {sorted(widths)} are not all in the sensitivity table's {list(table.bits)}")
    if not widths:
        raise ConfigError("no candidate bit width left to allocate")
    names = table.names
    known = set(names)
    member_of: dict[str, int] = {}
    items: list[list[str]] = []
    for g in groups:
        g = list(g)
        for n in g:
            if n not in known:
                raise ConfigError(f"group member {n!r} is not a layer of the sensitivity table")
            if n in member_of:
                raise ConfigError(f"layer {n!r} is in more than one group")
        if not g:
            continue
        for n in g:
            member_of[n] = len(items)
        items.append(g)
    for n in names:
        if n not in member_of:
            member_of[n] = len(items)
            items.append([n])
    for n in fixed:
        if n not in known:
            raise ConfigError(f"fixed layer {n!r} is not a layer of the sensitivity table")
    options: list[list[int]] = []
    for members in items:
        allowed: set[int] | None = None
        for n in members:
            pin = fixed.get(n, table.layer(n).fixed_bits)
            s = {pin} if pin is not None else widths
            allowed = s if allowed is None else allowed & s
        if not allowed:
            raise ConfigError(f"layers {members} are grouped but pinned to different bit widths")
        options.append(sorted(allowed))
    return items, options


def _costs(table: SensitivityTable, bits: Sequence[int]) -> tuple[dict, dict]:
    """``size[name][k]`` (weight bits) and ``bops[name][k]`` for every layer and width in ``bits``."""
    size, bops = {}, {}
    for l in table.layers:
        ab = l.abits if l.abits is not None else 32
        size[l.name] = {k: float(weight_cost_bits(l.params, k)) for k in bits}
        bops[l.name] = {k: float(l.macs) * k * ab for k in bits}
    return size, bops


def _all_widths(table: SensitivityTable, fixed: Mapping[str, int]) -> list[int]:
    return sorted(set(table.bits) | set(fixed.values()) | {l.fixed_bits for l in table.layers if l.fixed_bits})


def total_sensitivity(table: SensitivityTable, bits: Mapping[str, int]) -> float:
    """``sum_i Omega_i(bits_i)`` (a width outside the table, i.e. a pinned one, counts 0)."""
    total = 0.0
    for n in table.names:
        row = table.values[n]
        total += float(row.get(bits[n], 0.0))
    return total


def allocation_cost(table: SensitivityTable, bits: Mapping[str, int], kind: str = "size") -> float:
    return float(sum(layer_cost(table, n, bits[n], kind) for n in table.names))


def _make_allocation(table: SensitivityTable, bits: Mapping[str, int], budget: Budget, *, sensitivity: float,
                     frontier: list[FrontierPoint], exact: bool, method: str) -> Allocation:
    ordered = {n: int(bits[n]) for n in table.names}
    return Allocation(bits=ordered, budget=budget, sensitivity=sensitivity,
                      size_bits=int(allocation_cost(table, ordered, "size")),
                      bops=allocation_cost(table, ordered, "bops"), frontier=frontier, exact=exact, method=method,
                      size_overhead_bytes=table.size_overhead_bytes, total_params=table.total_params())


def allocate(
    table: SensitivityTable,
    budget: Budget,
    *,
    groups: Sequence[Sequence[str]] = (),
    fixed: Mapping[str, int] | None = None,
    max_bins: int = DEFAULT_MAX_BINS,
    values: Mapping[str, Mapping[int, float]] | None = None,
    bits: Sequence[int] | None = None,
) -> Allocation:
    """Least-sensitivity bit widths under ``budget`` and the whole size/sensitivity Pareto frontier.

    ``groups``: lists of layer names that must share one bit width. ``fixed``: ``{layer: bits}``
    pinned (in addition to the table's own pinned layers). ``values`` replaces the table's
    sensitivities (e.g. random ones for a baseline); the reported sensitivity is the table's.
    ``bits`` restricts the candidate widths to a subset of the table's.
    """
    fixed = dict(fixed or {})
    items, options = _items(table, groups, fixed, bits)
    vals = values if values is not None else table.values
    size, bops = _costs(table, _all_widths(table, fixed))
    kind_cost = size if budget.kind == "size" else bops

    def val(n: str, k: int) -> float:
        return float(vals[n].get(k, 0.0))

    costs = [[sum(kind_cost[n][k] for n in members) for k in opts] for members, opts in zip(items, options)]
    value = [[sum(val(n, k) for n in members) for k in opts] for members, opts in zip(items, options)]
    res = solve_dp(costs, value, budget=budget.value, max_bins=max_bins)
    names = table.names
    pos = {n: i for i, n in enumerate(names)}

    def expand(choice: Sequence[int]) -> tuple[int, ...]:
        out = [0] * len(names)
        for members, opts, o in zip(items, options, choice):
            for n in members:
                out[pos[n]] = opts[o]
        return tuple(out)

    frontier = []
    for p in res.frontier:
        b = expand(p.choice)
        frontier.append(FrontierPoint(size_bits=int(sum(size[n][k] for n, k in zip(names, b))),
                                      bops=float(sum(bops[n][k] for n, k in zip(names, b))),
                                      sensitivity=p.value, bits=b))
    assert res.best is not None
    chosen = dict(zip(names, expand(res.best.choice)))
    return _make_allocation(table, chosen, budget, sensitivity=total_sensitivity(table, chosen), frontier=frontier,
                            exact=res.exact, method=table.method)


def uniform_points(table: SensitivityTable) -> dict[int, FrontierPoint]:
    """The uniform-precision allocations (every layer at ``k`` bits, pinned layers kept)."""
    out = {}
    for k in table.bits:
        bits = {l.name: (l.fixed_bits or k) for l in table.layers}
        out[k] = FrontierPoint(size_bits=int(allocation_cost(table, bits, "size")),
                               bops=allocation_cost(table, bits, "bops"),
                               sensitivity=total_sensitivity(table, bits), bits=tuple(bits[n] for n in table.names))
    return out


def random_allocation(
    table: SensitivityTable,
    budget: Budget,
    *,
    seed: int = 0,
    groups: Sequence[Sequence[str]] = (),
    fixed: Mapping[str, int] | None = None,
    bits: Sequence[int] | None = None,
) -> Allocation:
    """A random feasible allocation that uses the budget as fully as a random order allows (baseline).

    Draws a random width per item, lowers random items until the budget holds, then raises items in
    random order to the largest width that still fits.
    """
    rng = random.Random(seed)
    fixed = dict(fixed or {})
    items, options = _items(table, groups, fixed, bits)
    size, bops = _costs(table, _all_widths(table, fixed))
    kind_cost = size if budget.kind == "size" else bops
    cost = [[sum(kind_cost[n][k] for n in members) for k in opts] for members, opts in zip(items, options)]
    if sum(c[0] for c in cost) > budget.value:
        raise ConfigError(f"the budget {budget.value:.6g} is below the smallest possible total cost")
    pick = [rng.randrange(len(o)) for o in options]
    total = sum(c[p] for c, p in zip(cost, pick))
    while total > budget.value:
        j = rng.choice([j for j, p in enumerate(pick) if p > 0])
        total -= cost[j][pick[j]] - cost[j][pick[j] - 1]
        pick[j] -= 1
    order = list(range(len(items)))
    rng.shuffle(order)
    for j in order:
        for o in range(len(options[j]) - 1, pick[j], -1):
            if total - cost[j][pick[j]] + cost[j][o] <= budget.value:
                total += cost[j][o] - cost[j][pick[j]]
                pick[j] = o
                break
    bits = {n: opts[p] for members, opts, p in zip(items, options, pick) for n in members}
    return _make_allocation(table, bits, budget, sensitivity=total_sensitivity(table, bits), frontier=[],
                            exact=False, method="random")
