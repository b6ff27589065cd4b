"""A hypothesis state machine that checks a driver against a plain-Python model.

Random commits (some deliberately stale, so they must conflict), reads, queries with every
filter but time, data reads and a live watcher run against the driver and a list-and-dict
model; after every step the two must agree. Run it for any driver in a few lines::

    from flowstate.testing.stateful import run_driver_machine

    def test_my_driver_matches_the_model(tmp_path):
        counter = itertools.count()
        run_driver_machine(lambda: MyDriver.from_url(f"my://{tmp_path}/{next(counter)}"))

The factory must return a fresh, unopened driver on an empty store each time it is called.
Hypothesis has no async rules, so each machine owns one ``asyncio.Runner``, created in
``__init__`` and closed in ``teardown``; the machine fails if a step leaves a task running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import flowstate as fs
from flowstate.drivers.base import CommitRequest, Driver, StateWrite

__all__ = ["DriverStateMachine", "run_driver_machine"]

DriverFactory = Callable[[], Driver | Awaitable[Driver]]

IDS = ("a", "b", "c", "d", "e")
label_keys, label_values = st.sampled_from(("kind", "team")), st.sampled_from(("x", "y"))
label_maps = st.dictionaries(label_keys, label_values, max_size=2)
or_label_maps = st.lists(
    st.dictionaries(label_keys, label_values, min_size=1), min_size=2, max_size=2
)
writes = st.lists(
    st.tuples(
        st.sampled_from(IDS),
        label_maps,
        st.sampled_from(("next", "work", "")),
        st.none() | st.binary(max_size=8),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda w: w[0],
)


@attrs.frozen
class _Version:
    id: str
    rev: int
    labels: dict[str, str]
    to: str


class DriverStateMachine(RuleBasedStateMachine):
    """Drive a driver and a model with the same random operations and compare them.

    Subclass it and implement :meth:`make_driver`, or use :func:`run_driver_machine`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.log: list[_Version] = []
        self.latest: dict[str, int] = {}
        self.data: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        self.delivered = 0
        self.driver: Driver = self.runner.run(self._open())
        self.engine = fs.Engine(self.driver)
        self.runner.run(self.engine.open())
        self.watcher = self.engine.watch(limit=4)

    async def make_driver(self) -> Driver:
        """Return a fresh, unopened driver on an empty store."""
        raise NotImplementedError("subclass DriverStateMachine and implement make_driver")

    async def _open(self) -> Driver:
        driver = await self.make_driver()
        await driver.open()
        return driver

    def run(self, coro: Awaitable[Any]) -> Any:
        async def step() -> Any:
            before = asyncio.all_tasks()
            result = await coro
            await asyncio.sleep(0)
            leftover = {t for t in asyncio.all_tasks() - before if not t.done()}
            leftover.discard(asyncio.current_task())
            assert not leftover, f"a step left tasks running: {leftover}"
            return result

        return self.runner.run(step())

    def teardown(self) -> None:
        try:
            self.runner.run(self.watcher.aclose())
            self.runner.run(self.engine.aclose())
            self.runner.run(self.driver.aclose())
        finally:
            self.runner.close()

    # -- model ------------------------------------------------------------------------------

    @property
    def head(self) -> int:
        return self.log[-1].rev if self.log else 0

    def expected_page(self, query: fs.StatesQuery) -> tuple[list[_Version], bool]:
        def matches(v: _Version) -> bool:
            if query.id is not None and v.id != query.id:
                return False
            if query.latest_only and self.latest[v.id] != v.rev:
                return False
            sets = query.label_sets
            return not sets or any(all(v.labels.get(k) == x for k, x in m.items()) for m in sets)

        found = [v for v in self.log if v.rev > query.since_rev and matches(v)]
        if query.since_latest and found:
            found = [v for v in found if v.rev >= found[-1].rev]
        if len(found) <= query.limit:
            return found, False
        cut = query.limit
        while cut < len(found) and found[cut].rev == found[cut - 1].rev:
            cut += 1  # a page never splits a revision
        return found[:cut], cut < len(found)

    # -- rules ------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        assert self.run(self.driver.head_rev()) == 0, "make_driver must return an empty store"

    @rule(batch=writes, stale=st.sets(st.sampled_from(IDS), max_size=2))
    def commit(
        self, batch: list[tuple[str, dict[str, str], str, bytes | None]], stale: set[str]
    ) -> None:
        request = []
        wrong = []
        for state_id, labels, to, blob in batch:
            expected = self.latest.get(state_id, 0)
            if state_id in stale:
                expected = expected + 1 if expected else 1
                wrong.append(state_id)
            state = fs.State(id=state_id, labels=labels, transition=fs.Transition(to=to))
            data = {"blob": blob} if blob is not None else None
            request.append(StateWrite(state=state, expected_rev=expected, data=data))
        note(f"commit {[(w.state.id, w.expected_rev) for w in request]}")

        async def attempt() -> list[int] | fs.ConflictError:
            try:
                return (await self.driver.commit(CommitRequest(writes=request))).revs
            except fs.ConflictError as exc:
                return exc

        outcome = self.run(attempt())
        if wrong:
            assert isinstance(outcome, fs.ConflictError), "a stale commit succeeded"
            assert sorted(outcome.ids) == sorted(wrong)
            return
        assert not isinstance(outcome, fs.ConflictError), f"unexpected conflict: {outcome}"
        assert len(outcome) == len(batch)
        assert outcome == sorted(outcome)
        assert outcome[0] > self.head, "revisions must increase"
        for (state_id, labels, to, blob), rev in zip(batch, outcome, strict=True):
            self.log.append(_Version(state_id, rev, labels, to))
            self.latest[state_id] = rev
            if blob is not None:
                self.data.setdefault((state_id, "blob"), []).append((rev, blob))

    @precondition(lambda self: bool(self.log))
    @rule(index=st.integers(min_value=0), latest=st.booleans())
    def get_state(self, index: int, latest: bool) -> None:
        version = self.log[index % len(self.log)]
        rev = 0 if latest else version.rev
        got = self.run(self.driver.get_state(version.id, rev))
        want_rev = self.latest[version.id] if latest else version.rev
        want = next(v for v in self.log if v.id == version.id and v.rev == want_rev)
        assert (got.id, got.rev, got.labels, got.transition.to) == (
            want.id,
            want.rev,
            want.labels,
            want.to,
        )

    @rule(state_id=st.sampled_from(IDS), percent=st.integers(min_value=0, max_value=100))
    def get_data(self, state_id: str, percent: int) -> None:
        rev = percent * self.head // 100  # 0 reads the latest data
        versions = self.data.get((state_id, "blob"), [])
        visible = [v for v in versions if not rev or v[0] <= rev]

        async def read() -> tuple[int, bytes] | None:
            try:
                return await self.driver.get_data(state_id, "blob", rev)
            except fs.NotFoundError:
                return None

        assert self.run(read()) == (visible[-1] if visible else None)

    @rule(
        state_id=st.none() | st.sampled_from(IDS),
        labels=st.one_of(label_maps, or_label_maps),
        percent=st.integers(min_value=0, max_value=100),
        since_latest=st.booleans(),
        latest_only=st.booleans(),
        limit=st.integers(min_value=1, max_value=6),
    )
    def query(
        self,
        state_id: str | None,
        labels: dict[str, str] | list[dict[str, str]],
        percent: int,
        since_latest: bool,
        latest_only: bool,
        limit: int,
    ) -> None:
        query = fs.StatesQuery(
            id=state_id,
            labels=labels,
            since_rev=percent * self.head // 100,
            since_latest=since_latest,
            latest_only=latest_only,
            limit=limit,
        )
        page = self.run(self.driver.get_states(query))
        want, more = self.expected_page(query)
        assert [(s.id, s.rev) for s in page.states] == [(v.id, v.rev) for v in want], query
        assert page.more == more, query
        assert page.head_rev == self.head

    @rule()
    def watch(self) -> None:
        pending = self.log[self.delivered :]

        async def drain() -> list[fs.State]:
            async with asyncio.timeout(30):
                return [await anext(self.watcher) for _ in pending]

        got = self.run(drain())
        assert [(s.id, s.rev) for s in got] == [(v.id, v.rev) for v in pending]
        self.delivered = len(self.log)

    @invariant()
    def head_matches(self) -> None:
        assert self.run(self.driver.head_rev()) == self.head


def run_driver_machine(make_driver: DriverFactory, *, settings_: settings | None = None) -> None:
    """Run :class:`DriverStateMachine` against the drivers ``make_driver`` returns.

    Args:
        make_driver: Returns (or returns an awaitable of) a fresh, unopened driver on an empty
            store; called once per hypothesis example.
        settings_: Hypothesis settings; by default 100 examples of up to 30 steps, no deadline.
    """

    class Machine(DriverStateMachine):
        async def make_driver(self) -> Driver:
            driver = make_driver()
            return await driver if isinstance(driver, Awaitable) else driver

    chosen = settings_ or settings(max_examples=100, stateful_step_count=30, deadline=None)
    run_state_machine_as_test(Machine, settings=chosen)
