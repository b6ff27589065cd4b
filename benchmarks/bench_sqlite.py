"""SQLite: the engine against raw ``sqlite3`` doing the same work, and against DBOS.

Every store is a file in WAL mode at ``synchronous=normal`` or ``full``. One step is one
durable commit of one state (one label). The same-work baselines run, with the standard
library's ``sqlite3`` on a store the driver created, exactly the statements the driver runs
for a step (a transaction that reads the head, compare-and-sets the state's latest row,
inserts its version into the log and its label into the label index, and keeps the index of
the labels of latest versions), in the same batching and at the same durability (rows marked
``no latest-labels index`` leave that index out, to show what it costs a commit):

* sequential: ``raw, calling thread`` runs the transactions one after another, no event loop;
  ``raw behind one thread hop`` (the floor of any asyncio driver that waits for each commit)
  runs each one on a worker thread that an event loop hands it to and waits for; ``one thread
  hop, no SQL`` is that hand-off alone. The engine runs one flow through ``engine.execute``.
* 64 at a time: ``raw, 64 per transaction`` commits 64 states per transaction, calling
  thread; the engine runs 64 flows at once (group commit puts their commits in one
  transaction).
* a workflow of 10 no-op steps (DBOS's unit): DBOS 3.4 on a SQLite system database (the same
  WAL file setup and synchronous setting), workflows one after another; the engine runs the
  same workflows (a state started by a commit, then 10 committed steps).

Run ``python -m benchmarks --only sqlite`` for the table; ``python benchmarks/bench_sqlite.py``
prints it too. pytest runs a tiny version as a smoke test.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

import flowstate as fs

try:
    from benchmarks._engine_rate import LABELS, engine_seconds, workflow_seconds
    from benchmarks._suite import Case, Row, Settings
except ImportError:  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._engine_rate import LABELS, engine_seconds, workflow_seconds
    from benchmarks._suite import Case, Row, Settings

SYNCHRONOUS = ("normal", "full")
CONCURRENCY = 64
WORKFLOW_STEPS = 10
FLOOR = "raw sqlite3 behind one thread hop (floor)"
RAW_BATCHED = f"raw sqlite3, {CONCURRENCY} per transaction"
DBOS = "DBOS 3.4, async workflow"

_HEAD = "SELECT rev, committed_at FROM fs_log WHERE rev = (SELECT max(rev) FROM fs_log)"
_CAS = "UPDATE fs_latest SET rev = ? WHERE id = ? AND rev = ?"
_LOG = "INSERT INTO fs_log (rev, id, committed_at, state) VALUES (?, ?, ?, ?)"
_LABEL = "INSERT INTO fs_labels (key, value, rev) VALUES (?, ?, ?)"
_UNLATEST = "DELETE FROM fs_latest_labels WHERE rev = ?"
_LATEST_LABEL = "INSERT INTO fs_latest_labels (key, value, rev) VALUES (?, ?, ?)"


class _RawStore:
    """A store the SQLite driver created, written with the driver's statements by hand."""

    def __init__(
        self, path: Path, synchronous: str, states: int, latest_labels: bool = True
    ) -> None:
        self.latest_labels = latest_labels
        asyncio.run(_create(path, synchronous, states))
        # Used by one thread at a time; closed by whichever created the worker thread.
        self.conn = sqlite3.connect(
            path, isolation_level=None, cached_statements=256, check_same_thread=False
        )
        self.conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self.ids = [f"bench-{i}" for i in range(states)]
        self.revs = list(range(1, states + 1))
        self.head = states
        state = fs.State(id="bench-0", labels=dict(LABELS))
        state.annotations["left"] = "100000"
        state.transition = fs.Transition(to="step")
        # A version as the driver stores it (without its revision and time): same size.
        self.blob = msgspec.msgpack.encode(state)

    def commit(self, indexes: range) -> None:
        """One transaction committing a new version of each state in ``indexes``."""
        execute = self.conn.execute
        execute("BEGIN IMMEDIATE")
        head, _ = execute(_HEAD).fetchone()
        now_ms = time.time_ns() // 1_000_000
        for i in indexes:
            head += 1
            state_id = self.ids[i]
            if execute(_CAS, (head, state_id, self.revs[i])).rowcount != 1:
                raise RuntimeError("compare-and-set failed")
            execute(_LOG, (head, state_id, now_ms, self.blob))
            for key, value in LABELS.items():
                execute(_LABEL, (key, value, head))
            if self.latest_labels:
                execute(_UNLATEST, (self.revs[i],))
                for key, value in LABELS.items():
                    execute(_LATEST_LABEL, (key, value, head))
            self.revs[i] = head
        execute("COMMIT")
        self.head = head

    def close(self) -> None:
        self.conn.close()


async def _create(path: Path, synchronous: str, states: int) -> None:
    async with fs.Engine(f"sqlite:///{path}?synchronous={synchronous}") as engine:
        for i in range(states):
            ctx = fs.StateCtx.new(f"bench-{i}", labels=dict(LABELS))
            await engine.do(fs.Commit(fs.Transit(ctx, "step")))


def _in_tmp(fn: Callable[[Path], float]) -> float:
    with tempfile.TemporaryDirectory(prefix="flowstate-bench-") as tmp:
        return fn(Path(tmp) / "bench.db")


# -- the contenders: fn(n, **kwargs) -> seconds for n steps ---------------------------------


def raw_sequential(n: int, synchronous: str, latest_labels: bool = True) -> float:
    """One step per transaction, in the calling thread (``latest_labels=False``: without
    keeping the index of latest versions' labels, to show what it costs)."""

    def run(path: Path) -> float:
        store = _RawStore(path, synchronous, 1, latest_labels)
        one = range(1)
        start = time.perf_counter()
        for _ in range(n):
            store.commit(one)
        elapsed = time.perf_counter() - start
        store.close()
        return elapsed

    return _in_tmp(run)


def raw_batched(
    n: int, synchronous: str, batch: int = CONCURRENCY, latest_labels: bool = True
) -> float:
    """``batch`` states per transaction, in the calling thread."""

    def run(path: Path) -> float:
        store = _RawStore(path, synchronous, batch, latest_labels)
        every = range(batch)
        txns = max(1, n // batch)
        start = time.perf_counter()
        for _ in range(txns):
            store.commit(every)
        elapsed = time.perf_counter() - start
        store.close()
        return elapsed * n / (txns * batch)

    return _in_tmp(run)


def _hop_seconds(n: int, job: Callable[[], None], setup: Callable[[], None] | None = None) -> float:
    """Seconds for ``n`` calls of ``job`` on a worker thread, each awaited by an event loop
    (``setup`` runs on that thread first, untimed)."""
    jobs: queue.SimpleQueue[tuple[asyncio.Future[None], asyncio.AbstractEventLoop] | None]
    jobs = queue.SimpleQueue()
    ready = threading.Event()

    def serve() -> None:
        if setup is not None:
            setup()
        ready.set()
        while (item := jobs.get()) is not None:
            fut, loop = item
            job()
            loop.call_soon_threadsafe(fut.set_result, None)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for _ in range(n):
            fut = loop.create_future()
            jobs.put((fut, loop))
            await fut
        return time.perf_counter() - start

    thread = threading.Thread(target=serve)
    thread.start()
    ready.wait()
    try:
        return asyncio.run(run())
    finally:
        jobs.put(None)
        thread.join()


def raw_one_hop(n: int, synchronous: str) -> float:
    """One step per transaction, each on a worker thread the event loop waits for."""

    def run(path: Path) -> float:
        holder: list[_RawStore] = []
        one = range(1)

        def setup() -> None:  # the connection belongs to the worker thread
            holder.append(_RawStore(path, synchronous, 1))

        def job() -> None:
            holder[0].commit(one)

        try:
            return _hop_seconds(n, job, setup)
        finally:
            for store in holder:
                store.close()

    return _in_tmp(run)


def bare_hop(n: int, synchronous: str) -> float:
    """The hand-off alone: an event loop waiting for a no-op on a worker thread."""
    return _hop_seconds(n, lambda: None)


def engine(n: int, synchronous: str, flows: int = 1) -> float:
    """``flows`` flows at once through ``engine.execute``, one commit per step."""
    return _in_tmp(
        lambda path: asyncio.run(
            engine_seconds(f"sqlite:///{path}?synchronous={synchronous}", flows, n)
        )
    )


def engine_workflows(n: int, synchronous: str) -> float:
    """Workflows of WORKFLOW_STEPS steps, one after another, through the engine."""
    return _in_tmp(
        lambda path: asyncio.run(
            workflow_seconds(f"sqlite:///{path}?synchronous={synchronous}", n, WORKFLOW_STEPS)
        )
    )


def dbos_workflows(n: int, synchronous: str) -> float:
    """DBOS async workflows of WORKFLOW_STEPS no-op async steps, one after another."""

    def run(path: Path) -> float:
        from benchmarks._dbos import dbos_seconds

        return dbos_seconds(path, synchronous, n, WORKFLOW_STEPS)

    return _in_tmp(run)


def cases() -> list[Case]:
    found = []
    for sync in SYNCHRONOUS:
        kw = {"synchronous": sync}
        group = f"SQLite sync={sync}, sequential"
        found += [
            Case(group, FLOOR, raw_one_hop, kw, note="same SQL, one worker-thread hand-off"),
            Case(group, "flowstate engine, 1 flow", engine, kw, baseline=FLOOR, target=0.8),
            Case(group, "raw sqlite3, calling thread", raw_sequential, kw, baseline=FLOOR),
            Case(
                group,
                "raw sqlite3, calling thread, no latest-labels index",
                raw_sequential,
                {**kw, "latest_labels": False},
                baseline=FLOOR,
                note="what schema 3's index costs a commit",
            ),
            Case(group, "one thread hop, no SQL", bare_hop, kw, baseline=FLOOR, pilot=500),
        ]
        group = f"SQLite sync={sync}, {CONCURRENCY} at a time"
        found += [
            Case(group, RAW_BATCHED, raw_batched, kw, pilot=2048, step=CONCURRENCY),
            Case(
                group,
                f"{RAW_BATCHED}, no latest-labels index",
                raw_batched,
                {**kw, "latest_labels": False},
                baseline=RAW_BATCHED,
                pilot=2048,
                step=CONCURRENCY,
            ),
            Case(
                group,
                f"flowstate engine, {CONCURRENCY} flows",
                engine,
                {**kw, "flows": CONCURRENCY},
                baseline=RAW_BATCHED,
                target=0.5,
                pilot=2048,
                step=CONCURRENCY,
            ),
        ]
        group = f"SQLite sync={sync}, workflows of {WORKFLOW_STEPS} steps, sequential"
        found += [
            Case(group, DBOS, dbos_workflows, kw, pilot=100, step=WORKFLOW_STEPS),
            Case(
                group,
                "flowstate engine",
                engine_workflows,
                kw,
                baseline=DBOS,
                pilot=200,
                step=WORKFLOW_STEPS,
            ),
        ]
    return found


def suite(settings: Settings) -> list[Row]:
    return settings.run(cases())


def test_bench_sqlite_smoke() -> None:
    """Every contender runs (tiny sizes, one round); no timing is asserted."""
    rows = suite(Settings.smoke())
    assert len(rows) == len(cases())
    assert all(row.value > 0 for row in rows)


if __name__ == "__main__":
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "sqlite", *sys.argv[1:]]))
