"""Committed transitions per second on the memory driver, next to in-memory state machines.

Each measured unit is a 10-step chain over many states: flowstate runs flows ``s0`` .. ``s9``
through ``engine.execute``, each step returning ``Commit(Transit(ctx, next))`` (the last one
``Commit(End(ctx))``), so every step is a committed, revision-checked, watchable version.
The baselines move plain Python objects through the same 10 steps, in memory only, with
``transitions`` (one shared machine, one model per state, the way it serves many objects) and
``python-statemachine`` (one machine per state). flowstate flows are async functions, so the
like-for-like baselines are the libraries' asyncio forms (``AsyncMachine``, and
python-statemachine with an async callback); their synchronous forms are listed too.

Run ``python benchmarks/bench_memory.py`` for the table; pytest runs a small smoke version.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import flowstate as fs

if TYPE_CHECKING:
    from collections.abc import Callable

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


def flowstate_rate(n_states: int) -> float:
    return n_states * STEPS / asyncio.run(_flowstate_run(n_states))


_NAMES = [f"s{i}" for i in range(STEPS + 1)]
_STEPS = [{"trigger": "next", "source": _NAMES[i], "dest": _NAMES[i + 1]} for i in range(STEPS)]


class _Order:
    """A plain object the ``transitions`` machines move."""


def transitions_async_rate(n_states: int) -> float:
    """``transitions``' AsyncMachine: its asyncio form, what an asyncio application uses."""
    from transitions.extensions.asyncio import AsyncMachine

    async def run() -> float:
        machine = AsyncMachine(model=None, states=_NAMES, transitions=_STEPS, initial="s0")
        models = [_Order() for _ in range(n_states)]
        for model in models:
            machine.add_model(model)
        start = time.perf_counter()
        for model in models:
            for _ in range(STEPS):
                await model.next()  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - start
        assert all(model.state == _NAMES[-1] for model in models)  # type: ignore[attr-defined]
        return elapsed

    return n_states * STEPS / asyncio.run(run())


def transitions_sync_rate(n_states: int) -> float:
    """``transitions``' plain Machine: synchronous, so no event loop in the way."""
    from transitions import Machine

    machine = Machine(model=None, states=_NAMES, transitions=_STEPS, initial="s0")
    models = [_Order() for _ in range(n_states)]
    for model in models:
        machine.add_model(model)
    start = time.perf_counter()
    for model in models:
        for _ in range(STEPS):
            model.next()  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    assert all(model.state == _NAMES[-1] for model in models)  # type: ignore[attr-defined]
    return n_states * STEPS / elapsed


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


def statemachine_async_rate(n_states: int) -> float:
    """``python-statemachine`` in its asyncio mode (an async callback, awaited events)."""
    machine_cls = _statemachine_class(with_async_callback=True)

    async def run() -> float:
        machines = [machine_cls() for _ in range(n_states)]
        for machine in machines:
            await machine.activate_initial_state()
        start = time.perf_counter()
        for machine in machines:
            for _ in range(STEPS):
                await machine.send("next")
        elapsed = time.perf_counter() - start
        assert all(m.current_state_value == _NAMES[-1] for m in machines)
        return elapsed

    return n_states * STEPS / asyncio.run(run())


def statemachine_sync_rate(n_states: int) -> float:
    """``python-statemachine`` without callbacks, synchronous."""
    machine_cls = _statemachine_class(with_async_callback=False)
    machines = [machine_cls() for _ in range(n_states)]
    start = time.perf_counter()
    for machine in machines:
        for _ in range(STEPS):
            machine.send("next")
    elapsed = time.perf_counter() - start
    assert all(m.current_state_value == _NAMES[-1] for m in machines)
    return n_states * STEPS / elapsed


BASELINE = "transitions AsyncMachine"
CONTENDERS: dict[str, Callable[[int], float]] = {
    "flowstate, memory driver": flowstate_rate,
    BASELINE: transitions_async_rate,
    "python-statemachine, async": statemachine_async_rate,
    "transitions Machine (sync)": transitions_sync_rate,
    "python-statemachine (sync)": statemachine_sync_rate,
}


def measure(n_states: int, rounds: int) -> dict[str, float]:
    """Median rates over ``rounds``, the contenders interleaved so noise hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(rounds):
        for name, rate in CONTENDERS.items():
            samples[name].append(rate(n_states))
    return {name: statistics.median(values) for name, values in samples.items()}


def report(rates: dict[str, float]) -> str:
    baseline = rates[BASELINE]
    lines = [f"{'contender':<30}{'transitions/s':>15}{'ratio':>10}"]
    for name, rate in rates.items():
        lines.append(f"{name:<30}{rate:>15,.0f}{rate / baseline:>9.2f}x")
    lines.append(f"(ratio: to {BASELINE}; only flowstate stores, revision-checks and notifies)")
    return "\n".join(lines)


def test_memory_benchmark_runs() -> None:
    """Smoke test: the benchmark's code paths work; no timing is asserted."""
    rates = measure(n_states=20, rounds=1)
    assert set(rates) == set(CONTENDERS)
    assert all(rate > 0 for rate in rates.values())
    assert BASELINE in report(rates)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"{n} states x {STEPS} steps, median of 7 rounds\n")
    print(report(measure(n_states=n, rounds=7)))
