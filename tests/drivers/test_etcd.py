"""The etcd driver against a real etcd: the conformance suite, the model machine, and what only
it promises (isolated key prefixes, one revision per commit, a native watch resumed across
restarts and compaction, fail-over between members, acknowledged commits never lost or doubled).

Most tests share the session's etcd (``etcd_url``), each under a fresh key prefix. Tests that
break the server on purpose start their own member or cluster.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import shutil
from typing import TYPE_CHECKING, Any

import pytest
from aetcd import rpc
from hypothesis import settings

import flowstate as fs
from flowstate.drivers.base import CommitRequest, StateWrite, SupportsLease
from flowstate.drivers.etcd import LAYOUT_VERSION, EtcdDriver
from flowstate.testing.conformance import DriverTests
from flowstate.testing.stateful import run_driver_machine
from tests import etcd_server
from tests.drivers.crash import all_states
from tests.drivers.etcd_proxy import TcpProxy
from tests.etcd_server import EtcdCluster, EtcdServer, etcd_url, raw_client, unique_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

__all__ = ["etcd_url"]

pytestmark = [pytest.mark.anyio, pytest.mark.etcd]


class TestEtcdDriver(DriverTests):
    @pytest.fixture
    async def driver(self, etcd_url: str) -> AsyncIterator[EtcdDriver]:
        async with EtcdDriver.from_url(unique_url(etcd_url)) as driver:
            yield driver


def test_etcd_driver_matches_the_model(etcd_url: str) -> None:
    run_driver_machine(
        lambda: EtcdDriver.from_url(unique_url(etcd_url)),
        settings_=settings(max_examples=50, stateful_step_count=30, deadline=None),
    )


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A member of this module's own, for the tests that stop, restart or compact it."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd-own") / "data")
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh three-member loopback cluster."""
    with EtcdCluster(tmp_path) as started:
        yield started


def _write(state_id: str, expected_rev: int = 0, **labels: str) -> StateWrite:
    state = fs.State(id=state_id, labels=labels, transition=fs.Transition(to="a"))
    return StateWrite(state=state, expected_rev=expected_rev)


async def _commit(driver: fs.Driver, *writes: StateWrite) -> list[int]:
    return (await driver.commit(CommitRequest(writes=list(writes)))).revs


async def _raw_keys(url: str, prefix: bytes) -> dict[bytes, Any]:
    client = await raw_client(url)
    try:
        found = await client.get_prefix(prefix)
        return {bytes(kv.key): kv for kv in found}
    finally:
        await client.close()


def test_missing_etcd_binary_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_server, "ETCD_BINARY", "/nonexistent/etcd")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install etcd-server"):
        etcd_server.etcd_binary()


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "endpoints", "prefix", "options"),
    [
        ("etcd://127.0.0.1:2379/fs", [("127.0.0.1", 2379)], "fs", {}),
        ("etcd://localhost/fs/", [("localhost", 2379)], "fs", {}),
        ("etcd://h1:1,h2:2,h3:3/a/b", [("h1", 1), ("h2", 2), ("h3", 3)], "a/b", {}),
        ("ETCD://[::1]:2380,[fe80::1]/x", [("::1", 2380), ("fe80::1", 2379)], "x", {}),
        ("etcd://h:1", [("h", 1)], "flowstate", {}),
        ("etcd://h:1/", [("h", 1)], "flowstate", {}),
        ("etcd://h:1/with%20space/%C3%BC", [("h", 1)], "with space/ü", {}),
        ("etcd://h:1//rooted", [("h", 1)], "/rooted", {}),
        ("etcd://h:1/p?timeout=0.5", [("h", 1)], "p", {"timeout": 0.5}),
        ("etcd://h:1/p?max_txn_ops=1024", [("h", 1)], "p", {"max_txn_ops": 1024}),
        (
            "etcd://h:1/p?max_request_bytes=10485760",
            [("h", 1)],
            "p",
            {"max_request_bytes": 10485760},
        ),
        ("etcd://h:1?timeout=2", [("h", 1)], "flowstate", {"timeout": 2.0}),
    ],
)
def test_url(
    url: str, endpoints: list[tuple[str, int]], prefix: str, options: dict[str, object]
) -> None:
    driver = fs.open_driver(url)
    assert isinstance(driver, EtcdDriver)
    assert driver.endpoints == endpoints
    assert driver.prefix == prefix
    for name, value in options.items():
        assert getattr(driver, name) == value
    again = EtcdDriver.from_url(driver.url)
    assert (again.endpoints, again.prefix) == (endpoints, prefix)
    assert "unopened" in repr(driver)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("etcd:///fs", "expected etcd://host:port"),
        ("etcd://h:port/fs", "port must be"),
        ("etcd://h:0/fs", "port must be"),
        ("etcd://h:70000/fs", "port must be"),
        ("etcd://h1:1,,h2:2/fs", "no host"),
        ("etcd://::1/fs", "brackets"),
        ("etcd://[::1/fs", "unclosed"),
        ("etcd://[::1]x/fs", "bad etcd endpoint"),
        ("etcd://user:secret@h:1/fs", "a password never goes in the URL"),
        ("etcd://h:1/~fs", "'~'"),
        ("etcd://h:1/a/~b", "'~'"),
        ("etcd://h:1/%00", "NUL"),
        ("etcd://h:1/fs?timeout=soon", "must be a number"),
        ("etcd://h:1/fs?timeout=0", "timeout must be"),
        ("etcd://h:1/fs?max_txn_ops=2", "max_txn_ops must be"),
        ("etcd://h:1/fs?timeout=inf", "timeout must be"),
        ("etcd://h:1/fs?timeout=1e300", "timeout must be"),
        ("etcd://h:1/fs?max_request_bytes=100", "max_request_bytes must be"),
        ("etcd://h:1/fs?ttl=3", "unknown option 'ttl'"),
        ("etcd://h:1/fs?timeout", "malformed"),
        ("etcd://h:1/fs#top", "fragment"),
        ("etcd://h:%C2%B2/fs", "the port must be 1-65535"),  # "²" is a digit to isdigit()
        ("etcd://h:\u0663/fs", "the port must be 1-65535"),  # an Arabic-Indic three
        ("etcd://h:" + "9" * 5000 + "/fs", "the port must be 1-65535"),
        ("etcd://ho\nst:1/fs", "a space or control character"),
        ("etcd://ho st:1/fs", "a space or control character"),
        ("etcd://h:1/fs?max_txn_ops=1_28", "max_txn_ops must be an int"),
        ("etcd://h:1/fs?timeout=%D9%A9", "must be a number"),
        ("http://h:1/fs", "not an etcd:// URL"),
    ],
)
def test_bad_url(url: str, problem: str) -> None:
    with pytest.raises(fs.InvalidURLError, match=problem) as info:
        EtcdDriver.from_url(url)
    assert "secret" not in str(info.value)


# -- layout ------------------------------------------------------------------------------------


async def test_prefixes_are_isolated_even_when_nested(etcd_url: str) -> None:
    base = unique_url(etcd_url)
    urls = {"outer": base, "inner": f"{base}/inner", "sibling": f"{base}x"}
    drivers = {name: EtcdDriver.from_url(url) for name, url in urls.items()}
    try:
        for driver in drivers.values():
            await driver.open()
        for name, driver in drivers.items():
            await _commit(driver, _write(f"{name}-1", kind="k"), _write(f"{name}-2", kind="k"))
            await _commit(driver, _write(f"{name}-3", kind="k"))
        for name, driver in drivers.items():
            assert [s.id for s in await all_states(driver)] == [f"{name}-{i}" for i in (1, 2, 3)]
            assert [s.id for s in await all_states(driver, labels={"kind": "k"})] == [
                f"{name}-{i}" for i in (1, 2, 3)
            ]
            page = await driver.get_states(fs.StatesQuery(since_latest=True))
            assert [s.id for s in page.states] == [f"{name}-3"]
            with pytest.raises(fs.NotFoundError):
                await driver.get_state("outer-1" if name != "outer" else "inner-1")
        heads = {name: await d.head_rev() for name, d in drivers.items()}
        assert len(set(heads.values())) == 3, "each store has its own head"
    finally:
        for driver in drivers.values():
            await driver.aclose()
    keys = await _raw_keys(etcd_url, drivers["outer"].prefix.encode())
    for key in keys:
        owners = [n for n, d in drivers.items() if key.startswith(d.prefix.encode() + b"/~")]
        assert len(owners) == 1, key


async def test_calls_in_flight_when_the_driver_closes_get_closed_error(etcd_url: str) -> None:
    # gRPC ends the calls of a channel that closes with CancelledError, in tasks that nobody
    # cancelled: the driver says ClosedError.
    outcomes: list[str] = []

    async def reader(driver: EtcdDriver, i: int) -> None:
        try:
            while True:
                if i % 2:
                    await driver.head_rev()
                else:
                    await driver.get_states(fs.StatesQuery(limit=5))
        except fs.ClosedError:
            outcomes.append("closed")
        except asyncio.CancelledError:
            outcomes.append("cancelled")

    for _ in range(5):
        driver = EtcdDriver.from_url(unique_url(etcd_url))
        await driver.open()
        readers = [asyncio.create_task(reader(driver, i)) for i in range(8)]
        await asyncio.sleep(0.05)  # the readers are mid-call, whichever call that is
        await driver.aclose()
        await asyncio.gather(*readers)
    assert outcomes == ["closed"] * 40


async def test_commit_shares_one_revision_and_moves_the_head_key(etcd_url: str) -> None:
    url = unique_url(etcd_url)
    async with EtcdDriver.from_url(url) as driver:
        (first,) = await _commit(driver, _write("a"))
        revs = await _commit(driver, _write("b", kind="x"), _write("c"), _write("a", first))
        assert len(set(revs)) == 1
        (rev,) = set(revs)
        assert rev > first
        assert await driver.head_rev() == rev
        assert [s.rev for s in await all_states(driver)] == [first, rev, rev, rev]
        page = await driver.get_states(fs.StatesQuery(limit=1, since_rev=first))
        assert [s.id for s in page.states] == ["b", "c", "a"], "the page keeps the revision whole"
        assert (await driver.get_state("a", first)).rev == first
        assert (await driver.get_state("a", rev)).rev == rev
        prefix = driver.prefix.encode() + b"/~"
    keys = await _raw_keys(etcd_url, prefix)
    assert keys[prefix + b"head"].mod_revision == rev
    assert keys[prefix + b"meta"].value == str(LAYOUT_VERSION).encode()
    for state_id in "abc":
        assert keys[prefix + b"s/" + state_id.encode()].mod_revision == rev


async def test_history_survives_compaction(etcd_url: str) -> None:
    url = unique_url(etcd_url)
    async with EtcdDriver.from_url(url) as driver:
        rev = 0
        for i in range(5):
            (rev,) = await _commit(driver, _write("s", rev, step=str(i)))
        client = await raw_client(url)
        try:
            found = await client.get(driver.prefix.encode() + b"/~head")
            await client.compact(found.header.revision)
        finally:
            await client.close()
        history = await all_states(driver)
        assert [s.labels["step"] for s in history] == ["0", "1", "2", "3", "4"]
        assert (await driver.get_state("s", history[1].rev)).labels["step"] == "1"
        assert [s.labels["step"] for s in await all_states(driver, labels={"step": "2"})] == ["2"]


async def test_lease_keys_do_not_move_the_head(etcd_url: str) -> None:
    async with EtcdDriver.from_url(unique_url(etcd_url)) as driver:
        assert isinstance(driver, SupportsLease)
        await _commit(driver, _write("s"))
        head = await driver.head_rev()
        lease = await driver.acquire_lease("leader", "me", 5)
        assert lease is not None
        assert await driver.renew_lease(lease) == lease
        again = await driver.acquire_lease("leader", "me", 5)
        assert again is not None
        assert again.token != lease.token, "a holder's new claim has a new token"
        assert await driver.renew_lease(lease) is None, "the previous claim is gone"
        await driver.release_lease(again)
        assert await driver.get_lease("leader") is None
        assert await driver.head_rev() == head


async def test_since_latest_finds_a_match_far_back(etcd_url: str) -> None:
    async with EtcdDriver.from_url(unique_url(etcd_url)) as driver, fs.Engine(driver) as engine:
        rare = fs.StateCtx.new("rare", labels={"kind": "rare", "team": "x"})
        await engine.do(fs.Commit(fs.Transit(rare, "a")))
        ctx = fs.StateCtx.new("busy", labels={"kind": "busy", "team": "x"})
        for _ in range(300):
            await engine.do(fs.Commit(fs.Transit(ctx, "a")))
        found = await engine.find_state({"team": "x", "kind": "rare"})
        assert found.committed.rev == rare.committed.rev
        page = await engine.get_states(labels={"kind": "rare"}, since_latest=True, latest_only=True)
        assert [s.id for s in page.states] == ["rare"]
        page = await engine.get_states(labels={"kind": "rare"}, since_rev=rare.committed.rev)
        assert page.states == []


async def test_since_time_between_commits(etcd_url: str) -> None:
    async with EtcdDriver.from_url(unique_url(etcd_url)) as driver:
        first = await driver.commit(CommitRequest(writes=[_write("a")]))
        middle = first.committed_at + datetime.timedelta(microseconds=1500)
        # The next commit must fall in a later millisecond than ``middle``.
        later = middle + datetime.timedelta(milliseconds=1)
        await asyncio.sleep(max(0.0, (later - datetime.datetime.now(datetime.UTC)).total_seconds()))
        second = await driver.commit(CommitRequest(writes=[_write("b")]))
        assert second.committed_at >= middle
        page = await driver.get_states(fs.StatesQuery(since_time=middle))
        assert [s.id for s in page.states] == ["b"]
        page = await driver.get_states(fs.StatesQuery(since_time=middle, since_rev=second.revs[0]))
        assert page.states == []


async def test_newer_or_foreign_layout_is_refused(etcd_url: str) -> None:
    url = unique_url(etcd_url)
    prefix = EtcdDriver.from_url(url).prefix.encode() + b"/~meta"
    client = await raw_client(url)
    try:
        await client.put(prefix, str(LAYOUT_VERSION + 1).encode())
        with pytest.raises(fs.SchemaVersionError, match="newer flowstate"):
            await EtcdDriver.from_url(url).open()
        await client.put(prefix, b"1")
        with pytest.raises(fs.SchemaVersionError, match="layout version 1"):
            await EtcdDriver.from_url(url).open()
        await client.put(prefix, b"something else")
        with pytest.raises(fs.DriverError, match="not a flowstate store"):
            await EtcdDriver.from_url(url).open()
    finally:
        await client.close()


def test_cli_reading_never_creates_a_store(
    etcd_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowstate.cli import main

    url = unique_url(etcd_url)
    for command in (["states", url], ["get", url, "a"], ["flows", url]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.startswith("flowstate: error: no flowstate store under the prefix of ")
        assert err.count("\n") == 1
    prefix = EtcdDriver.from_url(url).prefix.encode()
    assert asyncio.run(_raw_keys(url, prefix)) == {}, "nothing was written under the prefix"


# -- commits -----------------------------------------------------------------------------------


async def test_concurrent_commits_share_transactions(etcd_url: str) -> None:
    async with EtcdDriver.from_url(unique_url(etcd_url)) as driver:
        outcomes = await asyncio.gather(
            *(_commit(driver, _write(f"s{i}")) for i in range(40)),
            _commit(driver, _write("twice")),
            _commit(driver, _write("twice")),
            return_exceptions=True,
        )
        revs = [o[0] for o in outcomes if isinstance(o, list)]
        assert len(revs) == 41
        assert len(set(revs)) < 20, "concurrent commits were grouped"
        assert sum(isinstance(o, fs.ConflictError) for o in outcomes[40:]) == 1
        assert [s.rev for s in await all_states(driver)] == sorted(revs)


async def test_conflicts_in_a_group_packed_into_nested_transactions(etcd_url: str) -> None:
    # A small max_txn_ops puts a group's writes into nested Txn ops: the failed compare's
    # reads still name every conflicting state with its revision, and the other commit of
    # the group is written.
    async with EtcdDriver.from_url(unique_url(etcd_url) + "?max_txn_ops=16") as driver:
        ids = [f"s{i}" for i in range(9)]
        revs = {i: (await _commit(driver, _write(i, k="v")))[0] for i in ids}  # all distinct
        stale = [_write(i, 0 if i in ("s3", "s7") else revs[i], k="v") for i in ids[3:]]
        warm, fresh, conflict = await asyncio.gather(
            _commit(driver, _write("warm")),
            _commit(driver, *(_write(i, revs[i], k="v") for i in ids[:3])),
            _commit(driver, *stale),
            return_exceptions=True,
        )
        assert isinstance(conflict, fs.ConflictError), conflict
        assert [(c.state_id, c.expected_rev, c.actual_rev) for c in conflict.conflicts] == [
            ("s3", 0, revs["s3"]),
            ("s7", 0, revs["s7"]),
        ]
        assert isinstance(fresh, list), fresh
        assert len(set(fresh)) == 1
        assert fresh[0] > max(revs.values())
        assert [
            s.id for s in await all_states(driver, labels={"k": "v"}) if s.rev == fresh[0]
        ] == ids[:3]
        assert isinstance(warm, list), warm


async def test_a_read_of_more_ranges_than_max_txn_ops_is_nested(etcd_url: str) -> None:
    # A latest_only query reads each candidate's latest key in one Txn: for 40 states under
    # max_txn_ops=16 the reads go into nested Txn ops, and the answer is the unpacked one's.
    url = unique_url(etcd_url)
    async with EtcdDriver.from_url(url) as driver:
        for i in range(40):
            (rev,) = await _commit(driver, _write(f"s{i:02}", k="v"))
            await _commit(driver, _write(f"s{i:02}", rev, k="v"))
    query = fs.StatesQuery(labels={"k": "v"}, latest_only=True, limit=40)
    async with (
        EtcdDriver.from_url(url) as wide,
        EtcdDriver.from_url(url + "?max_txn_ops=16") as narrow,
    ):
        expected = await wide.get_states(query)
        assert [s.id for s in expected.states] == [f"s{i:02}" for i in range(40)]
        assert await narrow.get_states(query) == expected


async def test_two_drivers_contend_for_the_head(etcd_url: str) -> None:
    url = unique_url(etcd_url)
    async with EtcdDriver.from_url(url) as one, EtcdDriver.from_url(url) as two:
        seen: list[int] = []

        async def writer(driver: EtcdDriver, name: str) -> None:
            rev = 0
            for _ in range(20):
                (rev,) = await _commit(driver, _write(name, rev))
                seen.append(rev)

        waiter = asyncio.ensure_future(one.wait_for_rev(1))
        await asyncio.gather(writer(one, "one"), writer(two, "two"))
        await waiter
        assert len(set(seen)) == 40, "every commit got its own revision"
        history = await all_states(one)
        assert sorted(seen) == [s.rev for s in history]
        times = [s.committed_at for s in history if s.committed_at is not None]
        assert times == sorted(times), "commit times never decrease along revisions"
        assert len(times) == len(history)
        async with asyncio.timeout(10):
            await one.wait_for_rev(max(seen))


class _FaultyTxns:
    """A KV stub that passes every call on to etcd's, except the ``Txn`` faults of a
    subclass: ``faults`` of them, counted down as they happen."""

    def __init__(self, stub: Any, faults: int) -> None:
        self._stub = stub
        self.faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


class _LosesAnswers(_FaultyTxns):
    """``Txn`` calls that write reach etcd, but their answers get lost."""

    async def Txn(self, request: Any, **kwargs: Any) -> Any:
        response = await self._stub.Txn(request, **kwargs)
        if self.faults and request.compare:
            self.faults -= 1
            raise rpc.AioRpcError(rpc.StatusCode.UNAVAILABLE, None, None, details="lost answer")
        return response


async def test_commit_whose_answer_was_lost_is_acknowledged_once(etcd_url: str) -> None:
    async with EtcdDriver.from_url(unique_url(etcd_url)) as driver:
        (first,) = await _commit(driver, _write("s"))
        client = driver._clients[0]
        stub = client.kvstub
        client.kvstub = _LosesAnswers(stub, faults=2)
        try:
            result = await driver.commit(
                CommitRequest(writes=[_write("s", first, step="2"), _write("t")])
            )
        finally:
            client.kvstub = stub
        history = await all_states(driver)
        assert [(s.id, s.rev) for s in history] == [
            ("s", first),
            ("s", result.revs[0]),
            ("t", result.revs[1]),
        ], "applied exactly once, at the revision reported"
        stored = await driver.get_state("s")
        assert stored.labels == {"step": "2"}
        assert stored.committed_at == result.committed_at
        assert await driver.head_rev() == result.revs[0]


class _TimesOut(_FaultyTxns):
    """The first ``Txn`` calls fail the way etcd 3.4 reports a request that ran out of time
    inside the server (right after a restart, say): code UNKNOWN."""

    async def Txn(self, request: Any, **kwargs: Any) -> Any:
        if self.faults:
            self.faults -= 1
            details = "context deadline exceeded"
            raise rpc.AioRpcError(rpc.StatusCode.UNKNOWN, None, None, details=details)
        return await self._stub.Txn(request, **kwargs)


async def test_a_request_that_timed_out_in_the_server_is_retried(etcd_url: str) -> None:
    async with EtcdDriver.from_url(unique_url(etcd_url)) as driver:
        (rev,) = await _commit(driver, _write("s"))
        client = driver._clients[0]
        stub = client.kvstub
        client.kvstub = timing_out = _TimesOut(stub, faults=2)
        try:
            page = await driver.get_states(fs.StatesQuery())
        finally:
            client.kvstub = stub
        assert [state.rev for state in page.states] == [rev]
        assert timing_out.faults == 0, "both failures were retried"


async def test_errors_are_translated_and_chained(etcd_url: str) -> None:
    # A URL limit above the server's own lets the server refuse the request itself.
    url = unique_url(etcd_url) + f"?max_request_bytes={8 << 20}"
    async with EtcdDriver.from_url(url) as driver:
        big = _write("big")
        big.data = {"blob": b"x" * (1 << 21)}
        with pytest.raises(fs.DriverError, match="max_request_bytes=8388608") as info:
            await _commit(driver, big)
        assert not isinstance(info.value, fs.DriverUnavailableError)
        assert isinstance(info.value.__cause__, rpc.AioRpcError)
        too_many = [_write(f"s{i}") for i in range(driver.max_txn_ops)]
        with pytest.raises(fs.DriverError, match="max_txn_ops"):
            await _commit(driver, *too_many)
        assert await driver.head_rev() == 0


def _annotated(state_id: str, size: int) -> StateWrite:
    write = _write(state_id, kind="sized")
    write.state.annotations["blob"] = "x" * size
    return write


async def test_an_oversized_commit_fails_alone(etcd_url: str) -> None:
    async with EtcdDriver.from_url(unique_url(etcd_url)) as driver:
        writes = [_annotated(f"big{i}", 400_000) for i in range(4)]
        writes += [_annotated(f"tiny{i}", 10) for i in range(4)]
        huge = _annotated("huge", 1_000_000)  # written twice (~s and ~log): 2 MB, over 1.5 MiB
        outcomes = await asyncio.gather(
            *(_commit(driver, w) for w in [*writes[:6], huge, *writes[6:]]),
            return_exceptions=True,
        )
        failed = outcomes.pop(6)
        assert isinstance(failed, fs.DriverError)
        assert not isinstance(failed, fs.DriverUnavailableError), "retrying cannot help"
        assert "over etcd's request limit of 1572864 bytes" in str(failed)
        assert "writes about 200" in str(failed), "it names the commit's size"
        assert all(isinstance(o, list) for o in outcomes), outcomes
        stored = await all_states(driver, labels={"kind": "sized"})
        assert sorted(s.id for s in stored) == sorted(w.state.id for w in writes)
        assert len({s.rev for s in stored}) > 2, "the big commits went in several requests"


async def test_groups_split_when_the_server_limit_is_lower(etcd_url: str) -> None:
    # The URL claims a limit the server does not have: its refusals split the groups.
    url = unique_url(etcd_url) + f"?max_request_bytes={8 << 20}"
    async with EtcdDriver.from_url(url) as driver:
        writes = [_annotated(f"big{i}", 400_000) for i in range(4)]
        writes += [_annotated(f"tiny{i}", 10) for i in range(4)]
        outcomes = await asyncio.gather(*(_commit(driver, w) for w in writes))
        assert len(outcomes) == 8
        assert len(await all_states(driver, labels={"kind": "sized"})) == 8


async def test_big_commits_are_packed_into_nested_transactions(etcd_url: str) -> None:
    async with EtcdDriver.from_url(unique_url(etcd_url)) as driver:
        writes = [_write(f"s{i}", a="1", b="2", c="3") for i in range(100)]
        revs = await _commit(driver, *writes)
        assert len(set(revs)) == 1
        assert len(await all_states(driver, labels={"b": "2"})) == 100
        page = await driver.get_states(fs.StatesQuery(labels={"c": "3"}, latest_only=True))
        assert len(page.states) == 100, "a page never splits a revision"


async def test_closed_driver(etcd_url: str) -> None:
    driver = EtcdDriver.from_url(unique_url(etcd_url))
    with pytest.raises(fs.ClosedError):
        await driver.head_rev()
    await driver.open()
    await driver.open()
    waiter = asyncio.ensure_future(driver.wait_for_rev(10**9))
    await asyncio.sleep(0)
    await driver.aclose()
    await driver.aclose()
    with pytest.raises(fs.ClosedError):
        await waiter
    with pytest.raises(fs.ClosedError):
        await driver.open()
    with pytest.raises(fs.ClosedError):
        await driver.get_lease("x")
    assert "closed" in repr(driver)


@pytest.mark.parametrize("commits", [1, 10])
async def test_accepted_commits_are_written_on_close(etcd_url: str, commits: int) -> None:
    url = unique_url(etcd_url)
    driver = EtcdDriver.from_url(url)
    await driver.open()
    tasks = [asyncio.ensure_future(_commit(driver, _write(f"s{i}"))) for i in range(commits)]
    await asyncio.sleep(0)  # every commit is sent or queued
    await driver.aclose()
    revs = [rev for (rev,) in await asyncio.gather(*tasks)]
    async with EtcdDriver.from_url(url) as again:
        assert [s.rev for s in await all_states(again)] == sorted(revs)


async def test_values_flowstate_did_not_write_are_driver_errors(etcd_url: str) -> None:
    url = unique_url(etcd_url)
    async with EtcdDriver.from_url(url) as driver:
        await _commit(driver, _write("s"))
        client = await raw_client(url)
        try:
            await client.put(driver.prefix.encode() + b"/~s/s", b"\xc1 not msgpack")
        finally:
            await client.close()
        with pytest.raises(fs.DriverError, match="cannot read") as info:
            await driver.get_state("s")
        assert not isinstance(info.value.__cause__, fs.FlowstateError)


async def test_delays_committed_together_stay_together(etcd_url: str) -> None:
    at = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)

    def delayed(state_id: str) -> StateWrite:
        write = _write(state_id)
        write.delay_to, write.delay_at = "wake", at
        return write

    url = unique_url(etcd_url)
    async with EtcdDriver.from_url(url) as driver:
        (first,) = await _commit(driver, delayed("a"))
        client = await raw_client(url)
        try:  # another prefix's write leaves a gap in this store's revisions
            await client.put(b"unrelated/" + driver.prefix.encode(), b"x")
        finally:
            await client.close()
        together = await _commit(driver, delayed("b"), delayed("c"), _write("d"))
        assert together[0] > first + 1
        (last,) = await _commit(driver, delayed("e"))
        page = await driver.get_delays(limit=2)
        assert [(d.state.id, d.rev) for d in page.delays] == [
            ("a", first),
            ("b", together[0]),
            ("c", together[0]),
        ]
        assert page.more
        page = await driver.get_delays(since_rev=first + 1, limit=1)
        assert [d.state.id for d in page.delays] == ["b", "c"], "since_rev between revisions"
        assert page.more
        page = await driver.get_delays(since_rev=together[0])
        assert [(d.state.id, d.rev, d.to, d.at) for d in page.delays] == [("e", last, "wake", at)]
        assert not page.more
        assert (await driver.get_delays(limit=0)).more


# -- failures ----------------------------------------------------------------------------------


async def test_unavailable_while_etcd_is_down_then_works_again(own_server: EtcdServer) -> None:
    url = unique_url(own_server.url) + "?timeout=1"
    async with EtcdDriver.from_url(url) as driver:
        (rev,) = await _commit(driver, _write("s"))
        await asyncio.to_thread(own_server.stop)
        try:
            with pytest.raises(fs.DriverUnavailableError) as info:
                await driver.head_rev()
            assert isinstance(info.value.__cause__, rpc.AioRpcError)
            with pytest.raises(fs.DriverUnavailableError):
                await _commit(driver, _write("s", rev))
            with pytest.raises(fs.DriverUnavailableError):
                await driver.get_states(fs.StatesQuery())
            with pytest.raises(fs.DriverUnavailableError):
                await driver.acquire_lease("l", "me", 5)
            with pytest.raises(fs.DriverUnavailableError):
                await EtcdDriver.from_url(url).open()
        finally:
            await asyncio.to_thread(own_server.start)
            await asyncio.to_thread(own_server.wait_ready)
        assert await driver.head_rev() == rev, "the failed commit was not applied"
        (rev2,) = await _commit(driver, _write("s", rev))
        assert rev2 > rev
        assert (await driver.get_state("s")).rev == rev2


async def test_watch_resumes_across_a_server_restart(own_server: EtcdServer) -> None:
    url = unique_url(own_server.url)
    async with EtcdDriver.from_url(url) as driver, fs.Engine(driver) as engine:
        ctx = fs.StateCtx.new("s")
        for to in ("a", "b", "c"):
            await engine.do(fs.Commit(fs.Transit(ctx, to)))
        received: list[tuple[str, str]] = []
        three = asyncio.Event()

        async def consume() -> None:
            async with engine.watch(since_rev=0, limit=2) as watcher:
                async for state in watcher:
                    received.append((state.id, state.transition.to))
                    if len(received) == 3:
                        three.set()
                    if len(received) == 8:
                        return

        consumer = asyncio.ensure_future(consume())
        async with asyncio.timeout(10):
            await three.wait()
        head = await driver.head_rev()
        waiter = asyncio.ensure_future(driver.wait_for_rev(head + 1))
        await asyncio.to_thread(own_server.restart)
        assert not waiter.done()
        async with EtcdDriver.from_url(url) as other, fs.Engine(other) as writer:
            moved = await writer.get_state("s")
            for to in ("d", "e"):
                await writer.do(fs.Commit(fs.Transit(moved, to)))
            for i in range(3):
                await writer.do(fs.Commit(fs.Transit(fs.StateCtx.new(f"n{i}"), "x")))
        async with asyncio.timeout(10):
            await waiter
            await consumer
        assert received == [
            ("s", "a"),
            ("s", "b"),
            ("s", "c"),
            ("s", "d"),
            ("s", "e"),
            ("n0", "x"),
            ("n1", "x"),
            ("n2", "x"),
        ]


async def test_watch_falls_back_to_a_read_after_compaction(
    own_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = unique_url(own_server.url)
    prefix = EtcdDriver.from_url(url).prefix
    async with (
        TcpProxy(own_server.client_port) as proxy,
        EtcdDriver(proxy.endpoint, prefix) as cut_off,
        EtcdDriver.from_url(url) as other,
    ):
        await _commit(other, _write("s"))
        async with asyncio.timeout(10):
            await cut_off.wait_for_rev(await other.head_rev())
        await proxy.cut()
        rev = 0
        for _ in range(3):
            (rev,) = await _commit(other, _write("t", rev))
        client = await raw_client(url)
        try:
            for i in range(3):
                await client.put(b"unrelated/" + prefix.encode(), str(i).encode())
            found = await client.get(b"unrelated/" + prefix.encode())
            await client.compact(found.header.revision)
        finally:
            await client.close()
        waiter = asyncio.ensure_future(cut_off.wait_for_rev(rev))
        await asyncio.sleep(0)
        assert not waiter.done()
        with caplog.at_level(logging.INFO, logger="flowstate.drivers.etcd"):
            await proxy.restore()
            async with asyncio.timeout(10):
                await waiter
        assert any("compacted" in record.getMessage() for record in caplog.records)
        (newer,) = await _commit(other, _write("t", rev))
        async with asyncio.timeout(10):
            await cut_off.wait_for_rev(newer)  # and the watch goes on from there
        assert (await cut_off.get_state("t")).rev == newer


async def test_open_fails_then_succeeds(own_server: EtcdServer) -> None:
    url = unique_url(own_server.url) + "?timeout=1"
    driver = EtcdDriver.from_url(url)
    await asyncio.to_thread(own_server.stop)
    try:
        with pytest.raises(fs.DriverUnavailableError):
            await driver.open()
    finally:
        await asyncio.to_thread(own_server.start)
        await asyncio.to_thread(own_server.wait_ready)
    async with driver:
        assert await driver.head_rev() == 0


async def test_fails_over_to_another_member(cluster: EtcdCluster) -> None:
    url = unique_url(cluster.url) + "?timeout=10"
    first = cluster.members[0]
    async with EtcdDriver.from_url(url) as driver:
        (rev,) = await _commit(driver, _write("s"))
        await asyncio.to_thread(first.stop)
        (rev,) = await _commit(driver, _write("s", rev))
        assert (await driver.get_state("s")).rev == rev
        waiter = asyncio.ensure_future(driver.wait_for_rev(rev + 1))
        # A commit through the other members only: the waiter needs the failed-over watch.
        others = "etcd://" + ",".join(m.endpoint for m in cluster.members[1:]) + "/"
        async with EtcdDriver.from_url(others + driver.prefix) as other:
            (rev,) = await _commit(other, _write("s", rev))
        async with asyncio.timeout(10):
            await waiter
        assert await driver.head_rev() == rev


async def test_no_acknowledged_commit_lost_or_doubled_when_the_leader_dies(
    cluster: EtcdCluster,
) -> None:
    url = unique_url(cluster.url) + "?timeout=10"
    acked: dict[str, list[int]] = {}
    ready = asyncio.Event()
    killed = asyncio.Event()
    workers = 4

    async def worker(engine: fs.Engine, state_id: str) -> None:
        ctx = fs.StateCtx.new(state_id, labels={"group": "kill"}, annotations={"n": "0"})
        await engine.do(fs.Commit(fs.Transit(ctx, "count")))
        acked[state_id] = [0]
        after_kill = 0
        while after_kill < 15:
            ctx.current.annotations["n"] = str(int(ctx.committed.annotations["n"]) + 1)
            try:
                await engine.do(fs.Commit(fs.Transit(ctx, "count")))
            except (fs.DriverUnavailableError, fs.ConflictError):
                while True:  # the outcome is unknown: the stored version tells
                    try:
                        ctx = await engine.get_state(state_id)
                    except fs.DriverUnavailableError:
                        continue
                    break
                continue
            acked[state_id].append(int(ctx.committed.annotations["n"]))
            if len(acked) == workers and all(len(a) >= 10 for a in acked.values()):
                ready.set()
            if killed.is_set():
                after_kill += 1

    async with EtcdDriver.from_url(url) as driver, fs.Engine(driver) as engine:
        tasks = [asyncio.ensure_future(worker(engine, f"w{i}")) for i in range(workers)]
        async with asyncio.timeout(30):
            await ready.wait()
            leader = await asyncio.to_thread(cluster.leader)
            await asyncio.to_thread(leader.stop)
            killed.set()
            await asyncio.gather(*tasks)
        history = await all_states(driver, labels={"group": "kill"})
        for state_id, counts in acked.items():
            mine = [int(s.annotations["n"]) for s in history if s.id == state_id]
            assert mine == list(range(len(mine))), "no version was written twice or skipped"
            assert counts == mine, "every acknowledged commit is stored, and only those"
            assert len(counts) >= 25
