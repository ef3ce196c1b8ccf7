"""The UserAgent's side of SIP events (RFC 6665): subscriptions we make and subscriptions we serve.

The state machines are :mod:`p2psip.subscription`; this module is their asyncio adapter inside a
:class:`p2psip.useragent.UserAgent`: it sends the SUBSCRIBEs and NOTIFYs, answers the ones that arrive, and
runs the timers (refresh, expiry, Timer N) on the UA's loop::

    sub = await ua.subscribe("sip:bob@example.net", "presence")   # SUBSCRIBE, 200, NOTIFY
    note = await sub.next(timeout=5)                              # every NOTIFY, as it comes
    await sub.unsubscribe()

    ua = UserAgent(stack, aor, events=("presence",), on_subscribe=lambda s: s.accept(doc, pidf.CONTENT_TYPE))
    await incoming.notify(new_doc, pidf.CONTENT_TYPE)             # to one watcher

A NOTIFY whose body the package cannot read gets 400 and changes nothing: not that subscription, and
certainly not any other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from p2psip import sipfrag
from p2psip.background import Background
from p2psip.dialog import DialogId, dialog_id_of_request
from p2psip.errors import CallFailed, P2PSIPError, ParseError
from p2psip.message import Request, Response
from p2psip.subscription import (
    Accepted,
    EventHeader,
    NotifierSubscription,
    Reject,
    SubscribePolicy,
    Subscriber,
    SubscriberSubscription,
    SubscriptionState,
    SubState,
    check_subscribe,
)
from p2psip.transaction import ServerTransaction
from p2psip.uri import URI

if TYPE_CHECKING:
    from p2psip.useragent import OutgoingCall, UserAgent

log = logging.getLogger("p2psip.events")

BodyCheck = Callable[[Request], None]
"""Reads a NOTIFY's body for its package; raises ParseError when it cannot (the NOTIFY gets 400)."""


class Notification(NamedTuple):
    """One NOTIFY that arrived: which subscription (one per notifier), the request, its state."""

    subscription: SubscriberSubscription
    request: Request
    state: SubscriptionState

    @property
    def body(self) -> bytes:
        return self.request.body


class OutgoingSubscription:
    """A SUBSCRIBE we sent (see :meth:`UserAgent.subscribe`) and the subscriptions it made (forking:
    one per notifier). NOTIFYs are queued (:meth:`next`) and passed to ``on_notify``; refreshes go out
    before expiry; :attr:`ended` is set when no subscription is left. With ``resubscribe`` a
    subscription the notifier ends with ``reason=deactivated`` (RFC 6665: "retry immediately", e.g. the
    presence agent moved) is made again at once, by a new SUBSCRIBE, on the same handle."""

    MAX_RESUBSCRIBES = 10
    """Re-subscriptions one handle makes at most (a notifier that deactivates every time is left alone)."""

    def __init__(
        self,
        agent: EventsAgent,
        request: Request,
        *,
        implicit: EventHeader | None = None,
        body_check: BodyCheck | None = None,
        on_notify: Callable[[Notification], None] | None = None,
        expires: int = 600,
        resubscribe: bool = False,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.agent = agent
        self.resubscribe = resubscribe
        self.resubscribes = 0
        self.headers = headers or []
        self.ua = agent.ua
        self.core = Subscriber(request, self.ua.loop.time(), self.ua.stack.timers, implicit=implicit)
        self.request = request
        self.body_check = body_check
        self.on_notify = on_notify
        self.expires = expires
        self.notifications: asyncio.Queue[Notification] = asyncio.Queue()
        self.ended = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._refreshing: set[str] = set()

    @property
    def key(self) -> tuple[str, str]:
        return (self.core.call_id, self.core.local_tag)

    @property
    def subscriptions(self) -> list[SubscriberSubscription]:
        return list(self.core.subscriptions.values())

    @property
    def active(self) -> list[SubscriberSubscription]:
        return [s for s in self.core.subscriptions.values() if not s.terminated]

    async def next(self, timeout: float | None = None) -> Notification:
        """The next NOTIFY (raises TimeoutError)."""
        return await asyncio.wait_for(self.notifications.get(), timeout)

    async def unsubscribe(self, timeout: float = 32.0) -> None:
        """End every subscription (in-dialog SUBSCRIBE with ``Expires: 0``); the notifiers answer with
        a final NOTIFY. Takes no new fork from now on."""
        self.core.closed = True
        for sub in self.active:
            request = self.core.refresh(sub, 0, self.ua.loop.time())
            try:
                response = await self.ua._request(request, timeout=timeout)
            except (P2PSIPError, TimeoutError) as exc:
                log.info("unsubscribe failed: %s", exc)
                sub._end("unsubscribe failed")
                continue
            self.core.receive_response(response, self.ua.loop.time())
            if response.status >= 300:
                sub._end(f"unsubscribe answered {response.status}")
        self._check_ended()

    # -- driven by the agent ------------------------------------------------------------------------
    def receive_response(self, response: Response) -> None:
        self.core.receive_response(response, self.ua.loop.time())
        self._schedule()

    def receive_notify(self, request: Request, transaction: ServerTransaction) -> None:
        respond = self.ua.stack.respond
        if request.body and self.body_check is not None:
            try:
                self.body_check(request)
            except ParseError as exc:
                respond(transaction, Response.for_error(request, exc))
                return
        outcome = self.core.receive_notify(request, self.ua.loop.time())
        respond(transaction, outcome.response(request))
        sub = outcome.subscription
        if outcome.status == 200 and sub is not None and sub.last is not None:
            note = Notification(sub, request, sub.last)
            self.notifications.put_nowait(note)
            if self.on_notify is not None:
                try:
                    self.on_notify(note)
                except Exception:  # the application's callback must not break the UA
                    log.exception("on_notify failed")
            if self._should_resubscribe(sub):
                self.resubscribes += 1
                self.agent.spawn(self._again())
                return
        self._schedule()
        self._check_ended()

    def _should_resubscribe(self, sub: SubscriberSubscription) -> bool:
        last = sub.last
        return (
            self.resubscribe
            and not self.core.closed
            and sub.terminated
            and last is not None
            and last.reason == "deactivated"
            and not self.active
            and self.resubscribes < self.MAX_RESUBSCRIBES
        )

    async def _again(self) -> None:
        """A new SUBSCRIBE (new dialog) for what the notifier deactivated; the handle goes on."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.agent.subscribers.get(self.key) is self:
            del self.agent.subscribers[self.key]
        request = self.ua._new_request(
            "SUBSCRIBE", self.request.uri.copy(), headers=self.headers, contact=True
        )
        self.request = request
        self.core = Subscriber(request, self.ua.loop.time(), self.ua.stack.timers)
        self.agent.subscribers[self.key] = self
        try:
            response = await self.ua._request(request)
        except (P2PSIPError, TimeoutError) as exc:
            log.info("re-subscribing to %s failed: %s", request.uri, exc)
            self.agent.forget(self)
            return
        self.receive_response(response)
        if response.status >= 300 and not self.core.subscriptions:
            self.agent.forget(self)

    def _check_ended(self) -> None:
        if self.core.subscriptions and not self.active:
            self.agent.forget(self)
            if self._timer is not None:
                self._timer.cancel()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        times = [t for t in (self.core.deadline,) if t is not None]
        times += [t for s in self.active if (t := self.core.refresh_at(s)) is not None]
        if times:
            delay = max(0.0, min(times) - self.ua.loop.time())
            self._timer = self.ua.loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.ua.loop.time()
        for sub in self.core.check_timers(now):
            log.info("subscription %s ended: %s", sub.dialog.id, sub.reason)
        for tag, sub in self.core.subscriptions.items():
            due = self.core.refresh_at(sub)
            if due is not None and due <= now + 1e-3 and tag not in self._refreshing and not self.core.closed:
                self._refreshing.add(tag)
                self.agent.spawn(self._refresh(tag, sub))
        self._check_ended()
        if not self.ended.is_set():
            self._schedule()

    async def _refresh(self, tag: str, sub: SubscriberSubscription) -> None:
        try:
            request = self.core.refresh(sub, self.expires, self.ua.loop.time())
            response = await self.ua._request(request)
            self.core.receive_response(response, self.ua.loop.time())
            if response.status >= 300:
                sub._end(f"refresh answered {response.status}")
        except (P2PSIPError, TimeoutError) as exc:
            sub._end(f"refresh failed: {exc}")
        finally:
            self._refreshing.discard(tag)
            self._check_ended()
            if not self.ended.is_set():
                self._schedule()


class IncomingSubscription:
    """A SUBSCRIBE offered to us (``on_subscribe``): :meth:`accept` (optionally ``pending``) or
    :meth:`reject` it, then :meth:`notify` on every change and :meth:`terminate` at the end."""

    def __init__(
        self, agent: EventsAgent, request: Request, transaction: ServerTransaction, accepted: Accepted
    ) -> None:
        self.agent = agent
        self.ua = agent.ua
        self.request = request
        self.transaction = transaction
        self.accepted = accepted
        self.core: NotifierSubscription | None = None
        self.body = b""
        self.content_type: str | None = None
        self.ended = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def implicit(
        cls, agent: EventsAgent, request: Request, transaction: ServerTransaction, core: NotifierSubscription
    ) -> IncomingSubscription:
        """The subscription another request made (REFER's ``refer``, in the call's own dialog)."""
        incoming = cls(agent, request, transaction, Accepted(core.event, 0))
        incoming.core = core
        agent.notifiers[core.dialog.id] = incoming
        return incoming

    @property
    def event(self) -> EventHeader:
        return self.accepted.event

    @property
    def watcher(self) -> URI:
        return self.request.from_.uri

    @property
    def state(self) -> SubState | None:
        return None if self.core is None else self.core.state

    def accept(self, body: bytes = b"", content_type: str | None = None, *, pending: bool = False) -> None:
        """Answer 200 and send the first NOTIFY at once (with ``body``: the current state)."""
        if self.core is not None or self.transaction.terminated:
            return
        response = Response.for_request(self.request, 200)
        response.add("Contact", str(self.ua._contact(self.transaction.source)))
        for value in self.request.get_all("Record-Route"):
            response.add("Record-Route", value)
        self.core = NotifierSubscription.accept(
            self.request, response, self.accepted, self.ua.loop.time(), pending=pending
        )
        self.ua.stack.respond(self.transaction, response)
        self.body, self.content_type = body, content_type
        self.agent.notifiers[self.core.dialog.id] = self
        self.agent.spawn(self._send_notify())

    def reject(self, status: int = 403, reason: str | None = None) -> None:
        if self.core is None and not self.transaction.terminated:
            self.ua.stack.respond(self.transaction, Response.for_request(self.request, status, reason))
            self.ended.set()

    def authorize(self, allowed: bool) -> None:
        """Decide a pending subscription: active (and NOTIFY) or terminated ``rejected``."""
        if self.core is not None and self.core.state is SubState.PENDING:
            self.core.authorize(allowed)
            self.agent.spawn(self._send_notify())

    async def notify(self, body: bytes, content_type: str | None = None) -> Response | None:
        """Send the new state to the watcher; returns the NOTIFY's response (None when over)."""
        self.body, self.content_type = body, content_type or self.content_type
        return await self._send_notify()

    async def terminate(
        self, reason: str | None = "noresource", *, retry_after: int | None = None, body: bytes | None = None
    ) -> Response | None:
        """End it with a final NOTIFY (``deactivated`` asks the watcher to subscribe again at once)."""
        if self.core is None or self.core.state is SubState.TERMINATED:
            return None
        self.core.terminate(reason, retry_after)
        if body is not None:
            self.body = body
        return await self._send_notify()

    # -- driven by the agent ------------------------------------------------------------------------
    def refresh(self, request: Request, transaction: ServerTransaction) -> None:
        assert self.core is not None
        decision = self.core.refresh(request, self.agent.policy, self.ua.loop.time())
        if isinstance(decision, Reject):
            self.ua.stack.respond(transaction, decision.response(request))
            return
        response = Response.for_request(request, 200)
        response.set("Expires", str(decision.expires))
        response.add("Contact", str(self.ua._contact(transaction.source)))
        self.ua.stack.respond(transaction, response)
        self.agent.spawn(self._send_notify())

    async def _send_notify(self) -> Response | None:
        core = self.core
        if core is None or self.ended.is_set():
            return None
        now = self.ua.loop.time()
        request = core.notify(now, self.body, self.content_type)
        self._schedule()
        if core.state is SubState.TERMINATED:
            self._close()
        try:
            response = await self.ua._request(request)
        except (P2PSIPError, TimeoutError) as exc:
            log.info("NOTIFY to %s failed: %s", self.watcher, exc)
            core.terminate(None)
            self._close()
            return None
        if response.status in (481, 408):
            # the watcher forgot it, or is gone (RFC 6665 §4.2.2); any other answer (a 400 for a body it
            # could not read) leaves the subscription as it is
            core.terminate(None)
            self._close()
        return response

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.core is not None and self.core.deadline is not None:
            delay = max(0.0, self.core.deadline - self.ua.loop.time())
            self._timer = self.ua.loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.core is not None and self.core.expire(self.ua.loop.time()):
            self.agent.spawn(self._send_notify())
        else:
            self._schedule()

    def _close(self) -> None:
        if self.core is not None:
            self.agent.notifiers.pop(self.core.dialog.id, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ended.set()


class EventsAgent:
    """The events part of one UserAgent: its subscriptions both ways and the policy for SUBSCRIBEs."""

    def __init__(
        self,
        ua: UserAgent,
        packages: Iterable[str] = (),
        on_subscribe: Callable[[IncomingSubscription], None] | None = None,
        *,
        min_expires: int = 60,
        max_expires: int = 3600,
    ) -> None:
        self.ua = ua
        self.on_subscribe = on_subscribe
        self.policy = SubscribePolicy(
            frozenset(p.lower() for p in packages), min_expires=min_expires, max_expires=max_expires
        )
        self.subscribers: dict[tuple[str, str], OutgoingSubscription] = {}
        self.refer_subscribers: dict[tuple[str, str], list[OutgoingSubscription]] = {}
        self.notifiers: dict[DialogId, IncomingSubscription] = {}
        self.incoming: asyncio.Queue[IncomingSubscription] = asyncio.Queue()
        self.referred: asyncio.Queue[OutgoingCall] = asyncio.Queue()
        """Calls placed because a REFER asked for them (we were the transferee)."""
        self._tasks = Background(log, "events task")

    def spawn(self, coroutine: Any) -> None:
        self._tasks.spawn(coroutine)

    def close(self) -> None:
        self._tasks.cancel()
        for sub in self.subscribers.values():
            if sub._timer is not None:
                sub._timer.cancel()
        for incoming in list(self.notifiers.values()):
            incoming._close()

    # -- subscriber side ------------------------------------------------------------------------------
    async def subscribe(
        self,
        uri: str | URI,
        event: str,
        *,
        expires: int = 600,
        accept: str | None = None,
        body_check: BodyCheck | None = None,
        on_notify: Callable[[Notification], None] | None = None,
        timeout: float = 32.0,
        headers: Iterable[tuple[str, str]] = (),
        resubscribe: bool = True,
    ) -> OutgoingSubscription:
        headers = [("Event", event), ("Expires", str(expires)), *headers]
        if accept:
            headers.append(("Accept", accept))
        request = self.ua._new_request("SUBSCRIBE", uri, headers=headers, contact=True)
        sub = OutgoingSubscription(
            self,
            request,
            body_check=body_check,
            on_notify=on_notify,
            expires=expires or 600,
            resubscribe=resubscribe,
            headers=headers,
        )
        self.subscribers[sub.key] = sub  # a NOTIFY may come before the 2xx
        try:
            response = await self.ua._request(request, timeout=timeout)
        except BaseException:
            self.subscribers.pop(sub.key, None)
            raise
        sub.receive_response(response)
        if response.status >= 300 and not sub.core.subscriptions:
            self.subscribers.pop(sub.key, None)
            raise CallFailed(response.status, response.reason, response)
        return sub

    def expect_refer(self, refer: Request) -> OutgoingSubscription:
        """The implicit subscription of a REFER we are sending (NOTIFYs with sipfrag may come before the
        2xx): feed it the response with :meth:`OutgoingSubscription.receive_response`."""
        implicit = EventHeader("refer", str(refer.cseq.number))
        sub = OutgoingSubscription(self, refer, implicit=implicit, body_check=_sipfrag_check)
        self.refer_subscribers.setdefault(sub.key, []).append(sub)
        return sub

    def forget(self, sub: OutgoingSubscription) -> None:
        """Drop a subscription that never started (its request failed)."""
        sub.ended.set()
        if self.subscribers.get(sub.key) is sub:
            del self.subscribers[sub.key]
        subs = self.refer_subscribers.get(sub.key)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self.refer_subscribers[sub.key]

    # -- requests that arrive -------------------------------------------------------------------------
    def receive(self, request: Request, transaction: ServerTransaction) -> bool:
        """An out-of-dialog SUBSCRIBE (True: handled)."""
        if request.method != "SUBSCRIBE":
            return False
        decision = check_subscribe(request, self.policy)
        if isinstance(decision, Reject):
            self.ua.stack.respond(transaction, decision.response(request))
            return True
        incoming = IncomingSubscription(self, request, transaction, decision)
        if self.on_subscribe is None:
            self.incoming.put_nowait(incoming)  # the application takes it from the queue
            return True
        try:
            self.on_subscribe(incoming)
        except Exception:
            log.exception("on_subscribe failed")
            incoming.reject(500, "Server Internal Error (subscription handler failed)")
        return True

    def receive_in_dialog(self, request: Request, transaction: ServerTransaction) -> bool:
        """A NOTIFY for one of our subscriptions, or a refresh of one we serve (True: handled)."""
        method = request.method
        if method == "NOTIFY":
            key = (request.call_id, request.to.tag or "")
            sub = self.subscribers.get(key)
            if sub is None:
                sub = self._refer_subscriber(request)
            if sub is None:
                self.ua.stack.respond(
                    transaction, Response.for_request(request, 481, "Subscription Does Not Exist")
                )
                return True
            sub.receive_notify(request, transaction)
            return True
        if method == "SUBSCRIBE":
            incoming = self.notifiers.get(dialog_id_of_request(request))
            if incoming is None:
                self.ua.stack.respond(
                    transaction, Response.for_request(request, 481, "Subscription Does Not Exist")
                )
            else:
                incoming.refresh(request, transaction)
            return True
        return False

    def _refer_subscriber(self, request: Request) -> OutgoingSubscription | None:
        subs = self.refer_subscribers.get((request.call_id, request.to.tag or ""))
        if not subs:
            return None
        try:
            event = EventHeader.of(request)
        except ParseError:
            return subs[-1]  # its own checks answer 400
        live = [s for s in subs if not s.ended.is_set()]
        for sub in live:
            if event is not None and sub.core.expects(event) and event.id is not None:
                return sub
        return live[-1] if live else subs[-1]


def _sipfrag_check(request: Request) -> None:
    sipfrag.parse_status(request.body)
