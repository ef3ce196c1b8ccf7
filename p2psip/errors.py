"""The exceptions of the SIP stack and the peer.

Every error says what was wrong and, where it can, what to do. One type says "answer this request with
status N": :class:`SIPStatusError` carries the status, the reason phrase (or None for the standard one),
headers to add and a detail; :meth:`p2psip.message.Response.for_error` turns it into the response. Every
layer raises it or a subclass — a malformed message (:class:`ParseError`, 400 unless it names 505, 513,
488...), a refused REGISTER, a request-URI nobody can route (416 for ``tel:``, 404), a proxy's §16.3 checks,
a user agent's failed request (:class:`CallFailed`), a dead flow (:class:`FlowFailed`, 430) — in the spirit
of h11's ``error_status_hint``, so whoever answers need not know why it failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only: the message layer imports this module
    from p2psip.message import Response


class P2PSIPError(Exception):
    """Base class of every error raised by the p2psip package."""


class SIPStatusError(P2PSIPError):
    """Answer the request with ``status`` (and ``headers``): ``reason`` is the phrase to send (None: the
    standard phrase of the status), ``detail`` what went wrong, added to the phrase in parentheses and shown
    as the exception's text. Raise it anywhere a request is being handled; the answering layer turns it into
    a response with :meth:`p2psip.message.Response.for_error`."""

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        *,
        detail: str | None = None,
    ) -> None:
        super().__init__(detail if detail is not None else f"{status} {reason}" if reason else str(status))
        self.status = status
        self.reason = reason
        self.headers = list(headers)
        self.detail = detail


class ParseError(SIPStatusError, ValueError):
    """Bytes that are not a valid SIP message (or SDP body, or URI).

    ``status`` is the status to answer a request with (400 unless said otherwise: 505 for another SIP
    version, 513 for a message over the limits, 488 for unusable SDP); ``partial`` holds whatever could be
    parsed of the message (for example the request line and Via/From/To/Call-ID/CSeq) so that the answer can
    still be built, or ``None``.
    """

    def __init__(self, message: str, *, status: int = 400, partial: object | None = None) -> None:
        super().__init__(status, detail=message)
        self.partial = partial


class TransportError(P2PSIPError, OSError):
    """A message could not be sent (no route, connection refused or reset, TLS failure)."""


class FlowFailed(SIPStatusError, TransportError):
    """The flow a request must go over (RFC 5626: the connection or NAT mapping a phone registered over)
    is gone: answer ``430 Flow Failed``, so the phone's other flows or a re-REGISTER take over."""

    def __init__(self, detail: str) -> None:
        super().__init__(430, detail=detail)


class TransactionError(P2PSIPError):
    """A transaction was used against its state machine (e.g. a response sent twice)."""


class AuthError(P2PSIPError):
    """Digest authentication failed or a challenge could not be answered."""


class ConfigError(P2PSIPError):
    """A bad command-line argument or configuration value; the CLI prints it and exits 2."""


class CallFailed(SIPStatusError):
    """A request of a user agent ended with a final failure: ``status`` (a SIP code; 408 for a timeout,
    503 for a transport failure), ``reason`` and the ``response`` when one arrived.

    Here rather than in :mod:`p2psip.useragent` so that the UA's offer/answer strategy
    (:mod:`p2psip.callaudio`) can raise it without importing the UA."""

    reason: str

    def __init__(self, status: int, reason: str, response: Response | None = None) -> None:
        super().__init__(status, reason)
        self.response = response
