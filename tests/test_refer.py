"""Transfer headers, sans-IO: Replaces (RFC 3891) both ways, Refer-To with an escaped Replaces, and the
checks on a received REFER (RFC 3515; Refer-Sub of RFC 4488)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psip.dialog import Dialog, DialogId
from p2psip.errors import ParseError
from p2psip.message import Request, Response
from p2psip.refer import ReferDecision, Replaces, check_refer, refer_to
from p2psip.subscription import Reject
from p2psip.uri import URI


def refer(*refer_to_values: str, refer_sub: str | None = None) -> Request:
    headers = [("Refer-To", v) for v in refer_to_values]
    if refer_sub is not None:
        headers.append(("Refer-Sub", refer_sub))
    return Request.create(
        "REFER",
        "sip:bob@192.0.2.2",
        from_="<sip:alice@example.com>;tag=a",
        to="<sip:bob@example.com>;tag=b",
        call_id="c1",
        cseq=5,
        headers=headers,
    )


def test_replaces_parse_format_and_dialog_id() -> None:
    r = Replaces.parse("98732@sip.example.com ; from-tag=r33th4x0r;to-tag=ff87ff;early-only")
    assert r == Replaces("98732@sip.example.com", "ff87ff", "r33th4x0r", True)
    assert Replaces.parse(str(r)) == r
    assert r.dialog_id() == DialogId("98732@sip.example.com", "ff87ff", "r33th4x0r")
    for bad in ("", "id-only", "x;to-tag=1", "x;from-tag=1", "<x>;to-tag=1;from-tag=2"):
        with pytest.raises(ParseError):
            Replaces.parse(bad)


def test_replaces_for_dialog_is_the_other_ends_view() -> None:
    invite = Request.create(
        "INVITE",
        "sip:carol@192.0.2.3",
        from_="<sip:alice@x>;tag=A",
        to="<sip:carol@x>",
        call_id="c2",
        contact="<sip:alice@192.0.2.1>",
        via="SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1",
    )
    ok = Response.for_request(invite, 200, to_tag="C")
    ok.add("Contact", "<sip:carol@192.0.2.3>")
    ours = Dialog.uac(invite, ok)
    theirs = Dialog.uas(invite, ok)
    assert Replaces.for_dialog(ours).dialog_id() == theirs.id


def test_refer_to_escapes_replaces_and_check_refer_reads_it() -> None:
    value = refer_to(URI("sip:carol@192.0.2.3:5080"), Replaces("id@h", "C", "A"))
    assert value == "<sip:carol@192.0.2.3:5080?Replaces=id%40h%3Bto-tag%3DC%3Bfrom-tag%3DA>"
    decision = check_refer(refer(value))
    assert isinstance(decision, ReferDecision)
    assert str(decision.target) == "sip:carol@192.0.2.3:5080"
    assert decision.headers == (("Replaces", "id@h;to-tag=C;from-tag=A"),)
    assert decision.replaces == Replaces("id@h", "C", "A") and decision.subscription


def test_check_refer_refusals_and_norefersub() -> None:
    def status(req: Request) -> int:
        decision = check_refer(req)
        assert isinstance(decision, Reject)
        return decision.status

    assert status(refer()) == 400
    assert status(refer("<sip:a@b>", "<sip:c@d>")) == 400
    assert status(refer("<<garbage")) == 400
    assert status(refer("<tel:+1555>")) == 403
    assert status(refer("<http://192.0.2.1/x>")) == 403
    assert status(refer("<sip:a@b?Replaces=nonsense>")) == 400
    assert status(refer("<sip:a@b?Subject=a%0D%0AVia:%20x>")) == 400
    decision = check_refer(refer("<sip:a@b?Call-ID=forged&Subject=hi>", refer_sub="false"))
    assert isinstance(decision, ReferDecision) and not decision.subscription
    assert decision.headers == (("Subject", "hi"),)  # Call-ID is not the referrer's to set


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_replaces_and_refer_to_input_never_crash(text: str) -> None:
    with contextlib.suppress(ParseError):
        Replaces.parse(text)
    try:
        req = refer(text)
    except (ValueError, ParseError):
        return
    assert isinstance(check_refer(req), (ReferDecision, Reject))
