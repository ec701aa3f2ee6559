"""Tests of zsq.evaluate with tiny models whose answers are known exactly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from zsq.data import load_dataset
from zsq.errors import ConfigError, DatasetError
from zsq.evaluate import EvalResult, compare, evaluate, logits_of
from zsq.models.preprocessing import Preprocessing

C = 10


def _identity_linear(dim: int) -> nn.Linear:
    lin = nn.Linear(dim, dim)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(dim))
        lin.bias.zero_()
    return lin


def _ranked_scores(ranks: list[int], labels: list[int]) -> torch.Tensor:
    """Score vectors (N, C) in which ``labels[i]`` has rank ``ranks[i]`` (0 = largest)."""
    rows = []
    for r, y in zip(ranks, labels):
        order = [c for c in range(C) if c != y]
        order.insert(r, y)  # order[k] is the class with the k-th largest score
        s = torch.empty(C)
        for k, c in enumerate(order):
            s[c] = float(C - k)
        rows.append(s)
    return torch.stack(rows)


def test_evaluate_exact_top1_top5() -> None:
    ranks = [0, 0, 1, 4, 5, 9, 0, 2, 7, 3, 0, 0]
    labels = [(3 * i + 1) % C for i in range(len(ranks))]
    x = _ranked_scores(ranks, labels)
    ds = TensorDataset(x, torch.tensor(labels))
    model = _identity_linear(C)
    res = evaluate(model, ds, batch_size=5, progress=False)
    assert isinstance(res, EvalResult)
    n = len(ranks)
    assert res.n == n
    assert res.top1 == pytest.approx(100.0 * sum(r == 0 for r in ranks) / n)
    assert res.top5 == pytest.approx(100.0 * sum(r < 5 for r in ranks) / n)
    assert res.predictions.dtype == torch.long
    assert torch.equal(res.predictions, x.argmax(1))
    d = res.to_dict()
    assert d == {"n": n, "top1": res.top1, "top5": res.top5}
    assert res.to_dict(include_predictions=True)["predictions"] == x.argmax(1).tolist()


def test_evaluate_on_npz_images(tmp_path: Path) -> None:
    """Images of solid red 40*k are class k; the model reads the mean red value."""

    class RedReader(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            red = x[:, 0].mean(dim=(1, 2)) * 255.0  # identity normalisation below
            centres = torch.arange(5, dtype=x.dtype) * 40.0
            return -((red[:, None] - centres[None]) ** 2)

    labels = np.array([0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 2])
    images = np.zeros((len(labels), 6, 6, 3), dtype=np.uint8)
    images[..., 0] = (40 * labels)[:, None, None]
    wrong = [1, 6]  # make two images look like another class
    images[wrong, :, :, 0] = 40 * ((labels[wrong] + 1) % 5)[:, None, None]
    f = tmp_path / "d.npz"
    np.savez(f, images=images, labels=labels)
    pre = Preprocessing(input_size=(6, 6), resize=None, mean=(0, 0, 0), std=(1, 1, 1))
    ds = load_dataset(f, pre)
    res = evaluate(RedReader(), ds, batch_size=4, progress=True)
    assert res.n == 11
    assert res.top1 == pytest.approx(100.0 * 9 / 11)
    assert res.top5 == 100.0
    expected = labels.copy()
    expected[wrong] = (labels[wrong] + 1) % 5
    assert res.predictions.tolist() == expected.tolist()


def test_top5_none_below_five_classes() -> None:
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    res = evaluate(_identity_linear(3), TensorDataset(x, torch.tensor([0, 1, 1])), progress=False)
    assert res.top1 == pytest.approx(200.0 / 3)
    assert res.top5 is None


class _Recorder(nn.Module):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.lin = _identity_linear(C)
        self.bn = nn.BatchNorm1d(C)
        self.fail = fail
        self.seen_training: list[bool] = []
        self.seen_inference: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training or self.lin.training or self.bn.training)
        self.seen_inference.append(torch.is_inference_mode_enabled())
        if self.fail:
            raise RuntimeError("boom")
        return self.lin(x)


def test_mode_restored_after_success_and_error() -> None:
    ds = TensorDataset(torch.randn(6, C), torch.arange(6))
    m = _Recorder()
    m.train()
    m.bn.eval()  # mixed modes must survive
    evaluate(m, ds, batch_size=4, progress=False)
    assert m.seen_training == [False, False] and m.seen_inference == [True, True]
    assert m.training and m.lin.training and not m.bn.training

    bad = _Recorder(fail=True)
    bad.train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(bad, ds, progress=False)
    assert bad.training and bad.lin.training and bad.bn.training
    assert bad.seen_training == [False]

    ev = _Recorder(fail=True).eval()
    ref = _Recorder().train()
    with pytest.raises(RuntimeError, match="boom"):
        compare(ref, ev, ds, progress=False)
    assert ref.training and not ev.training


def test_label_out_of_range_and_bad_inputs() -> None:
    ds = TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 7, 2]))
    with pytest.raises(DatasetError, match="model has 3 classes"):
        evaluate(_identity_linear(3), ds, progress=False)
    with pytest.raises(DatasetError, match="empty"):
        evaluate(_identity_linear(3), TensorDataset(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ConfigError):
        evaluate(_identity_linear(3), ds, batch_size=0, progress=False)
    with pytest.raises(ConfigError, match="nn.Module"):
        evaluate(lambda x: x, ds)  # type: ignore[arg-type]


def test_compare_identical_models() -> None:
    torch.manual_seed(0)
    x = torch.randn(23, C) * 3
    y = torch.randint(0, C, (23,))
    ds = TensorDataset(x, y)
    ref = _identity_linear(C)
    out = compare(ref, ref, ds, batch_size=7, progress=False)
    assert out["n"] == 23
    assert out["agreement"] == 100.0
    assert out["kl"] == 0.0
    single = evaluate(ref, ds, progress=False)
    assert out["fp32"] == {"top1": single.top1, "top5": single.top5}
    assert out["quantized"] == out["fp32"]


class _FlipWhenFlagged(nn.Module):
    """Logits = first two features; swapped for rows whose third feature is > 0 (if ``flip``)."""

    def __init__(self, flip: bool) -> None:
        super().__init__()
        self.flip = flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x[:, :2]
        if self.flip:
            logits = torch.where(x[:, 2:3] > 0, logits.flip(1), logits)
        return logits


def test_compare_known_kl_and_agreement() -> None:
    d = torch.tensor([0.5, 1.0, 2.0, -1.5, 3.0, 0.25, -2.0, 1.0])
    flag = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    x = torch.stack([torch.zeros(8), d, flag], dim=1)  # reference logits [0, d]
    y = (d > 0).long()  # reference is always right
    ds = TensorDataset(x, y)
    out = compare(_FlipWhenFlagged(False), _FlipWhenFlagged(True), ds, batch_size=3, progress=False)
    n_flag = int(flag.sum())
    assert out["n"] == 8
    assert out["fp32"] == {"top1": 100.0, "top5": None}
    assert out["quantized"]["top1"] == pytest.approx(100.0 * (8 - n_flag) / 8)
    assert out["agreement"] == pytest.approx(100.0 * (8 - n_flag) / 8)
    # KL(softmax([0,d]) || softmax([d,0])) = d * tanh(d / 2)
    expected = sum(float(v) * math.tanh(float(v) / 2) for v, f in zip(d, flag) if f > 0) / 8
    assert out["kl"] == pytest.approx(expected, rel=1e-9)


def test_compare_shape_mismatch() -> None:
    ds = TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ConfigError, match="differ in shape"):
        compare(_identity_linear(3), nn.Linear(3, 4), ds, progress=False)


def test_logits_of() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    x = torch.randn(11, 4)
    out = logits_of(model, x, batch_size=4, device="cpu")
    assert out.shape == (11, 3)
    assert model.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    with pytest.raises(ConfigError):
        logits_of(model, x, batch_size=0)


def test_kl_ignores_classes_the_reference_gives_no_probability() -> None:
    """A class with probability 0 under the reference adds nothing, even where the other model gives it
    -inf log-probability (0 * inf would be nan); equal distributions give exactly 0."""
    from zsq.metrics import kl_divergence

    ref = torch.tensor([[5.0, 1.0, float("-inf")], [0.0, 0.0, 0.0]])
    cand = torch.tensor([[5.0, 1.0, float("-inf")], [0.0, 0.0, 0.0]])
    out = kl_divergence(ref, cand)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros(2, dtype=torch.float64))
    worse = kl_divergence(ref, torch.tensor([[1.0, 5.0, float("-inf")], [3.0, 0.0, 0.0]]))
    assert torch.isfinite(worse).all() and (worse > 0).all()
