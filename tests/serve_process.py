"""``flowstate serve`` in child processes, for the tests that talk to a real server.

:class:`ServeProcess` starts ``python -m flowstate serve URL --port 0 ...``, reads its log
lines on a thread, and knows the server's address once the start line names it. It is
stopped by its PID (SIGTERM to drain, SIGKILL to discard), and killed at interpreter exit at
the latest. :class:`ServerPool` hands out servers on fresh SQLite stores, starting the next
one while a test runs, for the tests that need an empty store each (the conformance suite).
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Self

__all__ = ["ServeProcess", "ServerPool", "serve_refused"]

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (https?://\S+)")

_running: set[ServeProcess] = set()


def serve_refused(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``flowstate serve`` with arguments it must refuse (it exits without listening),
    without ``FLOWSTATE_TOKEN`` unless ``env`` (more variables) sets it; return the finished
    process with its output."""
    env = {**{k: v for k, v in os.environ.items() if k != "FLOWSTATE_TOKEN"}, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flowstate", "serve", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class ServeProcess:
    """One ``flowstate serve`` child process.

    Args:
        url: The store the server serves.
        args: More command-line arguments (``--token-file``, ``--recover``, ...).
        env: Environment variables to set (or, with None values, to remove) for the child.
        cwd: The child's working directory (default: the repository root).
    """

    def __init__(
        self,
        url: str,
        *args: str,
        env: dict[str, str | None] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.command = [sys.executable, "-m", "flowstate", "serve", url, "--port", "0", *args]
        self.env = dict(os.environ)
        self.env.pop("FLOWSTATE_TOKEN", None)
        for key, value in (env or {}).items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.cwd = cwd or ROOT
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.address: str | None = None
        self._ended = False  # the output reached its end: the process is exiting
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ServeProcess({self.address or 'starting'}, pid={self.pid})"

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def url(self) -> str:
        """The server's base URL (``http://127.0.0.1:PORT``); the server must be ready."""
        if self.address is None:
            raise RuntimeError("the server has not said where it listens yet")
        return self.address

    def start(self) -> None:
        """Start the child without waiting for it (see :meth:`wait_ready`)."""
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _running.add(self)
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), name="serve-output", daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                found = _LISTENING.search(line)
                if found and self.address is None:
                    self.address = found.group(1)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_line(self, pattern: str, timeout: float = 30) -> str:
        """Block until the server logs a line matching ``pattern`` (a regex); return it.

        Raises:
            RuntimeError: The server exited first, or did not log it within ``timeout``.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                if self.process is None or self._ended:
                    # Its output ended: the process is exiting, and no line will come.
                    raise RuntimeError(f"flowstate serve exited:\n{self.output}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"no line matching {pattern!r} in {timeout}s:\n{self.output}"
                    )
                self._changed.wait(left)

    def wait_ready(self, timeout: float = 30) -> str:
        """Block until the server names its address in its start line; return the URL."""
        self.wait_line(_LISTENING.pattern, timeout)
        return self.url

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` to the server's PID and return its exit code once it exited."""
        process = self.process
        if process is None:
            raise RuntimeError("the server was not started")
        if process.poll() is None:
            os.kill(process.pid, sig)
        code = process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        _running.discard(self)
        return code

    def close(self) -> None:
        """Kill the server (by its PID) if it still runs, and reap it."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()
        _running.discard(self)


class ServerPool:
    """Servers on fresh SQLite stores under ``directory``; one is always starting ahead.

    Start-up (importing the server, opening the store) is most of what a server costs a
    test; starting the next server while the current test runs hides most of it.
    """

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.args = args
        self._numbers = itertools.count()
        self._spare: ServeProcess | None = None

    def _start(self) -> ServeProcess:
        store = self.directory / f"store-{next(self._numbers)}.db"
        server = ServeProcess(f"sqlite:///{store}", *self.args)
        server.start()
        return server

    def take(self) -> ServeProcess:
        """A ready server on an empty store; the caller closes it."""
        server = self._spare or self._start()
        self._spare = self._start()
        try:
            server.wait_ready()
        except BaseException:
            server.close()
            raise
        return server

    def close(self) -> None:
        if self._spare is not None:
            self._spare.close()
            self._spare = None


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.close()
