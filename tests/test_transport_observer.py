"""Stack.add_observer: every message sent and received is seen (UDP and TCP, malformed input too), a
failing observer does not break the stack, remove_observer detaches; SipTrace is built on it."""

from __future__ import annotations

import asyncio
import socket

from p2psip.address import Target
from p2psip.stack import Stack
from p2psip.trace import SipTrace
from p2psip.useragent import UserAgent


async def test_observer_sees_both_directions_on_udp_and_tcp() -> None:
    alice_stack = await Stack.start(["udp:127.0.0.1:0"])
    bob_stack = await Stack.start(["127.0.0.1:0"])  # UDP and TCP on one port
    try:
        alice = UserAgent(alice_stack, "sip:alice@127.0.0.1")
        UserAgent(bob_stack, "sip:bob@127.0.0.1")
        seen: list[tuple[str, str, Target]] = []
        traced: list[tuple[str, tuple[str, str, int] | None, bytes]] = []

        def observe(direction: str, data: bytes, remote: Target) -> None:
            seen.append((direction, data.split(b"\r\n", 1)[0].decode(), remote))

        def broken(direction: str, data: bytes, remote: Target) -> None:
            raise RuntimeError("observer bug")

        bob_stack.add_observer(observe)
        bob_stack.add_observer(broken)
        trace = SipTrace(bob_stack, lambda d, where, data: traced.append((d, where, data)))
        host, port = bob_stack.local_address("udp")
        assert (await asyncio.wait_for(alice.options(f"sip:bob@{host}:{port}"), 20)).status == 200
        udp = [(d, line, r.transport) for d, line, r in seen]
        assert ("in", f"OPTIONS sip:bob@{host}:{port} SIP/2.0", "udp") in udp
        assert ("out", "SIP/2.0 200 OK", "udp") in udp
        assert all(r.port == alice_stack.local_address("udp")[1] for _, _, r in seen)
        assert bob_stack.stats["handler_errors"] >= 2  # the broken observer, counted, not propagated
        assert [d for d, _, _ in traced][:2] == ["in", "out"] and traced[0][1] is not None

        # Over TCP the same (alice's request goes over TCP because the URI says so).
        seen.clear()
        reply = await asyncio.wait_for(alice.options(f"sip:bob@{host}:{port};transport=tcp"), 20)
        assert reply.status == 200
        assert {(d, r.transport) for d, _, r in seen} == {("in", "tcp"), ("out", "tcp")}

        # Malformed input is observed as received, before the 400 goes out.
        seen.clear()
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            garbage = (
                "OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n"
                "Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKobs;rport\r\n"
                "From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: obs\r\nCSeq: 1 INVITE\r\n\r\n"
            )
            await loop.sock_sendto(sock, garbage.encode(), (host, port))
            answer = await asyncio.wait_for(loop.sock_recv(sock, 65535), 10)
        assert answer.startswith(b"SIP/2.0 400")
        assert seen[0][:2] == ("in", "OPTIONS sip:bob@127.0.0.1 SIP/2.0")
        assert seen[1][0] == "out" and seen[1][1].startswith("SIP/2.0 400")

        # Detached observers see nothing more.
        bob_stack.remove_observer(observe)
        bob_stack.remove_observer(broken)
        trace.close()
        seen.clear()
        count = len(traced)
        assert (await asyncio.wait_for(alice.options(f"sip:bob@{host}:{port}"), 20)).status == 200
        assert seen == [] and len(traced) == count
    finally:
        await alice_stack.close()
        await bob_stack.close()
