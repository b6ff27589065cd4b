"""Commands: the instructions flows return and ``Engine.do`` applies.

Transit, End, Pause, Resume, Stack and Unstack change the working copy in memory; wrap them in
``Commit`` to store the result atomically. Delay and StoreData are always stored: outside a
``Commit`` each behaves as a ``Commit`` of its own.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import msgspec
from attrs import define, field

from flowstate._checks import as_utc, describe, is_number, is_text, is_text_map
from flowstate._state import (
    PAUSED_ANNOTATION,
    State,
    StateCtx,
    Transition,
    check_shape,
    decode_ctx,
    encode_ctx,
)
from flowstate.errors import InvalidCommandError

__all__ = [
    "Command",
    "Commit",
    "Delay",
    "End",
    "Execute",
    "GetData",
    "Noop",
    "Pause",
    "Resume",
    "Stack",
    "StoreData",
    "Transit",
    "Unstack",
]

RESUMED_ANNOTATION = "flowstate.resumed"


class Command:
    """Base of every command."""

    __slots__ = ()


def _check_ctx(ctx: object, command: str) -> None:
    if not isinstance(ctx, StateCtx):
        raise InvalidCommandError(f"{command} needs a StateCtx, not {type(ctx).__name__}")


def _check_flow_id(to: object, command: str) -> None:
    if not to or not is_text(to):
        raise InvalidCommandError(
            f"{command} needs a non-empty flow id (str of valid Unicode text), not "
            f"{describe(to)}; use End to finish a state"
        )


def _check_name(name: object, command: str, what: str) -> None:
    if not name or not is_text(name):
        raise InvalidCommandError(
            f"{command} needs a non-empty {what} (str of valid Unicode text), not {describe(name)}"
        )


def _check_annotations(annotations: object, command: str) -> dict[str, str] | None:
    if annotations is None:
        return None
    # A dict is checked without the (slower) Mapping ABC check: flows pass dicts.
    if not (type(annotations) is dict or isinstance(annotations, Mapping)) or not is_text_map(
        annotations
    ):
        raise InvalidCommandError(
            f"{command} annotations must map str to str (valid Unicode text), "
            f"not {describe(annotations)}"
        )
    return dict(annotations) or None


def _set(ctx: StateCtx, transition: Transition) -> None:
    current, transitions = ctx.current, ctx.transitions
    if (
        current.__class__ is not State
        or current.transition.__class__ is not Transition
        or transitions.__class__ is not list
        or ctx.data.__class__ is not dict
    ):
        check_shape(ctx)
    current.transition = transition
    transitions.append(transition)


@define(slots=True, init=False)
class Transit(Command):
    """Move ``ctx`` to flow ``to`` (memory only; wrap in ``Commit`` to store it).

    Returned by a flow, ``Engine.execute`` goes on with flow ``to``.
    """

    ctx: StateCtx
    to: str
    annotations: dict[str, str] | None

    def __init__(
        self, ctx: StateCtx, to: str, *, annotations: Mapping[str, str] | None = None
    ) -> None:
        _check_ctx(ctx, "Transit")
        _check_flow_id(to, "Transit")
        self.ctx = ctx
        self.to = to
        self.annotations = _check_annotations(annotations, "Transit")

    def _mutate(self) -> None:
        _set(self.ctx, Transition(to=self.to, annotations=dict(self.annotations or {})))


@define(slots=True, init=False)
class End(Command):
    """Finish ``ctx``: its transition points nowhere (``to == ""``), a terminal resting status.

    ``annotations`` are the new transition's own (e.g. why the state ended).
    """

    ctx: StateCtx
    annotations: dict[str, str] | None

    def __init__(self, ctx: StateCtx, *, annotations: Mapping[str, str] | None = None) -> None:
        _check_ctx(ctx, "End")
        self.ctx = ctx
        self.annotations = _check_annotations(annotations, "End")

    def _mutate(self) -> None:
        _set(self.ctx, Transition(annotations=dict(self.annotations or {})))


@define(slots=True, init=False)
class Pause(Command):
    """Pause ``ctx``: it rests (the recoverer leaves it alone) until ``Resume``.

    ``to`` is where ``Resume`` continues; by default the flow the state is at now.
    ``annotations`` are the new transition's own, besides the paused marker.
    """

    ctx: StateCtx
    to: str
    annotations: dict[str, str] | None

    def __init__(
        self,
        ctx: StateCtx,
        to: str | None = None,
        *,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        _check_ctx(ctx, "Pause")
        to = ctx.current.transition.to if to is None else to
        _check_flow_id(to, "Pause")
        self.ctx = ctx
        self.to = to
        self.annotations = _check_annotations(annotations, "Pause")

    def _mutate(self) -> None:
        annotations = {**(self.annotations or {}), PAUSED_ANNOTATION: "true"}
        _set(self.ctx, Transition(to=self.to, annotations=annotations))


@define(slots=True, init=False)
class Resume(Command):
    """Continue a paused ``ctx`` at the flow it was paused at.

    ``annotations`` are the new transition's own, besides the resumed marker.
    """

    ctx: StateCtx
    annotations: dict[str, str] | None

    def __init__(self, ctx: StateCtx, *, annotations: Mapping[str, str] | None = None) -> None:
        _check_ctx(ctx, "Resume")
        self.ctx = ctx
        self.annotations = _check_annotations(annotations, "Resume")

    def _mutate(self) -> None:
        check_shape(self.ctx)
        to = self.ctx.current.transition.to
        _check_flow_id(to, "Resume")
        annotations = {**(self.annotations or {}), RESUMED_ANNOTATION: "true"}
        _set(self.ctx, Transition(to=to, annotations=annotations))


@define(slots=True, init=False)
class Delay(Command):
    """When due, transit ``ctx`` to ``to`` and execute it, if the state has not moved since.

    The delay is bound to the state version the commit writes (a ``Delay`` always writes its
    state): any later commit of the state cancels it. Give exactly one of ``seconds`` (from
    now) or ``until`` (a timezone-aware datetime). Returned by a flow, execution stops with
    status ``delayed``; outside a ``Commit`` it is committed on its own.
    """

    ctx: StateCtx
    to: str
    at: datetime.datetime

    def __init__(
        self,
        ctx: StateCtx,
        to: str,
        *,
        seconds: float | None = None,
        until: datetime.datetime | None = None,
    ) -> None:
        _check_ctx(ctx, "Delay")
        _check_flow_id(to, "Delay")
        if (seconds is None) == (until is None):
            raise InvalidCommandError("Delay needs exactly one of seconds= or until=")
        if seconds is not None:
            if not is_number(seconds):
                raise InvalidCommandError(
                    f"Delay seconds must be a finite number >= 0, not {describe(seconds)}"
                )
            try:
                at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
            except OverflowError:
                raise InvalidCommandError(
                    f"Delay seconds={describe(seconds)} lies past the last representable date"
                ) from None
        else:
            if not isinstance(until, datetime.datetime) or until.tzinfo is None:
                raise InvalidCommandError("Delay until= must be a timezone-aware datetime")
            utc = as_utc(until)
            if utc is None:
                raise InvalidCommandError(
                    f"Delay until={until!r} has no UTC equivalent that a datetime can hold"
                )
            at = utc
        self.ctx = ctx
        self.to = to
        self.at = at


@define(slots=True)
class Execute(Command):
    """Run ``ctx``'s flow loop. Passed to ``Engine.do`` it runs in the background, owned by
    the engine; returned by a flow, ``Engine.execute`` goes on with ``ctx``.

    ``claim`` (passed to ``Engine.do``): a name written as the ``flowstate.claim`` transition
    annotation on every version the execution commits and goes on running, so that workers
    leave those versions to it (see ``Engine.execute``).
    """

    ctx: StateCtx = field()
    claim: str | None = field(default=None, kw_only=True)

    @ctx.validator
    def _validate(self, _attr: object, value: object) -> None:
        _check_ctx(value, "Execute")

    @claim.validator
    def _validate_claim(self, _attr: object, value: object) -> None:
        if value is not None:
            _check_name(value, "Execute", "claim")


@define(slots=True, init=False)
class Noop(Command):
    """Do nothing. Returned by a flow, execution stops with status ``noop``; inside a
    ``Commit`` it stores ``ctx`` as it is (e.g. to persist changed annotations).
    """

    ctx: StateCtx | None

    def __init__(self, ctx: StateCtx | None = None) -> None:
        if ctx is not None:
            _check_ctx(ctx, "Noop")
        self.ctx = ctx


@define(slots=True, init=False)
class Stack(Command):
    """Store the whole of ``stacked`` in ``carrier.current.annotations[key]``.

    The annotation must be unused. Use ``Unstack`` to restore it (call-and-return).
    """

    carrier: StateCtx
    stacked: StateCtx
    key: str

    def __init__(self, carrier: StateCtx, stacked: StateCtx, key: str) -> None:
        _check_ctx(carrier, "Stack")
        _check_ctx(stacked, "Stack")
        _check_name(key, "Stack", "annotation key")
        self.carrier = carrier
        self.stacked = stacked
        self.key = key

    @property
    def ctx(self) -> StateCtx:
        return self.carrier

    def _mutate(self) -> None:
        check_shape(self.carrier)
        annotations = self.carrier.current.annotations
        if self.key in annotations:
            raise InvalidCommandError(
                f"Stack: annotation {self.key!r} of state {self.carrier.id!r} is already used; "
                "Unstack it first or pick another key"
            )
        annotations[self.key] = encode_ctx(self.stacked)


@define(slots=True, init=False)
class Unstack(Command):
    """Restore the ctx stacked in ``carrier.current.annotations[key]`` into ``into`` and
    clear the annotation.
    """

    carrier: StateCtx
    into: StateCtx
    key: str

    def __init__(self, carrier: StateCtx, into: StateCtx, key: str) -> None:
        _check_ctx(carrier, "Unstack")
        _check_ctx(into, "Unstack")
        _check_name(key, "Unstack", "annotation key")
        self.carrier = carrier
        self.into = into
        self.key = key

    @property
    def ctx(self) -> StateCtx:
        return self.carrier

    def _mutate(self) -> None:
        check_shape(self.carrier)
        raw = self.carrier.current.annotations.get(self.key)
        if raw is None:
            raise InvalidCommandError(
                f"Unstack: state {self.carrier.id!r} has no stacked state under {self.key!r}"
            )
        try:
            restored = decode_ctx(raw)
        except msgspec.DecodeError as exc:
            raise InvalidCommandError(
                f"Unstack: annotation {self.key!r} of state {self.carrier.id!r} "
                "does not hold a stacked state"
            ) from exc
        del self.carrier.current.annotations[self.key]
        into = self.into
        into.current = restored.current
        into.committed = restored.committed
        into.transitions = restored.transitions
        into.data = restored.data


@define(slots=True, init=False)
class StoreData(Command):
    """Store ``ctx.data[alias]`` with the state, atomically with the commit.

    New data (``rev == 0``) gets the revision of the state version it is stored with;
    data already stored keeps its revision. Outside a ``Commit`` it is committed on its own.
    """

    ctx: StateCtx
    alias: str

    def __init__(self, ctx: StateCtx, alias: str) -> None:
        _check_ctx(ctx, "StoreData")
        _check_name(alias, "StoreData", "alias")
        self.ctx = ctx
        self.alias = alias


@define(slots=True, init=False)
class GetData(Command):
    """Load the data stored under ``alias`` as of ``ctx.committed`` into ``ctx.data[alias]``."""

    ctx: StateCtx
    alias: str

    def __init__(self, ctx: StateCtx, alias: str) -> None:
        _check_ctx(ctx, "GetData")
        _check_name(alias, "GetData", "alias")
        self.ctx = ctx
        self.alias = alias


@define(slots=True, init=False)
class Commit(Command):
    """Apply ``commands`` in order, then store every state they touch in one atomic write.

    The write succeeds only if each state's stored latest revision still equals its
    ``ctx.committed.rev``; otherwise nothing is written and ``ConflictError`` names every
    conflicting state. ``Commit``, ``Execute`` and ``GetData`` cannot be nested inside.
    """

    commands: tuple[Command, ...]

    def __init__(self, *commands: Command) -> None:
        for command in commands:
            if isinstance(command, (Commit, Execute, GetData)):
                raise InvalidCommandError(
                    f"{type(command).__name__} cannot be inside a Commit; "
                    "apply it before or after the Commit"
                )
            if not isinstance(command, Command):
                raise InvalidCommandError(f"Commit takes commands, not {type(command).__name__}")
        self.commands = commands
