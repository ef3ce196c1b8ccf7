"""Property tests: the SDP, RTP, RTCP and telephone-event parsers either parse or raise ParseError, never
anything else; what we build parses back to itself."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from p2psip.errors import ParseError
from p2psip.media.dtmf import TelephoneEvent
from p2psip.media.rtcp import parse_compound
from p2psip.media.rtp import RtpPacket
from p2psip.sdp import DIRECTIONS, SessionDescription, make_answer, make_offer, negotiated

VALID = bytes(make_offer("127.0.0.1", 4000)).decode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_sdp_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        SessionDescription.parse(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(VALID)), st.text(max_size=30))
def test_sdp_with_an_edit_never_crashes(position: int, insert: str) -> None:
    text = VALID[:position] + insert + VALID[position:]
    try:
        sdp = SessionDescription.parse(text)
    except ParseError:
        return
    assert SessionDescription.parse(bytes(sdp)) == sdp  # whatever parses, round-trips


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["127.0.0.1", "::1", "192.0.2.7", "2001:db8::5"]),
    st.integers(1, 65535),
    st.lists(st.sampled_from(["PCMU", "PCMA"]), min_size=1, max_size=2, unique=True),
    st.sampled_from(DIRECTIONS),
    st.sampled_from(DIRECTIONS),
    st.one_of(st.none(), st.integers(96, 127)),
)
def test_offer_answer_round_trip(
    address: str, port: int, codecs: list[str], offered: str, wanted: str, dtmf: int | None
) -> None:
    offer = SessionDescription.parse(
        bytes(make_offer(address, port, codecs=codecs, direction=offered, dtmf_payload_type=dtmf))  # type: ignore[arg-type]
    )
    answer = SessionDescription.parse(bytes(make_answer(offer, address, port + 0, direction=wanted)))  # type: ignore[arg-type]
    ours, theirs = negotiated(offer, answer), negotiated(offer, answer, role="answerer")
    assert ours.codec == theirs.codec == codecs[0]
    assert (ours.send, ours.recv) == (theirs.recv, theirs.send)
    assert ours.dtmf_payload_type == dtmf


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_rtp_rtcp_and_events_never_crash(data: bytes) -> None:
    for parse in (RtpPacket.parse, parse_compound, TelephoneEvent.parse):
        with contextlib.suppress(ParseError):
            parse(data)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 127),
    st.integers(0, 65535),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=200),
    st.booleans(),
    st.lists(st.integers(0, 2**32 - 1), max_size=15),
    st.one_of(
        st.none(),
        st.tuples(st.integers(0, 65535), st.binary(max_size=12).map(lambda b: b + bytes(-len(b) % 4))),
    ),
    st.integers(0, 255),
)
def test_rtp_build_parse_round_trip(
    pt: int,
    seq: int,
    ts: int,
    ssrc: int,
    payload: bytes,
    marker: bool,
    csrcs: list[int],
    extension: tuple[int, bytes] | None,
    padding: int,
) -> None:
    packet = RtpPacket(pt, seq, ts, ssrc, payload, marker, tuple(csrcs), extension, padding)
    assert RtpPacket.parse(bytes(packet)) == packet
