"""The executions API of the flow-manager microservice, end to end through a real server whose
``--tasks`` registry runs the steps: a JSON definition in, a run out, every attempt read back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from flowstate.workflows import FlowManager
from tests.serve_process import ServeProcess

# The module starts a `flowstate serve` process of its own.
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TASKS = "tests.server.pipeline_tasks:TASKS"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    store = tmp_path_factory.mktemp("executions") / "store.db"
    with ServeProcess(f"sqlite:///{store}", "--tasks", TASKS) as server:
        yield server


def definition(
    flow_id: str, tasks: list[dict[str, Any]], conditions: list[dict[str, Any]], start: str
) -> dict[str, Any]:
    return {
        "flow": {
            "id": flow_id,
            "name": f"{flow_id} flow",
            "start_task": start,
            "tasks": tasks,
            "conditions": conditions,
        }
    }


def data_processing(flow_id: str) -> dict[str, Any]:
    """The definition of the flow-manager microservice's own example."""
    tasks = [
        {"name": "task1", "description": "Fetch data"},
        {"name": "task2", "description": "Process data"},
        {"name": "task3", "description": "Store data"},
    ]
    conditions = [
        {
            "name": "condition_task1_result",
            "description": "Evaluate the result of task1.",
            "source_task": "task1",
            "outcome": "success",
            "target_task_success": "task2",
            "target_task_failure": "end",
        },
        {
            "name": "condition_task2_result",
            "description": "Evaluate the result of task2.",
            "source_task": "task2",
            "outcome": "success",
            "target_task_success": "task3",
            "target_task_failure": "end",
        },
    ]
    return definition(flow_id, tasks, conditions, "task1")


async def run(
    client: httpx.AsyncClient, flows: FlowManager, body: dict[str, Any]
) -> dict[str, Any]:
    """POST the definition, wait for the run to end (through a watcher), read it back."""
    response = await client.post("/api/v1/flows/execute", json=body)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "running"
    assert accepted["flow_id"] == body["flow"]["id"]
    done = await flows.result(accepted["execution_id"], timeout=30)
    assert done.id == accepted["execution_id"]
    execution: dict[str, Any] = (
        await client.get(f"/api/v1/flows/executions/{accepted['execution_id']}")
    ).json()
    return execution


def attempts(execution: dict[str, Any]) -> list[tuple[str, int, str, Any]]:
    return [(t["task"], t["attempt"], t["status"], t["result"]) for t in execution["tasks"]]


async def test_a_definition_runs_to_its_end(client: httpx.AsyncClient, flows: FlowManager) -> None:
    flow_id = f"data-{uuid.uuid4().hex[:6]}"
    body = {**data_processing(flow_id), "input": {"rows": 21}, "owner": "team-a"}
    execution = await run(client, flows, body)
    assert execution["status"] == "finished"
    assert execution["flow_id"] == flow_id
    assert execution["name"] == f"{flow_id} flow"
    assert execution["current_task"] == "task3"
    assert attempts(execution) == [
        ("task1", 1, "completed", {"rows": 21}),
        ("task2", 1, "completed", {"processed": 42}),
        ("task3", 1, "completed", {"stored": 42}),
    ]
    listed = await client.get(
        "/api/v1/flows/executions", params={"flow_id": flow_id, "status": "finished"}
    )
    page = listed.json()
    assert [e["execution_id"] for e in page["executions"]] == [execution["execution_id"]]
    assert page["executions"][0]["tasks"] is None, "the list leaves the attempts out"
    running = await client.get(
        "/api/v1/flows/executions", params={"flow_id": flow_id, "status": "running"}
    )
    assert running.json()["executions"] == []
    run_flow = await flows.get(execution["execution_id"])
    assert (run_flow.owner, run_flow.runtime) == ("team-a", "pipeline")


async def test_every_attempt_is_listed_with_its_error(
    client: httpx.AsyncClient, flows: FlowManager
) -> None:
    tasks = [{"name": "flaky", "retries": 1, "backoff": 0.05}]
    body = definition(f"flaky-{uuid.uuid4().hex[:6]}", tasks, [], "flaky")
    execution = await run(client, flows, body)
    assert execution["status"] == "finished"
    (first, second) = execution["tasks"]
    assert (first["attempt"], first["status"]) == (1, "failed")
    assert "the first attempt always fails" in first["error"]
    assert (second["attempt"], second["status"], second["result"]) == (
        2,
        "completed",
        "ok on attempt 2",
    )


async def test_a_failure_outcome_follows_its_branch(
    client: httpx.AsyncClient, flows: FlowManager
) -> None:
    tasks = [{"name": "refuse"}, {"name": "cleanup"}]
    conditions = [
        {
            "name": "after_refuse",
            "source_task": "refuse",
            "outcome": "success",
            "target_task_success": "end",
            "target_task_failure": "cleanup",
        }
    ]
    body = definition(f"branch-{uuid.uuid4().hex[:6]}", tasks, conditions, "refuse")
    execution = await run(client, flows, body)
    assert execution["status"] == "finished"
    # A returned failure is the step's outcome: no retry, the failure branch is taken.
    assert attempts(execution) == [
        ("refuse", 1, "failed", {"status": "failure", "why": "refused"}),
        ("cleanup", 1, "completed", "cleaned up"),
    ]


async def test_a_bad_definition_is_a_422_listing_every_problem(client: httpx.AsyncClient) -> None:
    tasks = [{"name": "task1"}, {"name": "task1"}, {"name": "unknown-task"}]
    conditions = [
        {"name": "c", "source_task": "task1", "target_task_success": "nowhere"},
    ]
    body = definition("bad", tasks, conditions, "missing")
    response = await client.post("/api/v1/flows/execute", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_definition"
    problems = error["problems"]
    assert any("two tasks are called 'task1'" in p for p in problems)
    assert any("'nowhere'" in p for p in problems)
    assert any("start_task" in p for p in problems)
    assert any("no function for task 'unknown-task'" in p for p in problems)
    no_flow = await client.post("/api/v1/flows/execute", json={})
    assert no_flow.status_code == 422
    assert no_flow.json()["error"]["problems"] == ['the definition needs a "flow" object']
    not_an_object = await client.post("/api/v1/flows/execute", json=[1, 2])
    assert not_an_object.status_code == 400


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"inputs": {"rows": 21}}, "inputs: unknown field (the fields are flow, input, owner)"),
        ({"owner": 5}, "owner: Expected `str`, got `int`"),
        ({"owner": {"x": 1}}, "owner: Expected `str`, got `object`"),
        ({"owner": None}, "owner: Expected `str`, got `null`"),
        ({"definition": {}, "owner": ["a"]}, "definition: unknown field"),
    ],
)
async def test_a_body_with_another_field_or_an_owner_not_a_string_is_a_400(
    client: httpx.AsyncClient, extra: dict[str, Any], says: str
) -> None:
    flow_id = f"strict-{uuid.uuid4().hex[:6]}"
    head = (await client.get("/api/v1/head")).json()["rev"]
    response = await client.post(
        "/api/v1/flows/execute", json={**data_processing(flow_id), **extra}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "bad_request"
    assert error["message"].startswith("Validation failed for POST /api/v1/flows/execute: ")
    assert says in error["message"]
    if "owner" in extra and "definition" in extra:
        assert "owner: Expected `str`, got `array`" in error["message"], "every problem"
    assert (await client.get("/api/v1/head")).json()["rev"] == head, "nothing was written"
    runs = await client.get("/api/v1/flows/executions", params={"flow_id": flow_id})
    assert runs.json()["executions"] == []


async def test_unknown_executions_are_404(client: httpx.AsyncClient, flows: FlowManager) -> None:
    missing = await client.get("/api/v1/flows/executions/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "type": "not_found",
        "message": "no managed flow 'nothing-here'",
    }
    managed = await flows.create(controller="not-a-pipeline")
    other = await client.get(f"/api/v1/flows/executions/{managed.id}")
    assert other.status_code == 404
    assert "not a pipeline run" in other.json()["error"]["message"]
