"""Bit allocation: the DP is exact (brute force), budgets always hold, frontier, groups, pins, BOPs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from zsq.allocate import (Budget, allocate, allocation_cost, bops_budget, random_allocation, size_budget, solve_dp,
                          total_sensitivity, uniform_points)
from zsq.errors import ConfigError
from zsq.sensitivity import LayerInfo, SensitivityTable, weight_cost_bits


def brute_force(costs, values, budget):
    best = None
    for ch in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[o] for c, o in zip(costs, ch))
        if cost <= budget + 1e-9:
            val = sum(v[o] for v, o in zip(values, ch))
            if best is None or val < best[0] - 1e-12:
                best = (val, cost, ch)
    return best


def random_instance(rng, *, integer=True):
    n = int(rng.integers(1, 6))
    k = int(rng.integers(1, 4))
    if integer:
        costs = [sorted(rng.integers(0, 15, size=k).tolist()) for _ in range(n)]
    else:
        costs = [sorted((rng.random(k) * 1000).tolist()) for _ in range(n)]
    # More bits -> less sensitivity is typical but not required by the solver: use arbitrary values.
    values = [rng.random(k).tolist() for _ in range(n)]
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    budget = lo + rng.random() * (hi - lo)
    return costs, values, budget


def test_dp_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(300):
        costs, values, budget = random_instance(rng)
        res = solve_dp(costs, values, budget=budget)
        bf = brute_force(costs, values, budget)
        assert res.exact
        assert res.best.value == pytest.approx(bf[0], abs=1e-9)
        assert res.best.cost <= budget + 1e-9


def test_binned_dp_always_meets_the_budget_and_is_close():
    rng = np.random.default_rng(1)
    for _ in range(200):
        costs, values, budget = random_instance(rng, integer=False)
        res = solve_dp(costs, values, budget=budget, max_bins=int(rng.integers(3, 50)))
        bf = brute_force(costs, values, budget)
        assert res.best.cost <= budget * (1 + 1e-12)
        assert res.best.value >= bf[0] - 1e-9  # never better than the true optimum
        fine = solve_dp(costs, values, budget=budget, max_bins=200000)
        assert fine.best.value == pytest.approx(bf[0], abs=1e-6) or fine.best.value >= bf[0] - 1e-9


def test_frontier_is_monotone_and_every_point_optimal():
    rng = np.random.default_rng(2)
    for _ in range(60):
        costs, values, _ = random_instance(rng)
        res = solve_dp(costs, values)
        assert res.best is None
        fr = res.frontier
        for a, b in zip(fr, fr[1:]):
            assert a.cost < b.cost and a.value > b.value
        for p in fr:  # each point is the optimum for its own cost as budget
            assert p.value == pytest.approx(brute_force(costs, values, p.cost)[0], abs=1e-9)
        # the cheapest and the best overall are on it
        assert fr[0].cost == pytest.approx(sum(min(c) for c in costs))
        assert fr[-1].value == pytest.approx(brute_force(costs, values, math.inf)[0], abs=1e-9)


def test_dp_rejects_impossible_budget_and_bad_input():
    with pytest.raises(ConfigError, match="below the smallest"):
        solve_dp([[5, 10]], [[1.0, 0.5]], budget=4)
    with pytest.raises(ConfigError):
        solve_dp([[1, 2]], [[1.0]], budget=4)
    with pytest.raises(ConfigError):
        solve_dp([[-1, 2]], [[1.0, 0.0]], budget=4)
    with pytest.raises(ConfigError):
        solve_dp([], [], budget=4)


# ------------------------------------------------------------------------------------------------
# On sensitivity tables
# ------------------------------------------------------------------------------------------------


def make_table(n=6, bits=(2, 4, 8), seed=0, fixed=None):
    rng = np.random.default_rng(seed)
    layers, values = [], {}
    for i in range(n):
        name = f"layer{i}"
        params = int(rng.integers(1, 50)) * 8
        layers.append(LayerInfo(name=name, kind="Conv2d", params=params, macs=params * int(rng.integers(1, 64)),
                                abits=8, wbits=4, fixed_bits=(fixed or {}).get(name)))
        base = float(rng.random() * 10)
        values[name] = {k: base * 4.0 ** (-k) * (1 + 0.1 * rng.random()) for k in bits}
    return SensitivityTable(method="kl", bits=bits, layers=layers, values=values, size_overhead_bytes=1000)


def test_allocate_four_bit_target_fits_uniform_size_and_beats_uniform():
    for seed in range(20):
        t = make_table(seed=seed)
        b = size_budget(t, "4bit")
        assert b.value == t.uniform_weight_bits(4)
        a = allocate(t, b)
        assert a.size_bits <= b.value
        assert a.sensitivity <= uniform_points(t)[4].sensitivity + 1e-12
        assert a.sensitivity == pytest.approx(total_sensitivity(t, a.bits))
        assert list(a.bits) == t.names
        # brute force over the table
        best = min(total_sensitivity(t, dict(zip(t.names, ch)))
                   for ch in itertools.product(t.bits, repeat=len(t.names))
                   if allocation_cost(t, dict(zip(t.names, ch))) <= b.value)
        assert a.sensitivity == pytest.approx(best)


def test_size_budget_parsing():
    t = make_table()
    assert size_budget(t, "8bit").value == t.uniform_weight_bits(8)
    assert size_budget(t, "3.5bit").value == math.floor(t.total_params() * 3.5)
    b = size_budget(t, "0.0015MB")
    assert b.value == (0.0015e6 - 1000) * 8
    assert size_budget(t, 0.0015).value == b.value
    for bad in ("four", "4 bytes", "0bit", ""):
        with pytest.raises(ConfigError):
            size_budget(t, bad)
    with pytest.raises(ConfigError, match="besides"):
        size_budget(t, "0.0001MB")


def test_budget_below_minimum_is_a_clear_error():
    t = make_table()
    with pytest.raises(ConfigError, match="below the smallest"):
        allocate(t, Budget("size", 10.0))


def test_groups_share_bits_and_fixed_layers_are_kept():
    t = make_table(n=5, seed=3, fixed={"layer0": 8})
    b = size_budget(t, "4bit")
    a = allocate(t, b, groups=[("layer1", "layer2")], fixed={"layer4": 2})
    assert a.bits["layer0"] == 8 and a.bits["layer4"] == 2
    assert a.bits["layer1"] == a.bits["layer2"]
    assert a.size_bits <= b.value
    with pytest.raises(ConfigError, match="pinned to different"):
        allocate(t, b, groups=[("layer0", "layer4")], fixed={"layer4": 2})
    with pytest.raises(ConfigError, match="not a layer"):
        allocate(t, b, groups=[("nope",)])


def test_bops_budget():
    t = make_table(seed=4)
    b = bops_budget(t, "w4a8")
    assert b.value == pytest.approx(sum(l.macs * 4 * 8 for l in t.layers))
    a = allocate(t, b)
    assert a.bops <= b.value * (1 + 1e-12)
    assert bops_budget(t, "1.5G").value == 1.5e9
    with pytest.raises(ConfigError):
        bops_budget(t, "lots")


def test_random_allocation_is_feasible_and_seeded():
    t = make_table(n=12, seed=5)
    b = size_budget(t, "4bit")
    a1 = random_allocation(t, b, seed=1)
    a2 = random_allocation(t, b, seed=1)
    assert a1.bits == a2.bits
    assert a1.size_bits <= b.value
    assert a1.sensitivity >= allocate(t, b).sensitivity - 1e-12


def test_large_costs_use_bins_and_stay_feasible():
    # Real-model-like sizes: millions of weight bits -> binned DP.
    rng = np.random.default_rng(6)
    layers, values = [], {}
    for i in range(40):
        p = int(rng.integers(100, 200000))
        layers.append(LayerInfo(name=f"l{i}", kind="Conv2d", params=p, macs=p * 50, abits=8, wbits=4))
        values[f"l{i}"] = {k: float(rng.random()) * 2.0 ** (-k) for k in (2, 3, 4, 6, 8)}
    t = SensitivityTable(method="hessian", bits=(2, 3, 4, 6, 8), layers=layers, values=values)
    b = size_budget(t, "4bit")
    a = allocate(t, b, max_bins=2000)
    assert a.size_bits <= b.value
    assert len(a.frontier) > 10
    fine = allocate(t, b, max_bins=50000)
    assert fine.sensitivity <= a.sensitivity + 1e-12
    assert sum(weight_cost_bits(l.params, fine.bits[l.name]) for l in layers) == fine.size_bits
