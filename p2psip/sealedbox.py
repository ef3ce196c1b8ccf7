"""A sealed box: encrypt a message to someone's X25519 public key, so that only they can read it and the
sender needs no key of its own (what offline messages stored in the DHT need: anyone may leave one, only
the recipient can open it). Built from ``cryptography`` primitives, since ``cryptography`` has no sealed
box of its own (and an Ed25519 user key cannot be converted to X25519 with it: the recipient publishes a
separate, long-lived X25519 key).

Format, version 1 (bytes)::

    0x01 | ephemeral public key (32) | ChaCha20-Poly1305 ciphertext and tag (len(message) + 16)

Sealing: a fresh ephemeral X25519 key pair; ``shared = X25519(ephemeral private, recipient public)``;
``key = HKDF-SHA256(shared, salt = ephemeral public | recipient public, info = "p2psip sealed box v1",
32 bytes)``; the ciphertext is ChaCha20-Poly1305 with that key, a zero nonce (the key is used once: the
ephemeral key is new for every box) and ``ephemeral public | recipient public`` as associated data.
Opening reverses it; any change to any byte, or the wrong private key, is a :class:`SealedBoxError`.
The sender stays anonymous to the box (authenticate it separately, e.g. by the signed DHT entry).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2psip.errors import P2PSIPError

__all__ = ["OVERHEAD", "SealedBoxError", "open_box", "public_bytes", "seal"]

VERSION = 1
INFO = b"p2psip sealed box v1"
NONCE = bytes(12)
OVERHEAD = 1 + 32 + 16
"""Bytes a box adds to its message."""


class SealedBoxError(P2PSIPError):
    """A box that cannot be opened: not one, changed on the way, or sealed to another key."""


def public_bytes(key: X25519PublicKey | X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a public key (of a private key's public half)."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=INFO).derive(shared)


def seal(recipient: bytes | X25519PublicKey, message: bytes) -> bytes:
    """Encrypt ``message`` to ``recipient`` (32 raw bytes or a key object)."""
    try:
        public = (
            recipient
            if isinstance(recipient, X25519PublicKey)
            else X25519PublicKey.from_public_bytes(recipient)
        )
    except ValueError as exc:
        raise SealedBoxError(f"not an X25519 public key: {exc}") from None
    recipient_raw = public_bytes(public)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = public_bytes(ephemeral)
    key = _key(ephemeral.exchange(public), ephemeral_raw, recipient_raw)
    sealed = ChaCha20Poly1305(key).encrypt(NONCE, message, ephemeral_raw + recipient_raw)
    return bytes([VERSION]) + ephemeral_raw + sealed


def open_box(private: X25519PrivateKey, box: bytes) -> bytes:
    """The message in ``box``, if it was sealed to ``private``'s public key and not changed since."""
    if len(box) < OVERHEAD or box[0] != VERSION:
        raise SealedBoxError("not a version 1 sealed box")
    ephemeral_raw = box[1:33]
    recipient_raw = public_bytes(private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
        key = _key(shared, ephemeral_raw, recipient_raw)
        return ChaCha20Poly1305(key).decrypt(NONCE, box[33:], ephemeral_raw + recipient_raw)
    except (InvalidTag, ValueError):
        raise SealedBoxError("the box was changed or sealed to another key") from None
