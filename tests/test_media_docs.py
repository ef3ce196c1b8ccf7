"""Every Python example in docs/media.md runs, in order, each in a fresh namespace inside a temp dir, and the
values its comments promise are checked where they are deterministic."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "media.md"
EXAMPLES = ROOT / "docs" / "examples"


def example_file(code: str) -> Path | None:
    """The docs/examples file a block is copied from (such a file is a program: its own test runs it)."""
    for path in sorted(EXAMPLES.glob("*.py")):
        if code.strip("\n") == path.read_text().strip("\n"):
            return path
    return None


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "__docs__"})
    return out.getvalue()


def test_there_are_examples() -> None:
    assert len(examples()) >= 9


def test_example_programs_are_run_by_a_test() -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    programs = [path for code in examples() if (path := example_file(code)) is not None]
    assert programs, "the voicemail example is shown"
    for path in programs:
        assert f'"{path.name}"' in tests, f"{path.name} is shown in media.md but no test runs it"


# A block copied from a docs/examples program is not exec'd here: its own test runs it as a program
# (test_example_programs_are_run_by_a_test checks that one does), so it is left out rather than skipped.
@pytest.mark.parametrize("index", [i for i, code in enumerate(examples()) if example_file(code) is None])
def test_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = examples()[index]
    monkeypatch.chdir(tmp_path)
    output = run(code)
    if "out.wav" in code:  # the quick start
        lines = output.split("\n")
        received, lost = map(int, lines[0].split())
        assert 45 <= received <= 55 and lost == 0
        seconds, peak = lines[1].split()
        assert abs(float(seconds) - 1.0) <= 0.05 and peak == "1000"
    if 'make_offer("192.0.2.10"' in code:
        assert "m=audio 40000 RTP/AVP 0 8 101" in output
        assert "PCMA ('192.0.2.20', 50000) 101 sendrecv" in output
        assert "recvonly 1\nTrue False\nsendrecv\n0 True\n" in output
        assert "488 bad SDP: media stream 1 (audio) has no c= line" in output
    if "bob got" in code:
        assert output.count("bob got") == 5 and "1234#\n" in output
    if "voicemail" in code:
        assert 0.9 <= float(output.strip()) <= 1.6
    if "meter()" in code:
        count, level = map(int, output.split())
        assert 18 <= count <= 22 and abs(level - 11585) < 300
    if "accept_with_media" in code:  # calls with audio through the UserAgent
        lines = output.split("\n")
        assert sorted(lines) == sorted(
            ["digits 42", "200 sendonly", "200 sendrecv", "bye received", "500", "1000", ""]
        ), output
    if "CallMedia.open" in code:
        assert output.split() == ["PCMU", "sendonly", "1000"]
    if "JitterBuffer(prefetch=2)" in code:
        assert output.split("\n")[:3] == [
            "172 True",
            "[b'frame1', b'frame2', b'frame3', None]",
            "1 64 0",
        ]
