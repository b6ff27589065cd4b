"""The memory driver against the conformance suite, plus what only it promises."""

from __future__ import annotations

import datetime
import tracemalloc
from typing import TYPE_CHECKING, Any

import pytest

import flowstate as fs
from flowstate.drivers.base import CommitRequest, StateWrite
from flowstate.drivers.memory import MemoryDriver
from flowstate.testing.conformance import DriverTests
from flowstate.testing.stateful import run_driver_machine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class TestMemoryDriver(DriverTests):
    @pytest.fixture
    async def driver(self) -> AsyncIterator[MemoryDriver]:
        async with MemoryDriver() as driver:
            yield driver


def test_url() -> None:
    assert isinstance(fs.open_driver("memory://"), MemoryDriver)
    with pytest.raises(fs.InvalidURLError):
        fs.open_driver("memory://somewhere")


@pytest.mark.slow
def test_memory_driver_matches_the_model() -> None:
    run_driver_machine(MemoryDriver)


# -- history limit (keep=N) -------------------------------------------------------------------


def test_keep_url() -> None:
    driver = fs.open_driver("memory://?keep=3")
    assert isinstance(driver, MemoryDriver)
    assert driver.keep == 3
    assert MemoryDriver.from_url("memory://").keep is None
    for bad in (
        "memory://?keep=0",
        "memory://?keep=x",
        "memory://?keep=-1",
        "memory://?ttl=3",
        "memory://?keep=²",  # str.isdigit() says yes, int() says no
        "memory://?keep=٣",  # a digit, but not an ASCII one
    ):
        with pytest.raises(fs.InvalidURLError):
            fs.open_driver(bad)
    with pytest.raises(fs.InvalidURLError):
        MemoryDriver(keep=0)


async def _commit(driver: MemoryDriver, state_id: str, rev: int, **extra: Any) -> int:
    state = fs.State(id=state_id, labels={"kind": "order"}, transition=fs.Transition(to="x"))
    result = await driver.commit(
        CommitRequest(writes=[StateWrite(state=state, expected_rev=rev, **extra)])
    )
    return result.revs[0]


@pytest.mark.anyio
async def test_keep_drops_the_oldest_versions_of_each_state() -> None:
    async with MemoryDriver(keep=2) as driver:
        revs = []
        rev = 0
        for i in range(5):
            data = {"blob": b"first"} if i == 0 else None
            rev = await _commit(driver, "a", rev, data=data)
            revs.append(rev)
        other = await _commit(driver, "b", 0)
        for dropped in revs[:3]:
            with pytest.raises(fs.NotFoundError):
                await driver.get_state("a", dropped)
        assert (await driver.get_state("a", revs[3])).rev == revs[3]
        history = await driver.get_states(fs.StatesQuery(id="a"))
        assert [s.rev for s in history.states] == revs[3:]
        labelled = await driver.get_states(fs.StatesQuery(labels={"kind": "order"}))
        assert [s.rev for s in labelled.states] == [*revs[3:], other]
        everything = await driver.get_states(fs.StatesQuery())
        assert [s.rev for s in everything.states] == [*revs[3:], other]
        latest = await driver.get_states(fs.StatesQuery(latest_only=True, since_latest=True))
        assert [s.rev for s in latest.states] == [other]
        # The data written with the first version is what the kept versions still see.
        assert await driver.get_data("a", "blob", revs[3]) == (revs[0], b"first")
        assert await driver.head_rev() == other


@pytest.mark.anyio
async def test_keep_drops_the_delays_of_dropped_versions() -> None:
    async with MemoryDriver(keep=1) as driver:
        at = datetime.datetime.now(datetime.UTC)
        rev = 0
        for _ in range(3):
            rev = await _commit(driver, "a", rev, delay_to="later", delay_at=at)
        page = await driver.get_delays(limit=1)
        assert [d.state.rev for d in page.delays] == [rev]
        assert not page.more


@pytest.mark.slow
@pytest.mark.anyio
async def test_keep_bounds_memory() -> None:
    """A long-running store with keep=2 holds a small fraction of what keeping all does."""

    async def footprint(driver: MemoryDriver) -> int:
        tracemalloc.start()
        try:
            async with driver:
                revs = dict.fromkeys(range(20), 0)
                for _ in range(400):
                    for i in revs:
                        revs[i] = await _commit(driver, f"s{i}", revs[i])
                return tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    kept = await footprint(MemoryDriver(keep=2))
    everything = await footprint(MemoryDriver())
    assert kept * 5 < everything, (kept, everything)
