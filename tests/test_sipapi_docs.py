"""docs/scripting.md shows only code that the tests run: each ```python block is taken verbatim from a
file in docs/examples/ that a sipapi test executes, or is the transfer_to_voicemail the Layer 2 test adds,
or is the install() call, checked against the real signature and the test that installs scripts."""

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
        if "install(" in body:
            check_install_snippet(body)
            continue
        # the snippet that lives in the tests themselves
        normalised = body.replace("\n", "\\n")
        assert body in tests or normalised in tests, body[:200]


def check_install_snippet(body: str) -> None:
    """The ``install(...)`` snippet (a peer comes from elsewhere, so it cannot run alone): what it imports
    exists, its call binds to the real signature, the test that installs scripts uses the same keywords,
    and what it returns has the awaitable ``close()`` the snippet calls."""
    import ast
    import inspect

    import sipapi.scripts

    tree = ast.parse(body.replace("...", "pass"))
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [("sipapi.scripts", ["install"])]
    (call,) = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "install"
    ]
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
    signature = inspect.signature(sipapi.scripts.install)
    signature.bind(object(), **keywords)  # TypeError on a keyword install() does not take
    tested = (ROOT / "tests" / "test_sipapi_peer_scripts.py").read_text()
    for keyword in keywords:
        assert f"{keyword}=" in tested, f"install({keyword}=...) is documented but no test passes it"
    closes = [n for n in ast.walk(tree) if isinstance(n, ast.Await)]
    assert closes and "close" in ast.unparse(closes[0])
    assert inspect.iscoroutinefunction(sipapi.scripts.Scripting.close)


def test_the_documented_files_exist_and_are_linked() -> None:
    text = DOC.read_text()
    for name in re.findall(r"\(examples/([a-z_]+\.py)\)", text):
        assert (EXAMPLES / name).is_file(), name
    index = (ROOT / "docs" / "index.md").read_text()
    assert "scripting.md" in index
