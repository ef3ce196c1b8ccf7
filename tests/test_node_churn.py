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


def shortfall(nodes: list[Node], written: dict[str, bytes]) -> str:
    """What a failed wait for r copies leaves behind: each short entry, who holds it, who should (the key's
    r successors among the live nodes), and the storage counters that tell why (for a CI log)."""
    ring = sorted(nodes, key=lambda n: n.node_id)
    ids = {n.node_id: f"n{i}" for i, n in enumerate(ring)}
    lines = []
    for name, value in written.items():
        if copies(nodes, name, value) >= R:
            continue
        key = key_for(name)
        first = next((i for i, n in enumerate(ring) if n.node_id >= key), 0)
        should = [ids[ring[(first + k) % len(ring)].node_id] for k in range(min(R, len(ring)))]
        held = [ids[n.node_id] for n in ring if any(e.value == value for e in n.store.get(key, time.time()))]
        lines.append(f"  {name}: held by {held}, should be {should}")
    for n in ring:
        core = n.core
        preds = [ids.get(p.id, "gone") for p in core.predecessors] if core else []
        succs = [ids.get(s.id, "gone") for s in core.successors] if core else []
        counters = {k: v for k, v in n.stats().items() if isinstance(v, int) and v and any(
            w in k for w in ("transfer", "digest", "repair", "refused", "not_held", "fanout", "handed"))}
        lines.append(f"  {ids[n.node_id]}: preds {preds} succs {succs} {counters}")
    return "\n".join(lines)


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
            try:
                await wait_until(
                    lambda: all(copies(nodes, n, v) >= R for n, v in written.items()),
                    f"r copies of every entry after {event}",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc} (round {round_no})\n{shortfall(nodes, written)}") from None
        for name, value in written.items():
            assert [e.value for e in await rng.choice(nodes).get(name)] == [value], name
    finally:
        await asyncio.gather(*(n.close() for n in everyone))
