"""Admission and deadlines for incoming stream connections (TCP, TLS, WebSocket), sans-IO.

Slowloris costs an attacker almost nothing: open many connections and keep each one's message
unfinished by trickling a byte now and then. An idle timeout does not see it (the connection is never
silent), and every open connection holds a socket, a buffer and a framer. Three bounds close it, the same
for every stream listener, so a new transport gets them by using this one guard:

- a *message deadline*: a message (or a WebSocket handshake) must be complete within
  ``message_timeout`` seconds of its first byte, or of the last message completed on that connection;
- a *per-source cap*: one IP address may hold at most ``max_per_source`` incoming connections;
- a *global cap*: at most ``max_connections`` incoming connections in all.

Outgoing connections (ours) are not counted: we open them for our own requests. The guard holds no socket
and reads no clock; the transport layer calls :meth:`StreamGuard.admit` / :meth:`release` and keeps one
:class:`Progress` per connection, fed with ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Progress", "StreamGuard", "StreamLimits"]


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """The bounds of :class:`StreamGuard` (``p2psip start`` reads them from the config)."""

    max_connections: int = 2048
    max_per_source: int = 32
    message_timeout: float = 20.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_source < 1:
            raise ValueError("connection caps must be at least 1")
        if not self.message_timeout > 0:
            raise ValueError("message_timeout must be positive")


class StreamGuard:
    """Counts incoming connections per source address and in all; says whom to refuse."""

    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits or StreamLimits()
        self.per_source: dict[str, int] = {}
        self.total = 0
        self.refused_per_source = 0
        self.refused_total = 0
        self.overdue = 0

    def admit(self, host: str) -> bool:
        """Count a new incoming connection from ``host``; False (counted nowhere) when over a cap."""
        if self.total >= self.limits.max_connections:
            self.refused_total += 1
            return False
        count = self.per_source.get(host, 0)
        if count >= self.limits.max_per_source:
            self.refused_per_source += 1
            return False
        self.per_source[host] = count + 1
        self.total += 1
        return True

    def release(self, host: str) -> None:
        """An admitted connection from ``host`` ended."""
        left = self.per_source.get(host, 0) - 1
        if left < 0:
            return
        self.total -= 1
        if left:
            self.per_source[host] = left
        else:
            del self.per_source[host]


class Progress:
    """One connection's message deadline: when its unfinished message started, if it has one."""

    __slots__ = ("since",)

    def __init__(self, now: float | None = None) -> None:
        self.since = now
        """When the unfinished message (or handshake) began; None while nothing is pending."""

    def update(self, now: float, *, completed: int, pending: bool) -> None:
        """After a read: ``completed`` messages finished in it, ``pending`` whether bytes of another wait.
        A finished message restarts the clock, so a busy connection that always ends a read mid-message is
        never overdue; a trickle that never finishes one is."""
        if not pending:
            self.since = None
        elif completed or self.since is None:
            self.since = now

    def overdue(self, now: float, limits: StreamLimits) -> bool:
        return self.since is not None and now - self.since > limits.message_timeout
