"""The ``flowstate`` command, called in-process through ``main()`` and as a real process."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

import flowstate as fs
from flowstate.cli import COMMANDS, main
from flowstate.drivers.base import _BUILTIN as builtin_drivers
from flowstate.drivers.base import CommitRequest, StateWrite
from flowstate.drivers.sqlite import SQLiteDriver
from flowstate.workflows import FlowManager
from tests.processes import end_process
from tests.serve_process import ServeProcess

if TYPE_CHECKING:
    from pathlib import Path


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A store holding 3 versions: a@1 {kind=order}, b@2 {kind=user}, a@3 {kind=order}."""
    path = tmp_path / "store.db"

    async def fill() -> None:
        async with SQLiteDriver(path) as driver:
            for state, expected in (
                (fs.State(id="a", labels={"kind": "order"}, transition=fs.Transition(to="x")), 0),
                (fs.State(id="b", labels={"kind": "user"}), 0),
                (fs.State(id="a", labels={"kind": "order"}, annotations={"n": "2"}), 1),
            ):
                write = StateWrite(state=state, expected_rev=expected)
                await driver.commit(CommitRequest(writes=[write]))

    asyncio.run(fill())
    return _url(path)


def _one_line_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("flowstate: error: ")
    for fragment in fragments:
        assert fragment in err


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowstate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


# -- help ----------------------------------------------------------------------------------------


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = out.split("\ncommands:\n")[1].split("\nexamples:\n")[0]
    names = re.findall(r"^    (\S+)", listed, flags=re.MULTILINE)
    assert names == [command.name for command in COMMANDS]
    assert "recover" in names
    examples = out.split("\nexamples:\n")[1]
    for command in COMMANDS:
        assert f"flowstate {command.name} " in examples
    drivers = out.split("A store is named by a driver URL:\n")[1].split("\n\n")[0]
    shown = set(re.findall(r"^  ([a-z]+)://", drivers, flags=re.MULTILINE))
    # Every built-in driver, once (postgres:// and https:// are other spellings).
    assert shown == set(builtin_drivers) - {"postgres", "https"}


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: flowstate" in capsys.readouterr().out


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: flowstate {command}" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert fs.__version__ in capsys.readouterr().out


# -- demo ----------------------------------------------------------------------------------------


@pytest.mark.slow  # a worker process crashes
def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    assert "Run four orders" in " ".join(capsys.readouterr().out.split())
    url = _url(tmp_path / "demo.db")
    assert main(["demo", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "run 1" in out
    assert set(re.findall(r"r1-order-\d", out)) == {f"r1-order-{n}" for n in (1, 2, 3, 4)}
    assert f"flowstate states {url} --label demo-run=1 --latest-only" in out
    assert "paused" in out
    assert "retrying" in out
    assert "approved by the manager" in out
    assert out.count(" ended ") == 4
    assert "crashed (killed by SIGKILL) while shipping r1-order-4" in out
    assert "retried by the recoverer (attempt 1)" in out

    # A second run adds new orders next to the first ones.
    assert main(["demo", "--url", url]) == 0
    assert "run 2" in capsys.readouterr().out

    async def check() -> None:
        async with SQLiteDriver(tmp_path / "demo.db") as driver:
            page = await driver.get_states(
                fs.StatesQuery(labels={"kind": "order"}, latest_only=True)
            )
        assert len(page.states) == 8
        assert all(state.is_ended for state in page.states)
        assert all(state.annotations["note"] == "shipped" for state in page.states)

    asyncio.run(check())


@pytest.mark.slow
def test_demo_in_a_process_uses_the_default_store(tmp_path: Path) -> None:
    result = _run("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "shipped" in result.stdout
    assert (tmp_path / "flowstate-demo.db").is_file()


@pytest.mark.parametrize("url", ["memory://", "sqlite://:memory:"])
def test_demo_on_a_store_only_this_process_reaches(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No worker process (it could not see the store), and no follow-up command that would
    # open an empty store.
    assert main(["demo", "--url", url]) == 0
    out = capsys.readouterr().out
    assert out.count(" ended ") == 3
    assert "order-4" not in out
    assert "flowstate states" not in out
    assert "needs a store\nanother process can reach" in out


@pytest.mark.slow
def test_demo_on_sqlite_memory_in_a_process(tmp_path: Path) -> None:
    result = _run("demo", "--url", "sqlite://:memory:", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count(" ended ") == 3


def test_unexpected_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A flows module that fails on import in a way nobody translated.
    (tmp_path / "broken_flows.py").write_text("raise RuntimeError('cannot start')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["recover", _url(tmp_path / "s.db"), "--flows", "broken_flows:FLOWS"]) == 1
    _one_line_error(capsys, "cannot start")

    # One failing inside the demo's task group.
    async def crash(url: str, order_id: str, run: int) -> str:
        raise RuntimeError("no worker today")

    monkeypatch.setattr("flowstate.cli._crashing_worker", crash)
    assert main(["demo", "--url", _url(tmp_path / "demo.db")]) == 1
    _one_line_error(capsys, "unexpected RuntimeError: no worker today")


# -- states --------------------------------------------------------------------------------------


def test_states_table(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["states", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REV", "ID", "STATUS", "NEXT", "COMMITTED", "(UTC)", "LABELS"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["1", "a", "running", "x"],
        ["2", "b", "ended", "-"],
        ["3", "a", "ended", "-"],
    ]


def test_states_filters(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["states", store, "--label", "kind=order", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["rev"]) for s in page["states"]] == [("a", 1), ("a", 3)]
    assert page["more"] is False
    assert page["head_rev"] == 3

    assert main(["states", store, "--latest-only", "--since-rev", "1", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["rev"]) for s in page["states"]] == [("b", 2), ("a", 3)]

    assert main(["states", store, "--label", "kind=nothing"]) == 0
    assert "no state versions match" in capsys.readouterr().out


def test_states_paging(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["states", store, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "--since-rev 2" in out
    assert main(["states", store, "--limit", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["more"] is True


# -- get -----------------------------------------------------------------------------------------


def test_get(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", store, "a"]) == 0
    out = capsys.readouterr().out
    assert "rev:" in out
    assert "n=2" in out
    assert main(["get", store, "a", "--rev", "1", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert (state["id"], state["rev"], state["transition"]["to"]) == ("a", 1, "x")


def test_get_unknown_id(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", store, "missing"]) == 1
    _one_line_error(capsys, "'missing' not found")
    assert main(["get", store, "a", "--rev", "2"]) == 1
    _one_line_error(capsys, "no version at rev 2")


def test_a_delayed_state_shows_as_delayed_with_its_due_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(tmp_path / "store.db")
    due = datetime.datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC)

    async def fill() -> None:
        async with fs.Engine(url) as engine:
            ctx = fs.StateCtx.new("job")
            await engine.do(fs.Commit(fs.Transit(ctx, "wait"), fs.Delay(ctx, "send", until=due)))

    asyncio.run(fill())
    assert main(["states", url]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[:5] == ["1", "job", "delayed", "send", "(due"]
    assert "(due 2030-01-02 03:04:05.678Z)" in row
    assert main(["get", url, "job"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^status: +delayed$", out, flags=re.MULTILINE)
    assert re.search(r"^next flow: +send \(due 2030-01-02 03:04:05\.678Z\)$", out, re.MULTILINE)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["states", "not-a-url"], "not a driver URL"),
        (["states", "nosuch://x"], "no flowstate driver for scheme 'nosuch'"),
        (["states", "sqlite://host/x.db"], "has no host"),
        (["get", "sqlite:///does/not/exist.db", "a"], "no flowstate store at"),
        (["watch", "sqlite:///missing.db"], "no flowstate store at"),
    ],
)
def test_errors_are_one_line(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 1
    _one_line_error(capsys, fragment)


def test_reading_never_creates_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["states", _url(tmp_path / "new.db")]) == 1
    capsys.readouterr()
    assert not (tmp_path / "new.db").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["states"],
        ["states", "memory://", "--label", "no-equals-sign"],
        ["states", "memory://", "--limit", "0"],
        ["get", "memory://", "a", "--rev", "-1"],
        ["frobnicate"],
    ],
)
def test_bad_command_lines_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.slow
def test_error_in_a_process_has_no_traceback(tmp_path: Path) -> None:
    result = _run("get", _url(tmp_path / "missing.db"), "some-id")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("flowstate: error: no flowstate store at")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


# -- watch ---------------------------------------------------------------------------------------


# A shell starts background jobs with SIGINT ignored and children inherit that; give the
# command Python's usual Ctrl-C handling, as an interactive terminal would.
_INTERACTIVE = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from flowstate.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.slow
def test_watch_streams_json_lines_until_ctrl_c(store: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERACTIVE, "watch", store, "--label", "kind=order"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert [(first["id"], first["rev"]), (second["id"], second["rev"])] == [("a", 1), ("a", 3)]

        async def commit() -> None:
            async with SQLiteDriver(tmp_path / "store.db") as driver:
                state = fs.State(id="c", labels={"kind": "order"})
                write = StateWrite(state=state, expected_rev=0)
                await driver.commit(CommitRequest(writes=[write]))

        asyncio.run(commit())
        third = json.loads(proc.stdout.readline())
        assert (third["id"], third["rev"]) == ("c", 4)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130)
    assert "Traceback" not in err
    assert err == ""
    assert rest == ""


@pytest.mark.slow
def test_demo_piped_into_a_reader_that_stops_early(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "flowstate", "demo"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as demo:
        assert demo.stdout is not None
        assert demo.stderr is not None
        for _ in range(3):
            demo.stdout.readline()
        demo.stdout.close()  # as `| head -3` does
        assert demo.wait(timeout=60) == 0
        assert demo.stderr.read() == b""

    # The demo went on without its reader: no order is left running in the store.
    async def orders() -> list[fs.State]:
        async with SQLiteDriver(tmp_path / "flowstate-demo.db") as driver:
            query = fs.StatesQuery(labels={"kind": "order"}, latest_only=True)
            return (await driver.get_states(query)).states

    states = asyncio.run(orders())
    assert len(states) == 4
    assert all(state.is_ended for state in states)


# -- run -----------------------------------------------------------------------------------------

APP = "tests.workflows.pipeline_app"
ONE_TASK = {"flow": {"id": "one", "start_task": "task1", "tasks": [{"name": "task1"}]}}


def _definition(tmp_path: Path) -> str:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(ONE_TASK))
    return str(path)


def test_run_prints_the_failure_that_ends_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = tmp_path / "release"
    release.touch()  # the step ends at once
    url = _url(tmp_path / "s.db")
    run_input = json.dumps({"release": str(release)})
    args = ["run", _definition(tmp_path), url, "--tasks", f"{APP}:FAILING", "--input", run_input]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    last = captured.out.splitlines()[-1]
    assert last.split()[2:4] == ["failed:", "step"]
    assert last.endswith("returned a failure: {'status': 'failure', 'reason': 'out of stock'}")


def test_run_prints_the_cancel_that_ends_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(tmp_path / "s.db")
    run_input = json.dumps({"url": url})
    args = ["run", _definition(tmp_path), url, "--tasks", f"{APP}:CANCEL_REQUESTED"]
    assert main([*args, "--input", run_input]) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[-1].split()[2:] == ["cancelled", "(requested)"]


@pytest.mark.slow  # a process, so that a hang fails the test instead of stopping the session
def test_run_ends_when_a_step_cancels_itself(tmp_path: Path) -> None:
    # A CancelledError the step raises itself is its error, like any other: no hang.
    url = _url(tmp_path / "s.db")
    result = _run("run", _definition(tmp_path), url, "--tasks", f"{APP}:SELF_CANCELLING")
    assert result.returncode == 1
    assert result.stderr == ""
    last = result.stdout.splitlines()[-1]
    assert last.endswith(
        "failed: step 'task1' failed after 1 attempts: CancelledError raised by the step"
    )


@pytest.mark.slow
def test_run_piped_into_a_reader_that_stops_early(tmp_path: Path) -> None:
    release = tmp_path / "release"
    url = _url(tmp_path / "s.db")
    run_input = json.dumps({"release": str(release)})
    command = ["run", _definition(tmp_path), url, "--tasks", f"{APP}:FAILING"]
    with subprocess.Popen(
        [sys.executable, "-m", "flowstate", *command, "--input", run_input],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as run:
        assert run.stdout is not None
        assert run.stderr is not None
        run_id = run.stdout.readline().split()[1].decode()
        run.stdout.close()  # as `| head -1` does
        release.touch()  # only now does the step end, and the run print more
        assert run.wait(timeout=60) == 1, "the run's own outcome: it failed"
        assert run.stderr.read() == b""

    assert asyncio.run(_status(url, run_id)) == "failed", "the run went on to its end"


@pytest.mark.slow
def test_run_ends_in_one_line_when_the_store_goes_away(tmp_path: Path) -> None:
    release = tmp_path / "release"
    run_input = json.dumps({"release": str(release)})
    with ServeProcess(_url(tmp_path / "s.db")) as server:
        command = ["run", _definition(tmp_path), server.url, "--tasks", f"{APP}:FAILING"]
        run = subprocess.Popen(
            [sys.executable, "-m", "flowstate", *command, "--input", run_input],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert run.stdout is not None
            for line in run.stdout:
                if "step_started" in line:
                    break
            assert server.stop() == 0
            release.touch()  # the step ends, and its end cannot be committed
            _, err = run.communicate(timeout=60)
        finally:
            end_process(run, signal.SIGKILL, 30)  # type: ignore[arg-type]
    assert run.returncode == 1
    assert err.count("\n") == 1, err
    assert err.startswith("flowstate: error: cannot reach the store to go on: ")
    assert "stays running in the store" in err


async def _status(url: str, run_id: str) -> str:
    async with fs.Engine(url) as engine:
        return str((await FlowManager(engine).get(run_id)).status)


# -- command lines checked before anything is opened ---------------------------------------------

FLOWS = "tests.recovery.process_flows:flows"


@pytest.mark.parametrize("command", ["states", "watch"])
def test_a_label_key_given_two_values_is_a_usage_error(
    command: str, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, store, "--label", "kind=zzz", "--label", "kind=order"]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "argument --label: label 'kind' given twice, as 'zzz' and 'order'" in err


def test_a_label_given_twice_with_one_value_is_fine(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["states", store, "--label", "kind=order", "--label", "kind=order", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["rev"]) for s in page["states"]] == [("a", 1), ("a", 3)]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["worker", "URL", "--flows", FLOWS, "--drain-timeout", "-1"], "--drain-timeout"),
        (["worker", "URL", "--flows", FLOWS, "--drain-timeout", "nan"], "--drain-timeout"),
        (["recover", "URL", "--flows", FLOWS, "--retry-after", "-1"], "--retry-after"),
        (["recover", "URL", "--flows", FLOWS, "--retry-after", "0"], "--retry-after"),
        (["recover", "URL", "--flows", FLOWS, "--lease-ttl", "0"], "--lease-ttl"),
        (["recover", "URL", "--flows", FLOWS, "--lease-ttl", "nan"], "--lease-ttl"),
        (["recover", "URL", "--flows", FLOWS, "--lease-ttl", "inf"], "--lease-ttl"),
        (["recover", "URL", "--flows", FLOWS, "--lease-ttl", "86401"], "--lease-ttl"),
        (["recover", "URL", "--flows", FLOWS, "--max-attempts", "-1"], "--max-attempts"),
        (["states", "URL", "--since-rev", str(2**63)], "--since-rev"),
        (["states", "URL", "--limit", str(2**31)], "--limit"),
        (["get", "URL", "a", "--rev", str(2**63)], "--rev"),
        (["serve", "URL", "--port", "-1"], "--port"),
        (["serve", "URL", "--port", "70000"], "--port"),
        (["serve", "URL", "--keepalive", "0"], "--keepalive"),
        (["serve", "URL", "--keepalive", "inf"], "--keepalive"),
        (["serve", "URL", "--max-body-size", "1023"], "--max-body-size"),
        (["serve", "URL", "--max-body-size", "1e6"], "--max-body-size"),
        (["serve", "URL", "--recover", "--flows", FLOWS, "--lease-ttl", "inf"], "--lease-ttl"),
        (["serve", "URL", "--flows", "x"], "--flows"),
        (["serve", "URL", "--tasks", ".rel:X"], "--tasks"),
        (["recover", "URL", "--flows", "x"], "--flows"),
        (["worker", "URL", "--flows", "x"], "--flows"),
        (["worker", "URL", "--tasks", "x"], "--tasks"),
        (["worker", "URL", "--tasks", "mod:"], "--tasks"),
        (["run", "flow.json", "URL", "--tasks", "x"], "--tasks"),
    ],
)
def test_out_of_range_options_are_usage_errors(
    args: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "never.db"
    assert main([_url(store) if arg == "URL" else arg for arg in args]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert f"argument {option}: " in err
    assert not store.exists(), "a bad command line opens no store"


def test_modules_that_cannot_load_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "typo_flows.py").write_text("def flow(:\n")
    (tmp_path / "sync_tasks.py").write_text(
        "def fetch(step):\n    return {}\n\nTASKS = {'a': fetch}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    url = _url(tmp_path / "s.db")
    assert main(["worker", url, "--flows", "typo_flows:FLOWS"]) == 1
    _one_line_error(capsys, "importing 'typo_flows' failed: SyntaxError: ")
    assert main(["worker", url, "--tasks", "sync_tasks:TASKS"]) == 1
    _one_line_error(
        capsys, "'sync_tasks:TASKS' is not a mapping of task names to async functions: 'a'"
    )
    assert not (tmp_path / "s.db").exists()
