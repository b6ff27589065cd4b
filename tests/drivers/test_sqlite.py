"""The SQLite driver: the conformance suite, the model machine, and what only it promises
(durability across processes and crashes, group commit, schema versioning, indexed queries).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import pytest

import flowstate as fs
from flowstate.drivers import sqlite as sqlite_driver
from flowstate.drivers.base import CommitRequest, CommitResult, StateWrite, SupportsLease
from flowstate.drivers.sqlite import SCHEMA_VERSION, SQLiteDriver
from flowstate.testing.conformance import DriverTests
from flowstate.testing.stateful import run_driver_machine
from tests.drivers.crash import CHILD, all_states, kill_committers_and_check
from tests.drivers.history import fill_history

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import Self


pytestmark_anyio = pytest.mark.anyio


def _write(state_id: str, expected_rev: int = 0, **labels: str) -> StateWrite:
    return StateWrite(state=fs.State(id=state_id, labels=labels), expected_rev=expected_rev)


async def _commit(driver: fs.Driver, *writes: StateWrite) -> list[int]:
    return (await driver.commit(CommitRequest(writes=list(writes)))).revs


def _driver_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flowstate-sqlite")]


class TestSQLiteDriver(DriverTests):
    @pytest.fixture
    async def driver(self, tmp_path: Path) -> AsyncIterator[SQLiteDriver]:
        async with SQLiteDriver(tmp_path / "store.db") as driver:
            yield driver


class TestSQLiteMemoryDriver(DriverTests):
    @pytest.fixture
    async def driver(self) -> AsyncIterator[fs.Driver]:
        async with fs.open_driver("sqlite://:memory:") as driver:
            yield driver


@pytest.mark.slow
def test_sqlite_driver_matches_the_model(tmp_path: Path) -> None:
    counter = itertools.count()
    run_driver_machine(lambda: SQLiteDriver(tmp_path / f"model-{next(counter)}.db"))


# -- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path", "options"),
    [
        ("sqlite:///relative.db", "relative.db", {}),
        ("sqlite:///dir/sub/x.db", "dir/sub/x.db", {}),
        ("sqlite:////abs/path.db", "/abs/path.db", {}),
        ("sqlite://:memory:", ":memory:", {}),
        ("sqlite:///:memory:", ":memory:", {}),
        ("SQLite:///with%20space.db", "with space.db", {}),
        ("sqlite:///x.db?synchronous=full", "x.db", {"synchronous": "full"}),
        ("sqlite:///x.db?synchronous=NORMAL", "x.db", {"synchronous": "normal"}),
        (
            "sqlite:///x.db?poll_interval=0.2&busy_timeout=1",
            "x.db",
            {"poll_interval": 0.2, "busy_timeout": 1.0},
        ),
        ("sqlite:///x.db?create=1", "x.db", {"create": True}),
        ("sqlite:///..%2Fup.db", "../up.db", {"create": False}),
        ("sqlite:////abs%2Fsub.db", "/abs/sub.db", {}),
    ],
)
def test_url(url: str, path: str, options: dict[str, object]) -> None:
    driver = fs.open_driver(url)
    assert isinstance(driver, SQLiteDriver)
    assert driver.path == path
    for name, value in options.items():
        assert getattr(driver, name) == value
    assert driver.is_memory == (path == ":memory:")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite://host/x.db",
        "sqlite:///x.db?synchronous=off",
        "sqlite:///x.db?synchronous",
        "sqlite:///x.db?poll_interval=soon",
        "sqlite:///x.db?poll_interval=0",
        "sqlite:///x.db?busy_timeout=-1",
        "sqlite:///x.db?journal=delete",
        "sqlite:///x.db?create=yes",
        "sqlite:///x%00y.db",
        "sqlite:///\udcff.db",
    ],
)
def test_bad_url(url: str) -> None:
    with pytest.raises(fs.InvalidURLError):
        fs.open_driver(url)


@pytest.mark.parametrize(
    "option",
    [
        "poll_interval=inf",
        "poll_interval=1e300",
        "poll_interval=nan",
        "poll_interval=0.0001",
        "poll_interval=61",
        "busy_timeout=inf",
        "busy_timeout=1e300",
        "busy_timeout=nan",
        "busy_timeout=3601",
    ],
)
def test_numeric_url_options_are_bounded(option: str) -> None:
    # poll_interval=inf used to kill the database thread (queue.get(timeout=inf) overflows).
    name = option.partition("=")[0]
    with pytest.raises(fs.InvalidURLError, match=f"{name} must be a number of seconds from"):
        fs.open_driver(f"sqlite:///x.db?{option}")


@pytest.mark.parametrize("value", ["%D9%A9", "1_0", "%C2%B2"])  # "٩" (nine), "1_0", "²"
def test_numbers_in_url_options_are_ascii_decimals(value: str) -> None:
    with pytest.raises(fs.InvalidURLError, match="must be a number of seconds, not"):
        fs.open_driver(f"sqlite:///x.db?poll_interval={value}")


def test_percent_decoding_keeps_a_relative_path_relative() -> None:
    with pytest.raises(fs.InvalidURLError, match=r"decodes to the absolute path '/tmp/x\.db'"):
        fs.open_driver("sqlite:///%2Ftmp%2Fx.db")


def test_bad_url_names_the_problem() -> None:
    with pytest.raises(fs.InvalidURLError, match="known options: synchronous"):
        SQLiteDriver.from_url("sqlite:///x.db?journal=delete")
    with pytest.raises(fs.InvalidURLError, match="has no host"):
        SQLiteDriver.from_url("sqlite://host/x.db")


# -- schema, durability settings, errors ------------------------------------------------------


@pytestmark_anyio
@pytest.mark.parametrize("slashes", ["/", "//"])
async def test_an_absolute_path_opens_however_many_slashes_it_starts_with(
    tmp_path: Path, slashes: str
) -> None:
    # POSIX allows "//tmp/x.db" for "/tmp/x.db"; SQLite must not read "tmp" as a host.
    url = f"sqlite:///{slashes}{str(tmp_path).lstrip('/')}/x.db"
    async with fs.Engine(url) as engine:
        await engine.do(fs.Commit(fs.End(fs.StateCtx.new("a"))))
    async with fs.Engine(f"sqlite:///{tmp_path}/x.db") as engine:
        assert (await engine.get_state("a")).committed.rev == 1


@pytestmark_anyio
async def test_reopen_keeps_every_version(tmp_path: Path) -> None:
    path = tmp_path / "reopen.db"
    async with SQLiteDriver(path) as driver:
        (r1,) = await _commit(driver, _write("a", kind="x"))
        (r2,) = await _commit(driver, _write("a", r1, kind="y"))
    async with SQLiteDriver(path) as driver:
        assert await driver.head_rev() == r2
        assert [s.labels["kind"] for s in await all_states(driver)] == ["x", "y"]
        (r3,) = await _commit(driver, _write("a", r2))
        assert r3 == r2 + 1


@pytestmark_anyio
async def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    async with SQLiteDriver(path):
        pass
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x464C5354
    finally:
        conn.close()


@pytestmark_anyio
@pytest.mark.parametrize(("setting", "level"), [("normal", 1), ("full", 2)])
async def test_synchronous_setting(tmp_path: Path, setting: str, level: int) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}?synchronous={setting}"
    async with fs.open_driver(url) as driver:
        assert isinstance(driver, SQLiteDriver)
        pragma = await driver._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        assert pragma == level


@pytestmark_anyio
async def test_a_version_1_store_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with SQLiteDriver(path) as driver:
        (r1,) = await _commit(driver, _write("a"))
        await _commit(driver, _write("b"))
        (r2,) = await _commit(driver, _write("a", r1))
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX fs_log_id")  # what version 1 had: no history index
    conn.execute("DROP TABLE fs_latest_labels")  # ... and no index of latest labels
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    async with SQLiteDriver(path) as driver:
        page = await driver.get_states(fs.StatesQuery(id="a"))
        assert [s.rev for s in page.states] == [r1, r2]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT rev FROM fs_log WHERE id = 'a' AND rev > 0"
        ).fetchall()
        assert "fs_log_id" in str(plan)
    finally:
        conn.close()


@pytestmark_anyio
async def test_a_version_2_store_gets_its_latest_labels_index(tmp_path: Path) -> None:
    """Migration 3 indexes the labels of exactly the latest versions, and later commits
    keep that index right."""
    path = tmp_path / "v2.db"
    async with SQLiteDriver(path) as driver:
        (a1,) = await _commit(driver, _write("a", kind="order", step="one"))
        (b1,) = await _commit(driver, _write("b", kind="order"))
        (a2,) = await _commit(driver, _write("a", a1, kind="order", step="two"))
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE fs_latest_labels")  # what version 2 had
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    async with SQLiteDriver(path) as driver:
        rows = await driver._call(
            lambda c: c.execute("SELECT key, value, rev FROM fs_latest_labels").fetchall()
        )
        assert sorted(rows) == sorted(
            [("kind", "order", a2), ("kind", "order", b1), ("step", "two", a2)]
        )
        (a3,) = await _commit(driver, _write("a", a2, kind="invoice"))
        for labels, latest_only, want in [
            ({"kind": "order"}, True, [b1]),
            ({"kind": "invoice"}, True, [a3]),
            ({"step": "two"}, True, []),
            ({"step": "two"}, False, [a2]),
            ({"kind": "order"}, False, [a1, b1, a2]),
        ]:
            page = await driver.get_states(fs.StatesQuery(labels=labels, latest_only=latest_only))
            assert [s.rev for s in page.states] == want, (labels, latest_only)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        rows = conn.execute("SELECT key, value, rev FROM fs_latest_labels").fetchall()
        assert sorted(rows) == [("kind", "invoice", a3), ("kind", "order", b1)]
    finally:
        conn.close()


@pytestmark_anyio
async def test_latest_labels_follow_a_group_commit(tmp_path: Path) -> None:
    """One group may write a state several times: only its last version is indexed as
    latest, and a conflicting commit in the group changes nothing."""
    path = tmp_path / "group.db"
    async with SQLiteDriver(path) as driver:
        (a1,) = await _commit(driver, _write("a", v="1"))
        outcomes = await asyncio.gather(
            _commit(driver, _write("a", a1, v="2")),
            _commit(driver, _write("a", a1 + 1, v="3")),
            _commit(driver, _write("a", a1, v="lost")),
            return_exceptions=True,
        )
        assert isinstance(outcomes[2], fs.ConflictError)
        rows = await driver._call(
            lambda c: c.execute("SELECT key, value, rev FROM fs_latest_labels").fetchall()
        )
        assert rows == [("v", "3", a1 + 2)]


@pytestmark_anyio
async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    async with SQLiteDriver(path) as driver:
        await _commit(driver, _write("a"))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    driver = SQLiteDriver(path)
    with pytest.raises(fs.SchemaVersionError, match="newer flowstate"):
        await driver.open()
    assert not _driver_threads()
    with pytest.raises(fs.ClosedError):
        await driver.head_rev()
    await driver.aclose()


def _listing(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def _untouched(path: Path) -> tuple[bytes, list[str]]:
    """The file's bytes and the names of its siblings (a -wal or -journal would show)."""
    return path.read_bytes(), sorted(p.name for p in path.parent.iterdir())


@pytestmark_anyio
async def test_foreign_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    before = _untouched(path)
    with pytest.raises(fs.DriverError, match="did not create"):
        await SQLiteDriver(path).open()
    # Refused before anything was written: still in its own journal mode, not WAL.
    assert _untouched(path) == before
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


@pytestmark_anyio
async def test_an_existing_empty_file_is_a_store_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(fs.DriverError, match=r"exists but is empty.*\?create=1") as info:
        await fs.open_driver(f"sqlite:///{path}").open()
    assert not isinstance(info.value, fs.DriverUnavailableError)
    assert _untouched(path) == (b"", ["empty.db"])
    async with fs.open_driver(f"sqlite:///{path}?create=1") as driver:
        assert await _commit(driver, _write("a")) == [1]
    async with fs.open_driver(f"sqlite:///{path}") as driver:  # a store now
        assert (await driver.get_state("a")).rev == 1


@pytestmark_anyio
async def test_a_device_is_a_permanent_error() -> None:
    with pytest.raises(fs.DriverError, match="not a regular file") as info:
        await fs.open_driver("sqlite:////dev/null").open()
    assert not isinstance(info.value, fs.DriverUnavailableError)
    assert not _driver_threads()


@pytestmark_anyio
async def test_new_store_files_are_the_owners_alone(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask gives no one else access
    try:
        async with SQLiteDriver(tmp_path / "private.db") as driver:
            await _commit(driver, _write("a"))
            modes = {p.name: p.stat().st_mode & 0o777 for p in _listing(tmp_path)}
    finally:
        os.umask(old_umask)
    assert modes == {"private.db": 0o600, "private.db-wal": 0o600, "private.db-shm": 0o600}
    assert sqlite_driver.FILE_MODE == 0o600


@pytestmark_anyio
async def test_drivers_creating_one_store_at_once_share_it(tmp_path: Path) -> None:
    path = tmp_path / "raced.db"
    drivers = [SQLiteDriver(path) for _ in range(6)]
    try:
        await asyncio.gather(*(d.open() for d in drivers))
        revs = [rev for d in drivers for rev in await _commit(d, _write(f"by-{id(d)}"))]
        assert sorted(revs) == list(range(1, 7))
        assert len(await all_states(drivers[0])) == 6
    finally:
        for driver in drivers:
            await driver.aclose()
    assert [p.name for p in _listing(tmp_path) if not p.name.startswith("raced.db")] == []


@pytestmark_anyio
async def test_a_dead_database_thread_fails_every_call(tmp_path: Path) -> None:
    async with SQLiteDriver(tmp_path / "dies.db") as driver:
        head = await driver.head_rev()
        worker = driver._worker
        assert worker is not None
        # The thread dies of its next idle wait, as it did with ?poll_interval=inf.
        worker._poll_interval = float("inf")
        waiter = asyncio.ensure_future(driver.wait_for_rev(head + 1))
        async with asyncio.timeout(10):
            with pytest.raises(fs.DriverError, match=r"database thread .* stopped") as info:
                await waiter
            assert isinstance(info.value.__cause__, OverflowError)
            with pytest.raises(fs.DriverError, match=r"database thread .* stopped"):
                await _commit(driver, _write("a"))
            with pytest.raises(fs.DriverError, match=r"database thread .* stopped"):
                await driver.get_states(fs.StatesQuery())
            with pytest.raises(fs.DriverError, match=r"database thread .* stopped"):
                await driver.wait_for_rev(head + 1)
    assert not _driver_threads()


@pytestmark_anyio
async def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.close()
    with pytest.raises(fs.DriverError, match="not a flowstate store"):
        await SQLiteDriver(path).open()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 42")
    conn.close()
    with pytest.raises(fs.DriverError, match="application id"):
        await SQLiteDriver(path).open()
    assert not _driver_threads()


@pytestmark_anyio
async def test_sqlite_errors_are_translated_and_chained(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(fs.DriverError) as info:
        await SQLiteDriver(garbage).open()
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    with pytest.raises(fs.DriverError) as info:
        await SQLiteDriver(tmp_path / "no" / "such" / "dir.db").open()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert "no/such/dir.db cannot be opened or created" in str(info.value)
    assert "cannot be opened" in str(info.value)
    assert not _driver_threads()


@pytestmark_anyio
async def test_busy_database_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    async with SQLiteDriver(path, busy_timeout=0.05) as driver:
        (rev,) = await _commit(driver, _write("kept"))
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            results = await asyncio.gather(
                *(driver.commit(CommitRequest(writes=[_write(f"s{i}")])) for i in range(5)),
                return_exceptions=True,
            )
            assert all(isinstance(r, fs.DriverUnavailableError) for r in results)
            assert len({id(r) for r in results}) == 5, "each commit gets its own error"
            for error in results:
                assert isinstance(error, fs.DriverUnavailableError)
                assert isinstance(error.__cause__, sqlite3.OperationalError)
            # Readers are not blocked by a writer in WAL mode.
            assert await driver.head_rev() == rev
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert await _commit(driver, _write("s0")) == [rev + 1]


# -- lifecycle --------------------------------------------------------------------------------


@pytestmark_anyio
async def test_aclose_is_idempotent_and_joins_the_thread(tmp_path: Path) -> None:
    driver = SQLiteDriver(tmp_path / "close.db")
    await driver.open()
    await driver.open()
    assert len(_driver_threads()) == 1
    await _commit(driver, _write("a"))
    await driver.aclose()
    assert not _driver_threads()
    await driver.aclose()
    with pytest.raises(fs.ClosedError):
        await driver.open()
    with pytest.raises(fs.ClosedError):
        await driver.wait_for_rev(1)


@pytestmark_anyio
async def test_closing_ends_waiters_and_writes_accepted_commits(tmp_path: Path) -> None:
    path = tmp_path / "close.db"
    driver = SQLiteDriver(path)
    await driver.open()
    waiter = asyncio.create_task(driver.wait_for_rev(100))
    commits = [asyncio.create_task(_commit(driver, _write(f"s{i}"))) for i in range(3)]
    await asyncio.sleep(0)  # let every task reach its await
    await driver.aclose()
    with pytest.raises(fs.ClosedError):
        await waiter
    assert sorted([r for task in commits for r in await task]) == [1, 2, 3]
    async with SQLiteDriver(path) as reopened:
        assert await reopened.head_rev() == 3


def test_unclosed_driver_warns_and_stops_its_thread(tmp_path: Path) -> None:
    leaked: list[SQLiteDriver] = []

    async def leak() -> None:
        driver = SQLiteDriver(tmp_path / "leak.db")
        await driver.open()
        leaked.append(driver)

    asyncio.run(leak())
    threads = _driver_threads()
    assert len(threads) == 1
    with pytest.warns(ResourceWarning, match="never closed"):
        leaked.clear()
    for thread in threads:
        thread.join(timeout=10)
    assert not _driver_threads()


@pytestmark_anyio
async def test_memory_stores_are_private() -> None:
    async with SQLiteDriver(":memory:") as one, SQLiteDriver(":memory:") as two:
        await _commit(one, _write("a"))
        assert await one.head_rev() == 1
        assert await two.head_rev() == 0


# -- group commit -----------------------------------------------------------------------------


@pytestmark_anyio
async def test_concurrent_commits_share_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[int] = []
    write_group = sqlite_driver._write_group

    def counting(commits: list[Any], conn: sqlite3.Connection) -> Any:
        groups.append(len(commits))
        return write_group(commits, conn)

    monkeypatch.setattr(sqlite_driver, "_write_group", counting)
    async with SQLiteDriver(tmp_path / "group.db") as driver:
        (taken,) = await _commit(driver, _write("taken"))
        groups.clear()
        requests = [CommitRequest(writes=[_write(f"s{i}"), _write(f"t{i}")]) for i in range(40)]
        requests[17] = CommitRequest(writes=[_write("fresh"), _write("taken")])
        results = await asyncio.gather(
            *(driver.commit(r) for r in requests), return_exceptions=True
        )
        assert sum(groups) == 40
        assert len(groups) < 40, f"no commits were grouped: {groups}"
        conflict = results[17]
        assert isinstance(conflict, fs.ConflictError)
        assert conflict.conflicts == [fs.Conflict("taken", 0, taken)]
        revs = [rev for r in results if isinstance(r, CommitResult) for rev in r.revs]
        assert sorted(revs) == list(range(2, 2 + 78))
        for result in results:
            if isinstance(result, CommitResult):
                assert result.revs[1] == result.revs[0] + 1  # one commit: consecutive revs
        with pytest.raises(fs.NotFoundError):
            await driver.get_state("fresh")


@pytestmark_anyio
async def test_concurrent_commits_on_one_state_one_wins(tmp_path: Path) -> None:
    async with SQLiteDriver(tmp_path / "race.db") as driver:
        results = await asyncio.gather(
            *(_commit(driver, _write("s")) for _ in range(10)), return_exceptions=True
        )
        winners = [r for r in results if isinstance(r, list)]
        losers = [r for r in results if isinstance(r, fs.ConflictError)]
        assert len(winners) == 1
        assert len(losers) == 9
        (rev,) = winners[0]
        assert all(e.conflicts == [fs.Conflict("s", 0, rev)] for e in losers)
        assert await driver.head_rev() == rev


@pytestmark_anyio
async def test_commit_cancelled_before_it_was_sent_is_not_written(tmp_path: Path) -> None:
    async with SQLiteDriver(tmp_path / "cancel.db") as driver:
        first = asyncio.create_task(_commit(driver, _write("first")))
        second = asyncio.create_task(_commit(driver, _write("second")))
        # One loop turn: `first` is being written, `second` waits for the next group.
        await asyncio.sleep(0)
        second.cancel()
        assert await first == [1]
        with pytest.raises(asyncio.CancelledError):
            await second
        await _commit(driver, _write("third"))
        assert [s.id for s in await all_states(driver)] == ["first", "third"]


# -- several connections and processes --------------------------------------------------------


@pytestmark_anyio
async def test_two_drivers_on_one_file_conflict_correctly(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SQLiteDriver(path) as one, SQLiteDriver(path) as two:
        (rev,) = await _commit(one, _write("s"))
        with pytest.raises(fs.ConflictError) as info:
            await _commit(two, _write("s"))
        assert info.value.conflicts == [fs.Conflict("s", 0, rev)]
        (rev2,) = await _commit(two, _write("s", rev))
        with pytest.raises(fs.ConflictError):
            await _commit(one, _write("s", rev))
        assert (await one.get_state("s")).rev == rev2


@pytestmark_anyio
async def test_watch_sees_every_revision_from_two_writers(tmp_path: Path) -> None:
    path = tmp_path / "writers.db"
    async with (
        SQLiteDriver(path, poll_interval=0.01) as reader,
        SQLiteDriver(path) as one,
        SQLiteDriver(path) as two,
        fs.Engine(reader) as engine,
    ):
        seen: list[int] = []

        async def watch() -> None:
            async with engine.watch(limit=7) as watcher:
                async for state in watcher:
                    seen.append(state.rev)
                    if len(seen) == 120:
                        return

        async def write(driver: SQLiteDriver, prefix: str) -> None:
            for i in range(30):
                await _commit(driver, _write(f"{prefix}{i}"), _write(f"{prefix}{i}-pair"))

        async with asyncio.timeout(20), asyncio.TaskGroup() as group:
            group.create_task(watch())
            group.create_task(write(one, "a"))
            group.create_task(write(two, "b"))
        assert seen == list(range(1, 121))


@pytestmark_anyio
async def test_wait_for_rev_notices_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "poll.db"
    async with SQLiteDriver(path, poll_interval=0.02) as waiter, SQLiteDriver(path) as writer:
        waiting = asyncio.create_task(waiter.wait_for_rev(1))
        await asyncio.sleep(0)
        assert not waiting.done()
        await _commit(writer, _write("a"))
        async with asyncio.timeout(5):
            await waiting
        assert await waiter.head_rev() == 1


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def _line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        line = await proc.stdout.readline()
    assert line, f"the child process ended early (exit code {await proc.wait()})"
    return line.decode().strip()


@pytest.mark.slow
@pytestmark_anyio
async def test_watch_sees_a_commit_from_another_process(tmp_path: Path) -> None:
    path = tmp_path / "process.db"
    async with (
        SQLiteDriver(path, poll_interval=0.02) as driver,
        fs.Engine(driver) as engine,
        engine.watch() as watcher,
    ):
        waiting = asyncio.create_task(anext(watcher))
        proc = await _spawn("commit", f"sqlite:///{path}", "from-child")
        assert await _line(proc) == "1"
        assert await proc.wait() == 0
        async with asyncio.timeout(5):
            state = await waiting
        assert (state.id, state.rev) == ("from-child", 1)


@pytest.mark.slow
@pytestmark_anyio
async def test_two_processes_never_lose_an_update(tmp_path: Path) -> None:
    path = tmp_path / "counter.db"
    count = 150
    async with SQLiteDriver(path) as driver:
        shared = fs.State(id="shared", annotations={"n": "0"})
        await driver.commit(CommitRequest(writes=[StateWrite(state=shared, expected_rev=0)]))
        proc = await _spawn("increment", f"sqlite:///{path}", str(count))
        try:
            assert await _line(proc) == "ready"
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            done = 0
            while done < count:
                state = await driver.get_state("shared")
                state.annotations["n"] = str(int(state.annotations["n"]) + 1)
                write = StateWrite(state=state, expected_rev=state.rev)
                try:
                    await driver.commit(CommitRequest(writes=[write]))
                except fs.ConflictError:
                    continue
                done += 1
            assert (await _line(proc)).startswith("done")
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        final = await driver.get_state("shared")
        assert final.annotations["n"] == str(2 * count)
        assert len(await all_states(driver)) == 1 + 2 * count


@pytest.mark.slow
def test_killed_process_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    """SIGKILL a committing process at random moments; the file must stay whole."""
    kill_committers_and_check(f"sqlite:///{tmp_path / 'crash.db'}")


# -- leases -----------------------------------------------------------------------------------


@pytestmark_anyio
async def test_leases_are_shared_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lease.db"
    async with SQLiteDriver(path) as one, SQLiteDriver(path) as two:
        assert isinstance(one, SupportsLease)
        lease = await one.acquire_lease("recovery", "one", 30)
        assert lease is not None
        assert await two.acquire_lease("recovery", "two", 30) is None
        assert await two.get_lease("recovery") == lease
        assert await one.renew_lease(lease) == lease
        await one.release_lease(lease)
        assert await one.renew_lease(lease) is None
        taken = await two.acquire_lease("recovery", "two", 0)
        assert taken is not None
        assert taken.token > lease.token
        # ttl 0: the claim is already expired, so another holder may take it at once.
        assert await two.get_lease("recovery") is None
        again = await one.acquire_lease("recovery", "one", 30)
        assert again is not None
        assert again.token > taken.token
        assert await two.renew_lease(taken) is None
        await two.release_lease(taken)  # a lost claim: nothing happens
        assert await one.get_lease("recovery") == again


# -- queries ----------------------------------------------------------------------------------


@pytestmark_anyio
async def test_since_time_honours_microseconds(tmp_path: Path) -> None:
    async with SQLiteDriver(tmp_path / "time.db") as driver:
        result = await driver.commit(CommitRequest(writes=[_write("a")]))
        at = result.committed_at
        page = await driver.get_states(fs.StatesQuery(since_time=at))
        assert [s.id for s in page.states] == ["a"]
        later = at + datetime.timedelta(microseconds=1)
        assert (await driver.get_states(fs.StatesQuery(since_time=later))).states == []
        other_zone = at.astimezone(datetime.timezone(datetime.timedelta(hours=5)))
        assert len((await driver.get_states(fs.StatesQuery(since_time=other_zone))).states) == 1


@pytestmark_anyio
async def test_selective_label_among_many(tmp_path: Path) -> None:
    """An AND-map is driven by its rarest pair, whichever order it is written in."""
    async with SQLiteDriver(tmp_path / "labels.db") as driver:
        for batch in range(20):
            writes = [
                StateWrite(
                    state=fs.State(
                        id=f"s{batch}-{i}",
                        labels={"kind": "order", **({"rare": "yes"} if i == 7 else {})},
                    ),
                    expected_rev=0,
                )
                for i in range(50)
            ]
            await driver.commit(CommitRequest(writes=writes))
        for labels in ({"kind": "order", "rare": "yes"}, {"rare": "yes", "kind": "order"}):
            page = await driver.get_states(fs.StatesQuery(labels=labels, limit=5))
            assert [s.id for s in page.states] == [f"s{b}-7" for b in range(5)]
            assert page.more


class _RecordingCursor(sqlite3.Cursor):
    statements: ClassVar[list[tuple[str, tuple[Any, ...]]]] = []

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        self.statements.append((sql, tuple(parameters)))
        return super().execute(sql, parameters)


class _RecordingConnection(sqlite3.Connection):
    def cursor(self, factory: Any = _RecordingCursor) -> Any:
        return super().cursor(factory)


_ALLOWED_SCANS = ("SCAN m", "SCAN (subquery", "SCAN CONSTANT ROW")


def _plan(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[str]:
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


async def _fill(path: Path, versions: int, start: int = 0) -> None:
    async with SQLiteDriver(path) as driver:
        for batch in range(start, start + versions // 100):
            writes = [
                StateWrite(
                    state=fs.State(
                        id=f"s{batch}-{i}",
                        labels={"kind": "order", **({"rare": "yes"} if i == 50 else {})},
                    ),
                    expected_rev=0,
                    data={"blob": b"x"} if i == 0 else None,
                    delay_to="later" if i == 1 else "",
                    delay_at=datetime.datetime.now(datetime.UTC) if i == 1 else None,
                )
                for i in range(100)
            ]
            await driver.commit(CommitRequest(writes=writes))


_QUERIES = [
    fs.StatesQuery(limit=5),
    fs.StatesQuery(limit=5, latest_only=True),
    fs.StatesQuery(limit=5, since_latest=True),
    fs.StatesQuery(limit=5, since_latest=True, latest_only=True),
    fs.StatesQuery(limit=5, labels={"rare": "yes"}),
    fs.StatesQuery(limit=5, labels={"kind": "order", "rare": "yes"}),
    fs.StatesQuery(limit=5, labels=[{"rare": "yes"}, {"kind": "order"}], latest_only=True),
    fs.StatesQuery(limit=5, labels={"kind": "order", "rare": "yes"}, latest_only=True),
    fs.StatesQuery(limit=5, labels={"kind": "order"}, since_latest=True),
    fs.StatesQuery(limit=5, since_time=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)),
]


def _read_page(path: Path, query: fs.StatesQuery) -> tuple[fs.StatesPage, int]:
    """Run one page read on a recording connection; return it and its VM step count."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn = sqlite3.connect(path, isolation_level=None, factory=_RecordingConnection)
    try:
        conn.set_progress_handler(count, 1)
        decode = msgspec.msgpack.Decoder(fs.State).decode
        page = sqlite_driver._read_page(decode, query, conn)
    finally:
        conn.close()
    return page, steps


@pytestmark_anyio
async def test_every_statement_uses_an_index(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    await _fill(path, 1000)
    _RecordingCursor.statements = []
    for query in _QUERIES:
        _read_page(path, query)
    recorded = [s for s in _RecordingCursor.statements if s[0].startswith("SELECT")]
    fixed = [
        (value, (1,) * value.count("?"))
        for name, value in vars(sqlite_driver).items()
        if name.startswith("_SQL_") and value.startswith(("SELECT", "UPDATE"))
    ]
    assert len(recorded) > len(_QUERIES)
    conn = sqlite3.connect(path)
    try:
        for sql, params in recorded + fixed:
            plan = _plan(conn, sql, params)
            scans = [
                step
                for step in plan
                if step.startswith("SCAN") and not step.startswith(_ALLOWED_SCANS)
            ]
            assert not scans, f"{sql!r} scans a table: {plan}"
    finally:
        conn.close()


@pytestmark_anyio
async def test_page_cost_does_not_grow_with_history(tmp_path: Path) -> None:
    path = tmp_path / "cost.db"
    await _fill(path, 2000)
    before = {}
    for query in _QUERIES:
        page, steps = _read_page(path, query)
        assert page.states
        before[repr(query)] = steps
    await _fill(path, 4000, start=20)
    for query in _QUERIES:
        _, steps = _read_page(path, query)
        # The history tripled; a page's cost stays flat (a little slack for deeper B-trees).
        assert steps < before[repr(query)] * 1.3 + 500, (query, before[repr(query)], steps)


async def _fill_history(path: Path, states: int, versions: int) -> None:
    async with SQLiteDriver(path) as driver:
        await fill_history(driver, states, versions)


_HISTORY_QUERIES = [
    fs.StatesQuery(limit=20, labels={"kind": "order"}, latest_only=True),
    fs.StatesQuery(limit=20, labels={"kind": "order", "rare": "yes"}, latest_only=True),
    fs.StatesQuery(limit=20, labels={"kind": "order"}, latest_only=True, since_latest=True),
    # Both pairs have far more postings than the probe reads: it must still walk the rare one.
    fs.StatesQuery(limit=20, labels={"kind": "order", "rare": "yes"}),
    fs.StatesQuery(limit=20, labels={"rare": "yes", "kind": "order"}),
]


@pytest.mark.slow
@pytestmark_anyio
async def test_latest_and_and_queries_do_not_grow_with_history(tmp_path: Path) -> None:
    """A latest-only label page reads only latest versions, and an AND-map walks its sparse
    pair even when every pair has more postings than the probe reads."""
    path = tmp_path / "history.db"
    # 12,000 versions: both pairs have more postings (12,000 and 1,200) than the probe reads.
    await _fill_history(path, 200, 60)
    before = {}
    for query in _HISTORY_QUERIES:
        page, steps = _read_page(path, query)
        assert page.states
        before[repr(query)] = steps
    await _fill_history(path, 200, 180)  # four times the history, the same 200 states
    for query in _HISTORY_QUERIES:
        page, steps = _read_page(path, query)
        if query.latest_only and not query.since_latest:
            assert all(s.rev > 200 * 239 for s in page.states), "only latest versions"
        assert steps < before[repr(query)] * 1.3 + 500, (query, before[repr(query)], steps)


@pytestmark_anyio
async def test_since_time_matches_a_scan(tmp_path: Path) -> None:
    """The binary search over revisions agrees with filtering every version by time."""
    async with SQLiteDriver(tmp_path / "times.db") as driver:
        for i in range(40):
            await _commit(driver, *(_write(f"s{i}-{j}") for j in range(i % 4 + 1)))
        states = await all_states(driver)
        moments = sorted({s.committed_at for s in states if s.committed_at is not None})
        micro = datetime.timedelta(microseconds=1)
        probes = [moments[0] - micro, *moments, *(m + micro for m in moments), moments[-1] + micro]
        for probe in probes:
            page = await driver.get_states(fs.StatesQuery(since_time=probe, limit=1000))
            want = [s.rev for s in states if s.committed_at is not None and s.committed_at >= probe]
            assert [s.rev for s in page.states] == want, probe
