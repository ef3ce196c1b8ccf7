"""ICE for call audio (p2psip.media.ice through CallMedia) on loopback: offers and answers carry RFC 8839
attributes; two ICE ends find the direct (host) pair; forced through our TURN server they find the
relayed pair; a far end without ICE gets audio at its c=/m= (fallback); a relay allocation beyond the
quota fails the call's set-up with a clear error and is counted. Tones are checked by frequency both ways."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_media_call import until

from p2psip.media import CallMedia, MemorySink, ToneSource, dominant_frequency
from p2psip.media.ice import IceSettings, settings_for_offer
from p2psip.sdp import IceDescription, SessionDescription
from p2psip.stack import Stack
from p2psip.turn import TurnLimits, issue_credentials
from p2psip.turnserver import TurnServer
from p2psip.useragent import IncomingCall, OutgoingCall, UserAgent

SECRET = b"media-ice-secret"
TONES = [440, 1000, 2000]


async def talk(
    caller: CallMedia, callee: CallMedia, heard_by_caller: MemorySink, heard_by_callee: MemorySink
) -> None:
    offer = caller.offer()
    answer = callee.answer(offer)
    caller.accept_answer(answer)
    await until(lambda: len(heard_by_caller.pcm) > 16000 and len(heard_by_callee.pcm) > 16000)
    assert dominant_frequency(heard_by_callee.pcm[-8000:], TONES) == 440
    assert dominant_frequency(heard_by_caller.pcm[-8000:], TONES) == 1000


async def ua_call(
    alice: UserAgent,
    bob: UserAgent,
    bob_at: tuple[str, int],
    ice_a: IceSettings,
    ice_b: IceSettings,
    heard_a: MemorySink,
    heard_b: MemorySink,
) -> tuple[OutgoingCall, IncomingCall]:
    """alice (440 Hz) calls bob (1 kHz) with ICE on both sides; returns both ends once answered."""

    async def answer() -> IncomingCall:
        incoming = await asyncio.wait_for(bob.incoming.get(), 20)
        assert b"a=ice-ufrag:" in incoming.request.body
        await incoming.accept_with_media(play=ToneSource(1000), record=heard_b, media_options={"ice": ice_b})
        return incoming

    answering = asyncio.ensure_future(answer())
    call = await alice.call(
        f"sip:bob@{bob_at[0]}:{bob_at[1]}",
        play=ToneSource(440),
        record=heard_a,
        timeout=20,
        media_options={"ice": ice_a},
    )
    return call, await asyncio.wait_for(answering, 20)


async def hang_up(call: OutgoingCall, incoming: IncomingCall) -> None:
    assert (await call.bye()).status == 200
    assert await incoming.wait_ended(20) == "bye received"


async def close_all(uas: list[UserAgent], stacks: list[Stack]) -> None:
    for ua in uas:
        await ua.close()
    for stack in stacks:
        await stack.close()


def turn_settings(server: TurnServer, user: str) -> IceSettings:
    username, password = issue_credentials(SECRET, user, time.time())
    return IceSettings(turn=server.address, turn_username=username, turn_password=password, relay_only=True)


async def test_offer_carries_ice_and_two_ice_ends_take_the_direct_path() -> None:
    heard_a, heard_b = MemorySink(), MemorySink()
    a = await CallMedia.open("127.0.0.1", play=ToneSource(440), record=heard_a, ice=IceSettings())
    b = await CallMedia.open("127.0.0.1", play=ToneSource(1000), record=heard_b, ice=IceSettings())
    try:
        offer = SessionDescription.parse(a.offer())
        ice = IceDescription.of(offer, offer.media[0])
        assert ice is not None and ice.end_of_candidates and any(" typ host" in c for c in ice.candidates)
        assert offer.media[0].attribute("rtcp-mux") is not None
        assert a.ice is not None and offer.media[0].port == a.ice.default.port  # c=/m= is a candidate
        await talk(a, b, heard_a, heard_b)
        assert a.ice is not None and b.ice is not None
        assert a.ice.state == b.ice.state == "connected"
        assert not a.ice.relayed and not b.ice.relayed
        assert a.ice.agent.ice_controlling and not b.ice.agent.ice_controlling
    finally:
        await a.close()
        await b.close()


async def test_through_the_turn_server_the_relayed_pair_carries_the_tones() -> None:
    async with TurnServer(SECRET) as server:
        heard_a, heard_b = MemorySink(), MemorySink()
        a = await CallMedia.open(
            "127.0.0.1", play=ToneSource(440), record=heard_a, ice=turn_settings(server, "ua")
        )
        b = await CallMedia.open(
            "127.0.0.1", play=ToneSource(1000), record=heard_b, ice=turn_settings(server, "alice")
        )
        try:
            offer = SessionDescription.parse(a.offer())
            assert [c.split()[7] for c in offer.media[0].attribute_values("candidate")] == ["relay"]
            await talk(a, b, heard_a, heard_b)
            assert a.ice is not None and b.ice is not None
            assert a.ice.relayed and b.ice.relayed
            assert server.core.stats()["relayed_packets"] > 100
        finally:
            await a.close()
            await b.close()


async def test_far_end_without_ice_gets_audio_at_its_c_line() -> None:
    heard_a, heard_b = MemorySink(), MemorySink()
    a = await CallMedia.open("127.0.0.1", play=ToneSource(440), record=heard_a, ice=IceSettings())
    b = await CallMedia.open("127.0.0.1", play=ToneSource(1000), record=heard_b)  # no ICE: ignores candidates
    try:
        await talk(a, b, heard_a, heard_b)
        assert a.ice is not None and a.ice.state == "fallback"
        assert b.session.remote == (a.ice.default.host, a.ice.default.port)
    finally:
        await a.close()
        await b.close()


async def test_an_allocation_beyond_the_quota_fails_the_call_set_up_cleanly() -> None:
    async with TurnServer(SECRET, limits=TurnLimits(per_user=1)) as server:
        first = await CallMedia.open("127.0.0.1", ice=turn_settings(server, "alice"))
        try:
            with pytest.raises(ConnectionError, match="TURN server refused"):
                await CallMedia.open("127.0.0.1", ice=turn_settings(server, "alice"))
            assert server.core.stats()["refused_quota"] == 1
            assert server.core.stats()["allocations"] == 1
        finally:
            await first.close()
        await until(lambda: server.core.stats()["allocations"] == 0, 5)


async def test_user_agents_call_over_the_relay_hold_resume_and_bye_frees_it() -> None:
    """UserAgent.call / accept_with_media with media_options={"ice": ...}: the INVITE and the 200 carry
    ICE, audio runs over relayed candidates, hold/resume re-INVITEs keep the selected pair, and the BYE
    deletes both allocations."""

    async with TurnServer(SECRET) as server:
        stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
        alice = UserAgent(stacks[0], "sip:alice@127.0.0.1")
        bob = UserAgent(stacks[1], "sip:bob@127.0.0.1")
        heard_a, heard_b = MemorySink(), MemorySink()
        try:
            call, incoming = await ua_call(
                alice,
                bob,
                stacks[1].local_address("udp"),
                turn_settings(server, "alice"),
                turn_settings(server, "bob"),
                heard_a,
                heard_b,
            )
            assert b"a=ice-ufrag:" in call.response.body
            await until(lambda: len(heard_a.pcm) > 16000 and len(heard_b.pcm) > 16000)
            assert dominant_frequency(heard_b.pcm[-8000:], TONES) == 440
            assert dominant_frequency(heard_a.pcm[-8000:], TONES) == 1000
            assert call.media is not None and call.media.ice is not None and call.media.ice.relayed
            selected = call.media.ice.selected
            assert (await call.hold(timeout=20)).status == 200
            assert (await call.resume(timeout=20)).status == 200
            assert call.media.ice.selected == selected and call.media.ice.state == "connected"
            before = len(heard_b.pcm)
            await until(lambda: len(heard_b.pcm) > before + 8000)
            assert dominant_frequency(heard_b.pcm[-8000:], TONES) == 440
            assert (await call.bye()).status == 200
            assert await incoming.wait_ended(20) == "bye received"
            await until(lambda: server.core.stats()["allocations"] == 0, 10)
        finally:
            await alice.close()
            await bob.close()
            for stack in stacks:
                await stack.close()


async def test_a_user_agent_with_an_outbound_peer_gathers_srflx_from_its_sip_port() -> None:
    """ICE on, no STUN server named, an ``outbound`` peer: the peer's SIP UDP port is the STUN server.
    The offer carries a srflx candidate and the binding request is counted at that port; a UA that
    names its own STUN server keeps it (home_stun leaves it alone)."""
    from p2psip.callaudio import home_stun
    from p2psip.stack import Target

    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    host, port = stacks[1].local_address("udp")
    alice = UserAgent(stacks[0], "sip:alice@127.0.0.1", outbound=f"{host}:{port}")
    bob = UserAgent(stacks[1], "sip:bob@127.0.0.1")
    heard_a, heard_b = MemorySink(), MemorySink()
    own = {"ice": IceSettings(stun=("127.0.0.9", 3478))}
    assert home_stun(own, Target("udp", host, port)) == own
    assert home_stun({}, Target("udp", host, port)) == {}
    try:
        before = stacks[1].transport.stats["stun_requests"]

        call, incoming = await ua_call(
            alice, bob, stacks[1].local_address("udp"), IceSettings(), IceSettings(), heard_a, heard_b
        )
        offer = SessionDescription.parse(incoming.request.body)
        kinds = [c.split()[7] for c in offer.media[0].attribute_values("candidate")]
        assert "srflx" in kinds and "host" in kinds
        assert stacks[1].transport.stats["stun_requests"] > before
        assert call.media is not None and call.media.ice is not None
        assert call.media.ice.settings.stun == (host, port)
        await until(lambda: len(heard_a.pcm) > 8000 and len(heard_b.pcm) > 8000)
        await hang_up(call, incoming)
    finally:
        await close_all([alice, bob], stacks)


async def test_a_reinvite_with_ice_restart_moves_the_audio_to_the_new_pair_and_hold_keeps_it() -> None:
    """RFC 8445 §9 / RFC 8839 §4.4.1.1.1 between two UAs: alice re-INVITEs with ``restart_ice``; both
    sides get new credentials (bob restarts because the re-offer carries a new ufrag/pwd), run the checks
    again on new agents, and the tones flow over the new pair (packets counted on it). A hold/resume
    afterwards carries unchanged credentials: the pair and the agents stay."""

    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    alice = UserAgent(stacks[0], "sip:alice@127.0.0.1")
    bob = UserAgent(stacks[1], "sip:bob@127.0.0.1")
    heard_a, heard_b = MemorySink(), MemorySink()
    try:
        call, incoming = await ua_call(
            alice, bob, stacks[1].local_address("udp"), IceSettings(), IceSettings(), heard_a, heard_b
        )
        assert call.media is not None and call.media.ice is not None
        assert incoming.media is not None and incoming.media.ice is not None
        ours, theirs = call.media.ice, incoming.media.ice
        await until(lambda: ours.state == theirs.state == "connected")
        old_agents = (ours.agent, theirs.agent)
        old_credentials = (ours.agent.local_username, theirs.agent.local_username)

        assert (await call.restart_ice(timeout=20)).status == 200
        assert ours.restarts == theirs.restarts == 1
        assert ours.agent is not old_agents[0] and theirs.agent is not old_agents[1]
        assert (ours.agent.local_username, theirs.agent.local_username) != old_credentials
        assert ours.agent.ice_controlling and not theirs.agent.ice_controlling
        await until(lambda: ours.state == theirs.state == "connected")
        assert ours.selected is not None and theirs.selected is not None
        received = (ours.received, theirs.received)
        before = (len(heard_a.pcm), len(heard_b.pcm))
        await until(lambda: len(heard_a.pcm) > before[0] + 8000 and len(heard_b.pcm) > before[1] + 8000)
        assert ours.received > received[0] + 20 and theirs.received > received[1] + 20  # on the new pair
        assert dominant_frequency(heard_b.pcm[-8000:], TONES) == 440
        assert dominant_frequency(heard_a.pcm[-8000:], TONES) == 1000

        agents, selected = (ours.agent, theirs.agent), (ours.selected, theirs.selected)
        assert (await call.hold(timeout=20)).status == 200
        assert (await call.resume(timeout=20)).status == 200
        assert (ours.agent, theirs.agent) == agents and (ours.selected, theirs.selected) == selected
        assert ours.restarts == theirs.restarts == 1 and ours.state == theirs.state == "connected"
        before = (len(heard_a.pcm), len(heard_b.pcm))
        await until(lambda: len(heard_b.pcm) > before[1] + 8000)
        assert dominant_frequency(heard_b.pcm[-8000:], TONES) == 440
        await hang_up(call, incoming)
    finally:
        await close_all([alice, bob], stacks)


def _without_rtcp_mux(body: bytes) -> bytes:
    return body.replace(b"a=rtcp-mux\r\n", b"")


async def test_rtcp_takes_a_second_component_when_the_offer_does_not_multiplex() -> None:
    """An offer with a second component (``IceSettings(components=2)``) whose ``a=rtcp-mux`` the far end
    does not take (stripped here, as from an endpoint that never multiplexes): the answerer gathers a
    second component too (``settings_for_offer``), its answer carries ``a=rtcp`` and no rtcp-mux, ICE
    nominates both components and RTCP runs on the second one both ways."""
    heard_a, heard_b = MemorySink(), MemorySink()
    a = await CallMedia.open(
        "127.0.0.1", play=ToneSource(440), record=heard_a, ice=IceSettings(components=2), rtcp_interval=0.3
    )
    offer = _without_rtcp_mux(a.offer())
    settings = settings_for_offer(IceSettings(), offer)
    assert settings.components == 2
    b = await CallMedia.open(
        "127.0.0.1", play=ToneSource(1000), record=heard_b, ice=settings, rtcp_interval=0.3
    )
    try:
        answer = b.answer(offer)
        media = SessionDescription.parse(answer).media[0]
        assert media.attribute("rtcp-mux") is None and media.attribute("rtcp") is not None
        a.accept_answer(answer)
        assert a.ice is not None and b.ice is not None
        ices = (a.ice, b.ice)
        await until(lambda: len(heard_a.pcm) > 16000 and len(heard_b.pcm) > 16000)
        assert all(ice.state == "connected" and ice.rtcp_selected is not None for ice in ices)
        await until(lambda: all(ice.rtcp_component >= 4 for ice in ices))  # sent and received
        assert a.ice.rtcp_dropped == b.ice.rtcp_dropped == 0
        assert a.session.stats.remote_lost is not None and b.session.stats.remote_lost is not None
        assert dominant_frequency(heard_b.pcm[-8000:], TONES) == 440
        assert dominant_frequency(heard_a.pcm[-8000:], TONES) == 1000
    finally:
        await a.close()
        await b.close()


def test_which_offers_get_a_second_component_and_ice_mismatch_means_no_ice() -> None:
    """settings_for_offer: a second component only for an ICE offer without rtcp-mux that has
    component-2 candidates; an answer with ``a=ice-mismatch`` counts as one without ICE (RFC 8839 §5.4)."""
    from p2psip.media.ice import remote_ice

    base = IceSettings()
    candidates = (
        b"a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\n"
        b"a=candidate:1 1 UDP 2113929471 192.0.2.9 4000 typ host\r\n"
        b"a=candidate:1 2 UDP 2113929470 192.0.2.9 4001 typ host\r\n"
    )
    head = (
        b"v=0\r\no=- 1 1 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\n"
        b"m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    assert settings_for_offer(base, head + candidates).components == 2
    assert settings_for_offer(base, head + b"a=rtcp-mux\r\n" + candidates) is base
    assert settings_for_offer(base, head) is base  # no ICE
    component_1_only = candidates.rsplit(b"a=candidate", 1)[0]
    assert settings_for_offer(base, head + component_1_only) is base
    assert settings_for_offer(base, b"not sdp") is base
    sdp = SessionDescription.parse(head + candidates)
    assert remote_ice(sdp, sdp.media[0]) is not None
    sdp = SessionDescription.parse(head + candidates + b"a=ice-mismatch\r\n")
    assert remote_ice(sdp, sdp.media[0]) is None
