"""The SIP trace of a running program: every message a stack sends and receives (``p2psip start -v``, the
demo's ladder). An observer of the transport, outside the protocol modules: the stack only offers the hook
(:meth:`~p2psip.stack.Stack.add_observer`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from p2psip.address import Target
from p2psip.stack import Stack

TraceSink = Callable[[str, tuple[str, str, int] | None, bytes], None]
"""``sink(direction, (transport, host, port) or None, data)``: direction ``"in"`` or ``"out"``."""


def stamp(now: float | None = None) -> str:
    """Wall-clock time to the millisecond, as the trace and the peer's log lines print it."""
    now = time.time() if now is None else now
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


class SipTrace:
    """Sees every SIP message a stack sends and receives.

    It observes one stack (:meth:`Stack.add_observer`: the bytes as received and as sent) and hands each
    message to ``sink``; ``enabled`` switches it on and off, :meth:`close` detaches it.
    """

    def __init__(self, stack: Stack, sink: TraceSink) -> None:
        self.sink = sink
        self.enabled = True
        self.stack = stack
        stack.add_observer(self._observe)

    def _observe(self, direction: str, data: bytes, remote: Target) -> None:
        if self.enabled:
            self.sink(direction, (remote.transport, remote.host, remote.port), data)

    def close(self) -> None:
        """Stop tracing this stack."""
        self.stack.remove_observer(self._observe)

    @staticmethod
    def printer(write: Callable[[str], None]) -> TraceSink:
        """A sink that writes each message in full, after a line with the time (to the millisecond, so a
        trace can be read beside the peer's log lines and another host's trace), direction and address."""

        def sink(direction: str, where: tuple[str, str, int] | None, data: bytes) -> None:
            arrow = "<< from" if direction == "in" else ">> to"
            if where is None:
                place = "stream"
            else:
                place = str(Target(*where))
            write(f"{stamp()} {arrow} {place}\n{data.decode('utf-8', 'replace').rstrip()}\n")

        return sink
