"""Managed flows as flowstate states: the snapshots users see, and how they are stored.

A managed flow is one state. Its labels carry what lists filter on (kind, status, owner,
controller, runtime); the state annotation ``flow.record`` holds the rest as JSON; each version's
transition annotations ``flow.event`` and ``flow.event.payload`` hold the audit event that
version records. A step is a state of its own (labelled with its flow's id), committed in the
same atomic commit as its flow's ``step_observed`` event. The audit trail of a flow is its own
history: the events are read back from the versions that carry them, so the two cannot disagree.
"""

import datetime
import enum
import math
from typing import Any, Final, Literal, TypeAlias

import msgspec

import flowstate as fs
from flowstate._checks import describe
from flowstate.errors import AlreadyTerminalError, InvalidTransitionError

__all__ = [
    "FlowEvent",
    "FlowStatus",
    "FlowStep",
    "FlowsPage",
    "ManagedFlow",
    "Runtime",
    "StepObservation",
    "StepStatus",
]

Runtime: TypeAlias = Literal["managed", "mirrored", "pipeline"]
RUNTIMES: Final = ("managed", "mirrored", "pipeline")


class FlowStatus(enum.StrEnum):
    """Where a managed flow is in its lifecycle."""

    CREATED = "created"  # recorded; nothing has started it yet
    RUNNING = "running"  # being worked on
    WAITING = "waiting"  # waiting for a timer or for `resume`
    FINISHED = "finished"  # done (terminal)
    FAILED = "failed"  # gave up, with a reason (terminal)
    CANCELLED = "cancelled"  # stopped on request (terminal)

    @property
    def is_terminal(self) -> bool:
        """True for finished, failed and cancelled: nothing changes such a flow any more."""
        return self in _TERMINAL


_TERMINAL = frozenset({FlowStatus.FINISHED, FlowStatus.FAILED, FlowStatus.CANCELLED})
_STATUSES = {status.value: status for status in FlowStatus}

#: The lifecycle, one entry per move: the statuses it may start from, and where it leads.
#: Every entry point checks its move against this table (through :func:`check_move`).
MOVES: Final[dict[str, tuple[frozenset[FlowStatus], FlowStatus]]] = {
    "start": (frozenset({FlowStatus.CREATED}), FlowStatus.RUNNING),
    "wait": (frozenset({FlowStatus.RUNNING}), FlowStatus.WAITING),
    "resume": (frozenset({FlowStatus.WAITING}), FlowStatus.RUNNING),
    "finish": (frozenset({FlowStatus.RUNNING}), FlowStatus.FINISHED),
    "fail": (frozenset({FlowStatus.RUNNING, FlowStatus.WAITING}), FlowStatus.FAILED),
    "cancel": (
        frozenset({FlowStatus.CREATED, FlowStatus.RUNNING, FlowStatus.WAITING}),
        FlowStatus.CANCELLED,
    ),
}


def check_move(flow_id: str, current: FlowStatus, move: str | None) -> FlowStatus:
    """Return the status ``move`` leads a flow in ``current`` to; raise if it may not.

    ``move`` None is a change that keeps the status (allowed unless the flow is terminal).

    Raises:
        AlreadyTerminalError: ``current`` is terminal.
        InvalidTransitionError: The lifecycle has no such move from ``current``.
    """
    if move is None:
        if current.is_terminal:
            raise AlreadyTerminalError(flow_id, current, None)
        return current
    sources, target = MOVES[move]
    if current.is_terminal:
        raise AlreadyTerminalError(flow_id, current, target)
    if current not in sources:
        raise InvalidTransitionError(flow_id, current, target)
    return target


class StepStatus(enum.StrEnum):
    """Where one step (one run of a task) is."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ManagedFlow(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a managed flow at one revision.

    Attributes:
        id: The flow's id (its state's id).
        controller: Who drives the flow (an agent, a service, a pipeline id).
        goal: What the flow is for, in words.
        owner: Whom the flow belongs to (lists filter on it).
        origin: Where the request came from.
        current_step: The step the controller is at, in its own words.
        state: The flow's working state, a JSON object.
        wait: What the flow waits for while ``waiting`` (``{"kind": "timer", "at": ...}``
            resumes by itself), else None.
        status: The lifecycle status.
        cancel_requested: True once ``request_cancel`` was called (it stays set).
        runtime: ``managed`` (driven through the methods), ``mirrored`` (mirrors work done
            elsewhere, observed step by step) or ``pipeline`` (a pipeline run).
        revision: The flowstate revision of this snapshot.
        created_at: When the flow was first committed.
        updated_at: When this version was committed.
        pipeline: The pipeline a ``pipeline`` run executes, else None.
    """

    id: str
    controller: str
    goal: str
    owner: str
    origin: str
    current_step: str
    state: dict[str, Any]
    wait: dict[str, Any] | None
    status: FlowStatus
    cancel_requested: bool
    runtime: str
    revision: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    pipeline: str | None = None


class FlowsPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of managed flows at their latest versions, oldest change first.

    Attributes:
        flows: The flows.
        more: True when a next page exists: ask again with ``since_rev=last_rev``.
        last_rev: The revision the page ends at (the last flow's, or the ``since_rev`` asked
            for when the page is empty).
    """

    flows: list[ManagedFlow]
    more: bool
    last_rev: int


class FlowEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a flow's audit trail: what one committed version of the flow recorded.

    Attributes:
        revision: The revision of the version.
        kind: ``created``, ``started``, ``waiting``, ``resumed``, ``finished``, ``failed``,
            ``cancel_requested``, ``cancelled``, ``state_updated``, ``step_observed``;
            pipeline runs add ``step_started``, ``step_completed`` and ``step_failed``.
        payload: What the event carried (a patch, a reason, a step, ...).
        at: When it was committed.
        status: The flow's status after the event.
    """

    revision: int
    kind: str
    payload: dict[str, Any]
    at: datetime.datetime
    status: FlowStatus


class StepObservation(msgspec.Struct, frozen=True, kw_only=True):
    """A report about one step of a flow, to :meth:`FlowManager.record_step`.

    Steps are keyed by ``(flow_id, run_id)``: a second observation of a run updates its step.

    Attributes:
        flow_id: The flow the step belongs to.
        run_id: The step's id within the flow (e.g. the id of a child run).
        task: What the step does.
        status: ``pending``, ``running``, ``completed``, ``failed`` or ``cancelled``.
        child_session_key: Where the step's own work can be followed; None keeps the one
            an earlier observation gave.
        result: The step's result (JSON), if any.
        error: Why the step failed, if it did.
    """

    flow_id: str
    run_id: str
    task: str
    status: StepStatus | str
    child_session_key: str | None = None
    result: Any = None
    error: str | None = None


class FlowStep(msgspec.Struct, frozen=True, kw_only=True):
    """A step of a managed flow, as last recorded.

    Attributes:
        id: The step's state id.
        flow_id: The flow it belongs to.
        run_id: Its id within the flow.
        task: What it does (for pipelines: the step id).
        runtime: The runtime of its flow.
        status: ``pending``, ``running``, ``completed``, ``failed`` or ``cancelled``.
        attempt: Which attempt this is (1-based; pipelines count retries).
        result: Its result or output (JSON), if any.
        error: Why it failed, if it did.
        child_session_key: Where its own work can be followed, if known.
        created_at: When it was first recorded.
        updated_at: When it was last recorded.
        started_at: When it first ran, if it did.
        ended_at: When it completed, failed or was cancelled, if it did.
        revision: The revision of the step's latest version.
    """

    id: str
    flow_id: str
    run_id: str
    task: str
    runtime: str
    status: StepStatus
    attempt: int
    result: Any
    error: str | None
    child_session_key: str | None
    created_at: datetime.datetime
    updated_at: datetime.datetime
    started_at: datetime.datetime | None = None
    ended_at: datetime.datetime | None = None
    revision: int = 0


# -- storage ------------------------------------------------------------------------------------

# Labels: a flow's version carries RUNTIME (only flows do), STATUS, OWNER and CONTROLLER (a
# pipeline run's controller is its pipeline); a step's carries FLOW_ID (only steps do) and
# STATUS. Every label is indexed on every version, so there are no more than lists need.
STATUS = "flow.status"
OWNER = "flow.owner"
CONTROLLER = "flow.controller"
RUNTIME = "flow.runtime"
FLOW_ID = "flow.id"
RECORD = "flow.record"
STEP = "flow.step"
EVENT = "flow.event"
EVENT_PAYLOAD = "flow.event.payload"
MORE_EVENTS = "flow.event.more"

#: The flow non-terminal managed and mirrored flows rest paused at; nothing ever runs it.
REST_FLOW = "flowstate.workflows.rest"
#: The flow a timer wait's delay leads to: it resumes the flow.
TIMER_FLOW = "flowstate.workflows.timer"
#: The flow the recoverer hands a pipeline run to once its recovery attempts are spent: it
#: fails the run (a bare force-end would leave the run "running" for ever).
EXHAUSTED_FLOW = "flowstate.workflows.exhausted"


class Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What ``flow.record`` holds: every field of a flow that labels do not."""

    controller: str
    goal: str = ""
    origin: str = ""
    current_step: str = ""
    state: dict[str, Any] = msgspec.field(default_factory=dict)
    wait: dict[str, Any] | None = None
    cancel_requested: bool = False
    created_at: datetime.datetime | None = None
    #: Pipeline runs: the run's progress, owned by the pipeline executor.
    run: dict[str, Any] | None = None


class StepRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What ``flow.step`` holds: every field of a step that labels do not."""

    run_id: str
    task: str
    runtime: str
    attempt: int = 1
    result: Any = None
    error: str | None = None
    child_session_key: str | None = None
    created_at: datetime.datetime | None = None
    #: The revision of the step's first version (steps are listed in this order).
    created_rev: int = 0
    started_at: datetime.datetime | None = None
    ended_at: datetime.datetime | None = None


_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(Record)
_step_decoder = msgspec.json.Decoder(StepRecord)
_object_decoder = msgspec.json.Decoder(dict[str, Any])
_more_decoder = msgspec.json.Decoder(list[tuple[str, dict[str, Any]]])


def encode(value: object) -> str:
    """JSON text of ``value`` (for annotations)."""
    return _encoder.encode(value).decode()


def json_object(value: object, what: str) -> dict[str, Any]:
    """An independent, JSON-clean copy of a JSON object given by a caller.

    Values inside follow JSON's rules as msgspec encodes them: tuples become lists, and keys
    of nested mappings become strings.

    Raises:
        InvalidCommandError: ``value`` is not a mapping with string keys, or not JSON.
    """
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise fs.InvalidCommandError(
            f"{what} must be a JSON object (a dict with string keys), not {value!r}"
        )
    return _object_decoder.decode(json_bytes(value, what))


def iso(at: datetime.datetime) -> str:
    """``at`` as ISO 8601 text, UTC written ``Z`` (how times appear in records and events)."""
    return at.isoformat().replace("+00:00", "Z")


def json_bytes(value: object, what: str) -> bytes:
    """``value`` as JSON.

    Raises:
        InvalidCommandError: ``value`` is not JSON: it holds something other than dicts (with
            str or int keys), lists, tuples, str, int, float, bool and None, or a float that
            is NaN or infinite.
    """
    try:
        raw = _encoder.encode(value)
        problem = _not_json(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise fs.InvalidCommandError(f"{what} is not JSON-encodable: {exc}") from None
    if problem is not None:
        raise fs.InvalidCommandError(f"{what} {problem}")
    return raw


def _not_json(value: object) -> str | None:
    """What in ``value`` JSON cannot hold as it is; None when it can hold all of it.

    The encoder writes more than JSON's own types (bytes as base64, datetimes and sets, for
    example), which would come back as something else: strings and lists.
    """
    if value is None or isinstance(value, str | int):  # bool is an int
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        # The encoder writes them as null, which would lose them.
        return "holds NaN or infinity, which JSON cannot store (they would come back as null)"
    if isinstance(value, dict):
        numbered = False
        for key, item in value.items():
            if not isinstance(key, str):
                if not isinstance(key, int) or isinstance(key, bool):
                    return f"has the key {describe(key)}; JSON object keys are strings (or ints)"
                numbered = True
            problem = _not_json(item)
            if problem is not None:
                return problem
        if numbered and len({str(key) for key in value}) < len(value):
            return "has an int key and the same number as a string key, which JSON would merge"
        return None
    if isinstance(value, list | tuple):
        for item in value:
            problem = _not_json(item)
            if problem is not None:
                return problem
        return None
    return (
        f"holds a {type(value).__name__} ({describe(value)}), which JSON has no type for (it would "
        "come back as something else): use str, int, float, bool, None, lists and dicts"
    )


def is_flow(state: fs.State) -> bool:
    """True when ``state`` is a managed flow's version."""
    return RUNTIME in state.labels and RECORD in state.annotations


def is_step(state: fs.State) -> bool:
    """True when ``state`` is a step's version."""
    return FLOW_ID in state.labels and STEP in state.annotations


def read_record(state: fs.State) -> Record:
    return _record_decoder.decode(state.annotations[RECORD])


def flow_of(state: fs.State, record: Record | None = None) -> ManagedFlow:
    """The snapshot a stored flow version holds."""
    if record is None:
        record = read_record(state)
    labels = state.labels
    committed_at = state.committed_at or _EPOCH
    runtime = labels[RUNTIME]
    pipeline = labels[CONTROLLER] if runtime == "pipeline" else None
    return ManagedFlow(
        id=state.id,
        controller=record.controller,
        goal=record.goal,
        owner=labels.get(OWNER, ""),
        origin=record.origin,
        current_step=record.current_step,
        state=record.state,
        wait=record.wait,
        status=_STATUSES[labels[STATUS]],
        cancel_requested=record.cancel_requested,
        runtime=runtime,
        revision=state.rev,
        created_at=record.created_at or committed_at,
        updated_at=committed_at,
        pipeline=pipeline,
    )


def events_of(state: fs.State) -> list[FlowEvent]:
    """The audit events a stored flow version records (one, or none for a version that only
    moved the state, such as a delay firing; a pipeline run may record more)."""
    annotations = state.transition.annotations
    kind = annotations.get(EVENT)
    if kind is None:
        return []
    raw = annotations.get(EVENT_PAYLOAD)
    at = state.committed_at or _EPOCH
    status = _STATUSES[state.labels[STATUS]]
    found = [
        FlowEvent(
            revision=state.rev,
            kind=kind,
            payload=_object_decoder.decode(raw) if raw else {},
            at=at,
            status=status,
        )
    ]
    more = annotations.get(MORE_EVENTS)
    if more:
        for kind, payload in _more_decoder.decode(more):
            found.append(
                FlowEvent(revision=state.rev, kind=kind, payload=payload, at=at, status=status)
            )
    return found


def read_step(state: fs.State) -> StepRecord:
    return _step_decoder.decode(state.annotations[STEP])


def step_of(state: fs.State, record: StepRecord | None = None) -> FlowStep:
    """The step a stored step version holds."""
    if record is None:
        record = read_step(state)
    committed_at = state.committed_at or _EPOCH
    return FlowStep(
        id=state.id,
        flow_id=state.labels[FLOW_ID],
        run_id=record.run_id,
        task=record.task,
        runtime=record.runtime,
        status=StepStatus(state.labels[STATUS]),
        attempt=record.attempt,
        result=record.result,
        error=record.error,
        child_session_key=record.child_session_key,
        created_at=record.created_at or committed_at,
        updated_at=committed_at,
        started_at=record.started_at,
        ended_at=record.ended_at,
        revision=state.rev,
    )


#: What joins a flow's id and a step's run id in the step's state id (never in a flow id).
STEPS_PART: Final = "/steps/"


def step_id(flow_id: str, run_id: str) -> str:
    """The state id of a flow's step."""
    return f"{flow_id}{STEPS_PART}{run_id}"


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
