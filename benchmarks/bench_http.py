"""``flowstate serve`` and the remote driver: what the HTTP hop costs, and SSE fan-out.

Run it for the tables (medians over interleaved rounds, same-run ratios)::

    python -m benchmarks.bench_http [--rounds 5] [--per-flow 300] [--watchers 100] [--commits 10000]

* transitions/s: 64 flows at once, each committing ``Commit(Transit(...))`` steps through
  ``engine.execute``, once with ``Engine("http://...")`` against a ``flowstate serve`` process
  on a SQLite file (one client process, loopback), and once with the same engine on a SQLite
  file of its own in this process (the server's driver, directly). Rounds alternate which
  goes first; the ratio is the median of the per-round ratios (target >= 0.3).
* SSE fan-out: ``watchers`` streams of ``GET /api/v1/watch`` on one server, all read by this
  process, while a burst of ``commits`` versions is committed through the remote driver
  (64 at a time). Every watcher must receive every version; delivery latency is the time a
  watcher parsed a version minus the version's ``committed_at`` (the server's clock, which is
  this machine's; millisecond precision). Reported: p50, p99, and versions delivered per second.

:func:`measure_rates` and :func:`measure_fanout` return the figures for other runners;
:func:`suite` runs both as rows of ``python -m benchmarks``. pytest runs a tiny version of both
as a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec

import flowstate as fs
from benchmarks._engine_rate import step
from benchmarks._suite import Case, Row, Settings

FLOWS = 64
_LISTENING = re.compile(r"listening on (http://\S+)")


@contextlib.contextmanager
def served(store: Path) -> Iterator[str]:
    """Run ``flowstate serve`` on a SQLite file at ``store``; yield its URL; SIGTERM it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flowstate", "serve", f"sqlite:///{store}", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "FLOWSTATE_TOKEN"},
    )
    assert process.stderr is not None
    drain: threading.Thread | None = None
    try:
        lines: list[str] = []
        for line in process.stderr:
            lines.append(line)
            found = _LISTENING.search(line)
            if found:
                break
        else:
            raise RuntimeError("flowstate serve did not start:\n" + "".join(lines))
        # Keep reading its log, so that it never blocks on a full pipe.
        drain = threading.Thread(target=process.stderr.read, daemon=True)
        drain.start()
        yield found.group(1)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
        if drain is not None:
            drain.join(30)
        process.stderr.close()


# -- transitions per second ---------------------------------------------------------------------


async def transition_rate(url: str, flows: int, per_flow: int) -> float:
    """Committed transitions per second of ``flows`` flows run at once by ``engine.execute``
    (each flow takes ``per_flow`` steps and an End, every one a commit)."""
    prefix = uuid.uuid4().hex[:8]
    async with fs.Engine(url, flows={"step": step}) as engine:
        ctxs = []
        for i in range(flows):
            ctx = fs.StateCtx.new(f"bench-{prefix}-{i}", labels={"bench": prefix})
            ctx.current.annotations["left"] = str(per_flow)
            ctxs.append(ctx)
        await engine.do(fs.Commit(*(fs.Transit(c, "step") for c in ctxs)))
        start = time.perf_counter()
        results = await asyncio.gather(*(engine.execute(ctx) for ctx in ctxs))
        elapsed = time.perf_counter() - start
    if any(result.status != "ended" for result in results):
        raise RuntimeError(f"a benchmark flow did not end: {results}")
    return flows * (per_flow + 1) / elapsed


def measure_rates(rounds: int, per_flow: int, flows: int = FLOWS) -> dict[str, Any]:
    """Remote and direct transitions/s, ``rounds`` interleaved rounds.

    Returns:
        ``{"remote": [...], "direct": [...], "ratio": [...]}`` per round, and their medians
        under ``"median"``.
    """
    remote: list[float] = []
    direct: list[float] = []
    with tempfile.TemporaryDirectory(prefix="flowstate-bench-http-") as tmp:
        local = f"sqlite:///{tmp}/direct.db"
        with served(Path(tmp) / "served.db") as url:
            for i in range(rounds):
                # Alternate the order, so that neither side always runs on a warmer machine.
                order = [(url, remote), (local, direct)]
                for target, into in order if i % 2 == 0 else reversed(order):
                    into.append(asyncio.run(transition_rate(target, flows, per_flow)))
    ratios = [r / d for r, d in zip(remote, direct, strict=True)]
    return {
        "remote": remote,
        "direct": direct,
        "ratio": ratios,
        "median": {
            "remote": statistics.median(remote),
            "direct": statistics.median(direct),
            "ratio": statistics.median(ratios),
        },
    }


# -- SSE fan-out --------------------------------------------------------------------------------


class _Stamp(msgspec.Struct):
    """The two fields of a streamed version the fan-out reads (others are skipped)."""

    rev: int
    committed_at: datetime.datetime


async def _watch(
    client: httpx.AsyncClient,
    params: dict[str, Any],
    expected: int,
    latencies: list[float],
    opened: list[int],
    ready: tuple[asyncio.Event, int],
) -> None:
    decode = msgspec.json.Decoder(_Stamp).decode
    received = 0
    buffer = b""
    async with client.stream("GET", "/api/v1/watch", params=params) as response:
        response.raise_for_status()
        opened.append(1)
        if len(opened) == ready[1]:
            ready[0].set()
        async for chunk in response.aiter_raw():
            now = time.time()
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                if frame.startswith(b":"):
                    continue  # a keep-alive comment
                # JSON escapes newlines, so the first "data: " is the field, not content.
                stamp = decode(frame.partition(b"data: ")[2])
                latencies.append(now - stamp.committed_at.timestamp())
                received += 1
            if received >= expected:
                return


async def _burst(url: str, commits: int, label: str) -> None:
    """``commits`` new states committed through the remote driver, 64 at a time."""
    async with fs.Engine(url) as engine:
        numbers = iter(range(commits))

        async def committer() -> None:
            for i in numbers:
                ctx = fs.StateCtx.new(f"fan-{label}-{i}", labels={"fan": label})
                await engine.do(fs.Commit(fs.Transit(ctx, "x")))

        await asyncio.gather(*(committer() for _ in range(FLOWS)))


async def _fanout(url: str, watchers: int, commits: int) -> dict[str, float]:
    label = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    ready = asyncio.Event()
    opened: list[int] = []
    limits = httpx.Limits(max_connections=watchers + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        head = (await client.get("/api/v1/head")).json()["rev"]
        params = {"label": f"fan={label}", "since_rev": head, "limit": 1000}
        tasks = [
            asyncio.ensure_future(
                _watch(client, params, commits, latencies, opened, (ready, watchers))
            )
            for _ in range(watchers)
        ]
        try:
            async with asyncio.timeout(600):
                await ready.wait()
                start = time.perf_counter()
                await _burst(url, commits, label)
                committed = time.perf_counter() - start
                await asyncio.gather(*tasks)
                delivered = time.perf_counter() - start
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    if len(latencies) != watchers * commits:
        raise RuntimeError(f"{len(latencies)} deliveries, expected {watchers * commits}")
    latencies.sort()
    return {
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "commit_s": committed,
        "deliver_s": delivered,
        "versions_per_s": watchers * commits / delivered,
    }


def measure_fanout(watchers: int, commits: int) -> dict[str, float]:
    """Delivery latency (p50, p99 in ms) and rate of ``watchers`` SSE streams of one server
    each receiving every version of a burst of ``commits``."""
    with (
        tempfile.TemporaryDirectory(prefix="flowstate-bench-sse-") as tmp,
        served(Path(tmp) / "served.db") as url,
    ):
        return asyncio.run(_fanout(url, watchers, commits))


# -- the tables ---------------------------------------------------------------------------------


def print_tables(rates: dict[str, Any], fanout: dict[str, float], args: argparse.Namespace) -> None:
    median = rates["median"]
    print(f"## Remote driver: {FLOWS} concurrent flows, {args.per_flow} steps each")
    print(f"median of {args.rounds} interleaved rounds, {os.cpu_count()} CPUs, loopback\n")
    print("| engine on | transitions/s | vs direct |")
    print("|---|---:|---:|")
    print(f"| SQLite, directly (in process) | {median['direct']:,.0f} | 1.00x |")
    print(
        f"| `http://` through `flowstate serve` (same SQLite driver) | {median['remote']:,.0f} "
        f"| {median['ratio']:.2f}x |"
    )
    print(f"\nper-round ratios: {', '.join(f'{r:.2f}' for r in rates['ratio'])} (target >= 0.30)")
    print(f"\n## SSE fan-out: {args.watchers} watchers, a burst of {args.commits:,} commits\n")
    print("| delivery p50 | delivery p99 | versions delivered/s | burst committed in |")
    print("|---:|---:|---:|---:|")
    print(
        f"| {fanout['p50_ms']:.0f} ms | {fanout['p99_ms']:.0f} ms "
        f"| {fanout['versions_per_s']:,.0f} | {fanout['commit_s']:.1f} s |"
    )


# -- rows of python -m benchmarks ------------------------------------------------------------

DIRECT = "flowstate engine, SQLite directly (in process)"
REMOTE = "the same engine through http:// and flowstate serve (same SQLite driver)"


def rate_seconds(n: int, url: str = "") -> float:
    """Seconds for ``n`` transitions of FLOWS flows: through the server at ``url``, or, with
    no ``url``, on a SQLite file of this process's own."""
    per_flow = max(1, n // FLOWS - 1)  # each flow commits per_flow transits and an End
    if url:
        rate = asyncio.run(transition_rate(url, FLOWS, per_flow))
    else:
        with tempfile.TemporaryDirectory(prefix="flowstate-bench-http-") as tmp:
            rate = asyncio.run(transition_rate(f"sqlite:///{tmp}/direct.db", FLOWS, per_flow))
    return n / rate


def fanout_value(n: int, watchers: int, commits: int, figure: str) -> float:
    """One figure of :func:`measure_fanout` (a ``direct`` case: ``n`` is not used)."""
    return measure_fanout(watchers, commits)[figure]


def cases(url: str, *, watchers: int = 100, commits: int = 10_000) -> list[Case]:
    group = f"remote driver, {FLOWS} at a time"
    fan = {"watchers": watchers, "commits": commits}
    sse = f"SSE fan-out: {watchers} watchers, a burst of {commits:,} commits"
    return [
        Case(group, DIRECT, rate_seconds, {}, pilot=2048, step=FLOWS),
        Case(
            group,
            REMOTE,
            rate_seconds,
            {"url": url},
            baseline=DIRECT,
            target=0.3,
            pilot=2048,
            step=FLOWS,
        ),
        *(
            Case(
                sse, name, fanout_value, {**fan, "figure": figure}, unit=unit, direct=True, pilot=1
            )
            for name, figure, unit in (
                ("delivery p50", "p50_ms", "ms"),
                ("delivery p99", "p99_ms", "ms"),
                ("versions delivered", "versions_per_s", "versions/s"),
            )
        ),
    ]


def suite(settings: Settings) -> list[Row]:
    """The remote driver's rate next to the direct one, and SSE fan-out, as suite rows."""
    size = {"watchers": 10, "commits": 500} if settings.quick else {}
    with (
        tempfile.TemporaryDirectory(prefix="flowstate-bench-http-") as tmp,
        served(Path(tmp) / "served.db") as url,
    ):
        return settings.run(cases(url, **size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (median reported)")
    parser.add_argument("--per-flow", type=int, default=300, help="steps per flow per round")
    parser.add_argument("--watchers", type=int, default=100, help="SSE streams")
    parser.add_argument("--commits", type=int, default=10_000, help="versions in the burst")
    args = parser.parse_args(argv)
    rates = measure_rates(args.rounds, args.per_flow)
    fanout = measure_fanout(args.watchers, args.commits)
    print_tables(rates, fanout, args)
    return 0


def test_bench_http_smoke() -> None:
    """A tiny run of both measurements (no figure is asserted)."""
    rates = measure_rates(rounds=1, per_flow=5, flows=8)
    assert rates["median"]["remote"] > 0
    assert rates["median"]["direct"] > 0
    fanout = measure_fanout(watchers=3, commits=40)
    assert fanout["p99_ms"] >= fanout["p50_ms"]


if __name__ == "__main__":
    raise SystemExit(main())
