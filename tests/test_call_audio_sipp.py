"""sipp calls our UserAgent (answered with ``accept_with_media``) and plays sip-tester's RFC 2833 DTMF
captures to the address in our SDP answer; each digit comes out once, and sipp's BYE ends the call and its
media. sipp plays pcaps through a raw socket: root only."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import require_tool
from test_media_dtmf import PCAP_DIR
from test_media_sipp import SCENARIO, start_sipp_call

from p2psip.stack import Stack
from p2psip.useragent import UserAgent

pytestmark = pytest.mark.interop

AUDIO = (
    '  <nop><action><exec play_pcap_audio="pcap/g711a.pcap"/></action></nop>\n'
    '  <pause milliseconds="7600"/>\n'
)
ANSWER = '<recv response="200" rtd="true"/>'
TRYING = '<recv response="100" optional="true"/>'  # our stack may send 100 Trying first


async def test_sipp_sends_dtmf_to_our_user_agent(tmp_path: Path) -> None:
    sipp = require_tool("sipp")
    if not (PCAP_DIR / "dtmf_2833_1.pcap").exists():
        pytest.skip("sip-tester's pcaps are missing")
    if os.geteuid() != 0:
        pytest.skip("sipp needs root to play pcaps (raw socket)")
    assert AUDIO in SCENARIO and ANSWER in SCENARIO
    (tmp_path / "pcap").symlink_to(PCAP_DIR)
    (tmp_path / "scenario.xml").write_text(
        SCENARIO.replace(AUDIO, "").replace(ANSWER, TRYING + ANSWER)
    )  # the DTMF captures only
    stack = await Stack.start(["udp:127.0.0.1:0"])
    ua = UserAgent(stack, "sip:media@127.0.0.1")
    host, port = stack.local_address("udp")
    proc = start_sipp_call(sipp, f"{host}:{port}", tmp_path)
    try:
        incoming = await asyncio.wait_for(ua.incoming.get(), 30)
        media = await incoming.accept_with_media()
        assert media.params is not None and media.params.codec == "PCMA"  # sipp offers PCMA only
        assert await incoming.wait_ended(30) == "bye received"
        assert media.session.closed and media.session.received_digits == "15#"
        returncode = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        await ua.close()
        await stack.close()
    assert returncode == 0
