"""SIP dialogs (RFC 3261 §12): who we talk to, through which proxies, and with which CSeq.

A :class:`Dialog` is pure state, no I/O. It is created

* on the UAC side by :meth:`Dialog.uac` from the request we sent and a response with a To tag (a 1xx makes
  an *early* dialog, a 2xx a *confirmed* one); each forked 2xx (another To tag) gives a distinct dialog;
* on the UAS side by :meth:`Dialog.uas` from the request we received and the response (with our To tag)
  we send.

It builds requests inside the dialog (:meth:`Dialog.create_request`: BYE, re-INVITE, INFO, UPDATE, ... with
loose or strict routing per §12.2.1.1) and the ACK for a 2xx (:meth:`Dialog.create_ack`, built by the UA
core with the INVITE's CSeq number, §13.2.2.4). It checks requests received in the dialog
(:meth:`Dialog.receive_request`: a lower CSeq gets 500) and follows responses
(:meth:`Dialog.receive_response`: early -> confirmed, target refresh on a 2xx to re-INVITE/UPDATE,
termination on 481/408).

Dialogs are found by :class:`DialogId` (Call-ID, local tag, remote tag), a hashable tuple:
:func:`dialog_id_of_request` gives the id a received request belongs to, :func:`dialog_id_of_response`
the id a received response belongs to.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import NamedTuple

from p2psip.errors import TransactionError
from p2psip.message import Request, Response, Via
from p2psip.timers import DEFAULT_TIMERS, TimerConfig
from p2psip.uri import URI, Address

TARGET_REFRESH_METHODS = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER"})
"""Methods whose 2xx (or whose arrival, on the UAS side) replaces the remote target (§12.2, RFC 3311)."""


class DialogId(NamedTuple):
    """Call-ID, local tag, remote tag (§12): hashable, use it as a dict key."""

    call_id: str
    local_tag: str
    remote_tag: str


def dialog_id_of_request(request: Request) -> DialogId:
    """The id of the dialog a *received* request belongs to: our tag is its To tag, the peer's its From."""
    return DialogId(request.call_id, request.to.tag or "", request.from_.tag or "")


def dialog_id_of_response(response: Response) -> DialogId:
    """The id of the dialog a *received* response belongs to: our tag is its From tag, the peer's its To."""
    return DialogId(response.call_id, response.from_.tag or "", response.to.tag or "")


class DialogState(enum.Enum):
    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


def _contact_uri(message: Request | Response) -> URI | None:
    contacts = message.contacts
    return contacts[0].uri.copy() if contacts else None


class Dialog:
    """One dialog. Attributes (read them; change them only through the methods):

    ``id`` (:class:`DialogId`), ``state`` (:class:`DialogState`), ``local_uri`` / ``remote_uri``
    (:class:`Address` without tag: From/To of requests we send), ``remote_target`` (:class:`URI` from the
    peer's Contact), ``route_set`` (list of :class:`Address`, in the order to put in Route), ``local_cseq`` /
    ``remote_cseq`` (None = not yet known), ``local_contact`` (our Contact, repeated in target-refresh
    requests), ``secure`` (sips), ``is_uac`` (we sent the request that created it).
    """

    def __init__(
        self,
        *,
        call_id: str,
        local_tag: str,
        remote_tag: str,
        local_uri: Address,
        remote_uri: Address,
        remote_target: URI,
        route_set: list[Address],
        local_cseq: int | None,
        remote_cseq: int | None,
        local_contact: Address | None,
        secure: bool,
        is_uac: bool,
        state: DialogState,
    ) -> None:
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_uri = local_uri
        self.remote_uri = remote_uri
        self.remote_target = remote_target
        self.route_set = route_set
        self.local_cseq = local_cseq
        self.remote_cseq = remote_cseq
        self.local_contact = local_contact
        self.secure = secure
        self.is_uac = is_uac
        self.state = state
        self.invite_cseq: int | None = None
        """CSeq number of the last INVITE we sent in this dialog (what :meth:`create_ack` acknowledges)."""
        self.last_ack: Request | None = None
        """The last ACK :meth:`create_ack` built: send it again for each retransmitted 2xx."""

    @property
    def id(self) -> DialogId:
        return DialogId(self.call_id, self.local_tag, self.remote_tag)

    def __repr__(self) -> str:
        return f"<Dialog {self.state.value} {self.id}>"

    # --- creation --------------------------------------------------------------------------------
    @classmethod
    def uac(cls, request: Request, response: Response) -> Dialog:
        """The dialog a response with a To tag (1xx: early, 2xx: confirmed) creates for the request we sent
        (§12.1.2). Raises :class:`TransactionError` if the response cannot create a dialog."""
        to_tag = response.to.tag
        if not to_tag or not (101 <= response.status < 300):
            raise TransactionError(f"a {response.status} response without To tag creates no dialog")
        from_tag = request.from_.tag
        if not from_tag:
            raise TransactionError("the request has no From tag, so it cannot create a dialog")
        route_set = [Address(str(rr)) for rr in reversed(response.record_route)]
        target = _contact_uri(response) or request.uri.copy()
        local_uri = request.from_.copy()
        local_uri.tag = None
        remote_uri = request.to.copy()
        remote_uri.tag = None
        contacts = request.contacts
        dialog = cls(
            call_id=request.call_id,
            local_tag=from_tag,
            remote_tag=to_tag,
            local_uri=local_uri,
            remote_uri=remote_uri,
            remote_target=target,
            route_set=route_set,
            local_cseq=request.cseq.number,
            remote_cseq=None,
            local_contact=contacts[0].copy() if contacts else None,
            secure=request.uri.secure,
            is_uac=True,
            state=DialogState.CONFIRMED if response.status >= 200 else DialogState.EARLY,
        )
        if request.method.upper() == "INVITE":
            dialog.invite_cseq = request.cseq.number
        return dialog

    @classmethod
    def uas(cls, request: Request, response: Response) -> Dialog:
        """The dialog our response (1xx with To tag: early, 2xx: confirmed) creates for a request we
        received (§12.1.1). The response must carry our To tag (``Response.for_request`` adds one)."""
        to_tag = response.to.tag
        if not to_tag or not (101 <= response.status < 300):
            raise TransactionError(f"a {response.status} response without To tag creates no dialog")
        target = _contact_uri(request)
        if target is None:
            raise TransactionError(f"the {request.method} has no Contact, so it cannot create a dialog")
        local_uri = request.to.copy()
        local_uri.tag = None
        remote_uri = request.from_.copy()
        remote_uri.tag = None
        contacts = response.contacts
        return cls(
            call_id=request.call_id,
            local_tag=to_tag,
            remote_tag=request.from_.tag or "",
            local_uri=local_uri,
            remote_uri=remote_uri,
            remote_target=target,
            route_set=[Address(str(rr)) for rr in request.record_route],
            local_cseq=None,
            remote_cseq=request.cseq.number,
            local_contact=contacts[0].copy() if contacts else None,
            secure=request.uri.secure,
            is_uac=False,
            state=DialogState.CONFIRMED if response.status >= 200 else DialogState.EARLY,
        )

    # --- requests we send ------------------------------------------------------------------------
    def _addressing(self) -> tuple[URI, list[str]]:
        """Request-URI and Route values per §12.2.1.1 (loose routing, or strict routing if the first
        route has no ``lr``)."""
        if not self.route_set:
            return self.remote_target.copy(), []
        first = self.route_set[0]
        if first.uri.lr:
            return self.remote_target.copy(), [str(r) for r in self.route_set]
        ruri = first.uri.copy()
        ruri.headers = {}
        ruri.params.pop("method", None)
        routes = [str(r) for r in self.route_set[1:]]
        routes.append(str(Address.build(self.remote_target.copy())))
        return ruri, routes

    def _build(
        self,
        method: str,
        cseq: int,
        *,
        via: Via | str | None,
        body: bytes,
        content_type: str | None,
        headers: Iterable[tuple[str, str]],
        contact: bool,
    ) -> Request:
        ruri, routes = self._addressing()
        from_ = self.local_uri.copy()
        from_.tag = self.local_tag
        to = self.remote_uri.copy()
        to.tag = self.remote_tag or None
        extra = [("Route", r) for r in routes]
        extra.extend(headers)
        return Request.create(
            method,
            ruri,
            from_=from_,
            to=to,
            call_id=self.call_id,
            cseq=cseq,
            via=via,
            contact=self.local_contact.copy() if contact and self.local_contact is not None else None,
            body=body,
            content_type=content_type,
            headers=extra,
        )

    def create_request(
        self,
        method: str,
        *,
        via: Via | str | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Request:
        """A request inside this dialog (§12.2.1.1): From/To with tags, Call-ID, the next local CSeq,
        Request-URI and Route from the remote target and route set, our Contact on target-refresh methods.

        ``via``: the top Via (with a fresh branch) if the caller has one; else the Stack adds it when it
        sends. Not for ACK (:meth:`create_ack`) or CANCEL (``transaction.make_cancel``).
        """
        method = method.upper()
        if method in ("ACK", "CANCEL"):
            raise TransactionError(f"use {'create_ack' if method == 'ACK' else 'make_cancel'} for {method}")
        if self.state is DialogState.TERMINATED:
            raise TransactionError(f"the dialog {self.id} is terminated; no {method} can be sent in it")
        self.local_cseq = (self.local_cseq or 0) + 1
        if method == "INVITE":
            self.invite_cseq = self.local_cseq
        return self._build(
            method,
            self.local_cseq,
            via=via,
            body=body,
            content_type=content_type,
            headers=headers,
            contact=method in TARGET_REFRESH_METHODS,
        )

    def create_ack(
        self,
        response: Response,
        *,
        via: Via | str | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Request:
        """The ACK for a 2xx to our INVITE (§13.2.2.4): built by the UA core, same CSeq number as the
        INVITE, addressed like any in-dialog request. Send it without a transaction, and again for each
        retransmitted 2xx (same ACK object)."""
        if not (200 <= response.status < 300) or response.cseq.method.upper() != "INVITE":
            raise TransactionError(f"only a 2xx to INVITE is ACKed by the UA core, not {response.status}")
        ack = self._build(
            "ACK",
            response.cseq.number,
            via=via,
            body=body,
            content_type=content_type,
            headers=headers,
            contact=False,
        )
        self.last_ack = ack
        return ack

    # --- messages we receive ---------------------------------------------------------------------
    def receive_request(self, request: Request) -> int | None:
        """Check a request received in this dialog (§12.2.2) and update the dialog.

        Returns the status to reject it with (500 for a CSeq lower than the last one; the RFC's ordering
        check), or None when it is accepted: then the remote CSeq is recorded, a target-refresh request's
        Contact becomes the remote target, and a BYE terminates the dialog. ACK and CANCEL carry the CSeq of
        the INVITE and are not checked.
        """
        method = request.method.upper()
        if method in ("ACK", "CANCEL"):
            if method == "ACK" and self.state is DialogState.EARLY:
                self.state = DialogState.CONFIRMED
            return None
        number = request.cseq.number
        if self.remote_cseq is not None and number < self.remote_cseq:
            return 500  # out of order (an equal CSeq is a retransmission: the transaction absorbs it)
        self.remote_cseq = number
        if method in TARGET_REFRESH_METHODS:
            target = _contact_uri(request)
            if target is not None:
                self.remote_target = target
        if method == "BYE":
            self.state = DialogState.TERMINATED
        return None

    def receive_response(self, request: Request, response: Response) -> None:
        """Follow a response to a request we sent in this dialog (or to the INVITE that created it).

        2xx to INVITE in an early dialog: confirmed, route set recomputed from the 2xx (§13.2.2.4).
        2xx to a target-refresh request: remote target from its Contact (§12.2.1.2).
        481 or 408 to an in-dialog request: the dialog is terminated. A non-2xx final response to the
        initial INVITE terminates an early dialog. 1xx in an early dialog may refresh the remote target.
        """
        status = response.status
        method = response.cseq.method.upper()
        if self.state is DialogState.EARLY:
            if 200 <= status < 300 and method == "INVITE":
                self.state = DialogState.CONFIRMED
                self.route_set = [Address(str(rr)) for rr in reversed(response.record_route)]
            elif status >= 300 and method == "INVITE":
                self.state = DialogState.TERMINATED
                return
        if status in (481, 408) and request.to.tag:
            self.state = DialogState.TERMINATED
            return
        if status < 300 and method in TARGET_REFRESH_METHODS:
            target = _contact_uri(response)
            if target is not None and (status >= 200 or self.state is DialogState.EARLY):
                self.remote_target = target

    def response_sent(self, response: Response) -> None:
        """Follow a response we (the UAS) sent to the INVITE that created this dialog (or to a request in
        it): a 2xx confirms an early dialog, a non-2xx final ends an early one (§12.1.1, §13.3.1)."""
        if self.state is not DialogState.EARLY or response.cseq.method.upper() != "INVITE":
            return
        if 200 <= response.status < 300:
            self.state = DialogState.CONFIRMED
        elif response.status >= 300:
            self.state = DialogState.TERMINATED

    def terminate(self) -> None:
        """Mark the dialog over (after a BYE sent or received, or a failure)."""
        self.state = DialogState.TERMINATED


class AnswerRetransmitter:
    """The UAS core's 2xx retransmission (§13.3.1.4), sans-IO.

    The INVITE server transaction sends a 2xx only once (RFC 6026: it then sits in Accepted); the UA core
    must resend it at T1, 2·T1, 4·T1, ... capped at T2 until the ACK arrives, and give up after 64·T1 (then
    it should end the dialog with a BYE). Call :meth:`fire` at :attr:`deadline`: it returns the response to
    send again, or None. :attr:`timed_out` tells that the ACK never came.
    """

    def __init__(self, response: Response, now: float, timers: TimerConfig = DEFAULT_TIMERS) -> None:
        if not (200 <= response.status < 300):
            raise TransactionError(f"only a 2xx is retransmitted by the UA core, not {response.status}")
        self.response = response
        self.timers = timers
        self._interval = timers.t1
        self.give_up_at = now + 64 * timers.t1
        self.deadline: float | None = now + self._interval
        """When to call :meth:`fire` next (None: finished, acknowledged or timed out)."""
        self.acked = False
        self.timed_out = False

    def ack_received(self) -> None:
        """The ACK for this 2xx arrived (the TU matched it by dialog and CSeq): stop."""
        self.acked = True
        self.deadline = None

    def fire(self, now: float) -> Response | None:
        """The retransmission timer fired: the 2xx to send again, or None (early call, done, or give-up)."""
        if self.deadline is None or now < self.deadline - 1e-9:
            return None
        if now >= self.give_up_at - 1e-9:
            self.timed_out = True
            self.deadline = None
            return None
        self._interval = min(2 * self._interval, self.timers.t2)
        self.deadline = min(now + self._interval, self.give_up_at)
        return self.response
