"""CallMedia: the media half of one call, the piece a UserAgent plugs in.

It holds a :class:`MediaSession` and the offer/answer state around it, so the signalling side only moves
SDP bodies: ``offer()`` for an INVITE (or a hold/resume re-INVITE), ``accept_answer(body)`` on the 2xx,
``answer(body)`` for an incoming INVITE or re-INVITE, ``close()`` on BYE. It keeps one ``o=`` session id for
the whole call and increases the version whenever what we send changes (RFC 3264 §8).

A bad SDP body raises :class:`~p2psip.errors.ParseError` (``status`` 488: answer ``488 Not Acceptable
Here``); a well-formed offer with nothing acceptable gives an answer with port 0 and
:attr:`CallMedia.params` ``.rejected`` True.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2psip.errors import ParseError
from p2psip.media.ice import IceMedia, IceSettings, remote_ice
from p2psip.media.session import MediaSession
from p2psip.media.sources import AudioSink, AudioSource, WavSink, WavSource
from p2psip.sdp import (
    Attribute,
    Direction,
    IceDescription,
    MediaParams,
    SessionDescription,
    make_answer,
    make_offer,
    negotiated,
)

__all__ = ["CallMedia"]


class CallMedia:
    """See the module docstring. Create with ``await CallMedia.open(...)``."""

    def __init__(
        self, session: MediaSession, address: str, codecs: tuple[str, ...], dtmf: int | None
    ) -> None:
        self.session = session
        self.address = address
        self.codecs = codecs
        self.dtmf_payload_type = dtmf
        self.params: MediaParams | None = None
        self.advertise: tuple[str, int] | None = None
        """The (address, port) to write into our SDP instead of the bound ones, for when something stands
        in front of us that the peer must send to (a port forward, a relay); None: the bound address."""
        self._local: SessionDescription | None = None  # the last SDP we sent
        self._wanted: Direction = "sendrecv"  # what we last asked for (hold stays held across re-offers)
        self._pending_offer: SessionDescription | None = None
        self.ice: IceMedia | None = None
        """The call's ICE agent (``CallMedia.open(..., ice=IceSettings(...))``): our offers and answers carry
        its candidates and the media runs over the pair it selects (:mod:`p2psip.media.ice`)."""

    @classmethod
    async def open(
        cls,
        address: str = "127.0.0.1",
        *,
        play: str | Path | AudioSource | None = None,
        record: str | Path | AudioSink | None = None,
        port: int = 0,
        codecs: tuple[str, ...] = ("PCMU", "PCMA"),
        dtmf_payload_type: int | None = 101,
        ice: IceSettings | None = None,
        **session_options: Any,
    ) -> CallMedia:
        """Bind the media ports on ``address`` (the address the peer will send to: put in the SDP).

        ``play``/``record`` take a WAV path or any source/sink. Nothing is sent until the SDP exchange has
        told us where (or, with symmetric RTP, until the peer's first packet arrives). With ``ice``
        the candidates are gathered now (host on ``address``, server-reflexive, relayed) and RTP/RTCP
        (multiplexed) run over the pair ICE selects.
        """
        if ice is not None:
            session_options["rtcp_mux"] = True
        source = WavSource(play) if isinstance(play, str | Path) else play
        sink = WavSink(record) if isinstance(record, str | Path) else record
        session = await MediaSession.start(
            (address, port),
            source=source,
            sink=sink,
            dtmf_payload_type=dtmf_payload_type,
            **session_options,
        )
        media = cls(session, address, tuple(codecs), dtmf_payload_type)
        if ice is not None:
            try:
                media.ice = await IceMedia.gather(address, ice, controlling=True)
            except BaseException:
                await session.close(drain=False)
                raise
            media.ice.attach(session.use_path(media.ice.sendto))
            default = media.ice.default
            media.advertise = (default.host, default.port)
        return media

    @property
    def local_description(self) -> SessionDescription | None:
        """The last SDP we sent (offer or answer), None before the first."""
        return self._local

    @property
    def port(self) -> int:
        return self.session.local_address[1]

    @property
    def wanted_direction(self) -> Direction:
        """The direction we last offered (``sendonly`` while we hold the call)."""
        return self._wanted

    @property
    def offer_pending(self) -> bool:
        """An offer of ours awaits its answer (in a 2xx, or in the ACK when we offered in a 2xx)."""
        return self._pending_offer is not None

    def _advertised(self) -> tuple[str, int]:
        return self.advertise if self.advertise is not None else (self.address, self.port)

    def offer(self, direction: Direction = "sendrecv", *, ice_restart: bool = False) -> bytes:
        """An offer (the first, or a re-offer: ``"sendonly"`` holds, ``"sendrecv"`` resumes).
        ``ice_restart``: the re-offer restarts ICE (new credentials; the answer's run new checks)."""
        self._wanted = direction
        if ice_restart and self.ice is not None and self.ice.state != "new":
            self.ice.restart()
        sdp = make_offer(
            *self._advertised(),
            codecs=self.codecs,
            dtmf_payload_type=self.dtmf_payload_type,
            direction=direction,
            previous=self._local,
            rtcp_mux=self.ice is not None,
            media_attributes=self._ice_attributes(),
        )
        self._local = self._pending_offer = sdp
        return bytes(sdp)

    def hold(self) -> bytes:
        return self.offer("sendonly")

    def resume(self) -> bytes:
        return self.offer("sendrecv")

    def offer_failed(self) -> None:
        """The request that carried our last offer failed (e.g. a re-INVITE answered 491 or 488): the
        session stays as it was (the peer saw that offer, so the next one still counts its version up)."""
        self._pending_offer = None

    def accept_answer(self, body: bytes) -> MediaParams:
        """Apply the answer to our last offer; raises ParseError for bad SDP or when no offer is pending."""
        if self._pending_offer is None:
            raise ParseError("an SDP answer arrived but no offer is pending", status=488)
        answer = SessionDescription.parse(body)
        params = negotiated(self._pending_offer, answer)
        self._pending_offer = None
        self._apply(params)
        self._start_ice(answer, params)
        return params

    def answer(self, body: bytes, direction: Direction | None = None) -> bytes:
        """Answer an offer (an INVITE's or a re-INVITE's body) and apply it; ParseError for bad SDP.

        ``direction`` is what we want ourselves; by default what we last asked for, so a call we put on hold
        stays on hold when the peer re-offers."""
        offer = SessionDescription.parse(body)
        direction = direction or self._wanted
        if self.ice is not None and self.ice.needs_restart(self._remote_ice(offer)):
            self.ice.restart()  # before the answer is built: it carries our new credentials
        if self.ice is not None and self.ice.state == "new" and self.ice.restarts == 0:
            self.ice.agent.ice_controlling = False  # the offerer controls (RFC 8445 §6.1.1)
        sdp = make_answer(
            offer,
            *self._advertised(),
            codecs=self.codecs,
            dtmf=self.dtmf_payload_type is not None,
            direction=direction,
            previous=self._local,
            media_attributes=self._ice_attributes(),
        )
        self._local = sdp
        params = negotiated(offer, sdp, role="answerer")
        self._apply(params)
        self._start_ice(offer, params)
        return bytes(sdp)

    def _ice_attributes(self) -> list[Attribute]:
        if self.ice is None:
            return []
        attributes = self.ice.description().attributes()
        rtcp = self.ice.rtcp_default
        if rtcp is not None:  # RFC 8839 §5.1: the RTCP component's default candidate goes in a=rtcp
            family = "IP6" if ":" in rtcp.host else "IP4"
            attributes.insert(0, ("rtcp", f"{rtcp.port} IN {family} {rtcp.host}"))
        return attributes

    @staticmethod
    def _remote_ice(remote: SessionDescription) -> IceDescription | None:
        stream = next((m for m in remote.media if m.media == "audio" and not m.rejected), None)
        return None if stream is None else remote_ice(remote, stream)

    def _start_ice(self, remote: SessionDescription, params: MediaParams) -> None:
        """The far end's description is known: ICE checks if it does ICE, else its c=/m= (fallback)."""
        if self.ice is None or params.rejected:
            return
        stream = next((m for m in remote.media if m.media == "audio" and not m.rejected), None)
        if stream is None:
            return
        self.ice.rtcp_muxed = params.rtcp_mux
        self.ice.start(remote_ice(remote, stream), params.remote)

    def _apply(self, params: MediaParams) -> None:
        self.params = params
        if params.rejected:
            self.session.set_direction("inactive")
        else:
            self.session.apply(params)

    async def close(self) -> None:
        await self.session.close()
        if self.ice is not None:
            await self.ice.close()
