"""Reading routes: states, a state's history and data, and the watch stream (SSE).

State ids and data aliases may hold any character: clients percent-encode them as one path
segment (``a/b`` is ``a%2Fb``); :func:`flowstate.server._app.unescape` restores them.
"""

import datetime
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from litestar import Router, get, post
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response import Stream

from flowstate import State, StatesPage, StatesQuery
from flowstate._wire import MAX_PAGE, DataVersion
from flowstate.errors import ClosedError, DriverError, InvalidQueryError
from flowstate.server._context import ServerContext, wait_for_rev
from flowstate.server._escape import unescape

__all__ = ["router"]

logger = logging.getLogger("flowstate.server")

_encode = msgspec.json.Encoder().encode

#: Versions per page of a watch stream, unless the client asks for another size.
WATCH_PAGE = 100


def _labels(pairs: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidQueryError(f"a label filter is KEY=VALUE, not {pair!r}")
        labels[key] = value
    return labels


def _query(
    labels: list[str] | None,
    since_rev: int,
    since_latest: bool,
    since_time: datetime.datetime | None,
    latest_only: bool,
    limit: int,
    state_id: str | None = None,
) -> StatesQuery:
    return StatesQuery(
        id=state_id,
        labels=_labels(labels),
        since_rev=since_rev,
        since_latest=since_latest,
        since_time=since_time,
        latest_only=latest_only,
        limit=min(limit, MAX_PAGE),
    )


# The query parameters, documented once for every route that takes them.
Labels = Annotated[
    list[str] | None,
    QueryParameter(description="KEY=VALUE; repeat it to require several labels (all must match)"),
]
SinceRev = Annotated[int, QueryParameter(description="only versions after this revision")]
SinceLatest = Annotated[bool, QueryParameter(description="start at the latest matching version")]
SinceTime = Annotated[
    datetime.datetime | None,
    QueryParameter(description="only versions committed at or after this time (ISO 8601)"),
]
LatestOnly = Annotated[bool, QueryParameter(description="only versions still their state's latest")]
Limit = Annotated[int, QueryParameter(description=f"page size (at most {MAX_PAGE})")]
Rev = Annotated[int, QueryParameter(ge=0, description="a version's revision; 0: the latest")]
StateId = Annotated[
    str | None, QueryParameter(name="id", description="only versions of the state with this id")
]


def router(ctx: ServerContext) -> Router:
    """The reading routes of ``ctx``'s store."""
    engine = ctx.engine

    @get("/api/v1/states", summary="List state versions, oldest first")
    async def list_states(
        label: Labels = None,
        since_rev: SinceRev = 0,
        since_latest: SinceLatest = False,
        since_time: SinceTime = None,
        latest_only: LatestOnly = False,
        limit: Limit = 50,
        state_id: StateId = None,
    ) -> StatesPage:
        """One page of the versions that match; ``more`` says a next page exists: ask again
        with ``since_rev`` set to the last version's ``rev``."""
        query = _query(label, since_rev, since_latest, since_time, latest_only, limit, state_id)
        return await engine.get_states(query)

    @post("/api/v1/states/query", status_code=200, summary="Query state versions")
    async def query_states(data: JSONBody[StatesQuery]) -> StatesPage:
        """Like ``GET /api/v1/states``, with every filter of ``StatesQuery`` (OR-ed label
        sets, one state's ``id``) in a JSON body."""
        if data.limit > MAX_PAGE:
            data = data.replace(limit=MAX_PAGE)
        return await engine.get_states(data)

    @get("/api/v1/states/{state_id:str}", summary="Read one state")
    async def get_state(state_id: FromPath[str], rev: Rev = 0) -> State:
        """The state's latest version, or its version at ``rev``."""
        return await engine.driver.get_state(unescape(state_id), rev)

    @get("/api/v1/states/{state_id:str}/history", summary="Every version of one state")
    async def history(
        state_id: FromPath[str], since_rev: SinceRev = 0, limit: Limit = 50
    ) -> StatesPage:
        """One page of the state's versions, oldest first (paged like ``/api/v1/states``);
        404 when no state has the id."""
        state_id = unescape(state_id)
        page = await engine.get_states(_query(None, since_rev, False, None, False, limit, state_id))
        if not page.states:
            # An empty page: past the last version, or no version at all (404).
            await engine.driver.get_state(state_id)
        return page

    @get("/api/v1/states/{state_id:str}/data/{alias:str}", summary="Read data of a state")
    async def get_data(state_id: FromPath[str], alias: FromPath[str], rev: Rev = 0) -> DataVersion:
        """The data stored under ``alias`` as of the state's version ``rev`` (latest: 0)."""
        found, blob = await engine.driver.get_data(unescape(state_id), unescape(alias), rev)
        return DataVersion(rev=found, blob=blob)

    @get("/api/v1/watch", summary="Stream state versions as Server-Sent Events")
    async def watch(
        label: Labels = None,
        since_rev: SinceRev = 0,
        since_latest: SinceLatest = False,
        since_time: SinceTime = None,
        latest_only: LatestOnly = False,
        limit: Annotated[
            int, QueryParameter(description=f"versions read at once (at most {MAX_PAGE})")
        ] = WATCH_PAGE,
        state_id: StateId = None,
        last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
    ) -> Stream:
        """Every matching version, in revision order, as ``event: state`` with the version as
        JSON ``data``, then each new one as it is committed. The event ``id`` is the
        revision; a client that reconnects with ``Last-Event-ID`` resumes right after it
        (``since_rev`` and ``since_latest`` are then ignored). A comment line is sent after
        a while without versions, so proxies keep the connection open."""
        if last_event_id is not None:
            try:
                since_rev = int(last_event_id)
            except ValueError:
                raise InvalidQueryError(
                    f"Last-Event-ID must be a revision, not {last_event_id!r}"
                ) from None
            since_latest = False
        query = _query(label, since_rev, since_latest, since_time, latest_only, limit, state_id)
        # The first page is read here, so that a store failure is an error response.
        first = await engine.get_states(query)
        return Stream(
            _events(ctx, query, first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return Router(
        path="/",
        route_handlers=[list_states, query_states, get_state, history, get_data, watch],
        tags=["states"],
    )


def _frame(states: list[State]) -> bytes:
    """The events of one page. A page never splits a revision, so the last version of each
    revision carries the event id: a client resuming from it misses nothing."""
    parts = []
    for i, state in enumerate(states):
        last_of_rev = i + 1 == len(states) or states[i + 1].rev != state.rev
        head = f"id: {state.rev}\nevent: state\n" if last_of_rev else "event: state\n"
        parts.append(head.encode())
        parts.append(b"data: " + _encode(state) + b"\n\n")
    return b"".join(parts)


async def _events(ctx: ServerContext, query: StatesQuery, page: StatesPage) -> AsyncIterator[bytes]:
    """The watch stream. It reads a page only once the previous one was sent: a slow client
    holds back its own reads (the server's socket buffer fills and ``send`` waits), so a
    stream never holds more than one page, whatever the client's pace."""
    engine = ctx.engine
    try:
        while True:
            if page.states:
                yield _frame(page.states)
            last = page.states[-1].rev if page.states else query.since_rev
            cursor = last if page.more else max(last, page.head_rev)
            if not page.more:
                reached = await wait_for_rev(ctx, cursor + 1, ctx.keepalive)
                while reached is None:
                    yield b": keep-alive\n\n"
                    reached = await wait_for_rev(ctx, cursor + 1, ctx.keepalive)
                if not reached:
                    return  # the server is stopping
            query = query.replace(since_rev=cursor, since_latest=False)
            page = await engine.get_states(query)
    except ClosedError:
        return
    except DriverError as exc:
        # Headers are sent: say why the stream ends; the client resumes with Last-Event-ID.
        logger.warning("watch stream ended: %s", exc)
        yield (
            b"event: error\ndata: "
            + _encode({"type": "unavailable", "message": str(exc)})
            + b"\n\n"
        )
