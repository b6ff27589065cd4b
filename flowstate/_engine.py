"""The Engine: applies commands through a driver and runs flows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

import msgspec
from attrs import define, field

from flowstate._checks import MAX_REV, describe, is_number, is_rev, is_text
from flowstate._commands import (
    Command,
    Commit,
    Delay,
    End,
    Execute,
    GetData,
    Noop,
    Pause,
    Resume,
    Stack,
    StoreData,
    Transit,
    Unstack,
)
from flowstate._lifecycle import Lifecycle
from flowstate._query import StatesPage, StatesQuery
from flowstate._state import (
    CLAIM_ANNOTATION,
    DELAY_AT_ANNOTATION,
    DELAY_TO_ANNOTATION,
    PAUSED_ANNOTATION,
    Data,
    State,
    StateCtx,
    Transition,
    check_id,
    check_shape,
    check_strings,
)
from flowstate._watcher import Signal, Watcher
from flowstate.drivers._args import check_read
from flowstate.drivers.base import CommitRequest, Driver, StateWrite, open_driver
from flowstate.errors import (
    ClosedError,
    ConflictError,
    FlowNotFoundError,
    InvalidCommandError,
    InvalidQueryError,
    InvalidURLError,
    NotFoundError,
)

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["Engine", "ExecuteResult", "Flow", "FlowRegistry"]

logger = logging.getLogger("flowstate")

Flow: TypeAlias = Callable[[StateCtx, "Engine"], Awaitable[Command]]
"""A flow: ``async def flow(ctx: StateCtx, engine: Engine) -> Command``."""

F = TypeVar("F", bound=Flow)

ExecuteStatus: TypeAlias = Literal["ended", "paused", "delayed", "noop", "conflict"]

_MUTATORS = (Transit, End, Pause, Resume, Stack, Unstack)
_MUTATOR_TYPES = frozenset(_MUTATORS)


class FlowRegistry(Mapping[str, Flow]):
    """Flows by id. Looking up an unknown id raises ``FlowNotFoundError``."""

    def __init__(self, flows: Mapping[str, Flow] | None = None) -> None:
        self._flows: dict[str, Flow] = {}
        for flow_id, fn in (flows or {}).items():
            self.register(flow_id, fn)

    def register(self, flow_id: str, fn: Flow) -> None:
        """Register ``fn`` under ``flow_id``, replacing any flow registered there.

        Raises:
            InvalidCommandError: ``flow_id`` is empty or ``fn`` is not callable.
        """
        if not flow_id or not isinstance(flow_id, str):
            raise InvalidCommandError(f"a flow id must be a non-empty string, not {flow_id!r}")
        if not callable(fn):
            raise InvalidCommandError(f"flow {flow_id!r} must be an async function, not {fn!r}")
        self._flows[flow_id] = fn

    def unregister(self, flow_id: str) -> None:
        """Remove a flow.

        Raises:
            FlowNotFoundError: Nothing is registered under ``flow_id``.
        """
        if self._flows.pop(flow_id, None) is None:
            raise FlowNotFoundError(flow_id)

    def flow(self, flow_id: str) -> Callable[[F], F]:
        """Decorator form of :meth:`register`."""

        def decorate(fn: F) -> F:
            self.register(flow_id, fn)
            return fn

        return decorate

    def get(self, flow_id: str, default: Flow | None = None) -> Flow | None:  # type: ignore[override]
        return self._flows.get(flow_id, default)

    def __getitem__(self, flow_id: str) -> Flow:
        try:
            return self._flows[flow_id]
        except KeyError:
            raise FlowNotFoundError(flow_id) from None

    def __contains__(self, flow_id: object) -> bool:
        # Mapping's own __contains__ catches KeyError only, not FlowNotFoundError.
        return flow_id in self._flows

    def __iter__(self) -> Iterator[str]:
        return iter(self._flows)

    def __len__(self) -> int:
        return len(self._flows)

    def __repr__(self) -> str:
        return f"FlowRegistry({sorted(self._flows)!r})"


@define(frozen=True)
class ExecuteResult:
    """Why ``Engine.execute`` stopped.

    Attributes:
        status: ``ended``, ``paused``, ``delayed``, ``noop`` (the flow returned ``Noop`` or a
            command that does not move the state), or ``conflict`` (a commit lost the revision
            race: someone else advanced the state; ``conflict`` holds the error).
        ctx: The context execution stopped on.
        steps: How many flows were called.
        conflict: The ``ConflictError`` when ``status == "conflict"``.
    """

    status: ExecuteStatus
    ctx: StateCtx
    steps: int
    conflict: ConflictError | None = None


@define(eq=False, init=False)
class Engine:
    """Applies commands through a driver and runs flows.

    Args:
        driver: A driver URL (``"sqlite:///flowstate.db"``) or a :class:`Driver`. A driver
            opened from a URL belongs to the engine, which closes it in :meth:`aclose`; a
            driver object passed in is opened if needed but closed by whoever created it.
        flows: The flows to run, by id (a mapping or a :class:`FlowRegistry`).

    Use it as an async context manager::

        async with Engine("memory://", flows={"hello": hello}) as engine:
            ...

    Raises:
        InvalidURLError: ``driver`` is neither a URL nor a Driver, or the URL is malformed.
        UnknownDriverError: No driver is registered for the URL's scheme.
        MissingDependencyError: The URL's driver needs an extra that is not installed.
    """

    driver: Driver = field(init=False)
    flows: FlowRegistry = field(init=False)
    _owns_driver: bool = field(init=False)
    _lifecycle: Lifecycle = field(init=False, default=Lifecycle.UNOPENED)
    _task_group: asyncio.TaskGroup | None = field(init=False, default=None)
    _tasks: set[asyncio.Task[None]] = field(init=False, factory=set)
    _closed: Signal = field(init=False, factory=Signal)

    def __init__(
        self,
        driver: str | Driver,
        *,
        flows: Mapping[str, Flow] | FlowRegistry | None = None,
    ) -> None:
        if isinstance(driver, str):
            resolved, owns = open_driver(driver), True
        elif isinstance(driver, Driver):
            resolved, owns = driver, False
        else:
            raise InvalidURLError(
                f"Engine needs a driver URL or a Driver, not {type(driver).__name__}"
            )
        registry = flows if isinstance(flows, FlowRegistry) else FlowRegistry(flows)
        self.__attrs_init__()
        self.driver = resolved
        self.flows = registry
        self._owns_driver = owns

    def __repr__(self) -> str:
        return f"Engine({self.driver!r}, flows={sorted(self.flows)!r})"

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the driver and start accepting work (``async with`` calls this).

        Raises:
            ClosedError: The engine was closed.
            DriverError: The driver could not be opened.
        """
        if self._lifecycle is Lifecycle.CLOSED:
            raise ClosedError("the engine is closed and cannot be reopened")
        if self._lifecycle is Lifecycle.OPENED:
            return
        await self.driver.open()
        task_group = asyncio.TaskGroup()
        await task_group.__aenter__()
        self._task_group = task_group
        self._lifecycle = Lifecycle.OPENED

    async def aclose(self) -> None:
        """Stop: cancel background executions, end watchers, close an owned driver.

        Background flows see ``asyncio.CancelledError`` at their next await and may clean up.
        Calling ``aclose`` again does nothing.
        """
        if self._lifecycle is Lifecycle.CLOSED:
            return
        was_open = self._lifecycle is Lifecycle.OPENED
        self._lifecycle = Lifecycle.CLOSED
        self._closed.set()
        try:
            if was_open and self._task_group is not None:
                for task in list(self._tasks):
                    task.cancel()
                await self._task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            if self._owns_driver:
                await self.driver.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._lifecycle is not Lifecycle.OPENED:
            if self._lifecycle is Lifecycle.CLOSED:
                raise ClosedError("the engine is closed")
            raise ClosedError("the engine is not open; use `async with Engine(...) as engine:`")

    @property
    def is_closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._lifecycle is Lifecycle.CLOSED

    def flow(self, flow_id: str) -> Callable[[F], F]:
        """Decorator: register the decorated async function as flow ``flow_id``."""
        return self.flows.flow(flow_id)

    # -- commands --------------------------------------------------------------------------

    async def do(self, *commands: Command) -> None:
        """Apply commands in order.

        ``Transit``, ``End``, ``Pause``, ``Resume``, ``Stack`` and ``Unstack`` change memory
        only; ``Commit`` stores atomically; ``Delay`` and ``StoreData`` outside a ``Commit``
        are committed on their own; ``GetData`` loads data; ``Execute`` runs the ctx in a
        background task owned by the engine (errors are logged); ``Noop`` does nothing.

        Raises:
            ConflictError: A commit lost the revision race; nothing of it was written.
            InvalidCommandError: A command cannot be applied as given.
            NotFoundError: ``GetData`` found no data.
            ClosedError: The engine is not open.
            DriverError: The driver failed.
        """
        self._check_open()
        for command in commands:
            await self._do_one(command)

    async def _do_one(self, command: Command) -> None:
        kind = type(command)
        if kind is Commit:
            await self._commit(command)  # type: ignore[arg-type]
        elif isinstance(command, _MUTATORS):
            command._mutate()
        elif kind is Delay or kind is StoreData:
            await self._commit(Commit(command))
        elif kind is GetData:
            await self._get_data(command)  # type: ignore[arg-type]
        elif kind is Execute:
            self._spawn(command.ctx, command.claim)  # type: ignore[attr-defined]
        elif kind is not Noop:
            raise InvalidCommandError(f"not a flowstate command: {command!r}")

    async def _get_data(self, command: GetData) -> None:
        ctx = command.ctx
        rev, blob = await self.driver.get_data(ctx.id, command.alias, ctx.committed.rev)
        ctx.data[command.alias] = Data(blob=blob, rev=rev)

    async def _commit(
        self, commit: Commit, claimed: StateCtx | None = None, claim: str = ""
    ) -> None:
        """Apply the commit's commands in memory, then store every touched state at once;
        ``claimed`` (one of them) carries the transition annotation ``claim``."""
        commands = commit.commands
        if len(commands) == 1 and type(commands[0]) in _MUTATOR_TYPES:
            # The common case, one state moved by one command: skip the bookkeeping.
            command = commands[0]
            command._mutate()  # type: ignore[attr-defined]
            ctxs = [command.ctx]  # type: ignore[attr-defined]
            if claimed is not None:
                claimed.current.transition.annotations[CLAIM_ANNOTATION] = claim
            writes = [_state_write(ctxs[0], None, None)]
        else:
            ctxs, writes = _collect(commands, claimed, claim)
            if not writes:
                return
        result = await self.driver.commit(CommitRequest(writes=writes))
        committed_at = result.committed_at
        for ctx, write, rev in zip(ctxs, writes, result.revs, strict=True):
            current = ctx.current
            if write.delay_at is not None:
                current.transition = write.state.transition
            current.rev = rev
            current.committed_at = committed_at
            ctx.committed = current.copy()
            ctx.transitions = []
            if write.data:
                for alias in write.data:
                    ctx.data[alias] = Data(blob=ctx.data[alias].blob, rev=rev)

    # -- execution -------------------------------------------------------------------------

    async def execute(self, ctx: StateCtx, *, claim: str | None = None) -> ExecuteResult:
        """Run flows on ``ctx`` until it rests.

        Looks up the flow ``ctx.current.transition.to`` names, calls it, applies the command
        it returns, and goes on while that command is ``Transit``, ``Resume`` or ``Execute``
        (alone, or as the last command for the running ctx inside a ``Commit``). ``End``,
        ``Pause``, ``Delay`` and ``Noop`` stop it. A ctx that is already ended or paused
        returns at once, with no flow called.

        ``claim``: a name (such as a process's) that every version this execution commits
        and goes on running carries as the transition annotation ``flowstate.claim``: a
        worker, which takes the running versions nobody claimed, leaves those to it.

        Returns:
            Why execution stopped. A commit that lost the revision race stops it quietly
            with status ``conflict``.

        Raises:
            FlowNotFoundError: No flow is registered under the id the state points to.
            InvalidCommandError: A flow returned something that is not a valid command.
            ClosedError: The engine is not open.
            DriverError: The driver failed.
            Exception: Whatever a flow raised, unchanged.
        """
        self._check_open()
        if not isinstance(ctx, StateCtx):
            raise InvalidCommandError(f"execute needs a StateCtx, not {type(ctx).__name__}")
        if claim is not None and (not claim or not is_text(claim)):
            raise InvalidCommandError(f"a claim must be a non-empty string, not {describe(claim)}")
        flows = self.flows
        steps = 0
        while True:
            transition = ctx.current.transition
            if not transition.to:
                return ExecuteResult("ended", ctx, steps)
            if PAUSED_ANNOTATION in transition.annotations:
                return ExecuteResult("paused", ctx, steps)
            flow = flows.get(transition.to)
            if flow is None:
                raise FlowNotFoundError(transition.to)
            command = await flow(ctx, self)
            steps += 1
            kind = type(command)
            if kind is Commit:
                last = _last_for(command, ctx)  # type: ignore[arg-type]
                claimed = ctx if claim is not None and type(last) in _GOES_ON else None
                try:
                    await self._commit(command, claimed, claim or "")  # type: ignore[arg-type]
                except ConflictError as exc:
                    return ExecuteResult("conflict", ctx, steps, exc)
                if last is None:
                    return ExecuteResult("noop", ctx, steps)
                kind = type(last)
                ctx = last.ctx  # type: ignore[attr-defined]
            elif kind is Transit or kind is Resume:
                command._mutate()  # type: ignore[attr-defined]
                ctx = command.ctx  # type: ignore[attr-defined]
            elif kind is Execute:
                ctx = command.ctx  # type: ignore[attr-defined]
            elif kind is Delay:
                try:
                    await self._commit(Commit(command))
                except ConflictError as exc:
                    return ExecuteResult("conflict", ctx, steps, exc)
            elif not isinstance(command, Command):
                raise InvalidCommandError(
                    f"flow {transition.to!r} returned {command!r}; a flow must return a Command"
                )
            else:
                await self._do_one(command)
            if kind is Transit or kind is Resume or kind is Execute:
                continue
            if kind is End:
                return ExecuteResult("ended", ctx, steps)
            if kind is Pause:
                return ExecuteResult("paused", ctx, steps)
            if kind is Delay:
                return ExecuteResult("delayed", ctx, steps)
            return ExecuteResult("noop", ctx, steps)

    def _spawn(self, ctx: StateCtx, claim: str | None = None) -> None:
        assert self._task_group is not None  # _check_open() ran
        task = self._task_group.create_task(self._execute_in_background(ctx, claim))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute_in_background(self, ctx: StateCtx, claim: str | None) -> None:
        try:
            result = await self.execute(ctx, claim=claim)
        except ClosedError:
            logger.debug("background execution of state %r stopped: engine closed", ctx.id)
        except FlowNotFoundError as exc:
            # Not a bug in a flow (whose trace would help): this engine lacks the flow.
            logger.error("background execution of state %r failed: %s", ctx.id, exc)  # noqa: TRY400
        except Exception:
            logger.exception("background execution of state %r failed", ctx.id)
        else:
            logger.debug("background execution of state %r: %s", ctx.id, result.status)

    # -- queries ---------------------------------------------------------------------------

    async def get_state(self, state_id: str, rev: int = 0) -> StateCtx:
        """Return a ctx on a state's latest version, or on its version at ``rev``.

        Raises:
            NotFoundError: No such state, or ``rev`` is not one of its versions.
            InvalidQueryError: ``state_id`` is empty or ``rev`` is negative.
        """
        self._check_open()
        check_read(state_id, rev)  # here too: a driver of another package may not check
        return StateCtx.of(await self.driver.get_state(state_id, rev))

    async def find_state(self, labels: Mapping[str, str]) -> StateCtx:
        """Return a ctx on the latest version whose labels contain every pair in ``labels``
        (of two states written by one commit, the one written last).

        Raises:
            NotFoundError: No version matches.
            InvalidQueryError: ``labels`` is not a mapping of str to str.
        """
        if not isinstance(labels, Mapping):
            raise InvalidQueryError(f"labels must be a dict of str to str, not {describe(labels)}")
        query = _query(None, {"labels": labels, "since_latest": True, "limit": 1})
        page = await self.get_states(query)
        if not page.states:
            raise NotFoundError(f"no state has labels {query.labels!r}")
        # A page never splits a revision: where one commit's states share theirs (etcd), the
        # page holds them all, in the order they were written.
        return StateCtx.of(page.states[-1])

    async def get_states(self, query: StatesQuery | None = None, **filters: Any) -> StatesPage:
        """Return one page of state versions, ascending by revision.

        Pass a :class:`StatesQuery` or its fields as keywords (``labels=``, ``since_rev=``,
        ``since_latest=``, ``since_time=``, ``latest_only=``, ``limit=``).

        Raises:
            InvalidQueryError: A filter is invalid.
        """
        self._check_open()
        return await self.driver.get_states(_query(query, filters))

    async def iter_states(
        self, query: StatesQuery | None = None, **filters: Any
    ) -> AsyncIterator[State]:
        """Iterate over every matching version, fetching page after page."""
        self._check_open()
        query = _query(query, filters)
        while True:
            page = await self.driver.get_states(query)
            for state in page.states:
                yield state
            if not page.more:
                return
            query = query.replace(since_rev=page.states[-1].rev, since_latest=False)

    def watch(
        self,
        query: StatesQuery | None = None,
        *,
        unavailable_timeout: float | None = None,
        **filters: Any,
    ) -> Watcher:
        """Stream every matching committed version, in revision order, from ``since_rev``.

        Takes the same filters as :meth:`get_states`; ``limit`` sets the fetch size.

        The watcher rides out store outages: reads that fail with ``DriverUnavailableError``
        are tried again with a capped backoff, and the stream resumes from its last revision
        with no gap and no duplicate. ``unavailable_timeout`` (seconds; default None: keep
        trying) is how long an outage may last before the watcher raises the error instead.
        Other errors are raised at once.

        Raises:
            InvalidQueryError: A filter, or ``unavailable_timeout``, is invalid.
        """
        self._check_open()
        if unavailable_timeout is not None and not is_number(unavailable_timeout):
            raise InvalidQueryError(
                "unavailable_timeout must be None or a number of seconds >= 0, "
                f"not {describe(unavailable_timeout)}"
            )
        return Watcher(
            self.driver,
            _query(query, filters),
            self._closed,
            None if unavailable_timeout is None else float(unavailable_timeout),
        )


def _collect(
    commands: tuple[Command, ...], claimed: StateCtx | None = None, claim: str = ""
) -> tuple[list[StateCtx], list[StateWrite]]:
    """Apply a commit's commands in memory; return the touched ctxs and their writes, the
    one of ``claimed`` with the transition annotation ``claim``."""
    touched: dict[str, StateCtx] = {}
    delays: dict[str, Delay] = {}
    stored_data: dict[str, dict[str, bytes]] = {}
    for command in commands:
        if isinstance(command, _MUTATORS):
            command._mutate()
            ctx = command.ctx
        elif isinstance(command, Delay):
            ctx = command.ctx
            check_shape(ctx)
            if ctx.id in delays:
                raise InvalidCommandError(f"state {ctx.id!r} has two Delays in one Commit")
            delays[ctx.id] = command
        elif isinstance(command, StoreData):
            ctx = command.ctx
            check_shape(ctx)
            alias = command.alias
            data = ctx.data.get(alias)
            if data is None:
                raise InvalidCommandError(
                    f"StoreData: state {ctx.id!r} has no data {alias!r}; "
                    f"set ctx.data[{alias!r}] = Data(blob=...) first"
                )
            given: object = data
            if not isinstance(given, Data) or not isinstance(given.blob, bytes | bytearray):
                raise InvalidCommandError(
                    f"StoreData: ctx.data[{alias!r}] of state {ctx.id!r} must be a "
                    f"Data(blob=bytes), not {describe(given)}"
                )
            if not data.rev:
                stored_data.setdefault(ctx.id, {})[alias] = data.blob
        elif isinstance(command, Noop):
            if command.ctx is None:
                continue
            ctx = command.ctx
            check_shape(ctx)
        else:
            raise InvalidCommandError(f"{type(command).__name__} cannot be inside a Commit")
        seen = touched.setdefault(ctx.id, ctx)
        if seen is not ctx:
            raise InvalidCommandError(
                f"two different StateCtx objects for state {ctx.id!r} in one Commit"
            )
    ctxs = list(touched.values())
    if claimed is not None:
        claimed.current.transition.annotations[CLAIM_ANNOTATION] = claim
    writes = [_state_write(c, stored_data.get(c.id), delays.get(c.id)) for c in ctxs]
    return ctxs, writes


def _state_write(ctx: StateCtx, data: dict[str, bytes] | None, delay: Delay | None) -> StateWrite:
    """The write that stores ctx.current, checked, with its data and delay."""
    state = ctx.current
    if ctx.committed.__class__ is not State:
        check_shape(ctx)
    if ctx.committed.id != state.id:
        raise InvalidCommandError(
            f"ctx.current.id {describe(state.id)} differs from ctx.committed.id "
            f"{describe(ctx.committed.id)}; a state's id cannot change"
        )
    check_id(state.id)
    check_strings(state)
    if not is_rev(ctx.committed.rev):
        raise InvalidCommandError(
            f"state {describe(state.id)}: ctx.committed.rev {describe(ctx.committed.rev)} "
            f"is not a revision (an int from 0 to {MAX_REV})"
        )
    if delay is None:
        return StateWrite(state=state, expected_rev=ctx.committed.rev, data=data)
    # The stored version carries the delay marker; ctx.current gets it only once committed.
    transition = state.transition
    marked = {
        **transition.annotations,
        DELAY_AT_ANNOTATION: delay.at.isoformat(),
        DELAY_TO_ANNOTATION: delay.to,
    }
    return StateWrite(
        state=msgspec.structs.replace(
            state, transition=Transition(to=transition.to, annotations=marked)
        ),
        expected_rev=ctx.committed.rev,
        data=data,
        delay_to=delay.to,
        delay_at=delay.at,
    )


def _query(query: StatesQuery | None, filters: dict[str, Any]) -> StatesQuery:
    if query is None:
        try:
            return StatesQuery(**filters)
        except TypeError as exc:
            raise InvalidQueryError(str(exc)) from None
    if filters:
        raise InvalidQueryError("pass a StatesQuery or keyword filters, not both")
    if not isinstance(query, StatesQuery):
        raise InvalidQueryError(f"expected a StatesQuery, not {describe(query)}")
    return query


def _last_for(commit: Commit, ctx: StateCtx) -> Command | None:
    """The last command in ``commit`` that moves ``ctx`` (what execution does next)."""
    for command in reversed(commit.commands):
        if getattr(command, "ctx", None) is ctx and type(command) in _MOVES:
            return command
    return None


_MOVES = frozenset({Transit, Resume, End, Pause, Delay})
#: The moves after which execution goes on with the ctx.
_GOES_ON = frozenset({Transit, Resume})
