"""Event, header access and actions: what a script handler sees (DESIGN.md "Scripting contract").

A handler registered with ``basic.addEventListener('incoming', handler)`` is called with an
:class:`Event` for every request the script is asked about. The event reads like the request
(``event['From'].uri.host``, ``event.method``, ``str(event)``) and carries ``event.action``, the
decisions the handler may take (accept, reject, redirect, challenge, proxy, default).

The event never talks to sockets itself: every action goes to a :class:`Controller`. The same Event class
therefore works in three places — in the script server's own process (:mod:`sipapi.server`, the
controller forwards to the event loop from the handler's thread), in a peer, and in an isolated worker
process (:mod:`sipapi.worker`, the controller is a pipe to the peer). That is why the event keeps the
request as a parsed :class:`~p2psip.message.Request` and the locations as URIs, both of which travel as text.

Blocking and async handlers: ``event.action.proxy()`` blocks and returns the outcome in a ``def`` handler
(run outside the event loop), and returns an awaitable in an ``async def`` handler (``await
event.action.proxy()``); the controller tells which by ``in_loop()``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

from p2psip.errors import ParseError
from p2psip.message import Request, canonical_name
from p2psip.uri import URI, Address

from .errors import ScriptError

__all__ = [
    "OUTCOMES",
    "Action",
    "Controller",
    "Event",
    "EventTarget",
    "Header",
    "ScriptError",
    "outcome_of",
]

OUTCOMES = ("success", "busy", "noanswer", "redirect", "failure")
"""What ``event.action.proxy()`` returns (DESIGN.md): a 2xx was forwarded; 486/600; a timeout (pending
branches cancelled) or 408/480; a 3xx; anything else, or no reachable target."""


def outcome_of(status: int, *, timed_out: bool = False) -> str:
    """Map a proxy's final status to one of :data:`OUTCOMES`."""
    if 200 <= status < 300:
        return "success"
    if timed_out or status in (408, 480):
        return "noanswer"
    if status in (486, 600):
        return "busy"
    if 300 <= status < 400:
        return "redirect"
    return "failure"


class Header:
    """One header value, readable the way the article's scripts read it.

    ``.value`` is the text; for address headers (From, To, Contact, Route, ...) ``.uri``, ``.display`` and
    ``.tag`` are the parsed parts. On a header that is not an address these are None rather than an error,
    so ``event['Max-Forwards'].uri`` cannot crash a script.
    """

    __slots__ = ("_address", "_parsed", "name", "value")

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value
        self._parsed = False
        self._address: Address | None = None

    @property
    def address(self) -> Address | None:
        """The value parsed as a name-addr / addr-spec, or None when it is not one."""
        if not self._parsed:
            self._parsed = True
            try:
                self._address = Address(self.value)
            except (ParseError, ValueError):
                self._address = None
        return self._address

    @property
    def uri(self) -> URI | None:
        address = self.address
        return address.uri if address is not None else None

    @property
    def display(self) -> str | None:
        address = self.address
        return address.display if address is not None else None

    @property
    def tag(self) -> str | None:
        address = self.address
        return address.tag if address is not None else None

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"<Header {self.name}: {self.value}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Header):
            return self.value == other.value
        if isinstance(other, str):
            return self.value == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class Controller(Protocol):
    """Where an event's actions go (the script server, a peer, or the pipe of a worker process).

    Each decision method is called at most once per event (the :class:`Action` enforces it). Locations
    travel as strings so a worker process can send them over a pipe.
    """

    def in_loop(self) -> bool:
        """Whether the caller runs on the controller's event loop (then ``proxy`` must not block)."""
        ...

    def respond(
        self, status: int, reason: str | None, headers: list[tuple[str, str]], body: bytes
    ) -> None: ...

    def redirect(self, locations: list[str], status: int) -> None: ...

    def challenge(self, realm: str, proxy: bool) -> None: ...

    def default(self) -> None: ...

    def transfer(self, location: str) -> None: ...

    def save(self) -> None: ...

    def proxy(self, locations: list[str], timeout: float | None) -> str:
        """Blocking: forward and wait for the outcome (called off the loop)."""
        ...

    def proxy_async(self, locations: list[str], timeout: float | None) -> Awaitable[str]:
        """The same from a coroutine on the loop."""
        ...

    def lookup(self, aor: str) -> list[str]:
        """Blocking location lookup (off the loop)."""
        ...

    def lookup_async(self, aor: str) -> Awaitable[list[str]]: ...

    def authenticate(self, realm: str, users: dict[str, str]) -> str | None:
        """The username whose Digest credentials in the request are right, else None."""
        ...


class _Done:
    """What a decision returns: None-like, and awaitable, so ``await event.action.reject(...)`` also works."""

    __slots__ = ()

    def __await__(self) -> Iterator[None]:
        return iter(())

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<done>"


_DONE = _Done()


class Action:
    """The decisions a handler takes about its event (``event.action``).

    A final decision (accept, reject, redirect, challenge, default, save) may be taken once; ``proxy``
    may be called again after it returned a non-``success`` outcome (sequential forking), and a final
    decision may follow it (the held-back response is then dropped).
    """

    def __init__(self, event: Event, controller: Controller) -> None:
        self._event = event
        self._controller = controller
        self.decided = False
        self.outcome: str | None = None

    def _decide(self, what: str) -> None:
        if self.decided:
            raise ScriptError(f"{what}: this request was already answered")
        self.decided = True

    def accept(
        self,
        code: int = 200,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | str = b"",
        content_type: str | None = None,
    ) -> _Done:
        """Answer the request with a 2xx (200 OK by default)."""
        if not 200 <= code < 300:
            raise ScriptError(f"accept: {code} is not a 2xx status (use reject or redirect)")
        self._decide("accept")
        data = body.encode() if isinstance(body, str) else bytes(body)
        extra = list(headers)
        if content_type and data:
            extra.append(("Content-Type", content_type))
        self._controller.respond(code, reason, extra, data)
        return _DONE

    def reject(
        self, code: int = 603, reason: str | None = None, *, headers: Iterable[tuple[str, str]] = ()
    ) -> _Done:
        """Answer with a final failure (3xx-6xx), e.g. ``reject(code=483, reason='Too many hops')``."""
        if not 300 <= code <= 699:
            raise ScriptError(f"reject: {code} is not a final failure status (300-699)")
        self._decide("reject")
        self._controller.respond(code, reason, list(headers), b"")
        return _DONE

    def redirect(self, code: int = 302) -> _Done:
        """Answer 302 (or another 3xx) with a Contact per location (``event.location``)."""
        if not 300 <= code < 400:
            raise ScriptError(f"redirect: {code} is not a 3xx status")
        locations = self._event._location_texts()
        if not locations:
            raise ScriptError("redirect: event.location is empty (set it to a URI first)")
        self._decide("redirect")
        self._controller.redirect(locations, code)
        return _DONE

    def challenge(self, realm: str = "p2psip", *, proxy: bool = False) -> _Done:
        """Answer 401 (407 with ``proxy=True``) with a Digest challenge for ``realm``; check the retried
        request with :meth:`Event.authenticate`."""
        self._decide("challenge")
        self._controller.challenge(realm, proxy)
        return _DONE

    def default(self) -> _Done:
        """The normal processing: a peer's registrar/proxy, or 501 in a stand-alone script server."""
        self._decide("default")
        self._controller.default()
        return _DONE

    def transfer(self, uri: URI | Address | str | None = None) -> _Done:
        """Transfer the call to ``uri`` (default: ``event.location``): the server answers the INVITE
        itself (SDP ``a=inactive``) and sends the caller a REFER to ``uri``, hanging up once the caller
        reports the new call's outcome; a caller whose Allow lacks REFER gets a 302 to ``uri`` instead
        (see sipapi/transfer.py). Only an INVITE can be transferred."""
        if self._event.method != "INVITE":
            raise ScriptError(f"transfer: only an INVITE can be transferred, not {self._event.method}")
        if uri is None:
            locations = self._event._location_texts()
            if not locations:
                raise ScriptError("transfer: no target (give a URI or set event.location)")
            target = locations[0]
        else:
            (only,) = _uris(uri)
            target = str(only)
        self._decide("transfer")
        self._controller.transfer(target)
        return _DONE

    def save(self) -> _Done:
        """SER's ``save("location")``: handle this REGISTER with the registrar and answer it."""
        if self._event.method != "REGISTER":
            raise ScriptError(f"save: only a REGISTER can be saved, not {self._event.method}")
        self._decide("save")
        self._controller.save()
        return _DONE

    def proxy(self, timeout: float | None = None) -> Any:
        """Forward to ``event.location`` (forking to every location) and return the outcome when the call
        is decided: 'success', 'busy', 'noanswer', 'redirect' or 'failure'. A non-2xx final response is
        held back: the handler may still redirect or reject; otherwise it is sent when the handler returns.

        In a ``def`` handler this blocks and returns the string; in an ``async def`` handler it returns an
        awaitable of it.
        """
        if self.decided:
            raise ScriptError("proxy: this request was already answered")
        locations = self._event._location_texts()
        controller = self._controller
        if controller.in_loop():
            return self._proxy_async(locations, timeout)
        outcome = controller.proxy(locations, timeout)
        return self._proxied(outcome)

    async def _proxy_async(self, locations: list[str], timeout: float | None) -> str:
        return self._proxied(await self._controller.proxy_async(locations, timeout))

    def _proxied(self, outcome: str) -> str:
        self.outcome = outcome
        if outcome == "success":
            self.decided = True
        return outcome


Handler = Callable[["Event"], Any]


class EventTarget:
    """``basic``: the object scripts register their handlers on (the DOM-like API of the article)."""

    def __init__(self) -> None:
        self.listeners: dict[str, list[Handler]] = {}

    def addEventListener(self, type: str, handler: Handler) -> None:
        if not callable(handler):
            raise TypeError(f"addEventListener: {handler!r} is not callable")
        self.listeners.setdefault(type, []).append(handler)

    def removeEventListener(self, type: str, handler: Handler) -> None:
        handlers = self.listeners.get(type, [])
        if handler in handlers:
            handlers.remove(handler)

    def handlers(self, type: str) -> list[Handler]:
        return list(self.listeners.get(type, []))

    def __bool__(self) -> bool:
        return any(self.listeners.values())


class Event:
    """One incoming request as a script sees it.

    ``event['Max-Forwards']`` → :class:`Header` or None; ``event.all('Via')`` → every value;
    ``event.method``, ``event.uri`` (the Request-URI), ``str(event)`` (the whole message);
    ``event.location`` (URI or list of URIs: where ``proxy`` and ``redirect`` send the call; initially the
    Request-URI); ``event.action`` (:class:`Action`).
    """

    type = "incoming"

    def __init__(
        self, request: Request, controller: Controller, *, source: tuple[str, str, int] | None = None
    ):
        self.request = request
        self.source = source
        """(transport, host, port) the request came from, when known."""
        self._location: list[URI] = [request.uri.copy()]
        self._controller = controller
        self.action = Action(self, controller)

    # -- the request ------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Header | None:
        value = self.request.get(name)
        if value is None:
            return None
        return Header(canonical_name(name), value)

    def all(self, name: str) -> list[Header]:
        display = canonical_name(name)
        return [Header(display, value) for value in self.request.get_all(name)]

    def __contains__(self, name: str) -> bool:
        return self.request.get(name) is not None

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def uri(self) -> URI:
        return self.request.uri

    @property
    def body(self) -> bytes:
        return self.request.body

    def __str__(self) -> str:
        return str(self.request)

    def __repr__(self) -> str:
        return f"<Event {self.type} {self.request.method} {self.request.uri}>"

    # -- where the call goes -------------------------------------------------------------------------------
    @property
    def location(self) -> URI | list[URI]:
        """One URI, or a list when there are several (a fork)."""
        if len(self._location) == 1:
            return self._location[0]
        return list(self._location)

    @location.setter
    def location(self, value: URI | Address | str | Iterable[URI | Address | str] | None) -> None:
        self._location = _uris(value)

    def _location_texts(self) -> list[str]:
        return [str(uri) for uri in self._location]

    def lookup(self) -> bool:
        """SER's ``lookup("location")``: set ``event.location`` to the registered contacts of the
        Request-URI's AOR; False (location unchanged) when nobody is registered. Blocks in a ``def``
        handler; use ``await event.lookup_async()`` in an ``async def`` one."""
        found = self._controller.lookup(self.request.uri.aor())
        if found:
            self._location = [URI(text) for text in found]
        return bool(found)

    async def lookup_async(self) -> bool:
        found = await self._controller.lookup_async(self.request.uri.aor())
        if found:
            self._location = [URI(text) for text in found]
        return bool(found)

    def authenticate(self, users: dict[str, str], realm: str = "p2psip") -> str | None:
        """The user name whose Digest credentials (answering an earlier ``action.challenge(realm)``) are
        right for ``users`` (name → password); None when there are none or they are wrong."""
        return self._controller.authenticate(realm, dict(users))


def _uris(value: URI | Address | str | Iterable[URI | Address | str] | None) -> list[URI]:
    if value is None:
        return []
    if isinstance(value, URI | Address | str):
        items: list[URI | Address | str] = [value]
    else:
        items = list(value)
    out = []
    for item in items:
        if isinstance(item, Address):
            out.append(item.uri.copy())
        elif isinstance(item, URI):
            out.append(item.copy())
        elif isinstance(item, str):
            out.append(URI(item.strip("<>")))
        else:
            raise TypeError(f"event.location: {item!r} is not a URI")
    return out
