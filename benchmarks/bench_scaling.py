"""Query scaling on SQLite: the time of one page as the history grows to a million versions.

Each store holds ``versions`` versions of ``versions // 10`` states (10 versions each, every
state committed once per pass). Every version carries ``kind=order``; a state's versions
carry ``shard=<its number mod 100>`` (1% of the versions per shard). The queries, each a
first page of 50 (``engine.get_states``; the time includes the database thread's hop):

* ``latest_only`` on the label every version carries (the latest versions only);
* an AND of the broad label and one shard (the shard's 1% of versions);
* ``latest_only`` with the same AND;
* ``find_state`` on the AND (``since_latest``: the newest matching version).

Target: every query under 5 ms at 1M versions. The stores are built once per run, with
commits of 1,000 states, before any measurement (building 1M versions takes a while).

Run ``python -m benchmarks --only scaling``; pytest runs a tiny smoke version.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import flowstate as fs
from flowstate.drivers.base import CommitRequest, StateWrite
from flowstate.drivers.sqlite import SQLiteDriver

try:
    from benchmarks._suite import Case, Row, Settings
except ImportError:  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._suite import Case, Row, Settings

SIZES = (10_000, 100_000, 1_000_000)
VERSIONS_PER_STATE = 10
BATCH = 1000
LIMIT_MS = 5.0

QUERIES: dict[str, dict[str, Any]] = {
    "latest_only, a label every version has": {"labels": {"kind": "order"}, "latest_only": True},
    "AND of that label and a 1% label": {"labels": {"kind": "order", "shard": "7"}},
    "latest_only AND of both": {"labels": {"kind": "order", "shard": "7"}, "latest_only": True},
    "find_state on the AND (since_latest)": {
        "labels": {"kind": "order", "shard": "7"},
        "since_latest": True,
        "limit": 1,
    },
}


async def build(path: Path, versions: int) -> None:
    """A store of ``versions`` versions (see the module docstring)."""
    states = max(1, versions // VERSIONS_PER_STATE)
    async with SQLiteDriver(path) as driver:
        revs = [0] * states
        for _ in range(VERSIONS_PER_STATE):
            for first in range(0, states, BATCH):
                chunk = range(first, min(first + BATCH, states))
                writes = [
                    StateWrite(
                        state=fs.State(
                            id=f"order-{i}",
                            labels={"kind": "order", "shard": str(i % 100)},
                            transition=fs.Transition(to="next"),
                        ),
                        expected_rev=revs[i],
                    )
                    for i in chunk
                ]
                result = await driver.commit(CommitRequest(writes=writes))
                for i, rev in zip(chunk, result.revs, strict=True):
                    revs[i] = rev


def query_seconds(n: int, path: str, query: str) -> float:
    """Seconds for ``n`` runs of one page query on the store at ``path`` (after one
    untimed run that warms the page cache)."""
    filters = {"limit": 50, **QUERIES[query]}

    async def run() -> float:
        async with fs.Engine(f"sqlite:///{path}") as engine:
            first = await engine.get_states(**filters)
            if not first.states:
                raise RuntimeError(f"{query}: no state matched")
            start = time.perf_counter()
            for _ in range(n):
                await engine.get_states(**filters)
            return time.perf_counter() - start

    return asyncio.run(run())


def cases(stores: dict[int, Path]) -> list[Case]:
    found = []
    for query in QUERIES:
        for size, path in stores.items():
            found.append(
                Case(
                    f"SQLite query scaling: {query}",
                    f"{size:,} versions",
                    query_seconds,
                    {"path": str(path), "query": query},
                    unit="ms",
                    limit=LIMIT_MS,
                    pilot=50,
                )
            )
    return found


def suite(settings: Settings) -> list[Row]:
    sizes = SIZES[:1] if settings.quick else SIZES
    with tempfile.TemporaryDirectory(prefix="flowstate-bench-scaling-") as tmp:
        stores = {}
        for size in sizes:
            path = stores[size] = Path(tmp) / f"{size}.db"
            began = time.perf_counter()
            asyncio.run(build(path, size))
            settings.say(f"  built {size:,} versions in {time.perf_counter() - began:.1f} s")
        return settings.run(cases(stores))


def test_bench_scaling_smoke(tmp_path: Path) -> None:
    """Every query runs on a small store (one round); no timing is asserted."""
    path = tmp_path / "small.db"
    asyncio.run(build(path, 2000))
    rows = Settings.smoke().run(cases({2000: path}))
    assert len(rows) == len(QUERIES)
    assert all(row.value > 0 for row in rows)


if __name__ == "__main__":
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "scaling", *sys.argv[1:]]))
