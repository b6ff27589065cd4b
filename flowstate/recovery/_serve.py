"""``flowstate recover``: the recoverer and the delayer as a long-running cluster service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from flowstate._engine import Engine, Flow, FlowRegistry
from flowstate.drivers._args import MAX_LEASE_TTL
from flowstate.drivers.base import hide_password
from flowstate.recovery._services import Delayer, Recoverer

__all__ = [
    "add_service_arguments",
    "configure",
    "count_option",
    "load_flows",
    "run",
    "seconds_option",
    "serve",
    "setup_logging",
    "spec_option",
    "until_signalled",
]

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


def _spec_parts(spec: str) -> tuple[str, str] | None:
    """``(module, attribute)`` of ``package.module:attribute``; None when malformed. A
    relative module (``.flows``) is malformed: there is no package to be relative to."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not attribute.isidentifier():
        return None
    if not all(part.isidentifier() for part in module_name.split(".")):
        return None
    return module_name, attribute


def spec_option(text: str) -> str:
    """The argparse type of ``--flows`` and ``--tasks``: refuses a malformed spec as a usage
    error, before the command opens anything."""
    if _spec_parts(text) is None:
        raise argparse.ArgumentTypeError(f"expected package.module:attribute, not {text!r}")
    return text


def import_spec(spec: str, option: str) -> object:
    """Import ``package.module:attribute``, as a command's ``option`` names it.

    Importing runs the module's code, with this process's rights and access to the store.

    Raises:
        FlowsSpecError: The spec is malformed, or cannot be imported (whatever the module
            raised while it was imported: its message, on one line).
    """
    parts = _spec_parts(spec)
    if parts is None:
        raise FlowsSpecError(f"{option} wants package.module:attribute, not {spec!r}")
    module_name, attribute = parts
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlowsSpecError(f"cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module's own code failed: say so, in one line
        raise FlowsSpecError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise FlowsSpecError(f"{module_name!r} has no attribute {attribute!r}") from None


def count_option(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in ``minimum..maximum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected a number <= {maximum}, not {value}")
        return value

    parse.__name__ = "number"  # argparse names the type in its error messages
    return parse


def seconds_option(*, positive: bool, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, above 0 when ``positive`` (else at
    least 0), at most ``maximum``. A value the service would refuse once started is refused
    here instead, before the command opens (and perhaps creates) its store."""
    bound = "> 0" if positive else ">= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds, not {text!r}"
            ) from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"expected a number of seconds {bound}, not {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected at most {maximum:g} seconds, not {text!r}")
        return value

    parse.__name__ = "seconds"
    return parse


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


def _is_async(fn: object) -> bool:
    """True for an async function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (an instance's async __call__ counts)
    )


def load_tasks(spec: str) -> dict[str, Callable[..., Any]]:
    """Import ``package.module:attribute``: a mapping of task names to step functions (for
    pipelines' JSON definitions).

    A plain function is refused here: awaiting what it returns would fail on every attempt
    of its step, long after the command started.

    Raises:
        FlowsSpecError: The spec is malformed, cannot be imported, or names something else.
    """
    value = import_spec(spec, "--tasks")
    if not (isinstance(value, Mapping) and all(isinstance(name, str) for name in value)):
        raise FlowsSpecError(f"{spec!r} is not a mapping of task names to async functions")
    plain = sorted(name for name, fn in value.items() if not _is_async(fn))
    if plain:
        names = ", ".join(repr(name) for name in plain)
        raise FlowsSpecError(
            f"{spec!r} is not a mapping of task names to async functions: {names} "
            "(a step is 'async def fn(step)')"
        )
    return dict(value)


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
        type=spec_option,
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
        type=seconds_option(positive=True),
        default=120.0,
        metavar="S",
        help="retry a state still running S seconds after its commit (default 120)",
    )
    parser.add_argument(
        "--max-attempts",
        type=count_option(0),
        default=3,
        metavar="N",
        help="force-end a state after N retries of one transition (default 3)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=seconds_option(positive=True, maximum=MAX_LEASE_TTL),
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

    Ctrl-C stops a service the same way as SIGTERM (a clean handover), so it exits 0 too.
    Logs go to stderr at INFO unless logging was configured already.
    """
    setup_logging()
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


def setup_logging() -> None:
    """Log to stderr at INFO, one line per record, unless logging was configured already.

    The remote driver's HTTP client logs every request at INFO; a service on an http://
    store would log little else, so its loggers only say what goes wrong.
    """
    if not any(isinstance(h, logging.StreamHandler) for h in logging.getLogger().handlers):
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
