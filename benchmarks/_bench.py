"""What the benchmark scripts share: the process environment zsq's console script uses, and where the
real assets of ``../shared`` live (see ``../shared/ASSETS.md``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-test" / "cifar10_test.npz"
IMAGENET = SHARED / "data" / "imagenet-sample-500"
RESNET_WEIGHTS = {
    "cifar_resnet20": SHARED / "models" / "resnet-cifar10-akamaster" / "resnet20-12fca82f.th",
    "cifar_resnet32": SHARED / "models" / "resnet-cifar10-akamaster" / "resnet32-d509ac18.th",
}


def ensure_runtime_env() -> None:
    """Re-execute the running script once with zsq's runtime environment (:data:`zsq.cli.RUNTIME_ENV`:
    glibc allocator thresholds and ``OMP_WAIT_POLICY=PASSIVE``), which must be set before the process
    starts; values the user set are kept."""
    from zsq.cli import RUNTIME_ENV

    if any(k not in os.environ for k in RUNTIME_ENV) and os.environ.get("ZSQ_BENCH_REEXEC") != "1":
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**RUNTIME_ENV, **os.environ, "ZSQ_BENCH_REEXEC": "1"})


# ----------------------------------------------------------------------------------------------
# ONNX Runtime's own static quantization (the peer rows of deploy.py and accuracy.py)
# ----------------------------------------------------------------------------------------------


def ort_quantize_static(fp32_path: Path, out: Path, calib: torch.Tensor, *, reduce_range: bool) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 8].numpy()} for i in range(0, calib.shape[0], 8)])

        def get_next(self):
            return next(self.batches, None)

    src = fp32_path
    try:  # ORT's recommended pre-processing (shape inference + graph optimisation)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = out.with_suffix(".pre.onnx")
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        src = pre
    except Exception as exc:  # pragma: no cover - depends on the ORT version
        print(f"quant_pre_process failed ({exc}); quantizing the FP32 export as it is", file=sys.stderr)
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range)
    return out


def onnx_logits(path: Path, x: torch.Tensor, *, threads: int, batch: int = 100) -> np.ndarray:
    from zsq.export import load_session

    sess = load_session(path, threads=threads)
    name = sess.get_inputs()[0].name
    xs = x.numpy()
    return np.concatenate([sess.run(None, {name: xs[i:i + batch]})[0] for i in range(0, xs.shape[0], batch)])


def distilled_batch(model: torch.nn.Module, spec, *, name: str, seed: int,
                    cache_dir: Path | None = None) -> tuple[torch.Tensor, float]:
    """One batch of zsq's default distilled data (``DistillConfig(seed=seed)``) and the seconds it took.

    With ``cache_dir`` it is kept as ``<cache_dir>/<name>_seed<seed>.safetensors`` and read back on the next
    call (0 seconds); the file is the inputs only, never a pickle."""
    from safetensors.torch import load_file, save_file

    import zsq
    from zsq.config import DistillConfig

    path = Path(cache_dir) / f"{name}_seed{seed}.safetensors" if cache_dir else None
    if path is not None and path.exists():
        return load_file(str(path))["inputs"], 0.0
    t = time.perf_counter()
    x = zsq.distill(model, spec.preprocessing, DistillConfig(seed=seed), progress=False).inputs
    seconds = time.perf_counter() - t
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"inputs": x.contiguous()}, str(path))
    return x, seconds
