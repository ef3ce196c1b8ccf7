"""baresip's own ``turn`` module against our TURN server (p2psip.turnserver, the one full peers run with
``--turn``): baresip allocates a relayed address with the long-term credentials a peer issues
(``p2psip.turn.issue_credentials``), puts it in its SDP (``medianat=turn``), and the call's audio runs
through our relay both ways. On loopback; under CI=true baresip is required."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from test_call_audio_baresip import check_tones, hang_up_and_check_tones, started
from test_media_baresip import Baresip
from test_media_call import until

from p2psip.media import MemorySink, ToneSource
from p2psip.media.ice import IceSettings
from p2psip.sdp import SessionDescription
from p2psip.stack import Stack
from p2psip.turn import issue_credentials
from p2psip.turnserver import TurnServer
from p2psip.useragent import UserAgent

pytestmark = pytest.mark.interop

SECRET = b"baresip-turn-secret"


@contextlib.asynccontextmanager
async def our_ua_and_baresip(
    make_phone: Callable[[tuple[str, int]], Baresip],
) -> AsyncIterator[tuple[UserAgent, Baresip]]:
    """Our UA on a loopback stack and a baresip made by ``make_phone(our SIP address)``; on exit baresip is
    stopped (by PID, if the test did not end it) and the UA and stack closed, however the test ended."""
    stack = await Stack.start(["udp:127.0.0.1:0"])
    ua = UserAgent(stack, "sip:us@127.0.0.1")
    phone: Baresip | None = None
    try:
        phone = make_phone(stack.local_address("udp"))
        yield ua, phone
    finally:
        if phone is not None and phone.proc.poll() is None:
            phone.stop()
        await ua.close()
        await stack.close()


async def test_baresip_relays_its_audio_through_our_turn_server(tmp_path: Path) -> None:
    async with TurnServer(SECRET) as server:
        username, password = issue_credentials(SECRET, "bs", time.time())
        host, port = server.address
        turn = f"stunserver=turn:{host}:{port};stunuser={username};stunpass={password}"
        async with our_ua_and_baresip(
            lambda ours: Baresip(
                tmp_path, None, answer=True, modules="turn", account=f";medianat=turn;{turn}"
            )
        ) as (ua, phone):
            await started(phone)
            heard = MemorySink()
            call = await ua.call(
                f"sip:bs@127.0.0.1:{phone.sip_port}", play=ToneSource(1000), record=heard, timeout=30
            )
            answer = SessionDescription.parse(call.response.body)
            audio = answer.media[0]
            relayed = {allocation.relay for allocation in server.core.by_client.values()}
            # baresip's SDP names the address our server relayed for it, not its own RTP socket
            # one allocation for RTP and one for RTCP (baresip's turn module does not multiplex them)
            assert server.core.stats()["allocations"] == 2, phone.log_text()[-3000:]
            connection = answer.media_connection(audio)
            assert connection is not None, call.response.body
            assert (connection.host, audio.port) in relayed, (call.response.body, relayed)
            assert call.media is not None
            session = call.media.session
            await until(lambda: session.stats.packets_received >= 100)
            assert server.core.stats()["relayed_packets"] >= 150  # both ways through the relay
            await hang_up_and_check_tones(call, phone, heard)
            await until(lambda: server.core.stats()["allocations"] == 0, 15)  # freed with the call


async def test_baresip_with_ice_gathers_a_relayed_candidate_from_our_turn_server(tmp_path: Path) -> None:
    """baresip's ``ice`` module with a ``turn:`` server: its answer to our ICE offer carries a relayed
    candidate on our server (and ICE connects, tones both ways)."""
    async with TurnServer(SECRET) as server:
        username, password = issue_credentials(SECRET, "bs", time.time())
        host, port = server.address
        turn = f"stunserver=turn:{host}:{port};stunuser={username};stunpass={password}"
        async with our_ua_and_baresip(
            lambda ours: Baresip(
                tmp_path,
                None,
                answer=True,
                modules="ice turn",
                config="rtcp_mux yes\n",
                account=f";medianat=ice;{turn}",
            )
        ) as (ua, phone):
            await started(phone)
            heard = MemorySink()
            call = await ua.call(f"sip:bs@127.0.0.1:{phone.sip_port}", play=ToneSource(1000), record=heard,
                                 timeout=30, media_options={"ice": IceSettings()})  # fmt: skip
            answer = SessionDescription.parse(call.response.body)
            candidates = [c.split() for c in answer.media[0].attribute_values("candidate")]
            relayed = {allocation.relay for allocation in server.core.by_client.values()}
            relay_candidates = {(c[4], int(c[5])) for c in candidates if c[7] == "relay"}
            assert relay_candidates and relay_candidates <= relayed, (call.response.body, relayed)
            assert call.media is not None and call.media.ice is not None
            await until(lambda: len(heard.pcm) > 16000)
            assert call.media.ice.state == "connected"
            await hang_up_and_check_tones(call, phone, heard)


async def test_baresip_without_rtcp_mux_calls_our_ua_and_rtcp_takes_the_second_component(
    tmp_path: Path,
) -> None:
    """baresip's ``ice`` module with ``rtcp_mux no`` (its default) offers ICE for RTP and RTCP (components 1
    and 2) and no ``a=rtcp-mux``: our answer gathers a second component (``a=rtcp``, component-2
    candidates), ICE nominates both, RTCP runs on the second one both ways, the tones on the first."""
    async with TurnServer(SECRET) as server:  # STUN server for baresip's ice module
        host, port = server.address
        async with our_ua_and_baresip(
            lambda ours: Baresip(
                tmp_path,
                f"sip:us@{ours[0]}:{ours[1]}",
                modules="ice",
                config="rtcp_mux no\n",
                account=f";medianat=ice;stunserver=stun:{host}:{port}",
            )
        ) as (ua, phone):
            incoming = await asyncio.wait_for(ua.incoming.get(), 30)
            offer = SessionDescription.parse(incoming.request.body).media[0]
            assert offer.attribute("rtcp-mux") is None, incoming.request.body
            components = {c.split()[1] for c in offer.attribute_values("candidate")}
            assert components == {"1", "2"}, incoming.request.body
            heard = MemorySink()
            media = await incoming.accept_with_media(
                play=ToneSource(1000), record=heard, media_options={"ice": IceSettings()}
            )
            assert media.local_description is not None
            answer = media.local_description.media[0]
            assert answer.attribute("rtcp-mux") is None and answer.attribute("rtcp") is not None
            assert {c.split()[1] for c in answer.attribute_values("candidate")} == {"1", "2"}
            assert media.ice is not None
            ice = media.ice
            await until(lambda: len(heard.pcm) > 16000 and ice.state == "connected")
            assert ice.rtcp_selected is not None, ice.stats()
            session = media.session
            # baresip's receiver reports reached us, and our reports went out, on component 2
            await until(lambda: session.stats.remote_lost is not None and ice.rtcp_component >= 2, 20)
            assert ice.rtcp_dropped == 0
            await incoming.bye()
            await check_tones(phone, heard)


async def test_our_offer_with_a_second_component_reaches_baresip_without_rtcp_mux(tmp_path: Path) -> None:
    """Our offers multiplex RTCP on one component; baresip with ``rtcp_mux no`` answers such an offer with
    ``a=ice-mismatch`` (we then fall back to its ``c=``/``m=``, RFC 8839 §5.4, where it sends nothing).
    ``IceSettings(components=2)`` offers a second component: baresip answers without rtcp-mux, ICE
    nominates both components, the tones cross both ways."""
    async with our_ua_and_baresip(
        lambda ours: Baresip(
            tmp_path, None, answer=True, modules="ice", config="rtcp_mux no\n", account=";medianat=ice"
        )
    ) as (ua, phone):
        await started(phone)
        heard = MemorySink()
        call = await ua.call(f"sip:bs@127.0.0.1:{phone.sip_port}", play=ToneSource(1000), record=heard,
                             timeout=30, media_options={"ice": IceSettings(components=2)})  # fmt: skip
        answer = SessionDescription.parse(call.response.body).media[0]
        assert answer.attribute("ice-mismatch") is None and answer.attribute("rtcp-mux") is None
        assert call.media is not None and call.media.ice is not None
        ice = call.media.ice
        await until(lambda: len(heard.pcm) > 16000 and ice.state == "connected")
        assert ice.rtcp_selected is not None and ice.rtcp_dropped == 0, ice.stats()
        await hang_up_and_check_tones(call, phone, heard)
