"""The console in a real browser: Debian's Chromium driven by Playwright, nothing downloaded.

``scripts/install`` installs the ``chromium`` package (and Playwright's Python package comes with
the ``[dev]`` extra); Playwright is pointed at that binary with ``executable_path``, so no
browser of Playwright's own is ever fetched. A missing Chromium fails the tests that need it.

Playwright's synchronous API runs an event loop of its own on the test's thread, so the
browser tests are plain functions, and the store work they do on the side runs in a thread
(:func:`in_thread`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, Playwright, ViewportSize, expect

from tests.serve_process import ROOT, ServeProcess

__all__ = [
    "CHROMIUM",
    "LAUNCH_FLAGS",
    "TOKEN",
    "ConsolePage",
    "in_thread",
    "launch",
    "lines",
    "token_server",
    "writer_process",
]

CHROMIUM = Path("/usr/bin/chromium")
#: What this machine needs: headless, no sandbox (the tests run as root), no GPU, and no
#: traffic of the browser's own (updates, sync, QUIC probes).
LAUNCH_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: A laptop's screen.
VIEWPORT: ViewportSize = {"width": 1366, "height": 768}
#: Not ASCII, with a space: the page must send the token's UTF-8 bytes as the server expects.
TOKEN = "cønsole tøken"

T = TypeVar("T")

# A busy 2-core machine runs these tests next to others: wait longer than Playwright's 5 s.
expect.set_options(timeout=15_000)


def in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end on a thread of its own (the test's thread has Playwright's
    event loop), and return its result."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def launch(playwright: Playwright) -> Browser:
    """Chromium, from Debian's package; a failure (never a skip) when it is not installed."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the console's browser tests need Debian's chromium "
            "(scripts/install installs it: apt-get install chromium)",
            pytrace=False,
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_FLAGS)


def token_server(directory: Path, store: str, *args: str) -> ServeProcess:
    """A ``flowstate serve`` process that needs :data:`TOKEN`, started and ready."""
    token_file = directory / "token"
    token_file.write_text(f"{TOKEN}\n")
    server = ServeProcess(store, "--token-file", str(token_file), "--keepalive", "1", *args)
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.close()
        raise
    return server


class ConsolePage:
    """One browser tab on the console, recording what the page logs as errors.

    Attributes:
        page: The Playwright page.
        errors: Console messages of type ``error`` and uncaught exceptions (``pageerror``).
        shots: The screenshots taken, as paths.
    """

    def __init__(self, browser: Browser, server: ServeProcess, artifacts: Path) -> None:
        self.server = server
        self.artifacts = artifacts
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.shots: list[Path] = []
        self.page.on(
            "console",
            lambda message: (
                self.errors.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def open(self, where: str = "") -> None:
        """Load the console (at ``#where``, if given) and sign in with the token."""
        page = self.page
        page.goto(f"{self.server.url}/{'#' + where if where else ''}")
        dialog = page.locator("#login")
        dialog.wait_for(state="visible")
        page.fill("#login-token", TOKEN)
        page.keyboard.press("Enter")
        dialog.wait_for(state="hidden")

    def screenshot(self, name: str) -> Path:
        """Save the page as it looks now, as ``<test tmp folder>/<name>.png``."""
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        self.shots.append(path)
        return path

    @contextlib.contextmanager
    def expect_error(self, pattern: str) -> Iterator[None]:
        """Wait for the block to make the page log an error matching ``pattern`` (a regex),
        and take that error off the record: the test expects it."""
        regex = re.compile(pattern)
        with self.page.expect_console_message(
            lambda m: m.type == "error" and regex.search(m.text) is not None
        ) as logged:
            yield
        self.errors.remove(f"console: {logged.value.text}")

    def take_errors(self, pattern: str) -> list[str]:
        """Remove (and return) the recorded errors that match ``pattern`` (a regex)."""
        regex = re.compile(pattern)
        expected = [e for e in self.errors if regex.search(e)]
        self.errors = [e for e in self.errors if not regex.search(e)]
        return expected

    def close(self) -> None:
        self.context.close()


def writer_process(url: str, *args: str) -> subprocess.Popen[str]:
    """``tests.server.console_writer`` committing through the server at ``url``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLOWSTATE_TOKEN": TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.server.console_writer", url, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def lines(process: subprocess.Popen[str]) -> Iterator[str]:
    """The output lines of a child process, as they come."""
    assert process.stdout is not None
    for line in process.stdout:
        yield line.rstrip("\n")
