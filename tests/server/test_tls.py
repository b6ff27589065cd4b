"""``flowstate serve --tls-cert --tls-key``: HTTPS end to end, with the remote driver's ``?ca=``
checking the certificate, and clear errors when the certificate or the scheme is wrong."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import flowstate as fs
from tests.certificates import Certificates, make_certificates
from tests.serve_process import ServeProcess, serve_refused

# The module starts `flowstate serve` processes of its own.
pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[ServeProcess]:
    store = tmp_path_factory.mktemp("tls") / "store.db"
    tls = ("--tls-cert", str(certificates.server_cert), "--tls-key", str(certificates.server_key))
    with ServeProcess(f"sqlite:///{store}", *tls) as server:
        yield server


async def test_the_remote_driver_stores_over_https(
    server: ServeProcess, certificates: Certificates
) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    async with fs.Engine(f"{server.url}?ca={certificates.ca}") as engine:
        async with engine.watch(id="order-1") as watcher:
            ctx = fs.StateCtx.new("order-1", labels={"kind": "order"})
            await engine.do(fs.Commit(fs.Transit(ctx, "pay")))
            seen = await asyncio.wait_for(anext(watcher), 30)
        stored = (await engine.get_state("order-1")).committed
    assert (seen.rev, seen.transition.to) == (stored.rev, "pay")
    verify = ssl.create_default_context(cafile=certificates.ca)
    async with httpx.AsyncClient(verify=verify) as client:
        health = await client.get(f"{server.url}/health")
    assert health.status_code == 200


async def test_a_certificate_it_cannot_verify_is_a_permanent_error(
    server: ServeProcess, certificates: Certificates
) -> None:
    for url in (f"{server.url}?ca={certificates.wrong_ca}", server.url):
        engine = fs.Engine(url)
        with pytest.raises(fs.DriverError, match=r"TLS with .* failed: .*\?ca= names") as caught:
            await engine.open()
        assert not isinstance(caught.value, fs.DriverUnavailableError), "retrying cannot help"


async def test_plain_http_to_it_is_refused(server: ServeProcess) -> None:
    with pytest.raises(fs.DriverUnavailableError):
        await fs.Engine(server.url.replace("https://", "http://")).open()


async def test_https_to_a_plain_server_is_a_permanent_error(tmp_path: Path) -> None:
    with ServeProcess(f"sqlite:///{tmp_path}/store.db") as plain:
        with pytest.raises(fs.DriverError, match=r"TLS with .* failed: .*speak HTTPS") as caught:
            await fs.Engine(plain.url.replace("http://", "https://")).open()
        assert not isinstance(caught.value, fs.DriverUnavailableError)
        assert await asyncio.to_thread(plain.stop, signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("which", "error"),
    [
        ("cert only", "--tls-cert and --tls-key go together: give both, or neither"),
        ("wrong key", "cannot serve TLS with"),
        ("missing", "cannot serve TLS with"),
    ],
)
def test_bad_tls_options_stop_it_with_one_line(
    tmp_path: Path, certificates: Certificates, which: str, error: str
) -> None:
    args = {
        "cert only": ["--tls-cert", str(certificates.server_cert)],
        "wrong key": [
            "--tls-cert",
            str(certificates.server_cert),
            "--tls-key",
            str(certificates.client_key),
        ],
        "missing": ["--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(tmp_path / "no.key")],
    }[which]
    result = serve_refused(f"sqlite:///{tmp_path}/store.db", *args)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"flowstate: error: {error}")
