"""A playout (jitter) buffer, sans-IO: packets in, in any order; one frame out per packet interval.

Why it exists: packets arrive late, early, twice, out of order or never, yet the listener (a speaker, or a
WAV file) needs a steady stream of frames, and a recording must keep its duration when packets are lost.

How it behaves (fixed delay, ordered by RTP sequence number, which is what G.711 at a fixed ptime needs):

- playout starts once ``prefetch`` packets are buffered; from then on the caller calls :meth:`pop` once per
  packet interval (its own clock, e.g. every 20 ms of loop time);
- the packet due next is played if present; if it is missing while a later one is buffered, the slot is a
  loss and is *concealed* (``Playout.payload is None``), so the output keeps its length;
- if nothing at all is buffered the buffer *stalls* (``pop`` returns ``None``) rather than inventing audio:
  the packet may just be late, and when the sender stops there is nothing to play. After ``idle_after``
  consecutive empty intervals playout stops and the next packet prefetches again (a new talk spurt);
- a packet for a slot already played or concealed is *late* and dropped; a second copy is a *duplicate*;
- more than ``max_depth`` packets buffered (a burst after a long stall) drops the oldest (``overflow``), which
  bounds the delay;
- a jump of more than ``max_gap`` packets (a restarted source) resynchronises instead of concealing it all.

A slot may hold a *filler* (``push(seq, None)``): a packet of another payload type sharing the sequence
space (RFC 4733 telephone events), played as silence so the audio keeps its timing.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from p2psip.media.rtp import seq_diff

__all__ = ["JitterBuffer", "JitterStats", "Playout", "conceal"]


@dataclass(slots=True, frozen=True)
class Playout:
    """One output slot: ``payload`` is the packet's payload, or ``None`` for a lost packet to conceal."""

    sequence: int  # extended sequence number (does not wrap)
    payload: bytes | None
    filler: bool = False  # the slot belonged to a non-audio packet: play silence

    @property
    def lost(self) -> bool:
        return self.payload is None and not self.filler


@dataclass(slots=True)
class JitterStats:
    pushed: int = 0
    played: int = 0
    concealed: int = 0
    late: int = 0
    duplicates: int = 0
    overflow: int = 0
    underruns: int = 0
    resyncs: int = 0


_FILLER = b""


class JitterBuffer:
    """See the module docstring. Sequence numbers are 16-bit RTP ones; they are unwrapped internally."""

    def __init__(
        self, prefetch: int = 2, max_depth: int = 50, idle_after: int = 25, max_gap: int = 100
    ) -> None:
        if prefetch < 1 or max_depth < prefetch:
            raise ValueError("need 1 <= prefetch <= max_depth")
        self.prefetch = prefetch
        self.max_depth = max_depth
        self.idle_after = idle_after
        self.max_gap = max_gap
        self.stats = JitterStats()
        self._slots: dict[int, bytes] = {}
        self._next: int | None = None  # extended sequence number due next
        self._reference: int | None = None  # last extended sequence number seen, to unwrap new ones
        self._playing = False
        self._started = False  # a slot has been played: from now on older packets are late
        self._empty_pops = 0

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def playing(self) -> bool:
        return self._playing

    def _unwrap(self, seq: int) -> int:
        if self._reference is None:
            extended = seq + (1 << 16)  # room below for reordered packets that precede the first one
        else:
            extended = self._reference + seq_diff(seq, self._reference & 0xFFFF)
        if self._reference is None or extended > self._reference:
            self._reference = extended
        return extended

    def push(self, sequence: int, payload: bytes | None) -> bool:
        """Add a packet (``payload=None``: a filler slot); False if it was dropped as late or duplicate."""
        reference = self._reference
        if reference is not None and sequence == (reference + 1) & 0xFFFF:
            # The next packet in order, as nearly all are: newer than every slot (so neither late nor a
            # duplicate) and not before the one due (the slots due next never run past the newest + 1).
            extended = self._reference = reference + 1
            slots = self._slots
            slots[extended] = _FILLER if payload is None else payload
            self.stats.pushed += 1
            if len(slots) > self.max_depth:
                self._trim()
            return True
        return self._push_any(sequence, payload)

    def _push_any(self, sequence: int, payload: bytes | None) -> bool:
        """:meth:`push` for any packet: reordered, late, duplicate, after a gap or a wrap."""
        extended = self._unwrap(sequence)
        if self._next is not None and extended < self._next and self._started:
            self.stats.late += 1
            return False
        if extended in self._slots:
            self.stats.duplicates += 1
            return False
        if self._next is None or extended < self._next:
            self._next = extended  # before playout starts, an earlier packet may still arrive
        self._slots[extended] = _FILLER if payload is None else payload
        self.stats.pushed += 1
        if len(self._slots) > self.max_depth:
            self._trim()
        return True

    def _trim(self) -> None:
        while len(self._slots) > self.max_depth:
            oldest = min(self._slots)
            del self._slots[oldest]
            self.stats.overflow += 1
            self._next = min(self._slots)

    def pop_ready(self) -> bytes | None:
        """:meth:`pop`'s common case without building a :class:`Playout`: while playing, the payload due
        now if it is buffered (``b""`` for a filler slot), and the slot is played; ``None`` (nothing
        changed) when :meth:`pop` must decide (prefetching, a loss to conceal, a stall)."""
        due = self._next
        if not self._playing or due is None:
            return None
        payload = self._slots.pop(due, None)
        if payload is None:
            return None
        self._next = due + 1
        self._started = True
        self._empty_pops = 0
        self.stats.played += 1
        return payload

    def pop(self) -> Playout | None:
        """The frame due now, or ``None`` while prefetching or stalled (nothing buffered)."""
        if not self._playing:
            if len(self._slots) < self.prefetch:
                return None
            self._playing = True
            self._empty_pops = 0
        return self._take()

    def _take(self) -> Playout | None:
        if not self._slots:
            self.stats.underruns += 1
            self._empty_pops += 1
            if self._empty_pops >= self.idle_after:
                self._playing = False
            return None
        self._empty_pops = 0
        assert self._next is not None
        payload = self._slots.pop(self._next, None)
        if payload is None:
            first = min(self._slots)
            if first - self._next > self.max_gap:
                self.stats.resyncs += 1
                self._next = first
                payload = self._slots.pop(first)
        sequence = self._next
        self._next += 1
        self._started = True
        if payload is None:
            self.stats.concealed += 1
            return Playout(sequence, None)
        self.stats.played += 1
        if payload is _FILLER or not payload:
            return Playout(sequence, None, filler=True)
        return Playout(sequence, payload)

    def drain(self) -> list[Playout]:
        """Everything still buffered, in order, with gaps concealed (for the end of a call)."""
        out: list[Playout] = []
        while self._slots:
            frame = self._take()
            if frame is not None:
                out.append(frame)
        self._playing = False
        return out


def conceal(last_frame: bytes | None, consecutive: int, samples: int) -> bytes:
    """Packet loss concealment: repeat the last good frame, halving it each time, then silence.

    Repeating (rather than inserting silence) hides a single lost 20 ms frame of a steady sound almost
    completely; fading out avoids a buzzing loop when many frames in a row are lost.
    """
    if last_frame is None or consecutive > 3 or len(last_frame) != 2 * samples:
        return bytes(2 * samples)
    values = array("h", last_frame)
    shift = consecutive
    return array("h", [v >> shift for v in values]).tobytes()
