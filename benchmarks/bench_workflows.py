"""Managed-flow operations against the engine's own commit rate, on SQLite, in one run.

Run it as a script for the tables (medians of interleaved rounds)::

    python benchmarks/bench_workflows.py [--seconds 1] [--rounds 5] [--flows 100000]

Rows of the rate table, each measured for ``--seconds`` per round, rounds interleaved:

* engine commit, the baseline: ``Commit(Noop(ctx))`` of a state whose annotation changed,
  against the version the caller holds (one commit, no read), one state or 64 at a time;
* managed update: ``FlowManager.update_state`` (check the lifecycle, merge the patch, encode
  the record and the audit event, one compare-and-set commit), one flow or 64 at a time.

The pipeline table runs a pipeline of ``STEPS`` no-op steps, ``CONCURRENCY`` runs at a time
(``FlowManager.execute`` then ``result``; each step claimed and ended in committed
versions), next to the engine's own transition rate (``CONCURRENCY`` flows of ``STEPS``
``Commit(Transit)`` steps through ``engine.execute``) and next to DBOS (``dbos`` from
PyPI, its system database on a SQLite file, ``CONCURRENCY`` workflows of ``STEPS``
``@DBOS.step`` no-op steps, in a process of its own), all on the same synchronous setting.

The scaling table fills a store with ``--flows`` managed flows (each created, started, and
all but one in a hundred finished) and times ``FlowManager.list`` by status and by owner.

``python -m benchmarks`` runs the rate table (``suite``, at ``synchronous=normal``); the
scaling table stays with this script. Under pytest (``--benchmark-disable`` in the normal
run) a tiny version runs as a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import flowstate as fs
from benchmarks._engine_rate import engine_rate
from flowstate.workflows import FlowManager, Pipeline, Step, StepContext

try:
    from benchmarks._suite import Case, Row, Settings
except ImportError:  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._suite import Case, Row, Settings

CONCURRENCY = 64
STEPS = 10


async def _timed(seconds: float, loops: list[Callable[[], Awaitable[None]]]) -> float:
    """Operations per second of ``loops`` run at once, each repeating for ``seconds``."""
    done = 0

    async def run(op: Callable[[], Awaitable[None]]) -> None:
        nonlocal done
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            await op()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(run(op) for op in loops))
    return done / (time.perf_counter() - start)


# What a managed flow's version stores besides its state: its labels and the size of its
# record and audit-event annotations (measured on an update_state of {"n": <int>}).
SHAPED_LABELS = {
    "flow.owner": "",
    "flow.controller": "bench",
    "flow.runtime": "mirrored",
    "flow.status": "running",
}
SHAPED_ANNOTATIONS = {"flow.record": "r" * 95}
SHAPED_EVENT = {"flow.event": "state_updated", "flow.event.payload": "p" * 20}


async def engine_commits(url: str, *, width: int, seconds: float, shaped: bool = False) -> float:
    """Commits per second of ``width`` states updated at once, each ``Commit(Noop(ctx))``.

    ``shaped``: each version stores what a managed flow's does (labels, annotation sizes,
    a fresh transition with the event), so only the layer's own work differs.
    """
    async with fs.Engine(url) as engine:

        def bump(ctx: fs.StateCtx) -> Callable[[], Awaitable[None]]:
            async def op() -> None:
                annotations = ctx.current.annotations
                annotations["n"] = str(int(annotations.get("n", "0")) + 1)
                if shaped:
                    await engine.do(fs.Commit(fs.Pause(ctx, "rest", annotations=SHAPED_EVENT)))
                else:
                    await engine.do(fs.Commit(fs.Noop(ctx)))

            return op

        loops = []
        for i in range(width):
            labels = SHAPED_LABELS if shaped else {"bench": "engine"}
            annotations = SHAPED_ANNOTATIONS if shaped else {}
            ctx = fs.StateCtx.new(f"plain-{i}", labels=labels, annotations=annotations)
            await engine.do(fs.Commit(fs.Noop(ctx)))
            loops.append(bump(ctx))
        return await _timed(seconds, loops)


async def managed_updates(url: str, *, width: int, seconds: float) -> float:
    """``update_state`` calls per second on ``width`` managed flows at once."""
    async with fs.Engine(url) as engine:
        manager = FlowManager(engine)

        def update(flow_id: str) -> Callable[[], Awaitable[None]]:
            count = 0

            async def op() -> None:
                nonlocal count
                count += 1
                await manager.update_state(flow_id, {"n": count})

            return op

        loops = []
        for _ in range(width):
            flow = await manager.create_mirrored(controller="bench", state={"n": 0})
            loops.append(update(flow.id))
        return await _timed(seconds, loops)


async def _noop(step: StepContext) -> None:
    return None


NOOP = Pipeline("noop")
for _n in range(STEPS):
    NOOP.add_step(Step(f"step-{_n}", _noop))


async def pipeline_steps(url: str, seconds: float) -> float:
    """Pipeline steps per second: batches of CONCURRENCY runs of NOOP, until ``seconds``."""
    async with fs.Engine(url) as engine:
        manager = FlowManager(engine)
        manager.register(NOOP)
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            # One watcher for the batch: a result() per run would be one watcher each.
            since = await engine.driver.head_rev()
            finished = manager.watch(runtime="pipeline", status="finished", since_rev=since)
            async with finished as versions:
                started = await asyncio.gather(
                    *(manager.execute("noop") for _ in range(CONCURRENCY))
                )
                runs = {run.id for run in started}
                async for version in versions:
                    runs.discard(version.id)
                    if not runs:
                        break
            done += CONCURRENCY * STEPS
        return done / (time.perf_counter() - start)


async def engine_transitions(url: str, seconds: float) -> float:
    """The engine's transition rate: CONCURRENCY flows of STEPS transitions (a fresh store
    file for each batch, ``url`` with a number added), until ``seconds``."""
    path, _, options = url.partition("?")
    rates: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = f"{path}-{len(rates)}.db?{options}"
        rates.append(await engine_rate(batch, CONCURRENCY, STEPS - 1))
    return statistics.median(rates)


def dbos_steps(url: str) -> float:
    """Steps per second of DBOS: CONCURRENCY workflows of STEPS no-op steps on SQLite."""
    path = url.removeprefix("sqlite:///").partition("?")[0]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks._dbos_steps",
            f"sqlite:///{path}",
            str(CONCURRENCY),
            str(STEPS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"the DBOS run failed: {done.stderr[-2000:]}")
    rate: float = json.loads(done.stdout.splitlines()[-1])["rate"]
    return rate


async def pipelines(
    folder: Path, seconds: float, rounds: int, synchronous: str = "normal", dbos: bool = True
) -> dict[str, list[float]]:
    """Pipeline steps, engine transitions and DBOS steps per second, rounds interleaved."""
    found: dict[str, list[float]] = {ENGINE_ROW: [], PIPELINE_ROW: []}
    if dbos:
        found[DBOS_ROW] = []
    for n in range(rounds):
        url = f"sqlite:///{folder}/pipe-engine-{n}.db?synchronous={synchronous}"
        found[ENGINE_ROW].append(await engine_transitions(url, seconds))
        url = f"sqlite:///{folder}/pipe-{n}.db?synchronous={synchronous}"
        found[PIPELINE_ROW].append(await pipeline_steps(url, seconds))
        if dbos:
            url = f"sqlite:///{folder}/dbos-{n}.db"
            found[DBOS_ROW].append(await asyncio.to_thread(dbos_steps, url))
    return found


ENGINE_ROW = f"engine transitions ({CONCURRENCY} flows of {STEPS} steps)"
PIPELINE_ROW = f"pipeline steps ({CONCURRENCY} runs of {STEPS} no-op steps)"
DBOS_ROW = f"DBOS steps ({CONCURRENCY} workflows of {STEPS} no-op steps)"


def _pipeline_table(found: dict[str, list[float]]) -> str:
    lines = ["| measurement | per second (median) | spread | ratio |", "|---|---:|---:|---:|"]
    pipeline = statistics.median(found[PIPELINE_ROW])
    for name, values in found.items():
        median = statistics.median(values)
        spread = (max(values) - min(values)) / median if median else 0.0
        ratio = (
            f"pipeline / engine = {pipeline / median:.2f}x"
            if name == ENGINE_ROW
            else f"pipeline / DBOS = {pipeline / median:.0f}x"
            if name == DBOS_ROW
            else "1.00x"
        )
        lines.append(f"| {name} | {median:,.0f} | ±{spread / 2:.0%} | {ratio} |")
    return "\n".join(lines)


async def rates(
    folder: Path, seconds: float, rounds: int, synchronous: str = "normal"
) -> dict[str, list[float]]:
    """Every rate, ``rounds`` times, interleaved; a fresh store file per measurement."""
    contenders: dict[str, Callable[[str], Awaitable[float]]] = {}
    for width, how in ((1, "sequential"), (CONCURRENCY, f"{CONCURRENCY} at a time")):
        contenders[f"engine commit, {how}"] = functools.partial(
            engine_commits, width=width, seconds=seconds
        )
        contenders[f"engine commit of a flow-shaped state, {how}"] = functools.partial(
            engine_commits, width=width, seconds=seconds, shaped=True
        )
        contenders[f"managed update, {how}"] = functools.partial(
            managed_updates, width=width, seconds=seconds
        )
    found: dict[str, list[float]] = {name: [] for name in contenders}
    n = 0
    for _ in range(rounds):
        for name, measure in contenders.items():
            n += 1
            url = f"sqlite:///{folder}/rate-{n}.db?synchronous={synchronous}"
            found[name].append(await measure(url))
    return found


async def list_latency(folder: Path, flows: int, repeat: int) -> dict[str, float]:
    """Median milliseconds of ``FlowManager.list`` calls on a store of ``flows`` flows."""
    url = f"sqlite:///{folder}/scale-{flows}.db"
    async with fs.Engine(url) as engine:
        manager = FlowManager(engine)
        ids = []

        async def fill(part: range) -> None:
            for i in part:
                flow = await manager.create(controller="bench", owner=f"owner-{i % 1000}")
                await manager.start(flow.id)
                if i % 100:
                    await manager.finish(flow.id)
                ids.append(flow.id)

        step = -(-flows // CONCURRENCY)
        await asyncio.gather(*(fill(range(s, min(s + step, flows))) for s in range(0, flows, step)))
        queries: dict[str, Callable[[], Awaitable[object]]] = {
            "page(status='running', limit=100)": lambda: manager.page(status="running", limit=100),
            "list(status='running')": lambda: manager.list(status="running"),
            "list(owner='owner-7')": lambda: manager.list(owner="owner-7"),
            "list(owner='owner-7', status='finished')": lambda: manager.list(
                owner="owner-7", status="finished"
            ),
        }
        found = {}
        for name, query in queries.items():
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                await query()
                times.append((time.perf_counter() - start) * 1000)
            found[name] = statistics.median(times)
        return found


def _table(found: dict[str, list[float]]) -> str:
    lines = [
        "| measurement | operations/s (median) | spread | vs engine commit | vs flow-shaped |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in found.items():
        median = statistics.median(values)
        how = name.rpartition(", ")[2]
        plain = median / statistics.median(found[f"engine commit, {how}"])
        shaped = median / statistics.median(found[f"engine commit of a flow-shaped state, {how}"])
        spread = (max(values) - min(values)) / median if median else 0.0
        lines.append(
            f"| {name} | {median:,.0f} | ±{spread / 2:.0%} | {plain:.2f}x | {shaped:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--synchronous", choices=["normal", "full"], default="normal")
    parser.add_argument("--no-dbos", action="store_true", help="leave DBOS out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        found = asyncio.run(rates(Path(folder), args.seconds, args.rounds, args.synchronous))
        print(f"SQLite, WAL, synchronous={args.synchronous}, {args.rounds} interleaved rounds")
        print(_table(found))
        found = asyncio.run(
            pipelines(Path(folder), args.seconds, args.rounds, args.synchronous, not args.no_dbos)
        )
        print(f"\nPipelines, same store settings, {args.rounds} interleaved rounds")
        print(_pipeline_table(found))
        if args.flows:
            latency = asyncio.run(list_latency(Path(folder), args.flows, 7))
            print(f"\nFlowManager.list on a store of {args.flows:,} managed flows (median of 7)")
            print("| query | ms |\n|---|---:|")
            for name, ms in latency.items():
                print(f"| {name} | {ms:.1f} |")


def rate(n: int, contender: str, width: int, synchronous: str = "normal") -> float:
    """One rate of the tables (operations or steps per second) over ``n`` milliseconds, in a
    fresh store; a ``direct`` case of the suite."""
    seconds = n / 1000
    with tempfile.TemporaryDirectory(prefix="flowstate-bench-") as folder:
        url = f"sqlite:///{folder}/rate.db?synchronous={synchronous}"
        if contender == "managed":
            return asyncio.run(managed_updates(url, width=width, seconds=seconds))
        if contender == "pipeline":
            return asyncio.run(pipeline_steps(url, seconds))
        if contender == "transitions":
            return asyncio.run(engine_transitions(url, seconds))
        if contender == "dbos":
            return dbos_steps(url)
        shaped = contender == "shaped"
        return asyncio.run(engine_commits(url, width=width, seconds=seconds, shaped=shaped))


def cases(milliseconds: int, *, dbos: bool = True) -> list[Case]:
    found = []
    for width, how in ((1, "sequential"), (CONCURRENCY, f"{CONCURRENCY} at a time")):
        group = f"managed flows, SQLite sync=normal, {how}"
        engine = "engine commit, Commit(Noop)"
        for contender, name, target in (
            ("engine", engine, None),
            ("managed", "FlowManager.update_state", 0.7),
            ("shaped", "engine commit of a flow-shaped state", None),
        ):
            found.append(
                Case(
                    group,
                    name,
                    rate,
                    {"contender": contender, "width": width},
                    unit="operations/s",
                    baseline=None if name == engine else engine,
                    target=target,
                    pilot=milliseconds,
                    direct=True,
                )
            )
    work = f"{CONCURRENCY} at a time, {STEPS} no-op steps each"
    transitions = f"engine transitions ({CONCURRENCY} flows of {STEPS} Commit(Transit) steps)"
    pipeline = "pipeline steps (FlowManager.execute, each step claimed and ended)"
    dbos_row = f"DBOS 3.4, {CONCURRENCY} workflows of {STEPS} @DBOS.step steps"
    groups: list[tuple[str, list[tuple[str, str, float | None]]]] = [
        (
            f"pipelines, SQLite sync=normal, {work}",
            [("transitions", transitions, None), ("pipeline", pipeline, 0.5)],
        )
    ]
    if dbos:
        groups.append(
            (
                f"pipelines against DBOS, SQLite sync=normal, {work}",
                [("dbos", dbos_row, None), ("pipeline", pipeline, 20.0)],
            )
        )
    for group, contenders in groups:
        base = contenders[0][1]
        for contender, name, target in contenders:
            found.append(
                Case(
                    group,
                    name,
                    rate,
                    {"contender": contender, "width": CONCURRENCY},
                    unit="steps/s",
                    baseline=None if name == base else base,
                    target=target,
                    pilot=milliseconds,
                    direct=True,
                )
            )
    return found


def suite(settings: Settings) -> list[Row]:
    """The rate table as rows of the suite (each rate measured over ``settings.seconds``)."""
    milliseconds = 100 if settings.quick else max(50, round(settings.seconds * 1000))
    return settings.run(cases(milliseconds, dbos=not settings.quick))


def test_smoke(tmp_path: Path) -> None:
    found = asyncio.run(rates(tmp_path, 0.05, 1))
    assert all(values[0] > 0 for values in found.values())
    assert "managed update" in _table(found)
    rows = Settings.smoke().run(cases(50, dbos=False))
    assert all(row.value > 0 for row in rows)
    steps = asyncio.run(pipelines(tmp_path, 0.05, 1, dbos=False))
    assert all(values[0] > 0 for values in steps.values())
    assert "pipeline / engine" in _pipeline_table(steps)
    latency = asyncio.run(list_latency(tmp_path, 200, 1))
    assert set(latency) == {
        "page(status='running', limit=100)",
        "list(status='running')",
        "list(owner='owner-7')",
        "list(owner='owner-7', status='finished')",
    }


if __name__ == "__main__":
    main()
