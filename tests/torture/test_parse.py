"""The torture corpus at the parser: valid messages parse to the stated values, invalid ones raise
``ParseError`` (and nothing else) with the status the case names."""

from __future__ import annotations

import pytest

from p2psip.errors import ParseError
from p2psip.message import Request, StreamFramer, parse

from .corpus import Case, load_all, resolve

CASES = load_all()
VALID = [c for c in CASES if c.valid]

# Invalid messages the message layer still accepts (each an xfail naming the gap). Empty now: the last one,
# i25_nul_in_header, is refused since the message layer's NUL fix, so a regression fails the run.
KNOWN_PARSER_GAPS: dict[str, str] = {}
INVALID = [
    pytest.param(c, id=c.name, marks=pytest.mark.xfail(reason=KNOWN_PARSER_GAPS[c.name], strict=False))
    if c.name in KNOWN_PARSER_GAPS
    else pytest.param(c, id=c.name)
    for c in CASES
    if not c.valid
]


def _show(value: object) -> str:
    return "None" if value is None else str(value)


def test_corpus_is_substantial() -> None:
    assert len(VALID) >= 20 and len(CASES) - len(VALID) >= 25
    assert all(c.checks for c in VALID), "every valid case states what it must parse to"


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_valid_case_parses_to_stated_values(case: Case) -> None:
    msg = parse(case.data)
    assert isinstance(msg, Request) == case.is_request
    wrong = []
    for path, expected in case.checks:
        try:
            got = _show(resolve(msg, path))
        except Exception as exc:  # reported with the other mismatches
            got = f"<{type(exc).__name__}: {exc}>"
        if got != expected:
            wrong.append(f"{path}: got {got!r}, expected {expected!r}")
    assert not wrong, f"{case.name} ({case.about}):\n" + "\n".join(wrong)


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_valid_case_survives_serialisation(case: Case) -> None:
    """bytes(parse(x)) parses again to the same values: what a proxy forwards means what it received."""
    again = parse(bytes(parse(case.data)))
    for path, expected in case.checks:
        assert _show(resolve(again, path)) == expected, f"{case.name}: {path} changed after bytes()"


@pytest.mark.parametrize("case", INVALID)
def test_invalid_case_raises_parse_error(case: Case) -> None:
    lazy = case.extra.get("lazy")
    try:
        msg = parse(case.data)
        if lazy:
            resolve(msg, lazy)  # the property that holds the defect must refuse to give a value
    except ParseError as exc:
        assert exc.status in case.status, (
            f"{case.name}: status {exc.status}, want {case.status}"
        )
        assert str(exc), "a ParseError says what was wrong"
    except Exception as exc:  # the point: anything but ParseError is a bug
        pytest.fail(f"{case.name}: raised {type(exc).__name__}: {exc} instead of ParseError")
    else:
        pytest.fail(f"{case.name} ({case.about}) parsed without error")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_stream_framing(case: Case) -> None:
    """On a stream the framer either yields the message (then it parses as on a datagram) or raises
    ParseError or waits for more; it never raises anything else."""
    framer = StreamFramer()
    try:
        frames = framer.feed(case.data)
    except ParseError:
        assert not case.stream_valid, f"{case.name}: framer rejected a message that is valid on a stream"
        return
    if case.stream_valid:
        assert len(frames) == 1, f"{case.name}: framer gave {len(frames)} messages"
        parse(frames[0], datagram=False)
    for frame in frames:
        try:
            parse(frame, datagram=False)
        except ParseError:
            assert not case.stream_valid
