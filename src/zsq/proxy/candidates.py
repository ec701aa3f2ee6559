"""Candidate proxy data sets for ZeroP: parsing a candidate string and drawing a seeded sample of
preprocessed model inputs from it.

Accepted candidate forms (:data:`ACCEPTED_FORMS`):

* a path: an image folder, a folder with ``labels.csv``, an ImageFolder, an ``.npz`` with ``images``,
  or a tensor file saved by zsq; images of any resolution go through the model's preprocessing
  (see :func:`proxy_preprocessing`);
* ``procedural:textures`` (random sinusoid gratings with a 1/f amplitude spectrum, blended with
  fractal value noise), ``procedural:blobs`` (soft elliptical colour blobs over a colour gradient),
  ``procedural:deadleaves`` (the dead-leaves model: occluding discs whose radii follow r^-3, a
  classic model of natural-image statistics); generated at the model's input size;
* ``gaussian`` (ZeroQ's Gaussian-noise baseline in the normalised input space) and ``uniform``
  (uniform pixels in [0, 1]);
* ``skimage``: the sample photographs bundled with scikit-image (``skimage.data``; an optional extra,
  ``pip install scikit-image``); the full images first, then seeded random square crops with flips.

A keyword wins over a folder of the same name: write ``./gaussian`` for a folder called ``gaussian``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DatasetError
from ..models.preprocessing import Preprocessing

log = logging.getLogger(__name__)

__all__ = [
    "ACCEPTED_FORMS",
    "PROCEDURAL_KINDS",
    "Candidate",
    "generate_procedural",
    "load_candidate",
    "parse_candidate",
    "parse_candidates",
    "proxy_preprocessing",
]

PROCEDURAL_PREFIX = "procedural:"
KEYWORDS = ("gaussian", "uniform", "skimage")
ACCEPTED_FORMS = (
    "an existing path (image folder, folder with labels.csv, ImageFolder, .npz with 'images', or a "
    ".pt/.safetensors tensor file), procedural:textures, procedural:blobs, procedural:deadleaves, "
    "gaussian, uniform, or skimage (needs `pip install scikit-image`)"
)
# skimage.data photographs that ship inside the scikit-image wheel (others need a download; any
# loader that fails is skipped). Synthetic test patterns (checkerboard, logo, phantom ...) are left out.
SKIMAGE_NAMES = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket",
    "stereo_motorcycle", "text",
)
GEN_CHUNK = 16  # procedural images generated per vectorised chunk (bounds memory at large input sizes)


@dataclass(frozen=True)
class Candidate:
    """One parsed candidate: ``text`` as the user wrote it, ``kind`` one of ``path``, ``procedural``,
    ``gaussian``, ``uniform``, ``skimage``; ``arg`` the path or the procedural generator name."""

    text: str
    kind: str
    arg: str | None = None


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"proxy candidate {text!r}: {why}; accepted forms: {ACCEPTED_FORMS}")


def parse_candidate(text: str) -> Candidate:
    """Validate one candidate string (paths must exist); raise :class:`ConfigError` naming it otherwise."""
    if not isinstance(text, (str, os.PathLike)):
        raise ConfigError(f"a proxy candidate must be a string, got {type(text).__name__}; "
                          f"accepted forms: {ACCEPTED_FORMS}")
    text = os.fspath(text)
    t = text.strip()
    if not t:
        raise _bad(text, "empty candidate")
    if t in KEYWORDS:
        return Candidate(text=t, kind=t)
    if t.startswith(PROCEDURAL_PREFIX):
        name = t[len(PROCEDURAL_PREFIX):]
        if name not in PROCEDURAL_KINDS:
            raise _bad(text, f"unknown procedural generator {name!r} (known: {', '.join(PROCEDURAL_KINDS)})")
        return Candidate(text=t, kind="procedural", arg=name)
    if not Path(t).expanduser().exists():
        raise _bad(text, "no such file or folder")
    return Candidate(text=t, kind="path", arg=t)


def parse_candidates(spec: str | Sequence[str]) -> list[Candidate]:
    """Parse a comma-separated string (the part after ``--calib proxy:``) or a list of candidate
    strings; every candidate is validated before any work starts. Duplicates are dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not items or all(isinstance(i, str) and not i.strip() for i in items):
        raise ConfigError(f"no proxy candidates given; list one or more, comma-separated: {ACCEPTED_FORMS}")
    out: dict[str, Candidate] = {}
    for item in items:
        c = parse_candidate(item)
        out.setdefault(c.text, c)
    return list(out.values())


def proxy_preprocessing(preprocessing: Preprocessing) -> Preprocessing:
    """The model's preprocessing, made to shrink whole images: a model without a resize step (e.g.
    CIFAR: input 32x32, ``resize=None``) would otherwise centre-crop a 32x32 patch out of a large
    photo; here the shorter side is resized to the input size first, then centre-cropped."""
    if preprocessing.resize is None:
        return dataclasses.replace(preprocessing, resize=min(preprocessing.input_size))
    return preprocessing


# --------------------------------------------------------------------------------------------
# Procedural generators: (n, 3, h, w) float images in [0, 1], vectorised over n
# --------------------------------------------------------------------------------------------


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1): ys (h, 1), xs (1, w)."""
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    return ys.view(h, 1), xs.view(1, w)


def _uniform(shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per image (over channels and pixels)."""
    dims = tuple(range(1, x.dim()))
    return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-6)


def _to_pixels(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Map a standardised pattern to [0, 1] pixels with a random brightness, tint and contrast."""
    n = x.shape[0]
    brightness = _uniform((n, 1, 1, 1), 0.3, 0.7, g)
    tint = 0.08 * torch.randn((n, 3, 1, 1), generator=g)
    contrast = _uniform((n, 1, 1, 1), 0.1, 0.3, g)
    return (brightness + tint + contrast * _standardise(x)).clamp(0.0, 1.0)


def fractal_noise(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Value noise summed over octaves (2, 4, 8, ... cells per side, bilinearly upsampled) with
    amplitude ``cells ** -beta`` (beta in [0.5, 1.5] per image); colour = shared luminance + 35 %
    independent chroma. Standardised, (n, 3, h, w)."""
    beta = _uniform((n, 1, 1, 1), 0.5, 1.5, g)
    out = torch.zeros(n, 3, h, w)
    cells = 2
    while cells <= max(2, min(h, w)):
        lum = torch.randn((n, 1, cells, cells), generator=g)
        chroma = torch.randn((n, 3, cells, cells), generator=g)
        layer = F.interpolate(lum + 0.35 * chroma, size=(h, w), mode="bilinear", align_corners=False)
        out += layer * float(cells) ** (-beta)
        cells *= 2
    return _standardise(out)


def textures(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Six random sinusoid gratings per image (orientation uniform, frequency log-uniform in
    1 .. min(h, w)/4 cycles per image, amplitude ~ 1/frequency, colour weights 1 +- 0.4 per channel),
    blended with :func:`fractal_noise` by a random weight, then mapped to pixels."""
    k = 6
    ys, xs = _grid(h, w)
    theta = _uniform((n, k, 1, 1), 0.0, math.pi, g)
    fmax = max(2.0, min(h, w) / 4.0)
    freq = torch.exp(_uniform((n, k, 1, 1), 0.0, math.log(fmax), g))
    phase = _uniform((n, k, 1, 1), 0.0, 2 * math.pi, g)
    amp = _uniform((n, k, 1, 1), 0.5, 1.5, g) / freq
    colour = _uniform((n, k, 3), 0.6, 1.4, g)
    u = xs * torch.cos(theta) + ys * torch.sin(theta)  # (n, k, h, w)
    waves = torch.sin(2 * math.pi * freq * u + phase) * amp
    gratings = _standardise(torch.einsum("nkhw,nkc->nchw", waves, colour))
    mix = _uniform((n, 1, 1, 1), 0.0, 1.0, g)
    return _to_pixels((1 - mix) * gratings + mix * fractal_noise(n, h, w, g), g)


def blobs(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Up to 10 soft elliptical blobs (3-10 per image; radius log-uniform 5-35 % of the image,
    aspect 0.5-2, random angle, edge sharpness and colour) composited over a colour gradient."""
    m_max = 10
    ys, xs = _grid(h, w)
    bg = _uniform((n, 3, 1, 1), 0.0, 1.0, g)
    grad = _uniform((n, 3, 2, 1, 1), -0.25, 0.25, g)
    img = (bg + grad[:, :, 0] * (xs - 0.5) + grad[:, :, 1] * (ys - 0.5)).expand(n, 3, h, w).clone()
    count = torch.randint(3, m_max + 1, (n,), generator=g)
    cx, cy = _uniform((m_max, n, 1, 1), 0.0, 1.0, g), _uniform((m_max, n, 1, 1), 0.0, 1.0, g)
    radius = torch.exp(_uniform((m_max, n, 1, 1), math.log(0.05), math.log(0.35), g))
    aspect = torch.sqrt(_uniform((m_max, n, 1, 1), 0.5, 2.0, g))
    angle = _uniform((m_max, n, 1, 1), 0.0, math.pi, g)
    sharp = _uniform((m_max, n, 1, 1), 3.0, 15.0, g)
    colour = _uniform((m_max, n, 3, 1, 1), 0.0, 1.0, g)
    for m in range(m_max):
        dx, dy = xs - cx[m], ys - cy[m]
        c, s = torch.cos(angle[m]), torch.sin(angle[m])
        u, v = (dx * c + dy * s) / (radius[m] * aspect[m]), (-dx * s + dy * c) * aspect[m] / radius[m]
        alpha = torch.sigmoid(sharp[m] * (1.0 - torch.sqrt(u * u + v * v)))  # (n, h, w)
        alpha = (alpha * (m < count).view(n, 1, 1).float()).unsqueeze(1)
        img = img * (1 - alpha) + colour[m] * alpha
    return img.clamp(0.0, 1.0)


def dead_leaves(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """The dead-leaves model: 128 flat-coloured discs (luminance uniform, each channel +-0.25 around
    it) painted back to front over a fractal-noise background, radii drawn from p(r) ~ r^-3 on
    [2.5 %, 60 %] of the image side (scale invariant), plus 2 % pixel noise."""
    d = 128
    rmin, rmax = 0.025, 0.6
    ys, xs = _grid(h, w)
    img = _to_pixels(fractal_noise(n, h, w, g), g)
    u = torch.rand((d, n, 1, 1), generator=g)
    radius = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5  # inverse CDF of r^-3
    cx, cy = torch.rand((d, n, 1, 1), generator=g), torch.rand((d, n, 1, 1), generator=g)
    lum = torch.rand((d, n, 1, 1, 1), generator=g)
    colour = (lum + _uniform((d, n, 3, 1, 1), -0.25, 0.25, g)).clamp(0.0, 1.0)  # mostly grey-ish, some hue
    top = torch.full((n, h, w), -1, dtype=torch.long)  # index of the last (topmost) disc over each pixel
    for k in range(d):
        inside = (xs - cx[k]) ** 2 + (ys - cy[k]) ** 2 <= radius[k] ** 2  # (n, h, w)
        top.masked_fill_(inside, k)
    covered = (top >= 0).unsqueeze(1)
    disc_colour = colour.squeeze(-1).squeeze(-1).permute(1, 0, 2)  # (n, d, 3)
    painted = torch.gather(disc_colour, 1, top.clamp_min(0).view(n, -1, 1).expand(-1, -1, 3))  # (n, h*w, 3)
    img = torch.where(covered, painted.permute(0, 2, 1).reshape(n, 3, h, w), img)
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0.0, 1.0)


PROCEDURAL: dict[str, Callable[[int, int, int, torch.Generator], torch.Tensor]] = {
    "textures": textures,
    "blobs": blobs,
    "deadleaves": dead_leaves,
}
PROCEDURAL_KINDS = tuple(PROCEDURAL)


def generate_procedural(kind: str, n: int, size: tuple[int, int], *, seed: int = 0) -> torch.Tensor:
    """``n`` procedural images (n, 3, h, w) in [0, 1] (not normalised); deterministic for (kind, n, seed)."""
    if kind not in PROCEDURAL:
        raise ConfigError(f"unknown procedural generator {kind!r}; choose one of {', '.join(PROCEDURAL_KINDS)}")
    _check_n(n)
    h, w = (int(v) for v in size)
    g = torch.Generator().manual_seed(int(seed))
    fn = PROCEDURAL[kind]
    return torch.cat([fn(min(GEN_CHUNK, n - s), h, w, g) for s in range(0, n, GEN_CHUNK)])


# --------------------------------------------------------------------------------------------
# scikit-image sample photographs (optional)
# --------------------------------------------------------------------------------------------


def _rgb_uint8(arr: np.ndarray) -> np.ndarray | None:
    a = np.asarray(arr)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        scale = 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else 1.0
        a = np.clip(np.nan_to_num(a) * scale, 0, 255).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or min(a.shape[:2]) < 8:
        return None
    return np.ascontiguousarray(a[:, :, :3])


def skimage_photos() -> list[tuple[str, np.ndarray]]:
    """The bundled ``skimage.data`` photographs as ``(name, H x W x 3 uint8)``, in a fixed order."""
    try:
        data = importlib.import_module("skimage.data")
    except ImportError:
        raise ConfigError("proxy candidate 'skimage' needs scikit-image (its bundled sample photographs); "
                          "install it with `pip install scikit-image`, or choose another candidate") from None
    out: list[tuple[str, np.ndarray]] = []
    for name in SKIMAGE_NAMES:
        loader = getattr(data, name, None)
        if not callable(loader):
            continue
        try:
            res = loader()
        except Exception as e:  # noqa: BLE001 - e.g. images that need a download (pooch) are skipped
            log.debug("skimage.data.%s skipped: %s", name, e)
            continue
        arrays = list(res[:2]) if isinstance(res, tuple) else [res]  # stereo pairs: left and right
        for i, a in enumerate(arrays):
            rgb = _rgb_uint8(a) if isinstance(a, np.ndarray) else None
            if rgb is not None:
                out.append((name if len(arrays) == 1 else f"{name}[{i}]", rgb))
    if not out:
        raise DatasetError("scikit-image is installed but none of its bundled sample photographs could be loaded "
                           f"({', '.join(SKIMAGE_NAMES)}); reinstall it with `pip install --force-reinstall "
                           "scikit-image` or choose another candidate")
    return out


def _skimage_sample(pre: Preprocessing, n: int, g: torch.Generator) -> torch.Tensor:
    """The whole photographs first, then random square crops (30-100 % of the shorter side, random
    horizontal flip) cycling through them, each through the model's preprocessing."""
    photos = skimage_photos()
    items = []
    for i in range(n):
        img = photos[i % len(photos)][1]
        if i >= len(photos):
            h, w = img.shape[:2]
            side = max(8, int(round(min(h, w) * float(_uniform((1,), 0.3, 1.0, g)))))
            top = int(torch.randint(0, h - side + 1, (1,), generator=g))
            left = int(torch.randint(0, w - side + 1, (1,), generator=g))
            img = img[top:top + side, left:left + side]
            if bool(torch.rand((1,), generator=g) < 0.5):
                img = img[:, ::-1]
        items.append(pre(np.ascontiguousarray(img)))
    return torch.stack(items)


# --------------------------------------------------------------------------------------------
# Loading a sample of any candidate
# --------------------------------------------------------------------------------------------


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_images must be a positive integer, got {n!r}")


def load_candidate(candidate: str | Candidate, preprocessing: Preprocessing, *, num_images: int,
                   seed: int = 0) -> torch.Tensor:
    """A seeded sample of ``num_images`` preprocessed model inputs (N, 3, H, W) from ``candidate``.

    Folders and files give a random subset (all of them when they hold fewer, in random order);
    generated candidates give exactly ``num_images``. Deterministic for (candidate, num_images, seed).
    """
    c = candidate if isinstance(candidate, Candidate) else parse_candidate(candidate)
    if not isinstance(preprocessing, Preprocessing):
        raise ConfigError(f"preprocessing must be a zsq Preprocessing, got {type(preprocessing).__name__}")
    _check_n(num_images)
    pre = proxy_preprocessing(preprocessing)
    h, w = pre.input_size
    g = torch.Generator().manual_seed(int(seed))
    if c.kind == "gaussian":
        from ..distill import gaussian_inputs

        return gaussian_inputs(num_images, pre, seed=seed)
    if c.kind == "uniform":
        return pre.normalize(torch.rand((num_images, 3, h, w), generator=g))
    if c.kind == "procedural":
        return pre.normalize(generate_procedural(str(c.arg), num_images, (h, w), seed=seed))
    if c.kind == "skimage":
        return _skimage_sample(pre, num_images, g)
    from ..data import open_images

    ds = open_images(str(c.arg), pre)
    n = len(ds)
    idx = torch.randperm(n, generator=g)[: min(n, num_images)].numpy()
    if n < num_images:
        log.info("proxy candidate %s holds only %d images (asked for %d): using all of them", c.text, n, num_images)
    return ds.get_batch(idx)[0]
