"""The README stays true: its Python blocks run, and its two commands are the real ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize("code", [c for c in PYTHON if "DriverTests" not in c])
def test_python_block_runs(code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    result = run([sys.executable, "-W", "error", str(script)], tmp_path)
    assert result.returncode == 0, result.stderr


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


def test_first_example_prints_what_the_readme_says(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(PYTHON[0])
    result = run([sys.executable, "-W", "error", str(script)], tmp_path)
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
