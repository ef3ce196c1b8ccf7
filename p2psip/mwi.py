"""Message-waiting indication bodies (RFC 3842 ``application/simple-message-summary``), sans-IO.

A voicemail tells a user's phones that messages wait by NOTIFYs of the ``message-summary`` package::

    Messages-Waiting: yes
    Message-Account: sip:jones@voicemail.example.com
    Voice-Message: 2/8 (0/2)

:func:`compose` writes such a body, :func:`parse` reads one (a ParseError, answered 400, for anything that
is not one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from p2psip.errors import ParseError
from p2psip.message import text_body

__all__ = ["CONTENT_TYPE", "EVENT", "Summary", "compose", "parse"]

CONTENT_TYPE = "application/simple-message-summary"
EVENT = "message-summary"
MAX_BYTES = 8192
_COUNTS = re.compile(r"^(\d{1,9})/(\d{1,9})(?:\s*\((\d{1,9})/(\d{1,9})\))?$")
_CLASSES = ("voice-message", "fax-message", "pager-message", "multimedia-message", "text-message", "none")


@dataclass
class Summary:
    """Whether messages wait, for which account, and per message class (new, old, urgent new, urgent old)."""

    waiting: bool
    account: str | None = None
    counts: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


def compose(summary: Summary) -> bytes:
    lines = [f"Messages-Waiting: {'yes' if summary.waiting else 'no'}"]
    if summary.account:
        lines.append(f"Message-Account: {summary.account}")
    for name, (new, old, urgent_new, urgent_old) in summary.counts.items():
        if name not in _CLASSES:
            raise ValueError(f"unknown message class {name!r}")
        label = "-".join(part.capitalize() for part in name.split("-"))
        lines.append(f"{label}: {new}/{old} ({urgent_new}/{urgent_old})")
    return ("\r\n".join(lines) + "\r\n").encode()


def parse(data: bytes) -> Summary:
    text = text_body(data, "message summary", MAX_BYTES)
    summary: Summary | None = None
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ParseError(f"bad message summary line {line[:80]!r}")
        key, value = name.strip().lower(), value.strip()
        if key == "messages-waiting":
            if value.lower() not in ("yes", "no"):
                raise ParseError(f"Messages-Waiting must be yes or no, not {value[:20]!r}")
            summary = Summary(value.lower() == "yes")
        elif summary is None:
            raise ParseError("a message summary starts with Messages-Waiting")
        elif key == "message-account":
            summary.account = value
        elif key in _CLASSES:
            counts = _COUNTS.match(value)
            if counts is None:
                raise ParseError(f"bad message counts {value[:40]!r}")
            new, old, urgent_new, urgent_old = (int(g) if g else 0 for g in counts.groups())
            summary.counts[key] = (new, old, urgent_new, urgent_old)
        # other lines (optional message headers, RFC 3842 §5.2) are ignored
    if summary is None:
        raise ParseError("empty message summary")
    return summary
