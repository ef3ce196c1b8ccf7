"""The NAT lab (tests/netns/natlab.py): real NAT routers (nftables masquerade) between phones and peers.

- P1 and P2 are full peers on the "internet" subnet; alice is a baresip behind NAT A (plain masquerade,
  port-restricted), registered through P1 with RFC 5626 outbound (``;sipnat=outbound``); carol is our own
  UserAgent behind NAT B (``masquerade fully-random``), registered through P2.
- carol calls alice and alice calls carol, both answered (signalling: the audio is the media issue's); the
  calls cross both NATs only over the flows the phones opened to their home peers.
- carol's call enters at P2; alice's per-user script runs on her home peer P1, once (P2 has the same script
  and does not run it).
- alice's flow dies (her link goes down and router A forgets its mappings): her binding is gone within the
  flow timer; her REGISTER (a restarted baresip) restores it.
- bob, a baresip without outbound support behind NAT A, stays callable long past the router's conntrack UDP
  timeout (3 s here) thanks to P1's NAT pings (every second here); ivan, the same beside him, registered at
  P8 whose pings come once an hour, is not.

Under CI=true nothing here is skipped: a missing tool or namespace support is a failure.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import in_ci

from .natlab import HA, HB, P1, P2, RA_OUT, RB_OUT, NatLab, why_unavailable

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "p2psip.cli"]
MODULES = "/usr/lib/baresip/modules"
FLOW_TIMER = 4
ALICE = "sip:alice@p2p.example"

UA = r"""
import asyncio, sys, uuid
from p2psip.stack import Stack
from p2psip.useragent import CallFailed, UserAgent

SDP = (b"v=0\r\no=p2psip 1 1 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")

async def main():
    host, peer, aor, port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    stack = await Stack.start([f"udp:{host}:{port}"])
    def on_call(call):
        call.ring()
        call.accept(SDP)
        print("answered", call.caller.uri, flush=True)
    ua = UserAgent(stack, aor, outbound=peer, on_call=on_call, instance=f"<urn:uuid:{uuid.uuid4()}>")
    await ua.register("sip:p2p.example", expires=120)
    print("registered", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        words = line.split()  # call URI [TIMEOUT]
        try:
            call = await ua.call(words[1], body=SDP, timeout=float(words[2]) if len(words) > 2 else 20)
            bye = await call.bye()
            print("call", 200, bye.status, flush=True)
        except (CallFailed, TimeoutError) as exc:
            print("call", getattr(exc, "status", 408), 0, flush=True)

asyncio.run(main())
"""

SCRIPT = """
def incoming(event):
    with open({log!r}, 'a') as f:
        f.write(event.method + '\\n')
    event.action.proxy(timeout=15)

basic.addEventListener('incoming', incoming)
"""


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str] = lambda: ""
) -> float:
    """Poll (bounded) a condition read from outside the processes (their logs, a peer's control socket)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s\n{detail()}")
        time.sleep(0.2)
    return time.monotonic() - started


class Lab:
    def __init__(self, net: NatLab, tmp: Path) -> None:
        self.net = net
        self.tmp = tmp
        self.peers: dict[str, subprocess.Popen[Any]] = {}
        self.baresips: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start_peer(
        self,
        name: str,
        address: str,
        join: str | None,
        scripts: Path | None = None,
        *,
        ns: str | None = None,
        sip: int = 5060,
        overlay: str | None = None,
        extra: tuple[str, ...] = (),
        nat_ping: float = 1.0,
    ) -> None:
        config = self.tmp / f"{name}.toml"
        config.write_text(f"flow_timer = {FLOW_TIMER}\nnat_ping = {nat_ping}\nmin_expires = 30\n")
        args = [*CLI, "start", "--listen", f"udp:{address}:{sip}", "--overlay", overlay or f"{address}:7060",
                "--data-dir", str(self.tmp / name), "--config", str(config), *extra]  # fmt: skip
        if scripts is not None:
            args += ["--scripts", str(scripts)]
        if join:
            args += ["--join", f"{join}:7060"]
        log = self.tmp / f"{name}.log"
        proc = self.net.popen(
            ns or name, args, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        self.peers[name] = proc
        wait_for(lambda: " ready " in log.read_text() or proc.poll() is not None, 60, f"peer {name} ready")
        assert proc.poll() is None, log.read_text()

    def log(self, name: str) -> str:
        """A peer's log (one line per event: registered, routed, flow failed...)."""
        return (self.tmp / f"{name}.log").read_text()

    def status(self, peer: str, ns: str | None = None) -> dict[str, Any]:
        done = self.net.run(ns or peer, [*CLI, "status", "--data-dir", str(self.tmp / peer), "--json"],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr
        status: dict[str, Any] = json.loads(done.stdout)
        return status

    def lookup(self, peer: str, aor: str, ns: str | None = None) -> list[dict[str, Any]]:
        done = self.net.run(ns or peer, [*CLI, "lookup", aor, "--data-dir", str(self.tmp / peer), "--json"],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        if done.returncode != 0:
            return []
        bindings: list[dict[str, Any]] = json.loads(done.stdout)["bindings"]
        return bindings

    def baresip(
        self,
        user: str,
        host: str,
        address: str,
        port: int,
        *,
        outbound: bool,
        peer: str,
        peer_port: int = 5060,
    ) -> Path:
        workdir = self.tmp / f"baresip-{user}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        (workdir / "config").write_text(
            f"sip_listen {address}:{port}\n"
            "net_interface eth0\n"
            "audio_player aufile,/dev/null\naudio_source ausine,440\naudio_alert aufile,/dev/null\n"
            "ausrc_srate 48000\nausrc_channels 2\n"
            f"module_path {MODULES}\n"
            "module g711.so\nmodule ausine.so\nmodule aufile.so\nmodule cons.so\n"
            f"cons_listen 127.0.0.1:{port + 1000}\n"
            "module_tmp uuid.so\nmodule_app account.so\nmodule_app menu.so\n"
        )
        nat = ";sipnat=outbound" if outbound else ""
        (workdir / "accounts").write_text(
            f'<sip:{user}@p2p.example>;outbound="sip:{peer}:{peer_port}"{nat};regint=60;'
            "audio_codecs=PCMU;answermode=auto\n"
        )
        (workdir / "contacts").write_text("")
        log = workdir / "baresip.log"
        proc = self.net.popen(host, ["baresip", "-f", str(workdir), "-t", "300"], stdin=subprocess.DEVNULL,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
        self.baresips[user] = (proc, log)
        return log

    def stop_baresip(self, user: str) -> None:
        proc, _ = self.baresips.pop(user)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def cons(self, host: str, port: int, command: str) -> None:
        """A command to a baresip's ``cons`` UDP port (inside its namespace)."""
        send = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.sendto(sys.argv[1].encode() + b'\\n', ('127.0.0.1', int(sys.argv[2])))")  # fmt: skip
        self.net.run(host, [sys.executable, "-c", send, command, str(port + 1000)], check=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = why_unavailable()
    if reason is None and shutil.which("baresip") is None:
        reason = "baresip is not installed"
    if reason is not None:
        if in_ci():
            pytest.fail(f"the NAT lab is required under CI=true: {reason}")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("natlab")
    with NatLab() as net:
        made = Lab(net, tmp)
        for name in ("p1", "p2"):
            scripts = tmp / f"scripts-{name}"
            scripts.mkdir()
            log = tmp / f"alice-script-{name}.log"
            (scripts / "alice@p2p.example.py").write_text(SCRIPT.format(log=str(log)))
        made.start_peer("p1", P1, None, tmp / "scripts-p1")
        made.start_peer("p2", P2, P1, tmp / "scripts-p2")
        yield made


def log_has(log: Path, text: str) -> Callable[[], bool]:
    return lambda: text in log.read_text(errors="replace")


def tail(log: Path) -> Callable[[], str]:
    return lambda: log.read_text(errors="replace")[-3000:]


@pytest.mark.netns
@pytest.mark.interop
def test_calls_across_two_nats_run_the_script_on_the_home_peer_and_a_dead_flow_loses_its_binding(
    lab: Lab,
) -> None:
    alice_log = lab.baresip("alice", "ha", HA, 5060, outbound=True, peer=P1)
    wait_for(log_has(alice_log, "200 OK"), 30, "alice's REGISTER through NAT A", tail(alice_log))
    [binding] = lab.lookup("p2", ALICE)
    assert binding["contact"].startswith("sip:alice") and HA in binding["contact"]  # her private address
    carol = lab.net.popen("hb", [sys.executable, "-c", UA, HB, f"{P2}:5060", "sip:carol@p2p.example", "5070"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT)  # fmt: skip
    assert carol.stdout is not None and carol.stdin is not None
    assert carol.stdout.readline().strip() == "registered", carol.stderr.read() if carol.stderr else ""

    # carol (behind NAT B) calls alice (behind NAT A): the call enters at P2 and goes through P1
    carol.stdin.write(f"call {ALICE}\n")
    carol.stdin.flush()
    assert carol.stdout.readline().split() == ["call", "200", "200"]
    scripts = {p: lab.tmp / f"alice-script-{p}.log" for p in ("p1", "p2")}
    assert scripts["p1"].read_text().splitlines() == ["INVITE"]  # on her home peer, once
    assert not scripts["p2"].exists()

    # alice calls carol
    lab.cons("ha", 5060, "/dial sip:carol@p2p.example")
    line = carol.stdout.readline().split()
    assert line[:2] == ["answered", ALICE], line
    wait_for(log_has(alice_log, "Call established: sip:carol@p2p.example"), 20, "alice's call answered")
    lab.cons("ha", 5060, "/hangup")

    # router B forgets carol's mapping; fully random, her next keep-alive leaves from another port: our UA
    # sees another reflexive address in the STUN answer, takes the flow for failed and registers again,
    # so P2 (whose old flow now stays silent and fails) still reaches her after several flow timers
    lab.net.flush_mappings("rb")
    time.sleep(3 * FLOW_TIMER)  # the point: longer than P2 keeps a silent outbound flow (FLOW_TIMER + 1 s)
    assert lab.lookup("p2", "sip:carol@p2p.example"), lab.log("p2")
    lab.cons("ha", 5060, "/dial sip:carol@p2p.example")
    line = carol.stdout.readline().split()
    assert line[:2] == ["answered", ALICE], line
    lab.cons("ha", 5060, "/hangup")

    # alice's flow dies: her link goes down and router A forgets its mappings
    lab.net.link("ha", up=False)
    lab.net.flush_mappings("ra")
    took = wait_for(lambda: not lab.lookup("p2", ALICE), 4 * FLOW_TIMER + 10, "alice's binding removed")
    # within the flow timer: P1 drops a silent outbound flow after FLOW_TIMER + 1 s of grace (RFC 5626
    # §4.4.1), then removes the binding; a few seconds more for the polling `p2psip lookup` processes
    assert took < FLOW_TIMER + 1 + 6, took
    # her phone comes back and registers again (a restarted baresip): the binding is back
    lab.net.link("ha", up=True)
    lab.stop_baresip("alice")
    alice_log = lab.baresip("alice", "ha", HA, 5060, outbound=True, peer=P1)
    wait_for(lambda: bool(lab.lookup("p2", ALICE)), 30, "alice's binding restored")
    carol.stdin.write(f"call {ALICE}\n")
    carol.stdin.flush()
    assert carol.stdout.readline().split() == ["call", "200", "200"]
    lab.stop_baresip("alice")


@pytest.mark.netns
@pytest.mark.interop
def test_nat_pings_keep_a_phone_without_outbound_callable_past_the_conntrack_timeout(lab: Lab) -> None:
    """bob registers at P1 (NAT pings every second), ivan, the same kind of phone beside him, at P8 on P1's
    host whose pings come once an hour: after the same idle time, bob is called and ivan is not. (P8 is a
    ring of its own, so the ring P1 and P2 form, and the probes the tests below check, stay as they are.)"""
    lab.net.udp_timeout("ra", 3)
    lab.start_peer("p8", P1, None, ns="p1", sip=5063, overlay=f"{P1}:7063", nat_ping=3600)
    bob_log = lab.baresip("bob", "ha", HA, 5062, outbound=False, peer=P1)
    ivan_log = lab.baresip("ivan", "ha", HA, 5066, outbound=False, peer=P1, peer_port=5063)
    wait_for(log_has(bob_log, "200 OK"), 30, "bob's REGISTER through NAT A", tail(bob_log))
    wait_for(log_has(ivan_log, "200 OK"), 30, "ivan's REGISTER through NAT A", tail(ivan_log))
    time.sleep(8)  # the point of the test: idle far longer than the router keeps an unused mapping (3 s)
    dave = lab.net.popen("hb", [sys.executable, "-c", UA, HB, f"{P2}:5060", "sip:dave@p2p.example", "5072"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)  # fmt: skip
    assert dave.stdout is not None and dave.stdin is not None
    assert dave.stdout.readline().strip() == "registered"
    dave.stdin.write("call sip:bob@p2p.example\n")
    dave.stdin.flush()
    assert dave.stdout.readline().split() == ["call", "200", "200"]
    assert lab.status("p1")["counters"]["peer_nat_pings"] >= 5
    # without NAT pings router A has forgotten ivan's mapping: P8's INVITE over his flow reaches nobody
    dora = ua(lab, "sip:dora@p2p.example", f"{P1}:5063", 5078)
    assert dora.stdout is not None and dora.stdin is not None
    dora.stdin.write("call sip:ivan@p2p.example 6\n")
    dora.stdin.flush()
    assert dora.stdout.readline().split()[1] != "200", lab.log("p8")
    assert "INVITE sip:ivan@p2p.example" in lab.log("p8")  # P8 sent it, over his flow
    assert "answering call" not in ivan_log.read_text(errors="replace")
    assert lab.status("p8", ns="p1")["counters"]["peer_nat_pings"] == 0
    lab.stop_baresip("bob")
    lab.stop_baresip("ivan")
    lab.peers["p8"].terminate()
    lab.peers.pop("p8").wait(timeout=20)


def ua(lab: Lab, aor: str, peer: str, port: int) -> subprocess.Popen[str]:
    """Our UserAgent behind NAT B (host B), registered at ``peer`` (HOST:PORT); reads ``call URI`` lines."""
    proc = lab.net.popen("hb", [sys.executable, "-c", UA, HB, peer, aor, str(port)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "registered", proc.stderr.read() if proc.stderr else ""
    return proc


@pytest.mark.netns
@pytest.mark.interop
def test_a_peer_behind_a_port_forwarding_router_is_a_full_peer(lab: Lab) -> None:
    # router A forwards 7070 (overlay) and 5070 (SIP) to host A; the peer there binds a wildcard overlay
    # address and advertises router A's outer address
    lab.net.forward_port("ra", 7070, HA)
    lab.net.forward_port("ra", 5070, HA)
    lab.start_peer("p4", HA, P1, ns="ha", sip=5070, overlay="0.0.0.0:7070",
                   extra=("--advertise", f"{RA_OUT}:7070"))  # fmt: skip

    def in_ring() -> bool:
        status = lab.status("p1")
        near = [status.get("predecessor") or {}, *status.get("successors", [])]
        return any(n.get("addr") == f"{RA_OUT}:7070" for n in near)

    wait_for(in_ring, 60, "the port-forwarded peer in P1's ring neighbours", lambda: lab.log("p4"))
    status = lab.status("p4", ns="ha")
    assert status["predecessor"] is not None
    # it is full because the probe said so: P1 (its bootstrap) had P2 ping router A's forwarded port
    reach = status["reach"]
    assert reach["mode"] == "full" and reach["endpoint"] == f"{RA_OUT}:7070", reach
    assert reach["probed_by"] == f"{P2}:7060" and "advertised; reachable" in reach["reason"], reach
    # a phone registered at it (its home peer, reached through router A's forwarding) is called from P2
    erin = ua(lab, "sip:erin@p2p.example", f"{RA_OUT}:5070", 5074)
    frank = ua(lab, "sip:frank@p2p.example", f"{P2}:5060", 5076)
    assert frank.stdin is not None and frank.stdout is not None and erin.stdout is not None
    assert len(lab.lookup("p2", "sip:erin@p2p.example")) == 1  # the DHT, seen from another peer
    frank.stdin.write("call sip:erin@p2p.example\n")
    frank.stdin.flush()
    assert frank.stdout.readline().split() == ["call", "200", "200"], lab.log("p4")
    assert erin.stdout.readline().split()[:2] == ["answered", "sip:frank@p2p.example"]


def start_refused(
    lab: Lab, name: str, ns: str, address: str, overlay: str
) -> subprocess.CompletedProcess[str]:
    """``p2psip start`` of a peer that the probe finds unreachable, with client peers off: it must exit,
    not join."""
    config = lab.tmp / f"{name}.toml"
    config.write_text("client_peers = false\n")
    args = [*CLI, "start", "--listen", f"udp:{address}:5090", "--overlay", overlay, "--data-dir",
            str(lab.tmp / name), "--config", str(config), "--join", f"{P1}:7060"]  # fmt: skip
    return lab.net.run(ns, args, capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.netns
@pytest.mark.interop
def test_the_probe_learns_a_peer_address_and_finds_peers_behind_nats_unreachable(lab: Lab) -> None:
    """overlay.reach through real NATs: a wildcard-bound peer on a public address learns it and is full;
    a peer behind NAT B (fully random) or NAT A (port-restricted) without port forwarding learns the
    router's outer address, and another peer's probe there goes unanswered: it does not join."""
    lab.start_peer("p5", P2, P1, ns="p2", sip=5061, overlay="0.0.0.0:7061")
    reach = lab.status("p5", ns="p2")["reach"]
    assert reach["mode"] == "full" and reach["endpoint"] == f"{P2}:7061", reach
    assert "learned from the bootstrap; reachable" in reach["reason"], reach
    assert reach["probed_by"] in (f"{P2}:7060", f"{RA_OUT}:7070"), reach  # P1's neighbour, not P1
    for name, ns, address, router in (("p6", "hb", HB, RB_OUT), ("p7", "ha", HA, RA_OUT)):
        done = start_refused(lab, name, ns, address, "0.0.0.0:7080")
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"other peers cannot reach this one at {router}:" in done.stderr, done.stderr
        assert "learned from the bootstrap; unreachable" in done.stderr, done.stderr
    p1 = lab.status("p1")
    assert not any(n.get("addr", "").startswith((RA_OUT + ":7080", RB_OUT)) for n in p1.get("successors", []))
    assert p1["counters"]["overlay_probes_answered"] >= 4


@pytest.mark.netns
@pytest.mark.interop
def test_p3_behind_nat_b_becomes_a_client_peer_and_works(lab: Lab) -> None:
    """A real ``p2psip start`` behind router B (fully random, no forwarding) with nothing but ``--join``:
    the probe fails, so it joins as a client peer of P1 by itself, keeps its SIP flow to P1, stores and
    reads through P1, and its phone (our UA beside it on host B) is called from a phone at P2 and calls
    out, every request to it crossing router B over P3's flow."""
    lab.start_peer("p3", HB, P1, ns="hb", sip=5080, overlay="0.0.0.0:7082")
    status = lab.status("p3", ns="hb")
    client = status["client"]
    assert client is not None, status["reach"]
    assert client["attached_to"] == f"{P1}:7060" and client["node"] == lab.status("p1")["node_id"]
    assert "learned from the bootstrap; unreachable" in client["because"], client
    assert status["reach"]["mode"] == "client" and status["predecessor"] is None

    def flow_made() -> bool:
        return bool((lab.status("p3", ns="hb")["client"]["sip_flow"] or {}).get("path"))

    wait_for(flow_made, 30, "P3's SIP flow to P1", lambda: lab.log("p3"))
    [listed] = lab.status("p1")["clients"]["sip"]
    assert listed["node"] == status["node_id"] and listed["sip"].startswith(RB_OUT + ":"), listed

    # a phone registers to P3: its binding is signed by P3's user key and stored through P1 (a put)
    gina = ua(lab, "sip:gina@p2p.example", f"{HB}:5080", 5084)
    [binding] = lab.lookup("p2", "sip:gina@p2p.example")
    attach_hop, client_hop = binding["path"]
    assert f"@{P1}:5060;" in attach_hop and f"@{HB}:5080;" in client_hop, binding["path"]
    # a get through P3 (its attach peer reads for it)
    [seen] = lab.lookup("p3", "sip:gina@p2p.example", ns="hb")
    assert seen["contact"] == binding["contact"]
    # a call for her enters at P2, goes through P1 and over P3's flow through router B to P3, then to her
    harry = ua(lab, "sip:harry@p2p.example", f"{P2}:5060", 5086)
    assert harry.stdin is not None and harry.stdout is not None and gina.stdout is not None
    assert gina.stdin is not None
    harry.stdin.write("call sip:gina@p2p.example\n")
    harry.stdin.flush()
    assert harry.stdout.readline().split() == ["call", "200", "200"], lab.log("p3")
    assert gina.stdout.readline().split()[:2] == ["answered", "sip:harry@p2p.example"]
    # and she calls out: P3 hands the call to P1, which routes it
    gina.stdin.write("call sip:harry@p2p.example\n")
    gina.stdin.flush()
    assert gina.stdout.readline().split() == ["call", "200", "200"], lab.log("p3")
    assert harry.stdout.readline().split()[:2] == ["answered", "sip:gina@p2p.example"]
    # P3's STUN keep-alives hold router B's mapping and P1's flow: idle for three flow timers (P1 drops an
    # outbound flow silent for FLOW_TIMER + 1 s), the flow is the same one and calls still reach gina
    failed = lab.status("p1")["counters"]["peer_flows_failed"]
    time.sleep(3 * FLOW_TIMER)  # the point: longer than P1 keeps a silent flow
    assert lab.status("p3", ns="hb")["client"]["sip_flow"]["registrations"] == 1  # never had to re-register
    assert lab.status("p1")["counters"]["peer_flows_failed"] == failed
    assert lab.status("p1")["clients"]["sip"] == [listed]
    harry.stdin.write("call sip:gina@p2p.example\n")
    harry.stdin.flush()
    assert harry.stdout.readline().split() == ["call", "200", "200"], lab.log("p3")

    # P3 stops (SIGTERM): it un-REGISTERs its flow and detaches, both through router B, so P1 forgets it at
    # once (silence alone would take four keep-alive intervals, 60 s)
    p3 = lab.peers["p3"]
    registers = lab.status("p1")["counters"]["peer_client_registers"]
    p3.send_signal(signal.SIGTERM)
    assert p3.wait(timeout=20) == 0, lab.log("p3")
    assert lab.status("p1")["clients"] == {"overlay": 0, "sip": []}
    assert lab.status("p1")["counters"]["peer_client_registers"] == registers + 1  # the one with Expires: 0
