"""Storage drivers. ``open_driver(url)`` picks one by URL scheme."""

from flowstate.drivers.base import (
    CommitRequest,
    CommitResult,
    DelayedState,
    DelaysPage,
    Driver,
    Lease,
    RevisionWaiters,
    StateWrite,
    SupportsLease,
    hide_password,
    open_driver,
    register_driver,
)

__all__ = [
    "CommitRequest",
    "CommitResult",
    "DelayedState",
    "DelaysPage",
    "Driver",
    "Lease",
    "RevisionWaiters",
    "StateWrite",
    "SupportsLease",
    "hide_password",
    "open_driver",
    "register_driver",
]
