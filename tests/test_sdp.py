"""SDP parse/serialize (RFC 8866) and offer/answer (RFC 3264): codecs, directions (hold/resume), rejects,
IPv4/IPv6, version numbers on re-offer."""

from __future__ import annotations

import pytest

from p2psip.errors import ParseError
from p2psip.sdp import (
    Connection,
    SessionDescription,
    make_answer,
    make_offer,
    negotiated,
)

BARESIP_OFFER = (
    b"v=0\r\n"
    b"o=- 1513085384 4087564171 IN IP4 127.0.0.1\r\n"
    b"s=-\r\n"
    b"c=IN IP4 127.0.0.1\r\n"
    b"t=0 0\r\n"
    b"a=tool:baresip 1.0.0\r\n"
    b"m=audio 10670 RTP/AVP 0 8 101\r\n"
    b"b=AS:64\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\n"
    b"a=sendrecv\r\n"
    b"a=label:1\r\n"
    b"a=ssrc:2918421519 cname:sip:alice@127.0.0.1\r\n"
    b"a=rtcp-rsize\r\n"
    b"a=ptime:20\r\n"
)

RICH = (
    "v=0\r\n"
    "o=jdoe 2890844526 2890842807 IN IP6 2001:db8::1\r\n"
    "s=SDP Seminar\r\n"
    "i=A Seminar on the session description protocol\r\n"
    "u=http://www.example.com/seminars/sdp.pdf\r\n"
    "e=j.doe@example.com (Jane Doe)\r\n"
    "p=+1 617 555-6011\r\n"
    "c=IN IP6 2001:db8::2\r\n"
    "b=CT:128\r\n"
    "t=2873397496 2873404696\r\n"
    "r=7d 1h 0 25h\r\n"
    "z=2882844526 -1h 2898848070 0\r\n"
    "k=prompt\r\n"
    "a=recvonly\r\n"
    "m=audio 49170 RTP/AVP 0\r\n"
    "i=voice\r\n"
    "m=video 51372/2 RTP/AVP 99\r\n"
    "c=IN IP6 2001:db8::3\r\n"
    "b=AS:256\r\n"
    "k=prompt\r\n"
    "a=rtpmap:99 h263-1998/90000\r\n"
)


def test_parse_a_real_softphone_offer() -> None:
    sdp = SessionDescription.parse(BARESIP_OFFER)
    assert sdp.origin.session_id == 1513085384 and sdp.origin.session_version == 4087564171
    (audio,) = sdp.media
    assert (audio.media, audio.port, audio.proto, audio.formats) == (
        "audio",
        10670,
        "RTP/AVP",
        ["0", "8", "101"],
    )
    assert audio.rtpmap()[101] == ("telephone-event", 8000, 1)
    assert audio.fmtp() == {101: "0-15"}
    assert audio.direction == "sendrecv" and audio.ptime == 20
    assert audio.attribute("rtcp-rsize") == "" and audio.attribute("nope") is None
    assert audio.bandwidths == [("AS", 64)]
    assert bytes(sdp) == BARESIP_OFFER  # unknown attributes survive the round trip


def test_every_line_type_round_trips() -> None:
    sdp = SessionDescription.parse(RICH)
    assert str(sdp) == RICH
    assert sdp.connection == Connection("2001:db8::2", "IP6")
    assert sdp.timings[0].repeats == ["7d 1h 0 25h"]
    assert sdp.media_direction(sdp.media[0]) == "recvonly"  # inherited from the session level
    assert sdp.media[1].port_count == 2
    assert sdp.media_connection(sdp.media[1]) == Connection("2001:db8::3", "IP6")


def test_bare_lf_line_ends_are_accepted() -> None:
    sdp = SessionDescription.parse(BARESIP_OFFER.replace(b"\r\n", b"\n"))
    assert bytes(sdp) == BARESIP_OFFER


def _without(line: str) -> str:
    return BARESIP_OFFER.decode().replace(line + "\r\n", "")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty SDP"),
        (b"\xff\xfe", "not valid UTF-8"),
        ("o=- 1 1 IN IP4 1.2.3.4\r\n", "must start with v=0"),
        ("v=1\r\n", "only SDP version 0"),
        ("v=0\r\nhello\r\n", "<type>=<value>"),
        ("v=0\r\nX=1\r\n", "lower-case type letter"),
        ("v=0\r\nv=0\r\n", "only once"),
        (_without("s=-"), "required s= line is missing"),
        (_without("t=0 0"), "required t= line is missing"),
        (_without("c=IN IP4 127.0.0.1"), "no c= line"),
        (BARESIP_OFFER.decode().replace("o=- 1513085384", "o=- abc"), "must be numbers"),
        (BARESIP_OFFER.decode().replace("o=- ", "o="), "6 fields"),
        (BARESIP_OFFER.decode().replace("c=IN IP4 127.0.0.1", "c=IN IP4 127.0.0.999"), "not a valid IP4"),
        (BARESIP_OFFER.decode().replace("c=IN IP4 127.0.0.1", "c=IN IP6 127.0.0.1"), "not an IP6 address"),
        (BARESIP_OFFER.decode().replace("c=IN IP4 127.0.0.1", "c=IN IP4"), "c= needs"),
        (BARESIP_OFFER.decode().replace("m=audio 10670", "m=audio 99999"), "not a port"),
        (BARESIP_OFFER.decode().replace("m=audio 10670", "m=audio x"), "not a port"),
        (BARESIP_OFFER.decode().replace("RTP/AVP 0 8 101", "RTP/AVP PCMU"), "payload type numbers"),
        (BARESIP_OFFER.decode().replace("RTP/AVP 0 8 101", ""), "m= needs"),
        (BARESIP_OFFER.decode().replace("b=AS:64", "b=AS"), "b= needs"),
        (BARESIP_OFFER.decode().replace("b=AS:64", "u=http://x"), "not allowed in a media section"),
        (BARESIP_OFFER.decode().replace("t=0 0", "t=now"), "t= needs"),
        (BARESIP_OFFER.decode().replace("a=label:1", "a=bad name:1"), "attribute name must be a token"),
        ("v=0\r\ns=-\r\no=- 1 1 IN IP4 1.2.3.4\r\n", "out of order"),
        (BARESIP_OFFER.decode().replace("a=tool:baresip 1.0.0", "y=1"), "unknown"),
    ],
)
def test_bad_sdp_is_a_parse_error_that_names_the_problem(body: str | bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message) as caught:
        SessionDescription.parse(body)
    assert caught.value.status in (400, 488)


def test_offer_answer_basic_and_both_points_of_view() -> None:
    offer = SessionDescription.parse(bytes(make_offer("192.0.2.1", 4000)))
    answer = SessionDescription.parse(bytes(make_answer(offer, "192.0.2.2", 5000)))
    ours = negotiated(offer, answer)
    theirs = negotiated(offer, answer, role="answerer")
    assert (ours.remote, ours.remote_rtcp, ours.codec, ours.payload_type) == (
        ("192.0.2.2", 5000),
        ("192.0.2.2", 5001),
        "PCMU",
        0,
    )
    assert ours.dtmf_payload_type == 101 and ours.send and ours.recv and not ours.rejected
    assert (theirs.remote, theirs.codec, theirs.direction) == (("192.0.2.1", 4000), "PCMU", "sendrecv")


def test_answer_keeps_offer_order_and_payload_numbers() -> None:
    offer = SessionDescription.parse(
        BARESIP_OFFER.replace(b"RTP/AVP 0 8 101", b"RTP/AVP 8 0 96").replace(b":101 ", b":96 ")
    )
    answer = make_answer(offer, "127.0.0.1", 6000, codecs=["PCMU", "PCMA"])
    assert answer.media[0].formats == ["8", "0", "96"]
    assert answer.media[0].rtpmap()[96] == ("telephone-event", 8000, 1)
    params = negotiated(offer, answer, role="answerer")
    assert (params.codec, params.payload_type, params.dtmf_payload_type) == ("PCMA", 8, 96)


def test_no_common_codec_rejects_the_stream_with_port_zero() -> None:
    offer = make_offer("127.0.0.1", 4000, codecs=["PCMA"])
    answer = make_answer(offer, "127.0.0.1", 5000, codecs=["PCMU"])
    assert answer.media[0].port == 0 and answer.media[0].rejected
    assert negotiated(offer, answer).rejected


def test_other_streams_are_rejected_but_audio_accepted() -> None:
    offer = SessionDescription.parse(RICH.replace("a=recvonly\r\n", ""))
    answer = make_answer(offer, "::1", 7000, dtmf=False)
    assert [m.port for m in answer.media] == [7000, 0]
    assert answer.media[1].media == "video" and answer.media[1].formats == ["99"]
    assert answer.connection == Connection("::1", "IP6") and answer.origin.addrtype == "IP6"
    params = negotiated(offer, answer, role="answerer")
    assert params.remote == ("2001:db8::2", 49170) and params.dtmf_payload_type is None


def test_offer_removing_a_stream_gets_port_zero_back() -> None:
    offer = make_offer("127.0.0.1", 0)
    answer = make_answer(offer, "127.0.0.1", 5000)
    assert answer.media[0].port == 0


@pytest.mark.parametrize(
    ("offered", "wanted", "answered", "offerer_sends", "offerer_receives"),
    [
        ("sendrecv", "sendrecv", "sendrecv", True, True),
        ("sendonly", "sendrecv", "recvonly", True, False),  # offerer puts us on hold
        ("recvonly", "sendrecv", "sendonly", False, True),
        ("inactive", "sendrecv", "inactive", False, False),
        ("sendrecv", "sendonly", "sendonly", False, True),  # the answerer holds
        ("sendonly", "sendonly", "inactive", False, False),  # both hold
        ("sendrecv", "inactive", "inactive", False, False),
    ],
)
def test_direction_rules(
    offered: str, wanted: str, answered: str, offerer_sends: bool, offerer_receives: bool
) -> None:
    offer = make_offer("127.0.0.1", 4000, direction=offered)  # type: ignore[arg-type]
    answer = make_answer(offer, "127.0.0.1", 5000, direction=wanted)  # type: ignore[arg-type]
    assert answer.media[0].direction == answered
    params = negotiated(offer, answer)
    assert (params.send, params.recv) == (offerer_sends, offerer_receives)
    other = negotiated(offer, answer, role="answerer")
    assert (other.send, other.recv) == (offerer_receives, offerer_sends)


def test_legacy_hold_with_zero_address_is_treated_as_sendonly() -> None:
    offer = SessionDescription.parse(BARESIP_OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 0.0.0.0"))
    answer = make_answer(offer, "127.0.0.1", 5000)
    assert answer.media[0].direction == "recvonly"
    assert not negotiated(offer, answer, role="answerer").send


def test_hold_and_resume_re_offers_bump_the_version() -> None:
    first = make_offer("127.0.0.1", 4000)
    hold = make_offer("127.0.0.1", 4000, direction="sendonly", previous=first)
    resume = make_offer("127.0.0.1", 4000, previous=hold)
    same = make_offer("127.0.0.1", 4000, previous=resume)
    ids = {sdp.origin.session_id for sdp in (first, hold, resume, same)}
    assert len(ids) == 1
    versions = [sdp.origin.session_version for sdp in (first, hold, resume, same)]
    assert versions[1] == versions[0] + 1 and versions[2] == versions[0] + 2
    assert versions[3] == versions[2]  # nothing changed: the version stays (RFC 3264 §8)
    answer = make_answer(first, "127.0.0.1", 5000)
    held_answer = make_answer(hold, "127.0.0.1", 5000, previous=answer)
    assert held_answer.origin.session_version == answer.origin.session_version + 1
    assert held_answer.media[0].direction == "recvonly"


def test_ipv6_offer() -> None:
    offer = make_offer("::1", 4000)
    assert "c=IN IP6 ::1" in str(offer) and "IN IP6 ::1" in str(offer.origin)
    answer = make_answer(SessionDescription.parse(bytes(offer)), "::1", 5000)
    assert negotiated(offer, answer).remote == ("::1", 5000)


def test_rtcp_attribute_and_rtcp_mux() -> None:
    offer = make_offer("127.0.0.1", 4000, rtcp_mux=True)
    answer = make_answer(offer, "127.0.0.1", 5000)
    assert answer.media[0].attribute("rtcp-mux") == ""
    assert negotiated(offer, answer).remote_rtcp == ("127.0.0.1", 5000)
    plain = SessionDescription.parse(BARESIP_OFFER.replace(b"a=ptime:20", b"a=rtcp:7777"))
    assert negotiated(make_offer("127.0.0.1", 1), make_answer(plain, "127.0.0.1", 2), role="offerer")
    assert negotiated(plain, make_answer(plain, "127.0.0.1", 2), role="answerer").remote_rtcp[1] == 7777


def test_answer_with_wrong_stream_count_is_an_error() -> None:
    offer = make_offer("127.0.0.1", 4000)
    answer = make_answer(offer, "127.0.0.1", 5000)
    answer.media.append(answer.media[0])
    with pytest.raises(ParseError, match="same number"):
        negotiated(offer, answer)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unsupported codec"):
        make_offer("127.0.0.1", 4000, codecs=["opus"])
    with pytest.raises(ValueError, match="direction"):
        make_offer("127.0.0.1", 4000, direction="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dynamic"):
        make_offer("127.0.0.1", 4000, dtmf_payload_type=8)


def test_ice_attributes_round_trip_and_validation() -> None:
    """RFC 8839: credentials and candidates on the m= line (or credentials at session level); a bad
    ufrag/pwd is a ParseError (488); an offer without credentials has no ICE."""
    from p2psip.sdp import IceDescription, make_offer

    ice = IceDescription("abcd", "p" * 22, ("1 1 udp 2130706431 10.0.0.1 4000 typ host",))
    sdp = SessionDescription.parse(bytes(make_offer("10.0.0.1", 4000, media_attributes=ice.attributes())))
    assert IceDescription.of(sdp, sdp.media[0]) == ice
    plain = SessionDescription.parse(bytes(make_offer("10.0.0.1", 4000)))
    assert IceDescription.of(plain, plain.media[0]) is None
    session_level = SessionDescription.parse(bytes(make_offer("10.0.0.1", 4000)))
    session_level.attributes += [("ice-ufrag", "wxyz"), ("ice-pwd", "q" * 24)]
    found = IceDescription.of(session_level, session_level.media[0])
    assert found is not None and found.ufrag == "wxyz" and found.candidates == ()
    for ufrag, pwd in (("abc", "p" * 22), ("ab:d", "p" * 22), ("abcd", "short")):
        with pytest.raises(ParseError):
            IceDescription(ufrag, pwd)
