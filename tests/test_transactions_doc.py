"""Every ```python block of docs/transactions.md runs, in order, in one namespace (the doc stays true)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "transactions.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_doc_has_examples_for_transactions_dialogs_and_digest() -> None:
    text = "\n".join(python_blocks())
    for name in ("InviteClientTransaction", "TransactionLayer", "Dialog.uac", "DigestServer", "timer_c=True"):
        assert name in text


def test_doc_examples_run() -> None:
    namespace: dict[str, object] = {"__name__": "docs_transactions"}
    for number, block in enumerate(python_blocks(), 1):
        code = compile(block, f"{DOC.name}:block{number}", "exec")
        exec(code, namespace)
