"""p2psip.address, sans-IO: host/port/target/listen-spec parsing, IPv6 bracketing, and the RFC 3261 §18 /
RFC 3263 decisions (Via stamping on receipt, where a response goes, where a request for a URI goes)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psip.address import (
    HostPort,
    ListenSpec,
    Target,
    bracket,
    format_hostport,
    is_ip_literal,
    names_local,
    numeric_host,
    parse_hostport,
    parse_target,
    reachable_host,
    response_target,
    same_host,
    sent_by_target,
    split_hostport,
    split_wire_hostport,
    stamp_via,
    target_from_uri,
)
from p2psip.errors import ConfigError, ParseError, TransportError
from p2psip.message import Request, Via
from p2psip.uri import URI

# ------------------------------------------------------------------------------------------ hosts


def test_bracket_and_format() -> None:
    assert bracket("::1") == "[::1]"
    assert bracket("[::1]") == "[::1]"  # idempotent
    assert bracket("127.0.0.1") == "127.0.0.1"
    assert bracket("example.com") == "example.com"
    assert format_hostport("::1", 5060) == "[::1]:5060"
    assert format_hostport("10.0.0.1", 5) == "10.0.0.1:5"
    assert str(Target("udp", "::1", 5060)) == "udp:[::1]:5060"
    assert str(HostPort("::1", 7060)) == "[::1]:7060"


def test_names_local() -> None:
    listening = {"udp": [("127.0.0.1", 5060)], "tls": [("0.0.0.0", 5061)], "tcp": [("::1", 7000)]}
    assert names_local("127.0.0.1", None, listening)  # no port: the default of the listener's transport
    assert names_local("localhost", 5060, listening)
    assert names_local("10.1.2.3", None, listening)  # the TLS listener is bound to every address
    assert not names_local("10.1.2.3", None, listening, transport="udp")
    assert names_local("[::1]", 7000, listening) and not names_local("::1", 7001, listening)
    assert names_local("192.0.2.7", 5060, listening, advertised="192.0.2.7")  # the address in our Vias
    assert not names_local("example.com", 5060, listening)  # a name: no DNS, never local


def test_ip_literals() -> None:
    assert is_ip_literal("127.0.0.1") and is_ip_literal("[::1]") and is_ip_literal("::1")
    assert not is_ip_literal("localhost") and not is_ip_literal("example.com") and not is_ip_literal("")
    assert numeric_host("localhost") == "127.0.0.1"
    assert numeric_host("[0::1]") == "::1"  # normalised, brackets removed
    assert numeric_host("example.com") is None
    assert same_host("[::1]", "0:0::1") and same_host("Example.COM", "example.com")
    assert not same_host("127.0.0.1", "127.0.0.2")


# ------------------------------------------------------------------------------ HOST:PORT grammar


def test_split_hostport_user_text() -> None:
    assert split_hostport("127.0.0.1:5060") == ("127.0.0.1", 5060)
    assert split_hostport("[::1]:5060") == ("::1", 5060)
    assert split_hostport("[::1]") == ("::1", None)
    assert split_hostport("gw.example", default_port=5060) == ("gw.example", 5060)
    assert split_hostport(" localhost:1 ", numeric=True) == ("127.0.0.1", 1)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("::1:5060", "brackets"),
        ("[::1:5060", "without ']'"),
        ("[::1]x", "junk after ']'"),
        ("[10.0.0.1]:5", "not an IPv6 address"),
        (":5060", "host is missing"),
        ("bad host!:5060", "not a valid host"),
        ("127.0.0.1:abc", "not a number"),
        ("127.0.0.1:99999", "out of range"),
        ("127.0.0.1:٣", "not a number"),  # a non-ASCII digit is no port
    ],
)
def test_split_hostport_rejects_with_a_reason(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        split_hostport(text, "--via")
    assert str(info.value).startswith("--via: ")


def test_numeric_wants_an_ip_address() -> None:
    with pytest.raises(ConfigError, match="no DNS"):
        split_hostport("example.com:5060", "outbound", numeric=True)


def test_parse_hostport_needs_a_port_unless_defaulted() -> None:
    assert parse_hostport("[::1]:7060", "x") == HostPort("::1", 7060)
    assert parse_hostport("gw", "x", default_port=5060) == HostPort("gw", 5060)
    with pytest.raises(ConfigError, match="needs a port"):
        parse_hostport("127.0.0.1", "--join")


def test_split_wire_hostport_keeps_brackets() -> None:
    assert split_wire_hostport("[::1]:5060", "x") == ("[::1]", 5060)
    assert split_wire_hostport("host.example", "x") == ("host.example", None)
    assert split_wire_hostport("10.0.0.1:0", "x") == ("10.0.0.1", 0)
    for bad in ("[::1", "[::1]x", "[zz::]", "-a.example", "a..b", "a:99999", "a:", "", "[::1]:"):
        with pytest.raises(ParseError):
            split_wire_hostport(bad, bad)
    with pytest.raises(ParseError, match="bad host in Via"):
        split_wire_hostport("a b", "a b", "Via")


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_ports = st.integers(min_value=0, max_value=65535)


@given(host=st.one_of(_ipv4, _ipv6), port=_ports)
def test_hostport_text_round_trips(host: str, port: int) -> None:
    text = format_hostport(host, port)
    assert split_hostport(text, numeric=True) == (host, port)
    assert split_wire_hostport(text, text) == (bracket(host), port)
    assert parse_hostport(text, "x") == HostPort(host, port)


@given(transport=st.sampled_from(["udp", "tcp", "tls"]), host=st.one_of(_ipv4, _ipv6), port=_ports)
def test_target_and_listen_spec_text_round_trip(transport: str, host: str, port: int) -> None:
    target = Target(transport, host, port)
    assert parse_target(str(target)) == target
    spec = ListenSpec(transport, host, port)
    assert ListenSpec.parse(str(spec)) == spec
    both = ListenSpec(None, host, port)
    assert ListenSpec.parse(str(both)) == both


# --------------------------------------------------------------------------------- specs, targets


def test_listen_spec_forms() -> None:
    assert ListenSpec.parse("udp:127.0.0.1:5070") == ListenSpec("udp", "127.0.0.1", 5070)
    assert ListenSpec.parse("TCP:[::1]:5071") == ListenSpec("tcp", "::1", 5071)
    both = ListenSpec.parse("127.0.0.1:5072")
    assert both == ListenSpec(None, "127.0.0.1", 5072)
    assert both.split() == [ListenSpec("udp", "127.0.0.1", 5072), ListenSpec("tcp", "127.0.0.1", 5072)]
    assert ListenSpec.parse("tls:127.0.0.1") == ListenSpec("tls", "127.0.0.1", 5061)  # default port
    assert ListenSpec.parse("localhost:0") == ListenSpec(None, "127.0.0.1", 0)
    for bad, fragment in [
        ("example.com:5060", "no DNS"),
        ("udp:127.0.0.1:99999", "out of range"),
        ("[::1:5060", "without ']'"),
        ("sctp:127.0.0.1:5060", "unknown transport"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            ListenSpec.parse(bad)


def test_parse_target_defaults() -> None:
    assert parse_target("127.0.0.1") == Target("udp", "127.0.0.1", 5060)
    assert parse_target("tls:[::1]") == Target("tls", "::1", 5061)
    assert parse_target("[::1]:7", default_transport="tcp") == Target("tcp", "::1", 7)


def test_target_from_uri_without_dns() -> None:
    assert target_from_uri(URI("sip:bob@127.0.0.1:5070;transport=tcp")) == Target("tcp", "127.0.0.1", 5070)
    assert target_from_uri(URI("sips:bob@[::1]")) == Target("tls", "::1", 5061)
    assert target_from_uri(URI("sip:bob@example.com;maddr=10.0.0.9")) == Target("udp", "10.0.0.9", 5060)
    tcp = Target("tcp", "10.0.0.1", 5060)
    assert target_from_uri(URI("sip:bob@10.0.0.1"), default_transport="tcp") == tcp
    with pytest.raises(TransportError, match="no DNS"):
        target_from_uri(URI("sip:bob@example.com"))
    with pytest.raises(TransportError, match="unsupported transport"):
        target_from_uri(URI("sip:bob@10.0.0.1;transport=sctp"))


# ------------------------------------------------------------------------------ RFC 3261 §18.2


def _request(via: str) -> Request:
    return Request.create(
        "OPTIONS", "sip:x@127.0.0.1", from_="<sip:a@example.org>;tag=1", to="<sip:x@example.org>",
        headers=[("Via", via)],
    )  # fmt: skip


def test_stamp_via_leaves_a_truthful_via_alone() -> None:
    request = _request("SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK1")
    assert stamp_via(request, "10.0.0.1", 5070) == ("10.0.0.1", 5070, Target("udp", "10.0.0.1", 5070))
    assert request.top_via is not None and request.top_via.received is None


def test_stamp_via_received_when_the_packet_came_from_elsewhere() -> None:
    # §18.2.1: the sent-by is not the source address, so "received" is added; responses go there,
    # to the Via's port (no rport asked for).
    request = _request("SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1")
    assert stamp_via(request, "10.0.0.1", 40000) == ("192.0.2.1", 5070, Target("udp", "10.0.0.1", 5070))
    via = request.top_via
    assert via is not None and via.received == "10.0.0.1"
    assert "received=10.0.0.1" in request.get("Via")


def test_stamp_via_rport_and_ipv6() -> None:
    # RFC 3581: rport asked for -> filled with the source port (and received always added).
    request = _request("SIP/2.0/UDP [::1];branch=z9hG4bK1;rport")
    assert stamp_via(request, "::1", 40000) == ("::1", 0, Target("udp", "::1", 40000))
    via = request.top_via
    assert via is not None and via.rport == 40000 and via.received == "::1"


def test_stamp_via_maddr_and_missing_via() -> None:
    request = _request("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1;maddr=239.1.1.1")
    assert stamp_via(request, "10.0.0.1", 5060)[2] == Target("udp", "239.1.1.1", 5060)
    request.remove("Via")
    with pytest.raises(ParseError, match="no Via"):
        stamp_via(request, "10.0.0.1", 5060)


@pytest.mark.parametrize(
    ("via", "target"),
    [
        ("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1", Target("udp", "10.0.0.1", 5060)),
        ("SIP/2.0/TLS [::1];branch=z9hG4bK1", Target("tls", "::1", 5061)),
        ("SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1;received=10.0.0.1", Target("udp", "10.0.0.1", 5070)),
        (
            "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1;received=10.0.0.1;rport=40000",
            Target("udp", "10.0.0.1", 40000),
        ),
        ("SIP/2.0/UDP a.example:7;branch=z9hG4bK1;maddr=10.0.0.5", Target("udp", "10.0.0.5", 7)),
        # maddr counts for UDP only (§18.2.2); over TCP the received address is used.
        (
            "SIP/2.0/TCP a.example;branch=z9hG4bK1;maddr=10.0.0.5;received=10.0.0.6",
            Target("tcp", "10.0.0.6", 5060),
        ),
    ],
)
def test_response_target(via: str, target: Target) -> None:
    assert response_target(Via(via)) == target


def test_response_target_refuses_names_and_unknown_transports() -> None:
    with pytest.raises(TransportError, match="no DNS"):
        response_target(Via("SIP/2.0/UDP a.example;branch=z9hG4bK1"))
    with pytest.raises(TransportError, match="transport"):
        response_target(Via("SIP/2.0/SCTP 10.0.0.1;branch=z9hG4bK1"))


def test_sent_by_target_uses_the_default_port() -> None:
    # The key a stream connection is also known under: a port-less sent-by means the default port.
    assert sent_by_target("tcp", "[::1]", None) == Target("tcp", "::1", 5060)
    assert sent_by_target("tls", "10.0.0.1", 9) == Target("tls", "10.0.0.1", 9)
    assert sent_by_target("wss", "ABC.invalid", 0) == Target("wss", "abc.invalid", 443)
    assert sent_by_target("tcp", "a.example", 5060) is None  # a name: no DNS, no alias


def test_websocket_targets() -> None:
    # RFC 7118 §5.2: transport=ws on a sips: URI is WSS; HTTP's ports; a browser's .invalid host.
    assert target_from_uri(URI("sips:bob@10.0.0.1;transport=ws")) == Target("wss", "10.0.0.1", 443)
    assert target_from_uri(URI("sip:a@Df7.invalid;transport=ws")) == Target("ws", "df7.invalid", 80)
    assert reachable_host("udp", "df7.invalid") is None
    with pytest.raises(TransportError, match="no DNS"):
        target_from_uri(URI("sip:a@df7.invalid"))


def test_ip_literal_strategy_is_honest() -> None:
    # The round-trip tests above rely on str(ip_address) being the normal form numeric_host returns.
    assert numeric_host(str(ipaddress.ip_address("::ffff:1.2.3.4"))) == "::ffff:102:304"
