"""A full peer runs the TURN server (``turn = "HOST:PORT"`` / ``--turn``): two calls' media relayed through
it with credentials from its kept key, the quota refusal, and both counted in its status; a call's
allocations end with its dialog however it ends; DTLS-SRTP SDP crosses TURN peers untouched."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from peer_support import wait_until_settled
from test_media_call import until
from test_media_ice import talk
from test_peer import ALICE, BOB, PeerFactory

from overlay.localring import quick_node_config
from p2psip.config import HostPort, ListenSpec, PeerConfig, UserAccount, load_config
from p2psip.errors import CallFailed, ConfigError
from p2psip.media import CallMedia, MemorySink, ToneSource
from p2psip.media.ice import IceSettings
from p2psip.peer import TURN_SECRET, Peer, flow_secret
from p2psip.stack import Stack
from p2psip.turn import issue_credentials
from p2psip.useragent import IncomingCall, UserAgent


def settings(peer: Peer, user: str) -> IceSettings:
    secret = flow_secret(Path(peer.config.data_dir), TURN_SECRET)  # the key the peer keeps in its data dir
    assert secret is not None and peer.turn is not None
    username, password = issue_credentials(secret, user, time.time())
    return IceSettings(
        turn=peer.turn.address, turn_username=username, turn_password=password, relay_only=True
    )


async def start_turn_peer(tmp_path: Path, **limits: int) -> Peer:
    """A lone peer on loopback running a TURN server, with the given ``turn_*`` limits."""
    config = PeerConfig(
        listen=[ListenSpec("udp", "127.0.0.1", 0)],
        overlay=HostPort("127.0.0.1", 0),
        data_dir=tmp_path / "p1",
        turn=HostPort("127.0.0.1", 0),
        **limits,
    )
    return await Peer.start(config, node_config=quick_node_config())


async def test_a_peer_relays_call_audio_and_counts_refusals_in_status(tmp_path: Path) -> None:
    peer = await start_turn_peer(tmp_path, turn_per_user=1)
    try:
        heard_a, heard_b = MemorySink(), MemorySink()
        a = await CallMedia.open("127.0.0.1", play=ToneSource(440), record=heard_a, ice=settings(peer, "ua"))
        b = await CallMedia.open(
            "127.0.0.1", play=ToneSource(1000), record=heard_b, ice=settings(peer, "alice")
        )
        try:
            await talk(a, b, heard_a, heard_b)
            assert a.ice is not None and a.ice.relayed
            with pytest.raises(ConnectionError, match="TURN server refused"):
                await CallMedia.open("127.0.0.1", ice=settings(peer, "alice"))  # alice's second: over quota
        finally:
            await a.close()
            await b.close()
        status = peer.status()
        assert peer.turn is not None and status["turn"] == f"127.0.0.1:{peer.turn.address[1]}"
        counters = status["counters"]
        assert counters["turn_relayed_packets"] > 100
        assert counters["turn_refused_quota"] == 1
        assert counters["turn_allocations_granted"] == 2
        # every kind of refusal and drop has its counter in the status, zero or not
        for kind in ("refused_capacity", "refused_auth", "refused_other", "dropped_unpermitted",
                     "dropped_bandwidth", "dropped_malformed"):  # fmt: skip
            assert counters[f"turn_{kind}"] == 0, kind
    finally:
        await peer.close(leave=False)


async def test_the_per_source_bound_comes_from_the_config(tmp_path: Path) -> None:
    """``turn_per_source``: two users behind one address (here 127.0.0.1) share its allocations."""
    peer = await start_turn_peer(tmp_path, turn_per_source=1)
    try:
        first = await CallMedia.open("127.0.0.1", ice=settings(peer, "ua"))
        try:
            with pytest.raises(ConnectionError, match="TURN server refused"):
                await CallMedia.open("127.0.0.1", ice=settings(peer, "alice"))  # another user, same source
            assert peer.turn is not None and peer.turn.core.counters["refused_quota"] == 1
        finally:
            await first.close()
    finally:
        await peer.close(leave=False)


def test_turn_settings_in_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text(
        'turn = "127.0.0.1:3478"\nturn_per_user = 2\nturn_per_source = 9\nturn_max_allocations = 50\n'
    )
    config = load_config(path, {})
    assert config.turn == HostPort("127.0.0.1", 3478)
    assert (config.turn_per_user, config.turn_per_source, config.turn_max_allocations) == (2, 9, 50)
    path.write_text("turn_per_user = 0\n")
    with pytest.raises(ConfigError, match="turn_per_user = 0 is out of range"):
        load_config(path, {})
    assert load_config(None, {"turn": "127.0.0.1:3479"}).turn == HostPort("127.0.0.1", 3479)


# A browser's offer and answer (DTLS-SRTP, its own ICE): what a TURN-running peer must never touch.
WEBRTC_OFFER = (
    b"v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    b"a=group:BUNDLE 0\r\na=msid-semantic: WMS\r\n"
    b"m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n"
    b"a=candidate:1 1 udp 2122260223 192.168.1.20 51000 typ host generation 0\r\n"
    b"a=candidate:2 1 udp 1686052607 198.51.100.7 51000 typ srflx raddr 192.168.1.20 rport 51000\r\n"
    b"a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\na=ice-options:trickle\r\n"
    b"a=fingerprint:sha-256 D2:FA:0E:C3:22:59:5E:14:95:69:92:3D:13:B4:84:24:"
    b"2C:C2:A2:C0:3E:FD:34:8E:5E:EA:6F:AF:52:CE:E6:0F\r\n"
    b"a=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\n"
    b"a=rtpmap:111 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n"
)
WEBRTC_ANSWER = (
    WEBRTC_OFFER.replace(b"a=setup:actpass", b"a=setup:active")
    .replace(b"EsAw", b"Kq7z")
    .replace(b"192.168.1.20", b"10.0.0.5")
)


async def test_dtls_srtp_sdp_crosses_turn_peers_byte_for_byte(make_peer: PeerFactory) -> None:
    """docs/nat.md: with TURN in full peers no peer rewrites SDP, so a WebRTC offer and answer
    (``UDP/TLS/RTP/SAVPF``, ``a=fingerprint``, the browser's own ICE) cross two peers that both run a
    TURN server exactly as sent, and no allocation is made on the call's behalf."""
    first = await make_peer(turn=HostPort("127.0.0.1", 0))
    second = await make_peer(first, turn=HostPort("127.0.0.1", 0))
    await wait_until_settled([first, second], timeout=20)
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    homes = [first.sip_address(), second.sip_address()]
    alice = UserAgent(stacks[0], ALICE, outbound=f"{homes[0][0]}:{homes[0][1]}")
    bob = UserAgent(stacks[1], BOB, outbound=f"{homes[1][0]}:{homes[1][1]}")
    offers: asyncio.Queue[bytes] = asyncio.Queue()

    def answer(incoming: IncomingCall) -> None:
        offers.put_nowait(incoming.request.body)
        incoming.accept(WEBRTC_ANSWER)

    bob.on_call = answer
    try:
        for ua in (alice, bob):
            await ua.register("sip:p2p.example", expires=600)
        call = await alice.call(BOB, body=WEBRTC_OFFER, timeout=20)
        assert await asyncio.wait_for(offers.get(), 5) == WEBRTC_OFFER
        assert call.response.body == WEBRTC_ANSWER
        assert (await call.bye()).status == 200
        for peer in (first, second):
            assert peer.turn is not None and peer.turn.core.stats()["allocations_granted"] == 0
    finally:
        for ua in (alice, bob):
            await ua.close()
        for stack in stacks:
            await stack.close()


async def test_a_calls_relays_are_torn_down_however_its_dialog_ends(make_peer: PeerFactory) -> None:
    """Two UAs with accounts get TURN credentials from their home peer and gather a relayed candidate on
    every call by default. Each way a dialog ends frees the allocations it took at the peer: the callee's
    BYE, the callee's refusal (486) and the caller's CANCEL."""
    peer = await make_peer(
        users={
            ALICE: UserAccount(ALICE, "wonderland", "alice"),
            BOB: UserAccount(BOB, "builder", "bob"),
        },
        turn=HostPort("127.0.0.1", 0),
    )
    assert peer.turn is not None
    host, port = peer.sip_address()
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    alice, bob = (
        UserAgent(stack, aor, outbound=f"{host}:{port}", instance=f"<urn:uuid:{uuid.uuid4()}>",
                  username=user, password=password)
        for stack, aor, user, password in ((stacks[0], ALICE, "alice", "wonderland"),
                                           (stacks[1], BOB, "bob", "builder"))
    )  # fmt: skip
    incoming_calls: asyncio.Queue[IncomingCall] = asyncio.Queue()
    mode = {"answer": True}

    async def answer(incoming: IncomingCall) -> None:
        if mode["answer"]:
            await incoming.accept_with_media(play=ToneSource(1000))
        incoming_calls.put_nowait(incoming)

    bob.on_call = lambda incoming: asyncio.ensure_future(answer(incoming)) and None

    def allocations() -> int:
        return int(peer.status()["counters"]["turn_allocations"])

    try:
        for ua in (alice, bob):
            await ua.register("sip:p2p.example", expires=600)
            assert ua.turn_grant is not None
        # the callee hangs up
        call = await alice.call(BOB, play=ToneSource(440), timeout=20)
        incoming = await asyncio.wait_for(incoming_calls.get(), 20)
        assert call.media is not None and call.media.ice is not None and not call.media.ice.relay_missing
        assert allocations() == 2  # one per end
        assert (await incoming.bye()).status == 200
        assert await call.wait_ended(20) == "bye received"
        await until(lambda: allocations() == 0, 10)

        # the callee refuses the call
        mode["answer"] = False
        placing = asyncio.ensure_future(alice.call(BOB, play=ToneSource(440), timeout=20))
        incoming = await asyncio.wait_for(incoming_calls.get(), 20)
        assert allocations() == 1  # the caller's, for its offer
        incoming.reject(486)
        with pytest.raises(CallFailed) as failed:
            await placing
        assert failed.value.status == 486
        await until(lambda: allocations() == 0, 10)

        # the caller gives up while it rings (its timeout): CANCEL
        placing = asyncio.ensure_future(alice.call(BOB, play=ToneSource(440), timeout=3))
        incoming = await asyncio.wait_for(incoming_calls.get(), 20)
        incoming.ring()
        assert allocations() == 1
        with pytest.raises(CallFailed) as failed:
            await placing
        assert failed.value.status == 487
        assert await incoming.wait_ended(20) == "cancelled"
        await until(lambda: allocations() == 0, 10)
        assert peer.status()["counters"]["turn_allocations_granted"] == 4
    finally:
        for ua in (alice, bob):
            await ua.close()
        for stack in stacks:
            await stack.close()
