"""Web pages shown by the browsers of the server's own machine can neither write to nor read a
server without a token: a body that is not JSON is a 415 (a cross-site form needs no CORS
preflight), a request for a name that is not loopback is a 421 (DNS rebinding), and a request
that changes something from another origin is a 403. The console, a page of the server's
own, keeps working.

One real ``flowstate serve`` process on SQLite, without a token, serves the module; the
browser tests drive Debian's Chromium.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, expect

import flowstate as fs
from flowstate.server._origin import loopback_authority
from flowstate.workflows import FlowManager, FlowStatus
from tests.serve_process import ServeProcess
from tests.server.answers import head_rev, json_error
from tests.server.console_browser import CHROMIUM, LAUNCH_FLAGS, in_thread

pytestmark = pytest.mark.slow

#: A page of another site, as the browser shows it (Playwright answers for it).
ATTACKER = "http://attacker.test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    store = tmp_path_factory.mktemp("web-pages") / "store.db"
    with ServeProcess(f"sqlite:///{store}") as server:
        yield server


@pytest.fixture
def port(server: ServeProcess) -> int:
    found = urlsplit(server.url).port
    assert found is not None
    return found


def fresh_id() -> str:
    return f"page-{uuid.uuid4().hex[:10]}"


def commit_body(state_id: str) -> dict[str, Any]:
    return {"writes": [{"state": {"id": state_id, "transition": {"to": "x"}}, "expected_rev": 0}]}


async def stored(client: httpx.AsyncClient, state_id: str) -> bool:
    response = await client.get(f"/api/v1/states/{state_id}")
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


# -- bodies that are not JSON -----------------------------------------------------------------

LEASE = {"name": "page-lease", "holder": "page", "token": 1, "ttl": 60}

#: Every route that takes a body, with a body it would take as JSON.
BODY_ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/api/v1/commit", commit_body("form-commit")),
    ("/api/v1/commits", {"commits": [commit_body("form-commits")]}),
    ("/api/v1/states/query", {"labels": {"kind": "order"}}),
    ("/api/v1/leases/page-lease/acquire", {"holder": "page", "ttl": 60}),
    ("/api/v1/leases/page-lease/renew", LEASE),
    ("/api/v1/leases/page-lease/release", LEASE),
    ("/api/v1/flows/execute", {"flow": {"id": "p", "name": "p", "start_task": "t"}}),
    ("/api/v1/flows/form-flow/steps", {"run_id": "r", "task": "t", "status": "running"}),
    ("/api/v1/flows/form-flow/resume", {"patch": {"approved": True}}),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",  # what a cross-site form or a no-cors fetch sends, without preflight
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain; charset=application/json",
        None,  # no Content-Type at all
    ],
)
async def test_a_body_that_is_not_json_is_a_415_and_changes_nothing(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    before = await head_rev(client)
    headers = {"content-type": content_type} if content_type else {}
    for path, body in BODY_ROUTES:
        request = client.build_request("POST", path, json=body)
        del request.headers["content-type"]
        request.headers.update(headers)
        response = await client.send(request)
        message = json_error(response, 415, "unsupported_media_type")
        assert "application/json" in message, message
    assert not await stored(client, "form-commit")
    assert not await stored(client, "form-commits")
    assert (await client.get("/api/v1/leases/page-lease")).json()["lease"] is None
    assert await head_rev(client) == before, "nothing was written"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_a_json_body_is_read_whatever_its_parameters(
    client: httpx.AsyncClient, content_type: str
) -> None:
    state_id = fresh_id()
    response = await client.post(
        "/api/v1/commit",
        content=httpx.Request("POST", "/", json=commit_body(state_id)).content,
        headers={"content-type": content_type},
    )
    assert response.status_code == 200, response.text
    assert await stored(client, state_id)


# -- Host: DNS rebinding ----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host",
    [
        "rebound.example",
        "rebound.example:{port}",
        "127.0.0.1.rebound.example:{port}",
        "localhost.rebound.example",
        "192.168.1.20:{port}",
        "[::2]:{port}",
        "127.0.0.1:port",
    ],
)
async def test_a_name_that_is_not_loopback_is_a_421_for_reads_and_writes(
    client: httpx.AsyncClient, port: int, host: str
) -> None:
    headers = {"host": host.format(port=port)}
    state_id = fresh_id()
    for method, path, body in [
        ("GET", "/health", None),
        ("GET", "/api/v1/states", None),
        ("GET", "/", None),
        ("GET", "/console/app.js", None),
        ("POST", "/api/v1/commit", commit_body(state_id)),
    ]:
        response = await client.request(method, path, json=body, headers=headers)
        message = json_error(response, 421, "misdirected_request")
        assert headers["host"] in message
        assert "states" not in response.text
    assert not await stored(client, state_id)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:{port}", "localhost:{port}", "LocalHost", "[::1]:{port}"]
)
async def test_loopback_names_are_served(client: httpx.AsyncClient, port: int, host: str) -> None:
    headers = {"host": host.format(port=port)}
    assert (await client.get("/health", headers=headers)).status_code == 200
    state_id = fresh_id()
    response = await client.post("/api/v1/commit", json=commit_body(state_id), headers=headers)
    assert response.status_code == 200, response.text
    assert await stored(client, state_id)


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"GET /health HTTP/1.0\r\n\r\n", "no Host header"),
        (
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: rebound.example\r\n"
            + b"Connection: close\r\n\r\n",
            "more than one Host header",
        ),
    ],
)
def test_a_request_without_exactly_one_host_is_a_400(
    server: ServeProcess, port: int, head: bytes, says: str
) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"400", answer
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["type"] == "bad_request"
    assert says in error["message"]


@pytest.mark.parametrize(
    ("host", "authority"),
    [
        ("127.0.0.1", ("127.0.0.1", None)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("127.9.9.9:1", ("127.9.9.9", 1)),
        ("LOCALHOST:80", ("localhost", 80)),
        ("[::1]", ("::1", None)),
        ("[::1]:65535", ("::1", 65535)),
        ("[0:0:0:0:0:0:0:1]:1", ("0:0:0:0:0:0:0:1", 1)),
        ("::1", None),  # an IPv6 address goes in brackets
        ("[::1]x", None),
        ("[::1", None),
        ("127.0.0.1:", None),
        ("127.0.0.1:65536", None),
        ("127.0.0.1:+80", None),
        ("127.0.0.1:٨٠", None),  # digits, but not ASCII ones
        ("localhost.", None),
        ("127.1", None),
        ("10.0.0.1", None),
        ("", None),
    ],
)
def test_loopback_authorities(host: str, authority: tuple[str, int | None] | None) -> None:
    assert loopback_authority(host) == authority


# -- Origin: cross-site writes ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "origin",
    [
        ATTACKER,
        "null",  # a sandboxed frame, a file:// page
        "http://localhost:{port}",  # this machine, but another name: another origin
        "http://127.0.0.1:{other}",  # another server on this machine
        "https://127.0.0.1:{port}",
        "http://127.0.0.1:{port}/path",
    ],
)
async def test_a_write_from_another_origin_is_a_403_and_changes_nothing(
    client: httpx.AsyncClient, flows: FlowManager, port: int, origin: str
) -> None:
    headers = {"origin": origin.format(port=port, other=port + 1)}
    state_id = fresh_id()
    refused = await client.post("/api/v1/commit", json=commit_body(state_id), headers=headers)
    assert headers["origin"] in json_error(refused, 403, "forbidden")
    assert not await stored(client, state_id)
    # A route without a body is guarded by the origin alone.
    flow = await flows.start((await flows.create(controller="pages")).id)
    cancel = await client.post(f"/api/v1/flows/{flow.id}/cancel", headers=headers)
    json_error(cancel, 403, "forbidden")
    assert (await flows.get(flow.id)).status is FlowStatus.RUNNING
    # Reading is left to the browser, which shows another site nothing it did not allow.
    assert (await client.get(f"/api/v1/flows/{flow.id}", headers=headers)).status_code == 200


@pytest.mark.anyio
async def test_a_write_from_the_servers_own_origin_is_served(
    client: httpx.AsyncClient, server: ServeProcess
) -> None:
    state_id = fresh_id()
    response = await client.post(
        "/api/v1/commit", json=commit_body(state_id), headers={"origin": server.url}
    )
    assert response.status_code == 200, response.text
    assert await stored(client, state_id)


# -- in a browser -----------------------------------------------------------------------------


@pytest.mark.browser
def test_a_cross_site_form_stores_nothing(browser: Browser, server: ServeProcess) -> None:
    # The classic: a form whose text/plain body is JSON once its one field's "=" is padded.
    state_id = fresh_id()
    name = json.dumps(commit_body(state_id))[:-1] + ', "pad": "'
    page_html = f"""<!doctype html><form method="post" enctype="text/plain"
        action="{server.url}/api/v1/commit"><input name='{name}' value='"}}'></form>"""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.route(
            f"{ATTACKER}/", lambda route: route.fulfill(body=page_html, content_type="text/html")
        )
        page.goto(f"{ATTACKER}/")
        with page.expect_response(f"{server.url}/api/v1/commit") as answered:
            page.eval_on_selector("form", "form => form.submit()")
        assert answered.value.status == 403, answered.value.text()
    finally:
        context.close()
    assert httpx.get(f"{server.url}/api/v1/states/{state_id}").status_code == 404


@pytest.mark.browser
def test_a_rebound_name_reads_nothing(browser: Browser, server: ServeProcess, port: int) -> None:
    # The browser resolves the page's name to this machine, as a rebinding DNS server makes
    # it do once the page is loaded: to the browser, the server is the page's own site.
    state_id = fresh_id()
    created = httpx.post(f"{server.url}/api/v1/commit", json=commit_body(state_id))
    assert created.status_code == 200, created.text
    rules = "--host-resolver-rules=MAP rebound.test 127.0.0.1"
    rebinding = browser.browser_type.launch(
        executable_path=str(CHROMIUM), args=[*LAUNCH_FLAGS, rules]
    )
    try:
        page = rebinding.new_page()
        response = page.goto(f"http://rebound.test:{port}/api/v1/states?limit=1000")
        assert response is not None
        assert response.status == 421
        assert state_id not in page.content()
        read = page.evaluate("fetch('/api/v1/head').then(r => r.status)")
        assert read == 421
    finally:
        rebinding.close()


@pytest.mark.browser
def test_the_console_acts_on_flows_without_a_token(browser: Browser, server: ServeProcess) -> None:
    async def waiting_flows() -> tuple[str, str]:
        async with fs.Engine(server.url) as engine:
            flows = FlowManager(engine)
            ids = []
            for _ in range(2):
                flow = await flows.start((await flows.create(controller="console")).id)
                await flows.wait(flow.id, {"kind": "approval"})
                ids.append(flow.id)
        return ids[0], ids[1]

    to_resume, to_cancel = in_thread(waiting_flows)
    context = browser.new_context()
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{server.url}/#/flows/{to_resume}")
        expect(page.locator("h1")).to_have_text(to_resume)
        page.click('button[data-action="resume"]')
        page.fill("#resume-patch", '{"approved": true}')
        page.keyboard.press("Enter")
        expect(page.locator("#confirm")).to_be_hidden()
        expect(page.locator("pre.json")).to_contain_text('"approved": true')
        page.goto(f"{server.url}/#/flows/{to_cancel}")
        expect(page.locator("h1")).to_have_text(to_cancel)
        page.click('button[data-action="cancel"]')
        page.keyboard.press("Enter")
        expect(page.locator(".detail-side .fields .badge").first).to_have_text("cancelled")
        assert not errors, errors
    finally:
        context.close()

    async def statuses() -> list[FlowStatus]:
        async with fs.Engine(server.url) as engine:
            flows = FlowManager(engine)
            return [(await flows.get(i)).status for i in (to_resume, to_cancel)]

    assert in_thread(statuses) == [FlowStatus.RUNNING, FlowStatus.CANCELLED]
