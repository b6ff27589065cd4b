"""Child processes for the tests that run flowstate commands and kill them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["ROOT", "Process", "end_process"]

ROOT = Path(__file__).resolve().parent.parent
LEADS = re.compile(r"(\S+) leads '(flowstate\.\w+)'")


class Process:
    """A child process whose output lines are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._readers = [
            asyncio.ensure_future(self._read(stream))
            for stream in (proc.stdout, proc.stderr)
            if stream is not None
        ]

    @classmethod
    async def start(
        cls, name: str, *args: str, role: str = "", env: dict[str, str] | None = None
    ) -> Process:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FLOWSTATE_TEST_ROLE": role, **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, name)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[str]], bool], within: float = 30) -> None:
        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: predicate(self.lines))
        except TimeoutError:
            output = "\n".join(self.lines[-30:])
            raise AssertionError(f"{self.name} never got there; its output:\n{output}") from None

    def leads(self, lease: str) -> bool:
        return any(m and m.group(2) == lease for m in map(LEADS.search, self.lines))

    def kill(self) -> None:
        """SIGKILL, by our own child's PID."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def close(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(15):
                code = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        return code


def end_process(process: subprocess.Popen[bytes], sig: int, grace: float) -> None:
    """Send ``sig`` to our own child by its PID and reap it; SIGKILL it after ``grace``
    seconds. An ended child is only reaped."""
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=grace)
