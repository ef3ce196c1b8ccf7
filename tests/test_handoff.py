"""Who owns a datagram among the workers of one proxy (p2psip.handoff.owner): the same owner for a
request's retransmissions, its CANCEL and the ACK of a non-2xx (its Call-ID), the worker named by our
branch for a response, None (handle it here) when there is nothing to go by."""

from __future__ import annotations

from p2psip.handoff import branch_tag, call_owner, owner

INVITE = (
    "INVITE sip:bob@127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-abc123;rport\r\n"
    "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-second\r\n"
    "From: <sip:alice@127.0.0.1>;tag=1\r\nTo: <sip:bob@127.0.0.1>\r\n"
    "Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


def _owner_of(call_id: bytes, workers: int) -> int:
    """What the Call-ID's first 16 bytes name: a big-endian number mod 65521 mod the worker count."""
    return int.from_bytes(call_id[:16], "big") % 65521 % workers


def test_a_request_belongs_to_the_owner_of_its_call_id() -> None:
    data = INVITE.encode()
    assert owner(data, 4) == call_owner(data, 4) == _owner_of(b"c1", 4)
    assert owner(data, 1) == 0
    long = INVITE.replace("Call-ID: c1", "Call-ID: 0123456789abcdefTAIL@host").encode()
    assert owner(long, 7) == _owner_of(b"0123456789abcdef", 7)  # the first 16 bytes only


def test_cancel_and_ack_meet_the_invite_across_worker_counts() -> None:
    # §9.1 / §17.1.1.3: the CANCEL and the ACK of a non-2xx carry the INVITE's top Via
    cancel = INVITE.replace("INVITE sip", "CANCEL sip").replace("1 INVITE", "1 CANCEL").encode()
    ack = INVITE.replace("INVITE sip", "ACK sip").replace("1 INVITE", "1 ACK").encode()
    other = INVITE.replace("Call-ID: c1", "Call-ID: c2-other").encode()
    owners = {workers: owner(INVITE.encode(), workers) for workers in range(2, 9)}
    assert all(owner(cancel, n) == owners[n] == owner(ack, n) for n in owners)
    # and a request of another call is spread elsewhere for some worker count
    assert any(owner(other, n) != owners[n] for n in owners)


def test_header_name_case_and_compact_form_and_spaces() -> None:
    for call_id in ("call-id: abc123", "i : abc123", "CALL-ID:\tabc123", "Call-Id:abc123  "):
        data = f"BYE sip:b@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-1\r\n{call_id}\r\n\r\n".encode()
        assert owner(data, 7) == _owner_of(b"abc123", 7), call_id


def test_the_call_id_header_decides_not_a_look_alike() -> None:
    data = (
        b"BYE sip:b@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-top\r\nCall-Info: <http://h/i: x>\r\n"
        b"X-Call-ID: nope\r\nCall-ID: top\r\nContent-Length: 6\r\n\r\ni: no\n"
    )
    assert owner(data, 9) == _owner_of(b"top", 9)


def test_a_response_goes_to_the_worker_its_branch_names() -> None:
    for index in (0, 1, 3):
        branch = f"z9hG4bK-lpabc.0123456789{branch_tag(index)}"
        data = (
            f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch={branch};rport=5060\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-abc\r\nCall-ID: c\r\n\r\n"
        ).encode()
        assert owner(data, 4) == index


def test_nothing_to_go_by_means_here() -> None:
    # a response whose branch names no worker (not ours, or a worker index beyond the count)
    plain = b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-x\r\n\r\n"
    beyond = b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-x.w9\r\n\r\n"
    # RFC 2543: no branch at all; and no Via (garbage: the parser of whoever handles it drops it)
    no_branch = b"OPTIONS sip:h SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nCall-ID: x\r\n\r\n"
    assert [owner(d, 4) for d in (plain, beyond, no_branch, b"\r\n\r\n", b"")] == [None] * 5


def test_records_of_a_batch_come_back_in_order_with_their_sources() -> None:
    from p2psip.handoff import _record, _records

    one, two = b"SIP/2.0 200 OK\r\n\r\n", b"BYE sip:b@h SIP/2.0\r\nX: a b\nc\r\n\r\n"
    packet = _record(one, "127.0.0.1", 5060) + _record(two, "::1", 40000)
    assert _records(packet) == [(one, ("127.0.0.1", 5060)), (two, ("::1", 40000))]
    # a cut tail loses only itself
    assert _records(packet + _record(b"INVITE sip:x SIP/2.0\r\n", "10.0.0.1", 1)[:-3]) == _records(packet)
    assert _records(b"") == []


def _call_owned_by(wanted: int, workers: int = 2) -> str:
    return next(c for c in (f"ack{n}" for n in range(100)) if _owner_of(c.encode(), workers) == wanted)


def test_acks_are_forwarded_where_they_arrive_unless_their_invite_was_refused_elsewhere() -> None:
    """Worker 0 reads an ACK whose INVITE worker 1 owns: the ACK of a 2xx (nobody said otherwise)
    is forwarded by worker 0 itself; once worker 1 is about to refuse that INVITE (486), the notice it
    writes first makes worker 0 hand the ACK to it, to be absorbed by its server transaction."""
    import asyncio

    from p2psip.handoff import HandoffLink, open_links
    from p2psip.message import Request, parse
    from p2psip.transaction import InviteServerTransaction
    from p2psip.transport import Source

    branch = "z9hG4bK-abc123"
    invite = INVITE.replace("Call-ID: c1", f"Call-ID: {_call_owned_by(1)}")
    ack = invite.replace("INVITE sip", "ACK sip").replace("1 INVITE", "1 ACK").encode()
    other_ack = ack.replace(branch.encode(), branch.encode() + b"x")
    links = open_links(2)

    async def scenario() -> list[bytes]:
        got: list[bytes] = []
        arrived = asyncio.Event()

        def at_one(data: bytes, source: tuple[str, int]) -> None:
            got.append(data)
            arrived.set()

        zero = HandoffLink(0, links, lambda data, source: None)
        one = HandoffLink(1, links, at_one)
        try:
            assert zero.divert(ack, ("127.0.0.1", 5070)) is False  # a 2xx's ACK: forwarded by worker 0
            assert zero.stats["acks_here"] == 1
            request = parse(invite.encode())
            assert isinstance(request, Request)
            one.refusing(InviteServerTransaction(request, Source("udp", "127.0.0.1", 5070), reliable=False))
            assert zero.divert(ack, ("127.0.0.1", 5070)) is True  # the notice was read first
            # an ACK with another branch is still forwarded where it arrives; an INVITE still goes over
            assert zero.divert(other_ack, ("127.0.0.1", 5070)) is False
            assert zero.divert(invite.encode(), ("127.0.0.1", 5070)) is True
            zero.flush()
            await asyncio.wait_for(arrived.wait(), 5)
            while len(got) < 2:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 5)
            assert zero.stats["handed_off"] == 2 and one.stats["handed_in"] == 2
            return got
        finally:
            zero.close()
            one.close()

    try:
        assert asyncio.run(scenario()) == [ack, invite.encode()]
    finally:
        for pair in links:
            for sock in pair:
                sock.close()


def test_an_in_dialog_request_goes_to_the_worker_its_route_names() -> None:
    """Our Record-Route URI names the worker that forwarded the INVITE (``;wk=I``): a request whose top
    Route carries it belongs there whatever its branch, and so do its CANCEL and non-2xx ACK."""
    from p2psip.handoff import route_param

    assert route_param(3) == {"wk": "3"}
    bye = (
        "BYE sip:bob@127.0.0.1:5090 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch={branch};rport\r\n"
        "Route: <sip:127.0.0.1:5060;lr;wk={worker}>, <sip:10.0.0.9;lr;wk=0>\r\n"
        "Call-ID: c1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    for worker in (0, 1, 2):
        for branch in ("z9hG4bK-a", "z9hG4bK-b", "z9hG4bK-c"):
            data = bye.format(branch=branch, worker=worker).encode()
            assert owner(data, 3) == worker
            assert owner(data.replace(b"BYE", b"CANCEL"), 3) == worker
    # a worker beyond the count, or no worker in the top Route (another proxy's): the Call-ID decides
    routes = ("<sip:127.0.0.1:5060;lr;wk=7>", "<sip:127.0.0.1:5060;lr>, <sip:p;lr;wk=1>", "<sip:h;wkx=1;lr>")
    for route in routes:
        data = bye.format(branch="z9hG4bK-a", worker=0).replace(
            "<sip:127.0.0.1:5060;lr;wk=0>, <sip:10.0.0.9;lr;wk=0>", route
        ).encode()
        assert owner(data, 3) == _owner_of(b"c1", 3), route
