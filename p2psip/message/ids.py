"""Identifiers (branch, tag, Call-ID) and the reason phrases of status codes (RFC 3261 §8.1.1, §21).

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

import secrets

#: The RFC 3261 magic cookie that starts every branch made by an RFC 3261 element (§8.1.1.7).
BRANCH_COOKIE = "z9hG4bK"

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
