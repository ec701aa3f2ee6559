"""Tests of zsq.fold: BatchNorm folding into conv/linear layers, paired by traced data flow."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.errors import TraceError, UnsupportedLayerError, ZsqError
from zsq.fold import PRECEDES_REASON, FoldReport, count_batchnorm, fold_batchnorm, has_batchnorm


# ----------------------------------------------------------------------------------------------
# helpers


def randomize_bn(model: nn.Module, seed: int = 0, eps: float | None = None) -> nn.Module:
    """Give every BN non-trivial running stats, affine params and (optionally) eps; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.05)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
            m.eps = eps if eps is not None else float(torch.empty(1).uniform_(1e-5, 1e-2, generator=g))
    return model.eval()


def assert_same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    scale = ya.abs().max().clamp_min(1.0)
    assert ya.shape == yb.shape
    assert (ya - yb).abs().max() <= 1e-5 * scale, float((ya - yb).abs().max())


def bn_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fold_and_check(model: nn.Module, x: torch.Tensor, seed: int = 0, eps: float | None = None):
    randomize_bn(model, seed, eps)
    before = state_copy(model)
    gm, report = fold_batchnorm(model)
    assert_same_output(model, gm, x)
    # the original is untouched
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return gm, report


# ----------------------------------------------------------------------------------------------
# models


class ConvBN(nn.Module):
    def __init__(self, bias: bool, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=bias, groups=groups)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn(self.conv(x)))))


class Conv1dBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 5, stride=2, bias=False)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 5, bias=False)
        self.bn2 = nn.BatchNorm1d(5, affine=False)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 4, 1, bias=False)
        self.down_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.down_bn(self.down(x)))


class Scrambled(nn.Module):
    """Modules defined in reverse / misleading order and with misleading names."""

    def __init__(self):
        super().__init__()
        self.bn_c = nn.BatchNorm2d(6)  # defined first, used last
        self.conv_b = nn.Conv2d(4, 6, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)  # pairs with conv_c, not conv_a
        self.conv_c = nn.Conv2d(4, 6, 1, groups=2)

    def forward(self, x):
        a = F.relu(self.bn_b(self.conv_a(x)))
        b = self.bn_a(self.conv_c(a))
        c = self.bn_c(self.conv_b(a))
        return b * c


class ConvAlsoElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.sigmoid(y)


class BNOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.bn_pool = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = self.bn_pool(self.pool(self.bn_in(x)))
        return self.head(y.mean((2, 3)))


class BNPrecedesConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(self.bn(x))


class BNAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c1(x) + self.c2(x))


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c1(x)) - self.bn(self.c2(x))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.up(x))


class DoubleBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv(x)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(x))
        return x


class StdConv(nn.Conv2d):
    """Weight-standardised conv: folding a scale into its weight would be undone."""

    zsq_leaf = True

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class SameConv(nn.Conv2d):
    """Conv with dynamic 'same' padding; declares that folding into it is valid."""

    zsq_leaf = True
    zsq_foldable = True

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        ph, pw = max(kh - 1, 0), max(kw - 1, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return self._conv_forward(x, self.weight, self.bias)


class CustomConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.std = StdConv(3, 4, 3, padding=1)
        self.bn_std = nn.BatchNorm2d(4)
        self.same = SameConv(4, 4, 3)
        self.bn_same = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_same(self.same(self.bn_std(self.std(x))))


# ----------------------------------------------------------------------------------------------
# foldable cases


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_conv_bn(bias, eps):
    torch.manual_seed(0)
    model = ConvBN(bias=bias)
    gm, report = fold_and_check(model, torch.randn(2, 8, 9, 9), eps=eps)
    assert report.folded == [("conv", "bn"), ("conv2", "bn2")]
    assert report.skipped == [] and report.num_bn_remaining == 0
    assert count_batchnorm(gm) == 0 and not has_batchnorm(gm)
    assert has_batchnorm(model) and count_batchnorm(model) == 2
    assert gm.conv.bias is not None and gm.conv2.bias is not None
    assert "bn" not in dict(gm.named_modules())
    assert isinstance(gm, torch.fx.GraphModule)


def test_depthwise_conv_bn():
    torch.manual_seed(1)
    model = ConvBN(bias=False, groups=8)
    gm, report = fold_and_check(model, torch.randn(2, 8, 7, 7), seed=3)
    assert ("conv", "bn") in report.folded and count_batchnorm(gm) == 0


def test_conv1d_bn():
    torch.manual_seed(2)
    gm, report = fold_and_check(Conv1dBN(), torch.randn(3, 3, 20))
    assert report.folded == [("conv", "bn")]


def test_linear_bn1d_including_affine_false():
    torch.manual_seed(3)
    gm, report = fold_and_check(MLP(), torch.randn(6, 10))
    assert report.folded == [("fc1", "bn1"), ("fc2", "bn2")]
    assert count_batchnorm(gm) == 0


def test_residual_block():
    torch.manual_seed(4)
    gm, report = fold_and_check(Residual(), torch.randn(2, 4, 8, 8))
    assert sorted(report.folded) == [("conv1", "bn1"), ("conv2", "bn2"), ("down", "down_bn")]
    assert count_batchnorm(gm) == 0


def test_pairing_follows_data_flow_not_definition_order():
    torch.manual_seed(5)
    gm, report = fold_and_check(Scrambled(), torch.randn(2, 3, 6, 6))
    assert sorted(report.folded) == [("conv_a", "bn_b"), ("conv_b", "bn_c"), ("conv_c", "bn_a")]
    assert count_batchnorm(gm) == 0


def test_reversed_sequential_definition():
    torch.manual_seed(6)
    layers = {
        "bn2": nn.BatchNorm2d(5),
        "conv2": nn.Conv2d(4, 5, 3),
        "bn1": nn.BatchNorm2d(4),
        "conv1": nn.Conv2d(3, 4, 3),
    }

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in layers.items():  # registration order: bn2, conv2, bn1, conv1
                setattr(self, k, v)

        def forward(self, x):
            return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    gm, report = fold_and_check(Net(), torch.randn(2, 3, 10, 10))
    assert report.folded == [("conv1", "bn1"), ("conv2", "bn2")]


def test_nested_sequential_names_kept():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4)),
    )
    gm, report = fold_and_check(model, torch.randn(2, 3, 9, 9))
    assert report.folded == [("0.0", "0.1"), ("1.0", "1.1")]
    names = dict(gm.named_modules())
    assert isinstance(names["0.0"], nn.Conv2d) and "0.1" not in names
    assert names["0.0"].weight.shape == model[0][0].weight.shape


def test_conv_bn_bn_chain_folds_both():
    torch.manual_seed(8)
    gm, report = fold_and_check(DoubleBN(), torch.randn(2, 3, 7, 7))
    assert report.folded == [("conv", "bn1"), ("conv", "bn2")]
    assert count_batchnorm(gm) == 0


# ----------------------------------------------------------------------------------------------
# skipped cases (output must stay exact)


def test_conv_output_used_elsewhere_is_skipped():
    torch.manual_seed(9)
    gm, report = fold_and_check(ConvAlsoElsewhere(), torch.randn(2, 3, 6, 6))
    assert report.folded == []
    [(bn, reason)] = report.skipped
    assert bn == "bn" and "also feeds" in reason and "conv" in reason
    assert count_batchnorm(gm) == 1 and report.num_bn_remaining == 1


def test_bn_on_graph_input_and_after_pooling_is_skipped():
    torch.manual_seed(10)
    gm, report = fold_and_check(BNOnInput(), torch.randn(2, 3, 8, 8))
    reasons = dict(report.skipped)
    assert set(reasons) == {"bn_in", "bn_pool"} and report.folded == []
    assert "graph input" in reasons["bn_in"]
    assert "MaxPool2d 'pool'" in reasons["bn_pool"]


def test_bn_preceding_conv_is_skipped():
    torch.manual_seed(11)
    gm, report = fold_and_check(BNPrecedesConv(), torch.randn(2, 3, 6, 6))
    assert report.skipped == [("bn", PRECEDES_REASON)]
    assert report.skipped[0][1] == "BN precedes its conv; folding into the next layer is not supported"


def test_bn_after_add_is_skipped():
    torch.manual_seed(12)
    gm, report = fold_and_check(BNAfterAdd(), torch.randn(2, 3, 6, 6))
    [(bn, reason)] = report.skipped
    assert bn == "bn" and "add" in reason


def test_shared_bn_is_skipped():
    torch.manual_seed(13)
    gm, report = fold_and_check(SharedBN(), torch.randn(2, 3, 6, 6))
    assert report.folded == []
    [(bn, reason)] = report.skipped
    assert bn == "bn" and "2 times" in reason


def test_shared_conv_is_skipped():
    torch.manual_seed(14)
    gm, report = fold_and_check(SharedConv(), torch.randn(2, 3, 6, 6))
    assert report.folded == [] and {b for b, _ in report.skipped} == {"bn1", "bn2"}
    assert all("2 times" in r for _, r in report.skipped)


def test_conv_transpose_is_skipped():
    torch.manual_seed(15)
    gm, report = fold_and_check(Transposed(), torch.randn(2, 3, 4, 4))
    [(bn, reason)] = report.skipped
    assert "ConvTranspose2d" in reason and "not supported" in reason


def test_bn_without_running_stats_is_skipped():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    gm, report = fold_and_check(model, torch.randn(2, 3, 6, 6))
    [(bn, reason)] = report.skipped
    assert bn == "1" and "track_running_stats" in reason


def test_custom_forward_conv_needs_opt_in():
    torch.manual_seed(17)
    gm, report = fold_and_check(CustomConvs(), torch.randn(2, 3, 7, 7))
    assert report.folded == [("same", "bn_same")]
    [(bn, reason)] = report.skipped
    assert bn == "bn_std" and "zsq_foldable" in reason


def test_conv_with_hook_is_skipped():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].register_forward_hook(lambda m, i, o: None)
    gm, report = fold_and_check(model, torch.randn(2, 3, 6, 6))
    assert report.folded == [] and "hook" in report.skipped[0][1]


def test_mixed_model_report():
    torch.manual_seed(19)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.stem_bn = nn.BatchNorm2d(4)
            self.post_add_bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = torch.relu(self.stem_bn(self.stem(x)))
            return self.post_add_bn(y + y)

    model = Mixed()
    gm, report = fold_and_check(model, torch.randn(2, 3, 6, 6))
    assert report.folded == [("stem", "stem_bn")]
    assert [b for b, _ in report.skipped] == ["post_add_bn"]
    assert str(report).startswith("folded 1 BatchNorm layer into conv/linear; 1 left unfolded")
    assert "post_add_bn" in str(report)
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["folded"] == [{"conv": "stem", "bn": "stem_bn"}] and d["num_bn_remaining"] == 1
    assert FoldReport.from_dict(d) == report
    assert bn_names(gm) == {"post_add_bn"}


# ----------------------------------------------------------------------------------------------
# behaviour of the call itself


def test_report_str_for_full_fold():
    model = randomize_bn(Residual())
    _, report = fold_batchnorm(model)
    assert str(report) == "folded 3 BatchNorm layers into conv/linear; 0 left unfolded"


def test_training_flag_device_dtype_preserved():
    torch.manual_seed(20)
    model = randomize_bn(ConvBN(bias=False)).double()
    model.train()
    gm, report = fold_batchnorm(model)
    assert gm.training and model.training
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    assert gm.conv.bias.dtype == torch.float64 and gm.conv.bias.device == model.conv.weight.device
    # folding uses running statistics: it matches the eval-mode model
    gm.eval()
    model.eval()
    assert_same_output(model, gm, torch.randn(2, 8, 5, 5, dtype=torch.float64))


def test_original_not_modified_and_inplace():
    torch.manual_seed(21)
    model = randomize_bn(ConvBN(bias=False))
    before = state_copy(model)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = model(x)
    gm, _ = fold_batchnorm(model)
    assert model.conv.bias is None and bn_names(model) == {"bn", "bn2"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert gm.conv is not model.conv

    gm2, report = fold_batchnorm(model, inplace=True)
    assert gm2.conv is model.conv and model.conv.bias is not None  # layers modified in place
    with torch.no_grad():
        assert torch.allclose(gm2(x), ref, atol=1e-5)
    assert report.num_bn_remaining == 0


def test_graph_module_input_and_idempotent():
    torch.manual_seed(22)
    model = randomize_bn(Residual())
    gm, _ = fold_batchnorm(model)
    gm2, report = fold_batchnorm(gm)
    assert report.folded == [] and report.skipped == []
    assert gm2 is not gm
    assert_same_output(model, gm2, torch.randn(1, 4, 5, 5))


def test_untraceable_model_raises_trace_error():
    with pytest.raises(TraceError) as info:
        fold_batchnorm(Untraceable())
    assert isinstance(info.value, ZsqError)


@pytest.mark.filterwarnings("ignore")
def test_uncopyable_model_raises_zsq_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    torch.nn.utils.weight_norm(model[0])  # legacy hooks: deepcopy is not supported
    with pytest.raises(UnsupportedLayerError, match="inplace=True"):
        fold_batchnorm(model)
    gm, report = fold_batchnorm(model, inplace=True)  # hooks on the conv: skipped, not broken
    assert report.folded == [] and "hook" in report.skipped[0][1]


def test_count_and_has_batchnorm():
    assert count_batchnorm(nn.Linear(2, 2)) == 0 and not has_batchnorm(nn.Linear(2, 2))
    bn = nn.BatchNorm1d(3)
    shared = nn.Sequential(bn, nn.ReLU(), bn, nn.BatchNorm3d(2))
    assert count_batchnorm(shared) == 2 and has_batchnorm(shared)


def _has_tiny() -> bool:
    try:
        return importlib.util.find_spec("zsq.models.tiny") is not None
    except Exception:
        return False


@pytest.mark.skipif(not _has_tiny(), reason="zsq.models.tiny not available")
def test_tiny_cnn():
    from zsq.models import tiny

    torch.manual_seed(23)
    model = tiny.tiny_cnn()
    n_bn = count_batchnorm(model)
    randomize_bn(model, seed=5)
    x = torch.randn(2, 3, 32, 32)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        pytest.skip("tiny_cnn does not take 3x32x32 input")
    gm, report = fold_and_check(model, x, seed=5)
    assert report.num_folded + report.num_bn_remaining == n_bn
    assert count_batchnorm(gm) == report.num_bn_remaining


def test_depthwise_and_pointwise_conv_predicates():
    from zsq.graph import is_depthwise_conv, is_pointwise_conv

    dw = nn.Conv2d(8, 8, 3, groups=8)
    pw = nn.Conv2d(8, 16, 1)
    pw1d = nn.Conv1d(8, 16, 1)
    grouped_1x1 = nn.Conv2d(8, 16, 1, groups=2)
    dense_3x3 = nn.Conv2d(8, 16, 3)
    assert is_depthwise_conv(dw) and not is_pointwise_conv(dw)
    assert is_pointwise_conv(pw) and is_pointwise_conv(pw1d) and not is_depthwise_conv(pw)
    assert not is_pointwise_conv(grouped_1x1) and not is_depthwise_conv(grouped_1x1)
    assert not is_pointwise_conv(dense_3x3) and not is_depthwise_conv(dense_3x3)
    assert not is_pointwise_conv(None) and not is_depthwise_conv(nn.Linear(4, 4))
