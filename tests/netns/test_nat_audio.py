"""Call audio through real NATs (the NAT lab, tests/netns/natlab.py): ICE with our TURN server on a full peer.

P1 is a real ``p2psip start --turn 10.99.0.1:3478`` peer: its SIP UDP port is the STUN server, its TURN
server the relay. The call ends are our CallMedia with ICE (host, server-reflexive from P1's SIP port,
relayed from P1's TURN server), each a process in its own namespace; their SDP offer and answer cross over
the test's pipes (the SIP half of these calls is tests/netns/test_nat_lab.py's), their RTP crosses the NATs:

- behind NAT A (port-restricted) playing 1 kHz <-> behind NAT B (address-and-port-dependent) playing 440 Hz:
  no direct pair passes the checks; the relay carries both tones (a relayed candidate is selected, P1's
  TURN counters count the relayed packets);
- behind NAT B <-> carol on the public subnet: ICE selects a direct pair through NAT B's mapping (no
  relayed candidate selected);
- an allocation beyond the per-user quota is refused: the ICE agent fails with a clear error, P1 counts it.

Tones are checked by frequency both ways. Under CI=true nothing here is skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import in_ci

from p2psip.turn import issue_credentials

from .natlab import HA, HB, P1, P2, NatLab, why_unavailable
from .test_nat_lab import MODULES, ROOT, Lab, wait_for

TURN_PORT = 3478

AGENT = r"""
import asyncio, json, sys
from p2psip.media import CallMedia, MemorySink, ToneSource, dominant_frequency
from p2psip.media.ice import IceSettings

async def main():
    address, role, tone, settings = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    ice = IceSettings(
        stun=tuple(settings["stun"]), turn=tuple(settings["turn"]), turn_username=settings["user"],
        turn_password=settings["password"], relay_only=settings.get("relay_only", False),
    )
    if role == "quota":
        opened = []
        try:
            for _ in range(settings["count"]):
                opened.append(await CallMedia.open(address, ice=ice))
            print(json.dumps({"opened": len(opened)}), flush=True)
        except ConnectionError as exc:
            print(json.dumps({"opened": len(opened), "refused": str(exc)}), flush=True)
        for media in opened:
            await media.close()
        return
    heard = MemorySink()
    media = await CallMedia.open(address, play=ToneSource(tone), record=heard, ice=ice)
    if role == "offer":
        print(json.dumps({"sdp": media.offer().decode()}), flush=True)
        media.accept_answer(json.loads(sys.stdin.readline())["sdp"].encode())
    else:
        offer = json.loads(sys.stdin.readline())["sdp"].encode()
        print(json.dumps({"sdp": media.answer(offer).decode()}), flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 25
    while len(heard.pcm) < 3 * 16000 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert media.ice is not None
    stats = media.ice.stats()
    local, remote = media.ice.selected or (None, None)
    stats.update(
        local_type=local.type if local else None,
        remote_type=remote.type if remote else None,
        heard=dominant_frequency(bytes(heard.pcm[-16000:]), [440, 1000, 2000]) if heard.pcm else None,
        seconds=len(heard.pcm) / 16000,
        candidates=[c.type for c in media.ice.agent.local_candidates],
    )
    print(json.dumps(stats), flush=True)
    await asyncio.sleep(1.0)  # the far end hears our last second too
    await media.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = why_unavailable()
    if reason is not None:
        if in_ci():
            pytest.fail(f"the NAT lab is required under CI=true: {reason}")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("nataudio")
    with NatLab() as net:
        made = Lab(net, tmp)
        # TCP too: an INVITE with ICE candidates passes 1300 bytes, and a proxy then forwards it over TCP
        # (RFC 3261 §18.1.1), so a peer listening on UDP only cannot take it from another peer
        made.start_peer("p1", P1, None, extra=("--turn", f"{P1}:{TURN_PORT}", "--listen", f"tcp:{P1}:5060"))
        yield made


def settings(lab: Lab, user: str, **more: Any) -> str:
    key = (lab.tmp / "p1" / "turn.key").read_bytes()  # the key P1 issues its credentials with
    username, password = issue_credentials(key, user, time.time())
    return json.dumps(
        {"stun": [P1, 5060], "turn": [P1, TURN_PORT], "user": username, "password": password, **more}
    )


def agent(lab: Lab, ns: str, address: str, role: str, tone: int, config: str) -> subprocess.Popen[str]:
    return lab.net.popen(ns, [sys.executable, "-c", AGENT, address, role, str(tone), config],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)  # fmt: skip


def line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    text = proc.stdout.readline()
    if not text:
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"agent ended without answering: {err[-3000:]}")
    result: dict[str, Any] = json.loads(text)
    return result


def call(
    lab: Lab, caller: tuple[str, str, int, str], callee: tuple[str, str, int, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Offer/answer between two agents over the test's pipes; returns what each heard and selected."""
    offerer = agent(lab, caller[0], caller[1], "offer", caller[2], caller[3])
    answerer = agent(lab, callee[0], callee[1], "answer", callee[2], callee[3])
    for proc, other in ((offerer, answerer), (answerer, offerer)):
        sdp = line(proc)
        assert other.stdin is not None
        other.stdin.write(json.dumps(sdp) + "\n")
        other.stdin.flush()
    results = line(offerer), line(answerer)
    for proc in (offerer, answerer):
        proc.wait(20)
    return results


@pytest.mark.netns
def test_between_two_nats_only_the_relay_carries_the_audio(lab: Lab) -> None:
    before = lab.status("p1")["counters"].get("turn_relayed_packets", 0)
    ours, alice = call(lab, ("hb", HB, 440, settings(lab, "ua")), ("ha", HA, 1000, settings(lab, "alice")))
    assert sorted(set(ours["candidates"])) == ["host", "relay", "srflx"], ours
    assert ours["state"] == alice["state"] == "connected", (ours, alice)
    assert ours["heard"] == 1000 and alice["heard"] == 440, (ours, alice)
    assert ours["seconds"] >= 3 and alice["seconds"] >= 3
    assert "relay" in (ours["local_type"], ours["remote_type"]), ours  # no direct pair passed the checks
    assert "relay" in (alice["local_type"], alice["remote_type"]), alice
    assert lab.status("p1")["counters"]["turn_relayed_packets"] - before > 200


@pytest.mark.netns
def test_behind_a_nat_to_a_public_phone_ice_finds_the_direct_path(lab: Lab) -> None:
    ours, carol = call(lab, ("hb", HB, 440, settings(lab, "ua")), ("p2", P2, 1000, settings(lab, "carol")))
    assert ours["state"] == carol["state"] == "connected", (ours, carol)
    assert ours["heard"] == 1000 and carol["heard"] == 440, (ours, carol)
    assert "relay" not in (ours["local_type"], ours["remote_type"]), ours  # NAT B's own mapping carries it
    assert "relay" not in (carol["local_type"], carol["remote_type"]), carol


@pytest.mark.netns
def test_an_allocation_beyond_the_quota_is_refused_and_counted(lab: Lab) -> None:
    wait_for(
        lambda: lab.status("p1")["counters"].get("turn_allocations", 0) == 0,
        30,
        "earlier calls' relays freed",
    )
    refused = lab.status("p1")["counters"].get("turn_refused_quota", 0)
    proc = agent(lab, "ha", HA, "quota", 0, settings(lab, "greedy", relay_only=True, count=5))
    result = line(proc)
    proc.wait(20)
    assert result["opened"] == 4 and "TURN server refused" in result["refused"], result  # turn_per_user = 4
    assert lab.status("p1")["counters"]["turn_refused_quota"] == refused + 1


CALLER = r"""
import asyncio, json, sys, uuid
from p2psip.media import MemorySink, ToneSource, dominant_frequency
from p2psip.media.ice import IceSettings
from p2psip.stack import Stack
from p2psip.useragent import UserAgent

async def main():
    host, peer, target, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    ice = IceSettings(stun=tuple(settings["stun"]), turn=tuple(settings["turn"]),
                      turn_username=settings["user"], turn_password=settings["password"])
    stack = await Stack.start([f"udp:{host}:5090"])
    ua = UserAgent(stack, "sip:ua@p2p.example", outbound=peer, instance=f"<urn:uuid:{uuid.uuid4()}>")
    await ua.register("sip:p2p.example", expires=120)
    heard = MemorySink()
    call = await ua.call(target, play=ToneSource(1000), record=heard, timeout=30, media_options={"ice": ice})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 25
    while len(heard.pcm) < 3 * 16000 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    media = call.media
    local, remote = media.ice.selected or (None, None)
    print(json.dumps({
        **media.ice.stats(), "local_type": local.type if local else None,
        "remote_type": remote.type if remote else None, "seconds": len(heard.pcm) / 16000,
        "heard": dominant_frequency(bytes(heard.pcm[-16000:]), [440, 1000, 2000]) if heard.pcm else None,
        "answer": call.response.body.decode(errors="replace"),
    }), flush=True)
    await call.bye()
    await ua.close()
    await stack.close()

asyncio.run(main())
"""


def baresip_with_ice(lab: Lab) -> tuple[subprocess.Popen[bytes], Path]:
    """alice: baresip behind NAT A with its ice module (STUN: P1's SIP port), registered through P1 with
    RFC 5626 outbound, answering at once, playing 440 Hz and recording what it decodes (sndfile)."""
    workdir = lab.tmp / "baresip-alice-ice"
    workdir.mkdir(exist_ok=True)
    (workdir / "config").write_text(
        f"sip_listen {HA}:5064\nnet_interface eth0\n"
        "audio_player aufile,/dev/null\naudio_source ausine,440\naudio_alert aufile,/dev/null\n"
        "ausrc_srate 48000\nausrc_channels 2\nrtcp_mux yes\n"
        f"module_path {MODULES}\n"
        "module g711.so\nmodule ausine.so\nmodule aufile.so\nmodule sndfile.so\nmodule ice.so\n"
        f"snd_path {workdir}\n"
        "module_tmp uuid.so\nmodule_app account.so\nmodule_app menu.so\n"
    )
    (workdir / "accounts").write_text(
        f'<sip:alice@p2p.example>;outbound="sip:{P1}:5060";sipnat=outbound;regint=60;'
        f"audio_codecs=PCMU;answermode=auto;medianat=ice;stunserver=stun:{P1}:5060\n"
    )
    (workdir / "contacts").write_text("")
    log = workdir / "baresip.log"
    proc = lab.net.popen("ha", ["baresip", "-v", "-f", str(workdir), "-t", "120"], stdin=subprocess.DEVNULL,
                         stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    return proc, log


@pytest.mark.netns
@pytest.mark.interop
def test_our_ua_behind_nat_b_calls_baresip_with_ice_behind_nat_a_over_the_relay(lab: Lab) -> None:
    if shutil.which("baresip") is None:
        if in_ci():
            pytest.fail("baresip is required under CI=true")
        pytest.skip("baresip is not installed")
    if "p2" not in lab.peers:
        lab.start_peer("p2", P2, P1, extra=("--listen", f"tcp:{P2}:5060"))
    proc, log = baresip_with_ice(lab)
    try:
        wait_for(lambda: "200 OK" in log.read_text(errors="replace"), 30, "alice registered",
                 lambda: log.read_text(errors="replace")[-3000:])  # fmt: skip
        caller = lab.net.popen("hb", [sys.executable, "-c", CALLER, HB, f"{P2}:5060", "sip:alice@p2p.example",
                                      settings(lab, "ua")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)  # fmt: skip
        ours = line(caller)
        caller.wait(30)
        assert "a=ice-ufrag" in ours["answer"], ours["answer"]  # baresip answered our ICE offer with ICE
        assert ours["state"] == "connected", (ours, log.read_text(errors="replace")[-3000:])
        assert ours["heard"] == 440 and ours["seconds"] >= 3, ours
        assert "relay" in (ours["local_type"], ours["remote_type"]), ours
    finally:
        proc.terminate()
        proc.wait(10)
    recordings = sorted(log.parent.glob("dump-*-dec.wav"))
    assert recordings, log.read_text(errors="replace")[-3000:]
    from p2psip.media import dominant_frequency
    from p2psip.media.sources import read_wav

    assert dominant_frequency(read_wav(recordings[-1]), [440, 1000, 2000]) == 1000
