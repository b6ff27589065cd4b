"""Which marker each server fixture's tests carry, and the guard that names a test lacking it.

A test that takes a server's fixture is marked by ``tests/conftest.py``; a fixture that asks
for a server at run time marks its parameter instead (``pytest.param(..., marks=...)``). A new
server goes into this table, and its fixture calls :func:`refuse_in_a_quick_run` first.
"""

from __future__ import annotations

import pytest

SERVER_FIXTURES = {"etcd_url": "etcd", "postgres_url": "postgres", "serve_pool": "slow"}

#: Tests of the conformance kit that wait out a second or more, marked ``slow`` where they
#: are collected (the kit, which other projects run, carries no marker of ours).
SLOW_KIT_TESTS = frozenset({"test_lease_expires"})


def refuse_in_a_quick_run(request: pytest.FixtureRequest, fixture: str) -> None:
    """Fail the test that reached ``fixture`` in a ``--quick`` run, which leaves out the tests
    carrying its marker: this test is missing that marker."""
    if request.config.getoption("--quick", default=False):
        marker = SERVER_FIXTURES[fixture]
        pytest.fail(
            f"a test uses {fixture} in a --quick run but is not marked {marker}; a fixture "
            f"that asks for {fixture} at run time marks its parameter "
            f"(pytest.param(..., marks=pytest.mark.{marker}))",
            pytrace=False,
        )
