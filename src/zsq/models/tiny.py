"""Tiny test models (like timm's ``test_*`` models) for fast unit tests across zsq.

``tiny_cnn``: 3x16x16 input, conv3x3+BN+ReLU, conv3x3+BN with a residual add then ReLU, depthwise
conv3x3 stride 2+BN+ReLU, pointwise conv1x1+BN+ReLU, global average pool, linear head (10 classes).
``tiny_cnn_nobn``: the same without BatchNorm (convs with bias). They have no trained weights: the
builder randomises BN affine parameters and running statistics too, so BN folding is not trivial,
and ``load_model(name, pretrained=True)`` returns a fixed-seed random init.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .preprocessing import Preprocessing
from .registry import ModelSpec, register

TINY_PREPROCESSING = Preprocessing(input_size=(16, 16), resize=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
WIDTH = 16
HEAD_WIDTH = 32


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, batch_norm: bool = True) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        bias = not batch_norm
        self.conv1 = nn.Conv2d(3, WIDTH, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=bias)
        self.conv3 = nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1, groups=WIDTH, bias=bias)  # depthwise
        self.conv4 = nn.Conv2d(WIDTH, HEAD_WIDTH, 1, bias=bias)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(WIDTH)
            self.bn2 = nn.BatchNorm2d(WIDTH)
            self.bn3 = nn.BatchNorm2d(WIDTH)
            self.bn4 = nn.BatchNorm2d(HEAD_WIDTH)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.relu4 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(HEAD_WIDTH, num_classes)
        self._randomize_bn()

    @torch.no_grad()
    def _randomize_bn(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_norm:
            y = self.relu1(self.bn1(self.conv1(x)))
            z = self.bn2(self.conv2(y))
            z = z + y
            z = self.relu2(z)
            z = self.relu3(self.bn3(self.conv3(z)))
            z = self.relu4(self.bn4(self.conv4(z)))
        else:
            y = self.relu1(self.conv1(x))
            z = self.conv2(y)
            z = z + y
            z = self.relu2(z)
            z = self.relu3(self.conv3(z))
            z = self.relu4(self.conv4(z))
        z = torch.flatten(self.pool(z), 1)
        return self.fc(z)


def tiny_cnn(num_classes: int = 10) -> TinyCNN:
    return TinyCNN(num_classes=num_classes, batch_norm=True)


def tiny_cnn_nobn(num_classes: int = 10) -> TinyCNN:
    return TinyCNN(num_classes=num_classes, batch_norm=False)


register(
    ModelSpec(
        name="tiny_cnn",
        description="tiny test CNN (3x16x16, 4 conv+BN+ReLU incl. a residual add and a depthwise conv; random weights)",
        num_classes=10,
        preprocessing=TINY_PREPROCESSING,
        builder=tiny_cnn,
        pretrained=None,
        dataset="synthetic",
        metadata={"family": "tiny", "test_model": True, "eval_input_size": (16, 16)},
    )
)
register(
    ModelSpec(
        name="tiny_cnn_nobn",
        description="tiny test CNN without BatchNorm (as tiny_cnn, convs with bias; random weights)",
        num_classes=10,
        preprocessing=TINY_PREPROCESSING,
        builder=tiny_cnn_nobn,
        pretrained=None,
        dataset="synthetic",
        metadata={"family": "tiny", "test_model": True, "eval_input_size": (16, 16)},
    )
)
