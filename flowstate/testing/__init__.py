"""Test kit shipped with flowstate: the driver conformance suite and stateful machines.

This package imports pytest and hypothesis; flowstate itself never imports it.
"""

__all__: list[str] = []
