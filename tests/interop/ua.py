"""Our own UserAgent as the far end of an interop test: one that rings and answers every call."""

from __future__ import annotations

from p2psip.stack import Stack
from p2psip.useragent import IncomingCall, UserAgent

SDP = (
    b"v=0\r\no=p2psip 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)
"""An audio offer/answer (PCMU) for calls whose media nobody sends."""


def answering_ua(stack: Stack, aor: str, **kwargs: object) -> tuple[UserAgent, list[IncomingCall]]:
    """A UserAgent for ``aor`` on ``stack`` that rings (180) and answers (200 with :data:`SDP`) every call;
    the list collects the calls it answered."""
    calls: list[IncomingCall] = []

    def on_call(call: IncomingCall) -> None:
        calls.append(call)
        call.ring()
        call.accept(SDP)

    return UserAgent(stack, aor, on_call=on_call, **kwargs), calls  # type: ignore[arg-type]
