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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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
FieldType = Literal["id", "ep", "node", "nodes", "u64", "bytes", "str", "bool"]

MAX_NODES: Final = 16
MAX_BYTES: Final = 128


class MessageSpec(NamedTuple):
    """Body fields of a routing request and of its ``ok`` reply: field name -> type (maybe with "?")."""

    request: Mapping[str, str]
    reply: Mapping[str, str]


CHORD_MESSAGES: Final[Mapping[str, MessageSpec]] = {
    # Liveness; with a nonce, the reply proves the identity: sig over proof_data(nonce, responder).
    "ping": MessageSpec(request={"nonce": "bytes?"}, reply={"pk": "bytes?", "sig": "bytes?"}),
    # One iterative step. done=True: "node" is responsible for key (node == replier: "it is me").
    # done=False: "node" is the closest preceding node the replier knows. "nodes": more candidates
    # (the replier's successors, predecessor, next-best fingers) so the querier can route around failures.
    "find_successor": MessageSpec(
        request={"key": "id"}, reply={"done": "bool", "node": "node", "nodes": "nodes"}
    ),
    "get_predecessor": MessageSpec(request={}, reply={"node": "node?"}),
    # Stabilize asks this: the successor list and the predecessor in one round trip.
    "get_successors": MessageSpec(request={}, reply={"nodes": "nodes", "pred": "node?"}),
    # "I think I am your predecessor" (the notifier is the envelope's src/ep).
    "notify": MessageSpec(request={}, reply={}),
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
    answered, the responsible node included (0 when this node itself is responsible)."""

    lookup_id: int
    key: int
    node: NodeRef
    hops: int


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
    fix_fingers_interval: float = 5.0
    check_predecessor_interval: float = 10.0
    rpc_timeout: float = 1.0  # per attempt
    rpc_retries: int = 1  # retransmissions before a node is declared dead
    lookup_max_hops: int = 32
    verified_cache_size: int = 4096
    jitter: float = 0.1  # +/- fraction applied to periodic timers so nodes do not synchronise


Sign = Callable[[bytes], bytes]
Verify = Callable[[bytes, bytes, bytes], bool]  # verify(public_key, data, sig) -> bool


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
    ) -> None:
        raise NotImplementedError

    # ---- inputs -------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Create a new ring with this node alone in it, and start maintenance."""
        raise NotImplementedError

    def start_join(self, bootstrap: Endpoint, now: float) -> None:
        """Join the ring that the node at ``bootstrap`` belongs to (any member will do)."""
        raise NotImplementedError

    def start_lookup(self, key: int, now: float) -> int:
        """Start an iterative lookup for ``key``; returns its lookup id (LookupDone/LookupFailed follow,
        possibly already in the next :meth:`take_outputs` when this node knows the answer)."""
        raise NotImplementedError

    def handle_request(self, src: NodeRef, type: str, body: Mapping[str, Any], now: float) -> Reply | None:
        """A routing request from ``src`` (NodeId and endpoint from the envelope). Returns the reply to
        send, or None to drop it (unknown type, malformed body). Never raises on bad input."""
        raise NotImplementedError

    def handle_reply(self, request_id: int, src_id: int, body: Mapping[str, Any], now: float) -> None:
        """An ``ok`` reply to our request ``request_id`` from NodeId ``src_id``. Unknown ids and malformed
        bodies are ignored (a malformed body counts as a failed attempt)."""
        raise NotImplementedError

    def handle_error(self, request_id: int, code: int, reason: str, now: float) -> None:
        """An ``err`` reply to our request: the node is alive but refused; treated as a failed attempt
        without retransmission."""
        raise NotImplementedError

    def handle_timer(self, now: float) -> None:
        """The time returned by :meth:`next_timer` has come (calling early or late is harmless)."""
        raise NotImplementedError

    def node_failed(self, node_id: int, now: float) -> None:
        """The adapter learned that a node is dead (e.g. TCP refused): drop it from routing state."""
        raise NotImplementedError

    def leave(self, now: float) -> None:
        """Leave gracefully: tell predecessor and successor, then go quiet (requests get no reply)."""
        raise NotImplementedError

    def seed_routing(
        self,
        successors: Iterable[NodeRef],
        predecessor: NodeRef | None,
        fingers: Iterable[NodeRef],
        now: float,
    ) -> None:
        """Install routing state directly, as already verified, and start maintenance. For simulators and
        tests that build a stable ring without running thousands of joins; real nodes never call it."""
        raise NotImplementedError

    # ---- outputs ------------------------------------------------------------------------------------

    def take_outputs(self) -> list[Output]:
        """Everything produced since the last call, in order (requests to send and events)."""
        raise NotImplementedError

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (absolute time), or None."""
        raise NotImplementedError

    # ---- state --------------------------------------------------------------------------------------

    @property
    def successors(self) -> tuple[NodeRef, ...]:
        raise NotImplementedError

    @property
    def predecessor(self) -> NodeRef | None:
        raise NotImplementedError

    def fingers(self) -> list[NodeRef]:
        """The distinct finger nodes, nearest first."""
        raise NotImplementedError

    def is_responsible(self, key: int) -> bool:
        """Key in (predecessor, me] (True for every key while we know no predecessor and no successor)."""
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        """Counters: requests sent/received by type, timeouts, dropped malformed messages, verifications."""
        raise NotImplementedError


_unused = field  # keep the import used until the implementation lands
_heap = heapq
