"""``flowstate flows`` and ``flowstate flow``: managed flows from the shell."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import flowstate as fs
from flowstate.cli import main
from flowstate.workflows import FlowManager, StepObservation


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, list[str]]:
    """A store with three managed flows: finished (kate), running (kate), created (bob)."""
    url = f"sqlite:///{tmp_path}/flows.db"

    async def fill() -> list[str]:
        async with fs.Engine(url) as engine:
            flows = FlowManager(engine)
            done = await flows.create(controller="inbox", owner="kate", goal="triage")
            await flows.start(done.id)
            await flows.record_step(
                StepObservation(
                    flow_id=done.id,
                    run_id="run-1",
                    task="classify",
                    status="completed",
                    result={"spam": 3},
                )
            )
            await flows.finish(done.id, final={"summary": "3 spam"})
            busy = await flows.create_mirrored(controller="inbox", owner="kate")
            new = await flows.create(controller="billing", owner="bob")
            return [done.id, busy.id, new.id]

    return url, asyncio.run(fill())


def test_flows_lists_latest_versions(
    store: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, (done, busy, new) = store
    assert main(["flows", url, "--owner", "kate", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(f["id"], f["status"]) for f in listed] == [(done, "finished"), (busy, "running")]
    assert main(["flows", url, "--status", "running", "--json"]) == 0
    assert [f["id"] for f in json.loads(capsys.readouterr().out)] == [busy]
    assert main(["flows", url, "--controller", "billing"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["ID", "STATUS", "OWNER"]
    assert new in out
    assert busy not in out
    assert main(["flows", url, "--owner", "nobody"]) == 0
    assert "no managed flows match" in capsys.readouterr().out


def test_control_characters_are_shown_escaped_in_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/odd.db"

    async def fill() -> None:
        async with fs.Engine(url) as engine:
            await FlowManager(engine).create(controller="in\tbox", owner="kät\x1b", id="a\nb")

    asyncio.run(fill())
    assert main(["flows", url]) == 0
    _header, row = capsys.readouterr().out.splitlines()
    assert row.split()[:5] == ["a\\nb", "created", "kät\\x1b", "in\\tbox", "managed"]


def test_flow_shows_steps_and_events(
    store: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, (done, _, _) = store
    assert main(["flow", url, done]) == 0
    out = capsys.readouterr().out
    assert "status:        finished" in out
    assert '"summary":"3 spam"' in out
    assert "steps (1):" in out
    assert "classify" in out
    assert '{"spam":3}' in out
    assert "events (4):" in out
    for kind in ["created", "started", "step_observed", "finished"]:
        assert kind in out
    assert main(["flow", url, done, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["flow"]["id"] == done
    assert [e["kind"] for e in shown["events"]] == [
        "created",
        "started",
        "step_observed",
        "finished",
    ]
    assert [s["run_id"] for s in shown["steps"]] == ["run-1"]


def test_flow_of_an_unknown_id_is_one_line(
    store: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = store
    assert main(["flow", url, "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flowstate: error: ")
    assert err.count("\n") == 1
    assert "no managed flow 'nope'" in err
    assert main(["flows", url, "--status", "sleeping"]) == 2
