"""zsq.quant.apply.quantize (+ modules): quantizer placement, overrides/skips, errors, accuracy vs bits."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_preprocessing
from zsq.calibrate import calibrate
from zsq.config import LayerOverride, QuantConfig
from zsq.errors import ConfigError, NotCalibratedError, ScopeError, ZsqError
from zsq.fold import fold_batchnorm
from zsq.graph import is_add as is_add_node
from zsq.graph import is_relu
from zsq.quant import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer, act_quantizers, quantize, weight_layers
from zsq.quant import primitives as P

NO_PROGRESS = dict(progress=False)


class BranchNet(nn.Module):
    """conv1 -> relu -> a; a feeds conv_a, conv_b (depthwise) and a residual add; b + c; pool; linear.

    Expected activation quantizers: x (conv1 input), a (shared by conv_a, conv_b and the add), b and c
    (add inputs), s (add output, also the next add's input), s2 (second add output), flatten (fc input).
    """

    def __init__(self, c: int = 8, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv_a = nn.Conv2d(c, c, 3, padding=1)
        self.conv_b = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        b = self.conv_a(a)
        c = self.conv_b(a)
        s = b + c
        s2 = s + a
        return self.fc(torch.flatten(self.pool(s2), 1))


BRANCH_LAYERS = ["conv1", "conv_a", "conv_b", "fc"]


class SharedLayerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


@pytest.fixture
def branch(seed):
    return BranchNet().eval()


@pytest.fixture
def branch_inputs(seed):
    return torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(42))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _is_aq(gm: fx.GraphModule, node) -> bool:
    return (
        isinstance(node, fx.Node) and node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ActQuantizer)
    )


def _layer_node(gm: fx.GraphModule, name: str) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == name]
    assert len(nodes) == 1, name
    return nodes[0]


def input_quantizer(gm: fx.GraphModule, layer: str) -> ActQuantizer | None:
    """The activation quantizer feeding ``layer`` (None when its input is not quantized)."""
    arg = _layer_node(gm, layer).args[0]
    return gm.get_submodule(str(arg.target)) if _is_aq(gm, arg) else None


def _add_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    import operator

    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]


def check_placement_invariants(gm: fx.GraphModule) -> None:
    """Every quantized layer reads a quantized tensor; every add has quantized inputs and output;
    no tensor is quantized twice; each quantizer is called exactly once."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if _is_aq(gm, n):
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
            assert not _is_aq(gm, n.args[0]), f"{n.target} quantizes an already quantized tensor"
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), (QuantConv2d, QuantLinear)):
            assert _is_aq(gm, n.args[0]), f"input of {n.target} is not quantized"
    for add in _add_nodes(gm):
        assert _is_aq(gm, add.args[0]) and _is_aq(gm, add.args[1]), "add inputs must be quantized"
        users = list(add.users)
        if len(users) == 1 and is_relu(gm, users[0]):  # relu(a + b): quantized after the ReLU
            users = list(users[0].users)
        assert users and all(_is_aq(gm, u) for u in users), "add output (or its ReLU) must be quantized"
    assert all(v == 1 for v in calls.values()), calls
    assert set(calls) == set(act_quantizers(gm))


def _folded(model: nn.Module) -> nn.Module:
    folded, report = fold_batchnorm(model)
    assert report.num_folded > 0
    return folded


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


def test_placement_branch_net(branch):
    q = quantize(branch)
    rep = q.zsq_report
    assert rep.num_weight_quantizers == 4
    assert rep.num_act_quantizers == 7
    assert len(act_quantizers(q)) == 7
    assert set(weight_layers(q)) == set(BRANCH_LAYERS)
    check_placement_invariants(q)
    # The tensor shared by conv_a, conv_b (and the residual add) has a single quantizer.
    qa, qb = input_quantizer(q, "conv_a"), input_quantizer(q, "conv_b")
    assert qa is not None and qa is qb
    assert _layer_node(q, "conv_a").args[0] is _layer_node(q, "conv_b").args[0]
    # The network input is quantized.
    x_node = next(n for n in q.graph.nodes if n.op == "placeholder")
    assert [_is_aq(q, u) for u in x_node.users] == [True]
    # Every quantizer runs on the default 8 bits, unsigned activations.
    for aq in act_quantizers(q).values():
        assert aq.bits == 8 and aq.symmetric is False and not bool(aq.calibrated)


def test_placement_tiny_cnn(tiny_model):
    q = quantize(_folded(tiny_model))
    # conv1..conv4 + fc; quantizers: input, relu1 (conv2 input + add input), conv2 out (add input),
    # relu2 = relu(add) (the sum's only consumer is that ReLU, so its quantizer sits after it; also
    # conv3's input), relu3 (conv4 input), relu4 (conv4's output feeds the average pool: quantized
    # there so that an integer runtime keeps conv4 and the pool in int8), flatten (fc input).
    assert q.zsq_report.num_weight_quantizers == 5
    assert q.zsq_report.num_act_quantizers == 7
    pool = next(n for n in q.graph.nodes if n.name == "pool")
    assert _is_aq(q, pool.args[0]) and str(pool.args[0].target) == "zsq_act_relu4"
    add = next(n for n in q.graph.nodes if n.op == "call_function" and "add" in n.name)
    assert not any(_is_aq(q, u) for u in add.users)  # no quantizer between the sum and its ReLU
    assert q.zsq_report.bn_remaining == 0
    check_placement_invariants(q)
    assert "num_act_quantizers" in q.zsq_report.to_dict()
    assert "7 activation quantizers" in str(q.zsq_report)


class AddVariantsNet(nn.Module):
    """Additions written three ways, on 1-D signals (Conv1d)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 4, 3, padding=1)
        self.c3 = nn.Conv1d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.c1(x)
        b = torch.add(self.c2(a), a)
        c = self.c3(b).add(b)
        d = c + 1.0  # adding a constant is not a residual add
        return self.fc(d.mean(dim=2))


def test_placement_add_variants_and_conv1d(seed):
    from zsq.quant import QuantConv1d

    model = AddVariantsNet().eval()
    q = quantize(model)
    assert isinstance(q.c1, QuantConv1d) and q.c1.weight_quantizer.scale.shape == (4,)
    # x, a (c2 input + add), c2 out, b (torch.add output, c3 input + .add input), c3 out, c (.add output),
    # fc input (mean) -- the constant add gets nothing.
    assert q.zsq_report.num_act_quantizers == 7
    adds = [n for n in q.graph.nodes if n.target in (torch.add, "add")]
    assert len(adds) == 2
    for add in adds:
        assert _is_aq(q, add.args[0]) and _is_aq(q, add.args[1])
        assert all(_is_aq(q, u) for u in add.users)
    x = torch.randn(4, 2, 10, generator=torch.Generator().manual_seed(0))
    calibrate(q, x, estimator="minmax", **NO_PROGRESS)
    with torch.no_grad():
        assert _rel_err(q(x), model(x)) < 0.02


class AddReluNet(nn.Module):
    """relu(a + b) written functionally, and a sum that a ReLU *and* another layer read."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.c4 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.c1(x)
        b = F.relu(self.c2(a) + a)  # the sum's only reader is the ReLU: quantize after it
        s = self.c3(b) + b  # read by a ReLU and by c4: quantize the sum itself
        return self.c4(s) + torch.relu(s)


def test_add_relu_quantized_once_after_the_relu(seed):
    model = AddReluNet().eval()
    q = quantize(model)
    check_placement_invariants(q)
    adds = [n for n in q.graph.nodes if is_add_node(n)]
    first, second, last = adds
    (relu,) = first.users
    assert not _is_aq(q, relu)  # the sum goes straight into the ReLU ...
    assert [_is_aq(q, u) for u in relu.users] == [True]  # ... and only the ReLU's output is quantized
    assert all(_is_aq(q, u) for u in second.users)  # two readers: the sum itself is quantized
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calibrate(q, x, estimator="minmax", **NO_PROGRESS)
    relu_q = next(iter(relu.users))
    assert int(q.get_submodule(str(relu_q.target)).zero_point) == 0  # range starts at 0: no codes wasted
    with torch.no_grad():
        assert _rel_err(q(x), model(x)) < 0.02


def test_unfolded_batchnorm_is_reported(tiny_model):
    q = quantize(tiny_model)
    assert q.zsq_report.bn_remaining == 4


def test_layer_used_twice_is_rejected(seed):
    with pytest.raises(ConfigError, match="conv"):
        quantize(SharedLayerNet())


def test_quantizing_a_quantized_model_is_rejected(branch):
    q = quantize(branch)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(q)


# --------------------------------------------------------------------------------------------
# Overrides and skips
# --------------------------------------------------------------------------------------------


def _bits(q) -> dict[str, int | None]:
    layers = weight_layers(q)
    return {n: (layers[n].weight_quantizer.bits if n in layers else None) for n in BRANCH_LAYERS}


def test_override_exact_name(branch):
    q = quantize(branch, QuantConfig(overrides={"conv_a": {"wbits": 4}}))
    assert _bits(q) == {"conv1": 8, "conv_a": 4, "conv_b": 8, "fc": 8}
    plan = {p.name: p for p in q.zsq_report.layers}
    assert plan["conv_a"].wbits == 4 and plan["conv_a"].abits == 8


def test_override_regex(branch):
    q = quantize(branch, QuantConfig(overrides={"re:conv_.*": LayerOverride(wbits=3)}))
    assert _bits(q) == {"conv1": 8, "conv_a": 3, "conv_b": 3, "fc": 8}
    # fullmatch: "re:conv" alone matches nothing
    with pytest.raises(ScopeError):
        quantize(branch, QuantConfig(overrides={"re:conv": {"wbits": 3}}))


def test_override_first_and_last(branch):
    q = quantize(branch, QuantConfig(overrides={"@first": {"wbits": 6}, "@last": {"wbits": 5, "abits": 4}}))
    assert _bits(q) == {"conv1": 6, "conv_a": 8, "conv_b": 8, "fc": 5}
    assert input_quantizer(q, "fc").bits == 4
    assert input_quantizer(q, "conv1").bits == 8


def test_later_override_wins_field_by_field(branch):
    cfg = QuantConfig(overrides={"re:conv.*": {"wbits": 4, "abits": 6}, "conv1": {"wbits": 2}})
    q = quantize(branch, cfg)
    assert _bits(q) == {"conv1": 2, "conv_a": 4, "conv_b": 4, "fc": 8}
    assert input_quantizer(q, "conv1").bits == 6  # abits from the first override kept


def test_shared_tensor_takes_max_bits_over_consumers(branch):
    # a feeds conv_a, conv_b (4 bits) and the residual add (global 8 bits): 8 bits win.
    q = quantize(branch, QuantConfig(overrides={"re:conv_[ab]": {"abits": 4}}))
    assert input_quantizer(q, "conv_a").bits == 8


def test_override_none_keeps_layer_in_float(branch):
    q = quantize(branch, QuantConfig(overrides={"fc": None}))
    assert type(q.fc) is nn.Linear
    assert _bits(q)["fc"] is None
    assert input_quantizer(q, "fc") is None
    assert q.zsq_report.to_dict()["float_layers"] == ["fc"]
    assert q.zsq_report.num_weight_quantizers == 3
    assert q.zsq_report.num_act_quantizers == 6
    assert torch.equal(q.fc.weight, branch.fc.weight)


def test_skip_keeps_layer_in_float(branch):
    q = quantize(branch, QuantConfig(skip=("conv1",)))
    assert type(q.conv1) is nn.Conv2d
    assert input_quantizer(q, "conv1") is None  # the network input only fed conv1
    assert q.zsq_report.num_act_quantizers == 6
    assert "conv1" in str(q.zsq_report)


@pytest.mark.parametrize(
    "cfg_kwargs,pattern,what",
    [
        (dict(skip=("conv9",)), "conv9", "skip"),
        (dict(skip=("re:head.*",)), "re:head.*", "skip"),
        (dict(overrides={"layer4.conv": {"wbits": 4}}), "layer4.conv", "override"),
        (dict(overrides={"re:bn[0-9]": None}), "re:bn[0-9]", "override"),
    ],
)
def test_dead_pattern_raises_scope_error(branch, cfg_kwargs, pattern, what):
    with pytest.raises(ScopeError, match=re.escape(pattern)) as info:
        quantize(branch, QuantConfig(**cfg_kwargs))
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    assert what in str(info.value)
    assert "conv1" in str(info.value)  # lists valid names


def test_invalid_regex_raises_scope_error(branch):
    with pytest.raises(ScopeError, match="regular expression"):
        quantize(branch, QuantConfig(skip=("re:conv(",)))


# --------------------------------------------------------------------------------------------
# Errors and config validation
# --------------------------------------------------------------------------------------------


def test_running_before_calibration_raises(branch, branch_inputs):
    q = quantize(branch)
    with pytest.raises(NotCalibratedError, match="calibrate") as info:
        q(branch_inputs)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("bad", [0, 1, 9, 16, -8, True, 4.0, "8", None])
@pytest.mark.parametrize("field_name", ["wbits", "abits"])
def test_bits_out_of_range(field_name, bad):
    with pytest.raises(ConfigError) as info:
        QuantConfig(**{field_name: bad})
    assert isinstance(info.value, ValueError)
    assert field_name in str(info.value)


@pytest.mark.parametrize("bits", list(range(2, 9)))
def test_bits_in_range_accepted(bits):
    cfg = QuantConfig(wbits=bits, abits=bits, overrides={"conv1": {"wbits": bits}})
    assert cfg.wbits == bits and cfg.overrides["conv1"].wbits == bits


@pytest.mark.parametrize(
    "overrides",
    [{"conv1": {"wbits": 9}}, {"conv1": {"abits": 1}}, {"conv1": {"bits": 4}}, {"conv1": 4},
     {"conv1": {"weight_granularity": "per_row"}}, {"": {"wbits": 4}}],
)
def test_bad_overrides(overrides):
    with pytest.raises(ConfigError):
        QuantConfig(overrides=overrides)


def test_overrides_none_means_none_and_a_list_is_refused():
    assert QuantConfig(overrides=None).overrides == {}
    with pytest.raises(ConfigError, match="overrides must be a dict"):
        QuantConfig(overrides=[("conv1", {"wbits": 4})])


def test_quantize_rejects_non_config(branch):
    with pytest.raises(ConfigError):
        quantize(branch, {"wbits": 4})


def test_config_round_trip():
    cfg = QuantConfig(wbits=4, abits=6, weight_granularity="per_tensor", overrides={"@first": {"wbits": 8}, "fc": None},
                      skip=["conv_b"])
    again = QuantConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.skip == ("conv_b",)


# --------------------------------------------------------------------------------------------
# The original model is untouched
# --------------------------------------------------------------------------------------------


def test_original_model_not_modified(branch, branch_inputs):
    before_sd = copy.deepcopy(branch.state_dict())
    before_types = {n: type(m) for n, m in branch.named_modules()}
    with torch.no_grad():
        before_out = branch(branch_inputs)
    q = quantize(branch, QuantConfig(wbits=2, abits=2))
    calibrate(q, branch_inputs, **NO_PROGRESS)
    with torch.no_grad():
        q(branch_inputs)
    assert {n: type(m) for n, m in branch.named_modules()} == before_types
    after_sd = branch.state_dict()
    assert before_sd.keys() == after_sd.keys()
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    with torch.no_grad():
        assert torch.equal(branch(branch_inputs), before_out)
    assert q.conv1.weight is not branch.conv1.weight


def test_training_flag_preserved(branch):
    branch.train()
    q = quantize(branch)
    assert q.training and q.conv1.training


# --------------------------------------------------------------------------------------------
# Weight quantizers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_quantizer_per_channel(branch, symmetric):
    q = quantize(branch, QuantConfig(weight_granularity="per_channel", weight_symmetric=symmetric, wbits=4))
    for name, layer in weight_layers(q).items():
        wq = layer.weight_quantizer
        out_ch = layer.weight.shape[0]
        assert wq.per_channel and wq.scale.shape == (out_ch,) and wq.zero_point.shape == (out_ch,)
        assert (wq.scale > 0).all()
        if symmetric:
            assert (wq.zero_point == 0).all()
        assert len(torch.unique(wq.scale)) > 1
        qmin, qmax = P.qrange(4, symmetric)
        ref = torch.fake_quantize_per_channel_affine(layer.weight.detach(), wq.scale, wq.zero_point, 0, qmin, qmax)
        assert torch.equal(layer.quantized_weight(), ref)
        # Scales follow the min/max of each output channel.
        lo, hi = P.minmax(layer.weight.detach(), 0)
        s, _ = P.scale_zero_point(lo, hi, bits=4, symmetric=symmetric)
        assert torch.equal(wq.scale, s)


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_quantizer_per_tensor(branch, symmetric):
    q = quantize(branch, QuantConfig(weight_granularity="per_tensor", weight_symmetric=symmetric, wbits=4))
    for name, layer in weight_layers(q).items():
        wq = layer.weight_quantizer
        assert not wq.per_channel and wq.scale.shape == (1,) and wq.zero_point.shape == (1,)
        qmin, qmax = P.qrange(4, symmetric)
        ref = torch.fake_quantize_per_tensor_affine(
            layer.weight.detach(), float(wq.scale[0]), int(wq.zero_point[0]), qmin, qmax
        )
        assert torch.equal(layer.quantized_weight(), ref)
        w_int = wq.integer(layer.weight.detach())
        assert w_int.dtype == torch.int32 and int(w_int.min()) >= qmin and int(w_int.max()) <= qmax


def test_weight_symmetry_by_bit_width(branch):
    """weight_symmetric=None: symmetric at >= 8 bits (int8 kernels), asymmetric below; recorded per layer."""
    cfg = QuantConfig(wbits=4, weight_symmetric=None, overrides={"conv1": {"wbits": 8}, "conv_b": {"wbits": 6}})
    q = quantize(branch, cfg)
    got = {name: layer.weight_quantizer.symmetric for name, layer in weight_layers(q).items()}
    assert got == {"conv1": True, "conv_a": False, "conv_b": False, "fc": False}
    assert {p.name: p.weight_symmetric for p in q.zsq_report.layers} == got
    assert (q.conv1.weight_quantizer.zero_point == 0).all()
    assert not (q.conv_a.weight_quantizer.zero_point == 0).all()  # min/max of a channel are not mirror images
    assert cfg.weight_symmetric_for(8) and not cfg.weight_symmetric_for(7)
    for forced in (True, False):  # an explicit choice holds at every bit width
        c = QuantConfig(wbits=4, weight_symmetric=forced, overrides={"conv1": {"wbits": 8}})
        assert {l.weight_quantizer.symmetric for l in weight_layers(quantize(branch, c)).values()} == {forced}
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_weight_symmetric_must_be_bool_or_none(bad):
    with pytest.raises(ConfigError, match="weight_symmetric must be True, False or None"):
        QuantConfig(weight_symmetric=bad)


def test_granularity_override(branch):
    q = quantize(branch, QuantConfig(weight_granularity="per_tensor", overrides={"conv_a": {"weight_granularity": "per_channel"}}))
    assert q.conv_a.weight_quantizer.scale.shape == (8,)
    assert q.conv1.weight_quantizer.scale.shape == (1,)


def test_quant_conv_forward_uses_quantized_weight(branch, branch_inputs):
    q = quantize(branch, QuantConfig(wbits=3))
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    expected = F.conv2d(x, q.conv_a.quantized_weight(), q.conv_a.bias, padding=1)
    with torch.no_grad():
        assert torch.equal(q.conv_a(x), expected)
        assert not torch.equal(q.conv_a.quantized_weight(), q.conv_a.weight)


def test_mse_weight_estimator_not_worse_than_minmax(branch):
    qm = quantize(branch, QuantConfig(wbits=3, weight_estimator="minmax"))
    qe = quantize(branch, QuantConfig(wbits=3, weight_estimator="mse"))
    for name in BRANCH_LAYERS:
        w = getattr(branch, name).weight.detach()
        err_m = (getattr(qm, name).quantized_weight() - w).pow(2).sum()
        err_e = (getattr(qe, name).quantized_weight() - w).pow(2).sum()
        assert err_e <= err_m * (1 + 1e-5)


def test_weight_estimator_per_layer_override(branch):
    """An override's weight_estimator applies to the layers it matches only (e.g. MSE ranges for depthwise
    convs), is reported in the plan, and is validated."""
    qm = quantize(branch, QuantConfig(wbits=3))
    qe = quantize(branch, QuantConfig(wbits=3, overrides={"conv_a": {"weight_estimator": "mse"}}))
    qall = quantize(branch, QuantConfig(wbits=3, weight_estimator="mse"))
    for name in BRANCH_LAYERS:
        same = torch.equal(getattr(qe, name).weight_quantizer.scale, getattr(qm, name).weight_quantizer.scale)
        assert same == (name != "conv_a"), name
    assert torch.equal(qe.conv_a.weight_quantizer.scale, qall.conv_a.weight_quantizer.scale)
    assert {p.name: p.weight_estimator for p in qe.zsq_report.layers} == {
        n: ("mse" if n == "conv_a" else "minmax") for n in BRANCH_LAYERS}
    back = QuantConfig.from_dict(QuantConfig(overrides={"conv_a": {"weight_estimator": "mse"}}).to_dict())
    assert back.overrides["conv_a"].weight_estimator == "mse"
    with pytest.raises(ConfigError, match="weight_estimator"):
        QuantConfig(overrides={"conv_a": {"weight_estimator": "median"}})


def test_weight_change_in_place_updates_output(branch, branch_inputs):
    """The cached fake-quantized weight must follow in-place changes of the weight."""
    q = quantize(branch)
    calibrate(q, branch_inputs, estimator="minmax", **NO_PROGRESS)
    with torch.no_grad():
        out0 = q(branch_inputs)
        q.conv1.weight.mul_(0.5)
        out1 = q(branch_inputs)
    assert not torch.equal(out0, out1)


def test_weight_change_through_data_updates_output(branch, branch_inputs):
    """Writing through ``.data`` (common in quantization code: bias correction, AdaRound, ...) does not
    bump the parameter's version counter; the cached fake-quantized weight must not go stale."""
    q = quantize(branch)
    calibrate(q, branch_inputs, estimator="minmax", **NO_PROGRESS)
    with torch.no_grad():
        out0 = q(branch_inputs)
        q.conv1.weight.data.mul_(0.5)
        out1 = q(branch_inputs)
        expected = F.conv2d(input_quantizer(q, "conv1")(branch_inputs), q.conv1.weight_quantizer(q.conv1.weight),
                            q.conv1.bias, padding=1)
        assert torch.equal(q.conv1(input_quantizer(q, "conv1")(branch_inputs)), expected)
    assert not torch.equal(out0, out1)


def test_quantized_weights_get_ste_gradients(branch, branch_inputs):
    q = quantize(branch)
    calibrate(q, branch_inputs, estimator="minmax", **NO_PROGRESS)
    out = q(branch_inputs)
    out.sum().backward()
    assert q.conv1.weight.grad is not None and torch.isfinite(q.conv1.weight.grad).all()
    assert q.conv1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Accuracy vs bits
# --------------------------------------------------------------------------------------------


def _quantized_error(folded: nn.Module, ref_model: nn.Module, bits: int, cal: torch.Tensor, ev: torch.Tensor) -> float:
    q = quantize(folded, QuantConfig(wbits=bits, abits=bits, act_estimator="minmax"))
    calibrate(q, cal, **NO_PROGRESS)
    with torch.no_grad():
        return _rel_err(q(ev), ref_model(ev))


def test_error_grows_as_bits_shrink(tiny_model):
    from zsq.distill import gaussian_inputs

    pre = tiny_preprocessing()
    cal = gaussian_inputs(32, pre, seed=1)
    ev = gaussian_inputs(32, pre, seed=2)
    folded = _folded(tiny_model)
    with torch.no_grad():
        assert torch.allclose(folded(ev), tiny_model(ev), atol=1e-4, rtol=1e-4)
    errs = {b: _quantized_error(folded, tiny_model, b, cal, ev) for b in (8, 6, 4, 2)}
    assert errs[8] < 0.01, errs  # W8A8 close to FP32
    assert errs[2] > 0.1, errs  # W2A2 clearly worse
    assert errs[8] < errs[6] < errs[4] < errs[2], errs
    assert errs[2] > 10 * errs[8]


def test_calibrated_model_differs_from_float_but_only_by_quantization(branch, branch_inputs):
    q = quantize(branch, QuantConfig(wbits=8, abits=8))
    calibrate(q, branch_inputs, estimator="minmax", **NO_PROGRESS)
    with torch.no_grad():
        out_q, out_f = q(branch_inputs), branch(branch_inputs)
    assert not torch.equal(out_q, out_f)
    assert _rel_err(out_q, out_f) < 0.02
    # Disabling every quantizer (weights and activations) gives back the float model.
    for aq in act_quantizers(q).values():
        aq.enabled = False
    for layer in weight_layers(q).values():
        layer.quant_enabled = False
    with torch.no_grad():
        assert torch.allclose(q(branch_inputs), out_f, atol=1e-6, rtol=1e-5)


def test_act_quantizer_range_contains_zero(branch, branch_inputs):
    q = quantize(branch)
    calibrate(q, branch_inputs + 5.0, estimator="minmax", **NO_PROGRESS)  # input strictly positive
    lo, hi = input_quantizer(q, "conv1").range()
    assert lo <= 0.0 <= hi
    aq = input_quantizer(q, "conv1")
    assert float(aq(torch.zeros(3))[0]) == 0.0


def test_weight_quantizer_module_repr():
    wq = WeightQuantizer(bits=4, symmetric=True, per_channel=False, channels=3)
    assert "per_tensor" in repr(wq) and "bits=4" in repr(wq)
    assert isinstance(NotCalibratedError("x"), ZsqError)
