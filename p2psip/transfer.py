"""Call transfer in the UserAgent: REFER (RFC 3515) both ways, Replaces (RFC 3891), norefersub (RFC 4488).

Transferor (the party that moves the call)::

    frag = await call.transfer("sip:carol@example.net")        # blind: REFER, 202, NOTIFYs, BYE
    frag = await call_with_bob.transfer(call_with_carol)        # attended: Refer-To carries Replaces

``transfer`` sends the REFER in the call's dialog and follows the implicit ``refer`` subscription: the
referee reports the new call's progress as ``message/sipfrag`` NOTIFYs; on a 2xx it hangs the call up and
returns the final status. With ``refer_sub=False`` it asks for no subscription (``Refer-Sub: false``) and
returns None once the REFER is accepted.

Transferee (the party asked to call someone): a REFER in a call is accepted with 202 (or refused with 400
/ 403, see :func:`p2psip.refer.check_refer`; 603 when the UA does not accept transfers), a NOTIFY
``SIP/2.0 100 Trying`` goes out at once, the new INVITE goes to the Refer-To target (with its Replaces and a
``Referred-By``; offering the session description it had in the old call), and a final NOTIFY reports its
outcome. The new call is put on ``ua.events.referred``.

Transfer target: an INVITE with Replaces for one of our calls takes its place (:func:`check_replaces`:
481 for an unknown or foreign early dialog, 486 for ``early-only`` against an answered one, 603 for one
already over); once it is answered, the replaced call is hung up (BYE, or CANCEL while it rings).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from p2psip import sipfrag
from p2psip.dialog import DialogId, DialogState
from p2psip.errors import CallFailed, ParseError
from p2psip.message import Request, Response
from p2psip.refer import OPTION_TAG_NOREFERSUB, Replaces, check_refer, refer_to
from p2psip.subscription import EventHeader, NotifierSubscription, Reject, SubState
from p2psip.transaction import ServerTransaction
from p2psip.uaevents import IncomingSubscription
from p2psip.uri import URI, Address

if TYPE_CHECKING:
    from p2psip.useragent import Call

log = logging.getLogger("p2psip.transfer")

REFER_EXPIRES = 120
"""How long the implicit subscription of a REFER we accept lives (it ends with the new call's outcome)."""


async def transfer(
    call: Call,
    target: str | URI | Call,
    *,
    refer_sub: bool = True,
    hangup: bool = True,
    timeout: float = 64.0,
) -> sipfrag.FragStatus | None:
    """Transfer ``call`` to ``target`` (a URI: blind; another Call: attended, with Replaces)."""
    ua = call.ua
    dialog = call.dialog
    if dialog is None or dialog.state is not DialogState.CONFIRMED:
        raise CallFailed(481, "Call/Transaction Does Not Exist (only an answered call can be transferred)")
    replaces: Replaces | None = None
    if not isinstance(target, (str, URI)):  # another Call: attended transfer
        other = target.dialog
        if other is None or other.state is DialogState.TERMINATED:
            raise CallFailed(481, "Call/Transaction Does Not Exist (the call to replace is over)")
        replaces = Replaces.for_dialog(other)
        uri = other.remote_target.copy()
    else:
        uri = URI(target) if isinstance(target, str) else target
    headers = [("Refer-To", refer_to(uri, replaces)), ("Referred-By", str(Address.build(ua.aor.copy())))]
    if not refer_sub:
        headers += [("Refer-Sub", "false"), ("Supported", OPTION_TAG_NOREFERSUB)]
    request = dialog.create_request("REFER", headers=headers)
    watch = ua.events.expect_refer(request) if refer_sub else None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        response = await ua._request(request, timeout=min(timeout, 32.0))
    except BaseException:
        if watch is not None:
            ua.events.forget(watch)
        raise
    if response.status >= 300:
        if watch is not None:
            ua.events.forget(watch)
        raise CallFailed(response.status, response.reason, response)
    no_sub = (response.get("Refer-Sub") or "").strip().lower() == "false"
    if watch is None or no_sub:
        if watch is not None:
            ua.events.forget(watch)
        if hangup:
            await call.bye()
        return None
    watch.receive_response(response)
    final: sipfrag.FragStatus | None = None
    try:
        while final is None:
            note = await watch.next(max(0.0, deadline - loop.time()))
            if note.body:
                frag = sipfrag.parse_status(note.body)  # the subscription's body check already passed
                if frag.final:
                    final = frag
            if note.state.state is SubState.TERMINATED and final is None:
                raise CallFailed(487, "Request Terminated (the transfer ended without a final status)")
    finally:
        if final is not None and not watch.ended.is_set():
            watch.core.closed = True
    if final.success and hangup and call.state != "terminated":
        await call.bye()
    return final


# ------------------------------------------------------------------------------------------ referee


def receive_refer(ua_call: Call, request: Request, transaction: ServerTransaction) -> None:
    """A REFER inside ``ua_call``'s dialog: accept it and place the call it asks for."""
    ua = ua_call.ua
    respond = ua.stack.respond
    dialog = ua_call.dialog
    assert dialog is not None
    decision = check_refer(request)
    if isinstance(decision, Reject):
        respond(transaction, decision.response(request))
        return
    status = dialog.receive_request(request)
    if status is not None:
        respond(transaction, Response.for_request(request, status))
        return
    if not ua.accept_transfers:
        respond(transaction, Response.for_request(request, 603, "Decline (transfers are not accepted)"))
        return
    response = Response.for_request(request, 202)
    response.add("Contact", str(ua._contact(transaction.source)))
    if not decision.subscription:
        response.add("Refer-Sub", "false")
    respond(transaction, response)
    notifier: IncomingSubscription | None = None
    if decision.subscription:
        core = NotifierSubscription(
            dialog, EventHeader("refer", str(request.cseq.number)), REFER_EXPIRES, ua.loop.time(), False
        )
        notifier = IncomingSubscription.implicit(ua.events, request, transaction, core)
        notifier.content_type = sipfrag.CONTENT_TYPE
        ua.events.spawn(notifier.notify(sipfrag.compose(100, "Trying"), sipfrag.CONTENT_TYPE))
    ua.events.spawn(_follow(ua_call, request, decision.target, decision.headers, notifier))


async def _follow(
    old: Call,
    refer: Request,
    target: URI,
    headers: tuple[tuple[str, str], ...],
    notifier: IncomingSubscription | None,
) -> None:
    ua = old.ua
    body, content_type = old.local_description()
    extra = list(headers)
    referred_by = refer.get("Referred-By")
    if referred_by:
        extra.append(("Referred-By", referred_by))
    new = ua.invite(target, body=body, content_type=content_type, headers=extra)
    ua.events.referred.put_nowait(new)
    try:
        response = await new.answered(ua.answer_timeout)
        frag = (response.status, response.reason)
    except CallFailed as exc:
        frag = (exc.status, exc.reason)
    except TimeoutError:
        new.cancel()
        frag = (408, "Request Timeout")
    if notifier is not None and notifier.core is not None:
        notifier.core.terminate("noresource")
        await notifier.notify(sipfrag.compose(*frag), sipfrag.CONTENT_TYPE)


# ---------------------------------------------------------------------------------- transfer target


def check_replaces(ua_calls: dict[DialogId, Call], request: Request) -> Call | int | None:
    """The call an INVITE's Replaces names (None: no Replaces), or the status to refuse it with."""
    value = request.get("Replaces")
    if value is None:
        return None
    try:
        replaces = Replaces.parse(value)
    except ParseError:
        return 400
    call = ua_calls.get(replaces.dialog_id())
    if call is None or call.dialog is None:
        return 481
    if call.dialog.state is DialogState.TERMINATED or call.state == "terminated":
        return 603
    if replaces.early_only and call.dialog.state is DialogState.CONFIRMED:
        return 486
    if call.dialog.state is DialogState.EARLY and not call.dialog.is_uac:
        return 481  # RFC 3891 §3: an early dialog we did not start cannot be replaced
    return call


__all__ = ["check_replaces", "receive_refer", "transfer"]
