"""Watcher: an async iterator over committed state versions."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from typing import TYPE_CHECKING

from attrs import define, field

from flowstate.errors import ClosedError, DriverUnavailableError

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from flowstate._query import StatesQuery
    from flowstate._state import State
    from flowstate.drivers.base import Driver

__all__ = ["Signal", "Watcher"]

logger = logging.getLogger("flowstate")

# Pacing of the retries while the store is unavailable: from 50 ms, doubling, up to 1 s (each
# pause drawn between half and all of that, so that many watchers do not retry in step).
_FIRST_RETRY = 0.05
_MAX_RETRY = 1.0
# A caught-up watcher with an unavailable_timeout reads again after half that timeout of quiet
# (from 0.25 s to 5 s): a store that went down while nothing was committed is noticed too.
_MIN_PROBE = 0.25
_MAX_PROBE = 5.0


class Signal:
    """A one-shot flag that many waiters can watch through one shared future."""

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._set = False
        self._future: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def future(self) -> asyncio.Future[None]:
        """A future (of the running loop) that completes when the flag is set."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self._set:
                self._future.set_result(None)
        return self._future


@define(eq=False)
class Watcher:
    """Delivers every committed version matching a query exactly once, in revision order.

    Iterate with ``async for``. Iteration ends when the engine closes; after the watcher's own
    :meth:`aclose`, iterating raises ``ClosedError``. :attr:`rev` is the revision up to which
    everything has been delivered: pass it as ``since_rev`` to resume a watch later.

    With ``latest_only=True`` a state committed several times between two reads is delivered
    once, at its latest version.

    The watcher rides out store outages: when a read fails with ``DriverUnavailableError`` it
    tries again, pausing between attempts (from 50 ms, doubling, at most 1 s), and goes on from
    its last revision, with no gap and no duplicate. It raises that error only once the store
    has been unavailable for ``unavailable_timeout`` seconds (None: keep trying), counted from
    the start of the first read that fails (which may take the driver's own ``timeout`` to
    fail); once the store is known to be down, a read that outlasts what is left of it counts
    as failed. A watcher that has caught up and has a timeout reads again after half of it
    (from 0.25 s to 5 s) with nothing new, so that an outage while nothing is committed is
    noticed too. Any other error (a ``DriverError`` that is not ``DriverUnavailableError``, a
    closed driver) is raised at once.
    """

    _driver: Driver
    _query: StatesQuery
    _engine_closed: Signal
    _unavailable_timeout: float | None = None
    rev: int = field(init=False, default=0)
    _cursor: int = field(init=False, default=0)
    _buffer: collections.deque[State] = field(init=False, factory=collections.deque)
    _started: bool = field(init=False, default=False)
    _caught_up: bool = field(init=False, default=False)
    _closed: Signal = field(init=False, factory=Signal)
    _outage_since: float | None = field(init=False, default=None)
    _retries: int = field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self.rev = self._cursor = self._query.since_rev

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> State:
        if self._closed.is_set():
            raise ClosedError("the watcher is closed")
        loop = asyncio.get_running_loop()
        while not self._buffer:
            if self._engine_closed.is_set():
                raise StopAsyncIteration
            began = None
            try:
                if self._caught_up:
                    self.rev = self._cursor  # everything up to the cursor has been delivered
                    if not await self._wait(self._cursor + 1):
                        raise StopAsyncIteration
                # A failed fetch changes nothing: the next one starts from the same cursor.
                began = loop.time()
                await self._bounded_fetch()
            except DriverUnavailableError as exc:
                if not await self._ride_out(exc, began):
                    raise StopAsyncIteration from None
                continue
            if self._outage_since is not None:
                self._outage_ended()
        state = self._buffer.popleft()
        self.rev = state.rev
        return state

    async def _fetch(self) -> None:
        if self._started:
            query = self._query.replace(since_rev=self._cursor, since_latest=False)
        else:
            query, self._started = self._query, True
        page = await self._driver.get_states(query)
        self._buffer.extend(page.states)
        self._caught_up = not page.more
        last = page.states[-1].rev if page.states else self._cursor
        # Caught up: every version up to head_rev has been seen, even where none matched.
        self._cursor = last if page.more else max(last, page.head_rev)

    async def _bounded_fetch(self) -> None:
        """Fetch; during an outage, give up on a read (as unavailable) once the outage has
        lasted ``unavailable_timeout``, however long the driver would go on trying."""
        if self._outage_since is None or not self._unavailable_timeout:
            await self._fetch()
            return
        elapsed = asyncio.get_running_loop().time() - self._outage_since
        left = max(self._unavailable_timeout - elapsed, _FIRST_RETRY)
        try:
            async with asyncio.timeout(left) as deadline:
                await self._fetch()
        except TimeoutError:
            if not deadline.expired():
                raise
            raise DriverUnavailableError(
                f"the store did not answer within the watcher's unavailable_timeout "
                f"({self._unavailable_timeout:g} s of outage)"
            ) from None

    async def _ride_out(self, error: DriverUnavailableError, began: float | None) -> bool:
        """Pause before the next attempt. False when the engine or the watcher closed
        meanwhile; raises ``error`` once the outage lasted ``unavailable_timeout``, counted
        from the start of the first read that failed (``began``; None: a wait that failed)."""
        now = asyncio.get_running_loop().time()
        if self._outage_since is None:
            self._outage_since, self._retries = (now if began is None else began), 0
            if self._unavailable_timeout != 0:
                logger.warning(
                    "watcher at rev %d: store unavailable, retrying: %s", self._cursor, error
                )
        elapsed = now - self._outage_since
        pause = min(_MAX_RETRY, _FIRST_RETRY * 2**self._retries) * random.uniform(0.5, 1.0)
        if self._unavailable_timeout is not None:
            left = self._unavailable_timeout - elapsed
            if left <= 0:
                raise error
            pause = min(pause, left)
        self._retries += 1
        logger.debug("watcher: store unavailable for %.1f s; next try in %.2f s", elapsed, pause)
        stops = (self._engine_closed.future(), self._closed.future())
        done, _ = await asyncio.wait(stops, timeout=pause)
        return not done

    def _outage_ended(self) -> None:
        assert self._outage_since is not None
        elapsed = asyncio.get_running_loop().time() - self._outage_since
        logger.warning(
            "watcher at rev %d: store available again after %.1f s", self._cursor, elapsed
        )
        self._outage_since = None

    async def _wait(self, rev: int) -> bool:
        """Wait until the store reaches ``rev``, or (with an ``unavailable_timeout``) until it
        is time to read again to find out whether the store is still there. False when the
        engine or watcher closed."""
        waiter = asyncio.ensure_future(self._driver.wait_for_rev(rev))
        stops = (self._engine_closed.future(), self._closed.future())
        probe = None
        if self._unavailable_timeout is not None:
            probe = min(max(self._unavailable_timeout / 2, _MIN_PROBE), _MAX_PROBE)
        try:
            await asyncio.wait((waiter, *stops), timeout=probe, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if any(stop.done() for stop in stops):
            if not waiter.cancelled():
                # Closing the engine closes its driver too, which may fail the wait in the
                # same turn: that error says nothing more, but must be retrieved.
                waiter.exception()
            return False
        if not waiter.cancelled():  # cancelled: time to read again
            waiter.result()  # re-raise a driver failure
        return True

    async def aclose(self) -> None:
        """Stop watching. Calling it again does nothing."""
        self._closed.set()
        self._buffer.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
