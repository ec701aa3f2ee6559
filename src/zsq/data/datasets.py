"""Loading labelled evaluation data and unlabelled calibration images.

Supported layouts (detected from the path):

* ``FILE.npz`` with ``images`` (uint8, N x H x W x 3, RGB) and ``labels`` (integer, N). ``split``
  picks another image array of the same file (e.g. ``"exact_images_prefix"``), labelled with
  ``labels[:len(array)]``.
* a folder with ``labels.csv`` (columns ``filename`` and ``class_index``; other columns are
  ignored) whose files lie under ``images/`` or next to the csv.
* an ImageFolder: one sub-folder per class, class index = position of the folder name in the
  sorted list of sub-folder names.
* for :func:`unlabeled_images` also a plain folder of images (or a single image file) and a
  tensor file saved by zsq (``.pt``/``.pth`` via ``torch.load(weights_only=True)``, or
  ``.safetensors``) holding a tensor or a dict with key ``"images"``.

For folders, ``split`` names a sub-folder to use (e.g. ``ROOT/val``).

Images are decoded with PIL when an item is read (nothing is cached on disk). ``.npz`` images that
already have the model's input size are normalised vectorised, without PIL.
"""

from __future__ import annotations

import copy
import csv
import operator
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DatasetError
from ..models.preprocessing import Preprocessing

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "check_labels",
    "dataset_labels",
    "iter_batches",
    "load_dataset",
    "open_images",
    "unlabeled_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TENSOR_EXTENSIONS = (".pt", ".pth", ".safetensors")
LABELS_CSV = "labels.csv"
UNLABELED = -1  # label stored for images that come without one

_LAYOUTS_HELP = (
    "an .npz file with 'images' (uint8 N x H x W x 3) and 'labels' (int N), "
    "a folder with labels.csv (columns filename,class_index) and its images under images/ or next to it, "
    "or an ImageFolder (one sub-folder of images per class)"
)


# --------------------------------------------------------------------------------------------
# Dataset classes
# --------------------------------------------------------------------------------------------


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run many tiny per-image torch ops on one intra-op thread (as DataLoader workers do).

    On a busy CPU the intra-op thread pool makes each small op up to 10x slower than one thread.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class ImageDataset(Dataset):
    """Map-style dataset of ``(image tensor (3, H, W) float32, int label)``.

    Subclasses implement :meth:`_load_one` (and may override :meth:`_load_many` to load a batch
    faster). ``labels`` holds the labels of the selected items (``-1`` where the source has none).
    """

    def __init__(self, labels: np.ndarray, *, source: str, class_names: list[str] | None = None) -> None:
        self._all_labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self._indices = np.arange(len(self._all_labels), dtype=np.int64)
        self.source = source
        self.class_names = class_names

    # -- subclass hooks -------------------------------------------------------------------------
    def _load_one(self, j: int) -> torch.Tensor:  # j: index into the underlying source
        raise NotImplementedError

    def _load_many(self, idx: np.ndarray) -> torch.Tensor:
        with _one_torch_thread():
            items = [self._load_one(int(j)) for j in idx]
        return torch.stack(items)

    # -- public ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = operator.index(i)
        n = len(self._indices)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} images")
        j = int(self._indices[i])
        with _one_torch_thread():
            x = self._load_one(j)
        return x, int(self._all_labels[j])

    @property
    def labels(self) -> torch.Tensor:
        """Labels of the selected items, LongTensor (N,)."""
        return torch.from_numpy(self._all_labels[self._indices].copy())

    @property
    def has_labels(self) -> bool:
        return bool(len(self._indices)) and bool((self._all_labels[self._indices] != UNLABELED).all())

    def get_batch(self, positions: slice | Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) and labels (B,) of the items at ``positions`` (a slice or indices)."""
        idx = self._indices[positions]
        idx = np.atleast_1d(idx)
        if len(idx) == 0:
            raise IndexError("get_batch selected no items")
        return self._load_many(idx), torch.from_numpy(self._all_labels[idx].copy())

    def select(self, subset: slice | None = None, limit: int | None = None) -> "ImageDataset":
        """A view of ``self[subset][:limit]`` (the underlying data is shared, not copied)."""
        out = copy.copy(self)
        idx = self._indices
        if subset is not None:
            idx = idx[subset]
        if limit is not None:
            idx = idx[:limit]
        out._indices = np.asarray(idx, dtype=np.int64)
        return out

    def images(self, batch_size: int = 256) -> torch.Tensor:
        """All selected images stacked into one (N, 3, H, W) tensor."""
        n = len(self)
        if n == 0:
            raise DatasetError(f"{self.source}: no images selected")
        return torch.cat([self.get_batch(slice(s, s + batch_size))[0] for s in range(0, n, batch_size)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, n={len(self)})"


class ArrayImageDataset(ImageDataset):
    """Images from a uint8 (N, H, W, 3) array, preprocessed on access.

    When the images already have the preprocessing's input size (and ``resize`` is ``None`` or
    equals their shorter side, i.e. a no-op), batches are normalised vectorised without PIL;
    otherwise each image goes through ``preprocessing`` (PIL resize/crop).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        preprocessing: Preprocessing,
        *,
        source: str,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__(labels, source=source, class_names=class_names)
        self._images = images
        self._pre = preprocessing
        h, w = int(images.shape[1]), int(images.shape[2])
        self.fast = (h, w) == tuple(preprocessing.input_size) and preprocessing.resize in (None, min(h, w))

    def _normalise(self, arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self._pre.normalize(x).contiguous()

    def _load_one(self, j: int) -> torch.Tensor:
        if self.fast:
            return self._normalise(self._images[j : j + 1])[0]
        return self._pre(np.ascontiguousarray(self._images[j]))

    def _load_many(self, idx: np.ndarray) -> torch.Tensor:
        if self.fast:
            return self._normalise(self._images[idx])
        return super()._load_many(idx)


class FileImageDataset(ImageDataset):
    """Image files decoded with PIL (converted to RGB) and preprocessed when read."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: np.ndarray,
        preprocessing: Preprocessing,
        *,
        source: str,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__(labels, source=source, class_names=class_names)
        self.files = [Path(f) for f in files]
        self._pre = preprocessing

    def _load_one(self, j: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[j]
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except FileNotFoundError:
            raise DatasetError(f"image file {path} does not exist (listed in {self.source}); "
                               "restore the file or remove it from the dataset") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"could not decode image {path}: {e}; expected a readable image file "
                               f"({', '.join(IMAGE_EXTENSIONS)})") from None
        return self._pre(rgb)


class TensorImageDataset(ImageDataset):
    """Already preprocessed float images (N, 3, H, W), e.g. distilled data saved by zsq."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, *, source: str) -> None:
        super().__init__(labels, source=source)
        self._images = images

    def _load_one(self, j: int) -> torch.Tensor:
        return self._images[j]

    def _load_many(self, idx: np.ndarray) -> torch.Tensor:
        return self._images[torch.from_numpy(idx)]


# --------------------------------------------------------------------------------------------
# Helpers used by evaluation / calibration
# --------------------------------------------------------------------------------------------


def iter_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images (B, 3, H, W), labels (B,) LongTensor)`` over ``dataset`` in order.

    :class:`ImageDataset` batches are loaded directly (vectorised for in-size ``.npz`` data); any
    other map-style dataset of ``(image, label)`` goes through a ``DataLoader`` (``num_workers=0``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(dataset, ImageDataset):
        for start in range(0, len(dataset), batch_size):
            yield dataset.get_batch(slice(start, start + batch_size))
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise DatasetError(
                f"dataset items must be (image, label) pairs, got a batch of {type(batch).__name__}; "
                "use zsq.data.load_dataset or a dataset returning (tensor, int)"
            )
        x, y = batch[0], batch[1]
        yield x, torch.as_tensor(y, dtype=torch.long).reshape(-1)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """All labels of ``dataset`` as a LongTensor (N,), without decoding images where possible."""
    if isinstance(dataset, ImageDataset):
        return dataset.labels
    targets = getattr(dataset, "targets", None)  # torchvision datasets
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    tensors = getattr(dataset, "tensors", None)  # torch.utils.data.TensorDataset
    if isinstance(tensors, tuple) and len(tensors) >= 2:
        return torch.as_tensor(tensors[1], dtype=torch.long).reshape(-1)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def check_labels(dataset: Dataset, num_classes: int) -> None:
    """Raise :class:`DatasetError` unless every label of ``dataset`` is in ``0 .. num_classes-1``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    labels = dataset_labels(dataset)
    if labels.numel() == 0:
        return
    source = getattr(dataset, "source", type(dataset).__name__)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        if lo == UNLABELED and isinstance(dataset, ImageDataset):
            raise DatasetError(f"{source} has no labels for some images (label -1); "
                               "evaluation needs labelled data (labels.csv, an ImageFolder or an npz with 'labels')")
        raise DatasetError(f"{source} has a negative label ({lo}); labels must be class indices "
                           f"0..{num_classes - 1} for this model with {num_classes} classes")
    if hi >= num_classes:
        raise DatasetError(
            f"{source} has labels up to {hi} but the model has {num_classes} classes "
            f"(labels must be 0..{num_classes - 1}); use a dataset that matches the model "
            "(e.g. CIFAR-10 data for a CIFAR-10 model, ImageNet data for an ImageNet model)"
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_dataset(
    path: str | os.PathLike[str],
    preprocessing: Preprocessing,
    *,
    limit: int | None = None,
    split: str | None = None,
    subset: slice | None = None,
) -> ImageDataset:
    """Open a labelled image dataset (``.npz``, ``labels.csv`` folder or ImageFolder).

    Items are ``(tensor (3, H, W) float32, int label)`` preprocessed with ``preprocessing``.
    ``split`` selects another image array of an ``.npz`` (labelled by the ``labels`` prefix) or a
    sub-folder of a folder dataset. ``subset`` (a ``slice``) selects a range of the images, e.g. to
    keep calibration images apart from evaluation images; ``limit`` then keeps the first ``limit``.
    """
    _check_selection(limit, subset)
    if not isinstance(preprocessing, Preprocessing):
        raise ConfigError(f"preprocessing must be a zsq Preprocessing, got {type(preprocessing).__name__}")
    p = _resolve(path, split, for_labels=True)
    ds = _open(p, preprocessing, split=split, need_labels=True)
    out = ds.select(subset, limit)
    if len(out) == 0:
        raise DatasetError(f"{ds.source}: the selection (subset={subset}, limit={limit}) leaves no images "
                           f"of {len(ds)}; choose a range inside 0..{len(ds)}")
    return out


def unlabeled_images(
    path: str | os.PathLike[str],
    preprocessing: Preprocessing,
    *,
    limit: int | None = None,
    split: str | None = None,
    subset: slice | None = None,
) -> torch.Tensor:
    """Load preprocessed images (N, 3, H, W) float32 for calibration; labels are ignored.

    Accepts every layout of :func:`load_dataset` (labels optional), a plain folder of images
    (or its ``images/`` sub-folder), a single image file, and a tensor file saved by zsq
    (``.pt``/``.pth``/``.safetensors``: a tensor or a dict with key ``"images"``; float tensors
    are taken as already preprocessed model inputs, uint8 ones as raw pixels).
    """
    _check_selection(limit, subset)
    if not isinstance(preprocessing, Preprocessing):
        raise ConfigError(f"preprocessing must be a zsq Preprocessing, got {type(preprocessing).__name__}")
    p = _resolve(path, split, for_labels=False)
    ds = _open(p, preprocessing, split=split, need_labels=False)
    out = ds.select(subset, limit)
    if len(out) == 0:
        raise DatasetError(f"{ds.source}: the selection (subset={subset}, limit={limit}) leaves no images "
                           f"of {len(ds)}; choose a range inside 0..{len(ds)}")
    return out.images()


def open_images(
    path: str | os.PathLike[str],
    preprocessing: Preprocessing,
    *,
    split: str | None = None,
) -> ImageDataset:
    """Open any source :func:`unlabeled_images` accepts without decoding it: an :class:`ImageDataset`
    (labels ``-1`` where the source has none) to draw a sample from with ``get_batch(indices)``."""
    if not isinstance(preprocessing, Preprocessing):
        raise ConfigError(f"preprocessing must be a zsq Preprocessing, got {type(preprocessing).__name__}")
    ds = _open(_resolve(path, split, for_labels=False), preprocessing, split=split, need_labels=False)
    if len(ds) == 0:
        raise DatasetError(f"{ds.source} holds no images")
    return ds


def _check_selection(limit: Any, subset: Any) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    if subset is not None and not isinstance(subset, slice):
        raise ConfigError(f"subset must be a slice (e.g. slice(0, 100)) or None, got {type(subset).__name__}")


def _resolve(path: str | os.PathLike[str], split: str | None, *, for_labels: bool) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"dataset path must be a string or path, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
        what = _LAYOUTS_HELP if for_labels else (
            _LAYOUTS_HELP + ", a folder of images, or a .pt/.safetensors tensor file saved by zsq")
        raise DatasetError(f"dataset path {p} does not exist; expected {what}")
    if split is not None and not isinstance(split, str):
        raise ConfigError(f"split must be a string or None, got {type(split).__name__}")
    if p.is_dir() and split is not None:
        sub = p / split
        if not sub.is_dir():
            subdirs = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
            raise DatasetError(f"split {split!r} is not a sub-folder of {p} (sub-folders: "
                               f"{', '.join(subdirs) or 'none'}); pass one of them or no split")
        p = sub
    return p


def _open(p: Path, pre: Preprocessing, *, split: str | None, need_labels: bool) -> ImageDataset:
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".npz":
            return _open_npz(p, pre, split=split, need_labels=need_labels)
        if suffix in TENSOR_EXTENSIONS:
            return _open_tensor_file(p, pre, need_labels=need_labels)
        if suffix in IMAGE_EXTENSIONS and not need_labels:
            return FileImageDataset([p], np.full(1, UNLABELED), pre, source=str(p))
        raise DatasetError(
            f"{p}: unknown dataset file type {p.suffix or '(none)'!r}; expected "
            + (_LAYOUTS_HELP if need_labels else _LAYOUTS_HELP + ", an image file, or a .pt/.safetensors tensor file")
        )
    if not p.is_dir():
        raise DatasetError(f"{p} is neither a file nor a folder; expected {_LAYOUTS_HELP}")

    csv_path = p / LABELS_CSV
    if csv_path.is_file():
        return _open_csv(csv_path, pre, need_labels=need_labels)
    classes = _class_dirs(p)
    if classes and not (need_labels and [c.name for c in classes] == ["images"]):
        return _open_image_folder(p, classes, pre)
    loose = _image_files(p, recursive=False)
    if not loose and (p / "images").is_dir():
        loose = _image_files(p / "images", recursive=False)
    if need_labels:
        if loose or classes:
            raise DatasetError(
                f"{p} holds images but no labels: add {LABELS_CSV} (columns filename,class_index) next to "
                "the images/ folder, or arrange the images into one sub-folder per class (ImageFolder)"
            )
        raise DatasetError(f"{p}: unknown dataset layout (no {LABELS_CSV}, no class sub-folders with images, "
                           f"no .npz); expected {_LAYOUTS_HELP}")
    if not loose:
        raise DatasetError(f"{p} contains no image files ({', '.join(IMAGE_EXTENSIONS)}); expected a folder "
                           f"of images, {_LAYOUTS_HELP}, or a .pt/.safetensors tensor file")
    return FileImageDataset(loose, np.full(len(loose), UNLABELED), pre, source=str(p))


def _image_files(folder: Path, *, recursive: bool) -> list[Path]:
    if recursive:
        found: list[Path] = []
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(Path(root) / f for f in sorted(files)
                         if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
        return found
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTENSIONS))


def _class_dirs(p: Path) -> list[Path]:
    """Sub-folders of ``p`` if at least one of them (recursively) holds an image file."""
    dirs = sorted((d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if any(_image_files(d, recursive=True) for d in dirs):
        return dirs
    return []


def _open_image_folder(p: Path, classes: list[Path], pre: Preprocessing) -> ImageDataset:
    files: list[Path] = []
    labels: list[int] = []
    for index, d in enumerate(classes):
        found = _image_files(d, recursive=True)
        files.extend(found)
        labels.extend([index] * len(found))
    return FileImageDataset(files, np.asarray(labels, dtype=np.int64), pre, source=str(p),
                            class_names=[d.name for d in classes])


def _open_csv(csv_path: Path, pre: Preprocessing, *, need_labels: bool) -> ImageDataset:
    root = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"could not read {csv_path}: {e}; expected a UTF-8 csv with a header "
                           "row containing filename,class_index") from None
    required = ["filename", "class_index"] if need_labels else ["filename"]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetError(
            f"{csv_path} lacks the column(s) {', '.join(missing)} (found: {', '.join(columns) or 'no header'}); "
            "the first line must be a header naming at least filename,class_index "
            "(the image file name and its integer class index)"
        )
    if not rows:
        raise DatasetError(f"{csv_path} has a header but no rows; add one line per image: filename,class_index")

    has_labels = "class_index" in columns
    files: list[Path] = []
    labels: list[int] = []
    missing_files: list[str] = []
    for line, row in enumerate(rows, start=2):
        name = (row.get("filename") or "").strip()
        if not name:
            raise DatasetError(f"{csv_path} line {line}: empty filename")
        if has_labels:
            raw = (row.get("class_index") or "").strip()
            try:
                labels.append(int(raw))
            except ValueError:
                raise DatasetError(f"{csv_path} line {line}: class_index {raw!r} is not an integer; "
                                   "class_index must be the integer class of the image") from None
        else:
            labels.append(UNLABELED)
        for candidate in (root / "images" / name, root / name):
            if candidate.is_file():
                files.append(candidate)
                break
        else:
            missing_files.append(name)
    if missing_files:
        shown = ", ".join(missing_files[:5]) + (f", ... ({len(missing_files)} in all)" if len(missing_files) > 5 else "")
        raise DatasetError(
            f"{csv_path} lists image file(s) that do not exist: {shown}; looked in {root / 'images'} "
            f"and {root}; put the images there or fix the filename column"
        )
    return FileImageDataset(files, np.asarray(labels, dtype=np.int64), pre, source=str(root))


def _check_uint8_images(arr: np.ndarray, where: str) -> None:
    if arr.dtype != np.uint8:
        raise DatasetError(
            f"{where} has dtype {arr.dtype}; expected uint8 RGB pixels 0..255 "
            "(convert with (x * 255).round().clip(0, 255).astype(np.uint8) if it holds floats in [0, 1])"
        )
    if arr.ndim != 4 or arr.shape[3] != 3:
        hint = ""
        if arr.ndim == 4 and arr.shape[1] == 3:
            hint = "; it looks channels-first: transpose with x.transpose(0, 2, 3, 1)"
        elif arr.ndim == 3:
            hint = "; for grayscale images repeat the channel: np.repeat(x[..., None], 3, axis=3)"
        raise DatasetError(f"{where} has shape {tuple(arr.shape)}; expected (N, H, W, 3) RGB images{hint}")
    if arr.shape[0] == 0:
        raise DatasetError(f"{where} holds no images (shape {tuple(arr.shape)})")


def _open_npz(p: Path, pre: Preprocessing, *, split: str | None, need_labels: bool) -> ImageDataset:
    key = split or "images"
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any read failure becomes a DatasetError
        raise DatasetError(f"could not read {p} as an .npz archive ({e}); expected a file written by "
                           "np.savez / np.savez_compressed with 'images' and 'labels'") from None
    with z:
        keys = list(z.files)
        if key not in keys:
            candidates = [k for k in keys if k != "labels"]
            if split is None:
                raise DatasetError(
                    f"{p} has no 'images' array (arrays: {', '.join(keys) or 'none'}); expected 'images' "
                    "(uint8 N x H x W x 3) and 'labels' (int N), or pass split=NAME to use another image array"
                )
            raise DatasetError(f"{p} has no array {split!r} for split (arrays: {', '.join(keys) or 'none'}); "
                               f"choose one of {', '.join(candidates) or 'none'}")
        try:
            images = z[key]
        except ValueError as e:
            raise DatasetError(f"{p}: array {key!r} could not be loaded ({e}); store it as a plain uint8 array") from None
        where = f"{p}[{key!r}]"
        _check_uint8_images(images, where)
        n = images.shape[0]
        if "labels" in keys:
            try:
                labels = z["labels"]
            except ValueError as e:
                raise DatasetError(f"{p}: 'labels' could not be loaded ({e}); store int64 labels") from None
            if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_):
                raise DatasetError(f"{p}['labels'] has dtype {labels.dtype} and shape {tuple(labels.shape)}; "
                                   "expected a 1-D integer array (int64 class indices)")
            if len(labels) < n or (split is None and len(labels) != n):
                raise DatasetError(
                    f"{p}: {len(labels)} labels for {n} images in {key!r}; 'labels' must have one entry per "
                    "image (for another image array selected with split, at least as many: it uses the first ones)"
                )
            labels = labels[:n].astype(np.int64)
        elif need_labels:
            raise DatasetError(f"{p} has no 'labels' array (arrays: {', '.join(keys)}); expected 'labels' "
                               "(int64 class index per image) next to 'images'")
        else:
            labels = np.full(n, UNLABELED, dtype=np.int64)
        class_names = None
        if "class_names" in keys:
            try:
                class_names = [str(c) for c in z["class_names"].tolist()]
            except ValueError:
                class_names = None
    source = f"{p}" + (f" (split {split})" if split else "")
    return ArrayImageDataset(images, labels, pre, source=source, class_names=class_names)


def _open_tensor_file(p: Path, pre: Preprocessing, *, need_labels: bool) -> ImageDataset:
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"could not load tensor file {p} ({type(e).__name__}: {e}); expected a tensor or a "
                           "dict with 'images' saved by zsq (torch.save / safetensors)") from None
    labels_t = None
    if isinstance(obj, dict):
        if "images" in obj:
            images = obj["images"]
        elif len(obj) == 1:
            images = next(iter(obj.values()))
        else:
            raise DatasetError(f"{p} holds a dict with keys {', '.join(map(str, obj))} but no 'images'; "
                               "save the images under the key 'images'")
        labels_t = obj.get("labels")
    else:
        images = obj
    if not isinstance(images, torch.Tensor):
        raise DatasetError(f"{p}: expected a tensor of images, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    n = images.shape[0] if images.ndim == 4 else 0
    if labels_t is not None:
        if not isinstance(labels_t, torch.Tensor) or labels_t.ndim != 1 or labels_t.is_floating_point() \
                or labels_t.shape[0] != n:
            raise DatasetError(f"{p}: 'labels' must be an integer tensor with one entry per image ({n})")
        labels = labels_t.to(torch.int64).numpy()
    elif need_labels:
        raise DatasetError(f"{p} holds no labels; evaluation needs {_LAYOUTS_HELP}, "
                           "or a tensor file with a dict {'images': ..., 'labels': ...}")
    else:
        labels = np.full(n, UNLABELED, dtype=np.int64)

    if images.dtype == torch.uint8:
        arr = images.numpy()
        if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[3] != 3:
            arr = arr.transpose(0, 2, 3, 1)
        _check_uint8_images(arr, str(p))
        return ArrayImageDataset(arr, labels, pre, source=str(p))
    if not images.is_floating_point():
        raise DatasetError(f"{p}: images have dtype {images.dtype}; expected float (preprocessed) or uint8 pixels")
    th, tw = pre.input_size
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (th, tw):
        raise DatasetError(f"{p}: float images have shape {tuple(images.shape)}; expected preprocessed model "
                           f"inputs (N, 3, {th}, {tw}) matching the model's input size")
    if n == 0:
        raise DatasetError(f"{p} holds no images")
    return TensorImageDataset(images.detach().to(torch.float32).contiguous(), labels, source=str(p))
