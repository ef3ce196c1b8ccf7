"""The Stack adapter: the transaction timers it runs for the sans-IO layer, transport failures reported to
the core, the UDP->TCP switch end to end, and a stack with no core."""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import free_port

from p2psip.message import Response, parse
from p2psip.stack import Stack
from p2psip.timers import TimerConfig
from p2psip.useragent import CallFailed, UserAgent


async def test_timer_b_fires_when_nobody_answers() -> None:
    # A UDP socket that receives but never answers: only Timer B (64*T1 = 1.6 s here) can end the call.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    stack = await Stack.start(["udp:127.0.0.1:0"], timers=TimerConfig(t1=0.025, t2=0.1, t4=0.1))
    try:
        ua = UserAgent(stack, "sip:alice@127.0.0.1")
        port = silent.getsockname()[1]
        with pytest.raises(CallFailed) as failed:
            await ua.call(f"sip:nobody@127.0.0.1:{port}", timeout=30)
        assert failed.value.status == 408
        assert stack.stats["transaction_retransmissions"] >= 3  # Timer A resent the INVITE
        silent.setblocking(False)
        first = parse(silent.recv(65535))
        assert getattr(first, "method", None) == "INVITE"
    finally:
        silent.close()
        await stack.close()


async def test_tcp_connection_refused_is_a_503() -> None:
    stack = await Stack.start(["udp:127.0.0.1:0", "tcp:127.0.0.1:0"])
    try:
        ua = UserAgent(stack, "sip:alice@127.0.0.1")
        port = free_port()  # nothing listens there
        with pytest.raises(CallFailed) as failed:
            await ua.call(f"sip:bob@127.0.0.1:{port};transport=tcp", timeout=30)
        assert failed.value.status == 503
        assert stack.stats["send_errors"] >= 1
    finally:
        await stack.close()


async def test_large_request_switches_to_tcp() -> None:
    a = await Stack.start(["127.0.0.1:0"])  # UDP and TCP on one port
    b = await Stack.start(["127.0.0.1:0"])
    try:
        alice = UserAgent(a, "sip:alice@127.0.0.1")
        bob = UserAgent(b, "sip:bob@127.0.0.1")
        host, port = b.local_address("udp")
        text = "x" * 2000
        response = await alice.message(f"sip:bob@{host}:{port}", text)
        assert response.status == 200
        got = await asyncio.wait_for(bob.messages.get(), 5)
        assert got.body == text.encode()
        via = got.top_via
        assert via is not None and via.transport == "TCP"
        assert a.stats["udp_to_tcp"] == 1 and a.stats["connections_opened"] == 1
    finally:
        await a.close()
        await b.close()


async def test_large_request_to_a_udp_only_next_hop_falls_back_to_udp() -> None:
    """§18.1.1: over 1300 bytes the request goes over TCP; the next hop listens on UDP only (the connection
    is refused), so it is sent over UDP after all, with a UDP Via, and answered."""
    a = await Stack.start(["127.0.0.1:0"])
    b = await Stack.start([f"udp:127.0.0.1:{free_port()}"])  # nothing on its TCP port
    try:
        alice = UserAgent(a, "sip:alice@127.0.0.1")
        bob = UserAgent(b, "sip:bob@127.0.0.1")
        host, port = b.local_address("udp")
        text = "x" * 2000
        response = await alice.message(f"sip:bob@{host}:{port}", text, timeout=10)
        assert response.status == 200
        got = await asyncio.wait_for(bob.messages.get(), 5)
        assert got.body == text.encode()
        via = got.top_via
        assert via is not None and via.transport == "UDP"
        assert a.stats["udp_to_tcp"] == 1 and a.stats["tcp_refused_udp_retry"] == 1
        assert a.stats["send_errors"] == 1  # the refused connection, nothing else
    finally:
        await a.close()
        await b.close()


async def test_a_stack_without_a_core_answers_503() -> None:
    stack = await Stack.start(["udp:127.0.0.1:0"])
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        me = sock.getsockname()[1]
        request = (
            f"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKnc\r\n"
            "From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: nc\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        try:
            await loop.sock_sendto(sock, request.encode(), stack.local_address("udp"))
            answer = parse(await asyncio.wait_for(loop.sock_recv(sock, 65535), 5))
            assert isinstance(answer, Response) and answer.status == 503
        finally:
            await stack.close()
