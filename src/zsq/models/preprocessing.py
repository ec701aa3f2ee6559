"""Input preprocessing carried by each model entry (resize, crop, mean/std, input size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB images become the model's input tensor.

    An image (H x W x 3 uint8) is resized so that its shorter side is ``resize`` (bilinear) when
    ``resize`` is set, center-cropped to ``input_size`` when larger, scaled to [0, 1], then
    normalised per channel: ``(x - mean) / std``. An image that already has exactly ``input_size``
    is taken as already resized and cropped and is only normalised.
    """

    input_size: tuple[int, int] = (224, 224)
    resize: int | None = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ConfigError(f"input_size must be (height, width) with positive values, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean/std must have 3 values each and std > 0, got {self.mean} / {self.std}")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def input_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) that preprocessed real pixels can take, each of shape (3,)."""
        mean = torch.tensor(self.mean)
        std = torch.tensor(self.std)
        return (0.0 - mean) / std, (1.0 - mean) / std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float tensor (N, 3, H, W) or (3, H, W) -> normalised model input."""
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (model input -> [0, 1] pixels, not clamped)."""
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x * std + mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            input_size=tuple(d["input_size"]),
            resize=d.get("resize"),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bilinear"),
        )

    def __call__(self, image: Any) -> torch.Tensor:
        """A PIL image or an H x W x 3 uint8 array -> normalised (3, H, W) float tensor."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ConfigError(f"expected an HxWx3 uint8 image array, got {image.dtype} {image.shape}")
            pil = Image.fromarray(image)
        elif isinstance(image, Image.Image):
            pil = image.convert("RGB")
        else:
            raise ConfigError(f"expected a PIL image or uint8 array, got {type(image).__name__}")
        th, tw = self.input_size
        # Images already at the input size are taken as already resized and cropped (e.g. the
        # 224x224 crops of an ImageNet sample): resizing them again would zoom in.
        if self.resize is not None and pil.size != (tw, th):
            w, h = pil.size
            short = min(w, h)
            if short != self.resize:
                nw, nh = (self.resize, int(self.resize * h / w)) if w <= h else (int(self.resize * w / h), self.resize)
                pil = pil.resize((nw, nh), Image.BILINEAR)
        w, h = pil.size
        if (w, h) != (tw, th):
            if w < tw or h < th:
                pil = pil.resize((max(w, tw), max(h, th)), Image.BILINEAR)
                w, h = pil.size
            left = int(round((w - tw) / 2.0))
            top = int(round((h - th) / 2.0))
            pil = pil.crop((left, top, left + tw, top + th))
        arr = np.asarray(pil, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
