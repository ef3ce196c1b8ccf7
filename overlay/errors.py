"""The exceptions of the overlay.

A refused store says why (``reason``: ``policy``, ``stale-seq``, ``too-large``, ``bad-signature`` ...), so
callers and users can tell a forged write from a full disk.
"""

from __future__ import annotations


class OverlayError(Exception):
    """Base class of every error raised by the overlay package."""


class WireError(OverlayError, ValueError):
    """An overlay message that is malformed, oversized, of an unknown type or wrongly typed."""


class StoreRefused(OverlayError):
    """A replica refused a store; ``reason`` is a short machine-readable word, the message says more."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class WriteQuorumFailed(OverlayError):
    """A store reached fewer copies than the write quorum (replicas that did not acknowledge in time,
    e.g. under overload): the value may be on the primary alone, so the caller must not report success."""

    def __init__(self, stored: int, wanted: int) -> None:
        super().__init__(f"stored on {stored} of {wanted} replicas, fewer than the write quorum")
        self.stored = stored
        self.wanted = wanted


class LookupFailed(OverlayError):
    """A lookup could not reach the node responsible for a key (timeouts, partition)."""


class NotJoined(OverlayError):
    """The node is not part of a ring yet (or has left it)."""


class WrongOverlay(NotJoined):
    """The peer asked to let us join serves another overlay (it answered with its name): retrying cannot
    help, so the join fails at once."""


class NotAdmitted(NotJoined):
    """The overlay admits enrolled nodes only and refused this one (no, expired or foreign node certificate);
    the message says which. Retrying cannot help."""


class NotAFullPeer(NotJoined):
    """The peer asked to let us join is a client peer (docs/nat.md): it holds no ring responsibility and
    cannot admit anybody; the message names a full peer to join through when it told us one."""
