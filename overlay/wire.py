"""The overlay wire format: msgpack maps checked field by field against per-type schemas.

Every message is ``{"v": 1, "ov": overlay, "t": type, "id": u64, "src": 16 bytes, "ep": [host, port],
...body}``. Requests are validated against the schema of their type; replies (``ok`` / ``err``) echo the
request id, and the fields of an ``ok`` reply are checked against one table of reply fields shared by all
types, so a datagram can be validated completely without knowing which request it answers. Anything that
does not fit (unknown type or field, wrong type, oversized, other overlay, other major version, trailing
bytes) raises ``WireError``: the receive path drops it and counts it, it never reaches a protocol core.

Schemas use a small type vocabulary; decoded values are converted to what the cores use:

=========  ====================================  =====================================
type       on the wire                           in Python
=========  ====================================  =====================================
id         16 bytes                              int in [0, 2**128)
ep         [host str, port]                      (host, port)
node       [id, host, port]                      chord.NodeRef(id, host, port)
nodes      list of node (at most 16)             list of NodeRef
u64        unsigned int < 2**64                  int
bytes      bin (at most 128 bytes)               bytes
str        str (UTF-8)                           str
bool       bool                                  bool
entry      [key, entry_id, value, seq,           storage.Entry
           lifetime_s, owner, signature, cert]
entries    list of entry + [remaining ms]        list of (Entry, remaining ms)
=========  ====================================  =====================================

A field type ending in ``?`` is optional (absent or nil).

UDP datagrams stay under 1,200 bytes (no IP fragmentation on any sane path); bigger messages go over TCP
framed by a 4-byte big-endian length, at most 1 MiB.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from overlay.chord import CHORD_MESSAGES, MAX_BYTES, MAX_NODES, NodeRef
from overlay.errors import WireError
from overlay.identity import MAX_CERT
from overlay.ids import ID_BYTES, RING
from overlay.storage import Entry

VERSION = 1
UDP_MAX = 1199
TCP_MAX = 1 << 20
MAX_HOST = 255
U64 = 1 << 64

FIELD_TYPES = frozenset(
    {"id", "ep", "node", "nodes", "u64", "bytes", "str", "bool", "entry", "entries", "cert"}
)
ENVELOPE_KEYS = frozenset({"v", "ov", "t", "id", "src", "ep"})
REPLY_TYPES = frozenset({"ok", "err"})

Schema = Mapping[str, str]

# Storage messages (this module's own); routing types (ping ... leave) come from overlay.chord.
STORAGE_MESSAGES: dict[str, Schema] = {
    # A client (or the primary forwarding to a replica, ``replica`` true) asks a node to keep an entry.
    # ``fanout``: the writer sends the copies to the replicas itself (overlay.node's writer fan-out): the
    # primary keeps and checks the entry, answers at once and forwards nothing.
    "store": {"entry": "entry", "replica": "bool?", "fanout": "bool?"},
    # All live entries under a key (tombstones excluded). ``replica``: answer from whatever this node
    # holds, responsible or not (a new primary asks its successor while its hand-off is in flight).
    # ``owner`` (with ``replica``): the reader takes this node for the key's responsible node (its lookup
    # or owner cache said so); a node that is not answers ``err 421`` instead, so a stale view of the
    # ring is found out on a read as a write finds it out (the reader looks the key up again).
    "fetch": {"key": "id", "replica": "bool?", "owner": "bool?"},
    # Bulk hand-off of entries (join, leave, repair); ``entries`` carry their remaining lifetime.
    # ``announce``: a restarted node hands over what it held; the receiver passes on what is new to it.
    "transfer": {"entries": "entries", "announce": "bool?"},
    # Repair by digest: the sender's records of (lo, hi] (lo absent: the whole ring) as one 8-byte sum per
    # bucket (overlay.storage.range_digest); answered with ``differ``, the buckets the receiver sees differ.
    "digest": {"lo": "id?", "hi": "id", "sums": "bytes"},
}

# Fields that may appear in an ``ok`` reply to a storage request, and in ``err``.
STORAGE_REPLY_FIELDS: dict[str, str] = {
    "entries": "entries",
    "stored": "u64",
    # a store's primary: the copies it sent for (1 + replicas), for the writer's write quorum
    "wanted": "u64?",
    # a fetch reply cut to fit one TCP frame: more entries exist than were sent
    "truncated": "bool?",
    # a digest reply: bitmap of the buckets whose records differ (bit i of byte i // 8)
    "differ": "bytes?",
}
# Reachability (docs/nat.md, overlay.reach): a joining node asks its bootstrap which address it sees the
# node at and whether another member reaches it there ("probe": ``target`` the address to probe, absent: the
# observed one); the bootstrap has another member try ("reach": ping ``node`` at its endpoint, expecting
# that NodeId to answer).
REACH_MESSAGES: dict[str, Schema] = {
    "probe": {"target": "ep?", "cert": "cert?"},  # cert: the joiner's node certificate (docs/security.md)
    "reach": {"node": "node"},
}
REACH_REPLY_FIELDS: dict[str, str] = {
    "seen": "ep?",  # probe: the source address the bootstrap saw the probe come from
    "reachable": "bool?",  # probe, reach: the other member's ping was answered (absent: nobody to ask)
    "by": "node?",  # probe: the member that tried
    "service": "ep?",  # attach: the attach peer's application (SIP) address for its client peers
}
# Client peers (docs/nat.md, overlay.attach): a node nobody reaches keeps a flow to a full peer with
# ``attach`` keep-alives (answered with ``seen`` and the attach peer's successors, ``nodes``, as fallbacks)
# and has it store and read for it. ``relay_store`` carries an entry signed by its writer (the replicas check
# it as always); ``relay_fetch`` answers with the live entries under ``key``, ``relay_lookup`` with the node
# responsible for it. ``detach``: a client peer that
# stops says so, and its attach peer forgets it at once (no fields: who is the envelope's NodeId, heeded only
# from the address that client's keep-alives come from).
ATTACH_MESSAGES: dict[str, Schema] = {
    "attach": {"cert": "cert?"},
    "detach": {},
    "relay_store": {"entry": "entry"},
    "relay_fetch": {"key": "id"},
    "relay_lookup": {"key": "id"},  # answered with ``node``: the node responsible for ``key``
}
ERR_FIELDS: dict[str, str] = {"code": "u64", "reason": "str", "detail": "str?"}
E_WRONG_OVERLAY = 409
"""``err`` code of the answer to a request of another overlay: ``reason`` ``wrong-overlay``, ``detail`` the
overlay name this node serves (see :meth:`Codec.wrong_overlay_reply`)."""


def overlay_schemas() -> tuple[dict[str, Schema], dict[str, str]]:
    """Request schemas and ok-reply fields of the whole protocol: chord routing, storage, reachability,
    client peers."""
    requests: dict[str, Schema] = {name: spec.request for name, spec in CHORD_MESSAGES.items()}
    replies: dict[str, str] = {}
    for spec in CHORD_MESSAGES.values():
        for fname, ftype in spec.reply.items():
            if fname in replies and replies[fname].rstrip("?") != ftype.rstrip("?"):
                raise ValueError(f"chord reply field {fname!r} typed both {replies[fname]} and {ftype}")
            replies[fname] = ftype
    for fname, ftype in (STORAGE_REPLY_FIELDS | REACH_REPLY_FIELDS).items():
        if fname in replies and replies[fname].rstrip("?") != ftype.rstrip("?"):
            raise ValueError(f"reply field {fname!r} means {replies[fname]} to chord and {ftype} to storage")
        replies[fname] = ftype
    for name in [*STORAGE_MESSAGES, *REACH_MESSAGES, *ATTACH_MESSAGES]:
        if name in requests:
            raise ValueError(f"message type {name!r} defined twice")
    requests.update(STORAGE_MESSAGES)
    requests.update(REACH_MESSAGES)
    requests.update(ATTACH_MESSAGES)
    return requests, replies


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded, validated overlay message. ``body`` holds the converted fields of its schema."""

    type: str
    id: int
    src: int
    ep: tuple[str, int]
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def is_reply(self) -> bool:
        return self.type in REPLY_TYPES


class Codec:
    """Encoder/decoder for one overlay name with a fixed set of request types.

    ``requests`` maps each request type to its body schema; ``reply_fields`` types every field an ``ok``
    reply may carry. A reply field name must mean the same thing for every request type.
    """

    def __init__(
        self,
        overlay_name: str,
        requests: Mapping[str, Schema] | None = None,
        reply_fields: Mapping[str, str] | None = None,
    ) -> None:
        if not overlay_name or len(overlay_name) > 64:
            raise ValueError("an overlay name is 1 to 64 characters")
        self.overlay_name = overlay_name
        self.requests: dict[str, dict[str, str]] = {}
        self.reply_fields: dict[str, str] = {}
        # per message type: each field's base type and whether it may be absent, and the required fields
        # (worked out once, not per field of every message: ~10 string tests per reply, issue 19)
        self._plans: dict[str, tuple[dict[str, tuple[str, bool]], tuple[str, ...]]] = {}
        default_requests, default_replies = overlay_schemas()
        for name, schema in (requests if requests is not None else default_requests).items():
            self.add_request(name, schema)
        for name, ftype in (reply_fields if reply_fields is not None else default_replies).items():
            self.add_reply_field(name, ftype)

    def add_request(self, name: str, schema: Schema) -> None:
        if name in REPLY_TYPES or name in self.requests:
            raise ValueError(f"message type {name!r} defined twice")
        for fname, ftype in schema.items():
            _check_type_name(ftype)
            if fname in ENVELOPE_KEYS:
                raise ValueError(f"field {fname!r} of {name!r} clashes with the envelope")
        self.requests[name] = dict(schema)
        self._plans.clear()

    def add_reply_field(self, name: str, ftype: str) -> None:
        _check_type_name(ftype)
        if name in ENVELOPE_KEYS or name in ERR_FIELDS:
            raise ValueError(f"reply field {name!r} clashes with the envelope or err fields")
        old = self.reply_fields.get(name)
        if old is not None and old.rstrip("?") != ftype.rstrip("?"):
            raise ValueError(f"reply field {name!r} typed both {old} and {ftype}")
        self.reply_fields[name] = ftype if ftype.endswith("?") else ftype + "?"
        self._plans.clear()

    # --- encoding ---------------------------------------------------------------------------------

    def encode(self, msg: Message, *, max_size: int = UDP_MAX) -> bytes:
        """The msgpack bytes of ``msg``; ``WireError`` if it breaks its schema or exceeds ``max_size``."""
        fields, required = self._plan_of(msg.type)
        out: dict[str, Any] = {
            "v": VERSION,
            "ov": self.overlay_name,
            "t": msg.type,
            "id": msg.id,
            "src": _id_out(msg.src),
            "ep": [msg.ep[0], msg.ep[1]],
        }
        body = msg.body
        for name, value in body.items():
            plan = fields.get(name)
            if plan is None:
                raise WireError(f"{msg.type}: unknown field {name!r}")
            if value is None:
                if not plan[1]:
                    raise WireError(f"{msg.type}: field {name!r} is required")
                continue
            out[name] = _to_wire(plan[0], value)
        for name in required:
            if name not in body:
                raise WireError(f"{msg.type}: missing field {name!r}")
        if not 0 <= msg.id < U64:
            raise WireError("request id out of range")
        data = bytes(msgpack.packb(out, use_bin_type=True))
        if len(data) > max_size:
            raise WireError(f"{msg.type} message of {len(data)} bytes exceeds the limit of {max_size}")
        return data

    def wrong_overlay_reply(
        self, data: bytes, src: int, ep: tuple[str, int]
    ) -> tuple[bytes, tuple[str, int]]:
        """The answer to ``data``, a request that :meth:`decode` refused as belonging to another overlay:
        an ``err`` in *that* overlay's name (so its sender can decode it) saying which overlay this node
        serves, and where to send it (the endpoint the request claims). A peer started with the wrong
        ``--overlay-name`` then learns why at once instead of waiting out its join timeout.

        Strict: only a well-formed envelope of this protocol version, for a request type this codec knows,
        gets an answer (``WireError`` otherwise); the answer is smaller than a request, so it amplifies
        nothing, and the caller still checks that the claimed endpoint is where the datagram came from."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_map_len=64, max_ext_len=0)
        except Exception as exc:
            raise WireError(f"not a msgpack message: {type(exc).__name__}") from None
        if not isinstance(raw, dict) or type(raw.get("v")) is not int or raw.get("v") != VERSION:
            raise WireError("not a request of this protocol version")
        theirs = raw.get("ov")
        if not isinstance(theirs, str) or not 0 < len(theirs) <= 64 or theirs == self.overlay_name:
            raise WireError("no other overlay named")
        if raw.get("t") not in self.requests:
            raise WireError("not a request")
        mid = _from_wire("u64", raw.get("id"), "id")
        _from_wire("id", raw.get("src"), "src")
        to = _from_wire("ep", raw.get("ep"), "ep")
        answer = {
            "v": VERSION,
            "ov": theirs,
            "t": "err",
            "id": mid,
            "src": _id_out(src),
            "ep": [ep[0], ep[1]],
            "code": E_WRONG_OVERLAY,
            "reason": "wrong-overlay",
            "detail": self.overlay_name,
        }
        return bytes(msgpack.packb(answer, use_bin_type=True)), to

    # --- decoding ---------------------------------------------------------------------------------

    def decode(self, data: bytes, *, max_size: int = UDP_MAX) -> Message:
        """Validate ``data`` completely and return the message; ``WireError`` for anything else.

        ``error_kind(exc)`` tells the receive path which counter to bump.
        """
        if len(data) > max_size:
            raise _kind("oversized", f"message of {len(data)} bytes exceeds the limit of {max_size}")
        try:
            raw = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_bin_len=max_size,
                max_str_len=max_size,
                max_array_len=max_size,
                max_map_len=64,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, UnicodeError ...)
            raise WireError(f"not a msgpack message: {type(exc).__name__}") from None
        if not isinstance(raw, dict):
            raise WireError("a message is a msgpack map")
        version = raw.get("v")
        if type(version) is not int or version != VERSION:
            raise _kind("foreign", f"unsupported protocol version {str(version)[:16]}")
        if raw.get("ov") != self.overlay_name:
            raise _kind("foreign", "message for another overlay")
        mtype = raw.get("t")
        if not isinstance(mtype, str):
            raise WireError("message type missing")
        try:
            fields, required = self._plan_of(mtype)
        except WireError as exc:
            raise _kind("unknown-type", str(exc)) from None
        mid = _from_wire("u64", raw.get("id"), "id")
        src = _from_wire("id", raw.get("src"), "src")
        ep = _from_wire("ep", raw.get("ep"), "ep")
        body: dict[str, Any] = {}
        for name, value in raw.items():
            if name in ENVELOPE_KEYS:
                continue
            plan = fields.get(name)
            if plan is None:
                raise WireError(f"{mtype}: unknown field {name!r}")
            if value is None and plan[1]:
                continue
            body[name] = _from_wire(plan[0], value, name)
        for name in required:
            if name not in body:
                raise WireError(f"{mtype}: missing field {name!r}")
        return Message(mtype, mid, src, ep, body)

    def _plan_of(self, mtype: str) -> tuple[dict[str, tuple[str, bool]], tuple[str, ...]]:
        plan = self._plans.get(mtype)
        if plan is None:
            schema = self._schema_of(mtype)
            fields = {name: (ftype.rstrip("?"), ftype.endswith("?")) for name, ftype in schema.items()}
            plan = (fields, tuple(name for name, (_, optional) in fields.items() if not optional))
            self._plans[mtype] = plan
        return plan

    def _schema_of(self, mtype: str) -> Mapping[str, str]:
        if mtype == "ok":
            return self.reply_fields
        if mtype == "err":
            return ERR_FIELDS
        schema = self.requests.get(mtype)
        if schema is None:
            raise WireError(f"unknown message type {mtype[:32]!r}")
        return schema


def _kind(kind: str, message: str) -> WireError:
    exc = WireError(message)
    exc.kind = kind  # type: ignore[attr-defined]
    return exc


def error_kind(exc: WireError) -> str:
    """Why a message was refused: ``oversized``, ``foreign`` (other overlay or version),
    ``unknown-type`` or ``malformed``."""
    kind = getattr(exc, "kind", "malformed")
    return kind if isinstance(kind, str) else "malformed"


def _check_type_name(ftype: str) -> None:
    if ftype.rstrip("?") not in FIELD_TYPES:
        raise ValueError(f"unknown field type {ftype!r}")


# --- per-type conversion ------------------------------------------------------------------------------


def _id_out(value: int) -> bytes:
    if not isinstance(value, int) or not 0 <= value < RING:
        raise WireError("an id is an int in [0, 2**128)")
    return value.to_bytes(ID_BYTES, "big")


def _port(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value <= 65535:
        raise WireError(f"{name}: bad port")
    return value


def _host(value: object, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_HOST:
        raise WireError(f"{name}: bad host")
    return value


def _to_wire(ftype: str, value: Any) -> Any:
    if ftype == "id":
        return _id_out(value)
    if ftype == "ep":
        return [value[0], value[1]]
    if ftype == "node":
        return [_id_out(value[0]), value[1], value[2]]
    if ftype == "nodes":
        if len(value) > MAX_NODES:
            raise WireError(f"at most {MAX_NODES} nodes per message")
        return [[_id_out(n[0]), n[1], n[2]] for n in value]
    if ftype == "entry":
        return value.to_wire()
    if ftype == "entries":
        return [[*entry.to_wire(), int(remaining_ms)] for entry, remaining_ms in value]
    if ftype == "u64":
        if type(value) is not int or not 0 <= value < U64:
            raise WireError("u64 out of range")
        return value
    if ftype == "bytes":
        if len(value) > MAX_BYTES:
            raise WireError(f"bytes fields are at most {MAX_BYTES} bytes")
        return bytes(value)
    if ftype == "cert":
        if len(value) > MAX_CERT:
            raise WireError(f"a certificate is at most {MAX_CERT} bytes")
        return bytes(value)
    if ftype == "bool":
        return bool(value)
    return str(value)


def _from_wire(ftype: str, value: Any, name: str) -> Any:
    if ftype == "id":
        if not isinstance(value, bytes) or len(value) != ID_BYTES:
            raise WireError(f"{name}: an id is {ID_BYTES} bytes")
        return int.from_bytes(value, "big")
    if ftype == "u64":
        if type(value) is not int or not 0 <= value < U64:
            raise WireError(f"{name}: not an unsigned 64-bit integer")
        return value
    if ftype == "bytes":
        if not isinstance(value, bytes) or len(value) > MAX_BYTES:
            raise WireError(f"{name}: not bytes of at most {MAX_BYTES}")
        return value
    if ftype == "cert":
        if not isinstance(value, bytes) or len(value) > MAX_CERT:
            raise WireError(f"{name}: not a certificate of at most {MAX_CERT} bytes")
        return value
    if ftype == "str":
        if not isinstance(value, str):
            raise WireError(f"{name}: not a string")
        return value
    if ftype == "bool":
        if type(value) is not bool:
            raise WireError(f"{name}: not a bool")
        return value
    if ftype == "ep":
        if not isinstance(value, list) or len(value) != 2:
            raise WireError(f"{name}: an endpoint is [host, port]")
        return (_host(value[0], name), _port(value[1], name))
    if ftype == "node":
        return _node(value, name)
    if ftype == "nodes":
        if not isinstance(value, list) or len(value) > MAX_NODES:
            raise WireError(f"{name}: a node list has at most {MAX_NODES} nodes")
        return [_node(n, name) for n in value]
    if ftype == "entry":
        return _entry(value, name, 8)
    if ftype == "entries":
        if not isinstance(value, list):
            raise WireError(f"{name}: not a list of entries")
        out = []
        for item in value:
            entry = _entry(item, name, 9)
            remaining = item[8]
            if type(remaining) is not int or not 0 <= remaining < U64:
                raise WireError(f"{name}: bad remaining lifetime")
            out.append((entry, remaining))
        return out
    raise WireError(f"{name}: unknown field type {ftype}")  # unreachable: types are checked at registration


def _node(value: Any, name: str) -> NodeRef:
    # the hot path of routing replies (up to 16 per message): checks inlined
    if type(value) is not list or len(value) != 3:
        raise WireError(f"{name}: a node is [id, host, port]")
    ident, host, port = value
    if (
        type(ident) is not bytes
        or len(ident) != ID_BYTES
        or type(host) is not str
        or not 0 < len(host) <= MAX_HOST
        or type(port) is not int
        or not 0 <= port <= 65535
    ):
        raise WireError(f"{name}: a node is [16-byte id, host, port]")
    return NodeRef(int.from_bytes(ident, "big"), host, port)


def _blob(value: Any, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise WireError(f"{name}: not bytes")
    return value


def _entry(value: Any, name: str, length: int) -> Entry:
    if not isinstance(value, list) or len(value) != length:
        raise WireError(f"{name}: an entry is an array of {length}")
    key, entry_id, val, seq, lifetime, owner, sig, cert = value[:8]
    try:
        return Entry(
            key=_from_wire("id", key, name),
            entry_id=_blob(entry_id, name),
            value=_blob(val, name),
            seq=_from_wire("u64", seq, name),
            lifetime_s=_from_wire("u64", lifetime, name),
            owner=_blob(owner, name),
            signature=_blob(sig, name),
            cert=_blob(cert, name),
        )
    except ValueError as exc:
        raise WireError(f"{name}: {exc}") from None


# --- TCP framing ------------------------------------------------------------------------------------

_LEN = struct.Struct(">I")


def frame(payload: bytes) -> bytes:
    """A TCP frame: 4-byte big-endian length, then the payload (at most 1 MiB)."""
    if len(payload) > TCP_MAX:
        raise WireError(f"frame of {len(payload)} bytes exceeds the limit of {TCP_MAX}")
    return _LEN.pack(len(payload)) + payload


class FrameDecoder:
    """Sans-IO splitter of a TCP byte stream into frames; an oversized length is a ``WireError``."""

    def __init__(self, max_size: int = TCP_MAX) -> None:
        self._buf = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > self._max:
                raise WireError(f"frame of {size} bytes announced, limit {self._max}")
            if len(self._buf) < 4 + size:
                break
            frames.append(bytes(self._buf[4 : 4 + size]))
            del self._buf[: 4 + size]
        return frames
