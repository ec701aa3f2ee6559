"""Typed exceptions of zsq.

Every error zsq raises on purpose derives from :class:`ZsqError` and also from the builtin that
fits (``ValueError`` for bad values, ``KeyError`` for unknown names, ...), so callers can catch
either. Messages name what was received, what is allowed, and how to fix it; the CLI prints the
message as one line and exits non-zero.
"""

from __future__ import annotations


class ZsqError(Exception):
    """Root of all zsq errors."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(ZsqError, ValueError):
    """An option or configuration value is invalid."""


class ScopeError(ConfigError):
    """A layer name or pattern matched no layer of the model."""


class UnknownModelError(ZsqError, KeyError):
    """A model name is neither in the registry, nor ``torchvision:NAME``, nor ``module:factory``."""


class WeightsError(ZsqError, ValueError):
    """A weights file is missing, unreadable, or does not match the architecture."""


class WeightsUnavailableError(WeightsError):
    """Pretrained weights could not be obtained (e.g. no network and no ``--weights``)."""


class DatasetError(ZsqError, ValueError):
    """A dataset path or its contents are not usable."""


class NoBatchNormError(ZsqError, ValueError):
    """The operation needs BatchNorm statistics but the model has no BatchNorm layer."""


class NotCalibratedError(ZsqError, RuntimeError):
    """A quantized model was run (or exported) before its activation ranges were calibrated."""


class TraceError(ZsqError, RuntimeError):
    """The model could not be traced into a data-flow graph."""


class UnsupportedLayerError(ZsqError, TypeError):
    """A layer type cannot be handled by the requested operation."""


class ExportError(ZsqError, RuntimeError):
    """Export to a deployment format failed."""


class CheckpointError(ZsqError, ValueError):
    """A zsq checkpoint directory or file is missing or inconsistent."""


class UnsupportedQuantizerError(ExportError, UnsupportedLayerError):
    """A layer's quantizer (e.g. a non-uniform weight codebook) has no equivalent in the export format."""
