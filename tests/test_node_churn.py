"""Churn on real sockets: nodes join, crash and leave one at a time while entries keep being written.

After each event the test waits (bounded) until the ring is consistent and every entry has r copies
again, then carries on; at the end every entry written is readable from any node. Seeded, bounded.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from test_node_net import FAST, HOST, R, ring_consistent, wait_until

from overlay.ids import key_for
from overlay.node import Node

pytestmark = pytest.mark.slow


def copies(nodes: list[Node], name: str, value: bytes) -> int:
    key = key_for(name)
    return sum(1 for n in nodes if any(e.value == value for e in n.store.get(key, time.time())))


async def test_churn_loses_nothing() -> None:
    rng = random.Random(2024)
    first = await Node.start(bind=(HOST, 0), join=None, overlay_name="churn", config=FAST)
    nodes = [first]
    everyone = [first]
    written: dict[str, bytes] = {}
    try:
        for _ in range(9):
            node = await Node.start(bind=(HOST, 0), join=first.endpoint, overlay_name="churn", config=FAST)
            nodes.append(node)
            everyone.append(node)
        await wait_until(lambda: ring_consistent(nodes), "initial ring")
        events = ["crash", "join", "leave", "crash", "join", "crash", "leave", "join"]
        for round_no, event in enumerate(events):
            for i in range(5):
                name = f"sip:churn{round_no}-{i}@example.net"
                value = f"{round_no}-{i}".encode()
                await rng.choice(nodes).put(name, value)
                written[name] = value
            if event == "join":
                node = await Node.start(
                    bind=(HOST, 0), join=rng.choice(nodes).endpoint, overlay_name="churn", config=FAST
                )
                nodes.append(node)
                everyone.append(node)
            else:
                victim = rng.choice(nodes[1:])
                nodes.remove(victim)
                await (victim.close() if event == "crash" else victim.leave())
            await wait_until(lambda: ring_consistent(nodes), f"ring consistent after {event}")
            await wait_until(
                lambda: all(copies(nodes, n, v) >= R for n, v in written.items()),
                f"r copies of every entry after {event}",
            )
        for name, value in written.items():
            assert [e.value for e in await rng.choice(nodes).get(name)] == [value], name
    finally:
        await asyncio.gather(*(n.close() for n in everyone))
