"""Real etcd servers for the tests and benchmarks, started from Debian's ``etcd-server`` binary.

The session fixture :func:`etcd_url` starts one etcd member on free loopback ports with its own
data directory and yields its URL base (``etcd://127.0.0.1:PORT/``); every test then opens its
driver under a fresh key prefix (:func:`unique_url`), so tests never see each other's keys. Set
``FLOWSTATE_ETCD_URL`` to use an existing cluster instead of starting one.

:class:`EtcdServer` and :class:`EtcdCluster` start, stop (by PID) and restart members for the tests
that break the server on purpose. Their methods block; call them from async tests through
``asyncio.to_thread``. Every member started here is killed by its PID when it is closed, and at
interpreter exit at the latest.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple, Self

import aetcd
import grpc
import pytest
from aetcd import rpc

from tests.markers import refuse_in_a_quick_run
from tests.processes import end_process

__all__ = [
    "ENV_URL",
    "ETCD_BINARY",
    "INSTALL_HINT",
    "EtcdCluster",
    "EtcdServer",
    "ServerTLS",
    "etcd_binary",
    "etcd_url",
    "free_ports",
    "raw_client",
    "unique_url",
]

ETCD_BINARY = "/usr/bin/etcd"
INSTALL_HINT = "install it with: apt-get install etcd-server"
ENV_URL = "FLOWSTATE_ETCD_URL"

# Short raft timings keep start-up and leader elections fast on loopback.
_SINGLE_TIMING = ("--heartbeat-interval", "25", "--election-timeout", "250")
_CLUSTER_TIMING = ("--heartbeat-interval", "50", "--election-timeout", "500")

_running: set[EtcdServer] = set()


def etcd_binary() -> str:
    """Return the etcd binary's path, or fail the test session with the install hint."""
    for candidate in (ETCD_BINARY, shutil.which("etcd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"the etcd server binary ({ETCD_BINARY}) is missing; {INSTALL_HINT}")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now.

    The sockets stay bound until all ports are picked, so the kernel cannot hand out one port
    twice.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def unique_url(base: str) -> str:
    """``base`` (an ``etcd://`` URL, with or without a key prefix) under a fresh key prefix."""
    return f"{base.rstrip('/')}/t-{uuid.uuid4().hex}"


async def raw_client(url: str) -> Any:
    """A connected aetcd client on the first ``host:port`` of an ``etcd://`` URL, for tests
    and benchmarks that look at etcd's keys directly, past the driver."""
    host, _, port = url.split("://", 1)[1].split("/", 1)[0].split(",")[0].rpartition(":")
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    return client


def _post_json(url: str, timeout: float, context: ssl.SSLContext | None = None) -> Any:
    """POST ``{}`` to an etcd JSON gateway endpoint and return the decoded answer."""
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.load(response)


class ServerTLS(NamedTuple):
    """PEM files of a member that serves its clients over TLS and wants client certificates:
    the server's certificate and key, the CA it trusts, and a client certificate for the
    harness's own health checks."""

    cert: Path
    key: Path
    ca: Path
    client_cert: Path
    client_key: Path


class EtcdServer:
    """One etcd member on loopback: started, stopped (killed by PID) and restarted on demand.

    Args:
        data_dir: The member's data directory; a restart reuses it.
        name: The member name.
        client_port: Loopback client port; a restart reuses it.
        peer_port: Loopback peer port; a restart reuses it.
        initial_cluster: ``name=peer-url`` pairs of every member (default: this one alone).
        timing: Raft ``--heartbeat-interval`` / ``--election-timeout`` flags.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        name: str = "m0",
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        timing: tuple[str, ...] = _SINGLE_TIMING,
        tls: ServerTLS | None = None,
    ) -> None:
        if client_port is None or peer_port is None:
            client_port, peer_port = free_ports(2)
        self.data_dir = data_dir
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.timing = timing
        self.tls = tls
        self._context: ssl.SSLContext | None = None
        if tls is not None:
            self._context = ssl.create_default_context(cafile=str(tls.ca))
            self._context.load_cert_chain(tls.client_cert, tls.client_key)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"EtcdServer({self.name}, {self.endpoint}, pid={self.pid})"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, as written in an ``etcd://`` URL."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        """The flowstate URL base of this member alone (append a key prefix)."""
        return f"etcd://{self.endpoint}/"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the member without waiting for it (see :meth:`wait_ready`)."""
        if self.is_alive():
            raise RuntimeError(f"etcd member {self.name} is already running")
        binary = etcd_binary()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._log is None:
            self._log = self.log_path.open("ab")
        cluster_state = "existing" if (self.data_dir / "member").exists() else "new"
        command = [
            binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            cluster_state,
            "--initial-cluster-token",
            f"flowstate-{zlib.crc32(self.initial_cluster.encode()):08x}",
            *self._tls_flags(),
            "--logger",
            "zap",
            "--log-level",
            "warn",
            *self.timing,
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        _running.add(self)

    def _tls_flags(self) -> list[str]:
        tls = self.tls
        if tls is None:
            return []
        return [
            "--cert-file",
            str(tls.cert),
            "--key-file",
            str(tls.key),
            "--client-cert-auth",
            "--trusted-ca-file",
            str(tls.ca),
        ]

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until the member reports itself healthy (it has a leader).

        Start-up has no event to wait for, so this polls ``/health`` within a deadline. It then
        checks that the member answering on the port is this one (its peer URL is in the member
        list) and that the process started here is still alive.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive():
                raise RuntimeError(f"etcd member {self.name} exited; see {self.log_path}")
            if self.healthy():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd member {self.name} not healthy after {timeout}s")
            time.sleep(0.05)
        if not self.is_ours():
            raise RuntimeError(f"another etcd answers on {self.endpoint}; see {self.log_path}")
        if not self.is_alive():
            raise RuntimeError(f"etcd member {self.name} exited; see {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.client_url}/health", timeout=1, context=self._context
            ) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def is_ours(self) -> bool:
        """True when the member answering on the client port has this member's peer URL."""
        try:
            if self.tls is not None:
                # etcd's JSON gateway cannot reach a server that wants client certificates.
                peer_urls = asyncio.run(self._peer_urls_over_grpc())
            else:
                members = _post_json(f"{self.client_url}/v3/cluster/member/list", 2)["members"]
                peer_urls = [url for member in members for url in member.get("peerURLs", [])]
        except (OSError, ValueError, KeyError, urllib.error.URLError, rpc.AioRpcError):
            return False
        return self.peer_url in peer_urls

    async def _peer_urls_over_grpc(self) -> list[str]:
        tls = self.tls
        assert tls is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.client_key.read_bytes(),
            certificate_chain=tls.client_cert.read_bytes(),
        )
        async with rpc.secure_channel(self.endpoint, credentials) as channel:
            found = await rpc.ClusterStub(channel).MemberList(rpc.MemberListRequest(), timeout=2)
        return [url for member in found.members for url in member.peerURLs]

    def status(self) -> dict[str, str]:
        """The member's ``Maintenance.Status`` (ids as strings), through the JSON gateway."""
        raw = _post_json(f"{self.client_url}/v3/maintenance/status", 2)
        return {"member_id": str(raw["header"]["member_id"]), "leader": str(raw["leader"])}

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the member by its PID and reap it. Stopping a stopped member does nothing."""
        process = self.process
        if process is None:
            return
        end_process(process, sig, 10)
        self.process = None
        _running.discard(self)

    def restart(self, timeout: float = 30) -> None:
        """Kill the member and start it again on the same data directory and ports."""
        self.stop()
        self.start()
        self.wait_ready(timeout)

    def close(self) -> None:
        """Stop the member and close its log."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None


class EtcdCluster:
    """Three (or ``size``) etcd members on loopback forming one cluster."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        names = [f"m{i}" for i in range(size)]
        ports = free_ports(2 * size)
        pairs = list(zip(ports[::2], ports[1::2], strict=True))
        initial = ",".join(
            f"{name}=http://127.0.0.1:{peer}" for name, (_, peer) in zip(names, pairs, strict=True)
        )
        self.members = [
            EtcdServer(
                base_dir / name,
                name=name,
                client_port=client,
                peer_port=peer,
                initial_cluster=initial,
                timing=_CLUSTER_TIMING,
            )
            for name, (client, peer) in zip(names, pairs, strict=True)
        ]

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The flowstate URL base listing every member."""
        return "etcd://" + ",".join(m.endpoint for m in self.members) + "/"

    def start(self, timeout: float = 60) -> None:
        for member in self.members:
            member.start()
        for member in self.members:
            member.wait_ready(timeout)

    def leader(self, timeout: float = 30) -> EtcdServer:
        """The member that currently leads (waits, bounded, while an election runs)."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[str, EtcdServer] = {}
            leaders = set()
            for member in self.members:
                if not member.is_alive():
                    continue
                with contextlib.suppress(OSError, ValueError, KeyError):
                    status = member.status()
                    ids[status["member_id"]] = member
                    leaders.add(status["leader"])
            if len(leaders) == 1:
                (leader_id,) = leaders
                if leader_id in ids:
                    return ids[leader_id]
            if time.monotonic() > deadline:
                raise TimeoutError("the etcd cluster has no leader")
            time.sleep(0.05)

    def close(self) -> None:
        for member in self.members:
            member.close()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.close()


@pytest.fixture(scope="session")
def etcd_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The URL base of an etcd for this session: ``FLOWSTATE_ETCD_URL`` or a member started here.

    Append a key prefix with :func:`unique_url`. A missing etcd binary fails the session.
    """
    refuse_in_a_quick_run(request, "etcd_url")
    configured = os.environ.get(ENV_URL)
    if configured:
        yield configured
        return
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    try:
        server.start()
        server.wait_ready()
        yield server.url
    finally:
        server.close()
