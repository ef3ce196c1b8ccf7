"""ICE for one call's audio (RFC 8445 through ``aioice``): candidates, checks, nomination, and the
datagram path the call's RTP takes once a pair is selected.

How it plugs into :class:`~p2psip.media.session.MediaSession`: the session sends every RTP/RTCP packet
through one object with ``sendto(data, addr)``; with ICE that object is :class:`IceMedia`, which hands
the packet to aioice's selected pair (``Connection.sendto``), and a pump feeds what aioice receives back
into the session. Why through aioice and not "take the selected socket": the selected pair may be a
relayed one, whose socket is aioice's TURN client (channel data, refreshes, permissions); only aioice
can send on it, and it keeps answering the far end's consent checks on every socket. So the session
never owns a socket in an ICE call, and a relayed call and a direct one run the same code.

Candidates are gathered on the media address only (the address the SIP stack uses toward the far end,
as for a call without ICE), plus a server-reflexive one from ``stun`` (the home peer's SIP UDP port
answers binding requests) and a relayed one from ``turn`` (a full peer's TURN server,
:mod:`p2psip.turnserver`). The default candidate (``c=``/``m=``) is the host one, so a far end that
does no ICE sends where it always did; then we send to its ``c=``/``m=`` (aioice's
``set_selected_pair``), and its packets reach us on that socket.

RTCP is multiplexed on the RTP component (``a=rtcp-mux``, RFC 5761): one component to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import aioice
from aioice.candidate import Candidate

from p2psip.errors import ParseError
from p2psip.media.iceagent import MediaAgent, add_default_remote, hand_over, selected_pair
from p2psip.media.rtp import is_rtcp
from p2psip.sdp import IceDescription, SessionDescription

__all__ = ["IceMedia", "IceSettings", "settings_for_offer"]

Address = tuple[str, int]


@dataclass(frozen=True)
class IceSettings:
    """Where a call's ICE agent gets its candidates. ``stun``: a STUN server (the home peer's SIP UDP
    port); ``turn`` with ``turn_username``/``turn_password``: a TURN server and the time-limited
    credentials its peer issued (:func:`p2psip.turn.issue_credentials`); ``relay_only``: gather only the
    relayed candidate (what the lab uses to force a relayed call)."""

    stun: Address | None = None
    turn: Address | None = None
    turn_username: str | None = None
    turn_password: str | None = None
    relay_only: bool = False
    timeout: float = 10.0
    components: int = 1
    """1: RTP and RTCP multiplexed on one component (``a=rtcp-mux``, what we offer); 2: a second component
    for RTCP, for answering an offer without ``a=rtcp-mux`` (:func:`settings_for_offer`)."""


def settings_for_offer(settings: IceSettings, offer: bytes) -> IceSettings:
    """The settings to answer ``offer`` with: a second component (RTCP, RFC 8445 §5.1.1) when its audio
    stream does ICE without ``a=rtcp-mux`` and has component-2 candidates (baresip's ``ice`` module with
    ``rtcp_mux no``, its default). Our own offers multiplex (one component, one TURN allocation per call),
    so only the answerer pays for the second component, and only when the far end needs it."""
    try:
        sdp = SessionDescription.parse(offer)
    except ParseError:
        return settings  # the answer reports it (488)
    stream = next((m for m in sdp.media if m.media == "audio" and not m.rejected), None)
    if stream is None or stream.attribute("rtcp-mux") is not None:
        return settings
    ice = remote_ice(sdp, stream)
    if ice is None or not any(_component(text) == 2 for text in ice.candidates):
        return settings
    return dataclasses.replace(settings, components=2)


def _component(candidate: str) -> int | None:
    fields = candidate.split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


class IceMedia:
    """One call's ICE agent and the datagram path of its media. Create with ``await IceMedia.gather()``."""

    def __init__(self, agent: MediaAgent, settings: IceSettings) -> None:
        self.agent = agent
        self.settings = settings
        self.state = "new"  # new, checking, connected (ICE), fallback (far end without ICE), failed
        self.selected: tuple[Candidate, Candidate] | None = None  # (local, remote) once nominated
        self.sent = 0
        self.received = 0
        self.rtcp_component = 0  # RTCP packets sent and received on the second component
        self.rtcp_dropped = 0  # RTCP with nowhere to go: no rtcp-mux at the far end, no component 2 here
        self.rtcp_selected: tuple[Candidate, Candidate] | None = None  # component 2's pair, when there is one
        self.rtcp_muxed = True  # the far end takes RTCP on the RTP component (it said a=rtcp-mux)
        self.restarts = 0  # ICE restarts (RFC 8445 §9) this call went through
        self.dropped = 0  # packets the session sent before a pair was selected
        self.relay_missing = settings.turn is not None and all(
            candidate.type != "relay" for candidate in agent.local_candidates
        )
        """A TURN server was named but gave no relayed candidate (it refused the allocation, 486/508, or
        did not answer): the call goes on with host and server-reflexive candidates (RFC 8445 §5.1.1.2)."""
        self._deliver: Any = None  # the session's datagram handler
        self._tasks: list[asyncio.Task[None]] = []
        self._remote_default: Address | None = None
        self._remote_ice: IceDescription | None = None

    @staticmethod
    def _agent(address: str, settings: IceSettings, controlling: bool) -> MediaAgent:
        return MediaAgent(
            address,
            ice_controlling=controlling,
            components=settings.components,
            stun_server=settings.stun,
            turn_server=settings.turn,
            turn_username=settings.turn_username,
            turn_password=settings.turn_password,
            use_ipv4=":" not in address,
            use_ipv6=":" in address,
            transport_policy=(
                aioice.TransportPolicy.RELAY if settings.relay_only else aioice.TransportPolicy.ALL
            ),
        )

    @classmethod
    async def gather(cls, address: str, settings: IceSettings, *, controlling: bool) -> IceMedia:
        agent = cls._agent(address, settings, controlling)
        await agent.gather_candidates()
        if not agent.local_candidates:
            await agent.close()
            why = " (the TURN server refused an allocation or did not answer)" if settings.relay_only else ""
            raise ConnectionError(f"ICE gathered no candidate{why}")
        return cls(agent, settings)

    # ------------------------------------------------------------------ SDP
    @property
    def default(self) -> Candidate:
        """The candidate in ``c=``/``m=``: the host one if there is one, else the relayed one."""
        return self._default(1)

    @property
    def rtcp_default(self) -> Candidate | None:
        """The second component's default candidate (for ``a=rtcp``, RFC 8839 §5.1), if there is one."""
        return self._default(2) if self.settings.components > 1 else None

    def _default(self, component: int) -> Candidate:
        candidates = [c for c in self.agent.local_candidates if c.component == component]
        candidates = candidates or self.agent.local_candidates
        for kind in ("host", "srflx", "relay"):
            for candidate in candidates:
                if candidate.type == kind:
                    return candidate
        return candidates[0]

    def description(self) -> IceDescription:
        return IceDescription(
            self.agent.local_username,
            self.agent.local_password,
            tuple(candidate.to_sdp() for candidate in self.agent.local_candidates),
        )

    # ------------------------------------------------------------------ media path
    def attach(self, deliver: Any) -> None:
        """Where received datagrams go: the session's handler ``deliver(data, addr)``."""
        self._deliver = deliver

    def start(self, remote: IceDescription | None, remote_default: Address) -> None:
        """The far end's answer or offer is known: run the checks (it does ICE) or send to its ``c=``/``m=``.

        A re-offer or re-answer with the same credentials keeps the checked path; new credentials from the
        far end are an ICE restart (:meth:`needs_restart`, which the caller handles before answering)."""
        if self.state != "new":
            return
        self._remote_default = remote_default
        self._remote_ice = remote
        if remote is None:
            self._fallback(remote_default)
            return
        self.agent.remote_username, self.agent.remote_password = remote.ufrag, remote.pwd
        self.state = "checking"
        self._tasks.append(asyncio.ensure_future(self._connect(remote)))

    def needs_restart(self, remote: IceDescription | None) -> bool:
        """Whether the far end's description restarts ICE: new ``ice-ufrag``/``ice-pwd`` (RFC 8839
        §4.4.1.1.1) after checks ran with the previous ones."""
        known = self._remote_ice
        return (
            remote is not None
            and known is not None
            and self.state != "new"
            and (remote.ufrag, remote.pwd) != (known.ufrag, known.pwd)
        )

    def restart(self) -> None:
        """ICE restart (RFC 8445 §9): a new agent with new credentials, whose checks run from scratch once
        :meth:`start` gets the far end's new description, and whose selected pair then carries the media.

        It keeps the candidates already gathered (§9 lets an agent keep them) and takes over their
        sockets, TURN allocation included: a restart happens inside an SDP answer, which is synchronous,
        and keeping the allocation costs the relay nothing new. The old agent's checks, consent and pump
        stop; packets the session sends until the new pair is selected are dropped (counted)."""
        old = self.agent
        agent = self._agent(old.media_address, self.settings, old.ice_controlling)
        hand_over(old, agent)
        for task in self._tasks:
            task.cancel()
        self._tasks = [asyncio.ensure_future(old.close())]  # its sockets now belong to the new agent
        self.agent = agent
        self.state = "new"
        self.selected = self.rtcp_selected = None
        self._remote_ice = None
        self.restarts += 1

    async def _connect(self, remote: IceDescription) -> None:
        for text in remote.candidates:
            with contextlib.suppress(ValueError, IndexError):
                candidate = Candidate.from_sdp(text)
                if candidate.component <= self.settings.components and candidate.transport.lower() == "udp":
                    await self.agent.add_remote_candidate(candidate)
        await self.agent.add_remote_candidate(None)
        try:
            await asyncio.wait_for(self.agent.connect(), self.settings.timeout)
        except (ConnectionError, TimeoutError):
            self.state = "failed"
            return
        self.state = "connected"
        self.selected = selected_pair(self.agent)
        self.rtcp_selected = selected_pair(self.agent, 2)
        self._tasks.append(asyncio.ensure_future(self._pump()))

    def _fallback(self, remote_default: Address) -> None:
        remote = Candidate(
            foundation="default",
            component=1,
            transport="udp",
            priority=1,
            host=remote_default[0],
            port=remote_default[1],
            type="host",
        )
        add_default_remote(self.agent, remote)  # no checks: this far end does no ICE
        self.agent.set_selected_pair(1, self.default.foundation, "default")
        self.state = "fallback"
        self.selected = (self.default, remote)
        self._tasks.append(asyncio.ensure_future(self._pump()))

    async def _pump(self) -> None:
        selected = self.selected
        addr = (selected[1].host, selected[1].port) if selected else ("0.0.0.0", 0)
        while True:
            try:
                data, component = await self.agent.recvfrom()
            except ConnectionError:
                return
            self.received += 1
            if component == 2:
                self.rtcp_component += 1
            if self._deliver is not None:
                self._deliver(data, addr)

    def sendto(self, data: bytes, addr: Address | None = None) -> None:
        """Send one datagram on the selected pair (``addr`` is ignored: ICE chose the path)."""
        if self.state not in ("connected", "fallback"):
            self.dropped += 1
            return
        component = 1
        if is_rtcp(data) and self.rtcp_selected is not None:
            component = 2
            self.rtcp_component += 1
        elif is_rtcp(data) and not self.rtcp_muxed:
            self.rtcp_dropped += 1  # its RTP port is no place for RTCP (RFC 5761 §5.1.3)
            return
        self.sent += 1
        task = asyncio.ensure_future(self.agent.sendto(data, component))  # in order: packets stay in order
        task.add_done_callback(_retrieve)

    @property
    def relayed(self) -> bool:
        """Whether the selected pair runs through a TURN relay (our side's candidate is relayed)."""
        return self.selected is not None and self.selected[0].type == "relay"

    def stats(self) -> dict[str, object]:
        local, remote = self.selected if self.selected else (None, None)
        return {
            "state": self.state,
            "local": f"{local.type} {local.host}:{local.port}" if local else None,
            "remote": f"{remote.type} {remote.host}:{remote.port}" if remote else None,
            "relayed": self.relayed,
            "relay_missing": self.relay_missing,
            "sent": self.sent,
            "received": self.received,
            "restarts": self.restarts,
            "rtcp_component": self.rtcp_component,
            "rtcp_dropped": self.rtcp_dropped,
            "dropped": self.dropped,
        }

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        await self.agent.close()


def _retrieve(task: asyncio.Future[None]) -> None:
    """A send that failed (the pair went away as the call ended) is not worth a logged traceback."""
    if not task.cancelled():
        task.exception()


def remote_ice(body_sdp: Any, media: Any) -> IceDescription | None:
    """The far end's ICE description of ``media`` in ``body_sdp``; a malformed one counts as none, and so
    does one with ``a=ice-mismatch`` (RFC 8839 §5.4: the answerer does no ICE for this stream, so both
    ends use the default ``c=``/``m=``; baresip answers so to our one-component offer with ``rtcp_mux
    no``)."""
    if media.attribute("ice-mismatch") is not None:
        return None
    try:
        return IceDescription.of(body_sdp, media)
    except ParseError:
        return None
