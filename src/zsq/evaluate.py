"""Accuracy of a classifier on a labelled dataset, and FP32-vs-quantized comparison."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .data.datasets import iter_batches
from .errors import ConfigError, DatasetError
from .metrics import kl_divergence

__all__ = ["EvalResult", "compare", "evaluate", "logits_of"]


@dataclass
class EvalResult:
    """Result of :func:`evaluate`: accuracies in percent (0-100); ``top5`` is ``None`` below 5 classes."""

    n: int
    top1: float
    top5: float | None
    predictions: torch.Tensor = field(repr=False)  # LongTensor (N,), top-1 class per image

    def to_dict(self, *, include_predictions: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"n": self.n, "top1": self.top1, "top5": self.top5}
        if include_predictions:
            d["predictions"] = self.predictions.tolist()
        return d


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode; restore every sub-module's own train/eval flag afterwards."""
    saved = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for states in saved:
            if states:
                states[0][0].train(states[0][1])  # top module through train() (honours overrides)
            for m, flag in states:
                m.training = flag  # exact per-module restore (mixed modes survive)


def _check_model(model: Any, what: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")


def _logits(out: Any) -> torch.Tensor:
    """The (batch, classes) logits of a model output (a tensor, or the first of a tuple/list)."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    elif isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the model returned {type(out).__name__}; expected a (batch, classes) logits tensor")
    if out.ndim != 2:
        raise ConfigError(f"the model returned a tensor of shape {tuple(out.shape)}; expected (batch, classes) logits")
    return out


def _check_batch_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DatasetError(f"the dataset has label {lo}; evaluation needs labelled data with class indices "
                           f"0..{num_classes - 1} (label -1 means the images came without labels)")
    if hi >= num_classes:
        raise DatasetError(
            f"the dataset has labels up to (at least) {hi} but the model has {num_classes} classes "
            f"(labels must be 0..{num_classes - 1}); use a dataset that matches the model "
            "(e.g. CIFAR-10 data for a CIFAR-10 model)"
        )


def _dataset_len(dataset: Dataset) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DatasetError(f"{type(dataset).__name__} has no length; pass a map-style dataset "
                           "such as the one zsq.data.load_dataset returns") from None
    if n == 0:
        raise DatasetError("the dataset is empty; nothing to evaluate")
    return n


def _topk_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, int | None]:
    pred = logits.argmax(dim=1)
    hit1 = int((pred == y).sum())
    hit5 = None
    if logits.shape[1] >= 5:
        top = logits.topk(5, dim=1).indices
        hit5 = int((top == y.unsqueeze(1)).any(dim=1).sum())
    return pred, hit1, hit5


def _pct(hits: int, n: int) -> float:
    return 100.0 * hits / n


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Top-1/top-5 accuracy of ``model`` on ``dataset`` of ``(image, label)`` items.

    Runs under ``torch.inference_mode`` with the model in eval mode (its previous train/eval
    state is restored afterwards, also on errors). The model is moved to ``device``.
    """
    _check_model(model)
    n = _dataset_len(dataset)
    dev = torch.device(device)
    model.to(dev)
    preds: list[torch.Tensor] = []
    hits1, hits5, seen = 0, 0, 0
    num_classes: int | None = None
    with _eval_mode(model), torch.inference_mode(), \
            tqdm(total=n, disable=not progress, leave=False, unit="img", desc="evaluate") as bar:
        for x, y in iter_batches(dataset, batch_size):
            logits = _logits(model(x.to(dev)))
            if num_classes is None:
                num_classes = logits.shape[1]
            _check_batch_labels(y, logits.shape[1])
            pred, h1, h5 = _topk_hits(logits, y.to(logits.device))
            preds.append(pred.cpu())
            hits1 += h1
            hits5 += h5 or 0
            seen += len(y)
            bar.update(len(y))
    assert num_classes is not None
    return EvalResult(
        n=seen,
        top1=_pct(hits1, seen),
        top5=_pct(hits5, seen) if num_classes >= 5 else None,
        predictions=torch.cat(preds).to(torch.long),
    )


def compare(
    reference: nn.Module,
    candidate: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``reference`` (FP32) and ``candidate`` (quantized) on the same batches, in one pass.

    Returns ``{"n", "fp32": {"top1", "top5"}, "quantized": {"top1", "top5"}, "agreement", "kl"}``:
    accuracies and ``agreement`` (share of images whose top-1 predictions agree) in percent, and
    ``kl`` the mean per-image KL(softmax(reference) || softmax(candidate)) in nats.
    """
    _check_model(reference, "reference")
    _check_model(candidate, "candidate")
    n = _dataset_len(dataset)
    dev = torch.device(device)
    reference.to(dev)
    candidate.to(dev)
    hits1 = [0, 0]
    hits5 = [0, 0]
    agree, seen = 0, 0
    kl_sum = 0.0
    num_classes: int | None = None
    with _eval_mode(reference, candidate), torch.inference_mode(), \
            tqdm(total=n, disable=not progress, leave=False, unit="img", desc="compare") as bar:
        for x, y in iter_batches(dataset, batch_size):
            x = x.to(dev)
            ref = _logits(reference(x))
            cand = _logits(candidate(x))
            if ref.shape != cand.shape:
                raise ConfigError(f"reference logits {tuple(ref.shape)} and candidate logits {tuple(cand.shape)} "
                                  "differ in shape; compare models with the same classes")
            if num_classes is None:
                num_classes = ref.shape[1]
            _check_batch_labels(y, ref.shape[1])
            y = y.to(ref.device)
            preds = []
            for k, logits in enumerate((ref, cand)):
                pred, h1, h5 = _topk_hits(logits, y)
                preds.append(pred)
                hits1[k] += h1
                hits5[k] += h5 or 0
            agree += int((preds[0] == preds[1]).sum())
            kl_sum += float(kl_divergence(ref, cand).sum())
            seen += len(y)
            bar.update(len(y))
    assert num_classes is not None
    has5 = num_classes >= 5

    def acc(k: int) -> dict[str, float | None]:
        return {"top1": _pct(hits1[k], seen), "top5": _pct(hits5[k], seen) if has5 else None}

    return {"n": seen, "fp32": acc(0), "quantized": acc(1), "agreement": _pct(agree, seen), "kl": kl_sum / seen}


def logits_of(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Logits of ``model`` for ``inputs`` (N, ...), computed in batches in eval mode; returned on CPU."""
    _check_model(model)
    if not isinstance(inputs, torch.Tensor):
        raise ConfigError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    dev = torch.device(device)
    model.to(dev)
    outs: list[torch.Tensor] = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            outs.append(_logits(model(inputs[start : start + batch_size].to(dev))).cpu())
    if not outs:
        raise ConfigError("inputs is empty (0 images)")
    return torch.cat(outs)
