"""Managed-flow routes through a real server: a FlowManager on the remote driver creates the
flows, as a controller elsewhere would, and HTTP reads them and acts on them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from flowstate.workflows import FlowManager, FlowStatus, ManagedFlow
from tests.serve_process import ServeProcess

# The module starts a `flowstate serve` process of its own.
pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    store = tmp_path_factory.mktemp("flows") / "store.db"
    with ServeProcess(f"sqlite:///{store}") as server:
        yield server


@pytest.fixture
def owner() -> str:
    return f"owner-{uuid.uuid4().hex[:8]}"


def error_type(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    kind: str = response.json()["error"]["type"]
    return kind


async def test_read_a_flow_and_list_flows(
    client: httpx.AsyncClient, flows: FlowManager, owner: str
) -> None:
    first = await flows.create(controller="inbox", owner=owner, state={"n": 1})
    second = await flows.start((await flows.create(controller="inbox", owner=owner)).id)
    got = (await client.get(f"/api/v1/flows/{first.id}")).json()
    assert got["id"] == first.id
    assert (got["status"], got["state"], got["revision"]) == ("created", {"n": 1}, first.revision)
    page = (await client.get("/api/v1/flows", params={"owner": owner})).json()
    assert [f["id"] for f in page["flows"]] == [first.id, second.id]
    assert page["more"] is False
    running = await client.get("/api/v1/flows", params={"owner": owner, "status": "running"})
    assert [f["id"] for f in running.json()["flows"]] == [second.id]
    one = (await client.get("/api/v1/flows", params={"owner": owner, "limit": 1})).json()
    assert ([f["id"] for f in one["flows"]], one["more"]) == ([first.id], True)
    rest = await client.get(
        "/api/v1/flows", params={"owner": owner, "since_rev": one["flows"][0]["revision"]}
    )
    assert [f["id"] for f in rest.json()["flows"]] == [second.id]
    assert error_type(await client.get("/api/v1/flows", params={"status": "sleepy"}), 400) == (
        "invalid_query"
    )
    assert error_type(await client.get(f"/api/v1/flows/{owner}-nobody"), 404) == "not_found"


async def test_resume_request_cancel_and_cancel(
    client: httpx.AsyncClient, flows: FlowManager, owner: str
) -> None:
    flow = await flows.start((await flows.create(controller="c", owner=owner, state={"a": 1})).id)
    flow = await flows.wait(flow.id, {"kind": "approval"})
    resumed = await client.post(f"/api/v1/flows/{flow.id}/resume", json={"patch": {"b": 2}})
    assert resumed.status_code == 200, resumed.text
    body = resumed.json()
    assert (body["status"], body["wait"], body["state"]) == ("running", None, {"a": 1, "b": 2})
    again = await client.post(f"/api/v1/flows/{flow.id}/resume", json={})
    assert error_type(again, 409) == "invalid_transition"
    asked = (await client.post(f"/api/v1/flows/{flow.id}/request-cancel")).json()
    assert (asked["status"], asked["cancel_requested"]) == ("running", True)
    cancelled = (await client.post(f"/api/v1/flows/{flow.id}/cancel")).json()
    assert cancelled["status"] == "cancelled"
    assert error_type(await client.post(f"/api/v1/flows/{flow.id}/cancel"), 409) == (
        "already_terminal"
    )
    events = (await client.get(f"/api/v1/flows/{flow.id}/events")).json()
    assert [e["kind"] for e in events] == [
        "created",
        "started",
        "waiting",
        "resumed",
        "cancel_requested",
        "cancelled",
    ]
    final = await flows.get(flow.id)
    assert final.status is FlowStatus.CANCELLED, "the routes changed the flow itself"


async def test_steps_reported_over_http(
    client: httpx.AsyncClient, flows: FlowManager, owner: str
) -> None:
    flow = await flows.create_mirrored(controller="agent", owner=owner)
    report: dict[str, Any] = {"run_id": "r1", "task": "classify", "status": "running"}
    first = await client.post(f"/api/v1/flows/{flow.id}/steps", json=report)
    assert first.status_code == 200, first.text
    assert (first.json()["status"], first.json()["task"]) == ("running", "classify")
    done = {**report, "status": "completed", "result": {"label": "spam"}}
    await client.post(f"/api/v1/flows/{flow.id}/steps", json=done)
    steps = (await client.get(f"/api/v1/flows/{flow.id}/steps")).json()
    assert [(s["run_id"], s["status"], s["result"]) for s in steps] == [
        ("r1", "completed", {"label": "spam"})
    ]
    assert [s.status for s in await flows.steps(flow.id)] == ["completed"]
    events = (await client.get(f"/api/v1/flows/{flow.id}/events")).json()
    assert [e["kind"] for e in events] == ["created", "step_observed", "step_observed"]
    bad = await client.post(f"/api/v1/flows/{flow.id}/steps", json={"run_id": "r2"})
    assert error_type(bad, 400) == "bad_request"
    nobody = await client.post(f"/api/v1/flows/{owner}-nobody/steps", json=report)
    assert error_type(nobody, 404) == "not_found"


async def test_a_flow_reads_the_same_through_http_and_the_manager(
    client: httpx.AsyncClient, flows: FlowManager, owner: str
) -> None:
    flow = await flows.create(controller="c", owner=owner, goal="same", state={"x": [1, 2]})
    decoded = msgspec.convert((await client.get(f"/api/v1/flows/{flow.id}")).json(), ManagedFlow)
    assert decoded == flow


async def test_a_misspelled_field_is_a_400_and_the_flow_does_not_move(
    client: httpx.AsyncClient, flows: FlowManager, owner: str
) -> None:
    flow = await flows.start((await flows.create(controller="c", owner=owner, state={"a": 1})).id)
    flow = await flows.wait(flow.id, {"kind": "approval"})
    # Read without it, "pach" would resume the flow without its patch.
    resume = await client.post(f"/api/v1/flows/{flow.id}/resume", json={"pach": {"b": 2}})
    assert error_type(resume, 400) == "bad_request"
    assert "pach: unknown field (the fields are patch)" in resume.json()["error"]["message"]
    report = {"run_id": "r1", "task": "t", "status": "failed", "eror": "boom"}
    step = await client.post(f"/api/v1/flows/{flow.id}/steps", json=report)
    assert error_type(step, 400) == "bad_request"
    assert "eror: unknown field (the fields are run_id, task, status," in step.text
    assert await flows.get(flow.id) == flow, "neither moved nor changed"
    assert await flows.steps(flow.id) == []
    listed = await client.get("/api/v1/flows", params={"onwer": owner})
    assert error_type(listed, 400) == "bad_request"
    assert "onwer: unknown query parameter" in listed.text
