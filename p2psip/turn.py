"""The TURN server of a full peer (RFC 8656): the relay for call audio where no direct path exists.

Why TURN and not a media relay that rewrites SDP: with TURN the relay is only a *candidate*; every ICE
agent (ours, baresip's ``turn`` module, a browser) keeps doing ICE end to end, picks the relay only when
no direct pair works, and SDP is never rewritten (DTLS-SRTP stays untouched by construction).
docs/nat.md says which call takes which path.

This module is the sans-IO core: STUN message handling comes from ``aioice.stun`` (no hand-written STUN
codec), and nothing here owns a socket or reads a clock. The asyncio adapter (:mod:`p2psip.turnserver`)
feeds it datagrams with ``now`` and carries out what it returns:

- :class:`ToClient` — send bytes to a client from the server's listening port;
- :class:`ToPeer` — send bytes to a peer from an allocation's relayed address;
- :class:`OpenRelay` — open a relay socket, then call :meth:`TurnCore.relay_opened` (an allocation is
  granted only once its relayed address exists);
- :class:`CloseRelay` — close an allocation's relay socket.

Credentials are long-term (RFC 8489 §9.2) in the time-limited form coturn calls ``use-auth-secret``
(draft-uberti-behave-turn-rest): the home peer issues ``username = "EXPIRY:USER"`` with
``password = base64(HMAC-SHA1(secret, username))`` (:func:`issue_credentials`) to the phones and UAs it
serves, so no per-user password table exists and a leaked credential dies on its own.

Bounds (:class:`TurnLimits`): allocations in total (beyond: 508 Insufficient Capacity), per user and per
client source address (beyond: 486 Allocation Quota Reached), a lifetime cap, a bandwidth cap per
allocation (datagrams beyond it are dropped and counted). No open reflector: a relay sends only to peers
the allocation's owner permitted (CreatePermission/ChannelBind), and takes in only what such peers send.
Every refusal and drop is counted in :attr:`TurnCore.counters` (``p2psip status``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from aioice import stun

from p2psip.ratelimit import Rate, TokenBuckets

__all__ = [
    "Allocation",
    "CloseRelay",
    "OpenRelay",
    "ToClient",
    "ToPeer",
    "TurnCore",
    "TurnLimits",
    "issue_credentials",
]

Addr = tuple[str, int]

UDP_TRANSPORT = 17  # REQUESTED-TRANSPORT protocol number (RFC 8656 §18.7), in the top byte
PERMISSION_LIFETIME = 300.0  # RFC 8656 §9
CHANNEL_LIFETIME = 600.0  # RFC 8656 §12
NONCE_LIFETIME = 3600.0
CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x4FFF
SOFTWARE = "p2psip"


def issue_credentials(secret: bytes, user: str, now: float, ttl: float = 86400.0) -> tuple[str, str]:
    """Time-limited TURN credentials (username, password) for ``user``, a phone or UA its home peer serves."""
    username = f"{int(now + ttl)}:{user}"
    password = base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()
    return username, password


def _password_for(secret: bytes, username: str, now: float) -> str | None:
    """The password of a time-limited username, or None when it is malformed or expired."""
    expiry, sep, user = username.partition(":")
    if not sep or not user or not expiry.isdigit() or int(expiry) < now:
        return None
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


@dataclass(frozen=True)
class TurnLimits:
    """The bounds of one TURN server (one full peer)."""

    max_allocations: int = 200
    per_user: int = 4
    per_source: int = 4
    max_lifetime: float = 3600.0
    default_lifetime: float = 600.0
    # bytes/s per allocation: a G.711 call is ~10 kB/s each way
    bandwidth: Rate = field(default_factory=lambda: Rate(per_second=64_000.0, burst=32_000.0))
    max_permissions: int = 16  # per allocation: a call needs a handful of peer addresses


@dataclass(frozen=True)
class ToClient:
    client: Addr
    data: bytes


@dataclass(frozen=True)
class ToPeer:
    relay: Addr
    peer: Addr
    data: bytes


@dataclass(frozen=True)
class OpenRelay:
    client: Addr
    token: int  # hand back to relay_opened


@dataclass(frozen=True)
class CloseRelay:
    relay: Addr


Action = ToClient | ToPeer | OpenRelay | CloseRelay


@dataclass
class Allocation:
    """One allocation: a client's 5-tuple, its relayed address, permissions and channels."""

    client: Addr
    user: str
    relay: Addr
    key: bytes
    expires: float
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> expiry
    channels: dict[int, tuple[Addr, float]] = field(default_factory=dict)  # number -> (peer, expiry)
    relayed_packets: int = 0
    relayed_bytes: int = 0

    def channel_of(self, peer: Addr, now: float) -> int | None:
        for number, (addr, expires) in self.channels.items():
            if addr == peer and expires > now:
                return number
        return None

    def permitted(self, host: str, now: float) -> bool:
        return self.permissions.get(host, 0.0) > now


@dataclass
class _Pending:
    client: Addr
    user: str
    key: bytes
    lifetime: float
    request: stun.Message


class TurnCore:
    """Allocations, permissions and channels of one TURN server, fed datagrams with ``now``."""

    def __init__(
        self,
        secret: bytes,
        realm: str = "p2psip",
        limits: TurnLimits | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.secret = secret
        self.realm = realm
        self.limits = limits or TurnLimits()
        self.by_client: dict[Addr, Allocation] = {}
        self.by_relay: dict[Addr, Allocation] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_token = 0
        self._bandwidth = TokenBuckets(
            self.limits.bandwidth, max_keys=max(16, self.limits.max_allocations * 2)
        )
        self._on_change = on_change
        self.counters: dict[str, int] = {
            "allocations_granted": 0,
            "refused_quota": 0,  # 486
            "refused_capacity": 0,  # 508: allocations in all, or permissions of one allocation
            "refused_auth": 0,  # 401 with a bad MESSAGE-INTEGRITY or unknown user
            "refused_other": 0,  # 400, 437, 442, 403 ...
            "dropped_unpermitted": 0,  # peer data without a permission: no open reflector
            "dropped_bandwidth": 0,
            "dropped_malformed": 0,
            "relayed_packets": 0,
            "relayed_bytes": 0,
        }

    # ------------------------------------------------------------------ what the adapter calls

    def from_client(self, data: bytes, client: Addr, now: float) -> list[Action]:
        """A datagram arrived on the listening port from ``client``."""
        if len(data) >= 4 and 0x40 <= data[0] < 0x80:
            return self._channel_data(data, client, now)
        try:
            message = stun.parse_message(data)
        except (ValueError, struct.error, IndexError, KeyError, UnicodeDecodeError):
            self.counters["dropped_malformed"] += 1
            return []
        if message.message_class == stun.Class.INDICATION:
            if message.message_method == stun.Method.SEND:
                return self._send_indication(message, client, now)
            return []
        if message.message_class != stun.Class.REQUEST:
            return []
        if message.message_method == stun.Method.BINDING:
            return [ToClient(client, self._success(message, {"XOR-MAPPED-ADDRESS": client}))]
        handler = {
            stun.Method.ALLOCATE: self._allocate,
            stun.Method.REFRESH: self._refresh,
            stun.Method.CREATE_PERMISSION: self._create_permission,
            stun.Method.CHANNEL_BIND: self._channel_bind,
        }.get(message.message_method)
        if handler is None:
            return [self._error(message, client, 400, "Bad Request")]
        try:
            return handler(message, client, now)
        except (ValueError, TypeError, KeyError, struct.error):
            self.counters["refused_other"] += 1
            return [self._error(message, client, 400, "Bad Request")]

    def from_peer(self, relay: Addr, data: bytes, peer: Addr, now: float) -> list[Action]:
        """A datagram arrived from ``peer`` on the relayed address ``relay``."""
        allocation = self.by_relay.get(relay)
        if allocation is None or allocation.expires <= now:
            return []
        if not self._account(allocation, peer[0], len(data), now):
            return []
        channel = allocation.channel_of(peer, now)
        if channel is not None:
            frame = struct.pack("!HH", channel, len(data)) + data + bytes(stun.padding_length(len(data)))
            return [ToClient(allocation.client, frame)]
        indication = stun.Message(stun.Method.DATA, stun.Class.INDICATION)
        indication.attributes["XOR-PEER-ADDRESS"] = peer
        indication.attributes["DATA"] = data
        return [ToClient(allocation.client, bytes(indication))]

    def relay_opened(self, token: int, relay: Addr | None, now: float) -> list[Action]:
        """The adapter opened (``relay``) or failed to open (None) the relay socket of a pending Allocate."""
        pending = self._pending.pop(token, None)
        if pending is None:
            return [CloseRelay(relay)] if relay is not None else []
        if relay is None:
            self.counters["refused_capacity"] += 1
            return [self._error(pending.request, pending.client, 508, "Insufficient Capacity", pending.key)]
        allocation = Allocation(pending.client, pending.user, relay, pending.key, now + pending.lifetime)
        self.by_client[pending.client] = allocation
        self.by_relay[relay] = allocation
        self.counters["allocations_granted"] += 1
        self._changed()
        attrs = {
            "XOR-RELAYED-ADDRESS": relay,
            "LIFETIME": int(pending.lifetime),
            "XOR-MAPPED-ADDRESS": pending.client,
        }
        return [ToClient(pending.client, self._success(pending.request, attrs, pending.key))]

    def expire(self, now: float) -> list[Action]:
        """Drop expired allocations, permissions and channels; call it about once a second."""
        actions: list[Action] = []
        for allocation in list(self.by_client.values()):
            if allocation.expires <= now:
                actions.extend(self._delete(allocation))
                continue
            for host, expires in list(allocation.permissions.items()):
                if expires <= now:
                    del allocation.permissions[host]
            for number, (_, expires) in list(allocation.channels.items()):
                # A channel's number stays bound for 5 more minutes after it expires (RFC 8656 §12).
                if expires + 300.0 <= now:
                    del allocation.channels[number]
        return actions

    def close_user(self, user: str) -> list[Action]:
        """Tear down every allocation of ``user`` (its dialog ended, its credentials were withdrawn)."""
        actions: list[Action] = []
        for allocation in [a for a in self.by_client.values() if a.user == user]:
            actions.extend(self._delete(allocation))
        return actions

    def stats(self) -> dict[str, int]:
        """Counters plus the allocations alive now: what ``p2psip status`` shows."""
        return {**self.counters, "allocations": len(self.by_client), "pending": len(self._pending)}

    # ------------------------------------------------------------------ requests

    def _authenticate(self, message: stun.Message, client: Addr, now: float) -> tuple[str, bytes] | ToClient:
        """(user, key) of an authenticated request, or the error that asks for (better) credentials."""
        username = message.attributes.get("USERNAME")
        nonce = message.attributes.get("NONCE")
        if (
            not isinstance(username, str)
            or not isinstance(nonce, bytes)
            or "MESSAGE-INTEGRITY" not in message.attributes
        ):
            return self._challenge(message, client, now, 401, "Unauthorized")
        if not self._nonce_valid(nonce, client, now):
            return self._challenge(message, client, now, 438, "Stale Nonce")
        password = _password_for(self.secret, username, now)
        key = hashlib.md5(f"{username}:{self.realm}:{password}".encode()).digest() if password else b""
        if password is None or not message.check_message_integrity(key):
            self.counters["refused_auth"] += 1
            return self._challenge(message, client, now, 401, "Unauthorized")
        return username.partition(":")[2], key

    def _allocate(self, message: stun.Message, client: Addr, now: float) -> list[Action]:
        auth = self._authenticate(message, client, now)
        if isinstance(auth, ToClient):
            return [auth]
        user, key = auth
        existing = self.by_client.get(client)
        if existing is not None:
            # A retransmitted Allocate gets the same answer; anything else is a mismatch (RFC 8656 §7.2).
            self.counters["refused_other"] += 1
            return [self._error(message, client, 437, "Allocation Mismatch", key)]
        if any(p.client == client for p in self._pending.values()):
            return []
        transport = message.attributes.get("REQUESTED-TRANSPORT")
        if not isinstance(transport, int):
            self.counters["refused_other"] += 1
            return [self._error(message, client, 400, "Bad Request", key)]
        if transport >> 24 != UDP_TRANSPORT:
            self.counters["refused_other"] += 1
            return [self._error(message, client, 442, "Unsupported Transport Protocol", key)]
        live = list(self.by_client.values()) + [  # pending allocations count against the quotas too
            Allocation(p.client, p.user, ("", 0), b"", 0.0) for p in self._pending.values()
        ]
        if len(live) >= self.limits.max_allocations:
            self.counters["refused_capacity"] += 1
            return [self._error(message, client, 508, "Insufficient Capacity", key)]
        if (
            sum(1 for a in live if a.user == user) >= self.limits.per_user
            or sum(1 for a in live if a.client[0] == client[0]) >= self.limits.per_source
        ):
            self.counters["refused_quota"] += 1
            return [self._error(message, client, 486, "Allocation Quota Reached", key)]
        token = self._next_token
        self._next_token += 1
        self._pending[token] = _Pending(client, user, key, self._lifetime(message), message)
        return [OpenRelay(client, token)]

    def _owned(self, message: stun.Message, client: Addr, now: float) -> Allocation | ToClient:
        auth = self._authenticate(message, client, now)
        if isinstance(auth, ToClient):
            return auth
        allocation = self.by_client.get(client)
        if allocation is None or allocation.expires <= now or allocation.user != auth[0]:
            self.counters["refused_other"] += 1
            return self._error(message, client, 437, "Allocation Mismatch", auth[1])
        return allocation

    def _refresh(self, message: stun.Message, client: Addr, now: float) -> list[Action]:
        allocation = self._owned(message, client, now)
        if isinstance(allocation, ToClient):
            return [allocation]
        lifetime = self._lifetime(message)
        if lifetime <= 0:
            response = self._success(message, {"LIFETIME": 0}, allocation.key)
            return [*self._delete(allocation), ToClient(client, response)]
        allocation.expires = now + lifetime
        return [ToClient(client, self._success(message, {"LIFETIME": int(lifetime)}, allocation.key))]

    def _permit(self, allocation: Allocation, host: str, now: float) -> bool:
        if host not in allocation.permissions and len(allocation.permissions) >= self.limits.max_permissions:
            return False
        allocation.permissions[host] = now + PERMISSION_LIFETIME
        return True

    def _create_permission(self, message: stun.Message, client: Addr, now: float) -> list[Action]:
        allocation = self._owned(message, client, now)
        if isinstance(allocation, ToClient):
            return [allocation]
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        if not isinstance(peer, tuple):
            self.counters["refused_other"] += 1
            return [self._error(message, client, 400, "Bad Request", allocation.key)]
        if not self._permit(allocation, peer[0], now):
            self.counters["refused_capacity"] += 1
            return [self._error(message, client, 508, "Insufficient Capacity", allocation.key)]
        return [ToClient(client, self._success(message, {}, allocation.key))]

    def _channel_bind(self, message: stun.Message, client: Addr, now: float) -> list[Action]:
        allocation = self._owned(message, client, now)
        if isinstance(allocation, ToClient):
            return [allocation]
        number = message.attributes.get("CHANNEL-NUMBER")
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        if (
            not isinstance(number, int)
            or not isinstance(peer, tuple)
            or not CHANNEL_MIN <= number <= CHANNEL_MAX
        ):
            self.counters["refused_other"] += 1
            return [self._error(message, client, 400, "Bad Request", allocation.key)]
        bound = allocation.channels.get(number)
        other = allocation.channel_of(peer, now)
        if (bound is not None and bound[0] != peer) or (other is not None and other != number):
            # A number is bound to one peer, a peer to one number (RFC 8656 §12.2).
            self.counters["refused_other"] += 1
            return [self._error(message, client, 400, "Bad Request", allocation.key)]
        if not self._permit(allocation, peer[0], now):
            self.counters["refused_capacity"] += 1
            return [self._error(message, client, 508, "Insufficient Capacity", allocation.key)]
        allocation.channels[number] = (peer, now + CHANNEL_LIFETIME)
        return [ToClient(client, self._success(message, {}, allocation.key))]

    # ------------------------------------------------------------------ data from the client

    def _send_indication(self, message: stun.Message, client: Addr, now: float) -> list[Action]:
        allocation = self.by_client.get(client)
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        data = message.attributes.get("DATA")
        if (
            allocation is None
            or allocation.expires <= now
            or not isinstance(peer, tuple)
            or not isinstance(data, bytes)
        ):
            return []
        if not self._account(allocation, peer[0], len(data), now):
            return []
        return [ToPeer(allocation.relay, peer, data)]

    def _channel_data(self, data: bytes, client: Addr, now: float) -> list[Action]:
        allocation = self.by_client.get(client)
        number, length = struct.unpack("!HH", data[:4])
        if allocation is None or allocation.expires <= now or len(data) < 4 + length:
            self.counters["dropped_malformed"] += 1
            return []
        bound = allocation.channels.get(number)
        payload = data[4 : 4 + length]
        if bound is None or bound[1] <= now:
            self.counters["dropped_unpermitted"] += 1
            return []
        if not self._account(allocation, bound[0][0], len(payload), now):
            return []
        return [ToPeer(allocation.relay, bound[0], payload)]

    # ------------------------------------------------------------------ helpers

    def _account(self, allocation: Allocation, host: str, size: int, now: float) -> bool:
        """Whether ``size`` bytes to or from ``host`` may pass: permitted (no open reflector), in budget."""
        if not allocation.permitted(host, now):
            self.counters["dropped_unpermitted"] += 1
            return False
        if not self._bandwidth.allow(allocation.relay, now, cost=float(size)):
            self.counters["dropped_bandwidth"] += 1
            return False
        allocation.relayed_packets += 1
        allocation.relayed_bytes += size
        self.counters["relayed_packets"] += 1
        self.counters["relayed_bytes"] += size
        return True

    def _delete(self, allocation: Allocation) -> list[Action]:
        self.by_client.pop(allocation.client, None)
        self.by_relay.pop(allocation.relay, None)
        self._bandwidth.forget(allocation.relay)
        self._changed()
        return [CloseRelay(allocation.relay)]

    def _lifetime(self, message: stun.Message) -> float:
        asked = message.attributes.get("LIFETIME")
        if not isinstance(asked, int):
            return self.limits.default_lifetime
        if asked == 0:
            return 0.0
        return float(min(max(asked, self.limits.default_lifetime), self.limits.max_lifetime))

    def _nonce(self, client: Addr, now: float) -> bytes:
        stamp = f"{int(now):x}"
        text = f"{stamp}|{client[0]}|{client[1]}".encode()
        mac = hmac.new(self.secret, text, hashlib.sha256).hexdigest()[:24]
        return f"{stamp}-{mac}".encode()

    def _nonce_valid(self, nonce: bytes, client: Addr, now: float) -> bool:
        stamp, _, _ = nonce.partition(b"-")
        try:
            issued = int(stamp, 16)
        except ValueError:
            return False
        if not 0 <= now - issued <= NONCE_LIFETIME:
            return False
        return hmac.compare_digest(nonce, self._nonce(client, float(issued)))

    def _challenge(self, message: stun.Message, client: Addr, now: float, code: int, reason: str) -> ToClient:
        response = stun.Message(
            message.message_method, stun.Class.ERROR, transaction_id=message.transaction_id
        )
        response.attributes["ERROR-CODE"] = (code, reason)
        response.attributes["REALM"] = self.realm
        response.attributes["NONCE"] = self._nonce(client, now)
        response.attributes["SOFTWARE"] = SOFTWARE
        return ToClient(client, bytes(response))

    def _error(
        self, message: stun.Message, client: Addr, code: int, reason: str, key: bytes | None = None
    ) -> ToClient:
        response = stun.Message(
            message.message_method, stun.Class.ERROR, transaction_id=message.transaction_id
        )
        response.attributes["ERROR-CODE"] = (code, reason)
        response.attributes["SOFTWARE"] = SOFTWARE
        if key:
            response.add_message_integrity(key)
        return ToClient(client, bytes(response))

    def _success(self, message: stun.Message, attrs: dict[str, object], key: bytes | None = None) -> bytes:
        response = stun.Message(
            message.message_method, stun.Class.RESPONSE, transaction_id=message.transaction_id
        )
        response.attributes.update(attrs)
        response.attributes["SOFTWARE"] = SOFTWARE
        if key:
            response.add_message_integrity(key)
        return bytes(response)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
