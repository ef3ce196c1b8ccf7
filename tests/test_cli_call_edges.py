"""`p2psip call` and `p2psip register` where a new user cuts themselves: Ctrl-C while ringing or in a
call, a --timeout while ringing, a BYE nobody answers, a dead or nonsense --via, an unwritable --record.
The command runs in a child process against a UserAgent on loopback, as a user runs it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from conftest import free_port

from p2psip.address import Target
from p2psip.stack import Stack
from p2psip.useragent import IncomingCall, UserAgent

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "p2psip.cli"]


class Callee:
    """bob on loopback: rings (and answers when ``answer``); records every request method it receives."""

    def __init__(self, stack: Stack, answer: bool) -> None:
        self.stack = stack
        self.answer = answer
        self.calls: list[IncomingCall] = []
        self.offered = asyncio.Event()
        self.received: list[str] = []
        self.ack_seen = asyncio.Event()
        stack.add_observer(self._observe)
        self.ua = UserAgent(stack, "sip:bob@127.0.0.1", on_call=self._on_call)
        host, port = stack.local_address("udp")
        self.uri, self.via = f"sip:bob@{host}:{port}", f"{host}:{port}"

    @classmethod
    async def start(cls, answer: bool = False) -> Callee:
        return cls(await Stack.start(["udp:127.0.0.1:0"]), answer)

    def _observe(self, direction: str, data: bytes, remote: Target) -> None:
        if direction == "in" and not data.startswith(b"SIP/2.0"):
            method = data.split(b" ", 1)[0].decode()
            self.received.append(method)
            if method == "ACK":
                self.ack_seen.set()

    def _on_call(self, incoming: IncomingCall) -> None:
        incoming.ring()
        if self.answer:
            incoming.accept()
        self.calls.append(incoming)
        self.offered.set()

    async def close(self) -> None:
        await self.ua.close()
        await self.stack.close()


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )


async def until_line(proc: asyncio.subprocess.Process, wanted: str, timeout: float = 20) -> list[str]:
    """Read the child's standard output until a line equal to ``wanted`` (bounded)."""
    assert proc.stdout is not None
    lines: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - loop.time()))
        assert raw, f"the command ended before printing {wanted!r}: {lines}"
        lines.append(raw.decode().rstrip("\n"))
        if lines[-1] == wanted:
            return lines


async def finish(proc: asyncio.subprocess.Process, timeout: float = 20) -> tuple[int, str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_cli(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    return await finish(await start_cli(*args), timeout)


def dead_udp_port() -> int:
    """A loopback UDP port nobody listens on: from below the kernel's ephemeral range
    (``conftest.free_port``), since a port bound to 0 and closed goes back to the pool, and the CLI's own
    socket, bound to port 0, once got it and sent its INVITE to itself (no ICMP refusal: a 20 s wait)."""
    return free_port()


async def test_ctrl_c_while_ringing_cancels_and_acks_the_487() -> None:
    bob = await Callee.start(answer=False)
    try:
        proc = await start_cli("call", bob.uri, "--via", bob.via, "--timeout", "30")
        await until_line(proc, "  180 Ringing")
        proc.send_signal(signal.SIGINT)
        code, _out, err = await finish(proc)
        assert code == 130, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("p2psip: interrupted: CANCEL sent; the INVITE ended with 487"), err
        assert await bob.calls[0].wait_ended(5) == "cancelled"
        await asyncio.wait_for(bob.ack_seen.wait(), 5)  # the 487 was ACKed before the command closed
        assert bob.received.count("CANCEL") == 1 and "ACK" in bob.received
    finally:
        await bob.close()


async def test_ctrl_c_in_a_call_hangs_up_with_bye() -> None:
    bob = await Callee.start(answer=True)
    try:
        proc = await start_cli("call", bob.uri, "--via", bob.via, "--duration", "60")
        await until_line(proc, "  call up; hanging up in 60 s")
        proc.send_signal(signal.SIGINT)
        code, _out, err = await finish(proc)
        assert code == 130, err
        assert "Traceback" not in err and err.strip() == "p2psip: interrupted: BYE sent; 200 OK", err
        assert await bob.calls[0].wait_ended(5) == "bye received"
    finally:
        await bob.close()


async def test_timeout_while_ringing_cancels_and_acks_the_487_then_prints_json() -> None:
    bob = await Callee.start(answer=False)
    try:
        code, out, err = await run_cli("call", bob.uri, "--via", bob.via, "--timeout", "1", "--json")
        assert code == 1, err
        assert err.strip() == "p2psip: error: no final answer to the INVITE within 1 s", err
        result = json.loads(out)  # --json prints the document whatever happened
        assert result["answered"] is False and "within 1 s" in result["error"]
        assert await bob.calls[0].wait_ended(5) == "cancelled"
        await asyncio.wait_for(bob.ack_seen.wait(), 5)
    finally:
        await bob.close()


async def test_a_bye_nobody_answers_says_so_and_json_still_prints() -> None:
    bob = await Callee.start(answer=True)

    async def vanish_once_confirmed() -> None:
        await bob.offered.wait()
        await bob.calls[0].confirmed.wait()
        await bob.close()  # bob is gone: the BYE gets no answer

    vanishing = asyncio.ensure_future(vanish_once_confirmed())
    try:
        code, out, err = await run_cli(
            "call", bob.uri, "--via", bob.via, "--duration", "0.5", "--timeout", "1", "--json"
        )
        assert code == 1, err
        assert err.strip() == "p2psip: error: the call was answered, but the BYE got no answer within 1 s"
        result = json.loads(out)
        assert result["answered"] is True and result["status"] == 200 and "BYE" in result["error"]
    finally:
        await asyncio.wait_for(vanishing, 10)


async def test_a_dead_via_is_reported_at_once_by_call_and_register() -> None:
    port = dead_udp_port()
    for command in (
        ["call", "sip:bob@p2p.example", "--via", f"127.0.0.1:{port}", "--timeout", "20"],
        ["register", "sip:bob@p2p.example", "--via", f"127.0.0.1:{port}", "--timeout", "20"],
    ):
        began = time.monotonic()
        code, _out, err = await run_cli(*command)
        assert code == 1, err
        assert err.strip() == (
            f"p2psip: error: nothing listens at 127.0.0.1:{port} "
            "(connection refused: no peer or SIP server runs there)"
        ), err
        assert time.monotonic() - began < 10  # not the 20 s timeout (the interpreter's start-up aside)
        code, out, err = await run_cli(*command, "--json")
        assert code == 1 and json.loads(out)["error"].startswith(f"nothing listens at 127.0.0.1:{port}"), out


async def test_a_host_name_via_and_an_unwritable_record_are_usage_errors(tmp_path: Path) -> None:
    code, out, err = await run_cli("call", "sip:bob@p2p.example", "--via", "nonsense")
    assert code == 2 and out == "", err
    assert "host names are not resolved" in err and len(err.strip().splitlines()) == 1
    code, out, err = await run_cli("register", "sip:bob@p2p.example", "--via", "nonsense:5060")
    assert code == 2 and "host names are not resolved" in err
    missing = tmp_path / "nodir" / "x.wav"
    code, out, err = await run_cli(
        "call", "sip:bob@127.0.0.1:9", "--via", "127.0.0.1:9", "--record", str(missing)
    )
    assert code == 2 and out == "", out  # refused before it says it is calling
    assert err.strip() == f"p2psip: error: --record {missing}: no such directory {missing.parent}"
