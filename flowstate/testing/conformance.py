"""The driver conformance suite: one base class of tests every driver must pass.

Subclass :class:`DriverTests` and override its ``driver`` fixture so that it yields an opened
driver on a fresh, empty store::

    import pytest
    from flowstate.testing.conformance import DriverTests

    class TestMyDriver(DriverTests):
        @pytest.fixture
        async def driver(self, tmp_path):
            async with MyDriver.from_url(f"my://{tmp_path}/store") as driver:
                yield driver

The tests run on asyncio through the anyio pytest plugin (installed with anyio); provide an
``anyio_backend`` fixture returning ``"asyncio"`` (flowstate's own ``conftest.py`` does).
Optional capabilities (leases) are checked with ``self.require(...)``, never by driver name.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import TYPE_CHECKING, Any

import pytest

import flowstate as fs
from flowstate.drivers.base import CommitRequest, Driver, Lease, StateWrite, SupportsLease

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["DriverTests"]


def _status(ctx: fs.StateCtx) -> fs.Status:
    return ctx.committed.status


def _write(state_id: str, expected_rev: int = 0, *, to: str = "a", **labels: str) -> StateWrite:
    state = fs.State(id=state_id, labels=labels, transition=fs.Transition(to=to))
    return StateWrite(state=state, expected_rev=expected_rev)


async def _commit(driver: Driver, *writes: StateWrite) -> list[int]:
    result = await driver.commit(CommitRequest(writes=list(writes)))
    return result.revs


async def _all(engine: fs.Engine, **filters: Any) -> list[fs.State]:
    return [state async for state in engine.iter_states(**filters)]


async def _next(watcher: fs.Watcher) -> fs.State:
    async with asyncio.timeout(10):
        return await anext(watcher)


@pytest.mark.anyio
class DriverTests:
    """Tests every driver must pass. Override the ``driver`` fixture."""

    @pytest.fixture
    def driver(self) -> AsyncIterator[Driver]:
        """Override: yield an opened driver on a fresh, empty store."""
        raise NotImplementedError("override the `driver` fixture to yield an opened driver")

    @pytest.fixture
    async def engine(self, driver: Driver) -> AsyncIterator[fs.Engine]:
        async with fs.Engine(driver) as engine:
            yield engine

    def require(self, condition: bool, reason: str = "capability not supported") -> None:
        """Skip the running test unless the driver has a capability."""
        if not condition:
            pytest.skip(reason)

    # -- driver: commits and revisions -----------------------------------------------------

    async def test_revisions_strictly_increase(self, driver: Driver) -> None:
        assert await driver.head_rev() == 0
        revs = []
        for i in range(5):
            revs += await _commit(driver, _write(f"s{i}"))
        assert revs == sorted(set(revs))
        assert await driver.head_rev() == revs[-1]
        rev = revs[0]
        for _ in range(3):
            (rev2,) = await _commit(driver, _write("s0", rev))
            assert rev2 > rev
            rev = rev2

    async def test_commit_together_takes_revisions_above_head(self, driver: Driver) -> None:
        (first,) = await _commit(driver, _write("a"))
        revs = await _commit(driver, _write("b"), _write("c"), _write("d"))
        assert all(rev > first for rev in revs)
        assert revs == sorted(revs)
        assert await driver.head_rev() == max(revs)

    async def test_a_run_of_commits_lets_other_tasks_run(self, driver: Driver) -> None:
        """A flow committing step after step must not hold the event loop."""
        other = asyncio.ensure_future(asyncio.sleep(0))
        rev = 0
        for _ in range(1000):
            (rev,) = await _commit(driver, _write("busy", rev))
            if other.done():
                break
        assert other.done(), "1,000 commits in a row never let another task run"

    async def test_expected_zero_means_must_not_exist(self, driver: Driver) -> None:
        (rev,) = await _commit(driver, _write("a"))
        with pytest.raises(fs.ConflictError) as info:
            await _commit(driver, _write("a"))
        assert info.value.conflicts == [fs.Conflict("a", 0, rev)]

    async def test_conflict_names_every_state_and_writes_nothing(self, driver: Driver) -> None:
        rev_a, rev_b = await _commit(driver, _write("a"), _write("b"))
        (rev_a2,) = await _commit(driver, _write("a", rev_a, to="moved"))
        head = await driver.head_rev()
        with pytest.raises(fs.ConflictError) as info:
            await _commit(
                driver,
                _write("a", rev_a, to="x"),
                _write("b", rev_b, to="x"),
                _write("c", 5, to="x"),
                _write("new", 0, to="x"),
            )
        assert info.value.ids == ["a", "c"]
        assert info.value.conflicts == [fs.Conflict("a", rev_a, rev_a2), fs.Conflict("c", 5, 0)]
        assert await driver.head_rev() == head
        assert (await driver.get_state("b")).rev == rev_b
        with pytest.raises(fs.NotFoundError):
            await driver.get_state("new")

    async def test_commit_stores_what_was_sent(self, driver: Driver) -> None:
        state = fs.State(
            id="s",
            labels={"kind": "order"},
            annotations={"note": "ünïcode ✓", "empty": ""},
            transition=fs.Transition(to="next", annotations={"why": "test"}),
        )
        result = await driver.commit(
            CommitRequest(writes=[StateWrite(state=state, expected_rev=0)])
        )
        stored = await driver.get_state("s")
        assert stored.rev == result.revs[0]
        assert stored.committed_at == result.committed_at
        assert stored.labels == {"kind": "order"}
        assert stored.annotations == {"note": "ünïcode ✓", "empty": ""}
        assert stored.transition == fs.Transition(to="next", annotations={"why": "test"})
        assert state.rev == 0, "the driver must not change the state it was given"

    async def test_committed_at_is_utc_ms_and_never_decreases(self, driver: Driver) -> None:
        times = []
        for i in range(5):
            result = await driver.commit(CommitRequest(writes=[_write(f"s{i}")]))
            at = result.committed_at
            assert at.tzinfo is not None
            assert at.utcoffset() == datetime.timedelta(0)
            assert at.microsecond % 1000 == 0
            times.append(at)
        assert times == sorted(times)
        now = datetime.datetime.now(datetime.UTC)
        assert abs((now - times[-1]).total_seconds()) < 60

    async def test_get_state_by_rev(self, driver: Driver) -> None:
        (r1,) = await _commit(driver, _write("s", to="one"))
        (r2,) = await _commit(driver, _write("s", r1, to="two"))
        await _commit(driver, _write("other"))
        assert (await driver.get_state("s", r1)).transition.to == "one"
        assert (await driver.get_state("s", r2)).transition.to == "two"
        assert (await driver.get_state("s")).rev == r2
        with pytest.raises(fs.NotFoundError):
            await driver.get_state("missing")
        with pytest.raises(fs.NotFoundError):
            await driver.get_state("other", r1)
        with pytest.raises(fs.NotFoundError):
            await driver.get_state("s", r2 + 100)

    async def test_returned_states_are_independent_copies(self, driver: Driver) -> None:
        await _commit(driver, _write("s", kind="x"))
        got = await driver.get_state("s")
        got.labels["kind"] = "changed"
        got.transition.annotations["x"] = "y"
        page = await driver.get_states(fs.StatesQuery())
        page.states[0].annotations["z"] = "z"
        again = await driver.get_state("s")
        assert again.labels == {"kind": "x"}
        assert again.transition.annotations == {}
        assert again.annotations == {}

    async def test_closed_driver_raises(self, driver: Driver) -> None:
        await driver.aclose()
        await driver.aclose()
        with pytest.raises(fs.ClosedError):
            await driver.get_state("s")
        with pytest.raises(fs.ClosedError):
            await _commit(driver, _write("s"))

    # -- driver: queries -------------------------------------------------------------------

    async def test_query_by_labels_and(self, driver: Driver) -> None:
        await _commit(driver, _write("a", kind="order", region="eu"))
        await _commit(driver, _write("b", kind="order", region="us"))
        await _commit(driver, _write("c", kind="user", region="eu"))
        page = await driver.get_states(fs.StatesQuery(labels={"kind": "order", "region": "eu"}))
        assert [s.id for s in page.states] == ["a"]
        page = await driver.get_states(fs.StatesQuery(labels={"kind": "order"}))
        assert [s.id for s in page.states] == ["a", "b"]
        page = await driver.get_states(fs.StatesQuery(labels={"kind": "nothing"}))
        assert page.states == []
        assert not page.more

    async def test_query_by_labels_or(self, driver: Driver) -> None:
        await _commit(driver, _write("a", kind="order", region="eu"))
        await _commit(driver, _write("b", kind="order", region="us"))
        await _commit(driver, _write("c", kind="user", region="eu"))
        await _commit(driver, _write("d", kind="user", region="us"))
        query = fs.StatesQuery(labels=[{"kind": "order", "region": "us"}, {"kind": "user"}])
        page = await driver.get_states(query)
        assert [s.id for s in page.states] == ["b", "c", "d"]
        overlapping = fs.StatesQuery(labels=[{"region": "eu"}, {"kind": "order"}])
        page = await driver.get_states(overlapping)
        assert [s.id for s in page.states] == ["a", "b", "c"], "a version matching twice shows once"

    async def test_query_since_rev_is_exclusive(self, driver: Driver) -> None:
        revs = [(await _commit(driver, _write(f"s{i}")))[0] for i in range(4)]
        page = await driver.get_states(fs.StatesQuery(since_rev=revs[1]))
        assert [s.rev for s in page.states] == revs[2:]
        page = await driver.get_states(fs.StatesQuery(since_rev=revs[-1]))
        assert page.states == []
        assert page.head_rev == revs[-1]

    async def test_query_since_latest(self, driver: Driver) -> None:
        await _commit(driver, _write("a", kind="x"))
        (rb,) = await _commit(driver, _write("b", kind="x"))
        await _commit(driver, _write("c", kind="y"))
        page = await driver.get_states(fs.StatesQuery(labels={"kind": "x"}, since_latest=True))
        assert [(s.id, s.rev) for s in page.states] == [("b", rb)]
        (rd,) = await _commit(driver, _write("d"))
        page = await driver.get_states(fs.StatesQuery(since_latest=True))
        assert [s.rev for s in page.states] == [rd]
        page = await driver.get_states(fs.StatesQuery(labels={"kind": "z"}, since_latest=True))
        assert page.states == []

    async def test_query_since_time_is_inclusive(self, driver: Driver) -> None:
        await _commit(driver, _write("old"))
        old = await driver.get_state("old")
        assert old.committed_at is not None
        # The next commit must carry a later millisecond than the first one.
        later = old.committed_at + datetime.timedelta(milliseconds=3)
        await asyncio.sleep(max(0.0, (later - datetime.datetime.now(datetime.UTC)).total_seconds()))
        result = await driver.commit(CommitRequest(writes=[_write("new")]))
        page = await driver.get_states(fs.StatesQuery(since_time=result.committed_at))
        assert [s.id for s in page.states] == ["new"]
        page = await driver.get_states(fs.StatesQuery(since_time=old.committed_at))
        assert [s.id for s in page.states] == ["old", "new"]
        future = result.committed_at + datetime.timedelta(hours=1)
        assert (await driver.get_states(fs.StatesQuery(since_time=future))).states == []

    async def test_query_latest_only(self, driver: Driver) -> None:
        (ra,) = await _commit(driver, _write("a", kind="x"))
        (rb,) = await _commit(driver, _write("b", kind="x"))
        (ra2,) = await _commit(driver, _write("a", ra, kind="x"))
        page = await driver.get_states(fs.StatesQuery(latest_only=True))
        assert [(s.id, s.rev) for s in page.states] == [("b", rb), ("a", ra2)]
        page = await driver.get_states(fs.StatesQuery(latest_only=True, since_rev=ra2))
        assert page.states == []

    async def test_query_history_of_one_state(self, driver: Driver) -> None:
        # "a/b" and "a" share a prefix and "a/b" holds a separator: neither may see the other.
        (r1,) = await _commit(driver, _write("a", kind="x"))
        await _commit(driver, _write("a/b", kind="x"), _write("ab"))
        (r2,) = await _commit(driver, _write("a", r1, kind="y"))
        await _commit(driver, _write("c", kind="x"))
        (r3,) = await _commit(driver, _write("a", r2, kind="x", team="t"))
        page = await driver.get_states(fs.StatesQuery(id="a"))
        assert [(s.id, s.rev) for s in page.states] == [("a", r1), ("a", r2), ("a", r3)]
        assert not page.more
        page = await driver.get_states(fs.StatesQuery(id="a/b"))
        assert [s.id for s in page.states] == ["a/b"]
        page = await driver.get_states(fs.StatesQuery(id="a", since_rev=r1))
        assert [s.rev for s in page.states] == [r2, r3]
        page = await driver.get_states(fs.StatesQuery(id="a", limit=2))
        assert [s.rev for s in page.states] == [r1, r2]
        assert page.more
        page = await driver.get_states(fs.StatesQuery(id="a", since_latest=True))
        assert [s.rev for s in page.states] == [r3]
        page = await driver.get_states(fs.StatesQuery(id="a", latest_only=True))
        assert [s.rev for s in page.states] == [r3]
        page = await driver.get_states(fs.StatesQuery(id="a", labels={"kind": "x"}))
        assert [s.rev for s in page.states] == [r1, r3]
        page = await driver.get_states(
            fs.StatesQuery(id="a", labels=[{"kind": "y"}, {"team": "t"}])
        )
        assert [s.rev for s in page.states] == [r2, r3]
        page = await driver.get_states(
            fs.StatesQuery(id="a", labels={"kind": "y"}, since_latest=True)
        )
        assert [s.rev for s in page.states] == [r2]
        page = await driver.get_states(
            fs.StatesQuery(id="a", labels={"kind": "y"}, latest_only=True)
        )
        assert page.states == []
        assert (await driver.get_states(fs.StatesQuery(id="missing"))).states == []
        page = await driver.get_states(fs.StatesQuery(id="missing", since_latest=True))
        assert page.states == []

    async def test_query_history_pages_through_a_long_history(self, driver: Driver) -> None:
        rev = 0
        revs = []
        for n in range(12):
            (rev,) = await _commit(driver, _write("long", rev, to=f"step{n}"))
            revs.append(rev)
            await _commit(driver, _write(f"other{n}"))
        seen: list[int] = []
        query = fs.StatesQuery(id="long", limit=5)
        while True:
            page = await driver.get_states(query)
            seen += [s.rev for s in page.states]
            assert all(s.id == "long" for s in page.states)
            if not page.more:
                break
            query = query.replace(since_rev=page.states[-1].rev)
        assert seen == revs
        assert page.head_rev == await driver.head_rev()

    async def test_label_change_moves_a_state_out_of_a_filter(self, driver: Driver) -> None:
        (r1,) = await _commit(driver, _write("a", status="open"))
        (r2,) = await _commit(driver, _write("a", r1, status="closed"))
        page = await driver.get_states(fs.StatesQuery(labels={"status": "open"}))
        assert [s.rev for s in page.states] == [r1]
        page = await driver.get_states(fs.StatesQuery(labels={"status": "open"}, latest_only=True))
        assert page.states == []
        page = await driver.get_states(
            fs.StatesQuery(labels={"status": "closed"}, latest_only=True)
        )
        assert [s.rev for s in page.states] == [r2]

    async def test_paging_with_more(self, driver: Driver) -> None:
        for i in range(7):
            await _commit(driver, _write(f"s{i}", kind="p"))
        seen: list[str] = []
        query = fs.StatesQuery(labels={"kind": "p"}, limit=3)
        pages = 0
        while True:
            page = await driver.get_states(query)
            pages += 1
            seen += [s.id for s in page.states]
            if not page.more:
                break
            assert len(page.states) >= 3
            query = query.replace(since_rev=page.states[-1].rev)
        assert seen == [f"s{i}" for i in range(7)]
        assert pages == 3

    async def test_page_never_splits_a_revision(self, driver: Driver) -> None:
        await _commit(driver, _write("a"))
        await _commit(driver, _write("b"), _write("c"), _write("d"))
        await _commit(driver, _write("e"), _write("f"))
        await _commit(driver, _write("g"))
        seen: list[int] = []
        query = fs.StatesQuery(limit=2)
        while True:
            page = await driver.get_states(query)
            revs = [s.rev for s in page.states]
            assert not set(revs) & set(seen), "a revision was split across pages"
            seen += revs
            if not page.more:
                break
            query = query.replace(since_rev=revs[-1])
        assert len(seen) == 7
        assert seen == sorted(seen)

    async def test_invalid_queries(self) -> None:
        with pytest.raises(fs.InvalidQueryError):
            fs.StatesQuery(limit=0)
        with pytest.raises(fs.InvalidQueryError):
            fs.StatesQuery(since_rev=-1)
        with pytest.raises(fs.InvalidQueryError):
            fs.StatesQuery(since_time=datetime.datetime(2020, 1, 1))
        with pytest.raises(fs.InvalidQueryError):
            fs.StatesQuery(labels={"k": 1})  # type: ignore[dict-item]

    # -- driver: data, delays, waiting, leases ---------------------------------------------

    async def test_data_is_written_with_the_commit(self, driver: Driver) -> None:
        write = _write("s")
        write.data = {"payload": b"v1"}
        (r1,) = await _commit(driver, write)
        (r2,) = await _commit(driver, _write("s", r1))
        write = _write("s", r2)
        write.data = {"payload": b"v2"}
        (r3,) = await _commit(driver, write)
        assert await driver.get_data("s", "payload") == (r3, b"v2")
        assert await driver.get_data("s", "payload", r2) == (r1, b"v1")
        assert await driver.get_data("s", "payload", r1) == (r1, b"v1")
        with pytest.raises(fs.NotFoundError):
            await driver.get_data("s", "other")
        stale = _write("s", r1)
        stale.data = {"payload": b"lost"}
        with pytest.raises(fs.ConflictError):
            await _commit(driver, stale)
        assert await driver.get_data("s", "payload") == (r3, b"v2")

    async def test_delays_are_written_with_the_commit(self, driver: Driver) -> None:
        at = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
        write = _write("s", to="wait")
        write.delay_to, write.delay_at = "wake", at
        (r1,) = await _commit(driver, write)
        await _commit(driver, _write("other"))
        stale = _write("s", 0)
        stale.delay_to, stale.delay_at = "never", at
        with pytest.raises(fs.ConflictError):
            await _commit(driver, stale)
        page = await driver.get_delays()
        assert [(d.state.id, d.rev, d.to, d.at) for d in page.delays] == [("s", r1, "wake", at)]
        assert page.delays[0].state.transition.to == "wait"
        assert (await driver.get_delays(since_rev=r1)).delays == []

    async def test_wait_for_rev(self, driver: Driver) -> None:
        (rev,) = await _commit(driver, _write("a"))
        async with asyncio.timeout(5):
            await driver.wait_for_rev(rev)
        waiter = asyncio.ensure_future(driver.wait_for_rev(rev + 1))
        await asyncio.sleep(0)
        assert not waiter.done()
        await _commit(driver, _write("b"))
        async with asyncio.timeout(10):
            await waiter

    async def test_leases(self, driver: Driver) -> None:
        self.require(isinstance(driver, SupportsLease), "the driver has no leases")
        assert isinstance(driver, SupportsLease)
        lease = await driver.acquire_lease("leader", "one", 30)
        assert lease is not None
        assert lease.holder == "one"
        assert await driver.acquire_lease("leader", "two", 30) is None
        assert await driver.get_lease("leader") == lease
        renewed = await driver.renew_lease(lease)
        assert renewed is not None
        await driver.release_lease(renewed)
        assert await driver.get_lease("leader") is None
        assert await driver.renew_lease(renewed) is None
        other = await driver.acquire_lease("leader", "two", 30)
        assert other is not None
        assert other.token != lease.token
        await driver.release_lease(lease)  # a lost lease: releasing it changes nothing
        assert await driver.get_lease("leader") == other

    async def test_lease_expires(self, driver: Driver) -> None:
        self.require(isinstance(driver, SupportsLease), "the driver has no leases")
        assert isinstance(driver, SupportsLease)
        lease = await driver.acquire_lease("short", "one", 1)
        assert lease is not None
        async with asyncio.timeout(10):
            # Expiry is the passing of time: there is no event to await, so poll (bounded).
            while await driver.get_lease("short") is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert await driver.renew_lease(lease) is None
        assert await driver.acquire_lease("short", "two", 30) is not None

    async def test_bad_arguments_are_refused_before_the_store(self, driver: Driver) -> None:
        # A driver's methods are public (the recovery services and the HTTP service call
        # them directly): an argument no store can take gets a flowstate error on every
        # driver, never an OverflowError, a UnicodeEncodeError or the backend's own error.
        (rev,) = await _commit(driver, _write("a"))
        too_big = 2**63
        reads: list[tuple[str, tuple[Any, ...]]] = [
            ("get_state", ("",)),
            ("get_state", ("\ud800",)),
            ("get_state", ("a", too_big)),
            ("get_state", ("a", -1)),
            ("get_data", ("a", "x", too_big)),
            ("get_data", ("\udc80", "x")),
            ("get_data", ("a", "\udc80")),
            ("get_data", ("a", "")),
            ("get_delays", (too_big,)),
            ("get_delays", (-1,)),
            ("get_delays", (0, -1)),
            ("get_delays", (0, too_big)),
            ("wait_for_rev", (too_big,)),
            ("wait_for_rev", ("1",)),
        ]
        for name, args in reads:
            with pytest.raises(fs.InvalidQueryError):
                await getattr(driver, name)(*args)
        if not isinstance(driver, SupportsLease):
            return
        claims: list[tuple[Any, Any, Any]] = [
            ("", "h", 5),
            ("\ud800", "h", 5),
            ("l", "\ud800", 5),
            ("l", "", 5),
            ("l", "h", -1),
            ("l", "h", float("nan")),
            ("l", "h", float("inf")),
            ("l", "h", 1e300),
            ("l", "h", "5"),
        ]
        for claim in claims:
            with pytest.raises(fs.InvalidCommandError):
                await driver.acquire_lease(*claim)
        forged = Lease(name="l", holder="h", token=too_big, ttl=5)
        for method in (driver.renew_lease, driver.release_lease):
            with pytest.raises(fs.InvalidCommandError):
                await method(forged)
        with pytest.raises(fs.InvalidQueryError):
            await driver.get_lease("\udc80")
        # None of it changed the store.
        assert await driver.head_rev() == rev
        assert await driver.get_lease("l") is None

    # -- engine: commands ------------------------------------------------------------------

    async def test_commit_updates_ctx_in_place(self, engine: fs.Engine) -> None:
        ctx = fs.StateCtx.new("s", labels={"k": "v"})
        await engine.do(fs.Transit(ctx, "a"), fs.Transit(ctx, "b"))
        assert [t.to for t in ctx.transitions] == ["a", "b"]
        assert ctx.committed.rev == 0
        await engine.do(fs.Commit(fs.Transit(ctx, "c")))
        assert ctx.current.rev == ctx.committed.rev > 0
        assert ctx.current.committed_at is not None
        assert ctx.committed.committed_at == ctx.current.committed_at
        assert ctx.transitions == []
        assert ctx.committed is not ctx.current
        ctx.current.annotations["x"] = "y"
        assert ctx.committed.annotations == {}
        stored = await engine.get_state("s")
        assert stored.current == ctx.committed

    async def test_failed_commit_leaves_revisions_unchanged(self, engine: fs.Engine) -> None:
        a, b = fs.StateCtx.new("a"), fs.StateCtx.new("b")
        await engine.do(fs.Commit(fs.Transit(a, "x"), fs.Transit(b, "x")))
        stale_b = (await engine.get_state("b")).copy()
        await engine.do(fs.Commit(fs.Transit(b, "moved")))
        a_rev, stale_rev = a.committed.rev, stale_b.committed.rev
        with pytest.raises(fs.ConflictError) as info:
            await engine.do(fs.Commit(fs.Transit(a, "y"), fs.Transit(stale_b, "y")))
        assert info.value.ids == ["b"]
        assert (a.current.rev, a.committed.rev) == (a_rev, a_rev)
        assert (stale_b.current.rev, stale_b.committed.rev) == (stale_rev, stale_rev)
        assert [t.to for t in a.transitions] == ["y"], "in-memory transitions stay for a retry"
        assert (await engine.get_state("a")).current.transition.to == "x"

    async def test_status_helpers(self, engine: fs.Engine) -> None:
        ctx = fs.StateCtx.new("s")
        await engine.do(fs.Commit(fs.Transit(ctx, "work")))
        assert _status(ctx) == "running"
        await engine.do(fs.Commit(fs.Pause(ctx)))
        assert _status(ctx) == "paused"
        assert ctx.committed.is_paused
        assert ctx.committed.transition.to == "work"
        await engine.do(fs.Commit(fs.Resume(ctx)))
        assert _status(ctx) == "running"
        await engine.do(fs.Commit(fs.End(ctx)))
        assert _status(ctx) == "ended"
        assert ctx.committed.is_ended
        await engine.do(fs.Commit(fs.Transit(ctx, "again")))
        assert _status(ctx) == "running", "the engine imposes no lifecycle"

    async def test_invalid_commands(self, engine: fs.Engine) -> None:
        ctx = fs.StateCtx.new("s")
        with pytest.raises(fs.InvalidCommandError):
            fs.StateCtx.new("")
        with pytest.raises(fs.InvalidCommandError):
            fs.Transit(ctx, "")
        with pytest.raises(fs.InvalidCommandError):
            fs.Commit(fs.Commit(fs.Transit(ctx, "a")))
        with pytest.raises(fs.InvalidCommandError):
            fs.Commit(fs.Execute(ctx))
        with pytest.raises(fs.InvalidCommandError):
            fs.Delay(ctx, "later")
        with pytest.raises(fs.InvalidCommandError):
            fs.Delay(ctx, "later", seconds=-1)
        ctx.current.annotations["n"] = 1  # type: ignore[assignment]
        with pytest.raises(fs.InvalidCommandError):
            await engine.do(fs.Commit(fs.Transit(ctx, "a")))
        twin = fs.StateCtx.new("s")
        with pytest.raises(fs.InvalidCommandError):
            await engine.do(
                fs.Commit(
                    fs.Transit(fs.StateCtx.new("t"), "a"),
                    fs.Transit(twin, "a"),
                    fs.End(fs.StateCtx.new("t")),
                )
            )
        assert await engine.driver.head_rev() == 0, "nothing was written"

    async def test_data_store_and_get(self, engine: fs.Engine) -> None:
        ctx = fs.StateCtx.new("s")
        ctx.data["doc"] = fs.Data(blob=b"first")
        await engine.do(fs.Commit(fs.Transit(ctx, "a"), fs.StoreData(ctx, "doc")))
        first_rev = ctx.data["doc"].rev
        assert first_rev == ctx.committed.rev
        await engine.do(fs.Commit(fs.Transit(ctx, "b"), fs.StoreData(ctx, "doc")))
        assert ctx.data["doc"].rev == first_rev, "unchanged data keeps its revision"
        ctx.data["doc"] = fs.Data(blob=b"second")
        await engine.do(fs.Commit(fs.Transit(ctx, "c"), fs.StoreData(ctx, "doc")))
        assert ctx.data["doc"].rev == ctx.committed.rev > first_rev
        fresh = await engine.get_state("s")
        await engine.do(fs.GetData(fresh, "doc"))
        assert fresh.data["doc"] == fs.Data(blob=b"second", rev=ctx.committed.rev)
        old = await engine.get_state("s", first_rev)
        await engine.do(fs.GetData(old, "doc"))
        assert old.data["doc"] == fs.Data(blob=b"first", rev=first_rev)
        with pytest.raises(fs.NotFoundError):
            await engine.do(fs.GetData(fresh, "missing"))
        with pytest.raises(fs.InvalidCommandError):
            await engine.do(fs.Commit(fs.StoreData(fresh, "missing")))

    async def test_delay_binds_to_the_version_it_commits(self, engine: fs.Engine) -> None:
        ctx = fs.StateCtx.new("s")
        await engine.do(fs.Commit(fs.Transit(ctx, "work")))
        await engine.do(fs.Commit(fs.Pause(ctx), fs.Delay(ctx, "wake", seconds=3600)))
        assert ctx.committed.is_delayed
        assert ctx.committed.is_paused
        page = await engine.driver.get_delays()
        assert [(d.state.id, d.rev, d.to) for d in page.delays] == [
            ("s", ctx.committed.rev, "wake")
        ]
        assert page.delays[0].state.is_delayed
        await engine.do(fs.Commit(fs.Resume(ctx)))
        assert not ctx.committed.is_delayed, "a new transition drops the delay marker"

    async def test_stack_and_unstack(self, engine: fs.Engine) -> None:
        carrier, stacked = fs.StateCtx.new("carrier"), fs.StateCtx.new("stacked", labels={"a": "b"})
        await engine.do(fs.Commit(fs.Transit(stacked, "inner")))
        await engine.do(fs.Commit(fs.Stack(carrier, stacked, "call"), fs.Transit(carrier, "outer")))
        assert "call" in carrier.committed.annotations
        with pytest.raises(fs.InvalidCommandError):
            await engine.do(fs.Stack(carrier, stacked, "call"))
        restored = fs.StateCtx.new("placeholder")
        reread = await engine.get_state("carrier")
        await engine.do(fs.Unstack(reread, restored, "call"))
        assert restored.current == stacked.current
        assert restored.committed == stacked.committed
        assert "call" not in reread.current.annotations
        with pytest.raises(fs.InvalidCommandError):
            await engine.do(fs.Unstack(reread, restored, "call"))

    async def test_noop_in_commit_stores_the_state_as_it_is(self, engine: fs.Engine) -> None:
        ctx = fs.StateCtx.new("s")
        await engine.do(fs.Commit(fs.Transit(ctx, "a")))
        ctx.current.annotations["seen"] = "yes"
        await engine.do(fs.Commit(fs.Noop(ctx)))
        assert (await engine.get_state("s")).current.annotations == {"seen": "yes"}

    # -- engine: flows (the Go suite's testcases, rewritten) -------------------------------

    async def test_single_node(self, engine: fs.Engine) -> None:
        calls = []

        @engine.flow("only")
        async def only(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            calls.append(ctx.id)
            return fs.Commit(fs.End(ctx))

        ctx = fs.StateCtx.new("s")
        await engine.do(fs.Commit(fs.Transit(ctx, "only")))
        result = await engine.execute(ctx)
        assert (result.status, result.steps) == ("ended", 1)
        assert calls == ["s"]
        versions = await _all(engine)
        assert [(v.transition.to, v.status) for v in versions] == [
            ("only", "running"),
            ("", "ended"),
        ]

    @pytest.mark.parametrize("commit_each_step", [True, False])
    async def test_three_nodes(self, engine: fs.Engine, commit_each_step: bool) -> None:
        order = []

        def node(name: str, following: str) -> fs.Flow:
            async def flow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
                order.append(name)
                if not following:
                    return fs.Commit(fs.End(ctx))
                step = fs.Transit(ctx, following)
                return fs.Commit(step) if commit_each_step else step

            return flow

        engine.flows.register("first", node("first", "second"))
        engine.flows.register("second", node("second", "third"))
        engine.flows.register("third", node("third", ""))
        ctx = fs.StateCtx.new("s")
        await engine.do(fs.Commit(fs.Transit(ctx, "first")))
        result = await engine.execute(ctx)
        assert (result.status, result.steps) == ("ended", 3)
        assert order == ["first", "second", "third"]
        tos = [v.transition.to for v in await _all(engine)]
        assert tos == (["first", "second", "third", ""] if commit_each_step else ["first", ""])

    async def test_condition_branching(self, engine: fs.Engine) -> None:
        @engine.flow("check")
        async def check(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            amount = int(ctx.current.annotations["amount"])
            return fs.Commit(fs.Transit(ctx, "big" if amount > 100 else "small"))

        @engine.flow("big")
        async def big(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            ctx.current.annotations["path"] = "big"
            return fs.Commit(fs.End(ctx))

        @engine.flow("small")
        async def small(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            ctx.current.annotations["path"] = "small"
            return fs.Commit(fs.End(ctx))

        for state_id, amount in [("a", "500"), ("b", "5")]:
            ctx = fs.StateCtx.new(state_id, annotations={"amount": amount})
            await engine.do(fs.Commit(fs.Transit(ctx, "check")))
            assert (await engine.execute(ctx)).status == "ended"
        assert (await engine.get_state("a")).current.annotations["path"] == "big"
        assert (await engine.get_state("b")).current.annotations["path"] == "small"

    async def test_call_and_return_with_stack(self, engine: fs.Engine) -> None:
        @engine.flow("caller")
        async def caller(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            if "answer" in ctx.current.annotations:
                return fs.Commit(fs.End(ctx))
            callee = fs.StateCtx.new(f"{ctx.id}.callee")
            await engine.do(
                fs.Commit(
                    fs.Pause(ctx),
                    fs.Stack(callee, ctx, "caller"),
                    fs.Transit(callee, "callee"),
                )
            )
            return fs.Execute(callee)

        @engine.flow("callee")
        async def callee(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            returned = fs.StateCtx.new("placeholder")
            await engine.do(fs.Unstack(ctx, returned, "caller"))
            back = await engine.get_state(returned.id)  # the stacked copy predates the commit
            back.current.annotations["answer"] = "42"
            await engine.do(fs.Commit(fs.End(ctx), fs.Resume(back)))
            return fs.Execute(back)

        ctx = fs.StateCtx.new("main")
        await engine.do(fs.Commit(fs.Transit(ctx, "caller")))
        result = await engine.execute(ctx)
        assert result.status == "ended"
        assert result.ctx.id == "main"
        main = await engine.get_state("main")
        assert main.current.is_ended
        assert main.current.annotations["answer"] == "42"
        assert (await engine.get_state("main.callee")).current.is_ended

    async def test_fork(self, engine: fs.Engine) -> None:
        @engine.flow("fork")
        async def fork(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            children = [
                fs.StateCtx.new(f"{ctx.id}.{i}", labels={"parent": ctx.id}) for i in range(3)
            ]
            await engine.do(
                fs.Commit(fs.End(ctx), *(fs.Transit(child, "child") for child in children))
            )
            for child in children:
                await engine.do(fs.Execute(child))
            return fs.Noop(ctx)

        done = asyncio.Event()

        @engine.flow("child")
        async def child(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            return fs.Commit(fs.End(ctx))

        ctx = fs.StateCtx.new("p")
        await engine.do(fs.Commit(fs.Transit(ctx, "fork")))
        assert (await engine.execute(ctx)).status == "noop"
        ended = set()
        async with engine.watch(labels={"parent": "p"}) as watcher:
            async for state in watcher:
                if state.is_ended:
                    ended.add(state.id)
                if len(ended) == 3:
                    done.set()
                    break
        assert ended == {"p.0", "p.1", "p.2"}

    async def test_fork_join_exactly_one_joiner_wins(self, engine: fs.Engine) -> None:
        parent = fs.StateCtx.new("parent")
        children = [fs.StateCtx.new(f"child{i}", labels={"parent": "parent"}) for i in range(4)]
        await engine.do(
            fs.Commit(fs.Pause(parent, "join"), *(fs.Transit(c, "work") for c in children))
        )
        snapshot = await engine.get_state("parent")
        outcomes: dict[str, str] = {}

        @engine.flow("work")
        async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            await asyncio.sleep(0)
            joiner = snapshot.copy()  # every child saw the same parent version
            return fs.Commit(fs.End(ctx), fs.Resume(joiner))

        results = await asyncio.gather(*(engine.execute(c) for c in children))
        for child, result in zip(children, results, strict=True):
            outcomes[child.id] = result.status
        winners = [cid for cid, status in outcomes.items() if status != "conflict"]
        assert len(winners) == 1
        ended = [
            s.id
            for s in await _all(engine, labels={"parent": "parent"}, latest_only=True)
            if s.is_ended
        ]
        assert ended == winners, "a losing joiner's End was not written either"
        joined = await engine.get_state("parent")
        assert joined.current.status == "running"
        assert joined.current.transition.to == "join"

    async def test_mutex_never_admits_two_holders(self, engine: fs.Engine) -> None:
        mutex = fs.StateCtx.new("mutex", annotations={"holder": ""})
        await engine.do(fs.Commit(fs.Transit(mutex, "free")))
        inside: set[str] = set()
        max_inside = 0
        entries = 0

        async def worker(name: str, rounds: int) -> None:
            nonlocal max_inside, entries
            for _ in range(rounds):
                while True:
                    lock = await engine.get_state("mutex")
                    if lock.current.annotations["holder"]:
                        async with engine.watch(since_rev=lock.committed.rev) as watcher:
                            await _next(watcher)  # wait for any change, then look again
                        continue
                    lock.current.annotations["holder"] = name
                    try:
                        await engine.do(fs.Commit(fs.Transit(lock, "held")))
                    except fs.ConflictError:
                        continue
                    break
                inside.add(name)
                max_inside = max(max_inside, len(inside))
                entries += 1
                await asyncio.sleep(0)
                inside.discard(name)
                lock.current.annotations["holder"] = ""
                await engine.do(fs.Commit(fs.Transit(lock, "free")))

        async with asyncio.timeout(60):
            await asyncio.gather(*(worker(f"w{i}", 5) for i in range(4)))
        assert entries == 20
        assert max_inside == 1

    async def test_queue_worker_dequeues_in_commit_order(self, engine: fs.Engine) -> None:
        produced = []
        for i in range(10):
            item = fs.StateCtx.new(f"item{i}", labels={"queue": "jobs"})
            await engine.do(fs.Commit(fs.Pause(item, "process")))
            produced.append(item.committed.rev)
        consumed: list[int] = []
        async with engine.watch(labels={"queue": "jobs"}) as watcher:
            async for state in watcher:
                if not state.is_paused:
                    continue
                item = fs.StateCtx.of(state)
                await engine.do(fs.Commit(fs.End(item)))
                consumed.append(state.rev)
                if len(consumed) == len(produced):
                    break
        assert consumed == produced

    async def test_transfer_conflicts_and_is_retried(self, engine: fs.Engine) -> None:
        a = fs.StateCtx.new("acct-a", annotations={"balance": "100"})
        b = fs.StateCtx.new("acct-b", annotations={"balance": "100"})
        await engine.do(fs.Commit(fs.Transit(a, "account"), fs.Transit(b, "account")))
        attempts = 0

        async def transfer(src: str, dst: str, amount: int, barrier: asyncio.Barrier) -> None:
            nonlocal attempts
            first = True
            while True:
                attempts += 1
                s, d = await engine.get_state(src), await engine.get_state(dst)
                if first:
                    first = False
                    await barrier.wait()  # both transfers read the same revisions
                for ctx, delta in ((s, -amount), (d, amount)):
                    ctx.current.annotations["balance"] = str(
                        int(ctx.current.annotations["balance"]) + delta
                    )
                try:
                    await engine.do(fs.Commit(fs.Transit(s, "account"), fs.Transit(d, "account")))
                except fs.ConflictError as exc:
                    conflicting.update(exc.ids)
                    continue
                return

        conflicting: set[str] = set()
        barrier = asyncio.Barrier(2)
        await asyncio.gather(
            transfer("acct-a", "acct-b", 30, barrier), transfer("acct-b", "acct-a", 50, barrier)
        )
        assert attempts == 3, "exactly one transfer lost the race and retried once"
        assert conflicting == {"acct-a", "acct-b"}
        balances = {
            s: int((await engine.get_state(s)).current.annotations["balance"])
            for s in ("acct-a", "acct-b")
        }
        assert balances == {"acct-a": 120, "acct-b": 80}

    async def test_execute_results(self, engine: fs.Engine) -> None:
        @engine.flow("pause")
        async def pause(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            return fs.Commit(fs.Pause(ctx))

        @engine.flow("delay")
        async def delay(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            return fs.Delay(ctx, "pause", seconds=3600)

        @engine.flow("noop")
        async def noop(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            return fs.Noop(ctx)

        @engine.flow("race")
        async def race(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            other = await engine.get_state(ctx.id)
            await engine.do(fs.Commit(fs.Transit(other, "elsewhere")))
            return fs.Commit(fs.End(ctx))

        @engine.flow("bad")
        async def bad(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            return "not a command"  # type: ignore[return-value]

        @engine.flow("boom")
        async def boom(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            raise RuntimeError("boom")

        expected = {"pause": "paused", "delay": "delayed", "noop": "noop", "race": "conflict"}
        for flow_id, status in expected.items():
            ctx = fs.StateCtx.new(flow_id)
            await engine.do(fs.Commit(fs.Transit(ctx, flow_id)))
            result = await engine.execute(ctx)
            assert result.status == status, flow_id
        conflicted = await engine.get_state("race")
        assert conflicted.current.transition.to == "elsewhere"
        delayed = await engine.get_state("delay")
        assert delayed.current.is_delayed
        for flow_id, error in [
            ("bad", fs.InvalidCommandError),
            ("boom", RuntimeError),
            ("nowhere", fs.FlowNotFoundError),
        ]:
            ctx = fs.StateCtx.new(flow_id)
            await engine.do(fs.Commit(fs.Transit(ctx, flow_id)))
            with pytest.raises(error):
                await engine.execute(ctx)
        paused = await engine.get_state("pause")
        assert (await engine.execute(paused)).steps == 0

    async def test_background_execute(self, engine: fs.Engine) -> None:
        @engine.flow("bg")
        async def bg(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            return fs.Commit(fs.End(ctx))

        ctx = fs.StateCtx.new("s")
        await engine.do(fs.Commit(fs.Transit(ctx, "bg")))
        async with engine.watch(since_rev=ctx.committed.rev) as watcher:
            await engine.do(fs.Execute(ctx))
            state = await _next(watcher)
        assert state.is_ended

    # -- engine: queries -------------------------------------------------------------------

    async def test_find_state_of_one_commit_is_the_last_written(self, engine: fs.Engine) -> None:
        pair = [fs.StateCtx.new(f"pair-{n}", labels={"kind": "pair"}) for n in range(2)]
        await engine.do(fs.Commit(*(fs.Transit(ctx, "a") for ctx in pair)))
        assert (await engine.find_state({"kind": "pair"})).id == "pair-1"

    async def test_engine_queries(self, engine: fs.Engine) -> None:
        for i in range(5):
            ctx = fs.StateCtx.new(f"s{i}", labels={"kind": "even" if i % 2 == 0 else "odd"})
            await engine.do(fs.Commit(fs.Transit(ctx, "a")))
        found = await engine.find_state({"kind": "odd"})
        assert found.id == "s3"
        with pytest.raises(fs.NotFoundError):
            await engine.find_state({"kind": "none"})
        page = await engine.get_states(labels={"kind": "even"}, limit=2)
        assert ([s.id for s in page.states], page.more) == (["s0", "s2"], True)
        page = await engine.get_states(fs.StatesQuery(labels={"kind": "even"}))
        assert [s.id for s in page.states] == ["s0", "s2", "s4"]
        assert [s.id for s in await _all(engine, limit=2)] == [f"s{i}" for i in range(5)]
        with pytest.raises(fs.InvalidQueryError):
            await engine.get_states(fs.StatesQuery(), limit=2)
        with pytest.raises(fs.InvalidQueryError):
            await engine.get_states(nonsense=True)
        for bad_id in ("", 7):
            with pytest.raises(fs.InvalidQueryError):
                await engine.get_states(id=bad_id)
        with pytest.raises(fs.InvalidQueryError):
            await engine.get_state("")

    # -- engine: watching ------------------------------------------------------------------

    async def test_watch_delivers_every_version_in_order(self, engine: fs.Engine) -> None:
        ctx = fs.StateCtx.new("s")
        await engine.do(fs.Commit(fs.Transit(ctx, "a")))
        async with engine.watch(since_rev=0, limit=2) as watcher:
            first = await _next(watcher)
            assert (first.id, first.transition.to) == ("s", "a")
            for to in ["b", "c", "d", "e"]:
                await engine.do(fs.Commit(fs.Transit(ctx, to)))
            seen = [(await _next(watcher)).transition.to for _ in range(4)]
        assert seen == ["b", "c", "d", "e"]

    async def test_watch_resumes_from_rev(self, engine: fs.Engine) -> None:
        ctx = fs.StateCtx.new("s")
        for to in ["a", "b", "c"]:
            await engine.do(fs.Commit(fs.Transit(ctx, to)))
        async with engine.watch() as watcher:
            await _next(watcher)
            resume_at = watcher.rev
        async with engine.watch(since_rev=resume_at) as watcher:
            assert [(await _next(watcher)).transition.to for _ in range(2)] == ["b", "c"]

    async def test_watch_filters(self, engine: fs.Engine) -> None:
        for i, kind in enumerate(["x", "y", "x", "z"]):
            ctx = fs.StateCtx.new(f"s{i}", labels={"kind": kind})
            await engine.do(fs.Commit(fs.Transit(ctx, "a")))
        async with engine.watch(labels={"kind": "x"}) as watcher:
            assert [(await _next(watcher)).id for _ in range(2)] == ["s0", "s2"]
        async with engine.watch(labels=[{"kind": "y"}, {"kind": "z"}]) as watcher:
            assert [(await _next(watcher)).id for _ in range(2)] == ["s1", "s3"]
        async with engine.watch(labels={"kind": "x"}, since_latest=True) as watcher:
            assert (await _next(watcher)).id == "s2"
            late = fs.StateCtx.new("late", labels={"kind": "x"})
            await engine.do(fs.Commit(fs.Transit(late, "a")))
            await engine.do(
                fs.Commit(fs.Transit(fs.StateCtx.new("noise", labels={"kind": "y"}), "a"))
            )
            await engine.do(fs.Commit(fs.Transit(late, "b")))
            assert [(await _next(watcher)).transition.to for _ in range(2)] == ["a", "b"]

    async def test_watch_one_state(self, engine: fs.Engine) -> None:
        target = fs.StateCtx.new("target")
        other = fs.StateCtx.new("target-2")
        await engine.do(fs.Commit(fs.Transit(target, "a")), fs.Commit(fs.Transit(other, "a")))
        async with engine.watch(id="target", since_latest=True) as watcher:
            assert (await _next(watcher)).transition.to == "a"
            await engine.do(fs.Commit(fs.Transit(other, "b")))
            await engine.do(fs.Commit(fs.Transit(target, "b"), fs.Transit(other, "c")))
            await engine.do(fs.Commit(fs.End(target)))
            seen = [await _next(watcher) for _ in range(2)]
        assert [(s.id, s.transition.to) for s in seen] == [("target", "b"), ("target", "")]

    async def test_watch_sees_a_commit_whole(self, engine: fs.Engine) -> None:
        async with engine.watch() as watcher:
            ctxs = [fs.StateCtx.new(f"s{i}") for i in range(5)]
            await engine.do(fs.Commit(*(fs.Transit(c, "a") for c in ctxs)))
            states = [await _next(watcher) for _ in ctxs]
        assert [s.id for s in states] == [c.id for c in ctxs]
        assert [s.rev for s in states] == [c.committed.rev for c in ctxs]

    async def test_watch_ends_when_engine_closes(self, driver: Driver) -> None:
        engine = fs.Engine(driver)
        async with engine:
            watcher = engine.watch()
            received = []

            async def consume() -> None:
                async for state in watcher:
                    received.append(state)

            consumer = asyncio.ensure_future(consume())
            await asyncio.sleep(0)
        async with asyncio.timeout(10):
            await consumer
        assert received == []

    async def test_watcher_closed_raises(self, engine: fs.Engine) -> None:
        watcher = engine.watch()
        await watcher.aclose()
        await watcher.aclose()
        with pytest.raises(fs.ClosedError):
            await anext(watcher)

    # -- engine: lifecycle -----------------------------------------------------------------

    async def test_engine_lifecycle(self, driver: Driver) -> None:
        engine = fs.Engine(driver)
        with pytest.raises(fs.ClosedError):
            await engine.get_state("s")
        async with engine:
            await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new("s"), "a")))
        await engine.aclose()
        with pytest.raises(fs.ClosedError):
            await engine.get_state("s")
        with pytest.raises(fs.ClosedError):
            await engine.open()
        assert (await driver.get_state("s")).transition.to == "a", "a passed-in driver stays open"

    async def test_aclose_cancels_background_flows(self, driver: Driver) -> None:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def slow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            raise AssertionError("unreachable")

        async with fs.Engine(driver, flows={"slow": slow}) as engine:
            ctx = fs.StateCtx.new("s")
            await engine.do(fs.Commit(fs.Transit(ctx, "slow")), fs.Execute(ctx))
            await started.wait()
        assert cancelled.is_set()
