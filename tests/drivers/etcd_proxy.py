"""A loopback TCP proxy in front of an etcd member, which a test can cut and restore.

Killing etcd breaks every client at once; the proxy breaks one driver's connections while
etcd keeps serving the others, so a test can change the store (and compact it) exactly while
that driver is cut off::

    async with TcpProxy(server.client_port) as proxy:
        driver = EtcdDriver(proxy.endpoint, prefix)
        ...
        await proxy.cut()      # connections dropped, new ones refused
        ...
        await proxy.restore()  # accepting again, on the same port
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<upstream_port>``, byte for byte."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Future[None]] = set()

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the proxy, as written in an ``etcd://`` URL."""
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        await self.restore()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cut()

    async def restore(self) -> None:
        """Accept connections (again, on the same port)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Drop every connection and refuse new ones; return once every handler is done."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers))
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handlers.add(done)
        self._writers.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
        except OSError:
            writer.transport.abort()
            self._finish(done, writer)
            return
        self._writers.add(upstream_writer)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(reader, upstream_writer))
                group.create_task(self._pipe(upstream_reader, writer))
        finally:
            self._finish(done, writer, upstream_writer)

    def _finish(self, done: asyncio.Future[None], *writers: asyncio.StreamWriter) -> None:
        for writer in writers:
            writer.transport.abort()
            self._writers.discard(writer)
        self._handlers.discard(done)
        done.set_result(None)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy until either side closes, then close both."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
