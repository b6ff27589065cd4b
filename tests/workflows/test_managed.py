"""Managed flows on every driver: the lifecycle, cancel intent, merges, concurrency, timer
waits, observed steps and the audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import flowstate as fs
from flowstate.drivers.faulty import Fault, FaultyDriver
from flowstate.workflows import (
    AlreadyTerminalError,
    CancelPendingError,
    FlowManager,
    FlowStatus,
    InvalidTransitionError,
    ManagedFlow,
    StepObservation,
)

pytestmark = pytest.mark.anyio


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a condition that no watcher reports: a dropped delay commits nothing, the
    delayer only counts it."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 (a counter, not an event)
            await asyncio.sleep(0.01)


async def history(engine: fs.Engine, flow_id: str) -> list[fs.State]:
    return [state async for state in engine.iter_states(id=flow_id)]


# -- the lifecycle ---------------------------------------------------------------------------

# Written out here rather than read from the package, so that the test checks the table.
ALLOWED = {
    ("created", "start"): "running",
    ("running", "wait"): "waiting",
    ("waiting", "resume"): "running",
    ("running", "finish"): "finished",
    ("running", "fail"): "failed",
    ("waiting", "fail"): "failed",
    ("created", "cancel"): "cancelled",
    ("running", "cancel"): "cancelled",
    ("waiting", "cancel"): "cancelled",
}
TARGET = {
    "start": "running",
    "wait": "waiting",
    "resume": "running",
    "finish": "finished",
    "fail": "failed",
    "cancel": "cancelled",
}


async def flow_in(flows: FlowManager, status: str) -> ManagedFlow:
    """A new flow brought to ``status`` through the public methods."""
    flow = await flows.create(controller="tests", goal=f"reach {status}")
    path = {
        "created": [],
        "running": ["start"],
        "waiting": ["start", "wait"],
        "finished": ["start", "finish"],
        "failed": ["start", "fail"],
        "cancelled": ["cancel"],
    }[status]
    for move in path:
        flow = await apply(flows, flow.id, move)
    assert flow.status == status
    return flow


async def apply(flows: FlowManager, flow_id: str, move: str) -> ManagedFlow:
    calls: dict[str, Callable[[], Awaitable[ManagedFlow]]] = {
        "start": lambda: flows.start(flow_id),
        "wait": lambda: flows.wait(flow_id, {"kind": "approval", "from": "kate"}),
        "resume": lambda: flows.resume(flow_id),
        "finish": lambda: flows.finish(flow_id),
        "fail": lambda: flows.fail(flow_id, "it broke"),
        "cancel": lambda: flows.cancel(flow_id),
    }
    return await calls[move]()


async def test_every_move_of_the_lifecycle(engine: fs.Engine, flows: FlowManager) -> None:
    for status in ["created", "running", "waiting", "finished", "failed", "cancelled"]:
        for move, target in TARGET.items():
            flow = await flow_in(flows, status)
            head = await engine.driver.head_rev()
            allowed = ALLOWED.get((status, move))
            if allowed is not None:
                moved = await apply(flows, flow.id, move)
                assert moved.status == allowed == target
                assert moved.revision > flow.revision
                assert (await flows.get(flow.id)) == moved
                continue
            error = (
                AlreadyTerminalError
                if status in {"finished", "failed", "cancelled"}
                else (InvalidTransitionError)
            )
            with pytest.raises(error) as info:
                await apply(flows, flow.id, move)
            assert (info.value.flow_id, info.value.from_status, info.value.to_status) == (
                flow.id,
                status,
                target,
            )
            assert f"{status!s}" in str(info.value)
            assert f"{target!s}" in str(info.value)
            assert "FlowStatus" not in str(info.value), "the message names plain statuses"
            assert await engine.driver.head_rev() == head, "a refused move wrote something"


async def test_each_method_is_one_commit_and_one_event(
    engine: fs.Engine, flows: FlowManager
) -> None:
    flow = await flows.create(controller="tests", owner="ops", state={"n": 0})
    calls: list[Callable[[], Awaitable[ManagedFlow]]] = [
        lambda: flows.start(flow.id),
        lambda: flows.update_state(flow.id, {"n": 1}, next_step="two"),
        lambda: flows.wait(flow.id, {"kind": "approval"}),
        lambda: flows.resume(flow.id, {"n": 2}),
        lambda: flows.request_cancel(flow.id),
        lambda: flows.cancel(flow.id),
    ]
    for call in calls:
        head = await engine.driver.head_rev()
        await call()
        assert await engine.driver.head_rev() == head + 1
    events = await flows.events(flow.id)
    assert [e.kind for e in events] == [
        "created",
        "started",
        "state_updated",
        "waiting",
        "resumed",
        "cancel_requested",
        "cancelled",
    ]
    assert [e.status for e in events] == [
        "created",
        "running",
        "running",
        "waiting",
        "running",
        "running",
        "cancelled",
    ]
    assert events[2].payload == {"patch": {"n": 1}, "next_step": "two"}
    assert events[4].payload == {"by": "user", "patch": {"n": 2}}
    assert events[6].payload == {"how": "cancel", "requested": True}


async def test_the_audit_trail_is_the_history(engine: fs.Engine, flows: FlowManager) -> None:
    flow = await flows.create_mirrored(controller="agent", state={"a": 1})
    await flows.record_step(
        StepObservation(flow_id=flow.id, run_id="r1", task="t", status="running")
    )
    await flows.update_state(flow.id, {"b": 2})
    await flows.wait(flow.id, {"kind": "input"})
    await flows.fail(flow.id, "no input came")
    versions = await history(engine, flow.id)
    events = await flows.events(flow.id)
    assert len(versions) == len(events) == 5
    for version, event in zip(versions, events, strict=True):
        snapshot = await flows.get(flow.id) if version is versions[-1] else None
        assert event.revision == version.rev
        assert event.at == version.committed_at
        assert event.status == version.labels["flow.status"]
        if snapshot is not None:
            assert snapshot.revision == version.rev
            assert snapshot.status == event.status
    assert [e.kind for e in events] == [
        "created",
        "step_observed",
        "state_updated",
        "waiting",
        "failed",
    ]


async def test_mirrored_flows_are_born_running(flows: FlowManager) -> None:
    flow = await flows.create_mirrored(controller="agent", goal="mirror a session")
    assert (flow.status, flow.runtime) == ("running", "mirrored")
    assert [e.kind for e in await flows.events(flow.id)] == ["created"]
    assert (await flows.events(flow.id))[0].payload["status"] == "running"


# -- cancel intent, merges ---------------------------------------------------------------------


async def test_cancel_intent_blocks_finish_and_update(
    engine: fs.Engine, flows: FlowManager
) -> None:
    flow = await flow_in(flows, "running")
    asked = await flows.request_cancel(flow.id)
    assert asked.cancel_requested
    assert asked.status == "running"
    head = await engine.driver.head_rev()
    with pytest.raises(CancelPendingError, match="cancel"):
        await flows.finish(flow.id)
    with pytest.raises(CancelPendingError):
        await flows.update_state(flow.id, {"x": 1})
    assert (await flows.request_cancel(flow.id)) == asked  # asking again changes nothing
    assert await engine.driver.head_rev() == head
    waiting = await flows.wait(flow.id, {"kind": "approval"})
    assert waiting.cancel_requested, "the request is sticky"
    done = await flows.cancel(flow.id)
    assert done.status == "cancelled"
    assert done.wait is None
    with pytest.raises(AlreadyTerminalError):
        await flows.request_cancel(flow.id)
    with pytest.raises(AlreadyTerminalError):
        await flows.update_state(flow.id, {"x": 1})


async def test_merges_are_shallow(flows: FlowManager) -> None:
    flow = await flows.create(
        controller="tests", state={"keep": 1, "nested": {"a": 1, "b": 2}, "n": 0}
    )
    await flows.start(flow.id)
    flow = await flows.update_state(flow.id, {"nested": {"a": 9}, "n": 1})
    assert flow.state == {"keep": 1, "nested": {"a": 9}, "n": 1}
    await flows.wait(flow.id, {"kind": "approval"})
    flow = await flows.resume(flow.id, patch={"approved": True})
    assert flow.state == {"keep": 1, "nested": {"a": 9}, "n": 1, "approved": True}
    assert flow.wait is None
    flow = await flows.finish(flow.id, final={"n": 2, "summary": "done"})
    assert flow.state == {
        "keep": 1,
        "nested": {"a": 9},
        "n": 2,
        "approved": True,
        "summary": "done",
    }
    failed = await flows.fail((await flow_in(flows, "waiting")).id, "timed out")
    assert failed.state["failure"]["reason"] == "timed out"
    at = datetime.datetime.fromisoformat(failed.state["failure"]["at"])
    assert abs((at - failed.updated_at).total_seconds()) < 5
    assert failed.wait is None


async def test_snapshots_are_copies(flows: FlowManager) -> None:
    given = {"items": [1, 2]}
    flow = await flows.create(controller="tests", state=given)
    given["items"].append(3)
    flow.state["items"].append(4)
    assert (await flows.get(flow.id)).state == {"items": [1, 2]}


# -- concurrency --------------------------------------------------------------------------------


async def test_twelve_concurrent_updates_all_land(flows: FlowManager) -> None:
    flow = await flow_in(flows, "running")
    await asyncio.gather(*(flows.update_state(flow.id, {f"k{i}": i}) for i in range(12)))
    final = await flows.get(flow.id)
    assert final.state == {f"k{i}": i for i in range(12)}
    updates = [e for e in await flows.events(flow.id) if e.kind == "state_updated"]
    assert len(updates) == 12


async def test_writers_on_other_engines_retry(engine: fs.Engine) -> None:
    # Managers of one engine wait for each other; those of other engines (as in other
    # processes) share no lock: they meet at the compare-and-set, and retry.
    setup = FlowManager(engine)
    flow = await flow_in(setup, "running")
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(fs.Engine(engine.driver)) for _ in range(4)]
        managers = [FlowManager(other, attempts=30) for other in engines]
        await asyncio.gather(
            *(
                m.update_state(flow.id, {f"m{n}k{i}": i})
                for n, m in enumerate(managers)
                for i in range(3)
            )
        )
    assert len((await setup.get(flow.id)).state) == 12


async def test_persistent_contention_raises_conflict(engine: fs.Engine) -> None:
    flow = await flow_in(FlowManager(engine), "running")
    # Every commit through this driver loses the race, as if a rival always won it.
    losing = FaultyDriver(engine.driver, lambda number, request: Fault.CONFLICT)
    async with fs.Engine(losing) as other:
        slow = FlowManager(other, attempts=3)
        with pytest.raises(fs.ConflictError) as info:
            await slow.update_state(flow.id, {"slow": True})
    assert info.value.ids == [flow.id]
    assert losing.commits == 3, "it read and committed exactly `attempts` times"
    assert (await FlowManager(engine).get(flow.id)).revision == flow.revision


async def test_a_stale_cache_is_read_again(engine: fs.Engine) -> None:
    mine, other = FlowManager(engine, attempts=1), FlowManager(engine)
    flow = await flow_in(mine, "running")
    await other.wait(flow.id, {"kind": "approval"})
    # `mine` last committed "running"; the flow is waiting now, so resume is allowed.
    resumed = await mine.resume(flow.id)
    assert resumed.status == "running"
    with pytest.raises(InvalidTransitionError):
        await mine.resume(flow.id)


async def test_a_stale_cached_step_is_read_again(engine: fs.Engine) -> None:
    mine, other = FlowManager(engine, attempts=1), FlowManager(engine)
    flow = await mine.create_mirrored(controller="agent")

    def seen(status: str) -> StepObservation:
        return StepObservation(flow_id=flow.id, run_id="r", task="t", status=status)

    await mine.record_step(seen("running"))
    with pytest.raises(InvalidTransitionError):
        await mine.start(flow.id)  # refused: `mine` reads the flow again next time
    await other.record_step(seen("running"))
    # `mine` last committed the step at an older version; with one attempt, it still lands.
    done = await mine.record_step(seen("completed"))
    assert done.status == "completed"
    assert [(s.run_id, s.status) for s in await other.steps(flow.id)] == [("r", "completed")]


# -- timer waits ---------------------------------------------------------------------------------


async def test_a_timer_resumes_the_flow_once(engine: fs.Engine, flows: FlowManager) -> None:
    flow = await flow_in(flows, "running")
    waiting = await flows.wait(flow.id, {"kind": "timer", "seconds": 0.1})
    assert waiting.wait is not None
    assert waiting.wait["kind"] == "timer"
    assert datetime.datetime.fromisoformat(waiting.wait["at"]) > waiting.updated_at
    async with fs.Delayer(engine) as delayer:
        async with asyncio.timeout(10), flows.watch(id=flow.id, since_rev=flow.revision) as seen:
            async for snapshot in seen:
                if snapshot.status == "running":
                    break
        assert delayer.stats.fired == 1
    resumed = [e for e in await flows.events(flow.id) if e.kind == "resumed"]
    assert [e.payload for e in resumed] == [{"by": "timer"}]
    assert (await flows.get(flow.id)).wait is None


async def test_a_timer_at_a_time(engine: fs.Engine, flows: FlowManager) -> None:
    flow = await flow_in(flows, "running")
    past = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)).isoformat()
    waiting = await flows.wait(flow.id, {"kind": "timer", "at": past.replace("+00:00", "Z")})
    async with (
        fs.Delayer(engine),
        asyncio.timeout(10),
        flows.watch(id=flow.id, status="running", since_rev=waiting.revision) as seen,
    ):
        resumed = await anext(seen)
    assert resumed.wait is None
    assert resumed.revision > waiting.revision


async def test_a_resume_before_the_timer_wins(engine: fs.Engine, flows: FlowManager) -> None:
    flow = await flow_in(flows, "running")
    await flows.wait(flow.id, {"kind": "timer", "seconds": 0.2})
    await flows.resume(flow.id, {"by_hand": True})
    async with fs.Delayer(engine) as delayer:
        await until(lambda: delayer.stats.dropped == 1)
        assert delayer.stats.fired == 0
    resumed = [e.payload["by"] for e in await flows.events(flow.id) if e.kind == "resumed"]
    assert resumed == ["user"]


async def test_a_cancel_before_the_timer_wins(engine: fs.Engine, flows: FlowManager) -> None:
    flow = await flow_in(flows, "running")
    await flows.wait(flow.id, {"kind": "timer", "seconds": 0.1})
    await flows.cancel(flow.id)
    async with fs.Delayer(engine) as delayer:
        await until(lambda: delayer.stats.dropped == 1)
    assert (await flows.get(flow.id)).status == "cancelled"
    assert "resumed" not in [e.kind for e in await flows.events(flow.id)]


@pytest.mark.parametrize("change", ["update_state", "record_step", "request_cancel"])
async def test_a_timer_outlives_changes_that_keep_the_wait(
    engine: fs.Engine, flows: FlowManager, change: str
) -> None:
    # Changes that keep the status move the flow to a new version; the timer moves with it
    # (the delay bound to the old version can no longer fire), and still fires once.
    flow = await flow_in(flows, "running")
    waiting = await flows.wait(flow.id, {"kind": "timer", "seconds": 0.3})
    if change == "update_state":
        await flows.update_state(flow.id, {"note": "while waiting"})
    elif change == "record_step":
        await flows.record_step(
            StepObservation(flow_id=flow.id, run_id="r1", task="t", status="running")
        )
    else:
        await flows.request_cancel(flow.id)
    kept = await flows.get(flow.id)
    assert (kept.status, kept.wait) == ("waiting", waiting.wait), "the wait is unchanged"
    async with (
        fs.Delayer(engine) as delayer,
        asyncio.timeout(10),
        flows.watch(id=flow.id, status="running", since_rev=kept.revision) as seen,
    ):
        resumed = await anext(seen)
        assert delayer.stats.fired == 1
    assert resumed.wait is None
    events = await flows.events(flow.id)
    assert [e.payload for e in events if e.kind == "resumed"] == [{"by": "timer"}]


async def test_a_step_id_taken_by_another_state_is_refused(
    engine: fs.Engine, flows: FlowManager
) -> None:
    # Step ids ("<flow>/steps/<run>") share the id space with every state: never overwrite one.
    flow = await flows.create_mirrored(controller="agent", id="a")
    squatter = fs.StateCtx.new("a/steps/x", labels={"keep": "1"})
    await engine.do(fs.Commit(fs.End(squatter)))
    head = await engine.driver.head_rev()
    with pytest.raises(fs.InvalidCommandError, match="taken by a state that is not a step"):
        await flows.record_step(
            StepObservation(flow_id=flow.id, run_id="x", task="t", status="running")
        )
    assert await engine.driver.head_rev() == head
    assert (await engine.get_state(squatter.id)).committed == squatter.committed


async def test_steps_of_two_flows_never_share_a_state(
    engine: fs.Engine, flows: FlowManager
) -> None:
    # Flow "a" with run "b/steps/c" and flow "a/steps/b" with run "c" would both be the state
    # "a/steps/b/steps/c": a flow id cannot hold "/steps/", so each step id names one step.
    head = await engine.driver.head_rev()
    for make in (flows.create, flows.create_mirrored):
        with pytest.raises(fs.InvalidCommandError, match="cannot contain '/steps/'"):
            await make(controller="c", id="a/steps/b")
    assert await engine.driver.head_rev() == head
    flow = await flows.create_mirrored(controller="agent", id="a")
    await flows.record_step(
        StepObservation(flow_id=flow.id, run_id="b/steps/c", task="t", status="completed")
    )
    (step,) = await flows.steps(flow.id)
    assert (step.id, step.run_id) == ("a/steps/b/steps/c", "b/steps/c")


async def test_a_timer_racing_a_resume_resumes_once(engine: fs.Engine, flows: FlowManager) -> None:
    async with fs.Delayer(engine):
        for _ in range(5):
            flow = await flow_in(flows, "running")
            waiting = await flows.wait(flow.id, {"kind": "timer", "seconds": 0})
            try:
                await flows.resume(flow.id)
            except InvalidTransitionError as exc:
                assert exc.from_status == "running"  # the timer won  # noqa: PT017
            async with (
                asyncio.timeout(10),
                flows.watch(id=flow.id, status="running", since_rev=waiting.revision) as seen,
            ):
                await anext(seen)
            resumed = [e for e in await flows.events(flow.id) if e.kind == "resumed"]
            assert len(resumed) == 1
            assert (await flows.get(flow.id)).status == "running"


# -- steps ----------------------------------------------------------------------------------------


async def test_record_step_upserts(engine: fs.Engine, flows: FlowManager) -> None:
    flow = await flows.create_mirrored(controller="agent")
    first = await flows.record_step(
        StepObservation(
            flow_id=flow.id,
            run_id="run-1",
            task="classify",
            status="running",
            child_session_key="session-7",
        )
    )
    assert (first.status, first.child_session_key, first.attempt) == ("running", "session-7", 1)
    assert first.started_at is not None
    assert first.ended_at is None
    second = await flows.record_step(
        StepObservation(
            flow_id=flow.id,
            run_id="run-1",
            task="classify",
            status="completed",
            result={"label": "spam"},
        )
    )
    assert second.id == first.id
    assert second.child_session_key == "session-7", "an update without a key keeps the old one"
    assert second.result == {"label": "spam"}
    assert second.created_at == first.created_at == first.updated_at
    assert second.started_at == first.started_at
    assert second.ended_at is not None
    other = await flows.record_step(
        StepObservation(flow_id=flow.id, run_id="run-2", task="reply", status="pending")
    )
    steps = await flows.steps(flow.id)
    assert [(s.run_id, s.status) for s in steps] == [("run-1", "completed"), ("run-2", "pending")]
    assert steps[1] == other
    events = [e for e in await flows.events(flow.id) if e.kind == "step_observed"]
    assert [e.payload for e in events] == [
        {"run_id": "run-1", "task": "classify", "status": "running"},
        {"run_id": "run-1", "task": "classify", "status": "completed"},
        {"run_id": "run-2", "task": "reply", "status": "pending"},
    ]
    # The step and its event are one commit: each step version shares its revision range.
    versions = await history(engine, first.id)
    assert len(versions) == 2
    assert [v.rev for v in versions] == [s.revision for s in (first, second)]
    flow_revs = {e.revision for e in events}
    for version in versions:
        assert (
            version.rev in flow_revs or version.rev - 1 in flow_revs or version.rev + 1 in flow_revs
        )


async def test_steps_are_listed_in_the_order_they_were_first_recorded(
    flows: FlowManager,
) -> None:
    # Recorded within a millisecond or so of each other: the order is not the names'.
    flow = await flows.create_mirrored(controller="agent")
    names = ["z", "a", "m", "b", "y"]
    for name in names:
        await flows.record_step(
            StepObservation(flow_id=flow.id, run_id=name, task="t", status="running")
        )
    for name in ("b", "z"):  # updates do not move a step, however many
        for status in ("completed", "failed"):
            await flows.record_step(
                StepObservation(flow_id=flow.id, run_id=name, task="t", status=status)
            )
    assert [step.run_id for step in await flows.steps(flow.id)] == names


async def test_a_step_of_a_missing_flow_is_refused(engine: fs.Engine, flows: FlowManager) -> None:
    head = await engine.driver.head_rev()
    with pytest.raises(fs.NotFoundError, match="no managed flow 'nobody'"):
        await flows.record_step(
            StepObservation(flow_id="nobody", run_id="r", task="t", status="running")
        )
    assert await engine.driver.head_rev() == head
    with pytest.raises(fs.NotFoundError, match="no managed flow 'nobody'"):
        await flows.steps("nobody")


async def test_steps_of_a_finished_flow_may_still_arrive(flows: FlowManager) -> None:
    flow = await flows.create_mirrored(controller="agent")
    await flows.finish(flow.id)
    step = await flows.record_step(
        StepObservation(flow_id=flow.id, run_id="late", task="t", status="cancelled")
    )
    assert step.status == "cancelled"
    assert (await flows.get(flow.id)).status == "finished"


# -- reads ------------------------------------------------------------------------------------------


async def test_list_answers_with_latest_versions(flows: FlowManager) -> None:
    a = await flows.create(controller="inbox", owner="kate")
    b = await flows.create(controller="inbox", owner="bob")
    c = await flows.create(controller="billing", owner="kate")
    await flows.start(a.id)
    await flows.start(b.id)
    await flows.finish(a.id)
    assert [f.id for f in await flows.list(status="running")] == [b.id]
    assert [f.id for f in await flows.list(status=FlowStatus.FINISHED)] == [a.id]
    assert {f.id for f in await flows.list(owner="kate")} == {a.id, c.id}
    assert [f.id for f in await flows.list(owner="kate", controller="billing")] == [c.id]
    assert [f.id for f in await flows.list(status="created")] == [c.id]
    with pytest.raises(fs.InvalidQueryError):
        await flows.list(status="sleeping")


async def test_steps_and_other_states_are_not_flows(engine: fs.Engine, flows: FlowManager) -> None:
    plain = fs.StateCtx.new("plain")
    await engine.do(fs.Commit(fs.Transit(plain, "somewhere")))
    with pytest.raises(fs.NotFoundError, match="not a managed flow"):
        await flows.get("plain")
    with pytest.raises(fs.NotFoundError):
        await flows.start("plain")
    with pytest.raises(fs.NotFoundError, match="no managed flow 'missing'"):
        await flows.get("missing")
    flow = await flows.create_mirrored(controller="agent")
    step = await flows.record_step(
        StepObservation(flow_id=flow.id, run_id="r", task="t", status="running")
    )
    with pytest.raises(fs.NotFoundError):
        await flows.get(step.id)
    assert [f.id for f in await flows.list()] == [flow.id]


async def test_watch_yields_snapshots_of_flows(flows: FlowManager) -> None:
    async with flows.watch(owner="kate") as watcher:
        flow = await flows.create(controller="inbox", owner="kate")
        await flows.create(controller="inbox", owner="bob")
        await flows.start(flow.id)
        await flows.record_step(
            StepObservation(flow_id=flow.id, run_id="r", task="t", status="running")
        )
        seen = [await anext(watcher) for _ in range(3)]
    assert [(f.id, f.status) for f in seen] == [
        (flow.id, "created"),
        (flow.id, "running"),
        (flow.id, "running"),
    ]


async def test_records_rest_and_are_never_retried(engine: fs.Engine, flows: FlowManager) -> None:
    for status in ["created", "running", "waiting", "finished"]:
        flow = await flow_in(flows, status)
        state = (await engine.get_state(flow.id)).committed
        assert state.status == ("ended" if status == "finished" else "paused")
    timer = await flows.wait((await flow_in(flows, "running")).id, {"kind": "timer", "seconds": 60})
    assert (await engine.get_state(timer.id)).committed.is_delayed


# -- bad input --------------------------------------------------------------------------------------


NOT_JSON: list[Any] = [
    ["a", "list"],
    "text",
    {"x": object()},
    {1: "int key"},
    # JSON has no NaN or infinity; stored, they would come back as null.
    {"x": math.nan},
    {"x": [1.0, {"y": -math.inf}]},
    # The encoder writes these, but they would come back as strings or lists.
    {"x": b"bytes"},
    {"x": [datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)]},
    {"x": {"y": {1, 2}}},
    {"x": {(1, 2): "tuple key"}},
    {"x": {1: "int key", "1": "the same as a string"}},  # JSON would keep one of them
    None,
]


async def test_bad_input_writes_nothing(engine: fs.Engine, flows: FlowManager) -> None:
    flow = await flow_in(flows, "running")
    head = await engine.driver.head_rev()
    for state in NOT_JSON[:-1]:
        with pytest.raises(fs.InvalidCommandError):
            await flows.create(controller="tests", state=state)
        with pytest.raises(fs.InvalidCommandError):
            await flows.update_state(flow.id, state)
    for bad in [{"x": object()}, ["not", "an", "object"]]:
        with pytest.raises(fs.InvalidCommandError):
            await flows.finish(flow.id, final=bad)  # type: ignore[arg-type]
    waits: list[dict[str, Any]] = [
        {},
        {"kind": ""},
        {"kind": "timer"},
        {"kind": "timer", "seconds": -1},
        {"kind": "timer", "seconds": True},
        {"kind": "timer", "seconds": math.inf},
        {"kind": "timer", "at": "tomorrow"},
        {"kind": "timer", "at": "2030-01-01T00:00:00"},
        {"kind": "timer", "at": "2030-01-01T00:00:00Z", "seconds": 3},
        # Times whose UTC equivalent lies outside the dates a datetime can hold.
        {"kind": "timer", "at": "9999-12-31T23:00:00-05:00"},
        {"kind": "timer", "at": "0001-01-01T00:30:00+05:00"},
    ]
    for wait in waits:
        with pytest.raises(fs.InvalidCommandError):
            await flows.wait(flow.id, wait)
    bad_args: list[dict[str, Any]] = [
        {"controller": ""},
        {"controller": 7},
        {"controller": "c", "owner": None},
    ]
    # Text no store can keep (a lone surrogate) in any string argument.
    bad_args += [{"controller": "c", name: "bad \ud800"} for name in ("goal", "origin", "owner")]
    bad_args.append({"controller": "c", "current_step": "\udc80"})
    for kwargs in bad_args:
        with pytest.raises(fs.InvalidCommandError):
            await flows.create(**kwargs)
    with pytest.raises(fs.InvalidCommandError):
        await flows.update_state(flow.id, {}, next_step="\ud800")
    with pytest.raises(fs.InvalidCommandError):
        await flows.fail(flow.id, "reason \ud800")
    for field in ("task", "error", "child_session_key"):
        observation = {"flow_id": flow.id, "run_id": "r", "task": "t", "status": "running"}
        with pytest.raises(fs.InvalidCommandError):
            await flows.record_step(StepObservation(**{**observation, field: "\udcff"}))
    for flow_id in ["", "flowstate.reserved"]:
        with pytest.raises(fs.InvalidCommandError):
            await flows.create(controller="c", id=flow_id)
    with pytest.raises(fs.InvalidCommandError):
        await flows.record_step(
            StepObservation(flow_id=flow.id, run_id="r", task="t", status="sleeping")
        )
    with pytest.raises(fs.InvalidCommandError):
        await flows.record_step(
            StepObservation(
                flow_id=flow.id, run_id="r", task="t", status="running", result=object()
            )
        )
    with pytest.raises(fs.InvalidCommandError):
        await flows.fail(flow.id, None)  # type: ignore[arg-type]
    with pytest.raises(fs.NotFoundError):
        await flows.start("no-such-flow")
    with pytest.raises(fs.ConflictError):
        await flows.create(controller="tests", id=flow.id)
    assert await engine.driver.head_rev() == head
    with pytest.raises(fs.InvalidCommandError):
        FlowManager(engine, attempts=0)
