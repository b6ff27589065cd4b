"""The engine side of the driver benchmarks: flows that commit every step, run concurrently."""

from __future__ import annotations

import asyncio
import time

import flowstate as fs


async def step(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    """Commit a transit back to itself until the ``left`` annotation runs out, then End."""
    annotations = ctx.current.annotations
    left = int(annotations["left"])
    if left <= 0:
        return fs.Commit(fs.End(ctx))
    annotations["left"] = str(left - 1)
    return fs.Commit(fs.Transit(ctx, "step"))


async def engine_rate(url: str, flows: int, per_flow: int) -> float:
    """Committed transitions per second of ``flows`` flows run at once by ``engine.execute``."""
    async with fs.Engine(url, flows={"step": step}) as engine:
        ctxs = []
        for i in range(flows):
            ctx = fs.StateCtx.new(f"bench-{i}", labels={"bench": "yes"})
            ctx.current.annotations["left"] = str(per_flow)
            await engine.do(fs.Commit(fs.Transit(ctx, "step")))
            ctxs.append(ctx)
        start = time.perf_counter()
        results = await asyncio.gather(*(engine.execute(ctx) for ctx in ctxs))
        elapsed = time.perf_counter() - start
    if any(result.status != "ended" for result in results):
        raise RuntimeError(f"a benchmark flow did not end: {results}")
    # per_flow transits plus the final End, each one durable commit
    return flows * (per_flow + 1) / elapsed
