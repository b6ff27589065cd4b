"""What ``flowstate serve`` and the remote driver exchange: bodies and the error table.

Both sides import this module, so a route's body type and an error's status code are written
down once. Every body is JSON encoded by msgspec; blobs (``bytes``) travel as base64.

Errors are JSON ``{"error": {"type": ..., "message": ...}}`` with a status code from
:data:`ERRORS`; a conflict adds ``conflicts`` (every conflicting state) and an invalid
definition adds ``problems``. The remote driver turns a ``type`` back into the flowstate error
it stands for, so ``ConflictError`` raised on the server is ``ConflictError`` in the client.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from flowstate.drivers.base import CommitRequest, CommitResult, Lease
from flowstate.errors import (
    AlreadyTerminalError,
    CancelPendingError,
    ClosedError,
    Conflict,
    ConflictError,
    DefinitionError,
    DriverError,
    DriverUnavailableError,
    FlowstateError,
    InvalidCommandError,
    InvalidQueryError,
    InvalidTransitionError,
    NotFoundError,
)

__all__ = [
    "ERRORS",
    "MAX_PAGE",
    "CommitBatch",
    "CommitBatchReply",
    "CommitOutcome",
    "ConflictInfo",
    "DataVersion",
    "ErrorBody",
    "ErrorInfo",
    "Head",
    "Health",
    "LeaseClaim",
    "LeaseReply",
    "ServerInfo",
    "conflict_error",
    "error_info",
    "error_status",
]

#: The most state versions one page holds, whatever ``limit`` a client asks for.
MAX_PAGE: Final = 1000


class ConflictInfo(msgspec.Struct, kw_only=True):
    """One conflicting state of a rejected commit (see ``flowstate.Conflict``)."""

    state_id: str
    expected_rev: int
    actual_rev: int


class ErrorInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What went wrong.

    Attributes:
        type: A stable name for the kind of error (``conflict``, ``not_found``, ...).
        message: A sentence for people; never a stack trace.
        conflicts: For ``conflict``: every state whose revision differed.
        problems: For ``invalid_definition``: every problem found.
    """

    type: str
    message: str
    conflicts: list[ConflictInfo] | None = None
    problems: list[str] | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """The body of every error response."""

    error: ErrorInfo


class Health(msgspec.Struct, kw_only=True):
    """``GET /health``: the store answers, and its latest revision.

    Attributes:
        status: ``"ok"``.
        rev: The store's latest revision.
        token_required: True when every other route needs ``Authorization: Bearer``, so
            that a client (the console) knows to ask for the token before it calls them.
    """

    status: str
    rev: int
    token_required: bool = False


class ServerInfo(msgspec.Struct, kw_only=True):
    """``GET /api/v1/info``: what a client needs to know about the server.

    Attributes:
        version: The flowstate version the server runs.
        driver: The scheme of the server's store (``sqlite``, ``etcd``, ...).
        max_body_size: The largest request body (bytes) the server accepts.
        max_page: The most versions one page of states holds.
    """

    version: str
    driver: str
    max_body_size: int
    max_page: int


class Head(msgspec.Struct, kw_only=True):
    """``GET /api/v1/head``: the store's latest revision."""

    rev: int


class DataVersion(msgspec.Struct, kw_only=True):
    """A data blob and the revision of the state version it was stored with."""

    rev: int
    blob: bytes


class CommitBatch(msgspec.Struct, kw_only=True):
    """``POST /api/v1/commits``: several independent commits, applied concurrently."""

    commits: list[CommitRequest]


class CommitOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What became of one commit of a batch: its result, or the error it failed with."""

    result: CommitResult | None = None
    error: ErrorInfo | None = None


class CommitBatchReply(msgspec.Struct, kw_only=True):
    """One outcome per commit of a :class:`CommitBatch`, in request order."""

    outcomes: list[CommitOutcome]


class LeaseClaim(msgspec.Struct, kw_only=True):
    """``POST /api/v1/leases/{name}/acquire``: who claims the lease, for how long."""

    holder: str
    ttl: Annotated[float, msgspec.Meta(ge=0)]


class LeaseReply(msgspec.Struct, kw_only=True):
    """A lease, or None when it is not held (or could not be taken, or was lost)."""

    lease: Lease | None


# -- errors ------------------------------------------------------------------------------------

# (error class, status, type), most specific class first: the first match wins. A server
# closing its engine is unavailable to its clients; their own driver is not closed. Errors of
# the workflow routes are here too, so that every status code is chosen in this one table.
ERRORS: list[tuple[type[BaseException], int, str]] = [
    (DefinitionError, 422, "invalid_definition"),
    (AlreadyTerminalError, 409, "already_terminal"),
    (InvalidTransitionError, 409, "invalid_transition"),
    (CancelPendingError, 409, "cancel_pending"),
    (ConflictError, 409, "conflict"),
    (NotFoundError, 404, "not_found"),
    (InvalidQueryError, 400, "invalid_query"),
    (InvalidCommandError, 400, "invalid_command"),
    (DriverUnavailableError, 503, "unavailable"),
    (ClosedError, 503, "unavailable"),
    (DriverError, 500, "driver_error"),
    (FlowstateError, 400, "bad_request"),
]


def error_status(exc: BaseException) -> tuple[int, str] | None:
    """The status code and error type for ``exc``, or None for an unexpected error."""
    for error, status, type_ in ERRORS:
        if isinstance(exc, error):
            return status, type_
    return None


def error_info(exc: BaseException, type_: str) -> ErrorInfo:
    """The body of the error response for a flowstate error."""
    info = ErrorInfo(type=type_, message=" ".join(str(exc).split()) or type(exc).__name__)
    if isinstance(exc, ConflictError):
        info.conflicts = [
            ConflictInfo(state_id=c.state_id, expected_rev=c.expected_rev, actual_rev=c.actual_rev)
            for c in exc.conflicts
        ]
    problems = getattr(exc, "problems", None)
    if isinstance(problems, list) and all(isinstance(p, str) for p in problems):
        info.problems = list(problems)
    return info


def conflict_error(info: ErrorInfo) -> ConflictError:
    """Rebuild the ``ConflictError`` a ``conflict`` error body describes."""
    return ConflictError(
        Conflict(c.state_id, c.expected_rev, c.actual_rev) for c in info.conflicts or []
    )
