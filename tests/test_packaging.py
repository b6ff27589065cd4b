"""What users install: the built distributions, the version, the extras and the editable install.

The built-wheel test builds the sdist and, from it, the wheel (as a release does), installs the
wheel with its dependencies in a fresh virtualenv, and runs ``flowstate demo`` from there, so
that a file missing from the package, a missing ``py.typed`` or console script, or a wrong
dependency fails here instead of on a user's machine.
"""

from __future__ import annotations

import email.parser
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import flowstate as fs

ROOT = Path(__file__).resolve().parent.parent
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
DISTRIBUTION = "flowstate-engine"
EXTRAS = {"etcd", "testing", "bench", "dev"}


def _changelog_version() -> str:
    match = re.search(r"^## (\d+\.\d+\.\d+\S*)", CHANGELOG, flags=re.MULTILINE)
    assert match is not None, "CHANGELOG.md has no numbered release"
    return match.group(1)


def _run(args: list[str | Path], cwd: Path, timeout: float = 180) -> str:
    """Run a command outside the checkout, with no PYTHONPATH; fail the test if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _package_files() -> set[str]:
    """Every file under flowstate/ that is not a cache: all of it belongs in the wheel."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "flowstate").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


# -- version -------------------------------------------------------------------------------------


def test_the_version_is_the_changelogs_newest_release() -> None:
    assert fs.__version__ == _changelog_version()
    assert importlib.metadata.version(DISTRIBUTION) == fs.__version__
    # Changes land under "Unreleased" until a release gives them a number.
    assert CHANGELOG.index("## Unreleased") < CHANGELOG.index(f"## {fs.__version__}")


@pytest.mark.slow
def test_a_source_tree_that_was_never_installed_still_imports(tmp_path: Path) -> None:
    code = (
        "import importlib.metadata as m\n"
        "def version(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = version\n"
        "import flowstate\n"
        "print(flowstate.__version__)\n"
    )
    assert _run([sys.executable, "-c", code], tmp_path).strip() == "0+unknown"


# -- extras --------------------------------------------------------------------------------------


def test_extras() -> None:
    metadata = importlib.metadata.metadata(DISTRIBUTION)
    assert set(metadata.get_all("Provides-Extra") or []) >= EXTRAS
    requires = metadata.get_all("Requires-Dist") or []

    def extra(name: str) -> set[str]:
        marker = re.compile(rf"extra == (['\"]){name}\1")
        return {re.split(r"[<>=~\[;]", r)[0].strip() for r in requires if marker.search(r)}

    assert extra("testing") == {"pytest", "hypothesis", "anyio"}
    assert extra("etcd") == {"aetcd"}
    # [dev] is ours: every other extra plus our tools, which no other extra holds.
    tools = {"ruff", "mypy", "coverage", "pytest-timeout", "build"}
    others = set(metadata.get_all("Provides-Extra") or []) - {"dev"}
    assert extra("dev") >= set().union(*(extra(name) for name in others)) | tools
    for name in others:
        assert not extra(name) & tools, name


def test_the_testing_kit_without_its_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    importlib.import_module("flowstate.testing")
    monkeypatch.delitem(sys.modules, "flowstate.testing")
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # as if it were not installed
    with pytest.raises(fs.MissingDependencyError) as raised:
        importlib.import_module("flowstate.testing")
    assert str(raised.value) == (
        "flowstate.testing needs pytest, hypothesis and anyio (missing: hypothesis); "
        "install them with: pip install 'flowstate-engine[testing]'"
    )


# -- editable install ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_editable_install_exposes_flowstate_only(tmp_path: Path) -> None:
    code = (
        "import importlib.util as u\n"
        "for name in ('flowstate', 'tests', 'examples', 'benchmarks'):\n"
        "    spec = u.find_spec(name)\n"
        "    print(name, spec.origin if spec else None)\n"
    )
    found = dict(
        line.split(" ", 1) for line in _run([sys.executable, "-c", code], tmp_path).splitlines()
    )
    assert found == {
        "flowstate": str(ROOT / "flowstate" / "__init__.py"),
        "tests": "None",
        "examples": "None",
        "benchmarks": "None",
    }


# -- the built wheel -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_built_wheel_installs_and_runs_the_demo(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", dist, ROOT], tmp_path, timeout=300)
    version = _changelog_version()
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"flowstate_engine-{version}-py3-none-any.whl"
    assert [p.name for p in dist.glob("*.tar.gz")] == [f"flowstate_engine-{version}.tar.gz"]

    info = f"flowstate_engine-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
    assert _package_files() <= names, "files under flowstate/ missing from the wheel"
    assert "flowstate/py.typed" in names
    assert {name.split("/")[0] for name in names} == {"flowstate", info}
    assert metadata["Name"] == DISTRIBUTION
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "MIT"
    assert license_text == (ROOT / "LICENSE").read_text()
    assert set(metadata.get_all("Provides-Extra") or []) >= EXTRAS
    assert re.search(r"^flowstate = flowstate\.cli:main$", entry_points, flags=re.MULTILINE)

    # A fresh virtualenv with the wheel and its dependencies, and nothing of the checkout.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", wheel], tmp_path)
    where = _run([python, "-c", "import flowstate; print(flowstate.__file__)"], tmp_path)
    assert where.startswith(str(venv))
    out = _run([venv / "bin" / "flowstate", "--version"], tmp_path)
    assert out.strip() == f"flowstate {version}"

    out = _run(
        [venv / "bin" / "flowstate", "demo", "--url", f"sqlite:///{tmp_path}/demo.db"], tmp_path
    )
    assert "All 4 orders finished" in out
    assert "the recoverer retried it and it finished" in out

    # The test kit's dependencies are an extra, and the kit says so.
    result = subprocess.run(
        [python, "-c", "import flowstate.testing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "pip install 'flowstate-engine[testing]'" in result.stderr
