"""Two baresip softphones (headless, config dirs made here) register alice and bob at two different peers
of a 5-peer overlay; alice calls bob's AOR and bob (auto-answer) answers; then the other way round. Each call
is checked at the caller's peer, which stays in the path (Record-Route): INVITE forwarded, 200 OK and ACK
relayed, then BYE and its 200 OK. See shared/INTEROP-NOTES.md for the baresip settings."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, free_sip_port, require_tool
from interop.procs import stop

from p2psip.media import dominant_frequency
from p2psip.media.sources import read_wav
from p2psip.peer import Peer
from p2psip.trace import SipTrace

from .helpers import baresip_config, start_overlay, stop_overlay

ROOT = Path(__file__).resolve().parents[2]


class Baresip:
    """One headless baresip with its own config dir; commands go to its `cons` UDP port."""

    def __init__(self, workdir: Path, user: str, peer: Peer) -> None:
        self.user = user
        self.dir = workdir / f"baresip-{user}"
        self.dir.mkdir(parents=True)
        self.sip_port = free_sip_port()
        self.cons_port = free_port()
        host, port = peer.sip_address()
        (self.dir / "config").write_text(baresip_config(f"127.0.0.1:{self.sip_port}", self.cons_port))
        (self.dir / "accounts").write_text(
            f'<sip:{user}@p2p.example>;outbound="sip:{host}:{port}";regint=300;'
            "audio_codecs=PCMU;answermode=auto\n"
        )
        (self.dir / "contacts").write_text("")
        self.log = (self.dir / "baresip.log").open("wb")
        self.proc = subprocess.Popen(
            [require_tool("baresip"), "-f", str(self.dir), "-t", "120"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def command(self, text: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(text.encode() + b"\n", ("127.0.0.1", self.cons_port))

    def log_tail(self) -> str:
        self.log.flush()
        return (self.dir / "baresip.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """End it by PID: SIGTERM (it then unregisters, which may take a while), SIGKILL after 2 s."""
        stop(self.proc, grace=2)
        self.log.close()


class Watch:
    """What the peers send and log, with waits on a condition (futures resolved by the sinks)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, str, str]] = []  # (peer, direction, first line, CSeq method)
        self.events: list[tuple[int, str, str]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def sink(self, index: int) -> Callable[[str, Any, bytes], None]:
        def on_message(direction: str, where: Any, data: bytes) -> None:
            head = data.split(b"\r\n", 1)[0].decode(errors="replace")
            method = ""
            for line in data.split(b"\r\n"):
                if line[:5].lower() == b"cseq:":
                    method = line.decode(errors="replace").split()[-1]
            self.seen.append((index, direction, head, method))
            self._check()

        return on_message

    def event_sink(self, index: int) -> Callable[[str, str], None]:
        def on_event(kind: str, text: str) -> None:
            self.events.append((index, kind, text))
            self._check()

        return on_event

    def _check(self) -> None:
        for predicate, future in list(self._waiters):
            if not future.done() and predicate():
                future.set_result(None)

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; seen: {self.seen[-20:]}") from None

    def sent(self, peer: int, head_prefix: str, method: str, since: int = 0) -> bool:
        """Whether ``peer`` sent such a message (among the messages seen from index ``since`` on)."""
        return any(
            p == peer and d == "out" and h.startswith(head_prefix) and m == method
            for p, d, h, m in self.seen[since:]
        )

    def registered(self, aor: str) -> bool:
        return any(kind == "registered" and f"registered {aor} " in text for _, kind, text in self.events)


async def one_call(watch: Watch, caller: Baresip, callee_aor: str, via_peer: int) -> None:
    start = len(watch.seen)  # this call's messages only (the previous call sent the same kinds)
    caller.command(f"/dial {callee_aor}")
    await watch.until(
        lambda: watch.sent(via_peer, "INVITE sip:", "INVITE", start), 20, "the INVITE forwarded"
    )
    await watch.until(
        lambda: watch.sent(via_peer, "SIP/2.0 200", "INVITE", start), 20, "200 OK relayed to the caller"
    )
    await watch.until(lambda: watch.sent(via_peer, "ACK ", "ACK", start), 20, "the ACK relayed to the callee")
    caller.command("/hangup")
    await watch.until(lambda: watch.sent(via_peer, "BYE ", "BYE", start), 20, "the BYE relayed")
    await watch.until(lambda: watch.sent(via_peer, "SIP/2.0 200", "BYE", start), 20, "200 OK for the BYE")


@pytest.mark.interop
async def test_baresip_phones_call_each_other_through_the_overlay(tmp_path: Path) -> None:
    require_tool("baresip")
    watch = Watch()
    peers = await start_overlay(5, tmp_path)
    phones: list[Baresip] = []
    try:
        for i, peer in enumerate(peers):
            peer.on_event = watch.event_sink(i)
            SipTrace(peer.stack, watch.sink(i))
        alice_peer, bob_peer = 1, 3
        bob = Baresip(tmp_path, "bob", peers[bob_peer])
        phones.append(bob)
        alice = Baresip(tmp_path, "alice", peers[alice_peer])
        phones.append(alice)
        try:
            await watch.until(lambda: watch.registered("sip:bob@p2p.example"), 30, "bob's registration")
            await watch.until(lambda: watch.registered("sip:alice@p2p.example"), 30, "alice's registration")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{bob.log_tail()}\n{alice.log_tail()}") from None
        # both AORs are in the DHT, readable from a peer neither phone uses
        assert await peers[0].fetch_bindings("sip:bob@p2p.example")
        assert await peers[0].fetch_bindings("sip:alice@p2p.example")

        try:
            await one_call(watch, alice, "sip:bob@p2p.example", alice_peer)
            await one_call(watch, bob, "sip:alice@p2p.example", bob_peer)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- alice\n{alice.log_tail()}\n--- bob\n{bob.log_tail()}") from None
        assert any(kind == "routed" and "sip:bob@p2p.example" in text for i, kind, text in watch.events)
        assert any(kind == "routed" and "sip:alice@p2p.example" in text for i, kind, text in watch.events)

        # `p2psip call --record`: bob answers and sends baresip's 440 Hz tone (ausine); the CLI records it
        host, port = peers[0].sip_address()
        wav = tmp_path / "heard.wav"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "p2psip.cli", "call", "sip:bob@p2p.example", "--via", f"{host}:{port}",
            "--record", str(wav), "--duration", "2", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode() + err.decode()
        result = json.loads(out)
        assert result["answered"] and result["bye_status"] == 200 and result["rtp_received"] > 50, result
        pcm = read_wav(wav)
        assert len(pcm) > 8000  # more than half a second of audio
        assert dominant_frequency(pcm, [300, 440, 1000, 2000]) == 440
    finally:
        for phone in phones:
            phone.stop()
        await stop_overlay(peers)
