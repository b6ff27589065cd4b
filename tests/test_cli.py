"""The ``flowstate`` command, called in-process through ``main()`` and as a real process."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

import flowstate as fs
from flowstate.cli import COMMANDS, main
from flowstate.drivers.base import CommitRequest, StateWrite
from flowstate.drivers.sqlite import SQLiteDriver

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
    for command in COMMANDS:
        assert command.name in out
    assert "sqlite:///" in out
    assert "examples:" in out


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


def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(tmp_path / "demo.db")
    assert main(["demo", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "run 1" in out
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


def test_demo_in_a_process_uses_the_default_store(tmp_path: Path) -> None:
    result = _run("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "shipped" in result.stdout
    assert (tmp_path / "flowstate-demo.db").is_file()


def test_demo_on_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", "memory://"]) == 0
    assert capsys.readouterr().out.count(" ended ") == 3


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


def test_demo_piped_into_a_reader_that_stops_early(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "flowstate", "demo", "--url", "memory://"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as demo:
        assert demo.stdout is not None
        assert demo.stderr is not None
        demo.stdout.readline()
        demo.stdout.close()  # as `| head -1` does
        assert demo.wait(timeout=60) == 0
        assert demo.stderr.read() == b""
