"""Header names: canonical names, compact forms, list headers (RFC 3261 §7.3, §20).

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

from p2psip.errors import ParseError
from p2psip.uri import TOKEN_CHARS, split_unquoted

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
    return [item for item in (part.strip(" \t") for part in split_unquoted(value, ",", angles=True)) if item]
