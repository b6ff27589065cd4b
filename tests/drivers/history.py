"""A long history behind few latest versions, for the drivers' tests that a latest-only label
page's cost does not grow with history."""

from __future__ import annotations

import flowstate as fs
from flowstate.drivers.base import CommitRequest, Driver, StateWrite


async def fill_history(driver: Driver, states: int, versions: int) -> None:
    """``states`` states (label ``kind=order``; every 10th also ``rare=yes``), each
    committed ``versions`` times more."""
    page = await driver.get_states(fs.StatesQuery(latest_only=True, limit=states))
    revs = {s.id: s.rev for s in page.states}
    for _ in range(versions):
        writes = [
            StateWrite(
                state=fs.State(
                    id=f"h{i}",
                    labels={"kind": "order", **({"rare": "yes"} if i % 10 == 0 else {})},
                ),
                expected_rev=revs.get(f"h{i}", 0),
            )
            for i in range(states)
        ]
        result = await driver.commit(CommitRequest(writes=writes))
        revs = {w.state.id: rev for w, rev in zip(writes, result.revs, strict=True)}
