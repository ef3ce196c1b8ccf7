"""The storage protocol of one node (sans-IO): what a node does with ``store``, ``fetch`` and ``transfer``
requests, and which storage requests it sends on its own (replica fan-out, hand-off, repair).

``overlay.storage`` holds the data (``Store``: signed entries and the checks every replica applies) and the
replication decisions (``Replicator``); this module is the protocol around them, in the style of
``overlay.chord.ChordCore``: no sockets, no clock, ``now`` passed in, outputs drained with
:meth:`StorageCore.take_outputs`. The asyncio ``Node`` and the simulator (``overlay/sim.py``) drive this
same class, so what the simulator measures about storage is what a real node does.

Inputs:

* :meth:`StorageCore.handle_request` — a request from another node (or the local client). ``token``
  names the request for its answer; with ``once`` true (datagrams) a repeated token is recognised: while
  the first is being handled the repeat is ignored, once answered the same answer is sent again (a store
  must not run twice: the replicas' seq check would refuse the second run);
* :meth:`StorageCore.on_reply` / :meth:`StorageCore.on_failure` — the outcome of a :class:`Send` this core
  asked for. The adapter owns retransmission and timeouts and must report every Send exactly once;
* :meth:`StorageCore.on_neighbours` (chord's ``NeighboursChanged``), :meth:`StorageCore.leave`,
  :meth:`StorageCore.handle_timer` at :meth:`StorageCore.next_timer`.

Outputs: :class:`Send` (a storage request to another node) and :class:`Answer` (the reply to a request).

The protocol rules that live here:

* responsibility: a ``store`` or ``fetch`` without ``replica`` is served only for keys in
  (predecessor, me]; otherwise ``err 421 not-responsible`` (the client looks the key up again);
* replica fan-out: a writer usually sends the replicas their copies itself (``fanout`` on its store to
  the primary, ``overlay.node._WriteFanOut``): the primary keeps and checks the entry and answers at once
  ``stored = 1`` and ``wanted = 1 + its replicas``. A plain store (no such writer; or the same entry again:
  a retry, a writer handing back a copy that went missing) is forwarded to the first r-1 successors in
  parallel and answered ``stored = 1 + copies acknowledged`` and ``wanted = 1 + copies sent`` (the writer
  checks its write quorum against them); a missing copy schedules an early repair;
* duplicate suppression: a retransmitted request gets the first answer, never a second run; the very same
  entry stored again is an idempotent success;
* hand-off forwarding: a node that joined moments ago and finds nothing for a key asks its successor
  (which held the range before), so a read right after a join does not miss;
* replica fetches (``replica`` true) answer from whatever the node holds, tombstones included with their
  ``seq`` and remaining lifetime, so a reader comparing replicas can tell "removed" from "never had it";
* transfers: join/leave hand-off and the periodic and early repair push, chunked, one chunk at a time per
  target (a target that fails one chunk gets no more this round);
* repair by digest: the periodic and early repair first send each replica a ``digest`` of the primary
  range (one 8-byte sum per bucket, ``overlay.storage.range_digest``); the replica answers the
  buckets that differ from what it holds (``differ``, a bitmap) and only their records are pushed. A
  replica that does not answer (or an older peer that does not know ``digest``) gets the whole range;
* who may fill whom: a ``store`` with ``replica`` and a ``transfer`` skip the responsibility check, so
  they are taken only from verified ring members (``member``, which the adapter decides) and only for
  keys this node holds a copy of in its own view (``holds_replica``: among the key's r successors), so
  hand-off on join, repair and read repair work and nobody else can fill a node's disk (issue 17).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from overlay.errors import StoreRefused
from overlay.storage import (
    DIGEST_BUCKETS,
    DIGEST_SUM_BYTES,
    Entry,
    NodeRef,
    Replicator,
    Store,
    Transfer,
    differing_buckets,
    in_buckets,
    range_digest,
)
from overlay.wire import TCP_MAX

# err codes of storage replies (the client side maps them to exceptions)
E_BAD_REQUEST = 400  # not sent by this version; a newer peer may
E_REFUSED = 403
E_NOT_RESPONSIBLE = 421
E_TOO_BIG = 413

DEFAULT_LIFETIME_CAP = 24 * 3600.0
ENTRY_OVERHEAD = 200  # bytes an entry costs on the wire beyond value and entry_id (keys, signature, seq)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Protocol tunables. ``rpc_timeout`` only sizes the time budget a Send carries."""

    rpc_timeout: float = 1.0
    repair_interval: float = 60.0  # anti-entropy push of the primary range (and purge of expired entries)
    early_repair_delay: float = 2.0  # a replica missed a write: push the primary range again this soon
    handoff_window: float = 5.0  # after the first predecessor links: empty fetches ask the successor
    max_reply_bytes: int = TCP_MAX - 4096
    transfer_chunk: int = 512 * 1024
    answers_kept: int = 2048  # answered datagram requests remembered for retransmissions
    announce_parallel: int = 8  # lookups in flight while a restarted node re-announces its keys
    # Policy: an entry is kept at most this long here, whatever lifetime it was signed with (None: as
    # signed, up to the Store's max_lifetime). Bounds how long anyone's writes occupy this node.
    lifetime_cap: float | None = None
    # Repairs compare digests first and push only the buckets that differ (False: push the whole range).
    digest_repair: bool = True


@dataclass(frozen=True, slots=True)
class Send:
    """Send storage request ``type`` to ``to``; report the outcome with ``on_reply``/``on_failure``.
    ``bulk``: a transfer (use the stream path); ``timeout``: the whole budget, retries included."""

    request_id: int
    to: NodeRef
    type: str
    body: dict[str, Any]
    timeout: float
    bulk: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """The reply (``ok`` or ``err``) to the request handled under ``token``."""

    token: Hashable
    type: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Locate:
    """Look ``key`` up and report the responsible node with ``on_located`` (None if the lookup failed).
    Used by a node restarted with entries on disk, to hand each to where it belongs now."""

    request_id: int
    key: int


Output = Send | Answer | Locate


@dataclass(slots=True)
class _FanOut:
    token: Hashable
    targets: int
    waiting: int
    acked: int = 0


@dataclass(slots=True)
class _HandoffFetch:
    token: Hashable
    key: int


@dataclass(slots=True)
class _DigestCheck:
    """A repair's digest sent to one replica: what to push from, once it says which buckets differ."""

    target: NodeRef
    items: list[tuple[Entry, int]]
    lo: int | None
    hi: int


@dataclass(slots=True)
class _TransferQueue:
    target: NodeRef
    chunks: list[list[tuple[Entry, int]]]
    sent: int = 0
    handoff: bool = False  # the leave transfer to the first successor: counts into ``handed_off``
    announce: bool = False  # a restarted node's hand-over: the receiver passes new entries to its replicas


class StorageCore:
    """One node's storage protocol over its ``Store``; see the module docstring."""

    def __init__(
        self,
        me: int,
        store: Store,
        replicas: int,
        now: float,
        config: StorageConfig | None = None,
        *,
        first_repair_at: float | None = None,
    ) -> None:
        self.me = me
        self.store = store
        self.config = config or StorageConfig()
        self.replicator = Replicator(me, replicas)
        self.successors: list[NodeRef] = []
        self.stats: dict[str, int] = {}
        self.handed_off = 0  # entries acknowledged by successors after leave()
        self._outputs: list[Output] = []
        self._ids = itertools.count(1)
        self._ops: dict[int, _FanOut | _HandoffFetch | _TransferQueue | _DigestCheck] = {}
        self._answers: OrderedDict[Hashable, Answer | None] = OrderedDict()
        self._handoff_until = 0.0
        self._linked = False
        if first_repair_at is None:
            first_repair_at = now + self.config.repair_interval
        self._repair_at = first_repair_at
        self._early_repair_at: float | None = None
        self._transfers = 0
        # Entries restored from disk are re-announced once this node is linked into the ring.
        self._announce = len(store) > 0
        self._locating: dict[int, int] = {}  # Locate request id -> key
        self._to_locate: list[int] = []
        self._announced: dict[int, tuple[NodeRef, list[tuple[Entry, int]]]] = {}
        # Whether this node keeps a copy of a key (among its r successors in our own view); the adapter
        # wires it to chord (ChordCore.holds_replica). Until then: every key.
        self.holds_replica: Callable[[int], bool] = lambda key: True
        self.knows_others = False
        """This node has been part of a ring with other members (it joined through one, or a successor
        other than itself showed up). Such a node that sees no successor at all is cut off, not alone: its
        store answers want ``replicas`` copies, so a writer holding a write quorum above one fails
        (``WriteQuorumFailed``) rather than take one copy for the r it was promised. A node that started
        a ring and never saw another member is a ring of one: one copy is all there is."""

    # --- outputs and timers ----------------------------------------------------------------------

    def take_outputs(self) -> list[Output]:
        out, self._outputs = self._outputs, []
        return out

    def next_timer(self) -> float:
        if self._early_repair_at is not None:
            return min(self._early_repair_at, self._repair_at)
        return self._repair_at

    def handle_timer(self, now: float) -> None:
        if self._early_repair_at is not None and self._early_repair_at <= now:
            self._early_repair_at = None
            self._count("early_repairs")
            self._repair(now)
        if self._repair_at <= now:
            self._repair_at = now + self.config.repair_interval
            self.store.purge(now)
            self._repair(now)

    def _repair(self, now: float) -> None:
        """Anti-entropy: the primary range to each replica, by digest first (see the module docstring)."""
        transfers = self.replicator.repair(self.store, now)
        if not self.config.digest_repair:
            self._send_transfers(transfers)
            return
        lo, hi = self.replicator.primary_range()
        for target, items in transfers:
            if target[0] == self.me:
                continue
            rid = next(self._ids)
            self._ops[rid] = _DigestCheck(target, items, lo, hi)
            self._count("digests_sent")
            body: dict[str, Any] = {"lo": lo, "hi": hi, "sums": range_digest(items, lo, hi)}
            self._outputs.append(Send(rid, target, "digest", body, timeout=2 * self.config.rpc_timeout))

    @property
    def transfers_in_flight(self) -> int:
        """Targets that still have transfer chunks outstanding (``leave`` waits for none)."""
        return self._transfers

    def is_responsible(self, key: int) -> bool:
        """Key in (predecessor, me]; every key while no predecessor is known (as chord's own rule)."""
        return self.replicator.is_primary(key)

    # --- neighbour changes and leaving ----------------------------------------------------------

    def on_neighbours(self, pred: NodeRef | None, succs: list[NodeRef], now: float) -> None:
        """Chord's view changed: remember it and send whatever keeps r copies in the right places."""
        first_link = pred is not None and not self._linked
        if first_link:
            # We are really in the ring now; the range we took over may still be on its way to us.
            self._linked = True
            self._handoff_until = now + self.config.handoff_window
        self.successors = list(succs)
        if not self.knows_others and self.replicator.replica_targets(self.successors):
            self.knows_others = True
        self._send_transfers(self.replicator.on_neighbours(pred, list(succs), self.store, now))
        if first_link and self._announce:
            self._announce = False
            self._start_announce(now)

    # --- re-announcing what a restarted node holds ------------------------------------------------

    def _start_announce(self, now: float) -> None:
        """A node restarted with entries on disk: the ring may have changed while it was down. Keys in
        its own range reach its replicas through the Replicator (a new replica set gets the primary
        range); every other key is looked up and its records handed to the node responsible now, which
        keeps what is newer than its own copy and passes that on to its replicas."""
        keys = sorted({e.key for e, _ms in self.store.records(now) if not self.is_responsible(e.key)})
        self._count("announce_keys", len(keys))
        self._to_locate = keys
        self._next_locates()

    def _next_locates(self) -> None:
        while self._to_locate and len(self._locating) < self.config.announce_parallel:
            key = self._to_locate.pop()
            rid = next(self._ids)
            self._locating[rid] = key
            self._outputs.append(Locate(rid, key))

    def on_located(self, request_id: int, node: NodeRef | None, now: float) -> None:
        """The outcome of a :class:`Locate`."""
        key = self._locating.pop(request_id, None)
        if key is None:
            return
        if node is not None and node[0] != self.me:
            items = self.store.slot_records(key, now)
            if items:
                self._announced.setdefault(node[0], (node, []))[1].extend(items)
        elif node is None:
            self._count("announce_lookup_failures")
        self._next_locates()
        if not self._locating and not self._to_locate and self._announced:
            batches = [(target, items) for target, items in self._announced.values()]
            self._announced = {}
            self._send_transfers(batches, announce=True)

    def leave(self, now: float) -> int:
        """Hand everything to the successors (see ``Replicator.on_leave``); returns the number of entries
        sent to the first successor (what ``handed_off`` counts once acknowledged)."""
        transfers = self.replicator.on_leave(list(self.successors), self.store, now)
        self._send_transfers(transfers, leaving=True)
        return len(transfers[0][1]) if transfers else 0

    # --- requests --------------------------------------------------------------------------------

    def handle_request(
        self,
        token: Hashable,
        mtype: str,
        body: dict[str, Any],
        now: float,
        *,
        once: bool = False,
        member: bool = False,
        sender: NodeRef | None = None,
    ) -> None:
        """Handle ``store``/``fetch``/``transfer`` (validated by the wire codec). The answer comes out as
        an :class:`Answer` with ``token``, at once or after the Sends it needs. ``member``: the sender is
        a verified ring member (or this node itself); only members may send replicas and transfers.
        ``sender``: who sent it, where known (a repair ``digest`` gets what we hold and it lacks back)."""
        if once:
            if token in self._answers:
                self._count("request_duplicates")
                done = self._answers[token]
                if done is not None:
                    self._outputs.append(done)
                return
            self._answers[token] = None
            while len(self._answers) > self.config.answers_kept:
                self._answers.popitem(last=False)
        if mtype == "fetch":
            key = body["key"]
            if body.get("owner") and not self.is_responsible(key):
                # A reader's quorum read asked us first, as the key's responsible node: its view of
                # the ring (an owner cache from before a join) is stale, and the holders it would read
                # with us may not be the key's; it looks the key up again, as a writer does on a 421.
                self._count("fetch_not_owner")
                self._err(token, E_NOT_RESPONSIBLE, "not-responsible")
                return
            self._fetch(token, key, bool(body.get("replica", False)), now)
        elif mtype == "transfer":
            if not member:
                self._refuse_stranger(token, "transfer", len(body["entries"]))
                return
            items = [item for item in body["entries"] if self.holds_replica(item[0].key)]
            if len(items) < len(body["entries"]):
                self._count("transfer_entries_not_held", len(body["entries"]) - len(items))
            cap = self.config.lifetime_cap
            if cap is not None:
                items = [(e, min(ms, int(cap * 1000))) for e, ms in items]
            fresh: list[tuple[Entry, int]] = []
            kept, refused = self.store.accept(items, now, fresh)
            self._count("transfer_entries_kept", kept)
            self._count("transfer_entries_refused", refused)
            self._answer(token, "ok", {"stored": kept})
            if body.get("announce"):
                # A restarted node (or a replica answering our repair digest) handed us what it held:
                # what was new to us and is ours goes on to our replicas, as a store would; not back to
                # the one that sent it.
                ours = [item for item in fresh if self.is_responsible(item[0].key)]
                targets = self.replicator.replica_targets(self.successors)
                sent_by = sender[0] if sender is not None else None
                self._send_transfers([(target, ours) for target in targets if target[0] != sent_by])
        elif mtype == "digest":
            if not member:
                self._refuse_stranger(token, "digest", 0)
                return
            self._digest(token, body, now, sender)
        elif mtype == "store":
            replica = bool(body.get("replica", False))
            if replica and not member:
                self._refuse_stranger(token, "store", 1)
                return
            if replica and not self.holds_replica(body["entry"].key):
                self._count("store_refused_not_held")
                self._err(token, E_NOT_RESPONSIBLE, "not-replica", "this node keeps no copy of that key")
                return
            self._store(token, body["entry"], replica, now, fanout=bool(body.get("fanout", False)))
        else:
            self._answer(token, "err", {"code": E_BAD_REQUEST, "reason": "unknown-type", "detail": mtype})

    def _refuse_stranger(self, token: Hashable, mtype: str, entries: int) -> None:
        """A replica store or transfer from a node that is not a verified ring member: refused, counted."""
        self._count(f"{mtype}_refused_stranger")
        self._count("entries_refused_stranger", entries)
        self._err(token, E_REFUSED, "not-a-member", "replicas and transfers are taken from ring members only")

    def _digest(self, token: Hashable, body: dict[str, Any], now: float, sender: NodeRef | None) -> None:
        """A primary's repair digest: answer the buckets where our records of its range differ, and push
        our records of those buckets back to the primary (repair runs both ways).

        The push-back is what mends a primary that lacks a record its replica holds: a write whose copy
        at the primary-to-be went missing while the primary of the time crashed (its hand-back died with
        it), a join hand-off that failed. The primary's own pushes only ever go down to its replicas, so
        without this such a record would stay one or two copies short for good. The primary keeps what is
        newer than its own copy and passes it on to its replicas, as with a restarted node's records
        (``announce``). Only for a range with a known lower end: a primary that knows no predecessor
        takes itself for the whole ring for a moment, and gets the buckets pushed once it knows better."""
        sums: bytes = body["sums"]
        buckets = len(sums) // DIGEST_SUM_BYTES
        if not sums or len(sums) % DIGEST_SUM_BYTES or buckets > DIGEST_BUCKETS:
            self._answer(token, "err", {"code": E_BAD_REQUEST, "reason": "bad-digest"})
            return
        lo, hi = body.get("lo"), body["hi"]
        ours = range_digest(self.store.in_range(lo, hi, now), lo, hi, buckets)
        differ = differing_buckets(ours, sums)
        self._count("digests_answered")
        self._count("digest_buckets_differ", sum(bin(b).count("1") for b in differ))
        self._answer(token, "ok", {"differ": differ})
        if sender is None or lo is None or sender[0] == self.me or not any(differ):
            return
        back = in_buckets(self.store.in_range(lo, hi, now), lo, hi, differ)
        if back:
            self._count("digest_entries_pushed_back", len(back))
            self._send_transfers([(sender, back)], announce=True)

    def forget(self, token: Hashable) -> None:
        """The adapter could not handle ``token`` (an internal error): a retransmission may try again."""
        if self._answers.get(token, 1) is None:
            del self._answers[token]

    def _answer(self, token: Hashable, mtype: str, body: dict[str, Any]) -> None:
        answer = Answer(token, mtype, body)
        if token in self._answers:
            self._answers[token] = answer
        self._outputs.append(answer)

    def _err(self, token: Hashable, code: int, reason: str, detail: str | None = None) -> None:
        self._answer(token, "err", {"code": code, "reason": reason, "detail": detail})

    def _fetch(self, token: Hashable, key: int, replica_read: bool, now: float) -> None:
        if replica_read:
            self._count("fetch_served")
            self._answer_entries(token, self.store.slot_records(key, now))
            return
        if not self.is_responsible(key):
            self._count("fetch_not_responsible")
            self._err(token, E_NOT_RESPONSIBLE, "not-responsible")
            return
        entries = [(e, 0) for e in self.store.get(key, now)]
        succ = next((s for s in self.successors if s[0] != self.me), None)
        if not entries and now < self._handoff_until and succ is not None:
            # We joined moments ago and the range we took over may still be on its way from our
            # successor: ask it rather than answer "nothing there".
            self._count("fetch_forwarded_during_handoff")
            rid = next(self._ids)
            self._ops[rid] = _HandoffFetch(token, key)
            body = {"key": key, "replica": True}
            self._outputs.append(Send(rid, succ, "fetch", body, timeout=2 * self.config.rpc_timeout))
            return
        self._count("fetch_served")
        self._answer_entries(token, entries)

    def _answer_entries(self, token: Hashable, items: list[tuple[Entry, int]]) -> None:
        fitting: list[tuple[Entry, int]] = []
        size = 0
        for item in items:
            size += len(item[0].value) + len(item[0].entry_id) + ENTRY_OVERHEAD
            if size > self.config.max_reply_bytes:
                self._count("fetch_truncated")
                self._answer(token, "ok", {"entries": fitting, "truncated": True})
                return
            fitting.append(item)
        self._answer(token, "ok", {"entries": fitting})

    def _store(
        self, token: Hashable, entry: Entry, replica: bool, now: float, *, fanout: bool = False
    ) -> None:
        if not replica and not self.is_responsible(entry.key):
            self._count("store_not_responsible")
            self._err(token, E_NOT_RESPONSIBLE, "not-responsible")
            return
        cap = self.config.lifetime_cap
        if cap is not None and entry.lifetime_s > cap:
            self._count("lifetime_capped")
        try:
            self.store.put(entry, now, remaining_s=cap)
        except StoreRefused as exc:
            if exc.reason != "stale-seq" or self.store.current(entry.key, entry.entry_id) != entry:
                self._count(f"store_refused_{exc.reason.replace('-', '_')}")
                if replica and exc.reason == "stale-seq":
                    self._answer(token, "ok", {"stored": 0})
                else:
                    self._err(token, E_REFUSED, exc.reason, str(exc))
                return
            # the very same entry again: an idempotent success. At a replica that is all; at the primary
            # it is a retry whose answer was lost, or a writer handing its fan-out back because a copy
            # it sent went missing (Node._store_entry): the replicas are asked again below (one that has
            # it answers ok), so the answer says how many copies exist and a missing one gets repaired.
            self._count("store_duplicates")
            if replica:
                self._answer(token, "ok", {"stored": 0})
                return
        else:
            self._count("stores_accepted")
        if replica:
            self._answer(token, "ok", {"stored": 1})
            return
        targets = self.replicator.replica_targets(self.successors)
        if fanout or not targets:
            # ``fanout``: the writer sends the replicas their copies itself and counts their answers; the
            # primary's answer says how many copies its own view wants.
            cut_off = not targets and self.knows_others
            if cut_off:
                self._count("stores_cut_off")
            wanted = self.replicator.replicas if cut_off else 1 + len(targets)
            self._answer(token, "ok", {"stored": 1, "wanted": wanted})
            return
        fan = _FanOut(token, len(targets), len(targets))
        for target in targets:
            rid = next(self._ids)
            self._ops[rid] = fan
            body = {"entry": entry, "replica": True}
            self._outputs.append(Send(rid, target, "store", body, timeout=3 * self.config.rpc_timeout))

    # --- outcomes of our own Sends ---------------------------------------------------------------

    def on_reply(self, request_id: int, mtype: str, body: dict[str, Any], now: float) -> None:
        """The reply to Send ``request_id`` arrived (``ok`` or ``err``)."""
        op = self._ops.pop(request_id, None)
        if isinstance(op, _FanOut):
            self._fan_in(op, mtype == "ok", now)
        elif isinstance(op, _HandoffFetch):
            found: list[tuple[Entry, int]] = []
            if mtype == "ok":
                found = [(e, 0) for e, _ms in body.get("entries", []) if e.key == op.key and not e.is_removal]
            self._count("fetch_served")
            self._answer_entries(op.token, found)
        elif isinstance(op, _DigestCheck):
            differ = body.get("differ") if mtype == "ok" else None
            if not isinstance(differ, bytes):
                self._count("digest_fallbacks")  # an err (an older peer?): push it all, as before
                self._send_transfers([(op.target, op.items)])
                return
            chosen = in_buckets(op.items, op.lo, op.hi, differ)
            self._count("digest_entries_skipped", len(op.items) - len(chosen))
            self._send_transfers([(op.target, chosen)])
        elif isinstance(op, _TransferQueue):
            if mtype != "ok":
                self._transfer_failed(op)
                return
            acked = len(op.chunks[op.sent])
            self._count("transfer_entries_sent", acked)
            if op.handoff:
                self.handed_off += acked
            op.sent += 1
            self._next_chunk(op)

    def on_failure(self, request_id: int, now: float) -> None:
        """Send ``request_id`` got no reply within its timeout (or could not be sent)."""
        op = self._ops.pop(request_id, None)
        if isinstance(op, _FanOut):
            self._fan_in(op, False, now)
        elif isinstance(op, _HandoffFetch):
            self._count("fetch_served")
            self._answer_entries(op.token, [])
        elif isinstance(op, _DigestCheck):
            self._count("digest_fallbacks")  # no answer (an older peer drops the type): push it all
            self._send_transfers([(op.target, op.items)])
        elif isinstance(op, _TransferQueue):
            self._transfer_failed(op)

    def _fan_in(self, fan: _FanOut, acked: bool, now: float) -> None:
        fan.waiting -= 1
        fan.acked += int(acked)
        if fan.waiting:
            return
        self._answer(fan.token, "ok", {"stored": 1 + fan.acked, "wanted": 1 + fan.targets})
        if fan.acked < fan.targets and self._early_repair_at is None:
            # A replica missed a write: push our primary range again shortly (debounced), rather than
            # leaving that entry one copy short until the periodic repair.
            self._early_repair_at = now + self.config.early_repair_delay

    # --- transfers -------------------------------------------------------------------------------

    def _send_transfers(
        self, transfers: list[Transfer], *, leaving: bool = False, announce: bool = False
    ) -> None:
        for index, (target, items) in enumerate(transfers):
            if not items or target[0] == self.me:
                continue
            chunks: list[list[tuple[Entry, int]]] = [[]]
            size = 0
            for item in items:
                if size >= self.config.transfer_chunk:
                    chunks.append([])
                    size = 0
                chunks[-1].append(item)
                size += len(item[0].value) + ENTRY_OVERHEAD
            queue = _TransferQueue(target, chunks, handoff=leaving and index == 0, announce=announce)
            self._transfers += 1
            self._next_chunk(queue)

    def _next_chunk(self, queue: _TransferQueue) -> None:
        if queue.sent >= len(queue.chunks):
            self._transfers -= 1
            return
        rid = next(self._ids)
        self._ops[rid] = queue
        body: dict[str, Any] = {"entries": queue.chunks[queue.sent]}
        if queue.announce:
            body["announce"] = True
        self._outputs.append(
            Send(rid, queue.target, "transfer", body, timeout=4 * self.config.rpc_timeout, bulk=True)
        )

    def _transfer_failed(self, queue: _TransferQueue) -> None:
        self._count("transfer_failures")
        self._transfers -= 1

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n
