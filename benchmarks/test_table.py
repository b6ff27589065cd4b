"""The results table says what the measurements say, even next to a target."""

from __future__ import annotations

from benchmarks.__main__ import table
from benchmarks._suite import Row


def _row(ratio: float) -> Row:
    return Row(
        group="g",
        contender="c",
        value=1.0,
        unit="ops/s",
        low=1.0,
        high=1.0,
        rounds=5,
        n=1,
        baseline="b",
        ratio=ratio,
        ratio_low=ratio - 0.05,
        ratio_high=ratio + 0.04,
        target=0.7,
    )


def test_a_ratio_just_under_its_target_is_not_rounded_onto_it() -> None:
    assert "| 0.6997x (0.6497-0.7397) | ≥ 0.7x **not met** |" in table([_row(0.6997)])
    assert "| 0.70x (0.65-0.74) | ≥ 0.7x met |" in table([_row(0.7001)])
    assert "| 0.83x (0.78-0.87) | ≥ 0.7x met |" in table([_row(0.83)])
