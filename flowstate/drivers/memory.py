"""The in-memory driver (``memory://``): a real driver whose store lives and dies with the process.

Layout: an append-only log of encoded versions (revision ``r`` at index ``r - 1``), the latest
revision per id, a posting list of revisions per state id and per label pair, and the commit
times (which never decrease along the log, so ``since_time`` is a binary search). Commits run
without awaiting, so each one is atomic with respect to every other coroutine in the loop.

History limit: by default every version is kept for the life of the store (about 1 KB per
version of a small state). ``memory://?keep=N`` (``MemoryDriver(keep=N)``) keeps only the
latest ``N`` versions of each state, for long-running processes: an older version is dropped
when its state commits a newer one, with its data versions no longer visible from a kept
version and its delay (which can no longer fire). A dropped version is gone for every read:
``get_state(id, rev)`` raises ``NotFoundError``, and queries and watchers that reach its
revision later skip it, so a watcher more than ``N`` versions of a state behind misses the
dropped ones. Revisions stay global and increasing; each dropped version still costs a few
bytes (its slot in the log and its commit time), and label postings of dropped versions are
removed in bulk once they outnumber the live ones.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime
import heapq
import itertools
import time
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl

import msgspec

from flowstate._lifecycle import Lifecycle, not_open
from flowstate._query import StatesPage, StatesQuery
from flowstate._state import State, utcnow_ms
from flowstate.drivers import _args
from flowstate.drivers.base import (
    CommitRequest,
    CommitResult,
    DelayedState,
    DelaysPage,
    Driver,
    Lease,
    RevisionWaiters,
)
from flowstate.errors import (
    ClosedError,
    Conflict,
    ConflictError,
    InvalidURLError,
    NotFoundError,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Self

__all__ = ["MemoryDriver"]

#: A run of commits lets other tasks run once every this many commits.
YIELD_EVERY: Final = 256


class _Entry(msgspec.Struct, gc=False):
    """One stored version: the fields queries filter on, and the encoded State.

    Not tracked by the garbage collector (its fields hold no references back), so a store of
    many versions adds nothing to the full collections a long run triggers.
    """

    rev: int
    id: str
    labels: dict[str, str]
    committed_at: datetime.datetime
    raw: bytes


class MemoryDriver(Driver):
    """Stores everything in this process. Nothing survives the process; use it for tests,
    single-process tools and as the reference the other drivers are checked against.
    """

    scheme = "memory"

    def __init__(self, *, keep: int | None = None) -> None:
        if keep is not None and (type(keep) is not int or keep < 1):
            raise InvalidURLError(f"keep must be a whole number of versions >= 1, not {keep!r}")
        #: The most versions kept per state (None: all of them).
        self.keep = keep
        self._dropped = 0  # versions dropped since the posting lists were last compacted
        self._lifecycle = Lifecycle.UNOPENED
        self._log: list[_Entry | None] = []
        self._times: list[datetime.datetime] = []
        self._latest: dict[str, int] = {}
        self._by_id: dict[str, list[int]] = {}
        self._by_label: dict[tuple[str, str], list[int]] = {}
        self._data: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        self._delays: list[tuple[int, bytes]] = []
        self._leases: dict[str, tuple[Lease, float]] = {}
        self._lease_tokens = itertools.count(1)
        self._waiters = RevisionWaiters()
        self._unyielded = 0  # commits since the last one that let other tasks run
        self._encoder = msgspec.msgpack.Encoder()
        self._state_decoder = msgspec.msgpack.Decoder(State)
        self._delay_decoder = msgspec.msgpack.Decoder(DelayedState)

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Create a driver from ``memory://`` or ``memory://?keep=N``.

        Raises:
            InvalidURLError: The URL is not a valid memory driver URL.
        """
        location, _, query = url.partition("?")
        if location.rstrip("/").lower() != "memory:":
            raise InvalidURLError(f"{url!r}: the memory driver's URL is 'memory://[?keep=N]'")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise InvalidURLError(f"{url!r}: malformed query string ({exc})") from None
        keep: int | None = None
        for key, value in pairs:
            if key != "keep":
                raise InvalidURLError(f"{url!r}: unknown option {key!r}; known options: keep")
            keep = _args.url_count(url, key, value)
            if keep < 1:
                raise InvalidURLError(
                    f"{url!r}: keep must be a whole number of versions >= 1, not {value!r}"
                )
        return cls(keep=keep)

    def __repr__(self) -> str:
        keep = "" if self.keep is None else f"keep={self.keep}, "
        return f"MemoryDriver({keep}head_rev={len(self._log)}, {self._lifecycle.name.lower()})"

    def _check(self) -> None:
        if self._lifecycle is not Lifecycle.OPENED:
            raise not_open(self._lifecycle, "the memory driver")

    async def open(self) -> None:
        if self._lifecycle is Lifecycle.CLOSED:
            raise ClosedError("the memory driver is closed and cannot be reopened")
        self._lifecycle = Lifecycle.OPENED

    async def aclose(self) -> None:
        self._lifecycle = Lifecycle.CLOSED
        self._waiters.close(ClosedError("the memory driver was closed"))

    async def commit(self, request: CommitRequest) -> CommitResult:
        # The hot path of every engine step: locals and no per-write allocations beyond the
        # stored entry itself.
        if self._lifecycle is not Lifecycle.OPENED:
            self._check()
        latest = self._latest
        writes = request.writes
        for w in writes:
            if latest.get(w.state.id, 0) != w.expected_rev:
                raise ConflictError(
                    Conflict(w.state.id, w.expected_rev, latest.get(w.state.id, 0))
                    for w in writes
                    if latest.get(w.state.id, 0) != w.expected_rev
                )
        times = self._times
        committed_at = utcnow_ms()
        if times and committed_at < times[-1]:
            committed_at = times[-1]  # the wall clock went back; keep times monotonic
        encode = self._encoder.encode
        log = self._log
        by_id = self._by_id
        by_label = self._by_label
        replace = msgspec.structs.replace
        revs = []
        for write in writes:
            state = write.state
            rev = len(log) + 1
            stored = replace(state, rev=rev, committed_at=committed_at)
            labels = state.labels
            log.append(_Entry(rev, state.id, dict(labels), committed_at, encode(stored)))
            times.append(committed_at)
            latest[state.id] = rev
            history = by_id.get(state.id)
            if history is None:
                by_id[state.id] = [rev]
            else:
                history.append(rev)
                if self.keep is not None and len(history) > self.keep:
                    self._drop(state.id, history)
            if labels:
                for pair in labels.items():
                    postings = by_label.get(pair)
                    if postings is None:
                        by_label[pair] = [rev]
                    else:
                        postings.append(rev)
            if write.data:
                for alias, blob in write.data.items():
                    self._data.setdefault((state.id, alias), []).append((rev, bytes(blob)))
            if write.delay_at is not None:
                delayed = DelayedState(state=stored, to=write.delay_to, at=write.delay_at)
                self._delays.append((rev, encode(delayed)))
            revs.append(rev)
        self._waiters.advance(len(log))
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            # Nothing here waits for I/O: let other tasks run now and then, so that a flow
            # committing step after step does not hold the event loop.
            self._unyielded = 0
            await asyncio.sleep(0)
        return CommitResult(revs=revs, committed_at=committed_at)

    def _drop(self, state_id: str, history: list[int]) -> None:
        """Drop the versions of ``state_id`` beyond the latest ``keep`` ones."""
        assert self.keep is not None
        cut = len(history) - self.keep
        dropped, history[:cut] = history[:cut], []
        log = self._log
        for rev in dropped:
            log[rev - 1] = None
        oldest = history[0]
        for (owner, _alias), versions in self._data.items():
            if owner != state_id:
                continue
            # The newest version at or below the oldest kept one is what that one sees.
            keep_from = bisect.bisect_right(versions, oldest, key=lambda v: v[0]) - 1
            if keep_from > 0:
                del versions[:keep_from]
        self._dropped += len(dropped)
        if self._dropped * 2 > len(log):
            self._compact()

    def _compact(self) -> None:
        """Remove the revisions of dropped versions from the posting lists and delays."""
        log = self._log
        for pair, postings in list(self._by_label.items()):
            live = [rev for rev in postings if log[rev - 1] is not None]
            if live:
                self._by_label[pair] = live
            else:
                del self._by_label[pair]
        self._delays = [(rev, raw) for rev, raw in self._delays if log[rev - 1] is not None]
        self._dropped = 0

    def _entry(self, state_id: str, rev: int) -> _Entry:
        entry = self._log[rev - 1] if 0 < rev <= len(self._log) else None
        if entry is None or entry.id != state_id:
            raise NotFoundError(f"state {state_id!r} has no version at rev {rev}")
        return entry

    async def get_state(self, state_id: str, rev: int = 0) -> State:
        self._check()
        _args.check_read(state_id, rev)
        if rev == 0:
            rev = self._latest.get(state_id, 0)
            if not rev:
                raise NotFoundError(f"state {state_id!r} not found")
        return self._state_decoder.decode(self._entry(state_id, rev).raw)

    async def head_rev(self) -> int:
        self._check()
        return len(self._log)

    async def get_states(self, query: StatesQuery) -> StatesPage:
        self._check()
        head = len(self._log)
        since_rev = query.since_rev
        if query.since_time is not None:
            since_rev = max(since_rev, bisect.bisect_left(self._times, query.since_time))
        if query.since_latest:
            last = next(self._matches(query, since_rev, reverse=True), None)
            if last is None:
                return StatesPage(states=[], more=False, head_rev=head)
            since_rev = last.rev - 1
        decode = self._state_decoder.decode
        states: list[State] = []
        for entry in self._matches(query, since_rev):
            if len(states) == query.limit:
                return StatesPage(states=states, more=True, head_rev=head)
            states.append(decode(entry.raw))
        return StatesPage(states=states, more=False, head_rev=head)

    def _matches(
        self, query: StatesQuery, since_rev: int, *, reverse: bool = False
    ) -> Iterator[_Entry]:
        """Versions after ``since_rev`` that match ``query`` (ascending, or descending)."""
        log = self._log
        latest = self._latest
        label_sets = query.label_sets
        if query.id is not None:
            candidates = _after(self._by_id.get(query.id, []), since_rev, reverse)
        elif label_sets:
            candidates = self._label_candidates(label_sets, since_rev, reverse)
        elif reverse:
            candidates = iter(range(len(log), since_rev, -1))
        else:
            candidates = iter(range(since_rev + 1, len(log) + 1))
        for rev in candidates:
            entry = log[rev - 1]
            if entry is None:  # dropped (keep=N)
                continue
            if query.latest_only and latest[entry.id] != rev:
                continue
            if label_sets and not any(
                all(entry.labels.get(k) == v for k, v in wanted.items()) for wanted in label_sets
            ):
                continue
            yield entry

    def _label_candidates(
        self, label_sets: list[dict[str, str]], since_rev: int, reverse: bool
    ) -> Iterator[int]:
        """Merge, per AND-map, the shortest posting list: a superset of the matches."""
        lists = []
        for wanted in label_sets:
            postings = [self._by_label.get(pair, []) for pair in wanted.items()]
            lists.append(_after(min(postings, key=len), since_rev, reverse))
        if len(lists) == 1:
            return lists[0]
        merged = heapq.merge(*lists, reverse=reverse)
        return (rev for rev, _ in itertools.groupby(merged))

    async def wait_for_rev(self, rev: int) -> None:
        self._check()
        _args.check_wait(rev)
        await self._waiters.wait(rev)

    async def get_data(self, state_id: str, alias: str, rev: int = 0) -> tuple[int, bytes]:
        self._check()
        _args.check_read(state_id, rev, alias)
        versions = self._data.get((state_id, alias), [])
        if rev:
            versions = versions[: bisect.bisect_right(versions, rev, key=lambda v: v[0])]
        if not versions:
            at = f" at rev {rev}" if rev else ""
            raise NotFoundError(f"state {state_id!r} has no data {alias!r}{at}")
        return versions[-1]

    async def get_delays(self, since_rev: int = 0, limit: int = 100) -> DelaysPage:
        self._check()
        _args.check_delays(since_rev, limit)
        start = bisect.bisect_right(self._delays, since_rev, key=lambda d: d[0])
        log = self._log
        delays_after = itertools.islice(self._delays, start, None)
        live = (raw for rev, raw in delays_after if log[rev - 1] is not None)
        chunk = list(itertools.islice(live, limit + 1))
        delays = [self._delay_decoder.decode(raw) for raw in chunk[:limit]]
        return DelaysPage(delays=delays, more=len(chunk) > limit)

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        self._check()
        _args.check_lease_claim(name, holder, ttl)
        now = time.monotonic()
        held = self._leases.get(name)
        if held is not None and held[1] > now and held[0].holder != holder:
            return None
        lease = Lease(name=name, holder=holder, token=next(self._lease_tokens), ttl=ttl)
        self._leases[name] = (lease, now + ttl)
        return lease

    async def renew_lease(self, lease: Lease) -> Lease | None:
        self._check()
        _args.check_lease(lease)
        now = time.monotonic()
        held = self._leases.get(lease.name)
        if held is None or held[0].token != lease.token or held[1] <= now:
            return None
        self._leases[lease.name] = (lease, now + lease.ttl)
        return lease

    async def release_lease(self, lease: Lease) -> None:
        self._check()
        _args.check_lease(lease)
        held = self._leases.get(lease.name)
        if held is not None and held[0].token == lease.token:
            del self._leases[lease.name]

    async def get_lease(self, name: str) -> Lease | None:
        self._check()
        _args.check_lease_name(name)
        held = self._leases.get(name)
        if held is None or held[1] <= time.monotonic():
            return None
        return held[0]


def _after(postings: list[int], since_rev: int, reverse: bool) -> Iterator[int]:
    """The revisions of a sorted posting list after ``since_rev``, ascending or descending."""
    start = bisect.bisect_right(postings, since_rev)
    if reverse:
        return (postings[i] for i in range(len(postings) - 1, start - 1, -1))
    return (postings[i] for i in range(start, len(postings)))
