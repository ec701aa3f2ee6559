"""zsq.distill: ZeroQ distilled data, Gaussian baseline, image grid; model state always restored."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn as nn
from PIL import Image

from zsq.bn_stats import batchnorm_targets, bn_loss, capture_bn_inputs, channel_stats
from zsq.config import DistillConfig
from zsq.distill import DistillResult, distill, gaussian_inputs, natural_input_stats, save_image_grid
from zsq.distill.zeroq import distill_loss
from zsq.errors import ConfigError, NoBatchNormError
from zsq.fold import fold_batchnorm
from zsq.models.preprocessing import Preprocessing

FAST = dict(num_batches=1, batch_size=8, iterations=30, lr=0.2, flip=False, jitter=0)  # views: their own tests


def _cfg(**kw) -> DistillConfig:
    return DistillConfig(**{**FAST, **kw})


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _state(model: nn.Module):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_state_equal(model: nn.Module, state) -> None:
    modes, flags, sd = state
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in sd.items()), "parameters or BN statistics changed"
    for m in _bn_modules(model):
        assert len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0


def _make_tick(n_ok: int):
    """A counter shared by every (deep) copy of the module holding it: functions are not copied."""
    calls = [0]

    def tick() -> int:
        calls[0] += 1
        if calls[0] > n_ok:
            raise RuntimeError("simulated failure inside forward")
        return calls[0]

    tick.calls = calls  # type: ignore[attr-defined]
    return tick


class Bomb(nn.Module):
    """Identity that raises after ``n_ok`` calls (a leaf for zsq's tracer, so it also fires in traced copies)."""

    zsq_leaf = True

    def __init__(self, n_ok: int):
        super().__init__()
        self.tick = _make_tick(n_ok)

    @property
    def calls(self) -> int:
        return self.tick.calls[0]

    def forward(self, x):
        self.tick()
        return x


class RaisesAfter(nn.Module):
    """Wraps a model; its forward raises after ``n_ok`` successful calls (after the BN layers ran)."""

    def __init__(self, inner: nn.Module, n_ok: int):
        super().__init__()
        self.inner = inner
        self.bomb = Bomb(n_ok)

    def forward(self, x):
        return self.bomb(self.inner(x))


# --------------------------------------------------------------------------------------------
# ZeroQ distillation
# --------------------------------------------------------------------------------------------


def test_distill_lowers_bn_loss(tiny_model, tiny_preprocessing):
    res = distill(tiny_model, tiny_preprocessing, _cfg(seed=1), progress=False)
    assert isinstance(res, DistillResult)
    assert res.inputs.shape == (8, 3, 16, 16)
    assert res.iterations == [30]
    assert len(res.losses) == len(res.initial_losses) == 1
    assert res.losses[0] < 0.9 * res.initial_losses[0]
    # The distilled inputs match the BN statistics better than the Gaussian baseline.
    assert distill_loss(tiny_model, res.inputs) < distill_loss(tiny_model, gaussian_inputs(8, tiny_preprocessing, seed=1))
    d = res.to_dict()
    assert d["num_inputs"] == 8 and d["iterations"] == [30] and d["seconds"] >= 0


def test_reported_loss_is_the_bn_loss_of_the_model(tiny_model, tiny_preprocessing):
    """The loss distillation reports is ZeroQ's BN loss of the (unfolded) model at its inputs: one
    near-zero step leaves the inputs at their initial values, whose BN loss we recompute with hooks
    on the user's own BatchNorm layers."""
    res = distill(tiny_model, tiny_preprocessing, _cfg(iterations=1, lr=1e-7, input_weight=0.0), progress=False)
    targets = batchnorm_targets(tiny_model)
    with torch.no_grad(), capture_bn_inputs(targets) as stats:
        tiny_model(res.inputs)
        expected = float(bn_loss(targets, stats))
    assert res.initial_losses[0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert distill_loss(tiny_model, res.inputs) == pytest.approx(expected, rel=1e-6)
    # with random views the final loss reported is still that of the returned inputs, not of the last view
    res = distill(tiny_model, tiny_preprocessing, _cfg(iterations=5, input_weight=0.0, flip=True, jitter=3),
                  progress=False)
    assert res.losses[0] == pytest.approx(distill_loss(tiny_model, res.inputs), rel=1e-4, abs=1e-6)


def test_distill_several_batches(tiny_model, tiny_preprocessing):
    res = distill(tiny_model, tiny_preprocessing, _cfg(num_batches=2, batch_size=3, iterations=5), progress=False)
    assert res.inputs.shape == (6, 3, 16, 16)
    assert len(res.losses) == len(res.initial_losses) == len(res.iterations) == 2
    assert not torch.equal(res.inputs[:3], res.inputs[3:])


def test_distill_is_deterministic_per_seed(tiny_model, tiny_preprocessing):
    a = distill(tiny_model, tiny_preprocessing, _cfg(seed=3, iterations=10), progress=False)
    b = distill(tiny_model, tiny_preprocessing, _cfg(seed=3, iterations=10), progress=False)
    c = distill(tiny_model, tiny_preprocessing, _cfg(seed=4, iterations=10), progress=False)
    assert torch.equal(a.inputs, b.inputs)
    assert a.losses == b.losses and a.initial_losses == b.initial_losses
    assert not torch.equal(a.inputs, c.inputs)


def test_flip_and_jitter_augmentation(tiny_model, tiny_preprocessing):
    """DeepInversion-style augmentation changes only the view of each step: deterministic per seed, a different
    result from plain distillation, still lowering the BN loss of the un-augmented inputs."""
    zq = importlib.import_module("zsq.distill.zeroq")  # zsq.distill is also the function

    plain = distill(tiny_model, tiny_preprocessing, _cfg(seed=2, iterations=30, flip=False, jitter=0), progress=False)
    aug = [distill(tiny_model, tiny_preprocessing, _cfg(seed=2, iterations=30, flip=True, jitter=3), progress=False)
           for _ in range(2)]
    assert torch.equal(aug[0].inputs, aug[1].inputs)
    assert not torch.equal(aug[0].inputs, plain.inputs)
    assert distill_loss(tiny_model, aug[0].inputs) < 0.9 * aug[0].initial_losses[0]
    # the view: a flip and a circular shift of at most `jitter` pixels, never a change of the tensor itself
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        v = zq._augmented(x, True, 2, gen)
        matches = [(f, dy, dx) for f in (0, 1) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(v, torch.roll(x.flip(-1) if f else x, shifts=(dy, dx), dims=(-2, -1)))]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 5 and {m[0] for m in seen} == {0, 1}
    assert zq._augmented(x, False, 0, gen) is x


def test_views_on_by_default_with_a_size_relative_jitter(tiny_model, tiny_preprocessing):
    """flip on and jitter None (DeepInversion's 30 px at 224, scaled with the shorter side) by default; the default
    is the same computation as the explicit resolved jitter, and differs from views off."""
    from zsq.config import default_jitter

    cfg = DistillConfig()
    assert cfg.flip is True and cfg.jitter is None
    assert (default_jitter((224, 224)), default_jitter((32, 32)), default_jitter((16, 20))) == (30, 4, 2)
    assert cfg.resolved_jitter((32, 32)) == 4 and DistillConfig(jitter=0).resolved_jitter((224, 224)) == 0
    d = distill(tiny_model, tiny_preprocessing, _cfg(seed=1, iterations=10, flip=True, jitter=None), progress=False)
    e = distill(tiny_model, tiny_preprocessing, _cfg(seed=1, iterations=10, flip=True, jitter=2), progress=False)
    off = distill(tiny_model, tiny_preprocessing, _cfg(seed=1, iterations=10, flip=False, jitter=0), progress=False)
    assert torch.equal(d.inputs, e.inputs) and not torch.equal(d.inputs, off.inputs)


def test_coarse_start(tiny_model, tiny_preprocessing, monkeypatch):
    """DeepInversion's multi-resolution start: the model first sees inputs coarse_factor times smaller, then the
    upsampled inputs at full size; deterministic per seed, recorded in the result, a different result from no coarse
    phase, and still lowering the BN loss within the pixel range."""
    zq = importlib.import_module("zsq.distill.zeroq")
    seen: list[tuple[int, int]] = []
    real = zq._augmented

    def spy(x, flip, jitter, gen):
        seen.append((tuple(x.shape[-2:]), jitter))
        return real(x, flip, jitter, gen)

    monkeypatch.setattr(zq, "_augmented", spy)
    h, w = tiny_preprocessing.input_size
    cfg = _cfg(seed=3, iterations=6, coarse_iterations=4, flip=True, jitter=4)
    a = distill(tiny_model, tiny_preprocessing, cfg, progress=False)
    assert seen == [((h // 2, w // 2), 2)] * 4 + [((h, w), 4)] * 6
    b = distill(tiny_model, tiny_preprocessing, cfg, progress=False)
    plain = distill(tiny_model, tiny_preprocessing, _cfg(seed=3, iterations=6, flip=True, jitter=4), progress=False)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, plain.inputs)
    assert a.inputs.shape == plain.inputs.shape and a.iterations == [6]
    assert a.to_dict()["coarse"] == {"iterations": 4, "size": [h // 2, w // 2], "levels": [[h // 2, w // 2]]}
    assert plain.to_dict()["coarse"] is None
    lo, hi = (t.view(1, -1, 1, 1) for t in tiny_preprocessing.input_range())
    assert bool(((a.inputs >= lo - 1e-6) & (a.inputs <= hi + 1e-6)).all())
    monkeypatch.setattr(zq, "_augmented", real)
    long = distill(tiny_model, tiny_preprocessing, _cfg(seed=3, iterations=30, coarse_iterations=30), progress=False)
    assert distill_loss(tiny_model, long.inputs) < 0.9 * long.initial_losses[0]
    with pytest.raises(ConfigError, match="coarse_factor"):
        distill(tiny_model, tiny_preprocessing, _cfg(coarse_iterations=2, coarse_factor=h), progress=False)


def test_coarse_pyramid(tiny_model, tiny_preprocessing, monkeypatch):
    """coarse_levels=2: coarse_iterations steps at 1/4 then at 1/2 of the size per side (jitter scaled alike), then
    full size; recorded in the result; one level is the plain coarse start; a pyramid too small is refused."""
    zq = importlib.import_module("zsq.distill.zeroq")
    seen: list[tuple[tuple[int, int], int]] = []
    real = zq._augmented

    def spy(x, flip, jitter, gen):
        seen.append((tuple(x.shape[-2:]), jitter))
        return real(x, flip, jitter, gen)

    monkeypatch.setattr(zq, "_augmented", spy)
    pre = dataclasses.replace(tiny_preprocessing, input_size=(32, 32))
    cfg = _cfg(seed=5, iterations=3, coarse_iterations=2, coarse_levels=2, flip=True, jitter=8)
    a = distill(tiny_model, pre, cfg, progress=False)
    assert seen == [((8, 8), 2)] * 2 + [((16, 16), 4)] * 2 + [((32, 32), 8)] * 3
    assert a.inputs.shape[-2:] == (32, 32)
    assert a.to_dict()["coarse"] == {"iterations": 2, "size": [16, 16], "levels": [[8, 8], [16, 16]]}
    assert torch.equal(a.inputs, distill(tiny_model, pre, cfg, progress=False).inputs)
    one = distill(tiny_model, pre, dataclasses.replace(cfg, coarse_levels=1), progress=False)
    assert not torch.equal(a.inputs, one.inputs) and one.to_dict()["coarse"]["levels"] == [[16, 16]]
    assert cfg.resolved_coarse_sizes((224, 224)) == [(56, 56), (112, 112)]
    with pytest.raises(ConfigError, match="fewer coarse_levels"):
        distill(tiny_model, pre, dataclasses.replace(cfg, coarse_levels=3), progress=False)
    for bad in (0, True, 1.5):
        with pytest.raises(ConfigError, match="coarse_levels"):
            DistillConfig(coarse_levels=bad)


def test_step_defaults_by_input_size():
    """iterations / coarse_iterations None: 100 full-size steps and no coarse phase up to 128x128 pixels (CIFAR); for
    ImageNet-sized inputs the coarse start and more full-size steps. Explicit values are kept."""
    from zsq.config import DEFAULT_COARSE_ITERS_LARGE, DEFAULT_DISTILL_ITERS_LARGE

    cfg = DistillConfig()
    assert cfg.iterations is None and cfg.coarse_iterations is None
    assert (cfg.resolved_iterations((32, 32)), cfg.resolved_coarse_iterations((32, 32))) == (100, 0)
    assert cfg.resolved_coarse_size((32, 32)) is None and cfg.resolved_coarse_size((128, 128)) is None
    assert cfg.resolved_iterations((224, 224)) == DEFAULT_DISTILL_ITERS_LARGE > 100
    assert cfg.resolved_coarse_iterations((224, 224)) == DEFAULT_COARSE_ITERS_LARGE > 0
    assert cfg.resolved_coarse_size((224, 240)) == (112, 120)
    assert cfg.first_bn_weight is None and cfg.resolved_first_bn_weight((32, 32)) == 1.0
    assert cfg.resolved_first_bn_weight((224, 224)) == 10.0
    assert DistillConfig(first_bn_weight=2).resolved_first_bn_weight((224, 224)) == 2.0
    explicit = DistillConfig(iterations=7, coarse_iterations=0)
    assert (explicit.resolved_iterations((224, 224)), explicit.resolved_coarse_size((224, 224))) == (7, None)


def test_channels_last_layout_is_the_same_computation(tiny_model, tiny_preprocessing):
    """The default channels-last layout only changes float rounding; the inputs come back contiguous."""
    a = distill(tiny_model, tiny_preprocessing, _cfg(seed=5, iterations=10), progress=False)
    b = distill(tiny_model, tiny_preprocessing, _cfg(seed=5, iterations=10, channels_last=False), progress=False)
    assert a.inputs.is_contiguous() and b.inputs.is_contiguous()
    torch.testing.assert_close(a.inputs, b.inputs, rtol=0, atol=1e-3)
    assert a.losses[0] == pytest.approx(b.losses[0], rel=1e-3)
    assert all(p.is_contiguous() for p in tiny_model.parameters())  # the user's model keeps its layout


def test_distill_does_not_depend_on_global_rng(tiny_model, tiny_preprocessing):
    torch.manual_seed(123)
    a = distill(tiny_model, tiny_preprocessing, _cfg(iterations=3), progress=False)
    torch.manual_seed(456)
    b = distill(tiny_model, tiny_preprocessing, _cfg(iterations=3), progress=False)
    assert torch.equal(a.inputs, b.inputs)


@pytest.mark.parametrize("init", ["gaussian", "uniform"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "plateau"])
def test_distill_outputs_within_input_range(tiny_model, tiny_preprocessing, init, schedule):
    # lr large enough that unclipped inputs would leave the range
    res = distill(tiny_model, tiny_preprocessing, _cfg(iterations=8, lr=1.0, init=init, schedule=schedule), progress=False)
    lo, hi = tiny_preprocessing.input_range()
    x = res.inputs
    assert torch.isfinite(x).all()
    assert (x >= lo.view(1, -1, 1, 1)).all() and (x <= hi.view(1, -1, 1, 1)).all()


def test_distill_range_follows_preprocessing(tiny_model):
    pre = Preprocessing(input_size=(12, 10), resize=None, mean=(0.2, 0.5, 0.8), std=(0.1, 0.3, 0.2))
    res = distill(tiny_model, pre, _cfg(iterations=5, batch_size=2, lr=1.0), progress=False)
    assert res.inputs.shape == (2, 3, 12, 10)
    lo, hi = pre.input_range()
    assert torch.allclose(lo, torch.tensor([-2.0, -5.0 / 3, -4.0]))
    assert (res.inputs >= lo.view(1, -1, 1, 1)).all() and (res.inputs <= hi.view(1, -1, 1, 1)).all()


def test_early_stop(tiny_model, tiny_preprocessing):
    res = distill(tiny_model, tiny_preprocessing, _cfg(iterations=50, early_stop_loss=1e6), progress=False)
    assert res.iterations == [1]


def test_distill_leaves_model_untouched(tiny_model, tiny_preprocessing):
    tiny_model.train()
    tiny_model.bn2.eval()
    tiny_model.fc.weight.requires_grad_(False)
    state = _state(tiny_model)
    distill(tiny_model, tiny_preprocessing, _cfg(iterations=5), progress=False)
    _assert_state_equal(tiny_model, state)  # running stats unchanged: distillation ran in eval mode
    assert all(p.grad is None for p in tiny_model.parameters())


@pytest.mark.parametrize("n_ok", [0, 3])
def test_hooks_removed_and_state_restored_after_exception(tiny_model, tiny_preprocessing, n_ok):
    wrapped = RaisesAfter(tiny_model, n_ok)
    wrapped.train()
    tiny_model.bn1.eval()
    tiny_model.conv1.weight.requires_grad_(False)
    state = _state(wrapped)
    with pytest.raises(RuntimeError, match="simulated failure"):
        distill(wrapped, tiny_preprocessing, _cfg(iterations=10), progress=False)
    assert wrapped.bomb.calls == n_ok + 1
    _assert_state_equal(wrapped, state)
    assert tiny_model.training and not tiny_model.bn1.training
    assert not tiny_model.conv1.weight.requires_grad and tiny_model.conv2.weight.requires_grad
    # Still fully usable afterwards.
    res = distill(tiny_model, tiny_preprocessing, _cfg(iterations=2), progress=False)
    assert res.inputs.shape[0] == 8


def test_distill_without_batchnorm_raises(tiny_model_nobn, tiny_model, tiny_preprocessing):
    with pytest.raises(NoBatchNormError, match="BatchNorm") as info:
        distill(tiny_model_nobn, tiny_preprocessing, _cfg(), progress=False)
    assert isinstance(info.value, ValueError)
    folded, _ = fold_batchnorm(tiny_model)
    with pytest.raises(NoBatchNormError):
        distill(folded, tiny_preprocessing, _cfg(), progress=False)
    with pytest.raises(NoBatchNormError):
        distill_loss(tiny_model_nobn, torch.zeros(2, 3, 16, 16))


@pytest.mark.parametrize(
    "kwargs", [dict(iterations=0), dict(batch_size=-1), dict(num_batches=True), dict(lr=0.0), dict(schedule="step"),
               dict(init="zeros"), dict(input_weight=-1.0), dict(early_stop_loss=-0.1), dict(channels_last=1),
               dict(flip=1), dict(jitter=-1), dict(jitter=2.5), dict(jitter=True), dict(coarse_iterations=-1),
               dict(coarse_iterations=1.5), dict(coarse_factor=1), dict(coarse_factor=True), dict(first_bn_weight=0),
               dict(first_bn_weight=-1.0), dict(first_bn_weight=True)],
)
def test_distill_config_validation(kwargs):
    with pytest.raises(ConfigError):
        DistillConfig(**kwargs)


def test_distill_config_round_trip():
    cfg = _cfg(seed=9, schedule="plateau")
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        DistillConfig.from_dict({"iters": 3})


# --------------------------------------------------------------------------------------------
# BN statistics helpers
# --------------------------------------------------------------------------------------------


def test_bn_loss_zero_when_statistics_match(tiny_model):
    targets = batchnorm_targets(tiny_model)
    assert [t.name for t in targets] == [n for n, m in tiny_model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    stats = {t.name: (t.mean.clone(), t.std.clone()) for t in targets}
    assert float(bn_loss(targets, stats)) == 0.0
    stats[targets[0].name] = (targets[0].mean + 1.0, targets[0].std)
    assert float(bn_loss(targets, stats)) == pytest.approx(1.0 / len(targets))


def test_bn_loss_first_weight_is_the_first_layer_reached(tiny_model, tiny_preprocessing):
    """first_weight scales the term of the BN layer first in ``stats`` (execution order as the hooks fill it), not
    the first in definition order; distill with first_bn_weight optimises a different objective."""
    targets = batchnorm_targets(tiny_model)
    last = targets[-1]
    stats = {t.name: (t.mean.clone(), t.std.clone()) for t in reversed(targets)}  # the last layer "ran" first
    stats[last.name] = (last.mean + 1.0, last.std)
    stats[targets[0].name] = (targets[0].mean + 1.0, targets[0].std)
    n = len(targets)
    assert float(bn_loss(targets, stats)) == pytest.approx(2.0 / n)
    assert float(bn_loss(targets, stats, first_weight=10.0)) == pytest.approx(11.0 / n)
    a = distill(tiny_model, tiny_preprocessing, _cfg(seed=2, iterations=5), progress=False)
    b = distill(tiny_model, tiny_preprocessing, _cfg(seed=2, iterations=5, first_bn_weight=10.0), progress=False)
    assert not torch.equal(a.inputs, b.inputs)


def test_channel_stats():
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    mean, std = channel_stats(x)
    assert torch.allclose(mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std, x.std(dim=(0, 2, 3), unbiased=False), atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (5, 3, 7), (6, 2)])
def test_channel_stats_gradient(shape):
    """The hand-written backward equals autograd's gradient of the textbook formula, for any rank."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    assert torch.autograd.gradcheck(channel_stats, (x,))
    dims = [0] + list(range(2, x.dim()))
    g_mean, g_std = torch.randn(shape[1], generator=gen, dtype=torch.float64), torch.randn(shape[1], generator=gen,
                                                                                           dtype=torch.float64)
    m, s = channel_stats(x)
    got = torch.autograd.grad((m * g_mean).sum() + (s * g_std).sum(), x)[0]
    v, m0 = torch.var_mean(x, dim=dims, correction=0)
    want = torch.autograd.grad((m0 * g_mean).sum() + (torch.sqrt(v + 1e-12) * g_std).sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="N, C"):
        channel_stats(torch.zeros(4))


def test_capture_bn_inputs_removes_hooks_on_exception(tiny_model):
    targets = batchnorm_targets(tiny_model)
    with pytest.raises(KeyError):
        with capture_bn_inputs(targets) as stats:
            assert all(len(m._forward_pre_hooks) == 1 for m in _bn_modules(tiny_model))
            tiny_model(torch.randn(2, 3, 16, 16))
            assert set(stats) == {t.name for t in targets}
            raise KeyError("x")
    assert all(len(m._forward_pre_hooks) == 0 for m in _bn_modules(tiny_model))


# --------------------------------------------------------------------------------------------
# Gaussian baseline and input statistics
# --------------------------------------------------------------------------------------------


def test_gaussian_inputs(tiny_preprocessing):
    x = gaussian_inputs(64, tiny_preprocessing, seed=5)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    lo, hi = tiny_preprocessing.input_range()
    assert (x >= lo.view(1, -1, 1, 1)).all() and (x <= hi.view(1, -1, 1, 1)).all()
    # Standard normal (clipped at +-2 for this preprocessing): mean ~0, std a bit below 1, some clipping.
    assert abs(float(x.mean())) < 0.05
    assert 0.8 < float(x.std()) < 1.0
    assert bool((x == hi.view(1, -1, 1, 1)).any()) and bool((x == lo.view(1, -1, 1, 1)).any())
    assert torch.equal(x, gaussian_inputs(64, tiny_preprocessing, seed=5))
    assert not torch.equal(x, gaussian_inputs(64, tiny_preprocessing, seed=6))
    assert torch.equal(gaussian_inputs(8, tiny_preprocessing, seed=5), x[:8])


def test_gaussian_inputs_do_not_touch_global_rng(seed, tiny_preprocessing):
    state = torch.get_rng_state()
    gaussian_inputs(4, tiny_preprocessing, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_natural_input_stats():
    imagenet = Preprocessing()
    m, s = natural_input_stats(imagenet)
    assert torch.allclose(m, torch.zeros(3), atol=1e-6) and torch.allclose(s, torch.ones(3), atol=1e-6)
    pre = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    m, s = natural_input_stats(pre)
    assert torch.allclose(m, (torch.tensor([0.485, 0.456, 0.406]) - 0.5) / 0.5)


# --------------------------------------------------------------------------------------------
# Image grid
# --------------------------------------------------------------------------------------------


def test_save_image_grid_writes_png(tmp_path, tiny_preprocessing):
    x = gaussian_inputs(5, tiny_preprocessing, seed=0)
    path = save_image_grid(x, tiny_preprocessing, tmp_path / "sub" / "grid.png")
    assert path.exists()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        # 5 images of 16x16 -> 3 columns x 2 rows with 2 px padding, upscaled 96 // 16 = 6 times.
        assert im.size == ((3 * 18 + 2) * 6, (2 * 18 + 2) * 6)
        im.load()


def test_save_image_grid_limits_images(tmp_path):
    pre = Preprocessing(input_size=(100, 100), resize=None)
    x = torch.zeros(10, 3, 100, 100)
    path = save_image_grid(x, pre, tmp_path / "g.png", max_images=4, pad=0)
    with Image.open(path) as im:
        assert im.size == (200, 200)  # 2x2 grid, no upscaling for large images
        assert im.getpixel((50, 50)) == tuple(round(v * 255) for v in pre.mean)
