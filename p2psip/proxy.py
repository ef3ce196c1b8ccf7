"""Proxy: the RFC 3261 §16 proxy core, stateful (with forking) or stateless (§16.11).

It is the transaction user of a :class:`~p2psip.stack.Stack`. For every request it:

1. validates Max-Forwards (0 → ``483 Too Many Hops``), detects loops (``482``; a spiral — the request
   retargeted — goes on) and refuses any Proxy-Require (``420``, this proxy supports no extension) — §16.3;
2. pre-processes routing information (§16.4): a Request-URI that is one of our Record-Route URIs means the
   previous hop was a strict router (the last Route becomes the Request-URI); our own URI on top of Route
   is removed;
3. picks the targets: the Request-URI when a Route remains, else ``locate(request)`` — a pluggable hook
   (a DHT lookup in a peer) returning URIs or Addresses (equal ``q`` forked in parallel, higher ``q`` first,
   sequentially); by default the Request-URI itself when its host is an IP address (no DNS);
4. forwards a copy to each target (§16.6): Request-URI, Max-Forwards - 1, Record-Route (``;lr``; two of
   them when the transports differ, RFC 5658), our Via, the next hop from Route (loose or strict) or the
   Request-URI — on a client transaction with Timer C for INVITE;
5. collects responses in a response context (§16.7): provisional responses and every 2xx are forwarded at
   once, the best final response otherwise (6xx beats all; then the lowest class; 503 becomes 500; a 401/407
   carries the challenges of every 401/407 branch), pending branches are CANCELled on a 2xx or 6xx, on
   Timer C, and when the caller CANCELs.

ACKs for 2xx (and 2xx retransmissions after the transactions ended) are forwarded statelessly, by Route.
The stateless mode keeps no state at all: one target, a branch computed from the incoming one (so a
retransmission, its ACK and its CANCEL take the same branch), responses sent back along their Via.

Code that decides requests itself (a peer, the scripting runtime) uses the public hooks rather than the
internals: :meth:`Proxy.check`, :meth:`Proxy.forward` → :class:`ProxyContext` (``cancel_pending()``,
``send_best()``) and :meth:`Proxy.on_final`, which may hold the best non-2xx final response back.

The hot path avoids logging (``verbose`` only) and copies each request once per branch.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from p2psip.address import numeric_host, target_from_uri
from p2psip.background import Background
from p2psip.errors import ParseError, SIPStatusError, TransportError
from p2psip.message import Request, Response, Via, random_hex
from p2psip.mypyc_compat import mypyc_attr
from p2psip.stack import Source, Stack, Target
from p2psip.transaction import (
    ClientTransaction,
    InviteClientTransaction,
    ServerTransaction,
    State,
    Transaction,
)
from p2psip.uri import URI, Address

log = logging.getLogger("p2psip.proxy")



@dataclass(frozen=True)
class RoutedTarget:
    """A target with a Route set of its own (RFC 3327: the Path of the binding it came from), so each
    forked branch can take a different path; ``q`` orders tiers like an Address's ``q``."""

    uri: URI
    route: tuple[str, ...] = ()
    q: float | None = None


LocateResult = Sequence[URI | Address | RoutedTarget]
Locator = Callable[[Request], LocateResult | Awaitable[LocateResult]]
"""``locate(request)`` → the targets for a request (sync or async). Empty: ``404 Not Found``. A
:class:`~p2psip.errors.SIPStatusError` raised is the answer (e.g. 416 for a ``tel:`` URI nobody routes); a
:class:`LookupError` or :class:`TransportError` names why nobody is found: answered 404 with that reason."""

#: What the proxy says it allows, answering an OPTIONS for itself.
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, INFO, UPDATE"
#: Requests that create a dialog (and so get Record-Route): RFC 3261, 3265/6665, 3515.
DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})
#: Our branches: this prefix, the loop-detection key, ".", a random part per branch (forks differ).
_LOOP_PREFIX = "z9hG4bK-lp"
#: The headers whose values enter the loop-detection key besides the Request-URI, Call-ID and CSeq.
_LOOP_HEADERS = frozenset({"to", "from", "proxy-require", "proxy-authorization"})
_MASK64 = 0xFFFFFFFFFFFFFFFF
#: Bound on the branches of one request, 3xx recursion included (a redirect loop cannot fork without end).
MAX_BRANCHES = 16
#: §16.7 step 6: among 4xx these are preferred because the caller can act on them.
_PREFERRED_4XX = (401, 407, 415, 420, 484)


FinalHook = Callable[["ProxyContext", Response], bool]
"""``on_final(ctx, response)``: see :meth:`Proxy.on_final`. True holds a non-2xx final response back."""


@dataclass(eq=False)
class _Branch:
    context: ProxyContext
    transaction: ClientTransaction | None
    target: URI | RoutedTarget
    final: int = 0  # status of the final response (or the synthetic one), 0 while pending


@dataclass(eq=False)
class ProxyContext:
    """A response context (§16.7): one per proxied request, returned by :meth:`Proxy.forward`.

    Public for the code that decides requests itself (scripts, a peer) and wants the proxy's forking and
    best-response selection without re-implementing them: ``request``, ``server`` (the server
    transaction), ``source``, ``cancelled`` (the caller CANCELled), ``final_sent`` (the outcome is
    decided), ``best`` (the final response chosen: the first 2xx, or the best non-2xx once every branch
    completed) and the two actions :meth:`cancel_pending` and :meth:`send_best`. The other fields are the
    proxy's bookkeeping.
    """

    proxy: Proxy
    request: Request  # as received (after route pre-processing)
    server: ServerTransaction
    source: Source
    tiers: list[list[URI | RoutedTarget]] = field(default_factory=list)
    branches: list[_Branch] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    pending: int = 0
    got_2xx: bool = False
    got_6xx: bool = False
    cancelled: bool = False
    final_sent: bool = False
    tier_timer: asyncio.TimerHandle | None = None
    give_up_timer: asyncio.TimerHandle | None = None
    on_final: FinalHook | None = None
    best: Response | None = None
    loop_key: str = ""

    def cancel_pending(self) -> None:
        """Stop forking: drop the tiers not tried yet and CANCEL every branch still pending (§16.10).
        Their 487s (or timeouts) complete them, and then the best final response is chosen as usual."""
        self.tiers.clear()
        self.proxy._cancel_pending(self)

    def send_best(self) -> None:
        """Send the best final response upstream — for one that :meth:`Proxy.on_final` held back."""
        if self.best is None:
            raise RuntimeError("no final response chosen yet: branches are still pending")
        self.proxy._relay(self, self.best)


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled, it still takes PeerCore, the scripting core...
class Proxy:
    """A SIP proxy core attached to ``stack``.

    ``stateless=True`` selects §16.11 forwarding. ``record_route`` adds Record-Route to dialog-creating
    requests so in-dialog requests come back through us. ``locate`` is the location hook (see
    :data:`Locator`). ``tier_timeout`` bounds each sequential-forking tier (seconds) before its branches
    are cancelled and the next tier is tried. ``recurse`` follows 3xx responses (§16.5): their Contacts
    become new branches of the same request (at most :data:`MAX_BRANCHES`), instead of the 3xx going up.
    ``give_up`` (a fraction of Timer F, 0 for never) ends a non-INVITE request whose branches have not
    all answered by then with ``480 Temporarily Unavailable`` for each silent branch: without it the
    branches' Timer F and the sender's own expire together and the sender only ever sees its own 408
    (RFC 4320 §4.2: a proxy should not send 408 to a non-INVITE; it has to answer before the sender gives up).
    """

    def __init__(
        self,
        stack: Stack,
        *,
        stateless: bool = False,
        record_route: bool = True,
        locate: Locator | None = None,
        tier_timeout: float = 30.0,
        recurse: bool = False,
        verbose: bool = False,
        give_up: float = 0.0,
    ) -> None:
        self.stack = stack
        self.give_up = give_up
        self.stateful = not stateless
        self.record_route = record_route
        self.locate = locate
        self.tier_timeout = tier_timeout
        self.recurse = recurse
        self.verbose = verbose
        self.stats: dict[str, int] = dict.fromkeys(
            ("forwarded_requests", "forwarded_responses", "rejected", "cancelled_branches", "stateless_acks"),
            0,
        )
        self._tasks = Background(log, "proxy task")
        self._rr_cache: dict[str, str] = {}
        self.record_route_params: dict[str, str] = {}
        """Parameters added to our Record-Route URIs: a worker of a multi-process proxy names itself, so
        the in-dialog requests come to the worker that forwarded the dialog's INVITE
        (:func:`p2psip.handoff.route_param`)."""
        self._branch_secret = hashlib.sha256(str(id(self)).encode()).hexdigest()[:8]
        stack.attach(self)

    def spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``work`` (e.g. a lookup before deciding a request) as a task this core keeps a reference
        to until it ends, and cancels in :meth:`cancel_tasks` — for subclasses, instead of bare tasks."""
        return self._tasks.spawn(work)

    def cancel_tasks(self) -> None:
        """Cancel every task still running (:meth:`spawn`, asynchronous ``locate``): on shutdown."""
        self._tasks.cancel()

    # ===================================================================================== requests

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        method = request.method
        if method == "ACK":
            self._forward_stateless(request, source)
            return
        if transaction is None:  # stateless mode
            self._stateless_request(request, source)
            return
        if method == "CANCEL":
            self._on_cancel(request, transaction)
            return
        try:
            self.check(request)
            if request.get("Route") is not None:
                self._forward(request, transaction, source, [[request.uri]])
                return
            uri = request.uri
            if self.locate is None or (
                request.to.tag is not None
                and numeric_host(uri.host) is not None
                and not self.stack.is_local(uri.host, uri.port)
            ):
                # No location service, or an in-dialog request to another address (a remote target).
                self._forward(request, transaction, source, self._default_targets(request))
                return
            found = _located_or_raise(self.locate, request)
        except SIPStatusError as exc:
            self._reject(transaction, request, exc)
            return
        if inspect.isawaitable(found):
            self.spawn(self._located(request, transaction, source, found))
            return
        self._forward_located(request, transaction, source, found)

    async def _located(
        self,
        request: Request,
        transaction: ServerTransaction,
        source: Source,
        pending: Awaitable[LocateResult],
    ) -> None:
        try:
            found = await pending
        except SIPStatusError as exc:
            self._reject(transaction, request, exc)
            return
        except (LookupError, TransportError) as exc:
            self._reject(transaction, request, SIPStatusError(404, detail=str(exc)))
            return
        except Exception as exc:
            log.exception("locate failed for %s", request.uri)
            self._reject(transaction, request, SIPStatusError(500, detail=f"location lookup failed: {exc}"))
            return
        last = transaction.last_response
        if not transaction.terminated and (last is None or last.status < 200):  # not answered meanwhile
            self._forward_located(request, transaction, source, found)

    def _forward_located(
        self, request: Request, transaction: ServerTransaction, source: Source, found: LocateResult
    ) -> None:
        if not found:
            self._reject(transaction, request, _no_contact())
            return
        self._forward(request, transaction, source, _tiers(found))

    def check(self, request: Request) -> None:
        """§16.3 request validation and §16.4 route pre-processing; raises the rejection as a
        :class:`~p2psip.errors.SIPStatusError` (answer it with ``Response.for_error``). :meth:`forward`
        does not call it: a caller that forwards by itself does."""
        max_forwards = request.max_forwards  # unreadable: ParseError, a 400
        if max_forwards is not None and max_forwards <= 0:
            raise SIPStatusError(483, "Too Many Hops")
        self.preprocess_routes(request)
        if self._looped(request):
            raise SIPStatusError(482, "Loop Detected")
        if request.get("Proxy-Require") is not None:
            tags = [t.strip() for v in request.get_all("Proxy-Require") for t in v.split(",") if t.strip()]
            raise SIPStatusError(420, "Bad Extension", [("Unsupported", ", ".join(tags))])  # §16.3 step 5

    def _loop_key(self, request: Request, previous_hop: Via | None) -> str:
        """§16.6 step 8: the part of our branch that is the same whenever this element forwards the same
        request again — same Request-URI, tags, Call-ID, CSeq number, previous hop's Via, Proxy-Require
        and Proxy-Authorization. Finding it again under one of our own Vias (§16.3 step 4) means the
        request looped; a different key means it legitimately spiralled (e.g. it was retargeted)."""
        via = f"{previous_hop.sent_by};{previous_hop.branch}" if previous_hop is not None else ""
        # The From, To, Proxy-Require and Proxy-Authorization lines as they stand (tags included), read in
        # one pass: no proxy changes them, so From and To say the same as their tags and spare parsing
        # From, which nothing else on this path reads.
        text = "|".join([str(request.uri), request.call_id, str(request.cseq.number), via,
                         *request.values_of(_LOOP_HEADERS)])  # fmt: skip
        # Python's str hash: SipHash keyed by this interpreter's random secret, a fifth of what blake2b
        # cost here. The key only has to come out the same when a request comes back to this element:
        # the workers of ``p2psip proxy --workers`` are forked, so they share the secret; a loop that
        # spans a restart goes undetected and ends on Max-Forwards (483) instead.
        return f"{hash(text) & _MASK64:016x}"

    def _looped(self, request: Request) -> bool:
        if len(request.get_all("Via")) < 2:
            return False  # straight from a UA: it cannot carry one of our Vias
        vias = request.via
        stack = self.stack
        for i, via in enumerate(vias[:-1]):
            branch = via.branch
            if (
                branch is not None
                and branch.startswith(_LOOP_PREFIX)
                and stack.is_local(via.host, via.port)
                and branch[len(_LOOP_PREFIX) :].split(".", 1)[0] == self._loop_key(request, vias[i + 1])
            ):
                return True
        return False

    def preprocess_routes(self, request: Request) -> None:
        """§16.4: undo a strict router's rewrite and remove our own URIs from the top of Route."""
        if request.get("Route") is None:
            return
        stack = self.stack
        uri = request.uri
        if uri.user is None and stack.is_local(uri.host, uri.port):
            # §16.4: the previous hop was a strict router: our Record-Route URI is the Request-URI.
            routes = request.get_all("Route")
            request.uri = Address(routes[-1]).uri
            if len(routes) > 1:
                request.set("Route", routes[:-1])
            else:
                request.remove("Route")
        while (top := self.local_top_route(request)) is not None and self.own_route(top):
            request.remove_first("Route")

    def local_top_route(self, request: Request) -> URI | None:
        """The URI of the top Route when it names this element; None when there is no Route, it cannot be
        read, or it names someone else."""
        top = request.get("Route")
        if top is None:
            return None
        try:
            uri = Address(top).uri
        except ParseError:
            return None
        return uri if self.stack.is_local(uri.host, uri.port) else None

    def own_route(self, uri: URI) -> bool:
        """Whether a Route URI names this proxy, to be removed in §16.4 pre-processing (a peer keeps
        its flow-token Routes: they say which flow to deliver over)."""
        return self.stack.is_local(uri.host, uri.port)

    def _default_targets(self, request: Request) -> list[list[URI | RoutedTarget]]:
        """The Request-URI itself, when it can be reached without a location service; else raises the
        answer (416 for another scheme, 404, or 200 with ``Allow`` to an OPTIONS for this proxy)."""
        uri = request.uri
        if uri.scheme not in ("sip", "sips"):
            raise SIPStatusError(416, detail=uri.scheme)
        if self.stack.is_local(uri.host, uri.port):
            if request.method == "OPTIONS":
                raise SIPStatusError(200, headers=[("Allow", ALLOW)])
            raise SIPStatusError(404, detail="the Request-URI names this proxy (it has no location service)")
        try:
            target_from_uri(uri)
        except TransportError as exc:
            raise SIPStatusError(404, detail=str(exc)) from None
        return [[uri]]

    def _reject(self, transaction: ServerTransaction, request: Request, error: SIPStatusError) -> None:
        self.stats["rejected"] += 1
        response = Response.for_error(request, error)
        if self.verbose:
            log.info("%s %s -> %d %s", request.method, request.uri, response.status, response.reason)
        try:
            self.stack.respond(transaction, response)
        except Exception as exc:  # the transaction may have moved on (e.g. CANCEL raced us)
            if self.verbose:
                log.info("cannot answer %s: %s", request.method, exc)

    # ----------------------------------------------------------------------------------- forking

    def forward(
        self,
        request: Request,
        server: ServerTransaction,
        source: Source,
        targets: LocateResult,
        *,
        on_final: FinalHook | None = None,
    ) -> ProxyContext:
        """Proxy ``request`` (received on ``server`` from ``source``) to ``targets`` (§16.6): equal ``q``
        forked in parallel, higher ``q`` first. Returns the response context; ``on_final`` is its
        :meth:`on_final` hook. Call :meth:`check` first (Max-Forwards, Route pre-processing). May be
        called again on the same server transaction after a held-back failure (a new context)."""
        return self._forward(request, server, source, _tiers(targets), on_final)

    def on_final(self, ctx: ProxyContext, response: Response) -> bool:
        """Called once per context with its outcome: the first 2xx (already sent upstream; the result is
        ignored) or the best non-2xx final response (a synthetic 408/487 when nothing answered, 500 for a
        lone 503), *before* it is sent. Returning True holds the non-2xx back: the proxy sends nothing
        and the caller later answers with ``ctx.send_best()`` or a response of its own (a script may
        still redirect or reject). The default asks the context's ``on_final`` given to :meth:`forward`,
        and holds nothing without one."""
        hook = ctx.on_final
        return hook(ctx, response) if hook is not None else False

    def _forward(
        self,
        request: Request,
        server: ServerTransaction,
        source: Source,
        tiers: list[list[URI | RoutedTarget]],
        on_final: FinalHook | None = None,
    ) -> ProxyContext:
        ctx = ProxyContext(
            self, request=request, server=server, source=source, tiers=tiers, on_final=on_final
        )
        ctx.loop_key = self._loop_key(request, request.top_via)
        server.context = ctx
        self._next_tier(ctx)
        return ctx

    def _next_tier(self, ctx: ProxyContext) -> None:
        """Start the next group of targets (§16.6: parallel within a tier, tiers in sequence)."""
        if self.give_up > 0 and ctx.give_up_timer is None and ctx.request.method != "INVITE":
            delay = self.give_up * 64 * self.stack.timers.t1
            ctx.give_up_timer = self.stack.loop.call_later(delay, self._give_up, ctx)
        while ctx.tiers and not ctx.cancelled:
            tier = ctx.tiers.pop(0)
            for target in tier:
                self._start_branch(ctx, target)
            if ctx.pending:
                if ctx.tiers and self.tier_timeout > 0:
                    ctx.tier_timer = self.stack.loop.call_later(self.tier_timeout, self._tier_expired, ctx)
                return
        if not ctx.pending:
            self._send_best(ctx)

    def _tier_expired(self, ctx: ProxyContext) -> None:
        ctx.tier_timer = None
        for branch in ctx.branches:
            if not branch.final and branch.transaction is not None:
                self.stack.cancel(branch.transaction)
                self.stats["cancelled_branches"] += 1

    def _give_up(self, ctx: ProxyContext) -> None:
        """The non-INVITE deadline passed (``give_up``): every silent branch counts as 480."""
        ctx.give_up_timer = None
        if ctx.final_sent:
            return
        ctx.tiers.clear()
        for branch in list(ctx.branches):
            if not branch.final and branch.transaction is not None:
                self._branch_done(branch, Response.for_request(ctx.request, 480, "Temporarily Unavailable"))

    def _start_branch(self, ctx: ProxyContext, target: URI | RoutedTarget) -> None:
        """§16.6: copy, retarget, Max-Forwards, Record-Route, next hop, Via; send on a client transaction."""
        stack = self.stack
        request = ctx.request
        if isinstance(target, RoutedTarget):
            fwd = request.copy(uri=target.uri)
            for route in reversed(target.route):
                fwd.add("Route", route, first=True)
        else:
            fwd = request.copy(uri=target)
        max_forwards = request.max_forwards
        fwd.set("Max-Forwards", str((70 if max_forwards is None else max_forwards) - 1))
        branch = _Branch(ctx, None, target)
        ctx.branches.append(branch)
        try:
            hop = self._next_hop(fwd)
            if self.record_route and request.method in DIALOG_CREATING and request.to.tag is None:
                self._add_record_route(fwd, ctx.source, hop)
            branch_id = f"{_LOOP_PREFIX}{ctx.loop_key}.{random_hex(5)}"
            tx = stack.send_request(fwd, hop, timer_c=request.method == "INVITE", branch=branch_id)
        except (TransportError, ParseError) as exc:  # FlowFailed (430) and ParseError carry their status
            error = exc if isinstance(exc, SIPStatusError) else SIPStatusError(503, detail=str(exc))
            response = Response.for_error(request, error)
            branch.final = response.status
            ctx.responses.append(response)
            return
        if tx.terminated:  # failed at once (e.g. no listener for that address family)
            if not branch.final:
                branch.final = 503
                ctx.responses.append(Response.for_request(request, 503, "Service Unavailable (send failed)"))
            return
        branch.transaction = tx
        tx.context = branch
        ctx.pending += 1
        self.stats["forwarded_requests"] += 1

    def _next_hop(self, fwd: Request) -> Target:
        """Where the forwarded request goes: the top Route (loose, or strict with the §16.6 step 7
        fix-up), else the Request-URI."""
        top = fwd.get("Route")
        if top is not None:
            route = Address(top).uri
            if not route.lr:
                # Strict next hop: the Request-URI goes to the end of the Route set, the route becomes it.
                fwd.remove_first("Route")
                fwd.add("Route", f"<{fwd.uri}>")
                fwd.uri = route
            return target_from_uri(route)
        return target_from_uri(fwd.uri)

    def _add_record_route(self, fwd: Request, source: Source, hop: Target) -> None:
        outgoing = self._rr_value(hop.transport, hop.host)
        if source.transport != hop.transport or (":" in source.host) != (":" in hop.host):
            # RFC 5658 double Record-Route: one URI for each side, the callee's on top.
            fwd.add("Record-Route", self._rr_value(source.transport, source.host), first=True)
        fwd.add("Record-Route", outgoing, first=True)

    def _rr_value(self, transport: str, toward: str) -> str:
        """Our Record-Route value for a side reached over ``transport`` (cached per transport and family)."""
        key = f"{transport}{':' in toward}"
        value = self._rr_cache.get(key)
        if value is None:
            uri = self.stack.local_uri(transport, toward=toward)
            uri.params["lr"] = None
            uri.params.update(self.record_route_params)
            value = self._rr_cache[key] = f"<{uri}>"
        return value

    # ----------------------------------------------------------------------------------- CANCEL

    def _on_cancel(self, cancel: Request, transaction: ServerTransaction) -> None:
        """§16.10: answer the CANCEL, then cancel every pending branch of the INVITE it matches."""
        invite_tx = self.stack.transactions.find_invite_for_cancel(cancel)
        if invite_tx is None:
            self._reject(transaction, cancel, SIPStatusError(481, "Call/Transaction Does Not Exist"))
            return
        self.stack.respond(transaction, Response.for_request(cancel, 200))
        ctx = invite_tx.context
        if not isinstance(ctx, ProxyContext):
            if invite_tx.state is State.PROCEEDING:  # still locating: nothing forwarded yet
                self._reject(invite_tx, invite_tx.request, SIPStatusError(487, "Request Terminated"))
            return
        ctx.cancelled = True
        ctx.tiers.clear()
        self._cancel_pending(ctx)

    def _cancel_pending(self, ctx: ProxyContext) -> None:
        if ctx.give_up_timer is not None:
            ctx.give_up_timer.cancel()
            ctx.give_up_timer = None
        if ctx.tier_timer is not None:
            ctx.tier_timer.cancel()
            ctx.tier_timer = None
        for branch in ctx.branches:
            if not branch.final and branch.transaction is not None:
                self.stack.cancel(branch.transaction)
                self.stats["cancelled_branches"] += 1

    # ================================================================================== responses

    def on_response(
        self, response: Response, transaction: ClientTransaction | None, source: Source | None
    ) -> None:
        if transaction is None:
            self._forward_response_stateless(response)
            return
        branch = transaction.context
        if not isinstance(branch, _Branch):
            return  # the response to one of our CANCELs: nothing to forward (§16.10)
        status = response.status
        if status == 100:
            return  # hop-by-hop: we sent our own
        response.remove_first("Via")
        ctx = branch.context
        if status < 200:
            if not ctx.final_sent:
                self._relay(ctx, response)
            return
        if branch.final:  # a 2xx retransmission (or another 2xx) from the Accepted state
            if status < 300:
                self._relay(ctx, response)
            return
        self._branch_done(branch, response)

    def _branch_done(self, branch: _Branch, response: Response) -> None:
        ctx = branch.context
        status = response.status
        branch.final = status
        ctx.pending -= 1
        if status < 300:
            ctx.got_2xx = True
            self._relay(ctx, response)
            first = not ctx.final_sent
            ctx.final_sent = True
            self._cancel_pending(ctx)
            ctx.tiers.clear()
            if first:
                ctx.best = response
                self.on_final(ctx, response)
        elif (
            status < 400
            and self.recurse
            and not (ctx.cancelled or ctx.final_sent or ctx.got_6xx)
            and (self._recurse(ctx, response))
        ):
            pass  # §16.7 step 4: its contacts became new branches; the contactless 3xx is dropped
        else:
            ctx.responses.append(response)
            if status >= 600:
                ctx.got_6xx = True
                ctx.tiers.clear()
                self._cancel_pending(ctx)
        if ctx.pending == 0:
            if ctx.tier_timer is not None:
                ctx.tier_timer.cancel()
                ctx.tier_timer = None
            if ctx.tiers and not ctx.cancelled:
                self._next_tier(ctx)
            elif not ctx.final_sent:
                self._send_best(ctx)

    def _recurse(self, ctx: ProxyContext, response: Response) -> bool:
        """§16.5/§16.7 step 4: fork to the 3xx's Contacts not tried yet (no sip: from a sips: request,
        at most ``MAX_BRANCHES`` in all). True when every contact was taken (the 3xx is then dropped);
        else the untaken contacts stay in the 3xx, which joins the response context."""
        try:
            contacts = response.contacts
        except ParseError:
            return False
        tried = {str(b.target.uri if isinstance(b.target, RoutedTarget) else b.target) for b in ctx.branches}
        sips = ctx.request.uri.scheme == "sips"
        left: list[str] = []
        taken: list[URI] = []
        for contact in contacts:
            uri = contact.uri
            fresh = str(uri) not in tried and len(ctx.branches) + len(taken) < MAX_BRANCHES
            if fresh and uri.scheme in ("sip", "sips") and (uri.scheme == "sips" or not sips):
                tried.add(str(uri))
                taken.append(uri)
            else:
                left.append(str(contact))
        if not taken:
            return False
        for uri in taken:
            self._start_branch(ctx, uri)
        if left:
            response.set("Contact", left)
            ctx.responses.append(response)
        return not left

    def _relay(self, ctx: ProxyContext, response: Response) -> None:
        """Send a response upstream through the server transaction (or statelessly once it has ended)."""
        self.stats["forwarded_responses"] += 1
        server = ctx.server
        if server.terminated:
            self.stack.send_stateless(response, ctx.source)
            return
        try:
            self.stack.respond(server, response)
        except Exception:
            # e.g. a late 2xx after our final non-2xx: forward it statelessly, the caller must see it.
            self.stack.send_stateless(response, ctx.source)

    def _send_best(self, ctx: ProxyContext) -> None:
        """§16.7 step 6: choose and send the best final response once every branch has completed."""
        ctx.final_sent = True
        if ctx.give_up_timer is not None:
            ctx.give_up_timer.cancel()
            ctx.give_up_timer = None
        best = choose_best(ctx.responses)
        request = ctx.request
        if best is None:
            status = 487 if ctx.cancelled else 408
            best = Response.for_request(request, status)
        elif best.status == 503:
            best = Response.for_request(request, 500, "Server Internal Error (next hop unavailable)")
        elif best.status in (401, 407):
            _merge_challenges(best, ctx.responses)
        ctx.best = best
        if not self.on_final(ctx, best):
            self._relay(ctx, best)

    # ------------------------------------------------------------------------- transaction events

    def on_timeout(self, transaction: Transaction, timer: str) -> None:
        branch = transaction.context
        if not isinstance(branch, _Branch) or branch.final:
            return
        if timer == "C" and isinstance(transaction, InviteClientTransaction) and not transaction.terminated:
            self.stack.cancel(transaction)  # §16.8: the 487 (or a 2xx) completes the branch
            self.stats["cancelled_branches"] += 1
            return
        self._branch_done(branch, Response.for_request(branch.context.request, 408, "Request Timeout"))

    def on_transport_failure(self, transaction: Transaction, error: str) -> None:
        branch = transaction.context
        if isinstance(branch, _Branch) and not branch.final:
            reason = f"Service Unavailable ({error})"
            self._branch_done(branch, Response.for_request(branch.context.request, 503, reason))

    def on_terminated(self, transaction: Transaction) -> None:
        context = transaction.context
        if isinstance(context, _Branch):
            if not context.final:
                # Terminated without a final response and without a timeout event (should not happen).
                timeout = Response.for_request(context.context.request, 408, "Request Timeout")
                self._branch_done(context, timeout)
            # Break the transaction <-> branch cycle so reference counting frees the call's objects
            # (the cyclic collector is what a busy proxy would otherwise spend its time in).
            transaction.context = None
            context.transaction = None
            self._release(context.context)
        elif isinstance(context, ProxyContext):
            transaction.context = None
            self._release(context)

    @staticmethod
    def _release(ctx: ProxyContext) -> None:
        """Once the server transaction and every branch's client transaction have ended, nothing reaches
        the context any more: drop its branches, whose back-references to it would otherwise keep both
        (and the messages they hold) alive until a full pass of the cyclic collector — measured before
        this: ~28 garbage objects per call, 319,000 after a minute at 500 calls/s, a 1.4 s full pass."""
        if ctx.server.terminated and all(b.transaction is None for b in ctx.branches):
            ctx.branches.clear()

    # ================================================================================== stateless

    def _stateless_branch(self, request: Request) -> str:
        """§16.11: a branch that is the same for retransmissions, the ACK of a non-2xx and the CANCEL of
        the same request, and different for different requests."""
        via = request.top_via
        incoming = via.branch if via is not None else None
        if incoming and incoming.startswith("z9hG4bK"):
            key = f"{incoming}|{via.sent_by if via else ''}"
        else:
            key = f"{request.uri}|{request.from_.tag}|{request.call_id}|{request.cseq.number}|{via}"
        # Python's keyed str hash, as for the loop key (_loop_key says why it is enough): 64 bits.
        return f"z9hG4bK-sl-{hash(f'{self._branch_secret}|{key}') & _MASK64:016x}"

    def _stateless_request(self, request: Request, source: Source) -> None:
        targets: list[list[URI | RoutedTarget]]
        try:
            self.check(request)
            if request.get("Route") is not None:
                targets = [[request.uri]]
            elif self.locate is not None:
                found = _located_or_raise(self.locate, request)
                if inspect.isawaitable(found):
                    raise SIPStatusError(501, detail="asynchronous location in stateless mode")
                targets = _tiers(found)
                if not targets:
                    raise _no_contact()
            else:
                targets = self._default_targets(request)
        except SIPStatusError as exc:
            self.stack.send_stateless(Response.for_error(request, exc), source)
            return
        first = targets[0][0]
        if isinstance(first, RoutedTarget):
            request.uri = first.uri
            for route in reversed(first.route):
                request.add("Route", route, first=True)
        else:
            request.uri = first
        self._stateless_send(request, source)

    def _forward_stateless(self, request: Request, source: Source) -> None:
        """An ACK (for a 2xx; or anything in stateless mode): route it on without a transaction."""
        try:
            max_forwards = request.max_forwards
        except ParseError:
            return
        if max_forwards is not None and max_forwards <= 0:
            return
        self.preprocess_routes(request)
        if request.get("Route") is None and self.stack.is_local(request.uri.host, request.uri.port):
            return  # an ACK for a response we generated ourselves: absorbed
        self.stats["stateless_acks"] += 1
        self._stateless_send(request, source)

    def _stateless_send(self, request: Request, source: Source) -> None:
        max_forwards = request.max_forwards
        request.set("Max-Forwards", str((70 if max_forwards is None else max_forwards) - 1))
        try:
            hop = self._next_hop(request)
        except (TransportError, ParseError) as exc:
            if self.verbose:
                log.info("cannot forward %s %s: %s", request.method, request.uri, exc)
            return
        if (
            self.record_route
            and not self.stateful
            and request.method in DIALOG_CREATING
            and request.to.tag is None
        ):
            self._add_record_route(request, source, hop)
        self.stack.push_via(request, hop, self._stateless_branch(request))
        self.stack.send_stateless(request, hop)
        self.stats["forwarded_requests"] += 1

    def _forward_response_stateless(self, response: Response) -> None:
        """A response no transaction knows (stateless mode, or a 2xx retransmission after the client
        transaction ended): pop our Via and send it along the next one (§16.11, §18.2.2)."""
        via = response.top_via
        if via is None or not self.stack.is_local(via.host, via.port):
            return  # not ours: drop (§18.1.2)
        response.remove_first("Via")
        if response.top_via is None:
            return  # it was for us, and nothing waits for it
        self.stats["forwarded_responses"] += 1
        self.stack.send_stateless(response, None)


def _no_contact() -> SIPStatusError:
    return SIPStatusError(404, detail="no contact for this address")


def _located_or_raise(locate: Locator, request: Request) -> LocateResult | Awaitable[LocateResult]:
    """``locate(request)``, its LookupError or TransportError (nobody found, and why) raised as a 404."""
    try:
        return locate(request)
    except (LookupError, TransportError) as exc:
        raise SIPStatusError(404, detail=str(exc)) from None


def _tiers(found: LocateResult) -> list[list[URI | RoutedTarget]]:
    """Group targets by ``q`` (higher first); equal ``q`` forked in parallel (§16.6)."""
    groups: dict[float, list[URI | RoutedTarget]] = {}
    for item in found:
        uri: URI | RoutedTarget
        if isinstance(item, Address):
            q = item.q if item.q is not None else 1.0
            uri = item.uri
        elif isinstance(item, RoutedTarget):
            q = item.q if item.q is not None else 1.0
            uri = item
        else:
            q, uri = 1.0, item
        groups.setdefault(q, []).append(uri)
    return [groups[q] for q in sorted(groups, reverse=True)]


_CHALLENGES = ("WWW-Authenticate", "Proxy-Authenticate")


def _merge_challenges(best: Response, responses: Sequence[Response]) -> None:
    """§16.7 step 7: a 401/407 going upstream carries the WWW-Authenticate and Proxy-Authenticate values
    of every other 401/407 of the context, unmodified — so a caller forked to several realms can answer
    all of them in one retry instead of learning them one failed attempt at a time."""
    for other in responses:
        if other is best or other.status not in (401, 407):
            continue
        for name in _CHALLENGES:
            mine = best.get_all(name)
            for value in other.get_all(name):
                if value not in mine:  # the same challenge twice (one realm behind two branches) once
                    best.add(name, value)


def choose_best(responses: Sequence[Response]) -> Response | None:
    """§16.7 step 6: a 6xx if any; else from the lowest class, preferring 401/407/415/420/484 among 4xx."""
    finals = [r for r in responses if r.status >= 300]
    if not finals:
        return None
    six = [r for r in finals if r.status >= 600]
    if six:
        return six[0]
    lowest = min(r.status // 100 for r in finals)
    same = [r for r in finals if r.status // 100 == lowest]
    if lowest == 4:
        for status in _PREFERRED_4XX:
            for r in same:
                if r.status == status:
                    return r
    non_503 = [r for r in same if r.status != 503]
    return (non_503 or same)[0]
