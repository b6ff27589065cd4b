"""The engine side of the driver benchmarks: flows that commit every step, run concurrently."""

from __future__ import annotations

import asyncio
import time

import flowstate as fs

#: The labels of every benchmark state (one label: one label row per version).
LABELS = {"bench": "yes"}


async def step(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    """Commit a transit back to itself until the ``left`` annotation runs out, then End."""
    annotations = ctx.current.annotations
    left = int(annotations["left"])
    if left <= 0:
        return fs.Commit(fs.End(ctx))
    annotations["left"] = str(left - 1)
    return fs.Commit(fs.Transit(ctx, "step"))


async def engine_seconds(url: str, flows: int, n: int) -> float:
    """Seconds for ``flows`` flows run at once by ``engine.execute`` to commit ``n`` steps
    between them (``n // flows`` each: transits, then an End), every step one durable commit.
    """
    per_flow = max(1, n // flows)
    async with fs.Engine(url, flows={"step": step}) as engine:
        ctxs = []
        for i in range(flows):
            ctx = fs.StateCtx.new(f"bench-{i}", labels=dict(LABELS))
            ctx.current.annotations["left"] = str(per_flow - 1)
            await engine.do(fs.Commit(fs.Transit(ctx, "step")))
            ctxs.append(ctx)
        start = time.perf_counter()
        results = await asyncio.gather(*(engine.execute(ctx) for ctx in ctxs))
        elapsed = time.perf_counter() - start
    if any(result.status != "ended" or result.steps != per_flow for result in results):
        raise RuntimeError(f"a benchmark flow did not end as planned: {results}")
    return elapsed * n / (flows * per_flow)


async def engine_rate(url: str, flows: int, per_flow: int) -> float:
    """Committed transitions per second of ``flows`` flows of ``per_flow`` steps each."""
    n = flows * per_flow
    return n / await engine_seconds(url, flows, n)


async def _workflow_step(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    annotations = ctx.current.annotations
    done = int(annotations["done"]) + 1
    annotations["done"] = str(done)
    if done == int(annotations["steps"]):
        return fs.Commit(fs.End(ctx))
    return fs.Commit(fs.Transit(ctx, "step"))


async def workflow_seconds(url: str, n: int, steps: int = 10, concurrency: int = 1) -> float:
    """Seconds for ``n // steps`` workflows of ``steps`` no-op steps, ``concurrency`` at a
    time: each one a new state, started by a commit and run by ``engine.execute``, each step
    committed (the last one ends it). What a durable-workflow library does for a workflow.
    """
    workflows = max(1, n // steps)
    async with fs.Engine(url, flows={"step": _workflow_step}) as engine:

        async def run(first: int) -> None:
            for i in range(first, workflows, concurrency):
                ctx = fs.StateCtx.new(f"workflow-{i}", labels=dict(LABELS))
                ctx.current.annotations.update(done="0", steps=str(steps))
                await engine.do(fs.Commit(fs.Transit(ctx, "step")))
                result = await engine.execute(ctx)
                if result.status != "ended" or result.steps != steps:
                    raise RuntimeError(f"a benchmark workflow did not end as planned: {result}")

        start = time.perf_counter()
        await asyncio.gather(*(run(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return elapsed * n / (workflows * steps)
