"""PIDF (RFC 3863) and sipfrag (RFC 3420) bodies: round trips, merging, and a parser that refuses DOCTYPE,
entities and external references (no expansion, no fetch)."""

from __future__ import annotations

import pytest

from p2psip import pidf, sipfrag
from p2psip.errors import ParseError

BARESIP_AWAY = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\r\n'
    b'<presence xmlns="urn:ietf:params:xml:ns:pidf"'
    b' xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"'
    b' xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid"'
    b' entity="sip:alice@p2p.example">\r\n'
    b'<dm:person id="p4159"><rpid:activities><rpid:away/></rpid:activities></dm:person>\r\n'
    b'<tuple id="t4109"><status><basic>open</basic></status>'
    b"<contact>sip:alice@127.0.0.1:5070</contact></tuple>\r\n</presence>\r\n"
)


def test_round_trip() -> None:
    doc = pidf.Presence(
        "sip:bob@p2p.example",
        [pidf.PresenceTuple("t1", "open", "sip:bob@192.0.2.9", 0.5, ["at my desk"], "2026-12-07T06:00:00Z")],
        ["hello"],
        ["busy"],
    )
    again = pidf.parse(doc.compose())
    assert again == doc and again.basic == "open"


def test_baresip_document_with_rpid_away() -> None:
    doc = pidf.parse(BARESIP_AWAY)
    assert doc.entity == "sip:alice@p2p.example" and doc.basic == "open" and doc.activities == ["away"]
    assert doc.tuples[0].contact == "sip:alice@127.0.0.1:5070"


def test_an_unknown_basic_value_is_no_status() -> None:
    """baresip 1.0 publishes ``<basic>?</basic>`` until its user picks a status: read it as unknown."""
    doc = pidf.parse(BARESIP_AWAY.replace(b"<basic>open</basic>", b"<basic>?</basic>"))
    assert doc.tuples[0].basic is None and doc.basic == "closed"


def test_merge_any_open_is_open_notes_kept() -> None:
    a = pidf.Presence("sip:x@y", [pidf.PresenceTuple("t", "closed")], ["a"])
    b = pidf.Presence("sip:x@y", [pidf.PresenceTuple("t", "open")], ["b", "a"], ["away"])
    merged = pidf.merge("sip:x@y", [a, b])
    assert merged.basic == "open" and [t.id for t in merged.tuples] == ["t", "t-2"]
    assert merged.notes == ["a", "b"] and merged.activities == ["away"]
    assert pidf.merge("sip:x@y", [a]).basic == "closed" and pidf.merge("sip:x@y", []).basic == "closed"


@pytest.mark.parametrize(
    "body",
    [
        # billion laughs: entities are refused before anything expands
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
        b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="&lol2;"/>',
        # external entity: never fetched, refused
        b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="&x;"/>',
        # external DTD
        b'<!DOCTYPE presence SYSTEM "http://192.0.2.1/evil.dtd"><presence/>',
        # a bare DOCTYPE
        b'<!DOCTYPE presence><presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b"/>',
    ],
)
def test_doctype_and_entities_refused(body: bytes) -> None:
    with pytest.raises(ParseError, match="refused"):
        pidf.parse(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not xml",
        b"<presence>",  # not well-formed
        b'<other xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b"/>',
        b'<presence entity="sip:a@b"/>',  # no namespace
        b'<presence xmlns="urn:ietf:params:xml:ns:pidf"/>',  # no entity
        b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b"><tuple><status/></tuple></presence>',
        b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b"><tuple id="t"><status/>'
        b'<contact priority="2">x</contact></tuple></presence>',
        b"<a>" * 40 + b"</a>" * 40,  # too deep
        b"<a>" + b"<b/>" * 3000 + b"</a>",  # too many elements
        b" " * (pidf.MAX_BYTES + 1),
    ],
)
def test_malformed_pidf_is_a_parse_error(body: bytes) -> None:
    with pytest.raises(ParseError):
        pidf.parse(body)


def test_sipfrag_compose_and_parse() -> None:
    body = sipfrag.compose(180, "Ringing")
    assert body == b"SIP/2.0 180 Ringing\r\n"
    frag = sipfrag.parse_status(body)
    assert frag == (180, "Ringing", ()) and not frag.final
    frag = sipfrag.parse_status(b"SIP/2.0 200 OK\r\nContact: <sip:c@192.0.2.1>\r\n\r\n")
    assert frag.success and frag.headers == (("Contact", "<sip:c@192.0.2.1>"),)
    assert sipfrag.parse_status(b"SIP/2.0 503 Service Unavailable").status == 503


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"INVITE sip:a@b SIP/2.0",
        b"SIP/2.0 99 X",
        b"SIP/2.0 2000 OK",
        b"SIP/2.0 abc",
        b"\xff\xfe",
        b"SIP/2.0 200 OK\r\nbad header",
        b"SIP/2.0 200 O\x01K",
    ],
)
def test_sipfrag_bad(body: bytes) -> None:
    with pytest.raises(ParseError):
        sipfrag.parse_status(body)
