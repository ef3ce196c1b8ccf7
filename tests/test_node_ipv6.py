"""The overlay on IPv6 loopback (skipped where ::1 is not available)."""

from __future__ import annotations

import socket

import pytest
from overlay_support import started_ring

from overlay.chord import ChordConfig
from overlay.node import NodeConfig

pytestmark = pytest.mark.slow


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_three_nodes_on_ipv6_loopback() -> None:
    cfg = NodeConfig(
        chord=ChordConfig(stabilize_interval=0.25, fix_fingers_interval=0.5, check_predecessor_interval=0.5),
        rpc_timeout=0.5,
        op_timeout=15.0,
    )
    async with started_ring(3, host="::1", overlay_name="v6", config=cfg) as nodes:
        await nodes[1].put("sip:six@example.net", b"v6" * 1000)  # over TCP too
        assert [e.value for e in await nodes[2].get("sip:six@example.net")] == [b"v6" * 1000]
        assert all(n.stats()["dropped"] == 0 for n in nodes)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_a_node_bound_to_the_ipv6_wildcard_learns_its_address_and_joins_as_a_full_peer() -> None:
    """``--overlay [::]:PORT``: the bound address names nothing others can use; the probe's ``seen``
    (here ::1, as its bootstrap saw it) becomes the advertised endpoint, and another member reaches it."""
    from overlay.node import Node

    cfg = NodeConfig(
        chord=ChordConfig(stabilize_interval=0.25, fix_fingers_interval=0.5, check_predecessor_interval=0.5),
        rpc_timeout=0.5,
        op_timeout=15.0,
        join_timeout=15.0,
    )
    async with started_ring(2, host="::1", overlay_name="v6", config=cfg) as ring:
        node = await Node.start(bind=("::", 0), join=ring[0].endpoint, overlay_name="v6", config=cfg)
        try:
            assert node.reach is not None and node.reach.mode == "full", node.reach
            assert node.endpoint[0] == "::1" and node.reach.seen == node.endpoint
            assert node.reach.probed_by == ring[1].endpoint  # another member, not the bootstrap
            await node.put("sip:wild@example.net", b"w")
            assert [e.value for e in await ring[1].get("sip:wild@example.net")] == [b"w"]
        finally:
            await node.close()
