"""Flows the multi-process recovery tests run, in worker and `flowstate recover` processes.

``slow`` hangs in a worker (FLOWSTATE_TEST_ROLE=worker) so that killing the worker leaves its
states stalled mid-flow; anywhere else it finishes the state.
"""

from __future__ import annotations

import asyncio
import os

import flowstate as fs


async def slow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    if os.environ.get("FLOWSTATE_TEST_ROLE") == "worker":
        print(f"started {ctx.id}", flush=True)
        await asyncio.Event().wait()
    return fs.Commit(fs.End(ctx))


async def fail(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    raise RuntimeError(f"{ctx.id} always fails")


async def wake(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    return fs.Commit(fs.End(ctx))


flows = {"slow": slow, "fail": fail, "wake": wake}
