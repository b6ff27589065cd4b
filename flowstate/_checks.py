"""Argument checks shared by the public API. They take ``object`` on purpose: callers may pass
anything, whatever the annotations say, and deserve a flowstate error rather than a TypeError."""

from __future__ import annotations

import math


def is_int(value: object) -> bool:
    """True for an int (a bool is not one here)."""
    return type(value) is int


def is_number(value: object, *, minimum: float = 0.0, strict: bool = False) -> bool:
    """True for a finite int or float at least ``minimum`` (above it when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > minimum if strict else value >= minimum
