"""Peers on loopback, several in one process: registration into the DHT, calls through the overlay,
forking across peers, 404/408/480, digest auth, first-claim, static routes, IP literals, restarts."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from peer_phone import Phone
from peer_support import PeerFactory, wait_until_settled

from overlay import ids
from overlay.identity import KeyPair
from overlay.localring import quick_node_config
from p2psip.auth import answer_challenge
from p2psip.config import HostPort, ListenSpec, PeerConfig, UserAccount
from p2psip.message import Request
from p2psip.peer import Peer

ALICE = "sip:alice@p2p.example"
BOB = "sip:bob@p2p.example"


@pytest.fixture
async def ring(make_peer: PeerFactory) -> list[Peer]:
    first = await make_peer()
    peers = [first] + [await make_peer(first) for _ in range(4)]
    await wait_until_settled(peers, timeout=20)
    return peers


async def test_register_writes_one_signed_entry_per_contact(ring: list[Peer], phones) -> None:
    alice = await phones("alice")
    # offline messages off: publishing the AOR's inbox key takes a lookup of its own, in the background
    # (tests/test_overlay_im_transfer.py)
    ring[0].config.offline_messages = False
    lookups = ring[0].node.stats().get("lookups_started", 0)
    response = await alice.register(ring[0].sip_address(), expires=600)
    assert response.status == 200
    # read the AOR and write its contact: one lookup of the key (two before Node.at)
    assert ring[0].node.stats().get("lookups_started", 0) - lookups == 1
    assert [c.uri.port for c in response.contacts] == [alice.port]
    # the entry is in the DHT, readable from any peer, signed by alice's user key, derived from the data
    # dir's secret (no file per AOR) and written as a file (mode 0600) only when exported to copy it
    entries = await ring[3].node.get(ALICE)
    assert len(entries) == 1
    key_file = ring[0].users.path_for(ALICE)
    assert not key_file.exists()
    assert ring[0].users.export(ALICE) == key_file
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert entries[0].owner == KeyPair.load(key_file).public_key
    # r = 3 replicas hold it
    holders = [p for p in ring if p.node.store.get(ids.key_for(ALICE), time.time())]
    assert len(holders) == 3
    result = await ring[4].lookup(ALICE)
    assert [b.contact for b in result.bindings] == [alice.contact]
    assert result.responsible is not None and len(result.holders) == 3


async def test_call_through_the_overlay_with_record_route(ring: list[Peer], phones) -> None:
    alice, bob = await phones("alice"), await phones("bob")
    assert (await bob.register(ring[3].sip_address())).status == 200
    result = await alice.call(BOB, ring[1].sip_address())
    assert result.answered, result.statuses
    assert 180 in result.statuses
    invite = bob.invites.get_nowait()
    assert invite.uri.port == bob.port  # retargeted to bob's contact
    assert invite.get("Record-Route") is not None  # the peer stays in the path
    assert result.bye_status == 200
    assert bob.acked.is_set()
    assert ring[1].counters["routed"] == 1


async def test_nobody_registered_is_404(ring: list[Peer], phones) -> None:
    alice = await phones("alice")
    result = await alice.call("sip:nobody@p2p.example", ring[2].sip_address())
    assert result.final is not None and result.final.status == 404


async def test_tel_uri_without_a_route_is_416(ring: list[Peer], phones) -> None:
    """A tel: URI the peer cannot route gets 416 Unsupported URI Scheme (it got 404 when the location
    decision's status was lost on the way to the proxy)."""
    alice = await phones("alice")
    result = await alice.call("tel:+15551234", ring[0].sip_address())
    assert result.final is not None and result.final.status == 416, result.statuses
    assert result.final.reason.startswith("Unsupported URI Scheme")


async def test_refresh_expires_zero_and_wildcard(ring: list[Peer], phones) -> None:
    bob = await phones("bob")
    peer = ring[2]
    first = await bob.register(peer.sip_address(), expires=300, call_id="bob-reg", cseq=1)
    refreshed = await bob.register(peer.sip_address(), expires=900, call_id="bob-reg", cseq=2)
    assert first.status == refreshed.status == 200
    assert refreshed.contacts[0].expires is not None and refreshed.contacts[0].expires > 800
    assert len(await ring[0].node.get(BOB)) == 1  # refreshed, not duplicated
    gone = await bob.register(peer.sip_address(), expires=0, call_id="bob-reg", cseq=3)
    assert gone.status == 200 and not gone.contacts
    assert await ring[0].node.get(BOB) == []
    # two contacts, then '*' removes both
    await bob.register(peer.sip_address(), contact="<sip:bob@127.0.0.1:1>", call_id="b2", cseq=1)
    await bob.register(peer.sip_address(), contact="<sip:bob@127.0.0.1:2>", call_id="b2", cseq=2)
    assert len(await ring[4].node.get(BOB)) == 2
    wiped = await bob.register(peer.sip_address(), contact="*", expires=0, call_id="b2", cseq=3)
    assert wiped.status == 200
    assert await ring[4].node.get(BOB) == []
    caller = await phones("carol")
    result = await caller.call(BOB, peer.sip_address())
    assert result.final is not None and result.final.status == 404


async def test_forking_to_contacts_registered_through_different_peers(
    ring: list[Peer], phones, tmp_path: Path
) -> None:
    desk, mobile = await phones("bob", answer="ring"), await phones("bob")
    assert (await desk.register(ring[0].sip_address())).status == 200
    # a second device of the same user at another peer: copy the user key there (DESIGN.md)
    target = ring[3].users.path_for(BOB)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ring[0].users.export(BOB), target)
    assert (await mobile.register(ring[3].sip_address())).status == 200
    assert len(await ring[1].node.get(BOB)) == 2
    alice = await phones("alice")
    result = await alice.call(BOB, ring[2].sip_address())
    assert result.answered
    assert desk.invites.qsize() == 1 and mobile.invites.qsize() == 1  # both rang
    assert desk.cancelled.is_set()  # the losing branch was cancelled when mobile answered


async def test_first_claim_refuses_another_users_key(ring: list[Peer], phones) -> None:
    alice, mallory = await phones("alice"), await phones("alice")
    assert (await alice.register(ring[0].sip_address())).status == 200
    # ring[2] has no copy of alice's key: it makes its own, which the overlay refuses for this AOR
    refused = await mallory.register(ring[2].sip_address())
    assert refused.status == 403
    assert [e.value for e in await ring[1].node.get(ALICE)] != []
    bindings = await ring[1].fetch_bindings(ALICE)
    assert [b.contact for b in bindings] == [alice.contact]


async def test_no_answer_gives_408_or_480(ring: list[Peer], phones) -> None:
    silent = await phones("dave", answer="silent")
    ringing = await phones("erin", answer="ring")
    await silent.register(ring[0].sip_address())
    await ringing.register(ring[1].sip_address())
    caller = await phones("alice")
    result = await caller.call("sip:dave@p2p.example", ring[2].sip_address(), timeout=20)
    assert result.final is not None and result.final.status in (408, 480), result.statuses
    result = await caller.call("sip:erin@p2p.example", ring[2].sip_address(), timeout=20)
    assert result.final is not None and result.final.status in (408, 480, 487), result.statuses
    assert ringing.cancelled.is_set()  # Timer C cancelled the ringing branch


async def test_digest_auth_per_user(make_peer: PeerFactory, phones) -> None:
    peer = await make_peer(users={ALICE: UserAccount(ALICE, "wonderland", "alice")}, require_auth=True)
    alice = await phones("alice")
    challenge = await alice.register(peer.sip_address(), call_id="auth-1", cseq=1)
    assert challenge.status == 401 and challenge.get("WWW-Authenticate")
    assert await peer.node.get(ALICE) == []
    first = challenge_request(alice, peer, cseq=1)
    wrong = answer_challenge(challenge, first, "alice", "not-the-password")
    refused = await alice.request(wrong, peer.sip_address())
    assert refused.status == 401
    right = answer_challenge(challenge, first, "alice", "wonderland")
    accepted = await alice.request(right, peer.sip_address())
    assert accepted.status == 200
    assert len(await peer.node.get(ALICE)) == 1
    # require_auth: users the config does not list get the very same challenge (no 403 "not a user":
    # answers must not tell a scanner which users exist), and any credentials for them fail alike.
    bob = await phones("bob")
    unknown = await bob.register(peer.sip_address())
    assert unknown.status == 401
    shape = [v.split("nonce=")[0] for v in unknown.get_all("WWW-Authenticate")]
    assert shape == [v.split("nonce=")[0] for v in challenge.get_all("WWW-Authenticate")]


def challenge_request(phone: Phone, peer: Peer, cseq: int) -> Request:
    return Request.create(
        "REGISTER",
        "sip:p2p.example",
        from_=f"<{phone.aor}>;tag=x1",
        to=f"<{phone.aor}>",
        call_id="auth-1",
        cseq=cseq,
        via=f"SIP/2.0/UDP 127.0.0.1:{phone.port};branch=z9hG4bK-auth-{cseq};rport",
        contact=f"<{phone.contact}>",
        headers=[("Expires", "300")],
    )


async def test_ip_literal_and_static_route_are_forwarded_as_addressed(make_peer: PeerFactory, phones) -> None:
    gateway = await phones("gw")
    peer = await make_peer(routes={"pstn.example": HostPort("127.0.0.1", gateway.port)})
    caller = await phones("alice")
    direct = await caller.call(f"sip:someone@127.0.0.1:{gateway.port}", peer.sip_address())
    assert direct.answered
    assert gateway.invites.get_nowait().uri.user == "someone"
    routed = await caller.call("sip:+15551234@pstn.example", peer.sip_address())
    assert routed.answered
    invite = gateway.invites.get_nowait()
    assert str(invite.uri) == "sip:+15551234@pstn.example"  # the Request-URI is kept; the route chose the hop
    assert peer.counters["lookups"] == 0  # neither touched the DHT


async def test_restart_keeps_identity_and_user_keys(make_peer: PeerFactory, phones, tmp_path: Path) -> None:
    data = tmp_path / "keeper"
    first = await make_peer(data_dir=data)
    helper = await make_peer(first)
    await wait_until_settled([first, helper])
    bob = await phones("bob")
    assert (await bob.register(first.sip_address())).status == 200
    node_id, user_key = first.node.node_id, first.users.get(BOB).public_key
    await first.close()
    again = await make_peer(helper, data_dir=data)
    assert again.node.node_id == node_id
    assert again.users.get(BOB).public_key == user_key
    # the same user key may keep refreshing its AOR after the restart
    assert (await bob.register(again.sip_address(), cseq=5)).status == 200


async def test_dns_only_when_enabled(make_peer: PeerFactory, phones) -> None:
    """``localhost`` resolves from /etc/hosts, so this needs no DNS server; without --dns it is an AOR."""
    gateway = await phones("gw")
    plain = await make_peer()
    with_dns = await make_peer(plain, dns=True)
    caller = await phones("alice")
    uri = f"sip:someone@localhost:{gateway.port}"
    refused = await caller.call(uri, plain.sip_address())
    assert refused.final is not None and refused.final.status == 404
    assert gateway.invites.empty()
    answered = await caller.call(uri, with_dns.sip_address())
    assert answered.answered
    assert str(gateway.invites.get_nowait().uri) == uri


async def test_join_through_a_dead_peer_is_a_clear_error(tmp_path: Path) -> None:
    from dataclasses import replace

    from conftest import free_port

    from p2psip.errors import P2PSIPError

    config = PeerConfig(
        listen=[ListenSpec("udp", "127.0.0.1", 0)],
        overlay=HostPort("127.0.0.1", 0),
        join=HostPort("127.0.0.1", free_port()),
        data_dir=tmp_path / "lonely",
    )
    events: list[tuple[str, str]] = []
    with pytest.raises(P2PSIPError, match=r"nothing listens at .*--join names"):
        await Peer.start(
            config,
            on_event=lambda kind, text: events.append((kind, text)),
            node_config=replace(quick_node_config(), join_timeout=1.0),
        )
    assert events and events[0][0] == "joining"


async def test_graceful_leave_of_the_primary_keeps_the_registration(ring: list[Peer], phones) -> None:
    bob = await phones("bob")
    # bob's home peer (where he registers, his binding's Path) stays; the key's primary leaves
    home = next(p for p in ring if not p.holds(BOB)[1])
    assert (await bob.register(home.sip_address())).status == 200
    primary = next(p for p in ring if p.holds(BOB)[1])
    await primary.close()  # graceful: entries handed to the successors
    survivors = [p for p in ring if p is not primary]
    await wait_until_settled(survivors, timeout=20)
    caller = await phones("alice")
    via = next(p for p in survivors if p is not home)
    # the registration survived: both the peer the call enters and bob's home peer (which the call goes
    # through) find it in the ring without the primary
    assert await via.fetch_bindings(BOB) and await home.fetch_bindings(BOB)
    result = await caller.call(BOB, via.sip_address())
    assert result.answered, result.statuses


async def test_ipv6_loopback_overlay_and_call(tmp_path: Path) -> None:
    import socket

    from p2psip.stack import Stack
    from p2psip.useragent import IncomingCall, UserAgent

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    peers: list[Peer] = []
    phones: list[UserAgent] = []

    def answer(incoming: IncomingCall) -> None:
        incoming.ring()
        incoming.accept()

    try:
        for i in range(2):
            config = PeerConfig(
                listen=[ListenSpec("udp", "::1", 0)],
                overlay=HostPort("::1", 0),
                join=HostPort(*peers[0].overlay_address) if peers else None,
                data_dir=tmp_path / f"v6-{i}",
            )
            peers.append(await Peer.start(config, node_config=quick_node_config()))
        await wait_until_settled(peers)
        via = [f"[::1]:{peer.sip_address()[1]}" for peer in peers]
        bob = UserAgent(await Stack.start(["udp:[::1]:0"]), BOB, outbound=via[0], on_call=answer)
        alice = UserAgent(await Stack.start(["udp:[::1]:0"]), ALICE, outbound=via[1])
        phones += [bob, alice]
        registered = await bob.register("sip:p2p.example", refresh=False)
        assert registered.status == 200 and "[::1]" in (registered.get("Contact") or "")
        call = await alice.call(BOB, timeout=15)
        assert call.response is not None and call.response.status == 200
        assert (await call.bye()).status == 200
    finally:
        for phone in phones:
            await phone.close()
            await phone.stack.close()
        for peer in peers:
            await peer.close(leave=False)


async def test_leaving_says_how_many_entries_were_handed_off(make_peer: PeerFactory, phones) -> None:
    """A lone peer has nobody to hand its entries to: it must not claim it did; a peer with a successor
    counts what the successor acknowledged."""
    import re

    empty = await make_peer()
    said: list[tuple[str, str]] = []
    empty.on_event = lambda kind, text: said.append((kind, text))
    await empty.close(leave=True)
    (left,) = [text for kind, text in said if kind == "left"]
    assert left.startswith("left the overlay: it held no entries (nothing to hand off"), left

    lone = await make_peer()
    said.clear()
    lone.on_event = lambda kind, text: said.append((kind, text))
    bob = await phones("bob")
    assert (await bob.register(lone.sip_address())).status == 200
    await lone.close(leave=True)
    (left,) = [text for kind, text in said if kind == "left"]
    assert left.startswith("left the overlay: no successor to hand entries to; "), left

    first = await make_peer()
    second = await make_peer(first)
    await wait_until_settled([first, second], timeout=20)
    carol = await phones("carol")
    assert (await carol.register(first.sip_address())).status == 200
    said.clear()
    first.on_event = lambda kind, text: said.append((kind, text))
    await first.close(leave=True)
    (left,) = [text for kind, text in said if kind == "left"]
    assert re.match(r"left the overlay: [1-9]\d* entr(y|ies) handed to the successor", left), left


async def test_a_join_that_cannot_work_says_why_at_once(
    make_peer: PeerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--join to nothing (refused), to a peer of another overlay name (it answers with its name), or an
    IPv6 peer to an IPv4 bootstrap: each fails within seconds and says which; a silent bootstrap gets
    progress lines while the join waits."""
    import socket
    from dataclasses import replace

    from p2psip.errors import ConfigError, P2PSIPError

    def config(name: str, join: HostPort, overlay: HostPort | None = None, **kw: object) -> PeerConfig:
        overlay = overlay or HostPort("127.0.0.1", 0)
        return PeerConfig(
            listen=[ListenSpec("udp", "127.0.0.1", 0)],
            overlay=overlay,
            join=join,
            data_dir=tmp_path / name,
            **kw,
        )

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = int(s.getsockname()[1])
    began = time.monotonic()
    with pytest.raises(
        P2PSIPError, match=rf"cannot join: nothing listens at 127.0.0.1:{dead} \(connection refused"
    ):
        await Peer.start(config("a", HostPort("127.0.0.1", dead)), node_config=quick_node_config())
    assert time.monotonic() - began < 5

    alpha = await make_peer(overlay_name="alpha")
    began = time.monotonic()
    with pytest.raises(P2PSIPError, match=r"serves overlay 'alpha', not 'beta'.*--overlay-name"):
        await Peer.start(
            config("b", HostPort(*alpha.overlay_address), overlay_name="beta"),
            node_config=quick_node_config(),
        )
    assert time.monotonic() - began < 5
    assert alpha.node.stats()["wrong_overlay_answered"] >= 1

    with pytest.raises(ConfigError, match=r"is IPv4 but this peer's overlay address .* is IPv6"):
        await Peer.start(config("c", HostPort(*alpha.overlay_address), overlay=HostPort("::1", 0)))

    said: list[tuple[str, str]] = []
    monkeypatch.setattr("p2psip.peer.JOIN_PROGRESS_EVERY", 0.2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        quick = quick_node_config()
        with pytest.raises(P2PSIPError, match="could not join"):
            await Peer.start(
                config("d", HostPort(*silent.getsockname())),
                node_config=replace(quick, join_timeout=1.5),
                on_event=lambda kind, text: said.append((kind, text)),
            )
    assert said[0][0] == "joining" and "through 127.0.0.1:" in said[0][1]
    assert any(
        kind == "joining" and "no answer from" in text and "still trying" in text for kind, text in said
    )
