"""Stack: the asyncio adapter that joins transports, the sans-IO transaction layer and a core (the TU).

::

    sockets ─▶ TransportLayer ─▶ Stack.on_message ─▶ TransactionLayer (sans-IO) ─▶ events ─▶ Core
    sockets ◀─ TransportLayer ◀─ Stack._run(events) ◀──────────────────────────────────────────┘

The transaction layer never sees a clock: the Stack passes ``loop.time()`` in and owns the single loop
timer that fires at ``TransactionLayer.next_deadline()``. A *core* (a :class:`~p2psip.useragent.UserAgent`
or a :class:`~p2psip.proxy.Proxy`) implements :class:`Core` and uses the Stack's small API to send:
:meth:`Stack.send_request` (a new client transaction), :meth:`Stack.respond` (through a server
transaction), :meth:`Stack.send_stateless` (ACK for a 2xx, stateless forwarding) and
:meth:`Stack.cancel`.

Quick start::

    stack = await Stack.start(listen=["udp:127.0.0.1:0"])
    ...
    await stack.close()
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Protocol

from p2psip.address import RELIABLE, ListenSpec, Target, bracket, names_local
from p2psip.errors import ParseError, TransactionError, TransportError
from p2psip.message import Limits, Request, Response, Via, new_branch
from p2psip.streamguard import StreamLimits
from p2psip.timers import DEFAULT_TIMERS, TimerConfig
from p2psip.transaction import (
    ClientTransaction,
    PassToTU,
    ServerTransaction,
    State,
    Terminated,
    Timeout,
    Transaction,
    TransactionLayer,
    Transmit,
    TransportFailure,
    TUEvent,
)
from p2psip.transport import SERVER, Observer, Source, TLSConfig, TransportLayer
from p2psip.uri import URI
from p2psip.websocket import OriginPolicy

log = logging.getLogger("p2psip.stack")

__all__ = ["Core", "Source", "Stack", "Target"]


class Core(Protocol):
    """The transaction user. Every method is called synchronously from the event loop and must not block.

    ``transaction`` is None for messages no transaction matched: an ACK for a 2xx, a stray or
    retransmitted 2xx after its client transaction ended — and everything when the core is stateless.
    """

    stateful: bool

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None: ...

    def on_response(
        self, response: Response, transaction: ClientTransaction | None, source: Source | None
    ) -> None: ...

    # A core that has nothing to do on these may inherit them (``class MyCore(Core)``).
    def on_timeout(self, transaction: Transaction, timer: str) -> None:
        """A client transaction timed out (Timer B/F/C): by default nothing more to do."""
        return None

    def on_transport_failure(self, transaction: Transaction, error: str) -> None:
        """Sending failed for ``transaction``: by default nothing more to do."""
        return None

    def on_terminated(self, transaction: Transaction) -> None:
        """``transaction`` ended; by default nothing to forget."""
        return None


class _NoCore(Core):
    """Until a core attaches: answer requests 503 so a peer is not left retransmitting."""

    stateful = True

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        if transaction is not None and request.method != "ACK":
            self.stack.respond(transaction, Response.for_request(request, 503, "No Service Attached"))

    def on_response(
        self, response: Response, transaction: ClientTransaction | None, source: Source | None
    ) -> None:
        pass


class Stack:
    """One SIP stack: its listeners, its transactions and one core."""

    def __init__(
        self,
        *,
        timers: TimerConfig = DEFAULT_TIMERS,
        limits: Limits | None = None,
        tls: TLSConfig | None = None,
        trying_delay: float | None = 0.0,
        idle_timeout: float = 300.0,
        verbose: bool = False,
        ws_origins: Iterable[str] = (),
        streams: StreamLimits | None = None,
        server: str | None = SERVER,
        reuse_port: bool = False,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.timers = timers
        self.verbose = verbose
        self.transport = TransportLayer(
            self.on_message,
            limits=limits,
            tls=tls,
            idle_timeout=idle_timeout,
            verbose=verbose,
            ws_origins=OriginPolicy(ws_origins),
            streams=streams,
            server=server,
        )
        self.transport.reuse_port = reuse_port
        self.transactions = TransactionLayer(timers, trying_delay=trying_delay)
        self.core: Core = _NoCore(self)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._closed = False
        # Requests switched from UDP to TCP for their size: where to retry over UDP if TCP is refused
        # (§18.1.1). Dropped when the transaction ends (a plain dict: the compiled build's transactions
        # take no weak references).
        self._udp_fallback: dict[ClientTransaction, Target] = {}
        """Requests moved from UDP to TCP by size (§18.1.1), with their UDP target: a refused connection
        sends them there after all (:meth:`_fall_back_to_udp`)."""
        self._local_cache: dict[str, tuple[str, int]] = {}
        self._encoded: tuple[Request, bytes] | None = None
        """The request :meth:`send_request` is sending and its bytes, while its events run."""
        self._is_local_cache: dict[tuple[str, int | None, str | None], bool] = {}
        self.branch_tag = ""
        """Appended to the branch of every client transaction: the worker that keeps it, so the other
        workers of the same proxy hand its responses over (:func:`p2psip.handoff.branch_tag`)."""
        self.before_refusal: Callable[[ServerTransaction], None] | None = None
        """Called before a 3xx-6xx final response to an INVITE goes out on a server transaction: a worker
        of a multi-process proxy tells the others that the ACK of that branch is its own
        (:meth:`p2psip.handoff.HandoffLink.refusing`); every other ACK any worker forwards itself."""

    @classmethod
    async def start(
        cls,
        listen: Iterable[str | ListenSpec] = ("udp:127.0.0.1:0",),
        *,
        timers: TimerConfig = DEFAULT_TIMERS,
        limits: Limits | None = None,
        tls: TLSConfig | None = None,
        trying_delay: float | None = 0.0,
        idle_timeout: float = 300.0,
        verbose: bool = False,
        ws_origins: Iterable[str] = (),
        streams: StreamLimits | None = None,
        server: str | None = SERVER,
        reuse_port: bool = False,
    ) -> Stack:
        """Create a stack and open its listeners (``[udp:|tcp:|tls:|ws:|wss:]HOST:PORT``; no prefix = UDP
        and TCP on one port; port 0 = any free port). The options are those of :class:`Stack`;
        ``ws_origins`` are web origins the WebSocket handshake admits besides loopback pages; ``streams``
        the caps and message deadline of incoming TCP/TLS/WebSocket connections (see
        :mod:`p2psip.streamguard`); ``server`` the ``Server`` header of the responses it makes (None:
        none); ``reuse_port`` opens UDP listeners with ``SO_REUSEPORT`` (the workers of one proxy)."""
        stack = cls(
            timers=timers,
            limits=limits,
            tls=tls,
            trying_delay=trying_delay,
            idle_timeout=idle_timeout,
            verbose=verbose,
            ws_origins=ws_origins,
            streams=streams,
            server=server,
            reuse_port=reuse_port,
        )
        try:
            for spec in listen:
                await stack.listen(spec)
        except BaseException:
            await stack.close()
            raise
        return stack

    async def listen(self, spec: str | ListenSpec) -> list[Target]:
        """Open more listeners. A spec without transport prefix opens UDP and TCP on the *same* port (with
        port 0, the one the system gave UDP), so that §18.1.1's switch to TCP finds us."""
        parsed = ListenSpec.parse(spec) if isinstance(spec, str) else spec
        if parsed.transport is None and parsed.port == 0:
            bound = await self.transport.listen_shared_port(parsed.host, parsed.transports())
        else:
            bound = [await self.transport.listen(one) for one in parsed.split()]
        self._is_local_cache.clear()
        self._local_cache.clear()
        return bound

    async def listen_on(self, sock: socket.socket) -> Target:
        """Listen on ``sock``, a UDP socket bound already: a worker of a proxy, whose sockets on the
        shared port the parent binds in worker order (:mod:`p2psip.workers`)."""
        bound = await self.transport.listen_on(sock)
        self._is_local_cache.clear()
        self._local_cache.clear()
        return bound

    def attach(self, core: Core) -> None:
        """Make ``core`` the transaction user of this stack (one core per stack)."""
        self.core = core

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(direction, data, remote)`` for every message this stack receives (``"in"``,
        the bytes as received) and sends (``"out"``): see :meth:`TransportLayer.add_observer`."""
        self.transport.add_observer(observer)

    def remove_observer(self, observer: Observer) -> None:
        self.transport.remove_observer(observer)

    @property
    def stats(self) -> dict[str, int]:
        """Transport counters plus the transaction layer's (prefixed ``transaction_``) and live counts."""
        out = dict(self.transport.stats)
        for key, value in self.transactions.stats.items():
            out[f"transaction_{key}"] = value
        out["transactions"] = len(self.transactions)
        out["connections"] = self.transport.connection_count()
        return out

    # ------------------------------------------------------------------------------- addresses

    def local_address(self, transport: str = "udp", toward: str | None = None) -> tuple[str, int]:
        """(host, port) this stack listens on for ``transport`` (of the address family of ``toward``)."""
        return self.transport.local_address(transport, toward)

    def addresses(self) -> list[str]:
        """Every listening address as ``transport:HOST:PORT`` (IPv6 in brackets), for status lines."""
        return [
            str(Target(transport, host, port))
            for transport, addrs in self.transport.listening.items()
            for host, port in addrs
        ]

    def local_uri(self, transport: str = "udp", *, user: str | None = None, toward: str | None = None) -> URI:
        """A URI that reaches this stack over ``transport``: for Contact and Record-Route."""
        host, port = self.local_address(transport, toward)
        params: dict[str, str | None] = {}
        scheme = "sip"
        if transport == "tls":
            scheme = "sips"
        elif transport == "tcp":
            params["transport"] = "tcp"
        elif transport in ("ws", "wss"):  # RFC 7118 §5.2: WSS is a sips: URI with transport=ws
            params["transport"] = "ws"
            scheme = "sips" if transport == "wss" else "sip"
        return URI.build(scheme=scheme, user=user, host=bracket(host), port=port, params=params)

    def is_local(self, host: str, port: int | None, transport: str | None = None) -> bool:
        """Whether host:port (a URI's or Via's) names this stack (memoized: asked for every request)."""
        key = (host, port, transport)
        cached = self._is_local_cache.get(key)
        if cached is None:
            cached = self._is_local(host, port, transport)
            if len(self._is_local_cache) > 4096:
                self._is_local_cache.clear()
            self._is_local_cache[key] = cached
        return cached

    def _is_local(self, host: str, port: int | None, transport: str | None) -> bool:
        advertised = self.transport.advertise_host
        return names_local(host, port, self.transport.listening, transport=transport, advertised=advertised)

    def sent_by(self, target: Target) -> tuple[str, int]:
        """The sent-by (host as written in a Via, port) for a request going to ``target``: over UDP the
        port of this process's own socket when it has one (:meth:`send_requests_from`)."""
        key = f"{target.transport}{':' in target.host}"
        cached = self._local_cache.get(key)
        if cached is None:
            host, port = self.local_address(target.transport, target.host)
            own = self.transport.own_port(target.host) if target.transport == "udp" else None
            cached = self._local_cache[key] = (bracket(host), own or port)
        return cached

    def send_requests_from(self, sock: socket.socket) -> None:
        """Send the UDP requests of client transactions from ``sock`` (bound, this process's alone) and name
        its port in their Via: a worker of a multi-process proxy, whose listening port is shared, so that
        the responses come back to it (:meth:`p2psip.transport.TransportLayer.own_socket`). Contact and
        Record-Route keep the shared address."""
        self.transport.own_socket(sock)
        self._local_cache.clear()

    def push_via(self, request: Request, target: Target, branch: str | None = None) -> str:
        """Put our Via (with ``rport``, RFC 3581) on top of ``request`` for ``target``; returns the branch."""
        host, port = self.sent_by(target)
        branch = branch or new_branch()
        via = Via.build(target.transport, host, port, branch=branch, rport=True)
        request.push_via(via)
        return branch

    # ---------------------------------------------------------------------------------- receive

    def on_message(self, message: Request | Response, source: Source) -> None:
        """Called by the transport layer for every well-formed message."""
        core = self.core
        if not core.stateful:
            if isinstance(message, Request):
                core.on_request(message, None, source)
            else:
                core.on_response(message, None, source)
            return
        now = self.loop.time()
        if isinstance(message, Request):
            events = self.transactions.receive_request(
                message, source, now, reliable=source.transport in RELIABLE
            )
        else:
            events = self.transactions.receive_response(message, source, now)
        if events:
            self._run(events)

    def _run(self, events: list[TUEvent]) -> None:
        """Perform what the transaction layer asked for, then re-arm the loop timer."""
        core = self.core
        for event in events:
            if isinstance(event, Transmit):
                self._transmit(event)
            elif isinstance(event, PassToTU):
                msg = event.message
                try:
                    if isinstance(msg, Request):
                        core.on_request(msg, event.transaction, event.source)  # type: ignore[arg-type]
                    else:
                        core.on_response(msg, event.transaction, event.source)  # type: ignore[arg-type]
                except Exception as exc:
                    self.transport.stats["handler_errors"] += 1
                    if isinstance(exc, ParseError):
                        log.info("core refused %r: %s", msg, exc)
                    else:
                        log.exception("core failed on %r", msg)
                    if isinstance(event.transaction, ServerTransaction):
                        self.answer_failure(event.transaction, exc)
            else:
                # A core failing on one event must not lose the events after it (nor the timer re-arm).
                try:
                    if isinstance(event, Terminated):
                        if self._udp_fallback and isinstance(event.transaction, ClientTransaction):
                            self._udp_fallback.pop(event.transaction, None)
                        core.on_terminated(event.transaction)
                    elif isinstance(event, Timeout):
                        core.on_timeout(event.transaction, event.timer)
                    elif isinstance(event, TransportFailure):
                        core.on_transport_failure(event.transaction, event.error)
                except Exception:
                    self.transport.stats["handler_errors"] += 1
                    log.exception("core failed on %r", event)
        self._arm()

    def _transmit(self, event: Transmit) -> None:
        message = event.message
        tx = event.transaction
        try:
            if isinstance(message, Request):
                dest = event.destination
                # Only a stream connect reports errors later; UDP raises at once (no closure per datagram).
                on_error = None if dest.transport == "udp" or tx is None else self._error_handler(tx)
                encoded = self._encoded
                data = encoded[1] if encoded is not None and encoded[0] is message else bytes(message)
                self.transport.send_request(data, dest, on_error)
            else:  # a Response, or the bytes a completed transaction kept of one (SentResponse)
                source = event.destination if isinstance(event.destination, Source) else None
                self.transport.send_response(message, source)
        except (TransportError, OSError) as exc:
            if tx is not None:
                self._transport_error(tx, exc)
            elif self.verbose:  # a retransmitted final response whose transaction ended (TransactionLayer)
                log.info("could not send %r again: %s", message, exc)

    def _error_handler(self, tx: Transaction) -> Callable[[Exception], None]:
        def on_error(exc: Exception) -> None:
            # A connection that fails after the final response arrived (perhaps on another connection)
            # costs this request nothing: only a request still waiting for its answer fails.
            live = tx.state in (State.CALLING, State.TRYING, State.PROCEEDING)
            if live and not self._fall_back_to_udp(tx, exc):
                self._transport_error(tx, exc)

        return on_error

    def _fall_back_to_udp(self, tx: Transaction, exc: Exception) -> bool:
        """RFC 3261 §18.1.1: a request sent over TCP only because it is over 1300 bytes, to a next hop that
        refuses or resets the connection (it listens on UDP only), "SHOULD" be retried over UDP: put a UDP
        Via back (same branch) and send it there, with UDP's retransmissions. True when it was."""
        if not isinstance(tx, ClientTransaction):
            return False
        udp = self._udp_fallback.pop(tx, None)
        if udp is None or not isinstance(exc.__cause__, ConnectionRefusedError | ConnectionResetError):
            return False
        request = tx.request
        request.remove_first("Via")
        self.push_via(request, udp, tx.key[0])
        events = self.transactions.fall_back_to_udp(tx, udp, self.loop.time())
        if not events:
            return False
        self.transport.stats["tcp_refused_udp_retry"] += 1
        if self.verbose:
            log.info("%s: %s; sent over UDP instead (RFC 3261 18.1.1)", tx, exc)
        self.loop.call_soon(self._run, events)
        return True

    def _transport_error(self, tx: Transaction, exc: Exception) -> None:
        if self.verbose:
            log.info("transport error for %r: %s", tx, exc)
        events = self.transactions.transport_error(tx, str(exc), self.loop.time())
        if events:
            self.loop.call_soon(self._run, events)

    # -------------------------------------------------------------------------------- timers

    def _arm(self) -> None:
        """Re-arm the loop timer after events, when a timer armed since then is due before it. Why not
        always: this runs after every message (a call's six messages arm ~11 timers), and a loop timer
        already due no later than any new one needs nothing; when it fires, :meth:`_fire` looks again."""
        if self.transactions.earliest_new < self._timer_at:
            self._arm_next()

    def _arm_next(self) -> None:
        deadline = self.transactions.next_deadline()
        if deadline is None or self._closed:
            return
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        events = self.transactions.handle_timers(self.loop.time())
        if events:
            self._run(events)
        self._arm_next()

    # ----------------------------------------------------------------------------------- send

    def send_request(
        self, request: Request, target: Target, *, timer_c: bool = False, branch: str | None = None
    ) -> ClientTransaction:
        """Send ``request`` to ``target`` on a new client transaction: pushes our Via (switching a large
        UDP request to TCP, §18.1.1) and returns the transaction (responses reach ``core.on_response``).
        ``branch`` (unique, with the magic cookie) replaces the random one: a proxy puts its loop-detection
        key in it (§16.6 step 8). A worker of a multi-process proxy ends it with its :attr:`branch_tag`."""
        if self.branch_tag:
            branch = (branch or new_branch()) + self.branch_tag
        branch = self.push_via(request, target, branch)
        udp = target
        encoded: bytes | None = None
        if target.transport == "udp":
            # Serialized once: measured for §18.1.1 here, and these very bytes are what the transaction's
            # first Transmit sends (_transmit), instead of estimating the size and serializing later.
            encoded = bytes(request)
            if len(encoded) > self.transport.udp_size_limit:
                target = self.transport.select(target, len(encoded))
                request.remove_first("Via")
                self.push_via(request, target, branch)
                encoded = None
        tx, events = self.transactions.send_request(
            request, target, self.loop.time(), reliable=target.transport in RELIABLE, timer_c=timer_c
        )
        if target is not udp:
            self._udp_fallback[tx] = udp
        self._encoded = (request, encoded) if encoded is not None else None
        try:
            self._run(events)
        finally:
            self._encoded = None
        return tx

    def respond(self, transaction: ServerTransaction, response: Response) -> None:
        """Send ``response`` through its server transaction (retransmissions and timers are handled)."""
        self.transport.stamp(response)
        if response.status >= 300 and self.before_refusal is not None and transaction.method == "INVITE":
            self.before_refusal(transaction)
        events = self.transactions.send_response(transaction, response, self.loop.time())
        self._run(events)

    def answer_failure(self, transaction: ServerTransaction, exc: BaseException) -> None:
        """End a server transaction whose transaction user failed: 400 naming the problem for a
        :class:`ParseError` (a header the core parsed lazily, e.g. a malformed second Via), else a plain
        500 (the exception's text stays in the local log: it may name files and lines). Does nothing when
        the transaction was already answered. The stack calls it for every exception a core raises, so
        no request is left without a final response and no transaction lives on unanswered."""
        last = transaction.last_response
        if transaction.terminated or (last is not None and last.status >= 200):
            return
        request = transaction.request
        if request.method == "ACK":
            return
        try:
            self.respond(transaction, Response.for_error(request, exc))
        except Exception:  # the answer itself could not be built or sent: free the transaction
            log.exception("cannot answer %r after its core failed", request)
            self.transactions.abandon(transaction)

    def cancel(self, transaction: ClientTransaction) -> None:
        """CANCEL a pending INVITE client transaction (§9.1; deferred until a provisional arrived)."""
        try:
            events = self.transactions.cancel(transaction, self.loop.time())
        except TransactionError:
            return
        self._run(events)

    def send_stateless(self, message: Request | Response, target: Target | Source | None = None) -> None:
        """Send without a transaction: a request (ACK for a 2xx, stateless forwarding) to ``target`` (the
        caller has put the Via on it) or a response along its Via (§18.2.2). Errors are counted only."""
        try:
            if isinstance(message, Response):
                source = target if isinstance(target, Source) else None
                self.transport.send_response(message, source)
            else:
                if target is None:
                    raise TransportError("a request needs a target")
                dest = target.target if isinstance(target, Source) else target
                self.transport.send(bytes(message), dest)
        except (TransportError, OSError) as exc:
            if self.verbose:
                log.info("stateless send failed: %s", exc)

    # ---------------------------------------------------------------------------------- close

    async def close(self) -> None:
        """Close listeners and connections and stop the timer. Pending transactions are abandoned."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.transport.close()

    async def __aenter__(self) -> Stack:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

