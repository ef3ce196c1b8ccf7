"""A whole overlay of real `p2psip start` processes stopped and started again with the same data dirs
keeps every unexpired registration (SIGTERM, then SIGKILL: what was answered 200 is on disk, the store
commits before the 200). A binding that lived on a flow of its home peer (here a TCP connection kept as
the phone's flow, p2psip/flows.py) answers 430 Flow Failed after the restart until the device registers
again, while a UDP binding reached at its Contact stays callable. Phones are our UserAgent on loopback;
peers are ended by PID.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from test_cli import CLI, ROOT, StartedPeer, run

from p2psip.errors import CallFailed
from p2psip.stack import Stack
from p2psip.useragent import IncomingCall, UserAgent

pytestmark = pytest.mark.slow
DOMAIN = "p2p.example"


@dataclass
class Slot:
    """One peer's fixed place: its data dir and ports, the same on every start."""

    name: str
    data_dir: Path
    sip: int
    overlay: int
    running: StartedPeer | None = None


class Overlay:
    def __init__(self, tmp: Path, count: int) -> None:
        self.slots = [Slot(f"p{i}", tmp / f"p{i}", free_port(), free_port()) for i in range(count)]
        self.procs: list[subprocess.Popen[str]] = []

    def start_all(self) -> None:
        first = self.slots[0]
        for slot in self.slots:
            args = [
                "start", "--listen", f"127.0.0.1:{slot.sip}", "--overlay", f"127.0.0.1:{slot.overlay}",
                "--data-dir", str(slot.data_dir), "--overlay-name", "restart-test",
            ]  # fmt: skip
            if slot is not first:
                args += ["--join", f"127.0.0.1:{first.overlay}"]
            proc = subprocess.Popen(
                [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
            )
            self.procs.append(proc)
            slot.running = StartedPeer(proc, slot.data_dir, slot.sip, slot.overlay)
            slot.running.wait_ready(60)

    def stop_all(self, sig: signal.Signals) -> list[str]:
        """Signal every peer at once, wait for each to exit; returns their stdouts."""
        running = [s.running for s in self.slots if s.running is not None]
        for peer in running:
            peer.proc.send_signal(sig)
        outs = []
        for peer in running:
            code = peer.proc.wait(timeout=30)
            if sig == signal.SIGTERM:
                assert code == 0, "".join(peer.out + peer.err)
            with peer.changed:
                peer.changed.wait_for(lambda p=peer: p.out[-1:] == [""], 10)  # type: ignore[misc]
            outs.append("".join(peer.out))
        for slot in self.slots:
            slot.running = None
        return outs

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Overlay]:
    ring = Overlay(tmp_path, 4)
    try:
        yield ring
    finally:
        ring.close()


class Phone:
    """A UserAgent on its own loopback stack that answers every call."""

    def __init__(self, stack: Stack, user: str, peer: Slot, transport: str) -> None:
        self.stack = stack
        self.aor = f"sip:{user}@{DOMAIN}"
        self.ua = UserAgent(
            stack, self.aor, outbound=f"{transport}:127.0.0.1:{peer.sip}", on_call=self.answer
        )
        self.answered = 0

    def answer(self, incoming: IncomingCall) -> None:
        self.answered += 1
        incoming.accept()

    @classmethod
    async def open(cls, user: str, peer: Slot, transport: str = "udp") -> Phone:
        return cls(await Stack.start([f"{transport}:127.0.0.1:0"]), user, peer, transport)

    async def register(self, contact: str | None = None) -> None:
        response = await self.ua.register(
            f"sip:{DOMAIN}", expires=3600, refresh=False, timeout=20, contact=contact
        )
        assert response.status == 200, response.status


async def lookup(aor: str, slot: Slot, timeout: float = 60.0) -> list[dict[str, object]]:
    """`p2psip lookup` at ``slot`` until the AOR has bindings (the ring settles after a start)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        done = await asyncio.to_thread(run, "lookup", aor, "--data-dir", str(slot.data_dir), "--json")
        if done.returncode == 0:
            bindings: list[dict[str, object]] = json.loads(done.stdout)["bindings"]
            if bindings:
                return bindings
        if loop.time() > deadline:
            raise AssertionError(f"{aor} not found at {slot.name}: {done.stdout}{done.stderr}")
        await asyncio.sleep(0.5)


async def call(caller: Phone, callee: Phone) -> int:
    """Place a call; 200 when answered (then hung up), else the final status."""
    try:
        outgoing = await caller.ua.call(callee.aor, timeout=20)
    except CallFailed as failed:
        return failed.status
    await outgoing.bye()
    return 200


async def test_whole_overlay_restart_keeps_registrations_tcp_flows_answer_430(overlay: Overlay) -> None:
    p = overlay.slots
    await asyncio.to_thread(overlay.start_all)
    alice = await Phone.open("alice", p[1])
    carol = await Phone.open("carol", p[2])
    bob = await Phone.open("bob", p[3], "tcp")
    # bob's Contact is not where his REGISTER came from (as behind a NAT; nothing listens there): p3 keeps
    # his TCP connection as his flow and reaches him over it (home-peer routing, p2psip/flows.py)
    bob_port = bob.stack.local_address("tcp")[1]
    bob_contact = f"sip:bob@127.0.0.2:{bob_port};transport=tcp"
    # erin is a UDP phone "behind a NAT" the same way: p1 reaches her at her observed address through the
    # flow token in her Path, which names that address and outlives p1's restart (its key is in p1's data dir)
    erin = await Phone.open("erin", p[1])
    erin_contact = f"sip:erin@127.0.0.2:{erin.stack.local_address('udp')[1]}"
    contacts = {bob: bob_contact, erin: erin_contact}
    phones = [alice, carol, bob, erin]
    try:
        for phone in phones:
            await phone.register(contacts.get(phone))
        assert await call(carol, alice) == 200 and await call(carol, bob) == 200
        assert await call(carol, erin) == 200

        outs = await asyncio.to_thread(overlay.stop_all, signal.SIGTERM)
        assert all("left the overlay" in out and "in the data dir" in out for out in outs), outs
        await asyncio.to_thread(overlay.start_all)
        for phone in phones:
            assert await lookup(phone.aor, p[0]), phone.aor
        assert await call(carol, alice) == 200  # UDP, no outbound: callable as before
        assert await call(alice, erin) == 200  # UDP through her flow token: callable, no re-REGISTER
        assert await call(alice, bob) == 430  # his connection died with p3's restart
        await bob.register(bob_contact)  # a new flow
        assert await call(alice, bob) == 200

        # SIGKILL: no hand-off, no clean close; what got a 200 is on disk
        dave = await Phone.open("dave", p[0])
        phones.append(dave)
        await dave.register()
        await asyncio.to_thread(overlay.stop_all, signal.SIGKILL)
        await asyncio.to_thread(overlay.start_all)
        for phone in phones:
            assert await lookup(phone.aor, p[1]), phone.aor
        assert await call(carol, dave) == 200
        assert await call(dave, alice) == 200
        assert alice.answered >= 3 and dave.answered == 1
    finally:
        for phone in phones:
            await phone.stack.close()


def test_lone_peer_stop_says_what_stays_in_the_data_dir(tmp_path: Path) -> None:
    slot = Slot("lone", tmp_path / "lone", free_port(), free_port())
    args = ["start", "--listen", f"udp:127.0.0.1:{slot.sip}", "--overlay", f"127.0.0.1:{slot.overlay}",
            "--data-dir", str(slot.data_dir)]  # fmt: skip
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        peer = StartedPeer(proc, slot.data_dir, slot.sip, slot.overlay)
        peer.wait_ready()
        reg = run("register", f"sip:erin@{DOMAIN}", "--via", f"127.0.0.1:{slot.sip}",
                  "--contact", "sip:erin@127.0.0.1:5999")  # fmt: skip
        assert reg.returncode == 0, reg.stdout + reg.stderr
        code, out, err = peer.stop()
        assert code == 0, err
        # erin's binding: nobody to hand it to, kept on disk
        assert "no successor to hand entries to; 1 entry stays in the data dir" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
