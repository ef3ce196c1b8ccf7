"""Our UserAgent with audio against a real softphone, baresip (headless: ``ausine`` plays 440 Hz, ``sndfile``
records what it decodes): baresip calls our UA and our UA calls baresip, tones found in both recordings,
DTMF both ways, and a call through a seeded 5%-loss relay whose recording keeps its length."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import require_tool
from interop.relay import LossyRelay
from test_media_baresip import Baresip, assert_peak
from test_media_call import until

from p2psip.media import CallMedia, MemorySink, ToneSource
from p2psip.stack import Stack
from p2psip.useragent import Call, IncomingCall, UserAgent

pytestmark = pytest.mark.interop


@pytest.fixture
async def ua() -> AsyncIterator[UserAgent]:
    require_tool("baresip")
    stack = await Stack.start(["udp:127.0.0.1:0"])
    agent = UserAgent(stack, "sip:us@127.0.0.1")
    try:
        yield agent
    finally:
        await agent.close()
        await stack.close()


@pytest.fixture
def phones(tmp_path: Path) -> AsyncIterator[list[Baresip]]:
    started: list[Baresip] = []
    yield started
    for phone in started:
        phone.stop()


async def started(phone: Baresip) -> None:
    """Wait for baresip to listen (so no test depends on an INVITE retransmission)."""
    with contextlib.suppress(TimeoutError):
        await until(lambda: "baresip is ready." in phone.log_text() or phone.proc.poll() is not None, 30)
    assert "baresip is ready." in phone.log_text(), phone.log_text()[-2000:]


async def finish(phone: Baresip) -> None:
    """Wait until baresip has ended the call and closed its recording (sndfile closes its files when the
    call's audio is destroyed), then end it by PID."""
    await until(lambda: "audio: destroyed" in phone.log_text(), 20)
    await asyncio.get_running_loop().run_in_executor(None, phone.stop)


async def hang_up_and_check_tones(call: Call, phone: Baresip, heard: MemorySink) -> None:
    """Our UA hangs up; the media closes with the call; each side recorded the other's tone (baresip's
    ausine 440 Hz, our 1 kHz)."""
    assert call.media is not None
    session = call.media.session
    assert (await call.bye()).status == 200
    assert session.closed
    await check_tones(phone, heard)


async def check_tones(phone: Baresip, heard: MemorySink) -> None:
    """The call is hung up: once baresip has ended it, each side recorded the other's tone (baresip's
    ausine 440 Hz, our 1 kHz)."""
    await finish(phone)
    assert_peak(bytes(heard.pcm), 440)
    assert_peak(phone.decoded_recording(), 1000)


async def test_baresip_calls_our_ua_tones_and_dtmf_both_ways(
    ua: UserAgent, phones: list[Baresip], tmp_path: Path
) -> None:
    host, port = ua.stack.local_address("udp")
    phone = Baresip(tmp_path, f"sip:us@{host}:{port}")
    phones.append(phone)
    incoming: IncomingCall = await asyncio.wait_for(ua.incoming.get(), 30)
    heard = MemorySink()
    media = await incoming.accept_with_media(play=ToneSource(1000), record=heard)
    session = media.session
    await until(lambda: session.stats.packets_received >= 100)  # two seconds of baresip's tone

    await asyncio.wait_for(incoming.send_dtmf("159#"), 20)  # ours -> baresip
    await until(lambda: all(f"received event: '{d}' (end=1)" in phone.log_text() for d in "159#"))
    for key in "2*0":  # baresip -> ours: a key on its console is sent as RFC 4733 events
        phone.command(key)
        await session.wait_digits(len(session.received_digits) + 1, timeout=20)
    assert session.received_digits == "2*0"

    await hang_up_and_check_tones(incoming, phone, heard)


async def test_our_ua_calls_baresip_tones_both_ways(
    ua: UserAgent, phones: list[Baresip], tmp_path: Path
) -> None:
    phone = Baresip(tmp_path, None, answer=True)
    phones.append(phone)
    await started(phone)
    heard = MemorySink()
    call = await ua.call(
        f"sip:bs@127.0.0.1:{phone.sip_port}", play=ToneSource(1000), record=heard, timeout=30
    )
    assert call.media is not None
    session = call.media.session
    await until(lambda: session.stats.packets_received >= 100)
    assert session.stats.lost == 0
    await call.send_dtmf("7")
    await until(lambda: "received event: '7' (end=1)" in phone.log_text())
    await hang_up_and_check_tones(call, phone, heard)


async def test_through_a_five_percent_loss_relay_the_recording_keeps_its_length(
    ua: UserAgent, phones: list[Baresip], tmp_path: Path
) -> None:
    phone = Baresip(tmp_path, None, answer=True)
    phones.append(phone)
    await started(phone)
    heard = MemorySink()
    media = await CallMedia.open("127.0.0.1", play=ToneSource(1000), record=heard)
    # The relay stands in front of our RTP port, and our SDP names the relay: baresip sends there, the
    # relay forwards to us, and symmetric RTP sends our audio back through it. Both ways lose 5%.
    async with LossyRelay(("127.0.0.1", media.port), loss=0.05, seed=11) as relay:
        media.advertise = relay.address
        call = await ua.call(f"sip:bs@127.0.0.1:{phone.sip_port}", media=media, timeout=30)
        session = media.session
        await until(lambda: session.stats.packets_received >= 200)  # four seconds of baresip's tone
        assert (await call.bye()).status == 200
        await finish(phone)
    stats = session.stats
    up = sum(1 for line in relay.stats.dropped_lines if line.startswith("up"))
    assert up >= 4 and stats.lost >= up - 3, (up, stats.lost)  # baresip's packets lost on the way to us
    expected_frames = stats.packets_received + stats.lost
    frames = len(heard.pcm) // 320
    assert abs(frames - expected_frames) <= 0.05 * expected_frames  # concealment kept the length
    assert_peak(bytes(heard.pcm), 440)
    assert_peak(phone.decoded_recording(), 1000)
