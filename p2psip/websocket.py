"""SIP over WebSocket (RFC 7118), sans-IO: the handshake and framing rules of one connection.

This module is the glue between :mod:`wsproto` (RFC 6455 framing and the HTTP/1.1 upgrade, which we do not
write by hand) and what RFC 7118 asks of a SIP WebSocket server or client:

- the sub-protocol is ``sip`` (§4); a client that does not offer it is refused with 426/400, a server
  that does not select it is dropped;
- one SIP message per text or binary frame-sequence (§5.1); a message is handed up only when complete,
  and never larger than ``max_message`` bytes (close code 1009 otherwise);
- a browser's ``Origin`` is checked against an allow-list on the handshake (any web page can open
  ``ws://127.0.0.1:PORT``, so the default admits only loopback pages and the peer's own web origin);
- ping/pong keep-alives driven by :meth:`WSEndpoint.tick` with the time passed in (no clock here): a
  connection that does not answer a ping before the next one is due is closed (1001 "going away").

It never touches a socket: :meth:`feed` takes bytes and returns a :class:`WSResult` (bytes to write,
complete messages, whether to close the transport, what went wrong); the asyncio adapter in
:mod:`p2psip.transport` owns the connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

SUBPROTOCOL = "sip"

# RFC 6455 §7.4.1 close codes used here.
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
TOO_BIG = 1009


def is_loopback_origin(origin: str) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) is a page served from this machine's loopback."""
    try:
        host = urlsplit(origin).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OriginPolicy:
    """Which ``Origin`` headers the WebSocket handshake admits.

    ``allowed`` are exact origins (``http://127.0.0.1:8080``, compared lower-case, no trailing slash);
    ``"*"`` admits every origin. ``loopback`` admits any page served from a loopback address. A handshake
    without ``Origin`` comes from a non-browser client (another SIP server, a script): browsers always send
    one, and a non-browser could forge any, so the header protects browsers' users only and is not required.
    """

    def __init__(self, allowed: Iterable[str] = (), *, loopback: bool = True) -> None:
        self.allowed = {o.strip().rstrip("/").lower() for o in allowed if o.strip()}
        self.loopback = loopback

    def add(self, origin: str) -> None:
        self.allowed.add(origin.strip().rstrip("/").lower())

    def admits(self, origin: str | None) -> bool:
        if origin is None:
            return True
        wanted = origin.strip().rstrip("/").lower()
        if "*" in self.allowed or wanted in self.allowed:
            return True
        return self.loopback and is_loopback_origin(wanted)


@dataclass
class WSResult:
    """What one :meth:`WSEndpoint.feed` (or :meth:`~WSEndpoint.tick`) asks the adapter to do."""

    out: bytes = b""
    """Bytes to write to the connection (handshake answer, pongs, close frames)."""
    messages: list[bytes] = field(default_factory=list)
    """Complete SIP messages (one per WebSocket message), in order."""
    opened: bool = False
    """The handshake completed on this call: queued SIP messages may now be sent."""
    close: bool = False
    """Close the underlying connection once ``out`` is written."""
    error: str | None = None
    """Why the connection is being closed for a fault of the peer (counted by the adapter)."""
    rejected: bool = False
    """The handshake was refused (origin, sub-protocol, or not a WebSocket upgrade)."""


class WSEndpoint:
    """One SIP WebSocket connection's protocol state, server or client side.

    Server: ``WSEndpoint(client=False, origins=policy)``; feed it bytes as they arrive. Client:
    ``WSEndpoint(client=True, host="127.0.0.1:8080")`` and write :meth:`start`'s bytes first.
    """

    def __init__(
        self,
        *,
        client: bool,
        max_message: int = 65535,
        origins: OriginPolicy | None = None,
        host: str = "localhost",
        path: str = "/",
        origin: str | None = None,
    ) -> None:
        self.client = client
        self.max_message = max_message
        self.origins = origins or OriginPolicy()
        self.host = host
        self.path = path
        self.origin = origin
        self.ws = WSConnection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self.open = False
        self.closed = False
        self.request_origin: str | None = None
        """The ``Origin`` a browser sent (server side), once the handshake is read."""
        self._parts: list[bytes] = []
        self._size = 0
        self._ping_outstanding = False
        self._last_activity: float | None = None

    # ------------------------------------------------------------------------------------- sending

    def start(self) -> bytes:
        """Client side: the upgrade request offering the ``sip`` sub-protocol."""
        headers: list[tuple[bytes, bytes]] = []
        if self.origin:
            headers.append((b"origin", self.origin.encode("ascii", "replace")))
        return self.ws.send(
            Request(host=self.host, target=self.path, subprotocols=[SUBPROTOCOL], extra_headers=headers)
        )

    def message(self, data: bytes) -> bytes:
        """One SIP message as one WebSocket message: a text frame when it is valid UTF-8 (what browsers'
        SIP libraries expect), else a binary frame (RFC 7118 §5.1 allows both)."""
        if not self.open:
            raise LocalProtocolError("the WebSocket handshake is not complete")
        try:
            return self.ws.send(TextMessage(data=data.decode("utf-8")))
        except UnicodeDecodeError:
            return self.ws.send(BytesMessage(data=data))

    def close(self, code: int = NORMAL, reason: str = "") -> bytes:
        """A close frame (when the connection is open), after which nothing more is sent."""
        if self.closed:
            return b""
        self.closed = True
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            try:
                return self.ws.send(CloseConnection(code=code, reason=reason))
            except LocalProtocolError:
                return b""
        return b""

    def tick(self, now: float, interval: float) -> WSResult:
        """Keep-alive: ping when idle for ``interval`` seconds; a ping still unanswered one interval later
        closes the connection (a browser tab that went away without closing, a NAT that forgot us)."""
        result = WSResult()
        if not self.open or self.closed:
            return result
        if self._last_activity is None:
            self._last_activity = now
            return result
        if now - self._last_activity < interval:
            return result
        if self._ping_outstanding:
            result.out = self.close(GOING_AWAY, "keep-alive ping unanswered")
            result.close = True
            result.error = "keep-alive ping unanswered"
            return result
        self._ping_outstanding = True
        self._last_activity = now
        result.out = self.ws.send(Ping(payload=b"p2psip"))
        return result

    @property
    def incomplete(self) -> bool:
        """Whether part of a fragmented message has arrived and the rest has not (for the message deadline
        of :mod:`p2psip.streamguard`)."""
        return bool(self._parts)

    def touch(self, now: float) -> None:
        """Record activity (the adapter calls it for every read) so idle pings go only to idle connections."""
        self._last_activity = now

    # ------------------------------------------------------------------------------------ receiving

    def feed(self, data: bytes | None) -> WSResult:
        """Take bytes from the connection (None at end of stream) and say what to do about them."""
        result = WSResult()
        if self.closed and data is not None and self.ws.state is ConnectionState.CLOSED:
            return result
        out = bytearray()
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Request):
                    self._on_request(event, out, result)
                elif isinstance(event, AcceptConnection):
                    if event.subprotocol != SUBPROTOCOL:
                        return self._fail(result, out, "the server did not select the sip sub-protocol")
                    self.open = result.opened = True
                elif isinstance(event, RejectConnection):
                    result.rejected = True
                    return self._fail(result, out, f"handshake refused with HTTP {event.status_code}")
                elif isinstance(event, TextMessage | BytesMessage):
                    payload = event.data
                    chunk = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
                    self._size += len(chunk)
                    if self._size > self.max_message:
                        out += self.close(TOO_BIG, f"message larger than {self.max_message} bytes")
                        return self._fail(result, out, f"message larger than {self.max_message} bytes")
                    self._parts.append(chunk)
                    if event.message_finished:
                        result.messages.append(b"".join(self._parts))
                        self._parts.clear()
                        self._size = 0
                elif isinstance(event, Ping):
                    out += self.ws.send(event.response())
                elif isinstance(event, Pong):
                    self._ping_outstanding = False
                elif isinstance(event, CloseConnection):
                    result.close = True
                    if data is None:  # end of stream (1006): nothing can be sent any more
                        self.closed = True
                    elif self.ws.state is ConnectionState.REMOTE_CLOSING:  # the peer closes: echo it
                        out += self.ws.send(event.response())
                        self.closed = True
                    else:  # wsproto found a malformed frame and reports the close code it calls for
                        out += self.close(event.code, (event.reason or "")[:100])
                        result.error = f"malformed frame: {event.reason or event.code}"
                    break
        except RemoteProtocolError as exc:
            # A bad HTTP upgrade (a plain GET, a missing key...): answer the hint wsproto gives, if any.
            hint = getattr(exc, "event_hint", None)
            if isinstance(hint, RejectConnection) and not self.client:
                with contextlib.suppress(LocalProtocolError):
                    out += self.ws.send(RejectConnection(status_code=hint.status_code or 400))
            result.rejected = True
            return self._fail(result, out, f"bad WebSocket handshake: {exc}")
        except LocalProtocolError as exc:
            return self._fail(result, out, f"WebSocket protocol error: {exc}")
        result.out = bytes(out)
        return result

    def _on_request(self, event: Request, out: bytearray, result: WSResult) -> None:
        origin = next((v.decode("latin-1") for k, v in event.extra_headers if k.lower() == b"origin"), None)
        self.request_origin = origin
        if SUBPROTOCOL not in event.subprotocols:
            result.rejected = True
            out += self.ws.send(
                RejectConnection(status_code=400, headers=[(b"sec-websocket-protocol", b"sip")])
            )
            raise _Refused("the client did not offer the sip sub-protocol")
        if not self.origins.admits(origin):
            result.rejected = True
            out += self.ws.send(RejectConnection(status_code=403))
            raise _Refused(f"origin {origin!r} is not allowed")
        out += self.ws.send(AcceptConnection(subprotocol=SUBPROTOCOL))
        self.open = result.opened = True

    def _fail(self, result: WSResult, out: bytearray, why: str) -> WSResult:
        self.closed = True
        result.out = bytes(out)
        result.close = True
        result.error = why
        return result


class _Refused(LocalProtocolError):
    """Raised inside :meth:`WSEndpoint.feed` when the handshake is refused (already answered)."""

