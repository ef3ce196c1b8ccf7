"""A UDP relay on loopback that loses packets on purpose, repeatably.

netem is not available here, so packet loss is injected by standing between two SIP endpoints. The relay
behaves like a symmetric NAT: a client sends to the relay's front port; for each client address the relay
opens its own back socket towards the target, so the target sees (and answers, per ``rport`` or sipp's
reply-to-source) the back socket, and the relay carries the answer back to the client. Every datagram in
either direction may be dropped.

Drops are *seeded* and independent of timing: whether a datagram is dropped is a hash of the seed, the
direction, its bytes and how many identical copies were seen before (so a retransmission gets a fresh
decision). Two runs that send the same bytes lose the same packets. ``max_drops_per_packet`` bounds how
often one message can be lost, so SIP retransmission always gets a call through in the end and a test
measures recovery, not luck. ``drop_first`` forces the first copy of chosen messages to be lost, so a test
can be sure that a given retransmission path (e.g. the 200 OK of an INVITE) was exercised.

A UA sends its in-dialog requests (ACK, BYE) to the other side's Contact, which would bypass the relay.
With ``rewrite_contact=True`` the relay does what a NAT's SIP ALG does: it rewrites the address of every
Contact URI of a SIP message to its own side of the path — the front address in a message going down
(so the client's ACK and BYE come to the front), the client's back socket in one going up (so the
target's in-dialog requests come to that back socket and are carried to the client). Then every message
of a call crosses the relay, both ways. Drop decisions are taken on the bytes as they arrived.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

Address = tuple[str, int]


@dataclass
class RelayStats:
    forwarded: int = 0
    dropped: int = 0
    dropped_lines: list[str] = field(default_factory=list)
    """``up``/``down`` and :func:`describe` of every dropped datagram, in order (for assertions and
    failure messages: which call lost what)."""
    forwarded_lines: list[str] = field(default_factory=list)
    """The same for every forwarded datagram."""


_CALL_ID = re.compile(rb"\r\n(?:Call-ID|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
_CSEQ = re.compile(rb"\r\nCSeq[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
_CONTACT = re.compile(rb"(\r\n(?:Contact|m)[ \t]*:)([^\r\n]*)", re.IGNORECASE)
_QUOTED = re.compile(rb'"(?:[^"\\]|\\.)*"')
_CONTACT_URI = re.compile(rb"(sips?:(?:[^@<>;,\s]*@)?)(?:\[[^\]]*\]|[^:;<>,?\s]+)(?::[0-9]+)?", re.IGNORECASE)


def first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("latin-1", errors="replace")


def describe(data: bytes) -> str:
    """The first line of a datagram and, for a SIP message, ``[Call-ID]`` and ``CSeq: N METHOD`` after it
    (the CSeq tells a 200 to the BYE from a 200 to the INVITE)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    call_id = _CALL_ID.search(head)
    cseq = _CSEQ.search(head)
    text = first_line(data)
    if call_id:
        text += f" [{call_id.group(1).strip().decode('latin-1')}]"
    if cseq:
        text += f" CSeq: {cseq.group(1).strip().decode('latin-1')}"
    return text


def is_sip(data: bytes) -> bool:
    """Whether a datagram looks like a SIP message (a response, or a request line ending in SIP/2.0)."""
    line = data.split(b"\r\n", 1)[0]
    return line.startswith(b"SIP/2.0 ") or line.endswith(b" SIP/2.0")


def rewrite_contacts(data: bytes, address: Address) -> bytes:
    """``data`` with the host and port of every Contact URI in its header replaced by ``address`` (user
    part and parameters kept); anything that is not a SIP message is returned as it is."""
    if not is_sip(data):
        return data
    head, sep, body = data.partition(b"\r\n\r\n")
    host, port = address
    hostport = (f"[{host}]" if ":" in host else host).encode() + b":%d" % port

    def uris(text: bytes) -> bytes:
        return _CONTACT_URI.sub(lambda uri: uri.group(1) + hostport, text)

    def header(match: re.Match[bytes]) -> bytes:
        value = match.group(2)
        parts, end = [], 0
        for quoted in _QUOTED.finditer(value):  # a display name is text, whatever it holds
            parts += [uris(value[end : quoted.start()]), quoted.group()]
            end = quoted.end()
        return match.group(1) + b"".join([*parts, uris(value[end:])])

    return _CONTACT.sub(header, head) + sep + body


class _Front(asyncio.DatagramProtocol):
    def __init__(self, relay: LossyRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._from_client(data, addr)


class _Back(asyncio.DatagramProtocol):
    def __init__(self, relay: LossyRelay, client: Address) -> None:
        self.relay = relay
        self.client = client

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._from_target(data, self.client)


class LossyRelay:
    """Relay UDP datagrams between clients and ``target``, dropping a seeded fraction ``loss`` of them.

    Use ``async with LossyRelay(target, loss=0.2, seed=1) as relay:`` and send to ``relay.address``.
    """

    def __init__(
        self,
        target: Address,
        *,
        loss: float = 0.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        max_drops_per_packet: int = 2,
        drop_first: Callable[[bytes], bool] | None = None,
        rewrite_contact: bool = False,
    ) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self.target = target
        self.loss = loss
        self.seed = seed
        self.host = host
        self.max_drops_per_packet = max_drops_per_packet
        self.drop_first = drop_first
        self.rewrite_contact = rewrite_contact
        self.stats = RelayStats()
        self._progress = asyncio.Event()
        self._seen: Counter[tuple[str, bytes]] = Counter()
        self._drops: Counter[tuple[str, bytes]] = Counter()
        self._front: asyncio.DatagramTransport | None = None
        self._backs: dict[Address, asyncio.DatagramTransport] = {}
        self._pending: dict[Address, list[bytes]] = {}

    @property
    def address(self) -> Address:
        assert self._front is not None, "start() first"
        host, port = self._front.get_extra_info("sockname")[:2]
        return (host, port)

    async def start(self) -> LossyRelay:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Front(self), local_addr=(self.host, 0))
        self._front = transport
        return self

    def close(self) -> None:
        for back in self._backs.values():
            back.close()
        self._backs.clear()
        if self._front is not None:
            self._front.close()
            self._front = None

    async def __aenter__(self) -> LossyRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def decide(self, direction: str, data: bytes) -> bool:
        """Whether to drop this copy of ``data`` going ``direction`` ("up": to target, "down": back)."""
        key = (direction, data)
        copy = self._seen[key]
        self._seen[key] += 1
        if self._drops[key] >= self.max_drops_per_packet:
            return False
        if copy == 0 and self.drop_first is not None and self.drop_first(data):
            verdict = True
        else:
            digest = hashlib.blake2b(
                b"%d|%s|%d|" % (self.seed, direction.encode(), copy) + data, digest_size=8
            ).digest()
            verdict = int.from_bytes(digest, "big") / 2**64 < self.loss
        if verdict:
            self._drops[key] += 1
            self.stats.dropped += 1
            self.stats.dropped_lines.append(f"{direction} {describe(data)}")
        return verdict

    async def wait_forwarded(self, match: Callable[[str], bool], timeout: float) -> str:
        """Wait (up to ``timeout`` s, else TimeoutError) until the relay forwarded a datagram whose
        ``direction describe(data)`` line satisfies ``match``; returns that line."""

        async def seen() -> str:
            checked = 0
            while True:
                lines = self.stats.forwarded_lines
                for line in lines[checked:]:
                    if match(line):
                        return line
                checked = len(lines)
                self._progress.clear()
                await self._progress.wait()

        return await asyncio.wait_for(seen(), timeout)

    def _forwarding(self, direction: str, data: bytes) -> None:
        self.stats.forwarded += 1
        self.stats.forwarded_lines.append(f"{direction} {describe(data)}")
        self._progress.set()

    def _send_up(self, back: asyncio.DatagramTransport, data: bytes) -> None:
        if self.rewrite_contact:
            host, port = back.get_extra_info("sockname")[:2]
            data = rewrite_contacts(data, (host, port))
        back.sendto(data)

    def _from_client(self, data: bytes, client: Address) -> None:
        if self.decide("up", data):
            return
        self._forwarding("up", data)
        back = self._backs.get(client)
        if back is not None:
            self._send_up(back, data)
            return
        queue = self._pending.setdefault(client, [])
        queue.append(data)
        if len(queue) == 1:
            asyncio.get_running_loop().create_task(self._open_back(client))

    async def _open_back(self, client: Address) -> None:
        loop = asyncio.get_running_loop()
        back, _ = await loop.create_datagram_endpoint(
            lambda: _Back(self, client), local_addr=(self.host, 0), remote_addr=self.target
        )
        if self._front is None:  # closed meanwhile
            back.close()
            return
        self._backs[client] = back
        for data in self._pending.pop(client, []):
            self._send_up(back, data)

    def _from_target(self, data: bytes, client: Address) -> None:
        if self.decide("down", data):
            return
        self._forwarding("down", data)
        if self._front is not None:
            if self.rewrite_contact:
                data = rewrite_contacts(data, self.address)
            self._front.sendto(data, client)
