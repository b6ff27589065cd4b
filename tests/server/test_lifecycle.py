"""The server process: SIGTERM drains and exits 0, a store that cannot be reached is a 503 (on
etcd, behind a proxy the test cuts), and ``--recover`` runs the recovery services in it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

import flowstate as fs
from flowstate.workflows import FlowManager, FlowStatus, StepStatus
from tests.drivers.etcd_proxy import TcpProxy
from tests.etcd_server import unique_url
from tests.serve_process import ServeProcess, serve_refused
from tests.server.sse import events

# Each module starts `flowstate serve` processes of its own.
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

FLOWS = "tests.recovery.process_flows:flows"
TASKS = "tests.server.pipeline_tasks:TASKS"


async def test_sigterm_drains_and_exits_0(tmp_path: Path) -> None:
    server = ServeProcess(f"sqlite:///{tmp_path}/store.db")
    server.start()
    try:
        url = server.wait_ready()
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            head = (await client.get("/api/v1/head")).json()["rev"]
            poll = asyncio.ensure_future(
                client.get("/api/v1/head", params={"wait_for": head + 1, "timeout": 60})
            )
            async with client.stream("GET", "/api/v1/watch") as stream:
                assert stream.status_code == 200
                server_stopped = asyncio.ensure_future(asyncio.to_thread(server.stop))
                async with asyncio.timeout(20):
                    # The stream ends (no event, no error) instead of holding the server up.
                    received = [event async for event in events(stream) if event.comment is None]
                assert received == []
            answered = await poll
            assert answered.status_code == 200, "an in-flight long poll is answered"
            assert answered.json() == {"rev": head}
            assert await server_stopped == 0
            with pytest.raises(httpx.ConnectError):
                await client.get("/health")
    finally:
        server.close()
    starts = [line for line in server.lines if "flowstate.server: listening on" in line]
    stops = [line for line in server.lines if "stopped listening on" in line]
    assert len(starts) == 1
    assert len(stops) == 1
    assert "after 3 requests" in stops[0]
    assert len(server.lines) == 2, server.output


async def test_a_store_out_of_reach_is_503(etcd_url: str) -> None:
    """Once over etcd: the server works on it, answers 503 while etcd is cut off, and works
    again once it is back."""
    prefix = unique_url(etcd_url).split("/", 3)[3]
    upstream = int(etcd_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    async with TcpProxy(upstream) as proxy:
        server = ServeProcess(f"etcd://{proxy.endpoint}/{prefix}?timeout=1")
        await asyncio.to_thread(server.start)
        try:
            url = await asyncio.to_thread(server.wait_ready)
            async with fs.Engine(url) as engine, httpx.AsyncClient(base_url=url) as client:
                together = [fs.StateCtx.new(f"t{i}") for i in range(3)]
                await engine.do(fs.Commit(*(fs.Transit(c, "x") for c in together)))
                shared = {c.committed.rev for c in together}
                async with client.stream("GET", "/api/v1/watch") as stream:
                    got = []
                    async for event in events(stream):
                        got.append(event)
                        if len(got) == 3:
                            break
                # etcd gives the three one revision; only the last event carries the id, so
                # that a client resuming from it misses none of them.
                assert len(shared) == 1
                assert [e.has_id for e in got] == [False, False, True]
                assert got[-1].last_id == str(shared.pop())

                await proxy.cut()
                health = await client.get("/health")
                assert health.status_code == 503
                assert health.json()["error"]["type"] == "unavailable"
                states = await client.get("/api/v1/states")
                assert states.status_code == 503
                assert states.json()["error"]["type"] == "unavailable"
                with pytest.raises(fs.DriverUnavailableError):
                    await engine.get_state("t0")

                await proxy.restore()
                async with asyncio.timeout(30):
                    # etcd's client reconnects with a backoff: poll the health route until then.
                    while (await client.get("/health")).status_code != 200:  # noqa: ASYNC110
                        await asyncio.sleep(0.2)
                assert (await engine.get_state("t0")).current.transition.to == "x"
        finally:
            await asyncio.to_thread(server.close)


async def test_recover_runs_the_services_in_the_server(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    args = ("--recover", "--flows", FLOWS, "--retry-after", "0.3", "--lease-ttl", "1")
    server = ServeProcess(url, *args)
    await asyncio.to_thread(server.start)
    try:
        base = await asyncio.to_thread(server.wait_ready)
        assert "recovery on" in server.wait_line("listening on")
        async with fs.Engine(base) as engine, httpx.AsyncClient(base_url=base) as client:
            # A state left running, as a crashed worker leaves it: the server's recoverer
            # retries it and the flow ("slow" finishes it outside a worker) ends it.
            ctx = fs.StateCtx.new("stalled")
            await engine.do(fs.Commit(fs.Transit(ctx, "slow")))
            async with asyncio.timeout(30), engine.watch(id="stalled") as watcher:
                async for state in watcher:
                    if state.is_ended:
                        break
            assert fs.recovery.attempt(await _version(engine, "stalled", -2)) == 1
            info = (await client.get("/api/v1/recovery")).json()
        assert info["enabled"] is True
        recoverer = info["recoverer"]
        assert recoverer["is_leader"] is True
        assert recoverer["leader"] == recoverer["holder"]
        assert recoverer["stats"]["retried"] == 1
        assert info["delayer"]["leader"] == info["delayer"]["holder"]
        assert await asyncio.to_thread(server.stop, signal.SIGTERM) == 0
    finally:
        await asyncio.to_thread(server.close)


# A pipeline posted as JSON whose first attempt hangs until its server is killed.
HANGS = {
    "flow": {
        "id": "hangs",
        "name": "hangs",
        "start_task": "hang",
        "tasks": [{"name": "hang", "retries": 1}],
    }
}
RECOVER = ("--tasks", TASKS, "--recover", "--retry-after", "0.3", "--lease-ttl", "1")


async def _post_and_kill(url: str) -> str:
    """Post HANGS to a server of its own, kill it in the middle of the step; the run's id."""
    server = ServeProcess(url, "--tasks", TASKS)
    await asyncio.to_thread(server.start)
    try:
        base = await asyncio.to_thread(server.wait_ready)
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.post("/api/v1/flows/execute", json=HANGS)
        assert response.status_code == 202, response.text
        run_id: str = response.json()["execution_id"]
        async with fs.Engine(url) as engine:
            flows = FlowManager(engine)
            async with asyncio.timeout(30), flows.watch(id=run_id) as versions:
                async for _ in versions:
                    if "step_started" in [event.kind for event in await flows.events(run_id)]:
                        break
        await asyncio.to_thread(server.stop, signal.SIGKILL)
    finally:
        await asyncio.to_thread(server.close)
    return run_id


async def _check_recovered(url: str, run_id: str, server: ServeProcess) -> None:
    """The run finished on ``server``: its killed attempt failed, the second completed."""
    async with fs.Engine(url) as engine:
        flows = FlowManager(engine)
        done = await flows.result(run_id, timeout=30)
        steps = await flows.steps(run_id)
    assert done.status is FlowStatus.FINISHED
    assert [(s.task, s.attempt, s.status) for s in steps] == [
        ("hang", 1, StepStatus.FAILED),
        ("hang", 2, StepStatus.COMPLETED),
    ]
    assert "stopped without an outcome" in (steps[0].error or "")
    assert steps[1].result == "done on attempt 2"
    assert f"adopted with {run_id!r}" in server.output
    assert await asyncio.to_thread(server.stop, signal.SIGTERM) == 0


async def test_a_restarted_server_recovers_the_runs_posted_to_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    run_id = await _post_and_kill(url)
    # Nothing running knows the pipeline now but the store, which keeps its definition.
    server = ServeProcess(url, *RECOVER)
    await asyncio.to_thread(server.start)
    try:
        await asyncio.to_thread(server.wait_ready)
        await _check_recovered(url, run_id, server)
    finally:
        await asyncio.to_thread(server.close)


async def test_a_server_recovers_the_runs_posted_to_another(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    server = ServeProcess(url, *RECOVER)
    await asyncio.to_thread(server.start)
    try:
        await asyncio.to_thread(server.wait_ready)
        run_id = await _post_and_kill(url)
        await _check_recovered(url, run_id, server)
    finally:
        await asyncio.to_thread(server.close)


async def _version(engine: fs.Engine, state_id: str, index: int) -> fs.State:
    versions = [s async for s in engine.iter_states(id=state_id)]
    return versions[index]


def test_recover_needs_flows(tmp_path: Path) -> None:
    result = serve_refused(f"sqlite:///{tmp_path}/store.db", "--recover")
    assert result.returncode == 1
    needs = "--recover needs --flows or --tasks: recovered states run the server's flows"
    assert result.stderr.splitlines() == [f"flowstate: error: {needs}"]


def test_a_signal_while_the_server_closes_its_store_is_ignored() -> None:
    # Once the HTTP server has stopped, the process closes its engine and hands its recovery
    # leases over. A second SIGTERM then (an impatient supervisor) must not kill it by signal
    # halfway through: the handlers stay installed until the event loop ends.
    script = textwrap.dedent(
        """
        import asyncio, os, signal, types
        from flowstate.server._uvicorn import handle_signals

        async def main():
            app = types.SimpleNamespace(context=types.SimpleNamespace(stopping=asyncio.Event()))
            server = types.SimpleNamespace(should_exit=False, force_exit=False)
            with handle_signals(app, server):
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.1)
            assert server.should_exit
            os.kill(os.getpid(), signal.SIGTERM)  # while closing the store, say
            await asyncio.sleep(0.1)
            print("closed cleanly")

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "closed cleanly\n"
