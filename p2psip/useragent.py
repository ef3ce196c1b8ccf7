"""UserAgent: the UA core (RFC 3261 §8, §13-§15, §10 client) as the transaction user of a Stack.

One object makes and answers calls, registers (with refresh and digest authentication), and sends and
receives MESSAGE and OPTIONS. Dialog state lives in :class:`p2psip.dialog.Dialog` and digest in
:mod:`p2psip.auth`; this module only decides what to send when, and exposes it as ``async`` methods::

    ua = UserAgent(stack, "sip:alice@127.0.0.1")
    call = await ua.call("sip:bob@127.0.0.1:5070")     # INVITE, provisional, 200, ACK
    await call.bye()

    incoming = await ua.incoming.get()                  # or UserAgent(..., on_call=callback)
    incoming.accept()                                   # or .reject(486)

Timers the UA needs of its own (2xx retransmission until the ACK, registration refresh) run on the
stack's loop; transaction timers stay in the transaction layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from p2psip.address import parse_target, target_from_uri
from p2psip.auth import answer_challenge
from p2psip.background import Background
from p2psip.callaudio import AudioOfferAnswer, OfferAnswer, Play, Record, home_stun, ice_by_default
from p2psip.dialog import Dialog, DialogId, DialogState, dialog_id_of_request, dialog_id_of_response
from p2psip.errors import AuthError, CallFailed, P2PSIPError, ParseError, TransportError
from p2psip.media.call import CallMedia
from p2psip.message import Request, Response, new_tag
from p2psip.sipfrag import FragStatus
from p2psip.stack import Source, Stack, Target
from p2psip.transaction import ClientTransaction, InviteClientTransaction, ServerTransaction, Transaction
from p2psip.transfer import check_replaces, receive_refer
from p2psip.turngrant import TURN_HEADER, TurnGrant
from p2psip.uaevents import EventsAgent, IncomingSubscription, Notification, OutgoingSubscription
from p2psip.uri import URI, Address

__all__ = ["Call", "CallFailed", "IncomingCall", "OutgoingCall", "UserAgent"]

log = logging.getLogger("p2psip.useragent")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, INFO, UPDATE, SUBSCRIBE, NOTIFY, REFER"
SUPPORTED = "replaces, norefersub"
STUN_PROBE_TIMEOUT = 0.5
"""How long a UA with an ``instance`` waits, once, for its unregistered outbound proxy to answer STUN."""
TURN_MARGIN = 60.0
"""A TURN grant this close to its expiry is not used for a new call (its allocation would be refused)."""


class _Pending:
    """A client request waiting for its final response (futures are the UA's adapter to asyncio)."""

    def __init__(self, ua: UserAgent, request: Request, template: Request, target: Target) -> None:
        self.ua = ua
        self.request = request
        self.template = template  # the request as built, without our Via: the base of an auth retry
        self.target = target
        self.final: asyncio.Future[Response] = ua.loop.create_future()
        self.auth_tries = 0
        self.transaction: ClientTransaction | None = None
        self.dialog: Dialog | None = None  # set for a re-INVITE: its 2xx is ACKed in this dialog
        self.listener: Callable[[Response], None] | None = None  # every response (UserAgent.send_request)

    def on_response(self, response: Response) -> None:
        if self.listener is not None:
            self.listener(response)
        if response.status >= 200 and not self.final.done():
            self.final.set_result(response)

    def on_failure(self, status: int, reason: str) -> None:
        if not self.final.done():
            self.final.set_exception(CallFailed(status, reason))


class Call:
    """What both ends of a call share: the dialog, the state and hanging up."""

    def __init__(self, ua: UserAgent) -> None:
        self.ua = ua
        self.dialog: Dialog | None = None
        self.state = "init"  # calling, early, ringing, confirmed, terminated
        self.remote_body: bytes = b""
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.media: CallMedia | None = None
        """The call's audio when it was placed or accepted with media (p2psip.callaudio); closed when the
        call ends, however it ends."""
        self._media_stopping: asyncio.Future[None] | None = None

    async def bye(self, timeout: float | None = 32.0) -> Response:
        """Hang up (BYE in the dialog); returns the BYE's final response."""
        dialog = self.dialog
        if dialog is None or dialog.state is DialogState.TERMINATED:
            raise CallFailed(481, "Call/Transaction Does Not Exist (no dialog to end)")
        request = dialog.create_request("BYE")
        self._end("bye sent")
        dialog.terminate()
        try:
            return await self.ua._request(request, timeout=timeout)
        finally:
            self.ua._dialogs.pop(dialog.id, None)
            await self._media_stopped()

    async def send(
        self,
        method: str,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        timeout: float | None = 32.0,
    ) -> Response:
        """Send a request inside the dialog (INFO, UPDATE, MESSAGE, NOTIFY, or INVITE for a re-INVITE,
        whose 2xx is ACKed here); returns the final response. The dialog follows target refreshes."""
        dialog = self.dialog
        if dialog is None or dialog.state is DialogState.TERMINATED:
            raise CallFailed(481, "Call/Transaction Does Not Exist (no dialog)")
        request = dialog.create_request(
            method, body=body, content_type=content_type if body else None, headers=headers
        )
        if method.upper() == "INVITE":
            pending = self.ua._send(request)
            pending.dialog = dialog
            response = await asyncio.wait_for(asyncio.shield(pending.final), timeout)
        else:
            response = await self.ua._request(request, timeout=timeout)
        dialog.receive_response(request, response)
        if dialog.state is DialogState.TERMINATED:  # type: ignore[comparison-overlap]  # 481/408
            self._end(f"failed {response.status}")
        return response

    async def transfer(
        self, target: str | URI | Call, *, refer_sub: bool = True, hangup: bool = True, timeout: float = 64.0
    ) -> FragStatus | None:
        """Transfer this call (REFER, RFC 3515): to a URI (blind) or to another of our calls (attended,
        with Replaces). Returns the new call's final status from the referee's NOTIFYs (None with
        ``refer_sub=False``); on success the call is hung up. See :mod:`p2psip.transfer`."""
        from p2psip import transfer

        return await transfer.transfer(self, target, refer_sub=refer_sub, hangup=hangup, timeout=timeout)

    def local_description(self) -> tuple[bytes, str]:
        """The body (SDP) and content type this end gave the call: what a transfer offers again."""
        return b"", "application/sdp"

    def _replaced(self) -> None:
        """A call that replaces this one (RFC 3891) was answered: hang this one up."""
        dialog = self.dialog
        if self.state != "terminated" and dialog is not None and dialog.state is DialogState.CONFIRMED:
            task = asyncio.ensure_future(self.bye())
            task.add_done_callback(lambda t: t.exception())

    async def wait_ended(self, timeout: float | None = None) -> str:
        """Wait until the call is over; returns why (``bye received``, ``bye sent``, ``cancelled``...)."""
        await asyncio.wait_for(self.ended.wait(), timeout)
        await self._media_stopped()  # a recording is complete once this returns
        return self.end_reason

    async def hold(self, timeout: float | None = 32.0) -> Response:
        """Put the call's audio on hold (re-INVITE offering ``sendonly``); returns the final response."""
        return await self.ua.offer_answer.reoffer(self, "sendonly", timeout)

    async def resume(self, timeout: float | None = 32.0) -> Response:
        """Take the call off hold (re-INVITE offering ``sendrecv``); returns the final response."""
        return await self.ua.offer_answer.reoffer(self, "sendrecv", timeout)

    async def restart_ice(self, timeout: float | None = 32.0) -> Response:
        """Re-INVITE that restarts ICE (RFC 8445 §9: new credentials, new checks, the media moves to the
        pair they select), keeping the direction we last asked for; returns the final response."""
        media = self.media
        direction = media.wanted_direction if media is not None else "sendrecv"
        return await self.ua.offer_answer.reoffer(self, direction, timeout, ice_restart=True)

    async def send_dtmf(self, digits: str, *, duration: float = 0.1, gap: float = 0.05) -> None:
        """Send DTMF ``digits`` (0-9 * # A-D) as RFC 4733 events in the call's audio."""
        await self.ua.offer_answer.send_dtmf(self, digits, duration=duration, gap=gap)

    async def _media_stopped(self) -> None:
        if self._media_stopping is not None:
            await asyncio.shield(self._media_stopping)

    def _end(self, reason: str) -> None:
        if self.state != "terminated":
            self.state = "terminated"
            self.end_reason = reason
            self.ended.set()
            if self.media is not None:
                self._media_stopping = self.ua.offer_answer.close_when_ended(self)


class OutgoingCall(Call):
    """A call we place: ``await call.answered()`` (raises :class:`CallFailed`), ``call.cancel()``."""

    def __init__(self, ua: UserAgent, pending: _Pending) -> None:
        super().__init__(ua)
        self.pending = pending
        self.state = "calling"
        self.response: Response | None = None
        self.provisional: list[Response] = []
        self.early = asyncio.Event()
        """Set by the first provisional response above 100 (from then on a CANCEL can go out at once)."""
        self.cancelled = False
        self.on_provisional: Callable[[Response], None] | None = None
        """Called with each provisional response as it arrives (a phone shows "180 Ringing" at once)."""

    async def answered(self, timeout: float | None = None) -> Response:
        """Wait for the 2xx (the ACK is already sent when this returns); failures raise CallFailed."""
        return await asyncio.wait_for(asyncio.shield(self.pending.final), timeout)

    def local_description(self) -> tuple[bytes, str]:
        request = self.pending.request
        return request.body, request.get("Content-Type") or "application/sdp"

    def _replaced(self) -> None:
        if self.state in ("calling", "early"):
            self.cancel()  # replaced while it rings
        else:
            super()._replaced()

    def cancel(self) -> None:
        """CANCEL the INVITE (sent once a provisional response has arrived, §9.1)."""
        self.cancelled = True
        tx = self.pending.transaction
        if tx is not None and isinstance(tx, InviteClientTransaction):
            self.ua.stack.cancel(tx)

    def give_up(self) -> None:
        """The caller stopped waiting for the answer (its timeout ran out, or its task was cancelled, e.g.
        by ``asyncio.wait_for``): CANCEL the INVITE while it is pending, so the far end stops ringing; a
        2xx that arrived in the same instant makes a call nobody holds any more, so it is hung up."""
        if self.state == "confirmed":
            self.ua._tasks.spawn(self.bye())
        else:
            self.cancel()


class IncomingCall(Call):
    """A call offered to us: ``ring()``, then ``accept(body)`` or ``reject(code)``."""

    def __init__(self, ua: UserAgent, request: Request, transaction: ServerTransaction) -> None:
        super().__init__(ua)
        self.request = request
        self.transaction = transaction
        self.state = "offered"
        self.remote_body = request.body
        self.local_tag = new_tag()
        self.confirmed = asyncio.Event()
        self.replaces: Call | None = None
        """The call this one replaces (its INVITE had Replaces, RFC 3891): hung up once this is answered."""
        self._retransmit: asyncio.TimerHandle | None = None
        self._final: Response | None = None

    def local_description(self) -> tuple[bytes, str]:
        if self._final is None:
            return b"", "application/sdp"
        return self._final.body, self._final.get("Content-Type") or "application/sdp"

    @property
    def caller(self) -> Address:
        return self.request.from_

    @property
    def stack(self) -> Stack:
        return self.ua.stack

    def _response(self, status: int, reason: str | None = None) -> Response:
        response = Response.for_request(self.request, status, reason, to_tag=self.local_tag)
        if 100 < status < 300:
            # §12.1.1: a response that creates a dialog carries the request's Record-Route, in order.
            for value in self.request.get_all("Record-Route"):
                response.add("Record-Route", value)
            response.add("Contact", str(self.ua._contact(self.transaction.source)))
        return response

    def ring(self) -> None:
        """Send ``180 Ringing``."""
        if self.state == "offered":
            self.state = "ringing"
            self.ua.stack.respond(self.transaction, self._response(180))

    def accept(self, body: bytes = b"", content_type: str | None = "application/sdp") -> None:
        """Answer with ``200 OK`` (and ``body``, e.g. an SDP answer); retransmitted until the ACK."""
        if self.state not in ("offered", "ringing"):
            raise CallFailed(481, f"cannot accept a call in state {self.state}")
        response = self._response(200)
        if body:
            response.body = body
            if content_type:
                response.set("Content-Type", content_type)
        self.dialog = Dialog.uas(self.request, response)
        self.ua._dialogs[self.dialog.id] = self
        self.state = "accepted"
        self._final = response
        self.ua.stack.respond(self.transaction, response)
        if not self.transaction.reliable:
            self._schedule_retransmit(self.ua.stack.timers.t1, 0.0)
        if self.replaces is not None:
            self.replaces._replaced()

    async def accept_with_media(
        self,
        *,
        play: Play = None,
        record: Record = None,
        media: CallMedia | None = None,
        media_options: dict[str, Any] | None = None,
    ) -> CallMedia:
        """Answer with audio: ``200 OK`` with our SDP answer, playing ``play`` (a WAV path or a source) and
        recording to ``record`` (a WAV path or a sink). Bad or unusable SDP: 488 and CallFailed."""
        # ICE by default with a home peer that answers STUN; our home peer is the STUN server
        options = home_stun(await self.ua._default_ice(media_options), self.ua.outbound)
        return await self.ua.offer_answer.accept(
            self, play=play, record=record, media=media, media_options=options
        )

    def reject(self, status: int = 486, reason: str | None = None) -> None:
        """Decline with a final failure response (486 Busy Here by default)."""
        if status < 300:
            raise ValueError("reject() needs a status of 300 or more")
        if self.state in ("offered", "ringing"):
            self.ua.stack.respond(self.transaction, self._response(status, reason))
            self._end(f"rejected {status}")

    def _unanswered(self) -> None:
        if self.state in ("offered", "ringing") and not self.transaction.terminated:
            self.reject(480, "Temporarily Unavailable (not answered)")

    def _schedule_retransmit(self, interval: float, elapsed: float) -> None:
        """§13.3.1.4: the UAS core retransmits the 2xx (T1, doubling to T2) until the ACK, for 64*T1."""
        timers = self.ua.stack.timers
        if elapsed + interval > 64 * timers.t1:
            self._retransmit = self.ua.loop.call_later(max(0.0, 64 * timers.t1 - elapsed), self._no_ack)
            return

        def again() -> None:
            if self.state == "accepted" and self._final is not None:
                if self.transaction.terminated:
                    self.ua.stack.send_stateless(self._final, self.transaction.source)
                else:
                    self.ua.stack.respond(self.transaction, self._final)
                self._schedule_retransmit(min(2 * interval, timers.t2), elapsed + interval)

        self._retransmit = self.ua.loop.call_later(interval, again)

    def _no_ack(self) -> None:
        if self.state == "accepted":  # §13.3.1.4: no ACK: confirm and end the session with a BYE
            self.state = "confirmed"
            task = asyncio.ensure_future(self.bye())
            task.add_done_callback(lambda t: t.exception())

    def _acked(self) -> None:
        if self._retransmit is not None:
            self._retransmit.cancel()
            self._retransmit = None
        if self.state == "accepted":
            self.state = "confirmed"
            if self.dialog is not None:
                self.dialog.state = DialogState.CONFIRMED
            self.confirmed.set()

    def _end(self, reason: str) -> None:
        if self._retransmit is not None:
            self._retransmit.cancel()
            self._retransmit = None
        super()._end(reason)


class _Registration:
    def __init__(self, registrar: URI, target: Target, username: str | None, password: str | None) -> None:
        self.registrar = registrar
        self.target = target
        self.username = username
        self.password = password
        self.call_id = ""
        self.cseq = 0
        self.expires = 0
        self.refresh: asyncio.TimerHandle | None = None
        self.contact: str = ""
        self.custom_contact: str | None = None
        self.keepalive: asyncio.Task[None] | None = None
        """RFC 5626 §4.4: keep-alives over the flow of an outbound registration (with a Flow-Timer)."""
        self.outbound_confirmed = False
        """The registrar's 200 said ``Require: outbound``: it is our edge proxy for RFC 5626 (and answers
        STUN on its UDP port, §8)."""
        self.mapped: tuple[str, int] | None = None
        self.failures = 0
        """Refreshes that failed in a row (the RFC 5626 §4.5 back-off grows with them)."""
        self.turn: TurnGrant | None = None
        """TURN credentials the registrar's last 200 granted (``P-P2PSIP-TURN``, :mod:`p2psip.turngrant`)."""


class UserAgent:
    """The UA core for one address of record on ``stack`` (it attaches itself as the stack's core).

    ``outbound`` (``"HOST:PORT"``, ``"tcp:HOST:PORT"`` or a Target) sends every out-of-dialog request
    through that proxy. ``username``/``password`` answer digest challenges (401/407) on any request.
    ``on_call(incoming_call)`` and ``on_message(request)`` are optional callbacks; calls and messages are
    also queued on :attr:`incoming` and :attr:`messages`, which keep the latest ``queue_limit`` of each
    (older ones are dropped): a long-running UA that answers in a callback and never reads the queues
    must not keep every call it ever had.
    """

    stateful = True

    def __init__(
        self,
        stack: Stack,
        aor: str | URI,
        *,
        display: str | None = None,
        outbound: str | Target | None = None,
        username: str | None = None,
        password: str | None = None,
        on_call: Callable[[IncomingCall], None] | None = None,
        on_message: Callable[[Request], None] | None = None,
        user_agent: str | None = "p2psip",
        answer_timeout: float = 180.0,
        offer_answer: OfferAnswer | None = None,
        queue_limit: int = 100,
        events: Iterable[str] = (),
        on_subscribe: Callable[[IncomingSubscription], None] | None = None,
        accept_transfers: bool = True,
        instance: str | None = None,
    ) -> None:
        self.stack = stack
        self.instance = instance
        """RFC 5626 ``+sip.instance`` (e.g. ``<urn:uuid:...>``): with it, registrations are outbound ones
        (``reg-id=1``), kept alive over their flow with STUN or CRLF keep-alives at the registrar's
        ``Flow-Timer``, and registered again at once when the flow fails (a keep-alive unanswered, or
        answered with another reflexive address: the NAT mapping changed)."""
        self._stun: dict[bytes, asyncio.Future[tuple[str, int] | None]] = {}
        self._outbound_probe: asyncio.Task[tuple[str, int] | None] | None = None
        if instance is not None:
            stack.transport.on_stun = self._on_stun
        self.loop = stack.loop
        self.aor = URI(aor) if isinstance(aor, str) else aor
        self.address = Address.build(self.aor.copy(), display=display)
        self.outbound = parse_target(outbound, "outbound") if isinstance(outbound, str) else outbound
        self.username = username or self.aor.user
        self.password = password
        self.on_call = on_call
        self.on_message_cb = on_message
        self.user_agent = user_agent
        self.answer_timeout = answer_timeout
        self.offer_answer: OfferAnswer = offer_answer if offer_answer is not None else AudioOfferAnswer()
        """The offer/answer (media) strategy: what the SDP of a call with media says and what becomes of
        its media (:mod:`p2psip.callaudio`, audio, by default)."""
        """Seconds an incoming call may stay unanswered before it is declined with 480 (nobody is left
        holding a transaction forever when the application ignores a call)."""
        self.incoming: asyncio.Queue[IncomingCall] = asyncio.Queue(queue_limit)
        self.messages: asyncio.Queue[Request] = asyncio.Queue(queue_limit)
        self._dialogs: dict[DialogId, Call] = {}
        self._registrations: dict[str, _Registration] = {}
        self._tasks = Background(log, "registration task (refresh or keep-alive)")
        self.events = EventsAgent(self, events, on_subscribe)
        """SUBSCRIBE/NOTIFY both ways (:mod:`p2psip.uaevents`): ``events`` are the packages we serve;
        each SUBSCRIBE for one goes to ``on_subscribe`` (or the queue ``ua.events.incoming``), others
        get 489. Calls placed because a REFER asked for them go on ``ua.events.referred``."""
        self.accept_transfers = accept_transfers
        """Whether a REFER in a call is followed (else 603 Decline)."""
        self._placing: set[OutgoingCall] = set()  # INVITEs sent and not answered yet
        stack.attach(self)

    # =============================================================================== client side

    def _ua_header(self) -> list[tuple[str, str]]:
        """The ``User-Agent`` header of the requests this UA makes: none when ``user_agent`` is empty."""
        return [("User-Agent", self.user_agent)] if self.user_agent else []

    def _contact(self, toward: Source | Target | None = None) -> Address:
        transport = toward.transport if toward is not None else "udp"
        host = toward.host if toward is not None else None
        if not self.stack.transport.listens_on(transport):
            transport = "udp"
        return Address.build(self.stack.local_uri(transport, user=self.aor.user, toward=host))

    def _target(self, request: Request) -> Target:
        if self.outbound is not None and request.to.tag is None:
            return self.outbound
        route = request.get("Route")
        if route is not None:
            return target_from_uri(Address(route).uri)
        return target_from_uri(request.uri)

    def _new_request(
        self,
        method: str,
        uri: str | URI,
        *,
        to: str | Address | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        contact: bool = False,
        call_id: str | None = None,
        cseq: int = 1,
    ) -> Request:
        ruri = URI(uri) if isinstance(uri, str) else uri
        to_addr = to if to is not None else Address.build(ruri.copy())
        request = Request.create(
            method,
            ruri,
            from_=self.address.copy(),
            to=to_addr,
            call_id=call_id,
            cseq=cseq,
            body=body,
            content_type=content_type if body else None,
            headers=[*self._ua_header(), *headers],
        )
        if contact:
            request.set("Contact", str(self._contact(self._target(request))))
        return request

    def _send(self, request: Request, target: Target | None = None, *, branch: str | None = None) -> _Pending:
        target = target or self._target(request)
        pending = _Pending(self, request, request.copy(), target)
        tx = self.stack.send_request(request, target, branch=branch)
        tx.context = pending
        pending.transaction = tx
        if tx.terminated and not pending.final.done():
            pending.on_failure(503, "Service Unavailable (could not send)")
        return pending

    async def _request(self, request: Request, *, timeout: float | None = 32.0) -> Response:
        """Send a non-INVITE request and return its final response (digest challenges are answered)."""
        pending = self._send(request)
        return await asyncio.wait_for(self._final_with_auth(pending), timeout)

    async def _final_with_auth(self, pending: _Pending) -> Response:
        while True:
            response = await pending.final
            if response.status in (401, 407) and self.password is not None and pending.auth_tries < 2:
                retry = self._authenticated(pending, response)
                if retry is not None:
                    pending = retry
                    continue
            return response

    def _authenticated(self, pending: _Pending, response: Response) -> _Pending | None:
        try:
            retry = answer_challenge(response, pending.template, self.username or "", self.password or "")
        except AuthError as exc:
            log.info("cannot answer the challenge: %s", exc)
            return None
        new = self._send(retry, pending.target)
        new.auth_tries = pending.auth_tries + 1
        return new

    async def request(
        self,
        method: str,
        uri: str | URI,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        timeout: float | None = 32.0,
    ) -> Response:
        """Send any out-of-dialog non-INVITE request; returns the final response (whatever its status)."""
        request = self._new_request(
            method, uri, body=body, content_type=content_type, headers=headers, contact=False
        )
        return await self._request(request, timeout=timeout)

    # ----------------------------------------------- message level (a sipp-style step script's primitives)

    def send_request(
        self,
        request: Request,
        target: Target | None = None,
        *,
        branch: str | None = None,
        on_response: Callable[[Response], None] | None = None,
    ) -> asyncio.Future[Response]:
        """Send a request the caller built on its own client transaction of this UA (retransmissions,
        timers and the ACK of a non-2xx are the transaction layer's). Every response, provisional or
        final, goes to ``on_response``; the returned future holds the final one, or fails with
        :class:`CallFailed` (408 on a timeout, 503 on a transport failure). No digest retry and no
        dialog: what a script sends next is its own choice (:mod:`sipapi.scenario` steps). ``branch``
        re-uses a branch (a CANCEL has its INVITE's)."""
        pending = self._send(request, target, branch=branch)
        pending.listener = on_response
        return pending.final

    def send_ack(self, ack: Request, target: Target | None = None, *, resend: bool = False) -> None:
        """Send the ACK for a 2xx (no transaction, §13.2.2.4): a new branch, or ``resend`` as it was."""
        self._send_ack(ack, resend=resend, target=target)

    def adopt(self, dialog: Dialog) -> Call:
        """Make a dialog a script set up from its own INVITE one of this UA's calls: requests inside it
        (a BYE from the other end) are answered, a 2xx retransmitted after the INVITE transaction ended is
        ACKed again (with ``dialog.last_ack``). :meth:`forget` it when the script is done."""
        call = Call(self)
        call.dialog = dialog
        call.state = "confirmed"
        self._dialogs[dialog.id] = call
        return call

    def forget(self, call: Call) -> None:
        """Stop answering for ``call``'s dialog (requests in it get 481 from now on)."""
        if call.dialog is not None and self._dialogs.get(call.dialog.id) is call:
            del self._dialogs[call.dialog.id]

    async def message(
        self, uri: str | URI, text: str | bytes, *, content_type: str = "text/plain", timeout: float = 32.0
    ) -> Response:
        """Send a MESSAGE (RFC 3428); returns the final response."""
        body = text.encode() if isinstance(text, str) else text
        return await self.request("MESSAGE", uri, body=body, content_type=content_type, timeout=timeout)

    async def subscribe(
        self,
        uri: str | URI,
        event: str,
        *,
        expires: int = 600,
        accept: str | None = None,
        body_check: Callable[[Request], None] | None = None,
        on_notify: Callable[[Notification], None] | None = None,
        timeout: float = 32.0,
        headers: Iterable[tuple[str, str]] = (),
        resubscribe: bool = True,
    ) -> OutgoingSubscription:
        """SUBSCRIBE to ``event`` (``presence``, ``message-summary``...) of ``uri`` (RFC 6665) and return
        once it is answered; NOTIFYs arrive on ``sub.next()`` and ``on_notify``. ``expires=0`` fetches the
        state once. ``body_check(request)`` raises ParseError for a body the package cannot read (the
        NOTIFY then gets 400). Raises CallFailed for a failure answer (489 unknown package...). A
        subscription the notifier ends with ``reason=deactivated`` is made again at once (``resubscribe``)."""
        return await self.events.subscribe(
            uri,
            event,
            expires=expires,
            accept=accept,
            body_check=body_check,
            on_notify=on_notify,
            timeout=timeout,
            headers=headers,
            resubscribe=resubscribe,
        )

    async def options(self, uri: str | URI, *, timeout: float = 32.0) -> Response:
        """Send OPTIONS (§11); returns the final response (its Allow header lists what the peer does)."""
        return await self.request("OPTIONS", uri, headers=[("Accept", "application/sdp")], timeout=timeout)

    # --------------------------------------------------------------------------------- calls

    def invite(
        self,
        uri: str | URI,
        *,
        body: bytes = b"",
        content_type: str = "application/sdp",
        headers: Iterable[tuple[str, str]] = (),
        on_provisional: Callable[[Response], None] | None = None,
    ) -> OutgoingCall:
        """Start a call and return at once (see :meth:`OutgoingCall.answered` and ``cancel``);
        ``on_provisional(response)`` sees each 1xx as it arrives. The INVITE says what we take (``Allow``,
        ``Supported``: REFER, Replaces...) unless ``headers`` give their own."""
        extra = list(headers)
        given = {name.lower() for name, _ in extra}
        extra += [(n, v) for n, v in (("Allow", ALLOW), ("Supported", SUPPORTED)) if n.lower() not in given]
        request = self._new_request(
            "INVITE", uri, body=body, content_type=content_type, headers=extra, contact=True
        )
        pending = self._send(request)
        call = OutgoingCall(self, pending)
        call.on_provisional = on_provisional
        if pending.transaction is not None:
            pending.transaction.context = call
        self._placing.add(call)
        pending.final.add_done_callback(lambda _: self._placing.discard(call))
        pending.final.add_done_callback(_retrieved)
        return call

    async def call(
        self,
        uri: str | URI,
        *,
        body: bytes = b"",
        content_type: str = "application/sdp",
        headers: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
        play: Play = None,
        record: Record = None,
        media: CallMedia | None = None,
        media_options: dict[str, Any] | None = None,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> OutgoingCall:
        """Place a call and wait until it is answered (ACK sent). Raises :class:`CallFailed` with the final
        status when it is not (busy, rejected, timeout 408, cancelled 487...).

        With ``play`` (a WAV path or an audio source), ``record`` (a WAV path or a sink) or ``media`` (a
        ready CallMedia) the call carries audio: the INVITE offers it (``body`` is not used) and
        ``call.media`` runs it until the call ends (see p2psip.callaudio). ``on_provisional(response)``
        sees each provisional response (100, 180, 183...) as it arrives."""
        if play is not None or record is not None or media is not None or media_options is not None:
            if body:
                raise ValueError("give either body= (an SDP of your own) or play/record/media, not both")
            return await self.offer_answer.call(
                self,
                uri,
                play=play,
                record=record,
                media=media,
                headers=headers,
                timeout=timeout,
                media_options=await self._default_ice(media_options),
                on_provisional=on_provisional,
            )
        call = self.invite(
            uri, body=body, content_type=content_type, headers=headers, on_provisional=on_provisional
        )
        try:
            await call.answered(timeout)
        except (TimeoutError, asyncio.CancelledError):
            call.give_up()
            raise
        return call

    # ----------------------------------------------------------------------------- register

    async def register(
        self,
        registrar: str | URI,
        *,
        expires: int = 3600,
        username: str | None = None,
        password: str | None = None,
        refresh: bool = True,
        timeout: float = 32.0,
        contact: str | None = None,
    ) -> Response:
        """REGISTER our contact at ``registrar`` (``sip:HOST:PORT``, or ``sip:DOMAIN`` with an ``outbound``
        proxy, which a REGISTER goes through like any out-of-dialog request, §8.1.2); with ``refresh`` the
        binding is renewed before it expires. Raises CallFailed on a final failure. ``expires=0``
        unregisters. ``contact`` binds another Contact than this UA's own (e.g. a phone elsewhere)."""
        uri = URI(registrar) if isinstance(registrar, str) else registrar
        key = str(uri)
        reg = self._registrations.get(key)
        if reg is None:
            target = self.outbound if self.outbound is not None else target_from_uri(uri)
            reg = _Registration(uri, target, username or self.username, password or self.password)
            self._registrations[key] = reg
        reg.custom_contact = contact
        if username is not None:
            reg.username = username
        if password is not None:
            reg.password = password
        if reg.refresh is not None:
            reg.refresh.cancel()
            reg.refresh = None
        response, expires = await self._register_as_told(reg, expires, timeout)
        if response.status >= 300:
            raise CallFailed(response.status, response.reason, response)
        if expires == 0:
            self._registrations.pop(key, None)
            if reg.keepalive is not None:
                reg.keepalive.cancel()
            return response
        reg.outbound_confirmed = "outbound" in _tokens(response.get_all("Require"))
        granted_turn = response.get(TURN_HEADER)
        reg.turn = TurnGrant.parse(granted_turn, time.time()) if granted_turn is not None else None
        self._keep_alive(reg, response)
        granted = _granted_expires(response, reg.contact, expires)
        reg.expires = granted
        if refresh and granted > 0:
            delay = max(1.0, granted - min(granted / 2, 30.0))
            reg.refresh = self.loop.call_later(delay, self._refresh, reg)
        return response

    async def _register_as_told(
        self, reg: _Registration, expires: int, timeout: float
    ) -> tuple[Response, int]:
        """REGISTER, asked again where the registrar says how, all within ``timeout``: a 423 with a longer
        Min-Expires (§10.2.8), a 503 whose Retry-After (jittered, :func:`register_retry_delay`) ends before
        the timeout does (§21.5.4). Returns the last response and the expiry it asked for."""
        deadline = self.loop.time() + timeout
        for _ in range(REGISTER_ATTEMPTS):
            left = max(0.0, deadline - self.loop.time())
            response = await asyncio.wait_for(self._register_once(reg, expires), left)
            minimum = response.get("Min-Expires")
            if response.status == 423 and minimum and minimum.isdigit() and int(minimum) > expires:
                expires = int(minimum)
                continue
            if response.status == 503 and response.get("Retry-After") is not None:
                wait = register_retry_delay(503, response.get("Retry-After"), 0)
                if wait is not None and self.loop.time() + wait < deadline:
                    log.info("registrar %s: 503, asking again in %.1f s (Retry-After)", reg.registrar, wait)
                    await asyncio.sleep(wait)
                    continue
            break
        return response, expires

    def _refresh(self, reg: _Registration) -> None:
        self._tasks.spawn(self._refresh_now(reg))

    async def _refresh_now(self, reg: _Registration) -> None:
        """Renew a binding. When that fails, the binding is not given up: the next attempt waits the
        registrar's Retry-After, or the RFC 5626 §4.5 back-off, so a registrar that sheds load (peers answer
        503 + Retry-After when busy) sees its phones come back spread out, not all at once or never."""
        try:
            await self.register(reg.registrar, expires=reg.expires or 3600)
        except (CallFailed, TimeoutError, TransportError) as exc:
            if self._registrations.get(str(reg.registrar)) is not reg:
                return  # unregistered meanwhile (close() cancels this task)
            response = exc.response if isinstance(exc, CallFailed) else None
            status = exc.status if isinstance(exc, CallFailed) else 408
            retry_after = response.get("Retry-After") if response is not None else None
            delay = register_retry_delay(status, retry_after, reg.failures)
            if delay is None:
                log.warning("registration at %s refused (%s): not renewed", reg.registrar, exc)
                return
            reg.failures += 1
            log.info("registration at %s failed (%s): again in %.0f s", reg.registrar, exc, delay)
            reg.refresh = self.loop.call_later(delay, self._refresh, reg)
        else:
            reg.failures = 0

    async def _register_once(self, reg: _Registration, expires: int) -> Response:
        reg.cseq += 1
        to = Address.build(self.aor.copy())
        contact: Address | str
        if reg.custom_contact is not None:
            contact = reg.custom_contact  # as given (the Expires header says how long)
            try:
                reg.contact = str(Address(contact).uri)
            except ParseError:
                reg.contact = ""
        else:
            contact = self._contact(reg.target)
            contact.params["expires"] = str(expires)
            if self.instance is not None:
                contact.params["+sip.instance"] = f'"{self.instance}"'
                contact.params["reg-id"] = "1"
            reg.contact = str(contact.uri)
        request = Request.create(
            "REGISTER",
            reg.registrar.copy(),
            from_=self.address.copy(),
            to=to,
            call_id=reg.call_id or None,
            cseq=reg.cseq,
            contact=contact,
            headers=[("Expires", str(expires)), *self._ua_header()],
        )
        if self.instance is not None and reg.custom_contact is None:
            request.add("Supported", "outbound, path")
        reg.call_id = request.call_id
        pending = self._send(request, reg.target)
        while True:
            response = await pending.final
            if response.status in (401, 407) and reg.password is not None and pending.auth_tries < 2:
                try:
                    retry = answer_challenge(response, pending.template, reg.username or "", reg.password)
                except AuthError:
                    return response
                reg.cseq = retry.cseq.number
                attempt = pending.auth_tries + 1
                pending = self._send(retry, reg.target)
                pending.auth_tries = attempt
                continue
            return response

    async def unregister(self) -> None:
        """Remove every binding this UA made (REGISTER with expires 0)."""
        for reg in list(self._registrations.values()):
            try:
                await self.register(reg.registrar, expires=0)
            except (CallFailed, TimeoutError, TransportError) as exc:
                log.info("unregister at %s failed: %s", reg.registrar, exc)

    async def incoming_calls(self) -> AsyncIterator[IncomingCall]:
        """``async for call in ua.incoming_calls(): call.accept()``."""
        while True:
            yield await self.incoming.get()

    async def hang_up(self, timeout: float = 5.0) -> list[str]:
        """End every call of this UA, e.g. when the program is interrupted: CANCEL the ones not answered
        yet and wait (up to ``timeout``) for their final response, so the transaction layer ACKs the 487
        before the stack closes; BYE the answered ones. Returns one line per call saying what happened."""
        said: list[str] = []
        for placing in list(self._placing):
            if not placing.cancelled:
                placing.cancel()
            try:
                await placing.answered(timeout)
                said.append("CANCEL sent, but the call was answered: hung up")
            except CallFailed as failed:
                said.append(f"CANCEL sent; the INVITE ended with {failed.status} {failed.reason}")
            except TimeoutError:
                said.append(f"CANCEL sent; no final answer to the INVITE within {timeout:g} s")
        for call in list(self._dialogs.values()):
            if call.state == "terminated":
                continue
            try:
                response = await call.bye(timeout)
                said.append(f"BYE sent; {response.status} {response.reason}")
            except CallFailed as failed:
                said.append(f"BYE sent; {failed.status} {failed.reason}")
            except TimeoutError:
                said.append(f"BYE sent; no answer within {timeout:g} s")
        return said

    # -------------------------------------------------------------------- RFC 5626 outbound keep-alives

    @property
    def stun_server(self) -> Target | None:
        """Our home peer as STUN server, when we know it answers: the UDP target of a registration whose
        registrar said ``Require: outbound`` (RFC 5626: an edge proxy supporting outbound over UDP answers
        STUN binding requests on that port, §8). Calls then do ICE by default (callaudio.ice_by_default)."""
        for reg in self._registrations.values():
            if reg.outbound_confirmed and reg.target.transport == "udp":
                return reg.target
        return None

    def outbound_flow(self, registrar: str | URI) -> bool:
        """Whether our registration at ``registrar`` (as given to :meth:`register`) is an RFC 5626 outbound
        one: the last 200 said ``Require: outbound``, so the registrar keeps a flow to us and we send it
        keep-alives. False when we are not registered there."""
        reg = self._registrations.get(str(URI(registrar) if isinstance(registrar, str) else registrar))
        return reg is not None and reg.outbound_confirmed

    @property
    def turn_grant(self) -> TurnGrant | None:
        """The TURN server and credentials our home peer granted in the 200 to our REGISTER (only to one
        that passed digest auth, docs/nat.md), while they stay valid for a minute more; each re-REGISTER
        brings fresh ones. Calls then gather a relayed candidate on that peer by default."""
        now = time.time()
        grants = [reg.turn for reg in self._registrations.values() if reg.turn is not None]
        valid = [grant for grant in grants if grant.until > now + TURN_MARGIN]
        return max(valid, key=lambda grant: grant.until) if valid else None

    async def _default_ice(self, media_options: dict[str, Any] | None) -> dict[str, Any] | None:
        """``media_options`` with ICE by default (callaudio.ice_by_default): STUN at :attr:`stun_server`,
        or, for a UA with an ``instance`` and a UDP ``outbound`` proxy that no outbound registration
        confirmed (``p2psip call``, the sipapi runner: they place calls without registering), at that
        proxy when it answered one STUN binding request (:meth:`_probe_outbound`); TURN from
        :attr:`turn_grant`."""
        if media_options is not None and "ice" in media_options:
            return media_options
        stun = self.stun_server
        if stun is None and self.instance is not None and self.outbound is not None:
            stun = await self._probe_outbound(self.outbound)
        return ice_by_default(media_options, stun, self.turn_grant)

    async def _probe_outbound(self, outbound: Target) -> Target | None:
        """``outbound`` when it answers a STUN binding request on its SIP UDP port (a p2psip peer does,
        RFC 5626 §8), else None. Asked once per UA, within STUN_PROBE_TIMEOUT: a proxy that does not
        speak STUN (sipp, a Kamailio without it, a phone) then costs the first call that much and no
        call ever waits for ICE gathering's STUN timeout."""
        if outbound.transport != "udp":
            return None
        if self._outbound_probe is None:
            self._outbound_probe = self._tasks.spawn(self._stun_ask(outbound, STUN_PROBE_TIMEOUT))
        mapped = await asyncio.shield(self._outbound_probe)
        return outbound if mapped is not None else None

    async def _stun_ask(self, target: Target, timeout: float) -> tuple[str, int] | None:
        """One STUN binding request to ``target`` from our SIP socket: our mapped address, or None."""
        from p2psip.flows import stun_binding_request

        data, tid = stun_binding_request()
        answer: asyncio.Future[tuple[str, int] | None] = self.loop.create_future()
        self._stun[tid] = answer
        try:
            self.stack.transport.send(data, target)
            return await asyncio.wait_for(answer, timeout)
        except (TimeoutError, TransportError):
            return None
        finally:
            self._stun.pop(tid, None)

    def _keep_alive(self, reg: _Registration, response: Response) -> None:
        """After an outbound REGISTER's 200: keep its flow alive at the registrar's Flow-Timer (§4.4)."""
        if self.instance is None or reg.custom_contact is not None or reg.keepalive is not None:
            return
        timer = response.get("Flow-Timer")
        if not reg.outbound_confirmed or not timer or not timer.isdigit() or int(timer) <= 0:
            return
        via = response.top_via
        if via is not None and via.received and isinstance(via.rport, int) and via.rport is not True:
            # our reflexive address as the registrar saw the REGISTER: a keep-alive answered with another
            # one means the NAT mapping changed since (a new flow the registrar does not know)
            reg.mapped = (via.received, via.rport)
        reg.keepalive = self._tasks.spawn(self._keepalives(reg, int(timer)))

    async def _keepalives(self, reg: _Registration, flow_timer: int) -> None:
        import random

        while True:
            # §4.4.1: a random interval between 80% and 100% of the Flow-Timer
            interval = flow_timer * random.uniform(0.8, 1.0)
            target = reg.target
            if target.transport != "udp":
                # §4.4: over a stream the flow is the connection: its closing is a flow failure, known at
                # once (a send would quietly open a new connection, a flow the registrar does not know)
                conn = self.stack.transport.connection_to(target)
                if conn is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(conn.ended()), interval)
                if conn is None or conn.closed:
                    failed = "the connection closed"
                else:
                    try:
                        self.stack.transport.send(b"\r\n\r\n", target)
                        continue
                    except TransportError as exc:
                        failed = f"the connection failed: {exc}"
            else:
                await asyncio.sleep(interval)
                mapped = await self._stun_ask(target, min(10.0, flow_timer / 2))
                if mapped is not None and reg.mapped in (None, mapped):
                    reg.mapped = mapped
                    continue
                failed = "no answer to a STUN keep-alive" if mapped is None else "the NAT mapping changed"
                reg.mapped = mapped
            # §4.4: the flow failed: register again (a new flow)
            log.info("outbound flow to %s failed (%s): registering again", target, failed)
            reg.keepalive = None
            self._refresh(reg)
            return

    def _on_stun(self, data: bytes, host: str, port: int) -> None:
        from p2psip.flows import stun_mapped_address

        for tid, answer in list(self._stun.items()):
            mapped = stun_mapped_address(data, tid)
            if mapped is not None and not answer.done():
                answer.set_result(mapped)

    async def close(self) -> None:
        """Stop refreshing registrations (bindings are left to expire) and background tasks."""
        for reg in self._registrations.values():
            if reg.refresh is not None:
                reg.refresh.cancel()
        self._tasks.cancel()
        self.events.close()

    # =========================================================================== core callbacks

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        method = request.method
        if method == "ACK":
            call = self._dialogs.get(dialog_id_of_request(request))
            if isinstance(call, IncomingCall):
                call._acked()
            if call is not None and call.media is not None and request.body:
                self.offer_answer.answer_in_ack(call, request)  # we offered in the 2xx of a re-INVITE
            return
        if transaction is None:
            return
        respond = self.stack.respond
        try:
            _ = request.max_forwards  # parsed on access: unreadable is a bad request (as the Proxy does)
        except ParseError as exc:
            respond(transaction, Response.for_error(request, exc))
            return
        if request.to.tag is not None and method != "CANCEL":
            self._in_dialog(request, transaction)
            return
        if method == "INVITE":
            replaced = check_replaces(self._dialogs, request)
            if isinstance(replaced, int):
                respond(transaction, Response.for_request(request, replaced))
                return
            call = IncomingCall(self, request, transaction)
            call.replaces = replaced
            transaction.context = call
            if self.answer_timeout > 0:
                self.loop.call_later(self.answer_timeout, call._unanswered)
            if self.on_call is not None:
                self.on_call(call)
            _keep_latest(self.incoming, call)
        elif method == "CANCEL":
            invite_tx = self.stack.transactions.find_invite_for_cancel(request)
            if invite_tx is None:
                respond(transaction, Response.for_request(request, 481))
                return
            respond(transaction, Response.for_request(request, 200))
            call = invite_tx.context
            if isinstance(call, IncomingCall) and call.state in ("offered", "ringing"):
                respond(invite_tx, call._response(487))
                call._end("cancelled")
        elif method == "MESSAGE":
            respond(transaction, Response.for_request(request, 200))
            if self.on_message_cb is not None:
                self.on_message_cb(request)
            _keep_latest(self.messages, request)
        elif method == "OPTIONS":
            response = Response.for_request(request, 200)
            response.add("Allow", ALLOW)
            response.add("Supported", SUPPORTED)
            response.add("Accept", "application/sdp, text/plain")
            respond(transaction, response)
        elif method in ("BYE", "INFO", "UPDATE", "NOTIFY"):
            respond(transaction, Response.for_request(request, 481))
        elif method == "SUBSCRIBE":
            self.events.receive(request, transaction)
        elif method == "REFER":
            respond(transaction, Response.for_request(request, 403, "Forbidden (REFER only inside a call)"))
        else:
            response = Response.for_request(request, 405)
            response.add("Allow", ALLOW)
            respond(transaction, response)

    def _in_dialog(self, request: Request, transaction: ServerTransaction) -> None:
        if self.events.receive_in_dialog(request, transaction):
            return
        call = self._dialogs.get(dialog_id_of_request(request))
        respond = self.stack.respond
        if request.method == "REFER" and call is not None and call.dialog is not None:
            receive_refer(call, request, transaction)
            return
        if call is None or call.dialog is None:
            respond(transaction, Response.for_request(request, 481))
            return
        status = call.dialog.receive_request(request)
        if status is not None:
            respond(transaction, Response.for_request(request, status))
            return
        method = request.method
        response = Response.for_request(request, 200)
        if method == "BYE":
            respond(transaction, response)
            call.dialog.terminate()
            self._dialogs.pop(call.dialog.id, None)
            call._end("bye received")
        elif method == "INVITE":  # re-INVITE: keep the session as it is (or answer its offer for the media)
            if call.media is not None:
                response = self.offer_answer.answer_reoffer(call, request)
            response.add("Contact", str(self._contact(transaction.source)))
            respond(transaction, response)
        elif method in ("INFO", "UPDATE", "MESSAGE", "OPTIONS"):
            respond(transaction, response)
        else:
            response = Response.for_request(request, 405)
            response.add("Allow", ALLOW)
            respond(transaction, response)

    def on_response(
        self, response: Response, transaction: ClientTransaction | None, source: Source | None
    ) -> None:
        if transaction is None:
            # A 2xx retransmission after the INVITE transaction ended: ACK it again.
            if 200 <= response.status < 300 and response.cseq.method == "INVITE":
                call = self._dialogs.get(dialog_id_of_response(response))
                if call is not None and call.dialog is not None and call.dialog.last_ack is not None:
                    self._send_ack(call.dialog.last_ack, resend=True)
            return
        context = transaction.context
        if isinstance(context, OutgoingCall):
            self._invite_response(context, transaction, response)
        elif isinstance(context, _Pending):
            if context.dialog is not None and 200 <= response.status < 300:
                dialog = context.dialog
                if context.final.done() and dialog.last_ack is not None:
                    self._send_ack(dialog.last_ack, resend=True)  # a retransmitted 2xx to the re-INVITE
                else:
                    self._send_ack(dialog.create_ack(response))
            context.on_response(response)

    def _invite_response(self, call: OutgoingCall, tx: ClientTransaction, response: Response) -> None:
        status = response.status
        pending = call.pending
        if status < 200:
            call.provisional.append(response)
            if call.on_provisional is not None:
                try:
                    call.on_provisional(response)
                except Exception:  # the application's callback must not break the transaction layer
                    log.exception("on_provisional failed")
            if status > 100 and call.state == "calling":
                call.state = "early"
                call.early.set()
            return
        if status < 300:
            dialog_id = dialog_id_of_response(response)
            known = self._dialogs.get(dialog_id)
            if known is not None and known.dialog is not None and known.dialog.last_ack is not None:
                self._send_ack(known.dialog.last_ack, resend=True)  # a 2xx retransmission
                return
            dialog = Dialog.uac(pending.request, response)
            ack = dialog.create_ack(response)
            self._send_ack(ack)
            if call.dialog is not None or call.cancelled:
                # A second 2xx from another fork, or a 2xx that raced our CANCEL: ACK and hang up.
                extra = Call(self)
                extra.dialog = dialog
                extra.state = "confirmed"
                self._dialogs[dialog.id] = extra
                task = asyncio.ensure_future(extra.bye())
                task.add_done_callback(lambda t: t.exception())
                if call.dialog is None:
                    call._end("cancelled")
                    pending.on_failure(487, "Request Terminated (answered after CANCEL; hung up)")
                return
            call.dialog = dialog
            call.response = response
            call.remote_body = response.body
            call.state = "confirmed"
            self._dialogs[dialog.id] = call
            pending.on_response(response)
            return
        can_retry = self.password is not None and pending.auth_tries < 2 and not call.cancelled
        if status in (401, 407) and can_retry:
            retry = self._authenticated(pending, response)
            if retry is not None and retry.transaction is not None:
                retry.transaction.context = call
                retry.final = pending.final  # the caller keeps waiting on the same future
                call.pending = retry
                return
        call.response = response
        call._end("cancelled" if status == 487 else f"failed {status}")
        if not pending.final.done():
            pending.final.set_exception(CallFailed(status, response.reason, response))

    def _send_ack(self, ack: Request, *, resend: bool = False, target: Target | None = None) -> None:
        target = target or self._target(ack)
        if not resend:
            self.stack.push_via(ack, target)
        self.stack.send_stateless(ack, target)

    def on_timeout(self, transaction: Transaction, timer: str) -> None:
        self._fail(transaction, 408, f"Request Timeout (timer {timer})")

    def on_transport_failure(self, transaction: Transaction, error: str) -> None:
        self._fail(transaction, 503, f"Service Unavailable ({error})")

    def _fail(self, transaction: Transaction, status: int, reason: str) -> None:
        context = transaction.context
        if isinstance(context, OutgoingCall):
            context._end(f"failed {status}")
            context.pending.on_failure(status, reason)
        elif isinstance(context, _Pending):
            context.on_failure(status, reason)
        elif isinstance(context, IncomingCall) and status == 408:
            context._end("no ACK")

    def on_terminated(self, transaction: Transaction) -> None:
        pass


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a call's outcome as seen: a failure nobody awaits any more (the caller gave up, then the 487
    of its CANCEL came) must not print "Future exception was never retrieved" at exit."""
    if not future.cancelled():
        future.exception()


def _keep_latest(queue: asyncio.Queue[Any], item: Any) -> None:
    """Queue ``item``; a full queue (nobody reads it) loses its oldest item instead of growing."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)


REGISTER_ATTEMPTS = 4
"""REGISTERs one :meth:`UserAgent.register` sends at most (a 423, then 503s with a short Retry-After)."""
RETRY_AFTER_MAX = 1800.0
"""The longest wait a registrar's Retry-After may impose (beyond it, a registrar's typo would park a phone
for days); RFC 5626 §4.5's max-time."""
BACKOFF_BASE = 30.0
BACKOFF_MAX = 1800.0
"""RFC 5626 §4.5: after the k-th failure in a row, wait a random time between half and all of
min(BACKOFF_MAX, BACKOFF_BASE * 2**k) (its base-time for "all flows failed", and its max-time)."""


def register_retry_delay(
    status: int,
    retry_after: str | None,
    failures: int,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float | None:
    """Seconds to wait before registering again after a REGISTER failed with ``status`` (408 for no
    answer), ``failures`` failures in a row before this one; None: do not (the registrar refused for good).

    A Retry-After (RFC 3261 §20.33, any status) is honoured, bounded by :data:`RETRY_AFTER_MAX`, and
    jittered upwards by up to a quarter (never earlier than asked: phones a busy registrar turned away at
    the same moment come back spread out). Without one, timeouts, 408 and 5xx back off as RFC 5626 §4.5
    says; other refusals (401/403 after our credentials, 404, 6xx...) are final."""
    if retry_after is not None:
        digits = retry_after.strip().split(";")[0].split("(")[0].strip()
        if digits.isdigit():
            wait = min(float(digits), RETRY_AFTER_MAX)
            return uniform(wait, wait * 1.25) if wait > 0 else 0.0
    if status == 408 or 500 <= status < 600:
        ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures, 16))
        return uniform(ceiling / 2, ceiling)
    return None


def _granted_expires(response: Response, contact: str, asked: int) -> int:
    """The lifetime the registrar granted our contact (§10.2.4: its Contact's expires, else Expires)."""
    try:
        mine = URI(contact)
        for address in response.contacts:
            if address.uri == mine and address.expires is not None:
                return address.expires
        if response.expires is not None:
            return response.expires
    except P2PSIPError:
        pass
    return asked


def _tokens(values: list[str]) -> set[str]:
    """The option tags of comma-separated header values (Require, Supported), lower-cased."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}
