"""Running the application on uvicorn, with flowstate's own signal handling."""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from flowstate.server._app import FlowstateApp

__all__ = ["handle_signals", "make_server"]

logger = logging.getLogger("flowstate.server")


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
