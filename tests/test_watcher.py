"""Watchers ride out store outages: a real etcd killed for ten seconds, a SQLite file that
another process makes unreadable, and a driver that fails on purpose for the limits.

In each outage test the consumer holds the watcher after its first version, the store goes
away, and the consumer goes on: the watcher's next read fails while the store is down, so
without retries the ``async for`` would raise. It must deliver every version exactly once, in
order, once the store is back.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import flowstate as fs
from flowstate.drivers.memory import MemoryDriver
from tests.etcd_server import EtcdServer, unique_url

pytestmark = pytest.mark.anyio

OUTAGE = 10.0  # seconds the store stays down in the outage tests


class _Records(logging.Handler):
    """Sets an event when the watcher logs that the store is unavailable."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.unavailable = asyncio.Event()
        self.back = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "store unavailable" in message:
            self.unavailable.set()
        elif "store available again" in message:
            self.back.set()


@pytest.fixture
def records() -> Iterator[_Records]:
    handler = _Records()
    logger = logging.getLogger("flowstate")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def outage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """An etcd member of this module's own, killed and restarted by the outage test."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd-outage") / "data")
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.close()


async def _commit_steps(url: str, state_id: str, steps: list[str]) -> None:
    async with fs.Engine(url) as engine:
        try:
            ctx = await engine.get_state(state_id)
        except fs.NotFoundError:
            ctx = fs.StateCtx.new(state_id)
        for to in steps:
            await engine.do(fs.Commit(fs.Transit(ctx, to)))


class _Consumer:
    """A plain ``async for`` over a watcher that pauses after its first version."""

    def __init__(self, engine: fs.Engine, wanted: int) -> None:
        self.received: list[tuple[str, int, str]] = []
        self.first = asyncio.Event()
        self.go_on = asyncio.Event()
        self._engine = engine
        self._wanted = wanted

    async def run(self) -> None:
        async with self._engine.watch(since_rev=0, limit=1) as watcher:
            async for state in watcher:
                self.received.append((state.id, state.rev, state.transition.to))
                if len(self.received) == 1:
                    self.first.set()
                    await self.go_on.wait()
                if len(self.received) == self._wanted:
                    return


async def _until(event: asyncio.Event, consumer: asyncio.Task[None], within: float) -> None:
    """Wait for ``event``; if the consumer fails first, raise its error."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        async with asyncio.timeout(within):
            await asyncio.wait({waiter, consumer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if consumer.done():
        consumer.result()  # the watcher raised instead of riding the outage out
    assert event.is_set()


def _check_exactly_once(received: list[tuple[str, int, str]], expected: list[tuple[str, str]]):
    assert [(i, to) for i, _, to in received] == expected, "no gap, no duplicate, in order"
    revs = [rev for _, rev, _ in received]
    assert revs == sorted(revs)
    assert len(set(revs)) == len(revs)


@pytest.mark.slow
async def test_a_watcher_rides_out_an_etcd_outage(
    outage_server: EtcdServer, records: _Records
) -> None:
    url = unique_url(outage_server.url) + "?timeout=1"
    await _commit_steps(url, "s", ["a", "b", "c"])
    async with fs.Engine(url) as engine:
        consumer = _Consumer(engine, wanted=7)
        task = asyncio.ensure_future(consumer.run())
        try:
            await _until(consumer.first, task, within=10)
            down_at = time.monotonic()
            await asyncio.to_thread(outage_server.stop)  # SIGKILL, by its PID
            consumer.go_on.set()
            # The watcher's next read fails while etcd is down: it must retry, not raise.
            await _until(records.unavailable, task, within=OUTAGE)
            await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
            assert not task.done()
            await asyncio.to_thread(outage_server.start)
            await asyncio.to_thread(outage_server.wait_ready)
            await _commit_steps(url, "s", ["d", "e"])
            await _commit_steps(url, "t", ["x", "y"])
            async with asyncio.timeout(30):
                await task
        finally:
            task.cancel()
    assert records.back.is_set()
    _check_exactly_once(
        consumer.received,
        [("s", "a"), ("s", "b"), ("s", "c"), ("s", "d"), ("s", "e"), ("t", "x"), ("t", "y")],
    )


# Holds every WAL lock of a SQLite file (bytes 120-127 of its -shm file, as the SQLite file
# format documents them) until killed: no other connection can read or write the file.
_LOCKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 8, 120)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
async def test_a_watcher_rides_out_an_unreadable_sqlite_file(
    tmp_path: Path, records: _Records
) -> None:
    path = tmp_path / "store.db"
    url = f"sqlite:///{path}"
    await _commit_steps(url, "s", ["a", "b", "c"])
    locker: asyncio.subprocess.Process | None = None
    async with fs.Engine(url) as engine:
        consumer = _Consumer(engine, wanted=6)
        task = asyncio.ensure_future(consumer.run())
        try:
            await _until(consumer.first, task, within=10)
            locker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _LOCKER,
                f"{path}-shm",
                stdout=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL,
            )
            assert locker.stdout is not None
            async with asyncio.timeout(10):
                assert await locker.stdout.readline() == b"locked\n"
            consumer.go_on.set()
            # SQLite gives up on a read after about ten seconds of trying to lock the file.
            await _until(records.unavailable, task, within=30)
            locker.send_signal(signal.SIGKILL)  # the file is readable again
            await locker.wait()
            await _commit_steps(url, "s", ["d"])
            await _commit_steps(url, "t", ["x", "y"])
            async with asyncio.timeout(30):
                await task
        finally:
            task.cancel()
            if locker is not None and locker.returncode is None:
                locker.kill()
                await locker.wait()
    assert records.back.is_set()
    _check_exactly_once(
        consumer.received,
        [("s", "a"), ("s", "b"), ("s", "c"), ("s", "d"), ("t", "x"), ("t", "y")],
    )


# -- limits, with a driver that fails on purpose --------------------------------------------


class _FlakyReads(MemoryDriver):
    """A memory store whose reads fail with ``error`` while it is set (after ``slowness``
    seconds, as a driver that tries for a while before it gives up)."""

    def __init__(self) -> None:
        super().__init__()
        self.error: fs.DriverError | None = None
        self.slowness = 0.0
        self.failed_reads = 0
        self._failures = asyncio.Condition()

    async def get_states(self, query: fs.StatesQuery) -> fs.StatesPage:
        if self.error is not None:
            error = self.error
            async with self._failures:
                self.failed_reads += 1
                self._failures.notify_all()
            await asyncio.sleep(self.slowness)
            raise error
        return await super().get_states(query)

    async def failures(self, count: int) -> None:
        """Return once ``count`` reads have failed."""
        async with asyncio.timeout(10), self._failures:
            await self._failures.wait_for(lambda: self.failed_reads >= count)


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[_FlakyReads, fs.Engine]]:
    async with _FlakyReads() as driver, fs.Engine(driver) as engine:
        for i in range(3):
            await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new(f"s{i}"), "a")))
        yield driver, engine


async def test_unavailable_timeout_bounds_an_outage(
    flaky: tuple[_FlakyReads, fs.Engine],
) -> None:
    driver, engine = flaky
    driver.error = fs.DriverUnavailableError("down")
    started = time.monotonic()
    async with engine.watch(limit=1, unavailable_timeout=0.3) as watcher:
        with pytest.raises(fs.DriverUnavailableError, match="down"):
            await anext(watcher)
    assert 0.3 <= time.monotonic() - started < 2
    assert driver.failed_reads > 2, "it retried until the limit"


@pytest.mark.parametrize(
    ("outage", "raised", "reads"),
    [
        # The outage is counted from the start of the read that failed, not from its end.
        (0.5, "down", 1),
        # The first read fails after 0.6 s; the next one is cut at the timeout's end.
        pytest.param(1, "did not answer within", 2, marks=pytest.mark.slow),
    ],
)
async def test_a_read_slow_to_fail_counts_toward_the_timeout(
    flaky: tuple[_FlakyReads, fs.Engine], outage: float, raised: str, reads: int
) -> None:
    driver, engine = flaky
    driver.error, driver.slowness = fs.DriverUnavailableError("down"), 0.6
    async with engine.watch(unavailable_timeout=outage) as watcher:
        with pytest.raises(fs.DriverUnavailableError, match=raised):
            await asyncio.wait_for(anext(watcher), 10)
    assert driver.failed_reads == reads


@pytest.mark.slow
async def test_a_caught_up_watcher_notices_an_outage(
    flaky: tuple[_FlakyReads, fs.Engine],
) -> None:
    # Nothing is committed while the store is down, so no wake-up comes: the watcher reads
    # again after half its timeout of quiet, and raises once the outage outlasts it.
    driver, engine = flaky
    async with engine.watch(unavailable_timeout=0.4) as watcher:
        assert [(await anext(watcher)).id for _ in range(3)] == ["s0", "s1", "s2"]
        driver.error = fs.DriverUnavailableError("down")
        started = time.monotonic()
        with pytest.raises(fs.DriverUnavailableError, match="down"):
            await asyncio.wait_for(anext(watcher), 10)
    assert time.monotonic() - started >= 0.4
    assert driver.failed_reads > 1


@pytest.mark.slow
async def test_a_caught_up_watcher_goes_on_after_a_shorter_outage(
    flaky: tuple[_FlakyReads, fs.Engine],
) -> None:
    driver, engine = flaky
    async with engine.watch(unavailable_timeout=2) as watcher:
        assert [(await anext(watcher)).id for _ in range(3)] == ["s0", "s1", "s2"]
        driver.error = fs.DriverUnavailableError("down")
        following = asyncio.ensure_future(anext(watcher))
        await driver.failures(2)
        driver.error = None
        await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new("s3"), "a")))
        assert (await asyncio.wait_for(following, 10)).id == "s3"


async def test_no_timeout_keeps_trying_until_the_store_is_back(
    flaky: tuple[_FlakyReads, fs.Engine],
) -> None:
    driver, engine = flaky
    driver.error = fs.DriverUnavailableError("down")
    async with engine.watch(limit=1) as watcher:
        first = asyncio.ensure_future(anext(watcher))
        await driver.failures(4)
        assert not first.done()
        driver.error = None
        async with asyncio.timeout(5):
            assert (await first).id == "s0"
            assert [(await anext(watcher)).id for _ in range(2)] == ["s1", "s2"]


async def test_zero_timeout_raises_at_once(flaky: tuple[_FlakyReads, fs.Engine]) -> None:
    driver, engine = flaky
    driver.error = fs.DriverUnavailableError("down")
    async with engine.watch(unavailable_timeout=0) as watcher:
        with pytest.raises(fs.DriverUnavailableError):
            await anext(watcher)
    assert driver.failed_reads == 1


async def test_permanent_errors_surface_at_once(flaky: tuple[_FlakyReads, fs.Engine]) -> None:
    driver, engine = flaky
    driver.error = fs.DriverError("corrupt")
    async with engine.watch() as watcher:
        with pytest.raises(fs.DriverError, match="corrupt"):
            await anext(watcher)
    assert driver.failed_reads == 1


async def test_closing_the_engine_ends_a_retrying_watcher(
    flaky: tuple[_FlakyReads, fs.Engine],
) -> None:
    driver, engine = flaky
    driver.error = fs.DriverUnavailableError("down")
    watcher = engine.watch()
    first = asyncio.ensure_future(anext(watcher))
    await driver.failures(2)
    await engine.aclose()
    async with asyncio.timeout(5):
        with pytest.raises(StopAsyncIteration):
            await first


@pytest.mark.parametrize("url", ["memory://", "sqlite:///{tmp_path}/store-{n}.db?create=1"])
async def test_closing_the_engine_under_a_waiting_watcher_leaves_no_error_behind(
    tmp_path: Path, url: str
) -> None:
    # Closing the engine closes the driver it owns, which fails the watcher's pending wait
    # in the same turn as the engine's own stop: that error must be retrieved, not left to
    # "Task exception was never retrieved" when the wait is collected.
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        for n in range(5):
            engine = fs.Engine(url.format(tmp_path=tmp_path, n=n))
            await engine.open()
            watcher = engine.watch()
            waiting = asyncio.ensure_future(anext(watcher))
            await asyncio.sleep(0)  # the watcher reads, finds nothing, and waits
            await asyncio.sleep(0)
            await engine.aclose()
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(waiting, 5)
            del watcher, waiting
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unhandled == []


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), "5", True])
async def test_bad_unavailable_timeout(flaky: tuple[_FlakyReads, fs.Engine], bad: object) -> None:
    _, engine = flaky
    with pytest.raises(fs.InvalidQueryError, match="unavailable_timeout"):
        engine.watch(unavailable_timeout=bad)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_flowstate_watch_keeps_going_through_an_etcd_outage(
    outage_server: EtcdServer,
) -> None:
    url = unique_url(outage_server.url) + "?timeout=1"
    batches, per_batch = 20, 100
    async with fs.Engine(url) as engine:
        for b in range(batches):
            ctxs = [fs.StateCtx.new(f"s{b:02}-{i:03}") for i in range(per_batch)]
            await engine.do(fs.Commit(*(fs.Transit(ctx, "a") for ctx in ctxs)))
    script = Path(sys.executable).with_name("flowstate")
    proc = await asyncio.create_subprocess_exec(
        script,
        "watch",
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None
    assert stderr is not None
    ids: list[str] = []
    try:
        async with asyncio.timeout(30):
            ids.append(json.loads(await stdout.readline())["id"])
        # Unread, the pipe fills within a few pages: most of the 2,000 versions are still to
        # be fetched when etcd goes down, so the command has to read through the outage.
        await asyncio.to_thread(outage_server.stop)

        async def drain(count: int) -> None:
            while len(ids) < count:
                line = await stdout.readline()
                assert line, "flowstate watch stopped"
                ids.append(json.loads(line)["id"])

        draining = asyncio.ensure_future(drain(batches * per_batch + 1))
        async with asyncio.timeout(30):
            while b"store unavailable" not in (line := await stderr.readline()):
                assert line, "flowstate watch ended instead of retrying"
        await asyncio.to_thread(outage_server.start)
        await asyncio.to_thread(outage_server.wait_ready)
        await _commit_steps(url, "after", ["x"])
        async with asyncio.timeout(30):
            await draining
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            code = await proc.wait()
    assert code == 130
    expected = [f"s{b:02}-{i:03}" for b in range(batches) for i in range(per_batch)]
    assert ids == [*expected, "after"], "every version once, in order"
