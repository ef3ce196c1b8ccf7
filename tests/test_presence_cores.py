"""Sans-IO cores of presence and offline messages, with a fake clock: PUBLISH state (RFC 3903: entity
tags, refresh, modify, remove, 412/489/423/415/400, expiry, a bound per user), the presence composition
and watcher policy (polite blocking), message-summary bodies (RFC 3842), and the sealed box (X25519 +
HKDF + ChaCha20-Poly1305) with hypothesis on tampering."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psip import mwi, pidf
from p2psip.config import load_config
from p2psip.errors import ConfigError, ParseError
from p2psip.inbox import UNVERIFIED, Letter, LetterError, mark_sender, open_letter
from p2psip.message import Request
from p2psip.presence import Decision, WatcherPolicy, compose, polite_block
from p2psip.publication import EventStateCompositor, PublishResult, decode_state, encode_state
from p2psip.sealedbox import OVERHEAD, SealedBoxError, open_box, public_bytes, seal
from p2psip.subscription import Reject
from p2psip.uri import Address

AOR = "sip:bob@p2p.example"


def doc(basic: str, note: str = "") -> bytes:
    return pidf.Presence(AOR, [pidf.PresenceTuple("t", basic)], [note] if note else []).compose()


def publish(body: bytes = b"", *, etag: str | None = None, expires: int | None = 600, event: str = "presence",
            content_type: str = pidf.CONTENT_TYPE) -> Request:  # fmt: skip
    headers = [("Event", event)]
    if expires is not None:
        headers.append(("Expires", str(expires)))
    if etag is not None:
        headers.append(("SIP-If-Match", etag))
    return Request.create(
        "PUBLISH", AOR, from_=f"<{AOR}>", to=f"<{AOR}>", body=body,
        content_type=content_type if body else None, headers=headers,
    )  # fmt: skip


def esc() -> EventStateCompositor:
    return EventStateCompositor("presence", (pidf.CONTENT_TYPE,), pidf.parse, max_per_aor=2)


def ok(result: PublishResult | Reject) -> PublishResult:
    assert isinstance(result, PublishResult), result
    return result


def status(result: PublishResult | Reject) -> int:
    assert isinstance(result, Reject), result
    return result.status


def test_publish_refresh_modify_remove() -> None:
    store = esc()
    first = ok(store.publish(AOR, publish(doc("open")), 0.0))
    assert first.changed and first.etag and ("Expires", "600") in first.headers
    refreshed = ok(store.publish(AOR, publish(etag=first.etag), 300.0))
    assert not refreshed.changed and refreshed.etag != first.etag
    assert status(store.publish(AOR, publish(etag=first.etag), 301.0)) == 412  # the old tag is spent
    assert store.documents(AOR, 850.0)[0].body == doc("open")  # refresh moved the expiry to 900
    modified = ok(store.publish(AOR, publish(doc("closed", "away"), etag=refreshed.etag), 400.0))
    assert modified.changed and pidf.parse(store.documents(AOR, 400.0)[0].body).basic == "closed"
    removed = ok(store.publish(AOR, publish(etag=modified.etag, expires=0), 500.0))
    assert removed.changed and removed.etag is None and store.documents(AOR, 500.0) == []


def test_published_state_round_trips_through_its_dht_value_and_is_adopted() -> None:
    store = esc()
    first = ok(store.publish(AOR, publish(doc("open", "at my desk")), 100.0, "10.0.0.1:5060"))
    # the agent's clock at 100 is unix time 1e9 + 100: the value carries unix expiry times
    value = encode_state(store.documents(AOR, 100.0), 1e9)
    back = decode_state(value, 1e9 - 50.0)  # another agent whose clock runs 50 s ahead
    assert [(p.etag, p.body, p.source, p.expires_at) for p in back] == [
        (first.etag, doc("open", "at my desk"), "10.0.0.1:5060", 750.0)
    ]
    other = esc()
    assert other.adopt(AOR, back, 150.0) and not other.adopt(AOR, back, 150.0)  # once per entity tag
    assert ok(other.publish(AOR, publish(etag=first.etag), 160.0)).etag  # the device's tag still works
    assert not esc().adopt(AOR, back, 751.0)  # expired: nothing taken
    assert decode_state(b"\xc1garbage", 0.0) == [] and decode_state(encode_state([], 0.0), 0.0) == []
    # the device unregistered: what it published goes with it
    assert other.drop_source(AOR, "10.0.0.1:5060") and other.documents(AOR, 160.0) == []
    assert not other.drop_source(AOR, "10.0.0.1:5060")


def test_publish_refusals() -> None:
    store = esc()
    assert status(store.publish(AOR, publish(doc("open"), event="dialog"), 0.0)) == 489
    assert status(store.publish(AOR, publish(doc("open"), expires=5), 0.0)) == 423
    assert status(store.publish(AOR, publish(b"hello", content_type="text/plain"), 0.0)) == 415
    assert status(store.publish(AOR, publish(b"<presence", content_type=pidf.CONTENT_TYPE), 0.0)) == 400
    bomb = b'<!DOCTYPE p [<!ENTITY a "b">]><presence xmlns="urn:ietf:params:xml:ns:pidf" entity="&a;"/>'
    assert status(store.publish(AOR, publish(bomb), 0.0)) == 400
    assert status(store.publish(AOR, publish(), 0.0)) == 400  # initial without a body
    assert status(store.publish(AOR, publish(etag="nosuch"), 0.0)) == 412
    ok(store.publish(AOR, publish(doc("open")), 0.0))
    ok(store.publish(AOR, publish(doc("open")), 0.0))
    assert status(store.publish(AOR, publish(doc("open")), 0.0)) == 403  # the per-user bound


def test_publication_expiry() -> None:
    store = esc()
    first = ok(store.publish(AOR, publish(doc("open"), expires=100), 0.0))
    assert store.deadline == 100.0 and store.expire(99.0) == []
    assert store.expire(100.0) == [AOR] and store.deadline is None
    assert status(store.publish(AOR, publish(etag=first.etag), 101.0)) == 412


def test_compose_and_polite_block() -> None:
    away = pidf.Presence(AOR, [pidf.PresenceTuple("phone", "closed")], ["in a meeting"], ["away"])
    composed = compose(AOR, ["sip:bob@192.0.2.1:5060"], [away])
    assert composed.basic == "open" and composed.notes == ["in a meeting"] and composed.activities == ["away"]
    assert [t.contact for t in composed.tuples] == ["sip:bob@192.0.2.1:5060", None]
    assert compose(AOR, [], [away]).basic == "closed"
    assert compose(AOR, []) == polite_block(AOR)
    assert polite_block(AOR).basic == "closed" and not polite_block(AOR).notes


def test_watcher_policy() -> None:
    policy = WatcherPolicy(
        allow={AOR: frozenset({"sip:alice@p2p.example"})}, deny={AOR: frozenset({"sip:eve@p2p.example"})}
    )
    assert policy.decide(AOR, "sip:alice@p2p.example", vouched=True) is Decision.ALLOW
    assert policy.decide(AOR, "sip:alice@p2p.example", vouched=False) is Decision.POLITE_BLOCK
    assert policy.decide(AOR, "sip:carol@p2p.example", vouched=True) is Decision.POLITE_BLOCK
    assert policy.decide(AOR, "sip:eve@p2p.example", vouched=True) is Decision.REJECT
    assert policy.decide(AOR, AOR, vouched=True) is Decision.ALLOW
    open_policy = WatcherPolicy()
    assert open_policy.decide(AOR, "sip:carol@p2p.example", vouched=True) is Decision.ALLOW
    assert open_policy.decide(AOR, "sip:carol@p2p.example", vouched=False) is Decision.POLITE_BLOCK


def test_message_summary() -> None:
    summary = mwi.Summary(True, "sip:jones@voicemail.example.com", {"voice-message": (2, 8, 0, 2)})
    body = mwi.compose(summary)
    assert body == (
        b"Messages-Waiting: yes\r\nMessage-Account: sip:jones@voicemail.example.com\r\n"
        b"Voice-Message: 2/8 (0/2)\r\n"
    )
    assert mwi.parse(body) == summary
    assert mwi.parse(b"Messages-Waiting: no\r\nFax-Message: 1/0\r\nX-Other: y\r\n").counts == {
        "fax-message": (1, 0, 0, 0)
    }
    bad_bodies = [b"", b"Voice-Message: 1/2", b"Messages-Waiting: maybe", b"\xff"]
    bad_bodies += [b"Messages-Waiting: yes\nVoice-Message: x", b"Messages-Waiting: yes\nnonsense"]
    for bad in bad_bodies:
        with pytest.raises(ParseError):
            mwi.parse(bad)


def test_sealed_box_round_trip_and_refusals() -> None:
    bob = X25519PrivateKey.generate()
    box = seal(public_bytes(bob), b"call me back")
    assert len(box) == len(b"call me back") + OVERHEAD
    assert open_box(bob, box) == b"call me back"
    assert seal(public_bytes(bob), b"call me back") != box  # a fresh ephemeral key every time
    with pytest.raises(SealedBoxError):
        open_box(X25519PrivateKey.generate(), box)
    with pytest.raises(SealedBoxError):
        open_box(bob, box[:20])
    with pytest.raises(SealedBoxError):
        seal(b"short", b"x")


def test_letters_keep_who_vouched_and_mark_unverified_senders() -> None:
    bob = X25519PrivateKey.generate()
    letter = Letter('"Alice" <sip:alice@p2p.example>;tag=1', AOR, "text/plain", b"hi", 1.5, "ab" * 16)
    assert open_letter(bob, letter.seal(public_bytes(bob))) == letter
    # a letter of an older peer has no "vouch": unverified
    old = msgpack.packb({"from": "<sip:a@x>", "to": AOR, "type": "text/plain", "body": b"x", "date": 1})
    assert open_letter(bob, seal(public_bytes(bob), old)).vouched_by == ""
    bad = msgpack.packb({"from": "<sip:a@x>", "to": AOR, "type": "t", "body": b"x", "date": 1, "vouch": 7})
    with pytest.raises(LetterError):
        open_letter(bob, seal(public_bytes(bob), bad))
    sender = Address(letter.from_)
    assert mark_sender(sender, "ab" * 16) == (sender, f"vouched;node={'ab' * 16}")
    marked, how = mark_sender(sender, None)
    assert how == "unverified" and marked.display == f"{UNVERIFIED} Alice" and sender.display == "Alice"
    assert str(marked).startswith('"[unverified] Alice" <sip:alice@p2p.example>')
    assert mark_sender(Address("<sip:a@x>"), None)[0].display == UNVERIFIED


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_sealed_box_any_changed_byte_is_refused(message: bytes, data: st.DataObject) -> None:
    bob = X25519PrivateKey.generate()
    box = bytearray(seal(public_bytes(bob), message))
    assert open_box(bob, bytes(box)) == message
    index = data.draw(st.integers(0, len(box) - 1))
    box[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SealedBoxError):
        open_box(bob, bytes(box))


def test_a_device_publishing_afresh_replaces_its_state() -> None:
    store = esc()
    ok(store.publish(AOR, publish(doc("open")), 0.0, "192.0.2.1:5060"))
    ok(store.publish(AOR, publish(doc("open")), 1.0, "192.0.2.2:5060"))
    ok(store.publish(AOR, publish(doc("closed")), 2.0, "192.0.2.1:5060"))  # no SIP-If-Match (baresip)
    bodies = sorted((p.source, p.body) for p in store.documents(AOR, 3.0))
    assert bodies == [("192.0.2.1:5060", doc("closed")), ("192.0.2.2:5060", doc("open"))]


def test_presence_allow_in_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text('[presence_allow]\n"sip:bob@P2P.example" = ["sip:alice@p2p.example;x=1", "*"]\n')
    assert load_config(path).presence_allow == {AOR: ["sip:alice@p2p.example", "*"]}
    for bad, says in (
        ('[presence_allow]\n"bob" = ["*"]', "not an address of record"),
        ('[presence_allow]\n"sip:bob@x" = "sip:a@x"', "a list of AORs"),
        ('[presence_allow]\n"sip:bob@x" = ["tel:+1"]', "not an address of record"),
        ("presence_allow = 3", "a table AOR"),
    ):
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=says):
            load_config(path)
