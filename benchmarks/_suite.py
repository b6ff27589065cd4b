"""The protocol every benchmark module follows, and the interleaved-rounds runner they share.

A benchmark module (``benchmarks/bench_*.py``) exposes::

    def suite(settings: Settings) -> list[Row]: ...

It describes what it measures as :class:`Case` objects (a contender doing some work, in a
comparison group, with the contender its ratio is taken against) and hands them to
:meth:`Settings.run`, which measures them in interleaved rounds and returns the rows.
``python -m benchmarks`` finds every such module, runs it and writes the table and the chart.

How a case is measured:

* its function, ``fn(n, **kwargs) -> float``, does ``n`` units of work and returns the seconds
  that work took (its own setup excluded);
* each measurement runs in a fresh Python process (``Settings.isolate``), so that no
  measurement inherits another's heap, threads or warmed caches;
* ``n`` is calibrated once per case, from a pilot run, so that a measurement lasts at least
  ``Settings.seconds``;
* every round measures every case of the module once, in order, so a change in the machine's
  load hits every contender alike; a row reports the median over the rounds and the spread
  (lowest and highest round), and its ratio is the median of the per-round ratios to its
  baseline (a same-run ratio).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Case", "Row", "Settings", "run_case"]

ROOT = Path(__file__).resolve().parent.parent

Kind = Literal["rate", "time"]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Case:
    """One contender in one comparison group.

    Attributes:
        group: The comparison, e.g. ``"SQLite sync=normal, 64 at a time"``.
        contender: Who does the work, e.g. ``"flowstate engine"``.
        fn: A module-level function ``fn(n, **kwargs) -> seconds`` (so that a fresh process
            can import it by name).
        kwargs: Its keyword arguments (JSON-serialisable).
        unit: ``"steps/s"`` and the like for rates (``n / seconds``); ``"ms"`` or ``"s"``
            for times per unit (``seconds / n``).
        baseline: The contender of the same group that this row's ratio is taken against.
        target: The ratio this row should reach (shown; never asserted).
        limit: The value this row should stay at or under (for times; shown, never asserted).
        pilot: ``n`` of the calibration run, and the size of a quick run.
        step: ``n`` is a multiple of it (e.g. the number of concurrent flows).
        calibrate: False: always measure ``pilot`` units (work of a fixed size, such as a
            latency percentile over ``pilot`` samples).
        direct: ``fn`` returns the row's value itself, measured its own way (for example a
            rate over a fixed duration); ``n`` is passed as ``pilot`` and never calibrated.
        note: One line on what the contender does, for the table.
    """

    group: str
    contender: str
    fn: Callable[..., float]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    unit: str = "steps/s"
    baseline: str | None = None
    target: float | None = None
    limit: float | None = None
    pilot: int = 200
    step: int = 1
    calibrate: bool = True
    direct: bool = False
    note: str = ""

    @property
    def kind(self) -> Kind:
        return "rate" if self.unit.endswith("/s") else "time"

    def value(self, n: int, seconds: float) -> float:
        if self.direct:
            return seconds
        if self.kind == "rate":
            return n / seconds
        scale = 1000.0 if self.unit == "ms" else 1.0
        return seconds / n * scale


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    group: str
    contender: str
    value: float
    unit: str
    low: float
    high: float
    rounds: int
    n: int
    baseline: str | None = None
    ratio: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    target: float | None = None
    limit: float | None = None
    note: str = ""

    @property
    def spread(self) -> float:
        """(highest - lowest) / median over the rounds."""
        return (self.high - self.low) / self.value if self.value else 0.0

    @property
    def met(self) -> bool | None:
        """Whether the row reaches its target ratio or stays under its limit (None: it has
        neither)."""
        if self.limit is not None:
            return self.value <= self.limit
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "spread": self.spread}


@dataclass
class Settings:
    """How long and how often to measure.

    Attributes:
        rounds: Interleaved rounds per case.
        seconds: The least duration of one measurement (calibrated from a pilot run).
        quick: A smoke run: one round, each case at its pilot size, no calibration.
        scale: In a quick run, the fraction of the pilot size to run.
        isolate: Run each measurement in a fresh process.
        log: Where progress lines go (None: nowhere).
    """

    rounds: int = 5
    seconds: float = 1.0
    quick: bool = False
    scale: float = 1.0
    isolate: bool = True
    log: Callable[[str], None] | None = None

    @classmethod
    def smoke(cls) -> Settings:
        """What the test suite runs: everything once, tiny, in this process."""
        return cls(rounds=1, seconds=0.0, quick=True, scale=0.1, isolate=False)

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def run(self, cases: list[Case]) -> list[Row]:
        """Measure ``cases`` in interleaved rounds; one row per case, in the given order."""
        sizes = {}
        for case in cases:
            if self.quick:
                sizes[case] = case.step * max(1, round(case.pilot * self.scale / case.step))
                continue
            if not case.calibrate or case.direct or self.seconds <= 0:
                sizes[case] = case.pilot
                continue
            pilot = _seconds(self, case, case.pilot)
            work = case.pilot * self.seconds * 1.15 / max(pilot, 1e-6)
            sizes[case] = max(case.pilot, case.step * math.ceil(work / case.step))
        rounds = 1 if self.quick else self.rounds
        samples: dict[Case, list[float]] = {case: [] for case in cases}
        for r in range(rounds):
            for case in cases:
                n = sizes[case]
                value = case.value(n, _seconds(self, case, n))
                samples[case].append(value)
                self.say(
                    f"  round {r + 1}/{rounds}  {case.group} | {case.contender}: "
                    f"{value:,.4g} {case.unit} (n={n})"
                )
        return [_row(case, cases, samples, sizes[case]) for case in cases]


def _row(case: Case, cases: list[Case], samples: dict[Case, list[float]], n: int) -> Row:
    values = samples[case]
    ratio = ratio_low = ratio_high = None
    if case.baseline is not None:
        base = next(c for c in cases if c.group == case.group and c.contender == case.baseline)
        # Per-round ratios: the rounds ran the contender and its baseline back to back.
        if case.kind == "rate":
            ratios = [v / b for v, b in zip(values, samples[base], strict=True)]
        else:  # a time: lower is better, so the ratio is baseline time / this time
            ratios = [b / v for v, b in zip(values, samples[base], strict=True)]
        ratio, ratio_low, ratio_high = statistics.median(ratios), min(ratios), max(ratios)
    return Row(
        group=case.group,
        contender=case.contender,
        value=statistics.median(values),
        unit=case.unit,
        low=min(values),
        high=max(values),
        rounds=len(values),
        n=n,
        baseline=case.baseline,
        ratio=ratio,
        ratio_low=ratio_low,
        ratio_high=ratio_high,
        target=case.target,
        limit=case.limit,
        note=case.note,
    )


def _seconds(settings: Settings, case: Case, n: int) -> float:
    if not settings.isolate:
        return float(case.fn(n, **case.kwargs))
    name = f"{case.fn.__module__}:{case.fn.__qualname__}"
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._suite", name, str(n), json.dumps(dict(case.kwargs))],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{case.group} | {case.contender} failed:\n{proc.stderr}")
    return float(proc.stdout.strip().splitlines()[-1])


def run_case(name: str, n: int, kwargs: dict[str, Any]) -> float:
    """Run ``module:function`` once in this process (what a measurement's fresh process does)."""
    module, _, qualname = name.partition(":")
    fn = getattr(importlib.import_module(module), qualname)
    return float(fn(n, **kwargs))


if __name__ == "__main__":
    print(run_case(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])))
