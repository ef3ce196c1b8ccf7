"""The shared ticker's pacing, driven by a fake clock: ticks stay on the start + k * 20 ms grid however late
each timer fires (no drift), missed intervals are caught up, and hopeless delays are skipped while the RTP
clock still advances."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from p2psip.media.session import _Ticker


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self.scheduled: list[tuple[float, Callable[[], None]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Any:
        self.scheduled.append((when, callback))
        return self

    def cancel(self) -> None:
        pass

    def fire_next(self, lateness: float) -> float:
        when, callback = self.scheduled.pop(0)
        self.now = when + lateness
        callback()
        return when


class FakeSession:
    ptime = 20

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.skips = 0
        self.reports = 0

    def _tick_once(self, lateness: float) -> None:
        self.ticks.append(lateness)

    def _skip_tick(self) -> None:
        self.skips += 1

    def _rtcp_due(self, now: float) -> None:
        self.reports += 1


def make_ticker() -> tuple[FakeLoop, _Ticker, list[FakeSession]]:
    loop = FakeLoop()
    ticker = _Ticker(loop, 20)  # type: ignore[arg-type]
    sessions = [FakeSession(), FakeSession()]
    for session in sessions:
        ticker.sessions[session] = None  # type: ignore[index]
    ticker.handle = loop.call_at(ticker._due(), ticker._fire)  # type: ignore[assignment]
    return loop, ticker, sessions


def test_late_timers_do_not_drift() -> None:
    loop, _, sessions = make_ticker()
    rng = random.Random(1)
    whens = [loop.fire_next(rng.uniform(0, 0.015)) for _ in range(500)]
    assert all(abs(w - (100.0 + k * 0.02)) < 1e-9 for k, w in zip(range(1, 501), whens, strict=True))
    assert all(len(s.ticks) == 500 and s.skips == 0 for s in sessions)


def test_a_late_wakeup_catches_up_the_missed_intervals() -> None:
    loop, _, sessions = make_ticker()
    loop.fire_next(0.0)
    loop.fire_next(0.055)  # 55 ms late: this interval and the next two are due
    assert len(sessions[0].ticks) == 1 + 3
    next_when, _ = loop.scheduled[0]
    assert abs(next_when - (100.0 + 5 * 0.02)) < 1e-9  # back on the grid


def test_a_hopeless_delay_is_skipped_but_time_keeps_counting() -> None:
    loop, _, sessions = make_ticker()
    loop.fire_next(1.0)  # the process was stopped for a second
    session = sessions[0]
    assert len(session.ticks) == _Ticker.MAX_CATCH_UP
    assert len(session.ticks) + session.skips == 51  # every interval is accounted for
    next_when, _ = loop.scheduled[0]
    assert abs(next_when - (100.0 + 52 * 0.02)) < 1e-9
