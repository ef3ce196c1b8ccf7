from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.ids import RING, between, between_right, distance, from_bytes, key_for, to_bytes

ids = st.integers(min_value=0, max_value=RING - 1)


def test_key_is_first_128_bits_of_sha256() -> None:
    digest = hashlib.sha256(b"sip:alice@example.net").digest()
    assert key_for("sip:alice@example.net") == int.from_bytes(digest[:16], "big")


def test_wrap_around_intervals() -> None:
    top = RING - 1
    assert between(0, top, 5)
    assert between(top, top - 10, 3)
    assert not between(top, top, 3)
    assert not between(3, top, 3)
    assert between_right(3, top, 3)
    assert not between_right(4, top, 3)
    assert between(7, 7 + 1, 7 + 1)  # a == b: everything but a
    assert not between(8, 8, 8)
    assert between_right(8, 8, 8)
    assert distance(top, 1) == 2


def test_bytes_round_trip_and_length_check() -> None:
    assert from_bytes(to_bytes(RING - 1)) == RING - 1
    with pytest.raises(ValueError):
        from_bytes(b"\x00" * 15)


@given(ids, ids, ids)
def test_interval_matches_distance_definition(x: int, a: int, b: int) -> None:
    if a != b:
        assert between(x, a, b) == (0 < distance(a, x) < distance(a, b))
        assert between_right(x, a, b) == (between(x, a, b) or x == b)
