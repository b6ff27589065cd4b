"""Running the application on uvicorn, with flowstate's own signal handling and a bound on
request heads."""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from flowstate._wire import ErrorBody, ErrorInfo
from flowstate.server._app import FlowstateApp

__all__ = ["MAX_HEAD_SIZE", "HttpProtocol", "handle_signals", "make_server"]

logger = logging.getLogger("flowstate.server")

#: The most bytes a request's head (request line and headers) may take, and so may the
#: trailers of a chunked body: more is refused with 431 (414 while the URL is still coming).
MAX_HEAD_SIZE = 64 * 1024
#: Seconds a refused connection stays open, reading and dropping what the client still
#: sends, so that the client reads the answer instead of a connection reset.
LINGER = 2.0

_HEAD = "head"  # the parser is between requests or reading a request line and headers
_TRAILERS = "trailers"  # after a chunk's size line: a chunk's data, or the body's trailers


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounding what the parser holds.

    httptools keeps a header's name and value, and uvicorn the URL, until they end: with no
    bound, a client sending one endless header line makes the server hold all of it. This
    protocol counts the bytes it feeds the parser while a head (or a chunked body's
    trailers) is open, feeding no more than the bound allows, and answers 431 (414 while
    still in the URL) in the server's JSON error shape once a head outgrows
    :data:`MAX_HEAD_SIZE`. The parser's other errors get the JSON shape too (400).

    The count starts with the first read after a request ends, so bytes of the next head
    that came in the same read as the end of a body are not counted: a connection holds at
    most the bound plus one read (256 KiB).
    """

    max_head_size = MAX_HEAD_SIZE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = _HEAD  # what the parser holds bytes of: a head, trailers
        self._held = 0  # bytes fed while the phase was open
        self._turns = 0  # phase changes: a read that saw one is not counted
        self._refused = False  # a request was refused: the connection only drains
        self._linger: asyncio.TimerHandle | None = None
        self._before: RequestResponseCycle | None = None  # the request before the latest

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: what the client still sends is dropped
        if self._phase is not None and len(data) > self.max_head_size - self._held:
            rest = self._feed_bounded(data)
            if not rest:
                return
            data = rest
        turns = self._turns
        HttpToolsProtocol.data_received(self, data)
        if self._phase is not None and self._turns == turns:
            self._held += len(data)

    def _feed_bounded(self, data: bytes) -> bytes:
        """Feed the parser what fits in the open head, piece by piece, until the head ends
        (return the rest, for the caller to feed), or refuse it when it does not fit."""
        while self._phase is not None and len(data) > self.max_head_size - self._held:
            room = self.max_head_size - self._held
            if room <= 0:
                self._refuse()
                return b""
            turns = self._turns
            HttpToolsProtocol.data_received(self, data[:room])
            if self._refused or self.transport.is_closing() or self.parser.should_upgrade():
                return b""  # the parser takes no more: an error, or an upgrade
            if self._turns == turns:  # still the same head (or trailers)
                self._held += room
            data = data[room:]
        return data

    def _turn(self, phase: str | None) -> None:
        self._phase = phase
        self._held = 0
        self._turns += 1

    # Parser callbacks: where heads and trailers begin and end. The two of every request
    # set the fields themselves, and call uvicorn's without super(): they are hot.
    def on_headers_complete(self) -> None:
        self._phase = None
        self._held = 0
        self._turns += 1
        self._before = self.cycle
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._phase = _HEAD
        self._held = 0
        self._turns += 1

    def on_body(self, body: bytes) -> None:
        if self._phase is not None:
            self._turn(None)  # a chunk's data, not trailers
        HttpToolsProtocol.on_body(self, body)

    def on_chunk_header(self) -> None:
        self._turn(_TRAILERS)

    def on_chunk_complete(self) -> None:
        self._turn(None)

    # Answers from outside the application.
    def send_400_response(self, msg: str) -> None:
        self._answer(400, "bad_request", "the request is not valid HTTP/1.1")

    def _refuse(self) -> None:
        bound = f"a request's line and headers may take {self.max_head_size} bytes"
        url = getattr(self, "url", b"")
        if self._phase == _HEAD and url and self._held - len(url) <= 32:
            # All it holds but the method is URL: the request line has not ended yet.
            self._answer(414, "url_too_long", f"the URL is too long: {bound}")
        elif self._phase == _HEAD:
            self._answer(431, "headers_too_large", f"the headers are too large: {bound}")
        else:
            message = f"the trailers are too large: they may take {self.max_head_size} bytes"
            self._answer(431, "headers_too_large", message)

    def _answer(self, status: int, type_: str, message: str) -> None:
        """Refuse the request being read: read no more of it, answer ``status`` in the JSON
        error shape, and close the connection."""
        self._refused = True
        cycle: RequestResponseCycle | None = self.cycle  # None before the first request
        if self._phase == _HEAD:
            # A new request: answered after the responses to the requests before it, which
            # end with the latest one's.
            self._answer_after(cycle, status, type_, message)
            return
        # The body or the trailers of the request of ``cycle``.
        assert cycle is not None
        queued = [entry for entry in self.pipeline if entry[0] is cycle]
        if queued:
            # Pipelined behind a request still being answered, so its application has not
            # started: it never will, and the refusal comes after that request's answer.
            self.pipeline.remove(queued[0])
            self._answer_after(self._before, status, type_, message)
            return
        # Its application runs: it stops.
        if not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if cycle.response_started:
            self._close_soon()  # it has had an answer
        else:
            self._send(status, type_, message)

    def _answer_after(
        self, before: RequestResponseCycle | None, status: int, type_: str, message: str
    ) -> None:
        """Answer once the request ``before`` has had its answer (at once if it has)."""
        if before is None or before.response_complete:
            self._send(status, type_, message)
        else:
            before.on_response = lambda: self._after_last(status, type_, message)

    def _after_last(self, status: int, type_: str, message: str) -> None:
        self.on_response_complete()
        if not self.transport.is_closing():
            self._send(status, type_, message)

    def _send(self, status: int, type_: str, message: str) -> None:
        body = msgspec.json.encode(ErrorBody(error=ErrorInfo(type=type_, message=message)))
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self._close_soon()

    def _close_soon(self) -> None:
        """Close after the answer, once the client stops sending or after :data:`LINGER`
        seconds: closing at once, with its bytes unread, would reset the connection and
        could destroy the answer before the client reads it."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self._linger is None:
            self._linger = self.loop.call_later(LINGER, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # flowstate serve handles SIGTERM itself (see handle_signals) and exits 0 once
        # drained; uvicorn's own handler would raise the signal again after stopping.
        yield


def make_server(
    app: FlowstateApp,
    *,
    drain_timeout: float,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> uvicorn.Server:
    """A uvicorn server for ``app`` that leaves logging and signals to flowstate; it speaks
    HTTPS when given a certificate and its key."""
    config = uvicorn.Config(
        app,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=15,
        timeout_graceful_shutdown=max(1, round(drain_timeout)),
        http=HttpProtocol,
    )
    return _Server(config)


@contextlib.contextmanager
def handle_signals(app: FlowstateApp, server: uvicorn.Server) -> Iterator[None]:
    """On SIGTERM or SIGINT: end watch streams and long polls, stop accepting, and let
    in-flight requests finish. A second signal stops without waiting for them.

    Once the server has stopped, further signals are ignored rather than handed back to
    their default action, which would kill the process while it closes its engine and hands
    its recovery leases over; the event loop restores the defaults when it closes."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if app.context.stopping.is_set():
            server.force_exit = True
            return
        app.context.stopping.set()
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.add_signal_handler(signum, _already_stopping)


def _already_stopping() -> None:
    logger.info("already stopping")
