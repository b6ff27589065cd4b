"""Bad input gets a flowstate error and loses nothing: arbitrary text (lone surrogates
included), integers of any size and other odd values thrown at every public entry point.

Each example runs a few calls against a fresh store; every call may succeed or raise a
``FlowstateError``, and nothing else may escape (no UnicodeEncodeError, OverflowError,
TypeError, sqlite3 or grpc error).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate._checks import is_text, is_text_map
from flowstate._state import internal_ctx
from tests import etcd_server, postgres_server
from tests.etcd_server import etcd_url

__all__ = ["etcd_url"]

pytestmark = pytest.mark.anyio

# Text a store may be handed: any character, lone surrogates (which no UTF-8 encoder takes)
# and the reserved prefix included.
TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=8) | st.sampled_from(
    ["", "a", "\ud800", "x\udcff", "flowstate.x", "flowstate.", "a/b", "~", "%2F", "\0"]
)
INTS = st.integers() | st.sampled_from([-1, 0, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63)])
TIMES = st.datetimes(timezones=st.none() | st.timezones()) | st.sampled_from(
    [
        datetime.datetime.max.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=-23))),
        datetime.datetime.min.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=23))),
    ]
)
SCALARS = TEXT | INTS | st.none() | st.booleans() | st.floats() | st.binary(max_size=4)
MAPPINGS = st.dictionaries(TEXT | INTS, TEXT | INTS | st.none(), max_size=3)
LABELS = SCALARS | MAPPINGS | st.lists(MAPPINGS, max_size=2)
ANY = SCALARS | MAPPINGS | TIMES | st.lists(MAPPINGS, max_size=2)
FILTERS = st.dictionaries(
    st.sampled_from(["labels", "since_rev", "since_latest", "since_time", "latest_only", "limit"]),
    ANY | LABELS,
    max_size=4,
)

Call = Callable[[fs.Engine, list[fs.StateCtx]], Awaitable[object]]


def _ctx(ctxs: list[fs.StateCtx], index: int) -> fs.StateCtx:
    return ctxs[index % len(ctxs)]


def new_state(state_id: Any, labels: Any, annotations: Any, to: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> None:
        ctx = fs.StateCtx.new(state_id, labels=labels, annotations=annotations)
        await engine.do(fs.Commit(fs.Transit(ctx, to)))
        ctxs.append(ctx)

    return call


def transit(index: int, to: Any, annotations: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> None:
        await engine.do(fs.Commit(fs.Transit(_ctx(ctxs, index), to, annotations=annotations)))

    return call


def pause(index: int, to: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> None:
        await engine.do(fs.Commit(fs.Pause(_ctx(ctxs, index), to)))

    return call


def delay(index: int, to: Any, seconds: Any, until: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> None:
        ctx = _ctx(ctxs, index)
        await engine.do(fs.Delay(ctx, to, seconds=seconds, until=until))

    return call


def edit(index: int, where: str, key: Any, value: Any) -> Call:
    """Change the working copy directly, as flows do, then commit it."""

    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> None:
        ctx = _ctx(ctxs, index)
        mapping = {
            "labels": ctx.current.labels,
            "annotations": ctx.current.annotations,
            "transition": ctx.current.transition.annotations,
        }[where]
        mapping[key] = value
        try:
            await engine.do(fs.Commit(fs.Noop(ctx)))
        finally:
            mapping.pop(key, None)

    return call


def stack(index: int, key: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> None:
        carrier = _ctx(ctxs, index)
        await engine.do(fs.Commit(fs.Stack(carrier, _ctx(ctxs, index + 1), key)))
        await engine.do(fs.Commit(fs.Unstack(carrier, fs.StateCtx.new("into"), key)))

    return call


def data(index: int, alias: Any, blob: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> None:
        ctx = _ctx(ctxs, index)
        ctx.data["d"] = fs.Data(blob=blob)
        await engine.do(fs.Commit(fs.StoreData(ctx, alias)))
        await engine.do(fs.GetData(ctx, alias))

    return call


def get_state(state_id: Any, rev: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> object:
        return await engine.get_state(state_id, rev)

    return call


def find_state(labels: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> object:
        return await engine.find_state(labels)

    return call


def get_states(filters: dict[str, Any]) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> object:
        return await engine.get_states(**filters)

    return call


def iter_states(filters: dict[str, Any]) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> object:
        return [state async for state in engine.iter_states(**filters)]

    return call


def watch(filters: dict[str, Any], unavailable_timeout: Any) -> Call:
    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> object:
        async with engine.watch(**filters, unavailable_timeout=unavailable_timeout) as watcher:
            try:
                async with asyncio.timeout(0.05):
                    return await anext(watcher)
            except TimeoutError:
                return None  # nothing matched: the watcher waits, as it should

    return call


def open_url(scheme: str, rest: Any) -> Call:
    """Parse a driver URL (and open it when that touches nothing outside the test)."""

    async def call(engine: fs.Engine, ctxs: list[fs.StateCtx]) -> None:
        driver = fs.open_driver(scheme + rest if isinstance(rest, str) else rest)
        if scheme in ("memory://", "sqlite://:memory:"):
            async with driver:
                await driver.head_rev()

    return call


CALLS = st.one_of(
    st.builds(new_state, TEXT | INTS, LABELS, LABELS, TEXT | INTS),
    st.builds(transit, st.integers(0, 3), TEXT | INTS, LABELS),
    st.builds(pause, st.integers(0, 3), TEXT | INTS | st.none()),
    st.builds(delay, st.integers(0, 3), TEXT, st.none() | INTS | st.floats(), st.none() | TIMES),
    st.builds(
        edit,
        st.integers(0, 3),
        st.sampled_from(["labels", "annotations", "transition"]),
        TEXT | INTS,
        TEXT | INTS,
    ),
    st.builds(stack, st.integers(0, 3), TEXT | INTS),
    st.builds(data, st.integers(0, 3), TEXT | INTS, SCALARS),
    st.builds(get_state, TEXT | INTS, INTS | TEXT),
    st.builds(find_state, LABELS),
    st.builds(get_states, FILTERS),
    st.builds(iter_states, FILTERS),
    st.builds(watch, FILTERS, st.none() | INTS | st.floats()),
    st.builds(
        open_url,
        st.sampled_from(["memory://", "sqlite://:memory:", "sqlite:///", "etcd://", "", "x://"]),
        TEXT | INTS,
    ),
)


async def _run(engine: fs.Engine, calls: list[Call]) -> None:
    ctxs = [fs.StateCtx.new("first", labels={"k": "v"}), fs.StateCtx.new("second")]
    for ctx in ctxs:
        await engine.do(fs.Commit(fs.Transit(ctx, "start")))
    for call in calls:
        try:
            await call(engine, ctxs)
        except fs.FlowstateError:
            pass  # a clear refusal; anything else escapes and fails the example
    # Nothing half-written: every stored version still reads back.
    async for state in engine.iter_states(limit=100):
        assert state.rev > 0


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("etcd", marks=pytest.mark.etcd),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def new_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], fs.Engine]:
    """A factory of engines, each on a fresh store."""
    counter = itertools.count()
    if request.param == "memory":
        return lambda: fs.Engine("memory://")
    if request.param == "sqlite":
        return lambda: fs.Engine(f"sqlite:///{tmp_path}/store-{next(counter)}.db")
    if request.param == "etcd":
        base = request.getfixturevalue("etcd_url")
        return lambda: fs.Engine(etcd_server.unique_url(base))
    base = request.getfixturevalue("postgres_url")
    return lambda: fs.Engine(postgres_server.unique_url(base))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=st.lists(CALLS, min_size=1, max_size=5))
async def test_only_flowstate_errors_escape(
    new_engine: Callable[[], fs.Engine], calls: list[Call]
) -> None:
    async with new_engine() as engine:
        await _run(engine, calls)


@pytest.mark.parametrize(
    "call",
    [
        lambda: fs.StateCtx.new("flowstate.mine"),
        lambda: fs.StateCtx.new("flowstate."),
        lambda: fs.StateCtx.new("\ud800"),
        lambda: fs.StateCtx.new("a", labels={"k": "\udcff"}),
        lambda: fs.StateCtx.new("a", annotations={"\ud800": "v"}),
        lambda: fs.StateCtx.new("a", labels=["k", "v"]),  # type: ignore[arg-type]
        lambda: fs.Transit(fs.StateCtx.new("a"), "to\ud800"),
        lambda: fs.Transit(fs.StateCtx.new("a"), "to", annotations={"k": 1}),  # type: ignore[dict-item]
        lambda: fs.Delay(fs.StateCtx.new("a"), "to", seconds=1e300),
        lambda: fs.StoreData(fs.StateCtx.new("a"), "\ud800"),
    ],
)
def test_bad_commands_are_refused_when_made(call: Callable[[], object]) -> None:
    with pytest.raises(fs.InvalidCommandError):
        call()


class _Text(str):
    """A str subclass: not text a store keeps as it is (drivers are handed plain str)."""


@given(
    st.dictionaries(
        TEXT | INTS | st.builds(_Text, TEXT), TEXT | INTS | st.none() | st.builds(_Text, TEXT)
    )
)
def test_a_mapping_is_text_when_every_key_and_value_is(mapping: dict[object, object]) -> None:
    # The mapping-wide check, which every commit runs on its labels and annotations, answers
    # as checking each key and value would.
    assert is_text_map(mapping) == all(is_text(k) and is_text(v) for k, v in mapping.items())


def test_only_flowstate_itself_makes_reserved_states() -> None:
    ctx = internal_ctx("flowstate.recovery.test", labels={"flowstate.internal": "recovery"})
    assert ctx.id == "flowstate.recovery.test"
    with pytest.raises(fs.InvalidCommandError, match="not a flowstate-internal"):
        internal_ctx("mine", labels={})


@pytest.fixture
async def engine() -> AsyncIterator[fs.Engine]:
    async with fs.Engine("memory://") as engine:
        yield engine


@pytest.mark.parametrize(
    ("name", "args", "kwargs"),
    [
        ("find_state", (None,), {}),
        ("find_state", ({"k": "\ud800"},), {}),
        ("get_state", ("\ud800",), {}),
        ("get_state", ("a", 2**63), {}),
        ("get_states", (), {"since_rev": 2**63}),
        ("get_states", (), {"labels": {"\udcff": "v"}}),
        ("get_states", (), {"limit": 2**63}),
        ("get_states", ("not a query",), {}),
        # Filters no store evaluates in one query: SQLite's compound SELECT stops at 500.
        (
            "get_states",
            (),
            {"labels": [{"k": str(n)} for n in range(fs.StatesQuery.MAX_LABEL_MAPS + 1)]},
        ),
        (
            "get_states",
            (),
            {"labels": {str(n): "v" for n in range(fs.StatesQuery.MAX_LABEL_PAIRS + 1)}},
        ),
    ],
)
async def test_bad_queries_are_refused(
    engine: fs.Engine, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(fs.InvalidQueryError):
        await getattr(engine, name)(*args, **kwargs)


def _broken(part: str) -> fs.StateCtx:
    """A ctx one of whose parts a caller set to None."""
    ctx = fs.StateCtx.new("a")
    owner: object = ctx
    *path, name = part.split(".")
    for step in path:
        owner = getattr(owner, step)
    setattr(owner, name, None)
    return ctx


@pytest.mark.parametrize(
    "part",
    ["current", "committed", "transitions", "data", "current.transition", "current.labels"],
)
@pytest.mark.parametrize(
    "command",
    [
        lambda ctx: fs.Commit(fs.Noop(ctx)),
        lambda ctx: fs.Commit(fs.Transit(ctx, "next")),
        lambda ctx: fs.Commit(fs.Pause(ctx, "next")),
        lambda ctx: fs.Commit(fs.Resume(ctx)),
        lambda ctx: fs.Commit(fs.Transit(ctx, "next"), fs.Delay(ctx, "later", seconds=1)),
        lambda ctx: fs.Delay(ctx, "later", seconds=1),
        lambda ctx: fs.Commit(fs.Stack(ctx, fs.StateCtx.new("b"), "k")),
    ],
    ids=["noop", "transit", "pause", "resume", "commit-delay", "delay", "stack"],
)
async def test_a_ctx_with_a_broken_part_gets_an_invalid_command(
    engine: fs.Engine, part: str, command: Callable[[fs.StateCtx], fs.Command]
) -> None:
    with pytest.raises(fs.InvalidCommandError):
        await engine.do(command(_broken(part)))
    assert await engine.driver.head_rev() == 0


async def test_a_flow_that_writes_a_lone_surrogate_gets_an_invalid_command(
    engine: fs.Engine,
) -> None:
    ctx = fs.StateCtx.new("a")
    await engine.do(fs.Commit(fs.Transit(ctx, "start")))
    ctx.current.annotations["note"] = "bad \udc80 byte"
    with pytest.raises(fs.InvalidCommandError, match="valid Unicode"):
        await engine.do(fs.Commit(fs.Transit(ctx, "next")))
    assert (await engine.get_state("a")).committed.rev == ctx.committed.rev
