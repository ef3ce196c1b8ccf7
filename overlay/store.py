"""The durable entry store: what a node stores, kept in SQLite under its data dir.

``DurableStore`` is ``overlay.storage.Store`` (the same checks, the same in-memory index that answers
every read) with every change written to ``DATA_DIR/overlay.sqlite3`` before the write is acknowledged:
the storage core answers a ``store`` only after ``put`` returned, and ``put`` returns after the SQLite
commit. So what a peer acknowledged with 200 survives a SIGKILL of every peer (WAL mode, ``synchronous =
NORMAL``: a committed transaction survives a process crash; a power cut may lose the last ones).

What is kept, per entry slot: the signed entry exactly as received (its wire form: key, entry_id, value,
seq, lifetime, owner key, signature, enrollment cert), removals (tombstones) included, and its expiry as
**wall-clock** time (``now`` given to this store must be ``time.time()``: a monotonic clock means nothing
after a restart). First-claim ownership is not a separate fact: it is the owner of a key's live entries,
so it is restored with them. Per-owner quota, value size and lifetime limits apply as in memory (the
file holds nothing the memory index would not), and expired rows are deleted when ``purge`` runs.

A restarted node serves what it loads without re-signing anything, and loads only what it can check:
``PRAGMA integrity_check`` on open (a torn or tampered file that SQLite can tell is moved aside to
``overlay.sqlite3.corrupt`` and the node starts empty), then every row is decoded and its signature (and
enrollment, under that policy) verified again; a row that fails is deleted and counted, never served.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import msgpack

from overlay.errors import OverlayError
from overlay.identity import VerifiedCache, user_cert_problem
from overlay.ids import to_bytes
from overlay.storage import (
    DEFAULT_INBOX_QUOTA,
    DEFAULT_MAX_LIFETIME,
    DEFAULT_MAX_PER_OWNER,
    DEFAULT_MAX_VALUE,
    DEFAULT_MEMORY_S,
    Entry,
    Store,
)

FILE_NAME = "overlay.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key BLOB NOT NULL,
    entry_id BLOB NOT NULL,
    entry BLOB NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, entry_id)
) WITHOUT ROWID;
"""


def encode_entry(entry: Entry) -> bytes:
    """The entry as it travels (``Entry.to_wire``), msgpack-encoded."""
    return bytes(msgpack.packb(entry.to_wire(), use_bin_type=True))


def decode_entry(blob: bytes) -> Entry:
    """Inverse of :func:`encode_entry`; ``ValueError`` for anything that is not a well-formed entry."""
    try:
        items = msgpack.unpackb(blob, raw=False)
        key, entry_id, value, seq, lifetime, owner, sig, cert = items
        if not all(isinstance(b, bytes) for b in (key, entry_id, value, owner, sig, cert)) or len(key) != 16:
            raise ValueError("an entry field has the wrong type")
        if not isinstance(seq, int) or not isinstance(lifetime, int):
            raise ValueError("seq and lifetime are integers")
        return Entry(int.from_bytes(key, "big"), entry_id, value, seq, lifetime, owner, sig, cert)
    except (TypeError, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"not an entry: {exc}") from None


class DurableStore(Store):
    """A ``Store`` whose contents survive restarts (see the module docstring).

    Open it with the wall-clock ``now``; keyword arguments are those of ``Store``, spelled out because the
    compiled build (mypyc) cannot pass ``**options`` on to a base class's ``__init__``. ``loaded``,
    ``rejected`` and ``corrupt`` say what opening found.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        now: float,
        *,
        policy: str = "first-claim",
        ca_public_key: bytes | None = None,
        max_value: int = DEFAULT_MAX_VALUE,
        max_lifetime: int = DEFAULT_MAX_LIFETIME,
        memory_s: float = DEFAULT_MEMORY_S,
        max_per_owner: int = DEFAULT_MAX_PER_OWNER,
        cache: VerifiedCache | None = None,
        inbox_quota: int = DEFAULT_INBOX_QUOTA,
    ) -> None:
        super().__init__(
            policy=policy,
            ca_public_key=ca_public_key,
            max_value=max_value,
            max_lifetime=max_lifetime,
            memory_s=memory_s,
            max_per_owner=max_per_owner,
            cache=cache,
            inbox_quota=inbox_quota,
        )
        self.path = Path(path)
        self.loaded = 0
        self.rejected = 0
        self.corrupt = False
        self._batch = False
        self._db = self._open()
        self._load(now)

    # --- opening --------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            try:
                return self._connect()
            except sqlite3.OperationalError:
                raise  # locked, unreadable, no space: not the file's fault, never moved aside
            except sqlite3.DatabaseError:
                self._quarantine()
                return self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise OverlayError(f"cannot open the entry store {self.path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            ok = db.execute("PRAGMA integrity_check").fetchall()
            if ok != [("ok",)]:
                raise sqlite3.DatabaseError(f"integrity check: {ok[:3]}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise OverlayError(
                    f"{self.path} has storage schema {row[0]}; this version reads {SCHEMA_VERSION}"
                )
        except BaseException:
            db.close()
            raise
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        return db

    def _quarantine(self) -> None:
        """Move a file SQLite cannot trust aside (kept for inspection) so the node starts empty."""
        self.corrupt = True
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{self.path}.corrupt{suffix}"))

    def _load(self, now: float) -> None:
        """Rebuild the memory index from the file, checking every row again; drop what fails."""
        bad: list[tuple[bytes, bytes]] = []
        rows = self._db.execute("SELECT key, entry_id, entry, expires_at FROM entries").fetchall()
        for key, entry_id, blob, expires_at in rows:
            if expires_at + self.memory_s <= now:
                bad.append((key, entry_id))  # expired while we were down: purge, not a rejection
                continue
            try:
                entry = decode_entry(blob)
                if to_bytes(entry.key) != key or entry.entry_id != entry_id:
                    raise ValueError("row key does not match the entry")
                self._check_restored(entry, now)
            except ValueError:
                self.rejected += 1
                bad.append((key, entry_id))
                continue
            Store._keep(self, entry, float(expires_at))
            self.loaded += 1
        if bad:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM entries WHERE key = ? AND entry_id = ?", bad)
            self._db.execute("COMMIT")

    def _check_restored(self, entry: Entry, now: float) -> None:
        if not self.cache.verify(entry.owner, entry.signature, entry.signed_bytes()):
            raise ValueError("bad signature")
        if self.policy == "enrolled":
            assert self.ca_public_key is not None
            problem = user_cert_problem(
                self.ca_public_key, entry.cert, entry.key, entry.owner, now, self.cache
            )
            if problem is not None:
                raise ValueError(problem)
        else:
            owner = self.owner_of(entry.key, now)
            if owner is not None and owner != entry.owner and not entry.is_removal:
                raise ValueError("a second owner under one key")

    # --- writes ---------------------------------------------------------------------------------

    def batch(self) -> None:
        """Writes from now on go into one transaction, until :meth:`commit` (the node's datagram burst:
        one commit for every store in it instead of one each, ~0.1 ms apiece). Whoever calls this holds
        back the answers to those writes until the commit."""
        self._batch = True

    def commit(self) -> None:
        """End :meth:`batch`: commit what it wrote (OverlayError if SQLite cannot; the entries stay held
        in memory, as after any write the disk refused)."""
        self._batch = False
        if self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise OverlayError(f"cannot commit to the entry store {self.path}: {exc}") from None

    def _keep(self, entry: Entry, expires_at: float) -> None:
        """Hold the entry and write its row: one statement, committed on its own (autocommit), or part
        of a transfer's or a batch's transaction. ``put`` returns after this, so after the commit (in a
        batch: its answer waits for :meth:`commit`)."""
        super()._keep(entry, expires_at)
        if self._batch and not self._db.in_transaction:
            self._db.execute("BEGIN")
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)",
            (to_bytes(entry.key), entry.entry_id, encode_entry(entry), expires_at),
        )

    def accept(
        self,
        items: Iterable[tuple[Entry, int]],
        now: float,
        kept_items: list[tuple[Entry, int]] | None = None,
    ) -> tuple[int, int]:
        """As ``Store.accept``, in one transaction (a transfer of a thousand entries is one commit)."""
        if self._db.in_transaction:  # a batch is open: part of it
            return super().accept(items, now, kept_items)
        self._db.execute("BEGIN")
        try:
            return super().accept(items, now, kept_items)
        finally:
            self._db.execute("COMMIT")

    def purge(self, now: float) -> int:
        dropped = super().purge(now)
        self._db.execute("DELETE FROM entries WHERE expires_at + ? <= ?", (self.memory_s, now))
        return dropped

    def close(self) -> None:
        """Close the file (the node does this when it stops); the store must not be used afterwards."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
