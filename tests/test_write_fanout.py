"""The writer fans a store out to the key's holders itself (issue 19), on real sockets: a ring of 5.

The writer sends the entry to the primary (``fanout``: keep it, forward nothing) and to the replicas its
lookup named, all at once, and its put returns once the primary and enough copies for the write quorum
acknowledged: one round trip instead of two, and an entry peer that is a replica keeps its copy without a
datagram. A copy that goes missing is handed to the primary (which asks its replicas again), and a write the
primary refused by policy is taken back from a replica that had missed the owner's entries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from overlay_support import started_ring
from test_node_net import wait_until

from overlay.chord import ChordConfig
from overlay.errors import StoreRefused
from overlay.identity import KeyPair
from overlay.ids import key_for
from overlay.node import Node, NodeConfig

OVERLAY = "fanout"
R = 3
CFG = NodeConfig(
    chord=ChordConfig(
        successors=R, stabilize_interval=0.25, fix_fingers_interval=0.5, check_predecessor_interval=0.25
    ),
    rpc_timeout=0.3,
    op_timeout=10.0,
    repair_interval=60.0,
    write_quorum=2,  # as a peer's REGISTER asks
)


async def _ring_ready(nodes: list[Node]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    while not all(n.core is not None and len(n.core.predecessors) >= R for n in nodes):
        assert loop.time() < deadline, "the ring did not settle"
        await asyncio.sleep(0.05)


def _holders(nodes: list[Node], name: str) -> list[Node]:
    key = key_for(name)
    primary = next(n for n in nodes if n.core is not None and n.core.is_responsible(key))
    order = sorted(nodes, key=lambda n: (n.node_id - primary.node_id) % (1 << 128))
    return order[:R]


def _name(nodes: list[Node], writer: Node, *, writer_holds: int | None) -> str:
    """A name whose holders do not include ``writer`` (None) or have it at position ``writer_holds``."""
    for i in range(5000):
        name = f"sip:fan{i}@fanout.example"
        holders = _holders(nodes, name)
        position = holders.index(writer) if writer in holders else None
        if position == writer_holds:
            return name
    raise AssertionError("no such name")


def _rpcs(node: Node) -> int:
    return int(node.stats().get("storage_rpcs", 0))


def _has(node: Node, name: str, value: bytes) -> bool:
    return any(e.value == value for e in node.store.get(key_for(name), time.time()))


async def test_the_writer_sends_every_copy_and_the_primary_forwards_nothing() -> None:
    async with started_ring(5, overlay_name=OVERLAY, config=CFG) as nodes:
        await _ring_ready(nodes)
        writer = nodes[0]
        name = _name(nodes, writer, writer_holds=None)
        holders = _holders(nodes, name)
        here = writer.at(name)
        assert await here.get() == []  # the read finds the holders (one lookup)
        before = {n.node_id: _rpcs(n) for n in nodes}
        await here.put(b"contact", entry_id=b"phone")
        # the writer sent the three copies itself, one datagram each; the primary sent none
        assert _rpcs(writer) - before[writer.node_id] == R
        assert _rpcs(holders[0]) == before[holders[0].node_id]
        assert writer.stats()["fanout_writes"] == 1
        # the put returned with the primary's copy and one more at least; all three arrive
        assert _has(holders[0], name, b"contact")
        assert sum(_has(h, name, b"contact") for h in holders) >= 2
        await wait_until(lambda: all(_has(h, name, b"contact") for h in holders), "three copies")
        assert not any(_has(n, name, b"contact") for n in nodes if n not in holders)
        assert [e.value for e in await nodes[3].get(name)] == [b"contact"]
        # the entry peer that is a replica keeps its copy without a datagram: two go out
        own = _name(nodes, writer, writer_holds=1)
        here = writer.at(own)
        await here.get()
        sent = _rpcs(writer)
        await here.put(b"mine", entry_id=b"phone")
        assert _rpcs(writer) - sent == R - 1
        assert _has(writer, own, b"mine") and _has(_holders(nodes, own)[0], own, b"mine")


async def test_a_lost_copy_does_not_hold_up_the_write_and_the_primary_repairs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every datagram from the writer to one replica is lost: the put still returns at once (primary and
    the other replica), and when that copy's retries run out the writer hands the store to the primary,
    which sends the replica its copy."""
    # a whole second per attempt: however slow the machine, the put is back before the lost copy's first
    # retransmission, and its last attempt ends 3 s after the write (then the hand-back)
    config = dataclasses.replace(CFG, rpc_timeout=1.0)
    async with started_ring(5, overlay_name=OVERLAY, config=config) as nodes:
        await _ring_ready(nodes)
        writer = nodes[1]
        name = _name(nodes, writer, writer_holds=None)
        primary, deaf, other = _holders(nodes, name)
        here = writer.at(name)
        await here.get()
        original = Node._sendto

        def lossy(self: Node, data: bytes, ep: Any) -> None:
            if self is writer and tuple(ep) == deaf.endpoint:
                return
            original(self, data, ep)

        monkeypatch.setattr(Node, "_sendto", lossy)
        resent = writer.stats().get("rpc_retransmissions", 0)
        await here.put(b"contact", entry_id=b"phone")
        # returned without waiting for the lost copy: it has not even been sent a second time
        assert writer.stats().get("rpc_retransmissions", 0) == resent
        assert _has(primary, name, b"contact") and _has(other, name, b"contact")
        assert not _has(deaf, name, b"contact")
        await wait_until(lambda: _has(deaf, name, b"contact"), "the primary to repair the lost copy")
        assert writer.stats()["fanout_copies_handed_back"] == 1
        assert primary.storage.stats.get("store_duplicates", 0) >= 1  # it asked its replicas again


async def test_a_write_the_primary_refuses_is_taken_back_from_a_stale_replica() -> None:
    """Under first-claim the primary refuses a second user key; a replica that had lost the owner's
    entries took the copy the writer sent it. The writer raises StoreRefused and the replica gets a signed
    removal of that copy, so no holder serves a write the key's owner never allowed."""
    async with started_ring(5, overlay_name=OVERLAY, config=CFG) as nodes:
        await _ring_ready(nodes)
        owner, thief = KeyPair.generate(), KeyPair.generate()
        writer = nodes[2]
        name = _name(nodes, writer, writer_holds=None)
        primary, stale, other = _holders(nodes, name)
        await nodes[0].put(name, b"owner's", entry_id=b"phone", key=owner)
        await wait_until(lambda: all(_has(h, name, b"owner's") for h in (primary, stale, other)), "3 copies")
        # the stale replica loses what it held under the key (as a replica that missed the writes)
        key = key_for(name)
        for record in stale.store._by_key.pop(key).values():
            stale.store._release(record.entry.owner)
        here = writer.at(name)
        with pytest.raises(StoreRefused) as refused:
            await here.put(b"thief's", entry_id=b"laptop", key=thief)
        assert refused.value.reason == "policy"

        def taken_back() -> bool:
            held = stale.store.current(key, b"laptop")
            return held is not None and held.is_removal and held.owner == thief.public_key

        await wait_until(taken_back, "the stale replica to get the removal")
        assert writer.stats()["fanout_refused_taken_back"] == 1
        assert not any(e.owner == thief.public_key for n in nodes for e in n.store.get(key, time.time()))
        # the owner's entry is what every reader gets
        assert [e.value for e in await nodes[4].get(name)] == [b"owner's"]


async def test_without_a_replica_set_the_primary_replicates_as_before() -> None:
    """A node that knows no holders beyond the primary (write quorum 1, plain ``put`` after a lookup that
    named no successors) sends a plain store and the primary fans out; here forced by a one-holder view."""
    config = dataclasses.replace(CFG, write_quorum=1)
    async with started_ring(5, overlay_name=OVERLAY, config=config) as nodes:
        await _ring_ready(nodes)
        writer = nodes[3]
        name = _name(nodes, writer, writer_holds=None)
        holders = _holders(nodes, name)
        here = writer.at(name)
        await here.get()
        here.holders = here.holders[:1]
        before = _rpcs(holders[0])
        await here.put(b"contact", entry_id=b"phone")
        assert "fanout_writes" not in writer.stats()
        await wait_until(lambda: all(_has(h, name, b"contact") for h in holders), "three copies")
        assert _rpcs(holders[0]) - before == R - 1  # the primary sent the replicas their copies
