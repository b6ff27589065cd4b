"""Argument checks shared by the public API. They take ``object`` on purpose: callers may pass
anything, whatever the annotations say, and deserve a flowstate error rather than a TypeError."""

from __future__ import annotations

import datetime
import math
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The largest revision any store can hold: revisions are signed 64-bit integers in SQLite,
#: etcd and PostgreSQL alike.
MAX_REV = 2**63 - 1

#: Ids starting with this prefix belong to flowstate's own states (the recovery cursors).
RESERVED_PREFIX = "flowstate."


def is_int(value: object) -> bool:
    """True for an int (a bool is not one here)."""
    return type(value) is int


def is_rev(value: object) -> bool:
    """True for a revision a store can hold, or 0: an int from 0 to :data:`MAX_REV`."""
    return type(value) is int and 0 <= value <= MAX_REV


def is_number(value: object, *, minimum: float = 0.0, strict: bool = False) -> bool:
    """True for a finite int or float at least ``minimum`` (above it when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > minimum if strict else value >= minimum


def as_utc(moment: datetime.datetime) -> datetime.datetime | None:
    """A timezone-aware ``moment`` in UTC; None when no datetime can hold that UTC time (a
    moment near year 1 or 9999 with an offset that takes it past either end)."""
    try:
        return moment.astimezone(datetime.UTC)
    except (OverflowError, ValueError):
        return None


def is_text(value: object) -> bool:
    """True for a str that every store can keep: one that encodes to UTF-8.

    Python strings may hold lone surrogates (``"\\ud800"``, e.g. from ``os.fsdecode`` or
    ``surrogateescape``), which no UTF-8 encoder, and so no driver, accepts.
    """
    if type(value) is not str:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_text_map(mapping: Mapping[Any, object]) -> bool:
    """True when every key and value of ``mapping`` is text (see :func:`is_text`).

    The same answer as checking each one with :func:`is_text`, with the common case (ASCII
    str keys and values) inlined: this runs on every label and annotation of every commit.
    """
    if not mapping:
        return True  # most labels and annotations are empty
    for key, value in mapping.items():
        if type(key) is str and type(value) is str and key.isascii() and value.isascii():
            continue
        if not (is_text(key) and is_text(value)):
            return False
    return True


def bearer_token(token: object, source: str) -> str:
    """``token`` as it is sent in ``Authorization: Bearer <token>`` and compared: without
    surrounding whitespace. ``source`` names where it came from, for the error.

    Raises:
        ValueError: It is not a string, is blank, or holds a control character (no HTTP
            header can carry it).
    """
    if not isinstance(token, str) or not (stripped := token.strip()):
        raise ValueError(f"{source}: a token must be a non-blank string")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in stripped):
        raise ValueError(f"{source}: a token cannot hold control characters (such as a line break)")
    return stripped


def env_token(name: str) -> str | None:
    """The token in environment variable ``name`` (see :func:`bearer_token`); None when it
    is unset or blank.

    Raises:
        ValueError: It holds a control character, so no HTTP header can carry it.
    """
    value = os.environ.get(name, "")
    return bearer_token(value, f"${name}") if value.strip() else None


def describe(value: object, limit: int = 60) -> str:
    """A short repr of ``value`` for an error message (long text is cut)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
