"""FlowManager: managed flows with a checked lifecycle, an audit trail and observed steps."""

from __future__ import annotations

import asyncio
import collections
import datetime
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
import msgspec

import flowstate as fs
from flowstate._checks import is_text
from flowstate.errors import CancelPendingError
from flowstate.workflows._changes import (
    Change,
    Plan,
    cancelled,
    failed,
    flow_run_flow,
    preceded,
    resumed,
    stage,
    stage_step,
)
from flowstate.workflows._model import (
    CONTROLLER,
    EXHAUSTED_FLOW,
    FLOW_ID,
    OWNER,
    RUNTIME,
    RUNTIMES,
    STATUS,
    STEPS_PART,
    TIMER_FLOW,
    FlowEvent,
    FlowsPage,
    FlowStatus,
    FlowStep,
    ManagedFlow,
    Record,
    StepObservation,
    StepRecord,
    StepStatus,
    check_move,
    encode,
    events_of,
    flow_of,
    is_flow,
    is_step,
    iso,
    json_bytes,
    json_object,
    read_record,
    read_step,
    step_id,
    step_of,
)
from flowstate.workflows._pipeline import FLOW_PREFIX, Pipeline, StepFn, latest_key
from flowstate.workflows._runs import (
    BACKOFF,
    DEFINITION,
    PENDING,
    STARTED,
    PipelineExecutor,
    new_progress,
    run_steps,
)

if TYPE_CHECKING:
    import builtins
    from types import TracebackType
    from typing import Self

__all__ = ["FlowManager", "FlowWatcher"]

#: How many latest versions a manager keeps to commit against without reading first.
CACHE_SIZE: Final = 4096
#: The recoverer's retry limit of pipeline runs (see new_flow).
RUN_RECOVERY_ATTEMPTS: Final = 100


class FlowManager:
    """Managed flows on an engine: each method is one atomic commit and one audit event.

    A managed flow is a flowstate state with a lifecycle (``created → running ⇄ waiting →
    finished | failed | cancelled``, checked on every move), a JSON working state, an audit
    trail (its own committed history) and steps. Every method reads the flow, checks the move,
    and commits with compare-and-set; when another writer got there first it reads again and
    retries, ``attempts`` times, then raises ``ConflictError``. Calls on one flow through the
    managers of one engine (yours, and the ones pipeline executors use) are serialised, so
    concurrent calls in a process never lose an update, and a cancel takes its turn between
    two steps of a run that this process executes, however fast they come.

    A manager remembers the versions it committed last and commits against them without
    reading first; another writer's commit makes that attempt conflict, and it is retried
    after a fresh read (that first attempt does not count against ``attempts``).

    Timer waits resume by themselves through ``Delay``: run a :class:`flowstate.Delayer` (or
    ``flowstate recover``) on an engine a ``FlowManager`` was created on, since creating one
    registers the flow that resumes them.

    Args:
        engine: An open engine.
        attempts: Reads and commits per call before a persistent conflict raises (>= 1).

    Raises:
        InvalidCommandError: ``attempts`` is not an int >= 1.
    """

    def __init__(self, engine: fs.Engine, *, attempts: int = 2) -> None:
        if type(attempts) is not int or attempts < 1:
            raise fs.InvalidCommandError(f"attempts must be an int >= 1, not {attempts!r}")
        self.engine = engine
        self.attempts = attempts
        self._locks = _ENGINE_LOCKS.setdefault(engine, _KeyedLocks())
        self._latest: collections.OrderedDict[str, fs.StateCtx] = collections.OrderedDict()
        engine.flows.register(TIMER_FLOW, resume_on_timer)
        engine.flows.register(EXHAUSTED_FLOW, fail_exhausted_run)

    def __repr__(self) -> str:
        return f"FlowManager({self.engine!r}, attempts={self.attempts})"

    # -- creating ------------------------------------------------------------------------------

    async def create(
        self,
        *,
        controller: str,
        goal: str = "",
        owner: str = "",
        origin: str = "",
        current_step: str = "",
        state: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> ManagedFlow:
        """Create a managed flow in status ``created`` (event ``created``).

        Args:
            controller: Who drives the flow.
            goal: What it is for.
            owner: Whom it belongs to.
            origin: Where the request came from.
            current_step: Where the controller starts.
            state: The initial working state, a JSON object.
            id: The flow's id; a new unique one when None.

        Raises:
            InvalidCommandError: An argument is not as documented; nothing was written.
            ConflictError: A state with this id exists already.
        """
        return await self._create(
            FlowStatus.CREATED,
            "managed",
            controller=controller,
            goal=goal,
            owner=owner,
            origin=origin,
            current_step=current_step,
            state=state,
            flow_id=id,
        )

    async def create_mirrored(
        self,
        *,
        controller: str,
        goal: str = "",
        owner: str = "",
        origin: str = "",
        current_step: str = "",
        state: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> ManagedFlow:
        """Create a flow that mirrors work done elsewhere: born ``running``, runtime
        ``mirrored``; its steps are reported with :meth:`record_step`.

        Takes the arguments of :meth:`create` and raises what it raises.
        """
        return await self._create(
            FlowStatus.RUNNING,
            "mirrored",
            controller=controller,
            goal=goal,
            owner=owner,
            origin=origin,
            current_step=current_step,
            state=state,
            flow_id=id,
        )

    async def _create(self, status: FlowStatus, runtime: str, **fields: Any) -> ManagedFlow:
        ctx, change = new_flow(status, runtime, **fields)
        async with self._locks.hold(ctx.id):
            return await self._commit(ctx, change)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, flow_id: str) -> ManagedFlow:
        """``created → running`` (event ``started``).

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidTransitionError: The flow is not ``created``.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """

        def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change:
            _check_driven(flow)
            return Change(
                status=check_move(flow.id, flow.status, "start"), record=record, event="started"
            )

        return await self._mutate(flow_id, plan)

    async def wait(self, flow_id: str, wait: Mapping[str, Any]) -> ManagedFlow:
        """``running → waiting`` (event ``waiting``).

        ``wait`` says what the flow waits for, a JSON object with a ``"kind"``. A timer,
        ``{"kind": "timer", "at": "2026-04-23T15:00:00Z"}`` (timezone required) or
        ``{"kind": "timer", "seconds": 30}``, resumes the flow by itself when due (event
        ``resumed`` with ``"by": "timer"``), exactly once, and not at all if the flow was
        resumed or cancelled before; the stored wait gets the due time as ``"at"``. Any other
        kind waits for :meth:`resume`.

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidTransitionError: The flow is not ``running``.
            InvalidCommandError: ``wait`` is not a JSON object with a string ``"kind"``, or a
                timer without a valid ``"at"`` or ``"seconds"``; nothing was written.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """
        stored = json_object(wait, "wait")
        kind = stored.get("kind")
        if not isinstance(kind, str) or not kind:
            raise fs.InvalidCommandError(f"a wait needs a non-empty string 'kind', not {wait!r}")
        due = _timer_due(stored) if kind == "timer" else None
        if due is not None:
            stored["at"] = iso(due)

        def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change:
            _check_driven(flow)
            status = check_move(flow.id, flow.status, "wait")
            record.wait = stored
            return Change(
                status=status,
                record=record,
                event="waiting",
                payload={"wait": stored},
                delay_at=due,
            )

        return await self._mutate(flow_id, plan)

    async def resume(self, flow_id: str, patch: Mapping[str, Any] | None = None) -> ManagedFlow:
        """``waiting → running`` (event ``resumed``): clears the wait and merges ``patch``
        into the state (shallow: its keys replace the state's).

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidTransitionError: The flow is not ``waiting``.
            InvalidCommandError: ``patch`` is not a JSON object; nothing was written.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """
        changes = None if patch is None else json_object(patch, "patch")

        def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change:
            _check_driven(flow)
            return resumed(flow, record, changes, by="user")

        return await self._mutate(flow_id, plan)

    async def finish(self, flow_id: str, final: Mapping[str, Any] | None = None) -> ManagedFlow:
        """``running → finished`` (event ``finished``), merging ``final`` into the state first.

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidTransitionError: The flow is not ``running``.
            CancelPendingError: A cancel was requested: cancel the flow instead.
            InvalidCommandError: ``final`` is not a JSON object; nothing was written.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """
        changes = None if final is None else json_object(final, "final")

        def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change:
            _check_driven(flow)
            status = check_move(flow.id, flow.status, "finish")
            if record.cancel_requested:
                raise CancelPendingError(flow.id, "finish")
            if changes:
                record.state.update(changes)
            return Change(
                status=status,
                record=record,
                event="finished",
                payload={} if changes is None else {"final": changes},
            )

        return await self._mutate(flow_id, plan)

    async def fail(self, flow_id: str, reason: str) -> ManagedFlow:
        """``running | waiting → failed`` (event ``failed``); stamps ``state["failure"] =
        {"reason": reason, "at": <ISO time>}`` and clears the wait.

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidTransitionError: The flow is neither ``running`` nor ``waiting``.
            InvalidCommandError: ``reason`` is not a string; nothing was written.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """
        _check_text(reason, "reason")

        def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change:
            _check_driven(flow)
            return failed(flow, record, reason)

        return await self._mutate(flow_id, plan)

    async def request_cancel(self, flow_id: str) -> ManagedFlow:
        """Ask for the flow to be cancelled (event ``cancel_requested``): sets the sticky
        ``cancel_requested`` and keeps the status. From then on ``finish`` and
        ``update_state`` refuse; whoever drives the flow should stop and :meth:`cancel` it
        (a pipeline run does so before its next step). Asking again changes nothing.

        A pipeline run with no attempt running (waiting to retry a step, or to be picked up)
        has nothing to finish first: it is cancelled in the same commit (its events
        ``cancel_requested`` then ``cancelled``), whichever process would run it next.

        Raises:
            NotFoundError: No managed flow has this id.
            AlreadyTerminalError: The flow is finished, failed or cancelled.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """

        backoff = False
        runs_at = ""

        def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change | None:
            nonlocal backoff, runs_at
            runs_at = state.transition.to
            check_move(flow.id, flow.status, None)
            if record.cancel_requested:
                return None
            record.cancel_requested = True
            phase = (record.run or {}).get("phase")
            backoff = phase == BACKOFF
            if flow.runtime == "pipeline" and phase in (PENDING, BACKOFF):
                # No attempt runs: stop the run now, as its executor would before the next.
                return preceded(
                    cancelled(flow, record, how="requested"), [("cancel_requested", {})]
                )
            return Change(status=flow.status, record=record, event="cancel_requested")

        asked = await self._mutate(flow_id, plan, keep=flow_run_flow)
        executor = self._executor(runs_at)
        if backoff and executor is not None:
            executor.cancel_local(asked.id)  # a run waiting to retry a step stops now
        return asked

    async def cancel(self, flow_id: str) -> ManagedFlow:
        """Any non-terminal status ``→ cancelled`` (event ``cancelled``, whose payload says
        whether a cancel had been requested); clears the wait. A pipeline run's running step
        is cancelled too.

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidTransitionError: The flow is already finished, failed or cancelled.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """

        runs_at = ""

        def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change:
            nonlocal runs_at
            runs_at = state.transition.to
            run = record.run or {}
            if run.get("phase") == STARTED:
                return cancelled(flow, record, how="cancel", step=run["step"])
            return cancelled(flow, record, how="cancel")

        done = await self._mutate(flow_id, plan)
        executor = self._executor(runs_at)
        if executor is not None:
            executor.cancel_local(done.id)
        return done

    async def update_state(
        self, flow_id: str, patch: Mapping[str, Any], next_step: str | None = None
    ) -> ManagedFlow:
        """Merge ``patch`` into the state (shallow) and move ``current_step`` to ``next_step``
        when given; the status stays (event ``state_updated``).

        Raises:
            NotFoundError: No managed flow has this id.
            AlreadyTerminalError: The flow is finished, failed or cancelled.
            CancelPendingError: A cancel was requested: cancel the flow instead.
            InvalidCommandError: ``patch`` is not a JSON object, or ``next_step`` not a
                string; nothing was written.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """
        changes = json_object(patch, "patch")
        if next_step is not None:
            _check_text(next_step, "next_step")

        def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change:
            _check_driven(flow)
            check_move(flow.id, flow.status, None)
            if record.cancel_requested:
                raise CancelPendingError(flow.id, "update its state")
            record.state.update(changes)
            payload: dict[str, Any] = {"patch": changes}
            if next_step is not None:
                record.current_step = next_step
                payload["next_step"] = next_step
            return Change(status=flow.status, record=record, event="state_updated", payload=payload)

        return await self._mutate(flow_id, plan)

    # -- steps ---------------------------------------------------------------------------------

    async def record_step(self, observation: StepObservation) -> FlowStep:
        """Record a step of a flow: create it, or update the step of the same ``run_id``.

        The step and the flow's ``step_observed`` event are one atomic commit. An update keeps
        the earlier ``child_session_key`` when the observation has none. A step of a finished
        flow may still be recorded (a late report of work that ended after its flow did);
        it does not change the flow's status or state.

        Raises:
            NotFoundError: No managed flow has the observation's ``flow_id``.
            InvalidCommandError: The observation is not as documented (an unknown status, a
                result that is not JSON), or the flow is a pipeline run (its steps are its
                pipeline's attempts); nothing was written.
            ConflictError: Other writers kept winning for ``attempts`` tries.
        """
        if not isinstance(observation, StepObservation):
            raise fs.InvalidCommandError(
                f"record_step takes a StepObservation, not {type(observation).__name__}"
            )
        _check_id(observation.flow_id)
        _check_text(observation.run_id, "run_id", empty=False)
        _check_text(observation.task, "task")
        try:
            status = StepStatus(observation.status)
        except ValueError:
            allowed = ", ".join(s.value for s in StepStatus)
            raise fs.InvalidCommandError(
                f"a step status is one of {allowed}, not {observation.status!r}"
            ) from None
        for value, name in (
            (observation.child_session_key, "child_session_key"),
            (observation.error, "error"),
        ):
            if value is not None:
                _check_text(value, name)
        result = msgspec.json.decode(json_bytes(observation.result, "result"))
        sid = step_id(observation.flow_id, observation.run_id)
        staged: list[fs.StateCtx] = []
        cached = False

        async def plan(state: fs.State, flow: ManagedFlow, record: Record) -> Change:
            nonlocal cached
            # A run's steps are its pipeline's attempts, read from its own history.
            _check_driven(flow)
            step_ctx, cached = await self._step_ctx(sid)
            staged[:] = [step_ctx]
            known = read_step(step_ctx.committed) if step_ctx.committed.rev else None
            step = StepRecord(
                run_id=observation.run_id,
                task=observation.task,
                runtime=flow.runtime,
                attempt=known.attempt if known is not None else 1,
                result=result,
                error=observation.error,
                child_session_key=(
                    observation.child_session_key
                    if observation.child_session_key is not None or known is None
                    else known.child_session_key
                ),
                started_at=known.started_at if known is not None else None,
                ended_at=known.ended_at if known is not None else None,
                created_at=known.created_at if known is not None else None,
                created_rev=known.created_rev if known is not None else 0,
            )
            stage_step(step_ctx, flow.id, step, status)
            return Change(
                status=flow.status,
                record=record,
                event="step_observed",
                payload={
                    "run_id": observation.run_id,
                    "task": observation.task,
                    "status": str(status),
                },
                also=(step_ctx,),
            )

        try:
            await self._mutate(observation.flow_id, plan)
        except fs.ConflictError as exc:
            if not (cached and sid in exc.ids):
                raise
            # The step's version was the one this manager committed last, which another
            # manager has moved on since: as for a flow's, a free retry on the latest one.
            await self._mutate(observation.flow_id, plan)
        return step_of(staged[0].committed)

    async def _step_ctx(self, sid: str) -> tuple[fs.StateCtx, bool]:
        """A ctx on a step's latest version, or on a new step; and whether it is the version
        this manager committed last (which may be stale) rather than one read now."""
        ctx = self._latest.pop(sid, None)
        cached = ctx is not None
        if ctx is None:
            try:
                ctx = await self.engine.get_state(sid)
            except fs.NotFoundError:
                return fs.StateCtx.new(sid), False
        if not is_step(ctx.committed):
            # Step ids share the id space with every other state (a flow may be named
            # "a/steps/x" too): never overwrite a state that is not this step.
            raise fs.InvalidCommandError(
                f"the step's id {sid!r} is taken by a state that is not a step"
            )
        return ctx, cached

    # -- pipelines -----------------------------------------------------------------------------

    def register(self, pipeline: Pipeline) -> None:
        """Make this engine run ``pipeline``'s runs (in every process that runs its steps),
        and :meth:`execute` start new runs of its id with it.

        Registers the pipeline's executor as the flow :attr:`Pipeline.flow_id` of the engine,
        replacing an earlier registration of the same id. A pipeline built from a JSON
        definition has the definition's digest in its flow id: registering another
        definition under the same pipeline id leaves the runs of the earlier one running
        with it.

        Raises:
            DefinitionError: The pipeline has problems; it lists every one of them.
        """
        if not isinstance(pipeline, Pipeline):
            raise fs.InvalidCommandError(f"register takes a Pipeline, not {pipeline!r}")
        pipeline.validate()
        self._register(pipeline, current=True)

    def _register(self, pipeline: Pipeline, *, current: bool) -> None:
        """Register ``pipeline``'s executor under its flow id; ``current``: also as the
        pipeline ``execute`` starts (otherwise only when its id has none yet)."""
        flows = self.engine.flows
        flow_id, latest = pipeline.flow_id, latest_key(pipeline.id)
        executor = flows.get(flow_id)
        if not (isinstance(executor, PipelineExecutor) and _same(executor.pipeline, pipeline)):
            # The same definition with the same functions keeps its executor, which knows
            # the attempts it runs (cancel reaches them through it).
            executor = PipelineExecutor(pipeline)
            flows.register(flow_id, executor)
        if current or latest not in flows:
            flows.register(latest, executor)

    async def adopt(self, run: fs.State, tasks: Mapping[str, StepFn]) -> Pipeline:
        """Make this engine able to run ``run``: unless its pipeline is registered already,
        build it from the JSON definition the run was started with (stored with the run) and
        the step functions ``tasks``, and register it. Return the pipeline.

        This is how a process that did not start a run (a worker, a server restarted, a
        recoverer of another server) runs a pipeline that was posted as JSON.

        Raises:
            NotFoundError: ``run`` is not a pipeline run, or carries no definition (its
                pipeline was built in Python: register it instead).
            DefinitionError: The definition needs a function ``tasks`` lacks, or is invalid.
        """
        given: object = run
        if not isinstance(given, fs.State):
            raise fs.InvalidCommandError(
                f"adopt takes a run's stored version (a State), not {type(given).__name__}"
            )
        flow_id = run.transition.to
        if not is_flow(run) or not flow_id.startswith(FLOW_PREFIX):
            raise fs.NotFoundError(f"{run.id!r} is not a pipeline run")
        executor = self.engine.flows.get(flow_id)
        if isinstance(executor, PipelineExecutor):
            return executor.pipeline
        try:
            _, blob = await self.engine.driver.get_data(run.id, DEFINITION, run.rev)
        except fs.NotFoundError:
            raise fs.NotFoundError(
                f"run {run.id!r} carries no pipeline definition: its pipeline was built in "
                f"Python, so register it ({flow_id!r}) in this process"
            ) from None
        pipeline = Pipeline.from_definition(blob, tasks=tasks)
        if flow_id != pipeline.flow_id:
            raise fs.NotFoundError(
                f"the definition stored with {run.id!r} is of {pipeline.flow_id!r}, "
                f"not of {flow_id!r}"
            )
        self._register(pipeline, current=False)
        return pipeline

    def pipeline(self, pipeline_id: str) -> Pipeline:
        """The pipeline registered under ``pipeline_id``.

        Raises:
            FlowNotFoundError: None is.
            InvalidCommandError: ``pipeline_id`` is not a non-empty string.
        """
        given: object = pipeline_id  # callers may pass anything, whatever the annotation says
        if not isinstance(given, str) or not given:
            raise fs.InvalidCommandError(f"a pipeline id must be a non-empty string, not {given!r}")
        executor = self.engine.flows.get(latest_key(pipeline_id))
        if not isinstance(executor, PipelineExecutor):
            raise fs.FlowNotFoundError(
                pipeline_id,
                f"no pipeline registered under {pipeline_id!r}; register it with "
                "FlowManager.register",
            )
        return executor.pipeline

    async def execute(
        self,
        pipeline_id: str,
        *,
        input: Any = None,
        owner: str = "",
        origin: str = "",
        id: str | None = None,
        enqueue: bool = False,
    ) -> ManagedFlow:
        """Start a run of a registered pipeline and return it at once (status ``running``).

        The run is a managed flow of runtime ``pipeline``, executed in the background by this
        engine; with ``enqueue=True`` it is only committed, for workers (``flowstate worker``)
        to run.

        Args:
            pipeline_id: The registered pipeline's id.
            input: The run's input (JSON), ``step.input`` of every step.
            owner: Whom the run belongs to.
            origin: Where the request came from.
            id: The run's id; a new unique one when None.
            enqueue: Only commit the run; leave running it to workers.

        Raises:
            FlowNotFoundError: No pipeline is registered under ``pipeline_id``.
            InvalidCommandError: ``input`` is not JSON, or an argument is not as documented.
            ConflictError: A state with this id exists already.
        """
        pipeline = self.pipeline(pipeline_id)
        ctx, change = _new_run(pipeline, input=input, owner=owner, origin=origin, run_id=id)
        async with self._locks.hold(ctx.id):
            run = await self._commit(ctx, change)
        if not enqueue:
            await self.engine.do(fs.Execute(fs.StateCtx.of(self._latest[run.id].committed)))
        return run

    async def result(
        self,
        flow_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the documented name)
    ) -> ManagedFlow:
        """Wait until the flow is finished, failed or cancelled (through a watcher); return it.

        Raises:
            NotFoundError: No managed flow has this id.
            TimeoutError: ``timeout`` seconds passed first.
            ClosedError: The engine closed first.
        """
        async with asyncio.timeout(timeout):
            flow = await self.get(flow_id)
            if flow.status.is_terminal:
                return flow
            async with self.watch(id=flow_id, since_rev=flow.revision) as versions:
                async for version in versions:
                    if version.status.is_terminal:
                        return version
        raise fs.ClosedError("the engine closed while waiting for the result")

    def _executor(self, flow_id: str) -> PipelineExecutor | None:
        """The executor registered under ``flow_id`` (where a run's version runs), if any."""
        executor = self.engine.flows.get(flow_id) if flow_id else None
        return executor if isinstance(executor, PipelineExecutor) else None

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, flow_id: str) -> ManagedFlow:
        """The flow's latest version.

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidQueryError: ``flow_id`` is not a non-empty string.
        """
        return flow_of((await self._read(flow_id)).committed)

    async def list(
        self,
        *,
        owner: str | None = None,
        status: FlowStatus | str | None = None,
        controller: str | None = None,
        runtime: str | None = None,
        pipeline: str | None = None,
    ) -> list[ManagedFlow]:
        """The flows matching every filter given, at their latest versions, oldest change
        first. A flow that moved on from a status is not listed under it any more.

        Raises:
            InvalidQueryError: A filter is not a string, or not a known status.
        """
        query = self.query(
            owner=owner, status=status, controller=controller, runtime=runtime, pipeline=pipeline
        )
        return [flow_of(state) async for state in self.engine.iter_states(query)]

    async def page(
        self,
        *,
        owner: str | None = None,
        status: FlowStatus | str | None = None,
        controller: str | None = None,
        runtime: str | None = None,
        pipeline: str | None = None,
        since_rev: int = 0,
        limit: int = 100,
    ) -> FlowsPage:
        """One page of :meth:`list`: the flows whose latest version comes after
        ``since_rev``; ask for the next page with ``since_rev=page.last_rev``.

        Raises:
            InvalidQueryError: A filter is not a string, or not a known status.
        """
        query = self.query(
            owner=owner,
            status=status,
            controller=controller,
            runtime=runtime,
            pipeline=pipeline,
            since_rev=since_rev,
            limit=limit,
        )
        found = await self.engine.get_states(query)
        flows = [flow_of(state) for state in found.states if is_flow(state)]
        last = found.states[-1].rev if found.states else since_rev
        return FlowsPage(flows=flows, more=found.more, last_rev=last)

    def query(
        self,
        *,
        owner: str | None = None,
        status: FlowStatus | str | None = None,
        controller: str | None = None,
        runtime: str | None = None,
        pipeline: str | None = None,
        since_rev: int = 0,
        limit: int = 100,
    ) -> fs.StatesQuery:
        """The :class:`flowstate.StatesQuery` of flows' latest versions matching every filter
        given; pass it to ``engine.get_states`` for one page at a time.

        Raises:
            InvalidQueryError: A filter is not a string, or not a known status.
        """
        labels: dict[str, str] = {}
        for key, value in ((OWNER, owner), (CONTROLLER, controller), (RUNTIME, runtime)):
            if value is not None:
                if not isinstance(value, str):
                    raise fs.InvalidQueryError(f"filters are strings, not {value!r}")
                labels[key] = value
        given: object = pipeline
        if given is not None:
            # A run's controller is its pipeline.
            if not isinstance(given, str) or labels.get(RUNTIME, "pipeline") != "pipeline":
                raise fs.InvalidQueryError(f"pipeline= selects pipeline runs, not {pipeline!r}")
            if labels.setdefault(CONTROLLER, given) != given:
                raise fs.InvalidQueryError("pipeline= and controller= name different pipelines")
            labels[RUNTIME] = "pipeline"
        if status is not None:
            try:
                labels[STATUS] = str(FlowStatus(status))
            except ValueError:
                raise fs.InvalidQueryError(f"no flow status {status!r}") from None
        # Only flows carry a runtime label: without a runtime filter, any of them.
        wanted: dict[str, str] | list[dict[str, str]] = (
            labels if RUNTIME in labels else [{**labels, RUNTIME: r} for r in RUNTIMES]
        )
        return fs.StatesQuery(labels=wanted, latest_only=True, since_rev=since_rev, limit=limit)

    async def events(self, flow_id: str) -> builtins.list[FlowEvent]:
        """The flow's audit trail, oldest first: one event per committed change.

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidQueryError: ``flow_id`` is not a non-empty string.
        """
        await self._read(flow_id)
        found = []
        async for state in self.engine.iter_states(id=flow_id, limit=500):
            if is_flow(state):
                found += events_of(state)
        return found

    async def steps(self, flow_id: str) -> builtins.list[FlowStep]:
        """The flow's steps, in the order they were first recorded.

        Raises:
            NotFoundError: No managed flow has this id.
            InvalidQueryError: ``flow_id`` is not a non-empty string.
        """
        flow = flow_of((await self._read(flow_id)).committed)
        if flow.runtime == "pipeline":
            return run_steps(flow_id, [s async for s in self.engine.iter_states(id=flow_id)])
        query = fs.StatesQuery(labels={FLOW_ID: flow_id}, latest_only=True)
        found: builtins.list[tuple[int, FlowStep]] = []
        async for state in self.engine.iter_states(query):
            if is_step(state):
                record = read_step(state)
                # By first revision: a step never updated is still at it.
                found.append((record.created_rev or state.rev, step_of(state, record)))
        found.sort(key=lambda item: item[0])
        return [step for _, step in found]

    def watch(
        self,
        *,
        id: str | None = None,
        owner: str | None = None,
        status: FlowStatus | str | None = None,
        controller: str | None = None,
        runtime: str | None = None,
        since_rev: int = 0,
    ) -> FlowWatcher:
        """Stream every committed version of the flows matching the filters, as snapshots,
        in revision order from ``since_rev`` (``async for flow in manager.watch(...)``).

        Raises:
            InvalidQueryError: A filter is invalid.
        """
        filters = (owner, status, controller, runtime)
        labels: dict[str, str] | list[dict[str, str]] = {}
        if id is None or any(value is not None for value in filters):
            labels = self.query(
                owner=owner, status=status, controller=controller, runtime=runtime
            ).labels
        return FlowWatcher(self.engine.watch(id=id, labels=labels, since_rev=since_rev))

    async def _read(self, flow_id: str) -> fs.StateCtx:
        try:
            ctx = await self.engine.get_state(flow_id)
        except fs.NotFoundError:
            raise fs.NotFoundError(f"no managed flow {flow_id!r}") from None
        if not is_flow(ctx.committed):
            raise fs.NotFoundError(f"{flow_id!r} is a state, but not a managed flow")
        return ctx

    # -- committing ----------------------------------------------------------------------------

    async def _mutate(
        self,
        flow_id: str,
        plan: Plan,
        *,
        keep: Callable[[fs.State, ManagedFlow], str | None] | None = None,
    ) -> ManagedFlow:
        """Read, plan, commit; read again and retry on a conflict.

        ``plan`` checks the move and returns the change (None: nothing to commit); it may
        change the record it is given. ``keep`` names the flow a pipeline run goes on running
        after a change that keeps its status.
        """
        _check_id(flow_id)
        async with self._locks.hold(flow_id):
            ctx = self._latest.pop(flow_id, None)
            tries = self.attempts + (ctx is not None)
            error: fs.ConflictError | None = None
            for _ in range(tries):
                cached = ctx is not None
                if ctx is None:
                    ctx = await self._read(flow_id)
                try:
                    record = read_record(ctx.committed)
                    flow = flow_of(ctx.committed, record)
                    planned = plan(ctx.committed, flow, record)
                    change = await planned if isinstance(planned, Awaitable) else planned
                    if change is None and not cached:
                        self._remember(ctx)
                        return flow
                    if change is None:
                        # Nothing to do, decided on a version this manager committed earlier,
                        # which may be stale: decide again on the latest one.
                        ctx = None
                        continue
                    if keep is not None and change.flow is None and not change.status.is_terminal:
                        change = attrs.evolve(change, flow=keep(ctx.committed, flow))
                    return await self._commit(ctx, change)
                except fs.ConflictError as exc:
                    error = exc
                except fs.FlowstateError:
                    if not cached:
                        raise
                    # Decided on a version this manager committed earlier, which may be
                    # stale: decide again on the latest one.
                ctx = None
            assert error is not None
            raise error

    async def _commit(self, ctx: fs.StateCtx, change: Change) -> ManagedFlow:
        """Commit the change on ``ctx`` with every state it carries along."""
        try:
            await self.engine.do(stage(ctx, change))
        except BaseException:
            for other in change.also:
                self._latest.pop(other.id, None)
            raise
        for done in (ctx, *change.also):
            self._remember(done)
        return flow_of(ctx.committed, change.record)

    def _remember(self, ctx: fs.StateCtx) -> None:
        latest = self._latest
        latest[ctx.id] = ctx
        latest.move_to_end(ctx.id)
        while len(latest) > CACHE_SIZE:
            latest.popitem(last=False)


def new_flow(
    status: FlowStatus,
    runtime: str,
    *,
    controller: str,
    goal: str,
    owner: str,
    origin: str,
    current_step: str,
    state: Mapping[str, Any] | None,
    flow_id: str | None,
    pipeline: str | None = None,
    run: dict[str, Any] | None = None,
    flow: str | None = None,
    data: dict[str, bytes] | None = None,
) -> tuple[fs.StateCtx, Change]:
    """The ctx of a new flow and the change that creates it (event ``created``).

    Raises:
        InvalidCommandError: An argument is not as documented.
    """
    _check_text(controller, "controller", empty=False)
    for value, name in ((goal, "goal"), (owner, "owner"), (origin, "origin")):
        _check_text(value, name)
    _check_text(current_step, "current_step")
    if runtime not in RUNTIMES:
        raise fs.InvalidCommandError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    if flow_id is None:
        flow_id = uuid.uuid4().hex
    _check_id(flow_id)
    record = Record(
        controller=controller,
        goal=goal,
        origin=origin,
        current_step=current_step,
        state={} if state is None else json_object(state, "state"),
        run=run,
    )
    if pipeline is not None and pipeline != controller:
        raise fs.InvalidCommandError("a pipeline run's controller is its pipeline")
    labels = {OWNER: owner, CONTROLLER: controller, RUNTIME: runtime}
    ctx = fs.StateCtx.new(flow_id, labels=labels)
    if runtime == "pipeline":
        # A run bounds its own retries (each step's retries, and LOST_ATTEMPTS for attempts
        # whose process stopped); the recoverer's limit is a backstop for a run no process
        # can execute.
        fs.recovery.set_max_attempts(ctx, RUN_RECOVERY_ATTEMPTS)
        fs.recovery.set_on_exhausted(ctx, EXHAUSTED_FLOW)
    payload = {
        "status": str(status),
        "controller": controller,
        "goal": goal,
        "owner": owner,
        "origin": origin,
        "current_step": current_step,
        "runtime": runtime,
    }
    if pipeline is not None:
        payload["pipeline"] = pipeline
    change = Change(
        status=status,
        record=record,
        event="created",
        payload=payload,
        flow=flow,
        data=data or {},
    )
    return ctx, change


def _new_run(
    pipeline: Pipeline, *, input: Any, owner: str, origin: str, run_id: str | None
) -> tuple[fs.StateCtx, Change]:
    """The ctx of a new run of ``pipeline`` and the change that creates it."""
    json_bytes(input, "input")
    data = {}
    if pipeline.definition is not None:
        data[DEFINITION] = encode(pipeline.definition).encode()
    return new_flow(
        FlowStatus.RUNNING,
        "pipeline",
        controller=pipeline.id,
        goal=pipeline.name,
        owner=owner,
        origin=origin,
        current_step=pipeline.start,
        state={"input": input, "outputs": {}},
        flow_id=run_id,
        pipeline=pipeline.id,
        run=new_progress(pipeline),
        flow=pipeline.flow_id,
        data=data,
    )


def new_run(
    pipeline: Pipeline,
    *,
    input: Any = None,
    id: str | None = None,
    owner: str = "",
    origin: str = "",
) -> fs.StateCtx:
    """The ctx of a new run of ``pipeline``, not committed yet.

    Commit it as it is (``Commit(Noop(ctx))``) and any engine that has the pipeline's flows
    (:func:`workflow_flows`) runs it, like a run :meth:`FlowManager.execute` starts with
    ``enqueue=True`` (minus the stored JSON definition). It gives tests and tools, such as
    :func:`flowstate.testing.flows.explore`, runs to start their own way.

    Raises:
        InvalidCommandError: ``input`` is not JSON, or an argument is not as documented.
    """
    ctx, change = _new_run(pipeline, input=input, owner=owner, origin=origin, run_id=id)
    move = stage(ctx, change).commands[0]
    assert isinstance(move, fs.Transit)
    ctx.current.transition = fs.Transition(to=move.to, annotations=dict(move.annotations or {}))
    return ctx


class FlowWatcher:
    """Snapshots of managed flows as their versions are committed (see
    :meth:`FlowManager.watch`). Steps' versions are skipped."""

    def __init__(self, watcher: fs.Watcher) -> None:
        self._watcher = watcher

    @property
    def rev(self) -> int:
        """Everything up to this revision has been delivered (resume with ``since_rev``)."""
        return self._watcher.rev

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ManagedFlow:
        while True:
            state = await anext(self._watcher)
            if is_flow(state):
                return flow_of(state)

    async def aclose(self) -> None:
        """Stop watching. Calling it again does nothing."""
        await self._watcher.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def resume_on_timer(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    """The flow a timer wait's delay fires: resume the waiting flow (event ``resumed``).

    The delay is bound to the version that started the wait, so this runs only when nothing
    moved the flow since; a version that somehow is not a timer wait is put back to rest.
    """
    state = ctx.committed
    if not is_flow(state):
        return fs.Noop()
    flow = flow_of(state)
    record = read_record(state)
    if flow.status is FlowStatus.WAITING and (record.wait or {}).get("kind") == "timer":
        change = resumed(flow, record, None, by="timer")
    else:
        change = Change(status=flow.status, record=record, event="")
    return stage(ctx, change)


async def fail_exhausted_run(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    """The flow the recoverer hands a pipeline run to once its recovery attempts are spent
    (no process could run it: its pipeline is registered nowhere, or every attempt
    crashed): fail the run, naming why (event ``failed``)."""
    state = ctx.committed
    if not is_flow(state):
        return fs.Commit(fs.End(ctx))
    flow = flow_of(state)
    record = read_record(state)
    if flow.status.is_terminal:
        return fs.Commit(fs.End(ctx))
    spent = "its recovery attempts are spent"
    why = state.transition.annotations.get(fs.recovery.ENDED_REASON, spent)
    step = (record.run or {}).get("step")
    details = {} if step is None else {"step": step}
    return stage(ctx, failed(flow, record, f"no process could run it: {why}", **details))


def _same(one: Pipeline, other: Pipeline) -> bool:
    """True when two pipelines run their runs alike: the same steps (functions, options and
    branches), start and name."""
    return (one.steps, one.start, one.name) == (other.steps, other.start, other.name)


# -- argument checks --------------------------------------------------------------------------


def _check_driven(flow: ManagedFlow) -> None:
    """Pipeline runs move only by their pipeline (and by request_cancel and cancel)."""
    if flow.runtime == "pipeline":
        raise fs.InvalidCommandError(
            f"{flow.id!r} is a run of pipeline {flow.pipeline!r}: its pipeline moves it; "
            "only request_cancel and cancel apply"
        )


def _check_id(flow_id: object) -> None:
    if not isinstance(flow_id, str) or not flow_id:
        raise fs.InvalidCommandError(f"a flow id must be a non-empty string, not {flow_id!r}")
    if flow_id.startswith("flowstate."):
        raise fs.InvalidCommandError(
            f"flow ids starting with 'flowstate.' are reserved: {flow_id!r}"
        )
    if STEPS_PART in flow_id:
        # Then a step's state id names one flow and one run: flow "a" with run "b/steps/c"
        # and flow "a/steps/b" with run "c" would share one.
        raise fs.InvalidCommandError(
            f"a flow id cannot contain {STEPS_PART!r} (the state ids of a flow's steps are "
            f"'<flow id>{STEPS_PART}<run id>'): {flow_id!r}"
        )


def _check_text(value: object, name: str, *, empty: bool = True) -> None:
    if not is_text(value) or (not empty and not value):
        need = "a non-empty string" if not empty else "a string"
        raise fs.InvalidCommandError(f"{name} must be {need} of valid Unicode text, not {value!r}")


def _timer_due(wait: dict[str, Any]) -> datetime.datetime:
    """When a timer wait is due.

    Raises:
        InvalidCommandError: It has neither a valid ``"at"`` nor a valid ``"seconds"``.
    """
    at, seconds = wait.get("at"), wait.get("seconds")
    if (at is None) == (seconds is None):
        raise fs.InvalidCommandError(
            f"a timer wait needs exactly one of 'at' (ISO 8601) or 'seconds', not {wait!r}"
        )
    if seconds is not None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not (0 <= seconds < 10**9)
        ):
            raise fs.InvalidCommandError(
                f"a timer's 'seconds' must be a number >= 0, not {seconds!r}"
            )
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    if not isinstance(at, str):
        raise fs.InvalidCommandError(f"a timer's 'at' must be an ISO 8601 string, not {at!r}")
    try:
        due = datetime.datetime.fromisoformat(at)
    except ValueError:
        raise fs.InvalidCommandError(f"a timer's 'at' is not an ISO 8601 time: {at!r}") from None
    if due.tzinfo is None:
        raise fs.InvalidCommandError(f"a timer's 'at' needs a timezone (e.g. 'Z'): {at!r}")
    try:
        return due.astimezone(datetime.UTC)
    except OverflowError:
        raise fs.InvalidCommandError(
            f"a timer's 'at' has no UTC time that a datetime can hold: {at!r}"
        ) from None


class _KeyedLocks:
    """One asyncio lock per key, dropped once nobody holds or waits for it. Waiters get it in
    the order they asked (an asyncio lock's), so no caller can take it twice in a row while
    another one waits."""

    def __init__(self) -> None:
        self._locks: dict[str, list[Any]] = {}  # key -> [lock, users]

    def hold(self, key: str) -> _Hold:
        return _Hold(self._locks, key)


class _Hold:
    """``async with locks.hold(key):`` holds the key's lock."""

    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: dict[str, list[Any]], key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        entry = self._locks.get(self._key)
        if entry is None:
            entry = self._locks[self._key] = [asyncio.Lock(), 0]
        entry[1] += 1
        self._entry = entry
        try:
            await entry[0].acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._entry[0].release()
        self._release_user()

    def _release_user(self) -> None:
        entry = self._entry
        entry[1] -= 1
        if not entry[1]:
            del self._locks[self._key]


#: The flow locks of each engine, shared by every FlowManager on it.
_ENGINE_LOCKS: weakref.WeakKeyDictionary[fs.Engine, _KeyedLocks] = weakref.WeakKeyDictionary()
