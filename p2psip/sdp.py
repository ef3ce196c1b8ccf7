"""SDP (RFC 8866, which obsoletes RFC 4566) and the offer/answer model (RFC 3264) for audio calls.

Two layers:

- :class:`SessionDescription` / :class:`MediaDescription`: a faithful model of any SDP body.
  ``SessionDescription.parse(data)`` checks the grammar (line types, their order, the required ``v=``,
  ``o=``, ``s=``, ``t=`` lines, a connection address for every stream, numeric fields) and raises
  :class:`~p2psip.errors.ParseError` saying which line is wrong; ``bytes(sdp)`` writes it back with CRLF line
  ends in the RFC's order. Unknown attributes are kept (RFC 8866 §5.13 says to ignore them, and a proxy or
  re-offer must not lose them).
- Offer/answer for G.711 audio: :func:`make_offer`, :func:`make_answer` and :func:`negotiated`, which turns
  an offer and its answer into the :class:`MediaParams` a media session needs (who sends what to where). It
  covers codec choice (PCMU 0, PCMA 8, telephone-event on a dynamic payload type), the direction attributes
  and their answer rules (hold and resume), port 0 to reject or remove a stream, IPv4 and IPv6, and the
  ``o=`` version that must grow when a re-offer changes the session (RFC 3264 §8).
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from p2psip.errors import ParseError

__all__ = [
    "DIRECTIONS",
    "Connection",
    "Direction",
    "IceDescription",
    "MediaDescription",
    "MediaParams",
    "Origin",
    "SessionDescription",
    "Timing",
    "make_answer",
    "make_offer",
    "negotiated",
]

Direction = Literal["sendrecv", "sendonly", "recvonly", "inactive"]
DIRECTIONS: tuple[Direction, ...] = ("sendrecv", "sendonly", "recvonly", "inactive")
_STATIC_AUDIO = {
    0: ("PCMU", 8000),
    3: ("GSM", 8000),
    8: ("PCMA", 8000),
    9: ("G722", 8000),
    18: ("G729", 8000),
}
_SUPPORTED = ("PCMU", "PCMA")
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
_SESSION_ORDER = "vosiuepcbtrzka"
_MEDIA_ORDER = "micbka"


def _is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts characters such as '²' that ``int`` refuses."""
    return text.isascii() and text.isdigit()


def _fail(line_number: int, line: str, why: str) -> ParseError:
    shown = line if len(line) <= 80 else line[:77] + "..."
    return ParseError(f"bad SDP at line {line_number} ({shown!r}): {why}", status=488)


@dataclass(slots=True)
class Origin:
    """``o=``: who created the session; ``session_version`` grows each time the description changes."""

    username: str = "-"
    session_id: int = 0
    session_version: int = 0
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "127.0.0.1"

    def __str__(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.session_version} "
            f"{self.nettype} {self.addrtype} {self.address}"
        )


@dataclass(slots=True)
class Connection:
    """``c=``: the address media goes to (``address`` may carry ``/ttl`` for multicast, kept as given)."""

    address: str
    addrtype: str = "IP4"
    nettype: str = "IN"

    @classmethod
    def for_address(cls, address: str) -> Connection:
        return cls(address, "IP6" if ":" in address else "IP4")

    @property
    def host(self) -> str:
        return self.address.split("/")[0]

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass(slots=True)
class Timing:
    """``t=`` with its ``r=`` repeat lines (kept verbatim)."""

    start: int = 0
    stop: int = 0
    repeats: list[str] = field(default_factory=list)


Attribute = tuple[str, str | None]  # (name, value); value None for a property attribute such as a=sendonly


def _get_attribute(attributes: list[Attribute], name: str) -> str | None:
    for key, value in attributes:
        if key == name:
            return value if value is not None else ""
    return None


def _get_direction(attributes: list[Attribute]) -> Direction | None:
    """The direction attribute (sendrecv, sendonly, recvonly, inactive) among ``attributes``, if any."""
    for key, value in attributes:
        if value is None and key in DIRECTIONS:
            return key
    return None


@dataclass(slots=True)
class MediaDescription:
    """One ``m=`` section."""

    media: str = "audio"
    port: int = 0
    proto: str = "RTP/AVP"
    formats: list[str] = field(default_factory=list)
    port_count: int | None = None
    information: str | None = None
    connections: list[Connection] = field(default_factory=list)
    bandwidths: list[tuple[str, int]] = field(default_factory=list)
    key: str | None = None
    attributes: list[Attribute] = field(default_factory=list)

    def attribute(self, name: str) -> str | None:
        """The value of the first ``a=name`` (``""`` for a property attribute), or None if absent."""
        return _get_attribute(self.attributes, name)

    def attribute_values(self, name: str) -> list[str]:
        return [value or "" for key, value in self.attributes if key == name]

    @property
    def rejected(self) -> bool:
        """Port 0: the stream is rejected (in an answer) or removed (in an offer), RFC 3264 §6/§8.2."""
        return self.port == 0

    @property
    def direction(self) -> Direction | None:
        """The stream's direction attribute, or None if it has none (the session's, else sendrecv)."""
        return _get_direction(self.attributes)

    @direction.setter
    def direction(self, value: Direction | None) -> None:
        self.attributes = [(k, v) for k, v in self.attributes if not (v is None and k in DIRECTIONS)]
        if value is not None:
            self.attributes.append((value, None))

    def rtpmap(self) -> dict[int, tuple[str, int, int]]:
        """Payload type -> (encoding name, clock rate, channels), from ``a=rtpmap`` and the static table."""
        found: dict[int, tuple[str, int, int]] = {}
        for fmt in self.formats:
            if _is_number(fmt) and int(fmt) in _STATIC_AUDIO:
                name, rate = _STATIC_AUDIO[int(fmt)]
                found[int(fmt)] = (name, rate, 1)
        for value in self.attribute_values("rtpmap"):
            match = re.match(r"^(\d+)\s+([^/\s]+)/(\d+)(?:/(\d+))?\s*$", value)
            if match:
                channels = int(match.group(4)) if match.group(4) else 1
                found[int(match.group(1))] = (match.group(2), int(match.group(3)), channels)
        return found

    def fmtp(self) -> dict[int, str]:
        found: dict[int, str] = {}
        for value in self.attribute_values("fmtp"):
            payload_type, _, params = value.partition(" ")
            if _is_number(payload_type):
                found[int(payload_type)] = params.strip()
        return found

    @property
    def ptime(self) -> int | None:
        value = self.attribute("ptime")
        try:
            return round(float(value)) if value else None
        except ValueError:
            return None


@dataclass(slots=True)
class SessionDescription:
    """A whole SDP body. ``parse`` / ``bytes()`` round-trip it; see the module docstring."""

    origin: Origin = field(default_factory=Origin)
    name: str = "-"
    version: int = 0
    information: str | None = None
    uri: str | None = None
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    connection: Connection | None = None
    bandwidths: list[tuple[str, int]] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=lambda: [Timing()])
    zone: str | None = None
    key: str | None = None
    attributes: list[Attribute] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)

    def attribute(self, name: str) -> str | None:
        return _get_attribute(self.attributes, name)

    @property
    def direction(self) -> Direction | None:
        """The session-level direction attribute, or None (then sendrecv)."""
        return _get_direction(self.attributes)

    def media_direction(self, media: MediaDescription) -> Direction:
        """A stream's effective direction: its own attribute, else the session's, else sendrecv."""
        return media.direction or self.direction or "sendrecv"

    def media_connection(self, media: MediaDescription) -> Connection | None:
        return media.connections[0] if media.connections else self.connection

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, data: bytes | str) -> SessionDescription:
        """Parse an SDP body; :class:`ParseError` (status hint 488) says which line is wrong and why."""
        if isinstance(data, bytes | bytearray | memoryview):
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as error:
                why = f"SDP is not valid UTF-8 text (byte {error.start})"
                raise ParseError(why, status=400) from None
        else:
            text = data
        lines = text.split("\n")
        if lines and lines[-1] in ("", "\r"):
            lines.pop()
        if not lines:
            raise ParseError("empty SDP body", status=400)
        sdp = cls(timings=[])
        current: MediaDescription | None = None
        position = 0  # index into the expected order of line types, to reject misplaced lines
        seen: set[str] = set()
        for number, raw in enumerate(lines, start=1):
            line = raw[:-1] if raw.endswith("\r") else raw
            if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
                raise _fail(number, line, "every line must be <type>=<value> with a lower-case type letter")
            kind, value = line[0], line[2:]
            if number == 1 and kind != "v":
                raise _fail(number, line, "an SDP body must start with v=0")
            if kind == "m":
                current = _parse_media(number, line, value)
                sdp.media.append(current)
                position = 0
                continue
            order = _MEDIA_ORDER if current is not None else _SESSION_ORDER
            if kind not in order:
                where = "in a media section" if current is not None else "at session level"
                raise _fail(number, line, f"type {kind!r} is unknown or not allowed {where}")
            index = order.index(kind)
            if index < position:
                raise _fail(number, line, f"{kind}= is out of order (expected order {' '.join(order)})")
            if current is None and kind in "vosuzkc" and kind in seen:
                raise _fail(number, line, f"{kind}= may appear only once at session level")
            position = index
            if current is None:
                seen.add(kind)
                _parse_session_line(sdp, number, line, kind, value)
            else:
                _parse_media_line(current, number, line, kind, value)
        for required in "vost":
            if required not in seen:
                raise ParseError(f"bad SDP: the required {required}= line is missing", status=488)
        for index, media in enumerate(sdp.media, start=1):
            if not media.connections and sdp.connection is None:
                raise ParseError(
                    f"bad SDP: media stream {index} ({media.media}) has no c= line and there is no "
                    "session-level c= line",
                    status=488,
                )
        return sdp

    # ------------------------------------------------------------- serializing
    def __str__(self) -> str:
        out = [f"v={self.version}", f"o={self.origin}", f"s={self.name or ' '}"]
        if self.information is not None:
            out.append(f"i={self.information}")
        if self.uri is not None:
            out.append(f"u={self.uri}")
        out += [f"e={email}" for email in self.emails]
        out += [f"p={phone}" for phone in self.phones]
        if self.connection is not None:
            out.append(f"c={self.connection}")
        out += [f"b={kind}:{value}" for kind, value in self.bandwidths]
        for timing in self.timings or [Timing()]:
            out.append(f"t={timing.start} {timing.stop}")
            out += [f"r={repeat}" for repeat in timing.repeats]
        if self.zone is not None:
            out.append(f"z={self.zone}")
        if self.key is not None:
            out.append(f"k={self.key}")
        out += [_attribute_line(attribute) for attribute in self.attributes]
        for media in self.media:
            port = f"{media.port}/{media.port_count}" if media.port_count is not None else str(media.port)
            out.append(f"m={media.media} {port} {media.proto} {' '.join(media.formats)}")
            if media.information is not None:
                out.append(f"i={media.information}")
            out += [f"c={connection}" for connection in media.connections]
            out += [f"b={kind}:{value}" for kind, value in media.bandwidths]
            if media.key is not None:
                out.append(f"k={media.key}")
            out += [_attribute_line(attribute) for attribute in media.attributes]
        return "\r\n".join(out) + "\r\n"

    def __bytes__(self) -> bytes:
        return str(self).encode("utf-8")


def _attribute_line(attribute: Attribute) -> str:
    name, value = attribute
    return f"a={name}" if value is None else f"a={name}:{value}"


def _check_address(number: int, line: str, addrtype: str, address: str) -> None:
    host = address.split("/")[0]
    if addrtype not in ("IP4", "IP6"):
        return  # other address types are carried, not interpreted
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        parsed = None
    if parsed is not None:
        if parsed.version != (4 if addrtype == "IP4" else 6):
            raise _fail(number, line, f"{host!r} is not an {addrtype} address")
    elif ":" in host or all(_is_number(c) or c == "." for c in host):
        raise _fail(number, line, f"{host!r} is not a valid {addrtype} address")
    elif not re.match(r"^[A-Za-z0-9.\-]+$", host):
        raise _fail(number, line, f"{host!r} is neither an {addrtype} address nor a host name")


def _parse_connection(number: int, line: str, value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise _fail(number, line, "c= needs <nettype> <addrtype> <address>")
    nettype, addrtype, address = parts
    _check_address(number, line, addrtype, address)
    return Connection(address, addrtype, nettype)


def _parse_bandwidth(number: int, line: str, value: str) -> tuple[str, int]:
    kind, _, amount = value.partition(":")
    if not kind or not _is_number(amount):
        raise _fail(number, line, "b= needs <bwtype>:<bandwidth in kbit/s>")
    return kind, int(amount)


def _parse_attribute(number: int, line: str, value: str) -> Attribute:
    name, colon, rest = value.partition(":")
    if not _TOKEN.match(name):
        raise _fail(number, line, "an attribute name must be a token")
    return (name, rest if colon else None)


def _parse_session_line(sdp: SessionDescription, number: int, line: str, kind: str, value: str) -> None:
    if kind == "v":
        if value != "0":
            raise _fail(number, line, "only SDP version 0 exists")
    elif kind == "o":
        parts = value.split()
        if len(parts) != 6:
            raise _fail(number, line, "o= needs 6 fields: user sess-id sess-version nettype addrtype addr")
        if not _is_number(parts[1]) or not _is_number(parts[2]):
            raise _fail(number, line, "o= session id and version must be numbers")
        _check_address(number, line, parts[4], parts[5])
        sdp.origin = Origin(parts[0], int(parts[1]), int(parts[2]), parts[3], parts[4], parts[5])
    elif kind == "s":
        sdp.name = value
    elif kind == "i":
        sdp.information = value
    elif kind == "u":
        sdp.uri = value
    elif kind == "e":
        sdp.emails.append(value)
    elif kind == "p":
        sdp.phones.append(value)
    elif kind == "c":
        sdp.connection = _parse_connection(number, line, value)
    elif kind == "b":
        sdp.bandwidths.append(_parse_bandwidth(number, line, value))
    elif kind == "t":
        parts = value.split()
        if len(parts) != 2 or not all(_is_number(p) for p in parts):
            raise _fail(number, line, "t= needs <start time> <stop time> as numbers")
        sdp.timings.append(Timing(int(parts[0]), int(parts[1])))
    elif kind == "r":
        if not sdp.timings:
            raise _fail(number, line, "r= must follow a t= line")
        sdp.timings[-1].repeats.append(value)
    elif kind == "z":
        sdp.zone = value
    elif kind == "k":
        sdp.key = value
    elif kind == "a":
        sdp.attributes.append(_parse_attribute(number, line, value))


def _parse_media(number: int, line: str, value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 4:
        raise _fail(number, line, "m= needs <media> <port> <proto> <fmt> ...")
    media, port_text, proto, formats = parts[0], parts[1], parts[2], parts[3:]
    port_part, slash, count_part = port_text.partition("/")
    if not _is_number(port_part) or int(port_part) > 65535 or (slash and not _is_number(count_part)):
        raise _fail(number, line, f"{port_text!r} is not a port (0-65535, optionally /count)")
    if proto.startswith("RTP/") and not all(_is_number(f) and int(f) <= 127 for f in formats):
        raise _fail(number, line, "RTP media formats must be payload type numbers 0-127")
    return MediaDescription(
        media=media,
        port=int(port_part),
        proto=proto,
        formats=formats,
        port_count=int(count_part) if slash else None,
    )


def _parse_media_line(media: MediaDescription, number: int, line: str, kind: str, value: str) -> None:
    if kind == "i":
        media.information = value
    elif kind == "c":
        media.connections.append(_parse_connection(number, line, value))
    elif kind == "b":
        media.bandwidths.append(_parse_bandwidth(number, line, value))
    elif kind == "k":
        media.key = value
    elif kind == "a":
        media.attributes.append(_parse_attribute(number, line, value))


# ====================================================================== offer / answer


@dataclass(frozen=True, slots=True)
class MediaParams:
    """What one side of a call must do after offer/answer, from that side's point of view.

    ``payload_type``/``dtmf_payload_type`` are the numbers to *send* with (the remote side's, RFC 3264 §5.1);
    ``receive_payload_type``/``receive_dtmf_payload_type`` the numbers our own SDP declared. ``send`` and
    ``recv`` are the negotiated direction (both False while held with ``inactive``); ``rejected`` when there
    is no usable audio stream at all.
    """

    remote_address: str
    remote_port: int
    remote_rtcp_port: int
    codec: str
    payload_type: int
    receive_payload_type: int
    dtmf_payload_type: int | None
    receive_dtmf_payload_type: int | None
    ptime: int
    send: bool
    recv: bool
    rtcp_mux: bool = False
    rejected: bool = False

    @property
    def remote(self) -> tuple[str, int]:
        return (self.remote_address, self.remote_port)

    @property
    def remote_rtcp(self) -> tuple[str, int]:
        return (self.remote_address, self.remote_rtcp_port)

    @property
    def direction(self) -> Direction:
        return _direction(self.send, self.recv)


def _direction(send: bool, recv: bool) -> Direction:
    if send and recv:
        return "sendrecv"
    if send:
        return "sendonly"
    return "recvonly" if recv else "inactive"


def _flags(direction: Direction) -> tuple[bool, bool]:
    return direction in ("sendrecv", "sendonly"), direction in ("sendrecv", "recvonly")


def _new_session_id() -> int:
    return random.SystemRandom().randrange(1, 2**62)


def _audio_media(
    port: int,
    codecs: Sequence[tuple[int, str]],
    dtmf_payload_type: int | None,
    direction: Direction,
    ptime: int,
    rtcp_mux: bool,
    dtmf_events: str = "0-16",
) -> MediaDescription:
    media = MediaDescription("audio", port, "RTP/AVP", [str(pt) for pt, _ in codecs])
    for payload_type, name in codecs:
        media.attributes.append(("rtpmap", f"{payload_type} {name}/8000"))
    if dtmf_payload_type is not None:
        media.formats.append(str(dtmf_payload_type))
        media.attributes.append(("rtpmap", f"{dtmf_payload_type} telephone-event/8000"))
        media.attributes.append(("fmtp", f"{dtmf_payload_type} {dtmf_events}"))
    media.attributes.append(("ptime", str(ptime)))
    if rtcp_mux:
        media.attributes.append(("rtcp-mux", None))
    media.direction = direction
    return media


def _finish(sdp: SessionDescription, previous: SessionDescription | None) -> SessionDescription:
    """Keep the session id of an earlier description and bump the version only if something changed."""
    if previous is None:
        return sdp
    sdp.origin = replace(sdp.origin, session_id=previous.origin.session_id)
    sdp.origin.session_version = previous.origin.session_version
    if bytes(sdp) != bytes(previous):
        sdp.origin.session_version = previous.origin.session_version + 1
    return sdp


def _codec_list(codecs: Iterable[str]) -> list[tuple[int, str]]:
    out = []
    for name in codecs:
        upper = name.upper()
        if upper not in _SUPPORTED:
            raise ValueError(f"unsupported codec {name!r}; supported: {', '.join(_SUPPORTED)}")
        out.append((0 if upper == "PCMU" else 8, upper))
    if not out:
        raise ValueError("at least one codec is needed")
    return out


def make_offer(
    address: str,
    port: int,
    *,
    codecs: Iterable[str] = ("PCMU", "PCMA"),
    dtmf_payload_type: int | None = 101,
    direction: Direction = "sendrecv",
    ptime: int = 20,
    rtcp_mux: bool = False,
    previous: SessionDescription | None = None,
    username: str = "-",
    media_attributes: Sequence[Attribute] = (),
) -> SessionDescription:
    """An SDP offer for one audio stream at ``address:port``.

    ``media_attributes`` go on the audio m= line as they are (the ICE attributes,
    :meth:`IceDescription.attributes`).

    For a re-offer (hold: ``direction="sendonly"``; resume: ``"sendrecv"``) pass the previous description
    we sent as ``previous``: the session id is kept and the version increases if anything changed.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
    if dtmf_payload_type is not None and not 96 <= dtmf_payload_type <= 127:
        raise ValueError("telephone-event needs a dynamic payload type (96-127)")
    session_id = _new_session_id()
    sdp = SessionDescription(
        origin=Origin(username, session_id, session_id, "IN", "IP6" if ":" in address else "IP4", address),
        connection=Connection.for_address(address),
        media=[_audio_media(port, _codec_list(codecs), dtmf_payload_type, direction, ptime, rtcp_mux)],
    )
    sdp.media[0].attributes.extend(media_attributes)
    return _finish(sdp, previous)


def _offered_codecs(media: MediaDescription) -> tuple[list[tuple[int, str]], int | None]:
    rtpmap = media.rtpmap()
    audio: list[tuple[int, str]] = []
    dtmf: int | None = None
    for fmt in media.formats:
        if not _is_number(fmt) or int(fmt) not in rtpmap:
            continue
        payload_type = int(fmt)
        name, rate, channels = rtpmap[payload_type]
        if name.upper() in _SUPPORTED and rate == 8000 and channels == 1:
            audio.append((payload_type, name.upper()))
        elif name.lower() == "telephone-event" and rate == 8000 and dtmf is None:
            dtmf = payload_type
    return audio, dtmf


def _remote_can_receive(sdp: SessionDescription, media: MediaDescription) -> bool:
    """False for the pre-RFC 3264 hold, c=0.0.0.0 (RFC 3264 §8.4 says to treat it like that)."""
    connection = sdp.media_connection(media)
    return connection is None or connection.host not in ("0.0.0.0", "::")


def make_answer(
    offer: SessionDescription,
    address: str,
    port: int,
    *,
    codecs: Iterable[str] = ("PCMU", "PCMA"),
    dtmf: bool = True,
    direction: Direction = "sendrecv",
    ptime: int = 20,
    previous: SessionDescription | None = None,
    username: str = "-",
    media_attributes: Sequence[Attribute] = (),
) -> SessionDescription:
    """The answer to ``offer`` (RFC 3264 §6): one m= line per offered one, in order.

    ``media_attributes`` go on the accepted audio m= line (the ICE attributes of our answer).

    The first audio stream with a codec in common is accepted at ``address:port``; every other stream,
    and any stream removed by the offer (port 0), is answered with port 0. Codecs keep the offer's order
    and payload type numbers (§6.1's recommendation). The answer's direction is what both sides allow:
    we send only if we want to and the offer lets us (it is ``sendrecv`` or ``recvonly``), and receive
    only if we want to and the offerer sends — so an offer with ``sendonly`` (hold) gets ``recvonly``,
    and ``inactive`` gets ``inactive``. ``direction`` is what *we* want (e.g. ``sendonly`` to hold from
    the answering side).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
    wanted = {name for _, name in _codec_list(codecs)}
    answer = SessionDescription(
        origin=Origin(username, 0, 0, "IN", "IP6" if ":" in address else "IP4", address),
        connection=Connection.for_address(address),
    )
    session_id = _new_session_id()
    answer.origin.session_id = answer.origin.session_version = session_id
    accepted = False
    for media in offer.media:
        offered, offered_dtmf = _offered_codecs(media) if media.media == "audio" else ([], None)
        common = [(pt, name) for pt, name in offered if name in wanted]
        usable = media.proto in ("RTP/AVP", "RTP/AVPF") and not media.rejected and bool(common)
        if accepted or not usable:
            formats = list(media.formats[:1]) or ["0"]
            answer.media.append(MediaDescription(media.media, 0, media.proto, formats))
            continue
        accepted = True
        offer_send, offer_recv = _flags(offer.media_direction(media))
        offer_recv = offer_recv and _remote_can_receive(offer, media)
        want_send, want_recv = _flags(direction)
        answer_direction = _direction(want_send and offer_recv, want_recv and offer_send)
        answer.media.append(
            _audio_media(
                port,
                common,
                offered_dtmf if dtmf else None,
                answer_direction,
                media.ptime or ptime,
                media.attribute("rtcp-mux") is not None,
                # the events the offerer can receive; DTMF (0-15) is all we send
                media.fmtp().get(offered_dtmf, "0-16") if offered_dtmf is not None else "0-16",
            )
        )
        answer.media[-1].attributes.extend(media_attributes)
    return _finish(answer, previous)


def negotiated(
    offer: SessionDescription,
    answer: SessionDescription,
    *,
    role: Literal["offerer", "answerer"] = "offerer",
) -> MediaParams:
    """The media parameters for our side (``role``) once ``answer`` has answered ``offer``.

    The codec is the first one in the answer that the offer also had (both sides then agree). A
    rejected exchange (no audio stream accepted) gives ``rejected=True`` with ``send``/``recv`` False.
    """
    if len(answer.media) != len(offer.media):
        raise ParseError(
            f"the answer has {len(answer.media)} media streams but the offer had {len(offer.media)} "
            "(RFC 3264 §6 requires the same number)",
            status=488,
        )
    local, remote = (offer, answer) if role == "offerer" else (answer, offer)
    for offered, answered in zip(offer.media, answer.media, strict=True):
        if offered.media != "audio" or offered.rejected or answered.rejected:
            continue
        answer_codecs, answer_dtmf = _offered_codecs(answered)
        offer_codecs, offer_dtmf = _offered_codecs(offered)
        offer_names = {name: pt for pt, name in offer_codecs}
        chosen = next(((pt, name) for pt, name in answer_codecs if name in offer_names), None)
        if chosen is None:
            continue
        name = chosen[1]
        local_media, remote_media = (offered, answered) if role == "offerer" else (answered, offered)
        pts = {"offer": offer_names[name], "answer": chosen[0]}
        ours, theirs = ("offer", "answer") if role == "offerer" else ("answer", "offer")
        send_pt, recv_pt = pts[theirs], pts[ours]
        has_dtmf = answer_dtmf is not None and offer_dtmf is not None
        dtmf_send = (answer_dtmf if role == "offerer" else offer_dtmf) if has_dtmf else None
        dtmf_recv = (offer_dtmf if role == "offerer" else answer_dtmf) if has_dtmf else None
        answer_send, answer_recv = _flags(answer.media_direction(answered))
        send, recv = (answer_recv, answer_send) if role == "offerer" else (answer_send, answer_recv)
        send = send and _remote_can_receive(remote, remote_media)
        connection = remote.media_connection(remote_media)
        assert connection is not None  # parse() guarantees one
        rtcp_port = remote_media.port + 1
        rtcp_attr = remote_media.attribute("rtcp")
        if rtcp_attr and _is_number(rtcp_attr.split()[0]):
            rtcp_port = int(rtcp_attr.split()[0])
        mux = offered.attribute("rtcp-mux") is not None and answered.attribute("rtcp-mux") is not None
        return MediaParams(
            remote_address=connection.host,
            remote_port=remote_media.port,
            remote_rtcp_port=remote_media.port if mux else rtcp_port,
            codec=name,
            payload_type=send_pt,
            receive_payload_type=recv_pt,
            dtmf_payload_type=dtmf_send,
            receive_dtmf_payload_type=dtmf_recv,
            ptime=remote_media.ptime or local_media.ptime or 20,
            send=send,
            recv=recv,
            rtcp_mux=mux,
        )
    del local
    return MediaParams("", 0, 0, "", 0, 0, None, None, 20, False, False, rejected=True)


_ICE_CHARS = re.compile(r"^[A-Za-z0-9+/]+$")


@dataclass(frozen=True)
class IceDescription:
    """The ICE attributes of one media stream (RFC 8839 §5): credentials, candidates, end-of-candidates.

    ``candidates`` are the ``a=candidate`` values as written (the ICE agent parses them: aioice's
    ``Candidate.from_sdp``). Credentials may sit at session level and apply to every stream (§5.4).
    """

    ufrag: str
    pwd: str
    candidates: tuple[str, ...] = ()
    end_of_candidates: bool = True

    def __post_init__(self) -> None:
        # ice-char is ALPHA / DIGIT / "+" / "/"; ufrag 4-256, pwd 22-256 characters (RFC 8839 §5.4)
        if not (4 <= len(self.ufrag) <= 256 and _ICE_CHARS.match(self.ufrag)):
            raise ParseError(f"bad a=ice-ufrag {self.ufrag[:40]!r}", status=488)
        if not (22 <= len(self.pwd) <= 256 and _ICE_CHARS.match(self.pwd)):
            raise ParseError("bad a=ice-pwd (22-256 ice-chars)", status=488)

    def attributes(self) -> list[Attribute]:
        out: list[Attribute] = [("ice-ufrag", self.ufrag), ("ice-pwd", self.pwd)]
        out += [("candidate", candidate) for candidate in self.candidates]
        if self.end_of_candidates:
            out.append(("end-of-candidates", None))
        return out

    @classmethod
    def of(cls, sdp: SessionDescription, media: MediaDescription) -> IceDescription | None:
        """The stream's ICE description, or None when the far end does no ICE (no credentials)."""
        ufrag = media.attribute("ice-ufrag") or sdp.attribute("ice-ufrag")
        pwd = media.attribute("ice-pwd") or sdp.attribute("ice-pwd")
        if not ufrag or not pwd:
            return None
        end = any(part.attribute("end-of-candidates") is not None for part in (media, sdp))
        return cls(ufrag, pwd, tuple(media.attribute_values("candidate")), end)
