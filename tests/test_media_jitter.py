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


def _played(buffer: JitterBuffer, fast: bool) -> list[tuple[int, bytes | None, bool] | None]:
    """One tick's output as the session's tick takes it: pop_ready first (fast), else pop."""
    if fast:
        due = buffer._next
        payload = buffer.pop_ready()
        if payload is not None:
            assert due is not None
            return [(due, payload or None, not payload)]
    frame = buffer.pop()
    return [None if frame is None else (frame.sequence, frame.payload, frame.filler)]


@pytest.mark.parametrize("seed", range(40))
def test_the_fast_paths_play_exactly_what_pop_plays(seed: int) -> None:
    """pop_ready (the tick's common case) and push's in-order path change nothing: the same arrivals
    (reordered, lost, duplicated, late, fillers, a wrap of the 16-bit sequence, a restart) give the same
    frames and counters as the general path."""
    rng = random.Random(seed)
    start = rng.choice([0, 65500, rng.randrange(65536)])
    arrivals: list[tuple[int, bytes | None]] = []
    sequence = start
    for _ in range(300):
        roll = rng.random()
        if roll < 0.05:
            sequence += rng.randint(2, 5)  # a loss
        elif roll < 0.06:
            sequence += rng.randint(200, 400)  # a restart: resync
        else:
            sequence += 1
        payload = None if rng.random() < 0.05 else bytes([sequence & 0xFF]) * 4
        arrivals.append((sequence & 0xFFFF, payload))
        if rng.random() < 0.05:
            arrivals.append(arrivals[-1])  # a duplicate
    for i in range(len(arrivals) - 1):
        if rng.random() < 0.1:
            arrivals[i], arrivals[i + 1] = arrivals[i + 1], arrivals[i]  # reordered
    ticks = [index % 2 == 1 or rng.random() < 0.02 for index in range(len(arrivals))]
    outputs = []
    for fast in (False, True):
        buffer = JitterBuffer(prefetch=3, max_depth=20)
        push = buffer.push if fast else buffer._push_any
        played = []
        for (seq, payload), tick in zip(arrivals, ticks, strict=True):
            push(seq, payload)
            if tick:
                played += _played(buffer, fast)
        while len(buffer):
            played += _played(buffer, fast)
        outputs.append((played, buffer.stats))
    assert outputs[0] == outputs[1]
    stats = outputs[0][1]
    assert stats.duplicates and stats.overflow and stats.played > 100  # not only the in-order case ran
