"""Hybrid per-tensor / per-channel weight quantization (zsq.hybrid): the per-layer sensitivity of the two
granularities, the threshold rule, the automatic threshold, the bit plan with granularity, ONNX parity of a
hybrid model, and end-to-end runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import zsq
from zsq.config import QuantConfig
from zsq.errors import ConfigError
from zsq.hybrid import (HybridConfig, granularity_sensitivity, hybrid_plan, select_granularity, threshold_for,
                        with_granularity)
from zsq.mixed_precision import BitPlan, apply_bit_plan, load_bit_plan, save_bit_plan
from zsq.models import load_model
from zsq.quant import quantize, weight_layers
from zsq.sensitivity import prepare_model

LAYERS = ["conv1", "conv2", "conv3", "conv4", "fc"]


@pytest.fixture(scope="module")
def skewed():
    """tiny_cnn_nobn whose conv4 output channels span two orders of magnitude (per-tensor weights
    wipe out its small channels; the function is unchanged: ReLU and pooling commute with a positive
    scale, which the classifier's input columns undo), and Gaussian inputs."""
    torch.manual_seed(0)
    model, spec = load_model("tiny_cnn_nobn", pretrained=False)
    model.eval()
    with torch.no_grad():
        scale = torch.logspace(0, 2, model.conv4.weight.shape[0])
        model.conv4.weight.mul_(scale[:, None, None, None])
        model.conv4.bias.mul_(scale)
        model.fc.weight.div_(scale[None, :])
        model.fc.weight.mul_(30.0 / model.fc.weight.abs().max())  # confident outputs: KL divergences not all ~0
    x = zsq.gaussian_inputs(24, spec.preprocessing, seed=3)
    return model, spec, x


def granularity_of(qmodel) -> dict[str, str]:
    return {n: ("per_channel" if m.weight_quantizer.per_channel else "per_tensor")
            for n, m in weight_layers(qmodel).items()}


# ------------------------------------------------------------------------------------------------
# Sensitivity and the threshold rule
# ------------------------------------------------------------------------------------------------


def test_granularity_sensitivity_finds_the_skewed_layer(skewed):
    model, _, x = skewed
    q = prepare_model(model, QuantConfig(wbits=8, abits=8))
    before = {n: m.weight_quantizer for n, m in weight_layers(q).items()}
    kl = granularity_sensitivity(q, x, batch_size=10, progress=False)
    assert list(kl) == LAYERS
    assert all(v["per_channel"] >= 0 and v["per_tensor"] >= 0 for v in kl.values())
    delta = {n: v["per_tensor"] - v["per_channel"] for n, v in kl.items()}
    assert max(delta, key=delta.get) == "conv4"
    assert delta["conv4"] > 5 * max(abs(d) for n, d in delta.items() if n != "conv4")
    # the model is left as it was
    assert {n: m.weight_quantizer for n, m in weight_layers(q).items()} == before
    assert all(getattr(m, "quant_enabled", True) for m in weight_layers(q).values())
    # the suffix-run path equals full forwards (a plain nn.Module is not traced)
    plain = torch.nn.Sequential(q)
    kl2 = granularity_sensitivity(plain, x, batch_size=10, progress=False)
    for n in LAYERS:
        for g in ("per_channel", "per_tensor"):
            assert kl2["0." + n][g] == pytest.approx(kl[n][g], rel=1e-3, abs=1e-12)


def test_select_granularity_and_threshold_for():
    delta = {"a": -0.1, "b": 0.0, "c": 0.2, "d": 0.5}
    assert select_granularity(delta, 0.0) == {"a": "per_tensor", "b": "per_channel", "c": "per_channel",
                                              "d": "per_channel"}
    assert set(select_granularity(delta, 1e9).values()) == {"per_tensor"}
    assert set(select_granularity(delta, -1e9).values()) == {"per_channel"}
    for k in range(5):
        t = threshold_for(delta, k)
        assert sum(g == "per_tensor" for g in select_granularity(delta, t).values()) == k
    with pytest.raises(ConfigError):
        select_granularity(delta, float("nan"))


@pytest.mark.parametrize("threshold,expected", [(1e9, "per_tensor"), (-1e9, "per_channel")])
def test_huge_threshold_gives_per_tensor_and_negative_per_channel(skewed, threshold, expected):
    model, _, x = skewed
    cfg, plan, info = hybrid_plan(model, x, QuantConfig(wbits=8, abits=8), threshold=threshold, progress=False)
    assert set(plan.weight_granularity.values()) == {expected}
    assert info["threshold_source"] == "given" and info["threshold"] == threshold
    q = quantize(zsq.fold_batchnorm(model)[0], cfg)
    assert set(granularity_of(q).values()) == {expected}


def test_threshold_zero_picks_per_tensor_only_where_it_is_no_worse(skewed):
    model, _, x = skewed
    _, plan, info = hybrid_plan(model, x, QuantConfig(wbits=4, abits=8), threshold=0.0, progress=False)
    for n, d in info["layers"].items():
        assert d["granularity"] == ("per_tensor" if d["delta"] < 0 else "per_channel")
        assert d["delta"] == pytest.approx(d["kl_per_tensor"] - d["kl_per_channel"])
    assert plan.weight_granularity["conv4"] == "per_channel"


def test_explicit_override_is_kept(skewed):
    model, _, x = skewed
    base = QuantConfig(wbits=8, abits=8, overrides={"conv2": {"weight_granularity": "per_tensor", "wbits": 6}})
    cfg, plan, info = hybrid_plan(model, x, base, threshold=-1e9, progress=False)
    assert plan.weight_granularity["conv2"] == "per_tensor" and info["layers"]["conv2"]["pinned"]
    assert plan.weight_bits["conv2"] == 6 and plan.weight_bits["conv1"] == 8
    assert cfg.overrides["conv2"].wbits == 6  # the other fields of the override survive


# ------------------------------------------------------------------------------------------------
# The automatic threshold
# ------------------------------------------------------------------------------------------------


def test_default_threshold_is_chosen_on_held_apart_calibration_data(skewed):
    model, _, x = skewed
    cfg, plan, info = hybrid_plan(model, x, QuantConfig(wbits=8, abits=8), progress=False)
    assert info["threshold_source"] == "chosen" and info["tolerance"] == HybridConfig().tolerance
    search = {s["per_tensor_layers"]: s["kl"] for s in info["search"]}
    k = info["per_tensor_layers"]
    assert 0 in search and k in search
    assert search[k] <= (1 + info["tolerance"]) * search[0] + 1e-15
    if k + 1 in search:
        assert search[k + 1] > (1 + info["tolerance"]) * search[0]
    # the plan is the threshold rule applied to the per-layer deltas
    expected = select_granularity({n: d["delta"] for n, d in info["layers"].items()}, info["threshold"])
    assert dict(plan.weight_granularity) == expected
    assert plan.weight_granularity["conv4"] == "per_channel"  # per-tensor would wreck it
    assert plan.method == "hybrid" and plan.metadata["threshold"] == info["threshold"]
    json.dumps(info)  # JSON-serialisable
    # deterministic
    _, plan2, info2 = hybrid_plan(model, x, QuantConfig(wbits=8, abits=8), progress=False)
    assert plan2.weight_granularity == plan.weight_granularity and info2["threshold"] == info["threshold"]


def test_zero_tolerance_never_accepts_a_worse_plan(skewed):
    model, _, x = skewed
    _, _, info = hybrid_plan(model, x, QuantConfig(wbits=4, abits=8), config=HybridConfig(tolerance=0.0),
                             progress=False)
    search = {s["per_tensor_layers"]: s["kl"] for s in info["search"]}
    assert search[info["per_tensor_layers"]] <= search[0]


def test_bad_arguments():
    model, spec = load_model("tiny_cnn", pretrained=False)
    x = zsq.gaussian_inputs(4, spec.preprocessing, seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        hybrid_plan(model, x[:1], QuantConfig(), progress=False)
    with pytest.raises(ConfigError):
        hybrid_plan(model, x, QuantConfig(), threshold=float("nan"), progress=False)
    with pytest.raises(ConfigError):
        HybridConfig(tolerance=-1)
    with pytest.raises(ConfigError):
        hybrid_plan(model, x, {"wbits": 8}, progress=False)
    with pytest.raises(ConfigError):
        with_granularity(QuantConfig(), {"conv1": "per_row"})


# ------------------------------------------------------------------------------------------------
# The bit plan with granularity
# ------------------------------------------------------------------------------------------------


def test_bit_plan_json_round_trip_with_granularity(skewed, tmp_path):
    model, _, x = skewed
    cfg, plan, _ = hybrid_plan(model, x, QuantConfig(wbits=6, abits=8), threshold=1e-3,
                                 progress=False)
    path = save_bit_plan(plan, tmp_path / "plan.json")
    d = json.loads(path.read_text())
    assert d["weight_granularity"] == dict(plan.weight_granularity) and d["weight_bits"]["conv1"] == 6
    back = load_bit_plan(path)
    assert back == plan
    # applying the plan to the base config reproduces the hybrid model
    folded = zsq.fold_batchnorm(model)[0]
    via_plan = quantize(folded, apply_bit_plan(QuantConfig(wbits=6, abits=8), back))
    direct = quantize(folded, cfg)
    assert granularity_of(via_plan) == granularity_of(direct) == dict(plan.weight_granularity)
    # plans without granularity are unchanged (backwards compatible both ways)
    old = BitPlan(weight_bits={"conv1": 4})
    assert "weight_granularity" not in old.to_dict()
    assert BitPlan.from_dict(old.to_dict()).weight_granularity == {}
    with pytest.raises(ConfigError):
        BitPlan(weight_bits={"conv1": 4}, weight_granularity={"conv1": "per_row"})
    with pytest.raises(ConfigError):
        BitPlan(weight_bits={"conv1": 4}, weight_granularity={"re:conv.*": "per_tensor"})
    with pytest.raises(ConfigError, match="float"):
        apply_bit_plan(QuantConfig(overrides={"conv2": None}), BitPlan(weight_bits={"conv1": 8},
                                                                       weight_granularity={"conv2": "per_tensor"}))


# ------------------------------------------------------------------------------------------------
# End to end: ONNX parity of a hybrid model, and a non-uniform hybrid
# ------------------------------------------------------------------------------------------------


def test_hybrid_model_exports_to_onnx_with_parity(skewed, tmp_path):
    pytest.importorskip("onnxruntime")
    from zsq.export import compare_onnx, export_onnx, snap_biases

    model, spec, x = skewed
    _, _, info = hybrid_plan(model, x, QuantConfig(wbits=8, abits=8), threshold=0.0, progress=False)
    deltas = {n: d["delta"] for n, d in info["layers"].items()}
    cfg, plan, _ = hybrid_plan(model, x, QuantConfig(wbits=8, abits=8), threshold=threshold_for(deltas, 3),
                               progress=False)
    assert sorted(plan.weight_granularity.values()) == ["per_channel"] * 2 + ["per_tensor"] * 3  # a real mix
    q = quantize(zsq.fold_batchnorm(model)[0], cfg)
    zsq.calibrate(q, x, progress=False)
    snap_biases(q)
    report = export_onnx(q, tmp_path / "hybrid.onnx", example_input=torch.zeros(1, 3, 16, 16))
    assert report.float_convs == 0
    res = compare_onnx(q, report.path, zsq.gaussian_inputs(32, spec.preprocessing, seed=9))
    assert res["max_abs_diff"] <= res["logit_step"], res
    assert res["agreement"] == 100.0


def test_hybrid_with_nonuniform_weights_runs_end_to_end(skewed):
    from zsq.quant.nonuniform import NonUniformWeightQuantizer

    model, _, x = skewed
    base = QuantConfig(wbits=4, abits=8, weight_quantizer="nonuniform")
    cfg, plan, info = hybrid_plan(model, x, base, progress=False)
    assert plan.weight_granularity["conv4"] == "per_channel"
    q = quantize(zsq.fold_batchnorm(model)[0], cfg)
    assert all(isinstance(m.weight_quantizer, NonUniformWeightQuantizer) for m in weight_layers(q).values())
    assert granularity_of(q) == dict(plan.weight_granularity)
    zsq.calibrate(q, x, progress=False)
    with torch.no_grad():
        out = q(x)
    assert torch.isfinite(out).all() and math.isfinite(info["threshold"])
