"""The application: routes, auth, limits and error handling, put together."""

import hmac
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
from attrs import asdict
from litestar import Litestar, Response, Router, get
from litestar.connection import ASGIConnection
from litestar.enums import MediaType, ScopeType
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.types import Message, Receive, ReceiveMessage, Scope, Send

import flowstate
from flowstate import Engine
from flowstate._checks import bearer_token, is_number
from flowstate._wire import ErrorBody, ErrorInfo, Health
from flowstate.drivers.base import SupportsLease
from flowstate.errors import DriverError, DriverUnavailableError, InvalidCommandError
from flowstate.recovery import Delayer, Recoverer
from flowstate.server import _console, _flows, _states, _store
from flowstate.server._context import (
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_BODY_SIZE,
    MIN_BODY_SIZE,
    ServerContext,
)
from flowstate.server._errors import EXCEPTION_HANDLERS, send_error
from flowstate.server._escape import QueryError, check_query, route_path
from flowstate.server._origin import refusal
from flowstate.server._strict import RequestChecks
from flowstate.workflows import StepFn

__all__ = ["FlowstateApp", "RecoveryInfo", "ServiceInfo", "create_app"]

#: Adds routes to an application: called with its context, returns a router.
RouterFactory = Callable[[ServerContext], Router]


class ServiceInfo(msgspec.Struct, kw_only=True):
    """A recovery service running in the server process.

    Attributes:
        holder: This process's name in the service's leader lease.
        is_leader: True while this process leads the service.
        leader: The holder of the live lease (maybe another process), or None.
        stats: The service's counters (``added``, ``completed``, ``retried``, ...).
    """

    holder: str
    is_leader: bool
    leader: str | None
    stats: dict[str, int]


class RecoveryInfo(msgspec.Struct, kw_only=True):
    """``GET /api/v1/recovery``: the recoverer and delayer of ``flowstate serve --recover``."""

    enabled: bool
    recoverer: ServiceInfo | None = None
    delayer: ServiceInfo | None = None


class FlowstateApp:
    """The ASGI application ``flowstate serve`` runs: Litestar, routed on raw paths.

    Before Litestar sees a request, a server without a token refuses it when it is not
    addressed to a loopback name or changes something from another origin (see
    :mod:`flowstate.server._origin`), and HEAD is answered as GET, without the body.

    Attributes:
        context: What the routes share (the engine, limits, the stop signal).
        litestar: The Litestar application.
    """

    def __init__(self, context: ServerContext, litestar: Litestar) -> None:
        self.context = context
        self.litestar = litestar

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            if not self.context.token_required:
                refused = refusal(scope)
                if refused is not None:
                    await send_error(send, *refused)
                    return
            raw = scope.get("raw_path")
            try:
                if raw:
                    scope["path"] = route_path(raw)
                check_query(scope.get("query_string", b""))
            except UnicodeDecodeError:
                message = "the path or the query string is not UTF-8 once percent-decoded"
                await send_error(send, 400, ErrorInfo(type="bad_request", message=message))
                return
            except QueryError as exc:
                await send_error(send, 400, ErrorInfo(type="bad_request", message=str(exc)))
                return
            if scope["method"] == "HEAD":
                # Answered as GET is, without the body (the ASGI server sends none for HEAD,
                # and it keeps its own scope): every GET route answers HEAD too.
                head = _HeadResponse(send)
                scope = {**scope, "method": "GET"}
                await self.litestar(scope, head.receive(receive), head.send)
                return
        await self.litestar(scope, receive, send)


class _HeadResponse:
    """The response to a HEAD request: the GET response's status and headers, complete as
    soon as they are sent. What the route sends after them is dropped, and the route is told
    the client left, so that a stream (a watch) ends instead of running on unread."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._complete = False

    async def send(self, message: Message) -> None:
        if self._complete:
            return
        await self._send(message)
        if message["type"] == "http.response.start":
            self._complete = True
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    def receive(self, receive: Receive) -> Receive:
        async def receive_or_leave() -> ReceiveMessage:
            if self._complete:
                return {"type": "http.disconnect"}
            return await receive()

        return receive_or_leave


def create_app(
    engine: Engine,
    *,
    token: str | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    keepalive: float = DEFAULT_KEEPALIVE,
    recoverer: Recoverer | None = None,
    delayer: Delayer | None = None,
    tasks: Mapping[str, StepFn] | None = None,
    routers: Sequence[RouterFactory] = (),
) -> FlowstateApp:
    """Build the HTTP application on an open engine.

    Args:
        engine: The open engine; its driver stores everything the routes read and write.
        token: When set, every route but ``/health`` and the console's files (``/``,
            ``/console/...``) needs ``Authorization: Bearer <token>``. Without it, only
            requests addressed to a loopback name are served, and only the server's own
            pages may change the store (the ``Origin`` rule).
        max_body_size: The largest request body accepted, in bytes (413 above it).
        keepalive: Seconds without versions after which a watch stream sends a comment.
        recoverer: A recoverer running on ``engine``, shown by ``GET /api/v1/recovery``.
        delayer: A delayer running on ``engine``, shown by ``GET /api/v1/recovery``.
        tasks: Step functions by task name, for the pipelines that ``POST
            /api/v1/flows/execute`` defines.
        routers: More routes, each built from the context (as the built-in ones are).

    Raises:
        InvalidCommandError: ``token`` is blank or holds a control character, or
            ``keepalive`` or ``max_body_size`` is out of range.
    """
    if token is not None:
        try:
            token = bearer_token(token, "token")
        except ValueError as exc:
            raise InvalidCommandError(str(exc)) from None
    if not is_number(keepalive, strict=True):
        raise InvalidCommandError(f"keepalive must be a number of seconds > 0, not {keepalive!r}")
    if type(max_body_size) is not int or max_body_size < MIN_BODY_SIZE:
        raise InvalidCommandError(
            f"max_body_size must be an int >= {MIN_BODY_SIZE} (bytes), not {max_body_size!r}"
        )
    context = ServerContext(
        engine=engine,
        max_body_size=max_body_size,
        keepalive=keepalive,
        recoverer=recoverer,
        delayer=delayer,
        tasks=dict(tasks or {}),
        token_required=token is not None,
    )
    handlers: list[object] = [
        _console.router(),
        _health(context),
        _recovery(context),
        _states.router(context),
        _store.router(context),
        _flows.router(context),
        *(factory(context) for factory in routers),
    ]
    checks = RequestChecks()
    litestar = Litestar(
        route_handlers=handlers,  # type: ignore[arg-type]
        guards=[_bearer(token), checks] if token else [checks],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=max_body_size,
        openapi_config=OpenAPIConfig(
            title="flowstate",
            version=flowstate.__version__,
            path="/schema",
            render_plugins=[JsonRenderPlugin()],
            use_handler_docstrings=True,
            openapi_router=Router(path="/schema", route_handlers=[], after_request=_json_404),
        ),
        logging_config=None,
    )
    checks.learn(litestar.routes)
    return FlowstateApp(context, litestar)


async def _json_404(response: Response[Any]) -> Response[Any]:
    """Litestar answers unknown paths under ``/schema`` with an HTML page: answer as every
    other route does."""
    if response.status_code != 404:
        return response
    info = ErrorInfo(type="no_route", message="the schema is at /schema/openapi.json")
    return Response(
        msgspec.json.encode(ErrorBody(error=info)), status_code=404, media_type=MediaType.JSON
    )


def _bearer(
    token: str,
) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]:
    expected = token.encode()  # the client sends the token's UTF-8 bytes

    def check(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("public"):
            return
        scheme, _, given = connection.headers.get("authorization", "").partition(" ")
        # Header values arrive decoded as latin-1: encoding them back gives the raw bytes.
        presented = given.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, expected):
            raise NotAuthorizedException(
                "this server needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="flowstate"'},
            )

    return check


def _health(context: ServerContext) -> object:
    driver = context.engine.driver

    @get("/health", opt={"public": True}, summary="Is the store reachable", tags=["server"])
    async def health() -> Health:
        """200 with the store's latest revision and whether the other routes need a token,
        or 503 when the store cannot be reached. Needs no token."""
        try:
            rev = await driver.head_rev()
        except DriverError as exc:
            raise DriverUnavailableError(f"the store is unavailable: {exc}") from exc
        return Health(status="ok", rev=rev, token_required=context.token_required)

    return health


def _recovery(context: ServerContext) -> object:
    driver = context.engine.driver

    async def describe(service: Recoverer | Delayer | None) -> ServiceInfo | None:
        if service is None:
            return None
        lease = None
        if isinstance(driver, SupportsLease):
            lease = await driver.get_lease(service.lease_name)
        return ServiceInfo(
            holder=service.holder,
            is_leader=service.is_leader,
            leader=lease.holder if lease is not None else None,
            stats=asdict(service.stats),
        )

    @get("/api/v1/recovery", summary="The recovery services of this server", tags=["server"])
    async def recovery() -> RecoveryInfo:
        """The recoverer and delayer ``flowstate serve --recover`` runs: who leads them in
        the cluster, whether this server does, and their counters since it started."""
        return RecoveryInfo(
            enabled=context.recoverer is not None or context.delayer is not None,
            recoverer=await describe(context.recoverer),
            delayer=await describe(context.delayer),
        )

    return recovery
