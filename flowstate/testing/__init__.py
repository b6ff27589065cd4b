"""Test kit shipped with flowstate.

* ``flowstate.testing.conformance``: ``DriverTests``, the suite every driver passes;
* ``flowstate.testing.stateful``: ``run_driver_machine``, a driver checked against a model;
* ``flowstate.testing.strategies``: hypothesis strategies for states, commits and queries;
* ``flowstate.testing.flows``: ``explore``, your flows run under injected faults and recovery,
  checked against your invariants (see ``docs/testing.md``).

The kit needs pytest, hypothesis and anyio (whose pytest plugin runs the async tests); install
them with ``pip install 'flowstate-engine[testing]'``. Importing the kit without them raises
``MissingDependencyError``, which names that command. flowstate itself never imports the kit.
"""

import importlib.util

from flowstate.errors import MissingDependencyError

__all__: list[str] = []

# The packages of the [testing] extra, by import name.
_missing = [
    name for name in ("pytest", "hypothesis", "anyio") if importlib.util.find_spec(name) is None
]
if _missing:
    raise MissingDependencyError(
        f"flowstate.testing needs pytest, hypothesis and anyio (missing: {', '.join(_missing)}); "
        "install them with: pip install 'flowstate-engine[testing]'"
    )
