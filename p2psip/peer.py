"""Peer = overlay Node + SIP Stack: a registrar and location service with no server behind it.

The only module where the SIP stack and the overlay meet (DESIGN.md, tests/test_layering.py). A peer:

- **registrar**: a REGISTER for any AOR becomes one signed overlay entry per contact under the AOR's key,
  signed with that user's key (created on first use and kept in ``DATA_DIR/users/``; copy the file to a
  second peer to serve a second device of the same user). The decisions (expiry, refresh, ``*``, CSeq
  order) are :mod:`p2psip.registrar`'s; this module only reads and writes the DHT (or, for an AOR whose
  bindings only this peer can have written, plans from its own record: :meth:`Peer._own_record`) and
  answers. Users listed in the config with a password are challenged with digest auth first.
- **location service + proxy**: the stack's :class:`~p2psip.proxy.Proxy` core asks :meth:`Peer.locate`
  for the targets of every out-of-dialog request. :func:`p2psip.location.decide` says whether the
  request-URI is an overlay AOR, an IP literal (forwarded as addressed) or a statically routed domain; AORs
  are fetched from the DHT through a small cache that never outlives a binding; the proxy then forks to
  every contact (Record-Route, best-response selection). Nobody registered: 404. No answer: 408 (INVITE),
  480 (other methods, at 3/4 of Timer F).

``run_foreground(config)`` is ``p2psip start``: the peer, a control socket for ``status``/``lookup``, one
log line per event, and a graceful leave on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from overlay import ids
from overlay.directory import Directory, KeyDirectory
from overlay.errors import NotAdmitted, NotAFullPeer, NotJoined, OverlayError, StoreRefused, WrongOverlay
from overlay.identity import (
    NODE_CERT,
    NODE_CERT_FILE,
    USER_CERT,
    Certificate,
    KeyPair,
    enroll_node,
    enroll_user,
    load_public_key,
    node_cert_problem,
    node_id_of,
    node_identity,
    verify,
)
from overlay.node import KeyAccess, Node, NodeConfig
from overlay.opendht_directory import VALUE_LIFETIME_S, OpenDhtDirectory
from overlay.storage import DROP_PREFIX, INBOX_KEY_ID, Entry
from p2psip import control
from p2psip.address import (
    RELIABLE,
    Target,
    bracket,
    format_hostport,
    is_ip_literal,
    is_wildcard,
    numeric_host,
)
from p2psip.auth import DigestServer
from p2psip.clientpeer import (
    CLIENT_DOMAIN,
    KEEPALIVE,
    REGISTER,
    REGISTER_EXPIRES,
    ClientLink,
    client_aor,
    client_instance,
    client_node_of,
)
from p2psip.config import PeerConfig
from p2psip.errors import ConfigError, FlowFailed, P2PSIPError, ParseError, SIPStatusError, TransportError
from p2psip.flows import Failed, Flow, FlowTable, Ping, stun_binding_request, stun_mapped_address
from p2psip.inbox import (
    SENDER_HEADER,
    Letter,
    LetterError,
    inbox_name,
    load_key,
    mark_sender,
    open_letter,
    write_key,
)
from p2psip.location import (
    SOLE_HOME,
    ForwardAsAddressed,
    HomeTable,
    LocationCache,
    OverlayLookup,
    StaticRoute,
    branches,
    by_preference,
    decide,
    first_path_hop,
    live_targets,
    primary_home,
)
from p2psip.mailbox import Forbidden, MailboxPolicy, NoMailbox, Retarget, is_message_summary
from p2psip.message import Request, Response
from p2psip.ownership import Claim, FailureThrottle, flow_of, may_register, owns
from p2psip.presence import WatcherPolicy
from p2psip.presenceagent import AgentTransaction, PresenceAgent, is_presence
from p2psip.probe import DeadAddress, unless_refused
from p2psip.proxy import Proxy, RoutedTarget
from p2psip.publication import Published, decode_state, encode_state
from p2psip.ratelimit import TokenBuckets
from p2psip.registrar import (
    Binding,
    RegisterPlan,
    RegisterRejected,
    RegistrarPolicy,
    aor_of,
    contact_instances,
    decode_binding,
    encode_binding,
    ok_response,
    plan_register,
)
from p2psip.run import busy_proxy_gc, until_stopped
from p2psip.sealedbox import SealedBoxError, public_bytes
from p2psip.stack import Source, Stack
from p2psip.streamguard import StreamLimits
from p2psip.subscription import unreadable_event
from p2psip.trace import SipTrace, stamp
from p2psip.transaction import ClientTransaction, ServerTransaction, Transaction
from p2psip.transport import TLSConfig
from p2psip.turn import TurnLimits, issue_credentials
from p2psip.turngrant import TURN_HEADER, TurnGrant
from p2psip.turnserver import TurnServer
from p2psip.uri import URI, Address

log = logging.getLogger("p2psip.peer")

PRESENCE_ENTRY = b"\x00presence"
"""Entry id of an AOR's published presence state, beside its bindings (no binding decodes from it)."""
INBOX_LIFETIME = 7 * 24 * 3600
"""Lifetime of an inbox key entry and of a stored message (a node may keep them shorter: lifetime_cap)."""
INBOX_REPUBLISH = 3600.0
"""A registration refresh republishes the inbox key when it was published longer ago than this."""
INBOX_DELIVERY_TIMEOUT = 40.0

VOUCH_HEADER = "P-P2PSIP-Vouch"
"""The identity assertion a watcher's home peer adds to a presence SUBSCRIBE it forwards (Peer.vouch)."""
VOUCH_WINDOW = 120.0
"""Seconds an assertion stays valid (peers' clocks need not agree better than that)."""


def _vouch_data(aor: str, call_id: str, from_tag: str, ts: int) -> bytes:
    return f"p2psip-vouch|{aor}|{call_id}|{from_tag}|{ts}".encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


EventHandler = Callable[[str, str], None]
"""``on_event(kind, text)``: ``kind`` is a short word (joined, registered, unregistered, routed, failed,
left, refused); ``text`` is one readable line."""

USERS_DIR = "users"
JOIN_PROGRESS_EVERY = 5.0
OVERLAY_PROBE = b"\x00"
"""What the join probe sends (asyncio does not send an empty datagram): not an overlay message, so a
live node drops it and counts it as malformed."""
"""Seconds between the `joining` lines printed while a bootstrap peer does not answer."""
#: Retry-After (seconds) of the 503 a peer answers when it sheds load (``PeerConfig.max_pending``)
SHED_RETRY_AFTER = 1
#: REGISTERs waiting out a digest-failure delay at once; past it such REGISTERs get 503 at once.
MAX_DELAYED_AUTH = 256

Targets = list[URI | Address | RoutedTarget]

"""What :meth:`Peer.locate` returns: contacts, or contacts with their own Route sets (Path)."""
#: an INVITE gets ``100 Trying`` from a peer only when nothing (a 180 from the callee, an error) went back
#: within this time (RFC 3261 17.2.1's 200 ms allowance), as ``p2psip proxy`` does: a callee that rings
#: at once saves each peer on the path one message to build and the previous hop one to read, all on
#: the time to ringing (issue 19: the call path crosses two peers, the entry and the home peer)
TRYING_DELAY = 0.2


class UserKeys:
    """The user keys and claims of the AORs this peer registers, under ``DATA_DIR/users/``.

    A user key is an Ed25519 key per AOR. The first key that writes an AOR owns it in a ``first-claim``
    overlay, so the key must survive restarts and can be copied to another peer that serves another
    device of that user. It is **derived**, not stored: ``HMAC-SHA256(secret, AOR)`` is its private key,
    with ``secret`` the 32 random bytes of ``users/user-keys.secret`` (mode 0600, made once). So a new AOR
    costs no file (three file creates per new AOR were a third of a registration's CPU, issue 19), the key
    is the same after a restart, and a crash cannot lose it. A key *file* ``users/<user@host>.key`` (mode
    0600) wins over the derived key: a copied key, an account's (``p2psip user add``), an enrolled user's,
    or one written with :meth:`export` (``p2psip user key``) to copy elsewhere. The AOR's X25519 inbox key
    (:mod:`p2psip.inbox`) is derived the same way, unless ``<user@host>.inbox`` exists.

    Claims (:class:`p2psip.ownership.Claim`, accounts included) are rows of ``users/users.sqlite3`` (WAL,
    ``synchronous = NORMAL``: a committed claim survives a crash of the process), read per REGISTER so an
    account ``p2psip user add`` made while the peer runs counts at once. Older data dirs' ``.claim`` files
    are moved into it when it is opened.
    """

    SECRET = "user-keys.secret"
    DATABASE = "users.sqlite3"

    #: KeyPair objects kept at once (the most recently used): each holds an OpenSSL key, ~0.8 kB, which was
    #: the largest item of a registration's memory (bench/memory.py); a derived key is made again in
    #: ~0.1 ms, a key file read again, when an evicted AOR refreshes (once an hour or so)
    MAX_CACHED_KEYS = 1024

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: collections.OrderedDict[str, KeyPair] = collections.OrderedDict()
        self._in_use: set[str] = set()  # every AOR whose key this peer has used (exists(), known())
        self._secret: bytes | None = None
        self._db: sqlite3.Connection | None = None
        self._queued: dict[str, str] = {}  # claims waiting for the next commit_claim transaction
        self._committed: asyncio.Future[None] | None = None

    def path_for(self, aor: str) -> Path:
        name = aor.partition(":")[2] or aor
        safe = _UNSAFE_NAME.sub(lambda m: f"%{ord(m.group()):02X}", name)
        return self.directory / f"{safe}.key"

    # --- keys -----------------------------------------------------------------------------------------

    def secret(self) -> bytes:
        """The 32 bytes the user keys derive from, made (exclusively: two processes agree) on first use."""
        if self._secret is None:
            path = self.directory / self.SECRET
            try:
                secret = path.read_bytes()
            except FileNotFoundError:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = path.with_name(f"{self.SECRET}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(secrets.token_bytes(32))
                try:
                    os.link(tmp, path)  # fails if another process made it first: then theirs is the one
                except FileExistsError:
                    pass
                finally:
                    os.unlink(tmp)
                secret = path.read_bytes()
            if len(secret) != 32:
                raise P2PSIPError(f"{path} is not a user key secret (32 bytes): move it aside")
            self._secret = secret
        return self._secret

    def _derived(self, purpose: bytes, aor: str) -> bytes:
        return hmac.digest(self.secret(), purpose + aor.encode(), "sha256")

    def get(self, aor: str) -> KeyPair:
        key = self._keys.get(aor)
        if key is not None:
            self._keys.move_to_end(aor)
            return key
        path = self.path_for(aor)
        try:
            key = KeyPair.load(path) if path.exists() else None
        except OverlayError as exc:
            log.warning("%s; using the derived user key of %s", exc, aor)
            key = None
        if key is None:
            key = KeyPair.from_private_bytes(self._derived(b"user-key\x00", aor))
        self._keys[aor] = key
        self._in_use.add(aor)
        while len(self._keys) > self.MAX_CACHED_KEYS:
            self._keys.popitem(last=False)
        return key

    def exists(self, aor: str) -> bool:
        """Whether this peer already holds ``aor`` (its key is in use here, it has a claim or a key file)."""
        return aor in self._in_use or self.holds(aor, self.claim(aor))

    def holds(self, aor: str, claim: Claim | None) -> bool:
        """:meth:`exists`, given the claim of ``aor`` the caller has just read."""
        return aor in self._in_use or claim is not None or self.path_for(aor).exists()

    def export(self, aor: str, *, inbox: bool = True) -> Path:
        """Write ``aor``'s user key (with ``inbox`` its inbox key too) as files, to copy to another peer;
        returns the key file's path. Files already there are kept (they are the keys in use)."""
        path = self.path_for(aor)
        if not path.exists():
            self.get(aor).save(path)
        if inbox and not self.inbox_path(aor).exists():
            write_key(self.inbox_path(aor), self.inbox_key(aor))
        return path

    def inbox_key(self, aor: str) -> X25519PrivateKey:
        """The AOR's X25519 inbox key: the ``.inbox`` file when there is one, else derived."""
        try:
            return load_key(self.inbox_path(aor))
        except FileNotFoundError:
            return X25519PrivateKey.from_private_bytes(self._derived(b"inbox-key\x00", aor))

    def certificate(self, aor: str) -> Certificate | None:
        """The user certificate ``p2psip enroll user`` wrote beside the key (``<name>.cert``), if any."""
        try:
            return Certificate.load(self.path_for(aor).with_suffix(".cert"))
        except OverlayError:
            return None

    def known(self) -> list[str]:
        return sorted(self._in_use)

    def on_disk(self) -> int:
        """How many AORs the data dir holds something of (a claim or a key file): for ``status``, what
        registrations left behind."""
        names = {claim.aor for claim in self.claims()}
        try:
            files = [p.name for p in self.directory.glob("*.key")]
        except OSError:
            files = []
        return len(names) + len(set(files) - {self.path_for(aor).name for aor in names})

    # claims and accounts (p2psip.ownership): rows of users.sqlite3

    def inbox_path(self, aor: str) -> Path:
        """The AOR's X25519 inbox key file (:mod:`p2psip.inbox`), when it has one (:meth:`export`)."""
        return self.path_for(aor).with_suffix(".inbox")

    def _claims_db(self) -> sqlite3.Connection:
        if self._db is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.directory / self.DATABASE
            db = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS claims (aor TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID"
            )
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
            self._db = db
            self._import_claim_files(db)
        return self._db

    def _import_claim_files(self, db: sqlite3.Connection) -> None:
        """Claims of a data dir from before users.sqlite3 (``<name>.claim`` files) become rows."""
        for path in sorted(self.directory.glob("*.claim")):
            try:
                claim = Claim.from_json(path.read_text())
            except (OSError, ValueError, TypeError):
                continue
            db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?)", (claim.aor, claim.to_json()))
            with contextlib.suppress(OSError):
                path.unlink()

    def claim(self, aor: str) -> Claim | None:
        """The claim (or account) recorded for ``aor``; None when there is none or it is unreadable. A
        claim queued by :meth:`commit_claim` counts from the moment it is queued."""
        record = self._queued.get(aor)
        if record is None:
            row = self._claims_db().execute("SELECT record FROM claims WHERE aor = ?", (aor,)).fetchone()
            if row is None:
                return None
            record = row[0]
        try:
            return Claim.from_json(record)
        except (ValueError, TypeError):
            return None

    def save_claim(self, claim: Claim) -> None:
        """Record ``claim`` (committed when this returns)."""
        self._claims_db().execute("INSERT OR REPLACE INTO claims VALUES (?, ?)", (claim.aor, claim.to_json()))

    def commit_claim(self, claim: Claim) -> asyncio.Future[None]:
        """Record ``claim`` in the transaction of the claims queued in this loop iteration; the future is
        done once that transaction committed (or carries its error). A REGISTER waits for it before its
        200, so a claim it answered for survives a crash as before, while a burst of REGISTERs costs one
        commit instead of one each (issue 19: the autocommit was ~0.1 ms of each registration)."""
        loop = asyncio.get_running_loop()
        self._queued[claim.aor] = claim.to_json()
        if self._committed is None:
            self._committed = loop.create_future()
            loop.call_soon(self._commit_queued)
        return self._committed

    def _commit_queued(self) -> None:
        queued, self._queued = self._queued, {}
        done, self._committed = self._committed, None
        if not queued:  # committed already (close() does it at once)
            return
        try:
            db = self._claims_db()
            db.execute("BEGIN")
            try:
                db.executemany("INSERT OR REPLACE INTO claims VALUES (?, ?)", queued.items())
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except (OSError, sqlite3.Error) as exc:
            if done is not None and not done.done():
                done.set_exception(exc)
            return
        if done is not None and not done.done():
            done.set_result(None)

    def claims(self) -> list[Claim]:
        out = []
        for (record,) in self._claims_db().execute("SELECT record FROM claims ORDER BY aor"):
            try:
                out.append(Claim.from_json(record))
            except (ValueError, TypeError):
                continue
        return out

    def forget(self, aor: str) -> None:
        """Delete the claim of ``aor`` and its key files (it owns nothing any more)."""
        self._keys.pop(aor, None)
        self._in_use.discard(aor)
        self._claims_db().execute("DELETE FROM claims WHERE aor = ?", (aor,))
        for path in (self.path_for(aor), self.inbox_path(aor)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self) -> None:
        if self._queued:
            self._commit_queued()  # claims queued in the loop iteration that closes: committed, not lost
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._@+-]")


PEER_WRITE_QUORUM = 2
"""Copies of a binding the overlay must acknowledge before a REGISTER gets its 200 (else 503)."""
FLOW_SECRET = "flow-token.key"
TURN_SECRET = "turn.key"
TURN_CREDENTIAL_TTL = 86400.0
"""How long the TURN credentials in a REGISTER's 200 stay valid (coturn's REST-API default): far longer
than the re-REGISTER interval that renews them, so a call's allocation can refresh its lifetime with them
for up to a day; a leaked credential still dies on its own, and its allocations count against one user's
quota (docs/security.md)."""


def flow_secret(data_dir: Path, name: str = FLOW_SECRET) -> bytes | None:
    """The key of this peer's flow tokens, kept in its data dir so that the tokens in the Paths it put into
    the DHT stay valid across a restart (a UDP phone stays callable through them: p2psip/flows.py). None
    (a fresh key for this run) when the data dir cannot hold it. ``name`` TURN_SECRET: the key of the
    TURN credentials this peer issues (p2psip.turn.issue_credentials), kept so they outlive a restart."""
    path = data_dir / name
    try:
        secret = path.read_bytes()
        if len(secret) == 32:
            return secret
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read %s (%s): flow tokens will not survive a restart", path, exc)
        return None
    secret = secrets.token_bytes(32)
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secret)
    except OSError as exc:
        log.warning("cannot keep %s (%s): flow tokens will not survive a restart", path, exc)
    return secret


def canonical_aor(aor: str) -> str:
    """The canonical form of an AOR a command was given (``p2psip user add``, ``p2psip enroll user``), or
    P2PSIPError saying why it is not one."""
    try:
        canonical = URI(aor).aor()
    except ParseError as exc:
        raise P2PSIPError(f"{aor!r} is not a SIP address of record: {exc}") from None
    if not canonical.startswith("sip:") or "@" not in canonical:
        raise P2PSIPError(f"{aor!r} is not a SIP address of record (write sip:user@domain)")
    return canonical


Signer = Callable[[str, bytes], Certificate]
"""Who signs an enrollment: (subject, public key) -> a certificate (the authority's key here, or the
enrollment service over the network: ``p2psip enroll user --server``)."""


def enroll_user_into(data_dir: Path, ca: KeyPair, aor: str, *, days: float) -> Certificate:
    """``p2psip enroll user``: the user key of ``aor`` in ``data_dir`` (created if new) and a certificate
    of ``ca`` for it, written beside the key as ``<name>.cert``. Raises P2PSIPError for a bad AOR."""
    return enroll_user_with(data_dir, aor, lambda subject, key: enroll_user(ca, subject, key, days=days))


def enroll_user_with(data_dir: Path, aor: str, sign: Signer) -> Certificate:
    """The user key of ``aor`` in ``data_dir`` (created if new) certified by ``sign``, the certificate
    checked to name this AOR and key and written beside the key. Raises P2PSIPError (bad AOR or answer)."""
    canonical = canonical_aor(aor)
    users = UserKeys(Path(data_dir) / USERS_DIR)
    try:
        key = KeyPair.load(users.export(canonical, inbox=False))  # the key the peer signs with, as a file
        cert = sign(canonical, key.public_key)
    except OverlayError as exc:
        raise P2PSIPError(str(exc)) from None
    if (cert.kind, cert.subject, cert.public_key) != (USER_CERT, canonical, key.public_key):
        raise P2PSIPError(f"the certificate received is not a user certificate for {canonical} and its key")
    cert.save(users.path_for(canonical).with_suffix(".cert"))
    return cert


def enroll_node_into(data_dir: Path, ca: KeyPair, *, days: float) -> Certificate:
    """``p2psip enroll node``: a certificate of ``ca`` for the node key of ``data_dir`` (created if new),
    written as ``DATA_DIR/node.cert`` (what ``--enrolled-nodes`` presents at admission)."""
    return enroll_node_with(data_dir, lambda _subject, key: enroll_node(ca, key, days=days))


def enroll_node_with(data_dir: Path, sign: Signer) -> Certificate:
    """The node key of ``data_dir`` (created if new) certified by ``sign``, checked and written as
    ``DATA_DIR/node.cert``. Raises P2PSIPError when the answer is not a node certificate for that key."""
    key = node_identity(data_dir).public_key
    try:
        cert = sign(f"{node_id_of(key):032x}", key)
    except OverlayError as exc:
        raise P2PSIPError(str(exc)) from None
    if (cert.kind, cert.public_key) != (NODE_CERT, key):
        raise P2PSIPError("the certificate received is not a node certificate for this node's key")
    cert.save(Path(data_dir) / NODE_CERT_FILE)
    return cert


def export_user_key(data_dir: Path, aor: str) -> Path:
    """``p2psip user key``: write ``aor``'s user key and inbox key in ``data_dir`` as files (the keys a
    peer on that data dir signs and opens letters with) and return the key file's path. Raises
    P2PSIPError for an AOR that is not a SIP URI."""
    users = UserKeys(Path(data_dir) / USERS_DIR)
    try:
        return users.export(canonical_aor(aor))
    finally:
        users.close()


def add_account(data_dir: Path, aor: str, *, username: str | None = None) -> str:
    """``p2psip user add``: create an account for ``aor`` in ``data_dir`` and return its generated password
    (printed once; digest never reveals it, so it cannot be learned on first use). The account needs
    digest for every REGISTER, at a running peer too (it reads the record per REGISTER), and its user key
    is never swept. Raises P2PSIPError for an AOR that is not a SIP URI or already has an account."""
    canonical = canonical_aor(aor)
    users = UserKeys(Path(data_dir) / USERS_DIR)
    existing = users.claim(canonical)
    if existing is not None and existing.explicit:
        raise P2PSIPError(f"{canonical} already has an account in {data_dir}")
    password = secrets.token_urlsafe(12)
    name = username or canonical.partition(":")[2].partition("@")[0]
    users.save_claim(Claim(canonical, explicit=True, username=name, password=password, created=time.time()))
    users.export(canonical, inbox=False)  # its key as a file, to copy to a peer serving another device
    users.close()
    return password


@dataclass
class LookupResult:
    """What ``lookup`` found for an AOR: where it lives (on the ring; OpenDHT does not say which nodes
    store a value, so ``responsible`` is None and ``holders`` empty there) and the live bindings."""

    aor: str
    key: int
    responsible: tuple[int, str, int] | None
    hops: int
    holders: list[tuple[int, str, int]]
    bindings: list[Binding]
    seconds: float
    engine: str = "chord"

    def as_dict(self, now: float) -> dict[str, Any]:
        def node(n: tuple[int, str, int]) -> dict[str, str]:
            return {"id": f"{n[0]:032x}", "addr": f"{n[1]}:{n[2]}"}

        return {
            "aor": self.aor,
            "engine": self.engine,
            "key": f"{self.key:032x}",
            "hops": self.hops,
            "responsible": node(self.responsible) if self.responsible else None,
            "holders": [node(n) for n in self.holders],
            "lookup_ms": round(self.seconds * 1000, 2),
            "bindings": [
                {
                    "contact": b.contact,
                    "expires_in": b.remaining(now),
                    "q": b.q,
                    "instance": b.instance,
                    "path": list(b.path),
                }
                for b in self.bindings
            ],
        }


@dataclass(eq=False)
class InboxDelivery:
    """The context of a stored MESSAGE the home peer delivers (so the core hands its outcome back)."""

    final: asyncio.Future[int]


@dataclass(slots=True)
class ClientRegistration:
    """A client peer's REGISTER at its attach peer (p2psip.clientpeer): its final response or failure."""

    final: asyncio.Future[Response | str]


class PeerCore(Proxy):
    """The peer's SIP core: the proxy (with ``locate`` = the DHT) plus the registrar for REGISTER."""

    MAX_CALLS = 1024

    def __init__(self, peer: Peer, stack: Stack, *, verbose: bool = False) -> None:
        self.peer = peer
        self.calls: dict[str, dict[str, Any]] = {}
        """Calls routed through this peer, by Call-ID (for the status and the ring page): set up on the
        INVITE, established on its 2xx, gone on a failure or a BYE. Bounded; never consulted for routing."""
        # give_up: a MESSAGE (any non-INVITE) nobody answers gets 480 at 3/4 of Timer F, before the
        # sender's own Timer F turns it into a 408 (docs/presence.md, Instant messages).
        super().__init__(stack, locate=peer.locate, record_route=True, verbose=verbose, give_up=0.75)

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        if request.method == "INVITE" and request.to.tag is None and transaction is not None:
            if len(self.calls) < self.MAX_CALLS:
                self.calls.setdefault(
                    request.call_id,
                    {"from": str(request.from_.uri), "to": str(request.to.uri), "state": "setting up",
                     "since": round(time.time(), 1)},
                )  # fmt: skip
        elif request.method == "BYE":
            self.calls.pop(request.call_id, None)
        if (
            transaction is not None
            and request.method not in ("ACK", "CANCEL")
            and request.to.tag is None
            # REGISTERs waiting out a digest-failure delay are bounded on their own (MAX_DELAYED_AUTH) and
            # cost nothing meanwhile: they must not crowd out others' requests
            and len(self._tasks) - self.peer._delayed >= self.peer.config.max_pending
        ):
            # Overload: shed new work at once (cheap) instead of queueing it behind the overlay's own
            # messages; a dialog already set up goes on. Retry-After spreads the clients' retries.
            self.peer.counters["shed"] += 1
            shed = Response.for_request(request, 503, "Service Unavailable (overloaded)")
            shed.add("Retry-After", str(SHED_RETRY_AFTER))
            self.stack.respond(transaction, shed)
            return
        if transaction is not None and request.method == "REGISTER":
            self.spawn(self.peer.handle_register(request, transaction, source))
            return
        if transaction is not None and unreadable_event(request):
            bad = Response.for_request(request, 400, "Bad Request (unreadable Event header)")
            self.stack.respond(transaction, bad)
            return
        if transaction is not None and is_presence(request):
            agent = self.peer.presence
            if agent.in_dialog(request):
                agent.refresh(request, transaction)
                return
            if request.to.tag is None:
                self.spawn(self._presence(request, transaction, source))
                return
        if transaction is not None and request.to.tag is None and is_message_summary(request):
            self.spawn(self._presence(request, transaction, source))  # MWI: the AOR's agent decides
            return
        if request.get("Route") is not None:
            self._pass_own_flow_routes(request, source)
        if (
            transaction is not None
            and request.method == "OPTIONS"
            and request.get("Route") is None
            and request.uri.user is None
            and self.stack.is_local(request.uri.host, request.uri.port)
        ):
            response = Response.for_request(request, 200)
            response.add("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, INFO, UPDATE")
            self.stack.respond(transaction, response)
            return
        if (
            transaction is not None
            and request.method not in ("ACK", "CANCEL")
            and request.to.tag is None
            and self.peer.scans.wait(source.host, self.stack.loop.time()) > 0
        ):
            # This source has had its share of 404s (svwar-style scanning for users): it gets 503 without a
            # lookup, which tells it nothing about who exists. Callers elsewhere keep their 404s.
            self.peer.counters["scans_refused"] += 1
            refused = SIPStatusError(503, None, [("Retry-After", "60")], detail="too many unknown addresses")
            self.stack.respond(transaction, Response.for_error(request, refused))
            return
        if (
            transaction is not None
            and request.method == "MESSAGE"
            and request.to.tag is None
            and request.get("Route") is None
        ):
            self.spawn(self._message(request, transaction, source))
            return
        super().on_request(request, transaction, source)

    async def _message(self, request: Request, transaction: ServerTransaction, source: Source) -> None:
        """A MESSAGE for an overlay AOR with nobody registered is left in its inbox (``202 Accepted``)
        when the AOR has one (:mod:`p2psip.inbox`); everything else is proxied as usual (404 then)."""
        peer = self.peer
        if not self.stack.is_local(source.host, source.port):
            request.remove(SENDER_HEADER)  # only a peer delivering a stored message says who sent it
        decision = decide(request.uri, routes=peer._routes(), is_local=peer.stack.is_local)
        if peer.client_link is not None:
            # A client peer stores no letter itself: the reader could not check its vouch (it is in no
            # ring). Its attach peer gets the MESSAGE over the flow, with the client peer's vouch for its
            # phone, and leaves it in the inbox vouched for in its own name (docs/nat.md).
            vouched = isinstance(decision, OverlayLookup) and await peer.vouches_here(request, source)
            request.remove(VOUCH_HEADER)
            if vouched:
                request.add(VOUCH_HEADER, peer.vouch(request))
        elif isinstance(decision, OverlayLookup):
            nobody = False
            try:
                self.check(request)
                nobody = not await peer.lookup_bindings(decision.aor)
            except SIPStatusError as error:
                self._reject(transaction, request, error)
                return
            except (OverlayError, TimeoutError):
                pass  # the proxy path below looks again and answers the failure
            may_store = nobody and peer.config.offline_messages
            if may_store and await peer.leave_in_inbox(decision.aor, request, source):
                if not transaction.terminated and transaction.last_response is None:
                    self.stack.respond(transaction, Response.for_request(request, 202, "Accepted"))
                return
        if peer.client_link is None:
            request.remove(VOUCH_HEADER)  # only leave_in_inbox reads it: it goes no further
        if not transaction.terminated and transaction.last_response is None:
            super().on_request(request, transaction, source)

    async def _presence(self, request: Request, transaction: ServerTransaction, source: Source) -> None:
        """A SUBSCRIBE or PUBLISH for an AOR's presence, or a SUBSCRIBE for its message-summary: served
        here when this peer is the AOR's agent (its primary home peer), else forwarded to that peer
        (:mod:`p2psip.presenceagent`, :mod:`p2psip.mailbox`). A client peer serves none itself: it hands
        the request to its attach peer over its flow, vouching for its own phones (docs/nat.md)."""
        peer = self.peer
        if request.get("Route") is not None:
            self._pass_own_flow_routes(request, source)  # a client peer's Service-Route through us
        decision = decide(request.uri, routes=peer._routes(), is_local=peer.stack.is_local)
        if not isinstance(decision, OverlayLookup):
            super().on_request(request, transaction, source)  # not an overlay AOR: proxied as usual
            return
        link = peer.client_link
        if link is not None:
            # its phones' agent is the attach peer (their first Path hop); others' is looked up there
            if link.path is None:
                self._reject(transaction, request, SIPStatusError(503, detail="not attached to a peer yet"))
                return
            home = link.path
        else:
            agent = peer.presence
            try:
                bindings = await peer.lookup_bindings(decision.aor)
            except (OverlayError, TimeoutError) as exc:
                failed = SIPStatusError(503, detail=f"overlay lookup failed: {exc}")
                self._reject(transaction, request, failed)
                return
            found = agent.primary_home(bindings)
            if found is None and is_message_summary(request):
                await self._mailbox(decision.aor, request, transaction, source)
                return
            if found is None:
                if request.method == "SUBSCRIBE":
                    await agent.subscribe(decision.aor, request, transaction, source)
                else:
                    await agent.publish(decision.aor, request, transaction, source)
                return
            home = found
        try:
            self.check(request)
        except SIPStatusError as error:
            self._reject(transaction, request, error)
            return
        vouched = await peer.vouches_here(request, source)  # a watcher (SUBSCRIBE) or a publisher (PUBLISH)
        request.remove(VOUCH_HEADER)  # only a peer asserts identities, never a phone
        if vouched:
            request.add(VOUCH_HEADER, peer.vouch(request))
        peer.counters["routed_to_home"] += 1
        self.forward(request, transaction, source, [RoutedTarget(request.uri, (home,))])

    async def _mailbox(
        self, aor: str, request: Request, transaction: ServerTransaction, source: Source
    ) -> None:
        """This peer is ``aor``'s agent and a device subscribes to its message-summary: only the mailbox
        owner's vouched devices may (403 for others); the SUBSCRIBE goes on to the owner's voicemail
        (``[voicemail]``), vouched for by this peer, or, for a voicemail's own address, to its devices
        (:mod:`p2psip.mailbox`)."""
        peer = self.peer
        try:
            watcher = request.from_.uri.aor()
        except (ParseError, ValueError):
            watcher = ""
        vouched = bool(watcher) and await peer._vouched(request, source)
        verdict = peer.mailboxes.decide(aor, watcher, vouched=vouched)
        if isinstance(verdict, Forbidden):
            peer.counters["mwi_refused"] += 1
            self._reject(transaction, request, SIPStatusError(
                403, "Forbidden", detail=f"only devices of {verdict.owner} subscribe to its messages"
            ))  # fmt: skip
            return
        if isinstance(verdict, NoMailbox):
            # not a scan: the phone asks about its own AOR (no 404 token taken)
            super()._reject(transaction, request, SIPStatusError(404, detail="no voicemail for this AOR"))
            return
        request.remove(VOUCH_HEADER)  # only a peer asserts identities; we checked this one
        request.add(VOUCH_HEADER, peer.vouch(request))
        if isinstance(verdict, Retarget):
            try:
                request.uri = URI(verdict.uri)
            except ParseError as exc:  # the config was checked: not reached
                self._reject(transaction, request, SIPStatusError(500, detail=str(exc)))
                return
            peer.counters["mwi_retargeted"] += 1
        Proxy.on_request(self, request, transaction, source)

    def _reject(self, transaction: ServerTransaction, request: Request, error: SIPStatusError) -> None:
        if error.status == 404 and isinstance(transaction.source, Source):
            self.peer.scans.allow(transaction.source.host, self.stack.loop.time())  # a 404 costs a token
        super()._reject(transaction, request, error)

    # ---------------------------------------------------------------------- RFC 5626 flow routes

    def preprocess_routes(self, request: Request) -> None:
        """§16.4, noting first whether the request came to us as its AOR's sole home peer (``SOLE_HOME``)."""
        top = request.get("Route")
        if top is not None and SOLE_HOME in top:
            uri = self.local_top_route(request)
            if uri is not None and SOLE_HOME in uri.params and self.own_route(uri):
                self.peer.mark_sole_home(request)
        super().preprocess_routes(request)

    def own_route(self, uri: URI) -> bool:
        """§16.4 removes our own Route URIs, except those with a flow token: they say which flow the
        request goes over (:meth:`_next_hop` consumes them)."""
        return uri.user is None and super().own_route(uri)

    def _pass_own_flow_routes(self, request: Request, source: Source) -> None:
        """A request that came *from* a flow carries our flow-token Record-Route (the phone's route set
        starts with it): for that direction it only means "through this peer", so it is removed here;
        from any other side it means "deliver over that flow" and stays for :meth:`_next_hop`
        (RFC 5626 §5.3)."""
        flows = self.peer.flows
        while (uri := self.local_top_route(request)) is not None:
            if uri.user is not None:
                if flows.key_of_token(uri.user) != (source.transport, source.host, source.port):
                    return
            elif SOLE_HOME in uri.params:
                self.peer.mark_sole_home(request)
            request.remove_first("Route")

    def _next_hop(self, fwd: Request) -> Target:
        """Our own URIs on top of Route are consumed here (a binding's Path starts with its home peer,
        which may be us); one with a flow token sends the request over that flow, and a flow we no longer
        hold raises FlowFailed (430)."""
        token: str | None = None
        while (uri := self.local_top_route(fwd)) is not None:
            fwd.remove_first("Route")
            token = token or uri.user
        if token is not None:
            flow = self.peer.flows.resolve(token, self.peer.stack.loop.time())
            if flow is None:
                self.peer.counters["flow_failed_requests"] += 1
                raise FlowFailed("the phone's connection or NAT mapping to its home peer is gone")
            return Target(flow.transport, flow.host, flow.port)
        return super()._next_hop(fwd)

    def _add_record_route(self, fwd: Request, source: Source, hop: Target) -> None:
        """Record-Route as usual; when either side is a flow we hold, our URIs carry its token, so the
        in-dialog requests of the far side come back over the flow and not to the phone's Contact."""
        flows = self.peer.flows
        flow = flows.get(hop.transport, hop.host, hop.port) or flows.get(
            source.transport, source.host, source.port
        )
        if flow is None:  # the usual case (peer to peer): nothing to count or rewrite
            super()._add_record_route(fwd, source, hop)
            return
        before = len(fwd.get_all("Record-Route"))
        super()._add_record_route(fwd, source, hop)
        values = fwd.get_all("Record-Route")
        added = len(values) - before
        tokened = [v.replace("<sip:", f"<sip:{flow.token}@", 1).replace("<sips:", f"<sips:{flow.token}@", 1)
                   for v in values[:added]]  # fmt: skip
        fwd.set("Record-Route", tokened + values[added:])

    def on_response(
        self, response: Response, transaction: ClientTransaction | None, source: Source | None
    ) -> None:
        if transaction is not None and isinstance(transaction.context, AgentTransaction):
            self.peer.presence.on_response(response, transaction)
            return
        if transaction is not None and isinstance(transaction.context, InboxDelivery):
            if response.status >= 200 and not transaction.context.final.done():
                transaction.context.final.set_result(response.status)
            return
        if transaction is not None and isinstance(transaction.context, ClientRegistration):
            if response.status >= 200 and not transaction.context.final.done():
                transaction.context.final.set_result(response)
            return
        if response.status >= 200 and response.cseq.method == "INVITE":
            call = self.calls.get(response.call_id)
            if call is not None:
                if response.status < 300:
                    call["state"] = "established"
                elif call["state"] != "established":
                    self.calls.pop(response.call_id, None)
        super().on_response(response, transaction, source)

    @staticmethod
    def _delivery_failed(transaction: Transaction, status: int) -> bool:
        """A stored message's delivery (the peer's own MESSAGE) got no answer: its outcome is ``status``;
        a client peer's REGISTER at its attach peer likewise."""
        context = transaction.context
        if isinstance(context, ClientRegistration):
            if not context.final.done():
                context.final.set_result("no answer" if status == 408 else "the transport failed")
            return True
        if not isinstance(context, InboxDelivery):
            return False
        if not context.final.done():
            context.final.set_result(status)
        return True

    def on_timeout(self, transaction: Transaction, timer: str) -> None:
        if not self._delivery_failed(transaction, 408):
            super().on_timeout(transaction, timer)

    def on_transport_failure(self, transaction: Transaction, error: str) -> None:
        if not self._delivery_failed(transaction, 503):
            super().on_transport_failure(transaction, error)

    def on_terminated(self, transaction: Transaction) -> None:
        # An INVITE that ended without being set up (refused here: 404, 482, 503..., or timed out) leaves
        # no call behind: only a 2xx passed downstream-up makes it "established".
        if isinstance(transaction, ServerTransaction) and transaction.method == "INVITE":
            call = self.calls.get(transaction.request.call_id)
            if call is not None and call["state"] == "setting up":
                del self.calls[transaction.request.call_id]
        super().on_terminated(transaction)


class Peer:
    """An overlay node and a SIP stack joined into a serverless registrar and proxy.

    Create with ``await Peer.start(config)``; end with ``await peer.close()`` (graceful leave: entries are
    handed to the successors) or ``await peer.close(leave=False)`` (like a crash, sockets freed).
    """

    def __init__(
        self,
        config: PeerConfig,
        node: Node | OpenDhtDirectory,
        stack: Stack,
        *,
        on_event: EventHandler | None,
    ) -> None:
        self.config = config
        self.engine = node
        self.directory: Directory = node
        """Where registrations live (overlay.directory): the registrar and location use only this."""
        self._chord = node if isinstance(node, Node) else None
        self.stack = stack
        self.on_event = on_event
        self.dht_trace: Callable[[str], None] | None = None
        """Called with one line per DHT read of SIP data (``p2psip start -v`` prints them with the SIP
        trace): the AOR, its key, the node that answered, the entries and the time it took."""
        self.users = UserKeys(config.data_dir / USERS_DIR)
        self.cache = LocationCache(ttl=config.cache_ttl)
        self.policy = RegistrarPolicy(
            min_expires=config.min_expires,
            max_expires=config.max_expires,
            default_expires=config.default_expires,
        )
        self.names: dict[int, str] = {}  # ring key -> AOR, for the names this peer has seen (status)
        self.home = HomeTable()
        self.web: Any = None
        self.turn: TurnServer | None = None
        """The web server (p2psip.web.server.WebServer) when ``--http`` is set."""
        """Registrations this peer took (it is their home peer): AOR -> entry id -> binding. The status
        shows them; a call that reaches this peer as the AOR's sole home peer is served from them."""
        self._inbox_published: dict[str, float] = {}  # AOR -> when this peer last published its inbox key
        self.started = time.time()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "registers",
                "registers_refused",
                "shed",
                "messages_stored",
                "messages_delivered",
                "mwi_retargeted",
                "mwi_refused",
                "bindings_written",
                "bindings_removed",
                "lookups",
                "lookup_cache_hits",
                "routed",
                "not_found",
                "overlay_errors",
                "flows_failed",
                "flow_failed_requests",
                "nat_pings",
                "routed_to_home",
                "home_lookups_saved",
                "auth_failures",
                "auth_delayed",
                "takeovers_refused",
                "unenrolled_refused",
                "new_aors_refused",
                "scans_refused",
                "user_keys_removed",
                "client_registers",
                "client_registers_refused",
                "client_bindings_moved",
                "register_reads",
                "register_reads_saved",
            ),
            0,
        )
        attach = getattr(node, "attach", None)
        if config.advertise is not None:
            stack.transport.advertise_host = config.advertise.host
        elif node.endpoint[0] != config.overlay.host and attach is None:
            # a wildcard overlay bind: the host learned from the bootstrap (overlay.reach) is ours. Not on a
            # client peer: nobody reaches it there; it names its own SIP address (its phones' way to it),
            # and its attach peer reaches it over its flow whatever it names.
            stack.transport.advertise_host = node.endpoint[0]
        self.flows = FlowTable(
            secret=flow_secret(Path(config.data_dir)),
            flow_timer=config.flow_timer,
            ping_interval=config.nat_ping,
            grace=min(10.0, config.flow_timer / 4),
            ping_timeout=3.5 * config.nat_ping,  # three pings unanswered
        )
        stack.transport.flows = self.flows
        stack.transport.on_flow_failed = self._flow_failed
        self._flow_task: asyncio.Task[None] | None = None
        self._sole: set[tuple[int, str]] = set()
        self._path_entries: dict[str, str] = {}  # path_entry's strings, shared by the bindings holding them
        """Requests that reached us as the sole home peer of their AOR (``SOLE_HOME``), until located."""
        self._homes: dict[tuple[str, ...], str | None] = {}
        """Memo of :meth:`_primary_home`, by the bindings' first Path hops."""
        self._unsure: dict[str, float] = {}
        """AOR -> until when the DHT may hold bindings of it that :attr:`home` lacks (:meth:`_own_record`);
        only AORs after a failed write or removal, or with bindings of an earlier run: pruned by the sweep."""
        self._aor_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        """AOR -> (its REGISTER lock, how many hold or wait for it); only AORs in use are in it."""
        self._digest: dict[str, DigestServer] = {}
        self._checking: tuple[str, str, str] | None = None
        self._accounts: dict[tuple[str, str], str] = {}  # (realm, user name) -> password: _account_index
        self._accounts_stamp: tuple[int, int] | None = None
        self._delayed = 0
        self.throttle = FailureThrottle()
        """Digest failures per (source, AOR): growing delays (p2psip.ownership)."""
        self.new_aors = TokenBuckets(config.new_aors_per_source)
        self.new_aors_total = TokenBuckets(config.new_aors_total, max_keys=1)
        self.scans = TokenBuckets(config.scan_rate)
        self.key_sweep_interval = 30.0
        """How often user keys that own nothing any more are looked for (seconds)."""
        self.key_users: list[Callable[[str], bool]] = []
        """Predicates "this AOR's user key still serves something" (e.g. stored offline messages): the
        sweep keeps a key any of them claims."""
        allow = {aor: frozenset(watchers) for aor, watchers in config.presence_allow.items()}
        self.presence = PresenceAgent(
            stack, self.lookup_bindings, self._vouched, policy=WatcherPolicy(allow=allow)
        )
        """The presence agent of the AORs whose primary home this peer is (p2psip/presenceagent.py)."""
        self.mailboxes = MailboxPolicy(config.voicemail)
        """Where users' own message-summary SUBSCRIBEs go, and who may send them (p2psip/mailbox.py)."""
        self.presence.save = self._save_presence
        self.presence.load = self._load_presence
        self.core = PeerCore(self, stack, verbose=config.verbose)
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self.client_link: ClientLink | None = ClientLink() if attach is not None else None
        """Set on a client peer: its SIP flow to its attach peer (p2psip.clientpeer, docs/nat.md)."""
        self._client_task: asyncio.Task[None] | None = None
        self._client_call_id = secrets.token_hex(12)
        self._client_cseq = 0
        self._stun: dict[bytes, asyncio.Future[tuple[str, int] | None]] = {}
        self.clients: dict[int, dict[str, Any]] = {}
        """On a full peer: the client peers that registered their SIP flow here (NodeId -> its flow)."""

    @property
    def node(self) -> Node:
        """The Chord node (ring status, lookups, offline messages, vouching); not on ``--dht opendht``."""
        if self._chord is None:
            raise P2PSIPError("this peer runs on OpenDHT (--dht opendht): there is no Chord node")
        return self._chord

    # ------------------------------------------------------------------------------------------ life cycle

    @classmethod
    async def start(
        cls,
        config: PeerConfig,
        *,
        on_event: EventHandler | None = None,
        node_config: NodeConfig | None = None,
        stack_options: dict[str, Any] | None = None,
    ) -> Peer:
        """Join (or create) the overlay, open the SIP listeners. Raises ConfigError for unusable addresses
        and P2PSIPError (with the reason) when the overlay cannot be joined."""
        data_dir = Path(config.data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create data dir {data_dir}: {exc.strerror or exc}") from None
        join = config.join.as_tuple() if config.join else None
        node: Node | OpenDhtDirectory
        if config.dht == "opendht":
            node = await _start_opendht(config, join)
        else:
            node = await _start_chord(config, join, node_config, on_event, data_dir)
        try:
            options: dict[str, Any] = {
                "trying_delay": TRYING_DELAY,
                "ws_origins": list(config.ws_origins),
                "streams": StreamLimits(
                    max_connections=config.max_connections,
                    max_per_source=config.max_connections_per_source,
                    message_timeout=config.message_timeout,
                ),
            }
            if config.server_header is not None:
                options["server"] = config.server_header or None
            if config.tls_cert or config.tls_ca:
                options["tls"] = TLSConfig(
                    certfile=str(config.tls_cert) if config.tls_cert else None,
                    keyfile=str(config.tls_key or config.tls_cert) if config.tls_cert else None,
                    cafile=str(config.tls_ca) if config.tls_ca else None,
                )
            options.update(stack_options or {})
            stack = await Stack.start(config.listen, verbose=config.verbose, **options)
        except BaseException:
            await node.close()
            raise
        peer = cls(config, node, stack, on_event=on_event)
        if config.turn is not None:
            try:
                await peer._start_turn(data_dir)
            except BaseException:
                await stack.close()
                await node.close()
                raise
        if config.http is not None:
            try:
                await peer._start_web()
            except BaseException:
                await stack.close()
                await node.close()
                raise
        peer._flow_task = asyncio.ensure_future(peer._watch_flows())
        peer._sweeper = asyncio.ensure_future(peer._sweep_forever())
        if peer.client_link is not None:
            stack.transport.on_stun = peer._on_stun
            peer._client_task = asyncio.ensure_future(peer._keep_client_flow())
        elif isinstance(node, Node) and stack.transport.listens_on("udp"):
            node.service = stack.local_address("udp")  # where client peers keep their SIP flow (docs/nat.md)
        how = f"joined the overlay through {config.join}" if join else "created a new overlay"
        if peer.client_link is not None:
            how += " as a client peer"
        peer._event("joined", f"{how} as node {ids.short(node.node_id)} at {peer.overlay_address_text}; "
                    f"SIP on {', '.join(peer.sip_addresses())}")  # fmt: skip
        return peer

    async def _start_turn(self, data_dir: Path) -> None:
        """Run the TURN server of ``--turn`` (relayed candidates for call audio: docs/nat.md)."""
        config = self.config
        assert config.turn is not None
        secret = flow_secret(data_dir, TURN_SECRET) or secrets.token_bytes(32)
        limits = TurnLimits(
            max_allocations=config.turn_max_allocations,
            per_user=config.turn_per_user,
            per_source=config.turn_per_source,
        )
        turn = TurnServer(secret, config.turn.host, config.turn.port, realm=config.realm, limits=limits)
        try:
            await turn.start()
        except OSError as exc:
            raise ConfigError(f"--turn {config.turn}: cannot listen: {exc.strerror or exc}") from None
        self.turn = turn
        self._event("turn", f"TURN server on udp {format_hostport(*turn.address)}")

    async def _start_web(self) -> None:
        """Serve the ring page and the softphone at ``--http`` (p2psip.web); its origin may then use our
        WebSocket listeners."""
        from p2psip.web.server import WebServer

        config = self.config
        assert config.http is not None
        tls = None
        if config.http_tls:
            if config.tls_cert:
                key = str(config.tls_key or config.tls_cert)
                tls_config = TLSConfig(certfile=str(config.tls_cert), keyfile=key)
            else:
                tls_config = TLSConfig.self_signed(hostnames=[config.http.host])
            tls = tls_config.server_context()
        web = WebServer(
            self.status, self.ws_urls, host=config.http.host, port=config.http.port, tls=tls,
            token=config.http_token,
        )  # fmt: skip
        try:
            await web.start()
        except OSError as exc:
            raise ConfigError(f"--http {config.http}: cannot listen: {exc.strerror or exc}") from None
        self.web = web
        self.stack.transport.ws_origins.add(web.origin)
        self._event("web", f"ring page {web.url}  softphone {web.origin}/phone")

    def ws_urls(self) -> dict[str, str]:
        """The WebSocket listeners as URLs (what the softphone connects to)."""
        out: dict[str, str] = {}
        for transport in ("ws", "wss"):
            for host, port in self.stack.transport.listening.get(transport, []):
                out.setdefault(transport, f"{transport}://{format_hostport(host, port)}")
        return out

    async def close(self, *, leave: bool = True) -> None:
        if self._closed:
            return
        link = self.client_link
        if leave and link is not None and link.ready and link.service is not None:
            # a client peer that stops un-REGISTERs its flow, so the attach peer forgets it at once (the
            # overlay's ``detach`` follows in leave()); bounded: the attach peer may be gone already
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._register_at_attach_peer(link, expires=0), 2.0)
        self._closed = True
        if self.web is not None:
            await self.web.close()
        if self.turn is not None:
            await self.turn.close()
        self.core.cancel_tasks()
        self.presence.close()
        if self._flow_task is not None:
            self._flow_task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._client_task is not None:
            self._client_task.cancel()
        handed = 0
        try:
            if self._chord is None:
                await self.engine.close()
            elif leave:
                handed = await self._chord.leave()
            else:
                await self._chord.close()
        finally:
            await self.stack.close()
            self.users.close()
        if leave:
            self._event("left", self.left_message(handed))

    def left_message(self, handed: int) -> str:
        """What a graceful stop says: how many entries the successor took, and that this node's entries
        stay in its data dir (served again when the peer restarts with it). On OpenDHT: how many entries
        this peer kept alive there, which nobody refreshes any more."""

        def entries(n: int) -> str:
            return f"{n} entry" if n == 1 else f"{n} entries"

        if self._chord is None:
            assert isinstance(self.engine, OpenDhtDirectory)
            kept = self.engine.kept_alive()
            return (
                f"left the OpenDHT network: {entries(kept)} this peer refreshed there will not be refreshed "
                f"any more (OpenDHT drops a value {VALUE_LIFETIME_S / 60:.0f} min after its last put)"
            )

        held = len(self._chord.store) if self._chord is not None else 0
        if handed == 0 and held == 0:
            nothing = f"nothing to hand off, nothing in the data dir {self.config.data_dir}"
            return f"left the overlay: it held no entries ({nothing})"
        stay = f"{entries(held)} {'stays' if held == 1 else 'stay'} in the data dir {self.config.data_dir}"
        if handed == 0 and held:
            return f"left the overlay: no successor to hand entries to; {stay}, served again after a restart"
        return f"left the overlay: {entries(handed)} handed to the successor; {stay}"

    # --------------------------------------------------------------------------------------- addresses

    @property
    def overlay_address(self) -> tuple[str, int]:
        return self.engine.endpoint

    @property
    def overlay_address_text(self) -> str:
        host, port = self.engine.endpoint
        return format_hostport(host, port)

    def sip_address(self, transport: str = "udp") -> tuple[str, int]:
        return self.stack.local_address(transport)

    def sip_addresses(self) -> list[str]:
        return self.stack.addresses()

    # ------------------------------------------------------------------------------------------ events

    def _event(self, kind: str, text: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, text)
            except Exception:  # a broken log sink must not break SIP processing
                log.exception("event handler failed")

    # -------------------------------------------------------------------------------------- bindings

    @contextlib.asynccontextmanager
    async def _lock(self, aor: str) -> AsyncIterator[None]:
        """Serialize the REGISTERs of one AOR. The lock is dropped when nobody holds or waits for it, so
        the table holds only AORs being registered right now (not every AOR ever seen)."""
        entry = self._aor_locks.get(aor)
        if entry is None:
            entry = self._aor_locks[aor] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._aor_locks[aor]

    async def fetch_bindings(self, aor: str, at: KeyDirectory | None = None) -> list[Binding]:
        """Every live binding of ``aor`` in the overlay (malformed records are skipped). ``at``: the
        key's responsible node as found before (``Node.at``), so a read-then-write looks it up once."""
        access = at or self.directory.at(aor)
        started = time.perf_counter()
        entries = await access.get()
        if self.dht_trace is not None and isinstance(access, KeyAccess):
            where = access.target
            node = f"node {ids.short(where.id)} at {where.host}:{where.port}" if where else "?"
            self.dht_trace(
                f"DHT get {aor} (key {ids.short(access.key)}) from {node}: {len(entries)} entries in "
                f"{(time.perf_counter() - started) * 1000:.1f} ms"
            )
        if entries:  # names of what exists, for status; bounded, and never grown by scans for nobody
            self.names[ids.key_for(aor)] = aor
            if len(self.names) > 4096:
                del self.names[next(iter(self.names))]
        now = time.time()
        out = []
        for entry in entries:
            if not entry.value:
                continue
            try:
                binding = decode_binding(aor, entry.value)
            except ValueError:
                continue
            if binding.alive(now):
                out.append(binding)
        return out

    async def _current_bindings(
        self, aor: str, here: KeyDirectory, claim: Claim | None, query: bool
    ) -> tuple[list[Binding], bool]:
        """The AOR's live bindings a REGISTER is planned against (RFC 3261 §10.3 steps 6-8), and whether
        they were read: this peer's own record when it is the whole truth (:meth:`_own_record`: no DHT
        read, the registration is one round trip, its write), else a read of the DHT."""
        if not query:
            own = self._own_record(aor, claim, time.time())
            if own is not None:
                self.counters["register_reads_saved"] += 1
                return own, False
        self.counters["register_reads"] += 1
        return await self.fetch_bindings(aor, here), True

    def _own_record(self, aor: str, claim: Claim | None, now: float) -> list[Binding] | None:
        """The live bindings of ``aor`` when this peer alone can have written them and knows them all;
        None when the DHT must be read.

        Why this is exact: under ``first-claim`` an AOR's entries are signed by its user key, and another
        key's writes are refused. A derived user key (no key file: ``HMAC(secret of this data dir, AOR)``)
        exists nowhere else; once a key file exists (an account, an export to copy to another device's
        peer, an enrolled user, a copied key) other peers may write bindings too, and every REGISTER reads.
        With the key here only, the DHT holds what this peer wrote: the bindings of this process's
        REGISTERs (:attr:`home`, expired ones dropped as the DHT drops them), plus what an earlier run of
        this data dir wrote, which its claim still covers (:meth:`_record_claim`: the last expiry of every
        binding listed): an AOR not in :attr:`home` is read unless its claim has lapsed. A write that failed
        or timed out (some copies may have landed), a removal that failed, or a read that found bindings
        this process did not write marks the AOR unsure (:meth:`_unsure_of`) until they would have
        expired. Under ``enrolled`` every user key is a key file: always read."""
        if self.config.policy == "enrolled":
            return None
        unsure = self._unsure.get(aor)
        if unsure is not None:
            if unsure > now:
                return None
            del self._unsure[aor]
        if self.users.path_for(aor).exists():
            return None
        if aor in self.home:
            return list(self.home.live(aor, now))
        if claim is not None and claim.alive(now):
            return None  # written before this process started (a restart), perhaps still alive
        return []

    def _unsure_of(self, aor: str, until: float) -> None:
        """The DHT may hold bindings of ``aor`` this peer's record lacks until ``until``: read it."""
        self._unsure[aor] = max(until, self._unsure.get(aor, 0.0))

    def _remember(self, aor: str, plan: RegisterPlan, now: float, read: bool) -> None:
        """Keep what a successful REGISTER wrote in :attr:`home`. After a ``read`` of the DHT the AOR is
        unsure exactly as long as a binding the 200 lists and this process did not write lives (the read
        saw everything, a failed write's copies included)."""
        self.home.update(aor, (w.binding for w in plan.writes), (r.entry_id for r in plan.removes))
        if not read:
            return
        held = self.home.get(aor)
        others = [b.expires_at for b in plan.bindings if b not in held and b.alive(now)]
        if others:
            self._unsure[aor] = max(others)
        else:
            self._unsure.pop(aor, None)

    def _password_lookup(self, realm: str) -> Callable[[str], str | None]:
        """The digest password of ``username`` in ``realm``, in O(1): first the account whose REGISTER is
        being checked right now (set just around the synchronous digest check: the config's ``[users]``
        or a ``user add`` account, so two AORs sharing a user name each get their own password), else an
        index of the config's accounts by (realm, user name), rebuilt when that table changes (a scan of
        every account per REGISTER grew with the accounts, issue 19)."""

        def lookup(username: str) -> str | None:
            expected = self._checking
            if expected is not None and expected[0] == username and expected[2] == realm:
                return expected[1]
            return self._account_index().get((realm, username))

        return lookup

    def _account_index(self) -> dict[tuple[str, str], str]:
        users = self.config.users
        stamp = (id(users), len(users))
        if self._accounts_stamp != stamp:
            index: dict[tuple[str, str], str] = {}
            for account in users.values():
                index.setdefault((account.realm or self.config.realm, account.username), account.password)
            self._accounts, self._accounts_stamp = index, stamp
        return self._accounts

    def _digest_for(self, realm: str) -> DigestServer:
        digest = self._digest.get(realm)
        if digest is None:
            digest = self._digest[realm] = DigestServer(realm, self._password_lookup(realm))
        return digest

    def account(self, aor: str) -> tuple[str, str, str] | None:
        """(username, password, realm) of ``aor``'s account: the config's ``[users]`` or ``p2psip user
        add`` (an explicit claim in the data dir); None when the AOR has none."""
        return self._account(aor, self.users.claim(aor))

    def _account(self, aor: str, claim: Claim | None) -> tuple[str, str, str] | None:
        """:meth:`account`, given the claim of ``aor`` the caller has just read."""
        configured = self.config.account_for(aor)
        if configured is not None:
            return configured.username, configured.password, configured.realm or self.config.realm
        if claim is not None and claim.explicit and claim.password:
            return claim.username, claim.password, self.config.realm
        return None

    # ------------------------------------------------------------------------------------- registrar

    async def handle_register(self, request: Request, transaction: ServerTransaction, source: Source) -> None:
        """Answer one REGISTER (RFC 3261 §10.3) by reading and writing the AOR's entries in the overlay."""
        self.counters["registers"] += 1
        if source.transport in ("ws", "wss") and not self.config.home_routing:
            self._add_home_path(request)  # with home routing, every binding gets its home peer as Path
        try:
            response = await self._register(request, source)
        except Exception:  # never leave a REGISTER unanswered (the details stay in the local log)
            log.exception("REGISTER failed")
            response = Response.for_request(request, 500)
        if response.status >= 300 and response.status not in (401, 407):
            self.counters["registers_refused"] += 1
        with contextlib.suppress(Exception):
            self.stack.respond(transaction, response)

    def _add_home_path(self, request: Request) -> None:
        """A browser (RFC 7118) is reachable only over its WebSocket connection to this peer: its binding
        gets this peer as the last Path hop (RFC 3327), so requests for it entering at any peer come here
        and go out over that connection (the transport knows the browser's ``.invalid`` host)."""
        for transport in ("udp", "tcp", "tls"):
            if self.stack.transport.listens_on(transport):
                hop = self.stack.local_uri(transport)
                request.add("Path", f"<{hop};lr>")
                return

    async def _register(self, request: Request, source: Source) -> Response:
        try:
            aor = aor_of(request)
        except RegisterRejected as rejected:
            return Response.for_error(request, rejected)
        client = client_node_of(aor)
        if client is not None or aor.endswith("@" + CLIENT_DOMAIN):
            if client is None:
                return Response.for_request(request, 404, "Not Found (not a client peer's name)")
            return await self._register_client(request, source, client)
        if self.client_link is not None and not self.client_link.ready and request.get("Contact") is not None:
            response = Response.for_request(request, 503, "Service Unavailable (not attached to a peer yet)")
            response.add("Retry-After", "5")
            return response
        now = time.time()
        claimant = flow_of(source.transport, source.host, source.port)
        instances = contact_instances(request)
        stored_claim = self.users.claim(aor)  # read once here; again under the AOR's lock below
        account = self._account(aor, stored_claim)
        authenticated = False
        query = request.get("Contact") is None
        if account is not None or self.config.require_auth:
            # Accounts authenticate. With require_auth every AOR is challenged alike, whether it has an
            # account or not, and wrong credentials get the same 401: answers never say who exists.
            challenge = await self._authenticate(request, source, aor, account, now)
            if challenge is not None:
                return challenge
            authenticated = True
        elif not query and not may_register(stored_claim, instances=instances, flow=claimant, now=now):
            # (a query changes nothing: it is answered below, to the owner only)
            self.counters["takeovers_refused"] += 1
            self._event("refused", f"REGISTER {aor} from {claimant} refused: claimed by another device")
            return Response.for_request(
                request, 403, "Forbidden (registered from another device; authenticate to change it)"
            )
        if not query and self.config.policy == "enrolled":
            cert = self.users.certificate(aor)
            if cert is None:
                self.counters["unenrolled_refused"] += 1
                self._event("refused", f"REGISTER {aor} refused: this peer holds no user certificate")
                return Response.for_request(request, 403, "Forbidden (no enrollment for this AOR here)")
            self.directory.add_certificate(cert)
        if not query and not self.users.holds(aor, stored_claim) and not self._may_create(source.host):
            self.counters["new_aors_refused"] += 1
            response = Response.for_request(request, 503, "Service Unavailable (too many new addresses)")
            response.add("Retry-After", "60")
            return response
        async with self._lock(aor):
            # One lookup for the whole REGISTER: the read (if any) and every write go to the node it found.
            here = self.directory.at(aor)
            claim = self.users.claim(aor)
            try:
                current, read = await self._current_bindings(aor, here, claim, query)
            except (OverlayError, TimeoutError) as exc:
                self.counters["overlay_errors"] += 1
                return self._unavailable(request, exc)
            now = time.time()
            outbound = self._outbound(request, source)
            flow = outbound or self._behind_nat(request, source)
            path = [self.path_entry(source, outbound, flow)] if self.config.home_routing else []
            if self.client_link is not None and self.client_link.path is not None:
                # a client peer's phones are reached through its attach peer, over the client's flow
                path = [self.client_link.path, self.path_entry(source, outbound, flow)]
            try:
                plan = plan_register(request, current, now, self.policy, path=path)
            except RegisterRejected as rejected:
                return Response.for_error(request, rejected)
            registered_before = claim is not None and claim.until > 0
            owner = authenticated or owns(claim, instances=instances, flow=claimant, now=now)
            if plan.is_query:
                # Contacts (and whether there are any) only to the owner: anyone else sees an empty 200.
                return ok_response(request, plan if owner else RegisterPlan(aor), now, instances)
            key = self.users.get(aor)
            try:
                changes = [
                    here.put(w.value, entry_id=w.entry_id, lifetime=w.lifetime, key=key) for w in plan.writes
                ]
                changes += [here.remove(entry_id=r.entry_id, key=key) for r in plan.removes]
                if len(changes) == 1:
                    await changes[0]  # the usual REGISTER: one write, awaited here (gather makes a task)
                else:
                    await asyncio.gather(*changes)
            except StoreRefused as exc:
                self.cache.forget(aor)
                self._unsure_of(aor, now + self.policy.max_expires)
                if exc.reason == "policy" and self.config.policy == "enrolled":
                    self._event("refused", f"REGISTER {aor} refused by the overlay: {exc}")
                    return Response.for_request(request, 403, f"Forbidden (enrollment refused: {exc})")
                if exc.reason == "policy":
                    self._event("refused", f"REGISTER {aor} refused: the name belongs to another user key")
                    return Response.for_request(
                        request, 403, "Forbidden (this AOR is registered with another user key)"
                    )
                return Response.for_request(request, 500, f"Server Internal Error (overlay refused: {exc})")
            except (OverlayError, TimeoutError) as exc:
                self.cache.forget(aor)
                self._unsure_of(aor, now + self.policy.max_expires)  # some copies may have been written
                self.counters["overlay_errors"] += 1
                return self._unavailable(request, exc)
            self.cache.forget(aor)
            await self._save_claim(self._record_claim(aor, claim, plan, instances, claimant, now))
            arrived = any(not self.home.has(aor, w.entry_id) for w in plan.writes)
            self._remember(aor, plan, now, read)
            if flow:
                self._bind_flows(plan, source, outbound)
        self.counters["bindings_written"] += len(plan.writes)
        self.counters["bindings_removed"] += len(plan.removes)
        if (
            self.config.offline_messages
            # an account's key is kept: a flood of new AORs gets no inboxes; under `enrolled` only users
            # the CA enrolled register at all, and their certificate covers the inbox (docs/security.md)
            and (account is not None or self.config.policy == "enrolled")
            and plan.writes
            and (arrived or time.time() - self._inbox_published.get(aor, 0.0) > INBOX_REPUBLISH)
        ):
            known = registered_before or self.users.inbox_path(aor).exists()
            self.core.spawn(self._open_inbox(aor, deliver=arrived, known=known))
        for w in plan.writes:
            self._event("registered", f"registered {aor} -> {w.binding.contact} for {w.lifetime} s")
        for r in plan.removes:
            self._event("unregistered", f"unregistered {aor} -> {r.binding.contact}")
        response = ok_response(request, plan, now, instances)
        if outbound and plan.writes:
            # RFC 5626 §6: the registrar supports outbound; §5.4: how often the phone must keep alive.
            response.add("Require", "outbound")
            response.add("Flow-Timer", str(self.config.flow_timer))
        grant = self._turn_grant(aor, source, now) if authenticated and plan.writes else None
        if grant is not None:
            response.add(TURN_HEADER, grant.header(now))
        return response

    def _turn_grant(self, aor: str, source: Source, now: float) -> TurnGrant | None:
        """Time-limited credentials for our TURN server, for a UA whose REGISTER passed digest auth
        (docs/nat.md, "Relayed candidates by default"; docs/security.md: an unauthenticated registrant
        would make the relay anyone's). None without a TURN server, or when it listens on a wildcard
        address and the SIP side does too (no address to name)."""
        if self.turn is None:
            return None
        host, port = self.turn.address
        if is_wildcard(host):
            host = self.stack.local_address("udp", toward=source.host)[0]
            if is_wildcard(host):
                return None
        username, password = issue_credentials(self.turn.core.secret, aor, now, TURN_CREDENTIAL_TTL)
        return TurnGrant(host, port, username, password, now + TURN_CREDENTIAL_TTL)

    # ------------------------------------------------------------------------ home peer: RFC 5626 flows

    @staticmethod
    def _outbound(request: Request, source: Source) -> bool:
        """RFC 5626 §5.2: the phone asks for outbound (a Contact with ``+sip.instance`` and ``reg-id``) and
        we are its first hop (one Via), so the flow it registered over is its own and it keeps it alive."""
        try:
            if len(request.via) != 1:
                return False
            return any(
                c.params.get("+sip.instance") and c.params.get("reg-id") is not None
                for c in request.contacts
                if not c.wildcard
            )
        except (ParseError, ValueError):
            return False

    @staticmethod
    def _behind_nat(request: Request, source: Source) -> bool:
        """A phone without outbound support whose Contact is not where its REGISTER came from (a private
        address behind a NAT, a ``.invalid`` host): reach it at the observed source instead (rport and
        received, RFC 3581), over the flow, and keep the NAT mapping open with NAT pings. A Contact on
        the source's own address (a phone on a public address, or a registration made on behalf of a
        contact by a tool on the same host) is reached as written."""
        try:
            contacts = [c for c in request.contacts if not c.wildcard]
        except (ParseError, ValueError):
            return False
        if len(request.get_all("Via")) != 1:
            return False  # not from the phone itself: the flow would lead to the proxy in between
        for contact in contacts:
            host = numeric_host(contact.uri.host)
            if host is None or host != source.host:
                return True
        return False

    def path_entry(self, source: Source, outbound: bool, flow: bool = True) -> str:
        """Our Path value for a binding registered over ``source``: ``<sip:TOKEN@us;lr[;ob]>`` when the
        phone is reached over that flow (RFC 3327, RFC 5626 §5.2), else ``<sip:us;lr>`` (the binding
        still goes through its home peer), at the SIP address other peers reach us on."""
        transport = "udp" if self.stack.transport.listens_on("udp") else source.transport
        token = self.flows.token_of(source.transport, source.host, source.port) if flow else None
        uri = self.stack.local_uri(transport, user=token, toward=source.host)
        uri.params["lr"] = None
        if outbound:
            uri.params["ob"] = None
        entry = f"<{uri}>"
        # One string per flow and kind, not one per REGISTER: every binding stored keeps its Path (bounded:
        # a full table starts again)
        shared = self._path_entries.get(entry)
        if shared is None:
            if len(self._path_entries) >= 4096:
                self._path_entries.clear()
            shared = self._path_entries[entry] = entry
        return shared

    def _bind_flows(self, plan: Any, source: Source, outbound: bool) -> None:
        """Tie every binding written to the flow its REGISTER came over; forget removed ones (a client
        peer always does: its phones are reached only through it)."""
        if not self.config.home_routing and self.client_link is None:
            return
        now = self.stack.loop.time()
        handle = source.connection if source.transport in RELIABLE else None
        for w in plan.writes:
            b = w.binding
            try:
                self.flows.bind(
                    source.transport, source.host, source.port, now, aor=b.aor, entry_id=b.entry_id,
                    handle=handle, instance=b.instance, reg_id=b.reg_id, outbound=outbound, contact=b.contact,
                )  # fmt: skip
            except OverflowError as exc:
                log.warning("cannot keep the flow of %s: %s", b.aor, exc)
        for r in plan.removes:
            self.flows.unbind(r.binding.aor, r.binding.entry_id)

    def mark_sole_home(self, request: Request) -> None:
        """``request`` came to us as the sole home peer of its AOR: locate it from :meth:`homed_bindings`."""
        if len(self._sole) >= 4096:  # requests rejected before they were located: never kept for long
            self._sole.clear()
        self._sole.add(_request_key(request))

    def is_sole_home(self, request: Request) -> bool:
        return _request_key(request) in self._sole

    def homed_bindings(self, aor: str) -> list[Binding]:
        """The live bindings of ``aor`` this peer registered itself (expired ones are forgotten here)."""
        if aor not in self.home:
            return []
        now = time.time()
        return live_targets(self.home.live(aor, now), now)

    def _flow_failed(self, failed: Failed) -> None:
        """A flow died (connection closed, keep-alives or NAT pings stopped): its bindings go (§5.3). A
        client peer's flow holds no binding in the DHT: the client peer is forgotten here."""
        self.counters["flows_failed"] += 1
        self._event("flow", f"flow {failed.flow.describe()} failed: {failed.why}")
        bindings = []
        for aor, entry_id in failed.bindings:
            node_id = client_node_of(aor)
            if node_id is None:
                bindings.append((aor, entry_id))
            else:
                self.clients.pop(node_id, None)
        if bindings and not self._closed:
            self.core.spawn(self._remove_bindings(bindings, failed.why))

    # ------------------------------------------------------------ client peers (p2psip.clientpeer)

    async def _register_client(self, request: Request, source: Source, node_id: int) -> Response:
        """Attach-peer side: a client peer attached to us in the overlay registers its SIP flow. The flow
        is bound (kept alive by the client's STUN keep-alives), nothing is stored in the DHT, and the 200
        tells the client its Path entry (with the flow token) and Service-Route (RFC 3327, 3608, 5626)."""
        self.counters["client_registers"] += 1
        node = self._chord
        where = node.attached_client(node_id) if node is not None and node.attach is None else None
        if where is None or where[0] != source.host:
            self.counters["client_registers_refused"] += 1
            return Response.for_request(request, 403, "Forbidden (not a client peer attached here)")
        try:
            contacts = [c for c in request.contacts if not c.wildcard]
            expires_text = request.get("Expires")
            if len(contacts) != 1:
                raise ValueError("one Contact")
            contact = contacts[0]
            raw = contact.params.get("expires") or expires_text
            expires = int(raw) if raw is not None else REGISTER_EXPIRES
        except (ParseError, ValueError):
            return Response.for_request(request, 400, "Bad Request (a client peer registers one Contact)")
        aor, entry_id = client_aor(node_id), f"{node_id:032x}".encode()
        if expires <= 0:
            self.flows.unbind(aor, entry_id)
            self.clients.pop(node_id, None)
            return Response.for_request(request, 200)
        expires = max(self.policy.min_expires, min(expires, self.policy.max_expires))
        now = self.stack.loop.time()
        try:
            self.flows.bind(
                source.transport, source.host, source.port, now, aor=aor, entry_id=entry_id,
                handle=source.connection if source.transport in RELIABLE else None,
                instance=contact.params.get("+sip.instance"), reg_id=1, outbound=True,
                contact=str(contact.uri),
            )  # fmt: skip
        except OverflowError:
            return Response.for_request(request, 503, "Service Unavailable (too many flows)")
        path = self.path_entry(source, outbound=True)
        self.clients[node_id] = {
            "node": f"{node_id:032x}",
            "sip": format_hostport(source.host, source.port),
            "since": round(time.time(), 1),
        }
        self._event("client", f"client peer {ids.short(node_id)} keeps its SIP flow from "
                    f"{format_hostport(source.host, source.port)} here")  # fmt: skip
        response = Response.for_request(request, 200)
        response.add("Contact", f"<{contact.uri}>;expires={expires}")
        response.add("Path", path)
        response.add("Service-Route", path)
        response.add("Require", "outbound")
        response.add("Supported", "path, outbound")
        response.add("Flow-Timer", str(self.config.flow_timer))
        return response

    async def _keep_client_flow(self) -> None:
        """Client-peer side: keep the SIP flow to the attach peer (REGISTER, STUN keep-alives, again on a
        failure or a new attach peer), and move the phones' bindings to a new Path when it changes."""
        link = self.client_link
        assert link is not None
        loop = asyncio.get_running_loop()
        while not self._closed:
            attach = self.node.attach
            if attach is not None:
                link.attached(attach.peer, attach.service, loop.time())
            for action in link.due(loop.time()):
                if action == REGISTER:
                    link.sending(loop.time())
                    await self._register_at_attach_peer(link)
                elif action == KEEPALIVE:
                    self.core.spawn(self._client_keepalive(link))
            await asyncio.sleep(min(0.5, max(0.05, link.next_check(loop.time()) - loop.time())))

    async def _register_at_attach_peer(self, link: ClientLink, *, expires: int = REGISTER_EXPIRES) -> None:
        """REGISTER our flow at the attach peer (``expires=0``: un-REGISTER it, on a graceful stop)."""
        assert link.service is not None
        host, port = link.service
        node_id = self.node.node_id
        aor = client_aor(node_id)
        here = self.stack.local_uri("udp", toward=host)
        here.params["ob"] = None
        self._client_cseq += 1
        request = Request.create(
            "REGISTER", f"sip:{bracket(host)}:{port}", from_=f"<{aor}>", to=f"<{aor}>",
            call_id=self._client_call_id, cseq=self._client_cseq,
            headers=[
                ("Contact", f'<{here}>;+sip.instance="{client_instance(node_id)}";reg-id=1'),
                ("Expires", str(expires)),
                ("Supported", "path, outbound"),
            ],
        )  # fmt: skip
        context = ClientRegistration(self.stack.loop.create_future())
        loop = self.stack.loop
        try:
            tx = self.stack.send_request(request, Target("udp", host, port))
        except (TransportError, ParseError) as exc:
            link.failed(loop.time(), f"cannot send the REGISTER: {exc}")
            return
        tx.context = context
        try:
            outcome = await asyncio.wait_for(context.final, 40.0)
        except TimeoutError:
            outcome = "no answer"
        if link.service != (host, port):
            return  # the overlay moved to another attach peer meanwhile: this answer is about the old one
        if expires == 0:
            if not isinstance(outcome, str) and outcome.status < 300:
                link.path = None  # the flow is no more: nothing is reached through it
                self._event("client", f"client peer flow to {host}:{port} un-REGISTERed")
            return
        if isinstance(outcome, str) or outcome.status >= 300:
            why = outcome if isinstance(outcome, str) else f"{outcome.status} {outcome.reason}"
            link.failed(loop.time(), f"REGISTER at the attach peer {host}:{port}: {why}")
            self._event("client", f"client peer flow to {host}:{port} not made: {why}")
            return
        path = outcome.get("Path")
        if path is None:
            link.failed(loop.time(), "the attach peer's 200 named no Path")
            return
        timer = outcome.get("Flow-Timer") or ""
        via = outcome.top_via
        mapped = None
        if via is not None and via.received and isinstance(via.rport, int) and via.rport is not True:
            mapped = (via.received, via.rport)
        if link.registered(
            loop.time(), path, flow_timer=int(timer) if timer.isdigit() else None,
            expires=REGISTER_EXPIRES, mapped=mapped,
        ):  # fmt: skip
            self._event("client", f"client peer of {host}:{port}: its Path for our flow is {path}")
            await self._move_bindings(path)

    async def _client_keepalive(self, link: ClientLink) -> None:
        """One STUN binding request over the flow (RFC 5626 §4.4.1); its answer tells our mapping."""
        assert link.service is not None
        data, tid = stun_binding_request()
        answer: asyncio.Future[tuple[str, int] | None] = self.stack.loop.create_future()
        self._stun[tid] = answer
        try:
            self.stack.transport.send(data, Target("udp", *link.service))
            mapped = await asyncio.wait_for(answer, min(10.0, link.flow_timer / 2))
        except (TimeoutError, TransportError):
            mapped = None
        finally:
            self._stun.pop(tid, None)
        now = self.stack.loop.time()
        if mapped is None:
            link.keepalive_missed(now)
        else:
            link.keepalive_answered(now, mapped)

    def _on_stun(self, data: bytes, host: str, port: int) -> None:
        for tid, answer in list(self._stun.items()):
            mapped = stun_mapped_address(data, tid)
            if mapped is not None and not answer.done():
                answer.set_result(mapped)

    async def _move_bindings(self, path: str) -> None:
        """The client peer's Path changed (a new attach peer, a new NAT mapping): store its phones'
        bindings again with it, so calls reach them through the new attach peer."""
        now = time.time()
        for aor, homed in self.home.items():
            for binding in homed:
                entry_id = binding.entry_id
                if not binding.alive(now) or not binding.path or binding.path[0] == path:
                    continue
                moved = dataclasses.replace(binding, path=(path, *binding.path[1:]))
                async with self._lock(aor):
                    try:
                        await self.directory.at(aor).put(
                            encode_binding(moved), entry_id=entry_id, lifetime=max(1, moved.remaining(now)),
                            key=self.users.get(aor),
                        )  # fmt: skip
                    except (OverlayError, TimeoutError) as exc:
                        self.counters["overlay_errors"] += 1
                        self._unsure_of(aor, now + self.policy.max_expires)  # the move may have landed
                        log.warning("cannot move %s's binding to the new attach peer: %s", aor, exc)
                        continue
                    finally:
                        self.cache.forget(aor)
                self.home.update(aor, [moved])
                self.counters["client_bindings_moved"] += 1

    # ---------------------------------------------------------------------- offline messages (inbox)

    # ------------------------------------------------------------- presence state (signed DHT entries)

    async def _save_presence(self, aor: str, items: list[Published]) -> None:
        """The agent's published state of ``aor`` as one entry beside its bindings (entry id
        :data:`PRESENCE_ENTRY`, signed by the user key, living as long as the longest publication);
        none left: the entry is removed. Only a peer holding the user key writes it."""
        if not self.users.exists(aor):
            return
        key = self.users.get(aor)
        access = self.directory.at(aor)
        now = self.stack.loop.time()
        if not items:
            await access.remove(entry_id=PRESENCE_ENTRY, key=key)
            return
        lifetime = max(1, math.ceil(max(p.expires_at for p in items) - now))
        value = encode_state(items, time.time() - now)
        await access.put(value, entry_id=PRESENCE_ENTRY, lifetime=lifetime, key=key)

    async def _load_presence(self, aor: str) -> list[Published]:
        """What an earlier agent of ``aor`` saved (:meth:`_save_presence`)."""
        for entry in await self.directory.at(aor).get():
            if entry.entry_id == PRESENCE_ENTRY:
                return decode_state(entry.value, time.time() - self.stack.loop.time())
        return []

    async def leave_in_inbox(self, aor: str, request: Request, source: Source) -> bool:
        """Seal ``request`` (a MESSAGE for ``aor``, nobody registered) to the AOR's published inbox key and
        drop it in its inbox (:mod:`p2psip.inbox`), signed by this peer's node key, noting whether this
        peer vouches for its sender. False when the AOR has no inbox or the drop fails (on OpenDHT: also
        when this peer has no node certificate, since readers keep drops of enrolled writers only)."""
        # the sender is who its From says only if we vouch for it (a device of ours), or a peer did
        voucher = f"{self._node_key.node_id:032x}" if await self._vouched(request, source) else ""
        access = self.directory.at(inbox_name(aor))
        try:
            entries = await access.get()
            published = next((e for e in entries if e.entry_id == INBOX_KEY_ID and len(e.value) == 32), None)
            if published is None:
                return False
            letter = Letter(
                request.get("From") or "", aor, request.get("Content-Type") or "text/plain",
                request.body, time.time(), voucher,
            )  # fmt: skip
            box = letter.seal(published.value)
            entry_id = DROP_PREFIX + self._node_key.public_key + secrets.token_bytes(8)
            await access.put(box, entry_id=entry_id, lifetime=INBOX_LIFETIME)
        except (OverlayError, TimeoutError, LetterError, SealedBoxError) as exc:
            log.info("MESSAGE for %s not stored: %s", aor, exc)
            return False
        self.counters["messages_stored"] += 1
        self._event("stored", f"MESSAGE for {aor} stored in its inbox (nobody registered)")
        return True

    async def _open_inbox(self, aor: str, *, deliver: bool, known: bool) -> None:
        """After a registration here: (re)publish the AOR's inbox key, signed by its user key; with
        ``deliver`` (a new device arrived), hand each stored message sealed to our key to the AOR as a
        MESSAGE through this peer and remove it once a device took it (2xx).
        ``known``: the AOR was registered here before (else this peer never published its inbox key, so no
        letter can be sealed to it yet: nothing to read, which saves a replica-set read per new AOR)."""
        try:
            private = self.users.inbox_key(aor)
        except (LetterError, OSError) as exc:
            log.warning("no inbox for %s: %s", aor, exc)
            return
        user_key = self.users.get(aor)
        access = self.directory.at(inbox_name(aor))
        try:
            await access.put(
                public_bytes(private), entry_id=INBOX_KEY_ID, lifetime=INBOX_LIFETIME, key=user_key
            )
            self._inbox_published[aor] = time.time()
            if len(self._inbox_published) > 4096:
                del self._inbox_published[next(iter(self._inbox_published))]
            if not deliver or not known:
                return
            drops = [e for e in await access.get() if e.entry_id[:1] == DROP_PREFIX and e.value]
        except (OverlayError, TimeoutError) as exc:
            log.info("inbox of %s not published/read: %s", aor, exc)
            return
        for drop in sorted(drops, key=lambda e: e.seq):
            try:
                letter = open_letter(private, drop.value)
            except LetterError:
                continue  # sealed to another home peer's key, or garbage a writer left
            voucher = letter.vouched_by if await self._vouch_holds(letter, drop) else None
            if await self._deliver(aor, letter, voucher) >= 300:
                return  # nobody took it: it stays for the next registration
            self.counters["messages_delivered"] += 1
            try:
                await self._remove_drop(access, drop, user_key, aor)
            except (OverlayError, TimeoutError) as exc:
                log.info("stored message for %s delivered but not removed: %s", aor, exc)

    def _user_cert_blob(self, aor: str) -> bytes:
        """The packed user certificate an entry of ``aor`` (or of its inbox) carries under the ``enrolled``
        policy; nothing under ``first-claim``."""
        if self.config.policy != "enrolled":
            return b""
        cert = self.users.certificate(aor)
        return cert.to_bytes() if cert is not None else b""

    async def _remove_drop(self, access: KeyDirectory, drop: Entry, user_key: KeyPair, aor: str) -> None:
        """Remove a delivered drop with the user key (the inbox's owner). Its seq must beat the drop's,
        written on another peer's clock: our Chord node writes the signed removal as it is; the OpenDHT
        engine goes above the seq it read (and keeps the tombstone as long as the drop's writer re-puts)."""
        if self._chord is None:
            await access.remove(entry_id=drop.entry_id, key=user_key)
            return
        removal = Entry.create(
            user_key, drop.key, drop.entry_id, b"", max(time.time_ns() // 1_000_000, drop.seq + 1), 0,
            self._user_cert_blob(aor),
        )  # fmt: skip
        await self._chord.put_entry(removal)

    @property
    def _node_key(self) -> KeyPair:
        """This peer's node key (``node.key`` in its data dir), on either engine."""
        if self._chord is not None:
            return self._chord.identity
        assert isinstance(self.engine, OpenDhtDirectory) and self.engine.identity is not None
        return self.engine.identity

    async def _vouch_holds(self, letter: Letter, drop: Entry) -> bool:
        """Whether the peer a letter says vouched for its sender did: it signed the drop, and it is a ring
        member (a lookup of its NodeId finds it; one that left since cannot be told from a made-up key), or
        on OpenDHT an enrolled node (the drop carries its node certificate)."""
        if not letter.vouched_by:
            return False
        node_id = node_id_of(drop.owner)
        if letter.vouched_by != f"{node_id:032x}":
            return False
        return await self._enrolled_or_member(node_id, drop.cert)

    async def _enrolled_or_member(self, node_id: int, node_cert: bytes) -> bool:
        """Whether a node key vouches in this overlay: on Chord its NodeId is a ring member; on OpenDHT,
        which has no ring, ``node_cert`` is a node certificate of our authority for it."""
        if isinstance(self.engine, OpenDhtDirectory):
            ca, cache = self.engine.ca_public_key, self.engine.cache
            return node_cert_problem(ca, node_cert, node_id, time.time(), cache) is None
        return await self._ring_member(node_id)

    async def _ring_member(self, node_id: int) -> bool:
        """Whether ``node_id`` is a member of the ring now: a lookup of it finds that very node."""
        if node_id == self.node.identity.node_id:
            return True
        try:
            member, _hops = await self.node.lookup(node_id)
        except (OverlayError, TimeoutError):
            return False
        return member.id == node_id

    async def _deliver(self, aor: str, letter: Letter, voucher: str | None) -> int:
        """Send a stored message to ``aor`` through this peer's own proxy, its sender marked as vouched for
        by ``voucher`` or unverified (:func:`p2psip.inbox.mark_sender`); its final status."""
        try:
            sender = Address(letter.from_)
        except ParseError:
            sender = Address("<sip:unknown@invalid>")
        sender, how = mark_sender(sender, voucher)
        request = Request.create(
            "MESSAGE",
            URI(aor),
            from_=sender,
            to=Address.build(URI(aor)),
            body=letter.body,
            content_type=letter.content_type,
            headers=[("Date", formatdate(letter.date, usegmt=True)), (SENDER_HEADER, how)],
        )
        host, port = self.sip_address()
        context = InboxDelivery(self.stack.loop.create_future())
        try:
            tx = self.stack.send_request(request, Target("udp", host, port))
        except (TransportError, ParseError) as exc:
            log.info("stored message for %s not sent: %s", aor, exc)
            return 503
        tx.context = context
        try:
            return await asyncio.wait_for(context.final, INBOX_DELIVERY_TIMEOUT)
        except TimeoutError:
            return 408

    async def _remove_bindings(self, bindings: Iterable[tuple[str, bytes]], why: str) -> None:
        for aor, entry_id in bindings:
            async with self._lock(aor):
                if self.flows.flow_of(aor, entry_id) is not None:
                    continue  # re-registered over another flow meanwhile: keep it
                try:
                    await self.directory.remove(aor, entry_id=entry_id, key=self.users.get(aor))
                except (OverlayError, TimeoutError) as exc:
                    self.counters["overlay_errors"] += 1
                    self._unsure_of(aor, time.time() + self.policy.max_expires)  # it may still be there
                    log.warning("cannot remove %s's binding after its flow failed: %s", aor, exc)
                    continue
                finally:
                    self.cache.forget(aor)
                    self.home.update(aor, drop=[entry_id])
            self.counters["bindings_removed"] += 1
            self._event("unregistered", f"unregistered {aor} ({entry_id.decode(errors='replace')}): {why}")

    async def _watch_flows(self) -> None:
        """The flow table's clock: NAT pings and failed flows, about once a second (sans-IO core)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for action in self.flows.due(now):
                if isinstance(action, Ping):
                    self._nat_ping(action.flow)
                else:
                    self._flow_failed(action)
            await asyncio.sleep(max(0.05, self.flows.next_check(loop.time()) - loop.time()))

    def _nat_ping(self, flow: Flow) -> None:
        """Keep a NAT mapping open (Kamailio nathelper style): an OPTIONS over a UDP flow, whose answer
        tells the flow is alive; a CRLF keep-alive on a stream (its closing tells it is not)."""
        self.counters["nat_pings"] += 1
        target = Target(flow.transport, flow.host, flow.port)
        if flow.transport in ("ws", "wss"):
            # The WebSocket layer pings its connections itself; its closing fails the flow.
            self.flows.touch(flow.transport, flow.host, flow.port, self.stack.loop.time())
            return
        if flow.stream:
            try:
                self.stack.transport.send(b"\r\n\r\n", target)
            except Exception as exc:
                log.info("NAT ping to %s failed: %s", target, exc)
            else:
                self.flows.touch(flow.transport, flow.host, flow.port, self.stack.loop.time())
            return
        uri = flow.contact or f"sip:{bracket(flow.host)}:{flow.port}"
        here = self.stack.local_uri("udp", toward=flow.host)
        ping = Request.create(
            "OPTIONS", uri, from_=f"<sip:ping@{here.host}:{here.port}>", to=f"<{uri}>",
            headers=[("User-Agent", "p2psip NAT ping")],
        )  # fmt: skip
        self.stack.push_via(ping, target)
        self.stack.send_stateless(ping, target)

    async def _authenticate(
        self,
        request: Request,
        source: Source,
        aor: str,
        account: tuple[str, str, str] | None,
        now: float,
    ) -> Response | None:
        """Digest for ``aor``: None when the request carries ``aor``'s valid credentials, else the 401 to
        send. Failures cost the (source, AOR) pair a growing delay, are logged and counted; a correct
        credential from any other source is never slowed."""
        realm = account[2] if account is not None else self.config.realm
        digest = self._digest_for(realm)
        wait = self.throttle.delay(source.host, aor, now)
        if wait > 0:
            if self._delayed >= MAX_DELAYED_AUTH:
                # Guessers that do not wait for answers must not pile up sleeping tasks: past the bound,
                # refuse without checking the credential (so this answer tells nothing either).
                response = Response.for_request(request, 503, "Service Unavailable (too many attempts)")
                response.add("Retry-After", str(int(wait) + 1))
                return response
            self.counters["auth_delayed"] += 1
            self._delayed += 1
            try:
                await asyncio.sleep(wait)
            finally:
                self._delayed -= 1
            now = time.time()
        self._checking = account
        try:
            result, challenge = digest.check(request, now)
        finally:
            self._checking = None
        if challenge is None and account is not None and result.username == account[0]:
            self.throttle.succeeded(source.host, aor)
            return None
        if request.get("Authorization") is not None:
            count = self.throttle.failed(source.host, aor, now)
            self.counters["auth_failures"] += 1
            log.warning("digest failure %d for %s from %s", count, aor, source.host)
            self._event("auth-failed", f"REGISTER {aor} from {source.host}: wrong credentials ({count})")
        return challenge if challenge is not None else digest.challenge(request, now)

    def _may_create(self, host: str) -> bool:
        """A REGISTER for an AOR this peer has no key for creates one: bounded per source and in all."""
        mono = asyncio.get_running_loop().time()
        return self.new_aors.allow(host, mono) and self.new_aors_total.allow("*", mono)

    def _record_claim(
        self, aor: str, claim: Claim | None, plan: RegisterPlan, instances: list[str], flow: str, now: float
    ) -> Claim:
        """Trust on first use: the first device to register an AOR claims it; every write extends the claim
        to the last expiry of what this peer wrote (an account's record only keeps its expiry). Returns
        the claim to save."""
        until = max([b.expires_at for b in plan.bindings if b.alive(now)], default=now)
        if claim is None or not claim.alive(now):
            claim = Claim(aor, instance=instances[0] if instances else None, flow=flow, created=now)
        elif not claim.explicit:  # the owner's device, perhaps from a new address: follow it
            claim.flow = flow
            if claim.instance is None and instances:
                claim.instance = instances[0]
        claim.until = until
        return claim

    async def _save_claim(self, claim: Claim) -> None:
        """Commit ``claim`` (with the others of this loop iteration) before the REGISTER is answered."""
        committed = self.users.commit_claim(claim)
        try:
            await asyncio.shield(committed)
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot save the claim of %s: %s", claim.aor, exc)

    def sweep_user_keys(self, now: float | None = None) -> int:
        """Forget the user keys (and claims) of AORs that own nothing any more: the last binding written
        through this peer expired or was removed. Kept: accounts (``p2psip user add``, the config's
        ``[users]``), enrolled users (``p2psip enroll user``), AORs being registered right now, and keys
        some part of the peer still serves (:attr:`key_users`). Keys without a claim record (made before
        claims existed) are left alone.
        Returns how many were removed."""
        now = time.time() if now is None else now
        removed = 0
        for claim in self.users.claims():
            aor = claim.aor
            if claim.alive(now) or self.config.account_for(aor) is not None or aor in self._aor_locks:
                continue
            if self.users.certificate(aor) is not None:  # enrolled: the certificate binds this very key
                continue
            if any(user(aor) for user in self.key_users):
                continue
            self.users.forget(aor)
            removed += 1
        self.throttle.expire(now)
        self._unsure = {aor: until for aor, until in self._unsure.items() if until > now}
        self._home_registrations()  # drops the expired ones
        self.counters["user_keys_removed"] += removed
        return removed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.key_sweep_interval)
            try:
                self.sweep_user_keys()
            except Exception:  # a sweep failing once must not end the sweeping
                log.exception("user key sweep failed")

    def _unavailable(self, request: Request, exc: BaseException) -> Response:
        response = Response.for_request(request, 503, f"Service Unavailable (overlay: {exc or 'timeout'})")
        response.add("Retry-After", "5")
        return response

    # -------------------------------------------------------------------------------------- location

    async def lookup_bindings(self, aor: str) -> list[Binding]:
        """The live bindings of ``aor``, through the cache (which never outlives a binding)."""
        now = time.time()
        cached = self.cache.get(aor, now)
        if cached is not None:
            self.counters["lookup_cache_hits"] += 1
            return cached
        self.counters["lookups"] += 1
        bindings = await self.fetch_bindings(aor)
        self.cache.put(aor, bindings, time.time())
        return live_targets(bindings, time.time())

    def locate(self, request: Request) -> Targets | Awaitable[Targets]:
        """The proxy's location hook: where ``request`` goes (see the module docstring).

        Synchronous whenever no DHT lookup is needed (IP literals, static routes, cache hits); a coroutine
        otherwise (the proxy awaits it for every method).
        """
        uri = request.uri
        decision = decide(uri, routes=self._routes(), is_local=self.stack.is_local)
        if isinstance(decision, ForwardAsAddressed):
            return [uri]
        if isinstance(decision, StaticRoute):
            request.add("Route", f"<sip:{bracket(decision.host)}:{decision.port};lr>", first=True)
            self._event("routed", f"{request.method} {uri} -> static route {decision.host}:{decision.port}")
            return [uri]
        assert isinstance(decision, OverlayLookup)
        link = self.client_link
        if link is not None:
            # A client peer routes nothing itself (RFC 6940 client): its phones' requests go to its attach
            # peer over the client's flow (the Service-Route, RFC 3608), which looks the AOR up.
            if request.method == "MESSAGE" and request.get(SENDER_HEADER) is not None:
                # a stored message this client peer delivers itself (_deliver: nobody else writes that
                # mark here) goes straight to the phones it registered, over their flows: the attach peer
                # would drop the mark, as from any peer that does not deliver it itself
                homed = [dataclasses.replace(b, path=b.path[1:]) for b in self.homed_bindings(decision.aor)]
                if homed:
                    return self._targets(request, decision.aor, homed)
            if link.path is None:
                raise SIPStatusError(503, detail="this client peer is not attached to a full peer yet")
            self.counters["routed"] += 1
            self._event("routed", f"{request.method} {uri} -> the attach peer {link.service}")
            return [RoutedTarget(uri, (link.path,))]
        sole = _request_key(request)
        if sole in self._sole:
            self._sole.discard(sole)
            homed = self.homed_bindings(decision.aor)
            if homed:
                self.counters["home_lookups_saved"] += 1
                return self._targets(request, decision.aor, homed)
        cached = self.cache.get(decision.aor, time.time())
        if cached is not None:
            self.counters["lookup_cache_hits"] += 1
            return self._targets(request, decision.aor, cached)
        return self._locate_in_overlay(request, decision.aor)

    async def _locate_in_overlay(self, request: Request, aor: str) -> Targets:
        try:
            bindings = await self.lookup_bindings(aor)
        except (OverlayError, TimeoutError) as exc:
            self.counters["overlay_errors"] += 1
            raise SIPStatusError(404, detail=f"overlay lookup failed: {exc}") from None
        uri = request.uri
        if not bindings and self.config.dns and not is_ip_literal(uri.host):
            hop = await _resolve(uri.host, uri.port)
            if hop is not None:
                request.add("Route", f"<sip:{bracket(hop[0])}:{hop[1]};lr>", first=True)
                self._event("routed", f"{request.method} {uri} -> DNS {hop[0]}:{hop[1]}")
                return [uri]
        return self._targets(request, aor, bindings)

    def _targets(self, request: Request, aor: str, bindings: list[Binding]) -> Targets:
        if not bindings:
            self.counters["not_found"] += 1
            self._event("failed", f"{request.method} {aor}: nobody is registered (404)")
            raise SIPStatusError(404, detail=f"nobody is registered as {aor}")
        targets: Targets = []
        home_routing = self.config.home_routing
        ordered = by_preference(bindings)
        if home_routing:
            home = self._primary_home(ordered)
            if home is not None:
                # Not a home peer of this AOR: hand the request (Request-URI unchanged) to the home peer
                # of its best binding, which runs the user's scripts and forks to every binding.
                self.counters["routed"] += 1
                self.counters["routed_to_home"] += 1
                if self.on_event is not None:  # formatted only for a listener (this runs for every call)
                    self._event("routed", f"{request.method} {aor} -> its home peer {home}")
                return [RoutedTarget(request.uri, (home,))]
        for uri, route, q in branches(ordered, home_routing=home_routing):
            if route is not None:
                targets.append(RoutedTarget(uri, route, q))
                continue
            target = Address.build(uri)
            if q is not None:
                target.params["q"] = f"{q:g}"
            targets.append(target)
        self.counters["routed"] += 1
        if self.on_event is not None:
            contacts = ", ".join(b.contact for b in bindings)
            self._event("routed", f"{request.method} {aor} -> {contacts}")
        return targets

    def _primary_home(self, ordered: list[Binding]) -> str | None:
        """The Route to the home peer of the best binding with a Path, when this peer is not itself a home
        peer of any binding (None otherwise: deliver from here). Every peer orders the bindings the same
        way, so the peers agree on which home peer runs the scripts.

        Memoised by the bindings' first Path hops (bounded): it depends on nothing else, and an entry peer
        asks for every call to the same AORs (a parse of each hop and a new Route value each time)."""
        key = tuple([b.path[0] if b.path else "" for b in ordered])
        cached = self._homes.get(key, "")
        if cached != "":
            return cached
        home = primary_home(ordered, self.stack.is_local)
        if len(self._homes) >= 1024:
            self._homes.clear()
        self._homes[key] = home
        return home

    async def vouches_here(self, request: Request, source: Source) -> bool:
        """Whether this peer vouches for a request's From: it came from a device registered here for that
        AOR (over the flow of one of its bindings, or from a binding's contact address when the phone is
        reached directly)."""
        try:
            claimed = request.from_.uri.aor()
        except (ParseError, ValueError):
            return False
        flow = self.flows.get(source.transport, source.host, source.port)
        if flow is not None and any(aor == claimed for aor, _entry in flow.bindings):
            return True
        if flow is not None and self._client_vouches(request, flow.bindings):
            return True
        try:
            bindings = await self.lookup_bindings(claimed)
        except (OverlayError, TimeoutError):
            return False
        # a client peer is not its phones' first Path hop (its attach peer is), but it registered them
        mine = {b.entry_id for b in self.home.get(claimed)} if self.client_link is not None else set()
        for b in bindings:
            with contextlib.suppress(ParseError):
                contact = URI(b.contact)
                here = (contact.host, contact.port or 5060) == (source.host, source.port)
                if here and (b.entry_id in mine or self.is_home_of([b])):
                    return True
        return False

    def vouch(self, request: Request) -> str:
        """An identity assertion for the request's From, signed with this peer's node key (the value of
        ``P-P2PSIP-Vouch``): ``<aor>;ts=T;key=K;sig=S``, the signature over the AOR, Call-ID, From tag and
        time, so it vouches for this one request (dialog) only. On OpenDHT there is no ring to confirm the
        key's NodeId: the node certificate (``p2psip enroll node``) rides along as ``;cert=C``."""
        aor = request.from_.uri.aor()
        ts = int(time.time())
        identity = self._node_key
        sig = identity.sign(_vouch_data(aor, request.call_id, request.from_.tag or "", ts))
        value = f"<{aor}>;ts={ts};key={_b64(identity.public_key)};sig={_b64(sig)}"
        if isinstance(self.engine, OpenDhtDirectory) and self.engine.node_certificate:
            value += f";cert={_b64(self.engine.node_certificate)}"
        return value

    def _client_vouches(self, request: Request, flow_bindings: Iterable[tuple[str, bytes]]) -> bool:
        """Attach-peer side: ``request`` came over the SIP flow of a client peer attached here (one of
        ``flow_bindings`` is its client AOR) and carries that very client peer's vouch for its From. Nobody
        else can check a client peer's vouch (it is in no ring: a lookup of its NodeId finds another
        node), so its attach peer, which knows it, vouches in its place (docs/nat.md, Client peers)."""
        clients = {n for aor, _entry in flow_bindings if (n := client_node_of(aor)) is not None}
        if not clients:
            return False
        signed = self._vouch_signer(request)
        return signed is not None and signed[0] in clients

    def _vouch_signer(self, request: Request) -> tuple[int, bytes] | None:
        """The NodeId (and node certificate, on OpenDHT) that signed the request's ``P-P2PSIP-Vouch`` for
        its From, when the vouch is fresh and its signature holds; None otherwise. Who that node is still
        has to be checked (:meth:`_enrolled_or_member`)."""
        value = request.get(VOUCH_HEADER)
        if value is None:
            return None
        try:
            address = Address(value)
            aor = address.uri.aor()
            ts = int(address.params.get("ts") or "")
            key = _unb64(address.params.get("key") or "")
            sig = _unb64(address.params.get("sig") or "")
            cert = _unb64(address.params.get("cert") or "")
            claimed = request.from_.uri.aor()
        except (ParseError, ValueError):
            return None
        if aor != claimed or abs(time.time() - ts) > VOUCH_WINDOW:
            return None
        if not verify(key, sig, _vouch_data(aor, request.call_id, request.from_.tag or "", ts)):
            return None
        return node_id_of(key), cert

    async def _vouched(self, request: Request, source: Source) -> bool:
        """Whether a presence watcher is who its From says: this peer vouches for it, or another peer of
        the overlay did (a ``P-P2PSIP-Vouch`` for this From, fresh, signed by a key whose NodeId is a ring
        member, which a lookup of that NodeId confirms; on OpenDHT, a key the vouch's node certificate
        enrolls under this overlay's authority)."""
        if await self.vouches_here(request, source):
            return True
        signed = self._vouch_signer(request)
        return signed is not None and await self._enrolled_or_member(*signed)

    def is_home_of(self, bindings: Iterable[Binding]) -> bool:
        """Whether this peer is the home peer (the first Path hop) of one of ``bindings``."""
        hops = (first_path_hop(b) for b in bindings)
        return any(uri is not None and self.stack.is_local(uri.host, uri.port) for uri in hops)

    def _routes(self) -> dict[str, tuple[str, int]]:
        return {domain: hp.as_tuple() for domain, hp in self.config.routes.items()}

    async def lookup(self, text: str) -> LookupResult:
        """``p2psip lookup``: the AOR's ring key, the node responsible, its replicas and the bindings."""
        try:
            aor = URI(text).aor()
        except ParseError as exc:
            raise P2PSIPError(f"{text!r} is not a SIP URI: {exc}") from None
        key = ids.key_for(aor)
        started = time.perf_counter()
        if self._chord is None:  # OpenDHT: one get (its lookup is internal: no hops, no holders to show)
            bindings = await self.fetch_bindings(aor)
            seconds = time.perf_counter() - started
            return LookupResult(aor, key, None, 0, [], bindings, seconds, engine="opendht")
        if self.client_link is not None:  # a client peer: its attach peer reads for it (relay_fetch)
            bindings = await self.fetch_bindings(aor)
            seconds = time.perf_counter() - started
            return LookupResult(aor, key, None, 0, [], bindings, seconds, engine="client")
        node, hops = await self.node.lookup(key)
        here = self.node.at(key)
        here.target = node
        bindings = await self.fetch_bindings(aor, here)
        seconds = time.perf_counter() - started
        holders = [tuple(node)] + await self._replicas_after(node)
        return LookupResult(aor, key, tuple(node), hops, holders, bindings, seconds)  # type: ignore[arg-type]

    async def _replicas_after(self, node: Any) -> list[tuple[int, str, int]]:
        """The replicas of a key: the responsible node's first r-1 successors. The successor of node n is
        the node responsible for key n+1, so each is one more lookup (no extra RPC type needed)."""
        found: list[tuple[int, str, int]] = []
        current = node
        for _ in range(self.config.replicas - 1):
            try:
                nxt, _hops = await self.node.lookup((current.id + 1) % ids.RING)
            except (OverlayError, TimeoutError):
                break
            if nxt.id == node.id or any(nxt.id == f[0] for f in found):
                break
            found.append((nxt.id, nxt.host, nxt.port))
            current = nxt
        return found

    async def lookup_path(self, aor: str) -> tuple[list[tuple[str, int]], int]:
        """The overlay endpoints this node queries to find ``aor``'s key, in order, and the hop count.

        ``Node.lookup(path=...)`` records the endpoints this node queries for the key (the lookup is
        iterative: this node asks every hop itself). For the demo and for diagnosis.
        """
        key = ids.key_for(aor)
        path: list[tuple[str, int]] = []
        responsible, hops = await self.node.lookup(key, path=path)
        if responsible.ep not in path:
            path.append(responsible.ep)
        return path, hops

    @staticmethod
    def key_of(aor: str) -> int:
        """The ring key of an AOR: the first 128 bits of SHA-256 of its canonical form."""
        return ids.key_for(aor)

    def holds(self, aor: str) -> tuple[bool, bool]:
        """(this peer stores entries of ``aor``, this peer is the key's primary)."""
        key = ids.key_for(aor)
        stored = bool(self.node.store.get(key, time.time()))
        core = self.node.core
        return stored, core is not None and core.is_responsible(key)

    # ---------------------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """``p2psip status``: the SIP side (flows, registrations, calls, counters) and the engine's part:
        ring neighbours, fingers and stored entries on Chord; the node, its bootstrap and how many nodes it
        knows on OpenDHT (``engine`` says which)."""
        counters: dict[str, Any] = {f"peer_{k}": v for k, v in self.counters.items()}
        for k, v in self.stack.stats.items():
            counters[f"sip_{k}"] = v
        for k, v in self.core.stats.items():
            counters[f"proxy_{k}"] = v
        if self.turn is not None:
            for k, v in self.turn.core.stats().items():  # every TURN refusal and drop (docs/nat.md)
                counters[f"turn_{k}"] = v
        common = {
            "overlay": self.overlay_address_text,
            "overlay_name": self.config.overlay_name,
            "sip": self.sip_addresses(),
            "uptime_s": round(time.time() - self.started, 1),
            "user_keys": self.users.known(),
            "cache_entries": len(self.cache),
            "home_routing": self.config.home_routing,
            "turn": format_hostport(*self.turn.address) if self.turn is not None else None,
            "flows": self.flows.snapshot(asyncio.get_running_loop().time()),
            "counters": counters,
            "registrations": self._home_registrations(),
            "calls": [{"call_id": cid, **call} for cid, call in sorted(self.core.calls.items())],
        }
        if self._chord is None:
            assert isinstance(self.engine, OpenDhtDirectory)
            dht = self.engine.stats()
            for k, v in dht["counts"].items():
                counters[f"opendht_{k}"] = v
            return {**common, "engine": "opendht", "node_id": dht["node_id"], "opendht": dht}
        ring = self._ring_status(self._chord)
        counters.update(ring.pop("overlay_counters"))
        return {**common, "engine": "chord", **ring}

    def _ring_status(self, node: Node) -> dict[str, Any]:
        """The Chord part of the status: neighbours, fingers, stored entries and who holds them."""
        core = node.core

        def ref(n: Any) -> dict[str, str]:
            return {"id": f"{n.id:032x}", "addr": format_hostport(n.host, n.port)}

        now = time.time()  # the overlay store runs on the wall clock
        by_key: dict[int, list[Any]] = {}
        remaining: dict[int, int] = {}  # key -> ms the longest-lived of its entries has left
        for entry, left in node.store.records(now):
            if not entry.is_removal:
                by_key.setdefault(entry.key, []).append(entry)
                remaining[entry.key] = max(remaining.get(entry.key, 0), int(left))
        # Who holds a key, as this peer sees the ring: the key's successor and the next replicas-1 nodes.
        known = {node.node_id: {"id": f"{node.node_id:032x}", "addr": self.overlay_address_text}}
        if core is not None:
            for n in [*core.successors, *core.fingers(), *([core.predecessor] if core.predecessor else [])]:
                known.setdefault(n.id, ref(n))

        def holders(key: int) -> list[str]:
            ring = sorted(known, key=lambda nid: (nid - key) % ids.RING)
            return [known[nid]["addr"] for nid in ring[: self.config.replicas]]

        stored = [
            {
                "key": f"{key:032x}",
                "name": self.names.get(key),
                "entries": len(entries),
                "owner": entries[0].owner.hex()[:16],
                "expires_in": remaining.get(key, 0) // 1000,
                "holders": holders(key),
            }
            for key, entries in sorted(by_key.items())
        ]
        node_stats = node.stats()
        overlay_counters = {f"overlay_{k}": v for k, v in node_stats.items() if isinstance(v, int)}
        return {
            "node_id": f"{node.node_id:032x}",
            # full or client peer, why (the probe at join), the address others reach it at
            "reach": node_stats.get("reach"),
            "predecessor": ref(core.predecessor) if core is not None and core.predecessor else None,
            "successors": [ref(n) for n in core.successors] if core is not None else [],
            "fingers": [ref(n) for n in core.fingers()] if core is not None else [],
            "stored": stored,
            "overlay_counters": overlay_counters,
            "hop_histogram": node_stats.get("hops", {}),
            # per neighbour: reads its answer lost (hid or served an older entry), wrong routing answers
            "disagreements": node_stats.get("disagreements", {}),
            "misroutes": node_stats.get("misroutes", {}),
            "overlay_limits": node_stats.get("limits", {}),
            # a client peer: whom it is attached to and why; a full peer: the client peers attached to it
            "client": self._client_status(node_stats),
            "clients": {"overlay": node_stats.get("clients", 0), "sip": list(self.clients.values())},
        }

    def _client_status(self, node_stats: dict[str, Any]) -> dict[str, Any] | None:
        link = self.client_link
        attach = self._chord.attach_peer() if self._chord is not None else None
        if link is None or attach is None:
            return None
        (host, port), node_id = attach
        reach = node_stats.get("reach") or {}
        return {
            "attached_to": format_hostport(host, port),
            "node": f"{node_id:032x}" if node_id is not None else None,
            "because": reach.get("reason", "configured as a client peer"),
            "sip_flow": link.as_dict(),
        }

    def _home_registrations(self) -> list[dict[str, Any]]:
        """The registrations this peer is home for, still alive (expired ones are dropped here)."""
        now = time.time()
        out = []
        for aor in sorted(self.home):
            for binding in self.home.live(aor, now):
                out.append({"aor": aor, "contact": binding.contact, "expires_in": binding.remaining(now)})
        return out

    async def control(self, request: dict[str, Any]) -> Any:
        """The control socket's handler: ``status`` and ``lookup``."""
        cmd = request.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "lookup":
            uri = request.get("uri")
            if not isinstance(uri, str):
                raise P2PSIPError('lookup needs "uri"')
            return (await self.lookup(uri)).as_dict(time.time())
        raise P2PSIPError(f"unknown command {cmd!r} (status, lookup)")


# ------------------------------------------------------------------------------------------- helpers


def _check_join_family(config: PeerConfig) -> None:
    """An overlay node speaks one address family: an IPv6 node cannot reach an IPv4 bootstrap (nor the
    reverse). Said at once, not after the join timeout."""
    assert config.join is not None
    try:
        ours = ipaddress.ip_address(config.overlay.host.strip("[]")).version
        theirs = ipaddress.ip_address(config.join.host.strip("[]")).version
    except ValueError:
        return
    if ours != theirs:
        raise ConfigError(
            f"--join {config.join} is IPv{theirs} but this peer's overlay address {config.overlay} is "
            f"IPv{ours}: a node reaches peers of its own family only (give --overlay an IPv{theirs} address)"
        )


async def _joining(
    starting: Awaitable[Node], join: tuple[str, int], shown: str, on_event: EventHandler | None
) -> Node:
    """Await the node's join, racing a probe of the bootstrap (a refusal ends it at once) and printing a
    ``joining`` line every few seconds while no answer comes."""
    task = asyncio.ensure_future(unless_refused(starting, join, payload=OVERLAY_PROBE))
    waited = 0.0
    while True:
        done, _ = await asyncio.wait({task}, timeout=JOIN_PROGRESS_EVERY)
        if done:
            return task.result()
        waited += JOIN_PROGRESS_EVERY
        if on_event is not None:
            on_event("joining", f"no answer from {shown} yet after {waited:.0f} s; still trying")


def _request_key(request: Request) -> tuple[int, str]:
    """Identifies one request object while it is being located (Call-ID guards against id() reuse)."""
    try:
        return (id(request), request.call_id)
    except ParseError:
        return (id(request), "")


async def _resolve(host: str, port: int | None) -> tuple[str, int] | None:
    """A/AAAA lookup for ``--dns`` (no SRV/NAPTR): the first address, or None."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port or 5060, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for _family, _type, _proto, _name, sockaddr in infos:
        return str(sockaddr[0]), int(sockaddr[1])
    return None


def _log_line(kind: str, text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {kind:<12} {text}", flush=True)


async def _watch_neighbours(peer: Peer, period: float = 1.0) -> None:
    """Log a line whenever this node's ring neighbours change (joins, leaves, failures around it)."""
    last: tuple[int | None, int | None] | None = None
    while True:
        core = peer._chord.core if peer._chord is not None else None
        if core is not None:
            pred = core.predecessor.id if core.predecessor else None
            succ = core.successors[0].id if core.successors else None
            if last is not None and (pred, succ) != last:
                shown = [ids.short(x) if x is not None else "none" for x in (pred, succ)]
                _log_line("ring", f"predecessor {shown[0]}, successor {shown[1]}")
            last = (pred, succ)
        await asyncio.sleep(period)  # a periodic check: the overlay raises no neighbour events


Extension = Callable[["Peer"], Callable[[], Awaitable[None]] | None]
"""Called once the peer runs (e.g. to install sipapi scripts); may return an async clean-up function."""


async def run_foreground(
    config: PeerConfig,
    *,
    ready: Callable[[Peer], None] | None = None,
    extension: Extension | None = None,
) -> int:
    """``p2psip start``: run a peer until SIGINT/SIGTERM, then leave gracefully. Returns the exit code.

    ``extension(peer)`` runs after the peer started (the CLI installs sipapi scripts with it, since the
    peer itself must not import sipapi); a ConfigError it raises stops the peer and propagates (exit 2).
    """
    if config.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    # The control socket first: it also refuses a second peer on the same data dir (same node identity)
    # before that one could join the ring.
    holder: list[Peer] = []

    async def handle(request: dict[str, Any]) -> Any:
        if not holder:
            raise P2PSIPError("the peer is still starting")
        return await holder[0].control(request)

    try:
        Path(config.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create data dir {config.data_dir}: {exc.strerror or exc}") from None
    server = control.ControlServer(config.data_dir, handle)
    try:
        await server.start()
    except (P2PSIPError, OSError) as exc:
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 1
    try:
        peer = await Peer.start(config, on_event=_log_line)
    except ConfigError:
        await server.close()
        raise
    except (P2PSIPError, OverlayError, OSError) as exc:
        await server.close()
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 1
    holder.append(peer)
    if config.verbose:
        SipTrace(peer.stack, SipTrace.printer(lambda text: print(text, file=sys.stderr, flush=True)))
        peer.dht_trace = lambda text: print(f"{stamp()} {text}\n", file=sys.stderr, flush=True)
    cleanup: Callable[[], Awaitable[None]] | None = None
    if extension is not None:
        try:
            cleanup = extension(peer)
        except BaseException:
            await server.close()
            await peer.close(leave=True)
            raise
    watcher: asyncio.Future[None] | None = None

    def started() -> None:
        nonlocal watcher
        _log_line("ready", f"control socket {server.path}")
        if ready is not None:
            ready(peer)
        watcher = asyncio.ensure_future(_watch_neighbours(peer))

    try:
        with busy_proxy_gc():  # a peer proxies every call of its users: the collector tuned as a proxy's
            await until_stopped(started)
        _log_line("stopping", "leaving the overlay")
    finally:
        if watcher is not None:
            watcher.cancel()
        await server.close()
        if cleanup is not None:
            with contextlib.suppress(Exception):
                await cleanup()
        await peer.close(leave=True)
    return 0


async def _start_chord(
    config: PeerConfig,
    join: tuple[str, int] | None,
    node_config: NodeConfig | None,
    on_event: EventHandler | None,
    data_dir: Path,
) -> Node:
    """Join (or create) our Chord overlay; a clear P2PSIPError/ConfigError when that cannot be done."""
    if join is not None:
        _check_join_family(config)
        if on_event is not None:
            on_event("joining", f"joining overlay {config.overlay_name!r} through {config.join}")
    starting = Node.start(
        bind=config.overlay.as_tuple(),
        join=join,
        data_dir=data_dir,
        overlay_name=config.overlay_name,
        replicas=config.replicas,
        config=_node_config(node_config, config),
        advertise=config.advertise.as_tuple() if config.advertise else None,
    )
    try:
        if join is None:
            node = await starting
        else:
            node = await _joining(starting, join, str(config.join), on_event)
    except WrongOverlay as exc:
        raise P2PSIPError(f"cannot join: {exc} (check --overlay-name)") from None
    except NotAdmitted as exc:
        raise P2PSIPError(f"not admitted: {exc} (p2psip enroll node gives a peer one)") from None
    except NotAFullPeer as exc:
        raise ConfigError(str(exc)) from None  # a wrong --join: exit 2 (docs/nat.md, Client peers)
    except DeadAddress:
        raise P2PSIPError(
            f"cannot join: nothing listens at {config.join} (connection refused; --join names the "
            f"overlay address of a running peer, its --overlay, e.g. 127.0.0.1:7060, not its SIP port)"
        ) from None
    except NotJoined as exc:
        detail = str(exc).strip().rstrip(":")
        raise P2PSIPError(
            f"{detail} (is a peer of that overlay running there? --join names its overlay address, "
            "e.g. 127.0.0.1:7060, not its SIP port)"
        ) from None
    except OverlayError as exc:
        raise ConfigError(f"overlay: {exc}") from None
    return node


async def _start_opendht(config: PeerConfig, join: tuple[str, int] | None) -> OpenDhtDirectory:
    """Run an OpenDHT node on the overlay address, bootstrapped from ``--join`` (``--dht opendht``)."""
    assert config.ca is not None  # load_config: --dht opendht needs --policy enrolled --ca FILE
    try:
        ca = load_public_key(config.ca)
    except OverlayError as exc:
        raise ConfigError(f"--ca: {exc}") from None
    cert_file = Path(config.data_dir) / NODE_CERT_FILE
    # the node key signs drops in inboxes; node.cert (p2psip enroll node) is what makes readers keep them
    node_cert = cert_file.read_bytes() if cert_file.exists() else b""
    try:
        return await OpenDhtDirectory.start(
            config.overlay.as_tuple(), ca, bootstrap=join, identity=node_identity(config.data_dir),
            node_certificate=node_cert,
        )  # fmt: skip
    except OverlayError as exc:
        raise ConfigError(f"overlay: {exc}") from None


def _node_config(node_config: NodeConfig | None, config: PeerConfig) -> NodeConfig | None:
    """The overlay node's config with the peer's ``overlay_limits`` applied over the node's defaults, and
    its access policy and admission (``--policy enrolled --ca FILE``, ``--enrolled-nodes``)."""
    base = node_config
    if config.overlay_limits:
        base = base or NodeConfig()
        base = dataclasses.replace(base, limits={**base.limits, **config.overlay_limits})
    if config.ca is not None and (config.policy == "enrolled" or config.enrolled_nodes):
        try:
            ca = load_public_key(config.ca)
        except OverlayError as exc:
            raise ConfigError(f"--ca: {exc}") from None
        base = dataclasses.replace(base or NodeConfig(), policy=config.policy, ca_public_key=ca)
        cert_file = Path(config.data_dir) / NODE_CERT_FILE
        if config.policy == "enrolled" and not config.enrolled_nodes:
            # not for admission: the node key's drops in inboxes carry it (replicas keep enrolled writers')
            with contextlib.suppress(OSError):
                base = dataclasses.replace(base, node_certificate=cert_file.read_bytes())
        if config.enrolled_nodes:
            try:
                cert = cert_file.read_bytes()
            except OSError:
                raise ConfigError(
                    f"--enrolled-nodes: no node certificate at {cert_file} (p2psip enroll node writes it)"
                ) from None
            base = dataclasses.replace(base, enrolled_nodes=True, node_certificate=cert)
    if base is None or base.write_quorum < PEER_WRITE_QUORUM:
        base = dataclasses.replace(base or NodeConfig(), write_quorum=PEER_WRITE_QUORUM)
    if config.client or config.client_peers != base.client_peers:
        # docs/nat.md: a peer nobody reaches joins as a client peer (client_peers), or one is forced
        base = dataclasses.replace(
            base, client=base.client or config.client, client_peers=config.client_peers or base.client_peers
        )
    return base
