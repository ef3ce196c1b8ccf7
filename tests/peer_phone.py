"""A minimal SIP phone for the peer tests: real SIP over a real loopback UDP socket, written from RFC 3261
§8/§12/§13 independently of the stack's UserAgent, so the peer is checked against a second implementation.

It registers, answers (180 then 200, echoing Record-Route; or rings forever; or rejects; or stays silent)
and calls (INVITE, ACK for 2xx along the route set, BYE). Every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from p2psip.message import Request, Response, new_branch, new_tag, parse
from p2psip.uri import URI, Address

DOMAIN = "p2p.example"
_counter = itertools.count(1)


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, phone: Phone) -> None:
        self.phone = phone

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            message = parse(data)
        except Exception:
            return
        self.phone._received(message, (str(addr[0]), int(addr[1])))


@dataclass
class CallResult:
    statuses: list[int] = field(default_factory=list)
    final: Response | None = None
    bye_status: int | None = None
    invite: Request | None = None
    sent_at: float = 0.0
    times: list[tuple[int, float]] = field(default_factory=list)
    """(status, loop time) of each response to the INVITE, for latency measurements."""

    def latency(self, status: int) -> float | None:
        """Seconds from sending the INVITE to the first response with ``status``."""
        return next((t - self.sent_at for s, t in self.times if s == status), None)

    @property
    def answered(self) -> bool:
        return self.final is not None and 200 <= self.final.status < 300


class Phone:
    """``answer``: "auto" (180 + 200), "ring" (180 only), "silent" (nothing), or a status to reject with."""

    def __init__(self, user: str, answer: str | int = "auto", domain: str = DOMAIN) -> None:
        self.user = user
        self.aor = f"sip:{user}@{domain}"
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.host = "127.0.0.1"
        self.requests: list[Request] = []
        self.invites: asyncio.Queue[Request] = asyncio.Queue()
        self.acked = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.byes: asyncio.Queue[Request] = asyncio.Queue()
        self._responses: dict[str, asyncio.Queue[Response]] = {}
        self._answers: dict[str, list[Response]] = {}
        self._tag = new_tag()

    @classmethod
    async def open(
        cls, user: str, answer: str | int = "auto", domain: str = DOMAIN, host: str = "127.0.0.1"
    ) -> Phone:
        phone = cls(user, answer, domain)
        phone.host = host
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(phone), local_addr=(host, 0))
        phone.transport = transport
        phone.port = transport.get_extra_info("sockname")[1]
        return phone

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{self.host}:{self.port}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ----------------------------------------------------------------------------------------- plumbing

    def send(self, message: Request | Response, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(bytes(message), to)

    def _via(self) -> str:
        return f"SIP/2.0/UDP {self.host}:{self.port};branch={new_branch()};rport"

    def _received(self, message: Request | Response, addr: tuple[str, int]) -> None:
        if isinstance(message, Response):
            key = f"{message.call_id} {message.cseq.method}"
            queue = self._responses.get(key)
            if queue is not None:
                queue.put_nowait(message)
            return
        self.requests.append(message)
        method = message.method
        if method == "INVITE":
            self._on_invite(message, addr)
        elif method == "ACK":
            self.acked.set()
        elif method == "BYE":
            self.send(Response.for_request(message, 200), addr)
            self.byes.put_nowait(message)
        elif method == "CANCEL":
            self.send(Response.for_request(message, 200), addr)
            self.cancelled.set()
            for answer in self._answers.get(message.call_id, []):
                if answer.status < 200:
                    invite = self._pending_invite(message.call_id)
                    if invite is not None:
                        final = Response.for_request(invite, 487, to_tag=self._tag)
                        self._answers[message.call_id].append(final)
                        self.send(final, addr)
                    break
        elif method == "OPTIONS":
            self.send(Response.for_request(message, 200), addr)

    def _pending_invite(self, call_id: str) -> Request | None:
        for req in reversed(self.requests):
            if req.method == "INVITE" and req.call_id == call_id:
                return req
        return None

    def _on_invite(self, invite: Request, addr: tuple[str, int]) -> None:
        previous = self._answers.get(invite.call_id)
        if previous is not None:  # a retransmission: repeat what we said
            for response in previous:
                self.send(response, addr)
            return
        self.invites.put_nowait(invite)
        answers: list[Response] = []
        self._answers[invite.call_id] = answers
        if self.answer == "silent":
            return
        if isinstance(self.answer, int):
            answers.append(Response.for_request(invite, self.answer, to_tag=self._tag))
        else:
            ringing = Response.for_request(invite, 180, to_tag=self._tag)
            answers.append(ringing)
            if self.answer == "auto":
                ok = Response.for_request(invite, 200, to_tag=self._tag)
                ok.set("Contact", f"<{self.contact}>")
                answers.append(ok)
        for response in answers:
            for rr in invite.get_all("Record-Route"):
                response.add("Record-Route", rr)
            self.send(response, addr)

    async def _wait(self, key: str, timeout: float) -> Response:
        return await asyncio.wait_for(self._responses[key].get(), timeout)

    # ----------------------------------------------------------------------------------------- REGISTER

    async def register(
        self,
        via: tuple[str, int],
        *,
        expires: int | None = 300,
        contact: str | None = None,
        aor: str | None = None,
        call_id: str | None = None,
        cseq: int = 1,
        headers: list[tuple[str, str]] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        aor = aor or self.aor
        call_id = call_id or f"reg-{self.user}-{self.port}-{next(_counter)}"
        domain = URI(aor).host
        hdrs = list(headers or [])
        if expires is not None:
            hdrs.append(("Expires", str(expires)))
        request = Request.create(
            "REGISTER",
            f"sip:{domain}",
            from_=f"<{aor}>;tag={new_tag()}",
            to=f"<{aor}>",
            call_id=call_id,
            cseq=cseq,
            via=self._via(),
            contact=contact if contact is not None else f"<{self.contact}>",
            headers=hdrs,
        )
        return await self.request(request, via, timeout=timeout)

    async def request(self, request: Request, via: tuple[str, int], timeout: float = 10.0) -> Response:
        """Send a non-INVITE request and return its final response."""
        key = f"{request.call_id} {request.method}"
        self._responses[key] = asyncio.Queue()
        self.send(request, via)
        try:
            while True:
                response = await self._wait(key, timeout)
                if response.status >= 200:
                    return response
        finally:
            self._responses.pop(key, None)

    # ------------------------------------------------------------------------------------------- calls

    async def call(
        self,
        uri: str,
        via: tuple[str, int],
        *,
        hold: float = 0.0,
        timeout: float = 15.0,
        hang_up: bool = True,
    ) -> CallResult:
        """INVITE ``uri`` through the proxy at ``via``; ACK; optionally BYE after ``hold`` seconds."""
        call_id = f"call-{self.user}-{self.port}-{next(_counter)}"
        invite = Request.create(
            "INVITE",
            uri,
            from_=f"<{self.aor}>;tag={self._tag}",
            to=f"<{uri}>",
            call_id=call_id,
            cseq=1,
            via=self._via(),
            contact=f"<{self.contact}>",
        )
        result = CallResult(invite=invite)
        key = f"{call_id} INVITE"
        self._responses[key] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        result.sent_at = loop.time()
        self.send(invite, via)
        try:
            while True:
                response = await self._wait(key, timeout)
                result.times.append((response.status, loop.time()))
                result.statuses.append(response.status)
                if response.status >= 200:
                    result.final = response
                    break
        finally:
            self._responses.pop(key, None)
        final = result.final
        assert final is not None
        if final.status >= 300:
            ack = Request.create(
                "ACK", uri, from_=str(invite.from_), to=str(final.to), call_id=call_id, cseq=1,
                via=str(invite.top_via),
            )  # fmt: skip
            self.send(ack, via)
            return result
        # 2xx: the ACK and BYE go along the route set (Record-Route reversed) to the remote target.
        routes = list(reversed(final.get_all("Record-Route")))
        target = final.contacts[0].uri if final.contacts else URI(uri)
        next_hop = via
        if routes:
            first = Address(routes[0]).uri
            next_hop = (first.host.strip("[]"), first.port or 5060)
        else:
            next_hop = (target.host.strip("[]"), target.port or 5060)

        def in_dialog(method: str, cseq: int) -> Request:
            request = Request.create(
                method, str(target), from_=str(invite.from_), to=str(final.to), call_id=call_id, cseq=cseq,
                via=self._via(),
            )  # fmt: skip
            if routes:
                request.set("Route", routes)
            return request

        self.send(in_dialog("ACK", 1), next_hop)
        if not hang_up:
            return result
        if hold:
            await asyncio.sleep(hold)  # the call's duration, not a wait for an event
        bye_response = await self.request(in_dialog("BYE", 2), next_hop, timeout=timeout)
        result.bye_status = bye_response.status
        return result
