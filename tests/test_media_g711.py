"""G.711: the reference per-sample functions against ITU/Sun known values, the tables against the functions,
and the quantisation error bounds of both laws over every 16-bit input."""

from __future__ import annotations

import struct

import pytest

from p2psip.media import g711
from p2psip.media.g711 import (
    alaw_decode,
    alaw_encode,
    alaw_to_linear,
    linear_to_alaw,
    linear_to_ulaw,
    ulaw_decode,
    ulaw_encode,
    ulaw_to_linear,
)

ALL = range(-32768, 32768)
ALL_PCM = struct.pack("<65536h", *ALL)


@pytest.mark.parametrize(
    ("sample", "code"),
    [(0, 0xFF), (-1, 0x7F), (32767, 0x80), (-32768, 0x00), (1000, 0xCE), (-1000, 0x4E)],
)
def test_ulaw_known_codes(sample: int, code: int) -> None:
    assert linear_to_ulaw(sample) == code


@pytest.mark.parametrize(
    ("code", "sample"), [(0xFF, 0), (0x7F, 0), (0x80, 32124), (0x00, -32124), (0xCE, 988)]
)
def test_ulaw_known_values(code: int, sample: int) -> None:
    assert ulaw_to_linear(code) == sample


@pytest.mark.parametrize(("sample", "code"), [(0, 0xD5), (-1, 0x55), (32767, 0xAA), (-32768, 0x2A)])
def test_alaw_known_codes(sample: int, code: int) -> None:
    assert linear_to_alaw(sample) == code


@pytest.mark.parametrize(("code", "sample"), [(0xD5, 8), (0x55, -8), (0xAA, 32256), (0x2A, -32256)])
def test_alaw_known_values(code: int, sample: int) -> None:
    assert alaw_to_linear(code) == sample


def test_tables_match_reference_functions_for_every_sample() -> None:
    assert ulaw_encode(ALL_PCM) == bytes(linear_to_ulaw(x) for x in ALL)
    assert alaw_encode(ALL_PCM) == bytes(linear_to_alaw(x) for x in ALL)
    codes = bytes(range(256))
    assert ulaw_decode(codes) == struct.pack("<256h", *(ulaw_to_linear(c) for c in codes))
    assert alaw_decode(codes) == struct.pack("<256h", *(alaw_to_linear(c) for c in codes))


def test_table_and_compiled_paths_give_the_reference_bytes() -> None:
    """Both converters, whichever is in use: the C one (audioop, with its µ-law rounding of negative samples
    corrected) and the tables, byte for byte against the reference functions over every 16-bit sample."""
    ulaw = bytes(linear_to_ulaw(x) for x in ALL)
    alaw = bytes(linear_to_alaw(x) for x in ALL)
    codes = bytes(range(256))
    ulaw_pcm = struct.pack("<256h", *(ulaw_to_linear(c) for c in codes))
    alaw_pcm = struct.pack("<256h", *(alaw_to_linear(c) for c in codes))
    paths = [(g711.table_ulaw_encode, g711.table_alaw_encode, g711.table_ulaw_decode, g711.table_alaw_decode)]
    if g711.COMPILED:
        paths.append((g711._c_ulaw_encode, g711._c_alaw_encode, g711._c_ulaw_decode, g711._c_alaw_decode))
    for u_enc, a_enc, u_dec, a_dec in paths:
        assert u_enc(ALL_PCM) == ulaw
        assert a_enc(ALL_PCM) == alaw
        assert u_dec(codes) == ulaw_pcm
        assert a_dec(codes) == alaw_pcm
        for size in (0, 2, 320):  # short frames and the 20 ms one, sliced from the same samples
            assert u_enc(ALL_PCM[:size]) == ulaw[: size // 2]
        with pytest.raises(ValueError):
            u_enc(b"\x00\x01\x02")


def test_ulaw_round_trip_error_is_within_half_a_step() -> None:
    decoded = struct.unpack("<65536h", ulaw_decode(ulaw_encode(ALL_PCM)))
    # a mu-law step is 2**(exponent+3) wide for |x|+132 in [2**(exponent+7), 2**(exponent+8)): half of it
    # is at most (|x| + 132) / 32
    worst = max(abs(x - y) - (abs(x) + 132) / 32 for x, y in zip(ALL, decoded, strict=True))
    assert worst <= 0


def test_alaw_round_trip_error_is_within_half_a_step() -> None:
    decoded = struct.unpack("<65536h", alaw_decode(alaw_encode(ALL_PCM)))
    worst = max(abs(x - y) - (abs(x) / 32 + 8) for x, y in zip(ALL, decoded, strict=True))
    assert worst <= 0


def test_decoded_values_re_encode_to_the_same_code() -> None:
    codes = bytes(range(256))
    assert alaw_encode(alaw_decode(codes)) == codes
    # 0x7F is mu-law's "negative zero": it decodes to 0, which encodes as 0xFF
    assert ulaw_encode(ulaw_decode(codes)) == codes.replace(b"\x7f", b"\xff")


def test_odd_length_pcm_is_refused() -> None:
    with pytest.raises(ValueError, match="even number of bytes"):
        ulaw_encode(b"\x00\x01\x02")


def test_agrees_with_cpython_audioop_where_it_still_exists() -> None:
    """An independent reference (C code) on Python <= 3.12: decoding both laws and A-law encoding agree
    exactly. (audioop's mu-law *encoder* truncates negative samples to 14 bits the other way round, so it
    differs by one code for some negative inputs; the ITU G.191 reference agrees with ours, see the known
    codes above: -1 -> 0x7F.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    codes = bytes(range(256))
    assert audioop.ulaw2lin(codes, 2) == ulaw_decode(codes)
    assert audioop.alaw2lin(codes, 2) == alaw_decode(codes)
    assert audioop.lin2alaw(ALL_PCM, 2) == alaw_encode(ALL_PCM)


def test_encode_frame_remembers_repeating_frames_and_stays_bounded() -> None:
    """The per-process memory of encoded frames (silence, tones, prompts played to many calls) gives the same
    bytes as encoding, serves a repeated frame without encoding it again, and never grows past its bound."""
    from p2psip.media import codecs

    frame = ALL_PCM[1000:1320]
    first = codecs.encode_frame(codecs.PCMU, frame)
    assert first == codecs.PCMU.encode(frame)
    assert codecs.encode_frame(codecs.PCMU, bytes(frame)) is first  # an equal frame: remembered
    assert codecs.encode_frame(codecs.PCMA, frame) == codecs.PCMA.encode(frame)  # per encoder
    assert codecs.encode_frame(codecs.PCMU, bytearray(frame)) == first  # unhashable input: encoded
    for start in range(0, 2 * (codecs._FRAME_CACHE_SIZE + 10), 2):
        chunk = ALL_PCM[start : start + 320]
        assert codecs.encode_frame(codecs.PCMU, chunk) == ulaw_encode(chunk)
    assert 0 < len(codecs._FRAMES[codecs.PCMU.encode]) <= codecs._FRAME_CACHE_SIZE
