"""The phone of the ``register``, ``call`` and ``demo`` commands: a :class:`~p2psip.useragent.UserAgent` on
a UDP stack of its own, bound to the local address the kernel uses toward the peer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from p2psip.stack import Stack
from p2psip.transport import Target
from p2psip.useragent import IncomingCall, UserAgent


def local_ip_toward(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "::1" if family == socket.AF_INET6 else "127.0.0.1"


async def open_phone(
    aor: str,
    *,
    via: tuple[str, int] | None = None,
    host: str | None = None,
    port: int = 0,
    on_call: Callable[[IncomingCall], None] | None = None,
) -> UserAgent:
    """A UserAgent for ``aor`` whose out-of-dialog requests go through the peer at ``via``; close it with
    :func:`close_phone`."""
    if host is None:
        host = local_ip_toward(via[0]) if via is not None else "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    stack = await Stack.start([f"udp:{shown}:{port}"])
    outbound = Target("udp", via[0], via[1]) if via is not None else None
    return UserAgent(stack, aor, outbound=outbound, on_call=on_call)


async def close_phone(ua: UserAgent) -> None:
    await ua.close()
    await ua.stack.close()


def auto_answer(incoming: IncomingCall) -> None:
    """``on_call`` of an answering phone: 180 Ringing, then 200 OK (no media)."""
    incoming.ring()
    incoming.accept()


class DeadAddress(Exception):
    """Nothing listens at the address (an ICMP port unreachable came back)."""


T = TypeVar("T")


async def unless_refused(work: Awaitable[T], via: tuple[str, int]) -> T:
    """Await ``work`` (a request through the peer at ``via``), unless ``via`` refuses first: then cancel
    it and raise :class:`DeadAddress`."""
    task = asyncio.ensure_future(work)
    probe = asyncio.ensure_future(refused(*via))
    try:
        await asyncio.wait({task, probe}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when we are cancelled (Ctrl-C): the request is cancelled with us
        probe.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.done() and not task.cancelled():
        return task.result()
    raise DeadAddress(f"{via[0]}:{via[1]}")


async def refused(host: str, port: int, resend: float = 0.5) -> None:
    """Return when ``host:port`` is known to refuse UDP (raises nothing: the caller races it against the
    request). A keep-alive (CRLF, which SIP ignores, RFC 3261 §7.5) goes out on a connected socket, the only
    kind the kernel reports an ICMP port unreachable to; on loopback the answer takes microseconds, so a
    dead ``--via`` is reported at once instead of after the transaction's 32 s."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    class _Probe(asyncio.DatagramProtocol):
        def error_received(self, exc: Exception) -> None:
            if isinstance(exc, ConnectionRefusedError) and not gone.done():
                gone.set_result(None)

    try:
        transport, _ = await loop.create_datagram_endpoint(_Probe, remote_addr=(host, port))
    except OSError:
        await asyncio.Event().wait()  # cannot probe: the request's own timeout decides
        return
    try:
        while not gone.done():
            transport.sendto(b"\r\n\r\n")
            try:
                await asyncio.wait_for(asyncio.shield(gone), resend)
            except TimeoutError:
                resend = min(resend * 2, 4.0)
    finally:
        transport.close()
