"""The presence agent of a peer (RFC 3856 with PUBLISH, RFC 3903), the asyncio adapter of
:mod:`p2psip.subscription`, :mod:`p2psip.publication` and :mod:`p2psip.presence`.

In a serverless network nobody is "the presence server" of a user, so one is chosen the way every peer
agrees on: the **primary home peer** of the AOR, the home peer (first Path hop) of its best binding in the
order every peer sorts bindings (q, then entry id), the peer that home-peer routing already hands the
AOR's requests to. A SUBSCRIBE or PUBLISH for ``presence`` entering any peer goes there
(:meth:`PresenceAgent.primary_home`; the peer forwards it); there the agent:

* answers SUBSCRIBE with 200 and a NOTIFY whose PIDF it composes from the AOR's registered devices (each
  binding is an open tuple) and what they PUBLISHed (notes, RPID activities, closed tuples);
* keeps PUBLISHed state with entity tags and expiry (412, 423, 489, 400 for a bad PIDF), from the AOR's
  own devices only (a PUBLISH whose From is another AOR, or that no peer vouches for, gets 403);
* sends a NOTIFY to every watcher when that document changes: a PUBLISH, a device registering or leaving
  (it re-reads the AOR's bindings every ``poll`` seconds, and at once when a REGISTER passes this peer);
* ends a watcher's subscription with ``reason=deactivated`` when it stops being the AOR's agent (its
  device left; the primary home moved), so the watcher subscribes again and reaches the new agent;
* decides who sees what with a :class:`p2psip.presence.WatcherPolicy`: a watcher counts as who its From
  says only when ``vouched(request, source)`` says so (the peer: the SUBSCRIBE came over a flow of this
  peer registered for that AOR); an unvouched watcher is politely blocked (sees "closed").

The agent never touches the overlay; the peer gives it ``lookup`` (the AOR's bindings) and ``vouched``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from p2psip import pidf
from p2psip.address import target_from_uri
from p2psip.background import Background
from p2psip.dialog import DialogId, dialog_id_of_request
from p2psip.errors import ParseError
from p2psip.location import by_preference, first_path_hop
from p2psip.message import Request, Response
from p2psip.presence import Decision, WatcherPolicy, compose, polite_block
from p2psip.publication import EventStateCompositor, Published
from p2psip.registrar import Binding
from p2psip.stack import Source, Stack
from p2psip.subscription import (
    EventHeader,
    NotifierSubscription,
    Reject,
    SubscribePolicy,
    SubState,
    check_subscribe,
)
from p2psip.transaction import ClientTransaction, ServerTransaction
from p2psip.uri import URI, Address

__all__ = ["AgentTransaction", "PresenceAgent"]

log = logging.getLogger("p2psip.presence")

Lookup = Callable[[str], Awaitable[list[Binding]]]
Authorize = Callable[[str, str, Request, ServerTransaction, Source], Awaitable[Decision | None]]
"""The presentity's say on a watcher (sipapi: its per-user script's ``subscribe`` handlers)."""
Vouched = Callable[[Request, Source], Awaitable[bool]]
Save = Callable[[str, list[Published]], Awaitable[None]]
"""Keep an AOR's published state where the next agent finds it (the peer: a signed DHT entry)."""
Load = Callable[[str], Awaitable[list[Published]]]
"""Read back what an earlier agent of the AOR saved."""


class _Watch:
    def __init__(self, aor: str, core: NotifierSubscription, decision: Decision) -> None:
        self.aor = aor
        self.core = core
        self.decision = decision
        self.last: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None


class AgentTransaction:
    """The context of a NOTIFY the agent sent (so the peer's core hands its response back)."""

    def __init__(self, watch: _Watch) -> None:
        self.watch = watch


def _hostport(contact: str) -> str:
    try:
        uri = URI(contact)
    except ParseError:
        return ""
    return f"{uri.host}:{uri.port or 5060}"


def is_presence(request: Request) -> bool:
    """A SUBSCRIBE or PUBLISH for the ``presence`` package (an unreadable Event is not ours to judge)."""
    if request.method not in ("SUBSCRIBE", "PUBLISH"):
        return False
    try:
        event = EventHeader.of(request)
    except ParseError:
        return False
    return event is not None and event.package == "presence"


class PresenceAgent:
    """See the module docstring."""

    def __init__(
        self,
        stack: Stack,
        lookup: Lookup,
        vouched: Vouched,
        *,
        policy: WatcherPolicy | None = None,
        poll: float = 5.0,
        max_watches: int = 10_000,
    ) -> None:
        self.stack = stack
        self.lookup = lookup
        self.vouched = vouched
        self.policy = policy or WatcherPolicy()
        self.authorize: Authorize | None = None
        """Asked about every identified watcher before the allow list (None: the allow list alone)."""
        self.trust_from = False
        """Take every watcher's From as its identity (a lab setting: signed assertions between peers are
        not built yet, so a watcher registered at another peer is otherwise politely blocked)."""
        self.save: Save | None = None
        self.load: Load | None = None
        """The peer's store of published state (signed DHT entries beside the AOR's bindings): saved on
        every change, read once when this agent first composes an AOR, so a new agent (the old one's peer
        died) still serves what devices published."""
        self._loaded: set[str] = set()
        self._contacts: dict[str, set[str]] = {}  # AOR -> host:port of its contacts at the last look
        self.poll = poll
        self.max_watches = max_watches
        self.subscribe_policy = SubscribePolicy(frozenset({"presence"}), min_expires=60, max_expires=3600)
        self.published = EventStateCompositor("presence", (pidf.CONTENT_TYPE,), pidf.parse)
        self.watches: dict[DialogId, _Watch] = {}
        self.by_aor: dict[str, set[DialogId]] = {}
        self.documents: dict[str, bytes] = {}
        self._poller: asyncio.TimerHandle | None = None
        self._tasks = Background(log, "presence task")
        self.stats = dict.fromkeys(
            ("subscribes", "publishes", "publishes_refused", "notifies", "deactivated", "blocked"), 0
        )

    # -- where the agent of an AOR is --------------------------------------------------------------
    def primary_home(self, bindings: list[Binding]) -> str | None:
        """The Route (``<sip:host:port;lr>``) to the AOR's agent, or None when it is this peer (this peer is
        the primary home, or no binding has a Path: then whoever the request reached serves it)."""
        for b in by_preference(bindings):
            uri = first_path_hop(b)
            if uri is None:
                continue
            if self.stack.is_local(uri.host, uri.port):
                return None
            hop = URI.build(scheme=uri.scheme, host=uri.host, port=uri.port, params={"lr": None})
            if uri.transport:
                hop.params["transport"] = uri.transport
            return f"<{hop}>"
        return None

    # -- requests ----------------------------------------------------------------------------------------
    def in_dialog(self, request: Request) -> bool:
        return request.to.tag is not None and dialog_id_of_request(request) in self.watches

    def refresh(self, request: Request, transaction: ServerTransaction) -> None:
        watch = self.watches[dialog_id_of_request(request)]
        decision = watch.core.refresh(request, self.subscribe_policy, self.stack.loop.time())
        if isinstance(decision, Reject):
            self.stack.respond(transaction, decision.response(request))
            return
        response = Response.for_request(request, 200)
        response.set("Expires", str(decision.expires))
        response.add("Contact", str(self._contact(transaction.source)))
        self.stack.respond(transaction, response)
        self._send(watch, force=True)

    async def subscribe(
        self, aor: str, request: Request, transaction: ServerTransaction, source: Source
    ) -> None:
        """A SUBSCRIBE for ``aor``'s presence that this peer serves."""
        decision = check_subscribe(request, self.subscribe_policy)
        if isinstance(decision, Reject):
            self.stack.respond(transaction, decision.response(request))
            return
        if len(self.watches) >= self.max_watches:
            response = Response.for_request(request, 503, "Service Unavailable (too many watchers)")
            response.add("Retry-After", "60")
            self.stack.respond(transaction, response)
            return
        self.stats["subscribes"] += 1
        try:
            watcher = request.from_.uri.aor()
        except (ParseError, ValueError):
            watcher = ""
        vouched = bool(watcher) and (self.trust_from or await self.vouched(request, source))
        verdict = self.policy.decide(aor, watcher, vouched=vouched)
        if vouched and verdict is not Decision.REJECT and self.authorize is not None:
            said = await self.authorize(aor, watcher, request, transaction, source)
            if said is not None:
                verdict = said
        if verdict is not Decision.ALLOW:
            self.stats["blocked"] += 1
        response = Response.for_request(request, 200)
        response.add("Contact", str(self._contact(source)))
        for value in request.get_all("Record-Route"):
            response.add("Record-Route", value)
        core = NotifierSubscription.accept(request, response, decision, self.stack.loop.time())
        self.stack.respond(transaction, response)
        watch = _Watch(aor, core, verdict)
        if verdict is Decision.REJECT:
            core.terminate("rejected")
        if core.state is not SubState.TERMINATED:
            self.watches[core.dialog.id] = watch
            self.by_aor.setdefault(aor, set()).add(core.dialog.id)
            self._arm_poll()
        await self._refresh_document(aor)
        self._send(watch, force=True)

    async def publish(
        self, aor: str, request: Request, transaction: ServerTransaction, source: Source
    ) -> None:
        """A PUBLISH for ``aor``: only a device of that user may publish its presence (its From is the AOR
        and a peer vouches for it, as for watchers); anyone else gets 403."""
        self.stats["publishes"] += 1
        try:
            publisher = request.from_.uri.aor()
        except (ParseError, ValueError):
            publisher = ""
        if publisher != aor or not (self.trust_from or await self.vouched(request, source)):
            self.stats["publishes_refused"] += 1
            response = Response.for_request(request, 403, "Forbidden (only the user's own devices publish)")
            self.stack.respond(transaction, response)
            return
        origin = f"{source.host}:{source.port}"
        result = self.published.publish(aor, request, self.stack.loop.time(), origin)
        if isinstance(result, Reject):
            self.stack.respond(transaction, result.response(request))
            return
        response = Response.for_request(request, 200)
        for name, value in result.headers:
            response.add(name, value)
        self.stack.respond(transaction, response)
        self._arm_poll()
        await self._save(aor)
        if result.changed:
            await self.changed(aor)

    async def _save(self, aor: str) -> None:
        if self.save is None:
            return
        self._loaded.add(aor)  # what we hold now is the newest: never adopt older state over it
        try:
            await self.save(aor, self.published.documents(aor, self.stack.loop.time()))
        except Exception as exc:  # an overlay failure: the state lives on here
            log.info("presence of %s not saved: %s", aor, exc)

    async def changed(self, aor: str) -> None:
        """Re-read ``aor``'s state and tell its watchers if what they see changed (also when the agent
        moved: then their subscriptions end with ``deactivated``)."""
        if not self.by_aor.get(aor):
            return
        moved = await self._refresh_document(aor)
        for dialog_id in list(self.by_aor.get(aor, ())):
            watch = self.watches.get(dialog_id)
            if watch is None:
                continue
            if moved:
                self.stats["deactivated"] += 1
                watch.core.terminate("deactivated")
            self._send(watch)

    # -- composing and notifying ---------------------------------------------------------------------------
    async def _refresh_document(self, aor: str) -> bool:
        """Compose ``aor``'s document from its bindings and publications; True when this peer is no
        longer its agent."""
        try:
            bindings = await self.lookup(aor)
        except Exception as exc:  # an overlay failure: keep what we had
            log.info("presence of %s: lookup failed: %s", aor, exc)
            return False
        moved = self.primary_home(bindings) is not None
        if not moved and self.load is not None and aor not in self._loaded:
            try:
                saved = await self.load(aor)
            except Exception as exc:
                log.info("presence of %s: saved state not read: %s", aor, exc)
            else:
                self._loaded.add(aor)
                if len(self._loaded) > 10_000:
                    self._loaded.pop()
                self.published.adopt(aor, saved, self.stack.loop.time())
        # a device that unregistered (its contact was here at the last look and is gone) takes what it
        # published along: baresip 1.0 leaves (/uadel) without withdrawing its "open"
        contacts = {_hostport(b.contact) for b in bindings}
        before = self._contacts.pop(aor, set())
        self._contacts[aor] = contacts
        if len(self._contacts) > 10_000:
            del self._contacts[next(iter(self._contacts))]
        dropped = [source for source in before - contacts if self.published.drop_source(aor, source)]
        if dropped:
            await self._save(aor)
        now = self.stack.loop.time()
        docs: list[pidf.Presence] = []
        publishers: set[str] = set()
        for published in self.published.documents(aor, now):
            with contextlib.suppress(ParseError):
                docs.append(pidf.parse(published.body))
                publishers.add(published.source)
        # a device that published speaks for itself: its registration adds no open tuple of its own
        registered = [b.contact for b in bindings if _hostport(b.contact) not in publishers]
        self.documents[aor] = compose(aor, registered, docs).compose()
        return moved

    def _send(self, watch: _Watch, *, force: bool = False) -> None:
        core = watch.core
        body = self.documents.get(watch.aor) or polite_block(watch.aor).compose()
        if watch.decision is not Decision.ALLOW:
            body = polite_block(watch.aor).compose()
        if body == watch.last and not force and core.state is not SubState.TERMINATED:
            return
        watch.last = body
        notify = core.notify(self.stack.loop.time(), body, pidf.CONTENT_TYPE)
        route = notify.get("Route")
        hop = target_from_uri(Address(route).uri if route is not None else notify.uri)
        self.stats["notifies"] += 1
        try:
            tx = self.stack.send_request(notify, hop)
            tx.context = AgentTransaction(watch)
        except Exception as exc:
            log.info("NOTIFY to %s failed: %s", notify.uri, exc)
            core.terminate(None)
        if core.state is SubState.TERMINATED:
            self._forget(watch)
        else:
            self._arm_expiry(watch)

    def on_response(self, response: Response, transaction: ClientTransaction) -> None:
        context = transaction.context
        if isinstance(context, AgentTransaction) and response.status in (481, 408):
            context.watch.core.terminate(None)
            self._forget(context.watch)

    def on_failure(self, transaction: ClientTransaction) -> None:
        context = transaction.context
        if isinstance(context, AgentTransaction):
            context.watch.core.terminate(None)
            self._forget(context.watch)

    def _forget(self, watch: _Watch) -> None:
        dialog_id = watch.core.dialog.id
        self.watches.pop(dialog_id, None)
        ids = self.by_aor.get(watch.aor)
        if ids is not None:
            ids.discard(dialog_id)
            if not ids:
                del self.by_aor[watch.aor]
                self.documents.pop(watch.aor, None)
        if watch.timer is not None:
            watch.timer.cancel()
            watch.timer = None

    # -- timers -------------------------------------------------------------------------------------------
    def _arm_expiry(self, watch: _Watch) -> None:
        if watch.timer is not None:
            watch.timer.cancel()
        deadline = watch.core.deadline
        if deadline is not None:
            watch.timer = self.stack.loop.call_at(deadline, self._expire, watch)

    def _expire(self, watch: _Watch) -> None:
        watch.timer = None
        if watch.core.expire(self.stack.loop.time()):
            self._send(watch)
        elif watch.core.state is not SubState.TERMINATED:
            self._arm_expiry(watch)

    def _arm_poll(self) -> None:
        if self._poller is None and (self.by_aor or self.published.state):
            self._poller = self.stack.loop.call_later(self.poll, self._poll)

    def _poll(self) -> None:
        self._poller = None
        for aor in self.published.expire(self.stack.loop.time()):
            self._spawn(self.changed(aor))
        for aor in list(self.by_aor):
            self._spawn(self.changed(aor))
        self._arm_poll()

    def _spawn(self, work: Awaitable[None]) -> None:
        self._tasks.spawn(work)

    def _contact(self, toward: Source | None) -> Address:
        transport = toward.transport if toward is not None else "udp"
        host = toward.host if toward is not None else None
        return Address.build(self.stack.local_uri(transport, toward=host))

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for watch in list(self.watches.values()):
            self._forget(watch)
        self._tasks.cancel()
