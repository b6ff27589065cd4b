"""The memory driver against the conformance suite, plus what only it promises."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import flowstate as fs
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
