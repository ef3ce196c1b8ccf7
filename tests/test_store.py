"""The durable entry store (overlay/store.py): what a node acknowledged survives a restart, what was
tampered with is never served, and the memory rules (seq, tombstones, first-claim, quota, expiry on the
wall clock) hold across the restart. Real SQLite files in a temporary directory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack
import pytest

from overlay.errors import OverlayError, StoreRefused
from overlay.identity import KeyPair
from overlay.ids import key_for, to_bytes
from overlay.storage import Entry
from overlay.storage_core import Answer, StorageCore
from overlay.store import FILE_NAME, DurableStore

T0 = 1_800_000_000.0  # wall-clock seconds
NAME = "sip:alice@example.net"
KEY = key_for(NAME)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / FILE_NAME


def entry(
    user: KeyPair,
    value: bytes = b"sip:alice@10.0.0.1",
    *,
    seq: int = 1,
    life: int = 600,
    eid: bytes = b"phone",
    key: int = KEY,
) -> Entry:
    return Entry.create(user, key, eid, value, seq, life)


def test_entries_survive_reopen_as_signed_with_wall_clock_expiry(path: Path) -> None:
    alice = KeyPair.generate()
    store = DurableStore(path, T0)
    first = entry(alice)
    store.put(first, T0)
    store.put(entry(alice, b"sip:alice@10.0.0.2", eid=b"desk", life=60), T0)
    store.close()
    again = DurableStore(path, T0 + 30)
    assert again.loaded == 2 and again.rejected == 0 and not again.corrupt
    got = again.get(KEY, T0 + 30)
    assert [e.entry_id for e in got] == [b"desk", b"phone"]
    assert got[1] == first  # byte for byte the entry that was signed: nothing re-signed
    # expiry is wall-clock: the 60 s entry is gone 61 s after it was stored, whatever the restarts
    assert [e.entry_id for e in again.get(KEY, T0 + 61)] == [b"phone"]
    again.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_tombstone_seq_first_claim_and_quota_hold_after_restart(path: Path) -> None:
    alice, mallory = KeyPair.generate(), KeyPair.generate()
    store = DurableStore(path, T0, max_per_owner=2)
    old = entry(alice, seq=1)
    store.put(old, T0)
    store.put(Entry.create(alice, KEY, b"phone", b"", 2, 0), T0)  # signed removal: a tombstone
    store.put(entry(alice, eid=b"desk", seq=3), T0)
    store.close()
    again = DurableStore(path, T0 + 1, max_per_owner=2)
    assert again.slot_records(KEY, T0 + 1)[1][0].is_removal  # replica reads see it, with its seq
    with pytest.raises(StoreRefused) as replay:
        again.put(old, T0 + 1)
    assert replay.value.reason == "stale-seq"
    with pytest.raises(StoreRefused) as squat:
        again.put(entry(mallory, seq=9, eid=b"x"), T0 + 1)
    assert squat.value.reason == "policy"  # first-claim owner restored with the entries
    with pytest.raises(StoreRefused) as quota:
        again.put(entry(alice, seq=9, eid=b"third", key=key_for("sip:other@example.net")), T0 + 1)
    assert quota.value.reason == "quota"  # the tombstone and the desk entry count, as in memory
    again.close()


def test_tampered_row_is_rejected_and_never_served(path: Path) -> None:
    alice = KeyPair.generate()
    store = DurableStore(path, T0)
    store.put(entry(alice), T0)
    store.put(entry(alice, eid=b"desk"), T0)
    store.close()
    db = sqlite3.connect(path)
    blob = db.execute("SELECT entry FROM entries WHERE entry_id = ?", (b"phone",)).fetchone()[0]
    fields = msgpack.unpackb(blob)
    fields[2] = b"sip:mallory@203.0.113.9"  # the value changed, the signature kept
    db.execute("UPDATE entries SET entry = ? WHERE entry_id = ?", (msgpack.packb(fields), b"phone"))
    db.execute("UPDATE entries SET entry = ? WHERE entry_id = ?", (b"\xc1garbage", b"desk"))
    db.commit()
    db.close()
    again = DurableStore(path, T0)
    assert again.rejected == 2 and again.loaded == 0
    assert again.get(KEY, T0) == []
    # and the bad rows are gone from the file
    assert sqlite3.connect(path).execute("SELECT count(*) FROM entries").fetchone() == (0,)
    again.close()


def test_torn_file_is_moved_aside_and_the_node_starts_empty(path: Path) -> None:
    alice = KeyPair.generate()
    store = DurableStore(path, T0)
    for i in range(200):
        store.put(entry(alice, eid=b"%03d" % i, key=key_for(f"sip:u{i}@example.net")), T0)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    data[4096:8192] = b"\xff" * 4096  # a torn write in the middle of the file
    path.write_bytes(bytes(data))
    again = DurableStore(path, T0)
    assert again.corrupt and again.loaded == 0 and len(again) == 0
    assert Path(f"{path}.corrupt").exists()  # kept for inspection, never served
    again.put(entry(alice), T0)  # and the fresh file works
    again.close()
    assert DurableStore(path, T0).loaded == 1


def test_expired_rows_are_purged(path: Path) -> None:
    alice = KeyPair.generate()
    store = DurableStore(path, T0, memory_s=100)
    store.put(entry(alice, life=10), T0)
    store.put(entry(alice, eid=b"long", life=10_000), T0)
    assert store.purge(T0 + 200) == 1
    assert sqlite3.connect(path).execute("SELECT count(*) FROM entries").fetchone() == (1,)
    store.close()
    assert DurableStore(path, T0 + 20_000, memory_s=100).loaded == 0  # expired while down: dropped


def test_a_store_is_committed_before_it_is_acknowledged(path: Path) -> None:
    """The storage core answers ``store`` only after ``put`` returned, and ``put`` returns after the
    commit: another connection (as after a SIGKILL) sees the row when the answer comes out."""
    alice = KeyPair.generate()
    core = StorageCore(1, DurableStore(path, T0), replicas=1, now=T0)
    core.handle_request("t", "store", {"entry": entry(alice)}, T0)
    (answer,) = core.take_outputs()
    assert isinstance(answer, Answer) and answer.type == "ok"
    other = sqlite3.connect(path)
    assert other.execute("SELECT key FROM entries").fetchall() == [(to_bytes(KEY),)]


def test_a_transfer_is_one_transaction(path: Path) -> None:
    alice = KeyPair.generate()
    store = DurableStore(path, T0)
    items = [(entry(alice, eid=b"%d" % i), 30_000) for i in range(50)]
    assert store.accept(items, T0) == (50, 0)
    store.close()
    again = DurableStore(path, T0 + 29)
    assert len(again.get(KEY, T0 + 29)) == 50 and again.get(KEY, T0 + 31) == []  # remaining life kept


def test_a_batch_is_one_commit_and_nothing_of_it_is_visible_before(path: Path) -> None:
    """The node's datagram burst (overlay.node): ``batch`` opens one transaction for every write until
    ``commit``; a transfer inside it joins it. Another connection (as after a SIGKILL) sees none of the
    rows before the commit and all of them after, so answers held until then never claim an uncommitted
    row."""
    alice = KeyPair.generate()
    store = DurableStore(path, T0)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.batch()
    for i in range(3):
        store.put(entry(alice, eid=b"%d" % i), T0)
    assert store.accept([(entry(alice, eid=b"t"), 30_000)], T0) == (1, 0)
    other = sqlite3.connect(path)
    assert other.execute("SELECT count(*) FROM entries").fetchone() == (0,)
    store.commit()
    assert other.execute("SELECT count(*) FROM entries").fetchone() == (4,)
    assert [s for s in statements if s in ("BEGIN", "COMMIT")] == ["BEGIN", "COMMIT"]
    store.put(entry(alice, eid=b"after"), T0)  # out of a batch: autocommit again
    assert other.execute("SELECT count(*) FROM entries").fetchone() == (5,)
    store.commit()  # nothing open: nothing to do
    store.close()


def test_an_unusable_file_is_a_clear_error_and_is_left_alone(tmp_path: Path) -> None:
    """A store that cannot be opened for a reason that is not the file's content (here: its directory is
    a file) is an OverlayError naming the path, and nothing is moved aside."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(OverlayError, match="cannot open the entry store"):
        DurableStore(blocker / FILE_NAME, T0)
    assert blocker.read_text() == "x"
