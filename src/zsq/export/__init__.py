"""Deployment: ONNX export (QDQ int8 and FP32) and ONNX Runtime benchmarks.

``export_onnx(qmodel, path, example_input=x)`` writes the quantized model as a QDQ graph that ONNX
Runtime fuses into integer kernels; ``export_fp32_onnx`` writes the float model for comparison.
Needs the optional ``onnx`` and ``onnxruntime`` packages (``pip install 'zsq[onnx]'``).
"""

from .emulate import IntegerModel, integer_logits
from .onnx_qdq import (
    DEFAULT_OPSET,
    ExportReport,
    LayerExport,
    bias_safe_weight_scale,
    compare_onnx,
    conv_kernel_counts,
    conv_matmul_count,
    cpu_features,
    export_checkpoint,
    export_fp32_onnx,
    export_onnx,
    export_pair,
    int32_bias,
    layer_parity,
    load_session,
    logit_step,
    ort_op_counts,
    run_onnx,
    snap_biases,
    speed_advice,
)

__all__ = [
    "DEFAULT_OPSET",
    "ExportReport",
    "IntegerModel",
    "LayerExport",
    "bias_safe_weight_scale",
    "compare_onnx",
    "conv_kernel_counts",
    "conv_matmul_count",
    "cpu_features",
    "export_checkpoint",
    "export_fp32_onnx",
    "export_onnx",
    "export_pair",
    "integer_logits",
    "layer_parity",
    "load_session",
    "logit_step",
    "ort_op_counts",
    "run_onnx",
    "int32_bias",
    "snap_biases",
    "speed_advice",
]
