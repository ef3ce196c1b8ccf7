"""Audio sources and sinks: WAV in (resampled from other rates, stereo mixed down, other sample widths),
WAV out, tones, silence, callbacks and async iterators; the analysis helpers they are checked with."""

from __future__ import annotations

import asyncio
import math
import struct
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2psip.media import (
    AsyncIteratorSource,
    AudioFileError,
    CallbackSink,
    CallbackSource,
    MemorySink,
    QueueSink,
    SilenceSource,
    ToneSource,
    WavSink,
    WavSource,
    dominant_frequency,
    rms,
)
from p2psip.media.sources import read_wav, resample, write_wav

CANDIDATES = [300, 500, 700, 1000, 1400, 2000, 3000]


def write_tone_wav(
    path: Path, rate: int, channels: int, width: int, seconds: float, frequency: float
) -> None:
    frames = []
    for n in range(int(rate * seconds)):
        value = 0.5 * math.sin(2 * math.pi * frequency * n / rate)
        if width == 1:
            sample = struct.pack("<B", int(128 + 127 * value))
        elif width == 2:
            sample = struct.pack("<h", int(32767 * value))
        else:
            sample = int(2147483647 * value).to_bytes(4, "little", signed=True)[4 - width :]
        frames.append(sample * channels)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(b"".join(frames))


@pytest.mark.parametrize(
    ("rate", "channels", "width"),
    [(8000, 1, 2), (16000, 2, 2), (44100, 2, 2), (48000, 1, 2), (4000, 1, 2), (8000, 1, 1), (22050, 1, 3)],
)
def test_wav_source_converts_to_8khz_mono(tmp_path: Path, rate: int, channels: int, width: int) -> None:
    path = tmp_path / "in.wav"
    frequency = 1000 if rate > 4000 else 700  # below the Nyquist limit of the source
    write_tone_wav(path, rate, channels, width, 0.5, frequency)
    source = WavSource(path)
    assert source.duration == pytest.approx(0.5, abs=0.002)
    frames = []
    while (frame := source.read(160)) is not None:
        assert len(frame) == 320
        frames.append(frame)
    assert len(frames) == 25
    pcm = b"".join(frames)
    assert dominant_frequency(pcm, CANDIDATES) == frequency
    assert rms(pcm) == pytest.approx(0.5 * 32767 / math.sqrt(2), rel=0.15)


def test_wav_source_loops_and_pads(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    write_tone_wav(path, 8000, 1, 2, 0.03, 1000)  # 240 samples: 1.5 frames
    once = WavSource(path)
    assert once.read(160) is not None
    last = once.read(160)
    assert last is not None and last[160:] == bytes(160)  # padded with silence
    assert once.read(160) is None
    looped = WavSource(path, loop=True)
    assert all(looped.read(160) is not None for _ in range(10))


def test_wav_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match="no such file"):
        WavSource(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioFileError, match="not a PCM WAV file"):
        read_wav(bad)
    with pytest.raises(AudioFileError, match="cannot write"):
        WavSink(tmp_path / "no" / "dir" / "out.wav")


def test_wav_sink_writes_8khz_mono_16bit(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    sink = WavSink(path)
    tone = ToneSource(1000)
    for _ in range(50):
        frame = tone.read(160)
        assert frame is not None
        sink.write(frame)
    assert sink.duration == 1.0
    sink.close()
    sink.close()
    pcm = read_wav(path)
    assert len(pcm) == 16000 and dominant_frequency(pcm, CANDIDATES) == 1000


def test_tone_is_continuous_across_frames_and_ends() -> None:
    tone = ToneSource(1000, amplitude=1.0, duration=0.05)
    frames = [tone.read(160), tone.read(160), tone.read(160)]
    assert frames[2] is not None and tone.read(160) is None  # 0.05 s = 2.5 frames, rounded up to 3
    pcm = b"".join(f for f in frames if f)
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm)
    assert samples[:8] == pytest.approx([0, 23170, 32767, 23170, 0, -23170, -32767, -23170], abs=2)
    assert samples[160:168] == samples[:8]  # phase continues across frames
    dual = ToneSource((697, 1209))
    pair = dual.read(8000)
    assert pair is not None and dominant_frequency(pair, [697, 1209, 1000, 500]) in (697, 1209)
    with pytest.raises(ValueError):
        ToneSource(1000, amplitude=2)


def test_tone_frames_are_shared_objects_with_the_sliced_values() -> None:
    """A tone's frames (and silence) are the same bytes objects call after call and source after source, so
    that the encoder's memory hashes each once; a frame size that does not divide a second, or a read that
    left the frame grid, still gets the right samples."""
    first, second = ToneSource(440), ToneSource(440)
    one = [first.read(160) for _ in range(51)]
    two = [second.read(160) for _ in range(51)]
    assert all(a is b for a, b in zip(one, two, strict=True))
    assert one[50] is one[0] and one[1] is not None and len(one[1]) == 320  # the second repeats, shared
    assert b"".join(f for f in one[:50] if f) == ToneSource(440).read(8000)  # the sliced values
    odd = ToneSource(440)  # 240 samples (30 ms) do not divide 8000 evenly: sliced as before
    reads = [odd.read(240), odd.read(160), odd.read(160)]
    whole = b"".join(f for f in [ToneSource(440).read(560)] if f)
    assert b"".join(f for f in reads if f) == whole  # off the 160-sample grid after 240: still continuous
    assert SilenceSource().read(160) is SilenceSource().read(160)


def test_silence_and_callbacks() -> None:
    silence = SilenceSource(0.02)
    assert silence.read(160) == bytes(320) and silence.read(160) is None
    calls: list[int] = []

    def produce(samples: int) -> bytes | None:
        calls.append(samples)
        return None if len(calls) > 2 else b"\x01\x00"

    source = CallbackSource(produce)
    assert source.read(160) == b"\x01\x00" + bytes(318)
    assert source.read(2) == b"\x01\x00\x00\x00"
    assert source.read(160) is None
    got: list[bytes] = []
    sink = CallbackSink(got.append)
    sink.write(b"ab")
    assert got == [b"ab"]
    memory = MemorySink()
    memory.write(bytes(320))
    assert memory.duration == 0.02


def test_resample_edges() -> None:
    from array import array

    assert len(resample(array("h", [1] * 48000), 48000)) == 8000
    assert list(resample(array("h", [0, 100]), 4000)) == [0, 50, 100, 100]
    assert len(resample(array("h"), 16000)) == 0


async def test_async_iterator_source_buffers_and_ends() -> None:
    gate = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"\x01\x00" * 100
        await gate.wait()
        yield b"\x02\x00" * 100

    source = AsyncIteratorSource(chunks())
    assert source.read(160) == bytes(320)  # nothing yet: silence, counted as an underrun
    await asyncio.sleep(0)
    assert source.underruns == 1
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    first = source.read(160)
    assert first == b"\x01\x00" * 100 + b"\x02\x00" * 60
    last = source.read(160)
    assert last == b"\x02\x00" * 40 + bytes(240)  # the tail, padded
    assert source.read(160) is None
    source.close()


async def test_queue_sink_iterates_until_closed_and_bounds_memory() -> None:
    sink = QueueSink(max_frames=2)
    for i in range(3):
        sink.write(bytes([i]))
    sink.close()
    assert sink.dropped == 1  # a frame had to go to make room
    assert [frame async for frame in sink] == [b"\x01", b"\x02"]


def test_write_wav_saves_a_finite_source_or_pcm_and_refuses_an_endless_one(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "tone.wav", ToneSource(500, duration=0.5))
    pcm = read_wav(path)
    assert len(pcm) == 2 * 4000 and dominant_frequency(pcm, CANDIDATES) == 500
    assert read_wav(write_wav(tmp_path / "copy.wav", pcm)) == pcm
    with pytest.raises(ValueError, match=r"still playing after 0\.1 s"):
        write_wav(tmp_path / "endless.wav", ToneSource(500), max_seconds=0.1)
