"""Who a node or a user is: Ed25519 key pairs, NodeIds derived from them, and enrollment certificates.

A NodeId is the first 128 bits of SHA-256(public key), so a node cannot choose where it sits on the ring
without grinding keys, and anybody can check the claim from the key alone. The same key type serves as a
*user key* that signs stored entries. For the ``enrolled`` policy an enrollment authority (a CA key pair,
``p2psip enroll``) signs user certificates binding an AOR to a user key, and node certificates binding a
NodeId to a node key. Storing replicas only see the 128-bit ring key, so an entry carries its user
certificate, which names the AOR, and the replica checks ``key_for(AOR) == key``.

Key files are raw 32-byte Ed25519 private keys written with 0600 permissions; a key that exists is loaded,
so a node keeps its NodeId across restarts.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from overlay.errors import OverlayError
from overlay.ids import ID_BYTES, key_for

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NODE_KEY_FILE = "node.key"


def node_id_of(public_key: bytes) -> int:
    """The NodeId a public key entitles its holder to: first 128 bits of SHA-256(key)."""
    return int.from_bytes(hashlib.sha256(public_key).digest()[:ID_BYTES], "big")


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``.

    Never raises: malformed keys and signatures are simply not valid, because callers sit on receive paths.
    """
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class KeyPair:
    """An Ed25519 key pair; as a node identity its ``node_id`` is derived from ``public_key``."""

    __slots__ = ("_private", "node_id", "public_key")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id: int = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        if len(raw) != 32:
            raise OverlayError(f"an Ed25519 private key is 32 raw bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Load a key file; a clear ``OverlayError`` if it is missing, unreadable or not a key."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise OverlayError(f"cannot read key file {p}: {exc.strerror or exc}") from exc
        if len(raw) != 32:
            raise OverlayError(f"key file {p} is not a raw 32-byte Ed25519 private key ({len(raw)} bytes)")
        return cls.from_private_bytes(raw)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key with 0600 permissions (created that way, never world-readable)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = p.with_name(p.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.private_bytes())
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> KeyPair:
        """The key stored at ``path``, creating and saving a new one the first time."""
        p = Path(path)
        if p.exists():
            return cls.load(p)
        pair = cls.generate()
        pair.save(p)
        return pair

    def __repr__(self) -> str:
        return f"KeyPair(node_id={self.node_id:032x})"


def node_identity(data_dir: str | os.PathLike[str]) -> KeyPair:
    """The node key pair kept in ``data_dir`` (``node.key``), created on first use."""
    return KeyPair.load_or_create(Path(data_dir) / NODE_KEY_FILE)


# --- enrollment -------------------------------------------------------------------------------------

CERT_CONTEXT = "p2psip-cert-v1"
MAX_CERT = 512
"""Bytes a packed certificate may take (an AOR of up to ~300 characters fits)."""
USER_CERT = "user"
NODE_CERT = "node"
NODE_CERT_FILE = "node.cert"


@dataclass(frozen=True)
class Certificate:
    """An enrollment authority's signed statement (RELOAD's model, our own msgpack record, not X.509).

    ``kind`` ``user``: ``public_key`` may write the AOR ``subject`` (replicas see only the ring key, so the
    certificate names the AOR and they check the entry key is one of :func:`user_cert_keys`: the AOR's
    own, or its offline-message inbox's ``key_for('inbox:' + AOR)``). ``kind`` ``node``:
    ``public_key`` may be a ring member; its NodeId is derived from the key, ``subject`` repeats it in hex.
    Valid from ``not_before`` to ``not_after`` (Unix seconds, wall clock). Packed it is
    ``[CERT_CONTEXT, kind, subject, public_key, not_before, not_after, signature]``, the signature by the
    CA key over the same array without it. Why not X.509: it travels inside every stored entry and in
    the identity proof of a node, where ~200 bytes of msgpack beat ~600 of DER, and the fields we check are
    exactly these six.
    """

    kind: str
    subject: str
    public_key: bytes
    not_before: int
    not_after: int
    signature: bytes = b""

    def payload(self) -> bytes:
        return bytes(
            msgpack.packb(
                [CERT_CONTEXT, self.kind, self.subject, self.public_key, self.not_before, self.not_after],
                use_bin_type=True,
            )
        )

    def to_bytes(self) -> bytes:
        return bytes(
            msgpack.packb(
                [
                    CERT_CONTEXT, self.kind, self.subject, self.public_key,
                    self.not_before, self.not_after, self.signature,
                ],
                use_bin_type=True,
            )
        )  # fmt: skip

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        """Decode a packed certificate; ``OverlayError`` when it is not one (never another exception)."""
        if not isinstance(data, bytes) or not 0 < len(data) <= MAX_CERT:
            raise OverlayError(f"a certificate is 1 to {MAX_CERT} bytes")
        try:
            fields = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise OverlayError(f"not a certificate: {exc}") from None
        if not isinstance(fields, list) or len(fields) != 7 or fields[0] != CERT_CONTEXT:
            raise OverlayError("not a p2psip certificate")
        _, kind, subject, pk, nb, na, sig = fields
        if (
            kind not in (USER_CERT, NODE_CERT)
            or not isinstance(subject, str)
            or not isinstance(pk, bytes)
            or len(pk) != PUBLIC_KEY_BYTES
            or type(nb) is not int
            or type(na) is not int
            or not isinstance(sig, bytes)
        ):
            raise OverlayError("malformed certificate fields")
        return cls(kind, subject, pk, nb, na, sig)

    def problem(self, ca_public_key: bytes, now: float, cache: VerifiedCache | None = None) -> str | None:
        """Why this certificate is not valid at ``now`` under ``ca_public_key`` (None: it is)."""
        if now < self.not_before:
            return f"certificate not valid before {_utc(self.not_before)}"
        if now > self.not_after:
            return f"certificate expired at {_utc(self.not_after)}"
        ok = (
            cache.verify(ca_public_key, self.signature, self.payload())
            if cache is not None
            else verify(ca_public_key, self.signature, self.payload())
        )
        if not ok:
            return "certificate not signed by this overlay's enrollment authority"
        return None

    def save(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Certificate:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise OverlayError(f"cannot read certificate {path}: {exc.strerror or exc}") from exc
        return cls.from_bytes(data)


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """An authority's public key file (``ca.pub``: 64 hex digits); a clear ``OverlayError`` otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise OverlayError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        raw = bytes.fromhex(data.decode("ascii").strip())
    except ValueError:  # UnicodeDecodeError too: a private key file given by mistake
        raw = b""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise OverlayError(f"{path} does not hold a public key (64 hex digits, as p2psip enroll init writes)")
    return raw


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def issue(
    ca: KeyPair, kind: str, subject: str, public_key: bytes, *, not_before: int, not_after: int
) -> Certificate:
    """Sign a certificate with the CA key (``enroll_user``/``enroll_node`` are the usual doors)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise OverlayError("a public key is 32 bytes")
    if kind not in (USER_CERT, NODE_CERT):
        raise OverlayError(f"a certificate is for a {USER_CERT} or a {NODE_CERT}, not {kind!r}")
    if not_after <= not_before:
        raise OverlayError("a certificate must end after it starts")
    cert = Certificate(kind, subject, public_key, int(not_before), int(not_after))
    cert = Certificate(cert.kind, cert.subject, cert.public_key, cert.not_before, cert.not_after,
                       ca.sign(cert.payload()))  # fmt: skip
    if len(cert.to_bytes()) > MAX_CERT:
        raise OverlayError(f"the subject {subject[:40]!r}... is too long for a certificate")
    return cert


DEFAULT_CERT_DAYS = 365


def enroll_user(
    ca: KeyPair,
    aor: str,
    user_public_key: bytes,
    *,
    now: float | None = None,
    days: float = DEFAULT_CERT_DAYS,
) -> Certificate:
    """A user certificate: ``user_public_key`` may write ``aor`` (its ring key is ``key_for(aor)``)."""
    start = int(time.time() if now is None else now)
    return issue(ca, USER_CERT, aor, user_public_key, not_before=start - 60,
                 not_after=start + int(days * 86400))  # fmt: skip


def enroll_node(
    ca: KeyPair, node_public_key: bytes, *, now: float | None = None, days: float = DEFAULT_CERT_DAYS
) -> Certificate:
    """A node certificate: the holder of ``node_public_key`` may join as NodeId ``node_id_of(key)``."""
    start = int(time.time() if now is None else now)
    return issue(ca, NODE_CERT, f"{node_id_of(node_public_key):032x}", node_public_key,
                 not_before=start - 60, not_after=start + int(days * 86400))  # fmt: skip


def _certificate_of_kind(blob: bytes | None, kind: str, missing: str) -> Certificate | str:
    """The certificate in ``blob`` when it decodes and is of ``kind``; else why not (``missing`` if absent).

    The common first half of the user and node checks: what follows differs (which key it must bind).
    """
    if not blob:
        return missing
    try:
        cert = Certificate.from_bytes(blob)
    except OverlayError as exc:
        return str(exc)
    if cert.kind != kind:
        wanted, other = ("a user", "a node") if kind == USER_CERT else ("a node", "a user")
        return f"{other} certificate does not enroll {wanted}"
    return cert


INBOX_NAME_PREFIX = "inbox:"
"""The DHT name of an AOR's offline-message inbox is this prefix + the AOR (``p2psip.inbox.INBOX_PREFIX``
says the same on the SIP side, which may not import the overlay)."""


def user_cert_keys(subject: str) -> tuple[int, int]:
    """The ring keys a user certificate for AOR ``subject`` lets its key write: the AOR's own (bindings,
    presence state) and its inbox's, ``key_for('inbox:' + AOR)`` (the inbox key entry, the owner's removal
    of delivered messages). One enrollment covers both, so a user asks the CA once; no other certificate
    can name the inbox (`p2psip enroll user` certifies only canonical sip: AORs, never an ``inbox:`` name)."""
    return key_for(subject), key_for(INBOX_NAME_PREFIX + subject)


def user_cert_problem(
    ca_public_key: bytes, blob: bytes, key_id: int, owner: bytes, now: float,
    cache: VerifiedCache | None = None,
) -> str | None:  # fmt: skip
    """Why ``blob`` (an entry's cert) does not let ``owner`` write ring key ``key_id`` (None: it does)."""
    cert = _certificate_of_kind(blob, USER_CERT, "the owner key is not enrolled (no user certificate)")
    if isinstance(cert, str):
        return cert
    if key_id not in user_cert_keys(cert.subject):
        return f"the certificate is for {cert.subject[:80]}, not this key"
    if cert.public_key != owner:
        return "the certificate is for another user key"
    return cert.problem(ca_public_key, now, cache)


def writer_cert_problem(
    ca_public_key: bytes, blob: bytes, owner: bytes, now: float, cache: VerifiedCache | None = None
) -> str | None:
    """Why ``blob`` does not make ``owner`` an enrolled writer of *some* kind (a user certificate for any
    AOR, or a node certificate, of this authority, for this very key): what a drop in an inbox needs on an
    engine whose storing nodes check nothing (``overlay.directory.select_entries``)."""
    if not blob:
        return "the writer is not enrolled (no certificate)"
    try:
        cert = Certificate.from_bytes(blob)
    except OverlayError as exc:
        return str(exc)
    if cert.public_key != owner:
        return "the certificate is for another key"
    return cert.problem(ca_public_key, now, cache)


def node_cert_problem(
    ca_public_key: bytes, blob: bytes | None, node_id: int, now: float, cache: VerifiedCache | None = None
) -> str | None:
    """Why ``blob`` does not admit NodeId ``node_id`` as a ring member (None: it does)."""
    cert = _certificate_of_kind(blob, NODE_CERT, "the node is not enrolled (no node certificate)")
    if isinstance(cert, str):
        return cert
    if node_id_of(cert.public_key) != node_id:
        return "the node certificate is for another NodeId"
    return cert.problem(ca_public_key, now, cache)


# --- caching verified facts --------------------------------------------------------------------------


def _signature_fact(public_key: bytes, signature: bytes, data: bytes) -> tuple[str, bytes, bytes, bytes]:
    return ("sig", public_key, signature, hashlib.sha256(data).digest())  # bounded memory per fact


class VerifiedCache:
    """A bounded LRU set of facts already proven (e.g. "this key signed this nonce", "this key owns id N").

    Signature checks cost ~50-100 us each; a node that re-verifies its neighbours on every message would
    spend its time there. Facts are opaque hashable tuples so one cache can serve several kinds of proof.
    """

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._facts: OrderedDict[object, None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, fact: object) -> bool:
        if fact in self._facts:
            self._facts.move_to_end(fact)
            self.hits += 1
            return True
        self.misses += 1
        return False

    def add(self, fact: object) -> None:
        self._facts[fact] = None
        self._facts.move_to_end(fact)
        while len(self._facts) > self._capacity:
            self._facts.popitem(last=False)

    def __len__(self) -> int:
        return len(self._facts)

    def verify(self, public_key: bytes, signature: bytes, data: bytes) -> bool:
        """``identity.verify`` that remembers successes (failures are not cached: they are cheap to retry)."""
        fact = _signature_fact(public_key, signature, data)
        if fact in self:
            return True
        ok = verify(public_key, signature, data)
        if ok:
            self.add(fact)
        return ok

    def signed(self, public_key: bytes, signature: bytes, data: bytes) -> None:
        """Record a signature this process just made with ``public_key``'s private half: it is valid, so
        the node that wrote an entry and then stores or reads it back does not verify its own work."""
        self.add(_signature_fact(public_key, signature, data))

    def owns_id(self, public_key: bytes, node_id: int) -> bool:
        """Whether ``public_key`` hashes to ``node_id`` (cached)."""
        fact = ("id", public_key, node_id)
        if fact in self:
            return True
        ok = len(public_key) == PUBLIC_KEY_BYTES and node_id_of(public_key) == node_id
        if ok:
            self.add(fact)
        return ok
