"""The pages under docs/ stay true: their Python blocks run, in order, and print what they show.

docs/testing.md holds tests rather than programs; tests/testing/test_docs.py runs it under
pytest. Every other page is run here, block after block, in one fresh directory (so a later
block may use a file an earlier one wrote), and a block followed by a ``text`` block must
print exactly that text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.doc_blocks import DOCS, python_blocks, run_python

PYTEST_PAGES = {"testing.md"}
SCRIPT_PAGES = sorted(page.name for page in DOCS.glob("*.md") if page.name not in PYTEST_PAGES)


@pytest.mark.slow
@pytest.mark.parametrize("page", SCRIPT_PAGES)
def test_the_blocks_run_and_print_what_the_page_shows(page: str, tmp_path: Path) -> None:
    blocks = python_blocks(DOCS / page)
    assert blocks, f"docs/{page} has no Python block to run"
    for number, block in enumerate(blocks, 1):
        result = run_python(block.code, tmp_path)
        where = f"docs/{page}, Python block {number}"
        assert result.returncode == 0, f"{where} failed:\n{result.stderr}"
        assert result.stderr == "", f"{where} wrote to stderr:\n{result.stderr}"
        if block.output is not None:
            assert result.stdout == block.output, f"{where} printed:\n{result.stdout}"


def test_every_page_is_run_by_a_test() -> None:
    pages = {page.name for page in DOCS.glob("*.md")}
    assert PYTEST_PAGES <= pages
    assert set(SCRIPT_PAGES) == pages - PYTEST_PAGES
    assert "guide.md" in SCRIPT_PAGES
