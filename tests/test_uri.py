"""URI and Address: parsing, formatting, RFC 3261 §19.1.4 comparison and the AOR key."""

from __future__ import annotations

import pytest

from p2psip.errors import ParseError
from p2psip.uri import URI, Address, check_address


def test_sip_uri_parts() -> None:
    uri = URI("sip:alice:secret@Atlanta.COM:5061;transport=TCP;lr?subject=project%20x&priority=urgent")
    assert uri.scheme == "sip"
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "Atlanta.COM"
    assert uri.port == 5061
    assert uri.params == {"transport": "TCP", "lr": None}
    assert uri.headers == {"subject": "project%20x", "priority": "urgent"}
    assert uri.transport == "tcp"
    assert uri.lr
    assert not uri.secure


def test_format_is_symmetric() -> None:
    for text in [
        "sip:alice@atlanta.com",
        "sips:bob@[2001:db8::10]:5061;maddr=239.255.255.1;ttl=15",
        "sip:+1-212-555-1212:1234@gateway.com;user=phone",
        "sip:atlanta.com;method=REGISTER?to=alice%40atlanta.com",
        "tel:+358-555-1234567;postd=pp22",
        "urn:service:sos",
        "sip:[::1]",
        "sip:127.0.0.1:5070",
    ]:
        assert str(URI(text)) == text


def test_ipv6_reference_kept_with_brackets() -> None:
    uri = URI("sip:[2001:db8::1]:5070")
    assert uri.host == "[2001:db8::1]"
    assert uri.port == 5070


def test_tel_and_opaque() -> None:
    tel = URI("tel:+1-201-555-0123")
    assert tel.scheme == "tel"
    assert tel.user == "+1-201-555-0123"
    assert tel == URI("tel:+12015550123")
    urn = URI("urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
    assert urn.opaque == "uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
    assert str(urn) == "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"


@pytest.mark.parametrize(
    ("left", "right"),
    [
        # the equivalent pairs of RFC 3261 §19.1.4
        ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
        ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
        ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
        ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
        (
            "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
            "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
        ),
        (
            "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
            "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
        ),
    ],
)
def test_equivalent(left: str, right: str) -> None:
    assert URI(left) == URI(right)
    assert URI(left).aor() == URI(right).aor()


@pytest.mark.parametrize(
    ("left", "right"),
    [
        # the non-equivalent pairs of RFC 3261 §19.1.4
        ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
        ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
        ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
        ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
        ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
        ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
        # user/ttl/method/maddr present in only one never match
        ("sip:bob@biloxi.com;user=phone", "sip:bob@biloxi.com"),
        ("sip:bob@biloxi.com;maddr=10.0.0.1", "sip:bob@biloxi.com"),
        ("sip:bob@biloxi.com;ttl=1", "sip:bob@biloxi.com"),
        ("sip:bob@biloxi.com;method=INVITE", "sip:bob@biloxi.com"),
        # an escaped reserved character is not the character
        ("sip:a%3Bb@biloxi.com", "sip:a;b@biloxi.com"),
        ("sip:bob@biloxi.com", "sips:bob@biloxi.com"),
    ],
)
def test_not_equivalent(left: str, right: str) -> None:
    assert URI(left) != URI(right)


def test_aor_is_canonical() -> None:
    assert URI("sips:%61lice@AtLanta.com:5061;transport=tls").aor() == "sip:alice@atlanta.com"
    assert URI("sip:Alice@atlanta.com").aor() == "sip:Alice@atlanta.com"  # user part is case-sensitive
    assert URI("sip:atlanta.com").aor() == "sip:atlanta.com"


def test_uri_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(URI("sip:a@b"))


def test_build_and_copy() -> None:
    uri = URI.build(user="bob", host="example.com", port=5070, params={"transport": "tcp"})
    assert str(uri) == "sip:bob@example.com:5070;transport=tcp"
    copy = uri.copy()
    copy.params["lr"] = None
    assert "lr" not in uri.params
    assert uri == URI(str(uri))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "alice@example.com",
        "sip:",
        "sip:alice@",
        "sip:alice@host:99999",
        "sip:alice@host:port",
        "sip:alice@[::1",
        "sip:alice@[zz::1]",
        "sip:al ice@host",
        "sip:alice@host;=x",
        "sip:alice@ho_st",
        "sip:%zzalice@host",
        "1ab:foo",
    ],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(ParseError):
        URI(text)


def test_address_forms() -> None:
    a = Address('"Alice \\"A\\" Liddell" <sip:alice@atlanta.com>;tag=1928301774')
    assert a.display == 'Alice "A" Liddell'
    assert a.uri == URI("sip:alice@atlanta.com")
    assert a.tag == "1928301774"
    b = Address("Bob <sip:bob@biloxi.com;transport=tcp>;expires=60;q=0.7")
    assert b.display == "Bob"
    assert b.uri.transport == "tcp"
    assert b.expires == 60
    assert b.q == 0.7
    # addr-spec: the parameters belong to the header, not to the URI (§20)
    c = Address("sip:carol@chicago.com;tag=887s")
    assert c.uri.params == {}
    assert c.tag == "887s"
    assert c.display is None
    star = Address("*")
    assert star.wildcard


def test_address_tag_setter_and_format() -> None:
    a = Address("<sip:bob@biloxi.com>")
    a.tag = "abc"
    assert str(a) == "<sip:bob@biloxi.com>;tag=abc"
    a.tag = None
    assert str(a) == "<sip:bob@biloxi.com>"
    a.display = "Bob, the builder"
    assert str(a) == '"Bob, the builder" <sip:bob@biloxi.com>'
    assert Address(str(a)) == a


def test_address_quoted_param_value() -> None:
    instance = '"<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"'
    a = Address(f"<sip:alice@192.0.2.1>;+sip.instance={instance};reg-id=1")
    assert a.params["+sip.instance"] == '"<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"'
    assert a.params["reg-id"] == "1"
    assert Address(str(a)) == a


@pytest.mark.parametrize(
    "text", ["", '"unterminated <sip:a@b>', "<sip:a@b", "<sip:a@b> junk", "Bad@Name <sip:a@b>", '"x" sip:a@b']
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ParseError):
        Address(text)


_CHECKED = [
    "sipp <sip:sipp@127.0.0.1:5061>;tag=4096SIPpTag001",
    '"Alice" <sip:alice@atlanta.com>;tag=1928301774',
    "<sip:bob@biloxi.com;transport=udp>",
    "Bob Smith <sips:bob@biloxi.com:5061;lr>;expires=60;q=0.5",
    # not the fast shape: parsed in full at once
    '"A \\"q\\"" <sip:a@b>',
    "sip:alice@atlanta.com;tag=x",
    "<sip:%61lice@atlanta.com>",
    "<sip:a@[::1]:5060>",
    "<tel:+1-201-555-0123>",
    "*",
]


@pytest.mark.parametrize("text", _CHECKED)
def test_check_address_builds_what_address_builds(text: str) -> None:
    """parse() vets From/To with check_address and builds them later: the result must be identical."""
    checked = check_address(text)
    built = checked if isinstance(checked, Address) else Address.from_check(checked)
    direct = Address(text)
    assert (built.display, str(built.uri), built.params, built.wildcard) == (
        direct.display,
        str(direct.uri),
        direct.params,
        direct.wildcard,
    )
    assert built.uri.port == direct.uri.port and built.uri.user == direct.uri.user


@pytest.mark.parametrize(
    "text",
    [
        "<sip:a@b:99999>",  # the fast regular expressions match, the port is out of range
        "<sip:a@b..c>",  # they match too, the host is not valid
        "<sip:a@b",
        '"x" sip:a@b',
        "Bad@Name <sip:a@b>",
    ],
)
def test_check_address_refuses_what_address_refuses(text: str) -> None:
    with pytest.raises(ParseError) as direct:
        Address(text)
    with pytest.raises(ParseError) as checked:
        check_address(text)
    assert str(checked.value) == str(direct.value)


def test_address_build() -> None:
    a = Address.build("sip:alice@example.com", display="Alice", params={"tag": "x"})
    assert str(a) == "Alice <sip:alice@example.com>;tag=x"


def test_vetted_texts_still_give_independent_objects() -> None:
    """Address and URI keep the matches of texts seen before (uri._VETTED, uri._VETTED_URIS); the objects
    built from them must still be new and independent, and a bad text must fail every time."""
    text = "Carol <sip:carol@192.0.2.7:5070;transport=udp>;tag=abc"
    first, second = Address(text), Address(text)
    assert first is not second and first.uri is not second.uri and first == second
    first.params["tag"] = "changed"
    first.uri.params["transport"] = "tcp"
    assert second.tag == "abc" and second.uri.transport == "udp" and str(Address(text)) == text
    one, two = URI("sip:bob@192.0.2.8;lr"), URI("sip:bob@192.0.2.8;lr")
    one.params.clear()
    assert two.lr and URI("sip:bob@192.0.2.8;lr").lr
    for _ in range(2):
        with pytest.raises(ParseError):
            Address("<sip:a@b:99999>")
        with pytest.raises(ParseError):
            URI("sip:a@b:99999")


def test_vetted_caches_are_bounded() -> None:
    from p2psip import uri as uri_module

    for i in range(uri_module._VETTED_MAX + 10):
        Address(f"<sip:user{i}@192.0.2.1>;tag={i}")
        URI(f"sip:user{i}@192.0.2.1")
    assert len(uri_module._VETTED) <= uri_module._VETTED_MAX
    assert len(uri_module._VETTED_URIS) <= uri_module._VETTED_MAX
