"""Saving and reloading quantized models.

A checkpoint directory holds ``quantized.safetensors`` (state dict; quantized weights stored as
int8 integer grid values, so the file is ~4x smaller than FP32) and ``zsq_config.json``
(model name, preprocessing and the :class:`~zsq.config.QuantConfig`) from which
:func:`load_quantized` rebuilds the exact same fake-quantized graph. Non-uniformly quantized layers
(``weight_quantizer="nonuniform"``) store ``<layer>.weight_codes`` (codebook indices packed at ``wbits``
bits) and their codebook (``<layer>.weight_quantizer.codebook``, float16 when lossless, else float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .config import QuantConfig
from .errors import CheckpointError
from .quant.modules import QUANT_LAYER_TYPES
from .quant import primitives as P
from .quant.nonuniform import codebook_storage_dtype, dequantize_indices, is_nonuniform, pack_indices, unpack_indices

WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "zsq_config.json"
FORMAT_VERSION = 1
INT_SUFFIX = ".weight_int"
CODES_SUFFIX = ".weight_codes"  # non-uniform weights: codebook indices packed at wbits bits (uint8 bytes)
CODEBOOK_SUFFIX = ".weight_quantizer.codebook"  # stored as float16 when that is lossless


def save_quantized(qmodel: fx.GraphModule, out_dir: str | Path, *, model_name: str, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    from .calibrate import is_calibrated

    cfg = getattr(qmodel, "zsq_config", None)
    if not isinstance(cfg, QuantConfig):
        raise CheckpointError("model has no zsq_config: save only models made by zsq.quantize")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES) and is_nonuniform(m.weight_quantizer):
            wq = m.weight_quantizer
            sd.pop(f"{name}.weight")
            sd[f"{name}{CODES_SUFFIX}"] = pack_indices(wq.integer(m.weight.detach()).cpu(), wq.bits).contiguous()
            cb = sd[f"{name}{CODEBOOK_SUFFIX}"]
            sd[f"{name}{CODEBOOK_SUFFIX}"] = cb.to(codebook_storage_dtype(cb)).contiguous()
            continue
        if isinstance(m, QUANT_LAYER_TYPES) and m.weight_quantizer is not None:
            q = m.weight_quantizer.integer(m.weight.detach()).cpu()
            dtype = torch.int8 if m.weight_quantizer.symmetric else torch.uint8
            sd.pop(f"{name}.weight")
            sd[f"{name}{INT_SUFFIX}"] = q.to(dtype).contiguous()
    save_file(sd, str(out / WEIGHTS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "quant_config": cfg.to_dict(),
        "calibrated": is_calibrated(qmodel),
        **(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    d = Path(ckpt_dir)
    if d.is_file():
        d = d.parent
    cfg_path = d / CONFIG_FILE
    if not cfg_path.exists() or not (d / WEIGHTS_FILE).exists():
        raise CheckpointError(
            f"{d} is not a zsq checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it "
            "(written by `zsq quantize --out DIR`)"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path} has format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def load_quantized(ckpt_dir: str | Path) -> tuple[fx.GraphModule, Any, dict[str, Any]]:
    """Rebuild a quantized model from a checkpoint directory. Returns ``(qmodel, spec, meta)``."""
    from safetensors.torch import load_file

    from .fold import fold_batchnorm
    from .models import load_model
    from .quant import quantize

    d = Path(ckpt_dir)
    if d.is_file():
        d = d.parent
    meta = read_config(d)
    model, spec = load_model(meta["model"], pretrained=False)
    folded, _ = fold_batchnorm(model)
    qmodel = quantize(folded, QuantConfig.from_dict(meta["quant_config"]), inplace=True)
    sd = load_file(str(d / WEIGHTS_FILE))
    layers = dict(qmodel.named_modules())
    for key in [k for k in sd if k.endswith(CODES_SUFFIX)]:
        name = key[: -len(CODES_SUFFIX)]
        m = layers.get(name)
        if m is None or not isinstance(m, QUANT_LAYER_TYPES) or not is_nonuniform(m.weight_quantizer):
            raise CheckpointError(f"checkpoint has codebook indices for {name!r}, which is not a non-uniformly "
                                  "quantized layer here")
        wq = m.weight_quantizer
        cb = sd[f"{name}{CODEBOOK_SUFFIX}"].float()
        sd[f"{name}{CODEBOOK_SUFFIX}"] = cb
        idx = unpack_indices(sd.pop(key), wq.bits, m.weight.numel()).reshape(m.weight.shape)
        sd[f"{name}.weight"] = dequantize_indices(idx, cb, wq.per_channel).to(m.weight.dtype)
    for key in [k for k in sd if k.endswith(INT_SUFFIX)]:
        name = key[: -len(INT_SUFFIX)]
        m = layers.get(name)
        if m is None or not isinstance(m, QUANT_LAYER_TYPES) or m.weight_quantizer is None:
            raise CheckpointError(f"checkpoint has integer weights for {name!r}, which is not a quantized layer here")
        wq = m.weight_quantizer
        s = sd[f"{name}.weight_quantizer.scale"]
        z = sd[f"{name}.weight_quantizer.zero_point"]
        if not wq.per_channel:
            s, z = s[0], z[0]
        sd[f"{name}.weight"] = P.dequantize(sd.pop(key).to(torch.int32), s, z, axis=wq.axis)
    try:
        qmodel.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {d} does not match the model {meta['model']!r}: {exc}") from exc
    qmodel.eval()
    return qmodel, spec, meta
