"""Step functions and waits shared by the workflow tests."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import flowstate as fs
from flowstate.workflows import StepContext


class Forever:
    """A step that runs until it is cancelled; ``started`` and ``stopped`` (by a cancel) are
    events to await."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()

    async def __call__(self, step: StepContext) -> Any:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.stopped.set()
            raise


async def until_ended(watcher: fs.Watcher, ids: Collection[str], seconds: float = 30) -> None:
    """Read ``watcher`` until every state of ``ids`` has ended."""
    ended: set[str] = set()
    async with asyncio.timeout(seconds):
        async for state in watcher:
            if state.is_ended:
                ended.add(state.id)
                if ended >= set(ids):
                    return
