"""Call audio through real NATs (the NAT lab, tests/netns/natlab.py): ICE with our TURN server on a full peer.

P1 is a real ``p2psip start --turn 10.99.0.1:3478`` peer: its SIP UDP port is the STUN server, its TURN
server the relay (4 allocations per user). The call ends use ICE (host, server-reflexive from P1's SIP port,
relayed from P1's TURN server):

- behind NAT A (port-restricted) playing 1 kHz <-> behind NAT B (address-and-port-dependent) playing 440 Hz,
  two CallMedia processes whose offer/answer crosses the test's pipes: no direct pair passes the checks;
  the relay carries both tones (a relayed candidate is selected, P1's TURN counters count the packets).
  The same path as a SIP call: our UA behind NAT B calls baresip alice (its ice module) behind NAT A;
- SIP calls through the overlay by our UserAgent (behind NAT B, home P2) to our UserAgent on the public
  subnet (carol, home P1):
  - ICE selects a direct pair through NAT B's mapping (no relayed candidate selected, P1's relay carries
    next to nothing);
  - the caller's user has used up its allocations: its allocation is refused (486, counted in P1's
    status), ICE goes on without it and the direct path carries the call;
  - a relay-only callee whose allocation is refused declines with 488 and the reason, which the caller
    gets; a relay-only caller whose allocation is refused gets 503 and sends no INVITE.

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
from .test_nat_lab import MODULES, ROOT, Lab, tail, wait_for

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
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # held until stdin closes
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
    # keep sending until the test has both ends' reports (it then closes our stdin): the far end may
    # still be hearing its three seconds
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
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
        # UDP only: an INVITE with ICE candidates passes 1300 bytes, so P2 first tries TCP toward P1 (RFC 3261
        # §18.1.1), is refused, and sends it over UDP after all (counted: sip_tcp_refused_udp_retry)
        made.start_peer("p1", P1, None, extra=("--turn", f"{P1}:{TURN_PORT}"))
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
        assert proc.stdin is not None
        proc.stdin.close()  # both have reported: now they may stop sending
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


PHONE = r"""
import asyncio, json, sys, uuid
from p2psip.errors import CallFailed
from p2psip.media import MemorySink, ToneSource, dominant_frequency
from p2psip.media.ice import IceSettings
from p2psip.stack import Stack
from p2psip.useragent import UserAgent

def report(media, heard, **more):
    local, remote = media.ice.selected or (None, None)
    return {**media.ice.stats(), "local_type": local.type if local else None,
            "remote_type": remote.type if remote else None, "seconds": len(heard.pcm) / 16000,
            "heard": dominant_frequency(bytes(heard.pcm[-16000:]), [440, 1000, 2000]) if heard.pcm else None,
            "candidates": [c.type for c in media.ice.agent.local_candidates], **more}

async def hear(heard):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 25
    while len(heard.pcm) < 3 * 16000 and loop.time() < deadline:
        await asyncio.sleep(0.05)

async def main():
    role, listen, peer, aor, tone, settings = sys.argv[1:6] + [json.loads(sys.argv[6])]
    ice = IceSettings(stun=tuple(settings["stun"]), turn=tuple(settings["turn"]),
                      turn_username=settings["user"], turn_password=settings["password"],
                      relay_only=settings.get("relay_only", False))
    stack = await Stack.start([f"udp:{listen}"])
    done = asyncio.get_running_loop().create_future()
    heard = MemorySink()
    answered = []

    async def answer(incoming):
        try:
            media = await incoming.accept_with_media(play=ToneSource(int(tone)), record=heard,
                                                     media_options={"ice": ice})
        except CallFailed as exc:
            done.set_result({"declined": exc.status, "reason": exc.reason})
            return
        answered.append(incoming)
        await hear(heard)
        done.set_result(report(media, heard))

    # One device per AOR: its instance id persists across restarts (RFC 5626 4.1), as a real phone's does.
    # A fresh id per run would make each run a new device, which the registrar rightly refuses (403,
    # trust on first use) while an earlier run's binding lives on, e.g. when its un-REGISTER failed.
    instance = f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, aor)}>"
    ua = UserAgent(stack, aor, outbound=peer, instance=instance,
                   on_call=lambda incoming: asyncio.ensure_future(answer(incoming)))
    await ua.register("sip:p2p.example", expires=120)
    print(json.dumps({"registered": aor}), flush=True)
    if role == "callee":
        print(json.dumps(await asyncio.wait_for(done, 90)), flush=True)
        for incoming in answered:  # keep sending until the caller, told by the test, hangs up
            await incoming.wait_ended(60)
    else:
        target = sys.stdin.readline().strip()
        try:
            call = await ua.call(target, play=ToneSource(int(tone)), record=heard, timeout=30,
                                 media_options={"ice": ice})
        except CallFailed as exc:
            print(json.dumps({"status": exc.status, "reason": exc.reason}), flush=True)
        else:
            await hear(heard)
            print(json.dumps(report(call.media, heard, answer=call.response.body.decode(errors="replace"))),
                  flush=True)
            # hang up once the test has what the far end heard too (it closes our stdin then)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await call.bye()
    await ua.register("sip:p2p.example", expires=0)
    await ua.close()
    await stack.close()

asyncio.run(main())
"""


def phone(lab: Lab, ns: str, role: str, listen: str, peer: str, aor: str, tone: int, config: str
          ) -> subprocess.Popen[str]:  # fmt: skip
    """Our UserAgent as a phone: registered at ``peer`` (RFC 5626 outbound), placing (``caller``: the
    target comes on stdin) or answering (``callee``) one call with ICE, and printing what it heard."""
    proc = lab.net.popen(ns, [sys.executable, "-c", PHONE, role, listen, peer, aor, str(tone), config],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)  # fmt: skip
    assert line(proc) == {"registered": aor}
    return proc


def sip_call(lab: Lab, caller: subprocess.Popen[str], callee: subprocess.Popen[str], target: str
             ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The caller calls ``target`` through the overlay; returns what each side reports."""
    assert caller.stdin is not None
    caller.stdin.write(target + "\n")
    caller.stdin.flush()
    results = line(caller), line(callee)
    caller.stdin.close()  # both have reported: the caller hangs up
    for proc in (caller, callee):
        proc.wait(30)
    return results


def ensure_p2(lab: Lab) -> None:
    """P2, a second full peer, joined through P1; UDP and TCP (ICE makes an INVITE pass 1300 bytes)."""
    if "p2" not in lab.peers:
        lab.start_peer("p2", P2, P1, extra=("--listen", f"tcp:{P2}:5060"))


def relayed_packets(lab: Lab) -> int:
    counters: dict[str, int] = lab.status("p1")["counters"]
    return counters.get("turn_relayed_packets", 0)


@pytest.mark.netns
def test_behind_a_nat_to_a_public_phone_ice_finds_the_direct_path(lab: Lab) -> None:
    """A SIP call through the overlay: our UA behind NAT B (home P2) calls carol, our UA on the public
    subnet (home P1). Both gather relayed candidates from P1, but ICE selects a direct pair through NAT B's
    mapping: no relayed candidate on either side, and P1's relay carries (almost) nothing."""
    ensure_p2(lab)
    carol = phone(lab, "p2", "callee", f"{P2}:5090", f"{P1}:5060", "sip:carol@p2p.example", 1000,
                  settings(lab, "carol"))  # fmt: skip
    ours = phone(lab, "hb", "caller", f"{HB}:5090", f"{P2}:5060", "sip:ua@p2p.example", 440,
                 settings(lab, "ua"))  # fmt: skip
    before = relayed_packets(lab)
    ours_said, carol_said = sip_call(lab, ours, carol, "sip:carol@p2p.example")
    assert "a=ice-ufrag" in ours_said["answer"], ours_said
    assert "relay" in ours_said["candidates"] and "relay" in carol_said["candidates"], (ours_said, carol_said)
    assert ours_said["state"] == carol_said["state"] == "connected", (ours_said, carol_said)
    assert ours_said["heard"] == 1000 and carol_said["heard"] == 440, (ours_said, carol_said)
    assert ours_said["seconds"] >= 3 and carol_said["seconds"] >= 3, (ours_said, carol_said)
    assert "relay" not in (ours_said["local_type"], ours_said["remote_type"]), ours_said
    assert "relay" not in (carol_said["local_type"], carol_said["remote_type"]), carol_said
    assert carol_said["remote_type"] in ("srflx", "prflx"), carol_said  # NAT B's mapping, not a private host
    # 3 s of audio each way would be > 300 relayed packets; checks on the relayed pairs are a few dozen
    assert relayed_packets(lab) - before < 100
    # P1 listens on UDP only: P2 forwarded the large INVITE over UDP once TCP was refused
    assert lab.status("p2")["counters"]["sip_tcp_refused_udp_retry"] >= 1


def hold_allocations(lab: Lab, user: str, count: int) -> subprocess.Popen[str]:
    """A process behind NAT A holding ``count`` allocations as ``user`` (P1's turn_per_user is 4) until
    its stdin closes."""
    wait_for(lambda: lab.status("p1")["counters"].get("turn_allocations", 0) == 0, 30,
             "earlier calls' relays freed")  # fmt: skip
    holder = agent(lab, "ha", HA, "quota", 0, settings(lab, user, relay_only=True, count=count))
    assert line(holder) == {"opened": count}
    return holder


def release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(20)


@pytest.mark.netns
def test_a_relay_refused_beyond_the_quota_the_call_takes_the_direct_path(lab: Lab) -> None:
    """Our UA's user holds its 4 allocations elsewhere: its call's allocation is refused (486, counted in
    P1's status) and ICE goes on without a relayed candidate; the direct path carries the call."""
    ensure_p2(lab)
    refused = lab.status("p1")["counters"].get("turn_refused_quota", 0)
    holder = hold_allocations(lab, "ua", 4)
    try:
        carol = phone(lab, "p2", "callee", f"{P2}:5091", f"{P1}:5060", "sip:carol2@p2p.example", 1000,
                      settings(lab, "carol"))  # fmt: skip
        ours = phone(lab, "hb", "caller", f"{HB}:5091", f"{P2}:5060", "sip:ua@p2p.example", 440,
                     settings(lab, "ua"))  # fmt: skip
        ours_said, carol_said = sip_call(lab, ours, carol, "sip:carol2@p2p.example")
    finally:
        release(holder)
    assert ours_said["relay_missing"] and "relay" not in ours_said["candidates"], ours_said
    assert ours_said["state"] == carol_said["state"] == "connected", (ours_said, carol_said)
    assert ours_said["heard"] == 1000 and carol_said["heard"] == 440, (ours_said, carol_said)
    assert lab.status("p1")["counters"]["turn_refused_quota"] == refused + 1


@pytest.mark.netns
def test_a_relay_only_phone_refused_a_relay_declines_the_call_with_488(lab: Lab) -> None:
    """dave takes calls over a relay only (he shows no address of his own); his user's quota is used up,
    so his allocation is refused (486, counted): he declines the INVITE with 488 and the reason, which
    our caller gets through the overlay (no call left ringing, no traceback). Not 503: proxies turn a 503
    into 500 and its reason is lost (RFC 3261 §16.7)."""
    ensure_p2(lab)
    refused = lab.status("p1")["counters"].get("turn_refused_quota", 0)
    holder = hold_allocations(lab, "dave", 4)
    try:
        dave = phone(lab, "p2", "callee", f"{P2}:5092", f"{P1}:5060", "sip:dave@p2p.example", 1000,
                     settings(lab, "dave", relay_only=True))  # fmt: skip
        ours = phone(lab, "hb", "caller", f"{HB}:5092", f"{P2}:5060", "sip:ua@p2p.example", 440,
                     settings(lab, "ua"))  # fmt: skip
        ours_said, dave_said = sip_call(lab, ours, dave, "sip:dave@p2p.example")
    finally:
        release(holder)
    assert dave_said["declined"] == 488 and "TURN server refused" in dave_said["reason"], dave_said
    assert ours_said["status"] == 488, ours_said
    assert "no media path" in ours_said["reason"] and "TURN server refused" in ours_said["reason"], ours_said
    assert lab.status("p1")["counters"]["turn_refused_quota"] == refused + 1


@pytest.mark.netns
def test_a_relay_only_caller_refused_a_relay_fails_with_503_before_any_invite(lab: Lab) -> None:
    """The caller's own relay-only allocation is refused: ``ua.call`` raises 503 with the reason at once,
    before an INVITE it could not carry leaves (carol's home peer sees no INVITE for her)."""
    ensure_p2(lab)
    holder = hold_allocations(lab, "erin", 4)
    try:
        erin = phone(lab, "hb", "caller", f"{HB}:5093", f"{P2}:5060", "sip:erin@p2p.example", 440,
                     settings(lab, "erin", relay_only=True))  # fmt: skip
        assert erin.stdin is not None
        erin.stdin.write("sip:nobody@p2p.example\n")
        erin.stdin.flush()
        said = line(erin)
        erin.stdin.close()
        erin.wait(20)
    finally:
        release(holder)
    assert said["status"] == 503 and "no media path" in said["reason"], said
    assert "TURN server refused" in said["reason"], said
    assert "nobody@p2p.example" not in lab.log("p2") + lab.log("p1")


def baresip_with_ice(lab: Lab) -> tuple[subprocess.Popen[bytes], Path]:
    """alice: baresip behind NAT A with its ice module (STUN: P1's SIP port), registered through P1 with
    RFC 5626 outbound, answering at once, playing 1 kHz and recording what it decodes (sndfile)."""
    workdir = lab.tmp / "baresip-alice-ice"
    workdir.mkdir(exist_ok=True)
    (workdir / "config").write_text(
        f"sip_listen {HA}:5064\nnet_interface eth0\n"
        "audio_player aufile,/dev/null\naudio_source ausine,1000\naudio_alert aufile,/dev/null\n"
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
    ensure_p2(lab)
    before = relayed_packets(lab)
    proc, log = baresip_with_ice(lab)
    try:
        wait_for(lambda: "200 OK" in log.read_text(errors="replace"), 30, "alice registered",
                 lambda: log.read_text(errors="replace")[-3000:])  # fmt: skip
        caller = phone(lab, "hb", "caller", f"{HB}:5094", f"{P2}:5060", "sip:ua@p2p.example", 440,
                       settings(lab, "ua"))  # fmt: skip
        assert caller.stdin is not None
        caller.stdin.write("sip:alice@p2p.example\n")
        caller.stdin.flush()
        ours = line(caller)
        assert "a=ice-ufrag" in ours.get("answer", ""), ours  # baresip answered our ICE offer with ICE
        # hang up once alice has decoded a second of our tone too (8 kHz, 16 bit: 16,000 bytes a second)
        wait_for(lambda: sum(f.stat().st_size for f in log.parent.glob("dump-*-dec.wav")) > 16_044,
                 30, "alice decoded a second of our audio", tail(log))  # fmt: skip
        caller.stdin.close()
        caller.wait(30)
        assert ours["state"] == "connected", (ours, log.read_text(errors="replace")[-3000:])
        assert ours["heard"] == 1000 and ours["seconds"] >= 3, ours
        assert "relay" in (ours["local_type"], ours["remote_type"]), ours
        assert relayed_packets(lab) - before > 200  # 3 s of audio each way went through P1's relay
    finally:
        proc.terminate()
        proc.wait(10)
    recordings = sorted(log.parent.glob("dump-*-dec.wav"))
    assert recordings, log.read_text(errors="replace")[-3000:]
    from p2psip.media import dominant_frequency
    from p2psip.media.sources import read_wav

    assert dominant_frequency(read_wav(recordings[-1]), [440, 1000, 2000]) == 440
