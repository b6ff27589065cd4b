"""The lifecycle of flowstate's closable objects: engines, drivers, workers and the recovery
services. Each is opened once, used, and closed for good."""

from __future__ import annotations

import enum


class Lifecycle(enum.Enum):
    UNOPENED = 1  # created; not opened yet (or the last open failed)
    OPENED = 2  # usable (for services: running)
    CLOSED = 3  # closed: every call raises ClosedError, and it cannot be opened again
