"""open_driver: URL schemes, plugins, and the errors for URLs that cannot work."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import AsyncIterator

import pytest

import flowstate as fs
from flowstate.drivers import base
from flowstate.drivers.memory import MemoryDriver


class PluginDriver(MemoryDriver):
    scheme = "plugin"

    @classmethod
    def from_url(cls, url: str) -> PluginDriver:
        return cls()


def test_builtin_schemes() -> None:
    assert isinstance(fs.open_driver("memory://"), MemoryDriver)
    assert isinstance(fs.open_driver("MEMORY://"), MemoryDriver)


@pytest.mark.parametrize(
    "url", ["", "memory", "/tmp/x.db", "sqlite:/x.db", "sqlite:///\ud800.db", "memory://\udc80"]
)
def test_malformed_url(url: str) -> None:
    with pytest.raises(fs.InvalidURLError):
        fs.open_driver(url)


def test_not_a_string() -> None:
    with pytest.raises(fs.InvalidURLError):
        fs.open_driver(42)  # type: ignore[arg-type]


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(fs.UnknownDriverError, match=r"known schemes: .*memory.*postgresql") as info:
        fs.open_driver("mongodb://localhost/db")
    assert isinstance(info.value, LookupError)


def test_registered_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_REGISTERED", {})
    base.register_driver("plugin", PluginDriver)
    assert isinstance(fs.open_driver("plugin://anything"), PluginDriver)


def test_entry_point_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    entry_point = importlib.metadata.EntryPoint(
        name="plugin", value=f"{__name__}:PluginDriver", group=base.ENTRY_POINT_GROUP
    )

    def entry_points(**params: str) -> list[importlib.metadata.EntryPoint]:
        if params.get("group") != base.ENTRY_POINT_GROUP:
            return []
        if "name" in params and params["name"] != entry_point.name:
            return []
        return [entry_point]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert isinstance(fs.open_driver("plugin://x"), PluginDriver)


def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "flowstate.drivers.etcd", raising=False)
    monkeypatch.setitem(sys.modules, "aetcd", None)  # makes `import aetcd` fail
    with pytest.raises(fs.MissingDependencyError, match=r"pip install 'flowstate-engine\[etcd\]'"):
        fs.open_driver("etcd://127.0.0.1:2379/flowstate")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_missing_postgres_extra_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    monkeypatch.delitem(sys.modules, "flowstate.drivers.postgres", raising=False)
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # makes `import asyncpg` fail
    with pytest.raises(
        fs.MissingDependencyError, match=r"pip install 'flowstate-engine\[postgres\]'"
    ):
        fs.open_driver(f"{scheme}://localhost/db")


def test_hide_password() -> None:
    assert base.hide_password("etcd://user:secret@h:2379/p") == "etcd://user:***@h:2379/p"
    assert base.hide_password("sqlite:///x.db") == "sqlite:///x.db"


@pytest.fixture
async def engine() -> AsyncIterator[fs.Engine]:
    async with fs.Engine("memory://") as engine:
        yield engine


@pytest.mark.anyio
async def test_engine_owns_a_driver_it_opened_from_a_url(engine: fs.Engine) -> None:
    driver = engine.driver
    await engine.aclose()
    with pytest.raises(fs.ClosedError):
        await driver.head_rev()


@pytest.mark.parametrize("driver", [object(), 123, None, b"memory://"])
def test_engine_rejects_other_driver_types(driver: object) -> None:
    with pytest.raises(fs.InvalidURLError, match="driver URL or a Driver"):
        fs.Engine(driver)  # type: ignore[arg-type]
