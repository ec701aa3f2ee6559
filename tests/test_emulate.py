"""Integer emulation (zsq.export.IntegerModel): zsq's quantized model evaluated with the arithmetic of
its exported int8 graph must give ONNX Runtime's codes, every one, and its logits.

zsq's float fake-quantized model and ONNX Runtime differ on rare near-ties (tests in test_export.py
allow one step there); the emulation must not: any code that differs is a failure.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx", reason="onnx not installed (pip install 'zsq[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'zsq[onnx]')")

import zsq  # noqa: E402
from zsq.config import QuantConfig  # noqa: E402
from zsq.errors import ConfigError, NotCalibratedError, UnsupportedQuantizerError  # noqa: E402
from zsq.export import IntegerModel, export_onnx, integer_logits, layer_parity, run_onnx  # noqa: E402
from zsq.models import load_model  # noqa: E402

from test_export import Movers, _PointwiseHeadNet, quantized, resnet20_real_export  # noqa: E402


def _assert_exact(qmodel: nn.Module, path, x: torch.Tensor) -> None:
    """Every quantized tensor has ONNX Runtime's codes, and the logits are ONNX Runtime's."""
    lp = layer_parity(qmodel, path, x, emulate=True)
    assert lp["max_steps"] == 0 and lp["mismatch_fraction"] == 0.0, {
        k: v for k, v in lp["layers"].items() if v["max_steps"]}
    got = integer_logits(qmodel, x).numpy()
    ref = run_onnx(path, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()) + 1e-6)
    assert np.array_equal(got.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(wbits=4, abits=8),
    dict(wbits=8, abits=6),
    dict(wbits=7, abits=8),
    dict(weight_granularity="per_tensor"),
], ids=["w8a8", "w4a8", "w8a6", "w7a8", "per_tensor"])
def test_codes_equal_onnx_runtime(cfg, tmp_path):
    _, qmodel, spec = quantized(**cfg)
    report = export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    _assert_exact(qmodel, report.path, zsq.gaussian_inputs(48, spec.preprocessing, seed=4))


def test_residual_adds_shortcuts_and_global_pool(tmp_path):
    """CIFAR ResNet-20 (random weights): QLinearAdd of two tensors, the option-A shortcut on codes,
    requantization by ``+ 0``, QLinearGlobalAveragePool and the QGemm classifier."""
    _, qmodel, spec = quantized("cifar_resnet20", n=8)
    report = export_onnx(qmodel, tmp_path / "r20.onnx", example_input=torch.zeros(1, 3, 32, 32))
    assert report.ort_ops.get("QLinearAdd", 0) >= 9 and report.ort_ops.get("QLinearGlobalAveragePool") == 1
    _assert_exact(qmodel, report.path, zsq.gaussian_inputs(16, spec.preprocessing, seed=5))


def test_codes_moved_by_pools_pads_and_views(tmp_path):
    torch.manual_seed(0)
    qmodel = zsq.quantize(Movers().eval(), QuantConfig())
    zsq.calibrate(qmodel, torch.randn(16, 3, 16, 16), progress=False)
    report = export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    _assert_exact(qmodel, report.path, torch.randn(32, 3, 16, 16))


def test_float_output_layer_matches(tmp_path):
    """A 1x1 conv whose output stays float (MatMulInteger in ONNX Runtime): float32(acc) * scales + bias."""
    torch.manual_seed(0)
    model = _PointwiseHeadNet().eval()
    qmodel = zsq.quantize(zsq.fold_batchnorm(model)[0], QuantConfig())
    zsq.calibrate(qmodel, torch.randn(16, 3, 8, 8), progress=False)
    path = tmp_path / "head.onnx"
    export_onnx(qmodel, path, example_input=torch.zeros(1, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    got, ref = IntegerModel(qmodel)(x).numpy(), run_onnx(path, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()) + 1e-6)


def test_differs_from_float_fake_quant_only_by_rounding_and_snapping_is_not_needed(tmp_path):
    """Without snapping the biases, the emulation still matches ONNX Runtime (it adds the same int32
    bias); zsq's float model then differs by the bias rounding, a fraction of one output step."""
    torch.manual_seed(0)
    model, spec = load_model("tiny_cnn", pretrained=False)
    qmodel = zsq.quantize(zsq.fold_batchnorm(model.eval())[0], QuantConfig())
    zsq.calibrate(qmodel, zsq.gaussian_inputs(16, spec.preprocessing, seed=1), progress=False)
    report = export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    x = zsq.gaussian_inputs(32, spec.preprocessing, seed=9)
    _assert_exact(qmodel, report.path, x)
    with torch.no_grad():
        fq = qmodel(x)
    emu = integer_logits(qmodel, x)
    assert 0 < float((fq - emu).abs().max()) < 0.5 * float(fq.abs().max())


def test_refuses_uncalibrated_and_nonuniform_models():
    model, _ = load_model("tiny_cnn", pretrained=False)
    folded, _ = zsq.fold_batchnorm(model.eval())
    with pytest.raises(NotCalibratedError, match="calibrat"):
        IntegerModel(zsq.quantize(folded, QuantConfig()))
    q = zsq.quantize(folded, QuantConfig(wbits=4, weight_quantizer="nonuniform"))
    zsq.calibrate(q, torch.randn(4, 3, 16, 16), progress=False)
    with pytest.raises(UnsupportedQuantizerError, match="uniform"):
        IntegerModel(q)


def test_bad_arguments(tmp_path):
    _, qmodel, _ = quantized()
    with pytest.raises(ConfigError, match="batched tensor"):
        integer_logits(qmodel, [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        integer_logits(qmodel, torch.zeros(2, 3, 16, 16), batch_size=0)
    with pytest.raises(ConfigError, match="chunk"):
        IntegerModel(qmodel, chunk=0)
    with pytest.raises(ConfigError, match="runs on the CPU"):
        IntegerModel(qmodel)(torch.zeros(1, 3, 16, 16, device="meta"))


def test_chunks_do_not_change_results():
    _, qmodel, spec = quantized()
    x = zsq.gaussian_inputs(7, spec.preprocessing, seed=3)
    assert torch.equal(IntegerModel(qmodel, chunk=3)(x), IntegerModel(qmodel)(x))


@pytest.mark.slow
@pytest.mark.shared
def test_resnet20_real_weights_identical_to_onnx_runtime(tmp_path):
    qmodel, report, x = resnet20_real_export(tmp_path, limit=200)
    _assert_exact(qmodel, report.path, x)
