"""Sans-IO SIP transactions (RFC 3261 §17, as updated by RFC 6026).

A transaction is a pure state machine. The caller feeds it events — a request to send, a message that
arrived, a timer that fired, a transport error — together with ``now`` (seconds, any monotonic origin), and
gets back a list of *actions* to perform: :class:`Transmit` a message, :class:`StartTimer` /
:class:`CancelTimer`, hand a message to the transaction user (:class:`PassToTU`), report a
:class:`Timeout` or :class:`TransportFailure`, and finally :class:`Terminated`. No sockets, no clock, no
event loop: the tests drive every transition with a fake clock.

Four machines, as in RFC 6026's corrected figures:

* :class:`InviteClientTransaction` — Calling, Proceeding, Accepted, Completed, Terminated (timers A, B, D,
  M; optional proxy Timer C). It builds the ACK for a non-2xx final response itself (§17.1.1.3); the ACK
  for a 2xx belongs to the TU (the dialog), and 2xx retransmissions reach the TU in the Accepted state.
* :class:`NonInviteClientTransaction` — Trying, Proceeding, Completed, Terminated (timers E, F, K).
* :class:`InviteServerTransaction` — Proceeding, Completed, Confirmed, Accepted, Terminated (timers G, H,
  I, L). It sends the ``100 Trying`` itself: immediately by default, or after ``trying_delay`` seconds
  unless the TU has answered by then (§17.2.1 allows the 200 ms shortcut).
* :class:`NonInviteServerTransaction` — Trying, Proceeding, Completed, Terminated (timer J).

Retransmission timers (A, E, G) run only over unreliable transports, and the absorbing timers (D, I, J, K)
are zero on reliable ones, so a TCP transaction ends as soon as it can.

:class:`TransactionLayer` holds all transactions of a stack: it matches incoming messages to them (branch +
sent-by + method per §17.2.3, RFC 2543 fallback, ACK of a non-2xx to its INVITE, CANCEL to the INVITE it
cancels), keeps one timer heap (``next_deadline()`` / ``handle_timers(now)``), and drops transactions once
terminated. The Stack above only moves bytes and calls these methods.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, TypeAlias

from p2psip.errors import TransactionError
from p2psip.message import Request, Response, SentResponse
from p2psip.timers import DEFAULT_TIMERS, TimerConfig

MAGIC_COOKIE = "z9hG4bK"

Destination: TypeAlias = Any
"""Where a client transaction sends (and retransmits) its request, or where a server transaction's request
came from. Opaque to the transaction layer: the Stack chooses its form (e.g. ``(transport, host, port)``)."""

TransactionKey: TypeAlias = tuple[str, ...]
"""A hashable transaction identifier (see :func:`client_key` and :func:`server_key`)."""


class State(enum.Enum):
    """The states of all four machines (each machine uses a subset)."""

    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    ACCEPTED = "Accepted"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"


# --------------------------------------------------------------------------------------------- actions
# Plain (not frozen) slotted dataclasses: four times faster to build, and a proxy builds dozens per call.
# Treat them as read-only.
@dataclass(slots=True, eq=False)
class Transmit:
    """Send ``message`` to ``destination`` (a client transaction's destination, or the source a server
    transaction's request came from; responses may instead be routed by Via per §18.2.2). ``transaction``
    is None for a final response the layer sends again from a completed non-INVITE server transaction's
    bytes (see :class:`TransactionLayer`): the transaction object ended already."""

    message: Request | Response | SentResponse
    destination: Destination
    transaction: Transaction | None


@dataclass(slots=True, eq=False)
class StartTimer:
    """Arm timer ``name`` of ``transaction`` to fire at absolute time ``at`` (replaces an armed one)."""

    transaction: Transaction
    name: str
    at: float


@dataclass(slots=True, eq=False)
class CancelTimer:
    """Disarm timer ``name`` of ``transaction``."""

    transaction: Transaction
    name: str


@dataclass(slots=True, eq=False)
class PassToTU:
    """Hand ``message`` to the transaction user.

    From a client transaction: a response. From a server transaction: the request that created it, or an
    ACK received in the Accepted state. From :class:`TransactionLayer` with ``transaction=None``: a message
    no transaction matched — an ACK for a 2xx (its own transaction per §17), or a stray response (e.g. a 2xx
    retransmission after Timer M, which the UA core answers with its ACK again).
    """

    message: Request | Response
    transaction: Transaction | None
    source: Destination = None


@dataclass(slots=True, eq=False)
class Timeout:
    """The transaction timed out: ``timer`` is "B" / "F" (no final response: the TU should act as on a 408),
    "H" (no ACK for our non-2xx final), "C" (proxy Timer C: if the client INVITE transaction is in
    Proceeding the proxy must CANCEL it — see :meth:`TransactionLayer.cancel` — else it is terminated), or
    "CANCEL" (64·T1 after our CANCEL still no final response: the INVITE transaction is given up, §9.1; the
    TU acts as on a 487)."""

    transaction: Transaction
    timer: str


@dataclass(slots=True, eq=False)
class TransportFailure:
    """Sending failed (§17.1.4 / §17.2.4); the transaction terminates. The TU treats it like a 503."""

    transaction: Transaction
    error: str


@dataclass(slots=True, eq=False)
class Terminated:
    """The transaction reached Terminated; the layer forgets it and the TU may drop its references."""

    transaction: Transaction


Action: TypeAlias = Transmit | StartTimer | CancelTimer | PassToTU | Timeout | TransportFailure | Terminated
TUEvent: TypeAlias = Transmit | PassToTU | Timeout | TransportFailure | Terminated
"""What :class:`TransactionLayer` returns: timer actions are kept inside the layer."""


# --------------------------------------------------------------------------------------------- keys
_METHOD_NAMES: dict[str, str] = {}
_MAX_METHOD_NAMES = 64


_SENT_BY: dict[tuple[str, int | None], str] = {}
_MAX_SENT_BY = 4096


def _sent_by(host: str, port: int | None) -> str:
    """The sent-by part of a server key, ``host:port`` lower-cased, as one shared string per source: a
    lingering transaction keeps its key, and requests come from few hosts and ports (a proxy, phones that
    each keep theirs). Bounded: a full table starts again."""
    sent_by = _SENT_BY.get((host, port))
    if sent_by is None:
        if len(_SENT_BY) >= _MAX_SENT_BY:
            _SENT_BY.clear()
        sent_by = _SENT_BY[(host, port)] = f"{host.lower()}:{port if port is not None else ''}"
    return sent_by


def method_name(method: str) -> str:
    """``method`` upper-cased, as one shared string per name: a transaction keeps its method (and its key
    holds it) for as long as it lingers, and a new copy per request cost 57 bytes each. Bounded: methods
    are tokens anyone may send; past 64 names a new one is upper-cased as before."""
    name = _METHOD_NAMES.get(method)
    if name is None:
        name = method.upper()
        if len(_METHOD_NAMES) < _MAX_METHOD_NAMES:
            name = _METHOD_NAMES[method] = _METHOD_NAMES.get(name, name)
    return name


def client_key(message: Request | Response) -> TransactionKey:
    """The key of the client transaction a request creates or a response belongs to (§17.1.3): the top Via
    branch and the CSeq method (so a CANCEL, which reuses the INVITE's branch, is its own transaction)."""
    via = message.top_via
    return ((via.params.get("branch") or "") if via is not None else "", message.cseq.method.upper())


def server_key(request: Request) -> TransactionKey:
    """The key of the server transaction a request belongs to (§17.2.3).

    With an RFC 3261 branch: branch, sent-by and method (ACK counts as INVITE, so an ACK for a non-2xx
    finds its INVITE). Without one (RFC 2543 peers): Request-URI, From tag, Call-ID, CSeq number, method and
    the top Via; the To tag is checked separately (:meth:`TransactionLayer.receive_request`).
    """
    method = method_name(request.method)
    if method == "ACK":
        method = "INVITE"
    via = request.top_via  # read once: this runs for every request received
    branch = (via.params.get("branch") or "") if via is not None else ""
    if branch.startswith(MAGIC_COOKIE):
        assert via is not None
        return ("3261", branch, _sent_by(via.host, via.port), method)
    return (
        "2543",
        str(request.uri),
        request.from_.tag or "",
        request.call_id,
        str(request.cseq.number),
        method,
        str(via) if via is not None else "",
    )


def cancel_target_key(cancel: Request) -> TransactionKey:
    """The server key of the INVITE a CANCEL cancels (§9.2: same branch/sent-by, or same 2543 fields)."""
    key = server_key(cancel)
    return (*key[:-1], "INVITE") if key[0] == "3261" else (*key[:5], "INVITE", key[6])


# --------------------------------------------------------------------------------------------- builders
def _copy_routes(source: Request) -> list[tuple[str, str]]:
    return [("Route", value) for value in source.get_all("Route")]


def make_ack(invite: Request, response: Response) -> Request:
    """The ACK for a non-2xx final response, built by the client transaction (§17.1.1.3).

    Same Request-URI, Call-ID, From, CSeq number and single top Via (same branch) as the INVITE, the To of
    the response (with its tag), the INVITE's Route headers.
    """
    return Request.create(
        "ACK",
        invite.uri.copy(),
        from_=invite.from_,
        to=response.to,
        call_id=invite.call_id,
        cseq=invite.cseq.number,
        via=invite.top_via,
        max_forwards=70,
        headers=_copy_routes(invite),
    )


def make_cancel(invite: Request) -> Request:
    """A CANCEL for ``invite`` (§9.1): same Request-URI, Call-ID, From, To, CSeq number, top Via and
    Route set; the method is CANCEL. Send it on its own client transaction (:meth:`TransactionLayer.cancel`
    also waits for a provisional response first, as §9.1 requires)."""
    return Request.create(
        "CANCEL",
        invite.uri.copy(),
        from_=invite.from_,
        to=invite.to,
        call_id=invite.call_id,
        cseq=invite.cseq.number,
        via=invite.top_via,
        max_forwards=70,
        headers=_copy_routes(invite),
    )


# --------------------------------------------------------------------------------------------- base
class Transaction:
    """Common state: the request, the reliability of the transport, the timers armed.

    ``context`` is a free slot for the TU (e.g. its call object); transactions hash by identity.
    """

    # Slots, no __dict__: a proxy holds thousands of live and lingering INVITE transactions
    # (docs/benchmarks.md, memory); __weakref__ for the stack's WeakKeyDictionary of UDP fall-backs.
    __slots__ = (
        "__weakref__",
        "_method",
        "context",
        "deadlines",
        "history",
        "key",
        "last_response",
        "reliable",
        "request",
        "state",
        "timers",
    )

    kind = "transaction"
    key: TransactionKey
    """How the layer finds it (:func:`client_key` / :func:`server_key`), set by the client and server."""

    def __init__(self, request: Request, *, reliable: bool, timers: TimerConfig = DEFAULT_TIMERS) -> None:
        self.request = request
        """The request that created the transaction."""
        self._method = method_name(request.method)
        self.reliable = reliable
        self.timers = timers
        self.state = State.TERMINATED
        self.last_response: Response | SentResponse | None = None
        """The last response sent (server) or received (client); the final response of a non-INVITE server
        transaction is encoded once (:class:`~p2psip.message.SentResponse`): the layer keeps only its bytes
        while it absorbs retransmissions for Timer J (see :class:`TransactionLayer`)."""
        self.deadlines: dict[str, float] = {}
        """The armed timers, name -> absolute fire time (read-only for callers)."""
        self.context: Any = None
        self.history: list[State] = []
        """Every state entered, in order (for tests and debugging)."""

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    @property
    def method(self) -> str:
        return self._method

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} {self.state.value}>"

    # helpers for subclasses ------------------------------------------------------------------------
    def _enter(self, state: State) -> None:
        self.state = state
        self.history.append(state)

    def _start(self, out: list[Action], name: str, now: float, delay: float) -> None:
        at = now + delay
        self.deadlines[name] = at
        out.append(StartTimer(self, name, at))

    def _cancel(self, out: list[Action], name: str) -> None:
        if self.deadlines.pop(name, None) is not None:
            out.append(CancelTimer(self, name))

    def _terminate(self, out: list[Action]) -> None:
        for name in list(self.deadlines):
            self._cancel(out, name)
        self._enter(State.TERMINATED)
        out.append(Terminated(self))

    def _fire_check(self, name: str, now: float) -> bool:
        """Whether timer ``name`` is armed and due (a stale, re-armed or unknown timer is ignored, so a
        driver that could not cancel an old timer handle does no harm); disarms it."""
        at = self.deadlines.get(name)
        if at is None or now < at - 1e-9:
            return False
        del self.deadlines[name]
        return True

    def timer_fired(self, name: str, now: float) -> list[Action]:
        """Timer ``name`` fired. Unknown or no-longer-armed timers are ignored (returns [])."""
        raise NotImplementedError

    def transport_error(self, error: str, now: float) -> list[Action]:
        """The transport could not send one of our messages: inform the TU, terminate (§17.1.4, §17.2.4)."""
        out: list[Action] = []
        if self.terminated:
            return out
        out.append(TransportFailure(self, error))
        self._terminate(out)
        return out


# --------------------------------------------------------------------------------------------- clients
class ClientTransaction(Transaction):
    """Base of the client machines: sends ``request`` to ``destination`` and collects responses."""

    __slots__ = ("destination", "provisional_received")

    kind = "client"

    def __init__(
        self,
        request: Request,
        destination: Destination,
        *,
        reliable: bool,
        timers: TimerConfig = DEFAULT_TIMERS,
    ) -> None:
        super().__init__(request, reliable=reliable, timers=timers)
        self.destination = destination
        self.key = client_key(request)
        self.provisional_received = False

    def _send(self, out: list[Action], message: Request | Response) -> None:
        out.append(Transmit(message, self.destination, self))

    def start(self, now: float) -> list[Action]:
        """Send the request for the first time and arm the initial timers."""
        raise NotImplementedError

    def receive_response(self, response: Response, now: float) -> list[Action]:
        """A response matching this transaction arrived."""
        raise NotImplementedError

    def fall_back_to_udp(self, destination: Destination, now: float) -> list[Action]:
        """RFC 3261 §18.1.1: a request that went over TCP only because of its size, whose connection was
        refused or reset, is sent again over UDP. The TU has already put a UDP Via (same branch: the
        transaction's key) on ``request``; this sends it to ``destination`` and arms the retransmission
        timer of an unreliable transport (A or E). Only before any response: afterwards it does nothing."""
        out: list[Action] = []
        if not self.reliable or self.state not in (State.CALLING, State.TRYING):
            return out
        self.reliable = False
        self.destination = destination
        self._send(out, self.request)
        self._start_retransmit(out, now)
        return out

    def _start_retransmit(self, out: list[Action], now: float) -> None:
        raise NotImplementedError


class InviteClientTransaction(ClientTransaction):
    """RFC 6026 Figure 5 (INVITE client transaction).

    ``timer_c=True`` (proxies, §16.6 step 11 / §16.8) arms Timer C, reset by every provisional response
    from 101 to 199; when it fires the transaction reports ``Timeout(timer="C")``: in Calling it also
    terminates (the proxy acts as on a 408), in Proceeding it stays so that the proxy's CANCEL can collect
    the 487.
    """

    __slots__ = ("_a_interval", "ack", "use_timer_c")

    def __init__(
        self,
        request: Request,
        destination: Destination,
        *,
        reliable: bool,
        timers: TimerConfig = DEFAULT_TIMERS,
        timer_c: bool = False,
    ) -> None:
        super().__init__(request, destination, reliable=reliable, timers=timers)
        self.use_timer_c = timer_c
        self.ack: Request | None = None
        self._a_interval = timers.a()

    def start(self, now: float) -> list[Action]:
        if self.history:
            raise TransactionError("the INVITE client transaction was already started")
        out: list[Action] = []
        self._enter(State.CALLING)
        self._send(out, self.request)
        if not self.reliable:
            self._start_retransmit(out, now)
        self._start(out, "B", now, self.timers.b())
        if self.use_timer_c:
            self._start(out, "C", now, self.timers.timer_c)
        return out

    def _start_retransmit(self, out: list[Action], now: float) -> None:
        self._start(out, "A", now, self._a_interval)

    def receive_response(self, response: Response, now: float) -> list[Action]:
        out: list[Action] = []
        status = response.status
        state = self.state
        if state in (State.CALLING, State.PROCEEDING):
            if status < 200:
                self.provisional_received = True
                if state is State.CALLING:
                    self._cancel(out, "A")
                    self._cancel(out, "B")
                    self._enter(State.PROCEEDING)
                if self.use_timer_c and status > 100:
                    self._start(out, "C", now, self.timers.timer_c)
                self.last_response = response
                out.append(PassToTU(response, self))
            elif status < 300:
                self._cancel(out, "A")
                self._cancel(out, "B")
                self._cancel(out, "C")
                self._cancel(out, "CANCEL")
                self.last_response = response
                self._enter(State.ACCEPTED)
                self._start(out, "M", now, self.timers.m())
                out.append(PassToTU(response, self))
            else:
                self._cancel(out, "A")
                self._cancel(out, "B")
                self._cancel(out, "C")
                self._cancel(out, "CANCEL")
                self.last_response = response
                self.ack = make_ack(self.request, response)
                self._send(out, self.ack)
                self._enter(State.COMPLETED)
                delay = self.timers.d(self.reliable)
                out.append(PassToTU(response, self))
                if delay > 0:
                    self._start(out, "D", now, delay)
                else:
                    self._terminate(out)
        elif state is State.ACCEPTED:
            if 200 <= status < 300:
                out.append(PassToTU(response, self))  # RFC 6026: 2xx retransmissions (or forks) to the TU
        elif state is State.COMPLETED and status >= 300 and self.ack is not None:
            self._send(out, self.ack)  # retransmitted final response: ACK again, not to the TU
        return out

    def cancel_sent(self, now: float) -> list[Action]:
        """A CANCEL for this INVITE went out (:meth:`TransactionLayer.cancel` calls this). If no final
        response comes within 64·T1, the transaction gives up (§9.1): ``Timeout(timer="CANCEL")``, and the
        TU treats the INVITE as answered 487. Without this guard a dead callee would leave the transaction
        in Proceeding for ever (Proceeding has no timer of its own)."""
        out: list[Action] = []
        if self.state in (State.CALLING, State.PROCEEDING) and "CANCEL" not in self.deadlines:
            self._start(out, "CANCEL", now, 64 * self.timers.t1)
        return out

    def timer_fired(self, name: str, now: float) -> list[Action]:
        out: list[Action] = []
        if not self._fire_check(name, now):
            return out
        if name == "CANCEL" and self.state in (State.CALLING, State.PROCEEDING):
            out.append(Timeout(self, "CANCEL"))
            self._terminate(out)
        elif name == "A" and self.state is State.CALLING:
            self._send(out, self.request)
            self._a_interval *= 2
            self._start(out, "A", now, self._a_interval)
        elif name == "B" and self.state is State.CALLING:
            out.append(Timeout(self, "B"))
            self._terminate(out)
        elif name == "C" and self.state in (State.CALLING, State.PROCEEDING):
            out.append(Timeout(self, "C"))
            if self.state is State.CALLING:
                self._terminate(out)
        elif name in ("D", "M") and self.state is {"D": State.COMPLETED, "M": State.ACCEPTED}[name]:
            self._terminate(out)
        return out


class NonInviteClientTransaction(ClientTransaction):
    """RFC 3261 Figure 6 (non-INVITE client transaction). Not for ACK, which has no transaction."""

    __slots__ = ("_e_interval",)

    def __init__(
        self,
        request: Request,
        destination: Destination,
        *,
        reliable: bool,
        timers: TimerConfig = DEFAULT_TIMERS,
    ) -> None:
        if request.method.upper() in ("INVITE", "ACK"):
            raise TransactionError(f"{request.method} cannot use a non-INVITE client transaction")
        super().__init__(request, destination, reliable=reliable, timers=timers)
        self._e_interval = timers.e()

    def start(self, now: float) -> list[Action]:
        if self.history:
            raise TransactionError("the non-INVITE client transaction was already started")
        out: list[Action] = []
        self._enter(State.TRYING)
        self._send(out, self.request)
        if not self.reliable:
            self._start_retransmit(out, now)
        self._start(out, "F", now, self.timers.f())
        return out

    def _start_retransmit(self, out: list[Action], now: float) -> None:
        self._start(out, "E", now, self._e_interval)

    def receive_response(self, response: Response, now: float) -> list[Action]:
        out: list[Action] = []
        if self.state not in (State.TRYING, State.PROCEEDING):
            return out  # Completed: retransmitted finals are absorbed
        self.last_response = response
        if response.status < 200:
            self.provisional_received = True
            if self.state is State.TRYING:
                self._enter(State.PROCEEDING)
            out.append(PassToTU(response, self))
            return out
        self._cancel(out, "E")
        self._cancel(out, "F")
        self._enter(State.COMPLETED)
        out.append(PassToTU(response, self))
        delay = self.timers.k(self.reliable)
        if delay > 0:
            self._start(out, "K", now, delay)
        else:
            self._terminate(out)
        return out

    def timer_fired(self, name: str, now: float) -> list[Action]:
        out: list[Action] = []
        if not self._fire_check(name, now):
            return out
        if name == "E" and self.state in (State.TRYING, State.PROCEEDING):
            self._send(out, self.request)
            # Trying: double up to T2. Proceeding: retransmit every T2 (§17.1.2.2).
            if self.state is State.TRYING:
                self._e_interval = min(2 * self._e_interval, self.timers.t2)
            else:
                self._e_interval = self.timers.t2
            self._start(out, "E", now, self._e_interval)
        elif name == "F" and self.state in (State.TRYING, State.PROCEEDING):
            out.append(Timeout(self, "F"))
            self._terminate(out)
        elif name == "K" and self.state is State.COMPLETED:
            self._terminate(out)
        return out


# --------------------------------------------------------------------------------------------- servers
class ServerTransaction(Transaction):
    """Base of the server machines: answers ``request`` (which came from ``source``)."""

    __slots__ = ("source",)

    kind = "server"

    def __init__(
        self,
        request: Request,
        source: Destination,
        *,
        reliable: bool,
        timers: TimerConfig = DEFAULT_TIMERS,
    ) -> None:
        super().__init__(request, reliable=reliable, timers=timers)
        self.source = source
        self.key = server_key(request)

    def _send(self, out: list[Action], message: Request | Response | SentResponse) -> None:
        out.append(Transmit(message, self.source, self))

    @property
    def to_tag(self) -> str | None:
        """The To tag of the request (RFC 2543 matching, §17.2.3)."""
        return self.request.to.tag

    def start(self, now: float) -> list[Action]:
        """Enter the initial state and pass the request to the TU."""
        raise NotImplementedError

    def receive_request(self, request: Request, now: float) -> list[Action]:
        """A retransmission of the request (or, for INVITE, an ACK) matching this transaction arrived."""
        raise NotImplementedError

    def send_response(self, response: Response, now: float) -> list[Action]:
        """The TU answers. Raises :class:`TransactionError` when the state machine does not allow it."""
        raise NotImplementedError

    def _refuse(self, response: Response) -> TransactionError:
        return TransactionError(
            f"cannot send {response.status} on a {self.method} server transaction in state {self.state.value}"
        )


class InviteServerTransaction(ServerTransaction):
    """RFC 6026 Figure 7 (INVITE server transaction).

    ``trying_delay``: 0 sends ``100 Trying`` at once (default); a positive value sends it only if the TU
    has not responded within that many seconds (timer "Trying"; §17.2.1 allows 200 ms); None never sends it.
    """

    __slots__ = ("_g_interval", "trying_delay")

    def __init__(
        self,
        request: Request,
        source: Destination,
        *,
        reliable: bool,
        timers: TimerConfig = DEFAULT_TIMERS,
        trying_delay: float | None = 0.0,
    ) -> None:
        if request.method.upper() != "INVITE":
            raise TransactionError(f"{request.method} cannot use an INVITE server transaction")
        super().__init__(request, source, reliable=reliable, timers=timers)
        self.trying_delay = trying_delay
        self._g_interval = timers.g()

    def _trying(self, out: list[Action]) -> None:
        trying = Response.for_request(self.request, 100)
        self.last_response = trying
        self._send(out, trying)

    def start(self, now: float) -> list[Action]:
        if self.history:
            raise TransactionError("the INVITE server transaction was already started")
        out: list[Action] = []
        self._enter(State.PROCEEDING)
        if self.trying_delay is not None:
            if self.trying_delay <= 0:
                self._trying(out)
            else:
                self._start(out, "Trying", now, self.trying_delay)
        out.append(PassToTU(self.request, self, self.source))
        return out

    def receive_request(self, request: Request, now: float) -> list[Action]:
        out: list[Action] = []
        is_ack = request.method.upper() == "ACK"
        state = self.state
        if state is State.PROCEEDING:
            if not is_ack and self.last_response is not None:
                self._send(out, self.last_response)
        elif state is State.COMPLETED:
            if is_ack:
                self._cancel(out, "G")
                self._cancel(out, "H")
                self._enter(State.CONFIRMED)
                delay = self.timers.i(self.reliable)
                if delay > 0:
                    self._start(out, "I", now, delay)
                else:
                    self._terminate(out)
            elif self.last_response is not None:
                self._send(out, self.last_response)
        elif state is State.ACCEPTED and is_ack:
            out.append(PassToTU(request, self, self.source))  # RFC 6026 §7.1; INVITE retransmits absorbed
        return out  # Confirmed: ACK retransmissions absorbed

    def send_response(self, response: Response, now: float) -> list[Action]:
        out: list[Action] = []
        status = response.status
        state = self.state
        if state is State.PROCEEDING:
            self._cancel(out, "Trying")
            self.last_response = response
            self._send(out, response)
            if status < 200:
                return out
            if status < 300:
                self._enter(State.ACCEPTED)
                self._start(out, "L", now, self.timers.l())
                return out
            self._enter(State.COMPLETED)
            if not self.reliable:
                self._start(out, "G", now, self._g_interval)
            self._start(out, "H", now, self.timers.h())
            return out
        if state is State.ACCEPTED and 200 <= status < 300:
            self._send(out, response)  # the TU's 2xx retransmissions (§13.3.1.4) pass through
            return out
        raise self._refuse(response)

    def timer_fired(self, name: str, now: float) -> list[Action]:
        out: list[Action] = []
        if not self._fire_check(name, now):
            return out
        state = self.state
        if name == "Trying" and state is State.PROCEEDING:
            if self.last_response is None:
                self._trying(out)
        elif name == "G" and state is State.COMPLETED and self.last_response is not None:
            self._send(out, self.last_response)
            self._g_interval = min(2 * self._g_interval, self.timers.t2)
            self._start(out, "G", now, self._g_interval)
        elif name == "H" and state is State.COMPLETED:
            out.append(Timeout(self, "H"))
            self._terminate(out)
        elif (name == "I" and state is State.CONFIRMED) or (name == "L" and state is State.ACCEPTED):
            self._terminate(out)
        return out


class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 Figure 8 (non-INVITE server transaction)."""

    __slots__ = ()

    def __init__(
        self,
        request: Request,
        source: Destination,
        *,
        reliable: bool,
        timers: TimerConfig = DEFAULT_TIMERS,
    ) -> None:
        if request.method.upper() in ("INVITE", "ACK"):
            raise TransactionError(f"{request.method} cannot use a non-INVITE server transaction")
        super().__init__(request, source, reliable=reliable, timers=timers)

    def start(self, now: float) -> list[Action]:
        if self.history:
            raise TransactionError("the non-INVITE server transaction was already started")
        self._enter(State.TRYING)
        return [PassToTU(self.request, self, self.source)]

    def receive_request(self, request: Request, now: float) -> list[Action]:
        out: list[Action] = []
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            self._send(out, self.last_response)
        return out  # Trying: absorbed

    def send_response(self, response: Response, now: float) -> list[Action]:
        out: list[Action] = []
        if self.state not in (State.TRYING, State.PROCEEDING):
            raise self._refuse(response)
        if response.status < 200:
            self.last_response = response
            self._send(out, response)
            if self.state is State.TRYING:
                self._enter(State.PROCEEDING)
            return out
        self._enter(State.COMPLETED)
        delay = self.timers.j(self.reliable)
        if delay > 0:
            # Encoded once, here: sent now and, by the layer, for every retransmission until Timer J.
            self.last_response = SentResponse(response)
            self._send(out, self.last_response)
            self._start(out, "J", now, delay)
        else:
            self.last_response = response
            self._send(out, response)
            self._terminate(out)
        return out

    def timer_fired(self, name: str, now: float) -> list[Action]:
        out: list[Action] = []
        if self._fire_check(name, now) and name == "J" and self.state is State.COMPLETED:
            self._terminate(out)
        return out

    def hand_over(self) -> list[Action]:
        """End this object in Completed, its final response sent: the layer absorbs retransmissions of the
        request from the response's bytes until Timer J (see :class:`TransactionLayer`), as it would
        itself. Cancels Timer J; returns the :class:`Terminated` action (what reliable transports, where
        Timer J is 0, get at once too)."""
        out: list[Action] = []
        if self.state is State.COMPLETED:
            self._terminate(out)
        return out


# --------------------------------------------------------------------------------------------- layer
#: Timers armed on entering a state that only absorbs retransmissions (RFC 6026's Accepted, Completed,
#: Confirmed): the transaction lingers until they fire, its messages no longer read. Not J: the layer
#: keeps a completed non-INVITE server transaction as its response's bytes instead (see _Absorbing).
_LINGER_TIMERS = frozenset({"D", "I", "K", "L", "M"})

_Absorbing: TypeAlias = tuple[float, TransactionKey, bytes, str | None]
"""A completed non-INVITE server transaction as the layer keeps it until Timer J (RFC 3261 §17.2.2):
(Timer J's fire time, its key, the bytes of its final response, the request's To tag for RFC 2543
matching or None).

Why not the transaction object: in Completed it only answers a retransmitted request with the same final
response, and a registrar at 300 REGISTER/s holds rate x 32 s = 9,600 of them; the object, its timer
dict, history, heap entry and SentResponse cost about twice these bytes (docs/benchmarks.md, memory).
Timer J is the same delay for every one of them, so they expire in the order they completed: a FIFO
deque, no heap entry. A tuple of strings, bytes and a float is untracked by the garbage collector."""

_TimerEntry: TypeAlias = tuple[float, int, bool, TransactionKey, str]
"""(fire time, sequence number, client?, transaction key, timer name).

The entry names its transaction by key, not by reference: cancelled timers stay in the heap until their
time comes (heapq cannot remove), and an entry holding the transaction would keep an ended one — with its
messages — alive that long (Timer C: 180 s). Holding only strings, an entry costs the garbage collector
nothing after its first pass, and the heap needs no compaction: the compaction pass this replaced walked
100,000 entries in ~140 ms, a stall every ~25 s for a proxy at 500 calls/s. Plain tuples compare in C,
and the unique sequence number means the keys are never compared."""


class TransactionLayer:
    """All transactions of one stack: matching, one timer heap, clean-up.

    Every method takes ``now`` and returns the :data:`TUEvent` list to perform, in order: ``Transmit``
    (the Stack sends it), ``PassToTU`` (the TU handles it), ``Timeout`` / ``TransportFailure`` /
    ``Terminated`` (the TU updates its state). Timer actions stay inside the layer: call
    :meth:`handle_timers` when :meth:`next_deadline` is reached.
    """

    def __init__(self, timers: TimerConfig = DEFAULT_TIMERS, *, trying_delay: float | None = 0.0) -> None:
        self.timers = timers
        self.trying_delay = trying_delay
        self.clients: dict[TransactionKey, ClientTransaction] = {}
        self.servers: dict[TransactionKey, ServerTransaction] = {}
        self.stats: Counter[str] = Counter()
        """Counters: ``retransmissions``, ``absorbed``, ``timeouts``, ``transport_failures``,
        ``stray_responses``, ``stray_acks``."""
        self._heap: list[_TimerEntry] = []
        self._seq = 0
        self.earliest_new = float("inf")
        """The earliest fire time of the timers armed since :meth:`next_deadline` last ran (infinity when
        none): a driver whose own timer is due no later need not ask :meth:`next_deadline` again."""
        self._pending_cancels: dict[InviteClientTransaction, Any] = {}
        self._lingering: list[Transaction] = []
        """Transactions that entered a lingering state during the last call: their messages' parsed
        views are dropped at the start of the next call (the TU has handled the event by then)."""
        self._absorbing: dict[TransactionKey, _Absorbing] = {}
        """Completed non-INVITE server transactions waiting for Timer J, by key (see :data:`_Absorbing`)."""
        self._absorbing_order: deque[_Absorbing] = deque()
        """The same, in completion order = Timer J order."""

    def __len__(self) -> int:
        return len(self.clients) + len(self.servers) + len(self._absorbing)

    # --- internal --------------------------------------------------------------------------------
    def _process(self, actions: list[Action]) -> list[TUEvent]:
        events: list[TUEvent] = []
        heap = self._heap
        for action in actions:
            if type(action) is StartTimer:
                tx = action.transaction
                if action.name == "J" and isinstance(tx, NonInviteServerTransaction):
                    self._absorb(tx, action.at)
                    events.extend(self._process(tx.hand_over()))
                    continue
                if action.name in _LINGER_TIMERS:
                    self._lingering.append(tx)
                self._seq += 1
                at = action.at
                if at < self.earliest_new:
                    self.earliest_new = at
                client = isinstance(tx, ClientTransaction)
                heapq.heappush(heap, (at, self._seq, client, tx.key, action.name))
            elif type(action) is CancelTimer:
                pass  # lazily dropped: an entry only fires if it still matches transaction.deadlines
            elif type(action) is Transmit or type(action) is PassToTU:
                events.append(action)
            else:
                if isinstance(action, Terminated):
                    self._forget(action.transaction)
                elif isinstance(action, Timeout):
                    self.stats["timeouts"] += 1
                elif isinstance(action, TransportFailure):
                    self.stats["transport_failures"] += 1
                events.append(action)  # type: ignore[arg-type]
        return events

    def _absorb(self, tx: NonInviteServerTransaction, at: float) -> None:
        """Keep completed ``tx`` as its final response's bytes until Timer J fires at ``at``."""
        sent = tx.last_response
        assert isinstance(sent, SentResponse)
        key = tx.key
        entry = (at, key, sent.data, tx.to_tag if key[0] == "2543" else None)
        self._absorbing[key] = entry
        self._absorbing_order.append(entry)
        if at < self.earliest_new:
            self.earliest_new = at

    def _absorbed(self, key: TransactionKey, request: Request, source: Destination) -> list[TUEvent] | None:
        """A retransmission of the request of a completed non-INVITE server transaction: its final
        response again, byte for byte (§17.2.2), to where the retransmission came from. None if ``key``
        is no such transaction (or, RFC 2543 matching, the To tag differs)."""
        entry = self._absorbing.get(key)
        if entry is None or (key[0] == "2543" and entry[3] != request.to.tag):
            return None
        self.stats["absorbed"] += 1
        self.stats["retransmissions"] += 1
        return [Transmit(SentResponse(entry[2]), source, None)]

    def _expire_absorbing(self, now: float) -> None:
        """Forget the completed non-INVITE server transactions whose Timer J is due at ``now``."""
        order = self._absorbing_order
        absorbing = self._absorbing
        while order and order[0][0] <= now:
            _at, key, data, _tag = order.popleft()
            kept = absorbing.get(key)
            # Not replaced (RFC 2543: same key, other To tag)? Compared by the bytes object: mypyc
            # passes these tuples by value, so the tuples themselves are never the same object.
            if kept is not None and kept[2] is data:
                del absorbing[key]

    def _shed(self) -> None:
        """Drop the parsed views of the messages that lingering transactions keep (see
        :meth:`~p2psip.message.Message.forget_views`): the request, the last response and the ACK."""
        for tx in self._lingering:
            tx.request.forget_views()
            if isinstance(tx.last_response, Response):
                tx.last_response.forget_views()
            if isinstance(tx, InviteClientTransaction) and tx.ack is not None:
                tx.ack.forget_views()
        self._lingering.clear()

    def _armed(self, entry: _TimerEntry) -> Transaction | None:
        """The transaction of a heap entry if that timer is still armed at that time (not cancelled,
        re-armed or ended), else None."""
        at, _seq, client, key, name = entry
        tx: Transaction | None = (self.clients if client else self.servers).get(key)
        return tx if tx is not None and tx.deadlines.get(name) == at else None

    def _forget(self, transaction: Transaction) -> None:
        if isinstance(transaction, ClientTransaction):
            if self.clients.get(transaction.key) is transaction:
                del self.clients[transaction.key]
            if isinstance(transaction, InviteClientTransaction):
                self._pending_cancels.pop(transaction, None)
        elif isinstance(transaction, ServerTransaction) and self.servers.get(transaction.key) is transaction:
            del self.servers[transaction.key]

    def abandon(self, transaction: Transaction) -> None:
        """Forget ``transaction`` without another message (its timers then never fire): for a server
        transaction whose final response could not even be built, which must not live on for ever."""
        self._forget(transaction)

    # --- client side -----------------------------------------------------------------------------
    def send_request(
        self,
        request: Request,
        destination: Destination,
        now: float,
        *,
        reliable: bool,
        timer_c: bool = False,
    ) -> tuple[ClientTransaction, list[TUEvent]]:
        """Start a client transaction for ``request`` (which must carry its top Via with a fresh branch).

        ACK is refused: the ACK for a 2xx is sent by the TU directly (no transaction), the ACK for a
        non-2xx by the INVITE client transaction. ``timer_c`` arms proxy Timer C on an INVITE.
        """
        if self._lingering:
            self._shed()
        method = request.method.upper()
        if method == "ACK":
            raise TransactionError("ACK is sent without a transaction (the TU transmits the 2xx ACK itself)")
        tx: ClientTransaction
        if method == "INVITE":
            tx = InviteClientTransaction(
                request, destination, reliable=reliable, timers=self.timers, timer_c=timer_c
            )
        else:
            tx = NonInviteClientTransaction(request, destination, reliable=reliable, timers=self.timers)
        if tx.key in self.clients:
            raise TransactionError(f"a {method} client transaction with branch {tx.key[0]!r} exists already")
        self.clients[tx.key] = tx
        return tx, self._process(tx.start(now))

    def receive_response(self, response: Response, source: Destination, now: float) -> list[TUEvent]:
        """A response arrived: give it to its client transaction, or to the TU as a stray response."""
        if self._lingering:
            self._shed()
        tx = self.clients.get(client_key(response))
        if tx is None:
            self.stats["stray_responses"] += 1
            return [PassToTU(response, None, source)]
        events = self._process(tx.receive_response(response, now))
        if (
            isinstance(tx, InviteClientTransaction)
            and tx in self._pending_cancels
            and tx.state is State.PROCEEDING
        ):
            reliable = self._pending_cancels.pop(tx)
            events.extend(self._send_cancel(tx, now, reliable))
        return events

    def cancel(
        self, transaction: ClientTransaction, now: float, *, reliable: bool | None = None
    ) -> list[TUEvent]:
        """Cancel a pending INVITE (§9.1): send a CANCEL on its own client transaction once a provisional
        response has arrived (deferred until then); nothing if a final response came already."""
        if not isinstance(transaction, InviteClientTransaction):
            raise TransactionError("only an INVITE client transaction can be cancelled")
        use_reliable = transaction.reliable if reliable is None else reliable
        if transaction.state is State.PROCEEDING:
            return self._send_cancel(transaction, now, use_reliable)
        if transaction.state is State.CALLING:
            self._pending_cancels[transaction] = use_reliable
        return []

    def _send_cancel(self, invite_tx: InviteClientTransaction, now: float, reliable: bool) -> list[TUEvent]:
        cancel = make_cancel(invite_tx.request)
        if client_key(cancel) in self.clients:
            return []  # already cancelled
        _tx, events = self.send_request(cancel, invite_tx.destination, now, reliable=reliable)
        events.extend(self._process(invite_tx.cancel_sent(now)))
        return events

    # --- server side -----------------------------------------------------------------------------
    def receive_request(
        self, request: Request, source: Destination, now: float, *, reliable: bool
    ) -> list[TUEvent]:
        """A request arrived. Retransmissions and the ACK of a non-2xx are absorbed by their transaction;
        a new request creates a server transaction and reaches the TU; an ACK that matches nothing (the ACK
        for a 2xx) reaches the TU with ``transaction=None``."""
        if self._lingering:
            self._shed()
        key = server_key(request)
        method = request.method.upper()
        tx = self.servers.get(key)
        if tx is not None and key[0] == "2543" and not self._to_tag_matches(tx, request):
            tx = None
        if tx is not None and method == "ACK" and not isinstance(tx, InviteServerTransaction):
            tx = None
        if tx is None and self._absorbing and method != "ACK":
            absorbed = self._absorbed(key, request, source)
            if absorbed is not None:
                return absorbed
        if tx is not None:
            events = self._process(tx.receive_request(request, now))
            if not any(isinstance(e, PassToTU) for e in events):
                self.stats["absorbed"] += 1
                if any(isinstance(e, Transmit) for e in events):
                    self.stats["retransmissions"] += 1
            return events
        if method == "ACK":
            self.stats["stray_acks"] += 1
            return [PassToTU(request, None, source)]
        new: ServerTransaction
        if method == "INVITE":
            new = InviteServerTransaction(
                request, source, reliable=reliable, timers=self.timers, trying_delay=self.trying_delay
            )
        else:
            new = NonInviteServerTransaction(request, source, reliable=reliable, timers=self.timers)
        self.servers[key] = new
        return self._process(new.start(now))

    @staticmethod
    def _to_tag_matches(tx: ServerTransaction, request: Request) -> bool:
        tag = request.to.tag
        if request.method.upper() == "ACK":
            sent = tx.last_response
            return isinstance(sent, Response) and sent.to.tag == tag
        return tx.to_tag == tag

    def send_response(self, transaction: ServerTransaction, response: Response, now: float) -> list[TUEvent]:
        """The TU answers through ``transaction`` (raises :class:`TransactionError` if not allowed)."""
        return self._process(transaction.send_response(response, now))

    def find_invite_for_cancel(self, cancel: Request) -> InviteServerTransaction | None:
        """The INVITE server transaction a CANCEL refers to (§9.2), or None (then answer the CANCEL 481).

        The TU answers the CANCEL itself (200) on the CANCEL's own server transaction and, if the INVITE
        has no final response yet, answers the INVITE 487 (UA) or cancels its branches (proxy).
        """
        tx = self.servers.get(cancel_target_key(cancel))
        return tx if isinstance(tx, InviteServerTransaction) else None

    # --- both ------------------------------------------------------------------------------------
    def transport_error(self, transaction: Transaction, error: str, now: float) -> list[TUEvent]:
        """The Stack could not send a message of ``transaction``."""
        return self._process(transaction.transport_error(error, now))

    def fall_back_to_udp(self, transaction: ClientTransaction, destination: Destination, now: float
                         ) -> list[TUEvent]:  # fmt: skip
        """See :meth:`ClientTransaction.fall_back_to_udp`."""
        return self._process(transaction.fall_back_to_udp(destination, now))

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timers` must be called next (None: no timer armed). May be early (a
        cancelled timer): calling ``handle_timers`` then is harmless."""
        self.earliest_new = float("inf")
        absorbing = self._absorbing_order[0][0] if self._absorbing_order else None
        heap = self._heap
        while heap:
            if self._armed(heap[0]) is not None:
                at = heap[0][0]
                return at if absorbing is None or at < absorbing else absorbing
            heapq.heappop(heap)
        return absorbing

    def handle_timers(self, now: float) -> list[TUEvent]:
        """Fire every timer due at ``now`` (in deadline order) and return the resulting events."""
        if self._lingering:
            self._shed()
        if self._absorbing_order:
            self._expire_absorbing(now)
        events: list[TUEvent] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            tx = self._armed(entry)
            if tx is None:
                continue  # cancelled, re-armed, or its transaction ended
            name = entry[4]
            fired = tx.timer_fired(name, now)
            if name in ("A", "E", "G") and any(isinstance(a, Transmit) for a in fired):
                self.stats["retransmissions"] += 1
            events.extend(self._process(fired))
        return events
