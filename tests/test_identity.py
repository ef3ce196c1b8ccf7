from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from overlay.errors import OverlayError
from overlay.identity import (
    Certificate,
    KeyPair,
    VerifiedCache,
    enroll_node,
    enroll_user,
    node_cert_problem,
    node_id_of,
    node_identity,
    user_cert_keys,
    user_cert_problem,
    verify,
)
from overlay.ids import key_for


def test_node_id_is_first_128_bits_of_sha256_of_public_key() -> None:
    pair = KeyPair.generate()
    digest = hashlib.sha256(pair.public_key).digest()
    assert pair.node_id == int.from_bytes(digest[:16], "big")
    assert node_id_of(pair.public_key) == pair.node_id
    assert len(pair.public_key) == 32


def test_sign_and_verify() -> None:
    pair, other = KeyPair.generate(), KeyPair.generate()
    sig = pair.sign(b"hello")
    assert verify(pair.public_key, sig, b"hello")
    assert not verify(pair.public_key, sig, b"hellO")
    assert not verify(other.public_key, sig, b"hello")
    assert not verify(pair.public_key[:31], sig, b"hello")
    assert not verify(pair.public_key, sig[:63], b"hello")
    assert not verify(b"\xff" * 32, sig, b"hello")  # not a curve point: False, no exception


def test_key_persisted_with_0600_and_reloaded(tmp_path: Path) -> None:
    first = node_identity(tmp_path / "data")
    key_file = tmp_path / "data" / "node.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    again = node_identity(tmp_path / "data")
    assert again.node_id == first.node_id
    assert again.public_key == first.public_key


def test_corrupt_key_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "node.key"
    bad.write_bytes(b"not a key")
    with pytest.raises(OverlayError, match="not a raw 32-byte"):
        KeyPair.load(bad)
    with pytest.raises(OverlayError, match="cannot read"):
        KeyPair.load(tmp_path / "missing.key")


def test_user_certificate_binds_the_aor_to_a_user_key() -> None:
    ca, alice, mallory = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    aor = "sip:alice@example.net"
    key = key_for(aor)
    cert = enroll_user(ca, aor, alice.public_key, now=1000, days=1)
    blob = cert.to_bytes()
    assert Certificate.from_bytes(blob) == cert
    assert user_cert_problem(ca.public_key, blob, key, alice.public_key, 1000) is None
    assert "another user key" in (user_cert_problem(ca.public_key, blob, key, mallory.public_key, 1000) or "")
    assert "not this key" in (
        user_cert_problem(ca.public_key, blob, key_for("sip:bob@example.net"), alice.public_key, 1000) or ""
    )
    assert "not signed" in (user_cert_problem(mallory.public_key, blob, key, alice.public_key, 1000) or "")
    # the same enrollment covers the AOR's offline-message inbox (its key only, nobody else's inbox)
    inbox = key_for("inbox:" + aor)
    assert user_cert_keys(aor) == (key, inbox)
    assert user_cert_problem(ca.public_key, blob, inbox, alice.public_key, 1000) is None
    refused = user_cert_problem(ca.public_key, blob, inbox, mallory.public_key, 1000)
    assert "another user key" in (refused or "")
    assert "not this key" in (
        user_cert_problem(ca.public_key, blob, key_for("inbox:sip:bob@example.net"), alice.public_key, 1000)
        or ""
    )
    assert "expired" in (user_cert_problem(ca.public_key, blob, key, alice.public_key, 1000 + 86401) or "")
    assert "not valid before" in (user_cert_problem(ca.public_key, blob, key, alice.public_key, 0) or "")
    assert "no user certificate" in (user_cert_problem(ca.public_key, b"", key, alice.public_key, 1000) or "")
    tampered = Certificate(cert.kind, "sip:bob@example.net", cert.public_key, cert.not_before,
                           cert.not_after, cert.signature).to_bytes()  # fmt: skip
    assert "not signed" in (
        user_cert_problem(ca.public_key, tampered, key_for("sip:bob@example.net"), alice.public_key, 1000)
        or ""
    )
    with pytest.raises(OverlayError):
        Certificate.from_bytes(b"\xc1")


def test_node_certificate_binds_the_node_id() -> None:
    ca, node, other = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    blob = enroll_node(ca, node.public_key, now=1000, days=1).to_bytes()
    assert node_cert_problem(ca.public_key, blob, node.node_id, 1000) is None
    assert "another NodeId" in (node_cert_problem(ca.public_key, blob, other.node_id, 1000) or "")
    assert "not enrolled" in (node_cert_problem(ca.public_key, None, node.node_id, 1000) or "")
    user = enroll_user(ca, "sip:a@b", node.public_key, now=1000).to_bytes()
    assert "does not enroll a node" in (node_cert_problem(ca.public_key, user, node.node_id, 1000) or "")


def test_verified_cache_costs_once_and_is_bounded() -> None:
    pair = KeyPair.generate()
    cache = VerifiedCache(capacity=2)
    sig = pair.sign(b"n1")
    assert cache.verify(pair.public_key, sig, b"n1")
    assert cache.misses == 1
    assert cache.verify(pair.public_key, sig, b"n1")
    assert cache.hits == 1
    assert not cache.verify(pair.public_key, sig, b"n2")
    assert cache.owns_id(pair.public_key, pair.node_id)
    assert not cache.owns_id(pair.public_key, pair.node_id ^ 1)
    cache.add(("x",))
    assert len(cache) == 2
