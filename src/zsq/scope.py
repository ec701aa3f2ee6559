"""Selecting layers by name: exact module names or ``re:REGEX`` patterns.

A pattern that matches no layer is an error listing the dead pattern(s) and examples of valid
names. ``@first`` / ``@last`` mean the first / last quantizable layer in data-flow order.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from .errors import ScopeError

SPECIAL = ("@first", "@last")


def matches(pattern: str, name: str, ordered_names: Sequence[str]) -> bool:
    if pattern == "@first":
        return bool(ordered_names) and name == ordered_names[0]
    if pattern == "@last":
        return bool(ordered_names) and name == ordered_names[-1]
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


def validate_patterns(patterns: Iterable[str], names: Sequence[str], *, what: str) -> None:
    """Raise :class:`ScopeError` if any pattern matches none of ``names``."""
    dead = []
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ScopeError(f"{what} pattern {p!r} is not a valid regular expression: {exc}") from exc
        if not any(matches(p, n, names) for n in names):
            dead.append(p)
    if dead:
        sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ScopeError(
            f"{what} pattern(s) {dead} match no quantizable layer; layer names look like: {sample} "
            "(use an exact name, 're:REGEX', '@first' or '@last'; `zsq layers MODEL` lists them)"
        )
