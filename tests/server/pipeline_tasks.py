"""Step functions the executions tests give `flowstate serve --tasks`."""

from __future__ import annotations

import asyncio
from typing import Any

from flowstate.workflows import StepContext, StepFn


async def fetch(step: StepContext) -> dict[str, Any]:
    return {"rows": step.input["rows"]}


async def process(step: StepContext) -> dict[str, Any]:
    return {"processed": step.outputs["task1"]["rows"] * 2}


async def store(step: StepContext) -> dict[str, Any]:
    return {"stored": step.outputs["task2"]["processed"]}


async def flaky(step: StepContext) -> str:
    if step.attempt == 1:
        raise RuntimeError("the first attempt always fails")
    return "ok on attempt 2"


async def hang(step: StepContext) -> str:
    """The first attempt never ends (its process is killed under it); later ones do."""
    if step.attempt == 1:
        await asyncio.Event().wait()
    return f"done on attempt {step.attempt}"


async def refuse(step: StepContext) -> dict[str, Any]:
    return {"status": "failure", "why": "refused"}


async def cleanup(step: StepContext) -> str:
    return "cleaned up"


TASKS: dict[str, StepFn] = {
    "task1": fetch,
    "task2": process,
    "task3": store,
    "flaky": flaky,
    "hang": hang,
    "refuse": refuse,
    "cleanup": cleanup,
}
