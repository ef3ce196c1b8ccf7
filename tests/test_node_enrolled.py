"""The enrolled policy on real sockets: a CA binding of name to user key is needed to write."""

from __future__ import annotations

import pytest
from overlay_support import started_ring

from overlay.chord import ChordConfig
from overlay.errors import StoreRefused
from overlay.identity import KeyPair, enroll
from overlay.ids import key_for
from overlay.node import NodeConfig

pytestmark = pytest.mark.slow


async def test_enrolled_overlay_needs_a_ca_binding() -> None:
    ca, alice, bob = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    cfg = NodeConfig(
        chord=ChordConfig(
            stabilize_interval=0.25, fix_fingers_interval=0.5, check_predecessor_interval=0.5, rpc_timeout=0.5
        ),
        rpc_timeout=0.5,
        op_timeout=15.0,
        policy="enrolled",
        ca_public_key=ca.public_key,
    )
    async with started_ring(5, overlay_name="enrolled", config=cfg) as nodes:
        name = "sip:alice@corp.example"
        with pytest.raises(StoreRefused) as info:
            await nodes[1].put(name, b"no-cert", key=alice)
        assert info.value.reason == "policy"
        cert = enroll(ca, key_for(name), alice.public_key)
        nodes[1].add_certificate(cert.key_id, cert.user_public_key, cert.signature)
        await nodes[1].put(name, b"with-cert", key=alice)
        assert [e.value for e in await nodes[3].get(name)] == [b"with-cert"]
        # a certificate for alice does not let bob write, even if bob presents it
        nodes[2].add_certificate(cert.key_id, bob.public_key, cert.signature)
        with pytest.raises(StoreRefused) as info:
            await nodes[2].put(name, b"bob", entry_id=b"b", key=bob)
        assert info.value.reason == "policy"
