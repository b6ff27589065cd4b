"""The PostgreSQL driver against a real server: the conformance suite, the model machine, and
what only it promises (a store per schema, dense revisions that become visible in order, group
commit, LISTEN/NOTIFY wake-ups that survive dropped connections and restarts, passwords that
never show, acknowledged commits that survive killed processes).

Most tests share the session's server (``postgres_url``), each in a fresh schema. Tests that
break the server on purpose, or need a role with a password, start a cluster of their own.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from asyncpg import connect_utils
from hypothesis import settings

import flowstate as fs
from flowstate.cli import main
from flowstate.drivers import postgres as postgres_driver
from flowstate.drivers.base import (
    CommitRequest,
    CommitResult,
    Lease,
    StateWrite,
    SupportsLease,
)
from flowstate.drivers.memory import MemoryDriver
from flowstate.drivers.postgres import MAX_INDEXED_BYTES, SCHEMA_VERSION, PostgresDriver
from flowstate.testing.conformance import DriverTests
from flowstate.testing.stateful import run_driver_machine
from tests import postgres_server
from tests.drivers.crash import CHILD, all_states, kill_committers_and_check
from tests.drivers.history import fill_history
from tests.postgres_server import PostgresServer, postgres_url, unique_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

__all__ = ["postgres_url"]

PASSWORD_ROLE = "fs_secret_user"
PASSWORD = "s3cret-Pa55word"

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


class TestPostgresDriver(DriverTests):
    @pytest.fixture
    async def driver(self, postgres_url: str) -> AsyncIterator[PostgresDriver]:
        async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
            yield driver


@pytest.mark.slow
def test_postgres_driver_matches_the_model(postgres_url: str) -> None:
    run_driver_machine(
        lambda: PostgresDriver.from_url(unique_url(postgres_url)),
        settings_=settings(max_examples=40, stateful_step_count=30, deadline=None),
    )


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A cluster of this module's own, for the tests that stop or restart it, with a role
    that must give a password."""
    server = PostgresServer(hba=[f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256"])
    with server:
        asyncio.run(_create_password_role(server.url))
        yield server


async def _create_password_role(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'")
        await conn.execute(f"GRANT CREATE ON DATABASE postgres TO {PASSWORD_ROLE}")
    finally:
        await conn.close()


def _write(state_id: str, expected_rev: int = 0, **labels: str) -> StateWrite:
    state = fs.State(id=state_id, labels=labels, transition=fs.Transition(to="a"))
    return StateWrite(state=state, expected_rev=expected_rev)


async def _commit(driver: fs.Driver, *writes: StateWrite) -> list[int]:
    return (await driver.commit(CommitRequest(writes=list(writes)))).revs


async def _sql(url: str, sql: str, *args: Any) -> list[Any]:
    """Rows of one statement run past the driver, on the database of a flowstate URL."""
    driver = PostgresDriver.from_url(url)
    conn = await asyncpg.connect(driver._dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def _schema(url: str) -> str:
    return PostgresDriver.from_url(url).schema


def test_missing_server_binaries_fail_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(postgres_server, "DEBIAN_ROOT", tmp_path / "none")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        postgres_server.postgres_bindir()


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "dsn", "options"),
    [
        ("postgresql://u@h:5433/db", "postgresql://u@h:5433/db", {"schema": "flowstate"}),
        ("postgres://u@h/db?schema=orders", "postgresql://u@h/db", {"schema": "orders"}),
        ("POSTGRESQL://h1:1,h2:2/db", "postgresql://h1:1,h2:2/db", {}),
        (
            "postgresql://u@[::1]:5432/db?sslmode=require&schema=a%20b&application_name=x",
            "postgresql://u@[::1]:5432/db?sslmode=require&application_name=x",
            {"schema": "a b"},
        ),
        (
            "postgresql://h/db?timeout=2.5&pool_size=3&connect_timeout=1",
            "postgresql://h/db",
            {"timeout": 2.5, "pool_size": 3, "connect_timeout": 1.0},
        ),
        ("postgresql://h/db?timeout=4", "postgresql://h/db", {"connect_timeout": 4.0}),
    ],
)
def test_url(url: str, dsn: str, options: dict[str, object]) -> None:
    driver = fs.open_driver(url)
    assert isinstance(driver, PostgresDriver)
    assert driver._dsn == dsn
    for name, value in options.items():
        assert getattr(driver, name) == value
    again = PostgresDriver.from_url(driver.url)
    assert (again._dsn, again.schema) == (driver._dsn, driver.schema)
    assert "unopened" in repr(driver)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://h/db?schema=", "schema name is empty"),
        (f"postgresql://h/db?schema={'x' * 64}", "at most 63 bytes"),
        ("postgresql://h/db?schema=a%00b", "NUL"),
        ("postgresql://h/db?timeout=soon", "number of seconds"),
        ("postgresql://h/db?timeout=0", "timeout must be"),
        ("postgresql://h/db?connect_timeout=-1", "connect_timeout must be"),
        ("postgresql://h/db?pool_size=0", "pool_size must be"),
        ("postgresql://h/db?pool_size=two", "pool_size must be"),
        ("postgresql://h/db?pool_size=%C2%B2", "pool_size must be"),  # "²", a digit to isdigit()
        ("postgresql://h/db?pool_size=1001", "pool_size must be an int from 1 to 1000"),
        ("postgresql://h/db?pool_size=99999999999999999999", "pool_size must be"),
        ("postgresql://h/db?timeout=inf", "timeout must be"),
        ("postgresql://h/db?timeout=1_0", "number of seconds"),
        ("postgresql://h/db?timeout=nan", "timeout must be"),
        ("postgresql://h/db?connect_timeout=3601", "at most 3600"),
        ("postgresql://h:port/db", "must be a number"),
        ("postgresql://h:99999/db", "from 1 to 65535"),
        ("postgresql://h:0/db", "from 1 to 65535"),
        ("postgresql://a:5432,b:70000/db", "'b:70000' must be a number from 1 to 65535"),
        ("postgresql://h/db?sslmode=bogus", "sslmode must be one of disable, allow"),
        ("postgresql://h/db?sslmode=", "sslmode must be one of"),
        ("postgresql://h/db?schema", "malformed"),
        ("postgresql://h/db#frag", "fragment"),
        ("mysql://h/db", "not a postgresql:// URL"),
    ],
)
def test_bad_url(url: str, problem: str) -> None:
    with pytest.raises(fs.InvalidURLError, match=problem):
        PostgresDriver.from_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:hunter2@db.internal:5432/orders?schema=s",
        "postgresql://app@db.internal/orders?password=hunter2",
        "postgresql://app:hunter2@db.internal/orders?timeout=soon",
    ],
)
def test_a_password_in_the_url_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(fs.InvalidURLError) as info:
        fs.open_driver(url)
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)
    with pytest.raises(fs.InvalidURLError, match="PGPASSWORD"):
        PostgresDriver(url.partition("?")[0] + "?password=hunter2")


def test_an_ssl_key_password_never_shows() -> None:
    driver = fs.open_driver("postgresql://app@db/orders?sslpassword=hunter2&sslmode=require")
    assert isinstance(driver, PostgresDriver)
    assert "hunter2" not in repr(driver)
    assert "sslpassword=***" in driver.url
    assert "sslpassword=hunter2" in driver._dsn, "it still reaches asyncpg"


@pytest.mark.slow
async def test_password_from_the_environment_or_a_pgpass_file(
    own_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = unique_url(f"postgresql://{PASSWORD_ROLE}@127.0.0.1:{own_server.port}/postgres")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "missing"))
    with pytest.raises(fs.DriverError) as info:
        await PostgresDriver.from_url(url + "&timeout=2").open()
    assert not isinstance(info.value, fs.DriverUnavailableError), "a retry would not help"
    assert isinstance(info.value.__cause__, asyncpg.PostgresError)

    monkeypatch.setenv("PGPASSWORD", "wrong-password")
    with pytest.raises(fs.DriverError) as info:
        await PostgresDriver.from_url(url).open()
    assert "password authentication failed" in str(info.value)
    assert "wrong-password" not in str(info.value)

    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    async with PostgresDriver.from_url(url) as driver:
        (rev,) = await _commit(driver, _write("a"))
        assert PASSWORD not in repr(driver)

    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{own_server.port}:postgres:{PASSWORD_ROLE}:{PASSWORD}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    async with PostgresDriver.from_url(url) as driver:
        assert await driver.head_rev() == rev


# -- schema ------------------------------------------------------------------------------------


async def test_each_store_lives_in_its_own_schema(postgres_url: str) -> None:
    one, two = unique_url(postgres_url), unique_url(postgres_url)
    async with PostgresDriver.from_url(one) as a, PostgresDriver.from_url(two) as b:
        await _commit(a, _write("x"))
        await _commit(a, _write("y"))
        await _commit(b, _write("z"))
        assert [s.id for s in await all_states(a)] == ["x", "y"]
        assert [s.id for s in await all_states(b)] == ["z"]
    tables = await _sql(
        one,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
        _schema(one),
    )
    assert [row[0] for row in tables] == [
        "fs_data",
        "fs_delays",
        "fs_head",
        "fs_labels",
        "fs_latest",
        "fs_latest_labels",
        "fs_leases",
        "fs_log",
        "fs_meta",
    ]
    schema = _quote(_schema(one))
    (version,) = await _sql(one, f"SELECT value FROM {schema}.fs_meta")
    assert version[0] == str(SCHEMA_VERSION)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def test_many_drivers_create_a_new_schema_once(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    drivers = [PostgresDriver.from_url(url) for _ in range(6)]
    try:
        await asyncio.gather(*(d.open() for d in drivers))
        revs = await asyncio.gather(*(_commit(d, _write(f"s{i}")) for i, d in enumerate(drivers)))
        assert sorted(rev for (rev,) in revs) == [1, 2, 3, 4, 5, 6]
    finally:
        for driver in drivers:
            await driver.aclose()


async def test_newer_or_foreign_schema_is_refused(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url):
        pass
    schema = _quote(_schema(url))
    await _sql(url, f"UPDATE {schema}.fs_meta SET value = $1", str(SCHEMA_VERSION + 1))
    with pytest.raises(fs.SchemaVersionError, match="newer flowstate"):
        await PostgresDriver.from_url(url).open()
    await _sql(url, f"UPDATE {schema}.fs_meta SET value = 'something else'")
    with pytest.raises(fs.DriverError, match="not a flowstate store"):
        await PostgresDriver.from_url(url).open()

    foreign = unique_url(postgres_url)
    schema = _quote(_schema(foreign))
    await _sql(foreign, f"CREATE SCHEMA {schema}")
    await _sql(foreign, f"CREATE TABLE {schema}.orders (id int)")
    with pytest.raises(fs.DriverError, match="did not create"):
        await PostgresDriver.from_url(foreign).open()
    (count,) = await _sql(
        foreign, "SELECT count(*) FROM pg_tables WHERE schemaname = $1", _schema(foreign)
    )
    assert count[0] == 1, "nothing was created next to the foreign table"


async def _make_version_1(url: str) -> None:
    """Turn the store at ``url`` into what version 1 wrote: no ``fs_latest_labels``, and a
    commit function that knows nothing of it."""
    schema = _quote(_schema(url))
    ((definition,),) = await _sql(
        url, "SELECT pg_get_functiondef($1::regproc)", f"{schema}.fs_commit"
    )
    version_1, found = re.subn(
        r"\), drop_latest_labels AS \(.*?\), put_data AS",
        "), put_data AS",
        definition,
        flags=re.DOTALL,
    )
    assert found == 1
    assert "fs_latest_labels" not in version_1
    await _sql(url, f"DROP TABLE {schema}.fs_latest_labels")
    await _sql(url, version_1)
    await _sql(url, f"UPDATE {schema}.fs_meta SET value = '1' WHERE key = 'schema_version'")


async def _latest_labels(url: str) -> list[tuple[str, str, int]]:
    schema = _quote(_schema(url))
    rows = await _sql(url, f"SELECT key, value, rev FROM {schema}.fs_latest_labels ORDER BY 3, 1")
    return [tuple(row) for row in rows]


async def _latest_labels_wanted(url: str) -> list[tuple[str, str, int]]:
    """What ``fs_latest_labels`` must hold: the label rows of the latest versions."""
    schema = _quote(_schema(url))
    rows = await _sql(
        url,
        f"SELECT l.key, l.value, l.rev FROM {schema}.fs_labels l "
        f"JOIN {schema}.fs_latest x ON x.rev = l.rev ORDER BY 3, 1",
    )
    return [tuple(row) for row in rows]


async def test_a_version_1_store_is_migrated_on_open(postgres_url: str) -> None:
    """Migration 2 indexes the labels of exactly the latest versions, and replaces the commit
    function with one that keeps that index right."""
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        (a1,) = await _commit(driver, _write("a", kind="order", step="one"))
        (b1,) = await _commit(driver, _write("b", kind="order"))
        (a2,) = await _commit(driver, _write("a", a1, kind="order", step="two"))
    await _make_version_1(url)
    async with PostgresDriver.from_url(url) as driver:
        assert await _latest_labels(url) == [
            ("kind", "order", b1),
            ("kind", "order", a2),
            ("step", "two", a2),
        ]
        (a3,) = await _commit(driver, _write("a", a2, kind="invoice"))
        cases: list[tuple[dict[str, str] | list[dict[str, str]], bool, list[int]]] = [
            ({"kind": "order"}, True, [b1]),
            ({"kind": "invoice"}, True, [a3]),
            ({"step": "two"}, True, []),
            ({"kind": "order", "step": "two"}, True, []),
            ([{"step": "two"}, {"kind": "invoice"}], True, [a3]),
            ({"step": "two"}, False, [a2]),
            ({"kind": "order"}, False, [a1, b1, a2]),
        ]
        for labels, latest_only, want in cases:
            query = fs.StatesQuery(labels=labels, latest_only=latest_only)
            page = await driver.get_states(query)
            assert [s.rev for s in page.states] == want, (labels, latest_only)
    assert await _latest_labels(url) == [("kind", "order", b1), ("kind", "invoice", a3)]
    schema = _quote(_schema(url))
    (version,) = await _sql(url, f"SELECT value FROM {schema}.fs_meta")
    assert version[0] == str(SCHEMA_VERSION)


async def test_many_drivers_migrate_an_old_store_once(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        for i in range(20):
            await _commit(driver, _write(f"s{i}", kind="order", n=str(i % 3)))
        await _commit(driver, _write("s0", 1, kind="invoice"))
    await _make_version_1(url)
    drivers = [PostgresDriver.from_url(url) for _ in range(6)]
    try:
        await asyncio.gather(*(d.open() for d in drivers))
        await asyncio.gather(
            *(_commit(d, _write(f"new{i}", kind="x")) for i, d in enumerate(drivers))
        )
        assert await _latest_labels(url) == await _latest_labels_wanted(url)
        assert len(await _latest_labels(url)) == 19 * 2 + 1 + 6
    finally:
        for driver in drivers:
            await driver.aclose()


async def _waiting_for_a_lock(url: str, application_name: str) -> None:
    """Return once a connection of ``application_name`` waits for a lock."""
    async with asyncio.timeout(10):
        while not await _sql(  # noqa: ASYNC110 - the server's view is the event to wait for
            url,
            "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 "
            "AND wait_event_type = 'Lock'",
            application_name,
        ):
            await asyncio.sleep(0.01)


async def test_an_old_commit_waiting_on_the_migration_writes_nothing(postgres_url: str) -> None:
    """A commit of version 1's function that waits for the head row while the migration
    holds it would go on without the new table: it fails instead, and writes nothing."""
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        (a1,) = await _commit(driver, _write("a", kind="order"))
    await _make_version_1(url)
    schema = _quote(_schema(url))
    tag = uuid.uuid4().hex
    dsn = PostgresDriver.from_url(url)._dsn
    holder = await asyncpg.connect(dsn)
    old = await asyncpg.connect(dsn, server_settings={"application_name": f"old-{tag}"})
    migrating = PostgresDriver.from_url(f"{url}&application_name=new-{tag}")
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute(f"SELECT rev FROM {schema}.fs_head FOR UPDATE")
        opening = asyncio.ensure_future(migrating.open())
        await _waiting_for_a_lock(url, f"new-{tag}")
        old_commit = asyncio.ensure_future(
            old.fetchrow(
                f"SELECT * FROM {schema}.fs_commit($1, $2, $3, $4, $5, $6, $7, "
                "$8, $9, $10, $11, $12, $13)",
                *([1], ["a"], [a1], [b"\x80"], [1], ["kind"], ["lost"]),
                *([], [], [], [], [], []),
            )
        )
        await _waiting_for_a_lock(url, f"old-{tag}")
        await lock.rollback()
        async with asyncio.timeout(10):
            await opening
            with pytest.raises(asyncpg.NotNullViolationError):
                await old_commit
        assert await migrating.head_rev() == a1
        assert await _latest_labels(url) == [("kind", "order", a1)]
        (a2,) = await _commit(migrating, _write("a", a1, kind="kept"))
        assert await _latest_labels(url) == [("kind", "kept", a2)]
    finally:
        await migrating.aclose()
        await old.close()
        await holder.close()


async def test_latest_labels_follow_every_commit(postgres_url: str) -> None:
    """Group commits, conflicts, labels that change or go: ``fs_latest_labels`` always holds
    the labels of the latest versions, and nothing else."""
    url = unique_url(postgres_url)
    rng = random.Random(7)
    async with PostgresDriver.from_url(url) as driver:
        revs: dict[str, int] = {}

        async def one(state_id: str) -> None:
            labels = {f"k{n}": str(rng.randrange(3)) for n in range(rng.randrange(4))}
            expected = revs.get(state_id, 0) if rng.random() > 0.1 else 999_999
            try:
                (rev,) = await _commit(driver, _write(state_id, expected, **labels))
            except fs.ConflictError:
                return
            revs[state_id] = rev

        for _ in range(30):
            await asyncio.gather(*(one(f"s{i}") for i in rng.sample(range(40), 20)))
        assert await _latest_labels(url) == await _latest_labels_wanted(url)
        for n in range(3):
            page = await driver.get_states(
                fs.StatesQuery(labels={"k0": str(n)}, latest_only=True, limit=1000)
            )
            want = sorted(
                rev
                for key, value, rev in await _latest_labels_wanted(url)
                if (key, value) == ("k0", str(n))
            )
            assert [s.rev for s in page.states] == want


async def test_an_odd_schema_name_is_quoted(postgres_url: str) -> None:
    base = postgres_url.partition("?")[0]
    url = f"{base}?schema=Odd%20%22Name%22%3B%20DROP%20TABLE%20x"
    async with PostgresDriver.from_url(url) as driver:
        assert driver.schema == 'Odd "Name"; DROP TABLE x'
        await _commit(driver, _write("a", kind="k"))
        waiter = asyncio.ensure_future(driver.wait_for_rev(2))
        async with PostgresDriver.from_url(url) as other:
            await _commit(other, _write("b"))
        async with asyncio.timeout(10):
            await waiter
        assert [s.id for s in await all_states(driver, labels={"kind": "k"})] == ["a"]


# -- commits and revisions ---------------------------------------------------------------------


async def test_concurrent_commits_share_transactions(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        (taken,) = await _commit(driver, _write("taken"))
        requests = [CommitRequest(writes=[_write(f"s{i}"), _write(f"t{i}")]) for i in range(40)]
        requests[17] = CommitRequest(writes=[_write("fresh"), _write("taken")])
        results = await asyncio.gather(
            *(driver.commit(r) for r in requests), return_exceptions=True
        )
        conflict = results[17]
        assert isinstance(conflict, fs.ConflictError)
        assert conflict.conflicts == [fs.Conflict("taken", 0, taken)]
        revs = [rev for r in results if isinstance(r, CommitResult) for rev in r.revs]
        assert sorted(revs) == list(range(2, 2 + 78)), "dense revisions, nothing for the loser"
        for result in results:
            if isinstance(result, CommitResult):
                assert result.revs[1] == result.revs[0] + 1  # one commit: consecutive revs
        with pytest.raises(fs.NotFoundError):
            await driver.get_state("fresh")
    # Versions written by one transaction share its transaction id.
    transactions = await _sql(
        url, f"SELECT count(DISTINCT xmin::text) FROM {_quote(_schema(url))}.fs_log"
    )
    assert 1 < transactions[0][0] < 20, "concurrent commits were grouped"


async def test_concurrent_commits_on_one_state_one_wins(postgres_url: str) -> None:
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
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


async def test_chained_commits_on_one_state_in_flight_together(postgres_url: str) -> None:
    """Commits on one state never share a group: each is checked after the one before."""
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        (rev,) = await _commit(driver, _write("s"))
        results = await asyncio.gather(
            _commit(driver, _write("s", rev, step="1")),
            _commit(driver, _write("s", rev + 1, step="2")),
            _commit(driver, _write("other")),
            return_exceptions=True,
        )
        assert results[0] == [rev + 1]
        assert isinstance(results[1], list), "checked against the first one's revision"
        assert [s.labels.get("step") for s in await all_states(driver) if s.id == "s"] == [
            None,
            "1",
            "2",
        ]


async def test_two_drivers_take_dense_revisions(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as one, PostgresDriver.from_url(url) as two:

        async def writer(driver: PostgresDriver, name: str) -> list[int]:
            revs = []
            for i in range(15):
                revs += await _commit(driver, _write(f"{name}{i}"), _write(f"{name}{i}-pair"))
            return revs

        seen = await asyncio.gather(
            *(writer(d, f"{d is one}-{n}-") for d in (one, two) for n in range(3))
        )
        revs = sorted(rev for chunk in seen for rev in chunk)
        assert revs == list(range(1, 181)), "every revision taken once, no gap"
        history = await all_states(one)
        assert [s.rev for s in history] == revs
        times = [s.committed_at for s in history if s.committed_at is not None]
        assert times == sorted(times), "commit times never decrease along revisions"


async def test_readers_never_see_a_revision_before_the_ones_below_it(postgres_url: str) -> None:
    """Writers in several drivers (separate connections, so separate transactions racing to
    commit) while readers check that every page they read is gap-free up to its head."""
    url = unique_url(postgres_url)
    writers = [PostgresDriver.from_url(url) for _ in range(3)]
    reader = PostgresDriver.from_url(url)
    stop = asyncio.Event()
    pages = 0

    async def write(driver: PostgresDriver, name: str) -> None:
        for i in range(40):
            await _commit(driver, _write(f"{name}-{i}"), _write(f"{name}-{i}-b"))

    async def read() -> None:
        nonlocal pages
        seen = 0
        while not stop.is_set():
            page = await reader.get_states(fs.StatesQuery(since_rev=seen, limit=1000))
            revs = [s.rev for s in page.states]
            assert revs == list(range(seen + 1, page.head_rev + 1)), "a revision was skipped"
            seen = page.head_rev
            pages += 1

    try:
        for driver in (*writers, reader):
            await driver.open()
        async with asyncio.timeout(60):
            readers = [asyncio.ensure_future(read()) for _ in range(2)]
            await asyncio.gather(
                *(write(d, f"w{n}-{k}") for n, d in enumerate(writers) for k in range(4))
            )
            stop.set()
            await asyncio.gather(*readers)
        assert await reader.head_rev() == 3 * 4 * 40 * 2
        assert pages > 10
    finally:
        for driver in (*writers, reader):
            await driver.aclose()


async def test_a_bad_commit_fails_alone(postgres_url: str) -> None:
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        # One state written twice in one commit (an engine never sends that): PostgreSQL
        # refuses to upsert its latest row twice in one statement.
        outcomes = await asyncio.gather(
            *(_commit(driver, _write(f"s{i}")) for i in range(5)),
            _commit(driver, _write("bad"), _write("bad")),
            *(_commit(driver, _write(f"t{i}")) for i in range(5)),
            return_exceptions=True,
        )
        failure = outcomes[5]
        assert isinstance(failure, fs.DriverError)
        assert not isinstance(failure, fs.DriverUnavailableError)
        assert isinstance(failure.__cause__, asyncpg.PostgresError)
        assert all(isinstance(o, list) for i, o in enumerate(outcomes) if i != 5)
        assert sorted(s.id for s in await all_states(driver)) == sorted(
            [f"s{i}" for i in range(5)] + [f"t{i}" for i in range(5)]
        )
        assert await driver.head_rev() == 10


@pytest.mark.parametrize(
    "where",
    ["id", "label key", "label value", "alias", "delay target"],
)
async def test_nul_characters_are_refused_before_sending(postgres_url: str, where: str) -> None:
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        write = _write("a\x00b" if where == "id" else "a")
        if where == "label key":
            write.state.labels = {"k\x00": "v"}
        elif where == "label value":
            write.state.labels = {"k": "\x00"}
        elif where == "alias":
            write.data = {"\x00": b"x"}
        elif where == "delay target":
            write.delay_to, write.delay_at = "x\x00", datetime.datetime.now(datetime.UTC)
        with pytest.raises(fs.InvalidCommandError, match="NUL"):
            await _commit(driver, write)
        assert await driver.head_rev() == 0


@pytest.mark.parametrize("where", ["id", "label", "alias"])
async def test_what_an_index_row_cannot_hold_is_refused_before_sending(
    postgres_url: str, where: str
) -> None:
    # A B-tree row holds at most 2,704 bytes: longer indexed text would fail in the server.
    most = MAX_INDEXED_BYTES
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        for size, fits in ((most, True), (most + 1, False)):
            state_id = "é" * (size // 2) + "i" * (size % 2) if where == "id" else f"s{size}"
            write = _write(state_id)
            if where == "label":
                write.state.labels = {"k" * 10: "v" * (size - 10)}
            elif where == "alias":
                write.data = {"a" * (size - len(state_id)): b"x"}
            if fits:
                await _commit(driver, write)
                continue
            head = await driver.head_rev()
            with pytest.raises(fs.InvalidCommandError, match=f"takes {size} bytes, more than"):
                await _commit(driver, write)
            assert await driver.head_rev() == head


async def test_reads_with_nul_characters_find_nothing(postgres_url: str) -> None:
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        (rev,) = await _commit(driver, _write("a", kind="x"))
        with pytest.raises(fs.NotFoundError):
            await driver.get_state("a\x00")
        with pytest.raises(fs.NotFoundError):
            await driver.get_data("a", "\x00")
        for query in (
            fs.StatesQuery(id="a\x00"),
            fs.StatesQuery(labels={"kind": "x\x00"}),
            fs.StatesQuery(labels={"k\x00": "x"}, since_latest=True),
        ):
            page = await driver.get_states(query)
            assert (page.states, page.more, page.head_rev) == ([], False, rev)
        page = await driver.get_states(fs.StatesQuery(labels=[{"kind": "\x00"}, {"kind": "x"}]))
        assert [s.id for s in page.states] == ["a"], "the other AND-map still matches"


async def test_leases_with_nul_characters(postgres_url: str) -> None:
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        with pytest.raises(fs.InvalidCommandError, match=r"the lease name .* holds a NUL"):
            await driver.acquire_lease("n\x00", "me", 10)
        with pytest.raises(fs.InvalidCommandError, match=r"the holder .* holds a NUL"):
            await driver.acquire_lease("n", "me\x00", 10)
        assert await driver.get_lease("n\x00") is None
        forged = Lease(name="n\x00", holder="me", token=1, ttl=10)
        assert await driver.renew_lease(forged) is None
        await driver.release_lease(forged)
        assert await driver.acquire_lease("n", "me", 10) is not None


async def test_a_lease_name_an_index_row_cannot_hold_is_refused_before_sending(
    postgres_url: str,
) -> None:
    # Random letters: PostgreSQL compresses repetitive text, which would hide the limit.
    rng = random.Random(2704)
    fits, too_long, far_too_long = (
        "".join(rng.choice(string.ascii_letters) for _ in range(size))
        for size in (MAX_INDEXED_BYTES, MAX_INDEXED_BYTES + 1, 3000)
    )
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        lease = await driver.acquire_lease(fits, "me", 10)
        assert lease is not None
        assert await driver.get_lease(fits) == lease
        for name in (too_long, far_too_long):
            size = len(name)
            with pytest.raises(
                fs.InvalidCommandError,
                match=rf"the lease name '{name[:20]}\w+\.\.\. takes {size} bytes, more than "
                f"the {MAX_INDEXED_BYTES} ",
            ):
                await driver.acquire_lease(name, "me", 10)
            # No claim can hold such a name: reads find none, as for a name holding NUL.
            assert await driver.get_lease(name) is None
            forged = Lease(name=name, holder="me", token=lease.token, ttl=10)
            assert await driver.renew_lease(forged) is None
            await driver.release_lease(forged)
        assert await driver.get_lease(fits) == lease
    rows = await _sql(url, f"SELECT name FROM {_quote(_schema(url))}.fs_leases")
    assert [row[0] for row in rows] == [fits]


async def test_values_flowstate_did_not_write_are_driver_errors(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        await _commit(driver, _write("s"))
        await _sql(url, f"UPDATE {_quote(_schema(url))}.fs_log SET state = '\\xc1'::bytea")
        with pytest.raises(fs.DriverError, match="cannot read") as info:
            await driver.get_state("s")
        assert not isinstance(info.value.__cause__, fs.FlowstateError)


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        ("sslmode=verify-full&sslrootcert=/nonexistent/root.crt", "No such file"),
        ("application_name=%00", "08P01"),
        ("sslmode=require", "rejected SSL upgrade"),  # the test server offers no TLS
    ],
)
async def test_a_connection_option_no_retry_mends_fails_at_once(
    postgres_url: str, option: str, problem: str
) -> None:
    # Not DriverUnavailableError: retrying for the whole timeout cannot help.
    driver = PostgresDriver.from_url(f"{unique_url(postgres_url)}&timeout=5&{option}")
    with pytest.raises(fs.DriverError, match=problem) as info:
        await driver.open()
    assert not isinstance(info.value, fs.DriverUnavailableError)


async def test_closed_driver(postgres_url: str) -> None:
    driver = PostgresDriver.from_url(unique_url(postgres_url))
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
async def test_accepted_commits_are_written_on_close(postgres_url: str, commits: int) -> None:
    url = unique_url(postgres_url)
    driver = PostgresDriver.from_url(url)
    await driver.open()
    tasks = [asyncio.ensure_future(_commit(driver, _write(f"s{i}"))) for i in range(commits)]
    await asyncio.sleep(0)  # every commit is queued
    await driver.aclose()
    revs = [rev for (rev,) in await asyncio.gather(*tasks)]
    async with PostgresDriver.from_url(url) as again:
        assert [s.rev for s in await all_states(again)] == sorted(revs)


async def test_commit_cancelled_before_it_was_sent_is_not_written(postgres_url: str) -> None:
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        first = asyncio.ensure_future(_commit(driver, _write("first")))
        second = asyncio.ensure_future(_commit(driver, _write("second")))
        await asyncio.sleep(0)  # both are queued; the committer has not run yet
        second.cancel()
        assert await first == [1]
        with pytest.raises(asyncio.CancelledError):
            await second
        await _commit(driver, _write("third"))
        assert [s.id for s in await all_states(driver)] == ["first", "third"]


@pytest.mark.slow
async def test_aclose_answers_the_commit_it_stops_waiting_for(postgres_url: str) -> None:
    # Two commits of one state go out in two groups, one after the other; a lock on the
    # store's head holds each for the whole timeout, so aclose() gives up on the second.
    url = unique_url(postgres_url) + "&timeout=3"
    async with PostgresDriver.from_url(url) as driver:
        await _commit(driver, _write("warm-up"))
    driver = PostgresDriver.from_url(url)
    await driver.open()
    locker = await asyncpg.connect(driver._dsn)
    try:
        async with locker.transaction():
            await locker.execute(f'SELECT * FROM "{driver.schema}".fs_head FOR UPDATE')
            first = asyncio.ensure_future(_commit(driver, _write("s")))
            second = asyncio.ensure_future(_commit(driver, _write("s")))
            await asyncio.sleep(0)  # both queued
            async with asyncio.timeout(30):
                await driver.aclose()
                with pytest.raises(fs.DriverUnavailableError):
                    await first  # the timeout ended its group
                with pytest.raises(fs.ClosedError, match="may or may not have been applied"):
                    await second
    finally:
        await locker.close()


async def test_a_caller_cancelled_while_a_connection_opens_leaves_no_unread_error(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cut between its TCP connect and its TLS probe, asyncpg's handshake leaves an error in
    # a future nobody reads, which asyncio reports as unhandled: the driver lets it finish.
    caller: asyncio.Task[None] | None = None

    def connection_made(_protocol: object, _transport: object) -> None:
        if caller is not None:
            caller.cancel()  # the moment the handshake must not be cut

    monkeypatch.setattr(
        connect_utils.TLSUpgradeProto, "connection_made", connection_made, raising=False
    )
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        driver = PostgresDriver.from_url(unique_url(postgres_url))
        caller = asyncio.create_task(driver.open())
        with pytest.raises(asyncio.CancelledError):
            await caller
        caller = None
        await driver.aclose()
        await asyncio.sleep(0)  # a transport closed just now reports connection_lost next
        gc.collect()  # an unread future error is reported when the future is collected
    finally:
        loop.set_exception_handler(handler)
    assert [context["message"] for context in unhandled] == []
    async with PostgresDriver.from_url(driver.url) as again:
        assert await again.head_rev() == 0


# -- queries -----------------------------------------------------------------------------------


async def test_since_time_honours_microseconds(postgres_url: str) -> None:
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        result = await driver.commit(CommitRequest(writes=[_write("a")]))
        at = result.committed_at
        page = await driver.get_states(fs.StatesQuery(since_time=at))
        assert [s.id for s in page.states] == ["a"]
        later = at + datetime.timedelta(microseconds=1)
        assert (await driver.get_states(fs.StatesQuery(since_time=later))).states == []
        other_zone = at.astimezone(datetime.timezone(datetime.timedelta(hours=5)))
        assert len((await driver.get_states(fs.StatesQuery(since_time=other_zone))).states) == 1


async def test_since_time_matches_a_scan(postgres_url: str) -> None:
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        for i in range(12):
            await _commit(driver, *(_write(f"s{i}-{j}") for j in range(i % 3 + 1)))
            await asyncio.sleep(0.002)
        history = await all_states(driver)
        times = sorted({s.committed_at for s in history if s.committed_at is not None})
        for moment in [times[0] - datetime.timedelta(seconds=1), *times]:
            for offset in (datetime.timedelta(0), datetime.timedelta(microseconds=500)):
                threshold = moment + offset
                page = await driver.get_states(fs.StatesQuery(since_time=threshold, limit=1000))
                expected = [
                    s.rev for s in history if s.committed_at and s.committed_at >= threshold
                ]
                assert [s.rev for s in page.states] == expected


async def test_selective_label_among_many(postgres_url: str) -> None:
    """An AND-map finds its rare matches whichever order its pairs are written in."""
    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
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
        leads = await driver._order_pairs([[("kind", "order"), ("rare", "yes")]], 0, False)
        assert leads == [[("rare", "yes"), ("kind", "order")]], "the rarest pair leads"


_Page = tuple[list[tuple[str, int, dict[str, str]]], bool, int]


async def _pages(driver: fs.Driver, query: fs.StatesQuery) -> list[_Page]:
    """Every page of ``query``, from the first to the one that says there is no more, as
    ``(id, rev, labels)`` of each version, ``more`` and ``head_rev`` (stores' clocks differ)."""
    pages = [await driver.get_states(query)]
    while pages[-1].more:
        since = pages[-1].states[-1].rev
        pages.append(await driver.get_states(query.replace(since_rev=since, since_latest=False)))
    return [([(s.id, s.rev, s.labels) for s in p.states], p.more, p.head_rev) for p in pages]


@pytest.mark.slow
async def test_the_largest_label_filters_match_the_memory_driver(postgres_url: str) -> None:
    """Every label filter StatesQuery allows is answered, up to 64 OR-ed maps of 64 pairs
    (4,096 pairs, far past what the server takes one by one in a statement), with the pages
    the memory driver gives for the same commits, and a watcher streams what they hold."""
    rng = random.Random(4096)
    most_maps, most_pairs = fs.StatesQuery.MAX_LABEL_MAPS, fs.StatesQuery.MAX_LABEL_PAIRS
    keys = [f"k{j}" for j in range(most_pairs)]
    # 12 states, 4 versions each; half the keys take one value only (postings of every length).
    commits: list[StateWrite] = []
    revs: dict[str, int] = {}
    for _ in range(4):
        for i in range(12):
            labels = {key: rng.choice("ab" if j % 2 else "a") for j, key in enumerate(keys)}
            commits.append(_write(f"s{i}", revs.get(f"s{i}", 0), **labels))
            revs[f"s{i}"] = len(commits)
    # Each version's labels, all of them (the first two: the last and first versions of s11),
    # every one followed by a copy with a pair no version has: a map that matches nothing.
    sources = [commits[-1], commits[11], *rng.sample(commits, most_maps // 2 - 2)]
    maps = []
    for source in sources:
        labels = source.state.labels
        maps += [dict(labels), {**labels, rng.choice(keys): "c"}]
    queries = [
        fs.StatesQuery(labels=maps, limit=5),
        fs.StatesQuery(labels=maps, limit=5, latest_only=True),
        fs.StatesQuery(labels=maps, limit=5, since_latest=True),
        fs.StatesQuery(labels=maps, limit=5, since_latest=True, latest_only=True),
        fs.StatesQuery(labels=maps[:27], limit=3, since_rev=10),
        fs.StatesQuery(labels=maps[0], limit=2),
        fs.StatesQuery(labels=maps, id="s11", limit=1),
        fs.StatesQuery(labels=maps, id="s11", since_latest=True, latest_only=True),
    ]
    async with (
        MemoryDriver() as memory,
        PostgresDriver.from_url(unique_url(postgres_url)) as driver,
    ):
        for write in commits:
            assert await _commit(memory, write) == await _commit(driver, write)
        for query in queries:
            expected = await _pages(memory, query)
            assert any(states for states, _, _ in expected), query
            assert await _pages(driver, query) == expected, query
        matching = [
            version for states, _, _ in await _pages(memory, queries[0]) for version in states
        ]
        async with fs.Engine(driver) as engine, engine.watch(labels=maps, limit=5) as watcher:
            async with asyncio.timeout(10):
                seen = [await anext(watcher) for _ in matching]
        assert [(s.id, s.rev, s.labels) for s in seen] == matching


# A filter of more pairs than the SQL names one by one: its AND-maps' pairs go to the server
# as arrays.
_LARGE_FILTER = [
    {"kind": "order", "rare": "yes"},
    *({"kind": "order", f"absent{n}": "x"} for n in range(8)),
]

_QUERIES = [
    fs.StatesQuery(limit=5),
    fs.StatesQuery(limit=5, latest_only=True),
    fs.StatesQuery(limit=5, since_latest=True),
    fs.StatesQuery(limit=5, since_latest=True, latest_only=True),
    fs.StatesQuery(limit=5, labels={"rare": "yes"}),
    fs.StatesQuery(limit=5, labels={"kind": "order", "rare": "yes"}),
    fs.StatesQuery(limit=5, labels=[{"rare": "yes"}, {"kind": "order"}], latest_only=True),
    fs.StatesQuery(limit=5, labels={"kind": "order"}, since_latest=True),
    fs.StatesQuery(limit=5, since_time=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)),
    fs.StatesQuery(limit=5, id="s3-50"),
    fs.StatesQuery(limit=5, id="s3-50", labels={"rare": "yes"}, since_latest=True),
    fs.StatesQuery(limit=5, labels=_LARGE_FILTER),
    fs.StatesQuery(limit=5, labels=_LARGE_FILTER, since_latest=True),
    fs.StatesQuery(limit=5, id="s3-50", labels=_LARGE_FILTER),
]


async def _fill(driver: PostgresDriver, batches: range) -> None:
    for batch in batches:
        writes = [
            StateWrite(
                state=fs.State(
                    id=f"s{batch}-{i}",
                    labels={"kind": "order", **({"rare": "yes"} if i == 50 else {})},
                ),
                expected_rev=0,
            )
            for i in range(100)
        ]
        await driver.commit(CommitRequest(writes=writes))


async def _page_costs(
    driver: PostgresDriver, conn: Any, queries: list[fs.StatesQuery] = _QUERIES
) -> list[tuple[int, list[str]]]:
    """For each query of ``queries``: the buffers its page read touched, and the tables it
    scanned whole."""

    def scanned(node: dict[str, Any]) -> list[str]:
        found = [node["Relation Name"]] if node["Node Type"] == "Seq Scan" else []
        return found + [name for child in node.get("Plans", []) for name in scanned(child)]

    await conn.execute("ANALYZE")
    costs = []
    for query in queries:
        leads = [list(wanted.items()) for wanted in query.label_sets]
        if query.id is None and any(len(pairs) > 1 for pairs in leads):
            leads = await driver._order_pairs(leads, query.since_rev, query.latest_only)
        sql, params = postgres_driver._page_sql(driver._sql.schema, query, leads)
        for _ in range(6):  # past the custom plans of a prepared statement, to the generic one
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *params)
        plan = json.loads(raw)[0]["Plan"]
        costs.append((plan["Shared Hit Blocks"] + plan["Shared Read Blocks"], scanned(plan)))
    return costs


@pytest.mark.slow
async def test_page_cost_does_not_grow_with_history(postgres_url: str) -> None:
    """Every page read walks an index and stops at its limit: four times the history costs
    no more (the binary search of since_time a few probes more)."""
    assert sum(len(labels) for labels in _LARGE_FILTER) > postgres_driver._NAMED_PAIRS
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        conn = await asyncpg.connect(driver._dsn)
        try:
            await _fill(driver, range(20))
            small = await _page_costs(driver, conn)
            await _fill(driver, range(20, 80))
            large = await _page_costs(driver, conn)
        finally:
            await conn.close()
    for query, (before, _), (after, tables) in zip(_QUERIES, small, large, strict=True):
        assert set(tables) <= {"fs_head"}, f"{query}: scanned {tables}"
        assert after <= before + 12, f"{query}: {before} buffers, then {after}"


_HISTORY_QUERIES = [
    fs.StatesQuery(limit=20, labels={"kind": "order"}, latest_only=True),
    fs.StatesQuery(limit=20, labels={"kind": "order", "rare": "yes"}, latest_only=True),
    fs.StatesQuery(limit=20, labels={"rare": "yes", "kind": "order"}, latest_only=True),
    fs.StatesQuery(limit=20, labels={"kind": "order"}, latest_only=True, since_latest=True),
    fs.StatesQuery(limit=20, labels=[{"rare": "yes"}, {"kind": "order"}], latest_only=True),
    fs.StatesQuery(limit=20, labels=_LARGE_FILTER, latest_only=True),
    fs.StatesQuery(limit=20, labels=_LARGE_FILTER, latest_only=True, since_latest=True),
]


@pytest.mark.slow
async def test_latest_label_pages_do_not_grow_with_history(postgres_url: str) -> None:
    """A latest-only label page reads latest versions' postings only: four times the history
    behind the same 200 states costs it no more, and an AND-map's probe counts only latest
    versions (every pair has more postings in the whole history than the probe reads).

    VACUUM first: until it runs, the rows commits deleted still cost index reads, and
    autovacuum's schedule is not the test's to wait for."""
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        conn = await asyncpg.connect(driver._dsn)
        try:
            await fill_history(driver, 200, 60)  # 12,000 versions
            await conn.execute("VACUUM")
            small = await _page_costs(driver, conn, _HISTORY_QUERIES)
            await fill_history(driver, 200, 180)  # 48,000 versions
            await conn.execute("VACUUM")
            large = await _page_costs(driver, conn, _HISTORY_QUERIES)
            for query in _HISTORY_QUERIES:
                page = await driver.get_states(query)
                assert page.states, query
                assert all(s.rev > 200 * 239 for s in page.states), "only latest versions"
            pairs = [("kind", "order"), ("rare", "yes")]
            leads = await driver._order_pairs([pairs], 0, True)
            assert leads == [[("rare", "yes"), ("kind", "order")]], "the rarest pair leads"
        finally:
            await conn.close()
    for query, (before, _), (after, tables) in zip(_HISTORY_QUERIES, small, large, strict=True):
        assert set(tables) <= {"fs_head"}, f"{query}: scanned {tables}"
        assert after <= before + 12, f"{query}: {before} buffers, then {after}"


async def test_delays_page(postgres_url: str) -> None:
    at = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)

    def delayed(state_id: str) -> StateWrite:
        write = _write(state_id)
        write.delay_to, write.delay_at = "wake", at
        return write

    async with PostgresDriver.from_url(unique_url(postgres_url)) as driver:
        together = await _commit(driver, delayed("a"), delayed("b"), _write("c"))
        (last,) = await _commit(driver, delayed("d"))
        page = await driver.get_delays(limit=2)
        assert [(d.state.id, d.rev, d.to, d.at) for d in page.delays] == [
            ("a", together[0], "wake", at),
            ("b", together[1], "wake", at),
        ]
        assert page.more
        page = await driver.get_delays(since_rev=together[1])
        assert [(d.state.id, d.rev) for d in page.delays] == [("d", last)]
        assert not page.more
        assert (await driver.get_delays(limit=0)).more
        assert not (await driver.get_delays(since_rev=last, limit=0)).more


# -- leases ------------------------------------------------------------------------------------


async def test_leases_are_shared_between_drivers(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as one, PostgresDriver.from_url(url) as two:
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
        assert await one.head_rev() == 0, "leases do not move the revision"


async def test_lease_expiry_follows_the_server_clock(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as driver:
        lease = await driver.acquire_lease("l", "me", 3600)
        assert lease is not None
        # Move the claim's expiry into the server's past: only the server's clock decides.
        schema = _quote(_schema(url))
        await _sql(url, f"UPDATE {schema}.fs_leases SET expires_at = now() - interval '1 ms'")
        assert await driver.get_lease("l") is None
        assert await driver.renew_lease(lease) is None
        assert await driver.acquire_lease("l", "other", 10) is not None


# -- watching ----------------------------------------------------------------------------------


async def test_wait_for_rev_is_woken_by_a_notification(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the periodic head read pushed out of reach, only NOTIFY can wake the waiter.
    monkeypatch.setattr(postgres_driver, "_LISTEN_CHECK", 3600.0)
    url = unique_url(postgres_url)
    async with PostgresDriver.from_url(url) as waiter, PostgresDriver.from_url(url) as writer:
        for expected in (1, 2, 3):
            waiting = asyncio.ensure_future(waiter.wait_for_rev(expected))
            await asyncio.sleep(0)
            assert not waiting.done()
            (rev,) = await _commit(writer, _write(f"s{expected}"))
            assert rev == expected
            async with asyncio.timeout(10):
                await waiting


@pytest.mark.slow
async def test_watch_sees_a_commit_from_another_process(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    async with (
        PostgresDriver.from_url(url) as driver,
        fs.Engine(driver) as engine,
        engine.watch() as watcher,
    ):
        waiting = asyncio.ensure_future(anext(watcher))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), "commit", url, "from-child", stdout=subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert out.decode().strip() == "1"
        async with asyncio.timeout(10):
            state = await waiting
        assert (state.id, state.rev) == ("from-child", 1)


async def _connections(url: str, application_name: str) -> list[int]:
    rows = await _sql(
        url, "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
    )
    return [row[0] for row in rows]


async def _terminate(url: str, application_name: str) -> int:
    """Drop every connection of ``application_name`` from the server side; wait until the
    server has closed them all. Returns how many there were."""
    rows = await _sql(
        url,
        # OFFSET 0 keeps the filter apart: the terminations run on its rows only.
        "SELECT pid, pg_terminate_backend(pid) FROM (SELECT pid FROM pg_stat_activity "
        "WHERE application_name = $1 OFFSET 0) victims",
        application_name,
    )
    pids = [row[0] for row in rows]
    async with asyncio.timeout(10):
        while await _sql(  # noqa: ASYNC110 - the server's view is the event to wait for
            url, "SELECT 1 FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids
        ):
            await asyncio.sleep(0.01)
    return len(pids)


@pytest.mark.slow
async def test_a_dropped_connection_loses_no_wake_up(postgres_url: str) -> None:
    url = unique_url(postgres_url)
    name = f"victim-{uuid.uuid4().hex[:8]}"
    async with (
        PostgresDriver.from_url(f"{url}&application_name={name}") as victim,
        PostgresDriver.from_url(url) as writer,
        fs.Engine(victim) as engine,
    ):
        await _commit(writer, _write("s"))
        received: list[str] = []
        async with engine.watch() as watcher:
            received.append((await anext(watcher)).id)
            waiting = asyncio.ensure_future(anext(watcher))  # starts the victim's listener
            async with asyncio.timeout(10):
                while len(await _connections(url, name)) < 2:  # noqa: ASYNC110 - server's view
                    await asyncio.sleep(0.01)
            assert await _terminate(url, name) >= 2, "the pool and the listener were cut"
            # Committed while the victim has no connection at all.
            await _commit(writer, _write("while-cut"))
            await _commit(writer, _write("after"))
            async with asyncio.timeout(20):
                received.append((await waiting).id)
                received.append((await anext(watcher)).id)
        assert received == ["s", "while-cut", "after"]
        (rev,) = await _commit(victim, _write("from-victim"))
        assert (await writer.get_state("from-victim")).rev == rev


@pytest.mark.slow
async def test_watch_resumes_across_a_server_restart(own_server: PostgresServer) -> None:
    url = unique_url(own_server.url)
    async with PostgresDriver.from_url(url) as driver, fs.Engine(driver) as engine:
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
        # An immediate shutdown, as in a crash: the next start replays the WAL.
        await asyncio.to_thread(own_server.restart, signal.SIGQUIT)
        assert not waiter.done()
        async with PostgresDriver.from_url(url) as other, fs.Engine(other) as writer:
            moved = await writer.get_state("s")
            for to in ("d", "e"):
                await writer.do(fs.Commit(fs.Transit(moved, to)))
            for i in range(3):
                await writer.do(fs.Commit(fs.Transit(fs.StateCtx.new(f"n{i}"), "x")))
        async with asyncio.timeout(20):
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


@pytest.mark.slow
async def test_calls_ride_out_fast_shutdowns(own_server: PostgresServer) -> None:
    # A fast shutdown (pg_ctl stop -m fast) tells every connection it ends; the calls that
    # meet such a connection are retried on a new one, within the driver's timeout.
    url = unique_url(own_server.url) + "&timeout=30"
    failures: list[BaseException] = []
    calls = 0
    progress = asyncio.Condition()

    async def call(driver: PostgresDriver, i: int) -> None:
        if i % 4 == 0:
            await driver.get_state("s")
        elif i % 4 == 1:
            await driver.head_rev()
        elif i % 4 == 2:
            await driver.get_states(fs.StatesQuery(labels={"k": "v"}))
        else:
            await driver.acquire_lease(f"lease-{i}", "me", 10)

    async def caller(driver: PostgresDriver, i: int, stop: asyncio.Event) -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                await call(driver, i)
            except fs.FlowstateError as exc:
                failures.append(exc)
            async with progress:
                calls += 1
                progress.notify_all()

    async def calls_made(more: int) -> None:
        async with progress:
            target = calls + more
            await progress.wait_for(lambda: calls >= target)

    async with PostgresDriver.from_url(url) as driver:
        await _commit(driver, _write("s", k="v"))
        stop = asyncio.Event()
        callers = [asyncio.create_task(caller(driver, i, stop)) for i in range(12)]
        for _ in range(3):
            await calls_made(50)  # on live connections, then shut down under them
            await asyncio.to_thread(own_server.restart, signal.SIGINT)
        await calls_made(50)
        stop.set()
        await asyncio.gather(*callers)
    assert failures == []


@pytest.mark.slow
async def test_unavailable_while_the_server_is_down_then_works_again(
    own_server: PostgresServer,
) -> None:
    url = unique_url(own_server.url) + "&timeout=1"
    async with PostgresDriver.from_url(url) as driver:
        (rev,) = await _commit(driver, _write("s"))
        await asyncio.to_thread(own_server.stop)
        try:
            with pytest.raises(fs.DriverUnavailableError) as info:
                await driver.head_rev()
            assert not isinstance(info.value.__cause__, fs.FlowstateError)
            assert info.value.__cause__ is not None
            with pytest.raises(fs.DriverUnavailableError):
                await _commit(driver, _write("s", rev))
            with pytest.raises(fs.DriverUnavailableError):
                await driver.get_states(fs.StatesQuery())
            with pytest.raises(fs.DriverUnavailableError):
                await driver.acquire_lease("l", "me", 5)
            with pytest.raises(fs.DriverUnavailableError) as opening:
                await PostgresDriver.from_url(url).open()
            # It names why it retried until the deadline, not the deadline alone.
            assert "ConnectionRefusedError" in str(opening.value)
        finally:
            await asyncio.to_thread(own_server.start)
            await asyncio.to_thread(own_server.wait_ready)
        assert await driver.head_rev() == rev, "the failed commit was not applied"
        (rev2,) = await _commit(driver, _write("s", rev))
        assert rev2 == rev + 1
        assert (await driver.get_state("s")).rev == rev2


@pytest.mark.slow
async def test_open_waits_for_a_server_that_is_starting(own_server: PostgresServer) -> None:
    url = unique_url(own_server.url) + "&timeout=30"
    await asyncio.to_thread(own_server.stop)
    driver = PostgresDriver.from_url(url)
    opening = asyncio.ensure_future(driver.open())
    try:
        await asyncio.to_thread(own_server.start)
        async with asyncio.timeout(30):
            await opening
        assert await driver.head_rev() == 0
    finally:
        await asyncio.to_thread(own_server.wait_ready)
        await driver.aclose()


# -- processes ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_process_loses_no_acknowledged_commit(postgres_url: str) -> None:
    """SIGKILL committing processes at random moments: every acknowledged commit is stored
    whole, with the revisions it was told, and revisions stay dense."""
    kill_committers_and_check(unique_url(postgres_url))


# -- the flowstate command ---------------------------------------------------------------------


def test_cli_reads_a_postgres_store(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = unique_url(postgres_url)

    async def fill() -> None:
        async with PostgresDriver.from_url(url) as driver:
            (rev,) = await _commit(driver, _write("a", kind="order"))
            await _commit(driver, _write("b", kind="user"))
            await _commit(driver, _write("a", rev, kind="order"))

    asyncio.run(fill())
    assert main(["states", url, "--label", "kind=order", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["rev"]) for s in page["states"]] == [("a", 1), ("a", 3)]
    assert page["head_rev"] == 3
    assert main(["get", url, "a", "--rev", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rev"] == 1


def test_cli_reading_never_creates_a_store(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = unique_url(postgres_url)
    assert main(["states", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flowstate: error: no flowstate store in schema")
    assert err.count("\n") == 1
    rows = asyncio.run(_sql(url, "SELECT 1 FROM pg_namespace WHERE nspname = $1", _schema(url)))
    assert rows == [], "the schema was not created"


@pytest.mark.slow
def test_cli_demo_with_a_crashing_worker(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = unique_url(postgres_url)
    assert main(["demo", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "crashed (killed by SIGKILL) while shipping r1-order-4" in out
    assert "retried by the recoverer (attempt 1)" in out

    async def check() -> None:
        async with PostgresDriver.from_url(url) as driver:
            page = await driver.get_states(
                fs.StatesQuery(labels={"kind": "order"}, latest_only=True)
            )
        assert len(page.states) == 4
        assert all(state.is_ended for state in page.states)

    asyncio.run(check())


async def test_connections_are_named_for_the_server(postgres_url: str) -> None:
    async def name(url: str) -> str:
        async with PostgresDriver.from_url(url) as driver:
            await _commit(driver, _write("s"))
            pid = driver._commit_conn.get_server_pid()
            rows = await _sql(
                url, "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid
            )
            found: str = rows[0][0]
            return found

    assert await name(unique_url(postgres_url)) == "flowstate"
    assert await name(unique_url(postgres_url) + "&application_name=billing") == "billing"
