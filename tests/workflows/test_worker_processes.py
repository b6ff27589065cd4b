"""Workers, the recoverer and `flowstate run` as real processes, really killed."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from pathlib import Path

import pytest

import flowstate as fs
from flowstate.workflows import FlowManager, ManagedFlow
from tests.processes import Process
from tests.workflows.pipeline_app import CRASHY, GATED, SHARED, SLOW

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP = "tests.workflows.pipeline_app"


def executions(log: Path) -> collections.Counter[tuple[str, str, int]]:
    """How often each (run, step, attempt) ran, from the steps' own log."""
    counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
    if log.exists():
        for line in log.read_text().splitlines():
            _, run, step, attempt = line.split()
            counts[(run, step, int(attempt))] += 1
    return counts


async def logged(log: Path, execution: tuple[str, str, int]) -> None:
    """Wait until a step's execution in another process shows in its log (a file, which
    nothing can wait on: read it again every few milliseconds)."""
    async with asyncio.timeout(30):
        while execution not in executions(log):  # noqa: ASYNC110 (a file, not an event)
            await asyncio.sleep(0.01)


def pids(log: Path) -> set[str]:
    return {line.split()[0] for line in log.read_text().splitlines()}


async def worker(
    processes: list[Process], url: str, name: str, log: Path, *extra: str, flows: str = "FLOWS"
) -> Process:
    process = await Process.start(
        name,
        "-m",
        "flowstate",
        "worker",
        url,
        "--flows",
        f"{APP}:{flows}",
        *extra,
        env={"FLOWSTATE_TEST_LOG": str(log)},
    )
    processes.append(process)
    await process.wait_for(lambda lines: any("runs work from" in line for line in lines))
    return process


async def step_started(flows: FlowManager, run: ManagedFlow, step: str) -> None:
    """Wait until the run's ``step`` started (a watcher on the run)."""
    async with flows.watch(id=run.id) as versions:
        async for _ in versions:
            events = await flows.events(run.id)
            if any(e.kind == "step_started" and e.payload["step"] == step for e in events):
                return


async def test_two_workers_run_no_step_twice(
    store_url: str, tmp_path: Path, processes: list[Process]
) -> None:
    log = tmp_path / "steps.log"
    await worker(processes, store_url, "worker-1", log)
    await worker(processes, store_url, "worker-2", log)
    async with fs.Engine(store_url) as engine:
        flows = FlowManager(engine)
        flows.register(SHARED)
        runs = [await flows.execute("shared", enqueue=True, owner="tests") for _ in range(200)]
        for run in runs:
            assert (await flows.result(run.id, timeout=120)).status == "finished"
        completed: collections.Counter[tuple[str, str]] = collections.Counter()
        for run in runs:
            for event in await flows.events(run.id):
                if event.kind == "step_completed":
                    completed[(run.id, event.payload["step"])] += 1
    assert completed == {(run.id, step): 1 for run in runs for step in "abc"}
    ran = executions(log)
    assert ran == {(run.id, step, 1): 1 for run in runs for step in "abc"}


async def test_a_busy_worker_leaves_runs_to_another(
    store_url: str, tmp_path: Path, processes: list[Process]
) -> None:
    # A worker claims no more than it has room for: with one slot each, two held runs are
    # one in each worker, however the two race for them.
    log, release = tmp_path / "steps.log", tmp_path / "release"
    await worker(processes, store_url, "worker-1", log, "--concurrency", "1")
    await worker(processes, store_url, "worker-2", log, "--concurrency", "1")
    async with fs.Engine(store_url) as engine:
        flows = FlowManager(engine)
        flows.register(GATED)
        held = {"release": str(release)}
        runs = [await flows.execute("gated", input=held, enqueue=True) for _ in range(2)]
        for run in runs:
            await logged(log, (run.id, "wait", 1))
        assert len(pids(log)) == 2, "each worker runs one"
        release.touch()
        for run in runs:
            assert (await flows.result(run.id, timeout=60)).status == "finished"
    assert executions(log) == {(run.id, "wait", 1): 1 for run in runs}


async def test_a_worker_killed_mid_step_is_replaced(
    store_url: str, tmp_path: Path, processes: list[Process]
) -> None:
    log = tmp_path / "steps.log"
    first = await worker(processes, store_url, "worker-1", log)
    async with fs.Engine(store_url) as engine:
        flows = FlowManager(engine)
        flows.register(CRASHY)
        run = await flows.execute("crashy", enqueue=True)
        await step_started(flows, run, "two")
        await logged(log, (run.id, "two", 1))  # the attempt is under way in the worker
        first.kill()
        await first.close()  # its exit code is asyncio's to report, sometimes as 255
        recover = await Process.start(
            "recover",
            "-m",
            "flowstate",
            "recover",
            store_url,
            "--flows",
            f"{APP}:FLOWS",
            "--retry-after",
            "1",
            "--lease-ttl",
            "1",
            env={"FLOWSTATE_TEST_LOG": str(log)},
        )
        processes.append(recover)
        await worker(processes, store_url, "worker-2", log)
        done = await flows.result(run.id, timeout=60)
        events = await flows.events(run.id)
    assert done.status == "finished"
    assert executions(log) == {
        (run.id, "one", 1): 1,
        (run.id, "two", 1): 1,
        (run.id, "two", 2): 1,
        (run.id, "three", 1): 1,
    }
    lost = [e for e in events if e.kind == "step_failed"]
    assert [(e.payload["step"], e.payload["attempt"]) for e in lost] == [("two", 1)]
    assert "stopped without an outcome" in lost[0].payload["error"]
    assert done.state["outputs"]["two"] == "second time lucky"


async def test_sigterm_hands_back_at_the_next_step(
    store_url: str, tmp_path: Path, processes: list[Process]
) -> None:
    log = tmp_path / "steps.log"
    first = await worker(processes, store_url, "worker-1", log)
    async with fs.Engine(store_url) as engine:
        flows = FlowManager(engine)
        flows.register(SLOW)
        run = await flows.execute("slow", input={"seconds": 1.0}, enqueue=True)
        await step_started(flows, run, "first")
        assert await first.close(signal.SIGTERM) == 0
        held = await flows.get(run.id)
        assert held.status == "running"
        assert held.state["outputs"] == {"first": {"slept": "first"}}, "its running step ended"
        await worker(processes, store_url, "worker-2", log)
        done = await flows.result(run.id, timeout=60)
    assert done.status == "finished"
    ran = executions(log)
    assert ran == {(run.id, "first", 1): 1, (run.id, "second", 1): 1}
    assert any("stopped" in line for line in first.lines)


async def test_a_stopped_worker_hands_plain_steps_to_the_next_one(
    store_url: str, tmp_path: Path, processes: list[Process]
) -> None:
    log, release = tmp_path / "steps.log", tmp_path / "release"
    first = await worker(processes, store_url, "worker-1", log, "--concurrency", "1", flows="PLAIN")
    ids = {"order-1", "order-2"}
    async with fs.Engine(store_url) as engine:
        for state_id in sorted(ids):
            ctx = fs.StateCtx.new(state_id, annotations={"release": str(release)})
            await engine.do(fs.Commit(fs.Transit(ctx, "pick")))
        async with asyncio.timeout(30):
            while not executions(log):  # noqa: ASYNC110 (a file, not an event)
                await asyncio.sleep(0.01)
        ((held, _, _),) = executions(log)  # its one slot runs one step
        (waiting,) = ids - {held}
        first.proc.send_signal(signal.SIGTERM)
        await first.wait_for(lambda lines: any("stops taking work" in line for line in lines))
        release.touch()  # the held step ends while the worker drains
        assert await first.proc.wait() == 0
        assert executions(log) == {(held, "pick", 1): 1}, "nothing started after SIGTERM"
        untouched = [version async for version in engine.iter_states(id=waiting)]
        assert [version.transition.to for version in untouched] == ["pick"], "never claimed"
        handed_back = (await engine.get_state(held)).current
        assert handed_back.transition.to == "pack"
        assert fs.CLAIM_ANNOTATION not in handed_back.transition.annotations

        # Both were committed while no worker watched: the next worker finds them.
        async with engine.watch(latest_only=True) as watcher:
            await worker(processes, store_url, "worker-2", log, flows="PLAIN")
            ended: set[str] = set()
            async with asyncio.timeout(30):
                async for state in watcher:
                    if state.is_ended:
                        ended.add(state.id)
                        if ended == ids:
                            break
    assert executions(log) == {(i, step, 1): 1 for i in ids for step in ("pick", "pack")}


async def test_flowstate_run_follows_a_json_definition(
    tmp_path: Path, processes: list[Process]
) -> None:
    definition = tmp_path / "flow.json"
    definition.write_text(
        json.dumps(
            {
                "flow": {
                    "id": "flow123",
                    "name": "Data processing flow",
                    "start_task": "task1",
                    "tasks": [{"name": "task1"}, {"name": "task2"}, {"name": "task3"}],
                    "conditions": [
                        {
                            "source_task": "task1",
                            "outcome": "success",
                            "target_task_success": "task2",
                            "target_task_failure": "end",
                        },
                        {
                            "source_task": "task2",
                            "outcome": "success",
                            "target_task_success": "task3",
                            "target_task_failure": "end",
                        },
                    ],
                }
            }
        )
    )
    url = f"sqlite:///{tmp_path}/store.db"
    run = await Process.start(
        "run", "-m", "flowstate", "run", str(definition), url, "--tasks", f"{APP}:TASKS"
    )
    processes.append(run)
    assert await run.proc.wait() == 0
    await run.close()
    started = [line for line in run.lines if "step_started" in line]
    assert [line.split()[3] for line in started] == ["task1", "task2", "task3"]
    assert run.lines[-1].split()[2] == "finished"
    assert run.lines[0].startswith("run ")
    broken = await Process.start(
        "run",
        "-m",
        "flowstate",
        "run",
        str(tmp_path / "missing.json"),
        url,
        "--tasks",
        f"{APP}:TASKS",
    )
    processes.append(broken)
    assert await broken.proc.wait() == 1
    await broken.close()
    assert broken.lines == [
        f"flowstate: error: cannot read {tmp_path / 'missing.json'}: No such file or directory"
    ]
