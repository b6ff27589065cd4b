"""The server's RunAdopter in one process, on every driver: the runs running when it starts
make their pipelines runnable here, or are refused once with the reason logged."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

import flowstate as fs
from flowstate.drivers.base import Driver
from flowstate.server._adopt import RunAdopter
from flowstate.workflows import FlowManager, Pipeline, Step, StepContext

pytestmark = pytest.mark.anyio


async def noop(step: StepContext) -> None:
    return None


def definition(flow_id: str, *tasks: str) -> dict[str, Any]:
    return {"flow": {"id": flow_id, "start_task": tasks[0], "tasks": [{"name": t} for t in tasks]}}


async def test_runs_running_at_start_are_adopted_or_refused_once(
    new_driver: Callable[[], Driver], caplog: pytest.LogCaptureFixture
) -> None:
    everything = {"a": noop, "b": noop, "c": noop}
    async with fs.Engine(new_driver()) as poster:
        flows = FlowManager(poster)
        flows.register(Pipeline.from_definition(definition("posted", "a", "b"), tasks=everything))
        flows.register(Pipeline.from_definition(definition("lacking", "c"), tasks=everything))
        flows.register(Pipeline("built").add_step(Step("only", noop)))
        posted = await flows.execute("posted", enqueue=True)
        lacking = await flows.execute("lacking", enqueue=True)
        built = await flows.execute("built", enqueue=True)
        async with fs.Engine(new_driver()) as server:
            caplog.set_level(logging.INFO, logger="flowstate.server")
            async with RunAdopter(server, {"a": noop, "b": noop}) as adopter:
                assert FlowManager(server).pipeline("posted").id == "posted"
                for other in ("lacking", "built"):
                    with pytest.raises(fs.FlowNotFoundError):
                        FlowManager(server).pipeline(other)
                assert set(adopter._refused) == {lacking.id, built.id}
                # Later versions of a refused run are not read again.
                await adopter._adopt((await server.get_state(lacking.id)).committed)
            messages = [r.getMessage() for r in caplog.records]
    assert sum(lacking.id in m and "cannot run" in m for m in messages) == 1
    assert any(built.id in m and "no pipeline definition" in m for m in messages)
    assert any(f"adopted with {posted.id!r}" in m for m in messages)
