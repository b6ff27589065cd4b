"""Real PostgreSQL servers for the tests and benchmarks, from Debian's ``postgresql`` package.

The session fixture :func:`postgres_url` creates a throwaway cluster with ``initdb`` in a
temporary folder, starts ``postgres`` on a free loopback port and yields its URL
(``postgresql://flowstate@127.0.0.1:PORT/postgres``); every test then opens its driver in a
fresh schema (:func:`unique_url`), so tests never see each other's tables. Set
``FLOWSTATE_POSTGRES_URL`` to use an existing server instead of starting one.

PostgreSQL refuses to run as root: when the tests run as root (as CI does), ``initdb`` and
``postgres`` run as the unprivileged ``postgres`` user that Debian's package creates, in a folder
that user owns. The binaries are found under ``/usr/lib/postgresql/<version>/bin`` (the newest
version installed), or on ``PATH``.

Test clusters trade crash safety of the machine for speed: ``fsync=off`` and
``full_page_writes=off`` (a power loss could corrupt them; they live for one session), while
``synchronous_commit`` stays on, so every acknowledged commit has been written to the operating
system before the client hears of it and survives a crash or kill of the server processes,
which is what the restart tests rely on.

:class:`PostgresServer` starts, stops (by the postmaster's PID) and restarts a cluster for the
tests that break the server on purpose. Its methods block; call them from async tests through
``asyncio.to_thread``. Every server started here is stopped when it is closed, and at
interpreter exit at the latest.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Self
from urllib.parse import parse_qsl, urlencode

import pytest

from tests.etcd_server import free_ports
from tests.markers import refuse_in_a_quick_run
from tests.processes import end_process

__all__ = [
    "ENV_URL",
    "INSTALL_HINT",
    "PostgresServer",
    "postgres_bindir",
    "postgres_url",
    "unique_url",
]

ENV_URL = "FLOWSTATE_POSTGRES_URL"
INSTALL_HINT = "install it with: apt-get install postgresql"
#: Where Debian installs each major version's server binaries.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
#: The unprivileged user that runs the server when the tests run as root.
SERVER_USER = "postgres"
#: The superuser of test clusters; host connections from loopback need no password.
SUPERUSER = "flowstate"

_running: set[PostgresServer] = set()


def postgres_bindir() -> Path:
    """The folder of ``initdb`` and ``postgres``, or fail the session with the install hint."""
    candidates = []
    if DEBIAN_ROOT.is_dir():
        versions = [p for p in DEBIAN_ROOT.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        versions.sort(key=lambda p: [int(part) for part in p.name.split(".")], reverse=True)
        candidates += [p / "bin" for p in versions]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres")):
            return folder
    pytest.fail(f"the PostgreSQL server binaries (initdb, postgres) are missing; {INSTALL_HINT}")


def unique_url(base: str) -> str:
    """``base`` (a ``postgresql://`` URL) with a fresh ``schema`` option."""
    location, _, query = base.partition("?")
    options = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "schema"]
    options.append(("schema", f"t_{uuid.uuid4().hex}"))
    return f"{location}?{urlencode(options)}"


class PostgresServer:
    """One throwaway PostgreSQL cluster on loopback: created, started, stopped and restarted.

    Args:
        base_dir: An empty folder for the cluster (created when missing), or None for a new
            temporary folder that :meth:`close` removes. When the tests run as root it must be
            reachable by the ``postgres`` user: pytest's own temporary folders are not, so the
            default is a folder of its own under the system's temporary directory.
        port: The loopback port; a restart reuses it.
        settings: Extra server settings (``-c name=value``).
        hba: Lines put first in ``pg_hba.conf`` (the rest lets every loopback connection in
            without a password), e.g. to make one role authenticate with a password.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        hba: list[str] | None = None,
    ) -> None:
        self._owns_dir = base_dir is None
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="flowstate-pg-"))
        self.base_dir = base_dir
        self.port = port if port is not None else free_ports(1)[0]
        self.settings = dict(settings or {})
        self.hba = list(hba or [])
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._bindir: Path | None = None

    def __repr__(self) -> str:
        return f"PostgresServer(127.0.0.1:{self.port}, pid={self.pid})"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def url(self) -> str:
        """The flowstate URL of the cluster's ``postgres`` database (add ``?schema=...``)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID."""
        return self.process.pid if self.process is not None else None

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- running as the unprivileged user -----------------------------------------------------

    def _user(self) -> pwd.struct_passwd | None:
        """The account to run the server as: None when the tests themselves are not root."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.fail(
                f"PostgreSQL refuses to run as root and there is no {SERVER_USER!r} user to run "
                f"it as; {INSTALL_HINT}"
            )

    def _run(
        self,
        args: list[str],
        *,
        stdin: int | None = None,
        stdout: int | IO[bytes] | None = None,
        stderr: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``args`` (as the unprivileged user when the tests are root).

        The switch of user is ``setpriv``'s, in the new process, not ``Popen(user=...)``'s:
        that one makes Python ``fork()`` the whole test process rather than ``vfork()`` it,
        and a ``fork()`` runs the fork handlers of every library loaded here; gRPC's (loaded by
        the etcd tests) made about one ``initdb`` in three die before it started. ``setpriv``
        executes the command in place, so the PID is still the server's.
        """
        user = self._user()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "HOME": user.pw_dir if user is not None else os.environ.get("HOME", "/"),
        }
        if user is not None:
            setpriv = shutil.which("setpriv", path=env["PATH"])
            if setpriv is None:
                pytest.fail("setpriv (Debian's util-linux) runs PostgreSQL as its own user")
            args = [
                setpriv,
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "--",
                *args,
            ]
        return subprocess.Popen(args, env=env, stdin=stdin, stdout=stdout, stderr=stderr)

    def _chown(self, path: Path) -> None:
        user = self._user()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    # -- lifecycle ----------------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster (``initdb``) unless it exists."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        bindir = self._bindir = self._bindir or postgres_bindir()
        self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._chown(self.base_dir)
        command = [
            str(bindir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",  # a throwaway cluster: see the module docstring
        ]
        initdb = self._run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = initdb.communicate(timeout=120)
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {output.decode(errors='replace')}")
        if self.hba:
            hba_file = self.data_dir / "pg_hba.conf"
            hba_file.write_text("\n".join(self.hba) + "\n" + hba_file.read_text())

    def start(self) -> None:
        """Start the server without waiting for it (see :meth:`wait_ready`)."""
        if self.is_alive():
            raise RuntimeError("the PostgreSQL server is already running")
        self.init()
        bindir = self._bindir or postgres_bindir()
        if self._log is None:
            self._log = self.log_path.open("ab")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.base_dir),
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on",
            "max_connections": "300",
            "log_min_messages": "warning",
            **self.settings,
        }
        command = [str(bindir / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        self.process = self._run(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        _running.add(self)

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the postmaster says it accepts connections.

        Start-up has no event to wait for, so this polls the postmaster's status line in
        ``postmaster.pid`` (``ready`` once it accepts connections) within a deadline, and checks
        that the file names the process started here.
        """
        deadline = time.monotonic() + timeout
        pid_file = self.data_dir / "postmaster.pid"
        while True:
            if not self.is_alive():
                raise RuntimeError(f"the PostgreSQL server exited; see {self.log_path}")
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    if int(lines[0]) != self.pid:
                        raise RuntimeError(f"{pid_file} names another server; see {self.log_path}")
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the PostgreSQL server was not ready after {timeout}s")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Stop the server by its PID and reap it. Stopping a stopped server does nothing.

        ``SIGINT`` is a fast shutdown (clients are disconnected, a checkpoint is written);
        ``SIGQUIT`` an immediate one, as after a crash: the next start replays the WAL.
        """
        process = self.process
        if process is None:
            return
        end_process(process, sig, 30)
        self.process = None
        _running.discard(self)

    def restart(self, sig: int = signal.SIGQUIT, timeout: float = 60) -> None:
        """Stop the server (by default as abruptly as a crash) and start it again on the same
        data and port."""
        self.stop(sig)
        self.start()
        self.wait_ready(timeout)

    def close(self) -> None:
        """Stop the server, close its log and remove a temporary folder."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        server.close()


@pytest.fixture(scope="session")
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a PostgreSQL database for this session: ``FLOWSTATE_POSTGRES_URL`` or a
    cluster started here. Give each test its own schema with :func:`unique_url`. Missing
    server binaries fail the session.
    """
    refuse_in_a_quick_run(request, "postgres_url")
    configured = os.environ.get(ENV_URL)
    if configured:
        yield configured
        return
    with PostgresServer() as server:
        yield server.url
