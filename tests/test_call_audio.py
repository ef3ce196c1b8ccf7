"""Calls with audio through the UserAgent API (p2psip.callaudio): our UA calls our UA through a 3-peer
overlay with a 1 kHz tone (Goertzel peak and duration checked at the far end), hold and resume by
re-INVITE, DTMF both ways, BYE closing the media, bad SDP answered 488, SIP over TCP and IPv6."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from peer_interop.helpers import start_overlay, stop_overlay
from test_media_call import until

from p2psip.errors import ConfigError
from p2psip.media import CallMedia, MemorySink, ToneSource, dominant_frequency, goertzel_power
from p2psip.media.sources import read_wav, write_wav
from p2psip.message import Response
from p2psip.peer import Peer
from p2psip.stack import Stack
from p2psip.useragent import CallFailed, IncomingCall, OutgoingCall, UserAgent

CANDIDATES = [300, 500, 700, 1000, 1500, 2000]


def assert_peak(pcm: bytes, frequency: int) -> None:
    assert dominant_frequency(pcm, CANDIDATES) == frequency
    others = max(goertzel_power(pcm, f) for f in CANDIDATES if f != frequency)
    assert goertzel_power(pcm, frequency) > 20 * others


async def next_call(ua: UserAgent, timeout: float = 20.0) -> IncomingCall:
    return await asyncio.wait_for(ua.incoming.get(), timeout)


@pytest.fixture
async def overlay(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_overlay(3, tmp_path, settle_timeout=30)
    try:
        yield peers
    finally:
        await stop_overlay(peers)


@pytest.fixture
async def stacks() -> AsyncIterator[list[Stack]]:
    opened: list[Stack] = []
    try:
        for _ in range(2):
            opened.append(await Stack.start(["udp:127.0.0.1:0"]))
        yield opened
    finally:
        for stack in opened:
            await stack.close()


def uri_of(stack: Stack, user: str) -> str:
    host, port = stack.local_address("udp")
    return f"sip:{user}@{host}:{port}"


async def test_ua_calls_ua_through_a_three_peer_overlay_with_a_tone(
    overlay: list[Peer], stacks: list[Stack], tmp_path: Path
) -> None:
    def via(peer: Peer) -> str:
        host, port = peer.sip_address()
        return f"{host}:{port}"

    alice = UserAgent(stacks[0], "sip:alice@p2p.example", outbound=via(overlay[0]))
    bob = UserAgent(stacks[1], "sip:bob@p2p.example", outbound=via(overlay[2]))
    assert (await bob.register(f"sip:{via(overlay[2])}", expires=300, refresh=False)).status == 200
    hello = write_wav(tmp_path / "hello.wav", ToneSource(1000, duration=1.0))

    async def answer() -> IncomingCall:
        incoming = await next_call(bob)
        incoming.ring()
        await incoming.accept_with_media(play=ToneSource(500), record=tmp_path / "bob.wav")
        return incoming

    answering = asyncio.ensure_future(answer())
    call = await alice.call("sip:bob@p2p.example", play=hello, record=tmp_path / "alice.wav", timeout=20)
    incoming = await asyncio.wait_for(answering, 20)
    assert call.media is not None and incoming.media is not None
    assert call.media.params is not None and call.media.params.codec == "PCMU"
    assert len(call.response.get_all("Record-Route")) >= 1  # the call went through the overlay's proxies
    await asyncio.wait_for(call.media.session.source_done, 20)  # the whole second has been sent
    assert (await call.bye()).status == 200
    assert call.media.session.closed  # BYE sent: our media is closed ...
    assert await incoming.wait_ended(20) == "bye received"
    assert incoming.media.session.closed  # ... and BYE received: theirs too, recording finished
    heard = read_wav(tmp_path / "bob.wav")
    assert abs(len(heard) / 16000 - 1.0) <= 0.05, len(heard) / 16000
    assert_peak(heard, 1000)
    assert_peak(read_wav(tmp_path / "alice.wav"), 500)
    await alice.close()
    await bob.close()


async def test_hold_resume_and_dtmf_both_ways(stacks: list[Stack]) -> None:
    alice = UserAgent(stacks[0], "sip:alice@127.0.0.1")
    bob = UserAgent(stacks[1], "sip:bob@127.0.0.1")
    heard_by_alice, heard_by_bob = MemorySink(), MemorySink()

    async def answer() -> IncomingCall:
        incoming = await next_call(bob)
        await incoming.accept_with_media(play=ToneSource(500), record=heard_by_bob)
        return incoming

    answering = asyncio.ensure_future(answer())
    call = await alice.call(
        uri_of(stacks[1], "bob"), play=ToneSource(1000), record=heard_by_alice, timeout=20
    )
    incoming = await asyncio.wait_for(answering, 20)
    assert call.media is not None and incoming.media is not None
    ours, theirs = call.media.session, incoming.media.session
    await until(lambda: ours.stats.packets_received > 10 and theirs.stats.packets_received > 10)

    await asyncio.wait_for(call.send_dtmf("12#"), 20)
    assert await theirs.wait_digits(3, timeout=20) == "12#"
    await asyncio.wait_for(incoming.send_dtmf("*9"), 20)
    assert await ours.wait_digits(2, timeout=20) == "*9"

    # alice holds: her re-INVITE offers sendonly, bob answers recvonly and stops sending
    assert (await call.hold(timeout=20)).status == 200
    assert call.media.params is not None and call.media.params.direction == "sendonly"
    assert not theirs.send_enabled and ours.send_enabled
    sent = theirs.stats.packets_sent
    received = theirs.stats.packets_received
    await until(lambda: theirs.stats.packets_received > received + 25)  # time passes, in alice's packets
    assert theirs.stats.packets_sent == sent

    # resumed: both send again
    assert (await call.resume(timeout=20)).status == 200
    assert theirs.send_enabled
    await until(lambda: theirs.stats.packets_sent > sent + 10)

    # bob holds from his side (a re-INVITE inside the dialog he answered), then resumes
    assert (await incoming.hold(timeout=20)).status == 200
    assert not ours.send_enabled and theirs.send_enabled
    assert (await incoming.resume(timeout=20)).status == 200
    assert ours.send_enabled

    # bob hangs up: both media close, the recordings hold each other's tone
    assert (await incoming.bye()).status == 200
    assert await call.wait_ended(20) == "bye received"
    assert ours.closed and theirs.closed
    assert_peak(bytes(heard_by_bob.pcm), 1000)
    assert_peak(bytes(heard_by_alice.pcm), 500)
    await alice.close()
    await bob.close()


async def test_bad_sdp_is_answered_488(stacks: list[Stack]) -> None:
    alice = UserAgent(stacks[0], "sip:alice@127.0.0.1")
    bob = UserAgent(stacks[1], "sip:bob@127.0.0.1")
    target = uri_of(stacks[1], "bob")

    # an INVITE whose SDP is nonsense: accept_with_media declines it with 488
    answering = asyncio.ensure_future(next_call(bob))
    placing = asyncio.ensure_future(alice.call(target, body=b"v=0\r\nnonsense\r\n", timeout=20))
    incoming = await answering
    with pytest.raises(CallFailed) as refused:
        await incoming.accept_with_media()
    assert refused.value.status == 488
    with pytest.raises(CallFailed) as failed:
        await placing
    assert failed.value.status == 488

    # an offer with no codec in common: 488 as well
    only_pcma = await CallMedia.open("127.0.0.1", codecs=("PCMA",))
    answering = asyncio.ensure_future(next_call(bob))
    placing = asyncio.ensure_future(alice.call(target, media=only_pcma, timeout=20))
    incoming = await answering
    with pytest.raises(CallFailed):
        await incoming.accept_with_media(media_options={"codecs": ("PCMU",)})
    with pytest.raises(CallFailed) as failed:
        await placing
    assert failed.value.status == 488 and only_pcma.session.closed

    # a call with audio that gets a bad re-offer: 488, and the media goes on as before
    answering = asyncio.ensure_future(next_call(bob))
    placing = asyncio.ensure_future(alice.call(target, play=ToneSource(1000), timeout=20))
    incoming = await answering
    media = await incoming.accept_with_media(record=MemorySink())
    call: OutgoingCall = await placing
    response = await call.send("INVITE", body=b"v=0\r\nbroken\r\n", content_type="application/sdp")
    assert response.status == 488
    before = media.session.stats.packets_received
    await until(lambda: media.session.stats.packets_received > before + 5)
    await call.bye()
    assert await incoming.wait_ended(20) == "bye received" and media.session.closed
    await alice.close()
    await bob.close()


@pytest.mark.parametrize(("transport", "host"), [("tcp", "127.0.0.1"), ("udp", "::1")], ids=["tcp", "ipv6"])
async def test_audio_with_sip_over_tcp_and_over_ipv6(transport: str, host: str) -> None:
    shown = f"[{host}]" if ":" in host else host
    try:
        a = await Stack.start([f"{transport}:{shown}:0"])
    except ConfigError:  # no IPv6 on this machine
        pytest.skip(f"cannot listen on {host}")
    b = await Stack.start([f"{transport}:{shown}:0"])
    try:
        alice = UserAgent(a, f"sip:alice@{shown}")
        bob = UserAgent(b, f"sip:bob@{shown}")
        port = b.local_address(transport)[1]
        param = ";transport=tcp" if transport == "tcp" else ""
        heard = MemorySink()

        async def answer() -> IncomingCall:
            incoming = await next_call(bob)
            await incoming.accept_with_media(record=heard)
            return incoming

        answering = asyncio.ensure_future(answer())
        call = await alice.call(f"sip:bob@{shown}:{port}{param}", play=ToneSource(1000), timeout=20)
        incoming = await asyncio.wait_for(answering, 20)
        assert call.media is not None and incoming.media is not None
        assert call.media.params is not None and call.media.params.remote[0] == host  # c= names our host
        await until(lambda: len(heard.pcm) >= 320 * 25)
        await call.bye()
        assert await incoming.wait_ended(20) == "bye received"
        assert_peak(bytes(heard.pcm), 1000)
    finally:
        await a.close()
        await b.close()


async def test_a_re_invite_without_offer_gets_our_offer_and_the_ack_answers_it(stacks: list[Stack]) -> None:
    alice = UserAgent(stacks[0], "sip:alice@127.0.0.1")
    bob = UserAgent(stacks[1], "sip:bob@127.0.0.1")
    answering = asyncio.ensure_future(next_call(bob))
    placing = asyncio.ensure_future(alice.call(uri_of(stacks[1], "bob"), play=ToneSource(1000), timeout=20))
    incoming = await answering
    bob_media = await incoming.accept_with_media(play=ToneSource(500))
    call = await placing
    assert call.media is not None and call.dialog is not None
    assert (await incoming.hold(timeout=20)).status == 200  # bob holds
    # alice sends a re-INVITE with no body (a session refresh): bob offers in the 200, still holding
    response = await call.send("INVITE", timeout=20)
    assert response.status == 200 and b"a=sendonly" in response.body and bob_media.offer_pending
    answer = call.media.answer(response.body)  # alice's answer ...
    assert b"a=recvonly" in answer
    ack = call.dialog.create_ack(response, body=answer, content_type="application/sdp")
    alice._send_ack(ack)  # ... goes in the ACK (our UA sends body-less ACKs itself: built by hand here)
    await until(lambda: not bob_media.offer_pending)
    assert bob_media.params is not None and bob_media.params.direction == "sendonly"
    assert bob_media.session.send_enabled and not call.media.session.send_enabled
    await call.bye()
    assert await incoming.wait_ended(20) == "bye received"


async def test_body_and_media_together_are_refused(stacks: list[Stack]) -> None:
    alice = UserAgent(stacks[0], "sip:alice@127.0.0.1")
    with pytest.raises(ValueError, match="not both"):
        await alice.call(uri_of(stacks[1], "bob"), body=b"v=0\r\n", play=ToneSource(1000))
    assert stacks[0].stats["sent"] == 0  # nothing went out


@pytest.mark.parametrize("with_audio", [False, True])
async def test_on_provisional_sees_each_1xx_before_the_call_returns(
    stacks: list[Stack], with_audio: bool
) -> None:
    """on_provisional is called as 100 and 180 arrive (what `p2psip call` prints), with or without audio,
    and an exception in it does not break the call."""
    alice = UserAgent(stacks[0], "sip:alice@127.0.0.1")
    bob = UserAgent(stacks[1], "sip:bob@127.0.0.1")
    seen: list[int] = []
    rang = asyncio.Event()

    def provisional(response: Response) -> None:
        seen.append(response.status)
        if response.status == 180:
            rang.set()
            raise RuntimeError("a careless callback")

    async def answer() -> None:
        incoming = await next_call(bob)
        incoming.ring()
        await asyncio.wait_for(rang.wait(), 20)  # the 180 reached alice's callback before the answer
        if with_audio:
            await incoming.accept_with_media()
        else:
            incoming.accept()

    answering = asyncio.ensure_future(answer())
    media = {"record": MemorySink()} if with_audio else {}
    call = await alice.call(uri_of(stacks[1], "bob"), timeout=20, on_provisional=provisional, **media)
    await asyncio.wait_for(answering, 20)
    assert seen == [100, 180] and [r.status for r in call.provisional] == [100, 180]
    assert (call.media is not None) == with_audio
    assert (await call.bye()).status == 200
