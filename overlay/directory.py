"""The directory the registrar, location and per-user scripts stand on: signed entries under a name.

Two engines implement it: our Chord node (``overlay.node.Node``: storing replicas check signatures and the
access policy, reads outvote liars) and OpenDHT (``overlay.opendht_directory``: a production DHT that checks
nothing of ours, so the *reader* does). Callers see only this interface: ``at(name)`` (an access to one
name's entries, found once), ``get``/``put``/``remove`` of signed entries, ``add_certificate`` for the
``enrolled`` policy.

``select_entries`` is the reader's rule for an engine that stores anything anyone sends (sans-IO: blobs and
``now`` in, entries and counts out): decode at most ``limit`` values (a stranger can flood a key with junk;
reading it all would be unbounded work), keep only entries of this name validly signed by a user key the
enrollment authority certified for this AOR, the newest ``seq`` per entry id, then drop removals
(tombstones) and expired entries. ``seq`` is the writer's wall clock in milliseconds, so an entry's expiry
(``seq / 1000 + lifetime``) is known without trusting when the engine received it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from overlay.identity import Certificate, KeyPair, VerifiedCache, user_cert_problem, writer_cert_problem
from overlay.ids import key_for
from overlay.storage import DEFAULT_INBOX_QUOTA, INBOX_KEY_ID, Entry, is_drop
from overlay.store import decode_entry

DEFAULT_READ_LIMIT = 64
"""Values one read looks at under a key; more are counted (``values_over_limit``) and not decoded."""


class KeyDirectory(Protocol):
    """One name's entries (``Directory.at``)."""

    async def get(self) -> list[Entry]: ...

    async def put(
        self, value: bytes, *, entry_id: bytes = b"", lifetime: int = 3600, key: KeyPair | None = None
    ) -> None: ...

    async def remove(self, *, entry_id: bytes = b"", key: KeyPair | None = None) -> None: ...


class Directory(Protocol):
    """What the SIP side needs of an engine (see the module docstring)."""

    def at(self, name: str | bytes) -> KeyDirectory: ...

    async def get(self, name: str | bytes) -> list[Entry]: ...

    async def put(
        self,
        name: str | bytes,
        value: bytes,
        *,
        entry_id: bytes = b"",
        lifetime: int = 3600,
        key: KeyPair | None = None,
    ) -> None: ...

    async def remove(
        self, name: str | bytes, *, entry_id: bytes = b"", key: KeyPair | None = None
    ) -> None: ...

    def add_certificate(self, cert: Certificate) -> None: ...

    def watch(self, name: str | bytes, on_change: OnChange) -> Callable[[], None]:
        """Call ``on_change(entries)`` whenever the live entries of ``name`` change (and once at first);
        returns the function that stops watching."""
        ...


OnChange = Callable[[list["Entry"]], None]
WATCH_POLL_S = 5.0
"""How often an engine without change notifications (our Chord node) reads a watched name."""


def _version(entries: list[Entry]) -> frozenset[tuple[bytes, int]]:
    return frozenset((e.entry_id, e.seq) for e in entries)


class Watch:
    """A watch on one name: re-reads it when ``poke``d (an engine's notification) or every ``interval``
    seconds, and calls ``on_change`` with the entries when they differ from the last read. Read errors
    are counted and retried at the next turn; a callback error never stops the watch."""

    def __init__(self, directory: Directory, name: str | bytes, on_change: OnChange, interval: float) -> None:
        self.directory = directory
        self.name = name
        self.on_change = on_change
        self.interval = interval
        self.reads = 0
        self.errors = 0
        self._poked = asyncio.Event()
        self._last: frozenset[tuple[bytes, int]] | None = None
        self._task = asyncio.ensure_future(self._run())

    def poke(self) -> None:
        self._poked.set()

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            self._poked.clear()
            try:
                entries = await self.directory.get(self.name)
                self.reads += 1
            except Exception:  # an engine error: try again at the next turn
                self.errors += 1
            else:
                version = _version(entries)
                if version != self._last:
                    self._last = version
                    with contextlib.suppress(Exception):
                        self.on_change(entries)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self.interval)


def entry_expires_at(entry: Entry) -> float:
    """Wall-clock expiry of an entry whose ``seq`` is its writer's clock in milliseconds."""
    return entry.seq / 1000.0 + entry.lifetime_s


def select_entries(
    name: str | bytes,
    blobs: Iterable[bytes],
    ca_public_key: bytes,
    now: float,
    counts: dict[str, int],
    *,
    cache: VerifiedCache,
    limit: int = DEFAULT_READ_LIMIT,
    inbox_quota: int = DEFAULT_INBOX_QUOTA,
) -> list[Entry]:
    """The live entries of ``name`` among ``blobs`` (see the module docstring); ``counts`` gains
    ``values_read``, ``values_over_limit``, ``values_malformed``, ``values_rejected`` (wrong key, bad
    signature, no valid certificate, a drop's writer removing it, a drop where no inbox lives) and
    ``drops_over_quota``.

    The ``inbox`` rule of ``overlay.storage.Store``, applied by the reader: once the inbox entry
    (``INBOX_KEY_ID``, written by a key certified for the AOR) lives under the name, any *enrolled* writer
    (a user or node certificate of this authority) may add drops in its own name space, at most
    ``inbox_quota`` live ones counted (its oldest); a drop's writer cannot remove it, only the inbox's owner
    (a tombstone signed by the key certified for the AOR)."""
    key = key_for(name)
    verified: list[Entry] = []
    seen: set[tuple[bytes, int, bytes]] = set()
    for i, blob in enumerate(blobs):
        if i >= limit:
            counts["values_over_limit"] = counts.get("values_over_limit", 0) + 1
            continue
        counts["values_read"] = counts.get("values_read", 0) + 1
        try:
            entry = decode_entry(blob)
        except ValueError:
            counts["values_malformed"] = counts.get("values_malformed", 0) + 1
            continue
        version = (entry.entry_id, entry.seq, entry.owner)
        if version in seen:
            continue  # duplicates (several storing nodes answer) cost no signature check
        seen.add(version)
        drop = is_drop(entry)
        if (
            entry.key != key
            or not cache.verify(entry.owner, entry.signature, entry.signed_bytes())
            or (drop and entry.is_removal)  # only the inbox's owner removes a drop
            or (_writer_problem if drop else _user_problem)(ca_public_key, entry, now, cache) is not None
        ):
            counts["values_rejected"] = counts.get("values_rejected", 0) + 1
            continue
        verified.append(entry)
    verified.sort(key=lambda e: e.seq)
    newest: dict[bytes, Entry] = {}
    for entry in verified:
        newest[entry.entry_id] = entry  # ascending seq: the newest version of each entry id wins
    inbox = newest.get(INBOX_KEY_ID)
    owner = inbox.owner if inbox is not None and _live(inbox, now) else None
    per_writer: dict[bytes, int] = {}
    out = []
    for entry in sorted(newest.values(), key=lambda e: e.seq):
        if not _live(entry, now):
            continue
        if is_drop(entry):
            if owner is None:
                counts["values_rejected"] = counts.get("values_rejected", 0) + 1
                continue
            per_writer[entry.owner] = per_writer.get(entry.owner, 0) + 1
            if per_writer[entry.owner] > inbox_quota:
                counts["drops_over_quota"] = counts.get("drops_over_quota", 0) + 1
                continue
        out.append(entry)
    return sorted(out, key=lambda e: e.entry_id)


def _live(entry: Entry, now: float) -> bool:
    return not entry.is_removal and entry_expires_at(entry) > now


def _user_problem(ca_public_key: bytes, entry: Entry, now: float, cache: VerifiedCache) -> str | None:
    return user_cert_problem(ca_public_key, entry.cert, entry.key, entry.owner, now, cache)


def _writer_problem(ca_public_key: bytes, entry: Entry, now: float, cache: VerifiedCache) -> str | None:
    return writer_cert_problem(ca_public_key, entry.cert, entry.owner, now, cache)


if TYPE_CHECKING:  # mypy checks here that both engines are Directories
    from overlay.node import Node
    from overlay.opendht_directory import OpenDhtDirectory

    def _engines_are_directories(chord: Node, opendht: OpenDhtDirectory) -> tuple[Directory, Directory]:
        return chord, opendht
