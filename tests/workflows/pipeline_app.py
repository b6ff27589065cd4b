"""Pipelines, tasks and plain flows for the tests that run them in `flowstate worker` and
`flowstate run` processes. Each step execution appends a line to the file named by
FLOWSTATE_TEST_LOG."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import flowstate as fs
from flowstate.workflows import FlowManager, Pipeline, Step, StepContext, workflow_flows


def _log(step: StepContext) -> None:
    _write(step.run_id, step.step_id, step.attempt)


def _write(run_id: str, step_id: str, attempt: int) -> None:
    path = os.environ.get("FLOWSTATE_TEST_LOG")
    if path:
        line = f"{os.getpid()} {run_id} {step_id} {attempt}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)  # one write of a short line: appends never interleave
        finally:
            os.close(fd)


async def quick(step: StepContext) -> Any:
    await asyncio.to_thread(_log, step)
    return {"done": step.step_id}


async def hangs_first(step: StepContext) -> Any:
    """Hangs on its first attempt (the test kills the process running it)."""
    await asyncio.to_thread(_log, step)
    if step.attempt == 1:
        await asyncio.sleep(3600)
    return "second time lucky"


async def slow(step: StepContext) -> Any:
    await asyncio.to_thread(_log, step)
    await asyncio.sleep(float(step.input.get("seconds", 0.5)))
    return {"slept": step.step_id}


async def _released(path: str) -> None:
    """Wait until the test creates the file ``path`` (a file in another process, which
    nothing can wait on: look again every few milliseconds)."""
    while not await asyncio.to_thread(Path(path).exists):  # noqa: ASYNC110 (a file)
        await asyncio.sleep(0.01)


async def gated_failure(step: StepContext) -> Any:
    """Returns a failure outcome once the file named by the input's "release" exists."""
    await asyncio.to_thread(_log, step)
    await _released(step.input["release"])
    return {"status": "failure", "reason": "out of stock"}


async def gated(step: StepContext) -> Any:
    """Succeeds once the file named by the input's "release" exists."""
    await asyncio.to_thread(_log, step)
    await _released(step.input["release"])
    return {"done": step.step_id}


async def cancels_its_run(step: StepContext) -> Any:
    """Asks for its own run to be cancelled (through the store named by the input's "url"),
    then succeeds: the run stops before its next step."""
    async with fs.Engine(step.input["url"]) as engine:
        await FlowManager(engine).request_cancel(step.run_id)
    return {"status": "success"}


async def cancels_itself(step: StepContext) -> Any:
    raise asyncio.CancelledError


async def pick(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    """A plain flow's first step: waits for the file its state's "release" annotation names."""
    await asyncio.to_thread(_write, ctx.id, "pick", 1)
    await _released(ctx.current.annotations["release"])
    return fs.Commit(fs.Transit(ctx, "pack"))


async def pack(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    await asyncio.to_thread(_write, ctx.id, "pack", 1)
    return fs.Commit(fs.End(ctx))


SHARED = (
    Pipeline("shared")
    .add_step(Step("a", quick))
    .add_step(Step("b", quick))
    .add_step(Step("c", quick))
)
CRASHY = (
    Pipeline("crashy")
    .add_step(Step("one", quick))
    .add_step(Step("two", hangs_first))  # no retries: a lost attempt is not an error
    .add_step(Step("three", quick))
)
SLOW = Pipeline("slow").add_step(Step("first", slow)).add_step(Step("second", quick))
GATED = Pipeline("gated").add_step(Step("wait", gated))

FLOWS = workflow_flows(SHARED, CRASHY, SLOW, GATED)
TASKS = {"task1": quick, "task2": quick, "task3": quick}
FAILING = {"task1": gated_failure}
CANCEL_REQUESTED = {"task1": cancels_its_run}
SELF_CANCELLING = {"task1": cancels_itself}
PLAIN = {**FLOWS, "pick": pick, "pack": pack}
