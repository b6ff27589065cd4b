"""Recovery figures per driver: throughput, delay firing latency, and failover time.

* recovery throughput: N states committed as running and left stalled (as a crashed worker
  leaves them); a Recoverer with a tiny ``retry_after`` retries each (a revision-checked
  commit) and executes it to its end. Rate = N / time until the last one ended.
* delay latency: N delays due over the next second; latency = commit time of the fired
  version minus the time the delay was due (millisecond resolution). p50 and p99.
* failover: two ``flowstate recover`` processes on one store; the leader is SIGKILLed and the
  time until the standby logs that it leads is measured (bounded below by the lease TTL).

Each figure is the median over the suite's interleaved rounds (a failover is one kill per
round). Run ``python -m benchmarks --only recovery``; it starts its own etcd for the etcd
rows. pytest runs a small smoke version.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path

import flowstate as fs

try:
    from benchmarks._suite import Case, Row, Settings
except ImportError:  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._suite import Case, Row, Settings

ROOT = Path(__file__).resolve().parent.parent
LEASE_TTL = 2.0
RETRY_AFTER = 3.0
BATCH = 30  # states per setup commit: one etcd transaction holds at most 128 operations


async def finish(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    return fs.Commit(fs.End(ctx))


FLOWS = {"finish": finish}


async def _all_ended(engine: fs.Engine, count: int, since_rev: int) -> None:
    ended = 0
    async with engine.watch(since_rev=since_rev, labels={"bench": "recovery"}) as watcher:
        async for state in watcher:
            ended += state.is_ended
            if ended == count:
                return


async def recovery_rate(url: str, count: int) -> float:
    async with fs.Engine(url, flows=FLOWS) as engine:
        for start in range(0, count, BATCH):
            ctxs = [
                fs.StateCtx.new(f"stalled-{i}", labels={"bench": "recovery"})
                for i in range(start, min(start + BATCH, count))
            ]
            await engine.do(fs.Commit(*(fs.Transit(c, "finish") for c in ctxs)))
        head = await engine.driver.head_rev()
        # Let every state stall for RETRY_AFTER; a retried state then has that long to finish
        # before it could be retried again, far more than a flow here takes.
        await asyncio.sleep(RETRY_AFTER)
        began = time.perf_counter()
        async with fs.Recoverer(
            engine, retry_after=RETRY_AFTER, lease_ttl=LEASE_TTL, tick=0.05
        ) as recoverer:
            await _all_ended(engine, count, head)
        elapsed = time.perf_counter() - began
        assert recoverer.stats.retried == count, "every state was retried exactly once"
        assert recoverer.stats.dropped == 0
        return count / elapsed


async def delay_latencies(url: str, count: int) -> list[float]:
    """Milliseconds from due to fired, one per delay."""
    engine = fs.Engine(url, flows=FLOWS)
    async with engine, fs.Delayer(engine, lease_ttl=LEASE_TTL) as delayer:
        await delayer.wait_leader()
        head = await engine.driver.head_rev()
        now = datetime.datetime.now(datetime.UTC)
        due = {}
        for i in range(count):
            ctx = fs.StateCtx.new(f"timer-{i}", labels={"bench": "recovery"})
            at = now + datetime.timedelta(seconds=0.3 + i / count)
            await engine.do(fs.Commit(fs.Pause(ctx, "finish"), fs.Delay(ctx, "finish", until=at)))
            due[ctx.id] = at
        latencies = []
        async with engine.watch(since_rev=head, labels={"bench": "recovery"}) as watcher:
            async for state in watcher:
                if "flowstate.delay.fired" in state.transition.annotations:
                    assert state.committed_at is not None
                    late = state.committed_at - due[state.id]
                    latencies.append(late.total_seconds() * 1000)
                    if len(latencies) == count:
                        return latencies
    raise AssertionError("unreachable")


async def failover_seconds(url: str) -> float:
    """Kill the leading `flowstate recover` process; seconds until the standby leads."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "flowstate",
        "recover",
        url,
        "--flows",
        "benchmarks.bench_recovery:FLOWS",
        "--lease-ttl",
        str(LEASE_TTL),
    ]
    procs = [
        await asyncio.create_subprocess_exec(
            *args, env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
        )
        for _ in range(2)
    ]
    try:
        first = await _first_leader(procs)
        first.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        await _first_leader([p for p in procs if p is not first])
        return time.perf_counter() - killed
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
            await proc.wait()


async def _first_leader(procs: list[asyncio.subprocess.Process]) -> asyncio.subprocess.Process:
    async def leads(proc: asyncio.subprocess.Process) -> asyncio.subprocess.Process:
        assert proc.stderr is not None
        async for line in proc.stderr:
            if b"leads 'flowstate.recoverer'" in line:
                return proc
        raise AssertionError("the process ended before it led")

    waits = [asyncio.ensure_future(leads(p)) for p in procs]
    try:
        async with asyncio.timeout(60):
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def _in_store(driver: str, url: str, fn: Callable[[str], Coroutine[None, None, float]]) -> float:
    """Run ``fn(url of a fresh store)``: ``driver`` is memory, sqlite (a file in a fresh
    directory) or etcd (a fresh key prefix under ``url``)."""
    if driver == "sqlite":
        with tempfile.TemporaryDirectory(prefix="flowstate-bench-") as tmp:
            return asyncio.run(fn(f"sqlite:///{tmp}/recovery.db"))
    if driver == "etcd":
        return asyncio.run(fn(f"{url.rstrip('/')}/{uuid.uuid4().hex}"))
    if driver == "postgres":
        from tests.postgres_server import unique_url

        return asyncio.run(fn(unique_url(url)))
    return asyncio.run(fn("memory://"))


def recovery(n: int, driver: str, url: str = "") -> float:
    """Seconds for a Recoverer to retry ``n`` stalled states and run them to their end."""

    async def run(store: str) -> float:
        return n / await recovery_rate(store, n)

    return _in_store(driver, url, run)


def delay_p50(n: int, driver: str, url: str = "") -> float:
    """``n`` times the median lateness of ``n`` fired delays (the row reads as the median)."""

    async def run(store: str) -> float:
        return percentile(await delay_latencies(store, n), 0.5) / 1000 * n

    return _in_store(driver, url, run)


def delay_p99(n: int, driver: str, url: str = "") -> float:
    """``n`` times the 99th percentile lateness of ``n`` fired delays."""

    async def run(store: str) -> float:
        return percentile(await delay_latencies(store, n), 0.99) / 1000 * n

    return _in_store(driver, url, run)


def failover(n: int, driver: str, url: str = "") -> float:
    """Seconds for ``n`` failovers of ``flowstate recover`` processes (one store each)."""

    async def run(store: str) -> float:
        total = await failover_seconds(store)
        for _ in range(n - 1):
            total += await failover_seconds(store)
        return total

    return _in_store(driver, url, run)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cases(
    etcd: str | None, postgres: str | None = None, *, slow: bool = True, count: int = 10_000
) -> list[Case]:
    """The recovery cases; ``slow=False`` leaves out the p99 (a second delay run per driver)
    and the failovers (two processes and a lease expiry each)."""
    drivers = {"memory": "", "sqlite": ""}
    drivers |= ({"etcd": etcd} if etcd else {}) | ({"postgres": postgres} if postgres else {})
    found = []
    for name, url in drivers.items():
        kw = {"driver": name, "url": url}
        found += [
            Case(
                "recovery: stalled states retried and run to their end",
                name,
                recovery,
                kw,
                unit="states/s",
                pilot=count,
                calibrate=False,
            ),
            Case(
                "recovery: delay lateness p50",
                name,
                delay_p50,
                kw,
                unit="ms",
                pilot=200,
                calibrate=False,
            ),
        ]
        if slow:
            found.append(
                Case(
                    "recovery: delay lateness p99",
                    name,
                    delay_p99,
                    kw,
                    unit="ms",
                    pilot=200,
                    calibrate=False,
                )
            )
        if slow and name != "memory":
            found.append(
                Case(
                    f"recovery: failover after SIGKILL (lease TTL {LEASE_TTL:g} s)",
                    name,
                    failover,
                    kw,
                    unit="s",
                    pilot=1,
                    calibrate=False,
                )
            )
    return found


def suite(settings: Settings) -> list[Row]:
    from benchmarks.bench_etcd import etcd_server
    from benchmarks.bench_postgres import postgres_server

    count = 500 if settings.quick else 10_000
    with etcd_server() as etcd, postgres_server() as postgres:
        return settings.run(cases(etcd, postgres, slow=not settings.quick, count=count))


def test_recovery_benchmark_runs() -> None:
    """Smoke test of the benchmark's code paths; no timing is asserted."""
    rows = Settings.smoke().run(cases(None, slow=False, count=200))
    assert len(rows) == 4
    assert all(row.value >= 0 for row in rows)


if __name__ == "__main__":
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "recovery", *sys.argv[1:]]))
