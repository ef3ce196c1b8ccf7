"""Storage over a lossy network: 10% of all datagrams dropped (seeded), every put and get still succeeds.

The loss is injected in each node's send path, so every message type, requests and replies, is exposed:
what is measured is the retry logic of the node (request ids, retransmission with backoff, duplicate
suppression on the server side) and of the chord core.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from overlay_support import started_ring

from overlay.chord import ChordConfig
from overlay.node import Node, NodeConfig

pytestmark = pytest.mark.slow

LOSS = 0.10


async def test_put_get_survive_ten_percent_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(42)
    original = Node._sendto
    dropped = 0

    def lossy(self: Node, data: bytes, ep: Any) -> None:
        nonlocal dropped
        if rng.random() < LOSS:
            dropped += 1
            return
        original(self, data, ep)

    cfg = NodeConfig(
        chord=ChordConfig(
            stabilize_interval=0.25, fix_fingers_interval=0.5, check_predecessor_interval=0.5, rpc_timeout=0.3
        ),
        rpc_timeout=0.3,
        rpc_retries=3,
        op_timeout=20.0,
        repair_interval=1.0,
    )
    async with started_ring(10, overlay_name="lossy", config=cfg) as nodes:
        try:
            monkeypatch.setattr(Node, "_sendto", lossy)
            names = [f"sip:lossy{i}@example.net" for i in range(24)]
            for i, name in enumerate(names):
                await nodes[i % len(nodes)].put(name, name.encode())
            for i, name in enumerate(names):
                got = await nodes[(i * 7 + 3) % len(nodes)].get(name)
                assert [e.value for e in got] == [name.encode()], name
            assert dropped > 10  # the loss was real
            retransmitted = sum(n.stats().get("rpc_retransmissions", 0) for n in nodes)
            assert retransmitted > 0
            # a retransmitted store that had already been applied is answered, not refused as a replay
            assert not any(n.stats().get("store_refused_stale_seq") for n in nodes)
        finally:
            monkeypatch.setattr(Node, "_sendto", original)
