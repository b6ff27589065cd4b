"""etcd: the engine against raw etcd transactions that write the same keys, and watch latency.

The module starts its own etcd member (``tests/etcd_server.py``) unless
``FLOWSTATE_ETCD_URL`` names one. One step is one commit of one state (one label). The
same-work baselines send, on aetcd's gRPC stub, the ``Txn`` the driver sends for it: compare
the head key's and the state key's ``mod_revision``; put the head, the time index entry, the
state's latest version, its log entry, its history posting and its label posting:

* sequential: one such ``Txn`` per step, one after another; the engine runs one flow. ``raw
  aetcd CAS, one key`` (``client.transaction`` comparing and putting one key, less work than
  a commit) shows what aetcd's own API costs;
* 64 at a time: one ``Txn`` carrying 64 states' commits (nested ``Txn`` ops where the
  server's ``--max-txn-ops`` requires it, as the driver packs them); the engine runs 64
  flows at once, and group commit sends their commits together;
* watch delivery: the median time from sending a commit until a waiter on another driver
  object (woken by its etcd watch) runs.

Run ``python -m benchmarks --only etcd`` for the table; pytest runs a tiny smoke version.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
from aetcd import rpc

import flowstate as fs
from flowstate.drivers.base import CommitRequest, StateWrite
from flowstate.drivers.etcd import EtcdDriver

try:
    from benchmarks._engine_rate import LABELS, engine_seconds
    from benchmarks._suite import Case, Row, Settings
    from tests.etcd_server import ENV_URL, EtcdServer, etcd_url, raw_client, unique_url
except ImportError:  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._engine_rate import LABELS, engine_seconds
    from benchmarks._suite import Case, Row, Settings
    from tests.etcd_server import ENV_URL, EtcdServer, etcd_url, raw_client, unique_url

__all__ = ["etcd_url"]

CONCURRENCY = 64
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops, which the driver assumes too
SHAPED = "raw Txn, a commit's keys"
BATCHED = f"raw Txn, {CONCURRENCY} commits' keys per Txn"


def _mod_is(key: bytes, rev: int) -> Any:
    return rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=rev)


def _put(key: bytes, value: bytes) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))


async def _raw_txns(url: str, states: int, n: int) -> float:
    """Seconds for ``n`` steps sent as ``Txn`` requests of ``states`` commits each."""
    client = await raw_client(url)
    prefix = unique_url(url).rsplit("/", 1)[1].encode() + b"/~"
    head_key = prefix + b"head"
    state = fs.State(id="bench-0", labels=dict(LABELS), transition=fs.Transition(to="step"))
    state.annotations["left"] = "100000"
    blob = msgspec.msgpack.encode([state, 0, 0])  # a version: [state, back, token]
    posting = msgspec.msgpack.encode(["bench-0", LABELS])
    keys = [prefix + b"s/bench-%d" % i for i in range(states)]
    revs = [0] * states
    head = 0
    txns = max(1, n // states)
    try:
        start = time.perf_counter()
        for _ in range(txns):
            compares = [_mod_is(head_key, head)] + [
                _mod_is(k, r) for k, r in zip(keys, revs, strict=True)
            ]
            ops = []
            for i, key in enumerate(keys):
                pos = b"%016x/%04x" % (head, i)
                ops += [
                    _put(key, blob),
                    _put(prefix + b"log/" + pos, blob),
                    _put(prefix + b"id/bench-%d/" % i + pos, posting),
                    _put(prefix + b"lbl/bench/yes/" + pos, posting),
                ]
            top = [_put(head_key, b"x" * 12), _put(prefix + b"t/%012x/%016x" % (0, head), b"")]
            room = MAX_TXN_OPS - max(len(compares), 2)
            if len(ops) + len(top) <= MAX_TXN_OPS:
                top += ops
            else:  # nested condition-less Txn ops, as the driver packs a large group
                top += [
                    rpc.RequestOp(request_txn=rpc.TxnRequest(success=ops[i : i + room]))
                    for i in range(0, len(ops), room)
                ]
            response = await client.kvstub.Txn(rpc.TxnRequest(compare=compares, success=top))
            if not response.succeeded:
                raise RuntimeError("compare-and-set failed")
            head = int(response.header.revision)
            revs = [head] * states
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    return elapsed * n / (txns * states)


async def _aetcd_cas(url: str, n: int) -> float:
    """Seconds for ``n`` compare-and-set transactions on one key through aetcd's API."""
    client = await raw_client(url)
    key = unique_url(url).rsplit("/", 1)[1].encode() + b"/cas"
    value = b"x" * 120
    mod = 0
    try:
        start = time.perf_counter()
        for _ in range(n):
            ops = client.transactions
            ok, responses = await client.transaction(
                compare=[ops.mod(key) == mod], success=[ops.put(key, value)], failure=[]
            )
            if not ok:
                raise RuntimeError("compare-and-set failed")
            mod = responses[0].response_put.header.revision
        return time.perf_counter() - start
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
            result = await writer.commit(
                CommitRequest(writes=[StateWrite(state=state, expected_rev=rev)])
            )
            rev = result.revs[0]
            latencies.append(await waiter - start)
    return latencies


# -- the contenders: fn(n, **kwargs) -> seconds for n steps ---------------------------------


def raw_txn(n: int, url: str, states: int = 1) -> float:
    return asyncio.run(_raw_txns(url, states, n))


def aetcd_cas(n: int, url: str) -> float:
    return asyncio.run(_aetcd_cas(url, n))


def engine(n: int, url: str, flows: int = 1) -> float:
    return asyncio.run(engine_seconds(unique_url(url), flows, n))


def wake_latency(n: int, url: str) -> float:
    """``n`` times the median delivery latency of ``n`` commits (so that the row, seconds per
    unit, reads as the median)."""
    return statistics.median(asyncio.run(_wake_latencies(url, n))) * n


def cases(url: str) -> list[Case]:
    kw = {"url": url}
    sequential = "etcd, sequential"
    batched = f"etcd, {CONCURRENCY} at a time"
    return [
        Case(sequential, SHAPED, raw_txn, kw, note="the keys one commit writes, one Txn each"),
        Case(sequential, "flowstate engine, 1 flow", engine, kw, baseline=SHAPED),
        Case(sequential, "raw aetcd CAS, one key", aetcd_cas, kw, baseline=SHAPED),
        Case(batched, BATCHED, raw_txn, {**kw, "states": CONCURRENCY}, pilot=1024, step=64),
        Case(
            batched,
            f"flowstate engine, {CONCURRENCY} flows",
            engine,
            {**kw, "flows": CONCURRENCY},
            baseline=BATCHED,
            target=0.8,
            pilot=1024,
            step=CONCURRENCY,
        ),
        Case(
            "etcd, watch delivery",
            "commit sent -> waiter on another driver runs (median)",
            wake_latency,
            kw,
            unit="ms",
            pilot=100,
        ),
    ]


@contextmanager
def etcd_server() -> Iterator[str]:
    """The URL of the etcd to measure: ``FLOWSTATE_ETCD_URL``, or a member started here."""
    configured = os.environ.get(ENV_URL)
    if configured:
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="flowstate-bench-etcd-") as tmp:
        server = EtcdServer(Path(tmp) / "data")
        try:
            server.start()
            server.wait_ready()
            yield server.url
        finally:
            server.close()


def suite(settings: Settings) -> list[Row]:
    with etcd_server() as url:
        return settings.run(cases(url))


def test_bench_etcd_smoke(etcd_url: str) -> None:
    """Every contender runs (tiny sizes, one round); no timing is asserted."""
    rows = Settings.smoke().run(cases(etcd_url))
    assert len(rows) == len(cases(etcd_url))
    assert all(row.value > 0 for row in rows)


if __name__ == "__main__":
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "etcd", *sys.argv[1:]]))
