"""The Worker service in one process, on every driver: plain flows, JSON runs, cancels."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable
from typing import Any

import pytest

import flowstate as fs
from flowstate.drivers.base import Driver
from flowstate.workflows import FlowManager, Pipeline, Step, StepContext, Worker, workflow_flows
from tests.log_events import first_record
from tests.workflows.steps import Forever, until_ended

pytestmark = pytest.mark.anyio


async def test_workers_run_each_plain_step_once(new_driver: Callable[[], Driver]) -> None:
    calls: collections.Counter[tuple[str, str]] = collections.Counter()

    async def pick(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls[(ctx.id, "pick")] += 1
        return fs.Transit(ctx, "pack")  # a bare move: the worker commits it

    async def pack(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls[(ctx.id, "pack")] += 1
        return fs.Commit(fs.End(ctx))

    flows = {"pick": pick, "pack": pack}
    async with (
        fs.Engine(new_driver(), flows=flows) as one,
        fs.Engine(new_driver(), flows=flows) as two,
        fs.Engine(new_driver()) as producer,
        Worker(one, name="one") as first,
        Worker(two, name="two") as second,
    ):
        await first.started()
        await second.started()
        ids = [f"order-{i}" for i in range(20)]
        async with producer.watch(labels={"kind": "order"}) as watcher:
            for state_id in ids:
                ctx = fs.StateCtx.new(state_id, labels={"kind": "order"})
                await producer.do(fs.Commit(fs.Transit(ctx, "pick")))
            await until_ended(watcher, ids)
        assert calls == {(i, step): 1 for i in ids for step in ("pick", "pack")}
        assert first.stats.steps + second.stats.steps == 40
        versions = [v async for v in producer.iter_states(id="order-0")]
        claims = [v.transition.annotations.get(fs.CLAIM_ANNOTATION) for v in versions]
        assert claims[1] in ("one", "two"), "each step is claimed before it runs"


class _Chain:
    """Flows ``s1`` -> ``s2`` -> end that count their calls; the first call of ``s2`` waits
    for ``release``, so that a worker has every chance to run the step beside it. ``probe``
    sets ``probed``: once a worker ran it, the worker has looked at every version before."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.release = asyncio.Event()
        self.probed = asyncio.Event()

    def flows(self) -> dict[str, fs.Flow]:
        async def s1(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            self.calls["s1"] += 1
            return fs.Commit(fs.Transit(ctx, "s2"))

        async def s2(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            self.calls["s2"] += 1
            if self.calls["s2"] == 1:
                await self.release.wait()
            return fs.Commit(fs.End(ctx))

        async def probe(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            self.probed.set()
            return fs.Commit(fs.End(ctx))

        return {"s1": s1, "s2": s2, "probe": probe}

    async def run_beside(self, engine: fs.Engine, state_id: str) -> None:
        """Once ``state_id`` waits in ``s2`` (run by another executor), let a worker look at
        it, then let ``s2`` go on, and wait for the state to end."""
        async with engine.watch(id=state_id) as versions:
            async for version in versions:
                if version.transition.to == "s2":
                    assert fs.CLAIM_ANNOTATION in version.transition.annotations
                    break
            await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new("probe"), "probe")))
            await asyncio.wait_for(self.probed.wait(), 20)
            self.release.set()
            async for version in versions:
                if version.is_ended:
                    break


async def test_a_worker_leaves_the_delayers_execution_alone(engine: fs.Engine) -> None:
    chain = _Chain()
    async with fs.Engine(engine.driver, flows=chain.flows()) as runner:
        async with Worker(runner) as worker, fs.Delayer(runner):
            await worker.started()
            ctx = fs.StateCtx.new("job")
            await runner.do(fs.Commit(fs.Transit(ctx, "wait")))
            await runner.do(fs.Delay(ctx, "s1", seconds=0))
            await asyncio.wait_for(chain.run_beside(runner, "job"), 30)
        assert chain.calls == {"s1": 1, "s2": 1}


async def test_a_worker_leaves_the_recoverers_execution_alone(engine: fs.Engine) -> None:
    chain = _Chain()
    async with fs.Engine(engine.driver, flows=chain.flows()) as runner:
        # Claimed by a worker that died: the recoverer retries it, and runs on to s2.
        ctx = fs.StateCtx.new("job")
        await runner.do(fs.Commit(fs.Transit(ctx, "s1", annotations={fs.CLAIM_ANNOTATION: "gone"})))
        async with Worker(runner) as worker, fs.Recoverer(runner, retry_after=0.1, tick=0.02):
            await worker.started()
            await asyncio.wait_for(chain.run_beside(runner, "job"), 30)
        assert chain.calls == {"s1": 1, "s2": 1}


async def test_a_worker_leaves_a_claimed_execution_alone(engine: fs.Engine) -> None:
    chain = _Chain()
    async with fs.Engine(engine.driver, flows=chain.flows()) as runner:
        async with Worker(runner) as worker:
            await worker.started()
            ctx = fs.StateCtx.new("job")
            await runner.do(
                fs.Commit(fs.Transit(ctx, "s1", annotations={fs.CLAIM_ANNOTATION: "me"})),
                fs.Execute(ctx, claim="me"),
            )
            await asyncio.wait_for(chain.run_beside(runner, "job"), 30)
        assert chain.calls == {"s1": 1, "s2": 1}


async def test_a_worker_runs_json_runs_from_their_stored_definition(engine: fs.Engine) -> None:
    calls: collections.Counter[str] = collections.Counter()

    async def task(step: StepContext) -> Any:
        calls[step.step_id] += 1
        return {"status": "success"}

    definition = {
        "flow": {
            "id": "etl",
            "start_task": "extract",
            "tasks": [{"name": "extract"}, {"name": "load"}],
            "conditions": [
                {
                    "source_task": "extract",
                    "target_task_success": "load",
                    "target_task_failure": "end",
                }
            ],
        }
    }
    tasks = {"extract": task, "load": task}
    async with fs.Engine(engine.driver) as bare, Worker(bare, tasks=tasks) as worker:
        await worker.started()
        submitter = FlowManager(engine)
        submitter.register(Pipeline.from_definition(definition, tasks=tasks))
        run = await submitter.execute("etl", enqueue=True)
        done = await submitter.result(run.id, timeout=30)
    assert done.status == "finished"
    assert calls == {"extract": 1, "load": 1}
    assert worker.stats.runs >= 1


async def test_a_worker_picks_up_runs_waiting_when_it_starts(engine: fs.Engine) -> None:
    calls: collections.Counter[str] = collections.Counter()

    async def step(ctx: StepContext) -> Any:
        calls[ctx.run_id] += 1
        return None

    pipeline = Pipeline("queued").add_step(Step("only", step))
    manager = FlowManager(engine)
    manager.register(pipeline)
    runs = [await manager.execute("queued", enqueue=True) for _ in range(3)]
    async with (
        fs.Engine(engine.driver, flows=workflow_flows(pipeline)) as other,
        Worker(other, concurrency=1) as worker,
    ):
        for run in runs:
            assert (await manager.result(run.id, timeout=30)).status == "finished"
    assert calls == {run.id: 1 for run in runs}
    assert worker.stats.runs == 3


async def test_a_cancel_elsewhere_stops_the_step_a_worker_runs(engine: fs.Engine) -> None:
    forever = Forever()
    pipeline = Pipeline("forever").add_step(Step("wait", forever))
    async with (
        fs.Engine(engine.driver, flows=workflow_flows(pipeline)) as other,
        Worker(other) as worker,
    ):
        await worker.started()
        # This manager has no executor of its own: the worker's is in another engine.
        submitter = FlowManager(engine)
        submitter.register(pipeline)
        run = await submitter.execute("forever", enqueue=True)
        await forever.started.wait()
        engine.flows.unregister(pipeline.flow_id)
        await submitter.cancel(run.id)
        await asyncio.wait_for(forever.stopped.wait(), 10)
    assert (await submitter.get(run.id)).status == "cancelled"


async def test_worker_arguments(engine: fs.Engine) -> None:
    with pytest.raises(fs.InvalidCommandError):
        Worker(engine, concurrency=0)
    for drain_timeout in (-1.0, math.nan, "30"):
        with pytest.raises(fs.InvalidCommandError, match="drain_timeout"):
            Worker(engine, drain_timeout=drain_timeout)  # type: ignore[arg-type]
    worker = Worker(engine)
    async with worker:
        with pytest.raises(fs.ClosedError):
            await worker.__aenter__()
    await worker.aclose()


async def test_a_stopping_worker_starts_none_of_its_queued_work(engine: fs.Engine) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    calls: collections.Counter[tuple[str, str]] = collections.Counter()

    async def first(step: StepContext) -> Any:
        calls[(step.run_id, step.step_id)] += 1
        entered.set()
        await release.wait()
        return None

    async def then(step: StepContext) -> Any:
        calls[(step.run_id, step.step_id)] += 1
        return None

    pipeline = Pipeline("gate").add_step(Step("first", first)).add_step(Step("then", then))
    manager = FlowManager(engine)
    manager.register(pipeline)
    held, queued = [await manager.execute("gate", enqueue=True) for _ in range(2)]
    async with fs.Engine(engine.driver, flows=workflow_flows(pipeline)) as other:
        worker = Worker(other, concurrency=1)
        await worker.__aenter__()
        await entered.wait()
        running = {run.id for run in (held, queued) if calls[(run.id, "first")]}
        assert running == {held.id}, "the first run committed holds the only slot"
        closing = asyncio.create_task(worker.aclose())
        await asyncio.sleep(0)  # one turn of the loop: aclose runs up to its drain wait
        release.set()  # the running step ends while the worker drains
        await closing
    assert [e.kind for e in await manager.events(queued.id)] == ["created"], "left untouched"
    assert [e.kind for e in await manager.events(held.id)] == [
        "created",
        "step_started",
        "step_completed",
    ], "the held run stopped at its next step boundary"
    async with (
        fs.Engine(engine.driver, flows=workflow_flows(pipeline)) as another,
        Worker(another),
    ):
        for run in (held, queued):
            assert (await manager.result(run.id, timeout=30)).status == "finished"
    assert calls == {(run.id, step): 1 for run in (held, queued) for step in ("first", "then")}


async def test_a_worker_picks_up_plain_steps_committed_before_it_started(
    engine: fs.Engine,
) -> None:
    calls: collections.Counter[tuple[str, str]] = collections.Counter()

    async def pick(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls[(ctx.id, "pick")] += 1
        return fs.Commit(fs.Transit(ctx, "pack"))

    async def pack(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls[(ctx.id, "pack")] += 1
        return fs.Commit(fs.End(ctx))

    ids = [f"order-{i}" for i in range(12)]
    for state_id in ids:
        ctx = fs.StateCtx.new(state_id, labels={"kind": "order"})
        await engine.do(fs.Commit(fs.Transit(ctx, "pick" if state_id < "order-6" else "pack")))
    # Neither running at one of the worker's flows: left alone.
    await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new("elsewhere"), "not-here")))
    later = fs.StateCtx.new("later")
    await engine.do(fs.Commit(fs.Transit(later, "pick"), fs.Delay(later, "pick", seconds=3600)))
    flows = {"pick": pick, "pack": pack}
    async with (
        fs.Engine(engine.driver, flows=flows) as other,
        engine.watch(labels={"kind": "order"}, latest_only=True) as watcher,
        Worker(other, concurrency=2),
    ):
        await until_ended(watcher, ids)
    picked = {state_id for state_id in ids if state_id < "order-6"}
    assert calls == {
        **{(state_id, "pick"): 1 for state_id in picked},
        **{(state_id, "pack"): 1 for state_id in ids},
    }
    assert (await engine.get_state("elsewhere")).current.transition.to == "not-here"
    assert (await engine.get_state("later")).current.is_delayed, "its delay still pending"


async def test_a_worker_with_only_pipelines_reads_only_runs_at_start_up(
    engine: fs.Engine,
) -> None:
    # The layer's own flows (timer waits, spent runs) are not plain flows: with them and
    # pipelines alone, the start-up backlog is the running runs, found by their labels,
    # not every state's latest version.
    pipeline = Pipeline("only").add_step(Step("s", Forever()))
    async with fs.Engine(engine.driver, flows=workflow_flows(pipeline)) as other:
        backlog = Worker(other)._backlog()
    assert backlog.labels == {"flow.runtime": "pipeline", "flow.status": "running"}


async def test_a_plain_flow_that_returns_no_command_is_named(
    engine: fs.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    returned = asyncio.Event()

    async def bad(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        returned.set()
        return 42  # type: ignore[return-value]

    ctx = fs.StateCtx.new("odd")
    await engine.do(fs.Commit(fs.Transit(ctx, "bad")))
    with first_record("flowstate.workflows") as logged:
        async with fs.Engine(engine.driver, flows={"bad": bad}) as other, Worker(other):
            await asyncio.wait_for(logged.wait(), 10)
    assert returned.is_set()
    assert "flow 'bad' returned 42; a flow must return a Command" in caplog.text
