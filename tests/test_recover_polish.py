"""The network-output bias polish after recovery (zsq.recover.polish, RecoverConfig.polish)."""

from __future__ import annotations

import copy

import pytest
import torch

from test_recover_refine import quantized_tiny
from zsq.errors import ConfigError
from zsq.metrics import kl_divergence
from zsq.quant.modules import QUANT_LAYER_TYPES
from zsq.recover import RecoverConfig, method_defaults, recover


@pytest.fixture(scope="module")
def tiny():
    return quantized_tiny(abits=4)


def _kl(fp32, q, x):
    with torch.no_grad():
        return float(kl_divergence(fp32(x), q(x)).mean())


def _weights(q):
    return {n: m.weight.detach().clone() for n, m in q.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}


def test_polish_lowers_the_output_kl_and_changes_only_biases(tiny):
    """On the inputs it learns from, the polish lowers the network's KL to FP32; weights (so every code) and
    activation ranges stay exactly as recovery left them; only biases move."""
    fp32, q0, train = tiny
    cfg = dict(method="brecq", iters=20, batch_size=8, mirror=False, seed=0)
    base = copy.deepcopy(q0)
    recover(base, fp32, train, RecoverConfig(**cfg), progress=False)
    pol = copy.deepcopy(q0)
    rep = recover(pol, fp32, train, RecoverConfig(**cfg, polish=60, polish_lr=1e-2), progress=False)
    info = rep.extra["polish"]
    assert info["iterations"] == 60 and info["biases"] > 0 and info["max_change"] > 0
    assert _kl(fp32, pol, train) < _kl(fp32, base, train)
    assert info["kl_last"] < info["kl_first"]
    wb, wp = _weights(base), _weights(pol)
    assert all(torch.equal(wb[n], wp[n]) for n in wb)
    sb, sp = base.state_dict(), pol.state_dict()
    moved = [k for k in sb if not torch.equal(sb[k], sp[k])]
    assert moved and all(k.endswith(".bias") for k in moved), moved
    assert "bias polish 60 steps" in str(rep)
    assert [p.requires_grad for p in pol.parameters()] == [p.requires_grad for p in q0.parameters()]


def test_polish_is_deterministic_and_off_by_default(tiny):
    fp32, q0, train = tiny
    assert method_defaults("brecq")["polish"] == 0
    outs = []
    for _ in range(2):
        q = copy.deepcopy(q0)
        recover(q, fp32, train, RecoverConfig(method="adaround", iters=5, batch_size=8, polish=10, seed=3),
                progress=False)
        outs.append(q.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    q = copy.deepcopy(q0)
    rep = recover(q, fp32, train, RecoverConfig(method="adaround", iters=5, batch_size=8), progress=False)
    assert "polish" not in rep.extra


def test_polish_restores_the_model_after_an_exception(tiny, monkeypatch):
    fp32, q0, train = tiny
    q = copy.deepcopy(q0)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    flags = [p.requires_grad for p in q.parameters()]
    import zsq.recover.finetune as ft

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ft, "distillation_kl", boom)  # the step polish shares with fine-tuning calls it
    with pytest.raises(RuntimeError, match="boom"):
        recover(q, fp32, train, RecoverConfig(method="adaround", iters=3, batch_size=8, polish=5), progress=False)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in q.parameters()] == flags


@pytest.mark.parametrize("kw", [{"polish": -1}, {"polish": 1.5}, {"polish": True}, {"polish_lr": 0},
                                {"polish_lr": -1e-3}])
def test_polish_config_errors(kw):
    with pytest.raises(ConfigError, match="polish"):
        RecoverConfig(**kw)
