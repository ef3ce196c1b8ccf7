"""Client peers, SIP side (docs/nat.md, Client peers; p2psip.clientpeer).

The link state is tested with a fake clock; the ``service`` field of the ``attach`` answer is fuzzed with
hypothesis; on loopback, with real sockets, two full peers and a client peer forced with ``client=True``
(what ``--client`` sets): a phone registered to the client peer (its Contact unreachable as written, as
behind a NAT) is stored with Path [attach peer with a flow token, client peer], is called from a phone
at the other full peer, calls out, and stays callable when its attach peer dies (the client peer moves to
a fallback and stores its phones' bindings again) and when the client peer restarts (the phone registers
again). The same through real NATs is in tests/netns/test_nat_lab.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peer_phone import Phone
from peer_support import FAST_TIMERS, PeerFactory, peer_factory, wait_until_settled
from test_home_routing import NattedPhone, natted

from overlay.attach import AttachState
from overlay.errors import WireError
from overlay.localring import quick_node_config
from overlay.storage import INBOX_KEY_ID
from overlay.wire import Codec
from p2psip import pidf
from p2psip.cli.peer import _print_lookup, _print_status
from p2psip.clientpeer import (
    CLIENT_DOMAIN,
    KEEPALIVE,
    REGISTER,
    ClientLink,
    client_aor,
    client_instance,
    client_node_of,
)
from p2psip.inbox import SENDER_HEADER, inbox_name
from p2psip.peer import Peer, add_account
from p2psip.stack import Stack
from p2psip.uri import Address
from p2psip.useragent import UserAgent

ALICE = "sip:alice@p2p.example"
BOB = "sip:bob@p2p.example"
DAN = "sip:dan@p2p.example"
ERIN = "sip:erin@p2p.example"

# ---------------------------------------------------------------------------------------------- sans-IO

A, A_SIP, B, B_SIP = ("10.0.0.1", 7060), ("10.0.0.1", 5060), ("10.0.0.2", 7060), ("10.0.0.2", 5060)
PATH_A = "<sip:TOKENA@10.0.0.1:5060;lr;ob>"


def test_client_aor_names_a_node_and_nothing_else() -> None:
    aor = client_aor(0xABC)
    assert aor == f"sip:{0xABC:032x}@{CLIENT_DOMAIN}" and client_node_of(aor) == 0xABC
    assert client_node_of("sip:alice@p2p.example") is None
    assert client_node_of(f"sip:xyz@{CLIENT_DOMAIN}") is None  # not a node id
    assert client_node_of(f"sip:{'A' * 32}@{CLIENT_DOMAIN}") is None  # not canonical (lower-case hex)
    assert client_instance(0xABC) == client_instance(0xABC).lower().replace("urn", "urn")
    assert client_instance(0xABC).startswith("<urn:uuid:")


def test_link_registers_once_attached_then_keeps_alive_at_80_percent_of_the_flow_timer() -> None:
    link = ClientLink()
    assert link.due(0.0) == []  # not attached: nothing to do
    assert link.attached(A, None, 0.0)
    assert link.due(0.0) == []  # the attach peer has not named its SIP address yet
    assert link.attached(A, A_SIP, 1.0) and link.due(1.0) == [REGISTER]
    link.sending(1.0)
    assert link.due(2.0) == []  # one REGISTER at a time
    assert link.registered(2.0, PATH_A, flow_timer=30, expires=600, mapped=("203.0.113.7", 40000))
    assert link.ready and link.path == PATH_A
    assert link.due(2.0 + 23.9) == [] and link.due(2.0 + 24.0) == [KEEPALIVE]
    assert link.due(26.5) == []  # in flight
    link.keepalive_answered(27.0, ("203.0.113.7", 40000))
    assert link.next_keepalive == 27.0 + 24.0
    assert link.due(2.0 + 300.0) == [REGISTER]  # the refresh at half the registration
    link.sending(302.0)
    assert not link.registered(302.1, PATH_A, flow_timer=30, expires=600, mapped=("203.0.113.7", 40000))


def test_a_missed_keepalive_or_a_new_mapping_registers_again_at_once() -> None:
    link = ClientLink()
    link.attached(A, A_SIP, 0.0)
    link.sending(0.0)
    link.registered(0.0, PATH_A, flow_timer=10, expires=600, mapped=("203.0.113.7", 40000))
    assert link.due(8.0) == [KEEPALIVE]
    link.keepalive_missed(18.0)
    assert link.due(18.0) == [REGISTER] and link.problem == "no answer to a STUN keep-alive"
    link.sending(18.0)
    link.registered(18.5, PATH_A, flow_timer=10, expires=600, mapped=("203.0.113.7", 40000))
    assert link.problem is None
    assert link.due(26.5) == [KEEPALIVE]
    link.keepalive_answered(26.6, ("203.0.113.7", 40001))  # the NAT gave us another mapping
    assert link.due(26.6) == [REGISTER] and "mapping changed" in (link.problem or "")


def test_a_new_attach_peer_makes_a_new_flow_and_failures_back_off() -> None:
    link = ClientLink()
    link.attached(A, A_SIP, 0.0)
    link.sending(0.0)
    link.registered(0.0, PATH_A, flow_timer=10, expires=600, mapped=None)
    assert not link.attached(A, A_SIP, 1.0)  # nothing changed
    assert link.attached(B, None, 5.0)  # the overlay moved to a fallback: the old Path is void
    assert not link.ready and link.moves == 1 and link.due(5.0) == []
    link.attached(B, B_SIP, 5.5)
    assert link.due(5.5) == [REGISTER]
    link.sending(5.5)
    link.failed(6.0, "no answer")
    assert link.due(7.9) == [] and link.due(8.0) == [REGISTER]
    link.sending(8.0)
    link.failed(8.5, "no answer")
    assert link.due(12.4) == [] and link.due(12.5) == [REGISTER]  # doubled
    link.sending(12.5)
    path_b = "<sip:TOKENB@10.0.0.2:5060;lr;ob>"
    assert link.registered(13.0, path_b, flow_timer=None, expires=600, mapped=None)
    assert link.as_dict()["sip"] == "10.0.0.2:5060" and link.as_dict()["moves"] == 1


# ---------------------------------------------------------------------------------------------- wire


INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SERVICE = st.one_of(
    st.none(), INTS, st.text(max_size=5), st.lists(st.one_of(INTS, st.text(max_size=300)), max_size=3)
)


def _attach_answer(service: Any) -> bytes:
    return msgpack.packb({
        "v": 1, "ov": "client-test", "t": "ok", "id": 9, "src": b"\x01" * 16, "ep": ["127.0.0.1", 7060],
        "seen": ["127.0.0.1", 40000], "service": service,
    })  # fmt: skip


def test_an_attach_answer_names_the_attach_peers_sip_address() -> None:
    msg = Codec("client-test").decode(_attach_answer(["10.99.0.1", 5060]))
    assert msg.body["service"] == ("10.99.0.1", 5060)
    state = AttachState(A)
    state.answered(1.0, None, [], msg.body["service"])
    assert state.service == ("10.99.0.1", 5060)
    state.answered(2.0, None, [], ("10.99.0.1", 0))  # port 0 names nothing to send to
    assert state.service is None


@settings(max_examples=200, deadline=None)
@given(SERVICE)
def test_the_service_field_of_an_attach_answer_is_validated_strictly(service: Any) -> None:
    """Garbage in ``service`` is refused as a WireError (the node drops and counts it), never let through
    as anything but a (host, port) pair."""
    try:
        msg = Codec("client-test").decode(_attach_answer(service))
    except WireError:
        return
    got = msg.body.get("service")
    assert got is None or (isinstance(got[0], str) and isinstance(got[1], int) and 0 <= got[1] < 65536)
    assert got is None or isinstance(service, list)


# ---------------------------------------------------------------------------------------------- loopback


@pytest.fixture
async def make_peer(tmp_path: Path) -> AsyncIterator[PeerFactory]:
    """Test peers (:func:`peer_support.peer_factory`) whose client-peer keep-alives go every 0.3 s by
    default (``attach_interval``)."""
    async with peer_factory(tmp_path) as make:

        async def make_peer(
            join: Peer | None = None, *, attach_interval: float = 0.3, **settings: object
        ) -> Peer:
            node_config = dataclasses.replace(quick_node_config(), attach_interval=attach_interval)
            return await make(join, node_config=node_config, **settings)

        yield make_peer


UAFactory = Callable[[str, Peer], Awaitable[UserAgent]]


@pytest.fixture
async def make_ua() -> AsyncIterator[UAFactory]:
    """Our UserAgent for ``aor`` with ``peer`` as its outbound proxy (closed when the test ends)."""
    made: list[UserAgent] = []

    async def make(aor: str, peer: Peer) -> UserAgent:
        stack = await Stack.start(["udp:127.0.0.1:0"], timers=FAST_TIMERS)
        host, port = peer.sip_address()
        agent = UserAgent(stack, aor, outbound=f"{host}:{port}")
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.close()
        await agent.stack.close()


async def until(condition: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    """Poll a condition of the overlay or the link (they raise no events), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


async def client_ready(client: Peer, timeout: float = 15.0) -> None:
    link = client.client_link
    assert link is not None
    await until(lambda: link.ready, timeout, f"the client peer's SIP flow ({link.problem})")


async def test_a_client_peers_phone_is_called_through_the_attach_peer_and_calls_out(
    make_peer: PeerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await make_peer()
    second = await make_peer(first)
    await wait_until_settled([first, second], timeout=20)
    client = await make_peer(first, client=True)
    await client_ready(client)
    assert client.node.core is None  # no ring responsibility
    status = client.status()
    assert status["client"]["attached_to"] == f"127.0.0.1:{first.overlay_address[1]}"
    assert status["client"]["node"] == f"{first.node.node_id:032x}"
    assert "client peer" in status["client"]["because"]
    await until(lambda: first.status()["clients"]["sip"] != [], 5, "the attach peer lists its client")
    assert first.status()["clients"]["overlay"] == 1
    # what `p2psip status` prints (docs/nat.md)
    _print_status(client.status())
    _print_status(first.status())
    printed = capsys.readouterr().out
    attach = f"127.0.0.1:{first.overlay_address[1]}"
    short = f"{first.node.node_id:032x}"[:8]
    because = "configured as a client peer (client = true)"
    assert f"  client peer, attached to {attach} ({short}), because: {because}\n" in printed, printed
    sip = f"127.0.0.1:{first.sip_address()[1]}"
    assert f"  SIP flow to the attach peer {sip}: Path <sip:" in printed, printed
    assert "  attached client peers: 1 (1 with a SIP flow)\n" in printed, printed

    bob: NattedPhone = await natted("bob")
    alice = await Phone.open("alice")
    try:
        ok = await bob.register(client.sip_address())
        assert ok.status == 200, ok.status
        [binding] = await second.fetch_bindings(BOB)
        attach_hop, client_hop = (Address(p).uri for p in binding.path)
        assert (attach_hop.host, attach_hop.port) == first.sip_address() and attach_hop.user  # the flow token
        assert (client_hop.host, client_hop.port) == client.sip_address() and client_hop.user
        assert binding.contact == bob.contact
        # signed by the client peer's own user key, stored through its attach peer
        assert client.users.exists(BOB) and not first.users.exists(BOB)
        assert client.node.stats()["relay_store_done"] >= 1
        # `p2psip lookup` on the client peer: its attach peer reads for it
        found = (await client.lookup(BOB)).as_dict(time.time())
        assert found["engine"] == "client" and [b["contact"] for b in found["bindings"]] == [bob.contact]
        assert found["bindings"][0]["path"] == list(binding.path)
        _print_lookup(found)
        assert "read by the attach peer of this client peer" in capsys.readouterr().out

        # in: from a phone at the other full peer, through the attach peer, over the client's flow
        assert (await alice.register(second.sip_address())).status == 200
        call = await alice.call(BOB, second.sip_address(), timeout=10)
        assert call.answered, call.statuses
        assert call.bye_status == 200  # in-dialog requests follow the tokens back over both flows
        invite = await asyncio.wait_for(bob.invites.get(), 5)
        vias = [v.split(";")[0] for v in invite.get_all("Via")]
        assert len(vias) == 4, vias  # alice, the entry peer, the attach peer, the client peer
        # out: the client peer hands its phone's call to the attach peer (Service-Route), which routes it
        fetched = client.node.stats().get("relay_fetch_done", 0)
        out = await bob.call(ALICE, client.sip_address(), timeout=10)
        assert out.answered, out.statuses
        assert out.bye_status == 200
        # the client peer looked nothing up itself (the attach peer did)
        assert client.counters["routed"] == 1 and client.node.stats().get("relay_fetch_done", 0) == fetched

        # home routing off (the bench's switch) on the full peers: calls go straight to contacts, except a
        # contact its home peer reaches only over a flow, as a client peer's phone: its Path still leads
        for peer in (first, second):
            peer.config.home_routing = False
        for entry, hops in ((first, 3), (second, 4)):
            call = await alice.call(BOB, entry.sip_address(), timeout=10)
            assert call.answered and call.bye_status == 200, (entry is first, call.statuses)
            invite = await asyncio.wait_for(bob.invites.get(), 5)
            assert len(invite.get_all("Via")) == hops, invite.get_all("Via")
        out = await bob.call(ALICE, client.sip_address(), timeout=10)
        assert out.answered, out.statuses
    finally:
        bob.close()
        alice.close()


async def test_the_binding_recovers_when_the_attach_peer_or_the_client_peer_dies(
    make_peer: PeerFactory, tmp_path: Path
) -> None:
    first = await make_peer()
    second = await make_peer(first)
    # a third full peer: once the first dies two remain for the write quorum of 2 (a lone survivor of a
    # ring is cut off and answers 503, tests/test_overload.py)
    third = await make_peer(first)
    await wait_until_settled([first, second, third], timeout=20)
    client_dir = tmp_path / "client"
    client = await make_peer(first, client=True, data_dir=client_dir)
    await client_ready(client)
    bob = await natted("bob")
    alice = await Phone.open("alice")
    try:
        assert (await bob.register(client.sip_address())).status == 200
        assert (await alice.register(second.sip_address())).status == 200

        # the attach peer dies: the client peer re-attaches to a fallback (the second or the third peer),
        # makes its SIP flow there and stores bob's binding again with the new Path
        await first.close(leave=False)
        link = client.client_link
        assert link is not None

        def attached() -> Peer | None:
            to = client.status()["client"]["attached_to"]
            return next((p for p in (second, third) if to == f"127.0.0.1:{p.overlay_address[1]}"), None)

        async def moved() -> bool:
            if client.counters["client_bindings_moved"] < 1:  # counted once the put returned
                return False
            new = attached()
            bindings = await second.fetch_bindings(BOB)
            if new is None or not bindings:
                return False
            hop = Address(bindings[0].path[0]).uri
            return (hop.host, hop.port) == new.sip_address()

        await until(moved, 30, "bob's binding did not move to the new attach peer")
        assert link.moves == 1 and client.counters["client_bindings_moved"] == 1  # once, not again
        new = attached()
        assert new is not None
        call = await alice.call(BOB, second.sip_address(), timeout=10)
        assert call.answered, call.statuses

        # the client peer dies and comes back (same data dir: same user key); the phone registers again
        assert new.status()["clients"]["overlay"] == 1
        await client.close(leave=False)
        # silent for four keep-alive intervals: no longer counted as attached
        await until(lambda: new.status()["clients"]["overlay"] == 0, 10, "the dead client still counted")
        again = await make_peer(new, client=True, data_dir=client_dir)
        await client_ready(again)
        assert (await bob.register(again.sip_address(), call_id="again")).status == 200
        call = await alice.call(BOB, second.sip_address(), timeout=10)
        assert call.answered, call.statuses
    finally:
        bob.close()
        alice.close()


async def test_a_client_peer_that_stops_tells_its_attach_peer_at_once(make_peer: PeerFactory) -> None:
    """A graceful stop un-REGISTERs the client's SIP flow (Expires: 0) and detaches in the overlay: the
    attach peer drops the flow and the client at once, long before its timers would (keep-alives every
    30 s here, so silence would take 120 s; the flow timer is 120 s)."""
    first = await make_peer(attach_interval=30.0)
    client = await make_peer(first, client=True, attach_interval=30.0)
    await client_ready(client)
    await until(lambda: first.status()["clients"]["sip"] != [], 5, "the attach peer lists its client")
    assert first.status()["clients"]["overlay"] == 1
    assert first.config.flow_timer >= 30
    assert sum(f["bindings"] for f in first.flows.snapshot(0.0)) == 1  # type: ignore[misc]
    started = time.monotonic()
    await client.close(leave=True)  # what SIGTERM does
    await until(
        lambda: first.status()["clients"] == {"overlay": 0, "sip": []}, 5, "the attach peer still counts it"
    )
    assert time.monotonic() - started < 10
    assert sum(f["bindings"] for f in first.flows.snapshot(0.0)) == 0  # type: ignore[misc]
    assert first.counters["client_registers"] == 2  # the REGISTER, then the one with Expires: 0
    assert first.node.stats()["detach_served"] == 1 and client.node.stats()["detached"] == 1
    _print_status(first.status())


async def test_a_client_register_from_a_stranger_is_refused(make_peer: PeerFactory) -> None:
    first = await make_peer()
    stranger = await Phone.open("x")
    try:
        response = await stranger.register(first.sip_address(), aor=client_aor(12345))
        assert response.status == 403
        assert first.counters["client_registers_refused"] == 1 and first.clients == {}
        assert not first.flows.snapshot(0.0)
    finally:
        stranger.close()


async def test_presence_of_a_client_peers_phones(make_peer: PeerFactory, make_ua: UAFactory) -> None:
    """A watcher whose phone is registered to a client peer is vouched for through the attach peer (the
    client peer's own vouch cannot be checked by anyone else: it is in no ring): it sees the presentity's
    real state (open), not the polite block (closed). The other way round, a client peer's phone is a
    presentity whose agent is its attach peer (its first Path hop): it PUBLISHes through the client peer,
    and a watcher elsewhere sees what it published."""
    first = await make_peer()
    second = await make_peer(first)
    await wait_until_settled([first, second], timeout=20)
    client = await make_peer(first, client=True)
    await client_ready(client)

    async def ua_at(aor: str, peer: Peer) -> UserAgent:
        ua = await make_ua(aor, peer)
        host, port = peer.sip_address()
        assert (await ua.register(f"sip:{host}:{port}", expires=300, refresh=False)).status == 200
        return ua

    await ua_at(BOB, second)
    carol = await ua_at("sip:carol@p2p.example", client)
    sub = await carol.subscribe(BOB, "presence", body_check=lambda r: None)
    doc = pidf.parse((await sub.next(10)).body)
    assert doc.basic == "open" and doc.tuples[0].contact is not None, doc
    assert second.presence.stats["blocked"] == 0 and second.presence.stats["subscribes"] == 1
    # the client peer handed it to its attach peer, which vouched in its place and forwarded it
    assert client.counters["routed_to_home"] == 1 and first.counters["routed_to_home"] == 1
    await sub.unsubscribe()

    # carol as a presentity: her agent is the attach peer; alice (at the other full peer) watches
    alice = await ua_at(ALICE, second)
    watch = await alice.subscribe("sip:carol@p2p.example", "presence", body_check=lambda r: None)
    doc = pidf.parse((await watch.next(10)).body)
    assert doc.basic == "open", doc
    assert first.presence.stats["subscribes"] == 1 and first.presence.stats["blocked"] == 0
    away = pidf.Presence("sip:carol@p2p.example", [pidf.PresenceTuple("desk", "closed")], ["at lunch"])
    published = await carol.request(
        "PUBLISH", "sip:carol@p2p.example", body=away.compose(), content_type=pidf.CONTENT_TYPE,
        headers=[("Event", "presence"), ("Expires", "600")],
    )  # fmt: skip
    assert published.status == 200, published  # vouched for through the attach peer
    doc = pidf.parse((await watch.next(10)).body)
    assert doc.notes == ["at lunch"] and ("desk", "closed") in [(t.id, t.basic) for t in doc.tuples], doc
    # (her registration's own tuple stays beside it: the agent tells a device that published by its
    # source address, and hers is the client peer's; docs/nat.md, Known limits)
    await watch.unsubscribe()


async def test_offline_messages_from_and_to_a_client_peers_phones(
    make_peer: PeerFactory, make_ua: UAFactory
) -> None:
    """Offline messages (p2psip.inbox) work for a client peer's phones with their senders vouched for: a
    letter from its phone is left by the attach peer in its own name (the client peer's vouch would not
    hold: it is in no ring); a letter for its phone, stored by another peer, is delivered by the client
    peer, which checks the voucher's ring membership through its attach peer (``relay_lookup``)."""
    first = await make_peer()
    second = await make_peer(first)
    await wait_until_settled([first, second], timeout=20)
    client = await make_peer(first, client=True)
    await client_ready(client)
    erin_pw = add_account(second.config.data_dir, ERIN)
    dan_pw = add_account(client.config.data_dir, DAN)
    ua = make_ua

    async def register(agent: UserAgent, peer: Peer, expires: int, password: str | None = None) -> None:
        host, port = peer.sip_address()
        user = agent.aor.user
        response = await agent.register(
            f"sip:{host}:{port}", expires=expires, refresh=False, username=user, password=password
        )
        assert response.status == 200, response

    async def inbox_published(aor: str) -> bool:
        return any(e.entry_id == INBOX_KEY_ID for e in await second.node.get(inbox_name(aor)))

    erin, dan = await ua(ERIN, second), await ua(DAN, client)
    carol, alice = await ua("sip:carol@p2p.example", client), await ua(ALICE, second)
    for agent, peer, password in ((erin, second, erin_pw), (dan, client, dan_pw)):
        await register(agent, peer, 300, password)
        await until(lambda aor=str(agent.aor): inbox_published(aor), 10, f"{agent.aor}'s inbox key")  # type: ignore[misc]
        await register(agent, peer, 0, password)
    await register(carol, client, 300)
    await register(alice, second, 300)

    # from the client peer's phone: stored by the attach peer, vouched for in its own name
    assert (await carol.message(ERIN, "from behind the NAT")).status == 202
    assert first.counters["messages_stored"] == 1 and client.counters["messages_stored"] == 0
    # for the client peer's phone: stored by alice's peer; the client peer delivers it
    assert (await alice.message(DAN, "to behind the NAT")).status == 202
    assert second.counters["messages_stored"] == 1

    await register(erin, second, 300, erin_pw)
    got = await asyncio.wait_for(erin.messages.get(), 15)
    assert got.body == b"from behind the NAT" and got.from_.uri.user == "carol"
    assert got.get(SENDER_HEADER) == f"vouched;node={first.node.node_id:032x}"

    looked_up = first.node.stats().get("relay_looked_up", 0)
    await register(dan, client, 300, dan_pw)
    got = await asyncio.wait_for(dan.messages.get(), 15)
    assert got.body == b"to behind the NAT" and got.from_.uri.user == "alice"
    assert got.get(SENDER_HEADER) == f"vouched;node={second.node.node_id:032x}"
    assert first.node.stats()["relay_looked_up"] > looked_up  # the voucher checked through it
    await until(lambda: client.counters["messages_delivered"] == 1, 10, "the delivery counted")
