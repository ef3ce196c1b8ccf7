"""SIP messages: parse, inspect, build and serialize requests and responses (RFC 3261 §7, §18.3, §20, §25).

Sans-IO: bytes in, objects out, objects in, bytes out. No sockets or clocks here.

Why it is built this way:

- **Lazy, but safe where it matters.** :func:`parse` splits the header block once into
  ``(key, name, value)`` triples and validates the start line, the framing (Content-Length, §18.3) and the
  headers every transaction needs (top Via, From, To, Call-ID, CSeq), so a message that passes ``parse`` can
  be matched to a transaction and answered without further surprises. Everything else (Contact, Route, the
  other Via values, ...) is parsed on first access and cached; a malformed one raises :class:`ParseError`
  from the property that reads it.
- **Raw values are the source of truth.** The structured properties (``via``, ``from_``, ``to`` ...) are
  read-only views; change a message with :meth:`Message.set` / :meth:`Message.add` / :meth:`Message.remove`,
  which drop the cached views of that header. Headers nobody touched are serialized exactly as received
  (apart from canonical names and normalised whitespace), which is what a proxy needs.
- **Canonical names.** Compact forms and any capitalisation are mapped to one canonical name when parsed
  (``v`` and ``VIA`` become ``Via``); unknown headers keep the name as received.
- :class:`ParseError` is the only exception :func:`parse` raises, whatever the input (checked with
  hypothesis in tests/test_parse_fuzz.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from p2psip.address import split_wire_hostport
from p2psip.errors import ParseError, SIPStatusError
from p2psip.uri import (
    TOKEN_CHARS,
    URI,
    Address,
    _fast_params,
    _scan_quoted,
    check_address,
    format_params,
    parse_params,
    quote,
    unquote,
)

__all__ = [
    "REASONS",
    "CSeq",
    "Limits",
    "Message",
    "Request",
    "Response",
    "StreamFramer",
    "Via",
    "answerable_head",
    "canonical_name",
    "format_auth",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse",
    "parse_auth",
    "split_list",
]

#: The RFC 3261 magic cookie that starts every branch made by an RFC 3261 element (§8.1.1.7).
BRANCH_COOKIE = "z9hG4bK"

# --------------------------------------------------------------------------------------------------------
# Header names
# --------------------------------------------------------------------------------------------------------

_CANONICAL = [
    "Accept",
    "Accept-Contact",
    "Accept-Encoding",
    "Accept-Language",
    "Accept-Resource-Priority",
    "Alert-Info",
    "Allow",
    "Allow-Events",
    "Answer-Mode",
    "Authentication-Info",
    "Authorization",
    "Call-ID",
    "Call-Info",
    "Contact",
    "Content-Disposition",
    "Content-Encoding",
    "Content-ID",
    "Content-Language",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Date",
    "Diversion",
    "Error-Info",
    "Event",
    "Expires",
    "Flow-Timer",
    "From",
    "History-Info",
    "Identity",
    "Identity-Info",
    "In-Reply-To",
    "Join",
    "Max-Breadth",
    "Max-Forwards",
    "MIME-Version",
    "Min-Expires",
    "Min-SE",
    "Organization",
    "P-Asserted-Identity",
    "P-Preferred-Identity",
    "Path",
    "Priority",
    "Privacy",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Require",
    "RAck",
    "Reason",
    "Record-Route",
    "Refer-Sub",
    "Refer-To",
    "Referred-By",
    "Reject-Contact",
    "Remote-Party-ID",
    "Replaces",
    "Reply-To",
    "Request-Disposition",
    "Require",
    "Resource-Priority",
    "Retry-After",
    "Route",
    "RSeq",
    "Security-Client",
    "Security-Server",
    "Security-Verify",
    "Server",
    "Service-Route",
    "Session-Expires",
    "SIP-ETag",
    "SIP-If-Match",
    "Subject",
    "Subscription-State",
    "Supported",
    "Target-Dialog",
    "Timestamp",
    "To",
    "Unsupported",
    "User-Agent",
    "Via",
    "Warning",
    "WWW-Authenticate",
]

# RFC 3261 §7.3.3 compact forms, and those of common extensions (RFC 3265, 3515, 3892, 3903, 4028, 4474,
# 3841).
_COMPACT = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "o": "Event",
    "r": "Refer-To",
    "b": "Referred-By",
    "u": "Allow-Events",
    "x": "Session-Expires",
    "y": "Identity",
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
    "n": "Identity-Info",
}

# Headers whose grammar is a comma-separated list (``#element``): get_all() splits these and only these.
# Everything else (Date, Subject, User-Agent, the authentication headers whose parameters are
# comma-separated, unknown extension headers) is one value per header line.
_LIST_HEADERS = frozenset(
    k.lower()
    for k in [
        "Accept",
        "Accept-Contact",
        "Accept-Encoding",
        "Accept-Language",
        "Accept-Resource-Priority",
        "Alert-Info",
        "Allow",
        "Allow-Events",
        "Call-Info",
        "Contact",
        "Content-Encoding",
        "Content-Language",
        "Diversion",
        "Error-Info",
        "History-Info",
        "In-Reply-To",
        "P-Asserted-Identity",
        "P-Preferred-Identity",
        "Path",
        "Proxy-Require",
        "Reason",
        "Record-Route",
        "Reject-Contact",
        "Request-Disposition",
        "Require",
        "Resource-Priority",
        "Route",
        "Security-Client",
        "Security-Server",
        "Security-Verify",
        "Service-Route",
        "Supported",
        "Unsupported",
        "Via",
        "Warning",
    ]
)

# (key, canonical name) for every spelling we know: canonical, lower-case, upper-case and compact forms.
_NAMES: dict[str, tuple[str, str]] = {}
for _name in _CANONICAL:
    _entry = (_name.lower(), _name)
    _NAMES[_name] = _NAMES[_name.lower()] = _NAMES[_name.upper()] = _entry
for _short, _long in _COMPACT.items():
    _NAMES[_short] = _NAMES[_short.upper()] = _NAMES[_long]
del _name, _entry, _short, _long


def _name_entry(name: str) -> tuple[str, str]:
    """(lookup key, display name) for a header name in any spelling; raises ParseError on a bad name."""
    entry = _NAMES.get(name)
    if entry is not None:
        return entry
    stripped = name.strip(" \t")
    low = stripped.lower()
    entry = _NAMES.get(low)
    if entry is not None:
        return entry
    if not stripped or not TOKEN_CHARS.issuperset(stripped):
        raise ParseError(f"bad header name {name[:40]!r}")
    return (low, stripped)


def canonical_name(name: str) -> str:
    """The canonical spelling of a header name: ``canonical_name("v") == "Via"``; unknown names unchanged."""
    return _name_entry(name)[1]


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, but not inside quoted strings or ``<...>``; drop empty items."""
    if "," not in value:
        return [value] if value else []
    if '"' not in value and "<" not in value:
        return [item for item in (part.strip(" \t") for part in value.split(",")) if item]
    items: list[str] = []
    start = 0
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == '"':
            i = _scan_quoted(value, i)
            continue
        if c == "<":
            end = value.find(">", i)
            if end < 0:
                raise ParseError(f"missing '>' in {value[:80]!r}")
            i = end + 1
            continue
        if c == ",":
            item = value[start:i].strip(" \t")
            if item:
                items.append(item)
            start = i + 1
        i += 1
    item = value[start:].strip(" \t")
    if item:
        items.append(item)
    return items


# --------------------------------------------------------------------------------------------------------
# Structured header values
# --------------------------------------------------------------------------------------------------------


class CSeq(NamedTuple):
    """The CSeq header: sequence number and method."""

    number: int
    method: str

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


def _parse_cseq(value: str) -> CSeq:
    number, _, method = value.partition(" ")
    if method in _METHODS and number.isdigit() and len(number) < 10 and number.isascii():
        return _new_tuple(CSeq, (int(number), method))  # the usual "314159 INVITE", < 2**31 for sure
    if "\t" in value or "  " in value:
        parts = value.split()
        number, method = (parts[0], parts[1]) if len(parts) == 2 else ("", "")
    if not number.isdigit() or len(number) > 10 or not number.isascii():
        raise ParseError(f"bad CSeq {value[:80]!r}")
    if method not in _METHODS and (not method or not TOKEN_CHARS.issuperset(method)):
        raise ParseError(f"bad CSeq {value[:80]!r}")
    num = int(number)
    if num >= 2**31:
        raise ParseError(f"CSeq number out of range {value[:80]!r}")
    return _new_tuple(CSeq, (num, method))  # CSeq(num, method) without NamedTuple's Python-level __new__


_new_tuple = tuple.__new__

_METHODS = frozenset(
    [
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "OPTIONS",
        "REGISTER",
        "PRACK",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "INFO",
        "REFER",
        "MESSAGE",
        "UPDATE",
    ]
)


_SENT_PROTOCOLS = {
    f"SIP/2.0/{t}": ("SIP/2.0", t.upper())
    for t in ("UDP", "TCP", "TLS", "SCTP", "WS", "WSS", "udp", "tcp", "tls")
}
_TOKEN_RE = r"A-Za-z0-9\-.!%*_+`'~"
_FAST_VIA = re.compile(
    r"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9][A-Za-z0-9.\-]*|\[[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\])"
    r"(?::([0-9]{1,5}))?"
    r"((?:;[" + _TOKEN_RE + r"]+(?:=[" + _TOKEN_RE + r"\[\]:]+)?)*)"
).fullmatch


class Via:
    """One Via value: ``SIP/2.0/UDP host:port;branch=z9hG4bK...;rport``.

    ``transport`` is upper-case, ``host`` keeps IPv6 brackets, ``params`` maps lower-cased names to values
    (None for flags such as a bare ``rport``).
    """

    __slots__ = ("host", "params", "port", "protocol", "transport")

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]
    protocol: str

    def __init__(self, text: str) -> None:
        m = _FAST_VIA(text)  # the usual shape in one compiled match; the general path below otherwise
        if m is None or not self._set_fast(m, text):
            self._parse_general(text)

    def _set_fast(self, m: re.Match[str], text: str) -> bool:
        """Fill in the parts from a ``_FAST_VIA`` match of ``text``; False if the host is not valid after all
        (``..``), for the general path to explain."""
        self.protocol = "SIP/2.0"
        transport, self.host, port, params = m.groups()
        self.transport = transport.upper()
        if port is None:
            self.port = None
        else:
            self.port = int(port)
            if self.port > 65535:
                raise ParseError(f"bad port in Via {text[:80]!r}")
        self.params = _fast_params(params) if params else {}
        return ".." not in self.host

    @classmethod
    def _first_of(cls, value: str) -> Via:
        """The first Via of a header line holding several (``Via: a, b``, as sipp and others echo the Via
        list in responses). The text before the first comma is that Via when the fast regular expression
        accepts it (it allows no quotes or ``<>``, which could hide a comma); only otherwise is the line
        split properly. Saves the split of the whole line, ~9,000 of ~30,000 CPU instructions (callgrind)."""
        head = value[: value.find(",")].rstrip(" \t")
        m = _FAST_VIA(head)
        if m is not None:
            via = cls.__new__(cls)
            if via._set_fast(m, head):
                return via
        items = split_list(value)
        if not items:  # "Via: , , ,": commas and nothing between them
            raise ParseError(f"empty Via header {value[:40]!r}")
        return cls(items[0])

    def _parse_general(self, text: str) -> None:
        proto, sep, rest = text.partition(" ")
        known = _SENT_PROTOCOLS.get(proto)
        if known is not None and sep:
            self.protocol, self.transport = known
        else:
            rest = self._sent_protocol(text)
        sent_by, semi, params = rest.partition(";")
        if " " in sent_by or "\t" in sent_by:
            # LWS before ";" and around the ":" of sent-by is legal.
            sent_by = "".join(sent_by.split())
        self.host, self.port = split_wire_hostport(sent_by, text, "Via")
        self.params = parse_params(params, text) if semi else {}

    def _sent_protocol(self, text: str) -> str:
        """The general ``name / version / transport`` with LWS allowed around the slashes."""
        parts = text.split("/", 2)
        if len(parts) != 3:
            raise ParseError(f"bad Via {text[:80]!r}")
        name, version = parts[0].strip(" \t"), parts[1].strip(" \t")
        words = parts[2].split(None, 1)
        if (
            len(words) != 2
            or not name
            or not version
            or not TOKEN_CHARS.issuperset(name)
            or not TOKEN_CHARS.issuperset(version)
            or not TOKEN_CHARS.issuperset(words[0])
        ):
            raise ParseError(f"bad Via {text[:80]!r}")
        self.protocol = f"{name}/{version}"
        self.transport = words[0].upper()
        return words[1]

    @classmethod
    def build(
        cls, transport: str, host: str, port: int | None = None, *, branch: str | None = None, **params: Any
    ) -> Via:
        """Make a Via. ``branch=None`` makes a fresh RFC 3261 branch; other keyword arguments become
        parameters (``True`` or None for a flag, e.g. ``rport=True``)."""
        via = cls.__new__(cls)
        via.protocol = "SIP/2.0"
        via.transport = transport.upper()
        via.host = host
        via.port = port
        via.params = {"branch": branch if branch is not None else new_branch()}
        for key, value in params.items():
            via.params[key] = None if value is None or value is True else str(value)
        return via

    def copy(self) -> Via:
        via = Via.__new__(Via)
        via.protocol = self.protocol
        via.transport = self.transport
        via.host = self.host
        via.port = self.port
        via.params = dict(self.params)
        return via

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | bool | None:
        """None when absent, True for a bare ``rport`` (a request to fill it), else the port number."""
        if "rport" not in self.params:
            return None
        value = self.params["rport"]
        if value is None:
            return True
        return int(value) if value.isdigit() and value.isascii() and len(value) <= 5 else None

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def ttl(self) -> int | None:
        value = self.params.get("ttl")
        return int(value) if value is not None and value.isdigit() and value.isascii() else None

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        out = f"{self.protocol}/{self.transport} {self.host}"
        if self.port is not None:
            out += f":{self.port}"
        if self.params:
            out += format_params(self.params)
        return out

    def __repr__(self) -> str:
        return f"Via({str(self)!r})"

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Via):
            return NotImplemented
        return (
            self.protocol.upper() == other.protocol.upper()
            and self.transport == other.transport
            and self.host.lower() == other.host.lower()
            and self.port == other.port
            and self.params == other.params
        )


# --------------------------------------------------------------------------------------------------------
# Authentication headers (RFC 3261 §20.7, §20.27, §20.28, §20.44; RFC 7616)
# --------------------------------------------------------------------------------------------------------


def parse_auth(value: str) -> tuple[str, dict[str, str]]:
    """``Digest realm="a", nonce="b", qop="auth"`` -> ``("Digest", {"realm": "a", ...})``.

    Parameter names are lower-cased, values unquoted. Commas inside quoted values are kept.
    """
    value = value.strip(" \t")
    scheme, _, rest = value.partition(" ")
    if not scheme or not TOKEN_CHARS.issuperset(scheme):
        raise ParseError(f"bad authentication scheme in {value[:80]!r}")
    params: dict[str, str] = {}
    i = 0
    n = len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise ParseError(f"bad authentication parameter in {value[:80]!r}")
        name = rest[i:eq].strip(" \t")
        if not name or not TOKEN_CHARS.issuperset(name):
            raise ParseError(f"bad authentication parameter name in {value[:80]!r}")
        j = eq + 1
        while j < n and rest[j] in " \t":
            j += 1
        if j < n and rest[j] == '"':
            end = _scan_quoted(rest, j)
            params[name.lower()] = unquote(rest[j:end])
            i = end
            while i < n and rest[i] in " \t":
                i += 1
            if i < n and rest[i] != ",":
                raise ParseError(f"junk after quoted value in {value[:80]!r}")
        else:
            comma = rest.find(",", j)
            end = n if comma < 0 else comma
            token = rest[j:end].strip(" \t")
            if not token:
                raise ParseError(f"empty authentication parameter in {value[:80]!r}")
            params[name.lower()] = token
            i = end
    return scheme, params


# Parameters whose value is a token, never quoted (RFC 7616 §3.3, §3.4). ``qop`` is a quoted list in a
# challenge but a bare token in a response (recognised by its ``response`` parameter).
_AUTH_TOKENS = frozenset({"algorithm", "stale", "nc", "userhash", "charset"})


def format_auth(scheme: str, params: dict[str, str]) -> str:
    """The inverse of :func:`parse_auth`: quotes the values RFC 7616 says are quoted-strings."""
    is_response = "response" in params
    parts: list[str] = []
    for name, value in params.items():
        low = name.lower()
        bare = low in _AUTH_TOKENS or (low == "qop" and is_response)
        if bare and value and TOKEN_CHARS.issuperset(value):
            parts.append(f"{name}={value}")
        else:
            parts.append(f"{name}={quote(value)}")
    return f"{scheme} " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------------
# Identifiers and reason phrases
# --------------------------------------------------------------------------------------------------------


def new_branch() -> str:
    """A fresh, globally unique Via branch with the RFC 3261 magic cookie."""
    return BRANCH_COOKIE + secrets.token_hex(8)


def new_tag() -> str:
    """A fresh From/To tag (32 random bits are the RFC's minimum; we use 48)."""
    return secrets.token_hex(6)


def new_call_id(host: str = "") -> str:
    """A fresh Call-ID, ``random@host`` when a host is given."""
    cid = secrets.token_hex(12)
    return f"{cid}@{host}" if host else cid


REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    199: "Early Dialog Terminated",
    200: "OK",
    202: "Accepted",
    204: "No Notification",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    412: "Conditional Request Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    422: "Session Interval Too Small",
    423: "Interval Too Brief",
    429: "Provide Referrer Identity",
    430: "Flow Failed",
    439: "First Hop Lacks Outbound Support",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    494: "Security Agreement Required",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    580: "Precondition Failure",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


def _default_reason(status: int) -> str:
    reason = REASONS.get(status)
    if reason is not None:
        return reason
    return REASONS.get(status - status % 100, "Unknown")


# --------------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what :func:`parse` and :class:`StreamFramer` accept, against memory and CPU exhaustion.

    ``max_size`` is the whole message (headers and body) in bytes; UDP cannot carry more than 65535 anyway.
    """

    max_size: int = 65535
    max_headers: int = 256
    max_line: int = 8192


DEFAULT_LIMITS = Limits()
_NO_LIMITS = Limits(max_size=1 << 62, max_headers=1 << 62, max_line=1 << 62)

# --------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------

_Header = tuple[str, str, str]  # (lookup key, display name, value)

_MISSING = object()


class Message:
    """What requests and responses share: an ordered header list and a body.

    Headers are ``(key, name, value)`` triples; ``key`` is the lower-case canonical name used for lookups,
    ``name`` the canonical spelling written out. Structured views are computed on first access and cached
    in ``_cache`` until the header is changed through this class's methods.
    """

    __slots__ = ("_body", "_cache", "_headers")

    _headers: list[_Header]
    _cache: dict[str, Any]
    _body: bytes

    def __init__(self, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> None:
        self._headers = []
        self._cache = {}
        self._body = bytes(body)
        for name, value in headers:
            self.add(name, value)

    # -- raw header access --------------------------------------------------------------------------------

    def get(self, name: str) -> str | None:
        """The first value of a header (any spelling, compact forms too), or None. For list headers such as
        Via or Contact this is the first element of the first header line."""
        entry = _NAMES.get(name)  # every name the stack itself asks for: skip _name_entry's call
        key = entry[0] if entry is not None else _name_entry(name)[0]
        for k, _, value in self._headers:
            if k == key:
                if key in _LIST_HEADERS and "," in value:
                    items = split_list(value)
                    return items[0] if items else value
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, in order; list headers (Via, Contact, Route, ...) are split at commas
        outside quotes and ``<>``. Authentication headers, Date and unknown headers are never split."""
        key = _name_entry(name)[0]
        values = [value for k, _, value in self._headers if k == key]
        if key in _LIST_HEADERS:
            out: list[str] = []
            for value in values:
                if "," in value:
                    out.extend(split_list(value))
                elif value:
                    out.append(value)
            return out
        return values

    def set(self, name: str, value: str | list[str]) -> None:
        """Replace every line of a header by ``value`` (a list gives one line per item), keeping its place."""
        key, display = _name_entry(name)
        values = [value] if isinstance(value, str) else list(value)
        new = [(key, display, _check_value(v)) for v in values]
        headers = self._headers
        for i, h in enumerate(headers):
            if h[0] == key:
                if len(new) == 1 and all(x[0] != key for x in headers[i + 1 :]):
                    headers[i] = new[0]  # the usual single line (Max-Forwards): no new list
                else:
                    rest = [x for x in headers[i + 1 :] if x[0] != key]
                    self._headers = headers[:i] + new + rest
                break
        else:
            headers.extend(new)
        self._invalidate(key)

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Add a header line: at the top of the message with ``first=True`` (what a proxy does with Via and
        Record-Route), else right after the last line of the same header, else at the end."""
        key, display = _name_entry(name)
        header = (key, display, _check_value(value))
        headers = self._headers
        if first:
            headers.insert(0, header)
        else:
            for i in range(len(headers) - 1, -1, -1):
                if headers[i][0] == key:
                    headers.insert(i + 1, header)
                    break
            else:
                headers.append(header)
        self._invalidate(key)

    def remove(self, name: str) -> int:
        """Remove every line of a header; returns how many there were."""
        key = _name_entry(name)[0]
        before = len(self._headers)
        self._headers = [h for h in self._headers if h[0] != key]
        self._invalidate(key)
        return before - len(self._headers)

    def remove_first(self, name: str) -> str | None:
        """Remove the first *value* of a header (for ``Via: a, b`` only ``a``) and return it; a proxy uses
        this to pop its own Via from a response or the top Route."""
        entry = _NAMES.get(name)
        key = entry[0] if entry is not None else _name_entry(name)[0]
        headers = self._headers
        for i, h in enumerate(headers):
            if h[0] == key:
                value = h[2]
                if "," in value and key in _LIST_HEADERS:
                    items = split_list(value)
                    if len(items) > 1:
                        headers[i] = (key, h[1], ", ".join(items[1:]))
                    else:
                        del headers[i]
                    value = items[0] if items else value
                else:  # one value on the line (a proxy's own Via, a Route): no list to split
                    del headers[i]
                if self._cache:
                    self._invalidate(key)
                return value
        return None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            key = _name_entry(name)[0]
        except ParseError:
            return False
        return any(h[0] == key for h in self._headers)

    def items(self) -> list[tuple[str, str]]:
        """Every header line as (canonical name, value), in order."""
        return [(name, value) for _, name, value in self._headers]

    def size_bound(self) -> int:
        """An upper bound of ``len(bytes(self))`` that costs no serialization (the start line is taken as
        at most 200 characters, every header line and the body are counted), so that a sender checks the
        §18.1.1 UDP size limit with it and serializes only messages near that limit to measure them."""
        headers = self._headers
        return 200 + len(self._body) + 4 * len(headers) + sum([len(h[1]) + len(h[2]) for h in headers])

    def push_via(self, via: Via) -> None:
        """Put ``via`` on top of the Via list (a UAC or proxy sending the request) and keep the object as
        the parsed top Via, so the transaction layer, which reads it next, does not parse it again."""
        self._headers.insert(0, ("via", "Via", _check_value(str(via))))
        self._invalidate("via")
        self._cache["top-via"] = via

    def set_top_via(self, via: Via) -> None:
        """Replace the first Via value by ``via`` (a transport adding ``received``/``rport``) and keep the
        object as the parsed top Via, as :meth:`push_via` does."""
        header = ("via", "Via", _check_value(str(via)))
        headers = self._headers
        if headers and headers[0][0] == "via" and "," not in headers[0][2]:
            headers[0] = header  # the usual case, a lone top Via on the first line: replaced in place
        else:
            self.remove_first("Via")
            headers.insert(0, header)
        self._invalidate("via")
        self._cache["top-via"] = via

    def forget_views(self) -> None:
        """Drop the parsed views (Via, From, To, CSeq, ...); they are parsed again on the next access.

        Why: a stateful element keeps each message of a finished transaction for up to 32 s (RFC 6026's
        Timer L/M, Timer J), only to absorb retransmissions. With its views a parsed request is about ten
        objects the cyclic garbage collector must walk on every pass; without them it is three. A busy
        proxy's collector pauses — its tail latency — shrink in proportion."""
        if self._cache:
            self._cache = {}

    def _invalidate(self, key: str) -> None:
        if self._cache:
            self._cache.pop(key, None)
            if key == "via":
                self._cache.pop("top-via", None)

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        """Setting the body also updates an existing Content-Length header."""
        self._body = bytes(value)
        for i, h in enumerate(self._headers):
            if h[0] == "content-length":
                self._headers[i] = (h[0], h[1], str(len(self._body)))

    # -- structured views ---------------------------------------------------------------------------------

    def _required(self, key: str) -> str:
        for k, _, value in self._headers:
            if k == key:
                return value
        raise ParseError(f"missing {_NAMES[key][1]} header")

    @property
    def via(self) -> list[Via]:
        """Every Via value, top first."""
        cached = self._cache.get("via")
        if cached is None:
            cached = [Via(v) for v in self.get_all("via")]
            self._cache["via"] = cached
        return list(cached)

    @property
    def top_via(self) -> Via | None:
        cached = self._cache.get("top-via", _MISSING)
        if cached is _MISSING:
            first = self.get("via")
            cached = Via(first) if first is not None else None
            self._cache["top-via"] = cached
        return cached  # type: ignore[no-any-return]

    @property
    def from_(self) -> Address:
        cached = self._cache.get("from")
        if cached.__class__ is not Address:  # not parsed yet, or only vetted by parse() (a tuple)
            check = cached if cached is not None else check_address(self._required("from"))
            cached = self._cache["from"] = check if isinstance(check, Address) else Address.from_check(check)
        return cached

    @property
    def to(self) -> Address:
        cached = self._cache.get("to")
        if cached.__class__ is not Address:
            check = cached if cached is not None else check_address(self._required("to"))
            cached = self._cache["to"] = check if isinstance(check, Address) else Address.from_check(check)
        return cached

    @property
    def call_id(self) -> str:
        cached = self._cache.get("call-id")
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        value = self._required("call-id")
        if not value or " " in value or not value.isprintable() or not value.isascii():
            raise ParseError(f"bad Call-ID {value[:80]!r}")
        self._cache["call-id"] = value
        return value

    @property
    def cseq(self) -> CSeq:
        cached = self._cache.get("cseq")
        if cached is None:
            cached = self._cache["cseq"] = _parse_cseq(self._required("cseq"))
        return cached

    @property
    def max_forwards(self) -> int | None:
        value = self.get("max-forwards")
        if value is None:
            return None
        if not value.isdigit() or not value.isascii() or len(value) > 10 or int(value) > 255:
            raise ParseError(f"bad Max-Forwards {value[:80]!r}")
        return int(value)

    def _addresses(self, key: str) -> list[Address]:
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = [Address(v) for v in self.get_all(key)]
        return list(cached)

    @property
    def contacts(self) -> list[Address]:
        """Every Contact (the wildcard ``*`` is an Address with ``wildcard=True``)."""
        return self._addresses("contact")

    @property
    def route(self) -> list[Address]:
        return self._addresses("route")

    @property
    def record_route(self) -> list[Address]:
        return self._addresses("record-route")

    @property
    def content_type(self) -> str | None:
        """The media type, lower-case, without parameters (``application/sdp``)."""
        value = self.get("content-type")
        if value is None:
            return None
        return value.partition(";")[0].strip(" \t").lower()

    @property
    def content_length(self) -> int:
        return len(self._body)

    @property
    def expires(self) -> int | None:
        value = self.get("expires")
        if value is None:
            return None
        if not value.isdigit() or not value.isascii():
            raise ParseError(f"bad Expires {value[:80]!r}")
        return int(value)

    def tokens(self, name: str) -> frozenset[str]:
        """The option tags / methods of Require, Supported, Allow, Proxy-Require, Unsupported (lower-case)."""
        return frozenset(v.lower() for v in self.get_all(name))

    @property
    def allow(self) -> frozenset[str]:
        """The methods of Allow (method names are case-sensitive, so kept as written)."""
        return frozenset(self.get_all("allow"))

    @property
    def supported(self) -> frozenset[str]:
        """The option tags of Supported, lower-case."""
        return self.tokens("supported")

    @property
    def require(self) -> frozenset[str]:
        """The option tags of Require, lower-case."""
        return self.tokens("require")

    @property
    def proxy_require(self) -> frozenset[str]:
        """The option tags of Proxy-Require, lower-case."""
        return self.tokens("proxy-require")

    def auth(self, name: str) -> list[tuple[str, dict[str, str]]]:
        """Each WWW-Authenticate / Authorization / Proxy-* value as (scheme, parameters)."""
        return [parse_auth(v) for v in self.get_all(name)]

    def validate(self) -> None:
        """Parse every structured header now (raises :class:`ParseError` on the first bad one)."""
        _ = self.via, self.from_, self.to, self.call_id, self.cseq, self.max_forwards, self.expires
        _ = self.contacts, self.route, self.record_route

    # -- copying and serializing --------------------------------------------------------------------------

    def _copy_into(self, other: Message) -> None:
        other._headers = list(self._headers)
        other._cache = {}
        other._body = self._body

    def _start_line(self) -> str:
        raise NotImplementedError

    def __bytes__(self) -> bytes:
        """The message on the wire. Content-Length is always written, last, and always matches the body
        (it is mandatory on streams and harmless on datagrams)."""
        body = self._body
        lines = [f"{name}: {value}\r\n" for key, name, value in self._headers if key != "content-length"]
        return f"{self._start_line()}\r\n{''.join(lines)}Content-Length: {len(body)}\r\n\r\n".encode() + body

    def __str__(self) -> str:
        return bytes(self).decode(errors="replace")

    __hash__ = None  # type: ignore[assignment]

    def _same_headers(self, other: Message) -> bool:
        mine = [(k, v) for k, _, v in self._headers if k != "content-length"]
        theirs = [(k, v) for k, _, v in other._headers if k != "content-length"]
        return mine == theirs and self._body == other._body


def _check_value(value: str) -> str:
    """Header values set by code must not smuggle line breaks into the message."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"line break in header value {value[:80]!r}")
    return value.strip(" \t")


class Request(Message):
    """A SIP request. ``method`` is case-sensitive (RFC 3261 §7.1); ``uri`` is the Request-URI."""

    __slots__ = ("method", "uri")

    method: str
    uri: URI

    def __init__(
        self,
        method: str,
        uri: URI | str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        if not method or not TOKEN_CHARS.issuperset(method):
            raise ValueError(f"bad method {method!r}")
        super().__init__(headers, body)
        self.method = method
        self.uri = URI(uri) if isinstance(uri, str) else uri

    @classmethod
    def create(
        cls,
        method: str,
        uri: URI | str,
        *,
        from_: Address | str,
        to: Address | str,
        call_id: str | None = None,
        cseq: int = 1,
        via: Via | str | None = None,
        max_forwards: int = 70,
        contact: Address | str | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Request:
        """A new request as a UAC sends it (§8.1.1). A From without a tag gets a fresh one, as §8.1.1.3
        requires; ``call_id=None`` makes a fresh Call-ID. Without ``via`` no Via is added (the transport
        adds its own)."""
        req = cls(method, uri)
        from_addr = Address(from_) if isinstance(from_, str) else from_
        from_text = str(from_addr)
        if from_addr.tag is None:
            from_text += f";tag={new_tag()}"
        hdrs = req._headers
        if via is not None:
            hdrs.append(("via", "Via", str(via)))
        hdrs.append(("max-forwards", "Max-Forwards", str(max_forwards)))
        hdrs.append(("from", "From", from_text))
        hdrs.append(("to", "To", str(to)))
        hdrs.append(("call-id", "Call-ID", call_id if call_id is not None else new_call_id()))
        hdrs.append(("cseq", "CSeq", f"{cseq} {method}"))
        if contact is not None:
            hdrs.append(("contact", "Contact", str(contact)))
        for name, value in headers:
            req.add(name, value)
        if content_type is not None:
            req.set("Content-Type", content_type)
        req._body = bytes(body)
        req.set("Content-Length", str(len(req._body)))
        return req

    def _start_line(self) -> str:
        return f"{self.method} {self.uri} SIP/2.0"

    def copy(self, *, uri: URI | None = None) -> Request:
        """An independent copy: headers, body and Request-URI (views are re-parsed on access).

        ``uri`` becomes the copy's Request-URI (taken as is, not copied): what a proxy does for each
        branch (§16.6 steps 1-2), without first copying the Request-URI it replaces."""
        req = Request.__new__(Request)
        self._copy_into(req)
        req.method = self.method
        req.uri = self.uri.copy() if uri is None else uri
        return req

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"

    def __eq__(self, other: object) -> bool:
        """Same method, Request-URI (§19.1.4), header lines (Content-Length aside) and body."""
        if not isinstance(other, Request):
            return NotImplemented
        return self.method == other.method and self.uri == other.uri and self._same_headers(other)


class Response(Message):
    """A SIP response: ``status`` (100-699) and ``reason`` phrase."""

    __slots__ = ("local", "reason", "status")

    status: int
    reason: str
    local: bool
    """True for a response made here (constructed, :meth:`for_request`), False for one parsed off the wire
    (a response a proxy forwards): the transport stamps only local ones with its ``Server`` header."""

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        if not 100 <= status <= 699:
            raise ValueError(f"status {status} out of range 100-699")
        super().__init__(headers, body)
        self.status = status
        self.reason = _default_reason(status) if reason is None else reason
        self.local = True

    @classmethod
    def for_request(
        cls, req: Request, status: int, reason: str | None = None, *, to_tag: str | None = None
    ) -> Response:
        """The response to ``req`` as §8.2.6 builds it: every Via (in order), From, To, Call-ID and CSeq
        copied; a To tag added (``to_tag`` or a fresh one) when the status is above 100 and To has none;
        Timestamp copied into a 100 (§8.2.6.1)."""
        resp = cls(status, reason)
        hdrs = resp._headers
        seen = set()  # a request refused for duplicates must still get a well-formed answer
        for h in req._headers:
            key = h[0]
            if key == "via":
                hdrs.append(h)
            elif key in seen:
                continue
            elif key == "from" or key == "call-id" or key == "cseq":
                seen.add(key)
                hdrs.append(h)
            elif key == "to":
                seen.add(key)
                if status > 100 and req.to.tag is None:
                    hdrs.append((key, h[1], f"{h[2]};tag={to_tag or new_tag()}"))
                else:
                    hdrs.append(h)
            elif key == "timestamp" and status == 100:
                hdrs.append(h)
        hdrs.append(("content-length", "Content-Length", "0"))
        return resp

    @classmethod
    def for_error(cls, req: Request, exc: BaseException) -> Response:
        """The answer to ``req`` when handling it raised ``exc``: for a :class:`SIPStatusError` (a
        :class:`ParseError` included) its final status, reason phrase with the detail in parentheses, and
        headers; for anything else a plain ``500`` — an exception's text may name files and lines, which
        stay in the local log."""
        if not isinstance(exc, SIPStatusError) or not 200 <= exc.status < 700:
            return cls.for_request(req, 500)
        response = cls.for_request(req, exc.status, exc.reason)
        detail = " ".join(exc.detail.split())[:120] if exc.detail else ""
        if detail:
            response.reason = f"{response.reason} ({detail})"
        for name, value in exc.headers:
            response.add(name, value)
        return response

    def _start_line(self) -> str:
        return f"SIP/2.0 {self.status} {self.reason}"

    def copy(self) -> Response:
        resp = Response.__new__(Response)
        self._copy_into(resp)
        resp.status = self.status
        resp.reason = self.reason
        resp.local = self.local
        return resp

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Response):
            return NotImplemented
        return self.status == other.status and self.reason == other.reason and self._same_headers(other)


# --------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------

_MANDATORY = frozenset({"via", "from", "to", "call-id", "cseq"})


def _no_colon(line: str) -> bool:
    raise ParseError(f"header line without a colon: {line[:80]!r}")


def parse(data: bytes, *, datagram: bool = True, limits: Limits | None = None) -> Request | Response:
    """Parse one SIP message.

    ``datagram=True`` (UDP) applies §18.3: a body longer than Content-Length is cut, a shorter one is an
    error, a missing Content-Length means "the rest of the datagram". With ``datagram=False`` (a message
    cut out of a stream by :class:`StreamFramer`) the body must be exactly Content-Length long.

    Raises :class:`ParseError` (and nothing else) for anything that is not a valid SIP message; its
    ``partial`` is a :class:`Request` usable to build a 400 when enough could be read.
    """
    lim = DEFAULT_LIMITS if limits is None else limits
    if len(data) > lim.max_size:
        raise ParseError(
            f"message of {len(data)} bytes exceeds the limit of {lim.max_size}",
            status=513,
            partial=answerable_head(data, lim),
        )
    start = 0
    while data.startswith(b"\r\n", start):  # CRLFs before the start line are ignored (§7.5)
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise ParseError("no empty line after the headers (truncated message?)")
    try:
        text = data[start:end].decode()
    except UnicodeDecodeError as exc:
        raise ParseError(f"header bytes are not UTF-8 (at byte {start + exc.start})") from None
    body = data[end + 4 :]
    lines = text.split("\r\n")
    nlines = len(lines) - 1
    if text.count("\n") != nlines or text.count("\r") != nlines:
        raise ParseError("bare CR or LF in the header block")
    if "\x00" in text:
        _check_nul(text)
    if "\r\n " in text or "\r\n\t" in text:
        lines = _unfold(lines)
        nlines = len(lines) - 1
    if nlines > lim.max_headers:
        raise ParseError(
            f"more than {lim.max_headers} header lines", status=513, partial=answerable_head(data, lim)
        )
    if len(text) > lim.max_line and max(map(len, lines)) > lim.max_line:
        raise ParseError(
            f"header line longer than {lim.max_line} bytes",
            status=513,
            partial=answerable_head(data, lim),
        )

    msg: Request | Response
    first = lines[0]
    if first.startswith("SIP/"):
        version, _, rest = first.partition(" ")
        code, _, reason = rest.partition(" ")
        if version != "SIP/2.0" and version.upper() != "SIP/2.0":
            raise ParseError(f"unsupported SIP version {version[:20]!r}", status=505)
        if len(code) != 3 or not code.isdigit() or not code.isascii() or code[0] == "0":
            raise ParseError(f"bad status line {first[:80]!r}")
        resp = Response.__new__(Response)
        resp.status = int(code)
        resp.reason = reason
        resp.local = False
        msg = resp
        request = None
    else:
        parts = first.split(" ")
        if len(parts) != 3:
            raise ParseError(f"bad request line {first[:80]!r}")
        method, uri_text, version = parts
        if version != "SIP/2.0" and version.upper() != "SIP/2.0":
            if version.upper().startswith("SIP/"):
                raise ParseError(f"unsupported SIP version {version[:20]!r}", status=505)
            raise ParseError(f"bad request line {first[:80]!r}")
        if method not in _METHODS and (not method or not TOKEN_CHARS.issuperset(method)):
            raise ParseError(f"bad method in request line {first[:80]!r}")
        request = Request.__new__(Request)
        request.method = method
        msg = request
    # One list comprehension over the header lines: the fastest way CPython offers to do the same small
    # thing a dozen times. Known names resolve with one dict lookup; a line without a colon stops it.
    names = _NAMES
    entry_of = _name_entry
    headers: list[_Header] = [
        (e[0], e[1], v.strip(" \t"))
        for line in lines[1:]
        for n, sep, v in [line.partition(":")]
        if sep or _no_colon(n)
        for e in [names.get(n) or entry_of(n)]
    ]
    msg._headers = headers
    msg._body = b""
    firsts = {h[0]: h[2] for h in reversed(headers)}  # the first value of every header

    # What every transaction needs; a missing one means the message cannot even be answered.
    if not firsts.keys() >= _MANDATORY:
        missing = next(key for key in ("via", "from", "to", "call-id", "cseq") if key not in firsts)
        raise ParseError(f"missing {names[missing][1]} header")
    via = firsts["via"]
    cseq = _parse_cseq(firsts["cseq"])
    msg._cache = {
        "top-via": Via._first_of(via) if "," in via else Via(via),
        # From and To are validated now but built on first access (see check_address).
        "from": check_address(firsts["from"]),
        "to": check_address(firsts["to"]),
        "cseq": cseq,
        "call-id": firsts["call-id"],
    }
    call_id = firsts["call-id"]
    if not call_id or " " in call_id or not call_id.isprintable() or not call_id.isascii():
        raise ParseError(f"bad Call-ID {call_id[:80]!r}")
    partial = request
    if request is not None:
        try:
            request.uri = URI(uri_text)
        except ParseError as exc:
            request.uri = _placeholder_uri(uri_text)
            raise ParseError(f"bad Request-URI: {exc}", partial=partial) from None
        if cseq.method != request.method:
            raise ParseError(f"CSeq method {cseq.method} does not match {request.method}", partial=partial)
    if len(firsts) < len(headers):  # a header appears twice: fine for Via, Route..., not for CSeq...
        _check_singletons(headers, firsts, partial)

    # Framing, §18.3.
    clen = firsts.get("content-length")
    if clen is not None:
        if not clen.isdigit() or not clen.isascii() or len(clen) > 9:
            raise ParseError(f"bad Content-Length {clen[:20]!r}", partial=partial)
        length = int(clen)
        if length < len(body):
            if not datagram:
                raise ParseError("more bytes than Content-Length in a framed message", partial=partial)
            body = body[:length]
        elif length > len(body):
            raise ParseError(f"body is {len(body)} bytes but Content-Length says {length}", partial=partial)
    elif not datagram:
        raise ParseError("Content-Length is mandatory on a stream", partial=partial)
    msg._body = body
    return msg


def answerable_head(data: bytes | bytearray, limits: Limits | None = None) -> Request | None:
    """The request an oversized message starts with, as far as it can be answered, or None.

    A message over a limit (too big, too many header lines, a line too long, no end of headers within
    the size limit) is still answered (513 or 400, §21.5.14) when its start line and the headers a
    response copies (Via, From, To, Call-ID, CSeq) can be read from its head: this reads at most
    ``max_size`` bytes, keeps the first ``max_headers`` complete lines that fit ``max_line``, drops
    Content-Length and the body, and parses that. Responses (which are never answered) give None.
    """
    lim = DEFAULT_LIMITS if limits is None else limits
    head = bytes(data[: lim.max_size])
    end = head.find(b"\r\n\r\n")
    head = head[:end] if end >= 0 else head[: head.rfind(b"\r\n")]
    if head.startswith(b"SIP/") or not head:
        return None
    kept: list[bytes] = []
    for line in head.split(b"\r\n")[: lim.max_headers + 1]:
        if len(line) > lim.max_line:
            continue
        name = line.partition(b":")[0].strip(b" \t").lower()
        if kept and name in (b"content-length", b"l"):
            continue
        kept.append(line)
    try:
        # No limits here: the head is already bounded by ``max_size`` (and a limit hit again would recurse).
        msg = parse(b"\r\n".join(kept) + b"\r\n\r\n", datagram=True, limits=_NO_LIMITS)
    except ParseError as exc:
        return exc.partial if isinstance(exc.partial, Request) else None
    return msg if isinstance(msg, Request) else None


def _placeholder_uri(text: str) -> URI:
    """Stands in for an unparseable Request-URI in ``ParseError.partial`` (only used to answer 400)."""
    uri = URI.build(scheme="invalid")
    uri.opaque = text
    return uri


# Headers that may appear at most once (RFC 3261 §7.3.1, §20: not defined as comma-separated lists).
_SINGLETONS = frozenset({"from", "to", "call-id", "cseq", "max-forwards", "content-length", "content-type"})


def _check_singletons(headers: list[_Header], firsts: dict[str, str], partial: Request | None) -> None:
    # Most messages with repeated headers (several Via or Record-Route lines) have no repeated singleton:
    # one list comprehension tells so, faster than the loop below.
    singles = _SINGLETONS
    if len([key for key, _, _ in headers if key in singles]) == len(singles & firsts.keys()):
        return
    seen: set[str] = set()
    for key, name, _ in headers:
        if key in _SINGLETONS:
            if key in seen:
                raise ParseError(f"more than one {name} header", partial=partial)
            seen.add(key)


def _check_nul(text: str) -> None:
    """A NUL byte is only legal escaped in a quoted string (quoted-pair, RFC 3261 §25.1); anywhere else it
    is an attack on C-string based peers that we would forward."""
    i = text.find("\x00")
    while i >= 0:
        if i == 0 or text[i - 1] != "\\":
            raise ParseError("NUL byte in the header block")
        i = text.find("\x00", i + 1)


def _unfold(lines: list[str]) -> list[str]:
    """Join continuation lines (starting with SP or HTAB) to the header they continue (§7.3.1)."""
    out: list[str] = []
    for line in lines:
        if line and (line[0] == " " or line[0] == "\t") and out:
            if len(out) == 1:
                raise ParseError("continuation line after the start line")
            out[-1] = out[-1].rstrip(" \t") + " " + line.strip(" \t")
        else:
            out.append(line)
    return out


# --------------------------------------------------------------------------------------------------------
# Stream framing (TCP/TLS)
# --------------------------------------------------------------------------------------------------------


class StreamFramer:
    """Cuts whole messages out of a TCP/TLS byte stream (RFC 3261 §18.3: Content-Length is mandatory).

    ``feed(data)`` returns the complete messages found so far (as bytes for :func:`parse` with
    ``datagram=False``); the rest waits in the buffer. CRLFs between messages (RFC 5626 keep-alives) are
    skipped; ``keepalives`` counts the double-CRLF pings seen so the transport can answer with a CRLF pong.
    A ParseError means the stream is beyond repair: answer what can be answered (its ``partial`` is the
    head of the bad message, see :func:`answerable_head`) and close the connection. When messages were
    framed before the bad bytes in the same ``feed``, they are returned and the error is left in
    :attr:`error` instead (and raised by the next ``feed``): a valid message is never lost with the
    garbage after it.
    """

    __slots__ = ("_buf", "_limits", "error", "keepalives")

    def __init__(self, limits: Limits | None = None) -> None:
        self._buf = bytearray()
        self._limits = DEFAULT_LIMITS if limits is None else limits
        self.keepalives = 0
        self.error: ParseError | None = None

    @property
    def buffered(self) -> int:
        """Bytes waiting for the rest of their message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            raise self.error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        max_size = self._limits.max_size
        while buf:
            skip = 0
            while buf.startswith(b"\r\n", skip):
                skip += 2
            if skip:
                self.keepalives += skip // 4
                del buf[:skip]
                if not buf:
                    break
            if len(buf) == 1 and buf[0] == 13:
                break  # half a CRLF
            end = buf.find(b"\r\n\r\n")
            try:
                if end < 0:
                    if len(buf) > max_size:
                        raise ParseError("header block exceeds the size limit", status=513)
                    break
                length = _content_length(bytes(buf[:end]))
                total = end + 4 + length
                if total > max_size:
                    raise ParseError(
                        f"message of {total} bytes exceeds the limit of {max_size}", status=513
                    )
            except ParseError as exc:
                # The stream cannot be framed any further. Keep the head of the bad message (so the
                # caller can answer it) and what was framed before it (so it is delivered, not lost).
                exc.partial = answerable_head(buf, self._limits)
                self.error = exc
                buf.clear()
                if not out:
                    raise
                break
            if len(buf) < total:
                break
            out.append(bytes(buf[:total]))
            del buf[:total]
        return out


def _content_length(head: bytes) -> int:
    found: int | None = None
    text = head.decode("latin-1")
    for line in text.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip(" \t").lower() in ("content-length", "l"):
            value = value.strip(" \t")
            if not value.isdigit() or not value.isascii() or len(value) > 9:
                raise ParseError(f"bad Content-Length {value[:20]!r}")
            if found is not None and int(value) != found:
                raise ParseError("conflicting Content-Length headers")
            found = int(value)
    if found is None:
        raise ParseError("Content-Length is mandatory on a stream")
    return found
