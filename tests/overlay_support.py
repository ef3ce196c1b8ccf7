"""A ring of overlay nodes on loopback for the node tests: started, and closed however the test ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgpack
from hypothesis import strategies as st

from overlay.errors import WireError
from overlay.node import Node, NodeConfig
from overlay.wire import Codec, Message


def fuzz_bodies(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Message bodies mixing the schema's field names (and a stranger) with values of every wire shape."""
    return st.dictionaries(
        st.sampled_from([*fields, "x"]),
        st.one_of(
            st.none(),
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.text(max_size=5),
            st.binary(max_size=20),
            st.lists(st.one_of(st.text(max_size=3), st.integers(min_value=-2, max_value=70000)), max_size=4),
            st.lists(
                st.one_of(st.binary(min_size=16, max_size=16), st.text(max_size=3), st.integers(0, 70000)),
                max_size=4,
            ),
        ),
        max_size=3,
    )


def decode_fuzzed(
    overlay_name: str, mtype: str, body: dict[str, Any], schemas: dict[str, dict[str, str]]
) -> Message | None:
    """A datagram of type ``mtype`` with ``body`` as a peer would receive it: decoded (holding only fields
    of its schema in ``schemas``), or None (WireError)."""
    envelope = {"v": 1, "ov": overlay_name, "t": mtype, "id": 5, "src": b"\x01" * 16, "ep": ["10.0.0.1", 1]}
    raw = msgpack.packb({**envelope, **body})
    try:
        msg = Codec(overlay_name).decode(raw)
    except WireError:
        return None
    assert set(msg.body) <= set(schemas[mtype])
    return msg


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
