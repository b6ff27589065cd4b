"""Shared fixtures: asyncio as the only backend, and no task may outlive its test."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_pending_tasks(request: pytest.FixtureRequest) -> None:
    """Every async test checks that it leaves no task behind (the Go suite's goleak)."""
    if "anyio_backend" in request.fixturenames:
        request.getfixturevalue("_check_tasks")


@pytest.fixture
async def _check_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    leftover = {t for t in asyncio.all_tasks() - before if not t.done() and not _is_runner(t)}
    if leftover:
        await asyncio.sleep(0)  # tasks cancelled by the test's own cleanup finish here
        leftover = {t for t in leftover if not t.done()}
    for task in leftover:
        task.cancel()
    assert not leftover, f"tasks left running after the test: {leftover}"


def _is_runner(task: asyncio.Task[object]) -> bool:
    """The anyio test runner wraps each fixture step in a task of its own; that one is fine."""
    return task is asyncio.current_task() or "_call_in_runner_task" in repr(task.get_coro())
