"""Test a pipeline's branching with scripted step outcomes, without the services it calls.

:class:`Script` stands in for a step function and plays one outcome per attempt: an output, a
:func:`failure` (a business outcome that follows the failure branch), :func:`error` (an
exception, retried), or :data:`TIMEOUT` (the attempt hangs until its step's timeout).
:func:`run_pipeline` runs one run in memory, with backoffs cut to nothing and scripted timeouts
cut short, and returns what happened::

    from flowstate.testing.pipelines import TIMEOUT, Script, error, failure, run_pipeline

    def test_payment_retries_then_refunds():
        result = run_pipeline(
            payment,
            scripts={
                "charge": Script(error("gateway down"), error("gateway down"), {"id": "ch_1"}),
                "ship": Script(failure(reason="no stock")),
            },
        )
        assert result.status == "finished"
        assert result.attempts == {"charge": 3, "ship": 1, "refund": 1}

Steps without a script run their own function. ``run_pipeline`` runs in an event loop of its
own: call it from plain (not async) tests. To look for the faults that break a pipeline,
explore its runs with :func:`flowstate.testing.flows.explore`, giving it
``flowstate.workflows.workflow_flows(pipeline)`` as flows and runs made by
``flowstate.workflows.new_run``.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any, Final

import attrs
from attrs import frozen

import flowstate as fs
from flowstate.workflows import (
    FlowEvent,
    FlowManager,
    FlowStep,
    ManagedFlow,
    Pipeline,
    StepContext,
)
from flowstate.workflows._model import events_of, is_flow

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flowstate.testing.flows import Outcome

__all__ = [
    "TIMEOUT",
    "RunResult",
    "Script",
    "ScriptedError",
    "error",
    "failure",
    "run_pipeline",
    "steps_complete_once",
]

#: A scripted attempt that hangs until its step's timeout cancels it.
TIMEOUT: Final = object()
#: How long a scripted TIMEOUT attempt hangs: the step's timeout, cut to this.
SHORT_TIMEOUT: Final = 0.01


class ScriptedError(Exception):
    """The exception a scripted :func:`error` attempt raises."""


def error(message: str = "scripted error") -> ScriptedError:
    """An attempt that raises (an error: retried while the step has retries left)."""
    return ScriptedError(message)


def failure(**details: Any) -> dict[str, Any]:
    """An attempt that returns ``{"status": "failure", **details}`` (follows the failure
    branch, without retry)."""
    return {"status": "failure", **details}


class Script:
    """A step function that plays ``outcomes``, one per attempt; the last one repeats.

    Each outcome is an output (returned), :func:`failure` (returned), an exception such as
    :func:`error` (raised) or :data:`TIMEOUT` (hangs until cancelled).

    Attributes:
        calls: The context of every attempt, in order.
    """

    def __init__(self, *outcomes: Any) -> None:
        if not outcomes:
            raise ValueError("a Script needs at least one outcome")
        self.outcomes = outcomes
        self.calls: list[StepContext] = []

    def __repr__(self) -> str:
        return f"Script{self.outcomes!r}"

    @property
    def times_out(self) -> bool:
        return any(outcome is TIMEOUT for outcome in self.outcomes)

    async def __call__(self, step: StepContext) -> Any:
        self.calls.append(step)
        outcome = self.outcomes[min(len(self.calls), len(self.outcomes)) - 1]
        if outcome is TIMEOUT:
            await asyncio.Event().wait()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@frozen
class RunResult:
    """What :func:`run_pipeline` saw.

    Attributes:
        flow: The run at its end.
        steps: Every attempt of every step, as step records.
        events: The run's audit trail.
        attempts: How many attempts each step had, by step id.
    """

    flow: ManagedFlow
    steps: list[FlowStep]
    events: list[FlowEvent]
    attempts: dict[str, int]

    @property
    def status(self) -> str:
        """The run's final status."""
        return str(self.flow.status)

    @property
    def outputs(self) -> dict[str, Any]:
        """The outputs of the steps that ended with one, by step id."""
        outputs: dict[str, Any] = self.flow.state.get("outputs", {})
        return outputs

    @property
    def path(self) -> list[str]:
        """The steps the run went through, in order (a step retried appears once)."""
        seen: list[str] = []
        for step in self.steps:
            if not seen or seen[-1] != step.task:
                seen.append(step.task)
        return seen


def run_pipeline(
    pipeline: Pipeline,
    *,
    scripts: Mapping[str, Script] | None = None,
    input: Any = None,
    timeout: float = 30.0,
) -> RunResult:
    """Run one run of ``pipeline`` to its end in memory, with ``scripts`` standing in for
    the functions of the steps they name; return what happened.

    Backoffs are cut to nothing; a step whose script times out gets a very short timeout.

    Raises:
        ValueError: A script names no step of the pipeline, or times out a step that has
            no timeout (it would hang).
        DefinitionError: The pipeline has problems.
        TimeoutError: The run did not end within ``timeout`` seconds.
    """
    return asyncio.run(_run(_scripted(pipeline, dict(scripts or {})), input, within=timeout))


def _scripted(pipeline: Pipeline, scripts: dict[str, Script]) -> Pipeline:
    ids = {step.id for step in pipeline.steps}
    unknown = sorted(set(scripts) - ids)
    if unknown:
        raise ValueError(f"scripts for steps that {pipeline.id!r} does not have: {unknown}")
    copy = Pipeline(pipeline.id, name=pipeline.name, start=pipeline.start)
    for step in pipeline.steps:
        changes: dict[str, Any] = {"backoff": 0, "max_backoff": 0}
        script = scripts.get(step.id)
        if script is not None:
            changes["fn"] = script
            if script.times_out:
                if step.timeout is None:
                    raise ValueError(f"step {step.id!r} has no timeout: a TIMEOUT would hang")
                changes["timeout"] = min(step.timeout, SHORT_TIMEOUT)
        copy.add_step(attrs.evolve(step, **changes))
    return copy


def steps_complete_once(outcome: Outcome[Any]) -> None:
    """An invariant for :func:`flowstate.testing.flows.explore`: no step of any pipeline run
    was committed as completed twice, and every run that ended ended through its pipeline
    (finished, failed or cancelled), not by the recoverer's force-end."""
    completed: collections.Counter[tuple[str, str]] = collections.Counter()
    for state in outcome.history:
        if is_flow(state):
            for event in events_of(state):
                if event.kind == "step_completed":
                    completed[(state.id, event.payload["step"])] += 1
    twice = [f"{run!r} step {step!r}" for (run, step), n in completed.items() if n > 1]
    assert not twice, "completed more than once: " + ", ".join(twice)
    for state_id, state in outcome.states.items():
        if is_flow(state) and state.is_ended:
            status = state.labels.get("flow.status")
            assert status in ("finished", "failed", "cancelled"), (
                f"run {state_id!r} ended with status {status!r}"
            )


async def _run(pipeline: Pipeline, input: Any, *, within: float) -> RunResult:
    async with fs.Engine("memory://") as engine:
        flows = FlowManager(engine)
        flows.register(pipeline)
        run = await flows.execute(pipeline.id, input=input)
        done = await flows.result(run.id, timeout=within)
        steps = await flows.steps(run.id)
        events = await flows.events(run.id)
    attempts = collections.Counter(step.task for step in steps)
    return RunResult(flow=done, steps=steps, events=events, attempts=dict(attempts))
