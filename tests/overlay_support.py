"""A ring of overlay nodes on loopback for the node tests: started, and closed however the test ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.chord import NodeRef
from overlay.errors import WireError
from overlay.ids import RING
from overlay.node import Node, NodeConfig
from overlay.storage import Entry
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


def _holds_wire_type(ftype: str, value: Any) -> bool:
    """Whether a decoded field holds what the wire type ``ftype`` converts to (overlay.wire's table)."""
    if ftype.endswith("?"):
        return value is None or _holds_wire_type(ftype[:-1], value)
    if ftype == "id":
        return isinstance(value, int) and 0 <= value < RING
    if ftype == "ep":
        return isinstance(value, tuple) and isinstance(value[0], str) and 0 <= value[1] < 65536
    if ftype == "nodes":
        return isinstance(value, list) and all(isinstance(n, NodeRef) for n in value)
    if ftype == "entries":
        return isinstance(value, list) and all(isinstance(e, Entry) for e, _ in value)
    python = {"node": NodeRef, "entry": Entry, "u64": int, "bytes": bytes, "cert": bytes, "str": str}
    return isinstance(value, python.get(ftype, bool))


def wire_fuzz_test(
    overlay_name: str, schemas: dict[str, dict[str, str]], fields: list[str], what: str
) -> Callable[..., None]:
    """A test (assign it to a ``test_...`` name) that whatever body a datagram of one of ``schemas``' types
    carries (``fields`` of the schemas, a stranger, values of every wire shape), decoding yields a message
    holding only fields of its schema, each converted to its type, or WireError (dropped and counted)."""

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(sorted(schemas)), fuzz_bodies(fields))
    def check(mtype: str, body: dict[str, Any]) -> None:
        msg = decode_fuzzed(overlay_name, mtype, body, schemas)
        if msg is None:
            return
        for name, value in msg.body.items():
            assert _holds_wire_type(schemas[mtype][name], value), (mtype, name, value)

    check.__doc__ = f"{what} messages are validated strictly: {wire_fuzz_test.__doc__}"
    return check


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
