from __future__ import annotations

import random

import pytest

from overlay.errors import StoreRefused
from overlay.identity import KeyPair, enroll_node, enroll_user
from overlay.ids import RING, between_right, key_for
from overlay.storage import DROP_PREFIX, INBOX_KEY_ID, Entry, NodeRef, Replicator, Store

ALICE = KeyPair.generate()
BOB = KeyPair.generate()
KEY = key_for("sip:alice@example.net")


def entry(
    signer: KeyPair = ALICE,
    *,
    seq: int = 1,
    value: bytes = b"v",
    lifetime: int = 60,
    entry_id: bytes = b"",
    key: int = KEY,
    cert: bytes = b"",
) -> Entry:
    return Entry.create(signer, key, entry_id, value, seq, lifetime, cert)


def refused(store: Store, e: Entry, now: float = 0.0) -> str:
    with pytest.raises(StoreRefused) as info:
        store.put(e, now)
    return info.value.reason


def test_store_get_and_expiry_from_local_clock() -> None:
    store = Store()
    store.put(entry(lifetime=10), now=100.0)
    assert [e.value for e in store.get(KEY, 105.0)] == [b"v"]
    assert store.get(KEY, 110.0) == []
    assert store.purge(110.0) == 0  # still remembered (replay protection) ...
    assert store.purge(110.0 + store.memory_s) == 1  # ... then forgotten
    assert len(store) == 0


def test_refusals_say_why() -> None:
    store = Store(max_value=8)
    store.put(entry(seq=5), 0.0)
    assert refused(store, entry(seq=5)) == "stale-seq"  # replay
    assert refused(store, entry(seq=4)) == "stale-seq"
    assert refused(store, entry(seq=6, value=b"x" * 9)) == "too-large"
    good = entry(seq=7)
    forged = Entry(good.key, good.entry_id, b"evil", good.seq, good.lifetime_s, good.owner, good.signature)
    assert refused(store, forged) == "bad-signature"
    wrong_key = Entry(
        good.key, good.entry_id, good.value, good.seq, good.lifetime_s, BOB.public_key, good.signature
    )
    assert refused(store, wrong_key) == "bad-signature"
    assert refused(store, entry(BOB, seq=9, entry_id=b"bob")) == "policy"  # first-claim
    assert refused(store, entry(BOB, seq=9, value=b"", lifetime=0)) == "policy"  # nor remove alice's
    assert refused(store, entry(seq=8, lifetime=10**7)) == "bad-lifetime"
    assert store.refused["stale-seq"] == 2
    store.put(entry(seq=6), 0.0)


def test_removal_is_a_tombstone_that_blocks_replays_and_releases_the_claim() -> None:
    store = Store()
    old = entry(seq=1)
    store.put(old, 0.0)
    store.put(entry(seq=2, value=b"", lifetime=0), 1.0)
    assert store.get(KEY, 1.0) == []
    assert refused(store, old, 2.0) == "stale-seq"
    assert store.owner_of(KEY, 2.0) is None
    store.put(entry(BOB, seq=1, entry_id=b"bob"), 2.0)  # the name is free again
    assert refused(store, entry(seq=3, value=b"x", lifetime=0)) == "bad-removal"


def test_first_claim_lasts_until_all_owner_entries_expire() -> None:
    store = Store()
    store.put(entry(seq=1, entry_id=b"a", lifetime=10), 0.0)
    store.put(entry(seq=1, entry_id=b"b", lifetime=20), 0.0)
    assert refused(store, entry(BOB, entry_id=b"c"), 15.0) == "policy"
    store.put(entry(BOB, entry_id=b"c"), 20.0)
    assert store.owner_of(KEY, 20.0) == BOB.public_key


def test_enrolled_policy_needs_a_user_certificate_naming_the_aor() -> None:
    ca = KeyPair.generate()
    store = Store(policy="enrolled", ca_public_key=ca.public_key)
    cert = enroll_user(ca, "sip:alice@example.net", ALICE.public_key, now=0, days=1).to_bytes()
    store.put(entry(cert=cert), 0.0)
    assert refused(store, entry(seq=2)) == "policy"  # no cert
    assert refused(store, entry(BOB, seq=2, cert=cert, entry_id=b"b")) == "policy"  # alice's cert
    other = enroll_user(ca, "sip:bob@example.net", ALICE.public_key, now=0).to_bytes()
    assert refused(store, entry(seq=3, cert=other)) == "policy"  # cert for another name: H(AOR) != key
    bob_cert = enroll_user(ca, "sip:alice@example.net", BOB.public_key, now=0).to_bytes()  # two keys, one AOR
    store.put(entry(BOB, seq=1, entry_id=b"b", cert=bob_cert), 0.0)
    with pytest.raises(StoreRefused, match="expired"):
        store.put(entry(seq=4, cert=cert), 2 * 86400.0)  # a one-day certificate, two days on
    forged = enroll_user(KeyPair.generate(), "sip:alice@example.net", ALICE.public_key, now=0).to_bytes()
    with pytest.raises(StoreRefused, match="not signed by this overlay's enrollment authority"):
        store.put(entry(seq=5, cert=forged), 0.0)
    with pytest.raises(StoreRefused, match="not a"):
        store.put(entry(seq=6, cert=b"\x93junk"), 0.0)
    with pytest.raises(ValueError, match="CA"):
        Store(policy="enrolled")
    with pytest.raises(ValueError, match="policy"):
        Store(policy="anything")


def test_transfer_keeps_remaining_lifetime() -> None:
    a, b = Store(), Store()
    a.put(entry(lifetime=100), 0.0)
    items = list(a.records(60.0))
    assert items[0][1] == 40_000
    assert b.accept(items, 1000.0) == (1, 0)
    assert b.get(KEY, 1039.0) and not b.get(KEY, 1040.5)
    assert b.accept(items, 1000.0) == (0, 0)  # a second copy is stale, not refused


# --- replication decisions ---------------------------------------------------------------------------


def ring(n: int, seed: int = 1) -> list[NodeRef]:
    rng = random.Random(seed)
    return sorted((rng.randrange(RING), "127.0.0.1", 1000 + i) for i in range(n))


def responsible(nodes: list[NodeRef], key: int) -> int:
    ids = [n[0] for n in nodes]
    for i, nid in enumerate(ids):
        if between_right(key, ids[i - 1], nid):
            return i
    raise AssertionError


class Cluster:
    """Nodes of a perfect ring, each with a Store and a Replicator, transfers applied immediately."""

    def __init__(self, nodes: list[NodeRef], r: int) -> None:
        self.nodes = list(nodes)
        self.r = r
        self.stores = {n[0]: Store() for n in nodes}
        self.reps = {n[0]: Replicator(n[0], r) for n in nodes}
        self.settle()

    def neighbours(self, i: int) -> tuple[NodeRef, list[NodeRef]]:
        n = len(self.nodes)
        return self.nodes[i - 1], [self.nodes[(i + k) % n] for k in range(1, min(self.r + 1, n))]

    def settle(self) -> None:
        for _ in range(3):
            for i, node in enumerate(self.nodes):
                pred, succs = self.neighbours(i)
                for target, items in self.reps[node[0]].on_neighbours(pred, succs, self.stores[node[0]], 0.0):
                    self.stores[target[0]].accept(items, 0.0)

    def put(self, e: Entry) -> None:
        i = responsible(self.nodes, e.key)
        self.stores[self.nodes[i][0]].put(e, 0.0)
        for k in range(1, self.r):
            self.stores[self.nodes[(i + k) % len(self.nodes)][0]].put(e, 0.0)

    def copies(self, e: Entry) -> list[int]:
        i = responsible(self.nodes, e.key)
        holders = [self.nodes[(i + k) % len(self.nodes)][0] for k in range(self.r)]
        return [h for h in holders if any(x.seq == e.seq for x in self.stores[h].get(e.key, 0.0))]


def test_replication_restores_r_copies_after_r_minus_1_adjacent_failures_and_joins() -> None:
    r = 3
    cluster = Cluster(ring(12), r)
    entries = [entry(KeyPair.generate(), key=random.Random(i).randrange(RING), seq=1) for i in range(40)]
    for e in entries:
        cluster.put(e)
    assert all(len(cluster.copies(e)) == r for e in entries)
    # two adjacent nodes crash
    del cluster.nodes[4:6]
    cluster.settle()
    assert all(len(cluster.copies(e)) == r for e in entries)
    # a node joins: it must get its primary range and its replica ranges
    newcomer = (cluster.nodes[2][0] + 1, "127.0.0.1", 5000)
    cluster.nodes.insert(3, newcomer)
    cluster.stores[newcomer[0]] = Store()
    cluster.reps[newcomer[0]] = Replicator(newcomer[0], r)
    cluster.settle()
    assert all(len(cluster.copies(e)) == r for e in entries)


def test_leave_hands_everything_to_the_successor() -> None:
    cluster = Cluster(ring(6), 2)
    entries = [entry(KeyPair.generate(), key=random.Random(i).randrange(RING)) for i in range(20)]
    for e in entries:
        cluster.put(e)
    leaving = cluster.nodes[2]
    _, succs = cluster.neighbours(2)
    for target, items in cluster.reps[leaving[0]].on_leave(succs, cluster.stores[leaving[0]], 0.0):
        cluster.stores[target[0]].accept(items, 0.0)
    del cluster.nodes[2]
    cluster.settle()
    assert all(len(cluster.copies(e)) == 2 for e in entries)


def test_first_node_hands_over_to_its_first_predecessor() -> None:
    me, other = (10, "h", 1), (RING // 2, "h", 2)
    store = Store()
    rep = Replicator(me[0], 2)
    mine, theirs = entry(key=5, entry_id=b"m"), entry(key=RING // 4, entry_id=b"t")
    store.put(mine, 0.0)
    store.put(theirs, 0.0)
    out = rep.on_neighbours(other, [other], store, 0.0)
    sent = {(t[0], e.entry_id) for t, items in out for e, _ in items}
    assert (other[0], b"t") in sent
    assert rep.is_primary(5) and not rep.is_primary(RING // 4)


def test_quota_per_owner_key() -> None:
    store = Store(max_per_owner=3)
    for i in range(3):
        store.put(entry(key=i + 1, entry_id=b"e"), 0.0)
    assert refused(store, entry(key=99)) == "quota"
    store.put(entry(key=1, entry_id=b"e", seq=2), 0.0)  # updating an existing record is fine
    store.put(entry(BOB, key=99), 0.0)  # other keys are not affected
    store.purge(1000.0 + store.memory_s)  # expired and forgotten: room again
    store.put(entry(key=99, seq=3), 2000.0 + store.memory_s)


def test_inbox_policy_anyone_drops_within_a_quota_only_the_owner_removes() -> None:
    store = Store(inbox_quota=2)
    key = key_for("inbox:sip:bob@p2p.example")
    carol = KeyPair.generate()

    def drop(writer: KeyPair, n: int, seq: int = 1, value: bytes = b"sealed", life: int = 60) -> Entry:
        eid = DROP_PREFIX + writer.public_key + bytes([n])
        return Entry.create(writer, key, eid, value, seq, life)

    # no inbox yet: a drop is refused (and a drop never makes its writer the key's first-claim owner)
    assert refused(store, drop(ALICE, 1)) == "policy"
    store.put(entry(BOB, key=key, entry_id=INBOX_KEY_ID, value=b"x" * 32), 0.0)
    for n in (1, 2):
        store.put(drop(ALICE, n), 0.0)
    assert refused(store, drop(ALICE, 3)) == "quota"  # a quota per writer and inbox
    store.put(drop(carol, 1), 0.0)  # another writer has a quota of its own
    # a writer neither removes its drop nor writes outside its own name space or over the inbox key
    assert refused(store, drop(ALICE, 1, seq=2, value=b"", life=0)) == "policy"
    forged = Entry.create(ALICE, key, DROP_PREFIX + carol.public_key + b"\x01", b"mine", 2, 60)
    assert refused(store, forged) == "policy"
    assert refused(store, entry(ALICE, key=key, entry_id=INBOX_KEY_ID, seq=5)) == "policy"
    assert len(store.get(key, 1.0)) == 4
    # the owner removes a drop (the writer's quota frees up) and still owns the key
    removal = Entry.create(BOB, key, DROP_PREFIX + ALICE.public_key + b"\x01", b"", 2, 0)
    store.put(removal, 1.0)
    assert len(store.get(key, 1.0)) == 3
    store.put(drop(ALICE, 3), 1.0)
    assert store.owner_of(key, 1.0) == BOB.public_key


def test_under_enrolled_only_enrolled_writers_drop_in_an_inbox() -> None:
    """The inbox rule of OpenDHT's readers held by Chord's replicas too: under ``enrolled`` a drop needs a
    certificate of the CA for its writing key (a node's, or a user's for any AOR), else a stranger's free
    key would get an inbox quota of its own; the reason is said."""
    ca = KeyPair.generate()
    store = Store(policy="enrolled", ca_public_key=ca.public_key)
    bob_aor = "sip:bob@p2p.example"
    key = key_for("inbox:" + bob_aor)
    bob_cert = enroll_user(ca, bob_aor, BOB.public_key, now=0).to_bytes()
    store.put(entry(BOB, key=key, entry_id=INBOX_KEY_ID, value=b"x" * 32, cert=bob_cert), 0.0)
    node, stranger = KeyPair.generate(), KeyPair.generate()

    def drop(writer: KeyPair, cert: bytes, seq: int = 1) -> Entry:
        return Entry.create(writer, key, DROP_PREFIX + writer.public_key + b"\x01", b"sealed", seq, 60, cert)

    for cert, why in (
        (b"", "not enrolled"),
        (enroll_node(KeyPair.generate(), stranger.public_key, now=0).to_bytes(), "not signed by this"),
        (enroll_node(ca, node.public_key, now=0).to_bytes(), "another key"),
        (enroll_node(ca, stranger.public_key, now=-3 * 86400, days=1).to_bytes(), "expired"),
    ):
        with pytest.raises(StoreRefused, match=rf"enrolled writer.*{why}"):
            store.put(drop(stranger, cert), 0.0)
    store.put(drop(node, enroll_node(ca, node.public_key, now=0).to_bytes()), 0.0)  # a node's certificate
    alice_cert = enroll_user(ca, "sip:alice@p2p.example", ALICE.public_key, now=0).to_bytes()
    store.put(drop(ALICE, alice_cert), 0.0)  # a user's, for her own AOR
    assert len([e for e in store.get(key, 1.0) if e.entry_id[:1] == DROP_PREFIX]) == 2
    # the owner's removal of a drop needs no more than before: his own certificate for the key
    store.put(Entry.create(BOB, key, DROP_PREFIX + node.public_key + b"\x01", b"", 2, 0, bob_cert), 1.0)
    assert len(store.get(key, 1.0)) == 2
