"""The workflow tests' fixtures: an engine on each driver of the matrix, and its manager."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

import flowstate as fs
from flowstate.drivers.base import Driver
from flowstate.workflows import FlowManager


@pytest.fixture
async def engine(new_driver: Callable[[], Driver]) -> AsyncIterator[fs.Engine]:
    async with fs.Engine(new_driver()) as engine:
        yield engine


@pytest.fixture
def flows(engine: fs.Engine) -> FlowManager:
    return FlowManager(engine)
