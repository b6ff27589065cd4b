"""Managed-flow and execution routes, each handler one :class:`FlowManager` call.

* Managed flows: read and list them, their events and steps; report a step; resume, ask to
  cancel, cancel. The lifecycle rules are the manager's: a move it refuses is a 409.
* Executions, as the flow-manager microservice has them: ``POST /api/v1/flows/execute`` takes
  a JSON pipeline definition whose tasks run the server's ``--tasks`` functions, and starts a
  run (a managed flow of runtime ``pipeline``); ``GET /api/v1/flows/executions[/{id}]`` reads
  runs with every task attempt. The static paths take precedence over
  ``/api/v1/flows/{flow_id}``, so a managed flow called ``execute`` or ``executions`` is read
  at ``/api/v1/states/{id}`` instead.
"""

import datetime
from typing import Annotated, Any

import msgspec
from litestar import Response, Router, get, post
from litestar.params import FromPath, JSONBody, QueryParameter

from flowstate._wire import MAX_PAGE
from flowstate.errors import NotFoundError
from flowstate.server._context import ServerContext
from flowstate.server._escape import unescape
from flowstate.workflows import (
    FlowEvent,
    FlowManager,
    FlowsPage,
    FlowStep,
    ManagedFlow,
    Pipeline,
    StepObservation,
)

__all__ = [
    "ExecuteRequest",
    "Execution",
    "ExecutionAccepted",
    "ExecutionsPage",
    "Resume",
    "StepReport",
    "router",
]


class StepReport(msgspec.Struct, kw_only=True):
    """``POST /api/v1/flows/{flow_id}/steps``: a step observation (``StepObservation``
    without the flow id, which the path gives)."""

    run_id: str
    task: str
    status: str  # a StepStatus value; the manager checks it
    child_session_key: str | None = None
    result: Any = None
    error: str | None = None


class Resume(msgspec.Struct, kw_only=True):
    """``POST /api/v1/flows/{flow_id}/resume``: what to merge into the flow's state."""

    patch: dict[str, Any] | None = None


class ExecutionAccepted(msgspec.Struct, kw_only=True):
    """``POST /api/v1/flows/execute``: the run that was started."""

    execution_id: str
    flow_id: str
    status: str


class Execution(msgspec.Struct, kw_only=True):
    """A run of a pipeline.

    Attributes:
        execution_id: The run's id (its managed flow's id).
        flow_id: The id of the pipeline (the definition's ``flow.id``).
        name: The pipeline's name.
        status: ``running``, ``finished``, ``failed`` or ``cancelled``.
        current_task: The task the run is at (or ended at).
        state: The run's state: its ``input``, the ``outputs`` of completed tasks, and a
            ``failure`` when it failed.
        tasks: Every attempt of every task, oldest first, with its status and result (or
            error); only in ``GET /api/v1/flows/executions/{id}``.
        created_at: When the run started.
        updated_at: When it last changed.
    """

    execution_id: str
    flow_id: str
    name: str
    status: str
    current_task: str
    state: dict[str, Any]
    created_at: datetime.datetime
    updated_at: datetime.datetime
    tasks: list[FlowStep] | None = None


class ExecutionsPage(msgspec.Struct, kw_only=True):
    """One page of runs, oldest change first; ``more``: ask again with ``since_rev``."""

    executions: list[Execution]
    more: bool
    last_rev: int


def _execution(run: ManagedFlow, tasks: list[FlowStep] | None = None) -> Execution:
    return Execution(
        execution_id=run.id,
        flow_id=run.pipeline or run.controller,
        name=run.goal,
        status=str(run.status),
        current_task=run.current_step,
        state=run.state,
        created_at=run.created_at,
        updated_at=run.updated_at,
        tasks=tasks,
    )


class ExecuteRequest(msgspec.Struct, kw_only=True):
    """``POST /api/v1/flows/execute``: a pipeline definition and one run of it.

    Attributes:
        flow: The definition (``{"id", "name", "start_task", "tasks", "conditions"}``),
            checked by ``Pipeline.from_definition``, which lists every problem it finds.
        input: The run's input.
        owner: Who the run belongs to.
    """

    flow: Any = None
    input: Any = None
    owner: str = ""


Filter = Annotated[str | None, QueryParameter(description="only flows with this value")]


def router(ctx: ServerContext) -> Router:
    """The managed-flow and execution routes of ``ctx``'s store."""
    engine = ctx.engine
    manager = FlowManager(engine)

    @post("/api/v1/flows/execute", status_code=202, summary="Run a pipeline definition")
    async def execute(data: JSONBody[ExecuteRequest]) -> Response[ExecutionAccepted]:
        """Start a run of the pipeline the JSON definition describes (``{"flow": {"id",
        "name", "start_task", "tasks", "conditions"}}``, optional ``"input"`` and
        ``"owner"``); each task runs the server's ``--tasks`` function of its name. 202 with
        the ``execution_id``; a definition with problems is a 422 that lists every one; any
        other field, or an ``owner`` that is not a string, is a 400."""
        # The definition alone: "input" and "owner" belong to this run, not to the pipeline.
        pipeline = Pipeline.from_definition({"flow": data.flow}, tasks=ctx.tasks)
        manager.register(pipeline)
        run = await manager.execute(pipeline.id, input=data.input, owner=data.owner, origin="http")
        accepted = ExecutionAccepted(execution_id=run.id, flow_id=pipeline.id, status="running")
        return Response(accepted, status_code=202)

    @get("/api/v1/flows/executions", summary="List pipeline runs")
    async def executions(
        status: Filter = None,
        flow_id: Annotated[str | None, QueryParameter(description="one pipeline's runs")] = None,
        since_rev: Annotated[int, QueryParameter(ge=0)] = 0,
        limit: Annotated[int, QueryParameter(ge=1)] = 100,
    ) -> ExecutionsPage:
        """Runs at their latest versions, oldest change first, filtered by status and by
        pipeline; the next page starts after ``last_rev``."""
        page = await manager.page(
            status=status,
            runtime="pipeline",
            pipeline=flow_id,
            since_rev=since_rev,
            limit=min(limit, MAX_PAGE),
        )
        runs = [_execution(run) for run in page.flows]
        return ExecutionsPage(executions=runs, more=page.more, last_rev=page.last_rev)

    @get("/api/v1/flows/executions/{execution_id:str}", summary="Read a pipeline run")
    async def execution(execution_id: FromPath[str]) -> Execution:
        """The run's status, the task it is at, and every task attempt with its result."""
        run_id = unescape(execution_id)
        run = await manager.get(run_id)
        if run.runtime != "pipeline":
            raise NotFoundError(f"{run_id!r} is a managed flow, not a pipeline run")
        return _execution(run, await manager.steps(run_id))

    @get("/api/v1/flows", summary="List managed flows")
    async def list_flows(
        owner: Filter = None,
        status: Filter = None,
        controller: Filter = None,
        runtime: Filter = None,
        since_rev: Annotated[int, QueryParameter(ge=0)] = 0,
        limit: Annotated[int, QueryParameter(ge=1)] = 100,
    ) -> FlowsPage:
        """Managed flows at their latest versions, filtered by owner, status (``created``,
        ``running``, ``waiting``, ``finished``, ``failed``, ``cancelled``), controller and
        runtime; a flow that moved on from a status is not listed under it any more."""
        return await manager.page(
            owner=owner,
            status=status,
            controller=controller,
            runtime=runtime,
            since_rev=since_rev,
            limit=min(limit, MAX_PAGE),
        )

    @get("/api/v1/flows/{flow_id:str}", summary="Read a managed flow")
    async def read(flow_id: FromPath[str]) -> ManagedFlow:
        """The flow's latest version."""
        return await manager.get(unescape(flow_id))

    @get("/api/v1/flows/{flow_id:str}/events", summary="A managed flow's audit trail")
    async def events(flow_id: FromPath[str]) -> list[FlowEvent]:
        """Every change of the flow, oldest first."""
        return await manager.events(unescape(flow_id))

    @get("/api/v1/flows/{flow_id:str}/steps", summary="A managed flow's steps")
    async def steps(flow_id: FromPath[str]) -> list[FlowStep]:
        """The flow's steps, in the order they were first recorded."""
        return await manager.steps(unescape(flow_id))

    @post("/api/v1/flows/{flow_id:str}/steps", status_code=200, summary="Report a step")
    async def record_step(flow_id: FromPath[str], data: JSONBody[StepReport]) -> FlowStep:
        """Record a step observation: created, or updated by ``(flow_id, run_id)``."""
        observation = StepObservation(flow_id=unescape(flow_id), **msgspec.structs.asdict(data))
        return await manager.record_step(observation)

    @post("/api/v1/flows/{flow_id:str}/resume", status_code=200, summary="Resume a flow")
    async def resume(flow_id: FromPath[str], data: JSONBody[Resume]) -> ManagedFlow:
        """``waiting → running``: clears the wait and merges ``patch`` into the state."""
        return await manager.resume(unescape(flow_id), patch=data.patch)

    @post("/api/v1/flows/{flow_id:str}/request-cancel", status_code=200, summary="Ask to cancel")
    async def request_cancel(flow_id: FromPath[str]) -> ManagedFlow:
        """Mark the flow for cancellation (sticky); its status does not change."""
        return await manager.request_cancel(unescape(flow_id))

    @post("/api/v1/flows/{flow_id:str}/cancel", status_code=200, summary="Cancel a flow")
    async def cancel(flow_id: FromPath[str]) -> ManagedFlow:
        """Any status that is not terminal ``→ cancelled``."""
        return await manager.cancel(unescape(flow_id))

    return Router(
        path="/",
        route_handlers=[
            execute,
            executions,
            execution,
            list_flows,
            read,
            events,
            steps,
            record_step,
            resume,
            request_cancel,
            cancel,
        ],
        tags=["managed flows"],
    )
