"""RTP packets (RFC 3550 §5.1): parse and build, sans-IO.

An RTP packet is a 12-byte fixed header, then 0-15 CSRC identifiers, an optional header extension
(§5.3.1: 16-bit profile value, 16-bit length in 32-bit words, the words), the payload, and optional padding
whose length is the packet's last byte (§5.1, P bit). Receivers must tolerate extensions and padding they do
not understand, so both are parsed and kept, never rejected.

Sequence numbers are 16 bits and wrap; :func:`seq_newer` and :class:`SequenceTracker` give them an order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from p2psip.errors import ParseError

__all__ = ["RTP_VERSION", "RtpPacket", "build_rtp", "is_rtcp", "seq_diff", "seq_newer"]

RTP_VERSION = 2
_HEADER = struct.Struct("!BBHII")


def seq_diff(a: int, b: int) -> int:
    """``a - b`` for 16-bit sequence numbers, in -32768..32767 (positive when ``a`` is newer)."""
    return ((a - b + 32768) & 0xFFFF) - 32768


def seq_newer(a: int, b: int) -> bool:
    """True when sequence number ``a`` comes after ``b`` (modulo 2**16)."""
    return seq_diff(a, b) > 0


def is_rtcp(data: bytes) -> bool:
    """Tell RTCP from RTP on a shared port (RFC 5761 §4): RTCP packet types 192-223 in the second byte."""
    return len(data) >= 2 and 192 <= data[1] <= 223


@dataclass(slots=True)
class RtpPacket:
    """One RTP packet. ``payload`` excludes padding; ``extension`` is ``(profile, data)`` or ``None``."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension: tuple[int, bytes] | None = None
    padding: int = 0  # number of padding bytes seen on parse or to add on build (including the count byte)

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """Parse one RTP packet; raise :class:`ParseError` saying what is wrong with it."""
        if len(data) < 12:
            raise ParseError(f"RTP packet too short: {len(data)} bytes, the fixed header alone is 12")
        first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        version = first >> 6
        if version != RTP_VERSION:
            raise ParseError(f"RTP version {version} is not supported (only version 2)")
        csrc_count = first & 0x0F
        offset = 12 + 4 * csrc_count
        if len(data) < offset:
            raise ParseError(f"RTP packet claims {csrc_count} CSRCs but has only {len(data)} bytes")
        csrcs = struct.unpack_from(f"!{csrc_count}I", data, 12) if csrc_count else ()
        extension = None
        if first & 0x10:
            if len(data) < offset + 4:
                raise ParseError("RTP header extension flag set but the extension header is missing")
            profile, words = struct.unpack_from("!HH", data, offset)
            end = offset + 4 + 4 * words
            if len(data) < end:
                raise ParseError(f"RTP header extension of {words} words runs past the end of the packet")
            extension = (profile, bytes(data[offset + 4 : end]))
            offset = end
        end = len(data)
        padding = 0
        if first & 0x20:
            padding = data[-1]
            if padding == 0 or offset + padding > len(data):
                raise ParseError(f"RTP padding count {padding} is invalid for a {len(data)}-byte packet")
            end -= padding
        return cls(
            payload_type=second & 0x7F,
            sequence=sequence,
            timestamp=timestamp,
            ssrc=ssrc,
            payload=bytes(data[offset:end]),
            marker=bool(second & 0x80),
            csrcs=tuple(csrcs),
            extension=extension,
            padding=padding,
        )

    def __bytes__(self) -> bytes:
        if not 0 <= self.payload_type <= 127:
            raise ValueError(f"RTP payload type must be 0..127, got {self.payload_type}")
        if len(self.csrcs) > 15:
            raise ValueError(f"RTP carries at most 15 CSRCs, got {len(self.csrcs)}")
        first = (RTP_VERSION << 6) | len(self.csrcs)
        if self.padding:
            first |= 0x20
        if self.extension is not None:
            first |= 0x10
        parts = [
            _HEADER.pack(
                first,
                (0x80 if self.marker else 0) | self.payload_type,
                self.sequence & 0xFFFF,
                self.timestamp & 0xFFFFFFFF,
                self.ssrc & 0xFFFFFFFF,
            )
        ]
        if self.csrcs:
            parts.append(struct.pack(f"!{len(self.csrcs)}I", *self.csrcs))
        if self.extension is not None:
            profile, data = self.extension
            if len(data) % 4:
                raise ValueError("an RTP header extension must be a whole number of 32-bit words")
            parts.append(struct.pack("!HH", profile, len(data) // 4) + data)
        parts.append(self.payload)
        if self.padding:
            if not 1 <= self.padding <= 255:
                raise ValueError(f"RTP padding must be 1..255 bytes, got {self.padding}")
            parts.append(bytes(self.padding - 1) + bytes([self.padding]))
        return b"".join(parts)


def build_rtp(
    payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes, marker: bool
) -> bytes:
    """The fast path for the common packet (no CSRC, extension or padding): one struct pack and a concat."""
    return (
        _HEADER.pack(
            0x80,
            (0x80 if marker else 0) | payload_type,
            sequence & 0xFFFF,
            timestamp & 0xFFFFFFFF,
            ssrc,
        )
        + payload
    )
