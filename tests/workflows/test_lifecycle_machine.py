"""Random calls of the FlowManager's methods against a plain model of the lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from attrs import define, field
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

import flowstate as fs
from flowstate.workflows import (
    AlreadyTerminalError,
    CancelPendingError,
    FlowManager,
    InvalidTransitionError,
)

T = TypeVar("T")

TERMINAL = {"finished", "failed", "cancelled"}
# The lifecycle, as the documentation states it: move -> (from statuses, to status).
MOVES = {
    "start": ({"created"}, "running"),
    "wait": ({"running"}, "waiting"),
    "resume": ({"waiting"}, "running"),
    "finish": ({"running"}, "finished"),
    "fail": ({"running", "waiting"}, "failed"),
    "cancel": ({"created", "running", "waiting"}, "cancelled"),
}

patches = st.dictionaries(st.sampled_from("abc"), st.integers(0, 9), max_size=2)


@define
class Model:
    status: str
    state: dict[str, Any]
    wait: dict[str, Any] | None = None
    current_step: str = ""
    cancel_requested: bool = False
    events: list[str] = field(factory=list)


class LifecycleMachine(RuleBasedStateMachine):
    url = "memory://"
    flows_ids = Bundle("flows")

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.engine = fs.Engine(self.url)
        self.run(self.engine.open())
        self.manager = FlowManager(self.engine)
        self.model: dict[str, Model] = {}

    def run(self, coro: Awaitable[T]) -> T:
        async def step() -> T:
            return await coro

        return self.runner.run(step())

    def teardown(self) -> None:
        try:
            self.run(self.engine.aclose())
        finally:
            self.runner.close()

    def expect(
        self, flow_id: str, move: str | None, *, refuse_if_cancel: bool = False
    ) -> type[Exception] | None:
        """The error the model says the call raises, or None."""
        model = self.model[flow_id]
        if model.status in TERMINAL:
            return AlreadyTerminalError
        if move is not None and model.status not in MOVES[move][0]:
            return InvalidTransitionError
        if refuse_if_cancel and model.cancel_requested:
            return CancelPendingError
        return None

    def check(self, call: Callable[[], Awaitable[Any]], error: type[Exception] | None) -> bool:
        """Run the call; True when it succeeded, as the model expected."""
        if error is None:
            self.run(call())
            return True
        with pytest.raises(error):
            self.run(call())
        return False

    @rule(target=flows_ids, mirrored=st.booleans(), state=patches)
    def create(self, mirrored: bool, state: dict[str, int]) -> str:
        make = self.manager.create_mirrored if mirrored else self.manager.create
        flow = self.run(make(controller="machine", state=state))
        self.model[flow.id] = Model(
            status="running" if mirrored else "created", state=dict(state), events=["created"]
        )
        return flow.id

    @rule(flow_id=flows_ids)
    def start(self, flow_id: str) -> None:
        if self.check(lambda: self.manager.start(flow_id), self.expect(flow_id, "start")):
            self.model[flow_id].status = "running"
            self.model[flow_id].events.append("started")

    @rule(flow_id=flows_ids, kind=st.sampled_from(["approval", "input"]))
    def wait(self, flow_id: str, kind: str) -> None:
        wait = {"kind": kind}
        if self.check(lambda: self.manager.wait(flow_id, wait), self.expect(flow_id, "wait")):
            model = self.model[flow_id]
            model.status, model.wait = "waiting", wait
            model.events.append("waiting")

    @rule(flow_id=flows_ids, patch=st.none() | patches)
    def resume(self, flow_id: str, patch: dict[str, int] | None) -> None:
        error = self.expect(flow_id, "resume")
        if self.check(lambda: self.manager.resume(flow_id, patch), error):
            model = self.model[flow_id]
            model.status, model.wait = "running", None
            model.state.update(patch or {})
            model.events.append("resumed")

    @rule(flow_id=flows_ids, final=st.none() | patches)
    def finish(self, flow_id: str, final: dict[str, int] | None) -> None:
        error = self.expect(flow_id, "finish", refuse_if_cancel=True)
        if self.check(lambda: self.manager.finish(flow_id, final), error):
            model = self.model[flow_id]
            model.status = "finished"
            model.state.update(final or {})
            model.events.append("finished")

    @rule(flow_id=flows_ids)
    def fail(self, flow_id: str) -> None:
        if self.check(lambda: self.manager.fail(flow_id, "broken"), self.expect(flow_id, "fail")):
            model = self.model[flow_id]
            model.status, model.wait = "failed", None
            model.state["failure"] = "stamped"
            model.events.append("failed")

    @rule(flow_id=flows_ids)
    def cancel(self, flow_id: str) -> None:
        if self.check(lambda: self.manager.cancel(flow_id), self.expect(flow_id, "cancel")):
            model = self.model[flow_id]
            model.status, model.wait = "cancelled", None
            model.events.append("cancelled")

    @rule(flow_id=flows_ids)
    def request_cancel(self, flow_id: str) -> None:
        error = self.expect(flow_id, None)
        if self.check(lambda: self.manager.request_cancel(flow_id), error):
            model = self.model[flow_id]
            if not model.cancel_requested:
                model.cancel_requested = True
                model.events.append("cancel_requested")

    @rule(flow_id=flows_ids, patch=patches, step=st.none() | st.sampled_from(["one", "two"]))
    def update_state(self, flow_id: str, patch: dict[str, int], step: str | None) -> None:
        error = self.expect(flow_id, None, refuse_if_cancel=True)
        if self.check(lambda: self.manager.update_state(flow_id, patch, step), error):
            model = self.model[flow_id]
            model.state.update(patch)
            model.current_step = step if step is not None else model.current_step
            model.events.append("state_updated")

    @invariant()
    def flows_match_the_model(self) -> None:
        for flow_id, model in self.model.items():
            flow = self.run(self.manager.get(flow_id))
            state = dict(flow.state)
            if "failure" in state:
                assert state["failure"]["reason"] == "broken"
                state["failure"] = "stamped"
            assert (flow.status, state, flow.wait, flow.current_step, flow.cancel_requested) == (
                model.status,
                model.state,
                model.wait,
                model.current_step,
                model.cancel_requested,
            )
            events = self.run(self.manager.events(flow_id))
            assert [e.kind for e in events] == model.events
        listed = self.run(self.manager.list(status="running"))
        assert sorted(f.id for f in listed) == sorted(
            i for i, m in self.model.items() if m.status == "running"
        )


def run_machine(url: str, examples: int) -> None:
    class Machine(LifecycleMachine):
        pass

    Machine.url = url
    Machine.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    Machine.TestCase().runTest()


@pytest.mark.slow
def test_lifecycle_matches_the_model_in_memory() -> None:
    run_machine("memory://", 60)


@pytest.mark.slow
def test_lifecycle_matches_the_model_on_sqlite(tmp_path: Path) -> None:
    counter = iter(range(10**6))

    class Machine(LifecycleMachine):
        def __init__(self) -> None:
            type(self).url = f"sqlite:///{tmp_path}/machine-{next(counter)}.db"
            super().__init__()

    Machine.TestCase.settings = settings(
        max_examples=15,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    Machine.TestCase().runTest()
