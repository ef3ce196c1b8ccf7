"""Identifiers (branch, tag, Call-ID) and the reason phrases of status codes (RFC 3261 §8.1.1, §21).

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

#: The RFC 3261 magic cookie that starts every branch made by an RFC 3261 element (§8.1.1.7).
BRANCH_COOKIE = "z9hG4bK"

_CHUNK = 16  # bytes: the largest identifier (a Call-ID takes 12)
_POOL = 256 * _CHUNK
_chunks: Iterator[bytes] = iter(())


def random_hex(nbytes: int) -> str:
    """``nbytes`` bytes from the operating system's CSPRNG, as hex: what ``secrets.token_hex`` gives.

    Why not ``secrets.token_hex``: that is one ``getrandom`` system call per identifier, and a proxy makes
    several per call (a branch per forwarded request; a UA also tags and Call-IDs). The bytes come from
    ``os.urandom`` just the same, fetched 4 kB at a time and each handed out once, so the identifiers stay
    as unguessable as before — which matters: a response finds its client transaction by branch alone
    (§17.1.3), so a predictable branch would let an off-path sender forge the answer to someone's INVITE.
    Each call takes the next 16-byte chunk with one ``next()`` of a list iterator, which is atomic under
    the GIL (two threads never get the same chunk); a forked child drops the parent's chunks
    (``os.register_at_fork``), or parent and child would hand out the same ones (``p2psip proxy
    --workers`` forks)."""
    if nbytes > _CHUNK:
        return os.urandom(nbytes).hex()
    try:
        chunk = next(_chunks)
    except StopIteration:
        chunk = _refill()
    return chunk[:nbytes].hex()


def _refill() -> bytes:
    global _chunks
    pool = os.urandom(_POOL)
    chunks = iter([pool[i : i + _CHUNK] for i in range(0, _POOL, _CHUNK)])
    chunk = next(chunks)
    _chunks = chunks
    return chunk


def _drop_chunks() -> None:
    global _chunks
    _chunks = iter(())


os.register_at_fork(after_in_child=_drop_chunks)


def new_branch() -> str:
    """A fresh, globally unique Via branch with the RFC 3261 magic cookie."""
    return BRANCH_COOKIE + random_hex(8)


def new_tag() -> str:
    """A fresh From/To tag (32 random bits are the RFC's minimum; we use 48)."""
    return random_hex(6)


def new_call_id(host: str = "") -> str:
    """A fresh Call-ID, ``random@host`` when a host is given."""
    cid = random_hex(12)
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
