"""A separate process for the drivers' multi-process and crash tests (SQLite, PostgreSQL).

Usage: ``python driver_child.py MODE URL [ARG]``, ``URL`` a driver URL; every line it prints
is flushed at once.

* ``crash URL GEN``: commit forever from three concurrent tasks. Each commit writes three
  states at once (the task's counter state and two new states), all labelled
  ``commit=GEN.TASK.N``; after each acknowledged commit it prints
  ``{"commit": "GEN.TASK.N", "revs": [...]}``. The test kills it with SIGKILL.
* ``increment URL COUNT``: print ``ready``, wait for a line on stdin, then add 1 to the
  ``n`` annotation of state ``shared`` COUNT times by compare-and-set, re-reading and retrying
  on conflict; print ``done CONFLICTS``.
* ``commit URL ID``: commit one new state ``ID``, print its revision.
"""

from __future__ import annotations

import asyncio
import json
import sys

import flowstate as fs
from flowstate.drivers.base import CommitRequest, StateWrite


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def crash(url: str, gen: str) -> None:
    async with fs.open_driver(url) as driver:

        async def committer(task: int) -> None:
            counter = f"counter-{task}"
            try:
                rev = (await driver.get_state(counter)).rev
            except fs.NotFoundError:
                rev = 0
            n = 0
            while True:
                key = f"{gen}.{task}.{n}"
                labels = {"commit": key}
                writes = [
                    StateWrite(
                        state=fs.State(id=counter, labels=labels, annotations={"last": key}),
                        expected_rev=rev,
                    ),
                    StateWrite(state=fs.State(id=f"{key}.a", labels=labels), expected_rev=0),
                    StateWrite(state=fs.State(id=f"{key}.b", labels=labels), expected_rev=0),
                ]
                result = await driver.commit(CommitRequest(writes=writes))
                rev = result.revs[0]
                say(json.dumps({"commit": key, "revs": result.revs}))
                n += 1

        async with asyncio.TaskGroup() as group:
            for task in range(3):
                group.create_task(committer(task))


async def increment(url: str, count: int) -> None:
    async with fs.open_driver(url) as driver:
        say("ready")
        await asyncio.to_thread(sys.stdin.readline)
        conflicts = 0
        done = 0
        while done < count:
            state = await driver.get_state("shared")
            state.annotations["n"] = str(int(state.annotations["n"]) + 1)
            try:
                await driver.commit(
                    CommitRequest(writes=[StateWrite(state=state, expected_rev=state.rev)])
                )
            except fs.ConflictError:
                conflicts += 1
            else:
                done += 1
        say(f"done {conflicts}")


async def commit(url: str, state_id: str) -> None:
    async with fs.open_driver(url) as driver:
        write = StateWrite(state=fs.State(id=state_id), expected_rev=0)
        result = await driver.commit(CommitRequest(writes=[write]))
        say(str(result.revs[0]))


def main(argv: list[str]) -> None:
    mode, url, arg = argv
    if mode == "crash":
        asyncio.run(crash(url, arg))
    elif mode == "increment":
        asyncio.run(increment(url, int(arg)))
    elif mode == "commit":
        asyncio.run(commit(url, arg))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
