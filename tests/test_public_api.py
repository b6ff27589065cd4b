"""The public surface: complete, sorted __all__ lists and readable names."""

from __future__ import annotations

import importlib
import pickle
import typing

import pytest

import flowstate as fs
from flowstate import workflows

PUBLIC_MODULES = [
    "flowstate",
    "flowstate.errors",
    "flowstate.drivers",
    "flowstate.drivers.base",
    "flowstate.drivers.faulty",
    "flowstate.drivers.http",
    "flowstate.drivers.memory",
    "flowstate.recovery",
    "flowstate.server",
    "flowstate.testing.conformance",
    "flowstate.testing.flows",
    "flowstate.testing.stateful",
    "flowstate.testing.strategies",
    "flowstate.workflows",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    # isort's order, as ruff keeps it: CONSTANTS, then Classes, then functions.
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    for attr in exported:
        assert hasattr(module, attr), f"{name}.{attr} is in __all__ but missing"


def test_everything_public_in_flowstate_is_exported() -> None:
    public = {
        name
        for name, value in vars(fs).items()
        if (not name.startswith("_") and not isinstance(value, type(fs))) or name == "recovery"
    }
    assert public - {"annotations"} <= set(fs.__all__) | {"__version__"}


def test_reprs_name_the_public_module() -> None:
    assert fs.Engine.__module__ == "flowstate"
    assert repr(fs.StateCtx).startswith("<class 'flowstate.StateCtx")
    assert fs.ConflictError.__module__ == "flowstate"


def test_error_tree() -> None:
    for error in [
        fs.ClosedError,
        fs.ConflictError,
        fs.NotFoundError,
        fs.UnknownDriverError,
        fs.DriverError,
        fs.InvalidCommandError,
        fs.InvalidQueryError,
        fs.InvalidURLError,
        fs.MissingDependencyError,
    ]:
        assert issubclass(error, fs.FlowstateError)
    assert issubclass(fs.FlowNotFoundError, fs.NotFoundError)
    assert issubclass(fs.NotFoundError, LookupError)
    assert issubclass(fs.UnknownDriverError, LookupError)
    assert issubclass(fs.InvalidCommandError, ValueError)
    assert issubclass(fs.MissingDependencyError, ImportError)
    assert issubclass(fs.DriverUnavailableError, fs.DriverError)
    assert issubclass(fs.SchemaVersionError, fs.DriverError)
    assert fs.errors.__doc__ is not None
    for name in fs.errors.__all__:
        if name != "Conflict":
            assert name in fs.errors.__doc__, f"{name} is missing from the tree drawing"


def test_errors_pickle_and_say_what_happened() -> None:
    conflict = fs.ConflictError([fs.Conflict("a", 1, 2), fs.Conflict("b", 0, 5)])
    assert conflict.ids == ["a", "b"]
    assert "'a' (expected rev 1, found 2)" in str(conflict)
    again = pickle.loads(pickle.dumps(conflict))
    assert again.conflicts == conflict.conflicts
    missing = pickle.loads(pickle.dumps(fs.FlowNotFoundError("ship")))
    assert missing.flow_id == "ship"
    assert "ship" in str(missing)
    told = pickle.loads(pickle.dumps(fs.FlowNotFoundError("ship", "no pipeline 'ship'")))
    assert (told.flow_id, str(told)) == ("ship", "no pipeline 'ship'")


@pytest.mark.parametrize(
    "cls",
    [
        fs.State,
        fs.Transition,
        fs.StateCtx,
        fs.Data,
        fs.StatesQuery,
        fs.StatesPage,
        workflows.ManagedFlow,
        workflows.FlowEvent,
        workflows.FlowStep,
        workflows.StepObservation,
    ],
)
def test_type_hints_resolve_from_the_public_module(cls: type) -> None:
    # The classes say they live in `flowstate` (or `flowstate.workflows`); their annotations
    # must still resolve there, or typing.get_type_hints, hypothesis's st.builds, msgspec's
    # converters and the server's OpenAPI schema fail.
    assert typing.get_type_hints(cls)
