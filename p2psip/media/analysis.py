"""Small signal measurements for checking what a call carried: Goertzel power, dominant tone, RMS.

The Goertzel algorithm computes the power of one frequency bin in O(n) with no FFT library, which is all a
test needs to say "the recording's energy peak is at 1 kHz".
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable

__all__ = ["dominant_frequency", "goertzel_power", "pcm_samples", "rms"]


def pcm_samples(pcm: bytes) -> array[int]:
    """16-bit little-endian PCM bytes as an array of ints."""
    return array("h", pcm[: len(pcm) - len(pcm) % 2])


def goertzel_power(pcm: bytes, frequency: float, sample_rate: int = 8000) -> float:
    """The power of ``frequency`` in ``pcm``, normalised by the number of samples."""
    samples = pcm_samples(pcm)
    if not samples:
        return 0.0
    coefficient = 2 * math.cos(2 * math.pi * frequency / sample_rate)
    previous = before = 0.0
    for value in samples:
        previous, before = value + coefficient * previous - before, previous
    power = previous * previous + before * before - coefficient * previous * before
    return power / len(samples)


def dominant_frequency(pcm: bytes, candidates: Iterable[float], sample_rate: int = 8000) -> float:
    """The candidate frequency with the most energy in ``pcm``."""
    return max(candidates, key=lambda frequency: goertzel_power(pcm, frequency, sample_rate))


def rms(pcm: bytes) -> float:
    """Root mean square level of ``pcm`` (0 for silence, about 23,170 for a full-scale sine)."""
    samples = pcm_samples(pcm)
    return math.sqrt(sum(v * v for v in samples) / len(samples)) if samples else 0.0
