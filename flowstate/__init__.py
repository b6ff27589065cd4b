"""flowstate: a low-level, asyncio-native state and workflow engine.

Flows are async functions that take a :class:`StateCtx` and return commands; an
:class:`Engine` applies them through a pluggable driver with atomic compare-and-set commits.
"""

import importlib.metadata as _metadata

from flowstate import recovery
from flowstate._commands import (
    Command,
    Commit,
    Delay,
    End,
    Execute,
    GetData,
    Noop,
    Pause,
    Resume,
    Stack,
    StoreData,
    Transit,
    Unstack,
)
from flowstate._engine import Engine, ExecuteResult, Flow, FlowRegistry
from flowstate._query import StatesPage, StatesQuery
from flowstate._state import CLAIM_ANNOTATION, Data, State, StateCtx, Status, Transition
from flowstate._watcher import Watcher
from flowstate.drivers.base import Driver, open_driver
from flowstate.errors import (
    AlreadyTerminalError,
    CancelPendingError,
    ClosedError,
    Conflict,
    ConflictError,
    DefinitionError,
    DriverError,
    DriverUnavailableError,
    FlowNotFoundError,
    FlowstateError,
    InvalidCommandError,
    InvalidQueryError,
    InvalidTransitionError,
    InvalidURLError,
    MissingDependencyError,
    NotFoundError,
    SchemaVersionError,
    UnknownDriverError,
)
from flowstate.recovery import Delayer, Recoverer

try:
    # The version is written once, in CHANGELOG.md, and reaches here through the metadata of
    # the installed distribution (flowstate-engine).
    __version__ = _metadata.version("flowstate-engine")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CLAIM_ANNOTATION",
    "AlreadyTerminalError",
    "CancelPendingError",
    "ClosedError",
    "Command",
    "Commit",
    "Conflict",
    "ConflictError",
    "Data",
    "DefinitionError",
    "Delay",
    "Delayer",
    "Driver",
    "DriverError",
    "DriverUnavailableError",
    "End",
    "Engine",
    "Execute",
    "ExecuteResult",
    "Flow",
    "FlowNotFoundError",
    "FlowRegistry",
    "FlowstateError",
    "GetData",
    "InvalidCommandError",
    "InvalidQueryError",
    "InvalidTransitionError",
    "InvalidURLError",
    "MissingDependencyError",
    "Noop",
    "NotFoundError",
    "Pause",
    "Recoverer",
    "Resume",
    "SchemaVersionError",
    "Stack",
    "State",
    "StateCtx",
    "StatesPage",
    "StatesQuery",
    "Status",
    "StoreData",
    "Transit",
    "Transition",
    "UnknownDriverError",
    "Unstack",
    "Watcher",
    "open_driver",
    "recovery",
]

# Reprs and docs say flowstate.Engine, not flowstate._engine.Engine.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "flowstate"
del _name, _obj
