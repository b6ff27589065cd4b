"""The PostgreSQL driver (``postgresql://user@host:port/database?schema=flowstate``).

Built on asyncpg; install it with ``pip install 'flowstate-engine[postgres]'``. Every store
lives in its own schema (``flowstate`` by default), so many stores can share one database, and
any number of processes can use one store at once.

URL:
    ``postgresql://app@db.internal:5432/orders?schema=flowstate&sslmode=verify-full``
    (``postgres://`` works too). flowstate reads these options and removes them from the URL:
    ``schema`` (the store's schema, created on first use; at most 63 bytes),
    ``timeout`` (the time budget of one call in seconds, retries included; default 10, at
    most 3600), ``pool_size`` (connections for reads and lease calls; default 10, at most
    1000) and ``connect_timeout`` (seconds to establish one connection; default
    ``timeout``). Every other part of the URL is handed to asyncpg as it is: several
    ``host:port`` pairs, ``sslmode``, ``sslrootcert``, ``target_session_attrs``,
    ``application_name``... (any other query option becomes a server setting). The
    password comes from the ``PGPASSWORD`` environment variable or a ``.pgpass`` file
    (``PGPASSFILE``), as with libpq, and never from the URL: ``user:password@`` or
    ``?password=`` is refused (URLs end up in shell histories, process lists and logs).
    flowstate shows no secret: not in its logs, errors or reprs (an ``sslpassword`` for an
    encrypted client key shows as ``***``).

Schema (version 2, recorded in ``fs_meta``; every name below lives in the store's schema)::

    fs_meta(key PRIMARY KEY, value)     ('schema_version', '2')
    fs_head(rev, at_ms)                 one row: the head revision and its commit time (ms);
        the lock every commit takes
    fs_log(rev PRIMARY KEY, id, committed_at, state)    every version: committed_at in ms
        since the epoch (UTC), state the msgpack-encoded State without its rev and time;
        index (id, rev) for a state's history. Commit times never decrease along revisions,
        so ``since_time`` is a binary search over the primary key (no time index to update)
    fs_latest(id PRIMARY KEY, rev UNIQUE)   each state's latest revision: the compare-and-set
        guard, and the index of ``latest_only`` queries
    fs_labels(key, value, rev) PRIMARY KEY   one row per label of each version, so a label
        filter reads only matching versions
    fs_latest_labels(key, value, rev) PRIMARY KEY   the same rows for latest versions only,
        indexed by rev too (``fs_latest_labels_rev``): a ``latest_only`` label filter reads
        only the states that match now, however long their history (version 2). A commit
        deletes the rows of each state's previous version and inserts its new version's rows
    fs_data(id, alias, rev) PRIMARY KEY, blob   data versions
    fs_delays(rev PRIMARY KEY, to_flow, due)    delays, bound to the version at ``rev``
    fs_leases(name PRIMARY KEY, holder, token, ttl, expires_at)   leases
    fs_commit(...)       the commit function (below);  fs_time_rev(ms)   since_time's search

The first ``open()`` creates the schema under an advisory lock (processes opening a new
store together create it once). A schema written by a newer flowstate is refused with
``SchemaVersionError``; a schema holding tables flowstate did not create is refused with
``DriverError``. An older schema is migrated forward in one transaction, under the same lock,
by the first ``open()`` that finds it; commits wait for it, and it must finish within
``timeout`` (give ``open()`` a longer one for a large store). Processes of the older flowstate
that are still running go on working: from then on their commits run the new ``fs_commit``
(one of theirs already waiting when the migration starts fails with ``DriverError`` and
writes nothing).

Revisions and visibility:
    Every commit runs ``fs_commit``, one server-side function called in one statement (one
    round trip, one transaction). Its first statement locks the single row of ``fs_head``
    (``SELECT ... FOR UPDATE``); the lock is held until the transaction commits, so commits
    to a store run one after another, across every process. Under the lock the function reads
    the head revision, checks every state against ``fs_latest`` (each statement after the
    lock sees everything committed before it), numbers the new versions ``head + 1, head + 2,
    ...`` and moves the head. Revisions are therefore dense and strictly increasing, and
    PostgreSQL makes a transaction visible before it releases its locks: revision N+1 can
    never be visible to a reader while revision N is not. A failed commit rolls the head back
    with everything else, so it leaves no hole either. A sequence would not do: two
    transactions can take values from it in one order and commit in the other. Commit times
    come from the server's clock under the same lock, clamped so that they never decrease
    along revisions. Every read is one statement, so one snapshot: a page and its
    ``head_rev`` agree, and no page shows part of a commit.

Group commit:
    One background task per driver sends the commits made through it, on a connection of its
    own (so a driver holds at most ``pool_size`` + 2 connections, with the listener's). While
    one group is on its way, the next one collects; each group is one call of ``fs_commit`` with the writes as
    arrays (one round trip, whatever its size). Inside it every commit is checked on its own:
    a commit that conflicts gets its own ``ConflictError`` naming every conflicting state, and
    writes nothing; the others are written. Commits that touch the same state never share a
    group (the later one waits for the next), groups hold at most 1,000 writes and about 8 MB,
    and a server error other than a lost connection (a value PostgreSQL refuses, say) makes
    the driver retry the group's commits one by one, so that only the commit that caused it
    fails.

Costs:
    A commit of one state with one label inserts a log row, a label row and a latest-label
    row, deletes its previous version's latest-label rows and upserts its ``fs_latest`` row
    (each one statement per table for the whole group); a group updates the head row once.
    Reads cost one round trip: a state by id or revision is a primary-key lookup; a page
    walks the log (no filter), one state's history (``id``, through the ``(id, rev)``
    index), ``fs_latest`` (``latest_only``) or the label postings of one pair per AND-map
    (those of latest versions only, in ``fs_latest_labels``, when ``latest_only``; the pair
    with the fewest postings, counted in one extra round trip, up to 1,024 each, when a map
    has several pairs), checking the other filters on each version by primary key. The
    latest-label rows that commits delete still cost a ``latest_only`` label page index reads
    until (auto)vacuum reclaims them. The head row is the one point of contention: a store
    commits one transaction at a time, and the lock is held until the transaction is
    durable, so with ``fsync`` on a store writes at most one transaction per flush of the
    WAL, across all its processes. Group commit is what spreads that cost: one
    process with 64 flows writes their 64 commits in one transaction, where 64 connections
    committing one state each would wait for 64 flushes in turn.

Failures:
    asyncpg and socket errors become ``DriverUnavailableError`` when the server cannot be
    reached or rolled the statement back for reasons that pass (connection lost, server
    shutting down or starting, too many connections, a cancelled statement, a serialization
    failure or deadlock) and ``DriverError`` otherwise, with the original chained. Reads, lease
    calls and ``open()`` retry unavailability within ``timeout``. A commit is retried only
    while no connection took it; once it has been sent, a lost connection leaves its outcome
    unknown and the caller gets ``DriverUnavailableError`` (a retry with the same expected
    revisions is safe: it conflicts if the first attempt was applied). PostgreSQL cannot
    store the NUL character in text: a state id, label, data alias or delay target holding
    one is refused with ``InvalidCommandError`` before anything is sent (so is a lease name
    or holder), and a read that asks for one finds nothing. The same goes for indexed text
    longer than ``MAX_INDEXED_BYTES`` (2,000 UTF-8 bytes): a state id, a label's key and
    value, a state id with a data alias, a lease name.

Watching:
    ``fs_commit`` ends with ``pg_notify`` on the store's channel (``flowstate:<schema>``) with
    the new head; PostgreSQL delivers it once the commit is visible. The first
    ``wait_for_rev`` opens one extra connection that listens on the channel for the driver's
    lifetime: notifications only wake waiters, the truth is in the log, which watchers read
    from their own revision on. After (re)connecting, the listener reads the head once, so
    nothing committed while it was away is missed; a dropped connection or a restarted server
    is reconnected with a backoff (up to one second between attempts), and while anyone waits
    the listener also reads the head every 5 seconds, which finds a connection that died
    silently. Commits made through the driver itself wake its waiters at once.

Leases:
    One row per lease name, claimed, renewed and released by single statements that compare
    ``expires_at`` with the server's clock (``now()``), so clients' clocks do not matter.
    Tokens come from a sequence and increase with every claim. Leases do not move the
    store's revision.

Durability:
    A commit is acknowledged once PostgreSQL has committed it, with the server's own
    ``synchronous_commit`` and ``fsync`` settings: with the defaults it survives a crash of
    the server or the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode

import asyncpg
import msgspec

from flowstate._checks import describe, is_number
from flowstate._lifecycle import Lifecycle, not_open, warn_unclosed
from flowstate._query import StatesPage, StatesQuery
from flowstate._state import State
from flowstate.drivers import _args
from flowstate.drivers.base import (
    CommitRequest,
    CommitResult,
    DelayedState,
    DelaysPage,
    Driver,
    Lease,
    RevisionWaiters,
    StateWrite,
    hide_password,
)
from flowstate.errors import (
    ClosedError,
    Conflict,
    ConflictError,
    DriverError,
    DriverUnavailableError,
    FlowstateError,
    InvalidCommandError,
    InvalidURLError,
    NotFoundError,
    SchemaVersionError,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from typing import Self

__all__ = ["SCHEMA_VERSION", "PostgresDriver"]

logger = logging.getLogger("flowstate.drivers.postgres")

T = TypeVar("T")

#: The schema version this release writes and reads (``fs_meta``).
SCHEMA_VERSION: Final = 2

DEFAULT_SCHEMA: Final = "flowstate"
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_POOL_SIZE: Final = 10

_SCHEMES = ("postgresql", "postgres")
# Query options that hold secrets: never shown.
_SECRET_OPTIONS = ("password", "sslpassword")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# PostgreSQL truncates longer identifiers; a truncated schema name would be another store's.
_MAX_IDENTIFIER = 63
# What one group commit may carry (writes, and bytes of encoded states and blobs).
_GROUP_WRITES = 1000
_GROUP_BYTES = 8 << 20
# Upper bound on the label postings counted to pick the most selective pair of an AND-map.
_PROBE_CAP = 1024
# The most label pairs a filter may hold in all for statements that name each pair (an EXISTS
# probe, or a count column, per pair): the cheapest form per candidate, but the server's
# planning of it grows faster than the number of pairs, and a select list holds at most 1,664
# columns. A larger filter hands each AND-map's pairs over as two arrays instead.
_NAMED_PAIRS = 16
# Retry pacing after a failure: from 25 ms, doubling, up to 1 s.
_MIN_BACKOFF = 0.025
_MAX_BACKOFF = 1.0
# While someone waits, the listener reads the head this often (finds silently dead links).
_LISTEN_CHECK = 5.0
# How long aclose() lets the connections close politely before cutting them.
_CLOSE_GRACE = 2.0
# The most a timeout may be (seconds), and the most connections a pool may hold: asyncpg
# sets up every slot of a pool at once.
_MAX_TIMEOUT = 3600.0
_MAX_POOL_SIZE = 1000

# SQLSTATE codes (and classes) of failures that pass: the statement was not run, or was
# rolled back, and the same call may succeed later.
_UNAVAILABLE_CLASSES = ("08",)  # connection exceptions
_PROTOCOL_VIOLATION = "08P01"
# OSErrors that no retry mends: a missing or unreadable file, a certificate refused.
_LOCAL_FAILURES = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ssl.SSLCertVerificationError,
)
_UNAVAILABLE_CODES = frozenset(
    {
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, or in recovery)
        "57014",  # query_canceled
        "53300",  # too_many_connections
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
    }
)


# -- SQL ---------------------------------------------------------------------------------------


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _channel(schema: str) -> str:
    """The notification channel of a store (a channel name is at most 63 bytes)."""
    channel = f"flowstate:{schema}"
    if len(channel.encode()) <= _MAX_IDENTIFIER:
        return channel
    return "flowstate:" + hashlib.sha256(schema.encode()).hexdigest()[:40]


_TABLES_DDL = """
CREATE TABLE {s}.fs_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE {s}.fs_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    rev bigint NOT NULL,
    at_ms bigint NOT NULL
);
INSERT INTO {s}.fs_head (rev, at_ms) VALUES (0, 0);
CREATE TABLE {s}.fs_log (
    rev bigint PRIMARY KEY,
    id text NOT NULL,
    committed_at bigint NOT NULL,
    state bytea NOT NULL
);
CREATE INDEX fs_log_id ON {s}.fs_log (id, rev);
CREATE TABLE {s}.fs_latest (
    id text PRIMARY KEY,
    rev bigint NOT NULL UNIQUE
);
CREATE TABLE {s}.fs_labels (
    key text NOT NULL,
    value text NOT NULL,
    rev bigint NOT NULL,
    PRIMARY KEY (key, value, rev)
);
CREATE TABLE {s}.fs_data (
    id text NOT NULL,
    alias text NOT NULL,
    rev bigint NOT NULL,
    blob bytea NOT NULL,
    PRIMARY KEY (id, alias, rev)
);
CREATE TABLE {s}.fs_delays (
    rev bigint PRIMARY KEY,
    to_flow text NOT NULL,
    due timestamptz NOT NULL
);
CREATE TABLE {s}.fs_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    token bigint NOT NULL,
    ttl double precision NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE SEQUENCE {s}.fs_lease_tokens;
"""

# The labels of latest versions only (schema version 2): what ``latest_only`` label filters
# walk. The index on rev finds the rows a commit drops.
_LATEST_LABELS_DDL = """
CREATE TABLE {s}.fs_latest_labels (
    key text NOT NULL,
    value text NOT NULL,
    rev bigint NOT NULL,
    PRIMARY KEY (key, value, rev)
);
CREATE INDEX fs_latest_labels_rev ON {s}.fs_latest_labels (rev);
"""

# CREATE OR REPLACE: migration 2 replaces version 1's function (same signature) in place, so
# processes of an older flowstate that still run call this one from then on.
_COMMIT_DDL = """
-- One call commits a group of commits: w_commit numbers the commit of each write (1, 2, ...;
-- ascending), the l_/d_/y_ arrays hold labels, data and delays by write number (1-based).
-- Returns the head after the call, the commit time, and per write the revision found in
-- fs_latest and the revision written (0 when its commit conflicted).
CREATE OR REPLACE FUNCTION {s}.fs_commit(
    w_commit integer[], w_id text[], w_expected bigint[], w_state bytea[],
    l_write integer[], l_key text[], l_value text[],
    d_write integer[], d_alias text[], d_blob bytea[],
    y_write integer[], y_to text[], y_due timestamptz[],
    OUT new_head bigint, OUT commit_ms bigint, OUT found_revs bigint[], OUT new_revs bigint[]
) LANGUAGE plpgsql AS $fn$
DECLARE
    old_head bigint;
    last_ms bigint;
BEGIN
    -- Commits wait here for the one before them to end: revisions are taken, and become
    -- visible, strictly in order. Every later statement sees what that commit wrote.
    SELECT h.rev, h.at_ms INTO old_head, last_ms FROM {s}.fs_head AS h FOR UPDATE;
    commit_ms := greatest(last_ms, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    WITH w AS (
        SELECT t.i, t.c, t.id, t.expected, t.state, coalesce(x.rev, 0) AS stored
        FROM unnest(w_commit, w_id, w_expected, w_state)
            WITH ORDINALITY AS t(c, id, expected, state, i)
        LEFT JOIN {s}.fs_latest AS x ON x.id = t.id
    ), ok AS (
        SELECT w.i, w.id, w.state, w.stored, old_head + row_number() OVER (ORDER BY w.i) AS rev
        FROM w
        WHERE w.c NOT IN (SELECT f.c FROM w AS f WHERE f.stored <> f.expected)
    ), put_log AS (
        INSERT INTO {s}.fs_log (rev, id, committed_at, state)
        SELECT ok.rev, ok.id, commit_ms, ok.state FROM ok
    ), put_latest AS (
        INSERT INTO {s}.fs_latest (id, rev)
        SELECT ok.id, ok.rev FROM ok
        ON CONFLICT (id) DO UPDATE SET rev = excluded.rev
    ), labels AS (
        SELECT l.k, l.v, ok.rev
        FROM unnest(l_write, l_key, l_value) AS l(i, k, v) JOIN ok ON ok.i = l.i
    ), put_labels AS (
        INSERT INTO {s}.fs_labels (key, value, rev) SELECT k, v, rev FROM labels
    ), drop_latest_labels AS (
        -- The versions the written states had are latest no more. An array, so that the
        -- rev index finds their rows whatever the planner guesses of the group's size.
        DELETE FROM {s}.fs_latest_labels AS z
        WHERE z.rev = ANY (ARRAY(SELECT ok.stored FROM ok WHERE ok.stored > 0))
    ), put_latest_labels AS (
        INSERT INTO {s}.fs_latest_labels (key, value, rev) SELECT k, v, rev FROM labels
    ), put_data AS (
        INSERT INTO {s}.fs_data (id, alias, rev, blob)
        SELECT ok.id, d.a, ok.rev, d.b
        FROM unnest(d_write, d_alias, d_blob) AS d(i, a, b) JOIN ok ON ok.i = d.i
    ), put_delays AS (
        INSERT INTO {s}.fs_delays (rev, to_flow, due)
        SELECT ok.rev, y.t, y.due
        FROM unnest(y_write, y_to, y_due) AS y(i, t, due) JOIN ok ON ok.i = y.i
    )
    SELECT coalesce(array_agg(w.stored ORDER BY w.i), '{{}}'),
           coalesce(array_agg(coalesce(ok.rev, 0) ORDER BY w.i), '{{}}'),
           coalesce(max(ok.rev), old_head)
    INTO found_revs, new_revs, new_head
    FROM w LEFT JOIN ok ON ok.i = w.i;
    IF new_head > old_head THEN
        UPDATE {s}.fs_head SET rev = new_head, at_ms = commit_ms;
        PERFORM pg_notify({channel}, new_head::text);
    END IF;
END
$fn$;
"""

_TIME_REV_DDL = """
-- The revision before the first version committed at or after threshold_ms. Commit times
-- never decrease along revisions, so this is a binary search over the log's primary key.
-- STABLE: every statement in it reads the snapshot of the query that calls it.
CREATE FUNCTION {s}.fs_time_rev(threshold_ms bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    low bigint := 1;
    high bigint;
    middle bigint;
    at_rev bigint;
    at_ms bigint;
BEGIN
    SELECT h.rev + 1 INTO high FROM {s}.fs_head AS h;
    WHILE low < high LOOP
        middle := (low + high) / 2;
        SELECT g.rev, g.committed_at INTO at_rev, at_ms
        FROM {s}.fs_log AS g WHERE g.rev >= middle ORDER BY g.rev LIMIT 1;
        IF NOT FOUND OR at_ms >= threshold_ms THEN
            high := middle;
        ELSE
            low := at_rev + 1;
        END IF;
    END LOOP;
    RETURN low - 1;
END
$fn$;
"""

_SCHEMA_DDL = (
    _TABLES_DDL
    + _LATEST_LABELS_DDL
    + _COMMIT_DDL
    + _TIME_REV_DDL
    + "INSERT INTO {s}.fs_meta (key, value) VALUES ('schema_version', {version});\n"
)

# What takes a store from the version before each key to that version, in the transaction of
# ``PostgresDriver._migrate``. Version 2 indexes the labels of the latest versions there are,
# and replaces the commit function with one that keeps that index up to date.
_MIGRATIONS: Final = {
    2: _LATEST_LABELS_DDL
    + """
INSERT INTO {s}.fs_latest_labels (key, value, rev)
SELECT l.key, l.value, l.rev FROM {s}.fs_labels AS l JOIN {s}.fs_latest AS x ON x.rev = l.rev;
"""
    + _COMMIT_DDL,
}


class _Sql:
    """The statements of one store, with its schema name filled in."""

    def __init__(self, schema: str) -> None:
        s = self.schema = _quote(schema)
        channel = _literal(_channel(schema))
        self.ddl = _SCHEMA_DDL.format(s=s, channel=channel, version=_literal(str(SCHEMA_VERSION)))
        self.migrations = {
            version: ddl.format(s=s, channel=channel) for version, ddl in _MIGRATIONS.items()
        }
        # See PostgresDriver._migrate.
        self.replace_head = (
            f"WITH old AS (DELETE FROM {s}.fs_head RETURNING one, rev, at_ms) "
            f"INSERT INTO {s}.fs_head (one, rev, at_ms) SELECT one, rev, at_ms FROM old"
        )
        self.set_version = f"UPDATE {s}.fs_meta SET value = $1 WHERE key = 'schema_version'"
        placeholders = ", ".join(f"${n}" for n in range(1, 14))
        self.commit = f"SELECT * FROM {s}.fs_commit({placeholders})"
        self.head = f"SELECT rev FROM {s}.fs_head"
        self.version = f"SELECT value FROM {s}.fs_meta WHERE key = 'schema_version'"
        self.state_latest = (
            f"SELECT l.rev, l.committed_at, l.state FROM {s}.fs_latest x "
            f"JOIN {s}.fs_log l ON l.rev = x.rev WHERE x.id = $1"
        )
        self.state_at = f"SELECT id, committed_at, state FROM {s}.fs_log WHERE rev = $1"
        self.data_latest = (
            f"SELECT rev, blob FROM {s}.fs_data WHERE id = $1 AND alias = $2 "
            "ORDER BY rev DESC LIMIT 1"
        )
        self.data_at = (
            f"SELECT rev, blob FROM {s}.fs_data WHERE id = $1 AND alias = $2 AND rev <= $3 "
            "ORDER BY rev DESC LIMIT 1"
        )
        self.delays = (
            f"SELECT d.rev, d.to_flow, d.due, l.committed_at, l.state FROM {s}.fs_delays d "
            f"JOIN {s}.fs_log l ON l.rev = d.rev WHERE d.rev > $1 ORDER BY d.rev LIMIT $2"
        )
        self.any_delay = f"SELECT EXISTS (SELECT 1 FROM {s}.fs_delays WHERE rev > $1)"
        self.acquire_lease = (
            f"INSERT INTO {s}.fs_leases AS l (name, holder, token, ttl, expires_at) "
            f"VALUES ($1, $2, nextval('{s}.fs_lease_tokens'), $3, "
            "now() + make_interval(secs => $3)) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = excluded.token, "
            "ttl = excluded.ttl, expires_at = excluded.expires_at "
            "WHERE l.expires_at <= now() OR l.holder = excluded.holder "
            "RETURNING l.token"
        )
        self.renew_lease = (
            f"UPDATE {s}.fs_leases SET expires_at = now() + make_interval(secs => ttl) "
            "WHERE name = $1 AND token = $2 AND expires_at > now() RETURNING token"
        )
        # The row stays (expired), so that tokens keep increasing across claims.
        self.release_lease = (
            f"UPDATE {s}.fs_leases SET expires_at = '-infinity' WHERE name = $1 AND token = $2"
        )
        self.get_lease = (
            f"SELECT holder, token, ttl FROM {s}.fs_leases WHERE name = $1 AND expires_at > now()"
        )
        self.probe = (
            f"(SELECT count(*) FROM (SELECT 1 FROM {s}.fs_labels WHERE key = {{}} "
            f"AND value = {{}} AND rev > {{}} LIMIT {_PROBE_CAP}) p)"
        )
        self.probe_latest = self.probe.replace(".fs_labels ", ".fs_latest_labels ")
        # The same count for each pair of the arrays $1 (keys) and $2 (values), a row per
        # pair in array order: one statement of the same text, whatever the number of pairs.
        self.probe_arrays = (
            f"SELECT (SELECT count(*) FROM (SELECT 1 FROM {s}.fs_labels l WHERE l.key = q.key "
            f"AND l.value = q.value AND l.rev > $3 LIMIT {_PROBE_CAP}) p) "
            "FROM unnest($1::text[], $2::text[]) WITH ORDINALITY q(key, value, n) ORDER BY q.n"
        )
        self.probe_arrays_latest = self.probe_arrays.replace(".fs_labels ", ".fs_latest_labels ")


class _Params:
    """Positional parameters of a statement being built: ``add`` returns the placeholder."""

    def __init__(self) -> None:
        self.values: list[object] = []

    def add(self, value: object, cast_to: str = "") -> str:
        self.values.append(value)
        return f"${len(self.values)}{cast_to}"


def _named(leads: list[list[tuple[str, str]]]) -> bool:
    """True when a label filter is small enough for statements that name each of its pairs
    (see :data:`_NAMED_PAIRS`)."""
    return sum(len(pairs) for pairs in leads) <= _NAMED_PAIRS


def _page_sql(
    s: str, query: StatesQuery, leads: list[list[tuple[str, str]]]
) -> tuple[str, list[object]]:
    """One statement (one snapshot) reading a page of ``query`` and the head revision.

    The candidates come from one index walk per AND-map (or one state's history); every other
    filter is an ``EXISTS`` probe of a primary key or unique index on each candidate. ``OFFSET
    0`` in those probes keeps PostgreSQL from turning them into joins that read a whole
    posting list: the cost of a page stays that of the candidates it looks at. A filter of
    more than :data:`_NAMED_PAIRS` pairs checks each AND-map's pairs with one probe per
    candidate, over two arrays, instead of one per pair (see ``holds_all``). A
    ``latest_only`` label filter walks and probes ``fs_latest_labels``, which holds latest
    versions only: versions that are latest no more cost it nothing, however long the history.

    ``leads`` holds each AND-map's pairs, the one to walk first. Returns the SQL and its
    parameters; the rows are ``(head, rev, committed_at, state)``, with one row of NULLs but
    the head when the page is empty.
    """
    p = _Params()
    named = _named(leads)
    start = p.add(query.since_rev, "::bigint")
    if query.since_time is not None:
        start = f"greatest({start}, {s}.fs_time_rev({p.add(_ceil_ms(query.since_time))}::bigint))"

    def arms(since: str, descending: bool, limit: str) -> str:
        """The matching revisions after ``since``, first ``limit`` in revision order."""
        order = "DESC" if descending else ""
        if query.id is not None:
            return history(since, order, limit)
        if not leads:
            table = f"{s}.fs_latest" if query.latest_only else f"{s}.fs_log"
            return f"SELECT rev FROM {table} WHERE rev > {since} ORDER BY rev {order} LIMIT {limit}"
        labels = f"{s}.fs_latest_labels" if query.latest_only else f"{s}.fs_labels"
        selects = []
        for pairs in leads:
            (key, value), others = pairs[0], pairs[1:]
            sql = [
                (
                    f"(SELECT a.rev FROM {labels} a WHERE a.key = {p.add(key)} "
                    f"AND a.value = {p.add(value)} AND a.rev > {since}"
                )
            ]
            if not named and others:
                sql.append(f" AND {holds_all(labels, 'a.rev', others)}")
            elif named:
                for n, (other_key, other_value) in enumerate(others):
                    sql.append(
                        f" AND EXISTS (SELECT 1 FROM {labels} b{n} WHERE b{n}.key = "
                        f"{p.add(other_key)} AND b{n}.value = {p.add(other_value)} "
                        f"AND b{n}.rev = a.rev OFFSET 0)"
                    )
            sql.append(f" ORDER BY a.rev {order} LIMIT {limit})")
            selects.append("".join(sql))
        if len(selects) == 1:
            return selects[0]
        return f"SELECT rev FROM ({' UNION '.join(selects)}) u ORDER BY rev {order} LIMIT {limit}"

    def holds_all(labels: str, rev: str, pairs: list[tuple[str, str]]) -> str:
        """The condition of a large filter that the version at ``rev`` has every pair of
        ``pairs`` (in ``labels``): one probe per candidate, over two arrays, that looks for a
        pair the version lacks, pair by pair through the primary key, and stops at the first.
        Its text stays the same size however many pairs there are."""
        keys = p.add([key for key, _ in pairs], "::text[]")
        values = p.add([value for _, value in pairs], "::text[]")
        return (
            f"NOT EXISTS (SELECT 1 FROM unnest({keys}, {values}) o(key, value) WHERE NOT EXISTS "
            f"(SELECT 1 FROM {labels} b WHERE b.key = o.key AND b.value = o.value "
            f"AND b.rev = {rev} OFFSET 0) OFFSET 0)"
        )

    def history(since: str, order: str, limit: str) -> str:
        """One state's versions: its own history drives, the other filters are checked on
        each version by primary key (``OFFSET 0`` keeps the planner from turning it around;
        the scan still stops at ``limit``)."""
        versions = (
            f"(SELECT rev FROM {s}.fs_log WHERE id = {p.add(query.id)} AND rev > {since} "
            f"ORDER BY rev {order} OFFSET 0) g"
        )
        conditions = ["true"]
        if leads:
            maps = [
                " AND ".join(
                    f"EXISTS (SELECT 1 FROM {s}.fs_labels b WHERE b.key = {p.add(key)} "
                    f"AND b.value = {p.add(value)} AND b.rev = g.rev OFFSET 0)"
                    for key, value in pairs
                )
                if named
                else holds_all(f"{s}.fs_labels", "g.rev", pairs)
                for pairs in leads
            ]
            conditions.append("(" + " OR ".join(f"({m})" for m in maps) + ")")
        if query.latest_only:
            conditions.append(
                f"EXISTS (SELECT 1 FROM {s}.fs_latest x WHERE x.rev = g.rev OFFSET 0)"
            )
        return (
            f"SELECT g.rev FROM {versions} WHERE {' AND '.join(conditions)} "
            f"ORDER BY g.rev {order} LIMIT {limit}"
        )

    ctes = [f"b AS (SELECT {start} AS since)"]
    since = "(SELECT since FROM b)"
    if query.since_latest:
        if leads or query.latest_only or query.id is not None:
            last = f"(SELECT max(rev) FROM ({arms(since, True, '1')}) z)"
        else:
            last = f"(SELECT CASE WHEN h.rev > {since} THEN h.rev END FROM {s}.fs_head h)"
        ctes.append(f"c AS (SELECT {last} - 1 AS since)")
        since = "(SELECT since FROM c)"
    limit = p.add(query.limit + 1, "::bigint")
    ctes.append(f"m AS ({arms(since, False, limit)})")
    sql = (
        f"WITH {', '.join(ctes)} "
        f"SELECT h.rev AS head, l.rev, l.committed_at, l.state FROM {s}.fs_head h "
        f"LEFT JOIN (m JOIN {s}.fs_log l ON l.rev = m.rev) ON true ORDER BY l.rev"
    )
    return sql, p.values


# -- values --------------------------------------------------------------------------------------


def _from_ms(ms: int) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(milliseconds=ms)


def _ceil_ms(moment: datetime.datetime) -> int:
    """The first whole millisecond at or after ``moment`` (stored times are whole ms)."""
    micros = (moment - _EPOCH) // datetime.timedelta(microseconds=1)
    return -(-micros // 1000)


def _utc(moment: datetime.datetime) -> datetime.datetime:
    """An aware datetime (naive ones are taken as UTC, as the other drivers do)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


class _Write(NamedTuple):
    """One state write, encoded on the event loop before it joins a group."""

    id: str
    expected_rev: int
    state: bytes
    labels: list[tuple[str, str]]
    data: list[tuple[str, bytes]]
    delay_to: str
    delay_at: datetime.datetime | None


class _Pending:
    """A commit waiting for (or in) a group."""

    __slots__ = ("fut", "ids", "size", "writes")

    def __init__(self, writes: list[_Write], fut: asyncio.Future[CommitResult]) -> None:
        self.writes = writes
        self.fut = fut
        self.ids = {w.id for w in writes}
        self.size = sum(len(w.state) + sum(len(b) for _, b in w.data) for w in writes)


# -- errors --------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc)
    if sqlstate:
        return f"{text or type(exc).__name__} ({sqlstate})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _passes(exc: BaseException) -> bool:
    """True for failures that say nothing about the request itself: the server could not be
    reached, or rolled the statement back for a reason that passes."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError) and isinstance(sqlstate, str):
        if sqlstate == _PROTOCOL_VIOLATION:
            return False  # what the client sent (a connection option, say) is wrong
        return sqlstate in _UNAVAILABLE_CODES or sqlstate.startswith(_UNAVAILABLE_CLASSES)
    if isinstance(exc, _LOCAL_FAILURES):
        return False  # a file the URL names (sslrootcert, sslcert...) or a certificate
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return False  # the URL asks for TLS (sslmode=require...), which the server lacks
    if isinstance(exc, asyncpg.InternalClientError):
        # A connection whose protocol asyncpg cannot go on with, as after a server's fast
        # shutdown ("cannot switch to state ..."): the connection is cut, a new one works.
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # asyncpg's word for a connection that closed under the call.
        return "closed" in str(exc) and "pool" not in str(exc)
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def _copy_error(error: FlowstateError) -> FlowstateError:
    """A fresh instance of a group-wide error for each waiting commit, so that raising it in
    several tasks does not pile their tracebacks onto one object.
    """
    try:
        clone = type(error)(*error.args)
    except TypeError:
        return error
    clone.__cause__ = error.__cause__
    return clone


def _settle(fut: asyncio.Future[T], value: T | None, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled; the outcome is dropped
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(cast("T", value))


#: The most UTF-8 bytes one index row holds of a state id, of a label's key and value
#: together, of a state id and a data alias together, and of a lease name (a PostgreSQL
#: B-tree row holds at most 2,704 bytes; the rest is the row's own overhead, and a margin).
MAX_INDEXED_BYTES: Final = 2000


def _size(*texts: str) -> int:
    """The UTF-8 bytes ``texts`` take together in an index row."""
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


def _check_text(write: StateWrite) -> None:
    """Refuse, before anything is sent, what PostgreSQL cannot store: text holding NUL, and
    indexed text longer than :data:`MAX_INDEXED_BYTES`."""
    state = write.state
    texts = [state.id, write.delay_to, *state.labels, *state.labels.values()]
    if write.data:
        texts += write.data
    joined = "".join(texts)
    if len(joined) > MAX_INDEXED_BYTES // 4:  # may be too long: check each index row
        _check_indexed(write)
    if "\x00" not in joined:
        return
    for what, text in [
        ("state id", state.id),
        ("delay target", write.delay_to),
        *(("label", text) for pair in state.labels.items() for text in pair),
        *(("data alias", alias) for alias in write.data or ()),
    ]:
        if "\x00" in text:
            raise InvalidCommandError(
                f"state {state.id!r}: the {what} {text!r} holds a NUL character, which "
                "PostgreSQL cannot store"
            )


def _check_indexed(write: StateWrite) -> None:
    state = write.state
    shown = describe(state.id)
    rows = [(f"state id {shown}", state.id, "")]
    rows += [
        (f"state {shown}: the label {describe(key)} (key and value)", key, value)
        for key, value in state.labels.items()
    ]
    rows += [
        (f"state {shown}: the data alias {describe(alias)} (with the state id)", state.id, alias)
        for alias in write.data or ()
    ]
    for what, one, other in rows:
        size = _size(one, other)
        if size > MAX_INDEXED_BYTES:
            raise InvalidCommandError(
                f"{what} takes {size} bytes, more than the {MAX_INDEXED_BYTES} that a "
                "PostgreSQL store indexes"
            )


def _check_lease_name(name: str) -> None:
    """Refuse, before anything is sent, a lease name longer than :data:`MAX_INDEXED_BYTES`
    (the primary key of ``fs_leases``; a holder is not indexed)."""
    size = _size(name)
    if size > MAX_INDEXED_BYTES:
        raise InvalidCommandError(
            f"the lease name {describe(name)} takes {size} bytes, more than the "
            f"{MAX_INDEXED_BYTES} that a PostgreSQL store indexes"
        )


def _claimable(name: str) -> bool:
    """False for a lease name no claim can hold here: NUL, or too long to index."""
    return "\x00" not in name and _size(name) <= MAX_INDEXED_BYTES


def _holds_nul(labels: dict[str, str]) -> bool:
    return any("\x00" in key or "\x00" in value for key, value in labels.items())


async def _no_reset(connection: Any) -> None:
    """The pool's reset between uses: flowstate changes no session state, so there is nothing
    to undo (asyncpg's default costs a round trip per use; an open transaction is still rolled
    back by asyncpg itself)."""


# -- the driver ----------------------------------------------------------------------------------


class PostgresDriver(Driver):
    """Stores states in a PostgreSQL schema, shared by any number of processes.

    Args:
        dsn: A libpq-style connection URL without flowstate's options
            (``postgresql://user@host:port/database?sslmode=...``).
        schema: The store's schema (created on first use).
        timeout: The time budget of one call in seconds, retries included.
        pool_size: The most connections used at once for reads and lease calls (commits and
            the listener of ``wait_for_rev`` have a connection each of their own).
        connect_timeout: Seconds to establish one connection (default: ``timeout``).
        create: Create the store's schema when it does not exist (the default); when False,
            ``open()`` fails on a missing store instead (readers such as ``flowstate states``
            never create a store).

    Raises:
        InvalidURLError: An option is invalid.

    Use it from the event loop that opened it. See the module docstring for the schema,
    revisions, failures and watching.
    """

    scheme = "postgresql"

    def __init__(
        self,
        dsn: str = "postgresql://localhost/postgres",
        *,
        schema: str = DEFAULT_SCHEMA,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float | None = None,
        create: bool = True,
    ) -> None:
        given: object = dsn  # checked as a plain object: callers may pass anything
        if not isinstance(given, str) or given.partition("://")[0].lower() not in _SCHEMES:
            raise InvalidURLError("the PostgreSQL driver needs a postgresql:// URL")
        _check_netloc(dsn)
        _check_no_password(dsn)
        name: object = schema
        if not isinstance(name, str) or not name:
            raise InvalidURLError("the schema name is empty")
        if "\x00" in schema or len(schema.encode()) > _MAX_IDENTIFIER:
            raise InvalidURLError(
                f"the schema name {schema!r} must be at most {_MAX_IDENTIFIER} bytes, "
                "without NUL characters"
            )
        for key, seconds in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if seconds is not None and (
                not is_number(seconds, strict=True) or seconds > _MAX_TIMEOUT
            ):
                raise InvalidURLError(
                    f"{key} must be a number of seconds above 0 and at most "
                    f"{_MAX_TIMEOUT:g}, not {seconds!r}"
                )
        if type(pool_size) is not int or not 1 <= pool_size <= _MAX_POOL_SIZE:
            raise InvalidURLError(
                f"pool_size must be an int from 1 to {_MAX_POOL_SIZE}, not {pool_size!r}"
            )
        self._dsn = dsn
        self.schema = schema
        self.timeout = float(timeout)
        self.pool_size = pool_size
        self.connect_timeout = float(connect_timeout) if connect_timeout else self.timeout
        self.create = create
        self._sql = _Sql(schema)
        self._channel = _channel(schema)
        self._lifecycle = Lifecycle.UNOPENED
        self._open_lock = asyncio.Lock()
        self._pool: Any = None
        self._waiters = RevisionWaiters()
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task_group: asyncio.TaskGroup | None = None
        self._committer: asyncio.Task[None] | None = None
        self._commit_conn: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task[Any]] = set()
        self._watch_wanted = asyncio.Event()
        self._encoder = msgspec.msgpack.Encoder()
        self._state_decoder = msgspec.msgpack.Decoder(State)

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Create an unopened driver from a ``postgresql://`` URL (see the module docstring).

        Raises:
            InvalidURLError: The URL is not a valid PostgreSQL driver URL.
        """
        shown = _shown(url)
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in _SCHEMES:
            raise InvalidURLError(f"{shown!r} is not a postgresql:// URL")
        if "#" in rest:
            raise InvalidURLError(f"{shown!r}: a PostgreSQL URL has no fragment")
        location, _, query = rest.partition("?")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise InvalidURLError(f"{shown!r}: malformed query string ({exc})") from None
        options: dict[str, Any] = {}
        kept = []
        for key, value in pairs:
            if key == "schema":
                options[key] = value
            elif key in ("timeout", "connect_timeout"):
                options[key] = _args.url_number(shown, key, value, " of seconds")
            elif key == "pool_size":
                options[key] = _args.url_count(shown, key, value)
            else:
                kept.append((key, value))
        dsn = f"postgresql://{location}" + (f"?{urlencode(kept)}" if kept else "")
        try:
            return cls(dsn, **options)
        except InvalidURLError as exc:
            raise InvalidURLError(f"{shown!r}: {exc}") from None

    @property
    def url(self) -> str:
        """The driver's URL with its options (an ``sslpassword`` hidden)."""
        location, _, query = self._dsn.partition("?")
        options = [("schema", self.schema), *parse_qsl(query, keep_blank_values=True)]
        return _shown(f"{location}?{urlencode(options)}")

    def __repr__(self) -> str:
        return f"PostgresDriver({self.url!r}, {self._lifecycle.name.lower()})"

    def __del__(self) -> None:
        if getattr(self, "_lifecycle", None) is not Lifecycle.OPENED:
            return
        warn_unclosed(self)

    # -- lifecycle -------------------------------------------------------------------------

    def _check(self) -> None:
        if self._lifecycle is not Lifecycle.OPENED:
            raise not_open(self._lifecycle, "the PostgreSQL driver")

    async def open(self) -> None:
        """Connect, create or check the store's schema and start the committer.

        Raises:
            ClosedError: The driver was closed.
            SchemaVersionError: The schema was written by a newer flowstate.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise (authentication, permissions), the
                schema holds tables flowstate did not create, or it holds no store and
                ``create`` is False.
        """
        async with self._open_lock:
            if self._lifecycle is Lifecycle.CLOSED:
                raise ClosedError("the PostgreSQL driver is closed and cannot be reopened")
            if self._lifecycle is Lifecycle.OPENED:
                return
            deadline = self._deadline()
            try:
                self._pool = await self._retry("connect", self._create_pool, deadline)
                head = await self._retry("open", self._setup, deadline)
                self._waiters.advance(head)
                task_group = asyncio.TaskGroup()
                await task_group.__aenter__()
                self._task_group = task_group
                self._committer = task_group.create_task(self._run_committer())
                self._listener = task_group.create_task(self._run_listener())
            except BaseException:
                await self._shutdown()
                raise
            self._lifecycle = Lifecycle.OPENED

    def _connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"dsn": self._dsn, "timeout": self.connect_timeout}
        query = self._dsn.partition("?")[2]
        if not any(key == "application_name" for key, _ in parse_qsl(query)):
            # What pg_stat_activity shows for the driver's connections, unless the URL says.
            args["server_settings"] = {"application_name": "flowstate"}
        return args

    async def _connect(self) -> Any:
        return await self._open(asyncpg.connect(**self._connect_args()))

    async def _pool_connect(self, *args: Any, **kwargs: Any) -> Any:
        """How the pool opens its connections (see :meth:`_open`)."""
        return await self._open(asyncpg.connect(*args, **kwargs))

    async def _open(self, connecting: Coroutine[Any, Any, Any]) -> Any:
        """The connection ``connecting`` makes, in a task of its own that is never cut short.

        A caller cancelled (or timed out) while the connection opens gets its
        ``CancelledError`` at once; the handshake carries on (bounded by
        ``connect_timeout``) and the connection it makes is closed. Cutting asyncpg's
        handshake in the middle leaves an error in a future nobody reads, which asyncio
        reports as an unhandled exception.
        """
        task = asyncio.get_running_loop().create_task(connecting)
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_unclaimed)
            raise

    async def _create_pool(self) -> Any:
        pool = asyncpg.create_pool(
            **self._connect_args(),
            connect=self._pool_connect,
            # Connections open as calls need them: a pool that keeps a floor reconnects on
            # its own during an outage, and logs a traceback for every failed attempt.
            min_size=0,
            max_size=self.pool_size,
            reset=_no_reset,
        )
        try:
            return await pool
        except BaseException:
            pool.terminate()
            raise

    async def _setup(self) -> int:
        """Check, create or migrate the schema; return the head revision."""
        async with self._pool.acquire() as conn:
            version = await self._schema_version(conn)
            if version is None or version < SCHEMA_VERSION:
                async with conn.transaction():
                    # Processes opening a new or older store together create or migrate it
                    # once: the others find it done when they get the lock.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1))", f"flowstate:{self.schema}"
                    )
                    version = await self._schema_version(conn)
                    if version is None:
                        if not self.create:
                            raise DriverError(
                                f"no flowstate store in schema {self.schema!r} of {self._where()}"
                            )
                        await self._create_schema(conn)
                    elif version < SCHEMA_VERSION:
                        await self._migrate(conn, version)
            head: int = await conn.fetchval(self._sql.head)
            return head

    async def _schema_version(self, conn: Any) -> int | None:
        """The schema's version, None when the schema is new (absent or empty)."""
        row = await conn.fetchrow(
            "SELECT n.oid IS NOT NULL AS present, "
            "to_regclass(format('%I.fs_meta', $1::text)) IS NOT NULL AS ours, "
            "(SELECT count(*) FROM pg_class c WHERE c.relnamespace = n.oid) AS objects "
            "FROM (SELECT 1) one LEFT JOIN pg_namespace n ON n.nspname = $1",
            self.schema,
        )
        if not row["ours"]:
            if row["objects"]:
                raise DriverError(
                    f"schema {self.schema!r} is not a flowstate store: it already holds "
                    "tables that flowstate did not create"
                )
            return None
        raw = await conn.fetchval(self._sql.version)
        try:
            version = int(raw)
        except (TypeError, ValueError):
            raise DriverError(
                f"schema {self.schema!r} is not a flowstate store (schema_version {raw!r})"
            ) from None
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema {self.schema!r} was written by a newer flowstate (schema version "
                f"{version}; this flowstate reads up to version {SCHEMA_VERSION}): upgrade "
                "flowstate to open it"
            )
        return version

    async def _create_schema(self, conn: Any) -> None:
        exists = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", self.schema
        )
        if not exists:
            await conn.execute(f"CREATE SCHEMA {self._sql.schema}")
        await conn.execute(self._sql.ddl)
        logger.info("created flowstate schema %r (version %d)", self.schema, SCHEMA_VERSION)

    async def _migrate(self, conn: Any, version: int) -> None:
        """Take the schema from ``version`` to :data:`SCHEMA_VERSION`, in the caller's
        transaction (which holds the store's advisory lock).

        The head row is deleted and put back first. That waits for the commit in progress and
        holds every later one until the migration commits, so none can slip between the
        migration's reads and its end. It also stops a commit of an older flowstate that is
        already waiting for the head row when the migration starts: such a call runs the
        commit function it started with, which knows nothing of the new tables, and would
        leave them out of date; finding the row gone, it fails and writes nothing (PostgreSQL
        refuses its revisions, which are NULL). Calls made after the migration run the new
        function, whatever flowstate made them.
        """
        await conn.execute(self._sql.replace_head)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute(self._sql.migrations[target])
        await conn.execute(self._sql.set_version, str(SCHEMA_VERSION))
        logger.info(
            "migrated flowstate schema %r from version %d to %d",
            self.schema,
            version,
            SCHEMA_VERSION,
        )

    async def aclose(self) -> None:
        """Write the commits already accepted, stop listening and close the connections.

        Calling it again does nothing. Waiters in :meth:`wait_for_rev` get ``ClosedError``.
        """
        if self._lifecycle is Lifecycle.CLOSED:
            return
        self._lifecycle = Lifecycle.CLOSED
        self._waiters.close(ClosedError("the PostgreSQL driver was closed"))
        try:
            committer = self._committer
            if committer is not None and not committer.done():
                self._closing = True
                self._wakeup.set()
                # The accepted commits are written; each group is bounded by the timeout.
                await asyncio.wait({committer}, timeout=self.timeout + _CLOSE_GRACE)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Cancel the background tasks and close every connection."""
        for task in (self._committer, self._listener):
            if task is not None:
                task.cancel()
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            await task_group.__aexit__(None, None, None)
        self._committer = self._listener = None
        for pending in self._queue:
            _settle(pending.fut, None, ClosedError("the PostgreSQL driver was closed"))
        self._queue.clear()
        conn, self._commit_conn = self._commit_conn, None
        if conn is not None:
            await _close(conn)
        pool, self._pool = self._pool, None
        if pool is not None:
            await _close(pool)
        if self._connecting:
            # Connections still opening for cancelled callers close as they finish.
            await asyncio.wait(set(self._connecting), timeout=self.connect_timeout + _CLOSE_GRACE)

    # -- calls, errors and retries ---------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _deadline(self) -> float:
        return self._now() + self.timeout

    def _error(self, what: str, exc: BaseException) -> FlowstateError:
        """The flowstate error for a failure of ``what``."""
        if isinstance(exc, FlowstateError):
            return exc
        if self._lifecycle is Lifecycle.CLOSED and isinstance(exc, asyncpg.InterfaceError):
            return ClosedError("the PostgreSQL driver was closed")
        if _passes(exc):
            return DriverUnavailableError(
                f"PostgreSQL at {self._where()} is unavailable ({what}, {self.timeout}s): "
                f"{_describe(exc)}"
            )
        return DriverError(f"PostgreSQL {what} failed: {_describe(exc)}")

    def _where(self) -> str:
        """The server's ``host:port`` (never the credentials), for messages."""
        return _netloc(self._dsn) or "localhost"

    async def _pause(self, attempt: int, deadline: float) -> None:
        delay = min(_MAX_BACKOFF, _MIN_BACKOFF * 2 ** (attempt - 1), deadline - self._now())
        if delay > 0:
            await asyncio.sleep(delay)

    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]], deadline: float) -> T:
        """Run ``fn()`` until it succeeds, retrying failures that pass until ``deadline``."""
        attempt = 0
        failure: Exception | None = None  # the last failure that was retried
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await fn()
            except FlowstateError:
                raise
            except Exception as exc:
                if (
                    failure is not None
                    and isinstance(exc, TimeoutError)
                    and self._now() >= deadline
                ):
                    # The deadline cut a retry short: what made it retry says more.
                    exc = failure
                error = self._error(what, exc)
                if not isinstance(error, DriverUnavailableError) or self._now() >= deadline:
                    raise error from exc
                failure = exc
            attempt += 1
            await self._pause(attempt, deadline)

    async def _read(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(connection)`` on a pooled connection, with retries (see :meth:`_retry`)."""
        self._check()
        pool = self._pool

        async def call() -> T:
            async with pool.acquire() as conn:
                try:
                    return await fn(conn)
                except asyncpg.InternalClientError:
                    conn.terminate()  # unusable: the pool opens another
                    raise

        return await self._retry(what, call, self._deadline())

    # -- commits ---------------------------------------------------------------------------

    async def commit(self, request: CommitRequest) -> CommitResult:
        """Write every state of ``request`` atomically, if every ``expected_rev`` matches.

        Concurrent commits are written together in one transaction (group commit); each one
        still succeeds or conflicts on its own.

        Raises:
            ConflictError: Some state's latest revision differed from ``expected_rev``; it
                lists every such state, and nothing was written.
            InvalidCommandError: A state id, label, data alias or delay target holds a NUL
                character, or a state id, a label (key and value) or a state id with a data
                alias takes more than :data:`MAX_INDEXED_BYTES` bytes; nothing was sent.
            ClosedError: The driver is not open, or :meth:`aclose` gave up waiting for this
                commit to be written (it may or may not have been applied).
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``, or
                the connection was lost while committing. The commit may or may not have been
                applied; a retry with the same expected revisions is safe (it conflicts if
                the first attempt was applied).
            DriverError: PostgreSQL failed otherwise; nothing was written.
        """
        self._check()
        writes = [self._prepare(write) for write in request.writes]
        fut: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(writes, fut))
        self._wakeup.set()
        return await fut

    def _prepare(self, write: StateWrite) -> _Write:
        _check_text(write)
        state = write.state
        blob = self._encoder.encode(msgspec.structs.replace(state, rev=0, committed_at=None))
        data = [(alias, bytes(raw)) for alias, raw in write.data.items()] if write.data else []
        delay_at = write.delay_at
        return _Write(
            state.id,
            write.expected_rev,
            blob,
            list(state.labels.items()),
            data,
            write.delay_to,
            None if delay_at is None else _utc(delay_at),
        )

    async def _run_committer(self) -> None:
        """Send the queued commits, a group at a time, until the driver closes."""
        while True:
            group = self._next_group()
            if group:
                await self._send(group)
            elif self._closing:
                return
            else:
                self._wakeup.clear()
                await self._wakeup.wait()

    def _next_group(self) -> list[_Pending]:
        """Take the next group from the queue: commits on distinct states, within the caps."""
        group: list[_Pending] = []
        ids: set[str] = set()
        writes = size = 0
        held: list[_Pending] = []
        queue = self._queue
        while queue:
            pending = queue.popleft()
            if pending.fut.done():
                continue  # its caller was cancelled before it was sent
            n = len(pending.writes)
            if group and (writes + n > _GROUP_WRITES or size + pending.size > _GROUP_BYTES):
                queue.appendleft(pending)
                break
            if not ids.isdisjoint(pending.ids):
                held.append(pending)  # the next group checks it against this one's result
                continue
            group.append(pending)
            ids |= pending.ids
            writes += n
            size += pending.size
        queue.extendleft(reversed(held))
        return group

    async def _send(self, group: list[_Pending]) -> None:
        """Write one group and settle every commit in it (when :meth:`aclose` cuts the write
        short too: those commits may or may not have been applied)."""
        try:
            await self._write_and_settle(group)
        except BaseException:
            closed = ClosedError(
                "the PostgreSQL driver was closed while the commit was being written; it may "
                "or may not have been applied"
            )
            for pending in group:
                _settle(pending.fut, None, _copy_error(closed))
            raise

    async def _write_and_settle(self, group: list[_Pending]) -> None:
        try:
            outcomes = await self._write_group(group)
        except FlowstateError as exc:
            if len(group) > 1 and not isinstance(exc, DriverUnavailableError):
                # Something in the group made the server refuse it (and roll it back): send
                # the commits one by one, so that only the one that caused it fails.
                for pending in group:
                    await self._send([pending])
                return
            for pending in group:
                _settle(pending.fut, None, _copy_error(exc))
            return
        except Exception as exc:  # a bug: fail the group, keep the committer alive
            logger.exception("the PostgreSQL commit group failed")
            error = DriverError(f"the PostgreSQL commit failed: {_describe(exc)}")
            error.__cause__ = exc
            for pending in group:
                _settle(pending.fut, None, _copy_error(error))
            return
        for pending, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, ConflictError):
                _settle(pending.fut, None, outcome)
            else:
                _settle(pending.fut, outcome, None)

    def _drop_commit_connection(self) -> None:
        """Cut the committer's connection (its state is unknown); the next group reconnects."""
        conn, self._commit_conn = self._commit_conn, None
        if conn is not None:
            conn.terminate()

    async def _write_group(self, group: list[_Pending]) -> list[CommitResult | ConflictError]:
        w_commit: list[int] = []
        w_id: list[str] = []
        w_expected: list[int] = []
        w_state: list[bytes] = []
        l_write: list[int] = []
        l_key: list[str] = []
        l_value: list[str] = []
        d_write: list[int] = []
        d_alias: list[str] = []
        d_blob: list[bytes] = []
        y_write: list[int] = []
        y_to: list[str] = []
        y_due: list[datetime.datetime] = []
        i = 0
        for c, pending in enumerate(group, 1):
            for write in pending.writes:
                i += 1
                w_commit.append(c)
                w_id.append(write.id)
                w_expected.append(write.expected_rev)
                w_state.append(write.state)
                for key, value in write.labels:
                    l_write.append(i)
                    l_key.append(key)
                    l_value.append(value)
                for alias, blob in write.data:
                    d_write.append(i)
                    d_alias.append(alias)
                    d_blob.append(blob)
                if write.delay_at is not None:
                    y_write.append(i)
                    y_to.append(write.delay_to)
                    y_due.append(write.delay_at)
        args = (
            *(w_commit, w_id, w_expected, w_state),
            *(l_write, l_key, l_value, d_write, d_alias, d_blob, y_write, y_to, y_due),
        )
        deadline = self._deadline()
        # Retried only while no connection took the commit: once it was sent, its outcome
        # is unknown when the connection fails.
        conn = self._commit_conn
        if conn is None or conn.is_closed():
            self._commit_conn = None
            conn = self._commit_conn = await self._retry("commit", self._connect, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                row = await conn.fetchrow(self._sql.commit, *args)
        except Exception as exc:
            error = self._error("commit", exc)
            if isinstance(error, DriverUnavailableError):
                self._drop_commit_connection()  # in an unknown state: start afresh
            raise error from exc
        except BaseException:
            self._drop_commit_connection()  # cancelled mid-call: in an unknown state
            raise
        head, at_ms, found, revs = row
        self._waiters.advance(head)
        committed_at = _from_ms(at_ms)
        outcomes: list[CommitResult | ConflictError] = []
        start = 0
        for pending in group:
            end = start + len(pending.writes)
            mine = revs[start:end]
            if all(mine):
                outcomes.append(CommitResult(revs=list(mine), committed_at=committed_at))
            else:
                conflicts = [
                    Conflict(w.id, w.expected_rev, actual)
                    for w, actual in zip(pending.writes, found[start:end], strict=True)
                    if actual != w.expected_rev
                ]
                outcomes.append(ConflictError(conflicts))
            start = end
        return outcomes

    # -- reads -----------------------------------------------------------------------------

    def _decode(self, rev: int, committed_at: int, blob: bytes) -> State:
        try:
            state = self._state_decoder.decode(blob)
        except msgspec.DecodeError as exc:
            raise DriverError(
                f"revision {rev} of schema {self.schema!r} holds a state flowstate cannot "
                f"read: {exc}"
            ) from exc
        state.rev = rev
        state.committed_at = _from_ms(committed_at)
        return state

    async def get_state(self, state_id: str, rev: int = 0) -> State:
        """Return a state's version at ``rev``, or its latest version when ``rev`` is 0.

        Raises:
            NotFoundError: No such state, or ``rev`` is not one of its versions.
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        _args.check_read(state_id, rev)
        if "\x00" in state_id:
            self._check()
            raise NotFoundError(f"state {state_id!r} not found")  # no stored id holds NUL
        if rev == 0:
            row = await self._read("read", lambda c: c.fetchrow(self._sql.state_latest, state_id))
            if row is None:
                raise NotFoundError(f"state {state_id!r} not found")
            return self._decode(row[0], row[1], row[2])
        row = await self._read("read", lambda c: c.fetchrow(self._sql.state_at, rev))
        if row is None or row[0] != state_id:
            raise NotFoundError(f"state {state_id!r} has no version at rev {rev}")
        return self._decode(rev, row[1], row[2])

    async def get_states(self, query: StatesQuery) -> StatesPage:
        """Return one page of the versions matching ``query``, ascending by revision.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        self._check()
        label_sets = query.label_sets
        # No stored text holds NUL (commits refuse it): a filter that needs one matches nothing.
        leads = [list(wanted.items()) for wanted in label_sets if not _holds_nul(wanted)]
        if (label_sets and not leads) or (query.id is not None and "\x00" in query.id):
            return StatesPage(states=[], more=False, head_rev=await self.head_rev())
        if query.id is None and any(len(pairs) > 1 for pairs in leads):
            leads = await self._order_pairs(leads, query.since_rev, query.latest_only)
        sql, params = _page_sql(self._sql.schema, query, leads)
        rows = await self._read("query", lambda c: c.fetch(sql, *params))
        head = rows[0][0]
        rows = [row for row in rows if row[1] is not None]
        limit = query.limit
        states = [self._decode(rev, ms, blob) for _, rev, ms, blob in rows[:limit]]
        self._waiters.advance(head)
        return StatesPage(states=states, more=len(rows) > limit, head_rev=head)

    async def _order_pairs(
        self, leads: list[list[tuple[str, str]]], since_rev: int, latest_only: bool
    ) -> list[list[tuple[str, str]]]:
        """Put each AND-map's pair with the fewest postings after ``since_rev`` first (among
        latest versions' postings when ``latest_only``: the ones the page will walk).

        One statement: a count column per pair for a small filter, a row per pair, over two
        arrays, for a large one (see :data:`_NAMED_PAIRS`)."""
        probed = [pair for pairs in leads if len(pairs) > 1 for pair in pairs]
        if _named(leads):
            p = _Params()
            since = p.add(since_rev, "::bigint")
            probe = self._sql.probe_latest if latest_only else self._sql.probe
            sql = "SELECT " + ", ".join(
                probe.format(p.add(key), p.add(value), since) for key, value in probed
            )
            counts = list(await self._read("query", lambda c: c.fetchrow(sql, *p.values)))
        else:
            keys = [key for key, _ in probed]
            values = [value for _, value in probed]
            sql = self._sql.probe_arrays_latest if latest_only else self._sql.probe_arrays
            rows = await self._read("query", lambda c: c.fetch(sql, keys, values, since_rev))
            counts = [row[0] for row in rows]
        ordered = []
        for pairs in leads:
            if len(pairs) > 1:
                mine, counts = counts[: len(pairs)], counts[len(pairs) :]
                lead = mine.index(min(mine))
                pairs = [pairs[lead], *pairs[:lead], *pairs[lead + 1 :]]
            ordered.append(pairs)
        return ordered

    async def head_rev(self) -> int:
        """Return the store's latest revision (0 for an empty store).

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        head: int = await self._read("read", lambda c: c.fetchval(self._sql.head))
        self._waiters.advance(head)
        return head

    async def wait_for_rev(self, rev: int) -> None:
        """Return once the store's latest revision is at least ``rev``.

        Commits through this driver wake waiters at once; commits from other drivers and
        processes are pushed by ``LISTEN/NOTIFY`` (see the module docstring).

        Raises:
            ClosedError: The driver is not open, or was closed while waiting.
        """
        _args.check_wait(rev)
        self._check()
        if self._waiters.head >= rev:
            return
        self._watch_wanted.set()
        await self._waiters.wait(rev)

    async def get_data(self, state_id: str, alias: str, rev: int = 0) -> tuple[int, bytes]:
        """Return ``(rev, blob)`` of the newest data under ``alias`` at or below ``rev``.

        ``rev`` 0 means the latest data version.

        Raises:
            NotFoundError: No such data.
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        _args.check_read(state_id, rev, alias)
        if "\x00" in state_id or "\x00" in alias:
            self._check()
            raise NotFoundError(f"state {state_id!r} has no data {alias!r}")  # none holds NUL
        if rev:
            row = await self._read(
                "read", lambda c: c.fetchrow(self._sql.data_at, state_id, alias, rev)
            )
        else:
            row = await self._read(
                "read", lambda c: c.fetchrow(self._sql.data_latest, state_id, alias)
            )
        if row is None:
            at = f" at rev {rev}" if rev else ""
            raise NotFoundError(f"state {state_id!r} has no data {alias!r}{at}")
        return int(row[0]), bytes(row[1])

    async def get_delays(self, since_rev: int = 0, limit: int = 100) -> DelaysPage:
        """Return delays committed after ``since_rev`` (exclusive), in commit order.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        _args.check_delays(since_rev, limit)
        if limit < 1:
            more = await self._read("read", lambda c: c.fetchval(self._sql.any_delay, since_rev))
            return DelaysPage(delays=[], more=bool(more))
        rows = await self._read("read", lambda c: c.fetch(self._sql.delays, since_rev, limit + 1))
        delays = [
            DelayedState(state=self._decode(rev, ms, blob), to=to, at=due)
            for rev, to, due, ms, blob in rows[:limit]
        ]
        return DelaysPage(delays=delays, more=len(rows) > limit)

    # -- watching --------------------------------------------------------------------------

    async def _run_listener(self) -> None:
        """Listen for commits on the store's channel while the driver is open.

        Starts with the first ``wait_for_rev``; reconnects after any failure, with a backoff.
        """
        await self._watch_wanted.wait()
        attempt = 0
        failing_since: float | None = None
        while True:
            lost = asyncio.Event()
            conn: Any = None
            try:
                async with asyncio.timeout(self.timeout):
                    conn = await self._connect()
                    conn.add_termination_listener(_setter(lost))
                    await conn.add_listener(self._channel, self._notified)
                    # Commits made before LISTEN took effect are found by this read.
                    self._waiters.advance(await conn.fetchval(self._sql.head))
                if failing_since is not None:
                    logger.info(
                        "listening for commits on %s again after %.1fs",
                        self._where(),
                        self._now() - failing_since,
                    )
                attempt, failing_since = 0, None
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_LISTEN_CHECK):
                            await lost.wait()
                    if not lost.is_set() and self._waiters:
                        async with asyncio.timeout(self.timeout):
                            self._waiters.advance(await conn.fetchval(self._sql.head))
            except Exception as exc:  # noqa: BLE001 - whatever broke, reconnect (logged once)
                if failing_since is None:
                    failing_since = self._now()
                    logger.warning(
                        "lost the commit notifications of %s (%s); reconnecting",
                        self._where(),
                        _describe(exc),
                    )
            finally:
                if conn is not None:
                    conn.terminate()
            attempt += 1
            await asyncio.sleep(min(_MAX_BACKOFF, _MIN_BACKOFF * 2 ** (attempt - 1)))

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.advance(int(payload))

    # -- leases (SupportsLease) -------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Claim ``name`` for ``holder`` unless another holder's claim is still live.

        Expiry is by the server's clock.

        Returns:
            The lease (with a new token), or None when another holder's claim is live.

        Raises:
            InvalidCommandError: The name or holder holds a NUL character, or the name takes
                more than :data:`MAX_INDEXED_BYTES` bytes; nothing was sent.
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        _args.check_lease_claim(name, holder, ttl)
        for what, text in (("lease name", name), ("holder", holder)):
            if "\x00" in text:
                raise InvalidCommandError(
                    f"the {what} {text!r} holds a NUL character, which PostgreSQL cannot store"
                )
        _check_lease_name(name)
        token = await self._read(
            "lease claim",
            lambda c: c.fetchval(self._sql.acquire_lease, name, holder, float(ttl)),
        )
        if token is None:
            return None
        return Lease(name=name, holder=holder, token=token, ttl=ttl)

    async def renew_lease(self, lease: Lease) -> Lease | None:
        """Extend a live claim by its ttl.

        Returns:
            The lease, or None when the claim was lost (expired or taken).

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        _args.check_lease(lease)
        if not _claimable(lease.name):
            return None  # never claimed here
        token = await self._read(
            "lease renewal",
            lambda c: c.fetchval(self._sql.renew_lease, lease.name, lease.token),
        )
        return lease if token is not None else None

    async def release_lease(self, lease: Lease) -> None:
        """Give up a claim at once; releasing a lost claim does nothing.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        _args.check_lease(lease)
        if not _claimable(lease.name):
            return  # never claimed here
        await self._read(
            "lease release",
            lambda c: c.execute(self._sql.release_lease, lease.name, lease.token),
        )

    async def get_lease(self, name: str) -> Lease | None:
        """Return the live claim on ``name``, or None.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: PostgreSQL could not be reached within ``timeout``.
            DriverError: PostgreSQL failed otherwise.
        """
        _args.check_lease_name(name)
        if not _claimable(name):
            return None  # no lease can hold it
        row = await self._read("lease read", lambda c: c.fetchrow(self._sql.get_lease, name))
        if row is None:
            return None
        return Lease(name=name, holder=row[0], token=row[1], ttl=row[2])


async def _close(resource: Any) -> None:
    """Close an asyncpg connection or pool politely, or cut it when that fails or stalls."""
    try:
        async with asyncio.timeout(_CLOSE_GRACE):
            await resource.close()
    except Exception:  # a broken connection, or too slow: cut it
        logger.debug("closing %r failed; terminating it", resource, exc_info=True)
        resource.terminate()
    except BaseException:
        resource.terminate()
        raise


def _close_unclaimed(task: asyncio.Task[Any]) -> None:
    """Cut the connection ``task`` opened for a caller that stopped waiting for it."""
    if not task.cancelled() and task.exception() is None:
        task.result().terminate()


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    """A connection callback that sets ``event``."""
    return lambda _conn: event.set()


def _shown(url: str) -> str:
    """``url`` as it may be shown: passwords (``user:password@``, ``?password=``,
    ``?sslpassword=``) replaced by ``***``."""
    url = hide_password(url)
    location, sep, query = url.partition("?")
    if not sep:
        return url
    items = []
    for item in query.split("&"):
        key, equals, _ = item.partition("=")
        items.append(f"{key}=***" if equals and unquote(key) in _SECRET_OPTIONS else item)
    return f"{location}?{'&'.join(items)}"


def _check_no_password(dsn: str) -> None:
    """A password never goes in the URL (it would end up in shell histories, process lists
    and logs): it comes from ``PGPASSWORD`` or a ``.pgpass`` file."""
    location, _, query = dsn.partition("?")
    userinfo = location.partition("://")[2].partition("/")[0].rpartition("@")[0]
    in_query = any(key == "password" for key, _ in parse_qsl(query, keep_blank_values=True))
    if ":" in userinfo or in_query:
        raise InvalidURLError(
            "a password never goes in the URL; set PGPASSWORD or use a .pgpass file (PGPASSFILE)"
        )


def _netloc(dsn: str) -> str:
    """``host:port[,host:port...]`` of a URL, without the user and password."""
    return dsn.partition("://")[2].partition("/")[0].partition("?")[0].rpartition("@")[2]


#: libpq's sslmode values (asyncpg takes the same).
_SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_netloc(dsn: str) -> None:
    """Refuse ports that are not numbers from 1 to 65535 in ``host:port[,host:port...]``,
    and an ``sslmode`` libpq does not know, early."""
    for host in _netloc(dsn).split(","):
        if host.startswith("["):
            port = host.rpartition("]")[2].removeprefix(":")
        else:
            port = host.rpartition(":")[2] if ":" in host else ""
        if port and _args.url_port(port) is None:
            raise InvalidURLError(f"the port of {host!r} must be a number from 1 to 65535")
    for key, value in parse_qsl(dsn.partition("?")[2], keep_blank_values=True):
        if key == "sslmode" and value not in _SSL_MODES:
            raise InvalidURLError(f"sslmode must be one of {', '.join(_SSL_MODES)}, not {value!r}")
