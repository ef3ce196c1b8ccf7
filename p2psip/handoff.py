"""Hand-off between the worker processes of one proxy: which worker owns a datagram, and the channel that
carries it there.

Why: the workers of ``p2psip proxy --workers N`` each read their own socket on the same UDP port
(``SO_REUSEPORT``), and the kernel picks the socket by the datagram's 4-tuple, never by Call-ID: one sipp
source lands on one worker, the callee's answers perhaps on another. RFC 3261 state lives in one process
only, so every datagram that belongs to a transaction goes to the worker that keeps it:

- a **request** belongs to ``crc32(top Via branch) % N``: its retransmissions, the CANCEL and the ACK of a
  non-2xx carry the same branch, so they meet the server transaction (§17.2.3); crc32, not ``hash()``,
  because every process must compute the same owner;
- a **response** belongs to the worker named in our branch (the top Via is ours): a worker's stack ends
  the branches of its client transactions with :func:`branch_tag` (``.w3``).

A datagram with no branch (RFC 2543), or whose owner is this worker, is handled where it arrived. When a
worker dies, the parent marks it gone (a shared byte per worker) until its successor listens: meanwhile
what it owned is handled where it arrives, statelessly where no transaction knows it — a 2xx and an
in-dialog request (routed by Record-Route to the shared address) go on, an INVITE retransmission starts a
new transaction. (The successor, like any worker, knows none of the old transactions either.)

:func:`owner` is pure (bytes in, worker index out); :class:`HandoffLink` is the asyncio adapter over a
loopback UDP socket per worker (:func:`open_links`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import zlib
from collections.abc import Callable, Sequence

log = logging.getLogger("p2psip.handoff")

#: the branch of the top Via: the first Via header line (full or compact name, any case)
_TOP_BRANCH = re.compile(
    rb"^(?:via|v)[ \t]*:[^\r\n]*?;[ \t]*branch[ \t]*=[ \t]*([^;,\s]+)", re.IGNORECASE | re.MULTILINE
).search
_WORKER_TAG = re.compile(rb"\.w([0-9]{1,4})$").search
#: a link datagram carries records ``HOST PORT LENGTH\n`` + the datagram (the original source, so the
#: owner answers and stamps Via as if it had received it itself), as many as fit in this many bytes
_BATCH_BYTES = 60_000


def _records(packet: bytes) -> list[tuple[bytes, tuple[str, int]]]:
    """The (datagram, source) records of one link datagram; a malformed tail is dropped."""
    out = []
    pos, end = 0, len(packet)
    while pos < end:
        newline = packet.find(b"\n", pos)
        if newline < 0:
            break
        fields = packet[pos:newline].split(b" ")
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
            break
        start = newline + 1
        pos = start + int(fields[2])
        if pos > end:
            break
        out.append((packet[start:pos], (fields[0].decode("ascii", "replace"), int(fields[1]))))
    return out


def branch_tag(index: int) -> str:
    """What a worker appends to the branches of the client transactions it starts."""
    return f".w{index}"


def owner(data: bytes, workers: int) -> int | None:
    """The index of the worker that owns ``data`` (a SIP datagram), or None: handle it where it arrived
    (no branch, or a response whose branch names no worker)."""
    found = _TOP_BRANCH(data)
    if found is None:
        return None
    branch = found.group(1)
    if data.startswith(b"SIP/"):
        tag = _WORKER_TAG(branch)
        if tag is None:
            return None
        index = int(tag.group(1))
        return index if index < workers else None
    return zlib.crc32(branch) % workers


Deliver = Callable[[bytes, tuple[str, int]], None]
Alive = Sequence[int]
"""Per worker index, non-zero while that worker is listening (a shared memory map the parent keeps)."""


def open_links(workers: int) -> list[socket.socket]:
    """One loopback UDP socket per worker, opened by the parent before it forks and held by it for as long
    as it runs: a worker started again after a crash reads the same socket, so what was handed to it
    meanwhile waits in the socket's buffer instead of being lost. (Not Unix datagram sockets: Linux queues
    at most ``net.unix.max_dgram_qlen`` — 10 by default — datagrams on one, and a burst overflowed it.)"""
    links: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            links.append(sock)
            sock.bind(("127.0.0.1", 0))
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    except OSError:
        for sock in links:
            sock.close()
        raise
    return links


class HandoffLink:
    """This worker's end: hands datagrams to their owner and delivers those handed to it.

    ``sock`` is this worker's link socket (of :func:`open_links`), ``addresses`` every worker's link
    address by index. ``deliver(data, (host, port))`` processes a datagram as if it had arrived from
    ``host:port`` on the shared UDP port. Only datagrams from another worker's link address are taken
    (the ports are ours, so no other local program can send from them). Counters: ``handed_off``,
    ``handed_in``, ``handoff_refused`` (not from a worker)."""

    def __init__(
        self,
        sock: socket.socket,
        index: int,
        addresses: Sequence[tuple[str, int]],
        deliver: Deliver,
        alive: Alive | None = None,
    ) -> None:
        self.sock = sock
        self.index = index
        self.addresses = list(addresses)
        self.workers = len(self.addresses)
        self.deliver = deliver
        self.alive = alive
        self.stats: dict[str, int] = dict.fromkeys(
            ("handed_off", "handed_in", "handoff_refused", "owner_gone"), 0
        )
        self._peers = frozenset(self.addresses)
        self._queued: list[list[bytes]] = [[] for _ in self.addresses]
        self._size = [0] * self.workers
        self._dirty: list[int] = []
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    def divert(self, data: bytes, addr: tuple[str | int, ...]) -> bool:
        """True when ``data`` (from ``addr``) is to be handed to another worker (at :meth:`flush`);
        False: handle it here."""
        index = owner(data, self.workers)
        if index is None or index == self.index:
            return False
        alive = self.alive
        if alive is not None and not alive[index]:
            # The owner died and its successor is not listening yet: it would know none of the old
            # transactions anyway, and waiting for it would let this datagram (an ACK) fall behind the
            # next one of the same call (its BYE, owned by a live worker).
            self.stats["owner_gone"] += 1
            return False
        record = f"{addr[0]} {addr[1]} {len(data)}\n".encode() + data
        if self._size[index] + len(record) > _BATCH_BYTES:
            self._send(index)
        if not self._queued[index]:
            self._dirty.append(index)
        self._queued[index].append(record)
        self._size[index] += len(record)
        return True

    def flush(self) -> None:
        """Hand over what :meth:`divert` took: one datagram per owner for a whole burst (fewer system
        calls and wake-ups than one per message: a hand-off is the workers' main extra cost)."""
        for index in self._dirty:
            self._send(index)
        self._dirty.clear()

    def _send(self, index: int) -> None:
        queued = self._queued[index]
        if not queued:
            return
        try:
            self.sock.sendto(b"".join(queued), self.addresses[index])
        except OSError:  # a full buffer: lost like any UDP datagram (the sender retransmits)
            self.stats["handoff_dropped"] = self.stats.get("handoff_dropped", 0) + len(queued)
        else:
            self.stats["handed_off"] += len(queued)
        queued.clear()
        self._size[index] = 0

    def _readable(self) -> None:
        recvfrom = self.sock.recvfrom
        peers = self._peers
        deliver = self.deliver
        for _ in range(64):
            try:
                packet, sender = recvfrom(70000)
            except OSError:  # BlockingIOError: drained
                return
            if sender not in peers:
                self.stats["handoff_refused"] += 1
                continue
            for data, source in _records(packet):
                self.stats["handed_in"] += 1
                try:
                    deliver(data, source)
                except Exception:
                    log.exception("handed-in datagram failed")

    def close(self) -> None:
        """Stop reading (the socket itself belongs to the parent, which closes it)."""
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
