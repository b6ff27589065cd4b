"""The Recoverer and the Delayer: background services that one process per store leads."""

from __future__ import annotations

import asyncio
import datetime
import functools
import heapq
import logging
import time
from typing import TYPE_CHECKING, Any

from attrs import define

from flowstate._checks import RESERVED_PREFIX, is_int, is_number, is_rev
from flowstate._commands import Commit, End, Execute, Noop, Transit
from flowstate._lifecycle import Lifecycle
from flowstate._state import CLAIM_ANNOTATION, State, StateCtx, internal_ctx
from flowstate.drivers._args import MAX_LEASE_TTL
from flowstate.drivers.base import DelayedState, Driver, SupportsLease
from flowstate.errors import (
    ClosedError,
    ConflictError,
    DriverError,
    InvalidCommandError,
    NotFoundError,
)
from flowstate.recovery import _settings as settings
from flowstate.recovery._election import Election

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from types import TracebackType
    from typing import Self

    from flowstate._engine import Engine

__all__ = ["Delayer", "Recoverer", "RecoveryStats"]

logger = logging.getLogger("flowstate.recovery")

#: Ids of the states the services keep their cursors in; flows should not use this prefix.
INTERNAL_PREFIX = RESERVED_PREFIX
INTERNAL_LABEL = {"flowstate.internal": "recovery"}
#: Transition annotation on a state a delay fired: when the delay was due.
FIRED_ANNOTATION = "flowstate.delay.fired"


@define
class RecoveryStats:
    """Counters of what a service did since it started (across leadership terms).

    Attributes:
        added: Running states the recoverer started tracking; delays the delayer read.
        completed: Tracked states that came to rest (ended, paused or delayed) by themselves.
        retried: States the recoverer re-committed and executed again.
        dropped: States force-ended (or handed to their on_exhausted flow) after their last
            attempt (recoverer); delays whose state had moved on, so they did not fire
            (delayer).
        fired: Delays that fired (delayer).
        leader_changes: How often this process won or lost leadership.
    """

    added: int = 0
    completed: int = 0
    retried: int = 0
    dropped: int = 0
    fired: int = 0
    leader_changes: int = 0


def recovery_step(ctx: StateCtx, max_attempts: int, claim: str | None = None) -> Transit | End:
    """What the recoverer commits for a stalled state that ``ctx`` holds.

    The same transition again with the next attempt number, or, once the state's attempts
    (its own ``max_attempts`` setting, else ``max_attempts``) are spent, ``End`` with the
    reason in the state annotation ``flowstate.recovery.ended`` (or a transit to the
    state's ``on_exhausted`` flow, unless that is the flow whose attempts are spent, with
    the reason in that transition's annotation ``flowstate.recovery.ended``). A transit
    carries ``claim`` (``flowstate.claim``), when given: who goes on running it.
    """
    claimed = {} if claim is None else {CLAIM_ANNOTATION: claim}
    state = ctx.committed
    done = settings.attempt(state)
    if done >= settings.max_attempts_of(state, max_attempts):
        reason = f"still running {state.transition.to!r} after {done} retries"
        on_exhausted = state.annotations.get(settings.ON_EXHAUSTED)
        if on_exhausted and on_exhausted != state.transition.to:
            annotations = {settings.ENDED_REASON: reason, **claimed}
            return Transit(ctx, on_exhausted, annotations=annotations)
        ctx.current.annotations[settings.ENDED_REASON] = reason
        return End(ctx)
    annotations = {settings.ATTEMPT: str(done + 1), **claimed}
    return Transit(ctx, state.transition.to, annotations=annotations)


def fire_step(ctx: StateCtx, delayed: DelayedState, claim: str | None = None) -> Transit:
    """What the delayer commits when ``delayed`` is due and its state has not moved; it
    carries ``claim`` (``flowstate.claim``), when given: who goes on running it."""
    annotations = {FIRED_ANNOTATION: delayed.at.isoformat()}
    if claim is not None:
        annotations[CLAIM_ANNOTATION] = claim
    return Transit(ctx, delayed.to, annotations=annotations)


#: Seconds before the delayer tries again to fire a delay the store failed to take.
RETRY_FIRE = 0.5
#: How many states a service works on at once.
CONCURRENCY = 64


class _Workers:
    """Runs a service's actions as tasks of its TaskGroup, at most CONCURRENCY at once.

    The service's loop hands work over and goes on at once, so one slow or hanging state
    never holds up the others, and the commits of concurrent actions reach the driver
    together (SQLite and etcd group them into one transaction).
    """

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        self._slots = asyncio.Semaphore(CONCURRENCY)

    def start(self, action: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        # The coroutine is created only once a slot is free: a task cancelled while it
        # waits leaves no coroutine behind that was never awaited.
        self._group.create_task(self._run(action, args))

    async def _run(
        self, action: Callable[..., Coroutine[Any, Any, None]], args: tuple[Any, ...]
    ) -> None:
        async with self._slots:
            await action(*args)


def _outgrown(kept: int, live: int) -> bool:
    """True when a lazily cleaned list holds ``kept`` entries for ``live`` ones that still
    count: time to drop the stale ones, so its memory follows the live entries (amortised
    O(1) per entry)."""
    return kept > 2 * live + 64


class _Unsettled:
    """The revisions of the delays a delayer has read but not settled (fired or dropped)."""

    def __init__(self) -> None:
        self._revs: list[int] = []  # a heap; settled revisions leave it lazily
        self._live: set[int] = set()

    def add(self, rev: int) -> None:
        heapq.heappush(self._revs, rev)
        self._live.add(rev)

    def settle(self, rev: int) -> None:
        self._live.discard(rev)
        if _outgrown(len(self._revs), len(self._live)):
            # Settled revisions behind an old unsettled one pile up: drop them (a sorted
            # list is a heap), so memory follows the unsettled delays, not every one read.
            self._revs = sorted(self._live)

    def cursor(self, seen: int) -> int:
        """Where a next leader must start reading delays: before the oldest unsettled one,
        or after ``seen`` (the last one read) when every one is settled."""
        revs = self._revs
        while revs and revs[0] not in self._live:
            heapq.heappop(revs)
        return revs[0] - 1 if revs else seen


def _closing_only(exc: BaseException) -> bool:
    """True for a ``ClosedError``, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_closing_only(inner) for inner in exc.exceptions)
    return isinstance(exc, ClosedError)


class _LeaderService:
    """Lifecycle, leader election, stats and a persisted cursor shared by both services."""

    lease_name: str
    cursor_id: str

    def __init__(self, engine: Engine, *, lease_ttl: float) -> None:
        if not is_number(lease_ttl, strict=True) or lease_ttl > MAX_LEASE_TTL:
            raise InvalidCommandError(
                f"lease_ttl must be a number of seconds above 0 and at most {MAX_LEASE_TTL:g}, "
                f"not {lease_ttl!r}"
            )
        self.engine = engine
        self.lease_ttl = float(lease_ttl)
        self.stats = RecoveryStats()
        self._lifecycle = Lifecycle.UNOPENED
        self._task_group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._leading = asyncio.Event()
        self._election: Election | None = None
        self._cursor_ctx: StateCtx | None = None

    @property
    def is_leader(self) -> bool:
        """True while this process leads and does the work."""
        return self._leading.is_set()

    async def wait_leader(self) -> None:
        """Return once this process leads."""
        await self._leading.wait()

    @property
    def holder(self) -> str:
        """This process's name in the leader lease."""
        return self._election.holder if self._election is not None else "this process"

    async def __aenter__(self) -> Self:
        if self._lifecycle is not Lifecycle.UNOPENED:
            raise ClosedError(f"a {type(self).__name__} can be started once")
        self.engine._check_open()
        driver = self.engine.driver
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._task_group = group
        work: Callable[[], Awaitable[None]]
        if isinstance(driver, SupportsLease):
            self._election = Election(
                driver, self.lease_name, ttl=self.lease_ttl, on_change=self._on_change
            )
            work = functools.partial(self._election.run, self._lead)
        else:
            logger.warning(
                "%r has no leases: %s leads unconditionally", driver, type(self).__name__
            )
            work = self._lead_alone
        self._task = group.create_task(self._until_the_engine_closes(work))
        self._lifecycle = Lifecycle.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop, handing leadership back at once. Calling it again does nothing."""
        if self._lifecycle is not Lifecycle.OPENED:
            self._lifecycle = Lifecycle.CLOSED
            return
        self._lifecycle = Lifecycle.CLOSED
        assert self._task_group is not None
        if self._task is not None:
            self._task.cancel()
        await self._task_group.__aexit__(None, None, None)

    async def _until_the_engine_closes(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work()`` (campaigning and leading); a service whose engine is closed under
        it stops there, quietly: leaving its context raises nothing for that."""
        try:
            await work()
        except BaseException as exc:
            if not (self.engine.is_closed and _closing_only(exc)):
                raise
            logger.info("%s stops: its engine was closed", type(self).__name__)

    def _on_change(self, leading: bool) -> None:
        self.stats.leader_changes += 1
        if leading:
            self._leading.set()
        else:
            self._leading.clear()

    async def _lead_alone(self) -> None:
        self._on_change(True)
        try:
            await self._lead()
        finally:
            self._on_change(False)

    async def _lead(self) -> None:
        raise NotImplementedError

    # -- the persisted cursor: a state of its own ------------------------------------------

    async def _load_cursor(self) -> int:
        try:
            self._cursor_ctx = await self.engine.get_state(self.cursor_id)
        except NotFoundError:
            self._cursor_ctx = internal_ctx(self.cursor_id, labels=INTERNAL_LABEL)
            return 0
        stored = self._cursor_ctx.current.annotations.get("cursor", "0")
        if not (stored.isdecimal() and stored.isascii() and is_rev(int(stored))):
            # Not one this service wrote. The cursor is only a shortcut: start from the
            # beginning, which is always correct, and the next save puts a good one back.
            logger.warning(
                "the %s cursor in %r is %r, not a revision: starting from rev 0",
                type(self).__name__,
                self.cursor_id,
                stored,
            )
            return 0
        return int(stored)

    async def _save_cursor(self, cursor: int) -> None:
        ctx = self._cursor_ctx
        if ctx is None or ctx.committed.annotations.get("cursor") == str(cursor):
            return
        ctx.current.annotations["cursor"] = str(cursor)
        try:
            await self.engine.do(Commit(Noop(ctx)))
        except ConflictError:
            # Another leader wrote it: ours is stale, read theirs next time we lead.
            self._cursor_ctx = await self.engine.get_state(self.cursor_id)
        except DriverError as exc:
            # A cursor is only a shortcut for the next leader: saving it later is fine.
            ctx.current.annotations["cursor"] = ctx.committed.annotations.get("cursor", "0")
            logger.warning("could not save the %s cursor now: %s", type(self).__name__, exc)


class Recoverer(_LeaderService):
    """Retries running states that stall; force-ends them once their attempts are spent.

    A state is *running* when its transition names a flow and it is neither paused, delayed
    nor excluded with ``recovery.disable``. If its latest version is still running
    ``retry_after`` seconds after it was committed, the recoverer re-commits the same
    transition with an attempt counter (``recovery.attempt(state)``) and executes it; after
    ``max_attempts`` retries it commits ``End`` with the reason in the state annotation
    ``flowstate.recovery.ended``. Every action is a revision-checked commit, so a retry
    racing a live worker (or another recoverer) loses harmlessly.

    It follows the ordered log from a persisted cursor (the oldest revision it may still need),
    so a new leader neither rescans history nor misses a stalled state. Run it with
    ``async with Recoverer(engine):``; one process per store leads, the others stand by.

    Args:
        engine: The engine whose flows retried states run on (it must know every flow).
        retry_after: Default seconds a running state may go without a commit.
        max_attempts: Default retries of one transition before the state is force-ended.
        lease_ttl: Seconds a dead leader keeps the lease; standbys take over after it.
        tick: Longest wait between checks for due retries.
    """

    lease_name = "flowstate.recoverer"
    cursor_id = "flowstate.recovery.recoverer"

    def __init__(
        self,
        engine: Engine,
        *,
        retry_after: float = 120,
        max_attempts: int = 3,
        lease_ttl: float = 10,
        tick: float = 1.0,
    ) -> None:
        if not is_number(retry_after, strict=True):
            raise InvalidCommandError(f"retry_after must be a positive number, not {retry_after!r}")
        if not is_int(max_attempts) or max_attempts < 0:
            raise InvalidCommandError(f"max_attempts must be an int >= 0, not {max_attempts!r}")
        super().__init__(engine, lease_ttl=lease_ttl)
        self.retry_after = float(retry_after)
        self.max_attempts = max_attempts
        self.tick = tick

    async def _lead(self) -> None:
        cursor = await self._load_cursor()
        logger.info("%s recovers from rev %d", self.holder, cursor, extra={"cursor": cursor})
        tracked: dict[str, State] = {}
        due: list[tuple[float, int, str]] = []
        seen = cursor
        saved_at = time.monotonic()
        async with (
            self.engine.watch(since_rev=cursor, limit=500) as watcher,
            asyncio.TaskGroup() as group,
        ):
            workers = _Workers(group)
            while True:
                now = time.time()
                while due and due[0][0] <= now:
                    _, rev, state_id = heapq.heappop(due)
                    state = tracked.get(state_id)
                    if state is not None and state.rev == rev:
                        workers.start(self._recover, state, tracked, due)
                wait = min(self.tick, due[0][0] - now) if due else self.tick
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        state = await anext(watcher, None)
                except TimeoutError:
                    pass
                else:
                    if state is None:  # the watcher ends only when its engine closes
                        raise ClosedError("the engine was closed")
                    if not state.id.startswith(INTERNAL_PREFIX):
                        self._track(state, tracked, due)
                        seen = state.rev
                if time.monotonic() - saved_at >= self.tick:
                    # Only what flows committed moves the cursor, never its own commits.
                    low = min(s.rev for s in tracked.values()) - 1 if tracked else seen
                    await self._save_cursor(low)
                    saved_at = time.monotonic()

    def _track(
        self, state: State, tracked: dict[str, State], due: list[tuple[float, int, str]]
    ) -> None:
        if state.status == "running" and not state.is_delayed and not settings.is_disabled(state):
            if state.id not in tracked:
                self.stats.added += 1
            tracked[state.id] = state
            assert state.committed_at is not None
            deadline = state.committed_at.timestamp() + settings.retry_after_of(
                state, self.retry_after
            )
            heapq.heappush(due, (deadline, state.rev, state.id))
            if _outgrown(len(due), len(tracked)):
                # Each version of a running state left an entry; only the latest versions'
                # count (the others are skipped when due): drop the others, so memory
                # follows the running states, not every commit of the last retry_after.
                due[:] = [
                    entry
                    for entry in due
                    if (latest := tracked.get(entry[2])) is not None and latest.rev == entry[1]
                ]
                heapq.heapify(due)
        elif tracked.pop(state.id, None) is not None:
            self.stats.completed += 1

    async def _recover(
        self,
        state: State,
        tracked: dict[str, State],
        due: list[tuple[float, int, str]],
    ) -> None:
        """Retry or force-end one stalled state; never let one state stop the others.

        ``state`` is the stalled version as the log delivered it; no need to read it again,
        since the commit is checked against its revision and loses if the state moved on.
        When the store fails, the state goes back into ``due`` to be tried a tick later.
        """
        state_id, rev = state.id, state.rev
        done = settings.attempt(state)
        extra = {"state_id": state_id, "rev": rev, "attempt": done}
        ctx = StateCtx.of(state)
        step = recovery_step(ctx, self.max_attempts, claim=self.holder)
        try:
            await self.engine.do(Commit(step))
        except ConflictError:
            return  # someone moved it first: the watcher brings the new version
        except DriverError as exc:
            logger.warning("could not recover state %r now, retrying: %s", state_id, exc)
            heapq.heappush(due, (time.time() + self.tick, rev, state_id))
            return
        if isinstance(step, End):
            tracked.pop(state_id, None)  # its End is not a completion of its own
            self.stats.dropped += 1
            logger.warning(
                "force-ended stalled state %r after %d retries", state_id, done, extra=extra
            )
            return
        if step.to != state.transition.to:
            # Still running, at its on_exhausted flow: the watcher tracks the new version.
            self.stats.dropped += 1
            logger.warning(
                "stalled state %r handed to its on_exhausted flow %r after %d retries",
                state_id,
                step.to,
                done,
                extra=extra,
            )
            await self.engine.do(Execute(ctx, claim=self.holder))
            return
        self.stats.retried += 1
        logger.info("retrying stalled state %r (attempt %d)", state_id, done + 1, extra=extra)
        await self.engine.do(Execute(ctx, claim=self.holder))


class Delayer(_LeaderService):
    """Fires delayed states when due: transits them to the delay's flow and executes them.

    A delay fires only if its state has not moved since the version the delay was committed
    with; otherwise it is dropped. Firing is a revision-checked commit, so each committed delay
    fires at most once as flows see it, even across leader changes. A delay due in the past
    fires at once. Run it with ``async with Delayer(engine):``; one process per store leads.

    Its persisted cursor stays before the oldest delay it has not settled (waiting to be due,
    or being fired), so a new leader takes over every delay the old one left unfired.

    Args:
        engine: The engine whose flows fired states run on.
        lease_ttl: Seconds a dead leader keeps the lease; standbys take over after it.
    """

    lease_name = "flowstate.delayer"
    cursor_id = "flowstate.recovery.delayer"

    def __init__(self, engine: Engine, *, lease_ttl: float = 10) -> None:
        super().__init__(engine, lease_ttl=lease_ttl)

    async def _lead(self) -> None:
        driver = self.engine.driver
        seen = await self._load_cursor()
        logger.info("%s fires delays from rev %d", self.holder, seen, extra={"cursor": seen})
        async with asyncio.TaskGroup() as group:
            await self._fire_due(driver, seen, _Workers(group))

    async def _fire_due(self, driver: Driver, seen: int, workers: _Workers) -> None:
        """Read new delays and start firing the due ones, until cancelled."""
        pending: list[tuple[datetime.datetime, int, str, DelayedState]] = []
        unsettled = _Unsettled()
        while True:
            head = await driver.head_rev()
            more = True
            while more:
                page = await driver.get_delays(since_rev=seen, limit=500)
                for delayed in page.delays:
                    heapq.heappush(pending, (delayed.at, delayed.rev, delayed.state.id, delayed))
                    unsettled.add(delayed.rev)
                    seen = delayed.rev
                    self.stats.added += 1
                more = page.more
            now = datetime.datetime.now(datetime.UTC)
            while pending and pending[0][0] <= now:
                workers.start(self._fire, heapq.heappop(pending)[3], unsettled)
            # Not the head: the cursor's own commit would move it and wake this loop again.
            await self._save_cursor(unsettled.cursor(seen))
            wait = (pending[0][0] - now).total_seconds() if pending else None
            try:
                async with asyncio.timeout(wait):
                    await driver.wait_for_rev(head + 1)
            except TimeoutError:
                pass

    async def _fire(self, delayed: DelayedState, unsettled: _Unsettled) -> None:
        """Fire one due delay, trying again while the store fails."""
        state_id = delayed.state.id
        extra = {"state_id": state_id, "rev": delayed.rev, "to": delayed.to}
        # The delay is bound to the version it was committed with: committing against that
        # revision fires it exactly when the state has not moved since.
        ctx = StateCtx.of(delayed.state)
        while True:
            try:
                await self.engine.do(Commit(fire_step(ctx, delayed, claim=self.holder)))
            except ConflictError:
                unsettled.settle(delayed.rev)
                self.stats.dropped += 1
                logger.debug("delay on %r dropped: the state moved on", state_id, extra=extra)
                return
            except DriverError as exc:
                logger.warning("could not fire the delay on %r now, retrying: %s", state_id, exc)
                await asyncio.sleep(RETRY_FIRE)
                continue
            break
        unsettled.settle(delayed.rev)
        self.stats.fired += 1
        logger.debug("fired delay on %r", state_id, extra=extra)
        await self.engine.do(Execute(ctx, claim=self.holder))
