"""Changes of managed flows: what one commit of a flow writes, built by the lifecycle's moves."""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from typing import Any

from attrs import define, field

import flowstate as fs
from flowstate.workflows._model import (
    EVENT,
    EVENT_PAYLOAD,
    FLOW_ID,
    MORE_EVENTS,
    RECORD,
    REST_FLOW,
    STATUS,
    STEP,
    TIMER_FLOW,
    FlowStatus,
    ManagedFlow,
    Record,
    StepRecord,
    StepStatus,
    check_move,
    encode,
    iso,
    read_record,
)

__all__ = [
    "Change",
    "Plan",
    "cancelled",
    "failed",
    "flow_run_flow",
    "resumed",
    "stage",
    "stage_step",
]


@define(frozen=True)
class Change:
    """What one mutation commits: the flow's status and record after it, its event, and
    anything committed with it.

    Attributes:
        status: The status after the change.
        record: The record after the change.
        event: The audit event's kind.
        payload: The audit event's payload (a JSON object).
        delay_at: For a timer wait: when the flow resumes by itself.
        flow: For a pipeline run that goes on running: the flow it runs next.
        also: Other states written in the same commit (their ctx, already changed).
        more: Further events the same version records, as ``(kind, payload)`` (a pipeline
            step that ends and the next one that starts, in one commit).
        data: Data blobs stored with the version, by alias.
    """

    status: FlowStatus
    record: Record
    event: str
    payload: dict[str, Any] = field(factory=dict)
    delay_at: datetime.datetime | None = None
    flow: str | None = None
    also: tuple[fs.StateCtx, ...] = ()
    more: tuple[tuple[str, dict[str, Any]], ...] = ()
    data: dict[str, bytes] = field(factory=dict)


#: Checks a move on a flow (its stored version, its snapshot and its record) and returns the
#: change, or None when there is nothing to commit. It may change the record, whose state the
#: snapshot shares.
Plan = Callable[[fs.State, ManagedFlow, Record], Awaitable[Change | None] | Change | None]


def resumed(flow: ManagedFlow, record: Record, patch: dict[str, Any] | None, *, by: str) -> Change:
    """``waiting → running``: clear the wait, merge ``patch``."""
    status = check_move(flow.id, flow.status, "resume")
    record.wait = None
    payload: dict[str, Any] = {"by": by}
    if patch:
        record.state.update(patch)
        payload["patch"] = patch
    return Change(status=status, record=record, event="resumed", payload=payload)


def failed(flow: ManagedFlow, record: Record, reason: str, **details: Any) -> Change:
    """``running | waiting → failed``: stamp the reason and the time into the state."""
    status = check_move(flow.id, flow.status, "fail")
    at = iso(datetime.datetime.now(datetime.UTC))
    record.state["failure"] = {"reason": reason, "at": at}
    record.wait = None
    return Change(
        status=status,
        record=record,
        event="failed",
        payload={"reason": reason, **details},
    )


def cancelled(flow: ManagedFlow, record: Record, *, how: str, **details: Any) -> Change:
    """Any non-terminal status ``→ cancelled``; ``how`` says who stopped it."""
    status = check_move(flow.id, flow.status, "cancel")
    record.wait = None
    return Change(
        status=status,
        record=record,
        event="cancelled",
        payload={"how": how, "requested": record.cancel_requested, **details},
    )


def preceded(change: Change, events: list[tuple[str, dict[str, Any]]]) -> Change:
    """``change`` with ``events`` recorded before its own event, in the same version."""
    if not events:
        return change
    (kind, payload), *rest = events
    return Change(
        status=change.status,
        record=change.record,
        event=kind,
        payload=payload,
        flow=change.flow,
        more=(*rest, (change.event, change.payload), *change.more),
    )


def stage(ctx: fs.StateCtx, change: Change) -> fs.Commit:
    """The commit that stores ``change`` on ``ctx`` (and the states it carries along).

    The flow's new version gets a fresh transition carrying the change's event: it rests
    (paused) while not terminal, ended when terminal, paused with a ``Delay`` for a timer
    wait, or running at ``change.flow`` (a pipeline run that goes on).
    """
    record = change.record
    committed = ctx.committed
    if record.created_at is None and committed.rev:
        record.created_at = read_record(committed).created_at or committed.committed_at
    state = ctx.current
    state.labels[STATUS] = change.status.value
    state.annotations[RECORD] = encode(record)
    event: dict[str, str] = {}
    if change.event:
        event[EVENT] = change.event
        if change.payload:
            event[EVENT_PAYLOAD] = encode(change.payload)
        if change.more:
            event[MORE_EVENTS] = encode([[kind, payload] for kind, payload in change.more])
    delay_at = change.delay_at
    if delay_at is None and change.status is FlowStatus.WAITING:
        # A change that keeps a timer wait (update_state, record_step, request_cancel) binds
        # the timer to the new version: the delay bound to the old one can no longer fire.
        delay_at = _timer_of(record)
    move: fs.Command
    if change.status.is_terminal:
        move = fs.End(ctx, annotations=event)
    elif change.flow is not None:
        move = fs.Transit(ctx, change.flow, annotations=event)
    elif delay_at is not None:
        move = fs.Pause(ctx, TIMER_FLOW, annotations=event)
    else:
        move = fs.Pause(ctx, REST_FLOW, annotations=event)
    if delay_at is None and not change.also and not change.data:
        return fs.Commit(move)
    commands: list[fs.Command] = [move]
    if delay_at is not None:
        commands.append(fs.Delay(ctx, TIMER_FLOW, until=delay_at))
    for alias, blob in change.data.items():
        ctx.data[alias] = fs.Data(blob=blob)
        commands.append(fs.StoreData(ctx, alias))
    commands += [fs.Noop(other) for other in change.also]
    return fs.Commit(*commands)


def _timer_of(record: Record) -> datetime.datetime | None:
    """When the flow's timer wait is due; None when it waits for something else."""
    wait = record.wait
    if not wait or wait.get("kind") != "timer" or not isinstance(wait.get("at"), str):
        return None
    return datetime.datetime.fromisoformat(wait["at"])


def flow_run_flow(state: fs.State, flow: ManagedFlow) -> str | None:
    """The flow a running pipeline run goes on running at (the one its version ``state`` runs
    at: its own definition's executor); None for other flows."""
    if flow.runtime == "pipeline" and flow.status is FlowStatus.RUNNING and state.transition.to:
        return state.transition.to
    return None


def stage_step(ctx: fs.StateCtx, flow_id: str, step: StepRecord, status: StepStatus) -> None:
    """Write a step record into its (resting, ended) state's working copy."""
    now = datetime.datetime.now(datetime.UTC)
    if status is StepStatus.RUNNING and step.started_at is None:
        step.started_at = now
    if status in (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.CANCELLED):
        step.ended_at = step.ended_at or now
        if step.started_at is None:
            step.started_at = step.ended_at
    committed = ctx.committed
    if step.created_at is None and committed.rev:
        # A step's creation is its first commit: stored once the step is updated.
        step.created_at = committed.committed_at
        step.created_rev = committed.rev
    state = ctx.current
    state.labels.update({FLOW_ID: flow_id, STATUS: str(status)})
    state.annotations[STEP] = encode(step)
    state.transition = fs.Transition()
