"""Hand-off between the worker processes of one proxy: which worker owns a datagram, and the channel that
carries it there.

Why: the workers of ``p2psip proxy --workers N`` each read their own socket on the same UDP port
(``SO_REUSEPORT``), and the kernel picks the socket by the datagram's 4-tuple, never by Call-ID: one sipp
source lands on one worker, the callee's answers perhaps on another. RFC 3261 state lives in one process
only, so every datagram that belongs to a transaction goes to the worker that keeps it:

- a **request** belongs to the worker its ``Call-ID`` names (:func:`call_owner`): its retransmissions, the
  CANCEL and the ACK of a non-2xx carry the same Call-ID (§9.1, §17.1.1.3), so they meet the server
  transaction, and so do the ACK and BYE of the dialog; a function every process computes alike (not
  ``hash()``), which the kernel computes too when the parent could attach :mod:`p2psip.steering`: then
  the requests of a call arrive at their owner and are not handed over at all;
- except an **in-dialog request** whose top Route is ours: it belongs to the worker that forwarded the
  dialog's INVITE, which names itself in its Record-Route URI (:func:`route_param`, ``;wk=3``). The
  request's CANCEL, retransmissions and non-2xx ACK carry the same Route, so they meet it too; and a
  callee that answers a BYE where the INVITE came from (sipp does, not to the BYE's Via) reaches it;
- a **response** belongs to the worker named in our branch (the top Via is ours): a worker's stack ends
  the branches of its client transactions with :func:`branch_tag` (``.w3``);
- an **ACK** is forwarded by whichever worker reads it: the ACK of a 2xx is a request of its own (new
  branch, no transaction, §17.1.1.3), and handing it over cost a sixth of all hand-offs of a call. The
  ACK of a non-2xx does belong to its INVITE's server transaction, and only that transaction's worker
  knows it sent one: before sending a 3xx-6xx to an INVITE it tells the other workers
  (:meth:`HandoffLink.refusing`), and they hand over the ACKs of the branches they were told of. The
  ACK comes from the caller only after that final response went out, and a worker reads its inbox
  before deciding on an ACK, so the notice is there first.

A datagram with no branch (RFC 2543), or whose owner is this worker, is handled where it arrived. When a
worker dies, the parent marks it gone (a shared byte per worker) until its successor listens: meanwhile
what it owned is handled where it arrives, statelessly where no transaction knows it — a 2xx and an
in-dialog request (routed by Record-Route to the shared address) go on, an INVITE retransmission starts a
new transaction. (The successor, like any worker, knows none of the old transactions either.)

:func:`owner` is pure (bytes in, worker index out); :class:`HandoffLink` is the asyncio adapter over one
Unix datagram socket pair per worker (:func:`open_links`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2psip.transaction import ServerTransaction

log = logging.getLogger("p2psip.handoff")

#: the branch of the top Via: the first Via header line (full or compact name, any case)
_TOP_BRANCH = re.compile(
    rb"^(?:via|v)[ \t]*:[^\r\n]*?;[ \t]*branch[ \t]*=[ \t]*([^;,\s]+)", re.IGNORECASE | re.MULTILINE
).search
_WORKER_TAG = re.compile(rb"\.w([0-9]{1,4})$").search
#: the worker named in the first URI of the first Route header line (see :func:`route_param`)
_ROUTE_WORKER = re.compile(
    rb"^route[ \t]*:[ \t]*<[^>\r\n]*;wk=([0-9]{1,4})[;>]", re.IGNORECASE | re.MULTILINE
).search
#: the value of the Call-ID header (full or compact name, any case), its first CALL_ID_BYTES bytes: what
#: :func:`call_owner` hashes, as the kernel's program does (:mod:`p2psip.steering`)
CALL_ID_BYTES = 16
CALL_ID_PRIME = 65521
_CALL_ID = re.compile(
    rb"\n(?:[Cc][Aa][Ll][Ll]-[Ii][Dd]|[Ii])[ \t]*:[ \t]*([\x21-\xff]{1,%d})" % CALL_ID_BYTES
).search
#: a link datagram carries records: this header (datagram length, source port, source host length), the
#: source host (so the owner answers and stamps Via as if it had received the datagram itself), the
#: datagram; as many records as fit in :data:`_BATCH_BYTES`
_HEADER = struct.Struct("!IHB")
_BATCH_BYTES = 60_000
#: how long a worker remembers that another refused an INVITE (Timer H, 64*T1, and some): that long the
#: caller may retransmit the ACK of the final response; and at most this many such branches
_REFUSED_S = 40.0
_REFUSED_MAX = 20_000


def _record(data: bytes, host: str, port: int) -> bytes:
    """One record of a link datagram (see :data:`_HEADER`)."""
    name = host.encode("ascii", "replace")
    return _HEADER.pack(len(data), port, len(name)) + name + data


def _records(packet: bytes) -> list[tuple[bytes, tuple[str, int]]]:
    """The (datagram, source) records of one link datagram; a cut tail is dropped."""
    out = []
    pos, end = 0, len(packet)
    unpack, size = _HEADER.unpack_from, _HEADER.size
    while pos + size <= end:
        length, port, name = unpack(packet, pos)
        start = pos + size + name
        stop = start + length
        if stop > end:
            break
        out.append((packet[start:stop], (packet[pos + size : start].decode("ascii", "replace"), port)))
        pos = stop
    return out


def relay(source: socket.socket, outbox: socket.socket, limit: int = 100_000) -> int:
    """Hand what waits on ``source`` (a dead worker's UDP socket, read by the parent) to the worker whose
    link end is ``outbox``, in batches like :meth:`HandoffLink.flush`; returns how many datagrams.
    Without it, a dead worker's ACK would wait for its successor while the BYE that follows it, steered
    to a live worker, went ahead (a UAS that gets the BYE first fails the call)."""
    moved = 0
    batch: list[bytes] = []
    size = 0
    for _ in range(limit):
        try:
            data, addr = source.recvfrom(65535, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # an ICMP error for an earlier send: nothing to relay
            continue
        record = _record(data, str(addr[0]), int(addr[1]))
        if size + len(record) > _BATCH_BYTES:
            with contextlib.suppress(OSError):
                outbox.send(b"".join(batch))
            batch, size = [], 0
        batch.append(record)
        size += len(record)
        moved += 1
    if batch:
        with contextlib.suppress(OSError):  # a full buffer: lost like any UDP datagram
            outbox.send(b"".join(batch))
    return moved


def branch_tag(index: int) -> str:
    """What a worker appends to the branches of the client transactions it starts."""
    return f".w{index}"


def route_param(index: int) -> dict[str, str]:
    """What a worker adds to its Record-Route URIs (``Proxy.record_route_params``)."""
    return {"wk": str(index)}


def top_branch(data: bytes) -> bytes | None:
    """The branch of the top Via of ``data`` (a SIP datagram), unparsed; None when there is none."""
    found = _TOP_BRANCH(data)
    return None if found is None else found.group(1)


def call_owner(data: bytes, workers: int) -> int | None:
    """The worker that owns the requests of the call of ``data`` (a SIP datagram): the first
    :data:`CALL_ID_BYTES` bytes of its Call-ID read as a big-endian number, modulo
    :data:`CALL_ID_PRIME`, modulo ``workers`` (cheap here and in classic BPF: :mod:`p2psip.steering`).
    None when there is no Call-ID."""
    found = _CALL_ID(data)
    if found is None:
        return None
    return int.from_bytes(found.group(1), "big") % CALL_ID_PRIME % workers


def owner(data: bytes, workers: int) -> int | None:
    """The index of the worker that owns ``data`` (a SIP datagram), or None: handle it where it arrived
    (no branch, or a response whose branch names no worker). An ACK's owner here is its INVITE's; the
    link forwards most ACKs where they arrive (:meth:`HandoffLink.divert`)."""
    branch = top_branch(data)
    if branch is None:
        return None
    if data.startswith(b"SIP/"):
        tag = _WORKER_TAG(branch)
        if tag is None:
            return None
        index = int(tag.group(1))
        return index if index < workers else None
    if b";wk=" in data:
        route = _ROUTE_WORKER(data)
        if route is not None and int(route.group(1)) < workers:
            return int(route.group(1))
    return call_owner(data, workers)


Deliver = Callable[[bytes, tuple[str, int]], None]
Alive = Sequence[int]
"""Per worker index, non-zero while that worker is listening (a shared memory map the parent keeps)."""


Link = tuple[socket.socket, socket.socket]
"""One worker's link: the end it reads, and the end every other worker writes to."""


def open_links(workers: int) -> list[Link]:
    """One Unix datagram socket pair per worker, opened by the parent before it forks and held by it for as
    long as it runs: a worker started again after a crash reads the same socket, so what was handed to it
    meanwhile waits in the socket's buffer instead of being lost. A connected pair, not one bound socket
    every worker sends to: Linux queues at most ``net.unix.max_dgram_qlen`` (10 by default) datagrams from
    other senders on a bound Unix socket, and a burst overflowed it; between the two ends of a pair only
    the send buffer limits. Half the cost of a loopback UDP hop (no IP and UDP layers), and only our own
    processes hold the ends, so nothing else can hand a worker a datagram."""
    links: list[Link] = []
    try:
        for _ in range(workers):
            inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            links.append((inbox, outbox))
            with contextlib.suppress(OSError):
                outbox.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            outbox.setblocking(False)
            inbox.setblocking(False)
    except OSError:
        for pair in links:
            for sock in pair:
                sock.close()
        raise
    return links


class HandoffLink:
    """This worker's end: hands datagrams to their owner and delivers those handed to it.

    ``links`` are every worker's link by index (:func:`open_links`): this worker reads the first end of
    its own and writes to the second end of the others'. ``deliver(data, (host, port))`` processes a
    datagram as if it had arrived from ``host:port`` on the shared UDP port. Counters: ``handed_off``,
    ``handed_in``, ``owner_gone`` (handled here because the owner was being restarted), ``acks_here``
    (ACKs of another worker's branch forwarded here: the ACKs of 2xx responses), ``handoff_dropped`` (the
    owner's buffer was full: lost like any UDP datagram)."""

    def __init__(
        self,
        index: int,
        links: Sequence[Link],
        deliver: Deliver,
        alive: Alive | None = None,
    ) -> None:
        self.sock = links[index][0]
        self.index = index
        self.outboxes = [outbox for _, outbox in links]
        self.workers = len(links)
        self.deliver = deliver
        self.alive = alive
        self.stats: dict[str, int] = dict.fromkeys(("handed_off", "handed_in", "owner_gone", "acks_here"), 0)
        self._refused: dict[bytes, tuple[int, float]] = {}
        """Branch -> (the worker that sent a 3xx-6xx to that INVITE, until when its ACK goes there)."""
        self._queued: list[list[bytes]] = [[] for _ in links]
        self._size = [0] * self.workers
        self._dirty: list[int] = []
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def divert(self, data: bytes, addr: tuple[str | int, ...]) -> bool:
        """True when ``data`` (from ``addr``) is to be handed to another worker (at :meth:`flush`);
        False: handle it here."""
        alive = self.alive
        if alive is not None and 0 in alive:
            # a worker is being restarted: what the parent relayed from its sockets goes first, before
            # the later datagrams of the same calls that now arrive here (see :func:`relay`)
            self._readable(1024)
        index = owner(data, self.workers)
        if index is None or index == self.index:
            return False
        if data.startswith(b"ACK "):
            refused = self._refusal(data)
            if refused is None:
                self.stats["acks_here"] += 1  # the ACK of a 2xx: forwarded from here
                return False
            index = refused
            if index == self.index:
                return False
        if alive is not None and not alive[index]:
            # The owner died and its successor is not listening yet: it would know none of the old
            # transactions anyway, and waiting for it would let this datagram (an ACK) fall behind the
            # next one of the same call (its BYE, owned by a live worker).
            self.stats["owner_gone"] += 1
            return False
        record = _record(data, str(addr[0]), int(addr[1]))
        if self._size[index] + len(record) > _BATCH_BYTES:
            self._send(index)
        if not self._queued[index]:
            self._dirty.append(index)
        self._queued[index].append(record)
        self._size[index] += len(record)
        return True

    def _refusal(self, ack: bytes) -> int | None:
        """The worker that refused the INVITE this ACK acknowledges, or None (the ACK of a 2xx). The inbox
        is read first (all of it, within reason): the notice was written to it before the final response
        went out."""
        self._readable(1024)
        branch = top_branch(ack)
        entry = self._refused.get(branch) if branch is not None else None
        if entry is None or entry[1] < self._loop.time():
            return None
        return entry[0]

    def refusing(self, transaction: ServerTransaction) -> None:
        """:attr:`p2psip.stack.Stack.before_refusal`: this worker is about to send a 3xx-6xx on an INVITE
        server transaction; tell every other live worker (at once, not with the burst: the notice must
        be in their inboxes before the caller can see the response and send its ACK)."""
        via = transaction.request.top_via
        branch = via.params.get("branch") if via is not None else None
        if not branch:
            return  # RFC 2543: no branch, so its ACK stays on the worker it arrives at, as the INVITE did
        notice = _record(f"{self.index} {branch}".encode(), "", 0)
        for index, outbox in enumerate(self.outboxes):
            if index != self.index and (self.alive is None or self.alive[index]):
                with contextlib.suppress(OSError):  # a full inbox: that ACK is then forwarded, not absorbed
                    outbox.send(notice)

    def _noted(self, notice: bytes) -> None:
        """A notice of :meth:`refusing` from another worker: ``INDEX BRANCH``."""
        who, _, branch = notice.partition(b" ")
        if not who.isdigit() or not branch:
            return
        refused = self._refused
        now = self._loop.time()
        while refused and (len(refused) >= _REFUSED_MAX or next(iter(refused.values()))[1] < now):
            del refused[next(iter(refused))]  # the oldest first: insertion order is expiry order
        refused[branch] = (int(who), now + _REFUSED_S)

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
            self.outboxes[index].send(b"".join(queued))
        except OSError:  # a full buffer: lost like any UDP datagram (the sender retransmits)
            self.stats["handoff_dropped"] = self.stats.get("handoff_dropped", 0) + len(queued)
        else:
            self.stats["handed_off"] += len(queued)
        queued.clear()
        self._size[index] = 0

    def _readable(self, burst: int = 64) -> None:
        recv = self.sock.recv
        deliver = self.deliver
        stats = self.stats
        for _ in range(burst):
            try:
                packet = recv(70000)
            except OSError:  # BlockingIOError: drained
                return
            for data, source in _records(packet):
                if not source[1]:  # port 0: a notice, not a datagram
                    self._noted(data)
                    continue
                stats["handed_in"] += 1
                try:
                    deliver(data, source)
                except Exception:
                    log.exception("handed-in datagram failed")

    def close(self) -> None:
        """Stop reading (the sockets themselves belong to the parent, which closes them)."""
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
