"""baresip 1.0's `mwi` module through a 3-peer overlay: baresip jones subscribes to ``message-summary``
for its own AOR as soon as it registers; the AOR's agent retargets the SUBSCRIBE to jones's voicemail
(the docs' voicemail example, registered as ``sip:jones@voicemail.p2p.example`` at another peer;
p2psip/mailbox.py). A caller leaves a message: baresip shows ``Messages-Waiting: yes`` with the count on
its console (the `menu` module's output); the message deleted, ``Messages-Waiting: no``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from test_call_audio_docs import Voicemail
from test_mwi_overlay import wait_for_file
from test_sipapi_peer_scripts import register

from p2psip import sdp
from p2psip.mailbox import MailboxPolicy
from p2psip.media import ToneSource
from p2psip.media.sources import write_wav
from p2psip.peer import Peer
from p2psip.stack import Stack
from p2psip.useragent import UserAgent

from .helpers import start_overlay, stop_overlay
from .test_presence_baresip import Phone

pytestmark = pytest.mark.interop

JONES = "sip:jones@p2p.example"
MAILBOX = "sip:jones@voicemail.p2p.example"


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    require_tool("baresip")
    peers = await start_overlay(3, tmp_path)
    for peer in peers:
        peer.mailboxes = MailboxPolicy({JONES: MAILBOX})  # what [voicemail] in each config says
    try:
        yield peers
    finally:
        await stop_overlay(peers)


async def shows(phone: Phone, text: str, since: int, timeout: float = 20.0) -> int:
    """Wait until ``text`` shows in baresip's output (its log: the `menu` module prints MWI news there)
    after position ``since``; where it ends."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (found := phone.log_text().find(text, since)) < 0:
        if loop.time() > deadline:
            raise AssertionError(f"baresip showed no {text!r} after {since}:\n{phone.log_tail()}")
        await asyncio.sleep(0.1)
    return found + len(text)


async def test_baresip_mwi_for_its_own_aor(peers: list[Peer], tmp_path: Path) -> None:
    a, b, c = peers
    folder = tmp_path / "messages"
    folder.mkdir()
    port = free_port()
    box = Voicemail(port, write_wav(tmp_path / "greeting.wav", ToneSource(440, duration=0.4)), folder)
    stack = await Stack.start(["udp:127.0.0.1:0"])
    host, sip_port = a.sip_address()
    carol = UserAgent(stack, "sip:carol@p2p.example", outbound=f"{host}:{sip_port}")
    jones: Phone | None = None
    try:
        assert await box.line() == "voicemail ready"
        assert await register(c, MAILBOX, f"sip:jones@127.0.0.1:{port}") == 200
        jones = Phone(tmp_path, "jones", b, watches=[], apps=("mwi",))
        mark = await shows(jones, "Messages-Waiting: no", 0)  # subscribed (through b, its agent, to c)
        assert sum(p.counters["mwi_retargeted"] for p in peers) >= 1

        offer = bytes(sdp.make_offer("127.0.0.1", free_port()))  # the voicemail's RTP goes nowhere
        call = await carol.call(MAILBOX, body=offer, timeout=20)
        message = await wait_for_file(folder)
        assert (await call.bye()).status == 200
        assert (await box.line()) == f"message {message}"
        mark = await shows(jones, "Messages-Waiting: yes", mark)
        assert jones.log_text()[mark:].lstrip().startswith("Voice-Message: 1/0 (0/0)")

        message.unlink()
        await shows(jones, "Messages-Waiting: no", mark)
    finally:
        if jones is not None:
            jones.stop()
        box.stop()
        await carol.close()
        await stack.close()
