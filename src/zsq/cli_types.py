"""Argument types and help texts shared by ``zsq``'s command modules (cli.py and each stage's
``commands.py``), so every command rejects a bad number with the same one-line message."""

from __future__ import annotations

import argparse
from typing import Callable

HandlerMap = dict[str, Callable[[argparse.Namespace], int]]

MODEL_HELP = ("a registry name (see `zsq models`), torchvision:NAME, or package.module:factory "
              "(imported from the current directory / PYTHONPATH; needs --weights)")


def pos_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def pos_float(s: str) -> float:
    """argparse type: a number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v
