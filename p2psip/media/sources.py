"""Where a call's audio comes from and where it goes: WAV files, tones, silence, Python code.

Everything here speaks one format, the one G.711 carries: signed 16-bit little-endian mono PCM at 8 kHz, in
frames of ``samples`` samples (160 = 20 ms). A **source** has ``read(samples) -> bytes | None`` (exactly
``2 * samples`` bytes; ``None`` once it has ended) and ``close()``; a **sink** has ``write(pcm)`` and
``close()``. They are plain synchronous objects because the media session calls them from its 20 ms tick and
must never wait; the async-iterator adapters bridge to ``async`` code with a small buffer.
"""

from __future__ import annotations

import asyncio
import functools
import math
import wave
from array import array
from collections import deque
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import Protocol

from p2psip.errors import P2PSIPError

__all__ = [
    "SAMPLE_RATE",
    "AsyncIteratorSource",
    "AudioFileError",
    "AudioSink",
    "AudioSource",
    "CallbackSink",
    "CallbackSource",
    "MemorySink",
    "QueueSink",
    "SilenceSource",
    "ToneSource",
    "WavSink",
    "WavSource",
    "read_wav",
    "resample",
    "write_wav",
]

SAMPLE_RATE = 8000


class AudioFileError(P2PSIPError, ValueError):
    """An audio file that cannot be read or written as 16-bit PCM WAV (the message says why)."""


class AudioSource(Protocol):
    def read(self, samples: int) -> bytes | None: ...

    def close(self) -> None: ...


class AudioSink(Protocol):
    def write(self, pcm: bytes) -> None: ...

    def close(self) -> None: ...


def _to_int16(raw: bytes, width: int) -> array[int]:
    if width == 2:
        out = array("h", raw)
    elif width == 1:  # 8-bit WAV is unsigned
        out = array("h", [(b - 128) << 8 for b in raw])
    elif width == 3:
        out = array(
            "h", [int.from_bytes(raw[i + 1 : i + 3], "little", signed=True) for i in range(0, len(raw), 3)]
        )
    elif width == 4:
        out = array("h", [v >> 16 for v in array("i", raw)])
    else:
        raise AudioFileError(f"unsupported WAV sample width: {width} bytes")
    return out


def resample(samples: array[int], from_rate: int, to_rate: int = SAMPLE_RATE) -> array[int]:
    """Change the sample rate: area averaging when going down (a cheap anti-alias filter), linear
    interpolation when going up. Good enough for speech and tones; it is not a studio resampler."""
    if from_rate == to_rate or not samples:
        return array("h", samples)
    ratio = from_rate / to_rate
    count = int(len(samples) / ratio)
    out = array("h", bytes(2 * count))
    if ratio > 1:
        prefix = [0]
        total = 0
        for value in samples:
            total += value
            prefix.append(total)
        for i in range(count):
            start = int(i * ratio)
            end = max(start + 1, min(len(samples), int((i + 1) * ratio)))
            out[i] = round((prefix[end] - prefix[start]) / (end - start))
    else:
        last = len(samples) - 1
        for i in range(count):
            position = i * ratio
            left = int(position)
            right = min(left + 1, last)
            fraction = position - left
            out[i] = round(samples[left] * (1 - fraction) + samples[right] * fraction)
    return out


def read_wav(path: str | Path) -> bytes:
    """A whole PCM WAV file as 8 kHz mono 16-bit PCM (channels averaged, rate converted)."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise AudioFileError(f"{path}: no such file") from None
    except (wave.Error, EOFError) as error:
        raise AudioFileError(f"{path}: not a PCM WAV file ({error}); convert it to 16-bit PCM WAV") from None
    samples = _to_int16(raw, width)
    if channels > 1:
        frames = len(samples) // channels
        samples = array(
            "h", [sum(samples[i * channels : (i + 1) * channels]) // channels for i in range(frames)]
        )
    return resample(samples, rate).tobytes()


def write_wav(path: str | Path, audio: AudioSource | bytes, *, max_seconds: float = 3600.0) -> Path:
    """Write a finite source (e.g. ``ToneSource(440, duration=2)``) or 8 kHz PCM bytes to a WAV file:
    how a greeting or a test signal is made. A source still playing after ``max_seconds`` is an error (a
    source without a duration never ends)."""
    sink = WavSink(path)
    try:
        if isinstance(audio, bytes | bytearray):
            sink.write(bytes(audio))
        else:
            limit = round(max_seconds * SAMPLE_RATE)
            while (frame := audio.read(160)) is not None:
                if sink.samples >= limit:
                    raise ValueError(f"{path}: the source is still playing after {max_seconds:g} s")
                sink.write(frame)
    finally:
        sink.close()
    return sink.path


class WavSource:
    """Plays a WAV file (any PCM rate/channels, converted on open); ``loop=True`` repeats it forever."""

    def __init__(self, path: str | Path, *, loop: bool = False) -> None:
        self.pcm = read_wav(path)
        self.loop = loop and bool(self.pcm)
        self._offset = 0

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE

    def read(self, samples: int) -> bytes | None:
        size = 2 * samples
        if self._offset >= len(self.pcm):
            if not self.loop:
                return None
            self._offset = 0
        chunk = self.pcm[self._offset : self._offset + size]
        self._offset += size
        while len(chunk) < size:
            if self.loop:
                self._offset = size - len(chunk)
                chunk += self.pcm[: size - len(chunk)]
            else:
                chunk += bytes(size - len(chunk))
        return chunk

    def close(self) -> None:
        pass


class _Countdown:
    """What is left of a generated source's ``duration`` (None: forever), counted in samples."""

    def __init__(self, duration: float | None) -> None:
        self.remaining = None if duration is None else round(duration * SAMPLE_RATE)

    def take(self, samples: int) -> bool:
        """Whether another frame is due (the last one may run past the duration, as a frame is whole)."""
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= samples
        return True


@functools.lru_cache(maxsize=32)
def _tone_table(frequencies: tuple[float, ...], amplitude: float) -> bytes:
    """Two seconds of the tone (so any frame is one slice); cached, since a call centre plays one tone."""
    scale = 32767 * amplitude / len(frequencies)
    values = array(
        "h",
        [
            round(scale * sum(math.sin(2 * math.pi * f * n / SAMPLE_RATE) for f in frequencies))
            for n in range(SAMPLE_RATE)
        ],
    )
    return values.tobytes() * 2


@functools.lru_cache(maxsize=32)
def _tone_frames(frequencies: tuple[float, ...], amplitude: float, samples: int) -> tuple[bytes, ...]:
    """The tone's second cut into frames of ``samples`` (which divides the sample rate), built once and
    shared by every source of that tone. Why: a frame is looked up by value in the encoder's memory
    (:func:`p2psip.media.codecs.encode_frame`), and a bytes object hashes its 320 bytes once and then keeps
    the hash; a fresh slice per tick was hashed again every 20 ms (about a third of that lookup's cost, per
    call and tick, measured with callgrind)."""
    table = _tone_table(frequencies, amplitude)
    return tuple(table[2 * start : 2 * (start + samples)] for start in range(0, SAMPLE_RATE, samples))


@functools.lru_cache(maxsize=16)
def _silence(samples: int) -> bytes:
    """One frame of silence per frame size, shared (hashed once: see :func:`_tone_frames`)."""
    return bytes(2 * samples)


class ToneSource:
    """A sine (or the sum of several, e.g. a DTMF pair), at ``amplitude`` of full scale, for ``duration``
    seconds or forever. One second is precomputed and sliced, so a tone costs no arithmetic per frame
    (exact for whole-hertz frequencies)."""

    def __init__(
        self,
        frequency: float | tuple[float, ...] = 1000.0,
        *,
        amplitude: float = 0.3,
        duration: float | None = None,
    ) -> None:
        frequencies = frequency if isinstance(frequency, tuple) else (frequency,)
        if not 0 < amplitude <= 1 or not frequencies:
            raise ValueError("amplitude must be in (0, 1] and at least one frequency given")
        self._key = (tuple(float(f) for f in frequencies), float(amplitude))
        self._period = _tone_table(*self._key)
        self._position = 0
        self._left = _Countdown(duration)
        self._frames: tuple[bytes, ...] = ()  # shared frames of _frame_samples (when that divides a second)
        self._frame_samples = 0

    def read(self, samples: int) -> bytes | None:
        if not self._left.take(samples):
            return None
        position = self._position
        if samples != self._frame_samples:
            self._frame_samples = samples
            divides = 0 < samples <= SAMPLE_RATE and not SAMPLE_RATE % samples
            self._frames = _tone_frames(*self._key, samples) if divides else ()
        if self._frames and not position % samples:  # the common case: a shared frame, hashed once
            self._position = (position + samples) % SAMPLE_RATE
            return self._frames[position // samples]
        start = position * 2
        chunk = self._period[start : start + 2 * samples]
        self._position = (self._position + samples) % SAMPLE_RATE
        if len(chunk) < 2 * samples:  # frames longer than a second
            chunk = (chunk + self._period * (samples // SAMPLE_RATE + 1))[: 2 * samples]
        return chunk

    def close(self) -> None:
        pass


class SilenceSource:
    """Silence for ``duration`` seconds, or forever."""

    def __init__(self, duration: float | None = None) -> None:
        self._left = _Countdown(duration)

    def read(self, samples: int) -> bytes | None:
        return _silence(samples) if self._left.take(samples) else None

    def close(self) -> None:
        pass


class CallbackSource:
    """Calls ``produce(samples)`` every frame; it returns PCM bytes (padded/truncated to the frame) or None
    to end. It runs inside the event loop's tick: keep it quick."""

    def __init__(self, produce: Callable[[int], bytes | None]) -> None:
        self._produce = produce

    def read(self, samples: int) -> bytes | None:
        chunk = self._produce(samples)
        if chunk is None:
            return None
        size = 2 * samples
        return chunk[:size] if len(chunk) >= size else chunk + bytes(size - len(chunk))

    def close(self) -> None:
        pass


class AsyncIteratorSource:
    """Audio from an async iterator of PCM chunks (any sizes). A task keeps up to ``buffer_frames`` frames
    ready; if the iterator falls behind, the call hears silence rather than stalling. Ends when the
    iterator does and everything it gave was played."""

    def __init__(self, chunks: AsyncIterable[bytes], *, buffer_frames: int = 10) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._limit = buffer_frames * 320
        self._room = asyncio.Event()
        self._done = False
        self._task: asyncio.Task[None] | None = None
        self.underruns = 0

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for chunk in self._chunks:
                self._buffer += chunk
                while len(self._buffer) >= self._limit:
                    self._room.clear()
                    await self._room.wait()
        finally:
            self._done = True

    def read(self, samples: int) -> bytes | None:
        self._start()
        size = 2 * samples
        if len(self._buffer) < size:
            if self._done:
                if not self._buffer:
                    return None
                self._buffer += bytes(size - len(self._buffer))
            else:
                self.underruns += 1
                return bytes(size)
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._room.set()
        return chunk

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


class WavSink:
    """Records 8 kHz mono 16-bit PCM to a WAV file as frames arrive."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        except OSError as error:
            raise AudioFileError(f"{path}: cannot write the recording ({error.strerror})") from None
        self._wav: wave.Wave_write | None = wave.open(self._file, "wb")  # noqa: SIM115
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self.samples = 0

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE

    def write(self, pcm: bytes) -> None:
        if self._wav is not None:
            self._wav.writeframes(pcm)
            self.samples += len(pcm) // 2

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None
            self._file.close()


class MemorySink:
    """Keeps everything received in ``pcm`` (handy for tests and analysis)."""

    def __init__(self) -> None:
        self.pcm = bytearray()
        self.closed = False

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE

    def write(self, pcm: bytes) -> None:
        self.pcm += pcm

    def close(self) -> None:
        self.closed = True


class CallbackSink:
    """Calls ``consume(pcm)`` with every received frame (inside the loop's tick: keep it quick)."""

    def __init__(self, consume: Callable[[bytes], None]) -> None:
        self._consume = consume

    def write(self, pcm: bytes) -> None:
        self._consume(pcm)

    def close(self) -> None:
        pass


class QueueSink:
    """Received frames as an async iterator: ``async for pcm in sink: ...`` ends when the call's media
    closes. At most ``max_frames`` wait; beyond that the oldest are dropped (a slow consumer must not
    grow memory without bound) and counted in ``dropped``."""

    def __init__(self, max_frames: int = 500) -> None:
        self._frames: deque[bytes | None] = deque()
        self._max = max_frames
        self._ready = asyncio.Event()
        self.dropped = 0

    def write(self, pcm: bytes) -> None:
        if len(self._frames) >= self._max:
            self._frames.popleft()
            self.dropped += 1
        self._frames.append(pcm)
        self._ready.set()

    def close(self) -> None:
        self._frames.append(None)
        self._ready.set()

    def __aiter__(self) -> QueueSink:
        return self

    async def __anext__(self) -> bytes:
        # not an async generator: the compiled build (tools/build_compiled.py) compiles this module, and
        # mypyc does not implement those
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        frame = self._frames.popleft()
        if frame is None:
            raise StopAsyncIteration
        return frame
