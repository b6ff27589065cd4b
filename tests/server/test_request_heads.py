"""Request heads (the request line and the headers) are bounded: one too large is answered at
once with 431 (414 while it is still the URL), in the JSON error shape, and the server never
holds more of it than the bound; so are a chunked body's trailers. Requests the parser cannot
read get the JSON shape too.

One real ``flowstate serve`` process with a token serves the module; the requests go through
raw sockets, since no HTTP client sends such heads.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest

from flowstate.server._uvicorn import MAX_HEAD_SIZE
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.slow

TOKEN = "heads-token"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
BIG = 2_000_000  # bytes of one header line: 30 times the bound

#: A response read off a socket: its status, its headers (lower-case names) and its body.
Answer = tuple[int, dict[str, str], bytes]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    directory = tmp_path_factory.mktemp("heads")
    (directory / "token").write_text(TOKEN)
    args = ("--token-file", str(directory / "token"))
    with ServeProcess(f"sqlite:///{directory}/store.db", *args) as server:
        yield server


def resident_memory(pid: int) -> int:
    """The process's resident memory now (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


def connect(server: ServeProcess) -> socket.socket:
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it ends the connection (10 s at most)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def responses(data: bytes) -> list[Answer]:
    """The responses in ``data``."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        found.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return found


def exchange(server: ServeProcess, request: bytes) -> tuple[list[Answer], float]:
    """Send ``request`` on a connection of its own; the responses and the seconds until the
    server ended the connection."""
    with connect(server) as sock:
        start = time.monotonic()
        sock.sendall(request)
        data = read_to_end(sock)
        return responses(data), time.monotonic() - start


def json_error(response: Answer, status: int, type_: str) -> str:
    """The message of ``response``, an error of ``status`` and ``type_`` in the JSON shape,
    after which the server closes the connection."""
    got, headers, body = response
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error: dict[str, Any] = msgspec.json.decode(body)["error"]
    assert error["type"] == type_
    message: str = error["message"]
    return message


def test_a_huge_header_is_refused_at_once_and_never_held(server: ServeProcess) -> None:
    assert server.pid is not None
    # Large ordinary headers fit: an 8 KB cookie, and heads of most of the bound.
    headers = {"Authorization": f"Bearer {TOKEN}", "Cookie": "c=" + "x" * 8000}
    headers.update({f"X-Extra-{n}": "y" * 8000 for n in range(6)})
    assert httpx.get(f"{server.url}/api/v1/head", headers=headers).status_code == 200
    before = resident_memory(server.pid)
    # Eight connections each send 2 MB of one header line, without ending it, and keep
    # their connection open: a server reading it all would hold 16 MB.
    sockets = []
    try:
        for _ in range(8):
            sock = connect(server)
            sockets.append(sock)
            start = time.monotonic()
            sock.sendall(b"GET /api/v1/head HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * BIG)
            (answer,) = responses(read_to_end(sock))
            assert time.monotonic() - start < 5
            message = json_error(answer, 431, "headers_too_large")
            assert str(MAX_HEAD_SIZE) in message
        grown = resident_memory(server.pid) - before
    finally:
        for sock in sockets:
            sock.close()
    assert grown < 5_000_000, f"the server's memory grew by {grown / 1e6:.1f} MB"
    # The head is refused before the token is checked: an ended header line is no different.
    ended = b"GET /api/v1/head HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * BIG + b"\r\n\r\n"
    (answer,), seconds = exchange(server, ended)
    json_error(answer, 431, "headers_too_large")
    assert seconds < 5
    assert httpx.get(f"{server.url}/api/v1/head", headers=headers).status_code == 200


def test_a_url_too_long_is_a_json_414(server: ServeProcess) -> None:
    path = "/api/v1/states/" + "y" * 70_000
    (answer,), _ = exchange(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert "URL" in json_error(answer, 414, "url_too_long")
    # A long URL within the bound is read.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    found = httpx.get(f"{server.url}/api/v1/states/{'y' * 60_000}", headers=headers)
    assert found.status_code == 404, found.text
    assert found.json()["error"]["type"] == "not_found"


def test_trailers_too_large_are_refused(server: ServeProcess) -> None:
    def chunked(trailer: bytes) -> bytes:
        body = b"{}"
        return (
            b"POST /api/v1/states/query HTTP/1.1\r\nHost: x\r\n"
            + AUTH
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            + b"Connection: close\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailer)
        )

    (answer,), seconds = exchange(server, chunked(b"X-Trailer: " + b"t" * BIG + b"\r\n"))
    assert "trailers" in json_error(answer, 431, "headers_too_large")
    assert seconds < 5
    (answer,), _ = exchange(server, chunked(b"X-Trailer: small\r\n"))
    assert answer[0] == 200, answer


def test_a_request_the_parser_cannot_read_is_a_json_400(server: ServeProcess) -> None:
    (answer,), _ = exchange(server, b"GET /api/v1/head HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n")
    json_error(answer, 400, "bad_request")


def test_a_head_too_large_after_a_request_in_flight_is_answered_after_it(
    server: ServeProcess,
) -> None:
    # Pipelined: a long poll, then a head too large; the poll's answer comes first.
    head = httpx.get(f"{server.url}/api/v1/head", headers={"Authorization": f"Bearer {TOKEN}"})
    poll = f"GET /api/v1/head?wait_for={head.json()['rev'] + 1}&timeout=0.5 HTTP/1.1\r\n"
    request = poll.encode() + b"Host: x\r\n" + AUTH + b"\r\n"
    request += b"GET /api/v1/head HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * BIG + b"\r\n\r\n"
    (first, second), _ = exchange(server, request)
    assert first[0] == 200, first
    json_error(second, 431, "headers_too_large")


def test_a_bad_body_after_a_request_in_flight_is_answered_after_it(server: ServeProcess) -> None:
    # Pipelined: a long poll, then a chunked body the parser refuses; the poll's answer
    # comes first, and the server logs no error.
    head = httpx.get(f"{server.url}/api/v1/head", headers={"Authorization": f"Bearer {TOKEN}"})
    poll = f"GET /api/v1/head?wait_for={head.json()['rev'] + 1}&timeout=0.5 HTTP/1.1\r\n"
    request = poll.encode() + b"Host: x\r\n" + AUTH + b"\r\n"
    request += b"POST /api/v1/states/query HTTP/1.1\r\nHost: x\r\n" + AUTH
    request += b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    logged = len(server.output)
    (first, second), _ = exchange(server, request)
    assert first[0] == 200, first
    json_error(second, 400, "bad_request")
    assert "Traceback" not in server.output[logged:]
