"""The driver contract: the ``Driver`` ABC, the records that cross it, and ``open_driver``.

A driver stores state versions and answers queries about them. It knows nothing of flows or
commands: the engine turns commands into one :class:`CommitRequest` per atomic commit.

Every driver guarantees:

* one global, strictly increasing revision per store; every stored state version has one;
* :meth:`Driver.commit` is all-or-nothing: the states, their data and their delays are written
  together, or (on a revision mismatch, or any failure) nothing is;
* readers never see part of a commit, and a page of results never splits a revision;
* everything a driver returns is an independent copy: changing it changes nothing stored.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import importlib
import importlib.metadata
import logging
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import msgspec

from flowstate._checks import is_text
from flowstate._state import State
from flowstate.errors import (
    FlowstateError,
    MissingDependencyError,
    UnknownDriverError,
)

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from flowstate._query import StatesPage, StatesQuery

__all__ = [
    "CommitRequest",
    "CommitResult",
    "DelayedState",
    "DelaysPage",
    "Driver",
    "Lease",
    "RevisionWaiters",
    "StateWrite",
    "SupportsLease",
    "hide_password",
    "open_driver",
    "register_driver",
]

logger = logging.getLogger("flowstate.drivers")


class StateWrite(msgspec.Struct, kw_only=True, gc=False):
    """One state written by a commit.

    Attributes:
        state: The version to store. The driver stores it with the new revision and
            commit time; it never changes this object.
        expected_rev: The state's latest stored revision this write is based on; 0 means
            the state must not exist yet.
        data: New data blobs, by alias, stored with this version (their revision is the
            version's revision).
        delay_to: With ``delay_at``: a delay bound to this version. When due, the state is
            transited to ``delay_to`` if this version is still its latest.
        delay_at: When the delay is due (UTC).
    """

    state: State
    expected_rev: int
    data: dict[str, bytes] | None = None
    delay_to: str = ""
    delay_at: datetime.datetime | None = None


class CommitRequest(msgspec.Struct, kw_only=True, gc=False):
    """All the writes of one atomic commit; state ids are distinct."""

    writes: list[StateWrite]


class CommitResult(msgspec.Struct, kw_only=True, gc=False):
    """What a successful commit stored.

    Attributes:
        revs: The new revision of each write, in request order. Strictly increasing within
            the store; states committed together may share one revision or take
            consecutive ones.
        committed_at: The commit time (UTC, millisecond precision) recorded on every version.
    """

    revs: list[int]
    committed_at: datetime.datetime


class DelayedState(msgspec.Struct, kw_only=True):
    """A delay committed with a state version.

    Attributes:
        state: The state version the delay is bound to (its ``rev`` is set).
        to: The flow to transit to when due.
        at: When the delay is due (UTC).
    """

    state: State
    to: str
    at: datetime.datetime

    @property
    def rev(self) -> int:
        """The revision the delay was committed at (the bound version's revision)."""
        return self.state.rev


class DelaysPage(msgspec.Struct, kw_only=True):
    """Delays in commit order, with ``more`` when a next page exists."""

    delays: list[DelayedState]
    more: bool = False


class Lease(msgspec.Struct, kw_only=True, frozen=True):
    """A named, time-limited claim held by one holder (the leader-election primitive).

    Attributes:
        name: What is claimed, e.g. ``"recovery"``.
        holder: Who holds it (a process-unique id).
        token: A number that changes with every acquisition, to tell claims apart.
        ttl: Seconds the claim lasts without renewal.
    """

    name: str
    holder: str
    token: int
    ttl: float


@runtime_checkable
class SupportsLease(Protocol):
    """Drivers that can elect a leader. All built-in drivers implement it."""

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Claim ``name`` for ``holder`` if nobody holds it (or the claim expired).

        Returns:
            The lease, or None when another holder's claim is still live.

        Raises:
            DriverError: The backend failed.
        """
        ...

    async def renew_lease(self, lease: Lease) -> Lease | None:
        """Extend a claim by its ttl. Returns None when the claim was lost (expired or taken).

        Raises:
            DriverError: The backend failed.
        """
        ...

    async def release_lease(self, lease: Lease) -> None:
        """Give up a claim at once, so a standby can take over without waiting for expiry.

        Releasing a lost claim does nothing.

        Raises:
            DriverError: The backend failed.
        """
        ...

    async def get_lease(self, name: str) -> Lease | None:
        """Return the live claim on ``name``, or None.

        Raises:
            DriverError: The backend failed.
        """
        ...


class RevisionWaiters:
    """The highest revision a driver knows is committed, and the tasks waiting for more.

    A helper for implementing :meth:`Driver.wait_for_rev`: call :meth:`advance` whenever a
    higher head revision becomes known, and :meth:`close` when the driver closes.
    """

    __slots__ = ("_closed", "_waiters", "head")

    def __init__(self, head: int = 0) -> None:
        self.head = head
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closed: BaseException | None = None

    def __len__(self) -> int:
        """How many tasks are waiting."""
        return len(self._waiters)

    def advance(self, head: int) -> None:
        """Note that revisions up to ``head`` are committed; wake whoever waited for them."""
        if head <= self.head:
            return
        self.head = head
        if not self._waiters:
            return
        still = []
        for rev, fut in self._waiters:
            if rev > head:
                still.append((rev, fut))
            elif not fut.done():
                fut.set_result(None)
        self._waiters = still

    async def wait(self, rev: int) -> None:
        """Return once :attr:`head` is at least ``rev``.

        Raises:
            ClosedError: :meth:`close` was called, before or while waiting.
        """
        if self._closed is not None:
            raise self._closed
        if self.head >= rev:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((rev, fut))
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()
            self._waiters = [w for w in self._waiters if w[1] is not fut]

    def close(self, error: FlowstateError) -> None:
        """Fail every waiter, now and later, with ``error``."""
        self._closed = error
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(error)


class Driver(abc.ABC):
    """Storage for state versions. Subclass it to add a backend.

    A driver is an async resource: ``async with driver:`` opens and closes it; :meth:`aclose`
    may be called more than once. Methods called on a closed driver raise ``ClosedError``.
    Every method may also raise ``DriverError`` (``DriverUnavailableError`` when the backend
    cannot be reached); backend exceptions never escape.
    """

    #: The URL scheme the driver is registered under (``memory``, ``sqlite``, ``etcd``,
    #: ``postgresql``).
    scheme: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> Self:
        """Create an unopened driver from its URL.

        Raises:
            InvalidURLError: The URL cannot be parsed for this driver.
        """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and prepare the store. Opening an open driver does nothing.

        Raises:
            ClosedError: The driver was closed.
            DriverError: The backend failed (``SchemaVersionError`` for a newer schema).
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release every resource. Calling it again does nothing."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def commit(self, request: CommitRequest) -> CommitResult:
        """Write every state of ``request`` atomically, if every ``expected_rev`` matches.

        Commits one after another must let the event loop run other tasks: a driver whose
        commits need no I/O still suspends its caller every so many commits.

        ``request`` is taken to be one an :class:`~flowstate.Engine` could have built: its
        ids, labels and annotations valid text, each state written once. The engine checks
        the commands it turns into a request, and ``flowstate serve`` the requests it
        receives; drivers do not check them again on every commit.

        Raises:
            ConflictError: Some state's latest revision differed from ``expected_rev``; it
                lists every such state, and nothing was written.
            DriverUnavailableError: The backend could not be reached. The commit may or may
                not have been applied; a retry with the same expected revisions is safe (it
                conflicts if the first attempt was applied).
        """

    @abc.abstractmethod
    async def get_state(self, state_id: str, rev: int = 0) -> State:
        """Return a state's version at ``rev``, or its latest version when ``rev`` is 0.

        Raises:
            NotFoundError: No such state, or ``rev`` is not one of its versions.
        """

    @abc.abstractmethod
    async def get_states(self, query: StatesQuery) -> StatesPage:
        """Return one page of the versions matching ``query``, ascending by revision."""

    @abc.abstractmethod
    async def head_rev(self) -> int:
        """Return the store's latest revision (0 for an empty store)."""

    @abc.abstractmethod
    async def wait_for_rev(self, rev: int) -> None:
        """Return once the store's latest revision is at least ``rev``.

        Commits made through this driver object wake waiters at once; commits made by other
        processes are noticed as soon as the backend allows (push where it can).

        Raises:
            ClosedError: The driver was closed while waiting.
        """

    @abc.abstractmethod
    async def get_data(self, state_id: str, alias: str, rev: int = 0) -> tuple[int, bytes]:
        """Return ``(rev, blob)`` of the data stored under ``alias`` as of state version
        ``rev`` (the newest data version at or below it); latest when ``rev`` is 0.

        Raises:
            NotFoundError: No such data.
        """

    @abc.abstractmethod
    async def get_delays(self, since_rev: int = 0, limit: int = 100) -> DelaysPage:
        """Return delays committed after ``since_rev`` (exclusive), in commit order."""


# Built-in drivers, imported only when their scheme is used.
_BUILTIN: dict[str, str] = {
    "memory": "flowstate.drivers.memory:MemoryDriver",
    "sqlite": "flowstate.drivers.sqlite:SQLiteDriver",
    "etcd": "flowstate.drivers.etcd:EtcdDriver",
    "postgresql": "flowstate.drivers.postgres:PostgresDriver",
    "postgres": "flowstate.drivers.postgres:PostgresDriver",
    "http": "flowstate.drivers.http:HTTPDriver",
    "https": "flowstate.drivers.http:HTTPDriver",
}
_EXTRAS: dict[str, str] = {
    "etcd": "etcd",
    "postgresql": "postgres",
    "postgres": "postgres",
    "http": "http",
    "https": "http",
}
_REGISTERED: dict[str, type[Driver]] = {}
ENTRY_POINT_GROUP = "flowstate.drivers"


def register_driver(scheme: str, driver_cls: type[Driver]) -> None:
    """Make ``open_driver`` use ``driver_cls`` for URLs with ``scheme``.

    Third-party packages usually register through the ``flowstate.drivers`` entry-point group
    instead (name: the scheme, value: ``"package.module:DriverClass"``).
    """
    _REGISTERED[scheme] = driver_cls


def _load(scheme: str) -> type[Driver]:
    if scheme in _REGISTERED:
        return _REGISTERED[scheme]
    target = _BUILTIN.get(scheme)
    entry_point = None
    if target is None:
        found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=scheme)
        entry_point = next(iter(found), None)
        if entry_point is None:
            known = sorted({*_BUILTIN, *_REGISTERED, *_entry_point_names()})
            raise UnknownDriverError(
                f"no flowstate driver for scheme {scheme!r}; known schemes: {', '.join(known)}"
            )
        target = entry_point.value
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name or exc.name is None:
            raise
        extra = _EXTRAS.get(scheme)
        hint = f"; install it with: pip install 'flowstate-engine[{extra}]'" if extra else ""
        raise MissingDependencyError(
            f"the {scheme!r} driver needs the {exc.name!r} package{hint}"
        ) from exc
    driver_cls: type[Driver] = getattr(module, attr)
    return driver_cls


def _entry_point_names() -> list[str]:
    return [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]


def open_driver(url: str) -> Driver:
    """Create the (unopened) driver a URL names.

    ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite://:memory:``,
    ``etcd://host:port[,host:port...]/key-prefix``,
    ``postgresql://user@host:port/database?schema=name`` and ``http://host:port`` (a store
    served by ``flowstate serve``) are built in; other schemes come from the
    ``flowstate.drivers`` entry-point group.

    Raises:
        InvalidURLError: The URL has no scheme, or the driver cannot parse it.
        UnknownDriverError: No driver is registered for the scheme.
        MissingDependencyError: The driver's optional dependency is not installed.
    """
    from flowstate.errors import InvalidURLError

    if not _is_url(url):
        raise InvalidURLError(
            f"{url!r} is not a driver URL; expected e.g. 'memory://' or 'sqlite:///flowstate.db'"
        )
    if not is_text(url):
        raise InvalidURLError(f"{url!r} is not valid Unicode text (it holds a lone surrogate)")
    scheme = url.split("://", 1)[0].lower()
    driver = _load(scheme).from_url(url)
    logger.debug("opened driver %s", hide_password(url))
    return driver


def _is_url(value: object) -> bool:
    return isinstance(value, str) and "://" in value


def hide_password(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for logs and reprs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
