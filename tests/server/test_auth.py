"""Bearer tokens: every route but /health needs one when the server has one; the remote driver
sends ``FLOWSTATE_TOKEN``; without a token the server listens on loopback only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import flowstate as fs
from flowstate.drivers.http import HTTPDriver
from flowstate.server._cli import is_loopback
from tests.serve_process import ServeProcess, serve_refused

# Each module starts `flowstate serve` processes of its own.
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TOKEN = "s3cret-tøken with spaces"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    directory = tmp_path_factory.mktemp("auth")
    (directory / "token").write_text(f"{TOKEN}\n")
    url = f"sqlite:///{directory}/store.db"
    with ServeProcess(url, "--token-file", str(directory / "token")) as server:
        yield server


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/v1/states", None),
    ("GET", "/api/v1/states/x", None),
    ("GET", "/api/v1/states/x/history", None),
    ("GET", "/api/v1/watch", None),
    ("GET", "/api/v1/info", None),
    ("GET", "/api/v1/head", None),
    ("GET", "/api/v1/delays", None),
    ("GET", "/api/v1/recovery", None),
    ("GET", "/api/v1/leases/x", None),
    ("POST", "/api/v1/commit", {"writes": [{"state": {"id": "x"}, "expected_rev": 0}]}),
    ("POST", "/api/v1/commits", {"commits": []}),
    ("POST", "/api/v1/states/query", {}),
    ("GET", "/schema/openapi.json", None),
    ("GET", "/api/v1/flows", None),
    ("GET", "/api/v1/flows/x/events", None),
    ("POST", "/api/v1/flows/x/cancel", None),
]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", TOKEN],
)
async def test_every_route_but_health_needs_the_token(
    server: ServeProcess, authorization: str | None
) -> None:
    headers = [(b"Authorization", authorization.encode())] if authorization else []
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
        for method, path, body in ROUTES:
            response = await client.request(method, path, json=body)
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["type"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
        health = await client.get("/health")
        assert health.status_code == 200
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/api/v1/states/x")).status_code == 401
        assert (await client.get("/api/v1/head")).status_code == 401, "nothing was committed"


async def test_the_console_and_health_need_no_token(server: ServeProcess) -> None:
    """The page asks for the token itself: it and its files load without one, and
    ``/health`` says that the API needs one (so the page asks before its first call)."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        for path in ("/", "/console/app.js", "/console/style.css"):
            assert (await client.get(path)).status_code == 200, path
        health = (await client.get("/health")).json()
        assert health["token_required"] is True
        # A load balancer probes with HEAD, without the token.
        probe = await client.head("/health")
        assert (probe.status_code, probe.content) == (200, b"")
        assert (await client.head("/api/v1/head")).status_code == 401


async def test_with_a_token_any_name_and_origin_is_served(server: ServeProcess) -> None:
    """The token is what a server with one checks: behind a proxy it may be reached under
    any name, and a page cannot send the token it does not know."""
    headers = [(b"Authorization", f"Bearer {TOKEN}".encode()), (b"Host", b"flowstate.example")]
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
        assert (await client.get("/api/v1/head")).status_code == 200
        body = {"writes": [{"state": {"id": "proxied"}, "expected_rev": 0}]}
        posted = await client.post(
            "/api/v1/commit", json=body, headers={"Origin": "https://console.example"}
        )
        assert posted.status_code == 200, posted.text
        assert (await client.get("/api/v1/states/proxied")).status_code == 200


async def test_the_right_token_opens_every_route(server: ServeProcess) -> None:
    headers = [(b"Authorization", f"Bearer {TOKEN}".encode())]
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
        for method, path, body in ROUTES:
            if path == "/api/v1/watch":
                continue  # a stream: opened below
            response = await client.request(method, path, json=body)
            assert response.status_code in (200, 404), (method, path, response.text)
            if response.status_code == 404:
                assert response.json()["error"]["type"] == "not_found"
        async with client.stream("GET", "/api/v1/watch") as response:
            assert response.status_code == 200


async def test_the_remote_driver_sends_flowstate_token(
    server: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWSTATE_TOKEN", raising=False)
    with pytest.raises(fs.DriverError, match="FLOWSTATE_TOKEN") as info:
        async with fs.Engine(server.url):
            pass
    assert TOKEN not in str(info.value)
    monkeypatch.setenv("FLOWSTATE_TOKEN", "  ")  # blank: as if unset
    with pytest.raises(fs.DriverError, match="FLOWSTATE_TOKEN"):
        async with fs.Engine(server.url):
            pass
    monkeypatch.setenv("FLOWSTATE_TOKEN", f"{TOKEN[:4]}\n{TOKEN[4:]}")
    with pytest.raises(fs.InvalidURLError, match=r"\$FLOWSTATE_TOKEN: .*control") as bad:
        fs.Engine(server.url)
    assert TOKEN[4:] not in str(bad.value)
    # Surrounding whitespace (a line end from a file, say) is not part of the token.
    monkeypatch.setenv("FLOWSTATE_TOKEN", f" {TOKEN}\n")
    async with fs.Engine(server.url) as engine:
        ctx = fs.StateCtx.new("with-token")
        await engine.do(fs.Commit(fs.Transit(ctx, "x")))
        assert (await engine.get_state("with-token")).current.rev == ctx.committed.rev
        assert TOKEN not in repr(engine.driver)
    with pytest.raises(fs.DriverError, match="refused"):
        async with HTTPDriver(server.url, token="wrong"):
            pass


def test_the_server_reads_flowstate_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    with ServeProcess(url, env={"FLOWSTATE_TOKEN": " from-env\n"}) as server:
        assert "token required" in server.wait_line("listening on")
        assert httpx.get(f"{server.url}/api/v1/head").status_code == 401
        ok = httpx.get(f"{server.url}/api/v1/head", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_without_a_token_only_loopback(tmp_path: Path, host: str) -> None:
    result = serve_refused(f"sqlite:///{tmp_path}/store.db", "--host", host, "--port", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"flowstate: error: refusing to listen on {host} without a token")
    assert not (tmp_path / "store.db").exists(), "nothing was opened"


def test_token_file_problems(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    missing = serve_refused(url, "--token-file", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert "cannot read the token file" in missing.stderr
    (tmp_path / "empty").write_text("\n")
    empty = serve_refused(url, "--token-file", str(tmp_path / "empty"))
    assert empty.returncode == 1
    assert "is empty" in empty.stderr
    (tmp_path / "two-lines").write_text("first\nsecond\n")
    two = serve_refused(url, "--token-file", str(tmp_path / "two-lines"))
    assert two.returncode == 1
    assert "cannot hold control characters" in two.stderr
    assert "second" not in two.stderr
    blank_env = serve_refused(url, "--host", "0.0.0.0", env={"FLOWSTATE_TOKEN": " "})
    assert "without a token" in blank_env.stderr, "a blank token is no token"
    bad_env = serve_refused(url, env={"FLOWSTATE_TOKEN": "a\x01b"})
    control = "a token cannot hold control characters (such as a line break)"
    assert bad_env.stderr.splitlines() == [f"flowstate: error: $FLOWSTATE_TOKEN: {control}"]


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.3.4.5")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("10.1.2.3")
    assert not is_loopback("no-such-host.invalid")
