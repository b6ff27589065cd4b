"""Recovery with real processes that are really killed, on SQLite files, etcd and PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import datetime
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import flowstate as fs
from flowstate.recovery import _settings
from tests.processes import LEADS, Process
from tests.serve_process import ServeProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LEASE_TTL = 1.0
FLOWS = "tests.recovery.process_flows:flows"


async def recover(processes: list[Process], url: str, name: str, *extra: str) -> Process:
    process = await Process.start(
        name,
        "-m",
        "flowstate",
        "recover",
        url,
        "--flows",
        FLOWS,
        "--retry-after",
        "0.5",
        "--lease-ttl",
        str(LEASE_TTL),
        *extra,
    )
    processes.append(process)
    return process


async def first_to_lead(replicas: list[Process], lease: str, within: float = 30) -> Process:
    """The first replica that logs it leads ``lease`` (waiting on all of them at once)."""

    def leading(replica: Process) -> Callable[[list[str]], bool]:
        return lambda _lines: replica.leads(lease)

    waits = [asyncio.ensure_future(r.wait_for(leading(r), within)) for r in replicas]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    leaders = [r for r in replicas if r.leads(lease)]
    assert len(leaders) == 1, f"expected one leader of {lease}, got {[r.name for r in leaders]}"
    return leaders[0]


async def wait_ended(engine: fs.Engine, ids: set[str], within: float = 60) -> list[fs.State]:
    """Watch from the start of the log until every id has ended; return every version."""
    versions: list[fs.State] = []
    left = set(ids)
    async with asyncio.timeout(within), engine.watch() as watcher:
        async for state in watcher:
            versions.append(state)
            if state.is_ended:
                left.discard(state.id)
            if not left:
                return versions
    raise AssertionError(f"the engine closed before {sorted(left)} ended")


def ended_once(versions: list[fs.State], ids: set[str]) -> None:
    ends = collections.Counter(v.id for v in versions if v.is_ended and v.id in ids)
    assert ends == dict.fromkeys(ids, 1), "every state ended exactly once"


async def test_killed_worker_states_are_completed(store_url: str, processes: list[Process]) -> None:
    worker = await Process.start(
        "worker", "-m", "tests.recovery.process_worker", store_url, "w", "5"
    )
    processes.append(worker)
    await worker.wait_for(lambda lines: sum(line.startswith("started") for line in lines) == 5)
    worker.kill()
    assert await worker.proc.wait() == -signal.SIGKILL
    await recover(processes, store_url, "recover")
    async with fs.Engine(store_url) as engine:
        ids = {f"w{i}" for i in range(5)}
        versions = await wait_ended(engine, ids)
    ended_once(versions, ids)
    for state_id in ids:
        attempts = [_settings.attempt(v) for v in versions if v.id == state_id]
        assert attempts == [0, 1, 0], "committed, retried once, ended"


async def test_a_standby_takes_over_when_the_leader_is_killed(
    store_url: str, processes: list[Process]
) -> None:
    replicas = [await recover(processes, store_url, f"recover{i}") for i in range(3)]
    lease = "flowstate.recoverer"
    async with fs.Engine(store_url) as engine:
        leader = await first_to_lead(replicas, lease)
        before = {f"before{i}" for i in range(5)}
        for state_id in sorted(before):
            await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new(state_id), "slow")))
        leader.kill()
        killed_at = asyncio.get_running_loop().time()
        await first_to_lead([r for r in replicas if r is not leader], lease)
        took = asyncio.get_running_loop().time() - killed_at
        assert took <= LEASE_TTL + 2.5, f"failover took {took:.2f}s"
        after = {f"after{i}" for i in range(5)}
        for state_id in sorted(after):
            await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new(state_id), "slow")))
        versions = await wait_ended(engine, before | after)
    ended_once(versions, before | after)


async def test_max_attempts_with_a_recover_process(
    store_url: str, processes: list[Process]
) -> None:
    await recover(processes, store_url, "recover", "--max-attempts", "2")
    async with fs.Engine(store_url) as engine:
        await engine.do(fs.Commit(fs.Transit(fs.StateCtx.new("poison"), "fail")))
        versions = await wait_ended(engine, {"poison"})
    poison = [v for v in versions if v.id == "poison"]
    assert [_settings.attempt(v) for v in poison] == [0, 1, 2, 0]
    assert poison[-1].annotations[_settings.ENDED_REASON] == "still running 'fail' after 2 retries"


async def test_delays_fire_once_across_a_failover(store_url: str, processes: list[Process]) -> None:
    replicas = [await recover(processes, store_url, f"recover{i}") for i in range(3)]
    lease = "flowstate.delayer"
    now = datetime.datetime.now(datetime.UTC)
    ids = set()
    async with fs.Engine(store_url) as engine:
        for i in range(30):
            ctx = fs.StateCtx.new(f"timer{i}")
            at = now + datetime.timedelta(seconds=-5 if i < 10 else 0.1 * (i - 10))
            await engine.do(fs.Commit(fs.Pause(ctx, "wait"), fs.Delay(ctx, "wake", until=at)))
            ids.add(ctx.id)
        leader = await first_to_lead(replicas, lease)
        async with asyncio.timeout(30), engine.watch() as watcher:
            fired = 0
            async for state in watcher:  # kill the leader part-way through the firing
                fired += "flowstate.delay.fired" in state.transition.annotations
                if fired >= 12:
                    break
        leader.kill()
        versions = await wait_ended(engine, ids)
    fired_versions = collections.Counter(
        v.id for v in versions if "flowstate.delay.fired" in v.transition.annotations
    )
    assert fired_versions == dict.fromkeys(ids, 1), "every delay fired exactly once"
    ended_once(versions, ids)


async def test_sigterm_hands_leadership_over_at_once(
    store_url: str, processes: list[Process]
) -> None:
    replicas = [await recover(processes, store_url, f"recover{i}") for i in range(2)]
    lease = "flowstate.recoverer"
    leader = await first_to_lead(replicas, lease)
    (standby,) = [r for r in replicas if r is not leader]
    stopped_at = asyncio.get_running_loop().time()
    assert await leader.close(signal.SIGTERM) == 0, "a clean stop exits 0"
    await first_to_lead([standby], lease)
    took = asyncio.get_running_loop().time() - stopped_at
    assert took < LEASE_TTL, f"handover after a clean stop took {took:.2f}s"
    assert any("hands leadership back" in line for line in leader.lines)


async def test_a_leader_rides_out_a_store_outage(tmp_path: Path, processes: list[Process]) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    server = ServeProcess(url)
    await asyncio.to_thread(server.__enter__)
    try:
        service = await recover(processes, server.url, "recover")
        leases = ("flowstate.recoverer", "flowstate.delayer")

        def leads_all(times: int) -> Callable[[list[str]], bool]:
            def check(lines: list[str]) -> bool:
                found = collections.Counter(m.group(2) for m in map(LEADS.search, lines) if m)
                return all(found[lease] >= times for lease in leases)

            return check

        await service.wait_for(leads_all(1))
        assert await asyncio.to_thread(server.stop) == 0
        await asyncio.to_thread(server.close)
        await service.wait_for(
            lambda lines: sum("lost leadership" in line for line in lines) == len(leases)
        )
        port = server.url.rsplit(":", 1)[1]
        server = ServeProcess(url, "--port", port)  # the same address: the store is back
        await asyncio.to_thread(server.__enter__)
        await service.wait_for(leads_all(2))
        assert service.proc.returncode is None, "still serving"
        async with fs.Engine(server.url) as engine:  # and it works again: a delay fires
            ctx = fs.StateCtx.new("timer")
            await engine.do(fs.Commit(fs.Pause(ctx, "wait"), fs.Delay(ctx, "wake", seconds=0)))
            await wait_ended(engine, {"timer"})
        assert await service.close(signal.SIGTERM) == 0
        assert not any("HTTP Request" in line for line in service.lines), "no request log"
    finally:
        await asyncio.to_thread(server.close)


def test_flows_spec_errors() -> None:
    from flowstate.recovery._serve import FlowsSpecError, load_flows

    assert set(load_flows(FLOWS)) == {"slow", "fail", "wake"}
    for spec in ["nope", "no.such.module:flows", "tests.recovery.process_flows:missing"]:
        with pytest.raises(FlowsSpecError):
            load_flows(spec)


SHOP_FLOWS = """
import flowstate as fs


async def ship(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    return fs.Commit(fs.End(ctx))


FLOWS = {"ship": ship}
"""


async def test_flows_are_imported_from_the_working_directory(
    tmp_path: Path, processes: list[Process]
) -> None:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "flows.py").write_text(SHOP_FLOWS)
    script = Path(sys.executable).with_name("flowstate")  # the console script, not python -m
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = await asyncio.create_subprocess_exec(
        script,
        "recover",
        "sqlite:///shop.db",
        "--flows",
        "shop.flows:FLOWS",
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    process = Process(proc, "recover from ./shop")
    processes.append(process)
    await process.wait_for(lambda lines: any("serves recovery" in line for line in lines))
    assert await process.close(signal.SIGTERM) == 0


def test_recover_help_says_flows_runs_code(capsys: pytest.CaptureFixture[str]) -> None:
    from flowstate.cli import main

    assert main(["recover", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "imports and runs that code" in text
