"""Sans-IO Chord routing core: successor list, predecessor, base-b fingers, iterative lookups.

Why sans-IO: the very same object runs inside the asyncio adapter (``overlay/node.py``, real UDP) and
inside the discrete-event simulator (``overlay/sim.py``, 10,000 nodes), so what the simulator measures is
the code that ships. The core never touches a socket, a clock or an event loop:

* inputs are method calls that all take ``now`` (seconds, any monotonic origin): a request received
  (:meth:`ChordCore.handle_request`, which returns the reply at once), a reply or error received for one
  of our requests, the timer firing, "join through this endpoint", "look this key up", "leave";
* outputs are drained with :meth:`ChordCore.take_outputs`: :class:`SendRequest` (a routing request to
  send), and events (:class:`LookupDone`, :class:`LookupFailed`, :class:`NeighboursChanged`,
  :class:`Joined`, :class:`JoinFailed`);
* the single timer the core wants is :meth:`ChordCore.next_timer` (an absolute time, aioquic-style); the
  adapter calls :meth:`ChordCore.handle_timer` when it is reached. Retransmissions, request timeouts and the
  periodic maintenance (stabilize, fix_fingers, check_predecessor) all hang off that one timer.

Maintenance follows Zave's corrected rules ("Reasoning about identifier spaces: how to make Chord
correct"): stabilize reconciles the successor list with the first live successor's list, adopts the
successor's predecessor only after querying it (a node never adopts a pointer to a node it has not heard
from), and notify is handled as *rectify* (replace the predecessor when the notifier is closer or the
current predecessor is dead).

Neighbour admission is guarded by identity: a node becomes successor, predecessor or finger only once the
core has checked a signature by its public key over a fresh nonce, with NodeId = first 128 bits of
SHA-256(public key). Signing and verifying are injected callables (the adapter owns the keys), and verified
identities are cached, so the check costs one ping per neighbour, not one per message.
"""

from __future__ import annotations

import heapq
import secrets
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Final, Literal, NamedTuple

from overlay import ids

Endpoint = tuple[str, int]


class NodeRef(NamedTuple):
    """A ring member as routing knows it: NodeId (int on the ring) and its overlay endpoint."""

    id: int
    host: str
    port: int

    @property
    def ep(self) -> Endpoint:
        return (self.host, self.port)

    def to_wire(self) -> list[Any]:
        """The wire form ``[id (16 bytes), host, port]`` (the ``"node"`` field type)."""
        return [ids.to_bytes(self.id), self.host, self.port]


# --------------------------------------------------------------------------------------------------------
# Message schema shared with overlay/wire.py
# --------------------------------------------------------------------------------------------------------

#: Types of body fields, in the vocabulary overlay/wire.py validates. A type ending in "?" means the field
#: is optional (absent, or present with that type). "id": 16 bytes; "ep": [host: str, port: int 0..65535];
#: "node": [id, host, port]; "nodes": list of node, at most MAX_NODES; "bytes": at most MAX_BYTES.
FieldType = Literal["id", "ep", "node", "nodes", "u64", "bytes", "str", "bool", "cert"]

MAX_NODES: Final = 16
MAX_BYTES: Final = 128


class MessageSpec(NamedTuple):
    """Body fields of a routing request and of its ``ok`` reply: field name -> type (maybe with "?")."""

    request: Mapping[str, str]
    reply: Mapping[str, str]


CHORD_MESSAGES: Final[Mapping[str, MessageSpec]] = {
    # Liveness; with a nonce, the reply proves the identity: sig over proof_data(nonce, responder).
    # "cert": the responder's node certificate, where the overlay admits enrolled nodes only.
    "ping": MessageSpec(
        request={"nonce": "bytes?"}, reply={"pk": "bytes?", "sig": "bytes?", "cert": "cert?"}
    ),
    # One iterative step. done=True: "node" is responsible for key (node == replier: "it is me").
    # done=False: "node" is the closest preceding node the replier knows. "nodes": the replier's successor
    # list in ring order (so the querier learns who follows whom and can skip a hop). "more": other
    # candidates (predecessor, next-best fingers) so the querier can route around dead hops.
    "find_successor": MessageSpec(
        request={"key": "id"},
        reply={"done": "bool", "node": "node", "nodes": "nodes", "more": "nodes?"},
    ),
    "get_predecessor": MessageSpec(request={}, reply={"node": "node?"}),
    # Stabilize asks this: the successor list and the predecessor in one round trip. check_predecessor
    # asks it too: "preds" (the replier's predecessors, nearest first) tells a node who precedes its
    # predecessor, so it knows which keys it holds a replica of (storage refuses replicas of others).
    "get_successors": MessageSpec(request={}, reply={"nodes": "nodes", "pred": "node?", "preds": "nodes?"}),
    # "I think I am your predecessor" (the notifier is the envelope's src/ep). The reply names the
    # notified node's predecessor, so a notifier that skipped over nodes can walk back at once.
    "notify": MessageSpec(request={}, reply={"pred": "node?"}),
    # Graceful leave: to the successor with "pred" (my predecessor), to the predecessor with "nodes"
    # (my successors), so both can splice me out at once.
    "leave": MessageSpec(request={"pred": "node?", "nodes": "nodes"}, reply={}),
}

PROOF_DOMAIN: Final = b"p2psip-chord-id-proof\x00"


def proof_data(nonce: bytes, node: NodeRef) -> bytes:
    """The bytes a node signs to prove it owns ``node.id`` at ``node.ep`` (binding the endpoint stops a
    relay of someone else's proof)."""
    return PROOF_DOMAIN + nonce + ids.to_bytes(node.id) + f"{node.host}:{node.port}".encode()


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Send routing request ``type`` with ``body`` to ``to``. ``request_id`` is unique within this core
    (a retransmission reuses it); feed the reply back with that id. ``node_id`` is the NodeId the reply
    must come from (None only for the bootstrap endpoint during join, whose id is not known yet)."""

    request_id: int
    to: Endpoint
    node_id: int | None
    type: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a received request: ``type`` "ok" with the reply body, or "err" with
    ``{"code": int, "reason": str}``. The adapter echoes the request's envelope id."""

    type: Literal["ok", "err"]
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LookupDone:
    """Lookup ``lookup_id`` found ``node`` responsible for ``key``. ``hops``: nodes queried that
    answered, the responsible node included (0 when this node itself is responsible). ``successors``:
    that node's successor list as it reported it (the key's replica holders after it; may be empty)."""

    lookup_id: int
    key: int
    node: NodeRef
    hops: int
    successors: tuple[NodeRef, ...] = ()


@dataclass(frozen=True, slots=True)
class LookupFailed:
    """Lookup ``lookup_id`` gave up (every candidate timed out, or too many hops)."""

    lookup_id: int
    key: int
    hops: int
    reason: str


@dataclass(frozen=True, slots=True)
class NeighboursChanged:
    """The predecessor or the successor list changed (storage uses it for replication and hand-off).
    Keys in (predecessor, me] are ours; replicas go to ``successors[: r-1]``."""

    predecessor: NodeRef | None
    successors: tuple[NodeRef, ...]
    old_predecessor: NodeRef | None
    old_successors: tuple[NodeRef, ...]


@dataclass(frozen=True, slots=True)
class Joined:
    """The join finished: ``successor`` is our first successor; we are part of the ring."""

    successor: NodeRef


@dataclass(frozen=True, slots=True)
class JoinFailed:
    """The join could not finish (bootstrap silent, lookup failed); the adapter may retry."""

    reason: str


Output = SendRequest | LookupDone | LookupFailed | NeighboursChanged | Joined | JoinFailed


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChordConfig:
    """Tunables. Periods in seconds; defaults suit a LAN/WAN overlay with hour-long sessions."""

    successors: int = 3  # r: successor-list length (also the replica count storage uses)
    finger_base: int = 16  # b: fingers at me + j * b**i, j = 1..b-1 (b = 2 is classic Chord)
    stabilize_interval: float = 5.0
    fix_fingers_interval: float = 10.0
    check_predecessor_interval: float = 10.0
    rpc_timeout: float = 1.0  # per attempt
    rpc_retries: int = 2  # retransmissions before a node is declared dead (timeout x1.5 each time)
    lookup_max_hops: int = 32
    verified_cache_size: int = 4096
    jitter: float = 0.1  # +/- fraction applied to periodic timers so nodes do not synchronise
    proximity: bool = True  # fingers: among the nodes of a finger's interval, the one with the lowest RTT
    # A lookup's confirmed answer (owner, its predecessor, its successors) is kept this long: a later
    # lookup for a key in (predecessor, owner] ends at once, without messages. 0 disables. Dropped early
    # when our own neighbours change, when the owner fails, and when the adapter reports it wrong
    # (ChordCore.forget_owner: it answered "not responsible").
    owner_cache_ttl: float = 10.0
    owner_cache_size: int = 256


Sign = Callable[[bytes], bytes]
Verify = Callable[[bytes, bytes, bytes], bool]  # verify(public_key, data, sig) -> bool
_OnReply = Callable[[int, Mapping[str, Any], float], None]  # (src_id, body, now)
_OnFail = Callable[[float, bool], None]  # (now, dead): dead=False when the node answered "err"
_Cont = Callable[[NodeRef, float], None]


def _ignore_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
    """The answer to a probe whose only question is whether the node is alive (``on_fail`` says if not)."""


_IDLE, _JOINING, _JOINED, _LEFT = "idle", "joining", "joined", "left"
_PERIODIC = ("stabilize", "fix_fingers", "check_pred")


def parse_node(obj: Any) -> NodeRef | None:
    """A NodeRef from its wire form, or None when anything is off (never raises)."""
    if isinstance(obj, NodeRef):
        return obj
    if not isinstance(obj, list | tuple) or len(obj) != 3:
        return None
    raw, host, port = obj
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < ids.RING:
        ident = raw  # already decoded by overlay/wire.py
    elif isinstance(raw, bytes) and len(raw) == ids.ID_BYTES:
        ident = int.from_bytes(raw, "big")
    else:
        return None
    if not isinstance(host, str) or not 0 < len(host) <= 255:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None
    return NodeRef(ident, host, port)


def parse_nodes(obj: Any) -> list[NodeRef] | None:
    """A node list from its wire form (at most MAX_NODES), or None."""
    if not isinstance(obj, list | tuple) or len(obj) > MAX_NODES:
        return None
    out: list[NodeRef] = []
    for item in obj:
        node = parse_node(item)
        if node is None:
            return None
        out.append(node)
    return out


def _plausible(src: NodeRef, key: int, done: bool, node: NodeRef, succs: list[NodeRef]) -> bool:
    """Whether a find_successor answer from ``src`` can be right, judged from the ring's arithmetic
    alone: a next hop lies strictly between the replier and the key; a named successor of the key
    follows the replier with the key in between; the replier's successor list runs clockwise from it."""
    if done:
        if node.id != src.id and not ids.between_right(key, src.id, node.id):
            return False
    elif node.id == src.id or not ids.between(node.id, src.id, key):
        return False
    dists = [ids.distance(src.id, n.id) for n in succs]
    return all(0 < a < b for a, b in pairwise(dists)) and (not dists or dists[0] > 0)


def _parse_key(obj: Any) -> int | None:
    if isinstance(obj, int) and not isinstance(obj, bool) and 0 <= obj < ids.RING:
        return obj
    if isinstance(obj, bytes) and len(obj) == ids.ID_BYTES:
        return int.from_bytes(obj, "big")
    return None


@dataclass(slots=True)
class _Pending:
    request_id: int
    to: Endpoint
    node_id: int | None
    type: str
    body: dict[str, Any]
    on_reply: _OnReply
    on_fail: _OnFail
    retries_left: int
    timeout: float
    deadline: float = 0.0
    sent_at: float = 0.0
    retransmitted: bool = False


@dataclass(slots=True)
class _Lookup:
    """An iterative lookup: a pool of known nodes around the key, asked one at a time."""

    lookup_id: int
    key: int
    on_done: Callable[[NodeRef | None, int, str, float], None]  # (node or None, hops, reason, now)
    exclude_self: bool
    pool: dict[int, NodeRef] = field(default_factory=dict)
    queried: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    confirmed: set[int] = field(default_factory=set)
    next_of: dict[int, int] = field(default_factory=dict)
    hops: int = 0
    attempts: int = 0
    outstanding: bool = False
    finished: bool = False
    owner_succs: list[NodeRef] = field(default_factory=list)  # the confirming owner's successor list
    claims: dict[int, list[NodeRef]] = field(default_factory=dict)  # claimant -> its successor list
    claim_preds: dict[int, int] = field(default_factory=dict)  # claimant -> its predecessor's id
    cached: bool = False  # may end in the owner cache (the adapter's lookups; never ring maintenance)


class _OwnerRange(NamedTuple):
    """A confirmed lookup answer: ``owner`` is responsible for (pred_id, owner.id]."""

    pred_id: int
    owner: NodeRef
    succs: tuple[NodeRef, ...]
    until: float


class ChordCore:
    """One node's Chord routing state machine. See the module docstring for the contract."""

    def __init__(
        self,
        me: NodeRef,
        *,
        public_key: bytes,
        sign: Sign,
        verify: Verify,
        config: ChordConfig | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        certificate: bytes | None = None,
        admit: Callable[[NodeRef, bytes | None], bool] | None = None,
    ) -> None:
        self.config = cfg = config or ChordConfig()
        if not 1 <= cfg.successors <= MAX_NODES:
            raise ValueError(f"successors (r) must be 1..{MAX_NODES}, got {cfg.successors}")
        if cfg.finger_base < 2 or cfg.finger_base & (cfg.finger_base - 1):
            raise ValueError(f"finger_base must be a power of two >= 2, got {cfg.finger_base}")
        self.me = me
        self.public_key = public_key
        self._sign = sign
        self._verify = verify
        self._random_bytes = random_bytes
        # Admission (enrolled overlays): our node certificate goes with every identity proof, and a node
        # whose proof comes without one that ``admit`` accepts is never verified, so never routed to.
        self._certificate = certificate
        self._admit = admit
        self._state = _IDLE
        self._succ: list[NodeRef] = []
        self._pred: NodeRef | None = None
        # The predecessor's own predecessors, as it last told us (valid while it is our predecessor).
        self._preds_tail: tuple[int, list[NodeRef]] = (0, [])
        self._reported: tuple[NodeRef | None, tuple[NodeRef, ...]] = (None, ())
        # Fingers at me + j * b**i, nearest first; one slot per start.
        base = cfg.finger_base
        self._finger_dist: list[int] = []
        level = 1
        while level < ids.RING:
            for j in range(1, base):
                if j * level < ids.RING:
                    self._finger_dist.append(j * level)
            level *= base
        self._fingers: list[NodeRef | None] = [None] * len(self._finger_dist)
        self._next_finger = 0
        self._finger_busy = False
        self._finger_burst = False
        # Routing table: distinct known nodes sorted by clockwise distance from me.
        self._route_dist: list[int] = []
        self._route_nodes: list[NodeRef] = []
        self._route_dirty = True
        # Identity cache: NodeId -> verified endpoint (insertion order = age, oldest evicted first).
        self._verified: dict[int, Endpoint] = {}
        self._verifying: dict[int, list[tuple[_Cont, Callable[[float], None] | None]]] = {}
        self._rtt: dict[int, float] = {}  # NodeId -> smoothed round-trip time (first attempts only)
        self._outputs: list[Output] = []
        self._pending: dict[int, _Pending] = {}
        self._lookups: dict[int, _Lookup] = {}
        self._next_request_id = 1
        self._next_lookup_id = 1
        self._timers: list[tuple[float, int, str, int]] = []
        self._timer_seq = 0
        self._periodic_due: dict[str, float] = {}
        self._last_pred_probe = float("-inf")
        self._stabilizing = False
        self._stats: dict[str, int] = {}
        # NodeId -> wrong routing answers it gave our lookups (most recent last, bounded).
        self.misroutes: dict[int, int] = {}
        # Owner cache: owner NodeId -> its confirmed range (insertion order = age); _owner_ids sorted.
        self._owners: dict[int, _OwnerRange] = {}
        self._owner_ids: list[int] = []

    # ==== inputs ========================================================================================

    def start(self, now: float) -> None:
        """Create a new ring with this node alone in it, and start maintenance."""
        if self._state != _IDLE:
            return
        self._state = _JOINED
        self._start_maintenance(now)
        self._report_neighbours()

    def start_join(self, bootstrap: Endpoint, now: float) -> None:
        """Join the ring that the node at ``bootstrap`` belongs to (any member will do)."""
        if self._state != _IDLE:
            return
        self._state = _JOINING
        lk = self._new_lookup(self.me.id, self._join_found, exclude_self=True)
        lk.outstanding = True

        def on_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
            lk.outstanding = False
            self._lookup_answer(lk, NodeRef(src_id, *bootstrap), body, now)

        def on_fail(now: float, dead: bool) -> None:
            lk.outstanding = False
            self._finish_lookup(lk, None, "bootstrap did not answer", now)

        self._request(bootstrap, None, "find_successor", {"key": self.me.id}, on_reply, on_fail, now)

    def start_lookup(self, key: int, now: float) -> int:
        """Start an iterative lookup for ``key``; returns its lookup id (LookupDone/LookupFailed follow,
        possibly already in the next :meth:`take_outputs` when this node knows the answer)."""
        key %= ids.RING

        def done(node: NodeRef | None, hops: int, reason: str, now: float) -> None:
            if node is None:
                self._count("lookups_failed")
                self._outputs.append(LookupFailed(lk.lookup_id, key, hops, reason))
            else:
                self._count("lookups_done")
                succs = self._succ if node.id == self.me.id else lk.claims.get(node.id, lk.owner_succs)
                pred_id = lk.claim_preds.get(node.id)
                if pred_id is not None and hops:
                    self._remember_owner(pred_id, node, tuple(succs), now)
                self._outputs.append(LookupDone(lk.lookup_id, key, node, hops, tuple(succs)))

        lk = self._new_lookup(key, done, exclude_self=False)
        lk.cached = True
        if self._state != _JOINED:
            self._finish_lookup(lk, None, "not joined", now)
        else:
            self._lookup_local(lk, now)
        self._report_neighbours()
        return lk.lookup_id

    def handle_request(self, src: NodeRef, type: str, body: Mapping[str, Any], now: float) -> Reply | None:
        """A routing request from ``src`` (NodeId and endpoint from the envelope). Returns the reply to
        send, or None to drop it (unknown type, malformed body). Never raises on bad input."""
        try:
            reply = self._dispatch(src, type, body, now)
        except Exception:  # a core bug must not kill the adapter's receive path
            self._count("request_errors")
            reply = None
        self._report_neighbours()
        return reply

    def handle_reply(self, request_id: int, src_id: int, body: Mapping[str, Any], now: float) -> None:
        """An ``ok`` reply to our request ``request_id`` from NodeId ``src_id``. Unknown ids and malformed
        bodies are ignored (a malformed body counts as a failed attempt)."""
        pending = self._pending.get(request_id)
        if pending is None or (pending.node_id is not None and pending.node_id != src_id):
            self._count("replies_unexpected")
            return
        del self._pending[request_id]
        if not pending.retransmitted:
            self._note_rtt(src_id, now - pending.sent_at)
        if not isinstance(body, Mapping):
            body = {}
        try:
            pending.on_reply(src_id, body, now)
        except Exception:
            self._count("reply_errors")
        self._report_neighbours()

    def handle_error(self, request_id: int, code: int, reason: str, now: float) -> None:
        """An ``err`` reply to our request: the node is alive but refused; treated as a failed attempt
        without retransmission."""
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        self._count("errors_received")
        pending.on_fail(now, False)
        self._report_neighbours()

    def handle_timer(self, now: float) -> None:
        """The time returned by :meth:`next_timer` has come (calling early or late is harmless)."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, _, kind, arg = heapq.heappop(timers)
            if kind == "rpc":
                self._rpc_timeout(arg, at, now)
            elif self._periodic_due.get(kind) == at:
                del self._periodic_due[kind]
                if self._state != _JOINED:
                    continue
                if kind == "stabilize":
                    self._schedule(kind, now, self.config.stabilize_interval)
                    self._stabilize(now)
                elif kind == "fix_fingers":
                    self._schedule(kind, now, self.config.fix_fingers_interval)
                    self._fix_fingers(now)
                else:
                    self._schedule(kind, now, self.config.check_predecessor_interval)
                    self._check_predecessor(now)
        self._report_neighbours()

    def node_failed(self, node_id: int, now: float) -> None:
        """The adapter learned that a node is dead (e.g. TCP refused): drop it from routing state."""
        self._node_dead(node_id, now)
        self._report_neighbours()

    def forget_owner(self, node_id: int) -> None:
        """Drop what the owner cache says about ``node_id``'s range: the adapter found it wrong (the node
        answered "not responsible", or timed out). The next lookup asks the ring again."""
        if self._owners.pop(node_id, None) is not None:
            self._owner_ids = sorted(self._owners)
            self._count("owner_cache_forgotten")

    def _remember_owner(self, pred_id: int, owner: NodeRef, succs: tuple[NodeRef, ...], now: float) -> None:
        """Keep a claim's range, unless the claimant's successor list was short: those are the key's
        replica holders that reads and writes use (``LookupDone.successors``), and a list caught while it
        was filling (a join) or emptied (successors declared dead under load) would stand for the whole
        TTL. A read that knew no holder but the responsible node believed it alone (a liar's empty answer
        won in test_overlay_liars so)."""
        ttl = self.config.owner_cache_ttl
        if ttl <= 0 or owner.id == self.me.id:
            return
        if len(succs) < self._settled_list_length():
            self._count("owner_cache_short_lists")
            return
        self._owners.pop(owner.id, None)
        self._owners[owner.id] = _OwnerRange(pred_id, owner, succs, now + ttl)
        while len(self._owners) > self.config.owner_cache_size:
            del self._owners[next(iter(self._owners))]
        self._owner_ids = sorted(self._owners)

    def _settled_list_length(self) -> int:
        """How many successors a settled node's list holds, as far as we can tell: r, or every other node
        we know of when the ring looks smaller than that."""
        self._rebuild_routes()
        return min(self.config.successors, len(self._route_nodes))

    def _cached_owner(self, key: int, now: float) -> _OwnerRange | None:
        """The cached range holding ``key``, if one is fresh: the first cached owner at or after the key
        on the ring, if its confirmed predecessor precedes the key."""
        owners = self._owner_ids
        if not owners:
            return None
        i = bisect_left(owners, key)
        hit = self._owners[owners[i % len(owners)]]
        if not ids.between_right(key, hit.pred_id, hit.owner.id):
            return None
        if hit.until <= now:
            self.forget_owner(hit.owner.id)
            return None
        return hit

    def clear_owner_cache(self) -> None:
        """Forget every cached owner range (the next lookups ask the ring)."""
        self._clear_owners()

    def _clear_owners(self) -> None:
        if self._owners:
            self._owners.clear()
            self._owner_ids = []

    def leave(self, now: float) -> None:
        """Leave gracefully: tell predecessor and successor, then go quiet (requests get no reply)."""
        if self._state != _JOINED:
            self._state = _LEFT
            return
        body: dict[str, Any] = {
            "pred": self._pred,
            "nodes": list(self._succ),
        }
        targets = {
            n.id: n for n in ([self._succ[0]] if self._succ else []) + ([self._pred] if self._pred else [])
        }
        for node in targets.values():
            if node.id != self.me.id:
                self._outputs.append(
                    SendRequest(self._new_request_id(), node.ep, node.id, "leave", dict(body))
                )
                self._count("sent_leave")
        self._state = _LEFT
        self._pending.clear()
        self._timers.clear()
        self._periodic_due.clear()
        for lk in list(self._lookups.values()):
            self._finish_lookup(lk, None, "node left", now)

    def seed_routing(
        self,
        successors: Iterable[NodeRef],
        predecessor: NodeRef | None,
        fingers: Iterable[NodeRef],
        now: float,
    ) -> None:
        """Install routing state directly, as already verified, and start maintenance. For simulators and
        tests that build a stable ring without running thousands of joins; real nodes never call it."""
        self._succ = [n for n in successors if n.id != self.me.id][: self.config.successors]
        self._pred = predecessor if predecessor is None or predecessor.id != self.me.id else None
        known = sorted(
            {n.id: n for n in [*fingers, *self._succ] if n.id != self.me.id}.values(),
            key=lambda n: ids.distance(self.me.id, n.id),
        )
        dists = [ids.distance(self.me.id, n.id) for n in known]
        for i, d in enumerate(self._finger_dist):
            j = bisect_left(dists, d)
            self._fingers[i] = known[j] if j < len(known) else None
        for node in [*known, *([self._pred] if self._pred else [])]:
            self._remember_verified(node)
        self._route_dirty = True
        if self._state != _JOINED:
            self._state = _JOINED
            self._start_maintenance(now, spread=True)
        self._report_neighbours()

    # ==== outputs and state =============================================================================

    def take_outputs(self) -> list[Output]:
        """Everything produced since the last call, in order (requests to send and events)."""
        out, self._outputs = self._outputs, []
        return out

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (absolute time), or None."""
        timers = self._timers
        while timers:
            at, _, kind, arg = timers[0]
            if kind == "rpc":
                pending = self._pending.get(arg)
                if pending is not None and pending.deadline == at:
                    return at
            elif self._periodic_due.get(kind) == at:
                return at
            heapq.heappop(timers)  # stale: the reply came, or the period was rescheduled
        return None

    @property
    def successors(self) -> tuple[NodeRef, ...]:
        return tuple(self._succ)

    @property
    def predecessor(self) -> NodeRef | None:
        return self._pred

    @property
    def predecessors(self) -> list[NodeRef]:
        """Our predecessor and the ones before it, nearest first (up to ``successors`` of them), as far as
        we know: the predecessor's own list arrives with each check_predecessor. Stops before wrapping
        round to us (a ring of a few nodes). Hints, not verified: used to bound which keys we replicate."""
        pred = self._pred
        if pred is None:
            return []
        out = [pred]
        source, tail = self._preds_tail
        if source == pred.id:
            seen = {pred.id}
            for node in tail:
                if node.id == self.me.id or node.id in seen or len(out) >= self.config.successors:
                    break
                seen.add(node.id)
                out.append(node)
        return out

    def holds_replica(self, key: int, replicas: int) -> bool:
        """Whether ``key`` is one this node keeps a copy of: we are among its ``replicas`` successors,
        i.e. the key is in (p_r, me] for our r-th predecessor p_r. Fewer predecessors known than that
        (a small ring, or just after a change): every key counts, so hand-offs are never refused for
        what we do not know yet."""
        preds = self.predecessors
        if len(preds) < replicas:
            return True
        return ids.between_right(key, preds[replicas - 1].id, self.me.id)

    @property
    def joined(self) -> bool:
        return self._state == _JOINED

    def fingers(self) -> list[NodeRef]:
        """The distinct finger nodes, nearest first."""
        seen: dict[int, NodeRef] = {}
        for node in self._fingers:
            if node is not None:
                seen.setdefault(node.id, node)
        return list(seen.values())

    def is_responsible(self, key: int) -> bool:
        """Key in (predecessor, me]. While no predecessor is known (alone, or it just died and the next
        notify has not come yet) every key counts as ours: lookups only end here when we are the closest
        node after the key that anyone knows, so refusing would turn a brief gap into failed reads."""
        if self._pred is None:
            return True
        return ids.between_right(key, self._pred.id, self.me.id)

    def verify(self, node: NodeRef, now: float, on_done: Callable[[bool, float], None]) -> None:
        """Check ``node``'s identity proof at its endpoint (a nonce ping, unless cached), then call
        ``on_done(verified, now)``. For the storage path: a replica store may come from a member that is
        not our neighbour (the primary of a key two nodes back), which we have not verified yet."""
        if node.id == self.me.id:
            on_done(False, now)
            return
        self._when_verified(node, lambda _n, t: on_done(True, t), now, lambda t: on_done(False, t))

    def is_verified(self, node: NodeRef) -> bool:
        """Whether this node's identity proof (at this endpoint) is in the cache."""
        return self._verified.get(node.id) == node.ep

    def stats(self) -> dict[str, int]:
        """Counters: requests sent/received by type, timeouts, dropped malformed messages, verifications."""
        out = dict(self._stats)
        out["pending_requests"] = len(self._pending)
        out["active_lookups"] = len(self._lookups)
        out["verified_identities"] = len(self._verified)
        return out

    # ==== requests received =============================================================================

    def _dispatch(self, src: NodeRef, type: str, body: Mapping[str, Any], now: float) -> Reply | None:
        if self._state == _LEFT or type not in CHORD_MESSAGES or not isinstance(body, Mapping):
            self._count("dropped")
            return None
        if parse_node(src) is None:
            self._count("dropped")
            return None
        self._count("recv_" + type)
        if type == "ping":
            nonce = body.get("nonce")
            if nonce is None:
                return Reply("ok", {})
            if not isinstance(nonce, bytes) or not 8 <= len(nonce) <= 64:
                self._count("dropped")
                return None
            proof: dict[str, Any] = {"pk": self.public_key, "sig": self._sign(proof_data(nonce, self.me))}
            if self._certificate:
                proof["cert"] = self._certificate
            return Reply("ok", proof)
        if self._state != _JOINED:
            return Reply("err", {"code": 503, "reason": "not joined yet"})
        if type == "find_successor":
            key = _parse_key(body.get("key"))
            if key is None:
                self._count("dropped")
                return None
            done, node, more = self._answer(key)
            return Reply(
                "ok",
                {
                    "done": done,
                    "node": node,
                    "nodes": list(self._succ),
                    "more": more,
                },
            )
        if type == "get_predecessor":
            return Reply("ok", {"node": self._pred})
        if type == "get_successors":
            return Reply(
                "ok",
                {
                    "nodes": list(self._succ),
                    "pred": self._pred,
                    "preds": self.predecessors,
                },
            )
        if type == "notify":
            self._rectify(src, now)
            return Reply("ok", {"pred": self._pred})
        # leave
        pred_raw = body.get("pred")
        pred = parse_node(pred_raw) if pred_raw is not None else None
        nodes = parse_nodes(body.get("nodes", []))
        if nodes is None or (pred_raw is not None and pred is None):
            self._count("dropped")
            return None
        self._on_leave(src, pred, nodes, now)
        return Reply("ok", {})

    def _answer(self, key: int) -> tuple[bool, NodeRef, list[NodeRef]]:
        """One iterative step from our own view: (done, node, more candidates)."""
        me, pred, succ = self.me, self._pred, self._succ
        more: list[NodeRef] = [pred] if pred is not None else []
        if pred is not None and ids.between_right(key, pred.id, me.id):
            return True, me, more
        self._rebuild_routes()
        first = succ[0] if succ else (self._route_nodes[0] if self._route_nodes else None)
        if first is None:
            return True, me, more
        if ids.between_right(key, me.id, first.id):
            return True, first, more
        dists = self._route_dist
        i = bisect_left(dists, ids.distance(me.id, key)) - 1
        if i < 0:
            return True, first, more
        best = self._route_nodes[i]
        more.extend(self._route_nodes[max(0, i - 3) : i])
        return False, best, more

    def _rectify(self, src: NodeRef, now: float) -> None:
        """Zave's rectify: take the notifier as predecessor if it is closer than ours or ours is dead."""
        if src.id == self.me.id:
            return
        pred = self._pred
        if pred is None or ids.between(src.id, pred.id, self.me.id):
            self._when_verified(src, self._accept_predecessor, now)
        elif src.id != pred.id and now - self._last_pred_probe >= self.config.check_predecessor_interval / 2:
            # Not closer: only a dead predecessor would make it better. Probe ours (rate-limited).
            self._last_pred_probe = now
            probed = pred

            def dead(now: float, dead: bool) -> None:
                if dead:
                    self._node_dead(probed.id, now)
                    self._when_verified(src, self._accept_predecessor, now)

            self._request(pred.ep, pred.id, "ping", {}, _ignore_reply, dead, now)

    def _accept_predecessor(self, node: NodeRef, now: float) -> None:
        pred = self._pred
        if node.id != self.me.id and (pred is None or ids.between(node.id, pred.id, self.me.id)):
            self._pred = node
            self._route_dirty = True
            if not self._succ:
                self._kick_stabilize(now)  # alone until now: the notifier is our way into the ring

    def _on_leave(self, src: NodeRef, pred: NodeRef | None, nodes: list[NodeRef], now: float) -> None:
        """Splice a leaving neighbour out at once instead of waiting for timeouts. Only a neighbour whose
        identity we verified at that endpoint can make us drop it (a forged leave would cut the ring)."""
        if not self.is_verified(src):
            self._count("leave_ignored")
            return
        was_first = bool(self._succ) and self._succ[0].id == src.id
        if self._pred is not None and self._pred.id == src.id:
            self._pred = None
            if pred is not None and pred.id != self.me.id:
                self._when_verified(pred, self._accept_predecessor, now)
        if any(n.id == src.id for n in self._succ):
            rest = [n for n in self._succ if n.id != src.id]
            if was_first:
                rest = self._verified_prefix([n for n in nodes if n.id not in (self.me.id, src.id)]) or rest
            self._succ = rest[: self.config.successors]
            self._kick_stabilize(now)
        self._drop_finger(src.id)

    # ==== maintenance ===================================================================================

    def _start_maintenance(self, now: float, spread: bool = False) -> None:
        cfg = self.config
        for kind, period in (
            ("stabilize", cfg.stabilize_interval),
            ("fix_fingers", cfg.fix_fingers_interval),
            ("check_pred", cfg.check_predecessor_interval),
        ):
            if spread:  # desynchronise a seeded ring: random phase within one period
                self._set_periodic(kind, now + period * self._unit())
            else:
                self._schedule(kind, now, period)

    def _unit(self) -> float:
        return int.from_bytes(self._random_bytes(4), "big") / 0xFFFFFFFF

    def _schedule(self, kind: str, now: float, period: float) -> None:
        j = self.config.jitter
        self._set_periodic(kind, now + period * (1 - j + 2 * j * self._unit()))

    def _set_periodic(self, kind: str, at: float) -> None:
        self._periodic_due[kind] = at
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, kind, 0))

    def _kick_stabilize(self, now: float) -> None:
        """Run stabilize soon (now) rather than at the next period: a neighbour just changed."""
        if self._state == _JOINED and not self._stabilizing:
            self._set_periodic("stabilize", now)

    def _stabilize(self, now: float) -> None:
        """Zave's stabilize: reconcile with the first live successor, adopt its predecessor only after
        hearing from it, then notify."""
        if self._stabilizing:
            return
        if not self._succ:
            # Alone, or every successor died: fall back on the predecessor or the nearest finger.
            # The nearest known node clockwise is the best guess; its predecessor walks us back from there.
            self._rebuild_routes()
            if self._route_nodes:
                self._adopt_successor(self._route_nodes[0], now)
            return
        succ = self._succ[0]
        self._stabilizing = True

        def on_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
            self._stabilizing = False
            nodes = parse_nodes(body.get("nodes", []))
            pred_raw = body.get("pred")
            pred = parse_node(pred_raw) if pred_raw is not None else None
            if nodes is None or (pred_raw is not None and pred is None):
                self._count("bad_replies")
                return
            if not self._succ or self._succ[0].id != succ.id:
                return  # the list changed meanwhile; the next round reconciles
            self._merge_successors(succ, nodes, now)
            if pred is not None and pred.id != self.me.id and ids.between(pred.id, self.me.id, succ.id):
                self._when_verified(pred, self._adopt_successor, now)
            else:
                self._notify(succ, now)

        def on_fail(now: float, dead: bool) -> None:
            self._stabilizing = False
            if dead:
                self._node_dead(succ.id, now)
                self._kick_stabilize(now)

        self._request(succ.ep, succ.id, "get_successors", {}, on_reply, on_fail, now)

    def _adopt_successor(self, node: NodeRef, now: float) -> None:
        """Query a (verified) candidate successor and, if it answers, put it first in the list."""
        if node.id == self.me.id:
            return

        def on_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
            nodes = parse_nodes(body.get("nodes", []))
            if nodes is None:
                self._count("bad_replies")
                return
            first = self._succ[0] if self._succ else None
            closer = first is None or ids.between(node.id, self.me.id, first.id)
            if closer or (first is not None and first.id == node.id):
                self._merge_successors(node, nodes, now)
            if self._succ:
                self._notify(self._succ[0], now)
            if closer:
                # A closer successor may itself have a closer predecessor (many nodes joined at once):
                # keep walking now instead of one step per period.
                self._kick_stabilize(now)

        def on_fail(now: float, dead: bool) -> None:
            if dead:
                self._node_dead(node.id, now)
            if self._succ:
                self._notify(self._succ[0], now)

        self._request(node.ep, node.id, "get_successors", {}, on_reply, on_fail, now)

    def _merge_successors(self, first: NodeRef, nodes: list[NodeRef], now: float) -> None:
        """Successor list := first + first's list, without us and duplicates, cut at the first node whose
        identity is not verified yet (its check starts now, and a later round will take it in)."""
        out = [first]
        seen = {first.id, self.me.id}
        for node in nodes:
            if node.id in seen:
                continue
            seen.add(node.id)
            out.append(node)
        out = out[: self.config.successors]
        prefix = self._verified_prefix(out)
        if len(prefix) < len(out):
            self._when_verified(out[len(prefix)], lambda n, now: self._kick_stabilize(now), now)
        if prefix and prefix != self._succ:
            self._succ = prefix
            self._route_dirty = True

    def _verified_prefix(self, nodes: list[NodeRef]) -> list[NodeRef]:
        out: list[NodeRef] = []
        for node in nodes:
            if not self.is_verified(node):
                break
            out.append(node)
        return out

    def _notify(self, node: NodeRef, now: float) -> None:
        def on_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
            # The notified node's predecessor lies between us and it: we skipped a node. Adopt it now
            # (after querying it, as stabilize would) instead of waiting for the next period.
            raw = body.get("pred")
            pred = parse_node(raw) if raw is not None else None
            first = self._succ[0] if self._succ else None
            if (
                pred is not None
                and first is not None
                and first.id == node.id
                and pred.id != self.me.id
                and ids.between(pred.id, self.me.id, node.id)
            ):
                self._when_verified(pred, self._adopt_successor, now)

        def on_fail(now: float, dead: bool) -> None:
            if dead:
                self._node_dead(node.id, now)

        self._request(node.ep, node.id, "notify", {}, on_reply, on_fail, now)

    def _check_predecessor(self, now: float) -> None:
        pred = self._pred
        if pred is None:
            return

        def on_fail(now: float, dead: bool) -> None:
            if dead:
                self._node_dead(pred.id, now)

        def on_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
            preds = parse_nodes(body.get("preds") or [])
            if preds is not None and self._pred is not None and self._pred.id == pred.id:
                self._preds_tail = (pred.id, preds)

        self._last_pred_probe = now
        self._request(pred.ep, pred.id, "get_successors", {}, on_reply, on_fail, now)

    def _fix_fingers(self, now: float) -> None:
        """Refresh one finger (the next start not covered by the previous answer) with a lookup."""
        if self._finger_busy or not self._succ:
            return
        first = ids.distance(self.me.id, self._succ[0].id)
        idx = self._next_finger
        dists = self._finger_dist
        if idx >= len(dists):
            # One round per cycle of the table checks our successor from the far side instead.
            self._finger_burst = False
            self._next_finger = 0
            self._check_successor_remotely(now)
            return
        if dists[idx] <= first:
            idx = bisect_right(dists, first)
            succ = self._succ[0]
            for i in range(idx):
                if self._fingers[i] != succ:
                    self._fingers[i] = succ
                    self._route_dirty = True
        if idx >= len(dists):
            self._next_finger = len(dists)
            return
        target = (self.me.id + dists[idx]) % ids.RING
        self._finger_busy = True

        def found(node: NodeRef | None, hops: int, reason: str, now: float) -> None:
            self._finger_busy = False
            if node is None or node.id == self.me.id:
                self._next_finger = idx + 1 if node is None else len(dists)
            else:
                self._next_finger = idx + 1
                lo = dists[idx]
                hi = dists[idx + 1] if idx + 1 < len(dists) else ids.RING
                if self.config.proximity and lo <= ids.distance(self.me.id, node.id) < hi:
                    # Any node of [me + lo, me + hi) serves this finger equally well for hop count:
                    # take the nearest in RTT among the owner and its successors in that interval.
                    candidates = [node] + [
                        n for n in lk.owner_succs if lo <= ids.distance(self.me.id, n.id) < hi
                    ]
                    for cand in candidates:
                        self._when_verified(
                            cand,
                            lambda n, now: self._with_rtt(
                                n, lambda n, now: self._consider_finger(idx, n), now
                            ),
                            now,
                        )
                else:
                    self._when_verified(node, lambda n, now: self._set_finger(idx, n), now)
            if self._finger_burst and self._state == _JOINED:
                self._fix_fingers(now)

        lk = self._new_lookup(target, found, exclude_self=False)
        self._lookup_local(lk, now)

    def _check_successor_remotely(self, now: float) -> None:
        """Look up the owner of me + 1 starting at a random far node, not from our own table.

        Stabilize only learns about nodes through the successor's predecessor. After a burst of joins, a
        chain of new nodes can each point past the nodes that should follow them (each is its successor's
        predecessor, so stabilize sees nothing wrong); a lookup through the rest of the ring finds the
        closer successor, which is then adopted the Zave way (queried first). Costs one lookup per cycle
        through the finger table.
        """
        self._rebuild_routes()
        first = self._succ[0]
        far = [n for n in self._route_nodes if n.id != first.id]
        if not far:
            return
        seed = far[int(self._unit() * len(far)) % len(far)]
        self._finger_busy = True

        def found(node: NodeRef | None, hops: int, reason: str, now: float) -> None:
            self._finger_busy = False
            if node is None or not self._succ or node.id == self.me.id:
                return
            if ids.between(node.id, self.me.id, self._succ[0].id):
                self._count("successor_corrections")
                self._when_verified(node, self._adopt_successor, now)

        lk = self._new_lookup((self.me.id + 1) % ids.RING, found, exclude_self=True)
        lk.pool[seed.id] = seed
        self._lookup_step(lk, now)

    def _consider_finger(self, idx: int, node: NodeRef) -> None:
        """Proximity choice: keep the finger of slot ``idx`` with the lowest measured RTT."""
        dists = self._finger_dist
        lo = dists[idx]
        hi = dists[idx + 1] if idx + 1 < len(dists) else ids.RING
        current = self._fingers[idx]
        if current == node:
            return
        inf = float("inf")
        if (
            current is None
            or not lo <= ids.distance(self.me.id, current.id) < hi
            or self._rtt.get(node.id, inf) < self._rtt.get(current.id, inf)
        ):
            self._fingers[idx] = node
            self._route_dirty = True

    def _with_rtt(self, node: NodeRef, cont: _Cont, now: float) -> None:
        """Run ``cont`` once an RTT to ``node`` is known (one plain ping if it is not yet)."""
        if node.id in self._rtt:
            cont(node, now)
            return

        def on_fail(now: float, dead: bool) -> None:
            if dead:
                self._node_dead(node.id, now)

        self._request(node.ep, node.id, "ping", {}, lambda _src, _body, now: cont(node, now), on_fail, now)

    def _note_rtt(self, node_id: int, sample: float) -> None:
        if sample < 0:
            return
        old = self._rtt.pop(node_id, None)
        self._rtt[node_id] = sample if old is None else 0.7 * old + 0.3 * sample
        if len(self._rtt) > self.config.verified_cache_size:
            del self._rtt[next(iter(self._rtt))]

    def _set_finger(self, idx: int, node: NodeRef) -> None:
        dists = self._finger_dist
        reach = ids.distance(self.me.id, node.id)
        i = idx
        while i < len(dists) and dists[i] <= reach:
            if self._fingers[i] != node:
                self._fingers[i] = node
                self._route_dirty = True
            i += 1

    def _drop_finger(self, node_id: int) -> None:
        for i, node in enumerate(self._fingers):
            if node is not None and node.id == node_id:
                self._fingers[i] = None
                self._route_dirty = True

    def _node_dead(self, node_id: int, now: float) -> None:
        if node_id == self.me.id:
            return
        self._count("nodes_declared_dead")
        self._clear_owners()
        if any(n.id == node_id for n in self._succ):
            self._succ = [n for n in self._succ if n.id != node_id]
            self._route_dirty = True
        if self._pred is not None and self._pred.id == node_id:
            self._pred = None
            self._route_dirty = True
        self._drop_finger(node_id)

    def _rebuild_routes(self) -> None:
        if not self._route_dirty:
            return
        me = self.me.id
        nodes: dict[int, NodeRef] = {}
        for node in [*self._succ, *self._fingers, self._pred]:
            if node is not None and node.id != me:
                nodes.setdefault(node.id, node)
        ordered = sorted(nodes.values(), key=lambda n: ids.distance(me, n.id))
        self._route_nodes = ordered
        self._route_dist = [ids.distance(me, n.id) for n in ordered]
        self._route_dirty = False

    # ==== identity ======================================================================================

    def _when_verified(
        self, node: NodeRef, cont: _Cont, now: float, on_reject: Callable[[float], None] | None = None
    ) -> None:
        """Run ``cont(node, now)`` once ``node`` has proven its NodeId at its endpoint (at once if cached);
        ``on_reject(now)`` runs instead if the proof is refused or the node does not answer."""
        if node.id == self.me.id:
            return
        if self.is_verified(node):
            cont(node, now)
            return
        waiting = self._verifying.get(node.id)
        if waiting is not None:
            if (cont, on_reject) not in waiting:  # the same bound method queued twice would act twice
                waiting.append((cont, on_reject))
            return
        self._verifying[node.id] = [(cont, on_reject)]
        nonce = self._random_bytes(16)
        self._count("identity_checks")

        def rejected(now: float) -> None:
            for _, reject in self._verifying.pop(node.id, []):
                if reject is not None:
                    reject(now)

        def on_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
            pk, sig = body.get("pk"), body.get("sig")
            ok = (
                isinstance(pk, bytes)
                and isinstance(sig, bytes)
                and ids.key_for(pk) == node.id
                and self._safe_verify(pk, proof_data(nonce, node), sig)
            )
            if ok and self._admit is not None and not self._admit(node, body.get("cert")):
                self._count("admission_refused")
                ok = False
            if not ok:
                self._count("identity_rejected")
                rejected(now)
                return
            self._remember_verified(node)
            for c, _ in self._verifying.pop(node.id, []):
                c(node, now)

        def on_fail(now: float, dead: bool) -> None:
            if dead:
                self._node_dead(node.id, now)
            rejected(now)

        self._request(node.ep, node.id, "ping", {"nonce": nonce}, on_reply, on_fail, now)

    def _safe_verify(self, pk: bytes, data: bytes, sig: bytes) -> bool:
        try:
            return bool(self._verify(pk, data, sig))
        except Exception:
            return False

    def _remember_verified(self, node: NodeRef) -> None:
        cache = self._verified
        cache.pop(node.id, None)
        cache[node.id] = node.ep
        if len(cache) > self.config.verified_cache_size:
            del cache[next(iter(cache))]

    # ==== lookups =======================================================================================

    def _new_lookup(
        self, key: int, on_done: Callable[[NodeRef | None, int, str, float], None], *, exclude_self: bool
    ) -> _Lookup:
        lk = _Lookup(self._next_lookup_id, key, on_done, exclude_self)
        self._next_lookup_id += 1
        self._lookups[lk.lookup_id] = lk
        return lk

    def _lookup_local(self, lk: _Lookup, now: float) -> None:
        """Start from our own table: our answer is processed like any node's, but costs no hop."""
        done, node, more = self._answer(lk.key)
        lk.queried.add(self.me.id)
        lk.pool[self.me.id] = self.me
        self._absorb(lk, self.me, done, node, list(self._succ), more)
        if done and node.id == self.me.id:
            self._finish_lookup(lk, self.me, "", now)
            return
        hit = self._cached_owner(lk.key, now) if lk.cached else None
        if hit is not None:
            self._count("lookups_cached")
            lk.claims[hit.owner.id] = list(hit.succs)
            self._finish_lookup(lk, hit.owner, "", now)
            return
        self._lookup_step(lk, now)

    def _absorb(
        self, lk: _Lookup, src: NodeRef, done: bool, node: NodeRef, succs: list[NodeRef], more: list[NodeRef]
    ) -> None:
        me = self.me.id
        for n in (node, *succs, *more):
            if n.id in lk.failed or (lk.exclude_self and n.id == me):
                continue
            lk.pool.setdefault(n.id, n)
        chain = [src, *succs]
        for a, b in pairwise(chain):
            lk.next_of[a.id] = b.id
        if done and node.id == src.id:
            lk.confirmed.add(src.id)
        elif done:
            lk.next_of[src.id] = node.id

    def _lookup_answer(self, lk: _Lookup, src: NodeRef, body: Mapping[str, Any], now: float) -> None:
        done = body.get("done")
        node = parse_node(body.get("node"))
        succs = parse_nodes(body.get("nodes", []))
        more = parse_nodes(body.get("more") or [])
        if not isinstance(done, bool) or node is None or succs is None or more is None:
            self._count("bad_replies")
            lk.failed.add(src.id)
            lk.pool.pop(src.id, None)
            self._lookup_step(lk, now)
            return
        lk.hops += 1
        if not _plausible(src, lk.key, done, node, succs):
            # A "next hop" that is not between the replier and the key, a "successor" that does not
            # follow, a successor list out of ring order: a wrong routing answer. Route around the
            # replier and remember who it was (stats: misroutes per node).
            self._misrouted(src)
            lk.failed.add(src.id)
            lk.pool.pop(src.id, None)
            self._lookup_step(lk, now)
            return
        lk.queried.add(src.id)
        lk.pool.setdefault(src.id, src)
        self._absorb(lk, src, done, node, succs, more)
        if done and node.id == src.id:
            lk.owner_succs = succs
            lk.claims[src.id] = succs
            # Its predecessor (``more`` starts with it in a claim) bounds the range it answered for.
            if more and ids.between_right(lk.key, more[0].id, src.id):
                lk.claim_preds[src.id] = more[0].id
            key = lk.key
            closer = [n for n in lk.pool.values() if n.id not in lk.failed and ids.between(n.id, key, src.id)]
            if not closer:
                self._finish_lookup(lk, src, "", now)
                return
            # We know a node between the key and the claimant: the claim contradicts it. Ask the closer
            # one (the step prefers the nearest follower of the key); if it is gone, the claim stands.
            self._count("claims_contradicted")
        self._lookup_step(lk, now)

    def _lookup_step(self, lk: _Lookup, now: float) -> None:
        """Ask the next node: the closest known predecessor of the key, unless we already know which node
        follows it (then ask that one, the responsible-node candidate, directly)."""
        if lk.finished or lk.outstanding:
            return
        key = lk.key
        alive = [n for n in lk.pool.values() if n.id not in lk.failed]
        if not alive:
            self._finish_lookup(lk, None, "no live candidate", now)
            return
        owner = min(alive, key=lambda n: ids.distance(key, n.id))
        if owner.id in lk.confirmed:
            self._finish_lookup(lk, owner, "", now)
            return
        pred = min(alive, key=lambda n: ids.distance(n.id, key) or ids.RING)
        if pred.id not in lk.queried and lk.next_of.get(pred.id) != owner.id and pred.id != owner.id:
            target = pred
        elif owner.id not in lk.queried:
            target = owner
        elif pred.id not in lk.queried:
            target = pred
        else:
            # Everyone around the key answered and nobody claimed it: best effort, the nearest follower.
            self._finish_lookup(lk, owner, "", now)
            return
        if lk.hops + lk.attempts >= self.config.lookup_max_hops:
            self._finish_lookup(lk, None, "too many hops", now)
            return
        if target.id == self.me.id:  # can only happen if our own answer was inconsistent
            self._finish_lookup(lk, owner, "", now)
            return
        lk.outstanding = True
        lk.attempts += 1

        def on_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
            lk.outstanding = False
            if not lk.finished:
                self._lookup_answer(lk, target, body, now)

        def on_fail(now: float, dead: bool) -> None:
            lk.outstanding = False
            lk.failed.add(target.id)
            lk.pool.pop(target.id, None)
            if dead:
                self._node_dead(target.id, now)
            if not lk.finished:
                self._lookup_step(lk, now)

        self._request(target.ep, target.id, "find_successor", {"key": key}, on_reply, on_fail, now)

    def _misrouted(self, src: NodeRef) -> None:
        self._count("misroutes")
        table = self.misroutes
        table[src.id] = table.pop(src.id, 0) + 1
        while len(table) > 256:
            del table[next(iter(table))]

    def _finish_lookup(self, lk: _Lookup, node: NodeRef | None, reason: str, now: float) -> None:
        if lk.finished:
            return
        lk.finished = True
        self._lookups.pop(lk.lookup_id, None)
        lk.on_done(node, lk.hops, reason, now)

    def _join_found(self, node: NodeRef | None, hops: int, reason: str, now: float) -> None:
        """The join lookup ended: check the successor's identity, take its list, then we are in."""
        if self._state != _JOINING:
            return
        if node is None or node.id == self.me.id:
            self._state = _IDLE
            self._outputs.append(JoinFailed(reason or "no successor found"))
            return

        def verified(succ: NodeRef, now: float) -> None:
            def on_reply(src_id: int, body: Mapping[str, Any], now: float) -> None:
                nodes = parse_nodes(body.get("nodes", [])) or []
                self._succ = [succ]
                self._merge_successors(succ, nodes, now)
                self._route_dirty = True
                self._state = _JOINED
                self._outputs.append(Joined(succ))
                self._start_maintenance(now)
                self._finger_burst = True
                self._notify(succ, now)
                self._fix_fingers(now)

            def on_fail(now: float, dead: bool) -> None:
                self._state = _IDLE
                self._outputs.append(JoinFailed("successor did not answer"))

            self._request(succ.ep, succ.id, "get_successors", {}, on_reply, on_fail, now)

        def rejected(now: float) -> None:
            if self._state == _JOINING:
                self._state = _IDLE
                self._outputs.append(JoinFailed("the successor failed its identity check or went silent"))

        self._when_verified(node, verified, now, rejected)

    # ==== requests sent =================================================================================

    def _new_request_id(self) -> int:
        rid = self._next_request_id
        self._next_request_id += 1
        return rid

    def _request(
        self,
        to: Endpoint,
        node_id: int | None,
        type: str,
        body: dict[str, Any],
        on_reply: _OnReply,
        on_fail: _OnFail,
        now: float,
    ) -> None:
        cfg = self.config
        pending = _Pending(
            self._new_request_id(),
            to,
            node_id,
            type,
            body,
            on_reply,
            on_fail,
            cfg.rpc_retries,
            cfg.rpc_timeout,
        )
        pending.sent_at = now
        self._pending[pending.request_id] = pending
        self._send(pending, now)

    def _send(self, pending: _Pending, now: float) -> None:
        self._count("sent_" + pending.type)
        self._outputs.append(
            SendRequest(pending.request_id, pending.to, pending.node_id, pending.type, pending.body)
        )
        pending.deadline = now + pending.timeout
        self._timer_seq += 1
        heapq.heappush(self._timers, (pending.deadline, self._timer_seq, "rpc", pending.request_id))

    def _rpc_timeout(self, request_id: int, at: float, now: float) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.deadline != at:
            return
        if pending.retries_left > 0:
            pending.retries_left -= 1
            pending.timeout *= 1.5
            pending.retransmitted = True
            self._count("retransmissions")
            self._send(pending, now)
            return
        del self._pending[request_id]
        self._count("timeouts")
        pending.on_fail(now, True)

    # ==== bookkeeping ===================================================================================

    def _count(self, name: str) -> None:
        self._stats[name] = self._stats.get(name, 0) + 1

    def _report_neighbours(self) -> None:
        current = (self._pred, tuple(self._succ))
        if current != self._reported:
            self._clear_owners()  # the ring changed around us: cached ranges may have too
            old_pred, old_succ = self._reported
            self._reported = current
            self._outputs.append(NeighboursChanged(current[0], current[1], old_pred, old_succ))
