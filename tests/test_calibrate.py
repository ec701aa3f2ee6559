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
