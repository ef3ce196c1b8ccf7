"""`p2psip call --play/--record` as users run it: the command in a child process calls a UserAgent on
loopback that answers with audio. Each side must hear the other's tone, the call must last the played
file's length by default, and provisional responses must be printed before the answer.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from p2psip.media import MemorySink, ToneSource, dominant_frequency
from p2psip.media.sources import read_wav, write_wav
from p2psip.stack import Stack
from p2psip.useragent import UserAgent

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "p2psip.cli"]


async def run_cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Bob:
    """A UserAgent on loopback that rings and answers calls with audio (``play``/``record`` as
    ``accept_with_media`` takes them); ``ended`` collects why each call ended."""

    def __init__(self, stack: Stack, play: Any = None, record: Any = None) -> None:
        self.stack, self.play, self.record = stack, play, record
        self.ua = UserAgent(stack, "sip:bob@127.0.0.1")
        self.host, self.port = stack.local_address("udp")
        self.ended: list[str] = []
        self.offers: list[bytes] = []
        self.call_ended = asyncio.Event()
        self.task = asyncio.ensure_future(self._answer())

    @classmethod
    async def start(cls, play: Any = None, record: Any = None) -> Bob:
        return cls(await Stack.start(["udp:127.0.0.1:0"]), play, record)

    async def _answer(self) -> None:
        while True:
            incoming = await self.ua.incoming.get()
            self.offers.append(incoming.request.body)
            incoming.ring()
            await incoming.accept_with_media(play=self.play, record=self.record)
            self.ended.append(await incoming.wait_ended(30))
            self.call_ended.set()

    async def until_ended(self, calls: int = 1) -> None:
        """Wait (bounded) until ``calls`` calls have ended at bob's side."""
        while len(self.ended) < calls:
            self.call_ended.clear()
            waiting = asyncio.ensure_future(self.call_ended.wait())
            first = asyncio.FIRST_COMPLETED
            done, _ = await asyncio.wait([waiting, self.task], timeout=30, return_when=first)
            waiting.cancel()
            assert done and waiting in done, f"bob's calls did not end: {self.ended}, {self.task}"

    async def close(self) -> None:
        self.task.cancel()
        await self.ua.close()
        await self.stack.close()


async def test_call_plays_and_records_through_the_useragent(tmp_path: Path) -> None:
    heard_by_bob = MemorySink()
    bob = await Bob.start(play=ToneSource(700), record=heard_by_bob)
    host, port = bob.host, bob.port
    play, record = tmp_path / "say.wav", tmp_path / "heard.wav"
    write_wav(play, ToneSource(1000, duration=1.5))
    try:
        code, out, err = await run_cli(
            "call", f"sip:bob@{host}:{port}", "--via", f"{host}:{port}", "--from", "sip:alice@127.0.0.1",
            "--play", str(play), "--record", str(record), "--json",
        )  # fmt: skip
        assert code == 0, out + err
        result = json.loads(out)
        assert result["answered"] and result["status"] == 200 and result["bye_status"] == 200, result
        assert result["responses"][-2:] == ["180 Ringing", "200 OK"], result
        assert result["codec"] == "PCMU"
        # --play without --duration: the call lasts the file (1.5 s) and half a second more, 50 packets/s
        assert result["rtp_sent"] >= 75 and result["rtp_received"] > 50, result
        await bob.until_ended()
        assert bob.ended == ["bye received"]
        assert dominant_frequency(bytes(heard_by_bob.pcm), [700, 1000]) == 1000
        assert heard_by_bob.duration >= 1.2  # the whole file arrived (give or take the jitter buffer)
        assert dominant_frequency(read_wav(record), [700, 1000]) == 700
        # --via is bob's UA, whose SIP UDP port answers STUN like every stack's: the CLI's UA (it has an
        # RFC 5626 instance) asked it once and offered ICE (UserAgent._probe_outbound, test_ice_default.py)
        assert b"a=ice-ufrag:" in bob.offers[0] and b"typ srflx" in bob.offers[0], bob.offers[0]
    finally:
        await bob.close()


async def test_call_prints_each_response_as_it_comes(tmp_path: Path) -> None:
    """Without --json: the 180 line is printed before the answer, then the audio, BYE and RTP lines."""
    bob = await Bob.start()
    host, port = bob.host, bob.port
    try:
        code, out, err = await run_cli(
            "call", f"sip:bob@{host}:{port}", "--via", f"{host}:{port}",
            "--record", str(tmp_path / "r.wav"), "--duration", "0.5",
        )  # fmt: skip
        assert code == 0, out + err
        lines = out.splitlines()
        assert lines[0] == f"INVITE sip:bob@{host}:{port} via {host}:{port}"
        assert lines.index("  180 Ringing") < lines.index("  200 OK")
        assert any(line.startswith("  audio: PCMU to 127.0.0.1:") for line in lines), out
        assert "  call up; hanging up in 0.5 s" in lines and "BYE: 200 OK" in lines
        assert lines[-1].startswith("RTP: ") and lines[-1].endswith(" received"), out
    finally:
        await bob.close()


async def test_a_rejected_call_exits_1_with_its_status(tmp_path: Path) -> None:
    stack = await Stack.start(["udp:127.0.0.1:0"])
    bob = UserAgent(stack, "sip:bob@127.0.0.1", on_call=lambda incoming: incoming.reject(486))
    host, port = stack.local_address("udp")
    try:
        code, out, err = await run_cli(
            "call", f"sip:bob@{host}:{port}", "--via", f"{host}:{port}",
            "--record", str(tmp_path / "r.wav"), "--json",
        )  # fmt: skip
        assert code == 1, out + err
        result = json.loads(out)
        assert not result["answered"] and result["status"] == 486 and "bye_status" not in result
    finally:
        await bob.close()
        await stack.close()


async def test_a_missing_play_file_is_a_usage_error(tmp_path: Path) -> None:
    code, _out, err = await run_cli("call", "sip:bob@127.0.0.1", "--play", str(tmp_path / "nope.wav"))
    assert code == 2 and err.startswith("p2psip: error: ") and "nope.wav" in err, err
