"""OpenDHT as the directory engine (the Jami network's DHT; ``pip install opendht``, extra ``opendht``).

OpenDHT stores whatever anyone puts under a 160-bit hash, checks none of our signatures, cannot delete,
and forgets a value about 10 minutes after its last put. So, on top of it:

- a value is one of our signed entries, packed as it travels on our own wire (``store.encode_entry``),
  under ``InfoHash.get(name)``, with a value id derived from (owner, seq, entry id): a refresh re-puts the
  same value, a newer version is a new value beside the old one until that one ages out;
- only the ``enrolled`` policy makes sense (first-claim needs a storing replica that remembers the first
  owner: nobody here does), and the *reader* keeps only entries validly signed by a user key the authority
  certified for that AOR, newest ``seq`` per entry id (``directory.select_entries``), at most
  ``read_limit`` values per read (junk beyond it is counted, not decoded);
- removal is a signed tombstone (empty value, lifetime 0) with a higher ``seq``; this engine re-puts it for
  ``tombstone_keep_s`` (longer than OpenDHT's value lifetime, so the entry it replaced is gone from every
  storing node before the tombstone is) or, when it removes an entry it read that another peer wrote (and
  keeps re-putting), until that entry's expiry; it re-puts every live entry it wrote every ``refresh_s``
  (within OpenDHT's 10 minutes) until the entry expires;
- offline-message inboxes (``H('inbox:' + AOR)``) follow the ``inbox`` rule of ``overlay.storage``, enforced
  by readers: any enrolled writer (a user or node certificate) may add drops, within a quota; only the
  inbox's owner removes them. A peer writes its drops with its node key and ``node.cert``.

The OpenDHT calls block in OpenDHT's own threads; they run here through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import Callable
from typing import Any

from overlay.directory import (
    DEFAULT_READ_LIMIT,
    WATCH_POLL_S,
    OnChange,
    Watch,
    entry_expires_at,
    select_entries,
)
from overlay.errors import OverlayError, StoreRefused
from overlay.identity import (
    Certificate,
    KeyPair,
    VerifiedCache,
    user_cert_keys,
    user_cert_problem,
    writer_cert_problem,
)
from overlay.ids import key_for
from overlay.storage import DEFAULT_INBOX_QUOTA, DROP_PREFIX, Entry
from overlay.store import encode_entry

VALUE_LIFETIME_S = 600.0
"""OpenDHT's default value lifetime: a value not put again within it is dropped by the storing nodes."""
DEFAULT_REFRESH_S = 240.0
SEEN_MAX = 4096


def _name_bytes(name: str | bytes) -> bytes:
    data = name.encode("utf-8") if isinstance(name, str) else bytes(name)
    if not data:
        raise OverlayError("a name is a non-empty str or bytes")
    return data


def routing_table_counts(log: str) -> dict[str, Any]:
    """Node counts from OpenDHT's routing table dump (``DhtRunner.getRoutingTablesLog``; the Python binding
    has no structured node statistics): one ``Node <id> <address> ... [state]`` line per known node.
    ``connected``: at least one node answers, so gets and puts can reach the network."""
    states = [
        line.rsplit("[", 1)[-1].rstrip("]") for line in log.splitlines() if line.lstrip().startswith("Node ")
    ]
    good = states.count("good")
    return {"known_nodes": len(states), "good_nodes": good, "connected": good > 0}


class _Access:
    """One name's entries (``OpenDhtDirectory.at``), as ``overlay.node.KeyAccess``."""

    def __init__(self, directory: OpenDhtDirectory, name: str | bytes) -> None:
        self.directory = directory
        self.name = name

    async def get(self) -> list[Entry]:
        return await self.directory.get(self.name)

    async def put(
        self, value: bytes, *, entry_id: bytes = b"", lifetime: int = 3600, key: KeyPair | None = None
    ) -> None:
        await self.directory.put(self.name, value, entry_id=entry_id, lifetime=lifetime, key=key)

    async def remove(self, *, entry_id: bytes = b"", key: KeyPair | None = None) -> None:
        await self.directory.remove(self.name, entry_id=entry_id, key=key)


class OpenDhtDirectory:
    """The ``Directory`` over an OpenDHT node (``opendht.DhtRunner``) this object runs and owns."""

    def __init__(
        self,
        runner: Any,
        ca_public_key: bytes,
        *,
        read_limit: int = DEFAULT_READ_LIMIT,
        refresh_s: float = DEFAULT_REFRESH_S,
        tombstone_keep_s: float = VALUE_LIFETIME_S + 120.0,
        clock: Callable[[], float] = time.time,
        identity: KeyPair | None = None,
        node_certificate: bytes = b"",
        inbox_quota: int = DEFAULT_INBOX_QUOTA,
    ) -> None:
        self.runner = runner
        self.identity = identity
        """The node key (a peer's ``node.key``): what signs the writes made without a user key, i.e. drops
        in other users' inboxes, with ``node_certificate`` (``p2psip enroll node``) proving it enrolled."""
        self.node_certificate = node_certificate
        self.inbox_quota = inbox_quota
        self.ca_public_key = ca_public_key
        self.host = "127.0.0.1"
        self.bootstrap: tuple[str, int] | None = None
        """The OpenDHT node this one was bootstrapped from (``--join``), for status."""
        self.read_limit = read_limit
        self.refresh_s = refresh_s
        self.tombstone_keep_s = tombstone_keep_s
        self.clock = clock
        """The wall clock (seconds): entry seqs, expiry, what the refresh keeps. Tests pass their own."""
        self.refreshed = asyncio.Event()
        """Set after each round of the refresh timer (tests wait on it: the timer's clock, not a call)."""
        self.cache = VerifiedCache()
        self.counts: dict[str, int] = {}
        self._certs: dict[tuple[int, bytes], bytes] = {}
        self._seqs: dict[tuple[int, bytes], int] = {}
        """(key, entry id) -> the highest seq this node wrote or read there: a write goes above it (a drop
        is removed by another key than its writer's, whose clock may run ahead). Pruned as in Node."""
        # what this node wrote and keeps alive: (key, entry id) -> (name, entry, keep until)
        self._mine: dict[tuple[int, bytes], tuple[bytes, Entry, float]] = {}
        self._seqs_prune_at = 1024
        self._seen: dict[tuple[int, bytes], tuple[int, float]] = {}
        """(key, entry id) -> (seq, expiry) of the entries this node last read, at most ``SEEN_MAX``
        (oldest forgotten): a removal goes above that seq, and its tombstone is kept (re-put) until that
        expiry, since the entry's writer, maybe another peer, re-puts the entry until then."""
        self._refresher: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        bind: tuple[str, int],
        ca_public_key: bytes,
        *,
        bootstrap: tuple[str, int] | None = None,
        ipv6: str = "",
        **options: Any,
    ) -> OpenDhtDirectory:
        """Run an OpenDHT node on ``bind`` (IPv4; port 0: any; ``ipv6``: an IPv6 address to bind too, none by
        default) and bootstrap it from ``bootstrap``."""
        try:
            import opendht
        except ImportError as exc:
            raise OverlayError(
                f"--dht opendht needs the opendht package (pip install 'p2psip[opendht]'): {exc}"
            ) from None
        runner = opendht.DhtRunner()
        host, port = bind

        def run_and_bootstrap() -> None:
            # Bootstrap in the same breath as run: a node whose first maintenance round finds its routing
            # table empty backs off, and then fills it at OpenDHT's slow pace (a gap of 5 ms between the
            # two calls made 10 nodes on loopback settle in ~35 s instead of ~6 s; docs/benchmarks.md).
            runner.run(ipv4=host, ipv6=ipv6, port=port)
            if bootstrap is not None:
                runner.bootstrap(bootstrap[0], str(bootstrap[1]))

        await asyncio.to_thread(run_and_bootstrap)
        directory = cls(runner, ca_public_key, **options)
        directory.host = host
        directory.bootstrap = bootstrap
        directory._refresher = asyncio.ensure_future(directory._refresh_loop())
        return directory

    @property
    def endpoint(self) -> tuple[str, int]:
        """The address this OpenDHT node listens at (what another peer's ``--join`` names)."""
        return (self.host, int(self.runner.getBound().getPort()))

    @property
    def node_id(self) -> int:
        """The OpenDHT node id (160 bits), for logs."""
        return int(str(self.runner.getNodeId()), 16)

    def stats(self) -> dict[str, Any]:
        """What ``p2psip status`` shows of this engine: the node, its bootstrap, how many nodes its routing
        table knows and how many of them answer (OpenDHT's ``good``), what it keeps alive, the counters."""
        table = self.runner.getRoutingTablesLog(socket.AF_INET)
        return {
            "node_id": f"{self.node_id:040x}",
            "bootstrap": f"{self.bootstrap[0]}:{self.bootstrap[1]}" if self.bootstrap else None,
            **routing_table_counts(table),
            "kept_alive": self.kept_alive(),
            "tombstones_kept": sum(1 for _name, entry, _keep in self._mine.values() if entry.is_removal),
            "refresh_s": self.refresh_s,
            "counts": dict(self.counts),
        }

    def kept_alive(self) -> int:
        """How many live entries this node re-puts (its own writes, not yet expired)."""
        return sum(1 for _name, entry, _keep in self._mine.values() if not entry.is_removal)

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    # ------------------------------------------------------------------------------------------ the API

    def at(self, name: str | bytes) -> _Access:
        return _Access(self, name)

    def add_certificate(self, cert: Certificate) -> None:
        """Remember a user certificate; ``put`` attaches it to entries of its AOR and user key."""
        for ring_key in user_cert_keys(cert.subject):  # the AOR's key and its inbox's
            self._certs[(ring_key, cert.public_key)] = cert.to_bytes()

    async def get(self, name: str | bytes) -> list[Entry]:
        """The live entries of ``name`` that a reader can trust (``directory.select_entries``)."""
        import opendht

        data = _name_bytes(name)
        values = await asyncio.to_thread(self.runner.get, opendht.InfoHash.get(data.decode("latin-1")))
        self._count("gets")
        entries = select_entries(
            data, (bytes(v.data) for v in values), self.ca_public_key, self.clock(), self.counts,
            cache=self.cache, limit=self.read_limit, inbox_quota=self.inbox_quota,
        )  # fmt: skip
        for entry in entries:  # what a removal here must outdo and outlive (see ``_seen``)
            self._seen.pop(entry.slot, None)
            self._seen[entry.slot] = (entry.seq, entry_expires_at(entry))
        while len(self._seen) > SEEN_MAX:
            del self._seen[next(iter(self._seen))]
        return entries

    async def put(
        self,
        name: str | bytes,
        value: bytes,
        *,
        entry_id: bytes = b"",
        lifetime: int = 3600,
        key: KeyPair | None = None,
    ) -> None:
        """Sign ``value`` as entry ``entry_id`` of ``name`` with the user ``key`` (its certificate must have
        been added) and put it; it is re-put every ``refresh_s`` until it expires."""
        if lifetime <= 0:
            raise OverlayError("lifetime must be positive (remove() deletes)")
        await self._write(name, bytes(value), entry_id, lifetime, key)

    async def remove(self, name: str | bytes, *, entry_id: bytes = b"", key: KeyPair | None = None) -> None:
        """Put a signed tombstone (higher ``seq``, empty value, lifetime 0) over entry ``entry_id``."""
        await self._write(name, b"", entry_id, 0, key)

    def watch(self, name: str | bytes, on_change: OnChange) -> Callable[[], None]:
        """Watch ``name`` (``Directory.watch``): OpenDHT's listen tells us a value came (in its thread),
        which makes the watch re-read and check the values like any read; a slow poll covers expiry."""
        import opendht

        loop = asyncio.get_running_loop()
        watch = Watch(self, name, on_change, WATCH_POLL_S * 12)

        def heard(_value: Any, _expired: bool) -> bool:
            loop.call_soon_threadsafe(watch.poke)
            return True

        token = self.runner.listen(opendht.InfoHash.get(_name_bytes(name).decode("latin-1")), heard)

        def stop() -> None:
            watch.cancel()
            self.runner.cancelListen(token)

        return stop

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await asyncio.to_thread(self.runner.join)

    # ---------------------------------------------------------------------------------------- internals

    async def _write(
        self, name: str | bytes, value: bytes, entry_id: bytes, lifetime: int, key: KeyPair | None
    ) -> None:
        data = _name_bytes(name)
        ring_key = key_for(data)
        now = self.clock()
        # What a storing replica of ours would refuse, refused here: nobody on OpenDHT will.
        if key is None:  # the node key: drops in inboxes only (select_entries keeps nothing else of it)
            if self.identity is None:
                raise OverlayError(
                    "an OpenDHT directory writes with a user key (an overlay.identity.KeyPair)"
                )
            key, cert = self.identity, self.node_certificate
            drop = entry_id[:1] == DROP_PREFIX and entry_id[1 : 1 + len(key.public_key)] == key.public_key
            if not drop:
                problem: str | None = (
                    "on OpenDHT a node key writes only drops in inboxes; this needs a user key"
                )
            elif lifetime == 0:
                problem = "only the inbox's owner removes a drop"
            else:
                problem = writer_cert_problem(self.ca_public_key, cert, key.public_key, now, self.cache)
        elif isinstance(key, KeyPair):
            cert = self._certs.get((ring_key, key.public_key), b"")
            problem = user_cert_problem(self.ca_public_key, cert, ring_key, key.public_key, now, self.cache)
        else:
            raise OverlayError("an OpenDHT directory writes with a user key (an overlay.identity.KeyPair)")
        if problem is not None:
            self._count("refused_policy")
            raise StoreRefused(problem, reason="policy")
        slot = (ring_key, entry_id)
        seen_seq, seen_until = self._seen.pop(slot, (0, 0.0))
        seq = max(int(now * 1000), self._seqs.get(slot, 0) + 1, seen_seq + 1)
        self._note_seq(slot, seq)
        entry = Entry.create(key, ring_key, entry_id, value, seq, lifetime, cert)
        # A tombstone outlives what it removes: whoever wrote that entry re-puts it until it expires.
        keep = max(now + self.tombstone_keep_s, seen_until) if entry.is_removal else now + float(lifetime)
        self._mine[slot] = (data, entry, keep)
        if not await self._put(data, entry):
            raise OverlayError("OpenDHT did not store the value (no node answered)")

    def _note_seq(self, slot: tuple[int, bytes], seq: int) -> None:
        if seq <= self._seqs.get(slot, 0):
            return
        self._seqs[slot] = seq
        if len(self._seqs) >= self._seqs_prune_at:
            # Only seqs the clock has not passed by a minute matter; the next prune waits for a doubling.
            floor = int(self.clock() * 1000) - 60_000
            self._seqs = {s: q for s, q in self._seqs.items() if q > floor}
            self._seqs_prune_at = max(1024, 2 * len(self._seqs))

    async def _put(self, name: bytes, entry: Entry) -> bool:
        import opendht

        value = opendht.Value(encode_entry(entry))
        # One id per signed version: a refresh puts the same value again, a newer version (or tombstone) is
        # a new value (OpenDHT refuses to edit an unsigned value in place), readers keep the newest seq.
        digest = hashlib.sha256(entry.owner + entry.seq.to_bytes(8, "big") + entry.entry_id).digest()
        value.id = int.from_bytes(digest[:8], "big") or 1
        self._count("puts")
        ok = await asyncio.to_thread(self.runner.put, opendht.InfoHash.get(name.decode("latin-1")), value)
        return bool(ok)

    async def refresh(self, now: float | None = None) -> int:
        """Re-put what this node wrote and still keeps (live entries; tombstones for a while); forget the
        rest. Returns how many values were put."""
        now = self.clock() if now is None else now
        put = 0
        for slot, (name, entry, keep) in list(self._mine.items()):
            if keep <= now or (not entry.is_removal and entry_expires_at(entry) <= now):
                del self._mine[slot]
                continue
            if await self._put(name, entry):
                put += 1
        self._count("refreshed", put)
        return put

    async def _refresh_loop(self) -> None:
        """Every ``refresh_s``: one round of ``refresh`` (then ``refreshed`` is set)."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # a failed round is retried at the next one
                self._count("refresh_errors")
            self._count("refresh_rounds")
            self.refreshed.set()
