"""Committed transitions per second on the memory driver, next to in-memory state machines.

Each measured unit is a 10-step chain over many states: flowstate runs flows ``s0`` .. ``s9``
through ``engine.execute``, each step returning ``Commit(Transit(ctx, next))`` (the last one
``Commit(End(ctx))``), so every step is a committed, revision-checked, watchable version.
The contenders move plain Python objects through the same 10 steps, in memory only, with
``transitions`` (one shared machine, one model per state, the way it serves many objects) and
``python-statemachine`` (one machine per state), in their synchronous and asyncio forms. The
baseline is the fastest of them, ``transitions``' synchronous ``Machine``: an asyncio form
costs mostly asyncio itself, so a ratio to it would flatter flowstate.

Run ``python -m benchmarks --only memory`` for the table; pytest runs a tiny smoke version.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import flowstate as fs

try:
    from benchmarks._suite import Case, Row, Settings
except ImportError:  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._suite import Case, Row, Settings

STEPS = 10


def _flows() -> dict[str, fs.Flow]:
    def step(i: int) -> fs.Flow:
        following = f"s{i + 1}"

        async def flow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            if i == STEPS - 1:
                return fs.Commit(fs.End(ctx))
            return fs.Commit(fs.Transit(ctx, following))

        return flow

    return {f"s{i}": step(i) for i in range(STEPS)}


async def _flowstate_run(n_states: int) -> float:
    """Seconds for ``n_states`` chains of STEPS committed transitions each."""
    async with fs.Engine("memory://", flows=_flows()) as engine:
        ctxs = []
        for i in range(n_states):
            ctx = fs.StateCtx.new(f"order-{i}")
            await engine.do(fs.Commit(fs.Transit(ctx, "s0")))
            ctxs.append(ctx)
        start = time.perf_counter()
        for ctx in ctxs:
            result = await engine.execute(ctx)
            assert result.status == "ended"
            assert result.steps == STEPS
        elapsed = time.perf_counter() - start
        head = await engine.driver.head_rev()
        assert head == n_states * (STEPS + 1), "every step was committed"
        return elapsed


def _states(n: int) -> int:
    return max(1, n // STEPS)


def flowstate_seconds(n: int) -> float:
    """Seconds for ``n`` steps: ``n // STEPS`` chains through ``engine.execute``."""
    return asyncio.run(_flowstate_run(_states(n)))


_NAMES = [f"s{i}" for i in range(STEPS + 1)]
_STEPS = [{"trigger": "next", "source": _NAMES[i], "dest": _NAMES[i + 1]} for i in range(STEPS)]


class _Order:
    """A plain object the ``transitions`` machines move."""


def transitions_async_seconds(n: int) -> float:
    """``transitions``' AsyncMachine: its asyncio form, what an asyncio application uses."""
    from transitions.extensions.asyncio import AsyncMachine

    async def run() -> float:
        machine = AsyncMachine(model=None, states=_NAMES, transitions=_STEPS, initial="s0")
        models = [_Order() for _ in range(_states(n))]
        for model in models:
            machine.add_model(model)
        start = time.perf_counter()
        for model in models:
            for _ in range(STEPS):
                await model.next()  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - start
        assert all(model.state == _NAMES[-1] for model in models)  # type: ignore[attr-defined]
        return elapsed

    return asyncio.run(run())


def transitions_sync_seconds(n: int) -> float:
    """``transitions``' plain Machine: synchronous, so no event loop in the way."""
    from transitions import Machine

    machine = Machine(model=None, states=_NAMES, transitions=_STEPS, initial="s0")
    models = [_Order() for _ in range(_states(n))]
    for model in models:
        machine.add_model(model)
    start = time.perf_counter()
    for model in models:
        for _ in range(STEPS):
            model.next()  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    assert all(model.state == _NAMES[-1] for model in models)  # type: ignore[attr-defined]
    return elapsed


def _statemachine_class(with_async_callback: bool) -> type[Any]:
    from statemachine import State, StateMachine

    states = {name: State(initial=(i == 0), final=(i == STEPS)) for i, name in enumerate(_NAMES)}
    event = states["s0"].to(states["s1"])
    for i in range(1, STEPS):
        event |= states[_NAMES[i]].to(states[_NAMES[i + 1]])
    namespace: dict[str, object] = {**states, "next": event}
    if with_async_callback:

        async def on_next(self: object) -> None:
            """An async callback puts the machine in its asyncio mode."""

        namespace["on_next"] = on_next
    return type("OrderMachine", (StateMachine,), namespace)


def statemachine_async_seconds(n: int) -> float:
    """``python-statemachine`` in its asyncio mode (an async callback, awaited events)."""
    machine_cls = _statemachine_class(with_async_callback=True)

    async def run() -> float:
        machines = [machine_cls() for _ in range(_states(n))]
        for machine in machines:
            await machine.activate_initial_state()
        start = time.perf_counter()
        for machine in machines:
            for _ in range(STEPS):
                await machine.send("next")
        elapsed = time.perf_counter() - start
        assert all(m.current_state_value == _NAMES[-1] for m in machines)
        return elapsed

    return asyncio.run(run())


def statemachine_sync_seconds(n: int) -> float:
    """``python-statemachine`` without callbacks, synchronous."""
    machine_cls = _statemachine_class(with_async_callback=False)
    machines = [machine_cls() for _ in range(_states(n))]
    start = time.perf_counter()
    for machine in machines:
        for _ in range(STEPS):
            machine.send("next")
    elapsed = time.perf_counter() - start
    assert all(m.current_state_value == _NAMES[-1] for m in machines)
    return elapsed


GROUP = f"memory, {STEPS}-step chains, sequential"
BASELINE = "transitions Machine (sync)"


def cases() -> list[Case]:
    return [
        Case(GROUP, BASELINE, transitions_sync_seconds, pilot=2000, step=STEPS),
        Case(
            GROUP,
            "flowstate, memory driver",
            flowstate_seconds,
            baseline=BASELINE,
            target=2.0,
            pilot=2000,
            step=STEPS,
            note="every step committed, revision-checked, watchable",
        ),
        Case(
            GROUP,
            "transitions AsyncMachine",
            transitions_async_seconds,
            baseline=BASELINE,
            pilot=2000,
            step=STEPS,
        ),
        Case(
            GROUP,
            "python-statemachine (sync)",
            statemachine_sync_seconds,
            baseline=BASELINE,
            pilot=500,
            step=STEPS,
        ),
        Case(
            GROUP,
            "python-statemachine, async",
            statemachine_async_seconds,
            baseline=BASELINE,
            pilot=500,
            step=STEPS,
        ),
    ]


def suite(settings: Settings) -> list[Row]:
    return settings.run(cases())


def test_memory_benchmark_runs() -> None:
    """Smoke test: every contender runs (tiny sizes, one round); no timing is asserted."""
    rows = suite(Settings.smoke())
    assert [row.contender for row in rows] == [case.contender for case in cases()]
    assert all(row.value > 0 for row in rows)


if __name__ == "__main__":
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "memory", *sys.argv[1:]]))
