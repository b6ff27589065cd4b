"""Fixtures of the server tests: an HTTP client and a flow manager on the module's
``server`` fixture, and for the console's browser tests one Chromium per module and one tab
per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser

import flowstate as fs
from flowstate.workflows import FlowManager
from tests.serve_process import ServeProcess
from tests.server.console_browser import ConsolePage, launch

SCREENSHOTS = pytest.StashKey[list[Path]]()


@pytest.fixture
async def client(server: ServeProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture
async def flows(server: ServeProcess) -> AsyncIterator[FlowManager]:
    async with fs.Engine(server.url) as engine:
        yield FlowManager(engine)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium, shared by the tests of a module (each test has a context of its own)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def new_tab(
    browser: Browser, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[ServeProcess], ConsolePage]]:
    """Open a tab (a browser context of its own) on a server's console: ``new_tab(server)``.

    After the test, each tab must have logged no error: no console message of type error, no
    uncaught exception. Screenshots go to the test's tmp folder and are listed at the end of
    the test session.
    """
    tabs: list[ConsolePage] = []

    def open_tab(server: ServeProcess) -> ConsolePage:
        tab = ConsolePage(browser, server, tmp_path)
        tabs.append(tab)
        return tab

    yield open_tab
    shots = request.config.stash.setdefault(SCREENSHOTS, [])
    errors = []
    for tab in tabs:
        shots.extend(tab.shots)
        errors.extend(tab.errors)
        tab.close()
    assert not errors, "the console logged errors:\n" + "\n".join(errors)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    shots = config.stash.get(SCREENSHOTS, [])
    if shots:
        terminalreporter.section("console screenshots")
        for path in shots:
            terminalreporter.write_line(str(path))
