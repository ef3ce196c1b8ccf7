"""G.711 µ-law (PCMU) and A-law (PCMA), table-driven.

Why not per-sample Python: a call sends and receives 50 frames of 160 samples a second in each direction,
and one process should carry a thousand calls. So the work runs in C: ``audioop`` (in the standard library
through Python 3.12; the ``audioop-lts`` package gives the same module back from 3.13) where it is there,
else tables built once at import time (every 16-bit sample value encoded into a 65,536-entry table; decoding
through two 256-entry ``bytes.translate`` tables, low and high byte of the result). Both give the same bytes
as the reference functions below for every input (tests/test_media_g711.py checks all 65,536 samples).

``audioop``'s µ-law encoder works on 14 bits with the magnitude of a negative sample rounded *up*
(``-(x >> 2)``), where the reference rounds it down: it differs from the reference by one step for 381 of
the negative values. :func:`ulaw_encode` therefore encodes twice, the samples as they are (right for the
positive ones) and biased by +3 (``ceil((|x| - 3) / 4) == floor(|x| / 4)``: right for the negative ones;
-3..-1 come out as +0, whose code with the sign bit cleared is the reference's 0x7F), and takes each byte
from the first or the second by its sign, with whole-frame integer masks: about 4x faster than the table.

PCM here is always signed 16-bit little-endian, mono, 8 kHz (``bytes``), the format of every source and sink
in :mod:`p2psip.media.sources`.

The per-sample functions follow the ITU-T G.711 reference (the widely used Sun Microsystems code): µ-law
with a bias of 0x84 and a clip at 32,635; A-law on the 13 most significant bits with even-bit inversion
(0x55).
"""

from __future__ import annotations

import sys
import warnings
from array import array

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # "slated for removal in 3.13": audioop-lts then
    try:
        import audioop as _audioop

        _HAVE_AUDIOOP = True
    except ImportError:  # Python 3.13+ without audioop-lts: the tables below
        _HAVE_AUDIOOP = False

__all__ = [
    "COMPILED",
    "alaw_decode",
    "alaw_encode",
    "alaw_to_linear",
    "linear_to_alaw",
    "linear_to_ulaw",
    "table_alaw_decode",
    "table_alaw_encode",
    "table_ulaw_decode",
    "table_ulaw_encode",
    "ulaw_decode",
    "ulaw_encode",
    "ulaw_to_linear",
]

_ULAW_BIAS = 0x84
_ULAW_CLIP = 32635
_ALAW_SEGMENT_ENDS = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def linear_to_ulaw(sample: int) -> int:
    """One signed 16-bit sample to its µ-law byte (the reference algorithm; the tables are built from it)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sample < 0 else sample, _ULAW_CLIP) + _ULAW_BIAS
    exponent = max(0, magnitude.bit_length() - 8)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def ulaw_to_linear(code: int) -> int:
    """One µ-law byte to its signed 16-bit sample."""
    code = ~code & 0xFF
    magnitude = (((code & 0x0F) << 3) + _ULAW_BIAS) << ((code & 0x70) >> 4)
    return _ULAW_BIAS - magnitude if code & 0x80 else magnitude - _ULAW_BIAS


def linear_to_alaw(sample: int) -> int:
    """One signed 16-bit sample to its A-law byte."""
    value = sample >> 3  # A-law works on 13 bits
    if value >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        value = -value - 1
    segment = 0
    while segment < 8 and value > _ALAW_SEGMENT_ENDS[segment]:
        segment += 1
    if segment >= 8:
        return 0x7F ^ mask
    code = segment << 4
    code |= (value >> 1) & 0x0F if segment < 2 else (value >> segment) & 0x0F
    return code ^ mask


def alaw_to_linear(code: int) -> int:
    """One A-law byte to its signed 16-bit sample."""
    code ^= 0x55
    value = (code & 0x0F) << 4
    segment = (code & 0x70) >> 4
    if segment == 0:
        value += 8
    elif segment == 1:
        value += 0x108
    else:
        value = (value + 0x108) << (segment - 1)
    return value if code & 0x80 else -value


def _encode_table(encode: object) -> bytes:
    assert callable(encode)
    # Indexed by the sample's unsigned 16-bit pattern: 0..32767 positive, 32768..65535 negative.
    return bytes(encode(index - 65536 if index >= 32768 else index) for index in range(65536))


def _decode_tables(decode: object) -> tuple[bytes, bytes]:
    assert callable(decode)
    values = [decode(code) & 0xFFFF for code in range(256)]
    return bytes(v & 0xFF for v in values), bytes(v >> 8 for v in values)


_ULAW_ENCODE = _encode_table(linear_to_ulaw)
_ALAW_ENCODE = _encode_table(linear_to_alaw)
_ULAW_LOW, _ULAW_HIGH = _decode_tables(ulaw_to_linear)
_ALAW_LOW, _ALAW_HIGH = _decode_tables(alaw_to_linear)
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _samples(pcm: bytes) -> memoryview | array[int]:
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}")
    if _BIG_ENDIAN_HOST:
        values = array("H", pcm)
        values.byteswap()
        return values
    return memoryview(pcm).cast("H")


def _decode(data: bytes, low: bytes, high: bytes) -> bytes:
    out = bytearray(2 * len(data))
    out[0::2] = data.translate(low)
    out[1::2] = data.translate(high)
    return bytes(out)


def table_ulaw_encode(pcm: bytes) -> bytes:
    """16-bit little-endian PCM to µ-law bytes through the table (the pure-Python path)."""
    return bytes(map(_ULAW_ENCODE.__getitem__, _samples(pcm)))


def table_alaw_encode(pcm: bytes) -> bytes:
    """16-bit little-endian PCM to A-law bytes through the table (the pure-Python path)."""
    return bytes(map(_ALAW_ENCODE.__getitem__, _samples(pcm)))


def table_ulaw_decode(data: bytes) -> bytes:
    """µ-law bytes to 16-bit little-endian PCM through the tables (the pure-Python path)."""
    return _decode(data, _ULAW_LOW, _ULAW_HIGH)


def table_alaw_decode(data: bytes) -> bytes:
    """A-law bytes to 16-bit little-endian PCM through the tables (the pure-Python path)."""
    return _decode(data, _ALAW_LOW, _ALAW_HIGH)


# A µ-law code below 0x80 is a negative sample's: 0xFF marks the bytes to take from the biased encoding.
_NEGATIVE = bytes(0xFF if code < 0x80 else 0 for code in range(256))
_LOW7: dict[int, int] = {}  # frame length -> 0x7F7F...7F as an int


def _c_ulaw_encode(pcm: bytes) -> bytes:
    """16-bit little-endian PCM to µ-law bytes (one byte per sample)."""
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}")
    plain = _audioop.lin2ulaw(pcm, 2)
    biased = _audioop.lin2ulaw(_audioop.bias(pcm, 2, 3), 2)
    size = len(plain)
    low7 = _LOW7.get(size)
    if low7 is None:
        low7 = int.from_bytes(b"\x7f" * size, "little")
        if len(_LOW7) < 16:  # frame sizes of the calls: a handful
            _LOW7[size] = low7
    negative = int.from_bytes(plain.translate(_NEGATIVE), "little")
    chosen = (int.from_bytes(plain, "little") & ~negative) | (
        int.from_bytes(biased, "little") & negative & low7
    )
    return chosen.to_bytes(size, "little")


def _c_alaw_encode(pcm: bytes) -> bytes:
    """16-bit little-endian PCM to A-law bytes (one byte per sample)."""
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}")
    return _audioop.lin2alaw(pcm, 2)


def _c_ulaw_decode(data: bytes) -> bytes:
    """µ-law bytes to 16-bit little-endian PCM."""
    return _audioop.ulaw2lin(data, 2)


def _c_alaw_decode(data: bytes) -> bytes:
    """A-law bytes to 16-bit little-endian PCM."""
    return _audioop.alaw2lin(data, 2)


#: True when the C converters are in use (audioop on a little-endian host).
COMPILED = _HAVE_AUDIOOP and not _BIG_ENDIAN_HOST

ulaw_encode = _c_ulaw_encode if COMPILED else table_ulaw_encode
alaw_encode = _c_alaw_encode if COMPILED else table_alaw_encode
ulaw_decode = _c_ulaw_decode if COMPILED else table_ulaw_decode
alaw_decode = _c_alaw_decode if COMPILED else table_alaw_decode
