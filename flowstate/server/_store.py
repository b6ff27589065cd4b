"""Writing and coordination routes: commits, the head revision, delays and leases.

These are the routes the remote driver (``http://`` URLs) stores through; any client may use
them. Each one is the ``Driver`` method of the same name, over HTTP.
"""

import asyncio
from typing import Annotated

from litestar import Router, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath, JSONBody, QueryParameter

import flowstate
from flowstate._checks import MAX_REV
from flowstate._wire import (
    MAX_PAGE,
    CommitBatch,
    CommitBatchReply,
    CommitOutcome,
    Head,
    LeaseClaim,
    LeaseReply,
    ServerInfo,
    error_info,
    error_status,
)
from flowstate.drivers._args import check_request
from flowstate.drivers.base import CommitRequest, CommitResult, DelaysPage, Lease, SupportsLease
from flowstate.errors import DriverError, FlowstateError, InvalidCommandError
from flowstate.server._context import ServerContext, wait_for_rev
from flowstate.server._escape import unescape

__all__ = ["MAX_WAIT", "router"]

#: The longest a long poll of ``GET /api/v1/head`` waits, in seconds.
MAX_WAIT = 60.0


def router(ctx: ServerContext) -> Router:
    """The driver routes of ``ctx``'s store."""
    driver = ctx.engine.driver

    async def checked_commit(request: CommitRequest) -> CommitResult:
        check_request(request)
        return await driver.commit(request)

    @get("/api/v1/info", summary="What the server is")
    async def info() -> ServerInfo:
        """The server's version, its store's driver and its limits."""
        return ServerInfo(
            version=flowstate.__version__,
            driver=driver.scheme,
            max_body_size=ctx.max_body_size,
            max_page=MAX_PAGE,
        )

    @post("/api/v1/commit", status_code=200, summary="Commit states atomically")
    async def commit(data: JSONBody[CommitRequest]) -> CommitResult:
        """Write every state of the commit if each one's stored latest revision is its
        ``expected_rev``; otherwise write nothing and answer 409 listing every conflict.
        A write the engine could not have sent (an empty id, one id twice, a delay due
        beyond the dates a store can hold...) is refused with 400 before anything is
        written."""
        return await checked_commit(data)

    @post("/api/v1/commits", status_code=200, summary="Apply several independent commits")
    async def commits(data: JSONBody[CommitBatch]) -> CommitBatchReply:
        """Apply each commit of the batch as ``POST /api/v1/commit`` would, concurrently (the
        store may group them into one transaction); one outcome per commit, in order."""
        results = await asyncio.gather(
            *(checked_commit(request) for request in data.commits), return_exceptions=True
        )
        return CommitBatchReply(outcomes=[_outcome(result) for result in results])

    @get("/api/v1/head", summary="The store's latest revision")
    async def head(
        wait_for: Annotated[
            int,
            QueryParameter(
                ge=0, le=MAX_REV, description="wait until the store reaches this revision"
            ),
        ] = 0,
        # Named as the query parameter is, so that a bad value's error names it.
        timeout: Annotated[  # noqa: ASYNC109
            float, QueryParameter(ge=0, description=f"seconds (<= {MAX_WAIT:g})")
        ] = 30.0,
    ) -> Head:
        """The latest revision. With ``wait_for``, a long poll: the answer comes once the
        store reaches that revision, or after ``timeout`` seconds, or when the server stops
        (look at ``rev`` to tell)."""
        if wait_for:
            await wait_for_rev(ctx, wait_for, min(timeout, MAX_WAIT))
        return Head(rev=await driver.head_rev())

    @get("/api/v1/delays", summary="Delays in commit order")
    async def delays(
        since_rev: Annotated[int, QueryParameter(ge=0)] = 0,
        limit: Annotated[
            int, QueryParameter(ge=0, description="page size; 0 asks only whether there are any")
        ] = 100,
    ) -> DelaysPage:
        """One page of the delays committed after ``since_rev``. With ``limit=0``, an empty
        page whose ``more`` says whether there are delays after ``since_rev``."""
        return await driver.get_delays(since_rev, min(limit, MAX_PAGE))

    handlers: list[HTTPRouteHandler] = [info, commit, commits, head, delays]
    if isinstance(driver, SupportsLease):
        handlers += _lease_routes(driver)
    return Router(path="/", route_handlers=handlers, tags=["store"])


def _outcome(result: CommitResult | BaseException) -> CommitOutcome:
    if isinstance(result, CommitResult):
        return CommitOutcome(result=result)
    if not isinstance(result, FlowstateError):
        raise result
    known = error_status(result)
    if known is None:
        raise DriverError(f"commit failed: {result}") from result
    return CommitOutcome(error=error_info(result, known[1]))


def _named(name: str, lease: Lease) -> Lease:
    if unescape(name) != lease.name:
        raise InvalidCommandError(
            f"the lease in the body is {lease.name!r}, not {unescape(name)!r}"
        )
    return lease


def _lease_routes(driver: SupportsLease) -> list[HTTPRouteHandler]:
    @post("/api/v1/leases/{name:str}/acquire", status_code=200, summary="Claim a lease")
    async def acquire(name: FromPath[str], data: JSONBody[LeaseClaim]) -> LeaseReply:
        """The lease, or ``null`` while another holder's claim is live."""
        return LeaseReply(lease=await driver.acquire_lease(unescape(name), data.holder, data.ttl))

    @post("/api/v1/leases/{name:str}/renew", status_code=200, summary="Extend a lease")
    async def renew(name: FromPath[str], data: JSONBody[Lease]) -> LeaseReply:
        """The renewed lease, or ``null`` when the claim was lost."""
        return LeaseReply(lease=await driver.renew_lease(_named(name, data)))

    @post("/api/v1/leases/{name:str}/release", status_code=200, summary="Give a lease up")
    async def release(name: FromPath[str], data: JSONBody[Lease]) -> LeaseReply:
        """Give up the claim at once (releasing a lost claim does nothing)."""
        await driver.release_lease(_named(name, data))
        return LeaseReply(lease=None)

    @get("/api/v1/leases/{name:str}", summary="Who holds a lease")
    async def holder(name: FromPath[str]) -> LeaseReply:
        """The live claim on the lease, or ``null``."""
        return LeaseReply(lease=await driver.get_lease(unescape(name)))

    return [acquire, renew, release, holder]
