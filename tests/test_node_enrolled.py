"""The enrolled policy on real sockets: a user certificate naming the AOR is needed to write, and an overlay
of enrolled nodes refuses an un-enrolled, expired or foreign-signed node at admission, saying why."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from overlay_support import started_ring

from overlay.chord import ChordConfig
from overlay.errors import NotAdmitted, StoreRefused
from overlay.identity import KeyPair, enroll_node, enroll_user
from overlay.node import Node, NodeConfig

pytestmark = pytest.mark.slow


def _config(ca: KeyPair, **extra: object) -> NodeConfig:
    return NodeConfig(
        chord=ChordConfig(
            stabilize_interval=0.25, fix_fingers_interval=0.5, check_predecessor_interval=0.5, rpc_timeout=0.5
        ),
        rpc_timeout=0.5,
        op_timeout=15.0,
        join_timeout=5.0,
        policy="enrolled",
        ca_public_key=ca.public_key,
        **extra,  # type: ignore[arg-type]
    )


async def test_enrolled_overlay_needs_a_user_certificate() -> None:
    ca, alice, bob = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    async with started_ring(5, overlay_name="enrolled", config=_config(ca)) as nodes:
        name = "sip:alice@corp.example"
        with pytest.raises(StoreRefused) as info:
            await nodes[1].put(name, b"no-cert", key=alice)
        assert info.value.reason == "policy"
        assert "no user certificate" in str(info.value)
        nodes[1].add_certificate(enroll_user(ca, name, alice.public_key))
        await nodes[1].put(name, b"with-cert", key=alice)
        assert [e.value for e in await nodes[3].get(name)] == [b"with-cert"]
        # a certificate for alice does not let bob write, even if bob presents it
        cert = enroll_user(ca, name, alice.public_key)
        nodes[2].add_certificate(dataclasses.replace(cert, public_key=bob.public_key))
        with pytest.raises(StoreRefused) as info:
            await nodes[2].put(name, b"bob", entry_id=b"b", key=bob)
        assert "not signed" in str(info.value)
        # expired, and signed by another authority: refused with their reasons
        old = enroll_user(ca, "sip:old@corp.example", bob.public_key, now=time.time() - 3 * 86400, days=1)
        nodes[2].add_certificate(old)
        with pytest.raises(StoreRefused, match="expired"):
            await nodes[2].put("sip:old@corp.example", b"x", key=bob)
        foreign = enroll_user(KeyPair.generate(), "sip:bob@corp.example", bob.public_key)
        nodes[2].add_certificate(foreign)
        with pytest.raises(StoreRefused, match="not signed by this overlay's enrollment authority"):
            await nodes[2].put("sip:bob@corp.example", b"x", key=bob)


async def test_overlay_of_enrolled_nodes_refuses_others_at_admission() -> None:
    ca = KeyPair.generate()
    nodes: list[Node] = []

    async def start(identity: KeyPair, cert: bytes | None) -> Node:
        cfg = _config(ca, enrolled_nodes=True, node_certificate=cert)
        join = nodes[0].endpoint if nodes else None
        return await Node.start(bind=("127.0.0.1", 0), join=join, overlay_name="adm", config=cfg,
                                identity=identity)  # fmt: skip

    try:
        for _ in range(3):
            me = KeyPair.generate()
            nodes.append(await start(me, enroll_node(ca, me.public_key).to_bytes()))
        stranger = KeyPair.generate()
        # its own certificate is checked before it binds anything
        with pytest.raises(NotAdmitted, match="no node certificate"):
            await start(stranger, None)
        # a node that holds a certificate of another authority, or an expired one: the bootstrap says why
        for cert, why in (
            (enroll_node(KeyPair.generate(), stranger.public_key), "not signed by this overlay's"),
            (enroll_node(ca, stranger.public_key, now=time.time() - 3 * 86400, days=1), "expired"),
        ):
            cfg = dataclasses.replace(
                _config(ca), node_certificate=cert.to_bytes()
            )  # it does not check itself
            with pytest.raises(NotAdmitted, match=why) as info:
                await Node.start(bind=("127.0.0.1", 0), join=nodes[0].endpoint, overlay_name="adm",
                                 config=cfg, identity=stranger)  # fmt: skip
            assert "refused this node at admission" in str(info.value)
        assert nodes[0].stats().get("admission_refused", 0) >= 2
        # the enrolled ones formed a ring and store through each other
        alice = KeyPair.generate()
        nodes[2].add_certificate(enroll_user(ca, "sip:alice@corp.example", alice.public_key))
        await nodes[2].put("sip:alice@corp.example", b"v", key=alice)
        assert [e.value for e in await nodes[1].get("sip:alice@corp.example")] == [b"v"]
    finally:
        await asyncio.gather(*(n.close() for n in nodes))


async def test_chord_watch_polls_for_changes() -> None:
    ca, alice = KeyPair.generate(), KeyPair.generate()
    async with started_ring(3, overlay_name="watch", config=_config(ca)) as nodes:
        name = "sip:alice@corp.example"
        nodes[0].add_certificate(enroll_user(ca, name, alice.public_key))
        seen: asyncio.Queue[list[bytes]] = asyncio.Queue()
        stop = nodes[2].watch(name, lambda entries: seen.put_nowait([e.value for e in entries]), interval=0.2)
        try:
            assert await asyncio.wait_for(seen.get(), 10) == []
            await nodes[0].put(name, b"v1", key=alice)
            assert await asyncio.wait_for(seen.get(), 10) == [b"v1"]
            await nodes[0].remove(name, key=alice)
            assert await asyncio.wait_for(seen.get(), 10) == []
        finally:
            stop()
