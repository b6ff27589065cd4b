"""etcd driver throughput against raw aetcd compare-and-set transactions, and watch latency.

Run it as a script for the table (medians over a few repetitions); it starts its own etcd
member (through ``tests/etcd_server.py``) unless ``FLOWSTATE_ETCD_URL`` names one::

    python benchmarks/bench_etcd.py [--repeat 5] [--base 1000]

Rows:

* raw aetcd CAS: ``client.transaction`` comparing one key's ``mod_revision`` and putting it
  (aetcd's own API), sequential and 32 concurrent (one key per worker);
* raw gRPC stub CAS: the same ``Txn`` built from protobuf messages and sent on the stub (what
  aetcd does underneath, without its per-call Python work), for reference;
* raw gRPC stub, a commit's shape: the ``Txn`` a one-state commit sends (2 compares: the
  state and the head; 5 puts: state, log, label posting, head, time index), built by hand:
  the floor of the engine, which must write those keys;
* engine: flows looping ``Commit(Transit(...))`` through ``engine.execute``, sequential and
  32 concurrent (each flow on its own state, as each raw worker owns its key);
* wait_for_rev latency: a waiter on a second driver (so woken by its etcd watch), timed from
  the moment the commit is sent until the waiting task runs again.

Under pytest (``--benchmark-disable`` in the normal run) a tiny version runs as a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aetcd import rpc

import flowstate as fs
from benchmarks._engine_rate import engine_rate
from flowstate.drivers.base import CommitRequest, StateWrite
from flowstate.drivers.etcd import EtcdDriver

try:
    from tests.etcd_server import ENV_URL, EtcdServer, etcd_url, raw_client, unique_url
except ImportError:  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.etcd_server import ENV_URL, EtcdServer, etcd_url, raw_client, unique_url

__all__ = ["etcd_url"]

CONCURRENCY = 32


async def _raw_cas(
    url: str, workers: int, per_worker: int, *, stub: bool, shaped: bool = False
) -> float:
    """Compare-and-set transactions per second, ``workers`` keys in parallel."""
    client = await raw_client(url)
    prefix = unique_url(url).rsplit("/", 1)[1].encode()
    value = b"x" * 64

    async def worker(i: int) -> None:
        key = prefix + b"/cas-%d" % i
        head = prefix + b"/head-%d" % i
        mod = 0
        for n in range(per_worker):
            if shaped:
                compares = [
                    rpc.Compare(
                        key=k, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=mod
                    )
                    for k in (key, head)
                ]
                puts = [
                    (key, b"x" * 120),
                    (prefix + b"/log/%d/%d" % (i, n), b"x" * 120),
                    (prefix + b"/label/%d/%d" % (i, n), b"x" * 24),
                    (head, b"x" * 12),
                    (prefix + b"/time/%d/%d" % (i, n), b""),
                ]
                ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)) for k, v in puts]
                response = await client.kvstub.Txn(rpc.TxnRequest(compare=compares, success=ops))
                ok, mod = response.succeeded, response.header.revision
            elif stub:
                compare = rpc.Compare(
                    key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=mod
                )
                put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))
                request = rpc.TxnRequest(compare=[compare], success=[put])
                response = await client.kvstub.Txn(request)
                ok, mod = response.succeeded, response.header.revision
            else:
                ops = client.transactions
                ok, responses = await client.transaction(
                    compare=[ops.mod(key) == mod], success=[ops.put(key, value)], failure=[]
                )
                mod = responses[0].response_put.header.revision
            if not ok:
                raise RuntimeError("compare-and-set failed")

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(workers)))
        return workers * per_worker / (time.perf_counter() - start)
    finally:
        await client.close()


async def _wake_latencies(url: str, samples: int) -> list[float]:
    """Seconds from sending a commit to a waiter on another driver running again."""
    store = unique_url(url)
    latencies = []
    async with EtcdDriver.from_url(store) as writer, EtcdDriver.from_url(store) as reader:
        rev = 0

        async def wait(target: int) -> float:
            await reader.wait_for_rev(target)
            return time.perf_counter()

        for _ in range(samples):
            waiter = asyncio.ensure_future(wait(await reader.head_rev() + 1))
            await asyncio.sleep(0)  # the waiter is registered
            state = fs.State(id="s", transition=fs.Transition(to="a"))
            start = time.perf_counter()
            write = StateWrite(state=state, expected_rev=rev)
            result = await writer.commit(CommitRequest(writes=[write]))
            rev = result.revs[0]
            latencies.append(await waiter - start)
    return latencies


def raw_sequential(url: str, n: int) -> float:
    return asyncio.run(_raw_cas(url, 1, n, stub=False))


def raw_concurrent(url: str, n: int) -> float:
    return asyncio.run(_raw_cas(url, CONCURRENCY, max(1, n // CONCURRENCY), stub=False))


def stub_sequential(url: str, n: int) -> float:
    return asyncio.run(_raw_cas(url, 1, n, stub=True))


def stub_concurrent(url: str, n: int) -> float:
    return asyncio.run(_raw_cas(url, CONCURRENCY, max(1, n // CONCURRENCY), stub=True))


def shaped_sequential(url: str, n: int) -> float:
    return asyncio.run(_raw_cas(url, 1, n, stub=True, shaped=True))


def engine_sequential(url: str, n: int) -> float:
    return asyncio.run(engine_rate(unique_url(url), 1, n))


def engine_concurrent(url: str, n: int) -> float:
    return asyncio.run(engine_rate(unique_url(url), CONCURRENCY, max(1, n // CONCURRENCY)))


Measure = Callable[[str, int], float]

MEASURES: list[tuple[str, Measure, int]] = [
    ("raw aetcd CAS, sequential", raw_sequential, 1),
    ("raw gRPC stub CAS, sequential", stub_sequential, 1),
    ("raw gRPC stub, a commit's shape, sequential", shaped_sequential, 1),
    ("engine Commit(Transit), sequential", engine_sequential, 1),
    (f"raw aetcd CAS, {CONCURRENCY} concurrent", raw_concurrent, 4),
    (f"raw gRPC stub CAS, {CONCURRENCY} concurrent", stub_concurrent, 4),
    (f"engine Commit(Transit), {CONCURRENCY} concurrent", engine_concurrent, 4),
]


def run_table(url: str, repeat: int, base: int) -> dict[str, float]:
    """Median rate of each measurement. Repetitions interleave the measurements, so that a
    change in the machine's load affects all of them alike and the ratios stay fair.
    """
    runs: dict[str, list[float]] = {name: [] for name, _, _ in MEASURES}
    for _ in range(repeat):
        for name, fn, scale in MEASURES:
            runs[name].append(fn(url, base * scale))
    return {name: statistics.median(rates) for name, rates in runs.items()}


def run_latency(url: str, repeat: int, samples: int) -> tuple[float, float]:
    """Median over repetitions of the p50 and p99 wake latency, in milliseconds."""
    p50s, p99s = [], []
    for _ in range(repeat):
        latencies = sorted(asyncio.run(_wake_latencies(url, samples)))
        p50s.append(statistics.median(latencies) * 1000)
        p99s.append(latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] * 1000)
    return statistics.median(p50s), statistics.median(p99s)


def print_table(medians: dict[str, float], latency: tuple[float, float], repeat: int) -> None:
    print(f"etcd driver benchmark, median of {repeat}, {os.cpu_count()} CPUs")
    print(f"{'measurement':<44} {'transitions/s':>14}")
    for name, rate in medians.items():
        print(f"{name:<44} {rate:>14,.0f}")
    print()
    for kind in ("sequential", f"{CONCURRENCY} concurrent"):
        engine = medians[f"engine Commit(Transit), {kind}"]
        raw = medians[f"raw aetcd CAS, {kind}"]
        stub = medians[f"raw gRPC stub CAS, {kind}"]
        print(
            f"engine/raw aetcd, {kind}: {engine / raw:.2f} (target >= 0.80); "
            f"engine/raw stub: {engine / stub:.2f}"
        )
    floor = medians["raw gRPC stub, a commit's shape, sequential"]
    sequential = medians["engine Commit(Transit), sequential"]
    print(f"engine/commit-shaped stub Txn (the floor), sequential: {sequential / floor:.2f}")
    p50, p99 = latency
    print("wait_for_rev delivery (commit sent -> waiter on another driver runs): ", end="")
    print(f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument("--base", type=int, default=1000, help="transitions per sequential run")
    parser.add_argument("--samples", type=int, default=300, help="latency samples per run")
    args = parser.parse_args(argv)
    configured = os.environ.get(ENV_URL)
    if configured:
        return _report(configured, args)
    with tempfile.TemporaryDirectory(prefix="flowstate-bench-etcd-") as tmp:
        server = EtcdServer(Path(tmp) / "data")
        try:
            server.start()
            server.wait_ready()
            return _report(server.url, args)
        finally:
            server.close()


def _report(url: str, args: argparse.Namespace) -> int:
    medians = run_table(url, args.repeat, args.base)
    latency = run_latency(url, args.repeat, args.samples)
    print_table(medians, latency, args.repeat)
    return 0


def test_bench_etcd_smoke(etcd_url: str) -> None:
    """A tiny run of every measurement (no timing is asserted)."""
    for _, fn, _scale in MEASURES:
        assert fn(etcd_url, 64) > 0
    p50, p99 = run_latency(etcd_url, 1, 5)
    assert 0 < p50 <= p99


if __name__ == "__main__":
    sys.exit(main())
