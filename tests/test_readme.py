"""The README stays true: its Python blocks run, and its two commands are the real ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_blocks import DOCS, ROOT, Block, blocks, python_blocks, run_python

README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
BLOCKS = [(block.lang, block.code) for block in blocks(README_PATH)]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "block", [b for b in python_blocks(README_PATH) if "DriverTests" not in b.code]
)
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    result = run_python(block.code, tmp_path)
    assert result.returncode == 0, result.stderr
    if block.output is not None:
        assert result.stdout == block.output


@pytest.mark.slow
def test_driver_testing_block_passes_under_pytest(tmp_path: Path) -> None:
    (code,) = [c for c in PYTHON if "DriverTests" in c]
    (tmp_path / "test_my_driver.py").write_text(code)
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n"
    )
    result = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\d+ passed", result.stdout)


@pytest.mark.slow
def test_first_example_prints_what_the_readme_says(tmp_path: Path) -> None:
    result = run_python(PYTHON[0], tmp_path)
    assert result.stdout.splitlines() == ["1 running charge", "2 running ship", "3 ended -"]
    promised = "It prints `1 running charge`, `2 running ship`, `3 ended -`"
    assert promised in README


def test_first_python_block_is_at_most_15_lines() -> None:
    lines = [line for line in PYTHON[0].splitlines() if line.strip()]
    assert len(lines) <= 15


def test_the_two_commands() -> None:
    (commands,) = [c for lang, c in BLOCKS if lang == "bash" and "scripts/test" in c]
    demo, tests = commands.strip().splitlines()
    assert demo.endswith("flowstate demo")
    assert tests == "./scripts/test"
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_demo_command_runs(tmp_path: Path) -> None:
    flowstate = Path(sys.executable).parent / "flowstate"
    result = run([str(flowstate), "demo"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "flowstate-demo.db").exists()


def test_performance_figures_come_from_the_results_table() -> None:
    """Every row of the README's performance tables is a row of the committed results."""
    section = README.split("## Performance", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows, "the Performance section quotes the results table"
    results = (ROOT / "benchmarks" / "results" / "results.md").read_text().splitlines()
    header, *figures = rows
    assert header == results[results.index(header)]
    missing = [row for row in figures if row not in results and not row.startswith("|---")]
    assert not missing, f"README rows not in benchmarks/results/results.md: {missing}"


def test_every_docs_page_is_linked() -> None:
    for page in DOCS.glob("*.md"):
        assert f"](docs/{page.name})" in README, f"the README does not link docs/{page.name}"


def test_install_hints_name_the_distribution() -> None:
    # "flowstate" on PyPI is another project; ours is flowstate-engine.
    sources = [ROOT / "flowstate", ROOT / "benchmarks", ROOT / "examples", ROOT / "scripts"]
    pages = [README_PATH, *DOCS.glob("*.md")]
    pages += [path for folder in sources for path in folder.rglob("*") if path.is_file()]
    for page in pages:
        text = page.read_text(errors="replace")
        assert not re.search(r"pip install '?flowstate(\[|\b(?!-))", text), page
    assert "pip install 'flowstate-engine[etcd]'" in README
    assert "pip install 'flowstate-engine[testing]'" in README


def test_images_exist() -> None:
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert "docs/console.png" in images
    for path in images:
        assert (ROOT / path).is_file(), path
