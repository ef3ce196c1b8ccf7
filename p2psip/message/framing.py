"""Stream framing (TCP/TLS): splitting a byte stream into messages by Content-Length (RFC 3261 §18.3).

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

from p2psip.errors import ParseError
from p2psip.message.limits import DEFAULT_LIMITS, Limits
from p2psip.message.parser import answerable_head


class StreamFramer:
    """Cuts whole messages out of a TCP/TLS byte stream (RFC 3261 §18.3: Content-Length is mandatory).

    ``feed(data)`` returns the complete messages found so far (as bytes for :func:`parse` with
    ``datagram=False``); the rest waits in the buffer. CRLFs between messages (RFC 5626 keep-alives) are
    skipped; ``keepalives`` counts the double-CRLF pings seen so the transport can answer with a CRLF pong.
    A ParseError means the stream is beyond repair: answer what can be answered (its ``partial`` is the
    head of the bad message, see :func:`answerable_head`) and close the connection. When messages were
    framed before the bad bytes in the same ``feed``, they are returned and the error is left in
    :attr:`error` instead (and raised by the next ``feed``): a valid message is never lost with the
    garbage after it.
    """

    __slots__ = ("_buf", "_limits", "error", "keepalives")

    def __init__(self, limits: Limits | None = None) -> None:
        self._buf = bytearray()
        self._limits = DEFAULT_LIMITS if limits is None else limits
        self.keepalives = 0
        self.error: ParseError | None = None

    @property
    def buffered(self) -> int:
        """Bytes waiting for the rest of their message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            raise self.error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        max_size = self._limits.max_size
        while buf:
            skip = 0
            while buf.startswith(b"\r\n", skip):
                skip += 2
            if skip:
                self.keepalives += skip // 4
                del buf[:skip]
                if not buf:
                    break
            if len(buf) == 1 and buf[0] == 13:
                break  # half a CRLF
            end = buf.find(b"\r\n\r\n")
            try:
                if end < 0:
                    if len(buf) > max_size:
                        raise ParseError("header block exceeds the size limit", status=513)
                    break
                length = _content_length(bytes(buf[:end]))
                total = end + 4 + length
                if total > max_size:
                    raise ParseError(
                        f"message of {total} bytes exceeds the limit of {max_size}", status=513
                    )
            except ParseError as exc:
                # The stream cannot be framed any further. Keep the head of the bad message (so the
                # caller can answer it) and what was framed before it (so it is delivered, not lost).
                exc.partial = answerable_head(buf, self._limits)
                self.error = exc
                buf.clear()
                if not out:
                    raise
                break
            if len(buf) < total:
                break
            out.append(bytes(buf[:total]))
            del buf[:total]
        return out


def _content_length(head: bytes) -> int:
    found: int | None = None
    text = head.decode("latin-1")
    for line in text.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip(" \t").lower() in ("content-length", "l"):
            value = value.strip(" \t")
            if not value.isdigit() or not value.isascii() or len(value) > 9:
                raise ParseError(f"bad Content-Length {value[:20]!r}")
            if found is not None and int(value) != found:
                raise ParseError("conflicting Content-Length headers")
            found = int(value)
    if found is None:
        raise ParseError("Content-Length is mandatory on a stream")
    return found
