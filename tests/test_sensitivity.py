"""Sensitivity: KL (ZeroQ) and Hessian (HAWQ) tables, Hutchinson / power iteration against exact
Hessians, determinism, state restoration, JSON round trip, the `zsq sensitivity` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from zsq.config import QuantConfig
from zsq.errors import ConfigError
from zsq.quant.modules import QUANT_LAYER_TYPES, ActQuantizer
from zsq.sensitivity import (SensitivityMethod, SensitivityTable, compute_sensitivity, isolated_weights, parse_bits,
                             prepare_model, target_layers)
from zsq.sensitivity.hessian import HessianConfig, layer_hessian_stats, self_distillation_loss
from zsq.sensitivity.kl import KLConfig

from conftest import make_tiny_model


@pytest.fixture
def qtiny(seed):
    model = make_tiny_model()
    return prepare_model(model, QuantConfig(wbits=4, abits=8, weight_estimator="mse"))


@pytest.fixture
def inputs():
    return torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _state(qmodel):
    return ([(n, m.__dict__.get("quant_enabled", "absent"), id(m.weight_quantizer))
             for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYER_TYPES)],
            [m.enabled for m in qmodel.modules() if isinstance(m, ActQuantizer)],
            [m.training for m in qmodel.modules()],
            [p.requires_grad for p in qmodel.parameters()])


# ------------------------------------------------------------------------------------------------
# KL
# ------------------------------------------------------------------------------------------------


def test_kl_table_shape_monotone_and_suffix_equals_full(qtiny, inputs):
    before = _state(qtiny)
    t = compute_sensitivity(qtiny, inputs, method="kl", bits=(2, 4, 8), config=KLConfig(batch_size=10),
                            progress=False)
    assert _state(qtiny) == before
    assert t.names == [n for n, _ in target_layers(qtiny)]
    assert t.names[0] == "conv1" and t.names[-1] == "fc"
    for n in t.names:
        v = t.values[n]
        assert v[2] > v[4] > v[8] >= 0, (n, v)
    full = compute_sensitivity(qtiny, inputs, method="kl", bits=(2, 4, 8),
                               config=KLConfig(batch_size=10, suffix_cache=False), progress=False)
    for n in t.names:
        for k in t.bits:
            assert t.values[n][k] == pytest.approx(full.values[n][k], rel=1e-5, abs=1e-12)
    assert t.settings["suffix_runs"] is True and full.settings["suffix_runs"] is False


def test_kl_matches_direct_definition(qtiny, inputs):
    """Omega_conv2(2) = mean KL(float model || model with only conv2 at 2 bits), computed by hand."""
    from zsq.sensitivity import make_weight_quantizer
    from zsq.metrics import kl_divergence

    t = compute_sensitivity(qtiny, inputs, method="kl", bits=(2,), progress=False)
    layer = dict(target_layers(qtiny))["conv2"]
    with isolated_weights(qtiny) as iso, torch.no_grad():
        ref = qtiny(inputs)
        with iso.only("conv2", make_weight_quantizer(layer, 2)):
            out = qtiny(inputs)
    assert t.values["conv2"][2] == pytest.approx(float(kl_divergence(ref, out).mean()), rel=1e-6)


def test_candidate_quantizers_follow_the_by_bits_symmetry_rule(seed):
    """With weight_symmetric=None the 8-bit model is symmetric, but its 4-bit candidates are asymmetric, as
    zsq.quantize would make them; sensitivity measures the quantizer the final model gets."""
    from zsq.sensitivity import make_weight_quantizer

    q = prepare_model(make_tiny_model(), QuantConfig(wbits=8, weight_symmetric=None))
    name, layer = target_layers(q)[1]
    assert layer.weight_quantizer.symmetric
    assert make_weight_quantizer(layer, 8, config=q.zsq_config).symmetric
    four = make_weight_quantizer(layer, 4, config=q.zsq_config)
    assert not four.symmetric and make_weight_quantizer(layer, 4).symmetric  # without a config: the layer's own
    inputs = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = compute_sensitivity(q, inputs, method="kl", bits=(4,), progress=False)
    with isolated_weights(q) as iso, torch.no_grad():
        ref = q(inputs)
        with iso.only(name, four):
            out = q(inputs)
    from zsq.metrics import kl_divergence
    assert t.values[name][4] == pytest.approx(float(kl_divergence(ref, out).mean()), rel=1e-6)


def test_kl_handles_inplace_ops_in_the_suffix(seed):
    class InplaceNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.c3 = nn.Conv2d(8, 8, 1)
            self.act = nn.ReLU(inplace=True)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = self.act(self.c1(x))
            z = self.c2(y)
            z += y  # in place on a tensor that is computed after c2's input
            z = self.c3(z)
            z = torch.relu_(z)
            return self.fc(z.mean(dim=(2, 3)))

    q = prepare_model(InplaceNet().eval(), QuantConfig(wbits=4))
    x = torch.randn(6, 3, 8, 8)
    a = compute_sensitivity(q, x, method="kl", bits=(2, 8), progress=False)
    b = compute_sensitivity(q, x, method="kl", bits=(2, 8), config=KLConfig(suffix_cache=False), progress=False)
    for n in a.names:
        for k in a.bits:
            assert a.values[n][k] == pytest.approx(b.values[n][k], rel=1e-5, abs=1e-12)


def test_flags_restored_after_an_exception(qtiny, inputs, monkeypatch):
    import zsq.sensitivity.kl as klmod

    before = _state(qtiny)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(klmod, "kl_divergence", boom)
    with pytest.raises(RuntimeError, match="boom"):
        compute_sensitivity(qtiny, inputs, method="kl", bits=(4,), progress=False)
    assert _state(qtiny) == before
    with pytest.raises(RuntimeError, match="boom"):
        with isolated_weights(qtiny):
            raise RuntimeError("boom")
    assert _state(qtiny) == before


def test_bad_inputs_are_config_errors(qtiny):
    with pytest.raises(ConfigError):
        compute_sensitivity(qtiny, torch.empty(0, 3, 16, 16), method="kl", progress=False)
    with pytest.raises(ConfigError, match="not one of"):
        compute_sensitivity(qtiny, torch.randn(2, 3, 16, 16), method="fisher", progress=False)
    with pytest.raises(ConfigError):
        compute_sensitivity(qtiny, torch.randn(2, 3, 16, 16), method="kl", bits=(1, 4), progress=False)
    with pytest.raises(ConfigError):
        parse_bits("2,four")
    assert parse_bits("8, 2,4,4") == (2, 4, 8)
    with pytest.raises(ConfigError):
        KLConfig(batch_size=0)
    with pytest.raises(ConfigError):
        HessianConfig(statistic="norm")


# ------------------------------------------------------------------------------------------------
# Hessian: estimators against the explicit Hessian of a tiny network
# ------------------------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.l2 = nn.Linear(7, 6)
        self.l3 = nn.Linear(6, 4)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.relu(self.l1(x)))))


def _explicit_blocks(model, batches, loss_fn):
    """Exact diagonal Hessian blocks of the mean loss over ``batches`` w.r.t. each weight matrix."""
    params = dict(model.named_parameters())
    out = {}
    for name in ("l1.weight", "l2.weight", "l3.weight"):
        w0 = params[name].detach()

        def f(w):
            total = 0.0
            for x, ref in batches:
                total = total + loss_fn(functional_call(model, {**params, name: w}, (x,)), ref)
            return total / len(batches)

        h = torch.autograd.functional.hessian(f, w0)
        out[name] = h.reshape(w0.numel(), w0.numel())
    return out


@pytest.fixture
def mlp_problem(seed):
    model = TinyMLP().double()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        with torch.no_grad():
            ref = model(x) + 0.5 * torch.randn(16, 4, generator=g, dtype=torch.float64)
        batches.append((x, ref))
    return model, batches


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_power_iteration_matches_top_eigenvalue_of_explicit_hessian(mlp_problem, loss):
    model, batches = mlp_problem
    loss_fn = self_distillation_loss(loss)
    blocks = _explicit_blocks(model, batches, loss_fn)
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    cfg = HessianConfig(statistic="eigenvalue", traces=False, eigen_max_iterations=500, eigen_tol=1e-10, seed=1)
    stats = layer_hessian_stats(model, batches, params, loss_fn=loss_fn, config=cfg, progress=False)
    for n, h in blocks.items():
        eig = torch.linalg.eigvalsh((h + h.T) / 2)
        top = eig[eig.abs().argmax()]
        assert stats.eigenvalues[n] == pytest.approx(float(top), rel=1e-4), n
        # plain power iteration on the explicit matrix gives the same number
        v = torch.ones(h.shape[0], dtype=h.dtype)
        for _ in range(2000):
            v = h @ v
            v = v / v.norm()
        assert float(v @ h @ v) == pytest.approx(stats.eigenvalues[n], rel=1e-4)


def _explicit_full_hessian(model, batch, loss_fn, names):
    """Exact Hessian of the loss w.r.t. the concatenation of the weights ``names`` (and block offsets)."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(v):
        parts = torch.split(v, sizes)
        new = {**params, **{n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}}
        x, ref = batch
        return loss_fn(functional_call(model, new, (x,)), ref)

    h = torch.autograd.functional.hessian(f, flat)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return h, offsets


@pytest.mark.parametrize("mode", ["per_layer", "joint"])
def test_hutchinson_trace_matches_exact_trace(mlp_problem, mode):
    model, batches = mlp_problem
    loss_fn = self_distillation_loss("ce")
    names = ["l1.weight", "l2.weight", "l3.weight"]
    # One batch holding all the data (the same mean loss), many Rademacher vectors per graph.
    whole = (torch.cat([x for x, _ in batches]), torch.cat([r for _, r in batches]))
    h, off = _explicit_full_hessian(model, whole, loss_fn, names)
    params = {n: p for n, p in model.named_parameters() if n in names}
    samples = 600
    cfg = HessianConfig(trace_mode=mode, max_iterations=samples, min_iterations=10, samples_per_batch=200,
                        tol=1e-12, seed=2)
    stats = layer_hessian_stats(model, [whole], params, loss_fn=loss_fn, config=cfg, progress=False)
    assert stats.trace_samples == samples
    for i, n in enumerate(names):
        rows = slice(off[i], off[i + 1])
        block = h[rows, rows]
        exact = float(torch.trace(block))
        # Variance of one Rademacher sample z_i^T (H z)_i: 2 * sum of squared off-diagonal entries of the
        # block, plus (joint mode) the squared entries of the off-diagonal blocks in its rows.
        var = 2 * float((block ** 2).sum() - (torch.diagonal(block) ** 2).sum())
        if mode == "joint":
            var += float((h[rows, :] ** 2).sum() - (block ** 2).sum())
        sd = (var / samples) ** 0.5
        assert abs(stats.traces[n] - exact) <= 4.5 * sd + 1e-9, (n, stats.traces[n], exact, sd)
        assert abs(stats.traces[n] - exact) <= 0.15 * abs(exact), (n, stats.traces[n], exact)


class ReluMLP(nn.Module):
    """Piecewise linear in each weight matrix: its diagonal Hessian blocks equal the Gauss-Newton blocks."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.l2 = nn.Linear(7, 6)
        self.l3 = nn.Linear(6, 4)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def test_gauss_newton_trace_matches_exact_hessian_trace_of_relu_net(seed):
    model = ReluMLP().double()
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    loss_fn = self_distillation_loss("ce")
    names = ["l1.weight", "l2.weight", "l3.weight"]
    h, off = _explicit_full_hessian(model, (x, ref), loss_fn, names)
    params = {n: p for n, p in model.named_parameters() if n in names}
    cfg = HessianConfig(trace_mode="gauss_newton", max_iterations=2000, min_iterations=10, samples_per_batch=500,
                        tol=1e-12, seed=4)
    stats = layer_hessian_stats(model, [(x, ref)], params, loss_fn=loss_fn, config=cfg, progress=False)
    for i, n in enumerate(names):
        exact = float(torch.trace(h[off[i]:off[i + 1], off[i]:off[i + 1]]))
        assert stats.traces[n] >= 0
        assert stats.traces[n] == pytest.approx(exact, rel=0.08), (n, stats.traces[n], exact)


def test_hutchinson_stops_on_tolerance_and_is_seeded(mlp_problem):
    model, batches = mlp_problem
    loss_fn = self_distillation_loss("ce")
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    cfg = HessianConfig(max_iterations=400, min_iterations=2, tol=5e-2, seed=3)
    a = layer_hessian_stats(model, batches, params, loss_fn=loss_fn, config=cfg, progress=False)
    b = layer_hessian_stats(model, batches, params, loss_fn=loss_fn, config=cfg, progress=False)
    assert a.trace_converged and a.trace_samples < 400
    assert a.traces == b.traces and a.trace_samples == b.trace_samples
    c = layer_hessian_stats(model, batches, params, loss_fn=loss_fn,
                            config=HessianConfig(max_iterations=400, min_iterations=2, tol=5e-2, seed=4),
                            progress=False)
    assert c.traces != a.traces


def test_hessian_table_on_tiny_cnn_is_deterministic(qtiny, inputs):
    before = _state(qtiny)
    cfg = HessianConfig(max_iterations=4, eigenvalues=True, eigen_max_iterations=3, batch_size=24, seed=0)
    inputs = inputs[:8]
    a = compute_sensitivity(qtiny, inputs, method="hessian", bits=(2, 4, 8), config=cfg, progress=False)
    b = compute_sensitivity(qtiny, inputs, method=SensitivityMethod.HESSIAN, bits=(2, 4, 8), config=cfg,
                            progress=False)
    assert _state(qtiny) == before
    assert a.values == b.values
    for n in a.names:
        ex = a.extras[n]
        params = a.layer(n).params
        for k in a.bits:
            expect = max(ex["trace"], 0.0) / params * ex["weight_error"][str(k)]
            assert a.values[n][k] == pytest.approx(expect, rel=1e-9)
        assert ex["weight_error"]["2"] > ex["weight_error"]["4"] > ex["weight_error"]["8"]
        assert "eigenvalue" in ex
    eig = compute_sensitivity(qtiny, inputs, method="hessian", bits=(4,),
                              config=HessianConfig(statistic="eigenvalue", eigen_max_iterations=2, batch_size=24),
                              progress=False)
    for n in eig.names:
        assert eig.values[n][4] == pytest.approx(max(eig.extras[n]["eigenvalue"], 0) *
                                                 eig.extras[n]["weight_error"]["4"], rel=1e-9)


# ------------------------------------------------------------------------------------------------
# Table and command
# ------------------------------------------------------------------------------------------------


def test_table_json_round_trip_and_metadata(qtiny, inputs, tmp_path):
    t = compute_sensitivity(qtiny, inputs, method="kl", bits=(2, 8), progress=False, model_name="tiny_cnn")
    path = t.save(tmp_path / "t.json")
    u = SensitivityTable.load(path)
    assert u.to_dict() == t.to_dict()
    assert u.layers == t.layers and u.values == t.values
    conv1 = u.layer("conv1")
    assert conv1.params == 16 * 3 * 3 * 3 and conv1.macs == 16 * 16 * conv1.params and conv1.abits == 8
    assert u.size_overhead_bytes > 0
    from zsq.size import quantized_size_bytes

    assert u.size_overhead_bytes + u.uniform_weight_bits(4) // 8 == quantized_size_bytes(qtiny)
    bad = json.loads(path.read_text())
    bad["format"] = "something"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="not a zsq sensitivity table"):
        SensitivityTable.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist"):
        SensitivityTable.load(tmp_path / "missing.json")


def test_pinned_layers_are_recorded(seed, inputs):
    q = prepare_model(make_tiny_model(), QuantConfig(wbits=4, overrides={"@first": {"wbits": 8}}, skip=("conv3",)))
    t = compute_sensitivity(q, inputs[:4], method="kl", bits=(2, 4), progress=False)
    assert t.layer("conv1").fixed_bits == 8
    assert "conv3" not in t.names  # kept in float: not allocatable


@pytest.fixture
def cli(monkeypatch):
    import zsq.cli

    mods = list(zsq.cli.PLUGIN_MODULES)
    if "zsq.sensitivity.commands" not in mods:
        mods.append("zsq.sensitivity.commands")
    monkeypatch.setattr(zsq.cli, "PLUGIN_MODULES", mods)
    monkeypatch.setattr(zsq.cli, "COMMANDS", dict(zsq.cli.COMMANDS))
    return zsq.cli.main


def test_cli_sensitivity_calib_source_unknown(cli, tmp_path, capsys):
    """Sensitivity calibrates on distilled, gaussian or a path only (no retro, no ZeroP spec): its message says so."""
    for bad in (str(tmp_path / "nothere.pt"), "retro", "proxy:gaussian"):
        rc = cli(["sensitivity", "tiny_cnn", "--method", "kl", "--calib", bad, "--out", str(tmp_path / "t.json"), "-q"])
        err = capsys.readouterr().err
        assert rc != 0 and "Traceback" not in err
        assert f"--calib {bad!r}: expected 'distilled', 'gaussian' or an existing path" in err, err


def test_cli_sensitivity_and_allocate(cli, tmp_path, capsys):
    table = tmp_path / "table.json"
    rc = cli(["sensitivity", "tiny_cnn", "--method", "kl", "--bits", "2,4,8", "--calib", "gaussian",
              "--calib-size", "8", "--weight-estimator", "mse", "--out", str(table), "--plot",
              str(tmp_path / "sens.png"), "-q"])
    assert rc == 0
    t = SensitivityTable.load(table)
    assert t.bits == (2, 4, 8) and t.model == "tiny_cnn"
    assert (tmp_path / "sens.png").stat().st_size > 1000
    plan = tmp_path / "plan.json"
    rc = cli(["allocate", str(table), "--target-size", "4bit", "--out", str(plan), "--pareto-plot",
              str(tmp_path / "pareto.png"), "--group", "conv1,conv2", "-q"])
    assert rc == 0
    data = json.loads(plan.read_text())
    assert data["format"] == "zsq-bit-plan"
    assert set(data["weight_bits"]) == set(t.names)
    assert data["weight_bits"]["conv1"] == data["weight_bits"]["conv2"]
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "bits/weight" in out
    # user mistakes: one line, non-zero exit
    assert cli(["allocate", str(table), "--target-size", "lots", "--out", str(plan), "-q"]) == 2
    assert "target-size" in capsys.readouterr().err
    assert cli(["allocate", str(tmp_path / "nope.json"), "--out", str(plan), "-q"]) == 2
    rc = cli(["sensitivity", "tiny_cnn", "--method", "hessian", "--bits", "4,8", "--calib", "gaussian",
              "--calib-size", "4", "--hessian-iters", "2", "--out", str(tmp_path / "h.json"), "-q"])
    assert rc == 0
    assert SensitivityTable.load(tmp_path / "h.json").method == "hessian"
