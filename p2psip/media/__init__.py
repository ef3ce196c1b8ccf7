"""Call audio: RTP/RTCP over asyncio UDP with G.711, a jitter buffer, DTMF, and audio sources and sinks.

The sans-IO parts (:mod:`.rtp`, :mod:`.rtcp`, :mod:`.jitter`, :mod:`.dtmf`, :mod:`.g711`) never touch a
socket or a clock; :class:`MediaSession` (:mod:`.session`) is the thin asyncio adapter that runs them for
one call. See docs/media.md.
"""

from __future__ import annotations

from p2psip.media.analysis import dominant_frequency, goertzel_power, rms
from p2psip.media.call import CallMedia
from p2psip.media.codecs import PCMA, PCMU, Codec, codec
from p2psip.media.dtmf import DtmfEvent, DtmfReceiver, DtmfSender
from p2psip.media.jitter import JitterBuffer
from p2psip.media.rtcp import ReceptionStats
from p2psip.media.rtp import RtpPacket
from p2psip.media.session import MediaSession, MediaStats
from p2psip.media.sources import (
    AsyncIteratorSource,
    AudioFileError,
    AudioSink,
    AudioSource,
    CallbackSink,
    CallbackSource,
    MemorySink,
    QueueSink,
    SilenceSource,
    ToneSource,
    WavSink,
    WavSource,
)

__all__ = [
    "PCMA",
    "PCMU",
    "AsyncIteratorSource",
    "AudioFileError",
    "AudioSink",
    "AudioSource",
    "CallMedia",
    "CallbackSink",
    "CallbackSource",
    "Codec",
    "DtmfEvent",
    "DtmfReceiver",
    "DtmfSender",
    "JitterBuffer",
    "MediaSession",
    "MediaStats",
    "MemorySink",
    "QueueSink",
    "ReceptionStats",
    "RtpPacket",
    "SilenceSource",
    "ToneSource",
    "WavSink",
    "WavSource",
    "codec",
    "dominant_frequency",
    "goertzel_power",
    "rms",
]
