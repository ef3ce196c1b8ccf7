"""docs/security.md must stay true: every test it cites as evidence exists (file, and test function when
named), so a claim cannot outlive the test behind it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"tests/([\w/]+\.py)(?:::\s*(\w+))?")


def test_every_cited_test_exists() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    cited = CITATION.findall(text)
    assert cited, "docs/security.md cites no tests"
    for path, name in cited:
        source = ROOT / "tests" / path
        assert source.exists(), f"docs/security.md cites missing tests/{path}"
        if name:
            tree = ast.parse(source.read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
            assert name in names, f"docs/security.md cites tests/{path}::{name}, which does not exist"
