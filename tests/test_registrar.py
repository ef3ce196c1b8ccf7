"""Sans-IO registrar and location decisions: REGISTER -> entries, records, expiry-honouring cache, routing."""

from __future__ import annotations

import pytest

from p2psip.address import names_local
from p2psip.location import (
    ForwardAsAddressed,
    HomeTable,
    LocationCache,
    NotRoutable,
    OverlayLookup,
    StaticRoute,
    decide,
    live_targets,
)
from p2psip.message import Request, Response
from p2psip.registrar import (
    Binding,
    RegisterRejected,
    RegistrarPolicy,
    decode_binding,
    encode_binding,
    ok_response,
    plan_register,
)
from p2psip.uri import URI

AOR = "sip:alice@p2p.example"
NOW = 1_000_000.0


def register(
    *contacts: str, expires: int | None = None, call_id: str = "c1", cseq: int = 1, to: str = AOR
) -> Request:
    headers = [("Expires", str(expires))] if expires is not None else []
    req = Request.create(
        "REGISTER",
        "sip:p2p.example",
        from_=f"<{to}>;tag=t1",
        to=f"<{to}>",
        call_id=call_id,
        cseq=cseq,
        via="SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-reg",
        headers=headers,
    )
    for contact in contacts:
        req.add("Contact", contact)
    return req


def apply(current: list[Binding], req: Request, now: float = NOW) -> list[Binding]:
    plan = plan_register(req, current, now)
    removed = {r.entry_id for r in plan.removes} | {w.entry_id for w in plan.writes}
    return [b for b in current if b.entry_id not in removed] + [w.binding for w in plan.writes]


def test_one_entry_per_contact_with_expiry_and_q() -> None:
    req = register("<sip:alice@127.0.0.1:6001>;q=0.5", "<sip:alice@127.0.0.1:6002>;expires=120", expires=600)
    plan = plan_register(req, [], NOW)
    assert plan.aor == AOR
    assert [w.entry_id for w in plan.writes] == [b"sip:alice@127.0.0.1:6001", b"sip:alice@127.0.0.1:6002"]
    assert [w.lifetime for w in plan.writes] == [600, 120]
    assert plan.writes[0].binding.q == 0.5
    response = ok_response(req, plan, NOW + 20)
    assert isinstance(response, Response) and response.status == 200
    contacts = response.get_all("Contact")
    assert len(contacts) == 2
    assert any("expires=580" in c and "q=0.5" in c for c in contacts)
    assert any("expires=100" in c for c in contacts)


def test_record_round_trip_and_junk() -> None:
    binding = Binding(
        AOR,
        "sip:alice@127.0.0.1:6001",
        300,
        NOW,
        q=0.7,
        call_id="x",
        cseq=4,
        path=("<sip:edge.example;lr>",),
        instance="<urn:uuid:1>",
        reg_id=1,
    )
    assert decode_binding(AOR, encode_binding(binding)) == binding
    assert binding.entry_id == b"<urn:uuid:1>;reg-id=1"
    for junk in (b"", b"\xc1", b"\x93\x01\x02\x03", encode_binding(binding)[:-3]):
        with pytest.raises(ValueError):
            decode_binding(AOR, junk)
    import msgpack

    with pytest.raises(ValueError, match="wrong type"):
        decode_binding(AOR, msgpack.packb({"contact": "sip:a@b", "expires": "60"}))
    with pytest.raises(ValueError, match="bad contact"):
        decode_binding(AOR, msgpack.packb({"contact": "not a uri", "expires": 60}))
    # unknown fields are ignored (forward compatible)
    extra = msgpack.packb({"contact": "sip:a@127.0.0.1", "expires": 60, "at": NOW, "future": 1})
    assert decode_binding(AOR, extra).expires == 60


def test_refresh_keeps_entry_and_cseq_order_is_enforced() -> None:
    bindings = apply([], register("<sip:alice@127.0.0.1:6001>", expires=300, cseq=1))
    # textually different but equal URI (host case) refreshes the same entry
    refreshed = apply(bindings, register("<sip:alice@127.0.0.1:6001>", expires=900, cseq=2), NOW + 100)
    assert len(refreshed) == 1 and refreshed[0].expires == 900 and refreshed[0].at == NOW + 100
    with pytest.raises(RegisterRejected) as info:
        plan_register(register("<sip:alice@127.0.0.1:6001>", cseq=2), refreshed, NOW + 101)
    assert info.value.status == 400
    # another Call-ID may have a lower CSeq
    assert plan_register(register("<sip:alice@127.0.0.1:6001>", call_id="c2", cseq=1), refreshed, NOW).writes


def test_expires_zero_and_wildcard_remove() -> None:
    bindings = apply([], register("<sip:alice@127.0.0.1:6001>", "<sip:alice@127.0.0.1:6002>", cseq=1))
    plan = plan_register(register("<sip:alice@127.0.0.1:6001>;expires=0", cseq=2), bindings, NOW)
    assert [r.entry_id for r in plan.removes] == [b"sip:alice@127.0.0.1:6001"] and not plan.writes
    assert [b.contact for b in plan.bindings] == ["sip:alice@127.0.0.1:6002"]
    plan = plan_register(register("*", expires=0, cseq=3), bindings, NOW)
    assert len(plan.removes) == 2 and not plan.bindings
    # removing an unknown contact is not an error and does nothing
    assert plan_register(register("<sip:x@127.0.0.1:1>;expires=0", cseq=9), bindings, NOW).is_query


@pytest.mark.parametrize(
    ("req", "status"),
    [
        (register("*", cseq=5), 400),  # wildcard without Expires: 0
        (register("*", "<sip:a@127.0.0.1>", expires=0), 400),
        (register("<sip:alice@127.0.0.1:6001>", expires=10), 423),
        (register("<tel:+15551234>", expires=100), 400),
        (register("<sip:alice@127.0.0.1:6001>", to="sip:p2p.example"), 404),
    ],
)
def test_rejections(req: Request, status: int) -> None:
    with pytest.raises(RegisterRejected) as info:
        plan_register(req, [], NOW)
    assert info.value.status == status
    response = Response.for_error(req, info.value)
    assert response.status == status
    if status == 423:
        assert response.get("Min-Expires") == "60"


def test_too_many_contacts_and_max_expires_cap() -> None:
    policy = RegistrarPolicy(max_contacts=2, max_expires=1000)
    req = register(*(f"<sip:alice@127.0.0.1:{6000 + i}>" for i in range(3)))
    with pytest.raises(RegisterRejected) as info:
        plan_register(req, [], NOW, policy)
    assert info.value.status == 403
    plan = plan_register(register("<sip:alice@127.0.0.1:6001>", expires=99999), [], NOW, policy)
    assert plan.writes[0].lifetime == 1000


def test_query_lists_live_bindings_only() -> None:
    old = Binding(AOR, "sip:alice@127.0.0.1:1", 60, NOW - 100)
    live = Binding(AOR, "sip:alice@127.0.0.1:2", 600, NOW - 100)
    plan = plan_register(register(), [old, live], NOW)
    assert plan.is_query and plan.bindings == [live]


def test_instance_id_is_the_entry_id() -> None:
    contact = '<sip:alice@127.0.0.1:6001>;+sip.instance="<urn:uuid:abc>";reg-id=1'
    bindings = apply([], register(contact, cseq=1))
    assert bindings[0].entry_id == b"<urn:uuid:abc>;reg-id=1"
    moved = apply(
        bindings, register('<sip:alice@127.0.0.1:7777>;+sip.instance="<urn:uuid:abc>";reg-id=1', cseq=2)
    )
    assert len(moved) == 1 and moved[0].contact == "sip:alice@127.0.0.1:7777"


def test_decide_routes() -> None:
    def local(host: str, port: int | None) -> bool:
        return names_local(host, port, {"udp": [("127.0.0.1", 5060)]})

    routes = {"pstn.example": ("127.0.0.1", 5099)}
    assert decide(URI("sip:bob@P2P.example"), routes=routes, is_local=local) == OverlayLookup(
        "sip:bob@p2p.example"
    )
    assert decide(URI("sip:+1555@PSTN.example"), routes=routes) == StaticRoute(
        "pstn.example", "127.0.0.1", 5099
    )
    assert decide(URI("sip:bob@127.0.0.1:5070"), is_local=local) == ForwardAsAddressed(
        "127.0.0.1", 5070
    )
    assert decide(URI("sip:bob@[::1]:5070"), is_local=local) == ForwardAsAddressed("[::1]", 5070)
    # an IP literal naming this peer is an AOR in the overlay (softphones registered with the peer's address)
    assert decide(URI("sip:bob@127.0.0.1"), is_local=local) == OverlayLookup("sip:bob@127.0.0.1")
    with pytest.raises(NotRoutable) as here:
        decide(URI("sip:127.0.0.1:5060"), is_local=local)
    assert here.value.status == 404
    with pytest.raises(NotRoutable) as tel:
        decide(URI("tel:+15551234"))  # no route: 416 Unsupported URI Scheme, whatever else is configured
    assert tel.value.status == 416


def test_cache_honours_ttl_and_binding_expiry() -> None:
    cache = LocationCache(ttl=5)
    short = Binding(AOR, "sip:alice@127.0.0.1:1", 3, NOW)
    long = Binding(AOR, "sip:alice@127.0.0.1:2", 600, NOW, q=0.2)
    cache.put(AOR, [long, short], NOW)
    assert cache.get(AOR, NOW + 1) == [short, long]  # unspecified q ranks first
    assert cache.get(AOR, NOW + 3.5) is None  # the shortest binding expired: the whole result is stale
    cache.put(AOR, [long], NOW + 4)
    assert cache.get(AOR, NOW + 8.9) == [long]
    assert cache.get(AOR, NOW + 9.1) is None  # ttl
    cache.put(AOR, [], NOW)  # empty results are not cached
    assert cache.get(AOR, NOW) is None
    cache.put(AOR, [long], NOW)
    cache.forget(AOR)
    assert cache.get(AOR, NOW) is None
    assert live_targets([short, long], NOW + 4) == [long]


def test_cache_is_bounded() -> None:
    cache = LocationCache(ttl=60, max_entries=3)
    for i in range(10):
        cache.put(f"sip:u{i}@x", [Binding(f"sip:u{i}@x", "sip:u@127.0.0.1", 600, NOW)], NOW)
    assert len(cache) == 3 and cache.get("sip:u9@x", NOW) and cache.get("sip:u0@x", NOW) is None


def test_home_table_keeps_one_tuple_per_aor() -> None:
    """The home peer's table (memory: a tuple per AOR, not a dict): a write replaces the binding with its
    entry id, a drop removes it, expired bindings go on reading, and an emptied AOR leaves no trace."""
    table = HomeTable()
    aor = "sip:alice@p2p.example"
    first = Binding(aor, "sip:alice@192.0.2.1:5060", 600, 1000.0)
    other = Binding(aor, "sip:alice@192.0.2.2:5060", 10, 1000.0)
    table.update(aor, [first, other])
    assert table.get(aor) == (first, other) and table.has(aor, b"sip:alice@192.0.2.1:5060")
    refreshed = Binding(aor, "sip:alice@192.0.2.1:5060", 600, 1005.0)
    table.update(aor, [refreshed])
    assert table.get(aor) == (other, refreshed) and type(table.get(aor)) is tuple
    assert table.live(aor, 1020.0) == (refreshed,) and table.get(aor) == (refreshed,)  # `other` expired
    table.update(aor, drop=[refreshed.entry_id])
    assert aor not in table and len(table) == 0 and table.get(aor) == () and not table.has(aor, b"x")
