"""A watch stream read slowly costs the server one page of memory, not a backlog.

The store holds about 30 MB of state versions. A client reads the watch stream from the start
through a small socket buffer, a little at a time, so the server could send far faster than it
reads. If the server queued what it cannot send yet, its peak memory would grow by about the
size of the stream; it grows by a few pages at most, since each stream reads the next page of
versions only once the previous one went out.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest

import flowstate as fs
from flowstate.drivers.base import CommitRequest, StateWrite
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.slow

VERSIONS = 3000
SIZE = 10_000  # bytes of annotation per version: about 30 MB in all
PAGE = 100


def peak_memory(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


async def fill(path: Path) -> None:
    async with fs.open_driver(f"sqlite:///{path}") as driver:
        for start in range(0, VERSIONS, 100):
            writes = [
                StateWrite(
                    state=fs.State(id=f"s{i}", annotations={"blob": f"{i:08d}" * (SIZE // 8)}),
                    expected_rev=0,
                )
                for i in range(start, start + 100)
            ]
            await driver.commit(CommitRequest(writes=writes))


def read_slowly(url: str, count: int) -> list[int]:
    """Read ``count`` events of the watch stream through a small receive buffer, pausing
    between reads; return the event ids (revisions) in the order they came."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect((parts.hostname, parts.port))
    try:
        head = f"GET /api/v1/watch?limit={PAGE} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n"
        sock.sendall(head.encode())
        revs: list[int] = []
        buffer = b""
        while len(revs) < count:
            chunk = sock.recv(16 * 1024)
            if not chunk:
                raise AssertionError("the stream ended early")
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                for line in frame.split(b"\n"):
                    if line.startswith(b"id: "):
                        revs.append(int(line[4:]))
            time.sleep(0.001)  # the client's own pace: slower than the server could send
        return revs
    finally:
        sock.close()


def test_a_slow_reader_holds_the_server_back_instead_of_filling_its_memory(
    tmp_path: Path,
) -> None:
    store = tmp_path / "big.db"
    asyncio.run(fill(store))
    with ServeProcess(f"sqlite:///{store}") as server:
        assert server.pid is not None
        # Warm up: one page of versions read, encoded and sent, as a stream does it.
        with urllib.request.urlopen(f"{server.url}/api/v1/states?limit={PAGE}") as response:
            assert len(msgspec.json.decode(response.read())["states"]) == PAGE
        before = peak_memory(server.pid)
        revs = read_slowly(server.url, VERSIONS)
        grown = peak_memory(server.pid) - before
    assert revs == list(range(1, VERSIONS + 1)), "every version, in order, once"
    # Read ahead, it would grow by the whole stream (about 37 MB); it grows by about 6 MB.
    assert grown < 15_000_000, f"the server's peak memory grew by {grown / 1e6:.1f} MB"
