"""Leader election over a driver's lease (``SupportsLease``).

One holder at a time keeps a named lease alive by renewing it; standbys try to claim it
every ``poll`` seconds and win once it is released or expires. Election only avoids
duplicate work: every action a leader takes is a revision-checked commit, so a deposed
leader acting late loses with a conflict and does no harm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

from flowstate.errors import ClosedError, DriverError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from flowstate.drivers.base import Lease, SupportsLease

__all__ = ["Election"]

logger = logging.getLogger("flowstate.recovery")


class _LeadershipLost(Exception):
    """The lease could not be renewed in time; the leader must stop."""


def default_holder() -> str:
    """A process-unique name: host, pid, and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Election:
    """Campaign for ``name`` and run a coroutine for as long as this process leads.

    Args:
        driver: A driver that supports leases.
        name: The lease to campaign for.
        ttl: Seconds a lease lasts without renewal; renewed every ``ttl / 3``.
        holder: This process's name in the lease; unique by default.
        on_change: Called with True when leadership is won and False when it is lost.
    """

    def __init__(
        self,
        driver: SupportsLease,
        name: str,
        *,
        ttl: float,
        holder: str | None = None,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.driver = driver
        self.name = name
        self.ttl = ttl
        self.holder = holder or default_holder()
        self.poll = min(ttl / 4, 1.0)
        self.lease: Lease | None = None
        self._on_change = on_change

    @property
    def is_leader(self) -> bool:
        return self.lease is not None

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Campaign forever; while leading, run ``lead()`` and cancel it if the lease is lost.

        Returns only by cancellation; a lease held then is released, so a standby takes
        over at once.
        """
        while True:
            lease = await self._campaign()
            self._set(lease)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._keep(lease))
                    group.create_task(self._lead(lead))
            except* _LeadershipLost:
                logger.warning("lost leadership of %r", self.name, extra={"lease": self.name})
            finally:
                held, self.lease = self.lease, None
                if self._on_change is not None:
                    self._on_change(False)
                if held is not None:
                    await self._release(held)

    async def _campaign(self) -> Lease:
        """Try for the lease every ``poll`` seconds until it is won. A store outage is
        logged when it starts and when it ends, not at every try."""
        unreachable = False
        while True:
            try:
                lease = await self.driver.acquire_lease(self.name, self.holder, self.ttl)
            except DriverError as exc:
                log = logger.debug if unreachable else logger.warning
                log("cannot reach the store to campaign for %r, retrying: %s", self.name, exc)
                unreachable, lease = True, None
            else:
                if unreachable:
                    logger.warning("the store answers again: campaigning for %r", self.name)
                unreachable = False
            if lease is not None:
                return lease
            await asyncio.sleep(self.poll)

    async def _keep(self, lease: Lease) -> None:
        """Renew every ttl/3; give up once the lease would have expired unrenewed."""
        deadline = time.monotonic() + lease.ttl
        while True:
            await asyncio.sleep(lease.ttl / 3)
            try:
                renewed = await self.driver.renew_lease(lease)
            except DriverError as exc:
                logger.warning("cannot renew lease %r: %s", self.name, exc)
                if time.monotonic() >= deadline:
                    raise _LeadershipLost from exc
                continue
            if renewed is None:
                raise _LeadershipLost
            lease = renewed
            self.lease = renewed
            deadline = time.monotonic() + lease.ttl

    async def _lead(self, lead: Callable[[], Awaitable[None]]) -> None:
        try:
            await lead()
        except* DriverError as failed:
            # Give the lease up so that a healthier process can lead; this one campaigns
            # again, and leads again once the store answers. ``lead()`` runs task groups,
            # so the store's error may come wrapped in an exception group: look inside. (A
            # ClosedError ends the election: its engine or driver is closed for good.)
            exc = failed.exceptions[0]
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            logger.error("leader work for %r failed: %s", self.name, exc)  # noqa: TRY400
            raise _LeadershipLost from exc
        raise _LeadershipLost  # lead() is not expected to return; treat it like a loss

    async def _release(self, lease: Lease) -> None:
        try:
            async with asyncio.timeout(max(self.ttl, 1.0)):
                await self.driver.release_lease(lease)
        except (DriverError, ClosedError, TimeoutError) as exc:
            logger.warning("could not release lease %r (it expires by itself): %s", self.name, exc)

    def _set(self, lease: Lease) -> None:
        self.lease = lease
        logger.info(
            "%s leads %r", self.holder, self.name, extra={"lease": self.name, "holder": self.holder}
        )
        if self._on_change is not None:
            self._on_change(True)
