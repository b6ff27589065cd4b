"""Requests no client should send get a 4xx JSON error, write nothing, and leave the server
(and the recovery services it runs) as they were.

One real ``flowstate serve --recover`` process on SQLite, with a token, serves the module.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve_process import ServeProcess
from tests.server.answers import head_rev, json_error
from tests.server.pipeline_tasks import __name__ as TASKS_MODULE

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TOKEN = "bad-requests-token"
MAX_REV = 2**63 - 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    directory = tmp_path_factory.mktemp("bad-requests")
    (directory / "token").write_text(TOKEN)
    args = ("--token-file", str(directory / "token"), "--tasks", f"{TASKS_MODULE}:TASKS")
    with ServeProcess(f"sqlite:///{directory}/store.db", *args, "--recover") as server:
        server.wait_line("fires delays from rev")
        yield server


@pytest.fixture
async def client(server: ServeProcess) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
        yield client


def _write(state_id: str, **extra: Any) -> dict[str, Any]:
    # An ended state: the server's recoverer has nothing to retry.
    return {"state": {"id": state_id}, "expected_rev": 0, **extra}


@pytest.mark.parametrize(
    ("writes", "says"),
    [
        ([_write("")], "non-empty string"),
        ([_write("twice"), _write("twice")], "written twice"),
        ([{**_write("bad-rev"), "expected_rev": -1}], "expected_rev"),
        (
            [_write("far", delay_to="later", delay_at="9999-12-31T23:59:59.999999-23:59")],
            "no UTC equivalent",
        ),
        ([_write("year-one", delay_to="x", delay_at="0001-01-01T00:00:00+14:00")], "no UTC"),
        ([_write("naive", delay_to="later", delay_at="2030-01-01T00:00:00")], "timezone-aware"),
        ([_write("no-flow", delay_at="2030-01-01T00:00:00Z")], "a delay's flow"),
        ([_write("no-time", delay_to="later")], "timezone-aware due time"),
    ],
)
async def test_a_commit_the_engine_could_not_send_is_refused_whole(
    client: httpx.AsyncClient, server: ServeProcess, writes: list[dict[str, Any]], says: str
) -> None:
    head = await head_rev(client)
    innocent = _write(f"innocent-{uuid.uuid4().hex[:8]}")
    single = await client.post("/api/v1/commit", json={"writes": [innocent, *writes]})
    assert says in json_error(single, 400, "invalid_command")
    batch = await client.post("/api/v1/commits", json={"commits": [{"writes": writes}]})
    assert batch.status_code == 200
    (outcome,) = batch.json()["outcomes"]
    assert outcome["error"]["type"] == "invalid_command"
    assert says in outcome["error"]["message"]
    assert await head_rev(client) == head, "nothing was written"
    # The recovery services read delays and cursors from the store: they are still running.
    health = (await client.get("/api/v1/recovery")).json()
    assert health["delayer"]["is_leader"]
    assert health["recoverer"]["is_leader"]
    assert server.process is not None
    assert server.process.poll() is None


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"/api/v1/states/a?rev={MAX_REV + 1}", None),
        ("GET", f"/api/v1/states/a/data/x?rev={MAX_REV + 1}", None),
        ("GET", f"/api/v1/delays?since_rev={MAX_REV + 1}", None),
        ("GET", f"/api/v1/head?wait_for={MAX_REV + 1}&timeout=0", None),
        ("POST", "/api/v1/leases/l/renew", {"name": "l", "holder": "h", "token": MAX_REV + 1}),
        ("POST", "/api/v1/leases/l/release", {"name": "l", "holder": "h", "token": MAX_REV + 1}),
        ("POST", "/api/v1/leases/l/acquire", {"holder": "h", "ttl": 1e300}),
        ("POST", "/api/v1/states/query", {"labels": [{"k": str(n)} for n in range(65)]}),
        ("POST", "/api/v1/states/query", {"labels": {f"k{n}": "v" for n in range(65)}}),
    ],
)
async def test_numbers_and_filters_no_store_can_take_are_a_400(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    if body is not None and "token" in body:
        body["ttl"] = 5
    response = await client.request(method, path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] in ("invalid_query", "invalid_command", "bad_request")


def _state(state_id: str, **fields: Any) -> dict[str, Any]:
    return {"writes": [{"state": {"id": state_id, **fields}, "expected_rev": 0}]}


@pytest.mark.parametrize(
    ("path", "body", "unknown"),
    [
        ("/api/v1/commit", _state("lables", lables={"kind": "order"}), "writes[0].state.lables"),
        (
            "/api/v1/commit",
            {"writes": [_write("dat", dat={"invoice": "eA=="})]},
            "writes[0].dat",
        ),
        (
            "/api/v1/commit",
            _state("to", transition={"to": "x", "annotation": {"a": "b"}}),
            "writes[0].state.transition.annotation",
        ),
        ("/api/v1/commit", {"writes": [_write("atomic")], "atomic": True}, "atomic"),
        (
            "/api/v1/commits",
            {"commits": [{"writes": [_write("batch", delay_too="x")]}]},
            "commits[0].writes[0].delay_too",
        ),
        ("/api/v1/states/query", {"lables": {"kind": "order"}}, "lables"),
        ("/api/v1/states/query", {"labels": {"k": "v"}, "latest": True}, "latest"),
        ("/api/v1/leases/fields/acquire", {"holder": "h", "ttl": 5, "tll": 50}, "tll"),
        (
            "/api/v1/leases/fields/renew",
            {"name": "fields", "holder": "h", "token": 1, "ttl": 5, "extend": 1},
            "extend",
        ),
    ],
)
async def test_a_body_field_the_route_does_not_know_is_a_400_naming_it(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], unknown: str
) -> None:
    # Read without it, "lables" would store a state without its labels: data lost silently.
    head = await head_rev(client)
    response = await client.post(path, json=body)
    message = json_error(response, 400, "bad_request")
    assert message.startswith(f"Validation failed for POST {path}: "), message
    assert f"{unknown}: unknown field (the fields are " in message
    assert await head_rev(client) == head, "nothing was written"
    assert (await client.get("/api/v1/leases/fields")).json()["lease"] is None


async def test_every_unknown_field_is_named_with_the_bodys_other_problem(
    client: httpx.AsyncClient,
) -> None:
    body = {"writes": [{"state": {"id": "x", "lables": {}}, "expected_rev": "zero", "dat": {}}]}
    response = await client.post("/api/v1/commit", json=body)
    message = json_error(response, 400, "bad_request")
    assert "writes[0].state.lables: unknown field (the fields are id, rev, labels," in message
    assert "writes[0].dat: unknown field (the fields are state, expected_rev, data," in message
    assert "writes[0].expected_rev: Expected `int`, got `str`" in message


@pytest.mark.parametrize(
    ("path", "unknown", "known"),
    [
        ("/api/v1/states?lable=kind%3Dorder", "lable", "id, label, latest_only, limit"),
        ("/api/v1/states?label=kind%3Dorder&latest=true", "latest", "latest_only"),
        ("/api/v1/watch?lable=kind%3Dorder", "lable", "since_rev"),
        ("/api/v1/states/a?revision=3", "revision", "rev"),
        ("/api/v1/states/a/history?limt=1", "limt", "limit, since_rev"),
        ("/api/v1/states/a/data/x?revision=3", "revision", "rev"),
        ("/api/v1/head?wait=5", "wait", "timeout, wait_for"),
        ("/api/v1/delays?since=3", "since", "limit, since_rev"),
        ("/api/v1/flows?onwer=me", "onwer", "controller, limit, owner"),
        ("/api/v1/flows/executions?flowid=p", "flowid", "flow_id"),
        ("/api/v1/leases/l?holder=h", "holder", "this route takes none"),
        ("/api/v1/info?verbose=1", "verbose", "this route takes none"),
        ("/health?deep", "deep", "this route takes none"),
    ],
)
async def test_a_query_parameter_the_route_does_not_know_is_a_400_naming_it(
    client: httpx.AsyncClient, path: str, unknown: str, known: str
) -> None:
    # Ignored, "lable" would answer with every state instead of the orders.
    response = await client.get(httpx.URL(path), timeout=10)  # a watch would stay open
    message = json_error(response, 400, "bad_request")
    assert f"{unknown}: unknown query parameter (" in message, message
    assert known in message


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/commit",
        "/api/v1/states/query",
        "/api/v1/flows/execute",
        "/api/v1/flows/some-flow/resume",
    ],
)
async def test_a_body_nested_too_deeply_is_a_400(client: httpx.AsyncClient, path: str) -> None:
    nested = "[" * 5000 + "]" * 5000
    response = await client.post(
        path, content=f'{{"x": {nested}}}', headers={"content-type": "application/json"}
    )
    assert "nested too deeply" in json_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/states/%ED%A0%80",  # an encoded lone surrogate
        "/api/v1/states/%FF",
        "/api/v1/states?label=k%3D%ED%A0%80",
        "/api/v1/states?id=%C3",
    ],
)
async def test_a_path_or_query_that_is_not_utf8_is_a_400(
    client: httpx.AsyncClient, path: str
) -> None:
    # Read with replacement characters, %ED%A0%80 would name the state "\ufffd\ufffd\ufffd".
    await client.post("/api/v1/commit", json={"writes": [_write("\ufffd\ufffd\ufffd")]})
    response = await client.get(httpx.URL(path))
    assert "not UTF-8" in json_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/states?id=a&id=b",
        "/api/v1/states?limit=1&limit=2",
        "/api/v1/states?latest_only=true&latest%5Fonly=false",  # %5F is "_"
        "/api/v1/watch?since_rev=0&since_rev=1",
        "/api/v1/flows/executions?status=running&status=failed",
    ],
)
async def test_a_query_parameter_given_twice_is_a_400(client: httpx.AsyncClient, path: str) -> None:
    # Taking either value would answer a question the client did not ask.
    response = await client.get(httpx.URL(path), timeout=10)  # not a watch stream that stays
    message = json_error(response, 400, "bad_request")
    assert message.endswith("is given more than once")


async def test_labels_may_repeat(client: httpx.AsyncClient) -> None:
    run = uuid.uuid4().hex
    for state_id, labels in [("both", {"run": run, "kind": "order"}), ("one", {"run": run})]:
        state = {"id": f"{run}-{state_id}", "labels": labels}
        response = await client.post(
            "/api/v1/commit", json={"writes": [{"state": state, "expected_rev": 0}]}
        )
        assert response.status_code == 200, response.text
    response = await client.get(f"/api/v1/states?label=run%3D{run}&label=kind%3Dorder")
    assert response.status_code == 200
    assert [s["id"] for s in response.json()["states"]] == [f"{run}-both"]


async def test_odd_paths_are_json_404s_and_cannot_write_the_log(server: ServeProcess) -> None:
    forged = "2026-01-01 00:00:00,000 INFO flowstate.server: FORGED LINE"
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        # The console's files need no token; a NUL in a file name cannot name one.
        nul = await anonymous.get(httpx.URL(f"/console/%00%0A{forged.replace(' ', '%20')}"))
        json_error(nul, 404, "no_route")
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        json_error(await client.get("/schema/swagger"), 404, "no_route")
        json_error(await client.get("/schema/nothing/here"), 404, "no_route")
        assert (await client.get("/schema/openapi.json")).json()["info"]["title"] == "flowstate"
        # Whatever was logged about these requests, no client text starts a line of the log.
        await client.get("/health")
    assert not any(line.startswith("2026-01-01") for line in server.lines), server.output


def test_a_token_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    from tests.serve_process import serve_refused

    (tmp_path / "token").write_bytes(b"\xff\xfe binary")
    refused = serve_refused(
        f"sqlite:///{tmp_path}/store.db", "--token-file", str(tmp_path / "token")
    )
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"flowstate: error: the token file {str(tmp_path / 'token')!r} is not UTF-8 text"
    ]
