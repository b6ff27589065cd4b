"""Recoverer, Delayer and leader election, in one process, on every driver."""

from __future__ import annotations

import asyncio
import datetime
import random
from collections.abc import Callable

import pytest

import flowstate as fs
from flowstate._state import internal_ctx
from flowstate.drivers.base import CommitRequest, Driver
from flowstate.drivers.faulty import Fault, FaultyDriver
from flowstate.drivers.memory import MemoryDriver
from flowstate.recovery import _settings

pytestmark = pytest.mark.anyio

LEASE_TTL = 1.0
FIRED = "flowstate.delay.fired"


def fast_recoverer(engine: fs.Engine) -> fs.Recoverer:
    """A recoverer with settings short enough for tests."""
    return fs.Recoverer(engine, retry_after=0.2, lease_ttl=LEASE_TTL, tick=0.05)


LABELS = {"suite": "recovery"}


async def first(engine: fs.Engine, predicate: Callable[[fs.State], bool]) -> fs.State:
    """The first version (from the start of the log) that satisfies ``predicate``."""
    async with asyncio.timeout(20), engine.watch(labels=LABELS) as watcher:
        async for state in watcher:
            if predicate(state):
                return state
    raise AssertionError("the engine closed")


def ended(state_id: str) -> Callable[[fs.State], bool]:
    return lambda state: state.id == state_id and state.is_ended


async def start_job(engine: fs.Engine, state_id: str, flow: str) -> fs.StateCtx:
    """Commit a state as running, as a worker that then crashed would leave it."""
    ctx = fs.StateCtx.new(state_id, labels=LABELS)
    await engine.do(fs.Commit(fs.Transit(ctx, flow)))
    return ctx


async def test_stalled_state_is_retried(new_driver: Callable[[], Driver]) -> None:
    attempts: list[int] = []

    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        attempts.append(fs.recovery.attempt(ctx.current))
        return fs.Commit(fs.End(ctx))

    async with fs.Engine(new_driver(), flows={"work": work}) as engine:
        await start_job(engine, "job", "work")
        async with fast_recoverer(engine) as recoverer:
            await first(engine, ended("job"))
            stats = recoverer.stats
        assert attempts == [1]
        assert (stats.added, stats.retried, stats.dropped) == (1, 1, 0)
        versions = [s async for s in engine.iter_states(labels=LABELS)]
        assert [fs.recovery.attempt(v) for v in versions] == [0, 1, 0]


async def test_force_ended_after_max_attempts(new_driver: Callable[[], Driver]) -> None:
    attempts: list[int] = []

    async def broken(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        attempts.append(fs.recovery.attempt(ctx.current))
        raise RuntimeError("this flow always fails")

    async with fs.Engine(new_driver(), flows={"broken": broken}) as engine:
        ctx = fs.StateCtx.new("poison", labels=LABELS)
        fs.recovery.set_max_attempts(ctx, 2)
        await engine.do(fs.Commit(fs.Transit(ctx, "broken")))
        async with fast_recoverer(engine) as recoverer:
            final = await first(engine, ended("poison"))
            stats = recoverer.stats
        assert attempts == [1, 2]
        assert final.annotations[_settings.ENDED_REASON] == "still running 'broken' after 2 retries"
        assert (stats.retried, stats.dropped) == (2, 1)


async def test_spent_attempts_hand_the_state_to_its_on_exhausted_flow(
    new_driver: Callable[[], Driver],
) -> None:
    settled: list[str] = []

    async def broken(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        raise RuntimeError("this flow always fails")

    async def settle(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        settled.append(ctx.current.transition.annotations[_settings.ENDED_REASON])
        return fs.Commit(fs.End(ctx))

    async def stalls_too(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        raise RuntimeError("so does this one")

    flows = {"broken": broken, "settle": settle, "stalls-too": stalls_too}
    async with fs.Engine(new_driver(), flows=flows) as engine:
        settles, loops = (fs.StateCtx.new(i, labels=LABELS) for i in ("settles", "loops"))
        for ctx, on_exhausted in ((settles, "settle"), (loops, "stalls-too")):
            fs.recovery.set_max_attempts(ctx, 1)
            fs.recovery.set_on_exhausted(ctx, on_exhausted)
            await engine.do(fs.Commit(fs.Transit(ctx, "broken")))
        async with fast_recoverer(engine) as recoverer:
            done = await first(engine, ended("settles"))
            looped = await first(engine, ended("loops"))
            stats = recoverer.stats
    assert settled == ["still running 'broken' after 1 retries"]
    assert _settings.ENDED_REASON not in done.annotations, "settled, not force-ended"
    # The on_exhausted flow stalled in turn: its own attempts spent, the state is ended.
    assert (
        looped.annotations[_settings.ENDED_REASON] == "still running 'stalls-too' after 1 retries"
    )
    assert stats.dropped == 3
    with pytest.raises(fs.InvalidCommandError):
        fs.recovery.set_on_exhausted(fs.StateCtx.new("x"), "")


async def test_resting_states_are_left_alone(new_driver: Callable[[], Driver]) -> None:
    calls: list[str] = []

    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls.append(ctx.id)
        return fs.Commit(fs.End(ctx))

    async with fs.Engine(new_driver(), flows={"work": work}) as engine:
        paused = fs.StateCtx.new("paused", labels=LABELS)
        done = fs.StateCtx.new("done", labels=LABELS)
        delayed = fs.StateCtx.new("delayed", labels=LABELS)
        disabled = fs.StateCtx.new("disabled", labels=LABELS)
        fs.recovery.disable(disabled)
        await engine.do(
            fs.Commit(
                fs.Pause(paused, "work"),
                fs.Transit(done, "work"),
                fs.End(done),
                fs.Transit(delayed, "work"),
                fs.Delay(delayed, "work", seconds=3600),
                fs.Transit(disabled, "work"),
            )
        )
        await start_job(engine, "running", "work")
        async with fast_recoverer(engine) as recoverer:
            await first(engine, ended("running"))
        assert calls == ["running"]
        assert recoverer.stats.added == 1


async def test_a_hanging_state_does_not_block_the_others(new_driver: Callable[[], Driver]) -> None:
    hanging = asyncio.Event()

    async def hang(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        hanging.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    async with fs.Engine(new_driver(), flows={"hang": hang, "work": work}) as engine:
        await start_job(engine, "stuck", "hang")
        await start_job(engine, "fine", "work")
        async with fast_recoverer(engine):
            await first(engine, ended("fine"))
        assert hanging.is_set()


@pytest.mark.slow
async def test_one_leader_and_a_quick_handover(new_driver: Callable[[], Driver]) -> None:
    async with fs.Engine(new_driver()) as one, fs.Engine(new_driver()) as two:
        first_rec = fast_recoverer(one)
        second_rec = fast_recoverer(two)
        async with first_rec:
            async with asyncio.timeout(10):
                await first_rec.wait_leader()
            async with second_rec:
                await asyncio.sleep(LEASE_TTL)  # a standby's campaigns keep failing
                assert first_rec.is_leader
                assert not second_rec.is_leader
                await first_rec.aclose()
                assert first_rec.stats.leader_changes == 2, "leadership was handed back"
                loop = asyncio.get_running_loop()
                handed_back = loop.time()
                async with asyncio.timeout(10):
                    await second_rec.wait_leader()
                assert loop.time() - handed_back <= LEASE_TTL, "a clean exit hands over"
        assert second_rec.stats.leader_changes == 2


async def test_recoverer_resumes_from_its_cursor(new_driver: Callable[[], Driver]) -> None:
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    async with fs.Engine(new_driver(), flows={"work": work}) as engine:
        for i in range(3):
            await start_job(engine, f"job{i}", "work")
        async with fast_recoverer(engine) as recoverer:
            last_end = max([(await first(engine, ended(f"job{i}"))).rev for i in range(3)])
            assert recoverer.stats.added == 3
            internal = {"flowstate.internal": "recovery"}
            async with asyncio.timeout(10), engine.watch(labels=internal) as watcher:
                async for state in watcher:  # until the saved cursor is past the finished jobs
                    if int(state.annotations["cursor"]) >= last_end:
                        break
        async with fast_recoverer(engine) as again:
            await again.wait_leader()
            await start_job(engine, "late", "work")
            await first(engine, ended("late"))
        assert again.stats.added == 1, "history before the cursor was not read again"


@pytest.mark.parametrize("stored", ["abc", "-5", "1e3", "٣", str(2**63)])
async def test_a_cursor_that_is_not_a_revision_means_from_the_start(
    new_driver: Callable[[], Driver], stored: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Anyone with write access to the store (through `flowstate serve`, say) can write the
    # cursor states. A service that cannot read its cursor starts from the beginning, which
    # is always correct, rather than failing to lead.
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    async with fs.Engine(new_driver(), flows={"work": work}) as engine:
        await start_job(engine, "before-the-cursor", "work")
        for cursor_id in (fs.Recoverer.cursor_id, fs.Delayer.cursor_id):
            cursor = internal_ctx(cursor_id, labels={"flowstate.internal": "recovery"})
            cursor.current.annotations["cursor"] = stored
            await engine.do(fs.Commit(fs.Noop(cursor)))
        async with fast_recoverer(engine) as recoverer, fs.Delayer(engine, lease_ttl=LEASE_TTL):
            await first(engine, ended("before-the-cursor"))
            assert recoverer.stats.added == 1
    warnings = [r.getMessage() for r in caplog.records if "not a revision" in r.getMessage()]
    assert len(warnings) == 2, caplog.text
    assert all(f"is {stored!r}, not a revision: starting from rev 0" in w for w in warnings)


async def test_delays_fire_once_when_due(new_driver: Callable[[], Driver]) -> None:
    woken: list[tuple[str, str]] = []

    async def wake(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        woken.append((ctx.id, ctx.current.transition.annotations["flowstate.delay.fired"]))
        return fs.Commit(fs.End(ctx))

    async with fs.Engine(new_driver(), flows={"wake": wake}) as engine:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        overdue, soon, moved = (
            fs.StateCtx.new(i, labels=LABELS) for i in ("overdue", "soon", "moved")
        )
        await engine.do(
            fs.Commit(fs.Pause(overdue, "x"), fs.Delay(overdue, "wake", until=past)),
            fs.Commit(fs.Pause(moved, "x"), fs.Delay(moved, "wake", seconds=0.1)),
            fs.Commit(fs.Pause(soon, "x"), fs.Delay(soon, "wake", seconds=0.3)),
            fs.Commit(fs.Resume(moved)),  # moves on: its delay must not fire
        )
        due_soon = soon.committed.delay_at
        async with fs.Delayer(engine, lease_ttl=1.0) as delayer:
            woke = await first(engine, ended("soon"))
            stats = delayer.stats
        assert sorted(i for i, _ in woken) == ["overdue", "soon"]
        assert (stats.fired, stats.dropped) == (2, 1)
        assert due_soon is not None
        assert woke.committed_at is not None
        assert woke.committed_at >= due_soon - datetime.timedelta(milliseconds=1)
        assert dict(woken)["overdue"] == past.isoformat()


@pytest.mark.parametrize("service", [fast_recoverer, fs.Delayer])
async def test_a_service_stops_quietly_when_its_engine_closes(
    new_driver: Callable[[], Driver], service: Callable[[fs.Engine], fs.Recoverer | fs.Delayer]
) -> None:
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    engine = fs.Engine(new_driver(), flows={"work": work})
    await engine.open()
    await start_job(engine, "job", "work")
    async with service(engine) as running:
        await running.wait_leader()
        await engine.aclose()  # under the service: it stops, and leaving it raises nothing
    assert not running.is_leader


async def test_invalid_settings() -> None:
    async with fs.Engine("memory://") as engine:
        with pytest.raises(fs.InvalidCommandError):
            fs.Recoverer(engine, retry_after=0)
        with pytest.raises(fs.InvalidCommandError):
            fs.Recoverer(engine, max_attempts=-1)
        with pytest.raises(fs.InvalidCommandError):
            fs.Delayer(engine, lease_ttl=float("nan"))
    ctx = fs.StateCtx.new("s")
    with pytest.raises(fs.InvalidCommandError):
        fs.recovery.set_retry_after(ctx, -1)
    with pytest.raises(fs.InvalidCommandError):
        fs.recovery.set_max_attempts(ctx, 1.5)  # type: ignore[arg-type]
    fs.recovery.set_retry_after(ctx, 5)
    fs.recovery.set_max_attempts(ctx, 0)
    assert _settings.retry_after_of(ctx.current, 120) == 5.0
    assert _settings.max_attempts_of(ctx.current, 3) == 0


async def test_recoverer_tries_again_after_the_store_failed() -> None:
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    failed: list[int] = []

    def fail_first_retry(number: int, request: CommitRequest) -> Fault | None:
        retry = any(_settings.ATTEMPT in w.state.transition.annotations for w in request.writes)
        if retry and not failed:
            failed.append(number)
            return Fault.FAIL
        return None

    driver = FaultyDriver(MemoryDriver(), fail_first_retry)
    async with driver, fs.Engine(driver, flows={"work": work}) as engine:
        await start_job(engine, "job", "work")
        async with fast_recoverer(engine) as recoverer:
            await first(engine, ended("job"))
        assert [fault.fault for fault in driver.injected] == [Fault.FAIL]
        assert recoverer.stats.retried == 1


async def test_delayer_fires_again_after_the_store_failed() -> None:
    async def wake(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    def fail_first_fire(number: int, request: CommitRequest) -> Fault | None:
        fires = any(FIRED in w.state.transition.annotations for w in request.writes)
        return Fault.FAIL if fires and not driver.injected else None

    driver = FaultyDriver(MemoryDriver(), fail_first_fire)
    async with driver, fs.Engine(driver, flows={"wake": wake}) as engine:
        ctx = fs.StateCtx.new("timer", labels=LABELS)
        await engine.do(fs.Commit(fs.Pause(ctx, "x"), fs.Delay(ctx, "wake", seconds=0)))
        async with fs.Delayer(engine, lease_ttl=LEASE_TTL) as delayer:
            await first(engine, ended("timer"))
        assert (delayer.stats.fired, delayer.stats.dropped) == (1, 0)
        assert [fault.fault for fault in driver.injected] == [Fault.FAIL]


async def cursor_saved(engine: fs.Engine) -> None:
    """Return once the delayer has saved its cursor (what a next leader starts from)."""
    async with asyncio.timeout(20), engine.watch(id=fs.Delayer.cursor_id) as watcher:
        async for _ in watcher:
            return
    raise AssertionError("the engine closed")


async def test_a_new_leader_fires_a_delay_the_old_one_was_still_firing() -> None:
    # The leader starts firing a due delay, saves its cursor, and stops before the fire is
    # committed (here the store refuses the fire until then): the next leader must fire it.
    async def wake(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    refusing = True
    refused = asyncio.Event()

    def refuse_fires(number: int, request: CommitRequest) -> Fault | None:
        if refusing and any(FIRED in w.state.transition.annotations for w in request.writes):
            refused.set()
            return Fault.FAIL
        return None

    driver = FaultyDriver(MemoryDriver(), refuse_fires)
    async with driver, fs.Engine(driver, flows={"wake": wake}) as engine:
        ctx = fs.StateCtx.new("timer", labels=LABELS)
        await engine.do(fs.Commit(fs.Pause(ctx, "x"), fs.Delay(ctx, "wake", seconds=0)))
        async with fs.Delayer(engine, lease_ttl=LEASE_TTL):
            await cursor_saved(engine)
            await refused.wait()  # the fire is in flight
        refusing = False
        async with fs.Delayer(engine, lease_ttl=LEASE_TTL) as delayer:
            await first(engine, ended("timer"))
        assert delayer.stats.fired == 1


@pytest.mark.slow
async def test_a_new_leader_fires_a_delay_due_after_one_committed_later() -> None:
    # A delay committed first but due last must not fall behind the cursor of a leader that
    # stops before either is due.
    async def wake(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    async with fs.Engine("memory://", flows={"wake": wake}) as engine:
        late, early = (fs.StateCtx.new(i, labels=LABELS) for i in ("late", "early"))
        await engine.do(
            fs.Commit(fs.Pause(late, "x"), fs.Delay(late, "wake", seconds=3)),
            fs.Commit(fs.Pause(early, "x"), fs.Delay(early, "wake", seconds=2)),
        )
        async with fs.Delayer(engine, lease_ttl=LEASE_TTL) as delayer:
            await cursor_saved(engine)
        assert delayer.stats.fired == 0, "the first leader stopped before any delay was due"
        async with fs.Delayer(engine, lease_ttl=LEASE_TTL) as delayer:
            await first(engine, ended("late"))
        assert delayer.stats.fired == 2


def test_the_delayers_bookkeeping_follows_the_unsettled_delays() -> None:
    # One delay stays unsettled (due far ahead) while thousands after it are fired: the
    # cursor stays before it, and memory follows the unsettled delays, not every one read.
    from flowstate.recovery._services import _Unsettled

    unsettled, live, rng = _Unsettled(), set(), random.Random(7)
    for rev in range(1, 5001):
        unsettled.add(rev)
        live.add(rev)
        if rev % 3 and len(live) > 1:
            settled = rng.choice(sorted(live - {1}))
            live.discard(settled)
            unsettled.settle(settled)
        assert unsettled.cursor(rev) == min(live) - 1
        assert len(unsettled._revs) <= 2 * len(live) + 64
    for rev in sorted(live):
        unsettled.settle(rev)
    assert unsettled.cursor(5000) == 5000, "all settled: after the last one read"


async def test_the_recoverers_due_list_follows_the_running_states() -> None:
    # A busy store commits many versions of its running states within retry_after: the
    # recoverer keeps what it needs for the latest ones, not an entry per commit.
    async with fs.Engine("memory://") as engine:
        recoverer = fs.Recoverer(engine, retry_after=120)
        tracked: dict[str, fs.State] = {}
        due: list[tuple[float, int, str]] = []
        now = datetime.datetime.now(datetime.UTC)
        for rev in range(1, 10_001):
            state_id = f"job-{rev % 10}"
            state = fs.State(id=state_id, rev=rev, committed_at=now)
            state.transition = fs.Transition(to="work")
            recoverer._track(state, tracked, due)
            assert len(due) <= 2 * len(tracked) + 64
        latest = {(s.rev, s.id) for s in tracked.values()}
        assert latest <= {(rev, state_id) for _, rev, state_id in due}, "each latest is due"
