"""Messages: Message, Request and Response — headers as raw values with lazy structured views.

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from p2psip.errors import ParseError, SIPStatusError
from p2psip.message.authheaders import parse_auth
from p2psip.message.ids import _default_reason, new_call_id, new_tag
from p2psip.message.names import _LIST_HEADERS, _NAMES, _name_entry, split_list
from p2psip.message.values import CSeq, Via, _parse_cseq
from p2psip.uri import (
    TOKEN_CHARS,
    URI,
    Address,
    check_address,
)

_Header = tuple[str, str, str]  # (lookup key, display name, value)

_MISSING = object()
#: Views that a copy of a message shares with the original (see Message._copy_into): immutable values.
_SHARED_VIEWS = frozenset({"cseq", "call-id", "max-forwards", "from", "to"})


class Message:
    """What requests and responses share: an ordered header list and a body.

    Headers are ``(key, name, value)`` triples; ``key`` is the lower-case canonical name used for lookups,
    ``name`` the canonical spelling written out. Structured views are computed on first access and cached
    in ``_cache`` until the header is changed through this class's methods.
    """

    __slots__ = ("_body", "_cache", "_firsts", "_headers")

    _headers: list[_Header]
    _cache: dict[str, Any]
    _body: bytes
    _firsts: dict[str, str] | None
    """The value of the first line of every header, by key, when known: a parsed message has it (the
    parser builds it anyway) and its copies inherit it; every method here that changes the lines keeps it
    right. Why: :meth:`get` then costs one dict lookup instead of a pass over a dozen lines in Python — a
    proxy asks ~19 times per call (Route, Max-Forwards, Proxy-Require, ...). None for a message built line
    by line (``create``, ``for_request``): :meth:`get` reads the lines."""

    def __init__(self, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> None:
        self._headers = []
        self._cache = {}
        self._firsts = None
        self._body = bytes(body)
        for name, value in headers:
            self.add(name, value)

    # -- raw header access --------------------------------------------------------------------------------

    def get(self, name: str) -> str | None:
        """The first value of a header (any spelling, compact forms too), or None. For list headers such as
        Via or Contact this is the first element of the first header line."""
        entry = _NAMES.get(name)  # every name the stack itself asks for: skip _name_entry's call
        key = entry[0] if entry is not None else _name_entry(name)[0]
        firsts = self._firsts
        if firsts is not None:
            first = firsts.get(key)
            if first is not None and "," in first and key in _LIST_HEADERS:
                items = split_list(first)
                return items[0] if items else first
            return first
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
        firsts = self._firsts
        if firsts is not None:
            if new:
                firsts[key] = new[0][2]
            else:
                firsts.pop(key, None)
        self._invalidate(key)

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Add a header line: at the top of the message with ``first=True`` (what a proxy does with Via and
        Record-Route), else right after the last line of the same header, else at the end."""
        key, display = _name_entry(name)
        header = (key, display, _check_value(value))
        headers = self._headers
        firsts = self._firsts
        if first:
            headers.insert(0, header)
            if firsts is not None:
                firsts[key] = header[2]
        else:
            for i in range(len(headers) - 1, -1, -1):
                if headers[i][0] == key:
                    headers.insert(i + 1, header)
                    break
            else:
                headers.append(header)
                if firsts is not None:
                    firsts[key] = header[2]
        self._invalidate(key)

    def remove(self, name: str) -> int:
        """Remove every line of a header; returns how many there were."""
        key = _name_entry(name)[0]
        before = len(self._headers)
        self._headers = [h for h in self._headers if h[0] != key]
        if self._firsts is not None:
            self._firsts.pop(key, None)
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
                firsts = self._firsts
                if firsts is not None:  # the header's first line is now the i-th or a later one, or none
                    for k, _, rest in headers[i:]:
                        if k == key:
                            firsts[key] = rest
                            break
                    else:
                        del firsts[key]
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

    def values_of(self, keys: frozenset[str]) -> list[str]:
        """The raw values of every header line whose lower-case canonical name is in ``keys``, in message
        order: several headers read in one pass over the lines instead of one pass each."""
        return [value for k, _, value in self._headers if k in keys]

    def items(self) -> list[tuple[str, str]]:
        """Every header line as (canonical name, value), in order."""
        return [(name, value) for _, name, value in self._headers]

    def push_via(self, via: Via) -> None:
        """Put ``via`` on top of the Via list (a UAC or proxy sending the request) and keep the object as
        the parsed top Via, so the transaction layer, which reads it next, does not parse it again."""
        text = _check_value(str(via))
        self._headers.insert(0, ("via", "Via", text))
        if self._firsts is not None:
            self._firsts["via"] = text
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
        if self._firsts is not None:
            self._firsts["via"] = header[2]
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
        if self._firsts is not None and "content-length" in self._firsts:
            self._firsts["content-length"] = str(len(self._body))

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
            cached = self._cache["from"] = check if isinstance(check, Address) else Address(None, check)
        return cached

    @property
    def to(self) -> Address:
        cached = self._cache.get("to")
        if cached.__class__ is not Address:
            check = cached if cached is not None else check_address(self._required("to"))
            cached = self._cache["to"] = check if isinstance(check, Address) else Address(None, check)
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
        cached = self._cache.get("max-forwards", _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[no-any-return]
        value = self.get("max-forwards")
        if value is None:
            number = None
        elif not value.isdigit() or not value.isascii() or len(value) > 10 or int(value) > 255:
            raise ParseError(f"bad Max-Forwards {value[:80]!r}")
        else:
            number = int(value)
        self._cache["max-forwards"] = number  # a proxy reads it to check the request, then to decrement it
        return number

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
        other._firsts = None if self._firsts is None else self._firsts.copy()
        cache = self._cache
        # The immutable views go along (CSeq, Call-ID, Max-Forwards, and From/To while only vetted): a
        # proxy's copy of a request is read for them again at once (its client transaction's key needs
        # the CSeq method) and they would be parsed a second time. Mutable ones (Via, Address) do not.
        shared = _SHARED_VIEWS
        other._cache = {k: v for k, v in cache.items() if k in shared and type(v) is not Address}
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
        method: str | None,
        uri: URI | str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        """``Request(method, uri)``; ``Request(None)`` is an empty request for the parser and :meth:`copy`
        to fill in: the one way to skip this constructor's work that both CPython and mypyc (the optional
        compiled build) accept."""
        if method is None:
            return
        if not method or not TOKEN_CHARS.issuperset(method):
            raise ValueError(f"bad method {method!r}")
        if uri is None:
            raise ValueError("a request needs a Request-URI")
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
        req = Request(None)
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
        status: int | None,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        """``Response(status, reason)``; ``Response(None)`` is an empty response for the parser and
        :meth:`copy` to fill in (as ``Request(None)``)."""
        if status is None:
            return
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
        resp = Response(None)
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


class SentResponse:
    """A response as it went on the wire: its bytes, status and top Via, nothing parsed.

    Why: a completed non-INVITE server transaction lingers for Timer J (32 s over UDP, RFC 3261 §17.2.2)
    only to answer retransmissions of its request with the same final response. Keeping the parsed request
    and response for that costs ~2.8 kB each (a registrar at 150 REGISTER/s holds 4,800 of them); these
    bytes cost a tenth. It quacks like a :class:`Response` where the transport needs one (``status``,
    ``local``, ``top_via``, ``bytes()``), and is sent byte for byte as it was the first time."""

    __slots__ = ("data", "status")

    local = False  # stamped (Server header) before it was encoded: never again

    def __init__(self, response: Response | bytes) -> None:
        """From a response (encoded now), or from the bytes one was encoded to (the status is read back
        from its status line: ``SIP/2.0 200 ...``)."""
        if isinstance(response, bytes):
            self.data = response
            self.status = int(response[8:11])
        else:
            self.status = response.status
            self.data = bytes(response)

    @property
    def top_via(self) -> Via | None:
        """The top Via, parsed from the bytes on each call: only a retransmission routed without the
        request's source needs it, and keeping the header's text too cost ~120 bytes per transaction."""
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        for line in head.split("\r\n")[1:]:  # as this module wrote it: one header a line, never folded
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() in ("via", "v"):
                value = value.strip(" \t")
                return Via._first_of(value) if "," in value else Via(value)
        return None

    def __bytes__(self) -> bytes:
        return self.data

    def __repr__(self) -> str:
        return f"<SentResponse {self.status} ({len(self.data)} bytes)>"
