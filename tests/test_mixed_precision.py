"""Bit plans (JSON round trip, QuantConfig overrides and back), the mixed_precision_plan pipeline
step, and the plots."""

from __future__ import annotations

import json

import pytest
import torch

import zsq
from zsq.allocate import size_budget
from zsq.config import QuantConfig
from zsq.errors import ConfigError, ScopeError
from zsq.mixed_precision import (BitPlan, MixedPrecisionConfig, apply_bit_plan, bit_plan_overrides, load_bit_plan,
                                 mixed_precision_plan, plan_from_config, save_bit_plan)
from zsq.quant.modules import QUANT_LAYER_TYPES
from zsq.size import quantized_size_bytes

from conftest import make_tiny_model

LAYERS = ["conv1", "conv2", "conv3", "conv4", "fc"]


@pytest.fixture
def folded(seed):
    f, _ = zsq.fold_batchnorm(make_tiny_model())
    return f


@pytest.fixture
def calib():
    return torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(11))


def wbits_of(qmodel):
    return {n: m.weight_quantizer.bits for n, m in qmodel.named_modules()
            if isinstance(m, QUANT_LAYER_TYPES) and m.weight_quantizer is not None}


def test_bit_plan_json_round_trip(tmp_path):
    plan = BitPlan(weight_bits={"conv1": 8, "conv2": 2, "fc": 4}, model="tiny_cnn", method="kl",
                   budget={"kind": "size", "value": 123.0, "label": "4bit"}, sensitivity=0.5, size_bytes=99,
                   average_bits=3.9, metadata={"candidate_bits": [2, 4, 8]})
    path = save_bit_plan(plan, tmp_path / "sub" / "plan.json")
    again = load_bit_plan(path)
    assert again == plan
    assert list(again.weight_bits) == ["conv1", "conv2", "fc"]  # order kept
    assert json.loads(path.read_text())["format"] == "zsq-bit-plan"
    (tmp_path / "flat.json").write_text(json.dumps({"conv1": 8, "fc": 4}))
    assert load_bit_plan(tmp_path / "flat.json").weight_bits == {"conv1": 8, "fc": 4}
    assert bit_plan_overrides(path) == {"conv1": {"wbits": 8}, "conv2": {"wbits": 2}, "fc": {"wbits": 4}}


def test_bad_bit_plans_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        BitPlan(weight_bits={"conv1": 9})
    with pytest.raises(ConfigError):
        BitPlan(weight_bits={"re:conv.*": 4})
    with pytest.raises(ConfigError):
        BitPlan(weight_bits={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_bit_plan(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not read"):
        load_bit_plan(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"format": "other", "weight_bits": {"a": 4}}))
    with pytest.raises(ConfigError, match="not a zsq bit plan"):
        load_bit_plan(tmp_path / "y.json")


def test_apply_bit_plan_and_back(folded):
    base = QuantConfig(wbits=4, abits=8, overrides={"@last": {"abits": 6}, "conv2": {"weight_granularity": "per_tensor"}})
    plan = BitPlan(weight_bits={"conv1": 8, "conv2": 2, "conv3": 4, "conv4": 3, "fc": 6})
    cfg = apply_bit_plan(base, plan)
    assert cfg.overrides["conv2"].weight_granularity == "per_tensor" and cfg.overrides["conv2"].wbits == 2
    q = zsq.quantize(folded, cfg)
    assert wbits_of(q) == dict(plan.weight_bits)
    assert {p.name: p.abits for p in q.zsq_report.layers}["fc"] == 6  # other override fields survive
    back = plan_from_config(cfg, folded)
    assert back.weight_bits == plan.weight_bits
    assert plan_from_config(cfg).weight_bits == plan.weight_bits  # exact names suffice here
    # the config round-trips through JSON with the plan in it
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_apply_bit_plan_conflicts_and_unknown_layers(folded):
    with pytest.raises(ConfigError, match="float"):
        apply_bit_plan(QuantConfig(overrides={"conv1": None}), BitPlan(weight_bits={"conv1": 4}))
    with pytest.raises(ConfigError, match="skip"):
        apply_bit_plan(QuantConfig(skip=("conv1",)), BitPlan(weight_bits={"conv1": 4}))
    cfg = apply_bit_plan(QuantConfig(), BitPlan(weight_bits={"no_such_layer": 4}))
    with pytest.raises(ScopeError, match="no_such_layer"):
        zsq.quantize(folded, cfg)


def test_mixed_precision_config_validation_and_json():
    cfg = MixedPrecisionConfig(method="hessian", bits=(8, 2, 4), target_size="0.5MB", groups=[["a", "b"]],
                               hessian={"statistic": "eigenvalue"})
    assert cfg.bits == (2, 4, 8) and cfg.hessian.statistic == "eigenvalue" and cfg.groups == (("a", "b"),)
    assert MixedPrecisionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError):
        MixedPrecisionConfig(method="magic")
    with pytest.raises(ConfigError):
        MixedPrecisionConfig(target_size=None, bops=None)
    with pytest.raises(ConfigError):
        MixedPrecisionConfig(bits=(1,))
    with pytest.raises(ConfigError):
        MixedPrecisionConfig.from_dict({"methd": "kl"})


@pytest.mark.parametrize("method", ["kl", "hessian"])
def test_mixed_precision_plan_meets_the_size_of_uniform_4bit(folded, calib, method, tmp_path):
    base = QuantConfig(wbits=8, abits=8, weight_estimator="mse", overrides={"@first": {"wbits": 8}})
    mp_cfg = MixedPrecisionConfig(method=method, bits=(2, 4, 8), target_size="4bit",
                                  hessian={"max_iterations": 3, "batch_size": 16})
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    res = mixed_precision_plan(folded, calib, base, config=mp_cfg, model_name="tiny_cnn", progress=False)
    assert all(torch.equal(before[k], v) for k, v in folded.state_dict().items())  # input untouched
    quant_cfg, plan, _ = res
    assert plan.weight_bits["conv1"] == 8  # pinned by @first
    assert set(plan.weight_bits) == set(LAYERS)
    q = zsq.quantize(folded, quant_cfg)
    assert wbits_of(q) == dict(plan.weight_bits)
    uniform4 = zsq.quantize(folded, QuantConfig(wbits=4, abits=8, weight_estimator="mse",
                                                overrides={"@first": {"wbits": 8}}))
    assert quantized_size_bytes(q) <= quantized_size_bytes(uniform4)
    assert res.allocation.size_bytes == quantized_size_bytes(q)  # the size model is zsq.size's
    assert res.allocation.sensitivity <= res.uniform[4].sensitivity + 1e-12
    paths = res.save(tmp_path)
    for key in ("bit_plan", "sensitivity", "sensitivity_plot", "pareto_plot"):
        assert paths[key].exists() and paths[key].stat().st_size > 200
    assert load_bit_plan(paths["bit_plan"]) == plan
    summary = json.loads(json.dumps(res.to_dict()))
    assert summary["plan"]["weight_bits"] == dict(plan.weight_bits)
    assert set(summary["timings_s"]) == {"sensitivity", "allocate", "validate"}
    # the lowest width was chosen on the calibration data: one scored candidate per minimum width
    assert [s["min_bits"] for s in res.selection] == [2, 4]  # 8 bits everywhere cannot fit 4 bits/weight
    best = min(res.selection, key=lambda s: s["calibration_kl"])
    assert plan.metadata["allocated_bits"] == best["bits"]
    assert all(s["calibration_kl"] >= 0 for s in res.selection)


def test_mixed_precision_plan_in_mb_and_bops(folded, calib):
    base = QuantConfig(wbits=4, abits=8)
    res = mixed_precision_plan(folded, calib, base, method="kl", bits=(2, 8), target_size="4bit", progress=False)
    mb = (res.table.size_overhead_bytes + size_budget(res.table, "3bit").value / 8) / 1e6
    res_mb = mixed_precision_plan(folded, calib, base, method="kl", bits=(2, 8), target_size=f"{mb}MB",
                                  progress=False)
    assert res_mb.allocation.size_bytes <= mb * 1e6
    res_bops = mixed_precision_plan(folded, calib, base, method="kl", bits=(2, 4, 8), bops="w4a8", progress=False)
    assert res_bops.allocation.budget.kind == "bops"
    assert res_bops.allocation.bops <= res_bops.allocation.budget.value


def test_plots_written(folded, calib, tmp_path):
    from zsq.allocate import allocate, random_allocation, uniform_points
    from zsq.plots import plot_frontiers, plot_pareto, plot_sensitivity
    from zsq.sensitivity import sensitivity

    table = sensitivity(folded, calib, QuantConfig(wbits=4), method="kl", bits=(2, 4, 8), progress=False)
    b = size_budget(table, "4bit")
    alloc = allocate(table, b)
    rnd = random_allocation(table, b, seed=0)
    for p in (plot_sensitivity(table, tmp_path / "s.png"),
              plot_pareto(alloc, tmp_path / "p.png", uniform=uniform_points(table), others={"random": rnd}),
              plot_frontiers({"kl": alloc.frontier}, tmp_path / "f.png")):
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_cli_options_for_mixed_precision(tmp_path):
    import argparse

    from zsq.sensitivity.commands import add_mixed_precision_args, mixed_precision_from_args

    p = argparse.ArgumentParser()
    add_mixed_precision_args(p)
    cfg, plan = mixed_precision_from_args(p.parse_args([]))
    assert cfg is None and plan is None
    cfg, plan = mixed_precision_from_args(p.parse_args(
        ["--mixed-precision", "--target-size", "0.3MB", "--method", "hessian", "--mp-bits", "3,4,8",
         "--mp-hessian-iters", "7", "--mp-group", "a,b", "--mp-no-select"]))
    assert plan is None
    assert cfg.method == "hessian" and cfg.bits == (3, 4, 8) and cfg.target_size == "0.3MB"
    assert cfg.hessian.max_iterations == 7 and cfg.groups == (("a", "b"),) and not cfg.select_min_bits
    path = save_bit_plan(BitPlan(weight_bits={"conv1": 4}), tmp_path / "p.json")
    assert mixed_precision_from_args(p.parse_args(["--bit-plan", str(path)])) == (None, str(path))
    with pytest.raises(ConfigError, match="exclude"):
        mixed_precision_from_args(p.parse_args(["--bit-plan", str(path), "--mixed-precision"]))
    with pytest.raises(ConfigError, match="does not exist"):
        mixed_precision_from_args(p.parse_args(["--bit-plan", str(tmp_path / "nope.json")]))


def test_mixed_precision_plan_reuses_a_precomputed_table(folded, calib):
    from zsq.sensitivity import sensitivity

    base = QuantConfig(wbits=4, abits=8)
    table = sensitivity(folded, calib, base, method="kl", bits=(2, 4, 8), progress=False)
    fresh = mixed_precision_plan(folded, calib, base, method="kl", bits=(2, 4, 8), progress=False)
    reused = mixed_precision_plan(folded, calib, base, method="kl", bits=(2, 4, 8), progress=False, table=table)
    assert reused.plan.weight_bits == fresh.plan.weight_bits
    assert reused.table is table
    with pytest.raises(ConfigError, match="cannot allocate"):
        mixed_precision_plan(folded, calib, base, method="kl", bits=(3, 4), progress=False, table=table)
