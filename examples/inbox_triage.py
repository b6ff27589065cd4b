"""An inbox-triage agent as a managed flow: a step observed from another process, a wait for
a person's approval, and the audit trail that shows all of it.

The agent (this process) creates a flow and starts it. A classifier runs in a process of its
own and reports its work as steps of the flow (``record_step``), through the same store. The
agent waits for the classification, then waits for approval before it archives the spam;
the approver (here, a task of this process; in real life a web page or a chat button) resumes
the flow with its decision, and the agent finishes it.

Run ``python -m examples.inbox_triage [sqlite:///triage.db]``; then look at the flow with
``flowstate flow sqlite:///triage.db <id>``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import flowstate as fs
from flowstate.workflows import FlowManager, ManagedFlow, StepObservation

__all__ = ["classify", "main", "triage"]

#: Where ``python -m examples.inbox_triage`` finds this module, for the classifier process.
CHECKOUT = Path(__file__).resolve().parent.parent

MESSAGES = [
    "Quarterly report attached",
    "You won a prize!!!",
    "Lunch on Friday?",
    "Cheap watches, act now",
]


async def classify(url: str, flow_id: str) -> None:
    """The classifier process: label each message, reporting its progress as a step."""
    async with fs.Engine(url) as engine:
        flows = FlowManager(engine)
        step = StepObservation(
            flow_id=flow_id,
            run_id="classify-1",
            task="classify",
            status="running",
            child_session_key=f"classifier/{flow_id}",
        )
        await flows.record_step(step)
        spam = [i for i, text in enumerate(MESSAGES) if "!!!" in text or "act now" in text]
        await flows.record_step(
            StepObservation(
                flow_id=flow_id,
                run_id="classify-1",
                task="classify",
                status="completed",
                result={"spam": spam},
            )
        )


async def _step_done(flows: FlowManager, flow: ManagedFlow, run_id: str) -> None:
    """Wait until the flow's step ``run_id`` completed (each report is a flow version)."""
    async with flows.watch(id=flow.id, since_rev=flow.revision) as versions:
        async for _ in versions:
            steps = {step.run_id: step for step in await flows.steps(flow.id)}
            if run_id in steps and steps[run_id].status == "completed":
                return


async def _approver(flows: FlowManager, flow: ManagedFlow) -> None:
    """The person: approves the flow once it waits for approval."""
    async with flows.watch(id=flow.id, status="waiting", since_rev=flow.revision) as waiting:
        async for version in waiting:
            if version.wait is not None and version.wait["kind"] == "approval":
                await flows.resume(flow.id, patch={"approved_by": "kate"})
                return


async def triage(url: str) -> ManagedFlow:
    """Run one triage from start to finish; return the finished flow."""
    async with fs.Engine(url) as engine:
        flows = FlowManager(engine)
        flow = await flows.create(
            controller="kate/inbox",
            goal="triage inbox",
            owner="agent:kate",
            origin="user-1",
            current_step="classify",
            state={"messages": len(MESSAGES), "processed": 0},
        )
        flow = await flows.start(flow.id)
        classifier = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.inbox_triage",
            "--classify",
            url,
            flow.id,
            cwd=CHECKOUT,
        )
        await _step_done(flows, flow, "classify-1")
        if await classifier.wait() != 0:
            raise RuntimeError("the classifier process failed")
        (step,) = await flows.steps(flow.id)
        spam = step.result["spam"]
        flow = await flows.update_state(
            flow.id, {"processed": len(MESSAGES), "spam": spam}, next_step="archive spam"
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(_approver(flows, flow))
            flow = await flows.wait(flow.id, {"kind": "approval", "question": "archive spam?"})
        flow = await flows.get(flow.id)
        return await flows.finish(flow.id, final={"archived": len(spam)})


async def main(url: str) -> None:
    flow = await triage(url)
    async with fs.Engine(url) as engine:
        flows = FlowManager(engine)
        for event in await flows.events(flow.id):
            print(f"{event.kind:<14} {event.status:<9} {event.payload}")
    print(f"finished: {flow.state}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--classify"]:
        asyncio.run(classify(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///triage.db"))
