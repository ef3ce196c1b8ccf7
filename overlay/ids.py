"""Identifiers on the 2**128 Chord ring.

NodeIds and keys are plain ``int`` values in ``[0, 2**128)`` inside the cores (cheap to compare and add);
on the wire they travel as 16 big-endian bytes. Interval tests are written once here, with the wrap-around
cases, because an off-by-one at the wrap is the classic Chord bug.
"""

from __future__ import annotations

import hashlib

BITS = 128
RING = 1 << BITS
ID_BYTES = BITS // 8


def key_for(name: str | bytes) -> int:
    """The ring key of a name: the first 128 bits of SHA-256(name), as an int."""
    data = name.encode("utf-8") if isinstance(name, str) else name
    return int.from_bytes(hashlib.sha256(data).digest()[:ID_BYTES], "big")


def to_bytes(ident: int) -> bytes:
    """16 big-endian bytes, the wire form of an identifier."""
    return ident.to_bytes(ID_BYTES, "big")


def from_bytes(data: bytes) -> int:
    """The identifier carried by 16 wire bytes; ``ValueError`` for any other length."""
    if len(data) != ID_BYTES:
        raise ValueError(f"an identifier is {ID_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")


def distance(a: int, b: int) -> int:
    """Clockwise distance from ``a`` to ``b`` on the ring (0 when equal)."""
    return (b - a) % RING


def between(x: int, a: int, b: int) -> bool:
    """``x`` in the open interval ``(a, b)`` going clockwise; with ``a == b`` that is every id but ``a``."""
    if a == b:
        return x != a
    return 0 < (x - a) % RING < (b - a) % RING


def between_right(x: int, a: int, b: int) -> bool:
    """``x`` in the half-open interval ``(a, b]``; with ``a == b`` that is the whole ring."""
    if a == b:
        return True
    return 0 < (x - a) % RING <= (b - a) % RING


def short(ident: int) -> str:
    """A short hex form for logs and tables (first 8 hex digits)."""
    return f"{ident:032x}"[:8]
