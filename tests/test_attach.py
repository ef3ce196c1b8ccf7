"""Client peers (overlay.attach, the attach/relay_store/relay_fetch wire messages).

The attach state is tested with a fake clock; the exchange runs between real nodes on loopback: a client
peer (forced by ``client``, or unreachable at its advertised address with ``client_peers``) stays out of
every routing table, stores and reads through its attach peer with entries signed by itself, and moves to
a fallback when its attach peer dies.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

import msgpack
import pytest

from overlay.attach import AttachState
from overlay.chord import ChordConfig
from overlay.identity import KeyPair
from overlay.node import Node, NodeConfig
from overlay.wire import ATTACH_MESSAGES, Codec
from tests.overlay_support import started_ring, wire_fuzz_test

OVERLAY = "attach-test"
FAST = NodeConfig(
    chord=ChordConfig(stabilize_interval=0.2, fix_fingers_interval=0.5, check_predecessor_interval=0.5),
    rpc_timeout=0.3,
    rpc_retries=1,
    op_timeout=10.0,
    join_timeout=10.0,
    attach_interval=0.5,
)

# ---------------------------------------------------------------------------------------------- sans-IO


def test_keepalives_fall_due_per_interval_and_answers_bring_fallbacks() -> None:
    st_ = AttachState(("10.0.0.1", 7060), interval=15.0)
    assert st_.due(0.0)
    st_.sent(0.0)
    assert not st_.due(14.9) and st_.due(15.0)
    st_.answered(0.2, ("203.0.113.7", 40000), [("10.0.0.1", 7060), ("10.0.0.2", 7060), ("10.0.0.3", 7060)])
    assert st_.seen == ("203.0.113.7", 40000)
    assert st_.fallbacks == [("10.0.0.2", 7060), ("10.0.0.3", 7060)]  # never itself
    st_.answered(16.0, None, [])
    assert st_.fallbacks == [("10.0.0.2", 7060), ("10.0.0.3", 7060)]  # an empty list keeps the old ones
    assert st_.last_answer == 16.0 and st_.seen == ("203.0.113.7", 40000)


def test_a_dead_attach_peer_is_replaced_by_a_fallback_after_the_misses() -> None:
    st_ = AttachState(("10.0.0.1", 7060), interval=15.0, misses_before_dead=3)
    st_.answered(0.0, None, [("10.0.0.2", 7060)])
    assert st_.missed(15.0) is None and st_.missed(30.0) is None
    assert st_.missed(45.0) == ("10.0.0.2", 7060)
    assert st_.peer == ("10.0.0.2", 7060) and st_.reattached == 1
    assert st_.fallbacks == [("10.0.0.1", 7060)]  # the old one may come back
    assert st_.due(45.0) and st_.misses == 0
    st_.answered(45.1, None, [("10.0.0.3", 7060)])
    assert st_.misses == 0 and st_.fallbacks == [("10.0.0.3", 7060)]


def test_without_fallbacks_the_attach_peer_is_kept_and_gone_switches_at_once() -> None:
    st_ = AttachState(("10.0.0.1", 7060), misses_before_dead=1)
    assert st_.missed(1.0) is None and st_.peer == ("10.0.0.1", 7060)
    st_.answered(2.0, None, [("10.0.0.2", 7060), ("10.0.0.3", 7060)])
    assert st_.gone(3.0) == ("10.0.0.2", 7060)
    assert st_.as_dict()["peer"] == "10.0.0.2:7060" and st_.as_dict()["reattached"] == 1


# ---------------------------------------------------------------------------------------------- wire


test_attach_messages_are_validated_strictly = wire_fuzz_test(
    OVERLAY, ATTACH_MESSAGES, ["cert", "entry", "key"], "Client-peer (attach)"
)


async def test_garbage_and_strangers_relays_are_dropped_counted_or_refused() -> None:
    async with started_ring(1, overlay_name=OVERLAY, config=FAST) as (node,):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            bad = msgpack.packb(
                {"v": 1, "ov": OVERLAY, "t": "relay_fetch", "id": 5, "src": b"\x01" * 16, "ep": ["x", 1]}
            )  # no key
            sock.sendto(bad, node.endpoint)
            # a well-formed relay from a node that never attached: refused, nothing read for it
            codec = Codec(OVERLAY)
            from overlay.wire import Message

            sock.sendto(
                codec.encode(Message("relay_fetch", 6, 2, ("127.0.0.1", 1), {"key": 7})), node.endpoint
            )
            loop = asyncio.get_running_loop()
            reply = codec.decode(await asyncio.wait_for(loop.sock_recv(sock, 65536), 5.0))
            assert reply.type == "err" and reply.body["reason"] == "not-attached"
            assert node.stats()["dropped"] >= 1 and node.stats()["relay_refused"] == 1
            # a detach for a node that is not attached here (or from elsewhere than its keep-alives): refused
            sock.sendto(codec.encode(Message("detach", 7, 2, ("127.0.0.1", 1), {})), node.endpoint)
            reply = codec.decode(await asyncio.wait_for(loop.sock_recv(sock, 65536), 5.0))
            assert reply.type == "err" and reply.body["reason"] == "not-attached"
            assert node.stats()["detach_refused"] == 1
        finally:
            sock.close()


# ---------------------------------------------------------------------------------------------- nodes


def _in_routing(node: Node, client_id: int) -> bool:
    core = node.core
    assert core is not None
    refs = [*core.successors, *core.fingers()]
    pred = core.predecessor
    return any(r.id == client_id for r in refs) or (pred is not None and pred.id == client_id)


async def test_a_forced_client_peer_stores_and_reads_through_its_attach_peer() -> None:
    async with started_ring(3, overlay_name=OVERLAY, config=FAST) as ring:
        client = await Node.start(
            bind=("127.0.0.1", 0), join=ring[0].endpoint, overlay_name=OVERLAY,
            config=replace(FAST, client=True),
        )  # fmt: skip
        try:
            assert client.core is None and client.reach is not None and client.reach.mode == "client"
            stats = client.stats()
            assert stats["attach"]["peer"] == f"{ring[0].endpoint[0]}:{ring[0].endpoint[1]}"
            assert len(stats["attach"]["fallbacks"]) >= 1
            user = KeyPair.generate()
            await client.put("sip:carol@example.net", b"contact", entry_id=b"phone", key=user)
            found = await ring[2].get("sip:carol@example.net")
            assert [e.value for e in found] == [b"contact"]
            assert found[0].owner == user.public_key  # signed by the client's user key, checked by replicas
            await ring[1].put("sip:dave@example.net", b"dave", key=KeyPair.generate())
            assert [e.value for e in await client.get("sip:dave@example.net")] == [b"dave"]
            big = b"x" * 12000  # over a datagram: relayed over TCP
            await client.put("big", big, key=user)
            assert [e.value for e in await client.get("big")] == [big]
            assert client.stats()["tcp_out"] >= 1
            assert ring[0].stats()["relay_stored"] >= 2 and ring[0].stats()["clients"] == 1
            await asyncio.sleep(FAST.chord.stabilize_interval * 3)  # let maintenance run a few rounds
            assert not any(_in_routing(n, client.node_id) for n in ring)  # no ring responsibility
        finally:
            await client.close()


async def test_a_client_peer_that_leaves_detaches_at_once() -> None:
    """A graceful stop tells the attach peer (``detach``): it forgets the client at once, not after
    CLIENT_SILENCE keep-alive intervals (here 4 x 30 s)."""
    slow = replace(FAST, attach_interval=30.0)
    async with started_ring(2, overlay_name=OVERLAY, config=slow) as ring:
        client = await Node.start(
            bind=("127.0.0.1", 0), join=ring[0].endpoint, overlay_name=OVERLAY,
            config=replace(slow, client=True),
        )  # fmt: skip
        try:
            assert ring[0].stats()["clients"] == 1 and ring[0].attached_client(client.node_id) is not None
            # a stranger claiming the client's NodeId from another address cannot detach it
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                codec = Codec(OVERLAY)
                from overlay.wire import Message

                forged = Message("detach", 9, client.node_id, client.endpoint, {})
                sock.sendto(codec.encode(forged), ring[0].endpoint)
                loop = asyncio.get_running_loop()
                reply = codec.decode(await asyncio.wait_for(loop.sock_recv(sock, 65536), 5.0))
                assert reply.type == "err" and ring[0].stats()["clients"] == 1
            finally:
                sock.close()
            await client.leave()
            assert client.stats()["detached"] == 1
            assert ring[0].stats()["clients"] == 0 and ring[0].stats()["detach_served"] == 1
            assert ring[0].attached_client(client.node_id) is None
        finally:
            await client.close()


async def test_an_unreachable_node_joins_as_a_client_peer_and_reattaches_when_its_attach_peer_dies() -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # a port where nothing answers the prober's ping
    try:
        async with started_ring(3, overlay_name=OVERLAY, config=FAST) as ring:
            client = await Node.start(
                bind=("127.0.0.1", 0), join=ring[1].endpoint, overlay_name=OVERLAY,
                config=replace(FAST, client_peers=True), advertise=dead.getsockname(),
            )  # fmt: skip
            try:
                assert client.reach is not None and client.reach.mode == "client"
                assert "unreachable" in client.reach.reason
                assert client.stats()["attach"]["seen"].startswith("127.0.0.1:")
                await client.put("k1", b"v1")
                await ring[1].close()  # the attach peer dies
                for _ in range(200):
                    if client.stats()["attach"]["reattached"] >= 1:
                        break
                    await asyncio.sleep(0.05)
                assert client.stats()["attach"]["reattached"] >= 1
                assert client.stats()["attach"]["peer"] != f"{ring[1].endpoint[0]}:{ring[1].endpoint[1]}"
                await client.put("k2", b"v2")
                assert [e.value for e in await client.get("k2")] == [b"v2"]
                assert [e.value for e in await ring[0].get("k2")] == [b"v2"]
            finally:
                await client.close()
    finally:
        dead.close()


async def test_without_client_peers_an_unreachable_node_still_refuses_to_join() -> None:
    from overlay.errors import OverlayError

    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    try:
        async with started_ring(2, overlay_name=OVERLAY, config=FAST) as ring:
            with pytest.raises(OverlayError, match="client peers"):
                await Node.start(
                    bind=("127.0.0.1", 0), join=ring[0].endpoint, overlay_name=OVERLAY, config=FAST,
                    advertise=dead.getsockname(),
                )  # fmt: skip
    finally:
        dead.close()
