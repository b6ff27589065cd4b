"""Pipelines and tasks for the tests that run them in `flowstate worker` and `flowstate run`
processes. Each step execution appends a line to the file named by FLOWSTATE_TEST_LOG."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from flowstate.workflows import Pipeline, Step, StepContext, workflow_flows


def _log(step: StepContext) -> None:
    path = os.environ.get("FLOWSTATE_TEST_LOG")
    if path:
        line = f"{os.getpid()} {step.run_id} {step.step_id} {step.attempt}\n".encode()
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


SHARED = (
    Pipeline("shared")
    .add_step(Step("a", quick))
    .add_step(Step("b", quick))
    .add_step(Step("c", quick))
)
CRASHY = (
    Pipeline("crashy")
    .add_step(Step("one", quick))
    .add_step(Step("two", hangs_first, retries=1))
    .add_step(Step("three", quick))
)
SLOW = Pipeline("slow").add_step(Step("first", slow)).add_step(Step("second", quick))

FLOWS = workflow_flows(SHARED, CRASHY, SLOW)
TASKS = {"task1": quick, "task2": quick, "task3": quick}
