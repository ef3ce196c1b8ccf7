"""Who a node or a user is: Ed25519 key pairs, NodeIds derived from them, and enrollment certificates.

A NodeId is the first 128 bits of SHA-256(public key), so a node cannot choose where it sits on the ring
without grinding keys, and anybody can check the claim from the key alone. The same key type serves as a
*user key* that signs stored entries. For the ``enrolled`` policy an overlay CA signs a binding of a user
key to a 128-bit ring key (the key id of a name, not the name itself): storing replicas only ever see key
ids, so that is what they must be able to check.

Key files are raw 32-byte Ed25519 private keys written with 0600 permissions; a key that exists is loaded,
so a node keeps its NodeId across restarts.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from overlay.errors import OverlayError
from overlay.ids import ID_BYTES, to_bytes

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NODE_KEY_FILE = "node.key"
ENROLL_CONTEXT = "p2psip-enroll-v1"


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


def _enroll_payload(key_id: int, user_public_key: bytes) -> bytes:
    return bytes(msgpack.packb([ENROLL_CONTEXT, to_bytes(key_id), user_public_key]))


@dataclass(frozen=True)
class Certificate:
    """A CA's statement "``user_public_key`` may write ring key ``key_id``" (RELOAD's USER-MATCH, no X.509).

    On the wire only ``signature`` travels with an entry: the entry itself carries the key id and the owner
    key, so the binding is re-derived and checked, never trusted.
    """

    key_id: int
    user_public_key: bytes
    signature: bytes

    def valid_for(self, ca_public_key: bytes) -> bool:
        return verify(ca_public_key, self.signature, _enroll_payload(self.key_id, self.user_public_key))


def enroll(ca: KeyPair, key_id: int, user_public_key: bytes) -> Certificate:
    """Issue a certificate binding ``user_public_key`` to ring key ``key_id`` (use ``ids.key_for(name)``)."""
    if len(user_public_key) != PUBLIC_KEY_BYTES:
        raise OverlayError("a user public key is 32 bytes")
    return Certificate(key_id, user_public_key, ca.sign(_enroll_payload(key_id, user_public_key)))


def enrollment_valid(ca_public_key: bytes, key_id: int, user_public_key: bytes, signature: bytes) -> bool:
    """Check a CA signature carried with an entry against the entry's own key id and owner key."""
    return verify(ca_public_key, signature, _enroll_payload(key_id, user_public_key))


# --- caching verified facts --------------------------------------------------------------------------


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
        fact = ("sig", public_key, signature, hashlib.sha256(data).digest())  # bounded memory per fact
        if fact in self:
            return True
        ok = verify(public_key, signature, data)
        if ok:
            self.add(fact)
        return ok

    def owns_id(self, public_key: bytes, node_id: int) -> bool:
        """Whether ``public_key`` hashes to ``node_id`` (cached)."""
        fact = ("id", public_key, node_id)
        if fact in self:
            return True
        ok = len(public_key) == PUBLIC_KEY_BYTES and node_id_of(public_key) == node_id
        if ok:
            self.add(fact)
        return ok
