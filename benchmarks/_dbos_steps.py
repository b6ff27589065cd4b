"""DBOS doing the benchmark's work: workflows of no-op steps, each step one durable checkpoint.

Run in a process of its own (DBOS is a process-wide singleton with threads of its own)::

    python -m benchmarks._dbos_steps SYSTEM_DATABASE_URL WORKFLOWS STEPS

It launches DBOS on the given PostgreSQL database, runs one warm-up workflow, then times
``WORKFLOWS`` workflows of ``STEPS`` steps run at once, and prints ``{"rate": steps/s}`` as
its last line. Start-up and the warm-up are not timed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from dbos import DBOS


@DBOS.step()
async def noop_step() -> None:
    """Does nothing: what is measured is DBOS recording that it ran."""


@DBOS.workflow()
async def steps_workflow(steps: int) -> int:
    for _ in range(steps):
        await noop_step()
    return steps


async def run(url: str, workflows: int, steps: int) -> float:
    """Steps per second of ``workflows`` workflows of ``steps`` steps run at once."""
    DBOS(config={"name": "flowstate-bench", "system_database_url": url, "log_level": "WARNING"})
    DBOS.launch()
    try:
        await steps_workflow(1)
        start = time.perf_counter()
        await asyncio.gather(*(steps_workflow(steps) for _ in range(workflows)))
        elapsed = time.perf_counter() - start
    finally:
        DBOS.destroy()
    return workflows * steps / elapsed


def main(argv: list[str]) -> None:
    url, workflows, steps = argv
    rate = asyncio.run(run(url, int(workflows), int(steps)))
    print(json.dumps({"rate": rate}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
