"""Hypothesis strategies for flowstate's objects, for use in your own tests.

Every strategy generates objects the engine and every driver must accept: non-empty ids,
str-to-str labels and annotations, well-formed transitions, new states (``rev == 0``) and
commit requests with distinct ids. Ids, flow ids and annotation keys never start with
``flowstate.``, the prefix flowstate reserves for its own states and markers.

For example, a property of your own driver::

    from hypothesis import given
    from flowstate.testing import strategies as fst

    @given(request=fst.commit_requests())
    async def test_a_new_store_takes_any_commit(request):
        async with MyDriver() as driver:
            result = await driver.commit(request)
        assert len(result.revs) == len(request.writes)

Conflicting commits are drawn against the revisions the store holds; draw them together
with what puts the store in that state (``flatmap``), since the anyio plugin cannot run
``data.draw()`` inside an async test::

    latest = {"a": 1, "b": 2}  # after committing a, then b, to a new store
    @given(request=fst.commit_requests(latest=latest, conflicting=True))
    async def test_stale_commits_conflict(request):
        ...  # commit a and b, then:
        with pytest.raises(ConflictError) as info:
            await driver.commit(request)
        assert info.value.ids == fst.expected_conflicts(request, latest)
"""

import datetime
from collections.abc import Collection, Mapping, Sequence

from hypothesis import strategies as st

from flowstate._checks import RESERVED_PREFIX as _RESERVED_PREFIX
from flowstate._query import StatesQuery
from flowstate._state import (
    DELAY_AT_ANNOTATION,
    DELAY_TO_ANNOTATION,
    PAUSED_ANNOTATION,
    State,
    StateCtx,
    Status,
    Transition,
)
from flowstate.drivers.base import CommitRequest, StateWrite
from flowstate.drivers.faulty import Fault, FaultSchedule

__all__ = [
    "RESERVED_PREFIX",
    "annotations",
    "commit_requests",
    "expected_conflicts",
    "fault_schedules",
    "flow_ids",
    "label_keys",
    "label_values",
    "labels",
    "queries",
    "state_ctxs",
    "state_ids",
    "state_writes",
    "states",
    "transitions",
]

#: Ids, flow ids and annotation keys with this prefix belong to flowstate itself.
RESERVED_PREFIX = _RESERVED_PREFIX

# Every character a store must keep, and none that cannot be encoded (lone surrogates) or
# that terminals and logs mangle (control characters).
_CHARACTERS = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))

_UTC = datetime.UTC
_TIMES = st.datetimes(
    min_value=datetime.datetime(2000, 1, 1),
    max_value=datetime.datetime(2100, 1, 1),
    timezones=st.just(_UTC),
)


def _text(min_size: int = 0, max_size: int = 10) -> st.SearchStrategy[str]:
    return st.text(_CHARACTERS, min_size=min_size, max_size=max_size)


def _unreserved(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return strategy.filter(lambda value: not value.startswith(RESERVED_PREFIX))


def _strategy(value: str | st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.just(value) if isinstance(value, str) else value


def state_ids() -> st.SearchStrategy[str]:
    """Non-empty state ids: short words first, then any Unicode text."""
    return _unreserved(st.sampled_from(("a", "b", "order-1", "job")) | _text(min_size=1))


def flow_ids() -> st.SearchStrategy[str]:
    """Non-empty flow ids (what ``Transit(ctx, to)`` names)."""
    return _unreserved(st.sampled_from(("start", "work", "done")) | _text(min_size=1))


def label_keys() -> st.SearchStrategy[str]:
    """Label keys: a few common ones (so queries match), then any non-empty text."""
    return _unreserved(st.sampled_from(("kind", "team", "region")) | _text(min_size=1))


def label_values() -> st.SearchStrategy[str]:
    """Label values: a few common ones (so queries match), then any text, even empty."""
    return st.sampled_from(("x", "y")) | _text()


def labels(
    *,
    keys: st.SearchStrategy[str] | None = None,
    values: st.SearchStrategy[str] | None = None,
    max_size: int = 3,
) -> st.SearchStrategy[dict[str, str]]:
    """Label maps, from :func:`label_keys` to :func:`label_values` unless given."""
    return st.dictionaries(
        keys if keys is not None else label_keys(),
        values if values is not None else label_values(),
        max_size=max_size,
    )


def annotations(*, max_size: int = 3) -> st.SearchStrategy[dict[str, str]]:
    """Annotation maps: non-empty, unreserved keys to any text."""
    return st.dictionaries(_unreserved(_text(min_size=1)), _text(max_size=20), max_size=max_size)


def transitions(
    *,
    to: str | st.SearchStrategy[str] | None = None,
    statuses: Collection[Status] = ("running", "paused", "ended"),
    annotations: st.SearchStrategy[dict[str, str]] | None = None,
) -> st.SearchStrategy[Transition]:
    """Transitions whose status is one of ``statuses``.

    Args:
        to: The flow running and paused transitions name (default: :func:`flow_ids`).
        statuses: Which of ``running``, ``paused`` and ``ended`` to generate.
        annotations: Transition annotations (default: small maps); ended transitions have
            none, as ``End`` writes them.

    Raises:
        ValueError: ``statuses`` is empty or names something else.
    """
    chosen = sorted(set(statuses))
    if not chosen or not set(chosen) <= {"running", "paused", "ended"}:
        raise ValueError(f"statuses must be some of running, paused, ended; not {statuses!r}")
    flows = flow_ids() if to is None else _strategy(to)
    extra = annotations if annotations is not None else _annotations_strategy(max_size=2)

    @st.composite
    def build(draw: st.DrawFn) -> Transition:
        status = draw(st.sampled_from(chosen))
        if status == "ended":
            return Transition()
        marks = draw(extra)
        if status == "paused":
            marks[PAUSED_ANNOTATION] = "true"
        return Transition(to=draw(flows), annotations=marks)

    return build()


# ``transitions`` takes an ``annotations`` argument that shadows the function of that name.
_annotations_strategy = annotations


def states(
    *,
    ids: st.SearchStrategy[str] | None = None,
    labels: st.SearchStrategy[dict[str, str]] | None = None,
    annotations: st.SearchStrategy[dict[str, str]] | None = None,
    transitions: st.SearchStrategy[Transition] | None = None,
) -> st.SearchStrategy[State]:
    """New state versions (``rev == 0``, not committed), ready to be written."""
    id_ = ids if ids is not None else state_ids()
    labels_ = labels if labels is not None else _labels_strategy()
    annotations_ = annotations if annotations is not None else _annotations_strategy()
    transitions_ = transitions if transitions is not None else _transitions_strategy()

    @st.composite
    def build(draw: st.DrawFn) -> State:
        return State(
            id=draw(id_),
            labels=draw(labels_),
            annotations=draw(annotations_),
            transition=draw(transitions_),
        )

    return build()


_labels_strategy = labels
_transitions_strategy = transitions


def state_ctxs(
    *,
    ids: st.SearchStrategy[str] | None = None,
    labels: st.SearchStrategy[dict[str, str]] | None = None,
    annotations: st.SearchStrategy[dict[str, str]] | None = None,
    transitions: st.SearchStrategy[Transition] | None = None,
    to: str | st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[StateCtx]:
    """Contexts of states that do not exist yet, as ``StateCtx.new`` makes them, with the
    drawn transition set on ``current``: commit them with ``Commit(Noop(ctx))``.

    Args:
        ids: The state ids (default: :func:`state_ids`).
        labels: The labels (default: :func:`labels`).
        annotations: The annotations (default: :func:`annotations`).
        transitions: The transitions (default: :func:`transitions`).
        to: Instead of ``transitions``: the flow each state is running at, as initial
            states for ``flowstate.testing.flows.explore`` are:
            ``state_ctxs(to="reserve")``.

    Raises:
        ValueError: Both ``transitions`` and ``to`` are given.
    """
    if to is not None:
        if transitions is not None:
            raise ValueError("give transitions= or to=, not both")
        transitions = _transitions_strategy(to=to, statuses=["running"])

    @st.composite
    def build(draw: st.DrawFn) -> StateCtx:
        state = draw(
            states(ids=ids, labels=labels, annotations=annotations, transitions=transitions)
        )
        ctx = StateCtx.new(state.id, labels=state.labels, annotations=state.annotations)
        ctx.current.transition = state.transition
        return ctx

    return build()


def _wrong_rev(expected: int) -> st.SearchStrategy[int]:
    """A revision that is not ``expected``: the neighbours first, then any."""
    near = [rev for rev in (expected - 1, expected + 1, 0) if rev >= 0 and rev != expected]
    # Revisions are 64-bit in every store.
    anywhere = st.integers(min_value=0, max_value=2**63 - 1).filter(lambda rev: rev != expected)
    return st.sampled_from(near) | anywhere


def state_writes(
    *,
    latest: Mapping[str, int] | None = None,
    states: st.SearchStrategy[State] | None = None,
    conflicting: bool | None = False,
    data: bool = True,
    delays: bool = False,
) -> st.SearchStrategy[StateWrite]:
    """One state's write in a commit, based on the store's latest revisions.

    Args:
        latest: Each existing state's latest revision. A write updates one of them (with
            its revision as ``expected_rev``) or creates a new state (``expected_rev=0``).
        states: The versions to write (default: :func:`states`); their ids are replaced by
            an id from ``latest`` when the write updates a state.
        conflicting: True: ``expected_rev`` is wrong, so the commit must conflict; False:
            it is right; None: either.
        data: Sometimes attach data blobs.
        delays: Sometimes attach a delay (the write is then running or paused, and
            carries the delay markers the engine writes).
    """
    known = dict(latest or {})
    versions = states if states is not None else _states_strategy()

    @st.composite
    def build(draw: st.DrawFn) -> StateWrite:
        # A copy: the strategy may hand out one object more than once (st.just).
        state = draw(versions).copy()
        if len(known) > 0 and draw(st.booleans()):
            state.id = draw(st.sampled_from(sorted(known)))
        elif state.id in known:
            # The version was meant to create a state; give it an id not used yet.
            state.id = draw(state_ids().filter(lambda i: i not in known))
        expected = known.get(state.id, 0)
        wrong = conflicting if conflicting is not None else draw(st.booleans())
        if wrong:
            expected = draw(_wrong_rev(expected))
        blobs = None
        if data and draw(st.booleans()):
            blobs = draw(
                st.dictionaries(
                    _unreserved(_text(min_size=1)), st.binary(max_size=32), min_size=1, max_size=2
                )
            )
        write = StateWrite(state=state, expected_rev=expected, data=blobs)
        if delays and draw(st.booleans()):
            to = draw(flow_ids())
            at = draw(_TIMES)
            if not state.transition.to:
                state.transition = Transition(to=to)
            state.transition.annotations[DELAY_AT_ANNOTATION] = at.isoformat()
            state.transition.annotations[DELAY_TO_ANNOTATION] = to
            write.delay_to = to
            write.delay_at = at
        return write

    return build()


_states_strategy = states


def commit_requests(
    *,
    latest: Mapping[str, int] | None = None,
    states: st.SearchStrategy[State] | None = None,
    min_writes: int = 1,
    max_writes: int = 4,
    conflicting: bool | None = False,
    data: bool = True,
    delays: bool = False,
) -> st.SearchStrategy[CommitRequest]:
    """Commit requests: writes of distinct states (see :func:`state_writes`).

    Args:
        latest: Each existing state's latest revision.
        states: The versions to write (default: :func:`states`).
        min_writes: At least this many writes (at least 1).
        max_writes: At most this many writes.
        conflicting: True: at least one write has a wrong ``expected_rev``, so the commit
            must fail with ``ConflictError`` naming :func:`expected_conflicts`; False: none
            has, so it must succeed; None: either.
        data: Sometimes attach data blobs.
        delays: Sometimes attach delays.

    Raises:
        ValueError: ``min_writes`` is below 1 or above ``max_writes``.
    """
    if min_writes < 1 or max_writes < min_writes:
        raise ValueError(f"need 1 <= min_writes <= max_writes, not {min_writes}, {max_writes}")

    def writes(wrong: bool | None) -> st.SearchStrategy[StateWrite]:
        return state_writes(
            latest=latest, states=states, conflicting=wrong, data=data, delays=delays
        )

    @st.composite
    def build(draw: st.DrawFn) -> CommitRequest:
        others = draw(
            st.lists(
                writes(None if conflicting is not False else False),
                min_size=min_writes - 1 if conflicting else min_writes,
                max_size=max_writes - 1 if conflicting else max_writes,
                unique_by=lambda w: w.state.id,
            )
        )
        if conflicting:
            taken = {w.state.id for w in others}
            stale = draw(writes(True).filter(lambda w: w.state.id not in taken))
            others.insert(draw(st.integers(0, len(others))), stale)
        return CommitRequest(writes=others)

    return build()


def expected_conflicts(request: CommitRequest, latest: Mapping[str, int]) -> list[str]:
    """The ids a driver holding ``latest`` must name when it rejects ``request``, in
    request order (empty when the commit must succeed)."""
    return [w.state.id for w in request.writes if latest.get(w.state.id, 0) != w.expected_rev]


def queries(
    *,
    labels: st.SearchStrategy[dict[str, str]] | None = None,
    max_rev: int = 20,
    max_limit: int = 10,
    since_time: bool = True,
) -> st.SearchStrategy[StatesQuery]:
    """Valid query filters: one label map or a list of them (OR), any ``since_rev`` up to
    ``max_rev``, ``since_latest``, ``latest_only``, a page ``limit`` and (unless
    ``since_time`` is False) a timezone-aware ``since_time``."""
    maps = labels if labels is not None else _labels_strategy(max_size=2)
    times: st.SearchStrategy[datetime.datetime | None] = (
        st.none() | _TIMES if since_time else st.none()
    )
    label_filters: st.SearchStrategy[dict[str, str] | list[dict[str, str]]] = maps | st.lists(
        maps, min_size=1, max_size=3
    )

    # Built by hand: re-exported as flowstate.StatesQuery, the class's annotations no longer
    # resolve, so st.builds cannot inspect it.
    @st.composite
    def build(draw: st.DrawFn) -> StatesQuery:
        return StatesQuery(
            labels=draw(label_filters),
            since_rev=draw(st.integers(0, max_rev)),
            since_latest=draw(st.booleans()),
            since_time=draw(times),
            latest_only=draw(st.booleans()),
            limit=draw(st.integers(1, max_limit)),
        )

    return build()


def fault_schedules(
    kinds: Sequence[Fault] = tuple(Fault),
    *,
    max_faults: int = 2,
    horizon: int = 8,
    rate: float = 0.25,
) -> st.SearchStrategy[FaultSchedule]:
    """Fault schedules: which of the first ``horizon`` commits fail, and how.

    Each commit fails with probability about ``rate``, in one of the ways in ``kinds``;
    only the first ``max_faults`` faults are kept. Hypothesis shrinks a schedule towards
    fewer faults, and each fault towards the simpler kinds (the order of :class:`Fault`).

    Raises:
        ValueError: ``kinds`` is empty while faults are wanted, or a number is out of range.
    """
    chosen = tuple(Fault(kind) for kind in dict.fromkeys(kinds))
    if max_faults < 0 or horizon < 1 or not 0 < rate <= 1:
        raise ValueError("need max_faults >= 0, horizon >= 1 and 0 < rate <= 1")
    if not max_faults:
        return st.just(FaultSchedule())
    if not chosen:
        raise ValueError("kinds is empty; pass max_faults=0 for no faults")
    # One decision per commit, "no fault" first (hypothesis shrinks each choice towards the
    # first option), repeated to give every commit the wanted chance of failing.
    blanks = max(0, round(len(chosen) * (1 - rate) / rate))
    decision = st.sampled_from((None,) * blanks + chosen)

    def keep_first(tape: list[Fault | None]) -> FaultSchedule:
        picked = [(n, fault) for n, fault in enumerate(tape, start=1) if fault is not None]
        return FaultSchedule(picked[:max_faults])

    return st.lists(decision, min_size=horizon, max_size=horizon).map(keep_first)
