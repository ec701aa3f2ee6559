"""Reading weight files into state dicts and loading them into models with clear errors."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import WeightsError

# Keys under which training scripts commonly nest the actual state dict.
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# At most this many keys are quoted per category in a mismatch message.
MAX_LISTED_KEYS = 5

_SAVE_HINT = "save the weights with `torch.save(model.state_dict(), PATH)` (or safetensors) and pass that file"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` state dict on the CPU.

    ``.safetensors`` files are read with :func:`safetensors.torch.load_file`; anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)``. Training checkpoints that nest the
    state dict under ``state_dict`` / ``model_state_dict`` / ``model`` / ``net`` are unwrapped, and a
    ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix shared by all keys is removed.

    Raises :class:`WeightsError` when the file is missing, unreadable, or holds something other than
    a state dict (e.g. a pickled full model, which ``weights_only`` loading refuses).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"weights file {str(p)!r} does not exist; check the --weights path")
    if not p.is_file():
        raise WeightsError(f"weights path {str(p)!r} is not a file; pass the path of a .pth/.pt/.safetensors file")

    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise WeightsError(f"reading {str(p)!r} needs the safetensors package: pip install safetensors") from exc
        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"could not read safetensors file {str(p)!r}: {exc}") from exc
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(
                f"{str(p)!r} is not a plain state dict: safe (weights_only) loading refused it, which happens "
                f"for a pickled full model or custom classes ({_first_line(exc)}); {_SAVE_HINT}"
            ) from exc
        except Exception as exc:  # corrupt / truncated / not a torch file
            raise WeightsError(f"could not read weights file {str(p)!r} ({type(exc).__name__}: {_first_line(exc)})") from exc

    return _to_state_dict(obj, str(p))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _to_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        raise WeightsError(f"{where!r} holds a full model object, not a state dict; {_SAVE_HINT}")
    # Unwrap nested checkpoints ({'state_dict': {...}, 'epoch': ...}); a few levels at most.
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, nn.Module):
        raise WeightsError(f"{where!r} holds a full model object, not a state dict; {_SAVE_HINT}")
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"{where!r} does not contain a state dict (found {type(obj).__name__}"
            f"{' (empty)' if isinstance(obj, Mapping) else ''}); {_SAVE_HINT}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{where!r} is not a state dict of tensors: entries {bad[:MAX_LISTED_KEYS]} are not tensors "
            f"(top-level keys: {list(obj)[:8]}); {_SAVE_HINT}"
        )
    sd: dict[str, torch.Tensor] = OrderedDict(obj.items())
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = OrderedDict((k[len(prefix):], v) for k, v in sd.items())
    metadata = getattr(obj, "_metadata", None)
    if metadata is not None and not any(k.startswith(STRIP_PREFIXES) for k in obj):
        sd._metadata = metadata  # type: ignore[attr-defined]  # keeps module versions for loading
    return sd


def _is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def apply_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    arch: str | None = None,
) -> nn.Module:
    """Load ``state_dict`` into ``model`` with ``strict=True`` semantics; return ``model``.

    Missing BatchNorm ``num_batches_tracked`` counters are tolerated (older checkpoints lack them).
    Any other missing or unexpected key or shape mismatch raises one :class:`WeightsError` that
    quotes up to five keys of each kind and names ``source`` (e.g. the file) and ``arch`` (the
    architecture that was expected; defaults to the model's class name).
    """
    arch = arch or type(model).__name__
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _is_bn_counter(k)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, _shape(state_dict[k]), _shape(expected[k]))
        for k in expected
        if k in state_dict and _shape(state_dict[k]) != _shape(expected[k])
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {_quote(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {_quote(unexpected)}")
        if mismatched:
            shown = ", ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:MAX_LISTED_KEYS])
            more = f" (+{len(mismatched) - MAX_LISTED_KEYS} more)" if len(mismatched) > MAX_LISTED_KEYS else ""
            parts.append(f"{len(mismatched)} shape mismatch(es) [{shown}{more}]")
        matched = sum(1 for k in expected if k in state_dict) - len(mismatched)
        raise WeightsError(
            f"weights from {source} do not fit architecture {arch!r}: " + "; ".join(parts)
            + f" ({matched} of {len(expected)} entries match). Check that the file was trained for "
            f"this model (pick the matching model name) and that num_classes agrees."
        )
    filled: dict[str, torch.Tensor] = OrderedDict(state_dict.items())
    for k, v in expected.items():
        if k not in filled:  # only num_batches_tracked can be absent here
            filled[k] = v
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        filled._metadata = metadata  # type: ignore[attr-defined]
    try:
        model.load_state_dict(filled, strict=True)
    except RuntimeError as exc:  # e.g. a module-specific check
        raise WeightsError(f"weights from {source} could not be loaded into {arch!r}: {exc}") from exc
    return model


def _quote(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f", ... (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"[{shown}{more}]"
