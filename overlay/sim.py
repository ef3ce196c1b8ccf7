"""Discrete-event simulator: N nodes running the real ``ChordCore`` (and the real storage core) on a
simulated network, so scale and churn claims are measured on the code that ships.

Why a simulator: 10,000 real UDP nodes do not fit in one test machine, and real time makes churn studies
(hour-long sessions) impossible. Here time is a number: one heap of events ordered by simulated time,
processed one at a time, so a run is deterministic for a seed and costs only the work the cores do.

What is real: ``overlay.chord.ChordCore`` (every message, timer, retry, verification round) and
``overlay.storage_core.StorageCore`` (the storage protocol ``overlay.node.Node`` runs: responsibility
checks, replica fan-out, duplicate suppression, hand-off forwarding, transfers and repair, over
``overlay.storage.Store`` with real Ed25519 entries). Entries get into the ring as a client's would: a
lookup from a random node, then a ``store`` to the node it found, which fans the entry out to its replicas;
reads (``fetch_checks``) are ``fetch`` requests to the node a lookup found, and with ``quorum_reads`` also
a read of the replica set decided by ``overlay.reads.QuorumRead`` (what ``Node.get`` runs). A fraction
``adversaries`` of the nodes can misbehave (``ADVERSARY_KINDS``: drop, hide, replay, misroute); the report
counts stale reads both ways. What is simulated or skipped, on purpose:

* the network: one-way latency from a 2-D coordinate model (``base + spread * distance``), independent
  message loss, no bandwidth limit; bodies are passed as Python values (the codec in ``overlay/wire.py`` is
  not run per message; it is tested on its own);
* node identities: a SHA-256 stand-in for Ed25519 (NodeId = H(public key) is checked and nonces are signed
  and checked exactly as on real nodes, but the "signature" is a hash anyone holding the public key could
  forge) — it exercises the admission protocol at a fraction of the CPU cost;
* storage requests and replies are one message each way with latency (a lost one is reported to the sender
  as a failure after its timeout, as the node's retransmissions would end), and entry signatures are verified
  through one shared ``VerifiedCache``, so an entry is checked once per run rather than once per replica;
* a stable ring can be installed directly (``ChordCore.seed_routing``) instead of running N joins.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from overlay import ids
from overlay.chord import (
    ChordConfig,
    ChordCore,
    Joined,
    JoinFailed,
    LookupDone,
    LookupFailed,
    NeighboursChanged,
    NodeRef,
    Reply,
    SendRequest,
)

_REQ, _REP, _TIMER, _LOOKUP, _DEPART, _ARRIVE, _SREQ, _STIMER, _JOIN_RETRY, _SREP, _SFAIL, _CLIENT, _QEND = (
    range(13)
)

#: What an adversarial node does (SimConfig.adversaries): "drop" answers maintenance but drops lookups
#: and fetches; "hide" answers every fetch with nothing; "replay" answers fetches with an older signed
#: version of the entry; "misroute" claims to be responsible for every key it is asked about, or points
#: lookups backwards (and hides).
ADVERSARY_KINDS = ("drop", "hide", "replay", "misroute")


def sim_sign(public_key: bytes) -> Callable[[bytes], bytes]:
    """The simulator's stand-in signer: SHA-512 over key and data (64 bytes, like Ed25519)."""
    return lambda data: hashlib.sha512(b"sim-sig" + public_key + data).digest()


def sim_verify(public_key: bytes, data: bytes, sig: bytes) -> bool:
    """Checks a :func:`sim_sign` signature (not secure: see the module docstring)."""
    return hashlib.sha512(b"sim-sig" + public_key + data).digest() == sig


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulation run. Times in seconds."""

    n: int = 100
    seed: int = 1
    chord: ChordConfig = field(default_factory=ChordConfig)
    latency_base: float = 0.005  # one-way, seconds
    latency_spread: float = 0.1  # added for the full diagonal of the unit square
    loss: float = 0.0  # probability that any one message is lost
    duration: float = 120.0  # simulated time of the measured run
    lookup_rate: float = 20.0  # user lookups per second, over the whole network
    lookup_stop: float = 30.0  # no new lookups in the last seconds, so in-flight ones finish
    median_session: float | None = None  # None: no churn
    crash_fraction: float = 0.5  # share of departures that are crashes (the rest leave gracefully)
    entries: int = 0  # signed entries stored at the start (storage core in the loop when > 0)
    repair_interval: float = 300.0  # storage anti-entropy period per node
    build: str = "seeded"  # "seeded": install a stable ring; "joins": nodes join one by one
    join_interval: float = 0.5  # "joins" build: seconds between two joins
    warmup: float = 0.0  # no lookups before this time (let a "joins" ring settle)
    adversaries: float = 0.0  # fraction of the nodes that misbehave (seeded build), kinds in turn
    adversary_kinds: tuple[str, ...] = ADVERSARY_KINDS
    quorum_reads: bool = False  # each fetch check also reads the replica set (overlay.reads.QuorumRead)
    read_deadline: float = 2.0  # a quorum read takes what answered by then


@dataclass(slots=True)
class SimReport:
    """What a run measured (see docs/overlay-routing.md for the definitions)."""

    n_start: int
    n_end: int
    duration: float
    lookups: int = 0
    succeeded: int = 0
    correct: int = 0
    hops: list[int] = field(default_factory=list)
    lookup_latency: list[float] = field(default_factory=list)
    joins: int = 0
    leaves: int = 0
    crashes: int = 0
    messages: int = 0  # every routing request and reply delivered or lost
    lookup_messages: int = 0  # 2 x hops of user lookups (their requests and replies; retries not counted)
    transfers: int = 0
    entries: int = 0
    entries_lost: int = 0  # stored at the start, held by no live node at the end (stronger than the target)
    entries_stored: int = 0  # client stores the responsible node acknowledged
    storage_messages: int = 0  # storage requests and replies (fan-out, transfers, client store/fetch)
    fetch_checks: int = 0
    fetch_found: int = 0
    wall_s: float = 0.0
    node_seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # LookupFailed reasons
    wrong: int = 0  # lookups that finished on a node that was not the true owner
    adversaries: int = 0
    misroutes: int = 0  # wrong routing answers the lookups detected and routed around
    # Reads of a stored entry: stale = the current version missing or an older one returned.
    single_reads: int = 0  # one fetch from the node the lookup found (the old way)
    single_stale: int = 0
    quorum_reads: int = 0  # the replica set asked, overlay.reads decides
    quorum_stale: int = 0
    abandoned: int = 0  # lookups whose origin left or crashed before the end (not counted in lookups)

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.lookups if self.lookups else 1.0

    @property
    def correct_rate(self) -> float:
        return self.correct / self.lookups if self.lookups else 1.0

    @property
    def hops_mean(self) -> float:
        return sum(self.hops) / len(self.hops) if self.hops else 0.0

    @property
    def hops_p99(self) -> int:
        return _percentile(self.hops, 0.99)

    @property
    def maintenance_per_node_s(self) -> float:
        """Routing messages per node per second, user lookups excluded."""
        if self.node_seconds <= 0:
            return 0.0
        return (self.messages - self.lookup_messages) / self.node_seconds

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n_start,
            "n_end": self.n_end,
            "sim_s": self.duration,
            "lookups": self.lookups,
            "success": round(self.success_rate, 5),
            "correct": round(self.correct_rate, 5),
            "hops_mean": round(self.hops_mean, 3),
            "hops_p99": self.hops_p99,
            "latency_p50_ms": round(1000 * _percentile_f(self.lookup_latency, 0.5), 1),
            "maint_msgs_node_s": round(self.maintenance_per_node_s, 3),
            "joins": self.joins,
            "leaves": self.leaves,
            "crashes": self.crashes,
            "entries": self.entries,
            "entries_lost": self.entries_lost,
            "entries_stored": self.entries_stored,
            "fetch_found": f"{self.fetch_found}/{self.fetch_checks}",
            "wall_s": round(self.wall_s, 2),
            "failures": dict(sorted(self.failures.items())),
            "abandoned": self.abandoned,
            "unfinished": self.lookups - self.succeeded - sum(self.failures.values()),
        }


def _percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _percentile_f(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(slots=True, eq=False)
class _Node:
    ref: NodeRef
    core: ChordCore
    x: float
    y: float
    alive: bool = True
    member: bool = False
    timer_at: float | None = None
    born: float = 0.0
    storage: Any = None  # overlay.storage_core.StorageCore when the run stores entries
    storage_timer_at: float | None = None
    adversary: str | None = None  # one of ADVERSARY_KINDS


class Simulator:
    """Runs one :class:`SimConfig`; call :meth:`run` once and read the :class:`SimReport`."""

    def __init__(self, config: SimConfig) -> None:
        if config.build not in ("seeded", "joins"):
            raise ValueError(f"build must be 'seeded' or 'joins', not {config.build!r}")
        if config.n < 1 or config.duration <= 0 or not 0 <= config.loss < 1:
            raise ValueError("need n >= 1, duration > 0 and 0 <= loss < 1")
        if config.median_session is not None and config.median_session <= 0:
            raise ValueError("median_session must be positive (or None for no churn)")
        self.config = config
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._nodes: dict[tuple[str, int], _Node] = {}
        self._by_id: dict[int, _Node] = {}
        self._members: list[int] = []  # sorted ids of live joined nodes: the ground truth
        self._counter = 0
        self._lookups: dict[tuple[int, int], tuple[float, int, str]] = {}  # (node id, lookup id)
        self.report = SimReport(n_start=config.n, n_end=0, duration=config.duration)
        self._mean_session = (config.median_session / math.log(2)) if config.median_session else None
        self._storage: Any = None
        self._entries: dict[tuple[int, bytes], Any] = {}
        self._user: Any = None
        self._cache: Any = None
        self._client_ops: dict[int, str] = {}  # "client" storage requests in flight: id -> "store" | "fetch"
        self._client_seq = 0
        self._entries_by_key: dict[int, Any] = {}
        self._entry_slots: list[tuple[int, bytes]] = []
        self._old_by_key: dict[int, Any] = {}  # an older signed version of each entry (what replayers serve)
        self._reads: dict[int, tuple[Any, int]] = {}  # quorum read id -> (QuorumRead, key)
        self._single: dict[int, int] = {}  # client fetch id -> key (single reads, judged on answer)

    # ---- building ---------------------------------------------------------------------------------

    def _new_node(self) -> _Node:
        self._counter += 1
        c = self._counter
        pk = self.rng.randbytes(32)
        ref = NodeRef(ids.key_for(pk), f"10.{(c >> 16) & 255}.{(c >> 8) & 255}.{c & 255}", 7060)
        core = ChordCore(
            ref,
            public_key=pk,
            sign=sim_sign(pk),
            verify=sim_verify,
            config=self.config.chord,
            random_bytes=self.rng.randbytes,
        )
        node = _Node(ref, core, self.rng.random(), self.rng.random(), born=self.now)
        if self._storage is not None:
            store_cls, core_cls, core_config = self._storage
            node.storage = core_cls(
                ref.id,
                store_cls(cache=self._cache),
                self.config.chord.successors,
                self.now,
                core_config,
                first_repair_at=self.now + self.config.repair_interval * self.rng.random(),
            )
            replicas = self.config.chord.successors
            node.storage.holds_replica = lambda key, n=node: n.core.holds_replica(key, replicas)
            self._drain_storage(node)
        self._nodes[ref.ep] = node
        self._by_id[ref.id] = node
        return node

    def _seed_ring(self, nodes: list[_Node]) -> None:
        """Install the exact stable-ring state in every core (successors, predecessor, fingers)."""
        ordered = sorted(nodes, key=lambda n: n.ref.id)
        id_list = [n.ref.id for n in ordered]
        refs = [n.ref for n in ordered]
        count = len(ordered)
        r = self.config.chord.successors
        base = self.config.chord.finger_base
        levels = []
        level = 1
        while level < ids.RING:
            levels.append(level)
            level *= base
        for i, node in enumerate(ordered):
            me = node.ref.id
            succs = [refs[(i + k) % count] for k in range(1, min(r, count - 1) + 1)]
            pred = refs[(i - 1) % count] if count > 1 else None
            first = ids.distance(me, succs[0].id) if succs else ids.RING
            fingers: dict[int, NodeRef] = {}
            for lvl in reversed(levels):
                if lvl * (base - 1) < first:
                    break
                for j in range(1, base):
                    d = j * lvl
                    if d >= ids.RING or d < first:
                        continue
                    k = bisect.bisect_left(id_list, (me + d) % ids.RING) % count
                    fingers.setdefault(refs[k].id, refs[k])
            node.core.seed_routing(succs, pred, fingers.values(), self.now)
            node.member = True
            self._drain(node)
        self._members = id_list[:]

    # ---- event plumbing ---------------------------------------------------------------------------

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, payload))

    def _latency(self, a: _Node, b: _Node) -> float:
        d = math.hypot(a.x - b.x, a.y - b.y) / math.sqrt(2)
        return self.config.latency_base + self.config.latency_spread * d

    def _lost(self) -> bool:
        return self.config.loss > 0 and self.rng.random() < self.config.loss

    def _drain(self, node: _Node) -> None:
        """Act on everything the node's core produced, then (re)arm its timer."""
        core = node.core
        for out in core.take_outputs():
            if isinstance(out, SendRequest):
                self._send_request(node, out)
            elif isinstance(out, NeighboursChanged):
                self._on_neighbours(node, out)
            elif isinstance(out, LookupDone | LookupFailed):
                self._on_lookup_end(node, out)
            elif isinstance(out, Joined):
                self._on_joined(node)
            elif isinstance(out, JoinFailed):
                self._push(self.now + 5.0, _JOIN_RETRY, node)
        if not node.alive:
            return
        t = core.next_timer()
        if t is not None and (node.timer_at is None or t < node.timer_at):
            node.timer_at = t
            self._push(t, _TIMER, (node, t))

    def _send_request(self, node: _Node, req: SendRequest) -> None:
        self.report.messages += 1
        dst = self._nodes.get(req.to)
        if dst is None or self._lost():
            return
        self._push(self.now + self._latency(node, dst), _REQ, (dst, node, req))

    # ---- handlers ---------------------------------------------------------------------------------

    def _deliver_request(self, dst: _Node, src: _Node, req: SendRequest) -> None:
        if not dst.alive:
            return
        if dst.adversary is not None and req.type == "find_successor":
            if dst.adversary == "drop":
                return
            if dst.adversary == "misroute":
                # Half the time "it is me", for every key (a lie the querier can only catch by what else
                # it knows); else a "next hop" that is no step towards the key (its own predecessor).
                pred = dst.core.predecessor
                if pred is None or self.rng.random() < 0.5:
                    body = {"done": True, "node": dst.ref, "nodes": list(dst.core.successors), "more": []}
                else:
                    body = {"done": False, "node": pred, "nodes": list(dst.core.successors), "more": []}
                lie = Reply("ok", body)
                self.report.messages += 1
                self._push(self.now + self._latency(dst, src), _REP, (src, dst.ref.id, req.request_id, lie))
                return
        reply = dst.core.handle_request(src.ref, req.type, req.body, self.now)
        self._drain(dst)
        if reply is None:
            return
        self.report.messages += 1
        if self._lost():
            return
        self._push(self.now + self._latency(dst, src), _REP, (src, dst.ref.id, req.request_id, reply))

    def _deliver_reply(self, node: _Node, src_id: int, request_id: int, reply: Reply) -> None:
        if not node.alive:
            return
        if reply.type == "ok":
            node.core.handle_reply(request_id, src_id, reply.body, self.now)
        else:
            node.core.handle_error(
                request_id, int(reply.body.get("code", 0)), str(reply.body.get("reason")), self.now
            )
        self._drain(node)

    def _fire_timer(self, node: _Node, at: float) -> None:
        if not node.alive or node.timer_at != at:
            return
        node.timer_at = None
        node.core.handle_timer(self.now)
        self._drain(node)

    def _start_lookup(self) -> None:
        cfg = self.config
        if self.now < cfg.duration - cfg.lookup_stop and self._members:
            origin = self._by_id[self._members[self.rng.randrange(len(self._members))]]
            if self._entries and self.rng.random() < 0.5:
                key, _ = self._entry_slots[self.rng.randrange(len(self._entry_slots))]
                kind = "fetch"
            else:
                key = self.rng.getrandbits(ids.BITS)
                kind = "lookup"
            lookup_id = origin.core.start_lookup(key, self.now)
            self._lookups[(origin.ref.id, lookup_id)] = (self.now, key, kind)
            self.report.lookups += 1
            self._drain(origin)
            self._push(self.now + self.rng.expovariate(cfg.lookup_rate), _LOOKUP, None)

    def _on_lookup_end(self, node: _Node, out: LookupDone | LookupFailed) -> None:
        started = self._lookups.pop((node.ref.id, out.lookup_id), None)
        if started is None:
            return  # an internal lookup (fingers, join) does not surface as output; defensive
        t0, key, kind = started
        rep = self.report
        if kind == "locate":  # key is the storage core's Locate request id
            found = out.node if isinstance(out, LookupDone) else None
            node.storage.on_located(key, found, self.now)
            self._drain_storage(node)
            return
        if kind == "store":
            if isinstance(out, LookupDone):
                self._client_request(node, out.node, "store", {"entry": self._entries_by_key[key]})
            return
        if isinstance(out, LookupFailed):
            rep.failures[out.reason] = rep.failures.get(out.reason, 0) + 1
            return
        rep.succeeded += 1
        rep.hops.append(out.hops)
        rep.lookup_messages += 2 * out.hops
        rep.lookup_latency.append(self.now - t0)
        members = self._members
        if members:
            owner = members[bisect.bisect_left(members, out.key) % len(members)]
            if owner == out.node.id:
                rep.correct += 1
            else:
                rep.wrong += 1
        if kind == "fetch":
            rep.fetch_checks += 1
            if self.config.quorum_reads:
                self._single[self._client_seq + 1] = key
            self._client_request(node, out.node, "fetch", {"key": key})
            if self.config.quorum_reads:
                self._start_read(node, out, key)

    def _on_joined(self, node: _Node) -> None:
        if node.member or not node.alive:
            return
        node.member = True
        bisect.insort(self._members, node.ref.id)
        self.report.joins += 1

    def _on_neighbours(self, node: _Node, ev: NeighboursChanged) -> None:
        if node.storage is None or not node.alive:
            return
        node.storage.on_neighbours(ev.predecessor, list(ev.successors), self.now)
        self._drain_storage(node)

    # ---- the storage protocol ---------------------------------------------------------------------

    def _drain_storage(self, node: _Node) -> None:
        """Carry out what a node's storage core produced (as ``Node._drain_storage`` does on sockets)."""
        from overlay.storage_core import Answer, Locate

        storage = node.storage
        for out in storage.take_outputs():
            if isinstance(out, Answer):
                self._storage_answer(node, out)
                continue
            if isinstance(out, Locate):
                lookup_id = node.core.start_lookup(out.key, self.now)
                self._lookups[(node.ref.id, lookup_id)] = (self.now, out.request_id, "locate")
                self._drain(node)
                continue
            if out.type == "transfer":
                self.report.transfers += 1
            self.report.storage_messages += 1
            dst = self._nodes.get((out.to[1], out.to[2]))
            if dst is None or self._lost():
                self._push(self.now + out.timeout, _SFAIL, (node, out.request_id))
            else:
                self._push(self.now + self._latency(node, dst), _SREQ, (dst, node, out))
        if not node.alive:
            return
        t = storage.next_timer()
        if node.storage_timer_at is None or t < node.storage_timer_at:
            node.storage_timer_at = t
            self._push(t, _STIMER, (node, t))

    def _storage_answer(self, node: _Node, answer: Any) -> None:
        token = answer.token
        if token[0] == "qread":
            pending = self._reads.get(token[1])
            if pending is not None:
                read, _key = pending
                if answer.type == "ok":
                    read.add(token[2], [e for e, _ms in answer.body.get("entries", [])])
                else:
                    read.fail(token[2])
                if read.decided:
                    self._end_read(token[1])
            return
        if token[0] == "client" and token[1] in self._single:
            key = self._single.pop(token[1])
            self._client_ops.pop(token[1], None)
            self.report.single_reads += 1
            got = [e for e, _ms in answer.body.get("entries", [])] if answer.type == "ok" else []
            self.report.single_stale += int(not self._fresh(key, got))
            if answer.type == "ok" and answer.body.get("entries"):
                self.report.fetch_found += 1
            return
        if token[0] == "client":
            kind = self._client_ops.pop(token[1], None)
            if kind == "fetch" and answer.type == "ok" and answer.body.get("entries"):
                self.report.fetch_found += 1
            elif kind == "store" and answer.type == "ok":
                self.report.entries_stored += 1
            return
        _, origin_id, request_id, timeout = token
        origin = self._by_id.get(origin_id)
        if origin is None:
            return
        self.report.storage_messages += 1
        if self._lost():
            self._push(self.now + timeout, _SFAIL, (origin, request_id))
        else:
            reply = (origin, request_id, answer.type, answer.body)
            self._push(self.now + self._latency(node, origin), _SREP, reply)

    def _deliver_storage_request(self, dst: _Node, src: _Node, send: Any) -> None:
        if not dst.alive or dst.storage is None:
            self._push(self.now + send.timeout, _SFAIL, (src, send.request_id))
            return
        token = ("node", src.ref.id, send.request_id, send.timeout)
        if self._lie(dst, token, send.type, send.body):
            return
        sender = (src.ref.id, src.ref.host, src.ref.port)
        dst.storage.handle_request(token, send.type, send.body, self.now, member=True, sender=sender)
        self._drain_storage(dst)

    def _client_request(self, origin: _Node, holder: NodeRef, mtype: str, body: dict[str, Any]) -> None:
        """A client's storage request (after its lookup) from ``origin`` to the node the lookup found."""
        dst = self._nodes.get(holder.ep)
        self.report.storage_messages += 1
        if dst is None or self._lost():
            return
        self._client_seq += 1
        self._client_ops[self._client_seq] = mtype
        payload = (dst, ("client", self._client_seq), mtype, body)
        self._push(self.now + self._latency(origin, dst), _CLIENT, payload)

    # ---- adversaries and quorum reads ----------------------------------------------------------------

    def _lie(self, dst: _Node, token: Any, mtype: str, body: dict[str, Any]) -> bool:
        """An adversary's answer to a storage request, in place of its storage core's; False: honest."""
        if dst.adversary is None or mtype != "fetch":
            return False
        from overlay.storage_core import Answer

        if dst.adversary == "drop":
            if token[0] == "node":  # a node's own Send: its timeout fires
                self._push(self.now + token[3], _SFAIL, (self._by_id[token[1]], token[2]))
            return True
        entries: list[Any] = []
        old = self._old_by_key.get(body["key"])
        if dst.adversary == "replay" and old is not None:
            entries = [(old, 60_000)]
        self._storage_answer(dst, Answer(token, "ok", {"entries": entries}))
        return True

    def _fresh(self, key: int, got: list[Any]) -> bool:
        """Whether a read returned the current version of the entry stored under ``key``."""
        current = self._entries_by_key.get(key)
        return current is None or any(e.slot == current.slot and e.seq >= current.seq for e in got)

    def _start_read(self, origin: _Node, out: LookupDone, key: int) -> None:
        from overlay.reads import QuorumRead

        holders = [out.node, *(n for n in out.successors if n.id != out.node.id)][
            : self.config.chord.successors
        ]
        cache = self._cache
        read = QuorumRead(
            key, [h.id for h in holders], lambda e: cache.verify(e.owner, e.signature, e.signed_bytes())
        )
        self._client_seq += 1
        read_id = self._client_seq
        self._reads[read_id] = (read, key)
        for holder in holders:
            dst = self._nodes.get(holder.ep)
            self.report.storage_messages += 1
            if dst is None or self._lost():
                read.fail(holder.id)
                continue
            payload = (dst, ("qread", read_id, holder.id), "fetch", {"key": key, "replica": True})
            self._push(self.now + self._latency(origin, dst), _CLIENT, payload)
        self._push(self.now + self.config.read_deadline, _QEND, read_id)
        if read.decided:
            self._end_read(read_id)

    def _end_read(self, read_id: int) -> None:
        pending = self._reads.pop(read_id, None)
        if pending is None:
            return
        read, key = pending
        self.report.quorum_reads += 1
        self.report.quorum_stale += int(not self._fresh(key, read.result()))

    def _depart(self, node: _Node) -> None:
        if not node.alive:
            return
        mine = [k for k in self._lookups if k[0] == node.ref.id]
        user = [k for k in mine if self._lookups[k][2] not in ("store", "locate")]
        for k in mine:
            del self._lookups[k]
        self.report.abandoned += len(user)
        self.report.lookups -= len(user)
        graceful = self.rng.random() >= self.config.crash_fraction
        if graceful and node.member:
            self.report.leaves += 1
            if node.storage is not None:
                node.storage.leave(self.now)
                self._drain_storage(node)
            node.core.leave(self.now)
            self._drain(node)
        else:
            self.report.crashes += 1
        node.alive = False
        self.report.node_seconds += self.now - node.born
        if node.member:
            i = bisect.bisect_left(self._members, node.ref.id)
            if i < len(self._members) and self._members[i] == node.ref.id:
                self._members.pop(i)
        self._nodes.pop(node.ref.ep, None)
        self._by_id.pop(node.ref.id, None)

    def _arrive(self) -> None:
        if self.now >= self.config.duration:
            return
        if self._members:
            node = self._new_node()
            self._join(node)
            self._schedule_departure(node)
        assert self._mean_session is not None
        self._push(self.now + self.rng.expovariate(self.config.n / self._mean_session), _ARRIVE, None)

    def _join(self, node: _Node) -> None:
        if not node.alive or not self._members:
            return
        boot = self._by_id[self._members[self.rng.randrange(len(self._members))]]
        node.core = ChordCore(
            node.ref,
            public_key=node.core.public_key,
            sign=sim_sign(node.core.public_key),
            verify=sim_verify,
            config=self.config.chord,
            random_bytes=self.rng.randbytes,
        )
        node.core.start_join(boot.ref.ep, self.now)
        self._drain(node)

    def _schedule_departure(self, node: _Node) -> None:
        if self._mean_session is not None:
            self._push(self.now + self.rng.expovariate(1.0 / self._mean_session), _DEPART, node)

    def ring_errors(self) -> int:
        """Live joined nodes whose first successor or predecessor is not the true one right now."""
        members = self._members
        count = len(members)
        bad = 0
        for i, node_id in enumerate(members):
            core = self._by_id[node_id].core
            succ = core.successors[0].id if core.successors else None
            pred = core.predecessor.id if core.predecessor else None
            if count > 1 and (succ != members[(i + 1) % count] or pred != members[i - 1]):
                bad += 1
        return bad

    # ---- storage ----------------------------------------------------------------------------------

    def _setup_storage(self) -> None:
        from overlay.identity import KeyPair, VerifiedCache
        from overlay.storage import Entry, Store
        from overlay.storage_core import StorageConfig, StorageCore

        self._storage = (Store, StorageCore, StorageConfig(repair_interval=self.config.repair_interval))
        self._cache = VerifiedCache(capacity=max(4096, 4 * self.config.entries))
        self._user = KeyPair.generate()
        lifetime = int(self.config.duration * 4) + 3600
        for i in range(self.config.entries):
            key = ids.key_for(f"sip:user{i}@sim.example")
            entry = Entry.create(self._user, key, b"c0", b"sip:contact@192.0.2.1", 2, lifetime)
            self._entries[entry.slot] = entry
            self._old_by_key[key] = Entry.create(self._user, key, b"c0", b"sip:old@192.0.2.9", 1, lifetime)
        self._entry_slots = list(self._entries)
        self._entries_by_key = {entry.key: entry for entry in self._entries.values()}

    def _place_entries(self) -> None:
        """Store every entry as a client would: a lookup from a random member, then ``store`` to the
        node it found (which fans it out to its replicas through its storage core)."""
        for entry in self._entries.values():
            origin = self._by_id[self._members[self.rng.randrange(len(self._members))]]
            lookup_id = origin.core.start_lookup(entry.key, self.now)
            self._lookups[(origin.ref.id, lookup_id)] = (self.now, entry.key, "store")
            self._drain(origin)

    def _count_lost(self) -> None:
        held: set[tuple[int, bytes]] = set()
        for node in self._by_id.values():
            if node.alive and node.storage is not None:
                for entry, _ms in node.storage.store.records(self.now):
                    held.add(entry.slot)
        self.report.entries = len(self._entries)
        self.report.entries_lost = sum(1 for slot in self._entries if slot not in held)

    # ---- running ----------------------------------------------------------------------------------

    def run(self) -> SimReport:
        cfg = self.config
        wall0 = time.perf_counter()
        if cfg.entries:
            self._setup_storage()
        nodes = [self._new_node() for _ in range(cfg.n)]
        if cfg.build == "joins":
            first = nodes[0]
            first.core.start(self.now)
            first.member = True
            self._members = [first.ref.id]
            self._drain(first)
            for k, node in enumerate(nodes[1:]):
                self._push(cfg.join_interval * (k + 1), _JOIN_RETRY, node)
        else:
            self._seed_ring(nodes)
            count = round(cfg.adversaries * len(nodes))
            for i, node in enumerate(self.rng.sample(nodes, count)):
                node.adversary = cfg.adversary_kinds[i % len(cfg.adversary_kinds)]
            self.report.adversaries = count
            if cfg.entries:
                self._place_entries()
        for node in nodes:
            self._schedule_departure(node)
        if self._mean_session is not None:
            self._push(self.rng.expovariate(cfg.n / self._mean_session), _ARRIVE, None)
        if cfg.lookup_rate > 0:
            self._push(cfg.warmup + self.rng.expovariate(cfg.lookup_rate), _LOOKUP, None)
        events = self._events
        while events:
            at, _, kind, payload = heapq.heappop(events)
            if at > cfg.duration:
                break
            self.now = at
            if kind == _REQ:
                self._deliver_request(*payload)
            elif kind == _REP:
                self._deliver_reply(*payload)
            elif kind == _TIMER:
                self._fire_timer(*payload)
            elif kind == _LOOKUP:
                self._start_lookup()
            elif kind == _DEPART:
                self._depart(payload)
            elif kind == _ARRIVE:
                self._arrive()
            elif kind == _SREQ:
                self._deliver_storage_request(*payload)
            elif kind == _SREP:
                origin, request_id, rtype, body = payload
                if origin.alive:
                    origin.storage.on_reply(request_id, rtype, body, self.now)
                    self._drain_storage(origin)
            elif kind == _SFAIL:
                origin, request_id = payload
                if origin.alive:
                    origin.storage.on_failure(request_id, self.now)
                    self._drain_storage(origin)
            elif kind == _CLIENT:
                dst, token, mtype, body = payload
                if dst.alive and self._lie(dst, token, mtype, body):
                    pass
                elif dst.alive:
                    dst.storage.handle_request(token, mtype, body, self.now, member=True)
                    self._drain_storage(dst)
                else:
                    self._client_ops.pop(token[1], None)
            elif kind == _STIMER:
                node, at_time = payload
                if node.alive and node.storage_timer_at == at_time:
                    node.storage_timer_at = None
                    node.storage.handle_timer(self.now)
                    self._drain_storage(node)
            elif kind == _JOIN_RETRY:
                self._join(payload)
            elif kind == _QEND:
                self._end_read(payload)
        self.now = cfg.duration
        for node in self._by_id.values():
            if node.alive:
                self.report.node_seconds += self.now - node.born
        self.report.n_end = len(self._members)
        self.report.misroutes = sum(node.core.stats().get("misroutes", 0) for node in self._by_id.values())
        # Lookups still in flight at the end count as failures (lookup_stop leaves them ample time).
        if self._entries:
            self._count_lost()
        self.report.wall_s = time.perf_counter() - wall0
        return self.report


def simulate(config: SimConfig) -> SimReport:
    """Run one simulation and return its report."""
    return Simulator(config).run()
