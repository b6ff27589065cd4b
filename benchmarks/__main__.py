"""``python -m benchmarks``: run every benchmark module, write the table and the chart.

Usage::

    python -m benchmarks                  # every module, 5 rounds, >= 1 s per measurement
    python -m benchmarks --quick          # a smoke run: one round, tiny sizes (CI)
    python -m benchmarks --only sqlite --only memory --rounds 3

A benchmark module is any ``benchmarks/bench_<name>.py`` with a ``suite(settings)``
function (see ``benchmarks/_suite.py``); it is found by name, nothing to register. The
results go to ``benchmarks/results/`` (``--out``): ``results.md`` (the table the README
quotes), ``results.json`` and ``results.png``; a quick run writes ``quick.*`` instead, so it
never overwrites the published figures.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import platform
import sqlite3
import sys
import time
from pathlib import Path

from benchmarks._suite import ROOT, Row, Settings

RESULTS = ROOT / "benchmarks" / "results"
#: Modules in this order first; any other bench_*.py module after them, by name.
ORDER = ("memory", "sqlite", "etcd", "postgres", "http", "scaling", "recovery", "workflows")


def modules() -> list[str]:
    """The names of the benchmark modules (``bench_<name>`` with a ``suite`` function)."""
    found = [
        info.name.removeprefix("bench_")
        for info in pkgutil.iter_modules([str(ROOT / "benchmarks")])
        if info.name.startswith("bench_")
    ]
    return [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio_text(row: Row) -> str:
    """``0.83x (0.81-0.87)``: the ratio and its lowest and highest round, with more decimals
    when two would round it onto the other side of its target (0.6997 is not 0.70)."""
    assert row.ratio is not None
    digits = 2
    while (
        row.target is not None
        and digits < 6
        and (round(row.ratio, digits) >= row.target) != row.met
    ):
        digits += 1
    return f"{row.ratio:.{digits}f}x ({row.ratio_low:.{digits}f}-{row.ratio_high:.{digits}f})"


def table(rows: list[Row]) -> str:
    """The results as a Markdown table, one section per comparison group."""
    lines = [
        "| comparison | contender | median | spread | ratio (min-max) | target |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for row in rows:
        ratio = ""
        if row.ratio is not None:
            ratio = ratio_text(row)
        target = ""
        verdict = "met" if row.met else "**not met**"
        if row.limit is not None:
            target = f"≤ {row.limit:g} {row.unit} {verdict}"
        elif row.target is not None:
            target = f"≥ {row.target:g}x {verdict}"
        lines.append(
            f"| {row.group} | {row.contender} | {fmt(row.value)} {row.unit} "
            f"| ±{row.spread * 50:.0f}% | {ratio} | {target} |"
        )
    return "\n".join(lines)


def header(settings: Settings, seconds: float, load: tuple[float, float]) -> str:
    if settings.quick:
        how = "one round at small sizes (a smoke run: the figures are not meaningful)"
    else:
        how = (
            f"{settings.rounds} interleaved rounds, each measurement at least "
            f"{settings.seconds:g} s long and in a fresh process"
        )
    return (
        f"`python -m benchmarks{' --quick' if settings.quick else ''}`, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}: Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {how}; took {seconds:.0f} s. Load average (1 min) "
        f"{load[0]:.2f} when it started and {load[1]:.2f} when it ended.\n\n"
        "median: over the rounds; spread: ± half the range between the lowest and the highest "
        "round, relative to the median; ratio: the median of the per-round ratios to the "
        "first contender of the comparison (for times: its time / this time), with the "
        "lowest and the highest round's ratio."
    )


def chart(rows: list[Row], path: Path) -> None:
    """A small PNG: each row's ratio to its comparison's baseline, targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row.ratio is not None]
    if not shown:
        return
    labels = [f"{row.group}\n{row.contender}" for row in shown]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(shown) + 1), dpi=72)
    ys = range(len(shown))
    colours = [
        "#999999" if row.met is None else ("#2a9d8f" if row.met else "#e76f51") for row in shown
    ]
    ratios = [row.ratio or 0.0 for row in shown]
    errors = [
        [r - (row.ratio_low or r) for r, row in zip(ratios, shown, strict=True)],
        [(row.ratio_high or r) - r for r, row in zip(ratios, shown, strict=True)],
    ]
    ax.barh(list(ys), ratios, color=colours, xerr=errors, capsize=2)
    for y, row in zip(ys, shown, strict=True):
        if row.target is not None:
            ax.plot([row.target, row.target], [y - 0.4, y + 0.4], color="black", lw=1.5)
    ax.axvline(1.0, color="#555555", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to the comparison's baseline (log; black tick: target)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one round, tiny sizes (smoke)")
    parser.add_argument("--only", action="append", choices=modules(), help="run these modules")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="least seconds per measurement (default 1)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib)")
    args = parser.parse_args(argv)
    settings = Settings(
        rounds=args.rounds,
        seconds=args.seconds,
        quick=args.quick,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    for name in args.only or modules():
        module = importlib.import_module(f"benchmarks.bench_{name}")
        suite = getattr(module, "suite", None)
        if suite is None:
            continue
        settings.say(f"{name}:")
        rows += suite(settings)
    took = time.perf_counter() - started
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "results"
    load = (load_before, os.getloadavg()[0])
    text = f"{header(settings, took, load)}\n\n{table(rows)}\n"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps([r.to_json() for r in rows], indent=1) + "\n")
    if not args.no_chart:
        chart(rows, out / f"{stem}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
