"""Peers for tests: wait until the overlay ring of peers started in this process is consistent."""

from __future__ import annotations

from collections.abc import Iterable

from overlay.localring import wait_until_consistent
from p2psip.peer import Peer


async def wait_until_settled(peers: Iterable[Peer], timeout: float = 10.0) -> float:
    """Wait (bounded) until the ring of ``peers`` is consistent; the seconds it took (TimeoutError after)."""
    return await wait_until_consistent([p.node for p in peers], timeout)
