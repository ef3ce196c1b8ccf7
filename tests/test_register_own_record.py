"""A REGISTER without a DHT read (issue 19, targets 1 and 3): when the AOR's user key exists on this peer
only, the registrar plans against its own record of what it wrote (``Peer._own_record``) and the
registration is one overlay round trip, its write. The 200 must still be exactly RFC 3261 §10.3's: every
current binding (those registered through other peers included), CSeq order per binding, ``*`` removing
all. Each test checks the 200 against what the DHT holds, read from another peer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from peer_support import PeerFactory, wait_until_settled

from p2psip.message import Request, new_tag
from p2psip.peer import Peer

BOB = "sip:bob@p2p.example"


@pytest.fixture
async def ring(make_peer: PeerFactory) -> list[Peer]:
    first = await make_peer()
    peers = [first] + [await make_peer(first) for _ in range(2)]
    await wait_until_settled(peers, timeout=20)
    for peer in peers:
        peer.config.offline_messages = False  # no inbox key: only the registrar's own reads are counted
    return peers


def reads(peer: Peer) -> tuple[int, int]:
    """(REGISTERs that read the DHT, REGISTERs planned from the peer's own record)."""
    return peer.counters["register_reads"], peer.counters["register_reads_saved"]


def contacts(response: object) -> list[str]:
    return sorted(str(c.uri) for c in response.contacts)  # type: ignore[attr-defined]


async def stored(peer: Peer) -> list[str]:
    return sorted(b.contact for b in await peer.fetch_bindings(BOB))


async def test_the_peer_that_wrote_an_aor_plans_from_its_own_record(ring: list[Peer], phones) -> None:
    """A new AOR, its refresh and a second contact: no DHT read, and every 200 lists what the DHT holds;
    CSeq order per binding and ``*`` work from the own record as from a read."""
    bob = await phones("bob")
    peer, other = ring[0], ring[2]
    one, two = "sip:bob@127.0.0.1:5001", "sip:bob@127.0.0.1:5002"
    first = await bob.register(peer.sip_address(), contact=f"<{one}>", call_id="c1", cseq=1)
    assert first.status == 200 and contacts(first) == [one]
    refreshed = await bob.register(peer.sip_address(), contact=f"<{one}>", expires=900, call_id="c1", cseq=2)
    assert refreshed.status == 200 and contacts(refreshed) == [one]
    assert refreshed.contacts[0].expires is not None and refreshed.contacts[0].expires > 800
    added = await bob.register(peer.sip_address(), contact=f"<{two}>", call_id="c2", cseq=1)
    assert added.status == 200 and contacts(added) == [one, two]  # the first binding is still listed
    assert await stored(other) == [one, two]
    # a REGISTER older than the binding's last one (same Call-ID, lower CSeq) is refused, nothing written
    late = await bob.register(peer.sip_address(), contact=f"<{one}>", expires=60, call_id="c1", cseq=1)
    assert late.status == 400 and "CSeq" in late.reason
    assert reads(peer) == (0, 4)
    wiped = await bob.register(peer.sip_address(), contact="*", expires=0, call_id="c2", cseq=2)
    assert wiped.status == 200 and not wiped.contacts
    assert await stored(other) == []
    assert reads(peer) == (0, 5)
    # a query still reads the DHT (it changes nothing and is answered from what is stored)
    asked = Request.create(
        "REGISTER", "sip:p2p.example", from_=f"<{BOB}>;tag={new_tag()}", to=f"<{BOB}>", call_id="c2", cseq=3,
        via=bob._via(),
    )  # fmt: skip
    query = await bob.request(asked, peer.sip_address())
    assert query.status == 200 and not query.contacts
    assert reads(peer) == (1, 5)


async def test_a_binding_registered_through_another_peer_shows_in_the_next_200(
    ring: list[Peer], phones
) -> None:
    """Once the user key is copied to another peer (a second device, DESIGN.md), both peers read before
    they write: each 200 lists the binding the other peer wrote."""
    desk, mobile = await phones("bob"), await phones("bob")
    assert (await desk.register(ring[0].sip_address(), call_id="desk", cseq=1)).status == 200
    assert reads(ring[0]) == (0, 1)  # the key was this peer's alone
    target = ring[1].users.path_for(BOB)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ring[0].users.export(BOB), target)
    answer = await mobile.register(ring[1].sip_address(), call_id="mobile", cseq=1)
    assert answer.status == 200 and contacts(answer) == sorted([desk.contact, mobile.contact])
    assert reads(ring[1]) == (1, 0)
    again = await desk.register(ring[0].sip_address(), call_id="desk", cseq=2)
    assert again.status == 200 and contacts(again) == sorted([desk.contact, mobile.contact])
    assert reads(ring[0]) == (1, 1)  # the key file exported for the copy: the record is no longer whole
    assert await stored(ring[2]) == sorted([desk.contact, mobile.contact])


async def test_after_a_restart_the_registrar_reads_until_what_it_did_not_write_is_gone(
    make_peer: PeerFactory, phones, tmp_path: Path
) -> None:
    """A restarted peer does not know what its earlier run wrote: it reads while the claim covers it, and
    keeps reading for as long as a binding the read found and this run did not write lives."""
    data = tmp_path / "restarting"
    first = await make_peer(data_dir=data)
    helpers = [await make_peer(first), await make_peer(first)]
    await wait_until_settled([first, *helpers])
    bob = await phones("bob")
    old, new = "sip:bob@127.0.0.1:5001", "sip:bob@127.0.0.1:5002"
    assert (await bob.register(first.sip_address(), contact=f"<{old}>", call_id="a", cseq=1)).status == 200
    await first.close()
    again = await make_peer(helpers[0], data_dir=data)
    await wait_until_settled([again, *helpers])
    answer = await bob.register(again.sip_address(), contact=f"<{new}>", call_id="b", cseq=1)
    assert answer.status == 200 and contacts(answer) == [old, new]
    refreshed = await bob.register(again.sip_address(), contact=f"<{new}>", call_id="b", cseq=2)
    assert refreshed.status == 200 and contacts(refreshed) == [old, new]
    assert reads(again) == (2, 0)
    # the old binding removed (through this run): the record is whole again, the next REGISTER skips the read
    gone = await bob.register(again.sip_address(), contact=f"<{old}>", expires=0, call_id="a", cseq=2)
    assert gone.status == 200 and contacts(gone) == [new]
    assert reads(again) == (3, 0)
    last = await bob.register(again.sip_address(), contact=f"<{new}>", call_id="b", cseq=3)
    assert last.status == 200 and contacts(last) == [new]
    assert reads(again) == (3, 1)
    assert await stored(helpers[1]) == [new]
