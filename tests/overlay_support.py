"""A ring of overlay nodes on loopback for the node tests: started, and closed however the test ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from overlay.node import Node, NodeConfig


@contextlib.asynccontextmanager
async def started_ring(
    count: int, *, overlay_name: str, config: NodeConfig, host: str = "127.0.0.1"
) -> AsyncIterator[list[Node]]:
    """``count`` nodes on ``host`` (free ports), each joining through the first; all of them closed on
    exit, also when a later one fails to start."""
    nodes: list[Node] = []
    try:
        nodes.append(await Node.start(bind=(host, 0), join=None, overlay_name=overlay_name, config=config))
        for _ in range(count - 1):
            nodes.append(
                await Node.start(
                    bind=(host, 0), join=nodes[0].endpoint, overlay_name=overlay_name, config=config
                )
            )
        yield nodes
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
