"""Messages in the spirit of the RFC 4475 torture tests: what must parse, and what must be refused with 400.

The texts are written with ``\\n`` and turned into CRLF lines by :func:`crlf`.
"""

from __future__ import annotations

import pytest

from p2psip.errors import ParseError
from p2psip.message import CSeq, Request, Response, parse
from p2psip.uri import URI


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


WSINV_BODY = (
    "v=0\no=mhandley 29739 7272939 IN IP4 192.0.2.3\ns=-\nc=IN IP4 192.0.2.4\nt=0 0\n"
    "m=audio 49217 RTP/AVP 0 12\nm=video 3227 RTP/AVP 31\na=rtpmap:31 LPC\n"
)

WSINV = crlf(
    "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\n"
    "TO :\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\n"
    'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>\n  ;\n  tag = 98asjd8\n'
    "MaX-fOrWaRdS: 0068\n"
    "Call-ID: wsinv.ndaksdj@192.0.2.1\n"
    f"Content-Length   : {len(crlf(WSINV_BODY))}\n"
    "cseq: 0009\n  INVITE\n"
    "Via  : SIP  /   2.0\n /UDP\n    192.0.2.2;branch=390skdjuw\n"
    "s :\n"
    "NewFangledHeader:   newfangled value\n continued newfangled value\n"
    "UnknownHeaderWithUnusualValue: ;;,,;;,;\n"
    "Content-Type: application/sdp\n"
    "Route:\n <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\n"
    "v:  SIP  / 2.0  / TCP     spindle.example.com   ;\n  branch  =   z9hG4bK9ikj8  ,\n"
    " SIP  /    2.0   / UDP  192.168.255.111   ; branch=\n z9hG4bK30239\n"
    'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =\n      newvalue ;\n'
    "  secondparam ; q = 0.33\n"
    "\n" + WSINV_BODY
)


def test_short_tortuous_invite() -> None:
    msg = parse(WSINV)
    assert isinstance(msg, Request)
    assert msg.uri.params == {"unknownparam": None}
    assert msg.to.tag == "1918181833n"
    assert msg.to.uri == URI("sip:vivekg@chair-dnrc.example.com")
    assert msg.from_.display == 'J Rosenberg \\"'
    assert msg.from_.tag == "98asjd8"
    assert msg.max_forwards == 68
    assert msg.cseq == CSeq(9, "INVITE")
    assert [(v.transport, v.host, v.branch) for v in msg.via] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert msg.get("Subject") == ""
    assert msg.get("newfangledheader") == "newfangled value continued newfangled value"
    assert msg.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert msg.route[0].uri.params == {"lr": None, "unknownwith": "value", "unknown-no-value": None}
    [contact] = msg.contacts
    assert contact.display == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert contact.q == 0.33
    assert msg.body == crlf(WSINV_BODY)
    assert parse(bytes(msg)) == msg


INTMETH = (
    b"!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:"
    b"&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~\r\n"
    b'To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" '
    b"<sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>\r\n"
    b"From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%="
    + '"работающий"'.encode()
    + b";tag=_token~1'+`*%!-.\r\n"
    b"Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{\r\n"
    b"CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~\r\n"
    b"Max-Forwards: 255\r\n"
    b"extensionHeader-!.%*+_`'~: " + "\ufeff大停電".encode() + b"\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def test_wide_range_of_valid_characters() -> None:
    msg = parse(INTMETH)
    assert isinstance(msg, Request)
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert msg.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert msg.to.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert msg.from_.display == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.tag == "_token~1'+`*%!-."
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.max_forwards == 255
    assert msg.get("extensionheader-!.%*+_`'~") == "\ufeff大停電"
    assert parse(bytes(msg)) == msg


def test_escapes_and_escaped_null() -> None:
    msg = parse(
        crlf(
            "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0\n"
            "To: sip:%75se%72@example.com\n"
            "From: <sip:I%20have%20spaces@example.net>;tag=938\n"
            "Max-Forwards: 87\n"
            "Call-ID: esc01.239409asdfakjkn23onasd0-3234\n"
            "CSeq: 234234 INVITE\n"
            "Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw\n"
            "Contact: <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>\n"
            "Content-Length: 0\n\n"
        )
    )
    assert isinstance(msg, Request)
    assert msg.uri.user == "sips%3Auser%40example.com"
    assert msg.to.uri == URI("sip:user@example.com")
    assert msg.to.uri.aor() == "sip:user@example.com"
    assert msg.contacts[0].uri == URI("sip:caller@host5.example.net;lr;name=value%25%34%31")
    null = parse(
        crlf(
            "REGISTER sip:example.com SIP/2.0\nTo: sip:null-%00-null@example.com\n"
            "From: sip:null-%00-null@example.com;tag=839923423\nMax-Forwards: 70\n"
            "Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd\nCSeq: 14398234 REGISTER\n"
            "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw\n"
            "Contact: <sip:%00@host5.example.com>\nContact: <sip:%00%00@host5.example.com>\n"
            "L:0\n\n"
        )
    )
    assert null.to.uri.user == "null-%00-null"
    assert [c.uri.user for c in null.contacts] == ["%00", "%00%00"]


def test_percent_that_is_not_an_escape() -> None:
    msg = parse(
        crlf(
            "RE%47IST%45R sip:registrar.example.com SIP/2.0\n"
            'To: "%Z%45" <sip:resource@example.com>\n'
            'From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23\n'
            "Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf\n"
            "Via: SIP/2.0/TCP host.example.com;rport;branch=z9hG4bK209%fzsnel234\n"
            "CSeq: 29344 RE%47IST%45R\nMax-Forwards: 70\n"
            "Contact: <sip:alias1@host1.example.com>\nC%6Fntact: <sip:alias2@host2.example.com>\n"
            "Contact: <sip:alias3@host3.example.com>\nl: 0\n\n"
        )
    )
    assert isinstance(msg, Request) and msg.method == "RE%47IST%45R"
    assert msg.to.display == "%Z%45"
    assert len(msg.contacts) == 2
    assert msg.get("c%6fntact") == "<sip:alias2@host2.example.com>"


def test_no_lws_before_angle_and_semicolon_user_and_transports() -> None:
    msg = parse(
        crlf(
            "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0\n"
            "To: sip:j_user@example.com\n"
            "From: caller<sip:caller@example.com>;tag=323\n"
            "Max-Forwards: 70\nCall-ID: lwsdisp.1234abcd@funky.example.com\nCSeq: 60 OPTIONS\n"
            "Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw,"
            " SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf,"
            " SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj,"
            " SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en,"
            " SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee\n"
            "l: 0\n\n"
        )
    )
    assert isinstance(msg, Request)
    assert msg.uri.user == "user;par=u%40example.net"
    assert msg.uri.host == "example.com"
    assert msg.from_.display == "caller"
    assert [v.transport for v in msg.via] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


def test_unusual_and_empty_reason_phrases_and_extra_datagram_octets() -> None:
    base = (
        "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\nCall-ID: unreason.1234ksdfak3j2erwedfsASdf\n"
        "CSeq: 35 INVITE\nFrom: sip:user@example.com;tag=11141343\nTo: sip:user@example.edu;tag=2229\n"
        "Content-Length: 0\n\n"
    )
    odd = parse(crlf("SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять - простое\n" + base))
    assert isinstance(odd, Response) and odd.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    empty = parse(crlf("SIP/2.0 100 \n" + base))
    assert isinstance(empty, Response) and (empty.status, empty.reason) == (100, "")
    two = crlf(
        "REGISTER sip:example.com SIP/2.0\nTo: sip:j.user@example.com\n"
        "From: sip:j.user@example.com;tag=43251j3j324\n"
        "Max-Forwards: 8\nI: dblreq.0ha0isndaksdj99sdfafnl3lk233412\nContact: sip:j.user@host.example.com\n"
        "CSeq: 8 REGISTER\nVia: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492\nContent-Length: 0\n\n"
        "INVITE sip:joe@example.com SIP/2.0\nt: sip:joe@example.com\n\n"
    )
    first = parse(two)
    assert isinstance(first, Request) and first.method == "REGISTER" and first.body == b""


def test_ipv6_everywhere_and_opaque_schemes() -> None:
    msg = parse(
        crlf(
            "REGISTER sip:[2001:db8::10] SIP/2.0\nTo: sip:user@example.com\n"
            "From: sip:user@example.com;tag=81x2\n"
            "Via: SIP/2.0/UDP [2001:db8::9:1]:6050;branch=z9hG4bKas3-111;received=2001:db8::9:255\n"
            "Call-ID: SSG9559905523997077@hlau_4100\nMax-Forwards: 70\n"
            'Contact: "Caller" <sip:caller@[2001:db8::1]>\nContact: <sip:user@[::ffff:192.0.2.10]>\n'
            "CSeq: 98176 REGISTER\nContent-Length: 0\n\n"
        )
    )
    assert isinstance(msg, Request)
    assert msg.uri.host == "[2001:db8::10]"
    via = msg.top_via
    assert via is not None and (via.host, via.port, via.received) == (
        "[2001:db8::9:1]",
        6050,
        "2001:db8::9:255",
    )
    assert [c.uri.host for c in msg.contacts] == ["[2001:db8::1]", "[::ffff:192.0.2.10]"]
    opaque = parse(
        crlf(
            "OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0\nTo: isbn:2983792873\n"
            "From: <http://www.example.com>;tag=3234233\nCall-ID: unksm2.daksdj@hyphenated-host.example.com\n"
            "CSeq: 234902 OPTIONS\nMax-Forwards: 70\nVia: SIP/2.0/UDP 192.0.2.21:5060;branch=z9hG4bKkdjuw\n"
            "Contact: <name:John_Smith>\nl: 0\n\n"
        )
    )
    assert isinstance(opaque, Request)
    assert opaque.uri.scheme == "nobodyknowsthisscheme" and opaque.uri.opaque == "totallyopaquecontent"
    assert opaque.to.uri.opaque == "2983792873"
    assert parse(bytes(opaque)) == opaque


GOOD_HEADERS = (
    "Via: SIP/2.0/UDP host4.example.com:5060;branch=z9hG4bKkdju43234\nMax-Forwards: 70\n"
    'From: "Bell, Alexander" <sip:a.g.bell@example.com>;tag=433423\nCall-ID: x.y@z\n'
)


@pytest.mark.parametrize(
    ("text", "answerable"),
    [
        # extraneous header field separators
        (
            "INVITE sip:user@example.com SIP/2.0\nTo: sip:j.user@example.com\n"
            "From: sip:caller@example.net;tag=1\n"
            "Max-Forwards: 7\nCall-ID: badinv01\nCSeq: 8 INVITE\nVia: SIP/2.0/UDP 192.0.2.15;;,;,,\nl: 0\n\n",
            False,
        ),
        # Content-Length larger than the message
        (
            "INVITE sip:u@example.com SIP/2.0\n" + GOOD_HEADERS + "To: <sip:u@example.com>\nCSeq: 1 INVITE\n"
            "Content-Length: 9999\n\nv=0\n",
            True,
        ),
        # negative Content-Length
        (
            "INVITE sip:u@example.com SIP/2.0\n" + GOOD_HEADERS + "To: <sip:u@example.com>\nCSeq: 1 INVITE\n"
            "Content-Length: -999\n\n",
            True,
        ),
        # overlarge CSeq
        (
            "REGISTER sip:example.com SIP/2.0\n" + GOOD_HEADERS + "To: <sip:u@example.com>\n"
            "CSeq: 36893488147419103232 REGISTER\nl: 0\n\n",
            False,
        ),
        # unterminated quoted display name
        (
            "INVITE sip:u@example.com SIP/2.0\n"
            + GOOD_HEADERS.replace('"Bell, Alexander"', '"Bell, Alexander')
            + "To: <sip:u@example.com>\nCSeq: 1 INVITE\nl: 0\n\n",
            False,
        ),
        # <> around the Request-URI
        (
            "INVITE <sip:u@example.com> SIP/2.0\n"
            + GOOD_HEADERS
            + "To: <sip:u@example.com>\nCSeq: 1 INVITE\nl: 0\n\n",
            True,
        ),
        # LWS inside the Request-URI, multiple SP, trailing SP
        (
            "INVITE sip:u@example.com; lr SIP/2.0\n"
            + GOOD_HEADERS
            + "To: <sip:u@example.com>\nCSeq: 1 INVITE\nl: 0\n\n",
            False,
        ),
        (
            "INVITE  sip:u@example.com  SIP/2.0\n"
            + GOOD_HEADERS
            + "To: <sip:u@example.com>\nCSeq: 1 INVITE\nl: 0\n\n",
            False,
        ),
        (
            "OPTIONS sip:u@example.com SIP/2.0  \n"
            + GOOD_HEADERS
            + "To: <sip:u@example.com>\nCSeq: 1 OPTIONS\nl: 0\n\n",
            False,
        ),
        # spaces within addr-spec
        (
            "OPTIONS sip:u@example.org SIP/2.0\n"
            + GOOD_HEADERS
            + 'To: "Watson, Thomas" < sip:t.watson@example.org >\n'
            "CSeq: 3923239 OPTIONS\nl: 0\n\n",
            False,
        ),
        # non-token characters in an unquoted display name
        (
            "OPTIONS sip:u@example.org SIP/2.0\n"
            + GOOD_HEADERS
            + "To: Watson, Thomas <sip:t.watson@example.org>\n"
            "CSeq: 3923239 OPTIONS\nl: 0\n\n",
            False,
        ),
        # CSeq method mismatch, known and unknown method
        (
            "OPTIONS sip:u@example.org SIP/2.0\n"
            + GOOD_HEADERS
            + "To: <sip:u@example.org>\nCSeq: 1 INVITE\nl: 0\n\n",
            True,
        ),
        (
            "NEWMETHOD sip:u@example.org SIP/2.0\n"
            + GOOD_HEADERS
            + "To: <sip:u@example.org>\nCSeq: 1 INVITE\nl: 0\n\n",
            True,
        ),
        # the same single-valued header twice
        (
            "OPTIONS sip:u@example.org SIP/2.0\n"
            + GOOD_HEADERS
            + "To: <sip:u@example.org>\nTo: <sip:v@example.org>\n"
            "CSeq: 1 OPTIONS\nl: 0\n\n",
            True,
        ),
        # missing Call-ID
        (
            "OPTIONS sip:u@example.org SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nFrom: <sip:a@b>;tag=1\n"
            "To: <sip:u@example.org>\nCSeq: 1 OPTIONS\nl: 0\n\n",
            False,
        ),
        # overlarge status code
        (
            "SIP/2.0 4294967301 better not break the receiver\n" + GOOD_HEADERS + "To: <sip:u@example.org>\n"
            "CSeq: 1 OPTIONS\nl: 0\n\n",
            False,
        ),
    ],
)
def test_invalid_messages_are_refused(text: str, answerable: bool) -> None:
    with pytest.raises(ParseError) as info:
        parse(crlf(text))
    assert info.value.status == 400
    partial = info.value.partial
    if answerable:
        assert isinstance(partial, Request)
        resp = Response.for_request(partial, 400)
        assert parse(bytes(resp)).status == 400  # type: ignore[union-attr]
    else:
        assert partial is None


def test_unknown_version_is_505() -> None:
    with pytest.raises(ParseError) as info:
        parse(
            crlf(
                "OPTIONS sip:t.watson@example.org SIP/7.0\n"
                + GOOD_HEADERS
                + "To: <sip:u@x>\nCSeq: 1 OPTIONS\nl: 0\n\n"
            )
        )
    assert info.value.status == 505


def test_max_forwards_out_of_range_is_refused_on_access() -> None:
    msg = parse(
        crlf(
            "OPTIONS sip:u@example.org SIP/2.0\n"
            + GOOD_HEADERS.replace("Max-Forwards: 70", "Max-Forwards: 300")
            + "To: <sip:u@example.org>\nCSeq: 1 OPTIONS\nl: 0\n\n"
        )
    )
    with pytest.raises(ParseError):
        _ = msg.max_forwards
