"""Shared fixtures: asyncio as the only backend, and no task may outlive its test."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

import flowstate as fs
from flowstate.drivers.base import Driver
from flowstate.drivers.memory import MemoryDriver
from tests import etcd_server, postgres_server
from tests.etcd_server import etcd_url
from tests.markers import SERVER_FIXTURES, SLOW_KIT_TESTS, refuse_in_a_quick_run
from tests.postgres_server import postgres_url
from tests.processes import Process
from tests.serve_process import ServerPool

# The session's etcd and PostgreSQL servers, each started once for every test that needs it.
__all__ = ["etcd_url", "postgres_url"]


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


def pytest_configure(config: pytest.Config) -> None:
    # A run stopped by SIGTERM (a CI timeout, a closed terminal) tears down as one stopped by
    # Ctrl-C does, so the etcd and PostgreSQL servers and the processes it started stop too.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        help="only the tests marked neither slow nor with a server (scripts/test --quick)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in SERVER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
        if getattr(item, "originalname", item.name) in SLOW_KIT_TESTS:
            item.add_marker(pytest.mark.slow)
    if config.getoption("--quick"):
        left_out = {"slow", "browser", *SERVER_FIXTURES.values()}
        quick = [i for i in items if not any(i.get_closest_marker(m) for m in left_out)]
        config.hook.pytest_deselected(items=[i for i in items if i not in quick])
        items[:] = quick


@pytest.fixture(scope="session")
def serve_pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerPool]:
    """``flowstate serve`` processes on fresh SQLite stores, for tests that need an empty store
    behind the remote driver. Take one with ``serve_pool.take()`` and close it after the test."""
    refuse_in_a_quick_run(request, "serve_pool")
    pool = ServerPool(tmp_path_factory.mktemp("served"))
    try:
        yield pool
    finally:
        pool.close()


# "http" is the remote driver through a `flowstate serve` process (on SQLite) of its own.
STORES = [
    "memory",
    "sqlite",
    pytest.param("etcd", marks=pytest.mark.etcd),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("http", marks=pytest.mark.slow),
]


@pytest.fixture(params=STORES)
async def new_driver(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Driver]]:
    """A factory of (unopened) driver objects that all reach one fresh store.

    Memory stores live in one object, so the memory factory hands out that object each time.
    """
    created: list[Driver] = []
    server = None
    if request.param == "memory":
        shared = MemoryDriver()

        def make() -> Driver:
            if not created:
                created.append(shared)
            return shared

    else:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/store.db"
        elif request.param == "etcd":
            url = etcd_server.unique_url(request.getfixturevalue("etcd_url"))
        elif request.param == "http":
            server = request.getfixturevalue("serve_pool").take()
            url = server.url
        else:
            url = postgres_server.unique_url(request.getfixturevalue("postgres_url"))

        def make() -> Driver:
            driver = fs.open_driver(url)
            created.append(driver)
            return driver

    try:
        yield make
    finally:
        for driver in created:
            await driver.aclose()
        if server is not None:
            server.close()


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    """Every process a test starts is killed by PID at the end, whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        await process.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("etcd", marks=pytest.mark.etcd),
        pytest.param("postgres", marks=pytest.mark.postgres),
        "http",
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store that every process of a test reaches, on each driver that shares a store
    between processes; "http" is a `flowstate serve` (on SQLite) that the processes reach
    through the remote driver."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
    elif request.param == "etcd":
        yield etcd_server.unique_url(request.getfixturevalue("etcd_url"))
    elif request.param == "postgres":
        yield postgres_server.unique_url(request.getfixturevalue("postgres_url"))
    else:
        server = request.getfixturevalue("serve_pool").take()
        try:
            yield server.url
        finally:
            server.close()
