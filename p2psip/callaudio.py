"""Calls that carry audio: the glue between a UserAgent call (:mod:`p2psip.useragent`) and its media
(:class:`p2psip.media.CallMedia`).

Why a module of its own: the UA core moves SIP messages and knows nothing of RTP; ``CallMedia`` moves SDP
bodies and RTP and knows nothing of SIP. This module is the one place that knows both: which SDP goes into
which request or response, what a failed negotiation becomes in SIP (488, a BYE), and when the media
stops (whenever the call ends, however it ends).

It is the UserAgent's injected offer/answer strategy (``UserAgent(..., offer_answer=AudioOfferAnswer())``,
the default): the UA core calls it for ``UserAgent.call(..., play=, record=)``,
``IncomingCall.accept_with_media()``, ``Call.hold()``, ``Call.resume()``, ``Call.send_dtmf()``, the
re-INVITE answer and the end of a call. The dependency goes one way: this module imports nothing of
:mod:`p2psip.useragent`; it sees calls through the small protocols below.

The media address (what our SDP says the peer should send RTP to) is the local address the SIP stack uses
toward the peer: the same choice the stack makes for Via and Contact, so a call that can reach us for SIP
can also reach us for RTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from p2psip.address import target_from_uri
from p2psip.errors import CallFailed, ParseError, TransportError
from p2psip.media.call import CallMedia
from p2psip.media.ice import IceSettings, settings_for_offer
from p2psip.media.sources import AudioSink, AudioSource
from p2psip.message import Request, Response
from p2psip.stack import Stack, Target
from p2psip.transaction import ServerTransaction
from p2psip.turngrant import TurnGrant
from p2psip.uri import URI

__all__ = ["AudioOfferAnswer", "OfferAnswer", "Play", "Record", "home_stun", "ice_by_default"]

Play = str | Path | AudioSource | None
"""What a call plays: a WAV path (any rate, converted), any audio source, or None (silence)."""
Record = str | Path | AudioSink | None
"""Where a call records what it hears: a WAV path, any audio sink, or None (not recorded)."""

SDP = "application/sdp"


class MediaCall(Protocol):
    """What the strategy needs of a call (either end): its media, in-dialog requests, hanging up."""

    media: CallMedia | None

    async def send(
        self,
        method: str,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        timeout: float | None = 32.0,
    ) -> Response: ...

    async def bye(self, timeout: float | None = 32.0) -> Response: ...


class PlacedCall(MediaCall, Protocol):
    async def answered(self, timeout: float | None = None) -> Response: ...

    def cancel(self) -> None: ...

    def give_up(self) -> None: ...


class OfferedCall(MediaCall, Protocol):
    request: Request
    transaction: ServerTransaction

    @property
    def stack(self) -> Stack: ...

    def accept(self, body: bytes = b"", content_type: str | None = SDP) -> None: ...

    def reject(self, status: int = 486, reason: str | None = None) -> None: ...


PlacedT = TypeVar("PlacedT", bound=PlacedCall)
PlacedT_co = TypeVar("PlacedT_co", bound=PlacedCall, covariant=True)


class Caller(Protocol[PlacedT_co]):
    """What the strategy needs of the UA placing a call: its stack, its outbound proxy, ``invite()``."""

    stack: Stack
    outbound: Target | None

    def invite(
        self,
        uri: str | URI,
        *,
        body: bytes = b"",
        content_type: str = SDP,
        headers: Iterable[tuple[str, str]] = (),
        on_provisional: Callable[[Response], None] | None = None,
    ) -> PlacedT_co: ...


def _media_address(stack: Stack, transport: str, toward: str) -> str:
    """The local IP the stack uses toward ``toward`` (a wildcard bind resolved by the routing table)."""
    try:
        return stack.local_address(transport, toward)[0]
    except TransportError:
        return stack.local_address("udp", toward)[0]


def ice_by_default(
    media_options: dict[str, Any] | None, stun: Target | None, turn: TurnGrant | None = None
) -> dict[str, Any] | None:
    """``media_options`` with ICE turned on (STUN: ``stun``; TURN: ``turn``) when they do not say ``"ice"``
    and a STUN server is known to answer (``stun``: the UA's home peer, ``UserAgent.stun_server``) or the
    home peer granted TURN credentials (``turn``: ``UserAgent.turn_grant``, from the 200 to our REGISTER,
    :mod:`p2psip.turngrant`): the call then gathers a relayed candidate on the home peer too, for the
    far ends no direct path reaches (docs/nat.md, "Relayed candidates by default").

    Why on by default there: a UA registered through its home peer is typically behind a NAT, where an
    offer without ICE names a private address; with ICE the far end can reach us through our mapping
    (server-reflexive candidate), an ICE far end (baresip's ``ice`` module sends nothing to an offer
    without ICE) takes part, and one without ICE ignores the candidates and gets audio at ``c=``/``m=``.
    Why not always: without a STUN server that answers, gathering waits for its timeout on every call
    and adds nothing a host candidate does not. ``media_options={"ice": None}`` turns it off for a call;
    ``{"ice": IceSettings(...)}`` (TURN credentials, relay only) is kept as given."""
    if (stun is None and turn is None) or (media_options is not None and "ice" in media_options):
        return media_options
    settings = IceSettings(stun=(stun.host, stun.port) if stun is not None else None)
    if turn is not None:
        settings = dataclasses.replace(
            settings, turn=(turn.host, turn.port), turn_username=turn.username, turn_password=turn.password
        )
    return {**(media_options or {}), "ice": settings}


def home_stun(media_options: dict[str, Any] | None, outbound: Target | None) -> dict[str, Any] | None:
    """``media_options`` with the home peer as ICE's STUN server: a UA with an ``outbound`` peer (UDP or
    TCP: a peer listens on the same port for both) whose ICE settings name no STUN server of their own
    asks that peer's SIP UDP port, which answers binding requests (RFC 5626 keep-alives,
    :mod:`p2psip.flows`): the server-reflexive candidate then comes from the peer that already sees the
    UA's NAT mapping, with nothing to configure. Relay-only settings gather no srflx candidate: kept."""
    ice = (media_options or {}).get("ice")
    if (
        not isinstance(ice, IceSettings)
        or ice.stun is not None
        or ice.relay_only
        or outbound is None
        or outbound.transport not in ("udp", "tcp")
    ):
        return media_options
    return {**(media_options or {}), "ice": dataclasses.replace(ice, stun=(outbound.host, outbound.port))}


async def _open(address: str, play: Play, record: Record, options: dict[str, Any]) -> CallMedia:
    """Open a call's media; a media path that cannot be had (ICE gathered nothing: a relay-only call whose
    TURN allocation was refused, 486/508, or not answered) is ``CallFailed(503)`` with the reason: the
    caller sends no INVITE it could not carry; the callee declines with 488 and that reason instead of
    leaving the INVITE unanswered."""
    try:
        return await CallMedia.open(address, play=play, record=record, **options)
    except ConnectionError as error:
        raise CallFailed(503, f"Service Unavailable (no media path: {error})") from None


async def call_with_media(
    ua: Caller[PlacedT],
    uri: str | URI,
    *,
    play: Play = None,
    record: Record = None,
    media: CallMedia | None = None,
    headers: Iterable[tuple[str, str]] = (),
    timeout: float | None = None,
    media_options: dict[str, Any] | None = None,
    on_provisional: Callable[[Response], None] | None = None,
) -> PlacedT:
    """Place a call whose INVITE offers audio; once answered, ``call.media`` sends and receives it.

    ``media`` is a ready :class:`CallMedia` (its own play/record); else one is opened on the address the
    stack uses toward the first hop, with ``play``/``record`` and ``media_options`` (``MediaSession``
    options). Failures raise :class:`~p2psip.useragent.CallFailed` with the media closed; a 2xx whose SDP
    we cannot use is hung up (BYE) and raised as 488.
    """
    if media is None:
        ruri = URI(uri) if isinstance(uri, str) else uri
        first_hop = ua.outbound if ua.outbound is not None else target_from_uri(ruri)
        address = _media_address(ua.stack, first_hop.transport, first_hop.host)
        options = home_stun(media_options, ua.outbound) or {}
        media = await _open(address, play, record, options)
    try:
        call = ua.invite(
            uri, body=media.offer(), content_type=SDP, headers=headers, on_provisional=on_provisional
        )
        call.media = media  # from here on, the end of the call closes the media
        try:
            response = await call.answered(timeout)
        except (TimeoutError, asyncio.CancelledError):
            call.give_up()
            raise
        try:
            params = media.accept_answer(response.body)
        except ParseError as error:
            await call.bye()
            raise CallFailed(488, f"Not Acceptable Here (the answer's SDP: {error})", response) from None
        if params.rejected:
            await call.bye()
            raise CallFailed(488, "Not Acceptable Here (the answer accepts no audio stream)", response)
        return call
    except BaseException:
        await media.close()
        raise


async def accept_with_media(
    incoming: OfferedCall,
    *,
    play: Play = None,
    record: Record = None,
    media: CallMedia | None = None,
    media_options: dict[str, Any] | None = None,
) -> CallMedia:
    """Answer an offered call with audio: our SDP answer in the 200 OK, and the media running.

    An INVITE whose SDP is malformed, offers no audio we can use, or has no offer at all (an offer in
    the 200 with the answer in the ACK is not supported) is declined with 488 and raises
    :class:`~p2psip.useragent.CallFailed`.
    """
    if not incoming.request.body:
        incoming.reject(488, "Not Acceptable Here (no SDP offer in the INVITE)")
        raise CallFailed(488, "the INVITE carries no SDP offer (offer in the 200 OK is not supported)")
    if media is None:
        source = incoming.transaction.source
        address = _media_address(incoming.stack, source.transport, source.host)
        options = dict(media_options or {})
        if isinstance(options.get("ice"), IceSettings):  # a second component if the offer needs one
            options["ice"] = settings_for_offer(options["ice"], incoming.request.body)
        try:
            media = await _open(address, play, record, options)
        except CallFailed as failed:
            # 488, not 503: a proxy turns a 503 into 500 and drops its reason (RFC 3261 §16.7 step 6)
            reason = failed.reason.replace("Service Unavailable", "Not Acceptable Here", 1)
            incoming.reject(488, reason)
            raise CallFailed(488, reason) from None
    try:
        try:
            body = media.answer(incoming.request.body)
        except ParseError as error:
            incoming.reject(488, "Not Acceptable Here (bad SDP)")
            raise CallFailed(488, f"Not Acceptable Here ({error})") from None
        if media.params is not None and media.params.rejected:
            incoming.reject(488, "Not Acceptable Here (no audio codec in common)")
            raise CallFailed(488, "Not Acceptable Here (no audio codec in common)")
        incoming.accept(body, SDP)  # raises CallFailed when the caller gave up meanwhile
        incoming.media = media
        return media
    except BaseException:
        await media.close()
        raise


def answer_reoffer(call: MediaCall, request: Request) -> Response:
    """The response to a re-INVITE in a call with audio: 200 with our SDP answer (applied to the media),
    or 488 for SDP we cannot parse (the session then stays as it was, RFC 3261 §14.2). A re-INVITE with
    no offer gets our offer in the 200; its answer comes in the ACK (:func:`answer_in_ack`)."""
    media = call.media
    if media is None:
        return Response.for_request(request, 200)
    if request.body:
        try:
            body = media.answer(request.body)
        except ParseError as error:
            return Response.for_request(request, 488, f"Not Acceptable Here ({error})")
    else:
        body = media.offer(media.wanted_direction)
    response = Response.for_request(request, 200)
    response.body = body
    response.set("Content-Type", SDP)
    return response


def answer_in_ack(call: MediaCall, request: Request) -> None:
    """The ACK of a re-INVITE we answered with an offer carries the answer: apply it. Bad SDP there
    cannot be refused any more (an ACK has no response): the media stays as it was."""
    if call.media is None or not call.media.offer_pending:
        return
    try:
        call.media.accept_answer(request.body)
    except ParseError:
        call.media.offer_failed()


async def reoffer(
    call: MediaCall, direction: str, timeout: float | None = 32.0, *, ice_restart: bool = False
) -> Response:
    """Send a re-INVITE carrying a new offer (``sendonly`` holds, ``sendrecv`` resumes) and apply the
    answer. Returns the final response; a failure response leaves the media as it was (except after
    ``ice_restart``: our credentials already changed, so a refused restart leaves ICE without a pair)."""
    media = call.media
    if media is None:
        raise CallFailed(488, "this call has no media to hold or resume")
    body = media.offer("sendonly" if direction == "sendonly" else "sendrecv", ice_restart=ice_restart)
    try:
        response = await call.send("INVITE", body=body, content_type=SDP, timeout=timeout)
    except BaseException:
        media.offer_failed()
        raise
    if 200 <= response.status < 300 and response.body:
        media.accept_answer(response.body)
    else:
        media.offer_failed()
    return response


async def send_dtmf(call: MediaCall, digits: str, *, duration: float = 0.1, gap: float = 0.05) -> None:
    """Send ``digits`` as RFC 4733 telephone events in the call's RTP; returns when they are sent."""
    if call.media is None:
        raise CallFailed(488, "this call has no media to send DTMF in")
    await call.media.session.send_dtmf(digits, duration=duration, gap=gap)


def close_when_ended(call: MediaCall) -> asyncio.Future[None] | None:
    """Start closing the call's media (the call has ended); the returned future is done when it is."""
    if call.media is None:
        return None
    return asyncio.ensure_future(call.media.close())


class OfferAnswer(Protocol):
    """The offer/answer (media) strategy a :class:`~p2psip.useragent.UserAgent` is given: what goes into
    which SDP body and what becomes of the media as the call goes on. The UA core moves the messages."""

    async def call(
        self,
        ua: Caller[PlacedT],
        uri: str | URI,
        *,
        play: Play = None,
        record: Record = None,
        media: CallMedia | None = None,
        headers: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
        media_options: dict[str, Any] | None = None,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> PlacedT: ...

    async def accept(
        self,
        incoming: OfferedCall,
        *,
        play: Play = None,
        record: Record = None,
        media: CallMedia | None = None,
        media_options: dict[str, Any] | None = None,
    ) -> CallMedia: ...

    def answer_reoffer(self, call: MediaCall, request: Request) -> Response: ...

    def answer_in_ack(self, call: MediaCall, request: Request) -> None: ...

    async def reoffer(
        self, call: MediaCall, direction: str, timeout: float | None = 32.0, *, ice_restart: bool = False
    ) -> Response: ...

    async def send_dtmf(
        self, call: MediaCall, digits: str, *, duration: float = 0.1, gap: float = 0.05
    ) -> None: ...

    def close_when_ended(self, call: MediaCall) -> asyncio.Future[None] | None: ...


class AudioOfferAnswer:
    """The default strategy: audio calls (PCMU, PCMA, telephone-event) through :class:`CallMedia`."""

    call = staticmethod(call_with_media)
    accept = staticmethod(accept_with_media)
    answer_reoffer = staticmethod(answer_reoffer)
    answer_in_ack = staticmethod(answer_in_ack)
    reoffer = staticmethod(reoffer)
    send_dtmf = staticmethod(send_dtmf)
    close_when_ended = staticmethod(close_when_ended)
