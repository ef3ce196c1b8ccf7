"""CallMedia, the piece the UserAgent plugs in: SDP bodies in and out, a real call on loopback with WAV play
and record, hold and resume re-offers (directions and o= versions), answering a re-INVITE, bad and
unacceptable SDP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from p2psip.errors import ParseError
from p2psip.media import CallMedia, MemorySink, ToneSource, dominant_frequency
from p2psip.media.sources import read_wav, write_wav
from p2psip.sdp import SessionDescription


async def until(condition: object, timeout: float = 20.0) -> None:
    """Wait (bounded) until ``condition()`` holds: the media tests measure time in packets, not sleeps."""
    assert callable(condition)

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_a_call_plays_a_wav_file_and_records_the_other_side(tmp_path: Path) -> None:
    write_wav(tmp_path / "hello.wav", ToneSource(1000, duration=1.0))
    alice = await CallMedia.open("127.0.0.1", play=tmp_path / "hello.wav")
    bob = await CallMedia.open("127.0.0.1", record=str(tmp_path / "reply.wav"))
    invite_body = alice.offer()
    ok_body = bob.answer(invite_body)
    params = alice.accept_answer(ok_body)
    assert params.codec == "PCMU" and params.remote == ("127.0.0.1", bob.port)
    await asyncio.wait_for(alice.session.source_done, 20)
    await alice.close()
    await asyncio.wait_for(bob.session.remote_bye, 10)
    await bob.close()
    pcm = read_wav(tmp_path / "reply.wav")
    assert abs(len(pcm) / 16000 - 1.0) <= 0.05
    assert dominant_frequency(pcm, [500, 1000, 2000]) == 1000


async def test_hold_and_resume() -> None:
    heard = MemorySink()
    alice = await CallMedia.open(play=ToneSource(1000))
    bob = await CallMedia.open(play=ToneSource(500), record=heard)
    try:
        first = SessionDescription.parse(alice.offer())
        bob_first = SessionDescription.parse(bob.answer(bytes(first)))
        alice.accept_answer(bytes(bob_first))
        await until(
            lambda: bob.session.stats.packets_received > 5 and alice.session.stats.packets_received > 5
        )

        hold = SessionDescription.parse(alice.hold())  # re-INVITE
        assert hold.origin.session_id == first.origin.session_id
        assert hold.origin.session_version == first.origin.session_version + 1
        held = SessionDescription.parse(bob.answer(bytes(hold)))
        assert held.media[0].direction == "recvonly"
        assert held.origin.session_version == bob_first.origin.session_version + 1
        params = alice.accept_answer(bytes(held))
        assert (params.send, params.recv) == (True, False)
        assert not bob.session.send_enabled and alice.session.send_enabled

        sent = bob.session.stats.packets_sent
        received = alice.session.stats.packets_received
        await until(lambda: bob.session.stats.packets_received > 60)  # time passes, measured in packets
        assert bob.session.stats.packets_sent == sent  # bob is silent while held
        assert alice.session.stats.packets_received <= received + 3  # (in flight at the switch)

        alice.accept_answer(bob.answer(alice.resume()))
        await until(lambda: alice.session.stats.packets_received > received + 10)
    finally:
        await alice.close()
        await bob.close()


async def test_the_other_side_can_re_offer() -> None:
    alice = await CallMedia.open()
    bob = await CallMedia.open()
    try:
        alice.accept_answer(bob.answer(alice.offer()))
        # bob puts alice on hold with his own re-INVITE
        answer = SessionDescription.parse(alice.answer(bob.hold()))
        assert answer.media[0].direction == "recvonly"
        assert bob.accept_answer(bytes(answer)).direction == "sendonly"
        assert alice.params is not None and alice.params.direction == "recvonly"
    finally:
        await alice.close()
        await bob.close()


async def test_bad_and_unacceptable_sdp() -> None:
    alice = await CallMedia.open(codecs=("PCMA",))
    bob = await CallMedia.open(codecs=("PCMU",))
    try:
        with pytest.raises(ParseError) as caught:
            bob.answer(b"v=0\r\nnonsense\r\n")
        assert caught.value.status == 488
        with pytest.raises(ParseError, match="no offer is pending"):
            alice.accept_answer(b"v=0\r\n")
        body = bob.answer(alice.offer())
        assert SessionDescription.parse(body).media[0].port == 0
        assert bob.params is not None and bob.params.rejected and not bob.session.send_enabled
        assert alice.accept_answer(body).rejected
    finally:
        await alice.close()
        await bob.close()
