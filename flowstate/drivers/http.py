"""The remote driver: a store reached through ``flowstate serve`` (``http://`` and ``https://``).

``Engine("http://host:8080")`` stores through a server that holds the real store (SQLite,
etcd, ...) with its credentials; the engine's machine needs none of them. The server's routes
mirror the ``Driver`` methods (see the README); errors come back as the flowstate errors they
were on the server: ``ConflictError`` with every conflict, ``NotFoundError``,
``InvalidQueryError``; a server that cannot be reached, or whose store cannot, is
``DriverUnavailableError``. No httpx exception reaches the caller.

URL: ``http[s]://host:port[/base-path][?timeout=S&ca=/path/ca.pem]``

* ``timeout``: seconds a request may take (default 30, from 0.001 to 3600; long polls add
  their own wait);
* ``ca``: a CA bundle to check an ``https`` server's certificate with.

The bearer token comes from the ``FLOWSTATE_TOKEN`` environment variable (or the ``token``
argument), never from the URL; it never appears in ``repr`` or errors.

Commits issued concurrently through one driver travel together: while a few requests are in
flight, new commits queue and go as one ``POST /api/v1/commits``, which the server applies
concurrently (SQLite and etcd then group them into one transaction). Each commit keeps its own
atomicity and its own outcome.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import msgspec

from flowstate._checks import bearer_token, env_token
from flowstate._lifecycle import Lifecycle, not_open
from flowstate._query import StatesPage, StatesQuery
from flowstate._state import State
from flowstate._wire import (
    CommitBatchReply,
    DataVersion,
    ErrorBody,
    ErrorInfo,
    Head,
    LeaseClaim,
    LeaseReply,
    ServerInfo,
    conflict_error,
)
from flowstate.drivers import _args
from flowstate.drivers.base import (
    CommitRequest,
    CommitResult,
    DelaysPage,
    Driver,
    Lease,
)
from flowstate.errors import (
    ClosedError,
    DriverError,
    DriverUnavailableError,
    FlowstateError,
    InvalidCommandError,
    InvalidQueryError,
    InvalidURLError,
    NotFoundError,
)

if TYPE_CHECKING:
    from typing import Self

__all__ = ["HTTPDriver"]

#: The environment variable the driver reads its bearer token from.
TOKEN_ENV: Final = "FLOWSTATE_TOKEN"
#: Seconds one long poll of the server's head revision may wait.
POLL_WAIT: Final = 25.0
#: The smallest and largest ``timeout`` a URL may set, in seconds.
TIMEOUT_RANGE: Final = (0.001, 3600.0)
#: Commit requests in flight at once; further commits queue and go together in the next one.
MAX_IN_FLIGHT: Final = 4

T = TypeVar("T")

_JSON = {"Content-Type": "application/json"}


class _PendingCommit:
    __slots__ = ("body", "future")

    def __init__(self, body: bytes, future: asyncio.Future[CommitResult]) -> None:
        self.body = body
        self.future = future


def _segment(text: str) -> str:
    """``text`` as one path segment: ``/`` and every other reserved character escaped.

    Raises:
        InvalidQueryError: ``text`` is not valid Unicode (it holds a lone surrogate).
    """
    try:
        quoted = quote(text, safe="")
    except UnicodeEncodeError:
        raise InvalidQueryError(f"{text!r} is not valid text (a lone surrogate)") from None
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


class HTTPDriver(Driver):
    """Stores through a ``flowstate serve`` server.

    Args:
        url: The server's base URL, ``http://host:port`` or ``https://host:port/base``.
        token: The bearer token; default: the ``FLOWSTATE_TOKEN`` environment variable.
        timeout: Seconds a request may take.
        ca: A CA bundle (PEM file) that signed an ``https`` server's certificate.
    """

    scheme = "http"

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        ca: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.ca = ca
        try:
            self._token = env_token(TOKEN_ENV) if token is None else bearer_token(token, "token")
        except ValueError as exc:
            raise InvalidURLError(str(exc)) from None
        self._lifecycle = Lifecycle.UNOPENED
        self._client: httpx.AsyncClient | None = None
        self._group: asyncio.TaskGroup | None = None
        self.max_body_size = 0
        self._head = 0
        self._polling = False
        self._followers: list[asyncio.Future[None]] = []
        self._queue: list[_PendingCommit] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._encode = msgspec.json.Encoder().encode
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Create an unopened driver from an ``http://`` or ``https://`` URL.

        Raises:
            InvalidURLError: The URL is not a valid remote driver URL.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidURLError(f"{url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidURLError(f"{url!r} is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise InvalidURLError(
                f"{parts.scheme}://{parts.hostname}...: put the token in ${TOKEN_ENV}, "
                "not in the URL"
            )
        if not parts.hostname:
            raise InvalidURLError(f"{url!r}: expected {scheme}://host:port")
        if parts.fragment:
            raise InvalidURLError(f"{url!r}: a server URL has no fragment")
        options: dict[str, Any] = {}
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise InvalidURLError(f"{url!r}: malformed query string ({exc})") from None
        for key, value in pairs:
            if key == "timeout":
                options["timeout"] = _args.url_number(url, key, value)
                low, high = TIMEOUT_RANGE
                if not low <= options["timeout"] <= high:
                    raise InvalidURLError(
                        f"{url!r}: timeout must be a number of seconds from {low:g} to {high:g}"
                    )
            elif key == "ca" and scheme == "https":
                options["ca"] = value
            else:
                known = "timeout, ca" if scheme == "https" else "timeout"
                raise InvalidURLError(f"{url!r}: unknown option {key!r}; known options: {known}")
        netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:
            netloc = f"[{parts.hostname}]" + (f":{port}" if port is not None else "")
        base = f"{scheme}://{netloc}{parts.path}"
        try:
            httpx.URL(base)
        except httpx.InvalidURL as exc:  # a control character in the path, say
            raise InvalidURLError(f"{url!r}: {exc}") from None
        return cls(base, **options)

    def __repr__(self) -> str:
        token = "set" if self._token else "none"
        return f"HTTPDriver({self.url!r}, token={token}, {self._lifecycle.name.lower()})"

    # -- lifecycle ---------------------------------------------------------------------------

    def _check(self) -> httpx.AsyncClient:
        if self._lifecycle is not Lifecycle.OPENED or self._client is None:
            raise not_open(self._lifecycle, f"the http driver for {self.url}")
        return self._client

    async def open(self) -> None:
        """Connect and check the server: it answers, accepts the token, and is flowstate.

        Raises:
            ClosedError: The driver was closed.
            DriverUnavailableError: The server cannot be reached.
            DriverError: The server refused the token or is not a flowstate server.
        """
        if self._lifecycle is Lifecycle.CLOSED:
            raise ClosedError("the http driver is closed and cannot be reopened")
        if self._lifecycle is Lifecycle.OPENED:
            return
        verify: ssl.SSLContext | bool = True
        if self.ca is not None:
            try:
                verify = ssl.create_default_context(cafile=self.ca)
            except OSError as exc:
                raise DriverError(f"cannot read the CA bundle {self.ca!r}: {exc}") from exc
        headers = [(b"Authorization", f"Bearer {self._token}".encode())] if self._token else []
        transport = httpx.AsyncHTTPTransport(
            verify=verify,
            retries=1,  # connecting again is always safe: nothing was sent
            # Without it, a body sent after its headers waits for a delayed ACK (~40 ms).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=32),
        )
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=self.timeout,
            transport=transport,
            trust_env=False,
        )
        self._lifecycle = Lifecycle.OPENED
        try:
            info = await self._call("GET", "/api/v1/info", ServerInfo)
        except BaseException:
            self._lifecycle = Lifecycle.UNOPENED
            client, self._client = self._client, None
            await client.aclose()
            raise
        self.max_body_size = info.max_body_size
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group

    async def aclose(self) -> None:
        """Close the connections. Commits in flight fail with ``ClosedError``."""
        if self._lifecycle is Lifecycle.CLOSED:
            return
        self._lifecycle = Lifecycle.CLOSED
        self._wake_followers()
        queued, self._queue = self._queue, []
        for pending in queued:
            if not pending.future.done():
                pending.future.set_exception(ClosedError("the http driver was closed"))
        group, self._group = self._group, None
        client, self._client = self._client, None
        try:
            if group is not None:
                for task in list(self._tasks):
                    task.cancel()
                await group.__aexit__(None, None, None)
        finally:
            if client is not None:
                await client.aclose()

    # -- requests ----------------------------------------------------------------------------

    def _decoder(self, kind: type[T]) -> msgspec.json.Decoder[T]:
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = msgspec.json.Decoder(kind)
        return decoder

    async def _call(
        self,
        method: str,
        path: str,
        kind: type[T],
        *,
        body: bytes | None = None,
        params: dict[str, Any] | None = None,
        seconds: float | None = None,
        refused: type[InvalidCommandError | InvalidQueryError] = InvalidCommandError,
    ) -> T:
        """Send one request and decode the answer as ``kind``; errors become flowstate's.

        ``refused`` is the error of a body over the server's limit: a body is a command
        (a commit, a lease) or a query."""
        client = self._check()
        try:
            response = await client.request(
                method,
                path,
                content=body,
                params=params,
                headers=_JSON if body is not None else None,
                timeout=seconds if seconds is not None else self.timeout,
            )
        except httpx.TransportError as exc:
            if self._lifecycle is Lifecycle.CLOSED:
                raise ClosedError("the http driver was closed") from exc
            tls = _tls_failure(exc)
            if tls is not None:
                # Retrying cannot help: the server's certificate, or the scheme, is wrong.
                raise DriverError(f"TLS with {self.url} failed: {tls}") from exc
            raise DriverUnavailableError(
                f"cannot reach the flowstate server at {self.url}: {str(exc) or type(exc).__name__}"
            ) from exc
        except httpx.HTTPError as exc:
            raise DriverError(f"request to {self.url} failed: {exc}") from exc
        except httpx.InvalidURL as exc:
            # An argument that makes the request's URL one httpx refuses (over 64 KiB, say).
            raise DriverError(
                f"cannot send {method} {path[:60]!r}... to {self.url}: {exc}"
            ) from exc
        if response.status_code >= 300:
            raise self._error(response, refused)
        try:
            return self._decoder(kind).decode(response.content)
        except msgspec.DecodeError as exc:
            raise DriverError(
                f"{self.url} answered {method} {path} with something that is not flowstate's"
            ) from exc

    def _error(
        self,
        response: httpx.Response,
        refused: type[InvalidCommandError | InvalidQueryError] = InvalidCommandError,
    ) -> FlowstateError:
        status = response.status_code
        try:
            info = self._decoder(ErrorBody).decode(response.content).error
        except msgspec.DecodeError:
            info = ErrorInfo(
                type="http_error", message=response.text[:200] or response.reason_phrase
            )
        return self._error_from(status, info, refused)

    def _error_from(
        self,
        status: int,
        info: ErrorInfo,
        refused: type[InvalidCommandError | InvalidQueryError] = InvalidCommandError,
    ) -> FlowstateError:
        """The flowstate error an error response stands for (the inverse of the server's
        table in ``flowstate._wire``); a body over the limit is ``refused``."""
        kind, message = info.type, info.message
        if kind == "conflict":
            return conflict_error(info)
        if kind == "not_found":
            return NotFoundError(message)
        if kind == "invalid_query":
            return InvalidQueryError(message)
        if kind == "invalid_command":
            return InvalidCommandError(message)
        if kind == "too_large":
            what = "query" if issubclass(refused, InvalidQueryError) else "request"
            return self._too_large(refused, what)
        if kind == "unavailable" or status in (502, 503, 504):
            return DriverUnavailableError(f"the flowstate server at {self.url}: {message}")
        if status in (401, 403):
            return DriverError(
                f"the flowstate server at {self.url} refused the request ({message}); "
                f"set ${TOKEN_ENV} to its token"
            )
        if kind == "no_route":
            return DriverError(f"{self.url} has no such route; is it a flowstate server?")
        return DriverError(f"the flowstate server at {self.url} answered {status}: {message}")

    def _too_large(
        self,
        refused: type[InvalidCommandError | InvalidQueryError],
        what: str,
        size: int | None = None,
    ) -> InvalidCommandError | InvalidQueryError:
        """The error of a body (``what``: a commit, a query) larger than the server accepts."""
        is_size = f"is {size} bytes encoded, more than" if size is not None else "is larger than"
        return refused(
            f"the {what} {is_size} the server at {self.url} accepts "
            f"({self.max_body_size} bytes; flowstate serve --max-body-size)"
        )

    def _check_size(
        self, body: bytes, what: str, refused: type[InvalidCommandError | InvalidQueryError]
    ) -> None:
        """Refuse a body the server would refuse, before sending it."""
        if self.max_body_size and len(body) > self.max_body_size:
            raise self._too_large(refused, what, len(body))

    # -- commits -----------------------------------------------------------------------------

    async def commit(self, request: CommitRequest) -> CommitResult:
        self._check()
        try:
            body = self._encode(request)
        except (UnicodeEncodeError, TypeError, OverflowError) as exc:
            raise InvalidCommandError(f"the commit cannot be sent as JSON: {exc}") from None
        self._check_size(body, "commit", InvalidCommandError)
        pending = _PendingCommit(body, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._flush_soon()
        try:
            result = await pending.future
        except asyncio.CancelledError:
            if pending in self._queue:
                self._queue.remove(pending)  # never sent
            raise
        self._advance(result.revs[-1] if result.revs else 0)
        return result

    def _flush_soon(self) -> None:
        """Send what is queued once the flows that are ready to run have run.

        Flows woken together (by the answer to one request) commit in the same turn of the
        event loop; sending after that turn puts their commits into one request.
        """
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            if self._lifecycle is not Lifecycle.OPENED:
                return
            self._send_next()

    def _send_next(self) -> None:
        """Send the queued commits (as many as fit in one request body) in one request."""
        assert self._group is not None
        budget = self.max_body_size - 1024 if self.max_body_size else 1 << 20
        batch: list[_PendingCommit] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].body) <= budget):
            pending = self._queue.pop(0)
            batch.append(pending)
            size += len(pending.body) + 1
        if batch:
            self._in_flight += 1
            task = self._group.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_PendingCommit]) -> None:
        try:
            if len(batch) == 1:
                batch[0].future.set_result(
                    await self._call("POST", "/api/v1/commit", CommitResult, body=batch[0].body)
                )
                return
            body = b'{"commits":[' + b",".join(p.body for p in batch) + b"]}"
            reply = await self._call("POST", "/api/v1/commits", CommitBatchReply, body=body)
            for pending, outcome in zip(batch, reply.outcomes, strict=False):
                if pending.future.done():
                    continue
                if outcome.result is not None:
                    pending.future.set_result(outcome.result)
                else:
                    info = outcome.error or ErrorInfo(type="driver_error", message="no outcome")
                    pending.future.set_exception(self._error_from(409, info))
        except asyncio.CancelledError:
            self._fail(batch, ClosedError("the http driver was closed; the commit may be lost"))
            raise
        except Exception as exc:  # noqa: BLE001 (each commit's caller gets the error)
            # Never raise out of the task: the task group would cancel whoever opened us.
            self._fail(batch, exc)
        finally:
            # An answer with too few outcomes leaves commits whose fate is unknown.
            self._fail(batch, DriverUnavailableError(f"{self.url} gave no outcome for a commit"))
            self._in_flight -= 1
            if self._queue and self._lifecycle is Lifecycle.OPENED:
                self._flush_soon()

    @staticmethod
    def _fail(batch: list[_PendingCommit], exc: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    # -- reads -------------------------------------------------------------------------------

    async def get_state(self, state_id: str, rev: int = 0) -> State:
        _args.check_read(state_id, rev)
        params = {"rev": rev} if rev else None
        return await self._call("GET", f"/api/v1/states/{_segment(state_id)}", State, params=params)

    async def get_states(self, query: StatesQuery) -> StatesPage:
        self._check()
        try:
            body = self._encode(query)
        except (UnicodeEncodeError, TypeError, OverflowError) as exc:
            raise InvalidQueryError(f"the query cannot be sent as JSON: {exc}") from None
        self._check_size(body, "query", InvalidQueryError)
        page = await self._call(
            "POST", "/api/v1/states/query", StatesPage, body=body, refused=InvalidQueryError
        )
        self._advance(page.head_rev)
        return page

    async def head_rev(self) -> int:
        head = (await self._call("GET", "/api/v1/head", Head)).rev
        self._advance(head)
        return head

    async def wait_for_rev(self, rev: int) -> None:
        """Return once the server's store reaches ``rev``.

        Waiters share one long poll of ``GET /api/v1/head``; commits through this driver
        wake them at once.

        Raises:
            ClosedError: The driver was closed while waiting.
            DriverUnavailableError: The server cannot be reached.
        """
        _args.check_wait(rev)
        self._check()
        while self._head < rev:
            if self._polling:
                follower = asyncio.get_running_loop().create_future()
                self._followers.append(follower)
                try:
                    await follower
                finally:
                    if follower in self._followers:
                        self._followers.remove(follower)
                self._check()
                continue
            self._polling = True
            try:
                head = await self._call(
                    "GET",
                    "/api/v1/head",
                    Head,
                    params={"wait_for": self._head + 1, "timeout": POLL_WAIT},
                    seconds=POLL_WAIT + self.timeout,
                )
            finally:
                self._polling = False
                self._wake_followers()
            self._advance(head.rev)

    def _advance(self, head: int) -> None:
        if head > self._head:
            self._head = head
            self._wake_followers()

    def _wake_followers(self) -> None:
        followers, self._followers = self._followers, []
        for follower in followers:
            if not follower.done():
                follower.set_result(None)

    async def get_data(self, state_id: str, alias: str, rev: int = 0) -> tuple[int, bytes]:
        _args.check_read(state_id, rev, alias)
        path = f"/api/v1/states/{_segment(state_id)}/data/{_segment(alias)}"
        found = await self._call("GET", path, DataVersion, params={"rev": rev} if rev else None)
        return found.rev, found.blob

    async def get_delays(self, since_rev: int = 0, limit: int = 100) -> DelaysPage:
        _args.check_delays(since_rev, limit)
        params = {"since_rev": since_rev, "limit": limit}
        return await self._call("GET", "/api/v1/delays", DelaysPage, params=params)

    # -- leases (SupportsLease) --------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        _args.check_lease_claim(name, holder, ttl)
        body = self._encode(LeaseClaim(holder=holder, ttl=ttl))
        path = f"/api/v1/leases/{_segment(name)}/acquire"
        return (await self._call("POST", path, LeaseReply, body=body)).lease

    async def renew_lease(self, lease: Lease) -> Lease | None:
        _args.check_lease(lease)
        path = f"/api/v1/leases/{_segment(lease.name)}/renew"
        return (await self._call("POST", path, LeaseReply, body=self._encode(lease))).lease

    async def release_lease(self, lease: Lease) -> None:
        _args.check_lease(lease)
        path = f"/api/v1/leases/{_segment(lease.name)}/release"
        await self._call("POST", path, LeaseReply, body=self._encode(lease))

    async def get_lease(self, name: str) -> Lease | None:
        _args.check_lease_name(name)
        return (await self._call("GET", f"/api/v1/leases/{_segment(name)}", LeaseReply)).lease


def _tls_failure(exc: BaseException) -> str | None:
    """What went wrong in TLS, with a hint, if ``exc`` (an httpx transport error) came from a
    TLS failure: a certificate that cannot be verified, or a server that does not speak TLS."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"{cause.verify_message or cause.reason}; ?ca= names the CA that signed the "
                "server's certificate"
            )
        if isinstance(cause, ssl.SSLError):
            return (
                f"{cause.reason or cause}; does the server speak HTTPS (flowstate serve "
                "--tls-cert)?"
            )
        cause = cause.__cause__ or cause.__context__
    return None
