"""The flowstate error tree.

Every error flowstate raises derives from one root, so ``except flowstate.FlowstateError``
catches them all::

    FlowstateError
    ├── ClosedError                      an engine, driver or watcher used after aclose()
    ├── ConflictError                    a commit lost the revision race; nothing was written
    ├── NotFoundError (LookupError)      no such state, revision or data
    │   └── FlowNotFoundError            no flow registered under that id
    ├── UnknownDriverError (LookupError) no driver for that URL scheme
    ├── MissingDependencyError (ImportError)   the driver's extra is not installed
    ├── InvalidURLError (ValueError)     a driver URL that cannot be parsed
    ├── InvalidCommandError (ValueError) a command that cannot be applied as given
    ├── InvalidQueryError (ValueError)   a query filter that cannot be evaluated
    ├── DefinitionError (ValueError)     a pipeline definition with problems (lists them all)
    ├── InvalidTransitionError           a managed flow cannot move between these statuses
    │   └── AlreadyTerminalError         the managed flow is finished, failed or cancelled
    ├── CancelPendingError               a cancel was requested: the flow may only be cancelled
    └── DriverError                      the storage backend failed; the original is chained
        ├── DriverUnavailableError       connection lost; retrying the same call is safe
        │                                (a commit may have been applied, never half-applied)
        └── SchemaVersionError           the store was written by a newer flowstate

Backend exceptions (sqlite3, grpc, aetcd) never reach users: each driver translates them at its
edge into a ``DriverError`` subclass and chains the original as ``__cause__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "AlreadyTerminalError",
    "CancelPendingError",
    "ClosedError",
    "Conflict",
    "ConflictError",
    "DefinitionError",
    "DriverError",
    "DriverUnavailableError",
    "FlowNotFoundError",
    "FlowstateError",
    "InvalidCommandError",
    "InvalidQueryError",
    "InvalidTransitionError",
    "InvalidURLError",
    "MissingDependencyError",
    "NotFoundError",
    "SchemaVersionError",
    "UnknownDriverError",
]


class FlowstateError(Exception):
    """Root of every error flowstate raises."""


class ClosedError(FlowstateError):
    """The object was closed (or never opened) and cannot be used."""


class Conflict:
    """One state whose stored revision differed from the one a commit expected."""

    __slots__ = ("actual_rev", "expected_rev", "state_id")

    def __init__(self, state_id: str, expected_rev: int, actual_rev: int) -> None:
        self.state_id = state_id
        self.expected_rev = expected_rev
        self.actual_rev = actual_rev

    def __repr__(self) -> str:
        return (
            f"Conflict(state_id={self.state_id!r}, expected_rev={self.expected_rev}, "
            f"actual_rev={self.actual_rev})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Conflict):
            return NotImplemented
        return (self.state_id, self.expected_rev, self.actual_rev) == (
            other.state_id,
            other.expected_rev,
            other.actual_rev,
        )

    def __hash__(self) -> int:
        return hash((self.state_id, self.expected_rev, self.actual_rev))


class ConflictError(FlowstateError):
    """A commit's compare-and-set failed; nothing in the commit was written.

    ``conflicts`` lists every state whose stored latest revision (``actual_rev``, 0 when the
    state does not exist) differed from the revision the commit expected.
    """

    def __init__(self, conflicts: Iterable[Conflict]) -> None:
        self.conflicts = list(conflicts)
        detail = ", ".join(
            f"{c.state_id!r} (expected rev {c.expected_rev}, found {c.actual_rev})"
            for c in self.conflicts
        )
        super().__init__(f"commit conflicts on {detail}; re-read the states and retry")

    @property
    def ids(self) -> list[str]:
        """The ids of the conflicting states, in commit order."""
        return [c.state_id for c in self.conflicts]

    def __reduce__(self) -> tuple[type[ConflictError], tuple[list[Conflict]]]:
        return (type(self), (self.conflicts,))


class NotFoundError(FlowstateError, LookupError):
    """No state, revision or data matches the request."""


class FlowNotFoundError(NotFoundError):
    """No flow is registered under the requested id."""

    def __init__(self, flow_id: str, message: str | None = None) -> None:
        self.flow_id = flow_id
        super().__init__(
            message or f"no flow registered under {flow_id!r}; register it with engine.flows"
        )

    def __reduce__(self) -> tuple[type[FlowNotFoundError], tuple[str, str]]:
        return (type(self), (self.flow_id, str(self)))


class UnknownDriverError(FlowstateError, LookupError):
    """No driver is registered for a URL scheme."""


class MissingDependencyError(FlowstateError, ImportError):
    """A driver needs an optional dependency that is not installed."""


class InvalidURLError(FlowstateError, ValueError):
    """A driver URL that cannot be parsed, or a setting that goes with it (such as the remote
    driver's token) that cannot be used."""


class InvalidCommandError(FlowstateError, ValueError):
    """A command that cannot be applied as given (empty id, nested Commit, ...)."""


class InvalidQueryError(FlowstateError, ValueError):
    """A query filter that cannot be evaluated (negative revision, naive datetime, ...)."""


class DefinitionError(FlowstateError, ValueError):
    """A pipeline definition with problems; ``problems`` lists every one of them."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        listed = "; ".join(self.problems)
        count = len(self.problems)
        counted = "1 problem" if count == 1 else f"{count} problems"
        super().__init__(f"invalid pipeline definition ({counted}): {listed}")

    def __reduce__(self) -> tuple[type[DefinitionError], tuple[list[str]]]:
        return (type(self), (self.problems,))


class InvalidTransitionError(FlowstateError):
    """A managed flow cannot move from ``from_status`` to ``to_status``.

    ``to_status`` is None for a change that keeps the status (``update_state``, ...).
    """

    def __init__(self, flow_id: str, from_status: str, to_status: str | None) -> None:
        self.flow_id = flow_id
        # Plain strings (a status may come as a str enum, whose repr would show in messages).
        self.from_status = str(from_status)
        self.to_status = None if to_status is None else str(to_status)
        super().__init__(self._message())

    def _message(self) -> str:
        return (
            f"managed flow {self.flow_id!r} cannot move from {self.from_status!r} "
            f"to {self.to_status!r}"
        )

    def __reduce__(self) -> tuple[type[InvalidTransitionError], tuple[str, str, str | None]]:
        return (type(self), (self.flow_id, self.from_status, self.to_status))


class AlreadyTerminalError(InvalidTransitionError):
    """The managed flow is finished, failed or cancelled: nothing may change it any more."""

    def _message(self) -> str:
        target = f" (to {self.to_status!r})" if self.to_status else ""
        return (
            f"managed flow {self.flow_id!r} is already {self.from_status}; "
            f"it cannot change any more{target}"
        )


class CancelPendingError(FlowstateError):
    """A cancel was requested for the managed flow: it may be cancelled, not ``action``-ed."""

    def __init__(self, flow_id: str, action: str) -> None:
        self.flow_id = flow_id
        self.action = action
        super().__init__(
            f"managed flow {flow_id!r} has a cancel request pending: it cannot {action}; "
            "cancel it instead"
        )

    def __reduce__(self) -> tuple[type[CancelPendingError], tuple[str, str]]:
        return (type(self), (self.flow_id, self.action))


class DriverError(FlowstateError):
    """The storage backend failed. The backend's exception is chained as ``__cause__``."""


class DriverUnavailableError(DriverError):
    """The backend cannot be reached.

    A commit that raised it was applied whole or not at all, and the caller cannot tell which;
    retrying it with the same expected revisions is safe (it conflicts if it was applied).
    """


class SchemaVersionError(DriverError):
    """The store was written with a schema this flowstate version does not know."""
