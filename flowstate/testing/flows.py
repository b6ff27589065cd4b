"""Explore your flows under injected faults, and check your invariants after every run.

:func:`explore` lets hypothesis pick the initial states and the faults, runs the flows the
way a deployment runs them (workers execute the states, the recoverer retries the ones that
stall and force-ends them after their last attempt, the delayer fires delays), checks your
invariants on what the store holds at the end, and on failure shrinks to the fewest states
and faults that still break an invariant::

    from flowstate.testing.flows import every_state_rests, explore

    def test_orders_survive_faults():
        explore(
            make_flows,                 # takes the context, returns the flows
            context=Shop,               # a fresh fake outside world per run
            states=orders(),            # a strategy of one new StateCtx
            invariants=[every_state_rests, charged_at_most_once],
        )

:func:`replay` runs once with given states and faults: for a regression test of a failure
:func:`explore` found, or inside your own ``@given`` test. Both run each example in an
event loop of their own, so call them from plain (not async) tests.

How a run goes:

1. The initial states are committed as they are, without faults.
2. A worker executes each running state, in commit order, each in a process of its own: a
   fresh :class:`~flowstate.Engine` over a :class:`~flowstate.drivers.faulty.FaultyDriver`
   on the shared store. A commit the faults pick fails, conflicts or crashes the process.
3. Then time moves on, event by event, on a virtual clock: a running state is retried
   ``retry_after`` seconds after its last commit (the recoverer's rules exactly: the attempt
   counter in the transition, force-end after ``max_attempts`` retries, per-state settings
   from :mod:`flowstate.recovery`), and a delay fires when it is due (the delayer's rules).
   Each action runs in a new process, under the same faults.
4. When nothing is left to do (or after ``max_actions`` actions) the invariants run on the
   :class:`Outcome`: every state version, the latest ones, the faults, a readable trace.

Faults are given per initial state, ``{n: Fault}`` for the state's n-th commit (with
``states=``), or per run, ``{n: Fault}`` for the run's n-th commit (with ``seed=``). Seeding
is not counted. Nothing waits for the wall clock.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, overload

from attrs import define, field, frozen
from hypothesis import currently_in_test_context, event, given, note
from hypothesis import settings as Settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from flowstate._commands import Commit, End, Noop
from flowstate._engine import Engine, Flow, FlowRegistry
from flowstate._query import StatesQuery
from flowstate._state import DELAY_TO_ANNOTATION, State, StateCtx
from flowstate.drivers.base import CommitRequest, DelayedState, Driver
from flowstate.drivers.faulty import (
    Fault,
    FaultSchedule,
    FaultyDriver,
    InjectedFault,
    SimulatedCrashError,
)
from flowstate.drivers.memory import MemoryDriver
from flowstate.errors import ConflictError, DriverError
from flowstate.recovery import _settings as recovery
from flowstate.recovery._services import INTERNAL_PREFIX, fire_step, recovery_step
from flowstate.testing.strategies import fault_schedules

if TYPE_CHECKING:
    from flowstate._engine import ExecuteResult

__all__ = [
    "Fault",
    "FaultSchedule",
    "Faults",
    "Invariant",
    "InvariantError",
    "Outcome",
    "Seed",
    "SeedFunction",
    "StoreFactory",
    "every_state_rests",
    "explore",
    "never_transits",
    "no_state_force_ended",
    "replay",
]

C = TypeVar("C")

#: Which commits fail and how: commit number (from 1) to :class:`Fault`.
Faults: TypeAlias = Mapping[int, Fault]
#: Seeds the store through a fault-free engine: ``async def seed(engine) -> None``.
SeedFunction: TypeAlias = Callable[[Engine], Awaitable[object]]
#: What ``explore(seed=...)`` takes: a strategy of new ``StateCtx`` objects (one or a
#: sequence), or a seed function.
Seed: TypeAlias = SearchStrategy[StateCtx] | SearchStrategy[Sequence[StateCtx]] | SeedFunction
#: Returns a fresh, unopened driver on an empty store (or an awaitable of one).
StoreFactory: TypeAlias = Callable[[], Driver | Awaitable[Driver]]


@frozen
class Outcome(Generic[C]):
    """What a run left behind; invariants check it.

    Attributes:
        states: The latest version of every state, by id (flowstate's own states excluded).
        history: Every committed version, in revision order (seed versions included).
        faults: The faults injected, in order (numbered across the run).
        fault_log: Each injected fault described: the commit of which state, made by
            what, and how it failed.
        trace: What happened, one line per commit and per process event.
        context: The context object the flows of this run were made with.
        actions: How many recoverer and delayer actions ran.
        settled: False when the run stopped at ``max_actions`` with work still due.
    """

    states: Mapping[str, State]
    history: Sequence[State]
    faults: Sequence[InjectedFault]
    fault_log: Sequence[str]
    trace: Sequence[str]
    context: C
    actions: int = 0
    settled: bool = True

    def versions(self, state_id: str) -> list[State]:
        """Every version of one state, oldest first."""
        return [state for state in self.history if state.id == state_id]

    def path(self, state_id: str) -> list[str]:
        """The flow each version of one state pointed to, oldest first (``""``: ended)."""
        return [state.transition.to for state in self.versions(state_id)]

    @property
    def force_ended(self) -> list[str]:
        """Ids of the states the recoverer force-ended after their last attempt."""
        return [
            state_id
            for state_id, state in self.states.items()
            if state.is_ended and recovery.ENDED_REASON in state.annotations
        ]


#: An invariant: a function of the :class:`Outcome` that raises ``AssertionError`` (a plain
#: ``assert``) or returns False when it does not hold.
Invariant: TypeAlias = Callable[[Outcome[C]], object]


class InvariantError(AssertionError):
    """An invariant did not hold at the end of a run.

    Attributes:
        invariant: The invariant's name.
        outcome: The run's outcome; ``outcome.faults`` are the faults that broke it.
    """

    def __init__(self, invariant: str, detail: str, outcome: Outcome[Any]) -> None:
        self.invariant = invariant
        self.outcome = outcome
        faults = "".join(f"\n  {line}" for line in outcome.fault_log) or " none"
        super().__init__(f"invariant {invariant} failed: {detail}\ninjected faults:{faults}")


# -- ready-made invariants -----------------------------------------------------------------


def every_state_rests(outcome: Outcome[Any]) -> None:
    """Every state ended or is paused: none is left running or waiting on a delay."""
    restless = [
        f"{state_id!r} is {_status(state)}"
        for state_id, state in outcome.states.items()
        if not (state.is_ended or (state.is_paused and not state.is_delayed))
    ]
    assert not restless, "; ".join(restless)


def no_state_force_ended(outcome: Outcome[Any]) -> None:
    """No state was force-ended by the recoverer: every one came to rest through its flows."""
    ended = outcome.force_ended
    reasons = [f"{i!r}: {outcome.states[i].annotations[recovery.ENDED_REASON]}" for i in ended]
    assert not ended, "force-ended " + "; ".join(reasons)


def never_transits(from_flow: str, to_flow: str) -> Invariant[Any]:
    """An invariant: no state ever goes straight from flow ``from_flow`` to ``to_flow``
    (``""`` stands for ended), e.g. ``never_transits("refund", "ship")``.
    """

    def check(outcome: Outcome[Any]) -> None:
        for state_id in outcome.states:
            path = outcome.path(state_id)
            for before, after in itertools.pairwise(path):
                assert (before, after) != (from_flow, to_flow), (
                    f"{state_id!r} went from {from_flow!r} to {to_flow!r}: {path}"
                )

    check.__name__ = check.__qualname__ = f"never_transits({from_flow!r}, {to_flow!r})"
    return check


def _status(state: State) -> str:
    if state.is_delayed:
        return f"delayed (to {state.transition.annotations.get(DELAY_TO_ANNOTATION)!r})"
    if state.is_paused:
        return f"paused at {state.transition.to!r}"
    if state.is_ended:
        return "ended"
    attempt = recovery.attempt(state)
    retried = f", retry {attempt}" if attempt else ""
    return f"still running at {state.transition.to!r}{retried}"


# -- the run ---------------------------------------------------------------------------------


_NO_FAULTS = FaultSchedule()
# Wall-clock bound on one simulated process: flows on a test store finish in milliseconds,
# so a process still running after this waits for something that will not happen.
_PROCESS_SECONDS = 10.0

#: Initial states, each with the faults of its own commits; or a seed function.
_Seeding: TypeAlias = Sequence[tuple[StateCtx, Faults]] | SeedFunction


@define
class _Config:
    """Everything about a run but the initial states and the faults."""

    flows: Mapping[str, Flow] | Callable[[Any], Mapping[str, Flow]]
    context: Callable[[], Any] | None
    invariants: tuple[Invariant[Any], ...]
    max_attempts: int
    retry_after: float
    max_actions: int
    allowed_errors: tuple[type[Exception], ...]
    store: StoreFactory

    def check(self, seeding: _Seeding, run_faults: Faults) -> Outcome[Any]:
        """One run in an event loop of its own, then the invariants."""
        __tracebackhide__ = True  # pytest: the report starts at the caller's frame
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "explore() and replay() run each example in an event loop of their own; "
                "call them from a plain (not async) test"
            )
        context = self.context() if self.context is not None else None
        flows = self.flows if isinstance(self.flows, Mapping) else self.flows(context)
        run = _Run(self, flows, context, FaultSchedule(run_faults))
        try:
            with asyncio.Runner() as runner:
                outcome = runner.run(run.main(seeding))
        finally:
            if currently_in_test_context():
                note("\n".join(run.trace))
        if currently_in_test_context():
            event(f"faults injected: {len(outcome.faults)}")
            for fault in outcome.faults:
                event(f"fault: {fault.fault.value}")
            if outcome.force_ended:
                event("some state was force-ended")
            if not outcome.settled:
                event("stopped at max_actions")
        for invariant in self.invariants:
            name = getattr(invariant, "__qualname__", None) or repr(invariant)
            try:
                result = invariant(outcome)
            except AssertionError as exc:
                raise InvariantError(name, str(exc) or "assertion failed", outcome) from exc
            if result is False:
                raise InvariantError(name, "returned False", outcome)
        return outcome


@define
class _Pending:
    """Something the recoverer or the delayer will do when the virtual clock reaches ``due``."""

    due: float
    rev: int
    state: State
    delay: DelayedState | None = None


@define
class _Run:
    config: _Config
    flows: Mapping[str, Flow]
    context: Any
    run_faults: FaultSchedule
    state_faults: dict[str, FaultSchedule] = field(factory=dict)
    state_commits: collections.Counter[str] = field(factory=collections.Counter)
    trace: list[str] = field(factory=list)
    faults: list[InjectedFault] = field(factory=list)
    fault_log: list[str] = field(factory=list)
    registry: FlowRegistry = field(init=False)
    commits: int = 0
    actor: str = "seed"
    # The virtual clock runs ahead of the wall clock by `offset` seconds; each version
    # remembers the virtual time it was committed at.
    offset: float = 0.0
    times: dict[int, float] = field(factory=dict)
    seen_rev: int = 0

    def __attrs_post_init__(self) -> None:
        self.registry = FlowRegistry({fid: self._traced(fid, fn) for fid, fn in self.flows.items()})

    def _traced(self, flow_id: str, fn: Flow) -> Flow:
        async def flow(ctx: StateCtx, engine: Engine) -> Any:
            self.actor = f"flow {flow_id!r}"
            return await fn(ctx, engine)

        return flow

    def _decide(self, number: int, request: CommitRequest) -> Fault | None:
        # Commits are counted per run and per state, across every simulated process, so
        # the numbers here, not the FaultyDriver's own, are the ones faults refer to.
        self.commits += 1
        fault = self.run_faults.get(self.commits)
        where = f"commit #{self.commits}"
        for write in request.writes:
            state_id = write.state.id
            self.state_commits[state_id] += 1
            nth = self.state_commits[state_id]
            planned = self.state_faults.get(state_id, _NO_FAULTS).get(nth)
            if fault is None and planned is not None:
                fault = planned
                where = f"commit #{self.commits} (#{nth} of {state_id!r})"
        changes = ", ".join(_describe_write(w.state) for w in request.writes)
        line = f"  {where} by {self.actor}: {changes}"
        if fault is not None:
            ids = tuple(w.state.id for w in request.writes)
            self.faults.append(InjectedFault(self.commits, fault, ids))
            self.fault_log.append(f"{where} by {self.actor}, {changes}: {fault.value}")
            line += f"  <-- FAULT: {fault.value}"
        self.trace.append(line)
        return fault

    async def main(self, seeding: _Seeding) -> Outcome[Any]:
        made = self.config.store()
        store = await made if inspect.isawaitable(made) else made
        try:
            await store.open()
            await self._seed(store, seeding)
            for state in await self._running(store):
                await self._process(store, f"worker for {state.id!r}", self._worker(state))
            actions, settled = await self._recover_and_fire(store)
            outcome = await self._outcome(store, actions, settled)
        finally:
            await store.aclose()
        await self._check_no_tasks_left()
        return outcome

    async def _seed(self, store: Driver, seeding: _Seeding) -> None:
        async with Engine(store) as engine:
            if callable(seeding):
                await seeding(engine)
            else:
                for ctx, faults in seeding:
                    self.state_faults[ctx.id] = FaultSchedule(faults)
                    # Hypothesis prints the drawn states in failure reports: leave them as drawn.
                    await engine.do(Commit(Noop(ctx.copy())))
        for state in await self._new_versions(store):
            self.trace.append(f"seed: {_describe_write(state)}")

    async def _new_versions(self, store: Driver) -> list[State]:
        """Versions committed since the last call; stamps each with its virtual time."""
        found: list[State] = []
        while True:
            page = await store.get_states(StatesQuery(since_rev=self.seen_rev, limit=500))
            for state in page.states:
                assert state.committed_at is not None
                self.times[state.rev] = state.committed_at.timestamp() + self.offset
                self.seen_rev = state.rev
            found += page.states
            if not page.more:
                return found

    async def _latest(self, store: Driver) -> list[State]:
        await self._new_versions(store)
        latest: list[State] = []
        query = StatesQuery(latest_only=True, limit=500)
        while True:
            page = await store.get_states(query)
            latest += [s for s in page.states if not s.id.startswith(INTERNAL_PREFIX)]
            if not page.more:
                return latest
            query = query.replace(since_rev=page.states[-1].rev)

    async def _running(self, store: Driver) -> list[State]:
        return [s for s in await self._latest(store) if s.status == "running" and not s.is_delayed]

    def _worker(self, state: State) -> Callable[[Engine], Awaitable[None]]:
        async def work(engine: Engine) -> None:
            ctx = await engine.get_state(state.id)
            await self._execute(engine, ctx, f"worker for {state.id!r}")

        return work

    async def _process(
        self, store: Driver, actor: str, work: Callable[[Engine], Awaitable[None]], when: str = ""
    ) -> None:
        """Run ``work`` in a simulated process: its own engine over a FaultyDriver."""
        self.actor = actor
        self.trace.append(f"{actor}{when}:")
        crashed = False
        try:
            async with asyncio.timeout(_PROCESS_SECONDS):
                try:
                    driver = FaultyDriver(store, self._decide)
                    async with Engine(driver, flows=self.registry) as engine:
                        await work(engine)
                        await self._settle(engine)
                except* SimulatedCrashError:
                    # A crash in a background execution lands here too: it cancels the task
                    # that owns the engine, and the engine's task group hands it on.
                    crashed = True
        except TimeoutError:
            self.trace.append(f"  still running after {_PROCESS_SECONDS:g}s of wall time")
            raise AssertionError(
                f"{actor} did not finish within {_PROCESS_SECONDS:g} seconds: "
                "a flow waits for something that does not happen"
            ) from None
        if crashed:
            self.trace.append("  the process crashed")
        await self._new_versions(store)

    async def _settle(self, engine: Engine) -> None:
        """Let executions the flows started in the background finish, as a live process would."""
        # The engine keeps no public handle on them; they are its only tasks.
        while pending := [task for task in engine._tasks if not task.done()]:
            await asyncio.wait(pending)

    async def _execute(
        self, engine: Engine, ctx: StateCtx, who: str, claim: str | None = None
    ) -> None:
        result: ExecuteResult | None = None
        try:
            result = await engine.execute(ctx, claim=claim)
        except (DriverError, ConflictError) as exc:
            # What a store can answer in production: the worker gives up and the state waits
            # for the recoverer.
            self.trace.append(f"  {who} stopped: {type(exc).__name__}: {exc}")
        except Exception as exc:
            if not isinstance(exc, self.config.allowed_errors):
                self.trace.append(f"  {who} raised {type(exc).__name__}: {exc}")
                raise
            self.trace.append(f"  {who} raised {type(exc).__name__} (allowed): {exc}")
        if result is not None:
            self.trace.append(f"  {who}: {result.status} after {result.steps} flow call(s)")

    # -- recoverer and delayer, on the virtual clock ----------------------------------------

    async def _recover_and_fire(self, store: Driver) -> tuple[int, bool]:
        for actions in range(self.config.max_actions):
            pending = await self._pending(store)
            if not pending:
                return actions, True
            nxt = min(pending, key=lambda p: (p.due, p.rev))
            self.offset = max(self.offset, nxt.due - time.time())
            # Commit times have millisecond precision: round off the noise that leaves.
            seconds = round(nxt.due - self.times[nxt.rev], 2)
            if nxt.delay is not None:
                when = f" ({seconds:g}s after {nxt.state.id!r} was delayed)"
                await self._process(store, "delayer", self._fire(nxt.delay), when)
            else:
                when = f" ({seconds:g}s after {nxt.state.id!r} was last committed)"
                await self._process(store, "recoverer", self._recover(nxt.state), when)
        pending = await self._pending(store)
        if pending:
            self.trace.append(f"stopped after max_actions={self.config.max_actions} actions")
        return self.config.max_actions, not pending

    async def _pending(self, store: Driver) -> list[_Pending]:
        latest = {s.id: s for s in await self._latest(store)}
        pending = [
            _Pending(
                self.times[s.rev] + recovery.retry_after_of(s, self.config.retry_after), s.rev, s
            )
            for s in latest.values()
            if s.status == "running" and not s.is_delayed and not recovery.is_disabled(s)
        ]
        since = 0
        while True:
            page = await store.get_delays(since_rev=since, limit=500)
            for delayed in page.delays:
                since = delayed.rev
                state = latest.get(delayed.state.id)
                if state is not None and state.rev == delayed.rev:
                    # A delay counts from its commit: shift it by the clock's offset then.
                    assert delayed.state.committed_at is not None
                    shift = self.times[delayed.rev] - delayed.state.committed_at.timestamp()
                    due = delayed.at.timestamp() + shift
                    pending.append(_Pending(due, delayed.rev, state, delayed))
            if not page.more:
                return pending

    def _recover(self, stalled: State) -> Callable[[Engine], Awaitable[None]]:
        """The Recoverer's retry-or-force-end of one stalled state, to the letter."""

        async def work(engine: Engine) -> None:
            state_id = stalled.id
            # As the Recoverer does: commit against the version it found, no second read.
            ctx = StateCtx.of(stalled)
            done = recovery.attempt(stalled)
            step = recovery_step(ctx, self.config.max_attempts, claim="recoverer")
            try:
                await engine.do(Commit(step))
            except ConflictError:
                self.trace.append(f"  retry of {state_id!r} lost a conflict")
                return
            except DriverError as exc:
                self.trace.append(f"  could not recover {state_id!r} now: {exc}")
                return
            if isinstance(step, End):
                self.trace.append(f"  force-ended {state_id!r} after {done} retries")
                return
            if step.to != stalled.transition.to:
                what = f"{state_id!r} handed to its on_exhausted flow after {done} retries"
                await self._execute(engine, ctx, what, claim="recoverer")
                return
            await self._execute(engine, ctx, f"retry {done + 1} of {state_id!r}", "recoverer")

        return work

    def _fire(self, delayed: DelayedState) -> Callable[[Engine], Awaitable[None]]:
        """The Delayer's firing of one due delay, to the letter."""

        async def work(engine: Engine) -> None:
            state_id = delayed.state.id
            # As the Delayer does: commit against the version the delay is bound to.
            ctx = StateCtx.of(delayed.state)
            try:
                await engine.do(Commit(fire_step(ctx, delayed, claim="delayer")))
            except ConflictError:
                self.trace.append(f"  the delay of {state_id!r} lost a conflict")
                return
            except DriverError as exc:
                self.trace.append(f"  could not fire the delay of {state_id!r} now: {exc}")
                return
            await self._execute(engine, ctx, f"delay of {state_id!r}", claim="delayer")

        return work

    # -- the end -----------------------------------------------------------------------------

    async def _outcome(self, store: Driver, actions: int, settled: bool) -> Outcome[Any]:
        history: list[State] = []
        query = StatesQuery(limit=500)
        while True:
            page = await store.get_states(query)
            history += [s for s in page.states if not s.id.startswith(INTERNAL_PREFIX)]
            if not page.more:
                break
            query = query.replace(since_rev=page.states[-1].rev)
        latest = {state.id: state for state in history}
        return Outcome(
            states=latest,
            history=tuple(history),
            faults=tuple(self.faults),
            fault_log=tuple(self.fault_log),
            trace=tuple(self.trace),
            context=self.context,
            actions=actions,
            settled=settled,
        )

    async def _check_no_tasks_left(self) -> None:
        me = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not me and not task.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
            raise AssertionError(f"the flows left tasks running: {left}")


def _describe_write(state: State) -> str:
    name = repr(state.id)
    to = state.transition.to
    if state.is_delayed:
        return f"{name} -> delay to {state.transition.annotations.get(DELAY_TO_ANNOTATION)!r}"
    if not to:
        forced = " (force-ended)" if recovery.ENDED_REASON in state.annotations else ""
        return f"{name} -> end{forced}"
    if state.is_paused:
        return f"{name} -> paused at {to!r}"
    attempt = recovery.attempt(state)
    retry = f" (retry {attempt})" if attempt else ""
    return f"{name} -> {to!r}{retry}"


# -- entry points ----------------------------------------------------------------------------


def _config(
    flows: Mapping[str, Flow] | Callable[[Any], Mapping[str, Flow]],
    context: Callable[[], Any] | None,
    invariants: Iterable[Invariant[Any]],
    max_attempts: int,
    retry_after: float,
    max_actions: int,
    allowed_errors: tuple[type[Exception], ...],
    store: StoreFactory | None,
) -> _Config:
    if not isinstance(flows, Mapping) and not callable(flows):
        raise TypeError(f"flows must be a mapping of flows or a factory, not {flows!r}")
    if not isinstance(flows, Mapping) and context is None:
        raise TypeError("a flows factory takes the context: pass context=...")
    if type(max_attempts) is not int or max_attempts < 0:
        raise ValueError(f"max_attempts must be an int >= 0, not {max_attempts!r}")
    if not retry_after > 0:
        raise ValueError(f"retry_after must be positive, not {retry_after!r}")
    if type(max_actions) is not int or max_actions < 0:
        raise ValueError(f"max_actions must be an int >= 0, not {max_actions!r}")
    return _Config(
        flows=flows,
        context=context,
        invariants=tuple(invariants),
        max_attempts=max_attempts,
        retry_after=float(retry_after),
        max_actions=max_actions,
        allowed_errors=tuple(allowed_errors),
        store=store if store is not None else MemoryDriver,
    )


@overload
def explore(
    flows: Mapping[str, Flow],
    *,
    states: SearchStrategy[StateCtx] | None = None,
    max_states: int = 3,
    seed: Seed | None = None,
    faults: SearchStrategy[Faults] | None = None,
    invariants: Iterable[Invariant[None]] = ...,
    context: None = None,
    max_attempts: int = 3,
    retry_after: float = 120.0,
    max_actions: int = 50,
    allowed_errors: tuple[type[Exception], ...] = (),
    store: StoreFactory | None = None,
    settings: Settings | None = None,
) -> None: ...


@overload
def explore(
    flows: Mapping[str, Flow] | Callable[[C], Mapping[str, Flow]],
    *,
    states: SearchStrategy[StateCtx] | None = None,
    max_states: int = 3,
    seed: Seed | None = None,
    faults: SearchStrategy[Faults] | None = None,
    invariants: Iterable[Invariant[C]] = ...,
    context: Callable[[], C],
    max_attempts: int = 3,
    retry_after: float = 120.0,
    max_actions: int = 50,
    allowed_errors: tuple[type[Exception], ...] = (),
    store: StoreFactory | None = None,
    settings: Settings | None = None,
) -> None: ...


def explore(
    flows: Mapping[str, Flow] | Callable[[Any], Mapping[str, Flow]],
    *,
    states: SearchStrategy[StateCtx] | None = None,
    max_states: int = 3,
    seed: Seed | None = None,
    faults: SearchStrategy[Faults] | None = None,
    invariants: Iterable[Invariant[Any]] = (every_state_rests,),
    context: Callable[[], Any] | None = None,
    max_attempts: int = 3,
    retry_after: float = 120.0,
    max_actions: int = 50,
    allowed_errors: tuple[type[Exception], ...] = (),
    store: StoreFactory | None = None,
    settings: Settings | None = None,
) -> None:
    """Search for initial states and faults that break an invariant.

    Runs the flows once per hypothesis example (see the module docstring for how a run
    goes) and checks every invariant on the outcome. On failure, hypothesis shrinks the
    example and reports it as the ``replay(...)`` call that reproduces it, followed by the
    trace of the shrunk run; the error raised is an :class:`InvariantError`, or whatever a
    flow raised. Call it from a plain (not async) test, not from inside ``@given``.

    Give exactly one of ``states`` and ``seed``.

    Args:
        flows: The flows, by id; or a function that makes them from the context.
        states: A strategy of one new ``StateCtx``, committed as it is (set
            ``ctx.current.transition`` to where it starts). Each example draws 1 to
            ``max_states`` of them with distinct ids, each with faults on its own commits:
            this shrinks best.
        max_states: The most initial states per example, with ``states``.
        seed: Instead of ``states``: a strategy of new ``StateCtx`` objects (one or a
            sequence, for states that belong together), or an async function that seeds
            the store through the fault-free engine it is given. Faults then refer to the
            run's commit numbers.
        faults: The fault schedules to draw, a strategy of ``{n: Fault}`` (default:
            :func:`~flowstate.testing.strategies.fault_schedules`: every kind; with
            ``states``, each of a state's first 8 commits fails with probability 0.25, at
            most 2 of them; with ``seed``, each of the run's first 30 commits with
            probability 0.1, at most 3). ``fault_schedules(max_faults=0)``: no faults.
        invariants: Functions of the :class:`Outcome` that ``assert`` (or return False).
            Default: :func:`every_state_rests`.
        context: Makes a fresh context per run (fakes of the world your flows act on:
            payment gateway, inventory...). ``flows`` (if a function) gets it, and the
            invariants as ``outcome.context``.
        max_attempts: The recoverer's default attempt limit (``Recoverer(max_attempts=)``).
        retry_after: The recoverer's default seconds before a retry, on the virtual clock.
        max_actions: Stop after this many recoverer and delayer actions (a flow that loops
            forever would otherwise never stop).
        allowed_errors: Exceptions flows may raise: like a worker crash, the state waits
            for the recoverer. ``DriverError`` and ``ConflictError`` always are; any other
            exception fails the example.
        store: Makes the fresh, unopened driver each run uses (default: ``MemoryDriver``).
        settings: Hypothesis settings. By default, the current profile's, with at least
            300 examples, no deadline, and one failure reported.

    Raises:
        InvariantError: The shrunk example broke an invariant.
        TypeError: Not exactly one of ``states`` and ``seed``, or a flows factory without
            a ``context``.
        Exception: The shrunk example made a flow raise an exception that is not allowed.
    """
    __tracebackhide__ = True  # pytest: the report starts at the caller's frame
    config = _config(
        flows, context, invariants, max_attempts, retry_after, max_actions, allowed_errors, store
    )
    if (states is None) == (seed is None):
        raise TypeError("explore needs exactly one of states= and seed=")
    if type(max_states) is not int or max_states < 1:
        raise ValueError(f"max_states must be an int >= 1, not {max_states!r}")
    test: Callable[[], None]
    if states is not None:
        state = st.tuples(states, faults if faults is not None else fault_schedules())
        # Optional slots rather than a list: hypothesis drops a state (and its faults) by
        # changing the one choice of its slot, which it tries early and often, where deleting
        # a list element needs a whole run of choices removed at once.
        slots = st.tuples(*[st.none() | state] * max_states).filter(any)

        def replay_states(states: Sequence[tuple[StateCtx, Faults] | None]) -> None:
            config.check(_distinct_states(states), {})

        test = given(states=slots)(_named_replay(replay_states))
    else:
        assert seed is not None
        schedules = (
            faults if faults is not None else fault_schedules(max_faults=3, horizon=30, rate=0.1)
        )
        if isinstance(seed, SearchStrategy):

            def replay_seed(seed: StateCtx | Sequence[StateCtx], faults: Faults) -> None:
                config.check(_unfaulted(seed), faults)

            test = given(seed=seed, faults=schedules)(_named_replay(replay_seed))
        else:
            seed_function = seed

            def replay_function(faults: Faults) -> None:
                config.check(seed_function, faults)

            test = given(faults=schedules)(_named_replay(replay_function))
    chosen = settings if settings is not None else _default_settings()
    test = chosen(test)
    # Hypothesis keys its example database by the test function's source, which is the same
    # for every call of explore: add what tells the calls apart, as hypothesis.stateful does.
    inner = test.hypothesis.inner_test  # type: ignore[attr-defined]
    inner._hypothesis_internal_add_digest = _digest(
        flows, states if states is not None else seed, config.invariants
    )
    test()


#: Examples explore tries at least, unless given settings: a search for faults that break
#: flows needs more than the 100 of a default hypothesis profile to be dependable, and
#: examples of flows on the memory driver take milliseconds.
_EXPLORE_EXAMPLES = 300


def _default_settings() -> Settings:
    profile = Settings()
    return Settings(
        max_examples=max(_EXPLORE_EXAMPLES, profile.max_examples),
        deadline=None,
        report_multiple_bugs=False,
    )


def _distinct_states(
    slots: Iterable[tuple[StateCtx, Faults] | None],
) -> list[tuple[StateCtx, Faults]]:
    """The states of the filled slots, each id once (a later state with an id already
    taken is left out)."""
    taken: set[str] = set()
    chosen = []
    for slot in slots:
        if slot is not None and slot[0].id not in taken:
            taken.add(slot[0].id)
            chosen.append(slot)
    return chosen


def _unfaulted(seed: StateCtx | Sequence[StateCtx]) -> list[tuple[StateCtx, Faults]]:
    ctxs = [seed] if isinstance(seed, StateCtx) else list(seed)
    return [(ctx, {}) for ctx in ctxs]


def _named_replay(function: Callable[..., None]) -> Callable[..., None]:
    # Hypothesis reports the failing example as a call of the test function: name it after
    # the call that reproduces it.
    function.__name__ = function.__qualname__ = "replay"
    return function


def _digest(flows: object, seed: object, invariants: Iterable[object]) -> bytes:
    def name(obj: object) -> str:
        module = getattr(obj, "__module__", "")
        return f"{module}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"

    parts = [name(flows), repr(seed) if isinstance(seed, SearchStrategy) else name(seed)]
    if isinstance(flows, Mapping):
        parts += [f"{fid}={name(fn)}" for fid, fn in flows.items()]
    parts += [name(invariant) for invariant in invariants]
    return hashlib.sha256("\n".join(parts).encode()).digest()


@overload
def replay(
    flows: Mapping[str, Flow],
    *,
    states: Sequence[tuple[StateCtx, Faults] | None] | None = None,
    seed: StateCtx | Sequence[StateCtx] | SeedFunction | None = None,
    faults: Faults | None = None,
    invariants: Iterable[Invariant[None]] = ...,
    context: None = None,
    max_attempts: int = 3,
    retry_after: float = 120.0,
    max_actions: int = 50,
    allowed_errors: tuple[type[Exception], ...] = (),
    store: StoreFactory | None = None,
) -> Outcome[None]: ...


@overload
def replay(
    flows: Mapping[str, Flow] | Callable[[C], Mapping[str, Flow]],
    *,
    states: Sequence[tuple[StateCtx, Faults] | None] | None = None,
    seed: StateCtx | Sequence[StateCtx] | SeedFunction | None = None,
    faults: Faults | None = None,
    invariants: Iterable[Invariant[C]] = ...,
    context: Callable[[], C],
    max_attempts: int = 3,
    retry_after: float = 120.0,
    max_actions: int = 50,
    allowed_errors: tuple[type[Exception], ...] = (),
    store: StoreFactory | None = None,
) -> Outcome[C]: ...


def replay(
    flows: Mapping[str, Flow] | Callable[[Any], Mapping[str, Flow]],
    *,
    states: Sequence[tuple[StateCtx, Faults] | None] | None = None,
    seed: StateCtx | Sequence[StateCtx] | SeedFunction | None = None,
    faults: Faults | None = None,
    invariants: Iterable[Invariant[Any]] = (every_state_rests,),
    context: Callable[[], Any] | None = None,
    max_attempts: int = 3,
    retry_after: float = 120.0,
    max_actions: int = 50,
    allowed_errors: tuple[type[Exception], ...] = (),
    store: StoreFactory | None = None,
) -> Outcome[Any]:
    """Run the flows once, with exactly the faults given, and check the invariants.

    Use it to pin a failure :func:`explore` found as a regression test (paste the call it
    reports), or inside your own ``@given`` test with faults drawn from
    :func:`~flowstate.testing.strategies.fault_schedules`. Call it from a plain (not async)
    test. Give exactly one of ``states`` and ``seed``; the other arguments are those of
    :func:`explore`.

    Args:
        flows: The flows, by id; or a function that makes them from the context.
        states: ``(ctx, faults)`` pairs: new states to commit as they are, each with
            ``{n: Fault}`` for its own n-th commit. ``None`` entries (the empty slots
            :func:`explore` reports) are skipped, and so is a state whose id came before.
        seed: New ``StateCtx`` objects to commit as they are (one, or a sequence), or an
            async function that seeds the store through the engine it is given.
        faults: ``{n: Fault}`` for the run's n-th commit (seeding not counted).
        invariants: Functions of the :class:`Outcome` that ``assert`` (or return False).
        context: Makes the context for the flows factory and the invariants.
        max_attempts: The recoverer's default attempt limit.
        retry_after: The recoverer's default seconds before a retry (virtual clock).
        max_actions: Stop after this many recoverer and delayer actions.
        allowed_errors: Exceptions flows may raise besides ``DriverError`` and
            ``ConflictError``.
        store: Makes the fresh, unopened driver the run uses (default: ``MemoryDriver``).

    Returns:
        The run's outcome.

    Raises:
        InvariantError: An invariant did not hold.
        TypeError: Not exactly one of ``states`` and ``seed``, or a flows factory without
            a ``context``.
        Exception: A flow raised an exception that is not allowed.
    """
    __tracebackhide__ = True  # pytest: the report starts at the caller's frame
    config = _config(
        flows, context, invariants, max_attempts, retry_after, max_actions, allowed_errors, store
    )
    if (states is None) == (seed is None):
        raise TypeError("replay needs exactly one of states= and seed=")
    seeding: _Seeding
    if states is not None:
        seeding = _distinct_states(states)
    elif callable(seed):
        seeding = seed
    else:
        assert seed is not None
        seeding = _unfaulted(seed)
    return config.check(seeding, faults or {})
