"""Leader election over driver leases: losing a lease stops the leader's work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from flowstate.drivers.base import Driver, SupportsLease
from flowstate.recovery._election import Election

pytestmark = pytest.mark.anyio


async def test_a_lost_lease_cancels_the_leader_work_and_campaigns_again(
    new_driver: Callable[[], Driver],
) -> None:
    driver = new_driver()
    await driver.open()
    assert isinstance(driver, SupportsLease)
    changes: asyncio.Queue[bool] = asyncio.Queue()
    terms: asyncio.Queue[None] = asyncio.Queue()
    cancelled = asyncio.Event()

    async def lead() -> None:
        terms.put_nowait(None)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    election = Election(driver, "test-lease", ttl=0.6, on_change=changes.put_nowait)
    runner = asyncio.ensure_future(election.run(lead))
    try:
        async with asyncio.timeout(20):
            assert await changes.get() is True
            await terms.get()
            lease = election.lease
            assert lease is not None
            await driver.release_lease(lease)  # someone else's doing: the claim is gone
            assert await changes.get() is False, "the next renewal notices the loss"
            assert cancelled.is_set()
            assert await changes.get() is True, "the lease is free again, so it is won again"
            assert election.lease is not None
            assert election.lease.token != lease.token
            await terms.get()  # the leader's work starts again
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    assert await driver.get_lease("test-lease") is None, "cancelling releases the lease"
