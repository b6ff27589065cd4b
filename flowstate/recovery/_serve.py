"""``flowstate recover``: the recoverer and the delayer as a long-running cluster service."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from flowstate._engine import Engine, Flow, FlowRegistry
from flowstate.drivers.base import hide_password
from flowstate.recovery._services import Delayer, Recoverer

if TYPE_CHECKING:
    import argparse

__all__ = ["add_service_arguments", "configure", "load_flows", "run", "serve", "until_signalled"]

logger = logging.getLogger("flowstate.recovery")


class FlowsSpecError(ValueError):
    """A --flows value that does not name a flow mapping."""


def import_from_working_directory() -> None:
    """Put the working directory first on the import path, as ``uvicorn`` and ``celery`` do,
    so that ``--flows shop.flows:FLOWS`` finds ``./shop/flows.py`` without ``PYTHONPATH``.

    The ``flowstate`` console script starts with its own folder on the path instead; ``python
    -m flowstate`` has the working directory there already.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_spec(spec: str, option: str) -> object:
    """Import ``package.module:attribute``, as a command's ``option`` names it.

    Importing runs the module's code, with this process's rights and access to the store.

    Raises:
        FlowsSpecError: The spec is malformed, or cannot be imported.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise FlowsSpecError(f"{option} wants package.module:attribute, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlowsSpecError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise FlowsSpecError(f"{module_name!r} has no attribute {attribute!r}") from None


def load_flows(spec: str) -> FlowRegistry:
    """Import ``package.module:attribute`` and return the flows it names.

    The attribute may be a mapping of flow ids to flows, or a ``FlowRegistry``. Importing
    runs the module's code, with this process's rights and access to the store.

    Raises:
        FlowsSpecError: The spec is malformed, cannot be imported, or names something else.
    """
    value = import_spec(spec, "--flows")
    if isinstance(value, FlowRegistry):
        return value
    if isinstance(value, Mapping) and all(callable(fn) for fn in value.values()):
        flows: Mapping[str, Flow] = value
        return FlowRegistry(flows)
    raise FlowsSpecError(f"{spec!r} is a {type(value).__name__}, not a mapping of flows")


def load_tasks(spec: str) -> dict[str, Callable[..., Any]]:
    """Import ``package.module:attribute``: a mapping of task names to step functions (for
    pipelines' JSON definitions).

    Raises:
        FlowsSpecError: The spec is malformed, cannot be imported, or names something else.
    """
    value = import_spec(spec, "--tasks")
    if isinstance(value, Mapping) and all(
        isinstance(name, str) and callable(fn) for name, fn in value.items()
    ):
        return dict(value)
    raise FlowsSpecError(f"{spec!r} is not a mapping of task names to async functions")


async def serve(
    url: str,
    flows: FlowRegistry,
    *,
    retry_after: float,
    max_attempts: int,
    lease_ttl: float,
    stop: asyncio.Event,
) -> None:
    """Run a recoverer and a delayer on ``url`` until ``stop`` is set, then hand over."""
    async with (
        Engine(url, flows=flows) as engine,
        Recoverer(
            engine, retry_after=retry_after, max_attempts=max_attempts, lease_ttl=lease_ttl
        ) as recoverer,
        Delayer(engine, lease_ttl=lease_ttl),
    ):
        logger.info(
            "%s serves recovery on %s (standby until it leads)",
            recoverer.holder,
            hide_password(url),
        )
        await stop.wait()
        logger.info("%s stops and hands leadership back", recoverer.holder)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``recover`` arguments to ``parser``."""
    parser.add_argument("url", help="the store, e.g. sqlite:///app.db or etcd://h:2379/app")
    parser.add_argument(
        "--flows",
        required=True,
        metavar="MODULE:ATTR",
        help=(
            "where the flows are: a module and a mapping (or FlowRegistry) in it, imported "
            "from the current folder or the Python path. This imports and runs that code, "
            "with access to the store: point it only at code you trust"
        ),
    )
    add_service_arguments(parser)


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the recoverer's and delayer's settings (``--retry-after`` ...) to ``parser``."""
    parser.add_argument(
        "--retry-after",
        type=float,
        default=120.0,
        metavar="S",
        help="retry a state still running S seconds after its commit (default 120)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        metavar="N",
        help="force-end a state after N retries of one transition (default 3)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=10.0,
        metavar="S",
        help="a dead leader is replaced within S seconds (default 10)",
    )


async def run(args: argparse.Namespace, extra_flows: Mapping[str, Flow] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT; exit 0 after a clean handover.

    ``extra_flows`` are added to the ones ``--flows`` names (the command adds the flows of
    the workflow layer there).
    """
    import_from_working_directory()
    flows = load_flows(args.flows)
    for flow_id, fn in (extra_flows or {}).items():
        if flow_id not in flows:
            flows.register(flow_id, fn)

    async def service(stop: asyncio.Event) -> None:
        await serve(
            args.url,
            flows,
            retry_after=args.retry_after,
            max_attempts=args.max_attempts,
            lease_ttl=args.lease_ttl,
            stop=stop,
        )

    return await until_signalled(service)


async def until_signalled(service: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run a long-lived service until SIGTERM or SIGINT sets its stop event; 0 once it ended.

    Logs go to stderr at INFO unless logging was configured already.
    """
    if not any(isinstance(h, logging.StreamHandler) for h in logging.getLogger().handlers):
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await service(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
    return 0
