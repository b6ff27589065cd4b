"""docs/testing.md stays true: its Python blocks run, as one test module, under pytest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_blocks import DOCS, ROOT, blocks

BLOCKS = [(block.lang, block.code) for block in blocks(DOCS / "testing.md")]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


@pytest.mark.slow
def test_the_python_blocks_pass_under_pytest(tmp_path: Path) -> None:
    # The page reads top to bottom, later blocks using what earlier ones defined: run them
    # the same way, as one module.
    (tmp_path / "test_testing_md.py").write_text("\n\n".join(PYTHON))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed is not None, result.stdout
    defined = len(re.findall(r"^(?:async )?def test_", "\n".join(PYTHON), flags=re.MULTILINE))
    assert int(passed.group(1)) >= defined, "every test on the page ran"


def test_the_failure_shown_is_the_one_the_kit_reports() -> None:
    (shown,) = [code for lang, code in BLOCKS if lang == "text" and "InvariantError" in code]
    for line in (
        "charged more than once: {'order-1': 2}",
        "commit #2 (#2 of 'order-1') by flow 'charge', 'order-1' -> 'ship': fail",
        "), FaultSchedule({2: Fault.FAIL})),",
        "commit #3 by recoverer: 'order-1' -> 'charge' (retry 1)",
    ):
        assert line in shown
    # The same lines, produced by the kit, are checked in test_saga.py.
