"""Keeping a server able to run every pipeline posted to the store as JSON.

A pipeline posted to ``/api/v1/flows/execute`` is registered in the process that received
it. The recoverer of ``flowstate serve --recover`` must be able to run its runs too: after
that process restarted, or when another server received them. :class:`RunAdopter` registers
the pipeline of each running run that carries its definition, as it sees them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import TYPE_CHECKING

import flowstate as fs
from flowstate.workflows import FlowManager

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType
    from typing import Self

    from flowstate.workflows import StepFn

__all__ = ["RunAdopter"]

logger = logging.getLogger("flowstate.server")

# How many runs that could not be adopted are remembered, so that each one is tried once.
_REFUSED_KEPT = 10_000


class RunAdopter:
    """Registers on ``engine`` the pipeline of every running run that carries a definition.

    ``async with RunAdopter(engine, tasks):`` adopts the runs running when it starts before
    it returns, then follows new ones with a watcher until it is left. A run whose definition
    needs a task ``tasks`` lacks is reported once and left to processes that have it.
    """

    def __init__(self, engine: fs.Engine, tasks: Mapping[str, StepFn]) -> None:
        self.engine = engine
        self.tasks = dict(tasks)
        self._manager = FlowManager(engine)
        self._running = self._manager.query(runtime="pipeline", status="running")
        self._refused: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._follow: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        head = await self.engine.driver.head_rev()
        async for run in self.engine.iter_states(self._running):
            await self._adopt(run)
        self._follow = asyncio.create_task(self._run(head))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow

    async def _run(self, since_rev: int) -> None:
        labels = self._running.labels
        try:
            async with self.engine.watch(labels=labels, since_rev=since_rev) as watcher:
                async for run in watcher:
                    await self._adopt(run)
        except fs.FlowstateError:
            logger.exception("stopped following the runs posted to the store")

    async def _adopt(self, run: fs.State) -> None:
        if run.transition.to in self.engine.flows or run.id in self._refused:
            return
        try:
            pipeline = await self._manager.adopt(run, self.tasks)
        except (fs.NotFoundError, fs.DefinitionError) as exc:
            logger.warning("cannot run %r here: %s", run.id, exc)
            self._refused[run.id] = None
            while len(self._refused) > _REFUSED_KEPT:
                self._refused.popitem(last=False)
            return
        except fs.DriverError as exc:  # tried again at the run's next version
            logger.warning("cannot read the definition of %r now: %s", run.id, exc)
            return
        logger.info("runs of pipeline %r can run here (adopted with %r)", pipeline.id, run.id)
