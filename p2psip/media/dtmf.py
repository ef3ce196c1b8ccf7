"""DTMF as RTP telephone events (RFC 4733, which obsoletes RFC 2833), sans-IO.

An event packet's payload is 4 bytes: event code (0-9, 10 = ``*``, 11 = ``#``, 12-15 = A-D), then the E
(end) bit, a reserved bit and 6 bits of volume (dBm0, negated), then a 16-bit duration in timestamp units.
All packets of one event share its RTP timestamp (the event's start); the first has the marker bit; the
duration grows with each packet; the final packet has the E bit and is sent three times (§2.5.1.4) so a
single loss does not lose the end. A receiver therefore sees many packets per digit and must report each digit
once: :class:`DtmfReceiver` keys events by their RTP timestamp.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from p2psip.errors import ParseError

__all__ = ["DtmfEvent", "DtmfReceiver", "DtmfSender", "TelephoneEvent", "digit_to_event", "event_to_digit"]

DIGITS = "0123456789*#ABCD"
_EVENT = struct.Struct("!BBH")


def digit_to_event(digit: str) -> int:
    """The RFC 4733 event code of a DTMF digit (``0-9 * # A-D``, case-insensitive)."""
    index = DIGITS.find(digit.upper()) if len(digit) == 1 else -1
    if index < 0:
        raise ValueError(f"{digit!r} is not a DTMF digit; use 0-9, *, #, A-D")
    return index


def event_to_digit(event: int) -> str:
    """The DTMF digit of an event code, or ``"?"`` for other telephone events (e.g. fax tones)."""
    return DIGITS[event] if 0 <= event < len(DIGITS) else "?"


@dataclass(slots=True, frozen=True)
class TelephoneEvent:
    """The payload of one telephone-event packet."""

    event: int
    end: bool
    volume: int
    duration: int

    @classmethod
    def parse(cls, payload: bytes) -> TelephoneEvent:
        if len(payload) < 4:
            raise ParseError(f"telephone-event payload must be 4 bytes, got {len(payload)}")
        event, flags, duration = _EVENT.unpack_from(payload)
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration)

    def __bytes__(self) -> bytes:
        flags = (0x80 if self.end else 0) | (self.volume & 0x3F)
        return _EVENT.pack(self.event, flags, self.duration & 0xFFFF)


@dataclass(slots=True, frozen=True)
class DtmfEvent:
    """A digit as reported by :class:`DtmfReceiver`."""

    digit: str
    timestamp: int  # RTP timestamp of the event's start
    duration: int  # in timestamp units, as known when reported


@dataclass(slots=True, frozen=True)
class EventPacket:
    """What :meth:`DtmfSender.tick` asks the session to send in place of this interval's audio."""

    payload: bytes
    timestamp: int
    marker: bool


class DtmfSender:
    """Turns queued digits into one event packet per packet interval.

    ``tick(timestamp)`` is called once per interval with the RTP timestamp the interval starts at; it
    returns the packet to send instead of audio, or ``None`` (send audio). Each digit lasts ``duration``
    samples, then its end packet goes out ``end_repeats`` times, then ``gap`` samples of audio separate it
    from the next digit.
    """

    def __init__(
        self,
        samples_per_packet: int = 160,
        duration: int = 800,
        gap: int = 400,
        volume: int = 10,
        end_repeats: int = 3,
    ) -> None:
        self.samples_per_packet = samples_per_packet
        self.duration = max(duration, samples_per_packet)
        self.gap = gap
        self.volume = volume
        self.end_repeats = end_repeats
        self._queue: deque[int] = deque()
        self._event: int | None = None
        self._start = 0
        self._elapsed = 0
        self._ends_sent = 0
        self._gap_left = 0
        self.sent_digits = ""

    def queue(self, digits: str) -> None:
        """Queue digits to send (validated all at once, so a bad string sends nothing)."""
        events = [digit_to_event(d) for d in digits]
        self._queue.extend(events)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._event is not None or self._gap_left > 0

    def tick(self, timestamp: int) -> EventPacket | None:
        if self._event is None:
            if self._gap_left > 0:
                self._gap_left -= self.samples_per_packet
                return None
            if not self._queue:
                return None
            self._event = self._queue.popleft()
            self._start = timestamp
            self._elapsed = 0
            self._ends_sent = 0
            self.sent_digits += DIGITS[self._event]
        first = self._elapsed == 0
        if self._elapsed < self.duration:
            self._elapsed += self.samples_per_packet
        end = self._elapsed >= self.duration
        payload = bytes(TelephoneEvent(self._event, end, self.volume, min(self._elapsed, 0xFFFF)))
        packet = EventPacket(payload, self._start, first)
        if end:
            self._ends_sent += 1
            if self._ends_sent >= self.end_repeats:
                self._event = None
                self._gap_left = self.gap
        return packet


class DtmfReceiver:
    """Reports each received digit once, however many packets (and retransmitted ends) carry it."""

    def __init__(self, remember: int = 16) -> None:
        self._seen: deque[int] = deque(maxlen=remember)
        self.events: list[DtmfEvent] = []

    @property
    def digits(self) -> str:
        return "".join(event.digit for event in self.events)

    def receive(self, timestamp: int, payload: bytes) -> DtmfEvent | None:
        """One telephone-event packet; returns the digit the first time its event is seen, else None.

        Raises :class:`ParseError` for a payload shorter than 4 bytes.
        """
        event = TelephoneEvent.parse(payload)
        if timestamp in self._seen:
            return None
        self._seen.append(timestamp)
        found = DtmfEvent(event_to_digit(event.event), timestamp, event.duration)
        self.events.append(found)
        return found
