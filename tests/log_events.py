"""Awaiting log records: a test waits for what a background task logs, not for time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def first_record(logger: str) -> Iterator[asyncio.Event]:
    """An event set by the first record ``logger`` (or a child of it) handles."""
    logged = asyncio.Event()
    handler = logging.Handler()
    handler.emit = lambda record: logged.set()  # type: ignore[method-assign]
    logging.getLogger(logger).addHandler(handler)
    try:
        yield logged
    finally:
        logging.getLogger(logger).removeHandler(handler)
