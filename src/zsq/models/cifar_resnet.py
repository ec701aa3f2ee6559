"""ResNet-20/32/44/56/110 for CIFAR-10 (He et al. 2016, section 4.2).

``cifar_resnet{20,32,44,56,110}`` use the parameter-free "option A" shortcut (subsample by 2 and
zero-pad the channels) with key names ``conv1``, ``bn1``, ``layer{1,2,3}.{j}.conv1/bn1/conv2/bn2``,
``linear`` — the layout of the widely used akamaster checkpoints (``resnet20-12fca82f.th`` ...).
``cifar_resnet20_pyhessian`` is the "option B" variant (1x1 conv + BN projection shortcut as
``layer{2,3}.0.downsample.{0,1}``, classifier ``fc``) of the PyHessian example checkpoint ``net.pkl``.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, WeightsUnavailableError
from .preprocessing import Preprocessing
from .registry import ModelSpec, register

STAGE_CHANNELS = (16, 32, 64)
DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}  # depth -> basic blocks per stage (depth = 6n + 2)
CIFAR10_IMAGENET_NORM = Preprocessing(input_size=(32, 32), resize=None)  # ImageNet mean/std (akamaster)
PYHESSIAN_NORM = Preprocessing(
    input_size=(32, 32), resize=None, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)
)
# CIFAR-10 test top-1 stored as `best_prec1` in the akamaster checkpoint files (others not at hand).
REFERENCE_TOP1: dict[int, float | None] = {20: 91.78, 32: 92.78, 44: None, 56: None, 110: None}


class ShortcutA(nn.Module):
    """Option-A shortcut: keep every other row/column and zero-pad ``pad`` channels on each side.

    Parameter-free; a leaf for zsq's tracer, so it appears as one node in the data-flow graph.
    """

    zsq_leaf = True

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module | None = None
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                if stride != 2 or (out_channels - in_channels) % 2:
                    raise ConfigError("option-A shortcuts need stride 2 and an even channel increase")
                self.shortcut = ShortcutA((out_channels - in_channels) // 2)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            shortcut = self.shortcut(x)
        elif self.downsample is not None:
            shortcut = self.downsample(x)
        else:
            shortcut = x
        out = out + shortcut
        return self.relu2(out)


class CifarResNet(nn.Module):
    """3 stages of ``blocks_per_stage`` basic blocks (16/32/64 channels) on 32x32 inputs."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, shortcut: str = "A", classifier: str = "linear") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if classifier not in ("linear", "fc"):
            raise ConfigError(f"classifier must be 'linear' or 'fc', got {classifier!r}")
        self.classifier_name = classifier
        self.conv1 = nn.Conv2d(3, STAGE_CHANNELS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.relu = nn.ReLU()
        cin = STAGE_CHANNELS[0]
        for i, cout in enumerate(STAGE_CHANNELS):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, shortcut))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.add_module(classifier, nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return getattr(self, self.classifier_name)(x)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Option-A CIFAR ResNet of ``depth`` (20, 32, 44, 56 or 110) with random weights."""
    if depth not in DEPTHS:
        raise ConfigError(f"CIFAR ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    return CifarResNet(DEPTHS[depth], num_classes=num_classes, shortcut="A", classifier="linear")


def cifar_resnet20_pyhessian(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 with option-B (1x1 conv + BN) downsampling shortcuts and an ``fc`` classifier."""
    return CifarResNet(3, num_classes=num_classes, shortcut="B", classifier="fc")


def _no_builtin_weights(name: str, example: str):
    def load() -> Mapping[str, torch.Tensor]:
        raise WeightsUnavailableError(
            f"{name} has no built-in pretrained weights: pass --weights PATH (e.g. {example})"
        )

    load.__name__ = f"{name}_weights"
    return load


def _make_builder(depth: int):
    def build(num_classes: int = 10) -> CifarResNet:
        return cifar_resnet(depth, num_classes=num_classes)

    build.__name__ = f"cifar_resnet{depth}"
    return build


def _register_all() -> None:
    for depth, n in DEPTHS.items():
        name = f"cifar_resnet{depth}"
        example = "resnet20-12fca82f.th" if depth == 20 else f"resnet{depth}-*.th from akamaster/pytorch_resnet_cifar10"
        register(
            ModelSpec(
                name=name,
                description=f"ResNet-{depth} for CIFAR-10 (option-A shortcuts, akamaster layout; --weights needed)",
                num_classes=10,
                preprocessing=CIFAR10_IMAGENET_NORM,
                builder=_make_builder(depth),
                pretrained=_no_builtin_weights(name, example),
                dataset="cifar10",
                metadata={
                    "family": "cifar_resnet",
                    "depth": depth,
                    "blocks_per_stage": n,
                    "shortcut": "A",
                    "eval_input_size": (32, 32),
                    "weights_file_example": example,
                    "reference_top1": REFERENCE_TOP1[depth],
                },
            )
        )
    register(
        ModelSpec(
            name="cifar_resnet20_pyhessian",
            description="ResNet-20 for CIFAR-10 with option-B (conv+BN) shortcuts, PyHessian layout (net.pkl; --weights needed)",
            num_classes=10,
            preprocessing=PYHESSIAN_NORM,
            builder=cifar_resnet20_pyhessian,
            pretrained=_no_builtin_weights("cifar_resnet20_pyhessian", "net.pkl from amirgholami/PyHessian"),
            dataset="cifar10",
            metadata={
                "family": "cifar_resnet",
                "depth": 20,
                "blocks_per_stage": 3,
                "shortcut": "B",
                "eval_input_size": (32, 32),
                "weights_file_example": "net.pkl",
                "reference_top1": 92.43,
            },
        )
    )


_register_all()
