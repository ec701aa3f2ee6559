"""Greedy refinement of a unit's last layer after BRECQ (zsq.recover.refine, RecoverConfig.refine)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import zsq
from conftest import randomize_batchnorm
from zsq.config import QuantConfig
from zsq.errors import ConfigError
from zsq.quant.modules import QUANT_LAYER_TYPES
from zsq.recover import RecoverConfig, find_units, method_defaults, recover
from zsq.recover.blocks import UnitRunner, float_weights, mse, no_act
from zsq.recover.refine import refinable, refine_last_layer


class TinyMBConv(nn.Module):
    """Stem, one inverted-residual block with a shortcut (1x1 expand, 3x3 depthwise, linear 1x1 project), a 1x1
    conv followed by ReLU, and a classifier: the shapes refinement must tell apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            randomize_batchnorm(self, torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = self.head(x)
        return self.fc(x.mean(dim=(2, 3)))


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def quantized_tiny(abits: int = 8):
    """The float TinyMBConv, its calibrated W4 quantization at ``abits`` and the 32 inputs it was calibrated on."""
    torch.manual_seed(0)
    fp32 = TinyMBConv().eval()
    folded, _ = zsq.fold_batchnorm(fp32)
    train = _inputs(32, 1)
    q = zsq.quantize(folded, QuantConfig(wbits=4, abits=abits, act_estimator="percentile"))
    zsq.calibrate(q, train, progress=False)
    return fp32, q, train


@pytest.fixture(scope="module")
def tiny():
    return quantized_tiny()


def _unit(q, kind):
    units = [u for u in find_units(q) if u.kind == kind]
    assert units, [(u.name, u.kind) for u in find_units(q)]
    return units[0]


def test_which_layers_qualify(tiny):
    _, q, _ = tiny
    units = {u.name: u for u in find_units(q)}
    res = _unit(q, "residual")
    assert refinable(UnitRunner.for_unit(q, res), res.layers[-1]) is None  # the project conv before the shortcut
    assert "1x1" in refinable(UnitRunner.for_unit(q, res), res.layers[1])  # the depthwise conv
    head = next(u for u in units.values() if u.layers == ["head.0"])
    assert "follows the layer" in refinable(UnitRunner.for_unit(q, head), "head.0")  # its ReLU
    fc = next(u for u in units.values() if u.layers == ["fc"])
    assert refinable(UnitRunner.for_unit(q, fc), "fc") is None


@pytest.mark.parametrize("which", ["residual", "fc"])
def test_refinement_lowers_the_unit_error_and_stays_between_floor_and_ceil(tiny, which):
    """From nearest rounding, the greedy flips lower the unit's error on the inputs they were computed on (the
    quadratic objective is exact up to the output quantizer), and every code stays floor or floor + 1."""
    _, q0, train = tiny
    q = copy.deepcopy(q0)
    snap = {n: m.weight.detach().clone() for n, m in q.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
    units = find_units(q)
    unit = next(u for u in units if (u.kind == "residual" if which == "residual" else u.layers == ["fc"]))
    # the unit's inputs in the quantized model and its float output
    xq = xf = train
    for u in units:
        r = UnitRunner.for_unit(q, u)
        if u is unit:
            break
        xq, xf = r.batched(xq, batch_size=16), r.batched(xf, batch_size=16, weight_fn=float_weights(snap),
                                                           act_fn=no_act)
    runner = UnitRunner.for_unit(q, unit)
    yf = runner.batched(xf, batch_size=16, weight_fn=float_weights(snap), act_fn=no_act)
    before = mse(runner.batched(xq, batch_size=16), yf)
    name = unit.layers[-1]
    info = refine_last_layer(runner, name, xq, yf, float_weight=snap[name], batch_size=16)
    after = mse(runner.batched(xq, batch_size=16), yf)
    assert info["flips"] > 0 and info["quadratic"][1] < info["quadratic"][0]
    assert after < before
    m = q.get_submodule(name)
    wq = m.weight_quantizer
    s, z = wq._params()
    shape = (-1,) + (1,) * (snap[name].dim() - 1)
    low = torch.clamp(torch.floor(snap[name] / s.reshape(shape)) + z.reshape(shape), *wq.qrange)
    codes = wq.integer(m.weight.detach())
    assert bool(((codes - low >= 0) & (codes - low <= 1)).all())
    # a second run from the refined codes finds (almost) nothing more to flip: it stopped at a local minimum (its
    # target moves only by the output quantizer's rounding of the new outputs)
    again = refine_last_layer(runner, name, xq, yf, float_weight=snap[name], batch_size=16)
    assert again["flips"] <= max(1, info["flips"] // 10)


def test_brecq_with_refine(tiny):
    """``refine=True`` refines the qualifying units (and says why it skips the others), and on the learning
    inputs a refined unit ends no worse than the same run without refinement."""
    fp32, q0, train = tiny
    hold = _inputs(24, 2)
    reports = {}
    for refine in (False, True):
        q = copy.deepcopy(q0)
        for attr in ("zsq_config", "zsq_report"):
            setattr(q, attr, getattr(q0, attr))
        reports[refine] = recover(q, fp32, train, RecoverConfig(method="brecq", iters=30, batch_size=8,
                                                                refine=refine), progress=False, holdout_inputs=hold)
    plain, refined = ({u.name: u for u in reports[k].units} for k in (False, True))
    done = [n for n, u in refined.items() if "flips" in u.info.get("refine", {})]
    assert done and all("refine" not in u.info for u in plain.values())
    assert any("skipped" in u.info["refine"] for u in refined.values())
    first = done[0]  # units before it are identical in both runs, so it starts from the same codes
    assert refined[first].loss_after <= plain[first].loss_after + 1e-9


def test_refine_config():
    # on by default for ImageNet-sized inputs only (session 33: lower real held-apart KL on 3 of 3 Lite0 W4A8 seeds)
    assert method_defaults("brecq")["refine"] is False
    assert method_defaults("brecq", (224, 224))["refine"] is True
    assert RecoverConfig().resolved((224, 224)).refine is True
    assert RecoverConfig(refine=False).resolved((224, 224)).refine is False
    for m in ("adaround", "finetune"):  # brecq only: the other methods never get it
        assert RecoverConfig(method=m).resolved((224, 224)).refine is False
    assert RecoverConfig(refine=True).refine is True
    for bad in (dict(refine="yes"), dict(refine=1), dict(method="adaround", refine=True),
                dict(method="finetune", refine=True)):
        with pytest.raises(ConfigError, match="refine"):
            RecoverConfig(**bad)


def test_a_registered_method_does_not_inherit_brecq_only_defaults(monkeypatch):
    """A new method starts from brecq's defaults but not from refine, which only brecq implements (resolving its
    config for ImageNet-sized inputs would otherwise refuse it)."""
    import zsq.recover as rec

    monkeypatch.setattr(rec, "_METHODS", dict(rec._METHODS))
    monkeypatch.setattr(rec, "_DEFAULTS", {k: dict(v) for k, v in rec._DEFAULTS.items()})
    monkeypatch.setattr(rec, "_DEFAULTS_LARGE", {k: dict(v) for k, v in rec._DEFAULTS_LARGE.items()})
    monkeypatch.setattr(rec, "METHODS", rec.METHODS)
    rec.register_method("my_recon", "mypkg.recon:run")
    cfg = RecoverConfig(method="my_recon").resolved((224, 224))
    assert cfg.refine is False and cfg.harden == method_defaults("brecq", (224, 224))["harden"]
