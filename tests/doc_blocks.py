"""The code blocks of the Markdown pages (README.md, docs/*.md), for the tests that run them.

A page's fenced blocks are read in order. A ``python`` block followed directly by a ``text``
block shows what it prints: that text block is its expected output.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from attrs import frozen

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE = re.compile(r"```(\w+)\n(.*?)```", flags=re.DOTALL)


@frozen
class Block:
    """One fenced code block.

    Attributes:
        lang: The fence's language (``python``, ``bash``, ``text``...).
        code: The block's text.
        output: For a ``python`` block directly followed by a ``text`` block, that block's
            text: what the code prints. Otherwise None.
    """

    lang: str
    code: str
    output: str | None = None


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    text = page.read_text()
    fences = list(_FENCE.finditer(text))
    found = []
    for fence, after in zip(fences, [*fences[1:], None], strict=True):
        lang, code = fence.group(1), fence.group(2)
        output = None
        if (
            lang == "python"
            and after is not None
            and after.group(1) == "text"
            and not text[fence.end() : after.start()].strip()
        ):
            output = after.group(2)
        found.append(Block(lang, code, output))
    return found


def python_blocks(page: Path) -> list[Block]:
    """The ``python`` blocks of ``page``, in order."""
    return [block for block in blocks(page) if block.lang == "python"]


def run_python(code: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a script in ``cwd``, warnings as errors, and return what happened."""
    script = cwd / "example.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
