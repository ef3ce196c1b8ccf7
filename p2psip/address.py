"""Addresses and the transport rules of RFC 3261 §18 / RFC 3263, sans-IO: the one place that parses and
writes hosts, ports, targets and listen specs, and decides where a message goes.

Why one module: the same questions ("is this an IPv6 literal, does it need brackets, what is the default
port, where does this response go") used to be answered in half a dozen places with slightly different
rules. Here they are answered once, without sockets, so the transport layer (:mod:`p2psip.transport`) only
moves bytes and everything else can ask without importing it.

Conventions:

- a *bare* host is an IP literal without brackets or a name (``::1``, ``127.0.0.1``, ``example.com``);
  :func:`bracket` gives the form written in a URI, a Via or ``HOST:PORT`` text (``[::1]``);
- the stack does no DNS: a :class:`Target` always holds an IP literal (``localhost`` means 127.0.0.1);
- user-given text (flags, config, ``outbound=``) fails with :class:`ConfigError` naming the setting; text
  from the wire (a URI host, a Via sent-by) fails with :class:`ParseError`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from p2psip.errors import ConfigError, ParseError, TransportError

if TYPE_CHECKING:
    from p2psip.message import Request, Via
    from p2psip.uri import URI

__all__ = [
    "DEFAULT_PORTS",
    "RELIABLE",
    "SECURE",
    "TRANSPORTS",
    "WEBSOCKET",
    "HostPort",
    "ListenSpec",
    "Target",
    "bracket",
    "format_hostport",
    "is_ip_literal",
    "is_wildcard",
    "names_local",
    "numeric_host",
    "parse_hostport",
    "parse_listen",
    "parse_target",
    "reachable_host",
    "response_target",
    "same_host",
    "sent_by_target",
    "split_hostport",
    "split_wire_hostport",
    "stamp_via",
    "target_from_uri",
]

TRANSPORTS = ("udp", "tcp", "tls", "ws", "wss")
RELIABLE = frozenset({"tcp", "tls", "ws", "wss"})
WEBSOCKET = frozenset({"ws", "wss"})
SECURE = frozenset({"tls", "wss"})
#: RFC 3261 §19.1.2: 5060 for sip: over UDP/TCP, 5061 for TLS; RFC 7118 §5.2: WebSocket URIs without a
#: port mean HTTP's ports.
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061, "ws": 80, "wss": 443}
_WILDCARDS = ("0.0.0.0", "::")


# ------------------------------------------------------------------------------------------ hosts


def bracket(host: str) -> str:
    """A host as written in a URI, a Via or ``HOST:PORT`` text: IPv6 in brackets (idempotent)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def format_hostport(host: str, port: int) -> str:
    """``HOST:PORT`` with an IPv6 host in brackets: ``[::1]:5060``."""
    return f"{bracket(host)}:{port}"


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` (brackets allowed) is an IPv4 or IPv6 address (``localhost`` is a name)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


_NUMERIC_CACHE: dict[str, str | None] = {}


def numeric_host(host: str) -> str | None:
    """The IP literal for ``host`` (brackets removed, normalised, ``localhost`` → 127.0.0.1), or None for a
    name: what the stack can send to without DNS.

    Memoized (bounded): it runs for every forwarded message, and ``ipaddress`` parsing is slow."""
    cached = _NUMERIC_CACHE.get(host, "")
    if cached != "":
        return cached
    bare = host[1:-1] if host.startswith("[") else host
    literal: str | None
    if bare.lower() == "localhost":
        literal = "127.0.0.1"
    else:
        try:
            literal = str(ipaddress.ip_address(bare))
        except ValueError:
            literal = None
    if len(_NUMERIC_CACHE) > 4096:
        _NUMERIC_CACHE.clear()
    _NUMERIC_CACHE[host] = literal
    return literal


def reachable_host(transport: str, host: str) -> str | None:
    """The host a :class:`Target` over ``transport`` holds for ``host``: its IP literal, or for WS/WSS a
    browser's ``.invalid`` name (RFC 7118 §5.2, reached over its own connection only), lower-cased; else
    None (a name: the stack does no DNS)."""
    literal = numeric_host(host)
    if literal is None and transport in WEBSOCKET and host.lower().endswith(".invalid"):
        return host.lower()
    return literal


def same_host(a: str, b: str) -> bool:
    """Whether two hosts are the same: equal addresses (``::1`` = ``[0::1]``) or names (any case)."""
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a.strip("[]").lower() == b.strip("[]").lower()


def is_wildcard(host: str) -> bool:
    """``0.0.0.0`` or ``::``: a bind address meaning every local address."""
    return host in _WILDCARDS


def names_local(
    host: str,
    port: int | None,
    listening: Mapping[str, Iterable[tuple[str, int]]],
    *,
    transport: str | None = None,
    advertised: str | None = None,
) -> bool:
    """Whether ``host``:``port`` (a URI's or a Via's; no port = the transport's default) names one of the
    ``listening`` addresses (transport -> bound (host, port)s; of ``transport`` only when given): the same
    address, a wildcard bind, or the ``advertised`` address this element writes in its Vias."""
    literal = numeric_host(host)
    if literal is None:
        return False
    here = literal == advertised or is_wildcard(literal)
    for name, addrs in listening.items():
        if transport is not None and name != transport:
            continue
        wanted = port or DEFAULT_PORTS.get(name, 5060)
        for lhost, lport in addrs:
            if lport == wanted and (here or lhost == literal or is_wildcard(lhost)):
                return True
    return False


# ------------------------------------------------------------------------------ HOST:PORT grammar


def _split(text: str) -> tuple[str, str | None]:
    """``[v6]:port`` / ``host:port`` / ``host`` → (host as written, port text or None).

    The one reading of the ``hostport`` grammar (RFC 3261 §25.1) shared by wire and user text. Raises
    ValueError with the reason; an unbracketed host with several colons is left whole (the caller says why
    it is wrong in its own words).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("'[' without ']'")
        rest = text[end + 1 :]
        if rest and rest[0] != ":":
            raise ValueError("junk after ']'")
        return text[: end + 1], (rest[1:] if rest else None)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, None


def _port(text: str) -> int | None:
    """A port number 0-65535 written in ASCII digits, or None."""
    if not text or not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    value = int(text)
    return value if value <= 65535 else None


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


def _wire_error(what: str, text: str) -> ParseError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return ParseError(f"{what}: {shown!r}")


def split_wire_hostport(hostport: str, text: str, what: str = "URI") -> tuple[str, int | None]:
    """A ``hostport`` read from a message (a URI host, a Via sent-by; ``what`` names which) → (host as
    written, IPv6 keeping its brackets; port or None). Raises :class:`ParseError` quoting ``text``, the whole
    URI or header. On the hot path of every message: the common ``name-or-IPv4[:port]`` goes first."""
    if hostport[:1] != "[":
        host, colon, port_text = hostport.partition(":")
        if not host or not _HOST_CHARS.issuperset(host) or host[0] in "-." or ".." in host:
            raise _wire_error(f"bad host in {what}", text)
    else:
        try:
            host, rest = _split(hostport)
        except ValueError as exc:
            raise _wire_error(f"bad IPv6 reference in {what} ({exc})", text) from None
        if host[-1] != "]" or host.count(":") < 2 or not _IPV6_CHARS.issuperset(host[1:-1]):
            raise _wire_error(f"bad IPv6 reference in {what}", text)
        colon, port_text = ("", "") if rest is None else (":", rest)
    if not colon:
        return host, None
    port = _port(port_text)
    if port is None:
        raise _wire_error(f"bad port in {what}", text)
    return host, port


_NAME_CHARS = _HOST_CHARS | {"_"}


def _eg(what: str, host: str = "127.0.0.1") -> str:
    """The example address an error message shows: an overlay address (``--join``, ``--overlay``) is not
    a SIP one, and suggesting port 5060 there sends the user to the wrong port."""
    return f"{host}:{7060 if 'join' in what or 'overlay' in what else 5060}"


def split_hostport(
    text: str, what: str = "address", *, default_port: int | None = None, numeric: bool = False
) -> tuple[str, int | None]:
    """User text ``HOST[:PORT]`` or ``[IPv6][:PORT]`` → (bare host, port; ``default_port`` when absent).

    ``numeric=True`` wants an IP literal (``localhost`` becomes 127.0.0.1): the stack does no DNS.
    Raises :class:`ConfigError` starting with ``what`` and saying what to write instead.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected a string HOST:PORT, got {type(text).__name__}")
    text = text.strip()
    try:
        host, port_text = _split(text)
    except ValueError as exc:
        raise ConfigError(f"{what}: {text!r} has {exc} (write [ADDR]:PORT for IPv6)") from None
    if host.startswith("["):
        host = host[1:-1]
        if ":" not in host:
            raise ConfigError(f"{what}: {host!r} in brackets is not an IPv6 address")
    elif ":" in host:
        raise ConfigError(f"{what}: {text!r}: put IPv6 addresses in brackets, e.g. {_eg(what, '[::1]')}")
    if not host:
        raise ConfigError(f"{what}: the host is missing (write HOST:PORT, e.g. {_eg(what)})")
    if ":" in host:
        if not is_ip_literal(host):
            raise ConfigError(f"{what}: {host!r} is not an IPv6 address (write [ADDR]:PORT for IPv6)")
    elif not set(host) <= _NAME_CHARS:
        raise ConfigError(f"{what}: {host!r} is not a valid host name or address")
    if numeric:
        literal = numeric_host(host)
        if literal is None:
            raise ConfigError(
                f"{what} {text}: {host!r} is not an IP address (host names are not resolved: no DNS lookups; "
                f"give an address, e.g. {_eg(what)})"
            )
        host = literal
    if port_text is None:
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(
            f"{what}: port {port_text!r} is not a number (write HOST:PORT, e.g. {_eg(what)})"
        )
    port = _port(port_text)
    if port is None:
        raise ConfigError(f"{what}: port {port_text} is out of range (0-65535)")
    return host, port


@dataclass(frozen=True)
class HostPort:
    """A host (name, IPv4, or IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)

    def as_tuple(self) -> tuple[str, int]:
        return (self.host, self.port)


def parse_hostport(text: str, what: str, *, default_port: int | None = None) -> HostPort:
    """``HOST:PORT``, ``[IPv6]:PORT`` (or just ``HOST`` when ``default_port`` is given)."""
    host, port = split_hostport(text, what, default_port=default_port)
    if port is None:
        raise ConfigError(f"{what}: {text.strip()!r} needs a port (write HOST:PORT, e.g. {_eg(what)})")
    return HostPort(host, port)


# --------------------------------------------------------------------------------- targets, specs


class Target(NamedTuple):
    """Where to send: a transport name (``udp``/``tcp``/``tls``/``ws``/``wss``), an IP literal (IPv6 without
    brackets; for ``ws``/``wss`` also a browser's ``.invalid`` host, reached over its own connection only)
    and a port. A tuple so it is cheap, hashable and usable as a connection-pool key."""

    transport: str
    host: str
    port: int

    @property
    def reliable(self) -> bool:
        return self.transport in RELIABLE

    def __str__(self) -> str:
        return f"{self.transport}:{bracket(self.host)}:{self.port}"


@dataclass(frozen=True)
class ListenSpec:
    """One SIP listening address, ``[udp:|tcp:|tls:|ws:|wss:]HOST[:PORT]`` (IPv6 in brackets:
    ``ws:[::1]:80``).

    ``transport`` None means UDP and TCP on the same port (DESIGN.md's default); the host is an IP literal
    (``localhost`` is 127.0.0.1); a missing port is the transport's default (5060; 5061 for TLS; 80, 443 for
    WS, WSS).
    """

    transport: str | None
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str = "--listen") -> ListenSpec:
        """Parse a ``--listen`` value. Raises :class:`ConfigError` naming what is wrong."""
        transport, host, port = _parse_transport_hostport(text, what)
        return cls(transport, host, port)

    def transports(self) -> tuple[str, ...]:
        return (self.transport,) if self.transport else ("udp", "tcp")

    def split(self) -> list[ListenSpec]:
        """One spec per transport (the form a listener is opened from)."""
        return [ListenSpec(t, self.host, self.port) for t in self.transports()]

    def __str__(self) -> str:
        hostport = format_hostport(self.host, self.port)
        return f"{self.transport}:{hostport}" if self.transport else hostport


def _parse_transport_hostport(
    text: str, what: str, default_transport: str = "udp"
) -> tuple[str | None, str, int]:
    """``[udp:|tcp:|tls:|ws:|wss:]HOST[:PORT]`` → (transport or None, IP literal, port or the default port
    of the transport, ``default_transport`` when there is no prefix)."""
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected a string like udp:127.0.0.1:5060, got {type(text).__name__}")
    transport: str | None = None
    spec = text.strip()
    head, sep, rest = spec.partition(":")
    if sep and head.lower() in TRANSPORTS:
        transport, spec = head.lower(), rest
    elif sep and head.isalpha() and rest and not rest.isdigit():
        raise ConfigError(f"{what}: unknown transport {head!r} (use udp:, tcp:, tls:, ws: or wss:)")
    default_port = DEFAULT_PORTS[transport or default_transport]
    host, port = split_hostport(spec, what, numeric=True, default_port=default_port)
    assert port is not None
    return transport, host, port


def parse_listen(text: str, what: str = "--listen") -> ListenSpec:
    """``[udp:|tcp:|tls:|ws:|wss:]HOST:PORT``; without a prefix the peer listens on UDP and TCP."""
    return ListenSpec.parse(text, what)


def parse_target(text: str, what: str = "address", *, default_transport: str = "udp") -> Target:
    """``[udp:|tcp:|tls:|ws:|wss:]HOST[:PORT]``, a next hop a user gives (``outbound=``, ``--via``)."""
    transport, host, port = _parse_transport_hostport(text, what, default_transport)
    return Target(transport or default_transport, host, port)


def target_from_uri(uri: URI, *, default_transport: str = "udp") -> Target:
    """Where a request for ``uri`` goes, RFC 3263 without DNS: ``maddr`` or the host (an IP literal),
    the port or the transport's default, ``transport=`` or TLS for ``sips:``, else ``default_transport``.
    ``;transport=ws`` is WS, or WSS for a ``sips:`` URI (RFC 7118 §5.2; ``transport=wss`` is read too); a
    WebSocket URI may name a browser's ``.invalid`` host, which only its own connection reaches.

    Raises TransportError (with the reason) when the host is a name: the stack does no DNS lookups.
    """
    transport = uri.transport or ("tls" if uri.secure else default_transport)
    if transport == "ws" and uri.secure:
        transport = "wss"
    if transport not in TRANSPORTS:
        raise TransportError(f"unsupported transport {transport!r} in {uri}")
    host = uri.maddr or uri.host
    reachable = reachable_host(transport, host)
    if reachable is None:
        raise TransportError(f"no route to {host!r}: not an IP address and this stack does no DNS lookups")
    return Target(transport, reachable, uri.port or DEFAULT_PORTS[transport])


# ------------------------------------------------------------------------------ RFC 3261 §18.2


def stamp_via(request: Request, host: str, port: int) -> tuple[str, int, Target]:
    """§18.2.1 / RFC 3581: add ``received`` (and fill ``rport``) on the top Via of a request that arrived
    from ``host``:``port``.

    Returns the top Via's sent-by (host without brackets, port or 0: a stream connection is aliased under
    it) and where §18.2.2 sends responses over UDP (worked out once here, so no response re-parses its Via).
    Raises :class:`ParseError` when the request has no Via.
    """
    via = request.top_via
    if via is None:
        raise ParseError("the request has no Via header", partial=None)
    sent_by = via.host
    bare = sent_by[1:-1] if sent_by.startswith("[") else sent_by
    via_port = via.port
    rport = via.rport
    if bare != host or rport is not None:
        if rport is not None:
            via.params["rport"] = str(port)
        via.params["received"] = host
        request.set_top_via(via)  # written out, and kept parsed for the transaction layer
    maddr = via.params.get("maddr")
    if maddr:
        reply = Target("udp", numeric_host(maddr) or maddr, via_port or 5060)
    elif rport is not None:
        reply = Target("udp", host, port)
    elif bare != host:
        reply = Target("udp", host, via_port or 5060)
    else:
        reply = Target("udp", numeric_host(bare) or bare, via_port or 5060)
    return bare, via_port or 0, reply


def sent_by_target(transport: str, host: str, port: int | None) -> Target | None:
    """The key under which a stream connection that carried a request is also known: its transport and
    the top Via's sent-by (reachable host, default port when absent), so a stateless proxy, which keeps no
    per-request state, can still send the response back on it (§18.2.2). None for a name (no DNS)."""
    reachable = reachable_host(transport, host)
    if reachable is None:
        return None
    return Target(transport, reachable, port or DEFAULT_PORTS.get(transport, 5060))


def response_target(via: Via) -> Target:
    """Where a response goes when the request's connection is gone or it came over UDP (§18.2.2 with
    RFC 3581): ``maddr`` (UDP), else ``received`` with ``rport``, else the sent-by; default port by transport.

    Raises TransportError for an unknown transport or a host that is a name (no DNS)."""
    transport = via.transport.lower()
    if transport not in TRANSPORTS:
        raise TransportError(f"cannot send a response over transport {via.transport!r}")
    default = DEFAULT_PORTS[transport]
    received = via.received
    rport = via.rport
    if transport == "udp" and via.maddr:
        host = via.maddr
        port = via.port or default
    elif received:
        host = received
        port = rport if isinstance(rport, int) and rport is not True else (via.port or default)
    else:
        host = via.host
        port = via.port or default
    literal = numeric_host(host)
    if literal is None:
        raise TransportError(f"cannot send a response to {host!r}: not an IP address (no DNS)")
    return Target(transport, literal, port)
