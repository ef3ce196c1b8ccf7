"""The reader's rule for an engine that stores whatever anyone sends (``overlay.directory.select_entries``,
sans-IO: blobs and ``now`` in, entries and counts out), for offline-message inboxes: the ``inbox`` rule of
``overlay.storage`` applied by readers. Any enrolled writer (user or node certificate) may drop, within the
quota; an un-enrolled one may not; a drop's writer cannot remove it; only the inbox's owner does; no inbox,
no drops. A user certificate for an AOR covers H(AOR) and H('inbox:' + AOR), nothing else."""

from __future__ import annotations

import time

from overlay.directory import select_entries
from overlay.identity import (
    INBOX_NAME_PREFIX,
    KeyPair,
    VerifiedCache,
    enroll_node,
    enroll_user,
    user_cert_problem,
)
from overlay.ids import key_for
from overlay.storage import DROP_PREFIX, INBOX_KEY_ID, Entry
from overlay.store import encode_entry
from p2psip.inbox import INBOX_PREFIX as SIP_INBOX_PREFIX
from p2psip.inbox import inbox_name

AOR = "sip:bob@corp.example"
INBOX = inbox_name(AOR)


def test_the_inbox_prefix_is_one_name_on_both_sides() -> None:
    # p2psip.inbox (SIP side) and overlay.identity (certificates) may not import each other: one value
    assert SIP_INBOX_PREFIX == INBOX_NAME_PREFIX


def test_a_user_certificate_covers_the_aor_and_its_inbox_only() -> None:
    ca, bob = KeyPair.generate(), KeyPair.generate()
    now = time.time()
    cert = enroll_user(ca, AOR, bob.public_key).to_bytes()
    for name in (AOR, INBOX):
        assert user_cert_problem(ca.public_key, cert, key_for(name), bob.public_key, now) is None
    problem = user_cert_problem(
        ca.public_key, cert, key_for("inbox:sip:eve@corp.example"), bob.public_key, now
    )
    assert problem is not None and "not this key" in problem


def _entry(
    signer: KeyPair, entry_id: bytes, value: bytes, seq: int, cert: bytes, lifetime: int = 3600
) -> bytes:
    return encode_entry(Entry.create(signer, key_for(INBOX), entry_id, value, seq, lifetime, cert))


def test_readers_apply_the_inbox_rule() -> None:
    ca, bob, node, stranger = (KeyPair.generate() for _ in range(4))
    now = time.time()
    bob_cert = enroll_user(ca, AOR, bob.public_key).to_bytes()
    node_cert = enroll_node(ca, node.public_key).to_bytes()
    foreign = enroll_node(KeyPair.generate(), stranger.public_key).to_bytes()  # another authority
    ms = int(now * 1000)
    inbox = _entry(bob, INBOX_KEY_ID, b"k" * 32, ms, bob_cert)
    drops = [_entry(node, DROP_PREFIX + node.public_key + bytes([i]), b"box%d" % i, ms + i, node_cert)
             for i in range(4)]  # fmt: skip
    strangers = _entry(stranger, DROP_PREFIX + stranger.public_key + b"x", b"spam", ms, foreign)

    def read(*blobs: bytes, quota: int = 32) -> tuple[list[bytes], dict[str, int]]:
        counts: dict[str, int] = {}
        entries = select_entries(
            INBOX, blobs, ca.public_key, now + 1, counts, cache=VerifiedCache(), inbox_quota=quota
        )
        return [e.value for e in entries], counts

    # no inbox entry: drops are not kept
    values, counts = read(*drops)
    assert values == [] and counts["values_rejected"] == 4
    # an inbox: an enrolled node's drops are; a writer of another authority's are not
    values, counts = read(inbox, *drops, strangers)
    assert sorted(values) == [b"box0", b"box1", b"box2", b"box3", b"k" * 32]
    assert counts["values_rejected"] == 1
    # the quota counts a writer's oldest drops
    values, counts = read(inbox, *drops, quota=2)
    assert sorted(values) == [b"box0", b"box1", b"k" * 32] and counts["drops_over_quota"] == 2
    # the writer removing its own drop: ignored; the owner removing it: gone
    by_writer = _entry(node, DROP_PREFIX + node.public_key + bytes([0]), b"", ms + 100, node_cert, lifetime=0)
    values, counts = read(inbox, *drops, by_writer)
    assert b"box0" in values and counts["values_rejected"] == 1
    by_owner = _entry(bob, DROP_PREFIX + node.public_key + bytes([0]), b"", ms + 100, bob_cert, lifetime=0)
    values, _counts = read(inbox, *drops, by_owner)
    assert b"box0" not in values and b"box1" in values


def test_readers_keep_the_newest_valid_version_per_entry_id() -> None:
    """For an AOR on an engine that stores anything: of each entry id the newest ``seq`` among the validly
    signed, enrolled versions counts, whatever order the engine returns them in; a tombstone with a higher
    seq hides the entry; a higher seq signed by a stranger, an expired certificate or a bad signature
    changes nothing and is counted."""
    ca, alice, mallory = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    now = time.time()
    ms = int(now * 1000)
    cert = enroll_user(ca, AOR, alice.public_key).to_bytes()

    def version(signer: KeyPair, value: bytes, seq: int, cert: bytes, lifetime: int = 3600) -> Entry:
        return Entry.create(signer, key_for(AOR), b"dev1", value, seq, lifetime, cert)

    old, new = version(alice, b"old", ms, cert), version(alice, b"new", ms + 5, cert)
    expired = enroll_user(ca, AOR, mallory.public_key, now=now - 3 * 86400, days=1).to_bytes()
    foreign = enroll_user(KeyPair.generate(), AOR, mallory.public_key).to_bytes()
    junk = [
        version(mallory, b"evil", ms + 50, foreign),
        version(mallory, b"evil", ms + 60, expired),
        version(mallory, b"evil", ms + 70, b""),
    ]
    bad_sig = Entry(new.key, b"dev1", b"evil", ms + 80, 3600, alice.public_key, bytes(64), cert)

    def read(*entries: Entry) -> tuple[list[bytes], dict[str, int]]:
        counts: dict[str, int] = {}
        blobs = [encode_entry(e) for e in entries]
        kept = select_entries(AOR, blobs, ca.public_key, now + 1, counts, cache=VerifiedCache())
        return [e.value for e in kept], counts

    for order in ((old, new), (new, old)):
        assert read(*order)[0] == [b"new"]
    values, counts = read(old, *junk, bad_sig, new)
    assert values == [b"new"] and counts["values_rejected"] == 4
    tombstone = version(alice, b"", ms + 10, cert, lifetime=0)
    assert read(new, tombstone, old)[0] == []
    assert read(new, tombstone, version(alice, b"again", ms + 20, cert))[0] == [b"again"]
