"""MediaSession over real UDP on loopback: a 1 kHz tone recorded at the far end (Goertzel peak, duration
within 5%), the same through a seeded 5%-loss relay, DTMF both from our sender and replayed from sipp's
captures, symmetric RTP, hold, RTCP reports, IPv6, and garbage on the sockets."""

from __future__ import annotations

import asyncio
import random
import socket
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from test_media_dtmf import PCAP_DIGITS, PCAP_DIR, read_pcap_udp_payloads

from p2psip.media import (
    AsyncIteratorSource,
    CallbackSink,
    MediaSession,
    MemorySink,
    QueueSink,
    ToneSource,
    WavSink,
    dominant_frequency,
    goertzel_power,
)
from p2psip.media.rtp import is_rtcp
from p2psip.sdp import make_answer, make_offer, negotiated

CANDIDATES = [250, 400, 600, 800, 1000, 1200, 1500, 2000, 3000]
TONE_SECONDS = 2.0


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (bounded) for a condition driven by network events we cannot await directly."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def first_write_event() -> tuple[CallbackSink, asyncio.Event]:
    event = asyncio.Event()
    return CallbackSink(lambda pcm: event.set()), event


async def play_and_record(sender: MediaSession, receiver: MediaSession) -> None:
    """Let the sender finish its source, hang up (RTCP BYE), and let the receiver drain and close."""
    await asyncio.wait_for(sender.source_done, TONE_SECONDS + 20)
    await sender.close()
    await asyncio.wait_for(receiver.remote_bye, 10)
    await receiver.close()


def check_tone(pcm: bytes, seconds: float) -> None:
    duration = len(pcm) / 2 / 8000
    assert abs(duration - seconds) <= 0.05 * seconds, f"recorded {duration:.3f} s, expected {seconds} s"
    assert dominant_frequency(pcm, CANDIDATES) == 1000
    ratio = goertzel_power(pcm, 1000) / max(goertzel_power(pcm, f) for f in CANDIDATES if f != 1000)
    assert ratio > 100


async def test_tone_across_loopback_is_recorded_at_1khz_with_the_right_length(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    receiver = await MediaSession.start(sink=WavSink(path))
    sender = await MediaSession.start(
        remote=receiver.local_address, source=ToneSource(1000, duration=TONE_SECONDS)
    )
    await play_and_record(sender, receiver)
    with wave.open(str(path)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        pcm = wav.readframes(wav.getnframes())
    check_tone(pcm, TONE_SECONDS)
    assert receiver.stats.packets_received >= 0.95 * TONE_SECONDS * 50
    assert receiver.stats.lost == 0


class LossyRelay(asyncio.DatagramProtocol):
    """Forwards datagrams between the first two addresses it hears from, dropping RTP (never RTCP) from
    ``lossy_from`` with a seeded probability. rtcp-mux keeps everything on one port."""

    def __init__(self, loss: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.a: tuple[str, int] | None = None
        self.b: tuple[str, int] | None = None
        self.dropped = 0
        self.forwarded = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        addr = (addr[0], addr[1])
        if self.a is None:
            self.a = addr
        target = self.b if addr == self.a else self.a
        if target is None or self.transport is None:
            return
        if addr == self.a and not is_rtcp(data) and self.rng.random() < self.loss:
            self.dropped += 1
            return
        self.forwarded += 1
        self.transport.sendto(data, target)


async def test_tone_through_a_five_percent_loss_relay_keeps_its_length() -> None:
    loop = asyncio.get_running_loop()
    relay = LossyRelay(loss=0.05, seed=2024)
    transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    relay_address = transport.get_extra_info("sockname")[:2]
    sink = MemorySink()
    try:
        receiver = await MediaSession.start(sink=sink, rtcp_mux=True, rtcp_interval=0.25)
        relay.b = receiver.local_address
        sender = await MediaSession.start(
            remote=relay_address,
            source=ToneSource(1000, duration=TONE_SECONDS),
            rtcp_mux=True,
            rtcp_interval=0.25,
        )
        await until(lambda: sender.stats.remote_lost is not None and sender.stats.remote_lost > 0)
        await play_and_record(sender, receiver)
    finally:
        transport.close()
    assert relay.dropped >= 3  # the seeded schedule really dropped audio
    stats = receiver.stats
    assert relay.dropped - 2 <= stats.lost <= relay.dropped  # drops after the last packet are not yet "lost"
    assert stats.concealed >= stats.lost - 2
    check_tone(bytes(sink.pcm), TONE_SECONDS)
    assert receiver.remote == relay_address  # symmetric RTP: the answerer sent back through the relay


async def test_dtmf_digits_sent_are_received_once_each() -> None:
    seen: list[str] = []
    receiver = await MediaSession.start(on_dtmf=lambda event: seen.append(event.digit))
    sender = await MediaSession.start(remote=receiver.local_address, source=ToneSource(440))
    try:
        await asyncio.wait_for(sender.send_dtmf("123#*0AD", duration=0.06, gap=0.04), 20)
        assert await receiver.wait_digits(8, timeout=10) == "123#*0AD"
        assert "".join(seen) == "123#*0AD"
    finally:
        await sender.close()
        await receiver.close()
    with pytest.raises(ValueError, match="DTMF digit"):
        sender.send_dtmf("x")


async def test_sipp_rfc2833_capture_replayed_over_udp_is_decoded() -> None:
    require_tool("sipp")
    if not PCAP_DIR.is_dir():
        pytest.skip("sip-tester's pcap directory is missing")
    receiver = await MediaSession.start(dtmf_payload_type=101)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        expected = ""
        for name, digit in PCAP_DIGITS.items():
            for payload in read_pcap_udp_payloads(PCAP_DIR / name):
                sock.sendto(payload, receiver.local_address)
            expected += digit
            assert await receiver.wait_digits(len(expected), timeout=10) == expected
    finally:
        sock.close()
        await receiver.close()


async def test_symmetric_rtp_answers_where_packets_come_from() -> None:
    parking = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a wrong address from "the SDP"
    parking.bind(("127.0.0.1", 0))
    sink, heard = first_write_event()
    a = await MediaSession.start(sink=sink, source=ToneSource(1000))
    b = await MediaSession.start(remote=parking.getsockname(), source=ToneSource(500))
    try:
        a.set_remote(b.local_address)
        await asyncio.wait_for(heard.wait(), 10)  # a hears b, so b latched onto a's real address
        assert b.remote == a.local_address
    finally:
        await a.close()
        await b.close()
        parking.close()


async def test_on_hold_nothing_is_sent() -> None:
    sink, heard = first_write_event()
    held = await MediaSession.start(direction="recvonly", source=ToneSource(1000), sink=sink)
    other = await MediaSession.start(remote=held.local_address)
    try:
        held.set_remote(other.local_address)
        await asyncio.wait_for(heard.wait(), 10)
        await until(lambda: held.stats.packets_received >= 20)
        assert other.stats.packets_received == 0 and held.stats.packets_sent == 0
        held.set_direction("sendrecv")  # resume
        await until(lambda: other.stats.packets_received > 0)
    finally:
        await held.close()
        await other.close()


async def test_rtcp_reports_carry_loss_jitter_and_round_trip_time() -> None:
    a = await MediaSession.start(rtcp_interval=0.2)
    b = await MediaSession.start(remote=a.local_address, rtcp_interval=0.2)
    a.set_remote(b.local_address)
    try:
        await until(lambda: a.stats.rtt_ms is not None and b.stats.rtt_ms is not None)
        stats = a.stats
        assert stats.remote_lost == 0 and stats.remote_fraction_lost == 0
        assert stats.remote_jitter_ms is not None and stats.remote_jitter_ms < 1000
        assert stats.rtt_ms is not None and 0 <= stats.rtt_ms < 1000
        assert b.stats.packets_received > 0 and b.stats.jitter_ms >= 0
    finally:
        await a.close()
        await b.close()


async def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    sink = MemorySink()
    receiver = await MediaSession.start(local=("::1", 0), sink=sink)
    sender = await MediaSession.start(
        local=("::1", 0), remote=receiver.local_address, source=ToneSource(1000, duration=0.5)
    )
    await play_and_record(sender, receiver)
    assert dominant_frequency(bytes(sink.pcm), CANDIDATES) == 1000


async def test_offer_answer_drives_two_sessions() -> None:
    """The UserAgent's job in miniature: bind, offer, answer, negotiate, apply (the answerer picks PCMA)."""
    sink = MemorySink()
    alice = await MediaSession.start(source=ToneSource(1000, duration=1.0))
    bob = await MediaSession.start(sink=sink)
    offer = make_offer(*alice.local_address, codecs=["PCMU", "PCMA"])
    answer = make_answer(offer, *bob.local_address, codecs=["PCMA"])
    alice.apply(negotiated(offer, answer))
    bob.apply(negotiated(offer, answer, role="answerer"))
    assert alice.codec.name == bob.codec.name == "PCMA"
    await play_and_record(alice, bob)
    check_tone(bytes(sink.pcm), 1.0)


async def test_async_iterator_source_and_queue_sink() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        tone = ToneSource(1000)
        for _ in range(25):  # 1 s in 40 ms chunks
            chunk = tone.read(320)
            assert chunk is not None
            yield chunk

    queue = QueueSink()
    receiver = await MediaSession.start(sink=queue)
    source = AsyncIteratorSource(chunks())
    sender = await MediaSession.start(remote=receiver.local_address, source=source)
    received = bytearray()

    async def consume() -> None:
        async for frame in queue:
            received.extend(frame)

    consumer = asyncio.create_task(consume())
    await play_and_record(sender, receiver)
    await asyncio.wait_for(consumer, 10)
    # All 1 s of the iterator arrives, plus one 20 ms frame of silence for each time the sender's clock
    # found the pump behind (an underrun: at the start, and more often on a loaded machine) -- no more.
    frames = [bytes(received[i : i + 320]) for i in range(0, len(received), 320)]
    assert len(received) == 16000 + 320 * source.underruns, (len(received), source.underruns)
    assert sum(1 for frame in frames if not any(frame)) == source.underruns  # a 1 kHz frame is never 0
    assert dominant_frequency(bytes(received), CANDIDATES) == 1000


async def test_garbage_on_the_ports_is_counted_not_fatal() -> None:
    sink = MemorySink()
    receiver = await MediaSession.start(sink=sink)
    sender = await MediaSession.start(remote=receiver.local_address, source=ToneSource(1000, duration=0.5))
    assert receiver.local_rtcp_address is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
        for payload in [b"", b"\x00", b"\xff" * 40, b"\x80\x7f" + bytes(10)]:
            junk.sendto(payload, receiver.local_address)
            junk.sendto(payload, receiver.local_rtcp_address)
    await until(lambda: receiver.stats.rejected >= 7)
    await play_and_record(sender, receiver)
    assert dominant_frequency(bytes(sink.pcm), CANDIDATES) == 1000


async def test_start_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unsupported codec"):
        await MediaSession.start(codec="opus")
    with pytest.raises(ValueError, match="direction"):
        await MediaSession.start(direction="sideways")
    session = await MediaSession.start(dtmf_payload_type=None)
    with pytest.raises(ValueError, match="telephone-event"):
        session.send_dtmf("1")
    await session.close()
    await session.close()  # idempotent


async def test_a_port_in_use_is_a_clear_transport_error() -> None:
    from p2psip.errors import TransportError

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(TransportError, match=r"cannot bind RTP/RTCP on 127\.0\.0\.1:.*use port 0"):
            await MediaSession.start(("127.0.0.1", taken.getsockname()[1]))


async def test_a_failing_sink_or_source_does_not_stop_the_call() -> None:
    def broken_source(samples: int) -> bytes:
        raise RuntimeError("microphone unplugged")

    def broken_sink(pcm: bytes) -> None:
        raise RuntimeError("disk full")

    from p2psip.media import CallbackSource

    sink, heard = first_write_event()
    receiver = await MediaSession.start(sink=CallbackSink(broken_sink))
    sender = await MediaSession.start(remote=receiver.local_address, source=CallbackSource(broken_source))
    watcher = await MediaSession.start(remote=receiver.local_address, source=ToneSource(1000))
    try:
        await asyncio.wait_for(sender.source_done, 10)  # the broken source ended, the session lives on
        assert any("microphone unplugged" in e for e in sender.errors)
        await until(lambda: any("disk full" in e for e in receiver.errors))
        assert receiver.sink is None
        receiver.record(sink)  # a new sink works
        receiver.set_remote(watcher.local_address)
        await asyncio.wait_for(heard.wait(), 10)
    finally:
        for session in (sender, receiver, watcher):
            await session.close()


async def test_one_epoll_set_reads_every_session_and_a_failing_reader_spoils_none() -> None:
    """The sessions of a loop share one epoll set (p2psip.media.session._Poller): packets reach every
    session through it, a reader that raises is reported to the loop's exception handler while the others
    keep receiving, and the set goes away with the last socket."""
    from p2psip.media.session import _Poller

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    a = await MediaSession.start(source=ToneSource(1000))
    b = await MediaSession.start(remote=a.local_address, source=ToneSource(1000))
    broken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    broken.bind(("127.0.0.1", 0))
    broken.setblocking(False)

    def explode(now: float) -> None:
        broken.recv(2048)
        raise RuntimeError("a broken reader")

    _Poller.watch(loop, broken.fileno(), explode)
    poller = _Poller._running[id(loop)]
    assert len(poller.handlers) == 5  # two sessions' RTP and RTCP, and the broken one
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"x", broken.getsockname())
    await until(lambda: a.stats.packets_received > 20 and b.stats.packets_received > 20 and bool(errors))
    assert isinstance(errors[0]["exception"], RuntimeError)
    _Poller.unwatch(loop, broken.fileno())
    broken.close()
    await a.close()
    await b.close()
    assert id(loop) not in _Poller._running


async def test_a_latched_socket_is_connected_and_a_moved_peer_is_latched_again() -> None:
    """Once the peer's packets come from where we send, the RTP socket is connected to it (send/recv, the
    kernel drops other sources); set_remote elsewhere disconnects at once, keeping the port; a peer that
    falls silent is followed to its new address (a NAT rebinding) after RELATCH_AFTER."""
    a = await MediaSession.start(source=ToneSource(1000))
    a.RELATCH_AFTER = 0.2
    b = await MediaSession.start(remote=a.local_address, source=ToneSource(500))
    moved: MediaSession | None = None
    try:
        assert a._rtp_sock is not None
        await until(lambda: a._connected == b.local_address)
        assert a._rtp_sock.getpeername()[:2] == b.local_address
        await until(lambda: b._connected == a.local_address)  # b connects once a answers from its port

        a.set_remote(("127.0.0.1", 9))  # the SDP says elsewhere: listen to everyone again, same port
        assert a._connected is None
        with pytest.raises(OSError):
            a._rtp_sock.getpeername()
        assert a._rtp_sock.getsockname()[:2] == a.local_address
        await until(lambda: a._connected == b.local_address)  # b still sends: latched and connected again

        await b.close()  # b goes quiet; the same caller comes back from another port
        moved = await MediaSession.start(remote=a.local_address, source=ToneSource(500))
        await until(lambda: a.remote == moved.local_address and moved.stats.packets_received > 0)
        await until(lambda: a._connected == moved.local_address)
        assert a._rtp_sock.getsockname()[:2] == a.local_address
    finally:
        for session in (a, b, moved):
            if session is not None:
                await session.close()


async def test_without_symmetric_rtp_the_socket_stays_unconnected() -> None:
    """Without latching, packets from any address must still be heard: no connect."""
    a = await MediaSession.start(source=ToneSource(1000), symmetric=False)
    b = await MediaSession.start(remote=a.local_address, source=ToneSource(500))
    a.set_remote(b.local_address)
    try:
        await until(lambda: a.stats.packets_received > 10 and b._connected == a.local_address)
        assert a._connected is None
    finally:
        await a.close()
        await b.close()
