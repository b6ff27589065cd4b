"""Pipelines on every driver: retries and backoff, timeouts, branching, outputs, cancel,
recovery and duplicate executors, and JSON definitions."""

from __future__ import annotations

import asyncio
import collections
import datetime
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import flowstate as fs
import flowstate.workflows._manager as manager_module
import flowstate.workflows._runs as runs_module
from flowstate.drivers.base import Driver
from flowstate.workflows import (
    DefinitionError,
    FlowManager,
    ManagedFlow,
    Pipeline,
    Step,
    StepContext,
    StepObservation,
)
from tests.workflows.steps import Forever

pytestmark = pytest.mark.anyio

Calls = collections.Counter[tuple[str, int]]


def recorder(calls: Calls, result: Any = None) -> Callable[[StepContext], Any]:
    async def fn(step: StepContext) -> Any:
        calls[(step.step_id, step.attempt)] += 1
        return {"step": step.step_id} if result is None else result

    return fn


async def kinds(flows: FlowManager, run: ManagedFlow) -> list[tuple[str, Any]]:
    return [
        (e.kind, e.payload.get("step")) for e in await flows.events(run.id) if e.kind != "created"
    ]


async def test_outputs_reach_later_steps(flows: FlowManager) -> None:
    seen: list[dict[str, Any]] = []

    async def first(step: StepContext) -> Any:
        return {"n": step.input["n"] + 1}

    async def second(step: StepContext) -> Any:
        seen.append(dict(step.outputs))
        return step.outputs["first"]["n"] * 10

    flows.register(Pipeline("math").add_step(Step("first", first)).add_step(Step("second", second)))
    run = await flows.execute("math", input={"n": 1}, owner="tests")
    assert (run.status, run.runtime, run.pipeline, run.owner) == (
        "running",
        "pipeline",
        "math",
        "tests",
    )
    done = await flows.result(run.id, timeout=20)
    assert done.status == "finished"
    assert done.state == {"input": {"n": 1}, "outputs": {"first": {"n": 2}, "second": 20}}
    assert seen == [{"first": {"n": 2}}]
    assert await kinds(flows, run) == [
        ("step_started", "first"),
        ("step_completed", "first"),
        ("step_started", "second"),
        ("step_completed", "second"),
        ("finished", None),
    ]
    steps = await flows.steps(run.id)
    assert [(s.task, s.attempt, s.status, s.result) for s in steps] == [
        ("first", 1, "completed", {"n": 2}),
        ("second", 1, "completed", 20),
    ]
    assert all(s.started_at is not None and s.ended_at is not None for s in steps)


async def test_errors_are_retried_with_backoff(flows: FlowManager) -> None:
    calls: Calls = collections.Counter()

    async def flaky(step: StepContext) -> Any:
        calls[(step.step_id, step.attempt)] += 1
        if step.attempt < 3:
            raise ConnectionError(f"try {step.attempt}")
        return "ok"

    pipeline = Pipeline("retry").add_step(Step("flaky", flaky, retries=2, backoff=0.05))
    flows.register(pipeline)
    done = await flows.result((await flows.execute("retry")).id, timeout=20)
    assert done.status == "finished"
    assert calls == {("flaky", 1): 1, ("flaky", 2): 1, ("flaky", 3): 1}
    events = [e for e in await flows.events(done.id) if e.kind.startswith("step_")]
    failures = [e for e in events if e.kind == "step_failed"]
    assert [e.payload["error"] for e in failures] == [
        "ConnectionError: try 1",
        "ConnectionError: try 2",
    ]
    assert [e.payload["retry_in"] for e in failures] == [0.05, 0.1]
    for failure in failures:
        restart = next(
            e for e in events if e.kind == "step_started" and e.revision > failure.revision
        )
        due = datetime.datetime.fromisoformat(failure.payload["retry_at"])
        # Commit times are whole milliseconds: the restart is committed in due's millisecond
        # or later.
        assert restart.at >= due.replace(microsecond=due.microsecond // 1000 * 1000)
    steps = await flows.steps(done.id)
    assert [(s.attempt, s.status, s.error) for s in steps] == [
        (1, "failed", "ConnectionError: try 1"),
        (2, "failed", "ConnectionError: try 2"),
        (3, "completed", None),
    ]


async def test_backoff_doubles_up_to_its_cap() -> None:
    step = Step("s", recorder(collections.Counter()), backoff=0.5, max_backoff=3)
    assert [step.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    # Far past where 2 ** attempt leaves the floats: still the cap.
    assert [step.delay(n) for n in (1025, 5000, 10**30)] == [3.0, 3.0, 3.0]
    assert Step("z", recorder(collections.Counter()), backoff=0).delay(10**6) == 0.0


async def test_an_error_message_that_is_not_valid_text_fails_the_attempt(
    flows: FlowManager,
) -> None:
    # Messages built from bytes decoded with surrogateescape hold lone surrogates, which no
    # store keeps: the attempt fails with the message escaped, and the run goes on.
    async def undecodable(step: StepContext) -> Any:
        raise RuntimeError(b"bad \xff byte".decode("utf-8", "surrogateescape"))

    flows.register(Pipeline("escaped").add_step(Step("s", undecodable, retries=1, backoff=0)))
    run = await flows.execute("escaped")
    done = await flows.result(run.id, timeout=20)
    assert done.status == "failed"
    steps = await flows.steps(run.id)
    assert [(s.attempt, s.status, s.error) for s in steps] == [
        (n, "failed", "RuntimeError: bad \\udcff byte") for n in (1, 2)
    ]


async def test_exhausted_retries_fail_the_run_naming_step_and_error(flows: FlowManager) -> None:
    async def broken(step: StepContext) -> Any:
        raise ValueError("bad card")

    calls: Calls = collections.Counter()
    flows.register(
        Pipeline("card")
        .add_step(Step("charge", broken, retries=1, backoff=0.01))
        .add_step(Step("ship", recorder(calls)))
    )
    done = await flows.result((await flows.execute("card")).id, timeout=20)
    assert done.status == "failed"
    reason = done.state["failure"]["reason"]
    assert "'charge'" in reason
    assert "ValueError: bad card" in reason
    assert "2 attempts" in reason
    assert not calls, "no step runs after an unhandled failure"


async def test_a_timeout_is_an_error(flows: FlowManager) -> None:
    cancelled = asyncio.Event()

    async def slow(step: StepContext) -> Any:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    flows.register(Pipeline("slow").add_step(Step("wait", slow, timeout=0.1)))
    done = await flows.result((await flows.execute("slow")).id, timeout=20)
    assert done.status == "failed"
    assert "timed out after 0.1s" in done.state["failure"]["reason"]
    assert cancelled.is_set(), "the timed-out attempt was cancelled"


@pytest.mark.parametrize("limit", [None, 30])
async def test_a_timeout_error_of_the_step_itself_is_its_own_error(
    flows: FlowManager, limit: float | None
) -> None:
    async def upstream(step: StepContext) -> Any:
        raise TimeoutError("upstream read timed out")

    flows.register(Pipeline("own").add_step(Step("read", upstream, timeout=limit)))
    done = await flows.result((await flows.execute("own")).id, timeout=20)
    assert done.status == "failed"
    assert done.state["failure"]["reason"] == (
        "step 'read' failed after 1 attempts: TimeoutError: upstream read timed out"
    )


async def test_a_failure_outcome_branches_without_retry(flows: FlowManager) -> None:
    calls: Calls = collections.Counter()
    flows.register(
        Pipeline("stock")
        .add_step(
            Step(
                "reserve",
                recorder(calls, {"status": "failure", "why": "none left"}),
                retries=3,
                on_failure="notify",
            )
        )
        .add_step(Step("ship", recorder(calls)))
        .add_step(Step("notify", recorder(calls), on_success="end"))
    )
    done = await flows.result((await flows.execute("stock")).id, timeout=20)
    assert done.status == "finished"
    assert calls == {("reserve", 1): 1, ("notify", 1): 1}
    assert done.state["outputs"]["reserve"] == {"status": "failure", "why": "none left"}
    assert await kinds(flows, done) == [
        ("step_started", "reserve"),
        ("step_failed", "reserve"),
        ("step_started", "notify"),
        ("step_completed", "notify"),
        ("finished", None),
    ]


async def test_branches_jump_and_end(flows: FlowManager) -> None:
    calls: Calls = collections.Counter()
    flows.register(
        Pipeline("jump")
        .add_step(Step("a", recorder(calls), on_success="c"))
        .add_step(Step("b", recorder(calls)))
        .add_step(Step("c", recorder(calls), on_success="end"))
        .add_step(Step("d", recorder(calls)))
    )
    done = await flows.result((await flows.execute("jump")).id, timeout=20)
    assert done.status == "finished"
    assert set(calls) == {("a", 1), ("c", 1)}
    failing = Pipeline("fail-to-end").add_step(
        Step("x", recorder(calls, {"status": "failure"}), on_failure="end")
    )
    flows.register(failing)
    assert (await flows.result((await flows.execute("fail-to-end")).id, timeout=20)).status == (
        "finished"
    )
    unhandled = Pipeline("unhandled").add_step(Step("x", recorder(calls, {"status": "failure"})))
    flows.register(unhandled)
    done = await flows.result((await flows.execute("unhandled")).id, timeout=20)
    assert done.status == "failed"
    assert "'x' returned a failure" in done.state["failure"]["reason"]


def looping(poll: Callable[[StepContext], Any]) -> Pipeline:
    """``poll`` until it succeeds, through ``pause`` after each failure outcome."""
    return (
        Pipeline("loop")
        .add_step(Step("poll", poll, on_success="end", on_failure="pause"))
        .add_step(Step("pause", recorder(collections.Counter()), on_success="poll"))
    )


async def test_a_loop_records_every_visit_of_a_step(flows: FlowManager) -> None:
    visits = 0

    async def poll(step: StepContext) -> Any:
        nonlocal visits
        visits += 1
        return {"status": "ok" if visits == 3 else "failure", "visit": visits}

    flows.register(looping(poll))
    done = await flows.result((await flows.execute("loop")).id, timeout=20)
    assert done.status == "finished"
    assert done.state["outputs"]["poll"] == {"status": "ok", "visit": 3}
    steps = [(s.run_id, s.task, s.attempt, s.status) for s in await flows.steps(done.id)]
    assert steps == [
        ("poll#1", "poll", 1, "failed"),
        ("pause#1", "pause", 1, "completed"),
        ("poll@2#1", "poll", 1, "failed"),
        ("pause@2#1", "pause", 1, "completed"),
        ("poll@3#1", "poll", 1, "completed"),
    ]
    assert [s.id for s in await flows.steps(done.id)][-1] == f"{done.id}/steps/poll@3#1"


async def test_an_attempt_taken_over_never_ends_a_later_visit_of_its_step(
    engine: fs.Engine,
) -> None:
    # A slow attempt outlives its takeover: another engine counts it as lost, runs the step
    # again, loops back to it, and is in the same step and attempt number when the slow
    # attempt ends. That end belongs to nobody any more and must not be committed.
    slow_started, slow_go, again_started, again_go = (asyncio.Event() for _ in range(4))

    async def slow_poll(step: StepContext) -> Any:
        slow_started.set()
        await slow_go.wait()
        return {"status": "ok", "by": "the attempt taken over"}

    tries = 0

    async def poll(step: StepContext) -> Any:
        nonlocal tries
        tries += 1
        if tries == 1:
            return {"status": "failure"}
        again_started.set()
        await again_go.wait()
        return {"status": "ok", "by": "the second visit"}

    first = FlowManager(engine)
    first.register(looping(slow_poll))
    run = await first.execute("loop", enqueue=True)
    executor = engine.flows[looping(slow_poll).flow_id]
    slow = asyncio.ensure_future(executor(await engine.get_state(run.id), engine))
    await slow_started.wait()
    async with fs.Engine(engine.driver) as other:
        second = FlowManager(other)
        second.register(looping(poll))
        async with fs.Recoverer(other, retry_after=0.1, lease_ttl=1, tick=0.02):
            await asyncio.wait_for(again_started.wait(), 20)
            slow_go.set()
            await slow  # its end is discarded: the run is at another claim now
            assert (await second.get(run.id)).status == "running"
            again_go.set()
            done = await second.result(run.id, timeout=20)
    assert done.status == "finished"
    assert done.state["outputs"]["poll"] == {"status": "ok", "by": "the second visit"}
    steps = [(s.run_id, s.status) for s in await first.steps(run.id)]
    assert steps == [
        ("poll#1", "failed"),  # taken over: stopped without an outcome
        ("poll#2", "failed"),
        ("pause#1", "completed"),
        ("poll@2#1", "completed"),
    ]


async def test_an_output_that_is_not_json_fails_the_attempt(flows: FlowManager) -> None:
    async def odd(step: StepContext) -> Any:
        return [object(), {"ratio": math.nan}, {"raw": b"bytes"}, ["fine"]][step.attempt - 1]

    flows.register(Pipeline("odd").add_step(Step("odd", odd, retries=3, backoff=0.01)))
    done = await flows.result((await flows.execute("odd")).id, timeout=20)
    assert done.status == "finished"
    first, second, third, fourth = await flows.steps(done.id)
    assert (first.status, second.status, third.status) == ("failed", "failed", "failed")
    assert first.error is not None
    assert "not JSON-encodable" in first.error
    assert second.error is not None
    assert "NaN or infinity" in second.error
    assert third.error is not None
    assert "holds a bytes (b'bytes')" in third.error
    assert (fourth.status, fourth.result) == ("completed", ["fine"])


async def test_a_run_that_never_waits_can_be_cancelled(flows: FlowManager) -> None:
    """Steps that never suspend, looping for ever: a cancel or a cancel request from this
    process gets in between two of them, and wins the race for the run's revision."""
    looped = asyncio.Event()

    async def spin(step: StepContext) -> None:
        if step.step_id == "b":
            looped.set()

    flows.register(
        Pipeline("spin")
        .add_step(Step("a", spin, on_success="b"))
        .add_step(Step("b", spin, on_success="a"))
    )
    for stop in (flows.cancel, flows.request_cancel):
        looped.clear()
        run = await flows.execute("spin")
        await asyncio.wait_for(looped.wait(), 20)
        await stop(run.id)
        done = await flows.result(run.id, timeout=20)
        assert done.status == "cancelled"
        assert done.cancel_requested is (stop == flows.request_cancel)


async def test_request_cancel_stops_before_the_next_step(flows: FlowManager) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls: Calls = collections.Counter()

    async def first(step: StepContext) -> Any:
        started.set()
        await release.wait()
        return "first done"

    flows.register(
        Pipeline("stoppable")
        .add_step(Step("first", first))
        .add_step(Step("second", recorder(calls)))
    )
    run = await flows.execute("stoppable")
    await started.wait()
    asked = await flows.request_cancel(run.id)
    assert (asked.status, asked.cancel_requested) == ("running", True)
    release.set()
    done = await flows.result(run.id, timeout=20)
    assert done.status == "cancelled"
    assert not calls, "the next step never started"
    assert done.state["outputs"] == {"first": "first done"}, "the running step completed"
    events = await flows.events(run.id)
    assert [e.kind for e in events][-3:] == ["cancel_requested", "step_completed", "cancelled"]
    assert events[-1].payload["how"] == "requested"


async def test_a_step_that_raises_cancelled_error_itself_fails_its_attempt(
    flows: FlowManager,
) -> None:
    # Nothing cancelled the attempt: the step's own CancelledError is an error like any.
    async def gives_up(step: StepContext) -> Any:
        raise asyncio.CancelledError

    flows.register(Pipeline("gives-up").add_step(Step("s", gives_up, retries=1, backoff=0)))
    run = await flows.execute("gives-up")
    done = await flows.result(run.id, timeout=20)
    assert done.status == "failed"
    assert [(s.attempt, s.status, s.error) for s in await flows.steps(run.id)] == [
        (n, "failed", "CancelledError raised by the step") for n in (1, 2)
    ]


@pytest.mark.parametrize("last", ["end", "error"])
async def test_request_cancel_during_the_last_attempt_cancels(
    flows: FlowManager, last: str
) -> None:
    # Neither a finish (finish() refuses while a cancel is pending) nor a retry follows.
    started, release = asyncio.Event(), asyncio.Event()
    calls: Calls = collections.Counter()

    async def only(step: StepContext) -> Any:
        calls[(step.step_id, step.attempt)] += 1
        started.set()
        await release.wait()
        if last == "error":
            raise RuntimeError("down")
        return "done"

    flows.register(Pipeline(f"last-{last}").add_step(Step("only", only, retries=3, backoff=30)))
    run = await flows.execute(f"last-{last}")
    await started.wait()
    await flows.request_cancel(run.id)
    release.set()
    done = await flows.result(run.id, timeout=10)
    assert done.status == "cancelled"
    assert calls == {("only", 1): 1}, "no retry"
    kinds = [e.kind for e in await flows.events(run.id)]
    ended = "step_completed" if last == "end" else "step_failed"
    assert kinds[-3:] == ["cancel_requested", ended, "cancelled"]


async def test_a_step_that_outlasts_retry_after_is_not_run_again_beside_itself(
    flows: FlowManager,
) -> None:
    # The recoverer retries a run whose version has not moved for retry_after; in the
    # process whose attempt is still running, that retry does not start the step again.
    running = 0
    most = 0
    recovered = asyncio.Event()

    async def slow(step: StepContext) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await recovered.wait()
        finally:
            running -= 1
        return "done"

    flows.register(Pipeline("slow").add_step(Step("slow", slow, retries=3)))
    engine = flows.engine
    async with fs.Recoverer(engine, retry_after=0.1, lease_ttl=1, tick=0.02) as recoverer:
        run = await flows.execute("slow")
        async with asyncio.timeout(20), engine.watch(id=run.id) as versions:
            async for version in versions:
                if fs.recovery.attempt(version) >= 2:
                    break  # retried twice while its step runs
        recovered.set()
        done = await flows.result(run.id, timeout=20)
        assert recoverer.stats.retried >= 2
    assert done.status == "finished"
    assert most == 1
    assert [(s.attempt, s.status) for s in await flows.steps(run.id)] == [(1, "completed")]


async def test_request_cancel_ends_a_backoff_wait(flows: FlowManager) -> None:
    failed = asyncio.Event()

    async def flaky(step: StepContext) -> Any:
        failed.set()
        raise RuntimeError("down")

    flows.register(Pipeline("waits").add_step(Step("s", flaky, retries=5, backoff=30)))
    run = await flows.execute("waits")
    await failed.wait()
    async with flows.watch(id=run.id) as versions:
        async for _ in versions:
            if "step_failed" in [e.kind for e in await flows.events(run.id)]:
                break  # the run waits 30 s before its next attempt
    await flows.request_cancel(run.id)
    done = await flows.result(run.id, timeout=10)
    assert done.status == "cancelled"
    assert [s.attempt for s in await flows.steps(run.id)] == [1]


async def test_request_cancel_through_another_engine_ends_a_backoff_wait(
    engine: fs.Engine, flows: FlowManager
) -> None:
    # As from another process: no attempt runs while the run waits to retry, so the request
    # cancels it at once, wherever the wait sleeps.
    attempts = 0

    async def flaky(step: StepContext) -> Any:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("down")

    flows.register(Pipeline("waits").add_step(Step("s", flaky, retries=5, backoff=30)))
    run = await flows.execute("waits")
    async with asyncio.timeout(20), flows.watch(id=run.id) as versions:
        async for _ in versions:
            if "step_failed" in [e.kind for e in await flows.events(run.id)]:
                break  # the run waits 30 s before its next attempt
    async with fs.Engine(engine.driver) as other:
        asked = await FlowManager(other).request_cancel(run.id)
    assert asked.status == "cancelled"
    assert [(e.kind, e.payload) for e in (await flows.events(run.id))[-2:]] == [
        ("cancel_requested", {}),
        ("cancelled", {"how": "requested", "requested": True}),
    ]
    assert attempts == 1
    assert [(s.attempt, s.status) for s in await flows.steps(run.id)] == [(1, "failed")]


async def test_cancel_cancels_the_running_step(flows: FlowManager) -> None:
    forever = Forever()
    flows.register(Pipeline("forever").add_step(Step("wait", forever)))
    run = await flows.execute("forever")
    await forever.started.wait()
    done = await flows.cancel(run.id)
    assert done.status == "cancelled"
    await asyncio.wait_for(forever.stopped.wait(), 10)
    (step,) = await flows.steps(run.id)
    assert step.status == "cancelled"
    events = await flows.events(run.id)
    assert events[-1].kind == "cancelled"
    assert events[-1].payload == {"how": "cancel", "requested": False, "step": "wait"}


async def test_a_cancel_through_another_engine_cancels_the_running_step(
    engine: fs.Engine, flows: FlowManager
) -> None:
    # As a cancel from another process would: the engine running the step learns of it
    # through the store, not through the manager that cancelled.
    forever = Forever()
    flows.register(Pipeline("elsewhere").add_step(Step("wait", forever)))
    run = await flows.execute("elsewhere")
    await forever.started.wait()
    async with fs.Engine(engine.driver) as other:
        done = await FlowManager(other).cancel(run.id)
    assert done.status == "cancelled"
    await asyncio.wait_for(forever.stopped.wait(), 10)
    (step,) = await flows.steps(run.id)
    assert step.status == "cancelled"


async def test_a_run_no_process_can_run_fails_once_its_recovery_is_spent(
    engine: fs.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its pipeline registered nowhere the recoverer runs: the recoverer retries the run,
    # then hands it to the flow that fails it, so that its status does not stay "running".
    monkeypatch.setattr(manager_module, "RUN_RECOVERY_ATTEMPTS", 2)
    elsewhere = FlowManager(engine)
    pipeline = Pipeline("unknown").add_step(Step("s", recorder(collections.Counter())))
    elsewhere.register(pipeline)
    run = await elsewhere.execute("unknown", enqueue=True)
    engine.flows.unregister(pipeline.flow_id)
    async with fs.Recoverer(engine, retry_after=0.05, lease_ttl=1, tick=0.02):
        done = await elsewhere.result(run.id, timeout=20)
    assert done.status == "failed"
    (event,) = [e for e in await elsewhere.events(run.id) if e.kind == "failed"]
    assert event.payload["reason"] == (
        f"no process could run it: still running {pipeline.flow_id!r} after 2 retries"
    )
    assert event.payload["step"] == "s"
    assert [f.id for f in await elsewhere.list(status="running")] == []


async def crash_mid_charge(
    new_driver: Callable[[], Driver], calls: Calls, *, errors: int = 0
) -> tuple[ManagedFlow, Callable[[], Pipeline]]:
    """Start a run of reserve -> charge -> ship (no retries) whose first charge attempt is
    cut by its engine closing, as a crash would leave it; ``errors`` attempts after that one
    raise, the next one succeeds."""
    started = asyncio.Event()

    async def charge(step: StepContext) -> Any:
        calls[("charge", step.attempt)] += 1
        if step.attempt == 1:
            started.set()
            await asyncio.sleep(60)  # the process dies in here
        if step.attempt <= 1 + errors:
            raise RuntimeError("declined")
        return "charged"

    def pipeline() -> Pipeline:
        return (
            Pipeline("crash")
            .add_step(Step("reserve", recorder(calls)))
            .add_step(Step("charge", charge, retries=errors, backoff=0))
            .add_step(Step("ship", recorder(calls)))
        )

    async with fs.Engine(new_driver()) as engine:
        flows = FlowManager(engine)
        flows.register(pipeline())
        run = await flows.execute("crash")
        await started.wait()
    return run, pipeline


@pytest.mark.parametrize("errors", [0, 1])
async def test_a_crashed_run_is_retried_from_its_step(
    new_driver: Callable[[], Driver], errors: int
) -> None:
    # The lost attempt does not use up the step's retries: with none, the step runs again;
    # with one, an error after the crash still gets its retry.
    calls: Calls = collections.Counter()
    run, pipeline = await crash_mid_charge(new_driver, calls, errors=errors)
    async with fs.Engine(new_driver()) as engine:
        flows = FlowManager(engine)
        flows.register(pipeline())
        async with fs.Recoverer(engine, retry_after=0.2, tick=0.05):
            done = await flows.result(run.id, timeout=20)
    assert done.status == "finished"
    charges = {("charge", n): 1 for n in range(1, errors + 3)}
    assert calls == {("reserve", 1): 1, **charges, ("ship", 1): 1}
    steps = [(s.task, s.attempt, s.status) for s in await flows_steps(new_driver, run)]
    assert steps == [
        ("reserve", 1, "completed"),
        *[("charge", n, "failed") for n in range(1, errors + 2)],
        ("charge", errors + 2, "completed"),
        ("ship", 1, "completed"),
    ]


async def test_a_step_whose_process_keeps_stopping_fails(
    new_driver: Callable[[], Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs_module, "LOST_ATTEMPTS", 1)
    calls: Calls = collections.Counter()
    run, pipeline = await crash_mid_charge(new_driver, calls)
    async with fs.Engine(new_driver()) as engine:
        flows = FlowManager(engine)
        flows.register(pipeline())
        async with fs.Recoverer(engine, retry_after=0.2, tick=0.05):
            done = await flows.result(run.id, timeout=20)
        events = await flows.events(run.id)
    assert done.status == "failed"
    assert calls == {("reserve", 1): 1, ("charge", 1): 1}
    assert events[-1].kind == "failed"
    assert events[-1].payload["reason"] == (
        "step 'charge' failed: its process stopped during 1 of its 1 attempts"
    )


async def flows_steps(new_driver: Callable[[], Driver], run: ManagedFlow) -> list[Any]:
    async with fs.Engine(new_driver()) as engine:
        return await FlowManager(engine).steps(run.id)


async def test_duplicate_executors_run_each_step_once(engine: fs.Engine) -> None:
    calls: Calls = collections.Counter()

    async def slow(step: StepContext) -> Any:
        calls[(step.step_id, step.attempt)] += 1
        await asyncio.sleep(0.01)
        return step.step_id

    pipeline = Pipeline("dup")
    for name in "abcde":
        pipeline.add_step(Step(name, slow))
    flows = FlowManager(engine)
    flows.register(pipeline)
    runs = [await flows.execute("dup", enqueue=True) for _ in range(5)]
    executor = engine.flows[pipeline.flow_id]
    # Three executors race for every run, as workers and the recoverer may.
    ctxs = [await engine.get_state(run.id) for run in runs for _ in range(3)]
    await asyncio.gather(*(executor(ctx, engine) for ctx in ctxs))
    for run in runs:
        assert (await flows.get(run.id)).status == "finished"
    assert calls == {(name, 1): 5 for name in "abcde"}


async def test_bad_requests(engine: fs.Engine, flows: FlowManager) -> None:
    flows.register(Pipeline("p").add_step(Step("s", recorder(collections.Counter()))))
    head = await engine.driver.head_rev()
    with pytest.raises(
        fs.FlowNotFoundError,
        match=r"no pipeline registered under 'nope'; register it with FlowManager\.register",
    ):
        await flows.execute("nope")
    for bad in (None, "", 7):
        with pytest.raises(fs.InvalidCommandError, match="a pipeline id must be a non-empty"):
            await flows.execute(bad)  # type: ignore[arg-type]
    with pytest.raises(fs.InvalidCommandError):
        await flows.execute("p", input={"x": object()})
    assert await engine.driver.head_rev() == head
    run = await flows.execute("p", enqueue=True)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: flows.start(run.id),
        lambda: flows.finish(run.id),
        lambda: flows.fail(run.id, "no"),
        lambda: flows.update_state(run.id, {"x": 1}),
        lambda: flows.wait(run.id, {"kind": "approval"}),
        lambda: flows.record_step(
            StepObservation(flow_id=run.id, run_id="r", task="t", status="running")
        ),
    ]
    for call in calls:
        with pytest.raises(fs.InvalidCommandError, match="pipeline"):
            await call()
    with pytest.raises(TimeoutError):
        await flows.result(run.id, timeout=0.05)
    with pytest.raises(fs.InvalidCommandError):
        flows.register("not a pipeline")  # type: ignore[arg-type]
    with pytest.raises(fs.InvalidCommandError, match="takes a run's stored version"):
        await flows.adopt(run, {})  # type: ignore[arg-type] # a snapshot, not its State


# -- definitions -------------------------------------------------------------------------------


DATA_FLOW = {
    "flow": {
        "id": "flow123",
        "name": "Data processing flow",
        "start_task": "task1",
        "tasks": [
            {"name": "task1", "description": "Fetch data"},
            {"name": "task2", "description": "Process data", "retries": 1, "timeout": 5},
            {"name": "task3", "description": "Store data"},
        ],
        "conditions": [
            {
                "name": "condition_task1_result",
                "description": "Evaluate the result of task1.",
                "source_task": "task1",
                "outcome": "success",
                "target_task_success": "task2",
                "target_task_failure": "end",
            },
            {
                "name": "condition_task2_result",
                "description": "Evaluate the result of task2.",
                "source_task": "task2",
                "outcome": "success",
                "target_task_success": "task3",
                "target_task_failure": "end",
            },
        ],
    }
}


async def test_a_json_definition_runs(flows: FlowManager) -> None:
    calls: Calls = collections.Counter()
    tasks = {
        "task1": recorder(calls, {"status": "success", "rows": 3}),
        "task2": recorder(calls, {"status": "success"}),
        "task3": recorder(calls, {"status": "success"}),
    }
    pipeline = Pipeline.from_definition(DATA_FLOW, tasks=tasks)
    assert (pipeline.id, pipeline.name, pipeline.start) == (
        "flow123",
        "Data processing flow",
        "task1",
    )
    step = pipeline.step("task2")
    assert (step.retries, step.timeout, step.on_success, step.on_failure) == (
        1,
        5,
        "task3",
        "end",
    )
    assert pipeline.step("task3").on_success == "end"
    assert pipeline.step("task3").on_failure is None
    flows.register(pipeline)
    done = await flows.result((await flows.execute("flow123")).id, timeout=20)
    assert done.status == "finished"
    assert set(calls) == {("task1", 1), ("task2", 1), ("task3", 1)}
    failing = {**tasks, "task1": recorder(calls, {"status": "failure"})}
    flows.register(Pipeline.from_definition(DATA_FLOW, tasks=failing))
    done = await flows.result((await flows.execute("flow123")).id, timeout=20)
    assert done.status == "finished", "task1's failure branch is 'end'"
    assert [s.task for s in await flows.steps(done.id)] == ["task1"]


async def test_a_run_posted_as_json_is_adopted_by_another_engine(engine: fs.Engine) -> None:
    calls: Calls = collections.Counter()
    tasks = {name: recorder(calls, {"status": "success"}) for name in ("task1", "task2", "task3")}
    submitter = FlowManager(engine)
    submitter.register(Pipeline.from_definition(DATA_FLOW, tasks=tasks))
    run = await submitter.execute("flow123", enqueue=True)
    python = Pipeline("built").add_step(Step("only", recorder(calls)))
    submitter.register(python)
    other_run = await submitter.execute("built", enqueue=True)
    async with fs.Engine(engine.driver) as bare:
        other = FlowManager(bare)
        state = (await bare.get_state(run.id)).committed
        with pytest.raises(fs.DefinitionError, match="task3"):
            await other.adopt(state, {"task1": tasks["task1"], "task2": tasks["task2"]})
        with pytest.raises(fs.FlowNotFoundError):
            other.pipeline("flow123")
        adopted = await other.adopt(state, tasks)
        assert adopted is other.pipeline("flow123")
        assert await other.adopt(state, {}) is adopted, "registered already: nothing to read"
        with pytest.raises(fs.NotFoundError, match="definition"):
            await other.adopt((await bare.get_state(other_run.id)).committed, tasks)
        plain = await other.create(controller="c", goal="g")
        plain_state = (await bare.get_state(plain.id)).committed
        with pytest.raises(fs.NotFoundError, match="not a pipeline run"):
            await other.adopt(plain_state, tasks)
        await bare.do(fs.Execute(fs.StateCtx.of(state)))
        done = await other.result(run.id, timeout=20)
    assert done.status == "finished"
    assert set(calls) == {("task1", 1), ("task2", 1), ("task3", 1)}


def two_definitions(then: str) -> dict[str, Any]:
    """A definition of pipeline "px": "first", then ``then``."""
    return {
        "flow": {
            "id": "px",
            "start_task": "first",
            "tasks": [{"name": "first"}, {"name": then}],
            "conditions": [
                {"source_task": "first", "target_task_success": then, "target_task_failure": "end"}
            ],
        }
    }


async def test_runs_keep_their_definition_when_another_is_posted_under_its_id(
    flows: FlowManager,
) -> None:
    calls: Calls = collections.Counter()
    gate = asyncio.Event()

    async def first(step: StepContext) -> Any:
        calls[("first", step.attempt)] += 1
        await gate.wait()
        return {"status": "success"}

    tasks = {"first": first, "b": recorder(calls), "c": recorder(calls)}
    one = Pipeline.from_definition(two_definitions("b"), tasks=tasks)
    other = Pipeline.from_definition(two_definitions("c"), tasks=tasks)
    assert one.flow_id != other.flow_id
    assert one.flow_id.startswith("flowstate.pipeline.px@")
    assert Pipeline.from_definition(two_definitions("b"), tasks=tasks).flow_id == one.flow_id
    flows.register(one)
    earlier = await flows.execute("px")
    flows.register(other)
    assert flows.pipeline("px") is other
    later = await flows.execute("px")
    gate.set()
    for run, then in ((earlier, "b"), (later, "c")):
        done = await flows.result(run.id, timeout=20)
        assert done.status == "finished"
        assert [s.task for s in await flows.steps(run.id)] == ["first", then]


async def test_a_definition_under_the_id_of_a_python_pipeline_leaves_its_runs_alone(
    flows: FlowManager, engine: fs.Engine
) -> None:
    calls: Calls = collections.Counter()
    tasks = {name: recorder(calls) for name in ("first", "b", "c")}
    python = Pipeline("px").add_step(Step("first", tasks["first"])).add_step(Step("b", tasks["b"]))
    flows.register(python)
    earlier = await flows.execute("px", enqueue=True)
    flows.register(Pipeline.from_definition(two_definitions("c"), tasks=tasks))
    assert flows.pipeline("px").definition is not None, "new runs start with the definition"
    later = await flows.execute("px")
    await engine.do(fs.Execute(await engine.get_state(earlier.id)))
    for run, then in ((earlier, "b"), (later, "c")):
        assert (await flows.result(run.id, timeout=20)).status == "finished"
        assert [s.task for s in await flows.steps(run.id)] == ["first", then]


async def test_an_adopted_run_keeps_its_definition(engine: fs.Engine) -> None:
    calls: Calls = collections.Counter()
    tasks = {name: recorder(calls) for name in ("first", "b", "c")}
    submitter = FlowManager(engine)
    submitter.register(Pipeline.from_definition(two_definitions("b"), tasks=tasks))
    earlier = await submitter.execute("px", enqueue=True)
    async with fs.Engine(engine.driver) as restarted:
        flows = FlowManager(restarted)
        # Posted after a restart, before the adopter saw the earlier run.
        posted = Pipeline.from_definition(two_definitions("c"), tasks=tasks)
        flows.register(posted)
        state = (await restarted.get_state(earlier.id)).committed
        adopted = await flows.adopt(state, tasks)
        assert adopted.flow_id == state.transition.to != posted.flow_id
        assert flows.pipeline("px") is posted, "new runs still start with the posted one"
        later = await flows.execute("px")
        await restarted.do(fs.Execute(fs.StateCtx.of(state)))
        for run, then in ((earlier, "b"), (later, "c")):
            assert (await flows.result(run.id, timeout=20)).status == "finished"
            assert [s.task for s in await flows.steps(run.id)] == ["first", then]


def test_a_definition_reports_every_problem_at_once() -> None:
    bad = {
        "flow": {
            "id": "broken",
            "start_task": "missing",
            "tasks": [
                {"name": "a", "timeout": -1},
                {"name": "a"},
                {"name": "b", "retries": -2},
                {"name": "c", "timeout": 0},
            ],
            "conditions": [
                {
                    "source_task": "a",
                    "target_task_success": "nowhere",
                    "target_task_failure": "end",
                },
                {
                    "source_task": "ghost",
                    "outcome": "maybe",
                    "target_task_success": "b",
                    "target_task_failure": "elsewhere",
                },
            ],
        }
    }
    with pytest.raises(DefinitionError) as info:
        Pipeline.from_definition(bad, tasks={"a": recorder(collections.Counter())})
    problems = info.value.problems
    assert len(problems) == 11, problems
    text = "\n".join(problems)
    for fragment in [
        "start_task\" 'missing' is not a task",
        "two tasks are called 'a'",
        "'nowhere' is neither a task nor 'end'",
        "source_task 'ghost'",
        "outcome must be 'success' or 'failure', not 'maybe'",
        "'elsewhere' is neither a task nor 'end'",
        "no function for task 'b'",
        "step 'b': retries must be an int >= 0, not -2",
        "no function for task 'c'",
        "step 'a': timeout must be a number of seconds > 0 and < 1e9, not -1",
        "step 'c': timeout must be a number of seconds > 0 and < 1e9, not 0",
    ]:
        assert fragment in text, f"{fragment!r} missing from {problems}"
    assert isinstance(info.value, ValueError)
    # Without a mapping of functions, the definition is still checked whole.
    with pytest.raises(DefinitionError) as info:
        Pipeline.from_definition(bad, tasks=[recorder(collections.Counter())])  # type: ignore[arg-type]
    problems = info.value.problems
    assert problems[0] == "tasks must map task names to step functions"
    assert len(problems) == 10, problems
    assert not any("no function" in problem for problem in problems)
    for definition in ["{not json", "[]", {"flow": []}, {"flow": {"tasks": []}}]:
        with pytest.raises(DefinitionError):
            Pipeline.from_definition(definition, tasks={})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "definition",
    [
        b'{"flow": {"id": "\xff"}}',
        '{"flow": {"id": "\ud800"}}',
        {"flow": {"id": "p", "start_task": "\udc80", "tasks": [{"name": "\udc80"}]}},
        {"flow": {"id": "p", "tasks": [{"name": "a", "fn": object()}]}},
    ],
)
def test_a_definition_that_is_not_json_text_is_a_definition_error(definition: Any) -> None:
    with pytest.raises(DefinitionError, match="the definition is not JSON"):
        Pipeline.from_definition(definition, tasks={"a": recorder(collections.Counter())})


def test_a_pipeline_id_cannot_hold_the_digest_separator() -> None:
    # "x@" would run at the flow id under which pipeline "x" keeps the executor of its new
    # runs, and "x@<digest>" at that of a definition of "x".
    with pytest.raises(fs.InvalidCommandError, match="cannot contain '@'"):
        Pipeline("x@")
    definition = {"flow": {"id": "x@1", "start_task": "t", "tasks": [{"name": "t"}]}}
    with pytest.raises(DefinitionError, match="cannot contain '@'"):
        Pipeline.from_definition(definition, tasks={"t": recorder(collections.Counter())})


def test_builder_problems_are_reported_at_registration() -> None:
    calls: Calls = collections.Counter()
    pipeline = (
        Pipeline("p")
        .add_step(Step("a", recorder(calls), on_success="zzz"))
        .add_step(Step("a", recorder(calls)))
        .add_step(Step("end", recorder(calls)))
        .add_step(Step("b", recorder(calls), retries=-1, timeout=0, on_failure=""))
    )
    with pytest.raises(DefinitionError) as info:
        pipeline.validate()
    assert len(info.value.problems) == 6, info.value.problems
    assert "(6 problems)" in str(info.value)
    with pytest.raises(DefinitionError, match=r"\(1 problem\): .*no steps"):
        Pipeline("empty").validate()
    with pytest.raises(DefinitionError, match="a pipeline's name must be a string, not 5"):
        Pipeline("named", name=5).add_step(Step("a", recorder(calls))).validate()  # type: ignore[arg-type]


def test_a_problem_found_twice_is_reported_once() -> None:
    twice = {"flow": {"id": "p", "start_task": "t", "tasks": [{"name": "t"}, {"name": "t"}]}}
    with pytest.raises(DefinitionError) as info:
        Pipeline.from_definition(twice, tasks={})
    assert sorted(info.value.problems) == [
        "no function for task 't' (pass it in tasks=)",
        "two tasks are called 't'",
    ]


async def test_step_times_are_commit_times(flows: FlowManager) -> None:
    flows.register(Pipeline("t").add_step(Step("s", recorder(collections.Counter()))))
    done = await flows.result((await flows.execute("t")).id, timeout=20)
    (step,) = await flows.steps(done.id)
    events = {e.kind: e for e in await flows.events(done.id)}
    assert step.started_at == events["step_started"].at
    assert step.ended_at == events["step_completed"].at
    assert step.ended_at is not None
    assert step.started_at is not None
    assert step.ended_at - step.started_at < datetime.timedelta(seconds=5)
