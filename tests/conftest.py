"""Shared pytest fixtures and helpers for the zsq test-suite.

Helpers (importable as ``from conftest import ...`` because pytest puts ``tests/`` on ``sys.path``):

* :func:`shared_dir` / :func:`require_shared` — locate real assets in ``../shared`` and skip cleanly
  when they are absent;
* :func:`randomize_batchnorm` — give every BatchNorm non-trivial affine parameters and running
  statistics (so folding and BN-statistics losses are meaningful);
* :func:`make_tiny_model` — the registry's ``tiny_cnn`` / ``tiny_cnn_nobn`` when available, else an
  inline model with the same structure (conv+BN+ReLU, residual add, depthwise conv, avgpool, linear).

Fixtures: ``seed`` (seeds torch/numpy/random, restores the global RNG state afterwards),
``tiny_model`` / ``tiny_model_nobn`` (eval mode), ``tiny_preprocessing``, ``tiny_inputs``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

SEED = 0
TINY_INPUT_SHAPE = (3, 16, 16)

# The tests use tiny tensors: intra-op threading only adds overhead, and on a loaded 2-core machine
# OpenMP spin-waiting makes small ops up to 100x slower. Override with ZSQ_TEST_THREADS=N.
torch.set_num_threads(int(os.environ.get("ZSQ_TEST_THREADS", "1")))


# --------------------------------------------------------------------------------------------
# Real assets in ../shared
# --------------------------------------------------------------------------------------------


def shared_dir() -> Path:
    """The ``shared`` directory next to the repository root (real models and data)."""
    return Path(__file__).resolve().parents[1].parent / "shared"


def require_shared(*relparts: str) -> Path:
    """Path of ``../shared/<relparts...>``; skips the calling test when it does not exist."""
    path = shared_dir().joinpath(*relparts)
    if not path.exists():
        rel = "/".join(("..", "shared") + tuple(relparts))
        pytest.skip(f"{rel} not found: real-asset test skipped")
    return path


# --------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------


@pytest.fixture
def seed():
    """Seed torch, numpy and ``random`` with :data:`SEED`; restore all global RNG states afterwards."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    try:
        yield SEED
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random BN affine parameters and running statistics (in place); returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)
            if m.track_running_stats and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
    return model


class InlineTinyCNN(nn.Module):
    """Fallback tiny model: conv+BN+ReLU, conv+BN with a residual add, depthwise conv, 1x1 conv,
    global average pool, linear head. Input 3x16x16, 10 classes."""

    def __init__(self, num_classes: int = 10, batch_norm: bool = True, width: int = 16, head: int = 32):
        super().__init__()
        self.batch_norm = batch_norm
        bias = not batch_norm
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=bias)
        self.conv3 = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width, bias=bias)
        self.conv4 = nn.Conv2d(width, head, 1, bias=bias)
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.bn1, self.bn2, self.bn3, self.bn4 = norm(width), norm(width), norm(width), norm(head)
        self.relu1, self.relu2, self.relu3, self.relu4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        z = z + y
        z = self.relu2(z)
        z = self.relu3(self.bn3(self.conv3(z)))
        z = self.relu4(self.bn4(self.conv4(z)))
        return self.fc(torch.flatten(self.pool(z), 1))


def registry_available() -> bool:
    """Whether ``zsq.models.load_model('tiny_cnn')`` works in this checkout."""
    try:
        from zsq.models import load_model

        load_model("tiny_cnn", pretrained=False)
        return True
    except Exception:
        return False


def make_tiny_model(batch_norm: bool = True) -> nn.Module:
    """A tiny CNN in eval mode with randomised BN statistics (registry model if it works, else inline)."""
    model: nn.Module
    try:
        from zsq.models import load_model

        model, _ = load_model("tiny_cnn" if batch_norm else "tiny_cnn_nobn", pretrained=False)
    except Exception:
        model = InlineTinyCNN(batch_norm=batch_norm)
    randomize_batchnorm(model)
    return model.eval()


def tiny_preprocessing():
    """Preprocessing of the tiny models (3x16x16, mean 0.5, std 0.25)."""
    try:
        from zsq.models import get_spec

        return get_spec("tiny_cnn").preprocessing
    except Exception:
        from zsq.models.preprocessing import Preprocessing

        return Preprocessing(input_size=(16, 16), resize=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture
def tiny_model(seed) -> nn.Module:
    """Tiny CNN with BatchNorm (randomised statistics), eval mode, deterministic weights."""
    return make_tiny_model(batch_norm=True)


@pytest.fixture
def tiny_model_nobn(seed) -> nn.Module:
    """The same tiny CNN without BatchNorm, eval mode."""
    return make_tiny_model(batch_norm=False)


@pytest.fixture(name="tiny_preprocessing")
def tiny_preprocessing_fixture():
    return tiny_preprocessing()


@pytest.fixture
def tiny_inputs(seed) -> torch.Tensor:
    """A small batch of normalised inputs for the tiny models (16 x 3 x 16 x 16)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(16, *TINY_INPUT_SHAPE, generator=g)
