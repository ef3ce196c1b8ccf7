"""docs/scripting.md shows only code that the tests run: each ```python block is taken verbatim from a
file in docs/examples/ that a sipapi test executes (or is the transfer_to_voicemail the Layer 2 test adds,
or the install() call it makes)."""

from __future__ import annotations

import re

from test_sipapi_support import EXAMPLES, ROOT

DOC = ROOT / "docs" / "scripting.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_code_block_comes_from_a_tested_file() -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_sipapi_*.py"))
    sources = {p.name: p.read_text() for p in EXAMPLES.glob("*.py")}
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 10
    for block in blocks:
        body = block.strip("\n")
        if body == "from sipapi import *":
            continue
        found = [name for name, text in sources.items() if body in text]
        if found:
            for name in found:
                assert name in tests, f"{name} is shown in scripting.md but no test runs it"
            continue
        # the two snippets that live in the tests themselves
        normalised = body.replace("\n", "\\n")
        assert body.splitlines()[0] in tests or normalised in tests or "install(" in body, body[:200]


def test_the_documented_files_exist_and_are_linked() -> None:
    text = DOC.read_text()
    for name in re.findall(r"\(examples/([a-z_]+\.py)\)", text):
        assert (EXAMPLES / name).is_file(), name
    index = (ROOT / "docs" / "index.md").read_text()
    assert "scripting.md" in index
