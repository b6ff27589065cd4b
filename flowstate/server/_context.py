"""What every route of the server shares: the engine, the settings, and the stop signal."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from attrs import define, field

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flowstate import Engine
    from flowstate.recovery import Delayer, Recoverer
    from flowstate.workflows import StepFn

__all__ = [
    "DEFAULT_KEEPALIVE",
    "DEFAULT_MAX_BODY_SIZE",
    "MIN_BODY_SIZE",
    "ServerContext",
    "wait_for_rev",
]

#: Request bodies larger than this many bytes are refused (413) unless configured otherwise.
DEFAULT_MAX_BODY_SIZE = 1024 * 1024
#: The smallest request body limit a server accepts (a commit of one small state fits).
MIN_BODY_SIZE = 1024
#: Seconds of silence after which a watch stream sends a keep-alive comment.
DEFAULT_KEEPALIVE = 15.0


@define(eq=False)
class ServerContext:
    """The state the routes of one application share.

    Attributes:
        engine: The open engine whose driver stores everything.
        max_body_size: The largest request body accepted, in bytes.
        keepalive: Seconds of silence before a watch stream sends a comment line.
        recoverer: The recoverer running in the server process, if any.
        delayer: The delayer running in the server process, if any.
        tasks: The step functions of pipelines posted to ``/api/v1/flows/execute``, by task
            name.
        token_required: True when the routes need a bearer token (``/health`` says so).
        stopping: Set when the server begins to shut down: watch streams and long polls
            end, so that the server can drain.
    """

    engine: Engine
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    keepalive: float = DEFAULT_KEEPALIVE
    recoverer: Recoverer | None = None
    delayer: Delayer | None = None
    tasks: Mapping[str, StepFn] = field(factory=dict)
    token_required: bool = False
    stopping: asyncio.Event = field(factory=asyncio.Event)


async def wait_for_rev(ctx: ServerContext, rev: int, seconds: float) -> bool | None:
    """Wait until the store reaches ``rev``.

    Returns:
        True once it has, None when ``seconds`` passed first, False when the server
        began to stop first.

    Raises:
        DriverError: The store failed.
    """
    if ctx.stopping.is_set():
        return False
    waiter = asyncio.ensure_future(ctx.engine.driver.wait_for_rev(rev))
    stop = asyncio.ensure_future(ctx.stopping.wait())
    try:
        await asyncio.wait((waiter, stop), timeout=seconds, return_when="FIRST_COMPLETED")
    finally:
        for task in (waiter, stop):
            if not task.done():
                task.cancel()
        await asyncio.wait((waiter, stop))
    if not waiter.cancelled():
        waiter.result()  # re-raise a store failure
        return True
    return False if not stop.cancelled() else None
