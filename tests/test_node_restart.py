"""Nodes restarted with their data dir (real sockets on loopback, one process): a whole ring stopped
without hand-off and started again still serves every entry; a node that comes back to a ring that
changed hands what it held to where it belongs now, and never brings back what was replaced meanwhile.

The same with real ``p2psip start`` processes (SIGTERM and SIGKILL) is in tests/test_peer_restart.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from test_node_net import FAST, HOST, ring_consistent, wait_until

from overlay.identity import KeyPair
from overlay.ids import key_for
from overlay.node import Node

pytestmark = [pytest.mark.slow]
OVERLAY = "restart"


async def start(tmp: Path, name: str, join: Node | None, replicas: int = 3) -> Node:
    return await Node.start(
        bind=(HOST, 0),
        join=join.endpoint if join else None,
        data_dir=tmp / name,
        overlay_name=OVERLAY,
        replicas=replicas,
        config=FAST,
    )


def holders(nodes: list[Node], name: str, value: bytes) -> list[Node]:
    key = key_for(name)
    return [n for n in nodes if any(e.value == value for e in n.store.get(key, time.time()))]


def responsible_and_next(nodes: list[Node], name: str) -> list[Node]:
    ordered = sorted(nodes, key=lambda n: n.node_id)
    key = key_for(name)
    i = next((i for i, n in enumerate(ordered) if n.node_id >= key), 0)
    return [ordered[i], ordered[(i + 1) % len(ordered)]]


async def test_whole_ring_stopped_and_started_keeps_every_entry(tmp_path: Path) -> None:
    first = await start(tmp_path, "n0", None)
    nodes = [first] + [await start(tmp_path, f"n{i}", first) for i in range(1, 5)]
    try:
        await wait_until(lambda: ring_consistent(nodes), "a ring of 5")
        user = KeyPair.generate()
        names = {f"sip:user{i}@example.net": b"contact-%d" % i for i in range(20)}
        for name, value in names.items():
            await nodes[len(name) % 5].put(name, value, key=user, lifetime=600)
        await nodes[0].remove("sip:user3@example.net", key=user)
    finally:
        await asyncio.gather(*(n.close() for n in nodes))  # like a crash: no hand-off
    del names["sip:user3@example.net"]
    first = await start(tmp_path, "n0", None)
    assert first.store.loaded > 0  # type: ignore[attr-defined]
    nodes = [first] + [await start(tmp_path, f"n{i}", first) for i in range(1, 5)]
    try:
        await wait_until(lambda: ring_consistent(nodes), "the ring of 5 again")
        for name, value in names.items():
            assert [e.value for e in await nodes[3].get(name)] == [value], name
        assert await nodes[2].get("sip:user3@example.net") == []  # the removal survived too
    finally:
        await asyncio.gather(*(n.close() for n in nodes))


async def test_a_node_back_in_a_changed_ring_hands_over_what_it_held(tmp_path: Path) -> None:
    user = KeyPair.generate()
    # A lone node holds everything, then stops.
    lone = await start(tmp_path, "lone", None, replicas=2)
    names = {f"sip:moved{i}@example.net": b"v1-%d" % i for i in range(12)}
    for name, value in names.items():
        await lone.put(name, value, key=user, lifetime=600)
    await lone.close()
    # Meanwhile a ring of fresh nodes forms, and one name gets a newer value there.
    first = await start(tmp_path, "a", None, replicas=2)
    ring = [first] + [await start(tmp_path, x, first, replicas=2) for x in "bcd"]
    back: Node | None = None
    try:
        await wait_until(lambda: ring_consistent(ring), "a ring of 4")
        updated = "sip:moved0@example.net"
        await ring[1].put(updated, b"v2", key=user, lifetime=600)
        names[updated] = b"v2"
        back = await start(tmp_path, "lone", first, replicas=2)
        everyone = [*ring, back]
        await wait_until(lambda: ring_consistent(everyone), "a ring of 5")

        def placed() -> bool:
            # every name on its responsible node and that node's successor (r = 2)
            return all(
                set(responsible_and_next(everyone, n)) <= set(holders(everyone, n, v))
                for n, v in names.items()
            )

        await wait_until(placed, "every entry on 2 nodes")
        for name, value in names.items():
            assert [e.value for e in await ring[2].get(name)] == [value], name
        assert back.stats().get("announce_keys", 0) > 0
    finally:
        await asyncio.gather(*(n.close() for n in ring + ([back] if back else [])))


async def test_stores_arriving_together_share_one_commit_and_are_answered_after_it(tmp_path: Path) -> None:
    """The node reads every datagram waiting on its socket in one go and commits the entry store once for
    the lot, answering the stores only after that commit (issue 19: a commit each cost ~0.1 ms per copy
    of a registration). Eight stores sent while the loop is busy arrive as one burst: one COMMIT, eight
    ok answers, and every row on disk when the answers come."""
    import socket

    from overlay.storage import Entry
    from overlay.wire import Codec, Message

    node = await start(tmp_path, "alone", None)
    try:
        statements: list[str] = []
        node.store._db.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        user = KeyPair.generate()
        codec = Codec(OVERLAY)
        bursts = node.stats().get("udp_bursts", 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((HOST, 0))
            me = sock.getsockname()
            for i in range(8):  # no await in between: the node's reader cannot run until all are queued
                entry = Entry.create(user, key_for(f"sip:burst{i}@example.net"), b"phone", b"c", 1, 600)
                msg = Message("store", 100 + i, 7, me, {"entry": entry})
                sock.sendto(codec.encode(msg), node.endpoint)
            await wait_until(lambda: node.stats().get("stores_accepted", 0) >= 8, "the stores to be handled")
            sock.setblocking(False)
            answers = [codec.decode(sock.recv(2048)) for _ in range(8)]
        assert sorted(a.id for a in answers) == list(range(100, 108))
        assert all(a.type == "ok" and a.body["stored"] == 1 for a in answers)
        assert node.stats()["udp_bursts"] == bursts + 1
        assert statements.count("COMMIT") == 1 and statements.count("BEGIN") == 1
    finally:
        await node.close()
    again = await start(tmp_path, "alone", None)
    try:
        assert len(again.store) == 8
    finally:
        await again.close()
