"""The audio codecs a call can use: G.711 µ-law (PCMU, static payload type 0) and A-law (PCMA, 8)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from p2psip.media.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

__all__ = ["CODECS", "PCMA", "PCMU", "Codec", "codec", "encode_frame"]


@dataclass(frozen=True, slots=True)
class Codec:
    """A payload format: its SDP name, static RTP payload type, clock rate and PCM converters."""

    name: str
    payload_type: int
    clock_rate: int
    encode: Callable[[bytes], bytes]
    decode: Callable[[bytes], bytes]

    def __str__(self) -> str:
        return f"{self.name}/{self.clock_rate}"


PCMU = Codec("PCMU", 0, 8000, ulaw_encode, ulaw_decode)
PCMA = Codec("PCMA", 8, 8000, alaw_encode, alaw_decode)
CODECS = {"PCMU": PCMU, "PCMA": PCMA}


def codec(spec: str | int | Codec, payload_type: int | None = None) -> Codec:
    """A codec by name (``"PCMU"``, case-insensitive), static payload type (0, 8) or itself; with
    ``payload_type`` the same codec under another (negotiated) payload type number."""
    if isinstance(spec, Codec):
        found = spec
    elif isinstance(spec, int):
        matches = [c for c in CODECS.values() if c.payload_type == spec]
        if not matches:
            raise ValueError(f"no codec with static payload type {spec}; supported: PCMU (0), PCMA (8)")
        found = matches[0]
    else:
        key = spec.split("/")[0].upper()
        if key not in CODECS:
            raise ValueError(f"unsupported codec {spec!r}; supported: PCMU, PCMA")
        found = CODECS[key]
    if payload_type is not None and payload_type != found.payload_type:
        return Codec(found.name, payload_type, found.clock_rate, found.encode, found.decode)
    return found


# Encoded frames of PCM that repeats, per encoder: silence (hold, a muted side), a tone, a prompt or hold
# music played to many calls at once. A hit costs a hash of the 320-byte frame and a lookup (about 0.3 µs)
# where encoding costs 1-4 µs; a miss (speech) costs the same 0.3 µs more. Bounded: when full it starts
# again, so frames that stopped repeating do not stay.
_FRAME_CACHE_SIZE = 512
_FRAMES: dict[Callable[[bytes], bytes], dict[bytes, bytes]] = {}


def encode_frame(codec: Codec, pcm: bytes | bytearray | memoryview) -> bytes:
    """``codec.encode(pcm)``, remembered for frames that repeat (see above); same bytes either way."""
    if not isinstance(pcm, bytes):  # a bytearray or memoryview from a callback source: not hashable
        return codec.encode(bytes(pcm))
    frames = _FRAMES.get(codec.encode)
    if frames is None:
        frames = _FRAMES[codec.encode] = {}
    payload = frames.get(pcm)
    if payload is None:
        payload = codec.encode(pcm)
        if len(frames) >= _FRAME_CACHE_SIZE:
            frames.clear()
        frames[pcm] = payload
    return payload
