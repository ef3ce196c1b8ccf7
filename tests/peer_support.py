"""Peers for tests: started on loopback and closed however the test ends; wait until the overlay ring of
peers started in this process is consistent."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

from overlay.localring import quick_node_config, wait_until_consistent
from overlay.node import NodeConfig
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.peer import Peer
from p2psip.timers import TimerConfig

FAST_TIMERS = TimerConfig(t1=0.05, t2=0.4, t4=0.5, timer_c=1.5)
"""SIP timers of test peers: retransmissions and timeouts in tenths of seconds, not seconds."""

PeerFactory = Callable[..., Awaitable[Peer]]


@contextlib.asynccontextmanager
async def peer_factory(tmp_path: Path) -> AsyncIterator[PeerFactory]:
    """``make(join=None, *, data_dir=None, node_config=None, **settings)`` starts a peer: UDP SIP and the
    overlay on free loopback ports, joining ``join``'s ring (a peer, or its overlay address), its data dir
    under ``tmp_path`` (one each), no lookup cache, :data:`FAST_TIMERS`, ``settings`` set on its
    :class:`PeerConfig`. Every peer still running is closed (without leaving) on exit."""
    started: list[Peer] = []
    counter = iter(range(1000))

    async def make(
        join: Peer | HostPort | None = None,
        *,
        data_dir: Path | None = None,
        node_config: NodeConfig | None = None,
        **settings: object,
    ) -> Peer:
        config = PeerConfig(
            listen=[ListenSpec("udp", "127.0.0.1", 0)],
            overlay=HostPort("127.0.0.1", 0),
            join=HostPort(*join.overlay_address) if isinstance(join, Peer) else join,
            data_dir=data_dir or tmp_path / f"peer{next(counter)}",
            cache_ttl=0.0,
        )
        for key, value in settings.items():
            setattr(config, key, value)
        peer = await Peer.start(
            config, node_config=node_config or quick_node_config(), stack_options={"timers": FAST_TIMERS}
        )
        started.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in started:
            if not peer._closed:
                await peer.close(leave=False)


async def wait_until_settled(peers: Iterable[Peer], timeout: float = 10.0) -> float:
    """Wait (bounded) until the ring of ``peers`` is consistent, successor lists deep enough for a write's
    replicas (r = 3: the next two) filled too; the seconds it took (TimeoutError after). With only the
    first successor checked, a REGISTER right after could find a node whose list held one entry and
    store 2 copies instead of 3 (seen once in CI: test_register_writes_one_signed_entry_per_contact)."""
    return await wait_until_consistent([p.node for p in peers], timeout, depth=2)
