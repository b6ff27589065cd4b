"""A driver that wraps another and injects faults into chosen commits.

``FaultyDriver(inner, faults)`` passes every call through to ``inner``, except that the
commits ``faults`` picks fail the way real stores and real processes fail:

* ``Fault.FAIL``: ``DriverUnavailableError`` is raised; nothing was written.
* ``Fault.CONFLICT``: ``ConflictError`` is raised, as if another writer had won; nothing was
  written.
* ``Fault.CRASH_BEFORE``: the process dies before the commit reaches the store: nothing was
  written and :class:`SimulatedCrashError` is raised.
* ``Fault.CRASH_AFTER``: the process dies right after the store applied the commit: it was
  written, but :class:`SimulatedCrashError` is raised instead of the result.
* ``Fault.LOST_REPLY``: the store applied the commit but its answer was lost:
  ``DriverUnavailableError`` is raised although the commit was written (the ambiguity the
  contract of ``Driver.commit`` allows).

After a crash the wrapper is *down*, as a dead process is: every call but ``open`` and
``aclose`` raises :class:`SimulatedCrashError` until :meth:`FaultyDriver.revive`. The inner
driver is unaffected; wrap it in a new ``FaultyDriver`` to play the next process.

The wrapper needs nothing but a plain schedule, so it works in any test::

    driver = FaultyDriver(MemoryDriver(), {2: Fault.CRASH_AFTER})
    async with driver, Engine(driver, flows=flows) as engine:
        ...

``flowstate.testing.flows`` drives it from hypothesis to search for the schedules that break
a flow's invariants.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias, cast

from attrs import frozen

from flowstate.drivers.base import (
    CommitRequest,
    CommitResult,
    DelaysPage,
    Driver,
    Lease,
    SupportsLease,
    open_driver,
)
from flowstate.errors import (
    Conflict,
    ConflictError,
    DriverUnavailableError,
    InvalidURLError,
    NotFoundError,
)

if TYPE_CHECKING:
    from typing import Self

    from flowstate._query import StatesPage, StatesQuery
    from flowstate._state import State

__all__ = [
    "Fault",
    "FaultDecider",
    "FaultSchedule",
    "FaultyDriver",
    "InjectedFault",
    "SimulatedCrashError",
]


class Fault(enum.Enum):
    """How an injected fault makes a commit fail.

    Listed simplest first: hypothesis shrinks a fault towards the top of this list.
    """

    #: ``DriverUnavailableError`` is raised; nothing was written.
    FAIL = "fail"
    #: ``ConflictError`` is raised for every state of the commit; nothing was written.
    CONFLICT = "conflict"
    #: The process crashes before the commit reaches the store; nothing was written.
    CRASH_BEFORE = "crash before applying"
    #: The process crashes right after the store applied the commit.
    CRASH_AFTER = "crash after applying"
    #: The commit was applied but its reply was lost: ``DriverUnavailableError`` is raised.
    LOST_REPLY = "fail after applying"

    def __repr__(self) -> str:
        # Failure reports print schedules; this makes them valid Python to paste into a test.
        return f"Fault.{self.name}"

    @property
    def applies(self) -> bool:
        """True when the commit reaches the store although the caller sees an error."""
        return self in (Fault.CRASH_AFTER, Fault.LOST_REPLY)

    @property
    def crashes(self) -> bool:
        """True when the fault kills the process (raises :class:`SimulatedCrashError`)."""
        return self in (Fault.CRASH_BEFORE, Fault.CRASH_AFTER)


class SimulatedCrashError(BaseException):
    """The process "died" at an injected crash (``Fault.CRASH_BEFORE`` or
    ``Fault.CRASH_AFTER``), or was used after one.

    It derives from ``BaseException``, as ``KeyboardInterrupt`` does, so that no
    ``except Exception`` in a flow can swallow it: real code does not run on after its
    process died. Test harnesses catch it where the simulated process ends.

    Attributes:
        number: The commit (1-based, through the wrapper) at which the process crashed.
        applied: Whether that commit reached the store.
        state_ids: The states that commit wrote.
    """

    def __init__(self, number: int, applied: bool, state_ids: Sequence[str] = ()) -> None:
        self.number = number
        self.applied = applied
        self.state_ids = tuple(state_ids)
        where = "after applying" if applied else "before applying"
        ids = ", ".join(repr(i) for i in self.state_ids)
        super().__init__(f"simulated crash {where} commit #{number} ({ids})")

    def __reduce__(self) -> tuple[type[SimulatedCrashError], tuple[int, bool, tuple[str, ...]]]:
        return (type(self), (self.number, self.applied, self.state_ids))


class FaultSchedule(Mapping[int, Fault]):
    """Which commits fail and how: commit number (from 1) to :class:`Fault`.

    A read-only mapping whose ``repr`` is valid Python, so that a schedule printed in a
    failure report can be pasted into a regression test.

    Raises:
        ValueError: A commit number is not an int >= 1.
        TypeError: A value is not a :class:`Fault`.
    """

    __slots__ = ("_faults",)

    def __init__(self, faults: Mapping[int, Fault] | Iterable[tuple[int, Fault]] = ()) -> None:
        items = faults.items() if isinstance(faults, Mapping) else faults
        checked: dict[int, Fault] = {}
        for number, fault in items:
            if type(number) is not int or number < 1:
                raise ValueError(f"commit numbers start at 1, not {number!r}")
            if not isinstance(fault, Fault):
                raise TypeError(f"commit #{number}: {fault!r} is not a Fault")
            checked[number] = fault
        self._faults = dict(sorted(checked.items()))

    def __getitem__(self, number: int) -> Fault:
        return self._faults[number]

    def __iter__(self) -> Iterator[int]:
        return iter(self._faults)

    def __len__(self) -> int:
        return len(self._faults)

    def __repr__(self) -> str:
        return f"FaultSchedule({self._faults!r})"

    def __str__(self) -> str:
        if not self._faults:
            return "no faults"
        return ", ".join(f"commit #{n}: {fault.value}" for n, fault in self._faults.items())


#: Asked before each commit with its number (from 1) and request; returns a fault or None.
FaultDecider: TypeAlias = Callable[[int, CommitRequest], Fault | None]

#: Everything ``FaultyDriver`` accepts as its ``faults``.
FaultsArg: TypeAlias = Mapping[int, Fault] | Sequence[Fault | None] | FaultDecider | None


@frozen
class InjectedFault:
    """A fault that was injected.

    Attributes:
        number: The commit's number (from 1).
        fault: What happened to it.
        state_ids: The states the commit wrote.
    """

    number: int
    fault: Fault
    state_ids: tuple[str, ...]

    def __str__(self) -> str:
        ids = ", ".join(repr(i) for i in self.state_ids)
        return f"commit #{self.number} of {ids}: {self.fault.value}"


def _decider(faults: FaultsArg) -> FaultDecider:
    if faults is None:
        return lambda number, request: None
    if isinstance(faults, Mapping):
        schedule = FaultSchedule(faults)
        return lambda number, request: schedule.get(number)
    if callable(faults):
        return faults
    if isinstance(faults, Sequence):
        tape = list(faults)
        for fault in tape:
            if fault is not None and not isinstance(fault, Fault):
                raise TypeError(f"{fault!r} is not a Fault (or None)")
        return lambda number, request: tape[number - 1] if number <= len(tape) else None
    raise TypeError(
        "faults must be a mapping {commit number: Fault}, a sequence of Fault | None, "
        f"or a callable (number, request) -> Fault | None; not {type(faults).__name__}"
    )


class FaultyDriver(Driver):
    """Wraps ``inner`` and makes chosen commits fail, conflict or crash the process.

    Everything else passes through unchanged, so without faults it behaves exactly as
    ``inner`` does (and passes the conformance suite). Opening and closing it opens and
    closes ``inner``. It supports leases when ``inner`` does.

    Args:
        inner: The driver to wrap.
        faults: Which commits fail: a mapping ``{commit number: Fault}`` (numbers count the
            commits made through this wrapper, from 1), a sequence with one ``Fault | None``
            per commit, or a callable ``(number, request) -> Fault | None`` asked before
            each commit. None injects nothing.

    Raises:
        TypeError: ``inner`` is not a driver, or ``faults`` is none of the above.

    Attributes:
        inner: The wrapped driver.
        commits: How many commits were made through the wrapper.
        injected: The faults injected so far, in order.
    """

    scheme = "faulty"

    def __new__(cls, inner: Driver, faults: FaultsArg = None) -> Self:
        # Leases are an optional capability found by isinstance(driver, SupportsLease): a
        # wrapper must have the lease methods exactly when the driver it wraps has them.
        if cls is FaultyDriver and isinstance(inner, SupportsLease):
            return cast("Self", super().__new__(_LeasingFaultyDriver))
        return super().__new__(cls)

    def __init__(self, inner: Driver, faults: FaultsArg = None) -> None:
        if not isinstance(inner, Driver):
            raise TypeError(f"FaultyDriver wraps a Driver, not {type(inner).__name__}")
        self.inner = inner
        self.commits = 0
        self.injected: list[InjectedFault] = []
        self._decide = _decider(faults)
        self._crash: SimulatedCrashError | None = None

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Wrap the driver of the URL that follows ``faulty+`` (``faulty+memory://``),
        injecting no faults.

        Raises:
            InvalidURLError: The URL does not start with ``faulty+``.
        """
        scheme, plus, rest = url.partition("+")
        if not plus or scheme.lower() != cls.scheme:
            raise InvalidURLError(f"{url!r}: a faulty driver URL looks like 'faulty+memory://'")
        return cls(open_driver(rest))

    def __repr__(self) -> str:
        down = ", crashed" if self._crash is not None else ""
        return (
            f"FaultyDriver({self.inner!r}, commits={self.commits}, "
            f"injected={len(self.injected)}{down})"
        )

    @property
    def crashed(self) -> bool:
        """True after a crash fault, until :meth:`revive`."""
        return self._crash is not None

    def revive(self) -> None:
        """Bring the wrapper back after a crash: calls pass through again."""
        self._crash = None

    def _check_up(self) -> None:
        crash = self._crash
        if crash is not None:
            raise SimulatedCrashError(crash.number, crash.applied, crash.state_ids) from crash

    async def open(self) -> None:
        """Open ``inner``.

        Raises:
            ClosedError: ``inner`` was closed.
            DriverError: ``inner`` could not be opened.
        """
        await self.inner.open()

    async def aclose(self) -> None:
        """Close ``inner``, crashed or not. Calling it again does nothing."""
        await self.inner.aclose()

    async def commit(self, request: CommitRequest) -> CommitResult:
        """Commit through ``inner``, unless this commit is scheduled to fail.

        Raises:
            ConflictError: A revision mismatch, or an injected conflict (nothing written).
            DriverUnavailableError: An injected failure (nothing written), a lost reply
                (written), or the inner driver's own.
            SimulatedCrashError: An injected crash, or any call after one.
        """
        self._check_up()
        self.commits += 1
        number = self.commits
        fault = self._decide(number, request)
        if fault is None:
            return await self.inner.commit(request)
        ids = tuple(write.state.id for write in request.writes)
        self.injected.append(InjectedFault(number, fault, ids))
        if fault is Fault.FAIL:
            raise DriverUnavailableError("injected fault: the commit failed, nothing was written")
        if fault is Fault.CONFLICT:
            conflicts = [await self._conflict(w.state.id, w.expected_rev) for w in request.writes]
            raise ConflictError(conflicts)
        if fault is Fault.CRASH_BEFORE:
            self._crash = SimulatedCrashError(number, False, ids)
            raise self._crash
        # The store gets the commit, but whatever it answers is lost to the caller.
        with contextlib.suppress(Exception):
            await self.inner.commit(request)
        if fault is Fault.CRASH_AFTER:
            self._crash = SimulatedCrashError(number, True, ids)
            raise self._crash
        raise DriverUnavailableError("injected fault: the commit was applied, its reply lost")

    async def _conflict(self, state_id: str, expected_rev: int) -> Conflict:
        try:
            actual = (await self.inner.get_state(state_id)).rev
        except NotFoundError:
            actual = 0
        return Conflict(state_id, expected_rev, actual)

    async def get_state(self, state_id: str, rev: int = 0) -> State:
        """``inner.get_state``.

        Raises:
            NotFoundError: No such state, or no version at ``rev``.
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        self._check_up()
        return await self.inner.get_state(state_id, rev)

    async def get_states(self, query: StatesQuery) -> StatesPage:
        """``inner.get_states``.

        Raises:
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        self._check_up()
        return await self.inner.get_states(query)

    async def head_rev(self) -> int:
        """``inner.head_rev``.

        Raises:
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        self._check_up()
        return await self.inner.head_rev()

    async def wait_for_rev(self, rev: int) -> None:
        """``inner.wait_for_rev``.

        Raises:
            ClosedError: ``inner`` was closed while waiting.
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        self._check_up()
        await self.inner.wait_for_rev(rev)

    async def get_data(self, state_id: str, alias: str, rev: int = 0) -> tuple[int, bytes]:
        """``inner.get_data``.

        Raises:
            NotFoundError: No such data.
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        self._check_up()
        return await self.inner.get_data(state_id, alias, rev)

    async def get_delays(self, since_rev: int = 0, limit: int = 100) -> DelaysPage:
        """``inner.get_delays``.

        Raises:
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        self._check_up()
        return await self.inner.get_delays(since_rev, limit)


class _LeasingFaultyDriver(FaultyDriver):
    """A FaultyDriver around a driver with leases: lease calls pass through too."""

    def _leases(self) -> SupportsLease:
        self._check_up()
        inner = self.inner
        assert isinstance(inner, SupportsLease)  # FaultyDriver.__new__ chose this class for it
        return inner

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """``inner.acquire_lease``.

        Raises:
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        return await self._leases().acquire_lease(name, holder, ttl)

    async def renew_lease(self, lease: Lease) -> Lease | None:
        """``inner.renew_lease``.

        Raises:
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        return await self._leases().renew_lease(lease)

    async def release_lease(self, lease: Lease) -> None:
        """``inner.release_lease``.

        Raises:
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        await self._leases().release_lease(lease)

    async def get_lease(self, name: str) -> Lease | None:
        """``inner.get_lease``.

        Raises:
            SimulatedCrashError: The wrapper crashed (until :meth:`revive`).
        """
        return await self._leases().get_lease(name)
