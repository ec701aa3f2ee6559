"""zsq.distill.retro: class-conditional Retro-Synthesis data, with and without BatchNorm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import randomize_batchnorm
from zsq.config import DistillConfig
from zsq.distill import distill, gaussian_inputs
from zsq.distill.retro import RetroConfig, RetroResult, retro_synthesize, spread_targets, total_variation
from zsq.distill.zeroq import distill_loss
from zsq.errors import ConfigError, NoBatchNormError
from zsq.fold import fold_batchnorm
from zsq.models.preprocessing import Preprocessing

FAST = dict(num_images=10, batch_size=10, iterations=20, flip=False, jitter=0)  # views: their own test


def _cfg(**kw) -> RetroConfig:
    return RetroConfig(**{**FAST, **kw})


class SpatialHeadNet(nn.Module):
    """conv3x3 (+BN) + ReLU, 4x4 average pool, linear head on the flattened 8x4x4 map (16x16 input).
    Random weights, but unlike a global-pool head every class is reachable by some input."""

    def __init__(self, batch_norm: bool = True, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def _spatial_net(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    m = SpatialHeadNet(batch_norm)
    randomize_batchnorm(m, torch.Generator().manual_seed(0))
    return m.eval()


@torch.no_grad()
def _hit_rate(model: nn.Module, res: RetroResult) -> float:
    return float((model(res.inputs).argmax(1) == res.labels).float().mean())


def _state(model: nn.Module):
    return ({n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_state_equal(model: nn.Module, state) -> None:
    modes, flags, sd = state
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in sd.items()), "parameters or BN statistics changed"
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


# --------------------------------------------------------------------------------------------
# The class objective, the BN term, BN-free models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [True, False])
def test_class_term_drives_predictions_to_targets(batch_norm, tiny_preprocessing):
    model = _spatial_net(batch_norm)
    noise_hits = float((model(gaussian_inputs(20, tiny_preprocessing, seed=0)).argmax(1)
                        == spread_targets(20, 10, generator=torch.Generator().manual_seed(0))).float().mean())
    res = retro_synthesize(model, tiny_preprocessing, _cfg(num_images=20, batch_size=20, iterations=30),
                           progress=False)
    assert isinstance(res, RetroResult) and res.has_batchnorm == batch_norm
    assert res.inputs.shape == (20, 3, 16, 16) and res.labels.shape == (20,) and res.labels.dtype == torch.long
    hits = _hit_rate(model, res)
    assert hits >= 0.8 > noise_hits + 0.3
    assert res.target_accuracy == pytest.approx(100 * hits)  # the reported figure is the model's own verdict
    assert res.class_losses[0] < 0.75 * res.initial_class_losses[0]
    assert (len(res.bn_losses) == 1) == batch_norm


def test_class_weight_is_what_moves_the_predictions(tiny_preprocessing):
    """Without the class term (BN term only) the predictions stay near chance: the hits above come
    from the cross-entropy, not from the priors."""
    model = _spatial_net(True)
    res = retro_synthesize(model, tiny_preprocessing, _cfg(num_images=20, batch_size=20, iterations=30,
                                                           class_weight=0.0), progress=False)
    assert _hit_rate(model, res) < 0.5


def test_bn_term_decreases(tiny_model, tiny_preprocessing):
    res = retro_synthesize(tiny_model, tiny_preprocessing, _cfg(iterations=30), progress=False)
    assert res.has_batchnorm and len(res.bn_losses) == len(res.initial_bn_losses) == 1
    assert res.bn_losses[0] < 0.9 * res.initial_bn_losses[0]
    assert res.losses[0] < res.initial_losses[0]
    # The reported BN loss is ZeroQ's BN loss of the (unfolded) model at the returned inputs (up to
    # the last Adam step) and beats Gaussian noise; dropping the BN term gives a worse BN match.
    assert distill_loss(tiny_model, res.inputs) < distill_loss(tiny_model, gaussian_inputs(10, tiny_preprocessing))
    no_bn = retro_synthesize(tiny_model, tiny_preprocessing, _cfg(iterations=30, bn_weight=0.0), progress=False)
    assert no_bn.bn_losses == [] and not no_bn.has_batchnorm
    assert distill_loss(tiny_model, res.inputs) < distill_loss(tiny_model, no_bn.inputs)


def test_works_without_batchnorm_where_zeroq_raises(tiny_model_nobn, tiny_preprocessing):
    with pytest.raises(NoBatchNormError, match="has no BatchNorm layer.*--calib gaussian"):
        distill(tiny_model_nobn, tiny_preprocessing, DistillConfig(batch_size=4, iterations=2), progress=False)
    state = _state(tiny_model_nobn)
    res = retro_synthesize(tiny_model_nobn, tiny_preprocessing, _cfg(iterations=30), progress=False)
    _assert_state_equal(tiny_model_nobn, state)
    assert not res.has_batchnorm and res.bn_losses == [] and res.initial_bn_losses == []
    assert res.inputs.shape == (10, 3, 16, 16) and torch.isfinite(res.inputs).all()
    assert res.class_losses[0] < res.initial_class_losses[0]
    assert res.losses[0] < res.initial_losses[0]
    assert res.to_dict()["has_batchnorm"] is False


def test_works_on_a_model_whose_bn_was_folded_away(tiny_model, tiny_preprocessing):
    folded, report = fold_batchnorm(tiny_model)
    assert report.folded
    with pytest.raises(NoBatchNormError):
        distill(folded, tiny_preprocessing, DistillConfig(batch_size=4, iterations=2), progress=False)
    res = retro_synthesize(folded, tiny_preprocessing, _cfg(iterations=5), progress=False)
    assert not res.has_batchnorm and res.inputs.shape == (10, 3, 16, 16)


# --------------------------------------------------------------------------------------------
# Targets, determinism, ranges, sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,c", [(25, 10), (10, 10), (7, 10), (100, 7), (3, 1)])
def test_targets_spread_evenly(n, c):
    y = spread_targets(n, c, generator=torch.Generator().manual_seed(3))
    assert y.shape == (n,) and y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) < c
    counts = torch.bincount(y, minlength=c)
    assert int(counts.max()) - int(counts.min()) <= 1 and int(counts.sum()) == n
    # consecutive inputs (one optimisation batch of up to c inputs) get distinct classes
    assert len(set(y[:min(n, c)].tolist())) == min(n, c)
    assert torch.equal(y, spread_targets(n, c, generator=torch.Generator().manual_seed(3)))


def test_targets_are_seeded_and_cover_num_classes(tiny_model_nobn, tiny_preprocessing):
    a = retro_synthesize(tiny_model_nobn, tiny_preprocessing, _cfg(num_images=20, iterations=1), progress=False)
    assert a.num_classes == 10 and sorted(torch.bincount(a.labels).tolist()) == [2] * 10
    b = retro_synthesize(tiny_model_nobn, tiny_preprocessing, _cfg(num_images=20, iterations=1, seed=1),
                         progress=False)
    assert not torch.equal(a.labels, b.labels)
    c = retro_synthesize(tiny_model_nobn, tiny_preprocessing, _cfg(num_images=8, iterations=1), num_classes=4,
                         progress=False)
    assert c.num_classes == 4 and torch.bincount(c.labels, minlength=4).tolist() == [2, 2, 2, 2]


def test_deterministic_per_seed_and_independent_of_global_rng(tiny_model, tiny_preprocessing):
    torch.manual_seed(123)
    a = retro_synthesize(tiny_model, tiny_preprocessing, _cfg(seed=3, iterations=8), progress=False)
    torch.manual_seed(456)
    b = retro_synthesize(tiny_model, tiny_preprocessing, _cfg(seed=3, iterations=8), progress=False)
    c = retro_synthesize(tiny_model, tiny_preprocessing, _cfg(seed=4, iterations=8), progress=False)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert a.losses == b.losses and a.bn_losses == b.bn_losses and a.class_losses == b.class_losses
    assert not torch.equal(a.inputs, c.inputs)


def test_flip_and_jitter_views(tiny_model, tiny_preprocessing):
    """DeepInversion's random views (on by default, as for distilled data): seeded, a different result from
    the plain synthesis, and the class objective still reached on the un-augmented inputs."""
    assert RetroConfig().flip is True and RetroConfig().jitter is None
    on = retro_synthesize(tiny_model, tiny_preprocessing, RetroConfig(num_images=10, batch_size=10, iterations=30,
                                                                        seed=3), progress=False)
    plain = retro_synthesize(tiny_model, tiny_preprocessing, _cfg(seed=3, iterations=30, flip=False, jitter=0),
                             progress=False)
    aug = [retro_synthesize(tiny_model, tiny_preprocessing, _cfg(seed=3, iterations=30, flip=True, jitter=2),
                            progress=False) for _ in range(2)]
    assert torch.equal(on.inputs, aug[0].inputs)  # the default: flip, 2 pixels at 16x16
    assert torch.equal(aug[0].inputs, aug[1].inputs) and torch.equal(aug[0].labels, plain.labels)
    assert not torch.equal(aug[0].inputs, plain.inputs)
    assert aug[0].class_losses[0] < aug[0].initial_class_losses[0]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "plateau"])
@pytest.mark.parametrize("init", ["gaussian", "uniform"])
def test_outputs_within_input_range(tiny_model, schedule, init):
    pre = Preprocessing(input_size=(16, 16), resize=None, mean=(0.2, 0.5, 0.8), std=(0.1, 0.3, 0.2))
    res = retro_synthesize(tiny_model, pre, _cfg(iterations=6, lr=1.0, schedule=schedule, init=init),
                           progress=False)
    lo, hi = pre.input_range()
    assert torch.isfinite(res.inputs).all()
    assert (res.inputs >= lo.view(1, -1, 1, 1)).all() and (res.inputs <= hi.view(1, -1, 1, 1)).all()
    assert bool((res.inputs == hi.view(1, -1, 1, 1)).any())  # lr 1.0 pushes some pixels to the limit


def test_batches_and_default_sizes(tiny_model_nobn, tiny_preprocessing):
    res = retro_synthesize(tiny_model_nobn, tiny_preprocessing, _cfg(num_images=10, batch_size=4, iterations=3),
                           progress=False, device="cpu")
    assert res.inputs.shape[0] == 10 and res.labels.shape[0] == 10
    assert res.iterations == [3, 3, 3] and len(res.losses) == len(res.class_losses) == 3
    d = res.to_dict()
    assert d["num_inputs"] == 10 and d["iterations"] == [3, 3, 3] and d["seconds"] >= 0
    assert RetroConfig().resolved_sizes((32, 32)) == (32, 32)
    assert RetroConfig().resolved_sizes((224, 224)) == (16, 16)
    assert RetroConfig(num_images=5).resolved_sizes((32, 32)) == (5, 5)


# --------------------------------------------------------------------------------------------
# Model state, errors, config
# --------------------------------------------------------------------------------------------


class RaisesAfter(nn.Module):
    """Wraps a model; its forward raises after ``n_ok`` successful calls."""

    def __init__(self, inner: nn.Module, n_ok: int):
        super().__init__()
        self.inner = inner
        self.n_ok = n_ok
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.n_ok:
            raise RuntimeError("simulated failure inside forward")
        return self.inner(x)


def test_model_untouched(tiny_model, tiny_preprocessing):
    tiny_model.train()
    tiny_model.bn2.eval()
    tiny_model.fc.weight.requires_grad_(False)
    state = _state(tiny_model)
    retro_synthesize(tiny_model, tiny_preprocessing, _cfg(iterations=4), progress=False)
    _assert_state_equal(tiny_model, state)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_state_restored_after_exception(tiny_model_nobn, tiny_preprocessing):
    wrapped = RaisesAfter(tiny_model_nobn, n_ok=3)
    wrapped.train()
    tiny_model_nobn.conv1.weight.requires_grad_(False)
    state = _state(wrapped)
    with pytest.raises(RuntimeError, match="simulated failure"):
        retro_synthesize(wrapped, tiny_preprocessing, _cfg(iterations=10), progress=False)
    _assert_state_equal(wrapped, state)
    assert all(p.grad is None for p in wrapped.parameters())


def test_rejects_models_that_are_not_classifiers(tiny_preprocessing):
    conv = nn.Conv2d(3, 4, 3).eval()
    with pytest.raises(ConfigError, match="logits"):
        retro_synthesize(conv, tiny_preprocessing, _cfg(iterations=1), progress=False)


def test_num_classes_checked_against_the_model(tiny_model_nobn, tiny_preprocessing):
    with pytest.raises(ConfigError, match="outputs only 10 logits"):
        retro_synthesize(tiny_model_nobn, tiny_preprocessing, _cfg(iterations=1), num_classes=11, progress=False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="num_classes"):
            retro_synthesize(tiny_model_nobn, tiny_preprocessing, _cfg(iterations=1), num_classes=bad,
                             progress=False)
    with pytest.raises(ConfigError, match="RetroConfig"):
        retro_synthesize(tiny_model_nobn, tiny_preprocessing, DistillConfig(), progress=False)


@pytest.mark.parametrize("kwargs", [
    dict(num_images=0), dict(num_images=-2), dict(batch_size=0), dict(iterations=0), dict(num_images=True),
    dict(lr=0.0), dict(lr=math.inf), dict(class_weight=-1.0), dict(bn_weight=-0.1), dict(tv_weight=-1e-3),
    dict(l2_weight=-1.0), dict(input_weight=-1.0), dict(tv_weight=math.nan), dict(class_weight=0.0, bn_weight=0.0),
    dict(schedule="step"), dict(init="zeros"), dict(seed=1.5), dict(flip=1), dict(jitter=-1), dict(jitter=True),
])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError, match="RetroConfig"):
        RetroConfig(**kwargs)


def test_config_round_trip_and_from_distill():
    cfg = _cfg(seed=9, tv_weight=0.2, schedule="plateau")
    assert RetroConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        RetroConfig.from_dict({"iters": 3})
    d = DistillConfig(batch_size=8, iterations=50, lr=0.1, schedule="constant", input_weight=0.5, seed=4,
                      flip=True, jitter=3)
    r = RetroConfig.from_distill(d, num_images=24, tv_weight=0.0)
    assert (r.num_images, r.batch_size, r.iterations, r.lr, r.schedule, r.input_weight, r.seed, r.tv_weight,
            r.flip, r.jitter) == (24, 8, 50, 0.1, "constant", 0.5, 4, 0.0, True, 3)
    assert r.class_weight == RetroConfig().class_weight and r.bn_weight == RetroConfig().bn_weight
    assert RetroConfig.from_distill(DistillConfig(), num_images=8).iterations == RetroConfig().iterations
    with pytest.raises(ConfigError, match="coarse"):  # not silently dropped
        RetroConfig.from_distill(DistillConfig(coarse_iterations=10), num_images=8)
    with pytest.raises(ConfigError, match="coarse"):
        RetroConfig.from_distill(DistillConfig(coarse_levels=2), num_images=8)
    with pytest.raises(ConfigError, match="first-bn-weight"):
        RetroConfig.from_distill(DistillConfig(first_bn_weight=10.0), num_images=8)


def test_total_variation():
    assert float(total_variation(torch.ones(2, 3, 5, 5))) == 0.0
    x = torch.zeros(1, 1, 2, 2)
    x[..., 0, 0] = 1.0  # vertical diffs: (1, 0) -> mean 0.5 of squares; horizontal: same
    assert float(total_variation(x)) == pytest.approx(1.0)
    assert float(total_variation(torch.randn(1, 3, 1, 1))) == 0.0
