"""The asyncio overlay node: the chord and storage cores on real sockets.

``Node`` owns one UDP socket (routing and small storage RPCs) and one TCP listener on the same port (bulk:
transfers, big stores and fetches, framed by a 4-byte length). Everything protocol-shaped lives in the
sans-IO cores (``overlay.chord.ChordCore`` for routing, ``overlay.storage_core.StorageCore`` for the
storage protocol); this module only moves bytes, runs the timers the cores ask for, carries out their
requests (retransmitting over UDP, TCP for bulk) and turns the storage API into RPCs.

Robustness rules of the receive path: every datagram or frame is decoded and validated by
``overlay.wire.Codec`` first; anything malformed, oversized, of another overlay or version, of an unknown
type, or a reply that does not come from the node the request went to is dropped and counted in
``stats()``. Nothing raised while handling one message escapes into the event loop.

Example::

    node = await Node.start(bind=("127.0.0.1", 0), join=None, data_dir="/tmp/n1", overlay_name="demo")
    await node.put("sip:alice@example.net", b"contact", entry_id=b"phone")
    entries = await node.get("sip:alice@example.net")
    alice = node.at("sip:alice@example.net")  # one lookup, then reads and writes go straight there
    await alice.put(b"contact", entry_id=b"laptop")
    entries = await alice.get()
    await node.leave()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from overlay.attach import AttachState
from overlay.chord import (
    ChordConfig,
    ChordCore,
    Joined,
    JoinFailed,
    LookupDone,
    LookupFailed,
    NeighboursChanged,
    NodeRef,
    SendRequest,
)
from overlay.directory import WATCH_POLL_S, OnChange, Watch
from overlay.errors import LookupFailed as LookupFailedError
from overlay.errors import (
    NotAdmitted,
    NotAFullPeer,
    NotJoined,
    OverlayError,
    StoreRefused,
    WireError,
    WriteQuorumFailed,
    WrongOverlay,
)
from overlay.identity import (
    Certificate,
    KeyPair,
    VerifiedCache,
    node_cert_problem,
    node_identity,
    user_cert_keys,
)
from overlay.ids import RING, key_for, short
from overlay.reach import WILDCARDS, Reachability, decide, pick_prober, probe_allowed
from overlay.reads import QuorumRead
from overlay.storage import (
    DEFAULT_MAX_LIFETIME,
    DEFAULT_MAX_PER_OWNER,
    DEFAULT_MAX_VALUE,
    DROP_PREFIX,
    MAX_ENTRY_ID,
    Entry,
    Store,
)
from overlay.storage_core import (
    DEFAULT_LIFETIME_CAP,
    E_BAD_REQUEST,
    E_NOT_RESPONSIBLE,
    E_REFUSED,
    E_TOO_BIG,
    Answer,
    Locate,
    Send,
    StorageConfig,
    StorageCore,
)
from overlay.store import FILE_NAME as STORE_FILE
from overlay.store import DurableStore
from overlay.wire import TCP_MAX, Codec, FrameDecoder, Message, error_kind, frame
from p2psip.ratelimit import Rate, RateLimiter

Endpoint = tuple[str, int]
_T = TypeVar("_T")

# Claimed identities that failed to prove themselves: refused at once for a while (bounded memory), so
# a stranger's stream of replica stores costs one identity check, not one per request.
NOT_MEMBER_MEMORY = 1024
#: How many write seq memos ``Node._write`` keeps before dropping those the clock has passed.
SEQ_MEMO_PRUNE_AT = 1024
NOT_MEMBER_MEMORY_S = 60.0
# Holders a read did not need for its answer are asked this much later (for disagreement and repair).
LATE_READ_DELAY = 0.05

__all__ = ["E_BAD_REQUEST", "E_NOT_RESPONSIBLE", "E_REFUSED", "E_TOO_BIG", "KeyAccess", "Node", "NodeConfig"]

#: What each request type costs against the per-source limits (``NodeConfig.limits``). A nonce ping is
#: "join": answering it costs a signature, and it is how a newcomer gets admitted.
LIMIT_KINDS = ("store", "lookup", "join", "other")
_KIND_OF = {
    "store": "store",
    "transfer": "store",
    "digest": "store",
    "find_successor": "lookup",
    "fetch": "lookup",
    "notify": "join",
    "probe": "join",
    "reach": "join",
    "attach": "join",
    "detach": "join",
    "relay_store": "store",
    "relay_fetch": "lookup",
    "relay_lookup": "lookup",
}
RELAYS = ("relay_store", "relay_fetch", "relay_lookup")
E_CLIENT_PEER = "client-peer"
"""``err`` reason of a client peer asked to admit a node (``probe``, ``attach``); ``detail``: its attach
peer."""
E_NOT_ATTACHED = 412
"""``err`` code of a relay from a node that has not attached (or that this peer forgot): attach first."""
MAX_CLIENTS = 1024
"""Client peers one full peer relays for at most (the oldest attach is forgotten first)."""
CLIENT_SILENCE = 4
"""Keep-alive intervals (``attach_interval``) after which a silent client peer no longer counts as attached
(three are missed before the client itself moves to a fallback)."""
#: Per source (a verified ring member's NodeId, or a stranger's address:port). Generous: a member's
#: normal traffic (replica fan-out, transfers, stabilize) stays far below; a flood costs its source only.
DEFAULT_LIMITS: dict[str, Rate] = {
    "store": Rate(100.0, 500.0),
    "lookup": Rate(300.0, 1000.0),
    "join": Rate(20.0, 40.0),
    "other": Rate(200.0, 400.0),
}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Adapter tunables (chord's own live in ``chord``). Defaults suit a real overlay; tests shrink them."""

    # Maintenance a little faster than chord's WAN defaults: a put right after a join must not wait
    # long for the ring to settle, and on a LAN one stabilize per second per node costs nothing.
    chord: ChordConfig = field(
        default_factory=lambda: ChordConfig(
            stabilize_interval=1.0, fix_fingers_interval=2.0, check_predecessor_interval=2.0
        )
    )
    rpc_timeout: float = 1.0  # first attempt of a storage RPC; doubles per retry
    rpc_retries: int = 2
    op_timeout: float = 15.0  # whole put/get/remove, lookups and retries included
    join_timeout: float = 30.0
    repair_interval: float = 60.0  # anti-entropy push of the primary range to the replicas
    # The repair compares digests with each replica first and pushes only what differs (overlay.storage);
    # False: push the whole range every round (the old way, for comparison benchmarks).
    digest_repair: bool = True
    policy: str = "first-claim"
    ca_public_key: bytes | None = None
    # Admission: only nodes holding a node certificate of the CA (``ca_public_key``) join and are routed
    # to; ``node_certificate`` is this node's own (packed ``identity.Certificate``). Under the enrolled
    # policy it also goes with the drops the node key writes in inboxes (replicas keep enrolled writers').
    enrolled_nodes: bool = False
    node_certificate: bytes | None = None
    max_value: int = DEFAULT_MAX_VALUE
    max_lifetime: int = DEFAULT_MAX_LIFETIME
    max_per_owner: int = DEFAULT_MAX_PER_OWNER  # records one user key may hold on one node
    # Policy: seconds this node keeps any entry at most, whatever lifetime it was signed with (longer ones
    # are kept, for this long). A day: SIP bindings live hours; a week-long entry is refreshed by its owner.
    lifetime_cap: float | None = DEFAULT_LIFETIME_CAP
    # Reads ask the key's replica set and outvote a lying or stale holder (overlay.reads); False: the
    # responsible node alone (the old way, for comparison benchmarks). ``Node.quorum_reads`` can flip it.
    quorum_reads: bool = True
    # A write succeeds only when at least this many of the key's copies acknowledged it (fewer when the
    # primary has fewer replicas to send to: a ring of one stores alone). Else WriteQuorumFailed: a
    # primary whose replicas timed out (overload) must not make its caller report "stored". A plain node
    # takes the primary's copy as done (1: replicas that missed it are brought up by repair, so puts
    # survive a lossy network); the peer asks 2 (PEER_WRITE_QUORUM), since its REGISTER 200 promises it.
    write_quorum: int = 1
    # Per-source request limits by kind (LIMIT_KINDS); a kind left out is unlimited. Rate.parse reads
    # "200/s:400" (rate, burst) or "off". limit_sources bounds the table of sources (LRU).
    limits: dict[str, Rate] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    limit_sources: int = 4096
    durable: bool = True  # with a data_dir: keep entries in DATA_DIR/overlay.sqlite3 (overlay.store)
    # Client peers (overlay.attach, docs/nat.md): ``client_peers`` lets a node others cannot reach join as
    # a client peer (else it refuses to join); ``client`` makes it one whatever the probe says.
    client_peers: bool = False
    client: bool = False
    attach_interval: float = 15.0  # seconds between a client peer's keep-alives to its attach peer


@dataclass(slots=True)
class _Pending:
    """A request in flight: the reply must echo ``id`` and come from ``to`` (and from ``node_id``)."""

    to: Endpoint
    node_id: int | None
    chord_id: int | None = None
    future: asyncio.Future[Message] | None = None


#: Datagrams one readiness callback reads at most before the loop runs anything else.
UDP_BURST = 64


class Node:
    """One overlay member. Create it with ``await Node.start(...)``; see the module docstring."""

    def __init__(
        self,
        identity: KeyPair,
        overlay_name: str,
        replicas: int,
        config: NodeConfig,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.identity = identity
        self.overlay_name = overlay_name
        self.replicas = replicas
        self.config = config
        self.codec = Codec(overlay_name)
        self.cache = VerifiedCache()
        limits: dict[str, Any] = {
            "policy": config.policy,
            "ca_public_key": config.ca_public_key,
            "max_value": config.max_value,
            "max_lifetime": config.max_lifetime,
            "max_per_owner": config.max_per_owner,
            "cache": self.cache,
        }
        # The storage core runs on the wall clock (``time.time()``): expiry must mean the same after a
        # restart. Chord keeps the loop's monotonic clock.
        self.store: Store = (
            DurableStore(Path(data_dir) / STORE_FILE, time.time(), **limits)
            if data_dir is not None and config.durable
            else Store(**limits)
        )
        self.limiter = RateLimiter(config.limits, max_keys=config.limit_sources)
        self._not_members: OrderedDict[NodeRef, float] = OrderedDict()
        self.me: NodeRef = NodeRef(identity.node_id, "", 0)
        self.core: ChordCore | None = None
        self._loop = asyncio.get_running_loop()
        self.storage = StorageCore(
            identity.node_id,
            self.store,
            replicas,
            time.time(),
            StorageConfig(
                rpc_timeout=config.rpc_timeout,
                repair_interval=config.repair_interval,
                early_repair_delay=config.rpc_timeout * 2,
                handoff_window=3 * config.chord.stabilize_interval + 2.0,
                lifetime_cap=config.lifetime_cap,
                digest_repair=config.digest_repair,
            ),
        )
        self._udp: socket.socket | None = None
        # While a burst of datagrams is handled: the storage answers held until the entry store committed
        # the burst's writes (one sqlite commit per burst, not per entry).
        self._burst: list[Answer] | None = None
        self._tcp: asyncio.Server | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = int.from_bytes(os.urandom(6), "big")
        self._lookups: dict[int, asyncio.Future[tuple[NodeRef, int]]] = {}
        self._joined: asyncio.Future[NodeRef] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._storage_timer: asyncio.TimerHandle | None = None
        self._storage_timer_at: float | None = None
        self._waiting: dict[Hashable, asyncio.Future[Message]] = {}
        self._transfers_idle = asyncio.Event()
        self._transfers_idle.set()
        self._traces: dict[int, list[Endpoint]] = {}
        # key -> (responsible node, its successors) as the last lookup of that key found them
        self._holders_seen: dict[int, tuple[NodeRef, ...]] = {}
        # NodeId -> reads where that holder's answer lost to the others (hid or served an older entry)
        self.disagreements: dict[int, int] = {}
        self.quorum_reads = config.quorum_reads
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stats: dict[str, int] = {}
        self.hop_histogram: dict[int, int] = {}
        """Lookups by hop count (a hop count is at most ``lookup_max_hops``, so this stays small)."""
        self._seqs: dict[tuple[int, bytes], int] = {}
        self._seqs_prune_at = SEQ_MEMO_PRUNE_AT
        self._certs: dict[tuple[int, bytes], bytes] = {}
        self._closed = False
        self._left = False
        self._linked = asyncio.Event()
        self.reach: Reachability | None = None
        self.attach: AttachState | None = None
        """A client peer's attach peer (overlay.attach); None for a full peer."""
        self._attach_ids: dict[Endpoint, int] = {}
        self._clients: OrderedDict[int, Endpoint] = OrderedDict()
        """Client peers attached to this full peer (NodeId -> the address their keep-alives come from)."""
        self._client_seen: dict[int, float] = {}
        """When each attached client peer's last keep-alive came (one silent for CLIENT_SILENCE keep-alive
        intervals is no longer counted or vouched for as attached; a relay from it is still served)."""
        self.service: Endpoint | None = None
        """The application address this full peer names to its client peers in ``attach`` answers (set by
        the application: p2psip sets its SIP UDP address); None: names none."""
        """How this node joined: full or (refused as) client, why, and the address it is reached at."""

    # ------------------------------------------------------------------------------------------------
    # life cycle
    # ------------------------------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        bind: Endpoint = ("127.0.0.1", 0),
        join: Endpoint | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        overlay_name: str = "p2psip",
        replicas: int = 3,
        *,
        config: NodeConfig | None = None,
        identity: KeyPair | None = None,
        advertise: Endpoint | None = None,
    ) -> Node:
        """Bind UDP and TCP on ``bind`` (port 0: any free port, the same for both), load or create the
        node key in ``data_dir`` (None: a throw-away key), then create a ring (``join`` None) or join the
        ring the node at ``join`` belongs to. Raises ``NotJoined`` when the join does not finish.

        ``advertise`` is the endpoint other nodes reach this one at, when it is not the bound one: a node
        behind a NAT whose router forwards that port to it (it may then bind a wildcard address)."""
        _check_endpoint(bind, "bind")
        if advertise is not None:
            _check_endpoint(advertise, "advertise")
            if advertise[0] in ("0.0.0.0", "::", "") or advertise[1] == 0:
                raise OverlayError(f"advertise the address and port other nodes reach, not {advertise!r}")
        elif bind[0] in WILDCARDS and join is None:
            raise OverlayError(
                f"bind to the address other nodes should reach (e.g. 127.0.0.1), not {bind[0]!r}:"
                " a node advertises its bound address (or give the address to advertise)"
            )
        if join is not None:
            _check_endpoint(join, "join")
        if not isinstance(overlay_name, str) or not 0 < len(overlay_name) <= 64:
            raise OverlayError("overlay_name must be a string of 1 to 64 characters")
        if not isinstance(replicas, int) or not 1 <= replicas <= 8:
            raise OverlayError("replicas must be an integer from 1 to 8")
        cfg = config or NodeConfig()
        if cfg.chord.successors < replicas:
            cfg = replace(cfg, chord=replace(cfg.chord, successors=replicas))
        if identity is None:
            identity = node_identity(data_dir) if data_dir is not None else KeyPair.generate()
        if cfg.enrolled_nodes:
            if cfg.ca_public_key is None:
                raise OverlayError(
                    "admitting enrolled nodes only needs the enrollment authority's public key"
                )
            problem = node_cert_problem(
                cfg.ca_public_key, cfg.node_certificate, identity.node_id, time.time()
            )
            if problem is not None:
                raise NotAdmitted(f"this node cannot join an overlay of enrolled nodes: {problem}")
        if data_dir is not None:
            Path(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        node = cls(identity, overlay_name, replicas, cfg, data_dir)
        try:
            await node._open(bind)
            if advertise is not None:
                node.me = NodeRef(node.identity.node_id, advertise[0], int(advertise[1]))
            if join is None:
                node.reach = Reachability("full", "created the ring", node.me.ep)
            elif cfg.client:
                node.reach = Reachability("client", "configured as a client peer (client = true)", node.me.ep)
                await node._attach_first(join)
                return node
            else:
                bound = node.me.ep
                node.reach = decide(bound, advertise, await node._probe(join, advertise))
                if node.reach.mode == "client" and cfg.client_peers:
                    node.me = NodeRef(node.identity.node_id, *node.reach.endpoint)
                    await node._attach_first(join)
                    return node
                if node.reach.mode == "client":
                    host, port = node.reach.endpoint
                    raise OverlayError(
                        f"other peers cannot reach this one at {host}:{port} ({node.reach.reason}):"
                        " forward the overlay port to it and give --advertise"
                        " (or let it join as one of the client peers: client_peers = true)"
                    )
                node.me = NodeRef(node.identity.node_id, *node.reach.endpoint)
            await node._join(join)
        except BaseException:
            await node.close()
            raise
        return node

    async def _open(self, bind: Endpoint) -> None:
        host, port = bind
        last: OSError | None = None
        for _ in range(20 if port == 0 else 1):
            try:
                udp = _bind_udp(host, port)
            except OSError as exc:
                raise OverlayError(f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") from exc
            actual = udp.getsockname()[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, actual, reuse_address=True)
            except OSError as exc:
                udp.close()
                last = exc
                continue
            self._udp = udp
            self._loop.add_reader(udp.fileno(), self._read_burst)
            self.me = NodeRef(self.identity.node_id, host, int(actual))
            return
        raise OverlayError(f"cannot bind TCP on {host}:{port}: {last}")

    async def _join(self, join: Endpoint | None) -> None:
        self.core = ChordCore(
            self.me,
            public_key=self.identity.public_key,
            sign=self.identity.sign,
            verify=lambda pk, data, sig: self.cache.verify(pk, sig, data),
            config=self.config.chord,
            certificate=self.config.node_certificate,
            admit=self._admits if self.config.enrolled_nodes else None,
        )
        core, replicas = self.core, self.replicas
        self.storage.holds_replica = lambda key: core.holds_replica(key, replicas)
        now = self._loop.time()
        if join is None:
            self.core.start(now)
            self._drain()
        else:
            self.storage.knows_others = True  # joining through a member: a ring of one is a cut-off here
            deadline = now + self.config.join_timeout
            while True:
                self._joined = self._loop.create_future()
                self.core.start_join(join, self._loop.time())
                self._drain()
                try:
                    await asyncio.wait_for(self._joined, max(0.1, deadline - self._loop.time()))
                    # Joined means we know our successor. We are really in the ring once a predecessor
                    # has notified us; waiting for that keeps a burst of joins from tangling the ring
                    # and lets the first put after start() reach the right node.
                    try:
                        await asyncio.wait_for(self._linked.wait(), max(0.1, deadline - self._loop.time()))
                    except TimeoutError:
                        self._count("joined_without_predecessor")
                    break
                except WrongOverlay:
                    raise  # the bootstrap said so: retrying cannot help
                except (NotJoined, TimeoutError) as exc:
                    if self._loop.time() >= deadline:
                        raise NotJoined(
                            f"could not join the overlay through {join[0]}:{join[1]}: {exc}"
                        ) from None
                    self._count("join_retries")
                    await asyncio.sleep(min(1.0, max(0.0, deadline - self._loop.time())))
        self._schedule_storage_timer()

    async def _probe(self, join: Endpoint, advertise: Endpoint | None) -> dict[str, Any] | None:
        """Ask the bootstrap where it sees us and whether another member reaches us (overlay.reach). The
        ``ok`` body, or None when it does not answer (an older bootstrap drops the unknown type)."""
        mid = self._new_id()
        body: dict[str, Any] = {"target": advertise} if advertise is not None else {}
        if self.config.node_certificate:
            body["cert"] = self.config.node_certificate
        data = self.codec.encode(Message("probe", mid, self.me.id, self.me.ep, body))
        fut: asyncio.Future[Message] = self._loop.create_future()
        self._pending[mid] = _Pending(join, None, future=fut)
        self._count("probes_sent")
        try:
            for _ in range(2):  # the bootstrap's reach takes up to 3 RPC timeouts
                self._sendto(data, join)
                try:
                    reply = await asyncio.wait_for(asyncio.shield(fut), self.config.rpc_timeout * 4.5)
                except TimeoutError:
                    continue
                if reply.type == "err":
                    reason, detail = reply.body["reason"], reply.body.get("detail")
                    if reason == "wrong-overlay":
                        raise WrongOverlay(
                            f"the peer at {join[0]}:{join[1]} serves overlay {detail!r},"
                            f" not {self.codec.overlay_name!r}"
                        )
                    if reason == "not-enrolled":
                        raise NotAdmitted(
                            f"the peer at {join[0]}:{join[1]} refused this node at admission: {detail}"
                        )
                    if reason == E_CLIENT_PEER:
                        raise _not_a_full_peer(join, detail)
                    if reason == "probe-refused":
                        raise OverlayError(
                            f"the bootstrap refused to probe {advertise}: advertise the address"
                            " this host's traffic comes from"
                        )
                    return None
                return dict(reply.body)
            self._count("probes_unanswered")
            return None
        finally:
            self._pending.pop(mid, None)

    async def _serve_probe(self, msg: Message, addr: Endpoint) -> None:
        """Bootstrap side of ``probe``: report the observed address and have another member try it."""
        target: Endpoint = msg.body.get("target") or addr
        if self.config.enrolled_nodes and not self._admits(NodeRef(msg.src, *target), msg.body.get("cert")):
            problem = self._admission_problem(msg.src, msg.body.get("cert"))
            self._reply(msg.id, addr, "err", {"code": 403, "reason": "not-enrolled", "detail": problem or ""})
            return
        if self.attach is not None:
            self._count("probes_refused")
            self._reply(msg.id, addr, "err", self._client_peer_refusal())
            return
        core = self._core_or_none()
        if core is None or self._left or not probe_allowed(target, addr):
            self._count("probes_refused")
            self._reply(msg.id, addr, "err", {"code": 403, "reason": "probe-refused"})
            return
        candidates = [*core.successors, *([core.predecessor] if core.predecessor else [])]
        prober = pick_prober(candidates, self.me.id, msg.src, target)
        body: dict[str, Any] = {"seen": addr}
        if prober is not None:
            try:
                reply = await self._udp_call(
                    prober, "reach", {"node": NodeRef(msg.src, *target)},
                    deadline=self._loop.time() + 3 * self.config.rpc_timeout,
                )  # fmt: skip
                if reply.type == "ok":
                    body["by"] = prober
                    body["reachable"] = bool(reply.body.get("reachable"))
            except TimeoutError:
                self._count("reach_unanswered")
        self._count("probes_answered")
        self._reply(msg.id, addr, "ok", body)

    # ------------------------------------------------------------------------------------------------
    # client peers (overlay.attach)
    # ------------------------------------------------------------------------------------------------

    async def _attach_first(self, join: Endpoint) -> None:
        """Become a client peer of the bootstrap: no ring responsibility, keep-alives, relayed storage."""
        self.attach = AttachState(join, interval=self.config.attach_interval)
        deadline = self._loop.time() + self.config.join_timeout
        while self._loop.time() < deadline:
            if await self._send_attach(self._loop.time()):
                self._spawn(self._keep_attached())
                return
            await asyncio.sleep(min(1.0, max(0.0, deadline - self._loop.time())))
        raise NotJoined(f"could not attach to the overlay through {join[0]}:{join[1]} as a client peer")

    async def _send_attach(self, now: float) -> bool:
        """One ``attach`` to the attach peer; True when answered (its successors become fallbacks)."""
        st = self.attach
        assert st is not None
        peer = st.peer
        mid = self._new_id()
        body: dict[str, Any] = {}
        if self.config.node_certificate:
            body["cert"] = self.config.node_certificate
        data = self.codec.encode(Message("attach", mid, self.me.id, self.me.ep, body))
        fut: asyncio.Future[Message] = self._loop.create_future()
        self._pending[mid] = _Pending(peer, self._attach_ids.get(peer), future=fut)
        st.sent(now)
        self._count("attach_sent")
        try:
            for attempt in range(self.config.rpc_retries + 1):
                self._sendto(data, peer)
                try:
                    reply = await asyncio.wait_for(asyncio.shield(fut), self.config.rpc_timeout * 2**attempt)
                except TimeoutError:
                    continue
                if reply.type != "ok":
                    reason, detail = reply.body["reason"], reply.body.get("detail")
                    if reason == E_CLIENT_PEER:
                        raise _not_a_full_peer(peer, detail)
                    if reason == "not-enrolled":
                        raise NotAdmitted(f"the peer at {peer[0]}:{peer[1]} refused this node: {detail}")
                    break
                self._attach_ids[peer] = reply.src
                nodes = [n for n in reply.body.get("nodes", []) if n.id != self.me.id]
                for n in nodes:
                    self._attach_ids[n.ep] = n.id
                seen, service = reply.body.get("seen"), reply.body.get("service")
                st.answered(self._loop.time(), seen, [n.ep for n in nodes], service)
                self._count("attach_answered")
                return True
        finally:
            self._pending.pop(mid, None)
        self._count("attach_unanswered")
        if st.missed(self._loop.time()) is not None:
            self._count("reattached")
        return False

    async def _keep_attached(self) -> None:
        """Keep-alives to the attach peer (holding the NAT mapping open); re-attach when it dies."""
        st = self.attach
        assert st is not None
        while not self._closed:
            if st.due(self._loop.time()):
                await self._send_attach(self._loop.time())
            await asyncio.sleep(max(0.05, st.next_due - self._loop.time()))

    def _client_peer_refusal(self) -> dict[str, Any]:
        """A client peer's answer to a ``probe`` or ``attach`` (someone takes it for a bootstrap): it cannot
        admit anybody; ``detail`` names its attach peer, a full peer to join through instead."""
        assert self.attach is not None
        host, port = self.attach.peer
        return {"code": 503, "reason": E_CLIENT_PEER, "detail": f"{host}:{port}"}

    async def _detach(self) -> None:
        """A client peer that stops tells its attach peer, which forgets it at once (instead of counting it
        attached for :data:`CLIENT_SILENCE` keep-alive intervals more). One try, bounded: a stop must not
        hang on an attach peer that is gone."""
        st = self.attach
        assert st is not None
        peer_id = self._attach_ids.get(st.peer)
        if peer_id is None:
            return
        deadline = self._loop.time() + self.config.rpc_timeout * 2
        try:
            reply = await self._udp_call(NodeRef(peer_id, *st.peer), "detach", {}, deadline=deadline)
        except (OverlayError, TimeoutError):
            self._count("detach_unanswered")
            return
        self._count("detached" if reply.type == "ok" else "detach_refused")

    async def _relay(self, mtype: str, body: dict[str, Any]) -> Message:
        """A client peer's store or read, performed by its attach peer (a fallback when it fails)."""
        st = self.attach
        assert st is not None
        deadline = self._loop.time() + self.config.op_timeout
        problem = "no attach peer answered"
        while self._loop.time() < deadline and not self._closed:
            peer = st.peer
            peer_id = self._attach_ids.get(peer)
            if peer_id is None:
                await self._send_attach(self._loop.time())
                continue
            try:
                reply = await self._call(NodeRef(peer_id, *peer), mtype, body, deadline=deadline)
            except TimeoutError as exc:
                problem = str(exc)
                if st.gone(self._loop.time()) is not None:
                    self._count("reattached")
                await self._send_attach(self._loop.time())
                continue
            if reply.type == "ok":
                self._count(f"{mtype}_done")
                return reply
            code, reason = reply.body["code"], reply.body["reason"]
            if code == E_NOT_ATTACHED:  # the attach peer restarted or forgot us: greet it again
                self._count("relay_not_attached")
                await self._send_attach(self._loop.time())
                continue
            if code == E_REFUSED:
                raise StoreRefused(reply.body.get("detail") or reason, reason=reason)
            problem = f"{reason}: {reply.body.get('detail') or ''}"
            await self._backoff(1, deadline)
        raise LookupFailedError(f"{mtype} through the attach peer failed: {problem}")

    async def _serve_attach(self, msg: Message, addr: Endpoint) -> None:
        """Attach-peer side: answer keep-alives, and store or read for attached client peers."""
        if self.attach is not None and msg.type == "attach":
            self._count("attach_refused")
            self._reply(msg.id, addr, "err", self._client_peer_refusal())
            return
        if self.core is None or self._left or self._closed:
            self._reply(msg.id, addr, "err", {"code": 503, "reason": "not-a-full-peer"})
            return
        if msg.type == "attach":
            if self.config.enrolled_nodes and not self._admits(NodeRef(msg.src, *addr), msg.body.get("cert")):
                problem = self._admission_problem(msg.src, msg.body.get("cert"))
                self._count("attach_refused")
                self._reply(msg.id, addr, "err", {"code": 403, "reason": "not-enrolled", "detail": problem})
                return
            self._clients[msg.src] = addr
            self._clients.move_to_end(msg.src)
            self._client_seen[msg.src] = self._loop.time()
            while len(self._clients) > MAX_CLIENTS:
                gone, _ = self._clients.popitem(last=False)
                self._client_seen.pop(gone, None)
            self._count("attach_served")
            answer: dict[str, Any] = {"seen": addr, "nodes": list(self.core.successors)}
            if self.service is not None:
                answer["service"] = self.service
            self._reply(msg.id, addr, "ok", answer)
            return
        if msg.type == "detach":
            # only from where that client's keep-alives come from: a stranger cannot detach somebody else
            if self._clients.get(msg.src) != addr:
                self._count("detach_refused")
                self._reply(msg.id, addr, "err", {"code": E_NOT_ATTACHED, "reason": "not-attached"})
                return
            del self._clients[msg.src]
            self._client_seen.pop(msg.src, None)
            self._count("detach_served")
            self._reply(msg.id, addr, "ok", {})
            return
        rtype, body = await self._relay_answer(msg)
        self._reply(msg.id, addr, rtype, body)

    def attach_peer(self) -> tuple[Endpoint, int | None] | None:
        """A client peer's attach peer: its overlay address and NodeId (None when not yet known); None on
        a full peer."""
        if self.attach is None:
            return None
        return self.attach.peer, self._attach_ids.get(self.attach.peer)

    def attached_client(self, node_id: int) -> Endpoint | None:
        """Where an attached client peer's keep-alives come from (None: no such client attached here, or
        silent for :data:`CLIENT_SILENCE` keep-alive intervals)."""
        seen = self._client_seen.get(node_id)
        if seen is None or self._loop.time() - seen > CLIENT_SILENCE * self.config.attach_interval:
            return None
        return self._clients.get(node_id)

    async def _relay_answer(self, msg: Message) -> tuple[str, dict[str, Any]]:
        """Carry out ``relay_store``/``relay_fetch``/``relay_lookup`` for an attached client peer (UDP or
        TCP)."""
        if msg.src not in self._clients:
            self._count("relay_refused")
            return "err", {"code": E_NOT_ATTACHED, "reason": "not-attached"}
        try:
            if msg.type == "relay_store":
                await self.put_entry(msg.body["entry"])
                self._count("relay_stored")
                return "ok", {"stored": 1}
            key = msg.body["key"]
            if msg.type == "relay_lookup":
                node, _hops = await self.lookup(key)
                self._count("relay_looked_up")
                return "ok", {"node": node}
            entries = await self._read(key, KeyAccess(self, key))
            self._count("relay_fetched")
            return "ok", {"entries": [(e, e.lifetime_s) for e in entries]}
        except StoreRefused as exc:
            return "err", {"code": E_REFUSED, "reason": exc.reason, "detail": str(exc)[:200]}
        except (OverlayError, TimeoutError) as exc:
            self._count("relay_failed")
            return "err", {"code": 503, "reason": "relay-failed", "detail": str(exc)[:200]}

    def _admission_problem(self, node_id: int, cert: bytes | None) -> str | None:
        assert self.config.ca_public_key is not None
        return node_cert_problem(self.config.ca_public_key, cert, node_id, time.time(), self.cache)

    def _admits(self, node: NodeRef, cert: bytes | None) -> bool:
        """Admission of an enrolled overlay: ``node`` holds a valid node certificate for its NodeId."""
        if self._admission_problem(node.id, cert) is None:
            return True
        self._count("admission_refused")
        return False

    async def _serve_reach(self, msg: Message, addr: Endpoint, member: bool) -> None:
        """Prober side of ``reach``: ping the joiner at its endpoint (for ring members only)."""
        if not member and not await self._is_member(msg):
            self._count("reach_refused")
            self._reply(msg.id, addr, "err", {"code": 403, "reason": "members-only"})
            return
        node: NodeRef = msg.body["node"]
        mid = self._new_id()
        fut: asyncio.Future[Message] = self._loop.create_future()
        self._pending[mid] = _Pending(node.ep, node.id, future=fut)
        data = self.codec.encode(Message("ping", mid, self.me.id, self.me.ep, {}))
        reachable = False
        try:
            for _ in range(2):
                self._sendto(data, node.ep)
                try:
                    answer = await asyncio.wait_for(asyncio.shield(fut), self.config.rpc_timeout)
                    reachable = answer.type == "ok"
                    break
                except TimeoutError:
                    continue
        finally:
            self._pending.pop(mid, None)
        self._count("reach_answered" if reachable else "reach_unreachable")
        self._reply(msg.id, addr, "ok", {"reachable": reachable})

    async def leave(self) -> int:
        """Hand our entries to our successors, tell our neighbours, and close. Idempotent. Returns how
        many entries the successor acknowledged (0 for a lone node: nobody to hand them to)."""
        if self._closed or self.core is None:
            if self.attach is not None and not self._closed:
                await self._detach()
            await self.close()
            return 0
        if not self._left:
            self._left = True
            self.storage.leave(time.time())
            self._drain_storage()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._transfers_idle.wait(), self.config.op_timeout)
            self.core.leave(self._loop.time())
            waits = self._drain()
            if waits:
                await asyncio.wait(waits, timeout=self.config.rpc_timeout * 2)
        await self.close()
        return self.storage.handed_off

    async def close(self) -> None:
        """Stop at once without hand-off (as a crash would, but freeing the sockets)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._storage_timer is not None:
            self._storage_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for pending in self._pending.values():
            if pending.future is not None and not pending.future.done():
                pending.future.cancel()
        self._pending.clear()
        if self._udp is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._udp.fileno())
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if isinstance(self.store, DurableStore):
            self.store.close()

    @property
    def endpoint(self) -> Endpoint:
        return self.me.ep

    @property
    def node_id(self) -> int:
        return self.me.id

    def __repr__(self) -> str:
        return f"Node({short(self.me.id)} at {self.me.host}:{self.me.port})"

    # ------------------------------------------------------------------------------------------------
    # public storage API
    # ------------------------------------------------------------------------------------------------

    def add_certificate(self, cert: Certificate) -> None:
        """Remember a user certificate; ``put`` attaches it to entries of its AOR's key and its user key."""
        for ring_key in user_cert_keys(cert.subject):  # the AOR's key and its inbox's
            self._certs[(ring_key, cert.public_key)] = cert.to_bytes()

    async def put(
        self,
        name: str | bytes,
        value: bytes,
        *,
        entry_id: bytes = b"",
        lifetime: int = 3600,
        key: KeyPair | None = None,
    ) -> None:
        """Store ``value`` under ``name`` (entry ``entry_id``), signed by ``key`` (default: the node key),
        on the responsible node and its replicas. Raises ``StoreRefused`` with the reason if refused."""
        await self.at(name).put(value, entry_id=entry_id, lifetime=lifetime, key=key)

    async def remove(self, name: str | bytes, *, entry_id: bytes = b"", key: KeyPair | None = None) -> None:
        """Delete entry ``entry_id`` under ``name``: a signed removal (empty value, lifetime 0)."""
        await self.at(name).remove(entry_id=entry_id, key=key)

    def watch(
        self, name: str | bytes, on_change: OnChange, *, interval: float = WATCH_POLL_S
    ) -> Callable[[], None]:
        """Call ``on_change(entries)`` when the live entries of ``name`` change (``Directory.watch``).
        Chord has no change notifications: the name is read every ``interval`` seconds. Returns the stop
        function."""
        return Watch(self, name, on_change, interval).cancel

    async def put_entry(self, entry: Entry) -> None:
        """Store an entry signed elsewhere (e.g. by a user's device) as it is; the replicas check it."""
        if not isinstance(entry, Entry):
            raise OverlayError("put_entry needs an overlay.storage.Entry")
        if self.attach is not None:
            await self._relay("relay_store", {"entry": entry})
            return
        reply = await self._primary_call(entry.key, "store", {"entry": entry}, KeyAccess(self, entry.key))
        self._check_write_quorum(reply)

    async def get(self, name: str | bytes) -> list[Entry]:
        """The live entries under ``name`` from the node responsible for it (empty list if none)."""
        return await self.at(name).get()

    def at(self, name: str | bytes | int) -> KeyAccess:
        """Reads and writes of one key that look its responsible node up once (on first use) and then go
        straight to it: a REGISTER that reads an AOR and writes k contacts costs one lookup, not 1 + k.
        ``name`` is a name (hashed to its ring key) or a ring key. No I/O until the first call."""
        key = name if isinstance(name, int) and not isinstance(name, bool) else _ring_key(name)
        if not 0 <= key < RING:
            raise OverlayError("a ring key is an integer in [0, 2**128)")
        return KeyAccess(self, key)

    def _check_put(self, value: bytes, lifetime: int) -> None:
        if not isinstance(value, bytes | bytearray):
            raise OverlayError("value must be bytes")
        if len(value) > self.config.max_value:
            raise StoreRefused(
                f"value of {len(value)} bytes exceeds the limit of {self.config.max_value}",
                reason="too-large",
            )
        if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime < 1:
            raise OverlayError("lifetime must be a positive number of seconds (use remove() to delete)")
        if lifetime > self.config.max_lifetime:
            raise OverlayError(f"lifetime must be at most {self.config.max_lifetime} seconds")

    async def _read(self, ring_key: int, at: KeyAccess) -> list[Entry]:
        """Ask the key's holders (responsible node + r-1 successors) in parallel; see overlay.reads. A
        client peer asks its attach peer to (``relay_fetch``) and checks the signatures itself."""
        if self.attach is not None and not self._closed:
            reply = await self._relay("relay_fetch", {"key": ring_key})
            found = [e for e, _ in reply.body.get("entries", []) if e.key == ring_key and not e.is_removal]
            return [e for e in found if self._entry_valid(e)]
        self._core()
        if not self.quorum_reads:
            reply = await self._primary_call(ring_key, "fetch", {"key": ring_key}, at)
            found = [e for e, _ in reply.body.get("entries", []) if e.key == ring_key and not e.is_removal]
            return [e for e in found if self._entry_valid(e)]

        async def ask_holders(_target: NodeRef, deadline: float) -> list[Entry] | str:
            read = await self._quorum_read(ring_key, list(at.holders), deadline)
            if read.misdirected:
                self._count("reads_misdirected")
                return "not responsible: the view of the ring that chose the holders is stale"
            return read.result() if read.answered else "no holder answered"

        return await self._until_deadline(ring_key, "fetch", at, ask_holders, holders=True)

    async def _quorum_read(self, ring_key: int, holders: list[NodeRef], deadline: float) -> QuorumRead:
        """Read ``ring_key`` from its holders (responsible node first); see overlay.reads.

        The responsible node and one more holder (this node, if it is one: its answer is free) are asked
        at once; the others as soon as those two disagree, one of them fails, or they have not settled it
        within ``rpc_timeout / 2`` (a hedge), else 50 ms after the answer, in the background, where they
        still count (outvoted holders, read repair). So a healthy read costs two fetches in parallel, one
        round trip, and a lie or a silence costs at most the hedge delay more. Nobody waits longer than
        ``2 x rpc_timeout`` for holders that do not answer."""
        read = QuorumRead(ring_key, [h.id for h in holders], self._entry_valid)
        body = {"key": ring_key, "replica": True}
        # The node taken for responsible checks that it is (``owner``): holders from an owner cache that
        # predates a join in its range are not the key's, and two of them may agree on "nothing" while
        # the write that just succeeded sits on the new node (tests/test_node_net.py saw it under load).
        owner_body = {**body, "owner": True}
        loop = self._loop
        until = min(deadline, loop.time() + 2 * self.config.rpc_timeout)
        others = holders[1:]
        second = next((h for h in others if h.id == self.me.id), others[0] if others else None)
        first = [holders[0], *([second] if second is not None else [])]
        rest = [h for h in holders if h not in first]
        calls: dict[asyncio.Task[Message], NodeRef] = {}

        def launch(targets: list[NodeRef], by: float) -> set[asyncio.Task[Message]]:
            started = {
                asyncio.create_task(
                    self._call(h, "fetch", owner_body if h == holders[0] else body, deadline=by)
                ): h
                for h in targets
            }
            calls.update(started)
            return set(started)

        pending = launch(first, until)
        hedge_at = loop.time() + self.config.rpc_timeout / 2
        while not read.decided:
            if rest and (loop.time() >= hedge_at or read.failed or all(t.done() for t in calls)):
                pending |= launch(rest, until)
                rest = []
            if not pending:
                break
            wait_until = until if not rest else min(until, hedge_at)
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, wait_until - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done and (not rest or loop.time() >= until):
                break
            for task in done:
                _take_fetch(read, calls[task].id, task)
        if read.misdirected:
            for task in pending:
                task.cancel()
            return read
        read.answered_now()
        if rest and not pending and not read.merged():
            # Two holders agreed there is nothing under the key (a new AOR's REGISTER): a later holder
            # could be neither behind that answer nor blamed for it (QuorumRead.behind/disagreeing judge
            # late answers against it), so asking it would only cost a round trip.
            self._count("late_reads_skipped")
            rest = []
        if rest or pending:
            self._spawn(self._settle_read(read, calls, pending, holders, rest, launch))
        else:
            self._settle(read, holders)
        return read

    async def _settle_read(
        self,
        read: QuorumRead,
        calls: dict[asyncio.Task[Message], NodeRef],
        pending: set[asyncio.Task[Message]],
        holders: list[NodeRef],
        rest: list[NodeRef],
        launch: Callable[[list[NodeRef], float], set[asyncio.Task[Message]]],
    ) -> None:
        """The holders not needed for the answer: asked a moment later (so the check never competes with
        whoever is using the answer), then counted and repaired with the rest."""
        if rest:
            await asyncio.sleep(LATE_READ_DELAY)
            pending = pending | launch(rest, self._loop.time() + 2 * self.config.rpc_timeout)
        if pending:
            await asyncio.wait(pending)
        for task in pending:
            _take_fetch(read, calls[task].id, task)
        self._settle(read, holders)

    def _settle(self, read: QuorumRead, holders: list[NodeRef]) -> None:
        """Count the holders outvoted, and push what the others lack to them (read repair)."""
        self._count("quorum_reads")
        for holder in read.disagreeing():
            self._count("read_disagreements")
            self.disagreements[holder] = self.disagreements.pop(holder, 0) + 1
            while len(self.disagreements) > 256:
                del self.disagreements[next(iter(self.disagreements))]
        behind = read.behind()
        if not behind:
            return
        by_id = {h.id: h for h in holders}
        primary = holders[0].id

        async def repair(node: NodeRef, entries: list[Entry]) -> None:
            until = self._loop.time() + 3 * self.config.rpc_timeout
            for entry in entries:
                body: dict[str, Any] = {"entry": entry}
                if node.id != primary:
                    body["replica"] = True
                with contextlib.suppress(TimeoutError, WireError, OverlayError):
                    reply = await self._call(node, "store", body, deadline=until)
                    if reply.type == "ok":
                        self._count("read_repairs")

        for holder, entries in behind.items():
            if holder != self.me.id and holder in by_id:
                self._spawn(repair(by_id[holder], entries))

    def _entry_valid(self, entry: Entry) -> bool:
        # Trust no single node: the reader checks signatures itself (cached, so a repeated get costs no
        # new verification).
        ok = self.cache.verify(entry.owner, entry.signature, entry.signed_bytes())
        if not ok:
            self._count("fetched_entries_dropped")
        return ok

    def stats(self) -> dict[str, Any]:
        """Counters (messages in/out, drops by cause, refusals by reason), ring state and storage size."""
        out: dict[str, Any] = dict(sorted(self._stats.items()))
        out.update(self.storage.stats)
        out = dict(sorted(out.items()))
        out["entries"] = len(self.store)
        out["refused"] = dict(self.store.refused)
        out["limits"] = self.limiter.stats()
        out["verified_cache"] = {"hits": self.cache.hits, "misses": self.cache.misses}
        if self.core is not None:
            out["chord"] = self.core.stats()
            out["successors"] = [short(n.id) for n in self.core.successors]
            pred = self.core.predecessor
            out["predecessor"] = short(pred.id) if pred else None
        out["reach"] = self.reach.as_dict() if self.reach else None
        out["attach"] = self.attach.as_dict() if self.attach else None
        out["clients"] = sum(1 for c in self._clients if self.attached_client(c) is not None)
        out["dropped"] = sum(v for k, v in self._stats.items() if k.startswith("dropped_"))
        out["hops"] = {str(h): n for h, n in sorted(self.hop_histogram.items())}
        # Per node: reads its answer lost (it hid or served an older entry), wrong routing answers.
        out["disagreements"] = {short(n): c for n, c in self.disagreements.items()}
        out["misroutes"] = {short(n): c for n, c in (self.core.misroutes if self.core else {}).items()}
        return out

    async def lookup(
        self, key: int, *, path: list[Endpoint] | None = None, timeout: float | None = None
    ) -> tuple[NodeRef, int]:
        """The node responsible for ring key ``key`` and the lookup's hop count. With ``path`` (a list),
        the endpoints this node queries for ``key`` while the lookup runs are appended to it in order
        (lookups are iterative: this node asks every hop itself), for the demo and for diagnosis. A client
        peer has its attach peer look up for it (``relay_lookup``; one hop as far as it can tell).
        TimeoutError after ``timeout`` seconds (at most ``op_timeout``)."""
        if self.attach is not None and not self._closed:
            relayed = self._relay("relay_lookup", {"key": key})
            reply = await (relayed if timeout is None else asyncio.wait_for(relayed, timeout))
            node = reply.body.get("node")
            if not isinstance(node, NodeRef):
                raise LookupFailedError("the attach peer's lookup answer named no node")
            return node, 1
        core = self._core()
        self._count("lookups_started")
        fut: asyncio.Future[tuple[NodeRef, int]] = self._loop.create_future()
        if path is not None:
            self._traces[key] = path
        try:
            lookup_id = core.start_lookup(key, self._loop.time())
            self._lookups[lookup_id] = fut
            self._drain()
            wait = self.config.op_timeout if timeout is None else min(timeout, self.config.op_timeout)
            timer = self._loop.call_later(wait, _time_out, fut)
            try:
                found = await fut
            finally:
                timer.cancel()
                self._lookups.pop(lookup_id, None)
            self._count("lookup_hops", found[1])
            self.hop_histogram[found[1]] = self.hop_histogram.get(found[1], 0) + 1
            return found
        finally:
            if path is not None and self._traces.get(key) is path:
                del self._traces[key]

    # ------------------------------------------------------------------------------------------------
    # writes and calls to the responsible node
    # ------------------------------------------------------------------------------------------------

    async def _write(
        self, ring_key: int, value: bytes, entry_id: bytes, lifetime: int, key: KeyPair | None, at: KeyAccess
    ) -> None:
        if key is not None and not isinstance(key, KeyPair):
            raise OverlayError("key must be an overlay.identity.KeyPair (the user's signing key)")
        signer = key or self.identity
        slot = (ring_key, entry_id)
        now_ms = time.time_ns() // 1_000_000
        seq = max(now_ms, self._seqs.get(slot, 0) + 1)
        if len(self._seqs) >= self._seqs_prune_at:
            # The memo only keeps seq growing for writes within one millisecond (or a clock stepping back a
            # little): a seq the clock passed a minute ago is redundant. Without this, every name ever
            # written stayed here (a REGISTER flood of new AORs grew it for good). Amortized: the next
            # prune waits until the table doubled.
            self._seqs = {s: q for s, q in self._seqs.items() if q > now_ms - 60_000}
            self._seqs_prune_at = max(SEQ_MEMO_PRUNE_AT, 2 * len(self._seqs))
        self._seqs[slot] = seq
        cert = self._certs.get((ring_key, signer.public_key), b"")
        if not cert and key is None and entry_id[:1] == DROP_PREFIX:
            # a drop signed by the node key: under enrolled the replicas keep enrolled writers' drops only
            cert = self.config.node_certificate or b""
        entry = Entry.create(signer, ring_key, entry_id, value, seq, lifetime, cert)
        self.cache.signed(signer.public_key, entry.signature, entry.signed_bytes())  # verified once per hop
        if self.attach is not None:
            await self._relay("relay_store", {"entry": entry})
            return
        await self._store_entry(entry, at, signer)

    def _check_write_quorum(self, reply: Message) -> None:
        """Raise WriteQuorumFailed when the primary's answer says fewer copies than the write quorum
        acknowledged. An answer without ``wanted`` (a duplicate of a store already answered, or an older
        peer) says nothing about copies and passes."""
        stored, wanted = reply.body.get("stored"), reply.body.get("wanted")
        if not isinstance(stored, int) or not isinstance(wanted, int):
            return
        if stored < min(self.config.write_quorum, wanted):
            self._count("write_quorum_failed")
            raise WriteQuorumFailed(stored, wanted)

    async def _primary_call(self, ring_key: int, mtype: str, body: dict[str, Any], at: KeyAccess) -> Message:
        """Send ``mtype`` to the node responsible for ``ring_key`` (the one ``at`` found before, else a
        fresh lookup), looking up again after failures.

        Storage errors (``err`` with code 403) become ``StoreRefused``; a node that says it is not
        responsible, or times out, makes us look the key up again until ``op_timeout``.
        """
        self._core()

        async def ask(target: NodeRef, deadline: float) -> Message | str:
            return self._primary_outcome(
                target, mtype, await self._call(target, mtype, body, deadline=deadline)
            )

        return await self._until_deadline(ring_key, mtype, at, ask, holders=False)

    def _primary_outcome(self, target: NodeRef, mtype: str, reply: Message) -> Message | str:
        """The responsible node's answer: the reply if ``ok``; ``StoreRefused`` (403) or ``OverlayError``
        (400) raised; anything else (421 not responsible ...) as the reason to look the key up again."""
        if reply.type == "ok":
            return reply
        code, reason = reply.body["code"], reply.body["reason"]
        if code == E_REFUSED:
            raise StoreRefused(reply.body.get("detail") or reason, reason=reason)
        if code == E_BAD_REQUEST:
            raise OverlayError(f"{mtype} rejected by {short(target.id)}: {reason}")
        return f"{short(target.id)} answered {code} {reason}"

    async def _store_entry(self, entry: Entry, at: KeyAccess, signer: KeyPair | None) -> None:
        """Store a signed entry on its holders, the writer fanning out (see :class:`_WriteFanOut`): the
        primary and the replicas the last lookup named get it in parallel, and the write is done once
        the primary and enough copies for the write quorum acknowledged. Without a replica set to send to
        (a ring of one, a node cut off), the primary is asked alone, as a plain store: it replicates."""
        self._core()

        async def attempt(target: NodeRef, deadline: float) -> Message | str:
            holders = at.holders if at.holders and at.holders[0].id == target.id else [target]
            if len(holders) < 2:
                reply = await self._call(target, "store", {"entry": entry}, deadline=deadline)
                return self._primary_outcome(target, "store", reply)
            try:
                fan = _WriteFanOut(self, entry, holders, deadline, signer)
            except WireError:  # too big for a datagram: the primary gets it by TCP and replicates
                reply = await self._call(target, "store", {"entry": entry}, deadline=deadline)
                return self._primary_outcome(target, "store", reply)
            outcome = await fan.outcome
            if outcome is not None:
                return outcome
            # the quorum was not reached (a copy refused as not held there: our view of the holders is
            # older than the primary's; timed out ...): the primary fans out by its own view
            self._count("fanout_handed_back")
            reply = await self._call(target, "store", {"entry": entry}, deadline=deadline)
            return self._primary_outcome(target, "store", reply)

        self._check_write_quorum(await self._until_deadline(entry.key, "store", at, attempt, holders=True))

    async def _until_deadline(
        self,
        ring_key: int,
        what: str,
        at: KeyAccess,
        attempt: Callable[[NodeRef, float], Awaitable[_T | str]],
        *,
        holders: bool,
    ) -> _T:
        """The retry loop of reads and writes: find the key's responsible node (the one ``at`` found
        before, else a lookup; with ``holders`` also its replica holders), run ``attempt(target,
        deadline)``, and when it fails in a way a fresh lookup may mend (a timeout, no answer, a node that
        says it is not responsible: ``attempt`` returns why as a string) forget the node, back off and
        look again, until ``op_timeout``. Then LookupFailedError with the last reason."""
        deadline = self._loop.time() + self.config.op_timeout
        last = "no attempt"
        tries = 0
        while True:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise LookupFailedError(f"{what} for key {short(ring_key)} failed: {last}")
            tries += 1
            target = at.target
            try:
                if target is None or (holders and not at.holders):
                    target = (await self.lookup(ring_key, timeout=remaining))[0]
                    if holders:
                        seen = self._holders_seen.get(ring_key, (target,))
                        found = [target, *(n for n in seen[1:] if n.id != target.id)]
                        at.holders = list(dict.fromkeys(found))[: self.replicas]
                at.target = target
                outcome = await attempt(target, deadline)
            except (TimeoutError, LookupFailedError, NotJoined) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            if not isinstance(outcome, str):
                return outcome
            last = outcome
            at.forget(target)
            if target is not None and self.core is not None:
                self.core.forget_owner(target.id)  # a cached range that sent us here is wrong
            await self._backoff(tries, deadline)

    async def _backoff(self, attempt: int, deadline: float) -> None:
        """Wait before retrying: maintenance needs a moment to repair the ring (bounded by deadline)."""
        delay = min(self.config.rpc_timeout * 0.25 * (2 ** min(attempt, 5)), deadline - self._loop.time())
        if delay > 0:
            await asyncio.sleep(delay)

    async def _call(self, target: NodeRef, mtype: str, body: dict[str, Any], *, deadline: float) -> Message:
        """One storage RPC: local if ``target`` is us, UDP when it fits, TCP otherwise or when asked."""
        if target.id == self.me.id:
            return await self._local_call(mtype, body, deadline=deadline)
        self._count("storage_rpcs")
        try:
            reply = await self._udp_call(target, mtype, body, deadline=deadline)
        except WireError:  # too big for a datagram
            return await self._tcp_call(target, mtype, body, timeout=max(0.1, deadline - self._loop.time()))
        if reply.type == "err" and reply.body["code"] == E_TOO_BIG:
            return await self._tcp_call(target, mtype, body, timeout=max(0.1, deadline - self._loop.time()))
        return reply

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) % (1 << 64)
        return self._next_id

    async def _udp_call(
        self, target: NodeRef, mtype: str, body: dict[str, Any], *, deadline: float
    ) -> Message:
        """One request over UDP, retransmitted with exponential backoff until a reply or ``deadline``
        (TimeoutError then); see :meth:`_udp_request`."""
        return await self._udp_request(target, mtype, body, deadline=deadline)

    def _udp_request(
        self, target: NodeRef, mtype: str, body: dict[str, Any], *, deadline: float
    ) -> asyncio.Future[Message]:
        """One request over UDP as a future: resolved with the reply, or with TimeoutError once the last
        retransmission went unanswered (the target then counts as failed). ``WireError`` at once if the
        request does not fit a datagram. Nothing is sent again once the future is done or cancelled.

        The retransmissions run on one timer callback per attempt (``loop.call_at``) around the one future
        the reply resolves: an ``asyncio.wait_for(shield(...))`` per attempt cost a waiter future, a shield
        future and their callbacks on every RPC, a good part of a registration's CPU (issue 19). No task
        either: a writer's fan-out (:class:`_WriteFanOut`) waits on several of these with callbacks."""
        mid = self._new_id()
        data = self.codec.encode(Message(mtype, mid, self.me.id, self.me.ep, body))
        loop = self._loop
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[mid] = _Pending(target.ep, target.id, future=fut)
        timeout, retries = self.config.rpc_timeout, self.config.rpc_retries
        timer: asyncio.TimerHandle | None = None

        def attempt(n: int) -> None:
            nonlocal timer
            if fut.done():
                return
            if n:
                self._count("rpc_retransmissions")
            wait = 0.0
            if n <= retries:
                self._sendto(data, target.ep)
                wait = min(timeout * (2**n), deadline - loop.time())
            if wait <= 0:
                self._count("rpc_timeouts")
                fut.set_exception(TimeoutError(f"{mtype} to {short(target.id)} timed out"))
                self._node_failed(target.id)
                return
            timer = loop.call_at(loop.time() + wait, attempt, n + 1)

        def finished(_fut: asyncio.Future[Message]) -> None:
            self._pending.pop(mid, None)
            if timer is not None:
                timer.cancel()

        fut.add_done_callback(finished)
        attempt(0)
        return fut

    async def _tcp_call(
        self, target: NodeRef, mtype: str, body: dict[str, Any], *, timeout: float
    ) -> Message:
        mid = self._new_id()
        data = frame(self.codec.encode(Message(mtype, mid, self.me.id, self.me.ep, body), max_size=TCP_MAX))

        async def exchange() -> Message:
            reader, writer = await asyncio.open_connection(target.host, target.port)
            try:
                writer.write(data)
                await writer.drain()
                decoder = FrameDecoder()
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise TimeoutError("connection closed before the reply")
                    for payload in decoder.feed(chunk):
                        reply = self.codec.decode(payload, max_size=TCP_MAX)
                        if reply.id == mid and reply.is_reply and reply.src == target.id:
                            return reply
                        self._count("dropped_unexpected_reply")
            finally:
                writer.close()

        self._count("tcp_out")
        try:
            return await asyncio.wait_for(exchange(), timeout)
        except (OSError, WireError) as exc:
            self._node_failed(target.id)
            raise TimeoutError(f"TCP {mtype} to {short(target.id)} failed: {exc}") from None

    def _node_failed(self, node_id: int) -> None:
        if self.core is not None and not self._closed:
            self.core.node_failed(node_id, self._loop.time())
            self._drain()

    # ------------------------------------------------------------------------------------------------
    # receive path
    # ------------------------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + n

    def _sendto(self, data: bytes, ep: Endpoint) -> None:
        if self._udp is not None and not self._closed:
            try:
                self._udp.sendto(data, ep)
            except OSError:  # a full send buffer, an unreachable destination: a lost datagram
                self._count("udp_errors")
                return
            self._count("udp_out")

    def _read_burst(self) -> None:
        """The socket is readable: handle every datagram waiting (up to UDP_BURST), then commit the entry
        store once and send the storage answers it held. asyncio's datagram transport hands over one
        datagram per loop iteration, each with its own callback and its own sqlite commit (~0.1 ms, a good
        part of a replica's cost per registration, issue 19); under load the datagrams queue, and a burst
        shares both."""
        udp = self._udp
        if udp is None or self._closed:
            return
        held: list[Answer] = []
        self._burst = held
        durable = self.store if isinstance(self.store, DurableStore) else None
        if durable is not None:
            durable.batch()
        self._count("udp_bursts")
        try:
            for _ in range(UDP_BURST):
                try:
                    data, addr = udp.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # ICMP errors (port unreachable) surface here on Linux
                    self._count("udp_errors")
                    continue
                self._on_datagram(data, (str(addr[0]), int(addr[1])))
        finally:
            self._burst = None
            if durable is not None:
                try:
                    durable.commit()
                except OverlayError:  # the entries stay held in memory; the disk missed them
                    self._count("store_commit_errors")
            for answer in held:
                self._deliver_answer(answer)

    def _on_datagram(self, data: bytes, addr: Endpoint) -> None:
        """Entry point of every datagram. Never raises: the listener must outlive any input."""
        self._count("udp_in")
        try:
            msg = self.codec.decode(data)
        except WireError as exc:
            kind = error_kind(exc)
            self._count(f"dropped_{kind.replace('-', '_')}")
            if kind == "foreign":
                self._answer_foreign(data, addr)
            return
        try:
            self._dispatch(msg, addr)
        except Exception:  # a bug must cost one message, never the listener
            self._count("dropped_internal_error")

    def _answer_foreign(self, data: bytes, addr: Endpoint) -> None:
        """A request of another overlay: say which overlay we serve (counted, rate limited as a join, and
        only to where it came from), so a peer with a wrong ``--overlay-name`` stops waiting at once."""
        try:
            reply, to = self.codec.wrong_overlay_reply(data, self.me.id, self.me.ep)
        except WireError:
            return
        if not _same_endpoint(to, addr):
            return
        if not self.limiter.allow("join", ("addr", addr), self._loop.time()):
            self._count("dropped_rate_limited")
            return
        self._count("wrong_overlay_answered")
        if self._udp is not None and not self._closed:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, addr)

    def _dispatch(self, msg: Message, addr: Endpoint) -> None:
        if self._closed:
            return
        if msg.is_reply:
            self._on_reply(msg, addr)
            return
        if msg.src == self.me.id:
            self._count("dropped_forged")  # somebody claims to be us
            return
        if msg.type == "probe":
            # The one request whose envelope endpoint need not be its source: the joiner does not know
            # its address yet (that is the question). Only the source address is used.
            if self._admit(msg, ("addr", addr)):
                self._spawn(self._serve_probe(msg, addr))
            return
        if msg.type in ("attach", "detach") or msg.type in RELAYS:
            # Client peers too are exempt from the endpoint check: behind a NAT their envelope holds the
            # address they learned (or a dead advertised one); answers go where the request came from.
            if self._admit(msg, ("addr", addr)):
                self._spawn(self._serve_attach(msg, addr))
            return
        if not _same_endpoint(msg.ep, addr):
            # The claimed endpoint is where replies and routing go: it must be where this came from,
            # or anyone could speak for a neighbour (leave, notify) or aim our replies at a victim.
            self._count("dropped_forged")
            return
        source = self._source(msg, addr)
        if not self._admit(msg, source):
            return
        if msg.type == "reach":
            self._spawn(self._serve_reach(msg, addr, source[0] == "node"))
            return
        if msg.type == "ping" and self.core is None and not self._closed:
            self._reply(msg.id, addr, "ok", {})  # probed before joining (overlay.reach)
            return
        if msg.type in ("store", "fetch", "transfer", "digest"):
            # a retransmitted datagram carries the same (src, id, addr): the core answers it once
            token = ("udp", msg.src, msg.id, addr)
            sender = NodeRef(msg.src, msg.ep[0], msg.ep[1])
            if source[0] == "node" or not _needs_member(msg):
                member = source[0] == "node"
                self._storage_request(token, msg.type, msg.body, once=True, member=member, sender=sender)
                return

            def verified(ok: bool) -> None:
                self._storage_request(token, msg.type, msg.body, once=True, member=ok, sender=sender)

            self._when_member(msg, verified)
            return
        core = self._core_or_none()
        if core is None or self._left:
            return
        reply = core.handle_request(
            NodeRef(msg.src, msg.ep[0], msg.ep[1]), msg.type, msg.body, self._loop.time()
        )
        if reply is None:
            self._count("dropped_by_chord")
        else:
            self._reply(msg.id, addr, reply.type, reply.body)
        self._drain()

    def _source(self, msg: Message, addr: Endpoint, *, tcp: bool = False) -> tuple[str, object]:
        """Whom a request is charged to: a verified ring member by its NodeId (so it keeps its budget
        whatever port it uses), anyone else by address:port (on loopback every peer is 127.0.0.1).

        Over TCP the source port is ephemeral (a fresh bucket per connection would be no limit), so a
        stranger there is charged by its host, and a member only when the connection comes from the host
        its verified endpoint names."""
        core = self.core
        came_from_it = _same_endpoint((msg.ep[0], 0), (addr[0], 0)) if tcp else _same_endpoint(msg.ep, addr)
        if came_from_it and core is not None and core.is_verified(NodeRef(msg.src, *msg.ep)):
            return ("node", msg.src)
        return ("host", addr[0]) if tcp else ("addr", addr)

    def _when_member(self, msg: Message, then: Callable[[bool], None]) -> None:
        """Find out whether the sender of a replica store or transfer is a ring member: it must prove its
        NodeId at its endpoint (chord's nonce ping). The primary of a key r-1 nodes back is a member we
        need not have met yet; a stranger cannot answer for a NodeId it has no key of."""
        core = self._core_or_none()
        now = self._loop.time()
        claim = NodeRef(msg.src, *msg.ep)
        failed_at = self._not_members.get(claim)
        if core is None or self._left or (failed_at is not None and now - failed_at < NOT_MEMBER_MEMORY_S):
            self._count("members_refused")
            then(False)
            return
        self._count("members_checked")

        def done(ok: bool, now: float) -> None:
            if not ok:
                self._not_members[claim] = now
                self._not_members.move_to_end(claim)
                while len(self._not_members) > NOT_MEMBER_MEMORY:
                    self._not_members.popitem(last=False)
            then(ok)

        core.verify(claim, now, done)
        self._drain()

    async def _is_member(self, msg: Message) -> bool:
        verdict: asyncio.Future[bool] = self._loop.create_future()

        def settle(ok: bool) -> None:
            if not verdict.done():
                verdict.set_result(ok)

        self._when_member(msg, settle)
        try:
            return await asyncio.wait_for(verdict, self.config.op_timeout)
        except TimeoutError:
            return False

    def _admit(self, msg: Message, source: tuple[str, object]) -> bool:
        """Charge a request to its source; a refused one is dropped (no reply: a flood earns nothing)."""
        kind = _KIND_OF.get(msg.type, "other")
        if msg.type == "ping" and msg.body.get("nonce") is not None:
            kind = "join"
        if self.limiter.allow(kind, source, self._loop.time()):
            return True
        self._count("dropped_rate_limited")
        return False

    def _on_reply(self, msg: Message, addr: Endpoint) -> None:
        pending = self._pending.get(msg.id)
        if pending is None:
            self._count("dropped_unexpected_reply")
            return
        if not _same_endpoint(pending.to, addr) or (
            pending.node_id is not None and msg.src != pending.node_id
        ):
            self._count("dropped_forged_reply")
            return
        if msg.type == "err" and msg.body.get("reason") == "wrong-overlay":
            joining = self._joined
            if joining is not None and not joining.done():
                joining.set_exception(WrongOverlay(
                    f"the peer at {addr[0]}:{addr[1]} serves overlay {msg.body.get('detail')!r}, "
                    f"not {self.codec.overlay_name!r}"
                ))  # fmt: skip
        if pending.future is not None:
            if not pending.future.done():
                pending.future.set_result(msg)
            return
        del self._pending[msg.id]
        core = self._core_or_none()
        if core is None or pending.chord_id is None:
            return
        now = self._loop.time()
        if msg.type == "ok":
            core.handle_reply(pending.chord_id, msg.src, msg.body, now)
        else:
            core.handle_error(pending.chord_id, msg.body["code"], msg.body["reason"], now)
        self._drain()

    def _reply(self, mid: int, addr: Endpoint, rtype: str, body: dict[str, Any]) -> None:
        try:
            data = self.codec.encode(Message(rtype, mid, self.me.id, self.me.ep, body))
        except WireError:
            data = self.codec.encode(
                Message("err", mid, self.me.id, self.me.ep, {"code": E_TOO_BIG, "reason": "use-tcp"})
            )
        self._sendto(data, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection: frames in, replies out. Bad frames close the connection, nothing more."""
        self._count("tcp_in")
        decoder = FrameDecoder()
        connection = self._new_id()
        peername = writer.get_extra_info("peername")
        peer: Endpoint = (str(peername[0]), int(peername[1])) if peername else ("", 0)
        try:
            while not self._closed:
                chunk = await asyncio.wait_for(reader.read(65536), 30.0)
                if not chunk:
                    break
                for payload in decoder.feed(chunk):
                    try:
                        msg = self.codec.decode(payload, max_size=TCP_MAX)
                    except WireError as exc:
                        self._count(f"dropped_{error_kind(exc).replace('-', '_')}")
                        return
                    if msg.is_reply or msg.type not in ("store", "fetch", "transfer", *RELAYS):
                        self._count("dropped_unexpected_tcp")
                        return
                    if msg.type in RELAYS:  # a client peer's large entry or read (overlay.attach)
                        if not self._admit(msg, ("addr", peer)):
                            return
                        if self.core is None or self._left:
                            return
                        rtype, body = await self._relay_answer(msg)
                        out = Message(rtype, msg.id, self.me.id, self.me.ep, body)
                        writer.write(frame(self.codec.encode(out, max_size=TCP_MAX)))
                        await writer.drain()
                        continue
                    source = self._source(msg, peer, tcp=True)
                    if not self._admit(msg, source):
                        return
                    member = source[0] == "node"
                    if not member and _needs_member(msg) and _same_endpoint((msg.ep[0], 0), (peer[0], 0)):
                        member = await self._is_member(msg)
                    token = ("tcp", connection, msg.id)
                    reply = await self._await_storage(token, msg.type, msg.body, member=member)
                    if reply is None:
                        return
                    out = Message(reply.type, msg.id, self.me.id, self.me.ep, reply.body)
                    writer.write(frame(self.codec.encode(out, max_size=TCP_MAX)))
                    await writer.drain()
        except WireError:
            self._count("dropped_oversized")
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # The process is stopping (asyncio.run cancels what still runs). End quietly: on Python 3.11
            # the stream server's done-callback calls task.exception() on a cancelled handler, which
            # raises and prints a CancelledError traceback for every connection still open.
            pass
        except Exception:
            self._count("dropped_internal_error")
        finally:
            writer.close()

    # ------------------------------------------------------------------------------------------------
    # driving the storage core
    # ------------------------------------------------------------------------------------------------

    def _storage_request(
        self,
        token: Hashable,
        mtype: str,
        body: dict[str, Any],
        *,
        once: bool,
        member: bool,
        sender: tuple[int, str, int] | None = None,
    ) -> bool:
        """Hand one storage request to the core; False if this node serves none (not joined, leaving)."""
        if self._closed or self._left or self.core is None:
            return False
        try:
            now = time.time()
            self.storage.handle_request(token, mtype, body, now, once=once, member=member, sender=sender)
        except Exception:  # a bug must cost one request, never the listener
            self._count("dropped_internal_error")
            self.storage.forget(token)
            return False
        self._drain_storage()
        return True

    async def _await_storage(
        self, token: Hashable, mtype: str, body: dict[str, Any], *, member: bool
    ) -> Message | None:
        """A storage request whose answer we wait for here (TCP, or this node's own client calls); None
        if this node serves none or no answer came."""
        try:
            return await self._storage_future(token, mtype, body, member=member)
        except TimeoutError:
            return None

    def _storage_future(
        self, token: Hashable, mtype: str, body: dict[str, Any], *, member: bool
    ) -> asyncio.Future[Message]:
        """Hand a request to this node's own storage core; the future takes its answer (often at once: a
        local fetch, a store without replicas), or TimeoutError if this node serves none or the core did
        not answer within ``op_timeout`` (it answers once its own Sends are settled, and each has one)."""
        fut: asyncio.Future[Message] = self._loop.create_future()
        self._waiting[token] = fut
        if not self._storage_request(token, mtype, body, once=False, member=member):
            fut.set_exception(TimeoutError("this node serves no storage requests"))
        if fut.done():
            self._waiting.pop(token, None)
            return fut
        timer = self._loop.call_later(self.config.op_timeout, _time_out, fut)

        def finished(_fut: asyncio.Future[Message]) -> None:
            timer.cancel()
            self._waiting.pop(token, None)

        fut.add_done_callback(finished)
        return fut

    async def _local_call(self, mtype: str, body: dict[str, Any], *, deadline: float) -> Message:
        return await self._storage_future(("local", self._new_id()), mtype, body, member=True)

    def _drain_storage(self) -> None:
        """Carry out what the storage core produced: answers to requests, requests of its own."""
        for out in self.storage.take_outputs():
            if isinstance(out, Answer):
                if self._burst is not None:
                    self._burst.append(out)  # after the burst's commit (_read_burst)
                else:
                    self._deliver_answer(out)
            elif isinstance(out, Send):
                self._spawn(self._storage_send(out))
            elif isinstance(out, Locate):
                self._spawn(self._storage_locate(out))
        if self.storage.transfers_in_flight:
            self._transfers_idle.clear()
        else:
            self._transfers_idle.set()
        self._schedule_storage_timer()

    def _deliver_answer(self, out: Answer) -> None:
        fut = self._waiting.get(out.token)
        if fut is not None:
            if not fut.done():
                fut.set_result(Message(out.type, 0, self.me.id, self.me.ep, out.body))
        elif isinstance(out.token, tuple) and out.token[0] == "udp":
            _, _src, mid, addr = out.token
            self._reply(mid, addr, out.type, out.body)

    async def _storage_send(self, send: Send) -> None:
        """One request of the storage core, over UDP with retries (TCP when big) or TCP for bulk."""
        target = NodeRef(*send.to)
        reply: Message | None = None
        with contextlib.suppress(TimeoutError, WireError, OSError):
            if send.bulk:
                reply = await self._tcp_call(target, send.type, send.body, timeout=send.timeout)
            else:
                deadline = self._loop.time() + send.timeout
                reply = await self._call(target, send.type, send.body, deadline=deadline)
        if self._closed:
            return
        now = time.time()
        try:
            if reply is None:
                self.storage.on_failure(send.request_id, now)
            else:
                self.storage.on_reply(send.request_id, reply.type, reply.body, now)
        except Exception:
            self._count("dropped_internal_error")
        self._drain_storage()

    async def _storage_locate(self, locate: Locate) -> None:
        found: NodeRef | None = None
        with contextlib.suppress(TimeoutError, LookupFailedError, NotJoined):
            found, _hops = await self.lookup(locate.key)
        if self._closed:
            return
        try:
            self.storage.on_located(locate.request_id, found, time.time())
        except Exception:
            self._count("dropped_internal_error")
        self._drain_storage()

    def _schedule_storage_timer(self) -> None:
        if self._closed or self.core is None:
            return
        when = self.storage.next_timer()
        if when == self._storage_timer_at:
            return
        if self._storage_timer is not None:
            self._storage_timer.cancel()
        self._storage_timer_at = when
        self._storage_timer = self._loop.call_later(max(0.0, when - time.time()), self._on_storage_timer)

    def _on_storage_timer(self) -> None:
        self._storage_timer = None
        self._storage_timer_at = None
        if self._closed:
            return
        try:
            self.storage.handle_timer(time.time())
        except Exception:
            self._count("timer_errors")
        self._drain_storage()

    # ------------------------------------------------------------------------------------------------
    # driving the chord core
    # ------------------------------------------------------------------------------------------------

    def _core(self) -> ChordCore:
        if self.core is None or self._closed or self._left:
            raise NotJoined("this node is not part of an overlay (not started, left or closed)")
        return self.core

    def _core_or_none(self) -> ChordCore | None:
        return None if self._closed else self.core

    def _drain(self) -> list[asyncio.Future[Message]]:
        """Carry out everything the chord core produced; returns futures of any leave requests sent."""
        core = self.core
        waits: list[asyncio.Future[Message]] = []
        if core is None or self._closed:
            return waits
        for out in core.take_outputs():
            if isinstance(out, SendRequest):
                waits.extend(self._send_chord(out))
            elif isinstance(out, LookupDone):
                fut = self._lookups.get(out.lookup_id)
                if fut is not None and not fut.done():
                    self._holders_seen[out.key] = (out.node, *out.successors)
                    while len(self._holders_seen) > 256:
                        del self._holders_seen[next(iter(self._holders_seen))]
                    fut.set_result((out.node, out.hops))
            elif isinstance(out, LookupFailed):
                fut = self._lookups.get(out.lookup_id)
                if fut is not None and not fut.done():
                    fut.set_exception(LookupFailedError(f"lookup of {short(out.key)} failed: {out.reason}"))
            elif isinstance(out, NeighboursChanged):
                self._count("neighbour_changes")
                if out.predecessor is not None and not self._linked.is_set():
                    self._linked.set()
                self.storage.on_neighbours(out.predecessor, list(out.successors), time.time())
                self._drain_storage()
            elif isinstance(out, Joined):
                if self._joined is not None and not self._joined.done():
                    self._joined.set_result(out.successor)
            elif isinstance(out, JoinFailed) and self._joined is not None and not self._joined.done():
                self._joined.set_exception(NotJoined(out.reason))
        self._schedule_timer()
        return waits

    def _send_chord(self, req: SendRequest) -> list[asyncio.Future[Message]]:
        mid = self._new_id()
        fut: asyncio.Future[Message] | None = None
        pending = _Pending(req.to, req.node_id, chord_id=req.request_id)
        if req.type == "leave":
            # leave is fire-and-wait: keep a future so leave() can wait for the acknowledgements
            fut = self._loop.create_future()
            pending.future = fut
        try:
            data = self.codec.encode(Message(req.type, mid, self.me.id, self.me.ep, req.body))
        except WireError:
            self._count("dropped_unencodable")
            return []
        self._pending[mid] = pending
        if self._traces and req.type == "find_successor":
            path = self._traces.get(req.body.get("key", -1))
            if path is not None and req.to not in path:
                path.append(req.to)
        lifetime = self.config.chord.rpc_timeout * (self.config.chord.rpc_retries + 2)
        self._loop.call_later(lifetime, self._pending.pop, mid, None)
        self._sendto(data, req.to)
        return [fut] if fut is not None else []

    def _schedule_timer(self) -> None:
        core = self.core
        if core is None or self._closed:
            return
        when = core.next_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        core = self._core_or_none()
        if core is None:
            return
        try:
            core.handle_timer(self._loop.time())
            self._drain()
        except Exception:
            self._count("timer_errors")
            self._schedule_timer()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class _WriteFanOut:
    """One writer-side fan-out of a store (issue 19): the writer sends the entry to the key's primary
    (``fanout``: keep and check it, forward nothing) and to the replicas its last lookup named
    (``replica``), all at once, and counts the answers as they come, by callbacks (no task per copy).

    ``outcome`` resolves as soon as the primary acknowledged and the copies acknowledged so far (the
    primary's included) reach the write quorum ``min(write_quorum, copies wanted)``, where the copies
    wanted are the holders sent to or, if more, what the primary's own view wants (a primary cut off from
    its successors wants r): an ``ok`` message with ``stored`` and ``wanted`` for
    ``Node._check_write_quorum``. So a new AOR's REGISTER waits one round trip, not two (writer ->
    primary -> replicas -> primary -> writer), and the entry peer that is a replica keeps its copy without
    a datagram. The primary's answer is waited for in every case: it is the one that checks the key is
    its own (421: look the key up again) and, under first-claim, who owns it.

    Otherwise ``outcome`` is the primary's failure (a reason string: look up again; ``StoreRefused``,
    ``OverlayError`` raised to the writer), or None when every holder answered without a quorum (the
    writer then hands the store to the primary, which fans out by its own view).

    After the outcome the remaining copies still run. When they are all settled: a copy that went missing
    behind a successful write is handed to the primary as a plain store of the same entry, which asks its
    replicas again and schedules its early repair if one still misses it (the primary's repair role, as
    when it fanned out itself); a write the primary refused by policy while a replica that missed the
    owner's entries took it is taken back there with a signed removal (so a stale replica cannot keep a
    write the key's owner never allowed)."""

    def __init__(
        self, node: Node, entry: Entry, holders: list[NodeRef], deadline: float, signer: KeyPair | None
    ) -> None:
        self.node = node
        self.entry = entry
        self.holders = holders
        self.signer = signer
        loop = node._loop
        self.outcome: asyncio.Future[Message | str | None] = loop.create_future()
        self.outcome.add_done_callback(_retrieved)  # a writer cancelled meanwhile leaves no warning behind
        self.primary: Message | str | Exception | None = None
        self.wanted = len(holders)
        self.acks = 0
        self.took: list[NodeRef] = []  # replicas that acknowledged
        self.missed = False
        self.outstanding = len(holders)
        node._count("fanout_writes")
        replica_deadline = min(deadline, loop.time() + 3 * node.config.rpc_timeout)
        for i, holder in enumerate(holders):
            body: dict[str, Any] = (
                {"entry": entry, "fanout": True} if i == 0 else {"entry": entry, "replica": True}
            )
            if holder.id == node.me.id:
                fut = node._storage_future(("local", node._new_id()), "store", body, member=True)
            else:
                try:
                    fut = node._udp_request(
                        holder, "store", body, deadline=deadline if i == 0 else replica_deadline
                    )
                except WireError:
                    if i == 0:  # too big for a datagram, and nothing sent yet: the writer stores by TCP
                        raise
                    fut = loop.create_future()  # cannot happen (same entry): counted as a missed copy
                    fut.set_exception(TimeoutError("too big for a datagram"))
                node._count("storage_rpcs")
            fut.add_done_callback(functools.partial(self._answered, i, holder))

    def _answered(self, index: int, holder: NodeRef, fut: asyncio.Future[Message]) -> None:
        self.outstanding -= 1
        reply = None if fut.cancelled() or fut.exception() is not None else fut.result()
        if index == 0:
            if reply is None:
                self.primary = f"{short(holder.id)} did not answer the store"
            else:
                try:
                    self.primary = self.node._primary_outcome(holder, "store", reply)
                except (StoreRefused, OverlayError) as exc:
                    self.primary = exc
            if isinstance(self.primary, Message):
                self.acks += 1
                wanted = self.primary.body.get("wanted")
                if isinstance(wanted, int) and wanted > self.wanted:
                    self.wanted = wanted
        elif reply is not None and reply.type == "ok":
            self.acks += 1
            self.took.append(holder)
        else:
            self.missed = True
        self._decide()
        if not self.outstanding:
            self._settled()

    def _decide(self) -> None:
        if self.outcome.done() or self.primary is None:
            return
        if isinstance(self.primary, Exception):
            self.outcome.set_exception(self.primary)
        elif isinstance(self.primary, str):
            self.outcome.set_result(self.primary)
        elif self.acks >= min(self.node.config.write_quorum, self.wanted):
            node = self.node
            body = {"stored": self.acks, "wanted": self.wanted}
            self.outcome.set_result(Message("ok", 0, self.primary.src, node.me.ep, body))
        elif not self.outstanding:
            self.outcome.set_result(None)

    def _settled(self) -> None:
        """Every copy answered or timed out, after the outcome: repair what the outcome left behind."""
        node = self.node
        if node._closed:
            return
        primary = self.holders[0]
        if isinstance(self.primary, Message) and self.missed and self.outcome.done():
            if self.outcome.exception() is None and self.outcome.result() is not None:
                node._count("fanout_copies_handed_back")
                node._spawn(self._hand_back(primary, {"entry": self.entry}))
        elif (
            isinstance(self.primary, StoreRefused)
            and self.primary.reason == "policy"
            and self.took
            and self.signer is not None
            and self.signer.public_key == self.entry.owner
        ):
            e = self.entry
            slot = (e.key, e.entry_id)
            seq = max(e.seq + 1, node._seqs.get(slot, 0) + 1)
            node._seqs[slot] = seq
            removal = Entry.create(self.signer, e.key, e.entry_id, b"", seq, 0, e.cert)
            node.cache.signed(self.signer.public_key, removal.signature, removal.signed_bytes())
            for holder in self.took:
                node._count("fanout_refused_taken_back")
                node._spawn(self._hand_back(holder, {"entry": removal, "replica": True}))

    async def _hand_back(self, target: NodeRef, body: dict[str, Any]) -> None:
        node = self.node
        with contextlib.suppress(TimeoutError, WireError, OverlayError):
            await node._call(target, "store", body, deadline=node._loop.time() + 3 * node.config.rpc_timeout)


class KeyAccess:
    """One key's reads and writes through its responsible node, found once (see ``Node.at``).

    The node found by the first call is reused by the next ones; a timeout or a "not responsible"
    answer from it makes the next attempt look the key up again. Concurrent calls are fine.
    """

    def __init__(self, node: Node, key: int) -> None:
        self.node = node
        self.key = key
        self.target: NodeRef | None = None
        self.holders: list[NodeRef] = []  # the target and its successors (reads ask them all)

    def forget(self, target: NodeRef | None) -> None:
        if target is not None and self.target == target:
            self.target = None
            self.holders = []

    async def get(self) -> list[Entry]:
        """The live entries under the key (signatures checked here too), as ``Node.get``."""
        return await self.node._read(self.key, self)

    async def put(
        self, value: bytes, *, entry_id: bytes = b"", lifetime: int = 3600, key: KeyPair | None = None
    ) -> None:
        """Store ``value`` as entry ``entry_id``, as ``Node.put``."""
        self.node._check_put(value, lifetime)
        await self.node._write(self.key, bytes(value), _entry_id(entry_id), lifetime, key, self)

    async def remove(self, *, entry_id: bytes = b"", key: KeyPair | None = None) -> None:
        """A signed removal of entry ``entry_id``, as ``Node.remove``."""
        await self.node._write(self.key, b"", _entry_id(entry_id), 0, key, self)


# --------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------


UDP_RECEIVE_BUFFER = 1 << 20


def _time_out(fut: asyncio.Future[Any]) -> None:
    """The deadline timer of a future some coroutine awaits: TimeoutError, unless it was settled."""
    if not fut.done():
        fut.set_exception(TimeoutError())


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _bind_udp(host: str, port: int) -> socket.socket:
    """The node's UDP socket, non-blocking, with a 1 MiB receive buffer (the kernel caps it at
    net.core.rmem_max). A flood is refused per source after decoding, but while the loop is busy the
    datagrams queue in the kernel; the default ~200 KB holds a few hundred, and when it overflows the
    kernel drops honest requests with the flood."""
    family, kind, proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _check_endpoint(ep: object, what: str) -> None:
    if (
        not isinstance(ep, tuple)
        or len(ep) != 2
        or not isinstance(ep[0], str)
        or not isinstance(ep[1], int)
        or not 0 <= ep[1] <= 65535
    ):
        raise OverlayError(f"{what} must be a (host, port) tuple such as ('127.0.0.1', 7060), got {ep!r}")


def _ring_key(name: object) -> int:
    if isinstance(name, str | bytes) and name:
        return key_for(name)
    raise OverlayError(f"name must be a non-empty str or bytes (e.g. 'sip:alice@example.net'), got {name!r}")


def _entry_id(entry_id: object) -> bytes:
    if not isinstance(entry_id, bytes) or len(entry_id) > MAX_ENTRY_ID:
        raise OverlayError(f"entry_id must be bytes of at most {MAX_ENTRY_ID} (e.g. b'phone')")
    return entry_id


def _take_fetch(read: QuorumRead, holder: int, task: asyncio.Future[Message]) -> None:
    """Feed one holder's fetch outcome into a quorum read."""
    if task.cancelled() or task.exception() is not None:
        read.fail(holder)
        return
    reply = task.result()
    if reply.type != "ok":
        if holder == read.holders[0] and reply.body.get("code") == E_NOT_RESPONSIBLE:
            read.misdirect()
        read.fail(holder)
        return
    read.add(holder, [entry for entry, _ in reply.body.get("entries", [])])


def _needs_member(msg: Message) -> bool:
    """Replica stores, transfers and repair digests skip the responsibility check: only ring members may
    send them."""
    if msg.type in ("transfer", "digest"):
        return True
    return msg.type == "store" and bool(msg.body.get("replica", False))


def _not_a_full_peer(bootstrap: Endpoint, attach_peer: str | None) -> NotAFullPeer:
    """What a joiner says when its bootstrap turns out to be a client peer (docs/nat.md)."""
    hint = f" (its attach peer {attach_peer} is one)" if attach_peer else ""
    where = f"{bootstrap[0]}:{bootstrap[1]}"
    return NotAFullPeer(f"{where} is a client peer and cannot admit others; join through a full peer{hint}")


def _same_endpoint(a: Endpoint, b: Endpoint) -> bool:
    return a[1] == b[1] and (a[0] == b[0] or {a[0], b[0]} <= {"localhost", "127.0.0.1"})
