"""A read through a stale owner cache, on real sockets: a node joined inside the cached range since.

A reader keeps a lookup's answer (owner and range) for a while, so later reads of keys in that range skip
the lookup. When a node joins inside that range, the cached owner is no longer responsible for part of
it; a read there used to go to the old owner and its successors and believe their "nothing", though the
write had just succeeded on the new node (tests/test_node_net.py caught it under load, with copies still
on their way). Now the node asked as responsible checks that it is (``fetch`` with ``owner``), answers
421 if not, and the reader looks the key up again. One copy per entry (``replicas=1``) makes the stale
answer certain here: the old owner holds nothing of the key.
"""

from __future__ import annotations

import asyncio

import pytest
from test_node_net import FAST, HOST, wait_until

from overlay.identity import KeyPair
from overlay.ids import RING, between_right, key_for
from overlay.localring import ring_is_consistent
from overlay.node import Node

OVERLAY = "stale-owner"


def _name_just_after(pred: int, owner: int) -> str:
    """A name whose key lies in the first quarter of (pred, owner]."""
    span = (owner - pred) % RING
    for i in range(100_000):
        name = f"sip:stale{i}@example.net"
        if 0 < (key_for(name) - pred) % RING <= span // 4:
            return name
    raise AssertionError("no name found in the range")


def _identity_between(key: int, owner: int) -> KeyPair:
    """A node key whose NodeId lies in [key, owner): that node becomes responsible for ``key``."""
    for _ in range(10_000):
        pair = KeyPair.generate()
        if between_right(pair.node_id, (key - 1) % RING, (owner - 1) % RING):
            return pair
    raise AssertionError("no node key found in the range")


@pytest.mark.asyncio
async def test_a_read_through_a_stale_owner_cache_looks_the_key_up_again() -> None:
    nodes: list[Node] = []
    try:
        nodes.append(await Node.start(bind=(HOST, 0), overlay_name=OVERLAY, replicas=1, config=FAST))
        for _ in range(4):
            nodes.append(
                await Node.start(
                    bind=(HOST, 0), join=nodes[0].endpoint, overlay_name=OVERLAY, replicas=1, config=FAST
                )
            )
        await wait_until(lambda: ring_is_consistent(nodes, depth=3), "a settled ring of 5")
        ring = sorted(nodes, key=lambda n: n.node_id)
        pred, owner, reader = ring[1], ring[2], ring[3]  # the reader's neighbours stay as they are
        name = _name_just_after(pred.node_id, owner.node_id)
        key = key_for(name)

        assert await reader.get(name) == []  # the lookup's answer (owner's range) is cached now
        loop = asyncio.get_running_loop()
        assert reader.core is not None
        cached = reader.core._cached_owner(key, loop.time())
        assert cached is not None and cached.owner.id == owner.node_id

        newcomer = await Node.start(
            bind=(HOST, 0),
            join=pred.endpoint,
            overlay_name=OVERLAY,
            replicas=1,
            config=FAST,
            identity=_identity_between(key, owner.node_id),
        )
        nodes.append(newcomer)
        await wait_until(lambda: ring_is_consistent(nodes, depth=3), "the newcomer settled in")
        await pred.put(name, b"after the join")
        assert [e.value for e in newcomer.store.get(key, 0)] == [b"after the join"]
        assert owner.store.get(key, 0) == []
        still = reader.core._cached_owner(key, loop.time())
        assert still is not None and still.owner.id == owner.node_id  # the stale range is still cached

        assert [e.value for e in await reader.get(name)] == [b"after the join"]
        assert reader.stats()["reads_misdirected"] == 1
        assert owner.stats()["fetch_not_owner"] == 1
        # the next read goes straight to the newcomer: the stale range is forgotten
        assert [e.value for e in await reader.get(name)] == [b"after the join"]
        assert reader.stats()["reads_misdirected"] == 1
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
