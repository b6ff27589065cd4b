"""The etcd driver against an etcd that serves TLS only, wants client certificates and has
authentication enabled: correct credentials work; a wrong password, a wrong CA and a
plain-text client each fail fast with one clear error; the password shows nowhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc
from aetcd.rpc import auth_pb2

import flowstate as fs
from flowstate.drivers.etcd import PASSWORD_ENV, EtcdDriver
from tests.certificates import Certificates, make_certificates
from tests.etcd_server import EtcdServer, ServerTLS

pytestmark = [pytest.mark.anyio, pytest.mark.etcd]

USER = "flow"
PASSWORD = "s3cret-Pa55"  # distinctive, so that a leak anywhere shows
PREFIX = "secure"


async def _enable_auth(server: EtcdServer, certs: Certificates) -> None:
    """Create root and a user allowed the store's prefix only, then enable authentication."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key.read_bytes(),
        certificate_chain=certs.client_cert.read_bytes(),
    )
    async with rpc.secure_channel(server.endpoint, credentials) as channel:
        auth = rpc.AuthStub(channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="root-pw"))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.UserAdd(rpc.AuthUserAddRequest(name=USER, password=PASSWORD))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="store"))
        prefix = PREFIX.encode()
        permission = auth_pb2.Permission(
            permType=auth_pb2.Permission.READWRITE, key=prefix, range_end=prefix[:-1] + b"u"
        )
        await auth.RoleGrantPermission(
            rpc.AuthRoleGrantPermissionRequest(name="store", perm=permission)
        )
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=USER, role="store"))
        await auth.AuthEnable(rpc.AuthEnableRequest())


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdServer, Certificates]]:
    base = tmp_path_factory.mktemp("etcd-secure")
    certs = make_certificates(base / "certs")
    tls = ServerTLS(
        certs.server_cert, certs.server_key, certs.ca, certs.client_cert, certs.client_key
    )
    server = EtcdServer(base / "data", tls=tls)
    try:
        server.start()
        server.wait_ready()
        asyncio.run(_enable_auth(server, certs))
        yield server, certs
    finally:
        server.close()


def _url(
    server: EtcdServer, certs: Certificates, *, user: str = USER, ca: Path | None = None
) -> str:
    return (
        f"etcd://{user}@{server.endpoint}/{PREFIX}/t{time.monotonic_ns()}"
        f"?ca={ca or certs.ca}&cert={certs.client_cert}&key={certs.client_key}&timeout=5"
    )


async def test_correct_credentials_work(
    secure: tuple[EtcdServer, Certificates],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, certs = secure
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    url = _url(server, certs)
    with caplog.at_level(logging.DEBUG, logger="flowstate"):
        async with fs.Engine(url) as engine, fs.Engine(url) as other:
            ctx = fs.StateCtx.new("order", labels={"kind": "order"})
            await engine.do(fs.Commit(fs.Transit(ctx, "charge")))
            async with other.watch(labels={"kind": "order"}) as watcher:
                first = await anext(watcher)
                await engine.do(fs.Commit(fs.End(ctx)))
                second = await anext(watcher)
            assert (first.status, second.status) == ("running", "ended")
            driver = engine.driver
            assert isinstance(driver, EtcdDriver)
            lease = await driver.acquire_lease("leader", "me", 5)
            assert lease is not None
            await driver.release_lease(lease)
            shown = [repr(driver), driver.url, repr(engine)]
    assert f"etcd://{USER}@" in driver.url
    assert all(PASSWORD not in text for text in shown)
    assert PASSWORD not in caplog.text


async def test_the_user_may_only_touch_its_prefix(
    secure: tuple[EtcdServer, Certificates], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, certs = secure
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    url = _url(server, certs).replace(f"/{PREFIX}/", "/elsewhere/")
    started = time.monotonic()
    with pytest.raises(fs.DriverError, match="permission denied") as info:
        await fs.open_driver(url).open()
    assert not isinstance(info.value, fs.DriverUnavailableError)
    assert time.monotonic() - started < 3


async def _fails_fast(url: str, match: str) -> fs.DriverError:
    """Opening ``url`` fails with one DriverError, well within the call's 5 s budget."""
    started = time.monotonic()
    driver = fs.open_driver(url)
    with pytest.raises(fs.DriverError, match=match) as info:
        await driver.open()
    assert time.monotonic() - started < 3, "failed fast, not after retrying to the timeout"
    assert not isinstance(info.value, fs.DriverUnavailableError), "retrying cannot help"
    assert PASSWORD not in str(info.value)
    await driver.aclose()
    return info.value


async def test_a_wrong_password_fails_fast(
    secure: tuple[EtcdServer, Certificates], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, certs = secure
    monkeypatch.setenv(PASSWORD_ENV, "not-" + PASSWORD)
    error = await _fails_fast(_url(server, certs), f"refused user '{USER}'")
    assert PASSWORD_ENV in str(error)


async def test_a_wrong_ca_fails_fast(
    secure: tuple[EtcdServer, Certificates], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, certs = secure
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    await _fails_fast(_url(server, certs, ca=certs.wrong_ca), "no TLS connection to etcd")


async def test_a_plain_text_client_fails_fast(secure: tuple[EtcdServer, Certificates]) -> None:
    server, _ = secure
    await _fails_fast(f"etcd://{server.endpoint}/{PREFIX}/plain", "no TLS connection to etcd")


def test_passwords_stay_out_of_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(fs.InvalidURLError, match=f"set {PASSWORD_ENV}"):
        fs.open_driver("etcd://flow@h:1/p")
    with pytest.raises(fs.InvalidURLError, match="never goes in the URL") as info:
        fs.open_driver(f"etcd://flow:{PASSWORD}@h:1/p")
    assert PASSWORD not in str(info.value)
    with pytest.raises(fs.InvalidURLError, match="needs its key"):
        fs.open_driver("etcd://h:1/p?cert=/c.pem")
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    driver = fs.open_driver("etcd://fl%40w@h:1/p?ca=/ca.pem")
    assert isinstance(driver, EtcdDriver)
    assert driver.username == "fl@w"
    assert driver.url == "etcd://fl%40w@h:1/p?ca=/ca.pem"
    assert PASSWORD not in repr(driver)
