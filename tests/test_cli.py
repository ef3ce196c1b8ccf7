"""The `p2psip` command as users run it: real child processes on loopback, ended by PID.

`demo` must exit 0; usage errors print one line and exit 2; `start` peers in separate processes form an
overlay, answer `status`/`lookup` on their control socket, carry a call registered with `register` and placed
with `call`, survive their bootstrap peer dying, and leave gracefully on SIGTERM; a restart keeps the node id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

CLI = [sys.executable, "-m", "p2psip.cli"]
ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class StartedPeer:
    """A `p2psip start` child; threads drain its stdout and stderr into lists, so waiting for a log line
    is waiting on a condition, and a chatty peer can never block on a full pipe."""

    def __init__(self, proc: subprocess.Popen[str], data_dir: Path, sip: int, overlay: int) -> None:
        self.proc, self.data_dir, self.sip, self.overlay = proc, data_dir, sip, overlay
        self.out: list[str] = []
        self.err: list[str] = []
        self.changed = threading.Condition()
        for stream, lines in ((proc.stdout, self.out), (proc.stderr, self.err)):
            threading.Thread(target=self._drain, args=(stream, lines), daemon=True).start()

    def _drain(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self.changed:
                lines.append(line)
                self.changed.notify_all()
        with self.changed:
            lines.append("")  # end of stream
            self.changed.notify_all()

    def wait_line(self, marker: str, timeout: float = 30) -> bool:
        """Whether stdout got a line containing ``marker`` within ``timeout`` (False if the peer ended)."""
        with self.changed:
            return self.changed.wait_for(
                lambda: any(marker in line for line in self.out) or (self.out and self.out[-1] == ""),
                timeout,
            ) and any(marker in line for line in self.out)

    def status(self) -> dict:
        done = run("status", "--data-dir", str(self.data_dir), "--json", timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until the peer printed its 'ready' line (its control socket exists) or it died."""
        if not self.wait_line(" ready ", timeout):
            raise AssertionError(f"peer did not become ready: {''.join(self.out)}{''.join(self.err)}")

    def stop(self, timeout: float = 20) -> tuple[int, str, str]:
        """SIGTERM, wait for the exit; returns (status, stdout, stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        with self.changed:
            self.changed.wait_for(lambda: self.out[-1:] == [""] and self.err[-1:] == [""], 10)
        return code, "".join(self.out), "".join(self.err)


@pytest.fixture
def start_peer(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen[str]] = []

    def start(name: str, join: StartedPeer | None = None, *extra: str) -> StartedPeer:
        sip, overlay = free_port(), free_port()
        data_dir = tmp_path / name
        args = [
            "start", "--listen", f"udp:127.0.0.1:{sip}", "--overlay", f"127.0.0.1:{overlay}",
            "--data-dir", str(data_dir), *extra,
        ]  # fmt: skip
        if join is not None:
            args += ["--join", f"127.0.0.1:{join.overlay}"]
        proc = subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        procs.append(proc)
        peer = StartedPeer(proc, data_dir, sip, overlay)
        peer.wait_ready()
        return peer

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_demo_runs_and_exits_zero() -> None:
    started = time.monotonic()
    done = run("demo", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "sip:alice@p2p.example" in out and "sip:bob@p2p.example" in out
    assert "(primary)" in out  # who stores what
    assert "lookup path:" in out and "hop" in out  # the lookup
    for step in ("INVITE", "180 Ringing", "200 OK", "ACK", "BYE", "200 OK (BYE)"):
        assert step in out, step
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["start", "--listen", "sctp:127.0.0.1:5060"], "unknown transport"),
        (["start", "--overlay", "127.0.0.1"], "needs a port"),
        (["start", "--route", "nohop"], "DOMAIN=HOST:PORT"),
        (["start", "--bogus"], "unrecognized arguments"),
        (["call", "not a uri"], "not a SIP"),
        (["register", "sip:alice@p2p.example"], "--via"),
        (["demo", "--peers", "1"], "between 3 and 20"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], fragment: str) -> None:
    done = run(*args)
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_bad_config_file_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "peer.toml"
    config.write_text("dns = 1\n")
    done = run("start", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip() == "p2psip: error: config: dns must be true or false, got int 1"


def test_status_without_a_peer_exit_1(tmp_path: Path) -> None:
    done = run("status", "--data-dir", str(tmp_path))
    assert done.returncode == 1 and "no peer is running" in done.stderr


def test_peers_in_processes_register_call_lookup_and_leave(start_peer, tmp_path: Path) -> None:
    a = start_peer("a")
    b = start_peer("b", a)
    c = start_peer("c", a, "-v")
    status = a.status()
    assert status["successors"], status
    assert {s["addr"] for s in status["successors"]} <= {f"127.0.0.1:{b.overlay}", f"127.0.0.1:{c.overlay}"}
    # a callee: a phone registered at b answers through the `call` command placed at c
    phone_port = free_port()
    callee = subprocess.Popen(
        [sys.executable, "-c", CALLEE, str(phone_port)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert callee.stdout is not None and callee.stdout.readline().strip() == "ready"
        reg = run(
            "register", "sip:bob@p2p.example", "--via", f"127.0.0.1:{b.sip}",
            "--contact", f"sip:bob@127.0.0.1:{phone_port}", "--json",
        )  # fmt: skip
        assert reg.returncode == 0, reg.stderr
        assert json.loads(reg.stdout)["contacts"][0]["contact"] == f"sip:bob@127.0.0.1:{phone_port}"
        looked = run("lookup", "sip:bob@p2p.example", "--data-dir", str(a.data_dir), "--json")
        assert looked.returncode == 0, looked.stderr
        found = json.loads(looked.stdout)
        assert [x["contact"] for x in found["bindings"]] == [f"sip:bob@127.0.0.1:{phone_port}"]
        assert len(found["holders"]) == 3  # r = 3 copies on a 3-peer ring
        human = run("lookup", "sip:bob@p2p.example", "--data-dir", str(a.data_dir))
        assert "stored at:" in human.stdout and f"127.0.0.1:{phone_port}" in human.stdout
        call = run("call", "sip:bob@p2p.example", "--via", f"127.0.0.1:{c.sip}", "--duration", "0", "--json")
        assert call.returncode == 0, call.stdout + call.stderr
        result = json.loads(call.stdout)
        assert result["answered"] and result["bye_status"] == 200
        nobody = run("lookup", "sip:nobody@p2p.example", "--data-dir", str(c.data_dir))
        assert nobody.returncode == 1 and "nobody is registered" in nobody.stdout
    finally:
        callee.kill()
        callee.wait(timeout=5)
    # the bootstrap peer dies: b and c keep the ring and the registration
    a.proc.kill()
    a.proc.wait(timeout=10)
    # c logs a "ring" line when its neighbours change: that line is the event to wait for (bounded)
    assert c.wait_line(" ring ", timeout=60), "c never logged its new ring neighbours"
    looked = run("lookup", "sip:bob@p2p.example", "--data-dir", str(c.data_dir), "--json")
    assert looked.returncode == 0 and json.loads(looked.stdout)["bindings"], looked.stdout + looked.stderr
    # SIGTERM: a graceful leave, exit status 0, the log says so; -v printed a SIP trace on stderr
    code, out, err = c.stop()
    assert code == 0
    assert "left the overlay" in out
    assert "INVITE sip:bob@p2p.example SIP/2.0" in err


def test_start_with_per_user_scripts(start_peer, tmp_path: Path) -> None:
    """`--scripts DIR` installs sipapi per-user scripts: bob's script answers every call 486."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bob@p2p.example.py").write_text(
        "def busy(event):\n"
        "    event.action.reject(code=486, reason='Busy Here')\n\n"
        "basic.addEventListener('incoming', busy)\n"
    )
    peer = start_peer("scripted", None, "--scripts", str(scripts))
    call = run("call", "sip:bob@p2p.example", "--via", f"127.0.0.1:{peer.sip}", "--json", "--timeout", "20")
    assert call.returncode == 1, call.stdout + call.stderr
    assert json.loads(call.stdout)["status"] == 486
    bad = run("start", "--scripts", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "not a directory" in bad.stderr


def test_second_peer_on_the_same_data_dir_is_refused(start_peer) -> None:
    a = start_peer("a")
    done = run(
        "start", "--listen", f"udp:127.0.0.1:{free_port()}", "--overlay", f"127.0.0.1:{free_port()}",
        "--data-dir", str(a.data_dir),
    )  # fmt: skip
    assert done.returncode == 1 and "already runs" in done.stderr
    assert a.status()["node_id"]  # the first one is unharmed


def test_status_says_full_or_client_and_why(start_peer) -> None:
    """Each joining peer is probed (overlay.reach): the bootstrap has another peer ping it; status shows
    the outcome, the address learned and who probed."""
    a = start_peer("a")
    b = start_peer("b", a)
    c = start_peer("c", a)
    assert a.status()["reach"]["reason"] == "created the ring"
    alone = b.status()["reach"]
    assert alone["mode"] == "full" and "no other peer" in alone["reason"], alone
    probed = c.status()["reach"]
    assert probed["mode"] == "full" and "reachable" in probed["reason"], probed
    assert probed["seen"] == probed["endpoint"] == f"127.0.0.1:{c.overlay}"
    assert probed["probed_by"] == f"127.0.0.1:{b.overlay}"
    human = run("status", "--data-dir", str(c.data_dir))
    assert f"full peer at 127.0.0.1:{c.overlay}: learned from the bootstrap; reachable" in human.stdout
    assert f"probed by 127.0.0.1:{b.overlay}" in human.stdout


def test_start_client_joins_as_a_client_peer_and_status_says_so(start_peer) -> None:
    """``--client`` (docs/nat.md, Client peers): the peer attaches to its --join peer instead of taking a
    place in the ring; both statuses say so."""
    a = start_peer("a")
    b = start_peer("b", a, "--client")
    assert "as a client peer" in "".join(b.out)

    def flow_made() -> bool:
        return bool(b.status()["client"]["sip_flow"]["path"])

    deadline = time.monotonic() + 20
    while not flow_made():
        assert time.monotonic() < deadline, "".join(b.out) + "".join(b.err)
        time.sleep(0.1)
    status = b.status()
    assert status["reach"]["mode"] == "client" and status["successors"] == []
    human = run("status", "--data-dir", str(b.data_dir)).stdout
    short = a.status()["node_id"][:8]
    assert (
        f"client peer, attached to 127.0.0.1:{a.overlay} ({short}), because: configured as a client peer"
        in human
    ), human
    assert f"SIP flow to the attach peer 127.0.0.1:{a.sip}: Path <sip:" in human, human
    attach_status = run("status", "--data-dir", str(a.data_dir)).stdout
    assert "attached client peers: 1 (1 with a SIP flow)" in attach_status, attach_status


def test_joining_through_a_client_peer_is_one_line_exit_2(start_peer, tmp_path: Path) -> None:
    """A client peer cannot admit anybody (docs/nat.md): a peer given one as --join says so in one line
    and exits 2, whether it would join as a full peer or as a client peer itself."""
    a = start_peer("a")
    b = start_peer("b", a, "--client")
    for extra in ([], ["--client"]):
        sip, overlay = free_port(), free_port()
        done = run(
            "start", "--listen", f"udp:127.0.0.1:{sip}", "--overlay", f"127.0.0.1:{overlay}",
            "--data-dir", str(tmp_path / f"joiner{len(extra)}"), "--join", f"127.0.0.1:{b.overlay}", *extra,
        )  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines == [
            f"p2psip: error: 127.0.0.1:{b.overlay} is a client peer and cannot admit others;"
            f" join through a full peer (its attach peer 127.0.0.1:{a.overlay} is one)"
        ], done.stderr


def test_client_without_join_is_one_line_exit_2() -> None:
    done = run("start", "--client")
    assert done.returncode == 2 and "--client needs --join" in done.stderr, done.stderr


def test_restart_keeps_node_identity(start_peer) -> None:
    a = start_peer("a")
    first_id = a.status()["node_id"]
    human = run("status", "--data-dir", str(a.data_dir))
    assert human.returncode == 0 and first_id in human.stdout
    for section in ("predecessor:", "successors:", "stored entries:", "counters:", "sip_received"):
        assert section in human.stdout, section
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=20) == 0
    again = start_peer("a")
    assert again.status()["node_id"] == first_id


CALLEE = """
import asyncio, sys
from p2psip.stack import Stack
from p2psip.useragent import UserAgent

def answer(incoming):
    incoming.ring()
    incoming.accept()

async def main():
    stack = await Stack.start([f"udp:127.0.0.1:{int(sys.argv[1])}"])
    UserAgent(stack, "sip:bob@p2p.example", on_call=answer)
    print("ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_peers_stopped_together_print_no_traceback(start_peer) -> None:
    """SIGTERM to every peer at the same moment, each with an overlay TCP connection still open (half a
    frame sent, as a transfer cut short would leave it): each exits 0, and stderr holds no traceback."""
    import socket

    first = start_peer("s1")
    peers = [first, start_peer("s2", first), start_peer("s3", first)]
    held = []
    for peer in peers:
        conn = socket.create_connection(("127.0.0.1", peer.overlay), timeout=5)
        conn.sendall(b"\x00\x00")  # the handler now waits for the rest of the frame header
        held.append(conn)
    try:
        for peer in peers:
            peer.proc.send_signal(signal.SIGTERM)
        for peer in peers:
            code = peer.proc.wait(timeout=30)
            with peer.changed:
                peer.changed.wait_for(lambda p=peer: p.err[-1:] == [""], 10)
            err = "".join(peer.err)
            assert code == 0 and "Traceback" not in err and "CancelledError" not in err, err
    finally:
        for conn in held:
            conn.close()


def test_verbose_trace_is_stamped_and_shows_dht_lookups(start_peer) -> None:
    """-v: every traced message starts with the time to the millisecond, and the peer's DHT reads are
    traced too (a new AOR's REGISTER reads nothing: the peer that holds its only user key writes at once;
    `lookup` reads)."""
    import re

    peer = start_peer("v1", None, "-v")
    done = run("register", "sip:bob@p2p.example", "--via", f"127.0.0.1:{peer.sip}", timeout=60)
    assert done.returncode == 0, done.stderr
    looked = run("lookup", "sip:bob@p2p.example", "--data-dir", str(peer.data_dir))
    assert looked.returncode == 0, looked.stderr
    code, _out, err = peer.stop()
    assert code == 0, err
    arrows = [line for line in err.splitlines() if "<< from " in line or ">> to " in line]
    assert arrows and all(re.match(r"\d\d:\d\d:\d\d\.\d{3} (<< from|>> to) udp:", line) for line in arrows), (
        arrows
    )
    assert re.search(
        r"^\d\d:\d\d:\d\d\.\d{3} DHT get sip:bob@p2p.example \(key [0-9a-f]+\) from node ", err, re.M
    ), err


def test_register_stay_is_an_outbound_phone_until_stopped(start_peer, tmp_path: Path) -> None:
    """`register --stay`: the command is the phone (RFC 5626 instance and reg-id; the peer keeps a flow to
    it), receives a MESSAGE and a call through the overlay, and unregisters on SIGTERM."""
    a = start_peer("a")
    b = start_peer("b", a)
    aor = "sip:carol@p2p.example"
    proc = subprocess.Popen(
        [*CLI, "register", aor, "--via", f"127.0.0.1:{b.sip}", "--stay"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    phone = StartedPeer(proc, tmp_path, 0, 0)  # only its line-draining threads are used
    try:
        assert phone.wait_line("staying registered", 30), "".join(phone.out) + "".join(phone.err)
        assert "an RFC 5626 flow the peer keeps" in "".join(phone.out)
        looked = run("lookup", aor, "--data-dir", str(a.data_dir), "--json")
        assert looked.returncode == 0, looked.stderr
        (binding,) = json.loads(looked.stdout)["bindings"]
        assert binding["path"], binding  # reached through its home peer b and the flow b keeps
        sent = run("message", aor, "hello carol", "--via", f"127.0.0.1:{a.sip}")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert phone.wait_line("MESSAGE from", 10) and "hello carol" in "".join(phone.out)
        call = run("call", aor, "--via", f"127.0.0.1:{a.sip}", "--json", "--timeout", "20")
        assert call.returncode == 1 and json.loads(call.stdout)["status"] == 480, call.stdout + call.stderr
        assert phone.wait_line("call from", 10)
        code, out, err = phone.stop()
        assert code == 0 and "unregistered" in out and "Traceback" not in err, out + err
        gone = run("lookup", aor, "--data-dir", str(a.data_dir))
        assert gone.returncode == 1 and "nobody is registered" in gone.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    usage = run("register", aor, "--via", f"127.0.0.1:{b.sip}", "--stay", "--expires", "0")
    assert usage.returncode == 2 and "--stay" in usage.stderr
