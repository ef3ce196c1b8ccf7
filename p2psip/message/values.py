"""Structured header values: Via and CSeq (RFC 3261 §20.16, §20.42).

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from p2psip.address import split_wire_hostport
from p2psip.errors import ParseError
from p2psip.message.ids import new_branch
from p2psip.message.names import split_list
from p2psip.uri import (
    _VETTED_MAX,
    HEADER_PARAMS_RE,
    TOKEN_CHARS,
    _fast_params,
    format_params,
    parse_params,
)


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
# Possessive quantifiers (``++``, ``*+``) as in p2psip.uri: no run can end on a character its class holds.
_FAST_VIA = re.compile(
    r"SIP/2\.0/([A-Za-z]++) ([A-Za-z0-9][A-Za-z0-9.\-]*+|\[[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\])"
    r"(?::([0-9]{1,5}+))?" + HEADER_PARAMS_RE
).fullmatch


# Texts of Via values that took the fast path, and what they gave (transport, host, port, parameters).
# Why: a Via value comes back in every response of its transaction and in retransmissions (an INVITE's
# request, 100, 180 and 200 carry the same Via list), and building one was ~2/3 Python work around the
# regular expression. Immutable to share: the parameters are copied into every new Via. Bounded like
# uri._VETTED (emptied when full).
_ViaParts = tuple[str, str, int | None, dict[str, str | None]]
_VETTED_VIAS: dict[str, _ViaParts] = {}


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

    def __init__(self, text: str | None, match: re.Match[str] | None = None) -> None:
        """``Via(text)`` parses ``text``; ``match`` is a ``_FAST_VIA`` match of it made already (see
        :meth:`_first_of`). ``Via(None)`` is an empty Via for :meth:`build` and :meth:`copy` to fill in: the
        one way to skip parsing that both CPython and mypyc (the optional compiled build) accept."""
        if text is None:
            return
        if match is None:
            vetted = _VETTED_VIAS.get(text)
            if vetted is not None:
                self.protocol = "SIP/2.0"
                self.transport, self.host, self.port, params = vetted
                self.params = params.copy()
                return
            match = _FAST_VIA(text)  # the usual shape in one compiled match; the general path otherwise
        if match is None or not self._set_fast(match, text):
            self._parse_general(text)

    def _set_fast(self, m: re.Match[str], text: str) -> bool:
        """Fill in the parts from a ``_FAST_VIA`` match of ``text``; False if the host is not valid after all
        (``..``), for the general path to explain."""
        transport, host, port, params = m.groups()
        if port is None:
            number = None
        else:
            number = int(port)
            if number > 65535:
                raise ParseError(f"bad port in Via {text[:80]!r}")
        if ".." in host:
            return False
        transport = transport.upper()
        parsed = _fast_params(params) if params else {}
        if len(_VETTED_VIAS) >= _VETTED_MAX:
            _VETTED_VIAS.clear()
        _VETTED_VIAS[text] = (transport, host, number, parsed.copy())
        self.protocol = "SIP/2.0"
        self.transport = transport
        self.host = host
        self.port = number
        self.params = parsed
        return True

    @classmethod
    def _first_of(cls, value: str) -> Via:
        """The first Via of a header line holding several (``Via: a, b``, as sipp and others echo the Via
        list in responses). The text before the first comma is that Via when the fast regular expression
        accepts it (it allows no quotes or ``<>``, which could hide a comma); only otherwise is the line
        split properly. Saves the split of the whole line, ~9,000 of ~30,000 CPU instructions (callgrind)."""
        head = value[: value.find(",")].rstrip(" \t")
        if head in _VETTED_VIAS:
            return cls(head)
        m = _FAST_VIA(head)
        if m is not None:  # then ``head`` is the first item: no quotes or ``<>`` hide a comma in it
            return cls(head, m)
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
        via = cls(None)
        via.protocol = "SIP/2.0"
        via.transport = transport.upper()
        via.host = host
        via.port = port
        via.params = {"branch": branch if branch is not None else new_branch()}
        for key, value in params.items():
            via.params[key] = None if value is None or value is True else str(value)
        return via

    def copy(self) -> Via:
        via = Via(None)
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
