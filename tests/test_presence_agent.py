"""The presence agent in the overlay (p2psip/presenceagent.py) with our UserAgents through 3 peers: the
AOR's primary home peer serves SUBSCRIBE and PUBLISH for it wherever they enter; the document is composed
from registrations (registered = open) and PUBLISHed PIDF (entity tags); a NOTIFY goes out on every change
(PUBLISH, unregister, and the expiry of a publication or a binding); a SUBSCRIBE or PUBLISH whose Event
header does not parse gets 400 at the peer; a watcher registered at another peer is vouched for by that
peer's signed assertion, one registered nowhere (with a forged assertion) is politely blocked (sees
closed); when the AOR's primary home moves, the old agent ends its subscriptions with reason=deactivated
and a new SUBSCRIBE (our UA re-subscribes by itself) reaches the new agent; what devices PUBLISHed is a
signed DHT entry beside the bindings, which a new agent composes after the old agent's peer stopped."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from peer_interop.helpers import start_overlay, stop_overlay

from overlay.storage import Entry
from p2psip import pidf
from p2psip.peer import PRESENCE_ENTRY, Peer
from p2psip.stack import Stack
from p2psip.subscription import SubState
from p2psip.uaevents import Notification, OutgoingSubscription
from p2psip.useragent import UserAgent

BOB = "sip:bob@p2p.example"


def via(peer: Peer) -> str:
    host, port = peer.sip_address()
    return f"{host}:{port}"


@pytest.fixture
async def overlay(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_overlay(3, tmp_path, settle_timeout=30)
    for peer in peers:
        peer.presence.poll = 0.3
    try:
        yield peers
    finally:
        await stop_overlay(peers)


@pytest.fixture
async def make_ua() -> AsyncIterator[object]:
    made: list[UserAgent] = []

    async def make(aor: str, peer: Peer) -> UserAgent:
        stack = await Stack.start(["udp:127.0.0.1:0"])
        ua = UserAgent(stack, aor, outbound=via(peer))
        made.append(ua)
        return ua

    yield make
    for ua in made:
        await ua.close()
        await ua.stack.close()


async def basic_of(sub: OutgoingSubscription, timeout: float = 10) -> tuple[str, pidf.Presence, Notification]:
    note = await sub.next(timeout)
    doc = pidf.parse(note.body)
    return doc.basic, doc, note


async def test_agent_serves_composes_notifies_and_blocks(overlay: list[Peer], make_ua) -> None:  # type: ignore[no-untyped-def]
    bob = await make_ua(BOB, overlay[1])
    alice = await make_ua("sip:alice@p2p.example", overlay[1])
    carol = await make_ua("sip:carol@p2p.example", overlay[2])
    for ua, peer in ((bob, overlay[1]), (alice, overlay[1]), (carol, overlay[2])):
        assert (await ua.register(f"sip:{via(peer)}", expires=300, refresh=False)).status == 200

    # alice registered at bob's home peer: it vouches for her; she sees bob open, with his contact
    sub = await alice.subscribe(BOB, "presence", body_check=lambda r: None)
    basic, doc, note = await basic_of(sub)
    assert basic == "open" and doc.tuples[0].contact is not None and "bob@" in doc.tuples[0].contact
    assert note.state.state is SubState.ACTIVE

    # carol is registered at another peer: hers vouches for her (a signed assertion the agent checks)
    vouched = await carol.subscribe(BOB, "presence", body_check=lambda r: None)
    basic, _, _ = await basic_of(vouched)
    assert basic == "open" and overlay[1].presence.stats["blocked"] == 0
    await vouched.unsubscribe()

    # dave is registered nowhere, and forges an assertion: his peer drops it; politely blocked
    dave = await make_ua("sip:dave@p2p.example", overlay[2])
    forged = f"<sip:dave@p2p.example>;ts={int(time.time())};key=AAAA;sig=AAAA"
    blocked = await dave.subscribe(
        BOB, "presence", body_check=lambda r: None, headers=[("P-P2PSIP-Vouch", forged)]
    )
    basic, doc, _ = await basic_of(blocked)
    assert basic == "closed" and doc.tuples[0].contact is None and overlay[1].presence.stats["blocked"] == 1

    # bob PUBLISHes (through his own peer: the agent): a note and an activity; alice gets them
    async def publish(doc: pidf.Presence | None, etag: str | None = None, expires: int = 600) -> str:
        headers = [("Event", "presence"), ("Expires", str(expires))]
        if etag is not None:
            headers.append(("SIP-If-Match", etag))
        body = doc.compose() if doc is not None else b""
        response = await bob.request(
            "PUBLISH", BOB, body=body, content_type=pidf.CONTENT_TYPE, headers=headers
        )
        assert response.status == 200, response
        return response.get("SIP-ETag") or ""

    etag = await publish(pidf.Presence(BOB, [pidf.PresenceTuple("desk", "open")], ["at my desk"], ["busy"]))
    basic, doc, _ = await basic_of(sub)
    assert basic == "open" and doc.notes == ["at my desk"] and doc.activities == ["busy"]
    assert len(doc.tuples) == 1  # his published document speaks for his registered device

    # he sets himself offline (a modify under the entity tag): closed, although still registered
    etag = await publish(pidf.Presence(BOB, [pidf.PresenceTuple("desk", "closed")], ["gone home"]), etag)
    basic, doc, _ = await basic_of(sub)
    assert basic == "closed" and doc.notes == ["gone home"], doc
    refused = await bob.request(
        "PUBLISH", BOB, headers=[("Event", "presence"), ("SIP-If-Match", "nosuchtag"), ("Expires", "600")]
    )
    assert refused.status == 412
    # a PIDF the parser refuses (not well-formed; a DOCTYPE with an entity) is 400, and alice's
    # subscription lives on (she sees the next change below)
    for junk in (b"<presence", b'<!DOCTYPE p [<!ENTITY x "y">]><presence entity="&x;"/>'):
        response = await bob.request(
            "PUBLISH", BOB, body=junk, content_type=pidf.CONTENT_TYPE,
            headers=[("Event", "presence"), ("Expires", "600")],
        )  # fmt: skip
        assert response.status == 400, response
    # an Event header that does not parse: the peer answers 400 itself, for a SUBSCRIBE (before, proxied:
    # 404 for an AOR nobody registered) and a PUBLISH (before, proxied to bob's phone), scripts or not
    for method, target, event in (
        ("SUBSCRIBE", "sip:nobody@p2p.example", "pres ence"),
        ("PUBLISH", BOB, 'presence;id="7"'),
    ):
        bad = await carol.request(method, target, headers=[("Event", event), ("Expires", "600")])
        assert bad.status == 400 and "Event" in bad.reason, bad
    # nobody else may publish bob's presence: someone registered nowhere claiming to be bob, and carol as
    # herself, both get 403
    impostor = await make_ua(BOB, overlay[2])
    fake = pidf.Presence(BOB, [pidf.PresenceTuple("x", "open")], ["hacked"]).compose()
    for ua in (impostor, carol):
        response = await ua.request(
            "PUBLISH", BOB, body=fake, content_type=pidf.CONTENT_TYPE, headers=[("Event", "presence")]
        )
        assert response.status == 403, response

    # the publication removed: his registration speaks again (open); then he unregisters: closed
    await publish(None, etag, expires=0)
    basic, _, _ = await basic_of(sub)
    assert basic == "open"
    # bob publishes again and leaves without withdrawing it: what he published goes with his binding
    await publish(pidf.Presence(BOB, [pidf.PresenceTuple("desk", "open")], ["back soon"]))
    basic, doc, _ = await basic_of(sub)
    assert basic == "open" and doc.notes == ["back soon"]
    await bob.unregister()
    basic, doc, _ = await basic_of(sub)
    assert basic == "closed" and doc.tuples[0].contact is None and doc.notes == []

    # expiry, with no request at all: what bob published lapses (its note goes), then his binding (closed)
    overlay[1].policy = replace(overlay[1].policy, min_expires=1)
    overlay[1].presence.published.min_expires = 1
    assert (await bob.register(f"sip:{via(overlay[1])}", expires=4, refresh=False)).status == 200
    basic, _, _ = await basic_of(sub)
    assert basic == "open"
    await publish(pidf.Presence(BOB, [pidf.PresenceTuple("desk", "open")], ["brb"]), expires=1)
    basic, doc, _ = await basic_of(sub)
    assert basic == "open" and doc.notes == ["brb"]
    basic, doc, _ = await basic_of(sub)
    assert basic == "open" and doc.notes == []  # the publication expired
    basic, doc, _ = await basic_of(sub)
    assert basic == "closed" and doc.tuples[0].contact is None  # the binding expired
    await sub.unsubscribe()
    last = await sub.next(10)
    assert last.state.state is SubState.TERMINATED
    await blocked.unsubscribe()


async def test_subscribe_entering_elsewhere_and_agent_moving(
    overlay: list[Peer],
    make_ua,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    for peer in overlay:
        peer.presence.trust_from = True  # watchers at any peer count as who they say (lab setting)
    desk = await make_ua(BOB, overlay[1])
    alice = await make_ua("sip:alice@p2p.example", overlay[0])
    assert (await desk.register(f"sip:{via(overlay[1])}", expires=300, refresh=False)).status == 200
    # alice's SUBSCRIBE enters at peer 0 and is forwarded to bob's agent, peer 1
    sub = await alice.subscribe(BOB, "presence", body_check=lambda r: None)
    basic, _, _ = await basic_of(sub)
    assert basic == "open" and overlay[1].presence.watches and not overlay[0].presence.watches

    # bob's desk leaves and his mobile registers at peer 2: peer 1 is no longer his agent
    target = overlay[2].users.path_for(BOB)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(overlay[1].users.export(BOB), target)
    mobile = await make_ua(BOB, overlay[2])
    await desk.unregister()
    assert (await mobile.register(f"sip:{via(overlay[2])}", expires=300, refresh=False)).status == 200

    async def ended() -> Notification:
        while True:
            note = await sub.next(10)
            if note.state.state is SubState.TERMINATED:
                return note

    note = await asyncio.wait_for(ended(), 15)
    assert note.state.reason == "deactivated" and note.state.may_resubscribe
    # alice's UA subscribes again at once, on the same handle, and reaches the new agent
    basic, _, note = await basic_of(sub)
    assert basic == "open" and note.state.state is SubState.ACTIVE
    assert overlay[2].presence.watches and not overlay[1].presence.watches and sub.resubscribes == 1
    await sub.unsubscribe()
    assert (await sub.next(10)).state.state is SubState.TERMINATED


async def test_published_state_outlives_the_agents_peer(overlay: list[Peer], make_ua) -> None:  # type: ignore[no-untyped-def]
    """What a device PUBLISHed is a signed entry beside the AOR's bindings: when the agent's peer stops,
    the next agent (another home peer of the user) composes it."""
    for peer in overlay:
        peer.presence.trust_from = True
    desk = await make_ua(BOB, overlay[1])
    host, port = desk.stack.local_address("udp")
    contact = f"<sip:bob@{host}:{port}>;q=0.5"  # below the mobile's: the mobile's peer becomes the agent
    response = await desk.register(f"sip:{via(overlay[1])}", expires=300, refresh=False, contact=contact)
    assert response.status == 200
    target = overlay[2].users.path_for(BOB)  # bob's second home peer holds his user key too
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(overlay[1].users.export(BOB), target)
    doc = pidf.Presence(BOB, [pidf.PresenceTuple("desk", "open")], ["in a meeting"], ["busy"])
    response = await desk.request(
        "PUBLISH", BOB, body=doc.compose(), content_type=pidf.CONTENT_TYPE,
        headers=[("Event", "presence"), ("Expires", "600")],
    )  # fmt: skip
    assert response.status == 200

    async def saved() -> list[Entry]:  # the agent saves it just after its 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [e for e in await overlay[0].node.get(BOB) if e.entry_id == PRESENCE_ENTRY]
            if found:
                return found
            await asyncio.sleep(0.05)
        return []

    saved = await saved()
    assert len(saved) == 1 and b"in a meeting" in saved[0].value
    assert saved[0].owner == overlay[1].users.get(BOB).public_key  # signed by bob's user key

    # the agent's peer stops (its memory gone), bob's mobile registers at peer 2 and is his best binding
    await overlay[1].close()
    mobile = await make_ua(BOB, overlay[2])
    assert (await mobile.register(f"sip:{via(overlay[2])}", expires=300, refresh=False)).status == 200
    alice = await make_ua("sip:alice@p2p.example", overlay[0])
    sub = await alice.subscribe(BOB, "presence", body_check=lambda r: None)
    basic, got, _ = await basic_of(sub)
    assert basic == "open" and got.notes == ["in a meeting"] and got.activities == ["busy"]
    assert overlay[2].presence.watches
    await sub.unsubscribe()


async def test_an_allow_list_in_the_config_blocks_vouched_strangers(tmp_path: Path, make_ua) -> None:  # type: ignore[no-untyped-def]
    """``[presence_allow]`` in the peers' config: alice is on bob's list and sees him; carol, vouched for
    by her home peer but not on the list, is politely blocked (closed)."""
    peers = await start_overlay(
        2, tmp_path, settle_timeout=30, presence_allow={BOB: ["sip:alice@p2p.example"]}
    )
    try:
        bob = await make_ua(BOB, peers[1])
        alice = await make_ua("sip:alice@p2p.example", peers[0])
        carol = await make_ua("sip:carol@p2p.example", peers[0])
        for ua, peer in ((bob, peers[1]), (alice, peers[0]), (carol, peers[0])):
            assert (await ua.register(f"sip:{via(peer)}", expires=300, refresh=False)).status == 200
        for ua, want in ((alice, "open"), (carol, "closed")):
            sub = await ua.subscribe(BOB, "presence", body_check=lambda r: None)
            basic, doc, note = await basic_of(sub)
            assert basic == want and note.state.state is SubState.ACTIVE, (ua.aor, doc)
            await sub.unsubscribe()
        assert peers[1].presence.stats["blocked"] == 1
    finally:
        await stop_overlay(peers)


SUBSCRIBE_SCRIPT = """def watchers(event):
    if event['From'].uri.user == 'alice':
        event.action.accept()
    else:
        event.action.reject(403)

basic.addEventListener('subscribe', watchers)
"""


async def test_the_presentitys_script_decides_on_subscribe_events(
    overlay: list[Peer],
    make_ua,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    from sipapi.scripts import install

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bob@p2p.example.py").write_text(SUBSCRIBE_SCRIPT)
    installed = [install(peer, scripts=scripts, deadline=2.0, workers=1) for peer in overlay]
    try:
        bob = await make_ua(BOB, overlay[1])
        alice = await make_ua("sip:alice@p2p.example", overlay[0])
        carol = await make_ua("sip:carol@p2p.example", overlay[2])
        for ua, peer in ((bob, overlay[1]), (alice, overlay[0]), (carol, overlay[2])):
            assert (await ua.register(f"sip:{via(peer)}", expires=300, refresh=False)).status == 200
        allowed = await alice.subscribe(BOB, "presence", body_check=lambda r: None)
        basic, _, note = await basic_of(allowed)
        assert basic == "open" and note.state.state is SubState.ACTIVE
        refused = await carol.subscribe(BOB, "presence", body_check=lambda r: None)
        note = await refused.next(10)
        assert note.state.state is SubState.TERMINATED and note.state.reason == "rejected"
        assert not note.state.may_resubscribe
        await allowed.unsubscribe()
    finally:
        for scripting in installed:
            await scripting.close()
