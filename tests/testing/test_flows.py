"""The flow-exploration kit: runs, faults, recovery, invariants, search and shrinking."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate.drivers.faulty import Fault
from flowstate.drivers.memory import MemoryDriver
from flowstate.recovery import _settings as recovery_settings
from flowstate.testing import flows as flows_module
from flowstate.testing import strategies as fst
from flowstate.testing.flows import (
    InvariantError,
    Outcome,
    every_state_rests,
    explore,
    never_transits,
    no_state_force_ended,
    replay,
)

# Deterministic and independent of saved examples, so that what is found is found every run.
SEARCH = settings(max_examples=100, deadline=None, database=None, derandomize=True)


def at(state_id: str, flow: str) -> fs.StateCtx:
    ctx = fs.StateCtx.new(state_id)
    ctx.current.transition = fs.Transition(to=flow)
    return ctx


async def first(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    return fs.Commit(fs.Transit(ctx, "second"))


async def second(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    return fs.Commit(fs.End(ctx))


TWO_STEPS = {"first": first, "second": second}


@pytest.mark.parametrize(
    ("fault", "path"),
    [
        (None, ["first", "second", ""]),
        (Fault.FAIL, ["first", "first", "second", ""]),
        (Fault.CONFLICT, ["first", "first", "second", ""]),
        (Fault.CRASH_BEFORE, ["first", "first", "second", ""]),
        (Fault.CRASH_AFTER, ["first", "second", "second", ""]),
        (Fault.LOST_REPLY, ["first", "second", "second", ""]),
    ],
)
def test_each_fault_then_recovery(fault: Fault | None, path: list[str]) -> None:
    faults = {1: fault} if fault else {}
    outcome = replay(TWO_STEPS, states=[(at("s", "first"), faults)])
    assert outcome.path("s") == path
    assert outcome.states["s"].is_ended
    assert len(outcome.faults) == (1 if fault else 0)
    if fault is not None:
        assert outcome.fault_log == (
            f"commit #1 (#1 of 's') by flow 'first', 's' -> 'second': {fault.value}",
        )
        retried = next(v for v in outcome.versions("s") if recovery_settings.attempt(v))
        assert recovery_settings.attempt(retried) == 1
    assert outcome.settled


def test_faults_count_per_state_and_per_run() -> None:
    per_state = replay(
        TWO_STEPS, states=[(at("a", "first"), {}), (at("b", "first"), {2: Fault.FAIL})]
    )
    assert [(f.number, f.state_ids) for f in per_state.faults] == [(4, ("b",))]
    per_run = replay(TWO_STEPS, seed=[at("a", "first"), at("b", "first")], faults={2: Fault.FAIL})
    assert [(f.number, f.state_ids) for f in per_run.faults] == [(2, ("a",))]
    skipped = replay(TWO_STEPS, states=[(at("a", "first"), {}), None, (at("a", "second"), {})])
    assert skipped.path("a") == ["first", "second", ""], "a repeated id is skipped"


def test_a_crash_in_a_background_execution_kills_the_process() -> None:
    async def parent(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        child = fs.StateCtx.new(f"{ctx.id}-child")
        await engine.do(fs.Commit(fs.Transit(child, "first")), fs.Execute(child))
        return fs.Commit(fs.End(ctx))

    flows = {**TWO_STEPS, "parent": parent}
    outcome = replay(flows, seed=at("p", "parent"), faults={3: Fault.CRASH_AFTER})
    assert "  the process crashed" in outcome.trace
    assert outcome.path("p-child") == ["first", "second", "second", ""]
    calm = replay(flows, seed=at("p", "parent"))
    assert calm.path("p-child") == ["first", "second", ""], "background work is waited for"


def test_delays_fire_on_the_virtual_clock() -> None:
    order: list[str] = []

    async def wait(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Delay(ctx, "wake", seconds=float(ctx.current.annotations["seconds"]))

    async def wake(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        order.append(ctx.id)
        return fs.Commit(fs.End(ctx))

    def waiting(state_id: str, seconds: int) -> fs.StateCtx:
        ctx = at(state_id, "wait")
        ctx.current.annotations["seconds"] = str(seconds)
        return ctx

    outcome = replay(
        {"wait": wait, "wake": wake},
        states=[(waiting("late", 7200), {}), (waiting("soon", 60), {2: Fault.FAIL})],
    )
    assert order == ["soon", "late"], "earliest due first, and a failed firing is retried"
    assert all(state.is_ended for state in outcome.states.values())
    assert any("60s after 'soon' was delayed" in line for line in outcome.trace)
    fired = outcome.versions("soon")[-2].transition.annotations
    assert "flowstate.delay.fired" in fired


def test_recovery_waits_for_retry_after_and_honours_state_settings() -> None:
    calls: list[str] = []

    async def stall(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls.append(ctx.id)
        return fs.Noop()  # leaves the state running: the recoverer must step in

    fast = at("fast", "stall")
    fs.recovery.set_retry_after(fast, 10)
    off = at("off", "stall")
    fs.recovery.disable(off)
    once = at("once", "stall")
    fs.recovery.set_max_attempts(once, 1)
    outcome = replay(
        {"stall": stall},
        states=[(fast, {}), (off, {}), (once, {})],
        invariants=[],
        retry_after=60,
    )
    assert calls.count("off") == 1, "a disabled state is never retried"
    assert calls.count("once") == 2
    assert calls.count("fast") == 4
    assert sorted(outcome.force_ended) == ["fast", "once"]
    assert outcome.states["off"].status == "running"
    # Every retry of "fast" (10 s apart) comes before the first one of "once" (after 60 s).
    retried = [line.split("'")[1] for line in outcome.trace if line.startswith("recoverer")]
    assert retried == ["fast"] * 4 + ["once"] * 2
    assert "recoverer (10s after 'fast' was last committed):" in outcome.trace
    still = at("off", "stall")
    fs.recovery.disable(still)
    with pytest.raises(InvariantError, match="'off' is still running at 'stall'"):
        replay({"stall": stall}, states=[(still, {})])


def test_force_end_and_errors() -> None:
    async def boom(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        raise RuntimeError("boom")

    outcome = replay({"boom": boom}, states=[(at("x", "boom"), {})], allowed_errors=(RuntimeError,))
    assert outcome.force_ended == ["x"]
    reason = outcome.states["x"].annotations[recovery_settings.ENDED_REASON]
    assert reason == "still running 'boom' after 3 retries"
    with pytest.raises(InvariantError, match="force-ended 'x': still running 'boom'"):
        replay(
            {"boom": boom},
            states=[(at("x", "boom"), {})],
            allowed_errors=(RuntimeError,),
            invariants=[no_state_force_ended],
        )
    with pytest.raises(RuntimeError, match="boom"):
        replay({"boom": boom}, states=[(at("x", "boom"), {})])


def test_spent_attempts_go_to_the_on_exhausted_flow() -> None:
    async def boom(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        raise RuntimeError("boom")

    async def settle(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        ctx.current.labels["settled"] = "yes"
        return fs.Commit(fs.End(ctx))

    state = at("x", "boom")
    fs.recovery.set_on_exhausted(state, "settle")
    outcome = replay(
        {"boom": boom, "settle": settle},
        states=[(state, {})],
        allowed_errors=(RuntimeError,),
        invariants=[no_state_force_ended],
    )
    assert outcome.force_ended == []
    assert outcome.states["x"].labels["settled"] == "yes"
    assert any("handed to its on_exhausted flow after 3 retries" in t for t in outcome.trace)


def test_recovery_matches_the_recoverer() -> None:
    """The deterministic recovery commits exactly what the real Recoverer commits."""

    def flows(log: list[int]) -> dict[str, fs.Flow]:
        async def flaky(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            attempt = fs.recovery.attempt(ctx.current)
            log.append(attempt)
            if ctx.id == "poison" or attempt < 2:
                raise RuntimeError("not yet")
            return fs.Commit(fs.End(ctx))

        return {"flaky": flaky}

    def job(state_id: str) -> fs.StateCtx:
        ctx = at(state_id, "flaky")
        fs.recovery.set_max_attempts(ctx, 2)
        return ctx

    def summary(history: list[fs.State]) -> dict[str, list[tuple[str, int, str]]]:
        """Each state's versions in order: where it pointed, the attempt, the end reason."""
        versions: dict[str, list[tuple[str, int, str]]] = {}
        for v in history:
            reason = v.annotations.get(recovery_settings.ENDED_REASON, "")
            versions.setdefault(v.id, []).append((v.transition.to, fs.recovery.attempt(v), reason))
        return versions

    simulated_log: list[int] = []
    outcome = replay(
        flows(simulated_log),
        seed=[job("poison"), job("late")],
        allowed_errors=(RuntimeError,),
    )

    async def with_the_recoverer() -> list[fs.State]:
        log: list[int] = []
        async with fs.Engine(MemoryDriver(), flows=flows(log)) as engine:
            for ctx in (job("poison"), job("late")):
                await engine.do(fs.Commit(fs.Noop(ctx)))
                with pytest.raises(RuntimeError):  # what the simulated worker sees too
                    await engine.execute(ctx)
            recoverer = fs.Recoverer(engine, retry_after=0.05, tick=0.02)
            async with recoverer, asyncio.timeout(20):
                while True:
                    page = await engine.get_states(latest_only=True)
                    if all(s.is_ended for s in page.states if not s.id.startswith("flowstate")):
                        break
                    await asyncio.sleep(0.02)
            history = [s async for s in engine.iter_states()]
        return [s for s in history if not s.id.startswith("flowstate.")]

    real = asyncio.run(with_the_recoverer())
    simulated = summary(list(outcome.history))
    assert summary(real) == simulated
    assert simulated == {
        "poison": [
            ("flaky", 0, ""),
            ("flaky", 1, ""),
            ("flaky", 2, ""),
            ("", 0, "still running 'flaky' after 2 retries"),
        ],
        "late": [("flaky", 0, ""), ("flaky", 1, ""), ("flaky", 2, ""), ("", 0, "")],
    }


def test_invariant_results() -> None:
    def returns_false(outcome: Outcome[None]) -> bool:
        return False

    with pytest.raises(InvariantError, match="returns_false failed: returned False"):
        replay(TWO_STEPS, seed=at("s", "first"), invariants=[returns_false])
    with pytest.raises(InvariantError, match=r"'s' went from 'first' to 'second'"):
        replay(TWO_STEPS, seed=at("s", "first"), invariants=[never_transits("first", "second")])
    replay(TWO_STEPS, seed=at("s", "first"), invariants=[never_transits("second", "first")])


def test_context_reaches_flows_and_invariants() -> None:
    def make(counter: list[str]) -> dict[str, fs.Flow]:
        async def count(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            counter.append(ctx.id)
            return fs.Commit(fs.End(ctx))

        return {"count": count}

    def counted_once(outcome: Outcome[list[str]]) -> None:
        assert outcome.context == ["s"]

    outcome = replay(make, context=list, seed=at("s", "count"), invariants=[counted_once])
    assert outcome.context == ["s"]


def test_seed_function_and_other_stores(tmp_path: Path) -> None:
    async def seed(engine: fs.Engine) -> None:
        for state_id in ("a", "b"):
            await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new(state_id), "first")))

    names = itertools.count()
    outcome = replay(
        TWO_STEPS,
        seed=seed,
        faults={1: Fault.CRASH_BEFORE},
        store=lambda: fs.open_driver(f"sqlite:///{tmp_path}/{next(names)}.db"),
    )
    assert [s.is_ended for s in outcome.states.values()] == [True, True]


def test_stops_at_max_actions() -> None:
    async def tick(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Delay(ctx, "tick", seconds=1)

    outcome = replay({"tick": tick}, seed=at("clock", "tick"), invariants=[], max_actions=4)
    assert (outcome.actions, outcome.settled) == (4, False)
    assert outcome.trace[-1] == "stopped after max_actions=4 actions"
    with pytest.raises(InvariantError, match=r"'clock' is delayed \(to 'tick'\)"):
        replay({"tick": tick}, seed=at("clock", "tick"), max_actions=4)


def test_left_over_tasks_fail_the_run() -> None:
    async def leak(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        leaked.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))
        return fs.Commit(fs.End(ctx))

    leaked: list[asyncio.Task[None]] = []
    with pytest.raises(AssertionError, match="left tasks running"):
        replay({"leak": leak}, seed=at("s", "leak"))
    assert leaked[0].cancelled()


def test_a_hanging_flow_fails_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows_module, "_PROCESS_SECONDS", 0.2)

    async def hang(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    with pytest.raises(AssertionError, match=r"worker for 's' did not finish within 0\.2 seconds"):
        replay({"hang": hang}, seed=at("s", "hang"))


def test_wrong_calls() -> None:
    with pytest.raises(TypeError, match="exactly one of"):
        replay(TWO_STEPS)
    with pytest.raises(TypeError, match="exactly one of"):
        explore(TWO_STEPS, states=fst.state_ctxs(), seed=fst.state_ctxs())
    with pytest.raises(TypeError, match="context"):
        replay(lambda c: TWO_STEPS, seed=at("s", "first"))  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_attempts"):
        replay(TWO_STEPS, seed=at("s", "first"), max_attempts=-1)
    with pytest.raises(ValueError, match="max_states"):
        explore(TWO_STEPS, states=fst.state_ctxs(), max_states=0)


@pytest.mark.anyio
async def test_not_from_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="plain"):
        replay(TWO_STEPS, seed=at("s", "first"))


# -- search and shrinking ------------------------------------------------------------------


def make_counter_flows(counts: dict[str, int]) -> dict[str, fs.Flow]:
    """Increments an outside counter before committing: not safe to repeat."""

    async def count(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        counts[ctx.id] = counts.get(ctx.id, 0) + 1
        return fs.Commit(fs.Transit(ctx, "done"))

    async def done(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    return {"count": count, "done": done}


def counted_once(outcome: Outcome[dict[str, int]]) -> None:
    assert all(n == 1 for n in outcome.context.values()), f"counted {outcome.context}"


jobs = fst.state_ctxs(
    ids=st.sampled_from(["job-1", "job-2", "job-3"]),
    labels=st.just({}),
    annotations=st.just({}),
    transitions=fst.transitions(to="count", statuses=["running"]),
)


@pytest.mark.slow
def test_explore_finds_and_shrinks_a_repeated_side_effect() -> None:
    with pytest.raises(InvariantError, match="counted_once") as info:
        explore(
            make_counter_flows,
            context=dict,
            states=jobs,
            invariants=[every_state_rests, counted_once],
            settings=SEARCH,
        )
    outcome = info.value.outcome
    assert len(outcome.faults) == 1
    assert len(outcome.states) == 1, "the other states shrank away"
    assert not outcome.faults[0].fault.applies, "a retry after an unapplied commit"
    report = "\n".join(info.value.__notes__)
    assert "replay(" in report
    assert "<-- FAULT: fail" in report


def test_explore_passes_without_faults() -> None:
    explore(
        make_counter_flows,
        context=dict,
        states=jobs,
        invariants=[every_state_rests, counted_once],
        faults=fst.fault_schedules(max_faults=0),
        settings=settings(SEARCH, max_examples=20),
    )


def test_explore_with_a_seed_strategy_and_function() -> None:
    explore(
        TWO_STEPS,
        seed=st.lists(
            st.sampled_from(["a", "b"]).map(lambda i: at(i, "first")),
            min_size=1,
            unique_by=lambda c: c.id,
        ),
        invariants=[every_state_rests, never_transits("second", "first")],
        settings=settings(SEARCH, max_examples=30),
    )

    async def seed(engine: fs.Engine) -> None:
        await engine.do(fs.Commit(fs.Noop(at("only", "first"))))

    explore(TWO_STEPS, seed=seed, settings=settings(SEARCH, max_examples=20))
