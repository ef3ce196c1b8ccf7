"""Home-peer routing on loopback (issue "reachable from anywhere", RFC 3327 Path + RFC 5626 flows).

A phone "behind a NAT" is simulated honestly enough for the routing logic: its Contact names an address
nobody can reach (127.0.0.2, where nothing listens) while its packets come from its real socket, exactly
what a home peer sees of a phone behind a NAT. Only its home peer's flow reaches it. The real NATs are in
tests/netns/test_nat_lab.py.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from peer_phone import Phone
from peer_support import wait_until_settled
from test_peer import BOB, PeerFactory

from p2psip.flows import stun_binding_request, stun_mapped_address
from p2psip.peer import Peer
from p2psip.uri import Address

Phones = Callable[..., Awaitable[Phone]]


class NattedPhone(Phone):
    """A phone whose Contact is unreachable as written (as behind a NAT): only its flow reaches it."""

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@127.0.0.2:{self.port}"


async def natted(user: str, answer: str | int = "auto") -> NattedPhone:
    phone = await NattedPhone.open(user, answer)
    assert isinstance(phone, NattedPhone)
    return phone


async def three(make_peer: PeerFactory, **settings: object) -> list[Peer]:
    first = await make_peer(**settings)
    peers = [first, await make_peer(first, **settings), await make_peer(first, **settings)]
    await wait_until_settled(peers, timeout=20)
    return peers


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll an overlay condition (the DHT raises no events) at most ``timeout`` seconds; returns the time."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_call_entering_at_any_peer_reaches_a_natted_phone_over_its_home_peers_flow(
    make_peer: PeerFactory, phones: Phones
) -> None:
    ring = await three(make_peer)
    bob = await natted("bob")
    try:
        assert (await bob.register(ring[0].sip_address())).status == 200
        [binding] = await ring[1].fetch_bindings(BOB)
        home = Address(binding.path[0]).uri
        assert (home.host, home.port) == ring[0].sip_address() and home.user  # the flow token
        assert binding.contact == bob.contact  # stored as the phone wrote it
        alice = await phones("alice")
        result = await alice.call(BOB, ring[2].sip_address(), timeout=10)
        assert result.answered, result.statuses
        assert result.bye_status == 200  # the BYE went over the flow too (token in Record-Route)
        invite = await asyncio.wait_for(bob.invites.get(), 5)
        assert len(invite.get_all("Via")) == 3  # alice, the entry peer, the home peer
        assert await asyncio.wait_for(bob.byes.get(), 5)
        assert ring[2].counters["routed_to_home"] == 1
        # every binding of bob lives on ring[0]: the entry peer said so, and ring[0] served the call from the
        # registrations it took itself, with no second DHT lookup
        assert ring[0].counters["home_lookups_saved"] == 1 and ring[0].counters["lookups"] == 0
    finally:
        bob.close()


async def bob_at_two_homes(ring: list[Peer], desk: Phone, mobile: Phone) -> None:
    """bob's desk phone registers at ring[0], his mobile at ring[1]: two home peers, one AOR (ring[1]
    serves bob with bob's user key, copied as docs/index.md says)."""
    assert (await desk.register(ring[0].sip_address())).status == 200
    target = ring[1].users.path_for(BOB)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ring[0].users.export(BOB), target)
    assert (await mobile.register(ring[1].sip_address())).status == 200


async def test_forking_gives_each_branch_its_own_home_peer(make_peer: PeerFactory, phones: Phones) -> None:
    ring = await three(make_peer)
    desk, mobile = await natted("bob", answer="ring"), await natted("bob")
    try:
        await bob_at_two_homes(ring, desk, mobile)
        alice = await phones("alice")
        result = await alice.call(BOB, ring[2].sip_address(), timeout=10)
        assert result.answered, result.statuses
        for phone in (desk, mobile):  # each reached at its own flow by its own home peer
            invite = await asyncio.wait_for(phone.invites.get(), 5)
            assert len(invite.get_all("Via")) >= 3
        await asyncio.wait_for(desk.cancelled.wait(), 5)  # the ringing branch is cancelled
    finally:
        desk.close()
        mobile.close()


async def test_the_callees_script_runs_once_on_its_primary_home_and_its_proxy_reaches_every_home_peer(
    make_peer: PeerFactory, phones: Phones, tmp_path: Path
) -> None:
    """bob's devices registered at two peers; every peer has bob's script. A call entering at the third
    runs it once, on the home peer of bob's best binding, and its ``proxy()`` forks to both devices: the one
    registered there over that peer's flow, the other through its own home peer (its Path), not through a
    fresh lookup that would lead back."""
    from sipapi.scripts import install

    ring = await three(make_peer)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bob@p2p.example.py").write_text(
        "def incoming(event):\n    event.action.proxy(timeout=10)\n\n"
        "basic.addEventListener('incoming', incoming)\n"
    )
    scripting = [install(peer, scripts=scripts, deadline=3.0, workers=1) for peer in ring]

    async def started() -> bool:  # each worker's "ready" is in (an interpreter takes longer than Timer C)
        return all(w.ready or not w.messages.empty() for s in scripting for w in s.pool._all)

    await until(started, 30, "the script workers did not start")
    desk, mobile = await natted("bob", answer="ring"), await natted("bob")
    try:
        await bob_at_two_homes(ring, desk, mobile)
        alice = await phones("alice")
        result = await alice.call(BOB, ring[2].sip_address(), timeout=15)
        assert result.answered, result.statuses
        for phone in (desk, mobile):
            assert len((await asyncio.wait_for(phone.invites.get(), 5)).get_all("Via")) >= 3
        scripted = [s.stats["scripted"] for s in scripting]
        assert sum(scripted) == 1 and scripted[2] == 0, scripted  # once, on a home peer, not at the entry
    finally:
        desk.close()
        mobile.close()
        for s in scripting:
            await s.close()


async def test_a_dead_flow_answers_430_and_its_binding_goes(make_peer: PeerFactory, phones: Phones) -> None:
    ring = await three(make_peer)
    bob = await natted("bob")
    try:
        assert (await bob.register(ring[0].sip_address())).status == 200
        [flow] = list(ring[0].flows)
        failed = ring[0].flows.fail(flow, "test: the NAT dropped the mapping")
        alice = await phones("alice")
        result = await alice.call(BOB, ring[1].sip_address(), timeout=10)
        assert result.final is not None and result.final.status == 430, result.statuses
        ring[0]._flow_failed(failed)  # what the peer does when it finds a flow dead: the binding goes

        async def gone() -> bool:
            return not await ring[1].fetch_bindings(BOB)

        await until(gone, 10, "the binding of the dead flow was not removed")
        again = await alice.call(BOB, ring[1].sip_address(), timeout=10)
        assert again.final is not None and again.final.status == 404
        # a re-REGISTER (as the phone does when its flow fails) restores it
        assert (await bob.register(ring[0].sip_address(), call_id="again")).status == 200
        assert (await alice.call(BOB, ring[1].sip_address(), timeout=10)).answered
    finally:
        bob.close()


async def test_outbound_phone_gets_flow_timer_and_loses_its_binding_when_keepalives_stop(
    make_peer: PeerFactory,
) -> None:
    ring = await three(make_peer, flow_timer=1)
    bob = await natted("bob")
    peer = ring[0].sip_address()
    contact = f'<{bob.contact}>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-0000000000b0>";reg-id=1'
    try:
        ok = await bob.register(peer, contact=contact)
        assert ok.status == 200 and ok.get("Require") == "outbound" and ok.get("Flow-Timer") == "1"
        returned = ok.contacts[0]
        assert returned.params.get("reg-id") == "1" and returned.params.get("+sip.instance")
        [binding] = await ring[1].fetch_bindings(BOB)
        assert "ob" in Address(binding.path[0]).uri.params
        # p2psip status lists the flow, never the instance id (a device's proof of ownership), and the web
        # page off loopback shows no flows at all (phones' addresses)
        from p2psip.web.server import redact

        status = ring[0].status()
        [row] = status["flows"]
        assert row["outbound"] and row["bindings"] == 1 and "urn:uuid" not in str(status["flows"])
        assert "flows" not in redact(status)
        # STUN keep-alives over the flow keep it (and the binding) alive well past the Flow-Timer
        request, _tid = stun_binding_request()
        assert bob.transport is not None
        for _ in range(12):
            bob.transport.sendto(request, peer)
            await asyncio.sleep(0.25)  # the keep-alive period of this phone
        assert len(await ring[1].fetch_bindings(BOB)) == 1
        assert ring[0].stack.transport.stats["stun_requests"] >= 12

        async def gone() -> bool:
            return not await ring[1].fetch_bindings(BOB)

        took = await until(gone, 8, "the silent outbound flow's binding was not removed")
        assert took < 5  # Flow-Timer 1 s + grace, then the overlay removal
        assert ring[0].counters["flows_failed"] == 1
    finally:
        bob.close()


async def test_nat_pings_keep_a_non_outbound_flow_and_find_it_dead(make_peer: PeerFactory) -> None:
    ring = await three(make_peer, nat_ping=0.2)
    bob = await natted("bob")
    try:
        assert (await bob.register(ring[0].sip_address())).status == 200

        async def pinged() -> bool:
            return sum(r.method == "OPTIONS" for r in bob.requests) >= 3

        await until(pinged, 5, "no NAT pings reached the phone")
        assert len(await ring[1].fetch_bindings(BOB)) == 1  # it answers them: the flow lives
        bob.close()  # the phone (or its NAT mapping) is gone: the pings go unanswered

        async def gone() -> bool:
            return not await ring[1].fetch_bindings(BOB)

        await until(gone, 8, "the unanswered flow's binding was not removed")
    finally:
        bob.close()


async def test_a_phone_reachable_as_written_still_goes_through_its_home_peer_and_the_switch_skips_it(
    make_peer: PeerFactory, phones: Phones
) -> None:
    for home_routing, vias in ((True, 3), (False, 2)):
        ring = await three(make_peer, home_routing=home_routing)
        bob = await phones("bob")
        assert (await bob.register(ring[0].sip_address())).status == 200
        assert not list(ring[0].flows)  # reachable at its Contact: no flow to keep
        alice = await phones("alice")
        result = await alice.call(BOB, ring[1].sip_address(), timeout=10)
        assert result.answered, result.statuses
        invite = await asyncio.wait_for(bob.invites.get(), 5)
        assert len(invite.get_all("Via")) == vias, (home_routing, invite.get_all("Via"))
        for peer in ring:
            await peer.close(leave=False)


async def test_stun_and_garbage_on_the_sip_port(make_peer: PeerFactory, phones: Phones) -> None:
    peer = await make_peer()
    addr = peer.sip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        request, tid = stun_binding_request()
        sock.sendto(request, addr)
        data, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(sock, 2048), 5)
        assert stun_mapped_address(data, tid) == sock.getsockname()
        for junk in (b"\x01\x01\x00\x08" + b"\x21\x12\xa4\x42" + b"x" * 12, b"\x01" * 40, b"\r\n", b""):
            sock.sendto(junk, addr)
    alice = await phones("alice")  # the peer still answers SIP
    assert (await alice.register(addr)).status == 200
    assert peer.stack.transport.stats["stun_requests"] == 1


async def test_crlf_ping_on_a_stream_gets_a_crlf_pong(make_peer: PeerFactory) -> None:
    from p2psip.config import ListenSpec

    peer = await make_peer(listen=[ListenSpec("tcp", "127.0.0.1", 0)])
    host, port = peer.sip_address("tcp")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
        writer.write(b"\r\n")  # a pong (or a lone CRLF) is not answered
        writer.write(b"\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
    finally:
        writer.close()


def outbound_bob(stack: Any, outbound: str, uuid_tail: str) -> tuple[Any, asyncio.Queue[object]]:
    """Our UserAgent as bob, an RFC 5626 outbound client of ``outbound``, answering every call (queued)."""
    from p2psip.useragent import UserAgent

    calls: asyncio.Queue[object] = asyncio.Queue()

    def answer(call: Any) -> None:
        call.accept(b"")
        calls.put_nowait(call)

    instance = f"<urn:uuid:0b0b0b0b-0000-4000-8000-{uuid_tail}>"
    return UserAgent(stack, BOB, outbound=outbound, instance=instance, on_call=answer), calls


class LoopbackNat(asyncio.DatagramProtocol):
    """A one-phone NAT on loopback: what the phone sends to ``inside`` leaves from an outer socket (the
    mapping) toward ``peer``; what arrives there goes back to the phone. ``remap()`` opens a new outer socket
    (a fully random NAT that forgot the mapping); ``blackhole`` drops everything (a dead link)."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.phone: tuple[str, int] | None = None
        self.inside: asyncio.DatagramTransport | None = None
        self.outer: asyncio.DatagramTransport | None = None
        self.blackhole = False
        self.registers = 0

    async def open(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.inside, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        await self.remap()
        return self.inside.get_extra_info("sockname")[:2]

    async def remap(self) -> None:
        if self.outer is not None:
            self.outer.close()
        nat = self

        class Outer(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if not nat.blackhole and nat.inside is not None and nat.phone is not None:
                    nat.inside.sendto(data, nat.phone)

        loop = asyncio.get_running_loop()
        self.outer, _ = await loop.create_datagram_endpoint(Outer, local_addr=("127.0.0.1", 0))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # from the phone
        self.phone = addr
        if not self.blackhole and self.outer is not None:
            self.registers += data.startswith(b"REGISTER ")
            self.outer.sendto(data, self.peer)

    def close(self) -> None:
        for transport in (self.inside, self.outer):
            if transport is not None:
                transport.close()


async def test_our_user_agent_registers_again_when_a_keepalive_fails_or_its_nat_mapping_changes(
    make_peer: PeerFactory,
) -> None:
    """RFC 5626 §4.4 over UDP, through a NAT on loopback: a STUN keep-alive that goes unanswered (the link
    went dead), or one answered with another reflexive address (the NAT made a new mapping), makes our UA
    register again at once; the home peer binds the new flow and calls reach the UA over it."""
    from p2psip.stack import Stack

    ring = await three(make_peer, flow_timer=1)
    nat = LoopbackNat(ring[0].sip_address())
    inside = await nat.open()
    stack = await Stack.start(["udp:127.0.0.1:0"])
    ua, calls = outbound_bob(stack, f"{inside[0]}:{inside[1]}", "0000000000c6")
    alice = await Phone.open("alice")

    async def flow_via_outer(registers: int = 0) -> bool:
        """The home peer holds one flow, from the NAT's current mapping, with bob's binding, registered
        over it after ``registers`` REGISTERs had passed the NAT."""
        assert nat.outer is not None
        outer = nat.outer.get_extra_info("sockname")[:2]
        flows = [(f.host, f.port) for f in ring[0].flows]
        return nat.registers > registers and flows == [outer] and bool(await ring[1].fetch_bindings(BOB))

    try:
        assert (await ua.register("sip:p2p.example", expires=600)).get("Flow-Timer") == "1"
        await until(flow_via_outer, 5, "the first flow")
        for change in ("the link goes dead for a while", "the NAT forgets the mapping"):
            registers = nat.registers
            if change.startswith("the link"):
                nat.blackhole = True
                await asyncio.sleep(2)  # the point: two Flow-Timers without an answer to a keep-alive
                nat.blackhole = False
            else:
                await nat.remap()
            # it registers again at once (its refresh is minutes away) and the home peer binds that flow
            await until(functools.partial(flow_via_outer, registers), 10, f"registered again after {change}")
            result = await alice.call(BOB, ring[2].sip_address(), timeout=10)
            assert result.answered, (change, result.statuses)
            await asyncio.wait_for(calls.get(), 5)
    finally:
        alice.close()
        await ua.close()
        await stack.close()
        nat.close()


async def test_our_user_agent_is_an_outbound_client_and_keeps_its_flow_alive(make_peer: PeerFactory) -> None:
    from p2psip.stack import Stack
    from p2psip.useragent import UserAgent

    ring = await three(make_peer, flow_timer=1)
    stack = await Stack.start(["udp:127.0.0.1:0"])
    host, port = ring[0].sip_address()
    instance = "<urn:uuid:0b0b0b0b-0000-4000-8000-000000000001>"
    ua = UserAgent(stack, BOB, outbound=f"{host}:{port}", instance=instance)
    try:
        ok = await ua.register("sip:p2p.example", expires=600)
        assert ok.get("Require") == "outbound" and ok.get("Flow-Timer") == "1"
        assert ua.outbound_flow("sip:p2p.example") and not ua.outbound_flow("sip:elsewhere.example")
        [binding] = await ring[1].fetch_bindings(BOB)
        assert binding.instance == instance and binding.reg_id == 1
        await asyncio.sleep(4)  # the point: four flow timers; the UA's STUN keep-alives hold the flow
        assert len(await ring[1].fetch_bindings(BOB)) == 1
        assert ring[0].stack.transport.stats["stun_requests"] >= 3
        assert ring[0].counters["flows_failed"] == 0
    finally:
        await ua.close()
        await stack.close()


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_a_phones_tcp_or_tls_connection_is_its_flow_and_its_closing_makes_it_register_again(
    make_peer: PeerFactory, phones: Phones, tmp_path: Path, transport: str
) -> None:
    """RFC 5626 over streams: our outbound UA registers over TCP/TLS; a call entering at another peer
    reaches it over that very connection (the UA accepts none), CRLF keep-alives hold it past several
    Flow-Timers; when the connection closes, the home peer's flow fails (the binding goes) and the UA,
    seeing its flow closed, registers again at once over a new connection and is callable again."""
    from p2psip.config import ListenSpec
    from p2psip.stack import Stack
    from p2psip.transport import TLSConfig

    tls = TLSConfig.self_signed(str(tmp_path))
    assert tls.certfile is not None and tls.keyfile is not None
    listen = [ListenSpec("udp", "127.0.0.1", 0), ListenSpec(transport, "127.0.0.1", 0)]
    certificate = {"tls_cert": Path(tls.certfile), "tls_key": Path(tls.keyfile)}
    home = await make_peer(listen=listen, flow_timer=1, **certificate)
    ring = [home, await make_peer(home), await make_peer(home)]
    await wait_until_settled(ring, timeout=20)
    stack = await Stack.start([f"{transport}:127.0.0.1:0"], tls=tls)
    host, port = home.sip_address(transport)
    ua, calls = outbound_bob(stack, f"{transport}:{host}:{port}", "0000000000c5")
    try:
        ok = await ua.register("sip:p2p.example", expires=600)
        assert ok.get("Require") == "outbound" and ok.get("Flow-Timer") == "1"
        [binding] = await ring[1].fetch_bindings(BOB)
        assert Address(binding.path[0]).uri.user  # reached over its flow (a token), not at its Contact
        [flow] = list(home.flows)
        assert flow.transport == transport and flow.handle is not None
        alice = await phones("alice")
        await asyncio.sleep(3)  # the point: three Flow-Timers; the UA's CRLF keep-alives hold the flow
        assert home.counters["flows_failed"] == 0 and list(home.flows) == [flow]
        result = await alice.call(BOB, ring[2].sip_address(), timeout=10)
        assert result.answered and result.bye_status == 200, result.statuses
        await asyncio.wait_for(calls.get(), 5)
        assert stack.transport.stats["connections_opened"] == 1  # its own, to the home peer: nothing else

        # the connection ends (a NAT forgets it, the home peer restarts...): the flow fails at the home
        # peer, and the UA registers again over a new connection without waiting for a refresh
        old = flow.handle
        old.close()

        async def registered_again() -> bool:
            flows = list(home.flows)
            return (
                len(flows) == 1
                and flows[0].handle not in (None, old)
                and [b.entry_id for b in await ring[1].fetch_bindings(BOB)] == [binding.entry_id]
            )

        await until(registered_again, 5, "the UA did not register again over a new connection")
        assert home.counters["flows_failed"] == 1
        assert stack.transport.stats["connections_opened"] == 2
        again = await alice.call(BOB, ring[2].sip_address(), timeout=10)
        assert again.answered, again.statuses
    finally:
        await ua.close()
        await stack.close()


def test_the_settings_in_docs_nat_md_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import re
    from pathlib import Path

    from p2psip.config import load_config

    text = (Path(__file__).resolve().parents[1] / "docs" / "nat.md").read_text()
    [block] = re.findall(r"```toml\n(.*?)```", text, re.S)
    path = tmp_path / "peer.toml"
    path.write_text(block)
    config = load_config(path)
    assert (config.home_routing, config.flow_timer, config.nat_ping) == (True, 120, 20.0)
