"""MediaSession: one call's audio over asyncio UDP (RTP + RTCP), around the sans-IO parts of this package.

Each session owns an RTP socket (and, unless RTCP is multiplexed, an RTCP socket on the next port up, as
RFC 3550 §11 expects). One timer per event loop (:class:`_Ticker`) drives all sessions; every packet
interval (20 ms) each session:

1. sends one packet: the next telephone event if DTMF is being sent, else the next frame of the source,
   G.711-encoded (nothing once the source has ended);
2. plays one frame from the jitter buffer into the sink (decoding, or concealing a lost packet);
3. sends an RTCP report when one is due (SR if we sent since the last one, else RR; with SDES CNAME).

Ticks fall at ``start + k * ptime`` on the loop's monotonic clock, so lateness in one tick is not carried
into the next (no drift); if the loop falls several intervals behind, the missed ticks run at once (up to
``_Ticker.MAX_CATCH_UP``) so the RTP timestamp keeps matching real time.

Sockets are read without an asyncio transport, through one epoll set per event loop (:class:`_Poller`,
Linux; elsewhere one ``loop.add_reader`` per socket): the loop watches the set's one descriptor, and when it
is readable one ``epoll.poll`` names every media socket with a datagram waiting, each read with one
``recvfrom`` and handed to its session in a plain loop. Asyncio's own per-socket dispatch (a selector key,
a handle, a context run per ready socket) cost more than the read itself. The set is level-triggered, so a
socket still holding a backlog is named again on the next pass. Why not drain each socket until EAGAIN: a
call's socket holds one packet per 20 ms, so the extra ``recvfrom`` that fails (a syscall and an exception)
doubled the receive cost (measured: 6.5-7 µs against 11-12 µs a packet, dispatch included; through the
epoll set 4-4.5 µs). Packets go out with ``sock.sendto`` straight from the tick; a datagram the kernel
will not take (a full buffer, an ICMP error from an earlier send) is counted in ``send_dropped`` and not
queued: RTP is sent once, late audio is worse than none.

Symmetric RTP (RFC 4961; what a peer behind NAT needs): once a valid RTP packet of the expected payload type
arrives, we send to the address it came from, whatever the SDP said. RTCP latches the same way.

With symmetric RTP, once the peer's packets come from where we send (latched, or as the SDP said), the RTP
socket is *connected* to that address (Linux): ``send``/``recv`` instead of ``sendto``/``recvfrom`` save the
address conversion both ways and the route lookup per packet (measured: 4.9 -> 3.8 µs for a packet out and
one in), and the kernel drops datagrams from anyone else (a latched session rejected them anyway). A
connected session whose peer is silent for ``MediaSession.RELATCH_AFTER`` (1 s) disconnects again, so a
peer that moved (a NAT rebinding) is latched anew after about a second; :meth:`MediaSession.set_remote` to
another address disconnects at once. Ports are bound explicitly (a free one is probed first), because Linux
gives an ephemeral port up when a connected socket is disconnected. Without symmetric RTP the socket stays
unconnected (packets from any address are heard).

The per-packet work is kept to the common case: a packet of the expected payload type from the followed
source is accounted and buffered without building objects (one ``struct`` unpack, the RFC 3550 statistics'
and the jitter buffer's in-order fast paths), and the tick plays the due payload without a ``Playout``.
RTCP reports and the connection watch run on a slower scan of the sessions (every 100 ms), not every tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import random
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from p2psip.errors import ParseError, TransportError
from p2psip.media.codecs import PCMU, Codec, codec, encode_frame
from p2psip.media.dtmf import DtmfEvent, DtmfReceiver, DtmfSender
from p2psip.media.jitter import JitterBuffer, Playout, conceal
from p2psip.media.rtcp import (
    Bye,
    ReceiverReport,
    ReceptionStats,
    RtcpPacket,
    SenderReport,
    SourceDescription,
    build_compound,
    ntp_middle,
    ntp_timestamp,
    parse_compound,
)
from p2psip.media.rtp import RtpPacket, is_rtcp
from p2psip.media.sources import AudioSink, AudioSource, SilenceSource

__all__ = ["MediaSession", "MediaStats", "NegotiatedMedia"]

Address = tuple[str, int]
_FAST_HEADER = struct.Struct("!xBHII")
_RTP_HEADER = struct.Struct("!BBHII")
_MAX_DATAGRAM = 2048


class NegotiatedMedia(Protocol):
    """What :meth:`MediaSession.apply` needs; :class:`p2psip.sdp.MediaParams` has it."""

    @property
    def remote(self) -> tuple[str, int]: ...
    @property
    def remote_rtcp(self) -> tuple[str, int]: ...
    @property
    def codec(self) -> str: ...
    @property
    def payload_type(self) -> int: ...
    @property
    def receive_payload_type(self) -> int: ...
    @property
    def dtmf_payload_type(self) -> int | None: ...
    @property
    def receive_dtmf_payload_type(self) -> int | None: ...
    @property
    def send(self) -> bool: ...
    @property
    def recv(self) -> bool: ...


@dataclass(slots=True)
class MediaStats:
    """A snapshot of one session's counters. Jitter is RFC 3550's interarrival jitter, in milliseconds."""

    packets_sent: int
    octets_sent: int
    packets_received: int
    octets_received: int
    lost: int  # cumulative, RFC 3550 A.3 (expected - received)
    fraction_lost: float  # over the whole session so far, 0..1
    jitter_ms: float
    late: int  # arrived after their playout slot
    duplicates: int
    concealed: int  # frames synthesised for lost packets
    underruns: int  # intervals with nothing to play
    dtmf_received: str
    remote_lost: int | None  # what the peer's last RTCP report said about our stream
    remote_fraction_lost: float | None
    remote_jitter_ms: float | None
    rtt_ms: float | None
    ticks: int
    max_tick_lateness_ms: float  # how late the worst timer tick ran (pacing quality under load)
    rejected: int  # datagrams dropped: malformed, wrong payload type or foreign source
    send_dropped: int = 0  # packets the kernel would not take (full buffer, ICMP error): not retried


def _bind_pair(host: str, port: int, pair: bool) -> tuple[socket.socket, socket.socket | None]:
    """An RTP socket (even port) and, if ``pair``, an RTCP socket on the next port (RFC 3550 §11).

    The RTP socket is always bound to an explicit port (a free one is found first when ``port`` is 0):
    Linux keeps an explicitly bound port when a connected UDP socket is disconnected again, but gives an
    ephemeral one up (see :func:`_disconnect`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1 if port else 64):
        wanted = port
        if not port:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((host, 0))
                wanted = probe.getsockname()[1]
            if pair and wanted % 2:
                continue
        rtp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            try:
                rtp.bind((host, wanted))
            except OSError:
                if port:
                    raise
                rtp.close()  # taken between the probe and this bind: try another
                continue
            bound = rtp.getsockname()[1]
            if not pair:
                return rtp, None
            rtcp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                rtcp.bind((host, bound + 1))
            except OSError:
                rtcp.close()
                rtp.close()
                if port:
                    raise
                continue
            return rtp, rtcp
        except OSError:
            rtp.close()
            raise
    raise OSError(f"could not bind an RTP/RTCP port pair on {host}")


def _load_connect() -> Callable[[int, ctypes.Array[ctypes.c_char], int], int] | None:
    """libc's connect(2), for :func:`_disconnect` (Python's socket.connect cannot pass AF_UNSPEC)."""
    if not hasattr(select, "epoll"):  # Linux only: elsewhere sessions never connect their sockets
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        connect: Callable[[int, ctypes.Array[ctypes.c_char], int], int] = libc.connect
    except (OSError, AttributeError):
        return None
    return connect


_LIBC_CONNECT = _load_connect()
_UNSPEC = ctypes.create_string_buffer(32)  # a sockaddr whose family is AF_UNSPEC (0)


def _disconnect(sock: socket.socket) -> bool:
    """Dissolve a UDP socket's association (connect(2) to AF_UNSPEC), so it hears every source again."""
    if _LIBC_CONNECT is None:
        return False
    return _LIBC_CONNECT(sock.fileno(), _UNSPEC, 16) == 0


class MediaSession:
    """One call's media. Create with ``await MediaSession.start(...)``; see the module docstring."""

    RELATCH_AFTER = 1.0  # seconds of silence from a connected peer before other sources are heard again

    def __init__(self) -> None:  # use start()
        self._loop = asyncio.get_running_loop()
        self.codec: Codec = PCMU
        self.receive_payload_type = 0
        self.dtmf_payload_type: int | None = 101
        self.receive_dtmf_payload_type: int | None = 101
        self.ptime = 20
        self.samples_per_packet = 160
        self.send_enabled = True
        self.recv_enabled = True
        self.symmetric = True
        self.source: AudioSource = SilenceSource()
        self.sink: AudioSink | None = None
        self.remote: Address | None = None
        self.remote_rtcp: Address | None = None
        self._rtcp_latched = False
        self.rtcp_mux = False
        self.rtcp_interval = 5.0
        self.ssrc = random.getrandbits(32)
        self.cname = f"p2psip-{self.ssrc:08x}"
        self._rtp_sock: socket.socket | None = None
        self._rtcp_sock: socket.socket | None = None
        self._io = False  # bound (or on an ICE path): sending is possible
        self._v6 = False  # recvfrom gives 4-tuples: cut them to (host, port)
        self._send_dropped = 0
        self._send_path: Callable[[bytes, Address], None] | None = None  # ICE: see use_path()
        self._connected: Address | None = None  # the RTP socket is connected to this address (== remote)
        self._may_connect = _LIBC_CONNECT is not None  # see _connect()
        self.local_address: Address = ("", 0)
        self.local_rtcp_address: Address | None = None
        self._sequence = random.getrandbits(16)
        self._timestamp = random.getrandbits(32)
        self._marker = True
        self._packets_sent = 0
        self._octets_sent = 0
        self._sent_since_report = False
        self._packets_received = 0
        self._octets_received = 0
        self._rejected = 0
        self._remote_ssrc: int | None = None
        self._remote_last_seen = 0.0
        self._reception: ReceptionStats | None = None
        self._remote_report: tuple[int, int, int] | None = None  # lost, fraction*256, jitter (ts units)
        self._rtt: float | None = None
        self.jitter = JitterBuffer()
        self._dtmf_sender = DtmfSender()
        self._dtmf_pending = False  # digits queued on _dtmf_sender and not all sent yet
        self._dtmf_receiver = DtmfReceiver()
        self._dtmf_waiters: list[asyncio.Future[None]] = []
        self._digit_waiters: list[tuple[asyncio.Future[str], int]] = []
        self.on_dtmf: Callable[[DtmfEvent], None] | None = None
        self._last_frame: bytes | None = None
        self._concealed_run = 0
        self._ticks = 0
        self._max_lateness = 0.0
        self._ticker: _Ticker | None = None
        self._next_rtcp = 0.0
        self.source_done: asyncio.Future[None] = self._loop.create_future()
        self.remote_bye: asyncio.Future[None] = self._loop.create_future()
        self.closed = False
        self.errors: list[str] = []  # what went wrong in a source or sink (the call carried on)

    # ------------------------------------------------------------------ set-up
    @classmethod
    async def start(
        cls,
        local: Address = ("127.0.0.1", 0),
        remote: Address | None = None,
        *,
        codec: str | int | Codec = "PCMU",
        source: AudioSource | None = None,
        sink: AudioSink | None = None,
        dtmf_payload_type: int | None = 101,
        ptime: int = 20,
        direction: str = "sendrecv",
        symmetric: bool = True,
        rtcp_mux: bool = False,
        rtcp_interval: float = 5.0,
        jitter_prefetch: int = 2,
        on_dtmf: Callable[[DtmfEvent], None] | None = None,
        remote_rtcp: Address | None = None,
    ) -> MediaSession:
        """Bind the sockets and start the clock.

        ``local`` port 0 picks a free even port (and the odd one above it for RTCP unless ``rtcp_mux``).
        ``remote`` may be None until the SDP answer is known: call :meth:`set_remote` or :meth:`apply` then
        (until then nothing is sent; with ``symmetric`` the first packet from the peer also sets it).
        ``source`` defaults to silence (keeps NAT bindings open); ``sink`` None discards received audio.
        """
        self = cls()
        self.codec = _codec(codec)
        self.receive_payload_type = self.codec.payload_type
        self.dtmf_payload_type = self.receive_dtmf_payload_type = dtmf_payload_type
        if ptime <= 0 or ptime > 200:
            raise ValueError("ptime must be 1..200 ms")
        self.ptime = ptime
        self.samples_per_packet = self.codec.clock_rate * ptime // 1000
        self._dtmf_sender = DtmfSender(samples_per_packet=self.samples_per_packet)
        self.set_direction(direction)
        self.symmetric = symmetric
        self.rtcp_mux = rtcp_mux
        self.rtcp_interval = rtcp_interval
        self.jitter = JitterBuffer(prefetch=jitter_prefetch)
        self.on_dtmf = on_dtmf
        if source is not None:
            self.source = source
        self.sink = sink
        try:
            rtp_sock, rtcp_sock = _bind_pair(local[0], local[1], pair=not rtcp_mux)
        except OSError as error:
            what = "RTP" if rtcp_mux else "RTP/RTCP"
            raise TransportError(
                f"cannot bind {what} on {local[0]}:{local[1]} ({error.strerror or error}); "
                "use port 0 to pick free ports"
            ) from None
        self._v6 = rtp_sock.family == socket.AF_INET6
        rtp_sock.setblocking(False)
        self._rtp_sock = rtp_sock
        _Poller.watch(self._loop, rtp_sock.fileno(), self._on_rtp_readable)
        name = rtp_sock.getsockname()
        self.local_address = (name[0], name[1])
        if rtcp_sock is not None:
            rtcp_sock.setblocking(False)
            self._rtcp_sock = rtcp_sock
            _Poller.watch(self._loop, rtcp_sock.fileno(), self._on_rtcp_readable)
            rtcp_name = rtcp_sock.getsockname()
            self.local_rtcp_address = (rtcp_name[0], rtcp_name[1])
        self._io = True
        if remote is not None:
            self.set_remote(remote, remote_rtcp)
        self._next_rtcp = self._loop.time() + rtcp_interval * random.uniform(0.25, 0.75)
        self._ticker = _Ticker.join(self)
        return self

    def set_remote(self, remote: Address, remote_rtcp: Address | None = None) -> None:
        """Where to send RTP (and RTCP: by default the next port up, or the same port with rtcp-mux)."""
        self.remote = (remote[0], remote[1])
        if self._connected is not None and self._connected != self.remote:
            self._unconnect()
        if remote_rtcp is not None:
            self.remote_rtcp = remote_rtcp
        else:
            self.remote_rtcp = self.remote if self.rtcp_mux else (remote[0], remote[1] + 1)

    def use_path(self, send: Callable[[bytes, Address], None]) -> Callable[[bytes, Address], None]:
        """Send RTP and RTCP through ``send`` (an ICE agent's selected pair, :mod:`p2psip.media.ice`)
        instead of the bound socket, which closes. Returns the handler to feed received datagrams to.
        Needs ``rtcp_mux`` (one ICE component carries both)."""
        if not self.rtcp_mux:
            raise ValueError("an ICE path carries RTP and RTCP together: start the session with rtcp_mux")
        self._send_path = send
        self._close_socket(self._rtp_sock)
        self._rtp_sock = None
        self._connected = None
        return self._on_datagram

    def set_direction(self, direction: str) -> None:
        """``sendrecv``, ``sendonly``, ``recvonly`` or ``inactive`` (hold and resume)."""
        if direction not in ("sendrecv", "sendonly", "recvonly", "inactive"):
            raise ValueError(f"{direction!r} is not an SDP direction")
        self.send_enabled = direction in ("sendrecv", "sendonly")
        self.recv_enabled = direction in ("sendrecv", "recvonly")

    def apply(self, params: NegotiatedMedia) -> None:
        """Adopt an offer/answer outcome (:func:`p2psip.sdp.negotiated`): peer, codec, DTMF, direction.

        A rejected negotiation (no audio accepted) makes the session inactive: nothing sent or played.
        """
        if getattr(params, "rejected", False):
            self.set_direction("inactive")
            return
        self.codec = codec(params.codec, params.payload_type)
        self.receive_payload_type = params.receive_payload_type
        self.dtmf_payload_type = params.dtmf_payload_type
        self.receive_dtmf_payload_type = params.receive_dtmf_payload_type
        self.send_enabled, self.recv_enabled = params.send, params.recv
        self.set_remote(params.remote, params.remote_rtcp)

    def play(self, source: AudioSource) -> asyncio.Future[None]:
        """Switch to another source (e.g. from a prompt to silence); returns the new ``source_done``."""
        old = self.source
        self.source = source
        if self.source_done.done():
            self.source_done = self._loop.create_future()
        self._marker = True  # a new talk spurt
        if old is not source:
            with contextlib.suppress(Exception):
                old.close()
        return self.source_done

    def record(self, sink: AudioSink | None) -> AudioSink | None:
        """Switch where received audio goes (None: discard); returns the previous sink, not closed."""
        old, self.sink = self.sink, sink
        return old

    # ------------------------------------------------------------------- the tick
    def _tick_once(self, lateness: float) -> None:
        """One packet interval (called by the shared :class:`_Ticker`)."""
        if self.closed:
            return
        if lateness > self._max_lateness:
            self._max_lateness = lateness
        self._ticks += 1
        try:
            self._send_one()
        except Exception as error:  # a broken source must not kill the shared timer: it ends instead
            self.errors.append(f"source failed: {error!r}")
            self._fail_source()
        try:
            jitter = self.jitter
            payload = jitter.pop_ready()  # the common case, without a Playout object
            if payload is not None:
                self._play_payload(payload)
            else:
                frame = jitter.pop()
                if frame is not None:
                    self._play(frame)
        except Exception as error:  # a broken sink is dropped; the call goes on
            self.errors.append(f"sink failed: {error!r}")
            self.sink = None

    def _skip_tick(self) -> None:
        """An interval the loop was too late to run at all: keep the RTP clock in step with real time."""
        self._timestamp = (self._timestamp + self.samples_per_packet) & 0xFFFFFFFF

    def _rtcp_due(self, now: float) -> None:
        """Called by the ticker's slower scan (every ``_Ticker.SCAN_INTERVAL``)."""
        if self._connected is not None:
            self._watch_connection(now)
        if now >= self._next_rtcp:
            self._next_rtcp = now + self.rtcp_interval * random.uniform(0.5, 1.5)
            self._send_report()

    def _fail_source(self) -> None:
        self.source = SilenceSource(0)
        if not self.source_done.done():
            self.source_done.set_result(None)

    def _send_one(self) -> None:
        timestamp = self._timestamp
        self._timestamp = (timestamp + self.samples_per_packet) & 0xFFFFFFFF
        if not self.send_enabled or self.remote is None or not self._io:
            return
        if self._dtmf_pending and self.dtmf_payload_type is not None:  # a flag: no property call per tick
            sender = self._dtmf_sender
            event = sender.tick(timestamp) if sender.busy else None
            if not sender.busy:
                self._dtmf_pending = False
                self._finish_dtmf()
            if event is not None:
                self._transmit(self.dtmf_payload_type, event.timestamp, event.payload, event.marker)
                return
        ended = self.source_done.done()
        pcm = None if ended else self.source.read(self.samples_per_packet)
        if pcm is None:
            if not ended:
                self.source_done.set_result(None)
            return
        self._transmit(self.codec.payload_type, timestamp, encode_frame(self.codec, pcm), self._marker)
        self._marker = False

    def _transmit(self, payload_type: int, timestamp: int, payload: bytes, marker: bool) -> None:
        remote = self.remote
        assert remote is not None
        # build_rtp inlined (the common packet: no CSRC, extension or padding); one call per packet less
        second = payload_type | 0x80 if marker else payload_type
        packet = _RTP_HEADER.pack(0x80, second, self._sequence, timestamp, self.ssrc) + payload
        self._sequence = (self._sequence + 1) & 0xFFFF
        sock = self._rtp_sock
        if sock is not None and self._send_path is None:
            try:
                if self._connected is not None:  # == remote (set_remote disconnects otherwise)
                    sock.send(packet)
                else:
                    sock.sendto(packet, remote)
            except OSError:  # a full buffer, or ICMP unreachable reported on this send: RTP is not retried
                self._send_dropped += 1
        else:
            self._sendto(sock, packet, remote)
        self._packets_sent += 1
        self._octets_sent += len(payload)
        self._sent_since_report = True

    def _play(self, frame: Playout) -> None:
        if frame.payload is not None:
            self._play_payload(frame.payload)
        elif frame.filler:
            self._play_payload(b"")
        elif self.sink is not None and self.recv_enabled:
            self._concealed_run += 1
            self.sink.write(conceal(self._last_frame, self._concealed_run, self.samples_per_packet))

    def _play_payload(self, payload: bytes) -> None:
        """Play a received payload (``b""``: a filler slot, played as silence)."""
        sink = self.sink
        if sink is None or not self.recv_enabled:
            return  # nobody listens: skip decoding
        if payload:
            pcm = self.codec.decode(payload)
            self._last_frame = pcm
            self._concealed_run = 0
        else:
            pcm = bytes(2 * self.samples_per_packet)
            self._last_frame = None
        sink.write(pcm)

    def _sendto(self, sock: socket.socket | None, packet: bytes, address: Address) -> None:
        if self._send_path is not None:
            self._send_path(packet, address)
            return
        if sock is None:
            return
        try:
            sock.sendto(packet, address)
        except OSError:  # a full buffer, or ICMP unreachable reported on this send: RTP is not retried
            self._send_dropped += 1

    # ---------------------------------------------------------------- receiving
    def _on_rtp_readable(self, now: float) -> None:
        """``now``: the loop's clock when the epoll set was polled (one reading for the burst it named)."""
        sock = self._rtp_sock
        if sock is None:
            return
        connected = self._connected
        try:
            if connected is not None:  # the kernel passes only the peer's datagrams: no address to read
                self._on_datagram(sock.recv(_MAX_DATAGRAM), connected, now)
                return
            data, addr = sock.recvfrom(_MAX_DATAGRAM)
        except OSError:  # EAGAIN, or ICMP port unreachable from an earlier send (peer not up yet): not fatal
            return
        self._on_datagram(data, (addr[0], addr[1]) if self._v6 else addr, now)

    def _connect(self, remote: Address) -> None:
        """Connect the RTP socket to the latched peer: ``send`` instead of ``sendto`` (no address to convert,
        the route looked up once) and ``recv`` instead of ``recvfrom``; the kernel drops other sources'
        datagrams, which a latched session rejected anyway. Undone by :meth:`set_remote` to another address
        and when the peer falls silent (:meth:`_watch_connection`), so that a moved peer is latched again."""
        sock = self._rtp_sock
        if sock is None or self._send_path is not None or not self.symmetric:
            self._may_connect = False  # without latching, packets from other addresses must still be heard
            return
        try:
            sock.connect(remote)
        except OSError:
            self._may_connect = False  # not on this socket, then: it stays unconnected (sendto, recvfrom)
            return
        self._connected = remote

    def _unconnect(self) -> None:
        self._connected = None
        sock = self._rtp_sock
        if sock is not None and sock.fileno() >= 0 and not _disconnect(sock):
            self._may_connect = False
            self.errors.append("could not disconnect the RTP socket: it hears only the first peer")

    def _watch_connection(self, now: float) -> None:
        """A connected session whose peer has been silent for ``RELATCH_AFTER`` seconds listens to every
        source again: the peer may have moved (a NAT rebinding), and its new address must be latchable."""
        if self._connected is not None and now - self._remote_last_seen > self.RELATCH_AFTER:
            self._unconnect()

    def _on_rtcp_readable(self, now: float) -> None:
        sock = self._rtcp_sock
        if sock is None:
            return
        try:
            data, addr = sock.recvfrom(_MAX_DATAGRAM)
        except OSError:
            return
        self._on_rtcp_datagram(data, (addr[0], addr[1]) if self._v6 else addr, now)

    def _on_datagram(self, data: bytes, addr: Address, now: float = -1.0) -> None:
        """One RTP (or, with rtcp-mux, RTCP) datagram; ``now`` the loop's clock at its arrival (read here when
        not given: an ICE path feeds datagrams without it)."""
        if now < 0:
            now = self._loop.time()
        if self.rtcp_mux and is_rtcp(data):
            self._on_rtcp_datagram(data, addr, now)
            return
        if len(data) >= 12 and data[0] == 0x80:  # the common case: no CSRC, extension or padding
            second, sequence, timestamp, ssrc = _FAST_HEADER.unpack_from(data)
            payload_type = second & 0x7F
            payload = data[12:]
            reception = self._reception
            if (
                payload_type == self.receive_payload_type
                and ssrc == self._remote_ssrc
                and addr == self.remote
                and reception is not None
            ):  # audio from the source already followed, where we send: the path of nearly every packet
                self._remote_last_seen = now
                self._packets_received += 1
                self._octets_received += len(payload)
                reception.update(sequence, timestamp, now)
                self.jitter.push(sequence, payload)
                if self._connected is None and self._may_connect:
                    self._connect(addr)
                return
        else:
            try:
                packet = RtpPacket.parse(data)
            except ParseError:
                self._rejected += 1
                return
            payload_type, sequence, timestamp, ssrc = (
                packet.payload_type,
                packet.sequence,
                packet.timestamp,
                packet.ssrc,
            )
            payload = packet.payload
        audio = payload_type == self.receive_payload_type
        dtmf = payload_type == self.receive_dtmf_payload_type
        if not audio and not dtmf and payload_type != 13:  # 13: comfort noise, played as silence
            self._rejected += 1
            return
        if ssrc != self._remote_ssrc:
            if self._remote_ssrc is not None and now - self._remote_last_seen < 0.5:
                self._rejected += 1  # a second source while the first is alive: not ours
                return
            self._remote_ssrc = ssrc
            self._reception = ReceptionStats(ssrc, self.codec.clock_rate)
        self._remote_last_seen = now
        if self.symmetric and addr != self.remote:
            self.remote = addr  # latch: send where the peer really is
            if not self._rtcp_latched:
                self.remote_rtcp = addr if self.rtcp_mux else (addr[0], addr[1] + 1)
        self._packets_received += 1
        self._octets_received += len(payload)
        assert self._reception is not None
        self._reception.update(sequence, timestamp, now, timing=audio)
        if audio:
            self.jitter.push(sequence, payload)
            return
        self.jitter.push(sequence, None)
        if dtmf:
            try:
                event = self._dtmf_receiver.receive(timestamp, payload)
            except ParseError:
                self._rejected += 1
                return
            if event is not None:
                self._on_digit(event)

    def _on_digit(self, event: DtmfEvent) -> None:
        if self.on_dtmf is not None:
            self.on_dtmf(event)
        count = len(self._dtmf_receiver.digits)
        for waiter, wanted in list(self._digit_waiters):
            if count >= wanted and not waiter.done():
                waiter.set_result(self._dtmf_receiver.digits)
        self._digit_waiters = [(w, n) for w, n in self._digit_waiters if not w.done()]

    def _on_rtcp_datagram(self, data: bytes, addr: Address, now: float) -> None:
        try:
            packets = parse_compound(data)
        except ParseError:
            self._rejected += 1
            return
        if self.symmetric:
            self.remote_rtcp = addr
            self._rtcp_latched = True
        for packet in packets:
            reception = self._reception
            if isinstance(packet, SenderReport) and reception is not None and packet.ssrc == reception.ssrc:
                reception.on_sender_report(packet.ntp, now)
            if isinstance(packet, SenderReport | ReceiverReport):
                for block in packet.reports:
                    if block.ssrc == self.ssrc:
                        self._remote_report = (block.cumulative_lost, block.fraction_lost, block.jitter)
                        if block.lsr:
                            arrival = ntp_middle(ntp_timestamp(time.time()))
                            rtt = ((arrival - block.lsr - block.dlsr) & 0xFFFFFFFF) / 65536
                            if rtt < 60:
                                self._rtt = rtt
            elif (
                isinstance(packet, Bye)
                and not self.remote_bye.done()
                and (self._remote_ssrc is None or self._remote_ssrc in packet.ssrcs)
            ):
                self.remote_bye.set_result(None)

    # --------------------------------------------------------------------- RTCP
    def _report(self) -> list[RtcpPacket]:
        now = self._loop.time()
        blocks = [self._reception.report_block(now)] if self._reception is not None else []
        first: RtcpPacket
        if self._sent_since_report:
            rtp_now = self._timestamp
            first = SenderReport(
                self.ssrc,
                ntp_timestamp(time.time()),
                rtp_now,
                self._packets_sent,
                self._octets_sent,
                blocks,
            )
        else:
            first = ReceiverReport(self.ssrc, blocks)
        self._sent_since_report = False
        return [first, SourceDescription({self.ssrc: self.cname})]

    def _send_rtcp(self, packets: list[RtcpPacket]) -> None:
        if self.remote_rtcp is None or not self._io:
            return
        # rtcp-mux (and the ICE path, which needs it) sends RTCP from the RTP socket
        sock = self._rtp_sock if self.rtcp_mux else self._rtcp_sock
        self._sendto(sock, build_compound(packets), self.remote_rtcp)

    def _send_report(self) -> None:
        self._send_rtcp(self._report())

    # ---------------------------------------------------------------------- DTMF
    def send_dtmf(self, digits: str, *, duration: float = 0.1, gap: float = 0.05) -> asyncio.Future[None]:
        """Queue RFC 4733 digits (``0-9 * # A-D``); the future completes when the last one has been sent.

        Audio pauses while a digit is sent (its packets take the audio's place). Raises ValueError for a bad
        digit, or if the peer did not offer telephone-event.
        """
        if self.dtmf_payload_type is None:
            raise ValueError("the peer did not negotiate telephone-event; DTMF cannot be sent")
        self._dtmf_sender.duration = max(self.samples_per_packet, round(duration * self.codec.clock_rate))
        self._dtmf_sender.gap = round(gap * self.codec.clock_rate)
        self._dtmf_sender.queue(digits)
        self._dtmf_pending = True
        future: asyncio.Future[None] = self._loop.create_future()
        self._dtmf_waiters.append(future)
        return future

    def _finish_dtmf(self) -> None:
        for future in self._dtmf_waiters:
            if not future.done():
                future.set_result(None)
        self._dtmf_waiters.clear()

    @property
    def received_digits(self) -> str:
        return self._dtmf_receiver.digits

    async def wait_digits(self, count: int, timeout: float | None = 10.0) -> str:
        """Wait until ``count`` digits have been received in total; returns them all (``timeout`` None:
        no limit; the wait is cancelled when the session closes)."""
        if len(self.received_digits) >= count:
            return self.received_digits
        future: asyncio.Future[str] = self._loop.create_future()
        self._digit_waiters.append((future, count))
        return await asyncio.wait_for(future, timeout)

    # --------------------------------------------------------------------- stats
    @property
    def stats(self) -> MediaStats:
        reception = self._reception
        expected = reception.expected if reception else 0
        lost = reception.lost if reception else 0
        remote = self._remote_report
        clock = self.codec.clock_rate
        jb = self.jitter.stats
        return MediaStats(
            packets_sent=self._packets_sent,
            octets_sent=self._octets_sent,
            packets_received=self._packets_received,
            octets_received=self._octets_received,
            lost=lost,
            fraction_lost=max(0, lost) / expected if expected else 0.0,
            jitter_ms=reception.jitter_seconds * 1000 if reception else 0.0,
            late=jb.late,
            duplicates=jb.duplicates,
            concealed=jb.concealed,
            underruns=jb.underruns,
            dtmf_received=self.received_digits,
            remote_lost=remote[0] if remote else None,
            remote_fraction_lost=remote[1] / 256 if remote else None,
            remote_jitter_ms=remote[2] * 1000 / clock if remote else None,
            rtt_ms=self._rtt * 1000 if self._rtt is not None else None,
            ticks=self._ticks,
            max_tick_lateness_ms=self._max_lateness * 1000,
            rejected=self._rejected,
            send_dropped=self._send_dropped,
        )

    # --------------------------------------------------------------------- close
    async def close(self, *, drain: bool = True, reason: str = "") -> None:
        """Stop: play what is still buffered into the sink (``drain``), send RTCP BYE, close everything."""
        if self.closed:
            return
        self.closed = True
        if self._ticker is not None:
            self._ticker.leave(self)
        if drain and self.sink is not None and self.recv_enabled:
            for frame in self.jitter.drain():
                self._play(frame)
        with contextlib.suppress(Exception):
            self._send_rtcp([*self._report(), Bye([self.ssrc], reason)])
        self._io = False
        for sock in (self._rtp_sock, self._rtcp_sock):
            self._close_socket(sock)
        self._rtp_sock = self._rtcp_sock = None
        for closable in (self.source, self.sink):
            if closable is not None:
                with contextlib.suppress(Exception):
                    closable.close()
        if not self.source_done.done():
            self.source_done.set_result(None)
        self._finish_dtmf()
        for waiter, _ in self._digit_waiters:
            if not waiter.done():
                waiter.cancel()

    def _close_socket(self, sock: socket.socket | None) -> None:
        if sock is None or sock.fileno() < 0:
            return
        _Poller.unwatch(self._loop, sock.fileno())
        sock.close()

    async def __aenter__(self) -> MediaSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Ticker:
    """One timer per event loop and packet interval drives every session's tick.

    Why shared: a call needs 50 ticks a second; with hundreds of calls, one timer each means hundreds of
    timer handles and heap operations per interval. One timer that walks the sessions costs one. Ticks fall
    at ``start + k * interval`` on the loop's monotonic clock, so a late tick is not carried into the next
    (no drift); if the loop falls behind, the missed intervals run at once (up to ``MAX_CATCH_UP``, beyond
    that they are skipped but the RTP clocks still advance, so timestamps keep matching real time).
    """

    MAX_CATCH_UP = 10
    SCAN_INTERVAL = 0.1  # seconds between the walks that send due RTCP reports and watch connected peers
    _running: ClassVar[dict[tuple[int, int], _Ticker]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, ptime: int) -> None:
        self.loop = loop
        self.key = (id(loop), ptime)
        self.interval = ptime / 1000
        self.sessions: dict[MediaSession, None] = {}
        self.start = loop.time()
        self.index = 0
        self.next_scan = self.start
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def join(cls, session: MediaSession) -> _Ticker:
        loop = asyncio.get_running_loop()
        key = (id(loop), session.ptime)
        ticker = cls._running.get(key)
        if ticker is None or ticker.loop is not loop:
            ticker = cls._running[key] = cls(loop, session.ptime)
        ticker.sessions[session] = None
        if ticker.handle is None:
            ticker.handle = loop.call_at(ticker._due(), ticker._fire)
        return ticker

    def leave(self, session: MediaSession) -> None:
        self.sessions.pop(session, None)
        if not self.sessions:
            if self.handle is not None:
                self.handle.cancel()
                self.handle = None
            if self._running.get(self.key) is self:
                del self._running[self.key]

    def _due(self) -> float:
        return self.start + (self.index + 1) * self.interval

    def _fire(self) -> None:
        now = self.loop.time()
        sessions = list(self.sessions)
        done = 0
        while (due := self._due()) <= now:
            self.index += 1
            done += 1
            if done > self.MAX_CATCH_UP:
                for session in sessions:
                    session._skip_tick()
                continue
            lateness = now - due
            for session in sessions:
                session._tick_once(lateness)
        if now >= self.next_scan:  # RTCP is due once in seconds: no need to ask every session every 20 ms
            self.next_scan = now + self.SCAN_INTERVAL
            for session in sessions:
                session._rtcp_due(now)
        self.handle = self.loop.call_at(self._due(), self._fire) if self.sessions else None


class _Poller:
    """One epoll set for every media socket of an event loop (see the module docstring)."""

    MAX_EVENTS = 1024
    MAX_ROUNDS = 4  # polls per wake-up while datagrams keep arriving (then back to the loop: timers wait)
    _running: ClassVar[dict[int, _Poller]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[float], None]] = {}
        loop.add_reader(self.epoll.fileno(), self._ready)

    @classmethod
    def watch(cls, loop: asyncio.AbstractEventLoop, fd: int, handler: Callable[[float], None]) -> None:
        """Call ``handler(now)`` when ``fd`` is readable (``now``: the loop's clock when it was found so)."""
        if not hasattr(select, "epoll"):
            loop.add_reader(fd, lambda: handler(loop.time()))
            return
        poller = cls._running.get(id(loop))
        if poller is None or poller.loop is not loop:
            if poller is not None:  # a loop that ended with sessions still open, its id reused
                poller.epoll.close()
            poller = cls._running[id(loop)] = cls(loop)
        poller.epoll.register(fd, select.EPOLLIN)
        poller.handlers[fd] = handler

    @classmethod
    def unwatch(cls, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        if not hasattr(select, "epoll"):
            loop.remove_reader(fd)
            return
        poller = cls._running.get(id(loop))
        if poller is None or poller.loop is not loop or poller.handlers.pop(fd, None) is None:
            return
        with contextlib.suppress(OSError):
            poller.epoll.unregister(fd)
        if not poller.handlers:
            del cls._running[id(loop)]
            if not loop.is_closed():
                loop.remove_reader(poller.epoll.fileno())
            poller.epoll.close()

    def _ready(self) -> None:
        """Read every socket with a datagram waiting; poll again (at most ``MAX_ROUNDS`` times in all) while
        more arrived meanwhile: with many calls, datagrams arrive in bursts (a far end sends its calls'
        packets one after another), and each extra round saves a pass of the event loop."""
        handlers = self.handlers
        poll = self.epoll.poll
        clock = self.loop.time
        for _ in range(self.MAX_ROUNDS):
            events = poll(0, self.MAX_EVENTS)
            if not events:
                return
            now = clock()  # one reading for the burst: every datagram it names arrived before this poll
            for fd, _ in events:
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(now)
                except Exception as error:  # one session's fault must not starve the others of their packets
                    self.loop.call_exception_handler(
                        {"message": "media socket handler failed", "exception": error, "handle": handler}
                    )


def _codec(spec: str | int | Codec) -> Codec:
    return codec(spec)
