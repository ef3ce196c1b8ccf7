"""RFC 4733 telephone events: our sender's packet train, our receiver's de-duplication, and interop with the
real RFC 2833 captures that sipp (Debian's sip-tester) ships in /usr/share/sip-tester/."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from conftest import require_tool

from p2psip.errors import ParseError
from p2psip.media.dtmf import DtmfReceiver, DtmfSender, TelephoneEvent, digit_to_event, event_to_digit
from p2psip.media.rtp import RtpPacket

PCAP_DIR = Path("/usr/share/sip-tester")


def read_pcap_udp_payloads(path: Path) -> list[bytes]:
    """The UDP payloads of a classic pcap file (Ethernet or Linux cooked link layer, IPv4/IPv6)."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path} is not a pcap file")
    (linktype,) = struct.unpack_from(endian + "I", data, 20)
    link_header = {1: 14, 113: 16, 101: 0}[linktype]  # Ethernet, Linux SLL, raw IP
    payloads = []
    offset = 24
    while offset + 16 <= len(data):
        _, _, captured, _ = struct.unpack_from(endian + "IIII", data, offset)
        frame = data[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        ip = frame[link_header:]
        version = ip[0] >> 4
        if version == 4 and ip[9] == 17:
            udp = ip[(ip[0] & 0x0F) * 4 :]
        elif version == 6 and ip[6] == 17:
            udp = ip[40:]
        else:
            continue
        (length,) = struct.unpack_from("!H", udp, 4)
        payloads.append(bytes(udp[8:length]))
    return payloads


def test_event_codes() -> None:
    assert [digit_to_event(d) for d in "09*#Ad"] == [0, 9, 10, 11, 12, 15]
    assert event_to_digit(11) == "#" and event_to_digit(32) == "?"
    with pytest.raises(ValueError, match="not a DTMF digit"):
        digit_to_event("x")


def test_payload_layout() -> None:
    event = TelephoneEvent(event=11, end=True, volume=10, duration=800)
    assert bytes(event) == bytes([11, 0x80 | 10]) + (800).to_bytes(2, "big")
    assert TelephoneEvent.parse(bytes(event)) == event
    with pytest.raises(ParseError):
        TelephoneEvent.parse(b"\x01")


def test_sender_packet_train_for_one_digit() -> None:
    sender = DtmfSender(samples_per_packet=160, duration=800, gap=320, end_repeats=3)
    sender.queue("5")
    packets = []
    timestamp = 1000
    while sender.busy:
        packets.append(sender.tick(timestamp))
        timestamp += 160
    events = [p for p in packets if p is not None]
    decoded = [TelephoneEvent.parse(p.payload) for p in events]
    assert [p.marker for p in events] == [True] + [False] * 6  # marker only on the first
    assert {p.timestamp for p in events} == {1000}  # one timestamp: the event's start
    assert [d.duration for d in decoded] == [160, 320, 480, 640, 800, 800, 800]  # growing, then fixed
    assert [d.end for d in decoded] == [False] * 4 + [True] * 3  # end bit sent three times
    assert packets[-2:] == [None, None]  # the gap before the next digit carries audio


def test_sender_refuses_bad_digits_without_sending_any() -> None:
    sender = DtmfSender()
    with pytest.raises(ValueError):
        sender.queue("12x")
    assert not sender.busy


def test_every_digit_survives_loss_once_and_only_once() -> None:
    rng = random.Random(11)
    sender = DtmfSender()
    receiver = DtmfReceiver()
    digits = "0123456789*#ABCD"
    sender.queue(digits)
    timestamp = 0
    while sender.busy:
        packet = sender.tick(timestamp)
        timestamp += 160
        if packet is not None and rng.random() > 0.2:  # 20% loss
            receiver.receive(packet.timestamp, packet.payload)
    assert receiver.digits == digits


def test_receiver_reports_a_digit_once_per_event() -> None:
    receiver = DtmfReceiver()
    first = receiver.receive(8000, bytes(TelephoneEvent(1, False, 10, 160)))
    assert first is not None and first.digit == "1"
    assert receiver.receive(8000, bytes(TelephoneEvent(1, True, 10, 800))) is None
    assert receiver.receive(8000, bytes(TelephoneEvent(1, True, 10, 800))) is None
    assert receiver.receive(9600, bytes(TelephoneEvent(1, False, 10, 160))) is not None  # a new press
    assert receiver.digits == "11"


PCAP_DIGITS = {f"dtmf_2833_{d}.pcap": d for d in "0123456789"} | {
    "dtmf_2833_pound.pcap": "#",
    "dtmf_2833_star.pcap": "*",
}


def test_sipp_rfc2833_captures_decode_to_their_digits() -> None:
    require_tool("sipp")
    if not PCAP_DIR.is_dir():
        pytest.skip("sip-tester's pcap directory is missing")
    for name, digit in PCAP_DIGITS.items():
        receiver = DtmfReceiver()
        packets = [RtpPacket.parse(p) for p in read_pcap_udp_payloads(PCAP_DIR / name)]
        assert len(packets) >= 4
        for packet in packets:
            assert packet.payload_type == 101
            receiver.receive(packet.timestamp, packet.payload)
        assert receiver.digits == digit, name
        assert packets[0].marker and TelephoneEvent.parse(packets[-1].payload).end
