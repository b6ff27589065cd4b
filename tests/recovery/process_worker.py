"""A worker process: starts N states on flow ``slow`` and hangs inside them until killed.

Usage: python -m tests.recovery.process_worker URL PREFIX N
"""

from __future__ import annotations

import asyncio
import os
import sys

import flowstate as fs
from tests.recovery.process_flows import flows


async def main(url: str, prefix: str, count: int) -> None:
    os.environ["FLOWSTATE_TEST_ROLE"] = "worker"
    async with fs.Engine(url, flows=flows) as engine:
        for i in range(count):
            ctx = fs.StateCtx.new(f"{prefix}{i}", labels={"run": prefix})
            await engine.do(fs.Commit(fs.Transit(ctx, "slow")), fs.Execute(ctx))
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
