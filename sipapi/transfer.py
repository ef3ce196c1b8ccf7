"""``event.action.transfer(uri)``: a script moves an incoming call somewhere else (the article's
``transfer_to_voicemail``).

A proxy is no party to the dialog, and a caller only follows a REFER from the other end of its call, so
the script server (or peer) becomes that other end for a moment (RFC 5589's "transfer by a proxy turned
UAS"):

1. the INVITE is answered by the server itself, ``200 OK`` with an SDP whose media are ``a=inactive`` (no
   audio flows to a server that has none), Record-Route copied as a UAS must;
2. once the ACK arrives, a REFER goes to the caller in that dialog: ``Refer-To: <uri>``, with
   ``Referred-By`` the address that was called;
3. the caller calls ``uri`` and reports the outcome in ``message/sipfrag`` NOTIFYs; at the final one (or a
   REFER refused, or nothing heard for the guard time) the server hangs up with BYE.

A caller whose INVITE lists ``Allow`` without REFER cannot follow one: it gets ``302 Moved Temporarily``
to ``uri`` instead, which any phone follows (or shows).

Everything here runs on the core's loop; the legs are found by dialog id (in-dialog requests) and by
transaction context (responses), see :class:`sipapi.runtime.ScriptingCore`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from p2psip import sdp, sipfrag
from p2psip.address import target_from_uri
from p2psip.dialog import AnswerRetransmitter, Dialog
from p2psip.errors import ParseError
from p2psip.message import Request, Response
from p2psip.refer import refer_to
from p2psip.stack import Target
from p2psip.transaction import ClientTransaction, ServerTransaction
from p2psip.uri import URI, Address

if TYPE_CHECKING:
    import asyncio

    from .runtime import CallControl, ScriptingCore

log = logging.getLogger("sipapi.transfer")

GUARD = 64.0
"""Seconds a transfer may take from the 200 to the final NOTIFY before the server hangs up anyway."""


def allows_refer(request: Request) -> bool:
    """Whether the caller said it takes REFER (its Allow lists it; RFC 3261 §20.5: method names are
    case-sensitive)."""
    return "REFER" in request.allow


def inactive_answer(request: Request, address: str) -> tuple[bytes, str]:
    """The SDP of the server's 200: an answer to the caller's offer with every stream ``inactive`` (or an
    inactive offer when the INVITE had none; the ACK's answer is then ignored)."""
    try:
        if request.body and (request.content_type or "application/sdp") == "application/sdp":
            offer = sdp.SessionDescription.parse(request.body)
            return bytes(sdp.make_answer(offer, address, 9, direction="inactive")), "application/sdp"
    except ParseError:
        pass
    return bytes(sdp.make_offer(address, 9, direction="inactive")), "application/sdp"


class TransferLeg:
    """One call the server answered in order to transfer it (see the module docstring)."""

    def __init__(self, core: ScriptingCore, control: CallControl, target: URI) -> None:
        self.core = core
        self.control = control
        self.target = target
        self.loop = core.stack.loop
        self.dialog: Dialog | None = None
        self.retransmit: AnswerRetransmitter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._guard: asyncio.TimerHandle | None = None
        self.refer_sent = False
        self.outcome: int | None = None
        """The new call's final status from the caller's NOTIFYs (or the REFER's failure status)."""
        self.ended = False

    # -- start ------------------------------------------------------------------------------------------
    def start(self) -> None:
        control = self.control
        request = control.request
        if not allows_refer(request):
            response = control.response(302, "Moved Temporarily (transferred)")
            response.set("Contact", str(Address.build(self.target.copy())))
            control._send(response)
            self.ended = True
            return
        response = control.response(200)
        for value in request.get_all("Record-Route"):
            response.add("Record-Route", value)
        host = self.core.stack.local_address(control.source.transport, toward=control.source.host)[0]
        body, content_type = inactive_answer(request, str(host))
        response.body = body
        response.set("Content-Type", content_type)
        self.dialog = Dialog.uas(request, response)
        self.core.transfer_legs[self.dialog.id] = self
        control._send(response)
        if not control.transaction.reliable:
            self.retransmit = AnswerRetransmitter(response, self.loop.time(), self.core.stack.timers)
            self._arm()
        self._guard = self.loop.call_later(GUARD, self._give_up)

    def _arm(self) -> None:
        retransmit = self.retransmit
        if retransmit is not None and retransmit.deadline is not None:
            self._timer = self.loop.call_at(retransmit.deadline, self._fire)

    def _fire(self) -> None:
        retransmit = self.retransmit
        if retransmit is None:
            return
        again = retransmit.fire(self.loop.time())
        if again is not None:
            self.core.stack.send_stateless(again, self.control.source)
        if retransmit.timed_out:
            self._hang_up("no ACK for the 200")
        else:
            self._arm()

    def _give_up(self) -> None:
        self._guard = None
        self._hang_up("the transfer took too long")

    # -- requests in the dialog ---------------------------------------------------------------------------
    def on_request(self, request: Request, transaction: ServerTransaction | None) -> None:
        dialog = self.dialog
        assert dialog is not None
        method = request.method
        if method == "ACK":
            if self.retransmit is not None:
                self.retransmit.ack_received()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self.refer_sent and not self.ended:
                self._send_refer()
            return
        if transaction is None:
            return
        status = dialog.receive_request(request)
        if status is not None:
            self.core.stack.respond(transaction, Response.for_request(request, status))
            return
        if method == "BYE":
            self.core.stack.respond(transaction, Response.for_request(request, 200))
            self._close()
        elif method == "NOTIFY":
            self._notify(request, transaction)
        else:
            self.core.stack.respond(transaction, Response.for_request(request, 200))

    def _notify(self, request: Request, transaction: ServerTransaction) -> None:
        try:
            frag = sipfrag.parse_status(request.body) if request.body else None
        except ParseError as exc:
            self.core.stack.respond(transaction, Response.for_error(request, exc))
            return
        self.core.stack.respond(transaction, Response.for_request(request, 200))
        terminated = (request.get("Subscription-State") or "").strip().lower().startswith("terminated")
        if frag is not None and frag.final:
            self.outcome = frag.status
            log.info("transfer of %s to %s: %d %s", request.call_id, self.target, frag.status, frag.reason)
            self._hang_up(f"transferred ({frag.status})")
        elif terminated:
            self._hang_up("the transfer subscription ended")

    # -- requests we send ---------------------------------------------------------------------------------
    def _send(self, request: Request) -> None:
        route = request.get("Route")
        hop: Target = target_from_uri(Address(route).uri if route is not None else request.uri)
        try:
            tx = self.core.stack.send_request(request, hop)
        except Exception as exc:  # an unreachable caller: nothing more to do for this leg
            log.info("cannot send %s to the caller: %s", request.method, exc)
            self._close()
            return
        tx.context = self

    def _send_refer(self) -> None:
        dialog = self.dialog
        assert dialog is not None
        self.refer_sent = True
        referred_by = Address.build(self.control.request.to.uri.copy())
        request = dialog.create_request(
            "REFER",
            headers=[("Refer-To", refer_to(self.target)), ("Referred-By", str(referred_by))],
        )
        self._send(request)

    def _hang_up(self, why: str) -> None:
        dialog = self.dialog
        if self.ended or dialog is None:
            return
        self.ended = True
        log.info("transfer leg %s ends: %s", dialog.id, why)
        self._send(dialog.create_request("BYE"))
        dialog.terminate()

    def _close(self) -> None:
        self.ended = True
        for timer in (self._timer, self._guard):
            if timer is not None:
                timer.cancel()
        self._timer = self._guard = None
        if self.dialog is not None:
            self.dialog.terminate()
            self.core.transfer_legs.pop(self.dialog.id, None)

    # -- responses to what we sent -----------------------------------------------------------------------
    def on_response(self, response: Response, transaction: ClientTransaction) -> None:
        if response.status < 200:
            return
        method = response.cseq.method
        if method == "REFER" and response.status >= 300:
            self.outcome = response.status
            self._hang_up(f"the caller refused the REFER ({response.status})")
        elif method == "BYE":
            self._close()

    def on_failure(self, transaction: ClientTransaction, why: str) -> None:
        method = transaction.request.method
        if method == "BYE":
            self._close()
        else:
            self._hang_up(f"{method} failed: {why}")


__all__ = ["GUARD", "TransferLeg", "allows_refer", "inactive_answer"]
