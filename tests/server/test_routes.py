"""Every route of ``flowstate serve`` through a real server process and a real HTTP client.

One server (on SQLite, no token) serves the whole module; each test works on states of its own
(ids and labels with a fresh prefix), so the tests do not see each other's states.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest

import flowstate as fs
from flowstate.drivers.http import HTTPDriver
from flowstate.server._console import CONSOLE_DIR
from tests.serve_process import ServeProcess
from tests.server.sse import Event, events

# Each module starts `flowstate serve` processes of its own.
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

KEEPALIVE = 0.3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    store = tmp_path_factory.mktemp("routes") / "store.db"
    with ServeProcess(f"sqlite:///{store}", "--keepalive", str(KEEPALIVE)) as server:
        yield server


@pytest.fixture
def run() -> str:
    """A fresh prefix for this test's state ids and its ``run`` label."""
    return uuid.uuid4().hex[:10]


def state_json(state_id: str, to: str = "work", **labels: str) -> dict[str, Any]:
    return {"id": state_id, "labels": labels, "transition": {"to": to}}


async def commit(
    client: httpx.AsyncClient, *writes: tuple[dict[str, Any], int], **extra: Any
) -> list[int]:
    body = {"writes": [{"state": state, "expected_rev": rev, **extra} for state, rev in writes]}
    response = await client.post("/api/v1/commit", json=body)
    assert response.status_code == 200, response.text
    revs: list[int] = response.json()["revs"]
    return revs


def assert_error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == kind
    assert error["message"]
    assert "Traceback" not in response.text
    return error


# -- health, info, errors of any route --------------------------------------------------------


async def test_health(client: httpx.AsyncClient, run: str) -> None:
    (rev,) = await commit(client, (state_json(f"{run}-a"), 0))
    response = await client.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    assert health["rev"] >= rev
    assert health["token_required"] is False


async def test_info(client: httpx.AsyncClient) -> None:
    info = (await client.get("/api/v1/info")).json()
    assert info == {
        "version": fs.__version__,
        "driver": "sqlite",
        "max_body_size": 1024 * 1024,
        "max_page": 1000,
    }


# -- the console -----------------------------------------------------------------------------


async def test_the_console_page_and_its_files(client: httpx.AsyncClient) -> None:
    """``/`` is the console's page; every file it loads (and every module those import) is
    served from ``/console/``, with headers that let the page run nothing but its own files."""
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    loaded = set(re.findall(r'(?:src|href)="(console/[^"]+)"', page.text))
    assert {"console/app.js", "console/style.css", "console/icon.svg"} <= loaded
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    seen: set[str] = set()
    while loaded - seen:
        path = min(loaded - seen)
        seen.add(path)
        response = await client.get(f"/{path}")
        assert response.status_code == 200, path
        suffix = path[path.rindex(".") :]
        assert response.headers["content-type"].startswith(types[suffix]), path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        if suffix == ".js":
            loaded |= {
                f"console/{name}" for name in re.findall(r'from "\./([\w-]+\.js)"', response.text)
            }
    # Every module of the folder is loaded by the page, and none is missing from the folder.
    assert {f"console/{p.name}" for p in CONSOLE_DIR.iterdir() if p.suffix == ".js"} == {
        p for p in seen if p.endswith(".js")
    }
    assert_error(await client.get("/console/missing.js"), 404, "no_route")
    for outside in (
        "/console/%2E%2E/_app.py",
        "/console/..%2F_app.py",
        "/console/%2E%2E%2F_app.py",
    ):
        assert_error(await client.get(outside), 404, "no_route")
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/" not in schema["paths"], "the page is not part of the API"


async def test_unknown_routes_and_methods_are_json_errors(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/v1/nothing"), 404, "no_route")
    assert_error(await client.delete("/api/v1/states"), 405, "method_not_allowed")


async def test_bad_bodies_and_parameters_are_400(client: httpx.AsyncClient) -> None:
    bad_json = await client.post(
        "/api/v1/commit", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(bad_json, 400, "bad_request")
    wrong_shape = await client.post("/api/v1/commit", json={"writes": [{"state": 42}]})
    assert_error(wrong_shape, 400, "bad_request")
    error = assert_error(await client.get("/api/v1/states?limit=many"), 400, "bad_request")
    assert "limit" in error["message"]
    assert_error(await client.get("/api/v1/states?label=novalue"), 400, "invalid_query")
    assert_error(await client.get("/api/v1/states?limit=0"), 400, "invalid_query")
    naive = await client.get("/api/v1/states", params={"since_time": "2024-01-01T00:00:00"})
    assert_error(naive, 400, "invalid_query")
    bad_query = await client.post("/api/v1/states/query", json={"limit": -1})
    assert_error(bad_query, 400, "invalid_query")


@pytest.mark.parametrize(
    "query",
    [
        {"limit": 0},
        {"limit": -1},
        {"since_time": "2024-01-01T00:00:00"},  # no time zone
        {"id": ""},
    ],
)
async def test_a_query_the_library_refuses_is_an_invalid_query_by_get_and_post(
    client: httpx.AsyncClient, query: dict[str, Any]
) -> None:
    by_get = assert_error(await client.get("/api/v1/states", params=query), 400, "invalid_query")
    posted = await client.post("/api/v1/states/query", json=query)
    assert assert_error(posted, 400, "invalid_query") == by_get


#: GET routes, each answering 200 once the test's state ``{run}-a`` is stored.
GET_ROUTES = [
    "/health",
    "/",
    "/console/app.js",
    "/schema/openapi.json",
    "/api/v1/info",
    "/api/v1/head",
    "/api/v1/recovery",
    "/api/v1/states?limit=2",
    "/api/v1/states/{run}-a",
    "/api/v1/states/{run}-a/history",
    "/api/v1/states/{run}-a/data/d",
    "/api/v1/delays",
    "/api/v1/leases/{run}",
    "/api/v1/flows",
    "/api/v1/flows/executions",
]


async def test_head_answers_as_get_does_without_the_body(
    client: httpx.AsyncClient, server: ServeProcess, run: str
) -> None:
    await commit(client, (state_json(f"{run}-a"), 0), data={"d": "eA=="})
    for route in GET_ROUTES:
        path = route.format(run=run)
        got = await client.get(path)
        head = await client.head(path)
        assert (head.status_code, got.status_code) == (200, 200), (path, head, got.text)
        assert head.content == b"", path
        for name in ("content-type", "content-length", "content-security-policy"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
    missing = await client.head(f"/api/v1/states/{run}-nobody")
    assert (missing.status_code, missing.content) == (404, b"")
    assert missing.headers["content-type"] == "application/json"
    post_only = await client.head("/api/v1/commit")
    assert (post_only.status_code, post_only.content) == (405, b"")


def test_head_of_a_watch_stream_ends_at_once(server: ServeProcess) -> None:
    # Pipelined on one connection: the stream's headers, then the next request's answer.
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    host = parts.netloc
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            f"HEAD /api/v1/watch HTTP/1.1\r\nHost: {host}\r\n\r\n"
            f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    stream, _, rest = data.partition(b"\r\n\r\n")
    assert stream.startswith(b"HTTP/1.1 200 "), data
    assert b"content-type: text/event-stream" in stream.lower()
    assert rest.startswith(b"HTTP/1.1 200 "), "the stream sent no body and ended"
    assert rest.endswith(b'"token_required":false}'), rest
    assert "Traceback" not in server.output
    assert "ASGI callable" not in server.output


async def test_bodies_over_the_limit_are_refused(client: httpx.AsyncClient, run: str) -> None:
    big: dict[str, Any] = {"writes": [{"state": state_json(f"{run}-big"), "expected_rev": 0}]}
    big["writes"][0]["state"]["annotations"] = {"blob": "x" * (1024 * 1024)}
    assert_error(await client.post("/api/v1/commit", json=big), 413, "too_large")
    assert_error(await client.get(f"/api/v1/states/{run}-big"), 404, "not_found")


async def test_openapi_schema_documents_the_routes(client: httpx.AsyncClient) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in [
        "/health",
        "/api/v1/states",
        "/api/v1/states/query",
        "/api/v1/states/{state_id}",
        "/api/v1/states/{state_id}/history",
        "/api/v1/watch",
        "/api/v1/commit",
        "/api/v1/commits",
        "/api/v1/head",
        "/api/v1/delays",
        "/api/v1/leases/{name}/acquire",
        "/api/v1/recovery",
        "/api/v1/flows",
        "/api/v1/flows/execute",
        "/api/v1/flows/executions",
        "/api/v1/flows/executions/{execution_id}",
        "/api/v1/flows/{flow_id}",
        "/api/v1/flows/{flow_id}/steps",
        "/api/v1/flows/{flow_id}/cancel",
    ]:
        assert path in paths, path
    for path in ("/api/v1/states", "/api/v1/watch"):
        names = {p["name"] for p in paths[path]["get"]["parameters"]}
        assert {"id", "label", "since_rev", "latest_only"} <= names, path


# -- states ------------------------------------------------------------------------------------


async def test_list_states_with_filters_and_paging(client: httpx.AsyncClient, run: str) -> None:
    revs = []
    for i, kind in enumerate(["order", "user", "order", "order"]):
        revs += await commit(client, (state_json(f"{run}-{i}", run=run, kind=kind), 0))
    (moved,) = await commit(
        client, (state_json(f"{run}-0", "done", run=run, kind="order"), revs[0])
    )

    async def ids(**params: Any) -> list[str]:
        page = (await client.get("/api/v1/states", params=params)).json()
        return [f"{s['id']}@{s['rev']}" for s in page["states"]]

    orders = await ids(label=[f"run={run}", "kind=order"])
    assert orders == [
        f"{run}-{i}@{rev}" for i, rev in [(0, revs[0]), (2, revs[2]), (3, revs[3]), (0, moved)]
    ]
    assert await ids(label=f"run={run}", latest_only="true") == [
        f"{run}-1@{revs[1]}",
        f"{run}-2@{revs[2]}",
        f"{run}-3@{revs[3]}",
        f"{run}-0@{moved}",
    ]
    assert await ids(label=f"run={run}", since_rev=revs[2]) == [
        f"{run}-3@{revs[3]}",
        f"{run}-0@{moved}",
    ]
    assert await ids(label=[f"run={run}", "kind=user"], since_latest="true") == [
        f"{run}-1@{revs[1]}"
    ]
    seen: list[str] = []
    params: dict[str, Any] = {"label": f"run={run}", "limit": 2}
    while True:
        page = (await client.get("/api/v1/states", params=params)).json()
        seen += [s["id"] for s in page["states"]]
        if not page["more"]:
            break
        params["since_rev"] = page["states"][-1]["rev"]
    assert seen == [f"{run}-{i}" for i in (0, 1, 2, 3, 0)]
    stored = (await client.get(f"/api/v1/states/{run}-3")).json()["committed_at"]
    since = await ids(label=f"run={run}", since_time=stored)
    assert since[0] == f"{run}-3@{revs[3]}"


async def test_query_route_takes_every_filter(client: httpx.AsyncClient, run: str) -> None:
    await commit(client, (state_json(f"{run}-a", run=run, kind="x"), 0))
    await commit(client, (state_json(f"{run}-b", run=run, kind="y"), 0))
    await commit(client, (state_json(f"{run}-c", run=run, kind="z"), 0))
    query = {"labels": [{"run": run, "kind": "x"}, {"run": run, "kind": "z"}]}
    page = (await client.post("/api/v1/states/query", json=query)).json()
    assert [s["id"] for s in page["states"]] == [f"{run}-a", f"{run}-c"]
    page = (await client.post("/api/v1/states/query", json={"id": f"{run}-b"})).json()
    assert [s["id"] for s in page["states"]] == [f"{run}-b"]


async def test_one_state_its_versions_and_its_history(client: httpx.AsyncClient, run: str) -> None:
    state_id = f"{run}/with/slashes"
    path = f"/api/v1/states/{state_id.replace('/', '%2F')}"
    (r1,) = await commit(client, (state_json(state_id, "one"), 0))
    (r2,) = await commit(client, (state_json(state_id, "two"), r1))
    await commit(client, (state_json(f"{run}/with"), 0))  # a prefix of the id: not its history
    (r3,) = await commit(client, (state_json(state_id, ""), r2))
    latest = (await client.get(path)).json()
    assert (latest["id"], latest["rev"], latest["transition"]["to"]) == (state_id, r3, "")
    assert (await client.get(path, params={"rev": r1})).json()["transition"]["to"] == "one"
    assert_error(await client.get(path, params={"rev": r3 + 1000}), 404, "not_found")
    assert_error(await client.get(f"/api/v1/states/{run}-nobody"), 404, "not_found")
    history = (await client.get(f"{path}/history")).json()
    assert [s["rev"] for s in history["states"]] == [r1, r2, r3]
    assert history["more"] is False
    first = (await client.get(f"{path}/history", params={"limit": 2})).json()
    assert ([s["rev"] for s in first["states"]], first["more"]) == ([r1, r2], True)
    rest = (await client.get(f"{path}/history", params={"since_rev": r2})).json()
    assert [s["rev"] for s in rest["states"]] == [r3]


async def test_the_history_of_an_unknown_state_is_404(client: httpx.AsyncClient, run: str) -> None:
    # As reading the state is: an empty page would look like a state without versions.
    unknown = assert_error(
        await client.get(f"/api/v1/states/{run}-nobody/history"), 404, "not_found"
    )
    state = assert_error(await client.get(f"/api/v1/states/{run}-nobody"), 404, "not_found")
    assert unknown == state
    # A known state's page that is empty (after its last version) is a page.
    (r1,) = await commit(client, (state_json(f"{run}-known"), 0))
    past = await client.get(f"/api/v1/states/{run}-known/history", params={"since_rev": r1})
    assert past.status_code == 200, past.text
    assert (past.json()["states"], past.json()["more"]) == ([], False)


async def test_data_of_a_state(client: httpx.AsyncClient, run: str) -> None:
    (r1,) = await commit(client, (state_json(f"{run}-d"), 0), data={"doc": "djE="})  # b"v1"
    (r2,) = await commit(client, (state_json(f"{run}-d"), r1), data={"doc": "djI="})
    latest = (await client.get(f"/api/v1/states/{run}-d/data/doc")).json()
    assert latest == {"rev": r2, "blob": "djI="}
    older = (await client.get(f"/api/v1/states/{run}-d/data/doc", params={"rev": r1})).json()
    assert older == {"rev": r1, "blob": "djE="}
    assert_error(await client.get(f"/api/v1/states/{run}-d/data/none"), 404, "not_found")


# -- the driver's routes -----------------------------------------------------------------------


async def test_a_conflict_is_409_with_every_conflicting_state(
    client: httpx.AsyncClient, run: str
) -> None:
    (ra,) = await commit(client, (state_json(f"{run}-a"), 0))
    body = {
        "writes": [
            {"state": state_json(f"{run}-a"), "expected_rev": 0},
            {"state": state_json(f"{run}-new"), "expected_rev": 0},
            {"state": state_json(f"{run}-b"), "expected_rev": 3},
        ]
    }
    error = assert_error(await client.post("/api/v1/commit", json=body), 409, "conflict")
    assert error["conflicts"] == [
        {"state_id": f"{run}-a", "expected_rev": 0, "actual_rev": ra},
        {"state_id": f"{run}-b", "expected_rev": 3, "actual_rev": 0},
    ]
    assert_error(await client.get(f"/api/v1/states/{run}-new"), 404, "not_found")


async def test_a_batch_of_commits_has_one_outcome_each(client: httpx.AsyncClient, run: str) -> None:
    body = {
        "commits": [
            {"writes": [{"state": state_json(f"{run}-x"), "expected_rev": 0}]},
            {"writes": [{"state": state_json(f"{run}-y"), "expected_rev": 9}]},
            {"writes": [{"state": state_json(f"{run}-z"), "expected_rev": 0}]},
        ]
    }
    outcomes = (await client.post("/api/v1/commits", json=body)).json()["outcomes"]
    assert [sorted(o) for o in outcomes] == [["result"], ["error"], ["result"]]
    assert outcomes[1]["error"]["type"] == "conflict"
    assert outcomes[1]["error"]["conflicts"][0]["state_id"] == f"{run}-y"


async def test_head_and_its_long_poll(client: httpx.AsyncClient, run: str) -> None:
    head = (await client.get("/api/v1/head")).json()["rev"]
    quiet = await client.get("/api/v1/head", params={"wait_for": head + 10**6, "timeout": 0.2})
    assert quiet.json()["rev"] >= head, "a long poll that times out answers the head"
    (known,) = await commit(client, (state_json(f"{run}-h"), 0))
    poll = asyncio.ensure_future(
        client.get("/api/v1/head", params={"wait_for": known + 1, "timeout": 30})
    )
    # Whether the commit reaches the server before the poll or after, the poll answers it.
    (rev,) = await commit(client, (state_json(f"{run}-h2"), 0))
    assert (await poll).json()["rev"] >= rev


async def test_delays(client: httpx.AsyncClient, run: str) -> None:
    since = (await client.get("/api/v1/head")).json()["rev"]
    at = "2031-01-01T00:00:00Z"
    (rev,) = await commit(
        client, (state_json(f"{run}-late", "wait"), 0), delay_to="wake", delay_at=at
    )
    page = (await client.get("/api/v1/delays", params={"since_rev": since})).json()
    mine = [d for d in page["delays"] if d["state"]["id"] == f"{run}-late"]
    assert [(d["to"], d["at"], d["state"]["rev"]) for d in mine] == [("wake", at, rev)]


async def test_leases(client: httpx.AsyncClient, run: str) -> None:
    name = f"{run}/lease"
    path = f"/api/v1/leases/{name.replace('/', '%2F')}"
    got = (await client.post(f"{path}/acquire", json={"holder": "one", "ttl": 30})).json()
    lease = got["lease"]
    assert (lease["name"], lease["holder"]) == (name, "one")
    taken = await client.post(f"{path}/acquire", json={"holder": "two", "ttl": 30})
    assert taken.json() == {"lease": None}
    assert (await client.get(path)).json() == {"lease": lease}
    assert (await client.post(f"{path}/renew", json=lease)).json()["lease"] == lease
    wrong = await client.post("/api/v1/leases/other/renew", json=lease)
    assert_error(wrong, 400, "invalid_command")
    assert_error(
        await client.post(f"{path}/acquire", json={"holder": "x", "ttl": -1}), 400, "bad_request"
    )
    await client.post(f"{path}/release", json=lease)
    assert (await client.get(path)).json() == {"lease": None}


async def test_recovery_is_off_without_recover(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/recovery")).json() == {
        "enabled": False,
        "recoverer": None,
        "delayer": None,
    }


# -- the watch stream --------------------------------------------------------------------------

_state = msgspec.json.Decoder(fs.State)


async def take(stream: AsyncIterator[Event], count: int) -> list[Event]:
    got = []
    async with asyncio.timeout(20):
        async for event in stream:
            if event.comment is None:
                got.append(event)
                if len(got) == count:
                    break
    return got


async def test_watch_streams_every_version_and_resumes(client: httpx.AsyncClient, run: str) -> None:
    revs = [
        rev
        for i in range(3)
        for rev in await commit(client, (state_json(f"{run}-{i}", run=run), 0))
    ]
    params = {"label": f"run={run}"}
    async with client.stream("GET", "/api/v1/watch", params=params) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = events(response)
        first = await take(stream, 3)
        assert [e.event for e in first] == ["state"] * 3
        assert [_state.decode(e.data).rev for e in first] == revs
        assert [e.last_id for e in first] == [str(rev) for rev in revs]
        (later,) = await commit(client, (state_json(f"{run}-0", "next", run=run), revs[0]))
        (live,) = await take(stream, 1)
        assert (_state.decode(live.data).rev, live.last_id) == (later, str(later))
    # A reconnecting client sends the last id it saw and gets only what came after it.
    (missed,) = await commit(client, (state_json(f"{run}-1", "next", run=run), revs[1]))
    headers = {"Last-Event-ID": str(revs[1])}
    async with client.stream("GET", "/api/v1/watch", params=params, headers=headers) as response:
        resumed = await take(events(response), 3)
    assert [_state.decode(e.data).rev for e in resumed] == [revs[2], later, missed]


async def test_watch_sends_keepalive_comments(client: httpx.AsyncClient, run: str) -> None:
    async with client.stream("GET", "/api/v1/watch", params={"label": f"run={run}"}) as response:
        async with asyncio.timeout(10):
            first = await anext(events(response))
    assert first.comment == "keep-alive"


async def test_watch_rejects_a_bad_last_event_id(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/watch", headers={"Last-Event-ID": "yesterday"})
    assert_error(response, 400, "invalid_query")


async def test_states_and_watch_of_one_state(client: httpx.AsyncClient, run: str) -> None:
    """``id=`` narrows the list and the watch to one state's versions (its history, live)."""
    (first,) = await commit(client, (state_json(f"{run}/a", run=run), 0))
    (other,) = await commit(client, (state_json(f"{run}/b", run=run), 0))
    (second,) = await commit(client, (state_json(f"{run}/a", "next", run=run), first))
    page = (await client.get("/api/v1/states", params={"id": f"{run}/a"})).json()
    assert [(s["id"], s["rev"]) for s in page["states"]] == [
        (f"{run}/a", first),
        (f"{run}/a", second),
    ]
    latest = await client.get("/api/v1/states", params={"id": f"{run}/a", "latest_only": "true"})
    assert [s["rev"] for s in latest.json()["states"]] == [second]
    params = {"id": f"{run}/a", "since_rev": str(first)}
    async with client.stream("GET", "/api/v1/watch", params=params) as response:
        stream = events(response)
        (seen,) = await take(stream, 1)
        assert _state.decode(seen.data).rev == second
        await commit(client, (state_json(f"{run}/b", "next", run=run), other))
        (third,) = await commit(client, (state_json(f"{run}/a", "last", run=run), second))
        (live,) = await take(stream, 1)  # b's new version is not in this stream
        assert (_state.decode(live.data).rev, live.last_id) == (third, str(third))


async def test_watch_since_latest(client: httpx.AsyncClient, run: str) -> None:
    await commit(client, (state_json(f"{run}-old", run=run), 0))
    (rev,) = await commit(client, (state_json(f"{run}-new", run=run), 0))
    params = {"label": f"run={run}", "since_latest": "true"}
    async with client.stream("GET", "/api/v1/watch", params=params) as response:
        (event,) = await take(events(response), 1)
    assert _state.decode(event.data).rev == rev


async def test_watch_since_time(client: httpx.AsyncClient, run: str) -> None:
    await commit(client, (state_json(f"{run}-old", run=run), 0))
    old = _state.decode((await client.get(f"/api/v1/states/{run}-old")).content)
    # Move another state on until a version of it lands in a later millisecond than the old
    # one (commit times have millisecond resolution).
    rev = 0
    while True:
        (rev,) = await commit(client, (state_json(f"{run}-new", f"to-{rev}", run=run), rev))
        new = _state.decode((await client.get(f"/api/v1/states/{run}-new")).content)
        assert new.committed_at is not None
        assert old.committed_at is not None
        if new.committed_at > old.committed_at:
            break
    params = {"label": f"run={run}", "since_time": new.committed_at.isoformat()}
    async with client.stream("GET", "/api/v1/watch", params=params) as response:
        (event,) = await take(events(response), 1)
    assert _state.decode(event.data).rev == new.rev
    naive = await client.get("/api/v1/watch", params={"since_time": "2024-01-01T00:00:00"})
    assert_error(naive, 400, "invalid_query")


# -- the remote driver against the shared server -----------------------------------------------


async def test_engine_through_the_server(server: ServeProcess, run: str) -> None:
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        ctx.current.annotations["done"] = "yes"
        return fs.Commit(fs.End(ctx))

    async with fs.Engine(server.url, flows={"work": work}) as engine:
        assert isinstance(engine.driver, HTTPDriver)
        ctx = fs.StateCtx.new(f"{run}-job", labels={"run": run})
        await engine.do(fs.Commit(fs.Transit(ctx, "work")))
        async with engine.watch(labels={"run": run}, since_rev=ctx.committed.rev) as watcher:
            assert (await engine.execute(ctx)).status == "ended"
            async with asyncio.timeout(20):
                ended = await anext(watcher)
        assert ended.is_ended
        assert ended.annotations == {"done": "yes"}
        found = await engine.find_state({"run": run})
        assert found.current == ended


async def test_delay_fires_through_the_server_with_a_local_delayer(
    server: ServeProcess, run: str
) -> None:
    woke = asyncio.Event()

    async def wake(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        woke.set()
        return fs.Commit(fs.End(ctx))

    async with fs.Engine(server.url, flows={"wake": wake}) as engine:
        ctx = fs.StateCtx.new(f"{run}-sleeper")
        due = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=0.2)
        await engine.do(fs.Commit(fs.Transit(ctx, "wake"), fs.Delay(ctx, "wake", until=due)))
        async with fs.Delayer(engine, lease_ttl=2), asyncio.timeout(30):
            await woke.wait()


def test_start_line_names_the_bound_port(server: ServeProcess) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert int(server.url.rsplit(":", 1)[1]) > 0
    start = [line for line in server.lines if "listening on" in line]
    assert len(start) == 1
    assert "token not required" in start[0]
