"""Model registry and :func:`load_model`.

A model is named in one of three ways:

* a registry name (``efficientnet_lite0``, ``cifar_resnet20``, ``tiny_cnn``, ... see
  :func:`list_models`);
* ``torchvision:NAME`` — a torchvision classifier (needs ``pip install zsq[vision]``);
* ``package.module:factory`` — a function importable from the current directory or
  ``PYTHONPATH`` that returns an ``nn.Module`` (weights then come from ``--weights PATH``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, UnknownModelError, WeightsUnavailableError
from .preprocessing import Preprocessing
from .weights import apply_state_dict, load_state_dict_file

TORCHVISION_PREFIX = "torchvision:"
# Seed of the random init that pretrained=True gives for entries whose ``pretrained`` is None.
RANDOM_WEIGHTS_SEED = 0

IMAGENET_PREPROCESSING = Preprocessing(input_size=(224, 224), resize=256)

ACCEPTED_FORMS = (
    "a registry name (see `zsq models`), 'torchvision:NAME' (a torchvision classifier, e.g. "
    "torchvision:resnet18), or 'package.module:factory' (a function returning an nn.Module, importable "
    "from the current directory or PYTHONPATH; pass its weights with --weights PATH)"
)


@dataclass(frozen=True)
class ModelSpec:
    """One model entry: how to build it, where its weights come from, and how to feed it.

    ``builder(num_classes=N)`` returns the architecture with random weights. ``pretrained()`` returns
    the built-in trained state dict (raising :class:`WeightsUnavailableError` when it cannot be had);
    ``None`` means the entry has no trained weights and a fixed-seed random init stands in for them
    (tiny test models).
    """

    name: str
    description: str
    num_classes: int | None
    preprocessing: Preprocessing
    builder: Callable[..., nn.Module] = field(compare=False, repr=False)
    pretrained: Callable[[], Mapping[str, torch.Tensor]] | None = field(default=None, compare=False, repr=False)
    dataset: str = "imagenet"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"model name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.preprocessing, Preprocessing):
            raise ConfigError(f"preprocessing of {self.name!r} must be a Preprocessing, got {type(self.preprocessing).__name__}")
        if not callable(self.builder):
            raise ConfigError(f"builder of {self.name!r} must be callable")
        if self.pretrained is not None and not callable(self.pretrained):
            raise ConfigError(f"pretrained of {self.name!r} must be callable or None")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or int(self.num_classes) < 1):
            raise ConfigError(f"num_classes of {self.name!r} must be a positive integer or None, got {self.num_classes!r}")

    def build(self, num_classes: int | None = None) -> nn.Module:
        """The architecture with random weights (global RNG), ``num_classes`` defaulting to the entry's."""
        n = num_classes if num_classes is not None else self.num_classes
        return self.builder() if n is None else self.builder(num_classes=n)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (returned unchanged). A name can be registered only once."""
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"register() takes a ModelSpec, got {type(spec).__name__}")
    if ":" in spec.name:
        raise ConfigError(f"registry names cannot contain ':' (reserved for torchvision:/module:factory), got {spec.name!r}")
    if spec.name in _REGISTRY:
        raise ConfigError(f"model {spec.name!r} is already registered; choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    """All registered entries, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for ``name`` in any accepted form (see the module docstring).

    Raises :class:`UnknownModelError` naming close matches and the accepted forms.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}; use {ACCEPTED_FORMS}")
    name = name.strip()
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_spec(name[len(TORCHVISION_PREFIX):])
    if ":" in name:
        return _factory_spec(name)
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}.{hint} Registered models: {', '.join(sorted(_REGISTRY))}. "
        f"A model can be given as {ACCEPTED_FORMS}."
    )


def load_model(
    name: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build model ``name`` and load its weights; return ``(model in eval mode on CPU, spec)``.

    ``weights`` (a state-dict file) replaces the built-in pretrained weights. Without it,
    ``pretrained=True`` loads the entry's built-in weights (raising
    :class:`WeightsUnavailableError` when there are none to be had) and ``pretrained=False`` keeps
    the random init. ``num_classes`` changes the classifier size (the returned spec says so).
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = get_spec(name)
    if num_classes is not None and num_classes != spec.num_classes:
        spec = dataclasses.replace(spec, num_classes=num_classes)

    if weights is not None:
        state_dict = load_state_dict_file(weights)  # read first: a bad path fails before a long build
        model = spec.build()
        apply_state_dict(model, state_dict, source=f"file {str(weights)!r}", arch=spec.name)
    elif not pretrained:
        model = spec.build()
    elif spec.pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = spec.build()
    else:
        state_dict = spec.pretrained()
        model = spec.build()
        apply_state_dict(model, state_dict, source=f"the built-in weights of {spec.name!r}", arch=spec.name)

    if not isinstance(model, nn.Module):
        raise ConfigError(f"the builder of {spec.name!r} returned {type(model).__name__}, not an nn.Module")
    if spec.num_classes is None:
        inferred = _infer_num_classes(model)
        if inferred is not None:
            spec = dataclasses.replace(spec, num_classes=inferred)
    model = model.to("cpu").eval()
    return model, spec


def _infer_num_classes(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None


# --------------------------------------------------------------------------- torchvision:NAME


def _import_torchvision() -> Any:
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise ConfigError(
            "torchvision models need torchvision, which is not installed: pip install zsq[vision] "
            "(or pip install torchvision)"
        ) from exc
    return tvm


def _torchvision_spec(arch: str) -> ModelSpec:
    tvm = _import_torchvision()
    available = tvm.list_models(module=tvm)  # classification models only
    if arch not in available:
        close = difflib.get_close_matches(arch, available, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
        raise UnknownModelError(
            f"torchvision has no classification model {arch!r}.{hint} Available: {', '.join(available)}."
        )
    try:
        default_weights = tvm.get_model_weights(arch).DEFAULT
    except Exception:  # a model without a weights enum
        default_weights = None

    preprocessing = IMAGENET_PREPROCESSING
    num_classes: int | None = 1000
    if default_weights is not None:
        preprocessing = _preprocessing_from_torchvision(default_weights) or IMAGENET_PREPROCESSING
        categories = default_weights.meta.get("categories")
        if categories:
            num_classes = len(categories)

    full_name = TORCHVISION_PREFIX + arch

    def build(num_classes: int | None = None) -> nn.Module:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return tvm.get_model(arch, weights=None, **kwargs)

    def load_pretrained() -> Mapping[str, torch.Tensor]:
        if default_weights is None:
            raise WeightsUnavailableError(f"torchvision has no pretrained weights for {arch!r}; pass --weights PATH")
        try:
            sd = default_weights.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:  # offline: URLError, socket errors, ...
            raise WeightsUnavailableError(
                f"could not get torchvision's pretrained weights for {arch!r} ({default_weights}) from "
                f"{default_weights.url} ({type(exc).__name__}: {exc}); download the file elsewhere and pass "
                f"--weights PATH, or put it in the torch hub cache ({torch.hub.get_dir()}/checkpoints)"
            ) from exc
        return sd

    return ModelSpec(
        name=full_name,
        description=f"torchvision {arch}" + (f" ({default_weights})" if default_weights is not None else ""),
        num_classes=num_classes,
        preprocessing=preprocessing,
        builder=build,
        pretrained=load_pretrained,
        dataset="imagenet",
        metadata={"source": "torchvision", "torchvision_weights": str(default_weights) if default_weights else None},
    )


def _preprocessing_from_torchvision(weights: Any) -> Preprocessing | None:
    try:
        t = weights.transforms()
        crop = list(t.crop_size)
        resize = list(t.resize_size)
        interp = getattr(t.interpolation, "value", "bilinear")
        return Preprocessing(
            input_size=(crop[0], crop[-1]),
            resize=int(resize[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=str(interp),
        )
    except Exception:  # unusual transforms: fall back to the ImageNet defaults
        return None


# --------------------------------------------------------------------------- package.module:factory


def _factory_spec(name: str) -> ModelSpec:
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise UnknownModelError(f"model {name!r} is not of the form 'package.module:factory'; use {ACCEPTED_FORMS}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownModelError(
            f"model {name!r}: cannot import module {module_name!r} ({exc}). The module must be importable from "
            f"the current directory ({cwd}) or PYTHONPATH"
        ) from exc
    except Exception as exc:
        raise ConfigError(f"model {name!r}: importing {module_name!r} failed ({type(exc).__name__}: {exc})") from exc
    factory: Any = module
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None)))
            raise UnknownModelError(
                f"model {name!r}: module {module_name!r} has no attribute {attr_path!r}; callables it defines: "
                f"{', '.join(public[:20]) or 'none'}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"model {name!r}: {attr_path!r} in {module_name!r} is not callable")

    def build(num_classes: int | None = None) -> nn.Module:
        if num_classes is None:
            model = factory()
        else:
            if not _accepts_kwarg(factory, "num_classes"):
                raise ConfigError(f"model {name!r}: the factory takes no num_classes argument; do not set num_classes")
            model = factory(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model {name!r}: the factory returned {type(model).__name__}, expected a torch.nn.Module")
        return model

    def no_builtin_weights() -> Mapping[str, torch.Tensor]:
        raise WeightsUnavailableError(
            f"model {name!r} comes from a user factory and has no built-in weights: pass --weights PATH "
            "(a state dict saved with torch.save(model.state_dict(), PATH)), or pretrained=False for random weights"
        )

    return ModelSpec(
        name=name,
        description=f"user factory {name}",
        num_classes=None,
        preprocessing=IMAGENET_PREPROCESSING,
        builder=build,
        pretrained=no_builtin_weights,
        dataset="imagenet",
        metadata={"source": "factory", "preprocessing_assumed": True},
    )


def _accepts_kwarg(fn: Callable[..., Any], kw: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == kw or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


__all__ = [
    "ModelSpec",
    "register",
    "list_models",
    "get_spec",
    "load_model",
    "IMAGENET_PREPROCESSING",
    "RANDOM_WEIGHTS_SEED",
]
