"""The SQLite driver (``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite://:memory:``).

The durable embedded default: one database file in WAL mode, shared safely by any number of
processes on one machine.

URL options (query string): ``synchronous=normal|full`` (default ``normal``),
``poll_interval=SECONDS`` (how often a waiting watcher looks for commits made by other
processes; 0.001 to 60, default 0.05), ``busy_timeout=SECONDS`` (how long a commit waits for
another process's write lock before failing with ``DriverUnavailableError``; 0 to 3600,
default 5) and ``create=1`` (make an existing empty file a store). Example:
``sqlite:///var/flowstate.db?synchronous=full&poll_interval=0.1``. ``sqlite://:memory:`` is a
private in-memory store that belongs to one driver object (for tests). The path is
percent-decoded; a relative path (three slashes) that decodes to an absolute one is refused.

Files:
    A missing file is created as a new store, with mode 0600 whatever the umask (the ``-wal``
    and ``-shm`` files SQLite keeps beside it get the same mode): states often hold personal
    data, and the file's owner decides who else may read it (``chmod``). The store is built
    in a private file in the same folder and linked into place in one step, so no process
    ever sees a half-made store. An existing file is checked before anything is written to
    it: a flowstate store is opened; any other SQLite database, a device or a non-database
    file is refused with ``DriverError`` and left untouched; an empty file (which flowstate
    did not create) is refused unless the URL says ``?create=1``.

Durability:
    The database runs in WAL mode. With ``synchronous=normal`` (the default) a commit is
    acknowledged once it is in the WAL, without an fsync: no acknowledged commit is lost when
    the process crashes or is killed, but a power loss or an operating-system crash may lose
    the last commits (never corrupting the file, never keeping part of a commit). With
    ``synchronous=full`` every commit is fsynced before it is acknowledged and survives a
    power loss too, at the cost of one fsync per transaction (group commit shares it between
    concurrent commits).

Threading:
    Every SQLite call runs on one thread owned by the driver, with the standard library's
    ``sqlite3``: ``open()`` starts it, ``aclose()`` stops and joins it. The event loop hands
    that thread one function per request (a whole read, or a whole group of commits, each run
    in one transaction) and gets the result back through ``call_soon_threadsafe``: one thread
    round trip per request, not one per SQL statement. That round trip, not the disk, is what
    limits throughput: aiosqlite makes one per statement, and a commit here runs five to eight
    statements, so the driver talks to ``sqlite3`` directly. The thread is not a daemon; if a
    driver is dropped without ``aclose()`` it warns ``ResourceWarning`` and the thread stops by
    itself, and it also stops within a second after the main thread exits. Should the thread
    die of an unexpected error, every pending and later call fails with that ``DriverError``
    instead of waiting for an answer that cannot come.

Group commit:
    Concurrent ``commit()`` calls are queued on the event loop and, while one group is being
    written, the next group collects; each group is one ``BEGIN IMMEDIATE`` transaction. When
    the database thread is idle, a commit goes at once if the last group held one commit, and
    at the end of the event loop's turn (with the commits made in that turn) if it held more.
    Inside a group every commit is checked on its own, in arrival order, against the
    latest-revision table (overlaid with the commits of the group that went before it): a
    commit that conflicts gets its own ``ConflictError`` and writes nothing, the others are
    written. A backend failure rolls back the whole group and every commit in it fails with
    that ``DriverError``.

Revisions and visibility:
    A commit takes the next revisions of the store inside its write transaction (the states of
    one commit get consecutive revisions, in request order). SQLite lets one writer in at a
    time across all processes, so revisions become visible strictly in order, and readers see
    whole transactions only. A page of results and its ``head_rev`` are read in one read
    transaction. ``committed_at`` never decreases along revisions: a commit's time is clamped
    to the time of the revision before it when the wall clock goes back.

Watching:
    ``wait_for_rev`` wakes at once for commits made through this driver object; while someone
    waits, the database thread also looks for commits made through other connections (other
    processes, other driver objects) every ``poll_interval`` seconds.

Schema (version 3, stored in ``PRAGMA user_version``; ``PRAGMA application_id`` marks the file
as a flowstate store)::

    fs_log(rev INTEGER PRIMARY KEY, id, committed_at, state)  every version; committed_at in
        ms since the epoch (UTC), state the msgpack-encoded State without its rev and time.
        Commit times never decrease along revisions, so ``since_time`` is a binary search
        over the primary key (no time index to update on every commit); the index
        ``fs_log_id`` (id, then rev) answers the history of one state (version 2)
    fs_latest(id PRIMARY KEY, rev UNIQUE)    each state's latest revision: the compare-and-set
        guard, and the index of ``latest_only`` queries
    fs_labels(key, value, rev)               one row per label of each version (primary key
        in that order), so a label filter reads only matching versions
    fs_latest_labels(key, value, rev)        the same rows for latest versions only, indexed
        by rev too (``fs_latest_labels_rev``): a ``latest_only`` label filter reads only the
        states that match now, however long their history (version 3). A commit deletes the
        rows of each state's previous version and inserts its new version's rows.
    fs_data(id, alias, rev, blob)            data versions
    fs_delays(rev PRIMARY KEY, to_flow, at_us)   delays, bound to the version at ``rev``
    fs_leases(name PRIMARY KEY, holder, token, ttl, expires_at)   leases; wall-clock expiry

A file written by a newer schema version is refused with ``SchemaVersionError``; an older file
is migrated forward, inside one transaction, by the first process that opens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import os
import queue
import secrets
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias, TypeVar
from urllib.parse import parse_qsl, quote, unquote

import msgspec

from flowstate._checks import describe, is_number, is_text
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
)
from flowstate.errors import (
    ClosedError,
    Conflict,
    ConflictError,
    DriverError,
    DriverUnavailableError,
    FlowstateError,
    InvalidURLError,
    NotFoundError,
    SchemaVersionError,
)

if TYPE_CHECKING:
    from typing import Self

__all__ = ["FILE_MODE", "SCHEMA_VERSION", "SQLiteDriver"]

logger = logging.getLogger("flowstate.drivers.sqlite")

T = TypeVar("T")

#: The schema version this release writes and reads (``PRAGMA user_version``).
SCHEMA_VERSION: Final = 3
#: ``PRAGMA application_id`` of a flowstate store ("FLST").
APPLICATION_ID: Final = 0x464C5354

_MEMORY = ":memory:"
_SYNCHRONOUS = ("normal", "full")
# The bounds of the numeric URL options, in seconds.
_POLL_RANGE = (0.001, 60.0)
_BUSY_RANGE = (0.0, 3600.0)
# The mode of the store files flowstate creates: the owner's alone (the -wal and -shm files
# SQLite creates beside them take the same mode).
FILE_MODE: Final = 0o600
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# How often an idle database thread checks whether the interpreter is shutting down.
_IDLE_CHECK = 1.0
# How many label postings the probe that picks an AND-map's sparsest pair reads per pair.
_PROBE_CAP = 1024

_LATEST_LABELS = """CREATE TABLE fs_latest_labels (
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        rev INTEGER NOT NULL,
        PRIMARY KEY (key, value, rev)
    ) WITHOUT ROWID"""
_LATEST_LABELS_REV = "CREATE INDEX fs_latest_labels_rev ON fs_latest_labels (rev)"

_SCHEMA = (
    """CREATE TABLE fs_log (
        rev INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        committed_at INTEGER NOT NULL,
        state BLOB NOT NULL
    )""",
    "CREATE INDEX fs_log_id ON fs_log (id)",
    """CREATE TABLE fs_latest (
        id TEXT PRIMARY KEY,
        rev INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE UNIQUE INDEX fs_latest_rev ON fs_latest (rev)",
    """CREATE TABLE fs_labels (
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        rev INTEGER NOT NULL,
        PRIMARY KEY (key, value, rev)
    ) WITHOUT ROWID""",
    _LATEST_LABELS,
    _LATEST_LABELS_REV,
    """CREATE TABLE fs_data (
        id TEXT NOT NULL,
        alias TEXT NOT NULL,
        rev INTEGER NOT NULL,
        blob BLOB NOT NULL,
        UNIQUE (id, alias, rev)
    )""",
    """CREATE TABLE fs_delays (
        rev INTEGER PRIMARY KEY,
        to_flow TEXT NOT NULL,
        at_us INTEGER NOT NULL
    )""",
    """CREATE TABLE fs_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        token INTEGER NOT NULL,
        ttl REAL NOT NULL,
        expires_at REAL NOT NULL
    )""",
)

# What takes a store from the version before each key to that version.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("CREATE INDEX fs_log_id ON fs_log (id)",),
    3: (
        _LATEST_LABELS,
        _LATEST_LABELS_REV,
        (
            "INSERT INTO fs_latest_labels (key, value, rev) SELECT l.key, l.value, l.rev "
            "FROM fs_labels l WHERE l.rev IN (SELECT rev FROM fs_latest)"
        ),
    ),
}

_SQL_HEAD = "SELECT max(rev) FROM fs_log"
_SQL_LAST = "SELECT rev, committed_at FROM fs_log WHERE rev = (SELECT max(rev) FROM fs_log)"
_SQL_LATEST_REV = "SELECT rev FROM fs_latest WHERE id = ?"
_SQL_INSERT_LOG = "INSERT INTO fs_log (rev, id, committed_at, state) VALUES (?, ?, ?, ?)"
_SQL_INSERT_LABEL = "INSERT INTO fs_labels (key, value, rev) VALUES (?, ?, ?)"
_SQL_INSERT_LATEST_LABEL = "INSERT INTO fs_latest_labels (key, value, rev) VALUES (?, ?, ?)"
_SQL_DELETE_LATEST_LABELS = "DELETE FROM fs_latest_labels WHERE rev = ?"
_SQL_UPSERT_LATEST = (
    "INSERT INTO fs_latest (id, rev) VALUES (?, ?) "
    "ON CONFLICT (id) DO UPDATE SET rev = excluded.rev"
)
_SQL_INSERT_DATA = "INSERT INTO fs_data (id, alias, rev, blob) VALUES (?, ?, ?, ?)"
_SQL_INSERT_DELAY = "INSERT INTO fs_delays (rev, to_flow, at_us) VALUES (?, ?, ?)"
_SQL_STATE_LATEST = (
    "SELECT l.rev, l.committed_at, l.state FROM fs_latest x JOIN fs_log l ON l.rev = x.rev "
    "WHERE x.id = ?"
)
_SQL_STATE_AT = "SELECT id, committed_at, state FROM fs_log WHERE rev = ?"
_SQL_TIME_FROM = "SELECT rev, committed_at FROM fs_log WHERE rev >= ? ORDER BY rev LIMIT 1"
_SQL_PAGE_ALL = "SELECT rev, committed_at, state FROM fs_log WHERE rev > ? ORDER BY rev LIMIT ?"
_SQL_PAGE_LATEST = (
    "SELECT l.rev, l.committed_at, l.state FROM fs_latest x JOIN fs_log l ON l.rev = x.rev "
    "WHERE x.rev > ? ORDER BY x.rev LIMIT ?"
)
_SQL_LAST_LATEST = "SELECT max(rev) FROM fs_latest WHERE rev > ?"
# The revision of a pair's _PROBE_CAP-th posting after a revision (None: it has fewer), and
# how many it has up to that cap: among all versions, and among latest versions.
_SQL_PROBE = (
    "SELECT max(rev), count(*) FROM (SELECT rev FROM fs_labels WHERE key = ? AND value = ? "
    f"AND rev > ? ORDER BY rev LIMIT {_PROBE_CAP})"
)
_SQL_PROBE_LATEST = _SQL_PROBE.replace("fs_labels", "fs_latest_labels")
_SQL_DATA_LATEST = (
    "SELECT rev, blob FROM fs_data WHERE id = ? AND alias = ? ORDER BY rev DESC LIMIT 1"
)
_SQL_DATA_AT = (
    "SELECT rev, blob FROM fs_data WHERE id = ? AND alias = ? AND rev <= ? "
    "ORDER BY rev DESC LIMIT 1"
)
_SQL_DELAYS = (
    "SELECT d.rev, d.to_flow, d.at_us, l.committed_at, l.state "
    "FROM fs_delays d JOIN fs_log l ON l.rev = d.rev WHERE d.rev > ? ORDER BY d.rev LIMIT ?"
)
_SQL_ANY_DELAY = "SELECT 1 FROM fs_delays WHERE rev > ? LIMIT 1"
_SQL_LEASE = "SELECT holder, token, ttl, expires_at FROM fs_leases WHERE name = ?"

# sqlite3 primary result codes (the low byte of an extended code).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_IOERR = 10
_SQLITE_PROTOCOL = 15
_RETRY_SAFE = frozenset({_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_PROTOCOL})


class _Write(NamedTuple):
    """One state write, prepared on the event loop so the database thread only binds values."""

    id: str
    expected_rev: int
    state: bytes
    labels: list[tuple[str, str]]
    data: list[tuple[str, bytes]]
    delay_to: str
    delay_at_us: int | None


_Outcome: TypeAlias = CommitResult | ConflictError
_Done: TypeAlias = Callable[[Any, BaseException | None], None]


def _to_datetime(ms: int) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(milliseconds=ms)


def _micros(moment: datetime.datetime) -> int:
    """Exact microseconds since the epoch (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return (moment - _EPOCH) // datetime.timedelta(microseconds=1)


def _flowstate_error(exc: sqlite3.Error, where: str) -> DriverError:
    """The flowstate error for a sqlite3 exception (raise it ``from exc``).

    Busy or locked databases, I/O errors and lock-protocol failures roll the transaction back,
    so the call can be retried safely: those become ``DriverUnavailableError``.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    message = f"SQLite store {where}: {exc} ({name})"
    if code is not None and code & 0xFF in _RETRY_SAFE:
        return DriverUnavailableError(message)
    return DriverError(message)


@contextlib.contextmanager
def _sqlite_errors(where: str) -> Iterator[None]:
    """Turn sqlite3 exceptions into flowstate errors, chaining the original."""
    try:
        yield
    except sqlite3.Error as exc:
        raise _flowstate_error(exc, where) from exc


def _copy_error(error: BaseException) -> BaseException:
    """A fresh instance of a group-wide error for each waiting commit, so that raising it in
    several tasks does not pile their tracebacks onto one object.
    """
    try:
        clone = type(error)(*error.args)
    except TypeError:
        return error
    clone.__cause__ = error.__cause__
    return clone


def _settle(fut: asyncio.Future[Any], value: object, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled; the outcome is discarded
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _run_callbacks(calls: list[tuple[_Done, object, BaseException | None]]) -> None:
    for done, value, error in calls:
        done(value, error)


class _Stop:
    """Queue marker: finish what is queued, close the connection, end the thread."""


class _Poll:
    """Queue marker: read the head revision now (someone started waiting)."""


_STOP: Final = _Stop()
_MARKERS: Final = (_Stop, _Poll)
_POLL: Final = _Poll()

_Job: TypeAlias = tuple[Callable[[sqlite3.Connection], object], asyncio.AbstractEventLoop, _Done]


class _Worker:
    """The database thread: owns the sqlite3 connection and runs one function per request.

    It holds no reference to the driver, so a driver dropped without ``aclose()`` can still
    be collected (and then stops the thread).
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        loop: asyncio.AbstractEventLoop,
        on_head: Callable[[int], None],
        on_death: Callable[[DriverError], None],
        poll_interval: float | None,
        where: str,
    ) -> None:
        self._connect = connect
        self._loop = loop
        self._on_head = on_head
        self._on_death = on_death
        self._poll_interval = poll_interval
        self._where = where
        self._queue: queue.SimpleQueue[_Job | _Stop | _Poll] = queue.SimpleQueue()
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._stopping = False
        # Set once the thread died of an unexpected error: every request fails with it. The
        # lock makes "not dead yet, so queue it" and "dead, so fail what is queued" exclusive.
        self._death: DriverError | None = None
        self._death_lock = threading.Lock()
        self._in_hand: list[_Job] = []
        self._posted_head = 0
        self._last_poll = 0.0
        #: Set by the driver while some coroutine waits for a revision.
        self.watching = False
        self._thread = threading.Thread(
            target=self._run, name=f"flowstate-sqlite {where}", daemon=False
        )

    def start(self) -> None:
        self._thread.start()

    def submit(
        self,
        fn: Callable[[sqlite3.Connection], object],
        loop: asyncio.AbstractEventLoop,
        done: _Done,
    ) -> None:
        with self._death_lock:
            death = self._death
            if death is None and not self._stopping:
                self._queue.put((fn, loop, done))
                return
        error = (
            _copy_error(death) if death is not None else ClosedError("the SQLite driver is closed")
        )
        loop.call_soon(done, None, error)

    def poke(self) -> None:
        if not self._stopping:
            self._queue.put(_POLL)

    def stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._queue.put(_STOP)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def wait_stopped(self) -> None:
        """Wait for the thread to end (after :meth:`stop`), without blocking the loop."""
        if asyncio.get_running_loop() is self._loop:
            await asyncio.shield(self._stopped)
        # The thread has posted its last callback and is returning: the join is immediate.
        # From a foreign event loop (a misuse) this waits for the queued requests instead.
        self._thread.join()

    def _post(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        failure: BaseException | None = None
        try:
            with _sqlite_errors(f"{self._where} cannot be opened"):
                conn = self._connect()
        except FlowstateError as exc:
            failure = exc
        except Exception as exc:  # noqa: BLE001 - handed to every request, as a DriverError
            failure = DriverError(f"SQLite store {self._where} cannot be opened: {exc!r}")
            failure.__cause__ = exc
        try:
            self._serve(conn, failure)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller is told instead
            self._die(exc)
        finally:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._post(self._loop, _settle, self._stopped, None, None)

    def _serve(self, conn: sqlite3.Connection | None, failure: BaseException | None) -> None:
        get = self._queue.get
        while True:
            timeout = self._poll_interval if self.watching and self._poll_interval else _IDLE_CHECK
            try:
                stop = self._handle(get(timeout=timeout), conn, failure)
            except queue.Empty:
                if not threading.main_thread().is_alive():
                    return  # the interpreter is exiting and nobody closed the driver
                if self.watching and conn is not None:
                    self._poll(conn)
                continue
            if stop:
                return
            if (
                self.watching
                and conn is not None
                and self._poll_interval
                and time.monotonic() - self._last_poll >= self._poll_interval
            ):
                self._poll(conn)

    def _die(self, exc: BaseException) -> None:
        """The thread cannot go on: fail the requests in hand, queued and yet to come."""
        logger.error("the SQLite database thread of %s stopped", self._where, exc_info=exc)
        death = DriverError(f"the SQLite database thread of {self._where} stopped: {exc!r}")
        death.__cause__ = exc
        with self._death_lock:
            self._death = death
            jobs = self._in_hand
            self._in_hand = []
            with contextlib.suppress(queue.Empty):
                while True:
                    job = self._queue.get_nowait()
                    if not isinstance(job, _MARKERS):
                        jobs.append(job)
        for _fn, loop, done in jobs:
            self._post(loop, done, None, _copy_error(death))
        self._post(self._loop, self._on_death, death)

    def _handle(
        self,
        first: _Job | _Stop | _Poll,
        conn: sqlite3.Connection | None,
        failure: BaseException | None,
    ) -> bool:
        """Run ``first`` and everything queued behind it; True when told to stop.

        A method of its own so that no finished request stays referenced while the thread
        waits for the next one.
        """
        items = [first]
        pending = self._queue
        while not pending.empty():  # this thread is the only reader: get_nowait() succeeds
            items.append(pending.get_nowait())
        stop = False
        replies: dict[asyncio.AbstractEventLoop, list[tuple[_Done, object, Any]]] = {}
        jobs = [job for job in items if not isinstance(job, _MARKERS)]
        self._in_hand = jobs  # failed by _die() if this method does not get to answer them
        if len(jobs) < len(items):
            stop = any(isinstance(job, _Stop) for job in items)
            if conn is not None and any(isinstance(job, _Poll) for job in items):
                self._poll(conn)
        for fn, loop, done in jobs:
            value: object = None
            error: BaseException | None = failure
            if conn is not None:
                try:
                    value = fn(conn)
                except sqlite3.Error as exc:
                    error = _flowstate_error(exc, self._where)
                    error.__cause__ = exc
                except Exception as exc:  # noqa: BLE001 - handed back to the awaiting caller
                    error = exc
            replies.setdefault(loop, []).append((done, value, error))
        self._in_hand = []
        for loop, calls in replies.items():
            self._post(loop, _run_callbacks, calls)
        return stop

    def _poll(self, conn: sqlite3.Connection) -> None:
        """Tell the driver about commits made through other connections."""
        self._last_poll = time.monotonic()
        try:
            row = conn.execute(_SQL_HEAD).fetchone()
        except sqlite3.Error:
            logger.debug("head poll failed on %s; retrying later", self._where, exc_info=True)
            return
        head = row[0] or 0
        if head > self._posted_head:
            self.noted(head)
            self._post(self._loop, self._on_head, head)

    def noted(self, head: int) -> None:
        """Record that the driver already knows about ``head`` (no need to post it)."""
        self._posted_head = max(self._posted_head, head)


class SQLiteDriver(Driver):
    """Stores states in one SQLite file (WAL mode), shared by any number of processes.

    Args:
        path: The database file, or ``":memory:"`` for a private in-memory store.
        synchronous: ``"normal"`` (default: acknowledged commits survive a process crash) or
            ``"full"`` (they also survive a power loss; one fsync per transaction).
        poll_interval: Seconds between checks for commits from other processes while a
            watcher waits (0.001 to 60).
        busy_timeout: Seconds a statement waits for another process's lock before failing
            with ``DriverUnavailableError`` (0 to 3600).
        create: Make an existing empty file (one flowstate did not create) a store. A missing
            file is always created, with mode 0600.

    Use it from the event loop that opened it. See the module docstring for the schema, the
    threading model and group commit.
    """

    scheme = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str] = "flowstate.db",
        *,
        synchronous: str = "normal",
        poll_interval: float = 0.05,
        busy_timeout: float = 5.0,
        create: bool = False,
    ) -> None:
        path = os.fspath(path)
        if not path or not is_text(path) or "\0" in path:
            raise InvalidURLError(
                f"the SQLite driver needs a file path or ':memory:', not {describe(path)}"
            )
        given: object = synchronous
        if not isinstance(given, str) or given.lower() not in _SYNCHRONOUS:
            raise InvalidURLError(
                f"synchronous must be 'normal' or 'full', not {describe(synchronous)}"
            )
        for name, value, (low, high) in (
            ("poll_interval", poll_interval, _POLL_RANGE),
            ("busy_timeout", busy_timeout, _BUSY_RANGE),
        ):
            if not is_number(value, minimum=low) or value > high:
                raise InvalidURLError(
                    f"{name} must be a number of seconds from {low:g} to {high:g}, "
                    f"not {describe(value)}"
                )
        self.path = path
        self.synchronous = synchronous.lower()
        self.poll_interval = float(poll_interval)
        self.busy_timeout = float(busy_timeout)
        self.create = bool(create)
        self._lifecycle = Lifecycle.UNOPENED
        self._worker: _Worker | None = None
        self._open_lock = asyncio.Lock()
        self._waiters = RevisionWaiters()
        self._pending: list[tuple[list[_Write], asyncio.Future[CommitResult]]] = []
        self._flush_scheduled = False
        self._in_flight = False
        self._solo = True  # the last group sent held one commit
        self._encoder = msgspec.msgpack.Encoder()
        self._state_decoder = msgspec.msgpack.Decoder(State)

    @property
    def is_memory(self) -> bool:
        """True for the private in-memory store (``sqlite://:memory:``)."""
        return self.path == _MEMORY

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Create an unopened driver from a ``sqlite://`` URL (see the module docstring).

        Raises:
            InvalidURLError: The URL is not a valid SQLite driver URL.
        """
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() != cls.scheme:
            raise InvalidURLError(f"{url!r} is not a sqlite:// URL")
        location, _, query = rest.partition("?")
        if location in (_MEMORY, "/" + _MEMORY):
            path = _MEMORY
        elif location.startswith("/") and len(location) > 1:
            path = unquote(location[1:])
            if not location.startswith("//") and os.path.isabs(path):
                # sqlite:///%2Ftmp%2Fx.db: percent-decoding must not turn a relative path
                # into an absolute one behind the reader's back.
                raise InvalidURLError(
                    f"{url!r}: a relative path that decodes to the absolute path {path!r}; "
                    "write absolute paths as sqlite:////absolute/path.db"
                )
        else:
            raise InvalidURLError(
                f"{url!r}: expected sqlite:///relative/path.db, sqlite:////absolute/path.db "
                "or sqlite://:memory: (a SQLite URL has no host)"
            )
        options: dict[str, Any] = {}
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise InvalidURLError(f"{url!r}: malformed query string ({exc})") from None
        for key, value in pairs:
            if key == "synchronous":
                options[key] = value
            elif key == "create":
                if value not in ("0", "1"):
                    raise InvalidURLError(f"{url!r}: create must be 0 or 1, not {value!r}")
                options[key] = value == "1"
            elif key in ("poll_interval", "busy_timeout"):
                options[key] = _args.url_number(url, key, value, " of seconds")
            else:
                raise InvalidURLError(
                    f"{url!r}: unknown option {key!r}; "
                    "known options: synchronous, poll_interval, busy_timeout, create"
                )
        try:
            return cls(path, **options)
        except InvalidURLError as exc:
            raise InvalidURLError(f"{url!r}: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"SQLiteDriver({self.path!r}, synchronous={self.synchronous}, "
            f"{self._lifecycle.name.lower()})"
        )

    def __del__(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is None or getattr(self, "_lifecycle", None) is Lifecycle.CLOSED:
            return
        warn_unclosed(self)
        worker.stop()

    # -- lifecycle -----------------------------------------------------------------------

    def _check(self) -> _Worker:
        worker = self._worker
        if self._lifecycle is not Lifecycle.OPENED or worker is None:
            raise not_open(self._lifecycle, "the SQLite driver")
        return worker

    async def open(self) -> None:
        """Start the database thread, and create or check the schema.

        Raises:
            ClosedError: The driver was closed.
            SchemaVersionError: The file was written by a newer flowstate.
            DriverError: The file cannot be opened or is not a flowstate store.
        """
        async with self._open_lock:
            if self._lifecycle is Lifecycle.CLOSED:
                raise ClosedError("the SQLite driver is closed and cannot be reopened")
            if self._lifecycle is Lifecycle.OPENED:
                return
            loop = asyncio.get_running_loop()
            ref = weakref.ref(self)

            def on_head(head: int) -> None:
                driver = ref()
                if driver is not None:
                    driver._waiters.advance(head)

            def on_death(error: DriverError) -> None:
                driver = ref()
                if driver is not None:
                    driver._waiters.close(error)

            worker = _Worker(
                functools.partial(_connect, self.path, self.synchronous, self.busy_timeout),
                loop,
                on_head,
                on_death,
                None if self.is_memory else self.poll_interval,
                self.path,
            )
            worker.start()
            self._worker = worker
            try:
                # No request may hold the driver itself: the database thread may keep a
                # finished request a moment longer, and a dropped driver must be collectable.
                setup = functools.partial(
                    _setup, self.path, self.is_memory, self.create, self.busy_timeout
                )
                head = await self._call(setup, worker)
            except BaseException:
                self._worker = None
                worker.stop()
                await worker.wait_stopped()
                raise
            worker.noted(head)
            self._waiters.advance(head)
            self._lifecycle = Lifecycle.OPENED

    async def aclose(self) -> None:
        """Finish the queued requests, close the database and join its thread.

        Calling it again does nothing. Waiters in :meth:`wait_for_rev` get ``ClosedError``.
        """
        if self._lifecycle is not Lifecycle.CLOSED:
            self._lifecycle = Lifecycle.CLOSED
            self._waiters.close(ClosedError("the SQLite driver was closed"))
            if self._worker is not None:
                self._flush()  # commits accepted before the close are still written
                self._worker.stop()
        worker = self._worker
        if worker is not None:
            await worker.wait_stopped()
            self._worker = None

    async def _call(
        self, fn: Callable[[sqlite3.Connection], T], worker: _Worker | None = None
    ) -> T:
        """Run ``fn(connection)`` on the database thread (one round trip) and return its value."""
        if worker is None:
            worker = self._check()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        worker.submit(fn, loop, functools.partial(_settle, fut))
        return await fut

    # -- commits ---------------------------------------------------------------------------

    async def commit(self, request: CommitRequest) -> CommitResult:
        """Write every state of ``request`` atomically, if every ``expected_rev`` matches.

        Concurrent commits are written together in one transaction (group commit); each one
        still succeeds or conflicts on its own.

        Raises:
            ConflictError: Some state's latest revision differed from ``expected_rev``; it
                lists every such state, and nothing was written.
            ClosedError: The driver is not open.
            DriverUnavailableError: The database stayed locked by another process longer
                than ``busy_timeout`` (nothing was written), or an I/O error occurred while
                committing. A retry with the same expected revisions is safe: it conflicts
                if the first attempt was applied.
            DriverError: SQLite failed otherwise; nothing was written.
        """
        self._check()
        writes = [self._prepare(write) for write in request.writes]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[CommitResult] = loop.create_future()
        self._pending.append((writes, fut))
        if not self._in_flight and not self._flush_scheduled:
            # The database thread is idle. If the last group held one commit, commits come
            # one at a time: send this one now. If it held more, the others are likely to
            # come in this same turn of the event loop (their flows woke together): send
            # them together at its end, rather than this one alone and the rest behind it.
            # While a group is being written, later commits collect and go together once it
            # is done.
            if self._solo:
                self._flush()
            else:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        return await fut

    def _prepare(self, write: StateWrite) -> _Write:
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
            None if delay_at is None else _micros(delay_at),
        )

    def _flush(self) -> None:
        """Send the queued commits to the database thread as one group."""
        self._flush_scheduled = False
        worker = self._worker
        group = [(writes, fut) for writes, fut in self._pending if not fut.done()]
        self._pending = []
        if not group or worker is None:
            for _, fut in group:
                fut.set_exception(ClosedError("the SQLite driver is closed"))
            return
        self._in_flight = True
        self._solo = len(group) == 1
        commits = [writes for writes, _ in group]
        worker.submit(
            functools.partial(_write_group, commits),
            asyncio.get_running_loop(),
            functools.partial(self._group_done, worker, [fut for _, fut in group]),
        )
        if self._solo:
            # Commits come one at a time: hand the GIL to the database thread now, so that
            # the write starts while this thread finishes its turn of the event loop, rather
            # than once it goes idle. (A sequential step is 15-20% faster; a group of many
            # commits gains nothing, its writes are long next to the turn.)
            time.sleep(0)

    def _group_done(
        self,
        worker: _Worker,
        futures: list[asyncio.Future[CommitResult]],
        value: tuple[list[_Outcome], int] | None,
        error: BaseException | None,
    ) -> None:
        self._in_flight = False
        if value is None:
            failure = error or DriverError("the SQLite commit group failed")
            for fut in futures:
                _settle(fut, None, _copy_error(failure))
        else:
            outcomes, head = value
            for fut, outcome in zip(futures, outcomes, strict=True):
                if isinstance(outcome, ConflictError):
                    _settle(fut, None, outcome)
                else:
                    _settle(fut, outcome, None)
            worker.noted(head)
            self._waiters.advance(head)
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    # -- reads ---------------------------------------------------------------------------

    async def get_state(self, state_id: str, rev: int = 0) -> State:
        """Return a state's version at ``rev``, or its latest version when ``rev`` is 0.

        Raises:
            NotFoundError: No such state, or ``rev`` is not one of its versions.
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        _args.check_read(state_id, rev)
        self._check()
        decode = self._state_decoder.decode

        def read(conn: sqlite3.Connection) -> State:
            if rev == 0:
                row = conn.execute(_SQL_STATE_LATEST, (state_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"state {state_id!r} not found")
                return _decode(decode, row[0], row[1], row[2])
            row = conn.execute(_SQL_STATE_AT, (rev,)).fetchone()
            if row is None or row[0] != state_id:
                raise NotFoundError(f"state {state_id!r} has no version at rev {rev}")
            return _decode(decode, rev, row[1], row[2])

        return await self._call(read)

    async def get_states(self, query: StatesQuery) -> StatesPage:
        """Return one page of the versions matching ``query``, ascending by revision.

        Raises:
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        self._check()
        page = await self._call(functools.partial(_read_page, self._state_decoder.decode, query))
        self._waiters.advance(page.head_rev)
        return page

    async def head_rev(self) -> int:
        """Return the store's latest revision (0 for an empty store).

        Raises:
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        self._check()
        head = await self._call(_read_head)
        self._waiters.advance(head)
        return head

    async def wait_for_rev(self, rev: int) -> None:
        """Return once the store's latest revision is at least ``rev``.

        Commits through this driver wake waiters at once; commits from other processes are
        noticed within ``poll_interval`` seconds.

        Raises:
            ClosedError: The driver is not open, or was closed while waiting.
        """
        _args.check_wait(rev)
        worker = self._check()
        if self._waiters.head >= rev:
            return
        worker.watching = True
        worker.poke()  # catch up at once with commits other processes made since the last read
        try:
            await self._waiters.wait(rev)
        finally:
            if not self._waiters:
                worker.watching = False

    async def get_data(self, state_id: str, alias: str, rev: int = 0) -> tuple[int, bytes]:
        """Return ``(rev, blob)`` of the newest data under ``alias`` at or below ``rev``.

        ``rev`` 0 means the latest data version.

        Raises:
            NotFoundError: No such data.
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        _args.check_read(state_id, rev, alias)
        self._check()

        def read(conn: sqlite3.Connection) -> tuple[int, bytes]:
            if rev:
                row = conn.execute(_SQL_DATA_AT, (state_id, alias, rev)).fetchone()
            else:
                row = conn.execute(_SQL_DATA_LATEST, (state_id, alias)).fetchone()
            if row is None:
                at = f" at rev {rev}" if rev else ""
                raise NotFoundError(f"state {state_id!r} has no data {alias!r}{at}")
            return int(row[0]), bytes(row[1])

        return await self._call(read)

    async def get_delays(self, since_rev: int = 0, limit: int = 100) -> DelaysPage:
        """Return delays committed after ``since_rev`` (exclusive), in commit order.

        Raises:
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        _args.check_delays(since_rev, limit)
        self._check()
        decode = self._state_decoder.decode

        def read(conn: sqlite3.Connection) -> DelaysPage:
            if limit < 1:
                more = conn.execute(_SQL_ANY_DELAY, (since_rev,)).fetchone() is not None
                return DelaysPage(delays=[], more=more)
            rows = conn.execute(_SQL_DELAYS, (since_rev, limit + 1)).fetchall()
            delays = [
                DelayedState(
                    state=_decode(decode, rev, committed_at, blob),
                    to=to,
                    at=_EPOCH + datetime.timedelta(microseconds=at_us),
                )
                for rev, to, at_us, committed_at, blob in rows[:limit]
            ]
            return DelaysPage(delays=delays, more=len(rows) > limit)

        return await self._call(read)

    # -- leases (SupportsLease) -------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Claim ``name`` for ``holder`` unless another holder's claim is still live.

        Expiry uses the wall clock, which every process on the machine shares.

        Returns:
            The lease (with a new token), or None when another holder's claim is live.

        Raises:
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        _args.check_lease_claim(name, holder, ttl)
        self._check()

        def claim(conn: sqlite3.Connection) -> Lease | None:
            with _write_transaction(conn):
                now = time.time()
                row = conn.execute(_SQL_LEASE, (name,)).fetchone()
                if row is not None and row[3] > now and row[0] != holder:
                    return None
                top = conn.execute("SELECT max(token) FROM fs_leases").fetchone()[0] or 0
                lease = Lease(name=name, holder=holder, token=top + 1, ttl=ttl)
                conn.execute(
                    "INSERT INTO fs_leases (name, holder, token, ttl, expires_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                    "holder = excluded.holder, token = excluded.token, ttl = excluded.ttl, "
                    "expires_at = excluded.expires_at",
                    (name, holder, lease.token, ttl, now + ttl),
                )
                return lease

        return await self._call(claim)

    async def renew_lease(self, lease: Lease) -> Lease | None:
        """Extend a live claim by its ttl.

        Returns:
            The lease, or None when the claim was lost (expired or taken).

        Raises:
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        _args.check_lease(lease)
        self._check()

        def renew(conn: sqlite3.Connection) -> Lease | None:
            with _write_transaction(conn):
                now = time.time()
                cursor = conn.execute(
                    "UPDATE fs_leases SET expires_at = ? "
                    "WHERE name = ? AND token = ? AND expires_at > ?",
                    (now + lease.ttl, lease.name, lease.token, now),
                )
                return lease if cursor.rowcount == 1 else None

        return await self._call(renew)

    async def release_lease(self, lease: Lease) -> None:
        """Give up a claim at once; releasing a lost claim does nothing.

        Raises:
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        _args.check_lease(lease)
        self._check()

        def release(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                # The row stays (expired) so that tokens keep increasing across claims.
                conn.execute(
                    "UPDATE fs_leases SET expires_at = 0 WHERE name = ? AND token = ?",
                    (lease.name, lease.token),
                )

        await self._call(release)

    async def get_lease(self, name: str) -> Lease | None:
        """Return the live claim on ``name``, or None.

        Raises:
            ClosedError: The driver is not open.
            DriverError: SQLite failed.
        """
        _args.check_lease_name(name)
        self._check()

        def read(conn: sqlite3.Connection) -> Lease | None:
            row = conn.execute(_SQL_LEASE, (name,)).fetchone()
            if row is None or row[3] <= time.time():
                return None
            return Lease(name=name, holder=row[0], token=row[1], ttl=row[2])

        return await self._call(read)


# -- functions run on the database thread ----------------------------------------------------


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    cursor = conn.cursor()
    cursor.execute("BEGIN IMMEDIATE")  # take the write lock first: no upgrade deadlock
    try:
        yield cursor
        cursor.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


@contextlib.contextmanager
def _read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    cursor = conn.cursor()
    cursor.execute("BEGIN")  # one snapshot for every statement of the read
    try:
        yield cursor
    except BaseException:
        _rollback(conn)
        raise
    cursor.execute("COMMIT")


def _setup(
    path: str, memory: bool, create: bool, busy_timeout: float, conn: sqlite3.Connection
) -> int:
    """Check or create the schema of a store; return its head revision.

    Nothing is written to a file before it is known to be a flowstate store, or an empty one
    that ``create`` allows to become one. Processes opening a new file at the same time
    contend for it; switching it to WAL takes a lock that SQLite's busy handler does not wait
    for, so a busy setup is tried again (on the database thread) until ``busy_timeout`` has
    passed. Any other failure is permanent: a ``DriverError``, never "unavailable".
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return _setup_once(path, memory, create, conn)
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code not in (_SQLITE_BUSY, _SQLITE_LOCKED):
                name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
                raise DriverError(f"SQLite store {path} cannot be opened: {exc} ({name})") from exc
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def _setup_once(path: str, memory: bool, create: bool, conn: sqlite3.Connection) -> int:
    version = _check_version(conn, path)
    if version == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if tables:
            raise DriverError(
                f"{path} is not a flowstate store: it already holds tables that flowstate "
                "did not create"
            )
        if not (memory or create):
            raise DriverError(
                f"{path} exists but is empty, and flowstate did not create it; to make it a "
                "flowstate store, open it with ?create=1 (sqlite:///path.db?create=1)"
            )
    if not memory:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("%s: WAL mode unavailable, using journal mode %s", path, mode)
    if version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have created or migrated the schema while this one waited.
            version = _check_version(conn, path)
            if version == 0:
                _create_schema(conn, path)
            elif version < SCHEMA_VERSION:
                _migrate(conn, path, version)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
    row = conn.execute(_SQL_HEAD).fetchone()
    head: int = row[0] or 0
    return head


def _check_version(conn: sqlite3.Connection, path: str) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    application_id: int = conn.execute("PRAGMA application_id").fetchone()[0]
    if application_id not in (0, APPLICATION_ID):
        raise DriverError(f"{path} is not a flowstate store (application id {application_id:#x})")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path} was written by a newer flowstate (schema version {version}; this "
            f"flowstate reads up to version {SCHEMA_VERSION}): upgrade flowstate to open it"
        )
    if version and application_id != APPLICATION_ID:
        raise DriverError(f"{path} is not a flowstate store (user_version {version})")
    return version


def _create_schema(conn: sqlite3.Connection, path: str) -> None:
    tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    if tables:
        raise DriverError(
            f"{path} is not a flowstate store: it already holds tables that flowstate "
            "did not create"
        )
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _migrate(conn: sqlite3.Connection, path: str, version: int) -> None:
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in _MIGRATIONS[target]:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    logger.info(
        "%s: migrated the store from schema version %d to %d", path, version, SCHEMA_VERSION
    )


def _create_store_file(path: str) -> None:
    """Create a new store at ``path`` unless something is there already.

    The store is built in a private file beside ``path`` (mode :data:`FILE_MODE`) and linked
    into place in one step, so that nobody ever sees a half-made store, and a file that
    exists but is empty was never made by flowstate. When two processes race, one link wins
    and the other process opens that store.
    """
    if os.path.lexists(path):
        return
    directory = os.path.dirname(os.path.abspath(path))
    draft = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.new")
    os.close(os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
    try:
        conn = sqlite3.connect(draft, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = FULL")  # on disk before it is linked
            conn.execute("BEGIN IMMEDIATE")
            _create_schema(conn, path)
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            os.link(draft, path)
        except FileExistsError:
            return  # another process made the store first: this one opens theirs
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name survives a crash too
        finally:
            os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(draft)


def _connect(path: str, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    """Open the store's connection. It never creates a file: a missing store is created by
    :func:`_create_store_file` first, and only a regular file is opened."""
    target = _MEMORY
    if path != _MEMORY:
        try:
            _create_store_file(path)
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise DriverError(f"{path} is not a regular file, so it cannot be a store")
        except OSError as exc:
            raise DriverError(
                f"SQLite store {path} cannot be opened or created: {exc.strerror or exc}"
            ) from exc
        # An absolute path goes after an empty authority: "file:" followed by "//" would make
        # SQLite read a path that starts with "//" (one POSIX allows) as a host name.
        target = f"file:{'//' if path.startswith('/') else ''}{quote(path)}?mode=rw"
    conn = sqlite3.connect(
        target,
        timeout=busy_timeout,
        isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
        cached_statements=256,
        uri=target != _MEMORY,
    )
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    return conn


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _decode(decode: Callable[[bytes], State], rev: int, committed_at: int, blob: bytes) -> State:
    state = decode(blob)
    state.rev = rev
    state.committed_at = _to_datetime(committed_at)
    return state


def _read_head(conn: sqlite3.Connection) -> int:
    head: int = conn.execute(_SQL_HEAD).fetchone()[0] or 0
    return head


def _write_group(
    commits: list[list[_Write]], conn: sqlite3.Connection
) -> tuple[list[_Outcome], int]:
    """Write a group of commits in one transaction; each one is checked on its own.

    Returns each commit's outcome (its result, or the ConflictError it gets) and the head
    revision after the group.
    """
    with _write_transaction(conn) as cursor:
        execute = cursor.execute
        last = execute(_SQL_LAST).fetchone()
        head, last_ms = (last[0], last[1]) if last is not None else (0, 0)
        # The wall clock may go back; commit times must not (since_time relies on it).
        now_ms = max(time.time_ns() // 1_000_000, last_ms)
        committed_at = _to_datetime(now_ms)
        latest: dict[str, int] = {}
        stored_revs: dict[str, int] = {}  # each state's latest revision before the group
        # The version each written state ends the group at, and its labels.
        written: dict[str, tuple[int, list[tuple[str, str]]]] = {}
        outcomes: list[_Outcome] = []
        log_rows: list[tuple[int, str, int, bytes]] = []
        label_rows: list[tuple[str, str, int]] = []
        data_rows: list[tuple[str, str, int, bytes]] = []
        delay_rows: list[tuple[int, str, int]] = []
        for writes in commits:
            conflicts: list[Conflict] = []
            for write in writes:
                actual = latest.get(write.id)
                if actual is None:
                    row = execute(_SQL_LATEST_REV, (write.id,)).fetchone()
                    actual = latest[write.id] = row[0] if row is not None else 0
                    stored_revs[write.id] = actual
                if actual != write.expected_rev:
                    conflicts.append(Conflict(write.id, write.expected_rev, actual))
            if conflicts:
                outcomes.append(ConflictError(conflicts))
                continue
            revs = []
            for write in writes:
                head += 1
                rev = head
                latest[write.id] = rev
                written[write.id] = (rev, write.labels)
                log_rows.append((rev, write.id, now_ms, write.state))
                for key, value in write.labels:
                    label_rows.append((key, value, rev))
                for alias, blob in write.data:
                    data_rows.append((write.id, alias, rev, blob))
                if write.delay_at_us is not None:
                    delay_rows.append((rev, write.delay_to, write.delay_at_us))
                revs.append(rev)
            outcomes.append(CommitResult(revs=revs, committed_at=committed_at))
        if log_rows:
            executemany = cursor.executemany
            executemany(_SQL_INSERT_LOG, log_rows)
            if label_rows:
                executemany(_SQL_INSERT_LABEL, label_rows)
            # The index of latest versions' labels: drop each state's version from before
            # the group (``stored``), add the version it ends the group at.
            stored = [(rev,) for state_id in written if (rev := stored_revs[state_id])]
            if stored:
                executemany(_SQL_DELETE_LATEST_LABELS, stored)
            latest_labels = [
                (key, value, rev) for rev, labels in written.values() for key, value in labels
            ]
            if latest_labels:
                executemany(_SQL_INSERT_LATEST_LABEL, latest_labels)
            executemany(
                _SQL_UPSERT_LATEST, [(state_id, rev) for state_id, (rev, _) in written.items()]
            )
            if data_rows:
                executemany(_SQL_INSERT_DATA, data_rows)
            if delay_rows:
                executemany(_SQL_INSERT_DELAY, delay_rows)
    return outcomes, head


def _since_time_rev(cursor: sqlite3.Cursor, since_time: datetime.datetime, head: int) -> int:
    """The revision before the first one committed at or after ``since_time``.

    Commit times never decrease along revisions (each commit's time is clamped to the one
    before it, under the write lock), so the revision primary key orders the log by time too:
    a binary search over it takes O(log n) primary-key lookups, and commits keep no separate
    time index up to date.
    """
    threshold_ms = -(-_micros(since_time) // 1000)  # stored times are whole milliseconds
    # The smallest ``low`` such that the first version at or after ``low`` (if any) is not
    # older than the threshold; every version before ``low`` is older.
    low, high = 1, head + 1
    while low < high:
        middle = (low + high) // 2
        row = cursor.execute(_SQL_TIME_FROM, (middle,)).fetchone()
        if row is None or row[1] >= threshold_ms:
            high = middle
        else:
            low = row[0] + 1
    return low - 1


def _label_arms(
    cursor: sqlite3.Cursor,
    label_sets: list[dict[str, str]],
    latest_only: bool,
    since_rev: int,
    head: int,
) -> tuple[str, list[object]]:
    """SQL selecting the matching revisions after ``since_rev``, one SELECT per AND-map.

    Each arm walks the label index for one pair of its map and checks the other pairs by
    primary key, so a selective filter reads only its own postings. ``latest_only`` reads
    the index of latest versions' labels instead, so versions that are no longer latest
    cost nothing. The walked pair is the sparsest one after ``since_rev``: the probe reads
    up to ``_PROBE_CAP`` postings of each pair and compares how many revisions they span
    (a pair with fewer postings than that is counted exactly), so two pairs that both have
    many postings are still told apart.
    """
    table = "fs_latest_labels" if latest_only else "fs_labels"
    arms = []
    params: list[object] = []
    for wanted in label_sets:
        pairs = list(wanted.items())
        if len(pairs) > 1:
            probe = _SQL_PROBE_LATEST if latest_only else _SQL_PROBE
            densities = []
            for key, value in pairs:
                last, count = cursor.execute(probe, (key, value, since_rev)).fetchone()
                span = (last if count == _PROBE_CAP else head) - since_rev
                densities.append(count / max(span, 1))
            lead = densities.index(min(densities))
            pairs.insert(0, pairs.pop(lead))
        (key, value), others = pairs[0], pairs[1:]
        sql = [f"SELECT a.rev FROM {table} a WHERE a.key = ? AND a.value = ? AND a.rev > ?"]
        params += [key, value, since_rev]
        sql.append(_labels_at(others, params, table))
        arms.append("".join(sql))
    return " UNION ".join(arms), params


def _history_arm(
    state_id: str, label_sets: list[dict[str, str]], latest_only: bool, since_rev: int
) -> tuple[str, list[object]]:
    """SQL selecting the revisions of one state after ``since_rev`` that match the labels.

    It walks the state's own versions (index ``fs_log_id``) and checks each AND-map's pairs
    by primary key.
    """
    params: list[object] = [state_id, since_rev]
    sql = ["SELECT a.rev FROM fs_log a WHERE a.id = ? AND a.rev > ?"]
    if label_sets:
        ors = []
        for wanted in label_sets:
            ors.append("(1" + _labels_at(list(wanted.items()), params, "fs_labels") + ")")
        sql.append(" AND (" + " OR ".join(ors) + ")")
    if latest_only:
        sql.append(" AND EXISTS (SELECT 1 FROM fs_latest x WHERE x.id = a.id AND x.rev = a.rev)")
    return "".join(sql), params


def _labels_at(pairs: list[tuple[str, str]], params: list[object], table: str) -> str:
    """SQL conditions: the version at ``a.rev`` carries every label pair of ``pairs`` (in
    ``table``: ``fs_labels``, or ``fs_latest_labels`` for latest versions only)."""
    sql = []
    for n, (key, value) in enumerate(pairs):
        sql.append(
            f" AND EXISTS (SELECT 1 FROM {table} b{n} WHERE b{n}.key = ? "
            f"AND b{n}.value = ? AND b{n}.rev = a.rev)"
        )
        params += [key, value]
    return "".join(sql)


def _matching(
    cursor: sqlite3.Cursor, query: StatesQuery, since_rev: int, head: int
) -> tuple[str, list[object]] | None:
    """SQL selecting the revisions after ``since_rev`` that match the query's id and labels;
    None when the query filters on neither."""
    if query.id is not None:
        return _history_arm(query.id, query.label_sets, query.latest_only, since_rev)
    if query.label_sets:
        return _label_arms(cursor, query.label_sets, query.latest_only, since_rev, head)
    return None


def _read_page(
    decode: Callable[[bytes], State], query: StatesQuery, conn: sqlite3.Connection
) -> StatesPage:
    with _read_transaction(conn) as cursor:
        head: int = cursor.execute(_SQL_HEAD).fetchone()[0] or 0
        since_rev = query.since_rev
        if query.since_time is not None:
            since_rev = max(since_rev, _since_time_rev(cursor, query.since_time, head))
        latest_only = query.latest_only
        if query.since_latest:
            last: int | None
            matching = _matching(cursor, query, since_rev, head)
            if matching is not None:
                arms, params = matching
                row = cursor.execute(f"{arms} ORDER BY 1 DESC LIMIT 1", params).fetchone()
                last = None if row is None else row[0]
            elif latest_only:
                last = cursor.execute(_SQL_LAST_LATEST, (since_rev,)).fetchone()[0]
            else:
                last = head if head > since_rev else None
            if last is None:
                return StatesPage(states=[], more=False, head_rev=head)
            since_rev = last - 1
        limit = query.limit
        matching = _matching(cursor, query, since_rev, head)
        if matching is not None:
            arms, params = matching
            rows = cursor.execute(
                f"SELECT l.rev, l.committed_at, l.state FROM ({arms} ORDER BY 1 LIMIT ?) m "
                "JOIN fs_log l ON l.rev = m.rev ORDER BY l.rev",
                [*params, limit + 1],
            ).fetchall()
        elif latest_only:
            rows = cursor.execute(_SQL_PAGE_LATEST, (since_rev, limit + 1)).fetchall()
        else:
            rows = cursor.execute(_SQL_PAGE_ALL, (since_rev, limit + 1)).fetchall()
    states = [_decode(decode, rev, ms, blob) for rev, ms, blob in rows[:limit]]
    return StatesPage(states=states, more=len(rows) > limit, head_rev=head)
