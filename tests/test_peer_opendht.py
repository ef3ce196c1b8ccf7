"""Peers with ``--dht opendht`` (the registrar and location on the OpenDHT engine) over OpenDHT nodes on
loopback started here with the opendht package: enrolled phones register and call each other through
different peers; a forged binding put straight into OpenDHT is ignored; an unregistered AOR stays
unregistered after its tombstone; first-claim is refused at start."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from peer_phone import Phone
from test_cli import run

from overlay.identity import KeyPair
from overlay.ids import key_for
from overlay.storage import Entry
from overlay.store import encode_entry
from p2psip.cli.parser import main
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.peer import Peer
from p2psip.timers import TimerConfig

if os.environ.get("CI") != "true":
    pytest.importorskip("opendht")
import opendht  # under CI=true a missing package fails here: .ci/run installs the extra

from overlay.opendht_directory import OpenDhtDirectory

pytestmark = pytest.mark.slow
DOMAIN = "p2p.example"
TIMERS = TimerConfig(t1=0.05, t2=0.4, t4=0.5, timer_c=1.5)


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[tuple[Path, list[Peer]]]:
    """Two bare OpenDHT nodes (the network), two peers on it, alice enrolled at one, bob at the other."""
    assert main(["enroll", "init", str(tmp_path / "ca")]) == 0
    ca_pub = tmp_path / "ca" / "ca.pub"
    ca_key = str(tmp_path / "ca" / "ca.key")
    ca = KeyPair.load(ca_key)
    bare = [await OpenDhtDirectory.start(("127.0.0.1", 0), ca.public_key)]
    bare.append(await OpenDhtDirectory.start(("127.0.0.1", 0), ca.public_key, bootstrap=bare[0].endpoint))
    peers: list[Peer] = []
    try:
        for i, user in enumerate(("alice", "bob")):
            data_dir = tmp_path / f"p{i}"
            assert (
                main(
                    [
                        "enroll",
                        "user",
                        f"sip:{user}@{DOMAIN}",
                        "--ca-key",
                        ca_key,
                        "--data-dir",
                        str(data_dir),
                    ]
                )
                == 0
            )
            config = PeerConfig(
                listen=[ListenSpec("udp", "127.0.0.1", 0)],
                overlay=HostPort("127.0.0.1", 0),
                join=HostPort(*bare[i].endpoint),
                data_dir=data_dir,
                cache_ttl=0.0,
                policy="enrolled",
                ca=ca_pub,
                dht="opendht",
            )
            peers.append(await Peer.start(config, stack_options={"timers": TIMERS}))
        yield tmp_path, peers
    finally:
        for peer in peers:
            await peer.close(leave=False)
        await asyncio.gather(*(b.close() for b in bare))


async def test_enrolled_phones_register_and_call_over_opendht(network: tuple[Path, list[Peer]]) -> None:
    _tmp, peers = network
    alice, bob = await Phone.open("alice"), await Phone.open("bob")
    try:
        assert (await alice.register(peers[0].sip_address())).status == 200
        assert (await bob.register(peers[1].sip_address())).status == 200
        # a forged binding for bob put straight into OpenDHT (a stranger's key, no certificate)
        mallory = KeyPair.generate()
        forged = Entry.create(mallory, key_for(bob.aor), b"x", b"junk", 2**60, 3600, b"")
        runner = peers[0].engine.runner  # type: ignore[union-attr]
        assert await asyncio.to_thread(
            runner.put, opendht.InfoHash.get(bob.aor), opendht.Value(encode_entry(forged))
        )
        result = await alice.call(bob.aor, peers[0].sip_address())
        assert result.answered, result.statuses
        back = await bob.call(alice.aor, peers[1].sip_address())
        assert back.answered, back.statuses
        # unregister: a signed tombstone; the AOR stays unregistered
        assert (await bob.register(peers[1].sip_address(), expires=0)).status == 200
        gone = await alice.call(bob.aor, peers[0].sip_address())
        assert not gone.answered and 404 in gone.statuses, gone.statuses
    finally:
        alice.close()
        bob.close()


def test_opendht_refuses_first_claim_at_start(tmp_path: Path) -> None:
    bad = run("start", "--dht", "opendht", "--data-dir", str(tmp_path / "d"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--policy enrolled" in bad.stderr
    bad = run("start", "--dht", "kademlia", "--data-dir", str(tmp_path / "d"))
    assert bad.returncode == 2 and "chord or opendht" in bad.stderr
