"""The remote driver through real ``flowstate serve`` processes: the conformance suite, the model
machine, URLs, and how server-side failures come back as flowstate errors."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate.drivers.base import CommitRequest, DelaysPage, StateWrite
from flowstate.drivers.http import HTTPDriver
from flowstate.testing.conformance import DriverTests
from flowstate.testing.stateful import run_driver_machine
from tests.serve_process import ServeProcess, ServerPool
from tests.test_bad_input import CALLS, Call
from tests.test_bad_input import _run as run_calls

pytestmark_anyio = pytest.mark.anyio


@pytest.fixture
def server(serve_pool: ServerPool) -> Iterator[ServeProcess]:
    """A server of its own on an empty SQLite store."""
    server = serve_pool.take()
    try:
        yield server
    finally:
        server.close()


class TestHTTPDriver(DriverTests):
    @pytest.fixture
    async def driver(self, server: ServeProcess) -> AsyncIterator[HTTPDriver]:
        async with HTTPDriver(server.url) as driver:
            yield driver


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_http_driver_matches_the_model(serve_pool: ServerPool) -> None:
    # Every example needs an empty store, so a server process of its own: 20 examples keep
    # this affordable; the machine's 100 run on every driver that stores in-process.
    servers: list[ServeProcess] = []

    def fresh_driver() -> HTTPDriver:
        for done in servers:
            done.close()
        servers[:] = [serve_pool.take()]
        return HTTPDriver(servers[0].url)

    try:
        run_driver_machine(
            fresh_driver,
            settings_=settings(max_examples=20, stateful_step_count=30, deadline=None),
        )
    finally:
        for server in servers:
            server.close()


# -- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base", "options"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080", {}),
        ("HTTP://example.org:80/", "http://example.org:80", {}),
        ("http://host/flowstate/", "http://host/flowstate", {}),
        ("https://[::1]:8443/base?timeout=2.5", "https://[::1]:8443/base", {"timeout": 2.5}),
        ("https://host?ca=/etc/ca.pem", "https://host", {"ca": "/etc/ca.pem"}),
    ],
)
def test_url(url: str, base: str, options: dict[str, object]) -> None:
    driver = fs.open_driver(url)
    assert isinstance(driver, HTTPDriver)
    assert driver.url == base
    for name, value in options.items():
        assert getattr(driver, name) == value


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://", "expected http://host:port"),
        ("http://user:secret@host:1", "not in the URL"),
        ("http://host:1?timeout=0", "timeout must be a number of seconds from 0.001 to 3600"),
        ("http://host:1?timeout=inf", "from 0.001 to 3600"),
        ("http://host:1?timeout=nan", "from 0.001 to 3600"),
        ("http://host:1?timeout=soon", "timeout must be a number"),
        ("http://host:1?timeout=%D9%A9", "timeout must be a number"),
        ("http://host:1/\udc80", "not valid Unicode text"),
        ("http://host:1?ca=/x.pem", "unknown option 'ca'"),
        ("https://host:1?nope=1", "known options: timeout, ca"),
        ("http://host:99999", "out of range"),
        ("http://host:1#top", "no fragment"),
        ("http://host:1/\x00", "non-printable"),
    ],
)
def test_bad_url(url: str, problem: str) -> None:
    with pytest.raises(fs.InvalidURLError, match=problem) as info:
        fs.open_driver(url)
    assert "secret" not in str(info.value)


def test_the_token_comes_from_the_environment_and_stays_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWSTATE_TOKEN", "s3cret-token")
    driver = fs.open_driver("http://127.0.0.1:1")
    assert "s3cret" not in repr(driver)
    assert "token=set" in repr(driver)
    monkeypatch.delenv("FLOWSTATE_TOKEN")
    assert "token=none" in repr(fs.open_driver("http://127.0.0.1:1"))


# -- failures ---------------------------------------------------------------------------------


@pytestmark_anyio
async def test_no_server_is_unavailable(tmp_path: Path) -> None:
    driver = HTTPDriver("http://127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(fs.DriverUnavailableError, match="cannot reach") as info:
        await driver.open()
    assert isinstance(info.value.__cause__, httpx.TransportError), "the cause is chained"
    with pytest.raises(fs.ClosedError):
        await driver.get_state("s")
    await driver.aclose()


@pytestmark_anyio
async def test_a_killed_server_is_unavailable_and_nothing_leaks(server: ServeProcess) -> None:
    async with HTTPDriver(server.url) as driver:
        write = StateWrite(state=fs.State(id="s"), expected_rev=0)
        (rev,) = (await driver.commit(CommitRequest(writes=[write]))).revs
        server.close()  # SIGKILL: connections drop, new ones are refused
        calls = [
            driver.get_state("s"),
            driver.head_rev(),
            driver.get_states(fs.StatesQuery()),
            driver.commit(
                CommitRequest(writes=[StateWrite(state=fs.State(id="s"), expected_rev=rev)])
            ),
            driver.wait_for_rev(rev + 1),
            driver.get_data("s", "x"),
            driver.get_delays(),
            driver.acquire_lease("l", "me", 5),
        ]
        for call in calls:
            with pytest.raises(fs.DriverUnavailableError):
                await call


@pytestmark_anyio
async def test_errors_come_back_as_flowstate_errors(server: ServeProcess) -> None:
    async with HTTPDriver(server.url) as driver:
        with pytest.raises(fs.NotFoundError, match="'missing'"):
            await driver.get_state("missing")
        with pytest.raises(fs.NotFoundError):
            await driver.get_data("missing", "alias")
        write = StateWrite(state=fs.State(id="a"), expected_rev=0)
        (rev,) = (await driver.commit(CommitRequest(writes=[write]))).revs
        stale = [
            StateWrite(state=fs.State(id="a"), expected_rev=0),
            StateWrite(state=fs.State(id="b"), expected_rev=7),
        ]
        with pytest.raises(fs.ConflictError) as info:
            await driver.commit(CommitRequest(writes=stale))
        assert info.value.conflicts == [fs.Conflict("a", 0, rev), fs.Conflict("b", 7, 0)]


@pytestmark_anyio
async def test_a_commit_over_the_body_limit_is_refused_whole(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/big.db"
    with ServeProcess(url, "--max-body-size", "4096") as server:
        async with HTTPDriver(server.url) as driver:
            assert driver.max_body_size == 4096
            write = StateWrite(state=fs.State(id="big"), expected_rev=0, data={"d": b"x" * 8000})
            with pytest.raises(fs.InvalidCommandError, match="--max-body-size"):
                await driver.commit(CommitRequest(writes=[write]))
            assert await driver.head_rev() == 0


@pytestmark_anyio
async def test_a_query_over_the_body_limit_is_an_invalid_query(tmp_path: Path) -> None:
    # A valid query (64 label sets, the most one may OR) whose JSON is over 4 KiB.
    query = fs.StatesQuery(labels=[{"kind": f"{n:03d}" + "k" * 100} for n in range(64)])
    with ServeProcess(f"sqlite:///{tmp_path}/store.db", "--max-body-size", "4096") as server:
        async with HTTPDriver(server.url) as driver:
            with pytest.raises(fs.InvalidQueryError, match=r"the query is \d+ bytes encoded"):
                await driver.get_states(query)
            # A driver that does not know the limit yet sends the query; the server's 413
            # is the same error.
            driver.max_body_size = 0
            with pytest.raises(fs.InvalidQueryError, match="query is larger than the server"):
                await driver.get_states(query)
            assert (await driver.get_states(fs.StatesQuery(labels={"kind": "x"}))).states == []


@pytestmark_anyio
async def test_delays_with_limit_0_say_whether_there_are_any(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    with ServeProcess(url) as server:
        async with HTTPDriver(server.url) as remote:
            at = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
            write = StateWrite(state=fs.State(id="d"), expected_rev=0, delay_to="w", delay_at=at)
            (rev,) = (await remote.commit(CommitRequest(writes=[write]))).revs
            answers = [await remote.get_delays(since, 0) for since in (0, rev)]
    async with fs.open_driver(url) as local:
        assert answers == [await local.get_delays(since, 0) for since in (0, rev)]
    assert answers == [DelaysPage(delays=[], more=True), DelaysPage(delays=[], more=False)]


@pytestmark_anyio
async def test_concurrent_commits_share_requests_and_keep_their_own_outcomes(
    server: ServeProcess,
) -> None:
    async with HTTPDriver(server.url) as driver:
        writes = [StateWrite(state=fs.State(id=f"s{i}"), expected_rev=0) for i in range(40)]
        writes.append(StateWrite(state=fs.State(id="s3"), expected_rev=0))  # s3 twice: one loses
        outcomes = await asyncio.gather(
            *(driver.commit(CommitRequest(writes=[w])) for w in writes), return_exceptions=True
        )
        conflicts = [o for o in outcomes if isinstance(o, fs.ConflictError)]
        assert len(conflicts) == 1
        assert conflicts[0].ids == ["s3"]
        revs = sorted(o.revs[0] for o in outcomes if not isinstance(o, BaseException))
        assert revs == list(range(1, 41))
        assert await driver.head_rev() == 40


@pytestmark_anyio
async def test_ids_with_any_character_round_trip(server: ServeProcess) -> None:
    ids = ["a/b", "a/b/history", "..", ".", "%2F", "ü ñ?#&=+", "with space", "x%"]
    async with HTTPDriver(server.url) as driver, fs.Engine(driver) as engine:
        for state_id in ids:
            ctx = fs.StateCtx.new(state_id)
            ctx.data["a/b?"] = fs.Data(blob=state_id.encode())
            await engine.do(fs.Commit(fs.Transit(ctx, "x"), fs.StoreData(ctx, "a/b?")))
        for state_id in ids:
            got = await engine.get_state(state_id)
            assert got.id == state_id
            await engine.do(fs.GetData(got, "a/b?"))
            assert got.data["a/b?"].blob == state_id.encode()
        lease = await driver.acquire_lease("name/with?odd#chars", "me", 30)
        assert lease is not None
        assert await driver.get_lease("name/with?odd#chars") == lease


@pytestmark_anyio
async def test_an_id_too_long_for_a_url_is_a_driver_error(server: ServeProcess) -> None:
    # A commit carries the id in its body; a read by id puts it in the URL, which httpx
    # caps at 64 KiB.
    long_id = "L" * 70_000
    async with HTTPDriver(server.url) as driver:
        write = StateWrite(state=fs.State(id=long_id), expected_rev=0)
        await driver.commit(CommitRequest(writes=[write]))
        with pytest.raises(fs.DriverError, match="URL too long"):
            await driver.get_state(long_id)
        with pytest.raises(fs.DriverError, match="URL too long"):
            await driver.get_lease(long_id)


@pytest.mark.slow
@pytest.mark.timeout(300)
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=st.lists(CALLS, min_size=1, max_size=5))
@pytestmark_anyio
async def test_only_flowstate_errors_escape_through_the_server(
    serve_pool: ServerPool, calls: list[Call]
) -> None:
    """The bad-input test of tests/test_bad_input.py, with the store behind a server: odd
    text, huge numbers and stray types come back as flowstate errors, never as httpx's or a
    500. Fewer examples than there, since each one needs a server of its own."""
    server = await asyncio.to_thread(serve_pool.take)
    try:
        async with fs.Engine(server.url) as engine:
            await run_calls(engine, calls)
    finally:
        await asyncio.to_thread(server.close)
