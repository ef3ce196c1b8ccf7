"""Hostile input at the SIP stack (issue 17 "State that never goes away", issue 11's oversize edge).

Every probe here is bounded in count and time and runs on loopback. Each test failed before its fix.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from p2psip.message import Request, Response, parse
from p2psip.proxy import Proxy
from p2psip.stack import Source, Stack
from p2psip.timers import TimerConfig
from p2psip.transaction import ServerTransaction

FAST = TimerConfig(t1=0.01, t2=0.04, t4=0.05)  # Timer J = 64*T1 = 0.64 s


def options(port: int, n: int, *, extra: str = "", method: str = "OPTIONS") -> bytes:
    return (
        f"{method} sip:bob@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKh{n}\r\n"
        f"{extra}"
        f"From: <sip:a@127.0.0.1>;tag={n}\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: h{n}\r\n"
        f"CSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture
async def udp_client() -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


async def recv_all(sock: socket.socket, count: int, timeout: float = 10.0) -> list[Response]:
    """Read ``count`` responses (or fewer, when the deadline passes first)."""
    loop = asyncio.get_running_loop()
    out: list[Response] = []
    deadline = loop.time() + timeout
    while len(out) < count and loop.time() < deadline:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65535), deadline - loop.time())
        except TimeoutError:
            break
        msg = parse(data)
        assert isinstance(msg, Response)
        out.append(msg)
    return out


async def wait_for(condition: object, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


# ------------------------------------------------------------------------------------ the core raises


async def test_a_malformed_second_via_is_answered_400_and_leaves_no_transaction(
    udp_client: socket.socket,
) -> None:
    # The proxy's loop detection parses every Via: a malformed second one raised out of the core, which
    # never answered, and the server transaction stayed alive for ever (1,000 OPTIONS -> 1,000 leaked).
    stack = await Stack.start(["udp:127.0.0.1:0"], timers=FAST)
    try:
        Proxy(stack)
        host, port = stack.local_address("udp")
        me = udp_client.getsockname()[1]
        bad = "Via: SIP/2.0/UDP 127.0.0.1;branch=\r\n"
        n = 1000
        answers: list[Response] = []
        for start in range(0, n, 100):  # bounded bursts so the kernel buffer holds the answers
            for i in range(start, start + 100):
                udp_client.sendto(options(me, i, extra=bad), (host, port))
            answers += await recv_all(udp_client, 100)
        assert len(answers) == n
        assert {a.status for a in answers} == {400}
        assert await wait_for(lambda: len(stack.transactions) == 0, 10.0), len(stack.transactions)
        assert stack.stats["handler_errors"] == n
    finally:
        await stack.close()


class _Raising(Proxy):
    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        raise RuntimeError("a bug in the core")


async def test_any_exception_in_the_core_is_a_500(udp_client: socket.socket) -> None:
    stack = await Stack.start(["udp:127.0.0.1:0"], timers=FAST)
    try:
        _Raising(stack)
        host, port = stack.local_address("udp")
        me = udp_client.getsockname()[1]
        udp_client.sendto(options(me, 1), (host, port))
        udp_client.sendto(options(me, 2, method="INVITE"), (host, port))
        answers = await recv_all(udp_client, 3)
        finals = sorted(a.status for a in answers if a.status >= 200)
        assert finals == [500, 500]
        assert all("a bug" not in a.reason for a in answers)  # no internals to the remote side
        assert await wait_for(lambda: len(stack.transactions) == 0, 10.0), len(stack.transactions)
    finally:
        await stack.close()
