"""zsq.calibrate: range estimators end to end, observer lifetime, state restoration, is_calibrated."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from zsq.calibrate import calibrate, is_calibrated, observing
from zsq.config import QuantConfig
from zsq.errors import ConfigError, NotCalibratedError, ZsqError
from zsq.fold import fold_batchnorm
from zsq.quant import ActQuantizer, act_quantizers, quantize, weight_layers

ESTIMATORS = ["minmax", "percentile", "mse"]


@pytest.fixture
def qmodel(tiny_model):
    folded, _ = fold_batchnorm(tiny_model)
    return quantize(folded, QuantConfig(act_estimator="minmax"))


@pytest.fixture
def cal_data(seed):
    return torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _observers_detached(model: nn.Module) -> bool:
    return all(q.observer is None for q in act_quantizers(model).values())


class _Boom(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_calibrate_sets_every_range(qmodel, cal_data, estimator):
    assert not is_calibrated(qmodel)
    ranges = calibrate(qmodel, cal_data, estimator=estimator, batch_size=8, progress=False)
    assert is_calibrated(qmodel)
    assert set(ranges) == set(act_quantizers(qmodel))
    for name, (lo, hi) in ranges.items():
        assert lo <= hi, name
        aq = act_quantizers(qmodel)[name]
        assert bool(aq.calibrated) and float(aq.scale) > 0
        glo, ghi = aq.range()
        # The integer grid covers the estimated range (widened to contain 0), up to half a step.
        s = float(aq.scale)
        assert glo <= min(lo, 0.0) + s / 2 + 1e-6 and ghi >= max(hi, 0.0) - s / 2 - 1e-6
    assert _observers_detached(qmodel)
    with torch.no_grad():
        out = qmodel(cal_data)
    assert torch.isfinite(out).all()


def test_estimators_relative_to_minmax(qmodel, cal_data):
    mm = calibrate(qmodel, cal_data, estimator="minmax", progress=False)
    pc = calibrate(qmodel, cal_data, estimator="percentile", percentile=99.0, progress=False)
    ms = calibrate(qmodel, cal_data, estimator="mse", progress=False)
    for name, (lo, hi) in mm.items():
        assert lo <= pc[name][0] <= pc[name][1] <= hi, name
        assert min(lo, 0.0) <= ms[name][0] <= ms[name][1] <= max(hi, 0.0), name
    # percentile 99% actually clips something somewhere
    assert any(pc[n] != mm[n] for n in mm)


def test_minmax_ranges_are_exact_minmax_of_activations(qmodel, cal_data):
    ranges = calibrate(qmodel, cal_data, estimator="minmax", progress=False)
    input_q = next(n for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer))
    assert ranges[input_q] == (float(cal_data.min()), float(cal_data.max()))


def test_minmax_independent_of_batching_and_container(qmodel, cal_data):
    a = calibrate(qmodel, cal_data, estimator="minmax", batch_size=5, progress=False)
    loader = [(cal_data[i : i + 8], torch.zeros(8)) for i in range(0, 24, 8)]
    b = calibrate(qmodel, loader, estimator="minmax", progress=False)
    c = calibrate(qmodel, iter([cal_data[:12], cal_data[12:]]), estimator="percentile", percentile=100.0, progress=False)
    assert a == b
    assert set(c) == set(a)


def test_estimator_defaults_to_config(tiny_model, cal_data):
    folded, _ = fold_batchnorm(tiny_model)
    q = quantize(folded, QuantConfig(act_estimator="percentile", act_percentile=99.0))
    default = calibrate(q, cal_data, progress=False)
    explicit = calibrate(q, cal_data, estimator="percentile", percentile=99.0, progress=False)
    assert default == explicit
    assert default != calibrate(q, cal_data, estimator="minmax", progress=False)


def test_recalibration_uses_fresh_statistics(qmodel, cal_data):
    wide = calibrate(qmodel, cal_data * 10, estimator="minmax", progress=False)
    narrow = calibrate(qmodel, cal_data, estimator="minmax", progress=False)
    name = next(iter(narrow))
    assert narrow[name] == (float(cal_data.min()), float(cal_data.max()))
    assert wide[name] != narrow[name]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unknown_estimator(qmodel, cal_data):
    with pytest.raises(ConfigError, match="kl"):
        calibrate(qmodel, cal_data, estimator="kl", progress=False)
    assert _observers_detached(qmodel)


def test_model_without_quantizers(tiny_model, cal_data):
    with pytest.raises(ConfigError, match="quantize"):
        calibrate(tiny_model, cal_data, progress=False)
    assert not is_calibrated(tiny_model)


@pytest.mark.parametrize("bad", [torch.empty(0, 3, 16, 16), torch.randn(5)])
def test_bad_calibration_tensor(qmodel, bad):
    with pytest.raises(ConfigError):
        calibrate(qmodel, bad, progress=False)


def test_empty_iterable_is_an_error(qmodel):
    with pytest.raises(ZsqError):
        calibrate(qmodel, [], progress=False)
    assert not is_calibrated(qmodel)
    assert _observers_detached(qmodel)


# --------------------------------------------------------------------------------------------
# Observers detached and mode restored, also on exceptions
# --------------------------------------------------------------------------------------------


def _raise_after(module: nn.Module, monkeypatch, n_ok: int) -> dict:
    calls = {"n": 0}
    orig = module.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise _Boom("forward failed")
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, "forward", flaky)
    return calls


@pytest.mark.parametrize("estimator,n_ok", [("minmax", 0), ("minmax", 1), ("percentile", 3), ("mse", 2)])
def test_observers_detached_when_model_raises(qmodel, cal_data, monkeypatch, estimator, n_ok):
    qmodel.train()
    calls = _raise_after(qmodel.fc, monkeypatch, n_ok)
    with pytest.raises(_Boom):
        calibrate(qmodel, cal_data, estimator=estimator, batch_size=8, progress=False)
    assert calls["n"] == n_ok + 1
    assert _observers_detached(qmodel)
    assert qmodel.training and all(m.training for m in qmodel.modules())
    assert not is_calibrated(qmodel)
    monkeypatch.undo()
    # The model is still usable: calibrating again works.
    calibrate(qmodel, cal_data, estimator=estimator, progress=False)
    assert is_calibrated(qmodel)


@pytest.mark.parametrize("training", [False, True])
def test_mode_restored_after_success(qmodel, cal_data, training):
    qmodel.train(training)
    seen = []
    qmodel.fc.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    calibrate(qmodel, cal_data, estimator="minmax", progress=False)
    assert seen and not any(seen)  # calibration runs in eval mode
    assert qmodel.training is training
    assert all(m.training is training for m in qmodel.modules())


def test_mixed_submodule_modes_restored(qmodel, cal_data, monkeypatch):
    """Each submodule's own train/eval flag must come back, not the root's flag applied everywhere."""
    qmodel.train()
    qmodel.fc.eval()
    modes = {n: m.training for n, m in qmodel.named_modules()}
    calibrate(qmodel, cal_data, estimator="minmax", progress=False)
    assert {n: m.training for n, m in qmodel.named_modules()} == modes
    _raise_after(qmodel.conv2, monkeypatch, 0)
    with pytest.raises(_Boom):
        calibrate(qmodel, cal_data, estimator="minmax", progress=False)
    assert {n: m.training for n, m in qmodel.named_modules()} == modes


def test_observing_context_manager(qmodel, cal_data):
    with pytest.raises(_Boom):
        with observing(qmodel) as observers:
            assert set(observers) == set(act_quantizers(qmodel))
            assert all(q.observer is observers[n] for n, q in act_quantizers(qmodel).items())
            qmodel(cal_data[:2])
            assert all(o.min_val is not None for o in observers.values())
            raise _Boom()
    assert _observers_detached(qmodel)


def test_observing_passes_activations_through(qmodel, tiny_model, cal_data):
    """While observing, activation quantizers are the identity (weights still fake-quantized)."""
    for layer in weight_layers(qmodel).values():
        layer.quant_enabled = False
    with torch.no_grad(), observing(qmodel):
        out = qmodel(cal_data[:4])
        ref = tiny_model(cal_data[:4])
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# is_calibrated
# --------------------------------------------------------------------------------------------


def test_is_calibrated(qmodel, cal_data, tiny_model):
    assert not is_calibrated(tiny_model)  # no quantizers at all
    assert not is_calibrated(qmodel)
    calibrate(qmodel, cal_data, estimator="minmax", progress=False)
    assert is_calibrated(qmodel)
    # One uncalibrated quantizer is enough to be "not calibrated".
    next(iter(act_quantizers(qmodel).values())).calibrated.fill_(False)
    assert not is_calibrated(qmodel)
    with pytest.raises(NotCalibratedError):
        with torch.no_grad():
            qmodel(cal_data)


def _depthwise_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_input_moments_match_brute_force_for_a_grouped_conv():
    from zsq.calibrate import InputMoments

    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    x = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    st = InputMoments(conv)
    st.add(x[:2])
    st.add(x[2:])
    got = st.moments()
    assert got.shape == (6, 18, 18)
    patches = torch.nn.functional.unfold(x, 3, padding=1, stride=2)  # (N, 36, L)
    for o in range(6):
        g = o // 3
        p = patches[:, g * 18:(g + 1) * 18].transpose(0, 1).reshape(18, -1)
        torch.testing.assert_close(got[o], p @ p.T / p.shape[1], rtol=1e-5, atol=1e-6)


def test_output_mse_weight_ranges_are_fitted_once_on_the_calibration_inputs():
    folded, _ = fold_batchnorm(_depthwise_model())
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    q = quantize(folded, QuantConfig(wbits=4, weight_symmetric=False, weight_estimator="output_mse"))
    used = {p.name: p.weight_estimator for p in q.zsq_report.layers}
    assert used == {"0": "output_mse", "3": "output_mse", "6": "output_mse", "9": "mse"}  # fan-in 1024 > 64
    dw = weight_layers(q)["3"]
    wq = dw.weight_quantizer
    assert wq.needs_inputs and not bool(wq.fitted)
    placeholder = wq.scale.clone()
    calibrate(q, x, progress=False)
    assert bool(wq.fitted) and not wq.needs_inputs
    assert not torch.equal(wq.scale, placeholder)
    # A later calibration (e.g. recovery's percentile ranges) keeps the fitted range even if the weights moved.
    fitted = wq.scale.clone()
    with torch.no_grad():
        dw.weight.mul_(1.5)
    calibrate(q, x, progress=False)
    assert torch.equal(wq.scale, fitted)
    # The flag travels with the state dict: a model loaded from it is not refitted either.
    fresh = quantize(folded, QuantConfig(wbits=4, weight_symmetric=False, weight_estimator="output_mse"))
    fresh.load_state_dict(q.state_dict())
    assert not weight_layers(fresh)["3"].weight_quantizer.needs_inputs


def test_output_mse_lowers_the_depthwise_output_error_against_minmax():
    folded, _ = fold_batchnorm(_depthwise_model())
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    errs = {}
    for est in ("minmax", "output_mse"):
        q = quantize(folded, QuantConfig(wbits=3, weight_symmetric=False, weight_estimator=est,
                                         overrides={"re:(0|6|9)": {"wbits": 8}}))
        calibrate(q, x, progress=False)
        dw = weight_layers(q)["3"]
        seen = []
        handle = folded.get_submodule("3").register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        try:
            folded(x)
        finally:
            handle.remove()
        h = seen[0]
        ref = torch.nn.functional.conv2d(h, folded.get_submodule("3").weight, None, padding=1, groups=8)
        got = torch.nn.functional.conv2d(h, dw.quantized_weight(), None, padding=1, groups=8)
        errs[est] = float((got - ref).detach().pow(2).mean())
    assert errs["output_mse"] < errs["minmax"]


def test_depthwise_weight_estimator_selects_depthwise_convs_and_overrides_win():
    folded, _ = fold_batchnorm(_depthwise_model())
    q = quantize(folded, QuantConfig(wbits=4, weight_symmetric=False, depthwise_weight_estimator="output_mse"))
    assert {p.name: p.weight_estimator for p in q.zsq_report.layers} == {
        "0": "minmax", "3": "output_mse", "6": "minmax", "9": "minmax"}
    q = quantize(folded, QuantConfig(wbits=4, depthwise_weight_estimator="output_mse",
                                     overrides={"3": {"weight_estimator": "mse"}}))
    assert {p.name: p.weight_estimator for p in q.zsq_report.layers}["3"] == "mse"
    with pytest.raises(ConfigError, match="depthwise_weight_estimator"):
        QuantConfig(depthwise_weight_estimator="hessian")


def test_recover_hints_when_low_bit_depthwise_convs_start_from_other_ranges(caplog):
    import logging

    from zsq.recover import RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR, RecoverConfig, recover

    model = _depthwise_model()
    folded, _ = fold_batchnorm(model)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    hints = {}
    for est in ("minmax", RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR):
        q = quantize(folded, QuantConfig(wbits=4, weight_symmetric=False, depthwise_weight_estimator=est))
        calibrate(q, x, progress=False)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="zsq.recover"):
            recover(q, model, x, RecoverConfig(method="adaround", iters=1, act_estimator=None), progress=False)
        hints[est] = [r.getMessage() for r in caplog.records if "depthwise" in r.getMessage()]
    assert len(hints["minmax"]) == 1 and "1 low-bit depthwise conv(s)" in hints["minmax"][0]
    assert hints[RECIPE_DEPTHWISE_WEIGHT_ESTIMATOR] == []
