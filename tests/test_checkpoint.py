"""zsq.checkpoint: save_quantized / load_quantized round trips, integer weight storage, errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import registry_available, require_shared
from zsq.calibrate import calibrate, is_calibrated
from zsq.checkpoint import CONFIG_FILE, FORMAT_VERSION, INT_SUFFIX, WEIGHTS_FILE, load_quantized, read_config, save_quantized
from zsq.config import QuantConfig
from zsq.errors import CheckpointError, NotCalibratedError
from zsq.fold import fold_batchnorm
from zsq.quant import act_quantizers, quantize, weight_layers

needs_registry = pytest.mark.skipif(not registry_available(), reason="zsq.models registry (tiny_cnn) not available")


def _build(model_name: str, config: QuantConfig, *, cal: torch.Tensor | None, weights=None):
    from zsq.models import load_model

    torch.manual_seed(0)
    model, spec = load_model(model_name, pretrained=False, weights=weights)
    folded, _ = fold_batchnorm(model)
    q = quantize(folded, config)
    if cal is not None:
        calibrate(q, cal, estimator="minmax", progress=False)
    return q, spec


@pytest.fixture
def inputs(seed):
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _safetensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@needs_registry
def test_round_trip_identical_outputs(tmp_path, inputs):
    q, _ = _build("tiny_cnn", QuantConfig(wbits=4, abits=8), cal=inputs)
    with torch.no_grad():
        ref = q(inputs)
    out_dir = save_quantized(q, tmp_path / "ckpt", model_name="tiny_cnn", extra={"note": "test"})
    assert (out_dir / WEIGHTS_FILE).is_file() and (out_dir / CONFIG_FILE).is_file()
    loaded, spec, meta = load_quantized(out_dir)
    assert spec.name == "tiny_cnn"
    assert meta["model"] == "tiny_cnn" and meta["calibrated"] is True and meta["note"] == "test"
    assert meta["format_version"] == FORMAT_VERSION
    assert QuantConfig.from_dict(meta["quant_config"]) == q.zsq_config
    assert is_calibrated(loaded) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(inputs), ref)
    # Same quantizers, same ranges and scales.
    assert set(act_quantizers(loaded)) == set(act_quantizers(q))
    for name, aq in act_quantizers(q).items():
        assert torch.equal(act_quantizers(loaded)[name].scale, aq.scale)
        assert torch.equal(act_quantizers(loaded)[name].zero_point, aq.zero_point)
    for name, layer in weight_layers(q).items():
        other = weight_layers(loaded)[name]
        assert torch.equal(other.weight_quantizer.scale, layer.weight_quantizer.scale)
        assert torch.equal(other.quantized_weight(), layer.quantized_weight())


@needs_registry
def test_safetensors_stores_int8_weights(tmp_path, inputs):
    q, _ = _build("tiny_cnn", QuantConfig(), cal=inputs)
    save_quantized(q, tmp_path, model_name="tiny_cnn")
    sd = _safetensors(tmp_path / WEIGHTS_FILE)
    layers = weight_layers(q)
    assert len(layers) == 5
    int_keys = sorted(k for k in sd if k.endswith(INT_SUFFIX))
    assert int_keys == sorted(f"{n}{INT_SUFFIX}" for n in layers)
    for name, layer in layers.items():
        assert f"{name}.weight" not in sd  # no float copy of quantized weights
        w_int = sd[f"{name}{INT_SUFFIX}"]
        assert w_int.dtype == torch.int8
        assert w_int.shape == layer.weight.shape
        assert torch.equal(w_int.to(torch.int32), layer.weight_quantizer.integer(layer.weight.detach()))
        assert sd[f"{name}.bias"].dtype == torch.float32
    # ~4x smaller than storing the same state dict in float32.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(tmp_path / "float.safetensors"))
    size_int = (tmp_path / WEIGHTS_FILE).stat().st_size
    size_float = (tmp_path / "float.safetensors").stat().st_size
    assert size_int < 0.75 * size_float


@needs_registry
def test_asymmetric_weights_stored_as_uint8(tmp_path, inputs):
    q, _ = _build("tiny_cnn", QuantConfig(weight_symmetric=False, weight_granularity="per_tensor", wbits=6), cal=inputs)
    save_quantized(q, tmp_path, model_name="tiny_cnn")
    sd = _safetensors(tmp_path / WEIGHTS_FILE)
    for name in weight_layers(q):
        assert sd[f"{name}{INT_SUFFIX}"].dtype == torch.uint8
        assert int(sd[f"{name}{INT_SUFFIX}"].max()) <= 63
    loaded, _, _ = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), q(inputs))


@needs_registry
def test_round_trip_with_overrides_and_float_layers(tmp_path, inputs):
    cfg = QuantConfig(
        wbits=6, abits=7, weight_granularity="per_tensor", weight_estimator="mse",
        overrides={"@first": {"wbits": 8, "weight_granularity": "per_channel"}, "re:conv[34]": {"wbits": 3}, "fc": None},
        skip=("conv2",),
    )
    q, _ = _build("tiny_cnn", cfg, cal=inputs)
    save_quantized(q, tmp_path, model_name="tiny_cnn")
    sd = _safetensors(tmp_path / WEIGHTS_FILE)
    assert sd["fc.weight"].dtype == torch.float32 and "fc" + INT_SUFFIX not in sd
    assert sd["conv2.weight"].dtype == torch.float32
    loaded, _, meta = load_quantized(tmp_path)
    assert QuantConfig.from_dict(meta["quant_config"]) == cfg
    assert sorted(weight_layers(loaded)) == ["conv1", "conv3", "conv4"]
    assert loaded.conv3.weight_quantizer.bits == 3 and loaded.conv1.weight_quantizer.per_channel
    with torch.no_grad():
        assert torch.equal(loaded(inputs), q(inputs))


@needs_registry
def test_load_from_weights_file_path(tmp_path, inputs):
    q, _ = _build("tiny_cnn", QuantConfig(), cal=inputs)
    save_quantized(q, tmp_path, model_name="tiny_cnn")
    loaded, _, _ = load_quantized(tmp_path / WEIGHTS_FILE)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), q(inputs))
    assert read_config(tmp_path / WEIGHTS_FILE)["model"] == "tiny_cnn"


@needs_registry
def test_uncalibrated_round_trip_stays_uncalibrated(tmp_path, inputs):
    q, _ = _build("tiny_cnn", QuantConfig(), cal=None)
    save_quantized(q, tmp_path, model_name="tiny_cnn")
    loaded, _, meta = load_quantized(tmp_path)
    assert meta["calibrated"] is False and not is_calibrated(loaded)
    with pytest.raises(NotCalibratedError):
        loaded(inputs)


@pytest.mark.shared
def test_round_trip_real_cifar_resnet20(tmp_path):
    weights = require_shared("models", "resnet-cifar10-akamaster", "resnet20-12fca82f.th")
    if not registry_available():
        pytest.skip("zsq.models registry not available")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q, _ = _build("cifar_resnet20", QuantConfig(), cal=x, weights=weights)
    save_quantized(q, tmp_path, model_name="cifar_resnet20")
    loaded, _, _ = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_load_empty_dir_raises(tmp_path):
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE) as info:
        load_quantized(tmp_path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CheckpointError):
        read_config(tmp_path)


def test_load_missing_dir_raises(tmp_path):
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path / "does-not-exist")


def test_load_config_without_weights_raises(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "model": "tiny_cnn"}))
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path)


@needs_registry
def test_bad_json_and_version_raise(tmp_path, inputs):
    q, _ = _build("tiny_cnn", QuantConfig(), cal=inputs)
    save_quantized(q, tmp_path, model_name="tiny_cnn")
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_quantized(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_quantized(tmp_path)


@needs_registry
def test_checkpoint_for_other_architecture_raises(tmp_path, inputs):
    q, _ = _build("tiny_cnn", QuantConfig(), cal=inputs)
    save_quantized(q, tmp_path, model_name="tiny_cnn")
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    # Saved from tiny_cnn but claims another architecture: must fail with a clear CheckpointError.
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**meta, "model": "cifar_resnet20"}))
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path)


@needs_registry
def test_save_model_without_config_raises_and_writes_nothing(tmp_path, inputs):
    q, _ = _build("tiny_cnn", QuantConfig(), cal=inputs)
    del q.zsq_config
    out = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="zsq_config"):
        save_quantized(q, out, model_name="tiny_cnn")
    # No half-written checkpoint is left behind.
    assert not (out / WEIGHTS_FILE).exists() and not (out / CONFIG_FILE).exists()
