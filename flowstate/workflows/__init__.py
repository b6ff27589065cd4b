"""Workflow engines composed from flowstate's primitives.

:class:`FlowManager` keeps **managed flows**: states with a checked lifecycle
(``created → running ⇄ waiting → finished | failed | cancelled``), a JSON working state, an
audit trail that is their own committed history, cooperative cancellation and observed steps.
Each method is one atomic commit that is also one audit event.

:class:`Pipeline` is a graph of :class:`Step` s with timeouts, retries and success/failure
branching, built in Python or from a JSON definition; each run is a managed flow, executed
step by step with every start and end committed, so a crashed run resumes from its step.

Everything here is built on the public API of :mod:`flowstate` (states, ``Commit``,
``Delay``, watchers, the recoverer), so it also shows how to compose an engine of your own.
"""

from flowstate.errors import (
    AlreadyTerminalError,
    CancelPendingError,
    DefinitionError,
    InvalidTransitionError,
)
from flowstate.workflows._manager import FlowManager, FlowWatcher, new_run
from flowstate.workflows._model import (
    FlowEvent,
    FlowsPage,
    FlowStatus,
    FlowStep,
    ManagedFlow,
    StepObservation,
    StepStatus,
)
from flowstate.workflows._pipeline import Pipeline, Step, StepContext, StepFn
from flowstate.workflows._worker import Worker, WorkerStats, workflow_flows

__all__ = [
    "AlreadyTerminalError",
    "CancelPendingError",
    "DefinitionError",
    "FlowEvent",
    "FlowManager",
    "FlowStatus",
    "FlowStep",
    "FlowWatcher",
    "FlowsPage",
    "InvalidTransitionError",
    "ManagedFlow",
    "Pipeline",
    "Step",
    "StepContext",
    "StepFn",
    "StepObservation",
    "StepStatus",
    "Worker",
    "WorkerStats",
    "new_run",
    "workflow_flows",
]

# Reprs and docs say flowstate.workflows.FlowManager, not its private module.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("flowstate.workflows."):
        _obj.__module__ = "flowstate.workflows"
del _name, _obj
