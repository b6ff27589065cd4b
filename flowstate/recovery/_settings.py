"""Per-state recovery settings, kept in the state's annotations."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from flowstate._checks import is_int, is_number, is_text
from flowstate.errors import InvalidCommandError

if TYPE_CHECKING:
    from flowstate._state import State, StateCtx

__all__ = [
    "attempt",
    "disable",
    "is_disabled",
    "set_max_attempts",
    "set_on_exhausted",
    "set_retry_after",
]

#: State annotation: "true" when the recoverer must leave the state alone.
DISABLED = "flowstate.recovery.disabled"
#: State annotation: seconds a running state may go without a commit before it is retried.
RETRY_AFTER = "flowstate.recovery.retry_after"
#: State annotation: how many retries before the state is force-ended.
MAX_ATTEMPTS = "flowstate.recovery.max_attempts"
#: Transition annotation: how many times the current transition was retried.
ATTEMPT = "flowstate.recovery.attempt"
#: State annotation written when the recoverer force-ends a state: why (a transition
#: annotation, when it hands the state to its on_exhausted flow instead).
ENDED_REASON = "flowstate.recovery.ended"
#: State annotation: the flow the recoverer transits the state to when its attempts are spent.
ON_EXHAUSTED = "flowstate.recovery.on_exhausted"


def disable(ctx: StateCtx) -> None:
    """Exclude the state from recovery (takes effect when the ctx is next committed)."""
    ctx.current.annotations[DISABLED] = "true"


def set_retry_after(ctx: StateCtx, seconds: float) -> None:
    """Retry the state when it stays running this long after a commit (overrides the
    recoverer's default; takes effect when the ctx is next committed).

    Raises:
        InvalidCommandError: ``seconds`` is not a positive finite number.
    """
    if not is_number(seconds, strict=True):
        raise InvalidCommandError(
            f"retry_after must be a positive number of seconds, not {seconds!r}"
        )
    ctx.current.annotations[RETRY_AFTER] = repr(float(seconds))


def set_max_attempts(ctx: StateCtx, attempts: int) -> None:
    """Force-end the state after this many retries of one transition (overrides the
    recoverer's default; takes effect when the ctx is next committed).

    Raises:
        InvalidCommandError: ``attempts`` is not an int >= 0.
    """
    if not is_int(attempts) or attempts < 0:
        raise InvalidCommandError(f"max_attempts must be an int >= 0, not {attempts!r}")
    ctx.current.annotations[MAX_ATTEMPTS] = str(attempts)


def set_on_exhausted(ctx: StateCtx, flow_id: str) -> None:
    """When the state's attempts are spent, transit it to flow ``flow_id`` instead of ending
    it, so that the flow can settle what the state stands for (a layer above, say, marks its
    record failed). The reason is in that transition's annotation
    ``flowstate.recovery.ended`` (:data:`ENDED_REASON`). Should ``flow_id`` itself stall
    until its attempts are spent, the state is force-ended. Takes effect when the ctx is
    next committed.

    Raises:
        InvalidCommandError: ``flow_id`` is not a non-empty string of valid Unicode text.
    """
    if not flow_id or not is_text(flow_id):
        raise InvalidCommandError(f"on_exhausted needs a flow id, not {flow_id!r}")
    ctx.current.annotations[ON_EXHAUSTED] = flow_id


def attempt(state: State) -> int:
    """How many times the recoverer has retried the state's current transition (0: never).

    The count lives in the transition, so it starts over whenever a flow moves the state on.
    """
    return _int(state.transition.annotations.get(ATTEMPT), 0)


def is_disabled(state: State) -> bool:
    """True when :func:`disable` was committed on the state."""
    return state.annotations.get(DISABLED) == "true"


def retry_after_of(state: State, default: float) -> float:
    raw = state.annotations.get(RETRY_AFTER)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


def max_attempts_of(state: State, default: int) -> int:
    value = _int(state.annotations.get(MAX_ATTEMPTS), default)
    return value if value >= 0 else default


def _int(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        return default
