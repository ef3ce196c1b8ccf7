"""Rings of nodes in one process (the demo, tests, benchmarks): maintenance fast enough for loopback, and a
bounded wait until the ring is consistent.

Not part of the protocol: a real overlay never knows all its members, so "the ring is consistent" can only
be checked by someone holding every node, as a test or the demo does. The overlay raises no event for it,
so :func:`wait_until_consistent` polls the condition (bounded in time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from overlay.chord import ChordConfig
from overlay.node import Node, NodeConfig

__all__ = ["quick_node_config", "ring_is_consistent", "wait_until_consistent"]


def quick_node_config(interval: float = 0.2, rpc_timeout: float = 0.5) -> NodeConfig:
    """Overlay maintenance every ``interval`` seconds: for the demo and tests on one machine, where a
    ring must settle in a fraction of a second (the defaults suit real networks)."""
    chord = ChordConfig(
        stabilize_interval=interval,
        fix_fingers_interval=interval,
        check_predecessor_interval=interval * 2,
        rpc_timeout=rpc_timeout,
    )
    return NodeConfig(chord=chord, rpc_timeout=rpc_timeout, op_timeout=10.0, repair_interval=interval * 10)


def ring_is_consistent(nodes: Iterable[Node], depth: int = 1) -> bool:
    """Whether every node's successor and predecessor are its true ring neighbours among ``nodes``; with
    ``depth`` > 1 also the next ``depth`` entries of each successor list (at most the ring's other nodes):
    a write reaches its replicas through that list, so a test counting replicas wants it filled."""
    ring = sorted(nodes, key=lambda n: n.node_id)
    if len(ring) < 2:
        return True
    depth = max(1, min(depth, len(ring) - 1))
    for i, node in enumerate(ring):
        core = node.core
        if core is None or len(core.successors) < depth or core.predecessor is None:
            return False
        for k in range(depth):
            if core.successors[k].id != ring[(i + 1 + k) % len(ring)].node_id:
                return False
        if core.predecessor.id != ring[i - 1].node_id:
            return False
    return True


async def wait_until_consistent(
    nodes: Iterable[Node], timeout: float = 10.0, poll: float = 0.02, *, depth: int = 1
) -> float:
    """Wait (bounded) until the ring of ``nodes`` is consistent (``depth``: see :func:`ring_is_consistent`);
    returns the seconds it took. Raises TimeoutError otherwise."""
    members = list(nodes)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not ring_is_consistent(members, depth):
        if loop.time() - started > timeout:
            raise TimeoutError(f"the ring of {len(members)} peers did not settle within {timeout:g} s")
        await asyncio.sleep(poll)
    return loop.time() - started
