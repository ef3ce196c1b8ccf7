"""SIP, SIPS and tel URIs and name-addr / addr-spec addresses (RFC 3261 §19.1, §20.10, §25; RFC 3966).

Why this module looks the way it does:

- Attributes hold the URI's text *as written* (escapes included). RFC 3261 §19.1.4 makes ``%3B`` and ``;``
  different in a user part but ``%61`` and ``a`` the same, so decoding on parse would lose information; we
  only normalise when comparing (``==``) and when building the AOR key (:meth:`URI.aor`).
- Parsing uses ``str`` methods, not one big regular expression: it runs once per header on the hot path of
  every message, and ``partition``/``find`` are several times faster than a regex that handles every case.
- Unknown schemes are kept opaque (``scheme`` + ``opaque``) so that a message carrying, say, a ``urn:`` or
  ``mailto:`` URI is forwarded unchanged rather than rejected.
- URIs are mutable and therefore not hashable: use :meth:`URI.aor` (a string) as a dictionary key.
"""

from __future__ import annotations

import re
from typing import Any

from p2psip.address import split_wire_hostport
from p2psip.errors import ParseError

__all__ = [
    "TOKEN_CHARS",
    "URI",
    "Address",
    "AddressCheck",
    "check_address",
    "format_params",
    "parse_params",
    "quote",
    "unquote",
]

_ALPHA = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DIGIT = "0123456789"
#: RFC 3261 ``token`` characters.
TOKEN_CHARS = frozenset(_ALPHA + _DIGIT + "-.!%*_+`'~")
_SCHEME_CHARS = frozenset(_ALPHA + _DIGIT + "+-.")
_HEX = frozenset("0123456789abcdefABCDEF")
# unreserved / escaped / user-unreserved, plus "%" for escapes (RFC 3261 §25.1).
_USER_CHARS = frozenset(_ALPHA + _DIGIT + "-_.!~*'()%&=+$,;?/")
_PASSWORD_CHARS = frozenset(_ALPHA + _DIGIT + "-_.!~*'()%&=+$,")
_USERINFO_CHARS = _USER_CHARS | {":"}
# paramchar = param-unreserved / unreserved / escaped
_PARAM_CHARS = frozenset(_ALPHA + _DIGIT + "-_.!~*'()%[]/:&+$")
# hnv-unreserved / unreserved / escaped
_HEADER_CHARS = frozenset(_ALPHA + _DIGIT + "-_.!~*'()%[]/?:+$")
_RESERVED = frozenset(";/?:@&=+$,")
# Characters the "%" encoding of which is NOT equivalent to the character (§19.1.4: the reserved set), plus
# "%" itself and characters that could never appear unescaped.
_KEEP_ESCAPED = frozenset(';/?:@&=+$,%"<> #[]\\^`{|}')
# uri-parameters that make two URIs different when present in only one of them (§19.1.4 rules and its
# examples, which also treat a lone transport parameter as a difference).
_STRICT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def _bad(what: str, text: str) -> ParseError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return ParseError(f"{what}: {shown!r}")


def _check_escapes(text: str, what: str) -> None:
    """Reject a ``%`` that is not followed by two hex digits."""
    i = text.find("%")
    while i >= 0:
        pair = text[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise _bad(f"bad escape in {what}", text)
        i = text.find("%", i + 3)


def _normalize_escapes(text: str) -> str:
    """Decode escapes whose character is not reserved (§19.1.4: they are equivalent); upper-case the rest."""
    if "%" not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "%" and i + 2 < n:
            pair = text[i + 1 : i + 3]
            if len(pair) == 2 and pair[0] in _HEX and pair[1] in _HEX:
                ch = chr(int(pair, 16))
                if ch in _KEEP_ESCAPED or ord(ch) < 0x21 or ord(ch) > 0x7E:
                    out.append("%" + pair.upper())
                else:
                    out.append(ch)
                i += 3
                continue
        out.append(c)
        i += 1
    return "".join(out)


_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
_PCHARS = _UNRESERVED + r"\[\]/:&+$"  # paramchar without escapes
# The usual SIP URI (no escapes, password or headers), five groups: scheme, user, host, port, params. It
# holds no "<" or ">", so _FAST_ADDRESS embeds it between them.
# Possessive quantifiers (``++``, ``*+``): no character class here holds the character that ends its run,
# so giving characters back could never lead to a match, and sre need not keep the means to (~1,500 fewer
# CPU instructions per match, callgrind). Neither could a user part that no "@" follows.
_SIP_URI_RE = (
    r"(sips?):(?:([" + _UNRESERVED + r"&=+$,;?/]++)@)?([A-Za-z0-9][A-Za-z0-9.\-]*+)(?::([0-9]{1,5}+))?"
    r"((?:;[" + _PCHARS + r"]++(?:=[" + _PCHARS + r"]++)?)*+)"
)
_FAST_SIP_URI = re.compile(_SIP_URI_RE).fullmatch


# Texts of URIs that took the fast path, and their match groups: the same Request-URIs, Contacts and
# Routes come back in message after message; see _VETTED below for why this is worth it and safe.
_UriGroups = tuple[Any, ...]  # the groups of a _FAST_SIP_URI match: scheme, user, host, port, params
_VETTED_URIS: dict[str, _UriGroups] = {}
_VETTED_MAX = 4096


def _fast_params(text: str) -> dict[str, str | None]:
    """Parameters already validated by a regular expression: ``;a=1;b`` -> {"a": "1", "b": None}."""
    if text.count(";") == 1:  # the usual single parameter (";tag=...")
        name, _, value = text[1:].partition("=")
        return {name.lower(): value or None}
    params: dict[str, str | None] = {}
    for item in text[1:].split(";"):
        name, _, value = item.partition("=")
        params[name.lower()] = value or None
    return params


def _parse_uri_params(text: str, whole: str) -> dict[str, str | None]:
    if "%" in text:
        _check_escapes(text, "URI parameters")
    params: dict[str, str | None] = {}
    for item in text.split(";"):
        name, sep, value = item.partition("=")
        if not name:
            raise _bad("empty URI parameter", whole)
        if not _PARAM_CHARS.issuperset(name) or (sep and not _PARAM_CHARS.issuperset(value)):
            raise _bad("bad character in URI parameter", whole)
        if sep and not value:
            raise _bad("URI parameter with '=' but no value", whole)
        params[name.lower()] = value if sep else None
    return params


def _parse_uri_headers(text: str, whole: str) -> dict[str, str]:
    if "%" in text:
        _check_escapes(text, "URI headers")
    headers: dict[str, str] = {}
    for item in text.split("&"):
        name, sep, value = item.partition("=")
        if not name or not sep:
            raise _bad("bad URI header", whole)
        if not _HEADER_CHARS.issuperset(name) or not _HEADER_CHARS.issuperset(value):
            raise _bad("bad character in URI header", whole)
        headers[name] = value
    return headers


class URI:
    """A parsed URI. ``URI("sip:alice@example.com;transport=tcp")``; see :meth:`build` to make one."""

    __slots__ = ("headers", "host", "opaque", "params", "password", "port", "scheme", "user")

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None
    params: dict[str, str | None]
    headers: dict[str, str]
    opaque: str | None

    def __init__(self, text: str | None, groups: _UriGroups | None = None) -> None:
        """``URI(text)`` parses ``text``; ``URI(None, groups)`` is the URI of vetted ``_FAST_SIP_URI`` match
        groups (see :func:`check_address`), and ``URI(None)`` an empty one for :meth:`build` and :meth:`copy`
        to fill in: the one way to skip parsing that both CPython and mypyc (the optional compiled build)
        accept."""
        # The hot path of every message (Request-URI, From, To, Contact ...). The common shape
        # (sip:user@host:port;params, no escapes, no password, no headers) is recognised by one compiled
        # regular expression, whose groups need no further checks (and are kept for the next
        # time the same text comes, _VETTED_URIS); anything else takes the general path, which accepts every
        # valid URI and explains what is wrong with an invalid one.
        if groups is None:
            if text is None:
                return
            groups = _VETTED_URIS.get(text)
            if groups is None:
                m = _FAST_SIP_URI(text)
                if m is None:
                    self._parse_general(text)
                    return
                groups = m.groups()
                if ".." in groups[2]:
                    self._parse_general(text)
                    return
                port = groups[3]
                if port is not None and int(port) > 65535:
                    raise _bad("port out of range", text)
                if len(_VETTED_URIS) >= _VETTED_MAX:
                    _VETTED_URIS.clear()
                _VETTED_URIS[text] = groups
        # The groups of a vetted match (no ``..`` in the host, port in range) need no further checks.
        self.scheme, self.user, self.host, port, params = groups
        self.password = None
        self.port = None if port is None else int(port)
        self.params = _fast_params(params) if params else {}
        self.headers = {}
        self.opaque = None

    def _parse_general(self, text: str) -> None:
        scheme, sep, rest = text.partition(":")
        if scheme != "sip":
            scheme = scheme.lower()
            if scheme != "sips":
                if not sep or not scheme:
                    raise _bad("URI without a scheme", text)
                self._init_other(scheme, rest, text)
                return
        self.scheme = scheme
        self.opaque = None
        at = rest.find("@")
        if at >= 0:
            user = rest[:at]
            rest = rest[at + 1 :]
            if not user or not _USERINFO_CHARS.issuperset(user):
                raise _bad("bad user part in URI", text)
            password = None
            if ":" in user:
                user, _, password = user.partition(":")
                if not user or not _PASSWORD_CHARS.issuperset(password):
                    raise _bad("bad password in URI", text)
            if "%" in user:
                _check_escapes(user, "URI user")
                if password:
                    _check_escapes(password, "URI password")
            self.user = user
            self.password = password
        else:
            self.user = self.password = None
        q = rest.find("?")
        if q >= 0:
            self.headers = _parse_uri_headers(rest[q + 1 :], text)
            rest = rest[:q]
        else:
            self.headers = {}
        semi = rest.find(";")
        if semi >= 0:
            self.params = _parse_uri_params(rest[semi + 1 :], text)
            rest = rest[:semi]
        else:
            self.params = {}
        self.host, self.port = split_wire_hostport(rest, text)

    def _init_other(self, scheme: str, rest: str, text: str) -> None:
        self.user = self.password = None
        self.port = None
        self.host = ""
        self.opaque = None
        if scheme == "tel":
            self.scheme = scheme
            self._parse_tel(rest, text)
            return
        if not _SCHEME_CHARS.issuperset(scheme) or scheme[0] not in _ALPHA:
            raise _bad("bad URI scheme", text)
        if not rest or not rest.isprintable() or " " in rest or "<" in rest or ">" in rest:
            raise _bad("bad URI", text)
        self.scheme = scheme
        self.params = {}
        self.headers = {}
        self.opaque = rest

    def _parse_tel(self, rest: str, text: str) -> None:
        number, _, params = rest.partition(";")
        if not number or not _PARAM_CHARS.issuperset(number):
            raise _bad("bad tel URI", text)
        self.user = number
        self.params = _parse_uri_params(params, text) if params else {}
        self.headers = {}

    @classmethod
    def build(
        cls,
        *,
        scheme: str = "sip",
        user: str | None = None,
        password: str | None = None,
        host: str = "",
        port: int | None = None,
        params: dict[str, str | None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> URI:
        """Make a URI from parts without formatting and re-parsing; the parts are taken as written."""
        uri = cls(None)
        uri.scheme = scheme.lower()
        uri.user = user
        uri.password = password
        uri.host = host
        uri.port = port
        uri.params = dict(params) if params else {}
        uri.headers = dict(headers) if headers else {}
        uri.opaque = None
        return uri

    def copy(self) -> URI:
        """An independent copy (params and headers dicts are copied too)."""
        uri = URI(None)
        uri.scheme = self.scheme
        uri.user = self.user
        uri.password = self.password
        uri.host = self.host
        uri.port = self.port
        uri.params = dict(self.params)
        uri.headers = dict(self.headers)
        uri.opaque = self.opaque
        return uri

    def __str__(self) -> str:
        if self.opaque is not None:
            return f"{self.scheme}:{self.opaque}"
        if self.scheme == "tel":
            out = f"tel:{self.user or ''}"
        else:
            out = self.scheme + ":"
            if self.user is not None:
                out += self.user
                if self.password is not None:
                    out += ":" + self.password
                out += "@"
            out += self.host
            if self.port is not None:
                out += f":{self.port}"
        if self.params:
            out += format_params(self.params)
        if self.headers:
            out += "?" + "&".join(f"{k}={v}" for k, v in self.headers.items())
        return out

    def __repr__(self) -> str:
        return f"URI({str(self)!r})"

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        """RFC 3261 §19.1.4 comparison."""
        if not isinstance(other, URI):
            return NotImplemented
        if self.scheme != other.scheme:
            return False
        if self.opaque is not None or other.opaque is not None:
            return self.opaque == other.opaque
        if self.scheme == "tel":
            if _tel_digits(self.user) != _tel_digits(other.user):
                return False
        else:
            if _norm_opt(self.user) != _norm_opt(other.user):
                return False
            if _norm_opt(self.password) != _norm_opt(other.password):
                return False
            if self.host.lower() != other.host.lower() or self.port != other.port:
                return False
        mine = self.params
        theirs = other.params
        for name, value in mine.items():
            if name in theirs:
                other_value = theirs[name]
                if (value is None) != (other_value is None):
                    return False
                if (
                    value is not None
                    and other_value is not None
                    and _normalize_escapes(value).lower() != _normalize_escapes(other_value).lower()
                ):
                    return False
            elif name in _STRICT_PARAMS:
                return False
        for name in theirs:
            if name not in mine and name in _STRICT_PARAMS:
                return False
        return _norm_headers(self.headers) == _norm_headers(other.headers)

    # -- convenience -------------------------------------------------------------------------------------

    @property
    def transport(self) -> str | None:
        """The ``transport`` parameter, lower-case, or None."""
        value = self.params.get("transport")
        return value.lower() if value else None

    @property
    def lr(self) -> bool:
        """True for a loose-routing URI (``;lr``, RFC 3261 §16.12)."""
        return "lr" in self.params

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def secure(self) -> bool:
        """True for ``sips:`` URIs."""
        return self.scheme == "sips"

    def aor(self) -> str:
        """The canonical address-of-record string: ``sip:user@host``.

        Scheme ``sips`` becomes ``sip``, the host is lower-cased, port, parameters, headers and password are
        dropped, and escapes in the user part are normalised, so that every URI that §19.1.4 says names the
        same user gives the same string (the key of location caches and of the DHT).
        """
        if self.opaque is not None:
            return f"{self.scheme}:{self.opaque}"
        if self.scheme == "tel":
            return f"tel:{_tel_digits(self.user)}"
        host = self.host.lower()
        if self.user is None:
            return f"sip:{host}"
        return f"sip:{_normalize_escapes(self.user)}@{host}"


def _norm_opt(text: str | None) -> str | None:
    return None if text is None else _normalize_escapes(text)


def _norm_headers(headers: dict[str, str]) -> dict[str, str]:
    return {_normalize_escapes(k).lower(): _normalize_escapes(v).lower() for k, v in headers.items()}


def _tel_digits(number: str | None) -> str:
    """RFC 3966 §4: visual separators are ignored when comparing telephone numbers."""
    if not number:
        return ""
    return "".join(c for c in _normalize_escapes(number) if c not in "-.()").lower()


# --------------------------------------------------------------------------------------------------------
# Quoted strings and header parameters
# --------------------------------------------------------------------------------------------------------


def unquote(text: str) -> str:
    """Strip the quotes of a quoted-string and resolve its backslash escapes; other text is returned as is."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        if "\\" not in inner:
            return inner
        out: list[str] = []
        i = 0
        while i < len(inner):
            c = inner[i]
            if c == "\\" and i + 1 < len(inner):
                out.append(inner[i + 1])
                i += 2
            else:
                out.append(c)
                i += 1
        return "".join(out)
    return text


def quote(text: str) -> str:
    """Make a quoted-string: ``"`` and ``\\`` and control characters become quoted-pairs (RFC 3261 §25.1).
    CR and LF cannot appear in a quoted-string at all, escaped or not; they become spaces."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if not text.isprintable():
        text = "".join(_QUOTE_CONTROL.get(c, c) for c in text)
    return '"' + text + '"'


_QUOTE_CONTROL = {chr(c): "\\" + chr(c) for c in [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]}
_QUOTE_CONTROL.update({"\r": " ", "\n": " "})


def _scan_quoted(text: str, start: int) -> int:
    """Index just past the quoted-string that starts at ``text[start] == '"'``; raises if unterminated.

    A quote closes the string unless an odd number of backslashes precede it (each backslash escapes the
    next character); ``str.find`` does the scanning instead of a Python loop over characters.
    """
    i = start + 1
    while True:
        j = text.find('"', i)
        if j < 0:
            raise _bad("unterminated quoted string", text)
        k = j - 1
        while k > start and text[k] == "\\":
            k -= 1
        if (j - 1 - k) % 2 == 0:
            return j + 1
        i = j + 1


def split_unquoted(text: str, sep: str, *, angles: bool = False) -> list[str]:
    """Split ``text`` on ``sep`` outside quoted strings (and, with ``angles``, outside ``<...>``: a URI
    in a header value may hold the separator). The parts are returned as they are (not stripped)."""
    if '"' not in text and not (angles and "<" in text):
        return text.split(sep)
    parts: list[str] = []
    start = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i = _scan_quoted(text, i)
            continue
        if c == "<" and angles:
            end = text.find(">", i)
            if end < 0:
                raise ParseError(f"missing '>' in {text[:80]!r}")
            i = end + 1
            continue
        if c == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def parse_params(text: str, whole: str = "") -> dict[str, str | None]:
    """Parse header parameters ``;a=1;b;c="x y"`` (text after the first ``;``). Names are lower-cased;
    quoted values keep their quotes (so that formatting is symmetric); flags map to None."""
    if '"' in text or " " in text or "\t" in text:
        return _parse_params_slow(text, whole)
    params: dict[str, str | None] = {}
    for item in text.split(";"):
        name, sep, value = item.partition("=")
        if (
            not name
            or not TOKEN_CHARS.issuperset(name)
            or (sep and (not value or not _PARAM_VALUE_CHARS.issuperset(value)))
        ):
            raise _bad("bad parameter", whole or text)
        params[name.lower()] = value or None
    return params


def _parse_params_slow(text: str, whole: str) -> dict[str, str | None]:
    """parse_params for text with quoted values or LWS around ``;`` and ``=``."""
    params: dict[str, str | None] = {}
    for item in split_unquoted(text, ";"):
        name, sep, value = item.partition("=")
        name = name.strip(" \t")
        if not name or not TOKEN_CHARS.issuperset(name):
            raise _bad("bad parameter", whole or text)
        if sep:
            value = value.strip(" \t")
            if not value:
                raise _bad("parameter with '=' but no value", whole or text)
            if value[0] == '"':
                if _scan_quoted(value, 0) != len(value):
                    raise _bad("junk after quoted parameter value", whole or text)
            elif not _PARAM_VALUE_CHARS.issuperset(value):
                raise _bad("bad parameter value", whole or text)
            params[name.lower()] = value
        else:
            params[name.lower()] = None
    return params


# gen-value = token / host / quoted-string; host includes IPv6 references.
_PARAM_VALUE_CHARS = TOKEN_CHARS | frozenset("[]:")


def format_params(params: dict[str, str | None]) -> str:
    # A list, not a generator: str.join builds a list from a generator anyway, slower (every Via and
    # Address sent goes through here).
    return "".join([f";{k}" if v is None else f";{k}={v}" for k, v in params.items()])


# --------------------------------------------------------------------------------------------------------
# Address: name-addr / addr-spec (From, To, Contact, Route, Record-Route, Reply-To, Refer-To, ...)
# --------------------------------------------------------------------------------------------------------


_TOKEN_RE = r"A-Za-z0-9\-.!%*_+`'~"
# Possessive quantifiers as in _SIP_URI_RE: no run here can end on a character its class holds.
_NAME_ADDR_HEAD = (
    r'(?:"([^"\\\r\n]*+)"[ \t]*+|([' + _TOKEN_RE + r"]++(?: [" + _TOKEN_RE + r"]++)*+)?[ \t]*+)<"
)
#: header parameters as a Via or a name-addr carries them: ``;token`` or ``;token=token/host``
HEADER_PARAMS_RE = r"((?:;[" + _TOKEN_RE + r"]++(?:=[" + _TOKEN_RE + r"\[\]:]++)?)*+)"
_FAST_NAME_ADDR = re.compile(_NAME_ADDR_HEAD + r"([^<>]++)>" + HEADER_PARAMS_RE).fullmatch
# The usual name-addr with the usual SIP URI in it, in one match (eight groups: quoted display name, token
# display name, the five of _SIP_URI_RE, header parameters). It matches exactly when _FAST_NAME_ADDR
# matches and _FAST_SIP_URI matches its URI: neither the display name nor the URI can hold "<" or ">".
# One match instead of two: ~4,000 fewer CPU instructions (callgrind) for a From or To seen first.
_FAST_ADDRESS = re.compile(_NAME_ADDR_HEAD + _SIP_URI_RE + ">" + HEADER_PARAMS_RE).fullmatch


def _display_needs_quotes(display: str) -> bool:
    if not display:
        return True
    return any(not TOKEN_CHARS.issuperset(word) for word in display.split(" ")) or "  " in display


AddressCheck = tuple[Any, ...]
"""What :func:`check_address` returns for an address it vetted without building it: the groups of a
``_FAST_ADDRESS`` match."""


# Vetted name-addr texts and the groups of their matches. Why: the same From, To, Route and Record-Route
# values come back in every message of a dialog (a call through a proxy carries one From value in all six
# messages it sees), and the regular-expression match is most of what parsing one costs. The groups are
# immutable, so sharing them is safe; every Address is still a new object. Bounded: emptied when full (str
# hashes are randomised, so no one can aim collisions).
_VETTED: dict[str, AddressCheck] = {}


def _vet(text: str) -> AddressCheck | None:
    """The match groups proving that ``Address(text)`` takes its fast path and cannot fail, or None."""
    m = _FAST_ADDRESS(text)
    if m is None:
        return None
    # The groups, not the match object: a tuple of strings, which the cyclic garbage collector stops
    # tracking, whereas every re.Match stays tracked (a long-lived cache of them would lengthen its passes).
    check = m.groups()
    # The same conditions under which URI.__init__ takes its fast path and cannot fail: no ".." in the
    # host, a port within range.
    port = check[5]
    if ".." in check[4] or (port is not None and int(port) > 65535):
        return None
    if len(_VETTED) >= _VETTED_MAX:
        _VETTED.clear()
    _VETTED[text] = check
    return check


def check_address(text: str) -> AddressCheck | Address:
    """Validate ``text`` as an :class:`Address` as cheaply as possible.

    Why: :func:`~p2psip.message.parse` must refuse a message whose From or To is malformed (so that every
    accepted message can be answered), but a proxy never reads From/To of most messages (responses, ACKs):
    building the two Address objects and their URIs was ~10 % of parsing. For the usual shape this returns
    the groups of the two regular-expression matches that prove ``Address(text)`` would succeed (turn them
    into the Address with :meth:`Address.from_check` when someone asks); anything else is parsed in full,
    so a malformed value raises the very :class:`ParseError` that ``Address(text)`` raises.
    """
    return _VETTED.get(text) or _vet(text) or Address(text)


class Address:
    """A name-addr (``"Alice" <sip:alice@example.com>;tag=88``), an addr-spec, or the Contact wildcard ``*``.

    ``display`` holds the display name unquoted (None when there is none); ``params`` are the header
    parameters (``tag``, ``expires``, ``q`` ...), names lower-cased, quoted values kept quoted.
    """

    __slots__ = ("display", "params", "uri", "wildcard")

    display: str | None
    uri: URI
    params: dict[str, str | None]
    wildcard: bool

    def __init__(self, text: str | None, check: AddressCheck | None = None) -> None:
        """``Address(text)`` parses ``text``; ``Address(None, check)`` is the Address that
        :func:`check_address` vetted (:meth:`from_check`), and ``Address(None)`` an empty one for
        :meth:`build` and :meth:`copy` to fill in: the one way to skip parsing that both CPython and mypyc
        (the optional compiled build) accept."""
        # Fastest: a text vetted before (see _VETTED). Fast: the usual name-addr (no escapes in the display
        # name, plain token parameters), one compiled regular expression; else the general way below.
        if check is None:
            if text is None:
                return
            check = _VETTED.get(text) or _vet(text)
            if check is None:
                m = _FAST_NAME_ADDR(text)
                if m is None:
                    self._parse_general(text)
                    return
                quoted, display, uri, params = m.groups()
                self.display = quoted if quoted is not None else display
                self.uri = URI(uri)
                self.params = _fast_params(params) if params else {}
                self.wildcard = False
                return
        quoted, display, scheme, user, host, port, uri_params, params = check
        self.display = quoted if quoted is not None else display
        self.uri = URI(None, (scheme, user, host, port, uri_params))
        self.params = _fast_params(params) if params else {}
        self.wildcard = False

    @classmethod
    def from_check(cls, check: AddressCheck) -> Address:
        """The Address that :func:`check_address` vetted: equal to ``Address(text)``, built without parsing
        ``text`` again."""
        return cls(None, check)

    def _parse_general(self, text: str) -> None:
        text = text.strip(" \t")
        self.wildcard = False
        if not text:
            raise ParseError("empty address")
        first = text[0]
        if first == "<":
            self.display = None
            rest = text
        elif first == '"':
            end = _scan_quoted(text, 0)
            display = text[1 : end - 1]
            self.display = unquote(text[:end]) if "\\" in display else display
            rest = text[end:].lstrip(" \t")
            if rest[:1] != "<":
                raise _bad("display name not followed by <URI>", text)
        else:
            self.display = None
            lt = text.find("<")
            if lt < 0:
                self._addr_spec(text)
                return
            display = text[:lt].strip(" \t")
            if display:
                words = display.split()
                if not all(TOKEN_CHARS.issuperset(w) for w in words):
                    raise _bad("bad display name", text)
                self.display = " ".join(words)
            rest = text[lt:]
        gt = rest.find(">")
        if gt < 0:
            raise _bad("missing '>' in address", text)
        self.uri = URI(rest[1:gt])
        after = rest[gt + 1 :]
        if after:
            if after[0] != ";":
                after = after.lstrip(" \t")
                if after[:1] != ";":
                    raise _bad("junk after '>' in address", text)
            self.params = parse_params(after[1:], text)
        else:
            self.params = {}

    def _addr_spec(self, text: str) -> None:
        if text[0] == "*" and text[1:].lstrip(" \t")[:1] in ("", ";"):
            self.wildcard = True
            self.uri = URI.build(host="*")
            rest = text[1:].strip(" \t")
            self.params = parse_params(rest[1:], text) if rest else {}
            return
        # addr-spec: parameters after the URI belong to the header, not to the URI (RFC 3261 §20).
        uri_text, sep, params = text.partition(";")
        uri_text = uri_text.rstrip(" \t")
        if " " in uri_text or "\t" in uri_text or "," in uri_text:
            raise _bad("bad address", text)
        self.uri = URI(uri_text)
        if "?" in uri_text and self.uri.headers:
            raise _bad("a URI with headers must be enclosed in <>", text)
        self.params = parse_params(params, text) if sep else {}

    @classmethod
    def build(
        cls, uri: URI | str, display: str | None = None, params: dict[str, str | None] | None = None
    ) -> Address:
        """Make an address from a URI (object or text), an optional display name and header parameters."""
        addr = cls(None)
        addr.uri = URI(uri) if isinstance(uri, str) else uri
        addr.display = display
        addr.params = dict(params) if params else {}
        addr.wildcard = False
        return addr

    def copy(self) -> Address:
        addr = Address(None)
        addr.uri = self.uri.copy()
        addr.display = self.display
        addr.params = dict(self.params)
        addr.wildcard = self.wildcard
        return addr

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @tag.setter
    def tag(self, value: str | None) -> None:
        if value is None:
            self.params.pop("tag", None)
        else:
            self.params["tag"] = value

    @property
    def expires(self) -> int | None:
        """The Contact ``expires`` parameter as an int, or None (absent or not a number)."""
        value = self.params.get("expires")
        if value is None or not value.isdigit() or not value.isascii():
            return None
        return int(value)

    @property
    def q(self) -> float | None:
        """The Contact ``q`` parameter (0..1), or None (absent or malformed)."""
        value = self.params.get("q")
        if value is None:
            return None
        try:
            q = float(value)
        except ValueError:
            return None
        return q if 0.0 <= q <= 1.0 else None

    def __str__(self) -> str:
        if self.wildcard:
            return "*" + format_params(self.params)
        uri = str(self.uri)
        if self.display is None:
            out = f"<{uri}>"
        elif _display_needs_quotes(self.display):
            out = f"{quote(self.display)} <{uri}>"
        else:
            out = f"{self.display} <{uri}>"
        if self.params:
            out += format_params(self.params)
        return out

    def __repr__(self) -> str:
        return f"Address({str(self)!r})"

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        """Same URI (§19.1.4), same display name, same parameters (names and values case-insensitive)."""
        if not isinstance(other, Address):
            return NotImplemented
        if self.wildcard or other.wildcard:
            return self.wildcard == other.wildcard and _lower_params(self.params) == _lower_params(
                other.params
            )
        return (
            self.display == other.display
            and self.uri == other.uri
            and _lower_params(self.params) == _lower_params(other.params)
        )


def _lower_params(params: dict[str, str | None]) -> dict[str, Any]:
    return {k: (v.lower() if v is not None else None) for k, v in params.items()}
