"""SQLite driver throughput against raw sqlite3, all in WAL mode at one synchronous setting.

Run it as a script for the table (medians over a few repetitions)::

    python benchmarks/bench_sqlite.py [--synchronous normal|full] [--repeat 5] [--seconds 1]

Rows:

* raw sqlite3, calling thread: one-row compare-and-set transactions, no event loop at all;
* raw sqlite3, worker thread: the same transaction on a worker thread, one event-loop round
  trip per transaction (the floor for any asyncio driver that waits for each commit);
* raw sqlite3, batched 100/txn: 100 compare-and-set updates per transaction, calling thread;
* engine sequential: one flow looping ``Commit(Transit(...))`` through ``engine.execute``;
* engine 64 concurrent: 64 such flows at once (group commit batches their commits).

Under pytest (``--benchmark-disable`` in the normal run) a tiny version runs as a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._engine_rate import engine_rate

_CAS = "UPDATE t SET rev = rev + 1 WHERE id = ? AND rev = ?"


def _raw_db(path: Path, synchronous: str, rows: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, rev INTEGER NOT NULL)")
    conn.executemany("INSERT INTO t VALUES (?, 0)", ((i,) for i in range(rows)))
    return conn


def _cas_txn(conn: sqlite3.Connection, revs: list[int], ids: range) -> None:
    conn.execute("BEGIN IMMEDIATE")
    for i in ids:
        if conn.execute(_CAS, (i, revs[i])).rowcount != 1:
            raise RuntimeError("compare-and-set failed")
        revs[i] += 1
    conn.execute("COMMIT")


def raw_calling_thread(path: Path, synchronous: str, n: int) -> float:
    """Transitions per second: one CAS per transaction, in the calling thread."""
    conn = _raw_db(path, synchronous, 1)
    revs = [0]
    ids = range(1)
    start = time.perf_counter()
    for _ in range(n):
        _cas_txn(conn, revs, ids)
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def raw_batched(path: Path, synchronous: str, n: int, batch: int = 100) -> float:
    """Transitions per second: ``batch`` CAS updates per transaction, in the calling thread."""
    conn = _raw_db(path, synchronous, batch)
    revs = [0] * batch
    ids = range(batch)
    txns = max(1, n // batch)
    start = time.perf_counter()
    for _ in range(txns):
        _cas_txn(conn, revs, ids)
    elapsed = time.perf_counter() - start
    conn.close()
    return txns * batch / elapsed


def raw_worker_thread(path: Path, synchronous: str, n: int) -> float:
    """Transitions per second: one CAS transaction per event-loop-to-thread round trip."""
    jobs: queue.SimpleQueue[tuple[Callable[[], None], asyncio.Future[None]] | None]
    jobs = queue.SimpleQueue()
    ready = threading.Event()
    holder: dict[str, sqlite3.Connection] = {}

    def serve() -> None:
        conn = holder["conn"] = _raw_db(path, synchronous, 1)
        ready.set()
        while (job := jobs.get()) is not None:
            fn, fut = job
            fn()
            fut.get_loop().call_soon_threadsafe(fut.set_result, None)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    ready.wait()
    revs = [0]
    ids = range(1)

    def txn() -> None:
        _cas_txn(holder["conn"], revs, ids)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for _ in range(n):
            fut: asyncio.Future[None] = loop.create_future()
            jobs.put((txn, fut))
            await fut
        return n / (time.perf_counter() - start)

    try:
        return asyncio.run(run())
    finally:
        jobs.put(None)
        thread.join()


def engine_sequential(path: Path, synchronous: str, n: int) -> float:
    """Transitions per second: one flow committing each transition through the engine."""
    return asyncio.run(engine_rate(f"sqlite:///{path}?synchronous={synchronous}", 1, n))


def engine_concurrent(path: Path, synchronous: str, n: int, flows: int = 64) -> float:
    """Transitions per second: ``flows`` flows committing concurrently through the engine."""
    url = f"sqlite:///{path}?synchronous={synchronous}"
    return asyncio.run(engine_rate(url, flows, max(1, n // flows)))


Measure = Callable[[Path, str, int], float]

MEASURES: list[tuple[str, Measure, int]] = [
    ("raw sqlite3, calling thread (1 CAS/txn)", raw_calling_thread, 1),
    ("raw sqlite3, worker thread (1 hop/txn)", raw_worker_thread, 1),
    ("raw sqlite3, batched (100 CAS/txn)", raw_batched, 10),
    ("engine sequential (Commit(Transit))", engine_sequential, 1),
    ("engine 64 concurrent flows", engine_concurrent, 10),
]


def measure(fn: Measure, synchronous: str, n: int) -> float:
    with tempfile.TemporaryDirectory(prefix="flowstate-bench-") as tmp:
        return fn(Path(tmp) / "bench.db", synchronous, n)


def run_table(synchronous: str, repeat: int, base: int) -> dict[str, float]:
    """Median rate of each measurement. Repetitions interleave the measurements, so that a
    change in the machine's load affects all of them alike and the ratios stay fair.
    """
    runs: dict[str, list[float]] = {name: [] for name, _, _ in MEASURES}
    for _ in range(repeat):
        for name, fn, scale in MEASURES:
            runs[name].append(measure(fn, synchronous, base * scale))
    return {name: statistics.median(rates) for name, rates in runs.items()}


def print_table(medians: dict[str, float], synchronous: str, repeat: int) -> None:
    worker = medians["raw sqlite3, worker thread (1 hop/txn)"]
    print(f"SQLite {sqlite3.sqlite_version}, WAL, synchronous={synchronous.upper()}, ", end="")
    print(f"median of {repeat}, {os.cpu_count()} CPUs")
    print(f"{'measurement':<44} {'transitions/s':>14} {'vs worker':>10}")
    for name, rate in medians.items():
        print(f"{name:<44} {rate:>14,.0f} {rate / worker:>9.2f}x")
    sequential = medians["engine sequential (Commit(Transit))"] / worker
    concurrent = medians["engine 64 concurrent flows"]
    print()
    print(f"engine sequential / raw worker thread: {sequential:.2f} (target >= 0.50)")
    print(f"engine 64 concurrent: {concurrent:,.0f} transitions/s (target >= 20,000)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--synchronous", choices=["normal", "full"], default="normal")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument("--base", type=int, default=3000, help="transitions per sequential run")
    args = parser.parse_args(argv)
    medians = run_table(args.synchronous, args.repeat, args.base)
    print_table(medians, args.synchronous, args.repeat)
    return 0


def test_bench_sqlite_smoke(tmp_path: Path, benchmark: Any) -> None:
    """A tiny run of every measurement (no timing is asserted)."""
    for i, (_, fn, _scale) in enumerate(MEASURES):
        assert fn(tmp_path / f"smoke-{i}.db", "normal", 128) > 0
    benchmark.pedantic(
        engine_concurrent, args=(tmp_path / "bench.db", "normal", 128), rounds=1, iterations=1
    )


if __name__ == "__main__":
    raise SystemExit(main())
