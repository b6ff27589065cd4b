"""The inbox-triage example runs as its module docstring says."""

from __future__ import annotations

from pathlib import Path

import pytest

import flowstate as fs
from examples.inbox_triage import MESSAGES, triage
from flowstate.workflows import FlowManager

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


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
