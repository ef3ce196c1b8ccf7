"""The flow table (p2psip/flows.py) under a fake clock, and keep-alive input (STUN, CRLF) with hypothesis."""

from __future__ import annotations

import struct

from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psip.flows import (
    Failed,
    FlowTable,
    Ping,
    classify_keepalive,
    looks_like_stun,
    stun_binding_request,
    stun_mapped_address,
    stun_reply,
)

AOR = "sip:alice@p2p.example"


def test_bind_gives_a_stable_token_per_flow_and_distinct_tokens_across_flows() -> None:
    table = FlowTable(secret=b"k" * 32)
    a = table.bind("udp", "192.0.2.1", 5060, 0.0, aor=AOR, entry_id=b"c1")
    again = table.bind("udp", "192.0.2.1", 5060, 5.0, aor=AOR, entry_id=b"c1")
    other = table.bind("udp", "192.0.2.1", 5061, 5.0, aor=AOR, entry_id=b"c2")
    assert a is again and a.token == again.token
    assert other.token != a.token
    assert table.by_token(a.token) is a and table.by_token("nope") is None
    assert table.flow_of(AOR, b"c1") is a
    # another table (another secret) gives another token: tokens cannot be guessed from the address
    assert FlowTable(secret=b"x" * 32).token_of("udp", "192.0.2.1", 5060) != a.token
    assert a.token.isalnum() and a.token == a.token.lower()


def test_a_binding_moves_to_the_flow_of_its_newest_register() -> None:
    table = FlowTable()
    old = table.bind("udp", "192.0.2.1", 4000, 0.0, aor=AOR, entry_id=b"inst")
    new = table.bind("udp", "192.0.2.1", 4001, 1.0, aor=AOR, entry_id=b"inst")
    assert table.flow_of(AOR, b"inst") is new
    assert table.by_token(old.token) is None  # left with no binding: forgotten
    assert len(table) == 1
    table.unbind(AOR, b"inst")
    assert len(table) == 0 and table.by_token(new.token) is None


def test_outbound_flow_fails_after_flow_timer_plus_grace_without_keepalives() -> None:
    table = FlowTable(flow_timer=30, grace=5)
    flow = table.bind("udp", "192.0.2.1", 5060, 0.0, aor=AOR, entry_id=b"i", outbound=True)
    assert table.due(34.0) == []
    table.touch("udp", "192.0.2.1", 5060, 20.0)  # a STUN keep-alive arrived
    assert table.due(50.0) == []  # 30 s after the keep-alive, within the grace
    actions = table.due(55.5)
    assert len(actions) == 1 and isinstance(actions[0], Failed)
    assert actions[0].flow is flow and actions[0].bindings == ((AOR, b"i"),)
    assert table.by_token(flow.token) is None and table.flow_of(AOR, b"i") is None
    assert table.due(100.0) == []  # reported once


def test_non_outbound_flow_gets_nat_pings_and_fails_when_they_go_unanswered() -> None:
    table = FlowTable(ping_interval=20, ping_timeout=65)
    flow = table.bind("udp", "198.51.100.7", 40000, 0.0, aor=AOR, entry_id=b"sip:a@10.0.0.2")
    assert table.due(19.0) == []
    assert table.due(20.0) == [Ping(flow)]
    assert table.due(21.0) == []  # not again until the next interval
    table.touch("udp", "198.51.100.7", 40000, 22.0)  # the 200 to our OPTIONS
    assert table.due(40.0) == [Ping(flow)]
    assert table.due(60.0) == [Ping(flow)]
    assert table.due(80.0) == [Ping(flow)]
    failed = table.due(87.5)
    assert len(failed) == 1 and isinstance(failed[0], Failed) and "NAT pings" in failed[0].why
    assert table.stats["pings"] == 4 and table.stats["failed"] == 1


def test_next_check_is_never_later_than_the_next_due_action() -> None:
    table = FlowTable(ping_interval=20, flow_timer=30, grace=5)
    table.bind("udp", "192.0.2.1", 1, 0.0, aor=AOR, entry_id=b"a")
    table.bind("tcp", "192.0.2.2", 2, 0.0, aor=AOR, entry_id=b"b", outbound=True)
    now = 0.0
    for _ in range(200):
        at = table.next_check(now)
        assert now <= at <= now + 1.0
        if table.due(at):
            break
        now = at + 0.001
    assert now >= 19.0


def test_closing_a_stream_fails_its_flow_and_hands_back_its_bindings() -> None:
    table = FlowTable()
    conn = object()
    flow = table.bind("tls", "192.0.2.9", 50000, 0.0, aor=AOR, entry_id=b"x", handle=conn, outbound=True)
    assert flow.handle is conn and flow.stream
    done = table.closed("tls", "192.0.2.9", 50000)
    assert done is not None and done.bindings == ((AOR, b"x"),)
    assert table.closed("tls", "192.0.2.9", 50000) is None


def test_a_full_table_refuses_new_flows_but_refreshes_old_ones() -> None:
    table = FlowTable(max_flows=2)
    table.bind("udp", "192.0.2.1", 1, 0.0, aor=AOR, entry_id=b"a")
    table.bind("udp", "192.0.2.1", 2, 0.0, aor=AOR, entry_id=b"b")
    try:
        table.bind("udp", "192.0.2.1", 3, 0.0, aor=AOR, entry_id=b"c")
    except OverflowError:
        pass
    else:
        raise AssertionError("a third flow was accepted")
    table.bind("udp", "192.0.2.1", 1, 1.0, aor=AOR, entry_id=b"a")
    assert table.stats["refused"] == 1 and len(table) == 2


# ----------------------------------------------------------------------------------- keep-alives


def test_stun_binding_request_is_answered_with_the_observed_address() -> None:
    request, tid = stun_binding_request()
    assert looks_like_stun(request)
    kind = classify_keepalive(request, stream=False, host="203.0.113.5", port=61000)
    assert kind is not None and kind.kind == "stun"
    assert stun_mapped_address(kind.reply, tid) == ("203.0.113.5", 61000)
    assert stun_mapped_address(kind.reply, b"\x00" * 12) is None  # another transaction's answer
    parsed = stun.parse_message(kind.reply)  # a well-formed response (its fingerprint checks)
    assert parsed.message_class == stun.Class.RESPONSE and "FINGERPRINT" in parsed.attributes


def test_crlf_keepalives() -> None:
    ping = classify_keepalive(b"\r\n\r\n", stream=True)
    assert ping is not None and ping.kind == "crlf-ping" and ping.reply == b"\r\n"
    udp = classify_keepalive(b"\r\n\r\n", stream=False)
    assert udp is not None and udp.reply == b""
    pong = classify_keepalive(b"\r\n", stream=True)
    assert pong is not None and pong.kind == "crlf" and pong.reply == b""
    assert classify_keepalive(b"", stream=False) is not None
    assert classify_keepalive(b"OPTIONS sip:x SIP/2.0\r\n", stream=False) is None


def test_stun_responses_and_indications_are_never_answered() -> None:
    response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE)
    assert stun_reply(bytes(response), "192.0.2.1", 1) is None
    indication = stun.Message(stun.Method.BINDING, stun.Class.INDICATION)
    assert stun_reply(bytes(indication), "192.0.2.1", 1) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises_and_is_answered_only_when_it_is_a_binding_request(data: bytes) -> None:
    kind = classify_keepalive(data, stream=False, host="192.0.2.1", port=5060)
    if kind is not None and kind.kind == "stun":
        parsed = stun.parse_message(data)
        assert parsed.message_method == stun.Method.BINDING and parsed.message_class == stun.Class.REQUEST


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=12, max_size=12),
    st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=6),
)
def test_stun_shaped_garbage_never_raises(tid: bytes, attrs: list[tuple[int, bytes]]) -> None:
    body = b"".join(struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) % 4) for t, v in attrs)
    data = struct.pack("!HHI12s", 0x0001, len(body), 0x2112A442, tid) + body
    kind = classify_keepalive(data, stream=False, host="2001:db8::1", port=5060)
    if kind is not None:
        assert kind.kind == "stun" and stun_mapped_address(kind.reply, tid) == ("2001:db8::1", 5060)


def test_a_udp_token_brings_its_flow_back_after_a_restart_and_a_stream_token_does_not() -> None:
    """A home peer restarted with the same secret (kept in its data dir) can still reach a UDP phone
    through the token in the Path it stored; a TCP flow was its connection and stays gone (430)."""
    before = FlowTable(secret=b"k" * 32)
    udp = before.bind("udp", "198.51.100.7", 40312, 0.0, aor=AOR, entry_id=b"c1")
    v6 = before.bind("udp", "2001:db8::7", 5060, 0.0, aor=AOR, entry_id=b"c2")
    tcp = before.bind("tcp", "198.51.100.7", 40313, 0.0, aor=AOR, entry_id=b"c3", handle=object())
    assert udp.token.isalnum() and udp.token == udp.token.lower()

    after = FlowTable(secret=b"k" * 32)  # the restarted peer: empty table, same secret
    assert after.by_token(udp.token) is None
    revived = after.resolve(udp.token, 100.0)
    assert revived is not None and revived.key == ("udp", "198.51.100.7", 40312)
    assert after.resolve(udp.token, 101.0) is revived and after.stats["revived"] == 1
    assert after.key_of_token(v6.token) == ("udp", "2001:db8::7", 5060)
    assert after.resolve(tcp.token, 100.0) is None and after.key_of_token(tcp.token) is None
    # the revived flow is NAT-pinged like any other, and fails when nothing answers
    assert any(isinstance(a, Ping) for a in after.due(100.0 + after.ping_interval))
    # a flow this run found dead stays dead (430) until the phone registers over it again
    [failed] = [a for a in after.due(100.0 + 10 * after.ping_timeout) if isinstance(a, Failed)]
    assert failed.flow is revived and after.resolve(udp.token, 500.0) is None
    assert after.bind("udp", "198.51.100.7", 40312, 501.0, aor=AOR, entry_id=b"c1").token == udp.token
    assert after.resolve(udp.token, 502.0) is not None
    # another secret (another peer, or a forged token) names nothing
    stranger = FlowTable(secret=b"x" * 32)
    assert stranger.resolve(udp.token, 0.0) is None and stranger.key_of_token(udp.token) is None
    for i in (len(udp.token) - 1, 17, 3):  # the port, the address, the MAC changed
        forged = udp.token[:i] + ("a" if udp.token[i] != "a" else "b") + udp.token[i + 1 :]
        assert after.key_of_token(forged) is None, i


@given(st.text(max_size=64))
@settings(max_examples=300)
def test_any_token_text_resolves_to_a_flow_or_none(text: str) -> None:
    table = FlowTable(secret=b"k" * 32)
    assert table.key_of_token(text) is None
    assert table.resolve(text, 0.0) is None
