"""message/sipfrag bodies (RFC 3420), as the NOTIFYs of a transfer carry them (RFC 3515 §2.4.5).

A transfer reports the progress of the new call as a fragment holding the status line of its latest
response, ``SIP/2.0 180 Ringing``; optionally followed by header lines. :func:`compose` writes such a
fragment, :func:`parse_status` reads the status back (and refuses anything else with a ParseError, 400).
"""

from __future__ import annotations

from typing import NamedTuple

from p2psip.errors import ParseError
from p2psip.message import text_body

__all__ = ["CONTENT_TYPE", "FragStatus", "clean_text", "compose", "parse_status"]

CONTENT_TYPE = "message/sipfrag;version=2.0"
MAX_BYTES = 8192


class FragStatus(NamedTuple):
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def final(self) -> bool:
        return self.status >= 200

    @property
    def success(self) -> bool:
        return 200 <= self.status < 300


def compose(status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """``SIP/2.0 200 OK`` plus any header lines, CRLF-terminated (no body: RFC 3420 allows a partial
    message; the status line is what the REFER sender needs)."""
    if not 100 <= status <= 699:
        raise ValueError(f"status {status} out of range")
    lines = [f"SIP/2.0 {status} {clean_text(reason)}"]
    lines.extend(f"{name}: {clean_text(value)}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def clean_text(text: str) -> str:
    """``text`` on one line: control characters become spaces, runs of white space one space."""
    return " ".join("".join(" " if ord(c) < 32 or c == "\x7f" else c for c in text).split())


def parse_status(data: bytes) -> FragStatus:
    """The status line (and header lines, up to a blank line) of a sipfrag that starts with one."""
    text = text_body(data, "sipfrag body", MAX_BYTES)
    lines = text.replace("\r\n", "\n").split("\n")
    first = lines[0].strip(" \t")
    version, _, rest = first.partition(" ")
    code, _, reason = rest.partition(" ")
    if version.upper() != "SIP/2.0" or len(code) != 3 or not code.isascii() or not code.isdigit():
        raise ParseError(f"sipfrag does not start with a status line: {first[:80]!r}")
    status = int(code)
    if not 100 <= status <= 699:
        raise ParseError(f"sipfrag status {status} out of range")
    if any(ord(c) < 32 and c != "\t" for c in reason):
        raise ParseError("control character in the sipfrag reason phrase")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line.strip():
            break
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or any(c in name for c in " \t"):
            raise ParseError(f"bad sipfrag header line {line[:80]!r}")
        headers.append((name.strip(), value.strip(" \t")))
    return FragStatus(status, reason.strip(" \t"), tuple(headers))
