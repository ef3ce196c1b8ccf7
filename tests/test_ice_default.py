"""ICE by default (docs/nat.md, "ICE by default"): a UserAgent registered through its home peer with RFC 5626
outbound (the 200 said ``Require: outbound``) does ICE on its calls with that peer as STUN server, with
nothing in ``media_options``, and so does the callee's. ``{"ice": None}`` turns it off. (An INVITE that
ICE makes larger than 1300 bytes toward a peer listening on UDP only: test_stack.py and the audio lab.)"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from peer_support import wait_until_settled
from test_cli_call_audio import run_cli
from test_media_call import until
from test_peer import ALICE, BOB, PeerFactory

from p2psip.media import MemorySink, ToneSource, dominant_frequency
from p2psip.media.sources import write_wav
from p2psip.sdp import SessionDescription
from p2psip.stack import Stack
from p2psip.useragent import STUN_PROBE_TIMEOUT, IncomingCall, UserAgent

TONES = [440, 1000, 2000]


async def test_registered_through_its_home_peer_a_ua_does_ice_by_default(make_peer: PeerFactory) -> None:
    first = await make_peer()  # UDP only, as make_peer's peers listen
    second = await make_peer(first)
    await wait_until_settled([first, second], timeout=20)
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(3)]
    homes = [first.sip_address(), second.sip_address()]
    outbound = [f"{host}:{port}" for host, port in homes]
    alice = UserAgent(stacks[0], ALICE, outbound=outbound[0], instance=f"<urn:uuid:{uuid.uuid4()}>")
    bob = UserAgent(stacks[1], BOB, outbound=outbound[1], instance=f"<urn:uuid:{uuid.uuid4()}>")
    plain = UserAgent(stacks[2], "sip:carol@p2p.example", outbound=outbound[0])  # no RFC 5626 instance
    heard_a, heard_b = MemorySink(), MemorySink()
    answered: asyncio.Queue[IncomingCall] = asyncio.Queue()

    async def answer(incoming: IncomingCall) -> None:
        await incoming.accept_with_media(play=ToneSource(1000), record=heard_b)
        answered.put_nowait(incoming)

    bob.on_call = lambda incoming: asyncio.ensure_future(answer(incoming)) and None
    try:
        for ua in (alice, bob, plain):
            await ua.register("sip:p2p.example", expires=600)
        assert alice.stun_server is not None and (alice.stun_server.host, alice.stun_server.port) == homes[0]
        assert plain.stun_server is None  # not an outbound registration: no ICE unless asked for

        call = await alice.call(BOB, play=ToneSource(440), record=heard_a, timeout=20)
        incoming = await asyncio.wait_for(answered.get(), 20)
        offer = incoming.request.body
        kinds = [c.split()[7] for c in SessionDescription.parse(offer).media[0].attribute_values("candidate")]
        assert b"a=ice-ufrag:" in offer and "srflx" in kinds, offer
        assert b"a=ice-ufrag:" in call.response.body  # bob answered with ICE too, by default
        assert call.media is not None and call.media.ice is not None and incoming.media is not None
        assert call.media.ice.settings.stun == homes[0]
        await until(lambda: len(heard_a.pcm) > 16000 and len(heard_b.pcm) > 16000)
        assert call.media.ice.state == "connected"
        assert dominant_frequency(heard_b.pcm[-8000:], TONES) == 440
        assert dominant_frequency(heard_a.pcm[-8000:], TONES) == 1000
        assert (await call.bye()).status == 200

        # {"ice": None}: this call offers no ICE
        call = await alice.call(BOB, play=ToneSource(440), timeout=20, media_options={"ice": None})
        incoming = await asyncio.wait_for(answered.get(), 20)
        assert b"a=ice-ufrag" not in incoming.request.body
        assert call.media is not None and call.media.ice is None
        assert (await call.bye()).status == 200
    finally:
        for ua in (alice, bob, plain):
            await ua.close()
        for stack in stacks:
            await stack.close()


async def test_p2psip_call_does_ice_by_default_through_a_peer(make_peer: PeerFactory, tmp_path: Path) -> None:
    """``p2psip call --play`` makes a UA with an RFC 5626 instance; not registered, it asks its ``--via``
    once for STUN (UserAgent._probe_outbound): a peer answers, so the offer carries ICE with a srflx
    candidate from that peer. Toward a UA that does not speak STUN the offer has no ICE
    (test_cli_call_audio.py)."""
    peer = await make_peer()
    host, port = peer.sip_address()
    stack = await Stack.start(["udp:127.0.0.1:0"])
    bob = UserAgent(stack, BOB, outbound=f"{host}:{port}", instance=f"<urn:uuid:{uuid.uuid4()}>")
    offers: asyncio.Queue[bytes] = asyncio.Queue()

    async def answer(incoming: IncomingCall) -> None:
        offers.put_nowait(incoming.request.body)
        await incoming.accept_with_media(play=ToneSource(1000))

    bob.on_call = lambda incoming: asyncio.ensure_future(answer(incoming)) and None
    play = tmp_path / "say.wav"
    write_wav(play, ToneSource(440, duration=0.5))
    try:
        await bob.register("sip:p2p.example", expires=600)
        asked = peer.stack.transport.stats["stun_requests"]
        code, out, err = await run_cli(
            "call", BOB, "--via", f"{host}:{port}", "--from", ALICE, "--play", str(play), "--json"
        )
        assert code == 0, out + err
        offer = await asyncio.wait_for(offers.get(), 10)
        kinds = [c.split()[7] for c in SessionDescription.parse(offer).media[0].attribute_values("candidate")]
        assert b"a=ice-ufrag:" in offer and "srflx" in kinds, offer
        assert peer.stack.transport.stats["stun_requests"] > asked  # the probe and ICE's own request
    finally:
        await bob.close()
        await stack.close()


async def test_an_outbound_proxy_without_stun_is_asked_once() -> None:
    """A UA with an instance whose unregistered outbound proxy does not answer STUN (sipp, a Kamailio
    without it) makes no ICE offer: it asks once, waits STUN_PROBE_TIMEOUT, and never again (no call waits
    for ICE gathering's STUN timeout)."""
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Silent(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            received.put_nowait(data)

    silent, _ = await loop.create_datagram_endpoint(Silent, local_addr=("127.0.0.1", 0))
    host, port = silent.get_extra_info("sockname")
    stack = await Stack.start(["udp:127.0.0.1:0"])
    ua = UserAgent(stack, ALICE, outbound=f"{host}:{port}", instance=f"<urn:uuid:{uuid.uuid4()}>")
    try:
        started = loop.time()
        assert await ua._default_ice(None) is None  # what call/accept_with_media use: no ICE
        assert STUN_PROBE_TIMEOUT <= loop.time() - started < STUN_PROBE_TIMEOUT + 1
        assert (await asyncio.wait_for(received.get(), 1))[:2] == b"\x00\x01"  # one STUN binding request
        started = loop.time()
        assert await ua._default_ice({"codecs": ("PCMU",)}) == {"codecs": ("PCMU",)}
        assert loop.time() - started < 0.1 and received.empty()  # not asked again
    finally:
        await ua.close()
        await stack.close()
        silent.close()
