"""The exceptions of the SIP stack and the peer.

Every error says what was wrong and, where it can, what to do. Protocol errors carry the SIP status code
to answer with (``status_hint``), in the spirit of h11's ``error_status_hint``, so the transport layer can
answer a malformed request with a useful ``400`` without knowing why it failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only: the message layer imports this module
    from p2psip.message import Response


class P2PSIPError(Exception):
    """Base class of every error raised by the p2psip package."""


class ParseError(P2PSIPError, ValueError):
    """Bytes that are not a valid SIP message (or SDP body, or URI).

    ``status_hint`` is the status to answer a request with (400 unless said otherwise); ``partial`` holds
    whatever could be parsed of the message (for example the request line and Via/From/To/Call-ID/CSeq)
    so that a ``400 Bad Request`` can still be built, or ``None``.
    """

    def __init__(self, message: str, *, status_hint: int = 400, partial: object | None = None) -> None:
        super().__init__(message)
        self.status_hint = status_hint
        self.partial = partial


class TransportError(P2PSIPError, OSError):
    """A message could not be sent (no route, connection refused or reset, TLS failure)."""


class FlowFailed(TransportError):
    """The flow a request must go over (RFC 5626: the connection or NAT mapping a phone registered over)
    is gone: answer ``430 Flow Failed``, so the phone's other flows or a re-REGISTER take over."""

    status_hint = 430


class TransactionError(P2PSIPError):
    """A transaction was used against its state machine (e.g. a response sent twice)."""


class AuthError(P2PSIPError):
    """Digest authentication failed or a challenge could not be answered."""


class ConfigError(P2PSIPError):
    """A bad command-line argument or configuration value; the CLI prints it and exits 2."""


class CallFailed(P2PSIPError):
    """A request of a user agent ended with a final failure: ``status`` (a SIP code; 408 for a timeout,
    503 for a transport failure), ``reason`` and the ``response`` when one arrived.

    Here rather than in :mod:`p2psip.useragent` so that the UA's offer/answer strategy
    (:mod:`p2psip.callaudio`) can raise it without importing the UA."""

    def __init__(self, status: int, reason: str, response: Response | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.response = response
