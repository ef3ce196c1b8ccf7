"""Media interop with a real softphone: baresip calls us, tones go both ways and are found in both
recordings, over a direct path and through a seeded 5%-loss relay, and DTMF goes both ways.

The SIP side here is a deliberately tiny UAS written in the test (answer one INVITE with our SDP answer,
acknowledge the BYE): the project's UserAgent is a separate module, and this test is about the media layer
(``p2psip.sdp`` + ``p2psip.media``) talking to baresip's RTP stack. baresip plays a 440 Hz sine (``ausine``),
records what it decodes with ``sndfile``, and takes commands (``/hangup``, DTMF keys) on its UDP console.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, free_sip_port, require_tool
from interop.procs import stop

from p2psip.media import MediaSession, MemorySink, ToneSource, dominant_frequency, goertzel_power
from p2psip.media.sources import read_wav
from p2psip.sdp import SessionDescription, make_answer, negotiated

MODULES = "/usr/lib/baresip/modules"
CANDIDATES = [300, 440, 600, 800, 1000, 1500, 2000]
pytestmark = pytest.mark.interop


def _header(head: str, name: str) -> str:
    match = re.search(rf"^{name}:[^\r\n]*", head, re.M | re.I)
    assert match, f"no {name} header in {head!r}"
    return match.group(0)


def _response(head: str, extra: list[str], body: bytes = b"", to_tag: str = "") -> bytes:
    lines = [
        "SIP/2.0 200 OK",
        *re.findall(r"^Via:[^\r\n]*", head, re.M | re.I),
        _header(head, "From"),
        _header(head, "To") + to_tag,
        _header(head, "Call-ID"),
        _header(head, "CSeq"),
        *extra,
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Baresip:
    """A headless baresip that dials ``target`` as soon as it starts; ended by PID."""

    def __init__(
        self,
        directory: Path,
        target: str | None,
        *,
        answer: bool = False,
        modules: str = "",
        account: str = "",
        config: str = "",
    ) -> None:
        """Dial ``target`` at start (None: wait); ``answer``: answer incoming calls at once; ``modules``
        (e.g. ``"turn"``) are loaded besides the usual ones and ``account`` is appended to the account's
        parameters (e.g. ``";medianat=turn;..."``); ``config`` lines are added to its config."""
        self.dir = directory
        self.cons_port = free_port()  # cons listens on UDP *and* TCP
        sip_port = self.sip_port = free_sip_port()
        (directory / "config").write_text(
            f"sip_listen 127.0.0.1:{sip_port}\n"
            "net_interface 127.0.0.1\n"
            "rtp_ports 40000-49999\n"  # off the fixed ports conftest.free_port hands out
            "audio_source ausine,440\n"
            "audio_player aufile,/dev/null\n"
            "audio_alert aufile,/dev/null\n"
            "ausrc_srate 48000\nausrc_channels 2\n"
            f"module_path {MODULES}\n"
            "module g711.so\nmodule ausine.so\nmodule aufile.so\nmodule sndfile.so\nmodule cons.so\n"
            + "".join(f"module {name}.so\n" for name in modules.split())
            + f"cons_listen 127.0.0.1:{self.cons_port}\n"
            f"snd_path {directory}\n"
            "module_app account.so\nmodule_app menu.so\n" + config
        )
        (directory / "accounts").write_text(
            f"<sip:bs@127.0.0.1:{sip_port};transport=udp>;regint=0;audio_codecs=PCMU{account}"
            + (";answermode=auto\n" if answer else "\n")
        )
        (directory / "contacts").write_text("")
        self.log_path = directory / "baresip.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [require_tool("baresip"), "-v", "-f", str(directory), "-t", "60"]
            + (["-e", f"/dial {target}"] if target else []),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def command(self, text: str) -> None:
        if "cons: failed to listen" in self.log_text():  # else the command is lost and the test times out
            raise AssertionError(f"baresip's console did not start:\n{self.log_text()[-2000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            line = text + "\n" if text.startswith("/") else text  # long commands end with a newline
            sock.sendto(line.encode(), ("127.0.0.1", self.cons_port))

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def decoded_recording(self) -> bytes:
        (path,) = self.dir.glob("dump-*-dec.wav")
        return read_wav(path)

    def stop(self) -> None:
        stop(self.proc, grace=3)
        self.log.close()


class MiniUas:
    """Answers one INVITE with our SDP answer through a MediaSession; answers BYE; nothing more."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.get_running_loop()

    async def receive(self, timeout: float = 15.0) -> tuple[str, str, tuple[str, int]]:
        data, addr = await asyncio.wait_for(self.loop.sock_recvfrom(self.sock, 65535), timeout)
        head, _, body = data.decode().partition("\r\n\r\n")
        return head, body, addr

    async def answer(
        self,
        session: MediaSession,
        advertise: tuple[str, int] | None = None,
        codecs: tuple[str, ...] = ("PCMU",),
    ) -> SessionDescription:
        """Wait for the INVITE, apply the negotiation to ``session``, send 200 OK (again for each
        retransmitted INVITE) until the ACK arrives."""
        while True:
            head, body, addr = await self.receive()
            if head.startswith("INVITE"):
                break
        offer = SessionDescription.parse(body.encode())
        answer = make_answer(offer, *(advertise or session.local_address), codecs=codecs)
        session.apply(negotiated(offer, answer, role="answerer"))
        contact = f"Contact: <sip:us@127.0.0.1:{self.port}>"
        ok = _response(head, [contact, "Content-Type: application/sdp"], bytes(answer), ";tag=p2psip")
        self.sock.sendto(ok, addr)
        while True:
            head, _, _ = await self.receive()
            if head.startswith("ACK"):
                return offer
            assert head.startswith("INVITE"), head
            self.sock.sendto(ok, addr)

    async def until_bye(self) -> None:
        while True:
            head, _, addr = await self.receive()
            if head.startswith("BYE"):
                self.sock.sendto(_response(head, []), addr)
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def call(tmp_path: Path) -> AsyncIterator[tuple[MiniUas, Baresip]]:
    require_tool("baresip")
    uas = MiniUas()
    phone = Baresip(tmp_path, f"sip:us@127.0.0.1:{uas.port}")
    try:
        yield uas, phone
    finally:
        phone.stop()
        uas.close()


async def until(condition: Any, timeout: float = 15.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


async def hang_up(uas: MiniUas, phone: Baresip, session: MediaSession) -> None:
    phone.command("/hangup")
    await uas.until_bye()
    await session.close()
    phone.command("/quit")
    await asyncio.get_running_loop().run_in_executor(None, phone.proc.wait, 15)


def assert_peak(pcm: bytes, frequency: int) -> None:
    assert dominant_frequency(pcm, CANDIDATES) == frequency
    others = max(goertzel_power(pcm, f) for f in CANDIDATES if f != frequency)
    assert goertzel_power(pcm, frequency) > 20 * others


async def test_tones_both_ways_with_baresip(call: tuple[MiniUas, Baresip]) -> None:
    uas, phone = call
    sink = MemorySink()
    session = await MediaSession.start(("127.0.0.1", 0), source=ToneSource(1000), sink=sink)
    await uas.answer(session)
    await until(lambda: session.stats.packets_received >= 100)  # two seconds of baresip's tone
    await hang_up(uas, phone, session)
    assert_peak(bytes(sink.pcm), 440)  # what baresip played, recorded by us
    assert_peak(phone.decoded_recording(), 1000)  # what we played, recorded by baresip
    assert session.stats.lost == 0 and session.remote == session.remote


class LossyRelay(asyncio.DatagramProtocol):
    """One UDP port between baresip and us: forwards each way; drops a seeded 5% of baresip's RTP."""

    def __init__(self, phone: tuple[str, int], ours: tuple[str, int], seed: int) -> None:
        self.phone, self.ours = phone, ours
        self.rng = random.Random(seed)
        self.dropped = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        if (addr[0], addr[1]) == self.ours:
            self.transport.sendto(data, self.phone)
        elif self.rng.random() < 0.05:
            self.dropped += 1
        else:
            self.transport.sendto(data, self.ours)


async def test_tones_through_a_five_percent_loss_relay_keep_their_length(
    call: tuple[MiniUas, Baresip],
) -> None:
    uas, phone = call
    loop = asyncio.get_running_loop()
    sink = MemorySink()
    session = await MediaSession.start(("127.0.0.1", 0), source=ToneSource(1000), sink=sink)
    relay_transport, relay = await loop.create_datagram_endpoint(
        lambda: LossyRelay(("0.0.0.0", 0), session.local_address, seed=5), local_addr=("127.0.0.1", 0)
    )
    try:
        relay_address = relay_transport.get_extra_info("sockname")[:2]
        offer = await uas.answer(session, advertise=relay_address)  # baresip sends to the relay
        media = offer.media[0]
        connection = offer.media_connection(media)
        assert connection is not None
        relay.phone = (connection.host, media.port)
        session.set_remote(relay_address)  # and so do we
        await until(lambda: session.stats.packets_received >= 150)
        await hang_up(uas, phone, session)
    finally:
        relay_transport.close()
    stats = session.stats
    assert relay.dropped >= 3 and stats.lost >= relay.dropped - 2
    expected_frames = stats.packets_received + stats.lost
    frames = len(sink.pcm) // 320
    assert abs(frames - expected_frames) <= 0.05 * expected_frames  # concealment kept the length
    assert_peak(bytes(sink.pcm), 440)
    assert_peak(phone.decoded_recording(), 1000)


async def test_dtmf_both_ways_with_baresip(call: tuple[MiniUas, Baresip]) -> None:
    uas, phone = call
    session = await MediaSession.start(("127.0.0.1", 0))
    await uas.answer(session)
    await until(lambda: session.stats.packets_received >= 10)
    await asyncio.wait_for(session.send_dtmf("159#"), 15)
    await until(lambda: all(f"received event: '{d}' (end=1)" in phone.log_text() for d in "159#"))
    for key in "2*0":
        phone.command(key)  # a key press on baresip's console sends it as RFC 4733 events
        await session.wait_digits(len(session.received_digits) + 1, timeout=15)
    assert session.received_digits == "2*0"
    await hang_up(uas, phone, session)
