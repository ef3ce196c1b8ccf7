"""Location decisions, sans-IO: where a request goes, and a small cache of overlay lookups.

``decide`` answers DESIGN.md's "which domains are overlay domains": IP-literal request-URIs are forwarded
as addressed (unless they name this peer itself, when the AOR is looked up like any other), domains with a
static route go to their next hop, and every other domain is an overlay domain. DNS is never consulted here;
the peer does it only when ``--dns`` is given and the overlay knows nobody.

``LocationCache`` keeps recent lookups for a few seconds so a burst of calls to one AOR costs one DHT
lookup, but never returns a binding past its own expiry: the cache's lifetime is the smaller of its TTL and
the earliest expiry among the cached bindings. It is keyed by the canonical AOR string (URIs are not hashable
by value, and RFC 3261 equality is not transitive).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from p2psip.address import is_ip_literal
from p2psip.errors import ParseError, SIPStatusError
from p2psip.registrar import Binding
from p2psip.uri import URI, Address

SOLE_HOME = "p2p-home"
"""Route parameter an entry peer puts on the Route to the callee's home peer when every binding of the
AOR lives there: the home peer then serves the call from the bindings it registered itself, without a
second DHT lookup (docs/nat.md)."""

IsLocal = Callable[[str, int | None], bool]
"""``is_local(host, port)``: whether a URI's host and port name this peer (a Path hop that is ours)."""

Branch = tuple[URI, tuple[str, ...] | None, float | None]
"""One branch of a forked request: the contact, its Route set (None: straight to the contact), its q."""


@dataclass(frozen=True)
class ForwardAsAddressed:
    """An IP-literal request-URI that is not this peer: send it where it points."""

    host: str
    port: int | None


@dataclass(frozen=True)
class StaticRoute:
    """A domain with a configured next hop (``--route DOMAIN=HOST:PORT``)."""

    domain: str
    host: str
    port: int


@dataclass(frozen=True)
class OverlayLookup:
    """Look the AOR up in the overlay."""

    aor: str


class NotRoutable(SIPStatusError):
    """A request-URI the peer cannot route at all: raised by :func:`decide` with the status to answer
    (416 for a scheme other than sip:/sips: with no static route, 404 for an address with no user)."""


Decision = ForwardAsAddressed | StaticRoute | OverlayLookup


def decide(
    uri: URI,
    *,
    routes: Mapping[str, tuple[str, int]] | None = None,
    is_local: Callable[[str, int | None], bool] = lambda host, port: False,
) -> Decision:
    """Where a request for ``uri`` goes (DESIGN.md "The peer: how a call flows", step 4); raises
    :class:`NotRoutable` with the answer when it goes nowhere. ``is_local(host, port)`` says whether an
    address names this peer (:meth:`p2psip.stack.Stack.is_local`)."""
    routes = routes or {}
    if uri.scheme not in ("sip", "sips"):
        raise NotRoutable(416, detail=f"{uri.scheme}: URIs are not routed here")
    host = uri.host.lower().strip("[]")
    route = routes.get(host)
    if route is not None:
        return StaticRoute(host, route[0], route[1])
    if host.endswith(".invalid") and uri.transport in ("ws", "wss"):
        # RFC 7118 §5.2: a browser's made-up host, reached only over its WebSocket connection (the
        # transport knows it by that name); never a name to look up in the overlay or in DNS.
        return ForwardAsAddressed(uri.host, uri.port)
    if is_ip_literal(host):
        here = is_local(uri.host, uri.port)
        if uri.user and here:
            return OverlayLookup(uri.aor())
        if here:
            raise NotRoutable(404, detail="the request-URI names this peer and no user")
        return ForwardAsAddressed(uri.host, uri.port)
    if not uri.user:
        raise NotRoutable(404, detail=f"{uri.host} is not an IP address and the request-URI names no user")
    return OverlayLookup(uri.aor())


def live_targets(bindings: Iterable[Binding], now: float) -> list[Binding]:
    """The bindings that have not expired, best first, in the order every peer forks them
    (:func:`by_preference`)."""
    return by_preference(b for b in bindings if b.alive(now))


def by_preference(bindings: Iterable[Binding]) -> list[Binding]:
    """The bindings in the order every peer forks them: highest q first, then by entry id, so that every
    peer picks the same binding as the best one (and so the same home peer, :func:`primary_home`)."""
    return sorted(bindings, key=lambda b: (-(b.q if b.q is not None else 1.0), b.entry_id))


def primary_home(ordered: Iterable[Binding], is_local: IsLocal) -> str | None:
    """Home-peer routing (RFC 3327 Path, docs/nat.md): the Route to the home peer (the first Path hop) of
    the best binding with a Path, when this peer is not itself the home peer of any binding; None when it
    is (it forks from here), or when no binding has a Path. The Route carries :data:`SOLE_HOME` when every
    binding lives at that one home peer."""
    first: URI | None = None
    sole = True
    for b in ordered:
        uri = first_path_hop(b)
        if uri is None:
            sole = False
            continue
        if is_local(uri.host, uri.port):
            return None
        if first is None:
            first = uri
        elif (uri.host, uri.port) != (first.host, first.port):
            sole = False
    if first is None:
        return None
    hop = URI.build(scheme=first.scheme, host=first.host, port=first.port, params={"lr": None})
    if first.transport:
        hop.params["transport"] = first.transport
    if sole:
        # every binding lives there: that peer need not look the AOR up again (its own records do)
        hop.params[SOLE_HOME] = None
    return f"<{hop}>"


def only_over_its_path(binding: Binding, contact: URI) -> bool:
    """Whether a binding is reached only through its Path: its first hop names a flow of its home peer
    (``<sip:TOKEN@peer;lr>``, a NATed phone's, a client peer's), or its Contact is a WebSocket client's
    (RFC 7118: only its own connection reaches it, and that is on the peer its Path names)."""
    if (contact.transport or "").lower() in ("ws", "wss"):
        return True
    hop = first_path_hop(binding)
    return hop is not None and hop.user is not None


def first_path_hop(binding: Binding) -> URI | None:
    """The URI of the binding's first Path hop (its home peer, RFC 3327); None without a Path, or when that
    hop does not parse (such a binding is treated as having no home peer)."""
    if not binding.path:
        return None
    try:
        return Address(binding.path[0]).uri
    except ParseError:
        return None


def branches(ordered: Iterable[Binding], *, home_routing: bool = True) -> list[Branch]:
    """The branches a home peer (or, with home routing off, the entry peer) forks to: each binding's own
    Path is its branch's Route set (RFC 3327), so every fork takes its own home peer and flow. With home
    routing off a branch goes straight to its contact, except one reached only over its Path
    (:func:`only_over_its_path`). Contacts that do not parse are skipped."""
    out: list[Branch] = []
    for b in ordered:
        try:
            uri = URI(b.contact)
        except ParseError:
            continue
        if b.path and (home_routing or only_over_its_path(b, uri)):
            out.append((uri, b.path, b.q))
        else:
            out.append((uri, None, b.q))
    return out


class LocationCache:
    """Recent overlay lookups, keyed by canonical AOR, honouring each binding's expiry.

    Only non-empty results are cached: a fresh registration must be callable at once, and a 404 should not
    linger. ``forget`` drops an AOR (the local registrar calls it on every change it makes).
    """

    def __init__(self, ttl: float = 5.0, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, list[Binding]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, aor: str, now: float) -> list[Binding] | None:
        item = self._entries.get(aor)
        if item is None:
            self.misses += 1
            return None
        valid_until, bindings = item
        if now >= valid_until:
            del self._entries[aor]
            self.misses += 1
            return None
        self._entries.move_to_end(aor)
        self.hits += 1
        return live_targets(bindings, now)

    def put(self, aor: str, bindings: Iterable[Binding], now: float) -> None:
        alive = live_targets(bindings, now)
        if not alive or self.ttl <= 0:
            self._entries.pop(aor, None)
            return
        valid_until = min([now + self.ttl] + [b.expires_at for b in alive])
        self._entries[aor] = (valid_until, alive)
        self._entries.move_to_end(aor)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, aor: str) -> None:
        self._entries.pop(aor, None)

    def __len__(self) -> int:
        return len(self._entries)


class HomeTable:
    """The registrations a peer took as their home peer: AOR -> its bindings, as one tuple per AOR.

    Why a tuple and not a dict of entry id -> binding: almost every AOR has one binding, and a dict per AOR
    cost ~260 bytes of a registration's memory (bench/memory.py), a one-item tuple 56. A change (a REGISTER,
    a removal) builds the AOR's tuple again; lookups by entry id scan its few bindings."""

    __slots__ = ("_by_aor",)

    def __init__(self) -> None:
        self._by_aor: dict[str, tuple[Binding, ...]] = {}

    def __len__(self) -> int:
        return len(self._by_aor)

    def __contains__(self, aor: object) -> bool:
        return aor in self._by_aor

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_aor)

    def get(self, aor: str) -> tuple[Binding, ...]:
        """The bindings of ``aor`` held (expired ones included until :meth:`live` drops them)."""
        return self._by_aor.get(aor, ())

    def items(self) -> list[tuple[str, tuple[Binding, ...]]]:
        return list(self._by_aor.items())

    def has(self, aor: str, entry_id: bytes) -> bool:
        return any(b.entry_id == entry_id for b in self._by_aor.get(aor, ()))

    def update(self, aor: str, put: Iterable[Binding] = (), drop: Iterable[bytes] = ()) -> None:
        """Store ``put`` (each replacing the binding with its entry id) and drop the entry ids ``drop``."""
        put = tuple(put)
        gone = {*drop, *(b.entry_id for b in put)}
        kept = tuple(b for b in self._by_aor.get(aor, ()) if b.entry_id not in gone) + put
        if kept:
            self._by_aor[aor] = kept
        else:
            self._by_aor.pop(aor, None)

    def live(self, aor: str, now: float) -> tuple[Binding, ...]:
        """The bindings of ``aor`` still alive at ``now``; expired ones are forgotten."""
        held = self._by_aor.get(aor, ())
        alive = tuple(b for b in held if b.alive(now))
        if len(alive) != len(held):
            self.update(aor, drop=[b.entry_id for b in held if not b.alive(now)])
        return alive
