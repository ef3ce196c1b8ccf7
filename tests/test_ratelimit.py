"""The one rate limiter (p2psip/ratelimit.py), driven by a fake clock: no sleeps, no sockets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psip.ratelimit import UNLIMITED, Rate, RateLimiter, TokenBuckets


def test_parse_forms() -> None:
    assert Rate.parse("20/s") == Rate(20.0, 20.0)
    assert Rate.parse("20/s:50") == Rate(20.0, 50.0)
    assert Rate.parse("60/min") == Rate(1.0, 1.0)
    assert Rate.parse("36/h:5") == Rate(0.01, 5.0)
    assert Rate.parse(" 0.5 / s ") == Rate(0.5, 1.0)
    assert Rate.parse("off") is UNLIMITED
    assert str(Rate.parse("20/s:50")) == "20/s:50"
    assert str(UNLIMITED) == "off"


@pytest.mark.parametrize("text", ["", "20", "20/day", "-1/s", "0/s", "20/s:0", "20/s:", "fast", "1/s:2:3"])
def test_parse_refuses_with_one_line(text: str) -> None:
    with pytest.raises(ValueError) as info:
        Rate.parse(text)
    assert "\n" not in str(info.value)


def test_burst_then_sustained_rate() -> None:
    buckets = TokenBuckets(Rate(8.0, 5.0))
    now = 100.0
    assert [buckets.allow("a", now) for _ in range(6)] == [True] * 5 + [False]
    # 1/8 s later one token is back, and only one.
    assert buckets.allow("a", now + 0.125)
    assert not buckets.allow("a", now + 0.125)
    # A long pause refills to the burst, never beyond.
    later = now + 1000.0
    assert [buckets.allow("a", later) for _ in range(6)] == [True] * 5 + [False]


def test_sources_are_independent() -> None:
    buckets = TokenBuckets(Rate(1.0, 2.0))
    assert buckets.allow("flood", 0.0) and buckets.allow("flood", 0.0)
    assert not buckets.allow("flood", 0.0)
    assert buckets.allow("quiet", 0.0)


def test_wait_says_when_and_takes_nothing() -> None:
    buckets = TokenBuckets(Rate(4.0, 2.0))
    assert buckets.wait("a", 0.0) == 0.0
    buckets.allow("a", 0.0)
    buckets.allow("a", 0.0)
    assert buckets.wait("a", 0.0) == pytest.approx(0.25)
    assert buckets.wait("a", 0.0) == pytest.approx(0.25)  # asking charged nothing
    assert buckets.wait("a", 0.25) == 0.0
    assert buckets.wait("a", 0.0, cost=3.0) == math.inf  # more than a bucket holds: never


def test_clock_going_backwards_gives_no_tokens() -> None:
    buckets = TokenBuckets(Rate(1.0, 1.0))
    assert buckets.allow("a", 50.0)
    assert not buckets.allow("a", 10.0)
    assert not buckets.allow("a", 50.5)
    assert buckets.allow("a", 51.0)


def test_table_is_bounded_and_evicts_least_recently_used() -> None:
    buckets = TokenBuckets(Rate(1.0, 1.0), max_keys=3)
    for key in ("a", "b", "c"):
        assert buckets.allow(key, 0.0)
    assert buckets.allow("a", 5.0)  # a is now the most recently used
    assert buckets.allow("d", 5.0)  # evicts b
    assert len(buckets) == 3 and buckets.evictions == 1
    assert not buckets.allow("a", 5.0)  # a kept its (empty) bucket
    assert buckets.allow("b", 5.0)  # b was evicted: starts full again


def test_spoofing_flood_keeps_memory_bounded() -> None:
    buckets = TokenBuckets(Rate(1.0, 3.0), max_keys=100)
    # A source drains its bucket, then 10,000 spoofed sources arrive: the table stays at its bound.
    for _ in range(3):
        assert buckets.allow("active", 0.0)
    for i in range(10_000):
        buckets.allow(("10.0.0.1", i), 0.001)
    assert len(buckets) == 100
    assert buckets.evictions == 10_000 + 1 - 100


def test_unlimited_keeps_no_state() -> None:
    buckets = TokenBuckets(UNLIMITED)
    assert all(buckets.allow(i, 0.0) for i in range(1000))
    assert len(buckets) == 0
    assert buckets.wait("x", 0.0) == 0.0


def test_limiter_counts_per_kind_and_unconfigured_kinds_are_unlimited() -> None:
    limiter = RateLimiter({"store": Rate(1.0, 2.0)}, max_keys=10)
    results = [limiter.allow("store", "peer", 0.0) for _ in range(5)]
    assert results == [True, True, False, False, False]
    assert all(limiter.allow("lookup", "peer", 0.0) for _ in range(5))
    stats = limiter.stats()
    assert stats["store"] == {"rate": "1/s:2", "allowed": 2, "refused": 3, "keys": 1, "evictions": 0}
    assert stats["lookup"]["allowed"] == 5 and stats["lookup"]["refused"] == 0
    assert stats["lookup"]["rate"] == "off"
    assert limiter.wait("store", "peer", 0.0) == pytest.approx(1.0)
    limiter.forget("peer")
    assert limiter.allow("store", "peer", 0.0)


def test_set_rate_reconfigures() -> None:
    limiter = RateLimiter()
    assert limiter.rate("join") is UNLIMITED
    limiter.set_rate("join", Rate.parse("1/s:1"))
    assert limiter.allow("join", "x", 0.0)
    assert not limiter.allow("join", "x", 0.0)
    assert limiter.rate("join") == Rate(1.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(
    per_second=st.floats(min_value=0.01, max_value=1000.0),
    burst=st.floats(min_value=1.0, max_value=100.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_x_time(per_second: float, burst: float, gaps: list[float]) -> None:
    """Whatever the arrival pattern, allowed actions never exceed burst + rate x elapsed time."""
    buckets = TokenBuckets(Rate(per_second, burst))
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        allowed += buckets.allow("k", now)
    assert allowed <= burst + per_second * now + 1e-6


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.integers(min_value=0, max_value=50), max_size=300), max_keys=st.integers(1, 20))
def test_table_never_exceeds_its_bound(keys: list[int], max_keys: int) -> None:
    limiter = RateLimiter({"x": Rate(1.0, 1.0)}, max_keys=max_keys)
    for i, key in enumerate(keys):
        limiter.allow("x", key, float(i))
        assert limiter.keys() <= max_keys
