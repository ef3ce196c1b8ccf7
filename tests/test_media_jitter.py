"""The jitter buffer under a seeded schedule of delay, reordering and loss, driven by a simulated clock."""

from __future__ import annotations

import random

import pytest

from p2psip.media.jitter import JitterBuffer, Playout, conceal


def _simulate(
    buffer: JitterBuffer, count: int, loss: float, max_delay_ms: int, seed: int, first_seq: int = 65000
) -> tuple[list[Playout], set[int]]:
    """Send ``count`` packets every 20 ms with random delays and losses; pop every 20 ms; drain at the end."""
    rng = random.Random(seed)
    lost = {i for i in range(1, count - 1) if rng.random() < loss}  # first and last arrive (span is known)
    arrivals = sorted(
        (i * 20 + rng.randint(0, max_delay_ms), i) for i in range(count) if i not in lost
    )  # simulated ms
    out: list[Playout] = []
    pending = list(arrivals)
    now = 0
    while pending:
        while pending and pending[0][0] <= now:
            _, i = pending.pop(0)
            buffer.push((first_seq + i) & 0xFFFF, i.to_bytes(2, "big"))
        frame = buffer.pop()
        if frame is not None:
            out.append(frame)
        now += 20
    out.extend(buffer.drain())
    return out, lost


def test_reordering_is_undone_and_losses_are_concealed_in_place() -> None:
    buffer = JitterBuffer(prefetch=3)
    out, lost = _simulate(buffer, count=500, loss=0.05, max_delay_ms=50, seed=7)
    assert len(lost) > 10  # the schedule really loses packets
    assert len(out) == 500  # the output keeps its duration
    for index, frame in enumerate(out):
        if index in lost:
            assert frame.lost
        else:
            assert frame.payload == index.to_bytes(2, "big")  # in order, across the 16-bit wrap
    assert buffer.stats.concealed == len(lost)
    assert buffer.stats.late == 0 and buffer.stats.played == 500 - len(lost)


def test_packets_later_than_their_slot_are_dropped_and_the_slot_concealed() -> None:
    buffer = JitterBuffer(prefetch=1)
    out, lost = _simulate(buffer, count=400, loss=0.0, max_delay_ms=120, seed=3)
    assert not lost
    assert buffer.stats.late > 0
    assert len(out) == 400  # late packets became concealed slots: the duration is still right
    assert buffer.stats.concealed == buffer.stats.late
    played = [int.from_bytes(f.payload, "big") for f in out if f.payload is not None]
    assert played == sorted(played)


def test_duplicates_are_dropped() -> None:
    buffer = JitterBuffer(prefetch=1)
    assert buffer.push(10, b"a")
    assert not buffer.push(10, b"a")
    assert buffer.stats.duplicates == 1


def test_stalls_when_empty_instead_of_inventing_audio() -> None:
    buffer = JitterBuffer(prefetch=2, idle_after=3)
    assert buffer.pop() is None  # prefetching
    buffer.push(1, b"x")
    assert buffer.pop() is None  # still prefetching (1 of 2)
    buffer.push(2, b"y")
    assert buffer.pop() == Playout(65537, b"x")
    assert buffer.pop() == Playout(65538, b"y")
    assert [buffer.pop() for _ in range(3)] == [None, None, None]
    assert not buffer.playing and buffer.stats.underruns == 3
    buffer.push(3, b"z")  # the next talk spurt prefetches again
    assert buffer.pop() is None
    buffer.push(4, b"w")
    assert buffer.pop() == Playout(65539, b"z")


def test_filler_slots_keep_timing_for_other_payload_types() -> None:
    buffer = JitterBuffer(prefetch=1)
    buffer.push(1, b"a")
    buffer.push(2, None)  # e.g. a telephone-event packet
    buffer.push(3, b"c")
    frames = [buffer.pop(), buffer.pop(), buffer.pop()]
    assert [f.filler for f in frames if f] == [False, True, False]
    assert not any(f.lost for f in frames if f)


def test_overflow_bounds_the_delay_and_a_big_jump_resyncs() -> None:
    buffer = JitterBuffer(prefetch=1, max_depth=5, max_gap=10)
    for seq in range(10):
        buffer.push(seq, b"p")
    assert len(buffer) == 5 and buffer.stats.overflow == 5
    assert buffer.pop() == Playout(65536 + 5, b"p")
    buffer.drain()
    buffer.push(1000, b"q")
    buffer.push(1001, b"r")
    assert buffer.pop() == Playout(65536 + 1000, b"q")
    assert buffer.stats.resyncs == 1


def test_concealment_repeats_then_fades_to_silence() -> None:
    frame = (1000).to_bytes(2, "little", signed=True) * 160
    assert conceal(frame, 1, 160) == (500).to_bytes(2, "little", signed=True) * 160
    assert conceal(frame, 4, 160) == bytes(320)
    assert conceal(None, 1, 160) == bytes(320)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        JitterBuffer(prefetch=0)
