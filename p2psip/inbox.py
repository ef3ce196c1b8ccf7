"""Offline messages: what a MESSAGE left for an AOR nobody has registered becomes, and the long-lived
X25519 key it is sealed to.

A home peer has one X25519 key per AOR (derived from its user-key secret, or kept as
``users/<user@host>.inbox``, mode 0600, beside the user's Ed25519 ``.key``: :class:`p2psip.peer.UserKeys`;
``cryptography`` cannot turn an Ed25519 key into an X25519 one) and publishes
its public half in the DHT under ``H('inbox:' + AOR)`` as the inbox entry, signed by the user key. The
peer where a MESSAGE finds nobody registered seals a *letter* (this module) to that public key
(:mod:`p2psip.sealedbox`) and drops it under the same key; the overlay's ``inbox`` rule lets any key drop
there, within a quota, and only the owner remove. The next registration's home peer opens the letters,
delivers each as a MESSAGE and removes it.

A letter is msgpack ``{"from": From header, "to": AOR, "type": Content-Type, "body": bytes, "date": unix
seconds, "vouch": hex NodeId or ""}``. Sans-IO apart from the key file; the DHT glue is in
:mod:`p2psip.peer`.

**Who sent it.** A From header proves nothing, and anyone can seal a letter to a published key. So the
storing peer records in the letter whether it vouches for the sender (``vouch``: its own NodeId, when the
MESSAGE came from a device registered at that peer for the From's AOR, or with a valid
``P-P2PSIP-Vouch`` of another peer), and the drop carrying it is signed by that peer's node key. The
delivering peer trusts the claim only when the drop's signer *is* the node named and a ring member, and
marks the MESSAGE it delivers (:func:`mark_sender`): ``P-P2PSIP-Sender: vouched;node=<NodeId>``, or
``P-P2PSIP-Sender: unverified`` and the From's display name prefixed ``[unverified]`` (what a phone
shows its user).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2psip import sealedbox
from p2psip.errors import P2PSIPError
from p2psip.uri import Address

__all__ = [
    "INBOX_PREFIX",
    "SENDER_HEADER",
    "UNVERIFIED",
    "Letter",
    "LetterError",
    "inbox_name",
    "load_key",
    "mark_sender",
    "open_letter",
    "write_key",
]

INBOX_PREFIX = "inbox:"
MAX_LETTER = 12 * 1024
"""Bytes a letter's body may have (a DHT value holds 16 KiB; the box and the headers need the rest)."""


SENDER_HEADER = "P-P2PSIP-Sender"
"""How far the sender of a delivered stored message is known (:func:`mark_sender`); a peer removes any
such header a MESSAGE arrives with from elsewhere."""
UNVERIFIED = "[unverified]"
"""The display-name prefix of a stored message's sender nobody vouched for."""


class LetterError(P2PSIPError):
    """A drop that is not a letter sealed to our key (another home peer's key, or garbage)."""


def inbox_name(aor: str) -> str:
    """The DHT name of ``aor``'s inbox: its ring key is H('inbox:' + AOR)."""
    return INBOX_PREFIX + aor


@dataclass(frozen=True, slots=True)
class Letter:
    """One stored MESSAGE."""

    from_: str
    to: str
    content_type: str
    body: bytes
    date: float
    vouched_by: str = ""
    """The NodeId (hex) of the peer that vouched for the sender when it stored the letter; "" for none."""

    def seal(self, recipient: bytes) -> bytes:
        """The sealed box of this letter for the inbox's published public key (32 raw bytes)."""
        if len(self.body) > MAX_LETTER:
            raise LetterError(f"a stored message is at most {MAX_LETTER} bytes")
        packed = msgpack.packb(
            {"from": self.from_, "to": self.to, "type": self.content_type, "body": self.body,
             "date": self.date, "vouch": self.vouched_by},
            use_bin_type=True,
        )  # fmt: skip
        return sealedbox.seal(recipient, bytes(packed))


def open_letter(private: X25519PrivateKey, box: bytes) -> Letter:
    """The letter in ``box``; :class:`LetterError` if it is not one sealed to ``private``."""
    try:
        data = msgpack.unpackb(sealedbox.open_box(private, box), raw=False)
        letter = Letter(
            data["from"], data["to"], data["type"], data["body"], float(data["date"]), data.get("vouch", "")
        )
    except sealedbox.SealedBoxError as exc:
        raise LetterError(str(exc)) from None
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise LetterError(f"not a letter: {exc}") from None
    fields = (letter.from_, letter.to, letter.content_type, letter.vouched_by)
    if not all(isinstance(v, str) for v in fields) or not isinstance(
        letter.body, bytes
    ):
        raise LetterError("not a letter: wrong field types")
    return letter


def mark_sender(sender: Address, voucher: str | None) -> tuple[Address, str]:
    """The From and the :data:`SENDER_HEADER` value of a delivered stored message whose sender the peer
    ``voucher`` (hex NodeId, checked by the deliverer) vouched for; None: unverified, and the display
    name says so."""
    if voucher:
        return sender, f"vouched;node={voucher}"
    marked = copy.copy(sender)
    marked.display = f"{UNVERIFIED} {sender.display}" if sender.display else UNVERIFIED
    return marked, "unverified"


def load_key(path: Path) -> X25519PrivateKey:
    """The X25519 key kept at ``path`` (32 raw bytes); FileNotFoundError when there is none,
    LetterError when the file is not a key."""
    try:
        return X25519PrivateKey.from_private_bytes(path.read_bytes())
    except ValueError as exc:
        raise LetterError(f"{path} is not an X25519 key: {exc}") from None


def write_key(path: Path, key: X25519PrivateKey) -> None:
    """Keep ``key`` at ``path`` (32 raw bytes, mode 0600), replacing the file atomically."""
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".inbox.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.replace(tmp, path)
