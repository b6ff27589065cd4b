"""FaultyDriver: every fault kind on the memory driver, and a faithful pass-through otherwise."""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator

import pytest

import flowstate as fs
from flowstate.drivers.base import (
    CommitRequest,
    CommitResult,
    DelaysPage,
    StateWrite,
    SupportsLease,
)
from flowstate.drivers.faulty import (
    Fault,
    FaultSchedule,
    FaultyDriver,
    InjectedFault,
    SimulatedCrashError,
)
from flowstate.drivers.memory import MemoryDriver
from flowstate.testing.conformance import DriverTests
from flowstate.testing.stateful import run_driver_machine

pytestmark = pytest.mark.anyio


class TestFaultyDriverWithoutFaults(DriverTests):
    """With no faults scheduled, the wrapper is the driver it wraps."""

    @pytest.fixture
    async def driver(self) -> AsyncIterator[FaultyDriver]:
        async with FaultyDriver(MemoryDriver()) as driver:
            yield driver


@pytest.mark.slow
def test_faulty_driver_matches_the_model() -> None:
    run_driver_machine(lambda: FaultyDriver(MemoryDriver()))


def write(state_id: str, expected_rev: int = 0, to: str = "next") -> StateWrite:
    return StateWrite(
        state=fs.State(id=state_id, transition=fs.Transition(to=to)), expected_rev=expected_rev
    )


def request(*writes: StateWrite) -> CommitRequest:
    return CommitRequest(writes=list(writes))


@pytest.fixture
async def inner() -> AsyncIterator[MemoryDriver]:
    async with MemoryDriver() as driver:
        yield driver


async def test_fail_writes_nothing(inner: MemoryDriver) -> None:
    driver = FaultyDriver(inner, {1: Fault.FAIL})
    with pytest.raises(fs.DriverUnavailableError):
        await driver.commit(request(write("a"), write("b")))
    assert await inner.head_rev() == 0
    assert driver.injected == [InjectedFault(1, Fault.FAIL, ("a", "b"))]
    assert not driver.crashed
    (rev,) = (await driver.commit(request(write("a")))).revs
    assert (await inner.get_state("a")).rev == rev, "the next commit passes through"


async def test_conflict_writes_nothing_and_names_every_state(inner: MemoryDriver) -> None:
    (rev_a,) = (await inner.commit(request(write("a")))).revs
    driver = FaultyDriver(inner, {1: Fault.CONFLICT})
    with pytest.raises(fs.ConflictError) as info:
        await driver.commit(request(write("a", rev_a, to="moved"), write("new")))
    assert info.value.conflicts == [fs.Conflict("a", rev_a, rev_a), fs.Conflict("new", 0, 0)]
    assert await inner.head_rev() == rev_a
    assert (await inner.get_state("a")).transition.to == "next"


async def test_crash_before_applying(inner: MemoryDriver) -> None:
    driver = FaultyDriver(inner, [None, Fault.CRASH_BEFORE])
    await driver.commit(request(write("a")))
    with pytest.raises(SimulatedCrashError) as info:
        await driver.commit(request(write("b")))
    assert (info.value.number, info.value.applied, info.value.state_ids) == (2, False, ("b",))
    assert await inner.head_rev() == 1
    with pytest.raises(fs.NotFoundError):
        await inner.get_state("b")


async def test_crash_after_applying_keeps_the_commit(inner: MemoryDriver) -> None:
    driver = FaultyDriver(inner, {1: Fault.CRASH_AFTER})
    with pytest.raises(SimulatedCrashError) as info:
        await driver.commit(request(write("a", to="there")))
    assert info.value.applied
    stored = await inner.get_state("a")
    assert stored.transition.to == "there"


async def test_a_crashed_process_does_nothing_more(inner: MemoryDriver) -> None:
    driver = FaultyDriver(inner, {1: Fault.CRASH_AFTER})
    with pytest.raises(SimulatedCrashError):
        await driver.commit(request(write("a")))
    assert driver.crashed
    assert isinstance(driver, SupportsLease)
    for call in (
        driver.get_state("a"),
        driver.head_rev(),
        driver.get_states(fs.StatesQuery()),
        driver.commit(request(write("b"))),
        driver.get_delays(),
        driver.get_data("a", "x"),
        driver.wait_for_rev(1),
        driver.acquire_lease("l", "me", 1.0),
    ):
        with pytest.raises(SimulatedCrashError):
            await call
    assert driver.commits == 1, "a dead process makes no commits"
    driver.revive()
    assert (await driver.get_state("a")).id == "a"
    assert "crashed" not in repr(driver)


async def test_lost_reply_keeps_the_commit(inner: MemoryDriver) -> None:
    driver = FaultyDriver(inner, {1: Fault.LOST_REPLY})
    with pytest.raises(fs.DriverUnavailableError):
        await driver.commit(request(write("a")))
    assert (await inner.get_state("a")).rev == 1
    with pytest.raises(fs.ConflictError):
        await driver.commit(request(write("a")))  # the retry the error invites conflicts


async def test_a_fault_after_applying_hides_the_real_answer(inner: MemoryDriver) -> None:
    await inner.commit(request(write("a")))
    driver = FaultyDriver(inner, {1: Fault.LOST_REPLY})
    with pytest.raises(fs.DriverUnavailableError):
        await driver.commit(request(write("a")))  # stale: the store rejected it
    assert await inner.head_rev() == 1


async def test_engine_execution_under_each_fault(inner: MemoryDriver) -> None:
    async def step(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.Commit(fs.End(ctx))

    expected = {
        Fault.FAIL: "step",
        Fault.CONFLICT: "step",
        Fault.CRASH_BEFORE: "step",
        Fault.CRASH_AFTER: "",
        Fault.LOST_REPLY: "",
    }
    for number, (fault, stored_to) in enumerate(expected.items()):
        ctx = fs.StateCtx.new(f"s{number}")
        async with fs.Engine(inner) as engine:
            await engine.do(fs.Commit(fs.Transit(ctx, "step")))
        driver = FaultyDriver(inner, {1: fault})
        async with fs.Engine(driver, flows={"step": step}) as engine:
            if fault is Fault.CONFLICT:
                result = await engine.execute(ctx)
                assert result.status == "conflict"
            else:
                error = SimulatedCrashError if fault.crashes else fs.DriverUnavailableError
                with pytest.raises(error):
                    await engine.execute(ctx)
        assert ctx.committed.transition.to == "step", "a failed commit leaves the ctx as it was"
        assert (await inner.get_state(ctx.id)).transition.to == stored_to, fault


async def test_decider_sees_each_commit(inner: MemoryDriver) -> None:
    seen: list[tuple[int, list[str]]] = []

    def decide(number: int, req: CommitRequest) -> Fault | None:
        seen.append((number, [w.state.id for w in req.writes]))
        return Fault.FAIL if req.writes[0].state.id == "bad" else None

    driver = FaultyDriver(inner, decide)
    await driver.commit(request(write("a")))
    with pytest.raises(fs.DriverUnavailableError):
        await driver.commit(request(write("bad")))
    assert seen == [(1, ["a"]), (2, ["bad"])]
    assert driver.commits == 2


async def test_passthrough_and_lifecycle() -> None:
    inner = MemoryDriver()
    driver = FaultyDriver(inner)
    async with driver:
        assert isinstance(driver, SupportsLease)
        lease = await driver.acquire_lease("l", "me", 5.0)
        assert lease is not None
        assert await driver.get_lease("l") == lease
        assert await driver.renew_lease(lease) == lease
        await driver.release_lease(lease)
        assert await driver.get_lease("l") is None
        await driver.commit(request(write("a")))
        assert await driver.head_rev() == 1
    with pytest.raises(fs.ClosedError):
        await inner.head_rev()
    assert repr(driver) == f"FaultyDriver({inner!r}, commits=1, injected=0)"


class _NoLeases(fs.Driver):
    """A minimal driver without the lease capability (its methods are never called)."""

    scheme = "noleases"

    @classmethod
    def from_url(cls, url: str) -> _NoLeases:
        return cls()

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    async def commit(self, request: CommitRequest) -> CommitResult:
        raise NotImplementedError

    async def get_state(self, state_id: str, rev: int = 0) -> fs.State:
        raise NotImplementedError

    async def get_states(self, query: fs.StatesQuery) -> fs.StatesPage:
        raise NotImplementedError

    async def head_rev(self) -> int:
        return 0

    async def wait_for_rev(self, rev: int) -> None: ...
    async def get_data(self, state_id: str, alias: str, rev: int = 0) -> tuple[int, bytes]:
        raise NotImplementedError

    async def get_delays(self, since_rev: int = 0, limit: int = 100) -> DelaysPage:
        raise NotImplementedError


def test_leases_only_when_the_inner_driver_has_them() -> None:
    assert isinstance(FaultyDriver(MemoryDriver()), SupportsLease)
    plain = FaultyDriver(_NoLeases())
    assert not isinstance(plain, SupportsLease)
    assert type(plain) is FaultyDriver


def test_from_url() -> None:
    driver = FaultyDriver.from_url("faulty+memory://")
    assert isinstance(driver.inner, MemoryDriver)
    with pytest.raises(fs.InvalidURLError):
        FaultyDriver.from_url("memory://")


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        FaultyDriver("memory://")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FaultyDriver(MemoryDriver(), 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FaultyDriver(MemoryDriver(), ["fail"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="start at 1"):
        FaultSchedule({0: Fault.FAIL})
    with pytest.raises(TypeError):
        FaultSchedule({1: "fail"})  # type: ignore[arg-type]


def test_schedule_and_fault_reprs_are_python() -> None:
    schedule = FaultSchedule({3: Fault.CRASH_AFTER, 1: Fault.FAIL})
    assert repr(schedule) == "FaultSchedule({1: Fault.FAIL, 3: Fault.CRASH_AFTER})"
    assert eval(repr(schedule), {"FaultSchedule": FaultSchedule, "Fault": Fault}) == schedule
    assert str(schedule) == "commit #1: fail, commit #3: crash after applying"
    assert str(FaultSchedule()) == "no faults"
    assert [fault for fault in Fault if fault.applies] == [Fault.CRASH_AFTER, Fault.LOST_REPLY]
    assert [fault for fault in Fault if fault.crashes] == [Fault.CRASH_BEFORE, Fault.CRASH_AFTER]
    assert str(InjectedFault(2, Fault.CONFLICT, ("a",))) == "commit #2 of 'a': conflict"


def test_crash_is_not_an_exception_and_pickles() -> None:
    crash = SimulatedCrashError(3, True, ["a"])
    assert not isinstance(crash, Exception)
    again = pickle.loads(pickle.dumps(crash))
    assert (again.number, again.applied, again.state_ids) == (3, True, ("a",))
    assert str(again) == "simulated crash after applying commit #3 ('a')"
