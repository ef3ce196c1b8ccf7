"""Storage fill by strangers (issue 17), on real sockets: replica stores and transfers are taken only from
verified ring members, only for keys the receiving node keeps a copy of, and kept no longer than the
lifetime cap.

Before this, any host could send ``store`` with ``replica: true`` (which skips the responsibility check) or
``transfer`` (no check at all): 300 entries of 16 KiB with 7-day lifetimes were accepted in 0.2 s.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
from overlay_support import started_ring

from overlay.chord import ChordConfig, NodeRef
from overlay.identity import KeyPair
from overlay.ids import key_for
from overlay.node import Node, NodeConfig
from overlay.storage import Entry
from overlay.wire import TCP_MAX, Codec, FrameDecoder, Message, frame

OVERLAY = "strangers"
R = 3
WEEK = 7 * 24 * 3600
CFG = NodeConfig(
    chord=ChordConfig(
        successors=R, stabilize_interval=0.25, fix_fingers_interval=0.5, check_predecessor_interval=0.25
    ),
    rpc_timeout=0.5,
    op_timeout=10.0,
    repair_interval=30.0,
)


async def _tcp_exchange(node: Node, messages: list[Message]) -> list[Message]:
    """Send requests over one TCP connection to ``node`` and read one reply per request."""
    codec = Codec(OVERLAY)
    reader, writer = await asyncio.open_connection(*node.endpoint)
    replies: list[Message] = []
    try:
        decoder = FrameDecoder()
        for msg in messages:
            writer.write(frame(codec.encode(msg, max_size=TCP_MAX)))
            await writer.drain()
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 5.0)
                assert chunk, "the node closed the connection"
                got = [codec.decode(p, max_size=TCP_MAX) for p in decoder.feed(chunk)]
                if got:
                    replies.extend(got)
                    break
    finally:
        writer.close()
    return replies


async def _settled(nodes: list[Node]) -> None:
    """Every node knows r predecessors (so it knows which keys it holds a copy of)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    while not all(n.core is not None and len(n.core.predecessors) >= R for n in nodes):
        assert loop.time() < deadline, "predecessor lists did not fill"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_a_strangers_replica_stores_and_transfers_are_refused_and_counted() -> None:
    async with started_ring(5, overlay_name=OVERLAY, config=CFG) as nodes:
        await _settled(nodes)
        target = nodes[2]
        before = len(target.store)
        user = KeyPair.generate()
        # Keys this node does keep copies of: a member could send them, a stranger still may not.
        keys = [k for k in (key_for(f"sip:fill{i}@x.example") for i in range(3000)) if target.core
                and target.core.holds_replica(k, R)][:300]  # fmt: skip
        assert len(keys) == 300
        value = os.urandom(16 * 1024)
        entries = [Entry.create(user, k, b"e", value, 1, WEEK) for k in keys]
        stranger_id = int.from_bytes(os.urandom(16), "big")
        ep = ("127.0.0.1", 9)  # a stranger over TCP: its claimed endpoint is not checked against the port
        stores = [Message("store", i + 1, stranger_id, ep, {"entry": e, "replica": True}) for i, e in
                  enumerate(entries)]  # fmt: skip
        replies = await _tcp_exchange(target, stores)
        assert [(r.type, r.body["reason"]) for r in replies] == [("err", "not-a-member")] * 300
        transfer = Message(
            "transfer", 999, stranger_id, ep, {"entries": [(e, WEEK * 1000) for e in entries[:50]]}
        )
        (reply,) = await _tcp_exchange(target, [transfer])
        assert (reply.type, reply.body["reason"]) == ("err", "not-a-member")
        # Over UDP too (a small entry; the stranger's claimed endpoint is its real one).
        small = Entry.create(user, keys[0], b"u", b"x" * 100, 1, WEEK)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            codec = Codec(OVERLAY)
            msg = Message("store", 1, stranger_id, sock.getsockname(), {"entry": small, "replica": True})
            sock.sendto(codec.encode(msg), target.endpoint)
            # The node first asks the claimed NodeId to prove itself (a nonce ping the stranger cannot
            # answer for an identity it has no key of), then refuses.
            asked = []
            while True:
                data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 2048), 10.0)
                udp_reply = codec.decode(data)
                if udp_reply.is_reply:
                    break
                asked.append(udp_reply.type)
        finally:
            sock.close()
        assert (udp_reply.type, udp_reply.body["reason"]) == ("err", "not-a-member")
        assert asked and set(asked) == {"ping"}
        assert len(target.store) == before  # nothing kept
        stats = target.stats()
        assert stats["store_refused_stranger"] == 301
        assert stats["transfer_refused_stranger"] == 1
        assert stats["entries_refused_stranger"] == 351


@pytest.mark.asyncio
async def test_members_send_replicas_only_of_keys_the_receiver_holds() -> None:
    async with started_ring(5, overlay_name=OVERLAY, config=CFG) as nodes:
        await _settled(nodes)
        target, member = nodes[2], nodes[0]
        assert target.core is not None
        user = KeyPair.generate()
        held = next(k for k in (key_for(f"h{i}") for i in range(1000)) if target.core.holds_replica(k, R))
        other = next(
            k for k in (key_for(f"o{i}") for i in range(1000)) if not target.core.holds_replica(k, R)
        )
        to = NodeRef(target.node_id, *target.endpoint)
        deadline = asyncio.get_running_loop().time() + 5.0

        def entry(key: int, eid: bytes) -> Entry:
            return Entry.create(user, key, eid, b"v", 1, 60)

        ok = await member._call(to, "store", {"entry": entry(held, b""), "replica": True}, deadline=deadline)
        assert ok.type == "ok"
        body = {"entry": entry(other, b""), "replica": True}
        refused = await member._call(to, "store", body, deadline=deadline)
        assert (refused.type, refused.body["reason"]) == ("err", "not-replica")
        items = [(entry(k, b"t"), 60_000) for k in (held, other)]
        moved = await member._call(to, "transfer", {"entries": items}, deadline=deadline)
        assert moved.type == "ok" and moved.body["stored"] == 1
        assert target.stats()["transfer_entries_not_held"] == 1


@pytest.mark.asyncio
async def test_lifetime_is_capped_by_policy() -> None:
    async with started_ring(4, overlay_name=OVERLAY, config=CFG) as nodes:
        await _settled(nodes)
        name = "sip:longlived@x.example"
        await nodes[1].put(name, b"v", lifetime=WEEK)
        key = key_for(name)
        now = time.time()  # stored entries expire on the wall clock (they survive restarts)
        kept = [ms for n in nodes for e, ms in n.store.slot_records(key, now)]
        assert len(kept) >= R
        assert CFG.lifetime_cap is not None
        assert all(ms <= CFG.lifetime_cap * 1000 for ms in kept), kept
        assert sum(n.stats().get("lifetime_capped", 0) for n in nodes) >= 1
