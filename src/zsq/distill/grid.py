"""Save a batch of model inputs as a PNG grid (denormalised with the model's preprocessing)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..models.preprocessing import Preprocessing


def save_image_grid(inputs: torch.Tensor, preprocessing: Preprocessing, path: str | Path, *, max_images: int = 64,
                    pad: int = 2) -> Path:
    from PIL import Image

    x = preprocessing.denormalize(inputs[:max_images].detach().float().cpu()).clamp(0, 1)
    n, c, h, w = x.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, cc = divmod(i, cols)
        img = x[i].permute(1, 2, 0).numpy()
        if c == 1:
            img = np.repeat(img, 3, axis=2)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + cc * (w + pad): pad + cc * (w + pad) + w] = img[..., :3]
    scale = max(1, 96 // max(h, w))  # upscale tiny (e.g. 32x32) images so the grid is viewable
    im = Image.fromarray((grid * 255).round().astype(np.uint8))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path
