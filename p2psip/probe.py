"""Is anything listening at a UDP address? The answer a connected socket hears (an ICMP port unreachable
surfaces there as ConnectionRefusedError, while an unconnected socket, which the SIP stack and the overlay
use, never sees it). The phone commands race it against their request, the peer against its join."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

SIP_KEEPALIVE = b"\r\n\r\n"


class DeadAddress(Exception):
    """Nothing listens at the address (an ICMP port unreachable came back)."""


T = TypeVar("T")


async def unless_refused(work: Awaitable[T], via: tuple[str, int], payload: bytes = SIP_KEEPALIVE) -> T:
    """Await ``work`` (a request through the peer at ``via``), unless ``via`` refuses first: then cancel
    it and raise :class:`DeadAddress`."""
    task = asyncio.ensure_future(work)
    probe = asyncio.ensure_future(refused(*via, payload=payload))
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


async def refused(host: str, port: int, payload: bytes = SIP_KEEPALIVE, resend: float = 0.5) -> None:
    """Return when ``host:port`` is known to refuse UDP (raises nothing: the caller races it against the
    request). ``payload`` (by default a SIP keep-alive, CRLF, which SIP ignores, RFC 3261 §7.5) goes out on
    a connected socket, the only kind the kernel reports an ICMP port unreachable to; on loopback the
    answer takes microseconds, so a dead ``--via`` or ``--join`` is reported at once instead of after a
    timeout of tens of seconds."""
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
            transport.sendto(payload)
            try:
                await asyncio.wait_for(asyncio.shield(gone), resend)
            except TimeoutError:
                resend = min(resend * 2, 4.0)
    finally:
        transport.close()
