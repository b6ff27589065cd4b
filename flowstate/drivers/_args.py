"""Argument checks at the driver edge, shared by every built-in driver.

A driver's methods are public: the engine calls them with arguments it has checked, but the
recovery services, ``flowstate serve`` (with whatever a client sent) and users composing their
own services call them too. Each read, lease and delay method checks its arguments first with
these, so that a bad one gets ``InvalidQueryError`` or ``InvalidCommandError`` on every driver
alike, before any backend sees it (rather than an ``OverflowError`` from a 64-bit column, a
``UnicodeEncodeError`` from a lone surrogate, or an answer that differs between drivers).
``commit`` is the exception, being the hot path: it takes a request to be one an engine could
have built (see ``Driver.commit``), and whoever builds one from outside input checks it with
:func:`check_request`, as ``flowstate serve`` does. The numbers in driver URLs are read here
too.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from flowstate._checks import MAX_REV, as_utc, describe, is_int, is_number, is_rev, is_text
from flowstate._query import MAX_LIMIT
from flowstate._state import check_id, check_strings
from flowstate.errors import InvalidCommandError, InvalidQueryError, InvalidURLError

if TYPE_CHECKING:
    import datetime

    from flowstate.drivers.base import CommitRequest

__all__ = [
    "MAX_LEASE_TTL",
    "check_delays",
    "check_lease",
    "check_lease_claim",
    "check_lease_name",
    "check_read",
    "check_request",
    "check_wait",
    "url_count",
    "url_number",
    "url_port",
]

#: The longest a lease may last without renewal, in seconds (a day): a lease elects a
#: leader, whose standbys wait out its ttl when it dies.
MAX_LEASE_TTL = 86400.0


def url_number(shown: str, key: str, value: str, unit: str = "") -> float:
    """The number a URL option ``key`` gives in ASCII notation (``2``, ``0.5``, ``1e3``,
    ``inf``; the caller checks the range). ``float()`` alone also reads other scripts'
    digits (``"٩"``) and underscores (``"1_0"``), which a URL does not mean.

    Raises:
        InvalidURLError: It is not one (``shown`` is the URL as errors may show it).
    """
    if value.isascii() and "_" not in value:
        with contextlib.suppress(ValueError):
            return float(value)
    raise InvalidURLError(f"{shown!r}: {key} must be a number{unit}, not {value!r}")


def url_count(shown: str, key: str, value: str) -> int:
    """The whole number a URL option ``key`` gives: ASCII digits, at most 18 of them (the
    caller checks the range).

    Raises:
        InvalidURLError: It is not one.
    """
    if value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    raise InvalidURLError(f"{shown!r}: {key} must be an int, not {value!r}")


def url_port(text: str) -> int | None:
    """The port ``text`` names: ASCII digits from 1 to 65535; None when it is not one."""
    if text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536:
        return int(text)
    return None


def _rev(rev: object, name: str, error: type[Exception]) -> None:
    if not is_rev(rev):
        raise error(f"{name} must be an int from 0 to {MAX_REV}, not {describe(rev)}")


def _name(value: object, what: str, error: type[Exception]) -> None:
    if not value or not is_text(value):
        raise error(
            f"{what} must be a non-empty string of valid Unicode text, not {describe(value)}"
        )


def check_read(state_id: object, rev: object, alias: object = None) -> None:
    """For ``get_state`` and ``get_data``: a state id (and a data alias), and a revision."""
    _name(state_id, "a state id", InvalidQueryError)
    if alias is not None:
        _name(alias, "a data alias", InvalidQueryError)
    _rev(rev, "rev", InvalidQueryError)


def check_delays(since_rev: object, limit: object) -> None:
    """For ``get_delays``: a revision to read after, and a page size (0 asks only whether
    there are delays after ``since_rev``: an empty page whose ``more`` says so)."""
    _rev(since_rev, "since_rev", InvalidQueryError)
    if not is_int(limit) or not 0 <= limit <= MAX_LIMIT:  # type: ignore[operator]
        raise InvalidQueryError(
            f"limit must be an int from 0 to {MAX_LIMIT}, not {describe(limit)}"
        )


def check_wait(rev: object) -> None:
    """For ``wait_for_rev``."""
    _rev(rev, "rev", InvalidQueryError)


def check_lease_name(name: object) -> None:
    """For ``get_lease``."""
    _name(name, "a lease name", InvalidQueryError)


def _ttl(ttl: object) -> None:
    # 0 is allowed: a claim that has already expired.
    if not is_number(ttl) or ttl > MAX_LEASE_TTL:  # type: ignore[operator]
        raise InvalidCommandError(
            f"a lease ttl must be a number of seconds from 0 to {MAX_LEASE_TTL:g}, "
            f"not {describe(ttl)}"
        )


def check_lease_claim(name: object, holder: object, ttl: object) -> None:
    """For ``acquire_lease``."""
    _name(name, "a lease name", InvalidCommandError)
    _name(holder, "a lease holder", InvalidCommandError)
    _ttl(ttl)


def check_lease(lease: object) -> None:
    """For ``renew_lease`` and ``release_lease``: a lease as ``acquire_lease`` returns one."""
    from flowstate.drivers.base import Lease

    if not isinstance(lease, Lease):
        raise InvalidCommandError(f"expected a Lease, not {describe(lease)}")
    check_lease_claim(lease.name, lease.holder, lease.ttl)
    if not is_rev(lease.token):
        raise InvalidCommandError(
            f"a lease token is an int from 0 to {MAX_REV}, not {describe(lease.token)}"
        )


def check_request(request: CommitRequest) -> None:
    """Check a commit request that did not come from an :class:`~flowstate.Engine` (which
    builds only valid ones), as the engine checks the commands it turns into one.

    Raises:
        InvalidCommandError: A write is not one the engine could have sent: an id or a
            label or annotation that is not valid text, an id written twice, an expected
            revision out of range, a data alias that is not text, or a delay without both a
            flow and a representable, timezone-aware due time.
    """
    seen: set[str] = set()
    for write in request.writes:
        state = write.state
        check_id(state.id)
        if state.id in seen:
            raise InvalidCommandError(f"state {state.id!r} is written twice in one commit")
        seen.add(state.id)
        check_strings(state)
        _rev(write.expected_rev, f"state {state.id!r}: expected_rev", InvalidCommandError)
        for alias in write.data or {}:
            _name(alias, f"state {state.id!r}: a data alias", InvalidCommandError)
        if write.delay_at is None and not write.delay_to:
            continue
        _name(write.delay_to, f"state {state.id!r}: a delay's flow", InvalidCommandError)
        _due(state.id, write.delay_at)


def _due(state_id: str, at: datetime.datetime | None) -> None:
    if at is None or at.tzinfo is None:
        raise InvalidCommandError(f"state {state_id!r}: a delay needs a timezone-aware due time")
    if as_utc(at) is None:
        raise InvalidCommandError(
            f"state {state_id!r}: the delay's due time {at.isoformat()} has no UTC equivalent "
            "that a datetime can hold"
        )
