"""Limits: the sizes a parser accepts (line, header count, message, body).

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

from dataclasses import dataclass

from p2psip.errors import ParseError


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what :func:`parse` and :class:`StreamFramer` accept, against memory and CPU exhaustion.

    ``max_size`` is the whole message (headers and body) in bytes; UDP cannot carry more than 65535 anyway.
    """

    max_size: int = 65535
    max_headers: int = 256
    max_line: int = 8192


DEFAULT_LIMITS = Limits()
_NO_LIMITS = Limits(max_size=1 << 62, max_headers=1 << 62, max_line=1 << 62)


def text_body(data: bytes, what: str, max_bytes: int) -> str:
    """A small text body (sipfrag, message summary...) as text: refused with :class:`ParseError` (a 400)
    when it is over ``max_bytes`` or not UTF-8, before anything reads it."""
    if len(data) > max_bytes:
        raise ParseError(f"{what} of {len(data)} bytes is over {max_bytes}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError(f"{what} is not UTF-8") from None
