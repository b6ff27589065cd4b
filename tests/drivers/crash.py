"""What the drivers' tests share: reading a whole store, and the crash test that SIGKILLs
committing processes (``driver_child.py crash``) and checks that the store stayed whole."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import flowstate as fs

__all__ = ["CHILD", "all_states", "kill_committers_and_check"]

#: The child process of the drivers' multi-process tests.
CHILD = Path(__file__).with_name("driver_child.py")


async def all_states(driver: fs.Driver, **filters: Any) -> list[fs.State]:
    """Every version matching ``filters`` (StatesQuery fields), page after page."""
    states: list[fs.State] = []
    query = fs.StatesQuery(limit=500, **filters)
    while True:
        page = await driver.get_states(query)
        states += page.states
        if not page.more:
            return states
        query = query.replace(since_rev=page.states[-1].rev)


def kill_committers_and_check(url: str) -> None:
    """SIGKILL a process committing to ``url`` at random moments, four times; after each,
    every acknowledged commit must be stored whole with the revisions it was told, and the
    revisions and commit times must have no gaps and never go back."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acknowledged: dict[str, list[int]] = {}
    for gen in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), "crash", url, str(gen)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        try:
            for _ in range(rng.randint(1, 80)):
                line = proc.stdout.readline()
                if not line:
                    break
                record = json.loads(line)
                acknowledged[record["commit"]] = record["revs"]
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            rest, errors = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: child failed early: {errors}"
        for line in rest.splitlines():
            record = json.loads(line)  # a line is written whole or not at all (< PIPE_BUF)
            acknowledged[record["commit"]] = record["revs"]
        asyncio.run(_check_crashed_store(url, acknowledged, seed))
    assert acknowledged


async def _check_crashed_store(url: str, acknowledged: dict[str, list[int]], seed: int) -> None:
    async with fs.open_driver(url) as driver:
        head = await driver.head_rev()
        states = await all_states(driver)
    note = f"seed {seed}"
    assert [s.rev for s in states] == list(range(1, head + 1)), f"{note}: revisions have gaps"
    times = [s.committed_at for s in states if s.committed_at is not None]
    assert len(times) == len(states), note
    assert times == sorted(times), note
    commits: dict[str, list[fs.State]] = {}
    for state in states:
        commits.setdefault(state.labels["commit"], []).append(state)
    for key, versions in commits.items():
        _gen, task, _n = key.split(".")
        assert [v.id for v in versions] == [f"counter-{task}", f"{key}.a", f"{key}.b"], note
        first = versions[0].rev
        assert [v.rev for v in versions] == [first, first + 1, first + 2], note
    for key, revs in acknowledged.items():
        assert key in commits, f"{note}: acknowledged commit {key} was lost"
        assert [v.rev for v in commits[key]] == revs, note
