"""Engine behaviour that does not depend on the driver (the conformance suite covers the rest)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

import flowstate as fs
from tests.log_events import first_record

pytestmark = pytest.mark.anyio


@pytest.fixture
async def engine() -> AsyncIterator[fs.Engine]:
    async with fs.Engine("memory://") as engine:
        yield engine


async def noop(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    return fs.Noop(ctx)


def test_flow_registry() -> None:
    registry = fs.FlowRegistry({"a": noop})
    assert "a" in registry
    assert "zzz" not in registry
    assert list(registry) == ["a"]
    assert len(registry) == 1

    @registry.flow("b")
    async def b(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Noop(ctx)

    assert registry["b"] is b
    registry.unregister("a")
    with pytest.raises(fs.FlowNotFoundError, match="'a'"):
        registry["a"]
    with pytest.raises(fs.FlowNotFoundError):
        registry.unregister("a")
    with pytest.raises(fs.InvalidCommandError):
        registry.register("", noop)
    with pytest.raises(fs.InvalidCommandError):
        registry.register("c", "not callable")  # type: ignore[arg-type]


def test_engine_takes_a_registry_as_is() -> None:
    registry = fs.FlowRegistry({"a": noop})
    assert fs.Engine("memory://", flows=registry).flows is registry


async def test_background_failures_are_logged(
    engine: fs.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    failed = asyncio.Event()

    @engine.flow("explode")
    async def explode(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        failed.set()
        raise RuntimeError("kaboom")

    ctx = fs.StateCtx.new("s")
    with caplog.at_level(logging.ERROR, logger="flowstate"):
        await engine.do(fs.Commit(fs.Transit(ctx, "explode")), fs.Execute(ctx))
        await failed.wait()
        await asyncio.sleep(0)  # the failing task finishes its except block
    assert "background execution of state 's' failed" in caplog.text
    assert "kaboom" in caplog.text
    (record,) = [r for r in caplog.records if r.name == "flowstate"]
    assert record.exc_info is not None, "a flow's bug comes with its trace"


async def test_a_missing_flow_in_the_background_is_one_line(
    engine: fs.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # Not a bug in a flow: the engine lacks the flow (a recoverer without it, say), and a
    # trace would only repeat at every retry.
    ctx = fs.StateCtx.new("s")
    await engine.do(fs.Commit(fs.Transit(ctx, "nowhere")))
    with first_record("flowstate") as logged, caplog.at_level(logging.ERROR, logger="flowstate"):
        await engine.do(fs.Execute(ctx))
        await asyncio.wait_for(logged.wait(), 10)
    (record,) = caplog.records
    assert record.getMessage() == (
        "background execution of state 's' failed: no flow registered under 'nowhere'; "
        "register it with engine.flows"
    )
    assert record.exc_info is None


async def test_execute_follows_returned_execute_to_another_state(engine: fs.Engine) -> None:
    other = fs.StateCtx.new("other")

    @engine.flow("hand-over")
    async def hand_over(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        await engine.do(fs.Commit(fs.End(ctx), fs.Transit(other, "finish")))
        return fs.Execute(other)

    @engine.flow("finish")
    async def finish(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    ctx = fs.StateCtx.new("first")
    await engine.do(fs.Commit(fs.Transit(ctx, "hand-over")))
    result = await engine.execute(ctx)
    assert (result.status, result.ctx.id, result.steps) == ("ended", "other", 2)


async def test_a_claimed_execution_marks_the_versions_it_goes_on_running() -> None:
    async def start(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.Transit(ctx, "fork"), fs.Transit(side, "side"))

    async def fork(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.Transit(ctx, "last"))

    async def last(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    side = fs.StateCtx.new("side")
    flows = {"start": start, "fork": fork, "last": last}
    async with fs.Engine("memory://", flows=flows) as engine:
        ctx = fs.StateCtx.new("job")
        await engine.do(fs.Commit(fs.Transit(ctx, "start")))
        result = await engine.execute(ctx, claim="host:1")
        assert (result.status, result.steps) == ("ended", 3)
        claims = [
            (v.transition.to, v.transition.annotations.get(fs.CLAIM_ANNOTATION))
            async for v in engine.iter_states(id="job")
        ]
        # The first version was not committed by it; the last is not run by anyone.
        assert claims == [("start", None), ("fork", "host:1"), ("last", "host:1"), ("", None)]
        # Another state moved by the same commit is not the execution's to run.
        assert (
            fs.CLAIM_ANNOTATION
            not in (await engine.get_state("side")).committed.transition.annotations
        )
        plain = fs.StateCtx.new("plain")
        await engine.do(fs.Commit(fs.Transit(plain, "fork")))
        await engine.execute(plain)
        assert not [
            v
            async for v in engine.iter_states(id="plain")
            if fs.CLAIM_ANNOTATION in v.transition.annotations
        ]


@pytest.mark.parametrize("claim", ["", 5, "\ud800"])
async def test_a_claim_is_a_name(engine: fs.Engine, claim: object) -> None:
    ctx = fs.StateCtx.new("job")
    with pytest.raises(fs.InvalidCommandError):
        await engine.execute(ctx, claim=claim)  # type: ignore[arg-type]
    with pytest.raises(fs.InvalidCommandError):
        fs.Execute(ctx, claim=claim)  # type: ignore[arg-type]


async def test_transit_without_commit_stays_in_memory(engine: fs.Engine) -> None:
    @engine.flow("a")
    async def a(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Transit(ctx, "b")

    @engine.flow("b")
    async def b(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Pause(ctx)

    ctx = fs.StateCtx.new("s")
    await engine.do(fs.Commit(fs.Transit(ctx, "a")))
    result = await engine.execute(ctx)
    assert result.status == "paused"
    assert [t.to for t in ctx.transitions] == ["b", "b"]
    stored = await engine.get_state("s")
    assert stored.current.transition.to == "a"


async def test_resume_continues_where_pause_left(engine: fs.Engine) -> None:
    calls = []

    @engine.flow("wait")
    async def wait(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls.append(ctx.current.transition.annotations.copy())
        if ctx.current.is_paused:
            raise AssertionError("a paused state is never run")
        if "flowstate.resumed" in ctx.current.transition.annotations:
            return fs.Commit(fs.End(ctx))
        return fs.Commit(fs.Pause(ctx))

    ctx = fs.StateCtx.new("s")
    await engine.do(fs.Commit(fs.Transit(ctx, "wait")))
    assert (await engine.execute(ctx)).status == "paused"
    assert (await engine.execute(ctx)).steps == 0
    await engine.do(fs.Commit(fs.Resume(ctx)))
    assert (await engine.execute(ctx)).status == "ended"
    assert len(calls) == 2


async def test_every_transition_command_takes_annotations(engine: fs.Engine) -> None:
    ctx = fs.StateCtx.new("s")
    await engine.do(fs.Commit(fs.Transit(ctx, "a", annotations={"why": "start"})))
    await engine.do(fs.Commit(fs.Pause(ctx, annotations={"why": "wait"})))
    await engine.do(fs.Commit(fs.Resume(ctx, annotations={"why": "approved"})))
    await engine.do(fs.Commit(fs.End(ctx, annotations={"why": "done"})))
    versions = [state async for state in engine.iter_states(id="s")]
    assert [v.transition.annotations.get("why") for v in versions] == [
        "start",
        "wait",
        "approved",
        "done",
    ]
    assert [v.status for v in versions] == ["running", "paused", "running", "ended"]
    assert versions[1].transition.to == versions[2].transition.to == "a"
    # The markers win over annotations of the same name.
    paused = fs.Pause(ctx, "a", annotations={"flowstate.paused": "no"})
    await engine.do(fs.Commit(paused))
    assert (await engine.get_state("s")).current.is_paused
    for make in (
        lambda: fs.End(ctx, annotations={"n": 1}),  # type: ignore[dict-item]
        lambda: fs.Pause(ctx, "a", annotations="text"),  # type: ignore[arg-type]
        lambda: fs.Resume(ctx, annotations={"\udc80": "x"}),
    ):
        with pytest.raises(fs.InvalidCommandError):
            make()


async def test_delay_outside_commit_is_committed(engine: fs.Engine) -> None:
    ctx = fs.StateCtx.new("s")
    await engine.do(fs.Commit(fs.Transit(ctx, "a")))
    await engine.do(fs.Delay(ctx, "b", seconds=60))
    stored = await engine.get_state("s")
    assert stored.current.is_delayed
    assert stored.current.delay_at is not None
    assert stored.current.delay_to == "b"
    assert ctx.current.delay_to == "b"
    assert fs.State(id="s").delay_to is None
    page = await engine.driver.get_delays()
    assert [d.to for d in page.delays] == ["b"]


async def test_store_data_outside_commit_is_committed(engine: fs.Engine) -> None:
    ctx = fs.StateCtx.new("s")
    ctx.data["d"] = fs.Data(blob=b"x")
    await engine.do(fs.StoreData(ctx, "d"))
    assert ctx.data["d"].rev == ctx.committed.rev == 1


async def test_stack_of_a_ctx_with_data_round_trips(engine: fs.Engine) -> None:
    inner = fs.StateCtx.new("inner", labels={"k": "v"})
    inner.data["d"] = fs.Data(blob=b"\x00\xff", rev=3)
    carrier = fs.StateCtx.new("carrier")
    await engine.do(fs.Stack(carrier, inner, "k"))
    restored = fs.StateCtx.new("x")
    await engine.do(fs.Unstack(carrier, restored, "k"))
    assert restored == inner


async def test_stack_of_what_json_cannot_hold_is_an_invalid_command(engine: fs.Engine) -> None:
    inner = fs.StateCtx.new("inner")
    inner.data["d"] = fs.Data(blob="\ud800")  # type: ignore[arg-type]
    carrier = fs.StateCtx.new("carrier")
    with pytest.raises(fs.InvalidCommandError, match="'inner' cannot be stacked"):
        await engine.do(fs.Commit(fs.Stack(carrier, inner, "k"), fs.Transit(carrier, "next")))
    assert carrier.current.annotations == {}
    assert await engine.driver.head_rev() == 0


async def test_unstack_of_garbage_is_an_invalid_command(engine: fs.Engine) -> None:
    carrier = fs.StateCtx.new("carrier", annotations={"k": "not json"})
    with pytest.raises(fs.InvalidCommandError, match="does not hold a stacked state"):
        await engine.do(fs.Unstack(carrier, fs.StateCtx.new("x"), "k"))


async def test_commit_of_nothing_writes_nothing(engine: fs.Engine) -> None:
    await engine.do(fs.Commit(), fs.Commit(fs.Noop()))
    assert await engine.driver.head_rev() == 0


async def test_aclose_is_idempotent_and_safe_before_open() -> None:
    engine = fs.Engine("memory://")
    await engine.aclose()
    await engine.aclose()
    assert engine.is_closed


async def test_delay_until_must_be_aware() -> None:
    import datetime

    ctx = fs.StateCtx.new("s")
    with pytest.raises(fs.InvalidCommandError):
        fs.Delay(ctx, "x", until=datetime.datetime(2030, 1, 1))  # naive on purpose
    with pytest.raises(fs.InvalidCommandError):
        fs.Delay(ctx, "x", seconds=1, until=datetime.datetime.now(datetime.UTC))
    delay = fs.Delay(ctx, "x", until=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC))
    assert delay.at.year == 2030
