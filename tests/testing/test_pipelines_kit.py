"""The pipeline test kit: scripted outcomes, and explore() on pipeline runs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st

from flowstate.testing.flows import explore
from flowstate.testing.pipelines import (
    TIMEOUT,
    Script,
    error,
    failure,
    run_pipeline,
    steps_complete_once,
)
from flowstate.workflows import Pipeline, Step, StepContext, new_run, workflow_flows


async def real(step: StepContext) -> Any:
    raise AssertionError("a scripted test never calls the real service")


PAYMENT = (
    Pipeline("payment")
    .add_step(Step("charge", real, retries=2, backoff=5, timeout=10))
    .add_step(Step("ship", real, on_failure="refund", on_success="end"))
    .add_step(Step("refund", real))
)


def test_fail_twice_then_succeed() -> None:
    charge = Script(error("gateway down"), error("gateway down"), {"id": "ch_1"})
    result = run_pipeline(PAYMENT, scripts={"charge": charge, "ship": Script({"ok": True})})
    assert result.status == "finished"
    assert result.attempts == {"charge": 3, "ship": 1}
    assert [c.attempt for c in charge.calls] == [1, 2, 3]
    assert result.outputs == {"charge": {"id": "ch_1"}, "ship": {"ok": True}}
    assert result.path == ["charge", "ship"]
    assert [s.error for s in result.steps][:2] == ["ScriptedError: gateway down"] * 2


def test_a_failure_outcome_takes_the_failure_branch() -> None:
    result = run_pipeline(
        PAYMENT,
        scripts={
            "charge": Script({"id": "ch_1"}),
            "ship": Script(failure(reason="no stock")),
            "refund": Script("refunded"),
        },
    )
    assert result.status == "finished"
    assert result.path == ["charge", "ship", "refund"]
    assert result.outputs["ship"] == {"status": "failure", "reason": "no stock"}


def test_timeouts_and_exhausted_retries() -> None:
    result = run_pipeline(PAYMENT, scripts={"charge": Script(TIMEOUT)})
    assert result.status == "failed"
    assert result.attempts == {"charge": 3}
    assert all("timed out" in (s.error or "") for s in result.steps)
    assert "'charge' failed after 3 attempts" in result.flow.state["failure"]["reason"]


def test_scripts_are_checked() -> None:
    with pytest.raises(ValueError, match="does not have"):
        run_pipeline(PAYMENT, scripts={"nope": Script(1)})
    with pytest.raises(ValueError, match="no timeout"):
        run_pipeline(PAYMENT, scripts={"ship": Script(TIMEOUT)})
    with pytest.raises(ValueError, match="at least one"):
        Script()


async def echo(step: StepContext) -> Any:
    return step.step_id


EXPLORED = Pipeline("explored")
for _name in ("a", "b", "c"):
    EXPLORED.add_step(Step(_name, echo, retries=2, backoff=0))

runs = st.builds(lambda n: new_run(EXPLORED, id=f"run-{n}"), st.integers(min_value=1, max_value=3))


@pytest.mark.slow
def test_explore_finds_no_step_completed_twice() -> None:
    explore(
        workflow_flows(EXPLORED),
        states=runs,
        invariants=[steps_complete_once],
        settings=settings(max_examples=30, deadline=None),
    )
