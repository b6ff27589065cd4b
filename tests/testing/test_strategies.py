"""The strategies make objects the engine and the memory driver accept, and conflicts conflict."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate.drivers.base import CommitRequest
from flowstate.drivers.faulty import Fault, FaultSchedule
from flowstate.drivers.memory import MemoryDriver
from flowstate.testing import strategies as fst

pytestmark = pytest.mark.anyio

# Each example opens a fresh in-memory store: cheap, so many examples fit in a second.
quick = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


STATUSES: list[fs.Status] = ["running", "paused", "ended"]


def _plain(mapping: dict[str, str]) -> bool:
    return all(type(k) is str and type(v) is str for k, v in mapping.items())


@quick
@given(
    state_id=fst.state_ids(),
    flow_id=fst.flow_ids(),
    labels=fst.labels(),
    annotations=fst.annotations(),
)
def test_names_and_maps_are_valid(
    state_id: str, flow_id: str, labels: dict[str, str], annotations: dict[str, str]
) -> None:
    assert state_id
    assert flow_id
    assert not state_id.startswith(fst.RESERVED_PREFIX)
    assert not flow_id.startswith(fst.RESERVED_PREFIX)
    assert _plain(labels)
    assert _plain(annotations)
    assert all(key and not key.startswith(fst.RESERVED_PREFIX) for key in annotations)


@pytest.mark.slow
@quick
@given(data=st.data())
def test_transitions_have_the_status_asked_for(data: st.DataObject) -> None:
    statuses = data.draw(st.sets(st.sampled_from(STATUSES), min_size=1))
    transition = data.draw(fst.transitions(to="work", statuses=sorted(statuses)))
    status = fs.State(id="s", transition=transition).status
    assert status in statuses
    if status != "ended":
        assert transition.to == "work"


def test_transitions_need_statuses() -> None:
    with pytest.raises(ValueError, match="statuses"):
        fst.transitions(statuses=[])
    with pytest.raises(ValueError, match="statuses"):
        fst.transitions(statuses=["sleeping"])  # type: ignore[list-item]


@pytest.mark.slow
@quick
@given(ctx=fst.state_ctxs())
async def test_state_ctxs_commit_as_they_are(ctx: fs.StateCtx) -> None:
    status = ctx.current.status
    async with fs.Engine(MemoryDriver()) as engine:
        await engine.do(fs.Commit(fs.Noop(ctx)))
        stored = (await engine.get_state(ctx.id)).committed
    assert stored.status == status
    assert (stored.labels, stored.annotations) == (ctx.current.labels, ctx.current.annotations)
    assert stored.transition == ctx.current.transition


@pytest.mark.slow
@quick
@given(request=fst.commit_requests(delays=True))
async def test_a_new_store_takes_any_commit(request: CommitRequest) -> None:
    ids = [w.state.id for w in request.writes]
    assert len(set(ids)) == len(ids) >= 1
    async with MemoryDriver() as driver:
        result = await driver.commit(request)
        assert len(result.revs) == len(request.writes)
        for write, rev in zip(request.writes, result.revs, strict=True):
            stored = await driver.get_state(write.state.id)
            assert stored.rev == rev
            assert stored.labels == write.state.labels
            assert stored.annotations == write.state.annotations
            assert stored.transition == write.state.transition
            for alias, blob in (write.data or {}).items():
                assert await driver.get_data(write.state.id, alias) == (rev, blob)
        delays = (await driver.get_delays()).delays
        assert len(delays) == sum(w.delay_at is not None for w in request.writes)


def _revs_after(first: CommitRequest) -> dict[str, int]:
    """The latest revisions a fresh memory store holds after committing ``first``."""
    return {write.state.id: rev for rev, write in enumerate(first.writes, start=1)}


# Draws that depend on other draws go through flatmap: a data.draw() inside an async test
# would run in the event loop, where hypothesis cannot stop an example that runs out of data.
stale_and_fresh = fst.commit_requests(min_writes=2).flatmap(
    lambda first: st.tuples(
        st.just(first),
        fst.commit_requests(latest=_revs_after(first), conflicting=True),
        fst.commit_requests(latest=_revs_after(first)),
    )
)


@pytest.mark.slow
@quick
@given(requests=stale_and_fresh)
async def test_conflicting_commits_conflict_and_others_do_not(
    requests: tuple[CommitRequest, CommitRequest, CommitRequest],
) -> None:
    first, stale, fresh = requests
    async with MemoryDriver() as driver:
        revs = (await driver.commit(first)).revs
        latest = _revs_after(first)
        assert latest == {w.state.id: rev for w, rev in zip(first.writes, revs, strict=True)}
        head = await driver.head_rev()

        expected = fst.expected_conflicts(stale, latest)
        assert expected
        with pytest.raises(fs.ConflictError) as info:
            await driver.commit(stale)
        assert info.value.ids == expected
        assert await driver.head_rev() == head, "a conflicting commit writes nothing"

        assert fst.expected_conflicts(fresh, latest) == []
        await driver.commit(fresh)


@pytest.mark.slow
@quick
@given(request=fst.commit_requests(conflicting=None))
async def test_either_way_the_driver_agrees_with_expected_conflicts(
    request: CommitRequest,
) -> None:
    async with MemoryDriver() as driver:
        expected = fst.expected_conflicts(request, {})
        if expected:
            with pytest.raises(fs.ConflictError) as info:
                await driver.commit(request)
            assert info.value.ids == expected
        else:
            await driver.commit(request)


@pytest.mark.slow
@quick
@given(request=fst.commit_requests(max_writes=6), query=fst.queries(max_rev=8))
async def test_queries_are_valid_and_answered(
    request: CommitRequest, query: fs.StatesQuery
) -> None:
    async with MemoryDriver() as driver:
        await driver.commit(request)
        page = await driver.get_states(query)
    revs = [state.rev for state in page.states]
    assert revs == sorted(revs)
    assert all(rev > query.since_rev for rev in revs) or query.since_latest
    assert all(query.matches_labels(state) for state in page.states)


@quick
@given(
    schedule=fst.fault_schedules([Fault.CRASH_AFTER, Fault.FAIL], max_faults=2, horizon=5, rate=0.5)
)
def test_fault_schedules_respect_their_bounds(schedule: FaultSchedule) -> None:
    assert len(schedule) <= 2
    assert all(1 <= n <= 5 for n in schedule)
    assert set(schedule.values()) <= {Fault.CRASH_AFTER, Fault.FAIL}


@given(schedule=fst.fault_schedules(max_faults=0))
def test_no_faults(schedule: FaultSchedule) -> None:
    assert schedule == {}


def test_fault_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="kinds"):
        fst.fault_schedules([])
    with pytest.raises(ValueError, match="max_faults"):
        fst.fault_schedules(rate=0)
    with pytest.raises(ValueError, match="min_writes"):
        fst.commit_requests(min_writes=0)


@pytest.mark.slow
def test_flowstate_does_not_import_the_test_kit() -> None:
    import subprocess
    import sys

    code = (
        "import sys, flowstate, flowstate.drivers.faulty, flowstate.recovery\n"
        "assert 'hypothesis' not in sys.modules and 'pytest' not in sys.modules\n"
        "assert not [m for m in sys.modules if m.startswith('flowstate.testing')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
