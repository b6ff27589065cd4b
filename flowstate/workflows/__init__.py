"""Workflow engines composed from flowstate's primitives.

:class:`FlowManager` keeps **managed flows**: states with a checked lifecycle
(``created → running ⇄ waiting → finished | failed | cancelled``), a JSON working state, an
audit trail that is their own committed history, cooperative cancellation and observed steps.
Each method is one atomic commit that is also one audit event.

Everything here is built on the public API of :mod:`flowstate` (states, ``Commit``,
``Delay``, watchers, the recoverer), so it also shows how to compose an engine of your own.
"""

from flowstate.errors import (
    AlreadyTerminalError,
    CancelPendingError,
    DefinitionError,
    InvalidTransitionError,
)
from flowstate.workflows._manager import FlowManager, FlowWatcher
from flowstate.workflows._model import (
    FlowEvent,
    FlowStatus,
    FlowStep,
    ManagedFlow,
    StepObservation,
    StepStatus,
)

__all__ = [
    "AlreadyTerminalError",
    "CancelPendingError",
    "DefinitionError",
    "FlowEvent",
    "FlowManager",
    "FlowStatus",
    "FlowStep",
    "FlowWatcher",
    "InvalidTransitionError",
    "ManagedFlow",
    "StepObservation",
    "StepStatus",
]

# Reprs and docs say flowstate.workflows.FlowManager, not its private module.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("flowstate.workflows."):
        _obj.__module__ = "flowstate.workflows"
del _name, _obj
