"""Parsing: bytes to a Request or Response, validating the start line, the framing and the headers every
transaction needs (RFC 3261 §7, §18.3).

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

from p2psip.errors import ParseError
from p2psip.message.limits import _NO_LIMITS, DEFAULT_LIMITS, Limits
from p2psip.message.model import Request, Response, _Header
from p2psip.message.names import _NAMES, _name_entry
from p2psip.message.values import _METHODS, Via, _parse_cseq
from p2psip.uri import (
    TOKEN_CHARS,
    URI,
    check_address,
)

_MANDATORY = frozenset({"via", "from", "to", "call-id", "cseq"})


class _Folded(Exception):
    """A header line starts with SP or HTAB: it continues the line before it (§7.3.1)."""


def _no_colon(line: str) -> bool:
    if line[:1] == " " or line[:1] == "\t":
        raise _Folded
    raise ParseError(f"header line without a colon: {line[:80]!r}")


def _line_entry(name: str) -> tuple[str, str]:
    """:func:`_name_entry` of the text before a line's colon; a line that starts with SP or HTAB is no
    header of its own (it is folded) even where the rest is a header name."""
    if name[:1] == " " or name[:1] == "\t":
        raise _Folded
    return _name_entry(name)


def _check_limits(lines: list[str], text: str, data: bytes, lim: Limits) -> None:
    """The limits on header lines (folded lines joined already), §21.5.14."""
    if len(lines) - 1 > lim.max_headers:
        raise ParseError(
            f"more than {lim.max_headers} header lines", status=513, partial=answerable_head(data, lim)
        )
    if len(text) > lim.max_line and max(map(len, lines)) > lim.max_line:
        raise ParseError(
            f"header line longer than {lim.max_line} bytes",
            status=513,
            partial=answerable_head(data, lim),
        )


def parse(data: bytes, *, datagram: bool = True, limits: Limits | None = None) -> Request | Response:
    """Parse one SIP message.

    ``datagram=True`` (UDP) applies §18.3: a body longer than Content-Length is cut, a shorter one is an
    error, a missing Content-Length means "the rest of the datagram". With ``datagram=False`` (a message
    cut out of a stream by :class:`StreamFramer`) the body must be exactly Content-Length long.

    Raises :class:`ParseError` (and nothing else) for anything that is not a valid SIP message; its
    ``partial`` is a :class:`Request` usable to build a 400 when enough could be read.
    """
    lim = DEFAULT_LIMITS if limits is None else limits
    if len(data) > lim.max_size:
        raise ParseError(
            f"message of {len(data)} bytes exceeds the limit of {lim.max_size}",
            status=513,
            partial=answerable_head(data, lim),
        )
    start = 0
    while data.startswith(b"\r\n", start):  # CRLFs before the start line are ignored (§7.5)
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise ParseError("no empty line after the headers (truncated message?)")
    try:
        text = data[start:end].decode()
    except UnicodeDecodeError as exc:
        raise ParseError(f"header bytes are not UTF-8 (at byte {start + exc.start})") from None
    body = data[end + 4 :]
    lines = text.split("\r\n")
    # A bare CR or LF is left inside a line by the split. Joining the lines and looking for either (memchr)
    # costs a third of counting both in the whole text (~2,800 against ~8,400 CPU instructions, callgrind).
    joined = "".join(lines)
    if "\r" in joined or "\n" in joined:
        raise ParseError("bare CR or LF in the header block")
    if "\x00" in text:
        _check_nul(text)
    # Folded lines (§7.3.1) are rare: looking for them in every text cost ~4,800 CPU instructions for an
    # INVITE (callgrind). A line that starts with SP or HTAB stops the list of header lines below
    # (_Folded); only then, or when a limit is hit, are they looked for and joined.
    if len(lines) - 1 > lim.max_headers or (len(text) > lim.max_line and max(map(len, lines)) > lim.max_line):
        if "\r\n " in text or "\r\n\t" in text:
            lines = _unfold(lines)
        _check_limits(lines, text, data, lim)

    msg: Request | Response
    first = lines[0]
    if first.startswith("SIP/"):
        version, _, rest = first.partition(" ")
        code, _, reason = rest.partition(" ")
        if version != "SIP/2.0" and version.upper() != "SIP/2.0":
            raise ParseError(f"unsupported SIP version {version[:20]!r}", status=505)
        if len(code) != 3 or not code.isdigit() or not code.isascii() or code[0] == "0":
            raise ParseError(f"bad status line {first[:80]!r}")
        resp = Response(None)
        resp.status = int(code)
        resp.reason = reason
        resp.local = False
        msg = resp
        request = None
    else:
        parts = first.split(" ")
        if len(parts) != 3:
            raise ParseError(f"bad request line {first[:80]!r}")
        method, uri_text, version = parts
        if version != "SIP/2.0" and version.upper() != "SIP/2.0":
            if version.upper().startswith("SIP/"):
                raise ParseError(f"unsupported SIP version {version[:20]!r}", status=505)
            raise ParseError(f"bad request line {first[:80]!r}")
        if method not in _METHODS and (not method or not TOKEN_CHARS.issuperset(method)):
            raise ParseError(f"bad method in request line {first[:80]!r}")
        request = Request(None)
        request.method = method
        msg = request
    # One list comprehension over the header lines: the fastest way CPython offers to do the same small
    # thing a dozen times. Known names resolve with one dict lookup; a line without a colon stops it.
    names = _NAMES
    entry_of = _line_entry
    while True:
        try:
            headers: list[_Header] = [
                (e[0], e[1], v.strip(" \t"))
                for line in lines[1:]
                for n, sep, v in [line.partition(":")]
                if sep or _no_colon(n)
                for e in [names.get(n) or entry_of(n)]
            ]
            break
        except _Folded:
            lines = _unfold(lines)
            _check_limits(lines, text, data, lim)
    msg._headers = headers
    msg._body = b""
    firsts = {h[0]: h[2] for h in reversed(headers)}  # the first value of every header
    msg._firsts = firsts  # kept: Message.get answers from it

    # What every transaction needs; a missing one means the message cannot even be answered.
    if not firsts.keys() >= _MANDATORY:
        missing = next(key for key in ("via", "from", "to", "call-id", "cseq") if key not in firsts)
        raise ParseError(f"missing {names[missing][1]} header")
    via = firsts["via"]
    cseq = _parse_cseq(firsts["cseq"])
    msg._cache = {
        "top-via": Via._first_of(via) if "," in via else Via(via),
        # From and To are validated now but built on first access (see check_address).
        "from": check_address(firsts["from"]),
        "to": check_address(firsts["to"]),
        "cseq": cseq,
        "call-id": firsts["call-id"],
    }
    call_id = firsts["call-id"]
    if not call_id or " " in call_id or not call_id.isprintable() or not call_id.isascii():
        raise ParseError(f"bad Call-ID {call_id[:80]!r}")
    partial = request
    if request is not None:
        try:
            request.uri = URI(uri_text)
        except ParseError as exc:
            request.uri = _placeholder_uri(uri_text)
            raise ParseError(f"bad Request-URI: {exc}", partial=partial) from None
        if cseq.method != request.method:
            raise ParseError(f"CSeq method {cseq.method} does not match {request.method}", partial=partial)
    if len(firsts) < len(headers):  # a header appears twice: fine for Via, Route..., not for CSeq...
        _check_singletons(headers, firsts, partial)

    # Framing, §18.3.
    clen = firsts.get("content-length")
    if clen is not None:
        if not clen.isdigit() or not clen.isascii() or len(clen) > 9:
            raise ParseError(f"bad Content-Length {clen[:20]!r}", partial=partial)
        length = int(clen)
        if length < len(body):
            if not datagram:
                raise ParseError("more bytes than Content-Length in a framed message", partial=partial)
            body = body[:length]
        elif length > len(body):
            raise ParseError(f"body is {len(body)} bytes but Content-Length says {length}", partial=partial)
    elif not datagram:
        raise ParseError("Content-Length is mandatory on a stream", partial=partial)
    msg._body = body
    return msg


def answerable_head(data: bytes | bytearray, limits: Limits | None = None) -> Request | None:
    """The request an oversized message starts with, as far as it can be answered, or None.

    A message over a limit (too big, too many header lines, a line too long, no end of headers within
    the size limit) is still answered (513 or 400, §21.5.14) when its start line and the headers a
    response copies (Via, From, To, Call-ID, CSeq) can be read from its head: this reads at most
    ``max_size`` bytes, keeps the first ``max_headers`` complete lines that fit ``max_line``, drops
    Content-Length and the body, and parses that. Responses (which are never answered) give None.
    """
    lim = DEFAULT_LIMITS if limits is None else limits
    head = bytes(data[: lim.max_size])
    end = head.find(b"\r\n\r\n")
    head = head[:end] if end >= 0 else head[: head.rfind(b"\r\n")]
    if head.startswith(b"SIP/") or not head:
        return None
    kept: list[bytes] = []
    for line in head.split(b"\r\n")[: lim.max_headers + 1]:
        if len(line) > lim.max_line:
            continue
        name = line.partition(b":")[0].strip(b" \t").lower()
        if kept and name in (b"content-length", b"l"):
            continue
        kept.append(line)
    try:
        # No limits here: the head is already bounded by ``max_size`` (and a limit hit again would recurse).
        msg = parse(b"\r\n".join(kept) + b"\r\n\r\n", datagram=True, limits=_NO_LIMITS)
    except ParseError as exc:
        return exc.partial if isinstance(exc.partial, Request) else None
    return msg if isinstance(msg, Request) else None


def _placeholder_uri(text: str) -> URI:
    """Stands in for an unparseable Request-URI in ``ParseError.partial`` (only used to answer 400)."""
    uri = URI.build(scheme="invalid")
    uri.opaque = text
    return uri


# Headers that may appear at most once (RFC 3261 §7.3.1, §20: not defined as comma-separated lists).
_SINGLETONS = frozenset({"from", "to", "call-id", "cseq", "max-forwards", "content-length", "content-type"})


def _check_singletons(headers: list[_Header], firsts: dict[str, str], partial: Request | None) -> None:
    # Most messages with repeated headers (several Via or Record-Route lines) have no repeated singleton:
    # one list comprehension tells so, faster than the loop below.
    singles = _SINGLETONS
    if len([key for key, _, _ in headers if key in singles]) == len(firsts.keys() & singles):
        return
    seen: set[str] = set()
    for key, name, _ in headers:
        if key in _SINGLETONS:
            if key in seen:
                raise ParseError(f"more than one {name} header", partial=partial)
            seen.add(key)


def _check_nul(text: str) -> None:
    """A NUL byte is only legal escaped in a quoted string (quoted-pair, RFC 3261 §25.1); anywhere else it
    is an attack on C-string based peers that we would forward."""
    i = text.find("\x00")
    while i >= 0:
        if i == 0 or text[i - 1] != "\\":
            raise ParseError("NUL byte in the header block")
        i = text.find("\x00", i + 1)


def _unfold(lines: list[str]) -> list[str]:
    """Join continuation lines (starting with SP or HTAB) to the header they continue (§7.3.1)."""
    out: list[str] = []
    for line in lines:
        if line and (line[0] == " " or line[0] == "\t") and out:
            if len(out) == 1:
                raise ParseError("continuation line after the start line")
            out[-1] = out[-1].rstrip(" \t") + " " + line.strip(" \t")
        else:
            out.append(line)
    return out
