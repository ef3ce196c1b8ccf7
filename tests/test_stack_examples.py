"""Every runnable example of docs/stack.md is executed here, and the script shown inline in the page is
the file that runs (so the documentation cannot drift from working code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import free_port, require_tool

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = DOCS / "examples"


def run_example(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_example_is_documented() -> None:
    page = (DOCS / "stack.md").read_text()
    for path in sorted(EXAMPLES.glob("stack_*.py")):
        assert f"examples/{path.name}" in page, f"{path.name} is not mentioned in docs/stack.md"


def test_the_inline_sipp_script_is_the_file() -> None:
    page = (DOCS / "stack.md").read_text()
    source = (EXAMPLES / "stack_call_sipp.py").read_text()
    assert source.strip() in page


def test_two_phones_example() -> None:
    out = run_example("stack_two_phones.py")
    assert "alice: call state confirmed" in out
    assert "bob got: are you there? | alice got: 200 OK" in out
    assert "alice: BYE -> 200 | bob: bye received" in out


def test_forking_proxy_example() -> None:
    out = run_example("stack_forking_proxy.py")
    assert "desk phone: cancelled" in out


def test_proxy_hooks_example() -> None:
    out = run_example("stack_proxy_hooks.py")
    # No answer: the phone's branch is CANCELled by ctx.cancel_pending, its 487 held back by on_final.
    assert "phone: 487 -> voicemail" in out
    assert "phone: 486 -> voicemail" in out  # busy: the 486 is held back, the call forwarded again
    assert "no answer: answered by <sip:vm@" in out and "busy: answered by <sip:vm@" in out


def test_the_inline_proxy_hooks_class_is_the_file() -> None:
    page = (DOCS / "stack.md").read_text()
    source = (EXAMPLES / "stack_proxy_hooks.py").read_text()
    start = source.index("class ForwardOnFailure")
    end = source.index("async def main")
    assert source[start:end].strip() in page


def test_call_sipp_example() -> None:
    sipp = require_tool("sipp")
    port = free_port()
    uas = subprocess.Popen(
        [sipp, "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-nostdin"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = run_example("stack_call_sipp.py", f"sip:service@127.0.0.1:{port}")
        assert "answered: 200" in out and "hung up: 200" in out
    finally:
        uas.terminate()
        try:
            uas.wait(10)
        except subprocess.TimeoutExpired:
            uas.kill()
            uas.wait()
