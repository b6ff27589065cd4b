"""PostgreSQL driver throughput against raw asyncpg running the driver's own statement, and
against DBOS doing the same work on the same server.

Run it as a script for the table (medians over interleaved repetitions); it starts its own
cluster (through ``tests/postgres_server.py``) with PostgreSQL's durable defaults (``fsync``,
``full_page_writes`` and ``synchronous_commit`` on), unless ``FLOWSTATE_POSTGRES_URL`` names a
server::

    python -m benchmarks.bench_postgres [--repeat 5] [--base 1000] [--no-dbos]

Every row counts transitions per second, each one a durable commit of one state's next
version (or, for DBOS, one checkpointed step):

* raw asyncpg, sequential: one call of the store's commit function (``fs_commit``, the very
  statement the driver sends) per transition, on one connection, arguments built in advance:
  the floor of a driver that commits one state per round trip;
* engine, sequential: one flow looping ``Commit(Transit(...))`` through ``engine.execute``;
* DBOS, sequential: one workflow of no-op steps (``@DBOS.step`` inside ``@DBOS.workflow``);
* raw asyncpg, 64 batched: 64 states, one ``fs_commit`` call per round carrying one
  transition of each (what the driver's group commit sends when 64 flows commit at once);
* raw asyncpg, 64 connections: 64 tasks, each calling ``fs_commit`` for its own state on its
  own connection (no batching: every transition is its own transaction), for reference;
* engine, 64 at a time: 64 flows at once (group commit batches their commits);
* DBOS, 64 at a time: 64 workflows at once.

DBOS runs in a process of its own (it is a process-wide singleton with threads); its start-up
and a warm-up workflow are not timed. Ratios are taken within each repetition (the rows ran
moments apart) and their median reported: on a shared machine the disk's fsync time and the
load move between repetitions, and move both rows of a ratio alike. :func:`measure` returns
the rates and ratios; :func:`suite` runs the same contenders as rows of ``python -m
benchmarks`` (see ``benchmarks/_suite.py``). Under pytest (``--benchmark-disable`` in the
normal run) a tiny version runs as a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import msgspec

import flowstate as fs
from benchmarks._engine_rate import engine_rate
from flowstate.drivers import postgres as postgres_driver

try:
    from benchmarks._suite import Case, Row, Settings
    from tests.postgres_server import ENV_URL, PostgresServer, postgres_url, unique_url
except ImportError:  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._suite import Case, Row, Settings
    from tests.postgres_server import ENV_URL, PostgresServer, postgres_url, unique_url

__all__ = [
    "MEASURES",
    "RATIOS",
    "Measurements",
    "measure",
    "postgres_server",
    "postgres_url",
    "print_table",
    "suite",
]

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = 64
# PostgreSQL's durable defaults (the test clusters turn some of them off for speed).
DURABLE = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}


def _state_blob(state_id: str, left: int) -> bytes:
    """What the driver stores for a benchmark flow's state (the same size and shape)."""
    state = fs.State(
        id=state_id,
        labels={"bench": "yes"},
        annotations={"left": str(left)},
        transition=fs.Transition(to="step"),
    )
    return msgspec.msgpack.encode(state)


async def _new_store(url: str) -> tuple[str, str]:
    """A fresh store (schema and commit function created by the driver itself); returns the
    connection URL for asyncpg and the driver's commit statement."""
    driver = postgres_driver.PostgresDriver.from_url(unique_url(url))
    async with driver:
        pass
    return driver._dsn, driver._sql.commit


def _args(ids: list[str], revs: list[int], blobs: list[bytes]) -> tuple[object, ...]:
    """``fs_commit`` arguments: one commit per state, each labelled ``bench=yes``."""
    numbers = list(range(1, len(ids) + 1))
    return (
        numbers,
        ids,
        revs,
        blobs,
        numbers,
        ["bench"] * len(ids),
        ["yes"] * len(ids),
        *([] for _ in range(6)),
    )


async def _call(conn: asyncpg.Connection, sql: str, args: tuple[object, ...]) -> list[int]:
    row = await conn.fetchrow(sql, *args)
    revs: list[int] = row["new_revs"]
    if not all(revs):
        raise RuntimeError("a benchmark commit conflicted")
    return revs


async def _raw_rate(url: str, states: int, per_state: int, *, batched: bool) -> float:
    """Transitions per second of raw ``fs_commit`` calls (see the module docstring)."""
    dsn, sql = await _new_store(url)
    ids = [f"bench-{i}" for i in range(states)]
    blob = _state_blob(ids[0], per_state)
    connections = 1 if batched or states == 1 else states
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        revs = await _call(conns[0], sql, _args(ids, [0] * states, [blob] * states))
        loop = asyncio.get_running_loop()
        if batched:
            start = loop.time()
            for _ in range(per_state):
                revs = await _call(conns[0], sql, _args(ids, revs, [blob] * states))
        else:

            async def worker(i: int) -> None:
                rev = revs[i]
                for _ in range(per_state):
                    (rev,) = await _call(conns[i], sql, _args([ids[i]], [rev], [blob]))

            start = loop.time()
            await asyncio.gather(*(worker(i) for i in range(states)))
        elapsed = loop.time() - start
    finally:
        for conn in conns:
            await conn.close()
    return states * per_state / elapsed


def _dbos_rate(url: str, workflows: int, steps: int) -> float:
    """Steps per second of DBOS workflows of no-op steps, in a process of its own."""
    server = url.partition("?")[0]  # flowstate's options mean nothing to DBOS
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks._dbos_steps", server, str(workflows), str(steps)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the DBOS run failed ({done.returncode}): {done.stderr[-2000:]}")
    rate: float = json.loads(lines[-1])["rate"]
    return rate


def raw_sequential(url: str, n: int) -> float:
    return asyncio.run(_raw_rate(url, 1, n, batched=True))


def raw_batched(url: str, n: int) -> float:
    return asyncio.run(_raw_rate(url, CONCURRENCY, max(1, n // CONCURRENCY), batched=True))


def raw_connections(url: str, n: int) -> float:
    return asyncio.run(_raw_rate(url, CONCURRENCY, max(1, n // CONCURRENCY), batched=False))


def engine_sequential(url: str, n: int) -> float:
    return asyncio.run(engine_rate(unique_url(url), 1, n))


def engine_concurrent(url: str, n: int) -> float:
    return asyncio.run(engine_rate(unique_url(url), CONCURRENCY, max(1, n // CONCURRENCY)))


def dbos_sequential(url: str, n: int) -> float:
    return _dbos_rate(url, 1, n)


def dbos_concurrent(url: str, n: int) -> float:
    return _dbos_rate(url, CONCURRENCY, max(1, n // CONCURRENCY))


Measure = Callable[[str, int], float]

RAW_SEQUENTIAL = "raw asyncpg fs_commit, sequential"
ENGINE_SEQUENTIAL = "engine Commit(Transit), sequential"
DBOS_SEQUENTIAL = "DBOS no-op steps, sequential"
RAW_BATCHED = f"raw asyncpg fs_commit, {CONCURRENCY} batched"
RAW_CONNECTIONS = f"raw asyncpg fs_commit, {CONCURRENCY} connections"
ENGINE_CONCURRENT = f"engine Commit(Transit), {CONCURRENCY} at a time"
DBOS_CONCURRENT = f"DBOS no-op steps, {CONCURRENCY} at a time"

#: (row, function, work as a multiple of ``base``, runs DBOS). DBOS rows do a fifth of the
#: work: at its rate a full share would dominate the run; a rate is a rate.
MEASURES: list[tuple[str, Measure, float, bool]] = [
    (RAW_SEQUENTIAL, raw_sequential, 1, False),
    (ENGINE_SEQUENTIAL, engine_sequential, 1, False),
    (DBOS_SEQUENTIAL, dbos_sequential, 0.2, True),
    (RAW_BATCHED, raw_batched, 8, False),
    (RAW_CONNECTIONS, raw_connections, 2, False),
    (ENGINE_CONCURRENT, engine_concurrent, 8, False),
    (DBOS_CONCURRENT, dbos_concurrent, 1, True),
]


#: The same-run ratios the targets are stated in: (name, numerator row, denominator row).
RATIOS: list[tuple[str, str, str]] = [
    ("engine/raw, sequential", ENGINE_SEQUENTIAL, RAW_SEQUENTIAL),
    (
        f"engine/raw batched, {CONCURRENCY} at a time (target >= 0.5)",
        ENGINE_CONCURRENT,
        RAW_BATCHED,
    ),
    ("engine/DBOS, sequential", ENGINE_SEQUENTIAL, DBOS_SEQUENTIAL),
    (f"engine/DBOS, {CONCURRENCY} at a time (target >= 20)", ENGINE_CONCURRENT, DBOS_CONCURRENT),
]


@dataclasses.dataclass(frozen=True)
class Measurements:
    """What one run measured.

    Attributes:
        rates: The median transitions/s of each row.
        ratios: For each ratio of :data:`RATIOS` whose rows were measured, the median over
            the repetitions of the ratio within each repetition (the two rows ran moments
            apart, so a change in the machine's load affects both alike).
        repeat: The number of repetitions.
    """

    rates: dict[str, float]
    ratios: dict[str, float]
    repeat: int


def run_table(url: str, repeat: int, base: int, *, dbos: bool = True) -> Measurements:
    """Run every measurement ``repeat`` times, interleaved, on the server at ``url``."""
    chosen = [(name, fn, scale) for name, fn, scale, is_dbos in MEASURES if dbos or not is_dbos]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in chosen}
    for _ in range(repeat):
        for name, fn, scale in chosen:
            runs[name].append(fn(url, max(1, round(base * scale))))
    ratios = {
        name: statistics.median(a / b for a, b in zip(runs[top], runs[bottom], strict=True))
        for name, top, bottom in RATIOS
        if top in runs and bottom in runs
    }
    rates = {name: statistics.median(rates) for name, rates in runs.items()}
    return Measurements(rates=rates, ratios=ratios, repeat=repeat)


def measure(
    url: str | None = None, *, repeat: int = 5, base: int = 1000, dbos: bool = True
) -> Measurements:
    """Run the benchmark and return what it measured.

    Args:
        url: The server to measure on; None starts a cluster with durable settings for the
            run (or uses ``FLOWSTATE_POSTGRES_URL`` when set).
        repeat: Interleaved repetitions; medians are reported.
        base: Transitions of a sequential run (the other rows scale from it).
        dbos: Also measure DBOS (needs the ``dbos`` package: ``pip install 'flowstate-engine[bench]'``).
    """
    url = url or os.environ.get(ENV_URL)
    if url:
        return run_table(url, repeat, base, dbos=dbos)
    with PostgresServer(settings=DURABLE) as server:
        return run_table(server.url, repeat, base, dbos=dbos)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """The URL to measure on: ``FLOWSTATE_POSTGRES_URL``, or a cluster started here with
    PostgreSQL's durable defaults."""
    configured = os.environ.get(ENV_URL)
    if configured:
        yield configured
        return
    with PostgresServer(settings=DURABLE) as server:
        yield server.url


_BY_NAME: dict[str, Measure] = {name: fn for name, fn, _, _ in MEASURES}


def seconds(n: int, url: str, row: str) -> float:
    """Seconds for ``n`` transitions of one row of :data:`MEASURES` (a case of the suite)."""
    return n / _BY_NAME[row](url, n)


def cases(url: str) -> list[Case]:
    kw = {"url": url}
    sequential = "PostgreSQL (fsync on), sequential"
    batched = f"PostgreSQL (fsync on), {CONCURRENCY} at a time"
    return [
        Case(sequential, RAW_SEQUENTIAL, seconds, {**kw, "row": RAW_SEQUENTIAL}),
        Case(
            sequential,
            ENGINE_SEQUENTIAL,
            seconds,
            {**kw, "row": ENGINE_SEQUENTIAL},
            baseline=RAW_SEQUENTIAL,
        ),
        Case(
            sequential,
            DBOS_SEQUENTIAL,
            seconds,
            {**kw, "row": DBOS_SEQUENTIAL},
            baseline=RAW_SEQUENTIAL,
            pilot=100,
        ),
        Case(batched, RAW_BATCHED, seconds, {**kw, "row": RAW_BATCHED}, pilot=2048, step=64),
        Case(
            batched,
            ENGINE_CONCURRENT,
            seconds,
            {**kw, "row": ENGINE_CONCURRENT},
            baseline=RAW_BATCHED,
            target=0.5,
            pilot=2048,
            step=CONCURRENCY,
        ),
        Case(
            batched,
            RAW_CONNECTIONS,
            seconds,
            {**kw, "row": RAW_CONNECTIONS},
            baseline=RAW_BATCHED,
            pilot=256,
            step=CONCURRENCY,
        ),
        Case(
            batched,
            DBOS_CONCURRENT,
            seconds,
            {**kw, "row": DBOS_CONCURRENT},
            baseline=RAW_BATCHED,
            pilot=256,
            step=CONCURRENCY,
        ),
    ]


def suite(settings: Settings) -> list[Row]:
    """The contenders of :data:`MEASURES` as rows of ``python -m benchmarks`` (a quick run
    leaves DBOS out: its start-up alone would double the run; pytest's smoke test runs it)."""
    with postgres_server() as url:
        chosen = cases(url)
        if settings.quick:
            chosen = [case for case in chosen if "DBOS" not in case.contender]
        return settings.run(chosen)


def print_table(measured: Measurements) -> None:
    print(f"PostgreSQL driver benchmark, median of {measured.repeat}, {os.cpu_count()} CPUs")
    print()
    print(f"| {'measurement':<44} | {'transitions/s':>14} |")
    print(f"|{'-' * 46}|{'-' * 15}:|")
    for name, rate in measured.rates.items():
        print(f"| {name:<44} | {rate:>14,.0f} |")
    print()
    print("Ratios (median of the same-repetition ratios):")
    print()
    for name, ratio in measured.ratios.items():
        print(f"- {name}: {ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument("--base", type=int, default=1000, help="transitions per sequential run")
    parser.add_argument("--no-dbos", action="store_true", help="leave DBOS out")
    args = parser.parse_args(argv)
    print_table(measure(repeat=args.repeat, base=args.base, dbos=not args.no_dbos))
    return 0


def test_bench_postgres_smoke(postgres_url: str) -> None:
    """A tiny run of every measurement, DBOS included (no timing is asserted)."""
    measured = run_table(postgres_url, 1, 64)
    assert set(measured.rates) == {name for name, _, _, _ in MEASURES}
    assert all(rate > 0 for rate in measured.rates.values())
    assert set(measured.ratios) == {name for name, _, _ in RATIOS}


if __name__ == "__main__":
    sys.exit(main())
