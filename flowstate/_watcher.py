"""Watcher: an async iterator over committed state versions."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import TYPE_CHECKING

from attrs import define, field

from flowstate.errors import ClosedError

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from flowstate._query import StatesQuery
    from flowstate._state import State
    from flowstate.drivers.base import Driver

__all__ = ["Signal", "Watcher"]


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
    """

    _driver: Driver
    _query: StatesQuery
    _engine_closed: Signal
    rev: int = field(init=False, default=0)
    _cursor: int = field(init=False, default=0)
    _buffer: collections.deque[State] = field(init=False, factory=collections.deque)
    _started: bool = field(init=False, default=False)
    _caught_up: bool = field(init=False, default=False)
    _closed: Signal = field(init=False, factory=Signal)

    def __attrs_post_init__(self) -> None:
        self.rev = self._cursor = self._query.since_rev

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> State:
        if self._closed.is_set():
            raise ClosedError("the watcher is closed")
        while not self._buffer:
            if self._engine_closed.is_set():
                raise StopAsyncIteration
            if self._caught_up:
                self.rev = self._cursor  # everything up to the cursor has been delivered
                if not await self._wait(self._cursor + 1):
                    raise StopAsyncIteration
            await self._fetch()
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

    async def _wait(self, rev: int) -> bool:
        """Wait until the store reaches ``rev``. False when the engine or watcher closed."""
        waiter = asyncio.ensure_future(self._driver.wait_for_rev(rev))
        stops = (self._engine_closed.future(), self._closed.future())
        try:
            await asyncio.wait((waiter, *stops), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if any(stop.done() for stop in stops):
            return False
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
