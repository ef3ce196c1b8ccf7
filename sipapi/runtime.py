"""The SIP side of scripting: a proxy core that hands requests to scripts and carries out their decisions.

:class:`ScriptingCore` is a :class:`~p2psip.proxy.Proxy` (so forwarding, forking, CANCEL, Record-Route
and best-response selection are the stack's, not re-implemented here) with three additions:

- ``on_request`` asks a *dispatcher* whether a script wants the request; if so a :class:`CallControl` is
  created for it and a *runner* executes the script (in a thread of this process, or in a worker process —
  :mod:`sipapi.worker`);
- ``proxy()`` from a script forwards through the proxy's own response context (``Proxy.forward``), but the
  final non-2xx response is *held back* (its ``on_final`` hook returns True): the script gets the outcome
  (``'busy'``, ``'noanswer'``...) and may still redirect or reject; the held response is sent only when the
  handler returns without another decision;
- a timeout on ``proxy(timeout=...)`` CANCELs the pending branches and reports ``'noanswer'``.

Two flavours: :class:`ScriptServerCore` (the stand-alone script server: locations are IP literals or the
server's own in-memory registrar; ``default()`` is 501, as in the original sipapi) and
:class:`ScriptedPeerCore` (in a :class:`~p2psip.peer.Peer`: locations are looked up in the overlay and
``default()`` is the peer's normal registrar/proxy processing).

This module uses only the Proxy's public hooks: ``check``, ``preprocess_routes``, ``forward`` (with
``on_final``) and the returned :class:`~p2psip.proxy.ProxyContext` (``cancelled``, ``cancel_pending()``),
documented in docs/stack.md.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from p2psip.address import numeric_host
from p2psip.auth import DigestServer
from p2psip.dialog import DialogId, dialog_id_of_request
from p2psip.errors import ParseError, SIPStatusError
from p2psip.mailbox import is_message_summary
from p2psip.message import Request, Response
from p2psip.peer import Peer, PeerCore
from p2psip.presence import Decision
from p2psip.presenceagent import is_presence
from p2psip.proxy import Proxy, ProxyContext, RoutedTarget
from p2psip.registrar import Binding, RegisterRejected, ok_response, plan_register
from p2psip.stack import Source, Stack
from p2psip.subscription import unreadable_event
from p2psip.transaction import ClientTransaction, ServerTransaction, State, Transaction
from p2psip.uri import URI, Address

from .events import Controller, Event, EventTarget, ScriptError, outcome_of
from .transfer import TransferLeg

log = logging.getLogger("sipapi")

__all__ = [
    "CallControl",
    "Dispatcher",
    "InProcessRunner",
    "LoopController",
    "MemoryRegistrar",
    "Runner",
    "ScriptServerCore",
    "ScriptedPeerCore",
    "ScriptingCore",
    "describe_error",
]

DEFAULT_DEADLINE = 5.0
"""Seconds a handler may run (time spent waiting in ``proxy()`` not counted) before the call gets a 500."""

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, INFO, UPDATE"


class Runner(Protocol):
    """Runs a script's handlers for one request; the decisions go to ``control``."""

    async def run(self, control: CallControl) -> None: ...


class Dispatcher(Protocol):
    """Chooses the script (a :class:`Runner`) for a request, or None to let the core process it."""

    def select(self, request: Request) -> Runner | None: ...


def describe_error(exc: BaseException, script: str | None = None) -> str:
    """``file:line: Type: message`` for the innermost frame in ``script`` (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    chosen = None
    for frame in frames:
        if script is None or os.path.abspath(frame.filename) == os.path.abspath(script):
            chosen = frame
    if chosen is None and frames:
        chosen = frames[-1]
    where = f"{chosen.filename}:{chosen.lineno}: " if chosen is not None else ""
    text = str(exc)
    return f"{where}{type(exc).__name__}{': ' + text if text else ''}"


class MemoryRegistrar:
    """The stand-alone script server's location table (SER's usrloc with ``db_mode 0``): the peer's
    registrar rules (:func:`p2psip.registrar.plan_register`), kept in a dict keyed by canonical AOR."""

    def __init__(self) -> None:
        self.bindings: dict[str, dict[bytes, Binding]] = {}

    def register(self, request: Request, now: float) -> Response:
        try:
            plan = plan_register(request, self.bindings.get(_aor_or_empty(request), {}).values(), now)
        except RegisterRejected as rejected:
            return Response.for_error(request, rejected)
        table = self.bindings.setdefault(plan.aor, {})
        for write in plan.writes:
            table[write.entry_id] = write.binding
        for remove in plan.removes:
            table.pop(remove.entry_id, None)
        return ok_response(request, plan, now)

    def lookup(self, aor: str, now: float) -> list[Binding]:
        table = self.bindings.get(aor, {})
        alive = [b for b in table.values() if b.alive(now)]
        return sorted(alive, key=lambda b: -(b.q if b.q is not None else 1.0))


def _aor_or_empty(request: Request) -> str:
    try:
        return request.to.uri.aor()
    except (ParseError, ValueError):
        return ""


class CallControl:
    """One request being decided by a script: carries out its actions on the event loop.

    Every method runs on the loop. ``decided`` becomes True once a final response went (or the request was
    handed to the default processing); ``held`` is a proxied non-2xx final response waiting for the
    handler to return.
    """

    def __init__(
        self, core: ScriptingCore, request: Request, transaction: ServerTransaction, source: Source
    ) -> None:
        self.core = core
        self.request = request
        self.transaction = transaction
        self.source = source
        self.loop = core.stack.loop
        self.decided = False
        self.held: Response | None = None
        self.proxying = False
        self.timed_out = False
        self.proxy_seconds = 0.0
        self._proxy_started = 0.0
        self._checked = False
        self._future: asyncio.Future[Response] | None = None
        self._context: ProxyContext | None = None
        self.sent: Response | None = None

    @property
    def source_tuple(self) -> tuple[str, str, int]:
        return (self.source.transport, self.source.host, self.source.port)

    def seconds_in_proxy(self) -> float:
        extra = self.loop.time() - self._proxy_started if self.proxying else 0.0
        return self.proxy_seconds + extra

    # -- final answers ------------------------------------------------------------------------------------
    def _final(self, what: str) -> None:
        if self.decided:
            raise ScriptError(f"{what}: this request was already answered")
        self.decided = True
        self.held = None

    def _send(self, response: Response) -> None:
        self.sent = response
        if log.isEnabledFor(logging.INFO):  # a script with _debug = True
            request = self.request
            log.info("%s %s -> %d %s", request.method, request.uri, response.status, response.reason)
        tx = self.transaction
        if tx.terminated or tx.state not in (State.TRYING, State.PROCEEDING):
            return  # e.g. the caller CANCELled and the 487 already went
        try:
            self.core.stack.respond(tx, response)
        except Exception as exc:  # a racing CANCEL may have ended it
            log.info("cannot answer %s %s: %s", self.request.method, self.request.uri, exc)

    def response(self, status: int, reason: str | None = None) -> Response:
        response = Response.for_request(self.request, status, reason)
        if self.request.method == "INVITE" and 200 <= status < 300:
            uri = self.core.stack.local_uri(self.source.transport, toward=self.source.host)
            response.set("Contact", f"<{uri}>")
        if self.request.method == "OPTIONS" and 200 <= status < 300:
            response.set("Allow", ALLOW)
        return response

    def respond(self, status: int, reason: str | None, headers: list[tuple[str, str]], body: bytes) -> None:
        self._final("respond")
        response = self.response(status, reason)
        for name, value in headers:
            response.add(name, value)
        if body:
            response.body = body
        self._send(response)
        if status >= 300:
            self.core.script_answered(self.request, f"answered {status} {response.reason}")

    def redirect(self, locations: list[str], status: int = 302) -> None:
        self._final("redirect")
        response = self.response(status)
        response.set("Contact", [f"<{URI(text)}>" for text in locations])
        self._send(response)
        self.core.script_answered(self.request, f"redirected ({status}) to {', '.join(locations)}")

    def challenge(self, realm: str, proxy: bool = False) -> None:
        self._final("challenge")
        server = self.core.digest_server(realm, {})
        self._send(server.challenge(self.request, time.time(), proxy=proxy))

    def authenticate(self, realm: str, users: dict[str, str]) -> str | None:
        server = self.core.digest_server(realm, users)
        for proxy in (False, True):
            result = server.verify(self.request, time.time(), proxy=proxy)
            if result.ok:
                return result.username
        return None

    def default(self) -> None:
        self._final("default")
        self.core.default_processing(self)

    def transfer(self, location: str) -> None:
        """Answer the INVITE ourselves and REFER the caller to ``location`` (302 when it takes no REFER),
        see :mod:`sipapi.transfer`."""
        if self.request.method != "INVITE":
            raise ScriptError(f"transfer: only an INVITE can be transferred, not {self.request.method}")
        self._final("transfer")
        TransferLeg(self.core, self, URI(location)).start()

    def save(self) -> None:
        self._final("save")
        self.core.save_registration(self)

    def fail(self, reason: str) -> None:
        """The script failed (raised, timed out, died): a plain 500 unless it had already answered.

        ``reason`` (which may name the script's file and line) is logged here, never sent: the caller
        learns that the server failed, not how its scripts are laid out."""
        if self.decided:
            self.core.script_answered(self.request, f"failed ({reason}) after it had answered")
            return
        self.decided = True
        self.held = None
        self._send(Response.for_request(self.request, 500, "Server Internal Error"))
        self.core.script_answered(self.request, f"failed ({reason}): answered 500")

    def finish(self) -> None:
        """The handlers returned: send the held response, or apply the default processing."""
        if self.decided:
            return
        if self.held is not None:
            held, self.held = self.held, None
            self.decided = True
            self._send(held)
            return
        self.default()

    # -- location ---------------------------------------------------------------------------------------
    async def lookup(self, aor: str) -> list[str]:
        """The AOR's contacts. Like proxy(), the time spent here is the server's, not the script's: it does
        not count against the handler's deadline."""
        self.proxying = True
        self._proxy_started = self.loop.time()
        try:
            return await self.core.lookup_contacts(aor)
        finally:
            self.proxying = False
            self.proxy_seconds += self.loop.time() - self._proxy_started

    # -- proxy ------------------------------------------------------------------------------------------
    async def proxy(self, locations: list[str], timeout: float | None) -> str:
        """Forward to ``locations`` and wait until the call is decided; returns the outcome."""
        if self.decided:
            raise ScriptError("proxy: this request was already answered")
        if self.proxying:
            raise ScriptError("proxy: a proxy() of this request is still running")
        core = self.core
        request = self.request
        self.held = None
        self.timed_out = False
        if not self._checked:
            self._checked = True
            try:
                core.check(request)
            except SIPStatusError as rejection:
                self.held = Response.for_error(request, rejection)
                return outcome_of(rejection.status)
        try:
            targets = await core.resolve(request, [URI(text) for text in locations])
            if not targets:
                raise SIPStatusError(404, detail="no contact for this address")
        except SIPStatusError as exc:
            self.held = Response.for_error(request, exc)
            return "failure"
        tx = self.transaction
        if tx.terminated or (tx.state is not State.PROCEEDING and tx.state is not State.TRYING):
            self.decided = True  # the caller went away (CANCEL answered 487)
            return "failure"
        future: asyncio.Future[Response] = self.loop.create_future()
        self._future = future
        self.proxying = True
        self._proxy_started = self.loop.time()
        timer = self.loop.call_later(timeout, self._expire) if timeout is not None and timeout > 0 else None
        try:
            self._context = core.forward(request, tx, self.source, targets, on_final=self._on_final)
            response = await future
        finally:
            if timer is not None:
                timer.cancel()
            self.proxying = False
            self.proxy_seconds += self.loop.time() - self._proxy_started
            self._future = None
        outcome = outcome_of(response.status, timed_out=self.timed_out)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s proxied to %s: %s (%d)", request.method, request.uri,
                     ", ".join(locations), outcome, response.status)  # fmt: skip
        if response.status < 300:
            self.decided = True  # the 2xx went upstream already
            self.sent = response
            return outcome
        ctx = self._context
        if ctx is not None and ctx.cancelled:
            self.decided = True  # the caller CANCELled: its 487 goes now, whatever the script does next
            self._send(response)
            return outcome
        self.held = response
        return outcome

    def _expire(self) -> None:
        ctx = self._context
        if ctx is not None and self.proxying:
            self.timed_out = True
            ctx.cancel_pending()

    def _on_final(self, ctx: ProxyContext, response: Response) -> bool:
        """The proxy's outcome for this request: hand it to the waiting ``proxy()`` and hold a non-2xx
        back, so the script may still redirect or reject (:meth:`finish` sends it otherwise)."""
        if not self.proxying:
            return False
        self.proxy_finished(response)
        return True

    def proxy_finished(self, response: Response) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(response)


class ScriptingCore(Proxy):
    """A Proxy whose requests may be decided by scripts (see the module docstring)."""

    dispatcher: Dispatcher | None
    deadline: float
    _digest: dict[str, DigestServer]
    _digest_users: dict[str, dict[str, str]]

    def setup_scripting(self, dispatcher: Dispatcher | None, *, deadline: float = DEFAULT_DEADLINE) -> None:
        self.dispatcher = dispatcher
        self.deadline = deadline
        self._digest = {}
        self._digest_users = {}
        self._secret = os.urandom(32)
        self.script_stats: dict[str, int] = dict.fromkeys(("scripted", "script_errors", "script_timeouts"), 0)
        self.transfer_legs: dict[DialogId, TransferLeg] = {}
        """Calls this server answered to transfer them (``event.action.transfer``), by dialog id."""

    def script_answered(self, request: Request, what: str) -> None:
        """A script refused, redirected or failed a request: logged where the server runs (a peer also
        prints it as an event line)."""
        log.warning("script: %s %s %s", request.method, request.uri, what)

    # -- dispatch ---------------------------------------------------------------------------------------
    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        if self.transfer_legs and request.to.tag is not None:
            leg = self.transfer_legs.get(dialog_id_of_request(request))
            if leg is not None:
                leg.on_request(request, transaction)
                return
        dispatcher = self.dispatcher
        if dispatcher is not None and transaction is not None and request.method not in ("ACK", "CANCEL"):
            try:
                if request.get("Route") is not None:
                    # A phone with this peer as its outbound proxy preloads a Route to it: drop our own
                    # entries first (§16.4, as the proxy would), so the request is judged by where it goes.
                    self.preprocess_routes(request)
                runner = dispatcher.select(request)
            except Exception:
                log.exception("script selection failed for %s", request.uri)
                runner = None
            if runner is not None:
                self.script_stats["scripted"] += 1
                control = CallControl(self, request, transaction, source)
                self.spawn(self._run_script(runner, control))
                return
        super().on_request(request, transaction, source)

    def on_response(
        self, response: Response, transaction: ClientTransaction | None, source: Source | None
    ) -> None:
        if transaction is not None and isinstance(transaction.context, TransferLeg):
            transaction.context.on_response(response, transaction)
            return
        super().on_response(response, transaction, source)

    def on_timeout(self, transaction: Transaction, timer: str) -> None:
        if isinstance(transaction.context, TransferLeg) and isinstance(transaction, ClientTransaction):
            transaction.context.on_failure(transaction, f"timer {timer}")
            return
        super().on_timeout(transaction, timer)

    def on_transport_failure(self, transaction: Transaction, error: str) -> None:
        if isinstance(transaction.context, TransferLeg) and isinstance(transaction, ClientTransaction):
            transaction.context.on_failure(transaction, error)
            return
        super().on_transport_failure(transaction, error)

    async def runs_here(self, runner: Runner, request: Request) -> bool:
        """Whether ``runner`` decides ``request`` on this node (a peer hands a callee's own script to the
        callee's home peer); when False the request gets the default processing instead."""
        return True

    async def _run_script(self, runner: Runner, control: CallControl) -> None:
        try:
            here = await self.runs_here(runner, control.request)
        except Exception:
            log.exception("cannot tell where the script of %s runs", control.request.uri)
            here = True
        if not here:
            self.script_stats["scripted"] -= 1
            self.default_processing(control)
            return
        try:
            await runner.run(control)
        except Exception as exc:
            self.script_stats["script_errors"] += 1
            log.warning("script failed for %s %s: %s", control.request.method, control.request.uri,
                        describe_error(exc))  # fmt: skip
            control.fail("script failed")
            return
        try:
            control.finish()
        except Exception:
            log.exception("cannot finish %s", control.request.uri)
            control.fail("script server error")

    # -- what the flavours provide ------------------------------------------------------------------------
    def digest_server(self, realm: str, users: dict[str, str]) -> DigestServer:
        self._digest_users[realm] = users
        server = self._digest.get(realm)
        if server is None:
            table = self._digest_users

            def lookup(name: str) -> str | None:
                return table.get(realm, {}).get(name)

            server = self._digest[realm] = DigestServer(realm, lookup, secret=self._secret)
        return server

    def default_processing(self, control: CallControl) -> None:
        raise NotImplementedError

    def save_registration(self, control: CallControl) -> None:
        raise NotImplementedError

    async def lookup_contacts(self, aor: str) -> list[str]:
        raise NotImplementedError

    async def resolve(self, request: Request, uris: list[URI]) -> list[URI | Address | RoutedTarget]:
        raise NotImplementedError


class ScriptServerCore(ScriptingCore):
    """The stand-alone script server (:func:`sipapi.run`): no overlay; its own in-memory registrar."""

    def __init__(
        self,
        stack: Stack,
        dispatcher: Dispatcher | None,
        *,
        deadline: float = DEFAULT_DEADLINE,
        record_route: bool = True,
        verbose: bool = False,
    ) -> None:
        super().__init__(stack, record_route=record_route, verbose=verbose)
        self.setup_scripting(dispatcher, deadline=deadline)
        self.registrar = MemoryRegistrar()

    def default_processing(self, control: CallControl) -> None:
        # The original sipapi's stand-alone server: what the script does not handle is not implemented.
        control._send(control.response(501, "Not Implemented"))

    def save_registration(self, control: CallControl) -> None:
        control._send(self.registrar.register(control.request, time.time()))

    async def lookup_contacts(self, aor: str) -> list[str]:
        return [b.contact for b in self.registrar.lookup(aor, time.time())]

    async def resolve(self, request: Request, uris: list[URI]) -> list[URI | Address | RoutedTarget]:
        out: list[URI | Address | RoutedTarget] = []
        now = time.time()
        for uri in uris:
            if request.get("Route") is not None or numeric_host(uri.maddr or uri.host) is not None:
                out.append(uri)
                continue
            bindings = self.registrar.lookup(uri.aor(), now) if uri.user else []
            if not bindings:
                raise SIPStatusError(
                    404, detail=f"nobody registered as {uri.aor()} and {uri.host!r} is not an IP address"
                )
            for binding in bindings:
                target = URI(binding.contact)
                if binding.q is not None:
                    target.params["q"] = f"{binding.q:g}"
                out.append(target)
        return out


class DecisionControl(CallControl):
    """A :class:`CallControl` that sends nothing: it only records what the script decided (a 2xx from
    ``accept()``, a failure from ``reject()``), for events that are questions rather than requests to
    answer (``subscribe``: may this watcher see the user's presence?)."""

    event_type = "subscribe"

    def _send(self, response: Response) -> None:
        self.sent = response

    def default(self) -> None:
        self._final("default")

    def finish(self) -> None:
        pass

    def decision(self) -> Decision | None:
        if self.sent is None or self.sent.status >= 500:  # no say, or the script failed: the allow list
            return None
        return Decision.ALLOW if self.sent.status < 300 else Decision.REJECT


class ScriptedPeerCore(ScriptingCore, PeerCore):
    """A peer's SIP core with scripts: registrar and overlay location as in :class:`PeerCore`."""

    def __init__(
        self,
        peer: Peer,
        dispatcher: Dispatcher | None,
        *,
        deadline: float = DEFAULT_DEADLINE,
        verbose: bool = False,
    ) -> None:
        PeerCore.__init__(self, peer, peer.stack, verbose=verbose)
        self.setup_scripting(dispatcher, deadline=deadline)

    @classmethod
    def install(
        cls, peer: Peer, dispatcher: Dispatcher | None, *, deadline: float = DEFAULT_DEADLINE
    ) -> ScriptedPeerCore:
        """Replace ``peer``'s core by a scripted one (the stack's core and ``peer.core``)."""
        core = cls(peer, dispatcher, deadline=deadline, verbose=peer.config.verbose)
        peer.core = core
        peer.presence.authorize = core.authorize_subscribe
        return core

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        """Presence SUBSCRIBE/PUBLISH and message-summary SUBSCRIBE are the peer's agents' business, not a
        call for the user's ``incoming`` handlers (the article's script would proxy or redirect them like
        an INVITE); scripts have their say on watchers through ``subscribe`` events. A SUBSCRIBE or PUBLISH
        whose Event header does not parse is the peer's to answer (400) too."""
        if unreadable_event(request) or (
            request.to.tag is None and (is_presence(request) or is_message_summary(request))
        ):
            PeerCore.on_request(self, request, transaction, source)
            return
        super().on_request(request, transaction, source)

    async def authorize_subscribe(
        self, aor: str, watcher: str, request: Request, transaction: ServerTransaction, source: Source
    ) -> Decision | None:
        """The presentity's own script on a ``subscribe`` event: ``event.action.accept()`` lets the
        (identified) watcher see its presence, ``reject()`` refuses it; no decision: the allow list."""
        probe = request.copy()
        probe.remove("Route")  # forwarded here by another peer: the script is still the presentity's
        dispatcher = self.dispatcher
        runner = dispatcher.select(probe) if dispatcher is not None else None
        if runner is None:
            return None
        control = DecisionControl(self, probe, transaction, source)
        try:
            await runner.run(control)
        except Exception as exc:
            log.warning("subscribe script for %s failed: %s", aor, describe_error(exc))
            return None
        return control.decision()

    def default_processing(self, control: CallControl) -> None:
        PeerCore.on_request(self, control.request, control.transaction, control.source)

    def script_answered(self, request: Request, what: str) -> None:
        self.peer._event("script", f"{request.method} {request.uri}: the script {what}")

    def save_registration(self, control: CallControl) -> None:
        self.spawn(self.peer.handle_register(control.request, control.transaction, control.source))

    async def runs_here(self, runner: Runner, request: Request) -> bool:
        """A callee's own script runs on the callee's home peer, once per call (issue "reachable from
        anywhere"): a peer that is not the home peer of any of the callee's bindings routes the call there
        instead, where the script runs and its proxy() reaches the flows that peer holds. Nobody
        registered (or home routing off): the script runs where the call entered, as before."""
        peer = self.peer
        if not getattr(runner, "per_user", False) or not peer.config.home_routing:
            return True
        if peer.is_sole_home(request):
            return True  # the entry peer found every binding here
        try:
            bindings = await peer.lookup_bindings(request.uri.aor())
        except Exception:
            return True
        if not any(b.path for b in bindings):
            return True
        return peer.is_home_of(bindings)

    async def lookup_contacts(self, aor: str) -> list[str]:
        bindings = await self.peer.lookup_bindings(aor)
        return [b.contact for b in bindings]

    async def resolve(self, request: Request, uris: list[URI]) -> list[URI | Address | RoutedTarget]:
        out: list[URI | Address | RoutedTarget] = []
        for uri in uris:
            probe = request.copy()
            probe.uri = uri
            found = self.peer.locate(probe)
            if inspect.isawaitable(found):
                found = await found
            out.extend(found)
            # A static route or a registration's Path put a Route on the probe: keep it for the branch.
            if len(uris) == 1:
                for route in reversed(probe.get_all("Route")):
                    if route not in request.get_all("Route"):
                        request.add("Route", route, first=True)
        return out


# ------------------------------------------------------------------------------ running handlers in-process


#: how often a handler thread waiting on the loop checks that the loop still exists (seconds)
_HANDLER_WAIT_SLICE = 0.25


class LoopController(Controller):
    """The :class:`~sipapi.events.Controller` of a script running in this process: calls from the loop
    thread go straight to the :class:`CallControl`; calls from a handler's thread are run on the loop and
    waited for (so a ``def`` handler's ``proxy()`` simply blocks)."""

    def __init__(self, control: CallControl) -> None:
        self.control = control
        self.loop = control.loop
        self._loop_thread = threading.get_ident()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.in_loop():
            return fn(*args)

        async def call() -> Any:
            return fn(*args)

        return self._await(call())

    def _await(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed: a handler left running past its deadline, at shutdown
            coro.close()
            raise ScriptError("the script server has stopped") from None
        # Wait in slices: a loop closed after the call was scheduled never runs it, and a bare
        # ``future.result()`` would then block this handler thread for ever, and with it the
        # interpreter's exit (thread-pool workers are joined at exit).
        while True:
            try:
                return future.result(timeout=_HANDLER_WAIT_SLICE)
            except TimeoutError:
                if self.loop.is_closed():
                    future.cancel()
                    coro.close()  # never to run: close it here rather than warn "never awaited" at exit
                    raise ScriptError("the script server has stopped") from None

    def respond(self, status: int, reason: str | None, headers: list[tuple[str, str]], body: bytes) -> None:
        self._call(self.control.respond, status, reason, headers, body)

    def redirect(self, locations: list[str], status: int) -> None:
        self._call(self.control.redirect, locations, status)

    def challenge(self, realm: str, proxy: bool) -> None:
        self._call(self.control.challenge, realm, proxy)

    def default(self) -> None:
        self._call(self.control.default)

    def transfer(self, location: str) -> None:
        self._call(self.control.transfer, location)

    def save(self) -> None:
        self._call(self.control.save)

    def authenticate(self, realm: str, users: dict[str, str]) -> str | None:
        result: str | None = self._call(self.control.authenticate, realm, users)
        return result

    def proxy(self, locations: list[str], timeout: float | None) -> str:
        if self.in_loop():
            raise ScriptError("proxy() blocks: in an async def handler write `await event.action.proxy()`")
        outcome: str = self._await(self.control.proxy(locations, timeout))
        return outcome

    def proxy_async(self, locations: list[str], timeout: float | None) -> Awaitable[str]:
        return self.control.proxy(locations, timeout)

    def lookup(self, aor: str) -> list[str]:
        if self.in_loop():
            raise ScriptError("lookup() blocks: in an async def handler write `await event.lookup_async()`")
        found: list[str] = self._await(self.control.lookup(aor))
        return found

    def lookup_async(self, aor: str) -> Awaitable[list[str]]:
        return self.control.lookup(aor)


class InProcessRunner:
    """Runs the ``incoming`` handlers of an :class:`EventTarget` in this process (the script server).

    ``async def`` handlers run on the loop; ``def`` handlers in a thread, so that their blocking
    ``proxy()`` can wait for the loop. Handlers run in order until one decides. A handler that raises
    costs a 500 (logged with its file and line); one that overruns ``deadline`` seconds (time inside
    ``proxy()`` not counted) costs a 500 too — its thread cannot be killed, so it is left to finish,
    which is why per-user scripts run in worker processes instead (:mod:`sipapi.worker`).
    """

    def __init__(
        self, target: EventTarget, *, deadline: float = DEFAULT_DEADLINE, threads: int = 128
    ) -> None:
        self.target = target
        self.deadline = deadline
        # Its own pool: a def handler holds a thread while proxy() waits for the callee, so the loop's
        # default executor (a handful of threads) would cap the server at a handful of calls in progress.
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sipapi-handler")

    async def run(self, control: CallControl) -> None:
        kind = getattr(control, "event_type", "incoming")
        for handler in self.target.handlers(kind):
            event = Event(control.request, LoopController(control), source=control.source_tuple)
            event.type = kind
            try:
                await self._call(handler, event, control)
            except TimeoutError:
                control.core.script_stats["script_timeouts"] += 1
                log.warning("handler %s overran its deadline (%g s) on %s %s", _name(handler), self.deadline,
                            control.request.method, control.request.uri)  # fmt: skip
                control.fail(f"script {_name(handler)} took longer than {self.deadline:g} s")
                return
            except Exception as exc:
                control.core.script_stats["script_errors"] += 1
                script = inspect.getsourcefile(handler) if inspect.isfunction(handler) else None
                where = describe_error(exc, script)
                log.warning("script error on %s %s: %s", control.request.method, control.request.uri, where)
                control.fail(f"script error at {os.path.basename(where.split(': ', 1)[0])}")
                return
            if control.decided or (control.held is not None and event.action.outcome is not None):
                return

    async def _call(self, handler: Callable[[Event], Any], event: Event, control: CallControl) -> None:
        loop = control.loop
        began: list[float] = []  # when the handler really started (a thread may not be free at once)
        if inspect.iscoroutinefunction(handler):
            future: asyncio.Future[Any] = asyncio.ensure_future(handler(event))
            began.append(loop.time())
        else:

            def call() -> Any:
                began.append(time.monotonic())  # the loop's clock is time.monotonic too
                return handler(event)

            future = loop.run_in_executor(self.executor, call)
        queued = loop.time()
        while True:
            if not began:  # still waiting for a thread: bounded, then the request is refused
                if loop.time() - queued > self.deadline + 30.0:
                    future.cancel()
                    raise TimeoutError
                await asyncio.wait({future}, timeout=0.05)
                continue
            remaining = began[0] + self.deadline + control.seconds_in_proxy() - loop.time()
            if control.proxying:
                remaining = max(remaining, 0.5)
            if remaining <= 0:
                future.cancel()
                raise TimeoutError
            done, _ = await asyncio.wait({future}, timeout=remaining)
            if done:
                result = future.result()
                if inspect.isawaitable(result):  # a def handler that returned a coroutine
                    await result
                return


def _name(handler: Callable[..., Any]) -> str:
    code = getattr(handler, "__code__", None)
    if code is not None:
        return f"{getattr(handler, '__name__', 'handler')} ({code.co_filename}:{code.co_firstlineno})"
    return repr(handler)
