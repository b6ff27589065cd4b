"""Managed-flow routes: read flows, their events and steps; report a step; resume and cancel.

Each handler is one :class:`flowstate.workflows.FlowManager` call; the lifecycle rules are the
manager's (a move it refuses is a 409). The executions routes of pipelines
(``POST /api/v1/flows/execute``, ``GET /api/v1/flows/executions[/{id}]``) belong here too;
their static paths take precedence over ``/api/v1/flows/{flow_id}``.
"""

from typing import Annotated, Any

import msgspec
from litestar import Router, get, post
from litestar.params import FromPath, JSONBody, QueryParameter

from flowstate._wire import MAX_PAGE
from flowstate.server._context import ServerContext
from flowstate.server._escape import unescape
from flowstate.workflows import (
    FlowEvent,
    FlowManager,
    FlowStep,
    ManagedFlow,
    StepObservation,
)
from flowstate.workflows._model import flow_of

__all__ = ["FlowsPage", "Resume", "StepReport", "router"]


class FlowsPage(msgspec.Struct, kw_only=True):
    """One page of managed flows at their latest versions, oldest change first.

    Attributes:
        flows: The flows.
        more: True when a next page exists: ask again with ``since_rev`` set to the last
            flow's ``revision``.
    """

    flows: list[ManagedFlow]
    more: bool


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


Filter = Annotated[str | None, QueryParameter(description="only flows with this value")]


def router(ctx: ServerContext) -> Router:
    """The managed-flow routes of ``ctx``'s store."""
    engine = ctx.engine
    manager = FlowManager(engine)

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
        query = manager.query(
            owner=owner,
            status=status,
            controller=controller,
            runtime=runtime,
            since_rev=since_rev,
            limit=min(limit, MAX_PAGE),
        )
        page = await engine.get_states(query)
        return FlowsPage(flows=[flow_of(state) for state in page.states], more=page.more)

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
