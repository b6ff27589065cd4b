"""The worked example: the kit finds the saga's seeded bug, shrinks it, and passes the fix."""

from __future__ import annotations

import asyncio
import collections
import re

import pytest
from hypothesis import settings
from hypothesis import strategies as st

from examples.saga import DECLINED_CARD, Shop, main, make_flows, new_order
from flowstate.drivers.faulty import Fault, FaultSchedule
from flowstate.testing.flows import InvariantError, Outcome, every_state_rests, explore, replay

orders = st.builds(
    new_order,
    st.sampled_from(["order-1", "order-2", "order-3"]),
    sku=st.sampled_from(["book", "lamp"]),
    quantity=st.integers(1, 2),
    card=st.sampled_from(["4242", DECLINED_CARD]),
)


def charged_at_most_once(outcome: Outcome[Shop]) -> None:
    charges = collections.Counter(order for order, _ in outcome.context.charges)
    twice = {order: n for order, n in charges.items() if n > 1}
    assert not twice, f"charged more than once: {twice}"


def orders_settle_up(outcome: Outcome[Shop]) -> None:
    """Shipped orders were paid and hold their stock; cancelled ones hold nothing."""
    shop = outcome.context
    charged = {order for order, _ in shop.charges}
    for order_id, state in outcome.states.items():
        ended_as = state.annotations.get("outcome")
        holds = (order_id in charged, order_id in shop.reservations, order_id in shop.shipments)
        if ended_as == "shipped":
            assert holds == (True, True, True), f"{order_id} shipped but holds {holds}"
        elif ended_as is not None:
            assert holds == (False, False, False), f"{order_id} {ended_as} but holds {holds}"
    on_shelf = sum(shop.stock.values())
    held = sum(quantity for _, quantity in shop.reservations.values())
    assert on_shelf + held == sum(Shop().stock.values()), "stock appeared or vanished"


INVARIANTS = [every_state_rests, charged_at_most_once, orders_settle_up]
# Deterministic and independent of saved examples, so that the bug is found on every run.
SEARCH = settings(deadline=None, database=None, derandomize=True)


@pytest.mark.slow
def test_the_kit_finds_and_shrinks_the_double_charge() -> None:
    with pytest.raises(InvariantError) as info:
        explore(
            lambda shop: make_flows(shop, buggy=True),
            context=Shop,
            states=orders,
            invariants=INVARIANTS,
            settings=SEARCH,
        )
    error = info.value
    assert error.invariant == "charged_at_most_once"
    outcome = error.outcome
    assert len(outcome.faults) <= 2
    assert len(outcome.states) == 1, "one order is enough"
    (fault,) = outcome.faults
    assert not fault.fault.applies, "the charge commit was lost, so the step ran again"
    assert outcome.path(fault.state_ids[0])[:3] == ["reserve", "charge", "charge"]
    report = "\n".join(error.__notes__)
    assert "Falsifying example: replay(" in report or "Failing test case: replay(" in report
    assert "by flow 'charge'" in report
    assert "<-- FAULT: " in report


def test_the_fixed_saga_passes() -> None:
    explore(make_flows, context=Shop, states=orders, invariants=INVARIANTS, settings=SEARCH)


def test_the_shrunk_example_replays() -> None:
    """What a regression test pasted from the failure report looks like."""
    states = [(new_order("order-1"), FaultSchedule({2: Fault.FAIL})), None, None]
    with pytest.raises(InvariantError, match=re.escape("charged more than once: {'order-1': 2}")):
        replay(
            lambda shop: make_flows(shop, buggy=True),
            context=Shop,
            states=states,
            invariants=INVARIANTS,
        )
    outcome = replay(make_flows, context=Shop, states=states, invariants=INVARIANTS)
    assert outcome.context.charges == [("order-1", 1500)]
    assert outcome.states["order-1"].annotations["outcome"] == "shipped"


def test_a_declined_card_releases_the_stock() -> None:
    outcome = replay(
        make_flows,
        context=Shop,
        states=[(new_order("order-1", sku="lamp", card=DECLINED_CARD), {3: Fault.CRASH_BEFORE})],
        invariants=INVARIANTS,
    )
    assert outcome.path("order-1") == ["reserve", "charge", "compensate", "compensate", ""]
    assert outcome.context.stock == {"book": 3, "lamp": 1}


def test_the_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(main())
    assert capsys.readouterr().out.splitlines()[:2] == ["order-1 shipped", "order-2 cancelled"]
