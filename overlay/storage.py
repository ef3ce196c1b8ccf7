"""Signed entries with lifetimes, the access policies, and replication decisions (sans-IO).

An entry is ``(key, entry_id, value, seq, lifetime_s, owner, signature)`` (plus an optional enrollment
``cert``). Its signature covers ``msgpack.packb([key, entry_id, value, seq, lifetime_s, owner])`` with the
key as 16 bytes, so the signed bytes are canonical. Every replica checks every write itself: signature,
``seq`` strictly newer than what it holds for that entry (replays refused), value size, lifetime, and the
access policy. A removal is a signed entry with an empty value and lifetime 0; it is kept as a *tombstone*
(not returned by ``get``) so that the removed entry cannot be replayed back in.

Expiry is computed from the storing node's clock (``now`` is passed in, never read here). When entries move
between nodes they carry their *remaining* lifetime, so hand-offs never extend an entry's life.

``Replicator`` turns neighbour changes (predecessor, successor list) into transfers: the range a new
predecessor took over goes to it; when a predecessor dies the range this node inherited is pushed to its
replicas; a node that becomes one of our r-1 replicas receives our primary range. Together with the
primary forwarding every store to its replicas, r copies exist again a few stabilization rounds after a
failure.

The periodic repair compares before it pushes (anti-entropy by digest): the primary splits its range into
:data:`DIGEST_BUCKETS` equal key intervals and sends each replica one 8-byte sum per bucket
(:func:`range_digest`, the XOR of the first 8 bytes of every record's signature, which already differs for
every signed ``(key, entry_id, value, seq, ...)``: no hashing, so a digest costs far less than the push it
replaces); the replica answers which buckets differ from its own records, and only those buckets' records
travel. An idle ring with every copy in place sends one small datagram per replica per round instead of
its whole range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgpack

from overlay.errors import StoreRefused
from overlay.identity import (
    MAX_CERT,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    KeyPair,
    VerifiedCache,
    user_cert_problem,
    writer_cert_problem,
)
from overlay.ids import RING, between_right, to_bytes

MAX_ENTRY_ID = 255
DEFAULT_MAX_VALUE = 16 * 1024
DEFAULT_MAX_LIFETIME = 7 * 24 * 3600
DEFAULT_MEMORY_S = 3600.0
DEFAULT_MAX_PER_OWNER = 1000
POLICIES = ("first-claim", "enrolled")
DEFAULT_INBOX_QUOTA = 32

INBOX_KEY_ID = b"\x00inbox"
"""The entry that makes a ring key an inbox: its owner's key owns the inbox, its value is the owner's
published (X25519) encryption key. Under any policy, once it lives, other keys may drop entries."""
DROP_PREFIX = b"\x01"
"""A drop's entry_id: ``DROP_PREFIX + writer's 32-byte public key + anything``: each writer writes only
in its own name space, so nobody can overwrite another writer's drop."""


def is_drop(entry: Entry) -> bool:
    """Whether ``entry`` is written in its own writer's drop name space (see :data:`DROP_PREFIX`)."""
    eid = entry.entry_id
    return eid[:1] == DROP_PREFIX and eid[1 : 1 + PUBLIC_KEY_BYTES] == entry.owner


NodeRef = tuple[int, str, int]  # (node id, host, port), as chord and wire use it


@dataclass(frozen=True, slots=True)
class Entry:
    """One signed record under a ring key. Immutable: a change is a new entry with a higher ``seq``."""

    key: int
    entry_id: bytes
    value: bytes
    seq: int
    lifetime_s: int
    owner: bytes
    signature: bytes
    cert: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.key < RING:
            raise ValueError("entry key out of the 128-bit ring")
        if len(self.entry_id) > MAX_ENTRY_ID:
            raise ValueError(f"entry_id is at most {MAX_ENTRY_ID} bytes")
        if not 0 <= self.seq < 1 << 64 or not 0 <= self.lifetime_s < 1 << 32:
            raise ValueError("seq or lifetime out of range")
        if len(self.owner) != PUBLIC_KEY_BYTES:
            raise ValueError("owner is a 32-byte Ed25519 public key")
        if len(self.signature) != SIGNATURE_BYTES:
            raise ValueError("signature is 64 bytes")
        if len(self.cert) > MAX_CERT:
            raise ValueError(f"cert is empty or a packed user certificate of at most {MAX_CERT} bytes")

    @property
    def is_removal(self) -> bool:
        return self.lifetime_s == 0

    @property
    def slot(self) -> tuple[int, bytes]:
        return (self.key, self.entry_id)

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.key, self.entry_id, self.value, self.seq, self.lifetime_s, self.owner)

    def to_wire(self) -> list[object]:
        return [
            to_bytes(self.key),
            self.entry_id,
            self.value,
            self.seq,
            self.lifetime_s,
            self.owner,
            self.signature,
            self.cert,
        ]

    @classmethod
    def create(
        cls,
        signer: KeyPair,
        key: int,
        entry_id: bytes,
        value: bytes,
        seq: int,
        lifetime_s: int,
        cert: bytes = b"",
    ) -> Entry:
        """A new entry signed by ``signer`` (the user key that owns it)."""
        sig = signer.sign(signed_bytes(key, entry_id, value, seq, lifetime_s, signer.public_key))
        return cls(key, entry_id, value, seq, lifetime_s, signer.public_key, sig, cert)


def signed_bytes(key: int, entry_id: bytes, value: bytes, seq: int, lifetime_s: int, owner: bytes) -> bytes:
    """The canonical bytes an entry's signature covers (DESIGN.md)."""
    return bytes(msgpack.packb([to_bytes(key), entry_id, value, seq, lifetime_s, owner], use_bin_type=True))


@dataclass(slots=True)
class _Record:
    entry: Entry
    expires_at: float


class Store:
    """The entries one node holds, with the checks every replica applies before keeping a write.

    ``policy`` is ``"first-claim"`` (the first user key to write a key owns it while any of its entries
    lives) or ``"enrolled"`` (each write carries a CA signature binding the key id to the owner key;
    ``ca_public_key`` required). Expired records are kept ``memory_s`` longer, invisible, so their ``seq``
    still refuses replays.

    The ``inbox`` access rule holds under both policies, for keys whose :data:`INBOX_KEY_ID` entry lives
    (offline messages, ``H('inbox:' + AOR)``): any key (under ``enrolled``: any enrolled key, a user or
    node certificate of the CA for the writing key in the entry's ``cert``) may append drops in its own
    name space (:func:`is_drop`), at most ``inbox_quota`` live ones per writer and inbox; a writer cannot
    remove its drop (a removal there is refused); only the inbox's owner removes, overwrites or claims
    anything else under the key, exactly as under its policy. Drops never make their writer the key's
    first-claim owner.
    """

    def __init__(
        self,
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
        if policy not in POLICIES:
            raise ValueError(f"unknown access policy {policy!r}; use one of {', '.join(POLICIES)}")
        if policy == "enrolled" and (ca_public_key is None or len(ca_public_key) != PUBLIC_KEY_BYTES):
            raise ValueError("the enrolled policy needs the overlay CA's 32-byte public key")
        self.policy = policy
        self.ca_public_key = ca_public_key
        self.max_value = max_value
        self.max_lifetime = max_lifetime
        self.memory_s = memory_s
        self.max_per_owner = max_per_owner
        self.inbox_quota = inbox_quota
        self._per_owner: dict[bytes, int] = {}
        self.cache = cache if cache is not None else VerifiedCache()
        self._by_key: dict[int, dict[bytes, _Record]] = {}
        self.refused: dict[str, int] = {}

    # --- checks -----------------------------------------------------------------------------------

    def _refuse(self, reason: str, message: str) -> StoreRefused:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return StoreRefused(message, reason=reason)

    def check(self, entry: Entry, now: float) -> None:
        """Raise ``StoreRefused`` (reason: too-large, bad-lifetime, bad-removal, bad-signature, policy,
        stale-seq, quota)."""
        if len(entry.value) > self.max_value:
            raise self._refuse("too-large", f"value of {len(entry.value)} bytes exceeds {self.max_value}")
        if entry.lifetime_s > self.max_lifetime:
            raise self._refuse("bad-lifetime", f"lifetime {entry.lifetime_s}s exceeds {self.max_lifetime}s")
        if entry.is_removal and entry.value:
            raise self._refuse("bad-removal", "a removal (lifetime 0) must have an empty value")
        if not self.cache.verify(entry.owner, entry.signature, entry.signed_bytes()):
            raise self._refuse("bad-signature", "the entry signature does not verify with its owner key")
        self._check_policy(entry, now)
        current = self._by_key.get(entry.key, {}).get(entry.entry_id)
        if current is not None and entry.seq <= current.entry.seq:
            raise self._refuse(
                "stale-seq", f"seq {entry.seq} is not newer than the stored seq {current.entry.seq}"
            )
        if current is None and self._per_owner.get(entry.owner, 0) >= self.max_per_owner:
            # Valid signatures are free to make: without a quota one key could fill every replica.
            raise self._refuse("quota", f"this user key already holds {self.max_per_owner} records here")

    def _check_policy(self, entry: Entry, now: float) -> None:
        if is_drop(entry):
            inbox = self.inbox_owner(entry.key, now)
            if inbox is None:
                raise self._refuse("policy", "no inbox lives under this key: drops are refused")
            if inbox != entry.owner:
                if entry.is_removal:
                    raise self._refuse("policy", "only the inbox's owner removes a drop")
                if self.policy == "enrolled":
                    # the same rule as OpenDHT's readers (overlay.directory.select_entries): under
                    # enrolled, a stranger's free key does not get an inbox quota of its own
                    assert self.ca_public_key is not None
                    problem = writer_cert_problem(
                        self.ca_public_key, entry.cert, entry.owner, now, self.cache
                    )
                    if problem is not None:
                        raise self._refuse("policy", f"a drop needs an enrolled writer: {problem}")
                slots = self._by_key.get(entry.key, {})
                mine = sum(
                    1
                    for eid, rec in slots.items()
                    if eid != entry.entry_id
                    and rec.expires_at > now
                    and not rec.entry.is_removal
                    and rec.entry.owner == entry.owner
                )
                if mine >= self.inbox_quota:
                    raise self._refuse("quota", f"this key already has {mine} drops in this inbox")
                return
        if self.policy == "enrolled":
            assert self.ca_public_key is not None
            problem = user_cert_problem(
                self.ca_public_key, entry.cert, entry.key, entry.owner, now, self.cache
            )
            if problem is not None:
                raise self._refuse("policy", problem)
            return
        owner = self.owner_of(entry.key, now)
        if owner is not None and owner != entry.owner:
            raise self._refuse(
                "policy", "another user key owns this key (first-claim) until its entries expire"
            )

    def owner_of(self, key: int, now: float) -> bytes | None:
        """Under first-claim: the key owning ``key`` (the inbox's owner, else the owner of any live,
        non-removed entry that is not another writer's drop), else None."""
        inbox = self.inbox_owner(key, now)
        if inbox is not None:
            return inbox
        for rec in self._by_key.get(key, {}).values():
            if rec.expires_at > now and not rec.entry.is_removal and not is_drop(rec.entry):
                return rec.entry.owner
        return None

    def inbox_owner(self, key: int, now: float) -> bytes | None:
        """The owner of the live :data:`INBOX_KEY_ID` entry under ``key`` (an inbox), else None."""
        rec = self._by_key.get(key, {}).get(INBOX_KEY_ID)
        if rec is not None and rec.expires_at > now and not rec.entry.is_removal:
            return rec.entry.owner
        return None

    # --- writes -----------------------------------------------------------------------------------

    def put(self, entry: Entry, now: float, *, remaining_s: float | None = None) -> None:
        """Check and keep ``entry``; ``remaining_s`` (hand-offs) caps its lifetime from ``now``."""
        self.check(entry, now)
        life = float(entry.lifetime_s)
        if remaining_s is not None:
            life = max(0.0, min(life, remaining_s))
        self._keep(entry, now + life)

    def _keep(self, entry: Entry, expires_at: float) -> None:
        """Hold a checked entry (a durable store also writes it down: ``overlay.store``)."""
        slots = self._by_key.setdefault(entry.key, {})
        old = slots.get(entry.entry_id)
        if old is not None:
            self._release(old.entry.owner)
        slots[entry.entry_id] = _Record(entry, expires_at)
        self._per_owner[entry.owner] = self._per_owner.get(entry.owner, 0) + 1

    def _release(self, owner: bytes) -> None:
        left = self._per_owner.get(owner, 0) - 1
        if left > 0:
            self._per_owner[owner] = left
        else:
            self._per_owner.pop(owner, None)

    def accept(
        self,
        items: Iterable[tuple[Entry, int]],
        now: float,
        kept_items: list[tuple[Entry, int]] | None = None,
    ) -> tuple[int, int]:
        """Apply a transfer of ``(entry, remaining ms)``; returns (kept, refused). Stale copies are normal.
        ``kept_items``, if given, receives the items that were new here."""
        kept = refused = 0
        for entry, remaining_ms in items:
            have = self._by_key.get(entry.key, {}).get(entry.entry_id)
            if have is not None and have.entry.seq >= entry.seq:
                # a copy we hold already (periodic repair pushes the whole primary range every round):
                # it could only be refused as stale, so its signature is not checked again, which cost a
                # verification per stored entry per repair round once the cache had forgotten it
                continue
            try:
                self.put(entry, now, remaining_s=remaining_ms / 1000.0)
            except StoreRefused as exc:
                if exc.reason != "stale-seq":
                    refused += 1
                continue
            kept += 1
            if kept_items is not None:
                kept_items.append((entry, remaining_ms))
        return kept, refused

    def purge(self, now: float) -> int:
        """Forget records expired more than ``memory_s`` ago; returns how many were dropped."""
        dropped = 0
        for key in list(self._by_key):
            slots = self._by_key[key]
            for eid in [e for e, rec in slots.items() if rec.expires_at + self.memory_s <= now]:
                self._release(slots.pop(eid).entry.owner)
                dropped += 1
            if not slots:
                del self._by_key[key]
        return dropped

    # --- reads ------------------------------------------------------------------------------------

    def get(self, key: int, now: float) -> list[Entry]:
        """Live entries under ``key`` (removals and expired entries excluded), ordered by entry_id."""
        slots = self._by_key.get(key, {})
        return [
            rec.entry
            for eid, rec in sorted(slots.items())
            if rec.expires_at > now and not rec.entry.is_removal
        ]

    def current(self, key: int, entry_id: bytes) -> Entry | None:
        """The record held for one entry slot (expired and removals included), for idempotent re-stores."""
        rec = self._by_key.get(key, {}).get(entry_id)
        return rec.entry if rec is not None else None

    def slot_records(self, key: int, now: float) -> list[tuple[Entry, int]]:
        """What a replica read returns: every record under ``key`` a transfer would carry, tombstones
        included (with their seq), each with its remaining lifetime in ms, ordered by entry_id."""
        slots = self._by_key.get(key, {})
        return [item for _eid, rec in sorted(slots.items()) if (item := self._carried(rec, now))]

    def records(self, now: float) -> Iterator[tuple[Entry, int]]:
        """Every unexpired record, removals included, with its remaining lifetime in ms (for transfers)."""
        for slots in self._by_key.values():
            for rec in slots.values():
                item = self._carried(rec, now)
                if item is not None:
                    yield item

    def _carried(self, rec: _Record, now: float) -> tuple[Entry, int] | None:
        """(entry, remaining ms) if the record still travels: unexpired, or a tombstone still remembered."""
        remaining = rec.expires_at - now
        if remaining > 0 or (rec.entry.is_removal and remaining + self.memory_s > 0):
            return rec.entry, max(0, math.floor(remaining * 1000))
        return None

    def in_range(self, lo: int | None, hi: int, now: float) -> list[tuple[Entry, int]]:
        """Records whose key is in ``(lo, hi]``; with ``lo`` None, every record. Keys are tested before
        their records are looked at (a replica's repair digest reads one range of the r it holds)."""
        if lo is None:
            return list(self.records(now))
        out = []
        for key, slots in self._by_key.items():
            if between_right(key, lo, hi):
                for rec in slots.values():
                    item = self._carried(rec, now)
                    if item is not None:
                        out.append(item)
        return out

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_key.values())

    def live_count(self, now: float) -> int:
        return sum(len(self.get(k, now)) for k in self._by_key)


Transfer = tuple[NodeRef, list[tuple[Entry, int]]]

DIGEST_BUCKETS = 16
DIGEST_SUM_BYTES = 8  # per bucket: a 64-bit XOR of signature prefixes (16 x 8 = a 128-byte wire field)


def digest_bucket(key: int, lo: int | None, hi: int, buckets: int) -> int:
    """Which of ``buckets`` equal intervals of the range ``(lo, hi]`` (the whole ring if ``lo`` is None
    or equals ``hi``) holds ``key``."""
    if lo is None or lo == hi:
        start, span = hi, RING
    else:
        start, span = lo, (hi - lo) % RING
    return min(buckets - 1, ((key - start - 1) % RING) * buckets // span)


def range_digest(
    items: Iterable[tuple[Entry, int]], lo: int | None, hi: int, buckets: int = DIGEST_BUCKETS
) -> bytes:
    """One :data:`DIGEST_SUM_BYTES` sum per bucket of ``(lo, hi]``: the XOR of the first 8 bytes of each
    record's signature (Ed25519 signatures are pseudo-random and cover key, entry_id, value and seq;
    remaining lifetimes, which differ between holders, are not in them). Records outside the range are
    ignored."""
    sums = [0] * buckets
    if lo is None or lo == hi:
        start, span = hi, RING
    else:
        start, span = lo, (hi - lo) % RING
    last = buckets - 1
    for entry, _ms in items:
        offset = (entry.key - start - 1) % RING
        if offset >= span:
            continue
        b = offset * buckets // span
        sums[b if b < last else last] ^= int.from_bytes(entry.signature[:8], "big")
    return b"".join(v.to_bytes(DIGEST_SUM_BYTES, "big") for v in sums)


def differing_buckets(ours: bytes, theirs: bytes) -> bytes:
    """A bitmap (bit i of byte i // 8, least significant first) of the buckets whose sums differ."""
    n = len(ours) // DIGEST_SUM_BYTES
    out = bytearray((n + 7) // 8)
    for i in range(n):
        a = ours[i * DIGEST_SUM_BYTES : (i + 1) * DIGEST_SUM_BYTES]
        if a != theirs[i * DIGEST_SUM_BYTES : (i + 1) * DIGEST_SUM_BYTES]:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def in_buckets(
    items: Iterable[tuple[Entry, int]], lo: int | None, hi: int, bitmap: bytes, buckets: int = DIGEST_BUCKETS
) -> list[tuple[Entry, int]]:
    """The records of ``items`` in the buckets ``bitmap`` marks (a short bitmap marks nothing more)."""
    out = []
    for item in items:
        b = digest_bucket(item[0].key, lo, hi, buckets)
        if b // 8 < len(bitmap) and bitmap[b // 8] >> (b % 8) & 1:
            out.append(item)
    return out


class Replicator:
    """Replication decisions from neighbour changes: what to send to whom (pure; the adapter sends).

    This node (``me``) is *primary* for keys in ``(pred, me]`` and keeps copies of them on its first
    ``replicas - 1`` successors.
    """

    def __init__(self, me: int, replicas: int = 3) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.me = me
        self.replicas = replicas
        self.pred: NodeRef | None = None
        self.replica_set: list[NodeRef] = []

    def primary_range(self) -> tuple[int | None, int]:
        return (self.pred[0] if self.pred else None, self.me)

    def is_primary(self, key: int) -> bool:
        return self.pred is None or between_right(key, self.pred[0], self.me)

    def replica_targets(self, succs: list[NodeRef]) -> list[NodeRef]:
        """The successors that should hold copies of our primary range (self and duplicates excluded)."""
        out: list[NodeRef] = []
        for node in succs:
            if len(out) >= self.replicas - 1:
                break
            if node[0] != self.me and all(node[0] != n[0] for n in out):
                out.append(node)
        return out

    def on_neighbours(
        self, pred: NodeRef | None, succs: list[NodeRef], store: Store, now: float
    ) -> list[Transfer]:
        """Update the view and return the transfers that keep r copies in the right places."""
        if pred is not None and pred[0] == self.me:
            pred = None
        old_pred, old_set = self.pred, self.replica_set
        new_set = self.replica_targets(succs)
        transfers: dict[int, Transfer] = {}

        def send(target: NodeRef, items: list[tuple[Entry, int]]) -> None:
            if not items:
                return
            have = transfers.setdefault(target[0], (target, []))[1]
            seen = {(e.slot, e.seq) for e, _ in have}
            have.extend(i for i in items if (i[0].slot, i[0].seq) not in seen)

        if pred is not None and (old_pred is None or pred[0] != old_pred[0]):
            if old_pred is None:
                # We thought we owned the whole ring: everything outside (pred, me] belongs to pred now.
                moved = [
                    (e, ms) for e, ms in store.records(now) if not between_right(e.key, pred[0], self.me)
                ]
                send(pred, moved)
            elif between_right(pred[0], old_pred[0], self.me):
                # A node joined between our old predecessor and us: it takes over (old_pred, pred].
                send(pred, store.in_range(old_pred[0], pred[0], now))
            else:
                # Our predecessor went away: we inherited (pred, old_pred]; our replicas need it.
                inherited = store.in_range(pred[0], old_pred[0], now)
                for target in new_set:
                    send(target, inherited)
        self.pred = pred
        old_ids = {n[0] for n in old_set}
        fresh = [n for n in new_set if n[0] not in old_ids]
        if fresh:
            primary = store.in_range(*self.primary_range(), now)
            for target in fresh:
                send(target, primary)
        self.replica_set = new_set
        return list(transfers.values())

    def repair(self, store: Store, now: float) -> list[Transfer]:
        """Anti-entropy: the whole primary range for each replica (a slow periodic safety net; the storage
        core compares digests first and pushes only the buckets that differ). An empty range is repaired
        too: its digest lets a replica hand back what the primary lacks (``StorageCore._digest``)."""
        primary = store.in_range(*self.primary_range(), now)
        return [(target, list(primary)) for target in self.replica_set]

    def on_leave(self, succs: list[NodeRef], store: Store, now: float) -> list[Transfer]:
        """Hand-off when leaving: everything to the successor, our primary range also to the r-th one.

        The successor inherits our primary range and already holds most of it; the node that becomes the
        new last replica of that range gets it too. Copies we held for predecessors are restored by them
        when their successor lists change.
        """
        targets = [n for n in succs if n[0] != self.me]
        if not targets:
            return []
        out: list[Transfer] = [(targets[0], list(store.records(now)))]
        primary = store.in_range(*self.primary_range(), now)
        for extra in targets[1 : self.replicas]:
            if primary:
                out.append((extra, primary))
        return out
