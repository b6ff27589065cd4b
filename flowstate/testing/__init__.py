"""Test kit shipped with flowstate.

* ``flowstate.testing.conformance``: ``DriverTests``, the suite every driver passes;
* ``flowstate.testing.stateful``: ``run_driver_machine``, a driver checked against a model;
* ``flowstate.testing.strategies``: hypothesis strategies for states, commits and queries;
* ``flowstate.testing.flows``: ``explore``, your flows run under injected faults and recovery,
  checked against your invariants (see ``docs/testing.md``).

This package imports pytest and hypothesis; flowstate itself never imports it.
"""

__all__: list[str] = []
