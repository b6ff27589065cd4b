"""The task functions of ``examples/data_flow.json``, a pipeline in the flow-manager format.

Run it with ``flowstate run examples/data_flow.json sqlite:///data.db --tasks
examples.data_flow:TASKS`` (from the repository's folder), or start runs that ``flowstate
worker sqlite:///data.db --tasks examples.data_flow:TASKS`` processes take.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowstate.workflows import StepContext

__all__ = ["TASKS"]


async def fetch(step: StepContext) -> Any:
    rows = (step.input or {}).get("rows", [3, 1, 2])
    return {"status": "success", "rows": rows}


async def process(step: StepContext) -> Any:
    rows = step.outputs["task1"]["rows"]
    if not rows:
        return {"status": "failure", "reason": "nothing to process"}
    return {"status": "success", "rows": sorted(rows)}


async def store(step: StepContext) -> Any:
    return {"status": "success", "stored": len(step.outputs["task2"]["rows"])}


TASKS = {"task1": fetch, "task2": process, "task3": store}
