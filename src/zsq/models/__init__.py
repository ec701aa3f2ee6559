"""Model registry, builders and weight loading.

``load_model(name, weights=..., pretrained=...)`` accepts a registry name (see ``list_models()``),
``torchvision:NAME`` or ``package.module:factory``.
"""

from .preprocessing import Preprocessing
from .registry import ModelSpec, get_spec, list_models, load_model, register
from .weights import apply_state_dict, load_state_dict_file

# Importing the model modules registers their entries.
from . import cifar_resnet, efficientnet_lite, tiny  # noqa: E402,F401  (isort: skip)

__all__ = [
    "ModelSpec",
    "Preprocessing",
    "register",
    "get_spec",
    "list_models",
    "load_model",
    "load_state_dict_file",
    "apply_state_dict",
]
