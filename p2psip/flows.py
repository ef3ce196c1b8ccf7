"""The one flow table of the stack, sans-IO: RFC 5626 flows of phones and client peers, and keep-alives.

A *flow* (RFC 5626 §3.3) is how a phone behind a NAT can be reached again: the UDP 5-tuple it sent its
REGISTER from (our listening socket, its observed address and port), or the TCP/TLS/WebSocket connection
itself. The home peer keeps the flow and sends requests for that phone over it, never to the Contact, which
may be a private address nobody else can reach. The table decides; it never touches a socket or a clock
(``now`` is passed in, in the loop's monotonic seconds), so it runs the same under a fake clock in tests.

The API other modules use (the transport, the registrar part of the peer, the WebSocket listener, the
binding checks of a peer) is small on purpose:

- ``table.bind(transport, host, port, now, handle=conn, aor=..., entry_id=..., instance=..., reg_id=...,
  outbound=...)`` → :class:`Flow`: called when a REGISTER arrives over a flow; creates or refreshes the flow
  and ties the binding ``(aor, entry_id)`` to it (a binding lives on exactly one flow). ``handle`` is the
  stream connection object (opaque here: a :class:`~p2psip.transport.StreamConnection`, a WebSocket); None
  for UDP. ``outbound=True`` means the phone does RFC 5626 keep-alives itself (it registered with
  ``reg-id``); else the home peer keeps the NAT mapping open with NAT pings (Kamailio nathelper style).
- ``table.token_of(...)``, ``table.by_token(token)``: the flow token (§5.2) that goes into the home peer's
  Path URI (``sip:TOKEN@peer;lr;ob``). It is an HMAC of the flow identity under a per-table secret, so it
  is stable for one flow (a re-REGISTER gives the same Path) and cannot be forged to reach another flow.
  A UDP token also carries the observed address and port (RFC 5626 §5.2's example token, HMAC-protected):
  a UDP flow is only an address, and it outlives a restart of its home peer (the phone's NAT mapping does
  not care), so ``table.resolve(token, now)`` brings such a flow back from its token alone when the table
  does not hold it (a peer that keeps its secret in its data dir keeps its phones callable), unless this
  run found that flow dead. A stream flow is its connection: after a restart its token names nothing, and
  requests for it get 430.
- ``table.touch(transport, host, port, now)``: anything at all arrived from that address (a message, a STUN
  or CRLF keep-alive, an answer to our NAT ping): the flow is alive. A dict lookup; unknown flows are ignored.
- ``table.closed(transport, host, port)``: a stream connection ended: the flow fails at once.
- ``table.due(now)`` → a list of :class:`Ping` (send a NAT ping over this flow now) and :class:`Failed`
  (the flow is dead: 430 for requests routed to it, and its bindings must be removed). Call it about once a
  second (``next_check(now)`` says when something can next be due).
- ``table.unbind(aor, entry_id)``: the binding was removed or replaced by REGISTER.

Keep-alives (RFC 5626 §4.4, §8): :func:`classify_keepalive` recognises what is not SIP on a SIP port — a STUN
binding request (answered with a binding success response carrying XOR-MAPPED-ADDRESS, built with
``aioice.stun``: RFC 5389 message handling is not something to write twice), a double-CRLF "ping" on a
stream (answered with a single CRLF "pong") and the lone CRLFs and empty datagrams phones send; anything
else that is not SIP is garbage and is dropped by the caller, never answered.

Timing: an outbound flow must show life within ``flow_timer + grace`` seconds (we tell the phone
``Flow-Timer: flow_timer`` in the REGISTER 200, §5.4); a NAT-pinged flow gets a ping every
``ping_interval`` seconds (20-25 s keeps a Linux conntrack mapping alive: it drops an idle one after 30 s),
and fails when nothing came back for ``ping_timeout`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

from p2psip.address import RELIABLE, format_hostport

DEFAULT_FLOW_TIMER = 120
"""Seconds an outbound client may stay silent (``Flow-Timer``; RFC 5626 §4.4.1 suggests 120 for streams)."""
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_GRACE = 10.0
MAX_FLOWS = 65536

FlowKey = tuple[str, str, int]
BindingKey = tuple[str, bytes]


@dataclass(eq=False)
class Flow:
    """One flow: how to reach a phone (or a client peer) again.

    ``transport``/``host``/``port`` are the remote end as observed (after any NAT); ``handle`` the stream
    connection for stream transports. ``bindings`` are the ``(aor, entry_id)`` pairs registered over it.
    """

    token: str
    transport: str
    host: str
    port: int
    created: float
    last_seen: float
    handle: object | None = None
    outbound: bool = False
    instance: str | None = None
    reg_id: int | None = None
    last_ping: float = 0.0
    contact: str | None = None
    bindings: set[BindingKey] = field(default_factory=set)

    @property
    def key(self) -> FlowKey:
        return (self.transport, self.host, self.port)

    @property
    def stream(self) -> bool:
        """Whether the flow is a connection (CRLF keep-alives); UDP flows use STUN (RFC 5626 §4.4)."""
        return self.transport in RELIABLE

    def describe(self) -> str:
        return f"{self.transport}:{format_hostport(self.host, self.port)}"


@dataclass(frozen=True)
class Ping:
    """Send a NAT ping (an OPTIONS, or an empty datagram) over ``flow`` now."""

    flow: Flow


@dataclass(frozen=True)
class Failed:
    """``flow`` is dead: requests routed to it get 430, and ``bindings`` must be removed."""

    flow: Flow
    bindings: tuple[BindingKey, ...]
    why: str


Action = Ping | Failed


def _pack_address(host: str, port: int) -> bytes | None:
    try:
        return ipaddress.ip_address(host).packed + port.to_bytes(2, "big")
    except (ValueError, OverflowError):
        return None


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def _unb32(token: str) -> bytes | None:
    try:
        return base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except (ValueError, TypeError):
        return None


class FlowTable:
    """Every flow this node holds, by address and by token (see the module docstring)."""

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        flow_timer: int = DEFAULT_FLOW_TIMER,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        ping_timeout: float | None = None,
        grace: float = DEFAULT_GRACE,
        max_flows: int = MAX_FLOWS,
    ) -> None:
        if flow_timer <= 0 or ping_interval <= 0:
            raise ValueError("flow_timer and ping_interval must be positive")
        self.secret = secret or secrets.token_bytes(32)
        self.flow_timer = flow_timer
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout if ping_timeout is not None else 3 * ping_interval + grace
        self.grace = grace
        self.max_flows = max_flows
        self._flows: dict[FlowKey, Flow] = {}
        self._tokens: dict[str, Flow] = {}
        self._bindings: dict[BindingKey, Flow] = {}
        self._dead: dict[str, None] = {}
        """Tokens of flows found dead in this run (oldest first, at most ``max_flows``): :meth:`resolve`
        never takes them back; a new REGISTER over the same address makes the flow live again."""
        self.stats: dict[str, int] = dict.fromkeys(("created", "failed", "pings", "refused", "revived"), 0)

    # ------------------------------------------------------------------------------------- lookups

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    def token_of(self, transport: str, host: str, port: int) -> str:
        """The flow token of a flow identity, in base32 (valid in a SIP user part): 24 characters of an
        HMAC for a stream flow; for UDP 16 characters of HMAC followed by the packed address and port, so
        that :meth:`resolve` can bring the flow back from the token (see the module docstring)."""
        if transport.lower() == "udp":
            packed = _pack_address(host, port)
            if packed is not None:
                return _b32(self._mac(b"udp|" + packed)[:10] + packed)
        return _b32(self._mac(f"{transport}|{host}|{port}".encode())[:15])

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self.secret, data, hashlib.sha256).digest()

    def udp_address_of(self, token: str) -> tuple[str, int] | None:
        """The observed address a genuine UDP token of this table names, or None (not a UDP token, or not
        made with this table's secret)."""
        raw = _unb32(token)
        if raw is None or len(raw) not in (16, 28) or _b32(raw) != token:
            return None  # not ours, or not in its one canonical spelling
        mac, packed = raw[:10], raw[10:]
        if not hmac.compare_digest(mac, self._mac(b"udp|" + packed)[:10]):
            return None
        return str(ipaddress.ip_address(packed[:-2])), int.from_bytes(packed[-2:], "big")

    def get(self, transport: str, host: str, port: int) -> Flow | None:
        return self._flows.get((transport, host, port))

    def by_token(self, token: str) -> Flow | None:
        """The live flow a token names, or None (never held, or failed since: answer 430)."""
        return self._tokens.get(token)

    def key_of_token(self, token: str) -> FlowKey | None:
        """The flow identity a token names: a flow we hold, or the address inside a genuine UDP token."""
        flow = self._tokens.get(token)
        if flow is not None:
            return flow.key
        address = self.udp_address_of(token)
        return None if address is None else ("udp", *address)

    def resolve(self, token: str, now: float) -> Flow | None:
        """The flow to send a request over: the one we hold, or (UDP only) the flow the token itself
        names, taken back into the table (NAT-pinged from now on, bound again by the phone's next
        REGISTER). None: the flow is gone (a stream connection, a token of another secret): answer 430."""
        flow = self._tokens.get(token)
        if flow is not None:
            return flow
        address = self.udp_address_of(token)
        if address is None or token in self._dead or len(self._flows) >= self.max_flows:
            return None
        host, port = address
        flow = Flow(token, "udp", host, port, created=now, last_seen=now, last_ping=now)
        self._flows[flow.key] = flow
        self._tokens[token] = flow
        self.stats["revived"] += 1
        return flow

    def flow_of(self, aor: str, entry_id: bytes) -> Flow | None:
        """The flow a binding was registered over."""
        return self._bindings.get((aor, entry_id))

    # ------------------------------------------------------------------------------------- changes

    def bind(
        self,
        transport: str,
        host: str,
        port: int,
        now: float,
        *,
        aor: str,
        entry_id: bytes,
        handle: object | None = None,
        instance: str | None = None,
        reg_id: int | None = None,
        outbound: bool = False,
        contact: str | None = None,
    ) -> Flow:
        """A REGISTER for ``(aor, entry_id)`` arrived over this flow: create or refresh the flow, tie the
        binding to it (moving it off the flow it was on before). Raises OverflowError when the table is
        full of other flows (the REGISTER is then answered 503 by the caller)."""
        key = (transport.lower(), host, port)
        flow = self._flows.get(key)
        if flow is None:
            if len(self._flows) >= self.max_flows:
                self.stats["refused"] += 1
                raise OverflowError(f"the flow table is full ({self.max_flows} flows)")
            token = self.token_of(*key)
            self._dead.pop(token, None)
            flow = Flow(token, key[0], host, port, created=now, last_seen=now, handle=handle, last_ping=now)
            self._flows[key] = flow
            self._tokens[token] = flow
            self.stats["created"] += 1
        else:
            flow.last_seen = now
            if handle is not None:
                flow.handle = handle
        flow.outbound = outbound
        if contact is not None:
            flow.contact = contact
        if instance is not None:
            flow.instance, flow.reg_id = instance, reg_id
        binding = (aor, entry_id)
        previous = self._bindings.get(binding)
        if previous is not None and previous is not flow:
            previous.bindings.discard(binding)
            if not previous.bindings:
                self._drop(previous)
        flow.bindings.add(binding)
        self._bindings[binding] = flow
        return flow

    def unbind(self, aor: str, entry_id: bytes) -> None:
        """The binding is gone (expires=0, replaced, expired): a flow left with no binding is forgotten."""
        flow = self._bindings.pop((aor, entry_id), None)
        if flow is not None:
            flow.bindings.discard((aor, entry_id))
            if not flow.bindings:
                self._drop(flow)

    def touch(self, transport: str, host: str, port: int, now: float) -> Flow | None:
        """Something arrived from that remote address: the flow (if we hold one) is alive."""
        flow = self._flows.get((transport, host, port))
        if flow is not None:
            flow.last_seen = now
        return flow

    def closed(self, transport: str, host: str, port: int, why: str = "connection closed") -> Failed | None:
        """A stream connection ended: its flow fails now. Returns what to clean up (or None)."""
        flow = self._flows.get((transport, host, port))
        if flow is None:
            return None
        return self._fail(flow, why)

    def fail(self, flow: Flow, why: str) -> Failed:
        """Declare ``flow`` dead (a send over it failed, say). Returns what to clean up."""
        return self._fail(flow, why)

    def due(self, now: float) -> list[Action]:
        """What must happen now: NAT pings to send and flows that stopped answering."""
        out: list[Action] = []
        for flow in list(self._flows.values()):
            silent = now - flow.last_seen
            if flow.outbound:
                if silent > self.flow_timer + self.grace:
                    why = f"no keep-alive for {silent:.0f} s (Flow-Timer {self.flow_timer})"
                    out.append(self._fail(flow, why))
            elif silent > self.ping_timeout and flow.last_ping > flow.last_seen:
                out.append(self._fail(flow, f"no answer to NAT pings for {silent:.0f} s"))
            elif now - flow.last_ping >= self.ping_interval:
                flow.last_ping = now
                self.stats["pings"] += 1
                out.append(Ping(flow))
        return out

    def next_check(self, now: float) -> float:
        """When :meth:`due` can next have something to do (the adapter's timer): at most 1 s (or half a
        ping interval) away, so a flow bound meanwhile is not left unchecked for long."""
        soonest = now + min(1.0, self.ping_interval / 2)
        for flow in self._flows.values():
            if flow.outbound:
                at = flow.last_seen + self.flow_timer + self.grace
            else:
                at = min(flow.last_ping + self.ping_interval, flow.last_seen + self.ping_timeout)
            soonest = min(soonest, at)
        return max(now, soonest)

    def _fail(self, flow: Flow, why: str) -> Failed:
        bindings = tuple(sorted(flow.bindings))
        for binding in bindings:
            if self._bindings.get(binding) is flow:
                del self._bindings[binding]
        flow.bindings.clear()
        self._drop(flow)
        self._dead[flow.token] = None
        if len(self._dead) > self.max_flows:
            del self._dead[next(iter(self._dead))]
        self.stats["failed"] += 1
        return Failed(flow, bindings, why)

    def _drop(self, flow: Flow) -> None:
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
        if self._tokens.get(flow.token) is flow:
            del self._tokens[flow.token]

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """For ``p2psip status``: one row per flow (no instance ids: a home peer takes them for a device's
        proof of ownership, so they are never shown)."""
        return [
            {
                "flow": f.describe(),
                "outbound": f.outbound,
                "bindings": len(f.bindings),
                "silent_s": round(now - f.last_seen, 1),
            }
            for f in self._flows.values()
        ]


# --------------------------------------------------------------------------------------- keep-alives


@dataclass(frozen=True)
class KeepAlive:
    """Input on a SIP port that is not SIP but a keep-alive: ``reply`` is what to send back (may be empty)."""

    kind: str  # "stun", "crlf-ping", "crlf", "empty"
    reply: bytes = b""


STUN_MAGIC = b"\x21\x12\xa4\x42"


def looks_like_stun(data: bytes) -> bool:
    """RFC 5389 §6: the top two bits are zero and the magic cookie sits at bytes 4-7 (SIP never starts so)."""
    return len(data) >= 20 and data[0] < 0x40 and data[4:8] == STUN_MAGIC


def stun_reply(data: bytes, host: str, port: int) -> bytes | None:
    """The binding success response to a STUN binding request from ``host:port``, or None when ``data``
    is not a well-formed binding request (a response, an indication, garbage: never answered)."""
    from aioice import stun

    try:
        request = stun.parse_message(data)
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        return None
    except Exception:  # aioice's attribute decoders may raise others on crafted input: still garbage
        return None
    if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
        return None
    response = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.RESPONSE,
        transaction_id=request.transaction_id,
    )
    response.attributes["XOR-MAPPED-ADDRESS"] = (host, port)
    if "FINGERPRINT" in request.attributes:
        response.add_fingerprint()
    return bytes(response)


def classify_keepalive(data: bytes, *, stream: bool, host: str = "", port: int = 0) -> KeepAlive | None:
    """What a chunk of non-message input on a SIP port is (see the module docstring); None: SIP or garbage.

    For a datagram, ``data`` is the whole datagram. For a stream, this is only asked of the bytes between
    messages (the framer strips CRLFs itself and counts double-CRLF pings).
    """
    if not data:
        return KeepAlive("empty")
    if data == b"\r\n\r\n":
        return KeepAlive("crlf-ping", b"\r\n" if stream else b"")
    if not data.strip(b"\r\n") and len(data) <= 4:
        return KeepAlive("crlf")
    if not stream and looks_like_stun(data):
        reply = stun_reply(data, host, port)
        return KeepAlive("stun", reply) if reply is not None else None
    return None


def stun_binding_request(transaction_id: bytes | None = None) -> tuple[bytes, bytes]:
    """A STUN binding request (for an outbound client's UDP keep-alive, §4.4.2): (bytes, transaction id)."""
    from aioice import stun

    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, transaction_id=transaction_id)
    message.add_fingerprint()
    return bytes(message), message.transaction_id


def stun_mapped_address(data: bytes, transaction_id: bytes) -> tuple[str, int] | None:
    """The XOR-MAPPED-ADDRESS of a binding success response to ``transaction_id`` (our reflexive
    address as the server saw it), or None when ``data`` is anything else."""
    from aioice import stun

    if not looks_like_stun(data):
        return None
    try:
        message = stun.parse_message(data)
    except Exception:
        return None
    if (
        message.transaction_id != transaction_id
        or message.message_method != stun.Method.BINDING
        or message.message_class != stun.Class.RESPONSE
    ):
        return None
    mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
    if not isinstance(mapped, tuple) or len(mapped) != 2:
        return None
    return str(mapped[0]), int(mapped[1])
