from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.chord import NodeRef
from overlay.errors import WireError
from overlay.identity import KeyPair
from overlay.storage import Entry
from overlay.wire import TCP_MAX, Codec, FrameDecoder, Message, error_kind, frame

CODEC = Codec(
    "test-overlay",
    {"ping": {"nonce": "bytes", "who": "node?"}, "fetch": {"key": "id"}, "store": {"entry": "entry"}},
    {"entries": "entries", "pong": "bytes"},
)
SRC = 123456789
EP = ("127.0.0.1", 7060)


def test_round_trip_request_and_reply() -> None:
    msg = Message("ping", 7, SRC, EP, {"nonce": b"abc", "who": (5, "::1", 9)})
    assert CODEC.decode(CODEC.encode(msg)) == msg
    e = Entry.create(KeyPair.generate(), 42, b"id", b"value", 3, 60)
    store = Message("store", 8, SRC, EP, {"entry": e})
    assert CODEC.decode(CODEC.encode(store)).body["entry"] == e
    reply = Message("ok", 8, SRC, EP, {"entries": [(e, 1500)]})
    assert CODEC.decode(CODEC.encode(reply)).body["entries"] == [(e, 1500)]
    err = Message("err", 8, SRC, EP, {"code": 403, "reason": "policy"})
    assert CODEC.decode(CODEC.encode(err)).body == {"code": 403, "reason": "policy"}


def raw(**fields: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "ov": "test-overlay",
        "t": "fetch",
        "id": 1,
        "src": b"\0" * 16,
        "ep": ["127.0.0.1", 1],
        "key": b"\1" * 16,
    }
    base.update(fields)
    return bytes(msgpack.packb({k: v for k, v in base.items() if v is not ...}))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (raw(ov="other"), "another overlay"),
        (raw(v=2), "version"),
        (raw(v=True), "version"),
        (raw(t="nope"), "unknown message type"),
        (raw(key=b"\1" * 15), "16 bytes"),
        (raw(key=...), "missing field"),
        (raw(extra=1), "unknown field"),
        (raw(id=-1), "unsigned"),
        (raw(id=True), "unsigned"),
        (raw(ep=["h", 70000]), "port"),
        (raw(src="x" * 16), "src"),
        (raw() + b"\0", "msgpack"),
        (b"\xc1", "msgpack"),
        (msgpack.packb([1, 2]), "map"),
        (raw(key=b"\1" * 2000), "exceeds"),
        (raw(t="ping", key=..., nonce=b"n" * 129), "at most 128"),
    ],
)
def test_invalid_messages_are_wire_errors(data: bytes, why: str) -> None:
    with pytest.raises(WireError, match=why):
        CODEC.decode(data)


def test_size_limits() -> None:
    e = Entry.create(KeyPair.generate(), 42, b"id", b"x" * 2000, 3, 60)
    big = Message("store", 1, SRC, EP, {"entry": e})
    with pytest.raises(WireError, match="exceeds"):
        CODEC.encode(big)
    data = CODEC.encode(big, max_size=TCP_MAX)
    assert CODEC.decode(data, max_size=TCP_MAX) == big
    with pytest.raises(WireError) as info:
        CODEC.decode(data)
    assert error_kind(info.value) == "oversized"
    with pytest.raises(WireError, match="at most 128"):
        CODEC.encode(Message("ping", 1, SRC, EP, {"nonce": b"x" * 129}))


def test_chord_and_storage_schemas_do_not_clash() -> None:
    from overlay.chord import CHORD_MESSAGES
    from overlay.wire import STORAGE_MESSAGES, STORAGE_REPLY_FIELDS, overlay_schemas

    _, replies = overlay_schemas()
    assert not set(CHORD_MESSAGES) & set(STORAGE_MESSAGES)
    for spec in CHORD_MESSAGES.values():
        for fname, ftype in spec.reply.items():
            assert replies[fname].rstrip("?") == ftype.rstrip("?")
    for fname in STORAGE_REPLY_FIELDS:
        assert fname in replies


def test_default_codec_speaks_chord_and_storage() -> None:
    codec = Codec("ov")
    assert {
        "ping",
        "find_successor",
        "get_predecessor",
        "get_successors",
        "notify",
        "leave",
        "store",
        "fetch",
        "transfer",
        "digest",
    } <= set(codec.requests)
    digest = Message("digest", 4, SRC, EP, {"hi": 77, "sums": bytes(128)})
    assert codec.decode(codec.encode(digest)) == digest  # ``lo`` absent: the sender's range is the ring
    with pytest.raises(WireError):  # 17 buckets: more than a digest carries
        codec.decode(codec.encode(Message("digest", 4, SRC, EP, {"hi": 77, "sums": bytes(136)})))
    answer = Message("ok", 4, SRC, EP, {"differ": b"\x05\x80"})
    assert codec.decode(codec.encode(answer)) == answer
    reply = Message(
        "ok", 3, SRC, EP, {"done": True, "node": NodeRef(5, "h", 1), "nodes": [NodeRef(6, "h", 2)]}
    )
    back = codec.decode(codec.encode(reply))
    assert back == reply and isinstance(back.body["node"], NodeRef)
    with pytest.raises(WireError) as info:
        Codec("other").decode(codec.encode(reply))
    assert error_kind(info.value) == "foreign"


def test_frames() -> None:
    dec = FrameDecoder()
    stream = frame(b"one") + frame(b"") + frame(b"three")
    out: list[bytes] = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
    assert out == [b"one", b"", b"three"]
    with pytest.raises(WireError):
        FrameDecoder().feed((TCP_MAX + 1).to_bytes(4, "big"))
    with pytest.raises(WireError):
        frame(b"x" * (TCP_MAX + 1))


def test_bad_schemas_are_refused_at_definition() -> None:
    with pytest.raises(ValueError):
        Codec("x", {"a": {"f": "float"}})
    with pytest.raises(ValueError):
        Codec("x", {"ok": {}})
    with pytest.raises(ValueError):
        Codec("x", {"a": {"src": "id"}})


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1500))
def test_fuzz_any_bytes(data: bytes) -> None:
    try:
        msg = CODEC.decode(data)
    except WireError:
        return
    assert isinstance(msg, Message)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "ov",
                "t",
                "id",
                "src",
                "ep",
                "key",
                "nonce",
                "who",
                "entry",
                "entries",
                "code",
                "reason",
                "x",
            ]
        ),
        msgpack_values,
        max_size=9,
    ),
    st.sampled_from(["fetch", "ping", "ok", "err", "store"]),
)
def test_fuzz_structured_maps(fields: dict[str, object], mtype: str) -> None:
    base: dict[str, object] = {
        "v": 1,
        "ov": "test-overlay",
        "t": mtype,
        "id": 1,
        "src": b"\0" * 16,
        "ep": ["h", 1],
    }
    base.update(fields)
    data = msgpack.packb(base)
    try:
        msg = CODEC.decode(data)
    except WireError:
        return
    # anything accepted must survive a round trip unchanged
    assert CODEC.decode(CODEC.encode(msg, max_size=TCP_MAX), max_size=TCP_MAX) == msg
