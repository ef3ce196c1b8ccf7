"""The ``enrolled`` policy end to end on loopback: ``p2psip enroll`` makes an authority and signs user and
node certificates into peers' data dirs; peers started with ``policy=enrolled, ca=ca.pub,
enrolled_nodes=True`` (``--policy enrolled --ca FILE --enrolled-nodes``) register a phone's AOR only at a
peer holding that user's certificate and key, refuse expired and foreign-signed certificates with their
reason, and an un-enrolled node is refused at admission. Phones are UDP clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from peer_phone import Phone
from peer_support import wait_until_settled
from test_cli import run
from test_overlay_im_transfer import until, via

from overlay.errors import StoreRefused
from overlay.identity import NODE_CERT_FILE, KeyPair, enroll_user
from overlay.ids import key_for
from overlay.localring import quick_node_config
from overlay.storage import DROP_PREFIX, INBOX_KEY_ID, Entry
from p2psip.cli.parser import main
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.errors import ConfigError, P2PSIPError
from p2psip.inbox import SENDER_HEADER, inbox_name
from p2psip.peer import USERS_DIR, Peer, UserKeys, _node_config
from p2psip.stack import Stack
from p2psip.timers import TimerConfig
from p2psip.useragent import UserAgent

pytestmark = pytest.mark.slow
DOMAIN = "p2p.example"
TIMERS = TimerConfig(t1=0.05, t2=0.4, t4=0.5, timer_c=1.5)


def _cli(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.fixture
async def enrolled(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Peer]]]:
    _cli("enroll", "init", str(tmp_path / "ca"))
    started: list[Peer] = []

    async def make(name: str, join: Peer | None = None, *, node_cert: bool = True) -> Peer:
        data_dir = tmp_path / name
        if node_cert:
            _cli("enroll", "node", "--ca-key", str(tmp_path / "ca" / "ca.key"), "--data-dir", str(data_dir))
        config = PeerConfig(
            listen=[ListenSpec("udp", "127.0.0.1", 0)],
            overlay=HostPort("127.0.0.1", 0),
            join=HostPort(*join.overlay_address) if join else None,
            data_dir=data_dir,
            cache_ttl=0.0,
            policy="enrolled",
            ca=tmp_path / "ca" / "ca.pub",
            enrolled_nodes=True,
        )
        peer = await Peer.start(config, node_config=quick_node_config(), stack_options={"timers": TIMERS})
        started.append(peer)
        return peer

    yield make
    for peer in started:
        await peer.close(leave=False)


async def test_enrolled_users_register_and_call_only_through_their_peer(
    enrolled: Callable[..., Awaitable[Peer]], tmp_path: Path
) -> None:
    ca_key = str(tmp_path / "ca" / "ca.key")
    _cli("enroll", "user", f"sip:alice@{DOMAIN}", "--ca-key", ca_key, "--data-dir", str(tmp_path / "p0"))
    _cli("enroll", "user", f"sip:bob@{DOMAIN}", "--ca-key", ca_key, "--data-dir", str(tmp_path / "p1"))
    first = await enrolled("p0")
    peers = [first, await enrolled("p1", first), await enrolled("p2", first)]
    await wait_until_settled(peers, timeout=20)
    alice, bob, mallory = [await Phone.open(u) for u in ("alice", "bob", "mallory")]
    try:
        assert (await alice.register(peers[0].sip_address())).status == 200
        assert (await bob.register(peers[1].sip_address())).status == 200
        result = await alice.call(bob.aor, peers[0].sip_address())
        assert result.answered
        # the same AOR through a peer that holds no certificate for it, and an AOR nobody enrolled
        refused = await alice.register(peers[2].sip_address())
        assert refused.status == 403 and "no enrollment" in refused.reason
        assert (await mallory.register(peers[0].sip_address())).status == 403
        assert peers[0].counters["unenrolled_refused"] == 1
        # an expired certificate, and one signed by another authority: refused with their reason
        users = UserKeys(tmp_path / "p2" / USERS_DIR)
        for user, cert, why in (
            ("carol", None, "expired"),
            ("dave", KeyPair.generate(), "not signed by this overlay's enrollment authority"),
        ):
            aor = f"sip:{user}@{DOMAIN}"
            ca = KeyPair.load(ca_key) if cert is None else cert
            when = time.time() - 3 * 86400 if cert is None else None
            enroll_user(ca, aor, users.get(aor).public_key, now=when, days=1).save(
                users.path_for(aor).with_suffix(".cert")
            )
            phone = await Phone.open(user)
            try:
                response = await phone.register(peers[2].sip_address())
            finally:
                phone.close()
            assert response.status == 403 and why in response.reason, response.reason
    finally:
        for phone in (alice, bob, mallory):
            phone.close()


async def test_unenrolled_node_is_refused_at_admission(
    enrolled: Callable[..., Awaitable[Peer]], tmp_path: Path
) -> None:
    first = await enrolled("p0")
    with pytest.raises(ConfigError, match="no node certificate"):
        await enrolled("stranger", first, node_cert=False)
    # a node certificate of another authority: the bootstrap refuses it, saying why
    _cli("enroll", "init", str(tmp_path / "other"))
    _cli("enroll", "node", "--ca-key", str(tmp_path / "other" / "ca.key"), "--data-dir", str(tmp_path / "p9"))
    with pytest.raises(P2PSIPError, match=r"not admitted.*not signed by this overlay's enrollment authority"):
        await enrolled("p9", first, node_cert=False)


def test_enroll_and_start_arguments(tmp_path: Path) -> None:
    bad = run("start", "--policy", "enrolled", "--data-dir", str(tmp_path / "d"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--ca FILE" in bad.stderr
    bad = run("start", "--policy", "anything", "--ca", "x", "--data-dir", str(tmp_path / "d"))
    assert bad.returncode == 2 and "first-claim or enrolled" in bad.stderr
    assert main(["enroll", "init", str(tmp_path / "ca")]) == 0
    assert main(["enroll", "init", str(tmp_path / "ca")]) == 2  # made once
    ca_key = str(tmp_path / "ca" / "ca.key")
    assert main(["enroll", "user", "not-a-uri", "--ca-key", ca_key, "--data-dir", str(tmp_path)]) == 2
    assert (
        main(["enroll", "user", "sip:a@b", "--ca-key", str(tmp_path / "nope"), "--data-dir", str(tmp_path)])
        == 2
    )
    bad = run("start", "--policy", "enrolled", "--ca", ca_key, "--data-dir", str(tmp_path / "d"))
    assert bad.returncode == 2 and "does not hold a public key" in bad.stderr


def test_an_enrolled_peer_signs_its_drops_with_its_node_certificate(tmp_path: Path) -> None:
    """Under ``--policy enrolled`` without ``--enrolled-nodes`` a peer's node.cert (if it has one) is not
    for admission but goes with the drops its node key writes in inboxes; without one there is none."""
    _cli("enroll", "init", str(tmp_path / "ca"))
    config = PeerConfig(data_dir=tmp_path / "p", policy="enrolled", ca=tmp_path / "ca" / "ca.pub")
    without = _node_config(None, config)
    assert without is not None and without.policy == "enrolled" and without.node_certificate is None
    _cli("enroll", "node", "--ca-key", str(tmp_path / "ca" / "ca.key"), "--data-dir", str(tmp_path / "p"))
    with_cert = _node_config(None, config)
    assert with_cert is not None and not with_cert.enrolled_nodes
    assert with_cert.node_certificate == (tmp_path / "p" / NODE_CERT_FILE).read_bytes()


async def test_offline_messages_under_the_enrolled_policy(
    enrolled: Callable[..., Awaitable[Peer]], tmp_path: Path
) -> None:
    """An enrolled user's inbox works under ``enrolled``: its user certificate covers H('inbox:' + AOR), so
    the inbox key entry and the owner's removals are accepted by the replicas; a drop needs an enrolled
    writer (the peer's node key with its node certificate, as OpenDHT's readers require). A MESSAGE while
    bob is away is stored (202), delivered on his next registration with alice vouched for by her peer,
    then removed. Another enrolled key cannot write bob's inbox entry, and a stranger's key cannot drop."""
    ca_key = str(tmp_path / "ca" / "ca.key")
    alice_aor, bob_aor = f"sip:alice@{DOMAIN}", f"sip:bob@{DOMAIN}"
    _cli("enroll", "user", alice_aor, "--ca-key", ca_key, "--data-dir", str(tmp_path / "p0"))
    _cli("enroll", "user", bob_aor, "--ca-key", ca_key, "--data-dir", str(tmp_path / "p1"))
    first = await enrolled("p0")
    peers = [first, await enrolled("p1", first), await enrolled("p2", first)]
    await wait_until_settled(peers, timeout=20)
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    alice = UserAgent(stacks[0], alice_aor, outbound=via(peers[0]))
    bob = UserAgent(stacks[1], bob_aor, outbound=via(peers[1]))
    bob_registrar = f"sip:{via(peers[1])}"
    try:
        assert (await alice.register(f"sip:{via(peers[0])}", expires=300, refresh=False)).status == 200
        assert (await bob.register(bob_registrar, expires=300, refresh=False)).status == 200

        async def inbox() -> list[Entry]:
            return await peers[2].node.get(inbox_name(bob_aor))

        await until(lambda: _has(inbox, INBOX_KEY_ID))  # bob's inbox key entry, written with his certificate
        assert (await bob.register(bob_registrar, expires=0, refresh=False)).status == 200

        assert (await alice.message(bob_aor, "while you were out")).status == 202
        assert peers[0].counters["messages_stored"] == 1
        assert (await bob.register(bob_registrar, expires=300, refresh=False)).status == 200
        got = await asyncio.wait_for(bob.messages.get(), 15)
        assert got.body == b"while you were out" and got.from_.uri.user == "alice"
        assert got.get(SENDER_HEADER) == f"vouched;node={peers[0].node.identity.node_id:032x}"

        async def emptied() -> bool:
            return not any(e.entry_id[:1] == DROP_PREFIX for e in await inbox())

        await until(emptied)  # the owner's removal carried his certificate: the replicas took it

        # alice's enrolled key may not take over bob's inbox entry, nor bob's write alice's inbox
        users = UserKeys(tmp_path / "p0" / USERS_DIR)
        alice_cert = users.certificate(alice_aor)
        assert alice_cert is not None
        with pytest.raises(StoreRefused, match="not this key"):
            await peers[0].node.put_entry(
                Entry.create(users.get(alice_aor), key_for(inbox_name(bob_aor)), INBOX_KEY_ID, b"k" * 32,
                             time.time_ns() // 1_000_000, 600, alice_cert.to_bytes())
            )  # fmt: skip
        # a key the authority never enrolled leaves nothing in bob's inbox, however well it signs
        stranger = KeyPair.generate()
        drop = Entry.create(stranger, key_for(inbox_name(bob_aor)), DROP_PREFIX + stranger.public_key + b"1",
                            b"sealed", time.time_ns() // 1_000_000, 600)  # fmt: skip
        with pytest.raises(StoreRefused, match=r"enrolled writer.*not enrolled"):
            await peers[2].node.put_entry(drop)
    finally:
        for ua in (alice, bob):
            await ua.close()
        for stack in stacks:
            await stack.close()


async def _has(entries: Callable[[], Awaitable[list[Entry]]], entry_id: bytes) -> bool:
    return any(e.entry_id == entry_id for e in await entries())
