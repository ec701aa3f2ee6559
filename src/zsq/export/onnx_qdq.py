"""Export to ONNX: a QDQ graph that ONNX Runtime runs with int8 kernels, and the FP32 graph beside it.

The graph is written node by node from zsq's own traced (torch.fx) graph with ``onnx.helper``, so
every scale and zero-point in it is exactly the one zsq calibrated:

* each :class:`~zsq.quant.modules.ActQuantizer` becomes ``QuantizeLinear -> DequantizeLinear``
  (uint8, asymmetric; int8 when activations are symmetric) with its scale and zero-point;
* each quantized Conv/Linear weight is stored as integers in an 8-bit container, whatever its bit
  width, behind a per-channel (axis 0) or per-tensor ``DequantizeLinear``; signed weights go into
  int8, or into uint8 shifted by 128 where ONNX Runtime's u8s8 kernels could saturate on CPUs
  without VNNI (see ``_Exporter._int_weight``; ``weight_type`` chooses);
* biases are stored as int32 with scale ``input_scale * weight_scale`` (what QLinearConv/QGemm add);
  :func:`snap_biases` puts zsq's float biases on that grid so both models add the same bias;
* the rest (ReLU/ReLU6, residual ``Add``, pooling, flatten, TF-"SAME" padding, the CIFAR ResNet
  option-A shortcut, BatchNorm left unfolded) maps to the matching float ONNX operator.

Rewrites keep the graph equal to zsq's fake-quantized model while letting ONNX Runtime fuse every
convolution into an integer kernel and keep the data between them in uint8, as in the graphs its own
``quantize_static`` makes (each is exact, see the code that decides it):

1. a zero padding (``SamePad2d``, ``F.pad``) in front of an activation quantizer that feeds only
   convolutions is merged into those convolutions' ``pads`` (zero is exactly representable, so
   quantization and zero padding commute, and QLinearConv pads with the input zero-point);
2. a ReLU/ReLU6/clamp whose only consumers are activation quantizers that saturate at (or inside)
   its bounds is dropped, so that ``Conv -> QuantizeLinear`` is adjacent (ORT: QLinearConv); any other
   ReLU applied to an already quantized tensor becomes an integer ``Clip`` at the zero-point;
3. data movement on a quantized tensor (Flatten, Reshape, MaxPool, the option-A shortcut's Slice
   and zero Pad) is applied to its integer codes, dequantized after (a zero pads with the zero-point);
   a max pool that feeds only an activation quantizer gets that quantizer in front of it instead
   (quantization is non-decreasing, so it commutes with max), which makes the conv before it a
   QLinearConv;
4. a quantized tensor quantized again on another grid (``Q1 -> DQ1 -> Q2``, e.g. a residual sum and
   the ReLU after it) gets ``+ 0`` in between (``DQ1 -> Add(DQ1(zero-point)) -> Q2``), which ONNX
   Runtime runs as one vectorised QLinearAdd pass over uint8 codes; a bare ``Q1 -> DQ1 -> Q2 -> DQ2``
   would let its DoubleQDQPairsRemover merge both quantizers into one with a new scale;
5. a tensor quantized again on the *same* grid is not quantized again (no ``DQ -> Q`` pair);
6. an average pool whose result, through Flatten/Reshape only, feeds an activation quantizer is
   quantized right after the pool (``DQ -> GlobalAveragePool -> Q``: QLinearGlobalAveragePool), and
   the Flatten moves codes;
7. a quantized convolution whose output is *not* requantized (e.g. a dense-prediction head whose float
   output is the model's; EfficientNet's head conv, which feeds the average pool, is requantized since
   :func:`zsq.quantize` puts a quantizer before average pools) cannot become QLinearConv: a 1x1 one is written as
   ``Transpose(NHWC) -> MatMulInteger -> Cast -> Mul(input_scale * weight_scale) -> Add(bias) ->
   Transpose(NCHW)``, others as ``ConvInteger -> Cast -> Mul -> Add``: the exact integer computation
   of zsq's fake-quantized float convolution;
8. nodes whose results nothing uses are dropped (ONNX Runtime would run them).

Activations below 8 bits: ``QuantizeLinear`` saturates at the container range (0..255), while zsq's
quantizer clamps at ``0..2^b - 1``; the exporter inserts an integer ``Clip`` between
``QuantizeLinear`` and ``DequantizeLinear`` so both agree (ORT still fuses the convolutions).

Parity tools: :func:`compare_onnx` (end to end) and :func:`layer_parity` (each quantized tensor
given the same inputs); :class:`zsq.export.IntegerModel` (module ``emulate``) evaluates zsq's model
with the graph's integer arithmetic, code for code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ExportError, NotCalibratedError, UnsupportedLayerError
from ..graph import is_add, trace
from ..quant import primitives as P
from ..quant.modules import QUANT_LAYER_TYPES, ActQuantizer
from ..state import eval_mode

DEFAULT_OPSET = 17
MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
MAX_OPSET = 21  # newest opset this exporter is tested with (ONNX Runtime >= 1.18)
WEIGHT_TYPES = ("auto", "uint8", "int8")  # ONNX container of symmetric integer weights (see _Exporter._int_weight)
U8S8_SAFE_MAX = 64  # 2 * 255 * 64 <= 32767: u8s8 pairs cannot saturate 16 bits
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "N"
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Operators (after ONNX Runtime's graph optimisations) that count as int8 or float convolutions / matmuls.
INT8_CONV_OPS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv")
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv", "ConvTranspose")
INT8_GEMM_OPS = ("QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
FLOAT_GEMM_OPS = ("Gemm", "MatMul", "FusedGemm", "FusedMatMul")


def _onnx():
    try:
        import onnx  # noqa: F401
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError("ONNX export needs the onnx package: pip install 'zsq[onnx]' (onnx and onnxruntime)") from exc
    import onnx

    return onnx, helper, numpy_helper, TensorProto


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError("this step needs ONNX Runtime: pip install 'zsq[onnx]' (onnx and onnxruntime)") from exc
    return ort


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


@dataclass
class LayerExport:
    """How one Conv/Linear layer was written."""

    name: str
    kind: str  # Conv2d / Conv1d / Linear
    wbits: int | None  # None: float weights
    lowering: str  # "qdq" (ORT fuses to QLinearConv/QGemm), "conv_integer", "matmul_integer", "float"
    params: int
    container: str = "float32"  # ONNX dtype of the stored weight: int8, uint8 (zero-point 128) or float32

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ExportReport:
    """What :func:`export_onnx` / :func:`export_fp32_onnx` wrote, and what ONNX Runtime makes of it."""

    path: str
    format: str  # "qdq" or "fp32"
    opset: int
    input_shape: tuple[int, ...]
    file_bytes: int
    weight_bytes_stored: int  # bytes of the Conv/Linear weight tensors as stored in the file
    weight_bytes_lowbit: int  # the same weights at their true bit width (packed), scales not included
    layers: list[LayerExport] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)  # operator types in the exported graph
    ort_ops: dict[str, int] | None = None  # operator types after ONNX Runtime's optimisations
    ort_level: str | None = None
    notes: list[str] = field(default_factory=list)
    advice: str | None = None  # what runs fast on *this* CPU (see speed_advice); the file is portable

    @property
    def u8u8_layers(self) -> list[str]:
        """Integer layers whose weights are stored as uint8 (ONNX Runtime's u8u8 kernels)."""
        return [l.name for l in self.layers if l.container == "uint8" and l.lowering != "float"]

    @property
    def lowbit_file_bytes(self) -> int:
        """File size if the sub-8-bit weights were bit-packed (the true low-bit size)."""
        return self.file_bytes - self.weight_bytes_stored + self.weight_bytes_lowbit

    def _count(self, names: Sequence[str]) -> int | None:
        if self.ort_ops is None:
            return None
        return sum(self.ort_ops.get(n, 0) for n in names)

    @property
    def conv_matmuls(self) -> int:
        """Convolutions written as an integer matrix product (1x1 convs whose output stays float)."""
        return sum(1 for l in self.layers if l.lowering == "matmul_integer")

    @property
    def int8_convs(self) -> int | None:
        """Convolutions ONNX Runtime runs with an integer kernel (QLinearConv, ConvInteger, or the
        MatMulInteger of a pointwise conv)."""
        if self.ort_ops is None:
            return None
        return conv_kernel_counts(self.ort_ops, self.conv_matmuls)[0]

    @property
    def float_convs(self) -> int | None:
        return self._count(FLOAT_CONV_OPS)

    @property
    def int8_gemms(self) -> int | None:
        """Integer matrix products other than those of convolutions (QGemm of a Linear, ...)."""
        if self.ort_ops is None:
            return None
        return int(self._count(INT8_GEMM_OPS) or 0) - min(self.conv_matmuls, int(self._count(INT8_GEMM_OPS) or 0))

    @property
    def float_gemms(self) -> int | None:
        return self._count(FLOAT_GEMM_OPS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "opset": self.opset,
            "input_shape": list(self.input_shape),
            "file_bytes": self.file_bytes,
            "weight_bytes_stored": self.weight_bytes_stored,
            "weight_bytes_lowbit": self.weight_bytes_lowbit,
            "lowbit_file_bytes": self.lowbit_file_bytes,
            "ops": dict(self.ops),
            "ort": None if self.ort_ops is None else {
                "level": self.ort_level, "ops": dict(self.ort_ops), "int8_convs": self.int8_convs,
                "float_convs": self.float_convs, "int8_gemms": self.int8_gemms, "float_gemms": self.float_gemms,
            },
            "layers": [l.to_dict() for l in self.layers],
            "u8u8_layers": len(self.u8u8_layers),
            "notes": list(self.notes),
            "advice": self.advice,
        }

    def summary(self) -> str:
        mb = 1e6
        s = f"{self.path}: {self.file_bytes / mb:.2f} MB"
        if self.weight_bytes_lowbit != self.weight_bytes_stored:
            s += f" ({self.lowbit_file_bytes / mb:.2f} MB with weights at their true bit width)"
        if self.ort_ops is not None:
            conv = Counter({k: v for k, v in self.ort_ops.items() if k in INT8_CONV_OPS})
            if self.conv_matmuls:
                conv["MatMulInteger"] = self.int8_convs - sum(conv.values())  # type: ignore[operator]
            s += (f"; ONNX Runtime runs {self.int8_convs} conv(s) as int8 "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(conv.items())) or 'none'}), "
                  f"{self.float_convs} as float, {self.int8_gemms} int8 / {self.float_gemms} float gemm(s)")
        return s


# ----------------------------------------------------------------------------------------------
# Shapes: run the graph once on the example input and record every tensor's shape
# ----------------------------------------------------------------------------------------------


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(int(d) for d in out.shape)
        return out


def _record_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> dict[fx.Node, tuple[int, ...]]:
    rec = _ShapeRecorder(gm)
    p = next(gm.parameters(), None)
    x = example_input.to(p.device) if p is not None else example_input
    with eval_mode(gm), torch.no_grad():
        try:
            rec.run(x)
        except NotCalibratedError:
            raise
        except Exception as exc:
            raise ExportError(f"running the model on the example input of shape {tuple(example_input.shape)} "
                              f"failed ({type(exc).__name__}: {exc}); pass an input the model accepts") from exc
    return rec.shapes


# ----------------------------------------------------------------------------------------------
# Small helpers about fx nodes
# ----------------------------------------------------------------------------------------------


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    mod = _module(gm, node)
    if mod is not None:
        return f"layer {node.target!r} ({type(mod).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"operation {node.name!r} ({node.op} {target})"


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _active_actq(gm: fx.GraphModule, node: fx.Node) -> ActQuantizer | None:
    mod = _module(gm, node)
    if isinstance(mod, ActQuantizer) and mod.enabled:
        return mod
    return None


_RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_)
_CLAMP_FUNCS = (torch.clamp, torch.clip)


def _clip_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) when ``node`` is a ReLU / ReLU6 / Hardtanh / clamp with constant bounds, else None."""
    mod = _module(gm, node)
    if mod is not None:
        if isinstance(mod, nn.ReLU6):
            return 0.0, 6.0
        if isinstance(mod, nn.ReLU):
            return 0.0, math.inf
        if isinstance(mod, nn.Hardtanh):
            return float(mod.min_val), float(mod.max_val)
        return None
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return 0.0, math.inf
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        return float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))
    if (node.op == "call_function" and node.target in _CLAMP_FUNCS) or (
            node.op == "call_method" and node.target in ("clamp", "clip")):
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return None
        return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0, math.inf
    return None


def _quantizer_saturates_within(q: ActQuantizer, lo: float, hi: float) -> bool:
    """Whether clamping to [lo, hi] before ``q`` changes nothing: ``q(clamp(x)) == q(x)`` for all x.

    True when lo quantizes to (or below) qmin and hi to (or above) qmax, computed with the same
    float32 arithmetic as the quantizer (monotonicity does the rest).
    """
    qmin, qmax = q.qrange
    s = q.scale.detach().float().cpu()
    z = int(q.zero_point)
    inv = 1.0 / s

    def code(v: float) -> float:
        return float(torch.round(torch.tensor(v, dtype=torch.float32) * inv)) + z

    lo_ok = math.isinf(lo) and lo < 0 or code(lo) <= qmin
    hi_ok = math.isinf(hi) and hi > 0 or code(hi) >= qmax
    return bool(lo_ok and hi_ok)


def _zero_pad_2d(gm: fx.GraphModule, node: fx.Node, shapes: dict) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) of a constant-zero padding of the last two dims, else None."""
    from ..models.efficientnet_lite import SamePad2d

    mod = _module(gm, node)
    src = node.args[0] if node.args else None
    if isinstance(mod, SamePad2d):
        if not isinstance(src, fx.Node) or src not in shapes or len(shapes[src]) != 4:
            return None
        return tuple(int(v) for v in mod.pads(shapes[src][-2], shapes[src][-1]))  # type: ignore[return-value]
    if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)) and float(getattr(mod, "value", 0.0)) == 0.0:
        pads = tuple(int(v) for v in mod.padding)
        return pads if len(pads) == 4 else None  # type: ignore[return-value]
    if node.op == "call_function" and node.target is F.pad:
        pads = _arg(node, 1, "pad")
        mode = _arg(node, 2, "mode", "constant")
        value = _arg(node, 3, "value", None)
        if mode == "constant" and (value is None or float(value) == 0.0) and isinstance(pads, (list, tuple)) \
                and len(pads) == 4 and all(isinstance(v, int) for v in pads):
            return tuple(pads)  # type: ignore[return-value]
    return None


# ----------------------------------------------------------------------------------------------
# The graph writer
# ----------------------------------------------------------------------------------------------


@dataclass
class _QInfo:
    """A float tensor that is the output of DequantizeLinear: where its integer codes are, and how."""

    int_name: str
    scale: float
    zero_point: int
    dtype: Any  # np.uint8 / np.int8
    scale_name: str = ""
    zp_name: str = ""
    qrange: tuple[int, int] | None = None  # the codes lie in qmin..qmax (None: anywhere in the container)

    def code_range(self) -> tuple[int, int]:
        if self.qrange is not None:
            return self.qrange
        limits = np.iinfo(self.dtype)
        return int(limits.min), int(limits.max)


class _Writer:
    """Collects ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        _, self.helper, self.numpy_helper, self.TP = _onnx()
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.used: set[str] = {INPUT_NAME, OUTPUT_NAME}
        self.weight_names: dict[str, int] = {}  # weight initializer -> its bit width (8 for float/int8)

    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "._/" else "_" for c in hint) or "t"
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def const(self, hint: str, value: np.ndarray | float | int, dtype: Any = None) -> str:
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        name = self.fresh(hint)
        self.inits.append(self.numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, *, n_out: int = 1, domain: str = "", **attrs: Any) -> Any:
        outs = [self.fresh(hint if n_out == 1 else f"{hint}_{i}") for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op, list(inputs), outs, name=self.fresh(f"{hint}/{op}"),
                                                domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs


class _Exporter:
    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]], *, opset: int, quantized: bool,
                 weight_type: str = "auto"):
        self.gm = gm
        self.weight_type = weight_type
        self.containers: dict[int, str] = {}
        self.off_grid_biases: list[str] = []
        self.wscales: dict[int, torch.Tensor] = {}
        self.current = ""
        self.act_codes: dict[str, list[str]] = {}  # activation quantizer -> [integer tensor, dtype]
        self.shapes = shapes
        self.opset = opset
        self.quantized = quantized
        self.w = _Writer()
        self.val: dict[fx.Node, str] = {}
        self.qinfo: dict[str, _QInfo] = {}
        self.alias: dict[fx.Node, fx.Node] = {}
        self.extra_pads: dict[fx.Node, tuple[int, int, int, int]] = {}
        self.hoisted: dict[fx.Node, fx.Node] = {}  # max pool -> the activation quantizer moved in front of it
        self.layers: list[LayerExport] = []
        self.notes: list[str] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []

    # -- pre-passes ------------------------------------------------------------------------------

    def users(self, n: fx.Node) -> list[fx.Node]:
        """Consumers of ``n`` looking through nodes that are replaced by their input."""
        out: list[fx.Node] = []
        for u in n.users:
            if u in self.alias:
                out.extend(self.users(u))
            else:
                out.append(u)
        return out

    def plan(self) -> None:
        gm = self.gm
        nodes = list(gm.graph.nodes)
        # Identity-like modules disappear first.
        for n in nodes:
            mod = _module(gm, n)
            if isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
                self.alias[n] = n.args[0]
            elif n.op == "call_function" and n.target in (F.dropout, F.dropout2d, torch.dropout):
                self.alias[n] = n.args[0]
            elif n.op == "call_method" and n.target in ("contiguous",):
                self.alias[n] = n.args[0]
            elif isinstance(mod, ActQuantizer) and not mod.enabled:
                self.alias[n] = n.args[0]
        # 1. zero padding -> [activation quantizer] -> convolutions only: merge into the conv pads.
        for n in nodes:
            if n in self.alias:
                continue
            pads = _zero_pad_2d(gm, n, self.shapes)
            if pads is None:
                continue
            users = self.users(n)
            chain: fx.Node = n
            if len(users) == 1 and _active_actq(gm, users[0]) is not None:
                chain = users[0]
                users = self.users(chain)
            convs = [u for u in users if isinstance(_module(gm, u), nn.Conv2d)]
            if not users or len(convs) != len(users):
                continue
            if any(_module(gm, c).padding_mode != "zeros" or c.args[0] is not chain for c in convs):  # type: ignore[union-attr]
                continue
            for c in convs:
                l, r, t, b = self.extra_pads.get(c, (0, 0, 0, 0))
                self.extra_pads[c] = (l + pads[0], r + pads[1], t + pads[2], b + pads[3])
            self.alias[n] = n.args[0]
            self.notes.append(f"{_describe(gm, n)}: zero padding merged into the pads of "
                              + ", ".join(repr(str(c.target)) for c in convs))
        # 2. A max pool whose only consumer is an activation quantizer: quantize in front of it instead
        #    (a quantizer is non-decreasing, so it commutes with max), and the pool moves integer codes.
        if self.quantized:
            for n in nodes:
                if n in self.alias or not isinstance(_module(gm, n), nn.MaxPool2d):
                    continue
                users = self.users(n)
                if len(users) == 1 and _active_actq(gm, users[0]) is not None:
                    self.hoisted[n] = users[0]
        # 3. ReLU/ReLU6/clamp feeding only activation quantizers that saturate inside its bounds: drop.
        if self.quantized:
            for n in nodes:
                if n in self.alias:
                    continue
                bounds = _clip_bounds(gm, n)
                if bounds is None:
                    continue
                users = self.quant_users(n)
                qs = [_active_actq(gm, u) for u in users]
                if users and all(q is not None and bool(q.calibrated) and _quantizer_saturates_within(q, *bounds)
                                 for q in qs):
                    self.alias[n] = n.args[0]

    # -- helpers -------------------------------------------------------------------------------

    def resolve(self, a: Any) -> Any:
        while isinstance(a, fx.Node) and a in self.alias:
            a = self.alias[a]
        return a

    def v(self, a: Any, where: fx.Node) -> str:
        if isinstance(a, fx.Node):
            while a in self.alias:
                a = self.alias[a]
            if a not in self.val:
                raise UnsupportedLayerError(
                    f"cannot export {_describe(self.gm, where)} to ONNX: its input {a.name!r} is not a tensor "
                    "zsq can export (only tensor data flow through supported layers is exportable)")
            return self.val[a]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return self.w.const("const", np.float32(a))
        raise UnsupportedLayerError(f"cannot export {_describe(self.gm, where)} to ONNX: argument {a!r} is not supported")

    def shape(self, a: fx.Node) -> tuple[int, ...]:
        while a in self.alias:
            a = self.alias[a]
        return self.shapes[a]

    def unsupported(self, n: fx.Node, why: str = "") -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"cannot export {_describe(self.gm, n)} to ONNX{': ' + why if why else ''}. Supported: Conv1d/Conv2d, "
            "Linear, ReLU/ReLU6/Hardtanh/clamp, Sigmoid, SiLU, Hardswish, Hardsigmoid, Tanh, add, mul, cat, "
            "flatten/view/reshape, AdaptiveAvgPool2d, AvgPool2d, MaxPool2d, mean over H,W, zero padding "
            "(SamePad2d, F.pad, ZeroPad2d), the CIFAR option-A shortcut, BatchNorm, Dropout/Identity; keep "
            "unsupported layers out of the exported model or replace them"
        )

    # -- main walk ---------------------------------------------------------------------------------

    def run(self) -> None:
        self.plan()
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ExportError(f"zsq exports models with exactly one input tensor; this one has {len(placeholders)}")
        for n in self.gm.graph.nodes:
            if n in self.alias:
                continue
            if n.op == "placeholder":
                shape = self.shapes[n]
                self.inputs.append(self.w.helper.make_tensor_value_info(
                    INPUT_NAME, self.w.TP.FLOAT, [BATCH_DIM, *shape[1:]]))
                self.val[n] = INPUT_NAME
            elif n.op == "output":
                self.emit_output(n)
            elif n.op == "call_module":
                self.emit_module(n, _module(self.gm, n))
            elif n.op in ("call_function", "call_method"):
                self.emit_function(n)
            elif n.op == "get_attr":
                raise self.unsupported(n, "parameters used outside of layers cannot be exported")

    def emit_output(self, n: fx.Node) -> None:
        out = n.args[0]
        if not isinstance(out, fx.Node):
            raise ExportError("zsq exports models that return one tensor (logits); this one returns "
                              f"{type(out).__name__}")
        name = self.v(out, n)
        shape = self.shape(out)
        if name == INPUT_NAME or any(i.name == name for i in self.w.inits):
            name = self.w.node("Identity", [name], "output")
        for node in self.w.nodes:  # rename the producer's output tensor to OUTPUT_NAME
            for lst in (node.input, node.output):
                for i, t in enumerate(lst):
                    if t == name:
                        lst[i] = OUTPUT_NAME
        self.outputs.append(self.w.helper.make_tensor_value_info(OUTPUT_NAME, self.w.TP.FLOAT, [BATCH_DIM, *shape[1:]]))

    # -- modules -----------------------------------------------------------------------------------

    def emit_module(self, n: fx.Node, mod: nn.Module | None) -> None:
        from ..models.cifar_resnet import ShortcutA

        w = self.w
        hint = str(n.target)
        if isinstance(mod, ActQuantizer):
            self.emit_actq(n, mod)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            self.emit_conv(n, mod)
        elif isinstance(mod, nn.Linear):
            self.emit_linear(n, mod)
        elif _clip_bounds(self.gm, n) is not None:
            self.emit_clip(n, *_clip_bounds(self.gm, n))  # type: ignore[misc]
        elif isinstance(mod, nn.Sigmoid):
            self.val[n] = w.node("Sigmoid", [self.v(n.args[0], n)], hint)
        elif isinstance(mod, nn.Tanh):
            self.val[n] = w.node("Tanh", [self.v(n.args[0], n)], hint)
        elif isinstance(mod, nn.SiLU):
            x = self.v(n.args[0], n)
            self.val[n] = w.node("Mul", [x, w.node("Sigmoid", [x], hint + ".sigmoid")], hint)
        elif isinstance(mod, nn.Hardswish):
            self.emit_hardswish(n, self.v(n.args[0], n), hint)
        elif isinstance(mod, nn.Hardsigmoid):
            self.val[n] = w.node("HardSigmoid", [self.v(n.args[0], n)], hint, alpha=1.0 / 6.0, beta=0.5)
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            self.emit_adaptive_avg(n, mod.output_size)
        elif isinstance(mod, nn.AvgPool2d):
            if mod.divisor_override is not None:
                raise self.unsupported(n, "divisor_override has no ONNX equivalent")
            k = _pair(mod.kernel_size)
            s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
            p = _pair(mod.padding)
            self.val[n] = self.quantize_pooled(n, w.node(
                "AveragePool", [self.v(n.args[0], n)], hint, kernel_shape=k, strides=s, pads=[p[0], p[1], p[0], p[1]],
                ceil_mode=int(mod.ceil_mode), count_include_pad=int(mod.count_include_pad)))
        elif isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                raise self.unsupported(n, "return_indices=True")
            k, s, p, d = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding), _pair(mod.dilation)
            attrs = dict(kernel_shape=k, strides=s, pads=[p[0], p[1], p[0], p[1]], dilations=d,
                         ceil_mode=int(mod.ceil_mode))
            x = self.v(n.args[0], n)
            if n in self.hoisted:
                qn = self.hoisted[n]
                q = _module(self.gm, qn)
                self._check_actq(qn, q)  # type: ignore[arg-type]
                info = self.qinfo.get(x)
                if info is None or not self._same_grid(info, q):  # type: ignore[arg-type]
                    x = self.quantize_to(self._requantize_input(x, str(qn.target)), q, str(qn.target))  # type: ignore[arg-type]
            self.val[n] = self.on_codes(x, "MaxPool", [], hint, **attrs) or w.node("MaxPool", [x], hint, **attrs)
        elif isinstance(mod, nn.Flatten):
            self.emit_flatten(n, mod.start_dim, mod.end_dim)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            self.emit_batchnorm(n, mod)
        elif isinstance(mod, ShortcutA):
            x = self.v(n.args[0], n)
            rank = len(self.shape(n.args[0]))
            if rank != 4:
                raise self.unsupported(n, f"expected a 4-d input, got rank {rank}")
            # Subsample and zero-pad the channels; on the integer codes when the input is quantized
            # (exact: a Slice moves codes, and the zero-point code dequantizes to exactly 0).
            info = self.qinfo.get(x)
            src = info.int_name if info is not None else x
            sl = w.node("Slice", [src, w.const("starts", np.array([0, 0], np.int64)),
                                  w.const("ends", np.array([INT64_MAX, INT64_MAX], np.int64)),
                                  w.const("axes", np.array([2, 3], np.int64)),
                                  w.const("steps", np.array([2, 2], np.int64))], hint + ".subsample")
            self.val[n] = self.pad_node(sl, [0, mod.pad, 0, 0, 0, mod.pad, 0, 0], hint, info=info)
        elif _zero_pad_2d(self.gm, n, self.shapes) is not None:
            l, r, t, b = _zero_pad_2d(self.gm, n, self.shapes)  # type: ignore[misc]
            x = self.v(n.args[0], n)
            info = self.qinfo.get(x)
            self.val[n] = self.pad_node(info.int_name if info is not None else x, [0, 0, t, l, 0, 0, b, r], hint,
                                        info=info)
        else:
            raise self.unsupported(n)

    def pad_node(self, x: str, pads: list[int], hint: str, *, info: _QInfo | None = None) -> str:
        """Zero padding of ``x``; with ``info``, ``x`` holds integer codes on ``info``'s grid: pad them
        with the zero-point and dequantize after."""
        w = self.w
        value = np.float32(0.0) if info is None else np.asarray(info.zero_point, dtype=info.dtype)
        out = w.node("Pad", [x, w.const("pads", np.array(pads, np.int64)), w.const("pad_value", value)],
                     hint if info is None else hint + ".codes", mode="constant")
        if info is None:
            return out
        r0, r1 = info.code_range()
        return self.dequantized(out, info, hint, qrange=(min(r0, info.zero_point), max(r1, info.zero_point)))

    def emit_hardswish(self, n: fx.Node, x: str, hint: str) -> None:
        w = self.w
        if self.opset >= 14:
            self.val[n] = w.node("HardSwish", [x], hint)
        else:
            hs = w.node("HardSigmoid", [x], hint + ".hardsigmoid", alpha=1.0 / 6.0, beta=0.5)
            self.val[n] = w.node("Mul", [x, hs], hint)

    def _integer_code(self, info: _QInfo, v: float) -> int | None:
        """The integer code of ``v`` on ``info``'s grid when ``v`` lies exactly on it, else None."""
        c = np.float32(v) / np.float32(info.scale)
        if not np.isfinite(c) or c != np.round(c):
            return None
        code = int(np.round(c)) + info.zero_point
        return code if np.float32((code - info.zero_point)) * np.float32(info.scale) == np.float32(v) else None

    @staticmethod
    def hint(n: fx.Node) -> str:
        return str(n.target) if n.op == "call_module" else n.name

    def emit_clip(self, n: fx.Node, lo: float, hi: float) -> None:
        w = self.w
        hint = self.hint(n)
        x = self.v(n.args[0], n)
        info = self.qinfo.get(x)
        if info is not None:
            # On a dequantized tensor whose bounds lie on its grid (ReLU: 0 is the zero-point), clamp the
            # integer codes instead: exact, and it keeps ONNX Runtime from merging the quantizers around it.
            lo_c = None if math.isinf(lo) else self._integer_code(info, lo)
            hi_c = None if math.isinf(hi) else self._integer_code(info, hi)
            if (lo_c is not None or math.isinf(lo)) and (hi_c is not None or math.isinf(hi)):
                limits = np.iinfo(info.dtype)
                lo_c = limits.min if lo_c is None else max(lo_c, limits.min)
                hi_c = limits.max if hi_c is None else min(hi_c, limits.max)
                qt = w.node("Clip", [info.int_name, w.const("clip_min", np.asarray(lo_c, info.dtype)),
                                     w.const("clip_max", np.asarray(hi_c, info.dtype))], hint + ".codes")
                r0, r1 = info.code_range()
                self.val[n] = self.dequantized(qt, info, hint, qrange=(max(r0, lo_c), min(r1, hi_c)))
                return
        if lo == 0.0 and math.isinf(hi):
            self.val[n] = w.node("Relu", [x], hint)
            return
        ins = [x, "" if math.isinf(lo) else w.const("clip_min", np.float32(lo)),
               "" if math.isinf(hi) else w.const("clip_max", np.float32(hi))]
        while ins and ins[-1] == "":
            ins.pop()
        self.val[n] = w.node("Clip", ins, hint)

    def emit_actq(self, n: fx.Node, q: ActQuantizer) -> None:
        self._check_actq(n, q)
        hint = str(n.target)
        x = self.v(n.args[0], n)
        info = self.qinfo.get(x)
        if info is not None and self._same_grid(info, q):
            # Already on this quantizer's grid (e.g. pooled and quantized in front of a Flatten, see
            # emit_pool): quantizing again changes nothing, and a DQ -> Q pair would cost a pass.
            self.val[n] = x
            self.act_codes[hint] = [info.int_name, np.dtype(info.dtype).name]
            return
        self.val[n] = self.quantize_to(self._requantize_input(x, hint), q, hint)

    def _check_actq(self, n: fx.Node, q: ActQuantizer) -> None:
        if q.observer is not None:
            raise ExportError(f"activation quantizer {n.target!r} is observing (inside zsq.calibrate?); "
                              "export after calibration has finished")
        if not bool(q.calibrated):
            raise NotCalibratedError(f"activation quantizer {n.target!r} was never calibrated: run "
                                     "zsq.calibrate(model, data) before exporting")
        qmin, qmax = q.qrange
        limits = np.iinfo(self._act_dtype(q))
        if qmin < limits.min or qmax > limits.max:
            raise ExportError(f"activation quantizer {n.target!r} has range {qmin}..{qmax}, which does not fit "
                              f"in {np.dtype(self._act_dtype(q)).name}")

    @staticmethod
    def _act_dtype(q: ActQuantizer) -> Any:
        return np.int8 if q.symmetric else np.uint8

    def _same_grid(self, info: _QInfo, q: ActQuantizer) -> bool:
        """Whether ``q(dequantize(codes)) == codes`` for every code ``info`` can hold."""
        qmin, qmax = q.qrange
        r0, r1 = info.code_range()
        return (info.dtype is self._act_dtype(q) and info.scale == float(np.float32(float(q.scale)))
                and info.zero_point == int(q.zero_point) and qmin <= r0 and r1 <= qmax)

    def quantize_to(self, x: str, q: ActQuantizer, hint: str) -> str:
        """``QuantizeLinear -> [Clip] -> DequantizeLinear`` with ``q``'s scale and zero-point; the
        constants are named ``<hint>.scale`` / ``<hint>.zero_point`` and the codes are recorded for
        :func:`layer_parity` under ``hint`` (the quantizer's name)."""
        w = self.w
        qmin, qmax = q.qrange
        dtype = self._act_dtype(q)
        limits = np.iinfo(dtype)
        s = w.const(hint + ".scale", np.float32(float(q.scale)))
        z = w.const(hint + ".zero_point", np.asarray(int(q.zero_point), dtype=dtype))
        qt = w.node("QuantizeLinear", [x, s, z], hint + ".q")
        if (qmin, qmax) != (limits.min, limits.max):
            # QuantizeLinear saturates at the container range; zsq's quantizer at qmin..qmax.
            qt = w.node("Clip", [qt, w.const(hint + ".qmin", np.asarray(qmin, dtype=dtype)),
                                 w.const(hint + ".qmax", np.asarray(qmax, dtype=dtype))], hint + ".clip")
        out = w.node("DequantizeLinear", [qt, s, z], hint)
        self.qinfo[out] = _QInfo(qt, float(np.float32(float(q.scale))), int(q.zero_point), dtype, s, z,
                                 qrange=(qmin, qmax))
        self.act_codes[hint] = [qt, np.dtype(dtype).name]
        return out

    def dequantized(self, codes: str, like: _QInfo, hint: str, *, qrange: tuple[int, int] | None = None) -> str:
        """``DequantizeLinear`` of integer ``codes`` on ``like``'s grid (made by an integer op on
        ``like.int_name``: a Clip, Slice, Pad, Flatten, ...), recorded as a quantized tensor."""
        out = self.w.node("DequantizeLinear", [codes, like.scale_name, like.zp_name], hint)
        self.qinfo[out] = dataclasses.replace(like, int_name=codes, qrange=qrange if qrange is not None else like.qrange)
        return out

    def on_codes(self, x: str, op: str, extra: Sequence[str], hint: str, **attrs: Any) -> str | None:
        """Apply a data-movement op (Flatten, Reshape, Slice, MaxPool, ...) to the integer codes behind
        ``x`` and dequantize after it: the same values as applying it to ``x`` (these ops commute with
        an elementwise increasing map), and ONNX Runtime moves uint8 instead of float. None when ``x``
        is not a dequantized tensor."""
        info = self.qinfo.get(x)
        if info is None:
            return None
        codes = self.w.node(op, [info.int_name, *extra], hint + ".codes", **attrs)
        return self.dequantized(codes, info, hint)

    def _requantize_input(self, x: str, hint: str) -> str:
        """A dequantized tensor about to be quantized on another grid (``Q1 -> DQ1 -> Q2``) first gets
        zero added, as ``Add(DQ1(codes), DQ1(zero-point))``, for two reasons. ONNX Runtime fuses
        ``DQ -> Add -> Q`` into QLinearAdd, whose vectorised kernel then requantizes the codes in one
        pass over uint8 data (measured: several times faster than ``DequantizeLinear`` followed by
        ``QuantizeLinear``, or than a lookup table); adding exactly 0 changes no value. And written as
        a bare ``Q1 -> DQ1 -> Q2 -> DQ2``, ONNX Runtime's DoubleQDQPairsRemover would replace both
        quantizers by one with a *new* scale (the intersection of the two ranges), which is not what
        zsq computes."""
        info = self.qinfo.get(x)
        if info is None:
            return x
        w = self.w
        zero = w.const(hint + ".zero_code", np.asarray(info.zero_point, dtype=info.dtype))
        zero = w.node("DequantizeLinear", [zero, info.scale_name, info.zp_name], hint + ".zero")
        return w.node("Add", [x, zero], hint + ".requant")

    def _wscale(self, mod: nn.Module, xq: _QInfo | None) -> torch.Tensor:
        """The weight scales written for ``mod``: zsq's, except for channels whose int32 bias would
        overflow (see :func:`bias_safe_weight_scale`; :func:`snap_biases` makes the model agree)."""
        wq = mod.weight_quantizer
        if xq is None or mod.bias is None or not wq.per_channel:
            return wq.scale.detach().float().cpu()
        safe = bias_safe_weight_scale(mod.bias, xq.scale, wq.scale)
        if not torch.equal(safe, wq.scale.detach().float().cpu()):
            self.notes.append(f"layer {self.current!r}: weight scale enlarged on {int((safe != wq.scale.cpu()).sum())} "
                              "channel(s) whose int32 bias would overflow; zsq.export.snap_biases(qmodel) applies "
                              "the same to the PyTorch model")
        return safe

    def _int_weight(self, mod: nn.Module, weight: torch.Tensor,
                    scale: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
        """Integer weights in their ONNX container, zero-points, container dtype (np.int8 / np.uint8).

        Symmetric (signed) weights go either into int8, or into uint8 shifted by 128 (zero-point 128:
        the same real values). ONNX Runtime multiplies uint8 activations with int8 weights (u8s8) using
        VPMADDUBSW on x86 CPUs without VNNI, which adds pairs of products in saturating 16-bit
        arithmetic: exact only while ``2 * 255 * max|w| <= 32767``, i.e. ``max|w| <= 64`` (7-bit
        weights). Its u8u8 kernels are exact everywhere but, without VNNI, no faster than float.
        ``weight_type="auto"`` uses int8 where the result is exact on every CPU (depthwise convs, which
        have their own kernel, and layers whose integer weights satisfy ``max|w| <= 64``) and uint8
        elsewhere; ``"int8"`` always uses int8 (exact and fast on VNNI CPUs, may saturate on AVX2-only
        ones); ``"uint8"`` always uses uint8. ConvInteger layers always use uint8 (see emit_conv_integer).
        """
        wq = mod.weight_quantizer
        qmin, qmax = wq.qrange
        if scale is None:
            q = wq.integer(weight).cpu().numpy().astype(np.int32)
        else:
            s_, z_ = (scale, wq.zero_point.cpu()) if wq.per_channel else (scale[0], wq.zero_point.cpu()[0])
            q = P.quantize(weight, s_, z_, qmin, qmax, axis=wq.axis).numpy().astype(np.int32)
        zp = wq.zero_point.detach().cpu().numpy().astype(np.int32)
        if qmin >= 0:  # asymmetric weights: already unsigned
            self.containers[id(mod)] = "uint8"
            return q.astype(np.uint8), zp.astype(np.uint8), np.uint8
        signed = self.weight_type == "int8"
        if self.weight_type == "auto":
            depthwise = isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups > 1 and \
                mod.groups == mod.in_channels == mod.out_channels
            signed = depthwise or int(np.abs(q).max(initial=0)) <= U8S8_SAFE_MAX
        self.containers[id(mod)] = "int8" if signed else "uint8"
        if signed:
            return q.astype(np.int8), zp.astype(np.int8), np.int8
        return (q + 128).astype(np.uint8), (zp + 128).astype(np.uint8), np.uint8

    def _weight(self, mod: nn.Module, hint: str, *, xq: _QInfo | None = None,
                transpose: bool = False) -> tuple[str, Any, int | None]:
        """The weight as an ONNX tensor name; returns (name, weight quantizer or None, bits)."""
        w = self.w
        wq = getattr(mod, "weight_quantizer", None) if isinstance(mod, QUANT_LAYER_TYPES) else None
        if wq is not None and not getattr(mod, "quant_enabled", True):
            wq = None
        weight = mod.weight.detach().cpu().float()
        if wq is None:
            arr = weight.numpy()
            name = w.const(hint + ".weight", arr.T.copy() if transpose else arr)
            w.weight_names[name] = 32
            return name, None, None
        self.current = hint
        wscale = self._wscale(mod, xq)
        self.wscales[id(mod)] = wscale
        qarr, zp, dtype = self._int_weight(mod, weight, wscale)
        axis = 0
        if transpose:
            qarr, axis = qarr.T.copy(), 1
        name = w.const(hint + ".weight_q", qarr)
        w.weight_names[name] = int(wq.bits)
        scale = wscale.numpy()
        if wq.per_channel:
            s = w.const(hint + ".weight_scale", scale)
            z = w.const(hint + ".weight_zero_point", zp)
            dq = w.node("DequantizeLinear", [name, s, z], hint + ".weight", axis=axis)
        else:
            s = w.const(hint + ".weight_scale", np.float32(scale[0]))
            z = w.const(hint + ".weight_zero_point", np.asarray(zp[0], dtype=dtype))
            dq = w.node("DequantizeLinear", [name, s, z], hint + ".weight")
        return dq, wq, int(wq.bits)

    def _int_bias(self, mod: nn.Module, xq: _QInfo, wq: Any, hint: str) -> str:
        """Bias as int32 with scale input_scale * weight_scale (per channel), behind DequantizeLinear."""
        w = self.w
        scale = self.wscales.get(id(mod), wq.scale.detach().cpu().float())
        ws = scale if wq.per_channel else scale[:1]
        bq, bs = int32_bias(mod.bias, xq.scale, ws)
        b = mod.bias.detach().cpu().double().numpy()
        bs_full = np.broadcast_to(bs, b.shape).astype(np.float64)
        if not np.array_equal((bq * bs_full).astype(np.float32), b.astype(np.float32)):
            self.off_grid_biases.append(hint)
        if np.any(np.abs(bq) >= INT32_MAX):
            self.notes.append(f"layer {hint!r}: bias saturated at the int32 range")
        if not wq.per_channel:
            bs = np.float32(bs[0])
        q = w.const(hint + ".bias_q", bq.astype(np.int32))
        if np.ndim(bs) == 0:
            return w.node("DequantizeLinear", [q, w.const(hint + ".bias_scale", np.float32(bs)),
                                               w.const(hint + ".bias_zero_point", np.int32(0))], hint + ".bias")
        return w.node("DequantizeLinear", [q, w.const(hint + ".bias_scale", bs),
                                           w.const(hint + ".bias_zero_point", np.zeros(bs.shape, np.int32))],
                      hint + ".bias", axis=0)

    def quant_users(self, n: fx.Node) -> list[fx.Node]:
        """:meth:`users`, with each max pool that has its quantizer moved in front replaced by it."""
        return [self.hoisted.get(u, u) for u in self.users(n)]

    def _requantized(self, n: fx.Node) -> bool:
        users = self.quant_users(n)
        return bool(users) and all(_active_actq(self.gm, u) is not None for u in users)

    def emit_conv(self, n: fx.Node, mod: nn.Conv1d | nn.Conv2d) -> None:
        w = self.w
        hint = str(n.target)
        if mod.padding_mode != "zeros":
            raise self.unsupported(n, f"padding_mode={mod.padding_mode!r} (only zero padding is exportable)")
        x = self.v(n.args[0], n)
        xq = self.qinfo.get(x)
        nd = 1 if isinstance(mod, nn.Conv1d) else 2
        k = list(mod.kernel_size)
        pads = self._conv_pads(n, mod, nd)
        attrs = dict(kernel_shape=k, strides=list(mod.stride), dilations=list(mod.dilation), group=mod.groups, pads=pads)
        kind = type(mod).__name__.replace("Quant", "")
        wq_mod = getattr(mod, "weight_quantizer", None) if isinstance(mod, QUANT_LAYER_TYPES) else None
        integer_ok = (wq_mod is not None and getattr(mod, "quant_enabled", True) and xq is not None)
        if integer_ok and not self._requantized(n) and wq_mod.symmetric and xq.dtype is np.uint8:
            self.emit_conv_integer(n, mod, xq, attrs, hint, kind)
            return
        wname, wq, bits = self._weight(mod, hint, xq=xq)
        ins = [x, wname]
        if mod.bias is not None:
            if wq is not None and xq is not None:
                ins.append(self._int_bias(mod, xq, wq, hint))
            else:
                ins.append(w.const(hint + ".bias", mod.bias.detach().cpu().float().numpy()))
        self.val[n] = w.node("Conv", ins, hint, **attrs)
        lowering = "qdq" if (wq is not None and xq is not None) else "float"
        if lowering == "qdq" and not self._requantized(n):
            users = ", ".join(repr(u.name) for u in self.users(n))
            why = ("its weights are asymmetric" if not wq.symmetric else
                   "its input is signed int8" if xq.dtype is np.int8 else "its input is not a quantized tensor")
            self.notes.append(f"layer {hint!r}: its output is not requantized (it feeds {users}) and {why}, so "
                              "ONNX Runtime runs it as a float convolution")
            lowering = "float"
        elif wq is not None and xq is None and self.quantized:
            self.notes.append(f"layer {hint!r}: quantized weights but a float input; it runs as a float convolution")
        self.layers.append(LayerExport(hint, kind, bits, lowering, int(mod.weight.numel()),
                                       self.containers.get(id(mod), "float32")))

    def emit_conv_integer(self, n: fx.Node, mod: nn.Module, xq: _QInfo, attrs: dict, hint: str, kind: str) -> None:
        """ConvInteger -> Cast -> Mul(x_scale * w_scale) -> Add(bias): the exact integer form of a
        fake-quantized conv whose output stays float."""
        w = self.w
        wq = mod.weight_quantizer
        if (isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1) and tuple(mod.stride) == (1, 1)
                and mod.groups == 1 and not any(attrs["pads"])):
            self.emit_pointwise_integer(n, mod, xq, hint, kind)
            return
        # ConvInteger always gets uint8 weights: exact (u8u8) on every CPU, and ONNX Runtime's ConvInteger
        # with int8 weights measured 3-4x slower here (AMD EPYC, AVX2, ORT 1.32).
        saved, self.weight_type = self.weight_type, "uint8"
        try:
            q, zp, dtype = self._int_weight(mod, mod.weight.detach().cpu().float())
        finally:
            self.weight_type = saved
        wname = w.const(hint + ".weight_q", q)
        w.weight_names[wname] = int(wq.bits)
        ins = [xq.int_name, wname, w.const(hint + ".x_zero_point", np.asarray(xq.zero_point, np.uint8))]
        if dtype is np.uint8:
            ins.append(w.const(hint + ".weight_zero_point", np.asarray(128, np.uint8)))
        acc = w.node("ConvInteger", ins, hint + ".acc", **attrs)
        accf = w.node("Cast", [acc], hint + ".acc_float", to=w.TP.FLOAT)
        ws = wq.scale.detach().cpu().float().numpy() if wq.per_channel else np.full(q.shape[0], float(wq.scale[0]), np.float32)
        bcast = [1, q.shape[0]] + [1] * (q.ndim - 2)
        scale = (np.float32(xq.scale) * ws.astype(np.float32)).astype(np.float32).reshape(bcast)
        out = w.node("Mul", [accf, w.const(hint + ".out_scale", scale)], hint + ".scaled" if mod.bias is not None else hint)
        if mod.bias is not None:
            out = w.node("Add", [out, w.const(hint + ".bias", mod.bias.detach().cpu().float().numpy().reshape(bcast))], hint)
        self.val[n] = out
        self.layers.append(LayerExport(hint, kind, int(wq.bits), "conv_integer", int(mod.weight.numel()),
                                       self.containers[id(mod)]))

    def emit_pointwise_integer(self, n: fx.Node, mod: nn.Conv2d, xq: _QInfo, hint: str, kind: str) -> None:
        """A 1x1 convolution whose output stays float, as an integer matrix product over channels-last
        codes: ``Transpose(NHWC) -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) -> Add(bias) ->
        Transpose(NCHW)``; the same integers as ConvInteger. ONNX Runtime keeps the convolutions before
        it in NHWC, so the first Transpose cancels against its own, and MatMulInteger takes int8
        weights at full speed (ConvInteger does not; see emit_conv_integer), so exact 7-bit weights
        (``weight_type="auto"``) run the fast u8s8 kernel."""
        w = self.w
        wq = mod.weight_quantizer
        q, zp, dtype = self._int_weight(mod, mod.weight.detach().cpu().float())
        cout = q.shape[0]
        mat = np.ascontiguousarray(q.reshape(cout, -1).T)  # (C_in, C_out)
        wname = w.const(hint + ".weight_q", mat)
        w.weight_names[wname] = int(wq.bits)
        xt = w.node("Transpose", [xq.int_name], hint + ".input_nhwc", perm=[0, 2, 3, 1])
        ins = [xt, wname, w.const(hint + ".x_zero_point", np.asarray(xq.zero_point, np.uint8)),
               w.const(hint + ".weight_zero_point", np.asarray(zp.reshape(-1)[0], dtype))]  # symmetric: one value
        acc = w.node("MatMulInteger", ins, hint + ".acc")
        accf = w.node("Cast", [acc], hint + ".acc_float", to=w.TP.FLOAT)
        ws = wq.scale.detach().cpu().float().numpy() if wq.per_channel else np.full(cout, float(wq.scale[0]), np.float32)
        scale = (np.float32(xq.scale) * ws.astype(np.float32)).astype(np.float32)
        out = w.node("Mul", [accf, w.const(hint + ".out_scale", scale)], hint + ".scaled")
        if mod.bias is not None:
            out = w.node("Add", [out, w.const(hint + ".bias", mod.bias.detach().cpu().float().numpy())], hint + ".biased")
        self.val[n] = w.node("Transpose", [out], hint, perm=[0, 3, 1, 2])
        self.layers.append(LayerExport(hint, kind, int(wq.bits), "matmul_integer", int(mod.weight.numel()),
                                       self.containers[id(mod)]))

    def _conv_pads(self, n: fx.Node, mod: nn.Module, nd: int) -> list[int]:
        k, d = list(mod.kernel_size), list(mod.dilation)
        if isinstance(mod.padding, str):
            if mod.padding == "valid":
                begin, end = [0] * nd, [0] * nd
            else:  # "same" (stride 1): PyTorch puts the odd extra on the end
                tot = [d[i] * (k[i] - 1) for i in range(nd)]
                begin = [t // 2 for t in tot]
                end = [t - t // 2 for t in tot]
        else:
            begin = list(mod.padding)
            end = list(mod.padding)
        if n in self.extra_pads:
            l, r, t, b = self.extra_pads[n]
            begin = [begin[0] + t, begin[1] + l]
            end = [end[0] + b, end[1] + r]
        return [int(v) for v in begin + end]

    def emit_linear(self, n: fx.Node, mod: nn.Linear) -> None:
        w = self.w
        hint = str(n.target)
        x = self.v(n.args[0], n)
        xq = self.qinfo.get(x)
        rank = len(self.shape(n.args[0]))
        if rank == 2:
            wname, wq, bits = self._weight(mod, hint, xq=xq)
            ins = [x, wname]
            if mod.bias is not None:
                # QGemm needs an int32 bias (a float bias keeps Gemm in float in ONNX Runtime).
                ins.append(self._int_bias(mod, xq, wq, hint) if (wq is not None and xq is not None)
                           else w.const(hint + ".bias", mod.bias.detach().cpu().float().numpy()))
            self.val[n] = w.node("Gemm", ins, hint, transB=1)
        else:
            wname, wq, bits = self._weight(mod, hint, transpose=True)
            out = w.node("MatMul", [x, wname], hint + ".matmul" if mod.bias is not None else hint)
            if mod.bias is not None:
                out = w.node("Add", [out, w.const(hint + ".bias", mod.bias.detach().cpu().float().numpy())], hint)
            self.val[n] = out
        lowering = "qdq" if (wq is not None and xq is not None) else "float"
        self.layers.append(LayerExport(hint, "Linear", bits, lowering, int(mod.weight.numel()),
                                       self.containers.get(id(mod), "float32")))

    def emit_adaptive_avg(self, n: fx.Node, output_size: Any) -> None:
        w = self.w
        shape = self.shape(n.args[0])
        if len(shape) != 4:
            raise self.unsupported(n, f"expected a 4-d input, got shape {shape}")
        h, wd = shape[-2:]
        oh, ow = _pair(output_size) if output_size is not None else (h, wd)
        oh, ow = oh or h, ow or wd
        x = self.v(n.args[0], n)
        if (oh, ow) == (1, 1):
            self.val[n] = self.quantize_pooled(n, w.node("GlobalAveragePool", [x], str(n.name)))
        elif h % oh == 0 and wd % ow == 0:
            kk = [h // oh, wd // ow]
            self.val[n] = self.quantize_pooled(n, w.node("AveragePool", [x], str(n.name), kernel_shape=kk, strides=kk))
        else:
            raise self.unsupported(n, f"adaptive pooling from {h}x{wd} to {oh}x{ow} is not a fixed pooling window")

    def _shape_only(self, n: fx.Node) -> bool:
        """Flatten / view / reshape: ops that move values without changing them."""
        if isinstance(_module(self.gm, n), nn.Flatten):
            return True
        return n.op in ("call_function", "call_method") and n.target in (torch.flatten, "flatten", "view", "reshape",
                                                                         torch.reshape)

    def _pooled_quantizer(self, n: fx.Node) -> tuple[fx.Node, ActQuantizer] | None:
        """The activation quantizer that alone consumes ``n``, through flatten/reshape (and dropout or
        identity, which are aliased away) only; None otherwise."""
        cur = n
        for _ in range(16):
            users = [u for u in self.users(cur) if not (
                u.op == "call_method" and u.target in ("size", "dim") or u.op == "call_function" and u.target is getattr)]
            if len(users) != 1:
                return None
            u = users[0]
            q = _active_actq(self.gm, u)
            if q is not None:
                return u, q
            if not self._shape_only(u):
                return None
            cur = u
        return None

    def quantize_pooled(self, n: fx.Node, out: str) -> str:
        """Quantize an average pool's output right away with the quantizer that its flattened form
        feeds: ``DequantizeLinear -> (Global)AveragePool -> QuantizeLinear`` is what ONNX Runtime fuses
        into QLinear(Global)AveragePool, and the Flatten after it then moves integer codes. Exact: the
        flatten does not change values, so quantizing before or after it gives the same codes; the
        quantizer itself then finds its input on its own grid (emit_actq) and adds nothing."""
        found = self._pooled_quantizer(n) if self.quantized else None
        if found is None:
            return out
        qn, q = found
        self._check_actq(qn, q)
        return self.quantize_to(out, q, str(qn.target))

    def emit_flatten(self, n: fx.Node, start: int, end: int) -> None:
        shape = self.shape(n.args[0])
        rank = len(shape)
        start, end = start % rank, end % rank
        x = self.v(n.args[0], n)
        if start == 0:
            raise self.unsupported(n, "flattening the batch dimension")
        if end == rank - 1:
            self.val[n] = self.on_codes(x, "Flatten", [], n.name, axis=start) or \
                self.w.node("Flatten", [x], n.name, axis=start)
        else:
            target = self.w.const("shape", np.array([0] * start + [-1] + list(shape[end + 1:]), np.int64))
            self.val[n] = self.on_codes(x, "Reshape", [target], n.name) or \
                self.w.node("Reshape", [x, target], n.name)

    def emit_batchnorm(self, n: fx.Node, bn: nn.modules.batchnorm._BatchNorm) -> None:
        w = self.w
        if bn.running_mean is None or bn.running_var is None:
            raise self.unsupported(n, "BatchNorm without running statistics")
        c = bn.num_features
        hint = str(n.target)
        scale = bn.weight.detach().cpu().float().numpy() if bn.affine else np.ones(c, np.float32)
        bias = bn.bias.detach().cpu().float().numpy() if bn.affine else np.zeros(c, np.float32)
        self.val[n] = w.node("BatchNormalization", [
            self.v(n.args[0], n), w.const(hint + ".weight", scale), w.const(hint + ".bias", bias),
            w.const(hint + ".running_mean", bn.running_mean.detach().cpu().float().numpy()),
            w.const(hint + ".running_var", bn.running_var.detach().cpu().float().numpy())], hint, epsilon=float(bn.eps))
        if self.quantized:
            self.notes.append(f"layer {hint!r}: BatchNorm left unfolded runs in float")

    # -- functions and methods -------------------------------------------------------------------

    def emit_function(self, n: fx.Node) -> None:
        w = self.w
        t = n.target
        hint = n.name
        if n.op == "call_function" and t is getattr or n.op == "call_method" and t in ("size", "dim"):
            return  # shape queries: used only by reshape/view, whose shapes come from the recorded run
        if is_add(n) or (t in (operator.add, operator.iadd, torch.add, "add", "add_") and len(n.args) >= 2):
            if "alpha" in n.kwargs and n.kwargs["alpha"] != 1:
                raise self.unsupported(n, "add with alpha != 1")
            self.val[n] = w.node("Add", [self.v(n.args[0], n), self.v(n.args[1], n)], hint)
        elif t in (operator.mul, operator.imul, torch.mul, "mul", "mul_"):
            self.val[n] = w.node("Mul", [self.v(n.args[0], n), self.v(n.args[1], n)], hint)
        elif t in (operator.sub, torch.sub, "sub"):
            self.val[n] = w.node("Sub", [self.v(n.args[0], n), self.v(n.args[1], n)], hint)
        elif _clip_bounds(self.gm, n) is not None:
            self.emit_clip(n, *_clip_bounds(self.gm, n))  # type: ignore[misc]
        elif t in (torch.sigmoid, F.sigmoid, "sigmoid"):
            self.val[n] = w.node("Sigmoid", [self.v(n.args[0], n)], hint)
        elif t in (torch.tanh, F.tanh, "tanh"):
            self.val[n] = w.node("Tanh", [self.v(n.args[0], n)], hint)
        elif t is F.silu:
            x = self.v(n.args[0], n)
            self.val[n] = w.node("Mul", [x, w.node("Sigmoid", [x], hint + ".sigmoid")], hint)
        elif t is F.hardswish:
            self.emit_hardswish(n, self.v(n.args[0], n), hint)
        elif t is F.hardsigmoid:
            self.val[n] = w.node("HardSigmoid", [self.v(n.args[0], n)], hint, alpha=1.0 / 6.0, beta=0.5)
        elif t in (torch.flatten, "flatten"):
            self.emit_flatten(n, int(_arg(n, 1, "start_dim", 0)), int(_arg(n, 2, "end_dim", -1)))
        elif t in ("view", "reshape", torch.reshape):
            src, out = n.args[0], self.shapes.get(n)
            if out is None or out[0] != self.shape(src)[0]:
                raise self.unsupported(n, "only reshapes that keep the batch dimension are exportable")
            x, shape = self.v(src, n), w.const("shape", np.array([0, *out[1:]], np.int64))
            self.val[n] = self.on_codes(x, "Reshape", [shape], hint) or w.node("Reshape", [x, shape], hint)
        elif t is F.adaptive_avg_pool2d:
            self.emit_adaptive_avg(n, _arg(n, 1, "output_size"))
        elif t in (torch.mean, "mean"):
            self.emit_mean(n)
        elif t in (torch.cat, torch.concat):
            tensors = _arg(n, 0, "tensors")
            dim = int(_arg(n, 1, "dim", 0))
            if dim == 0:
                raise self.unsupported(n, "concatenation along the batch dimension")
            self.val[n] = w.node("Concat", [self.v(a, n) for a in tensors], hint, axis=dim)
        elif _zero_pad_2d(self.gm, n, self.shapes) is not None:
            l, r, tp, b = _zero_pad_2d(self.gm, n, self.shapes)  # type: ignore[misc]
            x = self.v(n.args[0], n)
            info = self.qinfo.get(x)
            self.val[n] = self.pad_node(info.int_name if info is not None else x, [0, 0, tp, l, 0, 0, b, r], hint,
                                        info=info)
        else:
            raise self.unsupported(n)

    def emit_mean(self, n: fx.Node) -> None:
        shape = self.shape(n.args[0])
        dims = _arg(n, 1, "dim")
        keep = bool(_arg(n, 2, "keepdim", False))
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if len(shape) != 4 or sorted(d % 4 for d in dims) != [2, 3]:
            raise self.unsupported(n, "only the mean over the two spatial dimensions of a 4-d tensor is exportable")
        g = self.quantize_pooled(n, self.w.node("GlobalAveragePool", [self.v(n.args[0], n)],
                                                n.name + ("" if keep else ".pool")))
        self.val[n] = g if keep else (self.on_codes(g, "Flatten", [], n.name, axis=1) or
                                      self.w.node("Flatten", [g], n.name, axis=1))

    # -- model -------------------------------------------------------------------------------------

    def prune(self) -> None:
        """Drop nodes whose outputs nothing uses (e.g. the DequantizeLinear of a tensor whose integer
        codes are clipped directly), and initializers nothing reads. ONNX Runtime keeps such nodes and
        runs them, each with a Transpose back from its NHWC layout."""
        needed = {o.name for o in self.outputs}
        kept: list[Any] = []
        for node in reversed(self.w.nodes):
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(i for i in node.input if i)
        self.w.nodes = kept[::-1]
        self.w.inits = [t for t in self.w.inits if t.name in needed]

    def model(self, *, doc: str, metadata: dict[str, str]) -> Any:
        onnx, helper, _, _ = _onnx()
        self.prune()
        graph = helper.make_graph(self.w.nodes, "zsq", self.inputs, self.outputs, initializer=self.w.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="zsq", doc_string=doc)
        from .. import __version__

        model.producer_version = __version__
        # The oldest IR version that carries this opset: loadable by older ONNX Runtime releases too.
        model.ir_version = helper.find_min_ir_version_for(opsets)
        helper.set_model_props(model, metadata)
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported ONNX graph does not validate ({type(exc).__name__}: {exc}); "
                              "please report this with the model that caused it") from exc
        return model


def conv_kernel_counts(ort_ops: dict[str, int], conv_matmuls: int = 0) -> tuple[int, int]:
    """(integer, float) convolution kernels in ONNX Runtime's optimised graph, given its operator
    counts and how many convolutions the exporter wrote as MatMulInteger (:func:`conv_matmul_count`)."""
    int8 = sum(ort_ops.get(o, 0) for o in INT8_CONV_OPS)
    int8 += min(conv_matmuls, sum(ort_ops.get(o, 0) for o in INT8_GEMM_OPS))
    return int8, sum(ort_ops.get(o, 0) for o in FLOAT_CONV_OPS)


def conv_matmul_count(path: str | os.PathLike[str]) -> int:
    """How many convolutions of a zsq export are written as MatMulInteger (from its metadata; 0 for
    files zsq did not write)."""
    onnx, *_ = _onnx()
    m = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    lowering = json.loads(props.get("zsq.lowering", "{}"))
    return sum(1 for v in lowering.values() if v == "matmul_integer")


def _pair(v: Any) -> list[int]:
    if isinstance(v, (tuple, list)):
        return [int(a) if a is not None else 0 for a in v]
    return [int(v), int(v)]


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset={opset!r} is not supported: choose an ONNX opset between {MIN_OPSET} "
                          f"(per-channel QuantizeLinear/DequantizeLinear) and {MAX_OPSET}; default {DEFAULT_OPSET}")
    return opset


def _check_example(example_input: Any) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2 or example_input.shape[0] < 1:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise ExportError(f"example_input must be a float tensor (batch, channels, ...) the model accepts, got {shape}; "
                          "its spatial size is fixed in the exported graph (the batch size stays dynamic)")
    return example_input[:1].detach().float()


def _require_calibrated(model: nn.Module, *, before: str) -> None:
    """Raise NotCalibratedError naming the activation quantizers that have no range yet."""
    missing = [n for n, m in model.named_modules() if isinstance(m, ActQuantizer) and m.enabled and not bool(m.calibrated)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise NotCalibratedError(f"the model is not calibrated ({len(missing)} activation quantizer(s) have no range: "
                                 f"{shown}); run zsq.calibrate(model, data) (or `zsq quantize`) before {before}")


def _write(model_proto: Any, path: str | os.PathLike[str]) -> Path:
    onnx, *_ = _onnx()
    p = Path(path)
    if p.exists() and p.is_dir():
        raise ExportError(f"--out {p} is a directory; give the path of the .onnx file to write")
    p.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model_proto, str(p))
    return p


def _weight_bytes(model_proto: Any, weight_bits: dict[str, int]) -> tuple[int, int]:
    _, _, numpy_helper, _ = _onnx()
    stored = lowbit = 0
    for t in model_proto.graph.initializer:
        if t.name not in weight_bits:
            continue
        arr = numpy_helper.to_array(t)
        stored += arr.nbytes
        bits = weight_bits[t.name]
        lowbit += arr.nbytes if bits >= 32 else (arr.size * bits + 7) // 8
    return stored, lowbit


def cpu_features(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU model and the x86 features that decide ONNX Runtime's int8 kernels: ``avx2``,
    ``avx512_vnni``, ``avx_vnni`` and ``vnni`` (either VNNI). Values are None where unknown."""
    out: dict[str, Any] = {"cpu": None, "avx2": None, "avx512_vnni": None, "avx_vnni": None, "vnni": None}
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("model name") and out["cpu"] is None:
            out["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            out.update(avx2="avx2" in flags, avx512_vnni="avx512_vnni" in flags, avx_vnni="avx_vnni" in flags)
            out["vnni"] = out["avx512_vnni"] or out["avx_vnni"]
            break
    return out


def speed_advice(u8u8_layers: int, cpu: dict[str, Any]) -> str | None:
    """What to choose for int8 speed on ``cpu`` (see :func:`cpu_features`), for an export with
    ``u8u8_layers`` layers whose 8-bit weights are stored as uint8; None when nothing applies."""
    if not u8u8_layers or cpu.get("vnni") is None:
        return None
    name = cpu.get("cpu") or "this CPU"
    if not cpu["vnni"]:
        return (f"{name} has no VNNI (AVX-512 VNNI / AVX-VNNI): the {u8u8_layers} layer(s) whose 8-bit weights are "
                "stored as uint8 (exact on every CPU) run ONNX Runtime's u8u8 kernels, no faster than float here. "
                "For int8 that is exact and fast on this CPU, quantize with 7-bit weights (`zsq quantize ... --wbits 7 "
                "--export onnx`): they run the u8s8 kernels, which cannot saturate (2 x 255 x 64 <= 32767). "
                "Weight type int8 (`zsq export --weight-type int8`, `zsq quantize --export-weight-type int8`) is as "
                "fast but saturates 16-bit sums here, which changes results")
    return (f"{name} has VNNI: its u8s8 kernels accumulate in 32 bits, so weight type int8 (`zsq export --weight-type "
            f"int8`, `zsq quantize --export-weight-type int8`) is exact and faster here for the {u8u8_layers} layer(s) "
            "now stored as uint8 (the default keeps the file exact on every CPU)")


BIAS_CODE_TARGET = 2**24  # |int32 bias| given to a channel whose weight scale had to grow (exact in float32)


def bias_safe_weight_scale(bias: torch.Tensor, x_scale: torch.Tensor | float, w_scale: torch.Tensor) -> torch.Tensor:
    """Per-channel weight scales for which ``bias / (x_scale * w_scale)`` fits in int32.

    Integer kernels add the bias as int32 codes of scale ``x_scale * w_scale``. A channel whose weights
    are (nearly) zero, common after BatchNorm folding with a tiny gamma, gets a tiny weight scale, and
    its bias would need codes beyond 2^31: such channels get the scale ``|b| / (x_scale * 2^24)``
    instead (their tiny weights then quantize to zero or a few codes), as ONNX Runtime's own quantizer
    does. Other channels keep their scale.
    """
    ws = w_scale.detach().float().cpu()
    xs = torch.as_tensor(x_scale, dtype=torch.float32).cpu()
    b = bias.detach().double().cpu()
    bs = (xs * ws).double()
    over = (b / bs).abs() > INT32_MAX
    if not bool(over.any()):
        return ws
    grown = (b.abs() / (xs.double() * BIAS_CODE_TARGET)).float()
    return torch.where(over, torch.maximum(grown, ws), ws)


def int32_bias(bias: torch.Tensor, x_scale: Any, w_scale: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The int32 bias codes an integer kernel adds, and their float32 scale ``x_scale * w_scale``.

    ``w_scale`` is per channel, or one value for all channels. Codes are rounded half to even and
    saturated at the int32 range; returns ``(codes as float64, scales as float32)``.
    """
    b = bias.detach().cpu().double().numpy()
    ws = np.asarray(torch.as_tensor(w_scale).detach().cpu().float().numpy(), dtype=np.float32).reshape(-1)
    bs = (np.float32(float(x_scale)) * ws).astype(np.float32)
    bs_full = np.broadcast_to(bs, b.shape).astype(np.float64)
    bq = np.clip(np.round(b / bs_full), -INT32_MAX, INT32_MAX)
    return bq, np.broadcast_to(bs, b.shape).astype(np.float32)


def _reject_nonuniform(qmodel: nn.Module) -> None:
    """QDQ (and every integer ONNX operator) needs an affine grid ``(q - zero_point) * scale``; a
    non-uniform codebook is not one, so such layers cannot be exported (see docs/hybrid_nonuniform.md)."""
    from ..errors import UnsupportedQuantizerError
    from ..quant.nonuniform import is_nonuniform

    bad = [n for n, m in qmodel.named_modules()
           if isinstance(m, QUANT_LAYER_TYPES) and is_nonuniform(m.weight_quantizer)]
    if bad:
        shown = ", ".join(repr(b) for b in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise UnsupportedQuantizerError(
            f"cannot export {len(bad)} layer(s) with non-uniform (codebook) weights ({shown}) to ONNX: QDQ and the "
            "integer ONNX operators only express uniform grids (q - zero_point) * scale, not a codebook. Quantize "
            "with uniform weights (weight_quantizer='uniform', CLI --weight-quantizer uniform) to export, or keep "
            "the non-uniform model as a zsq checkpoint (zsq.save_quantized / `zsq quantize --out`)")


def snap_biases(qmodel: nn.Module) -> list[str]:
    """Round the bias of every quantized Conv/Linear, in place, to the int32 grid an integer runtime uses.

    Integer kernels (QLinearConv, QGemm) add the bias as an int32 with scale
    ``input_scale * weight_scale``; rounding to that grid moves a bias by at most half of it, a few
    thousandths of the output's quantization step, but in a deep network the rare codes it flips
    spread from layer to layer. After this call zsq's fake-quantized model and the exported graph
    add the same bias. Channels whose bias does not fit in int32 at all get a larger weight scale
    first (:func:`bias_safe_weight_scale`; per-channel weights only, per-tensor ones are clamped).
    Call it after :func:`zsq.calibrate` (it needs the input scales); calling it again changes
    nothing. Returns the names of the layers it changed.
    """
    gm = trace(qmodel)
    done: list[str] = []
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if not isinstance(mod, QUANT_LAYER_TYPES) or mod.bias is None or mod.weight_quantizer is None:
            continue
        if not hasattr(mod.weight_quantizer, "scale"):  # non-uniform codebook: no int32 bias grid
            continue
        src = node.args[0] if node.args else None
        q = _module(gm, src) if isinstance(src, fx.Node) else None
        if not isinstance(q, ActQuantizer) or not q.enabled or not bool(q.calibrated):
            continue
        wq = mod.weight_quantizer
        changed = False
        with torch.no_grad():
            if wq.per_channel:
                safe = bias_safe_weight_scale(mod.bias, q.scale, wq.scale).to(wq.scale.device)
                if not torch.equal(safe, wq.scale):
                    wq.scale.copy_(safe)
                    changed = True
            ws = wq.scale.detach().cpu() if wq.per_channel else wq.scale.detach().cpu()[:1]
            bq, bs = int32_bias(mod.bias, q.scale, ws)  # the codes and scales written to the ONNX file
            snapped = torch.from_numpy(bq * bs.astype(np.float64)).to(mod.bias)
            if not torch.equal(snapped, mod.bias.detach()):
                mod.bias.copy_(snapped)
                changed = True
        if changed:
            done.append(str(node.target))
    return done


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_input: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    weight_type: str = "auto",
    verify: bool = True,
) -> ExportReport:
    """Write ``qmodel`` (made by :func:`zsq.quantize` and calibrated) as a QDQ ONNX graph.

    ``example_input`` fixes the input's channels and spatial size (TF-"SAME" padding amounts depend
    on it); the batch dimension stays dynamic. With ``verify`` (default) ONNX Runtime loads the file,
    applies its graph optimisations, and the report lists the operators it will run
    (``report.int8_convs`` / ``report.float_convs``).

    Raises :class:`NotCalibratedError` for an uncalibrated model, :class:`UnsupportedLayerError`
    naming the first layer that has no ONNX equivalent, :class:`ExportError` otherwise.
    """
    if not isinstance(qmodel, nn.Module):
        raise ExportError(f"qmodel must be a torch.nn.Module made by zsq.quantize, got {type(qmodel).__name__}")
    opset = _check_opset(opset)
    if weight_type not in WEIGHT_TYPES:
        raise ExportError(f"weight_type={weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
    x = _check_example(example_input)
    _reject_nonuniform(qmodel)
    has_q = any(isinstance(m, ActQuantizer) for m in qmodel.modules()) or any(
        isinstance(m, QUANT_LAYER_TYPES) and m.weight_quantizer is not None for m in qmodel.modules())
    if not has_q:
        raise ExportError("the model has no quantizers: quantize it with zsq.quantize (and zsq.calibrate) first, "
                          "or export the float model with export_fp32_onnx")
    observing = [n for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer) and m.observer is not None]
    if observing:
        raise ExportError(f"activation quantizer {observing[0]!r} is observing (inside zsq.calibrate?); "
                          "export after calibration has finished")
    _require_calibrated(qmodel, before="exporting")
    gm = trace(qmodel)
    shapes = _record_shapes(gm, x)
    ex = _Exporter(gm, shapes, opset=opset, quantized=True, weight_type=weight_type)
    ex.run()
    if any(isinstance(m, ActQuantizer) and m.symmetric and m.enabled for m in qmodel.modules()):
        ex.notes.append("signed (int8) activations: ONNX Runtime's CPU kernels fuse QDQ convolutions with uint8 "
                        "activations only, so expect float convolutions (use asymmetric activations, zsq's default)")
    if ex.off_grid_biases:
        ex.notes.append(
            f"{len(ex.off_grid_biases)} bias(es) (e.g. {ex.off_grid_biases[0]!r}) are not on the int32 grid the integer "
            "kernels use, so ONNX Runtime adds a bias rounded by up to half a grid step; call "
            "zsq.export.snap_biases(qmodel) after calibration for bit-level parity with the PyTorch model")
    bits = {l.name: l.wbits for l in ex.layers}
    cfg = getattr(qmodel, "zsq_config", None)
    meta = {"zsq.format": "qdq", "zsq.weight_bits": json.dumps(bits),
            "zsq.lowering": json.dumps({l.name: l.lowering for l in ex.layers}),
            "zsq.weight_containers": json.dumps({l.name: l.container for l in ex.layers}),
            "zsq.input_shape": json.dumps([BATCH_DIM, *x.shape[1:]]), "zsq.act_codes": json.dumps(ex.act_codes)}
    if cfg is not None and hasattr(cfg, "to_dict"):
        meta["zsq.quant_config"] = json.dumps(cfg.to_dict())
    proto = ex.model(doc="zsq QDQ export: QuantizeLinear/DequantizeLinear with zsq's calibrated scales", metadata=meta)
    p = _write(proto, path)
    stored, lowbit = _weight_bytes(proto, ex.w.weight_names)
    report = ExportReport(str(p), "qdq", opset, tuple(x.shape), p.stat().st_size, stored, lowbit, ex.layers,
                          dict(Counter(n.op_type for n in proto.graph.node)), notes=ex.notes)
    if verify:
        report.ort_level = "extended"
        report.ort_ops = ort_op_counts(p, level="extended")
    report.advice = speed_advice(len(report.u8u8_layers), cpu_features())
    return report


def export_fp32_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_input: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
) -> ExportReport:
    """Write the float model (BatchNorm folded or not) as a plain FP32 ONNX graph, for comparison."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, ActQuantizer) for m in model.modules()) or any(
            isinstance(m, QUANT_LAYER_TYPES) and m.weight_quantizer is not None for m in model.modules()):
        raise ExportError("export_fp32_onnx got a quantized model; pass the float model (or use export_onnx)")
    opset = _check_opset(opset)
    x = _check_example(example_input)
    gm = trace(model)
    shapes = _record_shapes(gm, x)
    ex = _Exporter(gm, shapes, opset=opset, quantized=False)
    ex.run()
    proto = ex.model(doc="zsq FP32 export", metadata={"zsq.format": "fp32",
                                                      "zsq.input_shape": json.dumps([BATCH_DIM, *x.shape[1:]])})
    p = _write(proto, path)
    stored, _ = _weight_bytes(proto, ex.w.weight_names)
    report = ExportReport(str(p), "fp32", opset, tuple(x.shape), p.stat().st_size, stored, stored, ex.layers,
                          dict(Counter(n.op_type for n in proto.graph.node)), notes=ex.notes)
    if verify:
        report.ort_level = "extended"
        report.ort_ops = ort_op_counts(p, level="extended")
    return report


def export_pair(
    fp32_model: nn.Module,
    qmodel: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    example_input: torch.Tensor,
    weight_type: str = "auto",
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    check_inputs: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Write ``model.int8.onnx`` (``qmodel`` as QDQ) and ``model.fp32.onnx`` (``fp32_model``) into
    ``out_dir``: what ``zsq quantize ... --export onnx`` does.

    With ``verify`` (default) ONNX Runtime loads both files and optimises them (the reports count
    the int8 and float convolutions it will run), and the int8 file is run on ``check_inputs``
    (default: ``example_input``) and compared with ``qmodel`` (:func:`compare_onnx`). Returns a dict
    for report.json: ``{"int8": report, "fp32": report, "files": {...}, "cpu": cpu_features(),
    "advice": str | None, "parity": compare_onnx result or None}``.
    """
    out = Path(out_dir)
    files = {"int8": out / "model.int8.onnx", "fp32": out / "model.fp32.onnx"}
    rq = export_onnx(qmodel, files["int8"], example_input=example_input, opset=opset, weight_type=weight_type,
                     verify=verify)
    rf = export_fp32_onnx(fp32_model, files["fp32"], example_input=example_input, opset=opset, verify=verify)
    parity = None
    if verify:
        x = check_inputs if check_inputs is not None else example_input
        try:
            parity = compare_onnx(qmodel, files["int8"], x.detach().cpu().float())
        except ExportError as exc:  # e.g. the last layer's input is not quantized: no "output step"
            rq.notes.append(f"parity check skipped: {exc}")
    return {"int8": rq.to_dict(), "fp32": rf.to_dict(), "files": {k: str(v) for k, v in files.items()},
            "cpu": cpu_features(), "advice": rq.advice, "parity": parity}


# ----------------------------------------------------------------------------------------------
# ONNX Runtime helpers
# ----------------------------------------------------------------------------------------------

ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def session_options(*, threads: int = 1, level: str = "all", profile_prefix: str | None = None) -> Any:
    """ONNX Runtime session options: ``threads`` intra-op threads, one inter-op thread, sequential."""
    ort = _ort()
    if level not in ORT_LEVELS:
        raise ExportError(f"level={level!r} is not one of {', '.join(ORT_LEVELS)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def load_session(path: str | os.PathLike[str], *, threads: int = 1, level: str = "all") -> Any:
    """An ONNX Runtime CPU inference session for ``path``."""
    ort = _ort()
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p} does not exist; write it with `zsq export` or zsq.export.export_onnx")
    try:
        return ort.InferenceSession(str(p), session_options(threads=threads, level=level),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load {p}: {exc}") from exc


def ort_op_counts(path: str | os.PathLike[str], *, level: str = "extended") -> dict[str, int]:
    """Operator types (with counts) of the graph ONNX Runtime runs after its ``level`` optimisations."""
    onnx, *_ = _onnx()
    ort = _ort()
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(level=level)
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        m = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in m.graph.node).items()))


def run_onnx(
    path_or_session: Any, inputs: torch.Tensor | np.ndarray, *, batch_size: int = 64, threads: int = 1
) -> np.ndarray:
    """Outputs of the ONNX model for ``inputs`` (N, ...), in batches; returns a float32 array."""
    sess = path_or_session if hasattr(path_or_session, "run") else load_session(path_or_session, threads=threads)
    x = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    x = x.astype(np.float32, copy=False)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, x.shape[0], batch_size)]
    return np.concatenate(outs, axis=0)


def logit_step(qmodel: nn.Module) -> float:
    """How far one quantization step of the last activation quantizer moves the logits.

    The logits come from a float-output Linear whose input is quantized with scale ``s``; when every
    input of it moves by one step, logit ``j`` moves by at most ``s * sum_k |W_jk|``. This is the
    "one output quantization step" the parity tests hold the ONNX model to.
    """
    gm = trace(qmodel)
    last = None
    for n in gm.graph.nodes:
        mod = _module(gm, n)
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            last = (n, mod)
    if last is None:
        raise ExportError("the model has no Conv/Linear layer")
    n, mod = last
    src = n.args[0]
    q = _module(gm, src) if isinstance(src, fx.Node) else None
    if not isinstance(q, ActQuantizer):
        raise ExportError(f"the input of the last layer {n.target!r} is not quantized")
    w = mod.quantized_weight() if isinstance(mod, QUANT_LAYER_TYPES) else mod.weight
    return float(q.scale) * float(w.detach().abs().flatten(1).sum(dim=1).max())


def compare_onnx(
    qmodel: nn.Module, path: str | os.PathLike[str], inputs: torch.Tensor, *, batch_size: int = 64, threads: int = 1
) -> dict[str, Any]:
    """Outputs of zsq's fake-quantized PyTorch model vs the exported ONNX model on ``inputs``.

    Returns ``n``, ``max_abs_diff``, ``mean_abs_diff``, ``logit_step`` (see :func:`logit_step`),
    ``max_diff_steps`` (max_abs_diff / logit_step) and ``agreement`` (percent of equal top-1); and
    ``integer_max_abs_diff`` / ``integer_agreement``: the same against zsq's integer emulation of the
    graph (:class:`zsq.export.IntegerModel`), which should be 0 / 100.
    """
    from ..evaluate import logits_of
    from .emulate import integer_logits

    ref = logits_of(qmodel, inputs, batch_size=batch_size).numpy()
    got = run_onnx(path, inputs, batch_size=batch_size, threads=threads)
    emu = integer_logits(qmodel, inputs, batch_size=batch_size).numpy()
    diff = np.abs(ref - got)
    step = logit_step(qmodel)
    return {
        "n": int(ref.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_step": step,
        "max_diff_steps": float(diff.max() / step) if step > 0 else math.inf,
        "agreement": float(100.0 * np.mean(ref.argmax(1) == got.argmax(1))),
        "integer_max_abs_diff": float(np.abs(emu - got).max()),
        "integer_agreement": float(100.0 * np.mean(emu.argmax(1) == got.argmax(1))),
    }


def layer_parity(
    qmodel: nn.Module, path: str | os.PathLike[str], inputs: torch.Tensor, *, threads: int = 1, emulate: bool = False
) -> dict[str, Any]:
    """Layer-by-layer parity: each quantized tensor of the ONNX model vs what zsq's layers compute
    from the *same* inputs (ONNX Runtime's values of the previous quantized tensors).

    End-to-end comparisons mix two effects: how each layer computes, and how a rare one-code
    difference spreads through later layers. Here every activation quantizer of zsq's model is fed
    ONNX Runtime's own codes of the tensors before it, so each layer is judged alone. Returns
    ``{"layers": {name: {"max_steps", "mismatch_fraction"}}, "max_steps", "mismatch_fraction",
    "logits_max_abs_diff"}``; ``max_steps <= 1`` means every quantized tensor is within one
    quantization step. ``emulate=True`` computes zsq's side with the runtime's integer arithmetic
    (:class:`zsq.export.IntegerModel`) instead of zsq's float fake quantization: then every code
    should be equal.
    """
    from .emulate import _Emulator

    onnx, helper, _, TP = _onnx()
    ort = _ort()
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    if "zsq.act_codes" not in props:
        raise ExportError(f"{path} was not written by zsq.export.export_onnx (no zsq.act_codes metadata)")
    codes = json.loads(props["zsq.act_codes"])
    types = {"uint8": TP.UINT8, "int8": TP.INT8}
    for tensor, dtype in codes.values():
        proto.graph.output.append(helper.make_tensor_value_info(tensor, types[dtype], None))
    sess = ort.InferenceSession(proto.SerializeToString(), session_options(threads=threads),
                                providers=["CPUExecutionProvider"])
    x = inputs.detach().cpu().float()
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.numpy()})))
    gm = trace(qmodel)
    stats: dict[str, dict[str, float]] = {}

    class Forced(_Emulator if emulate else fx.Interpreter):  # type: ignore[misc]
        def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
            mod = self.fetch_attr(target)
            if not isinstance(mod, ActQuantizer) or not mod.enabled or target not in codes:
                return super().call_module(target, args, kwargs)
            ref = torch.from_numpy(outs[codes[target][0]].astype(np.int64))
            if emulate:
                mine = self.act_codes(self.current, mod).to(torch.int64)
            else:
                mine = P.quantize(args[0], mod.scale, mod.zero_point, *mod.qrange).to(torch.int64)
            pads = (0, 0, 0, 0)
            if mine.shape != ref.shape:  # a zero padding merged into the next convolution
                src = self.current.args[0]
                pad_mod = gm.get_submodule(str(src.target)) if src.op == "call_module" else None
                if pad_mod is None or not hasattr(pad_mod, "pads"):
                    raise ExportError(f"cannot align {target!r}: shapes {tuple(mine.shape)} vs {tuple(ref.shape)}")
                pads = tuple(pad_mod.pads(ref.shape[-2], ref.shape[-1]))
                l, _, t, _ = pads
                mine = mine[..., t:t + ref.shape[-2], l:l + ref.shape[-1]]
            d = (mine - ref).abs()
            stats[target] = {"max_steps": int(d.max()) if d.numel() else 0,
                             "mismatch_fraction": float((d > 0).float().mean()) if d.numel() else 0.0}
            out = P.dequantize(ref, mod.scale, mod.zero_point)
            return F.pad(out, pads) if any(pads) else out

        def run_node(self, n: fx.Node) -> Any:
            self.current = n
            return super().run_node(n)

    with eval_mode(gm), torch.no_grad():
        logits = Forced(gm).run(x)
    total = sum(v["mismatch_fraction"] for v in stats.values())
    return {
        "layers": stats,
        "max_steps": max((v["max_steps"] for v in stats.values()), default=0),
        "mismatch_fraction": total / max(len(stats), 1),
        "logits_max_abs_diff": float(np.abs(logits.numpy() - outs[names[0]]).max()),
    }


def export_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    fp32_out: str | os.PathLike[str] | None = None,
    weights: str | None = None,
    weight_type: str = "auto",
    verify: bool = True,
) -> tuple[ExportReport, ExportReport | None]:
    """Export a checkpoint directory written by ``zsq quantize --out DIR`` (and its FP32 model)."""
    from ..checkpoint import load_quantized, read_config
    from ..errors import NotCalibratedError as _NC

    meta = read_config(ckpt_dir)
    if not meta.get("calibrated", False):
        raise _NC(f"checkpoint {ckpt_dir} holds a model that was never calibrated; re-run `zsq quantize` "
                  "(it calibrates) and export its --out directory")
    qmodel, spec, meta = load_quantized(ckpt_dir)
    h, w = spec.preprocessing.input_size
    x = torch.zeros(1, 3, h, w)
    snapped = snap_biases(qmodel)  # checkpoints of older runs may hold biases off the int32 grid
    rq = export_onnx(qmodel, out, example_input=x, opset=opset, weight_type=weight_type, verify=verify)
    if snapped:
        rq.notes.append(f"biases of {len(snapped)} layer(s) rounded to the int32 grid of input scale x weight "
                        "scale, as the integer kernels add them")
    rf = None
    if fp32_out is not None:
        from ..models import load_model

        fp32, _ = load_model(meta["model"], weights=weights or meta.get("weights"))
        rf = export_fp32_onnx(fp32.eval(), fp32_out, example_input=x, opset=opset, verify=verify)
    return rq, rf


__all__ = [
    "DEFAULT_OPSET", "ExportReport", "LayerExport", "bias_safe_weight_scale", "compare_onnx", "int32_bias",
    "layer_parity",
    "conv_kernel_counts", "conv_matmul_count", "cpu_features", "speed_advice",
    "snap_biases", "export_checkpoint", "export_fp32_onnx",
    "export_onnx", "export_pair", "load_session", "logit_step", "ort_op_counts", "run_onnx", "session_options",
]
