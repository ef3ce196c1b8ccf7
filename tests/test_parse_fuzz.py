"""Property tests: ParseError is the only exception the message layer lets out; parse/serialize round-trip.

Message equality (``Request.__eq__`` / ``Response.__eq__``) means: same start line (Request-URI compared per
RFC 3261 §19.1.4), the same header lines in the same order (canonical name and value; Content-Length aside,
since serialization recomputes it) and the same body.
"""

from __future__ import annotations

import contextlib
import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psip.errors import ParseError
from p2psip.message import Request, Response, StreamFramer, Via, parse, parse_auth
from p2psip.uri import URI, Address

# P2PSIP_FUZZ_EXAMPLES=20000 for a long campaign; the default keeps the suite fast.
FAST = settings(
    max_examples=int(os.environ.get("P2PSIP_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CORPUS = [
    (
        b"INVITE sip:bob@biloxi.com;transport=tcp SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds;rport, "
        b"SIP/2.0/TCP [::1]:5070;branch=z9hG4bK2\r\n"
        b"Max-Forwards: 70\r\n"
        b'To: "Bob \\"B\\"" <sip:bob@biloxi.com>\r\n'
        b"From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n"
        b"Call-ID: a84b4c76e66710@pc33.atlanta.com\r\n"
        b"CSeq: 314159 INVITE\r\n"
        b"Contact: <sip:alice@pc33.atlanta.com>;expires=30, *\r\n"
        b"Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
        b'Authorization: Digest username="a", realm="r", nonce="n,1", uri="sip:b", response="0"\r\n'
        b"Subject: hello,\r\n world\r\n"
        b"Content-Type: application/sdp\r\n"
        b"Content-Length: 4\r\n"
        b"\r\nv=0\r\n"
    ),
    (
        b"SIP/2.0 200 OK\r\n"
        b"v: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKnashds8;received=192.0.2.1;rport=5060\r\n"
        b"t: <sip:bob@biloxi.com>;tag=a6c85cf\r\n"
        b"f: <sip:alice@atlanta.com>;tag=1928301774\r\n"
        b"i: a84b4c76e66710\r\n"
        b"CSeq: 1 REGISTER\r\n"
        b"m: <sip:bob@192.0.2.4>;expires=3600;q=0.5\r\n"
        b"l: 0\r\n\r\n"
    ),
]

# -- generated messages -------------------------------------------------------------------------------------

_token = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~", min_size=1, max_size=8
)
_word = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_hostname = st.lists(_label, min_size=1, max_size=3).map(".".join)
_ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_ipv6 = st.lists(st.integers(0, 0xFFFF).map(lambda n: f"{n:x}"), min_size=8, max_size=8).map(
    lambda parts: "[" + ":".join(parts) + "]"
)
_host = st.one_of(_hostname, _ipv4, _ipv6)
_port = st.one_of(st.none(), st.integers(1, 65535))
_uparams = st.dictionaries(_word, st.one_of(st.none(), _word), max_size=3)


@st.composite
def uris(draw: st.DrawFn) -> URI:
    return URI.build(
        scheme=draw(st.sampled_from(["sip", "sips"])),
        user=draw(
            st.one_of(
                st.none(),
                st.text(
                    "abcdefghijklmnopqrstuvwxyz0123456789-_.!~*'()&=+$,;?/", min_size=1, max_size=8
                ).filter(lambda s: s[0].isalnum()),
            )
        ),
        host=draw(_host),
        port=draw(_port),
        params=draw(_uparams),
        headers=draw(st.dictionaries(_word, _word, max_size=2)),
    )


@st.composite
def addresses(draw: st.DrawFn) -> Address:
    display = draw(
        st.one_of(
            st.none(),
            st.text(min_size=0, max_size=10).filter(
                lambda s: "\r" not in s and "\n" not in s and s == s.strip(" \t")
            ),
        )
    )
    params = draw(st.dictionaries(_word, st.one_of(st.none(), _token), max_size=3))
    return Address.build(draw(uris()), display=display, params=params)


@st.composite
def vias(draw: st.DrawFn) -> Via:
    return Via.build(
        draw(st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS"])),
        draw(_host),
        draw(_port),
        branch="z9hG4bK" + draw(_word),
        **draw(
            st.dictionaries(
                _word.filter(lambda w: w not in ("branch", "host", "port", "transport")),
                st.one_of(st.none(), _token),
                max_size=2,
            )
        ),
    )


_value_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20).map(
    lambda s: s.strip(" \t")
)
_header_names = st.sampled_from(
    ["Subject", "s", "User-Agent", "X-Custom", "x-lower", "Supported", "k", "Allow", "Organization", "Date"]
)


@st.composite
def messages(draw: st.DrawFn) -> Request | Response:
    method = draw(st.one_of(st.sampled_from(["INVITE", "ACK", "BYE", "REGISTER", "OPTIONS"]), _token))
    extra = draw(st.lists(st.tuples(_header_names, _value_text), max_size=5))
    body = draw(st.binary(max_size=40))
    req = Request.create(
        method,
        draw(uris()),
        from_=draw(addresses()),
        to=draw(addresses()),
        call_id=draw(_token) + "@" + draw(_hostname),
        cseq=draw(st.integers(0, 2**31 - 1)),
        via=draw(vias()),
        contact=draw(st.one_of(st.none(), addresses())),
        body=body,
        content_type=draw(st.one_of(st.none(), st.just("application/sdp"))),
        headers=extra,
    )
    for via in draw(st.lists(vias(), max_size=2)):
        req.add("Via", str(via))
    if draw(st.booleans()):
        resp = Response.for_request(
            req,
            draw(st.integers(100, 699)),
            draw(st.one_of(st.none(), _value_text)),
            to_tag=draw(st.one_of(st.none(), _token)),
        )
        for name, value in extra:
            resp.add(name, value)
        resp.body = body
        return resp
    return req


@FAST
@given(messages())
def test_generated_messages_round_trip(msg: Request | Response) -> None:
    data = bytes(msg)
    parsed = parse(data)
    assert parsed == msg
    assert bytes(parsed) == data
    assert parsed.from_ == msg.from_
    assert parsed.to == msg.to
    assert [str(v) for v in parsed.via] == [str(v) for v in msg.via]
    # on a stream, cut into arbitrary pieces
    framer = StreamFramer()
    pieces = [data[i : i + 13] for i in range(0, len(data), 13)]
    out = [m for piece in pieces for m in framer.feed(piece)]
    assert out == [data]
    assert parse(out[0], datagram=False) == msg


@FAST
@given(uris())
def test_uri_round_trip(uri: URI) -> None:
    again = URI(str(uri))
    assert again == uri
    assert str(again) == str(uri)
    assert again.aor() == uri.aor()


@FAST
@given(addresses())
def test_address_round_trip(addr: Address) -> None:
    again = Address(str(addr))
    assert again == addr
    assert str(again) == str(addr)


# -- hostile input ---------------------------------------------------------------------------------------


def _touch_everything(msg: Request | Response) -> None:
    """Every accessor either works or raises ParseError; what parses must round-trip."""
    for accessor in (
        lambda: msg.validate(),
        lambda: msg.via,
        lambda: msg.contacts,
        lambda: msg.route,
        lambda: msg.record_route,
        lambda: msg.content_type,
        lambda: msg.expires,
        lambda: msg.max_forwards,
        lambda: msg.auth("Authorization"),
        lambda: msg.tokens("Supported"),
        lambda: [Address(v) for v in msg.get_all("To")],
    ):
        with contextlib.suppress(ParseError):
            accessor()
    again = parse(bytes(msg))
    assert again == msg


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_parse_error(data: bytes) -> None:
    for datagram in (True, False):
        try:
            msg = parse(data, datagram=datagram)
        except ParseError:
            continue
        _touch_everything(msg)


_MUTATIONS = ["flip", "insert", "delete", "truncate", "duplicate", "splice"]
_INTERESTING = [
    b"\r\n",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b'"',
    b"<",
    b">",
    b"@",
    b"[",
    b"]",
    b"%",
    b"=",
    b"\\",
    b"\x00",
    b"\xff",
    b"\r\n ",
    b"?",
]


@FAST
@given(st.integers(0, len(CORPUS) - 1), st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_mutated_messages_raise_only_parse_error(which: int, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    data = bytearray(CORPUS[which])
    for _ in range(rounds):
        pos = rng.randrange(len(data) + 1)
        kind = rng.choice(_MUTATIONS)
        if kind == "flip" and pos < len(data):
            data[pos] = rng.randrange(256)
        elif kind == "insert":
            data[pos:pos] = rng.choice(_INTERESTING)
        elif kind == "delete":
            del data[pos : pos + rng.randrange(1, 8)]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "duplicate":
            data[pos:pos] = data[pos : pos + rng.randrange(1, 40)]
        elif kind == "splice":
            other = CORPUS[rng.randrange(len(CORPUS))]
            start = rng.randrange(len(other))
            data[pos:pos] = other[start : start + rng.randrange(1, 60)]
    for datagram in (True, False):
        try:
            msg = parse(bytes(data), datagram=datagram)
        except ParseError:
            continue
        _touch_everything(msg)
    framer = StreamFramer()
    try:
        for chunk in framer.feed(bytes(data)):
            with contextlib.suppress(ParseError):
                parse(chunk, datagram=False)
    except ParseError:
        pass


_SEPARATORS = ' ,;:=<>"@[]/\t.%?*aZ0'
_NAMES = [
    "Via",
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Contact",
    "Route",
    "Record-Route",
    "Max-Forwards",
    "Expires",
    "Content-Length",
    "Content-Type",
    "Authorization",
    "Supported",
    "v",
    "m",
    "t",
    "f",
]


@FAST
@given(
    st.integers(0, len(CORPUS) - 1),
    st.sampled_from(_NAMES),
    st.one_of(st.text(" ,;\t", max_size=8), st.text(_SEPARATORS, max_size=14)),
    st.booleans(),
)
def test_header_values_of_separators_raise_only_parse_error(
    which: int, name: str, value: str, replace: bool
) -> None:
    """A header whose value is all separators (``Via: , , ,`` raised IndexError: byte mutations of a valid
    message rarely build one), replacing that header or added as a second line of it."""
    head, _, body = CORPUS[which].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    line = f"{name}: {value}".encode()
    if replace:
        lines = [ln if not ln.lower().startswith(name.lower().encode() + b":") else line for ln in lines]
    lines.insert(2, line)
    data = b"\r\n".join(lines) + b"\r\n\r\n" + body
    for datagram in (True, False):
        try:
            msg = parse(data, datagram=datagram)
        except ParseError:
            continue
        _touch_everything(msg)


@FAST
@given(st.text(max_size=60))
def test_uri_address_via_auth_text_raise_only_parse_error(text: str) -> None:
    for kind in (URI, Address, Via):
        try:
            obj = kind(text)
        except ParseError:
            continue
        again = kind(str(obj))
        assert again == obj
    with contextlib.suppress(ParseError):
        parse_auth(text)


def test_corpus_parses() -> None:
    for data in CORPUS:
        _touch_everything(parse(data))


# -- the regular-expression fast paths agree with the general parsers ------------------------------------


# The attributes each kind holds (its __slots__, which the compiled build does not expose), but "uri".
_FIELDS = {
    URI: ("headers", "host", "opaque", "params", "password", "port", "scheme", "user"),
    Address: ("display", "params", "wildcard"),
    Via: ("host", "params", "port", "protocol", "transport"),
}


def _state(obj: object) -> dict[str, object]:
    return {name: getattr(obj, name) for name in _FIELDS[type(obj)]}


def _general(kind: type, text: str) -> object:
    obj = kind(None)  # the empty object (kind.__new__(kind) is refused by the compiled build)
    obj._parse_general(text)
    return obj


_texts = st.one_of(uris().map(str), addresses().map(str), vias().map(str))


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    text = draw(_texts)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(list(' \t;:=@<>"\\%[].-,?&*'))) + text[pos:]
    return text


@FAST
@given(_mutated())
def test_fast_paths_agree_with_general_parsers(text: str) -> None:
    for kind in (URI, Address, Via):
        try:
            fast = kind(text)
        except ParseError:
            try:
                _general(kind, text)
            except ParseError:
                continue
            raise AssertionError(
                f"{kind.__name__} fast path refused what the general one accepts: {text!r}"
            ) from None
        general = _general(kind, text)
        assert _state(fast) == _state(general), text
        if kind is Address:
            assert fast.uri == general.uri  # type: ignore[attr-defined]
            assert str(fast.uri) == str(general.uri)  # type: ignore[attr-defined]
