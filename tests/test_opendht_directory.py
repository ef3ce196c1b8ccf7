"""OpenDHT as the directory engine, over a few OpenDHT nodes on loopback started here with the opendht
package: entries put through one node are read through another; readers ignore forged values put straight
into OpenDHT (bad signature, a certificate of another authority, junk) and count them; a removal is a signed
tombstone that keeps the AOR unregistered; entries are re-put (refresh); reads are bounded."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from overlay.errors import StoreRefused
from overlay.identity import KeyPair, enroll_user
from overlay.ids import key_for
from overlay.storage import Entry
from overlay.store import encode_entry

if os.environ.get("CI") != "true":
    pytest.importorskip("opendht")
import opendht  # under CI=true a missing package fails here: .ci/run installs the extra

from overlay.opendht_directory import OpenDhtDirectory

pytestmark = pytest.mark.slow
AOR = "sip:alice@corp.example"


@pytest.fixture
async def dhts() -> AsyncIterator[tuple[KeyPair, list[OpenDhtDirectory]]]:
    ca = KeyPair.generate()
    nodes: list[OpenDhtDirectory] = []
    try:
        first = await OpenDhtDirectory.start(("127.0.0.1", 0), ca.public_key)
        nodes.append(first)
        for _ in range(3):
            nodes.append(
                await OpenDhtDirectory.start(("127.0.0.1", 0), ca.public_key, bootstrap=first.endpoint)
            )
        yield ca, nodes
    finally:
        await asyncio.gather(*(n.close() for n in nodes))


async def eventually(check, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """OpenDHT spreads a put to the storing nodes by itself: poll the read (bounded) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.2)


async def test_signed_entries_forgeries_ignored_and_tombstones(
    dhts: tuple[KeyPair, list[OpenDhtDirectory]],
) -> None:
    ca, nodes = dhts
    alice = KeyPair.generate()
    with pytest.raises(StoreRefused, match="no user certificate") as info:
        await nodes[1].put(AOR, b"contact", key=alice)
    assert info.value.reason == "policy"
    nodes[1].add_certificate(enroll_user(ca, AOR, alice.public_key))
    await nodes[1].at(AOR).put(b"contact-1", entry_id=b"dev1", lifetime=3600, key=alice)

    async def values() -> list[bytes]:
        return [e.value for e in await nodes[3].get(AOR)]

    assert await eventually(values) == [b"contact-1"]
    # forgeries put straight into OpenDHT under the AOR's hash: another authority's certificate, a bad
    # signature, junk. Readers ignore them and count them.
    mallory = KeyPair.generate()
    foreign = enroll_user(KeyPair.generate(), AOR, mallory.public_key).to_bytes()
    forged = Entry.create(mallory, key_for(AOR), b"dev1", b"evil", 2**60, 3600, foreign)
    good = (await nodes[1].get(AOR))[0]
    bad_sig = Entry(good.key, b"dev2", b"evil", good.seq, good.lifetime_s, good.owner, bytes(64), good.cert)
    where = opendht.InfoHash.get(AOR)
    for blob in (encode_entry(forged), encode_entry(bad_sig), b"\x00junk"):
        assert await asyncio.to_thread(nodes[2].runner.put, where, opendht.Value(blob))

    async def all_rejected() -> bool:
        await nodes[3].get(AOR)
        return (
            nodes[3].counts.get("values_rejected", 0) >= 2 and nodes[3].counts.get("values_malformed", 0) >= 1
        )

    assert await eventually(all_rejected)
    assert await values() == [b"contact-1"]
    # removal: a signed tombstone with a higher seq; the AOR stays unregistered
    await nodes[1].at(AOR).remove(entry_id=b"dev1", key=alice)
    assert await eventually(lambda: _empty(nodes[3]))
    assert await nodes[0].get(AOR) == []
    # refresh puts again what this node keeps (the tombstone too), so nothing comes back
    assert await nodes[1].refresh() == 1
    assert await nodes[2].get(AOR) == []


async def _empty(node: OpenDhtDirectory) -> bool:
    return await node.get(AOR) == []


async def test_reads_of_a_flooded_key_are_bounded(dhts: tuple[KeyPair, list[OpenDhtDirectory]]) -> None:
    _ca, nodes = dhts
    nodes[0].read_limit = 8
    where = opendht.InfoHash.get("sip:victim@corp.example")
    for i in range(20):
        assert await asyncio.to_thread(nodes[1].runner.put, where, opendht.Value(b"junk%d" % i))

    async def flooded() -> bool:
        await nodes[0].get("sip:victim@corp.example")
        return nodes[0].counts.get("values_over_limit", 0) > 0

    assert await eventually(flooded)
    assert nodes[0].counts["values_read"] <= 8 * nodes[0].counts["gets"]


async def test_watch_tells_of_changes(dhts: tuple[KeyPair, list[OpenDhtDirectory]]) -> None:
    ca, nodes = dhts
    alice = KeyPair.generate()
    nodes[1].add_certificate(enroll_user(ca, AOR, alice.public_key))
    seen: asyncio.Queue[list[bytes]] = asyncio.Queue()
    stop = nodes[2].watch(AOR, lambda entries: seen.put_nowait([e.value for e in entries]))
    try:
        assert await asyncio.wait_for(seen.get(), 10) == []  # the first read
        await nodes[1].put(AOR, b"c1", entry_id=b"d", key=alice)
        assert await asyncio.wait_for(seen.get(), 10) == [b"c1"]  # OpenDHT's listen, not the slow poll
        await nodes[1].remove(AOR, entry_id=b"d", key=alice)
        assert await asyncio.wait_for(seen.get(), 10) == []
    finally:
        stop()


async def test_the_refresh_timer_reputs_and_forgets_by_its_clock(
    dhts: tuple[KeyPair, list[OpenDhtDirectory]],
) -> None:
    """The timer itself, not a call of refresh(): a node with a 50 ms refresh interval and a clock the test
    moves re-puts a live entry every round, keeps a tombstone ``tombstone_keep_s``, and forgets an entry
    once its clock passes the entry's expiry (then nothing more is put)."""
    ca, nodes = dhts
    offset = [0.0]
    writer = await OpenDhtDirectory.start(
        ("127.0.0.1", 0), ca.public_key, bootstrap=nodes[0].endpoint, refresh_s=0.05,
        tombstone_keep_s=100.0, clock=lambda: time.time() + offset[0],
    )  # fmt: skip
    try:
        alice = KeyPair.generate()
        writer.add_certificate(enroll_user(ca, AOR, alice.public_key))
        await writer.put(AOR, b"c1", entry_id=b"d1", lifetime=60, key=alice)
        await writer.put(AOR, b"c2", entry_id=b"d2", lifetime=3600, key=alice)
        await writer.remove(AOR, entry_id=b"d2", key=alice)

        async def rounds(n: int) -> None:
            for _ in range(n):
                writer.refreshed.clear()
                await asyncio.wait_for(writer.refreshed.wait(), 10)

        await rounds(2)
        assert writer.counts.get("refresh_rounds", 0) >= 2
        before = (writer.counts["refresh_rounds"], writer.counts.get("refreshed", 0))
        await rounds(1)  # each round re-puts d1 (live) and d2's tombstone
        done = writer.counts["refresh_rounds"] - before[0]
        assert done >= 1 and writer.counts["refreshed"] - before[1] == 2 * done
        assert (writer.kept_alive(), writer.stats()["tombstones_kept"]) == (1, 1)
        assert [e.value for e in await nodes[2].get(AOR)] == [b"c1"]
        offset[0] = 61.0  # past d1's expiry: the next full round forgets it and keeps the tombstone
        await rounds(2)
        assert (writer.kept_alive(), writer.stats()["tombstones_kept"]) == (0, 1)
        offset[0] = 101.0  # past the tombstone's keep: nothing is put any more
        await rounds(2)
        settled = writer.counts["refreshed"]
        await rounds(2)
        assert writer.counts["refreshed"] == settled and writer.stats()["tombstones_kept"] == 0
    finally:
        await writer.close()
