"""The lifecycle of flowstate's closable objects: engines, drivers, workers and the recovery
services. Each is opened once, used, and closed for good."""

from __future__ import annotations

import enum
import warnings

from flowstate.errors import ClosedError


class Lifecycle(enum.Enum):
    UNOPENED = 1  # created; not opened yet (or the last open failed)
    OPENED = 2  # usable (for services: running)
    CLOSED = 3  # closed: every call raises ClosedError, and it cannot be opened again


def not_open(lifecycle: Lifecycle, what: str) -> ClosedError:
    """The error for a call on ``what`` (such as "the etcd driver"), which is not open."""
    state = "closed" if lifecycle is Lifecycle.CLOSED else "not open"
    return ClosedError(f"{what} is {state}")


def warn_unclosed(driver: object) -> None:
    """Warn (from ``driver.__del__``) that an open driver is being dropped."""
    warnings.warn(
        f"{driver!r} was never closed; use 'async with' or 'await driver.aclose()'",
        ResourceWarning,
        stacklevel=2,
        source=driver,
    )
