"""RTCP (RFC 3550 §6): sender and receiver reports, SDES CNAME, BYE; reception statistics (Appendix A).

Sans-IO: packets are parsed from and built to ``bytes``; :class:`ReceptionStats` is fed each received RTP
packet's sequence number, RTP timestamp and arrival time (the caller's clock, in seconds) and produces report
blocks with the fraction lost, the cumulative number lost and the interarrival jitter exactly as §6.4.1 and
Appendix A.3/A.8 define them. Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from p2psip.errors import ParseError

__all__ = [
    "Bye",
    "ReceiverReport",
    "ReceptionStats",
    "ReportBlock",
    "RtcpPacket",
    "SenderReport",
    "SourceDescription",
    "build_compound",
    "ntp_middle",
    "ntp_timestamp",
    "parse_compound",
]

PT_SR = 200
PT_RR = 201
PT_SDES = 202
PT_BYE = 203
PT_APP = 204
SDES_CNAME = 1
_NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
_REPORT_BLOCK = struct.Struct("!IIIIII")


def ntp_timestamp(unix_time: float) -> int:
    """A Unix time as a 64-bit NTP timestamp (32.32 fixed point, seconds since 1900)."""
    return int((unix_time + _NTP_EPOCH_OFFSET) * (1 << 32)) & 0xFFFFFFFFFFFFFFFF


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits of an NTP timestamp: the compact form used by LSR/DLSR (1/65536 s units)."""
    return (ntp >> 16) & 0xFFFFFFFF


@dataclass(slots=True)
class ReportBlock:
    """One reception report (§6.4.1). ``jitter`` is in RTP timestamp units; ``lsr``/``dlsr`` in 1/65536 s."""

    ssrc: int
    fraction_lost: int  # 0..255, the fraction lost since the previous report times 256
    cumulative_lost: int  # signed 24-bit (duplicates can make it negative)
    highest_sequence: int  # extended highest sequence number received
    jitter: int
    lsr: int = 0
    dlsr: int = 0

    def pack(self) -> bytes:
        lost = max(-0x800000, min(0x7FFFFF, self.cumulative_lost)) & 0xFFFFFF
        return _REPORT_BLOCK.pack(
            self.ssrc,
            (self.fraction_lost & 0xFF) << 24 | lost,
            self.highest_sequence & 0xFFFFFFFF,
            self.jitter & 0xFFFFFFFF,
            self.lsr & 0xFFFFFFFF,
            self.dlsr & 0xFFFFFFFF,
        )

    @classmethod
    def unpack(cls, data: bytes, offset: int) -> ReportBlock:
        ssrc, lost_word, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(data, offset)
        lost = lost_word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 0x1000000
        return cls(ssrc, lost_word >> 24, lost, highest, jitter, lsr, dlsr)


@dataclass(slots=True)
class SenderReport:
    ssrc: int
    ntp: int  # 64-bit NTP timestamp of when the report was sent
    rtp_timestamp: int  # the same instant on the RTP clock
    packet_count: int
    octet_count: int
    reports: list[ReportBlock] = field(default_factory=list)


@dataclass(slots=True)
class ReceiverReport:
    ssrc: int
    reports: list[ReportBlock] = field(default_factory=list)


@dataclass(slots=True)
class SourceDescription:
    """SDES with only what we use: one CNAME per source (other items are skipped on parse)."""

    cnames: dict[int, str] = field(default_factory=dict)


@dataclass(slots=True)
class Bye:
    ssrcs: list[int]
    reason: str = ""


@dataclass(slots=True)
class UnknownRtcp:
    """An RTCP packet type we do not interpret (APP, feedback, XR ...): kept, never an error."""

    packet_type: int
    body: bytes


RtcpPacket = SenderReport | ReceiverReport | SourceDescription | Bye | UnknownRtcp


def _header(count: int, packet_type: int, body: bytes) -> bytes:
    if len(body) % 4:
        body += bytes(4 - len(body) % 4)
    return struct.pack("!BBH", 0x80 | count, packet_type, len(body) // 4) + body


def _build_one(packet: RtcpPacket) -> bytes:
    if isinstance(packet, SenderReport):
        body = struct.pack(
            "!IIIIII",
            packet.ssrc,
            packet.ntp >> 32,
            packet.ntp & 0xFFFFFFFF,
            packet.rtp_timestamp & 0xFFFFFFFF,
            packet.packet_count & 0xFFFFFFFF,
            packet.octet_count & 0xFFFFFFFF,
        ) + b"".join(block.pack() for block in packet.reports[:31])
        return _header(min(len(packet.reports), 31), PT_SR, body)
    if isinstance(packet, ReceiverReport):
        body = struct.pack("!I", packet.ssrc) + b"".join(block.pack() for block in packet.reports[:31])
        return _header(min(len(packet.reports), 31), PT_RR, body)
    if isinstance(packet, SourceDescription):
        chunks = []
        for ssrc, cname in packet.cnames.items():
            text = cname.encode()[:255]
            chunk = struct.pack("!IBB", ssrc, SDES_CNAME, len(text)) + text + b"\0"
            chunk += bytes(-len(chunk) % 4)
            chunks.append(chunk)
        return _header(len(chunks), PT_SDES, b"".join(chunks))
    if isinstance(packet, Bye):
        body = b"".join(struct.pack("!I", ssrc) for ssrc in packet.ssrcs)
        if packet.reason:
            reason = packet.reason.encode()[:255]
            body += bytes([len(reason)]) + reason
        return _header(len(packet.ssrcs), PT_BYE, body)
    return _header(0, packet.packet_type, packet.body)


def build_compound(packets: list[RtcpPacket]) -> bytes:
    """A compound RTCP packet (§6.1): the caller puts an SR or RR first and an SDES with a CNAME in it."""
    return b"".join(_build_one(packet) for packet in packets)


def _parse_one(packet_type: int, count: int, body: bytes) -> RtcpPacket:
    if packet_type == PT_SR:
        if len(body) < 24 + 24 * count:
            raise ParseError(f"RTCP SR with {count} report blocks is too short ({len(body)} bytes)")
        ssrc, msw, lsw, rtp_ts, packets, octets = struct.unpack_from("!IIIIII", body)
        blocks = [ReportBlock.unpack(body, 24 + 24 * i) for i in range(count)]
        return SenderReport(ssrc, msw << 32 | lsw, rtp_ts, packets, octets, blocks)
    if packet_type == PT_RR:
        if len(body) < 4 + 24 * count:
            raise ParseError(f"RTCP RR with {count} report blocks is too short ({len(body)} bytes)")
        (ssrc,) = struct.unpack_from("!I", body)
        return ReceiverReport(ssrc, [ReportBlock.unpack(body, 4 + 24 * i) for i in range(count)])
    if packet_type == PT_SDES:
        sdes = SourceDescription()
        offset = 0
        for _ in range(count):
            if offset + 4 > len(body):
                raise ParseError("RTCP SDES chunk runs past the end of the packet")
            (ssrc,) = struct.unpack_from("!I", body, offset)
            offset += 4
            while True:
                if offset >= len(body):
                    raise ParseError("RTCP SDES chunk is not terminated by a null item")
                item = body[offset]
                if item == 0:
                    offset += 1
                    offset += -offset % 4
                    break
                if offset + 2 > len(body) or offset + 2 + body[offset + 1] > len(body):
                    raise ParseError("RTCP SDES item runs past the end of the packet")
                length = body[offset + 1]
                if item == SDES_CNAME:
                    sdes.cnames[ssrc] = body[offset + 2 : offset + 2 + length].decode("utf-8", "replace")
                offset += 2 + length
        return sdes
    if packet_type == PT_BYE:
        if len(body) < 4 * count:
            raise ParseError(f"RTCP BYE with {count} sources is too short ({len(body)} bytes)")
        ssrcs = list(struct.unpack_from(f"!{count}I", body))
        reason = ""
        if len(body) > 4 * count:
            length = body[4 * count]
            reason = body[4 * count + 1 : 4 * count + 1 + length].decode("utf-8", "replace")
        return Bye(ssrcs, reason)
    return UnknownRtcp(packet_type, bytes(body))


def parse_compound(data: bytes) -> list[RtcpPacket]:
    """Parse a compound RTCP packet; :class:`ParseError` if any part is malformed (the A.2 checks)."""
    packets: list[RtcpPacket] = []
    offset = 0
    if len(data) < 4:
        raise ParseError(f"RTCP packet too short: {len(data)} bytes")
    while offset < len(data):
        if offset + 4 > len(data):
            raise ParseError("RTCP compound packet ends inside a header")
        first, packet_type, words = struct.unpack_from("!BBH", data, offset)
        if first >> 6 != 2:
            raise ParseError(f"RTCP version {first >> 6} is not supported (only version 2)")
        if not 192 <= packet_type <= 223:
            raise ParseError(f"{packet_type} is not an RTCP packet type")
        end = offset + 4 + 4 * words
        if end > len(data):
            raise ParseError(f"RTCP packet length {words} words runs past the end of the datagram")
        body = data[offset + 4 : end]
        if first & 0x20:  # padding, allowed on the last packet only
            if end != len(data) or not body or body[-1] > len(body) or body[-1] == 0:
                raise ParseError("RTCP padding is invalid")
            body = body[: len(body) - body[-1]]
        packets.append(_parse_one(packet_type, first & 0x1F, bytes(body)))
        offset = end
    return packets


_TIMESTAMP_WRAP = 1 << 32  # RTP timestamps are 32-bit (RFC 3550 §5.1)
_HALF_WRAP = 1 << 31


class ReceptionStats:
    """What a receiver knows about one remote source, per RFC 3550 Appendix A.1, A.3 and A.8.

    ``update`` takes each RTP packet's sequence number and timestamp and the arrival time in seconds;
    ``report_block`` produces the §6.4.1 report (and remembers what it reported, for the next fraction).
    Jitter should only be fed packets of one clock and steady timing (audio, not repeated DTMF packets), so
    ``update(..., timing=False)`` counts a packet without using it for jitter.
    """

    MAX_DROPOUT = 3000
    MAX_MISORDER = 100
    SEQ_MOD = 1 << 16

    def __init__(self, ssrc: int, clock_rate: int) -> None:
        self.ssrc = ssrc
        self.clock_rate = clock_rate
        self.base_seq = -1
        self.max_seq = 0
        self.cycles = 0
        self.bad_seq = self.SEQ_MOD + 1
        self.received = 0
        self.expected_prior = 0
        self.received_prior = 0
        self.transit: float | None = None
        self.jitter = 0.0  # in RTP timestamp units
        self.last_sr_ntp_middle = 0
        self.last_sr_arrival: float | None = None

    def _init_seq(self, seq: int) -> None:
        self.base_seq = seq
        self.max_seq = seq
        self.bad_seq = self.SEQ_MOD + 1
        self.cycles = 0
        self.received = 0
        self.received_prior = 0
        self.expected_prior = 0

    def update(self, seq: int, rtp_timestamp: int, arrival: float, *, timing: bool = True) -> bool:
        """Account one packet; False when it is so far out of sequence that it is ignored (A.1)."""
        if seq == self.max_seq + 1 and self.base_seq >= 0:  # the next in order (A.1's common case)
            self.max_seq = seq
        elif self.base_seq < 0:
            self._init_seq(seq)
        else:
            udelta = (seq - self.max_seq) & 0xFFFF
            if udelta < self.MAX_DROPOUT:
                if seq < self.max_seq:
                    self.cycles += self.SEQ_MOD
                self.max_seq = seq
            elif udelta <= self.SEQ_MOD - self.MAX_MISORDER:
                if seq == self.bad_seq:
                    self._init_seq(seq)  # the source restarted; resynchronise
                else:
                    self.bad_seq = (seq + 1) & 0xFFFF
                    return False
            # else: a duplicate or reordered packet; counted below
        self.received += 1
        if timing:
            transit = arrival * self.clock_rate - rtp_timestamp
            if self.transit is not None:
                # The timestamp is 32 bits and wraps (a random start makes a wrap within a long call
                # likely enough); A.8's C code gets the difference modulo 2**32 from unsigned arithmetic,
                # and Python's integers do not wrap, so the difference is folded into a signed 32-bit
                # range here. Without it one wrap added 2**32 / 16 units of "jitter" (hours' worth).
                d = abs((transit - self.transit + _HALF_WRAP) % _TIMESTAMP_WRAP - _HALF_WRAP)
                self.jitter += (d - self.jitter) / 16.0
            self.transit = transit
        return True

    @property
    def extended_max(self) -> int:
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        return 0 if self.base_seq < 0 else self.extended_max - self.base_seq + 1

    @property
    def lost(self) -> int:
        """Cumulative packets lost: expected minus received (negative if duplicates arrived)."""
        return self.expected - self.received

    @property
    def jitter_seconds(self) -> float:
        return self.jitter / self.clock_rate

    def on_sender_report(self, ntp: int, arrival: float) -> None:
        """Remember the last SR from this source, for the LSR/DLSR fields of our next report."""
        self.last_sr_ntp_middle = ntp_middle(ntp)
        self.last_sr_arrival = arrival

    def report_block(self, now: float) -> ReportBlock:
        expected = self.expected
        expected_interval = expected - self.expected_prior
        received_interval = self.received - self.received_prior
        self.expected_prior = expected
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        fraction = 0
        if expected_interval > 0 and lost_interval > 0:
            fraction = (lost_interval << 8) // expected_interval
        dlsr = 0
        if self.last_sr_arrival is not None:
            dlsr = int((now - self.last_sr_arrival) * 65536)
        return ReportBlock(
            ssrc=self.ssrc,
            fraction_lost=min(fraction, 255),
            cumulative_lost=self.lost,
            highest_sequence=self.extended_max,
            jitter=int(self.jitter),
            lsr=self.last_sr_ntp_middle,
            dlsr=dlsr,
        )
