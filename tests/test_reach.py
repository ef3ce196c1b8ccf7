"""Reachability probe and reflexive address learning (overlay.reach, the probe/reach wire messages).

The decisions are pure functions (tested directly); the exchange runs between real nodes on loopback: a
node bound to a wildcard learns the address its bootstrap sees, another member probes it, and a node
advertising an address where nothing answers is told so and does not join.
"""

from __future__ import annotations

import socket

import pytest

from overlay.chord import ChordConfig, NodeRef
from overlay.errors import OverlayError
from overlay.node import Node, NodeConfig
from overlay.reach import decide, pick_prober, probe_allowed
from overlay.wire import REACH_MESSAGES, Codec, Message
from tests.overlay_support import started_ring, wire_fuzz_test

OVERLAY = "reach-test"
FAST = NodeConfig(
    chord=ChordConfig(stabilize_interval=0.2, fix_fingers_interval=0.5, check_predecessor_interval=0.5),
    rpc_timeout=0.3,
    rpc_retries=1,
    op_timeout=10.0,
    join_timeout=10.0,
)


# ---------------------------------------------------------------------------------------------- sans-IO


def test_decide_learns_the_seen_address_and_trusts_a_probe() -> None:
    by = NodeRef(7, "10.0.0.2", 7060)
    full = decide(("0.0.0.0", 7060), None, {"seen": ("203.0.113.7", 40000), "reachable": True, "by": by})
    assert full.mode == "full" and full.endpoint == ("203.0.113.7", 40000)
    assert full.probed_by == ("10.0.0.2", 7060) and "learned" in full.reason
    client = decide(("0.0.0.0", 7060), None, {"seen": ("203.0.113.7", 40000), "reachable": False, "by": by})
    assert client.mode == "client" and "unreachable" in client.reason
    forwarded = decide(
        ("0.0.0.0", 7060), ("203.0.113.7", 7070), {"seen": ("203.0.113.7", 1), "reachable": True}
    )
    assert forwarded.endpoint == ("203.0.113.7", 7070) and "advertised" in forwarded.reason
    alone = decide(("0.0.0.0", 7060), None, {"seen": ("203.0.113.7", 40000)})
    assert alone.mode == "full" and "no other peer" in alone.reason
    # no answer: a bound address stays (an older bootstrap); a wildcard has nothing to advertise
    assert decide(("10.0.0.5", 7060), None, None).mode == "full"
    assert decide(("0.0.0.0", 7060), None, None).mode == "client"


def test_probe_targets_only_the_source_host_and_another_member() -> None:
    assert probe_allowed(("198.51.100.1", 7070), ("198.51.100.1", 50123))
    assert not probe_allowed(("192.0.2.99", 7070), ("198.51.100.1", 50123))  # a third party
    assert not probe_allowed(("198.51.100.1", 0), ("198.51.100.1", 50123))
    me, joiner = NodeRef(1, "10.0.0.1", 1), NodeRef(2, "10.0.0.9", 9)
    other = NodeRef(3, "10.0.0.3", 3)
    assert pick_prober([me, joiner, other], me.id, joiner.id, joiner.ep) == other
    assert pick_prober([me, joiner], me.id, joiner.id, joiner.ep) is None


# ---------------------------------------------------------------------------------------------- wire


test_reach_messages_are_validated_strictly = wire_fuzz_test(
    OVERLAY, REACH_MESSAGES, ["target", "node", "seen"], "Reachability (probe/reach)"
)


async def test_garbage_probes_are_dropped_and_counted() -> None:
    async with started_ring(1, overlay_name=OVERLAY, config=FAST) as (node,):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            import msgpack

            bad = msgpack.packb(
                {"v": 1, "ov": OVERLAY, "t": "probe", "id": 5, "src": b"\x01" * 16, "ep": ["x", 1], "ep2": 1}
            )
            sock.sendto(bad, node.endpoint)
            sock.sendto(b"\x93garbage", node.endpoint)
            for _ in range(100):
                if node.stats()["dropped"] >= 2:
                    break
                await _tick()
            assert node.stats()["dropped"] >= 2
        finally:
            sock.close()


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------- nodes


async def test_a_node_learns_its_address_and_is_probed_by_another_member() -> None:
    """(A wildcard bind, whose learned address differs from the bound one, runs in the NAT lab: tests
    bind loopback only.)"""
    async with started_ring(3, overlay_name=OVERLAY, config=FAST) as ring:
        node = await Node.start(
            bind=("127.0.0.1", 0), join=ring[0].endpoint, overlay_name=OVERLAY, config=FAST
        )
        try:
            assert node.reach is not None and node.reach.mode == "full"
            assert node.reach.seen == node.endpoint  # learned from the bootstrap
            assert node.reach.probed_by is not None and node.reach.probed_by != ring[0].endpoint
            assert node.reach.probed_by in {n.endpoint for n in ring[1:]}
            status = node.stats()["reach"]
            assert status["mode"] == "full" and "reachable" in status["reason"]
            assert ring[0].stats()["probes_answered"] >= 1
            await node.put("reach-key", b"v")
            assert [e.value for e in await ring[1].get("reach-key")] == [b"v"]
        finally:
            await node.close()


async def test_a_node_nobody_reaches_at_its_advertised_address_does_not_join() -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # a port where nothing answers the prober's ping
    try:
        async with started_ring(2, overlay_name=OVERLAY, config=FAST) as ring:
            with pytest.raises(OverlayError, match=r"cannot reach this one.*unreachable"):
                await Node.start(
                    bind=("127.0.0.1", 0),
                    join=ring[0].endpoint,
                    overlay_name=OVERLAY,
                    config=FAST,
                    advertise=dead.getsockname(),
                )
            assert any(n.stats().get("reach_unreachable", 0) >= 1 for n in ring[1:])
    finally:
        dead.close()


async def test_a_probe_aimed_at_another_host_is_refused() -> None:
    async with started_ring(2, overlay_name=OVERLAY, config=FAST) as ring:
        with pytest.raises(OverlayError, match="refused to probe"):
            await Node.start(
                bind=("127.0.0.1", 0), join=ring[0].endpoint, overlay_name=OVERLAY, config=FAST,
                advertise=("127.0.0.2", 7070),
            )  # fmt: skip
        assert ring[0].stats()["probes_refused"] == 1


def test_the_reply_fields_round_trip() -> None:
    codec = Codec(OVERLAY)
    body = {"seen": ("198.51.100.1", 40000), "reachable": False, "by": NodeRef(9, "10.0.0.2", 7060)}
    msg = codec.decode(codec.encode(Message("ok", 1, 9, ("10.0.0.2", 7060), body)))
    assert msg.body == body
