"""asyncio transports for SIP: UDP, TCP, TLS and WebSocket (WS/WSS) listeners and connections (RFC 3261 §18,
RFC 3581, RFC 7118).

The transport layer is the only part of the SIP stack that touches sockets, and it holds sockets only. It
turns datagrams and byte streams into parsed messages (``on_message(message, source)``) and sends bytes to
a :class:`~p2psip.address.Target`. The rules it applies live in the sans-IO :mod:`p2psip.address`: stamping
``received``/``rport`` on a request's top Via (§18.2.1, RFC 3581) and where a response goes (§18.2.2). What
stays here is what needs the sockets:

- *response routing* over TCP/TLS/WS back on the connection the request came on while it is open (also
  found by the Via sent-by, for a stateless proxy), else along :func:`p2psip.address.response_target`;
- *stream framing* with size limits (:class:`p2psip.message.StreamFramer`), connection reuse keyed by the
  remote address (with an idle timeout), and the UDP→TCP switch for requests over 1300 bytes (§18.1.1);
- *robustness*: a malformed message is answered ``400`` with a reason naming the problem when enough of it
  could be read, else dropped; nothing a peer sends can stop a listener. Counters live in :attr:`stats`.

WebSocket connections (:class:`WebSocketConnection`) are stream connections whose framing is RFC 6455's,
one SIP message per WebSocket message; the handshake, origin check, size limit and keep-alive rules are the
sans-IO :mod:`p2psip.websocket`. A browser names itself with a ``.invalid`` host in its Via and Contact
(RFC 7118 §5.2): the connection is remembered under that host too, so a request for such a Contact goes
back over the browser's own connection, the only way to reach it.

It knows nothing of transactions: the :mod:`p2psip.stack` adapter wires it to the sans-IO cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import errno
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, cast

from p2psip import __version__
from p2psip.address import (
    RELIABLE,
    SECURE,
    TRANSPORTS,
    WEBSOCKET,
    ListenSpec,
    Target,
    format_hostport,
    numeric_host,
    response_target,
    sent_by_target,
    stamp_via,
)
from p2psip.background import Background
from p2psip.errors import ConfigError, ParseError, TransportError
from p2psip.flows import Failed, FlowTable, looks_like_stun, stun_reply
from p2psip.message import Limits, Request, Response, SentResponse, StreamFramer, parse
from p2psip.streamguard import Progress, StreamGuard, StreamLimits
from p2psip.websocket import POLICY_VIOLATION, OriginPolicy, WSEndpoint, WSResult

log = logging.getLogger("p2psip.transport")

#: Ping a WebSocket connection idle this long; no pong by the next ping closes it.
WS_PING_INTERVAL = 30.0
#: The default ``Server`` header of the responses a node makes (``--server-header`` changes or removes it).
SERVER = f"p2psip/{__version__}"
#: §18.1.1: a request larger than this (path MTU unknown) goes over a congestion-controlled transport.
UDP_SIZE_LIMIT = 1300

STAT_NAMES = (
    "received",  # messages (or datagrams) that arrived
    "sent",  # messages written to a socket
    "parse_errors",  # messages that failed to parse
    "bad_request_answers",  # of those, how many got a 400
    "dropped",  # messages thrown away (unparseable and unanswerable, or a failing handler)
    "keepalives",  # CRLF keep-alives (datagrams, and double-CRLF pings on streams, each answered)
    "stun_requests",  # STUN binding requests answered on a SIP UDP port (RFC 5626 keep-alives)
    "send_errors",  # sends that failed (no route, refused, reset, ICMP error)
    "handler_errors",  # exceptions raised by the message handler (caught: the listener lives on)
    "framing_errors",  # streams closed because of bad framing or an oversized message
    "connections_opened",
    "connections_closed",
    "udp_to_tcp",  # large requests switched from UDP to TCP (§18.1.1)
    "tcp_refused_udp_retry",  # ...whose TCP connection was refused: sent over UDP after all (§18.1.1)
    "ws_errors",  # WebSocket connections closed for a fault: bad handshake or frame, non-SIP payload, no pong
    "connections_refused",  # incoming stream connections over the per-source or global cap
    "slow_closed",  # stream connections closed with a message unfinished after the deadline (slowloris)
    "ws_refused",  # of those two, the WebSocket connections (over a cap, or a handshake too slow)
)


class Source(NamedTuple):
    """Where a message came from. ``connection`` is the stream it arrived on (None for UDP); responses to a
    request received on a stream go back on it while it is open (§18.2.2)."""

    transport: str
    host: str
    port: int
    connection: StreamConnection | None = None
    reply: Target | None = None
    """UDP only: where responses to this request go (§18.2.2), worked out once on receipt."""

    @property
    def target(self) -> Target:
        return Target(self.transport, self.host, self.port)


# --------------------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSConfig:
    """Certificates for ``tls:`` listeners and the trust used when connecting out (``sips:``).

    ``certfile``/``keyfile`` (PEM) are what this node presents — as a server, and as a client when the server
    asks (mutual TLS); ``cafile`` what it trusts when it connects (the system store when None). A ``tls:``
    listener without ``certfile`` presents a self-signed certificate made at start, keeping this trust.
    ``verify=False`` accepts any server certificate: only for tests and labs.
    """

    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    verify: bool = True

    @classmethod
    def self_signed(cls, directory: str | None = None, hostnames: Iterable[str] = ()) -> TLSConfig:
        """Generate a self-signed certificate (EC P-256, valid for localhost, 127.0.0.1, ::1 and
        ``hostnames``) into ``directory`` (a new temporary one when None) and trust it when connecting."""
        certfile, keyfile = generate_self_signed(directory, hostnames)
        return cls(certfile=certfile, keyfile=keyfile, cafile=certfile, verify=True)

    def server_context(self) -> ssl.SSLContext:
        if not self.certfile:
            raise ConfigError("a tls: listener needs a certificate: give certfile/keyfile, or self_signed()")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate {self.certfile!r}: {exc}") from exc
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certfile:  # presented when the server asks for one (mutual TLS, e.g. Kamailio's
            try:  # require_certificate): a server that does not ask never sees it
                ctx.load_cert_chain(self.certfile, self.keyfile)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load TLS certificate {self.certfile!r}: {exc}") from exc
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.cafile:
            try:
                ctx.load_verify_locations(self.cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load TLS CA file {self.cafile!r}: {exc}") from exc
        else:
            ctx.load_default_certs()
        return ctx


def generate_self_signed(directory: str | None = None, hostnames: Iterable[str] = ()) -> tuple[str, str]:
    """Write ``cert.pem`` and ``key.pem`` for a fresh self-signed certificate; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = directory or tempfile.mkdtemp(prefix="p2psip-tls-")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    ips = {"127.0.0.1", "::1"}
    for name in hostnames:
        literal = numeric_host(name)
        if literal is not None:
            ips.add(literal)
        else:
            names.append(x509.DNSName(name))
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2psip self-signed")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile = os.path.join(directory, "cert.pem")
    keyfile = os.path.join(directory, "key.pem")
    with open(certfile, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certfile, keyfile


# --------------------------------------------------------------------------------------- protocols


MessageHandler = Callable[[Request | Response, Source], None]
ErrorHandler = Callable[[Exception], None]
Observer = Callable[[str, bytes, Target], None]
"""``observer(direction, data, remote)``: ``"in"`` with the bytes exactly as received (a datagram or one
framed stream message, malformed ones included; keep-alives not), or ``"out"`` with the bytes handed to a
socket; ``remote`` is the other side (its ``transport`` names the protocol). See
:meth:`TransportLayer.add_observer`."""


class Diverter(Protocol):
    """Takes the UDP datagrams that belong elsewhere before they are parsed (``p2psip.handoff``)."""

    def divert(self, data: bytes, addr: tuple[str | int, ...]) -> bool:
        """True when ``data`` from ``addr`` was taken (not to be processed here)."""
        ...

    def flush(self) -> None:
        """Send what was taken during the burst of datagrams just read."""
        ...


class _UDPSocket:
    """One UDP listening socket, read straight from the loop's selector (``add_reader``).

    Not an asyncio DatagramTransport on purpose: that one reads a single datagram per loop iteration,
    while a busy SIP proxy wants to drain a burst (up to 64 datagrams) per wake-up and send with a plain
    non-blocking ``sendto``. Nothing here can raise out of the loop callback.
    """

    BURST = 64

    def __init__(self, layer: TransportLayer, sock: socket.socket) -> None:
        self.layer = layer
        self.sock = sock
        self.closed = False
        layer.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        recvfrom = self.sock.recvfrom
        on_datagram = self.layer._on_datagram
        diverter = self.layer.divert
        divert = diverter.divert if diverter is not None else None
        try:
            for _ in range(self.BURST):
                try:
                    data, addr = recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    # An ICMP error for an earlier sendto (port unreachable...): count it, keep listening.
                    self.layer.stats["send_errors"] += 1
                    continue
                if divert is not None and divert(data, addr):
                    continue
                on_datagram(data, addr, self)
        finally:
            if diverter is not None:
                diverter.flush()  # what the burst handed elsewhere goes out together

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            # The kernel buffer is full: UDP may lose a datagram; the transaction layer retransmits.
            self.layer.stats["send_errors"] += 1
        except OSError as exc:
            self.layer.stats["send_errors"] += 1
            raise TransportError(f"cannot send to {addr[0]}:{addr[1]}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.layer.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection, incoming or outgoing, framed by Content-Length."""

    def __init__(self, layer: TransportLayer, transport_name: str, outgoing: bool) -> None:
        self.layer = layer
        self.name = transport_name
        self.outgoing = outgoing
        self.framer = StreamFramer(layer.limits)
        self.transport: asyncio.Transport | None = None
        self.remote: Target | None = None
        self.keys: list[Target] = []
        self.last_used = layer.loop.time()
        self.closed = False
        self.lost: str | None = None
        """How the peer ended the connection (None: it did not, or not yet), for what is written after:
        the layer's write after a connect can come just after the peer's close was read."""
        self.draining = False
        self.admitted = False
        self.refused = False
        self.progress = Progress()
        self.unanswered: list[ErrorHandler] = []
        """Error handlers of what we wrote since the peer last sent anything: if the peer drops the
        connection without a word (e.g. a TLS server refusing our certificate after a TLS 1.3 handshake,
        or a proxy closing on a request it will not take), those requests learn it at once instead of
        at their transaction timeout."""
        self._ended: asyncio.Future[None] | None = None
        """Made on demand (:meth:`ended`): done when the connection has closed, either way."""

    def ended(self) -> asyncio.Future[None]:
        """A future done once this connection has closed (by either end): an RFC 5626 outbound client
        waits on it, since a closed connection is a failed flow (§4.4) that must be registered again."""
        if self._ended is None:
            self._ended = self.layer.loop.create_future()
            if self.closed:
                self._ended.set_result(None)
        return self._ended

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = Target(self.name, str(peer[0]), int(peer[1]))
        if not self.outgoing and not self.layer._admit(self):
            self.closed = self.refused = True
            self.transport.abort()
            return
        self.layer._register(self, self.remote)
        self.layer.stats["connections_opened"] += 1

    def data_received(self, data: bytes) -> None:
        self.last_used = self.layer.loop.time()
        if self.unanswered:
            self.unanswered.clear()  # the peer is alive and talking to us
        if self.draining or self.closed:
            return  # answered and closing (or refused): what still arrives is thrown away
        pings = self.framer.keepalives
        try:
            frames = self.framer.feed(data)
        except ParseError as exc:
            self._framing_failed(exc)
            return
        except Exception:  # a framer bug must not kill the loop's reader
            self.layer.stats["framing_errors"] += 1
            log.exception("stream framer failed on data from %s", self.remote)
            self.close()
            return
        self.progress.update(self.last_used, completed=len(frames), pending=self.framer.buffered > 0)
        layer = self.layer
        if self.framer.keepalives != pings and self.transport is not None and not self.closed:
            # RFC 5626 §4.4.1: a double-CRLF "ping" is answered with a single-CRLF "pong".
            layer.stats["keepalives"] += self.framer.keepalives - pings
            self.transport.write(b"\r\n" * (self.framer.keepalives - pings))
        if layer.flows is not None and self.remote is not None:
            layer.flows.touch(self.name, self.remote.host, self.remote.port, self.last_used)
        for frame in frames:
            layer._on_frame(frame, self)
        if self.framer.error is not None and not self.closed:
            self._framing_failed(self.framer.error)  # garbage after the messages framed above

    def _framing_failed(self, exc: ParseError) -> None:
        """The stream cannot be framed further (an oversized or unframeable message): answer its head
        when it can be answered (513 or 400, on this connection), then close without losing that answer."""
        layer = self.layer
        layer.stats["framing_errors"] += 1
        if layer.verbose:
            log.info("closing %s: bad framing: %s", self.remote, exc)
        if isinstance(exc.partial, Request) and self.remote is not None:
            layer._malformed(exc, Source(self.name, self.remote.host, self.remote.port, self))
        self.drain_and_close()

    def drain_and_close(self, linger: float = 2.0) -> None:
        """Close after what was written left: half-close (where the transport can), discard what still
        arrives, and close for good after ``linger`` s. A plain close with unread input makes the kernel
        send a reset that destroys the answer still in the send buffer (a 513 to an oversized message)."""
        if self.closed or self.draining or self.transport is None:
            return
        self.draining = True
        self.layer._forget(self)  # nothing else goes out on this connection
        if self.transport.can_write_eof():
            with contextlib.suppress(Exception):
                self.transport.write_eof()
        self.layer.loop.call_later(linger, self.close)

    def eof_received(self) -> bool | None:
        """The peer ended its side; the transport then closes (the default), and meanwhile a write says so."""
        if not self.closed:
            self.lost = "closed by the peer"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return  # never admitted, never counted
        closed_by_us = self.closed
        self.closed = True
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        self.layer._release(self)
        self.layer._forget(self)
        self.layer.stats["connections_closed"] += 1
        self.layer._flow_closed(self)
        if not closed_by_us:
            why = f": {exc}" if exc is not None else ""
            self.lost = f"closed by the peer{why}"
            self.fail_waiting(f"connection to {self.remote} closed by the peer before it answered{why}")
        else:
            self.unanswered = []

    def fail_waiting(self, why: str) -> None:
        """Tell the senders of what is still unanswered on this connection that it failed."""
        waiting, self.unanswered = self.unanswered, []
        if not waiting:
            return
        error = TransportError(why)
        self.layer.stats["send_errors"] += len(waiting)
        for on_error in waiting:
            try:
                on_error(error)
            except Exception:
                log.exception("send-error handler failed")

    def _closed_error(self) -> TransportError:
        why = self.lost or "is closed"
        closing = self.transport is not None and self.transport.is_closing()
        if self.lost is None and not self.closed and closing:
            # Not closed by us, yet closing: a TLS alert (a refused certificate) or the peer's close was
            # read, and connection_lost has not run yet.
            why = "closed by the peer or on a transport error"
        return TransportError(f"connection to {self.remote} {why}")

    def write(self, data: bytes, on_error: ErrorHandler | None = None) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise self._closed_error()
        self.last_used = self.layer.loop.time()
        self.transport.write(data)
        if on_error is not None:
            unanswered = self.unanswered
            if len(unanswered) >= 256:  # a peer that reads but never answers: keep the newest
                del unanswered[:128]
            unanswered.append(on_error)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.layer._forget(self)
            self.layer._flow_closed(self)


class WebSocketConnection(StreamConnection):
    """One SIP WebSocket connection (RFC 7118), incoming (a browser, a SIP WebSocket client) or outgoing
    (to a ``;transport=ws`` target, e.g. Kamailio's websocket module).

    The protocol rules are :class:`p2psip.websocket.WSEndpoint`'s; this adapter writes what it asks,
    hands each complete message to the layer like a framed stream message, queues what is sent before the
    handshake completes, and closes the connection (counted in ``ws_errors``) when the endpoint says so.
    """

    MAX_QUEUED = 64

    def __init__(self, layer: TransportLayer, transport_name: str, outgoing: bool, host: str = "") -> None:
        super().__init__(layer, transport_name, outgoing)
        self.ws = WSEndpoint(
            client=outgoing, max_message=layer.limits.max_size, origins=layer.ws_origins, host=host
        )
        self.queued: list[bytes] = []
        if not outgoing:
            self.progress = Progress(layer.loop.time())  # the handshake is the first thing pending

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.remote is not None and self.transport is not None
        if self.outgoing:
            self.transport.write(self.ws.start())

    def data_received(self, data: bytes) -> None:
        now = self.layer.loop.time()
        self.last_used = now
        self.ws.touch(now)
        flows = self.layer.flows
        if flows is not None and self.remote is not None:
            flows.touch(self.name, self.remote.host, self.remote.port, now)  # its pongs keep the flow
        try:
            result = self.ws.feed(data)
        except Exception:  # a wsproto bug must not kill the loop's reader
            log.exception("WebSocket endpoint failed on data from %s", self.remote)
            result = WSResult(close=True, error="internal error")
        if result.messages and self.unanswered:
            self.unanswered.clear()  # the peer is alive and talking to us
        pending = not self.ws.open or self.ws.incomplete
        self.progress.update(now, completed=len(result.messages) + bool(result.opened), pending=pending)
        self.apply(result)
        for message in result.messages:
            if self.closed:
                break
            if not message.strip():  # a CRLF keep-alive sent as a message (RFC 5626 §4.4.1 over WS)
                self.layer.stats["keepalives"] += 1
                continue
            self.layer._on_frame(message, self)

    def apply(self, result: WSResult) -> None:
        """Do what the endpoint asked: write, flush the queue once open, count and close on a fault."""
        if result.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(result.out)
        if result.opened:
            queued, self.queued = self.queued, []
            for data in queued:
                self._send(data)
        if result.error is not None:
            self.layer.stats["ws_errors"] += 1
            if self.layer.verbose:
                log.info("closing WebSocket %s: %s", self.remote, result.error)
            if not self.ws.open or result.rejected:
                self.fail_waiting(f"WebSocket connection to {self.remote} failed: {result.error}")
        if result.close:
            self._close_transport()

    def write(self, data: bytes, on_error: ErrorHandler | None = None) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise self._closed_error()
        self.last_used = self.layer.loop.time()
        if self.ws.open:
            self._send(data)
        elif len(self.queued) >= self.MAX_QUEUED:
            raise TransportError(f"WebSocket connection to {self.remote} is not open yet; its queue is full")
        else:
            self.queued.append(data)
        if on_error is not None:
            if len(self.unanswered) >= 256:
                del self.unanswered[:128]
            self.unanswered.append(on_error)

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.ws.message(data))

    def tick(self, now: float, ping_interval: float) -> None:
        """Keep-alive (called by the layer's sweep; the handshake deadline is the layer's message one)."""
        if self.ws.open:
            self.apply(self.ws.tick(now, ping_interval))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with a WebSocket close frame (``code``, RFC 6455 §7.4) when the connection is open."""
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            frame = self.ws.close(code, reason)
            if frame:
                self.transport.write(frame)
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.layer._forget(self)



# ------------------------------------------------------------------------------------------- layer


class TransportLayer:
    """All listeners and connections of one stack; see the module docstring for what it decides.

    ``on_message(message, source)`` is called for every well-formed message, synchronously from the
    event loop; an exception it raises is logged and counted, never propagated into the loop.
    """

    def __init__(
        self,
        on_message: MessageHandler,
        *,
        limits: Limits | None = None,
        tls: TLSConfig | None = None,
        idle_timeout: float = 300.0,
        udp_size_limit: int = UDP_SIZE_LIMIT,
        verbose: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        ws_origins: OriginPolicy | None = None,
        ws_ping_interval: float = WS_PING_INTERVAL,
        streams: StreamLimits | None = None,
        server: str | None = SERVER,
    ) -> None:
        self.on_message = on_message
        self.ws_origins = ws_origins or OriginPolicy()
        """Origins the WebSocket handshake admits (loopback pages by default; a peer adds its web page's)."""
        self.ws_ping_interval = ws_ping_interval
        self.server = server
        """The ``Server`` header of the responses this node makes (RFC 3261 §20.35), so operators and
        scanners can tell what answers; None or empty: no header."""
        self.guard = StreamGuard(streams)
        """Caps and the message deadline of incoming TCP, TLS and WebSocket connections alike."""
        self.limits = limits or Limits()
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.udp_size_limit = udp_size_limit
        self.verbose = verbose
        self.loop = loop or asyncio.get_running_loop()
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        # Listening addresses: transport -> list of (host, port) as bound (port 0 resolved).
        self.listening: dict[str, list[tuple[str, int]]] = {t: [] for t in TRANSPORTS}
        self._udp: dict[int, _UDPSocket] = {}  # address family -> socket used to send
        self._udp_sockets: list[_UDPSocket] = []
        self._udp_addr: dict[int, tuple[str, int]] = {}
        self._own: dict[int, _UDPSocket] = {}
        """Address family -> this process's own UDP socket for client transactions (:meth:`own_socket`)."""
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: dict[Target, StreamConnection] = {}
        self._pending: dict[Target, list[tuple[bytes, ErrorHandler | None]]] = {}
        self._client_ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._tasks = Background(log, "connect")
        self._observers: list[Observer] = []
        self.flows: FlowTable | None = None
        """The node's flow table (RFC 5626), when it keeps one (a peer): touched by everything that
        arrives, told when a stream connection ends."""
        self.advertise_host: str | None = None
        """The address others reach this node at when it is not a bound one (a NAT router forwards the
        ports to it): what Via, Record-Route, Path and Contact then name."""
        self.on_stun: Callable[[bytes, str, int], None] | None = None
        """Called with the STUN messages that are not binding requests (answers to our keep-alives)."""
        self.on_flow_failed: Callable[[Failed], None] | None = None
        """Called when a flow of :attr:`flows` failed because its connection ended."""
        self.divert: Diverter | None = None
        """Asked first for every UDP datagram: True means it was handed elsewhere (the worker process
        that owns it, :mod:`p2psip.handoff`) and is not processed here; flushed after each burst."""
        self.reuse_port = False
        """Open UDP listeners with ``SO_REUSEPORT``, so the workers of one proxy share a port."""

    def _flow_closed(self, conn: StreamConnection) -> None:
        flows, remote = self.flows, conn.remote
        if flows is None or remote is None:
            return
        flow = flows.get(conn.name, remote.host, remote.port)
        if flow is None or (flow.handle is not None and flow.handle is not conn):
            return
        failed = flows.closed(conn.name, remote.host, remote.port)
        if failed is not None and self.on_flow_failed is not None:
            try:
                self.on_flow_failed(failed)
            except Exception:
                log.exception("flow-failure handler failed")

    # ----------------------------------------------------------------------------- observing

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer`` for every message received and sent (a trace, a ladder diagram, a test
        capture) without replacing any of this layer's methods. It runs synchronously on the hot path:
        keep it cheap. Its exceptions are logged and counted as ``handler_errors``, never propagated."""
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        """Stop calling ``observer`` (no error if it was not added)."""
        with contextlib.suppress(ValueError):
            self._observers.remove(observer)

    def _observe(self, direction: str, data: bytes, remote: Target) -> None:
        for observer in tuple(self._observers):
            try:
                observer(direction, data, remote)
            except Exception:
                self.stats["handler_errors"] += 1
                log.exception("observer %r failed", observer)

    # ----------------------------------------------------------------------------- listening

    async def listen(self, spec: ListenSpec | str) -> Target:
        """Open one listener; returns its bound address (port 0 gets a free port)."""
        parsed = ListenSpec.parse(spec) if isinstance(spec, str) else spec
        bound = [await self._listen_one(t, parsed.host, parsed.port) for t in parsed.transports()]
        return bound[0]

    async def listen_on(self, sock: socket.socket) -> Target:
        """Listen on ``sock``, a UDP socket bound already (see :meth:`p2psip.stack.Stack.listen_on`)."""
        host, port = sock.getsockname()[:2]
        return await self._listen_one("udp", str(host), int(port), sock)

    async def listen_shared_port(self, host: str, transports: Iterable[str] = ("udp", "tcp")) -> list[Target]:
        """Listen on one port for several transports, the system choosing a port free for all of them
        (so a UDP target's port also reaches us over TCP, as §18.1.1's switch assumes)."""
        wanted = list(transports)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(50):
            socks: dict[str, socket.socket] = {}
            try:
                for transport in wanted:
                    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
                    sock = socket.socket(family, kind)
                    socks[transport] = sock
                    if kind == socket.SOCK_STREAM:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    port = next(iter(socks.values())).getsockname()[1] if len(socks) > 1 else 0
                    sock.bind((host, port))
            except OSError as exc:
                for sock in socks.values():
                    sock.close()
                if exc.errno == errno.EADDRINUSE:
                    continue  # that port is taken for one of the transports: let the system pick again
                raise ConfigError(f"cannot listen on {host}: {exc.strerror or exc}") from exc
            return [
                await self._listen_one(t, host, sock.getsockname()[1], sock)
                for t, sock in socks.items()
            ]
        raise ConfigError(f"cannot find a port on {host} free for {', '.join(wanted)}")

    async def _listen_one(
        self, transport: str, host: str, port: int, bound: socket.socket | None = None
    ) -> Target:
        spec = Target(transport, host, port)
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        try:
            if spec.transport == "udp":
                sock = bound or socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    _tune_udp_socket(sock)
                    if self.reuse_port:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if bound is None:
                        sock.bind((spec.host, spec.port))
                except OSError:
                    sock.close()
                    raise
                host, port = sock.getsockname()[:2]
                endpoint = _UDPSocket(self, sock)
                self._udp_sockets.append(endpoint)
                self._udp.setdefault(family, endpoint)
                self._udp_addr.setdefault(family, (host, port))
            else:
                ssl_ctx = None
                if spec.transport in SECURE:
                    if self.tls is None or not self.tls.certfile:
                        # Present a certificate made now, but keep the trust asked for when connecting
                        # out (the system's store by default): trusting only our own new certificate
                        # would refuse every other TLS server (Kamailio's, seen in the interop tests).
                        made = TLSConfig.self_signed()
                        base = self.tls or TLSConfig()
                        self.tls = dataclasses.replace(base, certfile=made.certfile, keyfile=made.keyfile)
                    ssl_ctx = self.tls.server_context()
                name = spec.transport
                factory = self._protocol_factory(name)
                if bound is not None:
                    server = await self.loop.create_server(
                        factory,
                        sock=bound,
                        ssl=ssl_ctx,
                        backlog=1024,
                    )
                else:
                    server = await self.loop.create_server(
                        factory,
                        host=spec.host,
                        port=spec.port,
                        family=family,
                        ssl=ssl_ctx,
                        reuse_address=True,
                        backlog=1024,
                    )
                self._servers.append(server)
                host, port = server.sockets[0].getsockname()[:2]
        except OSError as exc:
            raise ConfigError(f"cannot listen on {spec}: {exc.strerror or exc}") from exc
        self.listening[spec.transport].append((host, port))
        if self._sweeper is None and self.idle_timeout > 0:
            self._schedule_sweep()
        if self.verbose:
            log.info("listening on %s", Target(spec.transport, host, port))
        return Target(spec.transport, host, port)

    def _protocol_factory(self, name: str) -> Callable[[], StreamConnection]:
        if name in WEBSOCKET:
            return lambda: WebSocketConnection(self, name, outgoing=False)
        return lambda: StreamConnection(self, name, outgoing=False)

    def local_address(self, transport: str = "udp", family_of: str | None = None) -> tuple[str, int]:
        """The (host, port) this stack listens on for ``transport`` (of the address family of host
        ``family_of`` when given). Used for Via sent-by and Contact. Raises TransportError if none."""
        candidates = self.listening.get(transport) or []
        if not candidates and transport in RELIABLE:
            # Outgoing-only stream transport: advertise the UDP address (best effort).
            candidates = self.listening.get("udp") or []
        if not candidates:
            raise TransportError(f"this stack does not listen on {transport}: add a {transport}: listener")
        advertise = self.advertise_host
        if family_of is not None:
            want_v6 = ":" in family_of
            for host, port in candidates:
                if (":" in host) == want_v6:
                    if advertise is not None and (":" in advertise) == want_v6:
                        return advertise, port
                    return self._advertised(host, family_of), port
        host, port = candidates[0]
        if advertise is not None and (":" in advertise) == (":" in host or host == "::"):
            return advertise, port
        return self._advertised(host, family_of), port

    @staticmethod
    def _advertised(host: str, toward: str | None) -> str:
        """A wildcard bind address is no use in a Via: pick the local address that routes to ``toward``."""
        if host not in ("0.0.0.0", "::"):
            return host
        dest = toward or ("::1" if host == "::" else "127.0.0.1")
        family = socket.AF_INET6 if ":" in dest else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((dest, 9))  # no packet is sent: this only asks the routing table
                return str(s.getsockname()[0])
        except OSError:
            return "::1" if host == "::" else "127.0.0.1"

    def listens_on(self, transport: str) -> bool:
        return bool(self.listening.get(transport))

    # --------------------------------------------------------------------------------- receipt

    def receive_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        """Process ``data`` as a UDP datagram from ``addr`` that arrived on our listening socket of that
        address family (one handed over by another worker of the same proxy: :mod:`p2psip.handoff`)."""
        self._on_datagram(data, addr, self._udp.get(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET))

    def _on_datagram(self, data: bytes, addr: tuple[str | int, ...], endpoint: object = None) -> None:
        stats = self.stats
        host = str(addr[0])
        port = int(addr[1])
        if self.flows is not None:
            self.flows.touch("udp", host, port, self.loop.time())
        if len(data) <= 4 and not data.strip():
            stats["keepalives"] += 1
            return
        if data[0] < 0x40 and looks_like_stun(data):
            # RFC 5626 §4.4.2 / §8: a STUN binding request on the SIP port is a keep-alive (and tells the
            # phone its reflexive address); any other STUN message is dropped, never answered.
            reply = stun_reply(data, host, port)
            if reply is None and self.on_stun is not None:
                self.on_stun(data, host, port)  # a response to our own keep-alive (an outbound client)
            elif reply is None:
                stats["dropped"] += 1
            elif endpoint is not None and isinstance(endpoint, _UDPSocket):
                stats["stun_requests"] += 1
                with contextlib.suppress(TransportError):
                    endpoint.sendto(reply, (host, port))
            return
        stats["received"] += 1
        source = Source("udp", host, port, None)
        if self._observers:
            self._observe("in", data, source.target)
        try:
            msg = parse(data, datagram=True, limits=self.limits)
            if isinstance(msg, Request):
                # Source(...) again rather than NamedTuple._replace, a slow Python-level method.
                source = Source("udp", host, port, None, stamp_via(msg, host, port)[2])
        except ParseError as exc:
            self._malformed(exc, source)
            return
        except Exception:
            stats["dropped"] += 1
            log.exception("parser failed on a datagram from %s", source.target)
            return
        try:
            self.on_message(msg, source)
        except Exception:
            stats["handler_errors"] += 1
            log.exception("handler failed on a message from %s", source.target)

    def _on_frame(self, frame: bytes, conn: StreamConnection) -> None:
        self.stats["received"] += 1
        remote = conn.remote
        assert remote is not None
        source = Source(conn.name, remote.host, remote.port, conn)
        if self._observers:
            self._observe("in", frame, remote)
        try:
            msg = parse(frame, datagram=False, limits=self.limits)
            if isinstance(msg, Request):
                host, port, _ = stamp_via(msg, remote.host, remote.port)
                self._alias(conn, sent_by_target(conn.name, host, port))
        except ParseError as exc:
            self._malformed(exc, source)
            return
        except Exception:
            self.stats["dropped"] += 1
            log.exception("parser failed on a message from %s", remote)
            return
        try:
            self.on_message(msg, source)
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("handler failed on a message from %s", remote)

    def _malformed(self, exc: ParseError, source: Source) -> None:
        """Answer 400 naming the problem when the request could be partly read, else drop (§8.2, §21.4.1)."""
        self.stats["parse_errors"] += 1
        if self.verbose:
            log.info("malformed message from %s: %s", source.target, exc)
        partial = exc.partial
        if isinstance(partial, Request) and partial.method != "ACK":
            try:
                # so the 400 goes back where the request came from
                stamp_via(partial, source.host, source.port)
                self.send_response(Response.for_error(partial, exc), source)
                self.stats["bad_request_answers"] += 1
                return
            except Exception as inner:  # even the 400 could not be built: give up on this message
                if self.verbose:
                    log.info("cannot answer malformed message from %s: %s", source.target, inner)
        self.stats["dropped"] += 1
        conn = source.connection
        if isinstance(conn, WebSocketConnection) and partial is None:
            # Not SIP at all on a SIP WebSocket: whoever sends it is not a SIP client; close (RFC 7118 §5.1).
            self.stats["ws_errors"] += 1
            conn.close(POLICY_VIOLATION, "not a SIP message")

    # -------------------------------------------------------------------------------- sending

    def select(self, target: Target, size: int) -> Target:
        """The transport to really use for a request of ``size`` bytes to ``target``: §18.1.1 moves a
        request over 1300 bytes from UDP to TCP (the caller must then write TCP in the top Via). Not to a
        UDP *flow* (RFC 5626): the phone behind it is reachable only through that NAT mapping, so a large
        request (an INVITE with ICE candidates) still goes over the flow."""
        flows = self.flows
        if flows is not None and flows.get("udp", target.host, target.port) is not None:
            return target
        if target.transport == "udp" and size > self.udp_size_limit:
            self.stats["udp_to_tcp"] += 1
            return Target("tcp", target.host, target.port)
        return target

    def send(self, data: bytes, target: Target, on_error: ErrorHandler | None = None) -> None:
        """Send ``data`` to ``target`` without waiting. UDP goes out at once from the listening socket of
        the target's address family; TCP/TLS reuse an open connection or open one (then ``on_error`` is
        called, from the loop, if connecting fails). Raises TransportError when it fails at once."""
        if self._observers:
            self._observe("out", data, target)
        if target.transport == "udp":
            endpoint = self._udp.get(socket.AF_INET6 if ":" in target.host else socket.AF_INET)
            if endpoint is None or endpoint.closed:
                self.stats["send_errors"] += 1
                raise TransportError(f"cannot send to {target}: no UDP listener of that address family")
            endpoint.sendto(data, (target.host, target.port))
            self.stats["sent"] += 1
            return
        if target.transport not in RELIABLE:
            raise TransportError(f"unknown transport {target.transport!r}")
        conn = self._connections.get(target)
        if conn is not None and not conn.closed:
            conn.write(data, on_error)
            self.stats["sent"] += 1
            return
        self._connect_and_send(target, data, on_error)

    def own_socket(self, sock: socket.socket) -> tuple[str, int]:
        """Send the UDP requests of client transactions of ``sock``'s address family from ``sock`` (bound,
        and this process's alone), and read it like a listener; returns its (host, port). A worker of a
        multi-process proxy names that port in its Via, so the responses come back to it, not to the
        shared port where the kernel might give them to another worker (:mod:`p2psip.handoff`)."""
        sock.setblocking(False)
        _tune_udp_socket(sock)
        endpoint = _UDPSocket(self, sock)
        self._udp_sockets.append(endpoint)
        self._own[sock.family] = endpoint
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def own_port(self, family_of: str) -> int | None:
        """The port of :meth:`own_socket` of the address family of host ``family_of``, if any."""
        if not self._own:
            return None
        endpoint = self._own.get(socket.AF_INET6 if ":" in family_of else socket.AF_INET)
        return None if endpoint is None else int(endpoint.sock.getsockname()[1])

    def send_request(self, data: bytes, target: Target, on_error: ErrorHandler | None = None) -> None:
        """:meth:`send` for a request of a client transaction: over UDP from :meth:`own_socket` when this
        process has one (its Via names that port)."""
        if self._own and target.transport == "udp":
            endpoint = self._own.get(socket.AF_INET6 if ":" in target.host else socket.AF_INET)
            if endpoint is not None and not endpoint.closed:
                if self._observers:
                    self._observe("out", data, target)
                endpoint.sendto(data, (target.host, target.port))
                self.stats["sent"] += 1
                return
        self.send(data, target, on_error)

    def send_on(self, conn: StreamConnection, data: bytes) -> None:
        if self._observers and conn.remote is not None:
            self._observe("out", data, conn.remote)
        conn.write(data)
        self.stats["sent"] += 1

    def _connect_and_send(self, target: Target, data: bytes, on_error: ErrorHandler | None) -> None:
        if self._closed:
            raise TransportError("the transport layer is closed")
        if numeric_host(target.host) != target.host:
            self.stats["send_errors"] += 1
            if target.host.endswith(".invalid"):
                raise TransportError(f"no WebSocket connection to {target} (it is reached over its own only)")
            raise TransportError(f"cannot connect to {target}: the host is not an IP address (no DNS)")
        queue = self._pending.get(target)
        if queue is not None:
            queue.append((data, on_error))
            return
        self._pending[target] = [(data, on_error)]
        self._tasks.spawn(self._open(target))

    async def _open(self, target: Target) -> None:
        ssl_ctx: ssl.SSLContext | None = None
        try:
            if target.transport in SECURE:
                if self._client_ssl is None:
                    self._client_ssl = (self.tls or TLSConfig()).client_context()
                ssl_ctx = self._client_ssl
            factory: Callable[[], StreamConnection]
            if target.transport in WEBSOCKET:
                authority = format_hostport(target.host, target.port)
                factory = lambda: WebSocketConnection(self, target.transport, outgoing=True, host=authority)  # noqa: E731
            else:
                factory = lambda: StreamConnection(self, target.transport, outgoing=True)  # noqa: E731
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    factory,
                    target.host,
                    target.port,
                    ssl=ssl_ctx,
                    server_hostname=target.host if ssl_ctx is not None else None,
                ),
                timeout=10.0,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConfigError) as exc:
            queue = self._pending.pop(target, [])
            self.stats["send_errors"] += len(queue)
            err = TransportError(f"cannot connect to {target}: {exc}")
            err.__cause__ = exc  # what failed (a refused connection lets §18.1.1 fall back to UDP)
            if self.verbose:
                log.info("%s", err)
            for _, on_error in queue:
                if on_error is not None:
                    try:
                        on_error(err)
                    except Exception:
                        log.exception("send-error handler failed")
            return
        self._register(conn, target)
        for data, on_error in self._pending.pop(target, []):
            try:
                conn.write(data, on_error)
                self.stats["sent"] += 1
            except TransportError as exc:
                self.stats["send_errors"] += 1
                if on_error is not None:
                    on_error(exc)

    def response_target(
        self, response: Response | SentResponse, source: Source | None = None
    ) -> Target | StreamConnection:
        """Where a response goes (§18.2.2 with RFC 3581): the request's own connection when it is still
        open, else (re)connect/send to received:rport, maddr or the sent-by of the top Via."""
        if source is not None:
            if source.reply is not None:
                return source.reply
            if source.connection is not None and not source.connection.closed:
                return source.connection
        via = response.top_via
        if via is None:
            raise TransportError("cannot route a response without a Via header")
        transport = via.transport.lower()
        if transport in RELIABLE:
            key = sent_by_target(transport, via.host, via.port)
            alias = self._connections.get(key) if key is not None else None
            if alias is not None and not alias.closed:
                return alias
        return response_target(via)

    def stamp(self, response: Response) -> None:
        """Give a response made here (not one being forwarded) this layer's ``Server`` header, if it has
        one and none yet. The stack stamps before the transaction sees the response, so the bytes a
        completed transaction keeps (:class:`~p2psip.message.SentResponse`) are those first sent."""
        if self.server and response.local and "Server" not in response:
            response.add("Server", self.server)

    def send_response(self, response: Response | SentResponse, source: Source | None = None) -> None:
        """Serialize and send a response along §18.2.2 (see :meth:`response_target`), stamped (see
        :meth:`stamp`) when it is a :class:`Response`."""
        if isinstance(response, Response):
            self.stamp(response)
        where = self.response_target(response, source)
        data = bytes(response)
        if isinstance(where, StreamConnection):
            self.send_on(where, data)
        else:
            self.send(data, where)

    # ----------------------------------------------------------------------------- connections

    def _register(self, conn: StreamConnection, key: Target) -> None:
        if key not in conn.keys:
            conn.keys.append(key)
        self._connections[key] = conn

    def _alias(self, conn: StreamConnection, key: Target | None) -> None:
        """Remember ``conn`` under the sent-by of a request it carried too (see address.sent_by_target);
        for a browser that is its ``.invalid`` name (RFC 7118 §5.2), meaningful on this connection only."""
        if key is not None and self._connections.get(key) is not conn:
            self._register(conn, key)

    def _forget(self, conn: StreamConnection) -> None:
        for key in conn.keys:
            if self._connections.get(key) is conn:
                del self._connections[key]
        conn.keys.clear()

    def _admit(self, conn: StreamConnection) -> bool:
        """Count an incoming stream connection against the caps (:class:`StreamGuard`); False = refuse."""
        assert conn.remote is not None
        if self.guard.admit(conn.remote.host):
            conn.admitted = True
            return True
        self.stats["connections_refused"] += 1
        if isinstance(conn, WebSocketConnection):
            self.stats["ws_refused"] += 1
        if self.verbose:
            log.info("refusing connection from %s: too many connections", conn.remote)
        return False

    def _release(self, conn: StreamConnection) -> None:
        if conn.admitted and conn.remote is not None:
            conn.admitted = False
            self.guard.release(conn.remote.host)

    def connection_count(self) -> int:
        return len({id(c) for c in self._connections.values()})

    def connection_to(self, target: Target) -> StreamConnection | None:
        """The open stream connection that a send to ``target`` would use now (None: a send would open
        one, or ``target`` is UDP)."""
        conn = self._connections.get(target)
        return conn if conn is not None and not conn.closed else None

    def _schedule_sweep(self) -> None:
        deadline = self.guard.limits.message_timeout
        interval = max(0.05, min(30.0, self.idle_timeout / 4, deadline / 4))
        if self.listening["ws"] or self.listening["wss"]:
            interval = max(0.05, min(interval, self.ws_ping_interval / 3))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close stream connections idle for longer than ``idle_timeout`` (connection reuse, bounded);
        ping idle WebSocket connections and close those that stopped answering or never finished the
        handshake. An incoming WebSocket connection is a browser's only path: it lives while it pongs."""
        now = self.loop.time()
        deadline = now - self.idle_timeout
        limits = self.guard.limits
        for conn in list({id(c): c for c in self._connections.values()}.values()):
            if conn.progress.overdue(now, limits):
                # Slowloris: a message (or WebSocket handshake) still unfinished after the deadline.
                self.guard.overdue += 1
                self.stats["slow_closed"] += 1
                if isinstance(conn, WebSocketConnection):
                    self.stats["ws_refused"] += 1
                if self.verbose:
                    log.info("closing %s: message unfinished after %g s", conn.remote, limits.message_timeout)
                conn.close()
                continue
            if isinstance(conn, WebSocketConnection):
                conn.tick(now, self.ws_ping_interval)
                if not conn.outgoing:
                    continue
            if conn.last_used < deadline:
                if self.verbose:
                    log.info("closing idle connection to %s", conn.remote)
                conn.close()
        if not self._closed:
            self._schedule_sweep()

    async def close(self) -> None:
        """Close every listener and connection."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for endpoint in self._udp_sockets:
            endpoint.close()
        for server in self._servers:
            server.close()
        for conn in list({id(c): c for c in self._connections.values()}.values()):
            conn.close()
        self._tasks.cancel()
        for server in self._servers:
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._udp.clear()
        self._udp_sockets.clear()
        self._servers.clear()


def _tune_udp_socket(sock: socket.socket | None) -> None:
    """Bigger socket buffers: a burst of a few thousand datagrams must not be dropped by the kernel."""
    if sock is None:
        return
    size = 4 * 1024 * 1024
    # SO_RCVBUFFORCE/SO_SNDBUFFORCE (Linux, root) pass net.core.rmem_max; else the capped plain option.
    for forced, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
