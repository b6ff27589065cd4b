"""Pipelines: step graphs with timeouts, retries and success/failure branching.

One model, two front doors: the fluent builder (``Pipeline(id).add_step(Step(...))``) and
JSON definitions in the flow-manager microservice format (``Pipeline.from_definition``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeAlias

import msgspec
from attrs import field, frozen

import flowstate as fs
from flowstate.errors import DefinitionError

__all__ = ["END", "Pipeline", "Step", "StepContext", "StepFn"]

#: The branch target that finishes the run.
END: Final = "end"
#: Where a pipeline's runs rest their transition: the flow id its executor is registered under.
FLOW_PREFIX: Final = "flowstate.pipeline."


def latest_key(pipeline_id: str) -> str:
    """The key under which an engine's flows hold the executor of the pipeline that new runs
    of ``pipeline_id`` start with (the last one registered). No run ever runs at it: a
    pipeline built in Python runs at ``flowstate.pipeline.<id>``, one built from a JSON
    definition at ``flowstate.pipeline.<id>@<digest>``."""
    return f"{FLOW_PREFIX}{pipeline_id}@"


#: Why a pipeline id has no ``@``: it ends the id in the flow ids of its runs.
NO_AT: Final = "it separates the id from the definition's digest in the flow ids of runs"

#: Timeouts and backoffs are shorter than this many seconds.
MAX_SECONDS: Final = 1e9


@frozen(kw_only=True)
class StepContext:
    """What a step function gets.

    Attributes:
        run_id: The run's id (its managed flow's id).
        step_id: The step's id.
        attempt: Which attempt this is, from 1 (retries and recoveries count).
        input: The run's input.
        outputs: The outputs of the run's completed steps, by step id.
        state: The run's state (``{"input": ..., "outputs": {...}}``).
    """

    run_id: str
    step_id: str
    attempt: int
    input: Any
    outputs: dict[str, Any]
    state: dict[str, Any]


StepFn: TypeAlias = Callable[[StepContext], Awaitable[Any]]
"""A step: ``async def fn(step: StepContext) -> output`` (the output is JSON)."""


async def _missing(step: StepContext) -> None:
    """Stands in for a task's missing function while a definition's problems are listed."""


@frozen
class Step:
    """One step of a pipeline.

    Args:
        id: The step's id, unique in its pipeline (``"end"`` is reserved).
        fn: ``async def fn(step: StepContext) -> output``.
        timeout: Seconds an attempt may take; it is cancelled after that (an error). None:
            no limit.
        retries: How many more attempts an error (an exception or a timeout) gets. An
            attempt whose process stopped does not count: the recoverer runs the step again.
        backoff: Seconds before the first retry; each further retry waits twice as long as
            the one before, up to ``max_backoff``.
        max_backoff: The longest wait between two attempts.
        on_success: Where the run goes when the step succeeds: None, the next step (the run
            finishes after the last); a step id; or ``"end"`` (finish the run).
        on_failure: Where it goes when the step fails (returned ``{"status": "failure"}``,
            or errors outlived its retries): None fails the run; a step id; or ``"end"``.
    """

    id: str
    fn: StepFn
    timeout: float | None = field(default=None, kw_only=True)
    retries: int = field(default=0, kw_only=True)
    backoff: float = field(default=1.0, kw_only=True)
    max_backoff: float = field(default=30.0, kw_only=True)
    on_success: str | None = field(default=None, kw_only=True)
    on_failure: str | None = field(default=None, kw_only=True)

    def problems(self) -> list[str]:
        """What is wrong with this step on its own (empty when nothing is)."""
        # Checked as plain objects: callers may pass anything, whatever the annotations say.
        step_id: object = self.id
        found = []
        where = f"step {step_id!r}"
        if not isinstance(step_id, str) or not step_id:
            found.append(f"a step id must be a non-empty string, not {step_id!r}")
        elif step_id == END:
            found.append(f"{END!r} is reserved (it finishes the run) and cannot name a step")
        fn: object = self.fn
        if not callable(fn):
            found.append(f"{where}: its function is not callable ({fn!r})")
        numbers: tuple[tuple[str, object, bool], ...] = (
            ("timeout", self.timeout, True),
            ("backoff", self.backoff, False),
            ("max_backoff", self.max_backoff, False),
        )
        for name, value, is_timeout in numbers:
            if value is None and is_timeout:
                continue
            # Below 1e9 s (31 years): a retry's due time must stay a datetime.
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (0 <= value < MAX_SECONDS)
                or (is_timeout and value == 0)
            ):
                low = "> 0" if is_timeout else ">= 0"
                found.append(
                    f"{where}: {name} must be a number of seconds {low} and < 1e9, not {value!r}"
                )
        retries: object = self.retries
        if type(retries) is not int or retries < 0:
            found.append(f"{where}: retries must be an int >= 0, not {retries!r}")
        targets: tuple[tuple[str, object], ...] = (
            ("on_success", self.on_success),
            ("on_failure", self.on_failure),
        )
        for name, target in targets:
            if target is not None and (not isinstance(target, str) or not target):
                found.append(f"{where}: {name} must be a step id or {END!r}, not {target!r}")
        return found

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` before the next one."""
        try:
            wait = math.ldexp(float(self.backoff), attempt - 1)  # backoff * 2 ** (attempt - 1)
        except OverflowError:
            wait = math.inf  # far past any cap (a step with more than a thousand retries)
        return float(min(wait, self.max_backoff))


class Pipeline:
    """A graph of steps that a managed flow (a *run*) walks, one step at a time.

    Build it step by step (``Pipeline("pay").add_step(Step(...)).add_step(...)``) or from a
    JSON definition (:meth:`from_definition`); register it with
    :meth:`FlowManager.register <flowstate.workflows.FlowManager.register>` in every process
    that runs its steps.

    Args:
        id: The pipeline's id.
        name: What it does, in words (the runs' goal).
        start: The first step's id; by default the first step added.
    """

    def __init__(self, id: str, *, name: str = "", start: str | None = None) -> None:
        given: object = id
        if not isinstance(given, str) or not given:
            raise fs.InvalidCommandError(f"a pipeline id must be a non-empty string, not {id!r}")
        if "@" in id:
            raise fs.InvalidCommandError(f"a pipeline id cannot contain '@' ({NO_AT}): {id!r}")
        self.id = id
        self.name = name or id
        self._start = start
        self._problems: list[str] = []
        named: object = name
        if not isinstance(named, str):
            self._problems.append(f"a pipeline's name must be a string, not {name!r}")
            self.name = id
        self._steps: dict[str, Step] = {}
        self._order: list[Step] = []
        # The step each step's success goes to when it names none: the one added after it.
        self._following: dict[str, str] = {}
        #: The JSON definition the pipeline was built from, if it was.
        self.definition: dict[str, Any] | None = None
        self._digest = ""  # of the definition: two definitions of one id run side by side

    def __repr__(self) -> str:
        return f"Pipeline({self.id!r}, steps={[s.id for s in self._order]!r})"

    @property
    def flow_id(self) -> str:
        """The flow id its runs' transitions point at (their executor's):
        ``flowstate.pipeline.<id>``, and for a pipeline built from a JSON definition
        ``@<digest of the definition>`` after it, so that each run goes on with the
        definition it was started with when another one is posted under the same id."""
        if self._digest:
            return latest_key(self.id) + self._digest
        return FLOW_PREFIX + self.id

    @property
    def steps(self) -> tuple[Step, ...]:
        """The steps, in the order they were added."""
        return tuple(self._order)

    @property
    def start(self) -> str:
        """The id of the step a run starts at.

        Raises:
            DefinitionError: The pipeline has no steps.
        """
        if self._start is not None:
            return self._start
        if not self._order:
            raise DefinitionError([f"pipeline {self.id!r} has no steps"])
        return self._order[0].id

    def step(self, step_id: str) -> Step:
        """The step with this id.

        Raises:
            NotFoundError: No step has it.
        """
        try:
            return self._steps[step_id]
        except KeyError:
            raise fs.NotFoundError(f"pipeline {self.id!r} has no step {step_id!r}") from None

    def add_step(self, step: Step) -> Pipeline:
        """Add a step after the others; returns the pipeline, so calls chain.

        Problems (a duplicate id, a negative timeout...) are collected and reported together
        by :meth:`validate`, which registering the pipeline calls.
        """
        given: object = step
        if not isinstance(given, Step):
            self._problems.append(f"add_step takes a Step, not {type(given).__name__}")
            return self
        self._problems += step.problems()
        if step.id in self._steps:
            self._problems.append(f"two steps are called {step.id!r}")
        else:
            self._steps[step.id] = step
        if self._order:
            self._following.setdefault(self._order[-1].id, step.id)
        self._order.append(step)
        return self

    def next_of(self, step_id: str, outcome: str) -> str:
        """Where a run goes after ``step_id`` ends with ``outcome`` (``success`` or ``failure``):
        a step id, ``"end"``, or ``""`` when the failure has no branch (the run fails)."""
        step = self._steps[step_id]
        if outcome == "success":
            if step.on_success is not None:
                return step.on_success
            return self._following.get(step_id, END)
        return "" if step.on_failure is None else step.on_failure

    def problems(self) -> list[str]:
        """Everything wrong with the pipeline (empty when nothing is)."""
        found = list(self._problems)
        if not self._order:
            found.append(f"pipeline {self.id!r} has no steps")
        if self._start is not None and self._start not in self._steps:
            found.append(f"the start step {self._start!r} is not a step")
        for step in self._order:
            for name, target in (("on_success", step.on_success), ("on_failure", step.on_failure)):
                if isinstance(target, str) and target not in (END, "", *self._steps):
                    found.append(
                        f"step {step.id!r}: {name} leads to {target!r}, which is not a step"
                    )
        return found

    def validate(self) -> None:
        """Raise one ``DefinitionError`` listing every problem, if there is any."""
        found = self.problems()
        if found:
            raise DefinitionError(found)

    @classmethod
    def from_definition(
        cls, definition: str | bytes | Mapping[str, Any], *, tasks: Mapping[str, StepFn]
    ) -> Pipeline:
        """Build a pipeline from a JSON definition in the flow-manager microservice format.

        ::

            {"flow": {"id": "flow123", "name": "Data processing flow", "start_task": "task1",
              "tasks": [{"name": "task1", "description": "Fetch data"}, ...],
              "conditions": [{"name": "c1", "source_task": "task1", "outcome": "success",
                              "target_task_success": "task2", "target_task_failure": "end"}]}}

        Each task is a step, run by ``tasks[name]``; tasks may add ``"timeout"`` (seconds),
        ``"retries"``, ``"backoff"`` and ``"max_backoff"``. A condition on a task says where
        the run goes after it: to ``target_task_success`` when the task's outcome equals the
        condition's ``outcome`` (``"success"``, the default, or ``"failure"``), else to
        ``target_task_failure``; ``"end"`` finishes the run. A task with no condition ends
        the run after it (and fails it when the task fails).

        Raises:
            DefinitionError: The definition has problems; it lists every one of them.
        """
        problems: list[str] = []
        raw: object = definition
        try:
            # As JSON text, whatever it came as: a mapping is copied, and text that is not
            # valid Unicode (a lone surrogate, bytes that are not UTF-8) is a problem here.
            if not isinstance(raw, str | bytes):
                raw = msgspec.json.encode(raw)
            raw = msgspec.json.decode(raw)
        except (msgspec.DecodeError, msgspec.EncodeError, TypeError, UnicodeError) as exc:
            raise DefinitionError([f"the definition is not JSON: {exc}"]) from None
        if not isinstance(raw, Mapping):
            raise DefinitionError(["the definition must be a JSON object"])
        flow = raw.get("flow")
        if not isinstance(flow, Mapping):
            raise DefinitionError(['the definition needs a "flow" object'])
        given: object = tasks  # callers may pass anything, whatever the annotation says
        functions = given if isinstance(given, Mapping) else None
        if functions is None:
            problems.append("tasks must map task names to step functions")
        pipeline_id = flow.get("id")
        if not isinstance(pipeline_id, str) or not pipeline_id:
            problems.append('"flow.id" must be a non-empty string')
            pipeline_id = "?"
        elif "@" in pipeline_id:
            problems.append(f"\"flow.id\" cannot contain '@' ({NO_AT}): {pipeline_id!r}")
            pipeline_id = "?"
        name = flow.get("name", "")
        if not isinstance(name, str):
            problems.append('"flow.name" must be a string')
            name = ""
        raw_tasks = flow.get("tasks")
        if not isinstance(raw_tasks, list) or not raw_tasks:
            problems.append('"flow.tasks" must be a non-empty list')
            raw_tasks = []
        names: list[str] = []
        for n, task in enumerate(raw_tasks):
            task_name = task.get("name") if isinstance(task, Mapping) else None
            if not isinstance(task_name, str) or not task_name:
                problems.append(f"task #{n + 1} needs a non-empty string name")
                continue
            if task_name in names:
                problems.append(f"two tasks are called {task_name!r}")
                continue
            names.append(task_name)
        raw_conditions = flow.get("conditions", [])
        if not isinstance(raw_conditions, list):
            problems.append('"flow.conditions" must be a list')
            raw_conditions = []
        branches: dict[str, tuple[Any, Any]] = {}
        for n, condition in enumerate(raw_conditions):
            where = f"condition #{n + 1}"
            if not isinstance(condition, Mapping):
                problems.append(f"{where} must be an object")
                continue
            if isinstance(condition.get("name"), str):
                where = f"condition {condition['name']!r}"
            # Every part is checked, whatever is wrong with the others.
            source = condition.get("source_task")
            usable = True
            if source not in names:
                problems.append(f"{where}: source_task {source!r} is not a task")
                usable = False
            elif source in branches:
                problems.append(f"{where}: task {source!r} has a condition already")
                usable = False
            outcome = condition.get("outcome", "success")
            if outcome not in ("success", "failure"):
                problems.append(f"{where}: outcome must be 'success' or 'failure', not {outcome!r}")
                usable = False
            targets = []
            for key in ("target_task_success", "target_task_failure"):
                target = condition.get(key)
                if target != END and target not in names:
                    problems.append(f"{where}: {key} {target!r} is neither a task nor 'end'")
                targets.append(target)
            if usable and isinstance(source, str):
                met, unmet = targets
                branches[source] = (met, unmet) if outcome == "success" else (unmet, met)
        start = flow.get("start_task")
        if start not in names:
            problems.append(f'"flow.start_task" {start!r} is not a task')
        pipeline = cls(pipeline_id, name=name, start=start if isinstance(start, str) else None)
        for task in raw_tasks:
            task_name = task.get("name") if isinstance(task, Mapping) else None
            if not isinstance(task_name, str) or task_name not in names:
                continue
            if pipeline._steps.get(task_name) is not None:
                continue
            fn = None if functions is None else functions.get(task_name)
            if fn is None:
                if functions is not None:
                    problems.append(f"no function for task {task_name!r} (pass it in tasks=)")
                fn = _missing  # its options are still checked
            on_success, on_failure = branches.get(task_name, (END, None))
            options: dict[str, Any] = {}
            for key in ("timeout", "retries", "backoff", "max_backoff"):
                if key in task:
                    options[key] = task[key]
            pipeline.add_step(
                Step(task_name, fn, on_success=on_success, on_failure=on_failure, **options)
            )
        # The definition's own checks name the start task and the targets in its terms; the
        # pipeline adds what only a step can tell (a negative timeout...).
        problems += pipeline._problems if problems else pipeline.problems()
        if problems:
            raise DefinitionError(list(dict.fromkeys(problems)))  # each problem once
        pipeline.definition = dict(raw)
        canonical = msgspec.json.encode(raw, order="sorted")
        pipeline._digest = hashlib.sha256(canonical).hexdigest()[:16]
        return pipeline
