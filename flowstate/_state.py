"""The persisted model: State, Transition, Data, and StateCtx, the working set a flow acts on."""

import datetime
import time
from collections.abc import Mapping
from typing import Literal, TypeAlias

import msgspec

from flowstate._checks import RESERVED_PREFIX, describe, is_text, is_text_map
from flowstate.errors import InvalidCommandError

__all__ = [
    "CLAIM_ANNOTATION",
    "PAUSED_ANNOTATION",
    "Data",
    "State",
    "StateCtx",
    "Status",
    "Transition",
]

Status: TypeAlias = Literal["running", "paused", "ended"]

#: Transition annotation that marks a paused state (set by ``Pause``, dropped by the next transition).
PAUSED_ANNOTATION = "flowstate.paused"
#: Transition annotations written by ``Delay``: when the delay is due (ISO 8601) and where it leads.
DELAY_AT_ANNOTATION = "flowstate.delay.at"
DELAY_TO_ANNOTATION = "flowstate.delay.to"
#: Transition annotation that names who runs the state from this version on: an execution
#: started with a ``claim`` (``Execute(ctx, claim=...)``, ``engine.execute(ctx, claim=...)``)
#: writes it on every version it commits and goes on running, and a worker on the version it
#: claims. Workers leave a claimed version alone; the recoverer retries it like any other.
CLAIM_ANNOTATION = "flowstate.claim"


class Transition(msgspec.Struct, kw_only=True, gc=False):
    """Where a state goes next.

    Attributes:
        to: The id of the flow to run next; ``""`` means none (the state has ended).
        annotations: Transition-scoped annotations. A new transition starts with none, so
            markers such as "paused" or "delayed" vanish once the state moves on.
    """

    to: str = ""
    annotations: dict[str, str] = msgspec.field(default_factory=dict)


class State(msgspec.Struct, kw_only=True):
    """One version of a state record.

    Attributes:
        id: The state's id, unique within a store.
        rev: The global revision this version was committed at (0: never committed).
        labels: Indexed key/value pairs that queries and watchers filter on.
        annotations: Free-form key/value pairs (strings only) kept across transitions.
        committed_at: When this version was committed (UTC, millisecond precision).
        transition: The current transition.
    """

    id: str
    rev: int = 0
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    committed_at: datetime.datetime | None = None
    transition: Transition = msgspec.field(default_factory=Transition)

    @property
    def status(self) -> Status:
        """``running``, ``paused`` or ``ended``, derived from the transition."""
        transition = self.transition
        if not transition.to:
            return "ended"
        if PAUSED_ANNOTATION in transition.annotations:
            return "paused"
        return "running"

    @property
    def is_ended(self) -> bool:
        """True when no flow is set to run next (``End``, or never transited)."""
        return not self.transition.to

    @property
    def is_paused(self) -> bool:
        """True when ``Pause`` set the current transition; ``Resume`` continues it."""
        return bool(self.transition.to) and PAUSED_ANNOTATION in self.transition.annotations

    @property
    def is_delayed(self) -> bool:
        """True when this version was committed together with a ``Delay``.

        The delay is pending while this version stays the state's latest one: firing it, or
        any other commit, writes a new version with a fresh transition.
        """
        return DELAY_AT_ANNOTATION in self.transition.annotations

    @property
    def delay_at(self) -> datetime.datetime | None:
        """When this version's delay is due, or None."""
        raw = self.transition.annotations.get(DELAY_AT_ANNOTATION)
        return datetime.datetime.fromisoformat(raw) if raw is not None else None

    @property
    def delay_to(self) -> str | None:
        """The flow this version's delay transits to when due, or None."""
        return self.transition.annotations.get(DELAY_TO_ANNOTATION)

    def copy(self) -> "State":
        """Return an independent copy (no dict is shared with this one)."""
        transition = self.transition
        return State(
            id=self.id,
            rev=self.rev,
            labels=dict(self.labels),
            annotations=dict(self.annotations),
            committed_at=self.committed_at,
            transition=Transition(to=transition.to, annotations=dict(transition.annotations)),
        )


class Data(msgspec.Struct, frozen=True, kw_only=True):
    """A blob attached to a state under an alias (see ``StoreData`` and ``GetData``).

    Data is immutable: to change it, put a new ``Data(blob=...)`` (``rev=0``) into
    ``ctx.data``. ``StoreData`` writes a new version only for such new data; data loaded or
    stored before keeps its revision.

    Attributes:
        blob: The payload.
        rev: The revision of the state version the blob was stored with (0: not stored yet).
    """

    blob: bytes
    rev: int = 0


class StateCtx(msgspec.Struct, kw_only=True):
    """The working set a flow acts on.

    Attributes:
        current: The working copy; commands and flows change it.
        committed: The last version stored (or read); its ``rev`` is the compare-and-set
            token for the next commit. ``rev == 0`` means the state must not exist yet.
        transitions: Transitions made since the last commit, oldest first.
        data: Blobs attached to the state, by alias.
    """

    current: State
    committed: State
    transitions: list[Transition] = msgspec.field(default_factory=list)
    data: dict[str, Data] = msgspec.field(default_factory=dict)

    @classmethod
    def new(
        cls,
        id: str,
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> "StateCtx":
        """Create the context of a state that does not exist yet.

        Raises:
            InvalidCommandError: ``id`` is empty, not a string, not valid Unicode text (a lone
                surrogate), or starts with ``flowstate.`` (reserved for flowstate's own
                states); or a label or annotation is not such a string.
        """
        if is_text(id) and id.startswith(RESERVED_PREFIX):
            raise InvalidCommandError(
                f"state id {describe(id)} starts with {RESERVED_PREFIX!r}, which flowstate "
                "reserves for its own states; choose another id"
            )
        return _new_ctx(id, labels, annotations)

    @classmethod
    def of(cls, state: State) -> "StateCtx":
        """Wrap a stored state version: ``current`` is a working copy of it."""
        return cls(current=state.copy(), committed=state)

    @property
    def id(self) -> str:
        """The state's id."""
        return self.current.id

    def copy(self) -> "StateCtx":
        """Return an independent copy of the whole context."""
        return StateCtx(
            current=self.current.copy(),
            committed=self.committed.copy(),
            transitions=[
                Transition(to=t.to, annotations=dict(t.annotations)) for t in self.transitions
            ],
            data=dict(self.data),
        )


def check_shape(ctx: StateCtx) -> None:
    """Raise InvalidCommandError unless the parts of ``ctx`` are of the types a StateCtx holds
    (its fields are plain attributes: a caller may have set any of them to anything)."""
    parts: list[tuple[str, object, type]] = [
        ("current", ctx.current, State),
        ("committed", ctx.committed, State),
        ("transitions", ctx.transitions, list),
        ("data", ctx.data, dict),
        ("current.transition", getattr(ctx.current, "transition", None), Transition),
        ("committed.transition", getattr(ctx.committed, "transition", None), Transition),
    ]
    for name, value, kind in parts:
        if value.__class__ is not kind:
            raise InvalidCommandError(
                f"ctx.{name} must be a {kind.__name__}, not {describe(value)}"
            )


def check_id(state_id: object) -> None:
    """Raise InvalidCommandError unless ``state_id`` is a non-empty str every store can keep."""
    if not state_id or not is_text(state_id):
        raise InvalidCommandError(
            f"a state id must be a non-empty string of valid Unicode text, not {describe(state_id)}"
        )


def check_strings(state: State) -> None:
    """Raise InvalidCommandError unless every label and annotation key and value is a str
    that every store can keep (valid Unicode text: no lone surrogate)."""
    for mapping in (state.labels, state.annotations, state.transition.annotations):
        if mapping.__class__ is not dict:
            raise InvalidCommandError(
                f"state {describe(state.id)}: labels and annotations must be dicts, "
                f"not {type(mapping).__name__}"
            )
        if is_text_map(mapping):
            continue
        for key, value in mapping.items():
            if not (is_text(key) and is_text(value)):
                raise InvalidCommandError(
                    f"state {describe(state.id)}: {describe(key)} = {describe(value)} in labels "
                    "or annotations; labels and annotations map str to str (valid Unicode text)"
                )
    transition_to: object = state.transition.to
    if not is_text(transition_to):
        raise InvalidCommandError(
            f"state {describe(state.id)}: the transition's flow id {describe(transition_to)} "
            "is not a string of valid Unicode text"
        )


def _new_ctx(state_id: object, labels: object, annotations: object) -> "StateCtx":
    check_id(state_id)
    assert isinstance(state_id, str)  # check_id() made sure
    maps: list[dict[str, str]] = []
    for name, given in (("labels", labels), ("annotations", annotations)):
        if given is None:
            maps.append({})
        elif isinstance(given, Mapping):
            maps.append(dict(given))
        else:
            raise InvalidCommandError(
                f"{name} must be a mapping of str to str, not {type(given).__name__}"
            )
    state = State(id=state_id, labels=maps[0], annotations=maps[1])
    check_strings(state)
    return StateCtx(current=state, committed=State(id=state_id))


def internal_ctx(state_id: str, *, labels: dict[str, str]) -> StateCtx:
    """The context of a new state of flowstate's own (a recovery cursor): the one way to
    create a state whose id starts with the reserved ``flowstate.`` prefix.

    Raises:
        InvalidCommandError: ``state_id`` is not in the reserved namespace.
    """
    if not state_id.startswith(RESERVED_PREFIX):
        raise InvalidCommandError(f"{state_id!r} is not a flowstate-internal state id")
    return _new_ctx(state_id, labels, None)


def utcnow_ms() -> datetime.datetime:
    """The current UTC time truncated to milliseconds (the precision stored for commits)."""
    return _clock.now()


class _MillisecondClock:
    """Hands out one datetime per millisecond: commits within a millisecond share it."""

    __slots__ = ("_last", "_last_ms")

    def __init__(self) -> None:
        self._last_ms = -1
        self._last = datetime.datetime.fromtimestamp(0, datetime.UTC)

    def now(self) -> datetime.datetime:
        ms = time.time_ns() // 1_000_000
        if ms != self._last_ms:
            self._last_ms = ms
            self._last = _EPOCH + datetime.timedelta(milliseconds=ms)
        return self._last


_EPOCH = datetime.datetime.fromtimestamp(0, datetime.UTC)
_clock = _MillisecondClock()


def encode_ctx(ctx: StateCtx) -> str:
    """Serialise a whole StateCtx to a JSON string (used by ``Stack``).

    Raises:
        InvalidCommandError: Something in it cannot be written as JSON, such as text that is
            not valid Unicode (a lone surrogate) where a data blob should be.
    """
    try:
        return _ctx_json_encoder.encode(ctx).decode()
    except (UnicodeEncodeError, TypeError) as exc:
        raise InvalidCommandError(f"state {ctx.id!r} cannot be stacked: {exc}") from None


def decode_ctx(raw: str | bytes) -> StateCtx:
    """Parse a StateCtx written by :func:`encode_ctx`."""
    return _ctx_json_decoder.decode(raw)


_ctx_json_encoder = msgspec.json.Encoder()
_ctx_json_decoder = msgspec.json.Decoder(StateCtx)
