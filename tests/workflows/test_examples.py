"""The inbox-triage example runs as its module docstring says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import flowstate as fs
from examples.inbox_triage import MESSAGES, triage
from flowstate.workflows import FlowManager
from tests.processes import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.anyio
async def test_inbox_triage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/triage.db"
    flow = await triage(url)
    assert flow.status == "finished"
    assert flow.state == {
        "messages": len(MESSAGES),
        "processed": len(MESSAGES),
        "spam": [1, 3],
        "approved_by": "kate",
        "archived": 2,
    }
    async with fs.Engine(url) as engine:
        flows = FlowManager(engine)
        (step,) = await flows.steps(flow.id)
        events = await flows.events(flow.id)
    assert (step.task, step.status, step.child_session_key) == (
        "classify",
        "completed",
        f"classifier/{flow.id}",
    )
    assert [e.kind for e in events] == [
        "created",
        "started",
        "step_observed",
        "step_observed",
        "state_updated",
        "waiting",
        "resumed",
        "finished",
    ]


@pytest.mark.anyio
async def test_payment_pipeline(tmp_path: Path) -> None:
    from examples.payment_pipeline import Gateway, make_pipeline

    gateway = Gateway(stock={"book"})
    async with fs.Engine(f"sqlite:///{tmp_path}/pay.db") as engine:
        flows = FlowManager(engine)
        flows.register(make_pipeline(gateway))
        done = []
        for sku in ("book", "lamp"):  # one after the other: the gateway fails its first calls
            run = await flows.execute("stripe_payment_request", input={"sku": sku})
            done.append(await flows.result(run.id, timeout=30))
        lamp = done[1]
        paths = [[(s.task, s.status) for s in await flows.steps(run.id)] for run in done]
    assert [run.status for run in done] == ["finished", "finished"]
    assert paths[0] == [
        ("stripe_config", "failed"),
        ("stripe_config", "failed"),
        ("stripe_config", "completed"),
        ("stripe_config_confirm", "completed"),
        ("create_product", "completed"),
    ]
    assert paths[1][-2:] == [("create_product", "failed"), ("refund", "completed")]
    assert gateway.refunds == [lamp.id]


def test_the_data_flow_runs_from_the_shell(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowstate",
            "run",
            "examples/data_flow.json",
            f"sqlite:///{tmp_path}/data.db",
            "--tasks",
            "examples.data_flow:TASKS",
            "--input",
            '{"rows": [5, 4]}',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '{"status":"success","stored":2}' in result.stdout
    assert result.stdout.splitlines()[-1].endswith("finished")
