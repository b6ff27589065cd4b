"""Recovery figures per driver: throughput, delay firing latency, and failover time.

* recovery throughput: N states committed as running and left stalled (as a crashed worker
  leaves them); a Recoverer with a tiny ``retry_after`` retries each (a revision-checked
  commit) and executes it to its end. Rate = N / time until the last one ended.
* delay latency: N delays due over the next second; latency = commit time of the fired
  version minus the time the delay was due (millisecond resolution). p50 and p99.
* failover: two ``flowstate recover`` processes on one store; the leader is SIGKILLed and the
  time until the standby logs that it leads is measured (bounded below by the lease TTL).

Run ``python benchmarks/bench_recovery.py [N]``; it starts its own etcd for the etcd rows.
pytest runs a small smoke version.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import flowstate as fs

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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(stores: dict[str, str], count: int, delays: int, failovers: int) -> list[str]:
    rows = [
        f"{'driver':<8}{'retried/s':>12}{'delay p50 ms':>14}{'delay p99 ms':>14}{'failover s':>12}"
    ]
    for name, make_url in stores.items():
        rate = await recovery_rate(make_url.format(uuid.uuid4().hex), count)
        lat = await delay_latencies(make_url.format(uuid.uuid4().hex), delays)
        fail = "n/a"
        if failovers and name != "memory":
            took = [
                await failover_seconds(make_url.format(uuid.uuid4().hex)) for _ in range(failovers)
            ]
            fail = f"{statistics.median(took):.2f}"
        rows.append(
            f"{name:<8}{rate:>12,.0f}{percentile(lat, 0.5):>14.1f}{percentile(lat, 0.99):>14.1f}{fail:>12}"
        )
    return rows


def test_recovery_benchmark_runs(tmp_path: Path) -> None:
    """Smoke test of the benchmark's code paths; no timing is asserted."""
    stores = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/{{}}.db"}
    rows = asyncio.run(measure(stores, count=20, delays=10, failovers=0))
    assert len(rows) == 3


if __name__ == "__main__":
    from tests.etcd_server import EtcdServer
    from tests.postgres_server import PostgresServer

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with (
        tempfile.TemporaryDirectory() as tmp,
        PostgresServer(settings={"fsync": "on", "full_page_writes": "on"}) as postgres,
    ):
        server = EtcdServer(Path(tmp) / "etcd")
        server.start()
        server.wait_ready()
        try:
            stores = {
                "memory": "memory://",
                "sqlite": f"sqlite:///{tmp}/{{}}.db",
                "etcd": server.url + "/{}",
                "postgres": postgres.url + "?schema={}",
            }
            print(f"{n} stalled states, 200 delays, lease TTL {LEASE_TTL}s, 3 failovers\n")
            print("\n".join(asyncio.run(measure(stores, n, delays=200, failovers=3))))
        finally:
            server.close()
