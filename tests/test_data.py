"""Tests of zsq.data: dataset layouts, selection, errors, calibration images."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsq.data import (
    ImageDataset,
    check_labels,
    dataset_labels,
    iter_batches,
    load_dataset,
    unlabeled_images,
)
from zsq.errors import ConfigError, DatasetError
from zsq.models.preprocessing import Preprocessing

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGENET = SHARED / "data" / "imagenet-sample-500"
CIFAR = SHARED / "data" / "cifar10-test" / "cifar10_test.npz"

# identity normalisation so tensors are pixels / 255
RAW8 = Preprocessing(input_size=(8, 8), resize=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
PRE8 = Preprocessing(input_size=(8, 8), resize=None)
PRE8_RESIZE = Preprocessing(input_size=(8, 8), resize=10)


def _rng_images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _solid(color: tuple[int, int, int], size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# sizes differ per image; class k has red channel 40 * k
SIZES = [(8, 8), (12, 10), (9, 16), (20, 20), (8, 11)]


def _make_csv_folder(root: Path, *, under_images: bool, n: int = 5) -> list[int]:
    img_dir = root / "images" if under_images else root
    img_dir.mkdir(parents=True, exist_ok=True)
    labels = []
    rows = []
    for i in range(n):
        label = (3 * i) % 5
        mode = ["RGB", "L", "RGBA", "RGB", "P"][i % 5]
        name = f"img_{i}.{'jpg' if i == 0 else 'png'}"  # JPEG for the first only (it has no RGBA/P)
        _solid((40 * label, 10 * i, 200), SIZES[i % len(SIZES)], mode).save(img_dir / name)
        rows.append([name, f"wnid{label}", label, f"name {i}"])
        labels.append(label)
    _write_csv(root / "labels.csv", ["filename", "wnid", "class_index", "name"], rows)
    return labels


def _make_image_folder(root: Path) -> dict[str, int]:
    # names deliberately not created in sorted order
    per_class = {"zebra": 2, "ant": 3, "mole": 1}
    for c, count in per_class.items():
        for i in range(count):
            d = root / c / ("nested" if i == 2 else "")
            d.mkdir(parents=True, exist_ok=True)
            _solid((i * 30, 60, 90), SIZES[i], "RGB").save(d / f"{c}_{i}.png")
        (root / c / "notes.txt").write_text("not an image")
    return per_class


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def test_npz_fast_path_values_and_labels(tmp_path: Path) -> None:
    images = _rng_images(7)
    labels = np.arange(7, dtype=np.int64) % 3
    f = tmp_path / "d.npz"
    np.savez_compressed(f, images=images, labels=labels)

    ds = load_dataset(f, RAW8)
    assert isinstance(ds, ImageDataset) and len(ds) == 7
    x, y = ds[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int) and y == 0
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    xb, yb = ds.get_batch(slice(0, 7))
    assert torch.equal(xb, expected)
    assert torch.equal(yb, torch.from_numpy(labels))
    assert torch.equal(ds.labels, torch.from_numpy(labels))

    # with real mean/std: the vectorised path equals the per-image PIL path of Preprocessing
    ds2 = load_dataset(f, PRE8)
    assert ds2.fast
    for i in range(7):
        torch.testing.assert_close(ds2[i][0], PRE8(images[i]), rtol=0, atol=1e-6)
    assert ds2[-1][1] == int(labels[-1])
    with pytest.raises(IndexError):
        ds2[7]


def test_npz_resized_through_preprocessing(tmp_path: Path) -> None:
    images = _rng_images(4, h=12, w=10)
    f = tmp_path / "d.npz"
    np.savez(f, images=images, labels=np.array([0, 1, 2, 3]))
    ds = load_dataset(f, PRE8_RESIZE)
    assert not ds.fast
    xb, yb = ds.get_batch(slice(None))
    assert xb.shape == (4, 3, 8, 8)
    assert yb.tolist() == [0, 1, 2, 3]
    for i in range(4):
        assert torch.equal(xb[i], PRE8_RESIZE(images[i]))


def test_npz_split_uses_label_prefix(tmp_path: Path) -> None:
    images = _rng_images(6)
    exact = _rng_images(2, seed=1)
    labels = np.array([5, 4, 3, 2, 1, 0])
    f = tmp_path / "d.npz"
    np.savez(f, images=images, labels=labels, exact_images_prefix=exact, class_names=np.array(list("abcdef")))
    ds = load_dataset(f, RAW8, split="exact_images_prefix")
    assert len(ds) == 2
    assert ds.labels.tolist() == [5, 4]
    assert torch.equal(ds[1][0], torch.from_numpy(exact[1]).permute(2, 0, 1).float() / 255.0)
    assert ds.class_names == list("abcdef")


def test_subset_and_limit(tmp_path: Path) -> None:
    f = tmp_path / "d.npz"
    np.savez(f, images=_rng_images(10), labels=np.arange(10))
    assert load_dataset(f, RAW8, limit=3).labels.tolist() == [0, 1, 2]
    assert load_dataset(f, RAW8, limit=50).labels.tolist() == list(range(10))
    assert load_dataset(f, RAW8, subset=slice(4, None)).labels.tolist() == [4, 5, 6, 7, 8, 9]
    assert load_dataset(f, RAW8, subset=slice(4, None), limit=2).labels.tolist() == [4, 5]
    assert load_dataset(f, RAW8, subset=slice(None, None, 3)).labels.tolist() == [0, 3, 6, 9]
    with pytest.raises(DatasetError, match="leaves no images"):
        load_dataset(f, RAW8, subset=slice(10, 20))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            load_dataset(f, RAW8, limit=bad)
    with pytest.raises(ConfigError):
        load_dataset(f, RAW8, subset=(0, 3))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# labels.csv folders and ImageFolders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("under_images", [True, False])
def test_csv_folder(tmp_path: Path, under_images: bool) -> None:
    labels = _make_csv_folder(tmp_path, under_images=under_images)
    ds = load_dataset(tmp_path, PRE8_RESIZE)
    assert len(ds) == 5
    assert ds.labels.tolist() == labels
    for i in range(5):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert y == labels[i]
    # red channel encodes the label (solid colours survive resize/crop; jpg is lossy)
    raw = load_dataset(tmp_path, Preprocessing(input_size=(8, 8), resize=None, mean=(0, 0, 0), std=(1, 1, 1)))
    for i in (0, 3):  # RGB-mode images
        red = float(raw[i][0][0].mean() * 255)
        assert abs(red - 40 * labels[i]) < 4


def test_image_folder(tmp_path: Path) -> None:
    per_class = _make_image_folder(tmp_path)
    ds = load_dataset(tmp_path, PRE8_RESIZE)
    assert ds.class_names == ["ant", "mole", "zebra"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert len(ds) == sum(per_class.values())
    xb, yb = ds.get_batch(slice(None))
    assert xb.shape == (6, 3, 8, 8)
    assert yb.tolist() == [0, 0, 0, 1, 2, 2]


def test_folder_split_is_subfolder(tmp_path: Path) -> None:
    _make_image_folder(tmp_path / "val")
    ds = load_dataset(tmp_path, PRE8_RESIZE, split="val")
    assert len(ds) == 6
    with pytest.raises(DatasetError, match="not a sub-folder"):
        load_dataset(tmp_path, PRE8_RESIZE, split="train")


def test_iter_batches(tmp_path: Path) -> None:
    _make_image_folder(tmp_path)
    ds = load_dataset(tmp_path, PRE8_RESIZE)
    sizes = [len(y) for _, y in iter_batches(ds, 4)]
    assert sizes == [4, 2]
    generic = torch.utils.data.TensorDataset(torch.zeros(5, 3, 2, 2), torch.tensor([1, 2, 3, 4, 0]))
    batches = list(iter_batches(generic, 2))
    assert [b[1].tolist() for b in batches] == [[1, 2], [3, 4], [0]]
    assert dataset_labels(generic).tolist() == [1, 2, 3, 4, 0]
    with pytest.raises(ConfigError):
        list(iter_batches(ds, 0))


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def _err(path: Path, match: str, **kw: object) -> DatasetError:
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset(path, RAW8, **kw)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    return info.value


def test_error_missing_path(tmp_path: Path) -> None:
    e = _err(tmp_path / "nope", "does not exist")
    assert "labels.csv" in str(e) and ".npz" in str(e)


def test_error_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _err(tmp_path / "empty", "unknown dataset layout")
    txt = tmp_path / "data.txt"
    txt.write_text("hi")
    _err(txt, "unknown dataset file type")
    # images without labels: neither csv nor class folders
    plain = tmp_path / "plain"
    plain.mkdir()
    _solid((1, 2, 3), (8, 8)).save(plain / "a.png")
    _err(plain, "no labels")
    only_images = tmp_path / "only_images" / "images"
    only_images.mkdir(parents=True)
    _solid((1, 2, 3), (8, 8)).save(only_images / "a.png")
    _err(only_images.parent, "labels.csv")


def test_error_npz_contents(tmp_path: Path) -> None:
    f = tmp_path / "a.npz"
    np.savez(f, pixels=_rng_images(2), labels=np.array([0, 1]))
    _err(f, "no 'images' array.*pixels")
    np.savez(f, images=_rng_images(2))
    _err(f, "no 'labels' array")
    np.savez(f, images=_rng_images(2).astype(np.float32) / 255, labels=np.array([0, 1]))
    _err(f, "dtype float32.*expected uint8")
    np.savez(f, images=_rng_images(2).transpose(0, 3, 1, 2), labels=np.array([0, 1]))
    _err(f, r"expected \(N, H, W, 3\).*channels-first")
    np.savez(f, images=_rng_images(2)[..., 0], labels=np.array([0, 1]))
    _err(f, "shape")
    np.savez(f, images=_rng_images(3), labels=np.array([0, 1]))
    _err(f, "2 labels for 3 images")
    np.savez(f, images=_rng_images(2), labels=np.array([0.0, 1.0]))
    _err(f, "integer")
    np.savez(f, images=_rng_images(2), labels=np.array([0, 1]))
    _err(f, "no array 'exact'", split="exact")
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip file")
    _err(bad, "could not read")


def test_error_csv(tmp_path: Path) -> None:
    _make_csv_folder(tmp_path, under_images=True)
    _write_csv(tmp_path / "labels.csv", ["file", "label"], [["img_0.jpg", 0]])
    e = _err(tmp_path, "lacks the column")
    assert "filename" in str(e) and "class_index" in str(e) and "file, label" in str(e)
    _write_csv(tmp_path / "labels.csv", ["filename", "class_index"], [["img_0.jpg", "cat"]])
    _err(tmp_path, "not an integer")
    _write_csv(tmp_path / "labels.csv", ["filename", "class_index"], [["img_0.jpg", 1], ["gone.jpg", 2]])
    e = _err(tmp_path, "do not exist: gone.jpg")
    assert "images" in str(e)
    _write_csv(tmp_path / "labels.csv", ["filename", "class_index"], [])
    _err(tmp_path, "no rows")


def test_error_unreadable_image(tmp_path: Path) -> None:
    _make_csv_folder(tmp_path, under_images=True)
    (tmp_path / "images" / "img_1.png").write_bytes(b"garbage")
    ds = load_dataset(tmp_path, PRE8_RESIZE)
    ds[0]
    with pytest.raises(DatasetError, match="could not decode"):
        ds[1]
    (tmp_path / "images" / "img_2.png").unlink()
    with pytest.raises(DatasetError, match="does not exist"):
        ds[2]


def test_check_labels(tmp_path: Path) -> None:
    f = tmp_path / "d.npz"
    np.savez(f, images=_rng_images(3), labels=np.array([0, 9, 4]))
    ds = load_dataset(f, RAW8)
    check_labels(ds, 10)
    with pytest.raises(DatasetError, match="labels up to 9 but the model has 5 classes") as info:
        check_labels(ds, 5)
    assert isinstance(info.value, ValueError)
    np.savez(f, images=_rng_images(3), labels=np.array([0, -2, 4]))
    with pytest.raises(DatasetError, match="negative label"):
        check_labels(load_dataset(f, RAW8), 10)
    generic = torch.utils.data.TensorDataset(torch.zeros(2, 3, 2, 2), torch.tensor([0, 3]))
    with pytest.raises(DatasetError, match="up to 3"):
        check_labels(generic, 3)
    with pytest.raises(ConfigError):
        check_labels(generic, 0)


# --------------------------------------------------------------------------------------------
# unlabeled images
# --------------------------------------------------------------------------------------------


def test_unlabeled_from_every_layout(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, size in enumerate(SIZES):
        _solid((i, 2, 3), size).save(plain / f"{i}.png")
    (plain / "README").write_text("x")
    x = unlabeled_images(plain, PRE8_RESIZE)
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    assert unlabeled_images(plain, PRE8_RESIZE, limit=2).shape == (2, 3, 8, 8)
    assert unlabeled_images(plain, PRE8_RESIZE, subset=slice(1, 3)).shape == (2, 3, 8, 8)
    assert unlabeled_images(plain / "3.png", PRE8_RESIZE).shape == (1, 3, 8, 8)

    nested = tmp_path / "nested"
    (nested / "images").mkdir(parents=True)
    _solid((1, 2, 3), (9, 9)).save(nested / "images" / "a.jpg")
    assert unlabeled_images(nested, PRE8_RESIZE).shape == (1, 3, 8, 8)

    csvdir = tmp_path / "csv"
    _make_csv_folder(csvdir, under_images=True)
    assert unlabeled_images(csvdir, PRE8_RESIZE).shape == (5, 3, 8, 8)
    _write_csv(csvdir / "labels.csv", ["filename"], [["img_0.jpg"]])  # labels not needed
    assert unlabeled_images(csvdir, PRE8_RESIZE).shape == (1, 3, 8, 8)

    folder = tmp_path / "folder"
    _make_image_folder(folder)
    assert unlabeled_images(folder, PRE8_RESIZE, limit=4).shape == (4, 3, 8, 8)

    images = _rng_images(6)
    f = tmp_path / "nolabels.npz"
    np.savez(f, images=images)
    x = unlabeled_images(f, RAW8)
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    with pytest.raises(DatasetError, match="no labels|'labels'"):
        load_dataset(f, RAW8)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        unlabeled_images(empty, RAW8)


def test_unlabeled_tensor_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    x = torch.randn(4, 3, 8, 8)
    torch.save(x, tmp_path / "a.pt")
    assert torch.equal(unlabeled_images(tmp_path / "a.pt", PRE8), x)
    torch.save({"images": x, "meta": torch.tensor(1)}, tmp_path / "b.pt")
    assert torch.equal(unlabeled_images(tmp_path / "b.pt", PRE8, limit=3), x[:3])
    save_file({"images": x}, str(tmp_path / "c.safetensors"))
    assert torch.equal(unlabeled_images(tmp_path / "c.safetensors", PRE8), x)

    raw = torch.from_numpy(_rng_images(3)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW pixels
    torch.save(raw, tmp_path / "u.pt")
    assert torch.equal(unlabeled_images(tmp_path / "u.pt", RAW8), raw.float() / 255.0)

    # labelled tensor dicts also work as evaluation data
    torch.save({"images": x, "labels": torch.tensor([3, 2, 1, 0])}, tmp_path / "l.pt")
    assert load_dataset(tmp_path / "l.pt", PRE8).labels.tolist() == [3, 2, 1, 0]

    with pytest.raises(DatasetError, match=r"expected preprocessed model inputs \(N, 3, 16, 16\)"):
        unlabeled_images(tmp_path / "a.pt", Preprocessing(input_size=(16, 16), resize=None))
    with pytest.raises(DatasetError, match="no labels"):
        load_dataset(tmp_path / "a.pt", PRE8)
    (tmp_path / "bad.pt").write_bytes(b"nonsense")
    with pytest.raises(DatasetError, match="could not load"):
        unlabeled_images(tmp_path / "bad.pt", PRE8)
    with pytest.raises(DatasetError, match="does not exist"):
        unlabeled_images(tmp_path / "missing.pt", PRE8)


# --------------------------------------------------------------------------------------------
# real assets
# --------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_real_imagenet_sample() -> None:
    if not (IMAGENET / "labels.csv").is_file():
        pytest.skip(f"shared asset {IMAGENET} is absent (expected ../shared next to the repository)")
    pre = Preprocessing(input_size=(224, 224), resize=256)
    t0 = time.perf_counter()
    ds = load_dataset(IMAGENET, pre, limit=20)
    xb, yb = ds.get_batch(slice(None))
    elapsed = time.perf_counter() - t0
    assert xb.shape == (20, 3, 224, 224)
    assert yb.tolist()[:3] == [0, 2, 4]
    assert all(v % 2 == 0 for v in yb.tolist())
    assert elapsed < 10, f"loading 20 images took {elapsed:.1f}s"
    check_labels(ds, 1000)
    with pytest.raises(DatasetError, match="model has 10 classes"):
        check_labels(ds, 10)
    full = load_dataset(IMAGENET, pre)
    assert len(full) == 500


@pytest.mark.shared
def test_real_cifar_exact_prefix() -> None:
    if not CIFAR.is_file():
        pytest.skip(f"shared asset {CIFAR} is absent (expected ../shared next to the repository)")
    pre = Preprocessing(input_size=(32, 32), resize=None)
    exact = load_dataset(CIFAR, pre, split="exact_images_prefix")
    assert len(exact) == 846 and exact.fast
    jpeg = load_dataset(CIFAR, pre, limit=846)
    assert torch.equal(exact.labels, jpeg.labels)
    assert exact.class_names is not None and exact.class_names[0] == "airplane"
    x, y = exact.get_batch(slice(0, 20))
    assert x.shape == (20, 3, 32, 32)
    assert y.tolist()[:10] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # official CIFAR-10 test order
    # the JPEG copies are close to the exact images (mean abs error of a few /255)
    xj, _ = jpeg.get_batch(slice(0, 20))
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    assert float(((x - xj) * std).abs().mean()) < 0.05
