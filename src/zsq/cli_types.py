"""Argument types and help texts shared by ``zsq``'s command modules (cli.py and each stage's
``commands.py``), so every command rejects a bad number with the same one-line message."""

from __future__ import annotations

import argparse
from typing import Callable

HandlerMap = dict[str, Callable[[argparse.Namespace], int]]

MODEL_HELP = ("a registry name (see `zsq models`), torchvision:NAME, or package.module:factory "
              "(imported from the current directory / PYTHONPATH; needs --weights)")


def _int_at_least(lowest: int, what: str) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    parse.__doc__ = f"argparse type: an integer >= {lowest}."
    return parse


pos_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "a non-negative integer")


def pos_float(s: str) -> float:
    """argparse type: a number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v
