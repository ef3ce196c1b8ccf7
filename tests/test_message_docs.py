"""Every ```python block of docs/message.md runs, in order, in one namespace: the examples stay true."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "message.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_examples() -> None:
    assert len(_blocks()) >= 6


def test_doc_examples_run() -> None:
    namespace: dict[str, object] = {}
    for number, block in enumerate(_blocks(), 1):
        code = compile(block, f"docs/message.md block {number}", "exec")
        exec(code, namespace)
