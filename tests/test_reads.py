"""Quorum reads (overlay/reads.py), sans-IO: a node that hides or replays is outvoted by one honest holder."""

from __future__ import annotations

from overlay.identity import KeyPair, VerifiedCache
from overlay.ids import key_for
from overlay.reads import QuorumRead
from overlay.storage import Entry

USER = KeyPair.generate()
KEY = key_for("sip:alice@example.net")
CACHE = VerifiedCache()


def ok(entry: Entry) -> bool:
    return CACHE.verify(entry.owner, entry.signature, entry.signed_bytes())


def entry(value: bytes, seq: int, eid: bytes = b"phone") -> Entry:
    return Entry.create(USER, KEY, eid, value, seq, 0 if not value else 3600)


OLD, NEW = entry(b"old", 1), entry(b"new", 2)
GONE = entry(b"", 3)  # a signed removal, newer than both


def test_primary_and_one_more_agreeing_decide_at_once() -> None:
    read = QuorumRead(KEY, [1, 2, 3], ok)
    read.add(1, [NEW])
    assert not read.decided
    read.add(2, [NEW])
    assert read.decided and read.result() == [NEW]
    assert read.disagreeing() == [] and read.behind() == {}


def test_agreement_without_the_primary_waits_for_it_or_the_rest() -> None:
    read = QuorumRead(KEY, [1, 2, 3], ok)
    read.add(2, [NEW])
    read.add(3, [NEW])
    assert not read.decided  # two replicas agreeing without the responsible node: not yet
    read.fail(1)
    assert read.decided and read.result() == [NEW]


def test_a_hiding_primary_is_outvoted_repaired_and_counted() -> None:
    read = QuorumRead(KEY, [1, 2, 3], ok)
    read.add(1, [])
    read.add(2, [NEW])
    assert not read.decided  # they disagree: wait for the third
    read.add(3, [NEW])
    assert read.decided and read.result() == [NEW]
    assert read.disagreeing() == [1]
    assert read.behind() == {1: [NEW]}


def test_a_replayed_older_entry_loses_to_the_newer_seq() -> None:
    read = QuorumRead(KEY, [1, 2, 3], ok)
    read.add(1, [OLD])
    read.add(2, [NEW])
    read.fail(3)
    assert read.decided and read.result() == [NEW]
    assert read.disagreeing() == [1]


def test_a_tombstone_beats_a_stale_replica() -> None:
    read = QuorumRead(KEY, [1, 2, 3], ok)
    read.add(1, [NEW])  # stale (or lying): still serves the removed binding
    read.add(2, [GONE])
    read.add(3, [GONE])
    assert read.result() == []
    assert read.behind() == {1: [GONE]}


def test_forged_and_foreign_records_are_dropped_and_counted() -> None:
    forged = Entry(KEY, b"phone", b"evil", 9, 3600, USER.public_key, bytes(64))
    other_key = Entry.create(USER, key_for("sip:bob@example.net"), b"phone", b"x", 9, 3600)
    read = QuorumRead(KEY, [1, 2], ok)
    read.add(1, [forged, other_key])
    read.add(2, [NEW])
    assert read.result() == [NEW]
    assert read.invalid == {1: 2}
    assert 1 in read.disagreeing()


def test_several_entry_slots_merge_per_slot() -> None:
    laptop = entry(b"laptop", 5, b"laptop")
    read = QuorumRead(KEY, [1, 2], ok)
    read.add(1, [NEW])
    read.add(2, [OLD, laptop])
    assert read.result() == [laptop, NEW]
    assert read.behind() == {1: [laptop], 2: [NEW]}


def test_single_holder() -> None:
    read = QuorumRead(KEY, [7], ok)
    assert not read.answered
    read.add(7, [NEW])
    assert read.decided and read.result() == [NEW]


def test_a_holder_asked_after_the_answer_is_not_blamed_for_a_newer_write() -> None:
    read = QuorumRead(KEY, [1, 2, 3], ok)
    read.add(1, [OLD])
    read.add(2, [OLD])
    assert read.decided and read.result() == [OLD]
    read.answered_now()
    read.add(3, [NEW])  # asked later: a write happened in between
    assert read.disagreeing() == []
    late = QuorumRead(KEY, [1, 2, 3], ok)
    late.add(1, [NEW])
    late.add(2, [NEW])
    late.answered_now()
    late.add(3, [])  # asked later and hides: blamed
    assert late.disagreeing() == [3]
    assert late.behind() == {3: [NEW]}  # and given what the answer held


def test_a_write_made_after_the_answer_is_not_pushed_by_read_repair() -> None:
    """Read-then-write (a REGISTER): the late holder already has the reader's own write; the early
    holders are getting it from the writer, not from read repair."""
    read = QuorumRead(KEY, [1, 2, 3], ok)
    read.add(1, [])
    read.add(2, [])
    assert read.decided and read.result() == []
    read.answered_now()
    read.add(3, [NEW])
    assert read.behind() == {} and read.disagreeing() == []
