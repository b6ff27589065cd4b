"""``flowstate serve``: run the HTTP application on uvicorn until SIGTERM.

Importing this module needs nothing beyond flowstate itself: the server's dependencies
(``pip install 'flowstate-engine[server]'``) are imported when the command runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from flowstate import Engine
from flowstate._checks import bearer_token, env_token
from flowstate.drivers.base import hide_password
from flowstate.recovery import Delayer, Recoverer
from flowstate.recovery._serve import (
    FlowsSpecError,
    add_service_arguments,
    count_option,
    import_from_working_directory,
    load_flows,
    seconds_option,
    setup_logging,
    spec_option,
)
from flowstate.recovery._serve import load_tasks as load_task_spec
from flowstate.server._context import DEFAULT_KEEPALIVE, DEFAULT_MAX_BODY_SIZE, MIN_BODY_SIZE

if TYPE_CHECKING:
    import argparse

    from flowstate.workflows import StepFn

__all__ = [
    "TOKEN_ENV",
    "ServeError",
    "configure",
    "is_loopback",
    "load_tasks",
    "read_token",
    "run",
]

logger = logging.getLogger("flowstate.server")

#: The environment variable holding the bearer token (server and remote driver alike).
TOKEN_ENV = "FLOWSTATE_TOKEN"
#: Seconds the server waits for in-flight requests when it stops.
DRAIN_TIMEOUT = 30.0


class ServeError(Exception):
    """A ``serve`` command line that cannot work; printed as one line."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` arguments to ``parser``."""
    parser.add_argument("url", help="the store, e.g. sqlite:///app.db or etcd://h:2379/app")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default 127.0.0.1; others need a token)",
    )
    parser.add_argument(
        "--port",
        type=count_option(0, 65535),
        default=8080,
        help="the port (default 8080; 0 picks a free one)",
    )
    parser.add_argument(
        "--flows",
        type=spec_option,
        metavar="MODULE:ATTR",
        help="the flows the server's engine runs: a module and a mapping (or FlowRegistry)",
    )
    parser.add_argument(
        "--tasks",
        type=spec_option,
        metavar="MODULE:ATTR",
        help="the step functions of pipelines posted to /api/v1/flows/execute: a module and a "
        "mapping of task names to async functions",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"require 'Authorization: Bearer <token>' with the token in FILE "
        f"(default: ${TOKEN_ENV}, if set)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with the certificate chain in FILE (PEM; needs --tls-key)",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        metavar="FILE",
        help="the private key of --tls-cert (PEM)",
    )
    parser.add_argument(
        "--max-body-size",
        type=count_option(MIN_BODY_SIZE),
        default=DEFAULT_MAX_BODY_SIZE,
        metavar="BYTES",
        help=f"refuse request bodies above BYTES (default {DEFAULT_MAX_BODY_SIZE})",
    )
    parser.add_argument(
        "--keepalive",
        type=seconds_option(positive=True),
        default=DEFAULT_KEEPALIVE,
        metavar="S",
        help=f"watch streams send a comment after S quiet seconds (default {DEFAULT_KEEPALIVE:g})",
    )
    parser.add_argument(
        "--recover",
        action="store_true",
        help=(
            "also run the recoverer and the delayer in this process (needs --flows or "
            "--tasks; with --tasks it also runs the posted pipelines' runs it recovers)"
        ),
    )
    add_service_arguments(parser)


def read_token(token_file: Path | None) -> str | None:
    """The bearer token: the text of ``token_file`` without surrounding whitespace, else
    ``$FLOWSTATE_TOKEN`` (None when it is unset or blank).

    Raises:
        ServeError: The file cannot be read or holds no token, or the token holds a control
            character (no HTTP header can carry it).
    """
    if token_file is None:
        try:
            return env_token(TOKEN_ENV)
        except ValueError as exc:
            raise ServeError(str(exc)) from None
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ServeError(f"cannot read the token file {str(token_file)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ServeError(f"the token file {str(token_file)!r} is not UTF-8 text") from None
    if not token:
        raise ServeError(f"the token file {str(token_file)!r} is empty")
    try:
        return bearer_token(token, f"the token file {str(token_file)!r}")
    except ValueError as exc:
        raise ServeError(str(exc)) from None


def load_tasks(spec: str) -> dict[str, StepFn]:
    """Import ``package.module:attribute``: a mapping of task names to step functions.

    Raises:
        ServeError: The spec is malformed, cannot be imported, or names something else.
    """
    try:
        return load_task_spec(spec)
    except FlowsSpecError as exc:
        raise ServeError(str(exc)) from exc


def is_loopback(host: str) -> bool:
    """True when every address ``host`` stands for is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket. Made from getaddrinfo's answer, so that its protocol is TCP:
    asyncio sets TCP_NODELAY only on such sockets, and without it every response on a
    kept-alive connection waits for a delayed ACK (about 40 ms)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _address(sock: socket.socket, scheme: str) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def check_tls(cert: Path | None, key: Path | None) -> None:
    """Check that ``--tls-cert`` and ``--tls-key`` come together and make a usable pair.

    Raises:
        ServeError: They do not, with the reason in one line.
    """
    if (cert is None) != (key is None):
        raise ServeError("--tls-cert and --tls-key go together: give both, or neither")
    if cert is None or key is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError included
        reason = exc.strerror or str(exc)
        raise ServeError(f"cannot serve TLS with {cert} and {key}: {reason}") from exc


def _setup_logging() -> None:
    setup_logging()
    # One line per start and stop is ours; uvicorn's own start-up chatter is not needed.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; exit 0 once in-flight requests have finished.

    Raises:
        ServeError: The command line cannot work (no token off loopback, no TLS key, ...).
        FlowsSpecError: ``--flows`` does not name flows.
    """
    token = read_token(args.token_file)
    if token is None and not is_loopback(args.host):
        raise ServeError(
            f"refusing to listen on {args.host} without a token: anyone who can reach it "
            f"could read and change the store; set {TOKEN_ENV} or pass --token-file"
        )
    check_tls(args.tls_cert, args.tls_key)
    if args.recover and not (args.flows or args.tasks):
        raise ServeError(
            "--recover needs --flows or --tasks: recovered states run the server's flows"
        )
    flows = None
    if args.flows or args.tasks:
        import_from_working_directory()
    if args.flows:
        flows = load_flows(args.flows)
    tasks = load_tasks(args.tasks) if args.tasks else {}
    try:
        from flowstate.server._adopt import RunAdopter
        from flowstate.server._app import create_app
        from flowstate.server._uvicorn import handle_signals, make_server
    except ImportError as exc:
        raise ServeError(
            f"flowstate serve needs {exc.name!r}; install it with: pip install 'flowstate-engine[server]'"
        ) from exc
    _setup_logging()
    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(Engine(args.url, flows=flows))
        recoverer = delayer = None
        if args.recover and tasks:
            # Before the recoverer retries them: the runs posted here before a restart, and
            # those posted to other servers, run on the pipelines they were posted with.
            await stack.enter_async_context(RunAdopter(engine, tasks))
        if args.recover:
            recoverer = await stack.enter_async_context(
                Recoverer(
                    engine,
                    retry_after=args.retry_after,
                    max_attempts=args.max_attempts,
                    lease_ttl=args.lease_ttl,
                )
            )
            delayer = await stack.enter_async_context(Delayer(engine, lease_ttl=args.lease_ttl))
        app = create_app(
            engine,
            token=token,
            max_body_size=args.max_body_size,
            keepalive=args.keepalive,
            recoverer=recoverer,
            delayer=delayer,
            tasks=tasks,
        )
        sock = stack.enter_context(_bind(args.host, args.port))
        address = _address(sock, "https" if args.tls_cert else "http")
        server = make_server(
            app, drain_timeout=DRAIN_TIMEOUT, tls_cert=args.tls_cert, tls_key=args.tls_key
        )
        with handle_signals(app, server):
            logger.info(
                "listening on %s (store %s; token %s; recovery %s)",
                address,
                hide_password(args.url),
                "required" if token else "not required",
                "on" if args.recover else "off",
            )
            await server.serve(sockets=[sock])
        logger.info(
            "stopped listening on %s after %d requests",
            address,
            server.server_state.total_requests,
        )
    return 0
