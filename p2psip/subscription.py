"""SIP-specific event notification (RFC 6665): the ``Event`` and ``Subscription-State`` headers and the
state of a subscription on both sides, as pure state (no sockets, no clock: ``now`` is passed in).

A subscription is a dialog (:class:`p2psip.dialog.Dialog`) plus an event package, a state
(``pending`` -> ``active`` -> ``terminated``) and an expiry. Every event package of the project (presence,
message-summary, the implicit ``refer`` subscription of a transfer) uses these classes; the package only
says what the NOTIFY bodies mean.

* The notifier side: :func:`check_subscribe` decides what to answer a SUBSCRIBE that starts a subscription
  (400 without a readable ``Event``, 489 Bad Event for a package we do not serve, 423 for an Expires below
  our minimum, a fetch for ``Expires: 0``); :class:`NotifierSubscription` then follows refreshes,
  authorization, expiry and termination, and builds each NOTIFY with the right ``Subscription-State``.
* The subscriber side: :class:`Subscriber` is one SUBSCRIBE we sent. A SUBSCRIBE may fork, so every
  notifier that answers (a 2xx, or a NOTIFY with a new To tag, which may come first) gets its own
  :class:`SubscriberSubscription` with its own dialog. :meth:`Subscriber.receive_notify` checks a NOTIFY
  (481 when it belongs to no subscription, 489 when its Event does not match, 400 without a readable
  Subscription-State) before it changes anything, so a bad NOTIFY never ends a good subscription.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from p2psip.dialog import Dialog, DialogState
from p2psip.errors import ParseError, SIPStatusError, TransactionError
from p2psip.message import Request, Response
from p2psip.timers import DEFAULT_TIMERS, TimerConfig
from p2psip.uri import TOKEN_CHARS, Address, format_params, parse_params

__all__ = [
    "EventHeader",
    "NotifierSubscription",
    "Reject",
    "SubState",
    "SubscribePolicy",
    "Subscriber",
    "SubscriberSubscription",
    "SubscriptionState",
    "check_subscribe",
    "unreadable_event",
]

MAX_EXPIRES_VALUE = 2**32 - 1
"""delta-seconds beyond this are refused as unreadable (RFC 3261 §20.19 bounds Expires to 2**32-1)."""


# ----------------------------------------------------------------------------------- Event header


class EventHeader(NamedTuple):
    """``Event: presence;id=7`` (RFC 6665 §8.2.1): the package (lower-case: event types compare without
    case), the ``id`` parameter (compared exactly) and any other parameters."""

    package: str
    id: str | None = None
    params: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> EventHeader:
        """Parse an Event (or Allow-Events item) value; raises :class:`ParseError` (status hint 400)."""
        value = text.strip(" \t")
        name, sep, rest = value.partition(";")
        name = name.strip(" \t")
        if not name or len(name) > 64 or not TOKEN_CHARS.issuperset(name):
            raise ParseError(f"bad Event header {text[:80]!r}")
        params = parse_params(rest, value) if sep else {}
        event_id = params.pop("id", None)
        if event_id is not None and (event_id.startswith('"') or not TOKEN_CHARS.issuperset(event_id)):
            raise ParseError(f"bad Event id in {text[:80]!r}")
        return cls(name.lower(), event_id, tuple(params.items()))

    @classmethod
    def of(cls, message: Request | Response) -> EventHeader | None:
        """The Event of a message (``o`` is its compact form), None when absent; ParseError if unreadable."""
        value = message.get("Event")
        return None if value is None else cls.parse(value)

    def matches(self, other: EventHeader) -> bool:
        """Same package and same id (RFC 6665 §8.2.1: both must match for a NOTIFY to fit a SUBSCRIBE)."""
        return self.package == other.package and self.id == other.id

    def __str__(self) -> str:
        params = dict(self.params)
        if self.id is not None:
            params["id"] = self.id
        return self.package + format_params(params)


def unreadable_event(request: Request) -> bool:
    """Whether ``request`` is a SUBSCRIBE or PUBLISH whose ``Event`` header is there but does not parse.

    A peer answers such a request 400 itself rather than judging it "not presence" and proxying it on: no
    notifier or state compositor can serve it, and forwarded it would reach a user's phone (or, for an AOR
    nobody registered, come back as a misleading 404). A missing Event is not unreadable: RFC 6665 leaves
    that to the notifier (our UA answers 400, an agent 489)."""
    if request.method not in ("SUBSCRIBE", "PUBLISH"):
        return False
    try:
        EventHeader.of(request)
    except ParseError:
        return True
    return False


# ------------------------------------------------------------------------ Subscription-State header


class SubState(enum.Enum):
    PENDING = "pending"
    ACTIVE = "active"
    TERMINATED = "terminated"


RETRY_REASONS = frozenset({"deactivated", "probation", "timeout", "giveup"})
"""Termination reasons after which the subscriber may subscribe again (RFC 6665 §4.1.3); ``rejected``,
``noresource`` and ``invariant`` say "do not"; no reason at all means the subscriber may try again."""


class SubscriptionState(NamedTuple):
    """``Subscription-State: active;expires=599`` / ``terminated;reason=timeout;retry-after=30``."""

    state: SubState
    expires: int | None = None
    reason: str | None = None
    retry_after: int | None = None

    @classmethod
    def parse(cls, text: str) -> SubscriptionState:
        value = text.strip(" \t")
        name, sep, rest = value.partition(";")
        params = parse_params(rest, value) if sep else {}
        try:
            state = SubState(name.strip(" \t").lower())
        except ValueError:
            # §4.1.3: an unknown state is ignored like a NOTIFY without state: treat as pending? No: refuse.
            raise ParseError(f"bad Subscription-State {text[:80]!r}") from None
        reason = params.get("reason")
        if reason is not None and not TOKEN_CHARS.issuperset(reason):
            raise ParseError(f"bad Subscription-State reason in {text[:80]!r}")
        return cls(
            state,
            _delta(params.get("expires"), text),
            reason.lower() if reason else None,
            _delta(params.get("retry-after"), text),
        )

    @property
    def may_resubscribe(self) -> bool:
        """Whether the subscriber may subscribe again after this termination (RFC 6665 §4.1.3)."""
        return self.reason is None or self.reason in RETRY_REASONS

    def __str__(self) -> str:
        text = self.state.value
        if self.expires is not None and self.state is not SubState.TERMINATED:
            text += f";expires={self.expires}"
        if self.reason is not None and self.state is SubState.TERMINATED:
            text += f";reason={self.reason}"
        if self.retry_after is not None and self.state is SubState.TERMINATED:
            text += f";retry-after={self.retry_after}"
        return text


def _delta(value: str | None, whole: str) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 10 or int(value) > MAX_EXPIRES_VALUE:
        raise ParseError(f"bad delta-seconds in {whole[:80]!r}")
    return int(value)


# ----------------------------------------------------------------------------------- notifier side


@dataclass(frozen=True)
class SubscribePolicy:
    """What a notifier accepts: the event packages it serves and the bounds of a subscription's life.
    ``default_expires`` maps a package to the duration it gets when the SUBSCRIBE names none."""

    packages: frozenset[str]
    min_expires: int = 60
    max_expires: int = 3600
    default_expires: dict[str, int] = field(default_factory=dict)

    def allow_events(self) -> str:
        return ", ".join(sorted(self.packages))


class Reject(SIPStatusError):
    """A SUBSCRIBE, NOTIFY or REFER to refuse: the status, an optional reason and the headers to add.
    Returned as a decision by the sans-IO checks (not raised): an :class:`~p2psip.errors.SIPStatusError`
    like every "answer with status N" of the stack."""

    def response(self, request: Request) -> Response:
        return Response.for_error(request, self)


class Accepted(NamedTuple):
    event: EventHeader
    expires: int


def check_subscribe(request: Request, policy: SubscribePolicy) -> Accepted | Reject:
    """What to answer a SUBSCRIBE, before any authorization (RFC 6665 §4.2.1.1): a :class:`Reject`
    (400 no or bad Event / Expires, 489 unknown package with Allow-Events, 423 too brief with
    Min-Expires) or the event and the granted duration (0: a fetch, answered then ended by one NOTIFY)."""
    try:
        event = EventHeader.of(request)
        asked = request.expires
    except ParseError as exc:
        return Reject(400, f"Bad Request ({exc})")
    if event is None:
        return Reject(400, "Bad Request (no Event header)")
    if event.package not in policy.packages:
        return Reject(489, None, (("Allow-Events", policy.allow_events()),))
    if asked is None:
        asked = policy.default_expires.get(event.package, policy.max_expires)
    if 0 < asked < policy.min_expires:
        return Reject(423, None, (("Min-Expires", str(policy.min_expires)),))
    return Accepted(event, min(asked, policy.max_expires))


class NotifierSubscription:
    """A subscription we serve: its dialog (we are the UAS of the SUBSCRIBE), event, state and expiry.

    Create it with :meth:`accept` after :func:`check_subscribe` agreed; send the NOTIFY that
    :meth:`notify` builds at once (§4.2.1.2: every accepted SUBSCRIBE, refreshes and fetches included, is
    followed by a NOTIFY). :attr:`deadline` is when to call :meth:`expire`.
    """

    def __init__(self, dialog: Dialog, event: EventHeader, expires: int, now: float, pending: bool) -> None:
        self.dialog = dialog
        self.event = event
        self.state = SubState.PENDING if pending else SubState.ACTIVE
        self.expires_at = now + expires
        self.reason: str | None = None
        self.retry_after: int | None = None
        if expires == 0:
            self.terminate("timeout")  # a fetch: one NOTIFY with the state, then nothing

    @classmethod
    def accept(
        cls, request: Request, response: Response, accepted: Accepted, now: float, *, pending: bool = False
    ) -> NotifierSubscription:
        """The subscription our 2xx (with our To tag and Contact) to ``request`` creates."""
        response.set("Expires", str(accepted.expires))
        return cls(Dialog.uas(request, response), accepted.event, accepted.expires, now, pending)

    @property
    def deadline(self) -> float | None:
        return None if self.state is SubState.TERMINATED else self.expires_at

    def refresh(self, request: Request, policy: SubscribePolicy, now: float) -> Accepted | Reject:
        """An in-dialog SUBSCRIBE: a refresh, or an unsubscribe with ``Expires: 0`` (§4.2.1.2). The caller
        answers with ``Expires`` set to the granted value (a 2xx) and sends a NOTIFY either way."""
        if self.state is SubState.TERMINATED:
            return Reject(481, "Subscription Does Not Exist")
        decision = check_subscribe(request, policy)
        if isinstance(decision, Reject):
            return decision
        if not decision.event.matches(self.event):
            return Reject(489, None, (("Allow-Events", policy.allow_events()),))
        status = self.dialog.receive_request(request)
        if status is not None:
            return Reject(status)
        self.expires_at = now + decision.expires
        if decision.expires == 0:
            self.terminate("timeout")
        return decision

    def authorize(self, allowed: bool) -> None:
        """The presentity decided: a pending subscription becomes active, or ends with ``rejected``."""
        if self.state is SubState.TERMINATED:
            return
        if allowed:
            self.state = SubState.ACTIVE
        else:
            self.terminate("rejected")

    def terminate(self, reason: str | None, retry_after: int | None = None) -> None:
        """End the subscription; the next :meth:`notify` carries ``terminated;reason=...``.
        ``deactivated`` asks the watcher to subscribe again at once (the agent moved)."""
        if self.state is not SubState.TERMINATED:
            self.state = SubState.TERMINATED
            self.reason = reason
            self.retry_after = retry_after

    def expire(self, now: float) -> bool:
        """Call at :attr:`deadline`: True when the subscription just ran out (send the final NOTIFY)."""
        if self.state is SubState.TERMINATED or now < self.expires_at - 1e-9:
            return False
        self.terminate("timeout")
        return True

    def subscription_state(self, now: float) -> SubscriptionState:
        if self.state is SubState.TERMINATED:
            return SubscriptionState(self.state, None, self.reason, self.retry_after)
        return SubscriptionState(self.state, max(0, int(self.expires_at - now)))

    def notify(self, now: float, body: bytes = b"", content_type: str | None = None) -> Request:
        """The next NOTIFY of this subscription (in its dialog), with Event and Subscription-State."""
        if self.dialog.state is DialogState.TERMINATED:
            raise TransactionError("the subscription's dialog is over: no NOTIFY can be sent")
        return self.dialog.create_request(
            "NOTIFY",
            body=body,
            content_type=content_type if body else None,
            headers=[("Event", str(self.event)), ("Subscription-State", str(self.subscription_state(now)))],
        )


# --------------------------------------------------------------------------------- subscriber side


class SubscriberSubscription:
    """One notifier's subscription from our SUBSCRIBE (forks each get one): its dialog and the state
    the notifier last told us. ``notify_deadline``: Timer N, the NOTIFY a 2xx promised must come by then."""

    def __init__(self, dialog: Dialog) -> None:
        self.dialog = dialog
        self.state: SubState | None = None  # None: accepted (2xx) but no NOTIFY yet
        self.expires_at: float | None = None
        self.notify_deadline: float | None = None
        self.last: SubscriptionState | None = None
        self.reason: str | None = None

    @property
    def terminated(self) -> bool:
        return self.state is SubState.TERMINATED

    @property
    def may_resubscribe(self) -> bool:
        return self.last is None or self.last.may_resubscribe

    def _end(self, reason: str | None) -> None:
        self.state = SubState.TERMINATED
        self.reason = reason
        self.notify_deadline = None
        self.dialog.terminate()


class NotifyOutcome(NamedTuple):
    status: int
    reason: str | None = None
    subscription: SubscriberSubscription | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def response(self, request: Request) -> Response:
        response = Response.for_request(request, self.status, self.reason)
        for name, value in self.headers:
            response.add(name, value)
        return response


class Subscriber:
    """A SUBSCRIBE we sent and the subscriptions it made (one per notifier: SUBSCRIBE may fork).

    Feed it the final response (:meth:`receive_response`) and every NOTIFY whose Call-ID and To tag are
    ours (:meth:`receive_notify`); call :meth:`check_timers` at :attr:`deadline`. :meth:`refresh` builds the
    in-dialog SUBSCRIBE that renews (or, with 0, ends) one subscription.
    """

    def __init__(
        self,
        request: Request,
        now: float,
        timers: TimerConfig = DEFAULT_TIMERS,
        *,
        implicit: EventHeader | None = None,
    ) -> None:
        event = implicit or EventHeader.of(request)
        if event is None:
            raise TransactionError("a SUBSCRIBE needs an Event header")
        self.implicit = implicit is not None
        """An implicit subscription (REFER's ``refer``, RFC 3515 §2.4.4): made by another request, and
        its NOTIFYs may leave out the ``id`` the first REFER of a dialog gets (§2.4.6)."""
        if request.from_.tag is None:
            raise TransactionError("a SUBSCRIBE needs a From tag")
        self.request = request
        self.event = event
        self.call_id = request.call_id
        self.local_tag = request.from_.tag
        self.timers = timers
        self.sent_at = now
        self.subscriptions: dict[str, SubscriberSubscription] = {}
        self.final: Response | None = None
        self.closed = False
        """No new fork is taken any more (the application unsubscribed or gave up)."""

    def expects(self, event: EventHeader) -> bool:
        """Whether a NOTIFY with ``event`` belongs to this subscription."""
        if event.matches(self.event):
            return True
        return self.implicit and event.package == self.event.package and event.id is None

    def _fork(self, remote_tag: str, dialog: Dialog) -> SubscriberSubscription:
        sub = self.subscriptions.get(remote_tag)
        if sub is None:
            sub = SubscriberSubscription(dialog)
            self.subscriptions[remote_tag] = sub
        return sub

    def receive_response(self, response: Response, now: float) -> SubscriberSubscription | None:
        """The final response to the SUBSCRIBE (or to a refresh in one subscription's dialog).
        A 2xx to the initial SUBSCRIBE makes a subscription waiting for its NOTIFY (Timer N)."""
        if response.status < 200:
            return None
        if self.final is None and response.cseq.number == self.request.cseq.number:
            self.final = response
        tag = response.to.tag or ""
        sub = self.subscriptions.get(tag)
        if 200 <= response.status < 300:
            if sub is None:
                if self.closed or not tag:
                    return None
                sub = self._fork(tag, Dialog.uac(self.request, response))
            else:
                sub.dialog.receive_response(self.request, response)
                if not sub.dialog.route_set and response.cseq.number == self.request.cseq.number:
                    # the NOTIFY that made this dialog came first: an in-dialog request carries no
                    # Record-Route, so the proxies that record-routed the SUBSCRIBE are in the 2xx only
                    sub.dialog.route_set = [Address(str(rr)) for rr in reversed(response.record_route)]
            if sub.state is None:
                sub.notify_deadline = now + 64 * self.timers.t1
            if response.expires is not None and sub.state is not SubState.TERMINATED:
                sub.expires_at = now + response.expires
            return sub
        if sub is not None and response.status in (481, 408, 489) and response.cseq.number > 1:
            sub._end(f"refresh failed {response.status}")  # §4.1.2.2: a failed refresh ends it
        return sub

    def receive_notify(self, request: Request, now: float) -> NotifyOutcome:
        """Check a NOTIFY for this SUBSCRIBE and apply it. Nothing changes unless the answer is 200."""
        if request.call_id != self.call_id or request.to.tag != self.local_tag:
            return NotifyOutcome(481, "Subscription Does Not Exist")
        try:
            event = EventHeader.of(request)
            state_text = request.get("Subscription-State")
            state = SubscriptionState.parse(state_text) if state_text is not None else None
            remote_tag = request.from_.tag or ""
            contacts = request.contacts
        except ParseError as exc:
            return NotifyOutcome(400, f"Bad Request ({exc})")
        if event is None or not self.expects(event):
            return NotifyOutcome(489, None, None, (("Allow-Events", self.event.package),))
        if state is None:
            return NotifyOutcome(400, "Bad Request (no Subscription-State)")
        sub = self.subscriptions.get(remote_tag)
        if sub is None:
            if self.closed or not contacts or not remote_tag:
                return NotifyOutcome(481, "Subscription Does Not Exist")
            sub = self._fork(remote_tag, _dialog_from_notify(self.request, request))
        elif sub.terminated:
            return NotifyOutcome(481, "Subscription Does Not Exist")
        else:
            status = sub.dialog.receive_request(request)
            if status is not None:
                return NotifyOutcome(status)
        sub.last = state
        sub.notify_deadline = None
        if state.state is SubState.TERMINATED:
            sub._end(state.reason)
        else:
            sub.state = state.state
            if state.expires is not None:
                sub.expires_at = now + state.expires
        return NotifyOutcome(200, None, sub)

    @property
    def deadline(self) -> float | None:
        times = [
            t
            for sub in self.subscriptions.values()
            if not sub.terminated
            for t in (sub.notify_deadline, sub.expires_at)
            if t is not None
        ]
        return min(times) if times else None

    def check_timers(self, now: float) -> list[SubscriberSubscription]:
        """End subscriptions whose NOTIFY never came (Timer N) or that ran out; returns them."""
        ended = []
        for sub in self.subscriptions.values():
            if sub.terminated:
                continue
            if sub.notify_deadline is not None and now >= sub.notify_deadline - 1e-9:
                sub._end("no notify")
                ended.append(sub)
            elif sub.expires_at is not None and now >= sub.expires_at - 1e-9:
                sub._end("timeout")
                ended.append(sub)
        return ended

    def refresh_at(self, sub: SubscriberSubscription) -> float | None:
        """When to renew ``sub``: before it expires, by a margin of a third of its life, at most 30 s."""
        if sub.terminated or sub.expires_at is None or sub.state is None:
            return None
        granted = max(0.0, sub.expires_at - self.sent_at)
        return sub.expires_at - min(granted / 3, 30.0)

    def refresh(self, sub: SubscriberSubscription, expires: int, now: float) -> Request:
        """The in-dialog SUBSCRIBE that renews ``sub`` for ``expires`` seconds (0: unsubscribe)."""
        self.sent_at = now
        return sub.dialog.create_request(
            "SUBSCRIBE", headers=[("Event", str(self.event)), ("Expires", str(expires))]
        )


def _dialog_from_notify(subscribe: Request, notify: Request) -> Dialog:
    """The dialog a NOTIFY creates when it arrives before (or instead of) the 2xx (RFC 6665 §4.1.2.4):
    we are its UAS, so the route set is its Record-Route in order and its Contact is the target."""
    local_uri = subscribe.from_.copy()
    local_uri.tag = None
    remote_uri = subscribe.to.copy()
    remote_uri.tag = None
    contacts = subscribe.contacts
    return Dialog(
        call_id=subscribe.call_id,
        local_tag=subscribe.from_.tag or "",
        remote_tag=notify.from_.tag or "",
        local_uri=local_uri,
        remote_uri=remote_uri,
        remote_target=notify.contacts[0].uri.copy(),
        route_set=[Address(str(rr)) for rr in notify.record_route],
        local_cseq=subscribe.cseq.number,
        remote_cseq=notify.cseq.number,
        local_contact=contacts[0].copy() if contacts else None,
        secure=subscribe.uri.secure,
        is_uac=True,
        state=DialogState.CONFIRMED,
    )
