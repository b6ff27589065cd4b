"""Workers: processes that run the pipeline runs and plain flows other processes start."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Final

from attrs import define

import flowstate as fs
from flowstate._checks import is_number
from flowstate._lifecycle import Lifecycle
from flowstate.workflows._manager import FlowManager
from flowstate.workflows._model import EXHAUSTED_FLOW, RECORD, TIMER_FLOW, read_record
from flowstate.workflows._pipeline import FLOW_PREFIX, Pipeline, StepFn, latest_key
from flowstate.workflows._runs import PipelineExecutor, claimable

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType
    from typing import Self

__all__ = ["Worker", "WorkerStats", "workflow_flows"]

logger = logging.getLogger("flowstate.workflows")

#: The workflow layer's own flows, which the delayer and the recoverer run (a worker's
#: plain flows are the others).
_LAYER_FLOWS: Final = frozenset({TIMER_FLOW, EXHAUSTED_FLOW})


def workflow_flows(*pipelines: Pipeline) -> dict[str, fs.Flow]:
    """The flows a process needs for managed flows and ``pipelines``: the flow that resumes
    timer waits, the one that fails a run whose recovery attempts are spent, and each
    pipeline's executor. Put them in the flows of a recoverer, a worker or ``flowstate
    recover --flows`` so that they can run them.

    Raises:
        DefinitionError: A pipeline has problems.
    """
    from flowstate.workflows._manager import fail_exhausted_run, resume_on_timer

    flows: dict[str, fs.Flow] = {
        TIMER_FLOW: resume_on_timer,
        EXHAUSTED_FLOW: fail_exhausted_run,
    }
    for pipeline in pipelines:
        pipeline.validate()
        # The last one given of an id is the one new runs of it start with, as
        # FlowManager.register makes it.
        flows[pipeline.flow_id] = flows[latest_key(pipeline.id)] = PipelineExecutor(pipeline)
    return flows


@define
class WorkerStats:
    """What a worker did since it started.

    Attributes:
        runs: Pipeline runs it executed (until they ended or another executor owned them).
        steps: Plain flow steps it claimed and ran.
        lost: Claims another process won first.
        handed_back: Executions it stopped at shutdown, for others to take over.
    """

    runs: int = 0
    steps: int = 0
    lost: int = 0
    handed_back: int = 0


class Worker:
    """Runs the pipeline runs and plain flows that other processes commit.

    It follows the store with a watcher from the moment it starts, and runs at most
    ``concurrency`` executions at once. At start-up it also picks up the work committed
    while no worker was watching (the pipeline runs still running then, and, when it has
    plain flows, every state whose latest version runs one of them), a page at a time and
    only as fast as it has room for, so that a long backlog costs it no memory:

    * a **pipeline run** (of a pipeline registered on the engine, or one whose run carries
      its JSON definition, when ``tasks`` has its functions) is executed step by step; every
      attempt is claimed with a compare-and-set, so several workers share the runs and no
      step runs twice while its executor lives;
    * a **plain flow** step (a running state at a flow of the engine, not retried by the
      recoverer) is claimed by committing the same transition with the annotation
      ``flowstate.claim`` (its name), then the flow is called once and what it returns is
      committed; its next step is claimed afresh, by whichever worker wins. A version that
      carries ``flowstate.claim`` already is left alone: another worker runs it, or an
      execution started with a claim (the recoverer's and the delayer's are; so is
      ``Execute(ctx, claim=...)``) goes on running it.

    ``aclose()`` (or leaving ``async with``) stops taking work and hands back what it holds:
    work still waiting for a free slot is handed back untouched (nothing is committed for
    it, so the next worker to start takes it), a pipeline run stops after its running step
    (whose end it still commits), a plain step finishes; what has not ended after
    ``drain_timeout`` seconds is cancelled and left to the recoverer.

    Args:
        engine: An open engine with the flows and pipelines to run.
        concurrency: How many executions run at once.
        tasks: Step functions by task name, for runs of JSON definitions.
        drain_timeout: Seconds ``aclose`` waits for running work to reach a step boundary.
        name: The worker's name in logs and claims (default: host and process id).
    """

    def __init__(
        self,
        engine: fs.Engine,
        *,
        concurrency: int = 8,
        tasks: Mapping[str, StepFn] | None = None,
        drain_timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        if type(concurrency) is not int or concurrency < 1:
            raise fs.InvalidCommandError(f"concurrency must be an int >= 1, not {concurrency!r}")
        if not is_number(drain_timeout):
            raise fs.InvalidCommandError(
                f"drain_timeout must be a number of seconds >= 0, not {drain_timeout!r}"
            )
        self.engine = engine
        self.concurrency = concurrency
        self.tasks = dict(tasks or {})
        self.drain_timeout = drain_timeout
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.stats = WorkerStats()
        self._manager = FlowManager(engine)
        self._lifecycle = Lifecycle.UNOPENED
        self._slots = asyncio.Semaphore(concurrency)
        self._active: dict[str, asyncio.Task[None]] = {}
        self._begun: set[str] = set()  # ids in _active whose work holds a slot
        self._freed = asyncio.Event()  # set when work leaves _active
        self._again: dict[str, fs.State] = {}
        self._executing: dict[str, PipelineExecutor] = {}
        self._group: asyncio.TaskGroup | None = None
        self._follow: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    def __repr__(self) -> str:
        return f"Worker({self.name!r}, concurrency={self.concurrency})"

    async def __aenter__(self) -> Self:
        if self._lifecycle is not Lifecycle.UNOPENED:
            raise fs.ClosedError("a Worker can be started once")
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group
        self._follow = group.create_task(self._run())
        self._lifecycle = Lifecycle.OPENED
        logger.info("worker %s runs work from %r", self.name, self.engine.driver)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def started(self) -> None:
        """Return once the worker follows the store (work committed from now on is seen)."""
        await self._started.wait()

    async def aclose(self) -> None:
        """Stop taking work and hand back what is held. Calling it again does nothing."""
        if self._lifecycle is not Lifecycle.OPENED:
            self._lifecycle = Lifecycle.CLOSED
            return
        self._lifecycle = Lifecycle.CLOSED
        assert self._group is not None
        assert self._follow is not None
        self._follow.cancel()
        for run_id, executor in self._executing.items():
            executor.stop_after_step(run_id)
        # Work still waiting for a slot has not started: nothing of it is committed, so
        # dropping it hands it back as it was, and the next worker to start picks it up.
        queued = [
            task
            for state_id, task in self._active.items()
            if state_id not in self._begun and not task.done()
        ]
        for task in queued:
            task.cancel()
        self.stats.handed_back += len(queued)
        waiting = [task for task in self._active.values() if not task.done()]
        logger.info(
            "worker %s stops taking work: %d handed back untouched, %d to finish",
            self.name,
            len(queued),
            len(waiting) - len(queued),
        )
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=self.drain_timeout)
            for task in late:
                task.cancel()
            self.stats.handed_back += len(late)
        await self._group.__aexit__(None, None, None)
        logger.info("worker %s stopped", self.name)

    # -- following the store -------------------------------------------------------------------

    async def _run(self) -> None:
        engine = self.engine
        head = await engine.driver.head_rev()
        async with engine.watch(since_rev=head, limit=500) as watcher:
            self._started.set()
            async for state in engine.iter_states(self._backlog()):
                if state.rev > head:
                    break  # committed since the watcher started: it delivers those
                await self._room()
                await self._consider(state)
            async for state in watcher:
                await self._consider(state)

    def _backlog(self) -> fs.StatesQuery:
        """The latest versions that may hold work committed before this worker watched.

        Pipeline runs carry labels that find them; a plain flow's state carries none that
        says so, so a worker with plain flows reads every state's latest version (a page
        at a time) and keeps the running ones at its flows.
        """
        flows = self.engine.flows
        plain = any(
            flow_id not in _LAYER_FLOWS and not isinstance(flows.get(flow_id), PipelineExecutor)
            for flow_id in flows
        )
        if plain:
            return fs.StatesQuery(latest_only=True, limit=500)
        return self._manager.query(runtime="pipeline", status="running", limit=500)

    async def _room(self) -> None:
        """Wait until fewer than ``concurrency`` executions are held, so that the start-up
        backlog is read only as fast as it is worked off."""
        while len(self._active) >= self.concurrency:
            self._freed.clear()
            await self._freed.wait()

    async def _consider(self, state: fs.State) -> None:
        """Start work on a version a watcher delivered, if it is work for this worker."""
        to = state.transition.to
        if state.status != "running":
            executor = self._executing.get(state.id)
            if executor is not None and state.is_ended:
                executor.cancel_local(state.id)  # a run cancelled elsewhere
            return
        if state.id in self._active:
            # Held here already (running, or waiting for a slot): look at the newest
            # version again once that work is done.
            self._again[state.id] = state
            return
        if to.startswith(FLOW_PREFIX):
            if not claimable(state):
                return
            executor = await self._executor_for(state)
            if executor is not None:
                self._start(state, self._run_pipeline(executor, state))
        elif to not in _LAYER_FLOWS and to in self.engine.flows:
            annotations = state.transition.annotations
            if fs.CLAIM_ANNOTATION in annotations or fs.recovery.attempt(state) or state.is_delayed:
                # Claimed (by a worker, or an execution that goes on with it: the
                # recoverer's, the delayer's), retried by the recoverer (which runs it), or
                # waiting for its delay (a commit now would cancel it).
                return
            self._start(state, self._run_plain(state))

    def _start(self, state: fs.State, work: Any) -> None:
        assert self._group is not None
        self._active[state.id] = self._group.create_task(self._hold(state.id, work))

    async def _hold(self, state_id: str, work: Any) -> None:
        try:
            async with self._slots:
                self._begun.add(state_id)
                await work
        except Exception:
            logger.exception("worker %s: work on %r failed", self.name, state_id)
        finally:
            work.close()  # never awaited when cancelled while waiting for a slot
            self._active.pop(state_id, None)
            self._begun.discard(state_id)
            self._freed.set()
        again = self._again.pop(state_id, None)
        if again is not None and self._lifecycle is Lifecycle.OPENED:
            await self._consider(again)

    async def _executor_for(self, state: fs.State) -> PipelineExecutor | None:
        """The executor of a run's pipeline: registered, or built from its definition."""
        executor = self.engine.flows.get(state.transition.to)
        if isinstance(executor, PipelineExecutor):
            return executor
        if not self.tasks:
            return None
        try:
            await self._manager.adopt(state, self.tasks)
        except (fs.NotFoundError, fs.DefinitionError) as exc:
            logger.warning("worker %s cannot run %r: %s", self.name, state.id, exc)
            return None
        found = self.engine.flows[state.transition.to]
        assert isinstance(found, PipelineExecutor)
        return found

    async def _run_pipeline(self, executor: PipelineExecutor, state: fs.State) -> None:
        self._executing[state.id] = executor
        try:
            record = read_record(state) if RECORD in state.annotations else None
            step = (record.run or {}).get("step") if record is not None else None
            logger.info("worker %s runs %r (at step %r)", self.name, state.id, step)
            await executor(fs.StateCtx.of(state), self.engine)
            self.stats.runs += 1
        finally:
            del self._executing[state.id]

    async def _run_plain(self, state: fs.State) -> None:
        """Claim one step of a plain flow, run it, and commit what it returns."""
        engine = self.engine
        ctx = fs.StateCtx.of(state)
        to = state.transition.to
        try:
            await engine.do(
                fs.Commit(fs.Transit(ctx, to, annotations={fs.CLAIM_ANNOTATION: self.name}))
            )
        except fs.ConflictError:
            self.stats.lost += 1
            return
        self.stats.steps += 1
        command = await engine.flows[to](ctx, engine)
        if not isinstance(command, fs.Command):
            raise fs.InvalidCommandError(
                f"flow {to!r} returned {command!r}; a flow must return a Command"
            )
        try:
            if isinstance(command, fs.Transit | fs.Resume | fs.End | fs.Pause):
                await engine.do(fs.Commit(command))
            elif isinstance(command, fs.Execute):
                await engine.do(fs.Commit(fs.Noop(command.ctx)))
            elif not isinstance(command, fs.Noop):
                await engine.do(command)
        except fs.ConflictError:
            self.stats.lost += 1
