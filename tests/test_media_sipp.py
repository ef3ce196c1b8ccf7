"""sipp as the far end: it calls us and plays real RTP captures (sip-tester's g711a.pcap, 30 ms A-law frames,
and three RFC 2833 DTMF captures) to the address in our SDP answer. What we record must be exactly the
capture's audio, and the digits must come out once each. sipp plays pcaps through a raw socket: root only."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from test_media_baresip import MiniUas
from test_media_dtmf import PCAP_DIR, read_pcap_udp_payloads

from p2psip.media import MediaSession, MemorySink
from p2psip.media.g711 import alaw_decode
from p2psip.media.rtp import RtpPacket

pytestmark = pytest.mark.interop

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="play pcaps to p2psip">
  <send retrans="500"><![CDATA[
INVITE sip:media@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:media@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: sip:sipp@[local_ip]:[local_port]
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[local_ip_type] [local_ip]
t=0 0
m=audio [auto_media_port] RTP/AVP 8 101
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-11,16
]]></send>
  <recv response="200" rtd="true"/>
  <send><![CDATA[
ACK sip:media@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:media@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
Contact: sip:sipp@[local_ip]:[local_port]
Max-Forwards: 70
Content-Length: 0

]]></send>
  <nop><action><exec play_pcap_audio="pcap/g711a.pcap"/></action></nop>
  <pause milliseconds="7600"/>
  <nop><action><exec play_pcap_audio="pcap/dtmf_2833_1.pcap"/></action></nop>
  <pause milliseconds="400"/>
  <nop><action><exec play_pcap_audio="pcap/dtmf_2833_5.pcap"/></action></nop>
  <pause milliseconds="400"/>
  <nop><action><exec play_pcap_audio="pcap/dtmf_2833_pound.pcap"/></action></nop>
  <pause milliseconds="600"/>
  <send retrans="500"><![CDATA[
BYE sip:media@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:media@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 2 BYE
Contact: sip:sipp@[local_ip]:[local_port]
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200"/>
</scenario>
"""


def start_sipp_call(sipp: str, target: str, folder: Path) -> subprocess.Popen[bytes]:
    """sipp placing one call to ``target`` with ``folder``'s scenario.xml (pcaps under ``folder``/pcap);
    the caller ends it by PID if it is still running."""
    return subprocess.Popen(
        [sipp, target, "-sf", "scenario.xml", "-m", "1", "-i", "127.0.0.1", "-p", str(free_port()),
         "-nostdin", "-timeout", "40s", "-timeout_error", "-trace_err"],
        cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def test_sipp_plays_g711a_and_dtmf_captures_to_us(tmp_path: Path) -> None:
    sipp = require_tool("sipp")
    if not (PCAP_DIR / "g711a.pcap").exists():
        pytest.skip("sip-tester's pcaps are missing")
    if os.geteuid() != 0:
        pytest.skip("sipp needs root to play pcaps (raw socket)")
    (tmp_path / "pcap").symlink_to(PCAP_DIR)
    (tmp_path / "scenario.xml").write_text(SCENARIO)
    uas = MiniUas()
    sink = MemorySink()
    session = await MediaSession.start(("127.0.0.1", 0), sink=sink, codec="PCMA")
    proc = start_sipp_call(sipp, f"127.0.0.1:{uas.port}", tmp_path)
    try:
        offer = await uas.answer(session, codecs=("PCMA",))
        assert offer.media[0].formats == ["8", "101"]
        assert session.codec.name == "PCMA" and session.dtmf_payload_type == 101
        await uas.until_bye()
        assert await session.wait_digits(3, timeout=10) == "15#"
        await session.close()
        returncode = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        uas.close()
    assert returncode == 0
    capture = [RtpPacket.parse(p) for p in read_pcap_udp_payloads(PCAP_DIR / "g711a.pcap")]
    expected = b"".join(alaw_decode(p.payload) for p in capture)
    recorded = bytes(sink.pcm)
    # every 30 ms frame of the capture, in order and bit-exact, then the DTMF packets' slots as silence
    assert recorded.startswith(expected)
    assert set(recorded[len(expected) :]) <= {0}
    assert session.stats.concealed == 0  # (the captures have unrelated sequence numbers: no "lost" check)
