"""A route that fails unexpectedly answers a plain 500: no trace, no detail, all of it logged;
settings out of range are refused when the application is built.

The application runs in this process (Litestar through httpx's ASGI transport) on a driver
made to fail, since no real store fails on demand this way.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import httpx
import pytest

import flowstate as fs
from flowstate.drivers.memory import MemoryDriver
from flowstate.server import create_app

pytestmark = pytest.mark.anyio


class BrokenDriver(MemoryDriver):
    """A memory driver whose reads hit a bug."""

    async def get_state(self, state_id: str, rev: int = 0) -> fs.State:
        raise RuntimeError("secret internals: password=hunter2")


async def test_an_unexpected_error_is_a_bare_500(caplog: pytest.LogCaptureFixture) -> None:
    async with BrokenDriver() as driver, fs.Engine(driver) as engine:
        app = create_app(engine)
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            with caplog.at_level(logging.ERROR, logger="flowstate.server"):
                response = await client.get("/api/v1/states/anything")
            assert (await client.get("/health")).status_code == 200, "the server goes on"
    assert response.status_code == 500
    assert response.json() == {
        "error": {"type": "internal", "message": "internal server error; see the server's log"}
    }
    assert "hunter2" not in response.text
    assert "Traceback" not in response.text
    (record,) = [r for r in caplog.records if r.name == "flowstate.server"]
    assert record.exc_info is not None, "the trace goes to the log"
    assert "GET '/api/v1/states/anything' failed" in record.getMessage()


@pytest.mark.parametrize(
    "settings",
    [
        # A keep-alive of 0 would send comments in a tight loop.
        {"keepalive": 0},
        {"keepalive": -1.0},
        {"keepalive": math.nan},
        {"keepalive": "15"},
        {"max_body_size": 10},
        {"max_body_size": 2.5e6},
    ],
)
async def test_settings_out_of_range_are_refused(settings: dict[str, Any]) -> None:
    async with fs.Engine("memory://") as engine:
        with pytest.raises(fs.InvalidCommandError, match=next(iter(settings))):
            create_app(engine, **settings)


@pytest.mark.parametrize("token", ["", "  ", "two\nlines"])
async def test_a_token_that_no_header_can_carry_is_refused(token: str) -> None:
    async with fs.Engine("memory://") as engine:
        with pytest.raises(fs.InvalidCommandError, match="token"):
            create_app(engine, token=token)
