"""Peers with ``--dht opendht`` (the registrar and location on the OpenDHT engine) over OpenDHT nodes on
loopback started here with the opendht package: enrolled phones register and call each other through
different peers; a forged binding put straight into OpenDHT is ignored; an unregistered AOR stays
unregistered after its tombstone; first-claim is refused at start."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from peer_phone import Phone
from test_cli import run
from test_opendht_directory import eventually

from overlay.identity import KeyPair
from overlay.ids import key_for
from overlay.storage import DROP_PREFIX, INBOX_KEY_ID, Entry
from overlay.store import encode_entry
from p2psip import pidf
from p2psip.cli.parser import main
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.inbox import inbox_name
from p2psip.message import Request
from p2psip.peer import PRESENCE_ENTRY, VOUCH_HEADER, Peer, _b64
from p2psip.stack import Stack
from p2psip.timers import TimerConfig
from p2psip.transport import Source
from p2psip.uri import Address
from p2psip.useragent import UserAgent

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
            # the node certificate: what makes readers keep this peer's drops in inboxes and its vouches
            assert main(["enroll", "node", "--ca-key", ca_key, "--data-dir", str(data_dir)]) == 0
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


async def test_offline_message_inbox_over_opendht(network: tuple[Path, list[Peer]]) -> None:
    """A MESSAGE for bob while nobody is registered is sealed into his inbox (H('inbox:' + AOR)) on
    OpenDHT, signed by the node key of the peer it entered (enrolled: node.cert), and delivered when bob
    registers again; then his home peer removes it (a tombstone of the inbox's owner)."""
    _tmp, peers = network
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    host0, port0 = peers[0].sip_address()
    host1, port1 = peers[1].sip_address()
    bob_aor = f"sip:bob@{DOMAIN}"
    alice = UserAgent(stacks[0], f"sip:alice@{DOMAIN}", outbound=f"{host0}:{port0}")
    bob = UserAgent(stacks[1], bob_aor, outbound=f"{host1}:{port1}")
    registrar = f"sip:{host1}:{port1}"
    inbox = inbox_name(bob_aor)
    try:
        assert (await bob.register(registrar, expires=300, refresh=False)).status == 200

        async def published() -> bool:  # read through the other peer's OpenDHT node
            return any(e.entry_id == INBOX_KEY_ID for e in await peers[0].directory.get(inbox))

        assert await eventually(published)
        assert (await bob.register(registrar, expires=0, refresh=False)).status == 200
        assert (await alice.message(bob_aor, "are you there?")).status == 202
        assert peers[0].counters["messages_stored"] == 1

        async def drops() -> list[Entry]:
            return [e for e in await peers[1].directory.get(inbox) if e.entry_id[:1] == DROP_PREFIX]

        stored = await eventually(drops)
        assert len(stored) == 1 and b"are you there?" not in stored[0].value  # sealed
        # an enrolled user's key outlives its registrations (the certificate binds it): kept by the sweep
        peers[1].sweep_user_keys(time.time() + 10 * 86400)
        assert peers[1].users.exists(bob_aor)
        assert (await bob.register(registrar, expires=300, refresh=False)).status == 200
        got = await asyncio.wait_for(bob.messages.get(), 15)
        assert got.body == b"are you there?" and got.from_.uri.user == "alice"

        async def emptied() -> bool:
            return not await drops() and not [
                e for e in await peers[0].directory.get(inbox) if e.entry_id[:1] == DROP_PREFIX
            ]

        assert await eventually(emptied, timeout=15)
        assert peers[1].counters["messages_delivered"] == 1
    finally:
        for ua in (alice, bob):
            await ua.close()
        for stack in stacks:
            await stack.close()


async def test_presence_vouch_over_opendht(network: tuple[Path, list[Peer]]) -> None:
    """A peer's vouch for a watcher carries its node certificate (no ring to confirm the NodeId on
    OpenDHT); another peer accepts it, and refuses it without the certificate or signed by a stranger."""
    _tmp, peers = network
    subscribe = Request.create(
        "SUBSCRIBE", f"sip:bob@{DOMAIN}", from_=f"<sip:alice@{DOMAIN}>;tag=t1", to=f"<sip:bob@{DOMAIN}>",
        call_id="vouch-1", cseq=1, via="SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKv1",
    )  # fmt: skip
    elsewhere = Source("udp", "127.0.0.1", 9)
    vouch = peers[0].vouch(subscribe)
    assert ";cert=" in vouch
    subscribe.set(VOUCH_HEADER, vouch)
    assert await peers[1]._vouched(subscribe, elsewhere)
    subscribe.set(VOUCH_HEADER, vouch.split(";cert=")[0])  # the same vouch without its certificate
    assert not await peers[1]._vouched(subscribe, elsewhere)
    stranger = KeyPair.generate()  # an un-enrolled node key, with peer 0's certificate pasted on
    data = f"p2psip-vouch|sip:alice@{DOMAIN}|vouch-1|t1|{int(time.time())}".encode()
    forged = Address(vouch).params
    fake = (
        f"<sip:alice@{DOMAIN}>;ts={int(time.time())};key={_b64(stranger.public_key)};"
        f"sig={_b64(stranger.sign(data))};cert={forged['cert']}"
    )
    subscribe.set(VOUCH_HEADER, fake)
    assert not await peers[1]._vouched(subscribe, elsewhere)


async def test_presence_through_opendht_peers(network: tuple[Path, list[Peer]]) -> None:
    """Presence end to end on OpenDHT: bob registers and PUBLISHes at his peer (its agent saves the state
    as a signed entry in OpenDHT); alice, registered at the other peer, subscribes there: that peer vouches
    for her with its node certificate, so the agent shows her what bob published (an unvouched watcher
    would see "closed")."""
    _tmp, peers = network
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    host0, port0 = peers[0].sip_address()
    host1, port1 = peers[1].sip_address()
    bob_aor = f"sip:bob@{DOMAIN}"
    alice = UserAgent(stacks[0], f"sip:alice@{DOMAIN}", outbound=f"{host0}:{port0}")
    bob = UserAgent(stacks[1], bob_aor, outbound=f"{host1}:{port1}")
    try:
        assert (await alice.register(f"sip:{host0}:{port0}", expires=300, refresh=False)).status == 200
        assert (await bob.register(f"sip:{host1}:{port1}", expires=300, refresh=False)).status == 200
        doc = pidf.Presence(bob_aor, [pidf.PresenceTuple("desk", "open")], ["in a meeting"], ["busy"])
        response = await bob.request(
            "PUBLISH", bob_aor, body=doc.compose(), content_type=pidf.CONTENT_TYPE,
            headers=[("Event", "presence"), ("Expires", "600")],
        )  # fmt: skip
        assert response.status == 200

        async def saved() -> bool:  # the agent's state, read through the other peer's OpenDHT node
            return any(e.entry_id == PRESENCE_ENTRY for e in await peers[0].directory.get(bob_aor))

        assert await eventually(saved)
        sub = await alice.subscribe(bob_aor, "presence", body_check=lambda r: None)
        note = await sub.next(10)
        got = pidf.parse(note.body)
        assert got.basic == "open" and got.notes == ["in a meeting"], note.body
        await sub.unsubscribe()
    finally:
        for ua in (alice, bob):
            await ua.close()
        for stack in stacks:
            await stack.close()
