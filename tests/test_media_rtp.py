"""RTP and RTCP packets (RFC 3550 §5, §6) and the Appendix A reception statistics, worked by hand."""

from __future__ import annotations

import struct

import pytest

from p2psip.errors import ParseError
from p2psip.media.rtcp import (
    Bye,
    ReceiverReport,
    ReceptionStats,
    ReportBlock,
    SenderReport,
    SourceDescription,
    UnknownRtcp,
    build_compound,
    ntp_middle,
    ntp_timestamp,
    parse_compound,
)
from p2psip.media.rtp import RtpPacket, build_rtp, is_rtcp, seq_diff, seq_newer


def test_fixed_header_bytes_are_as_the_rfc_draws_them() -> None:
    data = bytes(
        RtpPacket(payload_type=0, sequence=0x1234, timestamp=0xDEADBEEF, ssrc=0x01020304, payload=b"ab")
    )
    assert data == bytes.fromhex("80001234deadbeef01020304") + b"ab"
    marked = bytes(RtpPacket(8, 1, 2, 3, b"", marker=True))
    assert marked[1] == 0x88


def test_round_trip_with_csrcs_extension_and_padding() -> None:
    packet = RtpPacket(
        payload_type=101,
        sequence=65535,
        timestamp=4294967295,
        ssrc=7,
        payload=b"\x01\x02\x03",
        marker=True,
        csrcs=(10, 11, 12),
        extension=(0xBEDE, b"\x10\xff\x00\x00"),
        padding=5,
    )
    data = bytes(packet)
    assert data[0] == 0x80 | 0x20 | 0x10 | 3
    assert data[-1] == 5
    assert RtpPacket.parse(data) == packet


def test_fast_builder_matches_the_general_one() -> None:
    assert build_rtp(0, 70000, 2**32 + 5, 9, b"xyz", True) == bytes(
        RtpPacket(0, 70000 & 0xFFFF, 5, 9, b"xyz", True)
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x00", "too short"),
        (b"\x40" + bytes(11), "version 1"),
        (b"\x82" + bytes(11) + bytes(4), "2 CSRCs"),
        (b"\x90" + bytes(11), "extension header is missing"),
        (b"\x90" + bytes(11) + b"\x00\x00\x00\x05", "runs past the end"),
        (b"\xa0" + bytes(11) + b"\x00", "padding count 0"),
        (b"\xa0" + bytes(11) + b"\x09", "padding count 9"),
    ],
)
def test_malformed_rtp_is_a_parse_error(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        RtpPacket.parse(data)


def test_sequence_arithmetic_wraps() -> None:
    assert seq_diff(2, 65534) == 4
    assert seq_diff(65534, 2) == -4
    assert seq_newer(0, 65535)
    assert not seq_newer(65535, 0)


def test_rtcp_and_rtp_are_told_apart_on_a_shared_port() -> None:
    assert is_rtcp(build_compound([ReceiverReport(1)]))
    assert not is_rtcp(build_rtp(0, 1, 2, 3, b"", True))  # marker + PT 0 = 0x80, not 192..223


def test_compound_report_round_trip() -> None:
    block = ReportBlock(
        ssrc=0xAABBCCDD,
        fraction_lost=64,
        cumulative_lost=-3,
        highest_sequence=70000,
        jitter=123,
        lsr=0x12345678,
        dlsr=65536,
    )
    packets = [
        SenderReport(
            ssrc=1,
            ntp=ntp_timestamp(1_700_000_000.5),
            rtp_timestamp=160,
            packet_count=10,
            octet_count=1600,
            reports=[block],
        ),
        SourceDescription({1: "alice@example.net"}),
        Bye([1, 2], "hung up"),
    ]
    data = build_compound(packets)
    assert len(data) % 4 == 0
    parsed = parse_compound(data)
    assert parsed == packets
    sr = parsed[0]
    assert isinstance(sr, SenderReport)
    assert sr.ntp >> 32 == 1_700_000_000 + 2_208_988_800 and (sr.ntp & 0xFFFFFFFF) == 1 << 31


def test_receiver_report_and_unknown_types_are_kept() -> None:
    data = build_compound([ReceiverReport(5, [ReportBlock(6, 0, 0, 1, 2)]), UnknownRtcp(204, b"name")])
    rr, app = parse_compound(data)
    assert rr == ReceiverReport(5, [ReportBlock(6, 0, 0, 1, 2)])
    assert app == UnknownRtcp(204, b"name")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\xc8", "too short"),
        (b"\x40\xc9\x00\x01" + bytes(4), "version 1"),
        (b"\x80\x10\x00\x01" + bytes(4), "not an RTCP packet type"),
        (b"\x80\xc9\x00\x09" + bytes(4), "runs past the end"),
        (b"\x81\xc9\x00\x01" + bytes(4), "too short"),
        (b"\x81\xca\x00\x02" + bytes(4) + b"\x01\x09ab", "runs past the end"),
    ],
)
def test_malformed_rtcp_is_a_parse_error(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_compound(data)


def test_loss_fraction_and_cumulative_as_in_appendix_a3() -> None:
    stats = ReceptionStats(ssrc=9, clock_rate=8000)
    for seq in [100, 101, 103, 104, 105, 107]:  # 102 and 106 lost
        stats.update(seq, seq * 160, seq * 0.02)
    block = stats.report_block(now=0.0)
    assert (block.cumulative_lost, block.highest_sequence) == (2, 107)
    assert block.fraction_lost == (2 << 8) // 8  # 2 lost of 8 expected = 64/256
    for seq in [108, 109, 110, 111]:  # no loss in the next interval
        stats.update(seq, seq * 160, seq * 0.02)
    assert stats.report_block(now=0.0).fraction_lost == 0


def test_sequence_wrap_counts_a_cycle() -> None:
    stats = ReceptionStats(1, 8000)
    for seq in [65534, 65535, 0, 1]:
        stats.update(seq, 0, 0.0, timing=False)
    assert stats.extended_max == 65536 + 1 and stats.lost == 0


def test_duplicates_make_loss_negative_as_the_rfc_allows() -> None:
    stats = ReceptionStats(1, 8000)
    for seq in [1, 2, 2, 3]:
        stats.update(seq, 0, 0.0, timing=False)
    assert stats.lost == -1


def test_interarrival_jitter_follows_a8() -> None:
    stats = ReceptionStats(1, 8000)
    # packets every 160 timestamp units (20 ms) arriving 0, 20, 45, 60 ms: transit deltas 0, 40, 120 units
    arrivals = [0.0, 0.020, 0.045, 0.060]
    for i, arrival in enumerate(arrivals):
        stats.update(i, i * 160, arrival)
    expected = 0.0
    for d in [0, 40, 40]:  # |D(i-1,i)| in timestamp units: 0, 200-160, 120-160
        expected += (d - expected) / 16
    assert stats.jitter == pytest.approx(expected)
    assert stats.report_block(0.0).jitter == int(expected)


def test_jitter_is_unmoved_by_the_timestamp_wrapping() -> None:
    """RTP timestamps are 32 bits: a stream starting near 2**32 wraps to small values mid-call. Steady
    packets every 20 ms have no jitter on either side of the wrap (it once showed as ~9 hours of jitter
    in bench/media.py's far-end reports)."""
    stats = ReceptionStats(1, 8000)
    start = (1 << 32) - 3 * 160
    for i in range(8):
        stats.update(i, (start + i * 160) % (1 << 32), 100.0 + i * 0.020)
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)
    # a real 5 ms wobble right at the wrap still counts as 40 units, as anywhere else
    wobbly = ReceptionStats(1, 8000)
    for i in range(6):
        wobbly.update(i, (start + i * 160) % (1 << 32), 100.0 + i * 0.020 + (0.005 if i == 3 else 0.0))
    expected = 0.0
    for d in [0, 0, 40, 40, 0]:
        expected += (d - expected) / 16
    assert wobbly.jitter == pytest.approx(expected)


def test_dlsr_and_lsr_come_from_the_last_sender_report() -> None:
    stats = ReceptionStats(1, 8000)
    stats.update(1, 0, 0.0)
    ntp = ntp_timestamp(1000.0)
    stats.on_sender_report(ntp, arrival=10.0)
    block = stats.report_block(now=10.5)
    assert block.lsr == ntp_middle(ntp)
    assert block.dlsr == 32768  # 0.5 s in 1/65536 s units


def test_sdes_items_other_than_cname_are_skipped() -> None:
    chunk = struct.pack("!I", 7) + b"\x02\x03bob" + b"\x01\x02cn" + b"\x00"
    chunk += bytes(-len(chunk) % 4)
    data = struct.pack("!BBH", 0x81, 202, len(chunk) // 4) + chunk
    (sdes,) = parse_compound(data)
    assert sdes == SourceDescription({7: "cn"})
